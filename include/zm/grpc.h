/*
 * grpc.h - the gRPC server: plaintext HTTP/2 (h2c, prior knowledge) on libuv
 * with nghttp2, one loop. Unary methods, and streaming methods (client,
 * server and bidirectional streaming share one small API, below).
 *
 * A handler gets the decoded request and finishes the call later, exactly
 * once, with zm_call_reply() or zm_call_fail() - possibly long after the
 * client went away: a call whose stream was reset, whose deadline passed or
 * whose connection closed is "cancelled"; finishing it then just frees it.
 * Handlers that wait on I/O may register a cancel callback to stop early.
 */
#ifndef ZM_GRPC_H
#define ZM_GRPC_H

#include "zm/zm.h"

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* gRPC status codes (grpc/doc/statuscodes.md). */
typedef enum {
  ZM_GRPC_OK = 0,
  ZM_GRPC_CANCELLED = 1,
  ZM_GRPC_UNKNOWN = 2,
  ZM_GRPC_INVALID_ARGUMENT = 3,
  ZM_GRPC_DEADLINE_EXCEEDED = 4,
  ZM_GRPC_NOT_FOUND = 5,
  ZM_GRPC_ALREADY_EXISTS = 6,
  ZM_GRPC_PERMISSION_DENIED = 7,
  ZM_GRPC_RESOURCE_EXHAUSTED = 8,
  ZM_GRPC_FAILED_PRECONDITION = 9,
  ZM_GRPC_ABORTED = 10,
  ZM_GRPC_OUT_OF_RANGE = 11,
  ZM_GRPC_UNIMPLEMENTED = 12,
  ZM_GRPC_INTERNAL = 13,
  ZM_GRPC_UNAVAILABLE = 14,
  ZM_GRPC_DATA_LOSS = 15,
  ZM_GRPC_UNAUTHENTICATED = 16,
} zm_grpc_status_t;

/* "OK", "NOT_FOUND", ...; "UNKNOWN" for a code outside the enum. */
const char *zm_grpc_code_name(int code);

typedef struct zm_grpc_server zm_grpc_server_t;
typedef struct zm_call zm_call_t;

/* Called with the decoded request (allocated in the call's arena, valid until
 * the call is finished). */
typedef void (*zm_grpc_handler_fn)(zm_call_t *call, const ProtobufCMessage *req,
                                   void *ctx);

/* Method flags. */
#define ZM_GRPC_M_PUBLIC 1u /* no authorization (health probes) */
#define ZM_GRPC_M_COSTLY 2u /* per-caller rate limit and in-flight cap */

/* The authorization scope of a decoded request (RequestServiceIdentity:
 * the service type's name), or NULL when it has none (unknown values are
 * left to the handler to refuse). */
typedef const char *(*zm_grpc_scope_fn)(const ProtobufCMessage *req, void *ctx);

/* Observes how a call ended, just before the answer is sent (audit):
 * resp is NULL unless st is OK. Never log secrets from resp. */
typedef void (*zm_grpc_finish_fn)(zm_call_t *c, const ProtobufCMessage *req,
                                  zm_grpc_status_t st,
                                  const ProtobufCMessage *resp, void *ctx);

/*
 * A streaming method. The handler holds the call from on_open until it
 * finishes it with zm_call_finish() (or zm_call_fail()/zm_call_reply());
 * in between it sends any number of messages with zm_call_send(). Request
 * messages arrive one by one in on_message, in order. When the client can
 * no longer receive (reset, deadline, connection gone, drain grace over) the
 * cancel callback fires (zm_call_on_cancel) and the handler must still
 * finish the call.
 */
typedef struct {
  /* Headers accepted; the call is the handler's. May be NULL. */
  void (*on_open)(zm_call_t *c, void *ctx);
  /* One decoded request message, valid only during the callback. */
  void (*on_message)(zm_call_t *c, const ProtobufCMessage *msg, void *ctx);
  /* The client sent END_STREAM: no more messages. May be NULL. */
  void (*on_half_close)(zm_call_t *c, void *ctx);
} zm_grpc_stream_ops_t;

typedef struct {
  const char *path; /* "/package.Service/Method", not owned */
  const ProtobufCMessageDescriptor *input;
  zm_grpc_handler_fn fn; /* unary methods (stream == NULL) */
  void *ctx;
  const zm_grpc_stream_ops_t *stream; /* non-NULL: a streaming method */
  unsigned flags;                     /* ZM_GRPC_M_* */
  zm_grpc_scope_fn scope_fn;          /* NULL = no scope check */
  zm_grpc_finish_fn on_finish;        /* NULL = none; called with ctx */
} zm_grpc_method_t;

