/*
 * http.c - the metrics/probe listener: HTTP/1.1 (llhttp) on uv_tcp.
 *
 * Bounded everywhere (see include/zm/metrics.h): connections, head size,
 * one request in flight per connection, one deadline per exchange checked
 * by a 1 s tick. A connection is freed in its close callback only; nothing
 * closes a connection from inside an llhttp callback (they set flags, and
 * on_read acts after llhttp_execute returned).
 */
#include "zm/addr.h"
#include "zm/metrics.h"
#include "zm/log.h"

#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Longest URL kept; longer ones get 414. */
#define URL_MAX 256u
/* Bytes of a pipelined next request held while a response is written. */
#define PENDING_MAX ZM_METRICS_MAX_HEAD
/* Shared read buffer: requests are small. */
#define READ_BUF 8192u

typedef struct mconn mconn_t;

struct zm_metrics_srv {
  uv_loop_t *loop;
  zm_metrics_config_t cfg;
  char *address;
  uv_tcp_t listener;
  uv_timer_t tick;
  int listening;
  int port;
  int closing;
  unsigned open_handles;
  mconn_t *conns;
  llhttp_settings_t settings;
  zm_metrics_srv_stats_t stats;
  void (*close_done)(void *);
  void *close_data;
  char readbuf[READ_BUF];
};

struct mconn {
  uv_tcp_t tcp;
  zm_metrics_srv_t *srv;
  mconn_t *prev, *next;
  llhttp_t parser;
  char url[URL_MAX + 1];
  size_t url_len;
  int url_too_long;
  size_t head_bytes; /* bytes of the current request so far */
  int complete;      /* a request is complete, response pending */
  int keep_alive;
  int writing;
  int closing;
  int close_after_write;
  uint64_t deadline; /* uv_now() ms */
  char *resp;        /* response in flight */
  size_t resp_len;
  char *pending; /* pipelined bytes not parsed yet */
  size_t pending_len;
  uv_write_t wreq;
};

/* ===================== connections ====================================== */

static void srv_maybe_done(zm_metrics_srv_t *s) {
  if (s->closing && s->open_handles == 0 && s->close_done != NULL) {
    void (*done)(void *) = s->close_done;
    s->close_done = NULL;
    done(s->close_data);
  }
}

static void on_conn_closed(uv_handle_t *h) {
  mconn_t *c = h->data;
  zm_metrics_srv_t *s = c->srv;
  free(c->resp);
  free(c->pending);
  free(c);
  s->stats.open_conns--;
  s->open_handles--;
  srv_maybe_done(s);
}

