/*
 * tls.c - wolfSSL client contexts and sessions whose I/O callbacks read and
 * write our own ciphertext buffers, so that TLS runs without sockets and the
 * libuv shell (client.c) moves the bytes.
 */
#include "tls.h"

#include "zm/secret.h"
#include "zm/tlsconf.h"
#include "zm/zm.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

/* ---- I/O callbacks ----------------------------------------------------------
 */

static int on_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx) {
  (void)ssl;
  zm_tls_t *t = ctx;
  size_t avail = t->in_len - t->in_off;
  if (avail == 0)
    return t->eof ? WOLFSSL_CBIO_ERR_CONN_CLOSE : WOLFSSL_CBIO_ERR_WANT_READ;
  size_t n = (size_t)sz < avail ? (size_t)sz : avail;
  memcpy(buf, t->in + t->in_off, n);
  t->in_off += n;
  if (t->in_off == t->in_len)
    t->in_off = t->in_len = 0;
  return (int)n;
}

static int on_send(WOLFSSL *ssl, char *buf, int sz, void *ctx) {
  (void)ssl;
  zm_tls_t *t = ctx;
  size_t n = (size_t)sz;
  if (t->out_len + n > t->out_cap) {
    size_t cap = t->out_cap ? t->out_cap : 4096;
    while (cap < t->out_len + n)
      cap *= 2;
    t->out = zm_xrealloc(t->out, cap);
    t->out_cap = cap;
  }
  memcpy(t->out + t->out_len, buf, n);
  t->out_len += n;
  return sz;
}

/* The key through a buffer we wipe: wolfSSL's *_file() loaders free their
 * copy of the PEM unwiped. */
static int load_key(WOLFSSL_CTX *ctx, const char *path) {
  zm_secret_t pem = {0};
  if (zm_secret_read_file(&pem, path, 1u << 20) != 0)
    return -1;
  int rc =
      wolfSSL_CTX_use_PrivateKey_buffer(ctx, (const unsigned char *)pem.base,
                                        (long)pem.len, WOLFSSL_FILETYPE_PEM);
  zm_secret_dispose(&pem);
  return rc == WOLFSSL_SUCCESS ? 0 : -1;
}

/* ---- context
 * ------------------------------------------------------------------ */

int zm__ziti_tls_ctx_new(WOLFSSL_CTX **out, const char *ca_file,
                         const char *cert_file, const char *key_file,
                         const char **why) {
  /* Reference counted by wolfSSL; never undone with wolfSSL_Cleanup(), which
   * would tear down wolfCrypt under other modules of the process. */
  wolfSSL_Init();
  return zm__ziti_tls_ctx_load(out, ca_file, cert_file, key_file, why);
}

int zm__ziti_tls_ctx_load(WOLFSSL_CTX **out, const char *ca_file,
                          const char *cert_file, const char *key_file,
                          const char **why) {
  *out = NULL;
  WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
  if (ctx == NULL) {
    *why = "cannot create a TLS context";
    goto fail;
  }
  if (wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2) != WOLFSSL_SUCCESS) {
    *why = "cannot set the minimum TLS version";
    goto fail_ctx;
  }
  if (wolfSSL_CTX_set_cipher_list(ctx, ZM_TLS_CIPHERS) != WOLFSSL_SUCCESS) {
    *why = "cannot set the TLS cipher suites";
    goto fail_ctx;
  }
  if (ca_file == NULL || wolfSSL_CTX_load_verify_locations(
                             ctx, ca_file, NULL) != WOLFSSL_SUCCESS) {
    *why = "cannot load the controller CA file";
    goto fail_ctx;
  }
  if (cert_file != NULL && wolfSSL_CTX_use_certificate_chain_file(
                               ctx, cert_file) != WOLFSSL_SUCCESS) {
    *why = "cannot load the client certificate file";
    goto fail_ctx;
  }
  if (key_file != NULL && load_key(ctx, key_file) != 0) {
    *why = "cannot load the client private key file";
    goto fail_ctx;
  }
  /* A key that parses only as far as its PEM armour, or one of another
   * certificate (files renewed one at a time), would fail every handshake. */
  if (cert_file != NULL && key_file != NULL &&
      wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS) {
    *why = "the client private key does not match the certificate";
    goto fail_ctx;
  }
  wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, NULL);
  wolfSSL_CTX_SetIORecv(ctx, on_recv);
  wolfSSL_CTX_SetIOSend(ctx, on_send);
  *out = ctx;
  return 0;

