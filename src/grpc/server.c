/*
 * server.c - the gRPC server: listener, HTTP/2 connections (nghttp2 over
 * uv_tcp), unary and streaming calls (framing, deadline, status, trailers),
 * per-method counters.
 *
 * Ownership, in one place:
 * - a connection owns its nghttp2 session and its uv_tcp handle; it is freed
 *   in the uv_close callback. It is never closed from inside an nghttp2
 *   callback: those only set flags, and the code that called into nghttp2
 *   (on_read, flush) closes afterwards.
 * - a call is owned jointly by its stream and its handler: it is freed when
 *   the stream is closed AND the handler has finished it (or was never
 *   given it). A stream that closes first detaches the call (conn = NULL) and
 *   marks it cancelled.
 * - streaming calls: the handler holds the call from the headers on; request
 *   messages are delivered as they complete (the request buffer keeps only
 *   an incomplete tail); responses queue in call->sq, which a deferred
 *   nghttp2 data provider drains; finishing queues the trailers behind them.
 * - writes: nghttp2 output of one loop turn is gathered into conn->out and
 *   flushed by one uv_prepare before the loop blocks; one uv_write in flight
 *   per connection; above ZM_CONN_OUT_SOFT_MAX we stop reading.
 */
#include "zm/grpc.h"
#include "zm/audit.h"
#include "zm/authz.h"
#include "zm/log.h"

#include "h2mem.h"
#include "limiter.h"
#include "tls_server.h"

#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <malloc.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>

/* One read buffer for every connection: nghttp2 consumes all it is given. */
#define ZM_READ_BUF_SIZE (64u * 1024)
/* Output gathered per connection before we stop pulling from nghttp2 and stop
 * reading from the peer (backpressure). */
#define ZM_CONN_OUT_SOFT_MAX (256u * 1024)
/* Request bytes buffered across all calls of one connection. Bounds memory
 * against a client opening many streams with large messages. */
#define ZM_CONN_RECV_BUDGET (32u * 1024 * 1024)
/* A connection that has not sent its preface / any frame within this is closed.
 */
#define ZM_HANDSHAKE_TIMEOUT_MS 10000u
/* Inline arena bytes per call: enough for every request/response of the
 * service without a second allocation. */
#define ZM_CALL_ARENA_INLINE 1536u
#define ZM_CALL_ARENA_BLOCK 8192u
/* grpc-message is truncated past this many encoded bytes. */
#define ZM_GRPC_MSG_MAX 1024u
/* Output buffer capacity an idle connection may keep. */
#define ZM_CONN_KEEP_BUF 0u
/* Calls kept for reuse instead of free()/malloc() per call. */
#define ZM_CALL_FREELIST_MAX 1024u
/* Output a connection may gather while its peer does not read: beyond it
 * nghttp2 is not asked for more (its own queues are bounded too), and a
 * write pending longer than cfg.write_stall_ms closes the connection. */
#define ZM_CONN_OUT_HARD_MAX (4u * 1024 * 1024)
/* Refusals of connections over the cap are logged at most this often. */
#define ZM_REFUSE_LOG_MS 10000u

typedef struct zm_conn zm_conn_t;

typedef enum {
  CALL_HEADERS,   /* receiving headers */
  CALL_RECEIVING, /* headers ok, receiving the request message */
  CALL_HANDLER,   /* handler holds the call */
  CALL_FINISHED,  /* response (or error) submitted / client gone */
} call_state_t;

typedef struct arena_block {
  struct arena_block *next;
  size_t cap, used;
  char data[];
} arena_block_t;

struct zm_call {
  zm_grpc_server_t *srv;
  zm_conn_t *conn;        /* NULL once the stream closed (detached) */
  zm_call_t *prev, *next; /* conn->calls */
  int32_t stream_id;
  call_state_t state;
  unsigned handler_holds : 1;
  unsigned stream_closed : 1;
  unsigned cancelled : 1;
  unsigned end_stream_seen : 1;
  unsigned bad_method : 1;
  unsigned bad_ctype : 1;
  unsigned compressed_ok : 1; /* grpc-encoding identity or absent */
  unsigned bad_timeout : 1;
  unsigned failed_early : 1; /* an error was already submitted */
  unsigned resp_heap : 1;    /* resp was malloc'd (not in the arena) */
  unsigned rst_after : 1;    /* RST_STREAM(NO_ERROR) once the answer is out */
  unsigned streaming : 1;    /* a streaming method */
  unsigned headers_sent : 1; /* streaming: response headers submitted */
  unsigned fin_pending : 1;  /* streaming: trailers follow the queue */
  unsigned recorded : 1;     /* counted in the method stats */
  const zm_grpc_method_t *method;
  const ProtobufCMessage *req; /* unary: the decoded request (arena) */
  uint64_t id;
  uint64_t start_ns; /* uv_hrtime() at the request headers */
  uint8_t *sq;       /* streaming: framed messages to send (malloc'd) */
  size_t sq_len, sq_off, sq_cap;
  zm_grpc_status_t fin_status;
  char *fin_msg;          /* percent-encoded, malloc'd */
  uint64_t deadline;      /* uv_now() ms, 0 = none */
  uint64_t recv_deadline; /* uv_now() ms the request must be in by, 0 = none */
  uint64_t heap_key;      /* the time the heap orders by */
  size_t heap_idx;        /* position in srv->heap, SIZE_MAX if not there */
  const char *caller;     /* arena copy at dispatch ("" = no identity) */
  const char *peer;       /* arena copy at dispatch */
  zm_lim_entry_t *lim;    /* admitted by the per-caller limiter, or NULL */
  uint8_t *rbuf;          /* request bytes (malloc'd), rlen used */
  size_t rlen, rcap;
  uint8_t *resp; /* framed response (arena) */
  size_t resp_len, resp_off;
  void (*cancel_cb)(zm_call_t *c, void *data);
  void *cancel_data;
  arena_block_t *arena_extra;
  size_t arena_used;
  _Alignas(16) char arena[ZM_CALL_ARENA_INLINE];
};

typedef enum { CONN_OPEN, CONN_CLOSING } conn_state_t;

struct zm_conn {
  uv_tcp_t tcp;
  zm_grpc_server_t *srv;
  nghttp2_session *h2;
  zm_conn_t *prev, *next; /* srv->conns */
  zm_conn_t *dirty_next;  /* srv->dirty, valid while dirty */
  zm_call_t *calls;       /* open calls */
  conn_state_t state;
  unsigned dirty : 1;
  unsigned writing : 1;
  unsigned reading : 1;
  unsigned in_recv : 1;
  unsigned close_after_flush : 1;
  unsigned got_frame : 1;
  unsigned goaway_sent : 1;
  unsigned n_calls;
  size_t recv_buffered;
  uint64_t last_active;   /* uv_now() ms */
  uint64_t write_started; /* uv_now() ms of the write in flight */
  int32_t max_req_sid;    /* highest client stream id that sent HEADERS */
  zm_tls_srv_t *tls;      /* NULL = h2c */
  char peer[64];          /* "ip:port" */
  char *out;              /* gathered output */
  size_t out_len, out_cap;
  char *wr; /* output in flight */
  size_t wr_len, wr_cap;
  uv_write_t wreq;
};

