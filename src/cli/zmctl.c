/*
 * zmctl.c - the command-line client of ziti-management.
 *
 *   zmctl [--addr HOST:PORT] [--timeout DUR] [--json]
 *         [--tls [--cacert F] [--cert F --key F] [--server-name N]] COMMAND
 *
 * One process, one libuv loop, one HTTP/2 connection (nghttp2 client
 * session over uv_tcp, optionally TLS through the controller client's
 * wolfSSL memory-BIO layer with ALPN h2), unary calls one after another.
 * Messages are framed and deframed with the server's own wire helpers
 * (zm_grpc_deframe, zm_grpc_pct_decode). Exit codes: see EXIT_* below and
 * `zmctl --help`; scripts may rely on them.
 */
#include "zm/config.h"
#include "zm/grpc.h"
#include "zm/zm.h"

#include "../ziti/tls.h"
#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <nghttp2/nghttp2.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

/* ===================== exit codes ======================================== */

enum {
  EXIT_OK = 0,
  EXIT_NOT_SERVING = 1, /* health: the server answered, not SERVING */
  EXIT_USAGE = 2,       /* bad command line */
  EXIT_TRANSPORT = 3,   /* no gRPC status: connect, TLS, HTTP/2, timeout */
  EXIT_NOT_FOUND = 4,   /* NOT_FOUND */
  EXIT_INVALID = 5,  /* INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE */
  EXIT_CONFLICT = 6, /* ALREADY_EXISTS, ABORTED */
  EXIT_UNAVAILABLE = 7,   /* UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
                             CANCELLED: try again later */
  EXIT_DENIED = 8,        /* PERMISSION_DENIED, UNAUTHENTICATED */
  EXIT_UNIMPLEMENTED = 9, /* UNIMPLEMENTED (method disabled or unknown) */
  EXIT_SERVER = 10,       /* INTERNAL, UNKNOWN, DATA_LOSS */
  EXIT_LOCAL = 11,        /* local I/O: cannot write the output file */
};

static int exit_for_status(int st) {
  switch (st) {
  case 0:
    return EXIT_OK;
  case 5:
    return EXIT_NOT_FOUND;
  case 3:
  case 9:
  case 11:
    return EXIT_INVALID;
  case 6:
  case 10:
    return EXIT_CONFLICT;
  case 1:
  case 4:
  case 8:
  case 14:
    return EXIT_UNAVAILABLE;
  case 7:
  case 16:
    return EXIT_DENIED;
  case 12:
    return EXIT_UNIMPLEMENTED;
  default:
    return EXIT_SERVER;
  }
}

/* ===================== options =========================================== */

#define SVC "/agynio.api.ziti_management.v1.ZitiManagementService/"
/* Bound on one response message: identity JSON is a few KiB. */
#define MAX_RESP (4u << 20)

typedef struct {
  const char *addr;
  uint64_t timeout_ms;
  int json;
  int tls;
  const char *cacert, *cert, *key, *server_name;
  const char *out; /* -o FILE */
  int type;        /* list --type */
  int all;         /* list --all */
  int page_size;
  const char *page_token;
  const char *cmd;
  const char *arg;
} opts_t;

static const struct {
  const char *name;
  int number;
} SERVICE_TYPES[] = {{"gateway", 1}, {"orchestrator", 2}, {"runner", 3}};
static const struct {
  const char *name;
  int number;
} IDENTITY_TYPES[] = {{"agent", 1}, {"runner", 2}, {"channel", 3}};

static void usage(FILE *f) {
  fputs(
      "usage: zmctl [OPTIONS] COMMAND [ARGS]\n"
      "\n"
      "Commands:\n"
      "  health [SERVICE]                     grpc.health.v1 Check\n"
      "  request-service-identity TYPE -o FILE  enroll an identity of TYPE\n"
      "                                       "
      "(gateway|orchestrator|runner|N);\n"
      "                                       FILE gets the identity JSON "
      "(0600)\n"
      "  extend-lease ZITI_ID                 ExtendIdentityLease\n"
      "  resolve ZITI_ID                      ResolveIdentity\n"
      "  list [--type agent|runner|channel|N] [--all] [--page-size N]\n"
      "       [--page-token T]                ListManagedIdentities\n"
      "  delete ZITI_ID                       DeleteIdentity\n"
      "  create-agent AGENT_UUID [-o FILE]    CreateAgentIdentity (FILE gets\n"
      "                                       the enrollment JWT, 0600)\n"
      "\n"
      "Options:\n"
      "  --addr HOST:PORT     server (default $ZMCTL_ADDR or 127.0.0.1:50051;\n"
      "                       :PORT means 127.0.0.1:PORT)\n"
      "  --timeout DURATION   per call, Go syntax (default 30s)\n"
      "  --json               machine-readable output (one JSON object)\n"
      "  --tls                TLS (ALPN h2), verified against --cacert\n"
      "  --cacert FILE        CA bundle (default "
      "/etc/ssl/certs/ca-certificates.crt)\n"
      "  --cert FILE --key FILE  client certificate (mTLS)\n"
      "  --server-name NAME   name to verify and send as SNI (default: host)\n"
      "\n"
      "Exit codes:\n"
      "  0  OK                        1  health: not SERVING\n"
      "  2  usage error               3  no gRPC status (connect/TLS/timeout)\n"
      "  4  NOT_FOUND                 5  INVALID_ARGUMENT, "
      "FAILED_PRECONDITION,\n"
      "                                  OUT_OF_RANGE\n"
      "  6  ALREADY_EXISTS, ABORTED   7  UNAVAILABLE, DEADLINE_EXCEEDED,\n"
      "                                  RESOURCE_EXHAUSTED, CANCELLED "
      "(retry)\n"
      "  8  PERMISSION_DENIED, UNAUTHENTICATED\n"
      "  9  UNIMPLEMENTED             10 INTERNAL, UNKNOWN, DATA_LOSS\n"
      "  11 cannot write the output file\n",
      f);
}

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static int
bad_usage(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("zmctl: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputs(" (see zmctl --help)\n", stderr);
  va_end(ap);
  return EXIT_USAGE;
}

static int parse_type(const char *s, const void *table, size_t n, int *out) {
  const struct {
    const char *name;
    int number;
  } *t = table;
  for (size_t i = 0; i < n; i++)
    if (strcmp(s, t[i].name) == 0) {
      *out = t[i].number;
      return 0;
    }
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || errno != 0 || v < 0 || v > 1000000)
    return -1;
  *out = (int)v;
  return 0;
}

