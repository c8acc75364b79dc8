/*
 * sqlite.c - the SQLite backend of zm_store (include/zm/store.h).
 *
 * Threads. The connection belongs to one thread at a time: the loop thread
 * at open, load and close (when no batch is in flight), otherwise one
 * dedicated worker thread of ours. A dedicated thread rather than
 * uv_queue_work because the libuv pool is shared (DNS, fs, crypto): a slow
 * key generation must never hold a commit back. The hand-off is one mutex,
 * one condvar and one uv_async:
 *
 *   loop: submit -> queue -> uv_prepare (before the loop blocks) -> dispatch
 *         batch -> worker: BEGIN; per unit SAVEPOINT/ops/RELEASE; reads; COMMIT
 *         -> done + uv_async_send -> loop: every callback, in submission order
 *
 * Only one batch is in flight; what is submitted meanwhile waits in the queue
 * and forms the next batch (at most MAX_BATCH_ITEMS per transaction; the rest
 * chains into the following ones). Callbacks never run inside the call that
 * queued them: they run from on_async (or from zm_store_close).
 *
 * Handles. The uv_prepare and uv_async live in a block of their own that is
 * freed by their close callbacks, so zm_store_close can free the store at
 * once; the caller lets the loop run (uv_run NOWAIT or DEFAULT) afterwards so
 * those close callbacks fire before uv_loop_close. The async handle is
 * unreferenced except while a batch is in flight, so an idle store never
 * keeps uv_run alive.
 */
#include "store_internal.h"

#include "zm/log.h"
#include "zm/store.h"
#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* One transaction's worth: bounds the time the write lock is held and the
 * memory a batch pins; a longer queue chains into the next transactions. */
#define MAX_BATCH_ITEMS 4096
/* Milliseconds a statement waits for another process's lock (an operator's
 * sqlite3 shell) before the group fails with ZM_E_STORE. */
#define BUSY_TIMEOUT_MS 5000
/* Page cache: 4 MiB (a negative cache_size is KiB). Reads are served by the
 * in-memory index, so the cache only needs the inner B-tree pages that
 * random-key writes walk (about 1% of a million-row table); a bigger cache
 * mostly holds leaf pages of the start-up scan and costs RSS. */
#define CACHE_PRAGMA "PRAGMA cache_size=-4096"

/* ==== prepared statements ============================================== */

#define STMTS(X)                                                               \
  X(BEGIN, "BEGIN")                                                            \
  X(BEGIN_IMM, "BEGIN IMMEDIATE")                                              \
  X(COMMIT, "COMMIT")                                                          \
  X(ROLLBACK, "ROLLBACK")                                                      \
  X(SAVEPOINT, "SAVEPOINT u")                                                  \
  X(RELEASE, "RELEASE u")                                                      \
  X(ROLLBACK_TO, "ROLLBACK TO u")                                              \
  X(PUT_MANAGED, "INSERT OR REPLACE INTO managed_identities(ziti_identity_id," \
                 " identity_id, identity_type, created_at) VALUES(?,?,?,?)")   \
  X(DEL_MANAGED, "DELETE FROM managed_identities WHERE ziti_identity_id=?")    \
  X(PUT_SERVICE, "INSERT OR REPLACE INTO service_identities(ziti_identity_id," \
                 " service_type, lease_expires_at, created_at)"                \
                 " VALUES(?,?,?,?)")                                           \
  X(EXTEND_LEASE, "UPDATE service_identities SET lease_expires_at=?"           \
                  " WHERE ziti_identity_id=?")                                 \
  X(DEL_SERVICE_IF, "DELETE FROM service_identities WHERE ziti_identity_id=?"  \
                    " AND lease_expires_at<=?")                                \
  X(DEL_SERVICE, "DELETE FROM service_identities WHERE ziti_identity_id=?")    \
  X(PUT_PENDING, "INSERT INTO pending_identities(name, kind, type,"            \
                 " ziti_identity_id, created_at) VALUES(?,?,?,?,?)")           \
  X(SET_PENDING_ID, "UPDATE pending_identities SET ziti_identity_id=?"         \
                    " WHERE name=?")                                           \
  X(DEL_PENDING, "DELETE FROM pending_identities WHERE name=?")                \
  X(LIST_MANAGED, "SELECT ziti_identity_id, identity_id, identity_type,"       \
                  " created_at FROM managed_identities"                        \
                  " WHERE ziti_identity_id>?1 AND (?2=0 OR identity_type=?2)"  \
                  " ORDER BY ziti_identity_id LIMIT ?3")                       \
  X(LIST_EXPIRED, "SELECT ziti_identity_id, service_type, lease_expires_at,"   \
                  " created_at FROM service_identities"                        \
                  " WHERE lease_expires_at<=?1 AND lease_expires_at>=?2"       \
                  " AND (lease_expires_at>?2 OR ziti_identity_id>?3)"          \
                  " ORDER BY lease_expires_at, ziti_identity_id LIMIT ?4")     \
  X(LIST_PENDING, "SELECT name, kind, type, ziti_identity_id, created_at"      \
                  " FROM pending_identities WHERE created_at<=?1"              \
                  " ORDER BY created_at, name LIMIT ?2")                       \
  X(LOAD_MANAGED, "SELECT ziti_identity_id, identity_id, identity_type,"       \
                  " created_at FROM managed_identities")                       \
  X(LOAD_SERVICE, "SELECT ziti_identity_id, service_type, lease_expires_at,"   \
                  " created_at FROM service_identities")                       \
  X(LOAD_PENDING, "SELECT name, kind, type, ziti_identity_id, created_at"      \
                  " FROM pending_identities")

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

