/*
 * index.h - the in-memory index of managed identities and service leases.
 *
 * Loaded from the store at start-up and kept in step with it by the RPC
 * handlers, so that ResolveIdentity and the NOT_FOUND check of
 * ExtendIdentityLease cost one hash lookup and never touch the store or the
 * controller. Synchronous by design (the names say so: *_lookup, *_get).
 * Keys are byte strings (ptr, len); the index copies what it keeps. One
 * entry per key carries both views (managed, service), each present or not.
 */
#ifndef ZM_INDEX_H
#define ZM_INDEX_H

#include "zm/zm.h"

#include <stddef.h>
#include <stdint.h>

typedef struct zm_index zm_index_t;

/* ZM_INDEX_UUID_LEN: a canonical UUID's text, "xxxxxxxx-xxxx-...". */
#define ZM_INDEX_UUID_LEN 36

/* A managed identity as zm_index_get_managed hands it out. The index keeps
 * canonical lowercase UUIDs as 16 bytes and formats them into buf_ on the
 * way out; any other text is kept as given and pointed to. Every pointer is
 * valid while this struct lives and the entry is neither replaced nor
 * removed. */
typedef struct {
  const char *identity_id; /* NUL-terminated; identity_id_len bytes */
  size_t identity_id_len;
  int identity_type;
  /* NULL when not recorded */
  const char *workload_id, *agent_id, *environment_id;
  char buf_[4][ZM_INDEX_UUID_LEN + 1]; /* private: formatted UUIDs */
} zm_index_managed_t;

/* The optional columns ResolveIdentity returns (any may be NULL). */
typedef struct {
  const char *workload_id, *agent_id, *environment_id;
} zm_index_extra_t;

/* Service-identity lease states (GC). */
enum { ZM_LEASE_LIVE = 0, ZM_LEASE_DELETING = 1 };

/* The service view of an entry, handed out mutable (callers update the lease
 * and state in place). Only what the lease paths read: the row's service_type
 * and created_at stay in the store, where collection reads them.
 *
 * A pending refresh (a lease answered from memory, not yet flushed to the
 * store) is kept as its distance past the durable lease: it only matters
 * while it is above the durable one, and 32 bits of distance (49 days) keep
 * the entry at 16 bytes, which is what every index record pays. Read and
 * write it through the helpers below; a direct write of lease_expires_ms
 * would move the pending value along with it. */
typedef struct {
  int64_t lease_expires_ms;  /* the lease as last known durable (store clock);
                                move it with zm_index_set_expires_ms */
  uint32_t pending_delta_ms; /* pending refresh - lease_expires_ms; 0 = none */
  uint8_t state;             /* ZM_LEASE_*: DELETING once its tombstone is
                                durable */
  uint8_t queued;            /* on the lifecycle's flush list */
} zm_index_service_t;

/* The pending refresh's lease (store clock), or 0 when there is none. */
static inline int64_t zm_index_pending_ms(const zm_index_service_t *s) {
  return s->pending_delta_ms != 0
             ? s->lease_expires_ms + (int64_t)s->pending_delta_ms
             : 0;
}

/* Sets the pending refresh to abs_ms; one at or below the durable lease is
 * none. The caller keeps abs_ms - lease_expires_ms <= UINT32_MAX (a lease
 * further ahead must go to the store directly); more is a bug and aborts. */
static inline void zm_index_set_pending_ms(zm_index_service_t *s,
                                           int64_t abs_ms) {
  if (abs_ms <= s->lease_expires_ms) {
    s->pending_delta_ms = 0;
    return;
  }
  /* unsigned: exact for any abs_ms > lease_expires_ms, no signed overflow */
  uint64_t d = (uint64_t)abs_ms - (uint64_t)s->lease_expires_ms;
  ZM_ASSERT(d <= UINT32_MAX);
  s->pending_delta_ms = (uint32_t)d;
}

/* Moves the durable lease to ms, keeping the pending refresh's value (it
 * becomes none once the durable lease reaches it). */
static inline void zm_index_set_expires_ms(zm_index_service_t *s, int64_t ms) {
  if (s->pending_delta_ms == 0) {
    s->lease_expires_ms = ms;
    return;
  }
  int64_t pending = zm_index_pending_ms(s);
  s->lease_expires_ms = ms;
  zm_index_set_pending_ms(s, pending);
}

zm_index_t *zm_index_new(void);
void zm_index_free(zm_index_t *ix);

/* Inserts or replaces. */
void zm_index_put_managed(zm_index_t *ix, const char *zid, size_t zid_len,
                          const char *identity_id, size_t identity_id_len,
                          int identity_type);
/* The same, with the optional columns (extra may be NULL). */
void zm_index_put_managed_ext(zm_index_t *ix, const char *zid, size_t zid_len,
                              const char *identity_id, size_t identity_id_len,
                              int identity_type, const zm_index_extra_t *extra);
/* 1 and *out filled if present, else 0 (*out untouched). */
int zm_index_get_managed(const zm_index_t *ix, const char *zid, size_t len,
                         zm_index_managed_t *out);
/* Removes every mapping. */
void zm_index_clear_managed(zm_index_t *ix);
/* Returns 1 if removed, 0 if absent. */
int zm_index_del_managed(zm_index_t *ix, const char *zid, size_t len);

/* Inserts or replaces; returns the entry (mutable: callers update lease/state).
 * The pointer stays valid until the service entry is removed: a replacement
 * updates it in place, and neither growth nor other keys move it. */
zm_index_service_t *zm_index_put_service(zm_index_t *ix, const char *zid,
                                         size_t len, int64_t lease_expires_ms);
zm_index_service_t *zm_index_lookup_service(const zm_index_t *ix,
                                            const char *zid, size_t len);
int zm_index_del_service(zm_index_t *ix, const char *zid, size_t len);

size_t zm_index_managed_count(const zm_index_t *ix);
size_t zm_index_service_count(const zm_index_t *ix);

#endif /* ZM_INDEX_H */
