/* pg_test.c - the PostgreSQL store backend (src/store/pg.c) against a real
 * server: run under test/pg/with-pg.sh, which provides
 * ZM_TEST_DATABASE_URL (and ZM_TEST_PG_BIN / ZM_TEST_PG_DATA / ZM_TEST_PG_CTL
 * to restart the server). Without ZM_TEST_DATABASE_URL every test skips.
 *
 * Each test starts from an empty database (schema public dropped and
 * re-created) and checks what a second, independent connection sees. */
#include "store/pg_internal.h"
#include "store/store_internal.h"

#include "zm/store.h"
#include "zm/zm.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* ==== helpers ============================================================= */

static const char *url(void) { return getenv("ZM_TEST_DATABASE_URL"); }

#define NEED_PG()                                                              \
  do {                                                                         \
    if (url() == NULL || url()[0] == '\0')                                     \
      skip();                                                                  \
  } while (0)

static PGconn *peek;

static PGresult *q(const char *sql) {
  PGresult *r = PQexec(peek, sql);
  ExecStatusType s = PQresultStatus(r);
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK)
    fail_msg("%s: %s", sql, PQerrorMessage(peek));
  return r;
}

static void qx(const char *sql) { PQclear(q(sql)); }

static long long qi(const char *sql) {
  PGresult *r = q(sql);
  assert_int_equal(PQntuples(r), 1);
  long long v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
  PQclear(r);
  return v;
}

/* The rows of sql, one per line, columns joined with '|'. */
static char *qs(const char *sql) {
  PGresult *r = q(sql);
  size_t cap = 64, len = 0;
  char *out = malloc(cap);
  out[0] = '\0';
  for (int i = 0; i < PQntuples(r); i++)
    for (int k = 0; k < PQnfields(r); k++) {
      const char *v = PQgetisnull(r, i, k) ? "NULL" : PQgetvalue(r, i, k);
      size_t n = strlen(v) + 2;
      while (len + n + 1 > cap)
        out = realloc(out, cap *= 2);
      len += (size_t)snprintf(out + len, cap - len, "%s%c", v,
                              k + 1 == PQnfields(r) ? '\n' : '|');
    }
  PQclear(r);
  return out;
}

static int setup(void **state) {
  (void)state;
  if (url() == NULL || url()[0] == '\0')
    return 0;
  peek = PQconnectdb(url());
  assert_int_equal(PQstatus(peek), CONNECTION_OK);
  PQclear(PQexec(peek, "SET client_min_messages = warning"));
  qx("DROP SCHEMA public CASCADE");
  qx("CREATE SCHEMA public");
  return 0;
}

static int teardown(void **state) {
  (void)state;
  if (peek != NULL)
    PQfinish(peek);
  peek = NULL;
  return 0;
}

static zm_store_t *open_store(uv_loop_t *loop) {
  zm_store_config_t cfg = {.url = url(), .pool_size = 3};
  zm_store_t *st = NULL;
  assert_int_equal(zm_store_open(&st, loop, &cfg), 0);
  assert_non_null(st);
  assert_int_equal(zm_store_shared(st), 1);
  return st;
}

