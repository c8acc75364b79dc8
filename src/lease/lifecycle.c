/*
 * lifecycle.c - every identity's durable state and its transitions (see
 * include/zm/lifecycle.h for the states, the outage rule and the clock).
 *
 * Everything that changes an identity's state goes through a function of
 * this file, and every such function submits exactly one store unit that
 * makes the transition durable before anything depends on it: before a
 * controller call it guards, before the index learns it, before a caller
 * hears OK. The only memory-first path is the lease refresh: see extend and
 * the flusher below.
 */
#include "zm/lifecycle.h"

#include "zm/audit.h"
#include "zm/log.h"
#include "zm/zm.h"

#include <stdlib.h>
#include <time.h>
#include <string.h>

/* Heartbeat period, and the silence after which the store counts an outage
 * (no process beat for that long). */
#define BEAT_MS 1000u
#define OUTAGE_GAP_MS 5000u
/* Collection and recovery decide on the store clock and the resume time
 * only while the last successful beat is younger than this. */
#define BEAT_STALE_MS 3000u
/* The store counts as reachable (ExtendIdentityLease is answered at all)
 * while its latest answer to this process was a success and came less than
 * this long ago: slow (a big flush ahead of the beat) is not down. */
#define STORE_SILENCE_MS 10000u
/* Change poll period (shared store): the bound on how long a mapping
 * deleted or replaced through another replica keeps resolving here. */
#define CHANGES_MS 500u
/* Changes are re-read this far back: a transaction that took its sequence
 * number before an already-seen one but committed after it is still seen. */
#define CHANGES_LOOKBACK_MS 10000
#define CHANGES_BATCH 10000u
/* At the first beat the change log is read this far back: changes made
 * while this process loaded its cache are seen. */
#define CHANGES_START_BACK_MS 60000
/* Without a successful change poll for this long, cached mappings are not
 * trusted (every ResolveIdentity asks the store). */
#define CHANGES_STALE_MS 5000u
#define BACKOFF_MIN_MS 1000u
#define BACKOFF_MAX_MS (5u * 60u * 1000u)

/* ===================== the transition table ============================== */

static const char *const STATE_NAMES[ZM_LIFE__COUNT] = {
    "NONE", "PENDING", "LIVE", "DELETING", "GONE"};

static const struct {
  zm_life_state_t from, to;
} EDGES[ZM_LIFE_T__COUNT] = {
    [ZM_LIFE_T_INTENT] = {ZM_LIFE_NONE, ZM_LIFE_PENDING},
    [ZM_LIFE_T_COMMIT] = {ZM_LIFE_PENDING, ZM_LIFE_LIVE},
    [ZM_LIFE_T_ABANDON] = {ZM_LIFE_PENDING, ZM_LIFE_GONE},
    [ZM_LIFE_T_CONDEMN] = {ZM_LIFE_PENDING, ZM_LIFE_DELETING},
    [ZM_LIFE_T_RETIRE] = {ZM_LIFE_LIVE, ZM_LIFE_DELETING},
    [ZM_LIFE_T_BURY] = {ZM_LIFE_DELETING, ZM_LIFE_GONE},
    [ZM_LIFE_T_DEFER] = {ZM_LIFE_DELETING, ZM_LIFE_DELETING},
    [ZM_LIFE_T_ARM] = {ZM_LIFE_PENDING, ZM_LIFE_PENDING},
    [ZM_LIFE_T_HANDOVER] = {ZM_LIFE_PENDING, ZM_LIFE_GONE},
    [ZM_LIFE_T_TOMB] = {ZM_LIFE_NONE, ZM_LIFE_DELETING},
};

int zm_life_edge(zm_life_state_t a, zm_life_transition_t t,
                 zm_life_state_t *to) {
  if ((unsigned)t >= ZM_LIFE_T__COUNT || EDGES[t].from != a)
    return 0;
  if (to != NULL)
    *to = EDGES[t].to;
  return 1;
}

const char *zm_life_state_name(zm_life_state_t s) {
  return (unsigned)s < ZM_LIFE__COUNT ? STATE_NAMES[s] : "?";
}

/* Logs one transition; every durable transition of this file passes here. */
static void trace(zm_life_transition_t t, const char *what) {
  ZM_DEBUG("lifecycle: %s: %s -> %s", what, STATE_NAMES[EDGES[t].from],
           STATE_NAMES[EDGES[t].to]);
}

/* ===================== the object ======================================== */

typedef struct {
  char **ids;
  size_t n, cap;
} idvec_t;

typedef struct {
  int64_t seq;
  uint64_t seen_mono;
} seen_t;

struct zm_life {
  uv_loop_t *loop;
  zm_store_t *store;
  zm_index_t *index;
  zm_ziti_t *ziti;
  zm_life_config_t cfg;
  zm_life_stats_t stats;
  int shared;
  unsigned inflight;

  /* clock */
  uv_timer_t beat_timer;
  int beat_inflight;
  int64_t anchor_store_ms; /* store clock at anchor_mono */
  uint64_t anchor_mono;    /* ms, mono_ms() */
  uint64_t last_beat_ok;   /* mono ms of the last successful beat; 0 never */
  uint64_t beat_sent;      /* mono ms the beat in flight was sent */
  int64_t resumed_ms;      /* store clock: start of the current up period */
  void (*on_ready)(void *);
  void *ready_data;

