/*
 * healthcheck.c - `ziti-management --health-check`: one blocking gRPC call to
 * grpc.health.v1.Health/Check over cleartext HTTP/2.
 *
 * This is a process of its own, started by the container runtime every few
 * seconds, so simplicity wins over the event loop: one non-blocking socket
 * waited on with poll() against a single monotonic deadline, and an nghttp2
 * client session fed through mem_recv/mem_send. Everything the server sends
 * is bounded: headers are copied into fixed buffers, the response body into a
 * fixed buffer (a HealthCheckResponse is a few bytes), and any overflow fails
 * the check instead of allocating.
 */
#include "zm/healthcheck.h"
#include "zm/zm.h"

#include "grpc/health/v1/health.pb-c.h"

#include <nghttp2/nghttp2.h>

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Longest host accepted in `addr`: a DNS name is at most 253 octets. */
#define HC_MAX_HOST 256
/* Longest HealthCheckRequest.service sent; service names are short. */
#define HC_MAX_SERVICE 512
/* Response body cap: a HealthCheckResponse is 2 bytes plus the 5-byte gRPC
 * prefix; anything much bigger is not a health server. */
#define HC_MAX_BODY 1024
/* grpc-message is copied for the error line only; longer ones are cut. */
#define HC_MAX_MESSAGE 256
/* Socket read chunk; the whole exchange is a few hundred bytes. */
#define HC_READ_CHUNK 4096

static const char PATH[] = "/grpc.health.v1.Health/Check";

typedef struct {
  int fd;
  int64_t deadline; /* CLOCK_MONOTONIC ms */
  int timeout_ms;   /* for the error line */
  int32_t stream_id;
  /* request body: 5-byte gRPC prefix + packed HealthCheckRequest */
  uint8_t req[5 + HC_MAX_SERVICE + 8];
  size_t req_len;
  size_t req_off;
  /* what came back on our stream */
  int http_status; /* 0 = none seen */
  int grpc_status; /* -1 = none seen */
  char grpc_message[HC_MAX_MESSAGE];
  uint8_t body[HC_MAX_BODY];
  size_t body_len;
  int body_overflow;
  int closed;          /* our stream closed */
  uint32_t close_code; /* RST_STREAM / GOAWAY error code, 0 = clean */
} hc_t;

/* ---- small helpers ------------------------------------------------------ */

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static int
fail(const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  fprintf(stderr, "ziti-management: health-check: %s\n", line);
  return 1;
}

static int64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left before the deadline, never negative. */
static int remaining(const hc_t *hc) {
  int64_t left = hc->deadline - mono_ms();
  return left > 0 ? (int)left : 0;
}

/*
 * Splits GRPC_ADDRESS syntax into host and port. A bracketed host is an IPv6
 * literal; an unbracketed host may not contain ':' (ambiguous). Wildcard and
 * empty hosts become the loopback of their family. Returns 0, or -1 if the
 * address is malformed.
 */
static int split_addr(const char *addr, char *host, size_t hostcap, char *port,
                      size_t portcap) {
  const char *h, *hend, *p;
  if (addr == NULL)
    return -1;
  if (addr[0] == '[') {
    h = addr + 1;
    hend = strchr(h, ']');
    if (hend == NULL || hend[1] != ':')
      return -1;
    p = hend + 2;
  } else {
    h = addr;
    hend = strchr(addr, ':');
    if (hend == NULL || strchr(hend + 1, ':') != NULL)
      return -1;
    p = hend + 1;
  }
  size_t hlen = (size_t)(hend - h);
  size_t plen = strlen(p);
  if (hlen >= hostcap || plen == 0 || plen > 5 || plen >= portcap)
    return -1;
  unsigned long pn = 0;
  for (size_t i = 0; i < plen; i++) {
    if (p[i] < '0' || p[i] > '9')
      return -1;
    pn = pn * 10 + (unsigned long)(p[i] - '0');
  }
  if (pn == 0 || pn > 65535)
    return -1;
  memcpy(port, p, plen + 1);
  memcpy(host, h, hlen);
  host[hlen] = '\0';
  if (hlen == 0 || strcmp(host, "0.0.0.0") == 0 || strcmp(host, "*") == 0)
    snprintf(host, hostcap, "127.0.0.1");
  else if (strcmp(host, "::") == 0)
    snprintf(host, hostcap, "::1");
  return 0;
}

