/*
 * stat.h - process-wide observations that modules below the app report and
 * the metrics endpoint reads: store commit latency and group size. Leaf
 * module (libc + libuv's clock).
 *
 * zm_stat_store_commit() may be called from any thread (the SQLite writer
 * thread); begin/end pairs (a backend that sends a group and hears back on
 * the loop) are loop-thread only.
 */
#ifndef ZM_STAT_H
#define ZM_STAT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define ZM_STAT_LAT_BUCKETS 14
#define ZM_STAT_BATCH_BUCKETS 11
extern const double zm_stat_store_lat_bounds_s[ZM_STAT_LAT_BUCKETS];
extern const double zm_stat_store_batch_bounds[ZM_STAT_BATCH_BUCKETS];

typedef struct {
  uint64_t lat[ZM_STAT_LAT_BUCKETS + 1]; /* per bucket, not cumulative */
  uint64_t lat_sum_ns;
  uint64_t batch[ZM_STAT_BATCH_BUCKETS + 1];
  uint64_t units_sum;
} zm_stat_store_t;

/* One committed group of `units` write units that took ns (groups without
 * writes are not reported). */
void zm_stat_store_commit(size_t units, uint64_t ns);
/* A group identified by key was sent / its outcome arrived. */
void zm_stat_store_begin(const void *key);
void zm_stat_store_end(const void *key, size_t units);
void zm_stat_store_read(zm_stat_store_t *out);

/* Times one statement that commits `units` units: a one-line hook. */
#define ZM_STAT_STORE_TIMED(units, stmt)                                       \
  do {                                                                         \
    uint64_t zm_t0__ = uv_hrtime();                                            \
    stmt;                                                                      \
    zm_stat_store_commit((units), uv_hrtime() - zm_t0__);                      \
  } while (0)

#endif /* ZM_STAT_H */
