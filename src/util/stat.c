/* stat.c - store commit observations (see include/zm/stat.h). */
#include "zm/stat.h"

#include <stdatomic.h>
#include <string.h>

/* 100 us .. 2.5 s: a group commit is sub-ms without fsync, a few ms with. */
const double zm_stat_store_lat_bounds_s[ZM_STAT_LAT_BUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
const double zm_stat_store_batch_bounds[ZM_STAT_BATCH_BUCKETS] = {
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};

static _Atomic uint64_t lat[ZM_STAT_LAT_BUCKETS + 1];
static _Atomic uint64_t lat_sum_ns;
static _Atomic uint64_t batch[ZM_STAT_BATCH_BUCKETS + 1];
static _Atomic uint64_t units_sum;

void zm_stat_store_commit(size_t units, uint64_t ns) {
  if (units == 0)
    return;
  size_t b = 0;
  while (b < ZM_STAT_LAT_BUCKETS &&
         (double)ns > zm_stat_store_lat_bounds_s[b] * 1e9)
    b++;
  atomic_fetch_add_explicit(&lat[b], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&lat_sum_ns, ns, memory_order_relaxed);
  b = 0;
  while (b < ZM_STAT_BATCH_BUCKETS &&
         (double)units > zm_stat_store_batch_bounds[b])
    b++;
  atomic_fetch_add_explicit(&batch[b], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&units_sum, units, memory_order_relaxed);
}

/* Groups in flight at once: one per PostgreSQL connection (<= 64). */
#define INFLIGHT_MAX 128
static struct {
  const void *key;
  uint64_t t0;
} inflight[INFLIGHT_MAX];

void zm_stat_store_begin(const void *key) {
  for (size_t i = 0; i < INFLIGHT_MAX; i++) {
    if (inflight[i].key == NULL || inflight[i].key == key) {
      inflight[i].key = key;
      inflight[i].t0 = uv_hrtime();
      return;
    }
  }
}

void zm_stat_store_end(const void *key, size_t units) {
  for (size_t i = 0; i < INFLIGHT_MAX; i++) {
    if (inflight[i].key == key) {
      inflight[i].key = NULL;
      zm_stat_store_commit(units, uv_hrtime() - inflight[i].t0);
      return;
    }
  }
}

void zm_stat_store_read(zm_stat_store_t *out) {
  for (size_t i = 0; i <= ZM_STAT_LAT_BUCKETS; i++)
    out->lat[i] = atomic_load_explicit(&lat[i], memory_order_relaxed);
  for (size_t i = 0; i <= ZM_STAT_BATCH_BUCKETS; i++)
    out->batch[i] = atomic_load_explicit(&batch[i], memory_order_relaxed);
  out->lat_sum_ns = atomic_load_explicit(&lat_sum_ns, memory_order_relaxed);
  out->units_sum = atomic_load_explicit(&units_sum, memory_order_relaxed);
}
