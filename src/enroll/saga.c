/*
 * saga.c - every identity creation as an explicit state machine on one
 * engine: RequestServiceIdentity, CreateAgentIdentity, CreateSandboxIdentity,
 * CreateAppIdentity, CreateRunnerIdentity, CreateDeviceIdentity and
 * CreateTunnelIdentity (see include/zm/enroll.h for the kinds, their states
 * and the guarantees).
 *
 * Ownership: the saga object is malloc'd per request and owns every buffer
 * it holds; secrets (JWT, one-time token inside the claims, private key,
 * identity JSON) live in zm_secret_t and are wiped as soon as the next state
 * no longer needs them, and again in saga_free. The gRPC call is held until
 * the saga finishes it exactly once (REPLY, or the error after COMPENSATE).
 */
#include "zm/app.h"
#include "zm/audit.h"
#include "zm/b64.h"
#include "zm/crypto.h"
#include "zm/enroll.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Compensation and recovery get their own time budget, not the caller's. */
#define COMPENSATE_TIMEOUT_MS 30000u
/* The Go service's "-<s8>": 8 lower-case hex digits (the head of a UUIDv4) */
#define SHORT_ID_LEN 8
/* Found-by-externalId / recorded identities replaced at most. */
#define MAX_REPLACED 1000u

