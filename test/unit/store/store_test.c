/* store_test.c - the SQLite store (src/store/sqlite.c) on a real uv loop.
 * sqlite.c is included so a test can reach the connection (to shorten the
 * busy timeout when provoking a failed group). */
#include "store/sqlite.c"

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

static int setup_dir(void **state) {
  (void)state;
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

static char *db_path(const char *name) {
  static char p[128];
  snprintf(p, sizeof p, "%s/%s.db", dir, name);
  return p;
}

static zm_store_t *open_store(uv_loop_t *loop, const char *path, int sync) {
  zm_store_config_t cfg = {.path = path, .sync_full = sync};
  zm_store_t *st = NULL;
  assert_int_equal(zm_store_open(&st, loop, &cfg), 0);
  assert_non_null(st);
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

/* Rows collected by zm_store_load, copied. */
typedef struct {
  char zid[64], identity_id[64];
  int type;
  int64_t created, lease;
  int kind, has_zid;
} row_t;

typedef struct {
  row_t m[64], s[64], p[64];
  int nm, ns, np;
} loaded_t;

static void on_lm(const zm_managed_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->nm < 64);
  row_t *x = &l->m[l->nm++];
  snprintf(x->zid, sizeof x->zid, "%s", r->ziti_identity_id);
  snprintf(x->identity_id, sizeof x->identity_id, "%s", r->identity_id);
  x->type = r->identity_type;
  x->created = r->created_at_ms;
}

static void on_ls(const zm_service_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->ns < 64);
  row_t *x = &l->s[l->ns++];
  snprintf(x->zid, sizeof x->zid, "%s", r->ziti_identity_id);
  x->type = r->service_type;
  x->lease = r->lease_expires_ms;
  x->created = r->created_at_ms;
}

static void on_lp(const zm_pending_row_t *r, void *data) {
  loaded_t *l = data;
  assert_true(l->np < 64);
  row_t *x = &l->p[l->np++];
  snprintf(x->zid, sizeof x->zid, "%s", r->name);
  x->has_zid = r->ziti_identity_id != NULL;
  snprintf(x->identity_id, sizeof x->identity_id, "%s",
           r->ziti_identity_id ? r->ziti_identity_id : "");
  x->kind = r->kind;
  x->type = r->type;
  x->created = r->created_at_ms;
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
  return (zm_store_op_t){.kind = ZM_STORE_PUT_MANAGED,
                         .managed = {zid, iid, type, created}};
}

static zm_store_op_t put_service(const char *zid, int type, int64_t lease,
                                 int64_t created) {
  return (zm_store_op_t){.kind = ZM_STORE_PUT_SERVICE,
                         .service = {zid, type, lease, created}};
}

static zm_store_op_t put_pending(const char *name, int kind, int type,
                                 const char *zid, int64_t created) {
  return (zm_store_op_t){.kind = ZM_STORE_PUT_PENDING,
                         .pending = {name, kind, type, zid, created}};
}

static zm_store_op_t op_id(zm_store_op_kind_t k, const char *id, int64_t ms) {
  return (zm_store_op_t){.kind = k, .id = id, .ms = ms};
}

static zm_store_op_t op_name(zm_store_op_kind_t k, const char *name,
                             const char *id) {
  return (zm_store_op_t){.kind = k, .name = name, .id = id};
}

#define T0 1700000000123LL /* 2023-11-14 22:13:20.123 UTC */

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
  const char *path = db_path("migrate");
  for (int round = 0; round < 3; round++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    zm_store_t *st = open_store(&loop, path, round % 2);
    close_all(st, &loop);
  }
  sqlite3 *db = peek_open(path);
  assert_int_equal(peek_int(db, "SELECT count(*) FROM schema_migrations", NULL),
                   2);
  assert_int_equal(
      peek_int(db, "SELECT sum(version) FROM schema_migrations", NULL), 3);
  assert_int_equal(
      peek_int(db,
               "SELECT count(*) FROM sqlite_master WHERE name IN"
               " ('managed_identities','service_identities',"
               "'pending_identities','service_identities_lease_expires_at_idx',"
               "'pending_identities_created_at_idx')",
               NULL),
      5);
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

/* ==== every op kind ======================================================= */

