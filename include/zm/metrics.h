/*
 * metrics.h - Prometheus text exposition (format 0.0.4) and the small
 * HTTP/1.1 listener that serves it with the probes (METRICS_ADDRESS).
 *
 * The writer (zm_prom_*) is pure: it appends to a bounded buffer, escapes
 * label values, and writes histograms from non-cumulative bucket counts.
 *
 * The listener (zm_metrics_srv_*) runs on the service's loop and is built so
 * that nobody reaching it can hurt the gRPC hot path: at most max_conns
 * connections (more are closed at once), a request head of at most
 * ZM_METRICS_MAX_HEAD bytes, one request at a time per connection (a
 * pipelined tail waits, bounded), the whole exchange under timeout_ms (a
 * client that sends slowly or does not read its response is closed), and
 * responses built in one piece and handed to one uv_write. Routes:
 *   GET|HEAD /metrics  200 text/plain; version=0.0.4
 *   GET|HEAD /healthz  200 "ok" while the loop runs (liveness)
 *   GET|HEAD /readyz   200 "ready", or 503 with the reason (readiness)
 * anything else 404, other methods 405, malformed requests 400.
 */
#ifndef ZM_METRICS_H
#define ZM_METRICS_H

#include "zm/zm.h"

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* ---- text exposition writer --------------------------------------------- */

typedef struct {
  char *buf;
  size_t len, cap;
  size_t max; /* hard bound; output past it is dropped, truncated = 1 */
  int truncated;
} zm_prom_t;

void zm_prom_init(zm_prom_t *p, size_t max);
void zm_prom_dispose(zm_prom_t *p);
/* "# HELP name help" and "# TYPE name type" (counter, gauge, histogram). */
void zm_prom_family(zm_prom_t *p, const char *name, const char *type,
                    const char *help);
/* One sample: name{k1="v1",...} value. labels: n pairs (key, value), values
 * escaped (\\, \", \n). */
void zm_prom_sample(zm_prom_t *p, const char *name, const char *const *labels,
                    size_t n_pairs, double value);
void zm_prom_sample_u64(zm_prom_t *p, const char *name,
                        const char *const *labels, size_t n_pairs,
                        uint64_t value);
/* A histogram: name_bucket{...,le="b"} (cumulative), name_sum, name_count.
 * counts has nb + 1 entries (the last is +Inf), not cumulative. */
void zm_prom_histogram(zm_prom_t *p, const char *name,
                       const char *const *labels, size_t n_pairs,
                       const double *bounds, size_t nb, const uint64_t *counts,
                       double sum);

/* ---- the listener ---------------------------------------------------------
 */

/* Request head bound: a scrape or probe request is well under 1 KiB. */
#define ZM_METRICS_MAX_HEAD (8u * 1024)

typedef struct {
  const char *address; /* "host:port" as GRPC_ADDRESS */
  unsigned max_conns;  /* default 16 */
  uint64_t timeout_ms; /* per exchange and idle keep-alive, default 10 s */
  size_t max_body;     /* bound of a rendered /metrics, default 8 MiB */
  /* Renders /metrics. */
  void (*render)(zm_prom_t *out, void *data);
  /* Readiness: 1 = ready; else 0 with a short reason in why. */
  int (*ready)(void *data, char *why, size_t cap);
  void *data;
} zm_metrics_config_t;

typedef struct {
  uint64_t requests, scrapes, rejected_conns, timeouts, bad_requests;
  unsigned open_conns;
} zm_metrics_srv_stats_t;

typedef struct zm_metrics_srv zm_metrics_srv_t;

/* Validates the address and prepares (binds nothing). ZM_E_INVAL if the
 * address does not parse. */
int zm_metrics_srv_new(zm_metrics_srv_t **out, uv_loop_t *loop,
                       const zm_metrics_config_t *cfg);
/* Binds and listens: 0 or a libuv error. */
int zm_metrics_srv_listen(zm_metrics_srv_t *s);
int zm_metrics_srv_port(const zm_metrics_srv_t *s);
/* Closes the listener and every connection; done(data) once all handles are
 * closed; then zm_metrics_srv_free. */
void zm_metrics_srv_close(zm_metrics_srv_t *s, void (*done)(void *),
                          void *data);
void zm_metrics_srv_free(zm_metrics_srv_t *s);
void zm_metrics_srv_get_stats(const zm_metrics_srv_t *s,
                              zm_metrics_srv_stats_t *out);

#endif /* ZM_METRICS_H */