  /* lease refreshes */
  uv_timer_t flush_timer;
  idvec_t dirty;  /* ids with a pending refresh, not in flight */
  idvec_t flying; /* ids of the flush in flight */
  int64_t *flying_ms;
  int flush_failed;         /* the last flush failed: its ids go again */
  uint64_t store_ok_mono;   /* mono ms of the latest successful store answer */
  uint64_t store_fail_mono; /* ... and of the latest failed one */

  /* change poller (shared store) */
  uv_timer_t changes_timer;
  int changes_inflight;
  int64_t changes_seq;      /* highest seq seen; INT64_MAX = none yet */
  int64_t changes_ok_store; /* store clock when the last successful poll was
                               sent */
  int64_t changes_sent_store;
  uint64_t changes_ok_mono; /* mono ms of the last successful poll */
  uint64_t epoch;           /* bumped at every eviction */
  seen_t *seen;             /* seqs seen within the lookback window */
  size_t n_seen, cap_seen;

  int stopping, closed_handles;
  void (*stop_done)(void *);
  void *stop_data;
};

/* CLOCK_BOOTTIME, not the loop's CLOCK_MONOTONIC: it also runs while the
 * host is suspended or the VM paused, so the store time carried between
 * beats, and the age of the last store answer, count that time too. */
