/* The metrics/probe listener on a real loop: routes, keep-alive with a
 * pipelined request, 404/405/400/431, the connection cap, readiness, and
 * that closing frees everything (uv_loop_close == 0). The client side is
 * a blocking socket on a thread. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "zm/metrics.h"

static int ready_flag = 1;
static int renders;

static void render(zm_prom_t *p, void *data) {
  (void)data;
  renders++;
  zm_prom_family(p, "t_total", "counter", "test");
  zm_prom_sample_u64(p, "t_total", NULL, 0, (uint64_t)renders);
}

static int ready(void *data, char *why, size_t cap) {
  (void)data;
  if (!ready_flag)
    snprintf(why, cap, "draining");
  return ready_flag;
}

typedef struct {
  int port;
  char out[8][4096];
  int done;
} client_t;

static int dial(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET,
                          .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Sends req, reads until the peer closes or `until` appears n times. */
static void exchange(int port, const char *req, size_t len, const char *until,
                     int n, char *out, size_t cap) {
  int fd = dial(port);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, req, len), (ssize_t)len);
  size_t got = 0;
  for (;;) {
    ssize_t r = read(fd, out + got, cap - 1 - got);
    if (r <= 0)
      break;
    got += (size_t)r;
    out[got] = '\0';
    if (until == NULL)
      continue;
    int seen = 0;
    for (const char *p = out; (p = strstr(p, until)) != NULL; p++)
      seen++;
    if (seen >= n)
      break;
  }
  out[got] = '\0';
  close(fd);
}

static void client_main(void *arg) {
  client_t *c = arg;
  static const char ka[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                           "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  exchange(c->port, ka, sizeof ka - 1, "HTTP/1.1 200", 2, c->out[0], 4096);
  static const char nf[] = "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
  exchange(c->port, nf, sizeof nf - 1, "\r\n\r\n", 1, c->out[1], 4096);
  static const char post[] = "POST /metrics HTTP/1.1\r\nHost: x\r\n"
                             "Content-Length: 0\r\n\r\n";
  exchange(c->port, post, sizeof post - 1, "\r\n\r\n", 1, c->out[2], 4096);
  static const char bad[] = "\x01\x02 nonsense\r\n\r\n";
  exchange(c->port, bad, sizeof bad - 1, NULL, 0, c->out[3], 4096);
  char big[ZM_METRICS_MAX_HEAD + 200];
  memset(big, 'a', sizeof big);
  memcpy(big, "GET /metrics HTTP/1.1\r\nX: ", 26);
  exchange(c->port, big, sizeof big, NULL, 0, c->out[4], 4096);
  static const char rd[] = "GET /readyz HTTP/1.0\r\n\r\n";
  ready_flag = 0;
  exchange(c->port, rd, sizeof rd - 1, NULL, 0, c->out[5], 4096);
  ready_flag = 1;
  /* over the cap: the extra connections are closed without a byte */
  int fds[6], closed = 0;
  for (int i = 0; i < 6; i++)
    fds[i] = dial(c->port);
  usleep(200000);
  for (int i = 0; i < 6; i++) {
    char b;
    struct timeval tv = {0, 200000};
    setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (read(fds[i], &b, 1) == 0)
      closed++;
    close(fds[i]);
  }
  snprintf(c->out[6], 4096, "%d", closed);
  c->done = 1;
}

static void on_check(uv_timer_t *t) {
  client_t *c = t->data;
  if (c->done)
    uv_stop(t->loop);
}

static void on_srv_closed(void *data) { *(int *)data = 1; }

static void test_listener(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_metrics_config_t cfg = {.address = "127.0.0.1:0",
                             .max_conns = 4,
                             .render = render,
                             .ready = ready};
  zm_metrics_srv_t *s;
  assert_int_equal(zm_metrics_srv_new(&s, &loop, &cfg), 0);
  assert_int_equal(zm_metrics_srv_listen(s), 0);
  client_t c;
  memset(&c, 0, sizeof c);
  c.port = zm_metrics_srv_port(s);
  uv_thread_t th;
  uv_thread_create(&th, client_main, &c);
  uv_timer_t t;
  uv_timer_init(&loop, &t);
  t.data = &c;
  uv_timer_start(&t, on_check, 10, 10);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_thread_join(&th);
  assert_non_null(strstr(c.out[0], "ok\n"));
  assert_non_null(strstr(c.out[0], "t_total 1"));
  assert_non_null(strstr(c.out[0], "version=0.0.4"));
  assert_true(strncmp(c.out[1], "HTTP/1.1 404", 12) == 0);
  assert_true(strncmp(c.out[2], "HTTP/1.1 405", 12) == 0);
  assert_non_null(strstr(c.out[2], "Allow: GET, HEAD"));
  assert_true(strncmp(c.out[3], "HTTP/1.1 400", 12) == 0);
  assert_true(strncmp(c.out[4], "HTTP/1.1 431", 12) == 0);
  assert_true(strncmp(c.out[5], "HTTP/1.1 503", 12) == 0);
  assert_non_null(strstr(c.out[5], "not ready: draining"));
  assert_int_equal(atoi(c.out[6]), 2); /* 6 dialled, cap 4 */
  zm_metrics_srv_stats_t st;
  zm_metrics_srv_get_stats(s, &st);
  assert_int_equal(st.scrapes, 1);
  assert_true(st.rejected_conns >= 2);
  int closed = 0;
  uv_close((uv_handle_t *)&t, NULL);
  zm_metrics_srv_close(s, on_srv_closed, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_true(closed);
  zm_metrics_srv_free(s);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_bad_address(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_metrics_config_t cfg = {.address = "nonsense"};
  zm_metrics_srv_t *s;
  assert_int_equal(zm_metrics_srv_new(&s, &loop, &cfg), ZM_E_INVAL);
  assert_null(s);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_listener),
      cmocka_unit_test(test_bad_address),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
