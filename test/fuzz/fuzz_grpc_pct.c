/*
 * fuzz_grpc_pct.c - zm_grpc_pct_encode, the grpc-message percent-encoder.
 *
 * Input: bytes 0-1 give the output capacity (0..511), the rest is the
 * message. The output buffer is a heap block of exactly cap bytes, so ASan
 * reports any write past it. Properties: the result is NUL-terminated at the
 * returned length (< cap), holds only 0x20-0x7E, every '%' starts a %XX
 * escape, decoding it gives a prefix of the input that ends on a character
 * boundary, and that prefix is as long as the capacity allows.
 */
#include "fuzz_common.h"

#include "zm/grpc.h"

#include <string.h>

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2)
    return 0;
  size_t cap = ((size_t)data[0] << 8 | data[1]) & 511;
  size_t len = size - 2;
  char *src = malloc(len ? len : 1);
  memcpy(src, data + 2, len);
  char *dst = cap ? malloc(cap) : NULL;

  size_t n = zm_grpc_pct_encode(src, len, dst, cap);
  if (cap == 0) {
    FUZZ_CHECK(n == 0);
    free(src);
    return 0;
  }
  FUZZ_CHECK(n < cap);
  FUZZ_CHECK(dst[n] == '\0' && strlen(dst) == n);

  size_t in = 0; /* input bytes the output stands for */
  for (size_t o = 0; o < n;) {
    unsigned char c = (unsigned char)dst[o];
    FUZZ_CHECK(c >= 0x20 && c <= 0x7E);
    FUZZ_CHECK(in < len);
    if (c == '%') {
      FUZZ_CHECK(o + 3 <= n); /* a whole escape, never a cut one */
      int hi = hexval(dst[o + 1]), lo = hexval(dst[o + 2]);
      FUZZ_CHECK(hi >= 0 && lo >= 0);
      unsigned char orig = (unsigned char)src[in];
      FUZZ_CHECK(orig == (unsigned char)(hi << 4 | lo));
      /* Only what must be escaped is escaped. */
      FUZZ_CHECK(orig < 0x20 || orig > 0x7E || orig == '%');
      o += 3;
    } else {
      FUZZ_CHECK((unsigned char)src[in] == c);
      o++;
    }
    in++;
  }
  /* Truncation only where the next character does not fit. */
  if (in < len) {
    unsigned char next = (unsigned char)src[in];
    size_t w = (next >= 0x20 && next <= 0x7E && next != '%') ? 1 : 3;
    FUZZ_CHECK(n + w >= cap);
  }
  free(dst);
  free(src);
  return 0;
}
