/* status.c - controller failure -> gRPC status, shared by every handler
 * that calls the controller. */
#include "zm/app.h"

/* 1 for errors that say nothing about the request itself: the transport
 * failed (TLS alert or a connection closed during the handshake, e.g. a
 * controller restarting; any libuv/errno code such as ECONNREFUSED), so a
 * retry may succeed. */
static int transient(int err) {
  if (err == ZM_E_UNAVAILABLE || err == ZM_E_SHUTDOWN || err == ZM_E_TLS)
    return 1;
  /* our own codes live in (ZM_E__BASE, -2000]; everything else negative is
   * libuv's (-errno, -3000.., -4095..) */
  return err < 0 && (err <= ZM_E__BASE || err > ZM_E__BASE + 1000);
}

zm_grpc_status_t zm_rpc_status_from_ziti(const zm_ziti_result_t *r,
                                         uint64_t deadline, uint64_t now) {
  if (r->err == ZM_E_TIMEOUT)
    return now >= deadline ? ZM_GRPC_DEADLINE_EXCEEDED : ZM_GRPC_UNAVAILABLE;
  if (transient(r->err) || r->http_status >= 500 || r->http_status == 429)
    return ZM_GRPC_UNAVAILABLE;
  return ZM_GRPC_INTERNAL;
}
