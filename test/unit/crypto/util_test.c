/*
 * util_test.c - zm_sha1_hex against known vectors and zm_random_bytes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "zm/crypto.h"
#include "zm/zm.h"

static void test_sha1(void **state) {
  (void)state;
  char out[41];
  /* FIPS 180 test vectors. */
  assert_int_equal(zm_sha1_hex((const uint8_t *)"abc", 3, out), 0);
  assert_string_equal(out, "a9993e364706816aba3e25717850c26c9cd0d89d");
  assert_int_equal(zm_sha1_hex((const uint8_t *)"", 0, out), 0);
  assert_string_equal(out, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  const char *v = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  assert_int_equal(zm_sha1_hex((const uint8_t *)v, strlen(v), out), 0);
  assert_string_equal(out, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  assert_int_equal(zm_sha1_hex(NULL, 3, out), ZM_E_CRYPTO);
}

static void test_random(void **state) {
  (void)state;
  uint8_t a[32] = {0}, b[32] = {0}, zero[32] = {0};
  assert_int_equal(zm_random_bytes(a, sizeof(a)), 0);
  assert_int_equal(zm_random_bytes(b, sizeof(b)), 0);
  assert_memory_not_equal(a, zero, sizeof(a));
  assert_memory_not_equal(a, b, sizeof(a));
  assert_int_equal(zm_random_bytes(NULL, 0), 0);
  assert_int_equal(zm_random_bytes(NULL, 1), ZM_E_CRYPTO);

  /* More than one DRBG request (64 KiB each): the tail is filled too. */
  size_t n = 200000;
  uint8_t *big = calloc(1, n);
  assert_int_equal(zm_random_bytes(big, n), 0);
  size_t zeros = 0;
  for (size_t i = n - 1024; i < n; i++)
    zeros += big[i] == 0;
  assert_true(zeros < 32); /* ~4 expected from uniform bytes */
  free(big);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sha1),
      cmocka_unit_test(test_random),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
