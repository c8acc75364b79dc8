/*
 * admit.c - per-call authorization (policy, client identity names) and
 * per-caller admission of costly methods (limiter).
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ===================== authorization ==================================== */

const char *const *conn_names(const zm_conn_t *c, size_t *n) {
  if (c == NULL || c->tls == NULL) {
    *n = 0;
    return NULL;
  }
  *n = c->tls->n_names;
  return (const char *const *)c->tls->names;
}

/*
 * The policy's verdict on this call (scope NULL: the method-level check at
 * HEADERS, before any request byte is buffered). Answers the call and
 * returns 0 when it is refused: UNAUTHENTICATED without a verified client
 * certificate, PERMISSION_DENIED with one.
 */
int call_authorized(zm_call_t *call, const char *scope) {
  zm_grpc_server_t *srv = call->srv;
  zm_conn_t *c = call->conn;
  if (call->method->flags & ZM_GRPC_M_PUBLIC)
    return 1;
  size_t n;
  const char *const *names = conn_names(c, &n);
  zm_authz_decision_t d = ZM_AUTHZ_ALLOW;
  if (srv->authz != NULL)
    d = zm_authz_check(srv->authz, names, n, call->method->path, scope);
  else if (c != NULL && c->tls != NULL &&
           zm_tls_srv_ctx_client_auth(c->tls->ctx))
    d = n > 0 ? ZM_AUTHZ_ALLOW : ZM_AUTHZ_UNAUTHENTICATED;
  if (d == ZM_AUTHZ_ALLOW)
    return 1;
  srv->stats.authz_denied++;
  int unauth = d == ZM_AUTHZ_UNAUTHENTICATED;
  zm_audit("authz_denied", "caller", n > 0 ? names[0] : "", "peer",
           c ? c->peer : "", "method", call->method->path, "service_type",
           scope, "status", unauth ? "UNAUTHENTICATED" : "PERMISSION_DENIED",
           NULL);
  ZM_DEBUG("grpc: %s from %s refused (%s)", call->method->path,
           n > 0 ? names[0] : (c ? c->peer : "?"),
           unauth ? "no client certificate" : "policy");
  if (unauth)
    submit_status(call, ZM_GRPC_UNAUTHENTICATED,
                  "a verified client certificate is required");
  else
    submit_status(call, ZM_GRPC_PERMISSION_DENIED,
                  scope ? "caller may not request this service type"
                        : "caller may not call this method");
  return 0;
}

/* Per-caller admission of costly calls. Answers RESOURCE_EXHAUSTED and
 * returns 0 when refused. */
int call_admitted(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  if (!(call->method->flags & ZM_GRPC_M_COSTLY) || srv->limiter == NULL)
    return 1;
  char key[ZM_TLS_MAX_NAME + 8];
  size_t n;
  const char *const *names = conn_names(call->conn, &n);
  if (n > 0) {
    snprintf(key, sizeof key, "%s", names[0]);
  } else {
    /* the peer's address without its port */
    snprintf(key, sizeof key, "ip:%s", call->conn->peer);
    char *colon = strrchr(key, ':');
    if (colon != NULL && colon > key + 3)
      *colon = '\0';
  }
  zm_lim_result_t r =
      zm_limiter_acquire(srv->limiter, key, uv_now(srv->loop), &call->lim);
  if (r == ZM_LIM_OK)
    return 1;
  srv->stats.rate_limited++;
  static const char *const why[] = {[ZM_LIM_RATE] = "rate limit",
                                    [ZM_LIM_INFLIGHT] = "in-flight limit",
                                    [ZM_LIM_TABLE] = "caller table full"};
  zm_audit("rate_limited", "caller", key, "method", call->method->path, "limit",
           why[r], NULL);
  char msg[96];
  snprintf(msg, sizeof msg, "too many requests from this caller (%s)", why[r]);
  submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED, msg);
  return 0;
}

/* Headers complete: validate, arm the deadline, or answer at once. */
