/*
 * server.c - the gRPC server: listener and wiring, periodic
 * housekeeping (handshake/write-stall/idle reaping), drain and shutdown,
 * stats and settings. See server_int.h for how the other files split the
 * work and who owns what.
 */
#include "server_int.h"

#include "zm/addr.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void on_tick(uv_timer_t *t) {
  zm_grpc_server_t *srv = t->data;
  uint64_t now = uv_now(srv->loop);
  uint64_t trim_until = uv_hrtime() + ZM_CONN_TRIM_TICK_NS;
  int trimming = 1;
  if (srv->limiter != NULL)
    zm_limiter_sweep(srv->limiter, now);
  for (zm_conn_t *c = srv->conns, *n; c != NULL; c = n) {
    n = c->next;
    if (conn_hs_running(c)) {
      conn_hs_check(c, now);
      if (c->state != CONN_OPEN)
        continue;
    }
    if (!c->got_frame && now - c->last_active >= ZM_HANDSHAKE_TIMEOUT_MS) {
      conn_close(c);
    } else if (c->writing && srv->cfg.write_stall_ms > 0 &&
               now - c->write_started >= srv->cfg.write_stall_ms) {
      /* the peer stopped reading: its output and streams go */
      srv->stats.write_stalls++;
      zm_audit("write_stall", "peer", c->peer, NULL);
      ZM_INFO("grpc: %s did not read for %llu ms: closed", c->peer,
              (unsigned long long)(now - c->write_started));
      conn_close(c);
    } else if (srv->cfg.idle_timeout_ms > 0 && c->n_calls == 0 &&
               !c->goaway_sent &&
               now - c->last_active >= srv->cfg.idle_timeout_ms) {
      /* idle: say goodbye; flush closes it once the GOAWAY is out */
      nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE,
                            nghttp2_session_get_last_proc_stream_id(c->h2),
                            NGHTTP2_NO_ERROR, (const uint8_t *)"idle", 4);
      c->goaway_sent = 1;
      c->close_after_flush = 1;
      conn_mark_dirty(c);
    } else if (trimming && conn_trim_idle(c, now)) {
      trimming = uv_hrtime() < trim_until;
    }
  }
}

/* ===================== busy polling ===================================== */

/* LOOP_BUSY_POLL_US. Between two calls of a client that waits for each
 * answer, the loop sleeps in epoll_wait and the next request must wake it:
 * on a VM that wake-up is most of a 1x1 round trip. Polling with a zero
 * timeout (an active idle handle) for a short window after the loop's last
 * output catches the next request without it. It adapts: each gap from the
 * loop's last output to the next input is scored, whether or not the loop
 * spun: +1 within the window; beyond it the score drops to -2 (or lower
 * after more long gaps). The window opens only while the score is positive,
 * i.e. after at least three short gaps in a row, so sparse traffic does not
 * spin (a call whose exchange takes up to three reads never gets there),
 * and the loop never spins while the veto says other threads of the process
 * (crypto workers, which yield the core to the loop) have work. */
#define SPIN_SCORE_MAX 16

static int spin_vetoed(const zm_grpc_server_t *srv) {
  return srv->cfg.busy_poll_veto != NULL &&
         srv->cfg.busy_poll_veto(srv->cfg.busy_poll_ctx);
}

static void spin_stop(zm_grpc_server_t *srv) {
  if (srv->spinning) {
    uv_idle_stop(&srv->spin);
    srv->spinning = 0;
  }
}

static void on_spin(uv_idle_t *h) {
  zm_grpc_server_t *srv = h->data;
  if (uv_hrtime() >= srv->spin_until_ns || spin_vetoed(srv))
    spin_stop(srv);
}

void busy_note_read(zm_grpc_server_t *srv) {
  if (srv->cfg.busy_poll_us == 0)
    return;
  uint64_t window = (uint64_t)srv->cfg.busy_poll_us * 1000;
  if (srv->read_since_flush)
    return; /* the same batch of input */
  srv->read_since_flush = 1;
  if (srv->spinning)
    srv->stats.busy_poll_hits++;
  int near =
      srv->work_done_ns != 0 && uv_hrtime() - srv->work_done_ns <= window;
  if (near) {
    if (srv->spin_score < SPIN_SCORE_MAX)
      srv->spin_score++;
  } else {
    srv->spin_score = (srv->spin_score > 0 ? 0 : srv->spin_score) - 2;
    if (srv->spin_score < -SPIN_SCORE_MAX)
      srv->spin_score = -SPIN_SCORE_MAX;
  }
}

