/*
 * saga.c - RequestServiceIdentity and CreateAgentIdentity as explicit state
 * machines on one engine (see include/zm/enroll.h for the states and the
 * guarantees).
 *
 * Ownership: the saga object is malloc'd per request and owns every buffer
 * it holds; secrets (JWT, one-time token inside the claims, private key,
 * identity JSON) live in zm_secret_t and are wiped as soon as the next state
 * no longer needs them, and again in saga_free. The gRPC call is held until
 * the saga finishes it exactly once (REPLY, or the error after COMPENSATE).
 */
#include "zm/app.h"
#include "zm/audit.h"
#include "zm/crypto.h"
#include "zm/enroll.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Compensation and recovery get their own time budget, not the caller's. */
#define COMPENSATE_TIMEOUT_MS 30000u
#define SHORT_ID_LEN 10
#define AGENT_SHORT_ID_LEN 8
#define AGENT_IDENTITY_TYPE 1 /* IDENTITY_TYPE_AGENT */

typedef struct enroll {
  zm_app_t *app;
  zm_call_t *call;
  zm_enroll_kind_t kind;
  zm_enroll_state_t state;
  const zm_service_type_t *type; /* service sagas */
  char agent_id[37];             /* agent sagas: canonical lower-case UUID */
  char **old_ids;                /* REPLACE: the agent's previous identities */
  size_t n_old, next_old;
  char name[96];
  char *id;       /* controller identity id (owned) */
  char *zt_api;   /* iss + /edge/client/v1 (owned) */
  char *csr_pem;  /* owned */
  char *cert_pem; /* owned */
  zm_secret_t jwt;
  zm_jwt_claims_t claims; /* jti is a secret */
  zm_secret_t key_pem;
  zm_secret_t json;
  uint64_t deadline; /* uv_now() ms */
  uint64_t started;  /* uv_now() ms */
  int cancelled;
  int created_maybe;     /* CREATE was sent: compensation needed on failure */
  int create_unanswered; /* CREATE failed without a conclusive answer */
  zm_grpc_status_t fail_status;
  char fail_msg[256];
  zm_work_t work; /* VERIFY_JWT, then KEYGEN_CSR: one at a time */
  int work_rv;
  uint8_t *cert_der; /* VERIFY_JWT: controller's leaf certificate (owned) */
  size_t cert_der_len;
  int64_t verify_now_s;
} enroll_t;

