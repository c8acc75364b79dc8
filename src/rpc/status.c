/* status.c - controller failure -> gRPC status, shared by every handler
 * that calls the controller. */
#include "zm/app.h"

zm_grpc_status_t zm_rpc_status_from_ziti(const zm_ziti_result_t *r,
                                         uint64_t deadline, uint64_t now) {
  if (r->err == ZM_E_TIMEOUT)
    return now >= deadline ? ZM_GRPC_DEADLINE_EXCEEDED : ZM_GRPC_UNAVAILABLE;
  if (r->err == ZM_E_UNAVAILABLE || r->err == ZM_E_SHUTDOWN ||
      r->http_status >= 500 || r->http_status == 429 || r->err < -3000)
    return ZM_GRPC_UNAVAILABLE;
  return ZM_GRPC_INTERNAL;
}