static void close_all(zm_store_t *st, uv_loop_t *loop) {
  zm_store_close(st);
  assert_int_equal(uv_run(loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(uv_loop_close(loop), 0);
}

static void on_tick(uv_timer_t *t) { (void)t; }

/* Runs the loop until *flag is non-zero (or ms pass: fails). */
static void run_until(uv_loop_t *loop, const int *flag, unsigned ms) {
  uv_timer_t t;
  uv_timer_init(loop, &t);
  uv_timer_start(&t, on_tick, 10, 10);
  uint64_t end = uv_now(loop) + ms;
  while (!*flag && uv_now(loop) < end)
    uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  assert_true(*flag);
}

typedef struct {
  int done, err;
} res_t;

static void on_unit(int err, void *data) {
  res_t *r = data;
  r->done++;
  r->err = err;
}

static int submit1(uv_loop_t *loop, zm_store_t *st, const zm_store_op_t *ops,
                   size_t n) {
  res_t r = {0};
  zm_store_submit(st, ops, n, on_unit, &r);
  assert_int_equal(r.done, 0); /* never inside the submitting call */
  run_until(loop, &r.done, 10000);
  return r.err;
}

static const char *UUID1 = "11111111-1111-1111-1111-111111111111";
static const char *UUID2 = "22222222-2222-2222-2222-222222222222";

static zm_store_op_t put_managed(const char *id, const char *uuid) {
  zm_store_op_t op = {.kind = ZM_STORE_PUT_MANAGED};
  op.managed.ziti_identity_id = id;
  op.managed.identity_id = uuid;
  op.managed.identity_type = 2;
  op.managed.created_at_ms = 1700000000123;
  return op;
}

static zm_store_op_t put_service(const char *id, int64_t lease) {
  zm_store_op_t op = {.kind = ZM_STORE_PUT_SERVICE};
  op.service.ziti_identity_id = id;
  op.service.service_type = 3;
  op.service.lease_expires_ms = lease;
  op.service.created_at_ms = 1700000000000;
  return op;
}

typedef struct {
  int done, err;
  size_t n;
  char ids[64][64];
  int64_t ms[64];
  int kinds[64], types[64];
  zm_managed_row_t first;
  char first_buf[8][64];
} rows_t;

static void copy_s(char *dst, const char *s) {
  snprintf(dst, 64, "%s", s ? s : "NULL");
}

static void on_managed(int err, const zm_managed_row_t *rows, size_t n,
                       void *data) {
  rows_t *r = data;
  r->done = 1;
  r->err = err;
  r->n = n;
  for (size_t i = 0; i < n && i < 64; i++)
    copy_s(r->ids[i], rows[i].ziti_identity_id);
  if (n > 0) {
    r->first = rows[0];
    copy_s(r->first_buf[0], rows[0].identity_id);
    copy_s(r->first_buf[1], rows[0].ziti_service_id);
    copy_s(r->first_buf[2], rows[0].workload_id);
    copy_s(r->first_buf[3], rows[0].agent_id);
    copy_s(r->first_buf[4], rows[0].environment_id);
  }
}

static void on_tombs(int err, const zm_tomb_row_t *rows, size_t n, void *data) {
  rows_t *r = data;
  r->done = 1;
  r->err = err;
  r->n = n;
  for (size_t i = 0; i < n && i < 64; i++) {
    copy_s(r->ids[i], rows[i].ziti_identity_id);
    r->ms[i] = rows[i].next_try_ms;
    r->kinds[i] = rows[i].kind;
    r->types[i] = rows[i].type;
  }
}

static void on_pending(int err, const zm_pending_row_t *rows, size_t n,
                       void *data) {
  rows_t *r = data;
  r->done = 1;
  r->err = err;
  r->n = n;
  for (size_t i = 0; i < n && i < 64; i++) {
    copy_s(r->ids[i], rows[i].name);
    r->ms[i] = rows[i].resolve_after_ms;
  }
}

/* ==== schema ============================================================== */

static const char *COLS_SQL =
    "SELECT table_name, column_name, data_type, is_nullable,"
    " coalesce(column_default, '') FROM information_schema.columns"
    " WHERE table_schema = 'public' AND table_name IN"
    " ('managed_identities', 'service_identities')"
    " ORDER BY table_name, ordinal_position";

static void test_fresh_schema(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  char *cols = qs(COLS_SQL);
  assert_string_equal(
      cols,
      "managed_identities|ziti_identity_id|text|NO|\n"
      "managed_identities|identity_id|uuid|NO|\n"
      "managed_identities|identity_type|smallint|NO|\n"
      "managed_identities|created_at|timestamp with time zone|NO|now()\n"
      "managed_identities|ziti_service_id|text|YES|\n"
      "managed_identities|workload_id|uuid|YES|\n"
      "managed_identities|agent_id|uuid|YES|\n"
      "managed_identities|environment_id|uuid|YES|\n"
      "service_identities|ziti_identity_id|text|NO|\n"
      "service_identities|service_type|smallint|NO|\n"
      "service_identities|lease_expires_at|timestamp with time zone|NO|\n"
      "service_identities|created_at|timestamp with time zone|NO|now()\n");
  free(cols);
  /* primary keys and the Go service's three indexes, by its names */
  char *idx = qs("SELECT indexname FROM pg_indexes WHERE tablename IN"
                 " ('managed_identities', 'service_identities') AND indexname"
                 " LIKE 'idx_%' ORDER BY indexname");
  assert_string_equal(idx, "idx_managed_identities_identity_id\n"
                           "idx_managed_identities_type\n"
                           "idx_service_identities_lease\n");
  free(idx);
  assert_int_equal(qi("SELECT count(*) FROM pg_indexes WHERE tablename ="
                      " 'managed_identities' AND indexdef LIKE"
                      " '%btree (identity_id)' AND indexdef NOT LIKE"
                      " '%UNIQUE%'"),
                   1);
  assert_int_equal(qi("SELECT count(*) FROM pg_indexes WHERE tablename ="
                      " 'service_identities' AND indexdef LIKE"
                      " '%btree (lease_expires_at)'"),
                   1);
  assert_int_equal(qi("SELECT count(*) FROM pg_indexes WHERE indexdef LIKE"
                      " 'CREATE UNIQUE INDEX%(ziti_identity_id)' AND"
                      " tablename IN ('managed_identities',"
                      " 'service_identities')"),
                   2);
  char *mig = qs("SELECT version FROM schema_migrations ORDER BY version");
  /* the Go service's file names: its migrator finds nothing to apply */
  assert_string_equal(mig, "0001_init.sql\n0002_service_identities.sql\n"
                           "0003_drop_tenant_id.sql\n"
                           "0004_add_ziti_service_id.sql\n"
                           "0005_add_identity_id_index.sql\n"
                           "0006_make_identity_id_unique.sql\n"
                           "0007_add_workload_id.sql\n"
                           "0007_make_identity_id_non_unique.sql\n"
                           "0008_identity_agent_environment.sql\n");
  free(mig);
  assert_int_equal(qi("SELECT count(*) FROM zm_schema_migrations"), 1);
  close_all(st, &loop);

  /* Again: nothing changes. */
  uv_loop_init(&loop);
  st = open_store(&loop);
  assert_int_equal(qi("SELECT count(*) FROM schema_migrations"), 9);
  assert_int_equal(qi("SELECT count(*) FROM zm_schema_migrations"), 1);
  close_all(st, &loop);
}

/* The Go service's migrations, as they would have left a database. */
static const char *GO_DB =
    "CREATE TABLE schema_migrations (version TEXT PRIMARY KEY,"
    " applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW());"
    "CREATE TABLE managed_identities (ziti_identity_id TEXT PRIMARY KEY,"
    " identity_id UUID NOT NULL, identity_type SMALLINT NOT NULL,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), ziti_service_id TEXT,"
    " workload_id UUID, agent_id UUID, environment_id UUID);"
    "CREATE INDEX idx_managed_identity_id ON managed_identities"
    " (identity_id);"
    "CREATE TABLE service_identities (ziti_identity_id TEXT PRIMARY KEY,"
    " service_type SMALLINT NOT NULL, lease_expires_at TIMESTAMPTZ NOT NULL,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());"
    "CREATE INDEX idx_service_lease ON service_identities (lease_expires_at);"
    "INSERT INTO schema_migrations (version) VALUES ('0001_init.sql'),"
    " ('0002_service_identities_real_name.sql'), ('0008_whatever.sql');"
    "INSERT INTO managed_identities VALUES ('m1',"
    " '11111111-1111-1111-1111-111111111111', 2,"
    " '2024-01-02 03:04:05.678+00', 'svc', NULL,"
    " '33333333-3333-3333-3333-333333333333', NULL),"
    " ('m2', '22222222-2222-2222-2222-222222222222', 1,"
    " '2024-01-02 03:04:05.123456+00', NULL, NULL, NULL, NULL);"
    "INSERT INTO service_identities VALUES ('s1', 3,"
    " '2030-01-01 00:00:00+00', '2024-01-01 00:00:00+00');";

typedef struct {
  int managed, service, pending;
  int64_t m1_created, s1_lease;
  char m1_agent[64];
} load_t;

static void ld_managed(const zm_managed_row_t *r, void *data) {
  load_t *l = data;
  l->managed++;
  if (strcmp(r->ziti_identity_id, "m1") == 0) {
    l->m1_created = r->created_at_ms;
    copy_s(l->m1_agent, r->agent_id);
  }
}
static void ld_service(const zm_service_row_t *r, void *data) {
  load_t *l = data;
  l->service++;
  l->s1_lease = r->lease_expires_ms;
}
static void ld_pending(const zm_pending_row_t *r, void *data) {
  (void)r;
  ((load_t *)data)->pending++;
}

static void test_takeover_go_db(void **state) {
  (void)state;
  NEED_PG();
  qx(GO_DB);
  char *cols0 = qs(COLS_SQL);
  char *mig0 = qs("SELECT version, applied_at FROM schema_migrations"
                  " ORDER BY version");
  char *idx0 = qs("SELECT indexdef FROM pg_indexes WHERE tablename IN"
                  " ('managed_identities', 'service_identities')"
                  " ORDER BY indexname");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  load_t l = {0};
  assert_int_equal(zm_store_load(st, ld_managed, ld_service, ld_pending, &l),
                   0);
  assert_int_equal(l.managed, 2);
  assert_int_equal(l.service, 1);
  assert_int_equal(l.pending, 0);
  assert_int_equal(l.m1_created, 1704164645678LL);
  assert_string_equal(l.m1_agent, "33333333-3333-3333-3333-333333333333");
  assert_int_equal(l.s1_lease, 1893456000000LL);
  char *cols1 = qs(COLS_SQL);
  char *mig1 = qs("SELECT version, applied_at FROM schema_migrations"
                  " ORDER BY version");
  char *idx1 = qs("SELECT indexdef FROM pg_indexes WHERE tablename IN"
                  " ('managed_identities', 'service_identities')"
                  " ORDER BY indexname");
  assert_string_equal(cols0, cols1);
  assert_string_equal(mig0, mig1);
  assert_string_equal(idx0, idx1);
  free(cols0);
  free(cols1);
  free(mig0);
  free(mig1);
  free(idx0);
  free(idx1);
  assert_int_equal(qi("SELECT count(*) FROM zm_schema_migrations"), 1);
  /* and the service writes the taken-over tables */
  zm_store_op_t op = put_managed("m3", UUID1);
  assert_int_equal(submit1(&loop, st, &op, 1), 0);
  assert_int_equal(qi("SELECT count(*) FROM managed_identities"), 3);
  close_all(st, &loop);
}

static void test_partial_go_db_refused(void **state) {
  (void)state;
  NEED_PG();
  /* An older Go schema (no agent_id): refused, nothing altered. */
  qx("CREATE TABLE managed_identities (ziti_identity_id TEXT PRIMARY KEY,"
     " identity_id UUID NOT NULL, identity_type SMALLINT NOT NULL,"
     " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());"
     "CREATE TABLE service_identities (ziti_identity_id TEXT PRIMARY KEY,"
     " service_type SMALLINT NOT NULL, lease_expires_at TIMESTAMPTZ NOT"
     " NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW())");
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_config_t cfg = {.url = url()};
  zm_store_t *st = NULL;
  assert_int_equal(zm_store_open(&st, &loop, &cfg), ZM_E_STORE);
  assert_null(st);
  assert_int_equal(qi("SELECT count(*) FROM information_schema.columns"
                      " WHERE table_name = 'managed_identities'"),
                   4);
  assert_int_equal(qi("SELECT count(*) FROM pg_tables WHERE tablename ="
                      " 'zm_schema_migrations'"),
                   0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ==== ops ================================================================= */

static void test_ops(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);

  /* PUT_MANAGED: insert, then replace all columns; a change each time. */
  zm_store_op_t m = put_managed("m1", UUID1);
  m.managed.agent_id = UUID2;
  m.managed.ziti_service_id = "svc-1";
  assert_int_equal(submit1(&loop, st, &m, 1), 0);
  m.managed.identity_id = UUID2;
  m.managed.agent_id = NULL;
  m.managed.identity_type = 5;
  assert_int_equal(submit1(&loop, st, &m, 1), 0);
  char *row = qs("SELECT identity_id, identity_type, zm_ms(created_at),"
                 " ziti_service_id, agent_id FROM managed_identities");
  assert_string_equal(row, "22222222-2222-2222-2222-222222222222|5|"
                           "1700000000123|svc-1|NULL\n");
  free(row);
  assert_int_equal(qi("SELECT count(*) FROM identity_changes WHERE"
                      " ziti_identity_id = 'm1'"),
                   2);
  /* get_managed / list_managed */
  rows_t r = {0};
  zm_store_get_managed(st, "m1", on_managed, &r);
  run_until(&loop, &r.done, 5000);
  assert_int_equal(r.err, 0);
  assert_int_equal(r.n, 1);
  assert_string_equal(r.first_buf[0], UUID2);
  assert_string_equal(r.first_buf[1], "svc-1");
  assert_string_equal(r.first_buf[3], "NULL");
  assert_int_equal(r.first.identity_type, 5);
  assert_int_equal(r.first.created_at_ms, 1700000000123LL);
  memset(&r, 0, sizeof r);
  zm_store_get_managed(st, "nope", on_managed, &r);
  run_until(&loop, &r.done, 5000);
  assert_int_equal(r.n, 0);
  zm_store_op_t m2 = put_managed("m2", UUID1), m3 = put_managed("m3", UUID1);
  m3.managed.identity_type = 5;
  zm_store_op_t two[2] = {m2, m3};
  assert_int_equal(submit1(&loop, st, two, 2), 0);
  memset(&r, 0, sizeof r);
  zm_store_list_managed(st, 0, "m1", 10, on_managed, &r);
  run_until(&loop, &r.done, 5000);
  assert_int_equal(r.n, 2);
  assert_string_equal(r.ids[0], "m2");
  assert_string_equal(r.ids[1], "m3");
  memset(&r, 0, sizeof r);
  zm_store_list_managed(st, 5, "", 1, on_managed, &r);
  run_until(&loop, &r.done, 5000);
  assert_int_equal(r.n, 1);
  assert_string_equal(r.ids[0], "m1");

  /* PUT_SERVICE, EXTEND_LEASE (max), NOT_FOUND */
  zm_store_op_t s = put_service("s1", 5000);
  assert_int_equal(submit1(&loop, st, &s, 1), 0);
  zm_store_op_t e = {.kind = ZM_STORE_EXTEND_LEASE, .id = "s1", .ms = 9000};
  assert_int_equal(submit1(&loop, st, &e, 1), 0);
  e.ms = 7000; /* never shortens */
  assert_int_equal(submit1(&loop, st, &e, 1), 0);
  assert_int_equal(qi("SELECT zm_ms(lease_expires_at) FROM"
                      " service_identities WHERE ziti_identity_id = 's1'"),
                   9000);
  e.id = "nope";
  assert_int_equal(submit1(&loop, st, &e, 1), ZM_E_NOT_FOUND);
  /* a "never" lease round-trips as INT64_MAX */
  s = put_service("forever", INT64_MAX);
  assert_int_equal(submit1(&loop, st, &s, 1), 0);
  assert_int_equal(qi("SELECT zm_ms(lease_expires_at) FROM"
                      " service_identities WHERE ziti_identity_id ="
                      " 'forever'"),
                   INT64_MAX);

  /* FLUSH_LEASES: many ids, quotes, duplicates, missing rows skipped */
  zm_store_op_t s2 = put_service("we\"ird\\id,{x}", 100);
  assert_int_equal(submit1(&loop, st, &s2, 1), 0);
  const char *ids[] = {"s1", "we\"ird\\id,{x}", "missing", "s1"};
  int64_t mss[] = {20000, 300, 5, 25000};
  zm_store_op_t f = {
      .kind = ZM_STORE_FLUSH_LEASES, .ids = ids, .mss = mss, .n = 4};
  assert_int_equal(submit1(&loop, st, &f, 1), 0);
  assert_int_equal(qi("SELECT zm_ms(lease_expires_at) FROM"
                      " service_identities WHERE ziti_identity_id = 's1'"),
                   25000);
  assert_int_equal(qi("SELECT zm_ms(lease_expires_at) FROM"
                      " service_identities WHERE ziti_identity_id ="
                      " E'we\"ird\\\\id,{x}'"),
                   300);

  /* PENDING: put, duplicate name / agent -> EXISTS, set id, del */
  zm_store_op_t p = {.kind = ZM_STORE_PUT_PENDING};
  p.pending.name = "p1";
  p.pending.kind = ZM_PENDING_AGENT;
  p.pending.type = 4;
  p.pending.agent_id = "agent-1";
  p.pending.created_at_ms = 1000;
  p.pending.resolve_after_ms = 2000;
  assert_int_equal(submit1(&loop, st, &p, 1), 0);
  assert_int_equal(submit1(&loop, st, &p, 1), ZM_E_EXISTS);
  p.pending.name = "p2"; /* same agent */
  assert_int_equal(submit1(&loop, st, &p, 1), ZM_E_EXISTS);
  p.pending.agent_id = NULL;
  assert_int_equal(submit1(&loop, st, &p, 1), 0);
  zm_store_op_t sp = {
      .kind = ZM_STORE_SET_PENDING_ID, .name = "p1", .id = "z1"};
  assert_int_equal(submit1(&loop, st, &sp, 1), 0);
  sp.name = "nope";
  assert_int_equal(submit1(&loop, st, &sp, 1), ZM_E_NOT_FOUND);
  assert_int_equal(qi("SELECT count(*) FROM pending_identities WHERE"
                      " ziti_identity_id = 'z1'"),
                   1);
  zm_store_op_t dp = {.kind = ZM_STORE_DEL_PENDING, .name = "p2"};
  assert_int_equal(submit1(&loop, st, &dp, 1), 0);
  assert_int_equal(submit1(&loop, st, &dp, 1), 0); /* no row = ok */

  /* claim_pending: due and unclaimed only, then claimed */
  rows_t pr = {0};
  zm_store_claim_pending(st, 1999, 10000, 10, on_pending, &pr);
  run_until(&loop, &pr.done, 5000);
  assert_int_equal(pr.n, 0);
  memset(&pr, 0, sizeof pr);
  zm_store_claim_pending(st, 2000, 10000, 10, on_pending, &pr);
  run_until(&loop, &pr.done, 5000);
  assert_int_equal(pr.n, 1);
  assert_string_equal(pr.ids[0], "p1");
  assert_int_equal(pr.ms[0], 2000);
  memset(&pr, 0, sizeof pr);
  zm_store_claim_pending(st, 9999, 20000, 10, on_pending, &pr);
  run_until(&loop, &pr.done, 5000);
  assert_int_equal(pr.n, 0); /* claimed until 10000 */
  memset(&pr, 0, sizeof pr);
  zm_store_claim_pending(st, 10000, 20000, 10, on_pending, &pr);
  run_until(&loop, &pr.done, 5000);
  assert_int_equal(pr.n, 1);

  /* RETIRE_MANAGED: mapping -> tombstone + change; NOT_FOUND after */
  long long ch0 = qi("SELECT count(*) FROM identity_changes");
  zm_store_op_t rm = {.kind = ZM_STORE_RETIRE_MANAGED, .id = "m1", .ms = 50000};
  rm.tomb.kind = ZM_TOMB_MANAGED;
  rm.tomb.next_try_ms = 40000;
  rm.tomb.created_at_ms = 30000;
  assert_int_equal(submit1(&loop, st, &rm, 1), 0);
  assert_int_equal(submit1(&loop, st, &rm, 1), ZM_E_NOT_FOUND);
  assert_int_equal(qi("SELECT count(*) FROM identity_changes"), ch0 + 1);
  char *tomb = qs("SELECT kind, type, attempts, zm_ms(next_try_at),"
                  " zm_ms(claimed_until), zm_ms(created_at) FROM"
                  " deleting_identities WHERE ziti_identity_id = 'm1'");
  assert_string_equal(tomb, "2|5|0|40000|50000|30000\n");
  free(tomb);
  assert_int_equal(qi("SELECT count(*) FROM managed_identities WHERE"
                      " ziti_identity_id = 'm1'"),
                   0);

  /* RETIRE_SERVICE: guarded by the lease */
  zm_store_op_t rs = {
      .kind = ZM_STORE_RETIRE_SERVICE, .id = "s1", .ms = 70000, .ms2 = 24999};
  rs.tomb.kind = ZM_TOMB_SERVICE;
  rs.tomb.next_try_ms = 60000;
  rs.tomb.created_at_ms = 60000;
  assert_int_equal(submit1(&loop, st, &rs, 1), ZM_E_NOT_FOUND); /* 25000 */
  rs.ms2 = 25000;
  assert_int_equal(submit1(&loop, st, &rs, 1), 0);
  assert_int_equal(submit1(&loop, st, &rs, 1), ZM_E_NOT_FOUND);
  rs.id = "forever";
  rs.ms2 = INT64_MAX; /* unconditionally */
  assert_int_equal(submit1(&loop, st, &rs, 1), 0);
  assert_int_equal(qi("SELECT type FROM deleting_identities WHERE"
                      " ziti_identity_id = 's1'"),
                   3);

  /* PUT_TOMB (existing = ok, untouched), DEFER_TOMB, claim_tombs, DEL */
  zm_store_op_t pt = {.kind = ZM_STORE_PUT_TOMB, .ms = 1};
  pt.tomb.ziti_identity_id = "orphan";
  pt.tomb.kind = ZM_TOMB_ORPHAN;
  pt.tomb.next_try_ms = 100;
  pt.tomb.created_at_ms = 100;
  assert_int_equal(submit1(&loop, st, &pt, 1), 0);
  pt.tomb.next_try_ms = 999;
  assert_int_equal(submit1(&loop, st, &pt, 1), 0);
  assert_int_equal(qi("SELECT zm_ms(next_try_at) FROM deleting_identities"
                      " WHERE ziti_identity_id = 'orphan'"),
                   100);
  rows_t tr = {0};
  zm_store_claim_tombs(st, 100000, 200000, 10, on_tombs, &tr);
  run_until(&loop, &tr.done, 5000);
  assert_int_equal(tr.err, 0);
  assert_int_equal(tr.n, 4); /* orphan, m1, s1, forever: oldest first */
  assert_string_equal(tr.ids[0], "orphan");
  assert_int_equal(tr.kinds[0], ZM_TOMB_ORPHAN);
  assert_string_equal(tr.ids[1], "m1");
  memset(&tr, 0, sizeof tr);
  zm_store_claim_tombs(st, 150000, 300000, 10, on_tombs, &tr);
  run_until(&loop, &tr.done, 5000);
  assert_int_equal(tr.n, 0); /* all claimed until 200000 */
  zm_store_op_t dt = {
      .kind = ZM_STORE_DEFER_TOMB, .id = "orphan", .ms = 160000};
  assert_int_equal(submit1(&loop, st, &dt, 1), 0);
  dt.id = "nope";
  assert_int_equal(submit1(&loop, st, &dt, 1), 0);
  memset(&tr, 0, sizeof tr);
  zm_store_claim_tombs(st, 160000, 300000, 10, on_tombs, &tr);
  run_until(&loop, &tr.done, 5000);
  assert_int_equal(tr.n, 1); /* released and due again */
  assert_string_equal(tr.ids[0], "orphan");
  assert_int_equal(qi("SELECT attempts FROM deleting_identities WHERE"
                      " ziti_identity_id = 'orphan'"),
                   1);
  zm_store_op_t del = {.kind = ZM_STORE_DEL_TOMB, .id = "orphan"};
  assert_int_equal(submit1(&loop, st, &del, 1), 0);
  assert_int_equal(submit1(&loop, st, &del, 1), 0);
  assert_int_equal(qi("SELECT count(*) FROM deleting_identities"), 3);

  /* changes: seq > after, or recent; ascending */
  typedef struct {
    int done;
    size_t n;
    int64_t seq[8];
    char id[8][16];
  } ch_t;
  ch_t ch = {0};
  zm_store_changes_cb on_ch = NULL;
  (void)on_ch;
  close_all(st, &loop);
  (void)ch;
}

/* Bad input fails its own unit only; the rest of the group commits. */
static void test_group_errors(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  zm_store_op_t p = {.kind = ZM_STORE_PUT_PENDING};
  p.pending.name = "dup";
  p.pending.created_at_ms = p.pending.resolve_after_ms = 1;
  assert_int_equal(submit1(&loop, st, &p, 1), 0);

  enum { N = 9 };
  res_t r[N];
  memset(r, 0, sizeof r);
  char names[N][16];
  for (int i = 0; i < N; i++)
    snprintf(names[i], sizeof names[i], "g%d", i);
  for (int i = 0; i < N; i++) {
    zm_store_op_t ops[2];
    ops[0] = put_managed(names[i], UUID1);
    ops[1] = put_service(names[i], 1000);
    size_t n = 2;
    if (i == 1)
      ops[0].managed.identity_id = "not-a-uuid"; /* INVAL */
    if (i == 3) {
      ops[1] = p; /* duplicate pending name: EXISTS, and ops[0] undone */
    }
    if (i == 5) {
      ops[1].kind = ZM_STORE_EXTEND_LEASE; /* no such service: NOT_FOUND */
      ops[1].id = "missing";
      ops[1].ms = 5;
    }
    if (i == 7)
      ops[0].managed.workload_id = "zzz"; /* INVAL */
    zm_store_submit(st, ops, n, on_unit, &r[i]);
  }
  int all = 0;
  while (!all) {
    uv_run(&loop, UV_RUN_ONCE);
    all = 1;
    for (int i = 0; i < N; i++)
      all &= r[i].done == 1;
  }
  for (int i = 0; i < N; i++) {
    int want = i == 1 || i == 7 ? ZM_E_INVAL
               : i == 3         ? ZM_E_EXISTS
               : i == 5         ? ZM_E_NOT_FOUND
                                : 0;
    assert_int_equal(r[i].err, want);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM managed_identities WHERE"
             " ziti_identity_id = '%s'",
             names[i]);
    assert_int_equal(qi(sql), want == 0 ? 1 : 0);
  }
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.failed_groups, 0);
  close_all(st, &loop);
}

/* Many units submitted in one turn: few transactions, all committed, in
 * order (a read submitted after them sees them all). */
static void test_group_commit(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  enum { N = 3000 };
  static res_t r[N];
  memset(r, 0, sizeof r);
  for (int i = 0; i < N; i++) {
    char id[32];
    snprintf(id, sizeof id, "svc-%05d", i);
    zm_store_op_t ops[2] = {
        put_service(id, 1000 + i),
        {.kind = ZM_STORE_EXTEND_LEASE, .id = id, .ms = 5000 + i}};
    zm_store_submit(st, ops, 2, on_unit, &r[i]);
  }
  rows_t rd = {0};
  zm_store_claim_expired(st, 5000 + N, 1, 2, 64, on_tombs, &rd);
  zm_store_stats_t stats;
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.queued, N);
  run_until(&loop, &rd.done, 30000);
  for (int i = 0; i < N; i++) {
    assert_int_equal(r[i].done, 1);
    assert_int_equal(r[i].err, 0);
  }
  assert_int_equal(rd.err, 0);
  assert_int_equal(rd.n, 64);
  assert_string_equal(rd.ids[0], "svc-00000");
  assert_int_equal(rd.kinds[0], ZM_TOMB_SERVICE);
  assert_int_equal(rd.types[0], 3);
  assert_int_equal(rd.ms[0], 1);
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.units, N);
  assert_true(stats.groups < 20);
  assert_int_equal(stats.queued, 0);
  assert_int_equal(qi("SELECT count(*) FROM service_identities"), N - 64);
  assert_int_equal(qi("SELECT count(*) FROM deleting_identities"), 64);

  /* FLUSH_LEASES of every id in one statement */
  static const char *ids[N];
  static int64_t mss[N];
  static char buf[N][32];
  for (int i = 0; i < N; i++) {
    snprintf(buf[i], sizeof buf[i], "svc-%05d", i);
    ids[i] = buf[i];
    mss[i] = 100000;
  }
  zm_store_op_t f = {
      .kind = ZM_STORE_FLUSH_LEASES, .ids = ids, .mss = mss, .n = N};
  assert_int_equal(submit1(&loop, st, &f, 1), 0);
  assert_int_equal(qi("SELECT count(*) FROM service_identities WHERE"
                      " zm_ms(lease_expires_at) = 100000"),
                   N - 64);
  close_all(st, &loop);
}

