/* log.c - timestamped log lines (text or JSON) to stderr, one write(2) per
 * line, from a writer thread once zm_log_start_async() ran (see zm/logq.h),
 * so the loop thread never waits on a full pipe. */
#include "zm/log.h"
#include "zm/logq.h"
#include "zm/zm.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* A line is cut (never split) past this many bytes. */
#define LINE_MAX_BYTES 2048u

static zm_log_level_t threshold = ZM_LOG_INFO;
static int json_mode;
static const zm_log_ctx_t *cur_ctx;
static const char *const NAMES[] = {"DEBUG", "INFO", "WARN", "ERROR"};
/* Ring of the asynchronous writer: bounded; lines beyond it are counted and
 * dropped rather than waited for. */
#define ZM_LOG_RING (1u << 20)
static zm_logq_t *async_q;

int zm_log_start_async(void) {
  if (async_q != NULL)
    return 0;
  async_q = zm_logq_new(STDERR_FILENO, ZM_LOG_RING, 0, 0);
  return async_q != NULL ? 0 : ZM_E_NOMEM;
}

void zm_log_stop_async(void) {
  zm_logq_t *q = async_q;
  async_q = NULL;
  zm_logq_free(q);
}

void zm_log_kick(void) { zm_logq_kick(async_q); }

uint64_t zm_log_dropped(void) {
  return async_q != NULL ? zm_logq_dropped(async_q) : 0;
}
static const char *const JNAMES[] = {"debug", "info", "warn", "error"};
/* Leading words that name a module (the "component" field). */
static const char *const COMPONENTS[] = {
    "enroll",    "grpc",    "store",   "ziti",      "lifecycle", "collect",
    "recover",   "metrics", "stats",   "bootstrap", "signal",    "shutdown",
    "listening", "serving", "resolve", "health",    "gc"};

void zm_log_set_level(zm_log_level_t level) { threshold = level; }
void zm_log_set_json(int on) { json_mode = on; }
int zm_log_enabled(zm_log_level_t level) { return level >= threshold; }

const zm_log_ctx_t *zm_log_ctx_swap(const zm_log_ctx_t *ctx) {
  const zm_log_ctx_t *old = cur_ctx;
  cur_ctx = ctx;
  return old;
}

int zm_log_parse_level(const char *s, zm_log_level_t *out) {
  for (size_t i = 0; i < ZM_ARRAY_SIZE(NAMES); i++) {
    if (strcasecmp(s, NAMES[i]) == 0) {
      *out = (zm_log_level_t)i;
      return 0;
    }
  }
  if (strcasecmp(s, "warning") == 0) {
    *out = ZM_LOG_WARN;
    return 0;
  }
  return ZM_E_INVAL;
}

typedef struct {
  char *p;
  size_t len, cap; /* cap excludes room for the final '\n' */
} lbuf_t;

static void lput(lbuf_t *b, const char *s, size_t n) {
  if (b->len + n > b->cap)
    n = b->cap - b->len;
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void lputs(lbuf_t *b, const char *s) { lput(b, s, strlen(s)); }

/* JSON string body: escapes ", \, control bytes; bytes >= 0x80 pass (the
 * messages are ASCII/UTF-8). */
static void lput_json(lbuf_t *b, const char *s, size_t n) {
  static const char HEX[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      lput(b, e, 2);
    } else if (c == '\n') {
      lput(b, "\\n", 2);
    } else if (c == '\t') {
      lput(b, "\\t", 2);
    } else if (c < 0x20 || c == 0x7f) {
      char e[6] = {'\\', 'u', '0', '0', HEX[c >> 4], HEX[c & 15]};
      lput(b, e, 6);
    } else {
      lput(b, (const char *)&s[i], 1);
    }
  }
}

static void lfield(lbuf_t *b, const char *k, const char *v, size_t vn) {
  lputs(b, ",\"");
  lput_json(b, k, strlen(k));
  lputs(b, "\":\"");
  lput_json(b, v, vn);
  lputs(b, "\"");
}

