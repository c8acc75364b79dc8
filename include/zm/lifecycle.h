/*
 * lifecycle.h - the one owner of every identity's durable state.
 *
 *   NONE --intent--> PENDING --commit--> LIVE --retire--> DELETING --> GONE
 *                      |  \--abandon (nothing was created)------------^
 *                      \----condemn (created, must go)--> DELETING
 *   DELETING --defer (ambiguous answer)--> DELETING (retried with backoff)
 *
 * PENDING is a pending_identities row, LIVE a service_identities lease or a
 * managed_identities mapping, DELETING a deleting_identities tombstone. Each
 * state that guards a controller call is durable before that call is sent:
 * a create only after its PENDING row committed, a DELETE only after its
 * tombstone committed. A delete is finished (GONE) only by a 2xx or a 404;
 * anything else defers the tombstone, which some process retries later,
 * across restarts. The in-memory index is a cache of the store: it learns a
 * state only after the store made it durable. The one exception is the
 * lease refresh (ExtendIdentityLease), which is memory-first: refreshed
 * leases reach the store in one batch per LEASE_FLUSH_INTERVAL; the
 * collection margin and the outage rule below make that safe.
 *
 * The store clock: times compared in the store are the store's own (the
 * database's clock with PostgreSQL), carried forward between heartbeats by
 * the monotonic clock, so a step of this host's wall clock changes nothing.
 *
 * Outage rule: a heartbeat every second records in the store that a process
 * is up. When a beat finds the previous beat of every process older than
 * OUTAGE_GAP (no replica was up: stopped, suspended, partitioned from the
 * database, or the store clock stepped), resumed_at = now. A lease is
 * collected only when  max(lease_expires_at, resumed_at + TTL) + MARGIN <=
 * now: no lease expires because the service or its database was down.
 */
#ifndef ZM_LIFECYCLE_H
#define ZM_LIFECYCLE_H

#include "zm/index.h"
#include "zm/store.h"
#include "zm/ziti.h"

#include <stdint.h>
#include <uv.h>

typedef struct zm_life zm_life_t;

typedef enum {
  ZM_LIFE_NONE,
  ZM_LIFE_PENDING,
  ZM_LIFE_LIVE,
  ZM_LIFE_DELETING,
  ZM_LIFE_GONE,
  ZM_LIFE__COUNT
} zm_life_state_t;

/* The transitions, each one durable store unit. */
typedef enum {
  ZM_LIFE_T_INTENT,   /* NONE -> PENDING */
  ZM_LIFE_T_COMMIT,   /* PENDING -> LIVE */
  ZM_LIFE_T_ABANDON,  /* PENDING -> GONE (nothing was created) */
  ZM_LIFE_T_CONDEMN,  /* PENDING -> DELETING (created; must be deleted) */
  ZM_LIFE_T_RETIRE,   /* LIVE -> DELETING (collected, deleted, replaced) */
  ZM_LIFE_T_BURY,     /* DELETING -> GONE (2xx or 404 from the controller) */
  ZM_LIFE_T_DEFER,    /* DELETING -> DELETING (ambiguous; retry later) */
  ZM_LIFE_T_ARM,      /* PENDING -> PENDING (name proved absent: may create) */
  ZM_LIFE_T_HANDOVER, /* PENDING -> GONE (created; recorded by its caller:
                         devices, tunnels, services, configs, policies) */
  ZM_LIFE_T_TOMB,     /* NONE -> DELETING (a delete the caller asked for) */
  ZM_LIFE_T__COUNT
} zm_life_transition_t;

/* 1 if transition t leads from state a; its target in *to. */
int zm_life_edge(zm_life_state_t a, zm_life_transition_t t,
                 zm_life_state_t *to);
const char *zm_life_state_name(zm_life_state_t s);

typedef struct {
  uint64_t lease_ttl_ms;
  uint64_t flush_ms;        /* LEASE_FLUSH_INTERVAL */
  uint64_t ziti_timeout_ms; /* bound of one controller call */
} zm_life_config_t;

typedef struct {
  uint64_t extend_fast, extend_durable, flushes, flushed_leases, flush_failures;
  uint64_t beats, beat_failures, outages_detected;
  uint64_t deleted, delete_deferred, evicted;
} zm_life_stats_t;

zm_life_t *zm_life_new(uv_loop_t *loop, zm_store_t *store, zm_index_t *index,
                       zm_ziti_t *ziti, const zm_life_config_t *cfg);
/* Starts the heartbeat, the lease flusher and (shared store) the change
 * poller. on_ready(data) runs once, after the first heartbeat committed. */
void zm_life_start(zm_life_t *l, void (*on_ready)(void *), void *data);
/* Flushes pending lease refreshes, stops the timers; done(data) after. */
void zm_life_stop(zm_life_t *l, void (*done)(void *), void *data);
void zm_life_free(zm_life_t *l);
const zm_life_stats_t *zm_life_stats(const zm_life_t *l);

/* ---- clock ---------------------------------------------------------------
 */
/* The store clock's now (wall ms). */
int64_t zm_life_now(const zm_life_t *l);
/* The collection cut: leases <= the result may be collected now; INT64_MIN
 * while the outage rule (or a missing heartbeat) forbids any collection. */
int64_t zm_life_collect_cut(const zm_life_t *l);
/* 1 when decisions that depend on elapsed time (pending recovery) may be
 * made: the heartbeat is fresh and the last resume is older than min_ms. */
int zm_life_settled(const zm_life_t *l, uint64_t min_ms);
/* Margin added to every time-based decision: the flush lag bound plus
 * heartbeat jitter. */