enum { ITEM_UNIT, ITEM_LIST_MANAGED, ITEM_LIST_EXPIRED, ITEM_LIST_PENDING };

/* One unit or one read, in one allocation with its copied ops and strings.
 * Read results are built by the worker (rows + the strings they point to)
 * and freed after the callback. */
typedef struct item {
  struct item *next;
  int kind; /* ITEM_* */
  int err;  /* outcome, set by the worker */
  void *data;
  union {
    zm_store_cb unit;
    zm_store_managed_list_cb managed;
    zm_store_service_list_cb service;
    zm_store_pending_list_cb pending;
  } cb;
  zm_store_op_t *ops; /* ITEM_UNIT: nops copies, in this block */
  size_t nops;
  int type;        /* LIST_MANAGED: identity type, 0 = any */
  int64_t t1, t2;  /* LIST_EXPIRED: now, after; LIST_PENDING: older_than */
  const char *key; /* LIST_*: cursor id, in this block, "" = start */
  size_t limit;    /* LIST_*: max rows */
  void *rows;      /* result rows (malloc), nrows of them */
  size_t nrows;
  char *strs; /* result strings the rows point into (malloc) */
} item_t;

typedef struct {
  item_t *head, *tail;
  size_t items, units;
} itemq_t;

typedef struct handles handles_t;

struct zm_store {
  uv_loop_t *loop;
  sqlite3 *db;
  char *path; /* owned, for log lines */
  sqlite3_stmt *stmt[S__COUNT];
  handles_t *h;  /* freed by the handles' close callbacks */
  itemq_t queue; /* loop thread only: waiting for the next batch */
  int in_flight; /* loop thread only: batch handed to the worker */
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
};

struct handles {
  uv_prepare_t prepare;
  uv_async_t async;
  zm_store_t *st; /* NULL once the store is closed */
  int open;       /* handles not yet closed */
};

static void on_prepare(uv_prepare_t *p);
static void on_async(uv_async_t *a);
static void on_handle_closed(uv_handle_t *hd);
static void worker_main(void *arg);
static void ckpt_main(void *arg);

static void q_push(itemq_t *q, item_t *it) {
  it->next = NULL;
  if (q->tail)
    q->tail->next = it;
  else
    q->head = it;
  q->tail = it;
  q->items++;
  q->units += it->kind == ITEM_UNIT;
}

/* Moves up to MAX_BATCH_ITEMS items from q to out (empty). */
static void q_take(itemq_t *q, itemq_t *out) {
  memset(out, 0, sizeof *out);
  while (q->head != NULL && out->items < MAX_BATCH_ITEMS) {
    item_t *it = q->head;
    q->head = it->next;
    q->items--;
    q->units -= it->kind == ITEM_UNIT;
    q_push(out, it);
  }
  if (q->head == NULL)
    q->tail = NULL;
}

/* ==== worker side: running a batch ======================================== */

