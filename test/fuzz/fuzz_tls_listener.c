/*
 * fuzz_tls_listener.c - the gRPC listener's TLS path (src/grpc/tls_server.c).
 *
 * Input byte 0 picks the target:
 *   0: the rest is a DER certificate; zm_tls_cert_names() extracts its
 *      names. Property: every name is "uri:", "dns:" or "cn:" + at most
 *      ZM_TLS_MAX_NAME bytes, NUL-free; at most ZM_TLS_MAX_NAMES of them.
 *   1: the rest is what a client sends, fed to a server session in chunks
 *      (each chunk: one length byte, then that many bytes). Properties: no
 *      crash, no leak; once the feed failed it keeps failing; output stays
 *      bounded (the sink refuses beyond 1 MiB and the session must cope).
 * The session uses a fixed self-signed certificate (tls_fixture.h), with
 * client certificates requested (the mTLS configuration).
 */
#include "fuzz_common.h"
#include "tls_fixture.h"

#include "grpc/tls_server.h"
#include "zm/zm.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static zm_tls_srv_ctx_t *ctx;

static void init(void) {
  char dir[] = "/tmp/zm-fuzz-tlsXXXXXX";
  if (mkdtemp(dir) == NULL)
    abort();
  char cert[64], key[64];
  snprintf(cert, sizeof cert, "%s/c.pem", dir);
  snprintf(key, sizeof key, "%s/k.pem", dir);
  FILE *f = fopen(cert, "w");
  fputs(FUZZ_CERT_PEM, f);
  fclose(f);
  f = fopen(key, "w");
  fputs(FUZZ_KEY_PEM, f);
  fclose(f);
  char err[256];
  /* the certificate is its own client CA: mTLS paths are reachable */
  if (zm_tls_srv_ctx_new(&ctx, cert, key, cert, err, sizeof err) != 0) {
    fprintf(stderr, "fuzz_tls_listener: %s\n", err);
    abort();
  }
  unlink(cert);
  unlink(key);
  rmdir(dir);
}

typedef struct {
  size_t out;
} sink_t;

static int sink(void *ud, const void *p, size_t n) {
  (void)p;
  sink_t *s = ud;
  if (s->out + n > (1u << 20))
    return -1;
  s->out += n;
  return 0;
}

static int plain(void *ud, const uint8_t *p, size_t n) {
  (void)ud;
  FUZZ_CHECK(p != NULL && n > 0 && n <= 16384);
  return 0;
}

static void fuzz_names(const uint8_t *d, size_t n) {
  const unsigned char *p = d;
  WOLFSSL_X509 *x = wolfSSL_d2i_X509(NULL, &p, (int)n);
  if (x == NULL)
    return;
  char *names[ZM_TLS_MAX_NAMES + 1];
  size_t k = zm_tls_cert_names(x, names, ZM_TLS_MAX_NAMES);
  FUZZ_CHECK(k <= ZM_TLS_MAX_NAMES);
  for (size_t i = 0; i < k; i++) {
    size_t l = strlen(names[i]);
    FUZZ_CHECK(strncmp(names[i], "uri:", 4) == 0 ||
               strncmp(names[i], "dns:", 4) == 0 ||
               strncmp(names[i], "cn:", 3) == 0);
    FUZZ_CHECK(l <= ZM_TLS_MAX_NAME + 4);
    free(names[i]);
  }
  wolfSSL_X509_free(x);
}

static void fuzz_session(const uint8_t *d, size_t n) {
  zm_tls_srv_t t;
  sink_t s = {0};
  if (zm_tls_srv_init(&t, ctx, sink, &s) != 0)
    return;
  int failed = 0;
  while (n > 0) {
    size_t k = d[0];
    d++;
    n--;
    if (k == 0 || k > n)
      k = n;
    const char *why = NULL;
    int rv = zm_tls_srv_feed(&t, (const char *)d, k, plain, NULL, &why);
    if (failed)
      FUZZ_CHECK(rv != 0);
    if (rv == ZM_E_TLS)
      FUZZ_CHECK(why != NULL);
    if (rv != 0)
      failed = 1;
    d += k;
    n -= k;
  }
  if (t.established)
    for (size_t i = 0; i < t.n_names; i++)
      FUZZ_CHECK(t.names[i] != NULL);
  zm_tls_srv_dispose(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (ctx == NULL)
    init();
  if (size < 1)
    return 0;
  if (data[0] == 0)
    fuzz_names(data + 1, size - 1);
  else
    fuzz_session(data + 1, size - 1);
  return 0;
}
