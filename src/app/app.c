/*
 * app.c - wiring: configuration -> store + index -> controller client ->
 * gRPC server -> GC; signals and graceful shutdown. The only file that
 * knows every module.
 */
#include "zm/app.h"
#include "zm/audit.h"
#include "zm/cpuquota.h"
#include "zm/enroll.h"
#include "zm/log.h"
#include "zm/logq.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define SVC "/agynio.api.ziti_management.v1.ZitiManagementService/"
#define SVC_NAME "agynio.api.ziti_management.v1.ZitiManagementService"
/* Loop-lag probe period (ms) when LOOP_LAG_PROBE is set. */
#define ZM_LAG_PERIOD_MS 1u

/* ===================== start-up ========================================= */

static void on_load_managed(const zm_managed_row_t *r, void *data) {
  zm_app_t *app = data;
  zm_index_extra_t x = {r->workload_id, r->agent_id, r->environment_id};
  zm_index_put_managed_ext(app->index, r->ziti_identity_id,
                           strlen(r->ziti_identity_id), r->identity_id,
                           strlen(r->identity_id), r->identity_type, &x);
}

static void on_load_service(const zm_service_row_t *r, void *data) {
  zm_app_t *app = data;
  zm_index_put_service(app->index, r->ziti_identity_id,
                       strlen(r->ziti_identity_id), r->lease_expires_ms);
}

static void on_load_pending(const zm_pending_row_t *r, void *data) {
  (void)r;
  size_t *n = data;
  (*n)++;
}

struct load_ctx {
  zm_app_t *app;
  size_t pending;
};

static void on_load_pending_ctx(const zm_pending_row_t *r, void *data) {
  struct load_ctx *lc = data;
  on_load_pending(r, &lc->pending);
}
static void on_load_managed_ctx(const zm_managed_row_t *r, void *data) {
  on_load_managed(r, ((struct load_ctx *)data)->app);
}
static void on_load_service_ctx(const zm_service_row_t *r, void *data) {
  on_load_service(r, ((struct load_ctx *)data)->app);
}

static int open_store(zm_app_t *app) {
  zm_store_config_t sc = {.path = app->cfg.store_path,
                          .sync_full = app->cfg.store_sync_full,
                          .url = app->cfg.database_url,
                          .pool_size = app->cfg.database_pool,
                          .connect_timeout_ms = app->cfg.database_connect_ms};
  if (zm_store_open(&app->store, app->loop, &sc) != 0) {
    ZM_ERROR("store: cannot open %s",
             app->cfg.database_url[0] ? "the PostgreSQL database (DATABASE_URL)"
                                      : app->cfg.store_path);
    return -1;
  }
  return 0;
}

/* LOOP_BUSY_POLL_US=auto: polling pays off only with CPU to spare, and a
 * CPU quota charges every polled microsecond against the limit (then
 * throttles the whole process for the rest of the period), so auto polls
 * only where no quota applies. */
static unsigned busy_poll_window(unsigned configured) {
  if (configured != ZM_BUSY_POLL_AUTO) {
    if (configured == 0)
      ZM_INFO("busy polling: off (LOOP_BUSY_POLL_US=0)");
    else
      ZM_INFO("busy polling: %u us (LOOP_BUSY_POLL_US=%u)", configured,
              configured);
    return configured;
  }
  double cores = 0;
  char where[1100];
  int q = zm_cpu_quota("/proc/self/cgroup", "/sys/fs/cgroup", &cores, where,
                       sizeof where);
  if (q == 1) {
    ZM_INFO("busy polling: off (LOOP_BUSY_POLL_US=auto: CPU quota of %.2f "
            "cores in %s)",
            cores, where);
    return 0;
  }
  ZM_INFO("busy polling: %u us (LOOP_BUSY_POLL_US=auto: %s)",
          ZM_BUSY_POLL_AUTO_US,
          q == 0 ? "no CPU quota" : "cgroups unreadable, no quota assumed");
  return ZM_BUSY_POLL_AUTO_US;
}

/* Busy polling would keep the crypto threads (SCHED_IDLE: they run only
 * when the loop sleeps) off the core: no polling while they have work. */
static int crypto_busy(void *ctx) {
  const zm_app_t *a = ctx;
  return a->workers != NULL &&
         zm_workers_queued(a->workers) + zm_workers_running(a->workers) > 0;
}

/* 1 if `name` is an element of the comma-separated `list`. */
static int method_disabled(const char *list, const char *name) {
  size_t n = strlen(name);
  for (const char *p = list; *p != '\0';) {
    while (*p == ',' || *p == ' ')
      p++;
    size_t k = strcspn(p, ", ");
    if (k == n && strncmp(p, name, n) == 0)
      return 1;
    p += k;
  }
  return 0;
}

/* ===================== security: scopes, audit, reload =================== */