/* Two stores on one database claim concurrently: no id twice. The claims go
 * in rounds - two on store a and one on store b issued together, all three
 * in flight at once, the next round once all three answered - so that every
 * round overlaps claims of both stores however the machine schedules the
 * connections (a free-running a could take every row before b's first
 * answer on a loaded machine). */
typedef struct {
  zm_store_t *st;
  int inflight;
  size_t got, last;
  char (*seen)[16];
  size_t *nseen;
} claimer_t;

static void on_claimed(int err, const zm_tomb_row_t *rows, size_t n,
                       void *data) {
  claimer_t *c = data;
  assert_int_equal(err, 0);
  for (size_t i = 0; i < n; i++)
    snprintf(c->seen[(*c->nseen)++], 16, "%s", rows[i].ziti_identity_id);
  c->got += n;
  c->last += n;
  c->inflight--;
}

static void claim(claimer_t *c) {
  c->inflight++;
  zm_store_claim_expired(c->st, 1000000, 1, 2, 37, on_claimed, c);
}

static int cmp16(const void *a, const void *b) { return strcmp(a, b); }

static void test_claim_concurrent(void **state) {
  (void)state;
  NEED_PG();
  enum { N = 2000 };
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *a = open_store(&loop), *b = open_store(&loop);
  qx("INSERT INTO service_identities SELECT 'x' || g, 1,"
     " zm_ts(g), now() FROM generate_series(1, 2000) g");
  static char seen[N + 100][16];
  size_t nseen = 0;
  claimer_t ca = {a, 0, 0, 0, seen, &nseen}, cb = {b, 0, 0, 0, seen, &nseen};
  for (int round = 0; round < 100; round++) {
    ca.last = cb.last = 0;
    claim(&ca);
    claim(&cb);
    claim(&ca); /* a second stream on a */
    while (ca.inflight > 0 || cb.inflight > 0)
      uv_run(&loop, UV_RUN_ONCE);
    if (ca.last == 0 && cb.last == 0)
      break;
  }
  assert_int_equal(nseen, N);
  qsort(seen, nseen, 16, cmp16);
  for (size_t i = 1; i < nseen; i++)
    assert_string_not_equal(seen[i - 1], seen[i]);
  assert_true(ca.got > 0 && cb.got > 0);
  assert_int_equal(qi("SELECT count(*) FROM deleting_identities"), N);
  zm_store_close(a);
  close_all(b, &loop);
}