fail_ctx:
  wolfSSL_CTX_free(ctx);
fail:
  return ZM_E_TLS;
}

int zm__ziti_tls_ctx_new_unverified(WOLFSSL_CTX **out, const char **why) {
  *out = NULL;
  wolfSSL_Init();
  WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
  if (ctx == NULL ||
      wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2) != WOLFSSL_SUCCESS ||
      wolfSSL_CTX_set_cipher_list(ctx, ZM_TLS_CIPHERS) != WOLFSSL_SUCCESS) {
    if (ctx != NULL)
      wolfSSL_CTX_free(ctx);
    *why = "cannot create a TLS context";
    return ZM_E_TLS;
  }
  wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, NULL);
  wolfSSL_CTX_SetIORecv(ctx, on_recv);
  wolfSSL_CTX_SetIOSend(ctx, on_send);
  *out = ctx;
  return 0;
}

/* ---- session
 * ------------------------------------------------------------------ */

int zm__ziti_tls_init(zm_tls_t *t, WOLFSSL_CTX *ctx, const char *host,
                      WOLFSSL_SESSION *resume) {
  memset(t, 0, sizeof(*t));
  size_t hl = strlen(host);
  if (hl == 0 || hl >= sizeof(t->host))
    return ZM_E_TLS;
  memcpy(t->host, host, hl + 1);
  unsigned char tmp[16];
  t->host_is_ip =
      inet_pton(AF_INET, host, tmp) == 1 || inet_pton(AF_INET6, host, tmp) == 1;
  t->ssl = wolfSSL_new(ctx);
  if (t->ssl == NULL)
    return ZM_E_TLS;
  wolfSSL_SetIOReadCtx(t->ssl, t);
  wolfSSL_SetIOWriteCtx(t->ssl, t);
  if (!t->host_is_ip) {
    /* The name is checked during the handshake; SNI as browsers send it. */
    if (wolfSSL_check_domain_name(t->ssl, host) != WOLFSSL_SUCCESS ||
        wolfSSL_UseSNI(t->ssl, WOLFSSL_SNI_HOST_NAME, host, (word16)hl) !=
            WOLFSSL_SUCCESS) {
      wolfSSL_free(t->ssl);
      t->ssl = NULL;
      return ZM_E_TLS;
    }
  }
  /* A session that cannot be set (expired, another version) only means a
   * full handshake. */
  if (resume != NULL)
    (void)wolfSSL_set_session(t->ssl, resume);
  return 0;
}

int zm__ziti_tls_resumed(zm_tls_t *t) {
  return t->ssl != NULL && wolfSSL_session_reused(t->ssl) == 1;
}

WOLFSSL_SESSION *zm__ziti_tls_session(zm_tls_t *t) {
  return t->ssl != NULL ? wolfSSL_get1_session(t->ssl) : NULL;
}

void zm__ziti_tls_dispose(zm_tls_t *t) {
  if (t->ssl)
    wolfSSL_free(t->ssl);
  t->ssl = NULL;
  free(t->in);
  free(t->out);
  t->in = t->out = NULL;
  t->in_len = t->in_off = t->in_cap = t->out_len = t->out_cap = 0;
}

