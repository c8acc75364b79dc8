/*
 * idjson.c - the identity JSON the OpenZiti SDKs load (SDK ziti/config.go).
 *
 * Written by hand rather than with jansson so that the private key is only
 * ever copied into one buffer we own and wipe: jansson would hold copies of
 * it in its own allocations and free them unwiped. Two passes: measure, then
 * write, so the buffer is allocated once at its exact size.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zm/crypto.h"
#include "zm/zm.h"

/* Escaped length of s (RFC 8259 §7), or writes it at dst when non-NULL. */
static size_t escape(char *dst, const char *s) {
  static const char hex[] = "0123456789abcdef";
  size_t n = 0;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    char esc = 0;
    switch (c) {
    case '"':
      esc = '"';
      break;
    case '\\':
      esc = '\\';
      break;
    case '\n':
      esc = 'n';
      break;
    case '\r':
      esc = 'r';
      break;
    case '\t':
      esc = 't';
      break;
    case '\b':
      esc = 'b';
      break;
    case '\f':
      esc = 'f';
      break;
    default:
      break;
    }
    if (esc != 0) {
      if (dst) {
        dst[n] = '\\';
        dst[n + 1] = esc;
      }
      n += 2;
    } else if (c < 0x20) {
      if (dst) {
        memcpy(dst + n, "\\u00", 4);
        dst[n + 4] = hex[c >> 4];
        dst[n + 5] = hex[c & 0xf];
      }
      n += 6;
    } else {
      if (dst)
        dst[n] = (char)c;
      n++;
    }
  }
  return n;
}

/* The document is these literal pieces with the four escaped values
 * between them, in this order. */
static const char *const PIECES[] = {
    "{\"ztAPI\":\"",
    "\",\"ztAPIs\":null,\"configTypes\":null,\"id\":{\"key\":\"pem:",
    "\",\"cert\":\"pem:",
    "\",\"ca\":\"pem:",
    "\"},\"enableHa\":false}",
};

int zm_idjson_build(const char *zt_api, const char *key_pem,
                    const char *cert_pem, const char *ca_pem,
                    zm_secret_t *out) {
  if (out == NULL)
    return ZM_E_INVAL;
  out->base = NULL;
  out->len = 0;
  if (zt_api == NULL || key_pem == NULL || cert_pem == NULL || ca_pem == NULL)
    return ZM_E_INVAL;

  const char *vals[] = {zt_api, key_pem, cert_pem, ca_pem};
  size_t total = 0;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(PIECES); i++) {
    total += strlen(PIECES[i]);
    if (i < ZM_ARRAY_SIZE(vals))
      total += escape(NULL, vals[i]);
  }

  char *buf = zm_xmalloc(total + 1);
  size_t n = 0;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(PIECES); i++) {
    size_t pl = strlen(PIECES[i]);
    memcpy(buf + n, PIECES[i], pl);
    n += pl;
    if (i < ZM_ARRAY_SIZE(vals))
      n += escape(buf + n, vals[i]);
  }
  ZM_ASSERT(n == total);
  buf[n] = '\0';
  out->base = buf;
  out->len = n;
  return 0;
}