/* RequestServiceIdentity's authorization scope: the service type's name. */
static const char *rsi_scope(const ProtobufCMessage *m, void *ctx) {
  const zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest *req =
      (const void *)m;
  const zm_service_type_t *t =
      zm_config_service_type(&app->cfg, (int)req->service_type);
  return t ? t->name : NULL;
}

/* Audit records of the RPCs that change identities (never the identity
 * JSON or the enrollment JWT of a response). */
static void audit_rsi(zm_call_t *c, const ProtobufCMessage *req,
                      zm_grpc_status_t st, const ProtobufCMessage *resp,
                      void *ctx) {
  const Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse *r =
      (const void *)resp;
  zm_audit(st == ZM_GRPC_OK ? "service_identity_issued"
                            : "service_identity_failed",
           "id", r ? r->ziti_identity_id : NULL, "service_type",
           rsi_scope(req, ctx), "caller", zm_call_caller(c), "peer",
           zm_call_peer(c), "status", zm_grpc_code_name(st), NULL);
}

static void audit_create_agent(zm_call_t *c, const ProtobufCMessage *req,
                               zm_grpc_status_t st,
                               const ProtobufCMessage *resp, void *ctx) {
  (void)ctx;
  const Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest *q =
      (const void *)req;
  const Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse *r =
      (const void *)resp;
  zm_audit(st == ZM_GRPC_OK ? "agent_identity_created"
                            : "agent_identity_failed",
           "id", r ? r->ziti_identity_id : NULL, "agent_id",
           q ? q->agent_id : NULL, "caller", zm_call_caller(c), "peer",
           zm_call_peer(c), "status", zm_grpc_code_name(st), NULL);
}

static void audit_delete(zm_call_t *c, const ProtobufCMessage *req,
                         zm_grpc_status_t st, const ProtobufCMessage *resp,
                         void *ctx) {
  (void)ctx;
  (void)resp;
  const Agynio__Api__ZitiManagement__V1__DeleteIdentityRequest *q =
      (const void *)req;
  zm_audit(st == ZM_GRPC_OK ? "identity_deleted" : "identity_delete_failed",
           "id", q ? q->ziti_identity_id : NULL, "caller", zm_call_caller(c),
           "peer", zm_call_peer(c), "status", zm_grpc_code_name(st), NULL);
}

/* A string field of a message by name, through its descriptor (NULL when
 * the message has no such string field). */
static const char *str_field(const ProtobufCMessage *m, const char *name) {
  if (m == NULL)
    return NULL;
  const ProtobufCFieldDescriptor *f =
      protobuf_c_message_descriptor_get_field_by_name(m->descriptor, name);
  if (f == NULL || f->type != PROTOBUF_C_TYPE_STRING ||
      f->label == PROTOBUF_C_LABEL_REPEATED)
    return NULL;
  return *(const char *const *)(const void *)((const char *)m + f->offset);
}

static const char *first_str(const ProtobufCMessage *m) {
  const char *v = str_field(m, "ziti_identity_id");
  return v ? v : str_field(m, "identity_id");
}

static void audit_create_identity(zm_call_t *c, const ProtobufCMessage *req,
                                  zm_grpc_status_t st,
                                  const ProtobufCMessage *resp, void *ctx) {
  (void)ctx;
  zm_audit(st == ZM_GRPC_OK ? "identity_created" : "identity_create_failed",
           "id", first_str(resp), "request",
           req ? req->descriptor->short_name : NULL, "caller",
           zm_call_caller(c), "peer", zm_call_peer(c), "status",
           zm_grpc_code_name(st), NULL);
}

static void audit_delete_any(zm_call_t *c, const ProtobufCMessage *req,
                             zm_grpc_status_t st, const ProtobufCMessage *resp,
                             void *ctx) {
  (void)ctx;
  (void)resp;
  zm_audit(st == ZM_GRPC_OK ? "identity_deleted" : "identity_delete_failed",
           "id", first_str(req), "request",
           req ? req->descriptor->short_name : NULL, "caller",
           zm_call_caller(c), "peer", zm_call_peer(c), "status",
           zm_grpc_code_name(st), NULL);
}

static void audit_patch_roles(zm_call_t *c, const ProtobufCMessage *req,
                              zm_grpc_status_t st, const ProtobufCMessage *resp,
                              void *ctx) {
  (void)ctx;
  (void)resp;
  zm_audit(st == ZM_GRPC_OK ? "identity_roles_patched"
                            : "identity_roles_patch_failed",
           "id", first_str(req), "caller", zm_call_caller(c), "peer",
           zm_call_peer(c), "status", zm_grpc_code_name(st), NULL);
}

/* Services, configs and policies: the request's object id or name and,
 * for creates, the new id. */
