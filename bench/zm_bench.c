/*
 * zm_bench.c - zm-bench, the load generator of ziti-management: a
 * single-threaded libuv + nghttp2 gRPC client. N connections x M concurrent
 * streams; a fixed request count (-n) or a duration (-D, after --warmup);
 * closed loop (each finished call starts the next) or open loop (--rate:
 * calls are due at fixed intended times and latency is measured from the
 * intended time, so a stalled server cannot hide its stall: no coordinated
 * omission). Every answer is verified (scenario.c); a wrong answer is an
 * error. --idle-conns N --hold S opens N connections, makes one health call
 * on each, prints "READY n" and holds them open (for RSS measurements).
 *
 * Writes are gathered per connection per loop turn: nghttp2 output goes into
 * the connection's buffer and a uv_prepare flushes every dirty connection
 * once before the loop polls, with one write in flight per connection.
 */
#include "hist.h"
#include "scenario.h"

#include <nghttp2/nghttp2.h>
#include <uv.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* ---- limits -----------------------------------------------------------------
 */

/* Largest response body we keep (RSI identity JSON is a few KiB; a list page
 * of 100 rows is ~10 KiB); anything larger is a protocol error. */
#define RESP_MAX (2u << 20)
/* Stop gathering nghttp2 output into one write beyond this. */
#define WBUF_SOFT_MAX (256u * 1024)
/* The one read buffer shared by every connection (single thread). */
#define RBUF_SIZE (64u * 1024)
/* Client-side deadline when --timeout-ms is not given. */
#define DEFAULT_CLIENT_TIMEOUT_MS 30000
/* How long the drain after the end of a duration run may take at most. */
#define DRAIN_MAX_MS 30000
/* Idle mode: connections being set up at once (accept backlog is finite). */
#define IDLE_CONNECT_BATCH 256
/* HTTP/2 receive windows we advertise (stream / connection). */
#define H2_STREAM_WINDOW (1 << 24)
#define H2_CONN_WINDOW (1 << 30)
/* Reconnect delay after a connection was lost mid-run. */
#define RECONNECT_MS 100
#define MAX_RECONNECTS 100

#define MAX_CONNS 100000

#ifndef container_of
#define container_of(ptr, type, member)                                        \
  ((type *)((char *)(ptr)-offsetof(type, member)))
