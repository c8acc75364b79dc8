/*
 * client.c - the controller client object and its HTTPS/1.1 connection pool:
 * uv_tcp + wolfSSL (tls.c) + the response parser (http1.c), a bounded number
 * of keep-alive connections, a bounded FIFO of exchanges waiting for one,
 * and three timeouts (connect+handshake, first response byte, the
 * exchange's deadline) plus the idle keep-alive close.
 *
 * A connection moves CONNECTING -> TLS_HANDSHAKE -> IDLE <-> BUSY, and to
 * CLOSING from any state, only through conn_set_state(). Handles are closed
 * with uv_close and the connection is freed in the last close callback.
 * Exchange callbacks run from loop callbacks only, as the last thing the
 * pool does with a connection in that turn, because they may start new
 * exchanges on the very same connection.
 */
#include "ziti_int.h"

#include "zm/log.h"
#include "zm/workers.h"
#include "zm/zm.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Above the controller's 10 s handler timeout (it answers 503 TIMEOUT then):
 * a connection silent for longer than this after a request is dead. */
#define FIRST_BYTE_TIMEOUT_MS 12000u
/* Plaintext read chunk; also the socket read buffer per connection. */
#define READ_CHUNK 16384u

/* Address-stable reasons, logged and returned as they are. */
static const char err_queue_full[] = "request queue is full";
static const char err_shutdown[] = "the controller client is closing";
static const char err_deadline[] = "deadline exceeded";
static const char err_first_byte[] = "no response from the controller in time";
static const char err_queue_timeout[] = "timed out waiting for a connection";
static const char err_connect_timeout[] = "connect/TLS handshake timed out";
static const char err_closed_before[] = "connection closed before the response";
static const char err_closed_mid[] =
    "connection closed in the middle of the response";
static const char err_tls_io[] = "TLS error on the connection";
static const char err_bad_response[] = "malformed HTTP response";
static const char err_big_response[] = "HTTP response exceeds limits";
static const char err_resolve[] = "cannot resolve the controller host";
static const char err_connect[] = "cannot connect to the controller";
static const char err_write[] = "write to the controller failed";

/* ---- connections ------------------------------------------------------------
 */

#define CONN_STATES(X) X(CONNECTING) X(TLS_HANDSHAKE) X(IDLE) X(BUSY) X(CLOSING)

typedef enum {
#define X(s) CONN_##s,
  CONN_STATES(X)
#undef X
} conn_state_t;

static const char *const CONN_STATE_NAME[] = {
#define X(s) [CONN_##s] = #s,
    CONN_STATES(X)
#undef X
};

/* Allowed edges: [from] is a bit set of the states it may move to. */
static const unsigned CONN_EDGES[] = {
    [CONN_CONNECTING] = 1u << CONN_TLS_HANDSHAKE | 1u << CONN_CLOSING,
    [CONN_TLS_HANDSHAKE] = 1u << CONN_IDLE | 1u << CONN_CLOSING,
    [CONN_IDLE] = 1u << CONN_BUSY | 1u << CONN_CLOSING,
    [CONN_BUSY] = 1u << CONN_IDLE | 1u << CONN_CLOSING,
    [CONN_CLOSING] = 0,
};

struct zm__ziti_conn {
  zm_ziti_t *z;
  conn_state_t state;
  unsigned id;
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_connect_t creq;
  zm__resolve_req_t gai; /* on the resolver's threads, not libuv's pool */
  uv_write_t wreq;
  char *wbuf; /* in flight, owned */
  int resolving;
  int pending; /* handles/requests that must call back before the free */
  zm_tls_t tls;
  /* A handshake step on the workers owns tls until hs_done: the loop then
   * neither reads from the socket nor writes. */
  zm_work_t hs_work;
  int hs_running, hs_rc;
  uint64_t connect_deadline; /* uv_now() ms: connect + handshake */
  const char *hs_why;
  zm__ziti_xchg_t *x; /* the exchange in flight (BUSY) */
  unsigned served;    /* responses completed on this connection */
  unsigned ctx_gen;   /* z->ctx_gen when it was opened */
  int got_byte;       /* a byte of the current response arrived */
  zm__ziti_link_t link;
  char rbuf[READ_CHUNK];
};

static void conn_close(zm__ziti_conn_t *c);
static void conn_flush(zm__ziti_conn_t *c);
static void dispatch(zm_ziti_t *z);
static void on_idle(uv_idle_t *h);

static void conn_set_state(zm__ziti_conn_t *c, conn_state_t next) {
  zm_ziti_t *z = c->z;
  ZM_ASSERT(CONN_EDGES[c->state] & (1u << next));
  ZM_DEBUG("ziti conn %u: %s -> %s", c->id, CONN_STATE_NAME[c->state],
           CONN_STATE_NAME[next]);
  if (c->state == CONN_BUSY)
    z->n_busy--;
  if (c->state == CONN_CONNECTING || c->state == CONN_TLS_HANDSHAKE)
    if (next != CONN_TLS_HANDSHAKE)
      z->n_connecting--;
  if (next == CONN_BUSY)
    z->n_busy++;
  if (next == CONN_CLOSING)
    z->n_open--;
  c->state = next;
}

