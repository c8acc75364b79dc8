/*
 * agents.c - CreateAgentIdentity and DeleteIdentity.
 *
 * CreateAgentIdentity follows the Go service: one live identity per agent.
 * Steps (each a callback, every state change through the lifecycle, so
 * durable before the controller call it guards): INTENT (pending row that
 * also locks the agent: a second concurrent call for the same agent gets
 * ABORTED, on any replica) -> REPLACE (the agent's previous identities, by
 * externalId: each retired (LIVE -> DELETING) or, without a mapping,
 * condemned as an orphan, then deleted) -> CREATE -> JWT -> COMMIT (mapping
 * + pending removal in one unit) -> reply id + JWT. A failure after CREATE
 * condemns the new identity (compensation); an unanswered create leaves the
 * pending row to recovery.
 *
 * DeleteIdentity retires the mapping (LIVE -> DELETING: the mapping goes and
 * a tombstone is recorded in one unit), then deletes on the controller; an
 * ambiguous failure leaves the tombstone, which recovery retries.
 */
#include "zm/app.h"
#include "zm/enroll.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COMPENSATE_TIMEOUT_MS 30000u
#define AGENT_IDENTITY_TYPE 1 /* IDENTITY_TYPE_AGENT */

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  char agent_id[37]; /* canonical lower-case UUID */
  char name[96];
  char *id;
  zm_secret_t jwt;
  char **old_ids; /* previous identities of the agent */
  size_t n_old, next_old;
  uint64_t deadline;
  int created_maybe;
  int create_unanswered; /* see saga.c create_answered() */
  zm_grpc_status_t fail_status;
  char fail_msg[256];
} agent_op_t;

/* Accepts the 36-char 8-4-4-4-12 hex form (any case); writes lower case. */
static int parse_uuid(const char *s, char out[37]) {
  if (s == NULL || strlen(s) != 36)
    return -1;
  for (int i = 0; i < 36; i++) {
    char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-')
        return -1;
    } else if (!isxdigit((unsigned char)c)) {
      return -1;
    }
    out[i] = (char)tolower((unsigned char)c);
  }
  out[36] = '\0';
  return 0;
}

/* As every controller caller, plus: a duplicate externalId means another
 * call for the same agent is creating its identity right now. */
static zm_grpc_status_t status_of(const zm_ziti_result_t *r, uint64_t deadline,
                                  uint64_t now) {
  if (r->err == ZM_E_EXISTS)
    return ZM_GRPC_ABORTED;
  return zm_rpc_status_from_ziti(r, deadline, now);
}

/* For lifecycle callbacks that carry only the controller error. */
static zm_grpc_status_t status_of_err(int err) {
  zm_ziti_result_t r = {.err = err};
  return zm_rpc_status_from_ziti(&r, UINT64_MAX, 0);
}

static void agent_free(agent_op_t *a) {
  a->app->enroll_inflight--;
  free(a->id);
  zm_secret_dispose(&a->jwt);
  for (size_t i = 0; i < a->n_old; i++)
    free(a->old_ids[i]);
  free(a->old_ids);
  free(a);
}

static void agent_finish_error(agent_op_t *a) {
  zm_call_fail(a->call, a->fail_status, a->fail_msg);
  agent_free(a);
}

/* ---- compensation ----------------------------------------------------------
 */

static void on_agent_abandoned(int err, void *data) {
  agent_op_t *a = data;
  if (err != 0)
    ZM_WARN("agent %s: cannot drop pending record: %s; recovery will",
            a->name, zm_strerror(err));
  agent_finish_error(a);
}

static void on_agent_condemned(int err, void *data) {
  agent_op_t *a = data;
  if (err != 0)
    ZM_WARN("agent %s: compensation: delete %s failed: %s; it stays DELETING "
            "and is retried",
            a->name, a->id, zm_strerror(err));
  agent_finish_error(a);
}

