/*
 * pg.c - the PostgreSQL backend of zm_store (include/zm/store.h).
 *
 * Everything runs on the loop thread, asynchronously: libpq in non-blocking
 * pipeline mode, each connection's socket watched by a uv_poll_t. Blocking
 * libpq calls happen only in open (connect, migrate, prepare: start-up),
 * load (a blocking connection of its own, a cursor) and close (drains what
 * is queued with poll(2) on the pool's sockets).
 *
 * Connections. A pool of cfg->pool_size (default 4, at least 2), each in
 * pipeline mode with every statement prepared. Mutating work (units, the
 * three claims, the heartbeat) goes to one connection at a time: the first
 * READY one (normally connection 0), with ONE write job in flight. Reads
 * (list_managed, get_managed, changes) go to the other READY connection with
 * the fewest jobs, pipelined.
 *
 * Ordering. Every mutating item takes the next write sequence number at
 * submission; a read remembers the last number issued before it and is
 * dispatched only once every write up to it has completed (committed or
 * failed), so it sees every earlier unit. Writes complete in submission
 * order (one write job at a time). Callbacks run from the loop (prepare,
 * poll and timer callbacks) or from close, never inside the submitting call.
 *
 * Group commit. At each loop turn (uv_prepare) the units queued meanwhile
 * form one group, sent in one go: BEGIN; each unit's statements; COMMIT;
 * Sync. Every op is ONE statement (data-modifying CTEs), and "no such row"
 * is raised inside it by zm_found() (SQLSTATE P0002). A failing statement
 * aborts the pipeline until the Sync, so the whole group is discarded: the
 * failing unit gets its own error (23505 -> ZM_E_EXISTS, P0002 ->
 * ZM_E_NOT_FOUND, class 22 and the other class-23 violations ->
 * ZM_E_INVAL) and the group is re-sent without it. Any other error fails
 * the group with ZM_E_STORE. No savepoints: the pipeline cannot roll back
 * to one after an error anyway.
 *
 * Reconnect. A broken connection (EOF, socket error, CONNECTION_BAD) fails
 * its jobs with ZM_E_STORE (a COMMIT in flight: outcome unknown), and is
 * re-opened with PQconnectStart/PQconnectPoll after a backoff of 100 ms
 * doubling to 5 s; then its statements are prepared again (SETUP) before it
 * takes work. Work that finds no connection READY (or in SETUP) fails at
 * once with ZM_E_STORE. The loss and the recovery are logged once each for
 * the whole pool, naming host:port/dbname (never the URL: it may hold a
 * password).
 *
 * Handles. uv_poll handles watch a dup() of the libpq socket, so libpq
 * closing its socket (PQfinish, a reconnect inside PQconnectPoll) never
 * leaves libuv with a closed or reused descriptor; they live in blocks of
 * their own freed by their close callbacks, like the timers and the
 * prepare handle, so close can free the store at once. As with SQLite, the
 * caller lets the loop run after zm_store_close so those callbacks fire.
 */
#include "pg_internal.h"
#include "pq_dl.h"
#include "store_internal.h"

#include "zm/log.h"
#include "zm/stat.h"
#include "zm/store.h"
#include "zm/zm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_POOL 4
#define MAX_POOL 64
/* One group: bounds the statements one transaction carries (and re-sends
 * when a unit fails). A longer queue chains into the following groups. */
#define MAX_GROUP_UNITS 512
#define MAX_GROUP_STMTS 2048
/* Read jobs pipelined on one connection. */
#define MAX_READ_JOBS 16
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
/* A reconnect attempt that has not finished by then is abandoned. */
#define CONNECT_TIMEOUT_MS 10000
/* zm_store_close gives up on the database after this long. */
#define CLOSE_TIMEOUT_MS 30000
/* changes() prunes every PRUNE_EVERY calls or PRUNE_PERIOD_MS. */
#define PRUNE_EVERY 1000
#define PRUNE_PERIOD_MS 60000

/* ==== statements ========================================================= */

#define TOMB_COLS                                                              \
  "(ziti_identity_id, kind, type, attempts, next_try_at, claimed_until,"       \
  " created_at)"
#define MANAGED_COLS                                                           \
  "ziti_identity_id, identity_id::text, identity_type, zm_ms(created_at),"     \
  " ziti_service_id, workload_id::text, agent_id::text,"                       \
  " environment_id::text"
/* A tombstone made from a live row (RETIRE_*, claim_expired) replaces a
 * stale one for the id, as SQLite's INSERT OR REPLACE does: the caller holds
 * the claim it asked for, and the row is returned. */
#define TOMB_REPLACE                                                           \
  "ON CONFLICT (ziti_identity_id) DO UPDATE SET kind = EXCLUDED.kind,"         \
  " type = EXCLUDED.type, attempts = EXCLUDED.attempts,"                       \
  " next_try_at = EXCLUDED.next_try_at,"                                       \
  " claimed_until = EXCLUDED.claimed_until, created_at = EXCLUDED.created_at"
#define TOMB_RET                                                               \
  "ziti_identity_id, kind, type, attempts, zm_ms(next_try_at),"                \
  " zm_ms(created_at)"