void busy_after_flush(zm_grpc_server_t *srv) {
  if (srv->cfg.busy_poll_us == 0 || srv->draining)
    return;
  uint64_t now = uv_hrtime();
  srv->work_done_ns = now;
  srv->read_since_flush = 0;
  if (srv->spin_score <= 0 || spin_vetoed(srv))
    return;
  srv->spin_until_ns = now + (uint64_t)srv->cfg.busy_poll_us * 1000;
  if (!srv->spinning) {
    uv_idle_start(&srv->spin, on_spin);
    srv->spinning = 1;
    srv->stats.busy_polls++;
  }
}

/* ===================== server =========================================== */

int zm_grpc_server_new(zm_grpc_server_t **out, uv_loop_t *loop,
                       const zm_grpc_config_t *cfg,
                       const zm_grpc_method_t *methods, size_t n_methods) {
  zm_grpc_server_t *srv = zm_xcalloc(1, sizeof *srv);
  srv->loop = loop;
  srv->cfg = *cfg;
  if (srv->cfg.max_recv_msg == 0)
    srv->cfg.max_recv_msg = 4u << 20;
  if (srv->cfg.max_streams == 0)
    srv->cfg.max_streams = 1024;
  if (srv->cfg.max_conns == 0)
    srv->cfg.max_conns = 65536;
  if (srv->cfg.max_buffered == 0)
    srv->cfg.max_buffered = 256u << 20;
  if (srv->cfg.tls_handshake_wait_ms == 0)
    srv->cfg.tls_handshake_wait_ms = 1000;
  if (srv->cfg.caller_rate > 0 || srv->cfg.caller_inflight > 0) {
    srv->limiter = zm_limiter_new(srv->cfg.caller_rate, srv->cfg.caller_burst,
                                  srv->cfg.caller_inflight);
    ZM_ASSERT(srv->limiter != NULL);
  }
  srv->address = zm_xstrdup(cfg->address ? cfg->address : ":50051");
  srv->cfg.address = srv->address;
  srv->methods = zm_xcalloc(n_methods, sizeof *methods);
  srv->path_lens = zm_xcalloc(n_methods, sizeof *srv->path_lens);
  memcpy(srv->methods, methods, n_methods * sizeof *methods);
  for (size_t i = 0; i < n_methods; i++)
    srv->path_lens[i] = strlen(methods[i].path);
  srv->n_methods = n_methods;
  srv->mstats = zm_xcalloc(n_methods + 1, sizeof *srv->mstats);
  if (nghttp2_session_callbacks_new(&srv->cbs) != 0 ||
      nghttp2_option_new(&srv->opt) != 0)
    abort();
  session_callbacks_init(srv->cbs);
  nghttp2_option_set_max_deflate_dynamic_table_size(srv->opt, 4096);
  /* A closed stream is forgotten at once: kept (for RFC 7540 priorities,
   * which gRPC clients do not use) it would hold a stream and a bucket of
   * the stream map per connection. A HEADERS frame reusing its id is then
   * an unknown lower id, a connection error either way (session.c). */
  nghttp2_option_set_no_closed_streams(srv->opt, 1);
  uv_prepare_init(loop, &srv->flush);
  srv->flush.data = srv;
  uv_prepare_start(&srv->flush, conn_on_flush);
  uv_unref((uv_handle_t *)&srv->flush);
  uv_idle_init(loop, &srv->spin);
  srv->spin.data = srv;
  uv_unref((uv_handle_t *)&srv->spin);
  uv_timer_init(loop, &srv->tick);
  srv->tick.data = srv;
  uv_timer_start(&srv->tick, on_tick, 1000, 1000);
  uv_unref((uv_handle_t *)&srv->tick);
  uv_timer_init(loop, &srv->deadline_timer);
  srv->deadline_timer.data = srv;
  uv_timer_init(loop, &srv->grace_timer);
  srv->grace_timer.data = srv;
  srv->open_handles = 5;
  *out = srv;
  return 0;
}

int zm_grpc_server_listen(zm_grpc_server_t *srv) {
  struct sockaddr_storage ss;
  if (zm_addr_parse(srv->address, &ss) != 0)
    return ZM_E_INVAL;
  uv_tcp_init(srv->loop, &srv->listener);
  srv->listener.data = srv;
  srv->open_handles++;
  srv->listening = 1;
  int rv = uv_tcp_bind(&srv->listener, (struct sockaddr *)&ss, 0);
  if (rv == 0)
    rv = uv_listen((uv_stream_t *)&srv->listener, 4096, conn_on_connection);
  if (rv != 0)
    return rv;
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &len);
  srv->port = ntohs(bound.ss_family == AF_INET6
                        ? ((struct sockaddr_in6 *)&bound)->sin6_port
                        : ((struct sockaddr_in *)&bound)->sin_port);
  return 0;
}

int zm_grpc_server_port(const zm_grpc_server_t *srv) { return srv->port; }

