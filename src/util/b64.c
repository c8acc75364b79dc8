/* b64.c - base64url without padding. */
#include "zm/b64.h"

#include <stdint.h>

static const char ENC[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t zm_b64url_encode(const void *src, size_t n, char *dst, size_t cap) {
  const uint8_t *s = src;
  size_t o = 0;
  if (cap < ZM_B64URL_LEN(n) + 1)
    return 0;
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
    dst[o++] = ENC[(v >> 18) & 63];
    dst[o++] = ENC[(v >> 12) & 63];
    dst[o++] = ENC[(v >> 6) & 63];
    dst[o++] = ENC[v & 63];
  }
  if (n - i == 1) {
    uint32_t v = (uint32_t)s[i] << 16;
    dst[o++] = ENC[(v >> 18) & 63];
    dst[o++] = ENC[(v >> 12) & 63];
  } else if (n - i == 2) {
    uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8);
    dst[o++] = ENC[(v >> 18) & 63];
    dst[o++] = ENC[(v >> 12) & 63];
    dst[o++] = ENC[(v >> 6) & 63];
  }
  dst[o] = '\0';
  return o;
}

static int dec(char c) {
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (c == '-')
    return 62;
  if (c == '_')
    return 63;
  return -1;
}

long zm_b64url_decode(const char *src, size_t n, void *dst, size_t cap) {
  uint8_t *d = dst;
  while (n > 0 && src[n - 1] == '=')
    n--;
  if (n % 4 == 1)
    return -1;
  size_t out = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);
  if (out > cap)
    return -1;
  size_t o = 0;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; i++) {
    int v = dec(src[i]);
    if (v < 0)
      return -1;
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      d[o++] = (uint8_t)(acc >> bits);
    }
  }
  /* leftover bits must be zero (canonical encoding) */
  if (bits > 0 && (acc & ((1u << bits) - 1)) != 0)
    return -1;
  return (long)o;
}