static void enroll_set_state(enroll_t *e, zm_enroll_state_t next);
static void enroll_fail(enroll_t *e, zm_grpc_status_t st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ===================== state table ======================================= */

static const char *const NAMES[] = {
#define X(s) #s,
    ZM_ENROLL_STATES(X)
#undef X
};

const char *zm_enroll_state_name(zm_enroll_state_t s) {
  return (unsigned)s < ZM_ENROLL__COUNT ? NAMES[s] : "?";
}

#define B(s) (1u << ZM_ENROLL_##s)
/* Allowed successors of each state, per kind. */
static const unsigned EDGES[2][ZM_ENROLL__COUNT] = {
    [ZM_ENROLL_KIND_SERVICE] =
        {
            [ZM_ENROLL_INTENT] = B(CREATE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            [ZM_ENROLL_FETCH_JWT] = B(VERIFY_JWT) | B(COMPENSATE),
            [ZM_ENROLL_VERIFY_JWT] = B(KEYGEN_CSR) | B(COMPENSATE),
            [ZM_ENROLL_KEYGEN_CSR] = B(SIGN) | B(COMPENSATE),
            [ZM_ENROLL_SIGN] = B(ASSEMBLE) | B(COMPENSATE),
            [ZM_ENROLL_ASSEMBLE] = B(COMMIT) | B(COMPENSATE),
            [ZM_ENROLL_COMMIT] = B(REPLY) | B(COMPENSATE),
            [ZM_ENROLL_REPLY] = B(DONE),
            [ZM_ENROLL_COMPENSATE] = B(DONE),
        },
    [ZM_ENROLL_KIND_AGENT] =
        {
            [ZM_ENROLL_INTENT] = B(REPLACE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_REPLACE] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            [ZM_ENROLL_FETCH_JWT] = B(COMMIT) | B(COMPENSATE),
            [ZM_ENROLL_COMMIT] = B(REPLY) | B(COMPENSATE),
            [ZM_ENROLL_REPLY] = B(DONE),
            [ZM_ENROLL_COMPENSATE] = B(DONE),
        },
};
#undef B

int zm_enroll_edge_ok(zm_enroll_kind_t kind, zm_enroll_state_t a,
                      zm_enroll_state_t b) {
  return (unsigned)kind < 2 && (unsigned)a < ZM_ENROLL__COUNT &&
         (unsigned)b < ZM_ENROLL__COUNT && (EDGES[kind][a] & (1u << b)) != 0;
}

int zm_enroll_short_id(char *out, size_t n) {
  static const char ALNUM[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  uint8_t rnd[32];
  if (n == 0 || n - 1 > sizeof rnd || zm_random_bytes(rnd, n - 1) != 0)
    return ZM_E_CRYPTO;
  for (size_t i = 0; i + 1 < n; i++)
    out[i] = ALNUM[rnd[i] % 36]; /* slight bias is irrelevant for names */
  out[n - 1] = '\0';
  return 0;
}

/* ===================== lifecycle ========================================= */

static void saga_free(enroll_t *e) {
  zm_app_t *app = e->app;
  app->stats.enroll_gauge[e->state]--;
  app->enroll_inflight--;
  free(e->id);
  free(e->zt_api);
  free(e->csr_pem);
  free(e->cert_pem);
  free(e->cert_der);
  for (size_t i = 0; i < e->n_old; i++)
    free(e->old_ids[i]);
  free(e->old_ids);
  zm_secret_dispose(&e->jwt);
  zm_jwt_claims_dispose(&e->claims);
  zm_secret_dispose(&e->key_pem);
  zm_secret_dispose(&e->json);
  free(e);
}

static void enroll_fail(enroll_t *e, zm_grpc_status_t st, const char *fmt,
                        ...) {
  if (e->fail_status == ZM_GRPC_OK) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->fail_msg, sizeof e->fail_msg, fmt, ap);
    va_end(ap);
    e->fail_status = st;
  }
  ZM_WARN("enroll %s: failed in %s: %s", e->name, NAMES[e->state], e->fail_msg);
  if (e->state == ZM_ENROLL_INTENT) {
    /* no intent was recorded: nothing to compensate */
    e->app->stats.enroll_failed++;
    zm_call_fail(e->call, e->fail_status, e->fail_msg);
    enroll_set_state(e, ZM_ENROLL_DONE);
    return;
  }
  enroll_set_state(e, ZM_ENROLL_COMPENSATE);
}

/* Maps a controller-client failure to a gRPC status + operator message. */
static void fail_from_ziti(enroll_t *e, const char *what,
                           const zm_ziti_result_t *r) {
  zm_grpc_status_t st =
      e->kind == ZM_ENROLL_KIND_AGENT && r->err == ZM_E_EXISTS
          ? ZM_GRPC_ABORTED /* externalId in use: a concurrent creation */
          : zm_rpc_status_from_ziti(r, e->deadline, uv_now(e->app->loop));
  enroll_fail(e, st, "controller %s: %s%s%s%s", what, zm_strerror(r->err),
              r->code ? " (" : "", r->code ? r->code : "", r->code ? ")" : "");
}

/* Between states: a caller that went away or ran out of time stops the saga
 * before COMMIT; from COMMIT on, it runs to the end. */
static int enroll_should_stop(enroll_t *e) {
  if (e->state >= ZM_ENROLL_COMMIT)
    return 0;
  if (e->cancelled) {
    enroll_fail(e, ZM_GRPC_CANCELLED, "caller cancelled");
    return 1;
  }
  if (uv_now(e->app->loop) >= e->deadline) {
    enroll_fail(e, ZM_GRPC_DEADLINE_EXCEEDED, "deadline exceeded");
    return 1;
  }
  return 0;
}

static void on_call_cancelled(zm_call_t *c, void *data) {
  (void)c;
  enroll_t *e = data;
  e->cancelled = 1;
}

/* ===================== states ============================================= */

static void on_intent_done(int err, void *data) {
  enroll_t *e = data;
  if (err == ZM_E_EXISTS && e->kind == ZM_ENROLL_KIND_AGENT) {
    enroll_fail(e, ZM_GRPC_ABORTED,
                "another CreateAgentIdentity for this agent is in progress; "
                "retry");
    return;
  }
  if (err != 0) {
    enroll_fail(e, err == ZM_E_STORE ? ZM_GRPC_UNAVAILABLE : ZM_GRPC_INTERNAL,
                "store: cannot record intent: %s", zm_strerror(err));
    return;
  }
  if (e->cancelled || uv_now(e->app->loop) >= e->deadline) {
    /* nothing exists on the controller yet: just drop the intent */
    e->fail_status =
        e->cancelled ? ZM_GRPC_CANCELLED : ZM_GRPC_DEADLINE_EXCEEDED;
    snprintf(e->fail_msg, sizeof e->fail_msg, "%s",
             e->cancelled ? "caller cancelled" : "deadline exceeded");
    enroll_set_state(e, ZM_ENROLL_COMPENSATE);
    return;
  }
  enroll_set_state(e, e->kind == ZM_ENROLL_KIND_AGENT ? ZM_ENROLL_REPLACE
                                                      : ZM_ENROLL_CREATE);
}

static int identity_type(const enroll_t *e) {
  return e->kind == ZM_ENROLL_KIND_AGENT ? AGENT_IDENTITY_TYPE
                                         : e->type->number;
}

static void enroll_on_intent(enroll_t *e) {
  zm_pending_row_t row = {
      .name = e->name,
      .kind = e->kind == ZM_ENROLL_KIND_AGENT ? ZM_PENDING_AGENT
                                              : ZM_PENDING_SERVICE,
      .type = identity_type(e),
      .agent_id = e->kind == ZM_ENROLL_KIND_AGENT ? e->agent_id : NULL};
  zm_life_intent(e->app->life, &row, e->deadline, on_intent_done, e);
}

/* ---- REPLACE (agents): one live identity per agent ------------------------
 */

static void replace_next(enroll_t *e);

static void on_old_gone(int err, void *data) {
  enroll_t *e = data;
  if (err != 0) {
    zm_ziti_result_t r = {.err = err};
    fail_from_ziti(e,
                   "delete previous identity (it stays DELETING and is "
                   "retried)",
                   &r);
    return;
  }
  replace_next(e);
}

static void on_old_retired(int err, void *data) {
  enroll_t *e = data;
  const char *old = e->old_ids[e->next_old - 1];
  if (err == ZM_E_NOT_FOUND) {
    /* no mapping: an orphan that carries this agent's externalId */
    zm_life_condemn(e->app->life, NULL, old, AGENT_IDENTITY_TYPE, on_old_gone,
                    e);
    return;
  }
  if (err == ZM_E_STORE) {
    enroll_fail(e, ZM_GRPC_UNAVAILABLE,
                "store: cannot retire previous identity %s", old);
    return;
  }
  on_old_gone(err, e);
}

static void replace_next(enroll_t *e) {
  if (enroll_should_stop(e))
    return;
  if (e->next_old < e->n_old) {
    const char *old = e->old_ids[e->next_old++];
    ZM_INFO("enroll %s: deleting the agent's previous identity %s", e->name,
            old);
    zm_audit("agent_identity_replaced", "agent", e->agent_id, "old_id", old,
             NULL);
    zm_life_retire_managed(e->app->life, old, on_old_retired, e);
    return;
  }
  enroll_set_state(e, ZM_ENROLL_CREATE);
}

static void on_old_found(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    fail_from_ziti(e, "find previous identities", r);
    return;
  }
  e->n_old = r->n_ids;
  e->old_ids = zm_xcalloc(r->n_ids + 1, sizeof *e->old_ids);
  for (size_t i = 0; i < r->n_ids; i++)
    e->old_ids[i] = zm_xstrdup(r->ids[i]);
  replace_next(e);
}

