/*
 * ziti_int.h - internals shared by the files of the controller client:
 * the client object, the connection pool (client.c) and its exchanges (one
 * HTTP request/response each), and the deferral queue. api.c builds the
 * Edge API calls on top of exchanges.
 */
#ifndef ZM_ZITI_INT_H
#define ZM_ZITI_INT_H

#include "http1.h"
#include "resolve.h"
#include "tls.h"
#include "zm/ziti.h"

#include <uv.h>

/* ---- intrusive doubly linked list (circular, with a head node) ----------- */

typedef struct zm__ziti_link {
  struct zm__ziti_link *prev, *next;
} zm__ziti_link_t;

static inline void zm__ziti_list_init(zm__ziti_link_t *h) {
  h->prev = h->next = h;
}
static inline int zm__ziti_list_empty(const zm__ziti_link_t *h) {
  return h->next == h;
}
static inline void zm__ziti_list_insert_tail(zm__ziti_link_t *h,
                                             zm__ziti_link_t *n) {
  n->prev = h->prev;
  n->next = h;
  h->prev->next = n;
  h->prev = n;
}
static inline void zm__ziti_list_insert_head(zm__ziti_link_t *h,
                                             zm__ziti_link_t *n) {
  n->next = h->next;
  n->prev = h;
  h->next->prev = n;
  h->next = n;
}
static inline void zm__ziti_list_remove(zm__ziti_link_t *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}

/* ---- deferral: work run from a uv_idle on the next loop turn ------------- */

typedef struct zm__ziti_defer {
  zm__ziti_link_t link;
  void (*fn)(struct zm__ziti_defer *d);
  int queued;
} zm__ziti_defer_t;

/* ---- exchanges
 * --------------------------------------------------------------- */

typedef struct zm__ziti_xchg zm__ziti_xchg_t;
typedef struct zm__ziti_conn zm__ziti_conn_t;

/* err = 0: x->resp holds a complete response. Else a ZM_E_* code and a
 * static, secret-free reason. Always called from the loop, never from
 * zm__ziti_xchg_start(); the pool no longer references x afterwards. */
typedef void (*zm__ziti_xchg_cb)(zm__ziti_xchg_t *x, int err, const char *why);

struct zm__ziti_xchg {
  zm_ziti_t *z;
  zm_secret_t req;      /* serialized request: owned, may hold the session */
  uint64_t deadline;    /* uv_now() ms */
  int retried;          /* already retried on a fresh connection */
  int queued;           /* on z->queue */
  zm_http1_resp_t resp; /* initialized by the owner, reset on start */
  zm__ziti_conn_t *conn;
  zm__ziti_link_t link;   /* z->queue */
  zm__ziti_defer_t defer; /* early failure */
  int err;
  const char *why;
  zm__ziti_xchg_cb cb;
  void *data;
  uint64_t start_ns; /* uv_hrtime() at start: exchange latency (metrics) */
};

/* ---- the client
 * --------------------------------------------------------------- */

typedef struct zm__ziti_op zm__ziti_op_t;

struct zm_ziti {
  uv_loop_t *loop;
  zm_ziti_config_t cfg; /* strings below are owned copies */
  char *host;           /* URL host without brackets */
  char *host_header;    /* "host:port" as sent in Host */
  int port;
  WOLFSSL_CTX *tls_ctx;
  /* Bumped when tls_ctx is replaced by files read again (a 401: the admin
   * certificate may have been renewed); a connection of an older one closes
   * instead of serving again. */
  unsigned ctx_gen;
  int creds_stale;     /* read the files again before the next authentication */
  uv_work_t creds_req; /* the reading, on libuv's threads: blocking file I/O */
  WOLFSSL_CTX *creds_ctx;
  int creds_rc;
  const char *creds_why;
  void (*creds_cb)(zm_ziti_t *z, int err);
  /* The latest TLS session with the controller, offered for resumption by
   * the next connection: no certificate chain and CertificateVerify checks
   * on the loop for it. NULL when none (or after a failed handshake). */
  WOLFSSL_SESSION *tls_session;
  zm__resolver_t *resolver; /* controller host lookups (resolve.h) */

  /* pool (client.c) */
  zm__ziti_link_t conns; /* every connection, closing ones included */
  unsigned n_open;       /* connections not closing */
  unsigned n_busy;
  unsigned n_connecting;
  zm__ziti_link_t queue; /* exchanges waiting for a connection, FIFO */
  unsigned n_queued;
  uv_timer_t queue_timer;   /* earliest deadline of a queued exchange */
  uint64_t queue_timer_due; /* 0 = not armed */

  /* deferral */
  uv_idle_t idle;
  zm__ziti_link_t deferred;

  /* api (api.c) */
  zm__ziti_link_t ops; /* every live op */
  zm__ziti_link_t auth_waiters;
  zm_secret_t session;  /* zt-session token, empty when none */
  unsigned session_gen; /* bumped whenever the session changes */
  int auth_inflight;
  zm__ziti_xchg_t auth_x;
  uv_timer_t cacerts_timer;
  char *ca_bundle;      /* PEM, owned */
  uint8_t *server_cert; /* DER, owned */
  size_t server_cert_len;
  uint64_t rng; /* xorshift state for backoff jitter */

  zm_ziti_stats_t stats;
  zm_ziti_ep_stats_t *ep_stats; /* ZM_ZITI_EP__COUNT */

  /* shutdown */
  int closing;
  int z_handles; /* idle, queue_timer, cacerts_timer still open */
  void (*close_done)(void *data);
  void *close_data;
};

/* client.c */
int zm__ziti_pool_init(zm_ziti_t *z);
/* Queues x (req, deadline, cb, data set by the caller). */
void zm__ziti_xchg_start(zm_ziti_t *z, zm__ziti_xchg_t *x);
/* Fails queued and in-flight exchanges with ZM_E_SHUTDOWN and closes every
 * connection. */
void zm__ziti_pool_shutdown(zm_ziti_t *z);
void zm__ziti_defer(zm_ziti_t *z, zm__ziti_defer_t *d,
                    void (*fn)(zm__ziti_defer_t *d));
/* Reads the CA, certificate and key files again, off the loop, into the
 * context of the connections opened from now on (those open close once
 * idle), then calls cb on the loop: 0, ZM_E_TLS (unreadable or invalid: the
 * context in use stays) or ZM_E_SHUTDOWN. One at a time. */
void zm__ziti_creds_reload(zm_ziti_t *z, void (*cb)(zm_ziti_t *z, int err));
/* Called whenever something that shutdown waits for went away. */
void zm__ziti_maybe_finish(zm_ziti_t *z);

/* metrics.c: counts a finished exchange (status 0 = no response). */
void zm__ziti_observe(zm_ziti_t *z, const zm__ziti_xchg_t *x, int status);

/* api.c */
int zm__ziti_api_init(zm_ziti_t *z);
void zm__ziti_api_shutdown(zm_ziti_t *z);

#endif /* ZM_ZITI_INT_H */
