/*
 * collect.c - lease collection (include/zm/collect.h).
 *
 * A sweep claims batches of expired leases and deletes them, at most
 * `concurrency` deletes in flight; the claim is the durable LIVE ->
 * DELETING transition, so the DELETE that follows is guarded, and a crash
 * at any point leaves a tombstone that recovery retries. The loop does
 * O(batch) work per callback.
 */
#include "zm/collect.h"

#include "zm/audit.h"
#include "zm/log.h"
#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>

#define CLAIM_MAX 64u

struct zm_collect {
  uv_loop_t *loop;
  zm_store_t *store;
  zm_life_t *life;
  zm_sweep_config_t cfg;
  zm_collect_stats_t stats;
  uv_timer_t timer;
  int active;                             /* a sweep is running */
  int claiming;                           /* a claim is in flight */
  int at_end;                             /* the last claim came back short */
  int64_t cut;                            /* the sweep's cut */
  uint64_t sweep_collected, sweep_failed; /* this sweep, for its summary */
  unsigned inflight;
  int stopping, timer_closed;
  void (*stop_done)(void *);
  void *stop_data;
};

static void pump(zm_collect_t *c);

static void maybe_done(zm_collect_t *c) {
  if (c->inflight != 0 || c->claiming)
    return;
  if (c->active && (c->sweep_collected != 0 || c->sweep_failed != 0))
    ZM_INFO("collect: sweep: %llu expired leases deleted, %llu deletes "
            "deferred (retried by recovery)",
            (unsigned long long)c->sweep_collected,
            (unsigned long long)c->sweep_failed);
  c->sweep_collected = c->sweep_failed = 0;
  c->active = 0;
  if (c->stopping && c->timer_closed && c->stop_done != NULL) {
    void (*done)(void *) = c->stop_done;
    c->stop_done = NULL;
    done(c->stop_data);
  }
}

static void on_deleted(int err, void *data) {
  zm_collect_t *c = data;
  c->inflight--;
  if (err == 0) {
    c->stats.collected++;
    c->sweep_collected++;
  } else {
    c->stats.failed++; /* the tombstone stays: recovery retries */
    c->sweep_failed++;
  }
  pump(c);
}

static void on_claimed(int err, const zm_tomb_row_t *rows, size_t n,
                       void *data) {
  zm_collect_t *c = data;
  c->claiming = 0;
  if (err != 0) {
    ZM_WARN("collect: cannot claim expired leases: %s", zm_strerror(err));
    c->at_end = 1;
    pump(c);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    const zm_tomb_row_t *t = &rows[i];
    zm_life_forget_service(c->life, t->ziti_identity_id);
    ZM_DEBUG("collect: lease of %s (service type %d) expired: deleting",
             t->ziti_identity_id, t->type);
    char type[16];
    snprintf(type, sizeof type, "%d", t->type);
    zm_audit("lease_expired", "id", t->ziti_identity_id, "service_type", type,
             NULL);
    c->inflight++;
    zm_life_delete(c->life, t->ziti_identity_id, 0, on_deleted, c);
  }
  if (n == 0)
    c->at_end = 1;
  pump(c);
}

static void pump(zm_collect_t *c) {
  if (!c->active)
    return;
  if (c->stopping)
    c->at_end = 1;
  unsigned cap = c->cfg.concurrency;
  if (!c->at_end && !c->claiming && c->inflight < cap) {
    unsigned want = cap - c->inflight;
    if (want > CLAIM_MAX)
      want = CLAIM_MAX;
    int64_t now = zm_life_now(c->life);
    c->claiming = 1;
    zm_store_claim_expired(c->store, c->cut, now,
                           now + (int64_t)c->cfg.ziti_timeout_ms +
                               (int64_t)zm_life_margin_ms(c->life),
                           want, on_claimed, c);
    return;
  }
  maybe_done(c);
}

static void sweep(zm_collect_t *c) {
  if (c->active || c->stopping)
    return;
  c->stats.sweeps++;
  int64_t cut = zm_life_collect_cut(c->life);
  if (cut == INT64_MIN) {
    c->stats.skipped_outage++;
    ZM_DEBUG("collect: skipped: heartbeat stale or within TTL of a resume");
    return;
  }
  c->active = 1;
  c->at_end = 0;
  c->cut = cut;
  pump(c);
}

static void on_timer(uv_timer_t *t) { sweep(t->data); }

zm_collect_t *zm_collect_new(uv_loop_t *loop, zm_store_t *store,
                             zm_life_t *life, const zm_sweep_config_t *cfg) {
  zm_collect_t *c = zm_xcalloc(1, sizeof *c);
  c->loop = loop;
  c->store = store;
  c->life = life;
  c->cfg = *cfg;
  if (c->cfg.concurrency == 0)
    c->cfg.concurrency = 1;
  uv_timer_init(loop, &c->timer);
  c->timer.data = c;
  return c;
}

void zm_collect_start(zm_collect_t *c) {
  uv_timer_start(&c->timer, on_timer, 0, c->cfg.interval_ms);
}

void zm_collect_trigger(zm_collect_t *c) { sweep(c); }

const zm_collect_stats_t *zm_collect_stats(const zm_collect_t *c) {
  return &c->stats;
}

static void on_timer_closed(uv_handle_t *h) {
  zm_collect_t *c = h->data;
  c->timer_closed = 1;
  maybe_done(c);
}

void zm_collect_stop(zm_collect_t *c, void (*done)(void *), void *data) {
  c->stopping = 1;
  c->stop_done = done;
  c->stop_data = data;
  uv_close((uv_handle_t *)&c->timer, on_timer_closed);
}

void zm_collect_free(zm_collect_t *c) { free(c); }