static void enroll_on_replace(enroll_t *e) {
  zm_ziti_find_identities(e->app->ziti, "externalId", e->agent_id, e->deadline,
                          on_old_found, e);
}

/* Fix (test_enroll.py, create_unanswered_then_lands_late): did the
 * controller give a final answer to the create? Only then does a lookup by
 * name that finds nothing prove that nothing was created. Without one
 * (timeout, connection lost, 502/503/504 that a proxy may send while the
 * controller still works on it) the create may still land later. */
static int create_answered(const zm_ziti_result_t *r) {
  switch (r->err) {
  case ZM_E_NOT_FOUND:
  case ZM_E_UNAUTHORIZED:
  case ZM_E_EXISTS:
  case ZM_E_INVAL:
  case ZM_E_HTTP:
  case ZM_E_JSON:
    return 1;
  case ZM_E_UNAVAILABLE:
    return r->http_status == 500; /* 429/503 retried: status may be stale */
  default:
    return 0;
  }
}

static void on_created(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    e->create_unanswered = !create_answered(r);
    fail_from_ziti(e, "create identity", r);
    return;
  }
  e->id = zm_xstrdup(r->id);
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_FETCH_JWT);
}

static void enroll_on_create(enroll_t *e) {
  const char *roles[ZM_MAX_ROLES];
  size_t n_roles = 0;
  char agent_role[64];
  if (e->kind == ZM_ENROLL_KIND_AGENT) {
    snprintf(agent_role, sizeof agent_role, "agent-%s", e->agent_id);
    roles[n_roles++] = "agents";
    roles[n_roles++] = agent_role;
  } else {
    for (; n_roles < e->type->n_roles; n_roles++)
      roles[n_roles] = e->type->roles[n_roles];
  }
  e->created_maybe = 1;
  zm_ziti_create_identity(e->app->ziti, e->name, roles, n_roles,
                          e->kind == ZM_ENROLL_KIND_AGENT ? e->agent_id : NULL,
                          e->deadline, on_created, e);
}

