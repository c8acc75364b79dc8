/*
 * observe.c - what the metrics listener shows: every module's counters read
 * at scrape time (nothing on the hot path but the increments the modules do
 * anyway), and the readiness rule of /readyz.
 */
#include "zm/app.h"
#include "zm/enroll.h"
#include "zm/metrics.h"
#include "zm/stat.h"

#include <stdio.h>
#include <string.h>

#ifndef ZM_VERSION
#define ZM_VERSION "unknown"
#endif
#ifndef ZM_GIT_COMMIT
#define ZM_GIT_COMMIT "unknown"
#endif

static void counter(zm_prom_t *p, const char *name, const char *help,
                    uint64_t v) {
  zm_prom_family(p, name, "counter", help);
  zm_prom_sample_u64(p, name, NULL, 0, v);
}

/* A counter of TLS handshake steps by where they ran. */
static void hs_steps(zm_prom_t *p, const char *name, const char *help,
                     uint64_t workers, uint64_t loop) {
  zm_prom_family(p, name, "counter", help);
  const char *where[] = {"where", "workers"};
  zm_prom_sample_u64(p, name, where, 1, workers);
  where[1] = "loop";
  zm_prom_sample_u64(p, name, where, 1, loop);
}

static void gauge(zm_prom_t *p, const char *name, const char *help, double v) {
  zm_prom_family(p, name, "gauge", help);
  zm_prom_sample(p, name, NULL, 0, v);
}

/* "/pkg.Svc/Method" -> service, method (into the buffers). */
static void split_path(const char *path, char *svc, size_t scap, char *m,
                       size_t mcap) {
  const char *slash = strrchr(path, '/');
  size_t sl = slash && slash > path ? (size_t)(slash - path - 1) : 0;
  snprintf(svc, scap, "%.*s", (int)sl, path + 1);
  snprintf(m, mcap, "%s", slash ? slash + 1 : path);
}

static void render_grpc(zm_prom_t *p, const zm_app_t *app) {
  zm_grpc_server_t *g = app->grpc;
  size_t n = zm_grpc_server_method_count(g);
  char svc[128], m[64];
  zm_prom_family(p, "grpc_server_handled_total", "counter",
                 "gRPC calls finished, by method and status code");
  for (size_t i = 0; i <= n; i++) {
    const zm_grpc_method_stats_t *st = zm_grpc_server_method_stats(g, i);
    const char *path = zm_grpc_server_method_path(g, i);
    if (path)
      split_path(path, svc, sizeof svc, m, sizeof m);
    else
      snprintf(svc, sizeof svc, "unknown"), snprintf(m, sizeof m, "unknown");
    for (int c = 0; c <= 16; c++) {
      if (st->by_status[c] == 0 && !(c == 0 && path != NULL))
        continue;
      const char *l[] = {"grpc_service", svc,
                         "grpc_method",  m,
                         "grpc_code",    zm_grpc_code_name(c)};
      zm_prom_sample_u64(p, "grpc_server_handled_total", l, 3,
                         st->by_status[c]);
    }
  }
  zm_prom_family(p, "grpc_server_handling_seconds", "histogram",
                 "gRPC call latency, request headers to status");
  for (size_t i = 0; i <= n; i++) {
    const zm_grpc_method_stats_t *st = zm_grpc_server_method_stats(g, i);
    const char *path = zm_grpc_server_method_path(g, i);
    if (path == NULL)
      continue;
    split_path(path, svc, sizeof svc, m, sizeof m);
    const char *l[] = {"grpc_service", svc, "grpc_method", m};
    zm_prom_histogram(p, "grpc_server_handling_seconds", l, 2,
                      zm_grpc_latency_bounds_s, ZM_GRPC_LAT_BUCKETS,
                      st->lat_counts, (double)st->lat_sum_ns / 1e9);
  }
  zm_prom_family(p, "grpc_server_inflight_calls", "gauge",
                 "gRPC calls being handled now, by method");
  for (size_t i = 0; i < n; i++) {
    const zm_grpc_method_stats_t *st = zm_grpc_server_method_stats(g, i);
    split_path(zm_grpc_server_method_path(g, i), svc, sizeof svc, m, sizeof m);
    const char *l[] = {"grpc_service", svc, "grpc_method", m};
    zm_prom_sample_u64(p, "grpc_server_inflight_calls", l, 2, st->inflight);
  }
  zm_grpc_stats_t gs;
  zm_grpc_server_get_stats(g, &gs);
  gauge(p, "zm_grpc_connections_open", "HTTP/2 connections open",
        (double)gs.conns_open);
  counter(p, "zm_grpc_connections_accepted_total",
          "HTTP/2 connections accepted", gs.conns_accepted);
  counter(p, "zm_grpc_protocol_errors_total", "HTTP/2 connection errors",
          gs.protocol_errors);
  counter(p, "zm_grpc_tls_failures_total",
          "TLS handshakes or records that failed (the connection closed)",
          gs.tls_failures);
  hs_steps(p, "zm_grpc_tls_handshake_steps_total",
           "steps of the listener's TLS handshakes by where they ran: the "
           "crypto threads, or the loop (none free for them)",
           gs.tls_handshake_steps_offloaded, gs.tls_handshake_steps_inline);
  gauge(p, "zm_loop_busy_poll_window_seconds",
        "busy-polling window in effect (LOOP_BUSY_POLL_US; 0 = off)",
        (double)app->busy_poll_us / 1e6);
  counter(p, "zm_loop_busy_polls_total",
          "busy-polling windows opened (LOOP_BUSY_POLL_US)", gs.busy_polls);
  counter(p, "zm_loop_busy_poll_hits_total",
          "socket reads that arrived while the loop busy-polled",
          gs.busy_poll_hits);
  gauge(p, "zm_health_watchers", "open grpc.health.v1.Health/Watch streams",
        (double)app->health.n_watches);
}

