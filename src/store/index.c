/*
 * index.c - the in-memory index of managed identities and service leases
 * (include/zm/index.h).
 *
 * Sized for what it holds: at 100k identities the index is most of the
 * process's heap, so one identity costs one 48-byte record plus its share of
 * an 8-byte hash slot, and nothing else in the common case. The record keeps
 * only what a lookup answers or the lease paths read (the rows' created_at
 * and service_type stay in the store), and the pending lease refresh as a
 * 32-bit distance past the durable lease (include/zm/index.h). 48 bytes, not
 * one 64-byte cache line: in a 64-byte aligned chunk half the records then
 * straddle two adjacent lines, a small price next to 16 bytes per identity
 * of resident memory.
 *
 * Records. One per key, carrying both views (managed mapping, service lease)
 * with a presence bit each: the platform's service identities have both, and
 * a shared record stores the key once. Records live in fixed chunks of
 * CHUNK_RECS and are addressed by a 32-bit number (chunk, position); chunks
 * never move or shrink, so a record's address is stable for its lifetime
 * (the header's promise for service pointers) and freed records are reused
 * through a free list. Common values are kept inline and compact: a key of
 * up to KEY_INLINE bytes (OpenZiti ids are 9-10 characters), and the
 * identity_id as 16 binary bytes when it is a canonical lowercase UUID (what
 * this service writes). Anything else - a longer key, an identity_id in any
 * other spelling (the Go service's database may hold any text, and read-back
 * must be byte-exact), the optional workload/agent/environment ids - goes to
 * one malloc'ed "ext" block per record, whose pointer then takes the place
 * of the inline UUID.
 *
 * Table. Open addressing with linear probing over 8-byte slots {32-bit hash
 * tag, record number}: a lookup reads one slot run (usually one cache line)
 * and then the record, and compares the full key only on a tag match. The
 * table doubles above 13/16 full; deletion shifts the following cluster back
 * (no tombstones), so delete-heavy churn never degrades lookups.
 */
#include "zm/index.h"

#include "zm/zm.h"

#include <stdlib.h>
#include <string.h>

#define MIN_CAP 64      /* slots in a fresh table; a power of two */
#define CHUNK_SHIFT 10u /* records per chunk: 1024 (48 KiB) */
#define CHUNK_RECS (1u << CHUNK_SHIFT)
#define KEY_INLINE 10u
#define KEY_IN_EXT 0xffu /* rec.keylen: the key is in the ext block */
#define NO_REC UINT32_MAX

enum {
  F_MANAGED = 1, /* the managed view is present */
  F_SERVICE = 2, /* the service view is present */
  F_EXT = 4      /* u.ext is valid (else u.uuid, when F_MANAGED) */
};

/* How an optional id or the identity_id is kept in an ext block. */
enum { X_NONE = 0, X_UUID = 1, X_TEXT = 2 };

/* Out-of-line data of one record. data[] holds, in order: the key (keylen
 * bytes, when not inline), the identity_id text (idlen bytes + NUL, when
 * idkind is X_TEXT), then each extra (16 bytes when X_UUID, NUL-terminated
 * text when X_TEXT) at its xoff. */
typedef struct {
  uint8_t uuid[16]; /* identity_id when idkind == X_UUID */
  uint32_t keylen;  /* 0 = key inline in the record */
  uint32_t idlen;
  uint32_t xoff[3];
  uint8_t idkind, xkind[3];
  char data[];
} ext_t;

typedef struct {
  zm_index_service_t svc; /* valid when F_SERVICE */
  union {
    uint8_t uuid[16]; /* identity_id, binary (F_MANAGED without F_EXT) */
    ext_t *ext;       /* F_EXT */
    uint32_t next_free;
  } u;
  int32_t identity_type; /* managed */
  uint8_t flags;         /* F_* ; 0 = on the free list */
  uint8_t keylen;        /* inline key length, or KEY_IN_EXT */
  char key[KEY_INLINE];
} rec_t;

/* svc 16 + u 16 + 16: the per-identity cost (see the top of the file). */
_Static_assert(sizeof(rec_t) == 48, "index record size");

typedef struct {
  uint32_t tag; /* 0 = empty, else the low 32 bits of the hash (|1 if 0) */
  uint32_t rec;
} slot_t;