static void audit_object(zm_call_t *c, const ProtobufCMessage *req,
                         zm_grpc_status_t st, const ProtobufCMessage *resp,
                         void *ctx) {
  (void)ctx;
  const char *rname = req ? req->descriptor->short_name : "";
  int create = strncmp(rname, "Create", 6) == 0;
  const char *key = str_field(req, "ziti_service_id");
  if (key == NULL)
    key = str_field(req, "ziti_service_policy_id");
  if (key == NULL)
    key = str_field(req, "name");
  const char *id = NULL;
  if (create) {
    id = str_field(resp, "ziti_service_id");
    if (id == NULL)
      id = str_field(resp, "ziti_service_policy_id");
  }
  zm_audit(st == ZM_GRPC_OK ? "controller_object_changed"
                            : "controller_object_change_failed",
           "request", rname, "key", key, "id", id, "caller", zm_call_caller(c),
           "peer", zm_call_peer(c), "status", zm_grpc_code_name(st), NULL);
}

static zm_grpc_security_t security_of(zm_app_t *app) {
  zm_grpc_security_t sec = {.cert_file = app->cfg.tls_cert_file,
                            .key_file = app->cfg.tls_key_file,
                            .client_ca_file = app->cfg.tls_client_ca_file,
                            .policy_file = app->cfg.authz_policy_file,
                            .scopes = app->type_names,
                            .n_scopes = app->n_type_names};
  return sec;
}

/* SIGHUP: certificate, key, client CA and policy are read again (the same
 * paths) and replace the old ones together; a bad file changes nothing.
 * Open connections keep theirs; the policy applies to the next call. */
static void on_sighup(uv_signal_t *s, int signum) {
  (void)signum;
  zm_app_t *app = s->data;
  zm_grpc_security_t sec = security_of(app);
  char err[512];
  if (zm_grpc_server_load_security(app->grpc, &sec, err, sizeof err) != 0) {
    ZM_ERROR("reload (SIGHUP): %s; keeping the previous TLS and policy", err);
    zm_audit("reload_failed", "reason", err, NULL);
    return;
  }
  ZM_INFO("reload (SIGHUP): TLS material and authorization policy reloaded");
  zm_audit("reload", "tls",
           zm_grpc_server_tls_enabled(app->grpc) ? "on" : "off", "policy",
           app->cfg.authz_policy_file[0] ? app->cfg.authz_policy_file : "none",
           NULL);
}

/* ===================== loop-lag probe ==================================== */

/* Before the loop blocks: the log and audit lines queued in this iteration
 * wake their writers (zm/logq.h). */
static void on_log_prepare(uv_prepare_t *h) {
  (void)h;
  zm_log_kick();
  zm_audit_kick();
}

/* Runs once per loop iteration, just before the loop blocks for I/O: the
 * thread's CPU time since the last run is what one iteration cost, however
 * long it then had to wait for the CPU (which the lateness above counts).
 * The page faults and preemptions in the busiest iteration say whether its
 * CPU went to the loop's work or to the kernel growing memory, and whether
 * another thread took the core in the middle of it. */
static void on_busy_prepare(uv_prepare_t *h) {
  zm_app_t *app = h->data;
  uint64_t now = zm_thread_cpu_ns();
  struct rusage ru;
  uint64_t faults = 0, preempt = 0;
  if (getrusage(RUSAGE_THREAD, &ru) == 0) {
    faults = (uint64_t)ru.ru_minflt + (uint64_t)ru.ru_majflt;
    preempt = (uint64_t)ru.ru_nivcsw;
  }
  if (app->busy_last_ns != 0) {
    uint64_t us = (now - app->busy_last_ns) / 1000u;
    if (us > app->stats.busy_max_us) {
      app->stats.busy_max_us = us;
      app->stats.busy_max_faults = faults - app->busy_last_faults;
      app->stats.busy_max_preempt = preempt - app->busy_last_preempt;
    }
    if (us > app->stats.busy_worst_us)
      app->stats.busy_worst_us = us;
  }
  app->busy_last_ns = now;
  app->busy_last_faults = faults;
  app->busy_last_preempt = preempt;
}

static void on_lag(uv_timer_t *t) {
  zm_app_t *app = t->data;
  uv_update_time(app->loop);
  uint64_t now = uv_now(app->loop);
  if (now / 1000 != app->lag_report_s) {
    /* one line per second with the worst lateness of the 1 ms probe */
    if (app->lag_report_s != 0)
      ZM_INFO("loop lag: max %llu ms in the last second (worst %llu ms); "
              "busiest iteration %llu us CPU with %llu page faults and %llu "
              "preemptions (worst %llu us)",
              (unsigned long long)app->stats.lag_max_ms,
              (unsigned long long)app->stats.lag_worst_ms,
              (unsigned long long)app->stats.busy_max_us,
              (unsigned long long)app->stats.busy_max_faults,
              (unsigned long long)app->stats.busy_max_preempt,
              (unsigned long long)app->stats.busy_worst_us);
    app->lag_report_s = now / 1000;
    app->stats.lag_max_ms = 0;
    app->stats.busy_max_us = 0;
  }
  if (now > app->lag_expected) {
    uint64_t late = now - app->lag_expected;
    if (late > app->stats.lag_max_ms)
      app->stats.lag_max_ms = late;
    if (late > app->stats.lag_worst_ms)
      app->stats.lag_worst_ms = late;
  }
  app->lag_expected = now + ZM_LAG_PERIOD_MS;
}

