/*
 * sqlite.c - the SQLite backend of zm_store (include/zm/store.h), exported
 * as zm__sqlite_vt (store.c dispatches to it). Not shared: this process is
 * the store's only writer, so zm_store_changes has nothing to report.
 *
 * Threads. The connection belongs to one thread at a time: the loop thread
 * at open, load and close (when no batch is in flight), otherwise one
 * dedicated worker thread of ours. A dedicated thread rather than
 * uv_queue_work because the libuv pool is shared (DNS, fs, crypto): a slow
 * key generation must never hold a commit back. The hand-off is one mutex,
 * one condvar and one uv_async:
 *
 *   loop: submit -> queue -> uv_prepare (before the loop blocks) -> dispatch
 *         batch -> worker: BEGIN; per unit SAVEPOINT/ops/RELEASE; reads;
 *         claims; COMMIT -> done + uv_async_send -> loop: every callback, in
 *         submission order
 *
 * Group commits are spaced: a batch starts at most every commit_spacing_ms
 * (a linger timer holds the queue until then), so under a steady stream of
 * units they share transactions instead of committing one by one.
 *
 * Claims and heartbeats are writes: they run inside the group transaction
 * like units, so their results are durable before their callbacks fire (and
 * a failed group fails them too). Only one batch is in flight; what is
 * submitted meanwhile waits in the queue and forms the next batch (at most
 * MAX_BATCH_ITEMS per transaction; the rest chains into the following ones).
 * Callbacks never run inside the call that queued them: they run from
 * on_async (or from close).
 *
 * Handles. The uv_prepare and uv_async live in a block of their own that is
 * freed by their close callbacks, so close can free the store at once; the
 * caller lets the loop run (uv_run NOWAIT or DEFAULT) afterwards so those
 * close callbacks fire before uv_loop_close. The async handle is
 * unreferenced except while a batch is in flight, so an idle store never
 * keeps uv_run alive.
 */
#include "store_internal.h"

#include "zm/log.h"
#include "zm/stat.h"
#include "zm/store.h"
#include "zm/thread.h"
#include "zm/zm.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* One transaction's worth: bounds the time the write lock is held and the
 * memory a batch pins; a longer queue chains into the next transactions. */
#define MAX_BATCH_ITEMS 4096
/* Least time between the starts of two group commits (the default of
 * zm_store_config_t.commit_spacing_ms). A commit's fixed
 * cost (locks, WAL frame headers, the pages every unit touches: table and
 * index leaves of time-ordered keys) is most of a one-unit commit's: a model
 * of an enrollment's two units took 63 us of CPU committed one by one and
 * 12 us in groups of 32. Units used to commit alone at 4x8 enrollments
 * (about 700 a second, each commit done long before the next unit came).
 * A unit waits at most this long, and only when a commit started less than
 * this long ago: a store that is not busy commits at once. */
#define COMMIT_SPACING_MS 2u
/* A queue this long goes at once, spacing or not. */
#define SPACING_MAX_ITEMS 256
/* Milliseconds a statement waits for another process's lock (an operator's
 * sqlite3 shell) before the group fails with ZM_E_STORE. */
#define BUSY_TIMEOUT_MS 5000
/* Page cache: 1 MiB (a negative cache_size is KiB), sized on purpose. Reads
 * are served by the in-memory index, so the cache only has to keep the
 * inner B-tree pages that random-key writes walk: with 1 KiB pages that is
 * about 1% of the data, some 0.5 MiB for the four B-trees of 100k
 * identities. Leaf pages of random keys are misses at any affordable size
 * (a 4 MiB cache holds ~15% of them at 100k) and come from the OS page
 * cache with one pread on the store's worker thread, never on the loop; a
 * bigger cache fills up with them over time and costs RSS (~1.2 KiB per
 * page with its header) for little. The start-up scan runs with
 * LOAD_CACHE_PRAGMA instead: it reads every leaf once. */
#define CACHE_PRAGMA "PRAGMA cache_size=-1024"
#define LOAD_CACHE_PRAGMA "PRAGMA cache_size=-128"
/* No memory-mapped I/O: every page of the file a scan or a write touches
 * would stay mapped and count in the process's RSS, while the index serves
 * the reads; pread() through the page cache above is cheap enough for
 * writes. Explicit, since a build of SQLite may default to mmap. */
#define MMAP_PRAGMA "PRAGMA mmap_size=0"
/* claimed_until of a row nobody holds. */
#define UNCLAIMED "'1970-01-01 00:00:00.000'"

/* ==== prepared statements ============================================== */

#define MANAGED_COLS                                                           \
  "ziti_identity_id, identity_id, identity_type, created_at,"                  \
  " ziti_service_id, workload_id, agent_id, environment_id"
#define PENDING_COLS                                                           \
  "name, kind, type, ziti_identity_id, agent_id, created_at, resolve_after"
#define TOMB_COLS                                                              \
  "ziti_identity_id, kind, type, attempts, next_try_at, claimed_until,"        \
  " created_at"

#define STMTS(X)                                                               \
  X(BEGIN, "BEGIN")                                                            \
  X(BEGIN_IMM, "BEGIN IMMEDIATE")                                              \
  X(COMMIT, "COMMIT")                                                          \
  X(ROLLBACK, "ROLLBACK")                                                      \
  X(SAVEPOINT, "SAVEPOINT u")                                                  \
  X(RELEASE, "RELEASE u")                                                      \
  X(ROLLBACK_TO, "ROLLBACK TO u")                                              \
  X(PUT_MANAGED, "INSERT OR REPLACE INTO managed_identities(" MANAGED_COLS     \
                 ") VALUES(?,?,?,?,?,?,?,?)")                                  \
  X(RETIRE_MANAGED, "DELETE FROM managed_identities WHERE ziti_identity_id=?"  \
                    " RETURNING identity_type")                                \
  X(PUT_SERVICE, "INSERT OR REPLACE INTO service_identities(ziti_identity_id," \
                 " service_type, lease_expires_at, created_at)"                \
                 " VALUES(?,?,?,?)")                                           \
  X(EXTEND_LEASE, "UPDATE service_identities"                                  \
                  " SET lease_expires_at=max(lease_expires_at, ?1)"            \
                  " WHERE ziti_identity_id=?2")                                \
  /* FLUSH_LEASES: a row whose lease is not raised is not rewritten */         \
  X(RAISE_LEASE, "UPDATE service_identities SET lease_expires_at=?1"           \
                 " WHERE ziti_identity_id=?2 AND lease_expires_at<?1")         \
  X(RETIRE_SERVICE_IF, "DELETE FROM service_identities"                        \
                       " WHERE ziti_identity_id=?1 AND lease_expires_at<=?2"   \
                       " RETURNING service_type")                              \
  X(RETIRE_SERVICE, "DELETE FROM service_identities WHERE ziti_identity_id=?"  \
                    " RETURNING service_type")                                 \
  X(PUT_PENDING, "INSERT INTO pending_identities(" PENDING_COLS                \
                 ", claimed_until) VALUES(?,?,?,?,?,?,?," UNCLAIMED ")")       \
  X(SET_PENDING_ID, "UPDATE pending_identities SET ziti_identity_id=?"         \
                    " WHERE name=?")                                           \
  X(DEL_PENDING, "DELETE FROM pending_identities WHERE name=?")                \
  /* A tombstone made from a live row replaces a stale one for the id */       \
  X(TOMB_FROM_LIVE, "INSERT OR REPLACE INTO deleting_identities(" TOMB_COLS    \
                    ") VALUES(?,?,?,?,?,?,?)")                                 \
  X(PUT_TOMB, "INSERT INTO deleting_identities(" TOMB_COLS ")"                 \
              " VALUES(?,?,?,?,?,?,?)"                                         \
              " ON CONFLICT(ziti_identity_id) DO NOTHING")                     \
  X(DEL_TOMB, "DELETE FROM deleting_identities WHERE ziti_identity_id=?")      \
  X(DEFER_TOMB,                                                                \
    "UPDATE deleting_identities SET attempts=attempts+1,"                      \
    " next_try_at=?1, claimed_until=" UNCLAIMED " WHERE ziti_identity_id=?2")  \
  X(LIST_MANAGED, "SELECT " MANAGED_COLS " FROM managed_identities"            \
                  " WHERE ziti_identity_id>?1 AND (?2=0 OR identity_type=?2)"  \
                  " ORDER BY ziti_identity_id LIMIT ?3")                       \
  X(GET_MANAGED, "SELECT " MANAGED_COLS " FROM managed_identities"             \
                 " WHERE ziti_identity_id=?1")                                 \
  X(FIND_MANAGED, "SELECT " MANAGED_COLS " FROM managed_identities"            \
                  " WHERE identity_id=?1 ORDER BY ziti_identity_id LIMIT ?2")  \
  X(GET_MANAGED_BY_IDENTITY,                                                   \
    "SELECT " MANAGED_COLS " FROM managed_identities WHERE identity_id=?1"     \
    " ORDER BY created_at DESC LIMIT 1")                                       \
  X(SEL_EXPIRED, "SELECT ziti_identity_id, service_type"                       \
                 " FROM service_identities WHERE lease_expires_at<=?1"         \
                 " ORDER BY lease_expires_at, ziti_identity_id LIMIT ?2")      \
  X(DEL_SERVICE, "DELETE FROM service_identities WHERE ziti_identity_id=?")    \
  X(SEL_TOMBS, "SELECT ziti_identity_id, kind, type, attempts, next_try_at,"   \
               " created_at FROM deleting_identities"                          \
               " WHERE next_try_at<=?1 AND claimed_until<=?1"                  \
               " ORDER BY next_try_at, ziti_identity_id LIMIT ?2")             \
  X(CLAIM_TOMB, "UPDATE deleting_identities SET claimed_until=?1"              \
                " WHERE ziti_identity_id=?2")                                  \
  X(SEL_PENDING, "SELECT " PENDING_COLS " FROM pending_identities"             \
                 " WHERE resolve_after<=?1 AND claimed_until<=?1"              \
                 " ORDER BY created_at, name LIMIT ?2")                        \
  X(CLAIM_PENDING, "UPDATE pending_identities SET claimed_until=?1"            \
                   " WHERE name=?2")                                           \
  /* In DO UPDATE, bare column names are the existing row's values */          \
  /* A beat further than the gap AHEAD of now is a clock stepped back: as      \
   * much a reason to restart every lease as a silence. */                     \
  X(BEAT, "INSERT INTO service_clock(id, last_beat, resumed_at)"               \
          " VALUES(1, ?1, ?1) ON CONFLICT(id) DO UPDATE SET"                   \
          " resumed_at=CASE WHEN last_beat<?2 OR last_beat>?3 THEN ?1"         \
          " ELSE resumed_at END,"                                              \
          " last_beat=CASE WHEN last_beat>?3 THEN ?1"                          \
          " ELSE max(last_beat, ?1) END RETURNING resumed_at")                 \
  X(LOAD_MANAGED, "SELECT " MANAGED_COLS " FROM managed_identities")           \
  X(LOAD_SERVICE, "SELECT ziti_identity_id, service_type, lease_expires_at,"   \
                  " created_at FROM service_identities")                       \
  X(LOAD_PENDING, "SELECT " PENDING_COLS " FROM pending_identities")

