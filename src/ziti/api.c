/*
 * api.c - the Edge API calls on top of the pool: authentication with the
 * client certificate (single-flight, re-authentication once on 401),
 * retries with exponential backoff on 429/503, the identity calls, the OTT
 * enrollment and the EST CA bundle, and the mapping of controller answers
 * to ZM_E_* codes. Wire facts: shared openziti-facts.md.
 *
 * Every call is an "op". An op runs one exchange at a time and moves
 * WAIT_AUTH (no session yet) -> XCHG (request in the pool) -> BACKOFF
 * (429/503, timer armed) -> XCHG ... -> DONE. Its callback is always
 * delivered through the deferral queue, so never inside the call that
 * started it, and the op is freed once its timer handle has closed.
 */
#include "ziti_int.h"

#include "zm/crypto.h"
#include "zm/log.h"
#include "zm/zm.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MGMT "/edge/management/v1"
/* The page size ZM uses; the controller caps limit at 500. */
#define PAGE_LIMIT 100
/* The controller refuses offsets above 100000, so no listing is longer. */
#define MAX_FIND_RESULTS 100100u
/* Backoff on 429/503: 100 ms doubling up to 5 s, with jitter. */
#define BACKOFF_BASE_MS 100u
#define BACKOFF_CAP_MS 5000u
/* Controller messages quoted in ours are cut at this length. */
#define MAX_QUOTED_MSG 200

typedef enum {
  OP_CREATE,
  OP_GET_JWT,
  OP_DELETE,
  OP_FIND,
  OP_ENROLL,
  OP_CACERTS,
  OP_CALL,
  OP_LIST
} op_kind_t;

static const char *const OP_NAME[] = {
    [OP_CREATE] = "create identity", [OP_GET_JWT] = "get identity",
    [OP_DELETE] = "delete identity", [OP_FIND] = "find identities",
    [OP_ENROLL] = "enroll",          [OP_CACERTS] = "fetch CA bundle",
    [OP_CALL] = "controller call",   [OP_LIST] = "controller list",
};

typedef enum {
  OPS_NEW,
  OPS_WAIT_AUTH,
  OPS_XCHG,
  OPS_BACKOFF,
  OPS_DONE
} op_state_t;

struct zm__ziti_op {
  zm_ziti_t *z;
  op_kind_t kind;
  op_state_t state;
  uv_timer_t timer; /* backoff, and the deadline while waiting for auth */
  zm__ziti_xchg_t x;
  zm__ziti_defer_t defer;
  zm__ziti_link_t link;      /* z->ops */
  zm__ziti_link_t wait_link; /* z->auth_waiters */
  const char *method;
  char what[96]; /* call / list: the path without the query, for messages */
  zm_secret_t target; /* may carry the enrollment token */
  char *body;         /* owned; may be a CSR */
  size_t body_len;
  const char *content_type, *accept;
  int needs_auth, reauthed;
  unsigned session_gen; /* the session the request was sent with */
  unsigned attempt;     /* backoff retries so far */
  uint64_t deadline;    /* uv_now() ms */
  zm_ziti_cb cb;
  void *data;
  /* find */
  char *filter;  /* percent-encoded ZitiQL filter */
  size_t offset; /* next page offset */
  char **ids, **names;
  size_t n, cap;
  /* result */
  int err, http_status, gone;
  char *code, *message, *id, *cert_pem;
  zm_secret_t jwt;
  /* call / list */
  json_t *json;
  long long total, page_offset, page_limit;
  char *expires_at; /* get_enrollment_jwt: enrollment.ott.expiresAt */
};

static void op_send(zm__ziti_op_t *op);
static void op_finish(zm__ziti_op_t *op, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- helpers
 * ------------------------------------------------------------------------- */

static int unreserved(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_' ||
         ch == '~';
}

/* Percent-encodes everything but RFC 3986 unreserved characters: right for a
 * path segment and for a query value decoded by Go's url.ParseQuery. */
static char *pct_encode(const char *s) {
  static const char hex[] = "0123456789ABCDEF";
  size_t n = strlen(s);
  char *out = zm_xmalloc(3 * n + 1), *o = out;
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (unreserved(ch)) {
      *o++ = (char)ch;
    } else {
      *o++ = '%';
      *o++ = hex[ch >> 4];
      *o++ = hex[ch & 15];
    }
  }
  *o = '\0';
  return out;
}

/* A ZitiQL string literal: double quotes, escapes \" \\ \n \r \t \f only
 * (the grammar knows no others, so other control characters are refused). */
static char *zitiql_quote(const char *s) {
  size_t n = strlen(s);
  char *out = zm_xmalloc(2 * n + 3), *o = out;
  *o++ = '"';
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    const char *esc = NULL;
    switch (ch) {
    case '"':
      esc = "\\\"";
      break;
    case '\\':
      esc = "\\\\";
      break;
    case '\n':
      esc = "\\n";
      break;
    case '\r':
      esc = "\\r";
      break;
    case '\t':
      esc = "\\t";
      break;
    case '\f':
      esc = "\\f";
      break;
    default:
      if (ch < 0x20 || ch == 0x7f) {
        free(out);
        return NULL;
      }
    }
    if (esc) {
      *o++ = esc[0];
      *o++ = esc[1];
    } else {
      *o++ = (char)ch;
    }
  }
  *o++ = '"';
  *o = '\0';
  return out;
}