/* ===================== shutdown ========================================== */

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void on_ziti_closed(void *data) {
  zm_app_t *app = data;
  app->ziti = NULL;
}

static void log_stats(const zm_app_t *app) {
  const zm_app_stats_t *s = &app->stats;
  const zm_life_stats_t *l = zm_life_stats(app->life);
  ZM_INFO(
      "stats: enroll started=%llu ok=%llu failed=%llu compensated=%llu "
      "compensate_failed=%llu; extend fast=%llu durable=%llu; flushes=%llu "
      "(%llu leases, %llu failed); deleted=%llu deferred=%llu; "
      "outages=%llu",
      (unsigned long long)s->enroll_started, (unsigned long long)s->enroll_ok,
      (unsigned long long)s->enroll_failed,
      (unsigned long long)s->enroll_compensated,
      (unsigned long long)s->enroll_compensate_failed,
      (unsigned long long)l->extend_fast, (unsigned long long)l->extend_durable,
      (unsigned long long)l->flushes, (unsigned long long)l->flushed_leases,
      (unsigned long long)l->flush_failures, (unsigned long long)l->deleted,
      (unsigned long long)l->delete_deferred,
      (unsigned long long)l->outages_detected);
  if (app->collect != NULL) {
    const zm_collect_stats_t *c = zm_collect_stats(app->collect);
    const zm_recover_stats_t *r = zm_recover_stats(app->recover);
    ZM_INFO(
        "stats: collect sweeps=%llu collected=%llu failed=%llu "
        "skipped_outage=%llu; recover sweeps=%llu pending_resolved=%llu "
        "pending_failed=%llu tombs_retried=%llu",
        (unsigned long long)c->sweeps, (unsigned long long)c->collected,
        (unsigned long long)c->failed, (unsigned long long)c->skipped_outage,
        (unsigned long long)r->sweeps, (unsigned long long)r->pending_resolved,
        (unsigned long long)r->pending_failed,
        (unsigned long long)r->tombs_retried);
  }
}

static void finish_shutdown(zm_app_t *app) {
  zm_enroll_close(app); /* nothing is queued: every call has finished */
  log_stats(app);
  if (app->ziti != NULL)
    zm_ziti_close(app->ziti, on_ziti_closed, app);
  if (app->workers != NULL) /* idle by now: every call has finished */
    zm_workers_close(app->workers, NULL, NULL);
  /* Commits whatever handlers queued; callbacks run before it returns. */
  zm_store_close(app->store);
  app->store = NULL;
  if (app->metrics != NULL)
    zm_metrics_srv_close(app->metrics, NULL, NULL);
  uv_close((uv_handle_t *)&app->sigterm, on_handle_closed);
  uv_close((uv_handle_t *)&app->sigint, on_handle_closed);
  uv_close((uv_handle_t *)&app->sighup, on_handle_closed);
  uv_close((uv_handle_t *)&app->lag_timer, on_handle_closed);
  uv_close((uv_handle_t *)&app->busy_prep, on_handle_closed);
  uv_close((uv_handle_t *)&app->log_prep, on_handle_closed);
  uv_close((uv_handle_t *)&app->shutdown_timer, on_handle_closed);
  ZM_INFO("shutdown complete");
}

/* The last steps of shutdown are reached from callbacks of other modules
 * (a store completion that finished the last call or the last GC delete),
 * and closing the store from inside its own callback is not allowed: they
 * run on the next loop iteration instead. */
static void on_shutdown_timer(uv_timer_t *t) {
  zm_app_t *app = t->data;
  if (app->stops_pending != 0)
    return; /* not yet */
  finish_shutdown(app);
}

static void on_life_stopped(void *data) {
  zm_app_t *app = data;
  app->stops_pending--;
  uv_timer_start(&app->shutdown_timer, on_shutdown_timer, 0, 0);
}

/* Collection and recovery first (their deletes go through the lifecycle),
 * then the lifecycle (its last lease flush), then the store. */
static void on_sweeper_stopped(void *data) {
  zm_app_t *app = data;
  if (--app->stops_pending == 1)
    zm_life_stop(app->life, on_life_stopped, app);
}

static void on_drained(void *data) {
  zm_app_t *app = data;
  ZM_INFO("grpc: drained");
  if (app->collect != NULL) {
    app->stops_pending = 3;
    zm_collect_stop(app->collect, on_sweeper_stopped, app);
    zm_recover_stop(app->recover, on_sweeper_stopped, app);
  } else {
    app->stops_pending = 1;
    zm_life_stop(app->life, on_life_stopped, app);
  }
}