#define STMTS(X)                                                               \
  X(PUT_MANAGED, 8,                                                            \
    "WITH m AS (INSERT INTO managed_identities (ziti_identity_id,"             \
    " identity_id, identity_type, created_at, ziti_service_id, workload_id,"   \
    " agent_id, environment_id) VALUES ($1::text, $2::uuid, $3::smallint,"     \
    " zm_ts($4::bigint), $5::text, $6::uuid, $7::uuid, $8::uuid)"              \
    " ON CONFLICT (ziti_identity_id) DO UPDATE SET"                            \
    " identity_id = EXCLUDED.identity_id,"                                     \
    " identity_type = EXCLUDED.identity_type,"                                 \
    " created_at = EXCLUDED.created_at,"                                       \
    " ziti_service_id = EXCLUDED.ziti_service_id,"                             \
    " workload_id = EXCLUDED.workload_id, agent_id = EXCLUDED.agent_id,"       \
    " environment_id = EXCLUDED.environment_id RETURNING ziti_identity_id)"    \
    " INSERT INTO identity_changes (ziti_identity_id)"                         \
    " SELECT ziti_identity_id FROM m")                                         \
  X(PUT_SERVICE, 4,                                                            \
    "INSERT INTO service_identities (ziti_identity_id, service_type,"          \
    " lease_expires_at, created_at) VALUES ($1::text, $2::smallint,"           \
    " zm_ts($3::bigint), zm_ts($4::bigint)) ON CONFLICT (ziti_identity_id)"    \
    " DO UPDATE SET service_type = EXCLUDED.service_type,"                     \
    " lease_expires_at = EXCLUDED.lease_expires_at,"                           \
    " created_at = EXCLUDED.created_at")                                       \
  X(EXTEND_LEASE, 2,                                                           \
    "WITH u AS (UPDATE service_identities SET lease_expires_at ="              \
    " GREATEST(lease_expires_at, zm_ts($2::bigint))"                           \
    " WHERE ziti_identity_id = $1::text RETURNING 1)"                          \
    " SELECT zm_found(count(*)) FROM u")                                       \
  /* Rows are locked in id order first: two replicas flushing overlapping      \
   * sets at once then queue behind each other instead of deadlocking. */      \
  X(FLUSH_LEASES, 2,                                                           \
    "WITH v AS (SELECT id, max(ms) AS ms FROM unnest($1::text[],"              \
    " $2::bigint[]) AS a(id, ms) GROUP BY id),"                                \
    " k AS (SELECT s.ziti_identity_id FROM service_identities s JOIN v"        \
    " ON s.ziti_identity_id = v.id WHERE s.lease_expires_at < zm_ts(v.ms)"     \
    " ORDER BY s.ziti_identity_id FOR UPDATE OF s)"                            \
    " UPDATE service_identities s SET lease_expires_at ="                      \
    " GREATEST(s.lease_expires_at, zm_ts(v.ms)) FROM v, k"                     \
    " WHERE s.ziti_identity_id = v.id AND s.ziti_identity_id ="                \
    " k.ziti_identity_id")                                                     \
  X(PUT_PENDING, 7,                                                            \
    "INSERT INTO pending_identities (name, kind, type, ziti_identity_id,"      \
    " agent_id, created_at, resolve_after) VALUES ($1::text, $2::smallint,"    \
    " $3::smallint, $4::text, $5::text, zm_ts($6::bigint),"                    \
    " zm_ts($7::bigint))")                                                     \
  X(SET_PENDING_ID, 2,                                                         \
    "WITH u AS (UPDATE pending_identities SET ziti_identity_id = $2::text"     \
    " WHERE name = $1::text RETURNING 1) SELECT zm_found(count(*)) FROM u")    \
  X(DEL_PENDING, 1, "DELETE FROM pending_identities WHERE name = $1::text")    \
  X(TAKE_PENDING, 1,                                                           \
    "WITH d AS (DELETE FROM pending_identities WHERE name = $1::text"          \
    " RETURNING 1) SELECT zm_found(count(*)) FROM d")                          \
  X(RETIRE_MANAGED, 5,                                                         \
    "WITH d AS (DELETE FROM managed_identities WHERE ziti_identity_id ="       \
    " $1::text RETURNING ziti_identity_id, identity_type),"                    \
    " t AS (INSERT INTO deleting_identities " TOMB_COLS                        \
    " SELECT ziti_identity_id, 2, CASE WHEN identity_type = 0 THEN $2::int"    \
    " ELSE identity_type END, 0, zm_ts($3::bigint), zm_ts($4::bigint),"        \
    " zm_ts($5::bigint) FROM d " TOMB_REPLACE "),"                             \
    " c AS (INSERT INTO identity_changes (ziti_identity_id)"                   \
    " SELECT ziti_identity_id FROM d) SELECT zm_found(count(*)) FROM d")       \
  X(RETIRE_SERVICE, 6,                                                         \
    "WITH d AS (DELETE FROM service_identities WHERE ziti_identity_id ="       \
    " $1::text AND lease_expires_at <= zm_ts($2::bigint)"                      \
    " RETURNING ziti_identity_id, service_type),"                              \
    " t AS (INSERT INTO deleting_identities " TOMB_COLS                        \
    " SELECT ziti_identity_id, 1, CASE WHEN service_type = 0 THEN $3::int"     \
    " ELSE service_type END, 0, zm_ts($4::bigint), zm_ts($5::bigint),"         \
    " zm_ts($6::bigint) FROM d " TOMB_REPLACE "),"                             \
    " c AS (INSERT INTO identity_changes (ziti_identity_id)"                   \
    " SELECT ziti_identity_id FROM d) SELECT zm_found(count(*)) FROM d")       \
  X(PUT_TOMB, 7,                                                               \
    "INSERT INTO deleting_identities " TOMB_COLS " VALUES ($1::text,"          \
    " $2::smallint, $3::smallint, $4::int, zm_ts($5::bigint),"                 \
    " zm_ts($6::bigint), zm_ts($7::bigint))"                                   \
    " ON CONFLICT (ziti_identity_id) DO NOTHING")                              \
  X(DEL_TOMB, 1,                                                               \
    "DELETE FROM deleting_identities WHERE ziti_identity_id = $1::text")       \
  X(DEFER_TOMB, 2,                                                             \
    "UPDATE deleting_identities SET attempts = attempts + 1,"                  \
    " next_try_at = zm_ts($2::bigint), claimed_until = '-infinity'"            \
    " WHERE ziti_identity_id = $1::text")                                      \
  X(LIST_MANAGED, 3,                                                           \
    "SELECT " MANAGED_COLS " FROM managed_identities"                          \
    " WHERE ziti_identity_id > $1::text"                                       \
    " AND ($2::int = 0 OR identity_type = $2::int)"                            \
    " ORDER BY ziti_identity_id LIMIT $3::bigint")                             \
  X(GET_MANAGED, 1,                                                            \
    "SELECT " MANAGED_COLS " FROM managed_identities"                          \
    " WHERE ziti_identity_id = $1::text")                                      \
  X(FIND_MANAGED, 2,                                                           \
    "SELECT " MANAGED_COLS " FROM managed_identities"                          \
    " WHERE identity_id = $1::uuid ORDER BY ziti_identity_id"                  \
    " LIMIT $2::bigint")                                                       \
  X(GET_MANAGED_BY_IDENTITY, 1,                                                \
    "SELECT " MANAGED_COLS " FROM managed_identities"                          \
    " WHERE identity_id = $1::uuid ORDER BY created_at DESC LIMIT 1")          \
  X(CLAIM_EXPIRED, 4,                                                          \
    "WITH c AS (DELETE FROM service_identities WHERE ziti_identity_id IN"      \
    " (SELECT ziti_identity_id FROM service_identities"                        \
    " WHERE lease_expires_at <= zm_ts($1::bigint)"                             \
    " ORDER BY lease_expires_at, ziti_identity_id"                             \
    " LIMIT $4::bigint FOR UPDATE SKIP LOCKED)"                                \
    " RETURNING ziti_identity_id, service_type, lease_expires_at),"            \
    " t AS (INSERT INTO deleting_identities " TOMB_COLS                        \
    " SELECT ziti_identity_id, 1, service_type, 0, zm_ts($2::bigint),"         \
    " zm_ts($3::bigint), zm_ts($2::bigint) FROM c " TOMB_REPLACE               \
    " RETURNING " TOMB_RET "),"                                                \
    " ch AS (INSERT INTO identity_changes (ziti_identity_id)"                  \
    " SELECT ziti_identity_id FROM c)"                                         \
    " SELECT t.* FROM t JOIN c USING (ziti_identity_id)"                       \
    " ORDER BY c.lease_expires_at, ziti_identity_id")                          \
  X(CLAIM_TOMBS, 3,                                                            \
    "WITH u AS (UPDATE deleting_identities SET claimed_until ="                \
    " zm_ts($2::bigint) WHERE ziti_identity_id IN (SELECT ziti_identity_id"    \
    " FROM deleting_identities WHERE next_try_at <= zm_ts($1::bigint)"         \
    " AND claimed_until <= zm_ts($1::bigint) ORDER BY next_try_at"             \
    " LIMIT $3::bigint FOR UPDATE SKIP LOCKED) RETURNING *)"                   \
    " SELECT " TOMB_RET " FROM u ORDER BY next_try_at, ziti_identity_id")      \
  X(CLAIM_PENDING, 3,                                                          \
    "WITH u AS (UPDATE pending_identities SET claimed_until ="                 \
    " zm_ts($2::bigint) WHERE name IN (SELECT name FROM pending_identities"    \
    " WHERE resolve_after <= zm_ts($1::bigint)"                                \
    " AND claimed_until <= zm_ts($1::bigint) ORDER BY created_at"              \
    " LIMIT $3::bigint FOR UPDATE SKIP LOCKED) RETURNING *)"                   \
    " SELECT name, kind, type, ziti_identity_id, agent_id,"                    \
    " zm_ms(created_at), zm_ms(resolve_after) FROM u"                          \
    " ORDER BY created_at, name")                                              \
  X(HEARTBEAT, 1,                                                              \
    "WITH n AS (SELECT clock_timestamp() AS t)"                                \
    " INSERT INTO service_clock AS s (id, last_beat, resumed_at)"              \
    " SELECT 1, n.t, n.t FROM n ON CONFLICT (id) DO UPDATE SET"                \
    " resumed_at = CASE WHEN s.last_beat < EXCLUDED.last_beat -"               \
    " $1::bigint * interval '1 millisecond' OR s.last_beat >"                  \
    " EXCLUDED.last_beat + $1::bigint * interval '1 millisecond'"              \
    " THEN EXCLUDED.last_beat ELSE s.resumed_at END,"                          \
    " last_beat = CASE WHEN s.last_beat > EXCLUDED.last_beat +"                \
    " $1::bigint * interval '1 millisecond' THEN EXCLUDED.last_beat"           \
    " ELSE GREATEST(s.last_beat, EXCLUDED.last_beat) END"                      \
    " RETURNING zm_ms((SELECT t FROM n)), zm_ms(s.resumed_at)")                \
  X(CHANGES, 3,                                                                \
    "SELECT seq, ziti_identity_id FROM identity_changes"                       \
    " WHERE seq > $1::bigint OR changed_at >= zm_ts($2::bigint)"               \
    " ORDER BY seq LIMIT $3::bigint")                                          \
  X(PRUNE_CHANGES, 1,                                                          \
    "DELETE FROM identity_changes"                                             \
    " WHERE changed_at < LEAST(zm_ts($1::bigint), clock_timestamp())"          \
    " - interval '1 hour'")

enum {
#define X(name, np, sql) S_##name,
  STMTS(X)
#undef X
      S__COUNT
};

static const char *const STMT_SQL[S__COUNT] = {
#define X(name, np, sql) [S_##name] = sql,
    STMTS(X)
#undef X
};
static const int STMT_NPARAMS[S__COUNT] = {
#define X(name, np, sql) [S_##name] = np,
    STMTS(X)
#undef X
};
static const char *const STMT_NAME[S__COUNT] = {
#define X(name, np, sql) [S_##name] = "zm_" #name,
    STMTS(X)
#undef X
};

/* ==== queued work ======================================================== */

enum {
  ITEM_UNIT,
  ITEM_CLAIM_EXPIRED,
  ITEM_CLAIM_TOMBS,
  ITEM_CLAIM_PENDING,
  ITEM_HEARTBEAT,
  /* reads: not mutating */
  ITEM_LIST_MANAGED,
  ITEM_GET_MANAGED,
  ITEM_FIND_MANAGED,
  ITEM_CHANGES,
};
#define ITEM_MUTATING(k) ((k) <= ITEM_HEARTBEAT)

typedef struct item {
  struct item *next;
  int kind; /* ITEM_* */
  int err;
  /* mutating: its write sequence number; reads: the last one issued before
   * it (every write up to it must be done before the read is sent). */
  uint64_t seq;
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
  int type;           /* LIST_MANAGED; GET_MANAGED: 1 = by identity_id */
  int64_t t1, t2, t3; /* times of claims, heartbeat gap, changes */
  const char *key;    /* LIST/GET: id, in this block */
  size_t limit;
  int prune; /* CHANGES: also prune old changes */
} item_t;

typedef struct {
  item_t *head, *tail;
  size_t items, units;
} itemq_t;

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

static item_t *q_pop(itemq_t *q) {
  item_t *it = q->head;
  if (it == NULL)
    return NULL;
  q->head = it->next;
  if (q->head == NULL)
    q->tail = NULL;
  q->items--;
  q->units -= it->kind == ITEM_UNIT;
  it->next = NULL;
  return it;
}

/* ==== connections and jobs =============================================== */

enum { JOB_SETUP, JOB_GROUP, JOB_ONE };

/* What one Sync of one connection's pipeline carries. */
typedef struct job {
  struct job *next;
  int kind; /* JOB_* */
  /* GROUP: the units, and for each statement sent the unit it belongs to
   * (NULL for BEGIN / COMMIT). ONE: items[0]. */
  item_t **items;
  size_t nitems;
  item_t **stmt_item;
  size_t nstmts;
  size_t stmt;      /* statement whose results come next */
  int got;          /* a result of statement `stmt` was seen */
  long failed_stmt; /* first failing statement, or -1 */
  int fail_err;     /* its mapped error */
  PGresult *res[2]; /* ONE: results of statements 0 and 1 */
} job_t;

enum { C_DOWN, C_CONNECTING, C_SETUP, C_READY };

typedef struct pg_store pg_store_t;
typedef struct pollh pollh_t;

typedef struct {
  pg_store_t *st;
  int idx;
  int state; /* C_* */
  PGconn *pg;
  pollh_t *ph;
  int poll_events;
  int want_write;    /* PQflush left data to send */
  uv_timer_t *timer; /* in st->h */
  job_t *head, *tail;
  size_t njobs;
  uint64_t backoff_ms;
  int lost; /* went down after having been up */
} conn_t;

struct pollh {
  uv_poll_t h;
  conn_t *c; /* NULL once abandoned */
  int fd;    /* our dup of the libpq socket */
};

