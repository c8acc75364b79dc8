/* store_test.c - the store (include/zm/store.h) on a real uv loop.
 *
 * Backend-agnostic where it can be: with ZM_TEST_DATABASE_URL set, every
 * store is opened with cfg.url = that value (the PostgreSQL backend; each
 * test starts from emptied tables) and the tests that are about SQLite
 * itself (files, WAL, SIGKILL durability, old-schema migration, lock
 * timeouts) are skipped, saying so. Otherwise SQLite, in a temp directory.
 *
 * sqlite.c is included so a test can reach the SQLite connection (to
 * shorten the busy timeout when provoking a failed group). */
#include "store/sqlite.c"

#include <libpq-fe.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* ==== helpers ============================================================= */

static char dir[64];
static const char *pg_url; /* ZM_TEST_DATABASE_URL, or NULL: SQLite */

static int setup_dir(void **state) {
  (void)state;
  const char *u = getenv("ZM_TEST_DATABASE_URL");
  pg_url = u != NULL && u[0] != '\0' ? u : NULL;
  print_message("store backend under test: %s\n",
                pg_url ? "postgresql (ZM_TEST_DATABASE_URL)" : "sqlite");
  snprintf(dir, sizeof dir, "/tmp/zm-store-test-XXXXXX");
  assert_non_null(mkdtemp(dir));
  return 0;
}

static int teardown_dir(void **state) {
  (void)state;
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  assert_int_equal(system(cmd), 0);
  return 0;
}

/* Tests about SQLite itself are skipped against PostgreSQL. */
#define SQLITE_ONLY(name)                                                      \
  do {                                                                         \
    if (pg_url != NULL) {                                                      \
      print_message("skipped with ZM_TEST_DATABASE_URL (SQLite only): %s\n",   \
                    name);                                                     \
      skip();                                                                  \
    }                                                                          \
  } while (0)

static char *db_path(const char *name) {
  static char p[128];
  snprintf(p, sizeof p, "%s/%s.db", dir, name);
  return p;
}

static zm_store_t *open_store(uv_loop_t *loop, const char *path, int sync) {
  zm_store_config_t cfg = {.path = path, .sync_full = sync, .url = pg_url};
  zm_store_t *st = NULL;
  assert_int_equal(zm_store_open(&st, loop, &cfg), 0);
  assert_non_null(st);
  assert_int_equal(zm_store_shared(st), pg_url != NULL);
  return st;
}

/* PostgreSQL: one database for every test, so each starts by emptying the
 * tables (SQLite: every test has files of its own). */
static void pg_reset(void) {
  PGconn *c = PQconnectdb(pg_url);
  if (PQstatus(c) != CONNECTION_OK)
    fail_msg("%s", PQerrorMessage(c));
  PGresult *r =
      PQexec(c, "TRUNCATE managed_identities, service_identities,"
                " pending_identities, deleting_identities, identity_changes,"
                " service_clock");
  if (PQresultStatus(r) != PGRES_COMMAND_OK)
    fail_msg("%s", PQerrorMessage(c));
  PQclear(r);
  PQfinish(c);
}

/* A store with nothing in it. */
static zm_store_t *open_fresh(uv_loop_t *loop, const char *name, int sync) {
  zm_store_t *st = open_store(loop, db_path(name), sync);
  if (pg_url != NULL)
    pg_reset();
  return st;
}

/* Close, let the loop retire the handles, and prove nothing is left. */
static void close_all(zm_store_t *st, uv_loop_t *loop) {
  zm_store_close(st);
  assert_int_equal(uv_run(loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(uv_loop_close(loop), 0);
}

/* A second, independent connection: what it sees is committed. */
static sqlite3 *peek_open(const char *path) {
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL),
                   SQLITE_OK);
  return db;
}

static long long peek_int(sqlite3 *db, const char *sql, const char *arg) {
  sqlite3_stmt *s = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
  if (arg)
    sqlite3_bind_text(s, 1, arg, -1, SQLITE_TRANSIENT);
  assert_int_equal(sqlite3_step(s), SQLITE_ROW);
  long long v = sqlite3_column_int64(s, 0);
  sqlite3_finalize(s);
  return v;
}

static void peek_exec(sqlite3 *db, const char *sql) {
  char *msg = NULL;
  int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
  if (rc != SQLITE_OK)
    fail_msg("%s: %s", sql, msg ? msg : "?");
}

/* Records unit outcomes in submission order. */
typedef struct {
  int n;
  int errs[16384];
  int tags[16384];
  int in_submit; /* set around zm_store_submit: a callback there is a bug */
} outcomes_t;

typedef struct {
  outcomes_t *o;
  int tag;
} tagged_t;

static tagged_t tagpool[16384];

static void on_unit(int err, void *data) {
  tagged_t *t = data;
  assert_false(t->o->in_submit);
  t->o->errs[t->o->n] = err;
  t->o->tags[t->o->n] = t->tag;
  t->o->n++;
}

static void submit(zm_store_t *st, outcomes_t *o, int tag,
                   const zm_store_op_t *ops, size_t n) {
  tagpool[tag] = (tagged_t){o, tag};
  o->in_submit = 1;
  zm_store_submit(st, ops, n, on_unit, &tagpool[tag]);
  o->in_submit = 0;
}

/* Submits one unit, runs the loop, returns its outcome. */
static int run1(zm_store_t *st, uv_loop_t *loop, const zm_store_op_t *ops,
                size_t n) {
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  submit(st, &o, 0, ops, n);
  assert_int_equal(o.n, 0);
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 1);
  return o.errs[0];
}

/* Rows collected by zm_store_load (or a read), copied. */
typedef struct {
  char zid[64], identity_id[64];
  char svc[64], workload[64], agent[64], env[64]; /* "(null)" for NULL */
  int type;
  int64_t created, lease, resolve_after;
  int kind, has_zid;
} row_t;

typedef struct {
  row_t m[64], s[64], p[64];
  int nm, ns, np;
} loaded_t;

static void copy_opt(char *dst, size_t n, const char *s) {
  snprintf(dst, n, "%s", s ? s : "(null)");
}

static void copy_managed(row_t *x, const zm_managed_row_t *r) {
  memset(x, 0, sizeof *x);
  snprintf(x->zid, sizeof x->zid, "%s", r->ziti_identity_id);
  snprintf(x->identity_id, sizeof x->identity_id, "%s", r->identity_id);
  x->type = r->identity_type;
  x->created = r->created_at_ms;
  copy_opt(x->svc, sizeof x->svc, r->ziti_service_id);
  copy_opt(x->workload, sizeof x->workload, r->workload_id);
  copy_opt(x->agent, sizeof x->agent, r->agent_id);
  copy_opt(x->env, sizeof x->env, r->environment_id);
}

static void copy_pending(row_t *x, const zm_pending_row_t *r) {
  memset(x, 0, sizeof *x);
  snprintf(x->zid, sizeof x->zid, "%s", r->name);
  x->has_zid = r->ziti_identity_id != NULL;
  snprintf(x->identity_id, sizeof x->identity_id, "%s",
           r->ziti_identity_id ? r->ziti_identity_id : "");
  copy_opt(x->agent, sizeof x->agent, r->agent_id);
  x->kind = r->kind;
  x->type = r->type;
  x->created = r->created_at_ms;
  x->resolve_after = r->resolve_after_ms;
}

static void on_lm(const zm_managed_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->nm < 64);
  copy_managed(&l->m[l->nm++], r);
}

static void on_ls(const zm_service_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->ns < 64);
  row_t *x = &l->s[l->ns++];
  memset(x, 0, sizeof *x);
  snprintf(x->zid, sizeof x->zid, "%s", r->ziti_identity_id);
  x->type = r->service_type;
  x->lease = r->lease_expires_ms;
  x->created = r->created_at_ms;
}

static void on_lp(const zm_pending_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->np < 64);
  copy_pending(&l->p[l->np++], r);
}

static void load_all(zm_store_t *st, loaded_t *l) {
  memset(l, 0, sizeof *l);
  assert_int_equal(zm_store_load(st, on_lm, on_ls, on_lp, l), 0);
}

static const row_t *find(const row_t *rows, int n, const char *zid) {
  for (int i = 0; i < n; i++)
    if (strcmp(rows[i].zid, zid) == 0)
      return &rows[i];
  return NULL;
}

static zm_store_op_t put_managed(const char *zid, const char *iid, int type,
                                 int64_t created) {
  return (zm_store_op_t){
      .kind = ZM_STORE_PUT_MANAGED,
      .managed = {zid, iid, type, created, NULL, NULL, NULL, NULL}};
}

static zm_store_op_t put_service(const char *zid, int type, int64_t lease,
                                 int64_t created) {
  return (zm_store_op_t){.kind = ZM_STORE_PUT_SERVICE,
                         .service = {zid, type, lease, created}};
}

static zm_store_op_t put_pending(const char *name, int kind, int type,
                                 const char *zid, int64_t created) {
  return (zm_store_op_t){
      .kind = ZM_STORE_PUT_PENDING,
      .pending = {name, kind, type, zid, NULL, created, created + 600000}};
}

static zm_store_op_t op_id(zm_store_op_kind_t k, const char *id, int64_t ms) {
  return (zm_store_op_t){.kind = k, .id = id, .ms = ms};
}

static zm_store_op_t op_name(zm_store_op_kind_t k, const char *name,
                             const char *id) {
  return (zm_store_op_t){.kind = k, .name = name, .id = id};
}

static zm_store_op_t retire_service(const char *id, int64_t guard,
                                    int64_t next_try, int64_t claim_until,
                                    int64_t created) {
  return (zm_store_op_t){.kind = ZM_STORE_RETIRE_SERVICE,
                         .id = id,
                         .ms = claim_until,
                         .ms2 = guard,
                         .tomb = {.kind = ZM_TOMB_SERVICE,
                                  .next_try_ms = next_try,
                                  .created_at_ms = created}};
}

static zm_store_op_t tomb_op(const char *id, int kind, int type,
                             int64_t next_try, int64_t claim_until,
                             int64_t created) {
  return (zm_store_op_t){.kind = ZM_STORE_PUT_TOMB,
                         .ms = claim_until,
                         .tomb = {.ziti_identity_id = id,
                                  .kind = kind,
                                  .type = type,
                                  .next_try_ms = next_try,
                                  .created_at_ms = created}};
}

