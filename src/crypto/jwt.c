/*
 * jwt.c - verification of the controller's enrollment JWT (compact JWS).
 *
 * The token is three base64url segments, header.payload.signature. We decode
 * the header, choose the verifier from its "alg" (ES256/ES384/ES512/RS256 and
 * nothing else: "none" and HMAC algs are refused outright, since with a
 * public certificate as the "key" HS256 would be forgeable), verify the
 * signature over the ASCII bytes "header.payload" with the public key of the
 * controller's TLS certificate, and only then look at the claims.
 *
 * The payload holds the one-time enrollment token (jti), so every buffer that
 * held decoded payload bytes is wiped before it is freed.
 */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/asn.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/hash.h>
#include <wolfssl/wolfcrypt/rsa.h>
#include <wolfssl/wolfcrypt/signature.h>

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "zm/b64.h"
#include "zm/crypto.h"
#include "zm/zm.h"

/* RSA keys below this size are refused (NIST SP 800-131A). */
#define RSA_MIN_BITS 2048
/* Largest SubjectPublicKeyInfo we extract: RSA-4096 is ~550 bytes, and the
 * build caps RSA at 4096 bits (RSA_MAX_SIZE). */
#define SPKI_MAX 1024

typedef enum { ALG_ES256, ALG_ES384, ALG_ES512, ALG_RS256 } alg_t;

/* ---- base64url ------------------------------------------------------------
 */

/*
 * Strict unpadded base64url (RFC 7515 §2) on top of zm_b64url_decode, which
 * already refuses lengths of 1 mod 4 and non-zero unused bits (one encoding
 * per byte string); JWS also forbids '=' padding. Returns a malloc'd buffer
 * of *out_len bytes (plus a NUL for jansson), or NULL.
 */
static uint8_t *b64url_decode(const char *in, size_t len, size_t *out_len) {
  if (memchr(in, '=', len) != NULL)
    return NULL;
  size_t cap = len / 4 * 3 + 3;
  uint8_t *out = zm_xmalloc(cap + 1);
  long n = zm_b64url_decode(in, len, out, cap);
  if (n < 0) {
    zm_wipe(out, cap + 1);
    free(out);
    return NULL;
  }
  out[n] = '\0';
  *out_len = (size_t)n;
  return out;
}

static void free_wiped(uint8_t *p, size_t n) {
  if (p != NULL) {
    zm_wipe(p, n);
    free(p);
  }
}

/* ---- header ----------------------------------------------------------------
 */

/*
 * Parses the JOSE header and picks the algorithm. Returns 0, ZM_E_INVAL for
 * a header that is not a JSON object with a string "alg", or
 * ZM_E_BAD_SIGNATURE for an algorithm we refuse. "kid" is not checked: the
 * key is the certificate we were given, whatever the token says, and the Go
 * SDK does the same. A "crit" header names extensions we do not implement,
 * so RFC 7515 §4.1.11 says reject.
 */
static int parse_header(const uint8_t *hdr, size_t len, alg_t *alg) {
  json_error_t jerr;
  json_t *root =
      json_loadb((const char *)hdr, len, JSON_REJECT_DUPLICATES, &jerr);
  int rv = ZM_E_INVAL;

  if (root == NULL || !json_is_object(root))
    goto out;
  const char *a = json_string_value(json_object_get(root, "alg"));
  if (a == NULL)
    goto out;
  json_t *typ = json_object_get(root, "typ");
  if (typ != NULL && !json_is_string(typ))
    goto out;
  rv = ZM_E_BAD_SIGNATURE;
  if (json_object_get(root, "crit") != NULL)
    goto out;
  if (strcmp(a, "ES256") == 0)
    *alg = ALG_ES256;
  else if (strcmp(a, "ES384") == 0)
    *alg = ALG_ES384;
  else if (strcmp(a, "ES512") == 0)
    *alg = ALG_ES512;
  else if (strcmp(a, "RS256") == 0)
    *alg = ALG_RS256;
  else
    goto out;
  rv = 0;
out:
  json_decref(root);
  return rv;
}

/* ---- signature ------------------------------------------------------------
 */

