/* zm-unit-libs: zm_ziti */
/* Unit tests of the resolver threads (src/ziti/resolve.c): an outstanding
 * lookup keeps uv_run alive until its callback (a connection that closes
 * while it resolves may have no other handle left), a cancelled one still
 * completes, with UV_ECANCELED, and an idle resolver keeps nothing alive.
 * Numeric hosts only: no DNS, no host files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "ziti/resolve.h"

typedef struct {
  zm__resolve_req_t req;
  int calls, status;
  int port;
} probe_t;

static void on_done(zm__resolve_req_t *req, int status, struct addrinfo *res) {
  probe_t *p = (probe_t *)req; /* req is the first member */
  p->calls++;
  p->status = status;
  if (res != NULL) {
    const struct sockaddr_in *sin = (const struct sockaddr_in *)res->ai_addr;
    p->port = res->ai_family == AF_INET ? (int)ntohs(sin->sin_port) : -1;
    freeaddrinfo(res);
  }
}

static void on_closed(void *data) { (*(int *)data)++; }

static void test_outstanding_lookups_keep_the_loop_alive(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  zm__resolver_t *r;
  assert_int_equal(zm__resolver_new(&r, &loop), 0);
  /* nothing outstanding: the resolver alone does not keep uv_run going */
  assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);

  probe_t a, b, c;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  memset(&c, 0, sizeof c);
  assert_int_equal(zm__resolve(r, &a.req, "127.0.0.1", "443", on_done), 0);
  assert_int_equal(zm__resolve(r, &b.req, "127.0.0.1", "80", on_done), 0);
  assert_int_equal(zm__resolve(r, &c.req, "127.0.0.1", "8443", on_done), 0);
  zm__resolve_cancel(r, &c.req);
  assert_int_equal(a.calls + b.calls + c.calls, 0); /* never inside resolve */
  /* no other handle is alive: uv_run returns only once all three answered */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(a.calls, 1);
  assert_int_equal(a.status, 0);
  assert_int_equal(a.port, 443);
  assert_int_equal(b.calls, 1);
  assert_int_equal(b.port, 80);
  assert_int_equal(c.calls, 1);
  assert_int_equal(c.status, UV_ECANCELED);

  /* a second round after the count went back to zero */
  memset(&a, 0, sizeof a);
  assert_int_equal(zm__resolve(r, &a.req, "127.0.0.1", "1", on_done), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(a.calls, 1);
  assert_int_equal(a.port, 1);

  int closed = 0;
  zm__resolver_close(r, on_closed, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_bad_input(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  zm__resolver_t *r;
  assert_int_equal(zm__resolver_new(&r, &loop), 0);
  probe_t a;
  memset(&a, 0, sizeof a);
  char host[300];
  memset(host, 'h', sizeof host - 1);
  host[sizeof host - 1] = '\0';
  assert_int_equal(zm__resolve(r, &a.req, host, "1", on_done), UV_EINVAL);
  assert_int_equal(zm__resolve(r, &a.req, "127.0.0.1", "123456789", on_done),
                   UV_EINVAL);
  /* refused requests are not outstanding: the loop has nothing to wait for */
  assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(a.calls, 0);
  int closed = 0;
  zm__resolver_close(r, on_closed, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_outstanding_lookups_keep_the_loop_alive),
      cmocka_unit_test(test_bad_input),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
