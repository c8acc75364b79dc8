/*
 * tls.h - wolfSSL client sessions over in-memory ciphertext buffers (no
 * sockets): the connection code appends what uv_tcp read with
 * zm__ziti_tls_feed(), drives the handshake and reads plaintext, and flushes
 * what wolfSSL wrote (zm__ziti_tls_take_out()) with uv_write.
 */
#ifndef ZM_ZITI_TLS_H
#define ZM_ZITI_TLS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

/* Bound on ciphertext buffered in either direction (a TLS record is at most
 * ~16.5 KiB; reads are stopped by the caller above this). */
#define ZM_TLS_MAX_BUFFER (256u * 1024)

/* Creates a TLS 1.2..1.3 client context that verifies the peer against
 * ca_file and presents cert_file/key_file (either may be NULL: no client
 * cert). Returns 0 or ZM_E_TLS with a static reason in *why. */
int zm__ziti_tls_ctx_new(WOLFSSL_CTX **out, const char *ca_file,
                         const char *cert_file, const char *key_file,
                         const char **why);

/* The same once wolfSSL is initialised; any thread (it reads the files). */
int zm__ziti_tls_ctx_load(WOLFSSL_CTX **out, const char *ca_file,
                          const char *cert_file, const char *key_file,
                          const char **why);

/* A context that does not verify the peer (self-enrollment's first
 * contact; the enrollment JWT's signature authenticates the server). */
int zm__ziti_tls_ctx_new_unverified(WOLFSSL_CTX **out, const char **why);

typedef struct {
  WOLFSSL *ssl;
  char host[256]; /* expected peer name (DNS name or IP literal) */
  int host_is_ip;
  char *in; /* ciphertext received, not yet consumed by wolfSSL; owned */
  size_t in_off, in_len, in_cap;
  char *out; /* ciphertext to send; owned */
  size_t out_len, out_cap;
  int eof; /* the transport reached EOF */
} zm_tls_t;

/* Starts a client session for host (SNI + name check), offering `resume`
 * (a session from an earlier connection to the same host, or NULL) for
 * resumption; the server may decline it, and a full handshake runs. Returns
 * 0 or ZM_E_TLS. */
int zm__ziti_tls_init(zm_tls_t *t, WOLFSSL_CTX *ctx, const char *host,
                      WOLFSSL_SESSION *resume);
/* After the handshake: 1 if it resumed the offered session. */
int zm__ziti_tls_resumed(zm_tls_t *t);
/* A new reference to the connection's session (for the next connection's
 * resumption; wolfSSL_SESSION_free() it), or NULL. */
WOLFSSL_SESSION *zm__ziti_tls_session(zm_tls_t *t);
void zm__ziti_tls_dispose(zm_tls_t *t);
/* Appends received ciphertext. Returns 0 or ZM_E_MSG_TOO_LARGE. */
int zm__ziti_tls_feed(zm_tls_t *t, const char *p, size_t n);
/* Advances the handshake: 0 = done (peer verified), ZM_E_INCOMPLETE = needs
 * more input (flush the output first), ZM_E_TLS = failed (*why set). */
int zm__ziti_tls_handshake(zm_tls_t *t, const char **why);
/* Decrypts into buf: > 0 bytes, ZM_E_INCOMPLETE (need more input), 0 = the
 * peer closed (close_notify), ZM_E_TLS = error. */
ssize_t zm__ziti_tls_read(zm_tls_t *t, char *buf, size_t cap);
/* Encrypts all n bytes into the output buffer. Returns 0 or ZM_E_TLS. */
int zm__ziti_tls_write(zm_tls_t *t, const char *p, size_t n);
/* Hands over the pending output (malloc'd, caller frees); NULL if none. */
char *zm__ziti_tls_take_out(zm_tls_t *t, size_t *len);
/* Copies the peer leaf certificate DER (malloc'd) after the handshake.
 * Returns 0 or ZM_E_TLS. */
int zm__ziti_tls_peer_der(zm_tls_t *t, uint8_t **der, size_t *len);

#endif /* ZM_ZITI_TLS_H */
