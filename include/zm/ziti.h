/*
 * ziti.h - the OpenZiti controller client: non-blocking HTTPS/1.1 on the
 * libuv loop (uv_tcp + wolfSSL with custom I/O callbacks + llhttp), a
 * bounded keep-alive connection pool with a request queue, the Edge
 * Management API calls ziti-management needs, and the enrollment endpoint.
 * Wire facts: shared openziti-facts.md.
 *
 * Contract for every call below:
 * - the callback fires exactly once, always from the loop, never inside the
 *   call that started the request (early failures are deferred a tick);
 * - `deadline` is a uv_now() time in ms bounding the whole call including
 *   retries (0 = the client's default request timeout from now);
 * - the result and everything it points to is valid only during the
 *   callback; secrets in it are wiped after the callback returns;
 * - 401 -> re-authenticate once (POST /authenticate?method=cert) and retry;
 *   429/503 -> retry with exponential backoff honouring Retry-After while
 *   the deadline allows; a reused keep-alive connection that dies before
 *   any response byte -> retried once on a fresh connection.
 */
#ifndef ZM_ZITI_H
#define ZM_ZITI_H

#include "zm/secret.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct zm_ziti zm_ziti_t;

typedef struct {
  const char *controller_url; /* "https://host:port" (a path is ignored) */
  const char *ca_file;        /* PEM CA bundle to verify the controller */
  const char *cert_file;      /* client certificate PEM (admin identity) */
  const char *key_file;       /* its private key PEM */
  unsigned pool_size;         /* max open connections, default 16 */
  unsigned queue_max; /* max requests waiting for a connection, default 4096 */
  uint64_t connect_timeout_ms; /* TCP+TLS, default 5000 */
  uint64_t request_timeout_ms; /* default per-call bound, default 15000 */
  uint64_t idle_timeout_ms;    /* keep-alive idle close, default 4000 (<
                                  controller's 5 s) */
  uint64_t cacerts_refresh_ms; /* CA bundle refresh period, default 3600000 */
  /* First contact for self-enrollment: no CA file yet, so the server
   * certificate is not verified by TLS; the caller verifies the enrollment
   * JWT against it (zm_ziti_server_cert) and pins it. Only the client API
   * (enroll, cacerts) may be used. */
  int bootstrap;
  /* Where the TLS handshakes' public-key steps run (key share, certificate
   * chain, CertificateVerify: milliseconds of CPU each), off the loop.
   * NULL: on the loop. Not owned; it must outlive every connection, i.e.
   * be closed after zm_ziti_close(). Each connection has at most one job in
   * it at a time; a refused job (queue full, pool closing) runs on the loop,
   * and so does one no worker has started after handshake_wait_ms (default
   * 1000: the threads run at idle priority, which a saturated core starves). */
  struct zm_workers *workers;
  uint64_t handshake_wait_ms;
} zm_ziti_config_t;

/* What a call produced. Only the fields of that call are set. */
typedef struct {
  int err;             /* 0 = success; else ZM_E_* or a libuv error */
  int http_status;     /* last HTTP status seen, 0 if none */
  const char *code;    /* controller error code ("NOT_FOUND", ...) or NULL */
  const char *message; /* operator-facing description of a failure, or NULL;
                          never contains secrets */
  int gone;       /* delete: the controller answered 404 (counted as success) */
  const char *id; /* create: the new identity's id */
  zm_secret_t *jwt; /* get_enrollment_jwt: enrollment.ott.jwt; base NULL if the
                       identity has no pending ott enrollment */
  const char *cert_pem;     /* enroll: data.cert (leaf + intermediates) */
  const char *const *ids;   /* find: matching identity ids */
  const char *const *names; /* find: their names, same order */
  size_t n_ids;
  /* call / list: the parsed response (a json_t *, valid during the callback
   * only), or NULL */
  const void *json;
  /* list: meta.pagination, validated */
  long long total, page_offset, page_limit;
  /* get_enrollment_jwt: enrollment.ott.expiresAt as sent, or NULL */
  const char *expires_at;
} zm_ziti_result_t;

