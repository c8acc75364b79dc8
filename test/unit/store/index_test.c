/* index_test.c - the in-memory identity index (src/store/index.c). The .c is
 * included so the tests can check the table invariants directly. */
#include "store/index.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

/* Every occupied slot is reachable from its home slot without crossing an
 * empty one, its tag is its key's, its record carries a view and no other
 * slot names it; the counts and the load factor hold. */
static void check_table(const zm_index_t *ix) {
  size_t n = 0, nm = 0, ns = 0;
  size_t nrec = (size_t)ix->n_chunks * CHUNK_RECS;
  unsigned char *seen = calloc(nrec ? nrec : 1, 1);
  assert_non_null(seen);
  for (size_t i = 0; i <= ix->mask; i++) {
    const slot_t *s = &ix->slots[i];
    if (s->tag == 0)
      continue;
    n++;
    assert_true(s->rec < nrec);
    assert_int_equal(seen[s->rec], 0);
    seen[s->rec] = 1;
    const rec_t *x = rec_at(ix, s->rec);
    assert_true(x->flags & (F_MANAGED | F_SERVICE));
    nm += (x->flags & F_MANAGED) != 0;
    ns += (x->flags & F_SERVICE) != 0;
    const char *k = x->key;
    size_t kl = x->keylen;
    if (x->keylen == KEY_IN_EXT) {
      assert_true(x->flags & F_EXT);
      k = x->u.ext->data;
      kl = x->u.ext->keylen;
      assert_true(kl > KEY_INLINE);
    } else {
      assert_true(kl <= KEY_INLINE);
    }
    assert_int_equal(s->tag, tag_of(k, kl));
    for (size_t j = s->tag & ix->mask; j != i; j = (j + 1) & ix->mask)
      assert_int_not_equal(ix->slots[j].tag, 0);
  }
  /* free records are exactly the ones no slot names */
  size_t nfree = 0;
  for (uint32_t r = ix->free_head; r != NO_REC;
       r = rec_at(ix, r)->u.next_free) {
    assert_int_equal(seen[r], 0);
    assert_int_equal(rec_at(ix, r)->flags, 0);
    seen[r] = 2;
    nfree++;
  }
  size_t handed = ix->n_chunks ? nrec - CHUNK_RECS + ix->used : 0;
  assert_int_equal(n + nfree, handed);
  free(seen);
  assert_int_equal(n, ix->count);
  assert_int_equal(nm, ix->n_managed);
  assert_int_equal(ns, ix->n_service);
  assert_false(over_load(ix->count, ix->mask + 1));
}

/* The managed view of key, or NULL; *m holds it. */
static const zm_index_managed_t *get(const zm_index_t *ix, const char *k,
                                     size_t kl, zm_index_managed_t *m) {
  return zm_index_get_managed(ix, k, kl, m) ? m : NULL;
}