/* Results of one read or claim, copied. */
typedef struct {
  int calls, err, n;
  int in_call; /* set around the call that queued it */
  row_t rows[64];
  zm_tomb_row_t tombs[64];
  char tomb_ids[64][64];
} got_t;

static void on_got_managed(int err, const zm_managed_row_t *rows, size_t n,
                           void *data) {
  got_t *g = data;
  assert_false(g->in_call);
  g->calls++;
  g->err = err;
  g->n = (int)n;
  assert_true(n <= 64);
  for (size_t i = 0; i < n; i++)
    copy_managed(&g->rows[i], &rows[i]);
}

static void on_got_tombs(int err, const zm_tomb_row_t *rows, size_t n,
                         void *data) {
  got_t *g = data;
  assert_false(g->in_call);
  g->calls++;
  g->err = err;
  g->n = (int)n;
  assert_true(n <= 64);
  for (size_t i = 0; i < n; i++) {
    g->tombs[i] = rows[i];
    snprintf(g->tomb_ids[i], 64, "%s", rows[i].ziti_identity_id);
    g->tombs[i].ziti_identity_id = g->tomb_ids[i];
  }
}

static void on_got_pending(int err, const zm_pending_row_t *rows, size_t n,
                           void *data) {
  got_t *g = data;
  assert_false(g->in_call);
  g->calls++;
  g->err = err;
  g->n = (int)n;
  assert_true(n <= 64);
  for (size_t i = 0; i < n; i++)
    copy_pending(&g->rows[i], &rows[i]);
}

static void get_managed(zm_store_t *st, uv_loop_t *loop, const char *id,
                        got_t *g) {
  memset(g, 0, sizeof *g);
  g->in_call = 1;
  zm_store_get_managed(st, id, on_got_managed, g);
  g->in_call = 0;
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(g->calls, 1);
  assert_int_equal(g->err, 0);
}

static void claim_tombs(zm_store_t *st, uv_loop_t *loop, int64_t now,
                        int64_t until, size_t limit, got_t *g) {
  memset(g, 0, sizeof *g);
  g->in_call = 1;
  zm_store_claim_tombs(st, now, until, limit, on_got_tombs, g);
  g->in_call = 0;
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(g->calls, 1);
  assert_int_equal(g->err, 0);
}

static void claim_expired(zm_store_t *st, uv_loop_t *loop, int64_t cut,
                          int64_t now, int64_t until, size_t limit, got_t *g) {
  memset(g, 0, sizeof *g);
  g->in_call = 1;
  zm_store_claim_expired(st, cut, now, until, limit, on_got_tombs, g);
  g->in_call = 0;
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(g->calls, 1);
  assert_int_equal(g->err, 0);
}

static void claim_pending(zm_store_t *st, uv_loop_t *loop, int64_t now,
                          int64_t until, size_t limit, got_t *g) {
  memset(g, 0, sizeof *g);
  g->in_call = 1;
  zm_store_claim_pending(st, now, until, limit, on_got_pending, g);
  g->in_call = 0;
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(g->calls, 1);
  assert_int_equal(g->err, 0);
}

static const zm_tomb_row_t *find_tomb(const got_t *g, const char *id) {
  for (int i = 0; i < g->n; i++)
    if (strcmp(g->tombs[i].ziti_identity_id, id) == 0)
      return &g->tombs[i];
  return NULL;
}

#define T0 1700000000123LL /* 2023-11-14 22:13:20.123 UTC */
#define NEVER INT64_MAX

/* identity_id, workload_id, agent_id and environment_id are UUID columns on
 * PostgreSQL (the Go service's schema): test values are UUIDs, lower case
 * (how PostgreSQL spells them back). */
#define UUID(n) "00000000-0000-4000-8000-0000000000" #n

/* ==== time codec ========================================================== */

static void test_time_codec(void **state) {
  (void)state;
  char b[ZM__STORE_TIME_BUF];
  int64_t ms;
  assert_int_equal(zm__store_time_format(T0, b), 23);
  assert_string_equal(b, "2023-11-14 22:13:20.123");
  zm__store_time_format(0, b);
  assert_string_equal(b, "1970-01-01 00:00:00.000");
  zm__store_time_format(-1, b);
  assert_string_equal(b, "1969-12-31 23:59:59.999");
  zm__store_time_format(951782400000LL, b); /* leap day of a /400 year */
  assert_string_equal(b, "2000-02-29 00:00:00.000");
  zm__store_time_format(INT64_MAX, b);
  assert_string_equal(b, "9999-12-31 23:59:59.999");
  zm__store_time_format(INT64_MIN, b);
  assert_string_equal(b, "0000-01-01 00:00:00.000");
  /* Round trip over a spread of instants, both signs. */
  for (int64_t t = -5000000000000LL; t < 5000000000000LL; t += 7777777777LL) {
    zm__store_time_format(t, b);
    assert_int_equal(zm__store_time_parse(b, strlen(b), &ms), 0);
    assert_int_equal(ms, t);
  }
  static const struct {
    const char *s;
    int64_t ms;
  } ok[] = {
      {"2023-11-14 22:13:20.123", T0},
      {"2023-11-14T22:13:20.123Z", T0},
      {"2023-11-14 22:13:20.123+00:00", T0},
      {"2023-11-14 22:13:20.123456789", T0},
      {"2023-11-14T23:13:20.123+01:00", T0},
      {"2023-11-14 21:13:20.123-0100", T0},
      {"2023-11-14 22:13:20.1", T0 - 23},
      {"2023-11-14 22:13:20", T0 - 123},
      {"2023-11-14 22:13", T0 - 20123},
      {"2023-11-14", T0 - 80000123},
      {"2024-02-29 00:00:00Z", 1709164800000LL},
  };
  for (size_t i = 0; i < ZM_ARRAY_SIZE(ok); i++) {
    ms = -1;
    assert_int_equal(zm__store_time_parse(ok[i].s, strlen(ok[i].s), &ms), 0);
    assert_int_equal(ms, ok[i].ms);
  }
  static const char *const bad[] = {
      "",
      "2023",
      "2023-11-14 ",
      "2023-13-01",
      "2023-02-29",
      "2023-11-31",
      "2023-11-14 24:00:00",
      "2023-11-14 22:60",
      "2023-11-14 22:13:20.",
      "2023-11-14 22:13:20.1234567890",
      "2023-11-14 22:13:20Zx",
      "2023-11-14 22:13:20+2",
      "2023-11-14x22:13:20",
      "abcd-ef-gh",
      "2023-11-14 22:13:20 ",
      "2023-11-14 22:13:20+24:00",
      /* found by test/fuzz/fuzz_stime.c: "+HH:" without minutes */
      "2023-11-14 22:13:20+05:",
      "2000-12-31-23:",
  };
  for (size_t i = 0; i < ZM_ARRAY_SIZE(bad); i++)
    assert_int_equal(zm__store_time_parse(bad[i], strlen(bad[i]), &ms),
                     ZM_E_INVAL);
  /* Bounded by len, not by a NUL. */
  assert_int_equal(zm__store_time_parse("2023-11-14 22:13:20.123", 10, &ms), 0);
  assert_int_equal(ms, T0 - 80000123);
}

/* ==== open / migrate ====================================================== */

static void test_open_migrate_reopen(void **state) {
  (void)state;
  SQLITE_ONLY("test_open_migrate_reopen");
  const char *path = db_path("migrate");
  for (int round = 0; round < 3; round++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    zm_store_t *st = open_store(&loop, path, round % 2);
    close_all(st, &loop);
  }
  /* The store's first open turned SQLite's allocation statistics off (this
   * is the first test to use SQLite): nothing was counted. */
  sqlite3_int64 cur = -1, hi = -1;
  assert_int_equal(sqlite3_status64(SQLITE_STATUS_MEMORY_USED, &cur, &hi, 0),
                   SQLITE_OK);
  assert_true(cur == 0 && hi == 0);
  sqlite3 *db = peek_open(path);
  assert_int_equal(peek_int(db, "SELECT count(*) FROM schema_migrations", NULL),
                   5);
  assert_int_equal(
      peek_int(db, "SELECT sum(version) FROM schema_migrations", NULL), 15);
  assert_int_equal(
      peek_int(db,
               "SELECT count(*) FROM sqlite_master WHERE name IN"
               " ('managed_identities','service_identities',"
               "'pending_identities','service_identities_lease_expires_at_idx',"
               "'pending_identities_created_at_idx',"
               "'managed_identities_identity_id_idx',"
               "'pending_identities_agent_id_idx',"
               "'pending_identities_resolve_after_idx',"
               "'deleting_identities','deleting_identities_next_try_at_idx',"
               "'service_clock')",
               NULL),
      11);
  assert_int_equal(peek_int(db,
                            "SELECT count(*) FROM pragma_table_info("
                            "'managed_identities')",
                            NULL),
                   8);
  assert_int_equal(peek_int(db,
                            "SELECT count(*) FROM pragma_table_info("
                            "'pending_identities')",
                            NULL),
                   8);
  sqlite3_stmt *s;
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &s, NULL);
  assert_int_equal(sqlite3_step(s), SQLITE_ROW);
  assert_string_equal((const char *)sqlite3_column_text(s, 0), "wal");
  sqlite3_finalize(s);
  sqlite3_close(db);

  /* An unopenable path fails cleanly. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_config_t cfg = {.path = "/nonexistent-dir/x/y.db"};
  zm_store_t *st = (zm_store_t *)1;
  assert_int_equal(zm_store_open(&st, &loop, &cfg), ZM_E_STORE);
  assert_null(st);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* A database left by the previous version (schema v2, with rows) migrates
 * forward: the rows survive, the new columns and tables exist. */