/* Two stores flush overlapping sets of leases at once, in opposite orders,
 * many times: row locks are taken in one order, so neither deadlocks. */
static void test_flush_concurrent(void **state) {
  (void)state;
  NEED_PG();
  enum { N = 4000, ROUNDS = 8 };
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *a = open_store(&loop), *b = open_store(&loop);
  qx("INSERT INTO service_identities SELECT 'f' || lpad(g::text, 5, '0'), 1,"
     " zm_ts(g), now() FROM generate_series(0, 3999) g");
  static char buf[N][16];
  static const char *fwd[N], *rev[N];
  static int64_t ms_a[N], ms_b[N];
  for (int i = 0; i < N; i++) {
    snprintf(buf[i], sizeof buf[i], "f%05d", i);
    fwd[i] = buf[i];
    rev[N - 1 - i] = buf[i];
  }
  for (int r = 0; r < ROUNDS; r++) {
    for (int i = 0; i < N; i++) {
      ms_a[i] = 1000000 + r * 10 + 1;
      ms_b[i] = 1000000 + r * 10 + 2;
    }
    zm_store_op_t fa = {
        .kind = ZM_STORE_FLUSH_LEASES, .ids = fwd, .mss = ms_a, .n = N};
    zm_store_op_t fb = {
        .kind = ZM_STORE_FLUSH_LEASES, .ids = rev, .mss = ms_b, .n = N};
    res_t ra = {0}, rb = {0};
    zm_store_submit(a, &fa, 1, on_unit, &ra);
    zm_store_submit(b, &fb, 1, on_unit, &rb);
    run_until(&loop, &ra.done, 30000);
    run_until(&loop, &rb.done, 30000);
    assert_int_equal(ra.err, 0);
    assert_int_equal(rb.err, 0);
  }
  /* the later, higher lease won everywhere and nothing went backwards */
  assert_int_equal(qi("SELECT count(*) FROM service_identities WHERE"
                      " zm_ms(lease_expires_at) = 1000072"),
                   N);
  zm_store_close(a);
  close_all(b, &loop);
}