/* Returns -1 to go on, or an exit code. */
static int parse_args(int argc, char **argv, opts_t *o) {
  memset(o, 0, sizeof *o);
  o->addr = getenv("ZMCTL_ADDR") ? getenv("ZMCTL_ADDR") : "127.0.0.1:50051";
  o->timeout_ms = 30000;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
#define NEED_VALUE()                                                           \
  do {                                                                         \
    if (i + 1 >= argc)                                                         \
      return bad_usage("%s needs a value", a);                                 \
  } while (0)
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      return EXIT_OK;
    } else if (strcmp(a, "--json") == 0) {
      o->json = 1;
    } else if (strcmp(a, "--tls") == 0) {
      o->tls = 1;
    } else if (strcmp(a, "--all") == 0) {
      o->all = 1;
    } else if (strcmp(a, "--addr") == 0) {
      NEED_VALUE();
      o->addr = argv[++i];
    } else if (strcmp(a, "--timeout") == 0) {
      NEED_VALUE();
      if (zm_duration_parse(argv[++i], &o->timeout_ms) != 0 ||
          o->timeout_ms == 0)
        return bad_usage("--timeout %s: not a duration (e.g. 5s)", argv[i]);
    } else if (strcmp(a, "--cacert") == 0) {
      NEED_VALUE();
      o->cacert = argv[++i];
    } else if (strcmp(a, "--cert") == 0) {
      NEED_VALUE();
      o->cert = argv[++i];
    } else if (strcmp(a, "--key") == 0) {
      NEED_VALUE();
      o->key = argv[++i];
    } else if (strcmp(a, "--server-name") == 0) {
      NEED_VALUE();
      o->server_name = argv[++i];
    } else if (strcmp(a, "-o") == 0 || strcmp(a, "--out") == 0) {
      NEED_VALUE();
      o->out = argv[++i];
    } else if (strcmp(a, "--type") == 0) {
      NEED_VALUE();
      if (parse_type(argv[++i], IDENTITY_TYPES, ZM_ARRAY_SIZE(IDENTITY_TYPES),
                     &o->type) != 0)
        return bad_usage("--type %s: expected agent, runner, channel or a "
                         "number",
                         argv[i]);
    } else if (strcmp(a, "--page-size") == 0) {
      NEED_VALUE();
      char *end;
      long v = strtol(argv[++i], &end, 10);
      if (*end != '\0' || v < 0 || v > 100000)
        return bad_usage("--page-size %s: expected a number", argv[i]);
      o->page_size = (int)v;
    } else if (strcmp(a, "--page-token") == 0) {
      NEED_VALUE();
      o->page_token = argv[++i];
    } else if (a[0] == '-' && a[1] != '\0') {
      return bad_usage("unknown option '%s'", a);
    } else if (o->cmd == NULL) {
      o->cmd = a;
    } else if (o->arg == NULL) {
      o->arg = a;
    } else {
      return bad_usage("unexpected argument '%s'", a);
    }
#undef NEED_VALUE
  }
  if (o->cmd == NULL)
    return bad_usage("no command");
  static const char *const NEED_ARG[] = {"request-service-identity",
                                         "extend-lease", "resolve", "delete",
                                         "create-agent"};
  int known = strcmp(o->cmd, "health") == 0 || strcmp(o->cmd, "list") == 0;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(NEED_ARG); i++) {
    if (strcmp(o->cmd, NEED_ARG[i]) == 0) {
      known = 1;
      if (o->arg == NULL)
        return bad_usage("%s needs an argument", o->cmd);
    }
  }
  if (!known)
    return bad_usage("unknown command '%s'", o->cmd);
  if (strcmp(o->cmd, "list") == 0 && o->arg != NULL)
    return bad_usage("list takes no argument (use --type)");
  if (strcmp(o->cmd, "request-service-identity") == 0 && o->out == NULL)
    return bad_usage("request-service-identity needs -o FILE (the identity "
                     "JSON holds a private key)");
  if ((o->cert == NULL) != (o->key == NULL))
    return bad_usage("--cert and --key go together");
  if (!o->tls && (o->cacert || o->cert || o->server_name))
    return bad_usage("--cacert/--cert/--key/--server-name need --tls");
  return -1;
}

