/* log.c - timestamped log lines to stderr: one write(2) per line, from a
 * writer thread once zm_log_start_async() ran (see zm/logq.h), so the loop
 * thread never waits on a full pipe. */
#include "zm/log.h"
#include "zm/logq.h"
#include "zm/zm.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static zm_log_level_t threshold = ZM_LOG_INFO;
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

uint64_t zm_log_dropped(void) {
  return async_q != NULL ? zm_logq_dropped(async_q) : 0;
}

void zm_log_set_level(zm_log_level_t level) { threshold = level; }

int zm_log_enabled(zm_log_level_t level) { return level >= threshold; }

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

void zm_log(zm_log_level_t level, const char *fmt, ...) {
  if (level < threshold)
    return;
  char line[1024];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n =
      snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s ",
               tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
               tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, NAMES[level]);
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
  if (len > sizeof line - 2)
    len = sizeof line - 2; /* truncated: long lines are cut, never split */
  line[len++] = '\n';
  if (async_q != NULL) {
    zm_logq_push(async_q, line, len);
    return;
  }
  ssize_t w = write(STDERR_FILENO, line, len);
  (void)w;
}