enum {
#define X(name, sql) S_##name,
  STMTS(X)
#undef X
      S__COUNT
};

static const char *const STMT_SQL[S__COUNT] = {
#define X(name, sql) [S_##name] = sql,
    STMTS(X)
#undef X
};

/* ==== queued work ======================================================== */

enum {
  ITEM_UNIT,
  ITEM_LIST_MANAGED,
  ITEM_GET_MANAGED,
  ITEM_FIND_MANAGED,
  ITEM_CLAIM_EXPIRED,
  ITEM_CLAIM_TOMBS,
  ITEM_CLAIM_PENDING,
  ITEM_BEAT,
  ITEM_CHANGES,
};

/* Items that write (the batch takes the write lock up front for them). */
static int item_writes(int kind) {
  return kind == ITEM_UNIT || kind == ITEM_CLAIM_EXPIRED ||
         kind == ITEM_CLAIM_TOMBS || kind == ITEM_CLAIM_PENDING ||
         kind == ITEM_BEAT;
}

/* One unit, read or claim, in one allocation with its copied ops, arrays and
 * strings. Results are built by the worker (rows + the strings they point
 * to) and freed after the callback. */
typedef struct item {
  struct item *next;
  int kind; /* ITEM_* */
  int err;  /* outcome, set by the worker */
  void *data;
  union {
    zm_store_cb unit;
    zm_store_managed_list_cb managed;
    zm_store_tomb_list_cb tomb;
    zm_store_pending_list_cb pending;
    zm_store_beat_cb beat;
    zm_store_changes_cb changes;
  } cb;
  zm_store_op_t *ops; /* ITEM_UNIT: nops copies, in this block */
  size_t nops;
  int type; /* LIST_MANAGED: identity type, 0 = any */
  /* CLAIM_EXPIRED: cut, now, claim_until; CLAIM_TOMBS/PENDING: now,
   * claim_until; BEAT: local now, gap */
  int64_t t1, t2, t3;
  int64_t out_ms;  /* BEAT: resumed_at */
  const char *key; /* LIST_MANAGED: cursor id; GET_MANAGED: the id */
  size_t limit;    /* max rows */
  void *rows;      /* result rows (malloc), nrows of them */
  size_t nrows;
  char *strs; /* result strings the rows point into (malloc) */
} item_t;

typedef struct {
  item_t *head, *tail;
  size_t items, units, writes;
} itemq_t;

typedef struct handles handles_t;

typedef struct sq_store {
  zm_store_t base; /* first: zm_store_t * <-> sq_store_t * */
  uv_loop_t *loop;
  sqlite3 *db;
  char *path; /* owned, for log lines */
  sqlite3_stmt *stmt[S__COUNT];
  handles_t *h;              /* freed by the handles' close callbacks */
  itemq_t queue;             /* loop thread only: waiting for the next batch */
  int in_flight;             /* loop thread only: batch handed to the worker */
  uint64_t last_dispatch_ns; /* loop thread only: uv_hrtime() of the last */
  uint64_t spacing_ns;       /* commit_spacing_ms */
  int delivering;
  int closing;
  zm_store_stats_t stats;

  /* Shared with the worker, under mu. batch is written by the loop before
   * work_ready is set and read back after done_ready is seen. */
  uv_mutex_t mu;
  uv_cond_t cond;
  int work_ready, done_ready, stop;
  itemq_t batch;
  uint64_t batch_groups, batch_failed;
  uv_thread_t thread;

  /* Checkpointer: its own connection and thread, so that copying the WAL
   * into the database file (and its fsync) never runs inside a group
   * commit. The writer connection has wal_autocheckpoint=0. Under mu. */
  sqlite3 *ckpt_db;
  uv_thread_t ckpt_thread;
  uv_cond_t ckpt_cond;
  int ckpt_stop;
} sq_store_t;

struct handles {
  uv_prepare_t prepare;
  uv_async_t async;
  uv_timer_t linger; /* the spacing of group commits */
  sq_store_t *st;    /* NULL once the store is closed */
  int open;          /* handles not yet closed */
};

static void on_prepare(uv_prepare_t *p);
static void on_async(uv_async_t *a);
static void on_linger(uv_timer_t *t);
static void on_handle_closed(uv_handle_t *hd);
static void worker_main(void *arg);
static void ckpt_main(void *arg);
static void kick(sq_store_t *st);

static void q_push(itemq_t *q, item_t *it) {
  it->next = NULL;
  if (q->tail)
    q->tail->next = it;
  else
    q->head = it;
  q->tail = it;
  q->items++;
  q->units += it->kind == ITEM_UNIT;
  q->writes += item_writes(it->kind);
}

/* Moves up to MAX_BATCH_ITEMS items from q to out (empty). */
static void q_take(itemq_t *q, itemq_t *out) {
  memset(out, 0, sizeof *out);
  while (q->head != NULL && out->items < MAX_BATCH_ITEMS) {
    item_t *it = q->head;
    q->head = it->next;
    q->items--;
    q->units -= it->kind == ITEM_UNIT;
    q->writes -= item_writes(it->kind);
    q_push(out, it);
  }
  if (q->head == NULL)
    q->tail = NULL;
}

/* ==== worker side: running a batch ======================================== */

static void log_db(const sq_store_t *st, const char *what) {
  ZM_ERROR("store %s: %s: %s", st->path, what, sqlite3_errmsg(st->db));
}

/* Steps s once, resets it and drops its bindings (so stack buffers bound
 * SQLITE_STATIC are never referenced afterwards). Returns the step code.
 * A DELETE/INSERT ... RETURNING makes all its changes at the first step. */
static int step_once(sqlite3_stmt *s) {
  int rc = sqlite3_step(s);
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  return rc;
}

static int exec_stmt(sq_store_t *st, int which, const char *what) {
  int rc = step_once(st->stmt[which]);
  if (rc != SQLITE_DONE) {
    log_db(st, what);
    return ZM_E_STORE;
  }
  return 0;
}

static void bind_str(sqlite3_stmt *s, int i, const char *v) {
  if (v == NULL)
    sqlite3_bind_null(s, i);
  else
    sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC);
}

