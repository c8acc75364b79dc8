/*
 * tls_server.c - wolfSSL server sessions over in-memory ciphertext for the
 * gRPC listener (see tls_server.h).
 */
#include "tls_server.h"

#include "h2mem.h"

#include "zm/secret.h"
#include "zm/tlsconf.h"
#include "zm/zm.h"

#include <wolfssl/wolfcrypt/memory.h>

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One wolfSSL_read() at a time on the loop thread: decrypted bytes go
 * straight to nghttp2, which consumes them all, so one buffer serves every
 * connection (a TLS record holds at most 16 KiB of plaintext). */
static uint8_t plain_buf[16384];

/* GeneralName CHOICE tags (RFC 5280 4.2.1.6), as wolfSSL reports them. */
#define SAN_DNS 2
#define SAN_URI 6

struct zm_tls_srv_ctx {
  WOLFSSL_CTX *ctx;
  unsigned refs;
  int client_auth;
};

/* ---- I/O callbacks ------------------------------------------------------ */

static int on_recv(WOLFSSL *ssl, char *buf, int sz, void *ud) {
  (void)ssl;
  zm_tls_srv_t *t = ud;
  size_t avail = t->in_len - t->in_off;
  if (avail == 0)
    return WOLFSSL_CBIO_ERR_WANT_READ;
  size_t n = (size_t)sz < avail ? (size_t)sz : avail;
  memcpy(buf, t->in + t->in_off, n);
  t->in_off += n;
  return (int)n;
}

static int on_send(WOLFSSL *ssl, char *buf, int sz, void *ud) {
  (void)ssl;
  zm_tls_srv_t *t = ud;
  if (t->sink(t->sink_ud, buf, (size_t)sz) != 0) {
    t->sink_failed = 1;
    return WOLFSSL_CBIO_ERR_GENERAL;
  }
  return sz;
}

/* ---- context ------------------------------------------------------------ */

/*
 * wolfSSL 5.5.4's wolfSSL_CTX_check_private_key() accepts an EC key that
 * does not belong to the certificate, and a half-replaced pair would only
 * show at the first client. So a new context proves itself: one in-memory
 * handshake against a throwaway client, whose CertificateVerify check fails
 * when the key does not match.
 */
typedef struct {
  uint8_t buf[32768];
  size_t len, off;
} mem_pipe_t;

static int pipe_put(mem_pipe_t *p, const void *b, size_t n) {
  if (n > sizeof p->buf - p->len)
    return -1;
  memcpy(p->buf + p->len, b, n);
  p->len += n;
  return 0;
}

static int pipe_sink(void *ud, const void *b, size_t n) {
  return pipe_put(ud, b, n);
}

static int cl_recv(WOLFSSL *ssl, char *buf, int sz, void *ud) {
  (void)ssl;
  mem_pipe_t *p = ud;
  size_t avail = p->len - p->off;
  if (avail == 0)
    return WOLFSSL_CBIO_ERR_WANT_READ;
  size_t n = (size_t)sz < avail ? (size_t)sz : avail;
  memcpy(buf, p->buf + p->off, n);
  p->off += n;
  if (p->off == p->len)
    p->off = p->len = 0;
  return (int)n;
}

static int cl_send(WOLFSSL *ssl, char *buf, int sz, void *ud) {
  (void)ssl;
  return pipe_put(ud, buf, (size_t)sz) == 0 ? sz : WOLFSSL_CBIO_ERR_GENERAL;
}

static int ignore_plain(void *ud, const uint8_t *p, size_t n) {
  (void)ud;
  (void)p;
  (void)n;
  return 0;
}