typedef struct {
  uv_prepare_t prepare;
  pg_store_t *st; /* NULL once the store is closed */
  int open;       /* handles not yet closed */
  uv_timer_t timers[];
} handles_t;

struct pg_store {
  zm_store_t base; /* first: zm_store_t * <-> pg_store_t * */
  uv_loop_t *loop;
  char *url;  /* owned, never logged */
  char *what; /* "host:port/dbname", for log lines */
  handles_t *h;
  conn_t *conns;
  size_t nconns;
  itemq_t queue;
  uint64_t wseq;      /* last write sequence number issued */
  uint64_t done_wseq; /* every write up to it has completed */
  job_t *wjob;        /* the write job in flight, if any */
  conn_t *wconn;      /* its connection */
  int lost;           /* the loss was logged; recovery not yet */
  int closing;
  int delivering;
  uint64_t changes_calls;
  uint64_t last_prune_ms;
  zm_store_stats_t stats;
};

static pg_store_t *PG(zm_store_t *st) { return (pg_store_t *)st; }

static void on_prepare(uv_prepare_t *p);
static void on_timer(uv_timer_t *t);
static void on_poll(uv_poll_t *p, int status, int events);
static void conn_broken(conn_t *c, const char *why);
static void conn_connect(conn_t *c);
static void kick(pg_store_t *st);

/* ==== small helpers ====================================================== */

static void i64_str(int64_t v, char buf[24]) {
  snprintf(buf, 24, "%" PRId64, v);
}

static int64_t col_i64(const PGresult *r, int row, int col) {
  if (PQgetisnull(r, row, col))
    return 0;
  return strtoll(PQgetvalue(r, row, col), NULL, 10);
}

static const char *col_str(const PGresult *r, int row, int col) {
  return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

static int64_t limit_arg(size_t limit) {
  return limit > (size_t)INT64_MAX ? INT64_MAX : (int64_t)limit;
}

/* The first line of libpq's message, without its newline. */
static void first_line(const char *msg, char *out, size_t cap) {
  size_t n = strcspn(msg ? msg : "", "\n");
  if (n >= cap)
    n = cap - 1;
  memcpy(out, msg ? msg : "", n);
  out[n] = '\0';
}

/* Maps a statement's failure: a unit's own error (ZM_E_EXISTS /
 * ZM_E_NOT_FOUND / ZM_E_INVAL), or ZM_E_STORE (the group fails). */
static int map_sqlstate(const PGresult *r) {
  const char *s = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
  if (s == NULL)
    return ZM_E_STORE;
  if (strcmp(s, "23505") == 0)
    return ZM_E_EXISTS; /* unique_violation */
  if (strcmp(s, "P0002") == 0)
    return ZM_E_NOT_FOUND; /* zm_found(): no such row */
  if (strncmp(s, "22", 2) == 0 || strncmp(s, "23", 2) == 0)
    return ZM_E_INVAL; /* data exception, integrity constraint */
  return ZM_E_STORE;
}

/* ==== poll handles ======================================================= */

static void on_poll_closed(uv_handle_t *hd) {
  pollh_t *ph = (pollh_t *)hd;
  close(ph->fd);
  free(ph);
}

static void unwatch(conn_t *c) {
  if (c->ph == NULL)
    return;
  c->ph->c = NULL;
  uv_close((uv_handle_t *)&c->ph->h, on_poll_closed);
  c->ph = NULL;
  c->poll_events = 0;
}

static int same_socket(int a, int b) {
  struct stat sa, sb;
  return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

/* Watches c's libpq socket for events (re-creating the watcher if libpq
 * switched sockets). Returns 0, or -1 (the connection is unusable). */
static int watch(conn_t *c, int events) {
  int fd = PQsocket(c->pg);
  if (fd < 0)
    return -1;
  if (c->ph != NULL && !same_socket(c->ph->fd, fd))
    unwatch(c);
  if (c->ph == NULL) {
    int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dfd < 0)
      return -1;
    pollh_t *ph = zm_xcalloc(1, sizeof *ph);
    ph->fd = dfd;
    ph->c = c;
    if (uv_poll_init(c->st->loop, &ph->h, dfd) != 0) {
      close(dfd);
      free(ph);
      return -1;
    }
    c->ph = ph;
    c->poll_events = 0;
  }
  if (events != c->poll_events) {
    if (uv_poll_start(&c->ph->h, events, on_poll) != 0)
      return -1;
    c->poll_events = events;
  }
  /* An idle connection never keeps uv_run alive; one with work in flight
   * does, until the answer is in. */
  if (c->head != NULL)
    uv_ref((uv_handle_t *)&c->ph->h);
  else
    uv_unref((uv_handle_t *)&c->ph->h);
  return 0;
}

/* ==== delivering results ================================================== */

static void deliver_item(pg_store_t *st, item_t *it, const PGresult *r) {
  st->delivering++;
  int err = it->err;
  int n = (err == 0 && r != NULL) ? PQntuples(r) : 0;
  switch (it->kind) {
  case ITEM_UNIT:
    if (it->cb.unit)
      it->cb.unit(err, it->data);
    break;
  case ITEM_LIST_MANAGED:
  case ITEM_GET_MANAGED:
  case ITEM_FIND_MANAGED: {
    zm_managed_row_t *rows = n ? zm_xcalloc((size_t)n, sizeof *rows) : NULL;
    for (int i = 0; i < n; i++) {
      rows[i].ziti_identity_id = col_str(r, i, 0);
      rows[i].identity_id = col_str(r, i, 1);
      rows[i].identity_type = (int)col_i64(r, i, 2);
      rows[i].created_at_ms = col_i64(r, i, 3);
      rows[i].ziti_service_id = col_str(r, i, 4);
      rows[i].workload_id = col_str(r, i, 5);
      rows[i].agent_id = col_str(r, i, 6);
      rows[i].environment_id = col_str(r, i, 7);
    }
    it->cb.managed(err, rows, (size_t)n, it->data);
    free(rows);
    break;
  }
  case ITEM_CLAIM_EXPIRED:
  case ITEM_CLAIM_TOMBS: {
    zm_tomb_row_t *rows = n ? zm_xcalloc((size_t)n, sizeof *rows) : NULL;
    for (int i = 0; i < n; i++) {
      rows[i].ziti_identity_id = col_str(r, i, 0);
      rows[i].kind = (int)col_i64(r, i, 1);
      rows[i].type = (int)col_i64(r, i, 2);
      rows[i].attempts = (int)col_i64(r, i, 3);
      rows[i].next_try_ms = col_i64(r, i, 4);
      rows[i].created_at_ms = col_i64(r, i, 5);
    }
    it->cb.tomb(err, rows, (size_t)n, it->data);
    free(rows);
    break;
  }
  case ITEM_CLAIM_PENDING: {
    zm_pending_row_t *rows = n ? zm_xcalloc((size_t)n, sizeof *rows) : NULL;
    for (int i = 0; i < n; i++) {
      rows[i].name = col_str(r, i, 0);
      rows[i].kind = (int)col_i64(r, i, 1);
      rows[i].type = (int)col_i64(r, i, 2);
      rows[i].ziti_identity_id = col_str(r, i, 3);
      rows[i].agent_id = col_str(r, i, 4);
      rows[i].created_at_ms = col_i64(r, i, 5);
      rows[i].resolve_after_ms = col_i64(r, i, 6);
    }
    it->cb.pending(err, rows, (size_t)n, it->data);
    free(rows);
    break;
  }
  case ITEM_HEARTBEAT: {
    int64_t now = 0, resumed = 0;
    if (err == 0 && n == 1) {
      now = col_i64(r, 0, 0);
      resumed = col_i64(r, 0, 1);
    } else if (err == 0) {
      err = ZM_E_STORE;
    }
    it->cb.beat(err, now, resumed, it->data);
    break;
  }
  case ITEM_CHANGES: {
    int64_t *seqs = n ? zm_xcalloc((size_t)n, sizeof *seqs) : NULL;
    const char **ids = n ? zm_xcalloc((size_t)n, sizeof *ids) : NULL;
    for (int i = 0; i < n; i++) {
      seqs[i] = col_i64(r, i, 0);
      ids[i] = col_str(r, i, 1);
    }
    it->cb.changes(err, seqs, ids, (size_t)n, it->data);
    free(seqs);
    free(ids);
    break;
  }
  }
  st->delivering--;
  free(it);
}

/* A mutating item is done (delivered next): writes complete in order. */
static void write_done(pg_store_t *st, const item_t *it) {
  if (ITEM_MUTATING(it->kind) && it->seq > st->done_wseq)
    st->done_wseq = it->seq;
}

static void fail_item(pg_store_t *st, item_t *it) {
  it->err = ZM_E_STORE;
  write_done(st, it);
  deliver_item(st, it, NULL);
}

static void job_free(job_t *j) {
  PQclear(j->res[0]);
  PQclear(j->res[1]);
  free(j->items);
  free(j->stmt_item);
  free(j);
}

/* ==== sending ============================================================ */

static int flush(conn_t *c) {
  int rc = PQflush(c->pg);
  if (rc < 0)
    return -1;
  c->want_write = rc == 1;
  return watch(c, UV_READABLE | (c->want_write ? UV_WRITABLE : 0));
}

static int send_stmt(conn_t *c, int s, const char *const *params) {
  return PQsendQueryPrepared(c->pg, STMT_NAME[s], STMT_NPARAMS[s], params, NULL,
                             NULL, 0)
             ? 0
             : -1;
}

/* A growing text buffer for FLUSH_LEASES' array literals. */
typedef struct {
  char *buf;
  size_t len, cap;
} tbuf_t;

static void tb_need(tbuf_t *b, size_t more) {
  if (b->len + more + 1 <= b->cap)
    return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + more + 1)
    cap *= 2;
  b->buf = zm_xrealloc(b->buf, cap);
  b->cap = cap;
}

static void tb_char(tbuf_t *b, char ch) {
  tb_need(b, 1);
  b->buf[b->len++] = ch;
  b->buf[b->len] = '\0';
}

/* Appends s as a double-quoted array element ("..." with \" and \\). */
static void tb_quoted(tbuf_t *b, const char *s) {
  tb_need(b, 2 * strlen(s) + 2);
  b->buf[b->len++] = '"';
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      b->buf[b->len++] = '\\';
    b->buf[b->len++] = *s;
  }
  b->buf[b->len++] = '"';
  b->buf[b->len] = '\0';
}

