/*
 * http1.c - HTTP/1.1 request serialization and the bounded response parser
 * (llhttp glue). No I/O and no logging: the connection code feeds bytes in.
 */
#include "http1.h"

#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Retry-After values above this are clamped: the caller's deadline is the
 * real bound, this only keeps the arithmetic small. */
#define MAX_RETRY_AFTER_S 3600

/* ---- parser callbacks ------------------------------------------------------
 */

static zm_http1_resp_t *resp_of(llhttp_t *p) { return p->data; }

static int fail(zm_http1_resp_t *r, int err) {
  if (r->err == 0)
    r->err = err;
  return -1;
}

/* Counts bytes of the header block (status line, header and trailer lines,
 * chunk extensions) against ZM_HTTP1_MAX_HEADER. */
static int count_header(zm_http1_resp_t *r, size_t n) {
  r->header_bytes += n;
  if (r->header_bytes > ZM_HTTP1_MAX_HEADER)
    return fail(r, ZM_E_MSG_TOO_LARGE);
  return 0;
}

static int on_status(llhttp_t *p, const char *at, size_t n) {
  (void)at;
  return count_header(resp_of(p), n);
}

static int on_chunk_ext(llhttp_t *p, const char *at, size_t n) {
  (void)at;
  return count_header(resp_of(p), n);
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  zm_http1_resp_t *r = resp_of(p);
  if (count_header(r, n) != 0)
    return -1;
  /* hname_len may run past the buffer: such a name is not one we keep. */
  size_t room = sizeof(r->hname) - 1;
  if (r->hname_len < room) {
    size_t k = n < room - r->hname_len ? n : room - r->hname_len;
    memcpy(r->hname + r->hname_len, at, k);
  }
  r->hname_len += n;
  return 0;
}

static int name_is(const zm_http1_resp_t *r, const char *name) {
  size_t n = strlen(name);
  return r->hname_len == n && strncasecmp(r->hname, name, n) == 0;
}

static int header_kept(const zm_http1_resp_t *r) {
  if (r->headers_done || r->complete)
    return 0;
  return name_is(r, "zt-session") || name_is(r, "retry-after") ||
         name_is(r, "content-type") || name_is(r, "connection");
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  zm_http1_resp_t *r = resp_of(p);
  if (count_header(r, n) != 0)
    return -1;
  if (!header_kept(r))
    return 0;
  if (n > sizeof(r->hval) - 1 - r->hval_len)
    return fail(r, ZM_E_MSG_TOO_LARGE);
  memcpy(r->hval + r->hval_len, at, n);
  r->hval_len += n;
  return 0;
}

static int parse_retry_after(const char *v, size_t n) {
  size_t i = 0;
  while (i < n && (v[i] == ' ' || v[i] == '\t'))
    i++;
  if (i == n)
    return -1;
  long s = 0;
  for (; i < n && v[i] >= '0' && v[i] <= '9'; i++) {
    if (s < MAX_RETRY_AFTER_S)
      s = s * 10 + (v[i] - '0');
  }
  while (i < n && (v[i] == ' ' || v[i] == '\t'))
    i++;
  if (i != n)
    return -1; /* an HTTP-date: not sent by the controller, ignored */
  return s > MAX_RETRY_AFTER_S ? MAX_RETRY_AFTER_S : (int)s;
}