static uint64_t mono_ms(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
    return uv_hrtime() / 1000000u;
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void maybe_stopped(zm_life_t *l);

/* One call of this module's finished: shutdown may be waiting for it. */
static void life_dec(zm_life_t *l) {
  ZM_ASSERT(l->inflight > 0);
  l->inflight--;
  maybe_stopped(l);
}

static void idvec_push(idvec_t *v, const char *id) {
  if (v->n == v->cap) {
    v->cap = v->cap ? v->cap * 2 : 256;
    v->ids = zm_xrealloc(v->ids, v->cap * sizeof *v->ids);
  }
  v->ids[v->n++] = zm_xstrdup(id);
}

static void idvec_clear(idvec_t *v) {
  for (size_t i = 0; i < v->n; i++)
    free(v->ids[i]);
  v->n = 0;
}

static void idvec_free(idvec_t *v) {
  idvec_clear(v);
  free(v->ids);
  v->ids = NULL;
  v->cap = 0;
}

uint64_t zm_life_backoff_ms(int attempts) {
  uint64_t d = BACKOFF_MIN_MS;
  for (int i = 0; i < attempts && d < BACKOFF_MAX_MS; i++)
    d *= 2;
  return d > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : d;
}

const zm_life_stats_t *zm_life_stats(const zm_life_t *l) { return &l->stats; }
unsigned zm_life_inflight(const zm_life_t *l) { return l->inflight; }
int zm_life_read_through(const zm_life_t *l) { return l->shared; }

/* ===================== clock ============================================= */

int64_t zm_life_now(const zm_life_t *l) {
  if (l->last_beat_ok == 0)
    return zm_wall_ms();
  return l->anchor_store_ms + (int64_t)(mono_ms() - l->anchor_mono);
}

static int beat_fresh(const zm_life_t *l) {
  return l->last_beat_ok != 0 && mono_ms() - l->last_beat_ok < BEAT_STALE_MS;
}

static void store_answered(zm_life_t *l, int err) {
  if (err == ZM_E_STORE)
    l->store_fail_mono = mono_ms();
  else
    l->store_ok_mono = mono_ms();
}

static int store_ok(const zm_life_t *l) {
  return l->last_beat_ok != 0 && l->store_ok_mono >= l->store_fail_mono &&
         mono_ms() - l->store_ok_mono < STORE_SILENCE_MS;
}

uint64_t zm_life_margin_ms(const zm_life_t *l) {
  /* A lease that expired during an outage shorter than OUTAGE_GAP (not
   * counted as one) gets the rest of the margin to be refreshed; refreshes
   * answered from memory need none of it (see zm_life_extend). */
  return OUTAGE_GAP_MS + 2 * l->cfg.flush_ms + 2 * BEAT_MS;
}

int64_t zm_life_collect_cut(const zm_life_t *l) {
  if (!beat_fresh(l))
    return INT64_MIN;
  int64_t now = zm_life_now(l);
  int64_t margin = (int64_t)zm_life_margin_ms(l);
  if (l->resumed_ms + (int64_t)l->cfg.lease_ttl_ms + margin > now)
    return INT64_MIN; /* every lease lives TTL past the last resume */
  return now - margin;
}

int zm_life_settled(const zm_life_t *l, uint64_t min_ms) {
  return beat_fresh(l) && zm_life_now(l) - l->resumed_ms >= (int64_t)min_ms;
}

static void on_beat(int err, int64_t now_ms, int64_t resumed_ms, void *data) {
  zm_life_t *l = data;
  l->beat_inflight = 0;
  uint64_t m = mono_ms();
  store_answered(l, err);
  if (err != 0) {
    l->stats.beat_failures++;
    if (l->stats.beat_failures % 10 == 1)
      ZM_WARN("lifecycle: heartbeat failed: %s (no collection, no recovery "
              "and no lease refresh from memory until it works again)",
              zm_strerror(err));
    return;
  }
  l->stats.beats++;
  /* The store read its clock somewhere between send and now. */
  l->anchor_mono = l->beat_sent + (m - l->beat_sent) / 2;
  l->anchor_store_ms = now_ms;
  if (l->last_beat_ok != 0 && resumed_ms != l->resumed_ms) {
    l->stats.outages_detected++;
    ZM_WARN("lifecycle: no process was up (or the store clock stepped) "
            "before this beat: every lease lives at least %llu ms from now",
            (unsigned long long)l->cfg.lease_ttl_ms);
  }
  l->resumed_ms = resumed_ms;
  int first = l->last_beat_ok == 0;
  l->last_beat_ok = m;
  if (first) {
    l->changes_ok_store = now_ms - CHANGES_START_BACK_MS;
    l->changes_ok_mono = m;
    if (l->on_ready != NULL)
      l->on_ready(l->ready_data);
  }
}

static void on_beat_timer(uv_timer_t *t) {
  zm_life_t *l = t->data;
  if (l->beat_inflight)
    return;
  l->beat_inflight = 1;
  l->beat_sent = mono_ms();
  zm_store_heartbeat(l->store, zm_wall_ms(), OUTAGE_GAP_MS, on_beat, l);
}

/* ===================== lease refresh: memory first ======================= */

/* A refresh is queued for the store once it raises the durable lease by at
 * least this much: the durable lease then trails the answered one by at
 * most this plus one flush period, and a key refreshed many times a second
 * costs one row write per granule instead of one per flush. */
static int64_t granule_ms(const zm_life_t *l) {
  int64_t g = (int64_t)(l->cfg.lease_ttl_ms / 10);
  return g > 15000 ? 15000 : g;
}

static void queue_refresh(zm_life_t *l, zm_index_service_t *s, const char *id) {
  /* the delta is what the refresh raises the durable lease by */
  if (s->queued || s->pending_delta_ms == 0 ||
      (int64_t)s->pending_delta_ms < granule_ms(l))
    return;
  s->queued = 1;
  idvec_push(&l->dirty, id);
}

static void on_flushed(int err, void *data) {
  zm_life_t *l = data;
  store_answered(l, err);
  if (err != 0) {
    l->stats.flush_failures++;
    l->flush_failed = 1;
    ZM_WARN("lifecycle: lease flush of %zu refreshes failed: %s; retrying",
            l->flying.n, zm_strerror(err));
  } else {
    l->flush_failed = 0;
    l->stats.flushes++;
    l->stats.flushed_leases += l->flying.n;
  }
  for (size_t i = 0; i < l->flying.n; i++) {
    const char *id = l->flying.ids[i];
    zm_index_service_t *s = zm_index_lookup_service(l->index, id, strlen(id));
    if (s == NULL)
      continue;
    s->queued = 0;
    if (s->state != ZM_LEASE_LIVE || s->pending_delta_ms == 0)
      continue;
    if (err == 0) {
      /* a pending refresh the flushed lease covers becomes none */
      if (l->flying_ms[i] > s->lease_expires_ms)
        zm_index_set_expires_ms(s, l->flying_ms[i]);
      if (s->pending_delta_ms != 0)
        queue_refresh(l, s, id); /* refreshed again meanwhile */
      continue;
    }
    if (l->stopping)
      continue; /* the store is closing: the refresh is lost (see README) */
    /* failed: the next flush carries it, still counted from its first try */
    s->queued = 1;
    idvec_push(&l->dirty, id);
  }
  idvec_clear(&l->flying);
  free(l->flying_ms);
  l->flying_ms = NULL;
  life_dec(l);
}

static void flush_now(zm_life_t *l) {
  if (l->flying.n != 0 || l->flying_ms != NULL || l->dirty.n == 0)
    return;
  idvec_t v = l->dirty;
  l->dirty = l->flying;
  l->flying = v;
  l->flying_ms = zm_xcalloc(l->flying.n + 1, sizeof *l->flying_ms);
  size_t k = 0;
  for (size_t i = 0; i < l->flying.n; i++) {
    char *id = l->flying.ids[i];
    zm_index_service_t *s = zm_index_lookup_service(l->index, id, strlen(id));
    if (s == NULL || s->state != ZM_LEASE_LIVE || s->pending_delta_ms == 0) {
      if (s != NULL)
        s->queued = 0;
      free(id);
      continue;
    }
    l->flying.ids[k] = id;
    l->flying_ms[k++] = zm_index_pending_ms(s);
  }
  l->flying.n = k;
  if (k == 0) {
    free(l->flying_ms);
    l->flying_ms = NULL;
    return;
  }
  zm_store_op_t op = {.kind = ZM_STORE_FLUSH_LEASES,
                      .ids = (const char *const *)l->flying.ids,
                      .mss = l->flying_ms,
                      .n = k};
  l->inflight++;
  zm_store_submit(l->store, &op, 1, on_flushed, l);
}

static void on_flush_timer(uv_timer_t *t) { flush_now(t->data); }

/* ---- ExtendIdentityLease ---------------------------------------------------
 */

typedef struct {
  zm_life_t *l;
  zm_life_cb cb;
  void *data;
  int64_t ms;
  char id[];
} extend_t;

static void on_extended(int err, void *data) {
  extend_t *x = data;
  zm_life_t *l = x->l;
  store_answered(l, err);
  zm_index_service_t *s =
      zm_index_lookup_service(l->index, x->id, strlen(x->id));
  if (err == 0) {
    if (s == NULL)
      s = zm_index_put_service(l->index, x->id, strlen(x->id), x->ms);
    /* a pending refresh at or below the new durable lease becomes none (a
     * queued id then leaves the flush list without a write) */
    if (s->state == ZM_LEASE_LIVE && x->ms > s->lease_expires_ms)
      zm_index_set_expires_ms(s, x->ms);
  } else if (err == ZM_E_NOT_FOUND) {
    /* the store is the truth: no live record */
    /* (ids on the flush lists are looked up again: removing is safe) */
    if (s != NULL)
      zm_index_del_service(l->index, x->id, strlen(x->id));
  } else {
    err = ZM_E_UNAVAILABLE;
  }
  x->cb(err, x->data);
  free(x);
  life_dec(l);
}

int zm_life_extend(zm_life_t *l, const char *id, zm_life_cb cb, void *data) {
  if (l->stopping || !store_ok(l))
    return ZM_E_UNAVAILABLE; /* never NOT_FOUND from a store we cannot ask */
  size_t len = strlen(id);
  zm_index_service_t *s = zm_index_lookup_service(l->index, id, len);
  if (s != NULL && s->state == ZM_LEASE_DELETING)
    return ZM_E_NOT_FOUND;
  int64_t now = zm_life_now(l);
  int64_t lease = now + (int64_t)l->cfg.lease_ttl_ms;
  /* Fast path: the durable lease runs for at least the margin more, and no
   * process collects before durable lease + margin: the identity cannot be
   * collected before this refresh is flushed, however slow the flush, nor
   * (if this process dies first) before the pod's next refresh finds the
   * durable lease still running. The index keeps a pending refresh as a
   * 32-bit distance past the durable lease: one further ahead (possible only
   * with a TTL above ~49 days) takes the durable path, right for any lease. */
  /* Shared: the remembered lease is vouched for only by a recent change
   * poll (a collection by another replica evicts it). */
  int fresh = !l->shared || mono_ms() - l->changes_ok_mono < CHANGES_STALE_MS;
  if (s != NULL && fresh &&
      s->lease_expires_ms > now + (int64_t)zm_life_margin_ms(l) &&
      lease - s->lease_expires_ms <= (int64_t)UINT32_MAX) {
    if (lease > zm_index_pending_ms(s))
      zm_index_set_pending_ms(s, lease);
    queue_refresh(l, s, id);
    l->stats.extend_fast++;
    return 0;
  }
  if (s == NULL && !l->shared)
    return ZM_E_NOT_FOUND; /* the index holds every record of this store */
  /* Durable path: the lease ran out (maybe collected meanwhile), or another
   * replica holds the record: the store decides, atomically against
   * collection. */
  extend_t *x = zm_xmalloc(sizeof *x + len + 1);
  x->l = l;
  x->cb = cb;
  x->data = data;
  x->ms = lease;
  memcpy(x->id, id, len + 1);
  zm_store_op_t op = {.kind = ZM_STORE_EXTEND_LEASE, .id = x->id, .ms = lease};
  l->inflight++;
  l->stats.extend_durable++;
  zm_store_submit(l->store, &op, 1, on_extended, x);
  return 1;
}

typedef struct {
  zm_life_t *l;
  zm_life_cb cb;
  void *data;
  char id[];
} probe_t;

static void on_probed(int err, void *data) {
  probe_t *p = data;
  zm_life_t *l = p->l;
  store_answered(l, err);
  p->cb(err == 0 || err == ZM_E_NOT_FOUND ? err : ZM_E_UNAVAILABLE, p->data);
  free(p);
  life_dec(l);
}

int zm_life_is_service(zm_life_t *l, const char *id, zm_life_cb cb,
                       void *data) {
  size_t len = strlen(id);
  if (zm_index_lookup_service(l->index, id, len) != NULL)
    return 1;
  if (!l->shared)
    return 0; /* the index holds every record of this store */
  /* The record may be another replica's. The probe is the guarded lease
   * update with a lease in the past: it changes nothing, and says whether
   * the row is there. */
  probe_t *p = zm_xmalloc(sizeof *p + len + 1);
  p->l = l;
  p->cb = cb;
  p->data = data;
  memcpy(p->id, id, len + 1);
  zm_store_op_t op = {.kind = ZM_STORE_EXTEND_LEASE, .id = p->id, .ms = 0};
  l->inflight++;
  zm_store_submit(l->store, &op, 1, on_probed, p);
  return -1;
}

/* ===================== mappings: cache + invalidation ==================== */

int zm_life_cached_managed(zm_life_t *l, const char *id,
                           zm_index_managed_t *out) {
  if (l->shared && mono_ms() - l->changes_ok_mono >= CHANGES_STALE_MS)
    return 0; /* cannot vouch for the cache: ask the store */
  return zm_index_get_managed(l->index, id, strlen(id), out);
}

typedef struct {
  zm_life_t *l;
  zm_life_managed_cb cb;
  void *data;
  uint64_t epoch;
} fetch_t;

static void on_fetched(int err, const zm_managed_row_t *rows, size_t n,
                       void *data) {
  fetch_t *f = data;
  zm_life_t *l = f->l;
  if (err != 0) {
    f->cb(ZM_E_UNAVAILABLE, NULL, f->data);
  } else if (n == 0) {
    f->cb(ZM_E_NOT_FOUND, NULL, f->data);
  } else {
    const zm_managed_row_t *r = &rows[0];
    /* the row's strings live until this callback returns: answer from them */
    zm_index_managed_t m = {.identity_id = r->identity_id,
                            .identity_id_len = strlen(r->identity_id),
                            .identity_type = r->identity_type,
                            .workload_id = r->workload_id,
                            .agent_id = r->agent_id,
                            .environment_id = r->environment_id};
    /* Cache only if no eviction ran while the read was in flight: it may
     * have been about this very row. */
    if (f->epoch == l->epoch) {
      zm_index_extra_t x = {r->workload_id, r->agent_id, r->environment_id};
      zm_index_put_managed_ext(l->index, r->ziti_identity_id,
                               strlen(r->ziti_identity_id), r->identity_id,
                               m.identity_id_len, r->identity_type, &x);
    }
    f->cb(0, &m, f->data);
  }
  free(f);
  life_dec(l);
}

void zm_life_fetch_managed(zm_life_t *l, const char *id, zm_life_managed_cb cb,
                           void *data) {
  fetch_t *f = zm_xmalloc(sizeof *f);
  f->l = l;
  f->cb = cb;
  f->data = data;
  f->epoch = l->epoch;
  l->inflight++;
  zm_store_get_managed(l->store, id, on_fetched, f);
}

static int seen_has(const zm_life_t *l, int64_t seq) {
  for (size_t i = 0; i < l->n_seen; i++)
    if (l->seen[i].seq == seq)
      return 1;
  return 0;
}

static void on_changes(int err, const int64_t *seqs, const char *const *ids,
                       size_t n, void *data) {
  zm_life_t *l = data;
  l->changes_inflight = 0;
  if (err != 0) {
    ZM_DEBUG("lifecycle: change poll failed: %s", zm_strerror(err));
    life_dec(l);
    return;
  }
  uint64_t m = mono_ms();
  /* forget seqs that left the lookback window */
  size_t k = 0;
  for (size_t i = 0; i < l->n_seen; i++)
    if (m - l->seen[i].seen_mono < 2 * CHANGES_LOOKBACK_MS)
      l->seen[k++] = l->seen[i];
  l->n_seen = k;
  if (n >= CHANGES_BATCH) {
    /* more changes than one read tracks: drop the whole cache rather than
     * miss one; mappings come back from the store as they are asked for */
    ZM_WARN("lifecycle: %zu+ mapping changes in the window: cache dropped", n);
    zm_index_clear_managed(l->index);
    l->epoch++;
    l->n_seen = 0;
    n = 0;
  }
  for (size_t i = 0; i < n; i++) {
    if (l->changes_seq == INT64_MAX || seqs[i] > l->changes_seq)
      l->changes_seq = seqs[i];
    if (seen_has(l, seqs[i]))
      continue;
    if (l->n_seen == l->cap_seen) {
      l->cap_seen = l->cap_seen ? l->cap_seen * 2 : 64;
      l->seen = zm_xrealloc(l->seen, l->cap_seen * sizeof *l->seen);
    }
    l->seen[l->n_seen++] = (seen_t){seqs[i], m};
    size_t len = strlen(ids[i]);
    if (zm_index_del_managed(l->index, ids[i], len))
      l->stats.evicted++;
    /* A service lease another replica collected: the durable lease this
     * replica remembers (and a late flush of its own, which skips the
     * missing row) must not answer OK for it; without the entry the next
     * refresh asks the store, which answers NOT_FOUND. One this replica is
     * deleting keeps its DELETING state. */
    zm_index_service_t *s = zm_index_lookup_service(l->index, ids[i], len);
    if (s != NULL && s->state == ZM_LEASE_LIVE) {
      zm_index_del_service(l->index, ids[i], len);
      l->stats.evicted++;
    }
    l->epoch++;
  }
  l->changes_ok_mono = m;
  l->changes_ok_store = l->changes_sent_store;
  life_dec(l);
}

static void on_changes_timer(uv_timer_t *t) {
  zm_life_t *l = t->data;
  if (l->changes_inflight || l->last_beat_ok == 0)
    return;
  l->changes_inflight = 1;
  l->inflight++;
  l->changes_sent_store = zm_life_now(l);
  zm_store_changes(l->store, l->changes_seq,
                   l->changes_ok_store - CHANGES_LOOKBACK_MS, CHANGES_BATCH,
                   on_changes, l);
}

/* ===================== transitions ======================================= */

typedef struct {
  zm_life_t *l;
  zm_life_cb cb;
  void *data;
  zm_life_transition_t t;
  int attempts;
  int err; /* the delete's failure, reported after DEFER */
  /* what the index learns after the commit */
  int kind; /* 0 none, 1 service, 2 managed */
  int type;
  int64_t lease;
  char *id;
  char *identity_id;
  char *workload_id, *agent_id, *environment_id; /* commit_managed */
  int tomb_kind; /* what the DELETE is sent for (ZM_TOMB_*) */
} unit_t;

static unit_t *unit_new(zm_life_t *l, zm_life_transition_t t, zm_life_cb cb,
                        void *data) {
  unit_t *u = zm_xcalloc(1, sizeof *u);
  u->l = l;
  u->t = t;
  u->cb = cb;
  u->data = data;
  l->inflight++;
  return u;
}

static void unit_done(unit_t *u, int err) {
  zm_life_t *l = u->l;
  if (u->cb != NULL)
    u->cb(err, u->data);
  free(u->id);
  free(u->identity_id);
  free(u->workload_id);
  free(u->agent_id);
  free(u->environment_id);
  free(u);
  life_dec(l);
}

static void on_unit(int err, void *data) {
  unit_t *u = data;
  if (err == 0) {
    trace(u->t, u->id ? u->id : "pending");
    if (u->kind == 1)
      zm_index_put_service(u->l->index, u->id, strlen(u->id), u->lease);
    else if (u->kind == 2) {
      zm_index_extra_t x = {u->workload_id, u->agent_id, u->environment_id};
      zm_index_put_managed_ext(u->l->index, u->id, strlen(u->id),
                               u->identity_id, strlen(u->identity_id), u->type,
                               &x);
    }
  }
  unit_done(u, err);
}

void zm_life_intent(zm_life_t *l, zm_pending_row_t *row, uint64_t deadline_mono,
                    zm_life_cb cb, void *data) {
  int64_t now = zm_life_now(l);
  uint64_t left =
      deadline_mono > uv_now(l->loop) ? deadline_mono - uv_now(l->loop) : 0;
  row->created_at_ms = now;
  /* The create is sent before the deadline and the client gives up on it
   * by then; a controller still working on it finishes within its own
   * request timeout (taken as ZITI_REQUEST_TIMEOUT) plus the margin. */
  row->resolve_after_ms = now + (int64_t)left +
                          (int64_t)l->cfg.ziti_timeout_ms +
                          (int64_t)zm_life_margin_ms(l);
  unit_t *u = unit_new(l, ZM_LIFE_T_INTENT, cb, data);
  zm_store_op_t op = {.kind = ZM_STORE_PUT_PENDING, .pending = *row};
  zm_store_submit(l->store, &op, 1, on_unit, u);
}

void zm_life_commit_service(zm_life_t *l, const char *name, const char *id,
                            int service_type, zm_life_cb cb, void *data) {
  int64_t now = zm_life_now(l);
  unit_t *u = unit_new(l, ZM_LIFE_T_COMMIT, cb, data);
  u->kind = 1;
  u->type = service_type;
  u->lease = now + (int64_t)l->cfg.lease_ttl_ms;
  u->id = zm_xstrdup(id);
  zm_store_op_t ops[2] = {
      {.kind = ZM_STORE_PUT_SERVICE,
       .service = {.ziti_identity_id = id,
                   .service_type = service_type,
                   .lease_expires_ms = u->lease,
                   .created_at_ms = now}},
      {.kind = ZM_STORE_TAKE_PENDING, .name = name},
  };
  zm_store_submit(l->store, ops, 2, on_unit, u);
}

void zm_life_commit_managed(zm_life_t *l, const char *name,
                            const zm_managed_row_t *row, zm_life_cb cb,
                            void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_COMMIT, cb, data);
  u->kind = 2;
  u->type = row->identity_type;
  u->id = zm_xstrdup(row->ziti_identity_id);
  u->identity_id = zm_xstrdup(row->identity_id);
  u->workload_id = row->workload_id ? zm_xstrdup(row->workload_id) : NULL;
  u->agent_id = row->agent_id ? zm_xstrdup(row->agent_id) : NULL;
  u->environment_id =
      row->environment_id ? zm_xstrdup(row->environment_id) : NULL;
  /* TAKE: if recovery resolved the creation meanwhile (a commit later than
   * every bound), the unit fails instead of recording a doomed identity */
  zm_store_op_t ops[2] = {
      {.kind = ZM_STORE_PUT_MANAGED, .managed = *row},
      {.kind = ZM_STORE_TAKE_PENDING, .name = name},
  };
  ops[0].managed.created_at_ms = zm_life_now(l);
  zm_store_submit(l->store, ops, 2, on_unit, u);
}