#endif
#define ZMB_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
/* Always-on invariant check. */
#define ZMB_CHECK(cond)                                                        \
  do {                                                                         \
    if (!(cond))                                                               \
      die("%s:%d: check failed: %s", __FILE__, __LINE__, #cond);               \
  } while (0)

/* ---- transport error kinds
 * --------------------------------------------------- */

#define TERRS(X)                                                               \
  X(CONNECT, "connect")                                                        \
  X(CONN_LOST, "conn_lost")                                                    \
  X(RESET, "stream_reset")                                                     \
  X(HTTP_STATUS, "http_status")                                                \
  X(NO_GRPC_STATUS, "no_grpc_status")                                          \
  X(TOO_LARGE, "response_too_large")                                           \
  X(TIMEOUT, "client_timeout")                                                 \
  X(SUBMIT, "submit_failed")                                                   \
  X(UNFINISHED, "unfinished_at_exit")

enum {
#define X(n, s) TE_##n,
  TERRS(X)
#undef X
      TE__COUNT
};
static const char *const TE_NAMES[] = {
#define X(n, s) s,
    TERRS(X)
#undef X
};

/* ---- types
 * ------------------------------------------------------------------- */

typedef struct bench_s bench_t;
typedef struct conn_s conn_t;

typedef struct stream_s {
  conn_t *c;
  struct stream_s *prev, *next; /* the connection's in-flight list */
  int32_t id;
  zmb_req_t req;
  char *page_token; /* LIST: owned copies behind req.page_token / after_id */
  char *after_id;
  uint64_t t_start;  /* uv_hrtime ns: intended (open loop) or submit time */
  uint64_t deadline; /* uv_hrtime ns */
  uint8_t out[ZMB_REQ_MAX];
  size_t out_len, out_off;
  uint8_t *in; /* response DATA, owned */
  size_t in_len, in_cap;
  int http_status;
  int grpc_status; /* -1 = none seen */
  int done;        /* already accounted (timeout) */
} stream_t;

typedef enum { C_IDLE = 0, C_CONNECTING, C_READY, C_CLOSING } conn_state_t;

struct conn_s {
  bench_t *b;
  int idx;
  conn_state_t state;
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_write_t wreq;
  uv_timer_t *retry; /* allocated apart, closed with free */
  nghttp2_session *h2;
  uint8_t *wbuf;
  size_t wlen, wcap;
  int writing;
  int dirty;
  conn_t *next_dirty;
  stream_t *streams; /* in flight */
  int inflight;
  int reconnects;
  int idle_done;    /* idle mode: health call answered */
  char *list_token; /* LIST walker: token of the next page ("" = start) */
  char *list_last;  /* last id seen by the walker */
};

typedef struct {
  uint64_t ok;     /* verified answers (in window) */
  zmb_hist_t hist; /* latency of verified answers (in window) */
  uint64_t status[ZMB_GRPC_CODES + 1]; /* every answer's grpc-status */
} op_stats_t;

struct bench_s {
  /* options */
  char host[256];
  int port;
  int conns, streams;
  uint64_t count; /* -n, 0 = duration mode */
  double duration, warmup;
  double rate; /* 0 = closed loop */
  int weights[ZMB_OP__COUNT];
  int weight_sum;
  const char *scenario;
  int64_t keys;
  double miss_ratio;
  const char *json_path;
  int timeout_ms;
  int allow_errors;
  uint64_t seed;
  int page_size;
  int service_type;
  int idle_conns;
  double hold;
  int quiet;
  int verbose_errors; /* first few error reasons to stderr */

  /* runtime */
  uv_loop_t *loop;
  struct sockaddr_storage addr;
  char authority[300];
  conn_t *cv;
  int nconns;
  conn_t *dirty;
  uv_prepare_t prep;
  int pacer_fd;    /* open loop: timerfd armed at the next due time */
  uv_poll_t pacer; /* watches pacer_fd */
  int spin;        /* --pace spin: never block in poll (precise, burns CPU) */
  uv_idle_t spinner;
  uv_timer_t tick;
  uv_timer_t hold_timer;
  uint64_t rng;
  int started;  /* load started (all connected) */
  int stopping; /* no new requests */
  int finished;
  int finish_requested;    /* finish() runs from the prepare handle, never
                              inside an nghttp2 callback */
  int rr;                  /* open loop: next connection to try */
  uint64_t t0, t_ws, t_we; /* run start, window start/end (ns) */
  uint64_t t_stop;         /* when issuing stopped */
  uint64_t t_last_done;    /* last completion (count mode duration) */
  uint64_t issued;
  uint64_t completed;
  uint64_t inflight;
  uint64_t create_seq;
  uint64_t start_s; /* wall clock at start: makes agent ids differ per run */
  int connected, connect_failed, connecting;
  int next_idle_conn;
  int idle_ready, idle_failed, ready_printed;
  uint64_t backlog_at_end;

  /* results */
  op_stats_t ops[ZMB_OP__COUNT];
  zmb_hist_t all;
  uint64_t ok_total;
  uint64_t err_status[ZMB_GRPC_CODES + 1]; /* unexpected grpc-status */
  uint64_t err_content;                    /* right status, wrong content */
  uint64_t err_transport[TE__COUNT];
  uint64_t errors;
  int reasons_printed;
  char first_reason[256];
};

static uint8_t g_rbuf[RBUF_SIZE]; /* the shared read buffer (see header) */

/* ---- small helpers
 * --------------------------------------------------------------- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("zm-bench: ", stderr);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(2);
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p)
    die("out of memory");
  return p;
}

static char *xstrdup(const char *s) {
  char *p = strdup(s);
  if (!p)
    die("out of memory");
  return p;
}

/* xorshift64*: fast, good enough to pick keys. */
static uint64_t rnd(bench_t *b) {
  uint64_t x = b->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  b->rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static double rnd01(bench_t *b) {
  return (double)(rnd(b) >> 11) * (1.0 / 9007199254740992.0);
}

static void note_error(bench_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void note_error(bench_t *b, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  b->errors++;
  if (!b->first_reason[0])
    snprintf(b->first_reason, sizeof(b->first_reason), "%s", msg);
  if (b->reasons_printed < b->verbose_errors) {
    b->reasons_printed++;
    fprintf(stderr, "zm-bench: error: %s\n", msg);
  }
}

static void transport_error(bench_t *b, int kind, const char *detail) {
  b->err_transport[kind]++;
  note_error(b, "%s%s%s", TE_NAMES[kind], detail ? ": " : "",
             detail ? detail : "");
}

/* ---- forward declarations
 * ------------------------------------------------------ */

static void conn_start(conn_t *c);
static void conn_fail(conn_t *c, const char *why);
static void conn_mark_dirty(conn_t *c);
static int issue(conn_t *c, uint64_t t_intended);
static void pump(bench_t *b);
static void arm_pacer(bench_t *b);
static void maybe_finish(bench_t *b);
static void on_tcp_closed(uv_handle_t *h);

/* ---- request choice
 * --------------------------------------------------------------- */

static zmb_op_t pick_op(bench_t *b) {
  int r = (int)(rnd(b) % (uint64_t)b->weight_sum);
  for (int i = 0; i < ZMB_OP__COUNT; i++) {
    if (r < b->weights[i])
      return (zmb_op_t)i;
    r -= b->weights[i];
  }
  return ZMB_OP_RESOLVE;
}

static void fill_req(bench_t *b, conn_t *c, stream_t *s, zmb_op_t op) {
  zmb_req_t *r = &s->req;
  memset(r, 0, sizeof(*r));
  r->op = op;
  switch (op) {
  case ZMB_OP_RESOLVE:
  case ZMB_OP_EXTEND:
    if (b->miss_ratio > 0 && rnd01(b) < b->miss_ratio) {
      r->expect_miss = 1;
      r->key = b->keys + (int64_t)(rnd(b) % 1000000u);
    } else {
      r->key = (int64_t)(rnd(b) % (uint64_t)b->keys);
    }
    break;
  case ZMB_OP_LIST:
    r->page_size = b->page_size;
    s->page_token = xstrdup(c->list_token ? c->list_token : "");
    s->after_id = c->list_last ? xstrdup(c->list_last) : NULL;
    r->page_token = s->page_token;
    r->after_id = s->after_id;
    break;
  case ZMB_OP_RSI:
    r->service_type = b->service_type;
    break;
  case ZMB_OP_CREATE:
  case ZMB_OP_CSVC:
    r->seq = ((uint64_t)(getpid() & 0xffff) << 48) |
             ((uint64_t)(b->start_s & 0xffff) << 32) |
             (++b->create_seq & 0xffffffffull);
    break;
  default:
    break;
  }
}

/* ---- streams
 * ------------------------------------------------------------------------ */

static void stream_free(stream_t *s) {
  free(s->in);
  free(s->page_token);
  free(s->after_id);
  free(s);
}

static void stream_unlink(conn_t *c, stream_t *s) {
  if (s->prev)
    s->prev->next = s->next;
  else
    c->streams = s->next;
  if (s->next)
    s->next->prev = s->prev;
  s->prev = s->next = NULL;
}

/* In the measurement window? Duration mode: completion in [ws, we]; count
 * mode: always. */
static int in_window(bench_t *b, uint64_t now) {
  if (b->count || b->idle_conns)
    return 1;
  return now >= b->t_ws && now <= b->t_we;
}

/* Accounts a finished stream: verification, counters, histogram. Returns 1
 * if the answer was the expected one. */
static int stream_account(bench_t *b, conn_t *c, stream_t *s,
                          uint32_t h2_error) {
  uint64_t now = uv_hrtime();
  char why[200] = "";
  int measured = in_window(b, now);

  if (b->count)
    b->t_last_done = now;
  if (s->grpc_status < 0) {
    if (s->http_status && s->http_status != 200) {
      snprintf(why, sizeof(why), "%s: HTTP :status %d", zmb_op_name(s->req.op),
               s->http_status);
      transport_error(b, TE_HTTP_STATUS, why);
    } else if (h2_error) {
      snprintf(why, sizeof(why), "%s: %s", zmb_op_name(s->req.op),
               nghttp2_http2_strerror(h2_error));
      transport_error(b, TE_RESET, why);
    } else {
      transport_error(b, TE_NO_GRPC_STATUS, zmb_op_name(s->req.op));
    }
    return 0;
  }
  int st = s->grpc_status >= 0 && s->grpc_status < ZMB_GRPC_CODES
               ? s->grpc_status
               : ZMB_GRPC_CODES;
  b->ops[s->req.op].status[st]++;
  if (s->http_status != 200) {
    snprintf(why, sizeof(why), "%s: HTTP :status %d", zmb_op_name(s->req.op),
             s->http_status);
    transport_error(b, TE_HTTP_STATUS, why);
    return 0;
  }
  zmb_list_next_t next = {0};
  zmb_verdict_t v = zmb_resp_verify(&s->req, s->grpc_status, s->in, s->in_len,
                                    s->req.op == ZMB_OP_LIST ? &next : NULL,
                                    why, sizeof(why));
  /* The RSI answer carries a private key: wipe our copy of the body. */
  if (s->in && s->req.op == ZMB_OP_RSI) {
    volatile uint8_t *p = s->in;
    for (size_t i = 0; i < s->in_len; i++)
      p[i] = 0;
  }
  if (v == ZMB_V_BAD_STATUS) {
    b->err_status[st]++;
    note_error(b, "%s", why);
    return 0;
  }
  if (v == ZMB_V_BAD_CONTENT) {
    b->err_content++;
    note_error(b, "%s", why);
    return 0;
  }
  if (s->req.op == ZMB_OP_LIST && next.next_token) {
    /* Walk on; wrap to the start after the last page. */
    free(c->list_token);
    free(c->list_last);
    c->list_token = next.next_token;
    c->list_last = next.next_token[0] ? next.last_id : NULL;
    if (!next.next_token[0])
      free(next.last_id);
    next.next_token = next.last_id = NULL;
  }
  zmb_list_next_dispose(&next);
  if (measured) {
    uint64_t lat = now > s->t_start ? now - s->t_start : 0;
    b->ops[s->req.op].ok++;
    zmb_hist_record(&b->ops[s->req.op].hist, lat);
    zmb_hist_record(&b->all, lat);
    b->ok_total++;
  }
  return 1;
}

/* Idle mode: a connection is settled once its health call ended. */
static void idle_settle(conn_t *c, int ok) {
  if (!c->b->idle_conns || c->idle_done)
    return;
  c->idle_done = 1;
  if (ok)
    c->b->idle_ready++;
  else
    c->b->idle_failed++;
}

/* A stream is over (closed by nghttp2, or failed with its connection). */
static void stream_finish(conn_t *c, stream_t *s, uint32_t h2_error,
                          int conn_lost) {
  bench_t *b = c->b;
  stream_unlink(c, s);
  c->inflight--;
  b->inflight--;
  b->completed++;
  int ok = 0;
  if (!s->done) {
    if (conn_lost)
      transport_error(b, TE_CONN_LOST, zmb_op_name(s->req.op));
    else
      ok = stream_account(b, c, s, h2_error);
  }
  idle_settle(c, ok);
  stream_free(s);
}

/* ---- nghttp2 callbacks
 * ---------------------------------------------------------------- */

static ssize_t on_data_source_read(nghttp2_session *h2, int32_t sid,
                                   uint8_t *buf, size_t len, uint32_t *flags,
                                   nghttp2_data_source *src, void *ud) {
  (void)h2;
  (void)sid;
  (void)ud;
  stream_t *s = src->ptr;
  size_t n = s->out_len - s->out_off;
  if (n > len)
    n = len;
  memcpy(buf, s->out + s->out_off, n);
  s->out_off += n;
  if (s->out_off == s->out_len)
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

static int parse_int(const uint8_t *v, size_t n, int *out) {
  int x = 0;
  if (n == 0 || n > 9)
    return -1;
  for (size_t i = 0; i < n; i++) {
    if (v[i] < '0' || v[i] > '9')
      return -1;
    x = x * 10 + (v[i] - '0');
  }
  *out = x;
  return 0;
}

static int on_header(nghttp2_session *h2, const nghttp2_frame *f,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *ud) {
  (void)flags;
  (void)ud;
  if (f->hd.type != NGHTTP2_HEADERS)
    return 0;
  stream_t *s = nghttp2_session_get_stream_user_data(h2, f->hd.stream_id);
  if (!s)
    return 0;
  if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
    if (parse_int(value, valuelen, &s->http_status) != 0)
      s->http_status = -1;
  } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
    int st;
    /* Trailers-Only answers carry it in the headers; a normal answer in
     * the trailers. The last one wins (there should be exactly one). */
    s->grpc_status = parse_int(value, valuelen, &st) == 0 ? st : 99;
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *h2, uint8_t flags, int32_t sid,
                         const uint8_t *data, size_t len, void *ud) {
  (void)flags;
  conn_t *c = ud;
  stream_t *s = nghttp2_session_get_stream_user_data(h2, sid);
  if (!s || s->done)
    return 0;
  if (s->in_len + len > RESP_MAX) {
    s->done = 1;
    transport_error(c->b, TE_TOO_LARGE, zmb_op_name(s->req.op));
    nghttp2_submit_rst_stream(h2, NGHTTP2_FLAG_NONE, sid, NGHTTP2_CANCEL);
    return 0;
  }
  if (s->in_len + len > s->in_cap) {
    size_t cap = s->in_cap ? s->in_cap : 256;
    while (cap < s->in_len + len)
      cap *= 2;
    uint8_t *p = realloc(s->in, cap);
    if (!p)
      die("out of memory");
    s->in = p;
    s->in_cap = cap;
  }
  memcpy(s->in + s->in_len, data, len);
  s->in_len += len;
  return 0;
}

static int on_stream_close(nghttp2_session *h2, int32_t sid,
                           uint32_t error_code, void *ud) {
  conn_t *c = ud;
  stream_t *s = nghttp2_session_get_stream_user_data(h2, sid);
  if (!s)
    return 0;
  nghttp2_session_set_stream_user_data(h2, sid, NULL);
  stream_finish(c, s, error_code, 0);
  /* Refill from here: closed loop issues on this connection. */
  pump(c->b);
  return 0;
}

static nghttp2_session_callbacks *g_cbs;

static void make_callbacks(void) {
  if (nghttp2_session_callbacks_new(&g_cbs) != 0)
    die("nghttp2_session_callbacks_new failed");
  nghttp2_session_callbacks_set_on_header_callback(g_cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(g_cbs,
                                                            on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(g_cbs,
                                                         on_stream_close);
}

/* ---- connection I/O
 * -------------------------------------------------------------------- */

static void conn_mark_dirty(conn_t *c) {
  if (c->dirty || c->state != C_READY)
    return;
  c->dirty = 1;
  c->next_dirty = c->b->dirty;
  c->b->dirty = c;
}

static void on_write(uv_write_t *w, int status) {
  conn_t *c = container_of(w, conn_t, wreq);
  c->writing = 0;
  c->wlen = 0;
  if (c->state != C_READY)
    return;
  if (status < 0) {
    conn_fail(c, uv_strerror(status));
    return;
  }
  if (nghttp2_session_want_write(c->h2))
    conn_mark_dirty(c);
}

/* Gathers what nghttp2 has to send and starts one write. */
static void conn_flush(conn_t *c) {
  if (c->writing || c->state != C_READY)
    return;
  for (;;) {
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(c->h2, &data);
    if (n < 0) {
      conn_fail(c, nghttp2_strerror((int)n));
      return;
    }
    if (n == 0)
      break;
    if (c->wlen + (size_t)n > c->wcap) {
      size_t cap = c->wcap ? c->wcap : 16384;
      while (cap < c->wlen + (size_t)n)
        cap *= 2;
      uint8_t *p = realloc(c->wbuf, cap);
      if (!p)
        die("out of memory");
      c->wbuf = p;
      c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, data, (size_t)n);
    c->wlen += (size_t)n;
    if (c->wlen >= WBUF_SOFT_MAX)
      break;
  }
  if (c->wlen == 0) {
    if (!nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2))
      conn_fail(c, "session ended (GOAWAY)");
    return;
  }
  uv_buf_t buf = uv_buf_init((char *)c->wbuf, (unsigned)c->wlen);
  int rv = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
  if (rv < 0) {
    c->wlen = 0;
    conn_fail(c, uv_strerror(rv));
    return;
  }
  c->writing = 1;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  *buf = uv_buf_init((char *)g_rbuf, sizeof(g_rbuf));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = container_of((uv_tcp_t *)st, conn_t, tcp);
  if (nread == 0)
    return;
  if (nread < 0) {
    conn_fail(c, nread == UV_EOF ? "peer closed" : uv_strerror((int)nread));
    return;
  }
  ssize_t rv = nghttp2_session_mem_recv(c->h2, (const uint8_t *)buf->base,
                                        (size_t)nread);
  if (c->state != C_READY)
    return;
  if (rv < 0) {
    conn_fail(c, nghttp2_strerror((int)rv));
    return;
  }
  conn_mark_dirty(c);
}

static void conn_teardown(conn_t *c, const char *why, int count_lost) {
  bench_t *b = c->b;
  if (c->state == C_READY || c->state == C_CONNECTING) {
    int was_ready = c->state == C_READY;
    c->state = C_CLOSING;
    while (c->streams) {
      stream_t *s = c->streams;
      if (c->h2)
        nghttp2_session_set_stream_user_data(c->h2, s->id, NULL);
      if (!count_lost)
        s->done = 1;
      stream_finish(c, s, 0, count_lost);
    }
    if (c->h2) {
      nghttp2_session_del(c->h2);
      c->h2 = NULL;
    }
    if (was_ready)
      b->connected--;
    if (count_lost && !b->stopping && !b->idle_conns)
      fprintf(stderr, "zm-bench: connection %d lost: %s\n", c->idx, why);
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
  }
}

static void on_retry_timer(uv_timer_t *t) {
  conn_t *c = t->data;
  uv_close((uv_handle_t *)t, (uv_close_cb)free);
  c->retry = NULL;
  if (!c->b->stopping && c->state == C_IDLE)
    conn_start(c);
}

static void on_tcp_closed(uv_handle_t *h) {
  conn_t *c = container_of((uv_tcp_t *)h, conn_t, tcp);
  bench_t *b = c->b;
  c->state = C_IDLE;
  c->writing = 0;
  c->wlen = 0;
  if (!b->stopping && b->started && !b->idle_conns &&
      c->reconnects < MAX_RECONNECTS) {
    c->reconnects++;
    c->retry = xmalloc(sizeof(*c->retry));
    uv_timer_init(b->loop, c->retry);
    c->retry->data = c;
    uv_timer_start(c->retry, on_retry_timer, RECONNECT_MS, 0);
    return;
  }
  maybe_finish(b);
}

static void conn_fail(conn_t *c, const char *why) {
  if (c->state == C_CONNECTING) {
    transport_error(c->b, TE_CONNECT, why);
    c->b->connecting--;
    c->b->connect_failed++;
  }
  conn_teardown(c, why, 1);
  pump(c->b);
}

static void on_connect(uv_connect_t *req, int status) {
  conn_t *c = container_of(req, conn_t, creq);
  bench_t *b = c->b;
  if (c->state != C_CONNECTING)
    return;
  if (status < 0) {
    conn_fail(c, uv_strerror(status));
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  int rv = nghttp2_session_client_new(&c->h2, g_cbs, c);
  if (rv != 0)
    die("nghttp2_session_client_new: %s", nghttp2_strerror(rv));
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW},
  };
  nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, ZMB_ARRAY_SIZE(iv));
  nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0,
                                        H2_CONN_WINDOW);
  c->state = C_READY;
  b->connecting--;
  b->connected++;
  if ((rv = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) < 0) {
    conn_fail(c, uv_strerror(rv));
    return;
  }
  conn_mark_dirty(c);
  if (b->idle_conns) {
    /* One health call proves the h2 + gRPC path on this connection. */
    issue(c, uv_hrtime());
    return;
  }
  pump(b);
}

static void conn_start(conn_t *c) {
  bench_t *b = c->b;
  int rv;
  c->state = C_CONNECTING;
  b->connecting++;
  if ((rv = uv_tcp_init(b->loop, &c->tcp)) < 0)
    die("uv_tcp_init: %s", uv_strerror(rv));
  rv = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&b->addr,
                      on_connect);
  if (rv < 0) {
    transport_error(b, TE_CONNECT, uv_strerror(rv));
    b->connecting--;
    b->connect_failed++;
    c->state = C_CLOSING;
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
  }
}

