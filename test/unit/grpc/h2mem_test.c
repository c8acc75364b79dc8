/* zm-unit-libs: zm_grpc zm_util */
/* Unit tests of nghttp2's allocator (src/grpc/h2mem.c): per-session
 * accounting, and trimming, which gives back resident all-zero pages of a
 * session's mapped blocks and nothing else, so that a session keeps working
 * after it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "grpc/h2mem.h"

static size_t pg(void) { return (size_t)sysconf(_SC_PAGESIZE); }

static int resident(const void *p) {
  unsigned char v = 0;
  assert_int_equal(mincore((void *)p, pg(), &v), 0);
  return v & 1;
}

static void test_trim_gives_back_zero_pages_only(void **state) {
  (void)state;
  zm_h2_mem_t m;
  zm_h2_mem_init(&m);
  nghttp2_mem *a = &m.mem;
  size_t n = 3 * pg();
  unsigned char *p = a->malloc(n, a->mem_user_data);
  assert_non_null(p);
  assert_int_equal(m.mapped_bytes, n);
  unsigned char *q = a->malloc(100, a->mem_user_data);
  assert_non_null(q);
  assert_true(m.heap_bytes >= 100);

  p[10] = 1; /* page 0: written, then wiped */
  p[10] = 0;
  p[pg() + 7] = 42; /* page 1: holds a byte */
  /* page 2: never touched */
  assert_true(resident(p));
  assert_true(resident(p + pg()));

  assert_int_equal(zm_h2_mem_trim(&m), pg());
  assert_false(resident(p));
  assert_true(resident(p + pg()));
  assert_false(resident(p + 2 * pg()));
  /* nothing left to give back */
  assert_int_equal(zm_h2_mem_trim(&m), 0);
  /* the contents are what they were; a trimmed page is writable */
  assert_int_equal(p[pg() + 7], 42);
  assert_int_equal(p[10], 0);
  p[20] = 5;
  assert_int_equal(p[20], 5);

  a->free(p, a->mem_user_data);
  a->free(q, a->mem_user_data);
  assert_int_equal(m.mapped_bytes, 0);
  assert_int_equal(m.heap_bytes, 0);
}

/* A malloc'd block: only whole pages inside it are looked at. */
static void test_trim_zero_pages_of_a_heap_block(void **state) {
  (void)state;
  size_t n = 6 * pg() + 100;
  unsigned char *b = malloc(n);
  assert_non_null(b);
  memset(b, 0, n);
  b[0] = 1;        /* the first (partial or whole) page stays */
  b[n - 1] = 2;    /* and the last */
  b[3 * pg()] = 3; /* one in the middle */
  size_t got = zm_trim_zero_pages(b, n);
  assert_int_equal(got % pg(), 0);
  /* at least the whole pages other than those three are zero and go */
  assert_true(got >= 2 * pg());
  assert_int_equal(b[0], 1);
  assert_int_equal(b[n - 1], 2);
  assert_int_equal(b[3 * pg()], 3);
  for (size_t i = 1; i < n - 1; i++)
    if (i != 3 * pg())
      assert_int_equal(b[i], 0);
  memset(b + pg() + 1, 7, 10); /* writable again */
  assert_int_equal(b[pg() + 5], 7);
  free(b);
  /* smaller than a page: nothing to look at */
  unsigned char *s = calloc(1, 100);
  assert_non_null(s);
  assert_int_equal(zm_trim_zero_pages(s, 100), 0);
  free(s);
}

/* ---- a server session trimmed between two calls ---------------------------
 */

typedef struct {
  nghttp2_session *srv, *cli;
  int responses; /* client: responses completed */
} pair_t;

static ssize_t body(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len,
                    uint32_t *flags, nghttp2_data_source *src, void *ud) {
  (void)s;
  (void)sid;
  (void)src;
  (void)ud;
  assert_true(len >= 7);
  memcpy(buf, "\0\0\0\0\2\x08\x01", 7); /* HealthCheckResponse SERVING */
  *flags = NGHTTP2_DATA_FLAG_EOF;
  return 7;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
  pair_t *pp = ud;
  if (f->hd.stream_id == 0 || !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  if (s == pp->srv) {
    const nghttp2_nv h[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
         NGHTTP2_NV_FLAG_NONE}};
    nghttp2_data_provider dp = {.read_callback = body};
    assert_int_equal(nghttp2_submit_response(s, f->hd.stream_id, h, 2, &dp), 0);
  } else {
    pp->responses++;
  }
  return 0;
}

/* Moves bytes both ways until both sides are quiet; the server's frames are
 * wiped once taken, as conn.c does. */
static void pump(pair_t *pp) {
  for (int round = 0; round < 8; round++) {
    const uint8_t *d;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(pp->cli, &d)) > 0)
      assert_int_equal(nghttp2_session_mem_recv(pp->srv, d, (size_t)n), n);
    while ((n = nghttp2_session_mem_send(pp->srv, &d)) > 0) {
      assert_int_equal(nghttp2_session_mem_recv(pp->cli, d, (size_t)n), n);
      memset((void *)d, 0, (size_t)n);
    }
  }
}

static void request(pair_t *pp) {
  const nghttp2_nv rq[] = {
      {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":scheme", (uint8_t *)"http", 7, 4, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":path", (uint8_t *)"/grpc.health.v1.Health/Check", 5, 28,
       NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":authority", (uint8_t *)"127.0.0.1", 10, 9,
       NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
       NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"te", (uint8_t *)"trailers", 2, 8, NGHTTP2_NV_FLAG_NONE},
  };
  assert_true(nghttp2_submit_request(pp->cli, NULL, rq, 6, NULL, NULL) > 0);
  pump(pp);
}

static void test_session_works_after_trim(void **state) {
  (void)state;
  zm_h2_mem_t m;
  zm_h2_mem_init(&m);
  pair_t pp = {0};
  nghttp2_session_callbacks *cbs;
  nghttp2_option *opt;
  assert_int_equal(nghttp2_session_callbacks_new(&cbs), 0);
  assert_int_equal(nghttp2_option_new(&opt), 0);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_option_set_no_closed_streams(opt, 1);
  assert_int_equal(nghttp2_session_server_new3(&pp.srv, cbs, &pp, opt, &m.mem),
                   0);
  assert_int_equal(nghttp2_session_client_new(&pp.cli, cbs, &pp), 0);
  assert_true(m.mapped_bytes > 0);
  nghttp2_submit_settings(pp.srv, NGHTTP2_FLAG_NONE, NULL, 0);
  nghttp2_submit_settings(pp.cli, NGHTTP2_FLAG_NONE, NULL, 0);

  request(&pp);
  assert_int_equal(pp.responses, 1);
  /* idle: the frame buffer (frames wiped) and the empty stream map */
  assert_true(zm_h2_mem_trim(&m) >= 2 * pg());
  /* HPACK tables and settings are on the heap and survive: both sides
   * still agree on the dynamic tables the next request uses */
  request(&pp);
  assert_int_equal(pp.responses, 2);
  request(&pp);
  assert_int_equal(pp.responses, 3);

  nghttp2_session_del(pp.cli);
  nghttp2_session_del(pp.srv);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  assert_int_equal(m.mapped_bytes, 0);
  assert_int_equal(m.heap_bytes, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_trim_gives_back_zero_pages_only),
      cmocka_unit_test(test_trim_zero_pages_of_a_heap_block),
      cmocka_unit_test(test_session_works_after_trim),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