/* Handshake steps on the workers at once: a reconnect storm of this many
 * clients is absorbed off the loop (a step is 1-5 ms, so the last waits a
 * few hundred ms behind two threads); steps beyond run on the loop. */
#define ZM_GRPC_HS_MAX_QUEUED 256u

typedef struct {
  const char *address;      /* "host:port", ":port" = all interfaces */
  size_t max_recv_msg;      /* bytes, default 4 MiB */
  uint32_t max_streams;     /* SETTINGS_MAX_CONCURRENT_STREAMS, default 1024 */
  uint64_t idle_timeout_ms; /* close connections without streams after this, 0 =
                               never */
  unsigned max_conns;       /* accepted connections cap, default 65536 */
  size_t max_buffered;      /* request bytes buffered across all connections,
                               default 256 MiB */
  uint64_t recv_timeout_ms; /* a stream must deliver its whole request within
                               this after its HEADERS began, default 30 s;
                               0 = never */
  uint64_t write_stall_ms;  /* a connection whose write has not completed for
                               this long is closed (non-reading peer),
                               default 30 s; 0 = never */
  double caller_rate;       /* ZM_GRPC_M_COSTLY calls per second per caller,
                               default 10; 0 = unlimited */
  unsigned caller_burst;    /* token bucket depth, default 20 */
  unsigned caller_inflight; /* ZM_GRPC_M_COSTLY calls in flight per caller,
                               default 32; 0 = unlimited */
  unsigned busy_poll_us;    /* after its output, the loop polls without
                               sleeping this long while recent requests came
                               that soon; 0 = off (default) */
  /* Nonzero while busy polling must not hold the core (e.g. other threads
   * of the process have work); NULL = never. */
  int (*busy_poll_veto)(void *ctx);
  void *busy_poll_ctx;
  /* Where TLS handshake steps (milliseconds of public-key work each) run:
   * these threads, at most ZM_GRPC_HS_MAX_QUEUED at a time (room the pool
   * must keep for them), or the loop when NULL, over that bound, or when
   * they refuse the job. Not owned; closed after the server. */
  struct zm_workers *workers;
  /* A step that no worker has started after this long (the threads run at
   * idle priority: a saturated core starves them) is taken back and run on
   * the loop, checked once a second; default 1000 ms. */
  uint64_t tls_handshake_wait_ms;
} zm_grpc_config_t;

/* Counters (loop thread only). */
typedef struct {
  uint64_t conns_accepted, conns_open, calls_started, calls_active,
      calls_cancelled, deadline_exceeded, protocol_errors;
  uint64_t conns_refused, tls_failures, authz_denied, rate_limited,
      recv_timeouts, write_stalls, budget_refusals, nomem;
  uint64_t buffered; /* request bytes buffered now, all connections */
  /* idle connections trimmed, and the bytes of zero pages they gave back
   * to the kernel */
  uint64_t idle_trims, trimmed_bytes;
  /* busy polling: windows started, and reads that arrived inside one */
  uint64_t busy_polls, busy_poll_hits;
  /* TLS handshake steps run on the workers / on the loop; connections
   * closed while a worker ran theirs (freed when it came back) */
  uint64_t tls_handshake_steps_offloaded, tls_handshake_steps_inline,
      tls_handshake_steps_orphaned;
} zm_grpc_stats_t;

/* Per-method counters for metrics (loop thread only). Latency runs from the
 * request headers to the status being sent (or the client going away). */
#define ZM_GRPC_LAT_BUCKETS 18
/* Upper bounds of the latency buckets, in seconds (the last bucket, +Inf,
 * is implicit). */
extern const double zm_grpc_latency_bounds_s[ZM_GRPC_LAT_BUCKETS];
typedef struct {
  uint64_t by_status[17];                       /* index = grpc status */
  uint64_t lat_counts[ZM_GRPC_LAT_BUCKETS + 1]; /* per bucket, not cumulative */
  uint64_t lat_sum_ns;
  uint64_t inflight; /* handler holds the call */
} zm_grpc_method_stats_t;

/* Creates the server (binds nothing yet). The method table is copied. */
int zm_grpc_server_new(zm_grpc_server_t **out, uv_loop_t *loop,
                       const zm_grpc_config_t *cfg,
                       const zm_grpc_method_t *methods, size_t n_methods);