size_t zm_log_format(char *out, size_t cap, int json, int64_t wall_ms,
                     zm_log_level_t level, const char *const *kv, size_t n,
                     const char *msg) {
  if (cap < 2)
    return 0;
  lbuf_t b = {out, 0, cap - 1};
  time_t sec = (time_t)(wall_ms / 1000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  char ts[96];
  snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
           tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
           tm.tm_sec, (int)(wall_ms % 1000));
  if (!json) {
    lputs(&b, ts);
    lputs(&b, " ");
    lputs(&b, NAMES[level]);
    lputs(&b, " ");
    lputs(&b, msg);
    for (size_t i = 0; i < n; i++) {
      lputs(&b, " ");
      lputs(&b, kv[2 * i]);
      lputs(&b, "=");
      lputs(&b, kv[2 * i + 1] ? kv[2 * i + 1] : "");
    }
  } else {
    /* the closing brace must survive truncation: keep room for it */
    b.cap = cap > 3 ? cap - 3 : 0;
    lputs(&b, "{\"time\":\"");
    lputs(&b, ts);
    lputs(&b, "\",\"level\":\"");
    lputs(&b, JNAMES[level]);
    lputs(&b, "\"");
    lfield(&b, "msg", msg, strlen(msg));
    size_t w = strcspn(msg, ": ");
    for (size_t i = 0; i < ZM_ARRAY_SIZE(COMPONENTS); i++) {
      if (strlen(COMPONENTS[i]) == w && strncmp(msg, COMPONENTS[i], w) == 0) {
        lfield(&b, "component", msg, w);
        break;
      }
    }
    /* "enroll <saga>: ..." names the saga */
    if (strncmp(msg, "enroll ", 7) == 0) {
      size_t sn = strcspn(msg + 7, ": ");
      if (sn > 0 && msg[7 + sn] == ':')
        lfield(&b, "saga", msg + 7, sn);
    }
    if (cur_ctx != NULL) {
      if (cur_ctx->request_id != 0) {
        char id[24];
        int k = snprintf(id, sizeof id, "%llu",
                         (unsigned long long)cur_ctx->request_id);
        lfield(&b, "request_id", id, (size_t)k);
      }
      if (cur_ctx->method != NULL)
        lfield(&b, "method", cur_ctx->method, strlen(cur_ctx->method));
      if (cur_ctx->identity != NULL)
        lfield(&b, "identity", cur_ctx->identity, strlen(cur_ctx->identity));
    }
    for (size_t i = 0; i < n; i++) {
      const char *v = kv[2 * i + 1] ? kv[2 * i + 1] : "";
      lfield(&b, kv[2 * i], v, strlen(v));
    }
    b.cap = cap - 1;
    lputs(&b, "}");
  }
  out[b.len++] = '\n';
  return b.len;
}

#if defined(__GNUC__)
__attribute__((format(printf, 4, 0)))
#endif
static void
vlog(zm_log_level_t level, const char *const *kv, size_t n, const char *fmt,
     va_list ap) {
  char msg[LINE_MAX_BYTES], line[LINE_MAX_BYTES + 512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  size_t len = zm_log_format(line, sizeof line, json_mode, zm_wall_ms(), level,
                             kv, n, msg);
  if (async_q != NULL) {
    zm_logq_push(async_q, line, len);
    return;
  }
  ssize_t w = write(STDERR_FILENO, line, len);
  (void)w;
}

void zm_log(zm_log_level_t level, const char *fmt, ...) {
  if (level < threshold)
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(level, NULL, 0, fmt, ap);
  va_end(ap);
}

void zm_log_kv(zm_log_level_t level, const char *const *kv, size_t n,
               const char *fmt, ...) {
  if (level < threshold)
    return;
  va_list ap;
  va_start(ap, fmt);
  vlog(level, kv, n, fmt, ap);
  va_end(ap);
}
