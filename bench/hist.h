/*
 * hist.h - a log-linear latency histogram in the spirit of HdrHistogram, for
 * the benchmark client (bench/zm-bench). Values are nanoseconds. Values below
 * ZMB_HIST_SUB (256 ns) are kept exactly; above, each power-of-two range is
 * split into 128 equal buckets, so any recorded value is reported within
 * 1/128 (< 0.8 %) of itself. Values above ZMB_HIST_MAX_NS (60 s) are clamped
 * to it and counted in `clamped`. Exact min, max and sum are kept beside
 * the buckets. A histogram is a plain struct (about 30 KiB): no allocation,
 * no I/O, not thread-safe.
 */
#ifndef ZMB_HIST_H
#define ZMB_HIST_H

#include <stddef.h>
#include <stdint.h>

/* Linear range / buckets per power of two (2 * half). 256 gives 0.78 %. */
#define ZMB_HIST_SUB 256u
#define ZMB_HIST_HALF (ZMB_HIST_SUB / 2)
/* Largest value we resolve: 60 s in ns (the longest sensible RPC latency). */
#define ZMB_HIST_MAX_NS (60ull * 1000 * 1000 * 1000)
/* 60e9 < 2^36, so the top bucket group has shift 36 - 8 = 28: the index of
 * the largest value is below 256 + 28 * 128. */
#define ZMB_HIST_BUCKETS (ZMB_HIST_SUB + 28u * ZMB_HIST_HALF)

typedef struct {
  uint64_t counts[ZMB_HIST_BUCKETS];
  uint64_t total;   /* number of recorded values */
  uint64_t clamped; /* values above ZMB_HIST_MAX_NS (recorded as the max) */
  uint64_t min;     /* exact, ns; UINT64_MAX when empty */
  uint64_t max;     /* exact, ns (after clamping); 0 when empty */
  double sum;       /* exact sum, ns (double: no overflow over long runs) */
} zmb_hist_t;

/* Empties h. */
void zmb_hist_reset(zmb_hist_t *h);

/* Records one value (ns). */
void zmb_hist_record(zmb_hist_t *h, uint64_t v_ns);

/* Adds every count of src into dst. */
void zmb_hist_merge(zmb_hist_t *dst, const zmb_hist_t *src);

/*
 * Returns the value at percentile p (0..100): the highest value equivalent
 * (same bucket) to the smallest recorded value v such that at least p % of
 * the values are <= v; never above the exact max. 0 when empty. p <= 0 gives
 * the exact min, p >= 100 the exact max.
 */
uint64_t zmb_hist_percentile(const zmb_hist_t *h, double p);

/* Mean in ns (exact, from the sum); 0 when empty. */
double zmb_hist_mean(const zmb_hist_t *h);

/* Bucket index of a value, and the lowest / highest value of a bucket.
 * Exposed for the unit test. */
size_t zmb_hist_index(uint64_t v_ns);
uint64_t zmb_hist_lowest(size_t idx);
uint64_t zmb_hist_highest(size_t idx);

#endif /* ZMB_HIST_H */