struct zm_grpc_server {
  uv_loop_t *loop;
  zm_grpc_config_t cfg;
  char *address;
  zm_grpc_method_t *methods;
  size_t *path_lens;
  size_t n_methods;
  uv_tcp_t listener;
  uv_prepare_t flush;
  uv_timer_t tick;
  uv_timer_t deadline_timer;
  uv_timer_t grace_timer;
  unsigned open_handles;
  int listening;
  int port;
  zm_conn_t *conns;
  zm_conn_t *dirty;
  zm_call_t **heap;
  size_t heap_len, heap_cap;
  zm_call_t *freelist;
  size_t freelist_len;
  nghttp2_session_callbacks *cbs;
  nghttp2_option *opt;
  zm_tls_srv_ctx_t *tls_ctx; /* NULL = h2c; new connections take a ref */
  zm_authz_t *authz;         /* NULL = no policy */
  zm_limiter_t *limiter;     /* ZM_GRPC_M_COSTLY admission */
  uint64_t refused_logged_at, refused_unlogged;
  int draining;
  void (*drain_done)(void *data);
  void *drain_data;
  zm_grpc_stats_t stats;
  zm_grpc_method_stats_t *mstats; /* n_methods + 1 (unknown paths) */
  uint64_t call_seq;
  char readbuf[ZM_READ_BUF_SIZE];
};

/* Latency buckets: 100 us .. 60 s; enough resolution for the sub-ms hot
 * paths and for enrollments that take seconds. */
const double zm_grpc_latency_bounds_s[ZM_GRPC_LAT_BUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30,    60};
static const uint64_t LAT_BOUNDS_NS[ZM_GRPC_LAT_BUCKETS] = {
    100000ull,      250000ull,      500000ull,     1000000ull,    2500000ull,
    5000000ull,     10000000ull,    25000000ull,   50000000ull,   100000000ull,
    250000000ull,   500000000ull,   1000000000ull, 2500000000ull, 5000000000ull,
    10000000000ull, 30000000000ull, 60000000000ull};

static void conn_close(zm_conn_t *c);
static void conn_flush(zm_conn_t *c);
static void conn_mark_dirty(zm_conn_t *c);
static void call_free(zm_call_t *call);
static void call_cancel(zm_call_t *call);
static void drain_check(zm_grpc_server_t *srv);
static void on_deadline(uv_timer_t *t);
static int call_authorized(zm_call_t *call, const char *scope);
static int call_admitted(zm_call_t *call);
static const char *const *conn_names(const zm_conn_t *c, size_t *n);
static void call_record(zm_call_t *call, zm_grpc_status_t st);
static void stream_fin(zm_call_t *call, zm_grpc_status_t st, const char *msg);

/* ===================== arena ============================================ */

static void *call_alloc_soft(zm_call_t *c, size_t n);

/* Handlers' allocations (responses they build) abort on exhaustion, like
 * the rest of our code; decoding uses call_alloc_soft(). */
void *zm_call_alloc(zm_call_t *c, size_t n) {
  void *p = call_alloc_soft(c, n);
  if (p == NULL) {
    fprintf(stderr, "fatal: out of memory in a call arena (%zu bytes)\n", n);
    abort();
  }
  return p;
}

char *zm_call_strdup(zm_call_t *c, const char *s) {
  size_t n = strlen(s);
  char *p = zm_call_alloc(c, n + 1);
  memcpy(p, s, n + 1);
  return p;
}

/* Arena allocation that fails instead of aborting: what protobuf-c asks
 * for while decoding is driven by the client's input. */
static void *call_alloc_soft(zm_call_t *c, size_t n) {
  if (n > SIZE_MAX - 16)
    return NULL;
  n = (n + 15u) & ~(size_t)15u;
  if (c->arena_used + n <= sizeof c->arena) {
    void *p = c->arena + c->arena_used;
    c->arena_used += n;
    return p;
  }
  arena_block_t *b = c->arena_extra;
  if (b == NULL || b->used + n > b->cap) {
    size_t cap = n > ZM_CALL_ARENA_BLOCK ? n : ZM_CALL_ARENA_BLOCK;
    arena_block_t *nb = malloc(sizeof *nb + cap);
    if (nb == NULL)
      return NULL;
    nb->cap = cap;
    nb->used = 0;
    nb->next = b;
    c->arena_extra = b = nb;
  }
  void *p = b->data + b->used;
  b->used += n;
  return p;
}

static const char *call_strdup_soft(zm_call_t *c, const char *s) {
  size_t n = strlen(s);
  char *p = call_alloc_soft(c, n + 1);
  if (p == NULL)
    return "";
  memcpy(p, s, n + 1);
  return p;
}

static void *pb_alloc(void *data, size_t n) { return call_alloc_soft(data, n); }
static void pb_free(void *data, void *p) {
  (void)data;
  (void)p;
}

/* ===================== deadline heap ===================================== */

static void heap_swap(zm_call_t **h, size_t a, size_t b) {
  zm_call_t *t = h[a];
  h[a] = h[b];
  h[b] = t;
  h[a]->heap_idx = a;
  h[b]->heap_idx = b;
}

static void heap_up(zm_call_t **h, size_t i) {
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (h[p]->heap_key <= h[i]->heap_key)
      break;
    heap_swap(h, p, i);
    i = p;
  }
}

static void heap_down(zm_call_t **h, size_t len, size_t i) {
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    if (l < len && h[l]->heap_key < h[m]->heap_key)
      m = l;
    if (r < len && h[r]->heap_key < h[m]->heap_key)
      m = r;
    if (m == i)
      return;
    heap_swap(h, i, m);
    i = m;
  }
}

static void deadline_arm(zm_grpc_server_t *srv) {
  if (srv->heap_len == 0) {
    uv_timer_stop(&srv->deadline_timer);
    return;
  }
  uint64_t now = uv_now(srv->loop), d = srv->heap[0]->heap_key;
  uv_timer_start(&srv->deadline_timer, on_deadline, d > now ? d - now : 0, 0);
}

static void heap_remove(zm_grpc_server_t *srv, zm_call_t *call) {
  size_t i = call->heap_idx;
  if (i == SIZE_MAX)
    return;
  call->heap_idx = SIZE_MAX;
  srv->heap_len--;
  if (i != srv->heap_len) {
    srv->heap[i] = srv->heap[srv->heap_len];
    srv->heap[i]->heap_idx = i;
    heap_up(srv->heap, i);
    heap_down(srv->heap, srv->heap_len, srv->heap[i]->heap_idx);
  }
}

/* Returns 0, or -1 when the heap cannot grow. */
static int heap_insert(zm_grpc_server_t *srv, zm_call_t *call) {
  if (srv->heap_len == srv->heap_cap) {
    size_t cap = srv->heap_cap ? srv->heap_cap * 2 : 64;
    zm_call_t **h = realloc(srv->heap, cap * sizeof *srv->heap);
    if (h == NULL)
      return -1;
    srv->heap = h;
    srv->heap_cap = cap;
  }
  call->heap_idx = srv->heap_len;
  srv->heap[srv->heap_len++] = call;
  heap_up(srv->heap, call->heap_idx);
  return 0;
}