static void xchg_done(zm__ziti_xchg_t *x, int err, const char *why) {
  zm__ziti_observe(x->z, x, err == 0 ? x->resp.status : ZM_ZITI_XCHG_ERROR);
  if (err == 0)
    x->z->stats.reachable = 1;
  else if (err != ZM_E_SHUTDOWN && why != err_queue_full)
    x->z->stats.reachable = 0; /* no answer: connect, TLS, timeout, reset */
  x->conn = NULL;
  x->cb(x, err, why);
}

static void on_xchg_deferred(zm__ziti_defer_t *d) {
  zm__ziti_xchg_t *x = container_of(d, zm__ziti_xchg_t, defer);
  xchg_done(x, x->err, x->why);
}

/* Every failure is delivered on a later turn: then no exchange callback runs
 * inside zm__ziti_xchg_start() or in the middle of dispatch(). */
static void xchg_fail_later(zm__ziti_xchg_t *x, int err, const char *why) {
  x->conn = NULL;
  x->err = err;
  x->why = why;
  zm__ziti_defer(x->z, &x->defer, on_xchg_deferred);
}

/* ---- deferral
 * ---------------------------------------------------------------- */

void zm__ziti_defer(zm_ziti_t *z, zm__ziti_defer_t *d,
                    void (*fn)(zm__ziti_defer_t *d)) {
  ZM_ASSERT(!d->queued);
  d->fn = fn;
  d->queued = 1;
  zm__ziti_list_insert_tail(&z->deferred, &d->link);
  uv_idle_start(&z->idle, on_idle);
}

static void on_idle(uv_idle_t *h) {
  zm_ziti_t *z = container_of(h, zm_ziti_t, idle);
  /* Run what was queued before this turn; what it queues runs next turn. */
  zm__ziti_link_t batch;
  zm__ziti_list_init(&batch);
  if (!zm__ziti_list_empty(&z->deferred)) {
    batch.next = z->deferred.next;
    batch.prev = z->deferred.prev;
    batch.next->prev = &batch;
    batch.prev->next = &batch;
    zm__ziti_list_init(&z->deferred);
  }
  while (!zm__ziti_list_empty(&batch)) {
    zm__ziti_link_t *n = batch.next;
    zm__ziti_list_remove(n);
    zm__ziti_defer_t *d = container_of(n, zm__ziti_defer_t, link);
    d->queued = 0;
    d->fn(d);
  }
  if (zm__ziti_list_empty(&z->deferred))
    uv_idle_stop(&z->idle);
  zm__ziti_maybe_finish(z);
}

/* ---- the queue
 * ------------------------------------------------------------------ */

static void on_queue_timer(uv_timer_t *t);

static void queue_arm(zm_ziti_t *z, uint64_t due) {
  if (z->queue_timer_due != 0 && z->queue_timer_due <= due)
    return; /* an earlier wake-up is armed; it rescans */
  uint64_t now = uv_now(z->loop);
  z->queue_timer_due = due;
  uv_timer_start(&z->queue_timer, on_queue_timer, due > now ? due - now : 0, 0);
}

static void enqueue(zm_ziti_t *z, zm__ziti_xchg_t *x, int at_head) {
  if (at_head)
    zm__ziti_list_insert_head(&z->queue, &x->link);
  else
    zm__ziti_list_insert_tail(&z->queue, &x->link);
  x->queued = 1;
  z->n_queued++;
  queue_arm(z, x->deadline);
}

static zm__ziti_xchg_t *dequeue(zm_ziti_t *z) {
  if (zm__ziti_list_empty(&z->queue))
    return NULL;
  zm__ziti_xchg_t *x = container_of(z->queue.next, zm__ziti_xchg_t, link);
  zm__ziti_list_remove(&x->link);
  x->queued = 0;
  z->n_queued--;
  return x;
}

static void on_queue_timer(uv_timer_t *t) {
  zm_ziti_t *z = container_of(t, zm_ziti_t, queue_timer);
  uint64_t now = uv_now(z->loop);
  uint64_t next = 0;
  z->queue_timer_due = 0;
  zm__ziti_link_t *n = z->queue.next;
  while (n != &z->queue) {
    zm__ziti_link_t *after = n->next;
    zm__ziti_xchg_t *x = container_of(n, zm__ziti_xchg_t, link);
    if (x->deadline <= now) {
      zm__ziti_list_remove(n);
      x->queued = 0;
      z->n_queued--;
      xchg_fail_later(x, ZM_E_TIMEOUT, err_queue_timeout);
    } else if (next == 0 || x->deadline < next) {
      next = x->deadline;
    }
    n = after;
  }
  if (next != 0)
    queue_arm(z, next);
}

/* ---- connections: timers, writes, closing
 * ------------------------------------- */

static void on_conn_timer(uv_timer_t *t);

static void conn_arm(zm__ziti_conn_t *c, uint64_t due) {
  uint64_t now = uv_now(c->z->loop);
  uv_timer_start(&c->timer, on_conn_timer, due > now ? due - now : 0, 0);
}

