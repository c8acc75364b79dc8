/*
 * client_sim_test.c - the controller client against the controller
 * simulator (test/sim/ziti_sim.py): real TLS, real sockets, faults injected
 * through the simulator's control port. Every test runs its own loop and
 * ends with uv_loop_close() == 0.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "zm/crypto.h"
#include "zm/log.h"
#include "zm/workers.h"
#include "zm/ziti.h"
#include "zm/zm.h"

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- the simulator process
 * ---------------------------------------------------- */

typedef struct {
  pid_t pid;
  char dir[256];
  char url[128];
  char ca_file[512], cert_file[512], key_file[512], server_cert_file[512];
  int ctl_port;
} sim_t;

static sim_t g_sim;
static int g_have_sim;

static void sim_path(char *out, size_t cap) {
  const char *env = getenv("ZM_ZITI_SIM");
  if (env) {
    snprintf(out, cap, "%s", env);
    return;
  }
  /* __FILE__ is <root>/test/unit/ziti/client_sim_test.c */
  snprintf(out, cap, "%s", __FILE__);
  char *p = strstr(out, "test/unit/ziti/");
  if (p)
    snprintf(p, cap - (size_t)(p - out), "test/sim/ziti_sim.py");
}

static int group_setup(void **state) {
  (void)state;
  char path[512];
  sim_path(path, sizeof(path));
  struct stat st;
  if (stat(path, &st) != 0) {
    /* part of the project: its absence is a failure, never a skip */
    fprintf(stderr, "controller simulator %s not found\n", path);
    return -1;
  }
  snprintf(g_sim.dir, sizeof(g_sim.dir), "/tmp/zm-ziti-sim-XXXXXX");
  if (mkdtemp(g_sim.dir) == NULL)
    return -1;
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    execl("/usr/bin/python3", "python3", path, "--dir", g_sim.dir, "--port",
          "0", "--ctl-port", "0", (char *)NULL);
    _exit(127);
  }
  g_sim.pid = pid;
  char info[600];
  snprintf(info, sizeof(info), "%s/sim.json", g_sim.dir);
  for (int i = 0; i < 300; i++) { /* up to 30 s for key generation */
    json_t *j = json_load_file(info, 0, NULL);
    if (j) {
      snprintf(g_sim.url, sizeof(g_sim.url), "%s",
               json_string_value(json_object_get(j, "url")));
      snprintf(g_sim.ca_file, sizeof(g_sim.ca_file), "%s",
               json_string_value(json_object_get(j, "ca_file")));
      snprintf(g_sim.cert_file, sizeof(g_sim.cert_file), "%s",
               json_string_value(json_object_get(j, "cert_file")));
      snprintf(g_sim.key_file, sizeof(g_sim.key_file), "%s",
               json_string_value(json_object_get(j, "key_file")));
      snprintf(g_sim.server_cert_file, sizeof(g_sim.server_cert_file), "%s",
               json_string_value(json_object_get(j, "server_cert_file")));
      g_sim.ctl_port = (int)json_integer_value(json_object_get(j, "ctl_port"));
      json_decref(j);
      g_have_sim = 1;
      return 0;
    }
    if (waitpid(pid, NULL, WNOHANG) == pid) {
      fprintf(stderr, "simulator exited early\n");
      return -1;
    }
    usleep(100 * 1000);
  }
  fprintf(stderr, "simulator did not start\n");
  return -1;
}

static int group_teardown(void **state) {
  (void)state;
  if (g_sim.pid > 0) {
    kill(g_sim.pid, SIGTERM);
    waitpid(g_sim.pid, NULL, 0);
  }
  return 0;
}

/* A blocking HTTP/1.1 request to the control port; returns the status and
 * the body (malloc'd) in *body when body != NULL. */
static int ctl(const char *method, const char *path, const char *json,
               char **body) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)g_sim.ctl_port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
  char req[4096];
  size_t jl = json ? strlen(json) : 0;
  int n = snprintf(req, sizeof(req),
                   "%s %s HTTP/1.1\r\nHost: ctl\r\nContent-Type: "
                   "application/json\r\nContent-Length: %zu\r\nConnection: "
                   "close\r\n\r\n%s",
                   method, path, jl, json ? json : "");
  assert_true(n > 0 && (size_t)n < sizeof(req));
  assert_int_equal(write(fd, req, (size_t)n), n);
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (len + 4096 > cap)
      buf = realloc(buf, cap *= 2);
    ssize_t k = read(fd, buf + len, cap - len - 1);
    if (k < 0 && errno == EINTR)
      continue;
    if (k <= 0)
      break;
    len += (size_t)k;
  }
  close(fd);
  buf[len] = '\0';
  int status = 0;
  sscanf(buf, "HTTP/1.1 %d", &status);
  if (body) {
    char *b = strstr(buf, "\r\n\r\n");
    *body = strdup(b ? b + 4 : "");
  }
  free(buf);
  return status;
}

static void sim_reset(void) {
  assert_int_equal(ctl("POST", "/reset", "{}", NULL), 200);
  assert_int_equal(ctl("POST", "/refuse", "{\"on\":false}", NULL), 200);
}

static void sim_faults(const char *json) {
  assert_int_equal(ctl("POST", "/faults", json, NULL), 200);
}

/* Number of (non-admin) identities the simulator holds. */
static size_t sim_identity_count(void) {
  char *b = NULL;
  assert_int_equal(ctl("GET", "/state", NULL, &b), 200);
  json_t *j = json_loads(b, 0, NULL);
  free(b);
  assert_non_null(j);
  size_t n = json_array_size(json_object_get(j, "identities"));
  json_decref(j);
  return n;
}

#define NEED_SIM()                                                             \
  do {                                                                         \
    if (!g_have_sim)                                                           \
      fail_msg("the controller simulator did not start");                      \
  } while (0)

/* ---- loop helpers
 * ------------------------------------------------------------------ */

