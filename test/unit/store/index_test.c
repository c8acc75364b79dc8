/* index_test.c - the in-memory identity index (src/store/index.c). The .c is
 * included so the tests can check the table invariants directly. */
#include "store/index.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include <cmocka.h>

/* Every occupied slot is reachable from its home slot without crossing an
 * empty one, count matches, and the load factor holds. */
static void check_table(const table_t *t) {
  size_t n = 0;
  for (size_t i = 0; i <= t->mask; i++) {
    if (t->tags[i] == 0) {
      assert_null(t->nodes[i]);
      continue;
    }
    n++;
    assert_non_null(t->nodes[i]);
    for (size_t j = t->tags[i] & t->mask; j != i; j = (j + 1) & t->mask)
      assert_int_not_equal(t->tags[j], 0);
  }
  assert_int_equal(n, t->count);
  assert_true(t->count * 4 <= (t->mask + 1) * 3);
}

static void test_put_lookup_replace_delete(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  assert_null(zm_index_lookup_managed(ix, "zid-1", 5));
  zm_index_put_managed(ix, "zid-1", 5, "ident-one", 9, 1, 1000);
  const zm_index_managed_t *m = zm_index_lookup_managed(ix, "zid-1", 5);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "ident-one");
  assert_int_equal(m->identity_id_len, 9);
  assert_int_equal(m->identity_type, 1);
  assert_int_equal(m->created_at_ms, 1000);
  /* The index keeps copies: the caller's buffers may change. */
  char key[8] = "zid-2", val[8] = "abc";
  zm_index_put_managed(ix, key, 5, val, 3, 2, 2000);
  memset(key, 'x', sizeof key);
  memset(val, 'y', sizeof val);
  m = zm_index_lookup_managed(ix, "zid-2", 5);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "abc");
  assert_int_equal(zm_index_managed_count(ix), 2);
  /* Replace: new values, same count. */
  zm_index_put_managed(ix, "zid-1", 5, "a-much-longer-identity-id", 25, 3, 7);
  m = zm_index_lookup_managed(ix, "zid-1", 5);
  assert_string_equal(m->identity_id, "a-much-longer-identity-id");
  assert_int_equal(m->identity_type, 3);
  assert_int_equal(m->created_at_ms, 7);
  assert_int_equal(zm_index_managed_count(ix), 2);
  /* Delete. */
  assert_int_equal(zm_index_del_managed(ix, "zid-1", 5), 1);
  assert_int_equal(zm_index_del_managed(ix, "zid-1", 5), 0);
  assert_null(zm_index_lookup_managed(ix, "zid-1", 5));
  assert_non_null(zm_index_lookup_managed(ix, "zid-2", 5));
  assert_int_equal(zm_index_managed_count(ix), 1);

  /* Service entries: mutable, replaced in place (same pointer). */
  zm_index_service_t *s = zm_index_put_service(ix, "zid-1", 5, 3, 5000, 100);
  assert_int_equal(s->state, ZM_LEASE_LIVE);
  s->state = ZM_LEASE_DELETING;
  s->lease_expires_ms = 6000;
  zm_index_service_t *s2 = zm_index_lookup_service(ix, "zid-1", 5);
  assert_ptr_equal(s, s2);
  assert_int_equal(s2->lease_expires_ms, 6000);
  assert_int_equal(s2->state, ZM_LEASE_DELETING);
  zm_index_service_t *s3 = zm_index_put_service(ix, "zid-1", 5, 4, 9000, 200);
  assert_ptr_equal(s, s3);
  assert_int_equal(s3->service_type, 4);
  assert_int_equal(s3->lease_expires_ms, 9000);
  assert_int_equal(s3->created_at_ms, 200);
  assert_int_equal(s3->state, ZM_LEASE_LIVE);
  assert_int_equal(zm_index_service_count(ix), 1);
  /* The two tables are separate. */
  assert_null(zm_index_lookup_managed(ix, "zid-1", 5));
  assert_null(zm_index_lookup_service(ix, "zid-2", 5));
  assert_int_equal(zm_index_del_service(ix, "zid-1", 5), 1);
  assert_int_equal(zm_index_del_service(ix, "zid-1", 5), 0);
  assert_int_equal(zm_index_service_count(ix), 0);
  /* The empty key is a key like any other. */
  zm_index_put_managed(ix, NULL, 0, NULL, 0, 1, 1);
  m = zm_index_lookup_managed(ix, "", 0);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "");
  assert_int_equal(zm_index_del_managed(ix, NULL, 0), 1);
  check_table(&ix->managed);
  check_table(&ix->service);
  zm_index_free(ix);
  zm_index_free(NULL);
}