typedef void (*zm_ziti_cb)(const zm_ziti_result_t *res, void *data);

/* Loads the TLS material and prepares the pool; connects lazily. Starts the
 * CA-bundle refresh timer (first fetch at once, in the background).
 * Returns 0, or ZM_E_INVAL (bad URL), ZM_E_TLS (unreadable cert/key/CA). */
int zm_ziti_new(zm_ziti_t **out, uv_loop_t *loop, const zm_ziti_config_t *cfg);
/* Fails every queued/in-flight call with ZM_E_SHUTDOWN (callbacks deferred),
 * closes all handles, and calls done(data) once everything is freed. */
void zm_ziti_close(zm_ziti_t *z, void (*done)(void *data), void *data);

/* POST /edge/management/v1/identities {name, type:"Device", isAdmin:false,
 * roleAttributes, externalId (omitted when NULL), enrollment:{ott:true}}.
 * Result: id. A duplicate name is err ZM_E_EXISTS (code COULD_NOT_VALIDATE). */
void zm_ziti_create_identity(zm_ziti_t *z, const char *name,
                             const char *const *roles, size_t n_roles,
                             const char *external_id, uint64_t deadline,
                             zm_ziti_cb cb, void *data);
/* The same with tags: tags_json is a JSON object of strings (sent only when
 * non-empty), or NULL. */
void zm_ziti_create_identity_tags(zm_ziti_t *z, const char *name,
                                  const char *const *roles, size_t n_roles,
                                  const char *external_id,
                                  const char *tags_json, uint64_t deadline,
                                  zm_ziti_cb cb, void *data);
/* GET /edge/management/v1/identities/{id}; result: jwt (enrollment.ott.jwt).
 * Unknown id -> ZM_E_NOT_FOUND. */
void zm_ziti_get_enrollment_jwt(zm_ziti_t *z, const char *id, uint64_t deadline,
                                zm_ziti_cb cb, void *data);
/* DELETE /edge/management/v1/identities/{id}; 404 -> success with gone = 1. */
void zm_ziti_delete_identity(zm_ziti_t *z, const char *id, uint64_t deadline,
                             zm_ziti_cb cb, void *data);
/* GET /edge/management/v1/identities?filter=<field>="<value>" paging with
 * limit 100 until all are read. field is "name" or "externalId"; value is
 * quoted/escaped as ZitiQL needs. Result: ids/names/n_ids. */
void zm_ziti_find_identities(zm_ziti_t *z, const char *field, const char *value,
                             uint64_t deadline, zm_ziti_cb cb, void *data);
/* POST /edge/client/v1/enroll?method=ott&token=<token>, Content-Type
 * application/x-pem-file, body = csr_pem (as the Go SDK). Result: cert_pem.
 * Not retried on 401 (no auth). */
void zm_ziti_enroll_ott(zm_ziti_t *z, const char *token, const char *csr_pem,
                        uint64_t deadline, zm_ziti_cb cb, void *data);

/* ---- generic Edge Management calls (services, configs, service policies,
 * identity PATCH/GET) ---------------------------------------------------- */

/* The controller caps limit at 500 and offset at 100000; so do we. */
#define ZM_ZITI_LIST_MAX 500u
#define ZM_ZITI_OFFSET_MAX 100000ul

/* METHOD /edge/management/v1<path>; body: JSON text or NULL. A 404 is
 * ZM_E_NOT_FOUND, except for DELETE: success with gone = 1. Result: json
 * (the response root, an object) and, for POST, id (data.id, required). */
void zm_ziti_call(zm_ziti_t *z, const char *method, const char *path,
                  const char *body, uint64_t deadline, zm_ziti_cb cb,
                  void *data);
/* One page: GET <path>?filter=<ZitiQL, percent-encoded here>&limit&offset.
 * filter NULL/"" = none; 1 <= limit <= ZM_ZITI_LIST_MAX. Result: json (data
 * is an array) and total/page_offset/page_limit (all required). */
