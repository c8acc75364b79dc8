/* Log line formats: text, JSON with its stable fields and escaping, the
 * request context, truncation that keeps a JSON line valid. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <string.h>

#include "zm/log.h"

static void test_text(void **state) {
  (void)state;
  char out[256];
  size_t n = zm_log_format(out, sizeof out, 0, 1700000000123, ZM_LOG_WARN, NULL,
                           0, "store: slow");
  out[n] = '\0';
  assert_string_equal(out, "2023-11-14T22:13:20.123Z WARN store: slow\n");
}

static void test_json(void **state) {
  (void)state;
  char out[512];
  const char *kv[] = {"file", "/x\"y"};
  zm_log_ctx_t ctx = {7, "/svc/M", "zid1"};
  const zm_log_ctx_t *old = zm_log_ctx_swap(&ctx);
  size_t n = zm_log_format(out, sizeof out, 1, 1700000000123, ZM_LOG_INFO, kv,
                           1, "enroll svc-gateway-ab12: CREATE -> FETCH\n\x01");
  zm_log_ctx_swap(old);
  assert_true(n > 0 && out[n - 1] == '\n');
  json_error_t e;
  json_t *j = json_loadb(out, n, 0, &e);
  assert_non_null(j);
  assert_string_equal(json_string_value(json_object_get(j, "time")),
                      "2023-11-14T22:13:20.123Z");
  assert_string_equal(json_string_value(json_object_get(j, "level")), "info");
  assert_string_equal(json_string_value(json_object_get(j, "msg")),
                      "enroll svc-gateway-ab12: CREATE -> FETCH\n\x01");
  assert_string_equal(json_string_value(json_object_get(j, "component")),
                      "enroll");
  assert_string_equal(json_string_value(json_object_get(j, "saga")),
                      "svc-gateway-ab12");
  assert_string_equal(json_string_value(json_object_get(j, "request_id")), "7");
  assert_string_equal(json_string_value(json_object_get(j, "method")),
                      "/svc/M");
  assert_string_equal(json_string_value(json_object_get(j, "identity")),
                      "zid1");
  assert_string_equal(json_string_value(json_object_get(j, "file")), "/x\"y");
  json_decref(j);
}

static void test_json_truncated_stays_valid(void **state) {
  (void)state;
  char msg[4000];
  memset(msg, 'q', sizeof msg - 1);
  msg[sizeof msg - 1] = '\0';
  char out[300];
  size_t n = zm_log_format(out, sizeof out, 1, 0, ZM_LOG_ERROR, NULL, 0, msg);
  assert_true(n <= sizeof out);
  /* cut inside the message: the line still ends with "}\n" */
  assert_true(out[n - 2] == '}' && out[n - 1] == '\n');
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_text),
      cmocka_unit_test(test_json),
      cmocka_unit_test(test_json_truncated_stays_valid),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
