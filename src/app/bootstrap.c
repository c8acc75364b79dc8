/*
 * bootstrap.c - drop-in start-up: self-enrollment of the admin identity from
 * ZITI_ENROLLMENT_JWT_FILE, as the Go service does at start-up (its chart
 * mounts the one-time JWT at /etc/ziti-enrollment/enrollmentJwt).
 *
 * Runs on the service's loop before anything else is on it, with the
 * asynchronous controller client in bootstrap mode:
 *   1. GET /.well-known/est/cacerts over TLS without verification, keeping
 *      the controller's server certificate;
 *   2. verify the JWT's signature against that certificate (as the OpenZiti
 *      SDKs do), `em` = ott, not expired;
 *   3. key pair + CSR (CN = the JWT's sub) on the libuv thread pool;
 *   4. POST /edge/client/v1/enroll?method=ott&token=<jti>, on the same
 *      pinned server certificate (checked again after the exchange);
 *   5. write ZITI_KEY_FILE, ZITI_CA_FILE, then ZITI_CERT_FILE, each 0600
 *      through a temporary file, fsync and rename (atomic), then fsync the
 *      directory.
 * When all three files exist the JWT file is not read at all.
 */
#include "zm/app.h"
#include "zm/crypto.h"
#include "zm/log.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
  uv_loop_t *loop;
  const zm_config_t *cfg;
  zm_ziti_t *z;
  zm_secret_t jwt;
  zm_jwt_claims_t claims;
  uint8_t *pinned; /* server cert DER the JWT was verified against */
  size_t pinned_len;
  zm_secret_t key_pem;
  char *csr_pem;
  char *ca_pem;
  int kc_err;
  uv_work_t work;
  uint64_t deadline;
  int rc; /* 0 ok, 1 failed */
  int done;
} boot_t;

static void finish(boot_t *b, int rc) {
  b->rc = rc;
  b->done = 1;
  zm_ziti_close(b->z, NULL, NULL);
}

static int file_exists(const char *p) { return access(p, F_OK) == 0; }

/* Writes data to path: 0600, temporary file + fsync + rename. */
static int write_atomic(const char *path, const char *data, size_t len) {
  char tmp[1024];
  if (snprintf(tmp, sizeof tmp, "%s.tmp-%ld", path, (long)getpid()) >=
      (int)sizeof tmp)
    return -1;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return -1;
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(fd, data + off, len - off);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      close(fd);
      unlink(tmp);
      return -1;
    }
    off += (size_t)w;
  }
  if (fchmod(fd, 0600) != 0 || fsync(fd) != 0) {
    close(fd);
    unlink(tmp);
    return -1;
  }
  close(fd);
  if (rename(tmp, path) != 0) {
    unlink(tmp);
    return -1;
  }
  char dir[1024];
  snprintf(dir, sizeof dir, "%s", path);
  int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return 0;
}

static int same_server(const boot_t *b) {
  size_t n;
  const uint8_t *der = zm_ziti_server_cert(b->z, &n);
  return der != NULL && n == b->pinned_len && memcmp(der, b->pinned, n) == 0;
}

static void on_enrolled(const zm_ziti_result_t *r, void *data) {
  boot_t *b = data;
  if (r->err != 0 || r->cert_pem == NULL) {
    ZM_ERROR("bootstrap: enrollment failed: %s (HTTP %d)",
             r->message ? r->message : zm_strerror(r->err), r->http_status);
    finish(b, 1);
    return;
  }
  if (!same_server(b)) {
    ZM_ERROR("bootstrap: the controller's certificate changed during "
             "enrollment; refusing the result");
    finish(b, 1);
    return;
  }
  const zm_config_t *c = b->cfg;
  if (write_atomic(c->key_file, b->key_pem.base, b->key_pem.len) != 0 ||
      write_atomic(c->ca_file, b->ca_pem, strlen(b->ca_pem)) != 0 ||
      write_atomic(c->cert_file, r->cert_pem, strlen(r->cert_pem)) != 0) {
    ZM_ERROR("bootstrap: cannot write the identity files (%s, %s, %s): %s",
             c->cert_file, c->key_file, c->ca_file, strerror(errno));
    finish(b, 1);
    return;
  }
  ZM_INFO("bootstrap: enrolled the admin identity %s; wrote %s, %s, %s",
          b->claims.sub, c->cert_file, c->key_file, c->ca_file);
  finish(b, 0);
}

static void keycsr_work(uv_work_t *w) {
  boot_t *b = w->data;
  b->kc_err = zm_keycsr_generate(ZM_KEY_EC_P384, b->claims.sub, &b->key_pem,
                                 &b->csr_pem);
}