uint64_t zm_life_margin_ms(const zm_life_t *l);

/* ---- hot paths -------------------------------------------------------------
 */
/* ExtendIdentityLease. Returns 0 (OK, answered from memory), ZM_E_NOT_FOUND,
 * ZM_E_UNAVAILABLE, or 1: the answer comes later through cb (0,
 * ZM_E_NOT_FOUND or ZM_E_UNAVAILABLE) after a durable extension. */
typedef void (*zm_life_cb)(int err, void *data);
int zm_life_extend(zm_life_t *l, const char *id, zm_life_cb cb, void *data);
/* Is id a service identity with a lease record (live or not yet collected)?
 * Returns 1 (yes), 0 (no) or, with a shared store whose record this
 * replica may not hold, -1: cb then gets 0 (yes), ZM_E_NOT_FOUND (no) or
 * ZM_E_UNAVAILABLE. */
int zm_life_is_service(zm_life_t *l, const char *id, zm_life_cb cb, void *data);

/* ResolveIdentity. 1 and *out filled from the cache, or 0. With a shared
 * store a 0 means "ask the store": zm_life_fetch_managed does, caching what
 * it finds; cb gets (0, entry) or (ZM_E_NOT_FOUND / ZM_E_UNAVAILABLE, NULL).
 */
int zm_life_cached_managed(zm_life_t *l, const char *id,
                           zm_index_managed_t *out);
int zm_life_read_through(const zm_life_t *l);
typedef void (*zm_life_managed_cb)(int err, const zm_index_managed_t *m,
                                   void *data);
void zm_life_fetch_managed(zm_life_t *l, const char *id, zm_life_managed_cb cb,
                           void *data);

/* ---- transitions ---------------------------------------------------------
 */
/* INTENT: records a pending row (row->created_at_ms and resolve_after_ms are
 * filled in here: no create sent before deadline_mono (uv_now ms) can land
 * after resolve_after). cb: 0, ZM_E_EXISTS (the agent has a creation in
 * flight) or ZM_E_STORE. */
void zm_life_intent(zm_life_t *l, zm_pending_row_t *row, uint64_t deadline_mono,
                    zm_life_cb cb, void *data);
/* COMMIT: the lease or mapping and the removal of the pending row, one unit;
 * the index learns it after the commit. */
void zm_life_commit_service(zm_life_t *l, const char *name, const char *id,
                            int service_type, zm_life_cb cb, void *data);
void zm_life_commit_managed(zm_life_t *l, const char *name,
                            const zm_managed_row_t *row, zm_life_cb cb,
                            void *data);
/* ABANDON: drops the pending row (no identity exists). */
void zm_life_abandon(zm_life_t *l, const char *name, zm_life_cb cb, void *data);
/* CONDEMN + delete: the pending row becomes a tombstone for id (one unit),
 * then the controller DELETE. name may be NULL (an orphan found without a
 * pending row: a tombstone only). cb: 0 when gone, else the delete's error
 * (the tombstone stays and is retried). */
void zm_life_condemn(zm_life_t *l, const char *name, const char *id, int type,
                     zm_life_cb cb, void *data);
/* RETIRE + delete of a managed identity (DeleteIdentity, agent replacement).
 * cb: 0 when gone; ZM_E_NOT_FOUND when there is no mapping; else the error
 * (the mapping is gone already; the tombstone is retried). */
void zm_life_retire_managed(zm_life_t *l, const char *id, zm_life_cb cb,
                            void *data);
/* ARM: the pending row becomes row (same name, its armed kind) in one
 * unit. cb: 0 or the store error. */
void zm_life_arm(zm_life_t *l, const zm_pending_row_t *row, zm_life_cb cb,
                 void *data);
/* HANDOVER: drops the pending row of a creation that succeeded and that its
 * caller records (no row of ours). */
void zm_life_handover(zm_life_t *l, const char *name, zm_life_cb cb,
                      void *data);
/* CONDEMN of a controller object (tomb_kind ZM_TOMB_Z*, or ZM_TOMB_ORPHAN
 * for an identity), then its DELETE; name as for zm_life_condemn. */
void zm_life_condemn_kind(zm_life_t *l, const char *name, const char *id,
                          int tomb_kind, int type, zm_life_cb cb, void *data);
/* TOMB: n tombstones (ids[i] of kinds[i]) in one unit, claimed by this
 * process; cb(0) once durable, then the caller sends the DELETEs with
 * zm_life_delete_kind (a crash leaves them to recovery). */
void zm_life_tomb(zm_life_t *l, size_t n, const char *const *ids,
                  const int *kinds, zm_life_cb cb, void *data);
/* The controller DELETE of a tombstone of kind tomb_kind, then BURY or
 * DEFER. cb may be NULL. */
void zm_life_delete_kind(zm_life_t *l, const char *id, int tomb_kind,
                         int attempts, zm_life_cb cb, void *data);
/* The controller DELETE of a tombstone this process holds, then BURY or
 * DEFER. cb may be NULL. */
void zm_life_delete(zm_life_t *l, const char *id, int attempts, zm_life_cb cb,
                    void *data);
/* The index learns that these service identities went LIVE -> DELETING. */
void zm_life_forget_service(zm_life_t *l, const char *id);
/* Backoff before retry number `attempts` + 1 of a deferred delete. */
uint64_t zm_life_backoff_ms(int attempts);
/* Calls in flight (deletes, durable extends, fetches). */
unsigned zm_life_inflight(const zm_life_t *l);

#endif /* ZM_LIFECYCLE_H */
