/* secret.c - wiped-on-free buffers for secrets. */
#include "zm/secret.h"
#include "zm/zm.h"

#include <stdlib.h>
#include <string.h>

void zm_secret_set(zm_secret_t *s, const char *p, size_t n) {
  zm_secret_dispose(s);
  s->base = zm_xmalloc(n + 1);
  memcpy(s->base, p, n);
  s->base[n] = '\0';
  s->len = n;
}

void zm_secret_move(zm_secret_t *dst, zm_secret_t *src) {
  zm_secret_dispose(dst);
  *dst = *src;
  src->base = NULL;
  src->len = 0;
}

void zm_secret_dispose(zm_secret_t *s) {
  if (s->base != NULL) {
    zm_wipe(s->base, s->len + 1);
    free(s->base);
  }
  s->base = NULL;
  s->len = 0;
}
