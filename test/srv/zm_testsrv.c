/*
 * zm_testsrv.c - the gRPC server (src/grpc) with stand-in handlers, for the
 * listener's integration tests (TLS, mTLS, authorization, limits, HTTP/2
 * conformance, reload, audit) without the store or the controller.
 *
 * Reads the service's settings (GRPC_ADDRESS, GRPC_TLS_*,
 * GRPC_AUTHZ_POLICY_FILE, AUDIT_LOG, GRPC_MAX_* ...), prints
 * "listening on port N" and serves until SIGTERM; SIGHUP reloads the
 * security settings. Handlers:
 *   ResolveIdentity: "known" -> identity_id "agent-1", else NOT_FOUND
 *   RequestServiceIdentity: replies after TESTSRV_RSI_DELAY_MS (default 20)
 *     with a fake identity (the bytes "-----BEGIN PRIVATE KEY-----")
 *   CreateAgentIdentity, DeleteIdentity, ExtendIdentityLease,
 *   ListManagedIdentities: OK at once; Health/Check: SERVING.
 */
#include "zm/audit.h"
#include "zm/grpc.h"
#include "zm/health.h"
#include "zm/log.h"
#include "zm/workers.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SVC "/agynio.api.ziti_management.v1.ZitiManagementService/"

static uv_loop_t *loop;
static zm_grpc_server_t *srv;
static zm_health_t health;
static uint64_t rsi_delay_ms = 20;
static const char *const TYPES[] = {NULL, "gateway", "orchestrator", "runner"};

static const char *env(const char *k, const char *def) {
  const char *v = getenv(k);
  return v && v[0] ? v : def;
}

/* "250ms", "3s", "2m" or plain ms */
static uint64_t env_ms(const char *k, uint64_t def) {
  const char *v = getenv(k);
  if (v == NULL || v[0] == '\0')
    return def;
  char *end;
  double x = strtod(v, &end);
  if (strcmp(end, "s") == 0)
    x *= 1000;
  else if (strcmp(end, "m") == 0)
    x *= 60000;
  return (uint64_t)x;
}

static void resolve(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)ctx;
  const Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest *req =
      (const void *)m;
  if (strncmp(req->ziti_identity_id, "big:", 4) == 0) {
    /* a large answer, for slow-reader tests */
    size_t n = (size_t)strtoul(req->ziti_identity_id + 4, NULL, 10);
    if (n > (1u << 20))
      n = 1u << 20;
    char *big = zm_call_alloc(c, n + 1);
    memset(big, 'b', n);
    big[n] = '\0';
    Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse r =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
    r.identity_id = big;
    zm_call_reply(c, &r.base);
    return;
  }
  if (strcmp(req->ziti_identity_id, "known") != 0) {
    zm_call_fail(c, ZM_GRPC_NOT_FOUND, "no such identity");
    return;
  }
  Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse r =
      AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
  r.identity_id = (char *)"agent-1";
  zm_call_reply(c, &r.base);
}

typedef struct {
  uv_timer_t t;
  zm_call_t *call;
  int type;
} rsi_t;

static void rsi_closed(uv_handle_t *h) { free(h->data); }

static void rsi_fire(uv_timer_t *t) {
  rsi_t *r = t->data;
  static unsigned seq;
  char id[32], json[160];
  snprintf(id, sizeof id, "svc-%u", ++seq);
  snprintf(json, sizeof json,
           "{\"id\":{\"key\":\"pem:-----BEGIN PRIVATE KEY-----\\nFAKE%u\"}}",
           seq);
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_RESPONSE__INIT;
  resp.ziti_identity_id = id;
  resp.identity_json.data = (uint8_t *)json;
  resp.identity_json.len = strlen(json);
  zm_call_reply(r->call, &resp.base);
  uv_close((uv_handle_t *)&r->t, rsi_closed);
}