/* ===================== the connection ==================================== */

typedef struct client client_t;
typedef void (*call_done_fn)(client_t *cl, int status, const char *msg,
                             const uint8_t *body, size_t len);

struct client {
  uv_loop_t *loop;
  opts_t *o;
  char host[256], port[8];
  uv_getaddrinfo_t gai;
  uv_connect_t creq;
  uv_tcp_t tcp;
  uv_timer_t timer;
  int tcp_open, connected, closing;
  WOLFSSL_CTX *tls_ctx;
  zm_tls_t tls;
  int tls_on, handshake_done;
  nghttp2_session *h2;
  /* the call in flight */
  int32_t sid;
  const char *path;
  uint8_t *req;
  size_t req_len, req_off;
  int http_status, grpc_status;
  char grpc_message[1024];
  uint8_t *body;
  size_t body_len, body_cap;
  int body_overflow;
  call_done_fn done;
  /* outcome */
  int exit_code;
  /* list --all */
  int list_count;
  json_t *list_items;
  /* a call waiting for the connection */
  int pending;
};

static void client_close(client_t *cl, int code);
static void flush(client_t *cl);

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
fail_transport(client_t *cl, const char *fmt, ...) {
  va_list ap;
  char msg[512];
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (cl->o->json) {
    json_t *j = json_pack("{s:{s:s,s:s}}", "error", "status", "TRANSPORT",
                          "message", msg);
    char *s = json_dumps(j, JSON_COMPACT);
    printf("%s\n", s);
    free(s);
    json_decref(j);
  }
  fprintf(stderr, "zmctl: %s\n", msg);
  client_close(cl, EXIT_TRANSPORT);
}

static void on_write(uv_write_t *w, int status) {
  free(w->data);
  free(w);
  (void)status; /* a broken connection shows up as a read error */
}

static void write_raw(client_t *cl, char *p, size_t n) {
  uv_write_t *w = zm_xmalloc(sizeof *w);
  w->data = p;
  uv_buf_t b = uv_buf_init(p, (unsigned)n);
  if (uv_write(w, (uv_stream_t *)&cl->tcp, &b, 1, on_write) != 0) {
    free(p);
    free(w);
  }
}

static void flush_tls(client_t *cl) {
  size_t n;
  char *p = zm__ziti_tls_take_out(&cl->tls, &n);
  if (p != NULL)
    write_raw(cl, p, n);
}

static void flush(client_t *cl) {
  if (cl->h2 == NULL || cl->closing)
    return;
  for (;;) {
    const uint8_t *p;
    ssize_t n = nghttp2_session_mem_send(cl->h2, &p);
    if (n < 0) {
      fail_transport(cl, "HTTP/2: %s", nghttp2_strerror((int)n));
      return;
    }
    if (n == 0)
      break;
    if (cl->tls_on) {
      if (zm__ziti_tls_write(&cl->tls, (const char *)p, (size_t)n) != 0) {
        fail_transport(cl, "TLS write failed");
        return;
      }
    } else {
      char *c = zm_xmalloc((size_t)n);
      memcpy(c, p, (size_t)n);
      write_raw(cl, c, (size_t)n);
    }
  }
  if (cl->tls_on)
    flush_tls(cl);
}

/* ---- nghttp2 client callbacks ------------------------------------------- */