/* Waits for `events` on the socket until the deadline. Returns 1 when ready,
 * 0 on timeout, -1 on a poll error (errno set). */
static int wait_fd(hc_t *hc, short events) {
  for (;;) {
    struct pollfd pfd = {.fd = hc->fd, .events = events};
    int left = remaining(hc);
    if (left == 0)
      return 0;
    int rv = poll(&pfd, 1, left);
    if (rv > 0)
      return 1;
    if (rv == 0)
      return 0;
    if (errno != EINTR)
      return -1;
  }
}

/* Connects to the first address of host:port that accepts, within the
 * deadline (name resolution itself is not bounded by it; GRPC_ADDRESS is
 * normally a literal). Returns 0 with hc->fd set, or 1 after printing why. */
static int dial(hc_t *hc, const char *host, const char *port,
                const char *authority) {
  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_NUMERICSERV};
  struct addrinfo *res = NULL;
  int rv = getaddrinfo(host, port, &hints, &res);
  if (rv != 0)
    return fail("resolve %s: %s", host, gai_strerror(rv));
  int err = ECONNREFUSED, timed_out = 0;
  for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
    int fd =
        socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
               ai->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    hc->fd = fd;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      err = 0;
    } else if (errno == EINPROGRESS) {
      int w = wait_fd(hc, POLLOUT);
      if (w == 0) {
        timed_out = 1;
        err = ETIMEDOUT;
      } else if (w < 0) {
        err = errno;
      } else {
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
          err = errno;
      }
    } else {
      err = errno;
    }
    if (err == 0) {
      int one = 1;
      (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      freeaddrinfo(res);
      return 0;
    }
    close(fd);
    hc->fd = -1;
    if (timed_out)
      break;
  }
  freeaddrinfo(res);
  if (timed_out)
    return fail("connect %s: timed out after %d ms", authority, hc->timeout_ms);
  return fail("connect %s: %s", authority, strerror(err));
}

/* Writes all of buf before the deadline. Returns 0, or 1 after printing. */
static int write_all(hc_t *hc, const uint8_t *buf, size_t len) {
  while (len > 0) {
    ssize_t n = send(hc->fd, buf, len, MSG_NOSIGNAL);
    if (n > 0) {
      buf += n;
      len -= (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int w = wait_fd(hc, POLLOUT);
      if (w == 0)
        return fail("timed out after %d ms (writing)", hc->timeout_ms);
      if (w < 0)
        return fail("poll: %s", strerror(errno));
      continue;
    }
    return fail("write: %s", n < 0 ? strerror(errno) : "no progress");
  }
  return 0;
}

/* ---- nghttp2 callbacks -------------------------------------------------- */

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *user_data) {
  hc_t *hc = user_data;
  (void)session;
  (void)flags;
  if (frame->hd.stream_id != hc->stream_id)
    return 0;
  if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
    int st = 0;
    for (size_t i = 0; i < valuelen && i < 3; i++)
      st = st * 10 + (value[i] >= '0' && value[i] <= '9' ? value[i] - '0' : 0);
    hc->http_status = st;
  } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
    /* gRPC codes are 0..16; anything non-numeric or long maps to UNKNOWN. */
    int st = 0, ok = valuelen > 0 && valuelen <= 3;
    for (size_t i = 0; ok && i < valuelen; i++) {
      if (value[i] < '0' || value[i] > '9')
        ok = 0;
      else
        st = st * 10 + (value[i] - '0');
    }
    hc->grpc_status = ok ? st : 2;
  } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
    size_t n = valuelen < sizeof(hc->grpc_message) - 1
                   ? valuelen
                   : sizeof(hc->grpc_message) - 1;
    /* Printable ASCII only: it goes to a log line as is (still
     * percent-encoded, which is fine for a diagnostic). */
    for (size_t i = 0; i < n; i++)
      hc->grpc_message[i] =
          value[i] >= 0x20 && value[i] < 0x7f ? (char)value[i] : '?';
    hc->grpc_message[n] = '\0';
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags,
                         int32_t stream_id, const uint8_t *data, size_t len,
                         void *user_data) {
  hc_t *hc = user_data;
  (void)session;
  (void)flags;
  if (stream_id != hc->stream_id)
    return 0;
  if (len > sizeof(hc->body) - hc->body_len) {
    hc->body_overflow = 1;
    return 0;
  }
  memcpy(hc->body + hc->body_len, data, len);
  hc->body_len += len;
  return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
                           uint32_t error_code, void *user_data) {
  hc_t *hc = user_data;
  (void)session;
  if (stream_id == hc->stream_id) {
    hc->closed = 1;
    hc->close_code = error_code;
  }
  return 0;
}

