/*
 * limiter.h - per-caller admission for costly RPCs: a token bucket (rate,
 * burst) and an in-flight cap per caller key (the client identity under
 * mTLS, the peer IP otherwise). Bounded: at most ZM_LIMITER_MAX_CALLERS
 * keys; idle keys (nothing in flight, bucket full) are evicted by
 * zm_limiter_sweep(). Pure: time is an argument.
 */
#ifndef ZM_GRPC_LIMITER_H
#define ZM_GRPC_LIMITER_H

#include <stddef.h>
#include <stdint.h>

#define ZM_LIMITER_MAX_CALLERS 65536u

typedef struct zm_limiter zm_limiter_t;
typedef struct zm_lim_entry zm_lim_entry_t;

typedef enum {
  ZM_LIM_OK = 0,
  ZM_LIM_RATE,     /* bucket empty */
  ZM_LIM_INFLIGHT, /* too many in flight for this caller */
  ZM_LIM_TABLE,    /* too many distinct callers, or out of memory */
} zm_lim_result_t;

/* rate: tokens per second (0 = no rate limit); burst: bucket depth;
 * inflight: cap (0 = none). NULL when out of memory. */
zm_limiter_t *zm_limiter_new(double rate, unsigned burst, unsigned inflight);
void zm_limiter_free(zm_limiter_t *l);
/* Admits one call of key at now_ms; on ZM_LIM_OK *entry must later be
 * passed to zm_limiter_release(). */
zm_lim_result_t zm_limiter_acquire(zm_limiter_t *l, const char *key,
                                   uint64_t now_ms, zm_lim_entry_t **entry);
void zm_limiter_release(zm_limiter_t *l, zm_lim_entry_t *e);
/* Drops idle keys; returns how many remain. */
size_t zm_limiter_sweep(zm_limiter_t *l, uint64_t now_ms);

#endif /* ZM_GRPC_LIMITER_H */