static void test_put_lookup_replace_delete(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  assert_null(get(ix, "zid-1", 5, &mb));
  zm_index_put_managed(ix, "zid-1", 5, "ident-one", 9, 1);
  const zm_index_managed_t *m = get(ix, "zid-1", 5, &mb);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "ident-one");
  assert_int_equal(m->identity_id_len, 9);
  assert_int_equal(m->identity_type, 1);
  /* The index keeps copies: the caller's buffers may change. */
  char key[8] = "zid-2", val[8] = "abc";
  zm_index_put_managed(ix, key, 5, val, 3, 2);
  memset(key, 'x', sizeof key);
  memset(val, 'y', sizeof val);
  m = get(ix, "zid-2", 5, &mb);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "abc");
  assert_int_equal(m->identity_type, 2);
  assert_int_equal(zm_index_managed_count(ix), 2);
  /* Replace: new values, same count. */
  zm_index_put_managed(ix, "zid-1", 5, "a-much-longer-identity-id", 25, 3);
  m = get(ix, "zid-1", 5, &mb);
  assert_string_equal(m->identity_id, "a-much-longer-identity-id");
  assert_int_equal(m->identity_type, 3);
  assert_int_equal(zm_index_managed_count(ix), 2);
  /* Delete. */
  assert_int_equal(zm_index_del_managed(ix, "zid-1", 5), 1);
  assert_int_equal(zm_index_del_managed(ix, "zid-1", 5), 0);
  assert_null(get(ix, "zid-1", 5, &mb));
  assert_non_null(get(ix, "zid-2", 5, &mb));
  assert_int_equal(zm_index_managed_count(ix), 1);

  /* Service entries: mutable, replaced in place (same pointer). */
  zm_index_service_t *s = zm_index_put_service(ix, "zid-1", 5, 5000);
  assert_int_equal(s->state, ZM_LEASE_LIVE);
  assert_int_equal(zm_index_pending_ms(s), 0);
  s->state = ZM_LEASE_DELETING;
  zm_index_set_expires_ms(s, 6000);
  zm_index_set_pending_ms(s, 6500);
  s->queued = 1;
  zm_index_service_t *s2 = zm_index_lookup_service(ix, "zid-1", 5);
  assert_ptr_equal(s, s2);
  assert_int_equal(s2->lease_expires_ms, 6000);
  assert_int_equal(zm_index_pending_ms(s2), 6500);
  assert_int_equal(s2->state, ZM_LEASE_DELETING);
  /* a replacement is a fresh lease: no pending refresh, not queued */
  zm_index_service_t *s3 = zm_index_put_service(ix, "zid-1", 5, 9000);
  assert_ptr_equal(s, s3);
  assert_int_equal(s3->lease_expires_ms, 9000);
  assert_int_equal(zm_index_pending_ms(s3), 0);
  assert_int_equal(s3->queued, 0);
  assert_int_equal(s3->state, ZM_LEASE_LIVE);
  assert_int_equal(zm_index_service_count(ix), 1);
  /* The views are separate: a service entry is not a managed one. */
  assert_null(get(ix, "zid-1", 5, &mb));
  assert_null(zm_index_lookup_service(ix, "zid-2", 5));
  assert_int_equal(zm_index_del_service(ix, "zid-1", 5), 1);
  assert_int_equal(zm_index_del_service(ix, "zid-1", 5), 0);
  assert_int_equal(zm_index_service_count(ix), 0);
  /* The empty key is a key like any other. */
  zm_index_put_managed(ix, NULL, 0, NULL, 0, 1);
  m = get(ix, "", 0, &mb);
  assert_non_null(m);
  assert_string_equal(m->identity_id, "");
  assert_int_equal(zm_index_del_managed(ix, NULL, 0), 1);
  check_table(ix);
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
  zm_index_managed_t mb;
  char k[32], v[64];
  int kl = keyf(k, sizeof k, 0);
  zm_index_service_t *first = zm_index_put_service(ix, k, (size_t)kl, 1);
  for (unsigned i = 0; i < N; i++) {
    kl = keyf(k, sizeof k, i);
    int vl = snprintf(v, sizeof v, "a9e1c0de-0000-4000-8000-%012u", i);
    zm_index_put_managed(ix, k, (size_t)kl, v, (size_t)vl, (int)(i % 3) + 1);
    zm_index_put_service(ix, k, (size_t)kl, (int64_t)i);
    assert_int_equal(zm_index_managed_count(ix), i + 1);
  }
  assert_true(ix->mask + 1 >= N * 16 / 13);
  /* Growth never moved the first node: its pointer is still the entry. */
  kl = keyf(k, sizeof k, 0);
  assert_ptr_equal(first, zm_index_lookup_service(ix, k, (size_t)kl));
  for (unsigned i = 0; i < N; i++) {
    kl = keyf(k, sizeof k, i);
    int vl = snprintf(v, sizeof v, "a9e1c0de-0000-4000-8000-%012u", i);
    const zm_index_managed_t *m = get(ix, k, (size_t)kl, &mb);
    assert_non_null(m);
    assert_int_equal(m->identity_id_len, vl);
    assert_memory_equal(m->identity_id, v, (size_t)vl);
    assert_int_equal(m->identity_type, (int)(i % 3) + 1);
    zm_index_service_t *s = zm_index_lookup_service(ix, k, (size_t)kl);
    assert_non_null(s);
    assert_int_equal(s->lease_expires_ms, (int64_t)i);
  }
  kl = keyf(k, sizeof k, N);
  assert_null(get(ix, k, (size_t)kl, &mb));
  assert_int_equal(zm_index_service_count(ix), N);
  /* one record per key carries both views */
  assert_int_equal(ix->count, N);
  check_table(ix);
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
      zm_index_put_service(ix, k, (size_t)kl, r);
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
      check_table(ix);
    }
  }
  /* Capacity follows the peak live count, not the number of operations. */
  assert_true(ix->mask + 1 <= 16384);
  zm_index_free(ix);
}

