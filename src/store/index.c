/*
 * index.c - the in-memory index of managed identities and service leases
 * (include/zm/index.h).
 *
 * Two open-addressing hash tables with linear probing, keyed by the
 * ziti_identity_id bytes. A slot is a 32-bit hash tag (0 = empty) in one
 * array and a node pointer in another: probing touches only the 4-byte tags
 * until a tag matches, and a slot costs 12 bytes. The table doubles above
 * 3/4 full; deletion shifts the following cluster back (no tombstones), so
 * delete-heavy churn never degrades lookups or forces a rebuild.
 *
 * Nodes are allocated one per entry (public struct + key + strings in one
 * block) and never move when the table grows: the header promises that a
 * returned pointer stays valid until that entry is removed or replaced.
 * A service entry replaced by put_service is updated in place, so even
 * then its pointer stays valid.
 */
#include "zm/index.h"

#include "zm/zm.h"

#include <stdlib.h>
#include <string.h>

#define MIN_CAP 64 /* slots in a fresh table; a power of two */

typedef struct {
  zm_index_managed_t pub;
  uint32_t keylen;
  char key[]; /* key, NUL, identity_id, NUL, then each recorded extra, NUL */
} mnode_t;

typedef struct {
  zm_index_service_t pub;
  uint32_t keylen;
  char key[]; /* key, NUL */
} snode_t;

/* One table; the node type is known to the caller, the table only needs to
 * find each node's key: keylen at len_off, the bytes right after it. */
typedef struct {
  uint32_t *tags; /* 0 = empty, else the low 32 bits of the hash (|1 if 0) */
  void **nodes;
  size_t mask; /* capacity - 1 */
  size_t count;
  size_t len_off; /* offsetof(node, keylen) */
} table_t;

struct zm_index {
  table_t managed, service;
};

/* ==== hash ================================================================ */

/* 64-bit multiply-xorshift over 8-byte words; the length seeds the state so
 * keys that are prefixes of each other differ even when padded with NULs. */
static inline uint64_t fmix(uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  return x;
}

static uint64_t hash_bytes(const char *p, size_t n) {
  const uint64_t K1 = 0x9e3779b97f4a7c15ULL, K2 = 0xbf58476d1ce4e5b9ULL;
  uint64_t h = K1 ^ ((uint64_t)n * K2);
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    v *= K2;
    h ^= v ^ (v >> 31);
    h = ((h << 27) | (h >> 37)) * K1;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t v = 0;
    memcpy(&v, p, n);
    v *= K2;
    h ^= v ^ (v >> 31);
    h = ((h << 27) | (h >> 37)) * K1;
  }
  return fmix(h);
}

static inline uint32_t tag_of(const char *key, size_t len) {
  if (len == 0)
    return 1; /* key may be NULL: hash nothing */
  uint32_t t = (uint32_t)hash_bytes(key, len);
  return t ? t : 1;
}

/* ==== table =============================================================== */

static void table_init(table_t *t, size_t len_off) {
  t->tags = zm_xcalloc(MIN_CAP, sizeof *t->tags);
  t->nodes = zm_xcalloc(MIN_CAP, sizeof *t->nodes);
  t->mask = MIN_CAP - 1;
  t->count = 0;
  t->len_off = len_off;
}

static void table_dispose(table_t *t) {
  for (size_t i = 0; i <= t->mask; i++)
    free(t->nodes[i]);
  free(t->tags);
  free(t->nodes);
}

static inline int node_is(const table_t *t, const void *node, const char *key,
                          size_t len) {
  const char *base = (const char *)node + t->len_off;
  uint32_t klen;
  memcpy(&klen, base, sizeof klen);
  return klen == len && (len == 0 || memcmp(base + sizeof klen, key, len) == 0);
}