void zm_life_abandon(zm_life_t *l, const char *name, zm_life_cb cb,
                     void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_ABANDON, cb, data);
  zm_store_op_t op = {.kind = ZM_STORE_DEL_PENDING, .name = name};
  zm_store_submit(l->store, &op, 1, on_unit, u);
}

/* ---- DELETING -> GONE --------------------------------------------------- */

static int64_t claim_until(const zm_life_t *l) {
  return zm_life_now(l) + (int64_t)l->cfg.ziti_timeout_ms +
         (int64_t)zm_life_margin_ms(l);
}

static void on_buried(int err, void *data) {
  unit_t *u = data;
  if (err != 0)
    ZM_WARN("lifecycle: %s is gone on the controller, but its tombstone "
            "stays (%s): a later retry finds it gone (404) and removes it",
            u->id, zm_strerror(err));
  else
    trace(ZM_LIFE_T_BURY, u->id);
  zm_index_service_t *s =
      zm_index_lookup_service(u->l->index, u->id, strlen(u->id));
  if (s != NULL && s->state == ZM_LEASE_DELETING)
    zm_index_del_service(u->l->index, u->id, strlen(u->id));
  u->l->stats.deleted++;
  unit_done(u, 0);
}

static void on_deferred(int err, void *data) {
  unit_t *u = data;
  if (err != 0)
    ZM_WARN("lifecycle: cannot record the failed delete of %s: %s; its "
            "claim runs out and it is retried",
            u->id, zm_strerror(err));
  u->l->stats.delete_deferred++;
  unit_done(u, u->err);
}