struct zm_index {
  slot_t *slots;
  size_t mask; /* capacity - 1 */
  size_t count;
  size_t n_managed, n_service;
  rec_t **chunks;
  uint32_t n_chunks, cap_chunks;
  uint32_t used;      /* records handed out from the last chunk so far */
  uint32_t free_head; /* NO_REC = empty free list */
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

/* ==== UUIDs =============================================================== */

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1; /* uppercase too: it would not read back byte-exact */
}

/* 1 and out[16] if s[0..n) is a canonical lowercase UUID, else 0. */
static int uuid_parse(const char *s, size_t n, uint8_t out[16]) {
  if (n != ZM_INDEX_UUID_LEN)
    return 0;
  int k = 0;
  for (size_t i = 0; i < n;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (s[i++] != '-')
        return 0;
      continue;
    }
    int hi = hexval(s[i]), lo = hexval(s[i + 1]);
    if (hi < 0 || lo < 0)
      return 0;
    out[k++] = (uint8_t)(hi << 4 | lo);
    i += 2;
  }
  return 1;
}

/* Writes the canonical text of u and a NUL: ZM_INDEX_UUID_LEN + 1 bytes. */
static const char *uuid_format(const uint8_t u[16], char *out) {
  static const char hex[] = "0123456789abcdef";
  char *p = out;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10)
      *p++ = '-';
    *p++ = hex[u[i] >> 4];
    *p++ = hex[u[i] & 15];
  }
  *p = '\0';
  return out;
}

/* ==== records ============================================================= */

static inline rec_t *rec_at(const zm_index_t *ix, uint32_t r) {
  return &ix->chunks[r >> CHUNK_SHIFT][r & (CHUNK_RECS - 1)];
}

static uint32_t rec_alloc(zm_index_t *ix) {
  uint32_t r;
  if (ix->free_head != NO_REC) {
    r = ix->free_head;
    ix->free_head = rec_at(ix, r)->u.next_free;
  } else {
    if (ix->n_chunks == 0 || ix->used == CHUNK_RECS) {
      ZM_ASSERT(ix->n_chunks < (NO_REC >> CHUNK_SHIFT));
      if (ix->n_chunks == ix->cap_chunks) {
        ix->cap_chunks = ix->cap_chunks ? ix->cap_chunks * 2 : 16;
        ix->chunks =
            zm_xrealloc(ix->chunks, ix->cap_chunks * sizeof *ix->chunks);
      }
      /* not zeroed: pages are touched only as records are used */
      rec_t *c = aligned_alloc(64, CHUNK_RECS * sizeof(rec_t));
      ZM_ASSERT(c != NULL); /* out of memory */
      ix->chunks[ix->n_chunks++] = c;
      ix->used = 0;
    }
    r = ((ix->n_chunks - 1) << CHUNK_SHIFT) | ix->used++;
  }
  memset(rec_at(ix, r), 0, sizeof(rec_t));
  return r;
}

static void rec_release(zm_index_t *ix, uint32_t r) {
  rec_t *x = rec_at(ix, r);
  if (x->flags & F_EXT)
    free(x->u.ext);
  x->flags = 0;
  x->u.next_free = ix->free_head;
  ix->free_head = r;
}

static inline int rec_is(const rec_t *x, const char *key, size_t len) {
  if (x->keylen != KEY_IN_EXT)
    return x->keylen == len && (len == 0 || memcmp(x->key, key, len) == 0);
  const ext_t *e = x->u.ext;
  return e->keylen == len && memcmp(e->data, key, len) == 0;
}

/* ==== table =============================================================== */

static void table_init(zm_index_t *ix, size_t cap) {
  ix->slots = zm_xcalloc(cap, sizeof *ix->slots);
  ix->mask = cap - 1;
  ix->count = 0;
}

/* Slot holding key, or the empty slot where it would go (*found = 0). */
static size_t table_find(const zm_index_t *ix, const char *key, size_t len,
                         uint32_t tag, int *found) {
  size_t i = tag & ix->mask;
  for (;;) {
    const slot_t *s = &ix->slots[i];
    if (s->tag == 0)
      break;
    if (s->tag == tag && rec_is(rec_at(ix, s->rec), key, len)) {
      *found = 1;
      return i;
    }
    i = (i + 1) & ix->mask;
  }
  *found = 0;
  return i;
}

