/*
 * idjson_test.c - zm_idjson_build: the exact document, read back with
 * jansson, and the escaping of every character class.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "zm/crypto.h"
#include "zm/zm.h"

static const char KEY[] = "-----BEGIN EC PRIVATE KEY-----\n"
                          "MHcCAQEEIPja+qKU5NgCejdbLN54D2naROFiXplalvs1wCgb\n"
                          "-----END EC PRIVATE KEY-----\n";
static const char CERT[] = "-----BEGIN CERTIFICATE-----\nMIIB\n"
                           "-----END CERTIFICATE-----\n"
                           "-----BEGIN CERTIFICATE-----\nMIIC\n"
                           "-----END CERTIFICATE-----\n";
static const char CA[] = "-----BEGIN CERTIFICATE-----\nMIID/+==\n"
                         "-----END CERTIFICATE-----\n";
static const char API[] = "https://ctrl.example.com:1280/edge/client/v1";

static void test_exact(void **state) {
  (void)state;
  zm_secret_t out = {0};
  assert_int_equal(zm_idjson_build("https://h:1/e", "K\n", "C\n", "A\n", &out),
                   0);
  assert_string_equal(out.base,
                      "{\"ztAPI\":\"https://h:1/e\",\"ztAPIs\":null,"
                      "\"configTypes\":null,\"id\":{\"key\":\"pem:K\\n\","
                      "\"cert\":\"pem:C\\n\",\"ca\":\"pem:A\\n\"},"
                      "\"enableHa\":false}");
  assert_int_equal(out.len, strlen(out.base));
  zm_secret_dispose(&out);
}

static void test_roundtrip(void **state) {
  (void)state;
  zm_secret_t out = {0};
  assert_int_equal(zm_idjson_build(API, KEY, CERT, CA, &out), 0);
  json_error_t err;
  json_t *j = json_loadb(out.base, out.len, JSON_REJECT_DUPLICATES, &err);
  assert_non_null(j);
  assert_int_equal(json_object_size(j), 5);
  assert_string_equal(json_string_value(json_object_get(j, "ztAPI")), API);
  assert_true(json_is_null(json_object_get(j, "ztAPIs")));
  assert_true(json_is_null(json_object_get(j, "configTypes")));
  assert_true(json_is_false(json_object_get(j, "enableHa")));
  json_t *id = json_object_get(j, "id");
  assert_int_equal(json_object_size(id), 3);
  const char *k = json_string_value(json_object_get(id, "key"));
  const char *c = json_string_value(json_object_get(id, "cert"));
  const char *a = json_string_value(json_object_get(id, "ca"));
  assert_non_null(k);
  assert_non_null(c);
  assert_non_null(a);
  assert_int_equal(strncmp(k, "pem:", 4), 0);
  assert_int_equal(strncmp(c, "pem:", 4), 0);
  assert_int_equal(strncmp(a, "pem:", 4), 0);
  assert_string_equal(k + 4, KEY);
  assert_string_equal(c + 4, CERT);
  assert_string_equal(a + 4, CA);
  /* Field order as the SDKs write it. */
  const char *p1 = strstr(out.base, "\"ztAPI\""),
             *p2 = strstr(out.base, "\"ztAPIs\""),
             *p3 = strstr(out.base, "\"configTypes\""),
             *p4 = strstr(out.base, "\"id\""),
             *p5 = strstr(out.base, "\"key\""),
             *p6 = strstr(out.base, "\"cert\""),
             *p7 = strstr(out.base, "\"ca\""),
             *p8 = strstr(out.base, "\"enableHa\"");
  assert_true(p1 < p2 && p2 < p3 && p3 < p4 && p4 < p5 && p5 < p6 && p6 < p7 &&
              p7 < p8);
  /* No raw newline: everything escaped on one line. */
  assert_null(strchr(out.base, '\n'));
  json_decref(j);
  zm_secret_dispose(&out);
}

/* Every byte 0x01..0xff (UTF-8 aside) survives the round trip. */
static void test_escaping(void **state) {
  (void)state;
  char nasty[160];
  size_t n = 0;
  for (int c = 1; c < 0x80; c++)
    nasty[n++] = (char)c;
  memcpy(nasty + n, "\xc3\xa9\xe2\x82\xac", 5); /* é € */
  n += 5;
  nasty[n] = '\0';
  zm_secret_t out = {0};
  assert_int_equal(
      zm_idjson_build("a\"b\\c", nasty, "q\"\\\r\t\b\f", "\x1f", &out), 0);
  assert_non_null(strstr(out.base, "\"ztAPI\":\"a\\\"b\\\\c\""));
  assert_non_null(strstr(out.base, "\"cert\":\"pem:q\\\"\\\\\\r\\t\\b\\f\""));
  assert_non_null(strstr(out.base, "\"ca\":\"pem:\\u001f\""));
  for (size_t i = 0; i < out.len; i++)
    assert_true((unsigned char)out.base[i] >= 0x20);
  json_error_t err;
  json_t *j = json_loadb(out.base, out.len, 0, &err);
  if (j == NULL)
    fail_msg("jansson: %s at %d", err.text, err.position);
  json_t *id = json_object_get(j, "id");
  assert_string_equal(json_string_value(json_object_get(j, "ztAPI")),
                      "a\"b\\c");
  assert_string_equal(json_string_value(json_object_get(id, "key")) + 4, nasty);
  assert_string_equal(json_string_value(json_object_get(id, "cert")) + 4,
                      "q\"\\\r\t\b\f");
  assert_string_equal(json_string_value(json_object_get(id, "ca")) + 4, "\x1f");
  json_decref(j);
  zm_secret_dispose(&out);
}

static void test_empty_and_null(void **state) {
  (void)state;
  zm_secret_t out = {0};
  assert_int_equal(zm_idjson_build("", "", "", "", &out), 0);
  assert_non_null(strstr(out.base, "\"key\":\"pem:\""));
  zm_secret_dispose(&out);
  assert_int_equal(zm_idjson_build(NULL, KEY, CERT, CA, &out), ZM_E_INVAL);
  assert_null(out.base);
  assert_int_equal(zm_idjson_build(API, NULL, CERT, CA, &out), ZM_E_INVAL);
  assert_int_equal(zm_idjson_build(API, KEY, NULL, CA, &out), ZM_E_INVAL);
  assert_int_equal(zm_idjson_build(API, KEY, CERT, NULL, &out), ZM_E_INVAL);
  assert_int_equal(zm_idjson_build(API, KEY, CERT, CA, NULL), ZM_E_INVAL);
  assert_null(out.base);
  assert_int_equal(out.len, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_exact),
      cmocka_unit_test(test_roundtrip),
      cmocka_unit_test(test_escaping),
      cmocka_unit_test(test_empty_and_null),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