static void test_migrate_from_v2(void **state) {
  (void)state;
  SQLITE_ONLY("test_migrate_from_v2");
  const char *path = db_path("v2");
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  peek_exec(db,
            "PRAGMA journal_mode=WAL;"
            "CREATE TABLE schema_migrations(version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMP NOT NULL);"
            "INSERT INTO schema_migrations VALUES"
            " (1, '2024-01-01 00:00:00.000'), (2, '2024-01-01 00:00:00.000');"
            "CREATE TABLE managed_identities(ziti_identity_id TEXT PRIMARY KEY,"
            " identity_id TEXT NOT NULL, identity_type SMALLINT NOT NULL,"
            " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE service_identities(ziti_identity_id TEXT PRIMARY KEY,"
            " service_type SMALLINT NOT NULL,"
            " lease_expires_at TIMESTAMP NOT NULL,"
            " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
            "CREATE INDEX service_identities_lease_expires_at_idx"
            " ON service_identities(lease_expires_at, ziti_identity_id);"
            "CREATE TABLE pending_identities(name TEXT PRIMARY KEY,"
            " kind SMALLINT NOT NULL, type SMALLINT NOT NULL,"
            " ziti_identity_id TEXT, created_at TIMESTAMP NOT NULL)"
            " WITHOUT ROWID;"
            "CREATE INDEX pending_identities_created_at_idx"
            " ON pending_identities(created_at);"
            "INSERT INTO managed_identities VALUES"
            " ('m1', 'iid-1', 2, '2023-11-14 22:13:20.123');"
            "INSERT INTO service_identities VALUES"
            " ('s1', 3, '2023-11-14 22:13:21.123', '2023-11-14 22:13:20.123');"
            "INSERT INTO pending_identities VALUES"
            " ('p1', 1, 3, NULL, '2023-11-14 22:13:20.123'),"
            " ('p2', 2, 1, 'zid-p2', '2023-11-14T22:13:20Z');");
  sqlite3_close(db);

  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.nm, 1);
  assert_string_equal(l.m[0].identity_id, "iid-1");
  assert_int_equal(l.m[0].type, 2);
  assert_int_equal(l.m[0].created, T0);
  assert_string_equal(l.m[0].svc, "(null)");
  assert_string_equal(l.m[0].agent, "(null)");
  assert_int_equal(l.ns, 1);
  assert_int_equal(l.s[0].lease, T0 + 1000);
  assert_int_equal(l.np, 2);
  const row_t *p1 = find(l.p, l.np, "p1"), *p2 = find(l.p, l.np, "p2");
  assert_int_equal(p1->created, T0);
  assert_int_equal(p1->resolve_after, T0 + 600000); /* created + 10 min */
  assert_string_equal(p1->agent, "(null)");
  assert_int_equal(p2->resolve_after, T0 - 123 + 600000);
  assert_string_equal(p2->identity_id, "zid-p2");
  /* Old pending rows are unclaimed: claimable once resolvable. */
  got_t g;
  claim_pending(st, &loop, T0 + 599900, T0 + 700000, 10, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.rows[0].zid, "p2");
  /* The new ops work on the migrated file. */
  zm_store_op_t ops[] = {
      (zm_store_op_t){
          .kind = ZM_STORE_PUT_MANAGED,
          .managed = {"m2", "iid-2", 1, T0, "svc", "wl", "ag", "env"}},
      retire_service("s1", NEVER, T0, T0 + 1, T0),
  };
  assert_int_equal(run1(st, &loop, ops, 2), 0);
  zm_store_op_t beat_unit[] = {tomb_op("orph", ZM_TOMB_ORPHAN, 0, T0, 0, T0)};
  assert_int_equal(run1(st, &loop, beat_unit, 1), 0);
  close_all(st, &loop);

  db = peek_open(path);
  assert_int_equal(
      peek_int(db, "SELECT max(version) FROM schema_migrations", NULL), 5);
  assert_int_equal(
      peek_int(db, "SELECT count(*) FROM deleting_identities", NULL), 2);
  assert_int_equal(peek_int(db,
                            "SELECT count(*) FROM managed_identities WHERE"
                            " environment_id='env'",
                            NULL),
                   1);
  sqlite3_close(db);
  /* Reopening applies nothing twice. */
  uv_loop_init(&loop);
  st = open_store(&loop, path, 0);
  close_all(st, &loop);
}

/* ==== every op kind ======================================================= */

static void test_ops(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "ops", 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);

  zm_store_op_t u0[] = {
      put_managed("m1", UUID(01), 1, T0),
      (zm_store_op_t){.kind = ZM_STORE_PUT_MANAGED,
                      .managed = {"m2", UUID(02), 2, T0 + 1, "svc-2", UUID(22),
                                  UUID(23), UUID(24)}}};
  zm_store_op_t u1[] = {put_service("s1", 3, T0 + 1000, T0),
                        put_service("s2", 4, T0 + 2000, T0)};
  zm_store_op_t u2[] = {put_pending("svc-a", ZM_PENDING_SERVICE, 3, NULL, T0)};
  submit(st, &o, 0, u0, 2);
  submit(st, &o, 1, u1, 2);
  submit(st, &o, 2, u2, 1);
  assert_int_equal(o.n, 0); /* nothing completes before the loop runs */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(o.tags[i], i);
    assert_int_equal(o.errs[i], 0);
  }

  /* One group: failing units roll back alone; the others commit. */
  o.n = 0;
  zm_store_op_t ext_ok[] = {op_id(ZM_STORE_EXTEND_LEASE, "s1", T0 + 5000)};
  zm_store_op_t ext_missing[] = {put_managed("m3", UUID(03), 1, T0),
                                 op_id(ZM_STORE_EXTEND_LEASE, "nope", T0)};
  zm_store_op_t dup[] = {put_managed("m4", UUID(04), 1, T0),
                         put_pending("svc-a", ZM_PENDING_AGENT, 1, NULL, T0)};
  zm_store_op_t setid[] = {
      op_name(ZM_STORE_SET_PENDING_ID, "svc-a", "zid-of-a")};
  zm_store_op_t setid_missing[] = {
      op_name(ZM_STORE_SET_PENDING_ID, "svc-zz", "x")};
  zm_store_op_t null_col[] = {put_managed("m5", NULL, 1, T0)};
  zm_store_op_t after[] = {put_managed("m6", UUID(06), 2, T0)};
  /* never lowers a lease (but the row exists: ok) */
  zm_store_op_t ext_lower[] = {op_id(ZM_STORE_EXTEND_LEASE, "s2", T0)};
  submit(st, &o, 0, ext_ok, 1);
  submit(st, &o, 1, ext_missing, 2);
  submit(st, &o, 2, dup, 2);
  submit(st, &o, 3, setid, 1);
  submit(st, &o, 4, setid_missing, 1);
  submit(st, &o, 5, null_col, 1);
  submit(st, &o, 6, after, 1);
  submit(st, &o, 7, ext_lower, 1);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.queued, 8);
  uv_run(&loop, UV_RUN_DEFAULT);
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.queued, 0);
  assert_int_equal(stats.failed_groups, 0);
  assert_int_equal(stats.reconnects, 0);
  assert_int_equal(o.n, 8);
  int want[] = {
      0, ZM_E_NOT_FOUND, ZM_E_EXISTS, 0, ZM_E_NOT_FOUND, ZM_E_INVAL, 0, 0};
  for (int i = 0; i < 8; i++) {
    assert_int_equal(o.tags[i], i);
    assert_int_equal(o.errs[i], want[i]);
  }
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.nm, 3); /* m1 m2 m6; m3/m4 rolled back with their unit */
  assert_non_null(find(l.m, l.nm, "m6"));
  assert_null(find(l.m, l.nm, "m3"));
  assert_null(find(l.m, l.nm, "m4"));
  assert_null(find(l.m, l.nm, "m5"));
  const row_t *m2 = find(l.m, l.nm, "m2");
  assert_string_equal(m2->svc, "svc-2");
  assert_string_equal(m2->workload, UUID(22));
  assert_string_equal(m2->agent, UUID(23));
  assert_string_equal(m2->env, UUID(24));
  assert_string_equal(find(l.m, l.nm, "m1")->env, "(null)");
  assert_int_equal(find(l.s, l.ns, "s1")->lease, T0 + 5000);
  assert_int_equal(find(l.s, l.ns, "s2")->lease, T0 + 2000); /* not lowered */
  assert_int_equal(l.np, 1);
  assert_int_equal(l.p[0].kind, ZM_PENDING_SERVICE); /* not the duplicate's */
  assert_true(l.p[0].has_zid);
  assert_string_equal(l.p[0].identity_id, "zid-of-a");
  assert_int_equal(l.p[0].resolve_after, T0 + 600000);

  /* get_managed: the row, or nothing. */
  got_t g;
  get_managed(st, &loop, "m2", &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.rows[0].zid, "m2");
  assert_string_equal(g.rows[0].identity_id, UUID(02));
  assert_int_equal(g.rows[0].type, 2);
  assert_int_equal(g.rows[0].created, T0 + 1);
  assert_string_equal(g.rows[0].agent, UUID(23));
  assert_string_equal(g.rows[0].env, UUID(24));
  get_managed(st, &loop, "m1", &g);
  assert_string_equal(g.rows[0].svc, "(null)");
  get_managed(st, &loop, "nope", &g);
  assert_int_equal(g.n, 0);

  /* Pending deletes: present and absent (= ok); an empty unit commits. */
  o.n = 0;
  zm_store_op_t d2[] = {op_name(ZM_STORE_DEL_PENDING, "svc-a", NULL),
                        op_name(ZM_STORE_DEL_PENDING, "never", NULL)};
  submit(st, &o, 0, d2, 2);
  submit(st, &o, 1, NULL, 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 2);
  assert_int_equal(o.errs[0], 0);
  assert_int_equal(o.errs[1], 0);
  load_all(st, &l);
  assert_int_equal(l.np, 0);
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.units, 3 + 8 + 2);
  close_all(st, &loop);
}

/* A second pending row for the same agent is refused; other agents and
 * service rows (no agent) are not affected; once deleted, the agent may
 * have a pending row again. */
/* Group commits are spaced: a unit that comes while a commit started less
 * than commit_spacing_ms ago waits, and shares the next commit with what came
 * meanwhile; an idle store commits at once. (A spacing of 300 ms, so that the
 * steps below fit in it on a slow machine.) */
