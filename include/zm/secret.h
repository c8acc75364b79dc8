/*
 * secret.h - a heap buffer for secrets (private keys, enrollment JWTs, the
 * one-time token, session tokens). Always NUL-terminated; wiped with
 * explicit_bzero before it is freed. Never log its contents.
 */
#ifndef ZM_SECRET_H
#define ZM_SECRET_H

#include <stddef.h>

typedef struct {
  char *base; /* owned, NUL-terminated, NULL when empty */
  size_t len; /* bytes before the NUL */
} zm_secret_t;

/* Copies n bytes of p into s (which must be empty or disposed). */
void zm_secret_set(zm_secret_t *s, const char *p, size_t n);
/* Moves src into dst (dst disposed first); src becomes empty. */
void zm_secret_move(zm_secret_t *dst, zm_secret_t *src);
/* Reads a whole file (at most max bytes) into s, e.g. a private key PEM
 * for wolfSSL_CTX_use_PrivateKey_buffer(): wolfSSL's *_file() loaders free
 * their copy of the file unwiped. Returns 0, ZM_E_NOT_FOUND (cannot open or
 * read) or ZM_E_MSG_TOO_LARGE. */
int zm_secret_read_file(zm_secret_t *s, const char *path, size_t max);
/* Wipes and frees; s becomes empty. Safe on an empty secret. */
void zm_secret_dispose(zm_secret_t *s);

#endif /* ZM_SECRET_H */