/* ==== heartbeat and changes ================================================
 */

typedef struct {
  int done, err;
  int64_t now, resumed;
} beat_t;

static void on_beat(int err, int64_t now, int64_t resumed, void *data) {
  beat_t *b = data;
  b->done = 1;
  b->err = err;
  b->now = now;
  b->resumed = resumed;
}

static beat_t beat(uv_loop_t *loop, zm_store_t *st, int64_t gap) {
  beat_t b = {0};
  zm_store_heartbeat(st, 42 /* ignored */, gap, on_beat, &b);
  run_until(loop, &b.done, 5000);
  assert_int_equal(b.err, 0);
  return b;
}

static void test_heartbeat(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  int64_t db_now = qi("SELECT zm_ms(clock_timestamp())");
  beat_t b1 = beat(&loop, st, 300);
  assert_true(b1.now >= db_now && b1.now < db_now + 5000);
  assert_int_equal(b1.resumed, b1.now); /* the first beat ever */
  beat_t b2 = beat(&loop, st, 300);
  assert_int_equal(b2.resumed, b1.resumed); /* no gap */
  assert_true(b2.now >= b1.now);
  usleep(500 * 1000);
  beat_t b3 = beat(&loop, st, 300);
  assert_int_equal(b3.resumed, b3.now); /* an outage: resumed now */
  assert_true(b3.now >= b2.now + 500);
  close_all(st, &loop);
}