/* FLUSH_LEASES: one statement for all n ids, as two array literals. */
static int send_flush_leases(conn_t *c, const zm_store_op_t *op) {
  tbuf_t ids = {0}, mss = {0};
  tb_char(&ids, '{');
  tb_char(&mss, '{');
  for (size_t i = 0; i < op->n; i++) {
    if (i > 0) {
      tb_char(&ids, ',');
      tb_char(&mss, ',');
    }
    tb_quoted(&ids, op->ids[i]);
    tb_need(&mss, 24);
    mss.len += (size_t)snprintf(mss.buf + mss.len, 24, "%" PRId64, op->mss[i]);
  }
  tb_char(&ids, '}');
  tb_char(&mss, '}');
  const char *p[2] = {ids.buf, mss.buf};
  int rc = send_stmt(c, S_FLUSH_LEASES, p);
  free(ids.buf);
  free(mss.buf);
  return rc;
}

/* Sends one op as one statement. */
static int send_op(conn_t *c, const zm_store_op_t *op) {
  char a[24], b[24], d[24], e[24], f[24], g[24];
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED: {
    const zm_managed_row_t *m = &op->managed;
    i64_str(m->identity_type, a);
    i64_str(m->created_at_ms, b);
    const char *p[8] = {
        m->ziti_identity_id, m->identity_id, a,           b,
        m->ziti_service_id,  m->workload_id, m->agent_id, m->environment_id};
    return send_stmt(c, S_PUT_MANAGED, p);
  }
  case ZM_STORE_PUT_SERVICE: {
    const zm_service_row_t *s = &op->service;
    i64_str(s->service_type, a);
    i64_str(s->lease_expires_ms, b);
    i64_str(s->created_at_ms, d);
    const char *p[4] = {s->ziti_identity_id, a, b, d};
    return send_stmt(c, S_PUT_SERVICE, p);
  }
  case ZM_STORE_EXTEND_LEASE: {
    i64_str(op->ms, a);
    const char *p[2] = {op->id, a};
    return send_stmt(c, S_EXTEND_LEASE, p);
  }
  case ZM_STORE_FLUSH_LEASES:
    return send_flush_leases(c, op);
  case ZM_STORE_PUT_PENDING: {
    const zm_pending_row_t *r = &op->pending;
    i64_str(r->kind, a);
    i64_str(r->type, b);
    i64_str(r->created_at_ms, d);
    i64_str(r->resolve_after_ms, e);
    const char *p[7] = {r->name, a, b, r->ziti_identity_id, r->agent_id, d, e};
    return send_stmt(c, S_PUT_PENDING, p);
  }
  case ZM_STORE_SET_PENDING_ID: {
    const char *p[2] = {op->name, op->id};
    return send_stmt(c, S_SET_PENDING_ID, p);
  }
  case ZM_STORE_DEL_PENDING: {
    const char *p[1] = {op->name};
    return send_stmt(c, S_DEL_PENDING, p);
  }
  case ZM_STORE_TAKE_PENDING: {
    const char *p[1] = {op->name};
    return send_stmt(c, S_TAKE_PENDING, p);
  }
  case ZM_STORE_RETIRE_MANAGED: {
    i64_str(op->tomb.type, a);
    i64_str(op->tomb.next_try_ms, b);
    i64_str(op->ms, d);
    i64_str(op->tomb.created_at_ms, e);
    const char *p[5] = {op->id, a, b, d, e};
    return send_stmt(c, S_RETIRE_MANAGED, p);
  }
  case ZM_STORE_RETIRE_SERVICE: {
    i64_str(op->ms2, a);
    i64_str(op->tomb.type, b);
    i64_str(op->tomb.next_try_ms, d);
    i64_str(op->ms, e);
    i64_str(op->tomb.created_at_ms, f);
    const char *p[6] = {op->id, a, b, d, e, f};
    return send_stmt(c, S_RETIRE_SERVICE, p);
  }
  case ZM_STORE_PUT_TOMB: {
    const zm_tomb_row_t *t = &op->tomb;
    i64_str(t->kind, a);
    i64_str(t->type, b);
    i64_str(t->attempts, d);
    i64_str(t->next_try_ms, e);
    i64_str(op->ms, f);
    i64_str(t->created_at_ms, g);
    const char *p[7] = {t->ziti_identity_id, a, b, d, e, f, g};
    return send_stmt(c, S_PUT_TOMB, p);
  }
  case ZM_STORE_DEL_TOMB: {
    const char *p[1] = {op->id};
    return send_stmt(c, S_DEL_TOMB, p);
  }
  case ZM_STORE_DEFER_TOMB: {
    i64_str(op->ms, a);
    const char *p[2] = {op->id, a};
    return send_stmt(c, S_DEFER_TOMB, p);
  }
  }
  return -1; /* unknown kinds are refused at submission */
}

static void conn_push_job(conn_t *c, job_t *j) {
  j->next = NULL;
  if (c->tail)
    c->tail->next = j;
  else
    c->head = j;
  c->tail = j;
  c->njobs++;
}

/* Sends group j (its units whose err is still 0): their statements, then
 * Sync. The statements between two Syncs form one implicit transaction,
 * committed by the Sync (PGRES_PIPELINE_SYNC arrives once it is durable)
 * or rolled back as a whole when one of them fails -- an explicit BEGIN
 * would leave an aborted transaction block open after the Sync. Returns 0, or
 * -1 when the connection failed (j is not queued). */
static int send_group(conn_t *c, job_t *j) {
  zm_stat_store_begin(j);
  size_t cap = 1;
  for (size_t i = 0; i < j->nitems; i++)
    cap += j->items[i]->nops;
  free(j->stmt_item);
  j->stmt_item = zm_xcalloc(cap, sizeof *j->stmt_item);
  j->nstmts = 0;
  j->stmt = 0;
  j->got = 0;
  j->failed_stmt = -1;
  j->fail_err = 0;
  for (size_t i = 0; i < j->nitems; i++) {
    item_t *it = j->items[i];
    if (it->err != 0)
      continue;
    for (size_t k = 0; k < it->nops; k++) {
      if (send_op(c, &it->ops[k]) != 0)
        return -1;
      j->stmt_item[j->nstmts++] = it;
    }
  }
  if (!PQpipelineSync(c->pg))
    return -1;
  return 0;
}

/* ==== receiving ========================================================== */

static void conn_ready(conn_t *c);

/* A group's Sync: commit, or find the failing unit and go again without it.
 * Returns -1 when the connection failed while re-sending. */
static int group_done(conn_t *c, job_t *j) {
  pg_store_t *st = c->st;
  if (j->failed_stmt >= 0) {
    item_t *bad = (size_t)j->failed_stmt < j->nstmts
                      ? j->stmt_item[j->failed_stmt]
                      : NULL; /* the commit itself */
    if (bad != NULL && j->fail_err != ZM_E_STORE) {
      /* One unit's own error: the group was rolled back; re-run it without
       * that unit. Each round drops one unit, so this ends. */
      bad->err = j->fail_err;
      size_t left = 0;
      for (size_t i = 0; i < j->nitems; i++)
        left += j->items[i]->err == 0;
      if (left > 0) {
        if (send_group(c, j) != 0)
          return -1;
        conn_push_job(c, j);
        return flush(c);
      }
    } else {
      /* The transaction itself failed: units without an error of their
       * own share the group's fate. */
      st->stats.failed_groups++;
      for (size_t i = 0; i < j->nitems; i++)
        if (j->items[i]->err == 0)
          j->items[i]->err = ZM_E_STORE;
    }
  }
  st->stats.groups++;
  zm_stat_store_end(j, j->nitems);
  st->wjob = NULL;
  st->wconn = NULL;
  for (size_t i = 0; i < j->nitems; i++)
    write_done(st, j->items[i]);
  for (size_t i = 0; i < j->nitems; i++) {
    item_t *it = j->items[i];
    j->items[i] = NULL;
    deliver_item(st, it, NULL);
  }
  job_free(j);
  kick(st);
  return 0;
}

static void one_done(conn_t *c, job_t *j) {
  pg_store_t *st = c->st;
  item_t *it = j->items[0];
  j->items[0] = NULL;
  if (j->failed_stmt == 0 || j->res[0] == NULL) {
    it->err = ZM_E_STORE;
    if (j->res[0] != NULL || j->failed_stmt == 0)
      ZM_WARN("store postgresql %s: %s", st->what,
              j->res[0] ? PQresultErrorMessage(j->res[0]) : "no result");
  }
  if (ITEM_MUTATING(it->kind)) {
    st->wjob = NULL;
    st->wconn = NULL;
    write_done(st, it);
  }
  deliver_item(st, it, it->err == 0 ? j->res[0] : NULL);
  job_free(j);
  kick(st);
}