static void on_handle_closed(uv_handle_t *h) {
  zm_grpc_server_t *srv = h->data;
  srv->open_handles--;
  drain_check(srv);
}

/* Drain finishes when no connection is left; then our own handles close. */
void drain_check(zm_grpc_server_t *srv) {
  if (!srv->draining)
    return;
  if (srv->conns == NULL && srv->stats.calls_active == 0 &&
      srv->draining == 1) {
    srv->draining = 2;
    uv_close((uv_handle_t *)&srv->flush, on_handle_closed);
    spin_stop(srv);
    uv_close((uv_handle_t *)&srv->spin, on_handle_closed);
    uv_close((uv_handle_t *)&srv->tick, on_handle_closed);
    uv_close((uv_handle_t *)&srv->deadline_timer, on_handle_closed);
    uv_close((uv_handle_t *)&srv->grace_timer, on_handle_closed);
    return;
  }
  if (srv->draining == 2 && srv->open_handles == 0 && srv->drain_done) {
    void (*done)(void *) = srv->drain_done;
    srv->drain_done = NULL;
    done(srv->drain_data);
  }
}

static void on_grace(uv_timer_t *t) {
  zm_grpc_server_t *srv = t->data;
  ZM_WARN("grpc: grace period over, closing %s",
          srv->conns ? "remaining connections" : "");
  while (srv->conns != NULL)
    conn_close(srv->conns);
}

void zm_grpc_server_drain(zm_grpc_server_t *srv, uint64_t grace_ms,
                          void (*done)(void *), void *data) {
  if (srv->draining)
    return;
  srv->draining = 1;
  srv->drain_done = done;
  srv->drain_data = data;
  if (srv->listening) {
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->listener, on_handle_closed);
  }
  for (zm_conn_t *c = srv->conns; c != NULL; c = c->next) {
    nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE,
                          nghttp2_session_get_last_proc_stream_id(c->h2),
                          NGHTTP2_NO_ERROR, NULL, 0);
    c->goaway_sent = 1;
    conn_mark_dirty(c);
  }
  uv_timer_start(&srv->grace_timer, on_grace, grace_ms, 0);
  /* keep the loop alive for the flush hook while draining */
  uv_ref((uv_handle_t *)&srv->flush);
  drain_check(srv);
}

void zm_grpc_server_free(zm_grpc_server_t *srv) {
  while (srv->freelist) {
    zm_call_t *c = srv->freelist;
    srv->freelist = c->next;
    free(c);
  }
  nghttp2_session_callbacks_del(srv->cbs);
  nghttp2_option_del(srv->opt);
  zm_tls_srv_ctx_unref(srv->tls_ctx);
  zm_authz_free(srv->authz);
  zm_limiter_free(srv->limiter);
  free(srv->heap);
  free(srv->mstats);
  free(srv->methods);
  free(srv->path_lens);
  free(srv->address);
  free(srv);
}

void zm_grpc_server_get_stats(const zm_grpc_server_t *srv,
                              zm_grpc_stats_t *out) {
  *out = srv->stats;
}

size_t zm_grpc_server_method_count(const zm_grpc_server_t *srv) {
  return srv->n_methods;
}

const char *zm_grpc_server_method_path(const zm_grpc_server_t *srv, size_t i) {
  return i < srv->n_methods ? srv->methods[i].path : NULL;
}

const zm_grpc_method_stats_t *
zm_grpc_server_method_stats(const zm_grpc_server_t *srv, size_t i) {
  return &srv->mstats[i];
}

int zm_grpc_server_draining(const zm_grpc_server_t *srv) {
  return srv->draining != 0;
}

int zm_grpc_server_set_tls(zm_grpc_server_t *srv, const char *cert_file,
                           const char *key_file, const char *client_ca,
                           char *err, size_t errlen) {
  zm_tls_srv_ctx_t *ctx;
  int rv =
      zm_tls_srv_ctx_new(&ctx, cert_file, key_file, client_ca, err, errlen);
  if (rv != 0)
    return rv;
  /* connections hold their own references */
  zm_tls_srv_ctx_unref(srv->tls_ctx);
  srv->tls_ctx = ctx;
  return 0;
}

int zm_grpc_server_tls_enabled(const zm_grpc_server_t *srv) {
  return srv->tls_ctx != NULL;
}

void zm_grpc_server_set_authz(zm_grpc_server_t *srv, zm_authz_t *authz) {
  zm_authz_free(srv->authz);
  srv->authz = authz;
}

size_t zm_grpc_server_methods(const zm_grpc_server_t *srv, const char **paths,
                              size_t max) {
  size_t n = 0;
  for (size_t i = 0; i < srv->n_methods && n < max; i++)
    paths[n++] = srv->methods[i].path;
  return n;
}