static void test_prefix_and_binary_keys(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  /* Keys that are prefixes of one another, around the 8-byte word size. */
  const char *base = "abcdefghijklmnopqrstuvwxyz";
  for (size_t n = 1; n <= 26; n++)
    zm_index_put_managed(ix, base, n, base, n, (int)n);
  for (size_t n = 1; n <= 26; n++) {
    zm_index_managed_t mb;
    const zm_index_managed_t *m = get(ix, base, n, &mb);
    assert_non_null(m);
    assert_int_equal(m->identity_type, (int)n);
    assert_int_equal(m->identity_id_len, n);
  }
  /* Binary keys: embedded NULs and high bytes; trailing NULs matter. */
  const char k1[] = {'a', 0, 'b'}, k2[] = {'a', 0, 'c'}, k3[] = {'a', 0};
  const char k4[] = {'a', 0, 0}, k5[] = {(char)0xff, (char)0x80, 0, 1};
  zm_index_put_service(ix, k1, sizeof k1, 10);
  zm_index_put_service(ix, k2, sizeof k2, 20);
  zm_index_put_service(ix, k3, sizeof k3, 30);
  zm_index_put_service(ix, k4, sizeof k4, 40);
  zm_index_put_service(ix, k5, sizeof k5, 50);
  zm_index_put_service(ix, "a", 1, 60);
  assert_int_equal(zm_index_service_count(ix), 6);
#define LEASE(k, kl) zm_index_lookup_service(ix, k, kl)->lease_expires_ms
  assert_int_equal(LEASE(k1, sizeof k1), 10);
  assert_int_equal(LEASE(k2, sizeof k2), 20);
  assert_int_equal(LEASE(k3, sizeof k3), 30);
  assert_int_equal(LEASE(k4, sizeof k4), 40);
  assert_int_equal(LEASE(k5, sizeof k5), 50);
  assert_int_equal(LEASE("a", 1), 60);
#undef LEASE
  assert_null(zm_index_lookup_service(ix, "a\0d", 3));
  assert_int_equal(zm_index_del_service(ix, k3, sizeof k3), 1);
  assert_null(zm_index_lookup_service(ix, k3, sizeof k3));
  assert_non_null(zm_index_lookup_service(ix, k4, sizeof k4));
  /* Identity ids with NULs are copied by length too. */
  zm_index_put_managed(ix, k1, sizeof k1, k2, sizeof k2, 9);
  zm_index_managed_t mb;
  const zm_index_managed_t *m = get(ix, k1, sizeof k1, &mb);
  assert_int_equal(m->identity_id_len, 3);
  assert_memory_equal(m->identity_id, k2, 3);
  assert_int_equal(m->identity_id[3], '\0');
  assert_int_equal(zm_index_managed_count(ix), 27);
  check_table(ix);
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
    zm_index_put_service(ix, keys[i], lens[i], i);
  for (int i = 0; i < 40; i += 2)
    assert_int_equal(zm_index_del_service(ix, keys[i], lens[i]), 1);
  for (int i = 0; i < 40; i++) {
    zm_index_service_t *s = zm_index_lookup_service(ix, keys[i], lens[i]);
    if (i % 2)
      assert_int_equal(s->lease_expires_ms, i);
    else
      assert_null(s);
  }
  check_table(ix);
  zm_index_free(ix);
}

/* 1 if the record of key keeps its identity_id as binary, inline. */
static int id_inline(const zm_index_t *ix, const char *k, size_t kl) {
  int found;
  size_t i = table_find(ix, k, kl, tag_of(k, kl), &found);
  assert_true(found);
  return !(rec_at(ix, ix->slots[i].rec)->flags & F_EXT);
}

/* Canonical lowercase UUIDs are kept binary and read back as given; every
 * other spelling is kept as text and reads back byte for byte. */
