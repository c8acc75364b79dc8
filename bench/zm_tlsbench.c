/*
 * zm_tlsbench.c - zm-tlsbench: unary gRPC calls over h2c or over TLS with a
 * client certificate (mTLS, wolfSSL), the case h2load cannot drive.
 * Single thread, poll(), non-blocking sockets; C connections x M streams in
 * flight each (closed loop) until N calls are answered.
 *
 * TLS: client certificate/key and the CA that signed the server's, ALPN h2.
 * With --resume (the default) the first connection makes a full handshake
 * and one call (so a TLS 1.3 NewSessionTicket has arrived), its session is
 * saved and every other connection resumes with it; the report says how many
 * did. The load starts once every connection is up; the clock and the
 * latencies cover the load only (handshakes are timed separately).
 *
 * The request is a fixed gRPC message (-d FILE: the framed request, as for
 * h2load); an answer counts as OK with :status 200 and grpc-status 0.
 *
 * --hold S (for RSS measurements: bench/idle-conns.sh): once every
 * connection has made its one warm-up call, prints "READY n", keeps them
 * open and idle S seconds and exits without the load.
 *
 * Usage: zm-tlsbench [-c 32] [-m 32] [-n 400000] -d req.bin -p PATH
 *        [--tls [--cert C --key K] --ca CA [--no-resume]] [--hold S]
 *        HOST PORT
 */
#include <wolfssl/options.h>

#include <wolfssl/ssl.h>

#include <nghttp2/nghttp2.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 60000
#define OUT_CAP (1u << 20)
/* Connections set up (handshake, then one call each) per batch. */
#define WARMUP_BATCH 256

typedef struct conn conn_t;
typedef struct {
  conn_t *c;
  uint64_t t0;
  int http_ok;
  int grpc_ok;
} stream_t;

struct conn {
  int fd;
  WOLFSSL *ssl;
  nghttp2_session *h2;
  int up; /* handshake done (TLS) / connected (h2c) */
  int inflight;
  int resumed;
  uint64_t hs_ns; /* connect + handshake */
  uint8_t *out;
  size_t out_len;
};

static struct {
  const char *host, *path;
  int port, conns, streams, tls, resume, hold;
  long total;
  const char *cert, *key, *ca;
  uint8_t *req;
  size_t req_len;
  long submitted, done, ok, failed;
  uint32_t *lat_us;
  int measuring;
} g = {.conns = 32, .streams = 32, .total = 400000, .resume = 1};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *m) {
  fprintf(stderr, "zm-tlsbench: %s\n", m);
  exit(2);
}

/* ---- nghttp2 ------------------------------------------------------------ */

static ssize_t h2_send(nghttp2_session *s, const uint8_t *d, size_t n,
                       int flags, void *ud) {
  (void)s;
  (void)flags;
  conn_t *c = ud;
  if (c->out_len + n > OUT_CAP)
    return c->out_len == 0 ? (ssize_t)0 : NGHTTP2_ERR_WOULDBLOCK;
  memcpy(c->out + c->out_len, d, n);
  c->out_len += n;
  return (ssize_t)n;
}

static int h2_header(nghttp2_session *s, const nghttp2_frame *f,
                     const uint8_t *name, size_t nl, const uint8_t *value,
                     size_t vl, uint8_t flags, void *ud) {
  (void)flags;
  (void)ud;
  if (f->hd.type != NGHTTP2_HEADERS)
    return 0;
  stream_t *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (st == NULL)
    return 0;
  if (nl == 7 && memcmp(name, ":status", 7) == 0)
    st->http_ok = vl == 3 && memcmp(value, "200", 3) == 0;
  else if (nl == 11 && memcmp(name, "grpc-status", 11) == 0)
    st->grpc_ok = vl == 1 && value[0] == '0';
  return 0;
}

static int h2_close(nghttp2_session *s, int32_t sid, uint32_t err, void *ud) {
  (void)err;
  (void)ud;
  stream_t *st = nghttp2_session_get_stream_user_data(s, sid);
  if (st == NULL)
    return 0;
  conn_t *c = st->c;
  c->inflight--;
  g.done++;
  if (st->http_ok && st->grpc_ok) {
    g.ok++;
    if (g.measuring && g.lat_us != NULL && g.ok <= g.total)
      g.lat_us[g.ok - 1] = (uint32_t)((now_ns() - st->t0) / 1000);
  } else {
    g.failed++;
    if (g.failed <= 3 && g.measuring)
      fprintf(stderr, "zm-tlsbench: call failed (http %s, grpc %s)\n",
              st->http_ok ? "200" : "not 200", st->grpc_ok ? "0" : "not 0");
  }
  free(st);
  return 0;
}

