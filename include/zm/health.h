/*
 * health.h - grpc.health.v1.Health. Check answers SERVING/NOT_SERVING for
 * registered service names ("" = the whole server) and NOT_FOUND for any
 * other name, as the gRPC health-checking protocol says. Watch (server
 * streaming) sends the current status at once and then every change;
 * an unknown name gets SERVICE_UNKNOWN (and later changes, should it be
 * registered). zm_health_end_watches() ends every Watch (at drain, after
 * the NOT_SERVING update went out) so that watchers do not hold the drain.
 */
#ifndef ZM_HEALTH_H
#define ZM_HEALTH_H

#include "zm/grpc.h"

/* Watches at once; more get RESOURCE_EXHAUSTED. */
#define ZM_HEALTH_MAX_WATCHES 4096

typedef struct zm_health_watch zm_health_watch_t;

typedef struct {
  struct {
    const char *name; /* not owned: static strings */
    int serving;
  } services[8];
  size_t n;
  zm_health_watch_t **watches; /* open Watch calls */
  size_t n_watches, cap_watches;
  uint64_t watch_updates; /* messages sent to watchers */
} zm_health_t;

void zm_health_init(zm_health_t *h);
/* Frees the watcher table (every Watch must have ended). */
void zm_health_dispose(zm_health_t *h);
/* Registers or updates a service name; watchers of it hear of a change. */
void zm_health_set(zm_health_t *h, const char *service, int serving);
/* Sets every registered service (used when draining). */
void zm_health_set_all(zm_health_t *h, int serving);
/* Ends every Watch with UNAVAILABLE after what was queued for it. */
void zm_health_end_watches(zm_health_t *h);
/* The handler of Check; ctx is the zm_health_t. */
void zm_health_check(zm_call_t *call, const ProtobufCMessage *req, void *ctx);
/* The stream operations of Watch; ctx is the zm_health_t. */
extern const zm_grpc_stream_ops_t zm_health_watch_ops;

#endif /* ZM_HEALTH_H */
