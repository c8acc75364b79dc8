/* validate.c - bounds and encoding checks for client-supplied strings. */
#include "zm/app.h"

#include <stdio.h>
#include <string.h>

/* Returns 1 if s[0..n) is well-formed UTF-8 without C0 controls or DEL. */
static int utf8_clean(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7f)
        return 0;
      i++;
      continue;
    }
    size_t len;
    unsigned min;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      min = 0x80;
      c &= 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      min = 0x800;
      c &= 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      min = 0x10000;
      c &= 0x07;
    } else {
      return 0;
    }
    if (i + len > n)
      return 0;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xC0) != 0x80)
        return 0;
      c = (c << 6) | (s[i + k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
      return 0;
    i += len;
  }
  return 1;
}

const char *zm_rpc_check_id(const char *s, const char *field) {
  static char why[128];
  size_t n = s ? strlen(s) : 0;
  if (n == 0) {
    snprintf(why, sizeof why, "%s is required", field);
    return why;
  }
  if (n > ZM_MAX_ID_LEN) {
    snprintf(why, sizeof why, "%s is longer than %u bytes", field,
             ZM_MAX_ID_LEN);
    return why;
  }
  if (!utf8_clean((const unsigned char *)s, n)) {
    snprintf(why, sizeof why,
             "%s must be valid UTF-8 without control characters", field);
    return why;
  }
  return NULL;
}