static void render_enroll(zm_prom_t *p, const zm_app_t *app) {
  const zm_app_stats_t *s = &app->stats;
  counter(p, "zm_enrollments_started_total",
          "enrollment sagas started (service and agent identities)",
          s->enroll_started);
  zm_prom_family(p, "zm_enrollments_total", "counter",
                 "enrollment sagas finished, by outcome");
  const struct {
    const char *o;
    uint64_t v;
  } outs[] = {{"ok", s->enroll_ok},
              {"failed", s->enroll_failed},
              {"compensated", s->enroll_compensated},
              {"compensate_failed", s->enroll_compensate_failed}};
  for (size_t i = 0; i < ZM_ARRAY_SIZE(outs); i++) {
    const char *l[] = {"outcome", outs[i].o};
    zm_prom_sample_u64(p, "zm_enrollments_total", l, 1, outs[i].v);
  }
  zm_prom_family(p, "zm_enrollments_in_state", "gauge",
                 "enrollment sagas now in each state");
  for (int st = 0; st < ZM_ENROLL__COUNT && st < 16; st++) {
    if (st == ZM_ENROLL_DONE)
      continue;
    const char *l[] = {"state", zm_enroll_state_name((zm_enroll_state_t)st)};
    zm_prom_sample_u64(p, "zm_enrollments_in_state", l, 1, s->enroll_gauge[st]);
  }
  const struct {
    const char *step;
    uint64_t n, ns;
  } steps[] = {{"verify_jwt", s->verify_steps, s->verify_cpu_ns},
               {"keygen_csr", s->keygen_steps, s->keygen_cpu_ns}};
  zm_prom_family(p, "zm_enroll_crypto_steps_total", "counter",
                 "enrollment steps run on the crypto threads, by step");
  for (size_t i = 0; i < ZM_ARRAY_SIZE(steps); i++) {
    const char *l[] = {"step", steps[i].step};
    zm_prom_sample_u64(p, "zm_enroll_crypto_steps_total", l, 1, steps[i].n);
  }
  zm_prom_family(p, "zm_enroll_crypto_cpu_seconds_total", "counter",
                 "CPU time those steps took on their threads, by step");
  for (size_t i = 0; i < ZM_ARRAY_SIZE(steps); i++) {
    const char *l[] = {"step", steps[i].step};
    zm_prom_sample(p, "zm_enroll_crypto_cpu_seconds_total", l, 1,
                   (double)steps[i].ns / 1e9);
  }
}