typedef struct {
  int done, err;
  size_t n;
  int64_t seq[16];
  char id[16][16];
} changes_t;

static void on_changes(int err, const int64_t *seqs, const char *const *ids,
                       size_t n, void *data) {
  changes_t *c = data;
  c->done = 1;
  c->err = err;
  c->n = n;
  for (size_t i = 0; i < n && i < 16; i++) {
    c->seq[i] = seqs[i];
    snprintf(c->id[i], 16, "%s", ids[i]);
  }
}

static void test_changes(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  zm_store_op_t ops[3] = {put_managed("c1", UUID1),
                          put_managed("c2", UUID1),
                          {.kind = ZM_STORE_RETIRE_MANAGED, .id = "c1"}};
  /* submitted together with the read: the read sees them */
  res_t r = {0};
  zm_store_submit(st, ops, 3, on_unit, &r);
  changes_t c = {0};
  zm_store_changes(st, 0, INT64_MAX, 10, on_changes, &c);
  run_until(&loop, &c.done, 5000);
  assert_int_equal(r.done, 1);
  assert_int_equal(r.err, 0);
  assert_int_equal(c.err, 0);
  assert_int_equal(c.n, 3);
  assert_string_equal(c.id[0], "c1");
  assert_string_equal(c.id[1], "c2");
  assert_string_equal(c.id[2], "c1");
  assert_true(c.seq[0] < c.seq[1] && c.seq[1] < c.seq[2]);
  int64_t last = c.seq[2];
  memset(&c, 0, sizeof c);
  zm_store_changes(st, last, INT64_MAX, 10, on_changes, &c);
  run_until(&loop, &c.done, 5000);
  assert_int_equal(c.n, 0);
  /* recorded at or after since_ms: reported even below after_seq */
  memset(&c, 0, sizeof c);
  zm_store_changes(st, INT64_MAX, 0, 2, on_changes, &c);
  run_until(&loop, &c.done, 5000);
  assert_int_equal(c.n, 2);
  close_all(st, &loop);
}

