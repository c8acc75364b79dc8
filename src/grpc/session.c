/*
 * session.c - nghttp2 callbacks: request headers, data chunks against
 * the per-connection and global budgets, frame and stream events.
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Registers the callbacks above: every connection's session uses them. */
void session_callbacks_init(nghttp2_session_callbacks *cbs) {
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs,
                                                          on_begin_headers);
  nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
}