static int self_test(zm_tls_srv_ctx_t *c) {
  mem_pipe_t *c2s = calloc(1, sizeof *c2s), *s2c = calloc(1, sizeof *s2c);
  WOLFSSL_CTX *cctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
  WOLFSSL *cl = cctx ? wolfSSL_new(cctx) : NULL;
  zm_tls_srv_t t;
  int ok = 0, srv_up = 0;
  if (c2s == NULL || s2c == NULL || cl == NULL)
    goto out;
  wolfSSL_set_verify(cl, WOLFSSL_VERIFY_NONE, NULL); /* the key, not the CA */
  wolfSSL_SSLSetIORecv(cl, cl_recv);
  wolfSSL_SSLSetIOSend(cl, cl_send);
  wolfSSL_SetIOReadCtx(cl, s2c);
  wolfSSL_SetIOWriteCtx(cl, c2s);
  if (zm_tls_srv_init(&t, c, pipe_sink, s2c) != 0)
    goto out;
  srv_up = 1;
  for (int i = 0; i < 8; i++) {
    int rc = wolfSSL_connect(cl);
    if (rc == WOLFSSL_SUCCESS) {
      ok = 1;
      break;
    }
    int e = wolfSSL_get_error(cl, rc);
    if (e != WOLFSSL_ERROR_WANT_READ && e != WOLFSSL_ERROR_WANT_WRITE)
      break;
    const char *why = NULL;
    if (zm_tls_srv_feed(&t, (const char *)c2s->buf, c2s->len, ignore_plain,
                        NULL, &why) != 0)
      break;
    c2s->len = c2s->off = 0;
  }
out:
  if (srv_up)
    zm_tls_srv_dispose(&t);
  if (cl != NULL)
    wolfSSL_free(cl);
  if (cctx != NULL)
    wolfSSL_CTX_free(cctx);
  free(c2s);
  free(s2c);
  return ok;
}

static const char H2[] = "h2";

int zm_tls_srv_ctx_new(zm_tls_srv_ctx_t **out, const char *cert_file,
                       const char *key_file, const char *client_ca, char *err,
                       size_t errlen) {
  *out = NULL;
  wolfSSL_Init(); /* reference counted; see src/ziti/tls.c */
  zm_tls_srv_ctx_t *c = calloc(1, sizeof *c);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return ZM_E_NOMEM;
  }
  c->refs = 1;
  c->ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
  if (c->ctx == NULL) {
    snprintf(err, errlen, "cannot create a TLS context");
    goto fail;
  }
  if (wolfSSL_CTX_SetMinVersion(c->ctx, WOLFSSL_TLSV1_2) != WOLFSSL_SUCCESS) {
    snprintf(err, errlen, "cannot set the minimum TLS version");
    goto fail;
  }
  if (wolfSSL_CTX_set_cipher_list(c->ctx, ZM_TLS_CIPHERS) != WOLFSSL_SUCCESS) {
    snprintf(err, errlen, "cannot set the TLS cipher suites");
    goto fail;
  }
  if (wolfSSL_CTX_use_certificate_chain_file(c->ctx, cert_file) !=
      WOLFSSL_SUCCESS) {
    snprintf(err, errlen, "%s: cannot load the certificate chain (PEM)",
             cert_file);
    goto fail;
  }
  /* through a buffer we wipe: wolfSSL's *_file() loaders free their copy
   * of the PEM unwiped */
  zm_secret_t pem = {0};
  int krc = zm_secret_read_file(&pem, key_file, 1u << 20);
  if (krc == 0)
    krc = wolfSSL_CTX_use_PrivateKey_buffer(
              c->ctx, (const unsigned char *)pem.base, (long)pem.len,
              WOLFSSL_FILETYPE_PEM) == WOLFSSL_SUCCESS
              ? 0
              : -1;
  zm_secret_dispose(&pem);
  if (krc != 0) {
    snprintf(err, errlen, "%s: cannot load the private key (PEM)", key_file);
    goto fail;
  }
  if (wolfSSL_CTX_check_private_key(c->ctx) != WOLFSSL_SUCCESS) {
    snprintf(err, errlen, "%s does not match the certificate in %s", key_file,
             cert_file);
    goto fail;
  }
  if (client_ca != NULL && client_ca[0] != '\0') {
    if (wolfSSL_CTX_load_verify_locations(c->ctx, client_ca, NULL) !=
        WOLFSSL_SUCCESS) {
      snprintf(err, errlen, "%s: cannot load the client CA (PEM)", client_ca);
      goto fail;
    }
    /* verify when presented; absence is decided per RPC (health stays
     * reachable without a certificate) */
    wolfSSL_CTX_set_verify(c->ctx, WOLFSSL_VERIFY_PEER, NULL);
    c->client_auth = 1;
  } else {
    wolfSSL_CTX_set_verify(c->ctx, WOLFSSL_VERIFY_NONE, NULL);
  }
  wolfSSL_CTX_SetIORecv(c->ctx, on_recv);
  wolfSSL_CTX_SetIOSend(c->ctx, on_send);
  if (!self_test(c)) {
    snprintf(err, errlen,
             "%s does not match the certificate in %s (test handshake "
             "failed)",
             key_file, cert_file);
    goto fail;
  }
  *out = c;
  return 0;