static void on_ctrl_deleted(const zm_ziti_result_t *r, void *data) {
  unit_t *u = data;
  zm_life_t *l = u->l;
  if (r->err == 0) {
    /* 2xx, or 404: gone either way */
    ZM_DEBUG("lifecycle: deleted %s on the controller%s", u->id,
             r->gone ? " (already gone)" : "");
    zm_audit("identity_deleted", "id", u->id, "controller",
             r->gone ? "already gone (404)" : "deleted", NULL);
    u->t = ZM_LIFE_T_BURY;
    zm_store_op_t op = {.kind = ZM_STORE_DEL_TOMB, .id = u->id};
    zm_store_submit(l->store, &op, 1, on_buried, u);
    return;
  }
  uint64_t delay = zm_life_backoff_ms(u->attempts);
  ZM_WARN("lifecycle: delete %s failed: %s; stays DELETING, retried in %llu "
          "ms",
          u->id, zm_strerror(r->err), (unsigned long long)delay);
  u->t = ZM_LIFE_T_DEFER;
  u->err = r->err;
  zm_audit("identity_delete_deferred", "id", u->id, "error",
           zm_strerror(r->err), NULL);
  zm_store_op_t op = {.kind = ZM_STORE_DEFER_TOMB,
                      .id = u->id,
                      .ms = zm_life_now(l) + (int64_t)delay};
  zm_store_submit(l->store, &op, 1, on_deferred, u);
}

