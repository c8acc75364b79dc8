/*
 * hist.c - log-linear histogram (see hist.h). Layout: indexes 0..255 hold
 * the values 0..255 exactly. A larger value v with highest set bit b (b >= 8)
 * is shifted right by s = b - 7, leaving a "sub-bucket" in [128, 255]; its
 * index is 256 + (s - 1) * 128 + (sub - 128). Bucket width / lowest value is
 * then at most 1/128.
 */
#include "hist.h"

#include <string.h>

void zmb_hist_reset(zmb_hist_t *h) {
  memset(h->counts, 0, sizeof(h->counts));
  h->total = 0;
  h->clamped = 0;
  h->min = UINT64_MAX;
  h->max = 0;
  h->sum = 0;
}

size_t zmb_hist_index(uint64_t v) {
  if (v > ZMB_HIST_MAX_NS)
    v = ZMB_HIST_MAX_NS;
  if (v < ZMB_HIST_SUB)
    return (size_t)v;
  unsigned b = 63u - (unsigned)__builtin_clzll(v);
  unsigned s = b - 7u;
  uint64_t sub = v >> s;
  return ZMB_HIST_SUB + (size_t)(s - 1u) * ZMB_HIST_HALF +
         (size_t)(sub - ZMB_HIST_HALF);
}

uint64_t zmb_hist_lowest(size_t idx) {
  if (idx < ZMB_HIST_SUB)
    return idx;
  size_t rel = idx - ZMB_HIST_SUB;
  unsigned s = (unsigned)(rel / ZMB_HIST_HALF) + 1u;
  uint64_t sub = ZMB_HIST_HALF + rel % ZMB_HIST_HALF;
  return sub << s;
}

uint64_t zmb_hist_highest(size_t idx) {
  if (idx < ZMB_HIST_SUB)
    return idx;
  size_t rel = idx - ZMB_HIST_SUB;
  unsigned s = (unsigned)(rel / ZMB_HIST_HALF) + 1u;
  return zmb_hist_lowest(idx) + ((uint64_t)1 << s) - 1u;
}

void zmb_hist_record(zmb_hist_t *h, uint64_t v) {
  if (v > ZMB_HIST_MAX_NS) {
    v = ZMB_HIST_MAX_NS;
    h->clamped++;
  }
  h->counts[zmb_hist_index(v)]++;
  h->total++;
  if (v < h->min)
    h->min = v;
  if (v > h->max)
    h->max = v;
  h->sum += (double)v;
}

void zmb_hist_merge(zmb_hist_t *dst, const zmb_hist_t *src) {
  for (size_t i = 0; i < ZMB_HIST_BUCKETS; i++)
    dst->counts[i] += src->counts[i];
  dst->total += src->total;
  dst->clamped += src->clamped;
  if (src->min < dst->min)
    dst->min = src->min;
  if (src->max > dst->max)
    dst->max = src->max;
  dst->sum += src->sum;
}

uint64_t zmb_hist_percentile(const zmb_hist_t *h, double p) {
  if (h->total == 0)
    return 0;
  if (p <= 0)
    return h->min;
  if (p >= 100)
    return h->max;
  /* Rank of the wanted value, 1-based, rounded up: the smallest rank whose
   * share of the values reaches p. */
  double want = p / 100.0 * (double)h->total;
  uint64_t rank = (uint64_t)want;
  if ((double)rank < want)
    rank++;
  if (rank == 0)
    rank = 1;
  uint64_t seen = 0;
  for (size_t i = 0; i < ZMB_HIST_BUCKETS; i++) {
    seen += h->counts[i];
    if (seen >= rank) {
      uint64_t v = zmb_hist_highest(i);
      if (v > h->max)
        v = h->max;
      if (v < h->min)
        v = h->min;
      return v;
    }
  }
  return h->max;
}

double zmb_hist_mean(const zmb_hist_t *h) {
  return h->total ? h->sum / (double)h->total : 0.0;
}