typedef struct {
  int done;
  int in_call; /* set around the call: the callback must not see it */
  int err, status, gone;
  char code[64];
  char message[512];
  char id[64];
  char *jwt;
  char *cert;
  char *bundle;
  size_t n;
  char **ids, **names;
  zm_ziti_t *z;
  unsigned max_open; /* for the concurrency test */
} res_t;

static void on_res(const zm_ziti_result_t *r, void *data) {
  res_t *o = data;
  assert_false(o->in_call);
  assert_int_equal(o->done, 0);
  o->done = 1;
  o->err = r->err;
  o->status = r->http_status;
  o->gone = r->gone;
  snprintf(o->code, sizeof(o->code), "%s", r->code ? r->code : "");
  snprintf(o->message, sizeof(o->message), "%s", r->message ? r->message : "");
  snprintf(o->id, sizeof(o->id), "%s", r->id ? r->id : "");
  if (r->jwt && r->jwt->base)
    o->jwt = strdup(r->jwt->base);
  if (r->cert_pem)
    o->cert = strdup(r->cert_pem);
  if (o->z && zm_ziti_ca_bundle(o->z))
    o->bundle = strdup(zm_ziti_ca_bundle(o->z));
  o->n = r->n_ids;
  if (r->n_ids) {
    o->ids = calloc(r->n_ids, sizeof(char *));
    o->names = calloc(r->n_ids, sizeof(char *));
    for (size_t i = 0; i < r->n_ids; i++) {
      o->ids[i] = strdup(r->ids[i]);
      o->names[i] = strdup(r->names[i]);
    }
  }
}

static void res_free(res_t *o) {
  free(o->jwt);
  free(o->cert);
  free(o->bundle);
  for (size_t i = 0; i < o->n; i++) {
    free(o->ids[i]);
    free(o->names[i]);
  }
  free(o->ids);
  free(o->names);
  memset(o, 0, sizeof(*o));
}

/* Runs the loop until *flag becomes non-zero (or 60 s pass: a failure). */
static void run_until(uv_loop_t *loop, const int *flag) {
  uint64_t t0 = uv_hrtime();
  while (!*flag) {
    uv_run(loop, UV_RUN_ONCE);
    if (uv_hrtime() - t0 > 60ull * 1000000000ull)
      fail_msg("timed out waiting for a callback");
  }
}

#define CALL(o, expr)                                                          \
  do {                                                                         \
    (o)->in_call = 1;                                                          \
    expr;                                                                      \
    (o)->in_call = 0;                                                          \
  } while (0)

typedef struct {
  uv_loop_t loop;
  zm_ziti_t *z;
} env_t;

/* A loop and a client on cfg; every unset file is the simulator's. */
static void env_open_cfg(env_t *e, zm_ziti_config_t cfg) {
  assert_int_equal(uv_loop_init(&e->loop), 0);
  if (cfg.controller_url == NULL)
    cfg.controller_url = g_sim.url;
  if (cfg.ca_file == NULL)
    cfg.ca_file = g_sim.ca_file;
  if (cfg.cert_file == NULL)
    cfg.cert_file = g_sim.cert_file;
  if (cfg.key_file == NULL)
    cfg.key_file = g_sim.key_file;
  assert_int_equal(zm_ziti_new(&e->z, &e->loop, &cfg), 0);
}

static void env_open(env_t *e, const char *ca_file, unsigned pool,
                     uint64_t idle_ms) {
  assert_int_equal(uv_loop_init(&e->loop), 0);
  zm_ziti_config_t cfg = {
      .controller_url = g_sim.url,
      .ca_file = ca_file ? ca_file : g_sim.ca_file,
      .cert_file = g_sim.cert_file,
      .key_file = g_sim.key_file,
      .pool_size = pool,
      .idle_timeout_ms = idle_ms,
  };
  assert_int_equal(zm_ziti_new(&e->z, &e->loop, &cfg), 0);
}

static void on_wait_timer(uv_timer_t *t) { *(int *)t->data = 1; }

static void on_closed(void *data) { *(int *)data = 1; }

static void env_close(env_t *e) {
  int closed = 0;
  zm_ziti_close(e->z, on_closed, &closed);
  run_until(&e->loop, &closed);
  /* the handles closed last are reaped by one more turn */
  uv_run(&e->loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&e->loop), 0);
}

static void create(env_t *e, const char *name, const char *ext, res_t *o) {
  static const char *const roles[] = {"svc", "gw"};
  memset(o, 0, sizeof(*o));
  CALL(o, zm_ziti_create_identity(e->z, name, roles, 2, ext, 0, on_res, o));
  run_until(&e->loop, &o->done);
}

/* ---- tests
 * ------------------------------------------------------------------------- */

static void test_bad_config(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  zm_ziti_t *z = NULL;
  zm_ziti_config_t cfg = {.controller_url = "ftp://127.0.0.1:1",
                          .ca_file = g_sim.ca_file};
  assert_int_equal(zm_ziti_new(&z, &loop, &cfg), ZM_E_INVAL);
  cfg.controller_url = "127.0.0.1:1";
  assert_int_equal(zm_ziti_new(&z, &loop, &cfg), ZM_E_INVAL);
  cfg.controller_url = "https://:443";
  assert_int_equal(zm_ziti_new(&z, &loop, &cfg), ZM_E_INVAL);
  cfg.controller_url = "https://127.0.0.1:99999";
  assert_int_equal(zm_ziti_new(&z, &loop, &cfg), ZM_E_INVAL);
  cfg.controller_url = "https://127.0.0.1:1/edge";
  cfg.ca_file = "/nonexistent/ca.pem";
  assert_int_equal(zm_ziti_new(&z, &loop, &cfg), ZM_E_TLS);
  assert_null(z);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* The Go service keeps only the URL's host and port and always speaks
 * https: an http:// URL reaches the controller over TLS all the same. */
static void test_http_url_is_https(void **state) {
  (void)state;
  NEED_SIM();
  char url[sizeof g_sim.url];
  assert_int_equal(strncmp(g_sim.url, "https://", 8), 0);
  memcpy(url, "HTTP://", 7);
  memcpy(url + 7, g_sim.url + 8, strlen(g_sim.url + 8) + 1);
  env_t e;
  env_open_cfg(&e, (zm_ziti_config_t){.controller_url = url});
  res_t o;
  create(&e, "http-url", NULL, &o);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.status, 201);
  res_free(&o);
  env_close(&e);
}