static void test_ops(void **state) {
  (void)state;
  const char *path = db_path("ops");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);

  zm_store_op_t u0[] = {put_managed("m1", "ident-1", 1, T0),
                        put_managed("m2", "ident-2", 2, T0 + 1)};
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
  zm_store_op_t ext_missing[] = {put_managed("m3", "ident-3", 1, T0),
                                 op_id(ZM_STORE_EXTEND_LEASE, "nope", T0)};
  zm_store_op_t dup[] = {put_managed("m4", "ident-4", 1, T0),
                         put_pending("svc-a", ZM_PENDING_AGENT, 1, NULL, T0)};
  zm_store_op_t setid[] = {
      op_name(ZM_STORE_SET_PENDING_ID, "svc-a", "zid-of-a")};
  zm_store_op_t setid_missing[] = {
      op_name(ZM_STORE_SET_PENDING_ID, "svc-zz", "x")};
  zm_store_op_t null_col[] = {put_managed("m5", NULL, 1, T0)};
  zm_store_op_t after[] = {put_managed("m6", "ident-6", 2, T0)};
  submit(st, &o, 0, ext_ok, 1);
  submit(st, &o, 1, ext_missing, 2);
  submit(st, &o, 2, dup, 2);
  submit(st, &o, 3, setid, 1);
  submit(st, &o, 4, setid_missing, 1);
  submit(st, &o, 5, null_col, 1);
  submit(st, &o, 6, after, 1);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.queued, 7);
  uv_run(&loop, UV_RUN_DEFAULT);
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.queued, 0);
  assert_int_equal(stats.failed_groups, 0);
  assert_int_equal(o.n, 7);
  int want[] = {0, ZM_E_NOT_FOUND, ZM_E_EXISTS, 0, ZM_E_NOT_FOUND, ZM_E_INVAL,
                0};
  for (int i = 0; i < 7; i++) {
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
  assert_int_equal(find(l.s, l.ns, "s1")->lease, T0 + 5000);
  assert_int_equal(find(l.s, l.ns, "s2")->lease, T0 + 2000);
  assert_int_equal(l.np, 1);
  assert_int_equal(l.p[0].kind, ZM_PENDING_SERVICE); /* not the duplicate's */
  assert_true(l.p[0].has_zid);
  assert_string_equal(l.p[0].identity_id, "zid-of-a");

  /* Deletes: the GC guard, unconditional, and absent rows (= ok). */
  o.n = 0;
  zm_store_op_t d0[] = {op_id(ZM_STORE_DEL_SERVICE, "s1", T0 + 4999)};
  zm_store_op_t d1[] = {op_id(ZM_STORE_DEL_SERVICE, "s2", T0 + 2000)};
  zm_store_op_t d2[] = {op_id(ZM_STORE_DEL_MANAGED, "m1", 0),
                        op_id(ZM_STORE_DEL_MANAGED, "never", 0),
                        op_name(ZM_STORE_DEL_PENDING, "svc-a", NULL),
                        op_name(ZM_STORE_DEL_PENDING, "never", NULL),
                        op_id(ZM_STORE_DEL_SERVICE, "never", INT64_MAX)};
  submit(st, &o, 0, d0, 1);
  submit(st, &o, 1, d1, 1);
  submit(st, &o, 2, d2, 5);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 3);
  for (int i = 0; i < 3; i++)
    assert_int_equal(o.errs[i], 0);
  load_all(st, &l);
  assert_int_equal(l.ns, 1);
  assert_string_equal(l.s[0].zid, "s1"); /* guarded: lease > ms, kept */
  assert_int_equal(l.nm, 2);
  assert_null(find(l.m, l.nm, "m1"));
  assert_int_equal(l.np, 0);
  o.n = 0;
  zm_store_op_t d3[] = {op_id(ZM_STORE_DEL_SERVICE, "s1", INT64_MAX)};
  submit(st, &o, 0, d3, 1);
  submit(st, &o, 1, NULL, 0); /* an empty unit commits too */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 2);
  assert_int_equal(o.errs[0], 0);
  assert_int_equal(o.errs[1], 0);
  load_all(st, &l);
  assert_int_equal(l.ns, 0);
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.units, 3 + 7 + 3 + 2);
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
  if (i % 97 == 0 && peek_int(gc.peek,
                              "SELECT count(*) FROM managed_identities WHERE "
                              "ziti_identity_id=?",
                              id) != 1)
    gc.not_durable++;
}

static void gc_submit(zm_store_t *st, int i) {
  char id[32];
  snprintf(id, sizeof id, "g-%05d", i);
  zm_store_op_t op = put_managed(id, "ident", 1, T0);
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
  zm_store_t *st = open_store(&loop, path, 0);
  memset(&gc, 0, sizeof gc);
  gc.peek = peek_open(path);
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
  assert_int_equal(stats.groups, 1 + 3);
  assert_int_equal(stats.failed_groups, 0);
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
  zm_store_t *st = open_store(&loop, db_path("chain"), 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  chain_t c = {st, &o};
  zm_store_op_t op = put_service("first", 1, T0, T0);
  zm_store_submit(st, &op, 1, on_chain_first, &c);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 50);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.groups, 2);
  close_all(st, &loop);
}

/* ==== failed group ======================================================== */