/* (Re)files the call under the earliest of its deadlines that applies in
 * its state: the receive deadline only while the request is arriving. */
static void heap_update(zm_grpc_server_t *srv, zm_call_t *call) {
  heap_remove(srv, call);
  uint64_t k = call->deadline;
  if ((call->state == CALL_HEADERS || call->state == CALL_RECEIVING) &&
      call->recv_deadline != 0 && (k == 0 || call->recv_deadline < k))
    k = call->recv_deadline;
  if (k == 0)
    return;
  call->heap_key = k;
  /* a full heap leaves the call without a deadline of ours: the client's
   * own deadline still applies on its side */
  if (heap_insert(srv, call) == 0 && srv->heap[0] == call)
    deadline_arm(srv);
}

/* ===================== responses ======================================== */

static ssize_t on_data_read(nghttp2_session *s, int32_t sid, uint8_t *buf,
                            size_t len, uint32_t *flags,
                            nghttp2_data_source *src, void *ud) {
  (void)ud;
  zm_call_t *call = src->ptr;
  size_t n = call->resp_len - call->resp_off;
  if (n > len)
    n = len;
  memcpy(buf, call->resp + call->resp_off, n);
  call->resp_off += n;
  if (call->resp_off == call->resp_len) {
    static const nghttp2_nv trailers[] = {
        {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1,
         NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE}};
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    if (nghttp2_submit_trailer(s, sid, trailers, 1) != 0)
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  }
  return (ssize_t)n;
}

#define NV(n, v)                                                               \
  {                                                                            \
    (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1,              \
        NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE           \
  }

/* The request bytes are no longer needed (decoded, or the call is
 * answered): give them back to the budgets now, not at stream close. */
static void call_drop_request(zm_call_t *call) {
  if (call->rbuf == NULL)
    return;
  if (call->conn != NULL) {
    call->conn->recv_buffered -= call->rlen;
    call->srv->stats.buffered -= call->rlen;
  }
  zm_wipe(call->rbuf, call->rlen);
  free(call->rbuf);
  call->rbuf = NULL;
  call->rlen = call->rcap = 0;
}

/* Submits a Trailers-Only error response. */
static void submit_status(zm_call_t *call, zm_grpc_status_t st,
                          const char *msg) {
  zm_conn_t *c = call->conn;
  call_drop_request(call);
  char code[8], enc[ZM_GRPC_MSG_MAX];
  int codelen = snprintf(code, sizeof code, "%d", (int)st);
  size_t enclen = zm_grpc_pct_encode(msg ? msg : "", msg ? strlen(msg) : 0, enc,
                                     sizeof enc);
  nghttp2_nv hdrs[5] = {
      NV(":status", "200"),
      NV("content-type", "application/grpc"),
      {(uint8_t *)"grpc-status", (uint8_t *)code, 11, (size_t)codelen,
       NGHTTP2_NV_FLAG_NO_COPY_NAME},
      {(uint8_t *)"grpc-message", (uint8_t *)enc, 12, enclen,
       NGHTTP2_NV_FLAG_NO_COPY_NAME},
  };
  size_t n = enclen > 0 ? 4 : 3;
  call->state = CALL_FINISHED;
  call_record(call, st);
  if (c == NULL)
    return;
  /* No RST_STREAM after an early answer: gRPC clients treat any RST before
   * they finished sending as an error of its own; the rest of the request
   * is discarded as it arrives. */
  if (nghttp2_submit_response(c->h2, call->stream_id, hdrs, n, NULL) != 0)
    nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, call->stream_id,
                              NGHTTP2_INTERNAL_ERROR);
  conn_mark_dirty(c);
}

/* Ends the call with a status: after the queued messages of a streaming
 * call that sent its headers, else Trailers-Only. */
static void call_end(zm_call_t *call, zm_grpc_status_t st, const char *msg) {
  if (call->streaming && call->headers_sent)
    stream_fin(call, st, msg);
  else
    submit_status(call, st, msg);
}