static void test_identity_lifecycle(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 4, 0);
  res_t o;

  create(&e, "life-1", "ext-1", &o);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.status, 201);
  assert_true(strlen(o.id) >= 9);
  char id[64];
  snprintf(id, sizeof(id), "%s", o.id);
  res_free(&o);

  /* duplicate name */
  create(&e, "life-1", NULL, &o);
  assert_int_equal(o.err, ZM_E_EXISTS);
  assert_string_equal(o.code, "COULD_NOT_VALIDATE");
  res_free(&o);

  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_non_null(o.jwt);
  assert_int_equal(strncmp(o.jwt, "eyJ", 3), 0);
  assert_non_null(strchr(o.jwt, '.'));
  res_free(&o);

  size_t der_len = 0;
  const uint8_t *der = zm_ziti_server_cert(e.z, &der_len);
  assert_non_null(der);
  assert_true(der_len > 100);
  assert_int_equal(der[0], 0x30);

  CALL(&o, zm_ziti_find_identities(e.z, "name", "life-1", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 1);
  assert_string_equal(o.ids[0], id);
  assert_string_equal(o.names[0], "life-1");
  res_free(&o);

  CALL(&o, zm_ziti_find_identities(e.z, "externalId", "ext-1", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 1);
  assert_string_equal(o.ids[0], id);
  res_free(&o);

  /* quoting: a value with quotes and backslashes matches nothing, cleanly */
  CALL(&o,
       zm_ziti_find_identities(e.z, "name", "a\"b\\c d&x=1", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 0);
  res_free(&o);

  CALL(&o, zm_ziti_delete_identity(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.gone, 0);
  res_free(&o);

  CALL(&o, zm_ziti_delete_identity(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.gone, 1);
  res_free(&o);

  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_NOT_FOUND);
  assert_int_equal(o.status, 404);
  assert_string_equal(o.code, "NOT_FOUND");
  res_free(&o);

  /* invalid arguments fail too, on a later turn */
  CALL(&o, zm_ziti_find_identities(e.z, "roleAttributes", "x", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_INVAL);
  res_free(&o);
  CALL(&o, zm_ziti_delete_identity(e.z, "", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_INVAL);
  res_free(&o);

  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_true(st.requests >= 9);
  assert_int_equal(st.reauths, 0);
  env_close(&e);
}

static int on_page_done;
static void on_create_page(const zm_ziti_result_t *r, void *data) {
  (void)data;
  assert_int_equal(r->err, 0);
  on_page_done++;
}

static void test_find_paginates(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 8, 0);
  /* externalId "" is not unique: 150 identities share it */
  on_page_done = 0;
  char name[32];
  for (int i = 0; i < 150; i++) {
    snprintf(name, sizeof(name), "page-%03d", i);
    zm_ziti_create_identity(e.z, name, NULL, 0, "", 0, on_create_page, NULL);
  }
  int all = 0;
  while (on_page_done < 150) {
    uv_run(&e.loop, UV_RUN_ONCE);
  }
  (void)all;
  res_t o;
  memset(&o, 0, sizeof(o));
  CALL(&o, zm_ziti_find_identities(e.z, "externalId", "", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 150);
  int seen[150] = {0};
  for (size_t i = 0; i < o.n; i++) {
    int k = -1;
    assert_int_equal(sscanf(o.names[i], "page-%d", &k), 1);
    assert_true(k >= 0 && k < 150);
    assert_int_equal(seen[k], 0);
    seen[k] = 1;
  }
  res_free(&o);
  char *b = NULL;
  assert_int_equal(ctl("GET", "/state", NULL, &b), 200);
  json_t *j = json_loads(b, 0, NULL);
  free(b);
  json_t *counters = json_object_get(j, "counters");
  const char *k;
  json_t *v;
  json_int_t lists = 0;
  json_object_foreach(counters, k, v) {
    if (strncmp(k, "GET ", 4) == 0 && strstr(k, "identities") &&
        !strstr(k, "{"))
      lists += json_integer_value(v);
  }
  json_decref(j);
  assert_int_equal(lists, 2); /* limit 100: two pages */
  env_close(&e);
}

/* Decodes the payload of a JWT and returns its jti (malloc'd). */
static char *jwt_jti(const char *jwt) {
  const char *p = strchr(jwt, '.');
  assert_non_null(p);
  p++;
  const char *q = strchr(p, '.');
  assert_non_null(q);
  size_t n = (size_t)(q - p);
  char *b64 = malloc(n + 4);
  for (size_t i = 0; i < n; i++)
    b64[i] = p[i] == '-' ? '+' : p[i] == '_' ? '/' : p[i];
  while (n % 4)
    b64[n++] = '=';
  b64[n] = '\0';
  static const char tbl[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *out = malloc(n);
  size_t o = 0;
  unsigned acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n && b64[i] != '='; i++) {
    const char *c = strchr(tbl, b64[i]);
    assert_non_null(c);
    acc = (acc << 6) | (unsigned)(c - tbl);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (char)((acc >> bits) & 0xff);
    }
  }
  free(b64);
  json_t *j = json_loadb(out, o, 0, NULL);
  free(out);
  assert_non_null(j);
  char *jti = strdup(json_string_value(json_object_get(j, "jti")));
  json_decref(j);
  return jti;
}

static void test_enroll_and_cacerts(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 2, 0);
  res_t o;
  memset(&o, 0, sizeof(o));
  o.z = e.z;
  CALL(&o, zm_ziti_fetch_ca_bundle(e.z, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_non_null(o.bundle);
  assert_non_null(strstr(o.bundle, "-----BEGIN CERTIFICATE-----"));
  assert_non_null(zm_ziti_ca_bundle(e.z));
  res_free(&o);

  create(&e, "enr-1", NULL, &o);
  assert_int_equal(o.err, 0);
  char id[64];
  snprintf(id, sizeof(id), "%s", o.id);
  res_free(&o);
  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  char *jti = jwt_jti(o.jwt);
  res_free(&o);

  zm_secret_t key = {0};
  char *csr = NULL;
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, id, &key, &csr), 0);
  CALL(&o, zm_ziti_enroll_ott(e.z, jti, csr, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_non_null(o.cert);
  assert_non_null(strstr(o.cert, "-----BEGIN CERTIFICATE-----"));
  res_free(&o);

  /* the token is used up */
  CALL(&o, zm_ziti_enroll_ott(e.z, jti, csr, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_INVAL);
  assert_string_equal(o.code, "INVALID_ENROLLMENT_TOKEN");
  assert_null(strstr(o.message, jti)); /* never echoes the token */
  res_free(&o);

  /* after enrollment the identity has no pending ott */
  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_null(o.jwt);
  res_free(&o);

  free(jti);
  free(csr);
  zm_secret_dispose(&key);
  env_close(&e);
}

static void test_reauth_after_expiry(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 2, 0);
  res_t o;
  create(&e, "re-1", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_stats_t s0, s1;
  zm_ziti_get_stats(e.z, &s0);
  assert_int_equal(ctl("POST", "/expire_sessions", "{}", NULL), 200);
  create(&e, "re-2", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.reauths - s0.reauths, 1);
  /* the new session serves later calls without another re-auth */
  create(&e, "re-3", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s0);
  assert_int_equal(s0.reauths, s1.reauths);
  env_close(&e);
}

static void copy_file(const char *from, const char *to) {
  FILE *in = fopen(from, "rb");
  assert_non_null(in);
  char tmp[600];
  snprintf(tmp, sizeof tmp, "%s.tmp", to);
  FILE *out = fopen(tmp, "wb");
  assert_non_null(out);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, in)) > 0)
    assert_int_equal(fwrite(buf, 1, n, out), n);
  fclose(in);
  assert_int_equal(fclose(out), 0);
  assert_int_equal(rename(tmp, to), 0);
}

/* A 401 makes the client read the certificate, key and CA files again
 * before it logs in (behaviour.md §1.3): an admin certificate renewed on
 * disk is picked up without a restart. Files that cannot be loaded leave
 * the ones read before in use, and a later 401 reads them again. */
static void test_reauth_reads_renewed_credentials(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  char dir[] = "/tmp/zm-creds-XXXXXX";
  assert_non_null(mkdtemp(dir));
  char cert[600], key[600];
  snprintf(cert, sizeof cert, "%s/admin.pem", dir);
  snprintf(key, sizeof key, "%s/admin.key", dir);
  copy_file(g_sim.cert_file, cert);
  copy_file(g_sim.key_file, key);
  env_t e;
  env_open_cfg(&e, (zm_ziti_config_t){
                       .cert_file = cert, .key_file = key, .pool_size = 2});
  res_t o;
  create(&e, "creds-1", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);

  /* the operator renews the certificate: the controller accepts only the
   * new one and ends the sessions; our copy is not updated yet, and a key
   * that does not load is put in its place */
  assert_int_equal(ctl("POST", "/rotate_admin_cert", "{}", NULL), 200);
  FILE *f = fopen(key, "w");
  assert_non_null(f);
  fputs("-----BEGIN EC PRIVATE KEY-----\nbm90IGEga2V5\n"
        "-----END EC PRIVATE KEY-----\n",
        f);
  assert_int_equal(fclose(f), 0);
  zm_ziti_stats_t s0, s1;
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "creds-2", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAUTHORIZED); /* the old certificate */
  assert_int_equal(o.status, 401);
  res_free(&o);

  /* the renewed files arrive: the next 401 reads them */
  copy_file(g_sim.cert_file, cert);
  copy_file(g_sim.key_file, key);
  create(&e, "creds-3", NULL, &o);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.status, 201);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_true(s1.connects > s0.connects); /* new ones present the new cert */

  /* and again, now with good files from the start: one re-auth */
  assert_int_equal(ctl("POST", "/rotate_admin_cert", "{}", NULL), 200);
  copy_file(g_sim.cert_file, cert);
  copy_file(g_sim.key_file, key);
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "creds-4", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.reauths - s0.reauths, 1);
  env_close(&e);
  unlink(cert);
  unlink(key);
  rmdir(dir);
}