static ssize_t req_read(nghttp2_session *s, int32_t sid, uint8_t *buf,
                        size_t len, uint32_t *flags, nghttp2_data_source *src,
                        void *ud) {
  (void)s;
  (void)sid;
  (void)ud;
  size_t *off = src->ptr;
  size_t n = g.req_len - *off;
  if (n > len)
    n = len;
  memcpy(buf, g.req + *off, n);
  *off += n;
  if (*off == g.req_len) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    free(off);
  }
  return (ssize_t)n;
}

#define NV(n, v)                                                               \
  { (uint8_t *)(n), (uint8_t *)(v), strlen(n), strlen(v), NGHTTP2_NV_FLAG_NONE }

static void submit(conn_t *c) {
  stream_t *st = calloc(1, sizeof *st);
  size_t *off = calloc(1, sizeof *off);
  if (st == NULL || off == NULL)
    die("out of memory");
  st->c = c;
  st->t0 = now_ns();
  char authority[64];
  snprintf(authority, sizeof authority, "%s:%d", g.host, g.port);
  nghttp2_nv hdrs[] = {
      NV(":method", "POST"),
      NV(":scheme", g.tls ? "https" : "http"),
      NV(":path", g.path),
      NV(":authority", authority),
      NV("content-type", "application/grpc"),
      NV("te", "trailers"),
  };
  nghttp2_data_provider dp = {.source.ptr = off, .read_callback = req_read};
  if (nghttp2_submit_request(c->h2, NULL, hdrs, 6, &dp, st) < 0)
    die("nghttp2_submit_request");
  c->inflight++;
  g.submitted++;
}

/* ---- transport ---------------------------------------------------------- */

static void flush(conn_t *c) {
  if (c->up && nghttp2_session_want_write(c->h2) && c->out_len < OUT_CAP / 2)
    if (nghttp2_session_send(c->h2) != 0)
      die("nghttp2_session_send");
  while (c->out_len > 0) {
    ssize_t n;
    if (c->ssl != NULL) {
      int r = wolfSSL_write(c->ssl, c->out, (int)c->out_len);
      if (r <= 0) {
        int e = wolfSSL_get_error(c->ssl, r);
        if (e == WOLFSSL_ERROR_WANT_WRITE || e == WOLFSSL_ERROR_WANT_READ)
          return;
        die("TLS write failed");
      }
      n = r;
    } else {
      n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
          return;
        die("send failed");
      }
    }
    memmove(c->out, c->out + n, c->out_len - (size_t)n);
    c->out_len -= (size_t)n;
  }
}

static void feed(conn_t *c, const uint8_t *p, size_t n) {
  if (nghttp2_session_mem_recv(c->h2, p, n) != (ssize_t)n)
    die("nghttp2_session_mem_recv");
}

