/*
 * gc.c - lease GC and crash recovery, on a libuv timer.
 *
 * A sweep has two phases, both time-sliced by construction (every store read
 * is a bounded batch completed asynchronously; controller calls run with
 * bounded concurrency; the loop only does O(batch) work per callback):
 *
 * 1. RECOVER: pending records (traces of creations interrupted by a crash, or
 *    of compensations that failed) older than a bound are resolved: look the
 *    identity up by name on the controller, delete what is there, then drop
 *    the record. At start-up every pending record older than the process is
 *    taken, since nothing in this process can own it.
 * 2. COLLECT: leases expired at sweep time, in (lease, id) order with a
 *    cursor. Each candidate is re-checked against the in-memory index, which
 *    extensions update before their write is durable; a live lease is
 *    skipped. A collected identity is marked DELETING in the index before the
 *    DELETE is sent, and ExtendIdentityLease answers NOT_FOUND from then on,
 *    so an extension can never race a deletion. The record is removed only
 *    after the controller confirmed (or said 404). Failures back off per
 *    identity (exponential, capped) and never block the others.
 */
#include "zm/app.h"
#include "zm/log.h"

#include <stdlib.h>
#include <string.h>

#define GC_BATCH 256u
#define GC_BACKOFF_MIN_MS 1000
#define GC_BACKOFF_MAX_MS (5 * 60 * 1000)
/* Controller calls of a sweep are bounded by ZITI_REQUEST_TIMEOUT
 * (cfg.ziti_timeout_ms), like every other controller call without a caller
 * deadline; see gc_deadline(). */
/* Recovery must never touch a creation still in flight in this process. */
#define GC_PENDING_SAFETY_MS (2 * 60 * 1000)

typedef enum { GC_IDLE, GC_RECOVER, GC_COLLECT, GC_STOPPED } gc_phase_t;

typedef struct {
  char *id;
  int type;
  int64_t lease;
} cand_t;

typedef struct {
  char *name;
} pend_t;

struct zm_gc {
  zm_app_t *app;
  uv_timer_t timer;
  gc_phase_t phase;
  int64_t started_wall; /* process start, wall ms */
  int64_t sweep_now;    /* wall ms the current sweep decides against */
  unsigned inflight;    /* controller calls + store writes in flight */
  int reading;          /* a store read is in flight */
  int at_end;           /* the current phase's listing is exhausted */
  /* COLLECT cursor */
  int64_t cur_ms;
  char *cur_id;
  cand_t *cands;
  size_t n_cands, pos;
  /* RECOVER batch */
  pend_t *pends;
  size_t n_pends, ppos;
  zm_index_t *backoff; /* id -> (attempts in service_type, next try in lease) */
  void (*stop_done)(void *);
  void *stop_data;
  int timer_closed;
};

static void gc_pump(zm_gc_t *gc);
static void gc_sweep_end(zm_gc_t *gc);

/* Fix (integration tests): this was a fixed 15 s, so a controller slower than
 * ZITI_REQUEST_TIMEOUT held a GC slot for 15 s whatever the setting. */
static uint64_t gc_deadline(const zm_gc_t *gc) {
  return uv_now(gc->app->loop) + gc->app->cfg.ziti_timeout_ms;
}

/* ===================== backoff ========================================== */

static int backoff_blocked(zm_gc_t *gc, const char *id, int64_t now) {
  zm_index_service_t *b = zm_index_lookup_service(gc->backoff, id, strlen(id));
  return b != NULL && b->lease_expires_ms > now;
}

static void backoff_fail(zm_gc_t *gc, const char *id, int64_t now) {
  zm_index_service_t *b = zm_index_lookup_service(gc->backoff, id, strlen(id));
  int attempts = b ? b->service_type + 1 : 1;
  int64_t delay = GC_BACKOFF_MIN_MS;
  for (int i = 1; i < attempts && delay < GC_BACKOFF_MAX_MS; i++)
    delay *= 2;
  if (delay > GC_BACKOFF_MAX_MS)
    delay = GC_BACKOFF_MAX_MS;
  zm_index_put_service(gc->backoff, id, strlen(id), attempts, now + delay, 0);
}

static void backoff_clear(zm_gc_t *gc, const char *id) {
  zm_index_del_service(gc->backoff, id, strlen(id));
}

/* ===================== RECOVER ========================================== */

typedef struct {
  zm_gc_t *gc;
  char *name;
  char **ids;
  size_t n, next;
} recov_t;

static void recov_free(recov_t *r) {
  for (size_t i = 0; i < r->n; i++)
    free(r->ids[i]);
  free(r->ids);
  free(r->name);
  free(r);
}

