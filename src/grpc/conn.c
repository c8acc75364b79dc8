/*
 * conn.c - connection I/O: accept (and refusal over the cap), reads
 * into nghttp2 (through TLS when on), output gathering and one write in
 * flight with backpressure, close.
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void conn_flush(zm_conn_t *c);

/* ===================== connections ====================================== */

/* Appends to an output buffer. Growth is new buffer + copy + wipe of the
 * old one, never realloc(): output holds response bytes (private keys of
 * enrolled identities, enrollment JWTs) and realloc() would leave a copy in
 * freed heap. Returns 0, or -1 when out of memory. */
static int buf_append(char **b, size_t *len, size_t *cap, const void *p,
                      size_t n) {
  if (*len + n > *cap) {
    size_t nc = *cap ? *cap : 4096;
    while (nc < *len + n)
      nc *= 2;
    char *nb = malloc(nc);
    if (nb == NULL)
      return -1;
    if (*len > 0)
      memcpy(nb, *b, *len);
    zm_wipe(*b, *len);
    free(*b);
    *b = nb;
    *cap = nc;
  }
  memcpy(*b + *len, p, n);
  *len += n;
  return 0;
}

/* wolfSSL's ciphertext sink for TLS connections. */
static int on_tls_out(void *ud, const void *p, size_t n) {
  zm_conn_t *c = ud;
  return buf_append(&c->out, &c->out_len, &c->out_cap, p, n);
}

/* Decrypted bytes go to nghttp2. */
static int on_tls_plain(void *ud, const uint8_t *p, size_t n) {
  zm_conn_t *c = ud;
  ssize_t rv = nghttp2_session_mem_recv(c->h2, p, n);
  return rv < 0 ? (int)rv : 0;
}

void conn_mark_dirty(zm_conn_t *c) {
  if (c->dirty || c->state != CONN_OPEN)
    return;
  c->dirty = 1;
  c->dirty_next = c->srv->dirty;
  c->srv->dirty = c;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  zm_conn_t *c = h->data;
  buf->base = c->srv->readbuf;
  buf->len = sizeof c->srv->readbuf;
}