fail:
  if (c->ctx != NULL)
    wolfSSL_CTX_free(c->ctx);
  free(c);
  return ZM_E_TLS;
}

void zm_tls_srv_ctx_ref(zm_tls_srv_ctx_t *c) { c->refs++; }

void zm_tls_srv_ctx_unref(zm_tls_srv_ctx_t *c) {
  if (c == NULL || --c->refs > 0)
    return;
  wolfSSL_CTX_free(c->ctx);
  free(c);
}

int zm_tls_srv_ctx_client_auth(const zm_tls_srv_ctx_t *c) {
  return c->client_auth;
}

/* ---- names -------------------------------------------------------------- */

static int add_name(char **names, size_t *n, size_t max, const char *prefix,
                    const unsigned char *v, int len) {
  if (*n >= max || v == NULL || len <= 0 || (size_t)len > ZM_TLS_MAX_NAME ||
      memchr(v, 0, (size_t)len) != NULL)
    return 0;
  size_t pl = strlen(prefix);
  char *s = malloc(pl + (size_t)len + 1);
  if (s == NULL)
    return 0;
  memcpy(s, prefix, pl);
  memcpy(s + pl, v, (size_t)len);
  s[pl + (size_t)len] = '\0';
  names[(*n)++] = s;
  return 1;
}

size_t zm_tls_cert_names(WOLFSSL_X509 *x, char **names, size_t max) {
  size_t n = 0;
  WOLFSSL_STACK *sk =
      wolfSSL_X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
  if (sk != NULL) {
    int k = wolfSSL_sk_GENERAL_NAME_num(sk);
    for (int i = 0; i < k; i++) {
      WOLFSSL_GENERAL_NAME *gn = wolfSSL_sk_GENERAL_NAME_value(sk, i);
      if (gn == NULL)
        continue;
      WOLFSSL_ASN1_STRING *s = NULL;
      const char *prefix = NULL;
      if (gn->type == SAN_URI) {
        s = gn->d.uniformResourceIdentifier;
        prefix = "uri:";
      } else if (gn->type == SAN_DNS) {
        s = gn->d.dNSName;
        prefix = "dns:";
      }
      if (s != NULL)
        add_name(names, &n, max, prefix, wolfSSL_ASN1_STRING_data(s),
                 wolfSSL_ASN1_STRING_length(s));
    }
    wolfSSL_GENERAL_NAMES_free(sk);
  }
  char cn[ZM_TLS_MAX_NAME + 1];
  WOLFSSL_X509_NAME *subj = wolfSSL_X509_get_subject_name(x);
  int cl = subj ? wolfSSL_X509_NAME_get_text_by_NID(subj, NID_commonName, cn,
                                                    (int)sizeof cn)
                : -1;
  if (cl > 0)
    add_name(names, &n, max, "cn:", (const unsigned char *)cn,
             (int)strnlen(cn, sizeof cn));
  return n;
}

/* ---- sessions ----------------------------------------------------------- */

int zm_tls_srv_init(zm_tls_srv_t *t, zm_tls_srv_ctx_t *ctx, zm_tls_sink_fn sink,
                    void *sink_ud) {
  memset(t, 0, sizeof *t);
  t->ssl = wolfSSL_new(ctx->ctx); /* holds its own reference to ctx->ctx */
  if (t->ssl == NULL)
    return ZM_E_NOMEM;
  /* gRPC needs HTTP/2: a client offering ALPN without h2 is refused. */
  if (wolfSSL_UseALPN(t->ssl, (char *)H2, sizeof H2 - 1,
                      WOLFSSL_ALPN_FAILED_ON_MISMATCH) != WOLFSSL_SUCCESS) {
    wolfSSL_free(t->ssl);
    t->ssl = NULL;
    return ZM_E_TLS;
  }
  wolfSSL_SetIOReadCtx(t->ssl, t);
  wolfSSL_SetIOWriteCtx(t->ssl, t);
  t->ctx = ctx;
  zm_tls_srv_ctx_ref(ctx);
  t->sink = sink;
  t->sink_ud = sink_ud;
  return 0;
}

void zm_tls_srv_dispose(zm_tls_srv_t *t) {
  if (t->ssl != NULL)
    wolfSSL_free(t->ssl);
  t->ssl = NULL;
  for (size_t i = 0; i < t->n_names; i++)
    free(t->names[i]);
  t->n_names = 0;
  zm_tls_srv_ctx_unref(t->ctx);
  t->ctx = NULL;
}