/* ---- issuing
 * ---------------------------------------------------------------------------
 */

static int issue(conn_t *c, uint64_t t_intended) {
  bench_t *b = c->b;
  char tmo[32];
  stream_t *s = calloc(1, sizeof(*s));
  if (!s)
    die("out of memory");
  s->c = c;
  s->grpc_status = -1;
  fill_req(b, c, s, b->idle_conns ? ZMB_OP_HEALTH : pick_op(b));
  s->out_len = zmb_req_encode(&s->req, s->out, sizeof(s->out));
  ZMB_CHECK(s->out_len > 0);
  const char *path = zmb_op_path(s->req.op);
#define NV(n, v)                                                               \
  {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v),                   \
   NGHTTP2_NV_FLAG_NO_COPY_NAME}
  nghttp2_nv hdrs[8] = {
      NV(":method", "POST"),
      NV(":scheme", "http"),
      NV(":authority", b->authority),
      NV(":path", path),
      NV("content-type", "application/grpc"),
      NV("te", "trailers"),
      NV("user-agent", "zm-bench/1"),
  };
  size_t nh = 7;
  if (b->timeout_ms > 0) {
    snprintf(tmo, sizeof(tmo), "%dm", b->timeout_ms);
    hdrs[nh++] = (nghttp2_nv)NV("grpc-timeout", tmo);
  }