static void test_server_errors(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 2, 0);
  res_t o;
  create(&e, "warm", NULL, &o); /* authenticate first */
  assert_int_equal(o.err, 0);
  res_free(&o);

  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":500,\"count\":1}]}");
  create(&e, "e-500", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  assert_int_equal(o.status, 500);
  assert_string_equal(o.code, "UNHANDLED");
  assert_non_null(strstr(o.message, "500"));
  res_free(&o);

  /* 429 with Retry-After: 1 -> retried after a second, then succeeds */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":429,\"retry_after\":1,\"count\":1}]}");
  zm_ziti_stats_t s0, s1;
  zm_ziti_get_stats(e.z, &s0);
  uint64_t t0 = uv_hrtime();
  create(&e, "e-429", NULL, &o);
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  assert_int_equal(o.err, 0);
  assert_int_equal(o.status, 201);
  assert_true(ms >= 900); /* a lower bound: Retry-After was honoured */
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries - s0.retries, 1);

  /* 503 TIMEOUT on a create: the controller's handler went on and created
   * the identity (apply). Sent again, it would answer "exists" for our own
   * identity: it is not re-sent, and fails as a 503 (unanswered) */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":503,\"apply\":true,\"count\":1}]}");
  size_t had = sim_identity_count();
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "e-503-landed", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  assert_int_equal(o.status, 503);
  assert_string_equal(o.code, "TIMEOUT");
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries, s0.retries);
  assert_int_equal(sim_identity_count(), had + 1);
  CALL(&o, zm_ziti_find_identities(e.z, "name", "e-503-landed", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 1);
  res_free(&o);

  /* 503 CLUSTER_HAS_NO_LEADER refuses before running: a create is re-sent */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":503,\"code\":\"CLUSTER_HAS_NO_LEADER\","
             "\"retry_after\":0,\"count\":1}]}");
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "e-503-noleader", NULL, &o);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.status, 201);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries - s0.retries, 1);

  /* 503 TIMEOUT on a read: re-sending it changes nothing, so it is */
  sim_faults("{\"rules\":[{\"method\":\"GET\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":503,\"retry_after\":0,\"count\":1}]}");
  zm_ziti_get_stats(e.z, &s0);
  CALL(&o,
       zm_ziti_find_identities(e.z, "name", "e-503-noleader", 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_int_equal(o.n, 1);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries - s0.retries, 1);

  /* 503 forever with a short deadline: fails UNAVAILABLE before it */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"status\","
             "\"status\":503}]}");
  /* (no time is asserted: a client that ignored the deadline would retry
   * forever and run_until() would fail) */
  memset(&o, 0, sizeof(o));
  CALL(&o, zm_ziti_create_identity(e.z, "e-503", NULL, 0, NULL,
                                   uv_now(&e.loop) + 1000, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  assert_int_equal(o.status, 503);
  res_free(&o);
  sim_faults("{}");
  env_close(&e);
}

static void test_drops(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 1, 0);
  res_t o;
  create(&e, "warm", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);

  /* a reused connection dropped before any response byte: an idempotent
   * request (GET) is retried once on a fresh connection */
  char wid[64];
  create(&e, "warm-get", NULL, &o);
  assert_int_equal(o.err, 0);
  snprintf(wid, sizeof wid, "%s", o.id);
  res_free(&o);
  sim_faults("{\"rules\":[{\"method\":\"GET\",\"path_prefix\":"
             "\"/edge/management/v1/identities/\",\"action\":\"drop\","
             "\"count\":1}]}");
  zm_ziti_stats_t s0, s1;
  zm_ziti_get_stats(e.z, &s0);
  memset(&o, 0, sizeof o);
  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, wid, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  assert_non_null(o.jwt);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries - s0.retries, 1);

  /* ... but a create POST is never re-sent blindly (the controller may have
   * carried it out): the caller gets an error and compensates */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"drop\","
             "\"count\":1}]}");
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "d-1", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries, s0.retries);

  /* GET dropped every time: one retry, then an error */
  sim_faults("{\"rules\":[{\"method\":\"GET\",\"path_prefix\":"
             "\"/edge/management/v1/identities/\",\"action\":\"drop\"}]}");
  create(&e, "warm-3", NULL, &o); /* a reusable connection again */
  res_free(&o);
  zm_ziti_get_stats(e.z, &s0);
  memset(&o, 0, sizeof o);
  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, wid, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries - s0.retries, 1);

  /* closed in the middle of the response: an error, never retried */
  sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
             "\"/edge/management/v1/identities\",\"action\":\"drop_mid\"}]}");
  create(&e, "warm-2", NULL, &o); /* fails, but leaves no idle connection */
  res_free(&o);
  zm_ziti_get_stats(e.z, &s0);
  create(&e, "d-3", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  assert_non_null(strstr(o.message, "middle"));
  res_free(&o);
  zm_ziti_get_stats(e.z, &s1);
  assert_int_equal(s1.retries, s0.retries);
  sim_faults("{}");
  env_close(&e);
}

