/*
 * fuzz_http1.c - the controller client's HTTP/1.1 response parser
 * (src/ziti/http1.h) on llhttp.
 *
 * Input: byte 0 chooses the split offset (byte 0 * len / 256) and the body
 * bound (bit 0: 64 bytes, else ZM_HTTP1_MAX_BODY); the rest is what the
 * controller sent. The bytes are parsed twice: whole, and in two pieces cut
 * at the offset, each piece in its own exact-size heap block (ASan sees any
 * read past a piece). Properties: both parses agree on the result, the
 * bytes consumed and the EOF verdict and, unless that is an error (then the
 * caller drops the response), on everything else the caller sees (status,
 * Retry-After, Connection: close, keep-alive, Content-Type, zt-session,
 * body); results are only the documented ones; body and header bounds hold;
 * a reset forgets the response and the parser then takes what follows.
 */
#include "fuzz_common.h"

#include "ziti/http1.h"
#include "zm/zm.h"

#include <string.h>

typedef struct {
  ssize_t feed; /* consumed (>= 0) or the error/INCOMPLETE */
  int eof;      /* zm_http1_resp_eof after the bytes */
  zm_http1_resp_t r;
} run_t;

static ssize_t feed_piece(zm_http1_resp_t *r, const uint8_t *p, size_t n) {
  char *copy = malloc(n ? n : 1);
  memcpy(copy, p, n);
  ssize_t rv = zm_http1_resp_feed(r, copy, n);
  free(copy);
  return rv;
}

static void check_result(ssize_t rv, size_t len) {
  FUZZ_CHECK(rv == ZM_E_INCOMPLETE || rv == ZM_E_PROTO ||
             rv == ZM_E_MSG_TOO_LARGE || (rv >= 0 && (size_t)rv <= len));
}

static void run(run_t *x, const uint8_t *p, size_t len, size_t cut,
                size_t max_body) {
  zm_http1_resp_init(&x->r, max_body);
  if (cut == len) {
    x->feed = feed_piece(&x->r, p, len);
  } else {
    ssize_t a = feed_piece(&x->r, p, cut);
    check_result(a, cut);
    ssize_t b = feed_piece(&x->r, p + cut, len - cut);
    if (a >= 0) {
      /* Complete within the first piece: later bytes are not taken. */
      FUZZ_CHECK(b == 0);
      x->feed = a;
    } else if (a != ZM_E_INCOMPLETE) {
      FUZZ_CHECK(b == a); /* errors are sticky */
      x->feed = a;
    } else {
      x->feed = b >= 0 ? (ssize_t)cut + b : b;
    }
  }
  check_result(x->feed, len);
  x->eof = zm_http1_resp_eof(&x->r);
  FUZZ_CHECK(x->eof == 0 || x->eof == ZM_E_INCOMPLETE || x->eof == ZM_E_PROTO ||
             x->eof == ZM_E_MSG_TOO_LARGE);
}

static void check_bounds(const zm_http1_resp_t *r, size_t max_body) {
  FUZZ_CHECK(r->body_len <= max_body);
  FUZZ_CHECK(r->body_len == 0 || r->body[r->body_len] == '\0');
  FUZZ_CHECK(strlen(r->content_type) < sizeof(r->content_type));
  FUZZ_CHECK(r->session.len <= ZM_HTTP1_MAX_VALUE);
  FUZZ_CHECK(r->header_bytes <= ZM_HTTP1_MAX_HEADER + 65536);
  if (r->complete)
    FUZZ_CHECK(r->status >= 0 && r->status <= 999);
  FUZZ_CHECK(r->retry_after >= -1 && r->retry_after <= 3600);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const uint8_t *p = data + 1;
  size_t len = size - 1;
  size_t cut = (size_t)data[0] * len / 256;
  size_t max_body = (data[0] & 1) ? 64 : ZM_HTTP1_MAX_BODY;

  run_t whole, split;
  run(&whole, p, len, len, max_body);
  run(&split, p, len, cut, max_body);

  FUZZ_CHECK(whole.feed == split.feed);
  FUZZ_CHECK(whole.eof == split.eof);
  const zm_http1_resp_t *a = &whole.r, *b = &split.r;
  FUZZ_CHECK(a->complete == b->complete);
  FUZZ_CHECK(a->err == b->err);
  check_bounds(a, max_body);
  check_bounds(b, max_body);
  /* After an error the caller drops the response, and llhttp does not
   * flush a pending body span when it fails mid-buffer (a split parse has
   * flushed it at the cut), so only error-free results are compared. */
  if (a->err != 0)
    goto done;
  FUZZ_CHECK(a->status == b->status);
  FUZZ_CHECK(a->retry_after == b->retry_after);
  FUZZ_CHECK(a->conn_close == b->conn_close);
  FUZZ_CHECK(a->keep_alive == b->keep_alive);
  FUZZ_CHECK(strcmp(a->content_type, b->content_type) == 0);
  FUZZ_CHECK(a->session.len == b->session.len);
  FUZZ_CHECK(a->session.len == 0 ||
             memcmp(a->session.base, b->session.base, a->session.len) == 0);
  FUZZ_CHECK(a->body_len == b->body_len);
  FUZZ_CHECK(a->body_len == 0 || memcmp(a->body, b->body, a->body_len) == 0);
  if (whole.feed >= 0)
    FUZZ_CHECK(a->complete);

done:
  /* A connection is reused after reset: the rest must parse from scratch
   * without crashing, and reset must leave nothing of the old response. */
  zm_http1_resp_reset(&whole.r);
  FUZZ_CHECK(a->status == 0 && a->body_len == 0 && a->session.len == 0 &&
             a->content_type[0] == '\0' && !a->complete && !a->err);
  if (whole.feed > 0 && (size_t)whole.feed < len) {
    ssize_t rv = feed_piece(&whole.r, p + whole.feed, len - (size_t)whole.feed);
    check_result(rv, len - (size_t)whole.feed);
    check_bounds(a, max_body);
  }
  zm_http1_resp_dispose(&whole.r);
  zm_http1_resp_dispose(&split.r);
  return 0;
}
