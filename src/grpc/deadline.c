/*
 * deadline.c - the deadline heap: one timer for every call's deadline
 * and receive deadline (GRPC_RECV_TIMEOUT), and what expiry does.
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void on_deadline(uv_timer_t *t);

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

void heap_remove(zm_grpc_server_t *srv, zm_call_t *call) {
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
void heap_update(zm_grpc_server_t *srv, zm_call_t *call) {
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