static void test_deadline_timeout(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 2, 0);
  res_t o;
  create(&e, "t-1", NULL, &o);
  assert_int_equal(o.err, 0);
  char id[64];
  snprintf(id, sizeof(id), "%s", o.id);
  res_free(&o);
  sim_faults("{\"latency_ms\":3000}");
  memset(&o, 0, sizeof(o));
  /* the deadline counts from now, not from the loop's cached time */
  uv_update_time(&e.loop);
  uint64_t t0 = uv_hrtime();
  CALL(&o,
       zm_ziti_get_enrollment_jwt(e.z, id, uv_now(&e.loop) + 300, on_res, &o));
  run_until(&e.loop, &o.done);
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  /* TIMEOUT, not the answer that comes after 3 s; and not before the
   * deadline (a lower bound only: how fast is the machine's business) */
  assert_int_equal(o.err, ZM_E_TIMEOUT);
  assert_true(ms >= 250);
  res_free(&o);
  sim_faults("{}");
  /* the client is still usable */
  CALL(&o, zm_ziti_get_enrollment_jwt(e.z, id, 0, on_res, &o));
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  res_free(&o);
  env_close(&e);
}

static void test_refused(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  /* One connection: a second one still in its handshake when the simulator
   * starts refusing would survive and serve the call. */
  env_open(&e, NULL, 1, 0);
  res_t o;
  create(&e, "r-1", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  assert_int_equal(ctl("POST", "/refuse", "{\"on\":true}", NULL), 200);
  create(&e, "r-2", NULL, &o);
  assert_int_equal(o.err, ZM_E_UNAVAILABLE);
  res_free(&o);
  assert_int_equal(ctl("POST", "/refuse", "{\"on\":false}", NULL), 200);
  create(&e, "r-3", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  env_close(&e);
}

static int conc_ok, conc_done;
static unsigned conc_max_open;
static zm_ziti_t *conc_z;
static void on_conc(const zm_ziti_result_t *r, void *data) {
  (void)data;
  conc_done++;
  if (r->err == 0 && r->id && r->id[0])
    conc_ok++;
  else
    fprintf(stderr, "create failed: %s\n", r->message ? r->message : "?");
  zm_ziti_stats_t st;
  zm_ziti_get_stats(conc_z, &st);
  if (st.open_conns > conc_max_open)
    conc_max_open = st.open_conns;
}

static void test_concurrent_creates(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 8, 0);
  conc_ok = conc_done = 0;
  conc_max_open = 0;
  conc_z = e.z;
  char name[32];
  for (int i = 0; i < 200; i++) {
    snprintf(name, sizeof(name), "conc-%03d", i);
    zm_ziti_create_identity(e.z, name, NULL, 0, NULL, 0, on_conc, NULL);
  }
  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_true(st.open_conns <= 8);
  assert_true(st.queued >= 1); /* waiting for auth or a connection */
  uint64_t t0 = uv_hrtime();
  while (conc_done < 200) {
    uv_run(&e.loop, UV_RUN_ONCE);
    assert_true(uv_hrtime() - t0 < 60ull * 1000000000ull);
  }
  assert_int_equal(conc_ok, 200);
  assert_true(conc_max_open <= 8);
  assert_true(conc_max_open >= 2);
  zm_ziti_get_stats(e.z, &st);
  assert_true(st.connects <= 8);
  assert_int_equal(st.failures, 0);
  assert_int_equal(sim_identity_count(), 200);
  env_close(&e);
}

/* Writes a self-signed CA that is not the simulator's into the simulator's
 * scratch directory (the test reads no file of the host) and returns its
 * path (static buffer). */
static const char *other_ca(void) {
  static char pem[600];
  char cmd[2048];
  snprintf(pem, sizeof(pem), "%s/other-ca.pem", g_sim.dir);
  snprintf(cmd, sizeof(cmd),
           "/usr/bin/openssl req -x509 -newkey ec -pkeyopt "
           "ec_paramgen_curve:P-256 -nodes -keyout '%s/other-ca.key' "
           "-out '%s' -subj /CN=other-ca -days 2 "
           "-addext basicConstraints=critical,CA:TRUE "
           "-addext keyUsage=critical,keyCertSign,cRLSign >/dev/null 2>&1",
           g_sim.dir, pem);
  int st = system(cmd);
  if (st != 0)
    fail_msg("openssl could not make the other CA (status %d): %s", st, cmd);
  return pem;
}

static void test_bad_ca(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  /* a valid bundle that does not hold the simulator's CA */
  env_open(&e, other_ca(), 2, 0);
  res_t o;
  create(&e, "ca-1", NULL, &o);
  assert_int_equal(o.err, ZM_E_TLS);
  assert_true(strlen(o.message) > 0);
  res_free(&o);
  size_t len = 1;
  assert_null(zm_ziti_server_cert(e.z, &len));
  assert_int_equal(len, 0);
  assert_int_equal(sim_identity_count(), 0);
  env_close(&e);
}

static void test_close_fails_pending(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 2, 0);
  sim_faults("{\"latency_ms\":2000}");
  res_t a, b;
  memset(&a, 0, sizeof(a));
  memset(&b, 0, sizeof(b));
  zm_ziti_create_identity(e.z, "x-1", NULL, 0, NULL, 0, on_res, &a);
  zm_ziti_fetch_ca_bundle(e.z, 0, on_res, &b);
  uv_run(&e.loop, UV_RUN_NOWAIT);
  int closed = 0;
  zm_ziti_close(e.z, on_closed, &closed);
  assert_int_equal(a.done, 0); /* deferred */
  run_until(&e.loop, &closed);
  assert_int_equal(a.done, 1);
  assert_int_equal(a.err, ZM_E_SHUTDOWN);
  assert_int_equal(b.done, 1);
  assert_int_equal(b.err, ZM_E_SHUTDOWN);
  res_free(&a);
  res_free(&b);
  uv_run(&e.loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&e.loop), 0);
  sim_faults("{}");
}