static void rsi(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)ctx;
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest *req =
      (const void *)m;
  if (req->service_type < 1 || req->service_type > 3) {
    zm_call_fail(c, ZM_GRPC_INVALID_ARGUMENT, "unknown service type");
    return;
  }
  rsi_t *r = calloc(1, sizeof *r);
  r->call = c;
  uv_timer_init(loop, &r->t);
  r->t.data = r;
  uv_timer_start(&r->t, rsi_fire, rsi_delay_ms, 0);
}

static const char *rsi_scope(const ProtobufCMessage *m, void *ctx) {
  (void)ctx;
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest *req =
      (const void *)m;
  return req->service_type >= 1 && req->service_type <= 3
             ? TYPES[req->service_type]
             : NULL;
}

static void rsi_finish(zm_call_t *c, const ProtobufCMessage *m,
                       zm_grpc_status_t st, const ProtobufCMessage *resp,
                       void *ctx) {
  (void)ctx;
  if (st != ZM_GRPC_OK)
    return;
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse *r =
      (const void *)resp;
  zm_audit("service_identity_issued", "id", r->ziti_identity_id, "service_type",
           rsi_scope(m, NULL), "caller", zm_call_caller(c), "peer",
           zm_call_peer(c), NULL);
}

static void ok_empty(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)m;
  (void)ctx;
  Agynio__Api__ZitiManagement__V1__DeleteIdentityResponse r =
      AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_IDENTITY_RESPONSE__INIT;
  zm_call_reply(c, &r.base);
}

static void create_agent(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)m;
  (void)ctx;
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse r =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_RESPONSE__INIT;
  r.ziti_identity_id = (char *)"agent-identity";
  r.enrollment_jwt = (char *)"eyJhbGciOi.fake.jwt";
  zm_call_reply(c, &r.base);
}

static void list(zm_call_t *c, const ProtobufCMessage *m, void *ctx) {
  (void)m;
  (void)ctx;
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesResponse r =
      AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_MANAGED_IDENTITIES_RESPONSE__INIT;
  zm_call_reply(c, &r.base);
}

static zm_grpc_security_t security(void) {
  zm_grpc_security_t s = {
      .cert_file = env("GRPC_TLS_CERT_FILE", ""),
      .key_file = env("GRPC_TLS_KEY_FILE", ""),
      .client_ca_file = env("GRPC_TLS_CLIENT_CA_FILE", ""),
      .policy_file = env("GRPC_AUTHZ_POLICY_FILE", ""),
      .scopes = TYPES + 1,
      .n_scopes = 3,
  };
  return s;
}

static void on_hup(uv_signal_t *h, int sig) {
  (void)h;
  (void)sig;
  zm_grpc_security_t sec = security();
  char err[512];
  if (zm_grpc_server_load_security(srv, &sec, err, sizeof err) != 0) {
    ZM_ERROR("reload: %s; keeping the previous settings", err);
    zm_audit("reload_failed", "reason", err, NULL);
  } else {
    ZM_INFO("reload: TLS and policy reloaded");
    zm_audit("reload", NULL);
  }
}

static uv_signal_t sig_hup, sig_term;

static zm_workers_t *workers;

/* TESTSRV_HOLD_WORKERS=1: jobs that hold every worker thread until SIGUSR1
 * (or the drain), so that the tests see handshake steps wait for them. */
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;
static zm_work_t gate_jobs[16];
static uv_signal_t sig_usr1;

static void gate_work(zm_work_t *w) {
  (void)w;
  pthread_mutex_lock(&gate_mu);
  while (!gate_open)
    pthread_cond_wait(&gate_cv, &gate_mu);
  pthread_mutex_unlock(&gate_mu);
}

static void gate_done(zm_work_t *w, int status) {
  (void)w;
  (void)status;
}

static void gate_release(void) {
  pthread_mutex_lock(&gate_mu);
  gate_open = 1;
  pthread_cond_broadcast(&gate_cv);
  pthread_mutex_unlock(&gate_mu);
}

static void on_usr1(uv_signal_t *h, int sig) {
  (void)h;
  (void)sig;
  gate_release();
}

static void on_stats(uv_timer_t *t);