static void bind_time(sqlite3_stmt *s, int i, int64_t ms,
                      char buf[ZM__STORE_TIME_BUF]) {
  size_t n = zm__store_time_format(ms, buf);
  sqlite3_bind_text(s, i, buf, (int)n, SQLITE_STATIC);
}

/* Maps a write's step code: 0, ZM_E_INVAL (a constraint: the caller passed
 * NULL for a NOT NULL column), or ZM_E_STORE (the group must fail). */
static int write_result(sq_store_t *st, int rc, const char *what) {
  if (rc == SQLITE_DONE || rc == SQLITE_ROW)
    return 0;
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    ZM_WARN("store %s: %s: %s", st->path, what, sqlite3_errmsg(st->db));
    return ZM_E_INVAL;
  }
  log_db(st, what);
  return ZM_E_STORE;
}

/* Inserts a tombstone (statement which: TOMB_FROM_LIVE or PUT_TOMB). */
static int put_tomb(sq_store_t *st, int which, const char *id, int kind,
                    int type, int attempts, int64_t next_try_ms,
                    int64_t claim_until_ms, int64_t created_ms) {
  char t1[ZM__STORE_TIME_BUF], t2[ZM__STORE_TIME_BUF], t3[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s = st->stmt[which];
  bind_str(s, 1, id);
  sqlite3_bind_int(s, 2, kind);
  sqlite3_bind_int(s, 3, type);
  sqlite3_bind_int(s, 4, attempts);
  bind_time(s, 5, next_try_ms, t1);
  bind_time(s, 6, claim_until_ms, t2);
  bind_time(s, 7, created_ms, t3);
  return write_result(st, step_once(s), "put tombstone");
}

/* LIVE -> DELETING: s is a bound DELETE ... RETURNING type. */
static int retire(sq_store_t *st, sqlite3_stmt *s, const zm_store_op_t *op,
                  int tomb_kind) {
  int rc = sqlite3_step(s);
  int type = rc == SQLITE_ROW ? sqlite3_column_int(s, 0) : 0;
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  int err = write_result(st, rc, "retire");
  if (err != 0)
    return err;
  if (rc != SQLITE_ROW)
    return ZM_E_NOT_FOUND;
  if (type == 0)
    type = op->tomb.type;
  return put_tomb(st, S_TOMB_FROM_LIVE, op->id,
                  op->tomb.kind ? op->tomb.kind : tomb_kind, type, 0,
                  op->tomb.next_try_ms, op->ms, op->tomb.created_at_ms);
}

static int flush_leases(sq_store_t *st, const zm_store_op_t *op) {
  char t[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s = st->stmt[S_RAISE_LEASE];
  for (size_t i = 0; i < op->n; i++) {
    if (op->ids[i] == NULL)
      continue;
    bind_time(s, 1, op->mss[i], t);
    sqlite3_bind_text(s, 2, op->ids[i], -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    if (rc != SQLITE_DONE) {
      sqlite3_clear_bindings(s);
      return write_result(st, rc, "flush leases");
    }
  }
  sqlite3_clear_bindings(s);
  return 0;
}

static int run_op(sq_store_t *st, const zm_store_op_t *op) {
  char t1[ZM__STORE_TIME_BUF], t2[ZM__STORE_TIME_BUF], t3[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s;
  int rc;
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED:
    s = st->stmt[S_PUT_MANAGED];
    bind_str(s, 1, op->managed.ziti_identity_id);
    bind_str(s, 2, op->managed.identity_id);
    sqlite3_bind_int(s, 3, op->managed.identity_type);
    bind_time(s, 4, op->managed.created_at_ms, t1);
    bind_str(s, 5, op->managed.ziti_service_id);
    bind_str(s, 6, op->managed.workload_id);
    bind_str(s, 7, op->managed.agent_id);
    bind_str(s, 8, op->managed.environment_id);
    return write_result(st, step_once(s), "put managed");
  case ZM_STORE_PUT_SERVICE:
    s = st->stmt[S_PUT_SERVICE];
    bind_str(s, 1, op->service.ziti_identity_id);
    sqlite3_bind_int(s, 2, op->service.service_type);
    bind_time(s, 3, op->service.lease_expires_ms, t1);
    bind_time(s, 4, op->service.created_at_ms, t2);
    return write_result(st, step_once(s), "put service");
  case ZM_STORE_EXTEND_LEASE:
    s = st->stmt[S_EXTEND_LEASE];
    bind_time(s, 1, op->ms, t1);
    bind_str(s, 2, op->id);
    if ((rc = write_result(st, step_once(s), "extend lease")) != 0)
      return rc;
    return sqlite3_changes(st->db) == 0 ? ZM_E_NOT_FOUND : 0;
  case ZM_STORE_FLUSH_LEASES:
    return flush_leases(st, op);
  case ZM_STORE_PUT_PENDING:
    s = st->stmt[S_PUT_PENDING];
    bind_str(s, 1, op->pending.name);
    sqlite3_bind_int(s, 2, op->pending.kind);
    sqlite3_bind_int(s, 3, op->pending.type);
    bind_str(s, 4, op->pending.ziti_identity_id);
    bind_str(s, 5, op->pending.agent_id);
    bind_time(s, 6, op->pending.created_at_ms, t1);
    bind_time(s, 7, op->pending.resolve_after_ms, t2);
    rc = step_once(s);
    /* the name (primary key), or the agent (unique among pending rows) */
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE)
      return ZM_E_EXISTS;
    return write_result(st, rc, "put pending");
  case ZM_STORE_SET_PENDING_ID:
    s = st->stmt[S_SET_PENDING_ID];
    bind_str(s, 1, op->id);
    bind_str(s, 2, op->name);
    if ((rc = write_result(st, step_once(s), "set pending id")) != 0)
      return rc;
    return sqlite3_changes(st->db) == 0 ? ZM_E_NOT_FOUND : 0;
  case ZM_STORE_DEL_PENDING:
  case ZM_STORE_TAKE_PENDING:
    s = st->stmt[S_DEL_PENDING];
    bind_str(s, 1, op->name);
    if ((rc = write_result(st, step_once(s), "delete pending")) != 0)
      return rc;
    return op->kind == ZM_STORE_TAKE_PENDING && sqlite3_changes(st->db) == 0
               ? ZM_E_NOT_FOUND
               : 0;
  case ZM_STORE_RETIRE_MANAGED:
    s = st->stmt[S_RETIRE_MANAGED];
    bind_str(s, 1, op->id);
    return retire(st, s, op, ZM_TOMB_MANAGED);
  case ZM_STORE_RETIRE_SERVICE:
    if (op->ms2 == INT64_MAX) {
      s = st->stmt[S_RETIRE_SERVICE];
      bind_str(s, 1, op->id);
    } else {
      s = st->stmt[S_RETIRE_SERVICE_IF];
      bind_str(s, 1, op->id);
      bind_time(s, 2, op->ms2, t3);
    }
    return retire(st, s, op, ZM_TOMB_SERVICE);
  case ZM_STORE_PUT_TOMB:
    return put_tomb(st, S_PUT_TOMB, op->tomb.ziti_identity_id, op->tomb.kind,
                    op->tomb.type, op->tomb.attempts, op->tomb.next_try_ms,
                    op->ms, op->tomb.created_at_ms);
  case ZM_STORE_DEL_TOMB:
    s = st->stmt[S_DEL_TOMB];
    bind_str(s, 1, op->id);
    return write_result(st, step_once(s), "delete tombstone");
  case ZM_STORE_DEFER_TOMB:
    s = st->stmt[S_DEFER_TOMB];
    bind_time(s, 1, op->ms, t1);
    bind_str(s, 2, op->id);
    return write_result(st, step_once(s), "defer tombstone");
  }
  ZM_WARN("store %s: unknown op kind %d", st->path, (int)op->kind);
  return ZM_E_INVAL;
}

/* Ops that are one statement, atomic on their own. (FLUSH_LEASES is many,
 * but it can only fail with ZM_E_STORE, which loses the whole group.) */
static int op_is_atomic(zm_store_op_kind_t k) {
  return k != ZM_STORE_RETIRE_MANAGED && k != ZM_STORE_RETIRE_SERVICE;
}

/* Runs one unit inside SAVEPOINT u. Sets it->err to 0 or the unit's own
 * failure (rolled back to the savepoint). Returns ZM_E_STORE if the whole
 * transaction is lost, else 0. */
static int run_unit(sq_store_t *st, item_t *it) {
  if (it->nops == 1 && op_is_atomic(it->ops[0].kind)) {
    /* One statement is atomic on its own (SQLite rolls a failed statement
     * back), so a one-op unit needs no savepoint: two fewer statements per
     * ExtendIdentityLease, the hottest write. */
    int err = run_op(st, &it->ops[0]);
    if (err == ZM_E_STORE)
      return ZM_E_STORE;
    it->err = err;
    return 0;
  }
  if (exec_stmt(st, S_SAVEPOINT, "savepoint") != 0)
    return ZM_E_STORE;
  int err = 0;
  for (size_t i = 0; i < it->nops && err == 0; i++)
    err = run_op(st, &it->ops[i]);
  if (err == ZM_E_STORE)
    return ZM_E_STORE;
  if (err != 0 && exec_stmt(st, S_ROLLBACK_TO, "rollback to savepoint") != 0)
    return ZM_E_STORE;
  if (exec_stmt(st, S_RELEASE, "release savepoint") != 0)
    return ZM_E_STORE;
  it->err = err;
  return 0;
}

/* A growable byte arena; offsets, not pointers, until the read is done. */
typedef struct {
  char *buf;
  size_t len, cap;
} arena_t;

/* Appends column col of s; returns its offset + 1, or 0 for SQL NULL. */
static size_t arena_col(arena_t *a, sqlite3_stmt *s, int col) {
  const unsigned char *t = sqlite3_column_text(s, col);
  if (t == NULL)
    return 0;
  size_t n = (size_t)sqlite3_column_bytes(s, col);
  if (a->len + n + 1 > a->cap) {
    size_t cap = a->cap ? a->cap : 1024;
    while (cap < a->len + n + 1)
      cap *= 2;
    a->buf = zm_xrealloc(a->buf, cap);
    a->cap = cap;
  }
  memcpy(a->buf + a->len, t, n);
  a->buf[a->len + n] = '\0';
  a->len += n + 1;
  return a->len - n; /* offset of the copy, + 1 */
}

static const char *arena_str(const arena_t *a, size_t off) {
  return off ? a->buf + off - 1 : NULL;
}

/* Parses time column col; an unparseable value reads as 0 (the epoch: an
 * expired lease, an old intent), which is what GC should look at. */
static int64_t col_time(sqlite3_stmt *s, int col) {
  const char *t = (const char *)sqlite3_column_text(s, col);
  int64_t ms = 0;
  if (t == NULL ||
      zm__store_time_parse(t, (size_t)sqlite3_column_bytes(s, col), &ms) != 0)
    return 0;
  return ms;
}

static int64_t limit_arg(size_t limit) {
  return limit > (size_t)INT64_MAX ? INT64_MAX : (int64_t)limit;
}

/* Strings per result row, at most. */
#define ROW_STRS 6

/* Fills row r from the current result row of s; string columns are recorded
 * as arena offsets in offs[ROW_STRS] (pointers once the arena stops). */
static void fill_row(int kind, void *row, sqlite3_stmt *s, arena_t *a,
                     size_t *offs) {
  switch (kind) {
  case ITEM_LIST_MANAGED:
  case ITEM_GET_MANAGED:
  case ITEM_FIND_MANAGED: {
    zm_managed_row_t *r = row;
    offs[0] = arena_col(a, s, 0);
    offs[1] = arena_col(a, s, 1);
    r->identity_type = sqlite3_column_int(s, 2);
    r->created_at_ms = col_time(s, 3);
    for (int k = 0; k < 4; k++)
      offs[2 + k] = arena_col(a, s, 4 + k);
    break;
  }
  case ITEM_CLAIM_EXPIRED: { /* ziti_identity_id, service_type */
    zm_tomb_row_t *r = row;
    offs[0] = arena_col(a, s, 0);
    r->kind = ZM_TOMB_SERVICE;
    r->type = sqlite3_column_int(s, 1);
    r->attempts = 0;
    break;
  }
  case ITEM_CLAIM_TOMBS: {
    zm_tomb_row_t *r = row;
    offs[0] = arena_col(a, s, 0);
    r->kind = sqlite3_column_int(s, 1);
    r->type = sqlite3_column_int(s, 2);
    r->attempts = sqlite3_column_int(s, 3);
    r->next_try_ms = col_time(s, 4);
    r->created_at_ms = col_time(s, 5);
    break;
  }
  default: { /* ITEM_CLAIM_PENDING */
    zm_pending_row_t *r = row;
    offs[0] = arena_col(a, s, 0);
    r->kind = sqlite3_column_int(s, 1);
    r->type = sqlite3_column_int(s, 2);
    offs[1] = arena_col(a, s, 3);
    offs[2] = arena_col(a, s, 4);
    r->created_at_ms = col_time(s, 5);
    r->resolve_after_ms = col_time(s, 6);
    break;
  }
  }
}

static void fix_row(int kind, void *row, const arena_t *a, const size_t *offs) {
  switch (kind) {
  case ITEM_LIST_MANAGED:
  case ITEM_GET_MANAGED:
  case ITEM_FIND_MANAGED: {
    zm_managed_row_t *r = row;
    r->ziti_identity_id = arena_str(a, offs[0]);
    r->identity_id = arena_str(a, offs[1]);
    r->ziti_service_id = arena_str(a, offs[2]);
    r->workload_id = arena_str(a, offs[3]);
    r->agent_id = arena_str(a, offs[4]);
    r->environment_id = arena_str(a, offs[5]);
    break;
  }
  case ITEM_CLAIM_EXPIRED:
  case ITEM_CLAIM_TOMBS:
    ((zm_tomb_row_t *)row)->ziti_identity_id = arena_str(a, offs[0]);
    break;
  default: {
    zm_pending_row_t *r = row;
    r->name = arena_str(a, offs[0]);
    r->ziti_identity_id = arena_str(a, offs[1]);
    r->agent_id = arena_str(a, offs[2]);
    break;
  }
  }
}

static size_t row_size(int kind) {
  switch (kind) {
  case ITEM_LIST_MANAGED:
  case ITEM_GET_MANAGED:
  case ITEM_FIND_MANAGED:
    return sizeof(zm_managed_row_t);
  case ITEM_CLAIM_EXPIRED:
  case ITEM_CLAIM_TOMBS:
    return sizeof(zm_tomb_row_t);
  default:
    return sizeof(zm_pending_row_t);
  }
}

static void drop_rows(item_t *it) {
  free(it->rows);
  free(it->strs);
  it->rows = NULL;
  it->strs = NULL;
  it->nrows = 0;
}

/* Runs the bound SELECT s to completion; the rows go to it->rows /
 * it->strs. Returns 0 or ZM_E_STORE. */
static int collect(sq_store_t *st, item_t *it, sqlite3_stmt *s) {
  size_t rowsz = row_size(it->kind);
  arena_t a = {0};
  size_t n = 0, cap = 0;
  char *rows = NULL;
  size_t *offs = NULL; /* ROW_STRS string offsets per row */
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      rows = zm_xrealloc(rows, cap * rowsz);
      offs = zm_xrealloc(offs, cap * ROW_STRS * sizeof *offs);
    }
    memset(rows + n * rowsz, 0, rowsz);
    memset(offs + n * ROW_STRS, 0, ROW_STRS * sizeof *offs);
    fill_row(it->kind, rows + n * rowsz, s, &a, offs + n * ROW_STRS);
    n++;
  }
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  if (rc != SQLITE_DONE) {
    log_db(st, "read");
    free(rows);
    free(offs);
    free(a.buf);
    return ZM_E_STORE;
  }
  /* The arena has stopped moving: turn offsets into pointers. */
  for (size_t i = 0; i < n; i++)
    fix_row(it->kind, rows + i * rowsz, &a, offs + i * ROW_STRS);
  free(offs);
  it->rows = rows;
  it->nrows = n;
  it->strs = a.buf;
  return 0;
}