#undef NV
  nghttp2_data_provider prd = {.source.ptr = s,
                               .read_callback = on_data_source_read};
  int32_t id = nghttp2_submit_request(c->h2, NULL, hdrs, nh, &prd, s);
  if (id < 0) {
    transport_error(b, TE_SUBMIT, nghttp2_strerror(id));
    stream_free(s);
    return -1;
  }
  uint64_t now = uv_hrtime();
  s->id = id;
  s->t_start = b->rate > 0 ? t_intended : now;
  s->deadline =
      now + (uint64_t)(b->timeout_ms > 0 ? b->timeout_ms + 1000
                                         : DEFAULT_CLIENT_TIMEOUT_MS) *
                1000000ull;
  s->next = c->streams;
  if (c->streams)
    c->streams->prev = s;
  c->streams = s;
  c->inflight++;
  b->inflight++;
  b->issued++;
  conn_mark_dirty(c);
  return 0;
}

/* May another request be issued now? (count limit, stop flag) */
static int may_issue(bench_t *b) {
  if (b->stopping || !b->started)
    return 0;
  if (b->count && b->issued >= b->count)
    return 0;
  return 1;
}

/* Arms the pacer at the intended time of the next request (uv_hrtime and
 * the timerfd share CLOCK_MONOTONIC). A due time already past fires at once. */
