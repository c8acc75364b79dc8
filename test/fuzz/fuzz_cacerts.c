/*
 * fuzz_cacerts.c - zm_cacerts_decode, the EST /cacerts body decoder (base64
 * of a certs-only PKCS#7 SignedData, walked by our own DER reader).
 *
 * Input: byte 0 bit 0 = 0: the rest is the body as the controller sends it;
 * 1: the rest is DER, which the driver base64-encodes in 64-char lines first
 * (so that mutations land in the DER walker rather than die in base64).
 * Properties: on success the PEM bundle holds exactly *n_certs (>= 1)
 * certificate blocks and is NUL-terminated; on error both outputs are
 * cleared. No over-read, leak or crash for any body.
 */
#include "fuzz_common.h"

#include "zm/crypto.h"
#include "zm/zm.h"

#include <string.h>

static char *b64_lines(const uint8_t *p, size_t n, size_t *out_len) {
  static const char A[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t cap = (n + 2) / 3 * 4;
  cap += cap / 64 + 2;
  char *o = malloc(cap);
  size_t k = 0, col = 0;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)p[i] << 16;
    if (i + 1 < n)
      v |= (uint32_t)p[i + 1] << 8;
    if (i + 2 < n)
      v |= p[i + 2];
    o[k++] = A[v >> 18 & 63];
    o[k++] = A[v >> 12 & 63];
    o[k++] = i + 1 < n ? A[v >> 6 & 63] : '=';
    o[k++] = i + 2 < n ? A[v & 63] : '=';
    if ((col += 4) == 64) {
      o[k++] = '\n';
      col = 0;
    }
  }
  *out_len = k;
  return o;
}

static size_t count(const char *hay, const char *needle) {
  size_t n = 0;
  for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
    n++;
  return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  size_t len;
  char *body;
  if (data[0] & 1) {
    body = b64_lines(data + 1, size - 1, &len);
  } else {
    len = size - 1;
    body = malloc(len ? len : 1);
    memcpy(body, data + 1, len);
  }
  char *pem = (char *)"junk";
  size_t n = 12345;
  int rv = zm_cacerts_decode(body, len, &pem, &n);
  FUZZ_CHECK(rv == 0 || rv == ZM_E_INVAL);
  if (rv == 0) {
    FUZZ_CHECK(pem != NULL && n >= 1);
    FUZZ_CHECK(count(pem, "-----BEGIN CERTIFICATE-----\n") == n);
    FUZZ_CHECK(count(pem, "-----END CERTIFICATE-----\n") == n);
    free(pem);
  } else {
    FUZZ_CHECK(pem == NULL && n == 0);
  }
  free(body);
  return 0;
}