static int on_header(nghttp2_session *s, const nghttp2_frame *f,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *ud) {
  (void)s;
  (void)flags;
  client_t *cl = ud;
  if (f->hd.stream_id != cl->sid)
    return 0;
  if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
    cl->http_status = atoi((const char *)value);
  } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
    char b[8];
    size_t k = valuelen < sizeof b - 1 ? valuelen : sizeof b - 1;
    memcpy(b, value, k);
    b[k] = '\0';
    cl->grpc_status = atoi(b);
  } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
    zm_grpc_pct_decode((const char *)value, valuelen, cl->grpc_message,
                       sizeof cl->grpc_message);
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid,
                         const uint8_t *data, size_t len, void *ud) {
  (void)s;
  (void)flags;
  client_t *cl = ud;
  if (sid != cl->sid)
    return 0;
  if (cl->body_len + len > MAX_RESP + 5) {
    cl->body_overflow = 1;
    return 0;
  }
  if (cl->body_len + len > cl->body_cap) {
    size_t cap = cl->body_cap ? cl->body_cap : 4096;
    while (cap < cl->body_len + len)
      cap *= 2;
    cl->body = zm_xrealloc(cl->body, cap);
    cl->body_cap = cap;
  }
  memcpy(cl->body + cl->body_len, data, len);
  cl->body_len += len;
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t err,
                           void *ud) {
  (void)s;
  client_t *cl = ud;
  if (sid != cl->sid)
    return 0;
  cl->sid = 0;
  call_done_fn done = cl->done;
  cl->done = NULL;
  if (cl->grpc_status < 0) {
    char m[128];
    if (cl->http_status != 0 && cl->http_status != 200)
      snprintf(m, sizeof m, "HTTP status %d without a gRPC status",
               cl->http_status);
    else
      snprintf(m, sizeof m, "stream closed without a gRPC status (%s)",
               nghttp2_http2_strerror(err));
    fail_transport(cl, "%s", m);
    return 0;
  }
  if (cl->body_overflow) {
    fail_transport(cl, "response larger than %u bytes", MAX_RESP);
    return 0;
  }
  const uint8_t *msg = NULL;
  size_t mlen = 0;
  if (cl->grpc_status == 0) {
    uint8_t fl;
    ssize_t n =
        zm_grpc_deframe(cl->body, cl->body_len, MAX_RESP, &fl, &msg, &mlen);
    if (n < 0 || (size_t)n != cl->body_len || (fl & 1u)) {
      fail_transport(cl, "malformed response message");
      return 0;
    }
  }
  done(cl, cl->grpc_status, cl->grpc_message, msg, mlen);
  return 0;
}

static ssize_t on_req_read(nghttp2_session *s, int32_t sid, uint8_t *buf,
                           size_t len, uint32_t *flags,
                           nghttp2_data_source *src, void *ud) {
  (void)s;
  (void)sid;
  (void)src;
  client_t *cl = ud;
  size_t n = cl->req_len - cl->req_off;
  if (n > len)
    n = len;
  memcpy(buf, cl->req + cl->req_off, n);
  cl->req_off += n;
  if (cl->req_off == cl->req_len)
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

/* Starts one unary call (the connection is up). */
static void call_start(client_t *cl) {
  char timeout[32], authority[300];
  snprintf(timeout, sizeof timeout, "%llum",
           (unsigned long long)cl->o->timeout_ms);
  snprintf(authority, sizeof authority, "%s:%s", cl->host, cl->port);
  nghttp2_nv h[] = {
      {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, 0},
      {(uint8_t *)":scheme", (uint8_t *)(cl->tls_on ? "https" : "http"), 7,
       cl->tls_on ? 5u : 4u, 0},
      {(uint8_t *)":path", (uint8_t *)cl->path, 5, strlen(cl->path), 0},
      {(uint8_t *)":authority", (uint8_t *)authority, 10, strlen(authority), 0},
      {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, 0},
      {(uint8_t *)"te", (uint8_t *)"trailers", 2, 8, 0},
      {(uint8_t *)"grpc-timeout", (uint8_t *)timeout, 12, strlen(timeout), 0},
      {(uint8_t *)"user-agent", (uint8_t *)"zmctl/1", 10, 7, 0},
  };
  nghttp2_data_provider dp = {.read_callback = on_req_read};
  cl->http_status = 0;
  cl->grpc_status = -1;
  cl->grpc_message[0] = '\0';
  cl->body_len = 0;
  cl->body_overflow = 0;
  cl->req_off = 0;
  cl->sid = nghttp2_submit_request(cl->h2, NULL, h, ZM_ARRAY_SIZE(h), &dp, cl);
  if (cl->sid < 0) {
    fail_transport(cl, "HTTP/2: %s", nghttp2_strerror(cl->sid));
    return;
  }
  flush(cl);
}

/* Queues one call: packed request for path, done when it finishes. */
static void call(client_t *cl, const char *path, const ProtobufCMessage *m,
                 call_done_fn done) {
  size_t n = protobuf_c_message_get_packed_size(m);
  free(cl->req);
  cl->req = zm_xmalloc(n + 5);
  cl->req[0] = 0;
  cl->req[1] = (uint8_t)(n >> 24);
  cl->req[2] = (uint8_t)(n >> 16);
  cl->req[3] = (uint8_t)(n >> 8);
  cl->req[4] = (uint8_t)n;
  protobuf_c_message_pack(m, cl->req + 5);
  cl->req_len = n + 5;
  cl->path = path;
  cl->done = done;
  /* every call gets the whole timeout */
  uv_timer_again(&cl->timer);
  if (cl->h2 != NULL && (!cl->tls_on || cl->handshake_done))
    call_start(cl);
  else
    cl->pending = 1;
}

static int h2_start(client_t *cl) {
  nghttp2_session_callbacks *cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  int rv = nghttp2_session_client_new(&cl->h2, cbs, cl);
  nghttp2_session_callbacks_del(cbs);
  if (rv != 0)
    return rv;
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
  nghttp2_submit_settings(cl->h2, NGHTTP2_FLAG_NONE, iv, 1);
  if (cl->pending) {
    cl->pending = 0;
    call_start(cl);
  } else {
    flush(cl);
  }
  return 0;
}

static void feed_h2(client_t *cl, const uint8_t *p, size_t n) {
  ssize_t rv = nghttp2_session_mem_recv(cl->h2, p, n);
  if (rv < 0) {
    fail_transport(cl, "HTTP/2: %s", nghttp2_strerror((int)rv));
    return;
  }
  flush(cl);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)h;
  (void)hint;
  static char buf[64 * 1024];
  b->base = buf;
  b->len = sizeof buf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b) {
  client_t *cl = st->data;
  if (nread == 0 || cl->closing)
    return;
  if (nread < 0) {
    fail_transport(cl, "connection to %s closed: %s", cl->o->addr,
                   uv_strerror((int)nread));
    return;
  }
  if (!cl->tls_on) {
    feed_h2(cl, (const uint8_t *)b->base, (size_t)nread);
    return;
  }
  if (zm__ziti_tls_feed(&cl->tls, b->base, (size_t)nread) != 0) {
    fail_transport(cl, "TLS: too much buffered");
    return;
  }
  if (!cl->handshake_done) {
    const char *why = NULL;
    int rv = zm__ziti_tls_handshake(&cl->tls, &why);
    flush_tls(cl);
    if (rv == ZM_E_INCOMPLETE)
      return;
    if (rv != 0) {
      fail_transport(cl, "TLS handshake with %s failed: %s", cl->o->addr,
                     why ? why : "error");
      return;
    }
    cl->handshake_done = 1;
    if (h2_start(cl) != 0) {
      fail_transport(cl, "HTTP/2 session");
      return;
    }
  }
  for (;;) {
    char plain[16384];
    ssize_t n = zm__ziti_tls_read(&cl->tls, plain, sizeof plain);
    if (n == ZM_E_INCOMPLETE)
      break;
    if (n <= 0) {
      fail_transport(cl, "TLS connection closed");
      return;
    }
    feed_h2(cl, (const uint8_t *)plain, (size_t)n);
    if (cl->closing)
      return;
  }
  flush_tls(cl);
}