static void test_commit_spacing(void **state) {
  (void)state;
  SQLITE_ONLY("test_commit_spacing");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_config_t cfg = {.path = db_path("spacing"),
                           .commit_spacing_ms = 300};
  zm_store_t *st = NULL;
  assert_int_equal(zm_store_open(&st, &loop, &cfg), 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  zm_store_op_t a[] = {put_managed("m1", UUID(01), 1, T0)};
  zm_store_op_t b[] = {put_managed("m2", UUID(02), 1, T0)};
  zm_store_op_t c[] = {put_managed("m3", UUID(03), 1, T0)};
  zm_store_stats_t s0, s1, s2;

  submit(st, &o, 0, a, 1);
  uv_run(&loop, UV_RUN_NOWAIT); /* idle: a goes in this turn */
  zm_store_get_stats(st, &s0);
  assert_int_equal(s0.queued, 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 1);
  zm_store_get_stats(st, &s0);

  submit(st, &o, 1, b, 1);
  uv_run(&loop, UV_RUN_NOWAIT); /* a's commit started < 300 ms ago: b waits */
  zm_store_get_stats(st, &s1);
  assert_int_equal(o.n, 1);
  assert_int_equal(s1.queued, 1);
  submit(st, &o, 2, c, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(o.tags[i], i);
    assert_int_equal(o.errs[i], 0);
  }
  zm_store_get_stats(st, &s2);
  assert_int_equal(s2.groups - s0.groups, 1); /* b and c: one commit */
  assert_int_equal(s2.units - s0.units, 2);
  close_all(st, &loop);
  sqlite3 *db = peek_open(db_path("spacing"));
  assert_int_equal(
      peek_int(db, "SELECT count(*) FROM managed_identities", NULL), 3);
  sqlite3_close(db);
}

static void test_pending_agent_unique(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "agent", 0);
  zm_store_op_t a1 = put_pending("a-1", ZM_PENDING_AGENT, 1, NULL, T0);
  a1.pending.agent_id = "agent-x";
  assert_int_equal(run1(st, &loop, &a1, 1), 0);
  zm_store_op_t a2 = put_pending("a-2", ZM_PENDING_AGENT, 1, NULL, T0);
  a2.pending.agent_id = "agent-x";
  zm_store_op_t unit[] = {put_managed("m", UUID(01), 1, T0), a2};
  assert_int_equal(run1(st, &loop, unit, 2), ZM_E_EXISTS);
  zm_store_op_t a3 = put_pending("a-3", ZM_PENDING_AGENT, 1, NULL, T0);
  a3.pending.agent_id = "agent-y";
  zm_store_op_t s1 = put_pending("s-1", ZM_PENDING_SERVICE, 3, NULL, T0);
  zm_store_op_t s2 = put_pending("s-2", ZM_PENDING_SERVICE, 3, NULL, T0);
  zm_store_op_t more[] = {a3, s1, s2};
  assert_int_equal(run1(st, &loop, more, 3), 0);
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.nm, 0); /* rolled back with the refused unit */
  assert_int_equal(l.np, 4);
  assert_string_equal(find(l.p, l.np, "a-1")->agent, "agent-x");
  assert_null(find(l.p, l.np, "a-2"));
  assert_string_equal(find(l.p, l.np, "s-1")->agent, "(null)");
  zm_store_op_t del = op_name(ZM_STORE_DEL_PENDING, "a-1", NULL);
  zm_store_op_t again[] = {del, a2};
  assert_int_equal(run1(st, &loop, again, 2), 0);
  load_all(st, &l);
  assert_string_equal(find(l.p, l.np, "a-2")->agent, "agent-x");
  /* TAKE_PENDING: a commit whose pending row is gone (recovery resolved the
   * creation) must not record anything */
  zm_store_op_t take_gone[] = {put_service("late", 1, T0 + 1000, T0),
                               op_name(ZM_STORE_TAKE_PENDING, "nope", NULL)};
  assert_int_equal(run1(st, &loop, take_gone, 2), ZM_E_NOT_FOUND);
  zm_store_op_t take[] = {put_service("ok", 1, T0 + 1000, T0),
                          op_name(ZM_STORE_TAKE_PENDING, "s-1", NULL)};
  assert_int_equal(run1(st, &loop, take, 2), 0);
  load_all(st, &l);
  assert_int_equal(l.ns, 1); /* "ok" only */
  assert_null(find(l.p, l.np, "s-1"));
  close_all(st, &loop);
}

/* ==== LIVE -> DELETING ==================================================== */

static void test_retire(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "retire", 0);
  /* m1 and s2 also have a stale tombstone: due, unclaimed, attempted. A
   * retirement replaces it, so the retirer holds the claim it asked for. */
  zm_store_op_t seed[] = {
      put_managed("m1", UUID(01), 2, T0),
      put_service("s1", 3, T0 + 5000, T0),
      put_service("s2", 4, T0 + 1000, T0),
      put_service("s3", 5, NEVER, T0),
      tomb_op("m1", ZM_TOMB_ORPHAN, 0, T0 - 100, 0, T0 - 200),
      tomb_op("s2", ZM_TOMB_ORPHAN, 0, T0 - 100, 0, T0 - 200)};
  seed[4].tomb.attempts = seed[5].tomb.attempts = 3;
  assert_int_equal(run1(st, &loop, seed, ZM_ARRAY_SIZE(seed)), 0);

  /* RETIRE_MANAGED: mapping gone, tombstone claimed until .ms. */
  zm_store_op_t rm = {.kind = ZM_STORE_RETIRE_MANAGED,
                      .id = "m1",
                      .ms = T0 + 30000,
                      .tomb = {.kind = ZM_TOMB_MANAGED,
                               .next_try_ms = T0 + 10,
                               .created_at_ms = T0 + 5}};
  assert_int_equal(run1(st, &loop, &rm, 1), 0);
  got_t g;
  get_managed(st, &loop, "m1", &g);
  assert_int_equal(g.n, 0);
  /* A missing mapping: NOT_FOUND, and the rest of the unit rolled back. */
  zm_store_op_t rm2[] = {put_managed("m9", UUID(09), 1, T0), rm};
  assert_int_equal(run1(st, &loop, rm2, 2), ZM_E_NOT_FOUND);
  get_managed(st, &loop, "m9", &g);
  assert_int_equal(g.n, 0);

  /* RETIRE_SERVICE guard: the lease is later than the guard -> NOT_FOUND,
   * and the row stays. */
  zm_store_op_t rs = retire_service("s1", T0 + 4999, T0 + 20, T0 + 30000, T0);
  assert_int_equal(run1(st, &loop, &rs, 1), ZM_E_NOT_FOUND);
  rs = retire_service("s2", T0 + 1000, T0 + 20, T0 + 30000, T0 + 7);
  assert_int_equal(run1(st, &loop, &rs, 1), 0);
  rs = retire_service("s3", NEVER, T0 + 20, T0 + 30000, T0 + 7);
  assert_int_equal(run1(st, &loop, &rs, 1), 0);
  rs = retire_service("nope", NEVER, T0, T0, T0);
  assert_int_equal(run1(st, &loop, &rs, 1), ZM_E_NOT_FOUND);
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.ns, 1);
  assert_string_equal(l.s[0].zid, "s1");
  assert_int_equal(l.s[0].lease, T0 + 5000);

  /* The tombstones are claimed by the retirer until T0 + 30000. */
  claim_tombs(st, &loop, T0 + 29999, T0 + 60000, 10, &g);
  assert_int_equal(g.n, 0);
  claim_tombs(st, &loop, T0 + 30000, T0 + 60000, 10, &g);
  assert_int_equal(g.n, 3);
  /* next_try order: m1 (T0 + 10), then s2 and s3 (T0 + 20: store.h orders
   * by next_try only, so either way round) */
  assert_string_equal(g.tombs[0].ziti_identity_id, "m1");
  assert_int_equal(g.tombs[0].kind, ZM_TOMB_MANAGED);
  assert_int_equal(g.tombs[0].type, 2); /* the mapping's identity_type */
  assert_int_equal(g.tombs[0].attempts, 0);
  assert_int_equal(g.tombs[0].next_try_ms, T0 + 10);
  assert_int_equal(g.tombs[0].created_at_ms, T0 + 5);
  const zm_tomb_row_t *s2 = find_tomb(&g, "s2"), *s3 = find_tomb(&g, "s3");
  assert_non_null(s2);
  assert_non_null(s3);
  assert_int_equal(s2->kind, ZM_TOMB_SERVICE);
  assert_int_equal(s2->type, 4); /* the service_type */
  assert_int_equal(s2->attempts, 0);
  assert_int_equal(s2->next_try_ms, T0 + 20);
  assert_int_equal(s2->created_at_ms, T0 + 7);
  assert_int_equal(s3->kind, ZM_TOMB_SERVICE);
  assert_int_equal(s3->type, 5);
  close_all(st, &loop);
}

/* ==== FLUSH_LEASES ======================================================== */

static int flush_checked;

static void on_flush_row(const zm_service_row_t *r, void *data) {
  (void)data;
  int k = atoi(r->ziti_identity_id + 2);
  int64_t want = k % 2 == 0 ? T0 + 5000 + k : k == 1 ? T0 + 2000 : T0 + 1000;
  assert_int_equal(r->lease_expires_ms, want);
  flush_checked++;
}

static void test_flush_leases(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "flush", 0);
  enum { N = 2000 };
  static zm_store_op_t seed[N];
  static char idbuf[N + 10][16];
  for (int i = 0; i < N; i++) {
    snprintf(idbuf[i], 16, "f-%05d", i);
    seed[i] = put_service(idbuf[i], 1, T0 + 1000, T0);
  }
  assert_int_equal(run1(st, &loop, seed, N), 0);
  /* Even ids raised, odd ids "lowered" (kept), plus ids that do not exist;
   * the arrays are heap copies freed before the loop runs. */
  size_t n = N + 10;
  char **ids = calloc(n, sizeof *ids);
  int64_t *mss = calloc(n, sizeof *mss);
  for (size_t i = 0; i < n; i++) {
    char tmp[16];
    if (i < N)
      snprintf(tmp, sizeof tmp, "f-%05zu", i);
    else
      snprintf(tmp, sizeof tmp, "gone-%zu", i);
    ids[i] = strdup(tmp);
    mss[i] = i % 2 == 0 ? T0 + 5000 + (int64_t)i : T0;
  }
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  zm_store_op_t fl = {.kind = ZM_STORE_FLUSH_LEASES,
                      .ids = (const char *const *)ids,
                      .mss = mss,
                      .n = n};
  zm_store_op_t ext = op_id(ZM_STORE_EXTEND_LEASE, "f-00001", T0 + 2000);
  submit(st, &o, 0, &fl, 1);
  zm_store_op_t both[] = {fl, ext}; /* in a multi-op unit too */
  submit(st, &o, 1, both, 2);
  for (size_t i = 0; i < n; i++) {
    memset(ids[i], 'X', strlen(ids[i]));
    free(ids[i]);
  }
  free(ids);
  free(mss);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 2);
  assert_int_equal(o.errs[0], 0);
  assert_int_equal(o.errs[1], 0);
  /* Raised where higher, never lowered, missing ids skipped. */
  flush_checked = 0;
  assert_int_equal(zm_store_load(st, NULL, on_flush_row, NULL, NULL), 0);
  assert_int_equal(flush_checked, N);
  close_all(st, &loop);
}

