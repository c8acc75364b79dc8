/* zm-unit-libs: zm_ziti zm_grpc zm_util */
/* Unit tests of the controller failure -> gRPC status mapping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../../src/rpc/status.c"

static zm_grpc_status_t map(int err, int http) {
  zm_ziti_result_t r = {.err = err, .http_status = http};
  return zm_rpc_status_from_ziti(&r, 1000, 10);
}

static void test_transient_is_unavailable(void **state) {
  (void)state;
  /* a controller restart closes the connection during the handshake */
  assert_int_equal(map(ZM_E_TLS, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(ZM_E_UNAVAILABLE, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(ZM_E_SHUTDOWN, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(UV_ECONNREFUSED, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(UV_ECONNRESET, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(UV_EOF, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(UV_EAI_AGAIN, 0), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(ZM_E_HTTP, 503), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(map(ZM_E_HTTP, 429), ZM_GRPC_UNAVAILABLE);
}

static void test_timeouts(void **state) {
  (void)state;
  zm_ziti_result_t r = {.err = ZM_E_TIMEOUT};
  assert_int_equal(zm_rpc_status_from_ziti(&r, 1000, 999), ZM_GRPC_UNAVAILABLE);
  assert_int_equal(zm_rpc_status_from_ziti(&r, 1000, 1000),
                   ZM_GRPC_DEADLINE_EXCEEDED);
}

static void test_final_is_internal(void **state) {
  (void)state;
  assert_int_equal(map(ZM_E_HTTP, 400), ZM_GRPC_INTERNAL);
  assert_int_equal(map(ZM_E_PROTO, 200), ZM_GRPC_INTERNAL);
  assert_int_equal(map(ZM_E_JSON, 200), ZM_GRPC_INTERNAL);
  assert_int_equal(map(ZM_E_MSG_TOO_LARGE, 200), ZM_GRPC_INTERNAL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_transient_is_unavailable),
      cmocka_unit_test(test_timeouts),
      cmocka_unit_test(test_final_is_internal),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