/* Extracts the certificate's SubjectPublicKeyInfo and its key type OID. */
static int cert_spki(const uint8_t *der, size_t len, uint8_t *spki,
                     word32 *spki_len, word32 *key_oid) {
  DecodedCert dc;
  int rv = ZM_E_CRYPTO;

  if (der == NULL || len == 0 || len > UINT32_MAX)
    return ZM_E_CRYPTO;
  wc_InitDecodedCert(&dc, der, (word32)len, NULL);
  /* NO_VERIFY: the Go SDK, too, takes the key from the presented leaf and
   * ignores its chain and validity window. */
  if (wc_ParseCert(&dc, CERT_TYPE, NO_VERIFY, NULL) != 0)
    goto out;
  if (wc_GetPubKeyDerFromCert(&dc, spki, spki_len) != 0)
    goto out;
  *key_oid = dc.keyOID;
  rv = 0;
out:
  wc_FreeDecodedCert(&dc);
  return rv;
}

/* The controller signs every enrollment JWT with the key of the same
 * certificate: each thread keeps the SPKI of the last certificate it parsed
 * (public data), so that a verification parses the certificate only when it
 * changed. */
#define SPKI_CACHE_DER_MAX 8192u
static _Thread_local struct {
  size_t der_len; /* 0: empty */
  uint8_t der[SPKI_CACHE_DER_MAX];
  uint8_t spki[SPKI_MAX];
  word32 spki_len, key_oid;
} spki_cache;

static int cached_spki(const uint8_t *der, size_t len, uint8_t *spki,
                       word32 *spki_len, word32 *key_oid) {
  if (spki_cache.der_len != 0 && spki_cache.der_len == len &&
      *spki_len >= spki_cache.spki_len &&
      memcmp(spki_cache.der, der, len) == 0) {
    memcpy(spki, spki_cache.spki, spki_cache.spki_len);
    *spki_len = spki_cache.spki_len;
    *key_oid = spki_cache.key_oid;
    return 0;
  }
  int rv = cert_spki(der, len, spki, spki_len, key_oid);
  spki_cache.der_len = 0;
  if (rv == 0 && len <= SPKI_CACHE_DER_MAX &&
      *spki_len <= sizeof spki_cache.spki) {
    memcpy(spki_cache.der, der, len);
    memcpy(spki_cache.spki, spki, *spki_len);
    spki_cache.spki_len = *spki_len;
    spki_cache.key_oid = *key_oid;
    spki_cache.der_len = len;
  }
  return rv;
}

static int verify_ecdsa(alg_t alg, const uint8_t *spki, word32 spki_len,
                        const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                        size_t sig_len) {
  static const struct {
    int curve;
    word32 coord;
    enum wc_HashType hash;
  } P[] = {
      [ALG_ES256] = {ECC_SECP256R1, 32, WC_HASH_TYPE_SHA256},
      [ALG_ES384] = {ECC_SECP384R1, 48, WC_HASH_TYPE_SHA384},
      [ALG_ES512] = {ECC_SECP521R1, 66, WC_HASH_TYPE_SHA512},
  };
  ecc_key key;
  word32 idx = 0;
  uint8_t hash[WC_MAX_DIGEST_SIZE];
  /* DER ECDSA-Sig-Value: two INTEGERs of at most coord+1 bytes + headers. */
  uint8_t dsig[2 * 67 + 16];
  word32 dsig_len = sizeof(dsig);
  int res = 0, rv = ZM_E_CRYPTO;

  if (wc_ecc_init(&key) != 0)
    return ZM_E_CRYPTO;
  if (wc_EccPublicKeyDecode(spki, &idx, &key, spki_len) != 0)
    goto out;
  rv = ZM_E_BAD_SIGNATURE;
  if (key.dp == NULL || key.dp->id != P[alg].curve) /* alg/curve mismatch */
    goto out;
  /* RFC 7518 §3.4: R and S as fixed-width big-endian octets, concatenated. */
  if (sig_len != 2 * P[alg].coord)
    goto out;
  int hlen = wc_HashGetDigestSize(P[alg].hash);
  if (hlen <= 0 ||
      wc_Hash(P[alg].hash, msg, (word32)msg_len, hash, (word32)hlen) != 0) {
    rv = ZM_E_CRYPTO;
    goto out;
  }
  if (wc_ecc_rs_raw_to_sig(sig, P[alg].coord, sig + P[alg].coord, P[alg].coord,
                           dsig, &dsig_len) != 0)
    goto out;
  if (wc_ecc_verify_hash(dsig, dsig_len, hash, (word32)hlen, &res, &key) != 0 ||
      res != 1)
    goto out;
  rv = 0;
out:
  wc_ecc_free(&key);
  return rv;
}