/* The writes of a claim, over the rows collect() selected (inside the group
 * transaction, so the rows cannot have changed meanwhile). */
static int claim_rows(sq_store_t *st, item_t *it) {
  char t[ZM__STORE_TIME_BUF];
  for (size_t i = 0; i < it->nrows; i++) {
    int err;
    if (it->kind == ITEM_CLAIM_EXPIRED) {
      zm_tomb_row_t *r = (zm_tomb_row_t *)it->rows + i;
      r->next_try_ms = r->created_at_ms = it->t2;
      sqlite3_stmt *s = st->stmt[S_DEL_SERVICE];
      bind_str(s, 1, r->ziti_identity_id);
      err = write_result(st, step_once(s), "claim expired");
      if (err == 0)
        err = put_tomb(st, S_TOMB_FROM_LIVE, r->ziti_identity_id, r->kind,
                       r->type, 0, it->t2, it->t3, it->t2);
    } else {
      int tomb = it->kind == ITEM_CLAIM_TOMBS;
      sqlite3_stmt *s = st->stmt[tomb ? S_CLAIM_TOMB : S_CLAIM_PENDING];
      bind_time(s, 1, it->t2, t);
      bind_str(s, 2,
               tomb ? ((zm_tomb_row_t *)it->rows)[i].ziti_identity_id
                    : ((zm_pending_row_t *)it->rows)[i].name);
      err = write_result(st, step_once(s), "claim");
    }
    if (err != 0) /* a constraint here is a corrupt table: fail the group */
      return ZM_E_STORE;
  }
  return 0;
}

