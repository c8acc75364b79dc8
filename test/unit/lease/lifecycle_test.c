/* lifecycle_test.c - the lifecycle (src/lease/lifecycle.c) against a real
 * SQLite store in a temp dir, with no controller: its transition table, the
 * memory-first refresh and its flush, the outage rule's start-up hold, the
 * agent lock, and that a delete without an answer stays DELETING. */
#include "zm/lifecycle.h"
#include "zm/zm.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

typedef struct {
  char dir[64];
  char path[96];
  uv_loop_t loop;
  zm_store_t *store;
  zm_index_t *index;
  zm_life_t *life;
  int ready;
} fx_t;

static void on_ready(void *data) { ((fx_t *)data)->ready = 1; }

static void run_until(fx_t *f, const int *flag, int want) {
  for (int i = 0; i < 5000 && *flag != want; i++)
    uv_run(&f->loop, UV_RUN_ONCE);
  assert_int_equal(*flag, want);
}

#define DEFAULT_TTL_MS 20000
static uint64_t setup_ttl_ms = DEFAULT_TTL_MS;

static int setup(void **state) {
  fx_t *f = calloc(1, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/zm-life-test-XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  snprintf(f->path, sizeof f->path, "%s/zm.db", f->dir);
  uv_loop_init(&f->loop);
  zm_store_config_t sc = {.path = f->path, .sync_full = 0};
  assert_int_equal(zm_store_open(&f->store, &f->loop, &sc), 0);
  f->index = zm_index_new();
  zm_life_config_t lc = {
      .lease_ttl_ms = setup_ttl_ms, .flush_ms = 20, .ziti_timeout_ms = 1000};
  f->life = zm_life_new(&f->loop, f->store, f->index, NULL, &lc);
  zm_life_start(f->life, on_ready, f);
  run_until(f, &f->ready, 1);
  *state = f;
  return 0;
}

static int stopped;
static void on_stopped(void *data) {
  (void)data;
  stopped = 1;
}

static int teardown(void **state) {
  fx_t *f = *state;
  stopped = 0;
  zm_life_stop(f->life, on_stopped, NULL);
  run_until(f, &stopped, 1);
  zm_store_close(f->store);
  uv_run(&f->loop, UV_RUN_DEFAULT);
  zm_life_free(f->life);
  zm_index_free(f->index);
  assert_int_equal(uv_loop_close(&f->loop), 0);
  char cmd[160];
  snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
  assert_int_equal(system(cmd), 0);
  free(f);
  return 0;
}

/* One value from the store file, through a second connection. */
static long long scalar(fx_t *f, const char *sql) {
  sqlite3 *db;
  assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
  sqlite3_stmt *st;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  long long v = -1;
  if (sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

typedef struct {
  int done, err;
} res_t;

static void on_res(int err, void *data) {
  res_t *r = data;
  r->err = err;
  r->done = 1;
}

static void test_edges(void **state) {
  (void)state;
  zm_life_state_t to;
  assert_true(zm_life_edge(ZM_LIFE_NONE, ZM_LIFE_T_INTENT, &to));
  assert_int_equal(to, ZM_LIFE_PENDING);
  assert_true(zm_life_edge(ZM_LIFE_PENDING, ZM_LIFE_T_COMMIT, &to));
  assert_int_equal(to, ZM_LIFE_LIVE);
  assert_true(zm_life_edge(ZM_LIFE_LIVE, ZM_LIFE_T_RETIRE, &to));
  assert_int_equal(to, ZM_LIFE_DELETING);
  assert_true(zm_life_edge(ZM_LIFE_DELETING, ZM_LIFE_T_DEFER, &to));
  assert_int_equal(to, ZM_LIFE_DELETING);
  assert_true(zm_life_edge(ZM_LIFE_DELETING, ZM_LIFE_T_BURY, &to));
  assert_int_equal(to, ZM_LIFE_GONE);
  /* what must never happen */
  assert_false(zm_life_edge(ZM_LIFE_DELETING, ZM_LIFE_T_COMMIT, NULL));
  assert_false(zm_life_edge(ZM_LIFE_LIVE, ZM_LIFE_T_ABANDON, NULL));
  assert_false(zm_life_edge(ZM_LIFE_GONE, ZM_LIFE_T_RETIRE, NULL));
  assert_false(zm_life_edge(ZM_LIFE_NONE, ZM_LIFE_T__COUNT, NULL));
  assert_string_equal(zm_life_state_name(ZM_LIFE_DELETING), "DELETING");
}

static void test_commit_extend_flush(void **state) {
  fx_t *f = *state;
  res_t r = {0};
  /* unknown to a store that is not shared: NOT_FOUND at once */
  assert_int_equal(zm_life_extend(f->life, "nope", on_res, &r), ZM_E_NOT_FOUND);
  zm_pending_row_t p = {.name = "svc-a", .kind = ZM_PENDING_SERVICE, .type = 1};
  zm_life_intent(f->life, &p, uv_now(&f->loop) + 1000, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  assert_int_equal(scalar(f, "SELECT count(*) FROM pending_identities"), 1);
  r.done = 0;
  zm_life_commit_service(f->life, "svc-a", "id-a", 1, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  assert_int_equal(scalar(f, "SELECT count(*) FROM pending_identities"), 0);
  long long before =
      scalar(f, "SELECT (julianday(lease_expires_at) - 2440587.5) * 86400000 "
                "FROM service_identities WHERE ziti_identity_id = 'id-a'");
  assert_true(before > 0);
  /* a refresh is answered from memory while the durable lease has more
   * than the margin left (20 s TTL, 7 s margin) ... */
  assert_int_equal(zm_life_extend(f->life, "id-a", on_res, &r), 0);
  assert_int_equal(zm_life_stats(f->life)->flushes, 0);
  /* ... and reaches the store once it raises the durable lease by a
   * granule (TTL / 10 = 2 s) */
  uv_sleep(2100);
  uv_update_time(&f->loop);
  assert_int_equal(zm_life_extend(f->life, "id-a", on_res, &r), 0);
  long long after = before;
  for (int i = 0; i < 200 && after < before + 2000; i++) {
    uv_run(&f->loop, UV_RUN_ONCE);
    after = scalar(f, "SELECT (julianday(lease_expires_at) - 2440587.5) * "
                      "86400000 FROM service_identities");
  }
  assert_true(after >= before + 2000);
  assert_true(zm_life_stats(f->life)->flushes >= 1);
  assert_int_equal(zm_life_stats(f->life)->extend_durable, 0);
}

static int setup_with_ttl(void **state, uint64_t ttl_ms) {
  setup_ttl_ms = ttl_ms;
  int rv = setup(state);
  setup_ttl_ms = DEFAULT_TTL_MS;
  return rv;
}

/* A service identity committed through INTENT and COMMIT, as an enrollment
 * leaves it. */
static void live_service(fx_t *f, const char *name, const char *id) {
  res_t r = {0};
  zm_pending_row_t p = {.name = name, .kind = ZM_PENDING_SERVICE, .type = 1};
  zm_life_intent(f->life, &p, uv_now(&f->loop) + 1000, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  r.done = 0;
  zm_life_commit_service(f->life, name, id, 1, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
}

static int setup_short_ttl(void **state) { return setup_with_ttl(state, 3000); }

/* A durable lease with less than the margin left is extended in the store,
 * not from memory: the answer waits for the store. */
static void test_short_lease_extends_durably(void **state) {
  fx_t *f = *state;
  res_t r = {0};
  live_service(f, "svc-s", "id-s");
  long long before =
      scalar(f, "SELECT (julianday(lease_expires_at) - 2440587.5) * 86400000 "
                "FROM service_identities WHERE ziti_identity_id = 'id-s'");
  uv_sleep(200);
  uv_update_time(&f->loop);
  r.done = 0;
  assert_int_equal(zm_life_extend(f->life, "id-s", on_res, &r), 1);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  long long after =
      scalar(f, "SELECT (julianday(lease_expires_at) - 2440587.5) * 86400000 "
                "FROM service_identities WHERE ziti_identity_id = 'id-s'");
  assert_true(after >= before + 150); /* durable before the answer */
  assert_int_equal(zm_life_stats(f->life)->extend_durable, 1);
  assert_int_equal(zm_life_stats(f->life)->extend_fast, 0);
}

static int setup_long_ttl(void **state) {
  return setup_with_ttl(state, 60ull * 24 * 3600 * 1000); /* 60 days */
}

/* The index keeps a refresh answered from memory as a 32-bit distance past
 * the durable lease (~49 days): a refresh further ahead than that is
 * extended in the store instead, and the next one, close again, is answered
 * from memory. */
static void test_far_refresh_extends_durably(void **state) {
  fx_t *f = *state;
  res_t r = {0};
  live_service(f, "svc-l", "id-l");
  /* the index knows a durable lease one day ahead (as after a TTL change):
   * well past the margin, but 59 days short of a new lease */
  zm_index_service_t *s = zm_index_lookup_service(f->index, "id-l", 4);
  assert_non_null(s);
  int64_t day = 24 * 3600 * 1000;
  zm_index_set_expires_ms(s, zm_life_now(f->life) + day);
  r.done = 0;
  assert_int_equal(zm_life_extend(f->life, "id-l", on_res, &r), 1);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  assert_int_equal(zm_life_stats(f->life)->extend_durable, 1);
  assert_int_equal(zm_life_stats(f->life)->extend_fast, 0);
  assert_ptr_equal(s, zm_index_lookup_service(f->index, "id-l", 4));
  assert_true(s->lease_expires_ms > zm_life_now(f->life) + 59 * day);
  assert_int_equal(zm_index_pending_ms(s), 0);
  /* close to the durable lease again: from memory */
  assert_int_equal(zm_life_extend(f->life, "id-l", on_res, &r), 0);
  assert_int_equal(zm_life_stats(f->life)->extend_fast, 1);
  assert_int_equal(zm_life_stats(f->life)->extend_durable, 1);
  assert_true(s->pending_delta_ms < 60000);
}

static void test_agent_lock(void **state) {
  fx_t *f = *state;
  res_t a = {0}, b = {0};
  zm_pending_row_t p1 = {
      .name = "agent-1", .kind = ZM_PENDING_AGENT, .type = 1, .agent_id = "A"};
  zm_pending_row_t p2 = {
      .name = "agent-2", .kind = ZM_PENDING_AGENT, .type = 1, .agent_id = "A"};
  zm_life_intent(f->life, &p1, uv_now(&f->loop) + 1000, on_res, &a);
  zm_life_intent(f->life, &p2, uv_now(&f->loop) + 1000, on_res, &b);
  run_until(f, &b.done, 1);
  run_until(f, &a.done, 1);
  assert_int_equal(a.err, 0);
  assert_int_equal(b.err, ZM_E_EXISTS);
  /* once the first is resolved the agent is free again */
  a.done = 0;
  zm_life_abandon(f->life, "agent-1", on_res, &a);
  run_until(f, &a.done, 1);
  b.done = 0;
  zm_life_intent(f->life, &p2, uv_now(&f->loop) + 1000, on_res, &b);
  run_until(f, &b.done, 1);
  assert_int_equal(b.err, 0);
}

static void test_delete_without_answer_stays_deleting(void **state) {
  fx_t *f = *state;
  res_t r = {0};
  zm_managed_row_t m = {.ziti_identity_id = "m-1",
                        .identity_id = "0b9ad0e0-1111-4222-8333-444455556666",
                        .identity_type = 1};
  zm_pending_row_t p = {.name = "agent-x", .kind = ZM_PENDING_AGENT, .type = 1};
  zm_life_intent(f->life, &p, uv_now(&f->loop) + 1000, on_res, &r);
  run_until(f, &r.done, 1);
  r.done = 0;
  zm_life_commit_managed(f->life, "agent-x", &m, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  zm_index_managed_t cm;
  assert_int_equal(zm_life_cached_managed(f->life, "m-1", &cm), 1);
  assert_string_equal(cm.identity_id, "0b9ad0e0-1111-4222-8333-444455556666");
  /* no controller: the DELETE cannot be answered */
  r.done = 0;
  zm_life_retire_managed(f->life, "m-1", on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_not_equal(r.err, 0);
  assert_int_equal(zm_life_cached_managed(f->life, "m-1", &cm), 0);
  assert_int_equal(scalar(f, "SELECT count(*) FROM managed_identities"), 0);
  assert_int_equal(scalar(f, "SELECT attempts FROM deleting_identities WHERE "
                             "ziti_identity_id = 'm-1'"),
                   1);
  /* retiring what is not mapped: NOT_FOUND, nothing recorded */
  r.done = 0;
  zm_life_retire_managed(f->life, "m-2", on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, ZM_E_NOT_FOUND);
  assert_int_equal(scalar(f, "SELECT count(*) FROM deleting_identities"), 1);
}

/* CONDEMN leads only from PENDING: a compensation that comes after the
 * commit did land (its answer lost) must not delete a recorded identity. */
static void test_condemn_needs_the_pending_record(void **state) {
  fx_t *f = *state;
  res_t r = {0};
  zm_managed_row_t m = {.ziti_identity_id = "m-c",
                        .identity_id = "0b9ad0e0-1111-4222-8333-444455556677",
                        .identity_type = 1};
  zm_pending_row_t p = {.name = "agent-c", .kind = ZM_PENDING_AGENT, .type = 1};
  zm_life_intent(f->life, &p, uv_now(&f->loop) + 1000, on_res, &r);
  run_until(f, &r.done, 1);
  r.done = 0;
  zm_life_commit_managed(f->life, "agent-c", &m, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, 0);
  r.done = 0;
  zm_life_condemn(f->life, "agent-c", "m-c", 1, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(r.err, ZM_E_NOT_FOUND);
  assert_int_equal(scalar(f, "SELECT count(*) FROM deleting_identities"), 0);
  assert_int_equal(scalar(f, "SELECT count(*) FROM managed_identities"), 1);
  zm_index_managed_t cm;
  assert_int_equal(zm_life_cached_managed(f->life, "m-c", &cm), 1);
  /* from PENDING it is a tombstone (no controller here: stays DELETING) */
  zm_pending_row_t q = {.name = "agent-d", .kind = ZM_PENDING_AGENT, .type = 1};
  r.done = 0;
  zm_life_intent(f->life, &q, uv_now(&f->loop) + 1000, on_res, &r);
  run_until(f, &r.done, 1);
  r.done = 0;
  zm_life_condemn(f->life, "agent-d", "m-d", 1, on_res, &r);
  run_until(f, &r.done, 1);
  assert_int_equal(scalar(f, "SELECT count(*) FROM pending_identities"), 0);
  assert_int_equal(scalar(f, "SELECT count(*) FROM deleting_identities WHERE "
                             "ziti_identity_id = 'm-d'"),
                   1);
}

static void test_no_collection_right_after_a_resume(void **state) {
  fx_t *f = *state;
  /* first start of this store: resumed now, so every lease lives TTL +
   * margin from now */
  assert_int_equal(zm_life_collect_cut(f->life), INT64_MIN);
  assert_false(zm_life_settled(f->life, 60000));
  assert_true(zm_life_settled(f->life, 0));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_edges),
      cmocka_unit_test_setup_teardown(test_commit_extend_flush, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_short_lease_extends_durably,
                                      setup_short_ttl, teardown),
      cmocka_unit_test_setup_teardown(test_far_refresh_extends_durably,
                                      setup_long_ttl, teardown),
      cmocka_unit_test_setup_teardown(test_agent_lock, setup, teardown),
      cmocka_unit_test_setup_teardown(test_delete_without_answer_stays_deleting,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_condemn_needs_the_pending_record,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_no_collection_right_after_a_resume,
                                      setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
