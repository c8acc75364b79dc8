/*
 * fuzz_b64url.c - zm_b64url_encode / zm_b64url_decode (src/util/b64.c), the
 * codec of page tokens and of JWT segments.
 *
 * Every input is used both ways. As bytes: the encoding has length
 * ZM_B64URL_LEN(n), uses only the URL-safe alphabet, is refused (0) one byte
 * short of the documented capacity, and decodes back to the input. As text:
 * when it decodes, re-encoding the result gives the text back without its
 * '=' padding (one encoding per byte string), and one byte less capacity
 * is refused. Buffers are exact-size heap blocks, so ASan sees overruns.
 */
#include "fuzz_common.h"

#include "zm/b64.h"

#include <string.h>

static int url_safe(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= '0' && c <= '9') || c == '-' || c == '_';
}

static void bytes_way(const uint8_t *data, size_t size) {
  size_t cap = ZM_B64URL_LEN(size) + 1;
  char *enc = malloc(cap);
  size_t n = zm_b64url_encode(data, size, enc, cap);
  FUZZ_CHECK(n == ZM_B64URL_LEN(size) && enc[n] == '\0');
  for (size_t i = 0; i < n; i++)
    FUZZ_CHECK(url_safe(enc[i]));
  char *small = malloc(cap - 1 ? cap - 1 : 1);
  FUZZ_CHECK(zm_b64url_encode(data, size, small, cap - 1) == 0);
  free(small);

  uint8_t *dec = malloc(size ? size : 1);
  long m = zm_b64url_decode(enc, n, dec, size);
  FUZZ_CHECK(m == (long)size && memcmp(dec, data, size) == 0);
  free(dec);
  free(enc);
}

static void text_way(const uint8_t *data, size_t size) {
  char *txt = malloc(size ? size : 1);
  memcpy(txt, data, size);
  size_t cap = size; /* always enough: 3 bytes per 4 characters */
  uint8_t *dec = malloc(cap ? cap : 1);
  long m = zm_b64url_decode(txt, size, dec, cap);
  if (m >= 0) {
    size_t body = size;
    while (body > 0 && txt[body - 1] == '=')
      body--;
    FUZZ_CHECK((size_t)m <= cap);
    char *enc = malloc(ZM_B64URL_LEN((size_t)m) + 1);
    size_t n =
        zm_b64url_encode(dec, (size_t)m, enc, ZM_B64URL_LEN((size_t)m) + 1);
    FUZZ_CHECK(n == body && memcmp(enc, txt, n) == 0);
    free(enc);
    if (m > 0) {
      uint8_t *tight = malloc((size_t)m - 1 ? (size_t)m - 1 : 1);
      FUZZ_CHECK(zm_b64url_decode(txt, size, tight, (size_t)m - 1) == -1);
      free(tight);
    }
  } else {
    FUZZ_CHECK(m == -1);
  }
  free(dec);
  free(txt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  bytes_way(data, size);
  text_way(data, size);
  return 0;
}