static void conn_free(zm__ziti_conn_t *c) {
  zm_ziti_t *z = c->z;
  zm__ziti_list_remove(&c->link);
  free(c->wbuf);
  zm__ziti_tls_dispose(&c->tls);
  free(c);
  zm__ziti_maybe_finish(z);
}

static void conn_release(zm__ziti_conn_t *c) {
  ZM_ASSERT(c->pending > 0);
  if (--c->pending == 0 && c->state == CONN_CLOSING)
    conn_free(c);
}

static void on_conn_handle_closed(uv_handle_t *h) { conn_release(h->data); }

/* Starts closing c; the caller has already taken c->x away. */
static void conn_close(zm__ziti_conn_t *c) {
  if (c->state == CONN_CLOSING)
    return;
  ZM_ASSERT(c->x == NULL);
  conn_set_state(c, CONN_CLOSING);
  if (c->hs_running && zm_workers_steal(c->z->cfg.workers, &c->hs_work)) {
    /* not started: it goes now, and so does its room in the queue */
    c->hs_running = 0;
    c->pending--;
    c->z->stats.handshake_steps_offloaded--;
  }
  if (c->resolving)
    zm__resolve_cancel(c->z->resolver, &c->gai);
  c->pending += 2;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

/* A connection that never became usable: the oldest waiting exchange gets
 * the error (so that a refused or misconfigured controller fails requests
 * quickly instead of at their deadlines); the rest may try again. */
static void conn_fail_connect(zm__ziti_conn_t *c, int err, const char *why) {
  zm_ziti_t *z = c->z;
  ZM_WARN("ziti: connection to %s failed: %s", z->host_header, why);
  conn_close(c);
  zm__ziti_xchg_t *x = dequeue(z);
  if (x)
    xchg_fail_later(x, err, why);
  dispatch(z);
}

/* 1 if sending x twice cannot change anything on the controller: GET,
 * DELETE (a second one answers 404, which callers count as done) and the
 * authentication POST. Creating an identity or enrolling is never re-sent
 * blindly: the first attempt may have been carried out (Go's net/http makes
 * the same choice); the caller gets an error and compensates. */
static int xchg_idempotent(const zm__ziti_xchg_t *x) {
  static const char AUTH[] = "POST /edge/management/v1/authenticate?";
  const char *r = x->req.base;
  if (r == NULL)
    return 0;
  return strncmp(r, "GET ", 4) == 0 || strncmp(r, "DELETE ", 7) == 0 ||
         strncmp(r, AUTH, sizeof AUTH - 1) == 0;
}

/* The connection broke while usable. An idempotent request it carried is
 * retried once on a fresh connection when the connection had been reused and
 * no byte of the response arrived (the controller closed an idle keep-alive
 * connection as we wrote to it); otherwise it fails. */
static void conn_fail(zm__ziti_conn_t *c, int err, const char *why,
                      int retryable) {
  zm_ziti_t *z = c->z;
  if (c->state == CONN_CLOSING)
    return;
  if (c->state == CONN_CONNECTING || c->state == CONN_TLS_HANDSHAKE) {
    conn_fail_connect(c, err, why);
    return;
  }
  zm__ziti_xchg_t *x = c->x;
  int reused = c->served > 0 && !c->got_byte;
  c->x = NULL;
  conn_close(c);
  if (x != NULL) {
    if (retryable && reused && !x->retried && !z->closing &&
        xchg_idempotent(x)) {
      ZM_INFO("ziti: reused connection died (%s); retrying on a new one", why);
      /* Other used idle connections most likely died the same way (the
       * controller restarted or timed them out): drop them, so that the
       * retry runs on a connection that has never carried a request. */
      for (zm__ziti_link_t *n = z->conns.next; n != &z->conns; n = n->next) {
        zm__ziti_conn_t *o = container_of(n, zm__ziti_conn_t, link);
        if (o->state == CONN_IDLE && o->served > 0)
          conn_close(o);
      }
      x->retried = 1;
      x->conn = NULL;
      z->stats.retries++;
      zm_http1_resp_reset(&x->resp);
      enqueue(z, x, 1);
    } else {
      ZM_WARN("ziti: request failed: %s", why);
      xchg_fail_later(x, err, why);
    }
  }
  dispatch(z);
}

static void on_written(uv_write_t *req, int status) {
  zm__ziti_conn_t *c = container_of(req, zm__ziti_conn_t, wreq);
  free(c->wbuf);
  c->wbuf = NULL;
  if (c->state == CONN_CLOSING)
    return;
  if (status < 0) {
    conn_fail(c, ZM_E_UNAVAILABLE, err_write, 1);
    return;
  }
  conn_flush(c);
}

/* One write in flight per connection; what wolfSSL produced meanwhile goes
 * out when it completes. */
static void conn_flush(zm__ziti_conn_t *c) {
  if (c->wbuf != NULL || c->state == CONN_CLOSING || c->hs_running)
    return;
  size_t len;
  char *b = zm__ziti_tls_take_out(&c->tls, &len);
  if (b == NULL)
    return;
  c->wbuf = b;
  uv_buf_t ub = uv_buf_init(b, (unsigned)len);
  int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &ub, 1, on_written);
  if (rc != 0) {
    free(b);
    c->wbuf = NULL;
    conn_fail(c, ZM_E_UNAVAILABLE, err_write, 1);
  }
}