int zm__ziti_tls_feed(zm_tls_t *t, const char *p, size_t n) {
  if (n == 0)
    return 0;
  if (t->in_off > 0 && t->in_off == t->in_len)
    t->in_off = t->in_len = 0;
  if (t->in_len - t->in_off + n > ZM_TLS_MAX_BUFFER)
    return ZM_E_MSG_TOO_LARGE;
  if (t->in_off > 0) { /* compact */
    memmove(t->in, t->in + t->in_off, t->in_len - t->in_off);
    t->in_len -= t->in_off;
    t->in_off = 0;
  }
  if (t->in_len + n > t->in_cap) {
    size_t cap = t->in_cap ? t->in_cap : 16384;
    while (cap < t->in_len + n)
      cap *= 2;
    t->in = zm_xrealloc(t->in, cap);
    t->in_cap = cap;
  }
  memcpy(t->in + t->in_len, p, n);
  t->in_len += n;
  return 0;
}

/* wolfSSL 5.5.4 matches wolfSSL_check_domain_name() against DNS names and the
 * CN only, so an IP literal is checked against the certificate's IP SANs
 * after the chain has been verified, before any application data is sent. */
static int check_ip(zm_tls_t *t) {
  WOLFSSL_X509 *x = wolfSSL_get_peer_certificate(t->ssl);
  if (x == NULL)
    return ZM_E_TLS;
  int ok = wolfSSL_X509_check_ip_asc(x, t->host, 0) == 1;
  wolfSSL_X509_free(x);
  return ok ? 0 : ZM_E_TLS;
}

int zm__ziti_tls_handshake(zm_tls_t *t, const char **why) {
  int rc = wolfSSL_connect(t->ssl);
  if (rc == WOLFSSL_SUCCESS) {
    /* A resumed session was offered to this host only, and its full
     * handshake passed this check. */
    if (t->host_is_ip && !zm__ziti_tls_resumed(t) && check_ip(t) != 0) {
      *why = "the controller certificate has no IP SAN matching the URL host";
      return ZM_E_TLS;
    }
    return 0;
  }
  int e = wolfSSL_get_error(t->ssl, rc);
  if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
    return ZM_E_INCOMPLETE;
  const char *s = wolfSSL_ERR_reason_error_string((unsigned long)e);
  *why = s ? s : "TLS handshake failed";
  return ZM_E_TLS;
}

ssize_t zm__ziti_tls_read(zm_tls_t *t, char *buf, size_t cap) {
  int n = wolfSSL_read(t->ssl, buf, (int)(cap > 0x7fffffff ? 0x7fffffff : cap));
  if (n > 0)
    return n;
  int e = wolfSSL_get_error(t->ssl, n);
  if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
    return ZM_E_INCOMPLETE;
  if (e == WOLFSSL_ERROR_ZERO_RETURN)
    return 0;
  return ZM_E_TLS;
}

int zm__ziti_tls_write(zm_tls_t *t, const char *p, size_t n) {
  while (n > 0) {
    int k = wolfSSL_write(t->ssl, p, (int)(n > 16384 ? 16384 : n));
    if (k <= 0)
      return ZM_E_TLS; /* our send callback never blocks */
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

char *zm__ziti_tls_take_out(zm_tls_t *t, size_t *len) {
  if (t->out_len == 0) {
    *len = 0;
    return NULL;
  }
  char *b = t->out;
  *len = t->out_len;
  t->out = NULL;
  t->out_len = t->out_cap = 0;
  return b;
}

int zm__ziti_tls_peer_der(zm_tls_t *t, uint8_t **der, size_t *len) {
  WOLFSSL_X509 *x = wolfSSL_get_peer_certificate(t->ssl);
  if (x == NULL)
    return ZM_E_TLS;
  int sz = 0;
  const unsigned char *p = wolfSSL_X509_get_der(x, &sz);
  int rc = ZM_E_TLS;
  if (p != NULL && sz > 0) {
    *der = zm_xmalloc((size_t)sz);
    memcpy(*der, p, (size_t)sz);
    *len = (size_t)sz;
    rc = 0;
  }
  wolfSSL_X509_free(x);
  return rc;
}