/* wolfSSL 5.5.4 (Debian) must match IP SANs: tls.c relies on it for IP hosts.
 */
static void test_ip_san_check(void **state) {
  (void)state;
  NEED_SIM();
  WOLFSSL_X509 *x = wolfSSL_X509_load_certificate_file(g_sim.server_cert_file,
                                                       WOLFSSL_FILETYPE_PEM);
  assert_non_null(x);
  assert_int_equal(wolfSSL_X509_check_ip_asc(x, "127.0.0.1", 0), 1);
  assert_int_not_equal(wolfSSL_X509_check_ip_asc(x, "127.0.0.2", 0), 1);
  assert_int_not_equal(wolfSSL_X509_check_ip_asc(x, "10.0.0.1", 0), 1);
  wolfSSL_X509_free(x);
}

/* The DNS-name path: SNI + wolfSSL_check_domain_name against "localhost". */
static void test_dns_host(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  char url[160];
  const char *port = strrchr(g_sim.url, ':');
  snprintf(url, sizeof(url), "https://localhost%s", port);
  env_t e;
  env_open_cfg(&e, (zm_ziti_config_t){.controller_url = url});
  res_t o;
  create(&e, "dns-1", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  env_close(&e);
}

static void test_idle_close_and_queue_bound(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  assert_int_equal(uv_loop_init(&e.loop), 0);
  zm_ziti_config_t cfg = {.controller_url = g_sim.url,
                          .ca_file = g_sim.ca_file,
                          .cert_file = g_sim.cert_file,
                          .key_file = g_sim.key_file,
                          .pool_size = 1,
                          .queue_max = 2,
                          .idle_timeout_ms = 200};
  assert_int_equal(zm_ziti_new(&e.z, &e.loop, &cfg), 0);
  res_t o[5];
  memset(o, 0, sizeof(o));
  char name[16];
  for (int i = 0; i < 5; i++) {
    snprintf(name, sizeof(name), "q-%d", i);
    CALL(&o[i],
         zm_ziti_create_identity(e.z, name, NULL, 0, NULL, 0, on_res, &o[i]));
  }
  int ok = 0, full = 0;
  for (int i = 0; i < 5; i++) {
    run_until(&e.loop, &o[i].done);
    if (o[i].err == 0)
      ok++;
    else if (o[i].err == ZM_E_UNAVAILABLE && strstr(o[i].message, "queue"))
      full++;
    res_free(&o[i]);
  }
  assert_int_equal(ok + full, 5);
  assert_true(ok >= 1);
  assert_true(full >= 1);
  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_int_equal(st.open_conns, 1);
  /* idle keep-alive connections close after idle_timeout_ms */
  uv_timer_t t;
  int fired = 0;
  uv_timer_init(&e.loop, &t);
  t.data = &fired;
  uv_timer_start(&t, on_wait_timer, 500, 0);
  run_until(&e.loop, &fired);
  uv_close((uv_handle_t *)&t, NULL);
  zm_ziti_get_stats(e.z, &st);
  assert_int_equal(st.open_conns, 0);
  env_close(&e);
}

/* A connection opened after the idle one closed resumes the TLS session of
 * the first (no certificate chain to verify on the loop), and the client
 * still knows the controller's certificate (the JWT check needs it); a
 * request on it works, and a drop on the resumed connection is handled as
 * on any other. */
static void test_tls_resumption(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  env_open(&e, NULL, 1, 100);
  res_t o;
  create(&e, "resume-1", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_stats_t s0, s1;
  zm_ziti_get_stats(e.z, &s0);
  assert_int_equal(s0.resumed, 0);
  size_t cert_len = 0;
  assert_non_null(zm_ziti_server_cert(e.z, &cert_len));
  for (int round = 0; round < 2; round++) {
    uv_timer_t t;
    int fired = 0;
    uv_timer_init(&e.loop, &t);
    t.data = &fired;
    uv_timer_start(&t, on_wait_timer, 400, 0); /* the idle one closes */
    run_until(&e.loop, &fired);
    uv_close((uv_handle_t *)&t, NULL);
    zm_ziti_get_stats(e.z, &s1);
    assert_int_equal(s1.open_conns, 0);
    if (round == 1)
      sim_faults("{\"rules\":[{\"method\":\"POST\",\"path_prefix\":"
                 "\"/edge/management/v1/identities\",\"action\":\"drop\","
                 "\"count\":1}]}");
    char name[32];
    snprintf(name, sizeof name, "resume-%d", round + 2);
    create(&e, name, NULL, &o);
    if (round == 0)
      assert_int_equal(o.err, 0);
    else /* a create is not re-sent blindly: the drop is the answer */
      assert_int_equal(o.err, ZM_E_UNAVAILABLE);
    res_free(&o);
    zm_ziti_get_stats(e.z, &s1);
    assert_int_equal(s1.connects, s0.connects + (uint64_t)round + 1);
    assert_int_equal(s1.resumed, (uint64_t)round + 1);
    size_t len2 = 0;
    assert_non_null(zm_ziti_server_cert(e.z, &len2));
    assert_int_equal(len2, cert_len);
  }
  sim_faults("{}");
  create(&e, "resume-4", NULL, &o);
  assert_int_equal(o.err, 0);
  res_free(&o);
  env_close(&e);
}

/* ---- TLS handshakes on the crypto workers -------------------------------- */

/* Jobs that hold a worker thread until the gate opens. */
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;

static void gate_set(int open) {
  pthread_mutex_lock(&gate_mu);
  gate_open = open;
  pthread_cond_broadcast(&gate_cv);
  pthread_mutex_unlock(&gate_mu);
}

static void gate_work(zm_work_t *w) {
  (void)w;
  pthread_mutex_lock(&gate_mu);
  while (!gate_open)
    pthread_cond_wait(&gate_cv, &gate_mu);
  pthread_mutex_unlock(&gate_mu);
}

static int gate_done_n;
static void gate_done(zm_work_t *w, int status) {
  (void)w;
  (void)status;
  gate_done_n++;
}

static void workers_closed(void *data) { *(int *)data = 1; }

/* Holds both threads of a 2-thread pool with gated jobs (gate_set(1)
 * releases them); gate_done_n counts their completions from 0. */
static void hold_workers(zm_workers_t *pool, zm_work_t hold[2]) {
  gate_set(0);
  gate_done_n = 0;
  for (int i = 0; i < 2; i++)
    assert_int_equal(zm_workers_queue(pool, &hold[i], gate_work, gate_done), 0);
}

static void env_open_workers_wait(env_t *e, zm_workers_t **pool,
                                  uint64_t wait_ms) {
  assert_int_equal(uv_loop_init(&e->loop), 0);
  assert_int_equal(zm_workers_new(pool, &e->loop, 2, 8), 0);
  zm_ziti_config_t cfg = {.controller_url = g_sim.url,
                          .ca_file = g_sim.ca_file,
                          .cert_file = g_sim.cert_file,
                          .key_file = g_sim.key_file,
                          .pool_size = 1, /* one handshake at a time */
                          .workers = *pool,
                          .handshake_wait_ms = wait_ms};
  assert_int_equal(zm_ziti_new(&e->z, &e->loop, &cfg), 0);
}

/* Held workers in these tests must not be bypassed: a long wait. */
static void env_open_workers(env_t *e, zm_workers_t **pool) {
  env_open_workers_wait(e, pool, 60000);
}

static void on_wait_closed(uv_handle_t *h) { *(int *)h->data = 1; }

/* The client first, then the pool it uses, then the loop. */
static void env_close_workers(env_t *e, zm_workers_t *pool) {
  int closed = 0, wclosed = 0;
  zm_ziti_close(e->z, on_closed, &closed);
  run_until(&e->loop, &closed);
  zm_workers_close(pool, workers_closed, &wclosed);
  run_until(&e->loop, &wclosed);
  uv_run(&e->loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&e->loop), 0);
}

/* Runs the loop for ms milliseconds. */
static void run_for(uv_loop_t *loop, uint64_t ms) {
  uv_timer_t t;
  int fired = 0;
  uv_timer_init(loop, &t);
  t.data = &fired;
  uv_timer_start(&t, on_wait_timer, ms, 0);
  run_until(loop, &fired);
  /* the handle lives on this stack frame: closed before it returns */
  int closed = 0;
  t.data = &closed;
  uv_close((uv_handle_t *)&t, on_wait_closed);
  run_until(loop, &closed);
}

/* With a worker pool, the handshake's steps run on it, not on the loop:
 * while every worker is held, a connection stays in its handshake and the
 * loop goes on; released, the request completes; resumed handshakes run
 * there too. */
static void test_handshake_on_workers(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  zm_workers_t *pool = NULL;
  env_open_workers(&e, &pool);
  zm_work_t hold[2];
  hold_workers(pool, hold);
  res_t o;
  memset(&o, 0, sizeof o);
  zm_ziti_create_identity(e.z, "hs-1", NULL, 0, NULL, 0, on_res, &o);
  run_for(&e.loop, 500);
  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_int_equal(o.done, 0);
  assert_int_equal(st.open_conns, 1);
  assert_int_equal(st.handshake_steps_offloaded, 1); /* the ClientHello's */
  assert_int_equal(st.handshake_steps_inline, 0);
  assert_int_equal(zm_workers_queued(pool), 1);
  gate_set(1);
  run_until(&e.loop, &o.done);
  assert_int_equal(o.err, 0);
  res_free(&o);
  assert_int_equal(gate_done_n, 2);
  zm_ziti_get_stats(e.z, &st);
  assert_true(st.handshake_steps_offloaded >= 2);
  assert_int_equal(st.handshake_steps_inline, 0);
  size_t len = 0;
  assert_non_null(zm_ziti_server_cert(e.z, &len));
  env_close_workers(&e, pool);
}

/* A connection whose handshake step is queued when the client or the pool
 * closes: the client's close takes the step back from the queue and does
 * not wait for the workers; a cancelled step fails the request, and a pool
 * that refuses jobs leaves the handshake to the loop. */
static void test_handshake_close_while_on_workers(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  /* 1: the client closes while the step is queued behind held workers */
  env_t e;
  zm_workers_t *pool = NULL;
  env_open_workers(&e, &pool);
  zm_work_t hold[2];
  hold_workers(pool, hold);
  res_t a;
  memset(&a, 0, sizeof a);
  zm_ziti_create_identity(e.z, "hs-close-1", NULL, 0, NULL, 0, on_res, &a);
  run_for(&e.loop, 300);
  assert_int_equal(zm_workers_queued(pool), 1);
  int closed = 0;
  zm_ziti_close(e.z, on_closed, &closed);
  run_until(&e.loop, &closed); /* with the workers still held */
  assert_int_equal(a.done, 1);
  assert_int_equal(a.err, ZM_E_SHUTDOWN);
  res_free(&a);
  assert_int_equal(zm_workers_queued(pool), 0); /* the step left the queue */
  gate_set(1);
  int wclosed = 0;
  zm_workers_close(pool, workers_closed, &wclosed);
  run_until(&e.loop, &wclosed);
  uv_run(&e.loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&e.loop), 0);

  /* 2: the pool closes while the step is queued: the step is cancelled,
   * which fails the connection and the oldest request waiting for one (the
   * CA-bundle fetch the client starts with); the others go on over a new
   * connection whose handshake runs on the loop, as the pool refuses jobs */
  env_open_workers(&e, &pool);
  hold_workers(pool, hold);
  memset(&a, 0, sizeof a);
  zm_ziti_create_identity(e.z, "hs-close-2", NULL, 0, NULL, 0, on_res, &a);
  run_for(&e.loop, 300);
  assert_int_equal(zm_workers_queued(pool), 1);
  wclosed = 0;
  zm_workers_close(pool, workers_closed, &wclosed);
  run_until(&e.loop, &a.done);
  assert_int_equal(a.err, 0);
  res_free(&a);
  gate_set(1);
  run_until(&e.loop, &wclosed);
  res_t b;
  create(&e, "hs-close-3", NULL, &b);
  assert_int_equal(b.err, 0);
  res_free(&b);
  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_int_equal(st.handshake_steps_offloaded, 1);
  assert_true(st.handshake_steps_inline >= 2);
  assert_int_equal(sim_identity_count(), 2);
  env_close(&e);
}

