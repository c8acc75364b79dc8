/* health.c - grpc.health.v1.Health: Check over a small table of services,
 * and Watch (server streaming) with change notifications. */
#include "zm/health.h"

#include "grpc/health/v1/health.pb-c.h"

#include <stdlib.h>
#include <string.h>

/* Longest service name a watcher may ask for. */
#define WATCH_NAME_MAX 256u

struct zm_health_watch {
  zm_health_t *h;
  zm_call_t *call;
  size_t idx;  /* in h->watches; SIZE_MAX before the request arrived */
  char *name;  /* call arena */
  int last;    /* last status sent, -1 none */
  int got_req; /* the one request message arrived */
};

void zm_health_init(zm_health_t *h) { memset(h, 0, sizeof *h); }

void zm_health_dispose(zm_health_t *h) {
  ZM_ASSERT(h->n_watches == 0);
  free(h->watches);
  h->watches = NULL;
  h->cap_watches = 0;
}

static int status_of(const zm_health_t *h, const char *name) {
  for (size_t i = 0; i < h->n; i++)
    if (strcmp(h->services[i].name, name) == 0)
      return h->services[i].serving
                 ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                 : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
  return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
}

static void watch_remove(zm_health_watch_t *w) {
  zm_health_t *h = w->h;
  if (w->idx == SIZE_MAX)
    return;
  size_t i = w->idx;
  h->watches[i] = h->watches[--h->n_watches];
  h->watches[i]->idx = i;
  w->idx = SIZE_MAX;
}

/* Sends the current status if it changed; a watcher whose client stopped
 * reading is ended. Returns 0, or -1 when the watch ended. */
static int watch_update(zm_health_watch_t *w) {
  int st = status_of(w->h, w->name);
  if (st == w->last)
    return 0;
  Grpc__Health__V1__HealthCheckResponse resp =
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = st;
  int rv = zm_call_send(w->call, &resp.base);
  if (rv != 0) {
    watch_remove(w);
    zm_call_finish(w->call,
                   rv == ZM_E_UNAVAILABLE ? ZM_GRPC_RESOURCE_EXHAUSTED
                                          : ZM_GRPC_CANCELLED,
                   "watcher does not read");
    return -1;
  }
  w->last = st;
  w->h->watch_updates++;
  return 0;
}

static void notify(zm_health_t *h) {
  /* walk backwards: an ended watcher is swapped with the last one */
  for (size_t i = h->n_watches; i-- > 0;)
    if (i < h->n_watches)
      watch_update(h->watches[i]);
}

void zm_health_set(zm_health_t *h, const char *service, int serving) {
  size_t i;
  for (i = 0; i < h->n; i++)
    if (strcmp(h->services[i].name, service) == 0)
      break;
  if (i == h->n) {
    ZM_ASSERT(h->n < ZM_ARRAY_SIZE(h->services));
    h->services[h->n].name = service;
    h->n++;
  }
  h->services[i].serving = serving;
  notify(h);
}

void zm_health_set_all(zm_health_t *h, int serving) {
  for (size_t i = 0; i < h->n; i++)
    h->services[i].serving = serving;
  notify(h);
}

void zm_health_end_watches(zm_health_t *h) {
  while (h->n_watches > 0) {
    zm_health_watch_t *w = h->watches[h->n_watches - 1];
    watch_remove(w);
    zm_call_finish(w->call, ZM_GRPC_UNAVAILABLE, "server is shutting down");
  }
}

void zm_health_check(zm_call_t *call, const ProtobufCMessage *msg, void *ctx) {
  const zm_health_t *h = ctx;
  const Grpc__Health__V1__HealthCheckRequest *req =
      (const Grpc__Health__V1__HealthCheckRequest *)msg;
  const char *name = req->service ? req->service : "";
  int st = status_of(h, name);
  if (st ==
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN) {
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, "unknown service");
    return;
  }
  Grpc__Health__V1__HealthCheckResponse resp =
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  resp.status = st;
  zm_call_reply(call, &resp.base);
}

/* ===================== Watch ============================================= */

static void on_watch_cancel(zm_call_t *call, void *data) {
  zm_health_watch_t *w = data;
  watch_remove(w);
  zm_call_finish(call, ZM_GRPC_CANCELLED, "cancelled");
}

static void watch_open(zm_call_t *call, void *ctx) {
  zm_health_watch_t *w = zm_call_alloc(call, sizeof *w);
  memset(w, 0, sizeof *w);
  w->h = ctx;
  w->call = call;
  w->idx = SIZE_MAX;
  w->last = -1;
  zm_call_on_cancel(call, on_watch_cancel, w);
}

static zm_health_watch_t *watch_of(zm_call_t *call);

static void watch_message(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_health_t *h = ctx;
  zm_health_watch_t *w = watch_of(call);
  const Grpc__Health__V1__HealthCheckRequest *req = (const void *)msg;
  if (w->got_req) {
    watch_remove(w);
    zm_call_finish(call, ZM_GRPC_INTERNAL,
                   "more than one request message for Watch");
    return;
  }
  w->got_req = 1;
  const char *name = req->service ? req->service : "";
  if (strlen(name) > WATCH_NAME_MAX) {
    zm_call_finish(call, ZM_GRPC_INVALID_ARGUMENT, "service name too long");
    return;
  }
  if (h->n_watches >= ZM_HEALTH_MAX_WATCHES) {
    zm_call_finish(call, ZM_GRPC_RESOURCE_EXHAUSTED, "too many watchers");
    return;
  }
  w->name = zm_call_strdup(call, name);
  if (h->n_watches == h->cap_watches) {
    h->cap_watches = h->cap_watches ? h->cap_watches * 2 : 16;
    h->watches = zm_xrealloc(h->watches, h->cap_watches * sizeof *h->watches);
  }
  w->idx = h->n_watches;
  h->watches[h->n_watches++] = w;
  watch_update(w);
}

static void watch_half_close(zm_call_t *call, void *ctx) {
  (void)ctx;
  zm_health_watch_t *w = watch_of(call);
  if (!w->got_req)
    zm_call_finish(call, ZM_GRPC_INTERNAL, "missing request message");
  /* else: keep watching; the client may half-close right after its request */
}

/* The watch state is the cancel callback's data: one place, no lookup. */
static zm_health_watch_t *watch_of(zm_call_t *call) {
  return zm__call_cancel_data(call);
}

const zm_grpc_stream_ops_t zm_health_watch_ops = {
    .on_open = watch_open,
    .on_message = watch_message,
    .on_half_close = watch_half_close,
};
