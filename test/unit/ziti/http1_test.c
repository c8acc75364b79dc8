/*
 * http1_test.c - the HTTP/1.1 response parser fed canned byte streams whole,
 * split at every offset and one byte at a time (results must be identical),
 * and request serialization.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "ziti/http1.h"
#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What one run produced. */
typedef struct {
  int rc;     /* 1 = complete, ZM_E_INCOMPLETE, or an error */
  size_t end; /* offset just past the response when complete */
  int status;
  char body[4096];
  size_t body_len;
  char ctype[128];
  char session[128];
  int retry_after;
  int keep_alive;
} outcome_t;

static void snapshot(const zm_http1_resp_t *r, int rc, size_t end,
                     outcome_t *o) {
  memset(o, 0, sizeof(*o));
  o->rc = rc;
  o->end = end;
  o->status = r->status;
  if (r->body_len < sizeof(o->body)) {
    memcpy(o->body, r->body ? r->body : "", r->body_len);
    o->body_len = r->body_len;
  } else {
    o->body_len = r->body_len;
  }
  snprintf(o->ctype, sizeof(o->ctype), "%s", r->content_type);
  snprintf(o->session, sizeof(o->session), "%s",
           r->session.base ? r->session.base : "");
  o->retry_after = r->retry_after;
  o->keep_alive = r->keep_alive;
}

/* Feeds p in pieces cut at cuts[0..ncuts) (ascending), then EOF if asked. */
static void run(const char *p, size_t n, const size_t *cuts, size_t ncuts,
                int eof, size_t max_body, outcome_t *o) {
  zm_http1_resp_t r;
  zm_http1_resp_init(&r, max_body);
  size_t pos = 0;
  int rc = ZM_E_INCOMPLETE;
  size_t end = 0;
  for (size_t i = 0; i <= ncuts && rc == ZM_E_INCOMPLETE; i++) {
    size_t stop = i < ncuts ? cuts[i] : n;
    ssize_t k = zm_http1_resp_feed(&r, p + pos, stop - pos);
    if (k >= 0) {
      rc = 1;
      end = pos + (size_t)k;
    } else if (k != ZM_E_INCOMPLETE) {
      rc = (int)k;
    }
    pos = stop;
  }
  if (rc == ZM_E_INCOMPLETE && eof) {
    int e = zm_http1_resp_eof(&r);
    if (e == 0) {
      rc = 1;
      end = n;
    } else {
      rc = e;
    }
  }
  snapshot(&r, rc, end, o);
  zm_http1_resp_dispose(&r);
}

static void assert_same(const outcome_t *a, const outcome_t *b) {
  assert_int_equal(a->rc, b->rc);
  if (a->rc != 1)
    return;
  assert_int_equal(a->end, b->end);
  assert_int_equal(a->status, b->status);
  assert_int_equal(a->body_len, b->body_len);
  assert_memory_equal(a->body, b->body,
                      a->body_len < sizeof(a->body) ? a->body_len : 0);
  assert_string_equal(a->ctype, b->ctype);
  assert_string_equal(a->session, b->session);
  assert_int_equal(a->retry_after, b->retry_after);
  assert_int_equal(a->keep_alive, b->keep_alive);
}

/* Whole, every 2-way split, and 1-byte pieces all give `want`. */
static void check_all_splits(const char *p, size_t n, int eof, size_t max_body,
                             const outcome_t *want) {
  outcome_t o;
  run(p, n, NULL, 0, eof, max_body, &o);
  assert_same(&o, want);
  for (size_t cut = 0; cut <= n; cut++) {
    run(p, n, &cut, 1, eof, max_body, &o);
    assert_same(&o, want);
  }
  size_t *cuts = malloc((n ? n : 1) * sizeof(size_t));
  for (size_t i = 0; i < n; i++)
    cuts[i] = i + 1;
  run(p, n, cuts, n ? n - 1 : 0, eof, max_body, &o);
  free(cuts);
  assert_same(&o, want);
}