/* ==== the database restarts =================================================
 */

static void pg_ctl(const char *args) {
  const char *bin = getenv("ZM_TEST_PG_BIN"), *data = getenv("ZM_TEST_PG_DATA");
  const char *as = getenv("ZM_TEST_PG_CTL"), *log = getenv("ZM_TEST_PG_LOG");
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "%s '%s/pg_ctl' -D '%s' -l '%s' -w %s >/dev/null",
           as ? as : "", bin, data, log ? log : "/dev/null", args);
  assert_int_equal(system(cmd), 0);
}

static void test_restart(void **state) {
  (void)state;
  NEED_PG();
  if (getenv("ZM_TEST_PG_BIN") == NULL || getenv("ZM_TEST_PG_DATA") == NULL)
    skip();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  zm_store_op_t op = put_service("before", 1);
  assert_int_equal(submit1(&loop, st, &op, 1), 0);

  /* In flight: sent (one loop turn), then the server goes away. */
  res_t inflight = {0};
  op = put_service("inflight", 1);
  zm_store_submit(st, &op, 1, on_unit, &inflight);
  uv_run(&loop, UV_RUN_NOWAIT);
  pg_ctl("restart -m fast");
  /* Queued while every connection is dead (not yet noticed). */
  res_t queued[5];
  memset(queued, 0, sizeof queued);
  char qid[5][16];
  for (int i = 0; i < 5; i++) {
    snprintf(qid[i], sizeof qid[i], "queued%d", i);
    op = put_service(qid[i], 1);
    zm_store_submit(st, &op, 1, on_unit, &queued[i]);
  }
  run_until(&loop, &queued[4].done, 10000);
  run_until(&loop, &inflight.done, 10000);
  assert_true(inflight.err == 0 || inflight.err == ZM_E_STORE);
  for (int i = 0; i < 5; i++) {
    assert_int_equal(queued[i].done, 1);
    assert_true(queued[i].err == 0 || queued[i].err == ZM_E_STORE);
  }
  /* While reconnecting (or once reconnected): never hangs. */
  zm_store_stats_t stats;
  for (int tries = 0; tries < 200; tries++) {
    zm_store_get_stats(st, &stats);
    if (stats.reconnects >= 3)
      break;
    res_t r = {0};
    op = put_service("probe", 1);
    zm_store_submit(st, &op, 1, on_unit, &r);
    run_until(&loop, &r.done, 10000);
    assert_true(r.err == 0 || r.err == ZM_E_STORE);
    usleep(50 * 1000);
  }
  zm_store_get_stats(st, &stats);
  assert_int_equal(stats.reconnects, 3);
  /* Back: new units succeed, and what was acknowledged is there. */
  op = put_service("after", 1);
  assert_int_equal(submit1(&loop, st, &op, 1), 0);
  rows_t rd = {0};
  zm_store_claim_expired(st, 10, 1, 2, 64, on_tombs, &rd);
  run_until(&loop, &rd.done, 5000);
  assert_int_equal(rd.err, 0);
  int have_before = 0, have_after = 0, have_inflight = 0;
  for (size_t i = 0; i < rd.n; i++) {
    have_before |= strcmp(rd.ids[i], "before") == 0;
    have_after |= strcmp(rd.ids[i], "after") == 0;
    have_inflight |= strcmp(rd.ids[i], "inflight") == 0;
    for (int k = 0; k < 5; k++)
      if (strcmp(rd.ids[i], qid[k]) == 0)
        assert_int_equal(queued[k].err, 0);
  }
  assert_true(have_before && have_after);
  if (inflight.err == 0)
    assert_true(have_inflight);

  /* The server stopped: work fails promptly with ZM_E_STORE. */
  pg_ctl("stop -m fast");
  for (int i = 0; i < 3; i++) {
    res_t r = {0};
    op = put_service("down", 1);
    uint64_t t0 = uv_hrtime();
    zm_store_submit(st, &op, 1, on_unit, &r);
    run_until(&loop, &r.done, 5000);
    assert_int_equal(r.err, ZM_E_STORE);
    assert_true(uv_hrtime() - t0 < 2000000000ull);
    rows_t g = {0};
    zm_store_get_managed(st, "x", on_managed, &g);
    run_until(&loop, &g.done, 5000);
    assert_int_equal(g.err, ZM_E_STORE);
  }
  pg_ctl("start");
  zm_store_close(st); /* does not wait for the reconnection */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Close commits what is queued. */
static void test_close_drains(void **state) {
  (void)state;
  NEED_PG();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_store_t *st = open_store(&loop);
  res_t r[50];
  memset(r, 0, sizeof r);
  for (int i = 0; i < 50; i++) {
    char id[16];
    snprintf(id, sizeof id, "d%d", i);
    zm_store_op_t op = put_service(id, 1);
    zm_store_submit(st, &op, 1, on_unit, &r[i]);
    if (i == 10)
      uv_run(&loop, UV_RUN_NOWAIT); /* some in flight */
  }
  changes_t c = {0};
  zm_store_changes(st, 0, 0, 1, on_changes, &c);
  close_all(st, &loop);
  for (int i = 0; i < 50; i++) {
    assert_int_equal(r[i].done, 1);
    assert_int_equal(r[i].err, 0);
  }
  assert_int_equal(c.done, 1);
  assert_int_equal(qi("SELECT count(*) FROM service_identities"), 50);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_fresh_schema, setup, teardown),
      cmocka_unit_test_setup_teardown(test_takeover_go_db, setup, teardown),
      cmocka_unit_test_setup_teardown(test_partial_go_db_refused, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_ops, setup, teardown),
      cmocka_unit_test_setup_teardown(test_group_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_group_commit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_claim_concurrent, setup, teardown),
      cmocka_unit_test_setup_teardown(test_flush_concurrent, setup, teardown),
      cmocka_unit_test_setup_teardown(test_heartbeat, setup, teardown),
      cmocka_unit_test_setup_teardown(test_changes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_close_drains, setup, teardown),
      cmocka_unit_test_setup_teardown(test_restart, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