/* ---- connections: reading
 * -------------------------------------------------------- */

static void forget_session(zm_ziti_t *z) {
  if (z->tls_session != NULL)
    wolfSSL_SESSION_free(z->tls_session);
  z->tls_session = NULL;
}

/* The response in flight completed. */
static void conn_complete(zm__ziti_conn_t *c, int reuse) {
  zm_ziti_t *z = c->z;
  zm__ziti_xchg_t *x = c->x;
  c->x = NULL;
  if (c->served++ == 0) {
    /* A TLS 1.3 ticket arrives after the handshake, before the first
     * response: from here on the session can be resumed. */
    WOLFSSL_SESSION *s = zm__ziti_tls_session(&c->tls);
    if (s != NULL) {
      forget_session(z);
      z->tls_session = s;
    }
  }
  if (reuse && !z->closing && c->ctx_gen == z->ctx_gen) {
    conn_set_state(c, CONN_IDLE);
    conn_arm(c, uv_now(z->loop) + z->cfg.idle_timeout_ms);
  } else {
    conn_close(c);
  }
  dispatch(z);
  xchg_done(x, 0, NULL); /* last: it may reuse c at once */
}

static void conn_on_eof(zm__ziti_conn_t *c, int uverr) {
  c->tls.eof = 1;
  switch (c->state) {
  case CONN_CONNECTING:
  case CONN_TLS_HANDSHAKE:
    conn_fail_connect(c, ZM_E_UNAVAILABLE,
                      "connection closed during the TLS handshake");
    return;
  case CONN_IDLE:
    ZM_DEBUG("ziti conn %u: closed by the controller while idle", c->id);
    conn_close(c);
    return;
  case CONN_BUSY:
    if (uverr == 0 && zm_http1_resp_eof(&c->x->resp) == 0) {
      conn_complete(c, 0);
      return;
    }
    conn_fail(c, ZM_E_UNAVAILABLE,
              c->got_byte ? err_closed_mid : err_closed_before, 1);
    return;
  case CONN_CLOSING:
    return;
  }
}

/* Drives plaintext out of TLS into the response parser. */
static void conn_pump(zm__ziti_conn_t *c) {
  char pt[READ_CHUNK];
  for (;;) {
    ssize_t n = zm__ziti_tls_read(&c->tls, pt, sizeof(pt));
    if (n == ZM_E_INCOMPLETE) {
      conn_flush(c); /* TLS 1.3 may answer post-handshake messages */
      return;
    }
    if (n == 0 || (n < 0 && c->tls.eof)) {
      conn_on_eof(c, 0);
      return;
    }
    if (n < 0) {
      conn_fail(c, ZM_E_TLS, err_tls_io, 1);
      return;
    }
    if (c->state == CONN_IDLE) {
      /* Nothing was asked: a peer talking out of turn is not reusable. */
      zm_wipe(pt, (size_t)n);
      conn_close(c);
      return;
    }
    zm__ziti_xchg_t *x = c->x;
    if (!c->got_byte) {
      c->got_byte = 1;
      conn_arm(c, x->deadline);
    }
    ssize_t r = zm_http1_resp_feed(&x->resp, pt, (size_t)n);
    zm_wipe(pt, (size_t)n);
    if (r == ZM_E_INCOMPLETE)
      continue;
    if (r < 0) {
      conn_fail(c, r == ZM_E_MSG_TOO_LARGE ? ZM_E_MSG_TOO_LARGE : ZM_E_PROTO,
                r == ZM_E_MSG_TOO_LARGE ? err_big_response : err_bad_response,
                0);
      return;
    }
    /* Bytes after the response: the controller does not pipeline, so the
     * stream is out of step; do not reuse it. */
    conn_complete(c, x->resp.keep_alive && r == n);
    return;
  }
}