void zm_tls_srv_established(zm_tls_srv_t *t) {
  t->established = 1;
  WOLFSSL_X509 *x = wolfSSL_get_peer_certificate(t->ssl);
  if (x == NULL)
    return; /* no client certificate: no identity */
  /* The chain was verified during the handshake (VERIFY_PEER); without a
   * client CA no certificate is asked for and none is trusted. */
  if (t->ctx->client_auth && wolfSSL_get_verify_result(t->ssl) == 0)
    t->n_names = zm_tls_cert_names(x, t->names, ZM_TLS_MAX_NAMES);
  wolfSSL_X509_free(x);
}

int zm_tls_srv_handshake(zm_tls_srv_t *t, const char *p, size_t n, size_t *used,
                         const char **why) {
  t->in = p;
  t->in_len = n;
  t->in_off = 0;
  int rv = 0;
  int rc = wolfSSL_accept(t->ssl);
  if (rc != WOLFSSL_SUCCESS) {
    int e = wolfSSL_get_error(t->ssl, rc);
    if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE) {
      rv = ZM_E_INCOMPLETE;
    } else {
      const char *s = wolfSSL_ERR_reason_error_string((unsigned long)e);
      *why = t->sink_failed ? "out of memory" : s ? s : "TLS handshake failed";
      rv = ZM_E_TLS;
    }
  }
  *used = t->in_off;
  t->in = NULL;
  t->in_len = t->in_off = 0;
  return rv;
}

int zm_tls_srv_feed(zm_tls_srv_t *t, const char *p, size_t n,
                    zm_tls_plain_fn plain, void *ud, const char **why) {
  if (!t->established) {
    size_t used = 0;
    int rc = zm_tls_srv_handshake(t, p, n, &used, why);
    if (rc != 0)
      return rc == ZM_E_INCOMPLETE ? 0 : rc;
    zm_tls_srv_established(t);
    p += used;
    n -= used;
  }
  t->in = p;
  t->in_len = n;
  t->in_off = 0;
  int rv = 0;
  for (;;) {
    int k = wolfSSL_read(t->ssl, plain_buf, (int)sizeof plain_buf);
    if (k > 0) {
      rv = plain(ud, plain_buf, (size_t)k);
      if (rv != 0)
        goto out;
      continue;
    }
    int e = wolfSSL_get_error(t->ssl, k);
    if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
      break;
    if (e == WOLFSSL_ERROR_ZERO_RETURN) {
      rv = ZM_E_CANCELLED;
      break;
    }
    const char *s = wolfSSL_ERR_reason_error_string((unsigned long)e);
    *why = s ? s : "TLS read failed";
    rv = ZM_E_TLS;
    break;
  }
out:
  t->in = NULL;
  t->in_len = t->in_off = 0;
  return rv;
}

int zm_tls_srv_write(zm_tls_srv_t *t, const void *p, size_t n) {
  const char *b = p;
  while (n > 0) {
    int k = wolfSSL_write(t->ssl, b, (int)(n > 16384 ? 16384 : n));
    if (k <= 0)
      return ZM_E_TLS; /* our sink never blocks */
    b += k;
    n -= (size_t)k;
  }
  return 0;
}

size_t zm_tls_srv_trim(zm_tls_srv_t *t) {
#if defined(XMALLOC_USER) || defined(XMALLOC_OVERRIDE) ||                      \
    defined(WOLFSSL_STATIC_MEMORY)
  /* wolfSSL's own allocator: the objects are not malloc() blocks */
  (void)t;
  return 0;
#else
  wolfSSL_Malloc_cb mf = NULL;
  wolfSSL_Free_cb ff = NULL;
  wolfSSL_Realloc_cb rf = NULL;
  if (t->ssl == NULL || !t->established ||
      wolfSSL_GetAllocators(&mf, &ff, &rf) != 0 || mf != NULL)
    return 0;
  /* wolfSSL_new malloc()s the object and, inside it, its session */
  size_t n = zm_trim_zero_pages(t->ssl, malloc_usable_size(t->ssl));
#ifdef NO_SESSION_CACHE_REF
  /* then wolfSSL_get_session is the session the object owns (not a cache
   * entry): some 37 KB, room for a peer chain of 9 certificates, zero
   * beyond the one a client presented */
  WOLFSSL_SESSION *sess = wolfSSL_get_session(t->ssl);
  if (sess != NULL)
    n += zm_trim_zero_pages(sess, malloc_usable_size(sess));
#endif
  return n;
#endif
}
