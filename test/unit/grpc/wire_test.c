/* zm-unit-libs: zm_grpc zm_util */
/* Unit tests of the pure gRPC wire helpers: deframing (split at every
 * offset), grpc-timeout parsing, grpc-message percent-encoding, routing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/grpc.h"

static void test_deframe_whole_and_split(void **state) {
  (void)state;
  uint8_t buf[5 + 300];
  buf[0] = 0;
  buf[1] = 0;
  buf[2] = 0;
  buf[3] = 1;
  buf[4] = 44; /* 300 */
  for (int i = 0; i < 300; i++)
    buf[5 + i] = (uint8_t)i;
  uint8_t flags = 9;
  const uint8_t *msg = NULL;
  size_t mlen = 0;
  /* every prefix shorter than the frame is INCOMPLETE */
  for (size_t cut = 0; cut < sizeof buf; cut++)
    assert_int_equal(zm_grpc_deframe(buf, cut, 4096, &flags, &msg, &mlen),
                     ZM_E_INCOMPLETE);
  assert_int_equal(zm_grpc_deframe(buf, sizeof buf, 4096, &flags, &msg, &mlen),
                   305);
  assert_int_equal(flags, 0);
  assert_int_equal(mlen, 300);
  assert_ptr_equal(msg, buf + 5);
  assert_int_equal(msg[299], (uint8_t)299);
}

static void test_deframe_limits_and_flags(void **state) {
  (void)state;
  uint8_t big[5] = {0, 0, 0x40, 0, 1}; /* 4 MiB + 1 */
  uint8_t flags;
  const uint8_t *msg;
  size_t mlen;
  assert_int_equal(zm_grpc_deframe(big, 5, 4u << 20, &flags, &msg, &mlen),
                   ZM_E_MSG_TOO_LARGE);
  uint8_t huge[5] = {0, 0xff, 0xff, 0xff, 0xff};
  assert_int_equal(zm_grpc_deframe(huge, 5, 4u << 20, &flags, &msg, &mlen),
                   ZM_E_MSG_TOO_LARGE);
  uint8_t empty_compressed[5] = {1, 0, 0, 0, 0};
  assert_int_equal(
      zm_grpc_deframe(empty_compressed, 5, 10, &flags, &msg, &mlen), 5);
  assert_int_equal(flags, 1);
  assert_int_equal(mlen, 0);
}

static void test_timeout(void **state) {
  (void)state;
  struct {
    const char *v;
    int rv;
    uint64_t ms;
  } cases[] = {
      {"1H", 0, 3600000},
      {"2M", 0, 120000},
      {"3S", 0, 3000},
      {"250m", 0, 250},
      {"1500u", 0, 2},
      {"1n", 0, 1},
      {"0m", 0, 0},
      {"99999999S", 0, 99999999000ull},
      {"100000000S", ZM_E_INVAL, 0}, /* 9 digits */
      {"", ZM_E_INVAL, 0},
      {"S", ZM_E_INVAL, 0},
      {"10", ZM_E_INVAL, 0},
      {"10x", ZM_E_INVAL, 0},
      {"-1S", ZM_E_INVAL, 0},
      {"1 S", ZM_E_INVAL, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint64_t ms = 12345;
    int rv = zm_grpc_timeout_parse(cases[i].v, strlen(cases[i].v), &ms);
    assert_int_equal(rv, cases[i].rv);
    if (rv == 0)
      assert_int_equal(ms, cases[i].ms);
  }
}

static void test_pct_encode(void **state) {
  (void)state;
  char out[64];
  const char in[] = "a b%c\n\xc3\xa9~";
  size_t n = zm_grpc_pct_encode(in, strlen(in), out, sizeof out);
  assert_string_equal(out, "a b%25c%0A%C3%A9~");
  assert_int_equal(n, strlen(out));
  /* truncation never splits an escape and always terminates */
  for (size_t cap = 1; cap < 20; cap++) {
    char small[20];
    memset(small, 'Z', sizeof small);
    size_t m = zm_grpc_pct_encode(in, strlen(in), small, cap);
    assert_true(m < cap);
    assert_int_equal(small[m], '\0');
    assert_memory_equal(small, "a b%25c%0A%C3%A9~", m);
    if (m > 0 && m >= 1)
      assert_true(small[m - 1] != '%');
  }
}

static void handler(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)c;
  (void)m;
  (void)ctx;
}

static void test_route(void **state) {
  (void)state;
  zm_grpc_method_t methods[] = {
      {"/a.B/C", NULL, handler, NULL, NULL, 0, NULL, NULL},
      {"/a.B/CD", NULL, handler, NULL, NULL, 0, NULL, NULL},
      {"/grpc.health.v1.Health/Check", NULL, handler, NULL, NULL, 0, NULL,
       NULL},
  };
  size_t lens[] = {6, 7, 28};
  const uint8_t *p = (const uint8_t *)"/a.B/CD";
  assert_ptr_equal(zm_grpc_route(methods, lens, 3, p, 7), &methods[1]);
  assert_ptr_equal(zm_grpc_route(methods, lens, 3, p, 6), &methods[0]);
  assert_null(zm_grpc_route(methods, lens, 3, p, 5));
  assert_null(zm_grpc_route(methods, lens, 3, (const uint8_t *)"/a.B/c", 6));
  assert_ptr_equal(
      zm_grpc_route(methods, lens, 3,
                    (const uint8_t *)"/grpc.health.v1.Health/Check", 28),
      &methods[2]);
  assert_null(zm_grpc_route(methods, lens, 0, p, 7));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_deframe_whole_and_split),
      cmocka_unit_test(test_deframe_limits_and_flags),
      cmocka_unit_test(test_timeout),
      cmocka_unit_test(test_pct_encode),
      cmocka_unit_test(test_route),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