/* TLS failed (ZM_E_TLS) or the peer sent close_notify (ZM_E_CANCELLED). */
static void conn_tls_end(zm_conn_t *c, int trv, const char *why) {
  if (trv == ZM_E_TLS) {
    c->srv->stats.tls_failures++;
    zm_audit("tls_handshake_failed", "peer", c->peer, "reason", why, NULL);
    ZM_DEBUG("grpc: TLS with %s: %s", c->peer, why);
  }
  /* the alert wolfSSL produced goes out before the close; nothing
   * more is read */
  c->close_after_flush = 1;
  if (c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
  conn_mark_dirty(c);
}

/* ---- TLS handshakes on the crypto workers
 * Each handshake step with a public-key operation (the key share, the
 * server's signature, the client's chain) costs milliseconds: it runs on
 * the workers, with a copy of its input, writing into its own buffer (the
 * TLS session's sink points there meanwhile), while the connection reads
 * nothing more (the client waits for our flight anyway; what it sends
 * meanwhile waits in the socket). The loop touches neither c->tls nor the
 * step's state until hs_done. A connection closed meanwhile leaves its TLS
 * session to the step, which frees both when it comes back. */

typedef struct conn_hs {
  zm_work_t work;
  zm_conn_t *conn;   /* NULL once the connection is gone */
  zm_tls_srv_t *tls; /* the connection's, or the step's alone once orphaned */
  int running, rc;
  uint64_t since; /* uv_now() ms when the step was queued */
  const char *why;
  char *in; /* the step's input (a copy) */
  size_t in_len, in_cap, used;
  char *out; /* what the step wrote */
  size_t out_len, out_cap;
} conn_hs_t;

static void conn_input(zm_conn_t *c, const char *p, size_t n);

static int hs_sink(void *ud, const void *p, size_t n) {
  conn_hs_t *hs = ud;
  return buf_append(&hs->out, &hs->out_len, &hs->out_cap, p, n);
}

static void hs_free(conn_hs_t *hs) {
  free(hs->in);
  free(hs->out);
  free(hs);
}

int conn_hs_running(const zm_conn_t *c) {
  return c->hs != NULL && c->hs->running;
}

static void hs_work(zm_work_t *w) {
  conn_hs_t *hs = container_of(w, conn_hs_t, work);
  hs->why = NULL;
  hs->rc =
      zm_tls_srv_handshake(hs->tls, hs->in, hs->in_len, &hs->used, &hs->why);
}

static void hs_done(zm_work_t *w, int status) {
  conn_hs_t *hs = container_of(w, conn_hs_t, work);
  hs->running = 0;
  zm_conn_t *c = hs->conn;
  if (c == NULL) { /* closed meanwhile (the server may be gone too) */
    zm_tls_srv_dispose(hs->tls);
    free(hs->tls);
    hs_free(hs);
    return;
  }
  c->tls->sink = on_tls_out;
  c->tls->sink_ud = c;
  c->srv->hs_queued--;
  if (c->state != CONN_OPEN)
    return; /* on_conn_closed frees it */
  if (hs->out_len > 0) {
    int rv =
        buf_append(&c->out, &c->out_len, &c->out_cap, hs->out, hs->out_len);
    hs->out_len = 0;
    if (rv != 0) {
      c->srv->stats.nomem++;
      conn_close(c);
      return;
    }
  }
  if (status != 0) { /* the pool is closing: so is the service */
    conn_close(c);
    return;
  }
  if (hs->rc == ZM_E_INCOMPLETE) {
    conn_mark_dirty(c); /* the flush sends our flight and reads again */
  } else if (hs->rc != 0) {
    conn_tls_end(c, hs->rc, hs->why);
  } else {
    zm_tls_srv_established(c->tls);
    if (c->tls->n_names > 0)
      ZM_DEBUG("grpc: %s authenticated as %s", c->peer, c->tls->names[0]);
    c->hs = NULL; /* an established connection keeps none of it */
    /* records after the client's Finished, if any, in the same input */
    conn_input(c, hs->in + hs->used, hs->in_len - hs->used);
    hs_free(hs);
  }
}

/* Hands the handshake step over p[0..n) to the workers; 0 when there are
 * none or they refuse the job (then it runs here). */
static int hs_offload(zm_conn_t *c, const char *p, size_t n) {
  zm_grpc_server_t *srv = c->srv;
  if (srv->cfg.workers == NULL || srv->hs_queued >= ZM_GRPC_HS_MAX_QUEUED)
    return 0;
  conn_hs_t *hs = c->hs;
  if (hs == NULL) {
    hs = c->hs = calloc(1, sizeof *hs);
    if (hs == NULL)
      return 0;
    hs->conn = c;
    hs->tls = c->tls;
  }
  if (n > hs->in_cap) {
    free(hs->in);
    hs->in = malloc(n);
    hs->in_cap = hs->in != NULL ? n : 0;
    if (hs->in == NULL)
      return 0;
  }
  memcpy(hs->in, p, n);
  hs->in_len = n;
  hs->running = 1;
  c->tls->sink = hs_sink;
  c->tls->sink_ud = hs;
  if (zm_workers_queue(srv->cfg.workers, &hs->work, hs_work, hs_done) != 0) {
    hs->running = 0;
    c->tls->sink = on_tls_out;
    c->tls->sink_ud = c;
    return 0;
  }
  if (c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
  srv->hs_queued++;
  srv->stats.tls_handshake_steps_offloaded++;
  hs->since = uv_now(srv->loop);
  return 1;
}

void conn_hs_check(zm_conn_t *c, uint64_t now) {
  zm_grpc_server_t *srv = c->srv;
  conn_hs_t *hs = c->hs;
  if (hs == NULL || !hs->running || c->state != CONN_OPEN ||
      now - hs->since < srv->cfg.tls_handshake_wait_ms ||
      !zm_workers_steal(srv->cfg.workers, &hs->work))
    return;
  srv->stats.tls_handshake_steps_offloaded--;
  srv->stats.tls_handshake_steps_inline++;
  hs_work(&hs->work);
  hs_done(&hs->work, 0);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  zm_conn_t *c = st->data;
  if (nread == 0)
    return;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  c->last_active = uv_now(c->srv->loop);
  c->trimmed = 0;
  busy_note_read(c->srv);
  if (c->tls != NULL && !c->tls->established) {
    if (hs_offload(c, buf->base, (size_t)nread))
      return;
    c->srv->stats.tls_handshake_steps_inline++;
  }
  conn_input(c, buf->base, (size_t)nread);
}

/* Input for the session: through TLS (handshake here when it is not done)
 * when on, into nghttp2. */
static void conn_input(zm_conn_t *c, const char *p, size_t n) {
  c->in_recv = 1;
  ssize_t rv;
  if (c->tls != NULL) {
    const char *why = NULL;
    int was_up = c->tls->established;
    int trv = zm_tls_srv_feed(c->tls, p, n, on_tls_plain, c, &why);
    if (trv == ZM_E_TLS || trv == ZM_E_CANCELLED) {
      c->in_recv = 0;
      conn_tls_end(c, trv, why);
      return;
    }
    if (!was_up && c->tls->established && c->tls->n_names > 0)
      ZM_DEBUG("grpc: %s authenticated as %s", c->peer, c->tls->names[0]);
    rv = trv;
  } else {
    rv = nghttp2_session_mem_recv(c->h2, (const uint8_t *)p, n);
  }
  c->in_recv = 0;
  if (rv < 0) {
    c->srv->stats.protocol_errors++;
    ZM_DEBUG("h2 connection error: %s", nghttp2_strerror((int)rv));
    if (rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC || !c->got_frame) {
      conn_close(c);
      return;
    }
    nghttp2_session_terminate_session(c->h2, NGHTTP2_PROTOCOL_ERROR);
    c->close_after_flush = 1;
  }
  conn_mark_dirty(c);
}

/* Frees the output buffers beyond ZM_CONN_KEEP_BUF; only empty ones (wiped
 * when they were flushed). */
static void conn_release_bufs(zm_conn_t *c) {
  if (!c->writing && c->wr_len == 0 && c->wr_cap > ZM_CONN_KEEP_BUF) {
    free(c->wr);
    c->wr = NULL;
    c->wr_cap = 0;
  }
  if (c->out_len == 0 && c->out_cap > ZM_CONN_KEEP_BUF) {
    free(c->out);
    c->out = NULL;
    c->out_cap = 0;
  }
}

static void on_write(uv_write_t *req, int status) {
  zm_conn_t *c = req->data;
  c->writing = 0;
  c->write_started = 0;
  /* The bytes written may hold response secrets; the buffer is reused. */
  zm_wipe(c->wr, c->wr_len);
  c->wr_len = 0;
  if (c->out_len == 0) {
    /* idle connections keep no output buffers (both: out may hold the
     * previous in-flight buffer, swapped in empty) */
    conn_release_bufs(c);
  }
  if (c->state != CONN_OPEN)
    return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  conn_flush(c);
}

/* Plaintext of one TLS record being gathered (loop thread only; wiped after
 * every flush). */
static uint8_t tls_plain[16384];

/* Pulls nghttp2's output, writes it, applies backpressure, closes when done. */
static void conn_flush(zm_conn_t *c) {
  if (c->state != CONN_OPEN)
    return;
  /* TLS: frames are gathered into full records (one wolfSSL_write per
   * 16 KiB, not per frame: a unary response is three frames) */
  size_t plen = 0;
  int rv = 0;
  while (c->out_len < ZM_CONN_OUT_SOFT_MAX &&
         (c->tls == NULL || c->tls->established)) {
    const uint8_t *p;
    ssize_t n = nghttp2_session_mem_send(c->h2, &p);
    if (n < 0) {
      rv = (int)n; /* nghttp2's error: the session is broken */
      break;
    }
    if (n == 0)
      break;
    c->trimmed = 0;
    if (c->tls == NULL) {
      rv = buf_append(&c->out, &c->out_len, &c->out_cap, p, (size_t)n);
    } else {
      for (size_t off = 0; off < (size_t)n && rv == 0;) {
        size_t k = sizeof tls_plain - plen;
        if (k > (size_t)n - off)
          k = (size_t)n - off;
        memcpy(tls_plain + plen, p + off, k);
        plen += k;
        off += k;
        if (plen == sizeof tls_plain) {
          rv = zm_tls_srv_write(c->tls, tls_plain, plen);
          plen = 0;
        }
      }
    }
    /* nghttp2 keeps its last frame in its frame buffer until the next
     * one overwrites it: a response with a private key would sit there for
     * as long as the connection idles. The bytes are ours now; clear them.
     * (The buffer stays nghttp2's; it is not reread after mem_send.) */
    zm_wipe((void *)p, (size_t)n);
    if (rv != 0)
      break;
  }
  if (plen > 0 && rv == 0)
    rv = zm_tls_srv_write(c->tls, tls_plain, plen);
  zm_wipe(tls_plain, sizeof tls_plain);
  if (rv != 0) {
    if (rv == -1) /* buf_append */
      c->srv->stats.nomem++;
    conn_close(c);
    return;
  }
  int more = (c->tls == NULL || c->tls->established) &&
             nghttp2_session_want_write(c->h2);
  if (!c->writing && c->out_len > 0 && !more) {
    /* A response nearly always fits the socket buffer: write it now, with
     * no write request (no completion pass on the next loop turn, no
     * EPOLLOUT registration and removal: an epoll_ctl every other call).
     * Output that does not end here (nghttp2 has more) takes the write
     * request path: its completion pulls the next part. */
    uv_buf_t tb = uv_buf_init(c->out, (unsigned)c->out_len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &tb, 1);
    if (n == UV_EAGAIN || n == UV_ENOSYS) {
      n = 0;
    } else if (n < 0) {
      conn_close(c);
      return;
    }
    size_t done = (size_t)n, rest = c->out_len - done;
    if (done > 0 && rest > 0)
      memmove(c->out, c->out + done, rest);
    /* what was written may hold response secrets */
    zm_wipe(c->out + rest, done);
    c->out_len = rest;
    if (rest == 0)
      conn_release_bufs(c);
  }
  if (!c->writing && c->out_len > 0) {
    /* the rest waits for the socket: swap it into the in-flight buffer */
    char *t = c->wr;
    size_t tc = c->wr_cap;
    c->wr = c->out;
    c->wr_cap = c->out_cap;
    c->wr_len = c->out_len;
    c->out = t;
    c->out_cap = tc;
    c->out_len = 0;
    uv_buf_t b = uv_buf_init(c->wr, (unsigned)c->wr_len);
    c->wreq.data = c;
    int wrv = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (wrv < 0) {
      conn_close(c);
      return;
    }
    c->writing = 1;
    c->write_started = uv_now(c->srv->loop);
  }
  /* nghttp2 output waiting for a TLS handshake is not congestion: reading
   * must go on for the handshake to finish */
  int h2_ready = c->tls == NULL || c->tls->established;
  int congested = c->out_len >= ZM_CONN_OUT_SOFT_MAX ||
                  (h2_ready && nghttp2_session_want_write(c->h2));
  if (congested && c->writing && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  } else if (!congested && !c->reading && !c->close_after_flush &&
             !conn_hs_running(c)) {
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    c->reading = 1;
  }
  int idle_out = !c->writing && c->out_len == 0 &&
                 (!nghttp2_session_want_write(c->h2) ||
                  (c->tls != NULL && !c->tls->established));
  if (idle_out && (c->close_after_flush || !nghttp2_session_want_read(c->h2) ||
                   (c->srv->draining && c->n_calls == 0)))
    conn_close(c);
}

static void on_conn_closed(uv_handle_t *h) {
  zm_conn_t *c = h->data;
  zm_grpc_server_t *srv = c->srv;
  if (conn_hs_running(c)) {
    srv->hs_queued--;
    if (zm_workers_steal(srv->cfg.workers, &c->hs->work)) {
      /* not started: it goes with the connection (and frees its room in
       * the queue, which admitted enrollments count on) */
      c->hs->running = 0;
      srv->stats.tls_handshake_steps_offloaded--;
    } else {
      /* a worker has the TLS session: the step frees it */
      c->hs->conn = NULL;
      c->hs = NULL;
      c->tls = NULL;
      srv->stats.tls_handshake_steps_orphaned++;
    }
  }
  zm_wipe(c->out, c->out_len);
  zm_wipe(c->wr, c->wr_len);
  free(c->out);
  free(c->wr);
  if (c->hs != NULL)
    hs_free(c->hs);
  if (c->tls != NULL) {
    zm_tls_srv_dispose(c->tls);
    free(c->tls);
  }
  free(c);
  srv->stats.conns_open--;
  srv->open_handles--;
  drain_check(srv);
}

void conn_close(zm_conn_t *c) {
  if (c->state != CONN_OPEN)
    return;
  ZM_ASSERT(!c->in_recv);
  c->state = CONN_CLOSING;
  zm_grpc_server_t *srv = c->srv;
  /* Detach every call; handlers holding one are told it is cancelled. */
  while (c->calls != NULL)
    call_stream_closed(c->calls);
  nghttp2_session_del(c->h2);
  c->h2 = NULL;
  if (c->prev)
    c->prev->next = c->next;
  else
    srv->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  /* Off the dirty list before the handle's close callback frees it. The
   * list holds only connections touched this loop turn: a short walk. */
  if (c->dirty) {
    for (zm_conn_t **pp = &srv->dirty; *pp != NULL; pp = &(*pp)->dirty_next) {
      if (*pp == c) {
        *pp = c->dirty_next;
        break;
      }
    }
    c->dirty = 0;
  }
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void conn_peer_name(zm_conn_t *c) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  char ip[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
  }
  snprintf(c->peer, sizeof c->peer, "%s:%d", ip, port);
}

static void on_refused_closed(uv_handle_t *h) {
  zm_conn_t *c = h->data;
  zm_grpc_server_t *srv = c->srv;
  free(c);
  srv->stats.conns_open--;
  srv->open_handles--;
  drain_check(srv);
}

/*
 * Over the connection cap: a clear refusal, then close. An h2c client gets
 * our SETTINGS and a GOAWAY(ENHANCE_YOUR_CALM, "connection limit") it can
 * report; a TLS client cannot be told anything before a handshake we will
 * not spend CPU on, so it is closed. Logged at most every
 * ZM_REFUSE_LOG_MS with the count in between.
 */
static void conn_refuse(zm_conn_t *c) {
  zm_grpc_server_t *srv = c->srv;
  srv->stats.conns_refused++;
  uint64_t now = uv_now(srv->loop);
  if (srv->refused_logged_at == 0 ||
      now - srv->refused_logged_at >= ZM_REFUSE_LOG_MS) {
    ZM_WARN("grpc: connection limit (%u) reached: refused %s and %llu more "
            "since the last report",
            srv->cfg.max_conns, c->peer,
            (unsigned long long)srv->refused_unlogged);
    zm_audit("connection_refused", "peer", c->peer, "reason",
             "connection limit", NULL);
    srv->refused_logged_at = now;
    srv->refused_unlogged = 0;
  } else {
    srv->refused_unlogged++;
  }
  if (srv->tls_ctx == NULL) {
    static const char goaway[] =
        /* SETTINGS, empty */
        "\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        /* GOAWAY, 8 + 16 bytes: last stream 0, ENHANCE_YOUR_CALM */
        "\x00\x00\x18\x07\x00\x00\x00\x00\x00"
        "\x00\x00\x00\x00\x00\x00\x00\x0b"
        "connection limit";
    uv_buf_t b = uv_buf_init((char *)goaway, sizeof goaway - 1);
    uv_try_write((uv_stream_t *)&c->tcp, &b, 1); /* best effort */
  }
  c->state = CONN_CLOSING;
  uv_close((uv_handle_t *)&c->tcp, on_refused_closed);
}

void conn_on_connection(uv_stream_t *ls, int status) {
  zm_grpc_server_t *srv = ls->data;
  if (status < 0) {
    ZM_WARN("grpc: accept: %s", uv_strerror(status));
    return;
  }
  zm_conn_t *c = calloc(1, sizeof *c);
  if (c == NULL) {
    /* accept and drop, or the pending connection would wake us forever */
    srv->stats.nomem++;
    uv_tcp_t *t = malloc(sizeof *t);
    if (t != NULL) {
      uv_tcp_init(srv->loop, t);
      uv_accept(ls, (uv_stream_t *)t);
      uv_close((uv_handle_t *)t, (uv_close_cb)free);
    }
    return;
  }
  c->srv = srv;
  uv_tcp_init(srv->loop, &c->tcp);
  c->tcp.data = c;
  srv->open_handles++;
  srv->stats.conns_open++;
  if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0 || srv->draining) {
    c->state = CONN_CLOSING;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    return;
  }
  conn_peer_name(c);
  if (srv->stats.conns_open > srv->cfg.max_conns) {
    conn_refuse(c);
    return;
  }
  srv->stats.conns_accepted++;
  uv_tcp_nodelay(&c->tcp, 1);
  if (srv->tls_ctx != NULL) {
    c->tls = malloc(sizeof *c->tls);
    if (c->tls == NULL ||
        zm_tls_srv_init(c->tls, srv->tls_ctx, on_tls_out, c) != 0) {
      free(c->tls);
      c->tls = NULL;
      srv->stats.nomem++;
      c->state = CONN_CLOSING;
      uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
      return;
    }
  }
  zm_h2_mem_init(&c->h2mem);
  if (nghttp2_session_server_new3(&c->h2, srv->cbs, c, srv->opt,
                                  &c->h2mem.mem) != 0) {
    srv->stats.nomem++;
    c->state = CONN_CLOSING;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    return;
  }
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, srv->cfg.max_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 20},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 16u * 1024},
  };
  nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, ZM_ARRAY_SIZE(iv));
  nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, 16u << 20);
  c->last_active = uv_now(srv->loop);
  c->next = srv->conns;
  if (srv->conns)
    srv->conns->prev = c;
  srv->conns = c;
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  c->reading = 1;
  conn_mark_dirty(c);
}