static void on_signal(uv_signal_t *s, int signum) {
  zm_app_t *app = s->data;
  if (app->shutting_down) {
    ZM_WARN("second signal (%d): exiting now", signum);
    _exit(1);
  }
  app->shutting_down = 1;
  ZM_INFO("signal %d: draining (grace %llu ms)", signum,
          (unsigned long long)app->cfg.shutdown_grace_ms);
  zm_health_set_all(&app->health, 0);
  /* watchers heard NOT_SERVING; their streams must not hold the drain */
  zm_health_end_watches(&app->health);
  zm_grpc_server_drain(app->grpc, app->cfg.shutdown_grace_ms, on_drained, app);
}

/* The store clock is known and the outage rule has its resume time: serve,
 * collect, recover. */
static void on_ready(void *data) {
  zm_app_t *app = data;
  if (app->shutting_down)
    return;
  if (app->collect != NULL) {
    zm_collect_start(app->collect);
    zm_recover_start(app->recover);
  }
  zm_health_set_all(&app->health, 1);
  app->serving = 1;
  ZM_INFO("serving");
}

/* ===================== run =============================================== */

int zm_app_migrate_only(const zm_config_t *cfg) {
  zm_app_t app;
  memset(&app, 0, sizeof app);
  app.cfg = *cfg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  app.loop = &loop;
  int rv = open_store(&app);
  if (rv == 0)
    zm_store_close(app.store);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return rv == 0 ? 0 : 1;
}