static void test_identity_id_round_trip(void **state) {
  (void)state;
  static const struct {
    const char *s;
    size_t n;
    int binary;
  } cases[] = {
#define C(str, bin) {str, sizeof str - 1, bin}
      C("a9e1c0de-0000-4000-8000-000000000001", 1),
      C("00000000-0000-0000-0000-000000000000", 1),
      C("ffffffff-ffff-ffff-ffff-ffffffffffff", 1),
      C("0123abcd-4567-89ef-0a1b-2c3d4e5f6789", 1),
      C("A9E1C0DE-0000-4000-8000-000000000001", 0),  /* uppercase */
      C("a9e1c0de-0000-4000-8000-00000000000A", 0),  /* one uppercase digit */
      C("a9e1c0de00004000800000000000000001aa", 0),  /* 36, no dashes */
      C("a9e1c0de-0000-4000-8000000000000001-", 0),  /* dash misplaced */
      C("a9e1c0de-0000-4000-8000-00000000001", 0),   /* 35 */
      C("a9e1c0de-0000-4000-8000-0000000000011", 0), /* 37 */
      C("{a9e1c0de-0000-4000-8000-000000000001}", 0),
      C("a9e1c0de-0000-4000-8000-00000000000g", 0),
      C("a9e1c0de-0000-4000-8000 000000000001", 0),
      C("", 0),
      C("agent-1", 0),
      C("a9e1c0de-0000-4000-8000-00000000000\0", 0), /* NUL inside */
#undef C
  };
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  char k[16];
  size_t n = sizeof cases / sizeof cases[0];
  for (size_t i = 0; i < n; i++) {
    int kl = snprintf(k, sizeof k, "zid-%zu", i);
    zm_index_put_managed(ix, k, (size_t)kl, cases[i].s, cases[i].n, (int)i);
  }
  /* a long text identity_id, well past any inline size */
  char big[600];
  for (size_t i = 0; i < sizeof big; i++)
    big[i] = (char)('!' + i % 90);
  zm_index_put_managed(ix, "zid-big", 7, big, sizeof big, -5);
  for (size_t i = 0; i < n; i++) {
    int kl = snprintf(k, sizeof k, "zid-%zu", i);
    const zm_index_managed_t *m = get(ix, k, (size_t)kl, &mb);
    assert_non_null(m);
    assert_int_equal(m->identity_id_len, cases[i].n);
    assert_memory_equal(m->identity_id, cases[i].s, cases[i].n + 1);
    assert_int_equal(m->identity_type, (int)i);
    assert_int_equal(id_inline(ix, k, (size_t)kl), cases[i].binary);
    assert_null(m->workload_id);
    assert_null(m->agent_id);
    assert_null(m->environment_id);
  }
  const zm_index_managed_t *m = get(ix, "zid-big", 7, &mb);
  assert_int_equal(m->identity_id_len, sizeof big);
  assert_memory_equal(m->identity_id, big, sizeof big);
  assert_int_equal(m->identity_id[sizeof big], '\0');
  assert_int_equal(m->identity_type, -5);
  /* Replacing text by a UUID and back switches the representation. */
  zm_index_put_managed(ix, "zid-big", 7, cases[0].s, cases[0].n, 3);
  assert_true(id_inline(ix, "zid-big", 7));
  assert_string_equal(get(ix, "zid-big", 7, &mb)->identity_id, cases[0].s);
  zm_index_put_managed(ix, "zid-big", 7, cases[4].s, cases[4].n, 3);
  assert_false(id_inline(ix, "zid-big", 7));
  assert_string_equal(get(ix, "zid-big", 7, &mb)->identity_id, cases[4].s);
  /* Extreme types are kept as given. */
  zm_index_put_managed(ix, "t", 1, cases[0].s, cases[0].n, INT32_MIN);
  zm_index_put_managed(ix, "u", 1, cases[0].s, cases[0].n, INT32_MAX);
  assert_int_equal(get(ix, "t", 1, &mb)->identity_type, INT32_MIN);
  assert_int_equal(get(ix, "u", 1, &mb)->identity_type, INT32_MAX);
  check_table(ix);
  zm_index_free(ix);
}

/* Keys longer than the inline room live out of line, for both views, and
 * keep working through replacement and the removal of either view. */
static void test_long_keys(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  char k[400];
  for (size_t i = 0; i < sizeof k; i++)
    k[i] = (char)('a' + i % 26);
  const char *uuid = "a9e1c0de-0000-4000-8000-000000000007";
  /* every length around the inline limit, and far past it */
  for (size_t n = 0; n < sizeof k; n += n < 32 ? 1 : 37) {
    zm_index_put_service(ix, k, n, (int64_t)n);
    zm_index_put_managed(ix, k, n, uuid, 36, (int)n);
  }
  check_table(ix);
  for (size_t n = 0; n < sizeof k; n += n < 32 ? 1 : 37) {
    assert_non_null(get(ix, k, n, &mb));
    assert_int_equal(mb.identity_type, (int)n);
    assert_string_equal(mb.identity_id, uuid);
    /* (keys of every length 0..31 share prefixes: each finds its own) */
    assert_int_equal(zm_index_lookup_service(ix, k, n)->lease_expires_ms,
                     (int64_t)n);
  }
  /* Long key: replace the managed view with text, extras, then remove the
   * views one at a time; the service entry stays put throughout. */
  size_t L = 300;
  zm_index_service_t *s = zm_index_lookup_service(ix, k, L);
  assert_null(s); /* 300 is not one of the lengths above */
  s = zm_index_put_service(ix, k, L, 70);
  zm_index_extra_t x = {"W", uuid, NULL};
  zm_index_put_managed_ext(ix, k, L, "Not-A-UUID", 10, 5, &x);
  assert_non_null(get(ix, k, L, &mb));
  assert_string_equal(mb.identity_id, "Not-A-UUID");
  assert_string_equal(mb.workload_id, "W");
  assert_string_equal(mb.agent_id, uuid);
  assert_null(mb.environment_id);
  zm_index_put_managed(ix, k, L, uuid, 36, 6);
  assert_string_equal(get(ix, k, L, &mb)->identity_id, uuid);
  assert_null(mb.workload_id);
  assert_ptr_equal(s, zm_index_lookup_service(ix, k, L));
  assert_int_equal(zm_index_del_managed(ix, k, L), 1);
  assert_null(get(ix, k, L, &mb));
  assert_ptr_equal(s, zm_index_lookup_service(ix, k, L));
  assert_int_equal(s->lease_expires_ms, 70);
  zm_index_put_managed(ix, k, L, "again", 5, 1);
  assert_string_equal(get(ix, k, L, &mb)->identity_id, "again");
  assert_int_equal(zm_index_del_service(ix, k, L), 1);
  assert_null(zm_index_lookup_service(ix, k, L));
  assert_string_equal(get(ix, k, L, &mb)->identity_id, "again");
  assert_int_equal(zm_index_del_managed(ix, k, L), 1);
  assert_null(get(ix, k, L, &mb));
  /* same prefix, different lengths, all past the limit */
  assert_null(get(ix, k, L - 1, &mb));
  assert_null(get(ix, k, L + 1, &mb));
  check_table(ix);
  zm_index_free(ix);
}