static int verify_rs256(const uint8_t *spki, word32 spki_len,
                        const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                        size_t sig_len) {
  RsaKey key;
  word32 idx = 0;
  int rv = ZM_E_CRYPTO;

  if (wc_InitRsaKey(&key, NULL) != 0)
    return ZM_E_CRYPTO;
  if (wc_RsaPublicKeyDecode(spki, &idx, &key, spki_len) != 0)
    goto out;
  int mod_len = wc_RsaEncryptSize(&key);
  if (mod_len <= 0 || mod_len * 8 < RSA_MIN_BITS)
    goto out;
  rv = ZM_E_BAD_SIGNATURE;
  /* RFC 7518 §3.3: the signature is exactly the modulus length. */
  if (sig_len != (size_t)mod_len)
    goto out;
  /* RFC 8017 §5.2.2: the signature representative must be below the
   * modulus. wolfSSL 5.5.4 does not check this and accepts s + n as well as
   * s, so one signed token would have a second valid spelling (found by
   * test/fuzz/fuzz_jwt.c). Both are mod_len big-endian bytes, and n has no
   * leading zero byte, so memcmp compares them as integers. */
  uint8_t n[RSA_MAX_SIZE / 8], e[RSA_MAX_SIZE / 8];
  word32 n_len = sizeof(n), e_len = sizeof(e);
  if (wc_RsaFlattenPublicKey(&key, e, &e_len, n, &n_len) != 0 ||
      n_len != (word32)mod_len || memcmp(sig, n, n_len) >= 0)
    goto out;
  /* PKCS#1 v1.5 with the SHA-256 DigestInfo (RSA_W_ENC adds it). */
  if (wc_SignatureVerify(WC_HASH_TYPE_SHA256, WC_SIGNATURE_TYPE_RSA_W_ENC, msg,
                         (word32)msg_len, sig, (word32)sig_len, &key,
                         sizeof(key)) != 0)
    goto out;
  rv = 0;
out:
  wc_FreeRsaKey(&key);
  return rv;
}

static int verify_signature(alg_t alg, const uint8_t *cert_der, size_t cert_len,
                            const uint8_t *msg, size_t msg_len,
                            const uint8_t *sig, size_t sig_len) {
  uint8_t spki[SPKI_MAX];
  word32 spki_len = sizeof(spki);
  word32 key_oid = 0;
  int rv;

  if ((rv = cached_spki(cert_der, cert_len, spki, &spki_len, &key_oid)) != 0)
    return rv;
  switch (key_oid) {
  case ECDSAk:
    if (alg == ALG_RS256)
      return ZM_E_BAD_SIGNATURE;
    return verify_ecdsa(alg, spki, spki_len, msg, msg_len, sig, sig_len);
  case RSAk:
    if (alg != ALG_RS256)
      return ZM_E_BAD_SIGNATURE;
    return verify_rs256(spki, spki_len, msg, msg_len, sig, sig_len);
  default:
    return ZM_E_CRYPTO; /* Ed25519, DSA...: not a key OpenZiti signs with */
  }
}

/* ---- claims ----------------------------------------------------------------
 */

static const char *nonempty_string(json_t *obj, const char *name) {
  const char *s = json_string_value(json_object_get(obj, name));
  return s != NULL && s[0] != '\0' ? s : NULL;
}

/* jansson frees without wiping, so scrub the one secret it holds first. */
static void wipe_json_string(json_t *s) {
  if (json_is_string(s))
    zm_wipe((char *)json_string_value(s), json_string_length(s));
}