static void test_failed_group(void **state) {
  (void)state;
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
  sqlite3_busy_timeout(st->db, 50); /* no batch in flight: ours to touch */
  sqlite3 *other = peek_open(path);
  peek_exec(other, "BEGIN IMMEDIATE");
  o.n = 0;
  zm_store_op_t b[] = {put_managed("lost-1", "i", 1, T0)};
  zm_store_op_t c[] = {op_id(ZM_STORE_EXTEND_LEASE, "missing", T0)};
  submit(st, &o, 0, b, 1);
  submit(st, &o, 1, c, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.n, 2);
  assert_int_equal(o.errs[0], ZM_E_STORE);
  assert_int_equal(o.errs[1], ZM_E_STORE);
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
    char want[32];
    snprintf(want, sizeof want, "iid-%s", rows[i].ziti_identity_id);
    assert_string_equal(rows[i].identity_id, want);
    assert_int_equal(rows[i].created_at_ms, T0);
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
  zm_store_t *st = open_store(&loop, db_path("lm"), 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  /* Inserted out of order; types 1,2 alternate. */
  for (int i = 0; i < 25; i++) {
    char id[16], iid[32];
    int k = (i * 7) % 25;
    snprintf(id, sizeof id, "m-%02d", k);
    snprintf(iid, sizeof iid, "iid-%s", id);
    zm_store_op_t op = put_managed(id, iid, k % 2 + 1, T0);
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

typedef struct {
  zm_store_t *st;
  int64_t now;
  size_t limit;
  int64_t after_ms;
  char after[32];
  int total;
  char seen[32][16];
  int64_t leases[32];
} le_t;

static void on_le_page(int err, const zm_service_row_t *rows, size_t n,
                       void *data) {
  le_t *p = data;
  assert_int_equal(err, 0);
  for (size_t i = 0; i < n; i++) {
    assert_true(p->total < 32);
    assert_true(rows[i].lease_expires_ms <= p->now);
    snprintf(p->seen[p->total], 16, "%s", rows[i].ziti_identity_id);
    p->leases[p->total++] = rows[i].lease_expires_ms;
    p->after_ms = rows[i].lease_expires_ms;
    snprintf(p->after, sizeof p->after, "%s", rows[i].ziti_identity_id);
  }
  if (n == p->limit)
    zm_store_list_expired(p->st, p->now, p->after_ms, p->after, p->limit,
                          on_le_page, p);
}

static void test_list_expired(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, db_path("le"), 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  static const struct {
    const char *id;
    int64_t lease;
  } rows[] = {
      {"e", T0 + 10}, {"a", T0 + 30}, {"c", T0 + 10}, {"b", T0 + 20},
      {"d", T0 + 10}, {"f", T0 + 40}, {"g", T0 - 5},  {"h", T0 + 41},
  };
  zm_store_op_t ops[ZM_ARRAY_SIZE(rows)];
  for (size_t i = 0; i < ZM_ARRAY_SIZE(rows); i++)
    ops[i] = put_service(rows[i].id, 3, rows[i].lease, T0);
  submit(st, &o, 0, ops, ZM_ARRAY_SIZE(rows));
  le_t p = {.st = st, .now = T0 + 40, .limit = 2};
  zm_store_list_expired(st, p.now, 0, "", 2, on_le_page, &p);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.errs[0], 0);
  /* (lease, id) order, h (lease > now) excluded, ties broken by id. */
  static const char *const want[] = {"g", "c", "d", "e", "b", "a", "f"};
  assert_int_equal(p.total, 7);
  for (int i = 0; i < 7; i++)
    assert_string_equal(p.seen[i], want[i]);
  assert_int_equal(p.leases[0], T0 - 5);
  assert_int_equal(p.leases[6], T0 + 40);
  /* A cursor in the middle of a tie resumes inside it. */
  le_t q = {.st = st, .now = T0 + 40, .limit = 100};
  zm_store_list_expired(st, q.now, T0 + 10, "c", 100, on_le_page, &q);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(q.total, 5);
  assert_string_equal(q.seen[0], "d");
  assert_string_equal(q.seen[1], "e");
  close_all(st, &loop);
}

typedef struct {
  int calls, n;
  char names[16][16];
  int64_t created[16];
} lp_t;

static void on_lp_page(int err, const zm_pending_row_t *rows, size_t n,
                       void *data) {
  lp_t *p = data;
  assert_int_equal(err, 0);
  p->calls++;
  for (size_t i = 0; i < n; i++) {
    snprintf(p->names[p->n], 16, "%s", rows[i].name);
    p->created[p->n++] = rows[i].created_at_ms;
    assert_int_equal(rows[i].kind, ZM_PENDING_AGENT);
    assert_int_equal(rows[i].type, 2);
  }
}

static void test_list_pending(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, db_path("lp"), 0);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  const char *names[] = {"p3", "p0", "p4", "p1", "p2"};
  int64_t ages[] = {3000, 0, 4000, 1000, 2000};
  for (int i = 0; i < 5; i++) {
    zm_store_op_t op =
        put_pending(names[i], ZM_PENDING_AGENT, 2, NULL, T0 + ages[i]);
    submit(st, &o, i, &op, 1);
  }
  lp_t a = {0}, b = {0};
  zm_store_list_pending(st, T0 + 2000, 100, on_lp_page, &a);
  zm_store_list_pending(st, T0 + 10000, 4, on_lp_page, &b);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(a.calls, 1);
  assert_int_equal(a.n, 3);
  assert_string_equal(a.names[0], "p0");
  assert_string_equal(a.names[1], "p1");
  assert_string_equal(a.names[2], "p2");
  assert_int_equal(a.created[2], T0 + 2000);
  assert_int_equal(b.n, 4);
  assert_string_equal(b.names[3], "p3");
  close_all(st, &loop);
}

/* ==== load ================================================================ */

static void test_load_roundtrip(void **state) {
  (void)state;
  const char *path = db_path("load");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 1);
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  zm_store_op_t ops[] = {
      put_managed("a9e1-zid", "a9e1c0de-0000-4000-8000-000000000001", 2,
                  1234567890123LL),
      put_managed("old", "x", 1, -86400001LL), /* before 1970 */
      put_service("svc-1", 5, 4102444800999LL, 946684800000LL),
      put_pending("pend-1", ZM_PENDING_SERVICE, 3, NULL, T0),
      put_pending("pend-2", ZM_PENDING_AGENT, 1, "zid-p2", T0 + 1),
  };
  submit(st, &o, 0, ops, ZM_ARRAY_SIZE(ops));
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.errs[0], 0);
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
  assert_int_equal(find(l.m, l.nm, "old")->created, -86400001LL);
  assert_int_equal(l.ns, 1);
  assert_string_equal(l.s[0].zid, "svc-1");
  assert_int_equal(l.s[0].type, 5);
  assert_int_equal(l.s[0].lease, 4102444800999LL);
  assert_int_equal(l.s[0].created, 946684800000LL);
  assert_int_equal(l.np, 2);
  const row_t *p1 = find(l.p, l.np, "pend-1"), *p2 = find(l.p, l.np, "pend-2");
  assert_false(p1->has_zid);
  assert_int_equal(p1->kind, ZM_PENDING_SERVICE);
  assert_int_equal(p1->type, 3);
  assert_int_equal(p1->created, T0);
  assert_true(p2->has_zid);
  assert_string_equal(p2->identity_id, "zid-p2");
  assert_int_equal(p2->kind, ZM_PENDING_AGENT);
  assert_int_equal(p2->created, T0 + 1);
  /* NULL callbacks are skipped. */
  assert_int_equal(zm_store_load(st, NULL, NULL, NULL, NULL), 0);
  close_all(st, &loop);
}