/* Workers that never get to the step (held here; at idle priority, a
 * saturated core starves them) do not stall the client: a step no worker
 * has started within handshake_wait_ms is taken back and run on the loop. */
static void test_handshake_taken_back_from_starved_workers(void **state) {
  (void)state;
  NEED_SIM();
  sim_reset();
  env_t e;
  zm_workers_t *pool = NULL;
  env_open_workers_wait(&e, &pool, 200);
  zm_work_t hold[2];
  hold_workers(pool, hold);
  res_t o;
  create(&e, "hs-steal-1", NULL, &o); /* with the workers still held */
  assert_int_equal(o.err, 0);
  res_free(&o);
  zm_ziti_stats_t st;
  zm_ziti_get_stats(e.z, &st);
  assert_int_equal(st.handshake_steps_offloaded, 0);
  assert_true(st.handshake_steps_inline >= 2);
  assert_int_equal(gate_done_n, 0);
  gate_set(1);
  env_close_workers(&e, pool);
  assert_int_equal(gate_done_n, 2);
}

int main(void) {
  if (getenv("ZM_TEST_DEBUG"))
    zm_log_set_level(ZM_LOG_DEBUG);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bad_config),
      cmocka_unit_test(test_http_url_is_https),
      cmocka_unit_test(test_identity_lifecycle),
      cmocka_unit_test(test_find_paginates),
      cmocka_unit_test(test_enroll_and_cacerts),
      cmocka_unit_test(test_reauth_after_expiry),
      cmocka_unit_test(test_server_errors),
      cmocka_unit_test(test_reauth_reads_renewed_credentials),
      cmocka_unit_test(test_drops),
      cmocka_unit_test(test_deadline_timeout),
      cmocka_unit_test(test_refused),
      cmocka_unit_test(test_concurrent_creates),
      cmocka_unit_test(test_bad_ca),
      cmocka_unit_test(test_close_fails_pending),
      cmocka_unit_test(test_ip_san_check),
      cmocka_unit_test(test_dns_host),
      cmocka_unit_test(test_idle_close_and_queue_bound),
      cmocka_unit_test(test_tls_resumption),
      cmocka_unit_test(test_handshake_on_workers),
      cmocka_unit_test(test_handshake_close_while_on_workers),
      cmocka_unit_test(test_handshake_taken_back_from_starved_workers),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