static int64_t sat_sub(int64_t a, int64_t b) {
  if (b > 0 && a < INT64_MIN + b)
    return INT64_MIN;
  if (b < 0 && a > INT64_MAX + b)
    return INT64_MAX;
  return a - b;
}

static int run_beat(sq_store_t *st, item_t *it) {
  char t1[ZM__STORE_TIME_BUF], t2[ZM__STORE_TIME_BUF], t3[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s = st->stmt[S_BEAT];
  bind_time(s, 1, it->t1, t1);
  bind_time(s, 2, sat_sub(it->t1, it->t2), t2);
  bind_time(s, 3, sat_sub(it->t1, -it->t2), t3);
  int rc = sqlite3_step(s);
  if (rc == SQLITE_ROW)
    it->out_ms = col_time(s, 0);
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  if (rc != SQLITE_ROW) {
    log_db(st, "heartbeat");
    return ZM_E_STORE;
  }
  return 0;
}

/* Runs one read or claim. Returns 0 or ZM_E_STORE. */
static int run_read(sq_store_t *st, item_t *it) {
  char t1[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s;
  switch (it->kind) {
  case ITEM_LIST_MANAGED:
    s = st->stmt[S_LIST_MANAGED];
    sqlite3_bind_text(s, 1, it->key, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, it->type);
    sqlite3_bind_int64(s, 3, limit_arg(it->limit));
    return collect(st, it, s);
  case ITEM_GET_MANAGED:
    s = st->stmt[it->type ? S_GET_MANAGED_BY_IDENTITY : S_GET_MANAGED];
    sqlite3_bind_text(s, 1, it->key, -1, SQLITE_STATIC);
    return collect(st, it, s);
  case ITEM_FIND_MANAGED:
    s = st->stmt[S_FIND_MANAGED];
    sqlite3_bind_text(s, 1, it->key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, limit_arg(it->limit));
    return collect(st, it, s);
  case ITEM_CLAIM_EXPIRED:
  case ITEM_CLAIM_TOMBS:
  case ITEM_CLAIM_PENDING:
    s = st->stmt[it->kind == ITEM_CLAIM_EXPIRED ? S_SEL_EXPIRED
                 : it->kind == ITEM_CLAIM_TOMBS ? S_SEL_TOMBS
                                                : S_SEL_PENDING];
    bind_time(s, 1, it->t1, t1);
    sqlite3_bind_int64(s, 2, limit_arg(it->limit));
    if (collect(st, it, s) != 0)
      return ZM_E_STORE;
    return claim_rows(st, it);
  case ITEM_BEAT:
    return run_beat(st, it);
  default: /* ITEM_CHANGES: not shared, nothing to report */
    return 0;
  }
}

/* Runs batch b as one transaction on the calling thread (the worker, or the
 * loop thread in close). Every item's err is set; on a lost transaction
 * every item gets ZM_E_STORE and no rows. */
static void run_batch(sq_store_t *st, itemq_t *b) {
  int fatal = exec_stmt(st, b->writes ? S_BEGIN_IMM : S_BEGIN, "begin");
  for (item_t *it = b->head; it != NULL && !fatal; it = it->next) {
    it->err = 0;
    if (it->kind == ITEM_UNIT)
      fatal = run_unit(st, it);
    else
      fatal = run_read(st, it);
  }
  if (!fatal)
    fatal = exec_stmt(st, S_COMMIT, "commit");
  st->batch_groups++;
  if (!fatal)
    return;
  ZM_ERROR("store %s: group of %zu units failed, none of it is durable",
           st->path, b->units);
  if (!sqlite3_get_autocommit(st->db))
    exec_stmt(st, S_ROLLBACK, "rollback");
  st->batch_failed++;
  for (item_t *it = b->head; it != NULL; it = it->next) {
    it->err = ZM_E_STORE;
    drop_rows(it);
  }
}
static void worker_main(void *arg) {
  sq_store_t *st = arg;
  zm_thread_helper("zm-store");
  uv_mutex_lock(&st->mu);
  for (;;) {
    while (!st->work_ready && !st->stop)
      uv_cond_wait(&st->cond, &st->mu);
    if (!st->work_ready)
      break;
    uv_mutex_unlock(&st->mu);
    ZM_STAT_STORE_TIMED(st->batch.units, run_batch(st, &st->batch));
    uv_mutex_lock(&st->mu);
    st->work_ready = 0;
    st->done_ready = 1;
    uv_cond_broadcast(&st->cond);
    uv_mutex_unlock(&st->mu);
    /* The handle outlives this call: close joins us before uv_close. */
    uv_async_send(&st->h->async);
    uv_mutex_lock(&st->mu);
  }
  uv_mutex_unlock(&st->mu);
}

/* Period of the background PASSIVE checkpoint (ms). PASSIVE never blocks
 * the writer and copies WAL frames into the database (with its fsync) off
 * the commit path. Under continuous writes the WAL is never fully
 * checkpointed at the instant a write transaction starts, so it would never
 * be reset and would grow without bound: the writer therefore keeps an
 * automatic checkpoint at WAL_AUTOCHECKPOINT_PRAGMA frames (32 MiB), which
 * finds most frames already copied, and after which the WAL restarts. */
#define CKPT_PERIOD_MS 250u
#define WAL_AUTOCHECKPOINT_PRAGMA "PRAGMA wal_autocheckpoint=8192"

static void ckpt_main(void *arg) {
  sq_store_t *st = arg;
  zm_thread_helper("zm-checkpoint");
  /* Background work: when the service is pinned to one core, copying pages
   * must not take the CPU from the loop or the writer (nice +10). */
  if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10) != 0)
    ZM_DEBUG("store %s: cannot lower the checkpointer's priority", st->path);
  uv_mutex_lock(&st->mu);
  while (!st->ckpt_stop) {
    uv_cond_timedwait(&st->ckpt_cond, &st->mu,
                      (uint64_t)CKPT_PERIOD_MS * 1000000u);
    if (st->ckpt_stop)
      break;
    uv_mutex_unlock(&st->mu);
    int log = 0, done = 0;
    int rc = sqlite3_wal_checkpoint_v2(st->ckpt_db, NULL,
                                       SQLITE_CHECKPOINT_PASSIVE, &log, &done);
    if (rc != SQLITE_OK && rc != SQLITE_BUSY && rc != SQLITE_LOCKED)
      ZM_WARN("store %s: checkpoint: %s", st->path,
              sqlite3_errmsg(st->ckpt_db));
    uv_mutex_lock(&st->mu);
  }
  uv_mutex_unlock(&st->mu);
}

/* ==== loop side =========================================================== */

static void kick(sq_store_t *st) {
  if (st->closing || st->queue.head == NULL)
    return;
  if (!uv_is_active((uv_handle_t *)&st->h->prepare))
    uv_prepare_start(&st->h->prepare, on_prepare);
}

/* Hands the queue to the worker, or, when a commit started less than
 * the spacing ago, arms the linger timer to do it then (force: the
 * timer fired; the loop's cached clock may run a little behind hrtime). */
static void dispatch(sq_store_t *st, int force) {
  if (st->in_flight || st->queue.head == NULL)
    return;
  uint64_t now = uv_hrtime();
  uint64_t spacing = st->spacing_ns;
  if (!force && !st->closing && now - st->last_dispatch_ns < spacing &&
      st->queue.items < SPACING_MAX_ITEMS) {
    if (!uv_is_active((uv_handle_t *)&st->h->linger)) {
      uint64_t wait_ms =
          (st->last_dispatch_ns + spacing - now + 999999u) / 1000000u;
      uv_timer_start(&st->h->linger, on_linger, wait_ms, 0);
    }
    return;
  }
  uv_timer_stop(&st->h->linger);
  st->last_dispatch_ns = now;
  q_take(&st->queue, &st->batch);
  st->in_flight = 1;
  uv_ref((uv_handle_t *)&st->h->async); /* keep uv_run alive for the answer */
  uv_mutex_lock(&st->mu);
  st->work_ready = 1;
  uv_mutex_unlock(&st->mu);
  /* after the unlock: the writer, if woken on this core, must not find the
   * mutex still held (zm/thread.h) */
  uv_cond_signal(&st->cond);
}