/* The optional ids: each absent, a canonical UUID, another spelling or any
 * text, in every combination; replaced with and without them. */
static void test_extras(void **state) {
  (void)state;
  const char *vals[] = {NULL,
                        "0b9ad0e0-1111-4222-8333-444455556666",
                        "0B9AD0E0-1111-4222-8333-444455556666",
                        "",
                        "class-42",
                        "a9e1c0de-0000-4000-8000-000000000001x"};
  enum { NV = sizeof vals / sizeof vals[0] };
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  char k[16];
  const char *id = "a9e1c0de-0000-4000-8000-000000000001";
  int n = 0;
  for (int a = 0; a < NV; a++)
    for (int b = 0; b < NV; b++)
      for (int c = 0; c < NV; c++, n++) {
        int kl = snprintf(k, sizeof k, "x-%d", n);
        zm_index_extra_t x = {vals[a], vals[b], vals[c]};
        zm_index_put_managed_ext(ix, k, (size_t)kl, id, 36, n, &x);
      }
  n = 0;
  for (int a = 0; a < NV; a++)
    for (int b = 0; b < NV; b++)
      for (int c = 0; c < NV; c++, n++) {
        int kl = snprintf(k, sizeof k, "x-%d", n);
        assert_non_null(get(ix, k, (size_t)kl, &mb));
        assert_string_equal(mb.identity_id, id);
        assert_int_equal(mb.identity_type, n);
        const char *got[3] = {mb.workload_id, mb.agent_id, mb.environment_id};
        const int want[3] = {a, b, c};
        for (int j = 0; j < 3; j++) {
          if (vals[want[j]] == NULL)
            assert_null(got[j]);
          else
            assert_string_equal(got[j], vals[want[j]]);
        }
      }
  /* Two lookups into two structs: each keeps its own formatted ids. */
  zm_index_extra_t x = {vals[1], vals[1], vals[1]};
  zm_index_put_managed_ext(ix, "p", 1, id, 36, 1, &x);
  zm_index_extra_t y = {"0b9ad0e0-1111-4222-8333-444455556667", NULL, NULL};
  zm_index_put_managed_ext(ix, "q", 1, "a9e1c0de-0000-4000-8000-000000000002",
                           36, 1, &y);
  zm_index_managed_t m1, m2;
  assert_non_null(get(ix, "p", 1, &m1));
  assert_non_null(get(ix, "q", 1, &m2));
  assert_string_equal(m1.identity_id, id);
  assert_string_equal(m1.workload_id, vals[1]);
  assert_string_equal(m1.environment_id, vals[1]);
  assert_string_equal(m2.identity_id, "a9e1c0de-0000-4000-8000-000000000002");
  assert_string_equal(m2.workload_id, "0b9ad0e0-1111-4222-8333-444455556667");
  /* Replaced without extras: they are gone, the id is inline again. */
  zm_index_put_managed_ext(ix, "p", 1, id, 36, 1, NULL);
  assert_non_null(get(ix, "p", 1, &m1));
  assert_null(m1.workload_id);
  assert_null(m1.agent_id);
  assert_null(m1.environment_id);
  assert_true(id_inline(ix, "p", 1));
  /* All-NULL extras are no extras. */
  zm_index_extra_t none = {NULL, NULL, NULL};
  zm_index_put_managed_ext(ix, "p", 1, id, 36, 1, &none);
  assert_true(id_inline(ix, "p", 1));
  check_table(ix);
  zm_index_free(ix);
}

/* One record per key: the views come and go independently, the service
 * pointer survives anything done to the managed view. */