static char *xasprintf(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
static char *xasprintf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  ZM_ASSERT(n >= 0);
  char *s = zm_xmalloc((size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(s, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return s;
}

static void set_target(zm__ziti_op_t *op, char *t) {
  zm_secret_dispose(&op->target);
  op->target.base = t;
  op->target.len = strlen(t);
}

static uint64_t rng_next(zm_ziti_t *z) {
  uint64_t x = z->rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  z->rng = x;
  return x;
}

/* Wipes a string jansson owns (a JWT, a token) before it is freed. */
static void wipe_json_string(json_t *s) {
  if (json_is_string(s))
    zm_wipe((char *)json_string_value(s), json_string_length(s));
}

/* The controller's error envelope: {"error":{"code","message","cause"}}. */
typedef struct {
  char code[64];
  char message[MAX_QUOTED_MSG + 1];
  int duplicate; /* cause.reason mentions "duplicate" */
} ctrl_error_t;

static void copy_str(char *dst, size_t cap, const char *src) {
  size_t n = 0;
  for (; src && src[n] && n + 1 < cap; n++)
    dst[n] = (src[n] >= 0x20 && src[n] != 0x7f) ? src[n] : ' ';
  dst[n] = '\0';
}

static void parse_ctrl_error(const zm_http1_resp_t *r, ctrl_error_t *e) {
  memset(e, 0, sizeof(*e));
  if (r->body_len == 0)
    return;
  json_t *root = json_loadb(r->body, r->body_len, 0, NULL);
  json_t *err = json_object_get(root, "error");
  if (json_is_object(err)) {
    copy_str(e->code, sizeof(e->code),
             json_string_value(json_object_get(err, "code")));
    copy_str(e->message, sizeof(e->message),
             json_string_value(json_object_get(err, "message")));
    json_t *cause = json_object_get(err, "cause");
    const char *reason = json_string_value(json_object_get(cause, "reason"));
    if (reason && strstr(reason, "duplicate"))
      e->duplicate = 1;
  }
  json_decref(root);
}

/* ---- op lifecycle
 * ------------------------------------------------------------------ */

static void on_op_closed(uv_handle_t *h) {
  zm__ziti_op_t *op = h->data;
  zm_ziti_t *z = op->z;
  zm__ziti_list_remove(&op->link);
  zm_secret_dispose(&op->target);
  zm_secret_dispose(&op->x.req);
  zm_http1_resp_dispose(&op->x.resp);
  zm_secret_dispose(&op->jwt);
  if (op->body) {
    zm_wipe(op->body, op->body_len);
    free(op->body);
  }
  free(op->filter);
  for (size_t i = 0; i < op->n; i++) {
    free(op->ids[i]);
    free(op->names[i]);
  }
  free(op->ids);
  free(op->names);
  free(op->code);
  free(op->message);
  free(op->id);
  free(op->cert_pem);
  free(op->expires_at);
  if (op->json != NULL) {
    /* an identity's pending enrollment: its JWT and token are secrets */
    json_t *ott = json_object_get(
        json_object_get(json_object_get(op->json, "data"), "enrollment"),
        "ott");
    wipe_json_string(json_object_get(ott, "jwt"));
    wipe_json_string(json_object_get(ott, "token"));
  }
  json_decref(op->json);
  free(op);
  zm__ziti_maybe_finish(z);
}

static void on_op_deliver(zm__ziti_defer_t *d) {
  zm__ziti_op_t *op = container_of(d, zm__ziti_op_t, defer);
  zm_ziti_t *z = op->z;
  zm_ziti_result_t res;
  memset(&res, 0, sizeof(res));
  res.err = op->err;
  res.http_status = op->http_status;
  res.code = op->code;
  res.message = op->message;
  res.gone = op->gone;
  res.id = op->id;
  res.jwt = op->kind == OP_GET_JWT ? &op->jwt : NULL;
  res.cert_pem = op->cert_pem;
  res.ids = (const char *const *)op->ids;
  res.names = (const char *const *)op->names;
  res.n_ids = op->n;
  res.json = op->json;
  res.expires_at = op->expires_at;
  res.total = op->total;
  res.page_offset = op->page_offset;
  res.page_limit = op->page_limit;
  if (op->err)
    z->stats.failures++;
  if (op->cb) {
    op->cb(&res, op->data);
  } else if (op->kind == OP_CACERTS) { /* the background refresh */
    if (op->err)
      ZM_WARN("ziti: CA bundle refresh failed: %s", op->message);
    else
      ZM_DEBUG("ziti: CA bundle refreshed");
  }
  zm_secret_dispose(&op->jwt);
  uv_close((uv_handle_t *)&op->timer, on_op_closed);
}

static void op_finish(zm__ziti_op_t *op, int err, const char *fmt, ...) {
  if (op->state == OPS_DONE)
    return;
  if (op->state == OPS_WAIT_AUTH)
    zm__ziti_list_remove(&op->wait_link);
  uv_timer_stop(&op->timer);
  op->state = OPS_DONE;
  op->err = err;
  if (fmt != NULL) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    free(op->message);
    op->message = zm_xstrdup(buf);
  }
  if (err)
    ZM_DEBUG("ziti: %s failed: %s", OP_NAME[op->kind],
             op->message ? op->message : zm_strerror(err));
  zm__ziti_defer(op->z, &op->defer, on_op_deliver);
}

static void on_op_xchg(zm__ziti_xchg_t *x, int err, const char *why);

static zm__ziti_op_t *op_new(zm_ziti_t *z, op_kind_t kind, uint64_t deadline,
                             zm_ziti_cb cb, void *data) {
  zm__ziti_op_t *op = zm_xcalloc(1, sizeof(*op));
  op->z = z;
  op->kind = kind;
  op->state = OPS_NEW;
  op->cb = cb;
  op->data = data;
  op->deadline =
      deadline ? deadline : uv_now(z->loop) + z->cfg.request_timeout_ms;
  op->accept = "application/json";
  uv_timer_init(z->loop, &op->timer);
  op->timer.data = op;
  zm_http1_resp_init(&op->x.resp, ZM_HTTP1_MAX_BODY);
  op->x.cb = on_op_xchg;
  op->x.data = op;
  zm__ziti_list_init(&op->wait_link);
  zm__ziti_list_insert_tail(&z->ops, &op->link);
  return op;
}

static void op_begin(zm__ziti_op_t *op) {
  if (op->z->closing) {
    op_finish(op, ZM_E_SHUTDOWN, "the controller client is closing");
    return;
  }
  op_send(op);
}

/* ---- authentication (single flight)
 * ------------------------------------------ */

static void on_op_timer(uv_timer_t *t);
static void on_auth_xchg(zm__ziti_xchg_t *x, int err, const char *why);

static void auth_send(zm_ziti_t *z) {
  zm_http1_req_t r = {
      .method = "POST",
      .host = z->host_header,
      .target = MGMT "/authenticate?method=cert",
      .content_type = "application/json",
      .body = "{}",
      .body_len = 2,
  };
  ZM_ASSERT(zm_http1_req_serialize(&r, &z->auth_x.req) == 0);
  z->auth_x.deadline = uv_now(z->loop) + z->cfg.request_timeout_ms;
  z->auth_x.cb = on_auth_xchg;
  z->auth_x.data = z;
  ZM_DEBUG("ziti: POST " MGMT "/authenticate");
  zm__ziti_xchg_start(z, &z->auth_x);
}

static void on_creds_read(zm_ziti_t *z, int err) {
  (void)err; /* unreadable files: the credentials read before are tried */
  if (z->closing) {
    z->auth_inflight = 0;
    zm__ziti_maybe_finish(z);
    return;
  }
  auth_send(z);
}

/* After a 401 the files are read again first, as the Go client does: the
 * admin certificate may have been renewed on disk (and the controller's
 * authenticator moved to the new one). */
static void auth_start(zm_ziti_t *z) {
  z->auth_inflight = 1;
  if (z->creds_stale && !z->cfg.bootstrap) {
    z->creds_stale = 0;
    zm__ziti_creds_reload(z, on_creds_read);
    return;
  }
  auth_send(z);
}

static void wait_auth(zm__ziti_op_t *op) {
  zm_ziti_t *z = op->z;
  op->state = OPS_WAIT_AUTH;
  zm__ziti_list_insert_tail(&z->auth_waiters, &op->wait_link);
  uint64_t now = uv_now(z->loop);
  uv_timer_start(&op->timer, on_op_timer,
                 op->deadline > now ? op->deadline - now : 0, 0);
  if (!z->auth_inflight)
    auth_start(z);
}

static void op_backoff(zm__ziti_op_t *op, const zm_http1_resp_t *r,
                       const ctrl_error_t *ce);

static void on_auth_xchg(zm__ziti_xchg_t *x, int err, const char *why) {
  zm_ziti_t *z = x->data;
  z->auth_inflight = 0;
  zm_secret_dispose(&x->req);
  if (z->closing) {
    zm__ziti_maybe_finish(z);
    return;
  }
  zm__ziti_link_t waiters;
  zm__ziti_list_init(&waiters);
  while (!zm__ziti_list_empty(&z->auth_waiters)) {
    zm__ziti_link_t *n = z->auth_waiters.next;
    zm__ziti_list_remove(n);
    zm__ziti_list_insert_tail(&waiters, n);
  }
  int st = err ? 0 : x->resp.status;
  if (st == 200 && x->resp.session.len > 0) {
    zm_secret_move(&z->session, &x->resp.session);
    z->session_gen++;
    ZM_INFO("ziti: authenticated to %s", z->host_header);
  } else if (err == 0) {
    ZM_WARN("ziti: authentication to %s failed: HTTP %d", z->host_header, st);
    if (st == 401)
      z->creds_stale = 1; /* the next one reads the files first */
  } else {
    ZM_WARN("ziti: authentication to %s failed: %s", z->host_header, why);
  }
  ctrl_error_t ce;
  if (err == 0)
    parse_ctrl_error(&x->resp, &ce);
  while (!zm__ziti_list_empty(&waiters)) {
    zm__ziti_link_t *n = waiters.next;
    zm__ziti_list_remove(n);
    zm__ziti_op_t *op = container_of(n, zm__ziti_op_t, wait_link);
    uv_timer_stop(&op->timer);
    op->state = OPS_NEW;
    if (err) {
      op_finish(op, err, "authentication: %s", why);
    } else if (st == 200 && z->session.len > 0) {
      op_send(op);
    } else if (st == 200) {
      op->http_status = st;
      op_finish(op, ZM_E_PROTO, "authentication: no zt-session header");
    } else if (st == 429 || st == 503) {
      op->http_status = st;
      op_backoff(op, &x->resp, &ce);
    } else {
      op->http_status = st;
      free(op->code);
      op->code = ce.code[0] ? zm_xstrdup(ce.code) : NULL;
      op_finish(op,
                st == 401 || st == 403 ? ZM_E_UNAUTHORIZED
                : st >= 500            ? ZM_E_UNAVAILABLE
                                       : ZM_E_HTTP,
                "authentication failed: HTTP %d %s %s", st, ce.code,
                ce.message);
    }
  }
  zm_http1_resp_reset(&x->resp);
}

/* ---- sending and answers
 * -------------------------------------------------------- */

static void op_send(zm__ziti_op_t *op) {
  zm_ziti_t *z = op->z;
  if (op->needs_auth && z->session.len == 0) {
    wait_auth(op);
    return;
  }
  zm_http1_req_t r = {
      .method = op->method,
      .host = z->host_header,
      .target = op->target.base,
      .content_type = op->content_type,
      .accept = op->accept,
      .session = op->needs_auth ? z->session.base : NULL,
      .body = op->body,
      .body_len = op->body_len,
  };
  op->session_gen = z->session_gen;
  if (zm_http1_req_serialize(&r, &op->x.req) != 0) {
    op_finish(op, ZM_E_INVAL, "%s: invalid request", OP_NAME[op->kind]);
    return;
  }
  /* The query string is never logged: it may hold the enrollment token. */
  size_t plen = strcspn(op->target.base, "?");
  ZM_DEBUG("ziti: %s %.*s", op->method, (int)plen, op->target.base);
  op->state = OPS_XCHG;
  op->x.deadline = op->deadline;
  zm__ziti_xchg_start(z, &op->x);
}

static void on_op_timer(uv_timer_t *t) {
  zm__ziti_op_t *op = t->data;
  if (op->state == OPS_WAIT_AUTH) {
    op_finish(op, ZM_E_TIMEOUT, "%s: timed out waiting for authentication",
              OP_NAME[op->kind]);
  } else if (op->state == OPS_BACKOFF) {
    op->state = OPS_NEW;
    op_send(op);
  }
}

/* May op be sent again after this 429/503? A GET, PATCH or DELETE may: a
 * second one changes nothing more than the first. A POST (create, enroll)
 * only when the answer says it was not carried out: the command rate
 * limiter's 429 and 503 CLUSTER_HAS_NO_LEADER refuse a request before it
 * runs, but the controller's 503 TIMEOUT is written while the handler goes
 * on (it may still create the object, or consume the enrollment token), and
 * a proxy's 503 says nothing. Such a POST fails with its 503, which callers
 * treat as unanswered: the object may exist, and they look for it. */
static int op_resend_ok(const zm__ziti_op_t *op, int status,
                        const ctrl_error_t *ce) {
  if (strcmp(op->method, "POST") != 0)
    return 1;
  return status == 429 ||
         (status == 503 && strcmp(ce->code, "CLUSTER_HAS_NO_LEADER") == 0);
}

/* 429/503: wait and retry while the deadline allows, honouring Retry-After. */
static void op_backoff(zm__ziti_op_t *op, const zm_http1_resp_t *r,
                       const ctrl_error_t *ce) {
  zm_ziti_t *z = op->z;
  unsigned shift = op->attempt < 6 ? op->attempt : 6;
  uint64_t base = (uint64_t)BACKOFF_BASE_MS << shift;
  if (base > BACKOFF_CAP_MS)
    base = BACKOFF_CAP_MS;
  uint64_t delay = base / 2 + rng_next(z) % (base / 2 + 1);
  if (r->retry_after > 0)
    delay = (uint64_t)r->retry_after * 1000;
  uint64_t now = uv_now(z->loop);
  if (now + delay >= op->deadline) {
    free(op->code);
    op->code = ce->code[0] ? zm_xstrdup(ce->code) : NULL;
    op_finish(op, ZM_E_UNAVAILABLE,
              "%s: controller busy (HTTP %d %s), no time left to retry",
              OP_NAME[op->kind], r->status, ce->code);
    return;
  }
  op->attempt++;
  z->stats.retries++;
  ZM_INFO("ziti: %s: HTTP %d, retrying in %llu ms", OP_NAME[op->kind],
          r->status, (unsigned long long)delay);
  op->state = OPS_BACKOFF;
  uv_timer_start(&op->timer, on_op_timer, delay, 0);
}

static void op_on_success(zm__ziti_op_t *op);

/* Maps a non-2xx answer (other than 401-before-reauth and 429/503). */
static void op_fail_status(zm__ziti_op_t *op, const ctrl_error_t *ce) {
  int st = op->http_status;
  free(op->code);
  op->code = ce->code[0] ? zm_xstrdup(ce->code) : NULL;
  int err;
  if (st == 404)
    err = ZM_E_NOT_FOUND;
  else if (st == 401 || st == 403)
    err = ZM_E_UNAUTHORIZED;
  else if (st == 400 && strcmp(ce->code, "COULD_NOT_VALIDATE") == 0 &&
           ce->duplicate)
    err = ZM_E_EXISTS;
  else if (st >= 500 && st < 600)
    err = ZM_E_UNAVAILABLE;
  else if (st >= 400) /* 4xx and go-openapi's 6xx validation statuses */
    err = ZM_E_INVAL;
  else
    err = ZM_E_HTTP;
  op_finish(op, err, "%s: controller answered HTTP %d %s%s%s",
            OP_NAME[op->kind], st, ce->code[0] ? ce->code : "",
            ce->message[0] ? ": " : "", ce->message);
}

static void on_op_xchg(zm__ziti_xchg_t *x, int err, const char *why) {
  zm__ziti_op_t *op = x->data;
  zm_ziti_t *z = op->z;
  zm_secret_dispose(&x->req);
  if (err) {
    op_finish(op, err, "%s: %s", OP_NAME[op->kind], why);
    return;
  }
  if (z->closing) {
    op_finish(op, ZM_E_SHUTDOWN, "the controller client is closing");
    return;
  }
  int st = x->resp.status;
  op->http_status = st;
  if (st >= 200 && st < 300) {
    op_on_success(op);
    return;
  }
  if (st == 404 &&
      (op->kind == OP_DELETE ||
       (op->kind == OP_CALL && strcmp(op->method, "DELETE") == 0))) {
    op->gone = 1;
    op_finish(op, 0, NULL);
    return;
  }
  if (st == 401 && op->needs_auth && !op->reauthed) {
    /* The session expired or was revoked: authenticate again, once. A
     * session renewed meanwhile by another op is simply used. */
    op->reauthed = 1;
    z->stats.reauths++;
    if (z->session_gen == op->session_gen) {
      zm_secret_dispose(&z->session);
      z->creds_stale = 1;
    }
    ZM_INFO("ziti: %s: HTTP 401, re-authenticating", OP_NAME[op->kind]);
    op->state = OPS_NEW;
    op_send(op);
    return;
  }
  ctrl_error_t ce;
  parse_ctrl_error(&x->resp, &ce);
  if ((st == 429 || st == 503) && op_resend_ok(op, st, &ce)) {
    op_backoff(op, &x->resp, &ce);
    return;
  }
  op_fail_status(op, &ce);
}

/* ---- per-call success handling
 * ---------------------------------------------------- */

static json_t *load_body(zm__ziti_op_t *op) {
  const zm_http1_resp_t *r = &op->x.resp;
  json_error_t je;
  json_t *root = r->body_len ? json_loadb(r->body, r->body_len, 0, &je) : NULL;
  if (root == NULL)
    op_finish(op, ZM_E_JSON, "%s: response is not JSON", OP_NAME[op->kind]);
  else if (!json_is_object(json_object_get(root, "data")) &&
           !json_is_array(json_object_get(root, "data"))) {
    json_decref(root);
    root = NULL;
    op_finish(op, ZM_E_JSON, "%s: response has no \"data\"", OP_NAME[op->kind]);
  }
  return root;
}

static void on_create_ok(zm__ziti_op_t *op) {
  json_t *root = load_body(op);
  if (!root)
    return;
  const char *id =
      json_string_value(json_object_get(json_object_get(root, "data"), "id"));
  if (id == NULL || id[0] == '\0') {
    op_finish(op, ZM_E_JSON, "create identity: response has no data.id");
  } else {
    op->id = zm_xstrdup(id);
    op_finish(op, 0, NULL);
  }
  json_decref(root);
}

static void on_get_ok(zm__ziti_op_t *op) {
  json_t *root = load_body(op);
  if (!root)
    return;
  json_t *data = json_object_get(root, "data");
  json_t *ott = json_object_get(json_object_get(data, "enrollment"), "ott");
  json_t *jwt = json_object_get(ott, "jwt");
  /* wipe the token that jansson duplicated from the body, too */
  wipe_json_string(json_object_get(ott, "token"));
  if (!json_is_object(data)) {
    op_finish(op, ZM_E_JSON, "get identity: data is not an object");
  } else if (jwt != NULL && !json_is_null(jwt) && !json_is_string(jwt)) {
    op_finish(op, ZM_E_JSON,
              "get identity: enrollment.ott.jwt is not a string");
  } else {
    if (json_is_string(jwt) && json_string_length(jwt) > 0)
      zm_secret_set(&op->jwt, json_string_value(jwt), json_string_length(jwt));
    const char *exp = json_string_value(json_object_get(ott, "expiresAt"));
    if (exp != NULL && strlen(exp) < 64)
      op->expires_at = zm_xstrdup(exp);
    op_finish(op, 0, NULL);
  }
  wipe_json_string(jwt);
  json_decref(root);
}

static int find_next_page(zm__ziti_op_t *op) {
  set_target(op, xasprintf(MGMT "/identities?filter=%s&limit=%d&offset=%zu",
                           op->filter, PAGE_LIMIT, op->offset));
  op->attempt = 0;
  op->state = OPS_NEW;
  op_send(op);
  return 0;
}

static void on_find_ok(zm__ziti_op_t *op) {
  json_t *root = load_body(op);
  if (!root)
    return;
  json_t *data = json_object_get(root, "data");
  json_t *pg = json_object_get(json_object_get(root, "meta"), "pagination");
  json_t *jl = json_object_get(pg, "limit"),
         *jo = json_object_get(pg, "offset"),
         *jt = json_object_get(pg, "totalCount");
  if (!json_is_array(data)) {
    op_finish(op, ZM_E_JSON, "find identities: data is not an array");
    goto out;
  }
  if (!json_is_integer(jl) || !json_is_integer(jo) || !json_is_integer(jt) ||
      json_integer_value(jt) < 0 || json_integer_value(jo) < 0) {
    op_finish(op, ZM_E_JSON,
              "find identities: meta.pagination lacks limit/offset/totalCount");
    goto out;
  }
  size_t total = (size_t)json_integer_value(jt);
  size_t len = json_array_size(data);
  if (total > MAX_FIND_RESULTS || op->n + len > MAX_FIND_RESULTS) {
    op_finish(op, ZM_E_MSG_TOO_LARGE, "find identities: too many results (%zu)",
              total);
    goto out;
  }
  if (op->n + len > op->cap) {
    size_t cap = op->cap ? op->cap : 16;
    while (cap < op->n + len)
      cap *= 2;
    op->ids = zm_xrealloc(op->ids, (cap + 1) * sizeof(char *));
    op->names = zm_xrealloc(op->names, (cap + 1) * sizeof(char *));
    op->cap = cap;
  }
  for (size_t i = 0; i < len; i++) {
    json_t *it = json_array_get(data, i);
    const char *id = json_string_value(json_object_get(it, "id"));
    const char *name = json_string_value(json_object_get(it, "name"));
    if (id == NULL || name == NULL) {
      op_finish(op, ZM_E_JSON, "find identities: item %zu lacks id/name",
                op->offset + i);
      goto out;
    }
    op->ids[op->n] = zm_xstrdup(id);
    op->names[op->n] = zm_xstrdup(name);
    op->n++;
  }
  op->offset += len;
  if (op->offset >= total) {
    op_finish(op, 0, NULL);
  } else if (len == 0) {
    op_finish(op, ZM_E_JSON, "find identities: empty page at offset %zu of %zu",
              op->offset, total);
  } else {
    find_next_page(op);
  }
out:
  json_decref(root);
}

static void on_enroll_ok(zm__ziti_op_t *op) {
  const zm_http1_resp_t *r = &op->x.resp;
  /* As the Go SDK: data.cert only when the content type is exactly JSON. */
  if (strcmp(r->content_type, "application/json") == 0) {
    json_t *root = load_body(op);
    if (!root)
      return;
    const char *cert = json_string_value(
        json_object_get(json_object_get(root, "data"), "cert"));
    if (cert == NULL || cert[0] == '\0')
      op_finish(op, ZM_E_JSON, "enroll: response has no data.cert");
    else {
      op->cert_pem = zm_xstrdup(cert);
      op_finish(op, 0, NULL);
    }
    json_decref(root);
    return;
  }
  if (r->body_len == 0 ||
      strstr(r->body, "-----BEGIN CERTIFICATE-----") == NULL) {
    op_finish(op, ZM_E_PROTO, "enroll: response holds no certificate");
    return;
  }
  op->cert_pem = zm_xstrndup(r->body, r->body_len);
  op_finish(op, 0, NULL);
}

static void on_cacerts_ok(zm__ziti_op_t *op) {
  const zm_http1_resp_t *r = &op->x.resp;
  char *pem = NULL;
  size_t n = 0;
  int rc = zm_cacerts_decode(r->body ? r->body : "", r->body_len, &pem, &n);
  if (rc != 0) {
    op_finish(op, rc, "fetch CA bundle: cannot decode the PKCS#7 bundle: %s",
              zm_strerror(rc));
    return;
  }
  free(op->z->ca_bundle);
  op->z->ca_bundle = pem;
  ZM_DEBUG("ziti: CA bundle has %zu certificates", n);
  op_finish(op, 0, NULL);
}

/* A generic call: the body, if any, must be a JSON object; POST answers
 * carry data.id. */
static void on_call_ok(zm__ziti_op_t *op) {
  const zm_http1_resp_t *r = &op->x.resp;
  if (r->body_len == 0) {
    op_finish(op, 0, NULL);
    return;
  }
  json_error_t je;
  json_t *root = json_loadb(r->body, r->body_len, 0, &je);
  if (!json_is_object(root)) {
    json_decref(root);
    op_finish(op, ZM_E_JSON, "%s %s: response is not a JSON object", op->method,
              op->what);
    return;
  }
  op->json = root;
  if (strcmp(op->method, "POST") == 0) {
    const char *id =
        json_string_value(json_object_get(json_object_get(root, "data"), "id"));
    if (id == NULL || id[0] == '\0') {
      op_finish(op, ZM_E_JSON, "POST %s: response has no data.id", op->what);
      return;
    }
    op->id = zm_xstrdup(id);
  }
  op_finish(op, 0, NULL);
}

/* A list page: data must be an array and meta.pagination complete. */
static void on_list_ok(zm__ziti_op_t *op) {
  json_t *root = load_body(op);
  if (!root)
    return;
  json_t *pg = json_object_get(json_object_get(root, "meta"), "pagination");
  json_t *jl = json_object_get(pg, "limit"),
         *jo = json_object_get(pg, "offset"),
         *jt = json_object_get(pg, "totalCount");
  if (!json_is_array(json_object_get(root, "data"))) {
    json_decref(root);
    op_finish(op, ZM_E_JSON, "list %s: data is not an array", op->what);
    return;
  }
  if (!json_is_integer(jl) || !json_is_integer(jo) || !json_is_integer(jt) ||
      json_integer_value(jt) < 0 || json_integer_value(jo) < 0 ||
      json_integer_value(jl) < -1) {
    json_decref(root);
    op_finish(op, ZM_E_JSON,
              "list %s: meta.pagination lacks limit/offset/totalCount",
              op->what);
    return;
  }
  op->total = json_integer_value(jt);
  op->page_offset = json_integer_value(jo);
  op->page_limit = json_integer_value(jl);
  op->json = root;
  op_finish(op, 0, NULL);
}

static void op_on_success(zm__ziti_op_t *op) {
  switch (op->kind) {
  case OP_CALL:
    on_call_ok(op);
    return;
  case OP_LIST:
    on_list_ok(op);
    return;
  case OP_CREATE:
    on_create_ok(op);
    return;
  case OP_GET_JWT:
    on_get_ok(op);
    return;
  case OP_DELETE:
    op_finish(op, 0, NULL);
    return;
  case OP_FIND:
    on_find_ok(op);
    return;
  case OP_ENROLL:
    on_enroll_ok(op);
    return;
  case OP_CACERTS:
    on_cacerts_ok(op);
    return;
  }
}

/* ---- public calls
 * ------------------------------------------------------------------ */

static void fail_inval(zm__ziti_op_t *op, const char *what) {
  op_finish(op, ZM_E_INVAL, "%s: %s", OP_NAME[op->kind], what);
}

void zm_ziti_create_identity(zm_ziti_t *z, const char *name,
                             const char *const *roles, size_t n_roles,
                             const char *external_id, uint64_t deadline,
                             zm_ziti_cb cb, void *data) {
  zm_ziti_create_identity_tags(z, name, roles, n_roles, external_id, NULL,
                               deadline, cb, data);
}

void zm_ziti_create_identity_tags(zm_ziti_t *z, const char *name,
                                  const char *const *roles, size_t n_roles,
                                  const char *external_id,
                                  const char *tags_json, uint64_t deadline,
                                  zm_ziti_cb cb, void *data) {
  zm__ziti_op_t *op = op_new(z, OP_CREATE, deadline, cb, data);
  json_t *tags = NULL;
  if (tags_json != NULL) {
    tags = json_loads(tags_json, 0, NULL);
    if (!json_is_object(tags)) {
      json_decref(tags);
      fail_inval(op, "tags are not a JSON object");
      return;
    }
  }
  if (name == NULL || name[0] == '\0') {
    json_decref(tags);
    fail_inval(op, "empty name");
    return;
  }
  json_t *jr = json_array();
  for (size_t i = 0; i < n_roles; i++) {
    if (roles[i] == NULL ||
        json_array_append_new(jr, json_string(roles[i])) != 0) {
      json_decref(jr);
      json_decref(tags);
      fail_inval(op, "role attribute is not valid UTF-8");
      return;
    }
  }
  json_t *body = json_object();
  json_t *nm = json_string(name);
  json_t *ext = external_id ? json_string(external_id) : NULL;
  if (nm == NULL || (external_id && ext == NULL)) {
    json_decref(tags);
    json_decref(nm);
    json_decref(ext);
    json_decref(jr);
    json_decref(body);
    fail_inval(op, "name or externalId is not valid UTF-8");
    return;
  }
  json_object_set_new(body, "name", nm);
  json_object_set_new(body, "type", json_string("Device"));
  json_object_set_new(body, "isAdmin", json_false());
  json_object_set_new(body, "roleAttributes", jr);
  if (ext)
    json_object_set_new(body, "externalId", ext);
  json_object_set_new(body, "enrollment", json_pack("{s:b}", "ott", 1));
  if (tags != NULL && json_object_size(tags) > 0)
    json_object_set_new(body, "tags", tags);
  else
    json_decref(tags);
  op->body = json_dumps(body, JSON_COMPACT);
  json_decref(body);
  ZM_ASSERT(op->body != NULL);
  op->body_len = strlen(op->body);
  op->method = "POST";
  op->content_type = "application/json";
  op->needs_auth = 1;
  set_target(op, zm_xstrdup(MGMT "/identities"));
  op_begin(op);
}

static void identity_op(zm_ziti_t *z, op_kind_t kind, const char *method,
                        const char *id, uint64_t deadline, zm_ziti_cb cb,
                        void *data) {
  zm__ziti_op_t *op = op_new(z, kind, deadline, cb, data);
  if (id == NULL || id[0] == '\0') {
    fail_inval(op, "empty identity id");
    return;
  }
  char *eid = pct_encode(id);
  set_target(op, xasprintf(MGMT "/identities/%s", eid));
  free(eid);
  op->method = method;
  op->needs_auth = 1;
  op_begin(op);
}

void zm_ziti_get_enrollment_jwt(zm_ziti_t *z, const char *id, uint64_t deadline,
                                zm_ziti_cb cb, void *data) {
  identity_op(z, OP_GET_JWT, "GET", id, deadline, cb, data);
}

void zm_ziti_delete_identity(zm_ziti_t *z, const char *id, uint64_t deadline,
                             zm_ziti_cb cb, void *data) {
  identity_op(z, OP_DELETE, "DELETE", id, deadline, cb, data);
}

void zm_ziti_find_identities(zm_ziti_t *z, const char *field, const char *value,
                             uint64_t deadline, zm_ziti_cb cb, void *data) {
  zm__ziti_op_t *op = op_new(z, OP_FIND, deadline, cb, data);
  if (field == NULL ||
      (strcmp(field, "name") != 0 && strcmp(field, "externalId") != 0)) {
    fail_inval(op, "field must be name or externalId");
    return;
  }
  char *q = value ? zitiql_quote(value) : NULL;
  if (q == NULL) {
    fail_inval(op, "value holds a control character");
    return;
  }
  char *filter = xasprintf("%s=%s", field, q);
  free(q);
  op->filter = pct_encode(filter);
  free(filter);
  op->method = "GET";
  op->needs_auth = 1;
  if (z->closing) {
    op_begin(op);
    return;
  }
  find_next_page(op);
}

void zm_ziti_enroll_ott(zm_ziti_t *z, const char *token, const char *csr_pem,
                        uint64_t deadline, zm_ziti_cb cb, void *data) {
  zm__ziti_op_t *op = op_new(z, OP_ENROLL, deadline, cb, data);
  if (token == NULL || token[0] == '\0' || csr_pem == NULL ||
      csr_pem[0] == '\0') {
    fail_inval(op, "empty token or CSR");
    return;
  }
  char *et = pct_encode(token);
  set_target(op, xasprintf("/edge/client/v1/enroll?method=ott&token=%s", et));
  zm_wipe(et, strlen(et));
  free(et);
  op->body_len = strlen(csr_pem);
  op->body = zm_xstrndup(csr_pem, op->body_len);
  op->method = "POST";
  op->content_type = "application/x-pem-file";
  op->accept = "application/json";
  op->needs_auth = 0;
  op_begin(op);
}

static void start_cacerts(zm_ziti_t *z, uint64_t deadline, zm_ziti_cb cb,
                          void *data) {
  zm__ziti_op_t *op = op_new(z, OP_CACERTS, deadline, cb, data);
  set_target(op, zm_xstrdup("/.well-known/est/cacerts"));
  op->method = "GET";
  op->accept = "application/pkcs7-mime";
  op->needs_auth = 0;
  op_begin(op);
}

void zm_ziti_fetch_ca_bundle(zm_ziti_t *z, uint64_t deadline, zm_ziti_cb cb,
                             void *data) {
  start_cacerts(z, deadline, cb, data);
}

const char *zm_ziti_ca_bundle(const zm_ziti_t *z) { return z->ca_bundle; }

/* ---- generic calls (services, configs, policies, identity PATCH)
 * ----------------------------------- */

static void copy_what(zm__ziti_op_t *op, const char *path) {
  size_t n = strcspn(path, "?");
  if (n >= sizeof op->what)
    n = sizeof op->what - 1;
  memcpy(op->what, path, n);
  op->what[n] = '\0';
}

void zm_ziti_call(zm_ziti_t *z, const char *method, const char *path,
                  const char *body, uint64_t deadline, zm_ziti_cb cb,
                  void *data) {
  zm__ziti_op_t *op = op_new(z, OP_CALL, deadline, cb, data);
  copy_what(op, path ? path : "");
  if (path == NULL || path[0] != '/' || method == NULL) {
    fail_inval(op, "bad path");
    return;
  }
  set_target(op, xasprintf(MGMT "%s", path));
  op->method = method;
  if (body != NULL) {
    op->body_len = strlen(body);
    op->body = zm_xstrndup(body, op->body_len);
    op->content_type = "application/json";
  }
  op->needs_auth = 1;
  op_begin(op);
}

char *zm_ziti_path(const char *collection, const char *id, const char *suffix) {
  char *eid = pct_encode(id);
  char *p = xasprintf("/%s/%s%s", collection, eid, suffix ? suffix : "");
  free(eid);
  return p;
}

char *zm_ziti_quote(const char *value) { return zitiql_quote(value); }

void zm_ziti_list(zm_ziti_t *z, const char *path, const char *filter,
                  unsigned limit, unsigned long offset, uint64_t deadline,
                  zm_ziti_cb cb, void *data) {
  zm__ziti_op_t *op = op_new(z, OP_LIST, deadline, cb, data);
  copy_what(op, path ? path : "");
  if (path == NULL || path[0] != '/' || limit == 0 ||
      limit > ZM_ZITI_LIST_MAX || offset > ZM_ZITI_OFFSET_MAX) {
    fail_inval(op, "bad list request");
    return;
  }
  if (filter != NULL && filter[0] != '\0') {
    char *f = pct_encode(filter);
    set_target(op, xasprintf(MGMT "%s?filter=%s&limit=%u&offset=%lu", path, f,
                             limit, offset));
    free(f);
  } else {
    set_target(op,
               xasprintf(MGMT "%s?limit=%u&offset=%lu", path, limit, offset));
  }
  op->method = "GET";
  op->needs_auth = 1;
  op_begin(op);
}

/* ---- lifecycle
 * ------------------------------------------------------------------------ */

static void on_cacerts_timer(uv_timer_t *t) {
  zm_ziti_t *z = container_of(t, zm_ziti_t, cacerts_timer);
  if (!z->closing)
    start_cacerts(z, 0, NULL, NULL);
}

int zm__ziti_api_init(zm_ziti_t *z) {
  zm_http1_resp_init(&z->auth_x.resp, 64u * 1024);
  uv_timer_init(z->loop, &z->cacerts_timer);
  uv_timer_start(&z->cacerts_timer, on_cacerts_timer, z->cfg.cacerts_refresh_ms,
                 z->cfg.cacerts_refresh_ms);
  uv_unref((uv_handle_t *)&z->cacerts_timer);
  /* The first fetch starts now, in the background. */
  start_cacerts(z, 0, NULL, NULL);
  return 0;
}

void zm__ziti_api_shutdown(zm_ziti_t *z) {
  uv_timer_stop(&z->cacerts_timer);
  zm__ziti_link_t *n;
  for (n = z->ops.next; n != &z->ops; n = n->next) {
    zm__ziti_op_t *op = container_of(n, zm__ziti_op_t, link);
    if (op->state == OPS_WAIT_AUTH || op->state == OPS_BACKOFF ||
        op->state == OPS_NEW)
      op_finish(op, ZM_E_SHUTDOWN, "the controller client is closing");
  }
}
