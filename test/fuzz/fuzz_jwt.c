/*
 * fuzz_jwt.c - zm_jwt_verify, the enrollment JWT verifier, against fixed
 * test certificates (jwt_fixture.h, made by gen_fixtures.py).
 *
 * Input: byte 0 bit 0 picks the certificate (0: EC P-256, 1: RSA-2048),
 * bits 1-2 the expected subject (NULL, the right one, a wrong one), bit 3
 * the clock (before or at the tokens' exp); the rest is the token.
 * Properties: a token verifies only if it is byte-identical to the token
 * the certificate's key signed (or, for ECDSA, its (r, n-s) twin, which is
 * an equally valid signature of the same bytes: JWS and Go accept it), and
 * only when the subject matches and the clock is before exp; its claims are
 * then the ones signed. Errors are only the documented ones and leave the
 * claims empty. The signed tokens do verify (checked once, so the driver
 * cannot silently test nothing).
 */
#include "fuzz_common.h"

#include "jwt_fixture.h"
#include "zm/crypto.h"
#include "zm/zm.h"

#include <string.h>

#define NOW_BEFORE 1700000000LL

static void check_fixture(void) {
  static int done;
  zm_jwt_claims_t c;
  if (done)
    return;
  done = 1;
  FUZZ_CHECK(zm_jwt_verify(FIX_ES256_TOKEN, strlen(FIX_ES256_TOKEN),
                           FIX_EC_CERT, sizeof(FIX_EC_CERT), FIX_SUB,
                           NOW_BEFORE, &c) == 0);
  zm_jwt_claims_dispose(&c);
  FUZZ_CHECK(zm_jwt_verify(FIX_RS256_TOKEN, strlen(FIX_RS256_TOKEN),
                           FIX_RSA_CERT, sizeof(FIX_RSA_CERT), FIX_SUB,
                           NOW_BEFORE, &c) == 0);
  zm_jwt_claims_dispose(&c);
}

static int same(const char *tok, size_t len, const char *known) {
  return len == strlen(known) && memcmp(tok, known, len) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  check_fixture();
  if (size < 1)
    return 0;
  int rsa = data[0] & 1;
  int sub_mode = (data[0] >> 1) & 3;
  int64_t now = (data[0] & 8) ? FIX_EXP : NOW_BEFORE;
  const char *expect_sub = sub_mode == 1   ? FIX_SUB
                           : sub_mode == 2 ? "someone-else"
                                           : NULL;
  size_t len = size - 1;
  char *tok = malloc(len ? len : 1); /* exact size: ASan sees over-reads */
  memcpy(tok, data + 1, len);

  zm_jwt_claims_t c;
  memset(&c, 0x5A, sizeof(c)); /* garbage in: the verifier must reset it */
  int rv = rsa ? zm_jwt_verify(tok, len, FIX_RSA_CERT, sizeof(FIX_RSA_CERT),
                               expect_sub, now, &c)
               : zm_jwt_verify(tok, len, FIX_EC_CERT, sizeof(FIX_EC_CERT),
                               expect_sub, now, &c);
  FUZZ_CHECK(rv == 0 || rv == ZM_E_INVAL || rv == ZM_E_BAD_SIGNATURE ||
             rv == ZM_E_EXPIRED || rv == ZM_E_CRYPTO);
  if (rv == 0) {
    FUZZ_CHECK(rsa ? same(tok, len, FIX_RS256_TOKEN)
                   : same(tok, len, FIX_ES256_TOKEN) ||
                         same(tok, len, FIX_ES256_TWIN));
    FUZZ_CHECK(sub_mode != 2 && now < FIX_EXP);
    FUZZ_CHECK(strcmp(c.sub, FIX_SUB) == 0 && strcmp(c.em, "ott") == 0);
    FUZZ_CHECK(c.exp == FIX_EXP && c.iss != NULL);
    FUZZ_CHECK(c.jti.len == strlen(FIX_JTI) &&
               memcmp(c.jti.base, FIX_JTI, c.jti.len) == 0);
  } else {
    FUZZ_CHECK(c.iss == NULL && c.sub == NULL && c.em == NULL &&
               c.jti.base == NULL && c.jti.len == 0 && c.exp == 0);
  }
  zm_jwt_claims_dispose(&c);
  free(tok);
  return 0;
}