/* Whether the comma-separated token list v contains tok. */
static int has_token(const char *v, size_t n, const char *tok) {
  size_t tl = strlen(tok);
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
      i++;
    size_t s = i;
    while (i < n && v[i] != ',')
      i++;
    size_t e = i;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
      e--;
    if (e - s == tl && strncasecmp(v + s, tok, tl) == 0)
      return 1;
  }
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  zm_http1_resp_t *r = resp_of(p);
  if (header_kept(r)) {
    const char *v = r->hval;
    size_t n = r->hval_len;
    if (name_is(r, "zt-session")) {
      zm_secret_set(&r->session, v, n);
    } else if (name_is(r, "retry-after")) {
      r->retry_after = parse_retry_after(v, n);
    } else if (name_is(r, "content-type")) {
      size_t k =
          n < sizeof(r->content_type) - 1 ? n : sizeof(r->content_type) - 1;
      memcpy(r->content_type, v, k);
      r->content_type[k] = '\0';
    } else if (name_is(r, "connection")) {
      if (has_token(v, n, "close"))
        r->conn_close = 1;
    }
  }
  zm_wipe(r->hval, r->hval_len); /* it may have held the session token */
  r->hval_len = 0;
  r->hname_len = 0;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  zm_http1_resp_t *r = resp_of(p);
  r->status = llhttp_get_status_code(p);
  r->headers_done = 1;
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  resp_of(p)->headers_done = 0;
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  zm_http1_resp_t *r = resp_of(p);
  if (n > r->max_body - r->body_len)
    return fail(r, ZM_E_MSG_TOO_LARGE);
  if (r->body_len + n + 1 > r->body_cap) {
    size_t cap = r->body_cap ? r->body_cap : 1024;
    while (cap < r->body_len + n + 1)
      cap *= 2;
    /* Grow by copy so that the old bytes can be wiped. */
    char *nb = zm_xmalloc(cap);
    if (r->body_len)
      memcpy(nb, r->body, r->body_len);
    if (r->body) {
      zm_wipe(r->body, r->body_cap);
      free(r->body);
    }
    r->body = nb;
    r->body_cap = cap;
  }
  memcpy(r->body + r->body_len, at, n);
  r->body_len += n;
  r->body[r->body_len] = '\0';
  return 0;
}

static void clear_fields(zm_http1_resp_t *r) {
  r->status = 0;
  r->retry_after = -1;
  r->conn_close = 0;
  r->content_type[0] = '\0';
  zm_secret_dispose(&r->session);
  if (r->body)
    zm_wipe(r->body, r->body_cap);
  r->body_len = 0;
  r->hname_len = 0;
  zm_wipe(r->hval, r->hval_len);
  r->hval_len = 0;
}

static int on_message_complete(llhttp_t *p) {
  zm_http1_resp_t *r = resp_of(p);
  int st = llhttp_get_status_code(p);
  if (st >= 100 && st < 200 && st != 101) {
    /* An interim response (100 Continue): the real one follows. */
    clear_fields(r);
    r->header_bytes = 0;
    return 0;
  }
  r->status = st;
  r->complete = 1;
  r->keep_alive = llhttp_should_keep_alive(p) && !r->conn_close;
  return HPE_PAUSED;
}

/* ---- public ------------------------------------------------------------- */

void zm_http1_resp_init(zm_http1_resp_t *r, size_t max_body) {
  memset(r, 0, sizeof(*r));
  r->max_body = max_body;
  r->retry_after = -1;
  llhttp_settings_init(&r->settings);
  r->settings.on_message_begin = on_message_begin;
  r->settings.on_status = on_status;
  r->settings.on_header_field = on_header_field;
  r->settings.on_header_value = on_header_value;
  r->settings.on_header_value_complete = on_header_value_complete;
  r->settings.on_headers_complete = on_headers_complete;
  r->settings.on_body = on_body;
  r->settings.on_message_complete = on_message_complete;
  r->settings.on_chunk_extension_name = on_chunk_ext;
  r->settings.on_chunk_extension_value = on_chunk_ext;
  llhttp_init(&r->parser, HTTP_RESPONSE, &r->settings);
  r->parser.data = r;
}

void zm_http1_resp_reset(zm_http1_resp_t *r) {
  clear_fields(r);
  r->keep_alive = 0;
  r->complete = 0;
  r->err = 0;
  r->seen = 0;
  r->header_bytes = 0;
  llhttp_init(&r->parser, HTTP_RESPONSE, &r->settings);
  r->parser.data = r;
}