static void on_connect(uv_connect_t *req, int status) {
  client_t *cl = req->data;
  if (cl->closing)
    return;
  if (status < 0) {
    fail_transport(cl, "cannot connect to %s: %s", cl->o->addr,
                   uv_strerror(status));
    return;
  }
  cl->connected = 1;
  uv_tcp_nodelay(&cl->tcp, 1);
  uv_read_start((uv_stream_t *)&cl->tcp, on_alloc, on_read);
  if (cl->tls_on) {
    const char *why = NULL;
    if (zm__ziti_tls_handshake(&cl->tls, &why) == ZM_E_TLS) {
      fail_transport(cl, "TLS: %s", why ? why : "error");
      return;
    }
    flush_tls(cl);
    return;
  }
  if (h2_start(cl) != 0)
    fail_transport(cl, "HTTP/2 session");
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  client_t *cl = req->data;
  if (cl->closing) {
    uv_freeaddrinfo(res);
    return;
  }
  if (status < 0 || res == NULL) {
    uv_freeaddrinfo(res);
    fail_transport(cl, "cannot resolve %s: %s", cl->host, uv_strerror(status));
    return;
  }
  uv_tcp_init(cl->loop, &cl->tcp);
  cl->tcp.data = cl;
  cl->tcp_open = 1;
  cl->creq.data = cl;
  int rv = uv_tcp_connect(&cl->creq, &cl->tcp, res->ai_addr, on_connect);
  uv_freeaddrinfo(res);
  if (rv != 0)
    fail_transport(cl, "cannot connect to %s: %s", cl->o->addr,
                   uv_strerror(rv));
}

static void on_timeout(uv_timer_t *t) {
  client_t *cl = t->data;
  fail_transport(cl, "no answer from %s within %llu ms", cl->o->addr,
                 (unsigned long long)cl->o->timeout_ms);
}

static void on_closed(uv_handle_t *h) { (void)h; }

static void client_close(client_t *cl, int code) {
  if (cl->closing)
    return;
  cl->closing = 1;
  cl->exit_code = code;
  if (cl->h2 != NULL && cl->connected) {
    nghttp2_submit_goaway(cl->h2, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL,
                          0);
    const uint8_t *p;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(cl->h2, &p)) > 0) {
      if (cl->tls_on)
        zm__ziti_tls_write(&cl->tls, (const char *)p, (size_t)n);
      else {
        char *c = zm_xmalloc((size_t)n);
        memcpy(c, p, (size_t)n);
        write_raw(cl, c, (size_t)n);
      }
    }
    if (cl->tls_on)
      flush_tls(cl);
  }
  uv_close((uv_handle_t *)&cl->timer, on_closed);
  if (cl->tcp_open)
    uv_close((uv_handle_t *)&cl->tcp, on_closed);
}