/* Reads every result available on c. Returns -1 if c broke meanwhile. */
static int process(conn_t *c) {
  int nulls = 0;
  while (c->pg != NULL && !PQisBusy(c->pg)) {
    PGresult *r = PQgetResult(c->pg);
    job_t *j = c->head;
    if (r == NULL) {
      if (j != NULL && j->got) {
        j->stmt++;
        j->got = 0;
        nulls = 0;
        continue;
      }
      if (++nulls >= 2 || j == NULL)
        break;
      continue;
    }
    nulls = 0;
    ExecStatusType s = PQresultStatus(r);
    if (j == NULL) { /* nothing expected: an asynchronous error */
      char msg[256];
      first_line(PQresultErrorMessage(r), msg, sizeof msg);
      PQclear(r);
      if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_broken(c, msg);
        return -1;
      }
      continue;
    }
    if (s == PGRES_PIPELINE_SYNC) {
      PQclear(r);
      c->head = j->next;
      if (c->head == NULL)
        c->tail = NULL;
      c->njobs--;
      j->next = NULL;
      if (j->kind == JOB_SETUP) {
        int ok = j->failed_stmt < 0;
        job_free(j);
        if (!ok) {
          conn_broken(c, "cannot prepare statements");
          return -1;
        }
        conn_ready(c);
      } else if (j->kind == JOB_GROUP) {
        if (group_done(c, j) != 0) {
          conn_broken(c, PQerrorMessage(c->pg));
          return -1;
        }
      } else {
        one_done(c, j);
      }
      continue;
    }
    j->got = 1;
    int failed = s == PGRES_FATAL_ERROR || s == PGRES_NONFATAL_ERROR ||
                 s == PGRES_BAD_RESPONSE;
    if (failed && j->failed_stmt < 0) {
      j->failed_stmt = (long)j->stmt;
      j->fail_err = map_sqlstate(r);
      if (j->kind == JOB_GROUP) {
        item_t *bad = j->stmt < j->nstmts ? j->stmt_item[j->stmt] : NULL;
        if (bad == NULL || j->fail_err == ZM_E_STORE)
          ZM_WARN("store postgresql %s: group failed: %s", c->st->what,
                  PQresultErrorMessage(r));
        else
          ZM_DEBUG("store postgresql %s: unit failed: %s", c->st->what,
                   PQresultErrorMessage(r));
      }
    }
    if (j->kind == JOB_ONE && j->stmt < 2 && j->res[j->stmt] == NULL &&
        s != PGRES_PIPELINE_ABORTED) {
      j->res[j->stmt] = r;
      if (failed && j->stmt == 1) {
        /* the prune after a read: its failure costs nothing */
        j->failed_stmt = -1;
      }
    } else {
      PQclear(r);
    }
  }
  if (c->pg != NULL && PQstatus(c->pg) == CONNECTION_BAD) {
    conn_broken(c, PQerrorMessage(c->pg));
    return -1;
  }
  return 0;
}

/* Socket events on an established connection. */
static void conn_io(conn_t *c, int readable, int writable) {
  if ((writable || readable) && c->want_write && flush(c) != 0) {
    conn_broken(c, PQerrorMessage(c->pg));
    return;
  }
  if (readable && !PQconsumeInput(c->pg)) {
    conn_broken(c, PQerrorMessage(c->pg));
    return;
  }
  if (process(c) != 0)
    return;
  if (c->pg != NULL && flush(c) != 0)
    conn_broken(c, PQerrorMessage(c->pg));
}

/* ==== connection life cycle =============================================== */

static int all_ready(const pg_store_t *st) {
  for (size_t i = 0; i < st->nconns; i++)
    if (st->conns[i].state != C_READY)
      return 0;
  return 1;
}

static void conn_ready(conn_t *c) {
  pg_store_t *st = c->st;
  c->state = C_READY;
  c->backoff_ms = BACKOFF_MIN_MS;
  if (c->lost) {
    c->lost = 0;
    st->stats.reconnects++;
  }
  if (st->lost && all_ready(st)) {
    st->lost = 0;
    ZM_INFO("store postgresql %s: connections re-established", st->what);
  }
  kick(st);
}

static void schedule_reconnect(conn_t *c) {
  if (c->st->closing)
    return;
  uv_timer_start(c->timer, on_timer, c->backoff_ms, 0);
  c->backoff_ms *= 2;
  if (c->backoff_ms > BACKOFF_MAX_MS)
    c->backoff_ms = BACKOFF_MAX_MS;
}

/* Drops c's connection: its jobs fail with ZM_E_STORE, and a reconnect is
 * scheduled. Callbacks run from here. */
static void conn_broken(conn_t *c, const char *why) {
  pg_store_t *st = c->st;
  int was_up = c->state == C_READY || c->state == C_SETUP;
  if (was_up) {
    c->lost = 1;
    if (!st->lost) {
      char msg[256];
      first_line(why, msg, sizeof msg);
      st->lost = 1;
      ZM_WARN("store postgresql %s: connection lost (%s); reconnecting",
              st->what, msg);
    }
  } else {
    char msg[256];
    first_line(why, msg, sizeof msg);
    ZM_DEBUG("store postgresql %s: connect failed: %s", st->what, msg);
  }
  unwatch(c);
  if (c->pg != NULL)
    PQfinish(c->pg);
  c->pg = NULL;
  c->state = C_DOWN;
  c->want_write = 0;
  uv_timer_stop(c->timer);
  job_t *jobs = c->head;
  c->head = c->tail = NULL;
  c->njobs = 0;
  schedule_reconnect(c);
  /* Fail the jobs (in order) after the connection's state is consistent:
   * their callbacks may submit more. */
  while (jobs != NULL) {
    job_t *j = jobs;
    jobs = j->next;
    if (j == st->wjob) {
      st->wjob = NULL;
      st->wconn = NULL;
      if (j->kind == JOB_GROUP)
        st->stats.failed_groups++;
    }
    for (size_t i = 0; i < j->nitems; i++) {
      if (j->items[i] == NULL)
        continue;
      item_t *it = j->items[i];
      j->items[i] = NULL;
      fail_item(st, it);
    }
    job_free(j);
  }
  kick(st);
}

/* Prepares every statement (pipelined, one Sync). */
static int send_setup(conn_t *c) {
  job_t *j = zm_xcalloc(1, sizeof *j);
  j->kind = JOB_SETUP;
  j->failed_stmt = -1;
  for (int s = 0; s < S__COUNT; s++)
    if (!PQsendPrepare(c->pg, STMT_NAME[s], STMT_SQL[s], 0, NULL)) {
      job_free(j);
      return -1;
    }
  if (!PQpipelineSync(c->pg)) {
    job_free(j);
    return -1;
  }
  j->nstmts = S__COUNT;
  conn_push_job(c, j);
  return 0;
}

static void connect_step(conn_t *c) {
  PostgresPollingStatusType ps = PQconnectPoll(c->pg);
  switch (ps) {
  case PGRES_POLLING_READING:
    if (watch(c, UV_READABLE) != 0)
      conn_broken(c, "cannot watch the socket");
    return;
  case PGRES_POLLING_WRITING:
    if (watch(c, UV_WRITABLE) != 0)
      conn_broken(c, "cannot watch the socket");
    return;
  case PGRES_POLLING_OK:
    uv_timer_stop(c->timer);
    if (PQsetnonblocking(c->pg, 1) != 0 || !PQenterPipelineMode(c->pg) ||
        send_setup(c) != 0) {
      conn_broken(c, PQerrorMessage(c->pg));
      return;
    }
    c->state = C_SETUP;
    if (flush(c) != 0)
      conn_broken(c, PQerrorMessage(c->pg));
    return;
  default:
    conn_broken(c, PQerrorMessage(c->pg));
    return;
  }
}

/* Server notices and asynchronous errors (a FATAL before the server closes
 * the connection) go to the debug log, not to stderr. */
static void on_notice(void *arg, const char *msg) {
  char line[256];
  first_line(msg, line, sizeof line);
  ZM_DEBUG("store postgresql %s: %s", arg ? (const char *)arg : "", line);
}

static const char *const CONN_KEYS[] = {"dbname", "fallback_application_name",
                                        NULL};

static void conn_connect(conn_t *c) {
  pg_store_t *st = c->st;
  const char *vals[] = {st->url, "ziti-management", NULL};
  c->pg = PQconnectStartParams(CONN_KEYS, vals, 1);
  c->state = C_CONNECTING;
  if (c->pg != NULL)
    PQsetNoticeProcessor(c->pg, on_notice, st->what);
  if (c->pg == NULL || PQstatus(c->pg) == CONNECTION_BAD ||
      watch(c, UV_WRITABLE) != 0) {
    conn_broken(c, c->pg ? PQerrorMessage(c->pg) : "out of memory");
    return;
  }
  uv_timer_start(c->timer, on_timer, CONNECT_TIMEOUT_MS, 0);
}

static void on_timer(uv_timer_t *t) {
  conn_t *c = t->data;
  if (c == NULL || c->st->closing)
    return;
  if (c->state == C_DOWN)
    conn_connect(c);
  else if (c->state == C_CONNECTING)
    conn_broken(c, "connect timed out");
}

static void on_poll(uv_poll_t *p, int status, int events) {
  pollh_t *ph = (pollh_t *)p;
  conn_t *c = ph->c;
  if (c == NULL || c->pg == NULL)
    return;
  if (status < 0) {
    /* libuv reports POLLERR as UV_EBADF: read what did arrive first, so
     * libpq's own message explains the loss. */
    if (c->state != C_CONNECTING)
      conn_io(c, 1, 0);
    if (c->pg != NULL)
      conn_broken(c, uv_strerror(status));
    return;
  }
  if (c->state == C_CONNECTING) {
    connect_step(c);
    return;
  }
  conn_io(c, (events & UV_READABLE) != 0, (events & UV_WRITABLE) != 0);
}

/* ==== dispatch ============================================================ */

static void kick(pg_store_t *st) {
  if (st->closing || st->queue.head == NULL || st->h == NULL)
    return;
  if (!uv_is_active((uv_handle_t *)&st->h->prepare))
    uv_prepare_start(&st->h->prepare, on_prepare);
}

/* The connection for the next write: the first READY one. *wait is set when
 * none is READY but one is being set up (worth waiting for). */
static conn_t *pick_writer(pg_store_t *st, int *wait) {
  *wait = 0;
  for (size_t i = 0; i < st->nconns; i++) {
    if (st->conns[i].state == C_READY)
      return &st->conns[i];
    if (st->conns[i].state == C_SETUP)
      *wait = 1;
  }
  return NULL;
}

static conn_t *pick_reader(pg_store_t *st, int *wait) {
  conn_t *best = NULL;
  *wait = 0;
  for (size_t i = 0; i < st->nconns; i++) {
    conn_t *c = &st->conns[i];
    if (c->state == C_SETUP)
      *wait = 1;
    if (c->state != C_READY)
      continue;
    if (c->njobs >= MAX_READ_JOBS) {
      *wait = 1;
      continue;
    }
    /* prefer connections without the write job */
    size_t load = c->njobs + (c == st->wconn ? MAX_READ_JOBS : 0);
    size_t bload =
        best ? best->njobs + (best == st->wconn ? MAX_READ_JOBS : 0) : SIZE_MAX;
    if (load < bload)
      best = c;
  }
  return best;
}