static void on_jwt(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    fail_from_ziti(e, "read identity", r);
    return;
  }
  if (r->jwt == NULL || r->jwt->base == NULL) {
    enroll_fail(e, ZM_GRPC_INTERNAL,
                "controller returned identity %s without an ott enrollment",
                e->id);
    return;
  }
  zm_secret_set(&e->jwt, r->jwt->base, r->jwt->len);
  /* An agent enrolls itself with the JWT; a service identity is enrolled
   * here, after the JWT proved to come from the controller. */
  if (!enroll_should_stop(e))
    enroll_set_state(e, e->kind == ZM_ENROLL_KIND_AGENT ? ZM_ENROLL_COMMIT
                                                        : ZM_ENROLL_VERIFY_JWT);
}

static void enroll_on_fetch_jwt(enroll_t *e) {
  zm_ziti_get_enrollment_jwt(e->app->ziti, e->id, e->deadline, on_jwt, e);
}

/* Signature verification is CPU work (ECDSA/RSA): on the crypto workers,
 * like key generation. Touches only the fields set up for it. */
static void verify_work(zm_work_t *w) {
  enroll_t *e = container_of(w, enroll_t, work);
  e->work_rv =
      zm_jwt_verify(e->jwt.base, e->jwt.len, e->cert_der, e->cert_der_len,
                    e->id, e->verify_now_s, &e->claims);
}

static void verify_done(zm_work_t *w, int status) {
  enroll_t *e = container_of(w, enroll_t, work);
  zm_secret_dispose(&e->jwt); /* the claims hold what we still need */
  free(e->cert_der);
  e->cert_der = NULL;
  int rv = status != 0 ? status : e->work_rv;
  e->work_rv = 0;
  if (rv != 0) {
    enroll_fail(e, ZM_GRPC_INTERNAL,
                "enrollment JWT of %s rejected: %s (checked against the "
                "controller's TLS server certificate)",
                e->id, zm_strerror(rv));
    return;
  }
  size_t n = strlen(e->claims.iss);
  e->zt_api = zm_xmalloc(n + sizeof "/edge/client/v1");
  memcpy(e->zt_api, e->claims.iss, n);
  memcpy(e->zt_api + n, "/edge/client/v1", sizeof "/edge/client/v1");
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_KEYGEN_CSR);
}

static void enroll_on_verify_jwt(enroll_t *e) {
  size_t der_len = 0;
  const uint8_t *der = zm_ziti_server_cert(e->app->ziti, &der_len);
  if (der == NULL) {
    enroll_fail(e, ZM_GRPC_UNAVAILABLE,
                "controller server certificate not known yet");
    return;
  }
  /* a copy: the client replaces its certificate on the next handshake */
  e->cert_der = zm_xmalloc(der_len);
  memcpy(e->cert_der, der, der_len);
  e->cert_der_len = der_len;
  e->verify_now_s = zm_wall_ms() / 1000;
  int rv =
      zm_workers_queue(e->app->workers, &e->work, verify_work, verify_done);
  if (rv != 0) {
    free(e->cert_der);
    e->cert_der = NULL;
    enroll_fail(e, ZM_GRPC_INTERNAL, "cannot queue JWT verification: %s",
                uv_strerror(rv));
  }
}