/*
 * An idle connection keeps only what its sessions must remember (settings,
 * HPACK tables, stream ids, TLS keys): its output buffers go, and so do the
 * pages that were written and hold zeros again (nghttp2's frame buffer after
 * the wiped frames, its stream map with no stream, the unused bulk of the
 * TLS session). Called by the housekeeping tick; does nothing until the
 * connection has been quiet ZM_CONN_TRIM_MS with no call and no output, and
 * then once until it is used again. Returns 1 when it trimmed.
 */
int conn_trim_idle(zm_conn_t *c, uint64_t now) {
  if (c->trimmed || c->state != CONN_OPEN || c->n_calls != 0 || c->writing ||
      c->out_len != 0 || c->dirty || now - c->last_active < ZM_CONN_TRIM_MS ||
      nghttp2_session_want_write(c->h2))
    return 0;
  c->trimmed = 1;
  conn_release_bufs(c);
  size_t n = zm_h2_mem_trim(&c->h2mem);
  if (c->tls != NULL)
    n += zm_tls_srv_trim(c->tls);
  c->srv->stats.idle_trims++;
  c->srv->stats.trimmed_bytes += n;
  return 1;
}

/* ===================== loop hooks ======================================= */

void conn_on_flush(uv_prepare_t *p) {
  zm_grpc_server_t *srv = p->data;
  if (srv->dirty == NULL)
    return;
  while (srv->dirty != NULL) {
    zm_conn_t *c = srv->dirty;
    srv->dirty = c->dirty_next;
    c->dirty = 0;
    conn_flush(c);
  }
  busy_after_flush(srv);
}

/* The request did not arrive within recv_timeout_ms. A stream stuck inside
 * its header block cannot be answered: the connection goes (GOAWAY). One
 * stuck in its body gets a status, then RST_STREAM(NO_ERROR) (RFC 9113
 * 8.1: the response is complete, stop sending) so its state goes too. */