typedef struct enroll {
  zm_app_t *app;
  zm_call_t *call;
  zm_enroll_kind_t kind;
  zm_enroll_state_t state;
  const zm_service_type_t *type; /* service sagas */
  int id_type;                   /* identity type (stored / tombstones) */
  char *lock;      /* pending row's lock key (agent_id column), or NULL */
  char *ext_id;    /* externalId, or NULL */
  char *tags_json; /* tags (JSON object), or NULL */
  char **roles;    /* role attributes (owned) */
  size_t n_roles;
  char *identity_id; /* mapping columns (managed kinds) */
  char *workload_id, *agent_col, *environment_id;
  char **old_ids; /* REPLACE: the previous identities */
  size_t n_old, next_old;
  char name[ZM_MAX_ID_LEN + 64];  /* controller identity name */
  char pname[ZM_MAX_ID_LEN + 72]; /* pending row name */
  zm_pending_row_t prow;          /* DEVICE: the intent, armed later */
  char *jwt_expires;              /* TUNNEL: enrollment.ott.expiresAt */
  char *id;                       /* controller identity id (owned) */
  char *zt_api;                   /* iss + /edge/client/v1 (owned) */
  char *csr_pem;                  /* owned */
  char *cert_pem;                 /* owned */
  zm_secret_t jwt;
  zm_jwt_claims_t claims; /* jti is a secret */
  zm_secret_t key_pem;
  zm_secret_t json;
  uint64_t deadline; /* uv_now() ms */
  uint64_t started;  /* uv_now() ms */
  int cancelled;
  int created_maybe;     /* CREATE was sent: compensation needed on failure */
  int create_unanswered; /* CREATE failed without a conclusive answer */
  int create_refused;    /* CREATE refused: nothing of ours was created */
  zm_grpc_status_t fail_status;
  char fail_msg[256];
  struct enroll *ready_next; /* app->enroll_ready */
  int ready;                 /* on it */
  zm_work_t work;            /* VERIFY_JWT, then KEYGEN_CSR: one at a time */
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
#define ENROLL_CHAIN                                                           \
  [ZM_ENROLL_FETCH_JWT] = B(VERIFY_JWT) | B(COMPENSATE),                       \
  [ZM_ENROLL_VERIFY_JWT] = B(KEYGEN_CSR) | B(COMPENSATE),                      \
  [ZM_ENROLL_KEYGEN_CSR] = B(SIGN) | B(COMPENSATE),                            \
  [ZM_ENROLL_SIGN] = B(ASSEMBLE) | B(COMPENSATE),                              \
  [ZM_ENROLL_ASSEMBLE] = B(COMMIT) | B(COMPENSATE),                            \
  [ZM_ENROLL_COMMIT] = B(REPLY) | B(COMPENSATE), [ZM_ENROLL_REPLY] = B(DONE),  \
  [ZM_ENROLL_COMPENSATE] = B(DONE)
#define JWT_ONLY_CHAIN                                                         \
  [ZM_ENROLL_FETCH_JWT] = B(COMMIT) | B(COMPENSATE),                           \
  [ZM_ENROLL_COMMIT] = B(REPLY) | B(COMPENSATE), [ZM_ENROLL_REPLY] = B(DONE),  \
  [ZM_ENROLL_COMPENSATE] = B(DONE)
/* Allowed successors of each state, per kind. */
static const unsigned EDGES[ZM_ENROLL_KIND__COUNT][ZM_ENROLL__COUNT] = {
    [ZM_ENROLL_KIND_SERVICE] =
        {
            [ZM_ENROLL_INTENT] = B(CREATE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            ENROLL_CHAIN,
        },
    [ZM_ENROLL_KIND_AGENT] =
        {
            [ZM_ENROLL_INTENT] = B(REPLACE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_REPLACE] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            JWT_ONLY_CHAIN,
        },
    [ZM_ENROLL_KIND_SANDBOX] =
        {
            [ZM_ENROLL_INTENT] = B(REPLACE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_REPLACE] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            JWT_ONLY_CHAIN,
        },
    [ZM_ENROLL_KIND_APP] =
        {
            [ZM_ENROLL_INTENT] = B(REPLACE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_REPLACE] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            ENROLL_CHAIN,
        },
    [ZM_ENROLL_KIND_RUNNER] =
        {
            [ZM_ENROLL_INTENT] = B(REPLACE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_REPLACE] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            ENROLL_CHAIN,
        },
    [ZM_ENROLL_KIND_DEVICE] =
        {
            [ZM_ENROLL_INTENT] = B(CHECK) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_CHECK] = B(ARM) | B(COMPENSATE),
            [ZM_ENROLL_ARM] = B(CREATE) | B(COMPENSATE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            JWT_ONLY_CHAIN,
        },
    [ZM_ENROLL_KIND_TUNNEL] =
        {
            [ZM_ENROLL_INTENT] = B(CREATE) | B(COMPENSATE) | B(DONE),
            [ZM_ENROLL_CREATE] = B(FETCH_JWT) | B(COMPENSATE),
            JWT_ONLY_CHAIN,
        },
};
#undef ENROLL_CHAIN
#undef JWT_ONLY_CHAIN
#undef B

int zm_enroll_edge_ok(zm_enroll_kind_t kind, zm_enroll_state_t a,
                      zm_enroll_state_t b) {
  return (unsigned)kind < ZM_ENROLL_KIND__COUNT &&
         (unsigned)a < ZM_ENROLL__COUNT && (unsigned)b < ZM_ENROLL__COUNT &&
         (EDGES[kind][a] & (1u << b)) != 0;
}

int zm_enroll_short_id(char *out, size_t n) {
  static const char HEX[] = "0123456789abcdef";
  uint8_t rnd[32];
  if (n == 0 || n - 1 > sizeof rnd || zm_random_bytes(rnd, n - 1) != 0)
    return ZM_E_CRYPTO;
  for (size_t i = 0; i + 1 < n; i++)
    out[i] = HEX[rnd[i] & 15];
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
  for (size_t i = 0; i < e->n_roles; i++)
    free(e->roles[i]);
  free(e->roles);
  free(e->lock);
  free(e->ext_id);
  free(e->tags_json);
  free(e->identity_id);
  free(e->workload_id);
  free(e->agent_col);
  free(e->environment_id);
  free(e->jwt_expires);
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
      e->lock != NULL && r->err == ZM_E_EXISTS
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
  if (err == ZM_E_EXISTS) {
    enroll_fail(e, ZM_GRPC_ABORTED,
                "another creation for this %s is in progress; retry",
                e->kind == ZM_ENROLL_KIND_DEVICE ? "name" : "identity");
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
  switch (e->kind) {
  case ZM_ENROLL_KIND_SERVICE:
  case ZM_ENROLL_KIND_TUNNEL:
    enroll_set_state(e, ZM_ENROLL_CREATE);
    return;
  case ZM_ENROLL_KIND_DEVICE:
    enroll_set_state(e, ZM_ENROLL_CHECK);
    return;
  default:
    enroll_set_state(e, ZM_ENROLL_REPLACE);
    return;
  }
}

static int identity_type(const enroll_t *e) { return e->id_type; }

static void enroll_on_intent(enroll_t *e) {
  int kind = e->kind == ZM_ENROLL_KIND_SERVICE  ? ZM_PENDING_SERVICE
             : e->kind == ZM_ENROLL_KIND_DEVICE ? ZM_PENDING_DEVICE_CHECK
             : e->kind == ZM_ENROLL_KIND_TUNNEL ? ZM_PENDING_HANDOVER
                                                : ZM_PENDING_AGENT;
  e->prow = (zm_pending_row_t){.name = e->pname,
                               .kind = kind,
                               .type = identity_type(e),
                               .agent_id = e->lock};
  zm_life_intent(e->app->life, &e->prow, e->deadline, on_intent_done, e);
}

/* ---- CHECK, ARM (devices: the caller chooses the name) -------------------
 */

static void on_armed(int err, void *data) {
  enroll_t *e = data;
  if (err != 0) {
    enroll_fail(e, ZM_GRPC_UNAVAILABLE, "store: cannot arm the intent: %s",
                zm_strerror(err));
    return;
  }
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_CREATE);
}

static void enroll_on_arm(enroll_t *e) {
  e->prow.kind = ZM_PENDING_DEVICE;
  zm_life_arm(e->app->life, &e->prow, on_armed, e);
}

static void on_checked(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    fail_from_ziti(e, "look up the name", r);
    return;
  }
  if (r->n_ids != 0) {
    /* as the Go service's create would: the controller refuses the name */
    enroll_fail(e, ZM_GRPC_INTERNAL,
                "create device identity: an identity named %s exists already",
                e->name);
    return;
  }
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_ARM);
}