static ssize_t on_text_read(nghttp2_session *s, int32_t sid, uint8_t *buf,
                            size_t len, uint32_t *flags,
                            nghttp2_data_source *src, void *ud) {
  (void)s;
  (void)sid;
  (void)ud;
  zm_call_t *call = src->ptr;
  size_t n = call->resp_len - call->resp_off;
  if (n > len)
    n = len;
  memcpy(buf, call->resp + call->resp_off, n);
  call->resp_off += n;
  if (call->resp_off == call->resp_len)
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

/* A request that is not gRPC (a plain GET, another content type): an HTTP
 * status and a short text body, which is what an HTTP client expects (and
 * keeps the stream open for its flow-control frames until the body is
 * read). */
static void submit_http_error(zm_call_t *call, const char *status,
                              const char *body) {
  zm_conn_t *c = call->conn;
  size_t bl = strlen(body);
  uint8_t *copy = malloc(bl);
  call->state = CALL_FINISHED;
  nghttp2_nv hdrs[2] = {{(uint8_t *)":status", (uint8_t *)status, 7,
                         strlen(status), NGHTTP2_NV_FLAG_NO_COPY_NAME},
                        NV("content-type", "text/plain; charset=utf-8")};
  if (copy == NULL) {
    nghttp2_submit_response(c->h2, call->stream_id, hdrs, 1, NULL);
  } else {
    memcpy(copy, body, bl);
    call->resp = copy;
    call->resp_heap = 1;
    call->resp_len = bl;
    call->resp_off = 0;
    nghttp2_data_provider dp = {.source.ptr = call,
                                .read_callback = on_text_read};
    nghttp2_submit_response(c->h2, call->stream_id, hdrs, 2, &dp);
  }
  conn_mark_dirty(c);
}

static zm_grpc_method_stats_t *call_mstats(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  size_t i = call->method != NULL ? (size_t)(call->method - srv->methods)
                                  : srv->n_methods;
  return &srv->mstats[i];
}

/* Counts the call's outcome once: its status and its latency. */
static void call_record(zm_call_t *call, zm_grpc_status_t st) {
  if (call->recorded)
    return;
  call->recorded = 1;
  zm_grpc_method_stats_t *m = call_mstats(call);
  m->by_status[(unsigned)st <= 16 ? (unsigned)st : ZM_GRPC_UNKNOWN]++;
  uint64_t ns = uv_hrtime() - call->start_ns;
  size_t b = 0;
  while (b < ZM_GRPC_LAT_BUCKETS && ns > LAT_BOUNDS_NS[b])
    b++;
  m->lat_counts[b]++;
  m->lat_sum_ns += ns;
}

static void call_handler_done(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  call->handler_holds = 0;
  if (call->lim != NULL) {
    zm_limiter_release(srv->limiter, call->lim);
    call->lim = NULL;
  }
  heap_remove(srv, call);
  if (srv->stats.calls_active > 0)
    srv->stats.calls_active--;
  zm_grpc_method_stats_t *m = call_mstats(call);
  if (m->inflight > 0)
    m->inflight--;
  if (call->stream_closed)
    call_free(call);
  if (srv->draining && srv->stats.calls_active == 0)
    drain_check(srv);
}

void zm_call_reply(zm_call_t *call, const ProtobufCMessage *resp) {
  ZM_ASSERT(call->handler_holds);
  if (call->streaming) {
    zm_call_send(call, resp);
    zm_call_finish(call, ZM_GRPC_OK, NULL);
    return;
  }
  if (call->method->on_finish != NULL)
    call->method->on_finish(call, call->req, ZM_GRPC_OK, resp,
                            call->method->ctx);
  if (call->conn != NULL && call->state == CALL_HANDLER) {
    call_record(call, ZM_GRPC_OK);
    size_t n = protobuf_c_message_get_packed_size(resp);
    uint8_t *buf = zm_call_alloc(call, n + 5);
    buf[0] = 0;
    buf[1] = (uint8_t)(n >> 24);
    buf[2] = (uint8_t)(n >> 16);
    buf[3] = (uint8_t)(n >> 8);
    buf[4] = (uint8_t)n;
    protobuf_c_message_pack(resp, buf + 5);
    call->resp = buf;
    call->resp_len = n + 5;
    call->resp_off = 0;
    static const nghttp2_nv hdrs[] = {NV(":status", "200"),
                                      NV("content-type", "application/grpc")};
    nghttp2_data_provider dp = {.source.ptr = call,
                                .read_callback = on_data_read};
    call->state = CALL_FINISHED;
    if (nghttp2_submit_response(call->conn->h2, call->stream_id, hdrs,
                                ZM_ARRAY_SIZE(hdrs), &dp) != 0)
      nghttp2_submit_rst_stream(call->conn->h2, NGHTTP2_FLAG_NONE,
                                call->stream_id, NGHTTP2_INTERNAL_ERROR);
    conn_mark_dirty(call->conn);
  }
  call_handler_done(call);
}

void zm_call_fail(zm_call_t *call, zm_grpc_status_t status, const char *msg) {
  zm_call_finish(call, status, msg);
}

void zm_call_finish(zm_call_t *call, zm_grpc_status_t status, const char *msg) {
  ZM_ASSERT(call->handler_holds);
  if (call->method->on_finish != NULL)
    call->method->on_finish(call, call->req, status, NULL, call->method->ctx);
  if (call->conn != NULL && call->state == CALL_HANDLER)
    call_end(call, status, msg);
  call_handler_done(call);
}

/* ===================== streaming responses =============================== */

static ssize_t on_stream_read(nghttp2_session *s, int32_t sid, uint8_t *buf,
                              size_t len, uint32_t *flags,
                              nghttp2_data_source *src, void *ud) {
  (void)ud;
  zm_call_t *call = src->ptr;
  size_t avail = call->sq_len - call->sq_off;
  if (avail == 0) {
    if (!call->fin_pending)
      return NGHTTP2_ERR_DEFERRED;
    char code[8];
    int codelen = snprintf(code, sizeof code, "%d", (int)call->fin_status);
    size_t mlen = call->fin_msg ? strlen(call->fin_msg) : 0;
    nghttp2_nv tr[2] = {
        {(uint8_t *)"grpc-status", (uint8_t *)code, 11, (size_t)codelen,
         NGHTTP2_NV_FLAG_NO_COPY_NAME},
        {(uint8_t *)"grpc-message", (uint8_t *)call->fin_msg, 12, mlen,
         NGHTTP2_NV_FLAG_NO_COPY_NAME},
    };
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    if (nghttp2_submit_trailer(s, sid, tr, mlen > 0 ? 2 : 1) != 0)
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
  }
  size_t n = avail < len ? avail : len;
  memcpy(buf, call->sq + call->sq_off, n);
  call->sq_off += n;
  if (call->sq_off == call->sq_len)
    call->sq_off = call->sq_len = 0;
  return (ssize_t)n;
}

/* Response headers with the queue as the body, or a wake-up of a data
 * provider that ran dry. */
static void stream_kick(zm_call_t *call) {
  zm_conn_t *c = call->conn;
  if (!call->headers_sent) {
    static const nghttp2_nv hdrs[] = {NV(":status", "200"),
                                      NV("content-type", "application/grpc")};
    nghttp2_data_provider dp = {.source.ptr = call,
                                .read_callback = on_stream_read};
    call->headers_sent = 1;
    if (nghttp2_submit_response(c->h2, call->stream_id, hdrs,
                                ZM_ARRAY_SIZE(hdrs), &dp) != 0)
      nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, call->stream_id,
                                NGHTTP2_INTERNAL_ERROR);
  } else {
    nghttp2_session_resume_data(c->h2, call->stream_id);
  }
  conn_mark_dirty(c);
}

static void stream_fin(zm_call_t *call, zm_grpc_status_t st, const char *msg) {
  char enc[ZM_GRPC_MSG_MAX];
  size_t n = zm_grpc_pct_encode(msg ? msg : "", msg ? strlen(msg) : 0, enc,
                                sizeof enc);
  call->fin_pending = 1;
  call->fin_status = st;
  free(call->fin_msg);
  call->fin_msg = n > 0 ? zm_xstrdup(enc) : NULL;
  call->state = CALL_FINISHED;
  call_record(call, st);
  if (call->conn != NULL)
    stream_kick(call);
}

int zm_call_send(zm_call_t *call, const ProtobufCMessage *msg) {
  ZM_ASSERT(call->handler_holds && call->streaming);
  if (call->conn == NULL || call->state != CALL_HANDLER || call->cancelled)
    return ZM_E_CANCELLED;
  if (call->sq_len - call->sq_off > ZM_GRPC_SENDQ_MAX)
    return ZM_E_UNAVAILABLE;
  size_t n = protobuf_c_message_get_packed_size(msg);
  if (call->sq_off > 0) {
    memmove(call->sq, call->sq + call->sq_off, call->sq_len - call->sq_off);
    call->sq_len -= call->sq_off;
    call->sq_off = 0;
  }
  if (call->sq_len + n + 5 > call->sq_cap) {
    size_t cap = call->sq_cap ? call->sq_cap : 256;
    while (cap < call->sq_len + n + 5)
      cap *= 2;
    call->sq = zm_xrealloc(call->sq, cap);
    call->sq_cap = cap;
  }
  uint8_t *p = call->sq + call->sq_len;
  p[0] = 0;
  p[1] = (uint8_t)(n >> 24);
  p[2] = (uint8_t)(n >> 16);
  p[3] = (uint8_t)(n >> 8);
  p[4] = (uint8_t)n;
  protobuf_c_message_pack(msg, p + 5);
  call->sq_len += n + 5;
  stream_kick(call);
  return 0;
}

size_t zm_call_send_queued(const zm_call_t *c) { return c->sq_len - c->sq_off; }
uint64_t zm_call_id(const zm_call_t *c) { return c->id; }

int zm_call_is_cancelled(const zm_call_t *c) { return c->cancelled; }

void zm_call_on_cancel(zm_call_t *c, void (*cb)(zm_call_t *, void *),
                       void *data) {
  c->cancel_cb = cb;
  c->cancel_data = data;
}