/* Runs the callbacks of the finished batch, in submission order, and frees
 * its items. Callbacks may submit (that goes to the queue, not the batch). */
static void deliver(sq_store_t *st) {
  itemq_t b = st->batch;
  memset(&st->batch, 0, sizeof st->batch);
  st->stats.groups += st->batch_groups;
  st->stats.failed_groups += st->batch_failed;
  st->batch_groups = st->batch_failed = 0;
  st->in_flight = 0;
  st->delivering++;
  item_t *next;
  for (item_t *it = b.head; it != NULL; it = next) {
    next = it->next;
    switch (it->kind) {
    case ITEM_UNIT:
      if (it->cb.unit)
        it->cb.unit(it->err, it->data);
      break;
    case ITEM_LIST_MANAGED:
    case ITEM_GET_MANAGED:
    case ITEM_FIND_MANAGED:
      it->cb.managed(it->err, it->rows, it->nrows, it->data);
      break;
    case ITEM_CLAIM_EXPIRED:
    case ITEM_CLAIM_TOMBS:
      it->cb.tomb(it->err, it->rows, it->nrows, it->data);
      break;
    case ITEM_CLAIM_PENDING:
      it->cb.pending(it->err, it->rows, it->nrows, it->data);
      break;
    case ITEM_BEAT:
      it->cb.beat(it->err, it->t1, it->err ? 0 : it->out_ms, it->data);
      break;
    default:
      it->cb.changes(it->err, NULL, NULL, 0, it->data);
      break;
    }
    drop_rows(it);
    free(it);
  }
  st->delivering--;
}

static void on_prepare(uv_prepare_t *p) {
  handles_t *h = container_of(p, handles_t, prepare);
  uv_prepare_stop(p);
  if (h->st != NULL)
    dispatch(h->st, 0);
}

static void on_linger(uv_timer_t *t) {
  handles_t *h = container_of(t, handles_t, linger);
  if (h->st != NULL)
    dispatch(h->st, 1);
}

static void on_async(uv_async_t *a) {
  handles_t *h = container_of(a, handles_t, async);
  sq_store_t *st = h->st;
  if (st == NULL || !st->in_flight)
    return;
  uv_mutex_lock(&st->mu);
  int ready = st->done_ready;
  st->done_ready = 0;
  uv_mutex_unlock(&st->mu);
  if (!ready)
    return;
  uv_unref((uv_handle_t *)&st->h->async);
  deliver(st);
  /* What queued meanwhile (and what the callbacks submitted) goes at the
   * next prepare, together with whatever the rest of this turn adds. */
  kick(st);
}

static void on_handle_closed(uv_handle_t *hd) {
  handles_t *h = hd->data;
  if (--h->open == 0)
    free(h);
}

/* ==== the backend (zm__sqlite_vt)
 * ========================================================== */