static void log_db(const zm_store_t *st, const char *what) {
  ZM_ERROR("store %s: %s: %s", st->path, what, sqlite3_errmsg(st->db));
}

/* Steps s once, resets it and drops its bindings (so stack buffers bound
 * SQLITE_STATIC are never referenced afterwards). Returns the step code. */
static int step_once(sqlite3_stmt *s) {
  int rc = sqlite3_step(s);
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  return rc;
}

static int exec_stmt(zm_store_t *st, int which, const char *what) {
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
static int write_result(zm_store_t *st, int rc, const char *what) {
  if (rc == SQLITE_DONE)
    return 0;
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    ZM_WARN("store %s: %s: %s", st->path, what, sqlite3_errmsg(st->db));
    return ZM_E_INVAL;
  }
  log_db(st, what);
  return ZM_E_STORE;
}

static int run_op(zm_store_t *st, const zm_store_op_t *op) {
  char t1[ZM__STORE_TIME_BUF], t2[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s;
  int rc;
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED:
    s = st->stmt[S_PUT_MANAGED];
    bind_str(s, 1, op->managed.ziti_identity_id);
    bind_str(s, 2, op->managed.identity_id);
    sqlite3_bind_int(s, 3, op->managed.identity_type);
    bind_time(s, 4, op->managed.created_at_ms, t1);
    return write_result(st, step_once(s), "put managed");
  case ZM_STORE_DEL_MANAGED:
    s = st->stmt[S_DEL_MANAGED];
    bind_str(s, 1, op->id);
    return write_result(st, step_once(s), "delete managed");
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
  case ZM_STORE_DEL_SERVICE:
    if (op->ms == INT64_MAX) {
      s = st->stmt[S_DEL_SERVICE];
      bind_str(s, 1, op->id);
    } else {
      s = st->stmt[S_DEL_SERVICE_IF];
      bind_str(s, 1, op->id);
      bind_time(s, 2, op->ms, t1);
    }
    return write_result(st, step_once(s), "delete service");
  case ZM_STORE_PUT_PENDING:
    s = st->stmt[S_PUT_PENDING];
    bind_str(s, 1, op->pending.name);
    sqlite3_bind_int(s, 2, op->pending.kind);
    sqlite3_bind_int(s, 3, op->pending.type);
    bind_str(s, 4, op->pending.ziti_identity_id);
    bind_time(s, 5, op->pending.created_at_ms, t1);
    rc = step_once(s);
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
    s = st->stmt[S_DEL_PENDING];
    bind_str(s, 1, op->name);
    return write_result(st, step_once(s), "delete pending");
  }
  ZM_WARN("store %s: unknown op kind %d", st->path, (int)op->kind);
  return ZM_E_INVAL;
}

/* Runs one unit inside SAVEPOINT u. Sets it->err to 0 or the unit's own
 * failure (rolled back to the savepoint). Returns ZM_E_STORE if the whole
 * transaction is lost, else 0. */