static void recov_done(recov_t *r, int ok) {
  zm_gc_t *gc = r->gc;
  if (!ok) {
    gc->app->stats.gc_failed++;
    backoff_fail(gc, r->name, zm_wall_ms());
  } else {
    backoff_clear(gc, r->name);
    gc->app->stats.recovered_pending++;
  }
  recov_free(r);
  gc->inflight--;
  gc_pump(gc);
}

static void on_recov_dropped(int err, void *data) {
  recov_t *r = data;
  if (err == 0)
    ZM_INFO("gc: recovered pending creation %s (%zu identit%s deleted)",
            r->name, r->n, r->n == 1 ? "y" : "ies");
  recov_done(r, err == 0);
}

static void recov_next(recov_t *r);

static void on_recov_deleted(const zm_ziti_result_t *res, void *data) {
  recov_t *r = data;
  if (res->err != 0) {
    ZM_WARN("gc: recovery of %s: delete %s failed: %s; will retry", r->name,
            r->ids[r->next - 1], zm_strerror(res->err));
    recov_done(r, 0);
    return;
  }
  recov_next(r);
}

static void recov_next(recov_t *r) {
  if (r->next < r->n) {
    const char *id = r->ids[r->next++];
    /* Never delete what has a committed record (a creation that committed
     * and crashed before dropping its pending row cannot happen: both are
     * one store unit; this is a belt-and-braces check). */
    if (zm_index_lookup_service(r->gc->app->index, id, strlen(id)) != NULL ||
        zm_index_lookup_managed(r->gc->app->index, id, strlen(id)) != NULL) {
      recov_next(r);
      return;
    }
    zm_ziti_delete_identity(r->gc->app->ziti, id, gc_deadline(r->gc),
                            on_recov_deleted, r);
    return;
  }
  zm_store_op_t op = {.kind = ZM_STORE_DEL_PENDING, .name = r->name};
  zm_store_submit(r->gc->app->store, &op, 1, on_recov_dropped, r);
}

static void on_recov_found(const zm_ziti_result_t *res, void *data) {
  recov_t *r = data;
  if (res->err != 0) {
    ZM_WARN("gc: recovery of %s: lookup failed: %s; will retry", r->name,
            zm_strerror(res->err));
    recov_done(r, 0);
    return;
  }
  r->n = res->n_ids;
  r->ids = zm_xcalloc(res->n_ids + 1, sizeof *r->ids);
  for (size_t i = 0; i < res->n_ids; i++)
    r->ids[i] = zm_xstrdup(res->ids[i]);
  recov_next(r);
}

static void on_pending_listed(int err, const zm_pending_row_t *rows, size_t n,
                              void *data) {
  zm_gc_t *gc = data;
  gc->reading = 0;
  if (err != 0) {
    ZM_WARN("gc: cannot list pending records: %s", zm_strerror(err));
    gc->at_end = 1;
  } else {
    gc->pends = zm_xcalloc(n + 1, sizeof *gc->pends);
    gc->n_pends = n;
    gc->ppos = 0;
    for (size_t i = 0; i < n; i++)
      gc->pends[i].name = zm_xstrdup(rows[i].name);
    gc->at_end = 1; /* one bounded batch per sweep; the rest next sweep */
  }
  gc_pump(gc);
}

/* ===================== COLLECT ========================================== */

typedef struct {
  zm_gc_t *gc;
  char *id;
  int type;
  int64_t lease;
} coll_t;

static void coll_done(coll_t *c) {
  zm_gc_t *gc = c->gc;
  free(c->id);
  free(c);
  gc->inflight--;
  gc_pump(gc);
}

static void on_record_removed(int err, void *data) {
  coll_t *c = data;
  zm_gc_t *gc = c->gc;
  if (err != 0) {
    /* Deleted on the controller; the record stays DELETING in the index and
     * a later sweep retries (the controller then answers 404). */
    ZM_WARN("gc: %s deleted on the controller, store removal failed: %s", c->id,
            zm_strerror(err));
    zm_index_service_t *s =
        zm_index_lookup_service(gc->app->index, c->id, strlen(c->id));
    if (s != NULL)
      s->state = ZM_LEASE_LIVE;
    backoff_fail(gc, c->id, zm_wall_ms());
    gc->app->stats.gc_failed++;
  } else {
    zm_index_del_service(gc->app->index, c->id, strlen(c->id));
    backoff_clear(gc, c->id);
    gc->app->stats.gc_collected++;
  }
  coll_done(c);
}