static void on_drained(void *d) {
  (void)d;
  on_stats(NULL); /* the final figures, for the tests */
  gate_release();
  if (workers != NULL)
    zm_workers_close(workers, NULL, NULL);
  uv_close((uv_handle_t *)&sig_usr1, NULL);
  uv_close((uv_handle_t *)&sig_hup, NULL);
  uv_close((uv_handle_t *)&sig_term, NULL);
}

static void on_term(uv_signal_t *h, int sig) {
  (void)h;
  (void)sig;
  zm_grpc_server_drain(srv, 2000, on_drained, NULL);
}

static void on_stats(uv_timer_t *t) {
  (void)t;
  zm_grpc_stats_t st;
  zm_grpc_server_get_stats(srv, &st);
  char line[512];
  snprintf(
      line, sizeof line,
      "stats conns_open=%llu refused=%llu buffered=%llu "
      "recv_timeouts=%llu write_stalls=%llu budget_refusals=%llu "
      "rate_limited=%llu authz_denied=%llu tls_failures=%llu "
      "protocol_errors=%llu idle_trims=%llu trimmed_bytes=%llu "
      "hs_workers=%llu hs_loop=%llu hs_orphaned=%llu",
      (unsigned long long)st.conns_open, (unsigned long long)st.conns_refused,
      (unsigned long long)st.buffered, (unsigned long long)st.recv_timeouts,
      (unsigned long long)st.write_stalls,
      (unsigned long long)st.budget_refusals,
      (unsigned long long)st.rate_limited, (unsigned long long)st.authz_denied,
      (unsigned long long)st.tls_failures,
      (unsigned long long)st.protocol_errors, (unsigned long long)st.idle_trims,
      (unsigned long long)st.trimmed_bytes,
      (unsigned long long)st.tls_handshake_steps_offloaded,
      (unsigned long long)st.tls_handshake_steps_inline,
      (unsigned long long)st.tls_handshake_steps_orphaned);
  /* written whole and renamed into place: the test reads it at any moment,
   * and a truncated file read between fopen("w") and the write parsed as
   * no stats at all */
  const char *path = env("TESTSRV_STATS_FILE", "");
  if (*path == '\0')
    return;
  char tmp[1024];
  if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
    return;
  FILE *f = fopen(tmp, "w");
  if (f) {
    int ok = fputs(line, f) >= 0;
    if (fclose(f) == 0 && ok)
      rename(tmp, path);
  }
}