static int run_unit(zm_store_t *st, item_t *it) {
  if (it->nops == 1) {
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

/* Runs one read; rows go to it->rows / it->strs. Returns 0 or ZM_E_STORE. */
static int run_read(zm_store_t *st, item_t *it) {
  char t1[ZM__STORE_TIME_BUF], t2[ZM__STORE_TIME_BUF];
  sqlite3_stmt *s;
  size_t rowsz;
  switch (it->kind) {
  case ITEM_LIST_MANAGED:
    s = st->stmt[S_LIST_MANAGED];
    sqlite3_bind_text(s, 1, it->key, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, it->type);
    sqlite3_bind_int64(s, 3, limit_arg(it->limit));
    rowsz = sizeof(zm_managed_row_t);
    break;
  case ITEM_LIST_EXPIRED:
    s = st->stmt[S_LIST_EXPIRED];
    bind_time(s, 1, it->t1, t1);
    if (it->key[0] == '\0')
      sqlite3_bind_text(s, 2, "", 0, SQLITE_STATIC);
    else
      bind_time(s, 2, it->t2, t2);
    sqlite3_bind_text(s, 3, it->key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 4, limit_arg(it->limit));
    rowsz = sizeof(zm_service_row_t);
    break;
  default:
    s = st->stmt[S_LIST_PENDING];
    bind_time(s, 1, it->t1, t1);
    sqlite3_bind_int64(s, 2, limit_arg(it->limit));
    rowsz = sizeof(zm_pending_row_t);
    break;
  }
  arena_t a = {0};
  size_t n = 0, cap = 0;
  char *rows = NULL;
  size_t *offs = NULL; /* two string offsets per row */
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      rows = zm_xrealloc(rows, cap * rowsz);
      offs = zm_xrealloc(offs, cap * 2 * sizeof *offs);
    }
    if (it->kind == ITEM_LIST_MANAGED) {
      zm_managed_row_t *r = (zm_managed_row_t *)(void *)(rows + n * rowsz);
      offs[2 * n] = arena_col(&a, s, 0);
      offs[2 * n + 1] = arena_col(&a, s, 1);
      r->identity_type = sqlite3_column_int(s, 2);
      r->created_at_ms = col_time(s, 3);
    } else if (it->kind == ITEM_LIST_EXPIRED) {
      zm_service_row_t *r = (zm_service_row_t *)(void *)(rows + n * rowsz);
      offs[2 * n] = arena_col(&a, s, 0);
      offs[2 * n + 1] = 0;
      r->service_type = sqlite3_column_int(s, 1);
      r->lease_expires_ms = col_time(s, 2);
      r->created_at_ms = col_time(s, 3);
    } else {
      zm_pending_row_t *r = (zm_pending_row_t *)(void *)(rows + n * rowsz);
      offs[2 * n] = arena_col(&a, s, 0);
      r->kind = sqlite3_column_int(s, 1);
      r->type = sqlite3_column_int(s, 2);
      offs[2 * n + 1] = arena_col(&a, s, 3);
      r->created_at_ms = col_time(s, 4);
    }
    n++;
  }
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  if (rc != SQLITE_DONE) {
    log_db(st, "list");
    free(rows);
    free(offs);
    free(a.buf);
    return ZM_E_STORE;
  }
  /* The arena has stopped moving: turn offsets into pointers. */
  for (size_t i = 0; i < n; i++) {
    void *r = rows + i * rowsz;
    if (it->kind == ITEM_LIST_MANAGED) {
      ((zm_managed_row_t *)r)->ziti_identity_id = arena_str(&a, offs[2 * i]);
      ((zm_managed_row_t *)r)->identity_id = arena_str(&a, offs[2 * i + 1]);
    } else if (it->kind == ITEM_LIST_EXPIRED) {
      ((zm_service_row_t *)r)->ziti_identity_id = arena_str(&a, offs[2 * i]);
    } else {
      ((zm_pending_row_t *)r)->name = arena_str(&a, offs[2 * i]);
      ((zm_pending_row_t *)r)->ziti_identity_id =
          arena_str(&a, offs[2 * i + 1]);
    }
  }
  free(offs);
  it->rows = rows;
  it->nrows = n;
  it->strs = a.buf;
  return 0;
}

static void drop_rows(item_t *it) {
  free(it->rows);
  free(it->strs);
  it->rows = NULL;
  it->strs = NULL;
  it->nrows = 0;
}

/* Runs batch b as one transaction on the calling thread (the worker, or the
 * loop thread in zm_store_close). Every item's err is set; on a lost
 * transaction every item gets ZM_E_STORE and no rows. */