/* What one handshake step (zm__ziti_tls_handshake) returned. */
static void handshake_result(zm__ziti_conn_t *c, int rc, const char *why) {
  zm_ziti_t *z = c->z;
  conn_flush(c);
  if (c->state == CONN_CLOSING)
    return;
  if (rc == ZM_E_INCOMPLETE) {
    if (c->tls.eof)
      conn_fail_connect(c, ZM_E_TLS,
                        "connection closed during the TLS handshake");
    return;
  }
  if (rc != 0) {
    /* whatever made it fail, do not offer the same session again */
    forget_session(z);
    conn_fail_connect(c, ZM_E_TLS, why);
    return;
  }
  if (c->ctx_gen != z->ctx_gen) {
    /* it presented the certificate read before the files were read again */
    conn_close(c);
    dispatch(z);
    return;
  }
  if (zm__ziti_tls_resumed(&c->tls))
    z->stats.resumed++;
  /* A resumed session may not carry the certificate: the one from the full
   * handshake it resumes stays. */
  uint8_t *der = NULL;
  size_t len = 0;
  if (zm__ziti_tls_peer_der(&c->tls, &der, &len) == 0) {
    free(z->server_cert);
    z->server_cert = der;
    z->server_cert_len = len;
  }
  conn_set_state(c, CONN_IDLE);
  conn_arm(c, uv_now(z->loop) + z->cfg.idle_timeout_ms);
  dispatch(z);
  /* Post-handshake messages (TLS 1.3 tickets) may already be buffered. */
  if (c->state == CONN_IDLE && c->tls.in_len > c->tls.in_off)
    conn_pump(c);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* On a worker thread: the connection's tls is this job's alone. */
static void hs_work(zm_work_t *w) {
  zm__ziti_conn_t *c = container_of(w, zm__ziti_conn_t, hs_work);
  c->hs_why = NULL;
  c->hs_rc = zm__ziti_tls_handshake(&c->tls, &c->hs_why);
}

static void hs_done(zm_work_t *w, int status) {
  zm__ziti_conn_t *c = container_of(w, zm__ziti_conn_t, hs_work);
  c->hs_running = 0;
  if (c->state == CONN_CLOSING) {
    conn_release(c); /* may free c */
    return;
  }
  c->pending--;
  if (status != 0) { /* the pool is closing: so is the service */
    conn_fail_connect(c, ZM_E_SHUTDOWN, err_shutdown);
    return;
  }
  /* what the controller sent meanwhile waited in the socket */
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
    conn_fail_connect(c, ZM_E_UNAVAILABLE, err_connect);
    return;
  }
  handshake_result(c, c->hs_rc, c->hs_why);
}

/* One step of the handshake: on the workers when there are any (each step
 * with a public-key operation costs the loop a millisecond or more), the
 * connection not reading until it returns; else, or when they refuse the
 * job, here. */
static void conn_handshake(zm__ziti_conn_t *c) {
  zm_ziti_t *z = c->z;
  ZM_ASSERT(!c->hs_running);
  if (z->cfg.workers != NULL &&
      zm_workers_queue(z->cfg.workers, &c->hs_work, hs_work, hs_done) == 0) {
    c->hs_running = 1;
    c->pending++;
    uv_read_stop((uv_stream_t *)&c->tcp);
    z->stats.handshake_steps_offloaded++;
    uint64_t check = uv_now(z->loop) + z->cfg.handshake_wait_ms;
    conn_arm(c, check < c->connect_deadline ? check : c->connect_deadline);
    return;
  }
  const char *why = NULL;
  int rc = zm__ziti_tls_handshake(&c->tls, &why);
  z->stats.handshake_steps_inline++;
  handshake_result(c, rc, why);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  zm__ziti_conn_t *c = h->data;
  *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  zm__ziti_conn_t *c = s->data;
  if (c->state == CONN_CLOSING || nread == 0)
    return;
  if (nread < 0) {
    if (nread != UV_EOF)
      ZM_DEBUG("ziti conn %u: read: %s", c->id, uv_strerror((int)nread));
    if (c->state == CONN_BUSY || c->state == CONN_IDLE)
      conn_pump(c); /* what was buffered, then EOF */
    if (c->state != CONN_CLOSING)
      conn_on_eof(c, nread == UV_EOF ? 0 : (int)nread);
    return;
  }
  if (zm__ziti_tls_feed(&c->tls, buf->base, (size_t)nread) != 0) {
    conn_fail(c, ZM_E_MSG_TOO_LARGE, err_big_response, 0);
    return;
  }
  if (c->state == CONN_TLS_HANDSHAKE)
    conn_handshake(c);
  else
    conn_pump(c);
}

static void on_connected(uv_connect_t *req, int status) {
  zm__ziti_conn_t *c = container_of(req, zm__ziti_conn_t, creq);
  if (status == UV_ECANCELED || c->state == CONN_CLOSING)
    return;
  if (status < 0) {
    ZM_DEBUG("ziti conn %u: connect: %s", c->id, uv_strerror(status));
    conn_fail_connect(c, ZM_E_UNAVAILABLE,
                      status == UV_ECONNREFUSED ? "connection refused"
                                                : err_connect);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  conn_set_state(c, CONN_TLS_HANDSHAKE);
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc != 0) {
    conn_fail_connect(c, ZM_E_UNAVAILABLE, err_connect);
    return;
  }
  conn_handshake(c);
}

static void on_resolved(zm__resolve_req_t *req, int status,
                        struct addrinfo *res) {
  zm__ziti_conn_t *c = container_of(req, zm__ziti_conn_t, gai);
  c->resolving = 0;
  if (c->state == CONN_CLOSING || status != 0 || res == NULL) {
    if (c->state != CONN_CLOSING)
      conn_fail_connect(c, ZM_E_UNAVAILABLE, err_resolve);
    if (res != NULL)
      freeaddrinfo(res);
    conn_release(c);
    return;
  }
  int rc = uv_tcp_connect(&c->creq, &c->tcp, res->ai_addr, on_connected);
  freeaddrinfo(res);
  if (rc != 0)
    conn_fail_connect(c, ZM_E_UNAVAILABLE, err_connect);
  conn_release(c);
}