static void on_lease_deleted(const zm_ziti_result_t *res, void *data) {
  coll_t *c = data;
  zm_gc_t *gc = c->gc;
  if (res->err != 0) {
    zm_index_service_t *s =
        zm_index_lookup_service(gc->app->index, c->id, strlen(c->id));
    if (s != NULL)
      s->state = ZM_LEASE_LIVE;
    int64_t now = zm_wall_ms();
    backoff_fail(gc, c->id, now);
    gc->app->stats.gc_failed++;
    ZM_WARN("gc: delete %s failed: %s; will retry with backoff", c->id,
            zm_strerror(res->err));
    coll_done(c);
    return;
  }
  int64_t past = gc->sweep_now - c->lease;
  ZM_INFO("gc: collected %s (service type %d), %.1f s past its lease%s", c->id,
          c->type, (double)past / 1000.0,
          res->gone ? " (already gone on the controller)" : "");
  zm_store_op_t op = {
      .kind = ZM_STORE_DEL_SERVICE, .id = c->id, .ms = INT64_MAX};
  zm_store_submit(gc->app->store, &op, 1, on_record_removed, c);
}

static void on_expired_listed(int err, const zm_service_row_t *rows, size_t n,
                              void *data) {
  zm_gc_t *gc = data;
  gc->reading = 0;
  for (size_t i = 0; i < gc->n_cands; i++)
    free(gc->cands[i].id);
  free(gc->cands);
  gc->cands = NULL;
  gc->n_cands = gc->pos = 0;
  if (err != 0) {
    ZM_WARN("gc: cannot list expired leases: %s", zm_strerror(err));
    gc->at_end = 1;
    gc_pump(gc);
    return;
  }
  gc->cands = zm_xcalloc(n + 1, sizeof *gc->cands);
  for (size_t i = 0; i < n; i++) {
    gc->cands[i].id = zm_xstrdup(rows[i].ziti_identity_id);
    gc->cands[i].type = rows[i].service_type;
    gc->cands[i].lease = rows[i].lease_expires_ms;
  }
  gc->n_cands = n;
  if (n > 0) {
    free(gc->cur_id);
    gc->cur_id = zm_xstrdup(rows[n - 1].ziti_identity_id);
    gc->cur_ms = rows[n - 1].lease_expires_ms;
  }
  if (n < GC_BATCH)
    gc->at_end = 1;
  gc_pump(gc);
}

/* Starts work while there is capacity; ends the phase when all is done. */
static void gc_pump(zm_gc_t *gc) {
  zm_app_t *app = gc->app;
  unsigned cap = app->cfg.gc_concurrency;
  if (app->shutting_down) {
    /* Shutting down: start nothing new. What the sweep has not started yet
     * is dropped (the next process's sweeps find it again); the sweep ends
     * once the calls in flight return. */
    for (; gc->ppos < gc->n_pends; gc->ppos++) {
      free(gc->pends[gc->ppos].name);
      gc->pends[gc->ppos].name = NULL;
    }
    gc->pos = gc->n_cands;
    gc->at_end = 1;
  }
  if (gc->phase == GC_RECOVER) {
    while (gc->ppos < gc->n_pends && gc->inflight < cap &&
           !gc->app->shutting_down) {
      pend_t *p = &gc->pends[gc->ppos++];
      if (backoff_blocked(gc, p->name, gc->sweep_now)) {
        free(p->name);
        p->name = NULL;
        continue;
      }
      recov_t *r = zm_xcalloc(1, sizeof *r);
      r->gc = gc;
      r->name = p->name;
      p->name = NULL;
      gc->inflight++;
      zm_ziti_find_identities(app->ziti, "name", r->name, gc_deadline(gc),
                              on_recov_found, r);
    }
    if (gc->ppos < gc->n_pends || gc->inflight > 0 || gc->reading)
      return;
    free(gc->pends);
    gc->pends = NULL;
    gc->n_pends = gc->ppos = 0;
    if (!gc->at_end)
      return;
    /* RECOVER done: COLLECT */
    gc->phase = GC_COLLECT;
    gc->at_end = 0;
    gc->cur_ms = INT64_MIN;
    free(gc->cur_id);
    gc->cur_id = zm_xstrdup("");
  }
  if (gc->phase == GC_COLLECT) {
    while (gc->pos < gc->n_cands && gc->inflight < cap &&
           !gc->app->shutting_down) {
      cand_t *cd = &gc->cands[gc->pos++];
      zm_index_service_t *s =
          zm_index_lookup_service(app->index, cd->id, strlen(cd->id));
      if (s != NULL && (s->lease_expires_ms > gc->sweep_now ||
                        s->state == ZM_LEASE_DELETING))
        continue; /* extended meanwhile, or already being deleted */
      if (backoff_blocked(gc, cd->id, gc->sweep_now)) {
        app->stats.gc_retried += 0;
        continue;
      }
      if (zm_index_lookup_service(gc->backoff, cd->id, strlen(cd->id)))
        app->stats.gc_retried++;
      if (s == NULL)
        s = zm_index_put_service(app->index, cd->id, strlen(cd->id), cd->type,
                                 cd->lease, 0);
      s->state = ZM_LEASE_DELETING;
      coll_t *c = zm_xcalloc(1, sizeof *c);
      c->gc = gc;
      c->id = cd->id;
      cd->id = NULL;
      c->type = cd->type;
      c->lease = cd->lease;
      gc->inflight++;
      zm_ziti_delete_identity(app->ziti, c->id, gc_deadline(gc),
                              on_lease_deleted, c);
    }
    if (gc->pos < gc->n_cands || gc->reading)
      return;
    if (!gc->at_end && !gc->app->shutting_down) {
      gc->reading = 1;
      zm_store_list_expired(app->store, gc->sweep_now, gc->cur_ms, gc->cur_id,
                            GC_BATCH, on_expired_listed, gc);
      return;
    }
    if (gc->inflight > 0)
      return;
    gc_sweep_end(gc);
    return;
  }
  if (gc->phase == GC_STOPPED && gc->inflight == 0 && !gc->reading &&
      gc->stop_done != NULL && gc->timer_closed) {
    void (*done)(void *) = gc->stop_done;
    gc->stop_done = NULL;
    done(gc->stop_data);
  }
}