static int parse_claims(const uint8_t *payload, size_t len,
                        const char *expect_sub, int64_t now_s,
                        zm_jwt_claims_t *out) {
  json_error_t jerr;
  json_t *root =
      json_loadb((const char *)payload, len, JSON_REJECT_DUPLICATES, &jerr);
  int rv = ZM_E_INVAL;

  if (root == NULL || !json_is_object(root))
    goto out;
  const char *iss = nonempty_string(root, "iss");
  const char *sub = nonempty_string(root, "sub");
  const char *em = json_string_value(json_object_get(root, "em"));
  json_t *jti = json_object_get(root, "jti");
  json_t *exp = json_object_get(root, "exp");
  if (iss == NULL || sub == NULL || em == NULL || !json_is_string(jti) ||
      json_string_length(jti) == 0 || !json_is_number(exp))
    goto out;
  /* Embedded NULs would make the C strings lie about the claim. */
  if (strlen(json_string_value(jti)) != json_string_length(jti))
    goto out;
  if (strcmp(em, "ott") != 0)
    goto out;
  if (expect_sub != NULL && strcmp(sub, expect_sub) != 0)
    goto out;
  /* NumericDate may carry a fraction (RFC 7519 §2); compare whole seconds. */
  double e = json_number_value(exp);
  if (!isfinite(e) || e < -9.0e15 || e > 9.0e15)
    goto out;
  int64_t exp_s = (int64_t)floor(e);
  if (exp_s <= now_s) {
    rv = ZM_E_EXPIRED;
    goto out;
  }
  out->iss = zm_xstrdup(iss);
  out->sub = zm_xstrdup(sub);
  out->em = zm_xstrdup(em);
  zm_secret_set(&out->jti, json_string_value(jti), json_string_length(jti));
  out->exp = exp_s;
  rv = 0;
out:
  if (root != NULL) {
    wipe_json_string(json_object_get(root, "jti"));
    json_decref(root);
  }
  return rv;
}

/* ---- API -------------------------------------------------------------------
 */

int zm_jwt_verify(const char *token, size_t len, const uint8_t *cert_der,
                  size_t cert_len, const char *expect_sub, int64_t now_s,
                  zm_jwt_claims_t *out) {
  uint8_t *hdr = NULL, *payload = NULL, *sig = NULL;
  size_t hdr_len = 0, payload_len = 0, sig_len = 0;
  alg_t alg = ALG_ES256;
  int rv = ZM_E_INVAL;

  if (out == NULL)
    return ZM_E_INVAL;
  memset(out, 0, sizeof(*out));
  if (token == NULL || len == 0 || len > ZM_JWT_MAX_LEN)
    return ZM_E_INVAL;

  /* Exactly two dots; JWE (five segments) and JSON serialisation refused. */
  const char *d1 = memchr(token, '.', len);
  if (d1 == NULL)
    return ZM_E_INVAL;
  const char *d2 = memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - token));
  if (d2 == NULL || memchr(d2 + 1, '.', len - (size_t)(d2 + 1 - token)))
    return ZM_E_INVAL;
  size_t h_enc = (size_t)(d1 - token);
  size_t p_enc = (size_t)(d2 - d1 - 1);
  size_t s_enc = len - (size_t)(d2 + 1 - token);
  /* An empty signature is let through to the alg check, so that an
   * unsecured token ("alg":"none") reports the alg, not its shape. */
  if (h_enc == 0 || p_enc == 0)
    return ZM_E_INVAL;

  if ((hdr = b64url_decode(token, h_enc, &hdr_len)) == NULL ||
      (payload = b64url_decode(d1 + 1, p_enc, &payload_len)) == NULL ||
      (sig = b64url_decode(d2 + 1, s_enc, &sig_len)) == NULL)
    goto out;
  if ((rv = parse_header(hdr, hdr_len, &alg)) != 0)
    goto out;
  /* The signing input is the encoded header and payload as sent. */
  rv = verify_signature(alg, cert_der, cert_len, (const uint8_t *)token,
                        (size_t)(d2 - token), sig, sig_len);
  if (rv != 0)
    goto out;
  rv = parse_claims(payload, payload_len, expect_sub, now_s, out);
out:
  free_wiped(hdr, hdr_len + 1);
  free_wiped(payload, payload_len + 1);
  free_wiped(sig, sig_len + 1);
  if (rv != 0)
    zm_jwt_claims_dispose(out);
  return rv;
}

void zm_jwt_claims_dispose(zm_jwt_claims_t *c) {
  if (c == NULL)
    return;
  free(c->iss);
  free(c->sub);
  free(c->em);
  zm_secret_dispose(&c->jti);
  memset(c, 0, sizeof(*c));
}