/* ==== tombstones ========================================================== */

static void test_tombs(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "tombs", 0);
  /* t1 due at T0, unclaimed (claim 0); t2 due later; t3 claimed by someone
   * until T0 + 100; an existing tombstone is left as it is. */
  zm_store_op_t seed[] = {
      tomb_op("t1", ZM_TOMB_ORPHAN, 0, T0, 0, T0 - 5),
      tomb_op("t2", ZM_TOMB_SERVICE, 3, T0 + 50, 0, T0 - 4),
      tomb_op("t3", ZM_TOMB_MANAGED, 1, T0 - 10, T0 + 100, T0 - 3),
  };
  assert_int_equal(run1(st, &loop, seed, 3), 0);
  zm_store_op_t dup = tomb_op("t1", ZM_TOMB_SERVICE, 9, T0 + 999, NEVER, T0);
  assert_int_equal(run1(st, &loop, &dup, 1), 0);
  got_t g;
  claim_tombs(st, &loop, T0, T0 + 1000, 10, &g);
  assert_int_equal(g.n, 1); /* t2 not due, t3 claimed */
  assert_string_equal(g.tombs[0].ziti_identity_id, "t1");
  assert_int_equal(g.tombs[0].kind, ZM_TOMB_ORPHAN); /* not the duplicate's */
  assert_int_equal(g.tombs[0].type, 0);
  assert_int_equal(g.tombs[0].next_try_ms, T0);
  assert_int_equal(g.tombs[0].created_at_ms, T0 - 5);
  /* Claimed now: not returned again until claimed_until passes. */
  claim_tombs(st, &loop, T0 + 60, T0 + 1000, 10, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.tombs[0].ziti_identity_id, "t2");
  claim_tombs(st, &loop, T0 + 999, T0 + 1000, 10, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.tombs[0].ziti_identity_id, "t3"); /* since T0 + 100 */
  claim_tombs(st, &loop, T0 + 1000, T0 + 2000, 2, &g);
  assert_int_equal(g.n, 2); /* the limit; next_try order: t3, t1 */
  assert_string_equal(g.tombs[0].ziti_identity_id, "t3");
  assert_string_equal(g.tombs[1].ziti_identity_id, "t1");
  /* DEFER: attempts + 1, next try moved, claim released at once. */
  zm_store_op_t defer[] = {op_id(ZM_STORE_DEFER_TOMB, "t1", T0 + 1500),
                           op_id(ZM_STORE_DEFER_TOMB, "never", T0)};
  assert_int_equal(run1(st, &loop, defer, 2), 0);
  claim_tombs(st, &loop, T0 + 1499, T0 + 5000, 10, &g);
  assert_int_equal(g.n, 1); /* t1 not due yet, t3 claimed; t2's has passed */
  assert_string_equal(g.tombs[0].ziti_identity_id, "t2");
  claim_tombs(st, &loop, T0 + 1500, T0 + 5000, 10, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.tombs[0].ziti_identity_id, "t1");
  assert_int_equal(g.tombs[0].attempts, 1);
  assert_int_equal(g.tombs[0].next_try_ms, T0 + 1500);
  /* DEL: gone; absent = ok. */
  zm_store_op_t del[] = {op_id(ZM_STORE_DEL_TOMB, "t1", 0),
                         op_id(ZM_STORE_DEL_TOMB, "t2", 0),
                         op_id(ZM_STORE_DEL_TOMB, "never", 0)};
  assert_int_equal(run1(st, &loop, del, 3), 0);
  claim_tombs(st, &loop, NEVER - 1, NEVER, 10, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.tombs[0].ziti_identity_id, "t3");
  /* limit 0: nothing. */
  claim_tombs(st, &loop, NEVER - 1, NEVER, 0, &g);
  assert_int_equal(g.n, 0);
  close_all(st, &loop);
}

/* ==== claims ============================================================== */

static sqlite3 *durable_peek;
static long long durable_seen = -1;

static void on_claim_durable(int err, const zm_tomb_row_t *rows, size_t n,
                             void *data) {
  got_t *g = data;
  on_got_tombs(err, rows, n, data);
  (void)g;
  if (durable_peek != NULL) /* another connection already sees them */
    durable_seen = peek_int(durable_peek,
                            "SELECT count(*) FROM deleting_identities", NULL);
}

static void test_claim_expired(void **state) {
  (void)state;
  const char *path = db_path("claimexp");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "claimexp", 0);
  static const struct {
    const char *id;
    int64_t lease;
  } rows[] = {
      {"e", T0 + 10}, {"a", T0 + 30}, {"c", T0 + 10}, {"b", T0 + 20},
      {"d", T0 + 10}, {"f", T0 + 40}, {"g", T0 - 5},  {"h", T0 + 41},
  };
  zm_store_op_t ops[ZM_ARRAY_SIZE(rows) + 1];
  for (size_t i = 0; i < ZM_ARRAY_SIZE(rows); i++)
    ops[i] = put_service(rows[i].id, (int)i + 1, rows[i].lease, T0);
  /* "b" also has a stale tombstone (due, unclaimed, attempted): collecting
   * "b" replaces it, returned and claimed like the others. */
  ops[ZM_ARRAY_SIZE(rows)] =
      tomb_op("b", ZM_TOMB_ORPHAN, 0, T0 - 100, 0, T0 - 200);
  ops[ZM_ARRAY_SIZE(rows)].tomb.attempts = 3;
  assert_int_equal(run1(st, &loop, ops, ZM_ARRAY_SIZE(ops)), 0);
  /* Oldest lease first, h (lease > cut) excluded; the limit bounds each
   * claim. Ties (c, d, e) may come in any order: store.h orders by lease
   * only. */
  const int64_t now = T0 + 100, until = T0 + 60000;
  got_t g;
  int total = 0, b_seen = 0;
  int64_t last_lease = INT64_MIN;
  char seen[ZM_ARRAY_SIZE(rows)] = {0};
  if (pg_url == NULL)
    durable_peek = peek_open(path);
  for (int round = 0; round < 4; round++) {
    memset(&g, 0, sizeof g);
    g.in_call = 1;
    zm_store_claim_expired(st, T0 + 40, now, until, 2, on_claim_durable, &g);
    g.in_call = 0;
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.err, 0);
    assert_true(g.n <= 2);
    assert_true(round == 3 || g.n == 2); /* 7 rows: 2 + 2 + 2 + 1 */
    for (int i = 0; i < g.n; i++) {
      size_t k = 0;
      while (k < ZM_ARRAY_SIZE(rows) &&
             strcmp(rows[k].id, g.tombs[i].ziti_identity_id) != 0)
        k++;
      assert_true(k < ZM_ARRAY_SIZE(rows));
      assert_false(seen[k]); /* each claimed once */
      seen[k] = 1;
      assert_true(rows[k].lease <= T0 + 40);
      assert_true(rows[k].lease >= last_lease); /* oldest first */
      last_lease = rows[k].lease;
      b_seen |= strcmp(rows[k].id, "b") == 0;
      assert_int_equal(g.tombs[i].kind, ZM_TOMB_SERVICE);
      assert_int_equal(g.tombs[i].type, (int)k + 1);
      assert_int_equal(g.tombs[i].attempts, 0);
      assert_int_equal(g.tombs[i].next_try_ms, now);
      assert_int_equal(g.tombs[i].created_at_ms, now);
      total++;
    }
    if (durable_peek != NULL) /* + b's stale tombstone until it is replaced */
      assert_int_equal(durable_seen, total + !b_seen);
  }
  if (durable_peek != NULL)
    sqlite3_close(durable_peek);
  durable_peek = NULL;
  assert_int_equal(total, 7);
  /* types: the service_type of each row ("g" was put 7th) */
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.ns, 1);
  assert_string_equal(l.s[0].zid, "h");
  /* The tombstones are claimed until `until`. */
  claim_tombs(st, &loop, until - 1, until + 1, 100, &g);
  assert_int_equal(g.n, 0);
  claim_tombs(st, &loop, until, until + 1, 100, &g);
  assert_int_equal(g.n, 7);
  assert_int_equal(find_tomb(&g, "g")->type, 7);
  assert_int_equal(find_tomb(&g, "a")->type, 2);
  assert_int_equal(find_tomb(&g, "b")->type, 4);
  assert_int_equal(find_tomb(&g, "b")->attempts, 0);
  /* Nothing left at the cut. */
  claim_expired(st, &loop, T0 + 40, now, until, 100, &g);
  assert_int_equal(g.n, 0);
  close_all(st, &loop);
}

static void test_claim_pending(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "claimpend", 0);
  const char *names[] = {"p3", "p0", "p4", "p1", "p2"};
  int64_t ages[] = {3000, 0, 4000, 1000, 2000};
  zm_store_op_t ops[5];
  for (int i = 0; i < 5; i++) {
    ops[i] = put_pending(names[i], ZM_PENDING_AGENT, 2, NULL, T0 + ages[i]);
    ops[i].pending.resolve_after_ms = T0 + 10000 + ages[i];
    ops[i].pending.agent_id = names[i]; /* one agent each */
  }
  assert_int_equal(run1(st, &loop, ops, 5), 0);
  got_t g;
  claim_pending(st, &loop, T0 + 9999, T0 + 50000, 100, &g);
  assert_int_equal(g.n, 0); /* none resolvable yet */
  claim_pending(st, &loop, T0 + 12000, T0 + 50000, 100, &g);
  assert_int_equal(g.n, 3); /* oldest first */
  assert_string_equal(g.rows[0].zid, "p0");
  assert_string_equal(g.rows[1].zid, "p1");
  assert_string_equal(g.rows[2].zid, "p2");
  assert_int_equal(g.rows[2].created, T0 + 2000);
  assert_int_equal(g.rows[2].resolve_after, T0 + 12000);
  assert_string_equal(g.rows[2].agent, "p2");
  assert_int_equal(g.rows[0].kind, ZM_PENDING_AGENT);
  assert_int_equal(g.rows[0].type, 2);
  assert_false(g.rows[0].has_zid);
  /* Claimed rows are not returned again until claimed_until passes. */
  claim_pending(st, &loop, T0 + 20000, T0 + 50000, 1, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.rows[0].zid, "p3");
  claim_pending(st, &loop, T0 + 49999, T0 + 90000, 100, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.rows[0].zid, "p4");
  claim_pending(st, &loop, T0 + 50000, T0 + 90000, 100, &g);
  assert_int_equal(g.n, 4); /* every claim but p4's has passed */
  assert_string_equal(g.rows[3].zid, "p3");
  close_all(st, &loop);
}

