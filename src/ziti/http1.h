/*
 * http1.h - HTTP/1.1 for the controller client, without I/O: request
 * serialization and an incremental, bounded response parser on llhttp.
 *
 * The parser is fed plaintext as it arrives. zm_http1_resp_feed() returns
 * ZM_E_INCOMPLETE while the response is not complete, the number of bytes it
 * consumed once it is (bytes after the end of the response are left
 * unconsumed: the controller never pipelines, so a caller seeing them must
 * not reuse the connection), or an error: ZM_E_PROTO (not HTTP),
 * ZM_E_MSG_TOO_LARGE (header block or body above its bound). After an error
 * or a completion, feeding again returns the same result until
 * zm_http1_resp_reset().
 */
#ifndef ZM_ZITI_HTTP1_H
#define ZM_ZITI_HTTP1_H

#include "zm/secret.h"

#include <llhttp.h>
#include <stddef.h>
#include <sys/types.h>

/* Bound on the status line + all header lines; Go's default is 1 MiB but the
 * controller sends ~600 bytes, so 64 KiB leaves room for proxies. */
#define ZM_HTTP1_MAX_HEADER (64u * 1024)
/* Bound on one header value we keep (zt-session, content-type, ...). */
#define ZM_HTTP1_MAX_VALUE 4096u
/* Bound on a response body: a page of 100 identities is ~150 KiB, a PKCS#7
 * bundle a few KiB; 4 MiB is generous without letting a peer exhaust memory. */
#define ZM_HTTP1_MAX_BODY (4u << 20)

typedef struct {
  llhttp_t parser;
  llhttp_settings_t settings;
  size_t max_body; /* bound for this response's body, bytes */
  int status;      /* HTTP status, 0 until the status line is parsed */
  int retry_after; /* Retry-After seconds, -1 when absent or not a number */
  int conn_close;  /* the response said Connection: close */
  int keep_alive;  /* at completion: llhttp_should_keep_alive() */
  int complete;    /* the whole response has been parsed */
  int err;         /* sticky error (ZM_E_PROTO / ZM_E_MSG_TOO_LARGE) */
  size_t seen;     /* bytes fed so far (0 = nothing received yet) */
  char content_type[128]; /* Content-Type value, truncated, NUL-terminated */
  zm_secret_t session;    /* zt-session header value (a secret) */
  char *body;             /* owned; wiped on reset (it may hold a JWT) */
  size_t body_len, body_cap;
  /* header being parsed */
  size_t header_bytes;
  char hname[32];
  size_t hname_len; /* > sizeof(hname) - 1 means "not a header we keep" */
  char hval[ZM_HTTP1_MAX_VALUE];
  size_t hval_len;
  int headers_done; /* later header lines are trailers: ignored */
} zm_http1_resp_t;

/* Prepares r to parse one response whose body may be up to max_body bytes. */
void zm_http1_resp_init(zm_http1_resp_t *r, size_t max_body);
/* Forgets the parsed response (wiping the body and the session token) and
 * prepares for the next one on the same connection. */
void zm_http1_resp_reset(zm_http1_resp_t *r);
/* Wipes and frees everything r owns. */
void zm_http1_resp_dispose(zm_http1_resp_t *r);
/* Feeds n bytes; see the file comment for the return values. */
ssize_t zm_http1_resp_feed(zm_http1_resp_t *r, const char *p, size_t n);
/* The peer closed the connection: completes a response delimited by EOF
 * (returns 0), or returns ZM_E_INCOMPLETE if the response was cut short
 * (or nothing was received), or the sticky error. */
int zm_http1_resp_eof(zm_http1_resp_t *r);

/* One request. Strings are NUL-terminated and not owned. */
typedef struct {
  const char *method;       /* "GET", "POST", "DELETE" */
  const char *host;         /* Host header value: "host:port" */
  const char *target;       /* origin-form: "/edge/...?..." */
  const char *content_type; /* NULL: no body headers unless body_len > 0 */
  const char *accept;       /* NULL: "application/json" */
  const char *session;      /* zt-session token (a secret) or NULL */
  const char *body;         /* may be NULL when body_len == 0 */
  size_t body_len;
} zm_http1_req_t;

/* Serializes req into *out (a secret: it may carry the session token).
 * Returns 0, or ZM_E_INVAL when a string holds CR/LF or is missing. */
int zm_http1_req_serialize(const zm_http1_req_t *req, zm_secret_t *out);

#endif /* ZM_ZITI_HTTP1_H */