static void send_failed(conn_t *c, job_t *j) {
  /* Not queued on c: fail its items, then drop the connection. */
  pg_store_t *st = c->st;
  if (j == st->wjob) {
    st->wjob = NULL;
    st->wconn = NULL;
    if (j->kind == JOB_GROUP)
      st->stats.failed_groups++;
  }
  char msg[256];
  first_line(PQerrorMessage(c->pg), msg, sizeof msg);
  for (size_t i = 0; i < j->nitems; i++) {
    item_t *it = j->items[i];
    j->items[i] = NULL;
    if (it != NULL)
      fail_item(st, it);
  }
  job_free(j);
  conn_broken(c, msg);
}

static int send_one(conn_t *c, job_t *j) {
  item_t *it = j->items[0];
  char a[24], b[24], d[24], e[24];
  int rc = 0;
  j->failed_stmt = -1;
  switch (it->kind) {
  case ITEM_LIST_MANAGED: {
    i64_str(it->type, a);
    i64_str(limit_arg(it->limit), b);
    const char *p[3] = {it->key, a, b};
    rc = send_stmt(c, S_LIST_MANAGED, p);
    break;
  }
  case ITEM_GET_MANAGED: {
    const char *p[1] = {it->key};
    rc = send_stmt(c, it->type ? S_GET_MANAGED_BY_IDENTITY : S_GET_MANAGED, p);
    break;
  }
  case ITEM_FIND_MANAGED: {
    i64_str(limit_arg(it->limit), a);
    const char *p[2] = {it->key, a};
    rc = send_stmt(c, S_FIND_MANAGED, p);
    break;
  }
  case ITEM_CLAIM_EXPIRED: {
    i64_str(it->t1, a);
    i64_str(it->t2, b);
    i64_str(it->t3, d);
    i64_str(limit_arg(it->limit), e);
    const char *p[4] = {a, b, d, e};
    rc = send_stmt(c, S_CLAIM_EXPIRED, p);
    break;
  }
  case ITEM_CLAIM_TOMBS:
  case ITEM_CLAIM_PENDING: {
    i64_str(it->t1, a);
    i64_str(it->t2, b);
    i64_str(limit_arg(it->limit), d);
    const char *p[3] = {a, b, d};
    rc = send_stmt(
        c, it->kind == ITEM_CLAIM_TOMBS ? S_CLAIM_TOMBS : S_CLAIM_PENDING, p);
    break;
  }
  case ITEM_HEARTBEAT: {
    i64_str(it->t1, a);
    const char *p[1] = {a};
    rc = send_stmt(c, S_HEARTBEAT, p);
    break;
  }
  case ITEM_CHANGES: {
    i64_str(it->t1, a);
    i64_str(it->t2, b);
    i64_str(limit_arg(it->limit), d);
    const char *p[3] = {a, b, d};
    rc = send_stmt(c, S_CHANGES, p);
    if (rc == 0 && it->prune) {
      const char *q[1] = {b};
      rc = send_stmt(c, S_PRUNE_CHANGES, q);
    }
    break;
  }
  }
  if (rc != 0 || !PQpipelineSync(c->pg))
    return -1;
  conn_push_job(c, j);
  return flush(c);
}

static job_t *new_job(int kind, size_t nitems) {
  job_t *j = zm_xcalloc(1, sizeof *j);
  j->kind = kind;
  j->failed_stmt = -1;
  j->items = zm_xcalloc(nitems, sizeof *j->items);
  return j;
}

static void dispatch(pg_store_t *st) {
  while (st->queue.head != NULL) {
    item_t *it = st->queue.head;
    int wait;
    if (ITEM_MUTATING(it->kind)) {
      if (st->wjob != NULL)
        return; /* one write job at a time: the rest forms the next */
      conn_t *c = pick_writer(st, &wait);
      if (c == NULL) {
        if (wait)
          return;
        fail_item(st, q_pop(&st->queue));
        continue;
      }
      job_t *j;
      if (it->kind == ITEM_UNIT) {
        size_t n = 0, stmts = 0;
        for (item_t *x = it;
             x != NULL && x->kind == ITEM_UNIT && n < MAX_GROUP_UNITS &&
             (n == 0 || stmts + x->nops <= MAX_GROUP_STMTS);
             x = x->next) {
          n++;
          stmts += x->nops;
        }
        j = new_job(JOB_GROUP, n);
        for (size_t i = 0; i < n; i++)
          j->items[j->nitems++] = q_pop(&st->queue);
        st->wjob = j;
        st->wconn = c;
        if (send_group(c, j) != 0) {
          send_failed(c, j);
          continue;
        }
        conn_push_job(c, j);
        if (flush(c) != 0) {
          conn_broken(c, PQerrorMessage(c->pg));
          continue;
        }
      } else {
        j = new_job(JOB_ONE, 1);
        j->items[j->nitems++] = q_pop(&st->queue);
        st->wjob = j;
        st->wconn = c;
        if (send_one(c, j) != 0) {
          if (c->head == NULL || c->tail != j)
            send_failed(c, j);
          else
            conn_broken(c, PQerrorMessage(c->pg));
          continue;
        }
      }
    } else {
      if (it->seq > st->done_wseq)
        return; /* waits for the writes before it */
      conn_t *c = pick_reader(st, &wait);
      if (c == NULL) {
        if (wait)
          return;
        fail_item(st, q_pop(&st->queue));
        continue;
      }
      job_t *j = new_job(JOB_ONE, 1);
      j->items[j->nitems++] = q_pop(&st->queue);
      if (send_one(c, j) != 0) {
        if (c->head == NULL || c->tail != j)
          send_failed(c, j);
        else
          conn_broken(c, PQerrorMessage(c->pg));
        continue;
      }
    }
  }
}

static void on_prepare(uv_prepare_t *p) {
  handles_t *h = container_of(p, handles_t, prepare);
  uv_prepare_stop(p);
  if (h->st != NULL)
    dispatch(h->st);
}

/* ==== open / close ======================================================== */

static void on_handle_closed(uv_handle_t *hd) {
  handles_t *h = hd->data;
  if (--h->open == 0)
    free(h);
}

/* A blocking connection (open, load). */
static PGconn *connect_blocking(const char *url) {
  const char *vals[] = {url, "ziti-management", NULL};
  PGconn *c = PQconnectdbParams(CONN_KEYS, vals, 1);
  if (c != NULL)
    PQsetNoticeProcessor(c, on_notice, NULL);
  return c;
}

/* Start-up only (before the loop runs): a database that is not up yet -
 * replicas and PostgreSQL started together, a failover in progress - is
 * retried with backoff until timeout_ms have passed since the first try.
 * Every failure is logged, so a wrong password or database name shows at
 * once even though it is retried too. Returns a connected PGconn, or NULL
 * (logged). */
