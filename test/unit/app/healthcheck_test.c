/*
 * healthcheck_test.c - the --health-check client: address parsing, the
 * verdict on what a server sent, and whole exchanges against a forked
 * nghttp2 server that answers SERVING, NOT_SERVING, a gRPC error, or nothing.
 */
#include "../../../src/app/healthcheck.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <signal.h>
#include <sys/wait.h>

/* ---- split_addr -----------------------------------------------------------
 */

static void test_split_addr(void **state) {
  (void)state;
  char h[64], p[8];
  assert_int_equal(split_addr(":50051", h, sizeof(h), p, sizeof(p)), 0);
  assert_string_equal(h, "127.0.0.1");
  assert_string_equal(p, "50051");
  assert_int_equal(split_addr("0.0.0.0:1", h, sizeof(h), p, sizeof(p)), 0);
  assert_string_equal(h, "127.0.0.1");
  assert_int_equal(split_addr("[::]:443", h, sizeof(h), p, sizeof(p)), 0);
  assert_string_equal(h, "::1");
  assert_int_equal(split_addr("[fe80::1]:9", h, sizeof(h), p, sizeof(p)), 0);
  assert_string_equal(h, "fe80::1");
  assert_int_equal(split_addr("zm.svc:65535", h, sizeof(h), p, sizeof(p)), 0);
  assert_string_equal(h, "zm.svc");
  assert_string_equal(p, "65535");

  const char *bad[] = {"",       "50051",    ":",      ":0",
                       ":65536", ":12a",     "::1:80", "[::1]80",
                       "[::1",   "h:123456", "h:-1",   "h: 1"};
  for (size_t i = 0; i < ZM_ARRAY_SIZE(bad); i++)
    assert_int_equal(split_addr(bad[i], h, sizeof(h), p, sizeof(p)), -1);
  assert_int_equal(split_addr(NULL, h, sizeof(h), p, sizeof(p)), -1);
  /* host longer than the buffer */
  assert_int_equal(split_addr("abcdefgh:1", h, 8, p, sizeof(p)), -1);
}

/* ---- verdict --------------------------------------------------------------
 */

static void set_body(hc_t *hc, const uint8_t *b, size_t n) {
  memcpy(hc->body, b, n);
  hc->body_len = n;
}

static void test_verdict(void **state) {
  (void)state;
  hc_t hc;
  const uint8_t serving[] = {0, 0, 0, 0, 2, 0x08, 0x01};
  const uint8_t not_serving[] = {0, 0, 0, 0, 2, 0x08, 0x02};
  const uint8_t short_frame[] = {0, 0, 0, 0, 3, 0x08, 0x01};
  const uint8_t compressed[] = {1, 0, 0, 0, 2, 0x08, 0x01};
  const uint8_t garbage[] = {0, 0, 0, 0, 2, 0xff, 0xff};

  memset(&hc, 0, sizeof(hc));
  hc.grpc_status = 0;
  set_body(&hc, serving, sizeof(serving));
  assert_int_equal(verdict(&hc), 0);
  /* an empty message is proto3's default: UNKNOWN, not SERVING */
  const uint8_t empty[] = {0, 0, 0, 0, 0};
  set_body(&hc, empty, sizeof(empty));
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, not_serving, sizeof(not_serving));
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, short_frame, sizeof(short_frame));
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, compressed, sizeof(compressed));
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, garbage, sizeof(garbage));
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, serving, 3);
  assert_int_equal(verdict(&hc), 1);
  set_body(&hc, serving, sizeof(serving));
  hc.body_overflow = 1;
  assert_int_equal(verdict(&hc), 1);
  hc.body_overflow = 0;
  hc.grpc_status = 14;
  assert_int_equal(verdict(&hc), 1);
  hc.grpc_status = -1; /* no trailers at all */
  hc.http_status = 200;
  assert_int_equal(verdict(&hc), 1);
}

/* ---- whole exchanges against a forked server ---------------------------- */

typedef enum {
  SRV_SERVING,
  SRV_NOT_SERVING,
  SRV_UNAVAILABLE,
  SRV_SILENT
} mode_t_;

typedef struct {
  mode_t_ mode;
  uint8_t body[7];
  size_t off;
  int path_ok;
  nghttp2_session *s;
} srv_t;

