/*
 * store.h - the durable table of identities ziti-management manages.
 *
 * One interface, asynchronous completion: every write is a *unit* of one or
 * more ops, submitted with a callback. All units submitted during one loop
 * turn are committed in ONE transaction (group commit) on a worker thread,
 * each unit inside its own SAVEPOINT so one failing unit does not undo the
 * others; callbacks fire on the loop after the transaction is durable, never
 * inside the submitting call. Only one transaction runs at a time; units
 * submitted meanwhile form the next group.
 *
 * Backend: SQLite (WAL) at cfg->path. Schema (compatible with the existing Go
 * service's tables; times are stored as TIMESTAMP text in UTC,
 * "YYYY-MM-DD HH:MM:SS.mmm"):
 *   managed_identities(ziti_identity_id TEXT PRIMARY KEY, identity_id TEXT NOT
 * NULL, identity_type SMALLINT NOT NULL, created_at TIMESTAMP NOT NULL)
 *   service_identities(ziti_identity_id TEXT PRIMARY KEY, service_type SMALLINT
 * NOT NULL, lease_expires_at TIMESTAMP NOT NULL, created_at TIMESTAMP NOT NULL)
 *                      + index on lease_expires_at
 *   pending_identities(name TEXT PRIMARY KEY, kind SMALLINT NOT NULL, type
 * SMALLINT NOT NULL, ziti_identity_id TEXT, created_at TIMESTAMP NOT NULL)
 *   schema_migrations(version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT
 * NULL)
 */
#ifndef ZM_STORE_H
#define ZM_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct zm_store zm_store_t;

typedef struct {
  const char *path; /* SQLite file */
  int sync_full;    /* 1: fsync every group commit (durable against power loss,
                       synchronous=FULL); 0: durable against process crash
                       (synchronous=NORMAL in WAL) */
} zm_store_config_t;

typedef struct {
  const char *ziti_identity_id;
  const char *identity_id;
  int identity_type;     /* proto IdentityType number */
  int64_t created_at_ms; /* wall ms since epoch */
} zm_managed_row_t;

typedef struct {
  const char *ziti_identity_id;
  int service_type;         /* proto ServiceType number */
  int64_t lease_expires_ms; /* wall ms since epoch */
  int64_t created_at_ms;
} zm_service_row_t;

/* A creation in progress on the controller (the enrollment saga's INTENT). */
enum { ZM_PENDING_SERVICE = 1, ZM_PENDING_AGENT = 2 };
typedef struct {
  const char *name;             /* controller identity name, unique */
  int kind;                     /* ZM_PENDING_* */
  int type;                     /* service type or identity type */
  const char *ziti_identity_id; /* NULL until the controller answered */
  int64_t created_at_ms;
} zm_pending_row_t;

typedef enum {
  ZM_STORE_PUT_MANAGED,  /* insert or replace .managed */
  ZM_STORE_DEL_MANAGED,  /* delete by .id; no row = ok */
  ZM_STORE_PUT_SERVICE,  /* insert or replace .service */
  ZM_STORE_EXTEND_LEASE, /* set lease of .id to .ms; no row -> unit fails
                            ZM_E_NOT_FOUND */
  ZM_STORE_DEL_SERVICE, /* delete .id if its lease_expires_at <= .ms (GC guard);
                           .ms = INT64_MAX deletes unconditionally; no row = ok
                         */
  ZM_STORE_PUT_PENDING, /* insert .pending; a duplicate name -> ZM_E_EXISTS */
  ZM_STORE_SET_PENDING_ID, /* set ziti_identity_id of pending .name to .id */
  ZM_STORE_DEL_PENDING,    /* delete pending .name; no row = ok */
} zm_store_op_kind_t;

typedef struct {
  zm_store_op_kind_t kind;
  zm_managed_row_t managed;
  zm_service_row_t service;
  zm_pending_row_t pending;
  const char *id;   /* DEL_MANAGED, EXTEND_LEASE, DEL_SERVICE, SET_PENDING_ID */
  const char *name; /* SET_PENDING_ID, DEL_PENDING */
  int64_t ms;       /* EXTEND_LEASE, DEL_SERVICE */
} zm_store_op_t;

/* err: 0, or ZM_E_NOT_FOUND / ZM_E_EXISTS (the unit was rolled back), or
 * ZM_E_STORE (the group failed: nothing of it is durable). */
typedef void (*zm_store_cb)(int err, void *data);

/* Opens (creating if needed) and migrates. Synchronous: start-up only.
 * Returns 0, or ZM_E_STORE with a log line saying why. */
int zm_store_open(zm_store_t **out, uv_loop_t *loop,
                  const zm_store_config_t *cfg);
/* Waits for the transaction in flight, commits what is queued (callbacks
 * run), then closes. Synchronous: shutdown only. */
void zm_store_close(zm_store_t *st);

/* Start-up load, synchronous: calls the callbacks for every row (the row's
 * strings are valid only during the callback). Any callback may be NULL.
 * Returns 0 or ZM_E_STORE. */
int zm_store_load(zm_store_t *st,
                  void (*on_managed)(const zm_managed_row_t *r, void *data),
                  void (*on_service)(const zm_service_row_t *r, void *data),
                  void (*on_pending)(const zm_pending_row_t *r, void *data),
                  void *data);

/* Submits one unit of n ops (all copied; the caller's strings may go away
 * after the call). cb(err, data) fires once the group is durable. */
void zm_store_submit(zm_store_t *st, const zm_store_op_t *ops, size_t n,
                     zm_store_cb cb, void *data);

/* Reads run in the same serial queue as writes (they see every earlier unit).
 * Rows are valid only during the callback. */
typedef void (*zm_store_managed_list_cb)(int err, const zm_managed_row_t *rows,
                                         size_t n, void *data);
/* Managed identities with ziti_identity_id > after_id (""= from the start),
 * of identity_type `type` (0 = any), ordered by ziti_identity_id, at most
 * limit. */
void zm_store_list_managed(zm_store_t *st, int type, const char *after_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data);

typedef void (*zm_store_service_list_cb)(int err, const zm_service_row_t *rows,
                                         size_t n, void *data);
/* Service identities with lease_expires_at <= now_ms, ordered by
 * (lease_expires_at, ziti_identity_id), after the cursor (after_ms, after_id)
 * (after_id "" = from the start), at most limit. */
void zm_store_list_expired(zm_store_t *st, int64_t now_ms, int64_t after_ms,
                           const char *after_id, size_t limit,
                           zm_store_service_list_cb cb, void *data);

typedef void (*zm_store_pending_list_cb)(int err, const zm_pending_row_t *rows,
                                         size_t n, void *data);
/* Pending rows created at or before older_than_ms, oldest first, at most limit.
 */
void zm_store_list_pending(zm_store_t *st, int64_t older_than_ms, size_t limit,
                           zm_store_pending_list_cb cb, void *data);

/* Counters. */
typedef struct {
  uint64_t units, groups, failed_groups;
  size_t queued; /* units waiting for the next group */
} zm_store_stats_t;
void zm_store_get_stats(const zm_store_t *st, zm_store_stats_t *out);

#endif /* ZM_STORE_H */
