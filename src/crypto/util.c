/* util.c - small crypto helpers: SHA-1 fingerprints and random bytes. */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/hash.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "zm/crypto.h"
#include "zm/zm.h"

#include <errno.h>
#include <sys/random.h>
#include <sys/types.h>

int zm_sha1_hex(const uint8_t *der, size_t len, char out[41]) {
  static const char hex[] = "0123456789abcdef";
  uint8_t digest[WC_SHA_DIGEST_SIZE];

  out[0] = '\0';
  if (der == NULL || len > UINT32_MAX)
    return ZM_E_CRYPTO;
  if (wc_ShaHash(der, (word32)len, digest) != 0)
    return ZM_E_CRYPTO;
  for (size_t i = 0; i < sizeof(digest); i++) {
    out[2 * i] = hex[digest[i] >> 4];
    out[2 * i + 1] = hex[digest[i] & 0xf];
  }
  out[40] = '\0';
  return 0;
}

/*
 * The kernel's CSPRNG through getrandom(2): no file to open, no DRBG to seed
 * and health-test per call (that cost the loop thread an open/read/close of
 * /dev/urandom per enrollment), and safe from any thread without a lock.
 */
int zm_random_bytes(uint8_t *buf, size_t n) {
  if (n == 0)
    return 0;
  if (buf == NULL)
    return ZM_E_CRYPTO;
  while (n > 0) {
    ssize_t k = getrandom(buf, n, 0);
    if (k < 0) {
      if (errno == EINTR)
        continue;
      return ZM_E_CRYPTO;
    }
    buf += k;
    n -= (size_t)k;
  }
  return 0;
}
