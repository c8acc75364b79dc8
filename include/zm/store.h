/*
 * store.h - the durable record of every identity ziti-management manages.
 *
 * One interface, two backends: SQLite (embedded, one process; the default)
 * and PostgreSQL (DATABASE_URL; several replicas share one database). The
 * caller never knows which one it talks to, except through
 * zm_store_shared(): a shared store can change under this process (another
 * replica), so in-memory copies of it are caches to be revalidated.
 *
 * Asynchronous completion: every write is a *unit* of one or more ops,
 * submitted with a callback. Units submitted close together are committed in
 * one transaction (group commit), each unit atomic on its own (a failing
 * unit does not undo the others); callbacks fire on the loop after the
 * transaction is durable, never inside the submitting call.
 *
 * Times are wall milliseconds since the epoch in the *store clock* (see
 * zm_store_heartbeat): every time compared in SQL is passed in by the
 * caller, so both backends decide the same way.
 *
 * Schema. The Go service's two tables, as its migrations leave them (the
 * PostgreSQL types are given; SQLite carries the same columns as TEXT /
 * INTEGER, times as "YYYY-MM-DD HH:MM:SS.mmm" UTC text):
 *   managed_identities(ziti_identity_id TEXT PK, identity_id UUID NOT NULL,
 *     identity_type SMALLINT NOT NULL, created_at TIMESTAMPTZ NOT NULL,
 *     ziti_service_id TEXT, workload_id UUID, agent_id UUID,
 *     environment_id UUID)                      + index on identity_id
 *   service_identities(ziti_identity_id TEXT PK, service_type SMALLINT NOT
 *     NULL, lease_expires_at TIMESTAMPTZ NOT NULL, created_at TIMESTAMPTZ NOT
 *     NULL)                                     + index on lease_expires_at
 * and this service's own (created by idempotent migrations of its own,
 * recorded in zm_schema_migrations; the Go service's schema_migrations is
 * never written):
 *   pending_identities(name TEXT PK, kind, type, ziti_identity_id,
 *     agent_id (unique among pending rows), created_at, resolve_after,
 *     claimed_until)                            -- state PENDING
 *   deleting_identities(ziti_identity_id TEXT PK, kind, type, attempts,
 *     next_try_at, claimed_until, created_at)   -- state DELETING
 *   identity_changes(seq, ziti_identity_id, changed_at)  -- invalidations
 *   service_clock(id = 1, last_beat, resumed_at)         -- outage rule
 */
#ifndef ZM_STORE_H
#define ZM_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct zm_store zm_store_t;

typedef struct {
  const char *path;   /* SQLite file (used when url is NULL) */
  int sync_full;      /* SQLite: 1 = fsync every group commit (power loss);
                         0 = durable against a process crash */
  const char *url;    /* DATABASE_URL (postgres://... or key=value); NULL or ""
                         = SQLite */
  unsigned pool_size; /* PostgreSQL connections (>= 2); 0 = default 4 */
  uint64_t connect_timeout_ms; /* PostgreSQL at open: keep retrying a
                                  connection that fails for this long
                                  (backoff 250 ms .. 5 s); 0 = one try */
  unsigned commit_spacing_ms;  /* SQLite: least time between the starts of
                                  two group commits; 0 = the default, 2 */
} zm_store_config_t;

typedef struct {
  const char *ziti_identity_id;
  const char *identity_id;
  int identity_type;     /* proto IdentityType number */
  int64_t created_at_ms; /* wall ms since epoch */
  /* NULL when not recorded */
  const char *ziti_service_id;
  const char *workload_id;
  const char *agent_id;
  const char *environment_id;
} zm_managed_row_t;

typedef struct {
  const char *ziti_identity_id;
  int service_type;         /* proto ServiceType number */
  int64_t lease_expires_ms; /* wall ms since epoch */
  int64_t created_at_ms;
} zm_service_row_t;