int main(void) {
  zm_disable_core_dumps();
  signal(SIGPIPE, SIG_IGN);
  zm_log_set_level(getenv("LOG_LEVEL") ? ZM_LOG_DEBUG : ZM_LOG_INFO);
  zm_log_start_async();
  char err[512];
  if (zm_audit_open(env("AUDIT_LOG", "stderr"), err, sizeof err) != 0) {
    fprintf(stderr, "audit: %s\n", err);
    return 2;
  }
  rsi_delay_ms = env_ms("TESTSRV_RSI_DELAY_MS", 20);
  static uv_loop_t l;
  uv_loop_init(&l);
  loop = &l;
  zm_health_init(&health);
  zm_health_set(&health, "", 1);
  const zm_grpc_method_t methods[] = {
      {SVC "ResolveIdentity",
       &agynio__api__ziti_management__v1__resolve_identity_request__descriptor,
       resolve, NULL, NULL, 0, NULL, NULL},
      {SVC "ExtendIdentityLease",
       &agynio__api__ziti_management__v1__extend_identity_lease_request__descriptor,
       ok_empty, NULL, NULL, 0, NULL, NULL},
      {SVC "ListManagedIdentities",
       &agynio__api__ziti_management__v1__list_managed_identities_request__descriptor,
       list, NULL, NULL, 0, NULL, NULL},
      {SVC "CreateAgentIdentity",
       &agynio__api__ziti_management__v1__create_agent_identity_request__descriptor,
       create_agent, NULL, NULL, ZM_GRPC_M_COSTLY, NULL, NULL},
      {SVC "DeleteIdentity",
       &agynio__api__ziti_management__v1__delete_identity_request__descriptor,
       ok_empty, NULL, NULL, 0, NULL, NULL},
      {SVC "RequestServiceIdentity",
       &agynio__api__ziti_management__v1__request_service_identity_request__descriptor,
       rsi, NULL, NULL, ZM_GRPC_M_COSTLY, rsi_scope, rsi_finish},
      {"/grpc.health.v1.Health/Check",
       &grpc__health__v1__health_check_request__descriptor, zm_health_check,
       &health, NULL, ZM_GRPC_M_PUBLIC, NULL, NULL},
  };
  zm_grpc_config_t gc = {
      .address = env("GRPC_ADDRESS", "127.0.0.1:0"),
      .max_recv_msg = (size_t)env_ms("GRPC_MAX_RECV_MSG_SIZE", 4u << 20),
      .max_streams = (uint32_t)env_ms("GRPC_MAX_CONCURRENT_STREAMS", 1024),
      .idle_timeout_ms = env_ms("GRPC_IDLE_TIMEOUT", 300000),
      .max_conns = (unsigned)env_ms("GRPC_MAX_CONNECTIONS", 65536),
      .max_buffered = (size_t)env_ms("GRPC_MAX_BUFFERED_BYTES", 256u << 20),
      .recv_timeout_ms = env_ms("GRPC_RECV_TIMEOUT", 30000),
      .write_stall_ms = env_ms("GRPC_WRITE_STALL_TIMEOUT", 30000),
      .caller_rate = (double)env_ms("GRPC_CALLER_RATE", 10),
      .caller_burst = (unsigned)env_ms("GRPC_CALLER_BURST", 20),
      .caller_inflight = (unsigned)env_ms("GRPC_CALLER_MAX_INFLIGHT", 32),
  };
  /* TLS handshake steps on worker threads as in the service
   * (TESTSRV_WORKERS=0: on the loop) */
  unsigned nw = (unsigned)env_ms("TESTSRV_WORKERS", 2);
  if (nw > 0 && zm_workers_new(&workers, loop, nw, ZM_GRPC_HS_MAX_QUEUED) != 0)
    return 2;
  gc.workers = workers;
  gc.tls_handshake_wait_ms = env_ms("TESTSRV_HS_WAIT_MS", 0);
  if (workers != NULL && env_ms("TESTSRV_HOLD_WORKERS", 0) != 0)
    for (unsigned i = 0; i < nw && i < ZM_ARRAY_SIZE(gate_jobs); i++)
      if (zm_workers_queue(workers, &gate_jobs[i], gate_work, gate_done) != 0)
        return 2;
  uv_signal_init(loop, &sig_usr1);
  uv_signal_start(&sig_usr1, on_usr1, SIGUSR1);
  uv_unref((uv_handle_t *)&sig_usr1);
  zm_grpc_server_new(&srv, loop, &gc, methods, ZM_ARRAY_SIZE(methods));
  zm_grpc_security_t sec = security();
  if (zm_grpc_server_load_security(srv, &sec, err, sizeof err) != 0) {
    fprintf(stderr, "security: %s\n", err);
    return 2;
  }
  int rv = zm_grpc_server_listen(srv);
  if (rv != 0) {
    fprintf(stderr, "listen: %s\n", zm_strerror(rv));
    return 1;
  }
  uv_signal_init(loop, &sig_hup);
  uv_signal_start(&sig_hup, on_hup, SIGHUP);
  uv_signal_init(loop, &sig_term);
  uv_signal_start(&sig_term, on_term, SIGTERM);
  static uv_timer_t stats;
  uv_timer_init(loop, &stats);
  uv_timer_start(&stats, on_stats, 100, 100);
  uv_unref((uv_handle_t *)&stats);
  fprintf(stdout, "listening on port %d (%s)\n", zm_grpc_server_port(srv),
          zm_grpc_server_tls_enabled(srv) ? "tls" : "h2c");
  fflush(stdout);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&stats, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  zm_grpc_server_free(srv);
  uv_loop_close(loop);
  zm_audit_close();
  zm_log_stop_async();
  return 0;
}