void zm_ziti_list(zm_ziti_t *z, const char *path, const char *filter,
                  unsigned limit, unsigned long offset, uint64_t deadline,
                  zm_ziti_cb cb, void *data);
/* "/<collection>/<percent-encoded id><suffix>" (malloc'd). */
char *zm_ziti_path(const char *collection, const char *id, const char *suffix);
/* A ZitiQL string literal for value (malloc'd), or NULL if value holds a
 * control character ZitiQL cannot express. */
char *zm_ziti_quote(const char *value);

/* The cached CA bundle (PEM of every cert from /.well-known/est/cacerts), or
 * NULL if it has not been fetched yet. Owned by z; valid until the next loop
 * turn. */
const char *zm_ziti_ca_bundle(const zm_ziti_t *z);
/* Fetches the CA bundle now (or waits for a fetch in flight) and calls cb;
 * on success zm_ziti_ca_bundle() is non-NULL inside cb. */
void zm_ziti_fetch_ca_bundle(zm_ziti_t *z, uint64_t deadline, zm_ziti_cb cb,
                             void *data);
/* DER of the controller's TLS server (leaf) certificate from the latest
 * handshake, or NULL before any handshake. Owned by z. */
const uint8_t *zm_ziti_server_cert(const zm_ziti_t *z, size_t *len);

/* Counters for logs/metrics. reachable: 1 when the latest exchange got an
 * HTTP response (any status), 0 when it failed in transport (connect, TLS,
 * timeout, reset), -1 before any exchange finished. */
typedef struct {
  uint64_t requests, retries, reauths, failures, connects;
  uint64_t resumed; /* connections whose TLS handshake resumed a session */
  /* TLS handshake steps run on the workers / on the loop */
  uint64_t handshake_steps_offloaded, handshake_steps_inline;
  unsigned open_conns, busy_conns, queued;
  int reachable;
} zm_ziti_stats_t;
void zm_ziti_get_stats(const zm_ziti_t *z, zm_ziti_stats_t *out);

/* ---- per-endpoint exchange counters (metrics) ------------------------------
 * Every HTTP exchange (retries and re-authentications are exchanges of
 * their own) is counted under its endpoint and outcome: the HTTP status, or
 * ZM_ZITI_XCHG_ERROR when no response came back. */
#define ZM_ZITI_ENDPOINTS(X)                                                   \
  X(AUTHENTICATE, "authenticate")                                              \
  X(CREATE_IDENTITY, "create_identity")                                        \
  X(GET_IDENTITY, "get_identity")                                              \
  X(LIST_IDENTITIES, "list_identities")                                        \
  X(DELETE_IDENTITY, "delete_identity")                                        \
  X(ENROLL, "enroll")                                                          \
  X(CACERTS, "cacerts")                                                        \
  X(OTHER, "other")
typedef enum {
#define X(e, s) ZM_ZITI_EP_##e,
  ZM_ZITI_ENDPOINTS(X)
#undef X
      ZM_ZITI_EP__COUNT
} zm_ziti_endpoint_t;
#define ZM_ZITI_XCHG_ERROR 0 /* "status" of an exchange without a response */
#define ZM_ZITI_LAT_BUCKETS 14
extern const double zm_ziti_latency_bounds_s[ZM_ZITI_LAT_BUCKETS];
typedef struct {
  uint64_t by_status[600]; /* index: HTTP status 100..599, 0 = error */
  uint64_t lat_counts[ZM_ZITI_LAT_BUCKETS + 1];
  uint64_t lat_sum_ns;
} zm_ziti_ep_stats_t;
const char *zm_ziti_endpoint_name(zm_ziti_endpoint_t e);
/* The endpoint of a serialized request ("METHOD /path..."). Pure. */
zm_ziti_endpoint_t zm_ziti_classify(const char *req, size_t len);
const zm_ziti_ep_stats_t *zm_ziti_endpoint_stats(const zm_ziti_t *z,
                                                 zm_ziti_endpoint_t e);

#endif /* ZM_ZITI_H */