static void conn_open(zm_ziti_t *z) {
  zm__ziti_conn_t *c = zm_xcalloc(1, sizeof(*c));
  c->z = z;
  c->state = CONN_CONNECTING;
  c->id = (unsigned)++z->stats.connects;
  c->ctx_gen = z->ctx_gen;
  uv_tcp_init(z->loop, &c->tcp);
  uv_timer_init(z->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  zm__ziti_list_insert_tail(&z->conns, &c->link);
  z->n_open++;
  z->n_connecting++;
  c->connect_deadline = uv_now(z->loop) + z->cfg.connect_timeout_ms;
  conn_arm(c, c->connect_deadline);
  if (zm__ziti_tls_init(&c->tls, z->tls_ctx, z->host, z->tls_session) != 0) {
    conn_fail_connect(c, ZM_E_TLS, "cannot create a TLS session");
    return;
  }
  char port[8];
  snprintf(port, sizeof(port), "%d", z->port);
  c->resolving = 1;
  c->pending++;
  c->gai.family = AF_UNSPEC;
  int rc = zm__resolve(z->resolver, &c->gai, z->host, port, on_resolved);
  if (rc != 0) {
    c->resolving = 0;
    c->pending--;
    conn_fail_connect(c, ZM_E_UNAVAILABLE, err_resolve);
  }
}

static void on_conn_timer(uv_timer_t *t) {
  zm__ziti_conn_t *c = t->data;
  switch (c->state) {
  case CONN_CONNECTING:
  case CONN_TLS_HANDSHAKE:
    if (uv_now(c->z->loop) < c->connect_deadline) {
      /* the handshake step waited too long for a worker: run it here */
      conn_arm(c, c->connect_deadline);
      if (c->hs_running && zm_workers_steal(c->z->cfg.workers, &c->hs_work)) {
        c->z->stats.handshake_steps_offloaded--;
        c->z->stats.handshake_steps_inline++;
        hs_work(&c->hs_work);
        hs_done(&c->hs_work, 0);
      }
      return;
    }
    conn_fail_connect(c, ZM_E_TIMEOUT, err_connect_timeout);
    return;
  case CONN_IDLE:
    ZM_DEBUG("ziti conn %u: idle timeout", c->id);
    conn_close(c);
    return;
  case CONN_BUSY:
    conn_fail(c, ZM_E_TIMEOUT,
              uv_now(c->z->loop) >= c->x->deadline ? err_deadline
                                                   : err_first_byte,
              0);
    return;
  case CONN_CLOSING:
    return;
  }
}

/* ---- dispatch
 * ---------------------------------------------------------------------- */

static void conn_assign(zm__ziti_conn_t *c, zm__ziti_xchg_t *x) {
  zm_ziti_t *z = c->z;
  conn_set_state(c, CONN_BUSY);
  c->x = x;
  c->got_byte = 0;
  x->conn = c;
  z->stats.requests++;
  if (zm__ziti_tls_write(&c->tls, x->req.base, x->req.len) != 0) {
    conn_fail(c, ZM_E_TLS, err_tls_io, 1);
    return;
  }
  uint64_t fb = uv_now(z->loop) + FIRST_BYTE_TIMEOUT_MS;
  conn_arm(c, fb < x->deadline ? fb : x->deadline);
  conn_flush(c);
}

/* Hands waiting exchanges to idle connections, then opens connections (up to
 * the pool size) for those still waiting. */
static void dispatch(zm_ziti_t *z) {
  zm__ziti_link_t *n;
  for (n = z->conns.next; n != &z->conns && z->n_queued > 0; n = n->next) {
    zm__ziti_conn_t *c = container_of(n, zm__ziti_conn_t, link);
    if (c->state == CONN_IDLE)
      conn_assign(c, dequeue(z));
  }
  while (!z->closing && z->n_queued > z->n_connecting &&
         z->n_open < z->cfg.pool_size)
    conn_open(z);
}

void zm__ziti_xchg_start(zm_ziti_t *z, zm__ziti_xchg_t *x) {
  x->z = z;
  x->conn = NULL;
  x->start_ns = uv_hrtime();
  x->retried = 0;
  x->queued = 0;
  zm_http1_resp_reset(&x->resp);
  if (z->closing) {
    xchg_fail_later(x, ZM_E_SHUTDOWN, err_shutdown);
    return;
  }
  if (z->n_queued >= z->cfg.queue_max) {
    xchg_fail_later(x, ZM_E_UNAVAILABLE, err_queue_full);
    return;
  }
  if (x->deadline <= uv_now(z->loop)) {
    xchg_fail_later(x, ZM_E_TIMEOUT, err_deadline);
    return;
  }
  enqueue(z, x, 0);
  dispatch(z);
}

/* ---- credentials read again (zm__ziti_creds_reload)
 * ---------------------------------------------------------------- */

static void creds_work(uv_work_t *req) {
  zm_ziti_t *z = container_of(req, zm_ziti_t, creds_req);
  z->creds_why = NULL;
  z->creds_rc =
      zm__ziti_tls_ctx_load(&z->creds_ctx, z->cfg.ca_file, z->cfg.cert_file,
                            z->cfg.key_file, &z->creds_why);
}

static void creds_done(uv_work_t *req, int status) {
  zm_ziti_t *z = container_of(req, zm_ziti_t, creds_req);
  void (*cb)(zm_ziti_t *, int) = z->creds_cb;
  z->creds_cb = NULL;
  WOLFSSL_CTX *ctx = z->creds_ctx;
  z->creds_ctx = NULL;
  int err = status != 0 || z->closing ? ZM_E_SHUTDOWN : z->creds_rc;
  if (err == 0) {
    /* connections hold their own reference (wolfSSL counts them) */
    wolfSSL_CTX_free(z->tls_ctx);
    z->tls_ctx = ctx;
    z->ctx_gen++;
    forget_session(z); /* it was made with the old certificate */
    zm__ziti_link_t *n, *next;
    for (n = z->conns.next; n != &z->conns; n = next) {
      next = n->next;
      zm__ziti_conn_t *c = container_of(n, zm__ziti_conn_t, link);
      if (c->state == CONN_IDLE)
        conn_close(c);
    }
    ZM_INFO("ziti: read %s and %s again", z->cfg.cert_file, z->cfg.key_file);
  } else {
    if (ctx != NULL)
      wolfSSL_CTX_free(ctx);
    if (err == ZM_E_TLS)
      ZM_WARN("ziti: reading the controller credentials again: %s; the "
              "ones read before stay in use",
              z->creds_why);
  }
  cb(z, err);
}

void zm__ziti_creds_reload(zm_ziti_t *z, void (*cb)(zm_ziti_t *z, int err)) {
  ZM_ASSERT(z->creds_cb == NULL && !z->cfg.bootstrap);
  z->creds_cb = cb;
  z->creds_ctx = NULL;
  int rc = uv_queue_work(z->loop, &z->creds_req, creds_work, creds_done);
  ZM_ASSERT(rc == 0); /* fails only without a work callback */
}

/* ---- lifecycle
 * --------------------------------------------------------------------- */

int zm__ziti_pool_init(zm_ziti_t *z) {
  zm__ziti_list_init(&z->conns);
  zm__ziti_list_init(&z->queue);
  zm__ziti_list_init(&z->deferred);
  uv_idle_init(z->loop, &z->idle);
  uv_timer_init(z->loop, &z->queue_timer);
  return 0;
}

void zm__ziti_pool_shutdown(zm_ziti_t *z) {
  zm__ziti_xchg_t *x;
  while ((x = dequeue(z)) != NULL)
    xchg_fail_later(x, ZM_E_SHUTDOWN, err_shutdown);
  uv_timer_stop(&z->queue_timer);
  z->queue_timer_due = 0;
  if (z->creds_cb != NULL)
    uv_cancel((uv_req_t *)&z->creds_req); /* done runs, with UV_ECANCELED */
  zm__ziti_link_t *n;
  for (n = z->conns.next; n != &z->conns; n = n->next) {
    zm__ziti_conn_t *c = container_of(n, zm__ziti_conn_t, link);
    x = c->x;
    c->x = NULL;
    conn_close(c);
    if (x)
      xchg_fail_later(x, ZM_E_SHUTDOWN, err_shutdown);
  }
}

static void z_free(zm_ziti_t *z) {
  void (*done)(void *) = z->close_done;
  void *data = z->close_data;
  forget_session(z);
  zm_secret_dispose(&z->session);
  zm_http1_resp_dispose(&z->auth_x.resp);
  zm_secret_dispose(&z->auth_x.req);
  free(z->ca_bundle);
  free(z->server_cert);
  free(z->ep_stats);
  free(z->host);
  free(z->host_header);
  free((char *)z->cfg.controller_url);
  free((char *)z->cfg.ca_file);
  free((char *)z->cfg.cert_file);
  free((char *)z->cfg.key_file);
  if (z->tls_ctx)
    wolfSSL_CTX_free(z->tls_ctx);
  free(z);
  if (done)
    done(data);
}

static void on_z_handle_closed(uv_handle_t *h) {
  zm_ziti_t *z = h->data;
  if (--z->z_handles == 0)
    z_free(z);
}

static void on_resolver_closed(void *data) {
  zm_ziti_t *z = data;
  if (--z->z_handles == 0)
    z_free(z);
}

void zm__ziti_maybe_finish(zm_ziti_t *z) {
  if (z->closing != 1)
    return;
  if (!zm__ziti_list_empty(&z->conns) || !zm__ziti_list_empty(&z->ops) ||
      !zm__ziti_list_empty(&z->deferred) || z->auth_inflight ||
      z->creds_cb != NULL)
    return;
  z->closing = 2; /* only the client's own handles remain */
  z->z_handles = 4;
  zm__resolver_close(z->resolver, on_resolver_closed, z);
  z->resolver = NULL;
  z->idle.data = z->queue_timer.data = z->cacerts_timer.data = z;
  uv_close((uv_handle_t *)&z->idle, on_z_handle_closed);
  uv_close((uv_handle_t *)&z->queue_timer, on_z_handle_closed);
  uv_close((uv_handle_t *)&z->cacerts_timer, on_z_handle_closed);
}

/* ---- the public object
 * ---------------------------------------------------------- */

/* https://host[:port][/...]; http:// is taken as https:// (the Go service
 * keeps only the host and port, and always speaks TLS). */
static int parse_url(zm_ziti_t *z, const char *url) {
  const char *p;
  if (url != NULL && strncasecmp(url, "https://", 8) == 0)
    p = url + 8;
  else if (url != NULL && strncasecmp(url, "http://", 7) == 0)
    p = url + 7;
  else
    return ZM_E_INVAL;
  const char *hs, *he;
  if (*p == '[') {
    hs = p + 1;
    he = strchr(hs, ']');
    if (he == NULL)
      return ZM_E_INVAL;
    p = he + 1;
  } else {
    hs = p;
    while (*p && *p != ':' && *p != '/' && *p != '?' && *p != '#')
      p++;
    he = p;
  }
  if (he == hs || he - hs > 253)
    return ZM_E_INVAL;
  for (const char *q = hs; q < he; q++)
    if ((unsigned char)*q <= ' ' || *q == '@' || *q == '[' || *q == ']' ||
        *q == '/' || (unsigned char)*q >= 0x7f)
      return ZM_E_INVAL;
  long port = 443;
  if (*p == ':') {
    p++;
    port = 0;
    const char *ds = p;
    while (*p >= '0' && *p <= '9' && port <= 65535)
      port = port * 10 + (*p++ - '0');
    if (p == ds || port < 1 || port > 65535)
      return ZM_E_INVAL;
  }
  if (*p && *p != '/' && *p != '?' && *p != '#')
    return ZM_E_INVAL;
  z->host = zm_xstrndup(hs, (size_t)(he - hs));
  z->port = (int)port;
  size_t cap = strlen(z->host) + 16;
  z->host_header = zm_xmalloc(cap);
  snprintf(z->host_header, cap, strchr(z->host, ':') ? "[%s]:%d" : "%s:%d",
           z->host, z->port);
  return 0;
}

static char *dup_or_null(const char *s) { return s ? zm_xstrdup(s) : NULL; }

int zm_ziti_new(zm_ziti_t **out, uv_loop_t *loop, const zm_ziti_config_t *cfg) {
  *out = NULL;
  int rc;
  zm_ziti_t *z = zm_xcalloc(1, sizeof(*z));
  z->loop = loop;
  z->cfg = *cfg;
  z->cfg.controller_url = dup_or_null(cfg->controller_url);
  z->cfg.ca_file = dup_or_null(cfg->ca_file);
  z->cfg.cert_file = dup_or_null(cfg->cert_file);
  z->cfg.key_file = dup_or_null(cfg->key_file);
  if (!z->cfg.pool_size)
    z->cfg.pool_size = 16;
  if (!z->cfg.queue_max)
    z->cfg.queue_max = 4096;
  if (!z->cfg.connect_timeout_ms)
    z->cfg.connect_timeout_ms = 5000;
  if (!z->cfg.request_timeout_ms)
    z->cfg.request_timeout_ms = 15000;
  if (!z->cfg.idle_timeout_ms)
    z->cfg.idle_timeout_ms = 4000;
  if (!z->cfg.handshake_wait_ms)
    z->cfg.handshake_wait_ms = 1000;
  if (!z->cfg.cacerts_refresh_ms)
    z->cfg.cacerts_refresh_ms = 3600000;
  if ((rc = parse_url(z, cfg->controller_url)) != 0) {
    ZM_ERROR("ziti: controller URL must be https://host[:port]");
    goto fail;
  }
  const char *why = NULL;
  if ((rc = cfg->bootstrap ? zm__ziti_tls_ctx_new_unverified(&z->tls_ctx, &why)
                           : zm__ziti_tls_ctx_new(
                                 &z->tls_ctx, z->cfg.ca_file, z->cfg.cert_file,
                                 z->cfg.key_file, &why)) != 0) {
    ZM_ERROR("ziti: %s", why);
    goto fail;
  }
  if ((rc = zm__resolver_new(&z->resolver, z->loop)) != 0) {
    ZM_ERROR("ziti: cannot start the resolver threads: %s", uv_strerror(rc));
    goto fail;
  }
  zm__ziti_pool_init(z);
  zm__ziti_list_init(&z->ops);
  zm__ziti_list_init(&z->auth_waiters);
  z->rng = uv_hrtime() | 1;
  z->stats.reachable = -1;
  z->ep_stats = zm_xcalloc(ZM_ZITI_EP__COUNT, sizeof *z->ep_stats);
  zm__ziti_api_init(z);
  *out = z;
  return 0;

fail:
  z_free(z);
  return rc;
}

void zm_ziti_close(zm_ziti_t *z, void (*done)(void *data), void *data) {
  ZM_ASSERT(z->closing == 0);
  z->closing = 1;
  z->close_done = done;
  z->close_data = data;
  zm__ziti_api_shutdown(z);
  zm__ziti_pool_shutdown(z);
  zm__ziti_maybe_finish(z);
}

void zm_ziti_get_stats(const zm_ziti_t *z, zm_ziti_stats_t *out) {
  *out = z->stats;
  out->open_conns = z->n_open;
  out->busy_conns = z->n_busy;
  out->queued = z->n_queued;
}

const uint8_t *zm_ziti_server_cert(const zm_ziti_t *z, size_t *len) {
  *len = z->server_cert_len;
  return z->server_cert;
}