static void arm_pacer(bench_t *b) {
  if (b->pacer_fd < 0 || b->stopping || (b->count && b->issued >= b->count))
    return;
  uint64_t due = b->t0 + (uint64_t)((double)b->issued * 1e9 / b->rate);
  struct itimerspec its = {0};
  its.it_value.tv_sec = (time_t)(due / 1000000000u);
  its.it_value.tv_nsec = (long)(due % 1000000000u);
  if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
    its.it_value.tv_nsec = 1;
  if (timerfd_settime(b->pacer_fd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
    die("timerfd_settime: %s", strerror(errno));
}

/* Keeps the configured load: closed loop fills every connection up to -m;
 * open loop sends every request whose intended time has come, as long as a
 * connection has a free stream slot (a backlog keeps its intended times). */
static void pump(bench_t *b) {
  if (b->idle_conns || !b->started)
    return;
  uint64_t now = uv_hrtime();
  /* Closed loop stops issuing at the end of the window; open loop once
   * the next intended send time is past it (below). */
  if (!b->count && !b->stopping && b->rate <= 0 && now >= b->t_we) {
    b->stopping = 1;
    b->t_stop = now;
  }
  if (b->rate <= 0) {
    for (int i = 0; i < b->nconns && may_issue(b); i++) {
      conn_t *c = &b->cv[i];
      while (c->state == C_READY && c->inflight < b->streams && may_issue(b))
        if (issue(c, now) != 0)
          break;
    }
  } else {
    double per_ns = b->rate / 1e9;
    while (may_issue(b)) {
      uint64_t due = b->t0 + (uint64_t)((double)b->issued / per_ns);
      if (due > now)
        break;
      if (!b->count && due >= b->t_we) {
        b->stopping = 1;
        b->t_stop = now;
        break;
      }
      int sent = 0;
      for (int k = 0; k < b->nconns; k++) {
        conn_t *c = &b->cv[(b->rr + k) % b->nconns];
        if (c->state == C_READY && c->inflight < b->streams) {
          b->rr = (b->rr + k + 1) % b->nconns;
          sent = issue(c, due) == 0;
          break;
        }
      }
      if (!sent)
        break;
    }
    arm_pacer(b);
    /* Whatever is still due but unsent at the end has no free stream: it
     * is reported as open-loop backlog, not sent late. */
    if (!b->count && !b->stopping && now >= b->t_we) {
      b->stopping = 1;
      b->t_stop = now;
    }
  }
  maybe_finish(b);
}

/* ---- run control
 * ------------------------------------------------------------------------- */

static void finish(bench_t *b) {
  if (b->finished)
    return;
  b->finished = 1;
  b->stopping = 1;
  uv_prepare_stop(&b->prep);
  if (b->pacer_fd >= 0)
    uv_poll_stop(&b->pacer);
  uv_idle_stop(&b->spinner);
  uv_timer_stop(&b->tick);
  uv_timer_stop(&b->hold_timer);
  for (int i = 0; i < b->nconns; i++) {
    conn_t *c = &b->cv[i];
    if (c->retry) {
      uv_timer_stop(c->retry);
      uv_close((uv_handle_t *)c->retry, (uv_close_cb)free);
      c->retry = NULL;
    }
    while (c->streams) {
      stream_t *s = c->streams;
      transport_error(b, TE_UNFINISHED, zmb_op_name(s->req.op));
      s->done = 1;
      if (c->h2)
        nghttp2_session_set_stream_user_data(c->h2, s->id, NULL);
      stream_finish(c, s, 0, 0);
    }
    conn_teardown(c, "done", 0);
  }
}

static void maybe_finish(bench_t *b) {
  if (b->finished || b->idle_conns || !b->started)
    return;
  if (b->count && b->issued >= b->count && b->inflight == 0)
    b->finish_requested = 1;
  else if (!b->count && b->stopping && b->inflight == 0)
    b->finish_requested = 1;
  else if (b->connected == 0 && b->connecting == 0 && b->inflight == 0) {
    int pending = 0;
    for (int i = 0; i < b->nconns; i++)
      pending |= b->cv[i].retry != NULL;
    if (!pending)
      b->finish_requested = 1; /* every connection is gone for good */
  }
}

static void on_prepare(uv_prepare_t *p) {
  bench_t *b = p->data;
  if (b->rate > 0)
    pump(b);
  if (b->finish_requested) {
    finish(b);
    return;
  }
  while (b->dirty) {
    conn_t *c = b->dirty;
    b->dirty = c->next_dirty;
    c->dirty = 0;
    c->next_dirty = NULL;
    conn_flush(c);
  }
}

static void on_spin(uv_idle_t *h) { (void)h; }

/* Open loop: wakes the loop at the next intended send time with ns
 * precision (libuv timers tick in ms, which would send due requests in 1 ms
 * bursts and add up to 1 ms to their latency). */
static void on_pacer(uv_poll_t *p, int status, int events) {
  bench_t *b = p->data;
  uint64_t expirations;
  (void)status;
  (void)events;
  if (read(b->pacer_fd, &expirations, sizeof(expirations)) < 0 &&
      errno != EAGAIN)
    die("timerfd read: %s", strerror(errno));
  pump(b);
}

static void on_hold_done(uv_timer_t *t) {
  bench_t *b = t->data;
  finish(b);
}

static void idle_connect_more(bench_t *b) {
  while (b->next_idle_conn < b->nconns && b->connecting < IDLE_CONNECT_BATCH) {
    conn_start(&b->cv[b->next_idle_conn++]);
  }
}

/* 10 ms tick: client deadlines, the end of duration runs, open-loop pacing,
 * idle-mode progress. */
static void on_tick(uv_timer_t *t) {
  bench_t *b = t->data;
  uint64_t now = uv_hrtime();
  if (b->idle_conns) {
    idle_connect_more(b);
    int settled = b->idle_ready + b->idle_failed + b->connect_failed;
    if (!b->ready_printed && b->next_idle_conn == b->nconns &&
        settled >= b->nconns) {
      b->ready_printed = 1;
      b->t_we = now;
      printf("READY %d\n", b->idle_ready);
      fflush(stdout);
      uv_timer_start(&b->hold_timer, on_hold_done, (uint64_t)(b->hold * 1000.0),
                     0);
    }
  } else if (!b->started && b->connecting == 0) {
    if (b->connected == 0)
      die("could not connect to %s:%d", b->host, b->port);
    b->started = 1;
    b->t0 = now;
    b->t_ws = now + (uint64_t)(b->warmup * 1e9);
    b->t_we = b->t_ws + (uint64_t)(b->duration * 1e9);
    pump(b);
  } else if (b->started) {
    pump(b);
    if (b->stopping && now > b->t_stop + (uint64_t)DRAIN_MAX_MS * 1000000ull)
      finish(b);
  }
  /* Client-side deadlines. */
  for (int i = 0; i < b->nconns && !b->finished; i++) {
    conn_t *c = &b->cv[i];
    for (stream_t *s = c->streams; s; s = s->next) {
      if (!s->done && now > s->deadline) {
        s->done = 1;
        idle_settle(c, 0);
        transport_error(b, TE_TIMEOUT, zmb_op_name(s->req.op));
        if (c->h2) {
          nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->id,
                                    NGHTTP2_CANCEL);
          conn_mark_dirty(c);
        }
      }
    }
  }
}

/* ---- reporting
 * ------------------------------------------------------------------------------
 */

static double run_seconds(const bench_t *b) {
  if (b->count) {
    uint64_t end = b->t_last_done > b->t0 ? b->t_last_done : b->t0;
    return (double)(end - b->t0) / 1e9;
  }
  return b->duration;
}

static void print_lat(FILE *f, const char *label, const zmb_hist_t *h) {
  fprintf(f,
          "%-26s min %9.1f  mean %9.1f  p50 %9.1f  p90 %9.1f  p99 %9.1f  "
          "p99.9 %9.1f  max %9.1f  (us)\n",
          label, h->total ? (double)h->min / 1e3 : 0.0, zmb_hist_mean(h) / 1e3,
          (double)zmb_hist_percentile(h, 50) / 1e3,
          (double)zmb_hist_percentile(h, 90) / 1e3,
          (double)zmb_hist_percentile(h, 99) / 1e3,
          (double)zmb_hist_percentile(h, 99.9) / 1e3, (double)h->max / 1e3);
}

static void json_lat(FILE *f, const zmb_hist_t *h) {
  fprintf(f,
          "{\"count\": %" PRIu64 ", \"min\": %.1f, \"mean\": %.1f, \"p50\": "
          "%.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, \"max\": %.1f}",
          h->total, h->total ? (double)h->min / 1e3 : 0.0,
          zmb_hist_mean(h) / 1e3, (double)zmb_hist_percentile(h, 50) / 1e3,
          (double)zmb_hist_percentile(h, 90) / 1e3,
          (double)zmb_hist_percentile(h, 99) / 1e3,
          (double)zmb_hist_percentile(h, 99.9) / 1e3, (double)h->max / 1e3);
}

static void report(bench_t *b) {
  double secs = run_seconds(b);
  double rps = secs > 0 ? (double)b->ok_total / secs : 0;
  if (!b->quiet && b->idle_conns) {
    printf("zm-bench: idle-conns -> %s:%d: %d connections, %d ready (health "
           "SERVING), held %.1f s\n",
           b->host, b->port, b->idle_conns, b->idle_ready, b->hold);
    print_lat(stdout, "health latency", &b->all);
  } else if (!b->quiet) {
    printf("zm-bench: %s -> %s:%d, %d conns x %d streams, %s", b->scenario,
           b->host, b->port, b->conns, b->streams,
           b->rate > 0 ? "open loop" : "closed loop");
    if (b->rate > 0)
      printf(" at %.0f req/s", b->rate);
    if (b->count)
      printf(", -n %" PRIu64 "\n", b->count);
    else
      printf(", %.1f s (+%.1f s warm-up)\n", b->duration, b->warmup);
    printf("requests: %" PRIu64 " verified in window, %" PRIu64
           " errors (all phases), %" PRIu64 " issued\n",
           b->ok_total, b->errors, b->issued);
    printf("throughput: %.1f req/s over %.3f s\n", rps, secs);
    print_lat(stdout, "latency (all)", &b->all);
    for (int i = 0; i < ZMB_OP__COUNT; i++) {
      if (!b->weights[i])
        continue;
      char label[64];
      snprintf(label, sizeof(label), "  %s (%" PRIu64 ")", zmb_op_name(i),
               b->ops[i].ok);
      print_lat(stdout, label, &b->ops[i].hist);
    }
    if (b->backlog_at_end)
      printf("open loop: %" PRIu64
             " due requests were never sent (all streams busy)\n",
             b->backlog_at_end);
  }
  if (!b->quiet) {
    printf("grpc-status seen:");
    for (int i = 0; i < ZMB_OP__COUNT; i++)
      for (int k = 0; k <= ZMB_GRPC_CODES; k++)
        if (b->ops[i].status[k])
          printf(" %s/%s=%" PRIu64, zmb_op_name(i),
                 k < ZMB_GRPC_CODES ? zmb_grpc_code_name(k) : "INVALID",
                 b->ops[i].status[k]);
    printf("\n");
    if (b->errors) {
      printf("errors: %" PRIu64 ":", b->errors);
      for (int k = 0; k <= ZMB_GRPC_CODES; k++)
        if (b->err_status[k])
          printf(" status_%s=%" PRIu64,
                 k < ZMB_GRPC_CODES ? zmb_grpc_code_name(k) : "INVALID",
                 b->err_status[k]);
      if (b->err_content)
        printf(" wrong_content=%" PRIu64, b->err_content);
      for (int k = 0; k < TE__COUNT; k++)
        if (b->err_transport[k])
          printf(" %s=%" PRIu64, TE_NAMES[k], b->err_transport[k]);
      printf("\nfirst error: %s\n", b->first_reason);
    } else {
      printf("errors: none\n");
    }
  }
  if (b->json_path) {
    FILE *f =
        strcmp(b->json_path, "-") == 0 ? stdout : fopen(b->json_path, "w");
    if (!f)
      die("cannot write %s: %s", b->json_path, strerror(errno));
    fprintf(f, "{\n  \"scenario\": \"%s\",\n  \"target\": \"%s:%d\",\n",
            b->scenario, b->host, b->port);
    fprintf(f,
            "  \"conns\": %d,\n  \"streams\": %d,\n  \"mode\": \"%s\",\n  "
            "\"rate\": %.1f,\n",
            b->conns, b->streams, b->rate > 0 ? "open" : "closed", b->rate);
    fprintf(f,
            "  \"requests\": %" PRIu64 ",\n  \"issued\": %" PRIu64
            ",\n  \"seconds\": %.6f,\n  \"rps\": %.1f,\n",
            b->ok_total, b->issued, secs, rps);
    if (b->idle_conns)
      fprintf(f, "  \"idle_conns\": %d,\n  \"idle_ready\": %d,\n",
              b->idle_conns, b->idle_ready);
    fprintf(f, "  \"latency_us\": ");
    json_lat(f, &b->all);
    fprintf(f, ",\n  \"ops\": {");
    int first = 1;
    for (int i = 0; i < ZMB_OP__COUNT; i++) {
      if (!b->weights[i] && !(b->idle_conns && i == ZMB_OP_HEALTH))
        continue;
      fprintf(f, "%s\n    \"%s\": {\"ok\": %" PRIu64 ", \"latency_us\": ",
              first ? "" : ",", zmb_op_name(i), b->ops[i].ok);
      json_lat(f, &b->ops[i].hist);
      fprintf(f, ", \"status\": {");
      int fk = 1;
      for (int k = 0; k <= ZMB_GRPC_CODES; k++)
        if (b->ops[i].status[k]) {
          fprintf(f, "%s\"%s\": %" PRIu64, fk ? "" : ", ",
                  k < ZMB_GRPC_CODES ? zmb_grpc_code_name(k) : "INVALID",
                  b->ops[i].status[k]);
          fk = 0;
        }
      fprintf(f, "}}");
      first = 0;
    }
    fprintf(f,
            "\n  },\n  \"errors\": {\"total\": %" PRIu64
            ", \"wrong_content\": %" PRIu64 ", \"by_status\": {",
            b->errors, b->err_content);
    int fk = 1;
    for (int k = 0; k <= ZMB_GRPC_CODES; k++)
      if (b->err_status[k]) {
        fprintf(f, "%s\"%s\": %" PRIu64, fk ? "" : ", ",
                k < ZMB_GRPC_CODES ? zmb_grpc_code_name(k) : "INVALID",
                b->err_status[k]);
        fk = 0;
      }
    fprintf(f, "}, \"transport\": {");
    fk = 1;
    for (int k = 0; k < TE__COUNT; k++)
      if (b->err_transport[k]) {
        fprintf(f, "%s\"%s\": %" PRIu64, fk ? "" : ", ", TE_NAMES[k],
                b->err_transport[k]);
        fk = 0;
      }
    fprintf(f, "}},\n  \"open_loop_unsent\": %" PRIu64 "\n}\n",
            b->backlog_at_end);
    if (f != stdout)
      fclose(f);
  }
}

/* ---- options
 * -----------------------------------------------------------------------------------
 */

static void usage(void) {
  fputs(
      "usage: zm-bench [options]\n"
      "  -c, --conns N          connections (default 1)\n"
      "  -m, --streams M        concurrent streams per connection (default 1)\n"
      "  -n, --requests N       fixed number of requests\n"
      "  -D, --duration S       measure for S seconds (default 5 when no -n)\n"
      "      --warmup S         seconds of load before measuring (default 0)\n"
      "      --rate R           open loop: R req/s in total (latency from the\n"
      "                         intended send time)\n"
      "      --pace timer|spin  open-loop pacing: timerfd wake-ups (default)\n"
      "                         or a busy loop (exact send times, one core)\n"
      "      --scenario NAME    resolve | extend | list | "
      "request-service-identity |\n"
      "                         create-agent | create-service | health | mixed "
      "(default "
      "resolve)\n"
      "      --mix SPEC         weights for mixed, e.g. "
      "resolve:80,extend:19,rsi:1\n"
      "      --target HOST:PORT (default 127.0.0.1:50051)\n"
      "      --keys K           preloaded keys zid-%06d, 0..K-1 (default "
      "100000)\n"
      "      --miss-ratio F     share of resolve/extend on unknown keys "
      "(default 0)\n"
      "      --page-size N      list page size (default 50)\n"
      "      --service-type T   RequestServiceIdentity service_type (default "
      "6)\n"
      "      --timeout-ms MS    grpc-timeout per call (client gives up at MS+1 "
      "s)\n"
      "      --json FILE        machine-readable results ('-' = stdout)\n"
      "      --allow-errors     exit 0 even if errors occurred\n"
      "      --seed N           key choice seed (default 1)\n"
      "      --idle-conns N     open N connections, one health call each, "
      "print\n"
      "                         READY <n>, hold them --hold S seconds\n"
      "      --quiet            no text report\n"
      "      --show-errors N    print the first N error reasons (default 5)\n",
      stderr);
}

static double parse_double(const char *s, const char *what) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !isfinite(v) || v < 0)
    die("bad %s '%s'", what, s);
  return v;
}