/* "host:port", ":port", "[v6]:port" -> host, port. */
static int split_addr(const char *a, char *host, size_t hcap, char *port,
                      size_t pcap) {
  const char *colon = strrchr(a, ':');
  if (colon == NULL || colon[1] == '\0' || strlen(colon + 1) >= pcap)
    return -1;
  for (const char *c = colon + 1; *c; c++)
    if (*c < '0' || *c > '9')
      return -1;
  size_t hl = (size_t)(colon - a);
  const char *h = a;
  if (hl >= 2 && a[0] == '[' && a[hl - 1] == ']') {
    h = a + 1;
    hl -= 2;
  } else if (memchr(a, ':', hl) != NULL) {
    return -1;
  }
  if (hl >= hcap)
    return -1;
  memcpy(host, h, hl);
  host[hl] = '\0';
  if (hl == 0)
    snprintf(host, hcap, "127.0.0.1");
  snprintf(port, pcap, "%s", colon + 1);
  return 0;
}

/* ===================== output ============================================ */

static void print_json(json_t *j) {
  char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
  printf("%s\n", s);
  free(s);
  json_decref(j);
}

/* Prints the error and sets the exit code; 1 if the status was an error. */
static int report_status(client_t *cl, int st, const char *msg) {
  if (st == 0)
    return 0;
  if (cl->o->json)
    print_json(json_pack("{s:{s:i,s:s,s:s}}", "error", "code", st, "status",
                         zm_grpc_code_name(st), "message", msg ? msg : ""));
  fprintf(stderr, "zmctl: %s: %s\n", zm_grpc_code_name(st), msg ? msg : "");
  client_close(cl, exit_for_status(st));
  return 1;
}

/* Writes data to path atomically with mode 0600. Returns 0 or -1. */
static int write_file_0600(const char *path, const void *data, size_t len) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >=
      (int)sizeof tmp)
    return -1;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return -1;
  const char *p = data;
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(fd, p + off, len - off);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      close(fd);
      unlink(tmp);
      return -1;
    }
    off += (size_t)w;
  }
  if (fchmod(fd, 0600) != 0 || fsync(fd) != 0 || close(fd) != 0 ||
      rename(tmp, path) != 0) {
    unlink(tmp);
    return -1;
  }
  return 0;
}

static const char *itype_name(int t) {
  for (size_t i = 0; i < ZM_ARRAY_SIZE(IDENTITY_TYPES); i++)
    if (IDENTITY_TYPES[i].number == t)
      return IDENTITY_TYPES[i].name;
  return "unspecified";
}

/* ===================== commands ========================================== */

static void done_health(client_t *cl, int st, const char *msg, const uint8_t *b,
                        size_t n) {
  if (report_status(cl, st, msg))
    return;
  Grpc__Health__V1__HealthCheckResponse *r =
      grpc__health__v1__health_check_response__unpack(NULL, n, b);
  if (r == NULL) {
    fail_transport(cl, "cannot parse the response");
    return;
  }
  static const char *const S[] = {"UNKNOWN", "SERVING", "NOT_SERVING",
                                  "SERVICE_UNKNOWN"};
  const char *name = (unsigned)r->status < 4 ? S[r->status] : "UNKNOWN";
  if (cl->o->json)
    print_json(json_pack("{s:s}", "status", name));
  else
    printf("%s\n", name);
  int serving = r->status == 1;
  grpc__health__v1__health_check_response__free_unpacked(r, NULL);
  client_close(cl, serving ? EXIT_OK : EXIT_NOT_SERVING);
}

static void done_rsi(client_t *cl, int st, const char *msg, const uint8_t *b,
                     size_t n) {
  if (report_status(cl, st, msg))
    return;
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse *r =
      agynio__api__ziti_management__v1__request_service_identity_response__unpack(
          NULL, n, b);
  if (r == NULL) {
    fail_transport(cl, "cannot parse the response");
    return;
  }
  int rc =
      write_file_0600(cl->o->out, r->identity_json.data, r->identity_json.len);
  zm_wipe(r->identity_json.data, r->identity_json.len);
  if (rc != 0) {
    fprintf(stderr, "zmctl: cannot write %s: %s\n", cl->o->out,
            strerror(errno));
    agynio__api__ziti_management__v1__request_service_identity_response__free_unpacked(
        r, NULL);
    client_close(cl, EXIT_LOCAL);
    return;
  }
  if (cl->o->json)
    print_json(json_pack("{s:s,s:s}", "ziti_identity_id", r->ziti_identity_id,
                         "identity_file", cl->o->out));
  else
    printf("%s\nidentity JSON written to %s (0600)\n", r->ziti_identity_id,
           cl->o->out);
  agynio__api__ziti_management__v1__request_service_identity_response__free_unpacked(
      r, NULL);
  client_close(cl, EXIT_OK);
}

static void done_empty(client_t *cl, int st, const char *msg, const uint8_t *b,
                       size_t n) {
  (void)b;
  (void)n;
  if (report_status(cl, st, msg))
    return;
  if (cl->o->json)
    print_json(
        json_pack("{s:s,s:s}", "result", "ok", "ziti_identity_id", cl->o->arg));
  else
    printf("ok\n");
  client_close(cl, EXIT_OK);
}