static void keycsr_done(uv_work_t *w, int status) {
  boot_t *b = w->data;
  if (status != 0 || b->kc_err != 0) {
    ZM_ERROR("bootstrap: key/CSR generation failed");
    finish(b, 1);
    return;
  }
  zm_ziti_enroll_ott(b->z, b->claims.jti.base, b->csr_pem, b->deadline,
                     on_enrolled, b);
}

static void on_cacerts(const zm_ziti_result_t *r, void *data) {
  boot_t *b = data;
  const char *bundle = zm_ziti_ca_bundle(b->z);
  size_t n;
  const uint8_t *der = zm_ziti_server_cert(b->z, &n);
  if (r->err != 0 || bundle == NULL || der == NULL) {
    ZM_ERROR("bootstrap: cannot fetch the controller's CA bundle from %s: %s",
             b->cfg->controller_url,
             r->message ? r->message : zm_strerror(r->err));
    finish(b, 1);
    return;
  }
  b->pinned = zm_xmalloc(n);
  memcpy(b->pinned, der, n);
  b->pinned_len = n;
  b->ca_pem = zm_xstrdup(bundle);
  int rv = zm_jwt_verify(b->jwt.base, b->jwt.len, der, n, NULL,
                         zm_wall_ms() / 1000, &b->claims);
  if (rv != 0) {
    ZM_ERROR("bootstrap: %s: the enrollment JWT does not verify against the "
             "controller's certificate: %s",
             b->cfg->enrollment_jwt_file, zm_strerror(rv));
    finish(b, 1);
    return;
  }
  ZM_INFO("bootstrap: enrollment JWT verified (identity %s, issuer %s)",
          b->claims.sub, b->claims.iss);
  b->work.data = b;
  uv_queue_work(b->loop, &b->work, keycsr_work, keycsr_done);
}

/* Reads the JWT file (bounded), trimmed. */
static int read_jwt(const char *path, zm_secret_t *out) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return -1;
  char *buf = zm_xmalloc(ZM_JWT_MAX_LEN + 2);
  size_t n = fread(buf, 1, ZM_JWT_MAX_LEN + 1, f);
  fclose(f);
  while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' ||
                   buf[n - 1] == ' ' || buf[n - 1] == '\t'))
    n--;
  size_t s = 0;
  while (s < n && (buf[s] == ' ' || buf[s] == '\t' || buf[s] == '\n'))
    s++;
  int rc = (n - s == 0 || n > ZM_JWT_MAX_LEN) ? -2 : 0;
  if (rc == 0)
    zm_secret_set(out, buf + s, n - s);
  zm_wipe(buf, ZM_JWT_MAX_LEN + 2);
  free(buf);
  return rc;
}

int zm_bootstrap_enroll(uv_loop_t *loop, const zm_config_t *cfg) {
  if (cfg->enrollment_jwt_file[0] == '\0')
    return 0;
  if (file_exists(cfg->cert_file) && file_exists(cfg->key_file) &&
      file_exists(cfg->ca_file)) {
    ZM_INFO("bootstrap: identity files present; %s not used",
            cfg->enrollment_jwt_file);
    return 0;
  }
  boot_t b;
  memset(&b, 0, sizeof b);
  b.loop = loop;
  b.cfg = cfg;
  int rv = read_jwt(cfg->enrollment_jwt_file, &b.jwt);
  if (rv != 0) {
    ZM_ERROR("bootstrap: ZITI_ENROLLMENT_JWT_FILE=%s: %s",
             cfg->enrollment_jwt_file,
             rv == -1 ? strerror(errno) : "empty or too large");
    return 1;
  }
  ZM_INFO("bootstrap: %s missing; enrolling the admin identity from %s",
          !file_exists(cfg->cert_file)  ? cfg->cert_file
          : !file_exists(cfg->key_file) ? cfg->key_file
                                        : cfg->ca_file,
          cfg->enrollment_jwt_file);
  zm_ziti_config_t zc = {.controller_url = cfg->controller_url,
                         .pool_size = 1,
                         .request_timeout_ms = cfg->ziti_timeout_ms,
                         .bootstrap = 1};
  if (zm_ziti_new(&b.z, loop, &zc) != 0) {
    zm_secret_dispose(&b.jwt);
    return 1;
  }
  uv_update_time(loop);
  b.deadline = uv_now(loop) + cfg->enroll_timeout_ms;
  zm_ziti_fetch_ca_bundle(b.z, b.deadline, on_cacerts, &b);
  uv_run(loop, UV_RUN_DEFAULT);
  if (!b.done) {
    ZM_ERROR("bootstrap: stopped before enrollment finished");
    b.rc = 1;
  }
  zm_secret_dispose(&b.jwt);
  zm_secret_dispose(&b.key_pem);
  zm_jwt_claims_dispose(&b.claims);
  free(b.csr_pem);
  free(b.ca_pem);
  free(b.pinned);
  return b.rc;
}