static void render_ziti(zm_prom_t *p, const zm_app_t *app) {
  gauge(p, "zm_controller_configured", "1 when ZITI_CONTROLLER_URL is set",
        app->ziti != NULL);
  if (app->ziti == NULL)
    return;
  zm_ziti_stats_t zs;
  zm_ziti_get_stats(app->ziti, &zs);
  gauge(p, "zm_controller_up",
        "1 when the latest controller exchange got an HTTP answer",
        zs.reachable == 1);
  counter(p, "zm_controller_connects_total",
          "controller connections opened (TCP + TLS handshake); the rest of "
          "the requests reused a kept-alive one",
          zs.connects);
  counter(p, "zm_controller_tls_resumed_total",
          "controller connections whose TLS handshake resumed an earlier "
          "session (no certificate chain to verify)",
          zs.resumed);
  hs_steps(p, "zm_controller_tls_handshake_steps_total",
           "steps of controller TLS handshakes (each may hold a public-key "
           "operation) by where they ran: the crypto threads, or the loop "
           "when those refused the job",
           zs.handshake_steps_offloaded, zs.handshake_steps_inline);
  zm_prom_family(p, "zm_controller_requests_total", "counter",
                 "controller HTTP exchanges by endpoint and HTTP status "
                 "(code=\"error\": no response)");
  char code[8];
  for (int e = 0; e < ZM_ZITI_EP__COUNT; e++) {
    const zm_ziti_ep_stats_t *st = zm_ziti_endpoint_stats(app->ziti, e);
    for (int c = 0; c < 600; c++) {
      if (st->by_status[c] == 0)
        continue;
      if (c == 0)
        snprintf(code, sizeof code, "error");
      else
        snprintf(code, sizeof code, "%d", c);
      const char *l[] = {"endpoint", zm_ziti_endpoint_name(e), "code", code};
      zm_prom_sample_u64(p, "zm_controller_requests_total", l, 2,
                         st->by_status[c]);
    }
  }
  zm_prom_family(p, "zm_controller_request_duration_seconds", "histogram",
                 "controller HTTP exchange latency by endpoint");
  for (int e = 0; e < ZM_ZITI_EP__COUNT; e++) {
    const zm_ziti_ep_stats_t *st = zm_ziti_endpoint_stats(app->ziti, e);
    const char *l[] = {"endpoint", zm_ziti_endpoint_name(e)};
    zm_prom_histogram(p, "zm_controller_request_duration_seconds", l, 1,
                      zm_ziti_latency_bounds_s, ZM_ZITI_LAT_BUCKETS,
                      st->lat_counts, (double)st->lat_sum_ns / 1e9);
  }
  counter(p, "zm_controller_retries_total",
          "controller requests retried on a fresh connection", zs.retries);
  counter(p, "zm_controller_reauthentications_total",
          "controller sessions re-established after a 401", zs.reauths);
  gauge(p, "zm_controller_connections_open",
        "keep-alive connections to the controller", zs.open_conns);
  gauge(p, "zm_controller_queued_requests",
        "controller requests waiting for a connection", zs.queued);
}

static void render_lease(zm_prom_t *p, const zm_app_t *app) {
  const zm_life_stats_t *l = zm_life_stats(app->life);
  zm_prom_family(p, "zm_lease_extensions_total", "counter",
                 "ExtendIdentityLease refreshes by path");
  const char *fast[] = {"path", "memory"}, *dur[] = {"path", "durable"};
  zm_prom_sample_u64(p, "zm_lease_extensions_total", fast, 1, l->extend_fast);
  zm_prom_sample_u64(p, "zm_lease_extensions_total", dur, 1, l->extend_durable);
  counter(p, "zm_lease_flushes_total", "batched lease refresh writes",
          l->flushes);
  counter(p, "zm_lease_flush_failures_total", "failed lease refresh writes",
          l->flush_failures);
  counter(p, "zm_identity_deletes_total",
          "controller deletes finished (2xx or 404)", l->deleted);
  counter(p, "zm_identity_deletes_deferred_total",
          "controller deletes deferred for a retry", l->delete_deferred);
  counter(p, "zm_store_heartbeats_total", "store heartbeats committed",
          l->beats);
  counter(p, "zm_store_heartbeat_failures_total", "store heartbeats failed",
          l->beat_failures);
  counter(p, "zm_outages_detected_total",
          "times no process was up (the outage rule)", l->outages_detected);
  if (app->collect != NULL) {
    const zm_collect_stats_t *c = zm_collect_stats(app->collect);
    const zm_recover_stats_t *r = zm_recover_stats(app->recover);
    counter(p, "zm_gc_sweeps_total", "lease collection sweeps", c->sweeps);
    counter(p, "zm_lease_expiries_total",
            "expired leases collected (identity deleted)", c->collected);
    counter(p, "zm_gc_failed_total",
            "expired leases whose delete failed (retried later)", c->failed);
    counter(p, "zm_gc_skipped_outage_total",
            "sweeps skipped by the outage rule", c->skipped_outage);
    counter(p, "zm_recovery_sweeps_total", "recovery sweeps", r->sweeps);
    counter(p, "zm_recovered_pending_total",
            "pending creations resolved by recovery", r->pending_resolved);
    counter(p, "zm_recovery_failed_total",
            "pending creations recovery could not resolve yet",
            r->pending_failed);
    counter(p, "zm_recovered_tombstones_total",
            "deferred deletes retried by recovery", r->tombs_retried);
  }
  gauge(p, "zm_managed_identities", "managed identities in memory",
        (double)zm_index_managed_count(app->index));
  gauge(p, "zm_service_identities", "service identity leases in memory",
        (double)zm_index_service_count(app->index));
}