static PGconn *connect_startup(const char *url, const char *what,
                               uint64_t timeout_ms) {
  uint64_t t0 = uv_hrtime(), backoff = 250;
  for (unsigned attempt = 1;; attempt++) {
    PGconn *c = connect_blocking(url);
    if (c != NULL && PQstatus(c) == CONNECTION_OK)
      return c;
    char msg[256];
    first_line(c ? PQerrorMessage(c) : "out of memory", msg, sizeof msg);
    PQfinish(c);
    uint64_t spent = (uv_hrtime() - t0) / 1000000u;
    if (spent + backoff > timeout_ms) {
      ZM_ERROR("store postgresql%s%s: cannot connect: %s%s", what ? " " : "",
               what ? what : "", msg,
               timeout_ms ? " (gave up: DATABASE_CONNECT_TIMEOUT)" : "");
      return NULL;
    }
    ZM_WARN("store postgresql%s%s: cannot connect (attempt %u): %s; retrying "
            "in %llu ms",
            what ? " " : "", what ? what : "", attempt, msg,
            (unsigned long long)backoff);
    struct timespec ts = {(time_t)(backoff / 1000),
                          (long)(backoff % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
      ;
    backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
  }
}

static char *describe(PGconn *c) {
  const char *host = PQhost(c), *port = PQport(c), *db = PQdb(c);
  size_t n = strlen(host ? host : "") + strlen(port ? port : "") +
             strlen(db ? db : "") + 3;
  char *s = zm_xmalloc(n);
  snprintf(s, n, "%s:%s/%s", host ? host : "", port ? port : "", db ? db : "");
  return s;
}

/* Makes c (blocking, connected) a pool connection: statements prepared,
 * non-blocking, pipeline mode, watched. */
static int adopt(conn_t *c, PGconn *pg) {
  c->pg = pg;
  for (int s = 0; s < S__COUNT; s++) {
    PGresult *r = PQprepare(pg, STMT_NAME[s], STMT_SQL[s], 0, NULL);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) {
      ZM_ERROR("store postgresql %s: prepare %s: %s", c->st->what, STMT_NAME[s],
               PQerrorMessage(pg));
      return -1;
    }
  }
  if (PQsetnonblocking(pg, 1) != 0 || !PQenterPipelineMode(pg) ||
      watch(c, UV_READABLE) != 0) {
    ZM_ERROR("store postgresql %s: cannot enter pipeline mode: %s", c->st->what,
             PQerrorMessage(pg));
    return -1;
  }
  c->state = C_READY;
  return 0;
}

static void teardown(pg_store_t *st) {
  for (size_t i = 0; i < st->nconns; i++) {
    conn_t *c = &st->conns[i];
    unwatch(c);
    if (c->pg != NULL)
      PQfinish(c->pg);
    c->pg = NULL;
    for (job_t *j = c->head, *n; j != NULL; j = n) {
      n = j->next;
      job_free(j); /* items already delivered */
    }
  }
  if (st->h != NULL) {
    st->h->st = NULL;
    for (size_t i = 0; i < st->nconns; i++) {
      st->h->timers[i].data = st->h; /* for on_handle_closed */
      uv_close((uv_handle_t *)&st->h->timers[i], on_handle_closed);
    }
    uv_close((uv_handle_t *)&st->h->prepare, on_handle_closed);
  }
  free(st->conns);
  free(st->url);
  free(st->what);
  free(st);
}

static int pg_open(zm_store_t **out, uv_loop_t *loop,
                   const zm_store_config_t *cfg) {
  ZM_ASSERT(out != NULL && loop != NULL && cfg != NULL && cfg->url != NULL);
  *out = NULL;
  size_t n = cfg->pool_size ? cfg->pool_size : DEFAULT_POOL;
  if (n < 2)
    n = 2;
  if (n > MAX_POOL)
    n = MAX_POOL;
  char why[512];
  if (zm_pq_load(why, sizeof why) != 0) {
    ZM_ERROR("store postgresql: %s", why);
    return ZM_E_STORE;
  }
  PGconn *first = connect_startup(cfg->url, NULL, cfg->connect_timeout_ms);
  if (first == NULL)
    return ZM_E_STORE;
  pg_store_t *st = zm_xcalloc(1, sizeof *st);
  st->loop = loop;
  st->url = zm_xstrdup(cfg->url);
  st->what = describe(first);
  st->nconns = n;
  st->conns = zm_xcalloc(n, sizeof *st->conns);
  st->h = zm_xcalloc(1, sizeof *st->h + n * sizeof st->h->timers[0]);
  st->h->st = st;
  uv_prepare_init(loop, &st->h->prepare);
  st->h->prepare.data = st->h;
  st->h->open = 1;
  for (size_t i = 0; i < n; i++) {
    uv_timer_init(loop, &st->h->timers[i]);
    uv_unref((uv_handle_t *)&st->h->timers[i]); /* reconnects: background */
    st->h->timers[i].data = &st->conns[i];
    st->h->open++;
    st->conns[i].st = st;
    st->conns[i].idx = (int)i;
    st->conns[i].timer = &st->h->timers[i];
    st->conns[i].backoff_ms = BACKOFF_MIN_MS;
  }
  if (zm__pg_migrate(first, st->what) != 0) {
    PQfinish(first);
    teardown(st);
    return ZM_E_STORE;
  }
  if (adopt(&st->conns[0], first) != 0) {
    teardown(st);
    return ZM_E_STORE;
  }
  for (size_t i = 1; i < n; i++) {
    PGconn *pg = connect_startup(st->url, st->what, cfg->connect_timeout_ms);
    if (pg == NULL) {
      teardown(st);
      return ZM_E_STORE;
    }
    if (adopt(&st->conns[i], pg) != 0) {
      teardown(st);
      return ZM_E_STORE;
    }
  }
  st->last_prune_ms = uv_now(loop);
  ZM_INFO("store postgresql %s: open, %zu connections%s", st->what, n,
          PQsslInUse(first) ? ", TLS" : "");
  *out = &st->base;
  return 0;
}

static int busy(const pg_store_t *st) {
  if (st->queue.head != NULL)
    return 1;
  for (size_t i = 0; i < st->nconns; i++)
    if (st->conns[i].head != NULL)
      return 1;
  return 0;
}

/* Close: drive the pool with poll(2) until the queue is committed and
 * nothing is in flight, or CLOSE_TIMEOUT_MS passed. */
static void pg_close(zm_store_t *base) {
  if (base == NULL)
    return;
  pg_store_t *st = PG(base);
  ZM_ASSERT(!st->delivering); /* not from inside a store callback */
  st->closing = 1;
  for (size_t i = 0; i < st->nconns; i++)
    uv_timer_stop(st->conns[i].timer);
  uint64_t deadline = uv_hrtime() / 1000000u + CLOSE_TIMEOUT_MS;
  struct pollfd fds[MAX_POOL];
  conn_t *who[MAX_POOL];
  while (busy(st)) {
    /* Nothing reconnects now: connections still connecting are given up,
     * so work finds them down and fails at once. */
    for (size_t i = 0; i < st->nconns; i++)
      if (st->conns[i].state == C_CONNECTING)
        conn_broken(&st->conns[i], "shutting down");
    dispatch(st);
    size_t nf = 0;
    for (size_t i = 0; i < st->nconns; i++) {
      conn_t *c = &st->conns[i];
      if (c->pg == NULL || c->head == NULL)
        continue;
      fds[nf].fd = PQsocket(c->pg);
      fds[nf].events = (short)(POLLIN | (c->want_write ? POLLOUT : 0));
      fds[nf].revents = 0;
      who[nf++] = c;
    }
    if (nf == 0) {
      if (!busy(st))
        break;
      continue; /* dispatch will fail or send what is left */
    }
    uint64_t now = uv_hrtime() / 1000000u;
    if (now >= deadline) {
      ZM_ERROR("store postgresql %s: close: the database did not answer in"
               " %d s; giving up on what is in flight",
               st->what, CLOSE_TIMEOUT_MS / 1000);
      for (size_t i = 0; i < st->nconns; i++)
        if (st->conns[i].pg != NULL)
          conn_broken(&st->conns[i], "close timed out");
      while (st->queue.head != NULL)
        fail_item(st, q_pop(&st->queue));
      break;
    }
    int rc = poll(fds, nf, (int)(deadline - now));
    if (rc < 0 && errno != EINTR)
      break;
    for (size_t i = 0; rc > 0 && i < nf; i++) {
      if (fds[i].revents == 0 || who[i]->pg == NULL)
        continue;
      conn_io(who[i], (fds[i].revents & (POLLIN | POLLERR | POLLHUP)) != 0,
              (fds[i].revents & POLLOUT) != 0);
    }
  }
  teardown(st);
}

/* ==== load ================================================================ */

static int load_exec(PGconn *c, const char *what, const char *sql) {
  PGresult *r = PQexec(c, sql);
  int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  if (!ok)
    ZM_ERROR("store postgresql %s: load: %s", what, PQerrorMessage(c));
  PQclear(r);
  return ok ? 0 : ZM_E_STORE;
}

/* Rows per FETCH at start-up. One batch is held in memory at a time (a
 * managed row costs a few hundred bytes in a PGresult): 1000 rows keep that
 * near 0.3 MiB beside the index, where 10000 made the start-up peak ~3 MiB
 * higher; a round trip per 1000 rows is noise next to the rows' own cost. */
#define LOAD_FETCH_ROWS "1000"

/* Runs "FETCH ... FROM cur" until the cursor is exhausted, calling row(r,
 * i) for every row. */
static int load_cursor(PGconn *c, const char *what, const char *cur,
                       void (*row)(const PGresult *r, int i, void *ctx),
                       void *ctx) {
  char sql[96];
  snprintf(sql, sizeof sql, "FETCH FORWARD " LOAD_FETCH_ROWS " FROM %s", cur);
  for (;;) {
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
      ZM_ERROR("store postgresql %s: load: %s", what, PQerrorMessage(c));
      PQclear(r);
      return ZM_E_STORE;
    }
    int n = PQntuples(r);
    for (int i = 0; i < n; i++)
      row(r, i, ctx);
    PQclear(r);
    if (n == 0)
      return 0;
  }
}

typedef struct {
  void (*on_managed)(const zm_managed_row_t *r, void *data);
  void (*on_service)(const zm_service_row_t *r, void *data);
  void (*on_pending)(const zm_pending_row_t *r, void *data);
  void *data;
} load_ctx_t;

static void load_managed(const PGresult *r, int i, void *ctx) {
  load_ctx_t *l = ctx;
  zm_managed_row_t m = {
      .ziti_identity_id = col_str(r, i, 0),
      .identity_id = col_str(r, i, 1),
      .identity_type = (int)col_i64(r, i, 2),
      .created_at_ms = col_i64(r, i, 3),
      .ziti_service_id = col_str(r, i, 4),
      .workload_id = col_str(r, i, 5),
      .agent_id = col_str(r, i, 6),
      .environment_id = col_str(r, i, 7),
  };
  l->on_managed(&m, l->data);
}

static void load_service(const PGresult *r, int i, void *ctx) {
  load_ctx_t *l = ctx;
  zm_service_row_t s = {
      .ziti_identity_id = col_str(r, i, 0),
      .service_type = (int)col_i64(r, i, 1),
      .lease_expires_ms = col_i64(r, i, 2),
      .created_at_ms = col_i64(r, i, 3),
  };
  l->on_service(&s, l->data);
}

static void load_pending(const PGresult *r, int i, void *ctx) {
  load_ctx_t *l = ctx;
  zm_pending_row_t p = {
      .name = col_str(r, i, 0),
      .kind = (int)col_i64(r, i, 1),
      .type = (int)col_i64(r, i, 2),
      .ziti_identity_id = col_str(r, i, 3),
      .agent_id = col_str(r, i, 4),
      .created_at_ms = col_i64(r, i, 5),
      .resolve_after_ms = col_i64(r, i, 6),
  };
  l->on_pending(&p, l->data);
}

/* Synchronous, on a blocking connection of its own: one REPEATABLE READ
 * snapshot, three cursors fetched LOAD_FETCH_ROWS rows at a time. */