static void conn_close(mconn_t *c) {
  if (c->closing)
    return;
  c->closing = 1;
  zm_metrics_srv_t *s = c->srv;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void conn_reset_request(mconn_t *c) {
  c->url_len = 0;
  c->url[0] = '\0';
  c->url_too_long = 0;
  c->head_bytes = 0;
  c->complete = 0;
}

/* ===================== responses ======================================== */

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void conn_feed(mconn_t *c, const char *p, size_t n);

static void on_written(uv_write_t *req, int status) {
  mconn_t *c = req->data;
  c->writing = 0;
  free(c->resp);
  c->resp = NULL;
  if (c->closing)
    return;
  if (status < 0 || c->close_after_write) {
    conn_close(c);
    return;
  }
  /* keep-alive: the next request gets a fresh deadline */
  c->deadline = uv_now(c->srv->loop) + c->srv->cfg.timeout_ms;
  conn_reset_request(c);
  llhttp_resume(&c->parser);
  if (c->pending_len > 0) {
    char *p = c->pending;
    size_t n = c->pending_len;
    c->pending = NULL;
    c->pending_len = 0;
    conn_feed(c, p, n);
    free(p);
    if (c->closing || c->writing)
      return;
  }
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void respond(mconn_t *c, int code, const char *reason, const char *ctype,
                    const char *body, size_t body_len, int head_only,
                    const char *extra) {
  char hdr[512];
  int keep = c->keep_alive && !c->close_after_write;
  int n = snprintf(hdr, sizeof hdr,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: "
                   "%zu\r\nCache-Control: no-store\r\n%s%s\r\n",
                   code, reason, ctype, body_len, extra ? extra : "",
                   keep ? "" : "Connection: close\r\n");
  size_t total = (size_t)n + (head_only ? 0 : body_len);
  c->resp = zm_xmalloc(total);
  memcpy(c->resp, hdr, (size_t)n);
  if (!head_only && body_len > 0)
    memcpy(c->resp + n, body, body_len);
  c->resp_len = total;
  if (!keep)
    c->close_after_write = 1;
  uv_buf_t b = uv_buf_init(c->resp, (unsigned)c->resp_len);
  c->wreq.data = c;
  c->writing = 1;
  uv_read_stop((uv_stream_t *)&c->tcp);
  if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
    c->writing = 0;
    conn_close(c);
  }
}

static void respond_text(mconn_t *c, int code, const char *reason,
                         const char *text, int head_only) {
  respond(c, code, reason, "text/plain; charset=utf-8", text, strlen(text),
          head_only, NULL);
}

static void handle_request(mconn_t *c) {
  zm_metrics_srv_t *s = c->srv;
  s->stats.requests++;
  c->keep_alive = llhttp_should_keep_alive(&c->parser);
  int method = llhttp_get_method(&c->parser);
  int head = method == HTTP_HEAD;
  if (c->url_too_long) {
    c->close_after_write = 1;
    respond_text(c, 414, "URI Too Long", "uri too long\n", head);
    return;
  }
  size_t plen = strcspn(c->url, "?#");
  c->url[plen] = '\0';
  int known = strcmp(c->url, "/metrics") == 0 ||
              strcmp(c->url, "/healthz") == 0 || strcmp(c->url, "/readyz") == 0;
  if (!known) {
    respond_text(c, 404, "Not Found", "not found\n", head);
    return;
  }
  if (method != HTTP_GET && !head) {
    respond(c, 405, "Method Not Allowed", "text/plain; charset=utf-8",
            "method not allowed\n", 19, 0, "Allow: GET, HEAD\r\n");
    return;
  }
  if (strcmp(c->url, "/healthz") == 0) {
    respond_text(c, 200, "OK", "ok\n", head);
  } else if (strcmp(c->url, "/readyz") == 0) {
    char why[200] = "";
    if (s->cfg.ready == NULL || s->cfg.ready(s->cfg.data, why, sizeof why)) {
      respond_text(c, 200, "OK", "ready\n", head);
    } else {
      char body[256];
      snprintf(body, sizeof body, "not ready: %s\n", why);
      respond_text(c, 503, "Service Unavailable", body, head);
    }
  } else {
    s->stats.scrapes++;
    zm_prom_t p;
    zm_prom_init(&p, s->cfg.max_body);
    if (s->cfg.render != NULL)
      s->cfg.render(&p, s->cfg.data);
    if (p.truncated)
      ZM_WARN("metrics: output over %zu bytes, truncated", s->cfg.max_body);
    respond(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8",
            p.buf ? p.buf : "", p.len, head, NULL);
    zm_prom_dispose(&p);
  }
}

/* ===================== parsing ========================================== */

static int on_url(llhttp_t *ps, const char *at, size_t len) {
  mconn_t *c = ps->data;
  if (c->url_len + len > URL_MAX) {
    c->url_too_long = 1;
    return 0;
  }
  memcpy(c->url + c->url_len, at, len);
  c->url_len += len;
  c->url[c->url_len] = '\0';
  return 0;
}

static int on_message_complete(llhttp_t *ps) {
  mconn_t *c = ps->data;
  c->complete = 1;
  return HPE_PAUSED; /* one request at a time: the rest waits */
}

static void bad_request(mconn_t *c, int code, const char *reason) {
  c->srv->stats.bad_requests++;
  c->keep_alive = 0;
  c->close_after_write = 1;
  respond_text(c, code, reason, "bad request\n", 0);
}

static void conn_feed(mconn_t *c, const char *p, size_t n) {
  if (!c->complete) {
    c->head_bytes += n;
    if (c->head_bytes > ZM_METRICS_MAX_HEAD) {
      bad_request(c, 431, "Request Header Fields Too Large");
      return;
    }
  }
  enum llhttp_errno e = llhttp_execute(&c->parser, p, n);
  if (e == HPE_PAUSED) {
    const char *pos = llhttp_get_error_pos(&c->parser);
    size_t used =
        pos != NULL && pos >= p && pos <= p + n ? (size_t)(pos - p) : n;
    size_t rest = n - used;
    if (rest > PENDING_MAX) {
      c->close_after_write = 1; /* too much pipelined: answer, then close */
      rest = 0;
    }
    if (rest > 0) {
      c->pending = zm_xrealloc(c->pending, c->pending_len + rest);
      memcpy(c->pending + c->pending_len, p + used, rest);
      c->pending_len += rest;
    }
    handle_request(c);
    return;
  }
  if (e != HPE_OK) {
    bad_request(c, 400, "Bad Request");
    return;
  }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  mconn_t *c = h->data;
  buf->base = c->srv->readbuf;
  buf->len = sizeof c->srv->readbuf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  mconn_t *c = st->data;
  if (nread == 0 || c->closing)
    return;
  if (nread < 0) {
    if (!c->writing)
      conn_close(c);
    else
      c->close_after_write = 1;
    return;
  }
  if (c->writing) { /* reads are stopped while writing; be safe */
    c->close_after_write = 1;
    return;
  }
  conn_feed(c, buf->base, (size_t)nread);
}

static void on_connection(uv_stream_t *ls, int status) {
  zm_metrics_srv_t *s = ls->data;
  if (status < 0)
    return;
  mconn_t *c = zm_xcalloc(1, sizeof *c);
  c->srv = s;
  uv_tcp_init(s->loop, &c->tcp);
  c->tcp.data = c;
  s->open_handles++;
  s->stats.open_conns++;
  if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0 || s->closing ||
      s->stats.open_conns > s->cfg.max_conns) {
    s->stats.rejected_conns++;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    return;
  }
  llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
  c->parser.data = c;
  c->deadline = uv_now(s->loop) + s->cfg.timeout_ms;
  c->next = s->conns;
  if (s->conns)
    s->conns->prev = c;
  s->conns = c;
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_tick(uv_timer_t *t) {
  zm_metrics_srv_t *s = t->data;
  uint64_t now = uv_now(s->loop);
  for (mconn_t *c = s->conns, *n; c != NULL; c = n) {
    n = c->next;
    if (now >= c->deadline) {
      s->stats.timeouts++;
      conn_close(c); /* a write in flight is cancelled by the close */
    }
  }
}

/* ===================== server =========================================== */

int zm_metrics_srv_new(zm_metrics_srv_t **out, uv_loop_t *loop,
                       const zm_metrics_config_t *cfg) {
  struct sockaddr_storage ss;
  *out = NULL;
  if (cfg->address == NULL || zm_addr_parse(cfg->address, &ss) != 0)
    return ZM_E_INVAL;
  zm_metrics_srv_t *s = zm_xcalloc(1, sizeof *s);
  s->loop = loop;
  s->cfg = *cfg;
  s->address = zm_xstrdup(cfg->address);
  s->cfg.address = s->address;
  if (s->cfg.max_conns == 0)
    s->cfg.max_conns = 16;
  if (s->cfg.timeout_ms == 0)
    s->cfg.timeout_ms = 10000;
  if (s->cfg.max_body == 0)
    s->cfg.max_body = 8u << 20;
  llhttp_settings_init(&s->settings);
  s->settings.on_url = on_url;
  s->settings.on_message_complete = on_message_complete;
  uv_timer_init(loop, &s->tick);
  s->tick.data = s;
  s->open_handles = 1;
  uv_timer_start(&s->tick, on_tick, 1000, 1000);
  uv_unref((uv_handle_t *)&s->tick);
  *out = s;
  return 0;
}

int zm_metrics_srv_listen(zm_metrics_srv_t *s) {
  struct sockaddr_storage ss;
  if (zm_addr_parse(s->address, &ss) != 0)
    return ZM_E_INVAL;
  uv_tcp_init(s->loop, &s->listener);
  s->listener.data = s;
  s->open_handles++;
  s->listening = 1;
  int rv = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0);
  if (rv == 0)
    rv = uv_listen((uv_stream_t *)&s->listener, 128, on_connection);
  if (rv != 0)
    return rv;
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
  s->port = ntohs(bound.ss_family == AF_INET6
                      ? ((struct sockaddr_in6 *)&bound)->sin6_port
                      : ((struct sockaddr_in *)&bound)->sin_port);
  return 0;
}

int zm_metrics_srv_port(const zm_metrics_srv_t *s) { return s->port; }

static void on_handle_closed(uv_handle_t *h) {
  zm_metrics_srv_t *s = h->data;
  s->open_handles--;
  srv_maybe_done(s);
}

void zm_metrics_srv_close(zm_metrics_srv_t *s, void (*done)(void *),
                          void *data) {
  if (s->closing)
    return;
  s->closing = 1;
  s->close_done = done;
  s->close_data = data;
  if (s->listening) {
    s->listening = 0;
    uv_close((uv_handle_t *)&s->listener, on_handle_closed);
  } else if (s->listener.loop != NULL) {
    /* listen failed after init: the handle still needs closing */
    uv_close((uv_handle_t *)&s->listener, on_handle_closed);
  }
  uv_close((uv_handle_t *)&s->tick, on_handle_closed);
  while (s->conns != NULL)
    conn_close(s->conns);
  srv_maybe_done(s);
}

void zm_metrics_srv_free(zm_metrics_srv_t *s) {
  if (s == NULL)
    return;
  free(s->address);
  free(s);
}

void zm_metrics_srv_get_stats(const zm_metrics_srv_t *s,
                              zm_metrics_srv_stats_t *out) {
  *out = s->stats;
}
