/* prom.c - Prometheus text exposition writer (pure, bounded). */
#include "zm/metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void zm_prom_init(zm_prom_t *p, size_t max) {
  memset(p, 0, sizeof *p);
  p->max = max;
}

void zm_prom_dispose(zm_prom_t *p) {
  free(p->buf);
  memset(p, 0, sizeof *p);
}

static void put(zm_prom_t *p, const char *s, size_t n) {
  if (p->truncated)
    return;
  if (p->len + n > p->max) {
    p->truncated = 1;
    return;
  }
  if (p->len + n + 1 > p->cap) {
    size_t cap = p->cap ? p->cap : 4096;
    while (cap < p->len + n + 1)
      cap *= 2;
    p->buf = zm_xrealloc(p->buf, cap);
    p->cap = cap;
  }
  memcpy(p->buf + p->len, s, n);
  p->len += n;
  p->buf[p->len] = '\0';
}

static void puts_(zm_prom_t *p, const char *s) { put(p, s, strlen(s)); }

/* HELP text escapes \ and newline; label values also ". */
static void put_escaped(zm_prom_t *p, const char *s, int quote) {
  for (; *s; s++) {
    if (*s == '\\')
      put(p, "\\\\", 2);
    else if (*s == '\n')
      put(p, "\\n", 2);
    else if (quote && *s == '"')
      put(p, "\\\"", 2);
    else
      put(p, s, 1);
  }
}

void zm_prom_family(zm_prom_t *p, const char *name, const char *type,
                    const char *help) {
  puts_(p, "# HELP ");
  puts_(p, name);
  put(p, " ", 1);
  put_escaped(p, help, 0);
  puts_(p, "\n# TYPE ");
  puts_(p, name);
  put(p, " ", 1);
  puts_(p, type);
  put(p, "\n", 1);
}

static void put_labels(zm_prom_t *p, const char *const *labels, size_t n,
                       const char *le) {
  if (n == 0 && le == NULL)
    return;
  put(p, "{", 1);
  for (size_t i = 0; i < n; i++) {
    if (i > 0)
      put(p, ",", 1);
    puts_(p, labels[2 * i]);
    put(p, "=\"", 2);
    put_escaped(p, labels[2 * i + 1] ? labels[2 * i + 1] : "", 1);
    put(p, "\"", 1);
  }
  if (le != NULL) {
    if (n > 0)
      put(p, ",", 1);
    puts_(p, "le=\"");
    puts_(p, le);
    put(p, "\"", 1);
  }
  put(p, "}", 1);
}

static void put_double(zm_prom_t *p, double v) {
  char num[64];
  if (isnan(v))
    snprintf(num, sizeof num, "NaN");
  else if (isinf(v))
    snprintf(num, sizeof num, v > 0 ? "+Inf" : "-Inf");
  else if (v == (double)(int64_t)v && fabs(v) < 1e15)
    snprintf(num, sizeof num, "%lld", (long long)v);
  else
    snprintf(num, sizeof num, "%.12g", v);
  puts_(p, num);
}

void zm_prom_sample(zm_prom_t *p, const char *name, const char *const *labels,
                    size_t n, double value) {
  puts_(p, name);
  put_labels(p, labels, n, NULL);
  put(p, " ", 1);
  put_double(p, value);
  put(p, "\n", 1);
}

void zm_prom_sample_u64(zm_prom_t *p, const char *name,
                        const char *const *labels, size_t n, uint64_t value) {
  char num[32];
  puts_(p, name);
  put_labels(p, labels, n, NULL);
  snprintf(num, sizeof num, " %llu\n", (unsigned long long)value);
  puts_(p, num);
}

void zm_prom_histogram(zm_prom_t *p, const char *name,
                       const char *const *labels, size_t n,
                       const double *bounds, size_t nb, const uint64_t *counts,
                       double sum) {
  char metric[160], le[32], num[32];
  uint64_t cum = 0;
  snprintf(metric, sizeof metric, "%s_bucket", name);
  for (size_t i = 0; i <= nb; i++) {
    cum += counts[i];
    if (i < nb)
      snprintf(le, sizeof le, "%g", bounds[i]);
    else
      snprintf(le, sizeof le, "+Inf");
    puts_(p, metric);
    put_labels(p, labels, n, le);
    snprintf(num, sizeof num, " %llu\n", (unsigned long long)cum);
    puts_(p, num);
  }
  snprintf(metric, sizeof metric, "%s_sum", name);
  zm_prom_sample(p, metric, labels, n, sum);
  snprintf(metric, sizeof metric, "%s_count", name);
  zm_prom_sample_u64(p, metric, labels, n, cum);
}
