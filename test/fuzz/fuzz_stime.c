/*
 * fuzz_stime.c - the store's timestamp codec (src/store/stime.c,
 * store_internal.h): zm__store_time_parse and zm__store_time_format.
 *
 * The parser is checked against a reference: a grammar matcher written from
 * the header's contract (YYYY-MM-DD, then optionally [ T]HH:MM[:SS[.f{1,9}]],
 * then optionally Z | +-HH:MM | +-HHMM | +-HH; fields in range, no leap
 * second) and glibc's timegm() for the value. Properties: the parser accepts
 * exactly that grammar, its value equals timegm's, canonical text formats
 * back to itself, and parse(format(ms)) == ms for every value in range.
 */
#include "fuzz_common.h"

#include "store/store_internal.h"
#include "zm/zm.h"

#include <string.h>
#include <time.h>

static int num(const char *s, size_t len, size_t *i, int n, int *v) {
  if (len - *i < (size_t)n)
    return 0;
  *v = 0;
  for (int k = 0; k < n; k++) {
    char c = s[*i + (size_t)k];
    if (c < '0' || c > '9')
      return 0;
    *v = *v * 10 + (c - '0');
  }
  *i += (size_t)n;
  return 1;
}

static int lit(const char *s, size_t len, size_t *i, char c) {
  if (*i < len && s[*i] == c) {
    (*i)++;
    return 1;
  }
  return 0;
}

/* The reference: 1 and the value in ms when s is accepted by the contract. */
static int reference(const char *s, size_t len, int64_t *ms) {
  size_t i = 0;
  int y, mo, d, hh = 0, mi = 0, ss = 0, milli = 0;
  if (!num(s, len, &i, 4, &y) || !lit(s, len, &i, '-') ||
      !num(s, len, &i, 2, &mo) || !lit(s, len, &i, '-') ||
      !num(s, len, &i, 2, &d))
    return 0;
  if (lit(s, len, &i, ' ') || lit(s, len, &i, 'T')) {
    if (!num(s, len, &i, 2, &hh) || !lit(s, len, &i, ':') ||
        !num(s, len, &i, 2, &mi))
      return 0;
    if (lit(s, len, &i, ':')) {
      if (!num(s, len, &i, 2, &ss))
        return 0;
      if (lit(s, len, &i, '.')) {
        int nd = 0, dg;
        while (num(s, len, &i, 1, &dg)) {
          if (nd < 3)
            milli = milli * 10 + dg;
          nd++;
        }
        if (nd < 1 || nd > 9)
          return 0;
        for (; nd < 3; nd++)
          milli *= 10;
      }
    }
  }
  int off = 0;
  if (lit(s, len, &i, 'Z')) {
  } else if (i < len && (s[i] == '+' || s[i] == '-')) {
    int sign = s[i++] == '-' ? -1 : 1, oh, om = 0;
    if (!num(s, len, &i, 2, &oh))
      return 0;
    if (lit(s, len, &i, ':')) {
      if (!num(s, len, &i, 2, &om)) /* "+HH:" is not a zone */
        return 0;
    } else if (i < len && !num(s, len, &i, 2, &om)) {
      return 0;
    }
    if (oh > 23 || om > 59)
      return 0;
    off = sign * (oh * 60 + om);
  }
  if (i != len)
    return 0;
  if (mo < 1 || mo > 12 || d < 1 || hh > 23 || mi > 59 || ss > 59)
    return 0;
  struct tm tm = {.tm_year = y - 1900,
                  .tm_mon = mo - 1,
                  .tm_mday = d,
                  .tm_hour = hh,
                  .tm_min = mi,
                  .tm_sec = ss};
  time_t t = timegm(&tm);
  if (tm.tm_mday != d || tm.tm_mon != mo - 1) /* normalized: no such day */
    return 0;
  *ms = (int64_t)t * 1000 + milli - (int64_t)off * 60000;
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = malloc(size ? size : 1); /* exact size: ASan sees over-reads */
  memcpy(s, data, size);
  int64_t ms = 0x5A5A5A5A, want = 0;
  int rv = zm__store_time_parse(s, size, &ms);
  int ok = reference(s, size, &want);
  FUZZ_CHECK(rv == 0 || rv == ZM_E_INVAL);
  FUZZ_CHECK((rv == 0) == ok);
  if (rv == 0) {
    FUZZ_CHECK(ms == want);
    char out[ZM__STORE_TIME_BUF];
    FUZZ_CHECK(zm__store_time_format(ms, out) == ZM__STORE_TIME_LEN);
    FUZZ_CHECK(strlen(out) == ZM__STORE_TIME_LEN);
    if (ms >= ZM__STORE_TIME_MIN_MS && ms <= ZM__STORE_TIME_MAX_MS) {
      int64_t back = 0;
      FUZZ_CHECK(zm__store_time_parse(out, ZM__STORE_TIME_LEN, &back) == 0);
      FUZZ_CHECK(back == ms);
      if (size == ZM__STORE_TIME_LEN && s[10] == ' ' && s[19] == '.' &&
          s[22] >= '0' && s[22] <= '9')
        FUZZ_CHECK(memcmp(out, s, size) == 0); /* canonical is a fixpoint */
    }
  }
  /* Formatting any 8 bytes as a time must give parseable canonical text. */
  if (size >= 8) {
    int64_t any;
    memcpy(&any, data, sizeof(any));
    char out[ZM__STORE_TIME_BUF];
    zm__store_time_format(any, out);
    int64_t back = 0;
    FUZZ_CHECK(zm__store_time_parse(out, ZM__STORE_TIME_LEN, &back) == 0);
    int64_t clamped = any < ZM__STORE_TIME_MIN_MS   ? ZM__STORE_TIME_MIN_MS
                      : any > ZM__STORE_TIME_MAX_MS ? ZM__STORE_TIME_MAX_MS
                                                    : any;
    FUZZ_CHECK(back == clamped);
  }
  free(s);
  return 0;
}