static ssize_t srv_read(nghttp2_session *session, int32_t stream_id,
                        uint8_t *buf, size_t length, uint32_t *data_flags,
                        nghttp2_data_source *source, void *user_data) {
  srv_t *sv = user_data;
  (void)source;
  size_t n = sizeof(sv->body) - sv->off;
  if (n > length)
    n = length;
  memcpy(buf, sv->body + sv->off, n);
  sv->off += n;
  if (sv->off == sizeof(sv->body)) {
    const nghttp2_nv tr[] = {{(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1,
                              NGHTTP2_NV_FLAG_NONE}};
    *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    if (nghttp2_submit_trailer(session, stream_id, tr, 1) != 0)
      _exit(3);
  }
  return (ssize_t)n;
}

static int srv_on_header(nghttp2_session *session, const nghttp2_frame *frame,
                         const uint8_t *name, size_t namelen,
                         const uint8_t *value, size_t valuelen, uint8_t flags,
                         void *user_data) {
  srv_t *sv = user_data;
  (void)session;
  (void)frame;
  (void)flags;
  if (namelen == 5 && memcmp(name, ":path", 5) == 0 &&
      valuelen == sizeof(PATH) - 1 && memcmp(value, PATH, valuelen) == 0)
    sv->path_ok = 1;
  return 0;
}

static int srv_on_frame(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) {
  srv_t *sv = user_data;
  if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ||
      (frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS))
    return 0;
  int32_t id = frame->hd.stream_id;
  if (!sv->path_ok || sv->mode == SRV_UNAVAILABLE) {
    const nghttp2_nv h[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
         NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-status", (uint8_t *)(sv->path_ok ? "14" : "12"), 11,
         2, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-message", (uint8_t *)"draining", 12, 8,
         NGHTTP2_NV_FLAG_NONE}};
    return nghttp2_submit_response(session, id, h, 4, NULL);
  }
  const nghttp2_nv h[] = {
      {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
       NGHTTP2_NV_FLAG_NONE}};
  const uint8_t body[7] = {
      0, 0, 0, 0, 2, 0x08, sv->mode == SRV_SERVING ? 0x01 : 0x02};
  memcpy(sv->body, body, sizeof(body));
  nghttp2_data_provider prd = {.source = {.ptr = NULL},
                               .read_callback = srv_read};
  return nghttp2_submit_response(session, id, h, 2, &prd);
}

/* The child: serves one connection, then exits. Never returns. */
static void serve_one(int lfd, mode_t_ mode) {
  int fd = accept(lfd, NULL, NULL);
  if (fd < 0)
    _exit(1);
  if (mode == SRV_SILENT) {
    pause();
    _exit(0);
  }
  srv_t sv = {.mode = mode};
  nghttp2_session_callbacks *cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_header_callback(cbs, srv_on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, srv_on_frame);
  nghttp2_session_server_new(&sv.s, cbs, &sv);
  nghttp2_submit_settings(sv.s, NGHTTP2_FLAG_NONE, NULL, 0);
  uint8_t buf[4096];
  for (;;) {
    const uint8_t *out;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(sv.s, &out)) > 0)
      if (write(fd, out, (size_t)n) != n)
        _exit(2);
    n = read(fd, buf, sizeof(buf));
    if (n <= 0)
      _exit(0);
    if (nghttp2_session_mem_recv(sv.s, buf, (size_t)n) < 0)
      _exit(2);
  }
}

/* Forks a server on a loopback port; returns its pid and fills addr. */
static pid_t start_server(mode_t_ mode, char *addr, size_t cap) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(lfd >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(sa);
  assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(listen(lfd, 4), 0);
  assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &len), 0);
  snprintf(addr, cap, ":%u", (unsigned)ntohs(sa.sin_port));
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0)
    serve_one(lfd, mode);
  close(lfd);
  return pid;
}

static void stop_server(pid_t pid) {
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
}

static void test_exchange_serving(void **state) {
  (void)state;
  char addr[32];
  pid_t pid = start_server(SRV_SERVING, addr, sizeof(addr));
  assert_int_equal(zm_healthcheck_run(addr, "", 5000), 0);
  stop_server(pid);
}

static void test_exchange_not_serving(void **state) {
  (void)state;
  char addr[32];
  pid_t pid = start_server(SRV_NOT_SERVING, addr, sizeof(addr));
  assert_int_equal(zm_healthcheck_run(addr, NULL, 5000), 1);
  stop_server(pid);
}

static void test_exchange_grpc_error(void **state) {
  (void)state;
  char addr[32];
  pid_t pid = start_server(SRV_UNAVAILABLE, addr, sizeof(addr));
  assert_int_equal(zm_healthcheck_run(addr, "", 5000), 1);
  stop_server(pid);
}

static void test_exchange_timeout(void **state) {
  (void)state;
  char addr[32];
  pid_t pid = start_server(SRV_SILENT, addr, sizeof(addr));
  int64_t t0 = mono_ms();
  assert_int_equal(zm_healthcheck_run(addr, "", 300), 1);
  /* it gave up on its own deadline, not on a server close */
  assert_true(mono_ms() - t0 >= 300);
  stop_server(pid);
}

static void test_connect_refused(void **state) {
  (void)state;
  /* a port that was just free: bound, never listened on */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(sa);
  assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
  char addr[32];
  snprintf(addr, sizeof(addr), "127.0.0.1:%u", (unsigned)ntohs(sa.sin_port));
  assert_int_equal(zm_healthcheck_run(addr, "", 2000), 1);
  close(fd);
  assert_int_equal(zm_healthcheck_run("no-port", "", 2000), 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_split_addr),
      cmocka_unit_test(test_verdict),
      cmocka_unit_test(test_exchange_serving),
      cmocka_unit_test(test_exchange_not_serving),
      cmocka_unit_test(test_exchange_grpc_error),
      cmocka_unit_test(test_exchange_timeout),
      cmocka_unit_test(test_connect_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
