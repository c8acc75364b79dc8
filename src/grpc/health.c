/* health.c - grpc.health.v1.Health/Check over a small table of services. */
#include "zm/health.h"

#include "grpc/health/v1/health.pb-c.h"

#include <string.h>

void zm_health_init(zm_health_t *h) { memset(h, 0, sizeof *h); }

void zm_health_set(zm_health_t *h, const char *service, int serving) {
  for (size_t i = 0; i < h->n; i++) {
    if (strcmp(h->services[i].name, service) == 0) {
      h->services[i].serving = serving;
      return;
    }
  }
  ZM_ASSERT(h->n < ZM_ARRAY_SIZE(h->services));
  h->services[h->n].name = service;
  h->services[h->n].serving = serving;
  h->n++;
}

void zm_health_set_all(zm_health_t *h, int serving) {
  for (size_t i = 0; i < h->n; i++)
    h->services[i].serving = serving;
}

void zm_health_check(zm_call_t *call, const ProtobufCMessage *msg, void *ctx) {
  const zm_health_t *h = ctx;
  const Grpc__Health__V1__HealthCheckRequest *req =
      (const Grpc__Health__V1__HealthCheckRequest *)msg;
  const char *name = req->service ? req->service : "";
  for (size_t i = 0; i < h->n; i++) {
    if (strcmp(h->services[i].name, name) == 0) {
      Grpc__Health__V1__HealthCheckResponse resp =
          GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
      resp.status =
          h->services[i].serving
              ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
              : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
      zm_call_reply(call, &resp.base);
      return;
    }
  }
  zm_call_fail(call, ZM_GRPC_NOT_FOUND, "unknown service");
}