/* ==== the service clock =================================================== */

typedef struct {
  int calls, err;
  int64_t now, resumed;
} beat_t;

static void on_beat(int err, int64_t now_ms, int64_t resumed_ms, void *data) {
  beat_t *b = data;
  b->calls++;
  b->err = err;
  b->now = now_ms;
  b->resumed = resumed_ms;
}

static void beat(zm_store_t *st, uv_loop_t *loop, int64_t now, int64_t gap,
                 beat_t *b) {
  memset(b, 0, sizeof *b);
  zm_store_heartbeat(st, now, gap, on_beat, b);
  assert_int_equal(b->calls, 0); /* never inside the call */
  uv_run(loop, UV_RUN_DEFAULT);
  assert_int_equal(b->calls, 1);
  assert_int_equal(b->err, 0);
}

static void test_heartbeat(void **state) {
  (void)state;
  if (pg_url != NULL) {
    /* The store clock is the database's: the local times below mean
     * nothing there. */
    print_message("skipped with ZM_TEST_DATABASE_URL (SQLite clock): "
                  "test_heartbeat\n");
    skip();
  }
  const char *path = db_path("beat");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "beat", 0);
  beat_t b;
  beat(st, &loop, T0, 5000, &b); /* first ever: resumed now */
  assert_int_equal(b.now, T0);
  assert_int_equal(b.resumed, T0);
  beat(st, &loop, T0 + 1000, 5000, &b); /* within the gap: kept */
  assert_int_equal(b.now, T0 + 1000);
  assert_int_equal(b.resumed, T0);
  beat(st, &loop, T0 + 6000, 5000, &b); /* exactly the gap: kept */
  assert_int_equal(b.resumed, T0);
  beat(st, &loop, T0 + 11001, 5000, &b); /* a gap > 5000: an outage */
  assert_int_equal(b.resumed, T0 + 11001);
  beat(st, &loop, T0 + 12000, 5000, &b);
  assert_int_equal(b.resumed, T0 + 11001);
  /* A clock stepped back within the gap: last_beat does not move back, no
   * outage. */
  beat(st, &loop, T0 + 9000, 5000, &b);
  assert_int_equal(b.now, T0 + 9000);
  assert_int_equal(b.resumed, T0 + 11001);
  /* Stepped back by more than the gap: an outage (else a last_beat left in
   * the future would hide every real outage until the clock caught up). */
  beat(st, &loop, T0 + 1000, 5000, &b);
  assert_int_equal(b.resumed, T0 + 1000);
  beat(st, &loop, T0 + 2000, 5000, &b);
  assert_int_equal(b.resumed, T0 + 1000);
  beat(st, &loop, T0 + 12000, 5000, &b); /* and a silence after it */
  assert_int_equal(b.resumed, T0 + 12000);
  close_all(st, &loop);

  /* Durable, and across restarts: a restart within the gap is no outage. */
  uv_loop_init(&loop);
  st = open_store(&loop, path, 0);
  beat(st, &loop, T0 + 16000, 5000, &b);
  assert_int_equal(b.resumed, T0 + 12000);
  close_all(st, &loop);
  sqlite3 *db = peek_open(path);
  assert_int_equal(peek_int(db, "SELECT count(*) FROM service_clock", NULL), 1);
  sqlite3_close(db);
}

/* ==== changes ============================================================= */

typedef struct {
  int calls, err;
  size_t n;
} changes_t;

static void on_changes(int err, const int64_t *seqs, const char *const *ids,
                       size_t n, void *data) {
  (void)seqs;
  (void)ids;
  changes_t *c = data;
  c->calls++;
  c->err = err;
  c->n = n;
}

static void test_changes(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "changes", 0);
  zm_store_op_t ops[] = {put_managed("c1", UUID(01), 1, T0)};
  assert_int_equal(run1(st, &loop, ops, 1), 0);
  zm_store_op_t rm = {.kind = ZM_STORE_RETIRE_MANAGED, .id = "c1", .ms = T0};
  assert_int_equal(run1(st, &loop, &rm, 1), 0);
  changes_t c = {0};
  zm_store_changes(st, 0, 0, 100, on_changes, &c);
  assert_int_equal(c.calls, 0); /* through the queue, never inside */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(c.calls, 1);
  assert_int_equal(c.err, 0);
  if (pg_url == NULL)
    assert_int_equal(c.n, 0); /* not shared: nothing to report */
  else
    assert_true(c.n >= 1);
  close_all(st, &loop);
}

/* ==== reads =============================================================== */

typedef struct {
  zm_store_t *st;
  int type;
  size_t limit;
  char after[64];
  int pages, total, last_page;
  char seen[64][16];
  int err;
} lm_t;

/* The identity_id test_list_managed gives "m-KK": a UUID ending in KK. */
static void lm_iid(char *buf, size_t n, const char *id) {
  snprintf(buf, n, "00000000-0000-4000-8000-0000000000%s", id + 2);
}

static void on_lm_page(int err, const zm_managed_row_t *rows, size_t n,
                       void *data) {
  lm_t *p = data;
  p->err |= err;
  p->pages++;
  for (size_t i = 0; i < n; i++) {
    assert_true(p->total < 64);
    if (p->type)
      assert_int_equal(rows[i].identity_type, p->type);
    assert_true(strcmp(rows[i].ziti_identity_id, p->after) > 0);
    snprintf(p->seen[p->total++], 16, "%s", rows[i].ziti_identity_id);
    snprintf(p->after, sizeof p->after, "%s", rows[i].ziti_identity_id);
    char want[48];
    lm_iid(want, sizeof want, rows[i].ziti_identity_id);
    assert_string_equal(rows[i].identity_id, want);
    assert_int_equal(rows[i].created_at_ms, T0);
    assert_string_equal(rows[i].workload_id, UUID(99));
    assert_null(rows[i].agent_id);
  }
  assert_true(n <= p->limit);
  if (n == p->limit) /* keyset: the next page starts after the last id */
    zm_store_list_managed(p->st, p->type, p->after, p->limit, on_lm_page, p);
  else
    p->last_page = (int)n;
}

static void test_list_managed(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "lm", 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  /* Inserted out of order; types 1,2 alternate. */
  for (int i = 0; i < 25; i++) {
    char id[16], iid[48];
    int k = (i * 7) % 25;
    snprintf(id, sizeof id, "m-%02d", k);
    lm_iid(iid, sizeof iid, id);
    zm_store_op_t op = put_managed(id, iid, k % 2 + 1, T0);
    op.managed.workload_id = UUID(99);
    submit(st, &o, i, &op, 1);
  }
  /* Queued in the same turn as the writes: the read sees them. */
  lm_t all = {.st = st, .type = 0, .limit = 10};
  zm_store_list_managed(st, 0, "", 10, on_lm_page, &all);
  lm_t two = {.st = st, .type = 2, .limit = 4};
  zm_store_list_managed(st, 2, NULL, 4, on_lm_page, &two);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 25);
  assert_int_equal(all.err, 0);
  assert_int_equal(all.total, 25);
  assert_int_equal(all.pages, 3);
  assert_int_equal(all.last_page, 5);
  for (int i = 0; i < 25; i++) {
    char id[16];
    snprintf(id, sizeof id, "m-%02d", i);
    assert_string_equal(all.seen[i], id);
  }
  assert_int_equal(two.err, 0);
  assert_int_equal(two.total, 12); /* odd k: 1,3,..,23 */
  assert_int_equal(two.pages, 4);  /* 4 + 4 + 4, then an empty page */
  assert_string_equal(two.seen[0], "m-01");
  assert_string_equal(two.seen[11], "m-23");
  /* limit 0 returns nothing; a cursor past the end too. */
  lm_t none = {.st = st, .type = 0, .limit = 1};
  snprintf(none.after, sizeof none.after, "m-99");
  zm_store_list_managed(st, 0, "m-99", 1, on_lm_page, &none);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(none.pages, 1);
  assert_int_equal(none.total, 0);
  close_all(st, &loop);
}

/* Every mapping of one platform identity, ordered by ziti id and bounded
 * (app/runner replacement and deletes, issue 12); other identities' rows
 * are not returned. */
static void test_find_managed(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "fm", 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  const char *ids[] = {"fm-c", "fm-a", "fm-b", "fm-x"};
  for (int i = 0; i < 4; i++) {
    zm_store_op_t op =
        put_managed(ids[i], i < 3 ? UUID(11) : UUID(12), 5, T0 + i);
    if (i == 0)
      op.managed.ziti_service_id = "svc-1";
    submit(st, &o, i, &op, 1);
  }
  static got_t g;
  memset(&g, 0, sizeof g);
  zm_store_find_managed(st, UUID(11), 10, on_got_managed, &g);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(g.calls, 1);
  assert_int_equal(g.err, 0);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.rows[0].zid, "fm-a");
  assert_string_equal(g.rows[1].zid, "fm-b");
  assert_string_equal(g.rows[2].zid, "fm-c");
  assert_string_equal(g.rows[2].svc, "svc-1");
  assert_int_equal(g.rows[0].type, 5);
  memset(&g, 0, sizeof g);
  zm_store_find_managed(st, UUID(11), 2, on_got_managed, &g);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(g.n, 2);
  memset(&g, 0, sizeof g);
  zm_store_find_managed(st, UUID(13), 10, on_got_managed, &g);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(g.calls, 1);
  assert_int_equal(g.n, 0);
  close_all(st, &loop);
}

/* ==== load ================================================================ */