static void run_batch(zm_store_t *st, itemq_t *b) {
  int fatal = exec_stmt(st, b->units ? S_BEGIN_IMM : S_BEGIN, "begin");
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
  zm_store_t *st = arg;
  uv_mutex_lock(&st->mu);
  for (;;) {
    while (!st->work_ready && !st->stop)
      uv_cond_wait(&st->cond, &st->mu);
    if (!st->work_ready)
      break;
    uv_mutex_unlock(&st->mu);
    run_batch(st, &st->batch);
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
  zm_store_t *st = arg;
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

static void kick(zm_store_t *st) {
  if (st->closing || st->queue.head == NULL)
    return;
  if (!uv_is_active((uv_handle_t *)&st->h->prepare))
    uv_prepare_start(&st->h->prepare, on_prepare);
}

static void dispatch(zm_store_t *st) {
  if (st->in_flight || st->queue.head == NULL)
    return;
  q_take(&st->queue, &st->batch);
  st->in_flight = 1;
  uv_ref((uv_handle_t *)&st->h->async); /* keep uv_run alive for the answer */
  uv_mutex_lock(&st->mu);
  st->work_ready = 1;
  uv_cond_signal(&st->cond);
  uv_mutex_unlock(&st->mu);
}

/* Runs the callbacks of the finished batch, in submission order, and frees
 * its items. Callbacks may submit (that goes to the queue, not the batch). */
static void deliver(zm_store_t *st) {
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
      it->cb.managed(it->err, it->rows, it->nrows, it->data);
      break;
    case ITEM_LIST_EXPIRED:
      it->cb.service(it->err, it->rows, it->nrows, it->data);
      break;
    default:
      it->cb.pending(it->err, it->rows, it->nrows, it->data);
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
    dispatch(h->st);
}

static void on_async(uv_async_t *a) {
  handles_t *h = container_of(a, handles_t, async);
  zm_store_t *st = h->st;
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

/* ==== public API ========================================================== */

static int pragma(zm_store_t *st, const char *sql) {
  if (sqlite3_exec(st->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
    ZM_ERROR("store %s: %s: %s", st->path, sql, sqlite3_errmsg(st->db));
    return ZM_E_STORE;
  }
  return 0;
}

static int set_wal(zm_store_t *st) {
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

int zm_store_open(zm_store_t **out, uv_loop_t *loop,
                  const zm_store_config_t *cfg) {
  ZM_ASSERT(out != NULL && loop != NULL && cfg != NULL && cfg->path != NULL);
  *out = NULL;
  zm_store_t *st = zm_xcalloc(1, sizeof *st);
  st->loop = loop;
  st->path = zm_xstrdup(cfg->path);
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
      pragma(st, CACHE_PRAGMA) != 0)
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
  st->h->open = 2;
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
  *out = st;
  return 0;

fail_thread:
  st->h->st = NULL;
  uv_close((uv_handle_t *)&st->h->prepare, on_handle_closed);
  uv_close((uv_handle_t *)&st->h->async, on_handle_closed);
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
static int wait_worker(zm_store_t *st) {
  if (!st->in_flight)
    return 0;
  uv_mutex_lock(&st->mu);
  while (!st->done_ready)
    uv_cond_wait(&st->cond, &st->mu);
  uv_mutex_unlock(&st->mu);
  return 1;
}

void zm_store_close(zm_store_t *st) {
  if (st == NULL)
    return;
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
  uv_cond_destroy(&st->cond);
  uv_mutex_destroy(&st->mu);
  free(st->path);
  free(st);
}

/* Strings op uses, by kind: up to 2 fields. */
static size_t op_strings(zm_store_op_t *op, const char **f[2]) {
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED:
    f[0] = &op->managed.ziti_identity_id;
    f[1] = &op->managed.identity_id;
    return 2;
  case ZM_STORE_PUT_SERVICE:
    f[0] = &op->service.ziti_identity_id;
    return 1;
  case ZM_STORE_PUT_PENDING:
    f[0] = &op->pending.name;
    f[1] = &op->pending.ziti_identity_id;
    return 2;
  case ZM_STORE_SET_PENDING_ID:
    f[0] = &op->name;
    f[1] = &op->id;
    return 2;
  case ZM_STORE_DEL_PENDING:
    f[0] = &op->name;
    return 1;
  case ZM_STORE_DEL_MANAGED:
  case ZM_STORE_EXTEND_LEASE:
  case ZM_STORE_DEL_SERVICE:
    f[0] = &op->id;
    return 1;
  }
  return 0;
}

void zm_store_submit(zm_store_t *st, const zm_store_op_t *ops, size_t n,
                     zm_store_cb cb, void *data) {
  ZM_ASSERT(st != NULL && (n == 0 || ops != NULL));
  size_t bytes = 0;
  for (size_t i = 0; i < n; i++) {
    zm_store_op_t tmp = ops[i];
    const char **f[2];
    size_t nf = op_strings(&tmp, f);
    for (size_t k = 0; k < nf; k++)
      if (*f[k] != NULL)
        bytes += strlen(*f[k]) + 1;
  }
  item_t *it = zm_xcalloc(1, sizeof *it + n * sizeof *ops + bytes);
  it->kind = ITEM_UNIT;
  it->cb.unit = cb;
  it->data = data;
  it->ops = (zm_store_op_t *)(void *)(it + 1);
  it->nops = n;
  char *p = (char *)(it->ops + n);
  for (size_t i = 0; i < n; i++) {
    zm_store_op_t *op = &it->ops[i];
    *op = ops[i];
    /* Only the fields this kind reads survive; the rest may be garbage. */
    const char *keep[2] = {NULL, NULL};
    const char **f[2];
    size_t nf = op_strings(op, f);
    for (size_t k = 0; k < nf; k++)
      keep[k] = *f[k];
    op->managed.ziti_identity_id = op->managed.identity_id = NULL;
    op->service.ziti_identity_id = NULL;
    op->pending.name = op->pending.ziti_identity_id = NULL;
    op->id = op->name = NULL;
    for (size_t k = 0; k < nf; k++) {
      if (keep[k] == NULL)
        continue;
      size_t len = strlen(keep[k]) + 1;
      memcpy(p, keep[k], len);
      *f[k] = p;
      p += len;
    }
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

void zm_store_list_managed(zm_store_t *st, int type, const char *after_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data) {
  ZM_ASSERT(st != NULL && cb != NULL);
  item_t *it = new_read(ITEM_LIST_MANAGED, after_id, limit, data);
  it->type = type;
  it->cb.managed = cb;
  q_push(&st->queue, it);
  kick(st);
}

void zm_store_list_expired(zm_store_t *st, int64_t now_ms, int64_t after_ms,
                           const char *after_id, size_t limit,
                           zm_store_service_list_cb cb, void *data) {
  ZM_ASSERT(st != NULL && cb != NULL);
  item_t *it = new_read(ITEM_LIST_EXPIRED, after_id, limit, data);
  it->t1 = now_ms;
  it->t2 = after_ms;
  it->cb.service = cb;
  q_push(&st->queue, it);
  kick(st);
}

void zm_store_list_pending(zm_store_t *st, int64_t older_than_ms, size_t limit,
                           zm_store_pending_list_cb cb, void *data) {
  ZM_ASSERT(st != NULL && cb != NULL);
  item_t *it = new_read(ITEM_LIST_PENDING, NULL, limit, data);
  it->t1 = older_than_ms;
  it->cb.pending = cb;
  q_push(&st->queue, it);
  kick(st);
}

void zm_store_get_stats(const zm_store_t *st, zm_store_stats_t *out) {
  *out = st->stats;
  out->queued = st->queue.units;
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

int zm_store_load(zm_store_t *st,
                  void (*on_managed)(const zm_managed_row_t *r, void *data),
                  void (*on_service)(const zm_service_row_t *r, void *data),
                  void (*on_pending)(const zm_pending_row_t *r, void *data),
                  void *data) {
  ZM_ASSERT(st != NULL && !st->delivering);
  /* The worker must let go of the connection; its callbacks are delivered
   * later by on_async as usual. */
  wait_worker(st);
  badtime_t bad = {0};
  sqlite3_stmt *s;
  int rc = SQLITE_DONE, err = 0;
  /* One read transaction: the three scans see one snapshot. */
  if (exec_stmt(st, S_BEGIN, "begin load") != 0)
    return ZM_E_STORE;
  if (on_managed != NULL) {
    s = st->stmt[S_LOAD_MANAGED];
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      zm_managed_row_t r = {
          .ziti_identity_id = (const char *)sqlite3_column_text(s, 0),
          .identity_id = (const char *)sqlite3_column_text(s, 1),
          .identity_type = sqlite3_column_int(s, 2),
          .created_at_ms = load_time(s, 3, 0, &bad),
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
          .created_at_ms = load_time(s, 4, 0, &bad),
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
  /* The full scans filled the page cache with leaf pages nobody reads
   * again: give that memory back. */
  sqlite3_db_release_memory(st->db);
  if (bad.bad > 0)
    ZM_WARN("store %s: %zu unparseable timestamps read as 1970-01-01 "
            "(first in row %s)",
            st->path, bad.bad, bad.first);
  return 0;

fail:
  log_db(st, "load");
  err = ZM_E_STORE;
  if (!sqlite3_get_autocommit(st->db))
    exec_stmt(st, S_ROLLBACK, "rollback load");
  return err;
}
