/* zmctl's pure parts: the exit code of every gRPC status, argument checks,
 * address splitting. (The commands run against the server in
 * test/integ/test_ops.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#define ZMCTL_NO_MAIN
#include "../../../src/cli/zmctl.c"

static void test_exit_map(void **state) {
  (void)state;
  const int want[17] = {0, 7, 10, 5, 7, 4, 6, 8, 7, 5, 6, 5, 9, 10, 7, 10, 8};
  for (int st = 0; st <= 16; st++)
    assert_int_equal(exit_for_status(st), want[st]);
  assert_int_equal(exit_for_status(99), EXIT_SERVER);
}

static int parse(opts_t *o, const char *const *argv, int argc) {
  return parse_args(argc, (char **)argv, o);
}

static void test_args(void **state) {
  (void)state;
  opts_t o;
  const char *a1[] = {"zmctl", "--json", "resolve", "zid"};
  assert_int_equal(parse(&o, a1, 4), -1);
  assert_true(o.json);
  assert_string_equal(o.cmd, "resolve");
  assert_string_equal(o.arg, "zid");
  const char *a2[] = {"zmctl", "resolve"};
  assert_int_equal(parse(&o, a2, 2), EXIT_USAGE);
  const char *a3[] = {"zmctl", "request-service-identity", "gateway"};
  assert_int_equal(parse(&o, a3, 3), EXIT_USAGE); /* -o required */
  const char *a4[] = {"zmctl", "list", "--type", "runner", "--all"};
  assert_int_equal(parse(&o, a4, 5), -1);
  assert_int_equal(o.type, 2);
  assert_true(o.all);
  const char *a5[] = {"zmctl", "--cert", "c", "health"};
  assert_int_equal(parse(&o, a5, 4), EXIT_USAGE); /* --key missing */
  const char *a6[] = {"zmctl", "--cacert", "c", "health"};
  assert_int_equal(parse(&o, a6, 4), EXIT_USAGE); /* needs --tls */
  const char *a7[] = {"zmctl", "--timeout", "1.5s", "health"};
  assert_int_equal(parse(&o, a7, 4), -1);
  assert_int_equal(o.timeout_ms, 1500);
  const char *a8[] = {"zmctl", "frobnicate"};
  assert_int_equal(parse(&o, a8, 2), EXIT_USAGE);
}

static void test_split_addr(void **state) {
  (void)state;
  char h[64], p[8];
  assert_int_equal(split_addr("10.0.0.1:50051", h, sizeof h, p, sizeof p), 0);
  assert_string_equal(h, "10.0.0.1");
  assert_string_equal(p, "50051");
  assert_int_equal(split_addr(":7", h, sizeof h, p, sizeof p), 0);
  assert_string_equal(h, "127.0.0.1");
  assert_int_equal(split_addr("[::1]:9", h, sizeof h, p, sizeof p), 0);
  assert_string_equal(h, "::1");
  assert_int_equal(split_addr("::1:9", h, sizeof h, p, sizeof p), -1);
  assert_int_equal(split_addr("host", h, sizeof h, p, sizeof p), -1);
  assert_int_equal(split_addr("host:x", h, sizeof h, p, sizeof p), -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_exit_map),
      cmocka_unit_test(test_args),
      cmocka_unit_test(test_split_addr),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