/* Slot holding key, or the empty slot where it would go (*found = 0). */
static size_t table_find(const table_t *t, const char *key, size_t len,
                         uint32_t tag, int *found) {
  size_t i = tag & t->mask;
  while (t->tags[i] != 0) {
    if (t->tags[i] == tag && node_is(t, t->nodes[i], key, len)) {
      *found = 1;
      return i;
    }
    i = (i + 1) & t->mask;
  }
  *found = 0;
  return i;
}

static void table_grow(table_t *t) {
  size_t ocap = t->mask + 1, ncap = ocap * 2;
  uint32_t *otags = t->tags;
  void **onodes = t->nodes;
  t->tags = zm_xcalloc(ncap, sizeof *t->tags);
  t->nodes = zm_xcalloc(ncap, sizeof *t->nodes);
  t->mask = ncap - 1;
  for (size_t i = 0; i < ocap; i++) {
    if (otags[i] == 0)
      continue;
    size_t j = otags[i] & t->mask;
    while (t->tags[j] != 0)
      j = (j + 1) & t->mask;
    t->tags[j] = otags[i];
    t->nodes[j] = onodes[i];
  }
  free(otags);
  free(onodes);
}

/* Empties slot i and shifts later members of its cluster back into the
 * hole when the hole lies on their probe path (backward-shift deletion). */
static void table_remove_at(table_t *t, size_t i) {
  size_t j = i;
  for (;;) {
    j = (j + 1) & t->mask;
    if (t->tags[j] == 0)
      break;
    size_t home = t->tags[j] & t->mask;
    /* j may move to i iff i is within [home, j] cyclically. */
    if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
      t->tags[i] = t->tags[j];
      t->nodes[i] = t->nodes[j];
      i = j;
    }
  }
  t->tags[i] = 0;
  t->nodes[i] = NULL;
  t->count--;
}

/* Returns the slot for a new key (grows first if needed). */
static size_t table_slot_for_insert(table_t *t, const char *key, size_t len,
                                    uint32_t tag, int *found) {
  size_t i = table_find(t, key, len, tag, found);
  if (*found || (t->count + 1) * 4 <= (t->mask + 1) * 3)
    return i;
  table_grow(t);
  return table_find(t, key, len, tag, found);
}

/* ==== public API ========================================================== */

zm_index_t *zm_index_new(void) {
  zm_index_t *ix = zm_xmalloc(sizeof *ix);
  table_init(&ix->managed, offsetof(mnode_t, keylen));
  table_init(&ix->service, offsetof(snode_t, keylen));
  return ix;
}

void zm_index_free(zm_index_t *ix) {
  if (ix == NULL)
    return;
  table_dispose(&ix->managed);
  table_dispose(&ix->service);
  free(ix);
}

void zm_index_clear_managed(zm_index_t *ix) {
  size_t len_off = ix->managed.len_off;
  table_dispose(&ix->managed);
  table_init(&ix->managed, len_off);
}

void zm_index_put_managed(zm_index_t *ix, const char *zid, size_t zid_len,
                          const char *identity_id, size_t identity_id_len,
                          int identity_type, int64_t created_at_ms) {
  zm_index_put_managed_ext(ix, zid, zid_len, identity_id, identity_id_len,
                           identity_type, created_at_ms, NULL);
}

/* Copies s (if any) to *at and returns the copy, advancing *at. */
static const char *put_extra(char **at, const char *s) {
  if (s == NULL)
    return NULL;
  size_t n = strlen(s) + 1;
  char *d = *at;
  memcpy(d, s, n);
  *at += n;
  return d;
}