/* Runs on a crypto worker thread: touches only e->key_pem/csr_pem/work_rv. */
static void keygen_work(zm_work_t *w) {
  enroll_t *e = container_of(w, enroll_t, work);
  e->work_rv =
      zm_keycsr_generate(e->app->cfg.key_alg, e->id, &e->key_pem, &e->csr_pem);
}

static void keygen_done(zm_work_t *w, int status) {
  enroll_t *e = container_of(w, enroll_t, work);
  if (status != 0 || e->work_rv != 0) {
    enroll_fail(e, ZM_GRPC_INTERNAL, "key/CSR generation failed: %s",
                zm_strerror(status != 0 ? status : e->work_rv));
    return;
  }
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_SIGN);
}

static void enroll_on_keygen_csr(enroll_t *e) {
  int rv =
      zm_workers_queue(e->app->workers, &e->work, keygen_work, keygen_done);
  if (rv != 0)
    enroll_fail(e, ZM_GRPC_INTERNAL, "cannot queue key generation: %s",
                uv_strerror(rv));
}

static void on_signed(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  free(e->csr_pem);
  e->csr_pem = NULL;
  if (r->err != 0) {
    fail_from_ziti(e, "enroll", r);
    return;
  }
  e->cert_pem = zm_xstrdup(r->cert_pem);
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_ASSEMBLE);
}

static void enroll_on_sign(enroll_t *e) {
  zm_ziti_enroll_ott(e->app->ziti, e->claims.jti.base, e->csr_pem, e->deadline,
                     on_signed, e);
}

static void assemble(enroll_t *e) {
  const char *ca = zm_ziti_ca_bundle(e->app->ziti);
  int rv =
      zm_idjson_build(e->zt_api, e->key_pem.base, e->cert_pem, ca, &e->json);
  zm_secret_dispose(&e->key_pem);
  zm_jwt_claims_dispose(&e->claims);
  if (rv != 0) {
    enroll_fail(e, ZM_GRPC_INTERNAL, "cannot assemble identity JSON: %s",
                zm_strerror(rv));
    return;
  }
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_COMMIT);
}

static void on_ca_bundle(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0 || zm_ziti_ca_bundle(e->app->ziti) == NULL) {
    fail_from_ziti(e, "CA bundle (/.well-known/est/cacerts)", r);
    return;
  }
  assemble(e);
}

static void enroll_on_assemble(enroll_t *e) {
  /* The bundle is cached and refreshed on a timer; fetched here only when the
   * service has not got it yet (first enrollments after start-up). */
  if (zm_ziti_ca_bundle(e->app->ziti) == NULL)
    zm_ziti_fetch_ca_bundle(e->app->ziti, e->deadline, on_ca_bundle, e);
  else
    assemble(e);
}

static void on_committed(int err, void *data) {
  enroll_t *e = data;
  if (err != 0) {
    enroll_fail(e, ZM_GRPC_UNAVAILABLE, "store: cannot commit %s: %s", e->id,
                zm_strerror(err));
    return;
  }
  enroll_set_state(e, ZM_ENROLL_REPLY);
}

static void enroll_on_commit(enroll_t *e) {
  /* The index learns the lease or mapping once it is durable, never
   * before. */
  if (e->kind == ZM_ENROLL_KIND_AGENT) {
    zm_managed_row_t row = {.ziti_identity_id = e->id,
                            .identity_id = e->agent_id,
                            .identity_type = AGENT_IDENTITY_TYPE,
                            .agent_id = e->agent_id};
    zm_life_commit_managed(e->app->life, e->name, &row, on_committed, e);
    return;
  }
  zm_life_commit_service(e->app->life, e->name, e->id, e->type->number,
                         on_committed, e);
}