uint64_t zm_call_deadline(const zm_call_t *c) { return c->deadline; }
void *zm__call_cancel_data(const zm_call_t *c) { return c->cancel_data; }
const ProtobufCMessage *zm_call_request(const zm_call_t *c) { return c->req; }
void *zm_call_ctx(const zm_call_t *c) {
  return c->method ? c->method->ctx : NULL;
}
zm_grpc_server_t *zm_call_server(const zm_call_t *c) { return c->srv; }
const char *zm_call_path(const zm_call_t *c) {
  return c->method ? c->method->path : "?";
}
const char *zm_call_caller(const zm_call_t *c) {
  return c->caller ? c->caller : "";
}
const char *zm_call_peer(const zm_call_t *c) { return c->peer ? c->peer : ""; }

/* The client can no longer get an answer: tell the handler, once. */
static void call_cancel(zm_call_t *call) {
  if (call->cancelled)
    return;
  call->cancelled = 1;
  call->srv->stats.calls_cancelled++;
  if (call->handler_holds && call->cancel_cb != NULL) {
    void (*cb)(zm_call_t *, void *) = call->cancel_cb;
    call->cancel_cb = NULL;
    cb(call, call->cancel_data);
  }
}

/* ===================== call lifecycle =================================== */

static zm_call_t *call_new(zm_conn_t *c, int32_t sid) {
  zm_grpc_server_t *srv = c->srv;
  zm_call_t *call = srv->freelist;
  if (call != NULL) {
    srv->freelist = call->next;
    srv->freelist_len--;
  } else {
    call = malloc(sizeof *call);
    if (call == NULL)
      return NULL;
  }
  memset(call, 0, offsetof(zm_call_t, arena));
  call->srv = srv;
  call->conn = c;
  call->stream_id = sid;
  call->state = CALL_HEADERS;
  call->compressed_ok = 1;
  call->heap_idx = SIZE_MAX;
  call->next = c->calls;
  if (c->calls)
    c->calls->prev = call;
  c->calls = call;
  c->n_calls++;
  /* The whole request (headers included: a header block left open with
   * CONTINUATION never coming is the slowloris of HTTP/2) must arrive
   * within recv_timeout_ms. */
  if (srv->cfg.recv_timeout_ms != 0) {
    call->recv_deadline = uv_now(srv->loop) + srv->cfg.recv_timeout_ms;
    heap_update(srv, call);
  }
  return call;
}

static void call_unlink(zm_call_t *call) {
  zm_conn_t *c = call->conn;
  if (c == NULL)
    return;
  if (call->prev)
    call->prev->next = call->next;
  else
    c->calls = call->next;
  if (call->next)
    call->next->prev = call->prev;
  call->prev = call->next = NULL;
  c->n_calls--;
  c->recv_buffered -= call->rlen;
  call->srv->stats.buffered -= call->rlen;
  call->conn = NULL;
}

static void call_free(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  /* Responses may carry secrets (an enrolled identity's private key, an
   * enrollment JWT): the packed copy in the arena is wiped, not just freed. */
  if (call->resp != NULL)
    zm_wipe(call->resp, call->resp_len);
  if (call->resp_heap)
    free(call->resp);
  if (call->lim != NULL)
    zm_limiter_release(srv->limiter, call->lim);
  call_unlink(call);
  heap_remove(srv, call);
  zm_wipe(call->rbuf, call->rlen);
  free(call->rbuf);
  free(call->sq);
  free(call->fin_msg);
  for (arena_block_t *b = call->arena_extra, *n; b != NULL; b = n) {
    n = b->next;
    free(b);
  }
  if (srv->freelist_len < ZM_CALL_FREELIST_MAX) {
    call->next = srv->freelist;
    srv->freelist = call;
    srv->freelist_len++;
  } else {
    free(call);
  }
}

/* The stream is gone (closed by nghttp2, or its connection closed). */
static void call_stream_closed(zm_call_t *call) {
  if (call->state != CALL_FINISHED)
    call_record(call, ZM_GRPC_CANCELLED);
  call_unlink(call);
  call->stream_closed = 1;
  if (call->handler_holds) {
    if (call->state == CALL_HANDLER)
      call_cancel(call);
    /* the handler frees it when it finishes */
  } else {
    call_free(call);
  }
}

static void call_dispatch(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  uint8_t flags;
  const uint8_t *msg;
  size_t msg_len;
  ssize_t n = zm_grpc_deframe(call->rbuf, call->rlen, srv->cfg.max_recv_msg,
                              &flags, &msg, &msg_len);
  if (n == ZM_E_INCOMPLETE) {
    submit_status(call, ZM_GRPC_INTERNAL,
                  call->rlen == 0 ? "missing request message"
                                  : "truncated request message");
    return;
  }
  if (n == ZM_E_MSG_TOO_LARGE) {
    submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                  "request message larger than max");
    return;
  }
  if ((size_t)n != call->rlen) {
    submit_status(call, ZM_GRPC_INTERNAL,
                  "more than one request message for a unary method");
    return;
  }
  if (flags & 1u) {
    submit_status(call, ZM_GRPC_INTERNAL,
                  "compressed message without negotiated grpc-encoding");
    return;
  }
  if (!zm_grpc_strings_nul_free(call->method->input, msg, msg_len)) {
    submit_status(call, ZM_GRPC_INVALID_ARGUMENT,
                  "string field contains a NUL byte");
    return;
  }
  ProtobufCAllocator a = {pb_alloc, pb_free, call};
  ProtobufCMessage *req =
      protobuf_c_message_unpack(call->method->input, &a, msg_len, msg);
  if (req == NULL) {
    submit_status(call, ZM_GRPC_INTERNAL, "cannot parse request message");
    return;
  }
  call_drop_request(call);
  if (call->method->scope_fn != NULL) {
    const char *scope = call->method->scope_fn(req, call->method->ctx);
    if (scope != NULL && !call_authorized(call, scope))
      return;
  }
  if (!call_admitted(call))
    return;
  size_t nn;
  const char *const *names = conn_names(call->conn, &nn);
  call->caller = call_strdup_soft(call, nn > 0 ? names[0] : "");
  call->peer = call_strdup_soft(call, call->conn->peer);
  call->state = CALL_HANDLER;
  call->req = req;
  heap_update(srv, call);
  call->handler_holds = 1;
  call->req = req;
  srv->stats.calls_active++;
  call_mstats(call)->inflight++;
  zm_log_ctx_t lc = {call->id, call->method->path, NULL};
  const zm_log_ctx_t *old = zm_log_ctx_swap(&lc);
  ZM_DEBUG("grpc: call %llu %s", (unsigned long long)call->id,
           call->method->path);
  call->method->fn(call, req, call->method->ctx);
  zm_log_ctx_swap(old);
}

/* A streaming call's headers are accepted: the handler holds it from now. */
static void stream_open(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  call->streaming = 1;
  call->state = CALL_HANDLER;
  heap_update(srv, call); /* a stream's requests arrive when they do */
  call->handler_holds = 1;
  srv->stats.calls_active++;
  call_mstats(call)->inflight++;
  if (call->method->stream->on_open != NULL) {
    zm_log_ctx_t lc = {call->id, call->method->path, NULL};
    const zm_log_ctx_t *old = zm_log_ctx_swap(&lc);
    call->method->stream->on_open(call, call->method->ctx);
    zm_log_ctx_swap(old);
  }
}

