/*
 * stime.c - the UTC timestamp text of the store: "YYYY-MM-DD HH:MM:SS.mmm".
 *
 * Hand-written both ways because zm_store_load parses one or two timestamps
 * per row for a million rows at start-up: strptime/timegm cost far more
 * (locale, time zone files). Days <-> civil date use the proleptic Gregorian
 * era arithmetic (400-year eras of 146097 days), valid for any year.
 */
#include "store_internal.h"

#include "zm/zm.h"

#define MS_PER_DAY 86400000LL

/* Days since 1970-01-01 of the civil date y-m-d (m 1..12). */
static int64_t days_from_civil(int64_t y, int m, int d) {
  y -= m <= 2; /* years start in March, so Feb 29 is the last day */
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  int64_t yoe = y - era * 400;                         /* 0..399 */
  int64_t mp = m > 2 ? m - 3 : m + 9;                  /* March = 0 */
  int64_t doy = (153 * mp + 2) / 5 + d - 1;            /* 0..365 */
  int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; /* 0..146096 */
  return era * 146097 + doe - 719468; /* 719468: 0000-03-01 .. 1970-01-01 */
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d) {
  z += 719468;
  int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  int64_t doe = z - era * 146097;
  int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  int64_t mp = (5 * doy + 2) / 153;
  *d = (int)(doy - (153 * mp + 2) / 5 + 1);
  *m = (int)(mp < 10 ? mp + 3 : mp - 9);
  *y = yoe + era * 400 + (*m <= 2);
}

static void put2(char *p, int v) {
  p[0] = (char)('0' + v / 10);
  p[1] = (char)('0' + v % 10);
}

size_t zm__store_time_format(int64_t ms, char out[ZM__STORE_TIME_BUF]) {
  if (ms < ZM__STORE_TIME_MIN_MS)
    ms = ZM__STORE_TIME_MIN_MS;
  if (ms > ZM__STORE_TIME_MAX_MS)
    ms = ZM__STORE_TIME_MAX_MS;
  int64_t days = ms / MS_PER_DAY, rem = ms % MS_PER_DAY;
  if (rem < 0) { /* floor division for times before 1970 */
    rem += MS_PER_DAY;
    days--;
  }
  int64_t y;
  int m, d;
  civil_from_days(days, &y, &m, &d);
  int hh = (int)(rem / 3600000), mi = (int)(rem / 60000 % 60);
  int ss = (int)(rem / 1000 % 60), milli = (int)(rem % 1000);
  put2(out, (int)(y / 100));
  put2(out + 2, (int)(y % 100));
  out[4] = '-';
  put2(out + 5, m);
  out[7] = '-';
  put2(out + 8, d);
  out[10] = ' ';
  put2(out + 11, hh);
  out[13] = ':';
  put2(out + 14, mi);
  out[16] = ':';
  put2(out + 17, ss);
  out[19] = '.';
  out[20] = (char)('0' + milli / 100);
  put2(out + 21, milli % 100);
  out[ZM__STORE_TIME_LEN] = '\0';
  return ZM__STORE_TIME_LEN;
}

/* Reads exactly n decimal digits at s[*i]; -1 if any is not a digit. */
static int digits(const char *s, size_t len, size_t *i, int n) {
  if (len - *i < (size_t)n)
    return -1;
  int v = 0;
  for (int k = 0; k < n; k++) {
    char c = s[*i + (size_t)k];
    if (c < '0' || c > '9')
      return -1;
    v = v * 10 + (c - '0');
  }
  *i += (size_t)n;
  return v;
}

static int days_in_month(int64_t y, int m) {
  static const int DAYS[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  if (m == 2 && (y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)))
    return 29;
  return DAYS[m - 1];
}

int zm__store_time_parse(const char *s, size_t len, int64_t *out_ms) {
  size_t i = 0;
  int y, mo, d, hh = 0, mi = 0, ss = 0, milli = 0;
  if ((y = digits(s, len, &i, 4)) < 0 || i >= len || s[i++] != '-' ||
      (mo = digits(s, len, &i, 2)) < 0 || i >= len || s[i++] != '-' ||
      (d = digits(s, len, &i, 2)) < 0)
    return ZM_E_INVAL;
  if (mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo))
    return ZM_E_INVAL;
  if (i < len && (s[i] == ' ' || s[i] == 'T')) {
    i++;
    if ((hh = digits(s, len, &i, 2)) < 0 || i >= len || s[i++] != ':' ||
        (mi = digits(s, len, &i, 2)) < 0)
      return ZM_E_INVAL;
    if (i < len && s[i] == ':') {
      i++;
      if ((ss = digits(s, len, &i, 2)) < 0)
        return ZM_E_INVAL;
      if (i < len && s[i] == '.') {
        i++;
        int nd = 0;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
          if (nd < 3)
            milli = milli * 10 + (s[i] - '0');
          nd++;
          i++;
        }
        if (nd == 0 || nd > 9)
          return ZM_E_INVAL;
        for (; nd < 3; nd++)
          milli *= 10;
      }
    }
    /* 60 is a leap second: SQLite and Go never write it; reject it. */
    if (hh > 23 || mi > 59 || ss > 59)
      return ZM_E_INVAL;
  }
  int64_t off_min = 0;
  if (i < len && s[i] == 'Z') {
    i++;
  } else if (i < len && (s[i] == '+' || s[i] == '-')) {
    int sign = s[i++] == '-' ? -1 : 1;
    int oh, om = 0;
    if ((oh = digits(s, len, &i, 2)) < 0)
      return ZM_E_INVAL;
    /* After "+HH:" the minutes are required: "+05:" is no zone (it was
     * accepted; found by test/fuzz/fuzz_stime.c). */
    if (i < len && s[i] == ':') {
      i++;
      if ((om = digits(s, len, &i, 2)) < 0)
        return ZM_E_INVAL;
    } else if (i < len && (om = digits(s, len, &i, 2)) < 0) {
      return ZM_E_INVAL;
    }
    if (oh > 23 || om > 59)
      return ZM_E_INVAL;
    off_min = sign * (oh * 60 + om);
  }
  if (i != len)
    return ZM_E_INVAL;
  int64_t ms = days_from_civil(y, mo, d) * MS_PER_DAY +
               ((int64_t)hh * 3600 + mi * 60 + ss) * 1000 + milli;
  *out_ms = ms - off_min * 60000; /* local = UTC + offset */
  return 0;
}