static void enroll_on_check(enroll_t *e) {
  zm_ziti_find_identities(e->app->ziti, "name", e->name, e->deadline,
                          on_checked, e);
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
    /* no mapping: an orphan that carries this externalId */
    zm_life_condemn(e->app->life, NULL, old, identity_type(e), on_old_gone, e);
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
    ZM_INFO("enroll %s: deleting the previous identity %s", e->name, old);
    if (e->kind == ZM_ENROLL_KIND_AGENT)
      zm_audit("agent_identity_replaced", "agent", e->identity_id, "old_id",
               old, NULL);
    else
      zm_audit("identity_replaced", "identity_id", e->identity_id,
               "external_id", e->ext_id, "old_id", old, NULL);
    zm_life_retire_managed(e->app->life, old, on_old_retired, e);
    return;
  }
  enroll_set_state(e, ZM_ENROLL_CREATE);
}

static void add_old(enroll_t *e, const char *id) {
  for (size_t i = 0; i < e->n_old; i++)
    if (strcmp(e->old_ids[i], id) == 0)
      return;
  e->old_ids = zm_xrealloc(e->old_ids, (e->n_old + 1) * sizeof *e->old_ids);
  e->old_ids[e->n_old++] = zm_xstrdup(id);
}

/* App and runner re-enrolment (as the Go service): the platform identity's
 * recorded mappings go too, even when the controller lost them. */