static void done_resolve(client_t *cl, int st, const char *msg,
                         const uint8_t *b, size_t n) {
  if (report_status(cl, st, msg))
    return;
  Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse *r =
      agynio__api__ziti_management__v1__resolve_identity_response__unpack(NULL,
                                                                          n, b);
  if (r == NULL) {
    fail_transport(cl, "cannot parse the response");
    return;
  }
  if (cl->o->json)
    print_json(json_pack("{s:s,s:s,s:i}", "identity_id", r->identity_id,
                         "identity_type", itype_name(r->identity_type),
                         "identity_type_number", r->identity_type));
  else
    printf("identity_id:   %s\nidentity_type: %s\n", r->identity_id,
           itype_name(r->identity_type));
  agynio__api__ziti_management__v1__resolve_identity_response__free_unpacked(
      r, NULL);
  client_close(cl, EXIT_OK);
}

static void done_create_agent(client_t *cl, int st, const char *msg,
                              const uint8_t *b, size_t n) {
  if (report_status(cl, st, msg))
    return;
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse *r =
      agynio__api__ziti_management__v1__create_agent_identity_response__unpack(
          NULL, n, b);
  if (r == NULL) {
    fail_transport(cl, "cannot parse the response");
    return;
  }
  int code = EXIT_OK;
  if (cl->o->out != NULL) {
    if (write_file_0600(cl->o->out, r->enrollment_jwt,
                        strlen(r->enrollment_jwt)) != 0) {
      fprintf(stderr, "zmctl: cannot write %s: %s\n", cl->o->out,
              strerror(errno));
      code = EXIT_LOCAL;
    } else if (cl->o->json) {
      print_json(json_pack("{s:s,s:s}", "ziti_identity_id", r->ziti_identity_id,
                           "enrollment_jwt_file", cl->o->out));
    } else {
      printf("%s\nenrollment JWT written to %s (0600)\n", r->ziti_identity_id,
             cl->o->out);
    }
  } else if (cl->o->json) {
    print_json(json_pack("{s:s,s:s}", "ziti_identity_id", r->ziti_identity_id,
                         "enrollment_jwt", r->enrollment_jwt));
  } else {
    printf("ziti_identity_id: %s\nenrollment_jwt:   %s\n", r->ziti_identity_id,
           r->enrollment_jwt);
  }
  zm_wipe(r->enrollment_jwt, strlen(r->enrollment_jwt));
  agynio__api__ziti_management__v1__create_agent_identity_response__free_unpacked(
      r, NULL);
  client_close(cl, code);
}

static void list_call(client_t *cl, const char *token);