static void test_load_roundtrip(void **state) {
  (void)state;
  const char *path = db_path("load");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "load", 1);
  zm_store_op_t p2 =
      put_pending("pend-2", ZM_PENDING_AGENT, 1, "zid-p2", T0 + 1);
  p2.pending.agent_id = "agent-p2";
  p2.pending.resolve_after_ms = T0 + 77;
  zm_store_op_t ops[] = {
      (zm_store_op_t){.kind = ZM_STORE_PUT_MANAGED,
                      .managed = {"a9e1-zid",
                                  "a9e1c0de-0000-4000-8000-000000000001", 2,
                                  1234567890123LL, "svc-zid",
                                  "b9e1c0de-0000-4000-8000-000000000002",
                                  "c9e1c0de-0000-4000-8000-000000000003",
                                  "d9e1c0de-0000-4000-8000-000000000004"}},
      put_managed("old", UUID(01), 1, -86400001LL), /* before 1970 */
      put_service("svc-1", 5, 4102444800999LL, 946684800000LL),
      put_pending("pend-1", ZM_PENDING_SERVICE, 3, NULL, T0),
      p2,
  };
  assert_int_equal(run1(st, &loop, ops, ZM_ARRAY_SIZE(ops)), 0);
  close_all(st, &loop);

  uv_loop_init(&loop);
  st = open_store(&loop, path, 0);
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.nm, 2);
  const row_t *m = find(l.m, l.nm, "a9e1-zid");
  assert_string_equal(m->identity_id, "a9e1c0de-0000-4000-8000-000000000001");
  assert_int_equal(m->type, 2);
  assert_int_equal(m->created, 1234567890123LL);
  assert_string_equal(m->svc, "svc-zid");
  assert_string_equal(m->workload, "b9e1c0de-0000-4000-8000-000000000002");
  assert_string_equal(m->agent, "c9e1c0de-0000-4000-8000-000000000003");
  assert_string_equal(m->env, "d9e1c0de-0000-4000-8000-000000000004");
  const row_t *old = find(l.m, l.nm, "old");
  assert_int_equal(old->created, -86400001LL);
  assert_string_equal(old->svc, "(null)");
  assert_string_equal(old->workload, "(null)");
  assert_int_equal(l.ns, 1);
  assert_string_equal(l.s[0].zid, "svc-1");
  assert_int_equal(l.s[0].type, 5);
  assert_int_equal(l.s[0].lease, 4102444800999LL);
  assert_int_equal(l.s[0].created, 946684800000LL);
  assert_int_equal(l.np, 2);
  const row_t *r1 = find(l.p, l.np, "pend-1"), *r2 = find(l.p, l.np, "pend-2");
  assert_false(r1->has_zid);
  assert_int_equal(r1->kind, ZM_PENDING_SERVICE);
  assert_int_equal(r1->type, 3);
  assert_int_equal(r1->created, T0);
  assert_int_equal(r1->resolve_after, T0 + 600000);
  assert_string_equal(r1->agent, "(null)");
  assert_true(r2->has_zid);
  assert_string_equal(r2->identity_id, "zid-p2");
  assert_int_equal(r2->kind, ZM_PENDING_AGENT);
  assert_int_equal(r2->created, T0 + 1);
  assert_int_equal(r2->resolve_after, T0 + 77);
  assert_string_equal(r2->agent, "agent-p2");
  /* NULL callbacks are skipped. */
  assert_int_equal(zm_store_load(st, NULL, NULL, NULL, NULL), 0);
  close_all(st, &loop);
}

/* Rows seeded by hand with other time spellings load, and are rewritten to
 * the canonical text at open so SQL comparisons order them right. */
static void test_hand_seeded_times(void **state) {
  (void)state;
  SQLITE_ONLY("test_hand_seeded_times");
  const char *path = db_path("seeded");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
  close_all(st, &loop);
  sqlite3 *db = peek_open(path);
  peek_exec(db, "INSERT INTO service_identities VALUES"
                "('t1', 3, '2023-11-14T22:13:20Z', '2023-11-14 22:13:20'),"
                "('t2', 3, '2023-11-14 22:13:20.500+00:00', "
                "'2023-11-14T22:13:20.123Z'),"
                "('t3', 3, '2023-11-14 23:13:20.250+01:00', '2023-11-14'),"
                "('t4', 3, 'garbage', 'garbage'),"
                "('t5', 3, strftime('%Y-%m-%d %H:%M:%f','now','+300 seconds'),"
                " strftime('%Y-%m-%d %H:%M:%f','now'));"
                "INSERT INTO managed_identities(ziti_identity_id, identity_id,"
                " identity_type, created_at) VALUES"
                "('m1', 'i1', 1, '2023-11-14 22:13:20.123456');");
  sqlite3_close(db);
  uv_loop_init(&loop);
  st = open_store(&loop, path, 0);
  db = peek_open(path);
  assert_int_equal(peek_int(db,
                            "SELECT count(*) FROM service_identities WHERE "
                            "lease_expires_at='2023-11-14 22:13:20.000'",
                            NULL),
                   1);
  sqlite3_close(db);
  loaded_t l;
  int64_t before = zm_wall_ms();
  load_all(st, &l);
  assert_int_equal(l.ns, 5);
  assert_int_equal(find(l.s, l.ns, "t1")->lease, T0 - 123);
  assert_int_equal(find(l.s, l.ns, "t1")->created, T0 - 123);
  assert_int_equal(find(l.s, l.ns, "t2")->lease, T0 - 123 + 500);
  assert_int_equal(find(l.s, l.ns, "t2")->created, T0);
  assert_int_equal(find(l.s, l.ns, "t3")->lease, T0 - 123 + 250);
  assert_int_equal(find(l.s, l.ns, "t4")->lease, 0); /* unparseable: epoch */
  const row_t *t5 = find(l.s, l.ns, "t5");
  assert_true(t5->lease > before + 290000 && t5->lease < before + 310000);
  assert_int_equal(find(l.m, l.nm, "m1")->created, T0);
  /* Expired order over the rewritten values: t4 (garbage sorts last as
   * text, > the cut) is not collected; t1 < t3 < t2. */
  got_t g;
  claim_expired(st, &loop, T0 + 10000, T0, T0, 10, &g);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.tombs[0].ziti_identity_id, "t1");
  assert_string_equal(g.tombs[1].ziti_identity_id, "t3");
  assert_string_equal(g.tombs[2].ziti_identity_id, "t2");
  close_all(st, &loop);
}

/* ==== group commit ======================================================== */

typedef struct {
  sqlite3 *peek;
  int n, bad_order, not_durable;
  int in_submit;
} gc_t;

static gc_t gc;
static int gc_tags[10000];

static void on_gc_unit(int err, void *data) {
  int i = *(int *)data;
  assert_false(gc.in_submit);
  assert_int_equal(err, 0);
  if (i != gc.n)
    gc.bad_order++;
  gc.n++;
  /* Visible to another connection = committed (and in the WAL file). */
  char id[32];
  snprintf(id, sizeof id, "g-%05d", i);
  if (i % 97 == 0 && gc.peek != NULL &&
      peek_int(gc.peek,
               "SELECT count(*) FROM managed_identities WHERE "
               "ziti_identity_id=?",
               id) != 1)
    gc.not_durable++;
}

static void gc_submit(zm_store_t *st, int i) {
  char id[32];
  snprintf(id, sizeof id, "g-%05d", i);
  zm_store_op_t op = put_managed(id, UUID(01), 1, T0);
  gc_tags[i] = i;
  gc.in_submit = 1;
  zm_store_submit(st, &op, 1, on_gc_unit, &gc_tags[i]);
  gc.in_submit = 0;
}

static void test_group_commit(void **state) {
  (void)state;
  const char *path = db_path("group");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "group", 0);
  memset(&gc, 0, sizeof gc);
  gc.peek = pg_url ? NULL : peek_open(path);
  for (int i = 0; i < 1000; i++)
    gc_submit(st, i);
  assert_int_equal(gc.n, 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(gc.n, 1000);
  assert_int_equal(gc.bad_order, 0);
  assert_int_equal(gc.not_durable, 0);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.units, 1000);
  if (pg_url == NULL)
    assert_int_equal(stats.groups, 1); /* one turn, one transaction */

  /* 10000 in one turn: chained transactions of at most 4096 units. */
  gc.n = 0;
  for (int i = 0; i < 10000; i++)
    gc_submit(st, i);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(gc.n, 10000);
  assert_int_equal(gc.bad_order, 0);
  assert_int_equal(gc.not_durable, 0);
  zm_store_get_stats(st, &stats);
  if (pg_url == NULL) /* chained transactions of at most 4096 units */
    assert_int_equal(stats.groups, 1 + 3);
  assert_int_equal(stats.failed_groups, 0);
  if (gc.peek != NULL)
    sqlite3_close(gc.peek);
  close_all(st, &loop);
}

/* Units submitted from callbacks while the store is busy form the next
 * group together. */
typedef struct {
  zm_store_t *st;
  outcomes_t *o;
} chain_t;

static void on_chain_first(int err, void *data) {
  chain_t *c = data;
  assert_int_equal(err, 0);
  for (int i = 0; i < 50; i++) {
    char id[16];
    snprintf(id, sizeof id, "c-%d", i);
    zm_store_op_t op = put_service(id, 1, T0, T0);
    submit(c->st, c->o, i, &op, 1);
  }
}

static void test_group_from_callbacks(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "chain", 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  chain_t c = {st, &o};
  zm_store_op_t op = put_service("first", 1, T0, T0);
  zm_store_submit(st, &op, 1, on_chain_first, &c);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 50);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  if (pg_url == NULL)
    assert_int_equal(stats.groups, 2);
  close_all(st, &loop);
}

/* ==== failed group ======================================================== */