static void test_shared_record(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  const char *id = "a9e1c0de-0000-4000-8000-000000000001";
  zm_index_put_managed(ix, "k", 1, id, 36, 1);
  zm_index_service_t *s = zm_index_put_service(ix, "k", 1, 100);
  assert_int_equal(ix->count, 1);
  assert_int_equal(zm_index_managed_count(ix), 1);
  assert_int_equal(zm_index_service_count(ix), 1);
  zm_index_set_pending_ms(s, 150);
  s->queued = 1;
  /* replacing the managed view leaves the lease alone, and vice versa */
  zm_index_put_managed(ix, "k", 1, "other", 5, 2);
  assert_ptr_equal(s, zm_index_lookup_service(ix, "k", 1));
  assert_int_equal(s->lease_expires_ms, 100);
  assert_int_equal(zm_index_pending_ms(s), 150);
  assert_int_equal(s->queued, 1);
  zm_index_put_service(ix, "k", 1, 200);
  assert_string_equal(get(ix, "k", 1, &mb)->identity_id, "other");
  assert_int_equal(mb.identity_type, 2);
  assert_int_equal(zm_index_pending_ms(s), 0);
  assert_int_equal(s->queued, 0);
  assert_int_equal(s->lease_expires_ms, 200);
  /* deleting a view that is absent changes nothing */
  assert_int_equal(zm_index_del_managed(ix, "k", 1), 1);
  assert_int_equal(zm_index_del_managed(ix, "k", 1), 0);
  assert_int_equal(ix->count, 1);
  assert_ptr_equal(s, zm_index_lookup_service(ix, "k", 1));
  assert_int_equal(zm_index_del_service(ix, "k", 1), 1);
  assert_int_equal(ix->count, 0);
  assert_int_equal(zm_index_del_service(ix, "k", 1), 0);
  /* a service-only and a managed-only key */
  zm_index_put_service(ix, "s", 1, 1);
  zm_index_put_managed(ix, "m", 1, id, 36, 1);
  assert_null(get(ix, "s", 1, &mb));
  assert_null(zm_index_lookup_service(ix, "m", 1));
  assert_int_equal(zm_index_del_service(ix, "m", 1), 0);
  assert_int_equal(zm_index_del_managed(ix, "s", 1), 0);
  assert_int_equal(ix->count, 2);
  check_table(ix);
  zm_index_free(ix);
}

/* clear_managed drops every mapping and keeps every lease (same pointers),
 * with short and long keys. */
static void test_clear_managed(void **state) {
  (void)state;
  enum { N = 3000 };
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  static zm_index_service_t *ptr[N];
  char k[64];
  for (int i = 0; i < N; i++) {
    int kl = snprintf(k, sizeof k, i % 5 ? "c-%d" : "a-rather-long-key-%d", i);
    ptr[i] = NULL;
    if (i % 3 != 0) {
      zm_index_extra_t x = {"w", NULL, "e"};
      zm_index_put_managed_ext(ix, k, (size_t)kl, "id", 2, 1,
                               i % 2 ? &x : NULL);
    }
    if (i % 3 != 1)
      ptr[i] = zm_index_put_service(ix, k, (size_t)kl, i);
  }
  zm_index_clear_managed(ix);
  assert_int_equal(zm_index_managed_count(ix), 0);
  check_table(ix);
  for (int i = 0; i < N; i++) {
    int kl = snprintf(k, sizeof k, i % 5 ? "c-%d" : "a-rather-long-key-%d", i);
    assert_null(get(ix, k, (size_t)kl, &mb));
    assert_ptr_equal(zm_index_lookup_service(ix, k, (size_t)kl), ptr[i]);
    if (ptr[i] != NULL)
      assert_int_equal(ptr[i]->lease_expires_ms, i);
  }
  /* and the index fills again, reusing the freed records */
  uint32_t chunks = ix->n_chunks;
  for (int i = 0; i < N; i++) {
    int kl = snprintf(k, sizeof k, "n-%d", i);
    if (i < N / 3)
      zm_index_put_managed(ix, k, (size_t)kl, "id", 2, i);
  }
  assert_int_equal(ix->n_chunks, chunks);
  check_table(ix);
  zm_index_free(ix);
}

/* Random puts and deletes of both views, with every kind of key, id and
 * extra, against a model; records are reused (memory follows the live
 * count). */
