/*
 * hist_test.c - unit test of the zm-bench latency histogram (bench/hist.c):
 * bucket layout, precision bound, percentiles against known distributions,
 * clamping and merging. Registered as ctest bench/hist_test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "hist.h"

#include <stdlib.h>

static zmb_hist_t *new_hist(void) {
  zmb_hist_t *h = malloc(sizeof(*h));
  assert_non_null(h);
  zmb_hist_reset(h);
  return h;
}

/* Every bucket's range maps back to it, and buckets tile the value range
 * without gaps or overlaps. */
static void test_layout(void **state) {
  (void)state;
  for (size_t i = 0; i < ZMB_HIST_BUCKETS; i++) {
    uint64_t lo = zmb_hist_lowest(i), hi = zmb_hist_highest(i);
    assert_true(lo <= hi);
    if (lo <= ZMB_HIST_MAX_NS)
      assert_int_equal(zmb_hist_index(lo), i);
    if (hi <= ZMB_HIST_MAX_NS)
      assert_int_equal(zmb_hist_index(hi), i);
    if (i + 1 < ZMB_HIST_BUCKETS)
      assert_int_equal(hi + 1, zmb_hist_lowest(i + 1));
  }
  /* Values below 256 ns are exact. */
  for (uint64_t v = 0; v < ZMB_HIST_SUB; v++) {
    assert_int_equal(zmb_hist_index(v), v);
    assert_int_equal(zmb_hist_highest(zmb_hist_index(v)), v);
  }
  /* The largest value fits; larger values clamp into the same bucket. */
  assert_true(zmb_hist_index(ZMB_HIST_MAX_NS) < ZMB_HIST_BUCKETS);
  assert_int_equal(zmb_hist_index(UINT64_MAX), zmb_hist_index(ZMB_HIST_MAX_NS));
}

/* Relative error of the reported (highest equivalent) value <= 1/128. */
static void test_precision(void **state) {
  (void)state;
  double worst = 0;
  for (double x = 1; x <= (double)ZMB_HIST_MAX_NS; x *= 1.0007) {
    uint64_t v = (uint64_t)x;
    uint64_t r = zmb_hist_highest(zmb_hist_index(v));
    assert_true(r >= v);
    double err = (double)(r - v) / (double)v;
    if (err > worst)
      worst = err;
  }
  assert_true(worst <= 1.0 / 128);
  assert_true(worst > 1.0 / 512); /* the buckets are not finer than claimed */
}

/* 1..10000 us uniform: percentiles within 1 % of the exact ones; min, max
 * and mean exact. */
static void test_uniform(void **state) {
  (void)state;
  zmb_hist_t *h = new_hist();
  for (uint64_t i = 1; i <= 10000; i++)
    zmb_hist_record(h, i * 1000);
  assert_int_equal(h->total, 10000);
  assert_int_equal(zmb_hist_percentile(h, 0), 1000);
  assert_int_equal(zmb_hist_percentile(h, 100), 10000000);
  assert_int_equal(h->min, 1000);
  assert_int_equal(h->max, 10000000);
  assert_true(zmb_hist_mean(h) > 5000499.0 && zmb_hist_mean(h) < 5000501.0);
  const double ps[] = {50, 90, 99, 99.9};
  const double exact[] = {5000e3, 9000e3, 9900e3, 9990e3};
  for (size_t i = 0; i < 4; i++) {
    double got = (double)zmb_hist_percentile(h, ps[i]);
    assert_true(got >= exact[i]);
    assert_true(got <= exact[i] * 1.01);
  }
  free(h);
}

/* A bimodal distribution: p99 sits in the fast mode, p99.5 in the slow. */
static void test_bimodal(void **state) {
  (void)state;
  zmb_hist_t *h = new_hist();
  for (int i = 0; i < 990; i++)
    zmb_hist_record(h, 1000000); /* 1 ms */
  for (int i = 0; i < 10; i++)
    zmb_hist_record(h, 1000000000); /* 1 s */
  uint64_t p99 = zmb_hist_percentile(h, 99);
  uint64_t p995 = zmb_hist_percentile(h, 99.5);
  assert_true(p99 >= 1000000 && p99 <= 1010000);
  assert_true(p995 >= 1000000000 && p995 <= 1008000000);
  assert_int_equal(zmb_hist_percentile(h, 100), 1000000000);
  free(h);
}

static void test_empty_clamp_merge(void **state) {
  (void)state;
  zmb_hist_t *a = new_hist(), *b = new_hist(), *all = new_hist();
  assert_int_equal(zmb_hist_percentile(a, 50), 0);
  assert_true(zmb_hist_mean(a) == 0.0);

  zmb_hist_record(a, 100ull * 1000 * 1000 * 1000); /* 100 s: clamped */
  assert_int_equal(a->clamped, 1);
  assert_int_equal(a->max, ZMB_HIST_MAX_NS);
  assert_int_equal(zmb_hist_percentile(a, 50), ZMB_HIST_MAX_NS);
  zmb_hist_reset(a);
  assert_int_equal(a->total, 0);
  assert_int_equal(a->clamped, 0);

  for (uint64_t i = 1; i <= 2000; i++) {
    zmb_hist_record(i % 2 ? a : b, i * 777);
    zmb_hist_record(all, i * 777);
  }
  zmb_hist_merge(a, b);
  assert_int_equal(a->total, all->total);
  assert_int_equal(a->min, all->min);
  assert_int_equal(a->max, all->max);
  for (double p = 1; p < 100; p += 0.5)
    assert_int_equal(zmb_hist_percentile(a, p), zmb_hist_percentile(all, p));
  assert_memory_equal(a->counts, all->counts, sizeof(a->counts));
  free(a);
  free(b);
  free(all);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_layout),
      cmocka_unit_test(test_precision),
      cmocka_unit_test(test_uniform),
      cmocka_unit_test(test_bimodal),
      cmocka_unit_test(test_empty_clamp_merge),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