static void on_old_rows(int err, const zm_managed_row_t *rows, size_t n,
                        void *data) {
  enroll_t *e = data;
  if (err != 0) {
    enroll_fail(e, ZM_GRPC_UNAVAILABLE,
                "store: cannot read previous mappings: %s", zm_strerror(err));
    return;
  }
  for (size_t i = 0; i < n; i++)
    add_old(e, rows[i].ziti_identity_id);
  replace_next(e);
}

static void on_old_found(const zm_ziti_result_t *r, void *data) {
  enroll_t *e = data;
  if (r->err != 0) {
    fail_from_ziti(e, "find previous identities", r);
    return;
  }
  if (r->n_ids > MAX_REPLACED) {
    enroll_fail(e, ZM_GRPC_INTERNAL,
                "%zu identities carry externalId %s; refusing to replace them",
                r->n_ids, e->ext_id);
    return;
  }
  for (size_t i = 0; i < r->n_ids; i++)
    add_old(e, r->ids[i]);
  if (e->kind == ZM_ENROLL_KIND_APP || e->kind == ZM_ENROLL_KIND_RUNNER) {
    zm_store_find_managed(e->app->store, e->identity_id, MAX_REPLACED,
                          on_old_rows, e);
    return;
  }
  replace_next(e);
}

static void enroll_on_replace(enroll_t *e) {
  zm_ziti_find_identities(e->app->ziti, "externalId", e->ext_id, e->deadline,
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
    /* A refusal proves this create did not happen. "Exists" proves it only
     * for a device, whose name is the caller's own (an identity found under
     * it would be somebody else's): any other name carries our random
     * suffix, and "exists" then means an earlier send of this very create
     * landed (re-sent after a 429 a proxy answered after all). A 2xx we
     * could not read, or a 500, may have come after it did too. */
    e->create_refused =
        (r->err == ZM_E_EXISTS && e->kind == ZM_ENROLL_KIND_DEVICE) ||
        r->err == ZM_E_INVAL || r->err == ZM_E_UNAUTHORIZED ||
        r->err == ZM_E_NOT_FOUND;
    fail_from_ziti(e, "create identity", r);
    return;
  }
  e->id = zm_xstrdup(r->id);
  if (!enroll_should_stop(e))
    enroll_set_state(e, ZM_ENROLL_FETCH_JWT);
}

static void enroll_on_create(enroll_t *e) {
  e->created_maybe = 1;
  zm_ziti_create_identity_tags(
      e->app->ziti, e->name, (const char *const *)e->roles, e->n_roles,
      e->ext_id, e->tags_json, e->deadline, on_created, e);
}

/* An agent, sandbox, device or tunnel enrolls itself with the JWT; a
 * service, app or runner identity is enrolled here. */
static int enrolls_here(const enroll_t *e) {
  return e->kind == ZM_ENROLL_KIND_SERVICE || e->kind == ZM_ENROLL_KIND_APP ||
         e->kind == ZM_ENROLL_KIND_RUNNER;
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
  if (r->expires_at != NULL)
    e->jwt_expires = zm_xstrdup(r->expires_at);
  /* enrolled here only after the JWT proved to come from the controller */
  if (!enroll_should_stop(e))
    enroll_set_state(e,
                     enrolls_here(e) ? ZM_ENROLL_VERIFY_JWT : ZM_ENROLL_COMMIT);
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
  if (status == 0) {
    e->app->stats.verify_steps++;
    e->app->stats.verify_cpu_ns += w->cpu_ns;
  }
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
  if (status == 0) {
    e->app->stats.keygen_steps++;
    e->app->stats.keygen_cpu_ns += w->cpu_ns;
  }
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
  if (e->kind == ZM_ENROLL_KIND_SERVICE) {
    zm_life_commit_service(e->app->life, e->pname, e->id, e->type->number,
                           on_committed, e);
    return;
  }
  if (e->kind == ZM_ENROLL_KIND_DEVICE || e->kind == ZM_ENROLL_KIND_TUNNEL) {
    /* no record of ours: the caller keeps the id (as the Go service) */
    zm_life_handover(e->app->life, e->pname, on_committed, e);
    return;
  }
  zm_managed_row_t row = {.ziti_identity_id = e->id,
                          .identity_id = e->identity_id,
                          .identity_type = e->id_type,
                          .workload_id = e->workload_id,
                          .agent_id = e->agent_col,
                          .environment_id = e->environment_id};
  zm_life_commit_managed(e->app->life, e->pname, &row, on_committed, e);
}

