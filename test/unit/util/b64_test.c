/* base64url: RFC 4648 vectors, round trips of every length, rejections. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/b64.h"

static void test_vectors(void **state) {
  (void)state;
  const char *in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
  const char *out[] = {"",       "Zg",      "Zm8",     "Zm9v",
                       "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"};
  for (int i = 0; i < 7; i++) {
    char enc[16];
    zm_b64url_encode(in[i], strlen(in[i]), enc, sizeof enc);
    assert_string_equal(enc, out[i]);
    char dec[16];
    long n = zm_b64url_decode(out[i], strlen(out[i]), dec, sizeof dec);
    assert_int_equal(n, (long)strlen(in[i]));
    assert_memory_equal(dec, in[i], (size_t)n);
  }
  char enc[8];
  zm_b64url_encode("\xfb\xff", 2, enc, sizeof enc);
  assert_string_equal(enc, "-_8"); /* url alphabet */
}

static void test_roundtrip_all_lengths(void **state) {
  (void)state;
  uint8_t src[200], dec[200];
  char enc[300];
  for (size_t i = 0; i < sizeof src; i++)
    src[i] = (uint8_t)(i * 37 + 11);
  for (size_t n = 0; n <= sizeof src; n++) {
    size_t m = zm_b64url_encode(src, n, enc, sizeof enc);
    assert_int_equal(m, ZM_B64URL_LEN(n));
    assert_int_equal(zm_b64url_decode(enc, m, dec, sizeof dec), (long)n);
    assert_memory_equal(dec, src, n);
  }
}

static void test_rejects(void **state) {
  (void)state;
  char dec[16];
  assert_int_equal(zm_b64url_decode("Zm9v+", 5, dec, sizeof dec), -1);
  assert_int_equal(zm_b64url_decode("Zm9v/", 5, dec, sizeof dec), -1);
  assert_int_equal(zm_b64url_decode("Z", 1, dec, sizeof dec), -1);
  assert_int_equal(zm_b64url_decode("Zh", 2, dec, sizeof dec),
                   -1); /* non-canonical */
  assert_int_equal(zm_b64url_decode("Zm9vYmFy", 8, dec, 5), -1); /* too small */
  assert_int_equal(zm_b64url_decode("Zm 9", 4, dec, sizeof dec), -1);
  assert_int_equal(zm_b64url_decode("Zg==", 4, dec, sizeof dec), 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_vectors),
      cmocka_unit_test(test_roundtrip_all_lengths),
      cmocka_unit_test(test_rejects),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