/* Ends a streaming call the server gave up on (bad message): the handler is
 * told through its cancel callback and finishes it as usual. */
static void stream_abort(zm_call_t *call, zm_grpc_status_t st,
                         const char *msg) {
  call_end(call, st, msg);
  call_cancel(call);
}

/* Delivers every complete message buffered for a streaming call; keeps the
 * incomplete tail. */
static void stream_deliver(zm_call_t *call) {
  zm_grpc_server_t *srv = call->srv;
  size_t off = 0;
  while (call->state == CALL_HANDLER && !call->cancelled) {
    uint8_t flags;
    const uint8_t *msg;
    size_t msg_len;
    ssize_t n = zm_grpc_deframe(call->rbuf + off, call->rlen - off,
                                srv->cfg.max_recv_msg, &flags, &msg, &msg_len);
    if (n == ZM_E_INCOMPLETE)
      break;
    if (n == ZM_E_MSG_TOO_LARGE) {
      stream_abort(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                   "request message larger than max");
      break;
    }
    off += (size_t)n;
    if (flags & 1u) {
      stream_abort(call, ZM_GRPC_INTERNAL,
                   "compressed message without negotiated grpc-encoding");
      break;
    }
    if (!zm_grpc_strings_nul_free(call->method->input, msg, msg_len)) {
      stream_abort(call, ZM_GRPC_INVALID_ARGUMENT,
                   "string field contains a NUL byte");
      break;
    }
    /* heap-allocated per message: a long stream must not grow the arena */
    ProtobufCMessage *req =
        protobuf_c_message_unpack(call->method->input, NULL, msg_len, msg);
    if (req == NULL) {
      stream_abort(call, ZM_GRPC_INTERNAL, "cannot parse request message");
      break;
    }
    zm_log_ctx_t lc = {call->id, call->method->path, NULL};
    const zm_log_ctx_t *old = zm_log_ctx_swap(&lc);
    call->method->stream->on_message(call, req, call->method->ctx);
    zm_log_ctx_swap(old);
    protobuf_c_message_free_unpacked(req, NULL);
  }
  if (off > 0 && call->conn != NULL) {
    memmove(call->rbuf, call->rbuf + off, call->rlen - off);
    call->rlen -= off;
    call->conn->recv_buffered -= off;
    call->srv->stats.buffered -= off;
  }
}

static void stream_half_close(zm_call_t *call) {
  if (call->state != CALL_HANDLER || call->cancelled)
    return;
  if (call->rlen > 0) {
    stream_abort(call, ZM_GRPC_INTERNAL, "truncated request message");
    return;
  }
  if (call->method->stream->on_half_close != NULL)
    call->method->stream->on_half_close(call, call->method->ctx);
}

/* ===================== nghttp2 callbacks ================================ */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f,
                            void *ud) {
  zm_conn_t *c = ud;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
    return 0;
  zm_call_t *call = call_new(c, f->hd.stream_id);
  if (call == NULL) {
    c->srv->stats.nomem++;
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* RST_STREAM */
  }
  c->srv->stats.calls_started++;
  call->id = ++c->srv->call_seq;
  call->start_ns = uv_hrtime();
  nghttp2_session_set_stream_user_data(s, f->hd.stream_id, call);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *ud) {
  (void)flags;
  zm_conn_t *c = ud;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
    return 0;
  zm_call_t *call = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (call == NULL)
    return 0;
  switch (namelen) {
  case 5:
    if (memcmp(name, ":path", 5) == 0) {
      zm_grpc_server_t *srv = c->srv;
      call->method = zm_grpc_route(srv->methods, srv->path_lens, srv->n_methods,
                                   value, valuelen);
    }
    break;
  case 7:
    if (memcmp(name, ":method", 7) == 0)
      call->bad_method = !(valuelen == 4 && memcmp(value, "POST", 4) == 0);
    break;
  case 12:
    if (memcmp(name, "content-type", 12) == 0) {
      /* application/grpc, optionally followed by "+proto" or ";params" */
      call->bad_ctype =
          !(valuelen >= 16 && memcmp(value, "application/grpc", 16) == 0 &&
            (valuelen == 16 || value[16] == '+' || value[16] == ';'));
    } else if (memcmp(name, "grpc-timeout", 12) == 0) {
      uint64_t ms;
      if (zm_grpc_timeout_parse((const char *)value, valuelen, &ms) == 0)
        call->deadline = uv_now(c->srv->loop) + (ms ? ms : 1);
      else
        call->bad_timeout = 1;
    }
    break;
  case 13:
    if (memcmp(name, "grpc-encoding", 13) == 0)
      call->compressed_ok = valuelen == 8 && memcmp(value, "identity", 8) == 0;
    break;
  default:
    break;
  }
  return 0;
}

/* ===================== authorization ==================================== */