static void send_delete(unit_t *u) {
  zm_life_t *l = u->l;
  if (l->ziti == NULL) {
    zm_ziti_result_t r = {.err = ZM_E_UNAVAILABLE};
    on_ctrl_deleted(&r, u);
    return;
  }
  uint64_t deadline = uv_now(l->loop) + l->cfg.ziti_timeout_ms;
  const char *coll = u->tomb_kind == ZM_TOMB_ZSERVICE  ? "services"
                     : u->tomb_kind == ZM_TOMB_ZCONFIG ? "configs"
                     : u->tomb_kind == ZM_TOMB_ZPOLICY ? "service-policies"
                                                       : NULL;
  if (coll == NULL) {
    zm_ziti_delete_identity(l->ziti, u->id, deadline, on_ctrl_deleted, u);
    return;
  }
  char *path = zm_ziti_path(coll, u->id, NULL);
  zm_ziti_call(l->ziti, "DELETE", path, NULL, deadline, on_ctrl_deleted, u);
  free(path);
}

void zm_life_delete_kind(zm_life_t *l, const char *id, int tomb_kind,
                         int attempts, zm_life_cb cb, void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_BURY, cb, data);
  u->id = zm_xstrdup(id);
  u->attempts = attempts;
  u->tomb_kind = tomb_kind;
  send_delete(u);
}