static void wipe_jti(json_t *j) {
  json_t *jti = json_object_get(j, "jti");
  if (json_is_string(jti))
    zm_wipe((char *)json_string_value(jti), json_string_length(jti));
}

/* ISO 8601 (RFC 3339) -> seconds since the epoch, and the fraction's
 * nanoseconds in *nanos; -1 if unparsable. */
static int64_t parse_rfc3339(const char *s, int32_t *nanos) {
  int y, mo, d, h, mi, sec;
  *nanos = 0;
  if (s == NULL ||
      sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d", &y, &mo, &d, &h, &mi, &sec) != 6)
    return -1;
  /* days from civil (Howard Hinnant) */
  y -= mo <= 2;
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  int64_t yoe = y - era * 400;
  int64_t doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  int64_t days = era * 146097 + doe - 719468;
  int64_t t = days * 86400 + h * 3600 + mi * 60 + sec;
  const char *z = s + 19;
  if (*z == '.') {
    int32_t scale = 100000000;
    for (z++; *z >= '0' && *z <= '9'; z++) {
      *nanos += (int32_t)(*z - '0') * scale;
      scale /= 10;
    }
  }
  if (*z == '+' || *z == '-') {
    int oh = 0, om = 0;
    if (sscanf(z + 1, "%2d:%2d", &oh, &om) == 2)
      t += (*z == '+' ? -1 : 1) * (oh * 3600 + om * 60);
  }
  return t;
}

/* The exp claim of a JWT (unverified: only a hint for the caller), or 0.
 * Bounded: the payload is decoded into a fixed buffer. */
static int64_t jwt_exp(const char *jwt, size_t len) {
  const char *dot1 = memchr(jwt, '.', len);
  if (dot1 == NULL)
    return 0;
  const char *p = dot1 + 1;
  const char *dot2 = memchr(p, '.', len - (size_t)(p - jwt));
  if (dot2 == NULL)
    return 0;
  char buf[4096];
  long n = zm_b64url_decode(p, (size_t)(dot2 - p), buf, sizeof buf);
  if (n <= 0)
    return 0;
  json_t *j = json_loadb(buf, (size_t)n, 0, NULL);
  zm_wipe(buf, sizeof buf);
  json_t *exp = json_object_get(j, "exp");
  int64_t v = json_is_integer(exp) ? (int64_t)json_integer_value(exp) : 0;
  /* the payload holds the one-time token */
  wipe_jti(j);
  json_decref(j);
  return v;
}

static void enroll_on_reply(enroll_t *e) {
  ProtobufCMessage *msg = NULL;
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse ar =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__CreateSandboxIdentityResponse sr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SANDBOX_IDENTITY_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__CreateDeviceIdentityResponse dr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_DEVICE_IDENTITY_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__CreateTunnelIdentityResponse tr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_TUNNEL_IDENTITY_RESPONSE__INIT;
  Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
  Agynio__Api__ZitiManagement__V1__CreateAppIdentityResponse pr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_APP_IDENTITY_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__CreateRunnerIdentityResponse rr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_RUNNER_IDENTITY_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_RESPONSE__INIT;
  switch (e->kind) {
  case ZM_ENROLL_KIND_AGENT:
    ar.ziti_identity_id = e->id;
    ar.enrollment_jwt = e->jwt.base;
    msg = &ar.base;
    break;
  case ZM_ENROLL_KIND_SANDBOX:
    sr.ziti_identity_id = e->id;
    sr.enrollment_jwt = e->jwt.base;
    msg = &sr.base;
    break;
  case ZM_ENROLL_KIND_DEVICE:
    dr.ziti_identity_id = e->id;
    dr.enrollment_jwt = e->jwt.base;
    msg = &dr.base;
    break;
  case ZM_ENROLL_KIND_TUNNEL: {
    tr.ziti_identity_id = e->id;
    tr.enrollment_jwt = e->jwt.base;
    int32_t nanos = 0;
    int64_t exp = parse_rfc3339(e->jwt_expires, &nanos);
    if (exp <= 0) {
      /* no expiresAt: the JWT's exp claim (as the Go service) */
      exp = jwt_exp(e->jwt.base, e->jwt.len);
      nanos = 0;
    }
    if (exp > 0) {
      ts.seconds = exp;
      ts.nanos = nanos;
      tr.enrollment_jwt_expires_at = &ts;
    }
    msg = &tr.base;
    break;
  }
  case ZM_ENROLL_KIND_APP:
    pr.ziti_identity_id = e->id;
    pr.identity_json.data = (uint8_t *)e->json.base;
    pr.identity_json.len = e->json.len;
    msg = &pr.base;
    break;
  case ZM_ENROLL_KIND_RUNNER:
    rr.ziti_identity_id = e->id;
    rr.identity_json.data = (uint8_t *)e->json.base;
    rr.identity_json.len = e->json.len;
    msg = &rr.base;
    break;
  default:
    resp.ziti_identity_id = e->id;
    resp.identity_json.data = (uint8_t *)e->json.base;
    resp.identity_json.len = e->json.len;
    msg = &resp.base;
    break;
  }
  zm_call_reply(e->call, msg);
  /* the packed copy lives in the call arena until the response is sent;
   * our copies go now */
  zm_secret_dispose(&e->jwt);
  zm_secret_dispose(&e->json);
  e->app->stats.enroll_ok++;
  ZM_INFO("enroll %s: created %s in %llu ms", e->name, e->id,
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
  zm_life_abandon(e->app->life, e->pname, on_abandoned, e);
}

static void on_condemned(int err, void *data) {
  enroll_t *e = data;
  if (err == ZM_E_NOT_FOUND) {
    ZM_WARN("enroll %s: compensation: the pending record is gone (the "
            "commit landed after all, or recovery took it): %s is not "
            "deleted here",
            e->name, e->id);
    compensate_finish(e, 0);
    return;
  }
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
  zm_life_condemn(e->app->life, e->pname, e->id, identity_type(e), on_condemned,
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
  if (!e->created_maybe || e->create_refused) {
    /* nothing was sent (an unarmed device intent included), or the
     * controller refused it */
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
    [ZM_ENROLL_CHECK] = enroll_on_check,
    [ZM_ENROLL_ARM] = enroll_on_arm,
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

/* A state's step runs from a queue on a later loop turn, not inside the
 * callback that ended the previous one: a store batch or a burst of
 * controller answers completes many sagas at once, and running all their
 * next steps (requests to build, encrypt and send; replies to pack) there
 * held the loop for milliseconds. The queue runs steps for at most
 * STEP_SLICE_NS per turn, and I/O (the hot path) is served in between. */
#define STEP_SLICE_NS 250000u

static void on_steps(uv_idle_t *h) {
  zm_app_t *app = h->data;
  uint64_t until = uv_hrtime() + STEP_SLICE_NS;
  do {
    enroll_t *e = app->enroll_ready;
    app->enroll_ready = e->ready_next;
    if (app->enroll_ready == NULL)
      app->enroll_ready_tail = NULL;
    e->ready_next = NULL;
    e->ready = 0;
    STEP[e->state](e);
  } while (app->enroll_ready != NULL && uv_hrtime() < until);
  if (app->enroll_ready == NULL)
    uv_idle_stop(h);
}

void zm_enroll_init(zm_app_t *app) {
  app->enroll_ready = app->enroll_ready_tail = NULL;
  uv_idle_init(app->loop, &app->enroll_idle);
  app->enroll_idle.data = app;
}

static void on_steps_closed(uv_handle_t *h) { (void)h; }

void zm_enroll_close(zm_app_t *app) {
  while (app->enroll_ready != NULL)
    on_steps(&app->enroll_idle);
  uv_close((uv_handle_t *)&app->enroll_idle, on_steps_closed);
}

static void enroll_set_state(enroll_t *e, zm_enroll_state_t next) {
  ZM_ASSERT(zm_enroll_edge_ok(e->kind, e->state, next));
  ZM_ASSERT(!e->ready);
  ZM_DEBUG("enroll %s: %s -> %s", e->name, NAMES[e->state], NAMES[next]);
  e->app->stats.enroll_gauge[e->state]--;
  e->app->stats.enroll_gauge[next]++;
  e->state = next;
  zm_test_crash_point(NAMES[next]);
  if (next == ZM_ENROLL_DONE) {
    saga_free(e);
    return;
  }
  zm_app_t *app = e->app;
  e->ready = 1;
  if (app->enroll_ready_tail != NULL)
    app->enroll_ready_tail->ready_next = e;
  else
    app->enroll_ready = e;
  app->enroll_ready_tail = e;
  uv_idle_start(&app->enroll_idle, on_steps);
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

static void set_roles(enroll_t *e, const char *const *roles, size_t n) {
  e->roles = zm_xcalloc(n + 1, sizeof *e->roles);
  for (size_t i = 0; i < n; i++)
    e->roles[i] = zm_xstrdup(roles[i]);
  e->n_roles = n;
}

static char *dup_opt(const char *s) { return s ? zm_xstrdup(s) : NULL; }

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
    /* the Go service's words */
    if (req->service_type == 0)
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "service_type: service type unspecified");
    else {
      char why[64];
      snprintf(why, sizeof why, "service_type: unknown service type %d",
               (int)req->service_type);
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    }
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
  e->id_type = type->number;
  const char *roles[ZM_MAX_ROLES];
  for (size_t i = 0; i < type->n_roles; i++)
    roles[i] = type->roles[i];
  set_roles(e, roles, type->n_roles);
  snprintf(e->name, sizeof e->name, "svc-%s-%s", type->name, short_id);
  snprintf(e->pname, sizeof e->pname, "%s", e->name);
  start(app, call, e);
}

void zm_enroll_start(zm_app_t *app, zm_call_t *call,
                     const zm_enroll_spec_t *spec) {
  if (admit(app, call) != 0)
    return;
  char short_id[SHORT_ID_LEN + 1];
  if (zm_enroll_short_id(short_id, sizeof short_id) != 0) {
    zm_call_fail(call, ZM_GRPC_INTERNAL, "random number generator failed");
    return;
  }
  enroll_t *e = zm_xcalloc(1, sizeof *e);
  e->kind = spec->kind;
  e->id_type = spec->identity_type;
  set_roles(e, spec->roles, spec->n_roles);
  e->lock = dup_opt(spec->lock);
  e->ext_id = dup_opt(spec->external_id);
  e->tags_json = dup_opt(spec->tags_json);
  e->identity_id = dup_opt(spec->identity_id);
  e->workload_id = dup_opt(spec->workload_id);
  e->agent_col = dup_opt(spec->agent_col);
  e->environment_id = dup_opt(spec->environment_id);
  if (spec->kind == ZM_ENROLL_KIND_DEVICE) {
    /* the caller's name exactly (as the Go service) */
    snprintf(e->name, sizeof e->name, "%s", spec->name_prefix);
    snprintf(e->pname, sizeof e->pname, "device:%s", e->name);
  } else {
    snprintf(e->name, sizeof e->name, "%s-%s", spec->name_prefix, short_id);
    snprintf(e->pname, sizeof e->pname, "%s", e->name);
  }
  start(app, call, e);
}