static inline int over_load(size_t count, size_t cap) {
  return count * 16 > cap * 13;
}

static void table_place(slot_t *slots, size_t mask, slot_t s) {
  size_t j = s.tag & mask;
  while (slots[j].tag != 0)
    j = (j + 1) & mask;
  slots[j] = s;
}

static void table_grow(zm_index_t *ix) {
  size_t ocap = ix->mask + 1, ncap = ocap * 2;
  slot_t *old = ix->slots;
  ix->slots = zm_xcalloc(ncap, sizeof *ix->slots);
  ix->mask = ncap - 1;
  for (size_t i = 0; i < ocap; i++)
    if (old[i].tag != 0)
      table_place(ix->slots, ix->mask, old[i]);
  free(old);
}

/* Empties slot i and shifts later members of its cluster back into the
 * hole when the hole lies on their probe path (backward-shift deletion). */
static void table_remove_at(zm_index_t *ix, size_t i) {
  size_t j = i;
  for (;;) {
    j = (j + 1) & ix->mask;
    if (ix->slots[j].tag == 0)
      break;
    size_t home = ix->slots[j].tag & ix->mask;
    /* j may move to i iff i is within [home, j] cyclically. */
    if (((j - home) & ix->mask) >= ((j - i) & ix->mask)) {
      ix->slots[i] = ix->slots[j];
      i = j;
    }
  }
  ix->slots[i].tag = 0;
  ix->slots[i].rec = 0;
  ix->count--;
}

/* The record of key, created (flags 0, key set) if absent. */
static rec_t *rec_for_put(zm_index_t *ix, const char *key, size_t len) {
  ZM_ASSERT(len < UINT32_MAX);
  uint32_t tag = tag_of(key, len);
  int found;
  size_t i = table_find(ix, key, len, tag, &found);
  if (found)
    return rec_at(ix, ix->slots[i].rec);
  if (over_load(ix->count + 1, ix->mask + 1)) {
    table_grow(ix);
    i = table_find(ix, key, len, tag, &found);
  }
  uint32_t r = rec_alloc(ix);
  rec_t *x = rec_at(ix, r);
  if (len <= KEY_INLINE) {
    x->keylen = (uint8_t)len;
    if (len)
      memcpy(x->key, key, len);
  } else {
    /* the key alone: put_managed may rebuild this block with more in it */
    ext_t *e = zm_xcalloc(1, sizeof *e + len);
    e->keylen = (uint32_t)len;
    memcpy(e->data, key, len);
    x->keylen = KEY_IN_EXT;
    x->u.ext = e;
    x->flags = F_EXT;
  }
  ix->slots[i] = (slot_t){tag, r};
  ix->count++;
  return x;
}

/* Drops the record at slot i once neither view is left. */
static void maybe_drop(zm_index_t *ix, size_t i) {
  uint32_t r = ix->slots[i].rec;
  if (rec_at(ix, r)->flags & (F_MANAGED | F_SERVICE))
    return;
  table_remove_at(ix, i);
  rec_release(ix, r);
}

/* ==== public API ========================================================== */

zm_index_t *zm_index_new(void) {
  zm_index_t *ix = zm_xcalloc(1, sizeof *ix);
  table_init(ix, MIN_CAP);
  ix->free_head = NO_REC;
  return ix;
}

static void release_all(zm_index_t *ix) {
  for (size_t i = 0; i <= ix->mask; i++)
    if (ix->slots[i].tag != 0) {
      rec_t *x = rec_at(ix, ix->slots[i].rec);
      if (x->flags & F_EXT)
        free(x->u.ext);
    }
  for (uint32_t c = 0; c < ix->n_chunks; c++)
    free(ix->chunks[c]);
  free(ix->chunks);
  free(ix->slots);
}

void zm_index_free(zm_index_t *ix) {
  if (ix == NULL)
    return;
  release_all(ix);
  free(ix);
}

/* Sets the managed view's identity_id and extras, (re)building the ext
 * block: needed for a long key, a non-canonical identity_id or any extra. */
