/*
 * resolve.h - name resolution for controller connections on threads of
 * their own. uv_getaddrinfo() runs in libuv's 4-thread pool, where it
 * waited behind key generation and JWT verification (RSA-4096 with 256
 * enrollments in flight exceeded the connect timeout, and the request that
 * failed could be a compensation or a GC delete). These threads do nothing
 * else, so a lookup waits only for other lookups.
 *
 * Completion is always from the loop (uv_async), never inside
 * zm__resolve(); a cancelled request still completes, with UV_ECANCELED.
 */
#ifndef ZM_ZITI_RESOLVE_H
#define ZM_ZITI_RESOLVE_H

#include <netdb.h>
#include <uv.h>

/* Lookups run at once: a slow DNS server delays at most this many. */
#define ZM_RESOLVER_THREADS 2

typedef struct zm__resolver zm__resolver_t;
typedef struct zm__resolve_req zm__resolve_req_t;

/* status 0 with res (free with freeaddrinfo), or a libuv error (UV_EAI_*,
 * UV_ECANCELED) with res NULL. */
typedef void (*zm__resolve_cb)(zm__resolve_req_t *req, int status,
                               struct addrinfo *res);

struct zm__resolve_req {
  zm__resolve_req_t *next; /* queue link, owned by the resolver */
  char host[256];
  char port[8];
  int family; /* AF_UNSPEC, AF_INET, AF_INET6 */
  int status;
  struct addrinfo *res;
  int cancelled;
  zm__resolve_cb cb;
};

/* Returns 0, or a libuv error (threads or async handle not created). */
int zm__resolver_new(zm__resolver_t **out, uv_loop_t *loop);
/* Queues a lookup. Returns 0, or UV_EINVAL (name too long). */
int zm__resolve(zm__resolver_t *r, zm__resolve_req_t *req, const char *host,
                const char *port, zm__resolve_cb cb);
/* The request completes with UV_ECANCELED (soon, or when its lookup ends). */
void zm__resolve_cancel(zm__resolver_t *r, zm__resolve_req_t *req);
/* No request may be pending. Stops the threads, closes the async handle and
 * calls done(data) once everything is freed. */
void zm__resolver_close(zm__resolver_t *r, void (*done)(void *data),
                        void *data);

#endif /* ZM_ZITI_RESOLVE_H */