static void render_store(zm_prom_t *p, const zm_app_t *app) {
  if (app->store != NULL) {
    zm_store_stats_t ss;
    zm_store_get_stats(app->store, &ss);
    counter(p, "zm_store_units_total", "store write units committed", ss.units);
    counter(p, "zm_store_commits_total", "store group commits", ss.groups);
    counter(p, "zm_store_failed_commits_total", "store group commits failed",
            ss.failed_groups);
    gauge(p, "zm_store_queued_units", "units waiting for the next group",
          (double)ss.queued);
    counter(p, "zm_store_reconnects_total",
            "PostgreSQL connections re-established", ss.reconnects);
  }
  zm_stat_store_t st;
  zm_stat_store_read(&st);
  zm_prom_family(p, "zm_store_commit_seconds", "histogram",
                 "store group commit latency (writes, durable)");
  zm_prom_histogram(p, "zm_store_commit_seconds", NULL, 0,
                    zm_stat_store_lat_bounds_s, ZM_STAT_LAT_BUCKETS, st.lat,
                    (double)st.lat_sum_ns / 1e9);
  zm_prom_family(p, "zm_store_commit_units", "histogram",
                 "write units per group commit");
  zm_prom_histogram(p, "zm_store_commit_units", NULL, 0,
                    zm_stat_store_batch_bounds, ZM_STAT_BATCH_BUCKETS, st.batch,
                    (double)st.units_sum);
}

void zm_app_render_metrics(zm_prom_t *p, void *data) {
  zm_app_t *app = data;
  zm_prom_family(p, "zm_build_info", "gauge", "build information (value 1)");
  const char *bl[] = {"version", ZM_VERSION, "commit", ZM_GIT_COMMIT};
  zm_prom_sample(p, "zm_build_info", bl, 2, 1);
  gauge(p, "zm_start_time_seconds", "process start, Unix time",
        (double)app->start_wall_ms / 1e3);
  gauge(p, "zm_ready", "1 when /readyz answers ready",
        zm_app_ready(app, NULL, 0));
  gauge(p, "zm_draining", "1 while draining after SIGTERM/SIGINT",
        app->shutting_down);
  if (app->grpc != NULL)
    render_grpc(p, app);
  render_enroll(p, app);
  render_ziti(p, app);
  if (app->life != NULL)
    render_lease(p, app);
  render_store(p, app);
  if (app->metrics != NULL) {
    zm_metrics_srv_stats_t ms;
    zm_metrics_srv_get_stats(app->metrics, &ms);
    counter(p, "zm_metrics_scrapes_total", "scrapes of /metrics",
            ms.scrapes + 1);
    counter(p, "zm_metrics_rejected_connections_total",
            "metrics connections refused over the limit", ms.rejected_conns);
  }
  gauge(p, "zm_loop_lag_worst_seconds",
        "worst event-loop lateness seen (LOOP_LAG_PROBE only)",
        (double)app->stats.lag_worst_ms / 1e3);
  gauge(p, "zm_loop_busy_worst_seconds",
        "most CPU time one event-loop iteration took (LOOP_LAG_PROBE only)",
        (double)app->stats.busy_worst_us / 1e6);
}

int zm_app_ready(void *data, char *why, size_t cap) {
  zm_app_t *app = data;
  const char *r = NULL;
  if (app->shutting_down)
    r = "draining";
  else if (app->store == NULL)
    r = "store closed";
  else if (!app->serving)
    r = "starting";
  else if (!zm_life_settled(app->life, 0))
    r = "store heartbeat not fresh";
  else if (app->ziti != NULL) {
    zm_ziti_stats_t zs;
    zm_ziti_get_stats(app->ziti, &zs);
    if (zs.reachable == 0)
      r = "controller unreachable";
    else if (zs.reachable < 0)
      r = "controller not contacted yet";
  }
  if (r != NULL && why != NULL && cap > 0)
    snprintf(why, cap, "%s", r);
  return r == NULL;
}
