/*
 * crypto_test_util.h - helpers shared by the crypto unit tests: a scratch
 * directory, running the openssl CLI, whole-file I/O, base64url.
 * Header-only (static functions) so each test stays one translation unit.
 */
#ifndef ZM_CRYPTO_TEST_UTIL_H
#define ZM_CRYPTO_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define OPENSSL "/usr/bin/openssl"

static char tu_dir[256];

/* Creates the scratch directory; returns 0 or -1. */
static int tu_mkdtemp(void) {
  const char *base = getenv("TMPDIR");
  snprintf(tu_dir, sizeof(tu_dir), "%s/zm-crypto-XXXXXX",
           base != NULL ? base : "/tmp");
  return mkdtemp(tu_dir) != NULL ? 0 : -1;
}

static void tu_rmdir(void) {
  char cmd[512];
  if (tu_dir[0] == '\0')
    return;
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tu_dir);
  if (system(cmd) != 0)
    fprintf(stderr, "warning: could not remove %s\n", tu_dir);
  tu_dir[0] = '\0';
}

/* Path of `name` inside the scratch directory (static buffer, rotates 4). */
static const char *tu_path(const char *name) {
  static char bufs[4][512];
  static int i;
  char *b = bufs[i++ & 3];
  snprintf(b, 512, "%s/%s", tu_dir, name);
  return b;
}

/* Runs a shell command (printf-style) inside the scratch dir, stdout and
 * stderr of the command to <dir>/last.log. Returns the exit status. */
__attribute__((format(printf, 1, 2))) static int tu_sh(const char *fmt, ...) {
  char cmd[4096], full[4608];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(cmd, sizeof(cmd), fmt, ap);
  va_end(ap);
  snprintf(full, sizeof(full), "cd '%s' && ( %s ) >last.log 2>&1", tu_dir, cmd);
  int st = system(full);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Reads a whole file (NUL-terminated; *len excludes the NUL), or NULL. */
static char *tu_read(const char *path, size_t *len) {
  if (len != NULL)
    *len = 0; /* defined on failure too (gcc -O2 -Wmaybe-uninitialized) */
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  size_t cap = 4096, n = 0;
  char *b = malloc(cap);
  size_t r;
  while ((r = fread(b + n, 1, cap - n - 1, f)) > 0) {
    n += r;
    if (cap - n < 2) {
      cap *= 2;
      b = realloc(b, cap);
    }
  }
  fclose(f);
  b[n] = '\0';
  if (len != NULL)
    *len = n;
  return b;
}

__attribute__((unused)) static int tu_write(const char *path, const void *p,
                                            size_t n) {
  FILE *f = fopen(path, "wb");
  if (f == NULL)
    return -1;
  size_t w = fwrite(p, 1, n, f);
  return fclose(f) == 0 && w == n ? 0 : -1;
}

/* Unpadded base64url of p (malloc'd). */
__attribute__((unused)) static char *tu_b64url(const uint8_t *p, size_t n) {
  static const char A[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  char *o = malloc(n / 3 * 4 + 5), *q = o;
  size_t i = 0;
  for (; i + 2 < n; i += 3) {
    uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
    *q++ = A[v >> 18];
    *q++ = A[(v >> 12) & 63];
    *q++ = A[(v >> 6) & 63];
    *q++ = A[v & 63];
  }
  if (n - i == 1) {
    uint32_t v = (uint32_t)p[i] << 16;
    *q++ = A[v >> 18];
    *q++ = A[(v >> 12) & 63];
  } else if (n - i == 2) {
    uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
    *q++ = A[v >> 18];
    *q++ = A[(v >> 12) & 63];
    *q++ = A[(v >> 6) & 63];
  }
  *q = '\0';
  return o;
}

/* Standard padded base64, one line, of p (malloc'd). */
__attribute__((unused)) static char *tu_b64(const uint8_t *p, size_t n) {
  char *u = tu_b64url(p, n);
  size_t l = strlen(u);
  char *o = malloc(l + 3);
  for (size_t i = 0; i < l; i++)
    o[i] = u[i] == '-' ? '+' : u[i] == '_' ? '/' : u[i];
  while (l % 4 != 0)
    o[l++] = '=';
  o[l] = '\0';
  free(u);
  return o;
}

/* Number of non-overlapping occurrences of needle in hay. */
__attribute__((unused)) static size_t tu_count(const char *hay,
                                               const char *needle) {
  size_t n = 0, nl = strlen(needle);
  for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += nl)
    n++;
  return n;
}

#endif /* ZM_CRYPTO_TEST_UTIL_H */