static long long parse_ll(const char *s, const char *what, long long lo,
                          long long hi) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi)
    die("bad %s '%s' (range %lld..%lld)", what, s, lo, hi);
  return v;
}

static void parse_mix(bench_t *b, const char *spec) {
  char *dup = xstrdup(spec), *save = NULL;
  memset(b->weights, 0, sizeof(b->weights));
  for (char *tok = strtok_r(dup, ",", &save); tok;
       tok = strtok_r(NULL, ",", &save)) {
    char *colon = strchr(tok, ':');
    if (!colon)
      colon = strchr(tok, '=');
    if (!colon)
      die("bad --mix entry '%s' (want name:weight)", tok);
    *colon = '\0';
    int op = zmb_op_parse(tok);
    if (op < 0)
      die("unknown operation '%s' in --mix", tok);
    b->weights[op] = (int)parse_ll(colon + 1, "mix weight", 0, 1000000);
  }
  free(dup);
}

enum {
  O_WARMUP = 256,
  O_RATE,
  O_SCENARIO,
  O_MIX,
  O_TARGET,
  O_KEYS,
  O_MISS,
  O_PAGE,
  O_STYPE,
  O_TIMEOUT,
  O_JSON,
  O_ALLOW,
  O_SEED,
  O_IDLE,
  O_HOLD,
  O_QUIET,
  O_SHOWERR,
  O_PACE,
};