static int pg_load(zm_store_t *base,
                   void (*on_managed)(const zm_managed_row_t *r, void *data),
                   void (*on_service)(const zm_service_row_t *r, void *data),
                   void (*on_pending)(const zm_pending_row_t *r, void *data),
                   void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(!st->delivering);
  PGconn *c = connect_blocking(st->url);
  if (c == NULL || PQstatus(c) != CONNECTION_OK) {
    char msg[256];
    first_line(c ? PQerrorMessage(c) : "out of memory", msg, sizeof msg);
    ZM_ERROR("store postgresql %s: load: cannot connect: %s", st->what, msg);
    PQfinish(c);
    return ZM_E_STORE;
  }
  load_ctx_t l = {on_managed, on_service, on_pending, data};
  int rv =
      load_exec(c, st->what, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
  if (rv == 0 && on_managed != NULL)
    rv = load_exec(c, st->what,
                   "DECLARE zm_m NO SCROLL CURSOR FOR SELECT " MANAGED_COLS
                   " FROM managed_identities");
  if (rv == 0 && on_managed != NULL)
    rv = load_cursor(c, st->what, "zm_m", load_managed, &l);
  if (rv == 0 && on_service != NULL)
    rv = load_exec(c, st->what,
                   "DECLARE zm_s NO SCROLL CURSOR FOR SELECT ziti_identity_id,"
                   " service_type, zm_ms(lease_expires_at), zm_ms(created_at)"
                   " FROM service_identities");
  if (rv == 0 && on_service != NULL)
    rv = load_cursor(c, st->what, "zm_s", load_service, &l);
  if (rv == 0 && on_pending != NULL)
    rv = load_exec(c, st->what,
                   "DECLARE zm_p NO SCROLL CURSOR FOR SELECT name, kind, type,"
                   " ziti_identity_id, agent_id, zm_ms(created_at),"
                   " zm_ms(resolve_after) FROM pending_identities");
  if (rv == 0 && on_pending != NULL)
    rv = load_cursor(c, st->what, "zm_p", load_pending, &l);
  if (rv == 0)
    rv = load_exec(c, st->what, "COMMIT");
  PQfinish(c);
  return rv;
}

/* ==== submitting ========================================================== */

/* Strings op uses, by kind (FLUSH_LEASES' arrays are copied separately). */
static size_t op_strings(zm_store_op_t *op, const char **f[8]) {
  size_t n = 0;
  switch (op->kind) {
  case ZM_STORE_PUT_MANAGED:
    f[n++] = &op->managed.ziti_identity_id;
    f[n++] = &op->managed.identity_id;
    f[n++] = &op->managed.ziti_service_id;
    f[n++] = &op->managed.workload_id;
    f[n++] = &op->managed.agent_id;
    f[n++] = &op->managed.environment_id;
    break;
  case ZM_STORE_PUT_SERVICE:
    f[n++] = &op->service.ziti_identity_id;
    break;
  case ZM_STORE_PUT_PENDING:
    f[n++] = &op->pending.name;
    f[n++] = &op->pending.ziti_identity_id;
    f[n++] = &op->pending.agent_id;
    break;
  case ZM_STORE_SET_PENDING_ID:
    f[n++] = &op->name;
    f[n++] = &op->id;
    break;
  case ZM_STORE_DEL_PENDING:
  case ZM_STORE_TAKE_PENDING:
    f[n++] = &op->name;
    break;
  case ZM_STORE_PUT_TOMB:
    f[n++] = &op->tomb.ziti_identity_id;
    break;
  case ZM_STORE_EXTEND_LEASE:
  case ZM_STORE_RETIRE_MANAGED:
  case ZM_STORE_RETIRE_SERVICE:
  case ZM_STORE_DEL_TOMB:
  case ZM_STORE_DEFER_TOMB:
    f[n++] = &op->id;
    break;
  case ZM_STORE_FLUSH_LEASES:
    break;
  }
  return n;
}

static void pg_submit(zm_store_t *base, const zm_store_op_t *ops, size_t n,
                      zm_store_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(n == 0 || ops != NULL);
  size_t bytes = 0;
  for (size_t i = 0; i < n; i++) {
    zm_store_op_t tmp = ops[i];
    const char **f[8];
    size_t nf = op_strings(&tmp, f);
    for (size_t k = 0; k < nf; k++)
      if (*f[k] != NULL)
        bytes += strlen(*f[k]) + 1;
    if (tmp.kind == ZM_STORE_FLUSH_LEASES) {
      bytes += tmp.n * (sizeof(char *) + sizeof(int64_t)) + sizeof(int64_t);
      for (size_t k = 0; k < tmp.n; k++)
        bytes += strlen(tmp.ids[k] ? tmp.ids[k] : "") + 1;
    }
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
    if (op->kind == ZM_STORE_FLUSH_LEASES) {
      /* int64s first (aligned: the block so far is pointer-aligned and
       * every string length is padded below), then pointers, then text. */
      size_t pad = (size_t)(-(uintptr_t)p & (sizeof(int64_t) - 1));
      p += pad;
      int64_t *mss = (int64_t *)(void *)p;
      memcpy(mss, ops[i].mss, op->n * sizeof *mss);
      p += op->n * sizeof *mss;
      const char **ids = (const char **)(void *)p;
      p += op->n * sizeof *ids;
      for (size_t k = 0; k < op->n; k++) {
        const char *s = ops[i].ids[k] ? ops[i].ids[k] : "";
        size_t len = strlen(s) + 1;
        memcpy(p, s, len);
        ids[k] = p;
        p += len;
      }
      op->ids = ids;
      op->mss = mss;
      continue;
    }
    op->ids = NULL;
    op->mss = NULL;
    const char **f[8];
    size_t nf = op_strings(op, f);
    for (size_t k = 0; k < nf; k++) {
      if (*f[k] == NULL)
        continue;
      size_t len = strlen(*f[k]) + 1;
      memcpy(p, *f[k], len);
      *f[k] = p;
      p += len;
    }
  }
  ZM_ASSERT(p <= (char *)(it->ops + n) + bytes);
  for (size_t i = 0; i < n; i++)
    if (it->ops[i].kind < ZM_STORE_PUT_MANAGED ||
        it->ops[i].kind > ZM_STORE_DEFER_TOMB) {
      ZM_WARN("store postgresql %s: unknown op kind %d", st->what,
              (int)it->ops[i].kind);
      it->err = ZM_E_INVAL; /* never sent; delivered with its group */
    }
  st->stats.units++;
  it->seq = ++st->wseq;
  q_push(&st->queue, it);
  kick(st);
}

static item_t *new_item(pg_store_t *st, int kind, const char *key, size_t limit,
                        void *data) {
  size_t klen = key ? strlen(key) + 1 : 0;
  item_t *it = zm_xcalloc(1, sizeof *it + klen);
  it->kind = kind;
  it->data = data;
  it->limit = limit;
  if (key != NULL) {
    memcpy(it + 1, key, klen);
    it->key = (const char *)(it + 1);
  }
  it->seq = ITEM_MUTATING(kind) ? ++st->wseq : st->wseq;
  return it;
}

static void push(pg_store_t *st, item_t *it) {
  q_push(&st->queue, it);
  kick(st);
}

static void pg_list_managed(zm_store_t *base, int type, const char *after_id,
                            size_t limit, zm_store_managed_list_cb cb,
                            void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  item_t *it =
      new_item(st, ITEM_LIST_MANAGED, after_id ? after_id : "", limit, data);
  it->type = type;
  it->cb.managed = cb;
  push(st, it);
}

static void pg_get_managed(zm_store_t *base, const char *id,
                           zm_store_managed_list_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL && id != NULL);
  item_t *it = new_item(st, ITEM_GET_MANAGED, id, 1, data);
  it->cb.managed = cb;
  push(st, it);
}

static void pg_find_managed(zm_store_t *base, const char *identity_id,
                            size_t limit, zm_store_managed_list_cb cb,
                            void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL && identity_id != NULL);
  item_t *it = new_item(st, ITEM_FIND_MANAGED, identity_id, limit, data);
  it->cb.managed = cb;
  push(st, it);
}

static void pg_find_managed_by_identity(zm_store_t *base,
                                        const char *identity_id,
                                        zm_store_managed_list_cb cb,
                                        void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL && identity_id != NULL);
  item_t *it = new_item(st, ITEM_GET_MANAGED, identity_id, 1, data);
  it->type = 1; /* by identity_id */
  it->cb.managed = cb;
  push(st, it);
}

static void pg_claim_expired(zm_store_t *base, int64_t cut_ms, int64_t now_ms,
                             int64_t claim_until_ms, size_t limit,
                             zm_store_tomb_list_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  item_t *it = new_item(st, ITEM_CLAIM_EXPIRED, NULL, limit, data);
  it->t1 = cut_ms;
  it->t2 = now_ms;
  it->t3 = claim_until_ms;
  it->cb.tomb = cb;
  push(st, it);
}

static void pg_claim_tombs(zm_store_t *base, int64_t now_ms,
                           int64_t claim_until_ms, size_t limit,
                           zm_store_tomb_list_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  item_t *it = new_item(st, ITEM_CLAIM_TOMBS, NULL, limit, data);
  it->t1 = now_ms;
  it->t2 = claim_until_ms;
  it->cb.tomb = cb;
  push(st, it);
}

static void pg_claim_pending(zm_store_t *base, int64_t now_ms,
                             int64_t claim_until_ms, size_t limit,
                             zm_store_pending_list_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  item_t *it = new_item(st, ITEM_CLAIM_PENDING, NULL, limit, data);
  it->t1 = now_ms;
  it->t2 = claim_until_ms;
  it->cb.pending = cb;
  push(st, it);
}

static void pg_heartbeat(zm_store_t *base, int64_t local_now_ms, int64_t gap_ms,
                         zm_store_beat_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  (void)local_now_ms; /* the database's clock is the store clock */
  item_t *it = new_item(st, ITEM_HEARTBEAT, NULL, 0, data);
  it->t1 = gap_ms;
  it->cb.beat = cb;
  push(st, it);
}

static void pg_changes(zm_store_t *base, int64_t after_seq, int64_t since_ms,
                       size_t limit, zm_store_changes_cb cb, void *data) {
  pg_store_t *st = PG(base);
  ZM_ASSERT(cb != NULL);
  item_t *it = new_item(st, ITEM_CHANGES, NULL, limit, data);
  it->t1 = after_seq;
  it->t2 = since_ms;
  it->cb.changes = cb;
  uint64_t now = uv_now(st->loop);
  if (++st->changes_calls % PRUNE_EVERY == 0 ||
      now - st->last_prune_ms >= PRUNE_PERIOD_MS) {
    it->prune = 1;
    st->last_prune_ms = now;
  }
  push(st, it);
}

static void pg_get_stats(const zm_store_t *base, zm_store_stats_t *out) {
  const pg_store_t *st = (const pg_store_t *)base;
  *out = st->stats;
  out->queued = st->queue.units;
}

const zm__store_vt zm__pg_vt = {
    .name = "postgresql",
    .shared = 1,
    .open = pg_open,
    .close = pg_close,
    .load = pg_load,
    .submit = pg_submit,
    .list_managed = pg_list_managed,
    .get_managed = pg_get_managed,
    .find_managed = pg_find_managed,
    .find_managed_by_identity = pg_find_managed_by_identity,
    .claim_expired = pg_claim_expired,
    .claim_tombs = pg_claim_tombs,
    .claim_pending = pg_claim_pending,
    .heartbeat = pg_heartbeat,
    .changes = pg_changes,
    .get_stats = pg_get_stats,
};