static ssize_t read_request(nghttp2_session *session, int32_t stream_id,
                            uint8_t *buf, size_t length, uint32_t *data_flags,
                            nghttp2_data_source *source, void *user_data) {
  hc_t *hc = user_data;
  (void)session;
  (void)stream_id;
  (void)source;
  size_t n = hc->req_len - hc->req_off;
  if (n > length)
    n = length;
  memcpy(buf, hc->req + hc->req_off, n);
  hc->req_off += n;
  if (hc->req_off == hc->req_len)
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

/* ---- the exchange ------------------------------------------------------- */

/* Builds the framed HealthCheckRequest into hc->req. Returns 0 or 1. */
static int build_request(hc_t *hc, const char *service) {
  Grpc__Health__V1__HealthCheckRequest req =
      GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  if (strlen(service) > HC_MAX_SERVICE)
    return fail("service name longer than %d bytes", HC_MAX_SERVICE);
  req.service = (char *)service;
  size_t n = grpc__health__v1__health_check_request__get_packed_size(&req);
  if (n > sizeof(hc->req) - 5)
    return fail("request too large");
  hc->req[0] = 0; /* not compressed */
  hc->req[1] = (uint8_t)(n >> 24);
  hc->req[2] = (uint8_t)(n >> 16);
  hc->req[3] = (uint8_t)(n >> 8);
  hc->req[4] = (uint8_t)n;
  grpc__health__v1__health_check_request__pack(&req, hc->req + 5);
  hc->req_len = 5 + n;
  hc->req_off = 0;
  return 0;
}

/* Submits SETTINGS and the request. Returns 0 or 1. */
static int submit(hc_t *hc, nghttp2_session *s, const char *authority) {
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
  if (nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, iv, ZM_ARRAY_SIZE(iv)) != 0)
    return fail("nghttp2_submit_settings failed");
  char timeout[24];
  /* grpc-timeout allows at most 8 digits: beyond ~27 h, say 99999999m. */
  int left = remaining(hc);
  snprintf(timeout, sizeof(timeout), "%dm", left > 99999999 ? 99999999 : left);
#define NV(n, v)                                                               \
  {                                                                            \
    (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v),                  \
        NGHTTP2_NV_FLAG_NONE                                                   \
  }
  const nghttp2_nv hdrs[] = {
      NV(":method", "POST"),
      NV(":scheme", "http"),
      NV(":path", PATH),
      NV(":authority", authority),
      NV("content-type", "application/grpc"),
      NV("te", "trailers"),
      NV("grpc-timeout", timeout),
      NV("user-agent", "ziti-management-healthcheck"),
  };
#undef NV
  nghttp2_data_provider prd = {.source = {.ptr = NULL},
                               .read_callback = read_request};
  int32_t id =
      nghttp2_submit_request(s, NULL, hdrs, ZM_ARRAY_SIZE(hdrs), &prd, NULL);
  if (id < 0)
    return fail("nghttp2_submit_request: %s", nghttp2_strerror(id));
  hc->stream_id = id;
  return 0;
}