static void parse_args(bench_t *b, int argc, char **argv) {
  static const struct option opts[] = {
      {"conns", required_argument, NULL, 'c'},
      {"streams", required_argument, NULL, 'm'},
      {"requests", required_argument, NULL, 'n'},
      {"duration", required_argument, NULL, 'D'},
      {"warmup", required_argument, NULL, O_WARMUP},
      {"warm-up-time", required_argument, NULL, O_WARMUP},
      {"rate", required_argument, NULL, O_RATE},
      {"scenario", required_argument, NULL, O_SCENARIO},
      {"mix", required_argument, NULL, O_MIX},
      {"target", required_argument, NULL, O_TARGET},
      {"keys", required_argument, NULL, O_KEYS},
      {"miss-ratio", required_argument, NULL, O_MISS},
      {"page-size", required_argument, NULL, O_PAGE},
      {"service-type", required_argument, NULL, O_STYPE},
      {"timeout-ms", required_argument, NULL, O_TIMEOUT},
      {"json", required_argument, NULL, O_JSON},
      {"allow-errors", no_argument, NULL, O_ALLOW},
      {"seed", required_argument, NULL, O_SEED},
      {"idle-conns", required_argument, NULL, O_IDLE},
      {"hold", required_argument, NULL, O_HOLD},
      {"quiet", no_argument, NULL, O_QUIET},
      {"show-errors", required_argument, NULL, O_SHOWERR},
      {"pace", required_argument, NULL, O_PACE},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0},
  };
  const char *target = "127.0.0.1:50051";
  const char *mix = "resolve:80,extend:19,request-service-identity:1";
  int have_mix = 0, opt;
  b->conns = 1;
  b->streams = 1;
  b->scenario = "resolve";
  b->keys = 100000;
  b->page_size = 50;
  b->service_type = 6; /* RUNNERS (3, the old RUNNER, is reserved) */
  b->seed = 1;
  b->verbose_errors = 5;
  b->duration = -1;
  while ((opt = getopt_long(argc, argv, "c:m:n:D:h", opts, NULL)) != -1) {
    switch (opt) {
    case 'c':
      b->conns = (int)parse_ll(optarg, "-c", 1, MAX_CONNS);
      break;
    case 'm':
      b->streams = (int)parse_ll(optarg, "-m", 1, 100000);
      break;
    case 'n':
      b->count = (uint64_t)parse_ll(optarg, "-n", 1, (long long)1 << 50);
      break;
    case 'D':
      b->duration = parse_double(optarg, "-D");
      break;
    case O_WARMUP:
      b->warmup = parse_double(optarg, "--warmup");
      break;
    case O_RATE:
      b->rate = parse_double(optarg, "--rate");
      break;
    case O_SCENARIO:
      b->scenario = optarg;
      break;
    case O_MIX:
      mix = optarg;
      have_mix = 1;
      break;
    case O_TARGET:
      target = optarg;
      break;
    case O_KEYS:
      b->keys = parse_ll(optarg, "--keys", 1, 100000000);
      break;
    case O_MISS:
      b->miss_ratio = parse_double(optarg, "--miss-ratio");
      if (b->miss_ratio > 1)
        die("--miss-ratio must be in 0..1");
      break;
    case O_PAGE:
      b->page_size = (int)parse_ll(optarg, "--page-size", 0, 1000);
      break;
    case O_STYPE:
      b->service_type = (int)parse_ll(optarg, "--service-type", 0, 1000);
      break;
    case O_TIMEOUT:
      b->timeout_ms = (int)parse_ll(optarg, "--timeout-ms", 1, 99999999);
      break;
    case O_JSON:
      b->json_path = optarg;
      break;
    case O_ALLOW:
      b->allow_errors = 1;
      break;
    case O_SEED:
      b->seed = (uint64_t)parse_ll(optarg, "--seed", 0, INT64_MAX);
      break;
    case O_IDLE:
      b->idle_conns = (int)parse_ll(optarg, "--idle-conns", 1, MAX_CONNS);
      break;
    case O_HOLD:
      b->hold = parse_double(optarg, "--hold");
      break;
    case O_QUIET:
      b->quiet = 1;
      break;
    case O_SHOWERR:
      b->verbose_errors = (int)parse_ll(optarg, "--show-errors", 0, 1000000);
      break;
    case O_PACE:
      if (strcmp(optarg, "spin") == 0)
        b->spin = 1;
      else if (strcmp(optarg, "timer") == 0)
        b->spin = 0;
      else
        die("--pace: expected timer or spin");
      break;
    case 'h':
      usage();
      exit(0);
    default:
      usage();
      exit(2);
    }
  }
  if (optind != argc)
    die("unexpected argument '%s'", argv[optind]);
  if (b->count && b->duration >= 0)
    die("-n and -D are exclusive");
  if (!b->count && b->duration < 0)
    b->duration = 5;
  if (!b->count && b->duration <= 0 && !b->idle_conns)
    die("-D must be > 0");

  /* scenario -> weights */
  if (strcmp(b->scenario, "mixed") == 0 || have_mix) {
    parse_mix(b, mix);
    if (strcmp(b->scenario, "mixed") != 0)
      die("--mix needs --scenario mixed");
  } else {
    int op = zmb_op_parse(b->scenario);
    if (op < 0)
      die("unknown scenario '%s'", b->scenario);
    b->scenario = zmb_op_name(op);
    b->weights[op] = 1;
  }
  if (b->idle_conns) {
    memset(b->weights, 0, sizeof(b->weights));
    b->weights[ZMB_OP_HEALTH] = 1;
    b->scenario = "idle-conns";
  }
  for (int i = 0; i < ZMB_OP__COUNT; i++)
    b->weight_sum += b->weights[i];
  if (b->weight_sum <= 0)
    die("all scenario weights are 0");

  /* target */
  const char *colon = strrchr(target, ':');
  if (!colon || colon == target || (size_t)(colon - target) >= sizeof(b->host))
    die("bad --target '%s' (want host:port)", target);
  memcpy(b->host, target, (size_t)(colon - target));
  b->host[colon - target] = '\0';
  if (b->host[0] == '[') { /* [v6]:port */
    size_t n = strlen(b->host);
    if (n < 2 || b->host[n - 1] != ']')
      die("bad --target '%s'", target);
    memmove(b->host, b->host + 1, n - 2);
    b->host[n - 2] = '\0';
  }
  b->port = (int)parse_ll(colon + 1, "port", 1, 65535);
  snprintf(b->authority, sizeof(b->authority), "%s", target);
  b->rng = b->seed * 0x9E3779B97F4A7C15ull + 1;
}