void zm_http1_resp_dispose(zm_http1_resp_t *r) {
  clear_fields(r);
  free(r->body);
  r->body = NULL;
  r->body_cap = 0;
}

ssize_t zm_http1_resp_feed(zm_http1_resp_t *r, const char *p, size_t n) {
  if (r->err)
    return r->err;
  if (r->complete)
    return 0;
  if (n == 0)
    return ZM_E_INCOMPLETE;
  r->seen += n;
  llhttp_errno_t e = llhttp_execute(&r->parser, p, n);
  if (e == HPE_OK)
    return ZM_E_INCOMPLETE;
  if (e == HPE_PAUSED && r->complete) {
    const char *pos = llhttp_get_error_pos(&r->parser);
    return pos ? (ssize_t)(pos - p) : (ssize_t)n;
  }
  if (r->err == 0)
    r->err = ZM_E_PROTO;
  return r->err;
}

int zm_http1_resp_eof(zm_http1_resp_t *r) {
  if (r->err)
    return r->err;
  if (r->complete)
    return 0;
  if (r->seen == 0)
    return ZM_E_INCOMPLETE;
  llhttp_errno_t e = llhttp_finish(&r->parser);
  if (r->complete)
    return 0;
  if (e == HPE_OK)
    return ZM_E_INCOMPLETE;
  if (r->err == 0)
    r->err = ZM_E_INCOMPLETE;
  return r->err;
}

/* ---- requests ---------------------------------------------------------- */

static int header_safe(const char *s) {
  if (s == NULL)
    return 0;
  for (; *s; s++)
    if (*s == '\r' || *s == '\n')
      return 0;
  return 1;
}

static int target_safe(const char *s) {
  if (s == NULL || s[0] != '/')
    return 0;
  for (; *s; s++)
    if ((unsigned char)*s <= ' ' || *s == 0x7f)
      return 0;
  return 1;
}

int zm_http1_req_serialize(const zm_http1_req_t *req, zm_secret_t *out) {
  if (!header_safe(req->method) || req->method[0] == '\0' ||
      !header_safe(req->host) || !target_safe(req->target) ||
      (req->content_type && !header_safe(req->content_type)) ||
      (req->accept && !header_safe(req->accept)) ||
      (req->session && !header_safe(req->session)) ||
      (req->body_len > 0 && req->body == NULL))
    return ZM_E_INVAL;
  const char *accept = req->accept ? req->accept : "application/json";
  int with_len = req->body_len > 0 || req->content_type != NULL ||
                 strcmp(req->method, "POST") == 0 ||
                 strcmp(req->method, "PUT") == 0;
  size_t cap = strlen(req->method) + strlen(req->target) + strlen(req->host) +
               strlen(accept) + (req->session ? strlen(req->session) : 0) +
               (req->content_type ? strlen(req->content_type) : 0) +
               req->body_len + 256;
  char *buf = zm_xmalloc(cap);
  int n = snprintf(buf, cap,
                   "%s %s HTTP/1.1\r\n"
                   "Host: %s\r\n"
                   "User-Agent: ziti-management\r\n"
                   "Accept: %s\r\n"
                   "Connection: keep-alive\r\n",
                   req->method, req->target, req->host, accept);
  size_t len = (size_t)n;
  if (req->session)
    len += (size_t)snprintf(buf + len, cap - len, "zt-session: %s\r\n",
                            req->session);
  if (req->content_type)
    len += (size_t)snprintf(buf + len, cap - len, "Content-Type: %s\r\n",
                            req->content_type);
  if (with_len)
    len += (size_t)snprintf(buf + len, cap - len, "Content-Length: %zu\r\n",
                            req->body_len);
  len += (size_t)snprintf(buf + len, cap - len, "\r\n");
  ZM_ASSERT(len + req->body_len < cap);
  if (req->body_len)
    memcpy(buf + len, req->body, req->body_len);
  len += req->body_len;
  buf[len] = '\0';
  zm_secret_dispose(out);
  out->base = buf;
  out->len = len;
  return 0;
}