static int keyf(char *buf, size_t cap, unsigned i) {
  return snprintf(buf, cap, "zid-%06u", i);
}

static void test_growth(void **state) {
  (void)state;
  enum { N = 200000 };
  zm_index_t *ix = zm_index_new();
  char k[32], v[64];
  int kl = keyf(k, sizeof k, 0);
  zm_index_service_t *first = zm_index_put_service(ix, k, (size_t)kl, 1, 1, 1);
  for (unsigned i = 0; i < N; i++) {
    kl = keyf(k, sizeof k, i);
    int vl = snprintf(v, sizeof v, "a9e1c0de-0000-4000-8000-%012u", i);
    zm_index_put_managed(ix, k, (size_t)kl, v, (size_t)vl, (int)(i % 3) + 1,
                         (int64_t)i * 1000);
    zm_index_put_service(ix, k, (size_t)kl, 3, (int64_t)i, (int64_t)i);
    assert_int_equal(zm_index_managed_count(ix), i + 1);
  }
  assert_true(ix->managed.mask + 1 >= N * 4 / 3);
  /* Growth never moved the first node: its pointer is still the entry. */
  kl = keyf(k, sizeof k, 0);
  assert_ptr_equal(first, zm_index_lookup_service(ix, k, (size_t)kl));
  for (unsigned i = 0; i < N; i++) {
    kl = keyf(k, sizeof k, i);
    int vl = snprintf(v, sizeof v, "a9e1c0de-0000-4000-8000-%012u", i);
    const zm_index_managed_t *m = zm_index_lookup_managed(ix, k, (size_t)kl);
    assert_non_null(m);
    assert_int_equal(m->identity_id_len, vl);
    assert_memory_equal(m->identity_id, v, (size_t)vl);
    assert_int_equal(m->identity_type, (int)(i % 3) + 1);
    assert_int_equal(m->created_at_ms, (int64_t)i * 1000);
    zm_index_service_t *s = zm_index_lookup_service(ix, k, (size_t)kl);
    assert_non_null(s);
    assert_int_equal(s->lease_expires_ms, (int64_t)i);
  }
  kl = keyf(k, sizeof k, N);
  assert_null(zm_index_lookup_managed(ix, k, (size_t)kl));
  assert_int_equal(zm_index_service_count(ix), N);
  check_table(&ix->managed);
  check_table(&ix->service);
  zm_index_free(ix);
}

/* Random inserts/deletes against a reference array; lookups must agree for
 * every key after every phase, and the table stays small (no tombstones). */
static void test_churn(void **state) {
  (void)state;
  enum { KEYS = 5000, ROUNDS = 200000 };
  static int64_t model[KEYS]; /* 0 = absent, else lease + 1 */
  memset(model, 0, sizeof model);
  zm_index_t *ix = zm_index_new();
  unsigned seed = 12345;
  size_t live = 0;
  char k[32];
  for (unsigned r = 0; r < ROUNDS; r++) {
    unsigned i = (unsigned)rand_r(&seed) % KEYS;
    int kl = keyf(k, sizeof k, i);
    if (rand_r(&seed) % 3 != 0) { /* 2/3 deletes: delete-heavy */
      int had = model[i] != 0;
      assert_int_equal(zm_index_del_service(ix, k, (size_t)kl), had);
      live -= (size_t)had;
      model[i] = 0;
    } else {
      live += model[i] == 0;
      model[i] = r + 1;
      zm_index_put_service(ix, k, (size_t)kl, 1, r, r);
    }
    assert_int_equal(zm_index_service_count(ix), live);
    if (r % 20000 == 0 || r == ROUNDS - 1) {
      for (unsigned j = 0; j < KEYS; j++) {
        kl = keyf(k, sizeof k, j);
        zm_index_service_t *s = zm_index_lookup_service(ix, k, (size_t)kl);
        if (model[j] == 0) {
          assert_null(s);
        } else {
          assert_non_null(s);
          assert_int_equal(s->lease_expires_ms, model[j] - 1);
        }
      }
      check_table(&ix->service);
    }
  }
  /* Capacity follows the peak live count, not the number of operations. */
  assert_true(ix->service.mask + 1 <= 16384);
  zm_index_free(ix);
}