#define S(lit) lit, sizeof(lit) - 1

static void test_content_length(void **state) {
  (void)state;
  static const char resp[] =
      "HTTP/1.1 200 OK\r\n"
      "Content-Type: application/json\r\n"
      "Zt-Session: 0b3f5c1e-aaaa-bbbb-cccc-000000000001\r\n"
      "Server: ziti-controller/v1\r\n"
      "Content-Length: 27\r\n"
      "\r\n"
      "{\"data\":{\"id\":\"x\"},\"meta\":{}}";
  /* body is 29 bytes; Content-Length says 27: the parser must stop at 27 */
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1 - 2;
  want.status = 200;
  memcpy(want.body, "{\"data\":{\"id\":\"x\"},\"meta\":{", 27);
  want.body_len = 27;
  strcpy(want.ctype, "application/json");
  strcpy(want.session, "0b3f5c1e-aaaa-bbbb-cccc-000000000001");
  want.retry_after = -1;
  want.keep_alive = 1;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_chunked_extensions(void **state) {
  (void)state;
  static const char resp[] = "HTTP/1.1 201 Created\r\n"
                             "transfer-encoding: chunked\r\n"
                             "content-type: application/json\r\n"
                             "\r\n"
                             "5;ext=1\r\nhello\r\n"
                             "6;a;b=\"c d\"\r\n world\r\n"
                             "0\r\n\r\n";
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1;
  want.status = 201;
  strcpy(want.body, "hello world");
  want.body_len = 11;
  strcpy(want.ctype, "application/json");
  want.retry_after = -1;
  want.keep_alive = 1;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_chunked_trailers(void **state) {
  (void)state;
  /* A trailer must not override a header we keep. */
  static const char resp[] = "HTTP/1.1 200 OK\r\n"
                             "Transfer-Encoding: chunked\r\n"
                             "ZT-SESSION: real\r\n"
                             "\r\n"
                             "3\r\nabc\r\n"
                             "0\r\n"
                             "X-Checksum: 42\r\n"
                             "Zt-Session: forged\r\n"
                             "\r\n";
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1;
  want.status = 200;
  strcpy(want.body, "abc");
  want.body_len = 3;
  strcpy(want.session, "real");
  want.retry_after = -1;
  want.keep_alive = 1;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_connection_close(void **state) {
  (void)state;
  static const char resp[] = "HTTP/1.1 503 Service Unavailable\r\n"
                             "Connection: keep-alive, Close\r\n"
                             "Retry-After: 2\r\n"
                             "Content-Length: 4\r\n"
                             "\r\n"
                             "busy";
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1;
  want.status = 503;
  strcpy(want.body, "busy");
  want.body_len = 4;
  want.retry_after = 2;
  want.keep_alive = 0;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_eof_delimited(void **state) {
  (void)state;
  static const char resp[] = "HTTP/1.1 200 OK\r\n"
                             "Connection: close\r\n"
                             "\r\n"
                             "-----BEGIN CERTIFICATE-----\n";
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1;
  want.status = 200;
  strcpy(want.body, "-----BEGIN CERTIFICATE-----\n");
  want.body_len = strlen(want.body);
  want.retry_after = -1;
  want.keep_alive = 0;
  check_all_splits(S(resp), 1, ZM_HTTP1_MAX_BODY, &want);
  /* Without the EOF it is not complete. */
  outcome_t o;
  run(S(resp), NULL, 0, 0, ZM_HTTP1_MAX_BODY, &o);
  assert_int_equal(o.rc, ZM_E_INCOMPLETE);
}

static void test_no_body(void **state) {
  (void)state;
  static const char resp[] = "HTTP/1.1 204 No Content\r\n"
                             "Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n"
                             "\r\n";
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1;
  want.status = 204;
  want.retry_after = -1; /* dates are ignored */
  want.keep_alive = 1;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_interim_then_final(void **state) {
  (void)state;
  static const char resp[] = "HTTP/1.1 100 Continue\r\n\r\n"
                             "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                             "HTTP/1.1 200 OK\r\n"; /* trailing bytes */
  outcome_t want;
  memset(&want, 0, sizeof(want));
  want.rc = 1;
  want.end = sizeof(resp) - 1 - strlen("HTTP/1.1 200 OK\r\n");
  want.status = 200;
  strcpy(want.body, "ok");
  want.body_len = 2;
  want.retry_after = -1;
  want.keep_alive = 1;
  check_all_splits(S(resp), 0, ZM_HTTP1_MAX_BODY, &want);
}

static void test_errors(void **state) {
  (void)state;
  outcome_t want;
  memset(&want, 0, sizeof(want));

  want.rc = ZM_E_PROTO;
  check_all_splits(S("FOO BAR\r\n\r\n"), 0, ZM_HTTP1_MAX_BODY, &want);
  check_all_splits(S("HTTP/1.1 2x0 OK\r\n\r\n"), 0, ZM_HTTP1_MAX_BODY, &want);
  check_all_splits(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "zz\r\n"),
                   0, ZM_HTTP1_MAX_BODY, &want);

  /* body above the bound */
  want.rc = ZM_E_MSG_TOO_LARGE;
  char big[200];
  snprintf(big, sizeof(big),
           "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n%0100d", 7);
  check_all_splits(big, strlen(big), 0, 64, &want);

  /* header block above the bound: a long value of an ignored header */
  size_t n = ZM_HTTP1_MAX_HEADER + 100;
  char *h = malloc(n + 64);
  size_t k = (size_t)sprintf(h, "HTTP/1.1 200 OK\r\nX-Pad: ");
  memset(h + k, 'a', n);
  k += n;
  k += (size_t)sprintf(h + k, "\r\n\r\n");
  outcome_t o;
  run(h, k, NULL, 0, 0, ZM_HTTP1_MAX_BODY, &o);
  assert_int_equal(o.rc, ZM_E_MSG_TOO_LARGE);
  size_t cuts[3] = {10, 5000, 40000};
  run(h, k, cuts, 3, 0, ZM_HTTP1_MAX_BODY, &o);
  assert_int_equal(o.rc, ZM_E_MSG_TOO_LARGE);
  free(h);

  /* a kept header above its own bound */
  char *s = malloc(ZM_HTTP1_MAX_VALUE + 100);
  k = (size_t)sprintf(s, "HTTP/1.1 200 OK\r\nzt-session: ");
  memset(s + k, 'b', ZM_HTTP1_MAX_VALUE);
  k += ZM_HTTP1_MAX_VALUE;
  k += (size_t)sprintf(s + k, "\r\n\r\n");
  run(s, k, NULL, 0, 0, ZM_HTTP1_MAX_BODY, &o);
  assert_int_equal(o.rc, ZM_E_MSG_TOO_LARGE);
  free(s);

  /* cut short: EOF in the middle of the body */
  want.rc = ZM_E_INCOMPLETE;
  check_all_splits(S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), 1,
                   ZM_HTTP1_MAX_BODY, &want);
  /* EOF before anything */
  zm_http1_resp_t r;
  zm_http1_resp_init(&r, 10);
  assert_int_equal(zm_http1_resp_eof(&r), ZM_E_INCOMPLETE);
  /* the error is sticky */
  assert_int_equal(zm_http1_resp_feed(&r, S("garbage")), ZM_E_PROTO);
  assert_int_equal(zm_http1_resp_feed(&r, S("HTTP/1.1 200 OK\r\n\r\n")),
                   ZM_E_PROTO);
  /* and reset clears it */
  zm_http1_resp_reset(&r);
  assert_int_equal(
      zm_http1_resp_feed(&r, S("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")),
      (ssize_t)strlen("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
  assert_int_equal(r.status, 200);
  zm_http1_resp_dispose(&r);
}

static void test_reuse_after_reset(void **state) {
  (void)state;
  zm_http1_resp_t r;
  zm_http1_resp_init(&r, 1024);
  const char a[] = "HTTP/1.1 401 Unauthorized\r\nZt-Session: t1\r\n"
                   "Content-Length: 1\r\n\r\nx";
  assert_int_equal(zm_http1_resp_feed(&r, S(a)), (ssize_t)(sizeof(a) - 1));
  assert_int_equal(r.status, 401);
  assert_string_equal(r.session.base, "t1");
  /* complete: further bytes are not consumed */
  assert_int_equal(zm_http1_resp_feed(&r, S("more")), 0);
  zm_http1_resp_reset(&r);
  assert_null(r.session.base);
  assert_int_equal(r.body_len, 0);
  const char b[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
  assert_int_equal(zm_http1_resp_feed(&r, S(b)), (ssize_t)(sizeof(b) - 1));
  assert_int_equal(r.status, 200);
  assert_null(r.session.base);
  assert_string_equal(r.body, "hi");
  zm_http1_resp_dispose(&r);
}

static void test_request_serialize(void **state) {
  (void)state;
  zm_secret_t out = {0};
  zm_http1_req_t q = {
      .method = "POST",
      .host = "127.0.0.1:1280",
      .target = "/edge/management/v1/identities",
      .content_type = "application/json",
      .session = "tok-123",
      .body = "{\"a\":1}",
      .body_len = 7,
  };
  assert_int_equal(zm_http1_req_serialize(&q, &out), 0);
  assert_string_equal(out.base,
                      "POST /edge/management/v1/identities HTTP/1.1\r\n"
                      "Host: 127.0.0.1:1280\r\n"
                      "User-Agent: ziti-management\r\n"
                      "Accept: application/json\r\n"
                      "Connection: keep-alive\r\n"
                      "zt-session: tok-123\r\n"
                      "Content-Type: application/json\r\n"
                      "Content-Length: 7\r\n"
                      "\r\n"
                      "{\"a\":1}");
  assert_int_equal(out.len, strlen(out.base));

  zm_http1_req_t g = {.method = "GET",
                      .host = "ctrl:443",
                      .target = "/.well-known/est/cacerts",
                      .accept = "application/pkcs7-mime"};
  assert_int_equal(zm_http1_req_serialize(&g, &out), 0);
  assert_string_equal(out.base, "GET /.well-known/est/cacerts HTTP/1.1\r\n"
                                "Host: ctrl:443\r\n"
                                "User-Agent: ziti-management\r\n"
                                "Accept: application/pkcs7-mime\r\n"
                                "Connection: keep-alive\r\n"
                                "\r\n");
  /* POST without body still says Content-Length: 0 */
  zm_http1_req_t p0 = {.method = "POST", .host = "h:1", .target = "/x"};
  assert_int_equal(zm_http1_req_serialize(&p0, &out), 0);
  assert_non_null(strstr(out.base, "Content-Length: 0\r\n\r\n"));

  /* header injection and bad targets are refused */
  zm_http1_req_t bad = g;
  bad.session = "tok\r\nX-Evil: 1";
  assert_int_equal(zm_http1_req_serialize(&bad, &out), ZM_E_INVAL);
  bad = g;
  bad.target = "/a b";
  assert_int_equal(zm_http1_req_serialize(&bad, &out), ZM_E_INVAL);
  bad = g;
  bad.target = "relative";
  assert_int_equal(zm_http1_req_serialize(&bad, &out), ZM_E_INVAL);
  bad = g;
  bad.host = "h\n";
  assert_int_equal(zm_http1_req_serialize(&bad, &out), ZM_E_INVAL);
  zm_secret_dispose(&out);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_content_length),
      cmocka_unit_test(test_chunked_extensions),
      cmocka_unit_test(test_chunked_trailers),
      cmocka_unit_test(test_connection_close),
      cmocka_unit_test(test_eof_delimited),
      cmocka_unit_test(test_no_body),
      cmocka_unit_test(test_interim_then_final),
      cmocka_unit_test(test_errors),
      cmocka_unit_test(test_reuse_after_reset),
      cmocka_unit_test(test_request_serialize),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
