/*
 * health.h - grpc.health.v1.Health/Check. Check answers SERVING/NOT_SERVING
 * for registered service names ("" = the whole server) and NOT_FOUND for any
 * other name, as the gRPC health-checking protocol says. Watch is not offered
 * (UNIMPLEMENTED): clients fall back to polling Check.
 */
#ifndef ZM_HEALTH_H
#define ZM_HEALTH_H

#include "zm/grpc.h"

typedef struct {
  struct {
    const char *name; /* not owned: static strings */
    int serving;
  } services[8];
  size_t n;
} zm_health_t;

void zm_health_init(zm_health_t *h);
/* Registers or updates a service name. */
void zm_health_set(zm_health_t *h, const char *service, int serving);
/* Sets every registered service (used when draining). */
void zm_health_set_all(zm_health_t *h, int serving);
/* The handler; ctx is the zm_health_t. */
void zm_health_check(zm_call_t *call, const ProtobufCMessage *req, void *ctx);

#endif /* ZM_HEALTH_H */
