/*
 * cacerts.c - decoder for the EST cacerts body (RFC 7030 §4.1.3): base64 of
 * a degenerate, certs-only PKCS#7 SignedData (RFC 5652 §5.1).
 *
 * We walk the DER ourselves instead of using wc_PKCS7_VerifySignedData: that
 * keeps at most MAX_PKCS7_CERTS certificates (4 or 15, by build), and we
 * only need the certificates [0] set, not any signature processing. The
 * walker accepts DER only (definite lengths), checks every length against
 * the bytes that remain, and never recurses deeper than the fixed structure.
 */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/asn_public.h>

#include <stdlib.h>
#include <string.h>

#include "zm/crypto.h"
#include "zm/zm.h"

/* ---- base64
 * ------------------------------------------------------------------ */

static int b64_val(unsigned char c) {
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (c == '+')
    return 62;
  if (c == '/')
    return 63;
  return -1;
}

static int is_space(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Standard base64 with whitespace anywhere and '=' padding only at the end
 * (padding may be omitted). Returns a malloc'd buffer or NULL.
 */
static uint8_t *b64_decode(const char *in, size_t len, size_t *out_len) {
  uint8_t *out = zm_xmalloc(len / 4 * 3 + 3);
  size_t n = 0, syms = 0, pads = 0;
  uint32_t acc = 0;
  unsigned bits = 0;

  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)in[i];
    if (is_space(c))
      continue;
    if (c == '=') {
      if (++pads > 2)
        goto fail;
      continue;
    }
    int v = b64_val(c);
    if (v < 0 || pads > 0) /* data after padding */
      goto fail;
    syms++;
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[n++] = (uint8_t)(acc >> bits);
      acc &= (1u << bits) - 1;
    }
  }
  if (syms % 4 == 1 || (pads > 0 && (syms + pads) % 4 != 0))
    goto fail;
  *out_len = n;
  return out;
fail:
  free(out);
  return NULL;
}

/* ---- DER
 * ------------------------------------------------------------------------ */

typedef struct {
  const uint8_t *p; /* contents */
  size_t len;       /* contents length */
  uint8_t tag;
} tlv_t;

/*
 * Reads one TLV from the slice [*pos, end) into t and advances *pos past it.
 * Low tag numbers only, definite lengths of at most 4 octets. Returns 0 or -1.
 */
static int der_next(const uint8_t *buf, size_t end, size_t *pos, tlv_t *t) {
  size_t i = *pos;
  if (end - i < 2)
    return -1;
  t->tag = buf[i++];
  if ((t->tag & 0x1f) == 0x1f) /* high tag number form: none in PKCS#7 */
    return -1;
  size_t l = buf[i++];
  if (l & 0x80) {
    size_t nb = l & 0x7f;
    if (nb == 0 || nb > 4 || end - i < nb) /* 0 = indefinite (BER) */
      return -1;
    l = 0;
    for (size_t k = 0; k < nb; k++)
      l = (l << 8) | buf[i++];
  }
  if (l > end - i)
    return -1;
  t->p = buf + i;
  t->len = l;
  *pos = i + l;
  return 0;
}

/* Reads the next TLV of `tag` inside parent; -1 on mismatch. */
static int der_expect(const tlv_t *parent, size_t *pos, uint8_t tag, tlv_t *t) {
  if (der_next(parent->p, parent->len, pos, t) != 0 || t->tag != tag)
    return -1;
  return 0;
}

/* Certificate ::= SEQUENCE { tbs SEQUENCE, sigAlg SEQUENCE, sig BIT STRING } */
static int cert_shape_ok(const tlv_t *cert) {
  tlv_t t;
  size_t pos = 0;
  return der_expect(cert, &pos, 0x30, &t) == 0 &&
         der_expect(cert, &pos, 0x30, &t) == 0 &&
         der_expect(cert, &pos, 0x03, &t) == 0 && pos == cert->len;
}