void zm_life_delete(zm_life_t *l, const char *id, int attempts, zm_life_cb cb,
                    void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_BURY, cb, data);
  u->id = zm_xstrdup(id);
  u->attempts = attempts;
  send_delete(u);
}

/* ---- PENDING -> DELETING, LIVE -> DELETING --------------------------------
 */

static void on_tombstoned(int err, void *data) {
  unit_t *u = data;
  if (err != 0) {
    /* nothing changed durably: no DELETE may be sent */
    unit_done(u, err);
    return;
  }
  trace(u->t, u->id);
  zm_audit(u->t == ZM_LIFE_T_CONDEMN ? "identity_condemned"
                                     : "identity_retired",
           "id", u->id, "was", u->kind == 2 ? "managed" : "pending", NULL);
  if (u->kind == 2) {
    if (zm_index_del_managed(u->l->index, u->id, strlen(u->id)))
      u->l->epoch++;
  }
  u->t = ZM_LIFE_T_BURY;
  u->attempts = 0;
  send_delete(u);
}

void zm_life_condemn(zm_life_t *l, const char *name, const char *id, int type,
                     zm_life_cb cb, void *data) {
  zm_life_condemn_kind(l, name, id, ZM_TOMB_ORPHAN, type, cb, data);
}

void zm_life_condemn_kind(zm_life_t *l, const char *name, const char *id,
                          int tomb_kind, int type, zm_life_cb cb, void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_CONDEMN, cb, data);
  u->id = zm_xstrdup(id);
  u->tomb_kind = tomb_kind;
  int64_t now = zm_life_now(l);
  /* TAKE, not DEL: PENDING -> DELETING only from PENDING. Without the row
   * the create was recorded after all (a COMMIT whose answer was lost, or a
   * late one) or recovery owns it: the unit fails and nothing is deleted,
   * where a DELETE would leave a recorded identity that is gone. */
  zm_store_op_t ops[2] = {
      {.kind = ZM_STORE_PUT_TOMB,
       .tomb = {.ziti_identity_id = id,
                .kind = tomb_kind,
                .type = type,
                .next_try_ms = now,
                .created_at_ms = now},
       .ms = claim_until(l)},
      {.kind = ZM_STORE_TAKE_PENDING, .name = name},
  };
  zm_store_submit(l->store, ops, name != NULL ? 2 : 1, on_tombstoned, u);
}