static void on_agent_comp_found(const zm_ziti_result_t *r, void *data) {
  agent_op_t *a = data;
  if (r->err != 0) {
    ZM_WARN("agent %s: compensation lookup failed: %s; pending record stays "
            "for recovery",
            a->name, zm_strerror(r->err));
    agent_finish_error(a);
    return;
  }
  if (r->n_ids == 0 && a->create_unanswered) {
    ZM_WARN("agent %s: compensation: create unanswered, may still land; "
            "pending record stays for recovery",
            a->name);
    agent_finish_error(a);
    return;
  }
  if (r->n_ids == 0) {
    zm_life_abandon(a->app->life, a->name, on_agent_abandoned, a);
    return;
  }
  a->id = zm_xstrdup(r->ids[0]);
  zm_life_condemn(a->app->life, a->name, a->id, AGENT_IDENTITY_TYPE,
                  on_agent_condemned, a);
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void
agent_fail(agent_op_t *a, zm_grpc_status_t st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(a->fail_msg, sizeof a->fail_msg, fmt, ap);
  va_end(ap);
  a->fail_status = st;
  ZM_WARN("agent %s: %s", a->name, a->fail_msg);
  if (a->id != NULL)
    zm_life_condemn(a->app->life, a->name, a->id, AGENT_IDENTITY_TYPE,
                    on_agent_condemned, a);
  else if (a->created_maybe)
    zm_ziti_find_identities(a->app->ziti, "name", a->name,
                            uv_now(a->app->loop) + COMPENSATE_TIMEOUT_MS,
                            on_agent_comp_found, a);
  else
    zm_life_abandon(a->app->life, a->name, on_agent_abandoned, a);
}

/* ---- the happy path --------------------------------------------------------
 */

static void on_agent_committed(int err, void *data) {
  agent_op_t *a = data;
  if (err != 0) {
    agent_fail(a, ZM_GRPC_UNAVAILABLE, "store: cannot record mapping: %s",
               zm_strerror(err));
    return;
  }
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_RESPONSE__INIT;
  resp.ziti_identity_id = a->id;
  resp.enrollment_jwt = a->jwt.base;
  zm_call_reply(a->call, &resp.base);
  ZM_INFO("agent %s: created identity %s", a->agent_id, a->id);
  agent_free(a);
}

static void on_agent_jwt(const zm_ziti_result_t *r, void *data) {
  agent_op_t *a = data;
  if (r->err != 0 || r->jwt == NULL || r->jwt->base == NULL) {
    if (r->err != 0)
      agent_fail(a, status_of(r, a->deadline, uv_now(a->app->loop)),
                 "controller: read identity: %s", zm_strerror(r->err));
    else
      agent_fail(a, ZM_GRPC_INTERNAL, "identity %s has no ott enrollment",
                 a->id);
    return;
  }
  zm_secret_set(&a->jwt, r->jwt->base, r->jwt->len);
  if (zm_call_is_cancelled(a->call)) {
    agent_fail(a, ZM_GRPC_CANCELLED, "caller cancelled");
    return;
  }
  zm_managed_row_t row = {.ziti_identity_id = a->id,
                          .identity_id = a->agent_id,
                          .identity_type = AGENT_IDENTITY_TYPE,
                          .agent_id = a->agent_id};
  zm_life_commit_managed(a->app->life, a->name, &row, on_agent_committed, a);
}

/* Same rule as saga.c create_answered(). */
static int agent_create_answered(const zm_ziti_result_t *r) {
  if (r->err == ZM_E_NOT_FOUND || r->err == ZM_E_UNAUTHORIZED ||
      r->err == ZM_E_EXISTS || r->err == ZM_E_INVAL || r->err == ZM_E_HTTP ||
      r->err == ZM_E_JSON)
    return 1;
  return r->err == ZM_E_UNAVAILABLE && r->http_status == 500;
}

static void on_agent_created(const zm_ziti_result_t *r, void *data) {
  agent_op_t *a = data;
  if (r->err != 0) {
    a->create_unanswered = !agent_create_answered(r);
    agent_fail(a, status_of(r, a->deadline, uv_now(a->app->loop)),
               "controller: create identity: %s%s", zm_strerror(r->err),
               r->err == ZM_E_EXISTS ? " (externalId in use)" : "");
    return;
  }
  a->id = zm_xstrdup(r->id);
  zm_ziti_get_enrollment_jwt(a->app->ziti, a->id, a->deadline, on_agent_jwt, a);
}

static void agent_create(agent_op_t *a) {
  if (zm_call_is_cancelled(a->call) || uv_now(a->app->loop) >= a->deadline) {
    agent_fail(a,
               zm_call_is_cancelled(a->call) ? ZM_GRPC_CANCELLED
                                             : ZM_GRPC_DEADLINE_EXCEEDED,
               "%s", zm_call_is_cancelled(a->call) ? "caller cancelled"
                                                   : "deadline exceeded");
    return;
  }
  char role[64];
  snprintf(role, sizeof role, "agent-%s", a->agent_id);
  const char *roles[] = {"agents", role};
  a->created_maybe = 1;
  zm_ziti_create_identity(a->app->ziti, a->name, roles, 2, a->agent_id,
                          a->deadline, on_agent_created, a);
}

static void agent_replace_next(agent_op_t *a);

static void on_old_gone(int err, void *data) {
  agent_op_t *a = data;
  const char *old = a->old_ids[a->next_old - 1];
  if (err != 0) {
    agent_fail(a, status_of_err(err),
               "controller: delete previous identity %s: %s (it stays "
               "DELETING and is retried)",
               old, zm_strerror(err));
    return;
  }
  agent_replace_next(a);
}

static void on_old_retired(int err, void *data) {
  agent_op_t *a = data;
  const char *old = a->old_ids[a->next_old - 1];
  if (err == ZM_E_NOT_FOUND) {
    /* no mapping here: an orphan with this agent's externalId */
    zm_life_condemn(a->app->life, NULL, old, AGENT_IDENTITY_TYPE, on_old_gone,
                    a);
    return;
  }
  on_old_gone(err, a);
}

static void agent_replace_next(agent_op_t *a) {
  if (a->next_old < a->n_old) {
    const char *old = a->old_ids[a->next_old++];
    ZM_INFO("agent %s: deleting previous identity %s", a->agent_id, old);
    zm_life_retire_managed(a->app->life, old, on_old_retired, a);
    return;
  }
  agent_create(a);
}

static void on_old_found(const zm_ziti_result_t *r, void *data) {
  agent_op_t *a = data;
  if (r->err != 0) {
    agent_fail(a, status_of(r, a->deadline, uv_now(a->app->loop)),
               "controller: find previous identities: %s", zm_strerror(r->err));
    return;
  }
  a->n_old = r->n_ids;
  a->old_ids = zm_xcalloc(r->n_ids + 1, sizeof *a->old_ids);
  for (size_t i = 0; i < r->n_ids; i++)
    a->old_ids[i] = zm_xstrdup(r->ids[i]);
  agent_replace_next(a);
}

static void on_agent_intent(int err, void *data) {
  agent_op_t *a = data;
  if (err != 0) {
    a->fail_status =
        err == ZM_E_EXISTS ? ZM_GRPC_ABORTED : ZM_GRPC_UNAVAILABLE;
    snprintf(a->fail_msg, sizeof a->fail_msg, "%s",
             err == ZM_E_EXISTS
                 ? "another CreateAgentIdentity for this agent is in "
                   "progress; retry"
                 : "store: cannot record intent");
    agent_finish_error(a);
    return;
  }
  zm_ziti_find_identities(a->app->ziti, "externalId", a->agent_id, a->deadline,
                          on_old_found, a);
}

void zm_rpc_create_agent(zm_call_t *call, const ProtobufCMessage *msg,
                         void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest *req =
      (const void *)msg;
  char uuid[37];
  if (req->agent_id == NULL || req->agent_id[0] == '\0') {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "agent_id is required");
    return;
  }
  if (parse_uuid(req->agent_id, uuid) != 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "agent_id must be a UUID");
    return;
  }
  if (app->ziti == NULL || app->shutting_down) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
                 app->ziti ? "shutting down"
                           : "no OpenZiti controller configured");
    return;
  }
  if (app->enroll_inflight >= app->cfg.enroll_max_inflight) {
    zm_call_fail(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                 "too many creations in flight; retry later");
    return;
  }
  agent_op_t *a = zm_xcalloc(1, sizeof *a);
  a->app = app;
  a->call = call;
  memcpy(a->agent_id, uuid, sizeof uuid);
  char short_id[9];
  if (zm_enroll_short_id(short_id, sizeof short_id) != 0) {
    free(a);
    zm_call_fail(call, ZM_GRPC_INTERNAL, "random number generator failed");
    return;
  }
  snprintf(a->name, sizeof a->name, "agent-%s-%s", uuid, short_id);
  uint64_t now = uv_now(app->loop);
  a->deadline = now + app->cfg.enroll_timeout_ms;
  uint64_t cd = zm_call_deadline(call);
  if (cd != 0 && cd < a->deadline)
    a->deadline = cd;
  app->enroll_inflight++;
  zm_pending_row_t row = {.name = a->name,
                          .kind = ZM_PENDING_AGENT,
                          .type = AGENT_IDENTITY_TYPE,
                          .agent_id = a->agent_id};
  zm_life_intent(app->life, &row, a->deadline, on_agent_intent, a);
}