static int pragma(sq_store_t *st, const char *sql) {
  if (sqlite3_exec(st->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
    ZM_ERROR("store %s: %s: %s", st->path, sql, sqlite3_errmsg(st->db));
    return ZM_E_STORE;
  }
  return 0;
}

static int set_wal(sq_store_t *st) {
  sqlite3_stmt *s = NULL;
  int ok = 0;
  if (sqlite3_prepare_v2(st->db, "PRAGMA journal_mode=WAL", -1, &s, NULL) ==
          SQLITE_OK &&
      sqlite3_step(s) == SQLITE_ROW) {
    const char *mode = (const char *)sqlite3_column_text(s, 0);
    ok = mode != NULL && strcmp(mode, "wal") == 0;
  }
  sqlite3_finalize(s);
  if (!ok)
    ZM_ERROR("store %s: cannot enable WAL mode: %s", st->path,
             sqlite3_errmsg(st->db));
  return ok ? 0 : ZM_E_STORE;
}

/* SQLite's allocation statistics (sqlite3_memory_used and friends, which
 * nothing here reads) cost a global mutex and a malloc_usable_size() on
 * every allocation: about a fifth of the CPU of a one-unit commit. They can
 * only be turned off before the library initializes, i.e. before the first
 * open of the process; a later call fails (SQLITE_MISUSE) and changes
 * nothing. */
static void sqlite_global_config(void) {
  (void)sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
}

static int sq_open(zm_store_t **out, uv_loop_t *loop,
                   const zm_store_config_t *cfg) {
  ZM_ASSERT(out != NULL && loop != NULL && cfg != NULL && cfg->path != NULL);
  *out = NULL;
  static uv_once_t config_once = UV_ONCE_INIT;
  uv_once(&config_once, sqlite_global_config);
  sq_store_t *st = zm_xcalloc(1, sizeof *st);
  st->base.vt = &zm__sqlite_vt;
  st->loop = loop;
  st->path = zm_xstrdup(cfg->path);
  st->spacing_ns = (uint64_t)(cfg->commit_spacing_ms ? cfg->commit_spacing_ms
                                                     : COMMIT_SPACING_MS) *
                   1000000u;
  int rc = sqlite3_open_v2(
      cfg->path, &st->db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
  if (rc != SQLITE_OK) {
    ZM_ERROR("store %s: open: %s", st->path,
             st->db ? sqlite3_errmsg(st->db) : sqlite3_errstr(rc));
    goto fail_db;
  }
  sqlite3_extended_result_codes(st->db, 1);
  sqlite3_busy_timeout(st->db, BUSY_TIMEOUT_MS);
  /* 1 KiB pages (a no-op on an existing database): an ExtendIdentityLease
   * with a random key dirties about two leaf pages (the row, and its old
   * entry in the lease index), and every dirty page is written to the WAL
   * and later copied back. Small pages cut those bytes four-fold, which is
   * what bounds extension throughput. Must precede WAL mode. */
  if (pragma(st, "PRAGMA page_size=1024") != 0 || set_wal(st) != 0 ||
      pragma(st, cfg->sync_full ? "PRAGMA synchronous=FULL"
                                : "PRAGMA synchronous=NORMAL") != 0 ||
      pragma(st, "PRAGMA foreign_keys=OFF") != 0 ||
      pragma(st, "PRAGMA temp_store=MEMORY") != 0 ||
      pragma(st, WAL_AUTOCHECKPOINT_PRAGMA) != 0 ||
      pragma(st, "PRAGMA journal_size_limit=67108864") != 0 ||
      pragma(st, CACHE_PRAGMA) != 0 || pragma(st, MMAP_PRAGMA) != 0)
    goto fail_db;
  if (zm__store_migrate(st->db, st->path) != 0)
    goto fail_db;
  for (int i = 0; i < S__COUNT; i++) {
    if (sqlite3_prepare_v3(st->db, STMT_SQL[i], -1, SQLITE_PREPARE_PERSISTENT,
                           &st->stmt[i], NULL) != SQLITE_OK) {
      ZM_ERROR("store %s: prepare \"%s\": %s", st->path, STMT_SQL[i],
               sqlite3_errmsg(st->db));
      goto fail_stmts;
    }
  }
  if (uv_mutex_init(&st->mu) != 0)
    goto fail_stmts;
  if (uv_cond_init(&st->cond) != 0)
    goto fail_cond;
  st->h = zm_xcalloc(1, sizeof *st->h);
  st->h->st = st;
  if (uv_async_init(loop, &st->h->async, on_async) != 0)
    goto fail_async;
  st->h->async.data = st->h;
  uv_unref((uv_handle_t *)&st->h->async);
  uv_prepare_init(loop, &st->h->prepare); /* cannot fail on Unix */
  st->h->prepare.data = st->h;
  uv_timer_init(loop, &st->h->linger); /* cannot fail either */
  st->h->linger.data = st->h;
  st->h->open = 3;
  if (uv_thread_create(&st->thread, worker_main, st) != 0) {
    ZM_ERROR("store %s: cannot start the worker thread", st->path);
    goto fail_thread;
  }
  if (uv_cond_init(&st->ckpt_cond) != 0)
    abort(); /* only fails on resource exhaustion at start-up */
  /* The checkpointer's connection must have read the database once to know
   * it is in WAL mode (else every checkpoint is a silent no-op, wal=-1). */
  if (sqlite3_open_v2(cfg->path, &st->ckpt_db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                      NULL) != SQLITE_OK ||
      sqlite3_exec(st->ckpt_db, "PRAGMA journal_mode=WAL", NULL, NULL, NULL) !=
          SQLITE_OK ||
      uv_thread_create(&st->ckpt_thread, ckpt_main, st) != 0) {
    /* Not fatal: fall back to automatic checkpoints inside commits. */
    ZM_WARN("store %s: no background checkpointer; checkpoints run inline",
            st->path);
    sqlite3_close(st->ckpt_db);
    st->ckpt_db = NULL;
    sqlite3_exec(st->db, "PRAGMA wal_autocheckpoint=1000", NULL, NULL, NULL);
    /* (the default: small, frequent checkpoints inside commits) */
  }
  *out = &st->base;
  return 0;

fail_thread:
  st->h->st = NULL;
  uv_close((uv_handle_t *)&st->h->prepare, on_handle_closed);
  uv_close((uv_handle_t *)&st->h->async, on_handle_closed);
  uv_close((uv_handle_t *)&st->h->linger, on_handle_closed);
  st->h = NULL; /* freed by the close callbacks */
  uv_cond_destroy(&st->cond);
  uv_mutex_destroy(&st->mu);
  goto fail_stmts;
fail_async:
  free(st->h);
  uv_cond_destroy(&st->cond);
fail_cond:
  uv_mutex_destroy(&st->mu);
fail_stmts:
  for (int i = 0; i < S__COUNT; i++)
    sqlite3_finalize(st->stmt[i]);
fail_db:
  sqlite3_close(st->db); /* NULL is a no-op */
  free(st->path);
  free(st);
  return ZM_E_STORE;
}

/* Blocks until the worker has finished the batch in flight (if any). */
static int wait_worker(sq_store_t *st) {
  if (!st->in_flight)
    return 0;
  uv_mutex_lock(&st->mu);
  while (!st->done_ready)
    uv_cond_wait(&st->cond, &st->mu);
  uv_mutex_unlock(&st->mu);
  return 1;
}

static void sq_close(zm_store_t *base) {
  if (base == NULL)
    return;
  sq_store_t *st = (sq_store_t *)base;
  ZM_ASSERT(!st->delivering); /* not from inside a store callback */
  st->closing = 1;
  if (wait_worker(st)) {
    st->done_ready = 0;
    uv_unref((uv_handle_t *)&st->h->async);
    deliver(st);
  }
  uv_mutex_lock(&st->mu);
  st->stop = 1;
  st->ckpt_stop = 1;
  uv_cond_broadcast(&st->cond);
  uv_cond_broadcast(&st->ckpt_cond);
  uv_mutex_unlock(&st->mu);
  uv_thread_join(&st->thread);
  if (st->ckpt_db != NULL) {
    uv_thread_join(&st->ckpt_thread);
    sqlite3_close(st->ckpt_db);
    st->ckpt_db = NULL;
  }
  uv_cond_destroy(&st->ckpt_cond);
  /* The worker is gone: the connection is ours. Callbacks may keep adding
   * units; commit until the queue stays empty. */
  while (st->queue.head != NULL) {
    q_take(&st->queue, &st->batch);
    run_batch(st, &st->batch);
    deliver(st);
  }
  for (int i = 0; i < S__COUNT; i++)
    sqlite3_finalize(st->stmt[i]);
  if (sqlite3_close(st->db) != SQLITE_OK)
    log_db(st, "close");
  st->h->st = NULL;
  uv_close((uv_handle_t *)&st->h->prepare, on_handle_closed);
  uv_close((uv_handle_t *)&st->h->async, on_handle_closed);
  uv_close((uv_handle_t *)&st->h->linger, on_handle_closed);
  uv_cond_destroy(&st->cond);
  uv_mutex_destroy(&st->mu);
  free(st->path);
  free(st);
}

/* The string fields an op of its kind reads (at most ROW_STRS). */
static size_t op_strings(zm_store_op_t *op, const char **f[ROW_STRS]) {
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED:
    f[0] = &op->managed.ziti_identity_id;
    f[1] = &op->managed.identity_id;
    f[2] = &op->managed.ziti_service_id;
    f[3] = &op->managed.workload_id;
    f[4] = &op->managed.agent_id;
    f[5] = &op->managed.environment_id;
    return 6;
  case ZM_STORE_PUT_SERVICE:
    f[0] = &op->service.ziti_identity_id;
    return 1;
  case ZM_STORE_PUT_PENDING:
    f[0] = &op->pending.name;
    f[1] = &op->pending.ziti_identity_id;
    f[2] = &op->pending.agent_id;
    return 3;
  case ZM_STORE_SET_PENDING_ID:
    f[0] = &op->name;
    f[1] = &op->id;
    return 2;
  case ZM_STORE_DEL_PENDING:
  case ZM_STORE_TAKE_PENDING:
    f[0] = &op->name;
    return 1;
  case ZM_STORE_PUT_TOMB:
    f[0] = &op->tomb.ziti_identity_id;
    return 1;
  case ZM_STORE_EXTEND_LEASE:
  case ZM_STORE_RETIRE_MANAGED:
  case ZM_STORE_RETIRE_SERVICE:
  case ZM_STORE_DEL_TOMB:
  case ZM_STORE_DEFER_TOMB:
    f[0] = &op->id;
    return 1;
  case ZM_STORE_FLUSH_LEASES: /* the arrays: copied separately */
    return 0;
  }
  return 0;
}

static int is_flush(const zm_store_op_t *op) {
  return op->kind == ZM_STORE_FLUSH_LEASES && op->n > 0 && op->ids != NULL &&
         op->mss != NULL;
}

static void sq_submit(zm_store_t *base, const zm_store_op_t *ops, size_t n,
                      zm_store_cb cb, void *data) {
  sq_store_t *st = (sq_store_t *)base;
  ZM_ASSERT(st != NULL && (n == 0 || ops != NULL));
  /* One block: the item, the ops, FLUSH_LEASES arrays (8-byte elements, so
   * they stay aligned after the ops), then every string. */
  size_t arrays = 0, bytes = 0;
  for (size_t i = 0; i < n; i++) {
    zm_store_op_t tmp = ops[i];
    const char **f[ROW_STRS];
    size_t nf = op_strings(&tmp, f);
    for (size_t k = 0; k < nf; k++)
      if (*f[k] != NULL)
        bytes += strlen(*f[k]) + 1;
    if (is_flush(&ops[i])) {
      arrays += ops[i].n * (sizeof(const char *) + sizeof(int64_t));
      for (size_t k = 0; k < ops[i].n; k++)
        if (ops[i].ids[k] != NULL)
          bytes += strlen(ops[i].ids[k]) + 1;
    }
  }
  item_t *it = zm_xcalloc(1, sizeof *it + n * sizeof *ops + arrays + bytes);
  it->kind = ITEM_UNIT;
  it->cb.unit = cb;
  it->data = data;
  it->ops = (zm_store_op_t *)(void *)(it + 1);
  it->nops = n;
  char *arr = (char *)(it->ops + n);
  char *p = arr + arrays;
  for (size_t i = 0; i < n; i++) {
    zm_store_op_t *op = &it->ops[i];
    *op = ops[i];
    /* Only the fields this kind reads survive; the rest may be garbage. */
    const char *keep[ROW_STRS] = {NULL};
    const char **f[ROW_STRS];
    size_t nf = op_strings(op, f);
    for (size_t k = 0; k < nf; k++)
      keep[k] = *f[k];
    op->managed.ziti_identity_id = op->managed.identity_id = NULL;
    op->managed.ziti_service_id = op->managed.workload_id = NULL;
    op->managed.agent_id = op->managed.environment_id = NULL;
    op->service.ziti_identity_id = NULL;
    op->pending.name = op->pending.ziti_identity_id = NULL;
    op->pending.agent_id = NULL;
    op->tomb.ziti_identity_id = NULL;
    op->id = op->name = NULL;
    op->ids = NULL;
    op->mss = NULL;
    for (size_t k = 0; k < nf; k++) {
      if (keep[k] == NULL)
        continue;
      size_t len = strlen(keep[k]) + 1;
      memcpy(p, keep[k], len);
      *f[k] = p;
      p += len;
    }
    if (!is_flush(&ops[i])) {
      op->n = 0;
      continue;
    }
    const char **ids = (const char **)(void *)arr;
    arr += op->n * sizeof *ids;
    int64_t *mss = (int64_t *)(void *)arr;
    arr += op->n * sizeof *mss;
    memcpy(mss, ops[i].mss, op->n * sizeof *mss);
    for (size_t k = 0; k < op->n; k++) {
      if (ops[i].ids[k] == NULL) {
        ids[k] = NULL;
        continue;
      }
      size_t len = strlen(ops[i].ids[k]) + 1;
      memcpy(p, ops[i].ids[k], len);
      ids[k] = p;
      p += len;
    }
    op->ids = ids;
    op->mss = mss;
  }
  st->stats.units++;
  q_push(&st->queue, it);
  kick(st);
}

static item_t *new_read(int kind, const char *key, size_t limit, void *data) {
  if (key == NULL)
    key = "";
  size_t klen = strlen(key) + 1;
  item_t *it = zm_xcalloc(1, sizeof *it + klen);
  it->kind = kind;
  it->data = data;
  memcpy(it + 1, key, klen);
  it->key = (const char *)(it + 1);
  it->limit = limit;
  return it;
}

static void enqueue(sq_store_t *st, item_t *it) {
  q_push(&st->queue, it);
  kick(st);
}

static void sq_list_managed(zm_store_t *base, int type, const char *after_id,
                            size_t limit, zm_store_managed_list_cb cb,
                            void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_LIST_MANAGED, after_id, limit, data);
  it->type = type;
  it->cb.managed = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_get_managed(zm_store_t *base, const char *id,
                           zm_store_managed_list_cb cb, void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_GET_MANAGED, id, 1, data);
  it->cb.managed = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_find_managed(zm_store_t *base, const char *identity_id,
                            size_t limit, zm_store_managed_list_cb cb,
                            void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_FIND_MANAGED, identity_id, limit, data);
  it->cb.managed = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_find_managed_by_identity(zm_store_t *base,
                                        const char *identity_id,
                                        zm_store_managed_list_cb cb,
                                        void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_GET_MANAGED, identity_id, 1, data);
  it->type = 1; /* by identity_id */
  it->cb.managed = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_claim_expired(zm_store_t *base, int64_t cut_ms, int64_t now_ms,
                             int64_t claim_until_ms, size_t limit,
                             zm_store_tomb_list_cb cb, void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_CLAIM_EXPIRED, NULL, limit, data);
  it->t1 = cut_ms;
  it->t2 = now_ms;
  it->t3 = claim_until_ms;
  it->cb.tomb = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_claim_tombs(zm_store_t *base, int64_t now_ms,
                           int64_t claim_until_ms, size_t limit,
                           zm_store_tomb_list_cb cb, void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_CLAIM_TOMBS, NULL, limit, data);
  it->t1 = now_ms;
  it->t2 = claim_until_ms;
  it->cb.tomb = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_claim_pending(zm_store_t *base, int64_t now_ms,
                             int64_t claim_until_ms, size_t limit,
                             zm_store_pending_list_cb cb, void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_CLAIM_PENDING, NULL, limit, data);
  it->t1 = now_ms;
  it->t2 = claim_until_ms;
  it->cb.pending = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_heartbeat(zm_store_t *base, int64_t local_now_ms, int64_t gap_ms,
                         zm_store_beat_cb cb, void *data) {
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_BEAT, NULL, 0, data);
  it->t1 = local_now_ms;
  it->t2 = gap_ms;
  it->cb.beat = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_changes(zm_store_t *base, int64_t after_seq, int64_t since_ms,
                       size_t limit, zm_store_changes_cb cb, void *data) {
  (void)after_seq;
  (void)since_ms;
  (void)limit;
  ZM_ASSERT(base != NULL && cb != NULL);
  item_t *it = new_read(ITEM_CHANGES, NULL, 0, data);
  it->cb.changes = cb;
  enqueue((sq_store_t *)base, it);
}

static void sq_get_stats(const zm_store_t *base, zm_store_stats_t *out) {
  const sq_store_t *st = (const sq_store_t *)base;
  *out = st->stats;
  out->queued = st->queue.units;
  out->reconnects = 0;
}

/* ==== start-up load ======================================================= */

/* Counts unparseable timestamps, and remembers the first row's key. */
typedef struct {
  size_t bad;
  char first[64];
} badtime_t;

static int64_t load_time(sqlite3_stmt *s, int col, int keycol, badtime_t *b) {
  const char *t = (const char *)sqlite3_column_text(s, col);
  int64_t ms = 0;
  if (t != NULL &&
      zm__store_time_parse(t, (size_t)sqlite3_column_bytes(s, col), &ms) == 0)
    return ms;
  if (b->bad++ == 0) {
    const char *k = (const char *)sqlite3_column_text(s, keycol);
    snprintf(b->first, sizeof b->first, "%s", k ? k : "(null)");
  }
  return 0;
}

static int sq_load(zm_store_t *base,
                   void (*on_managed)(const zm_managed_row_t *r, void *data),
                   void (*on_service)(const zm_service_row_t *r, void *data),
                   void (*on_pending)(const zm_pending_row_t *r, void *data),
                   void *data) {
  sq_store_t *st = (sq_store_t *)base;
  ZM_ASSERT(st != NULL && !st->delivering);
  /* The worker must let go of the connection; its callbacks are delivered
   * later by on_async as usual. */
  wait_worker(st);
  badtime_t bad = {0};
  sqlite3_stmt *s;
  int rc = SQLITE_DONE, err = 0;
  /* The scans read each leaf page once: a small cache for them, so the
   * start-up peak stays near the index's own size. */
  if (pragma(st, LOAD_CACHE_PRAGMA) != 0)
    return ZM_E_STORE;
  /* One read transaction: the three scans see one snapshot. */
  if (exec_stmt(st, S_BEGIN, "begin load") != 0)
    goto restore;
  if (on_managed != NULL) {
    s = st->stmt[S_LOAD_MANAGED];
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      zm_managed_row_t r = {
          .ziti_identity_id = (const char *)sqlite3_column_text(s, 0),
          .identity_id = (const char *)sqlite3_column_text(s, 1),
          .identity_type = sqlite3_column_int(s, 2),
          .created_at_ms = load_time(s, 3, 0, &bad),
          .ziti_service_id = (const char *)sqlite3_column_text(s, 4),
          .workload_id = (const char *)sqlite3_column_text(s, 5),
          .agent_id = (const char *)sqlite3_column_text(s, 6),
          .environment_id = (const char *)sqlite3_column_text(s, 7),
      };
      if (r.ziti_identity_id == NULL || r.identity_id == NULL)
        continue; /* NOT NULL columns: only a hand-made table has these */
      on_managed(&r, data);
    }
    sqlite3_reset(s);
    if (rc != SQLITE_DONE)
      goto fail;
  }
  if (on_service != NULL) {
    s = st->stmt[S_LOAD_SERVICE];
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      zm_service_row_t r = {
          .ziti_identity_id = (const char *)sqlite3_column_text(s, 0),
          .service_type = sqlite3_column_int(s, 1),
          .lease_expires_ms = load_time(s, 2, 0, &bad),
          .created_at_ms = load_time(s, 3, 0, &bad),
      };
      if (r.ziti_identity_id == NULL)
        continue;
      on_service(&r, data);
    }
    sqlite3_reset(s);
    if (rc != SQLITE_DONE)
      goto fail;
  }
  if (on_pending != NULL) {
    s = st->stmt[S_LOAD_PENDING];
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      zm_pending_row_t r = {
          .name = (const char *)sqlite3_column_text(s, 0),
          .kind = sqlite3_column_int(s, 1),
          .type = sqlite3_column_int(s, 2),
          .ziti_identity_id = (const char *)sqlite3_column_text(s, 3),
          .agent_id = (const char *)sqlite3_column_text(s, 4),
          .created_at_ms = load_time(s, 5, 0, &bad),
          .resolve_after_ms = load_time(s, 6, 0, &bad),
      };
      if (r.name == NULL)
        continue;
      on_pending(&r, data);
    }
    sqlite3_reset(s);
    if (rc != SQLITE_DONE)
      goto fail;
  }
  exec_stmt(st, S_COMMIT, "end load");
  /* The scan's leaf pages are not read again: give that memory back. */
  sqlite3_db_release_memory(st->db);
  if (pragma(st, CACHE_PRAGMA) != 0)
    return ZM_E_STORE;
  if (bad.bad > 0)
    ZM_WARN("store %s: %zu unparseable timestamps read as 1970-01-01 "
            "(first in row %s)",
            st->path, bad.bad, bad.first);
  return 0;

fail:
  log_db(st, "load");
  if (!sqlite3_get_autocommit(st->db))
    exec_stmt(st, S_ROLLBACK, "rollback load");
restore:
  err = ZM_E_STORE;
  pragma(st, CACHE_PRAGMA);
  return err;
}

const zm__store_vt zm__sqlite_vt = {
    .name = "sqlite",
    .shared = 0,
    .open = sq_open,
    .close = sq_close,
    .load = sq_load,
    .submit = sq_submit,
    .list_managed = sq_list_managed,
    .get_managed = sq_get_managed,
    .find_managed = sq_find_managed,
    .find_managed_by_identity = sq_find_managed_by_identity,
    .claim_expired = sq_claim_expired,
    .claim_tombs = sq_claim_tombs,
    .claim_pending = sq_claim_pending,
    .heartbeat = sq_heartbeat,
    .changes = sq_changes,
    .get_stats = sq_get_stats,
};
