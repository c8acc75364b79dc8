/* metrics.c - per-endpoint counters of controller exchanges. */
#include "ziti_int.h"

#include <string.h>

/* 1 ms .. 30 s: a controller call is a few ms on a LAN, seconds when the
 * controller is loaded (and the request timeout bounds it). */
const double zm_ziti_latency_bounds_s[ZM_ZITI_LAT_BUCKETS] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};

static const char *const EP_NAMES[] = {
#define X(e, s) s,
    ZM_ZITI_ENDPOINTS(X)
#undef X
};

const char *zm_ziti_endpoint_name(zm_ziti_endpoint_t e) {
  return (unsigned)e < ZM_ZITI_EP__COUNT ? EP_NAMES[e] : "other";
}

static int starts(const char *s, size_t len, const char *prefix) {
  size_t n = strlen(prefix);
  return len >= n && memcmp(s, prefix, n) == 0;
}

zm_ziti_endpoint_t zm_ziti_classify(const char *req, size_t len) {
  static const char MGMT[] = "/edge/management/v1/";
  if (req == NULL)
    return ZM_ZITI_EP_OTHER;
  const char *sp = memchr(req, ' ', len < 8 ? len : 8);
  if (sp == NULL)
    return ZM_ZITI_EP_OTHER;
  size_t mlen = (size_t)(sp - req);
  const char *path = sp + 1;
  size_t plen = len - mlen - 1;
  if (starts(path, plen, "/.well-known/est/cacerts"))
    return ZM_ZITI_EP_CACERTS;
  if (starts(path, plen, "/edge/client/v1/enroll"))
    return ZM_ZITI_EP_ENROLL;
  if (!starts(path, plen, MGMT))
    return ZM_ZITI_EP_OTHER;
  path += sizeof MGMT - 1;
  plen -= sizeof MGMT - 1;
  if (starts(path, plen, "authenticate"))
    return ZM_ZITI_EP_AUTHENTICATE;
  if (!starts(path, plen, "identities"))
    return ZM_ZITI_EP_OTHER;
  char next = plen > 10 ? path[10] : ' ';
  int item = next == '/';
  if (mlen == 4 && memcmp(req, "POST", 4) == 0 && !item)
    return ZM_ZITI_EP_CREATE_IDENTITY;
  if (mlen == 6 && memcmp(req, "DELETE", 6) == 0 && item)
    return ZM_ZITI_EP_DELETE_IDENTITY;
  if (mlen == 3 && memcmp(req, "GET", 3) == 0)
    return item ? ZM_ZITI_EP_GET_IDENTITY : ZM_ZITI_EP_LIST_IDENTITIES;
  return ZM_ZITI_EP_OTHER;
}

void zm__ziti_observe(zm_ziti_t *z, const zm__ziti_xchg_t *x, int status) {
  zm_ziti_endpoint_t e = zm_ziti_classify(x->req.base, x->req.len);
  zm_ziti_ep_stats_t *st = &z->ep_stats[e];
  st->by_status[status >= 100 && status < 600 ? status : 0]++;
  uint64_t ns = uv_hrtime() - x->start_ns;
  size_t b = 0;
  while (b < ZM_ZITI_LAT_BUCKETS &&
         (double)ns > zm_ziti_latency_bounds_s[b] * 1e9)
    b++;
  st->lat_counts[b]++;
  st->lat_sum_ns += ns;
}

const zm_ziti_ep_stats_t *zm_ziti_endpoint_stats(const zm_ziti_t *z,
                                                 zm_ziti_endpoint_t e) {
  return &z->ep_stats[e];
}