static void set_managed_ids(rec_t *x, const char *id, size_t idlen,
                            const zm_index_extra_t *extra) {
  const char *xs[3] = {NULL, NULL, NULL};
  if (extra != NULL) {
    xs[0] = extra->workload_id;
    xs[1] = extra->agent_id;
    xs[2] = extra->environment_id;
  }
  uint8_t idbin[16], xbin[3][16];
  int id_is_uuid = uuid_parse(id, idlen, idbin);
  uint8_t xkind[3];
  size_t xlen[3], more = 0;
  int need_ext = x->keylen == KEY_IN_EXT || !id_is_uuid;
  for (int k = 0; k < 3; k++) {
    xkind[k] = X_NONE;
    xlen[k] = 0;
    if (xs[k] == NULL)
      continue;
    need_ext = 1;
    xlen[k] = strlen(xs[k]);
    if (uuid_parse(xs[k], xlen[k], xbin[k])) {
      xkind[k] = X_UUID;
      more += 16;
    } else {
      xkind[k] = X_TEXT;
      more += xlen[k] + 1;
    }
  }
  ext_t *old = (x->flags & F_EXT) ? x->u.ext : NULL;
  if (!need_ext) {
    free(old);
    x->flags &= (uint8_t)~F_EXT;
    memcpy(x->u.uuid, idbin, 16);
    return;
  }
  size_t keylen = old != NULL ? old->keylen : 0;
  size_t idtext = id_is_uuid ? 0 : idlen + 1;
  ext_t *e = zm_xmalloc(sizeof *e + keylen + idtext + more);
  memset(e, 0, sizeof *e);
  e->keylen = (uint32_t)keylen;
  if (keylen)
    memcpy(e->data, old->data, keylen);
  size_t at = keylen;
  if (id_is_uuid) {
    e->idkind = X_UUID;
    memcpy(e->uuid, idbin, 16);
  } else {
    e->idkind = X_TEXT;
    e->idlen = (uint32_t)idlen;
    if (idlen)
      memcpy(e->data + at, id, idlen);
    e->data[at + idlen] = '\0';
    at += idlen + 1;
  }
  for (int k = 0; k < 3; k++) {
    e->xkind[k] = xkind[k];
    e->xoff[k] = (uint32_t)at;
    if (xkind[k] == X_UUID) {
      memcpy(e->data + at, xbin[k], 16);
      at += 16;
    } else if (xkind[k] == X_TEXT) {
      memcpy(e->data + at, xs[k], xlen[k] + 1);
      at += xlen[k] + 1;
    }
  }
  free(old);
  x->u.ext = e;
  x->flags |= F_EXT;
}

/* Forgets the managed view's ids; a long key stays, in a block of its own
 * size. */
static void clear_managed_ids(rec_t *x) {
  if (!(x->flags & F_EXT))
    return;
  ext_t *old = x->u.ext;
  if (x->keylen == KEY_IN_EXT) {
    ext_t *e = zm_xcalloc(1, sizeof *e + old->keylen);
    e->keylen = old->keylen;
    memcpy(e->data, old->data, old->keylen);
    x->u.ext = e;
  } else {
    x->flags &= (uint8_t)~F_EXT;
  }
  free(old);
}

void zm_index_put_managed(zm_index_t *ix, const char *zid, size_t zid_len,
                          const char *identity_id, size_t identity_id_len,
                          int identity_type) {
  zm_index_put_managed_ext(ix, zid, zid_len, identity_id, identity_id_len,
                           identity_type, NULL);
}

void zm_index_put_managed_ext(zm_index_t *ix, const char *zid, size_t zid_len,
                              const char *identity_id, size_t identity_id_len,
                              int identity_type,
                              const zm_index_extra_t *extra) {
  ZM_ASSERT(identity_id != NULL || !identity_id_len);
  ZM_ASSERT(identity_id_len < UINT32_MAX);
  rec_t *x = rec_for_put(ix, zid, zid_len);
  if (!(x->flags & F_MANAGED))
    ix->n_managed++;
  set_managed_ids(x, identity_id, identity_id_len, extra);
  x->identity_type = identity_type;
  x->flags |= F_MANAGED;
}

static const char *extra_out(const ext_t *e, int k, char *buf) {
  const char *p = e->data + e->xoff[k];
  switch (e->xkind[k]) {
  case X_UUID:
    return uuid_format((const uint8_t *)p, buf);
  case X_TEXT:
    return p;
  default:
    return NULL;
  }
}