int zm_app_run(const zm_config_t *cfg) {
  static zm_app_t app; /* one per process; static keeps it off the stack */
  memset(&app, 0, sizeof app);
  app.cfg = *cfg;
  app.start_wall_ms = zm_wall_ms();
  uv_loop_t loop;
  uv_loop_init(&loop);
  app.loop = &loop;

  if (zm_bootstrap_enroll(&loop, cfg) != 0) {
    uv_loop_close(&loop); /* the bootstrap closed everything it opened */
    return 1;
  }
  if (open_store(&app) != 0) {
    uv_run(&loop, UV_RUN_DEFAULT); /* the close callbacks of a failed open */
    uv_loop_close(&loop);
    return 1;
  }
  app.index = zm_index_new();
  uint64_t t0 = uv_hrtime();
  struct load_ctx lc = {&app, 0};
  if (zm_store_load(app.store, on_load_managed_ctx, on_load_service_ctx,
                    on_load_pending_ctx, &lc) != 0) {
    ZM_ERROR("store: cannot load %s", cfg->store_path);
    zm_store_close(app.store);
    zm_index_free(app.index);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return 1;
  }
  /* The load's transient allocations (SQLite's scan pages, PostgreSQL's
   * result batches) were freed between the index's chunks: hand the whole
   * free pages among them back to the OS, or the start-up peak stays
   * resident for the process's life. */
  malloc_trim(0);
  ZM_INFO("store: loaded %zu managed, %zu service identities, %zu pending "
          "creations from %s in %.3f s",
          zm_index_managed_count(app.index), zm_index_service_count(app.index),
          lc.pending, cfg->store_path, (double)(uv_hrtime() - t0) / 1e9);

  /* Each enrollment and each controller connection (its TLS handshake) has
   * at most one job queued, and the gRPC server at most
   * ZM_GRPC_HS_MAX_QUEUED: the queue never refuses an admitted enrollment. */
  int wrv = zm_workers_new(&app.workers, &loop, cfg->crypto_threads,
                           cfg->enroll_max_inflight + cfg->ziti_pool_size +
                               ZM_GRPC_HS_MAX_QUEUED);
  if (wrv != 0) {
    ZM_ERROR("cannot start the crypto workers: %s", uv_strerror(wrv));
    return 1;
  }
  if (cfg->controller_url[0] != '\0') {
    zm_ziti_config_t zc = {.controller_url = cfg->controller_url,
                           .ca_file = cfg->ca_file,
                           .cert_file = cfg->cert_file,
                           .key_file = cfg->key_file,
                           .pool_size = cfg->ziti_pool_size,
                           .request_timeout_ms = cfg->ziti_timeout_ms,
                           .workers = app.workers};
    if (zm_ziti_new(&app.ziti, &loop, &zc) != 0) {
      ZM_ERROR("controller: cannot set up the client for %s",
               cfg->controller_url);
      return 1;
    }
  } else {
    ZM_WARN("ZITI_CONTROLLER_URL is not set: controller RPCs answer "
            "UNAVAILABLE; hot paths only");
  }

  zm_health_init(&app.health);
  zm_health_set(&app.health, "", 0);
  zm_health_set(&app.health, SVC_NAME, 0);
  const zm_grpc_method_t methods[] = {
      {SVC "ResolveIdentity",
       &agynio__api__ziti_management__v1__resolve_identity_request__descriptor,
       zm_rpc_resolve_identity, &app, NULL, 0, NULL, NULL},
      {SVC "ExtendIdentityLease",
       &agynio__api__ziti_management__v1__extend_identity_lease_request__descriptor,
       zm_rpc_extend_lease, &app, NULL, 0, NULL, NULL},
      {SVC "ListManagedIdentities",
       &agynio__api__ziti_management__v1__list_managed_identities_request__descriptor,
       zm_rpc_list_managed, &app, NULL, 0, NULL, NULL},
      {SVC "CreateAgentIdentity",
       &agynio__api__ziti_management__v1__create_agent_identity_request__descriptor,
       zm_rpc_create_agent, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_agent},
      {SVC "CreateSandboxIdentity",
       &agynio__api__ziti_management__v1__create_sandbox_identity_request__descriptor,
       zm_rpc_create_sandbox, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_identity},
      {SVC "CreateAppIdentity",
       &agynio__api__ziti_management__v1__create_app_identity_request__descriptor,
       zm_rpc_create_app, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_identity},
      {SVC "CreateRunnerIdentity",
       &agynio__api__ziti_management__v1__create_runner_identity_request__descriptor,
       zm_rpc_create_runner, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_identity},
      {SVC "CreateDeviceIdentity",
       &agynio__api__ziti_management__v1__create_device_identity_request__descriptor,
       zm_rpc_create_device, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_identity},
      {SVC "CreateTunnelIdentity",
       &agynio__api__ziti_management__v1__create_tunnel_identity_request__descriptor,
       zm_rpc_create_tunnel, &app, NULL, ZM_GRPC_M_COSTLY, NULL,
       audit_create_identity},
      {SVC "DeleteIdentity",
       &agynio__api__ziti_management__v1__delete_identity_request__descriptor,
       zm_rpc_delete_identity, &app, NULL, 0, NULL, audit_delete},
      {SVC "DeleteAppIdentity",
       &agynio__api__ziti_management__v1__delete_app_identity_request__descriptor,
       zm_rpc_delete_app, &app, NULL, 0, NULL, audit_delete_any},
      {SVC "DeleteRunnerIdentity",
       &agynio__api__ziti_management__v1__delete_runner_identity_request__descriptor,
       zm_rpc_delete_runner, &app, NULL, 0, NULL, audit_delete_any},
      {SVC "DeleteDeviceIdentity",
       &agynio__api__ziti_management__v1__delete_device_identity_request__descriptor,
       zm_rpc_delete_device, &app, NULL, 0, NULL, audit_delete_any},
      {SVC "DeleteTunnelIdentity",
       &agynio__api__ziti_management__v1__delete_tunnel_identity_request__descriptor,
       zm_rpc_delete_tunnel, &app, NULL, 0, NULL, audit_delete_any},
      {SVC "PatchIdentityRoleAttributes",
       &agynio__api__ziti_management__v1__patch_identity_role_attributes_request__descriptor,
       zm_rpc_patch_identity_roles, &app, NULL, 0, NULL, audit_patch_roles},
      {SVC "GetIdentityLiveness",
       &agynio__api__ziti_management__v1__get_identity_liveness_request__descriptor,
       zm_rpc_identity_liveness, &app, NULL, 0, NULL, NULL},
      {SVC "RequestServiceIdentity",
       &agynio__api__ziti_management__v1__request_service_identity_request__descriptor,
       zm_rpc_request_service_identity, &app, NULL, ZM_GRPC_M_COSTLY, rsi_scope,
       audit_rsi},
      {SVC "CreateService",
       &agynio__api__ziti_management__v1__create_service_request__descriptor,
       zm_rpc_create_service, &app, NULL, ZM_GRPC_M_COSTLY, NULL, audit_object},
      {SVC "GetService",
       &agynio__api__ziti_management__v1__get_service_request__descriptor,
       zm_rpc_get_service, &app, NULL, 0, NULL, NULL},
      {SVC "ListServices",
       &agynio__api__ziti_management__v1__list_services_request__descriptor,
       zm_rpc_list_services, &app, NULL, 0, NULL, NULL},
      {SVC "UpdateService",
       &agynio__api__ziti_management__v1__update_service_request__descriptor,
       zm_rpc_update_service, &app, NULL, ZM_GRPC_M_COSTLY, NULL, audit_object},
      {SVC "DeleteService",
       &agynio__api__ziti_management__v1__delete_service_request__descriptor,
       zm_rpc_delete_service_rpc, &app, NULL, 0, NULL, audit_object},
      {SVC "CreateServicePolicy",
       &agynio__api__ziti_management__v1__create_service_policy_request__descriptor,
       zm_rpc_create_policy, &app, NULL, ZM_GRPC_M_COSTLY, NULL, audit_object},
      {SVC "GetServicePolicy",
       &agynio__api__ziti_management__v1__get_service_policy_request__descriptor,
       zm_rpc_get_policy, &app, NULL, 0, NULL, NULL},
      {SVC "ListServicePolicies",
       &agynio__api__ziti_management__v1__list_service_policies_request__descriptor,
       zm_rpc_list_policies, &app, NULL, 0, NULL, NULL},
      {SVC "DeleteServicePolicy",
       &agynio__api__ziti_management__v1__delete_service_policy_request__descriptor,
       zm_rpc_delete_policy, &app, NULL, 0, NULL, audit_object},
      {SVC "ListServicesByTag",
       &agynio__api__ziti_management__v1__list_services_by_tag_request__descriptor,
       zm_rpc_list_services_by_tag, &app, NULL, 0, NULL, NULL},
      {SVC "ListIdentitiesByTag",
       &agynio__api__ziti_management__v1__list_identities_by_tag_request__descriptor,
       zm_rpc_list_identities_by_tag, &app, NULL, 0, NULL, NULL},
      {SVC "ListServicePoliciesByTag",
       &agynio__api__ziti_management__v1__list_service_policies_by_tag_request__descriptor,
       zm_rpc_list_policies_by_tag, &app, NULL, 0, NULL, NULL},
      /* health is always reachable (probes carry no client certificate) */
      {"/grpc.health.v1.Health/Check",
       &grpc__health__v1__health_check_request__descriptor, zm_health_check,
       &app.health, NULL, ZM_GRPC_M_PUBLIC, NULL, NULL},
      {"/grpc.health.v1.Health/Watch",
       &grpc__health__v1__health_check_request__descriptor, NULL, &app.health,
       &zm_health_watch_ops, ZM_GRPC_M_PUBLIC, NULL, NULL},
      /* v1alpha has the same wire format as v1: one implementation;
       * subject to the policy like the service's methods */
      {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
       &grpc__reflection__v1__server_reflection_request__descriptor, NULL, NULL,
       &zm_reflect_ops, 0, NULL, NULL},
      {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
       &grpc__reflection__v1__server_reflection_request__descriptor, NULL, NULL,
       &zm_reflect_ops, 0, NULL, NULL},
  };
  /* GRPC_DISABLED_METHODS: an operator can switch RPCs off (they answer
   * UNIMPLEMENTED, as unknown methods do). */
  zm_grpc_method_t enabled[ZM_ARRAY_SIZE(methods)];
  size_t n_enabled = 0;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(methods); i++) {
    const char *name = strrchr(methods[i].path, '/') + 1;
    if (method_disabled(cfg->disabled_methods, name)) {
      ZM_INFO("grpc: %s disabled by GRPC_DISABLED_METHODS", name);
      continue;
    }
    enabled[n_enabled++] = methods[i];
  }
  app.reflect = zm_reflect_new(zm_descriptor_set, zm_descriptor_set_len,
                               enabled, n_enabled);
  ZM_ASSERT(app.reflect != NULL); /* built from protoc's own output */
  for (size_t i = 0; i < n_enabled; i++)
    if (enabled[i].stream == &zm_reflect_ops)
      enabled[i].ctx = app.reflect;
  app.busy_poll_us = busy_poll_window(cfg->busy_poll_us);
  zm_grpc_config_t gc = {.address = cfg->grpc_address,
                         .max_recv_msg = cfg->max_recv_msg,
                         .max_streams = cfg->max_streams,
                         .idle_timeout_ms = cfg->idle_timeout_ms,
                         .max_conns = cfg->max_conns,
                         .max_buffered = cfg->max_buffered,
                         .recv_timeout_ms = cfg->recv_timeout_ms,
                         .write_stall_ms = cfg->write_stall_ms,
                         .caller_rate = cfg->caller_rate,
                         .caller_burst = cfg->caller_burst,
                         .caller_inflight = cfg->caller_inflight,
                         .busy_poll_us = app.busy_poll_us,
                         .busy_poll_veto = crypto_busy,
                         .busy_poll_ctx = &app,
                         .workers = app.workers};
  zm_grpc_server_new(&app.grpc, &loop, &gc, enabled, n_enabled);
  for (size_t i = 0; i < cfg->n_types && i < ZM_ARRAY_SIZE(app.type_names); i++)
    app.type_names[app.n_type_names++] = app.cfg.types[i].name;
  {
    zm_grpc_security_t sec = security_of(&app);
    char err[512];
    if (zm_grpc_server_load_security(app.grpc, &sec, err, sizeof err) != 0) {
      ZM_ERROR("grpc: %s", err);
      return 1;
    }
    ZM_INFO("grpc: %s%s%s",
            zm_grpc_server_tls_enabled(app.grpc) ? "TLS" : "h2c (plaintext)",
            cfg->tls_client_ca_file[0] ? ", client certificates verified" : "",
            cfg->authz_policy_file[0] ? ", authorization policy loaded" : "");
  }
  int rv = zm_grpc_server_listen(app.grpc);
  if (rv != 0) {
    ZM_ERROR("grpc: cannot listen on %s: %s", cfg->grpc_address,
             zm_strerror(rv));
    return 1;
  }
  if (cfg->metrics_address[0] != '\0') {
    zm_metrics_config_t mc = {.address = cfg->metrics_address,
                              .render = zm_app_render_metrics,
                              .ready = zm_app_ready,
                              .data = &app};
    if (zm_metrics_srv_new(&app.metrics, &loop, &mc) != 0 ||
        (rv = zm_metrics_srv_listen(app.metrics)) != 0) {
      ZM_ERROR("metrics: cannot listen on %s: %s", cfg->metrics_address,
               zm_strerror(rv));
      return 1;
    }
    ZM_INFO("metrics: /metrics, /healthz, /readyz on %s (port %d)",
            cfg->metrics_address, zm_metrics_srv_port(app.metrics));
  }

  uv_signal_init(&loop, &app.sigterm);
  uv_signal_init(&loop, &app.sigint);
  app.sigterm.data = app.sigint.data = &app;
  uv_signal_start(&app.sigterm, on_signal, SIGTERM);
  uv_signal_start(&app.sigint, on_signal, SIGINT);
  uv_signal_init(&loop, &app.sighup);
  app.sighup.data = &app;
  uv_signal_start(&app.sighup, on_sighup, SIGHUP);
  uv_timer_init(&loop, &app.shutdown_timer);
  app.shutdown_timer.data = &app;
  zm_enroll_init(&app);
  uv_timer_init(&loop, &app.lag_timer);
  app.lag_timer.data = &app;
  /* Log and audit lines of one loop iteration wake their writers once,
   * before the loop blocks (zm/logq.h). */
  uv_prepare_init(&loop, &app.log_prep);
  uv_prepare_start(&app.log_prep, on_log_prepare);
  uv_unref((uv_handle_t *)&app.log_prep);
  uv_prepare_init(&loop, &app.busy_prep);
  app.busy_prep.data = &app;
  if (getenv("LOOP_LAG_PROBE") != NULL) {
    uv_update_time(&loop); /* the cached time predates the store load */
    app.lag_expected = uv_now(&loop) + ZM_LAG_PERIOD_MS;
    uv_timer_start(&app.lag_timer, on_lag, ZM_LAG_PERIOD_MS, ZM_LAG_PERIOD_MS);
    uv_unref((uv_handle_t *)&app.lag_timer);
    uv_prepare_start(&app.busy_prep, on_busy_prepare);
    uv_unref((uv_handle_t *)&app.busy_prep);
  }

  zm_life_config_t lifec = {.lease_ttl_ms = cfg->lease_ttl_ms,
                            .flush_ms = cfg->lease_flush_ms,
                            .ziti_timeout_ms = cfg->ziti_timeout_ms};
  app.life = zm_life_new(&loop, app.store, app.index, app.ziti, &lifec);
  if (app.ziti != NULL) {
    zm_sweep_config_t sw = {.interval_ms = cfg->gc_interval_ms,
                            .concurrency = cfg->gc_concurrency,
                            .ziti_timeout_ms = cfg->ziti_timeout_ms};
    app.collect = zm_collect_new(&loop, app.store, app.life, &sw);
    app.recover = zm_recover_new(&loop, app.store, app.life, app.ziti, &sw);
  }
  ZM_INFO("listening on %s (port %d); serving after the first heartbeat",
          cfg->grpc_address, zm_grpc_server_port(app.grpc));
  zm_life_start(app.life, on_ready, &app);

  zm_logq_defer_here(1);
  uv_run(&loop, UV_RUN_DEFAULT);
  zm_logq_defer_here(0);
  zm_log_kick();
  zm_audit_kick();

  if (app.collect != NULL) {
    zm_collect_free(app.collect);
    zm_recover_free(app.recover);
  }
  zm_life_free(app.life);
  zm_grpc_server_free(app.grpc);
  zm_index_free(app.index);
  if (app.metrics != NULL)
    zm_metrics_srv_free(app.metrics);
  zm_reflect_free(app.reflect);
  zm_health_dispose(&app.health);
  rv = uv_loop_close(&loop);
  if (rv != 0)
    ZM_WARN("loop closed with handles open: %s", uv_strerror(rv));
  return app.exit_code;
}

void zm_test_crash_point(const char *state) {
#ifdef ZM_TEST_HOOKS
  static const char *target;
  static int checked;
  if (!checked) {
    checked = 1;
    target = getenv("ZM_TEST_CRASH_AT");
  }
  if (target != NULL && strcmp(target, state) == 0) {
    ZM_WARN("test hook: crashing at %s", state);
    zm_log_stop_async(); /* the line above must reach the log first */
    _exit(137);
  }
#else
  (void)state;
#endif
}