static void enroll_on_reply(enroll_t *e) {
  if (e->kind == ZM_ENROLL_KIND_AGENT) {
    Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse ar =
        AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_RESPONSE__INIT;
    ar.ziti_identity_id = e->id;
    ar.enrollment_jwt = e->jwt.base;
    zm_call_reply(e->call, &ar.base);
    zm_secret_dispose(&e->jwt);
    e->app->stats.enroll_ok++;
    ZM_INFO("enroll %s: agent %s has identity %s", e->name, e->agent_id, e->id);
    enroll_set_state(e, ZM_ENROLL_DONE);
    return;
  }
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_RESPONSE__INIT;
  resp.ziti_identity_id = e->id;
  resp.identity_json.data = (uint8_t *)e->json.base;
  resp.identity_json.len = e->json.len;
  zm_call_reply(e->call, &resp.base);
  /* the packed copy lives in the call arena until the response is sent;
   * our copy goes now */
  zm_secret_dispose(&e->json);
  e->app->stats.enroll_ok++;
  ZM_INFO("enroll %s: enrolled %s (%s) in %llu ms", e->name, e->id,
          e->type->name,
          (unsigned long long)(uv_now(e->app->loop) - e->started));
  enroll_set_state(e, ZM_ENROLL_DONE);
}

/* ---- compensation ---------------------------------------------------------
 */

static void compensate_finish(enroll_t *e, int ok) {
  zm_audit("compensated", "name", e->name, "id", e->id, "result",
           ok ? "resolved" : "left to recovery", NULL);
  if (ok)
    e->app->stats.enroll_compensated++;
  else
    e->app->stats.enroll_compensate_failed++;
  e->app->stats.enroll_failed++;
  zm_call_fail(e->call, e->fail_status, e->fail_msg);
  enroll_set_state(e, ZM_ENROLL_DONE);
}

static void on_abandoned(int err, void *data) {
  enroll_t *e = data;
  if (err != 0)
    ZM_WARN("enroll %s: cannot drop pending record (%s); recovery will",
            e->name, zm_strerror(err));
  compensate_finish(e, 1);
}

/* Nothing was created: PENDING -> GONE. */
static void abandon(enroll_t *e) {
  zm_life_abandon(e->app->life, e->name, on_abandoned, e);
}

static void on_condemned(int err, void *data) {
  enroll_t *e = data;
  if (err != 0) {
    ZM_WARN("enroll %s: compensation: delete %s failed: %s; it stays "
            "DELETING and is retried",
            e->name, e->id, zm_strerror(err));
    compensate_finish(e, 0);
    return;
  }
  ZM_INFO("enroll %s: compensated: deleted %s on the controller", e->name,
          e->id);
  compensate_finish(e, 1);
}

/* Created: PENDING -> DELETING (durable), then the controller DELETE. */
static void condemn(enroll_t *e) {
  zm_life_condemn(e->app->life, e->name, e->id, identity_type(e), on_condemned,
                  e);
}

static void on_compensate_found(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    ZM_WARN("enroll %s: compensation: lookup by name failed: %s; the pending "
            "record stays for recovery",
            e->name, zm_strerror(r->err));
    compensate_finish(e, 0);
    return;
  }
  if (r->n_ids == 0 && e->create_unanswered) {
    /* The pending record outlives this process's interest: recovery looks
     * the name up again once no request can still be in flight. */
    ZM_WARN("enroll %s: compensation: not on the controller now, but the "
            "unanswered create may still land; the pending record stays for "
            "recovery",
            e->name);
    compensate_finish(e, 0);
    return;
  }
  if (r->n_ids == 0) {
    abandon(e); /* the create never happened */
    return;
  }
  e->id = zm_xstrdup(r->ids[0]); /* names are unique on the controller */
  condemn(e);
}

static void enroll_on_compensate(enroll_t *e) {
  if (!e->created_maybe) {
    abandon(e);
  } else if (e->id != NULL) {
    condemn(e);
  } else {
    /* CREATE failed or timed out: it may still have happened. */
    zm_ziti_find_identities(e->app->ziti, "name", e->name,
                            uv_now(e->app->loop) + COMPENSATE_TIMEOUT_MS,
                            on_compensate_found, e);
  }
}

static void enroll_on_done(enroll_t *e) { (void)e; /* freed by set_state */ }

/* ===================== transitions ======================================== */

