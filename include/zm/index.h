/*
 * index.h - the in-memory index of managed identities and service leases.
 *
 * Loaded from the store at start-up and kept in step with it by the RPC
 * handlers, so that ResolveIdentity and the NOT_FOUND check of
 * ExtendIdentityLease cost one hash lookup and never touch the store or the
 * controller. Synchronous by design (the name says so: *_lookup).
 * Keys are byte strings (ptr, len); the index copies what it keeps.
 */
#ifndef ZM_INDEX_H
#define ZM_INDEX_H

#include <stddef.h>
#include <stdint.h>

typedef struct zm_index zm_index_t;

typedef struct {
  const char *identity_id; /* owned by the index, NUL-terminated */
  size_t identity_id_len;
  int identity_type;
  int64_t created_at_ms;
  /* owned by the index; NULL when not recorded */
  const char *workload_id, *agent_id, *environment_id;
} zm_index_managed_t;

/* The optional columns ResolveIdentity returns (any may be NULL). */
typedef struct {
  const char *workload_id, *agent_id, *environment_id;
} zm_index_extra_t;

/* Service-identity lease states (GC). */
enum { ZM_LEASE_LIVE = 0, ZM_LEASE_DELETING = 1 };

typedef struct {
  int service_type;
  int state;                /* ZM_LEASE_*: DELETING once its tombstone is
                               durable */
  int64_t lease_expires_ms; /* the lease as last known durable (store clock) */
  int64_t lease_pending_ms; /* a refresh answered from memory and not yet
                               flushed to the store; 0 = none */
  int queued;               /* on the lifecycle's flush list */
  int64_t created_at_ms;
} zm_index_service_t;

zm_index_t *zm_index_new(void);
void zm_index_free(zm_index_t *ix);

/* Inserts or replaces. */
void zm_index_put_managed(zm_index_t *ix, const char *zid, size_t zid_len,
                          const char *identity_id, size_t identity_id_len,
                          int identity_type, int64_t created_at_ms);
/* The same, with the optional columns (extra may be NULL). */
void zm_index_put_managed_ext(zm_index_t *ix, const char *zid, size_t zid_len,
                              const char *identity_id, size_t identity_id_len,
                              int identity_type, int64_t created_at_ms,
                              const zm_index_extra_t *extra);
/* NULL if absent. The pointer is valid until the entry is removed/replaced. */
const zm_index_managed_t *zm_index_lookup_managed(const zm_index_t *ix,
                                                  const char *zid, size_t len);
/* Removes every mapping. */
void zm_index_clear_managed(zm_index_t *ix);
/* Returns 1 if removed, 0 if absent. */
int zm_index_del_managed(zm_index_t *ix, const char *zid, size_t len);

/* Inserts or replaces; returns the entry (mutable: callers update lease/state).
 */
zm_index_service_t *zm_index_put_service(zm_index_t *ix, const char *zid,
                                         size_t len, int service_type,
                                         int64_t lease_expires_ms,
                                         int64_t created_at_ms);
zm_index_service_t *zm_index_lookup_service(const zm_index_t *ix,
                                            const char *zid, size_t len);
int zm_index_del_service(zm_index_t *ix, const char *zid, size_t len);

size_t zm_index_managed_count(const zm_index_t *ix);
size_t zm_index_service_count(const zm_index_t *ix);

#endif /* ZM_INDEX_H */
