/*
 * tls_server.h - TLS for the gRPC listener: wolfSSL server sessions whose
 * I/O callbacks read the chunk uv_tcp just delivered and write ciphertext
 * into a sink the connection provides, so TLS runs without sockets (the
 * same shape as the controller client's src/ziti/tls.c).
 *
 * A context (certificate, key, optional client CA) is reference counted:
 * SIGHUP builds a new one and swaps it in; connections that were accepted
 * under the old one keep it until they close.
 */
#ifndef ZM_GRPC_TLS_SERVER_H
#define ZM_GRPC_TLS_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

/* Peer names kept per connection (SAN URIs, DNS names, the CN): more are
 * ignored, and so is any single name longer than ZM_TLS_MAX_NAME. */
#define ZM_TLS_MAX_NAMES 16u
#define ZM_TLS_MAX_NAME 512u

typedef struct zm_tls_srv_ctx zm_tls_srv_ctx_t;

/* Loads cert_file (chain) and key_file, and client_ca (NULL or "" = no
 * client certificates asked for). With a client CA, a client certificate is
 * requested and verified against it when presented (a bad one fails the
 * handshake); a client without one is let through with no identity, so that
 * health probes work and the RPC layer can answer UNAUTHENTICATED.
 * Returns 0 or ZM_E_TLS with a one-line reason in err. */
int zm_tls_srv_ctx_new(zm_tls_srv_ctx_t **out, const char *cert_file,
                       const char *key_file, const char *client_ca, char *err,
                       size_t errlen);
void zm_tls_srv_ctx_ref(zm_tls_srv_ctx_t *c);
void zm_tls_srv_ctx_unref(zm_tls_srv_ctx_t *c);
/* 1 when the context verifies client certificates. */
int zm_tls_srv_ctx_client_auth(const zm_tls_srv_ctx_t *c);

/* Ciphertext sink: appends n bytes; returns 0 or < 0 (out of memory). */
typedef int (*zm_tls_sink_fn)(void *ud, const void *p, size_t n);
/* Plaintext consumer: returns 0 to go on, < 0 to stop (error). */
typedef int (*zm_tls_plain_fn)(void *ud, const uint8_t *p, size_t n);

typedef struct {
  WOLFSSL *ssl;
  zm_tls_srv_ctx_t *ctx; /* a reference */
  const char *in;        /* the chunk being fed (borrowed), in_off consumed */
  size_t in_len, in_off;
  zm_tls_sink_fn sink;
  void *sink_ud;
  int sink_failed;
  int established;
  /* the verified client's names: "uri:..", "dns:..", "cn:.." */
  char *names[ZM_TLS_MAX_NAMES];
  size_t n_names;
} zm_tls_srv_t;

/* Returns 0 or ZM_E_TLS / ZM_E_NOMEM. */
int zm_tls_srv_init(zm_tls_srv_t *t, zm_tls_srv_ctx_t *ctx, zm_tls_sink_fn sink,
                    void *sink_ud);
void zm_tls_srv_dispose(zm_tls_srv_t *t);

/*
 * One handshake step over the ciphertext p[0..n): wolfSSL_accept() and
 * nothing else, so that it may run on another thread than the loop while
 * nothing else touches t (the sink included). Returns 0 when the handshake
 * is complete (then call zm_tls_srv_established() on the loop and feed
 * p[*used..n), which may hold the first records of the application data),
 * ZM_E_INCOMPLETE when it needs more input (all of it was consumed), or
 * ZM_E_TLS with a static reason in *why.
 */
int zm_tls_srv_handshake(zm_tls_srv_t *t, const char *p, size_t n, size_t *used,
                         const char **why);
/* Marks t established and extracts the verified client's names. */
void zm_tls_srv_established(zm_tls_srv_t *t);

/*
 * Feeds ciphertext: advances the handshake (extracting the peer's names when
 * it completes), then hands every decrypted byte to plain(). All input is
 * consumed (wolfSSL keeps partial records). Returns 0, ZM_E_CANCELLED when
 * the peer sent close_notify, the plain() error, or ZM_E_TLS with a static
 * reason in *why.
 */
int zm_tls_srv_feed(zm_tls_srv_t *t, const char *p, size_t n,
                    zm_tls_plain_fn plain, void *ud, const char **why);
/* Encrypts n bytes into the sink. Returns 0 or ZM_E_TLS. */
int zm_tls_srv_write(zm_tls_srv_t *t, const void *p, size_t n);

/* For an idle, established session: gives back the resident pages of the
 * WOLFSSL object and of its WOLFSSL_SESSION that hold only zeros (the
 * session is some 37 KB, mostly room for a peer certificate chain, zeroed
 * by wolfSSL_new). Contents do not change. Returns the bytes given back; 0
 * when wolfSSL does not allocate with malloc() (sizes are then unknown). */
size_t zm_tls_srv_trim(zm_tls_srv_t *t);

/* Extracts the names of a certificate (pure, for tests and the fuzzer):
 * SAN URIs, SAN DNS names, then the CN. Returns the count; names are
 * malloc'd. */
size_t zm_tls_cert_names(WOLFSSL_X509 *x, char **names, size_t max);

#endif /* ZM_GRPC_TLS_SERVER_H */
