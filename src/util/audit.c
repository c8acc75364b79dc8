/* audit.c - JSON-lines audit log (see zm/audit.h). */
#include "zm/audit.h"
#include "zm/logq.h"
#include "zm/zm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Ring of the audit writer; an event is a few hundred bytes. */
#define ZM_AUDIT_RING (1u << 20)
/* Longest event line; longer values are cut. */
#define ZM_AUDIT_LINE 2048u

static zm_logq_t *audit_q;

int zm_audit_open(const char *dest, char *err, size_t errlen) {
  zm_audit_close();
  if (dest == NULL || dest[0] == '\0' || strcmp(dest, "off") == 0)
    return 0;
  int fd, own = 0;
  if (strcmp(dest, "stderr") == 0) {
    fd = STDERR_FILENO;
  } else {
    fd = open(dest, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
      snprintf(err, errlen, "%s: %s", dest, strerror(errno));
      return ZM_E_INVAL;
    }
    own = 1;
  }
  audit_q = zm_logq_new(fd, ZM_AUDIT_RING, own, 1);
  if (audit_q == NULL) {
    if (own)
      close(fd);
    snprintf(err, errlen, "cannot start the audit writer");
    return ZM_E_NOMEM;
  }
  return 0;
}

void zm_audit_close(void) {
  zm_logq_t *q = audit_q;
  audit_q = NULL;
  zm_logq_free(q);
}

int zm_audit_enabled(void) { return audit_q != NULL; }

void zm_audit_kick(void) { zm_logq_kick(audit_q); }

/* Appends s JSON-escaped; returns the new length (stops at cap). */
static size_t put_escaped(char *b, size_t n, size_t cap, const char *s) {
  static const char hex[] = "0123456789abcdef";
  for (; *s != '\0' && n + 7 < cap; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') {
      b[n++] = '\\';
      b[n++] = (char)ch;
    } else if (ch < 0x20 || ch == 0x7f) {
      b[n++] = '\\';
      b[n++] = 'u';
      b[n++] = '0';
      b[n++] = '0';
      b[n++] = hex[ch >> 4];
      b[n++] = hex[ch & 15];
    } else {
      b[n++] = (char)ch;
    }
  }
  return n;
}

static size_t put_raw(char *b, size_t n, size_t cap, const char *s) {
  size_t k = strlen(s);
  if (n + k >= cap)
    k = cap - n - 1;
  memcpy(b + n, s, k);
  return n + k;
}

static size_t vformat(char *b, size_t cap, const char *event, va_list ap) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  /* the fields of a JSON log line (LOG_FORMAT=json) come first, so that
   * an audit stream shared with the log (AUDIT_LOG=stderr) parses as one */
  int k = snprintf(b, cap,
                   "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\","
                   "\"level\":\"info\",\"msg\":\"audit\","
                   "\"component\":\"audit\",\"event\":\"",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                   tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
  /* room for the closing "}\n" and NUL whatever the values */
  size_t lim = cap - 3;
  size_t n = k > 0 && (size_t)k < cap ? (size_t)k : 0;
  n = put_escaped(b, n, lim, event);
  n = put_raw(b, n, lim, "\"");
  for (;;) {
    const char *key = va_arg(ap, const char *);
    if (key == NULL)
      break;
    const char *val = va_arg(ap, const char *);
    if (val == NULL)
      continue;
    /* a pair that might not fit whole is left out: the line stays JSON */
    if (n + 8 + 6 * (strlen(key) + strlen(val)) >= lim)
      continue;
    n = put_raw(b, n, lim, ",\"");
    n = put_escaped(b, n, lim, key);
    n = put_raw(b, n, lim, "\":\"");
    n = put_escaped(b, n, lim, val);
    n = put_raw(b, n, lim, "\"");
  }
  b[n++] = '}';
  b[n++] = '\n';
  b[n] = '\0';
  return n;
}

size_t zm_audit_format(char *buf, size_t cap, const char *event, ...) {
  va_list ap;
  va_start(ap, event);
  size_t n = vformat(buf, cap, event, ap);
  va_end(ap);
  return n;
}

void zm_audit(const char *event, ...) {
  if (audit_q == NULL)
    return;
  char line[ZM_AUDIT_LINE];
  va_list ap;
  va_start(ap, event);
  size_t n = vformat(line, sizeof line, event, ap);
  va_end(ap);
  zm_logq_push(audit_q, line, n);
}