/* PENDING: a creation in progress on the controller (the saga's INTENT).
 * Identity kinds are resolved by recovery through a lookup of the
 * identity's (unique, generated) name. The *_CHECK kinds are intents whose
 * create is not sent yet: the name is the caller's, so it is first proved
 * absent, then the row is ARMed (replaced by its armed kind in one unit);
 * recovery drops an unarmed row without a lookup (nothing was sent) and
 * deletes what an armed row's name finds (nothing else can carry it: a
 * second intent for the same name is refused while this row exists).
 * Object kinds are named "service:<name>" / "policy:<name>" /
 * "config:<service id>:<config name>". */
enum {
  ZM_PENDING_SERVICE = 1,  /* service identity (RequestServiceIdentity) */
  ZM_PENDING_AGENT = 2,    /* managed identity: agent, sandbox, app, runner */
  ZM_PENDING_HANDOVER = 3, /* identity kept by its caller: tunnel */
  ZM_PENDING_DEVICE_CHECK = 4, /* device (caller's name), not armed yet */
  ZM_PENDING_DEVICE = 5,       /* device, armed */
  ZM_PENDING_ZSERVICE_CHECK = 6,
  ZM_PENDING_ZSERVICE = 7, /* a service + its "<name>-host-v1" /
                              "<name>-intercept-v1" configs */
  ZM_PENDING_ZPOLICY_CHECK = 8,
  ZM_PENDING_ZPOLICY = 9,
  ZM_PENDING_ZCONFIG_CHECK = 10,
  ZM_PENDING_ZCONFIG = 11 /* a config UpdateService attaches */
};
typedef struct {
  const char *name;             /* controller identity name, unique */
  int kind;                     /* ZM_PENDING_* */
  int type;                     /* service type or identity type */
  const char *ziti_identity_id; /* NULL until the controller answered */
  const char *agent_id;         /* ZM_PENDING_AGENT: the agent; else NULL */
  int64_t created_at_ms;
  /* No create sent for this intent can land on the controller after this:
   * recovery may conclude from a lookup only from then on. */
  int64_t resolve_after_ms;
} zm_pending_row_t;

/* DELETING: the identity is being deleted on the controller. */
enum {
  ZM_TOMB_SERVICE = 1, /* was a service identity (lease collected) */
  ZM_TOMB_MANAGED = 2, /* was a managed identity (DeleteIdentity, replaced) */
  ZM_TOMB_ORPHAN = 3,  /* found on the controller without a record */
  /* controller objects (DELETE /services|configs|service-policies/{id}) */
  ZM_TOMB_ZSERVICE = 4,
  ZM_TOMB_ZCONFIG = 5,
  ZM_TOMB_ZPOLICY = 6
};
typedef struct {
  const char *ziti_identity_id;
  int kind; /* ZM_TOMB_* */
  int type; /* service type / identity type, 0 = unknown */
  int attempts;
  int64_t next_try_ms;
  int64_t created_at_ms;
} zm_tomb_row_t;

