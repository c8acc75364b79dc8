/* Prometheus text writer: families, label escaping, histograms (cumulative
 * buckets, +Inf, sum, count), the output bound. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/addr.h"
#include "zm/metrics.h"

static void test_family_and_samples(void **state) {
  (void)state;
  zm_prom_t p;
  zm_prom_init(&p, 1 << 20);
  zm_prom_family(&p, "x_total", "counter", "a\\b\nc");
  const char *l[] = {"k", "v\"q\\\n", "m", "plain"};
  zm_prom_sample_u64(&p, "x_total", l, 2, 42);
  zm_prom_sample(&p, "y", NULL, 0, 0.25);
  zm_prom_sample(&p, "z", NULL, 0, 3);
  assert_string_equal(p.buf, "# HELP x_total a\\\\b\\nc\n"
                             "# TYPE x_total counter\n"
                             "x_total{k=\"v\\\"q\\\\\\n\",m=\"plain\"} 42\n"
                             "y 0.25\n"
                             "z 3\n");
  zm_prom_dispose(&p);
}

static void test_histogram(void **state) {
  (void)state;
  zm_prom_t p;
  zm_prom_init(&p, 1 << 20);
  const double b[] = {0.001, 0.5, 2};
  const uint64_t c[] = {1, 0, 2, 3};
  const char *l[] = {"m", "a"};
  zm_prom_histogram(&p, "h", l, 1, b, 3, c, 7.5);
  assert_string_equal(p.buf, "h_bucket{m=\"a\",le=\"0.001\"} 1\n"
                             "h_bucket{m=\"a\",le=\"0.5\"} 1\n"
                             "h_bucket{m=\"a\",le=\"2\"} 3\n"
                             "h_bucket{m=\"a\",le=\"+Inf\"} 6\n"
                             "h_sum{m=\"a\"} 7.5\n"
                             "h_count{m=\"a\"} 6\n");
  zm_prom_dispose(&p);
}

static void test_bound(void **state) {
  (void)state;
  zm_prom_t p;
  zm_prom_init(&p, 64);
  for (int i = 0; i < 100; i++)
    zm_prom_sample_u64(&p, "some_metric_name", NULL, 0, (uint64_t)i);
  assert_true(p.truncated);
  assert_true(p.len <= 64);
  zm_prom_dispose(&p);
}

static void test_parse_address(void **state) {
  (void)state;
  struct sockaddr_storage ss;
  assert_int_equal(zm_addr_parse("127.0.0.1:9090", &ss), 0);
  assert_int_equal(zm_addr_parse(":9090", &ss), 0);
  assert_int_equal(zm_addr_parse("[::1]:9090", &ss), 0);
  assert_int_equal(zm_addr_parse("localhost:1", &ss), 0);
  assert_int_not_equal(zm_addr_parse("9090", &ss), 0);
  assert_int_not_equal(zm_addr_parse("x:99999", &ss), 0);
  assert_int_not_equal(zm_addr_parse("host.example:80", &ss), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_family_and_samples),
      cmocka_unit_test(test_histogram),
      cmocka_unit_test(test_bound),
      cmocka_unit_test(test_parse_address),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