static void test_mixed_churn(void **state) {
  (void)state;
  enum { KEYS = 3000, ROUNDS = 150000 };
  static struct {
    int m;       /* managed present */
    unsigned mr; /* the round that put it (its identity_id's number) */
    int idk;     /* which identity_id spelling */
    int x;       /* extras set */
    int64_t s;   /* 0 = no service, else lease + 1 */
  } model[KEYS];
  memset(model, 0, sizeof model);
  zm_index_t *ix = zm_index_new();
  zm_index_managed_t mb;
  unsigned seed = 777;
  char k[64], id[64];
  size_t peak = 0;
#define KEY(i)                                                                 \
  snprintf(k, sizeof k, (i) % 7 ? "z-%u" : "zzzzzzzzzzzzzzzz-%u", (unsigned)(i))
#define ID(i, kind)                                                            \
  snprintf(id, sizeof id,                                                      \
           (kind) == 0   ? "a9e1c0de-0000-4000-8000-%012u"                     \
           : (kind) == 1 ? "A9E1C0DE-0000-4000-8000-%012u"                     \
                         : "id-%u",                                            \
           (unsigned)(i))
  for (unsigned r = 0; r < ROUNDS; r++) {
    unsigned i = (unsigned)rand_r(&seed) % KEYS;
    int kl = KEY(i);
    switch (rand_r(&seed) % 4) {
    case 0: {
      int kind = rand_r(&seed) % 3, withx = rand_r(&seed) % 2;
      int il = ID(r, kind);
      zm_index_extra_t x = {id, NULL, "env"};
      zm_index_put_managed_ext(ix, k, (size_t)kl, id, (size_t)il, kind,
                               withx ? &x : NULL);
      model[i].m = 1;
      model[i].mr = r;
      model[i].idk = kind;
      model[i].x = withx;
      break;
    }
    case 1:
      assert_int_equal(zm_index_del_managed(ix, k, (size_t)kl), model[i].m);
      model[i].m = 0;
      break;
    case 2:
      zm_index_put_service(ix, k, (size_t)kl, (int64_t)r);
      model[i].s = (int64_t)r + 1;
      break;
    default:
      assert_int_equal(zm_index_del_service(ix, k, (size_t)kl),
                       model[i].s != 0);
      model[i].s = 0;
    }
    if (ix->count > peak)
      peak = ix->count;
    if (r % 15000 != 0 && r != ROUNDS - 1)
      continue;
    size_t nm = 0, ns = 0;
    for (unsigned j = 0; j < KEYS; j++) {
      kl = KEY(j);
      int got = zm_index_get_managed(ix, k, (size_t)kl, &mb);
      assert_int_equal(got, model[j].m);
      if (got) {
        nm++;
        int il = ID(model[j].mr, model[j].idk);
        assert_int_equal(mb.identity_type, model[j].idk);
        assert_int_equal(mb.identity_id_len, il);
        assert_memory_equal(mb.identity_id, id, (size_t)il + 1);
        if (model[j].x) {
          assert_string_equal(mb.workload_id, id);
          assert_string_equal(mb.environment_id, "env");
        } else {
          assert_null(mb.workload_id);
        }
        assert_null(mb.agent_id);
      }
      zm_index_service_t *s = zm_index_lookup_service(ix, k, (size_t)kl);
      if (model[j].s == 0) {
        assert_null(s);
      } else {
        ns++;
        assert_int_equal(s->lease_expires_ms, model[j].s - 1);
      }
    }
    assert_int_equal(zm_index_managed_count(ix), nm);
    assert_int_equal(zm_index_service_count(ix), ns);
    check_table(ix);
  }
#undef KEY
#undef ID
  /* records are reused: no more chunks than the peak needed */
  assert_true((size_t)ix->n_chunks * CHUNK_RECS < peak + CHUNK_RECS);
  zm_index_free(ix);
}

/* The pending refresh is a distance past the durable lease: it reads back
 * as the value set, collapses to none at or below the durable lease, keeps
 * its value when the durable lease moves, and spans exactly 32 bits. */