static void done_list(client_t *cl, int st, const char *msg, const uint8_t *b,
                      size_t n) {
  if (report_status(cl, st, msg))
    return;
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesResponse *r =
      agynio__api__ziti_management__v1__list_managed_identities_response__unpack(
          NULL, n, b);
  if (r == NULL) {
    fail_transport(cl, "cannot parse the response");
    return;
  }
  for (size_t i = 0; i < r->n_identities; i++) {
    const Agynio__Api__ZitiManagement__V1__ManagedIdentity *m =
        r->identities[i];
    char created[40] = "";
    if (m->created_at != NULL) {
      time_t t = (time_t)m->created_at->seconds;
      struct tm tm;
      gmtime_r(&t, &tm);
      strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    if (cl->o->json) {
      json_array_append_new(cl->list_items,
                            json_pack("{s:s,s:s,s:s,s:s}", "ziti_identity_id",
                                      m->ziti_identity_id, "identity_id",
                                      m->identity_id, "identity_type",
                                      itype_name(m->identity_type),
                                      "created_at", created));
    } else {
      if (cl->list_count == 0)
        printf("%-28s %-36s %-11s %s\n", "ZITI_IDENTITY_ID", "IDENTITY_ID",
               "TYPE", "CREATED_AT");
      printf("%-28s %-36s %-11s %s\n", m->ziti_identity_id, m->identity_id,
             itype_name(m->identity_type), created);
    }
    cl->list_count++;
  }
  char *next = r->next_page_token && r->next_page_token[0]
                   ? zm_xstrdup(r->next_page_token)
                   : NULL;
  agynio__api__ziti_management__v1__list_managed_identities_response__free_unpacked(
      r, NULL);
  if (next != NULL && cl->o->all) {
    list_call(cl, next);
    free(next);
    return;
  }
  if (cl->o->json) {
    json_t *j = json_pack("{s:O,s:s}", "identities", cl->list_items,
                          "next_page_token", next ? next : "");
    print_json(j);
  } else if (next != NULL) {
    fprintf(stderr, "more: --page-token %s (or --all)\n", next);
  }
  free(next);
  client_close(cl, EXIT_OK);
}

static void list_call(client_t *cl, const char *token) {
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesRequest q =
      AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_MANAGED_IDENTITIES_REQUEST__INIT;
  q.identity_type = cl->o->type;
  q.page_size = cl->o->page_size;
  q.page_token = (char *)(token ? token : "");
  call(cl, SVC "ListManagedIdentities", &q.base, done_list);
}

static int start_command(client_t *cl) {
  const opts_t *o = cl->o;
  if (strcmp(o->cmd, "health") == 0) {
    Grpc__Health__V1__HealthCheckRequest q =
        GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    q.service = (char *)(o->arg ? o->arg : "");
    call(cl, "/grpc.health.v1.Health/Check", &q.base, done_health);
  } else if (strcmp(o->cmd, "request-service-identity") == 0) {
    Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest q =
        AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_REQUEST__INIT;
    int t;
    if (parse_type(o->arg, SERVICE_TYPES, ZM_ARRAY_SIZE(SERVICE_TYPES), &t) !=
        0)
      return bad_usage("service type '%s': expected gateway, orchestrator, "
                       "runner or a number",
                       o->arg);
    q.service_type = t;
    call(cl, SVC "RequestServiceIdentity", &q.base, done_rsi);
  } else if (strcmp(o->cmd, "extend-lease") == 0) {
    Agynio__Api__ZitiManagement__V1__ExtendIdentityLeaseRequest q =
        AGYNIO__API__ZITI_MANAGEMENT__V1__EXTEND_IDENTITY_LEASE_REQUEST__INIT;
    q.ziti_identity_id = (char *)o->arg;
    call(cl, SVC "ExtendIdentityLease", &q.base, done_empty);
  } else if (strcmp(o->cmd, "resolve") == 0) {
    Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest q =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_REQUEST__INIT;
    q.ziti_identity_id = (char *)o->arg;
    call(cl, SVC "ResolveIdentity", &q.base, done_resolve);
  } else if (strcmp(o->cmd, "delete") == 0) {
    Agynio__Api__ZitiManagement__V1__DeleteIdentityRequest q =
        AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_IDENTITY_REQUEST__INIT;
    q.ziti_identity_id = (char *)o->arg;
    call(cl, SVC "DeleteIdentity", &q.base, done_empty);
  } else if (strcmp(o->cmd, "create-agent") == 0) {
    Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest q =
        AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_REQUEST__INIT;
    q.agent_id = (char *)o->arg;
    call(cl, SVC "CreateAgentIdentity", &q.base, done_create_agent);
  } else {
    list_call(cl, o->page_token);
  }
  return -1;
}

/* ===================== main ============================================== */

#ifndef ZMCTL_NO_MAIN
int main(int argc, char **argv) {
  /* A server that closes while a request is being written must give an
   * exit code (3), not kill the client: write errors are handled. */
  signal(SIGPIPE, SIG_IGN);
  opts_t o;
  int rc = parse_args(argc, argv, &o);
  if (rc >= 0)
    return rc;
  static client_t cl;
  memset(&cl, 0, sizeof cl);
  cl.o = &o;
  cl.list_items = json_array();
  if (split_addr(o.addr, cl.host, sizeof cl.host, cl.port, sizeof cl.port) != 0)
    return bad_usage("--addr %s: expected HOST:PORT, :PORT or [V6]:PORT",
                     o.addr);
  uv_loop_t loop;
  uv_loop_init(&loop);
  cl.loop = &loop;
  if (o.tls) {
    const char *why = NULL;
    const char *ca = o.cacert ? o.cacert : "/etc/ssl/certs/ca-certificates.crt";
    if (zm__ziti_tls_ctx_new(&cl.tls_ctx, ca, o.cert, o.key, &why) != 0) {
      fprintf(stderr, "zmctl: TLS: %s (--cacert %s%s)\n", why ? why : "error",
              ca, o.cert ? ", --cert/--key" : "");
      return EXIT_USAGE;
    }
    const char *name = o.server_name ? o.server_name : cl.host;
    if (zm__ziti_tls_init(&cl.tls, cl.tls_ctx, name, NULL) != 0 ||
        wolfSSL_UseALPN(cl.tls.ssl, (char *)"h2", 2,
                        WOLFSSL_ALPN_FAILED_ON_MISMATCH) != WOLFSSL_SUCCESS) {
      fprintf(stderr, "zmctl: TLS: cannot set up the session for %s\n", name);
      return EXIT_USAGE;
    }
    cl.tls_on = 1;
  }
  uv_timer_init(&loop, &cl.timer);
  cl.timer.data = &cl;
  uv_timer_start(&cl.timer, on_timeout, o.timeout_ms, o.timeout_ms);
  rc = start_command(&cl);
  if (rc >= 0) {
    uv_close((uv_handle_t *)&cl.timer, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    return rc;
  }
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_socktype = SOCK_STREAM;
  cl.gai.data = &cl;
  if (uv_getaddrinfo(&loop, &cl.gai, on_resolved, cl.host, cl.port, &hints) !=
      0) {
    fprintf(stderr, "zmctl: cannot resolve %s\n", cl.host);
    return EXIT_TRANSPORT;
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  if (cl.h2 != NULL)
    nghttp2_session_del(cl.h2);
  if (cl.tls_on)
    zm__ziti_tls_dispose(&cl.tls);
  if (cl.tls_ctx != NULL)
    wolfSSL_CTX_free(cl.tls_ctx);
  free(cl.req);
  free(cl.body);
  json_decref(cl.list_items);
  uv_loop_close(&loop);
  fflush(stdout);
  return cl.exit_code;
}
#endif