/* Rows seeded by hand with other time spellings load, and are rewritten to
 * the canonical text at open so SQL comparisons order them right. */
static void test_hand_seeded_times(void **state) {
  (void)state;
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
                "INSERT INTO managed_identities VALUES"
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
   * text, > now) is not listed; t1 < t3 < t2. */
  le_t p = {.st = st, .now = T0 + 10000, .limit = 10};
  zm_store_list_expired(st, p.now, 0, "", 10, on_le_page, &p);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(p.total, 3);
  assert_string_equal(p.seen[0], "t1");
  assert_string_equal(p.seen[1], "t3");
  assert_string_equal(p.seen[2], "t2");
  close_all(st, &loop);
}

/* ==== close =============================================================== */

static void test_close_drains(void **state) {
  (void)state;
  const char *path = db_path("close");
  static outcomes_t o;
  memset(&o, 0, sizeof o);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop, path, 0);
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
  sqlite3 *db = peek_open(path);
  assert_int_equal(
      peek_int(db, "SELECT count(*) FROM service_identities", NULL), 300);
  sqlite3_close(db);
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
      cmocka_unit_test(test_ops),
      cmocka_unit_test(test_group_commit),
      cmocka_unit_test(test_group_from_callbacks),
      cmocka_unit_test(test_failed_group),
      cmocka_unit_test(test_list_managed),
      cmocka_unit_test(test_list_expired),
      cmocka_unit_test(test_list_pending),
      cmocka_unit_test(test_load_roundtrip),
      cmocka_unit_test(test_hand_seeded_times),
      cmocka_unit_test(test_close_drains),
      cmocka_unit_test(test_crash_durability),
      cmocka_unit_test(test_wal_bounded),
  };
  return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