static void test_pending_delta(void **state) {
  (void)state;
  zm_index_t *ix = zm_index_new();
  zm_index_service_t *s = zm_index_put_service(ix, "k", 1, 1000);
  assert_int_equal(s->pending_delta_ms, 0);
  assert_int_equal(zm_index_pending_ms(s), 0);
  zm_index_set_pending_ms(s, 1500);
  assert_int_equal(s->pending_delta_ms, 500);
  assert_int_equal(zm_index_pending_ms(s), 1500);
  assert_int_equal(s->lease_expires_ms, 1000);
  /* at or below the durable lease: none */
  zm_index_set_pending_ms(s, 1000);
  assert_int_equal(zm_index_pending_ms(s), 0);
  zm_index_set_pending_ms(s, 1500);
  zm_index_set_pending_ms(s, 999);
  assert_int_equal(zm_index_pending_ms(s), 0);
  zm_index_set_pending_ms(s, INT64_MIN);
  assert_int_equal(s->pending_delta_ms, 0);
  /* moving the durable lease keeps the pending value ... */
  zm_index_set_pending_ms(s, 5000);
  zm_index_set_expires_ms(s, 3000);
  assert_int_equal(s->lease_expires_ms, 3000);
  assert_int_equal(s->pending_delta_ms, 2000);
  assert_int_equal(zm_index_pending_ms(s), 5000);
  zm_index_set_expires_ms(s, 2000); /* down too */
  assert_int_equal(zm_index_pending_ms(s), 5000);
  /* ... until it reaches it: then there is none, and none stays none */
  zm_index_set_expires_ms(s, 5000);
  assert_int_equal(s->lease_expires_ms, 5000);
  assert_int_equal(zm_index_pending_ms(s), 0);
  zm_index_set_pending_ms(s, 6000);
  zm_index_set_expires_ms(s, 7000);
  assert_int_equal(zm_index_pending_ms(s), 0);
  zm_index_set_expires_ms(s, 4000);
  assert_int_equal(s->lease_expires_ms, 4000);
  assert_int_equal(zm_index_pending_ms(s), 0);
  /* the widest distance, and leases at the ends of the range */
  zm_index_set_pending_ms(s, 4000 + (int64_t)UINT32_MAX);
  assert_int_equal(s->pending_delta_ms, UINT32_MAX);
  assert_int_equal(zm_index_pending_ms(s), 4000 + (int64_t)UINT32_MAX);
  zm_index_set_expires_ms(s, 4001);
  assert_int_equal(s->pending_delta_ms, UINT32_MAX - 1);
  s = zm_index_put_service(ix, "k", 1, INT64_MIN);
  zm_index_set_pending_ms(s, INT64_MIN + 7);
  assert_int_equal(s->pending_delta_ms, 7);
  assert_true(zm_index_pending_ms(s) == INT64_MIN + 7);
  s = zm_index_put_service(ix, "k", 1, INT64_MAX - 7);
  zm_index_set_pending_ms(s, INT64_MAX);
  assert_true(zm_index_pending_ms(s) == INT64_MAX);
  s = zm_index_put_service(ix, "k", 1, -5000);
  zm_index_set_pending_ms(s, -1000);
  assert_int_equal(zm_index_pending_ms(s), -1000);
  /* the record keeps the delta next to the lease, and other views alone */
  zm_index_put_managed(ix, "k", 1, "id", 2, 4);
  assert_int_equal(zm_index_pending_ms(zm_index_lookup_service(ix, "k", 1)),
                   -1000);
  check_table(ix);
  zm_index_free(ix);
}

/* 1 if f(arg) aborts in a child process (ZM_ASSERT), 0 if it returns. */
static int aborts(void (*f)(int64_t), int64_t arg) {
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    signal(SIGABRT, SIG_DFL);
    if (freopen("/dev/null", "w", stderr) == NULL) /* the expected message */
      _exit(2);
    f(arg);
    _exit(0);
  }
  int st;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
    return 0;
  assert_true(WIFSIGNALED(st));
  assert_int_equal(WTERMSIG(st), SIGABRT);
  return 1;
}

static void set_pending_from_zero(int64_t abs_ms) {
  zm_index_service_t s = {.lease_expires_ms = 0};
  zm_index_set_pending_ms(&s, abs_ms);
}

static void lower_expires_under_pending(int64_t ms) {
  zm_index_service_t s = {.lease_expires_ms = 0};
  zm_index_set_pending_ms(&s, 1000);
  zm_index_set_expires_ms(&s, ms);
}

/* A distance past 32 bits cannot be kept: setting one is a caller's bug
 * (the lifecycle sends such a refresh to the store) and aborts rather than
 * keep a wrong lease. */
static void test_pending_delta_guard(void **state) {
  (void)state;
  assert_false(aborts(set_pending_from_zero, (int64_t)UINT32_MAX));
  assert_true(aborts(set_pending_from_zero, (int64_t)UINT32_MAX + 1));
  assert_true(aborts(set_pending_from_zero, INT64_MAX));
  assert_false(aborts(lower_expires_under_pending, 1000 - (int64_t)UINT32_MAX));
  assert_true(
      aborts(lower_expires_under_pending, 1000 - (int64_t)UINT32_MAX - 1));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_put_lookup_replace_delete),
      cmocka_unit_test(test_growth),
      cmocka_unit_test(test_churn),
      cmocka_unit_test(test_prefix_and_binary_keys),
      cmocka_unit_test(test_cluster_delete),
      cmocka_unit_test(test_identity_id_round_trip),
      cmocka_unit_test(test_long_keys),
      cmocka_unit_test(test_extras),
      cmocka_unit_test(test_shared_record),
      cmocka_unit_test(test_clear_managed),
      cmocka_unit_test(test_mixed_churn),
      cmocka_unit_test(test_pending_delta),
      cmocka_unit_test(test_pending_delta_guard),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