static void resolve_target(bench_t *b) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
  char port[16];
  snprintf(port, sizeof(port), "%d", b->port);
  int rv = getaddrinfo(b->host, port, &hints, &res);
  if (rv != 0 || !res)
    die("cannot resolve %s: %s", b->host, gai_strerror(rv));
  memcpy(&b->addr, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
}

/* Idle mode and many connections need file descriptors: take the hard max. */
static void raise_nofile(int need) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)need + 64 > rl.rlim_cur)
    fprintf(stderr,
            "zm-bench: warning: RLIMIT_NOFILE %llu may be too low for %d "
            "connections\n",
            (unsigned long long)rl.rlim_cur, need);
}

/* ---- main
 * -----------------------------------------------------------------------------------------
 */

int main(int argc, char **argv) {
  bench_t *b = calloc(1, sizeof(*b));
  if (!b)
    die("out of memory");
  parse_args(b, argc, argv);
  b->start_s = (uint64_t)time(NULL);
  resolve_target(b);
  for (int i = 0; i < ZMB_OP__COUNT; i++)
    zmb_hist_reset(&b->ops[i].hist);
  zmb_hist_reset(&b->all);

  b->nconns = b->idle_conns ? b->idle_conns : b->conns;
  raise_nofile(b->nconns);
  b->cv = calloc((size_t)b->nconns, sizeof(conn_t));
  if (!b->cv)
    die("out of memory");
  make_callbacks();
  b->loop = uv_default_loop();
  uv_prepare_init(b->loop, &b->prep);
  b->prep.data = b;
  uv_prepare_start(&b->prep, on_prepare);
  uv_timer_init(b->loop, &b->tick);
  b->tick.data = b;
  b->pacer_fd = -1;
  if (b->rate > 0) {
    b->pacer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (b->pacer_fd < 0)
      die("timerfd_create: %s", strerror(errno));
    uv_poll_init(b->loop, &b->pacer, b->pacer_fd);
    b->pacer.data = b;
    uv_poll_start(&b->pacer, UV_READABLE, on_pacer);
  }
  /* --pace spin: an active idle handle makes poll non-blocking, so the
   * prepare handle sends each request right at its due time instead of
   * after a timer wake-up (50-150 us on a VM), at the price of a busy core. */
  uv_idle_init(b->loop, &b->spinner);
  if (b->rate > 0 && b->spin)
    uv_idle_start(&b->spinner, on_spin);
  uv_timer_init(b->loop, &b->hold_timer);
  b->hold_timer.data = b;
  /* The tick checks deadlines and run phases; the pacer paces open loop. */
  uv_timer_start(&b->tick, on_tick, 1, 10);

  for (int i = 0; i < b->nconns; i++) {
    b->cv[i].b = b;
    b->cv[i].idx = i;
  }
  if (b->idle_conns)
    idle_connect_more(b);
  else
    for (int i = 0; i < b->nconns; i++)
      conn_start(&b->cv[i]);

  uv_run(b->loop, UV_RUN_DEFAULT);

  if (b->rate > 0 && !b->count) {
    double want = (double)(b->t_we - b->t0) * b->rate / 1e9;
    if (want > (double)b->issued)
      b->backlog_at_end = (uint64_t)(want - (double)b->issued);
  }
  if (b->idle_conns && b->idle_ready < b->idle_conns) {
    char why[64];
    snprintf(why, sizeof(why), "%d of %d idle connections not ready",
             b->idle_conns - b->idle_ready, b->idle_conns);
    note_error(b, "%s", why);
  }
  report(b);
  uv_close((uv_handle_t *)&b->prep, NULL);
  uv_close((uv_handle_t *)&b->tick, NULL);
  if (b->pacer_fd >= 0)
    uv_close((uv_handle_t *)&b->pacer, NULL);
  uv_close((uv_handle_t *)&b->spinner, NULL);
  uv_close((uv_handle_t *)&b->hold_timer, NULL);
  uv_run(b->loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(b->loop);
  if (b->pacer_fd >= 0)
    close(b->pacer_fd);
  if (rc != 0)
    fprintf(stderr, "zm-bench: warning: loop not clean at exit\n");
  int rc_exit = b->errors && !b->allow_errors ? 1 : 0;
  for (int i = 0; i < b->nconns; i++) {
    free(b->cv[i].wbuf);
    free(b->cv[i].list_token);
    free(b->cv[i].list_last);
  }
  free(b->cv);
  free(b);
  nghttp2_session_callbacks_del(g_cbs);
  return rc_exit;
}