/* Binds and listens. Returns 0, ZM_E_INVAL (bad address) or a libuv error. */
int zm_grpc_server_listen(zm_grpc_server_t *srv);
/* The bound port (after listen), for ":0" configurations. */
int zm_grpc_server_port(const zm_grpc_server_t *srv);
/*
 * Graceful shutdown: stops accepting, sends GOAWAY on every connection, lets
 * calls in flight finish; after grace_ms closes whatever is left. Calls
 * done(data) once every connection and handle is closed and every call the
 * handlers still held was finished... except calls still held by handlers:
 * those are detached and freed when their handler finishes them.
 */
void zm_grpc_server_drain(zm_grpc_server_t *srv, uint64_t grace_ms,
                          void (*done)(void *data), void *data);
/*
 * TLS (both files set) for connections accepted from now on; client_ca
 * (NULL/"" = none) makes the server verify client certificates. Replaces
 * the previous TLS context only on success (SIGHUP reload): open
 * connections keep theirs. Returns 0 or ZM_E_TLS with a reason in err.
 * Call before listen to serve TLS from the first connection; a server
 * that started without TLS stays h2c.
 */
int zm_grpc_server_set_tls(zm_grpc_server_t *srv, const char *cert_file,
                           const char *key_file, const char *client_ca,
                           char *err, size_t errlen);
/* 1 when the server speaks TLS. */
int zm_grpc_server_tls_enabled(const zm_grpc_server_t *srv);
/*
 * Installs the authorization policy (zm/authz.h; the server takes
 * ownership and frees the previous one). NULL = no policy: then with
 * client certificates verified (a client CA) every non-public method needs
 * one, and without, every caller is allowed.
 */
struct zm_authz;
void zm_grpc_server_set_authz(zm_grpc_server_t *srv, struct zm_authz *authz);
/* The method paths served (for validating a policy). */
size_t zm_grpc_server_methods(const zm_grpc_server_t *srv, const char **paths,
                              size_t max);

/* The security settings of the listener (all paths may be NULL or ""). */
typedef struct {
  const char *cert_file, *key_file; /* TLS when both are set */
  const char *client_ca_file;       /* verify client certificates */
  const char *policy_file;          /* authorization policy (zm/authz.h) */
  const char *const *scopes;        /* scope names a policy may use */
  size_t n_scopes;
} zm_grpc_security_t;

/*
 * Loads TLS material and the policy and installs them together, or
 * nothing: on any error the server keeps what it had (a SIGHUP with a bad
 * new file changes nothing) and err says which file and why. Certificates
 * without the policy file or the reverse are allowed; a key without a
 * certificate is an error. A server started without TLS cannot switch to
 * TLS on reload (its clients speak h2c): that is an error too.
 * Returns 0 or ZM_E_INVAL / ZM_E_TLS.
 */
int zm_grpc_server_load_security(zm_grpc_server_t *srv,
                                 const zm_grpc_security_t *sec, char *err,
                                 size_t errlen);

/* Frees the server after drain completed. */
void zm_grpc_server_free(zm_grpc_server_t *srv);
void zm_grpc_server_get_stats(const zm_grpc_server_t *srv,
                              zm_grpc_stats_t *out);
/* Slots 0..n-1 are the method table's methods (path via ..._method_path),
 * slot n counts calls to unknown paths (path NULL). */
size_t zm_grpc_server_method_count(const zm_grpc_server_t *srv);
const char *zm_grpc_server_method_path(const zm_grpc_server_t *srv, size_t i);
const zm_grpc_method_stats_t *
zm_grpc_server_method_stats(const zm_grpc_server_t *srv, size_t i);
/* 1 once zm_grpc_server_drain() was called. */
int zm_grpc_server_draining(const zm_grpc_server_t *srv);

/* ---- calls (used by handlers) ------------------------------------------- */

/* Finishes the call with OK and the response message. */
void zm_call_reply(zm_call_t *c, const ProtobufCMessage *resp);
/* Finishes the call with an error status and message (percent-encoded on the
 * wire; keep it free of secrets). */
void zm_call_fail(zm_call_t *c, zm_grpc_status_t status, const char *msg);
/* Streaming calls: queues one message. Returns 0, ZM_E_CANCELLED when the
 * call can no longer send (client gone, already finished), or
 * ZM_E_UNAVAILABLE when more than ZM_GRPC_SENDQ_MAX bytes are already
 * queued (the client does not read): the handler should finish the call. */