/* Reads what is there; returns -1 when the peer closed. */
static int readable(conn_t *c) {
  static uint8_t buf[64 * 1024];
  for (;;) {
    if (c->ssl != NULL) {
      int r = wolfSSL_read(c->ssl, buf, sizeof buf);
      if (r <= 0) {
        int e = wolfSSL_get_error(c->ssl, r);
        if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
          return 0;
        return -1;
      }
      feed(c, buf, (size_t)r);
    } else {
      ssize_t r = recv(c->fd, buf, sizeof buf, 0);
      if (r == 0)
        return -1;
      if (r < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -1;
      feed(c, buf, (size_t)r);
    }
  }
}

static WOLFSSL_CTX *ctx;
static WOLFSSL_SESSION *saved;

static void conn_open(conn_t *c) {
  uint64_t t0 = now_ns();
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)g.port)};
  if (inet_pton(AF_INET, g.host, &sa.sin_addr) != 1)
    die("HOST must be an IPv4 address");
  if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0)
    die("connect failed");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->out = malloc(OUT_CAP);
  nghttp2_session_callbacks *cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_send_callback(cbs, h2_send);
  nghttp2_session_callbacks_set_on_header_callback(cbs, h2_header);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, h2_close);
  if (nghttp2_session_client_new(&c->h2, cbs, c) != 0)
    die("nghttp2_session_client_new");
  nghttp2_session_callbacks_del(cbs);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 24}};
  nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, 1);
  nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, 1 << 30);
  if (g.tls) {
    /* blocking handshake: connections are set up before the load */
    c->ssl = wolfSSL_new(ctx);
    if (c->ssl == NULL)
      die("wolfSSL_new");
    wolfSSL_set_fd(c->ssl, c->fd);
    if (wolfSSL_UseALPN(c->ssl, (char *)"h2", 2,
                        WOLFSSL_ALPN_FAILED_ON_MISMATCH) != WOLFSSL_SUCCESS)
      die("ALPN");
    if (saved != NULL && wolfSSL_set_session(c->ssl, saved) != WOLFSSL_SUCCESS)
      die("wolfSSL_set_session");
    int r = wolfSSL_connect(c->ssl);
    if (r != WOLFSSL_SUCCESS) {
      char eb[128];
      wolfSSL_ERR_error_string_n((unsigned long)wolfSSL_get_error(c->ssl, r),
                                 eb, sizeof eb);
      fprintf(stderr, "zm-tlsbench: TLS handshake: %s\n", eb);
      exit(2);
    }
    c->resumed = wolfSSL_session_reused(c->ssl);
  }
  c->hs_ns = now_ns() - t0;
  fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
  c->up = 1;
}

