/* err.c - zm_strerror, the aborting allocator, assertions, wipe, wall time. */
#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

const char *zm_strerror(int err) {
  switch (err) {
#define XX(code, msg)                                                          \
  case ZM_E_##code:                                                            \
    return msg;
    ZM_ERRNO_MAP(XX)
#undef XX
  case 0:
    return "ok";
  default:
    return uv_strerror(err);
  }
}

static _Noreturn void oom(size_t n, const char *file, int line) {
  fprintf(stderr, "fatal: out of memory allocating %zu bytes at %s:%d\n", n,
          file, line);
  abort();
}

void *zm__xmalloc(size_t n, const char *file, int line) {
  void *p = malloc(n ? n : 1);
  if (p == NULL)
    oom(n, file, line);
  return p;
}

void *zm__xcalloc(size_t n, size_t size, const char *file, int line) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (p == NULL)
    oom(n * size, file, line);
  return p;
}

void *zm__xrealloc(void *p, size_t n, const char *file, int line) {
  void *q = realloc(p, n ? n : 1);
  if (q == NULL)
    oom(n, file, line);
  return q;
}

char *zm__xstrdup(const char *s, const char *file, int line) {
  return zm__xstrndup(s, strlen(s), file, line);
}

char *zm__xstrndup(const char *s, size_t n, const char *file, int line) {
  char *p = zm__xmalloc(n + 1, file, line);
  memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

_Noreturn void zm__assert_fail(const char *expr, const char *file, int line) {
  fprintf(stderr, "fatal: assertion failed: %s at %s:%d\n", expr, file, line);
  abort();
}

void zm_wipe(void *p, size_t n) {
  if (p != NULL && n > 0)
    explicit_bzero(p, n);
}

int64_t zm_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t zm_thread_cpu_ns(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
    return 0;
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