static const char *const *conn_names(const zm_conn_t *c, size_t *n) {
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
static int call_authorized(zm_call_t *call, const char *scope) {
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
static int call_admitted(zm_call_t *call) {
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
static void call_headers_done(zm_call_t *call) {
  if (call->state != CALL_HEADERS)
    return;
  if (call->bad_method) {
    submit_http_error(call, "405",
                      "405 method not allowed: this is a gRPC endpoint "
                      "(POST, content-type application/grpc)\n");
    return;
  }
  if (call->bad_ctype) {
    submit_http_error(call, "415",
                      "415 unsupported media type: this is a gRPC endpoint "
                      "(content-type application/grpc)\n");
    return;
  }
  if (call->bad_timeout) {
    submit_status(call, ZM_GRPC_INTERNAL, "malformed grpc-timeout");
    return;
  }
  if (call->method == NULL) {
    submit_status(call, ZM_GRPC_UNIMPLEMENTED, "unknown service or method");
    return;
  }
  if (!call->compressed_ok) {
    submit_status(call, ZM_GRPC_UNIMPLEMENTED,
                  "grpc-encoding not supported; use identity");
    return;
  }
  if (!call_authorized(call, NULL))
    return;
  call->state = CALL_RECEIVING;
  heap_update(call->srv, call);
  if (call->method->stream != NULL)
    stream_open(call);
}

/*
 * RFC 9113 5.1.1: a client's new stream id must exceed every id it used
 * before; HEADERS on a lower id that is not an open stream is a connection
 * error (PROTOCOL_ERROR). nghttp2 silently ignores such frames (it cannot
 * tell an old closed stream from a never-opened one), so we check: a lower
 * odd id that nghttp2 does not know any more (closed or skipped) ends the
 * connection. Trailers on an open stream are HEADERS on a known id.
 */
static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd,
                          void *ud) {
  zm_conn_t *c = ud;
  if (hd->type != NGHTTP2_HEADERS || hd->stream_id <= 0 ||
      (hd->stream_id & 1) == 0)
    return 0;
  if (hd->stream_id > c->max_req_sid) {
    c->max_req_sid = hd->stream_id;
    return 0;
  }
  if (nghttp2_session_find_stream(s, hd->stream_id) == NULL) {
    c->srv->stats.protocol_errors++;
    return NGHTTP2_ERR_CALLBACK_FAILURE; /* -> GOAWAY PROTOCOL_ERROR */
  }
  return 0;
}

/* An early answer to a request that is still arriving (receive deadline,
 * budget eviction) is followed by RST_STREAM(NO_ERROR) once it is on the
 * wire (RFC 9113 8.1: stop sending), so the stream's state goes too.
 * Submitted earlier, the RST would make nghttp2 drop the answer. */
static int on_frame_send(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
  (void)ud;
  if (f->hd.type != NGHTTP2_HEADERS || !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  zm_call_t *call = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (call != NULL && call->rst_after) {
    call->rst_after = 0;
    nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, f->hd.stream_id,
                              NGHTTP2_NO_ERROR);
  }
  return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
  zm_conn_t *c = ud;
  c->got_frame = 1;
  if (f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA)
    return 0;
  zm_call_t *call = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (call == NULL)
    return 0;
  if (f->hd.type == NGHTTP2_HEADERS && call->state == CALL_HEADERS)
    call_headers_done(call);
  if (f->hd.flags & NGHTTP2_FLAG_END_STREAM) {
    call->end_stream_seen = 1;
    if (call->state == CALL_RECEIVING)
      call_dispatch(call);
    else if (call->streaming)
      stream_half_close(call);
  }
  return 0;
}

/*
 * The process-wide request budget is full. Whoever holds the most pays:
 * the largest unfinished request of the connection holding the most bytes
 * is answered RESOURCE_EXHAUSTED (and its bytes freed), until len fits.
 * Well-behaved clients send small, complete requests, so a client that
 * parks large unfinished messages cannot starve them. Returns 1 when len
 * now fits, 0 when the caller's own request is the one to refuse. Walks
 * connections and streams only when the budget is exhausted.
 */
static int budget_make_room(zm_grpc_server_t *srv, zm_call_t *self,
                            size_t len) {
  while (srv->stats.buffered + len > srv->cfg.max_buffered) {
    zm_conn_t *worst = NULL;
    for (zm_conn_t *c = srv->conns; c != NULL; c = c->next)
      if (worst == NULL || c->recv_buffered > worst->recv_buffered)
        worst = c;
    if (worst == NULL || worst->recv_buffered == 0)
      return 0;
    zm_call_t *victim = NULL;
    for (zm_call_t *k = worst->calls; k != NULL; k = k->next)
      if (k->state == CALL_RECEIVING &&
          (victim == NULL || k->rlen > victim->rlen))
        victim = k;
    if (victim == NULL || victim->rlen == 0)
      return 0;
    if (victim == self || victim->rlen <= self->rlen + len)
      return 0; /* ours is the largest: refuse it instead */
    srv->stats.budget_refusals++;
    victim->rst_after = 1;
    submit_status(victim, ZM_GRPC_RESOURCE_EXHAUSTED,
                  "server busy: request buffer budget exhausted");
  }
  return 1;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid,
                         const uint8_t *data, size_t len, void *ud) {
  (void)flags;
  zm_conn_t *c = ud;
  zm_call_t *call = nghttp2_session_get_stream_user_data(s, sid);
  if (call == NULL ||
      !(call->state == CALL_RECEIVING ||
        (call->streaming && call->state == CALL_HANDLER && !call->cancelled)))
    return 0;
  zm_grpc_server_t *srv = c->srv;
  if (srv->stats.buffered + len > srv->cfg.max_buffered &&
      !budget_make_room(srv, call, len)) {
    /* the process-wide budget: no client set can hold more than this */
    srv->stats.budget_refusals++;
    submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                  "server busy: request buffer budget exhausted");
    return 0;
  }
  size_t max = c->srv->cfg.max_recv_msg + 5;
  /* A streaming call's buffer holds only an incomplete tail (whose declared
   * length the deframer checks), so only the connection budget applies. */
  if ((!call->streaming && call->rlen + len > max) ||
      c->recv_buffered + len > ZM_CONN_RECV_BUDGET) {
    if (call->streaming)
      stream_abort(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                   "request message larger than max");
    else
      submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                    "request message larger than max");
    return 0;
  }
  /* Early check of the declared length: refuse before buffering it all. */
  if (!call->streaming && call->rlen + len >= 5 && call->rlen < 5) {
    uint8_t hdr[5];
    size_t have = call->rlen;
    if (have > 0)
      memcpy(hdr, call->rbuf, have);
    memcpy(hdr + have, data, 5 - have);
    uint32_t n = ((uint32_t)hdr[1] << 24) | ((uint32_t)hdr[2] << 16) |
                 ((uint32_t)hdr[3] << 8) | hdr[4];
    if (n > c->srv->cfg.max_recv_msg) {
      submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                    "request message larger than max");
      return 0;
    }
  }
  if (call->rlen + len > call->rcap) {
    size_t cap = call->rcap ? call->rcap : 64;
    while (cap < call->rlen + len)
      cap *= 2;
    /* new buffer + copy + wipe, never realloc(): no stray copy of the
     * request behind; failure answers the call instead of aborting */
    uint8_t *nb = malloc(cap);
    if (nb == NULL) {
      srv->stats.nomem++;
      submit_status(call, ZM_GRPC_RESOURCE_EXHAUSTED,
                    "server out of memory for the request");
      return 0;
    }
    if (call->rlen > 0)
      memcpy(nb, call->rbuf, call->rlen);
    zm_wipe(call->rbuf, call->rlen);
    free(call->rbuf);
    call->rbuf = nb;
    call->rcap = cap;
  }
  memcpy(call->rbuf + call->rlen, data, len);
  call->rlen += len;
  c->recv_buffered += len;
  srv->stats.buffered += len;
  if (call->streaming)
    stream_deliver(call);
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t err,
                           void *ud) {
  (void)err;
  (void)ud;
  zm_call_t *call = nghttp2_session_get_stream_user_data(s, sid);
  if (call == NULL)
    return 0;
  nghttp2_session_set_stream_user_data(s, sid, NULL);
  call_stream_closed(call);
  return 0;
}

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