void zm_index_put_managed_ext(zm_index_t *ix, const char *zid, size_t zid_len,
                              const char *identity_id, size_t identity_id_len,
                              int identity_type, int64_t created_at_ms,
                              const zm_index_extra_t *extra) {
  ZM_ASSERT(zid_len < UINT32_MAX && (identity_id != NULL || !identity_id_len));
  zm_index_extra_t x = {0};
  if (extra != NULL)
    x = *extra;
  size_t more = (x.workload_id ? strlen(x.workload_id) + 1 : 0) +
                (x.agent_id ? strlen(x.agent_id) + 1 : 0) +
                (x.environment_id ? strlen(x.environment_id) + 1 : 0);
  mnode_t *n = zm_xmalloc(sizeof *n + zid_len + 1 + identity_id_len + 1 + more);
  n->keylen = (uint32_t)zid_len;
  if (zid_len)
    memcpy(n->key, zid, zid_len);
  n->key[zid_len] = '\0';
  char *id = n->key + zid_len + 1;
  if (identity_id_len)
    memcpy(id, identity_id, identity_id_len);
  id[identity_id_len] = '\0';
  n->pub.identity_id = id;
  n->pub.identity_id_len = identity_id_len;
  n->pub.identity_type = identity_type;
  n->pub.created_at_ms = created_at_ms;
  char *at = id + identity_id_len + 1;
  n->pub.workload_id = put_extra(&at, x.workload_id);
  n->pub.agent_id = put_extra(&at, x.agent_id);
  n->pub.environment_id = put_extra(&at, x.environment_id);

  table_t *t = &ix->managed;
  uint32_t tag = tag_of(zid, zid_len);
  int found;
  size_t i = table_slot_for_insert(t, zid, zid_len, tag, &found);
  if (found) {
    free(t->nodes[i]);
  } else {
    t->tags[i] = tag;
    t->count++;
  }
  t->nodes[i] = n;
}

const zm_index_managed_t *zm_index_lookup_managed(const zm_index_t *ix,
                                                  const char *zid, size_t len) {
  int found;
  size_t i = table_find(&ix->managed, zid, len, tag_of(zid, len), &found);
  return found ? &((const mnode_t *)ix->managed.nodes[i])->pub : NULL;
}

int zm_index_del_managed(zm_index_t *ix, const char *zid, size_t len) {
  int found;
  size_t i = table_find(&ix->managed, zid, len, tag_of(zid, len), &found);
  if (!found)
    return 0;
  free(ix->managed.nodes[i]);
  table_remove_at(&ix->managed, i);
  return 1;
}

zm_index_service_t *zm_index_put_service(zm_index_t *ix, const char *zid,
                                         size_t len, int service_type,
                                         int64_t lease_expires_ms,
                                         int64_t created_at_ms) {
  ZM_ASSERT(len < UINT32_MAX);
  table_t *t = &ix->service;
  uint32_t tag = tag_of(zid, len);
  int found;
  size_t i = table_slot_for_insert(t, zid, len, tag, &found);
  snode_t *n;
  if (found) {
    n = t->nodes[i]; /* same key, same size: update in place */
  } else {
    n = zm_xmalloc(sizeof *n + len + 1);
    n->keylen = (uint32_t)len;
    if (len)
      memcpy(n->key, zid, len);
    n->key[len] = '\0';
    t->tags[i] = tag;
    t->nodes[i] = n;
    t->count++;
  }
  n->pub.service_type = service_type;
  n->pub.state = ZM_LEASE_LIVE;
  n->pub.lease_expires_ms = lease_expires_ms;
  n->pub.lease_pending_ms = 0;
  n->pub.queued = 0;
  n->pub.created_at_ms = created_at_ms;
  return &n->pub;
}

zm_index_service_t *zm_index_lookup_service(const zm_index_t *ix,
                                            const char *zid, size_t len) {
  int found;
  size_t i = table_find(&ix->service, zid, len, tag_of(zid, len), &found);
  return found ? &((snode_t *)ix->service.nodes[i])->pub : NULL;
}

int zm_index_del_service(zm_index_t *ix, const char *zid, size_t len) {
  int found;
  size_t i = table_find(&ix->service, zid, len, tag_of(zid, len), &found);
  if (!found)
    return 0;
  free(ix->service.nodes[i]);
  table_remove_at(&ix->service, i);
  return 1;
}

size_t zm_index_managed_count(const zm_index_t *ix) {
  return ix->managed.count;
}

size_t zm_index_service_count(const zm_index_t *ix) {
  return ix->service.count;
}
