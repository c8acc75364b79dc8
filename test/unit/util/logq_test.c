/* zm-unit-libs: zm_util */
/* Unit tests of the asynchronous line writer and the audit line format:
 * order kept, a writer stalled on a full pipe never blocks a producer
 * (lines are dropped and counted instead), JSON escaping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "zm/audit.h"
#include "zm/logq.h"

static void test_order_and_flush(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  zm_logq_t *q = zm_logq_new(p[1], 4096, 1, 0);
  assert_non_null(q);
  char line[32];
  for (int i = 0; i < 100; i++) {
    int n = snprintf(line, sizeof line, "line %03d\n", i);
    while (zm_logq_push(q, line, (size_t)n) != 0)
      zm_logq_flush(q); /* the pipe is drained below; 4 KiB ring */
    if (i % 50 == 49) {
      zm_logq_flush(q);
      char buf[8192];
      ssize_t r = read(p[0], buf, sizeof buf);
      assert_true(r > 0);
    }
  }
  zm_logq_free(q);
  close(p[0]);
}

static void test_full_pipe_never_blocks(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  fcntl(p[1], F_SETPIPE_SZ, 4096);
  zm_logq_t *q = zm_logq_new(p[1], 16384, 1, 0);
  assert_non_null(q);
  char line[100];
  memset(line, 'x', sizeof line);
  line[99] = '\n';
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  /* nobody reads the pipe: the writer blocks, producers must not */
  for (int i = 0; i < 100000; i++)
    zm_logq_push(q, line, sizeof line);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  assert_true(s < 2.0);
  assert_true(zm_logq_dropped(q) > 90000);
  /* drain so that the writer can finish */
  int fl = fcntl(p[0], F_GETFL);
  fcntl(p[0], F_SETFL, fl | O_NONBLOCK);
  char buf[65536];
  size_t total = 0;
  int found_drop_line = 0;
  for (int spins = 0; spins < 2000; spins++) {
    ssize_t r = read(p[0], buf, sizeof buf - 1);
    if (r > 0) {
      buf[r] = '\0';
      total += (size_t)r;
      if (strstr(buf, "lines dropped") != NULL)
        found_drop_line = 1;
      spins = 0;
      if (found_drop_line && total > 16384)
        break;
    } else {
      usleep(1000);
    }
  }
  assert_true(found_drop_line);
  fcntl(p[0], F_SETFL, fl);
  /* keep reading in the background of free(): close the read end so the
   * writer's last write fails instead of blocking */
  close(p[0]);
  zm_logq_free(q);
}

static void test_audit_format(void **state) {
  (void)state;
  char b[256];
  size_t n =
      zm_audit_format(b, sizeof b, "authz_denied", "caller", "cn:a\"b\\c\n",
                      "skip", NULL, "method", "/x/Y", NULL);
  assert_int_equal(n, strlen(b));
  assert_non_null(strstr(b, "\"event\":\"authz_denied\""));
  assert_non_null(strstr(b, "\"caller\":\"cn:a\\\"b\\\\c\\u000a\""));
  assert_null(strstr(b, "skip"));
  assert_non_null(strstr(b, "\"method\":\"/x/Y\"}\n"));
  /* too long for the line: the pair is left out, the line is still JSON */
  char big[600];
  memset(big, 'v', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  n = zm_audit_format(b, sizeof b, "e", "k", big, "z", "1", NULL);
  assert_null(strstr(b, "vvvv"));
  assert_non_null(strstr(b, "\"z\":\"1\"}\n"));
}

/* Reads what the writer puts into the pipe within 10 s (-1: nothing). */
static ssize_t read_within(int fd, char *buf, size_t n) {
  struct pollfd pf = {.fd = fd, .events = POLLIN};
  if (poll(&pf, 1, 10000) != 1)
    return -1;
  return read(fd, buf, n);
}

/* A deferring thread's lines reach the fd once it kicks, or on their own
 * once the ring is past half full; the order holds either way. */
static void test_deferred_wakeups(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  zm_logq_t *q = zm_logq_new(p[1], 4096, 1, 0);
  assert_non_null(q);
  zm_logq_defer_here(1);
  assert_int_equal(zm_logq_push(q, "one\n", 4), 0);
  zm_logq_kick(q);
  char buf[8192];
  ssize_t r = read_within(p[0], buf, sizeof buf);
  assert_int_equal(r, 4);
  assert_memory_equal(buf, "one\n", 4);
  /* past half the ring: no kick needed */
  char big[2100];
  memset(big, 'x', sizeof big);
  big[sizeof big - 1] = '\n';
  assert_int_equal(zm_logq_push(q, big, sizeof big), 0);
  size_t got = 0;
  while (got < sizeof big) {
    r = read_within(p[0], buf + got, sizeof buf - got);
    assert_true(r > 0);
    got += (size_t)r;
  }
  assert_int_equal(got, sizeof big);
  zm_logq_kick(NULL);
  /* lines still deferred are written by free */
  assert_int_equal(zm_logq_push(q, "two\n", 4), 0);
  zm_logq_defer_here(0);
  zm_logq_free(q);
  r = read_within(p[0], buf, sizeof buf);
  assert_int_equal(r, 4);
  assert_memory_equal(buf, "two\n", 4);
  close(p[0]);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN); /* as main.c does */
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_order_and_flush),
      cmocka_unit_test(test_deferred_wakeups),
      cmocka_unit_test(test_full_pipe_never_blocks),
      cmocka_unit_test(test_audit_format),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
