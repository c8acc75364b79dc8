/*
 * collect.h - lease collection and recovery, each on its own libuv timer.
 *
 * Collection (src/lease/collect.c) claims expired leases from the store in
 * bounded batches - LIVE -> DELETING, durable, never the same row to two
 * processes - and has the lifecycle delete them on the controller with
 * bounded concurrency. The cut comes from the lifecycle's outage rule.
 *
 * Recovery (src/lease/recover.c) resolves what earlier attempts left: pending
 * creations whose create can no longer land (look the name up; condemn what
 * exists, abandon the rest) and tombstones due for another delete attempt.
 *
 * Both take the store and the lifecycle they work through, nothing else.
 */
#ifndef ZM_COLLECT_H
#define ZM_COLLECT_H

#include "zm/lifecycle.h"
#include "zm/store.h"
#include "zm/ziti.h"

#include <stdint.h>
#include <uv.h>

typedef struct {
  uint64_t interval_ms; /* SERVICE_IDENTITY_GC_INTERVAL */
  unsigned concurrency; /* SERVICE_IDENTITY_GC_CONCURRENCY */
  uint64_t ziti_timeout_ms;
} zm_sweep_config_t;

typedef struct {
  uint64_t sweeps, collected, failed, skipped_outage;
} zm_collect_stats_t;

typedef struct zm_collect zm_collect_t;
zm_collect_t *zm_collect_new(uv_loop_t *loop, zm_store_t *store,
                             zm_life_t *life, const zm_sweep_config_t *cfg);
void zm_collect_start(zm_collect_t *c);
/* Claims nothing more; done(data) once the deletes in flight returned. */
void zm_collect_stop(zm_collect_t *c, void (*done)(void *), void *data);
void zm_collect_free(zm_collect_t *c);
void zm_collect_trigger(zm_collect_t *c);
const zm_collect_stats_t *zm_collect_stats(const zm_collect_t *c);

typedef struct {
  uint64_t sweeps, pending_resolved, pending_failed, tombs_retried;
} zm_recover_stats_t;

typedef struct zm_recover zm_recover_t;
zm_recover_t *zm_recover_new(uv_loop_t *loop, zm_store_t *store,
                             zm_life_t *life, zm_ziti_t *ziti,
                             const zm_sweep_config_t *cfg);
void zm_recover_start(zm_recover_t *r);
void zm_recover_stop(zm_recover_t *r, void (*done)(void *), void *data);
void zm_recover_free(zm_recover_t *r);
void zm_recover_trigger(zm_recover_t *r);
const zm_recover_stats_t *zm_recover_stats(const zm_recover_t *r);

#endif /* ZM_COLLECT_H */