/* Runs the session until our stream closes. Returns 0 or 1. */
static int pump(hc_t *hc, nghttp2_session *s) {
  uint8_t buf[HC_READ_CHUNK];
  for (;;) {
    for (;;) {
      const uint8_t *out;
      ssize_t n = nghttp2_session_mem_send(s, &out);
      if (n < 0)
        return fail("nghttp2: %s", nghttp2_strerror((int)n));
      if (n == 0)
        break;
      if (write_all(hc, out, (size_t)n) != 0)
        return 1;
    }
    if (hc->closed)
      return 0;
    if (!nghttp2_session_want_read(s))
      return fail("connection ended before the response");
    int w = wait_fd(hc, POLLIN);
    if (w == 0)
      return fail("timed out after %d ms", hc->timeout_ms);
    if (w < 0)
      return fail("poll: %s", strerror(errno));
    ssize_t n = recv(hc->fd, buf, sizeof(buf), 0);
    if (n == 0)
      return fail("connection closed by the server before the response");
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
        continue;
      return fail("read: %s", strerror(errno));
    }
    ssize_t rv = nghttp2_session_mem_recv(s, buf, (size_t)n);
    if (rv < 0)
      return fail("HTTP/2 protocol error: %s", nghttp2_strerror((int)rv));
  }
}

/* Judges what came back. Returns 0 for SERVING, else 1 after printing. */
static int verdict(const hc_t *hc) {
  if (hc->grpc_status < 0) {
    if (hc->close_code != 0)
      return fail("stream reset by the server (HTTP/2 error %u)",
                  (unsigned)hc->close_code);
    if (hc->http_status != 200)
      return fail("HTTP status %d, no grpc-status", hc->http_status);
    return fail("response without grpc-status");
  }
  if (hc->grpc_status != 0)
    return fail("grpc-status %d%s%s", hc->grpc_status,
                hc->grpc_message[0] ? ": " : "", hc->grpc_message);
  if (hc->body_overflow)
    return fail("response larger than %d bytes", HC_MAX_BODY);
  if (hc->body_len < 5)
    return fail("response without a message");
  uint32_t len = (uint32_t)hc->body[1] << 24 | (uint32_t)hc->body[2] << 16 |
                 (uint32_t)hc->body[3] << 8 | hc->body[4];
  if (hc->body[0] != 0)
    return fail("compressed response not supported");
  if ((size_t)len != hc->body_len - 5)
    return fail("malformed response framing");
  Grpc__Health__V1__HealthCheckResponse *resp =
      grpc__health__v1__health_check_response__unpack(NULL, len, hc->body + 5);
  if (resp == NULL)
    return fail("malformed HealthCheckResponse");
  int status = (int)resp->status;
  grpc__health__v1__health_check_response__free_unpacked(resp, NULL);
  if (status ==
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING)
    return 0;
  const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(
      &grpc__health__v1__health_check_response__serving_status__descriptor,
      status);
  return fail("status %s", ev != NULL ? ev->name : "(unknown)");
}

int zm_healthcheck_run(const char *addr, const char *service, int timeout_ms) {
  char host[HC_MAX_HOST], port[8], authority[HC_MAX_HOST + 16];
  nghttp2_session_callbacks *cbs = NULL;
  nghttp2_session *s = NULL;
  hc_t hc;
  int rv = 1;

  memset(&hc, 0, sizeof(hc));
  hc.fd = -1;
  hc.grpc_status = -1;
  hc.timeout_ms = timeout_ms > 0 ? timeout_ms : ZM_HEALTHCHECK_TIMEOUT_MS;
  hc.deadline = mono_ms() + hc.timeout_ms;
  if (service == NULL)
    service = "";

  if (split_addr(addr, host, sizeof(host), port, sizeof(port)) != 0)
    return fail("bad address \"%.64s\" (want host:port or :port)",
                addr ? addr : "");
  snprintf(authority, sizeof(authority),
           strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
  if (build_request(&hc, service) != 0)
    return 1;
  if (dial(&hc, host, port, authority) != 0)
    return 1;

  if (nghttp2_session_callbacks_new(&cbs) != 0) {
    fail("out of memory");
    goto fail_cbs;
  }
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  if (nghttp2_session_client_new(&s, cbs, &hc) != 0) {
    fail("out of memory");
    goto fail_session;
  }
  if (submit(&hc, s, authority) != 0 || pump(&hc, s) != 0)
    goto fail_exchange;
  rv = verdict(&hc);

fail_exchange:
  nghttp2_session_del(s);
fail_session:
  nghttp2_session_callbacks_del(cbs);
fail_cbs:
  close(hc.fd);
  return rv;
}