/* Runs the loop until `until` calls are done in total. */
static void run(conn_t *cs, int n, long until, long budget) {
  static struct pollfd pf[MAX_CONNS];
  while (g.done < until) {
    for (int i = 0; i < n; i++) {
      conn_t *c = &cs[i];
      while (c->inflight < g.streams && g.submitted < budget)
        submit(c);
      flush(c);
      pf[i].fd = c->fd;
      pf[i].events = POLLIN | (c->out_len > 0 ? POLLOUT : 0);
      pf[i].revents = 0;
    }
    if (poll(pf, (nfds_t)n, 10000) <= 0)
      die("poll: nothing happened for 10 s");
    for (int i = 0; i < n; i++) {
      if (pf[i].revents & (POLLIN | POLLERR | POLLHUP))
        if (readable(&cs[i]) < 0)
          die("connection closed by the server");
      if (pf[i].revents & POLLOUT)
        flush(&cs[i]);
    }
  }
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  static const struct option lo[] = {{"tls", no_argument, NULL, 't'},
                                     {"cert", required_argument, NULL, 'C'},
                                     {"key", required_argument, NULL, 'K'},
                                     {"ca", required_argument, NULL, 'A'},
                                     {"no-resume", no_argument, NULL, 'R'},
                                     {"hold", required_argument, NULL, 'H'},
                                     {NULL, 0, NULL, 0}};
  const char *data = NULL;
  int o;
  while ((o = getopt_long(argc, argv, "c:m:n:d:p:", lo, NULL)) != -1) {
    switch (o) {
    case 'c':
      g.conns = atoi(optarg);
      break;
    case 'm':
      g.streams = atoi(optarg);
      break;
    case 'n':
      g.total = atol(optarg);
      break;
    case 'd':
      data = optarg;
      break;
    case 'p':
      g.path = optarg;
      break;
    case 't':
      g.tls = 1;
      break;
    case 'C':
      g.cert = optarg;
      break;
    case 'K':
      g.key = optarg;
      break;
    case 'A':
      g.ca = optarg;
      break;
    case 'R':
      g.resume = 0;
      break;
    case 'H':
      g.hold = atoi(optarg);
      break;
    default:
      return 2;
    }
  }
  if (optind + 2 != argc || data == NULL || g.path == NULL || g.conns < 1 ||
      g.conns > MAX_CONNS || g.streams < 1 || g.total < 1)
    die("usage: zm-tlsbench [-c C] [-m M] [-n N] -d req.bin -p PATH [--tls "
        "[--cert C --key K] --ca CA [--no-resume]] [--hold S] HOST PORT");
  g.host = argv[optind];
  g.port = atoi(argv[optind + 1]);
  FILE *f = fopen(data, "rb");
  if (f == NULL)
    die("cannot open -d");
  g.req = malloc(1 << 16);
  g.req_len = fread(g.req, 1, 1 << 16, f);
  fclose(f);
  if (g.tls) {
    wolfSSL_Init();
    ctx = wolfSSL_CTX_new(wolfTLS_client_method());
    if (ctx == NULL)
      die("wolfSSL_CTX_new");
    if (g.ca == NULL ||
        wolfSSL_CTX_load_verify_locations(ctx, g.ca, NULL) != WOLFSSL_SUCCESS)
      die("--ca: cannot load");
    if (g.cert != NULL &&
        (wolfSSL_CTX_use_certificate_chain_file(ctx, g.cert) !=
             WOLFSSL_SUCCESS ||
         wolfSSL_CTX_use_PrivateKey_file(ctx, g.key, WOLFSSL_FILETYPE_PEM) !=
             WOLFSSL_SUCCESS))
      die("--cert/--key: cannot load");
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, NULL);
  }
  conn_t *cs = calloc((size_t)g.conns, sizeof *cs);
  /* the first connection, one call: its session (and, TLS 1.3, the ticket
   * that came after the handshake) is what the others resume */
  conn_open(&cs[0]);
  /* a server that is up but not serving yet (UNAVAILABLE) gets 30 s */
  for (int i = 0;; i++) {
    run(cs, 1, g.done + 1, g.submitted + 1);
    if (g.failed == 0)
      break;
    if (i == 600)
      die("the first call keeps failing");
    g.failed = 0;
    g.ok = 0;
    usleep(50000);
  }
  if (g.tls && g.resume) {
    saved = wolfSSL_get1_session(cs[0].ssl);
    if (saved == NULL)
      die("no session to resume");
  }
  uint64_t hs_total = 0;
  int resumed = 0;
  /* settle the new connections' SETTINGS exchange with one call each, in
   * batches: the server closes a connection that sends no HTTP/2 frame
   * within its handshake timeout (10 s), shorter than thousands of
   * handshakes in a row */
  for (int i = 1, first = 1; i < g.conns; i++) {
    conn_open(&cs[i]);
    hs_total += cs[i].hs_ns;
    resumed += cs[i].resumed;
    int k = i - first + 1;
    if (k == WARMUP_BATCH || i == g.conns - 1) {
      run(&cs[first], k, g.done + k, g.submitted + k);
      first = i + 1;
    }
  }
  if (g.failed != 0)
    die("warm-up calls failed");
  if (g.hold > 0) {
    printf("READY %d\n", g.conns);
    fflush(stdout);
    sleep((unsigned)g.hold);
    return 0;
  }
  long base = g.done, ok0 = g.ok;
  g.ok = 0;
  g.lat_us = malloc((size_t)g.total * sizeof *g.lat_us);
  g.measuring = 1;
  uint64_t t0 = now_ns();
  run(cs, g.conns, base + g.total, g.submitted + g.total);
  double secs = (double)(now_ns() - t0) / 1e9;
  long n = g.ok < g.total ? g.ok : g.total;
  qsort(g.lat_us, (size_t)n, sizeof *g.lat_us, cmp_u32);
  printf("mode=%s conns=%d streams=%d calls=%ld ok=%ld failed=%ld "
         "secs=%.3f rps=%.0f p50_us=%u p90_us=%u p99_us=%u max_us=%u",
         g.tls ? "mtls" : "h2c", g.conns, g.streams, g.total, g.ok, g.failed,
         secs, (double)g.ok / secs, n ? g.lat_us[n / 2] : 0,
         n ? g.lat_us[n * 9 / 10] : 0, n ? g.lat_us[n * 99 / 100] : 0,
         n ? g.lat_us[n - 1] : 0);
  if (g.tls)
    printf(" resumed=%d/%d first_handshake_us=%llu "
           "other_handshakes_avg_us=%llu",
           resumed, g.conns - 1, (unsigned long long)(cs[0].hs_ns / 1000),
           (unsigned long long)(g.conns > 1
                                    ? hs_total / 1000 / (uint64_t)(g.conns - 1)
                                    : 0));
  printf("\n");
  (void)ok0;
  return g.failed != 0;
}