static void (*const STEP[ZM_ENROLL__COUNT])(enroll_t *) = {
    [ZM_ENROLL_INTENT] = enroll_on_intent,
    [ZM_ENROLL_REPLACE] = enroll_on_replace,
    [ZM_ENROLL_CREATE] = enroll_on_create,
    [ZM_ENROLL_FETCH_JWT] = enroll_on_fetch_jwt,
    [ZM_ENROLL_VERIFY_JWT] = enroll_on_verify_jwt,
    [ZM_ENROLL_KEYGEN_CSR] = enroll_on_keygen_csr,
    [ZM_ENROLL_SIGN] = enroll_on_sign,
    [ZM_ENROLL_ASSEMBLE] = enroll_on_assemble,
    [ZM_ENROLL_COMMIT] = enroll_on_commit,
    [ZM_ENROLL_REPLY] = enroll_on_reply,
    [ZM_ENROLL_COMPENSATE] = enroll_on_compensate,
    [ZM_ENROLL_DONE] = enroll_on_done,
};

static void enroll_set_state(enroll_t *e, zm_enroll_state_t next) {
  ZM_ASSERT(zm_enroll_edge_ok(e->kind, e->state, next));
  ZM_DEBUG("enroll %s: %s -> %s", e->name, NAMES[e->state], NAMES[next]);
  e->app->stats.enroll_gauge[e->state]--;
  e->app->stats.enroll_gauge[next]++;
  e->state = next;
  zm_test_crash_point(NAMES[next]);
  if (next == ZM_ENROLL_DONE) {
    saga_free(e);
    return;
  }
  STEP[next](e);
}

/* ===================== entry points ====================================== */

/* The checks every creation shares; returns 0 when the saga may start. */
static int admit(zm_app_t *app, zm_call_t *call) {
  if (app->ziti == NULL) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
                 "no OpenZiti controller configured (ZITI_CONTROLLER_URL)");
    return -1;
  }
  if (app->shutting_down) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE, "shutting down");
    return -1;
  }
  if (app->enroll_inflight >= app->cfg.enroll_max_inflight) {
    zm_call_fail(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                 "too many creations in flight; retry later");
    return -1;
  }
  return 0;
}

static void start(zm_app_t *app, zm_call_t *call, enroll_t *e) {
  e->app = app;
  e->call = call;
  e->state = ZM_ENROLL_INTENT;
  e->started = uv_now(app->loop);
  e->deadline = e->started + app->cfg.enroll_timeout_ms;
  uint64_t cd = zm_call_deadline(call);
  if (cd != 0 && cd < e->deadline)
    e->deadline = cd;
  app->enroll_inflight++;
  app->stats.enroll_started++;
  app->stats.enroll_gauge[ZM_ENROLL_INTENT]++;
  zm_call_on_cancel(call, on_call_cancelled, e);
  zm_test_crash_point("INTENT");
  enroll_on_intent(e);
}

void zm_rpc_request_service_identity(zm_call_t *call,
                                     const ProtobufCMessage *msg, void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest *req =
      (const void *)msg;
  const zm_service_type_t *type =
      req->service_type > 0
          ? zm_config_service_type(&app->cfg, req->service_type)
          : NULL;
  if (type == NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                 req->service_type == 0 ? "service_type is required"
                                        : "unknown service_type");
    return;
  }
  if (admit(app, call) != 0)
    return;
  char short_id[SHORT_ID_LEN + 1];
  if (zm_enroll_short_id(short_id, sizeof short_id) != 0) {
    zm_call_fail(call, ZM_GRPC_INTERNAL, "random number generator failed");
    return;
  }
  enroll_t *e = zm_xcalloc(1, sizeof *e);
  e->kind = ZM_ENROLL_KIND_SERVICE;
  e->type = type;
  snprintf(e->name, sizeof e->name, "svc-%s-%s", type->name, short_id);
  start(app, call, e);
}

void zm_enroll_start_agent(zm_app_t *app, zm_call_t *call,
                           const char agent_id[37]) {
  if (admit(app, call) != 0)
    return;
  char short_id[AGENT_SHORT_ID_LEN + 1];
  if (zm_enroll_short_id(short_id, sizeof short_id) != 0) {
    zm_call_fail(call, ZM_GRPC_INTERNAL, "random number generator failed");
    return;
  }
  enroll_t *e = zm_xcalloc(1, sizeof *e);
  e->kind = ZM_ENROLL_KIND_AGENT;
  memcpy(e->agent_id, agent_id, 37);
  snprintf(e->name, sizeof e->name, "agent-%s-%s", agent_id, short_id);
  start(app, call, e);
}