/* Appends the PEM of one DER certificate to *out. */
static int append_pem(char **out, size_t *out_len, const tlv_t *cert,
                      size_t der_len) {
  size_t cap = der_len * 2 + 128;
  *out = zm_xrealloc(*out, *out_len + cap + 1);
  /* Re-encode the whole TLV (header included): cert->p points past it. */
  const uint8_t *der = cert->p - (der_len - cert->len);
  int n = wc_DerToPem(der, (word32)der_len, (byte *)*out + *out_len,
                      (word32)cap, CERT_TYPE);
  if (n <= 0 || (size_t)n > cap)
    return -1;
  *out_len += (size_t)n;
  (*out)[*out_len] = '\0';
  return 0;
}

/* id-signedData, 1.2.840.113549.1.7.2 */
static const uint8_t OID_SIGNED_DATA[] = {0x2a, 0x86, 0x48, 0x86, 0xf7,
                                          0x0d, 0x01, 0x07, 0x02};

static int parse_pkcs7(const uint8_t *der, size_t len, char **pem,
                       size_t *pem_len, size_t *count) {
  tlv_t all = {der, len, 0}, ci, oid, explicit0, sd, t, certs;
  size_t pos = 0;

  /* ContentInfo ::= SEQUENCE { contentType OID, content [0] EXPLICIT } */
  if (der_expect(&all, &pos, 0x30, &ci) != 0 || pos != len)
    return -1;
  pos = 0;
  if (der_expect(&ci, &pos, 0x06, &oid) != 0 ||
      oid.len != sizeof(OID_SIGNED_DATA) ||
      memcmp(oid.p, OID_SIGNED_DATA, oid.len) != 0)
    return -1;
  if (der_expect(&ci, &pos, 0xa0, &explicit0) != 0)
    return -1;
  pos = 0;
  if (der_expect(&explicit0, &pos, 0x30, &sd) != 0)
    return -1;

  /* SignedData ::= SEQUENCE { version INTEGER, digestAlgorithms SET,
   *   encapContentInfo SEQUENCE, certificates [0] IMPLICIT SET OF ... } */
  pos = 0;
  if (der_expect(&sd, &pos, 0x02, &t) != 0 ||
      der_expect(&sd, &pos, 0x31, &t) != 0 ||
      der_expect(&sd, &pos, 0x30, &t) != 0 ||
      der_expect(&sd, &pos, 0xa0, &certs) != 0)
    return -1;

  /* CertificateChoices: plain certificates are SEQUENCEs; the obsolete
   * and attribute-certificate choices are tagged [0]..[3] and skipped. */
  pos = 0;
  while (pos < certs.len) {
    size_t start = pos;
    if (der_next(certs.p, certs.len, &pos, &t) != 0)
      return -1;
    if (t.tag != 0x30)
      continue;
    if (!cert_shape_ok(&t) || append_pem(pem, pem_len, &t, pos - start) != 0)
      return -1;
    (*count)++;
  }
  return *count > 0 ? 0 : -1;
}

/* ---- API
 * ---------------------------------------------------------------------- */

int zm_cacerts_decode(const char *body, size_t len, char **pem_out,
                      size_t *n_certs) {
  uint8_t *der;
  size_t der_len = 0, pem_len = 0, count = 0;
  char *pem = NULL;

  if (pem_out != NULL)
    *pem_out = NULL;
  if (n_certs != NULL)
    *n_certs = 0;
  if (body == NULL || pem_out == NULL || n_certs == NULL || len == 0 ||
      len > ZM_CACERTS_MAX_LEN)
    return ZM_E_INVAL;
  if ((der = b64_decode(body, len, &der_len)) == NULL)
    return ZM_E_INVAL;
  int rv = parse_pkcs7(der, der_len, &pem, &pem_len, &count);
  free(der);
  if (rv != 0) {
    free(pem);
    return ZM_E_INVAL;
  }
  *pem_out = pem;
  *n_certs = count;
  return 0;
}