/* ===================== DeleteIdentity ===================================== */

typedef struct {
  zm_call_t *call;
  char *id; /* arena */
} delete_op_t;

static void on_retired(int err, void *data) {
  delete_op_t *d = data;
  if (err == ZM_E_NOT_FOUND) {
    zm_call_fail(d->call, ZM_GRPC_NOT_FOUND, "identity not found");
    return;
  }
  if (err == ZM_E_STORE) {
    zm_call_fail(d->call, ZM_GRPC_UNAVAILABLE, "store unavailable; retry");
    return;
  }
  if (err != 0) {
    zm_call_fail(d->call, status_of_err(err),
                 "controller: delete identity failed; the mapping is gone and "
                 "the delete is retried in the background");
    return;
  }
  ZM_INFO("deleted identity %s", d->id);
  Agynio__Api__ZitiManagement__V1__DeleteIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_IDENTITY_RESPONSE__INIT;
  zm_call_reply(d->call, &resp.base);
}

void zm_rpc_delete_identity(zm_call_t *call, const ProtobufCMessage *msg,
                            void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__DeleteIdentityRequest *req =
      (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  /* Without a shared store the index holds every mapping. */
  if (!zm_life_read_through(app->life) &&
      zm_index_lookup_managed(app->index, req->ziti_identity_id,
                              strlen(req->ziti_identity_id)) == NULL) {
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, "identity not found");
    return;
  }
  if (app->ziti == NULL) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
                 "no OpenZiti controller configured");
    return;
  }
  delete_op_t *d = zm_call_alloc(call, sizeof *d);
  d->call = call;
  d->id = (char *)req->ziti_identity_id;
  zm_life_retire_managed(app->life, d->id, on_retired, d);
}
