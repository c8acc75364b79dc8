/* util.c - small crypto helpers: SHA-1 fingerprints and random bytes. */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/hash.h>
#include <wolfssl/wolfcrypt/random.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "zm/crypto.h"
#include "zm/zm.h"

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
 * A fresh DRBG per call: callers are on the loop thread and on libuv worker
 * threads at once, and a private WC_RNG needs no lock. Seeding reads the OS
 * entropy source, which is cheap next to everything else we do per call.
 */
int zm_random_bytes(uint8_t *buf, size_t n) {
  WC_RNG rng;
  int rv = 0;

  if (n == 0)
    return 0;
  if (buf == NULL || wc_InitRng(&rng) != 0)
    return ZM_E_CRYPTO;
  while (n > 0) {
    /* The DRBG caps one request at RNG_MAX_BLOCK_LEN bytes. */
    word32 chunk = n > RNG_MAX_BLOCK_LEN ? RNG_MAX_BLOCK_LEN : (word32)n;
    if (wc_RNG_GenerateBlock(&rng, buf, chunk) != 0) {
      rv = ZM_E_CRYPTO;
      break;
    }
    buf += chunk;
    n -= chunk;
  }
  wc_FreeRng(&rng);
  return rv;
}