void zm_life_retire_managed(zm_life_t *l, const char *id, zm_life_cb cb,
                            void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_RETIRE, cb, data);
  u->id = zm_xstrdup(id);
  u->kind = 2;
  int64_t now = zm_life_now(l);
  zm_store_op_t op = {.kind = ZM_STORE_RETIRE_MANAGED,
                      .id = id,
                      .tomb = {.ziti_identity_id = id,
                               .kind = ZM_TOMB_MANAGED,
                               .next_try_ms = now,
                               .created_at_ms = now},
                      .ms = claim_until(l)};
  zm_store_submit(l->store, &op, 1, on_tombstoned, u);
}

void zm_life_arm(zm_life_t *l, const zm_pending_row_t *row, zm_life_cb cb,
                 void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_ARM, cb, data);
  /* TAKE: if recovery dropped the unarmed row meanwhile, nothing is armed
   * (and no create may be sent) */
  zm_store_op_t ops[2] = {
      {.kind = ZM_STORE_TAKE_PENDING, .name = row->name},
      {.kind = ZM_STORE_PUT_PENDING, .pending = *row},
  };
  zm_store_submit(l->store, ops, 2, on_unit, u);
}

void zm_life_handover(zm_life_t *l, const char *name, zm_life_cb cb,
                      void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_HANDOVER, cb, data);
  /* TAKE: recovery resolved (deleted) it meanwhile -> the unit fails */
  zm_store_op_t op = {.kind = ZM_STORE_TAKE_PENDING, .name = name};
  zm_store_submit(l->store, &op, 1, on_unit, u);
}

void zm_life_tomb(zm_life_t *l, size_t n, const char *const *ids,
                  const int *kinds, zm_life_cb cb, void *data) {
  unit_t *u = unit_new(l, ZM_LIFE_T_TOMB, cb, data);
  int64_t now = zm_life_now(l);
  zm_store_op_t *ops = zm_xcalloc(n + 1, sizeof *ops);
  for (size_t i = 0; i < n; i++) {
    ops[i].kind = ZM_STORE_PUT_TOMB;
    ops[i].tomb = (zm_tomb_row_t){.ziti_identity_id = ids[i],
                                  .kind = kinds[i],
                                  .next_try_ms = now,
                                  .created_at_ms = now};
    ops[i].ms = claim_until(l);
  }
  zm_store_submit(l->store, ops, n, on_unit, u);
  free(ops);
}

void zm_life_forget_service(zm_life_t *l, const char *id) {
  zm_index_service_t *s = zm_index_lookup_service(l->index, id, strlen(id));
  if (s != NULL) {
    trace(ZM_LIFE_T_RETIRE, id);
    s->state = ZM_LEASE_DELETING;
    s->pending_delta_ms = 0;
  }
}

/* ===================== setup ============================================= */

zm_life_t *zm_life_new(uv_loop_t *loop, zm_store_t *store, zm_index_t *index,
                       zm_ziti_t *ziti, const zm_life_config_t *cfg) {
  zm_life_t *l = zm_xcalloc(1, sizeof *l);
  l->loop = loop;
  l->store = store;
  l->index = index;
  l->ziti = ziti;
  l->cfg = *cfg;
  if (l->cfg.flush_ms == 0)
    l->cfg.flush_ms = 1; /* "0" = as often as the loop allows */
  l->shared = zm_store_shared(store);
  l->changes_seq = INT64_MAX;
  uv_timer_init(loop, &l->beat_timer);
  uv_timer_init(loop, &l->flush_timer);
  l->beat_timer.data = l->flush_timer.data = l;
  if (l->shared) {
    uv_timer_init(loop, &l->changes_timer);
    l->changes_timer.data = l;
  }
  return l;
}

void zm_life_start(zm_life_t *l, void (*on_ready)(void *), void *data) {
  l->on_ready = on_ready;
  l->ready_data = data;
  uv_timer_start(&l->beat_timer, on_beat_timer, 0, BEAT_MS);
  uv_timer_start(&l->flush_timer, on_flush_timer, l->cfg.flush_ms,
                 l->cfg.flush_ms);
  if (l->shared)
    uv_timer_start(&l->changes_timer, on_changes_timer, CHANGES_MS, CHANGES_MS);
}

static void maybe_stopped(zm_life_t *l) {
  if (!l->stopping || l->stop_done == NULL)
    return;
  if (l->closed_handles != (l->shared ? 3 : 2))
    return;
  if (l->dirty.n != 0) {
    flush_now(l); /* the last refreshes, before the store closes */
    return;
  }
  if (l->inflight != 0 || l->flying_ms != NULL)
    return;
  void (*done)(void *) = l->stop_done;
  l->stop_done = NULL;
  done(l->stop_data);
}

static void on_closed(uv_handle_t *h) {
  zm_life_t *l = h->data;
  l->closed_handles++;
  maybe_stopped(l);
}

void zm_life_stop(zm_life_t *l, void (*done)(void *), void *data) {
  l->stopping = 1;
  l->stop_done = done;
  l->stop_data = data;
  uv_close((uv_handle_t *)&l->beat_timer, on_closed);
  uv_close((uv_handle_t *)&l->flush_timer, on_closed);
  if (l->shared)
    uv_close((uv_handle_t *)&l->changes_timer, on_closed);
}

void zm_life_free(zm_life_t *l) {
  idvec_free(&l->dirty);
  idvec_free(&l->flying);
  free(l->flying_ms);
  free(l->seen);
  free(l);
}