#define ZM_GRPC_SENDQ_MAX (4u * 1024 * 1024)
int zm_call_send(zm_call_t *c, const ProtobufCMessage *msg);
/* Streaming calls: bytes queued and not yet taken by HTTP/2. */
size_t zm_call_send_queued(const zm_call_t *c);
/* Finishes any call with a status: for a streaming call that already sent
 * messages, the trailers follow the queued messages; otherwise a
 * Trailers-Only response. (zm_call_fail is this with status != OK.) */
void zm_call_finish(zm_call_t *c, zm_grpc_status_t status, const char *msg);
/* A number unique to this call within the server, for logs. */
uint64_t zm_call_id(const zm_call_t *c);
/* 1 once the client can no longer receive an answer. */
int zm_call_is_cancelled(const zm_call_t *c);
/* cb fires at most once, from the loop, when the call becomes cancelled while
 * the handler still holds it. */
void zm_call_on_cancel(zm_call_t *c, void (*cb)(zm_call_t *c, void *data),
                       void *data);
/* The data given to zm_call_on_cancel (modules keep per-call state there). */
void *zm__call_cancel_data(const zm_call_t *c);
/* The call's deadline as a uv_now() time in ms, or 0 if the client set none. */
uint64_t zm_call_deadline(const zm_call_t *c);
/* Bump allocation from the call's arena, freed with the call. Aborts on OOM. */
void *zm_call_alloc(zm_call_t *c, size_t n);
char *zm_call_strdup(zm_call_t *c, const char *s);
/* Unary calls: the decoded request the handler got (valid until the call
 * is finished); NULL for streaming calls. */
const ProtobufCMessage *zm_call_request(const zm_call_t *c);
/* The method's ctx (zm_grpc_method_t.ctx). */
void *zm_call_ctx(const zm_call_t *c);
/* The server the call belongs to (never NULL). */
zm_grpc_server_t *zm_call_server(const zm_call_t *c);
/* The method path, for logs. */
const char *zm_call_path(const zm_call_t *c);
/* Who called, for audit records: the first name of the verified client
 * certificate ("uri:..", "dns:..", "cn:..") or "" without one. Valid until
 * the call is finished (copied into the call). */
const char *zm_call_caller(const zm_call_t *c);
/* The peer address "ip:port" (or "" once unknown). */
const char *zm_call_peer(const zm_call_t *c);

/* ---- pure helpers (unit-tested) ----------------------------------------- */

/*
 * Decodes one length-prefixed gRPC message from src. Returns the bytes
 * consumed (5 + length) with *flags and *msg and *msg_len set, or
 * ZM_E_INCOMPLETE, or ZM_E_MSG_TOO_LARGE when the declared length exceeds max.
 */
ssize_t zm_grpc_deframe(const uint8_t *src, size_t len, size_t max,
                        uint8_t *flags, const uint8_t **msg, size_t *msg_len);
/* Parses a grpc-timeout header value ("1-8 digits" + H|M|S|m|u|n) into ms
 * (rounded up, so "1n" is 1 ms). Returns 0 or ZM_E_INVAL. */
int zm_grpc_timeout_parse(const char *v, size_t len, uint64_t *ms);
/* Decodes a percent-encoded grpc-message (invalid escapes are kept as
 * they are). Writes at most cap-1 bytes + NUL; returns the length. */
size_t zm_grpc_pct_decode(const char *src, size_t len, char *dst, size_t cap);
/* Percent-encodes a grpc-message per the spec (bytes outside 0x20-0x7E and
 * '%' become %XX). Writes at most cap-1 bytes + NUL; returns the length. */
size_t zm_grpc_pct_encode(const char *src, size_t len, char *dst, size_t cap);

/* The method whose path equals path[0..len), or NULL. Linear: the table is
 * a handful of entries and the length check rejects most in one compare. */
const zm_grpc_method_t *zm_grpc_route(const zm_grpc_method_t *methods,
                                      const size_t *path_lens, size_t n,
                                      const uint8_t *path, size_t len);

/* 1 unless a top-level string field of a `desc` message in data[0..len)
 * holds a NUL byte (protobuf-c would silently truncate it at the NUL).
 * Malformed input returns 1: the unpacker reports that. */
int zm_grpc_strings_nul_free(const ProtobufCMessageDescriptor *desc,
                             const uint8_t *data, size_t len);

#endif /* ZM_GRPC_H */