static void test_failed_group(void **state) {
  (void)state;
  SQLITE_ONLY("test_failed_group");
  const char *path = db_path("fail");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  zm_store_op_t a = put_managed("before", "i", 1, T0);
  submit(st, &o, 0, &a, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.errs[0], 0);

  /* Another connection holds the write lock: BEGIN IMMEDIATE times out. */
  /* no batch in flight: the connection is ours to touch */
  sqlite3_busy_timeout(((sq_store_t *)st)->db, 50);
  sqlite3 *other = peek_open(path);
  peek_exec(other, "BEGIN IMMEDIATE");
  o.n = 0;
  zm_store_op_t b[] = {put_managed("lost-1", "i", 1, T0)};
  zm_store_op_t c[] = {op_id(ZM_STORE_EXTEND_LEASE, "missing", T0)};
  submit(st, &o, 0, b, 1);
  submit(st, &o, 1, c, 1);
  /* Claims, reads and beats of the group fail with it. */
  got_t g1, g2;
  memset(&g1, 0, sizeof g1);
  memset(&g2, 0, sizeof g2);
  zm_store_claim_tombs(st, T0, T0 + 1, 10, on_got_tombs, &g1);
  zm_store_get_managed(st, "before", on_got_managed, &g2);
  beat_t bt = {0};
  zm_store_heartbeat(st, T0, 1000, on_beat, &bt);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 2);
  assert_int_equal(o.errs[0], ZM_E_STORE);
  assert_int_equal(o.errs[1], ZM_E_STORE);
  assert_int_equal(g1.calls, 1);
  assert_int_equal(g1.err, ZM_E_STORE);
  assert_int_equal(g1.n, 0);
  assert_int_equal(g2.calls, 1);
  assert_int_equal(g2.err, ZM_E_STORE);
  assert_int_equal(g2.n, 0);
  assert_int_equal(bt.calls, 1);
  assert_int_equal(bt.err, ZM_E_STORE);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.failed_groups, 1);
  peek_exec(other, "ROLLBACK");
  sqlite3_close(other);

  /* The store recovers with the next group. */
  o.n = 0;
  zm_store_op_t d = put_managed("after", "i", 1, T0);
  submit(st, &o, 0, &d, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.errs[0], 0);
  loaded_t l;
  load_all(st, &l);
  assert_int_equal(l.nm, 2);
  assert_null(find(l.m, l.nm, "lost-1"));
  close_all(st, &loop);
}

/* ==== close =============================================================== */

static int close_count;
static void on_count(const zm_service_row_t *r, void *data) {
  (void)r;
  (void)data;
  close_count++;
}

static void test_close_drains(void **state) {
  (void)state;
  const char *path = db_path("close");
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_fresh(&loop, "close", 0);
  /* First batch in flight (one loop iteration dispatches it), more queued. */
  for (int i = 0; i < 300; i++) {
    char id[16];
    snprintf(id, sizeof id, "x-%03d", i);
    zm_store_op_t op = put_service(id, 1, T0, T0);
    submit(st, &o, i, &op, 1);
    if (i == 99)
      uv_run(&loop, UV_RUN_NOWAIT);
  }
  zm_store_close(st); /* delivers every callback before returning */
  assert_int_equal(o.n, 300);
  for (int i = 0; i < 300; i++) {
    assert_int_equal(o.tags[i], i);
    assert_int_equal(o.errs[i], 0);
  }
  assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(uv_loop_close(&loop), 0);
  uv_loop_init(&loop);
  st = open_store(&loop, path, 0);
  close_count = 0;
  assert_int_equal(zm_store_load(st, NULL, on_count, NULL, NULL), 0);
  assert_int_equal(close_count, 300);
  close_all(st, &loop);
}

/* ==== crash durability ==================================================== */

enum { CHILD_INFLIGHT = 24 };

typedef struct {
  zm_store_t *st;
  int fd, next;
  int ids[CHILD_INFLIGHT];
} child_t;

static void child_submit(child_t *c, int slot);
static child_t child; /* the forked child's only store user */

static void on_child_ack(int err, void *data) {
  int *slot = data;
  child_t *c = &child;
  if (err != 0)
    _exit(3);
  int id = c->ids[*slot];
  if (write(c->fd, &id, sizeof id) != (ssize_t)sizeof id)
    _exit(4);
  child_submit(c, *slot);
}

static int slots[CHILD_INFLIGHT];

static void child_submit(child_t *c, int slot) {
  char id[32], iid[48];
  int n = c->next++;
  snprintf(id, sizeof id, "k-%07d", n);
  snprintf(iid, sizeof iid, "iid-%07d", n);
  c->ids[slot] = n;
  zm_store_op_t ops[] = {put_service(id, 3, T0 + n, T0),
                         put_managed(id, iid, 1, T0 + n)};
  zm_store_submit(c->st, ops, 2, on_child_ack, &slots[slot]);
}

static void child_main(const char *path, int sync, int fd) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  child.fd = fd;
  zm_store_config_t cfg = {.path = path, .sync_full = sync};
  if (zm_store_open(&child.st, &loop, &cfg) != 0)
    _exit(2);
  for (int i = 0; i < CHILD_INFLIGHT; i++) {
    slots[i] = i;
    child_submit(&child, i);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  _exit(5); /* never: the store always has work */
}

static int read_id(int fd, int *id) {
  size_t got = 0;
  while (got < sizeof *id) {
    ssize_t r = read(fd, (char *)id + got, sizeof *id - got);
    if (r == 0)
      return 0;
    if (r < 0)
      return -1;
    got += (size_t)r;
  }
  return 1;
}

static void crash_once(const char *path, int sync, unsigned *seed) {
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    child_main(path, sync, fds[1]);
  }
  close(fds[1]);
  static char acked[1 << 20];
  memset(acked, 0, sizeof acked);
  int want = 20 + (int)(rand_r(seed) % 400), n = 0, id, max = -1;
  while (n < want) {
    assert_int_equal(read_id(fds[0], &id), 1); /* child alive, acking */
    assert_true(id >= 0 && id < (int)sizeof acked);
    acked[id] = 1;
    max = id > max ? id : max;
    n++;
  }
  /* Half the time kill at once (the child is still delivering the group it
   * just acknowledged), else land anywhere in a later group. */
  if (rand_r(seed) % 2)
    usleep((useconds_t)(rand_r(seed) % 3000));
  assert_int_equal(kill(pid, SIGKILL), 0);
  int status;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  int r;
  while ((r = read_id(fds[0], &id)) == 1) { /* acks written before death */
    acked[id] = 1;
    max = id > max ? id : max;
    n++;
  }
  assert_int_equal(r, 0);
  close(fds[0]);

  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, sync);
  sqlite3 *db = peek_open(path);
  int missing = 0;
  for (int i = 0; i <= max; i++) {
    if (!acked[i])
      continue;
    char k[32];
    snprintf(k, sizeof k, "k-%07d", i);
    missing += peek_int(db,
                        "SELECT count(*) FROM service_identities WHERE "
                        "ziti_identity_id=?",
                        k) != 1;
    missing += peek_int(db,
                        "SELECT count(*) FROM managed_identities WHERE "
                        "ziti_identity_id=?",
                        k) != 1;
  }
  /* Units are atomic: no row without its twin. */
  assert_int_equal(
      peek_int(db,
               "SELECT count(*) FROM service_identities s WHERE NOT EXISTS"
               " (SELECT 1 FROM managed_identities m"
               " WHERE m.ziti_identity_id = s.ziti_identity_id)",
               NULL),
      0);
  sqlite3_close(db);
  print_message("crash sync=%d: %d acked (kill after %d), %d missing\n", sync,
                n, want, missing);
  assert_int_equal(missing, 0);
  close_all(st, &loop);
}

static void test_crash_durability(void **state) {
  (void)state;
  SQLITE_ONLY("test_crash_durability");
  unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
  print_message("crash seed %u\n", seed);
  for (int sync = 0; sync <= 1; sync++) {
    char name[32];
    snprintf(name, sizeof name, "crash-%d", sync);
    const char *path = db_path(name);
    for (int rep = 0; rep < 8; rep++)
      crash_once(path, sync,
                 &seed); /* same file: recovery on top of recovery */
  }
}

/* The WAL stays bounded under continuous writes. A regression test: the
 * background checkpointer's connection once never saw WAL mode, so every
 * checkpoint was a no-op, and under continuous load the WAL was never reset
 * (it reached 800 MB in seconds of random-key lease extensions). */
static int wal_pending;
static void on_wal_unit(int err, void *data) {
  (void)data;
  assert_int_equal(err, 0);
  wal_pending--;
}

static long long file_size(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
}

static void test_wal_bounded(void **state) {
  (void)state;
  SQLITE_ONLY("test_wal_bounded");
  const char *path = db_path("wal");
  char wal[160];
  snprintf(wal, sizeof wal, "%s-wal", path);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
  enum { N = 20000 };
  char id[32];
  /* rows to extend */
  for (int i = 0; i < N; i++) {
    snprintf(id, sizeof id, "w-%06d", i);
    zm_store_op_t op = put_service(id, 1, T0, T0);
    wal_pending++;
    zm_store_submit(st, &op, 1, on_wal_unit, NULL);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(wal_pending, 0);
  /* many groups of random-key extensions: ~60 MB of WAL frames written */
  long long max_wal = 0;
  uint32_t x = 12345;
  for (int round = 0; round < 120; round++) {
    for (int k = 0; k < 500; k++) {
      x = x * 1103515245u + 12345u;
      snprintf(id, sizeof id, "w-%06u", (x >> 8) % N);
      zm_store_op_t op = {
          .kind = ZM_STORE_EXTEND_LEASE, .id = id, .ms = T0 + round * 1000 + k};
      wal_pending++;
      zm_store_submit(st, &op, 1, on_wal_unit, NULL);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(wal_pending, 0);
    long long w = file_size(wal);
    if (w > max_wal)
      max_wal = w;
  }
  /* 8192 frames of ~1 KiB between restarts, plus slack */
  assert_true(max_wal > 0);
  assert_true(max_wal < 24ll * 1024 * 1024);
  /* and the data reached the database file */
  assert_true(file_size(path) > 1024 * 1024);
  close_all(st, &loop);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_time_codec),
      cmocka_unit_test(test_open_migrate_reopen),
      cmocka_unit_test(test_migrate_from_v2),
      cmocka_unit_test(test_ops),
      cmocka_unit_test(test_commit_spacing),
      cmocka_unit_test(test_pending_agent_unique),
      cmocka_unit_test(test_retire),
      cmocka_unit_test(test_flush_leases),
      cmocka_unit_test(test_tombs),
      cmocka_unit_test(test_claim_expired),
      cmocka_unit_test(test_claim_pending),
      cmocka_unit_test(test_heartbeat),
      cmocka_unit_test(test_changes),
      cmocka_unit_test(test_group_commit),
      cmocka_unit_test(test_group_from_callbacks),
      cmocka_unit_test(test_failed_group),
      cmocka_unit_test(test_list_managed),
      cmocka_unit_test(test_find_managed),
      cmocka_unit_test(test_load_roundtrip),
      cmocka_unit_test(test_hand_seeded_times),
      cmocka_unit_test(test_close_drains),
      cmocka_unit_test(test_crash_durability),
      cmocka_unit_test(test_wal_bounded),
  };
  return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