static void on_sweep(uv_timer_t *t);

static void gc_sweep_end(zm_gc_t *gc) {
  for (size_t i = 0; i < gc->n_cands; i++)
    free(gc->cands[i].id);
  free(gc->cands);
  gc->cands = NULL;
  gc->n_cands = gc->pos = 0;
  gc->phase = GC_IDLE;
  ZM_DEBUG("gc: sweep done (collected %llu, failed %llu so far)",
           (unsigned long long)gc->app->stats.gc_collected,
           (unsigned long long)gc->app->stats.gc_failed);
  if (gc->stop_done != NULL) {
    gc->phase = GC_STOPPED;
    gc_pump(gc);
  }
}

static void gc_sweep_start(zm_gc_t *gc) {
  if (gc->phase != GC_IDLE)
    return;
  zm_app_t *app = gc->app;
  gc->app->stats.gc_sweeps++;
  gc->sweep_now = zm_wall_ms();
  gc->phase = GC_RECOVER;
  gc->at_end = 0;
  /* Records older than the process belong to no creation in flight here
   * (earlier processes), on every sweep, not only the first: fix found by
   * test_gc.py - when the controller was unreachable during the first sweep,
   * the traces of a crash waited ENROLLMENT_TIMEOUT + 2 min for the age
   * bound. Younger records (failed compensations of this process) wait for
   * the age bound, which always exceeds any creation's own deadline.
   * NOTE: with several replicas on one database (PostgreSQL) "older than the
   * process" is not enough; records would need an owner. */
  uint64_t age = app->cfg.pending_age_ms;
  uint64_t min_age = app->cfg.enroll_timeout_ms + GC_PENDING_SAFETY_MS;
  if (age < min_age)
    age = min_age;
  int64_t older = gc->sweep_now - (int64_t)age;
  if (older < gc->started_wall)
    older = gc->started_wall;
  gc->reading = 1;
  zm_store_list_pending(app->store, older, GC_BATCH, on_pending_listed, gc);
}

static void on_sweep(uv_timer_t *t) { gc_sweep_start(t->data); }

zm_gc_t *zm_gc_new(zm_app_t *app) {
  zm_gc_t *gc = zm_xcalloc(1, sizeof *gc);
  gc->app = app;
  gc->phase = GC_IDLE;
  gc->started_wall = zm_wall_ms();
  gc->backoff = zm_index_new();
  gc->cur_id = zm_xstrdup("");
  uv_timer_init(app->loop, &gc->timer);
  gc->timer.data = gc;
  return gc;
}

void zm_gc_start(zm_gc_t *gc) {
  /* the first sweep runs promptly: recovery of crashed creations and leases
   * that expired while the service was down */
  uv_timer_start(&gc->timer, on_sweep, 10, gc->app->cfg.gc_interval_ms);
}

void zm_gc_trigger(zm_gc_t *gc) { gc_sweep_start(gc); }

static void on_timer_closed(uv_handle_t *h) {
  zm_gc_t *gc = h->data;
  gc->timer_closed = 1;
  gc_pump(gc);
}

void zm_gc_stop(zm_gc_t *gc, void (*done)(void *), void *data) {
  gc->stop_done = done;
  gc->stop_data = data;
  uv_close((uv_handle_t *)&gc->timer, on_timer_closed);
  if (gc->phase == GC_IDLE)
    gc->phase = GC_STOPPED;
  /* an active sweep stops issuing work (shutting_down) and ends when its
   * in-flight calls return */
}

void zm_gc_free(zm_gc_t *gc) {
  for (size_t i = 0; i < gc->n_cands; i++)
    free(gc->cands[i].id);
  free(gc->cands);
  for (size_t i = 0; i < gc->n_pends; i++)
    free(gc->pends[i].name);
  free(gc->pends);
  free(gc->cur_id);
  zm_index_free(gc->backoff);
  free(gc);
}
