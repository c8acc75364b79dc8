/*
 * fuzz_duration.c - zm_duration_parse (src/app/config.c), the Go
 * time.ParseDuration subset of the duration settings (GRPC_IDLE_TIMEOUT,
 * SHUTDOWN_GRACE, ...).
 *
 * The input, cut at its first NUL (environment values cannot hold one), is
 * checked against a reference written from Go's grammar:
 *   "0" | "+0" | ["+"] ( digits ["." digits*] | "." digits ) unit )+
 * with unit ns, us, µs (U+00B5 or U+03BC), ms, s, m, h; negative durations
 * are refused on purpose. Properties: the parser accepts exactly the strings
 * of that grammar whose value is at most 1e18 ns (values near that limit
 * are not compared: both sides round), and returns the value rounded up to
 * whole ms.
 */
#include "fuzz_common.h"

#include "zm/config.h"
#include "zm/zm.h"

#include <math.h>
#include <string.h>

/* Returns 1 and the value in ns if s is in the grammar, else 0. */
static int reference(const char *s, long double *ns) {
  static const struct {
    const char *u;
    long double ns;
  } U[] = {{"ns", 1},    {"us", 1e3L}, {"\xc2\xb5s", 1e3L}, {"\xce\xbcs", 1e3L},
           {"ms", 1e6L}, {"s", 1e9L},  {"m", 60e9L},        {"h", 3600e9L}};
  *ns = 0;
  if (*s == '+')
    s++;
  if (strcmp(s, "0") == 0)
    return 1;
  if (*s == '\0')
    return 0;
  while (*s) {
    long double v = 0, scale = 1;
    int pre = 0, post = 0;
    while (*s >= '0' && *s <= '9') {
      v = v * 10 + (*s++ - '0');
      pre = 1;
    }
    if (*s == '.') {
      s++;
      while (*s >= '0' && *s <= '9') {
        scale /= 10;
        v += (*s++ - '0') * scale;
        post = 1;
      }
    }
    if (!pre && !post)
      return 0;
    size_t best = 0;
    long double unit = 0;
    for (size_t i = 0; i < ZM_ARRAY_SIZE(U); i++) {
      size_t n = strlen(U[i].u);
      if (strncmp(s, U[i].u, n) == 0 && n > best) {
        best = n;
        unit = U[i].ns;
      }
    }
    if (best == 0)
      return 0;
    s += best;
    *ns += v * unit;
  }
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 256) /* settings are short; keeps the reference exact enough */
    return 0;
  char *s = malloc(size + 1);
  memcpy(s, data, size);
  s[size] = '\0';

  uint64_t ms = 0xDEADBEEF;
  int rv = zm_duration_parse(s, &ms);
  long double ns;
  int ok = reference(s, &ns);
  FUZZ_CHECK(rv == 0 || rv == ZM_E_INVAL);
  if (!ok) {
    FUZZ_CHECK(rv != 0);
  } else if (ns < 0.999e18L) {
    FUZZ_CHECK(rv == 0);
    long double want = ceill(ns / 1e6L);
    /* double vs long double: allow one ms and a relative 1e-12 */
    FUZZ_CHECK(fabsl((long double)ms - want) <= 1 + want * 1e-12L);
  } else if (ns > 1.001e18L) {
    FUZZ_CHECK(rv != 0);
  }
  free(s);
  return 0;
}
