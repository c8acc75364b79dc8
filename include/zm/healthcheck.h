/*
 * healthcheck.h - the `ziti-management --health-check` mode: a tiny blocking
 * gRPC client that asks a running server grpc.health.v1.Health/Check.
 *
 * It runs in its own short-lived process (the container image's HEALTHCHECK
 * starts it), so it blocks on one TCP socket with poll() timeouts instead of
 * using the libuv loop. It speaks cleartext HTTP/2 (h2c, prior knowledge)
 * through an nghttp2 client session driven by mem_send/mem_recv.
 */
#ifndef ZM_HEALTHCHECK_H
#define ZM_HEALTHCHECK_H

/* Default overall budget of one check, connect to trailers, in ms. Docker's
 * own HEALTHCHECK timeout defaults to 30 s; a live server answers in < 1 ms. */
#define ZM_HEALTHCHECK_TIMEOUT_MS 5000

/*
 * Calls grpc.health.v1.Health/Check on the server listening at `addr` and
 * waits at most `timeout_ms` (<= 0 means ZM_HEALTHCHECK_TIMEOUT_MS) in total.
 *
 * `addr` uses GRPC_ADDRESS's syntax: "host:port", ":port", "[v6]:port". A
 * wildcard or empty host (":50051", "0.0.0.0:50051", "[::]:50051") is dialled
 * on the loopback address of the same family, since a listener bound to the
 * wildcard answers there. `service` is the HealthCheckRequest.service field;
 * NULL is treated as "" (the whole server).
 *
 * Returns 0 if the server answered grpc-status 0 with status SERVING, and 1
 * otherwise (bad address, connect error, timeout, protocol error, non-zero
 * grpc-status, any other serving status). On failure exactly one line saying
 * why is written to stderr. Never logs through zm_log (the check's output is
 * what the container runtime records). Does not touch signals or globals.
 */
int zm_healthcheck_run(const char *addr, const char *service, int timeout_ms);

#endif /* ZM_HEALTHCHECK_H */