static void test_prefix_and_binary_keys(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  /* Keys that are prefixes of one another, around the 8-byte word size. */
  const char *base = "abcdefghijklmnopqrstuvwxyz";
  for (size_t n = 1; n <= 26; n++)
    zm_index_put_managed(ix, base, n, base, n, (int)n, (int64_t)n);
  for (size_t n = 1; n <= 26; n++) {
    const zm_index_managed_t *m = zm_index_lookup_managed(ix, base, n);
    assert_non_null(m);
    assert_int_equal(m->identity_type, (int)n);
    assert_int_equal(m->identity_id_len, n);
  }
  /* Binary keys: embedded NULs and high bytes; trailing NULs matter. */
  const char k1[] = {'a', 0, 'b'}, k2[] = {'a', 0, 'c'}, k3[] = {'a', 0};
  const char k4[] = {'a', 0, 0}, k5[] = {(char)0xff, (char)0x80, 0, 1};
  zm_index_put_service(ix, k1, sizeof k1, 1, 10, 0);
  zm_index_put_service(ix, k2, sizeof k2, 2, 20, 0);
  zm_index_put_service(ix, k3, sizeof k3, 3, 30, 0);
  zm_index_put_service(ix, k4, sizeof k4, 4, 40, 0);
  zm_index_put_service(ix, k5, sizeof k5, 5, 50, 0);
  zm_index_put_service(ix, "a", 1, 6, 60, 0);
  assert_int_equal(zm_index_service_count(ix), 6);
  assert_int_equal(zm_index_lookup_service(ix, k1, sizeof k1)->service_type, 1);
  assert_int_equal(zm_index_lookup_service(ix, k2, sizeof k2)->service_type, 2);
  assert_int_equal(zm_index_lookup_service(ix, k3, sizeof k3)->service_type, 3);
  assert_int_equal(zm_index_lookup_service(ix, k4, sizeof k4)->service_type, 4);
  assert_int_equal(zm_index_lookup_service(ix, k5, sizeof k5)->service_type, 5);
  assert_int_equal(zm_index_lookup_service(ix, "a", 1)->service_type, 6);
  assert_null(zm_index_lookup_service(ix, "a\0d", 3));
  assert_int_equal(zm_index_del_service(ix, k3, sizeof k3), 1);
  assert_null(zm_index_lookup_service(ix, k3, sizeof k3));
  assert_non_null(zm_index_lookup_service(ix, k4, sizeof k4));
  /* Identity ids with NULs are copied by length too. */
  zm_index_put_managed(ix, k1, sizeof k1, k2, sizeof k2, 9, 9);
  const zm_index_managed_t *m = zm_index_lookup_managed(ix, k1, sizeof k1);
  assert_int_equal(m->identity_id_len, 3);
  assert_memory_equal(m->identity_id, k2, 3);
  assert_int_equal(m->identity_id[3], '\0');
  assert_int_equal(zm_index_managed_count(ix), 27);
  check_table(&ix->managed);
  check_table(&ix->service);
  zm_index_free(ix);
}

/* Keys whose tags collide in the low bits end up in one cluster: deletion
 * from its middle must keep the rest reachable (backward shift). */
static void test_cluster_delete(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  char keys[40][16];
  size_t lens[40];
  int n = 0;
  uint32_t want = 0;
  for (unsigned i = 0; n < 40 && i < 1000000; i++) {
    char k[16];
    int kl = snprintf(k, sizeof k, "c%u", i);
    uint32_t t = tag_of(k, (size_t)kl) & (MIN_CAP - 1);
    if (n == 0)
      want = t;
    if (t != want && t != ((want + 1) & (MIN_CAP - 1)))
      continue;
    memcpy(keys[n], k, (size_t)kl + 1);
    lens[n++] = (size_t)kl;
    if (n == 40)
      break;
  }
  assert_int_equal(n, 40);
  for (int i = 0; i < 40; i++)
    zm_index_put_service(ix, keys[i], lens[i], i, i, i);
  for (int i = 0; i < 40; i += 2)
    assert_int_equal(zm_index_del_service(ix, keys[i], lens[i]), 1);
  for (int i = 0; i < 40; i++) {
    zm_index_service_t *s = zm_index_lookup_service(ix, keys[i], lens[i]);
    if (i % 2)
      assert_int_equal(s->service_type, i);
    else
      assert_null(s);
  }
  check_table(&ix->service);
  zm_index_free(ix);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_put_lookup_replace_delete),
      cmocka_unit_test(test_growth),
      cmocka_unit_test(test_churn),
      cmocka_unit_test(test_prefix_and_binary_keys),
      cmocka_unit_test(test_cluster_delete),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