typedef enum {
  /* Insert or replace .managed; records a change of its id. */
  ZM_STORE_PUT_MANAGED = 1,
  /* Insert or replace .service. */
  ZM_STORE_PUT_SERVICE,
  /* lease_expires_at = max(current, .ms) of .id; no row -> ZM_E_NOT_FOUND. */
  ZM_STORE_EXTEND_LEASE,
  /* The same for .n ids at once (.ids[i] to .mss[i]); missing rows are
   * skipped without error. The batched, memory-first lease refresh. */
  ZM_STORE_FLUSH_LEASES,
  /* Insert .pending; a duplicate name, or a second pending row for the same
   * agent_id -> ZM_E_EXISTS. */
  ZM_STORE_PUT_PENDING,
  /* ziti_identity_id of pending .name = .id; no row -> ZM_E_NOT_FOUND. */
  ZM_STORE_SET_PENDING_ID,
  /* Delete pending .name; no row = ok. */
  ZM_STORE_DEL_PENDING,
  /* Delete pending .name; no row -> ZM_E_NOT_FOUND (someone else, i.e.
   * recovery, resolved the creation: the unit must not commit). */
  ZM_STORE_TAKE_PENDING,
  /* LIVE -> DELETING of a managed identity: delete the mapping .id, insert a
   * tombstone (.tomb: kind ZM_TOMB_MANAGED, next_try_ms, created_at_ms;
   * claimed by this caller until .ms) and record a change of .id.
   * No mapping -> ZM_E_NOT_FOUND. */
  ZM_STORE_RETIRE_MANAGED,
  /* LIVE -> DELETING of a service identity, guarded: only if its lease is
   * <= .ms2 (INT64_MAX: unconditionally); tombstone as above, claimed until
   * .ms. No such row -> ZM_E_NOT_FOUND. */
  ZM_STORE_RETIRE_SERVICE,
  /* Insert tombstone .tomb claimed until .ms (an orphan the controller has);
   * an existing tombstone for the id = ok (left as it is). */
  ZM_STORE_PUT_TOMB,
  /* DELETING -> GONE: delete tombstone .id; no row = ok. */
  ZM_STORE_DEL_TOMB,
  /* A failed delete attempt: attempts + 1, next_try_at = .ms, claim
   * released. No row = ok. */
  ZM_STORE_DEFER_TOMB,
} zm_store_op_kind_t;

typedef struct {
  zm_store_op_kind_t kind;
  zm_managed_row_t managed;
  zm_service_row_t service;
  zm_pending_row_t pending;
  zm_tomb_row_t tomb;
  const char *id;   /* EXTEND_LEASE, RETIRE_*, DEL_TOMB, DEFER_TOMB,
                       SET_PENDING_ID */
  const char *name; /* SET_PENDING_ID, DEL_PENDING */
  int64_t ms;       /* EXTEND_LEASE, DEFER_TOMB; RETIRE_*, PUT_TOMB: claim */
  int64_t ms2;      /* RETIRE_SERVICE: lease guard */
  /* FLUSH_LEASES */
  const char *const *ids;
  const int64_t *mss;
  size_t n;
} zm_store_op_t;

/* err: 0, or ZM_E_NOT_FOUND / ZM_E_EXISTS / ZM_E_INVAL (this unit was rolled
 * back, the others of its group stand), or ZM_E_STORE (the group failed or
 * its outcome is unknown: a lost connection during COMMIT). */
typedef void (*zm_store_cb)(int err, void *data);

/* Opens (creating if needed) and migrates. Synchronous: start-up only (and
 * before the loop runs, so blocking there blocks no client).
 * Returns 0, or ZM_E_STORE with a log line saying why. */
int zm_store_open(zm_store_t **out, uv_loop_t *loop,
                  const zm_store_config_t *cfg);
/* Waits for what is in flight, commits what is queued (callbacks run), then
 * closes. Synchronous: shutdown only. */
void zm_store_close(zm_store_t *st);

/* 1 when other processes may write the same store (PostgreSQL). */
int zm_store_shared(const zm_store_t *st);

/* Start-up load, synchronous: calls the callbacks for every row (the row's
 * strings are valid only during the callback). Any callback may be NULL.
 * Returns 0 or ZM_E_STORE. */
int zm_store_load(zm_store_t *st,
                  void (*on_managed)(const zm_managed_row_t *r, void *data),
                  void (*on_service)(const zm_service_row_t *r, void *data),
                  void (*on_pending)(const zm_pending_row_t *r, void *data),
                  void *data);

/* Submits one unit of n ops (all copied, strings and arrays included).
 * cb(err, data) fires once the group is durable. */
void zm_store_submit(zm_store_t *st, const zm_store_op_t *ops, size_t n,
                     zm_store_cb cb, void *data);

/* Reads and claims run in order with the writes submitted before them (they
 * see every earlier unit). Rows are valid only during the callback. */
typedef void (*zm_store_managed_list_cb)(int err, const zm_managed_row_t *rows,
                                         size_t n, void *data);
/* Managed identities with ziti_identity_id > after_id ("" = from the start),
 * of identity_type `type` (0 = any), ordered by ziti_identity_id, at most
 * limit. */
