/* log.c - timestamped log lines to stderr, one write(2) per line. */
#include "zm/log.h"
#include "zm/zm.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static zm_log_level_t threshold = ZM_LOG_INFO;
static const char *const NAMES[] = {"DEBUG", "INFO", "WARN", "ERROR"};

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
  ssize_t w = write(STDERR_FILENO, line, len);
  (void)w;
}