static void conn_mark_dirty(zm_conn_t *c) {
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

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  zm_conn_t *c = st->data;
  if (nread == 0)
    return;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  c->last_active = uv_now(c->srv->loop);
  c->in_recv = 1;
  ssize_t rv;
  if (c->tls != NULL) {
    const char *why = NULL;
    int was_up = c->tls->established;
    int trv = zm_tls_srv_feed(c->tls, buf->base, (size_t)nread, on_tls_plain, c,
                              &why);
    if (trv == ZM_E_TLS || trv == ZM_E_CANCELLED) {
      c->in_recv = 0;
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
      return;
    }
    if (!was_up && c->tls->established && c->tls->n_names > 0)
      ZM_DEBUG("grpc: %s authenticated as %s", c->peer, c->tls->names[0]);
    rv = trv;
  } else {
    rv = nghttp2_session_mem_recv(c->h2, (const uint8_t *)buf->base,
                                  (size_t)nread);
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

static void on_write(uv_write_t *req, int status) {
  zm_conn_t *c = req->data;
  c->writing = 0;
  c->write_started = 0;
  /* The bytes written may hold response secrets; the buffer is reused. */
  zm_wipe(c->wr, c->wr_len);
  c->wr_len = 0;
  if (c->out_len == 0 && c->wr_cap > ZM_CONN_KEEP_BUF) {
    /* idle connections keep no output buffers: 10,000 of them must fit in
     * well under 100 MB */
    free(c->wr);
    c->wr = NULL;
    c->wr_cap = 0;
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
  if (!c->writing && c->out_len > 0) {
    /* swap gathered output into the in-flight buffer */
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
  } else if (!congested && !c->reading && !c->close_after_flush) {
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
  zm_wipe(c->out, c->out_len);
  zm_wipe(c->wr, c->wr_len);
  free(c->out);
  free(c->wr);
  if (c->tls != NULL) {
    zm_tls_srv_dispose(c->tls);
    free(c->tls);
  }
  free(c);
  srv->stats.conns_open--;
  srv->open_handles--;
  drain_check(srv);
}

static void conn_close(zm_conn_t *c) {
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

static void on_connection(uv_stream_t *ls, int status) {
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
  if (nghttp2_session_server_new3(&c->h2, srv->cbs, c, srv->opt, &zm__h2_mem) !=
      0) {
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

/* ===================== loop hooks ======================================= */

static void on_flush(uv_prepare_t *p) {
  zm_grpc_server_t *srv = p->data;
  while (srv->dirty != NULL) {
    zm_conn_t *c = srv->dirty;
    srv->dirty = c->dirty_next;
    c->dirty = 0;
    conn_flush(c);
  }
}

/* The request did not arrive within recv_timeout_ms. A stream stuck inside
 * its header block cannot be answered: the connection goes (GOAWAY). One
 * stuck in its body gets a status, then RST_STREAM(NO_ERROR) (RFC 9113
 * 8.1: the response is complete, stop sending) so its state goes too. */
static void call_recv_timeout(zm_call_t *call) {
  zm_conn_t *c = call->conn;
  zm_grpc_server_t *srv = call->srv;
  srv->stats.recv_timeouts++;
  if (c == NULL)
    return;
  zm_audit("recv_timeout", "peer", c->peer, "method",
           call->method ? call->method->path : "", NULL);
  if (call->state == CALL_HEADERS) {
    nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
    c->close_after_flush = 1;
    conn_mark_dirty(c);
    return;
  }
  call->rst_after = 1;
  submit_status(call, ZM_GRPC_DEADLINE_EXCEEDED,
                "request not received in time (GRPC_RECV_TIMEOUT)");
}

static void on_deadline(uv_timer_t *t) {
  zm_grpc_server_t *srv = t->data;
  uint64_t now = uv_now(srv->loop);
  while (srv->heap_len > 0 && srv->heap[0]->heap_key <= now) {
    zm_call_t *call = srv->heap[0];
    heap_remove(srv, call);
    if ((call->state == CALL_HEADERS || call->state == CALL_RECEIVING) &&
        call->recv_deadline != 0 && call->recv_deadline <= now &&
        (call->deadline == 0 || call->recv_deadline < call->deadline)) {
      call_recv_timeout(call);
      continue;
    }
    srv->stats.deadline_exceeded++;
    if (call->state == CALL_RECEIVING || call->state == CALL_HANDLER) {
      int held = call->state == CALL_HANDLER;
      call_end(call, ZM_GRPC_DEADLINE_EXCEEDED, "deadline exceeded");
      if (held)
        call_cancel(call);
    }
  }
  deadline_arm(srv);
}

static void on_tick(uv_timer_t *t) {
  zm_grpc_server_t *srv = t->data;
  uint64_t now = uv_now(srv->loop);
  if (srv->limiter != NULL)
    zm_limiter_sweep(srv->limiter, now);
  for (zm_conn_t *c = srv->conns, *n; c != NULL; c = n) {
    n = c->next;
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
    }
  }
}

/* ===================== server =========================================== */

static int parse_address(const char *addr, struct sockaddr_storage *ss) {
  const char *colon = strrchr(addr, ':');
  if (colon == NULL)
    return ZM_E_INVAL;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end != '\0' || colon[1] == '\0' || port < 0 || port > 65535)
    return ZM_E_INVAL;
  char host[64];
  size_t hl = (size_t)(colon - addr);
  if (hl >= sizeof host)
    return ZM_E_INVAL;
  memcpy(host, addr, hl);
  host[hl] = '\0';
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    memmove(host, host + 1, hl - 2);
    host[hl - 2] = '\0';
    return uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  }
  if (hl == 0)
    return uv_ip6_addr("::", (int)port, (struct sockaddr_in6 *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  if (strcmp(host, "localhost") == 0)
    return uv_ip4_addr("127.0.0.1", (int)port, (struct sockaddr_in *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  return ZM_E_INVAL;
}

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
  nghttp2_session_callbacks_set_on_begin_headers_callback(srv->cbs,
                                                          on_begin_headers);
  nghttp2_session_callbacks_set_on_begin_frame_callback(srv->cbs,
                                                        on_begin_frame);
  nghttp2_session_callbacks_set_on_frame_send_callback(srv->cbs, on_frame_send);
  nghttp2_session_callbacks_set_on_header_callback(srv->cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(srv->cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(srv->cbs,
                                                            on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(srv->cbs,
                                                         on_stream_close);
  nghttp2_option_set_max_deflate_dynamic_table_size(srv->opt, 4096);
  uv_prepare_init(loop, &srv->flush);
  srv->flush.data = srv;
  uv_prepare_start(&srv->flush, on_flush);
  uv_unref((uv_handle_t *)&srv->flush);
  uv_timer_init(loop, &srv->tick);
  srv->tick.data = srv;
  uv_timer_start(&srv->tick, on_tick, 1000, 1000);
  uv_unref((uv_handle_t *)&srv->tick);
  uv_timer_init(loop, &srv->deadline_timer);
  srv->deadline_timer.data = srv;
  uv_timer_init(loop, &srv->grace_timer);
  srv->grace_timer.data = srv;
  srv->open_handles = 4;
  *out = srv;
  return 0;
}

int zm_grpc_server_listen(zm_grpc_server_t *srv) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  if (parse_address(srv->address, &ss) != 0)
    return ZM_E_INVAL;
  uv_tcp_init(srv->loop, &srv->listener);
  srv->listener.data = srv;
  srv->open_handles++;
  srv->listening = 1;
  int rv = uv_tcp_bind(&srv->listener, (struct sockaddr *)&ss, 0);
  if (rv == 0)
    rv = uv_listen((uv_stream_t *)&srv->listener, 4096, on_connection);
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
static void drain_check(zm_grpc_server_t *srv) {
  if (!srv->draining)
    return;
  if (srv->conns == NULL && srv->stats.calls_active == 0 &&
      srv->draining == 1) {
    srv->draining = 2;
    uv_close((uv_handle_t *)&srv->flush, on_handle_closed);
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