int zm_index_get_managed(const zm_index_t *ix, const char *zid, size_t len,
                         zm_index_managed_t *out) {
  int found;
  size_t i = table_find(ix, zid, len, tag_of(zid, len), &found);
  if (!found)
    return 0;
  const rec_t *x = rec_at(ix, ix->slots[i].rec);
  if (!(x->flags & F_MANAGED))
    return 0;
  out->identity_type = x->identity_type;
  if (!(x->flags & F_EXT)) {
    out->identity_id = uuid_format(x->u.uuid, out->buf_[0]);
    out->identity_id_len = ZM_INDEX_UUID_LEN;
    out->workload_id = out->agent_id = out->environment_id = NULL;
    return 1;
  }
  const ext_t *e = x->u.ext;
  if (e->idkind == X_UUID) {
    out->identity_id = uuid_format(e->uuid, out->buf_[0]);
    out->identity_id_len = ZM_INDEX_UUID_LEN;
  } else {
    out->identity_id = e->data + e->keylen;
    out->identity_id_len = e->idlen;
  }
  out->workload_id = extra_out(e, 0, out->buf_[1]);
  out->agent_id = extra_out(e, 1, out->buf_[2]);
  out->environment_id = extra_out(e, 2, out->buf_[3]);
  return 1;
}

void zm_index_clear_managed(zm_index_t *ix) {
  /* Rare (a flood of invalidations): rebuild the table from the records
   * that keep a service view instead of deleting one by one. */
  size_t ocap = ix->mask + 1;
  slot_t *old = ix->slots;
  size_t cap = MIN_CAP;
  while (over_load(ix->n_service, cap))
    cap *= 2;
  table_init(ix, cap);
  for (size_t i = 0; i < ocap; i++) {
    if (old[i].tag == 0)
      continue;
    rec_t *x = rec_at(ix, old[i].rec);
    if (x->flags & F_SERVICE) {
      clear_managed_ids(x);
      x->flags &= (uint8_t)~F_MANAGED;
      table_place(ix->slots, ix->mask, old[i]);
      ix->count++;
    } else {
      x->flags &= (uint8_t)~F_MANAGED;
      rec_release(ix, old[i].rec);
    }
  }
  free(old);
  ix->n_managed = 0;
}

int zm_index_del_managed(zm_index_t *ix, const char *zid, size_t len) {
  int found;
  size_t i = table_find(ix, zid, len, tag_of(zid, len), &found);
  if (!found)
    return 0;
  rec_t *x = rec_at(ix, ix->slots[i].rec);
  if (!(x->flags & F_MANAGED))
    return 0;
  clear_managed_ids(x);
  x->flags &= (uint8_t)~F_MANAGED;
  ix->n_managed--;
  maybe_drop(ix, i);
  return 1;
}

zm_index_service_t *zm_index_put_service(zm_index_t *ix, const char *zid,
                                         size_t len, int64_t lease_expires_ms) {
  rec_t *x = rec_for_put(ix, zid, len);
  if (!(x->flags & F_SERVICE))
    ix->n_service++;
  x->flags |= F_SERVICE;
  x->svc = (zm_index_service_t){.lease_expires_ms = lease_expires_ms,
                                .state = ZM_LEASE_LIVE};
  return &x->svc;
}

zm_index_service_t *zm_index_lookup_service(const zm_index_t *ix,
                                            const char *zid, size_t len) {
  int found;
  size_t i = table_find(ix, zid, len, tag_of(zid, len), &found);
  if (!found)
    return NULL;
  rec_t *x = rec_at(ix, ix->slots[i].rec);
  return (x->flags & F_SERVICE) ? &x->svc : NULL;
}

int zm_index_del_service(zm_index_t *ix, const char *zid, size_t len) {
  int found;
  size_t i = table_find(ix, zid, len, tag_of(zid, len), &found);
  if (!found)
    return 0;
  rec_t *x = rec_at(ix, ix->slots[i].rec);
  if (!(x->flags & F_SERVICE))
    return 0;
  x->flags &= (uint8_t)~F_SERVICE;
  ix->n_service--;
  maybe_drop(ix, i);
  return 1;
}

size_t zm_index_managed_count(const zm_index_t *ix) { return ix->n_managed; }

size_t zm_index_service_count(const zm_index_t *ix) { return ix->n_service; }
