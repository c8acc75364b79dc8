/* secret.c - wiped-on-free buffers for secrets. */
#include "zm/secret.h"
#include "zm/zm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

int zm_secret_read_file(zm_secret_t *s, const char *path, size_t max) {
  zm_secret_dispose(s);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return ZM_E_NOT_FOUND;
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return ZM_E_NOT_FOUND;
  }
  if ((uint64_t)st.st_size > max) {
    close(fd);
    return ZM_E_MSG_TOO_LARGE;
  }
  size_t cap = (size_t)st.st_size;
  char *b = zm_xmalloc(cap + 1);
  size_t n = 0;
  while (n < cap) {
    ssize_t r = read(fd, b + n, cap - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    n += (size_t)r;
  }
  close(fd);
  if (n != cap) {
    zm_wipe(b, cap + 1);
    free(b);
    return ZM_E_NOT_FOUND;
  }
  b[n] = '\0';
  s->base = b;
  s->len = n;
  return 0;
}
