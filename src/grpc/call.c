/*
 * call.c - call lifecycle: responses (unary, Trailers-Only errors,
 * plain HTTP errors), streaming sends, cancel, dispatch to handlers, the
 * free list, per-method counters.
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *zm_grpc_code_name(int code) {
  static const char *const NAMES[] = {"OK",
                                      "CANCELLED",
                                      "UNKNOWN",
                                      "INVALID_ARGUMENT",
                                      "DEADLINE_EXCEEDED",
                                      "NOT_FOUND",
                                      "ALREADY_EXISTS",
                                      "PERMISSION_DENIED",
                                      "RESOURCE_EXHAUSTED",
                                      "FAILED_PRECONDITION",
                                      "ABORTED",
                                      "OUT_OF_RANGE",
                                      "UNIMPLEMENTED",
                                      "INTERNAL",
                                      "UNAVAILABLE",
                                      "DATA_LOSS",
                                      "UNAUTHENTICATED"};
  return code >= 0 && (size_t)code < ZM_ARRAY_SIZE(NAMES) ? NAMES[code]
                                                          : "UNKNOWN";
}

static void call_free(zm_call_t *call);
static void call_record(zm_call_t *call, zm_grpc_status_t st);
static void stream_fin(zm_call_t *call, zm_grpc_status_t st, const char *msg);

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
void submit_status(zm_call_t *call, zm_grpc_status_t st, const char *msg) {
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
void call_end(zm_call_t *call, zm_grpc_status_t st, const char *msg) {
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
void submit_http_error(zm_call_t *call, const char *status, const char *body) {
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
void call_cancel(zm_call_t *call) {
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

zm_call_t *call_new(zm_conn_t *c, int32_t sid) {
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
void call_stream_closed(zm_call_t *call) {
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

void call_dispatch(zm_call_t *call) {
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
void stream_open(zm_call_t *call) {
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
void stream_abort(zm_call_t *call, zm_grpc_status_t st, const char *msg) {
  call_end(call, st, msg);
  call_cancel(call);
}

/* Delivers every complete message buffered for a streaming call; keeps the
 * incomplete tail. */
void stream_deliver(zm_call_t *call) {
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

void stream_half_close(zm_call_t *call) {
  if (call->state != CALL_HANDLER || call->cancelled)
    return;
  if (call->rlen > 0) {
    stream_abort(call, ZM_GRPC_INTERNAL, "truncated request message");
    return;
  }
  if (call->method->stream->on_half_close != NULL)
    call->method->stream->on_half_close(call, call->method->ctx);
}
