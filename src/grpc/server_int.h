/*
 * server_int.h - what the files of the gRPC server share (not installed, not
 * for the rest of the service: include/zm/grpc.h is the interface).
 *
 * The server is split by job:
 *   server.c   listener, wiring, periodic housekeeping, drain and shutdown
 *   conn.c     connection I/O: accept, read, write gathering, backpressure,
 *              close and refusal
 *   session.c  nghttp2 callbacks: request headers, data, budgets, stream close
 *   admit.c    per-call authorization and per-caller admission
 *   call.c     call lifecycle: reply, fail, cancel, streaming sends, free list
 *   arena.c    per-call arena (and protobuf-c's allocator on it)
 *   deadline.c deadline heap: call and receive deadlines
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
#ifndef ZM_GRPC_SERVER_INT_H
#define ZM_GRPC_SERVER_INT_H

#include "zm/grpc.h"
#include "zm/audit.h"
#include "zm/authz.h"
#include "zm/log.h"
#include "zm/workers.h"

#include "h2mem.h"
#include "limiter.h"
#include "tls_server.h"

#include <nghttp2/nghttp2.h>

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
/* Inline arena bytes per call: the hot paths (ResolveIdentity with every
 * optional id, ExtendIdentityLease) use at most about 250 of them; anything
 * larger takes a block. A call is kept for reuse (ZM_CALL_FREELIST_MAX), so
 * with 1024 calls in flight this size is most of the server's peak memory
 * beyond its index: 1536 bytes cost 1 MB more than 512. */
#define ZM_CALL_ARENA_INLINE 512u
#define ZM_CALL_ARENA_BLOCK 8192u
/* grpc-message is truncated past this many encoded bytes. */
#define ZM_GRPC_MSG_MAX 1024u
/* Output buffer capacity an idle connection may keep. */
#define ZM_CONN_KEEP_BUF 0u
/* A connection with no call, no output and nothing read for this long is
 * trimmed (conn_trim_idle): idle connections are what a load balancer keeps
 * by the thousand, busy ones keep their buffers warm. */
#define ZM_CONN_TRIM_MS 1000u
/* Trimming one connection costs some 10 us (30 with TLS: syscalls, zero
 * checks); a tick stops trimming after this much, so that thousands of
 * connections going quiet at once cost a few ms per second, not a stall. */
#define ZM_CONN_TRIM_TICK_NS (5u * 1000 * 1000)
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
  unsigned trimmed : 1; /* trimmed since the last read or write */
  unsigned n_calls;
  size_t recv_buffered;
  uint64_t last_active;   /* uv_now() ms */
  uint64_t write_started; /* uv_now() ms of the write in flight */
  int32_t max_req_sid;    /* highest client stream id that sent HEADERS */
  zm_tls_srv_t *tls;      /* NULL = h2c */
  /* TLS handshake steps on the workers (conn.c): allocated for the
   * handshake only, freed once the connection is established */
  struct conn_hs *hs;
  char peer[64]; /* "ip:port" */
  char *out;     /* gathered output */
  size_t out_len, out_cap;
  char *wr; /* output in flight */
  size_t wr_len, wr_cap;
  uv_write_t wreq;
  zm_h2_mem_t h2mem; /* the allocator of h2, which it must outlive */
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
  uv_idle_t spin; /* active while busy polling (server.c) */
  uint64_t work_done_ns, spin_until_ns; /* uv_hrtime() */
  int spin_score; /* > 0: most recent gaps were within the window */
  int spinning;
  int read_since_flush; /* the gap before this batch of input is scored */
  uv_timer_t tick;
  uv_timer_t deadline_timer;
  uv_timer_t grace_timer;
  unsigned open_handles;
  int listening;
  int port;
  zm_conn_t *conns;
  unsigned hs_queued; /* handshake steps on the workers (conn.c) */
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

#define NV(n, v)                                                               \
  {                                                                            \
    (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1,              \
        NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE           \
  }

/* Internal functions shared between the files above (global symbols, but
 * not part of any interface). */

/* arena.c */
const char *call_strdup_soft(zm_call_t *c, const char *s);
void *pb_alloc(void *data, size_t n);
void pb_free(void *data, void *p);

/* deadline.c */
void heap_remove(zm_grpc_server_t *srv, zm_call_t *call);
void heap_update(zm_grpc_server_t *srv, zm_call_t *call);

/* server.c: busy polling */
void busy_note_read(zm_grpc_server_t *srv);
void busy_after_flush(zm_grpc_server_t *srv);

/* call.c */
void submit_status(zm_call_t *call, zm_grpc_status_t st, const char *msg);
void call_end(zm_call_t *call, zm_grpc_status_t st, const char *msg);
void submit_http_error(zm_call_t *call, const char *status, const char *body);
void call_cancel(zm_call_t *call);
zm_call_t *call_new(zm_conn_t *c, int32_t sid);
void call_stream_closed(zm_call_t *call);
void call_dispatch(zm_call_t *call);
void stream_open(zm_call_t *call);
void stream_abort(zm_call_t *call, zm_grpc_status_t st, const char *msg);
void stream_deliver(zm_call_t *call);
void stream_half_close(zm_call_t *call);

/* admit.c */
const char *const *conn_names(const zm_conn_t *c, size_t *n);
int call_authorized(zm_call_t *call, const char *scope);
int call_admitted(zm_call_t *call);

/* conn.c */
void conn_mark_dirty(zm_conn_t *c);
void conn_close(zm_conn_t *c);
/* Runs the connection's TLS handshake step on the loop when no worker has
 * started it within cfg.tls_handshake_wait_ms (server.c's tick). */
void conn_hs_check(zm_conn_t *c, uint64_t now);
/* 1 while a handshake step of c is on the workers. */
int conn_hs_running(const zm_conn_t *c);
void conn_on_connection(uv_stream_t *ls, int status);
void conn_on_flush(uv_prepare_t *p);
int conn_trim_idle(zm_conn_t *c, uint64_t now);

/* server.c */
void drain_check(zm_grpc_server_t *srv);

/* session.c */
void session_callbacks_init(nghttp2_session_callbacks *cbs);

#endif /* ZM_GRPC_SERVER_INT_H */