void zm_store_list_managed(zm_store_t *st, int type, const char *after_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data);
/* The mapping of one id: n = 1 with the row, or n = 0. */
void zm_store_get_managed(zm_store_t *st, const char *id,
                          zm_store_managed_list_cb cb, void *data);
/* The mappings of one platform identity (identity_id, a canonical UUID),
 * ordered by ziti_identity_id, at most limit (app and runner re-enrolment,
 * DeleteAppIdentity / DeleteRunnerIdentity). */
void zm_store_find_managed(zm_store_t *st, const char *identity_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data);
/* The newest mapping whose identity_id is this (a UUID): n = 1 or 0
 * (indexed in both backends: ResolveIdentity's name fallback). */
void zm_store_find_managed_by_identity(zm_store_t *st, const char *identity_id,
                                       zm_store_managed_list_cb cb, void *data);

typedef void (*zm_store_tomb_list_cb)(int err, const zm_tomb_row_t *rows,
                                      size_t n, void *data);
/* Collection, atomically: up to limit service identities whose lease is <=
 * cut_ms (oldest lease first, rows another process holds are skipped) go
 * LIVE -> DELETING: each becomes a tombstone (kind ZM_TOMB_SERVICE,
 * next_try = now_ms) claimed until claim_until_ms. Returns the tombstones. */
void zm_store_claim_expired(zm_store_t *st, int64_t cut_ms, int64_t now_ms,
                            int64_t claim_until_ms, size_t limit,
                            zm_store_tomb_list_cb cb, void *data);
/* Up to limit tombstones due (next_try <= now_ms) and not claimed
 * (claimed_until <= now_ms), oldest next_try first, claimed until
 * claim_until_ms. */
void zm_store_claim_tombs(zm_store_t *st, int64_t now_ms,
                          int64_t claim_until_ms, size_t limit,
                          zm_store_tomb_list_cb cb, void *data);

typedef void (*zm_store_pending_list_cb)(int err, const zm_pending_row_t *rows,
                                         size_t n, void *data);
/* Up to limit pending rows with resolve_after <= now_ms and not claimed,
 * oldest first, claimed until claim_until_ms. */
void zm_store_claim_pending(zm_store_t *st, int64_t now_ms,
                            int64_t claim_until_ms, size_t limit,
                            zm_store_pending_list_cb cb, void *data);

/* The service clock. Every beat: if the previous beat of ANY process is
 * older than gap_ms (no process was up: an outage, a suspend, a clock step
 * forward) or more than gap_ms ahead of now (the clock stepped back),
 * resumed_at = now; last_beat = now (never moved back otherwise). Returns the
 * store clock's now (SQLite: local_now_ms as given; PostgreSQL: the database's
 * clock) and resumed_at. */
typedef void (*zm_store_beat_cb)(int err, int64_t now_ms, int64_t resumed_ms,
                                 void *data);
void zm_store_heartbeat(zm_store_t *st, int64_t local_now_ms, int64_t gap_ms,
                        zm_store_beat_cb cb, void *data);

/* Changes of managed identities (deleted or replaced) with seq > after_seq,
 * or recorded at or after since_ms, ascending seq, at most limit. A store
 * that is not shared has nothing to report (n = 0). Also prunes changes
 * older than since_ms - 1 h now and then. */
typedef void (*zm_store_changes_cb)(int err, const int64_t *seqs,
                                    const char *const *ids, size_t n,
                                    void *data);
void zm_store_changes(zm_store_t *st, int64_t after_seq, int64_t since_ms,
                      size_t limit, zm_store_changes_cb cb, void *data);

/* Counters. */
typedef struct {
  uint64_t units, groups, failed_groups;
  size_t queued;       /* units waiting for the next group */
  uint64_t reconnects; /* PostgreSQL: connections re-established */
} zm_store_stats_t;
void zm_store_get_stats(const zm_store_t *st, zm_store_stats_t *out);

#endif /* ZM_STORE_H */
