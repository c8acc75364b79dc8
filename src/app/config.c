/* config.c - environment -> zm_config_t (pure; unit-tested). */
#include "zm/config.h"
#include "zm/log.h"
#include "zm/zm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int
fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return ZM_E_INVAL;
}

int zm_duration_parse(const char *s, uint64_t *ms) {
  /* Units in nanoseconds, longest suffix first where prefixes collide. */
  static const struct {
    const char *u;
    double ns;
  } UNITS[] = {{"ns", 1},   {"us", 1e3}, {"\xc2\xb5s", 1e3}, {"\xce\xbcs", 1e3},
               {"ms", 1e6}, {"s", 1e9},  {"m", 60e9},        {"h", 3600e9}};
  if (s == NULL || *s == '\0')
    return ZM_E_INVAL;
  if (*s == '+')
    s++;
  if (*s == '-')
    return ZM_E_INVAL; /* negative durations make no sense here */
  /* The sign comes off first, as in Go: "+0" is zero and a lone "+" is an
   * error (it used to pass the loop below as 0 ms; found by
   * test/fuzz/fuzz_duration.c). */
  if (*s == '\0')
    return ZM_E_INVAL;
  if (strcmp(s, "0") == 0) {
    *ms = 0;
    return 0;
  }
  double total_ns = 0;
  while (*s) {
    if (!((*s >= '0' && *s <= '9') || *s == '.'))
      return ZM_E_INVAL;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || v < 0)
      return ZM_E_INVAL;
    /* strtod also reads exponents ("4E5m") and hex floats ("0x1p3s"),
     * which Go refuses: the number must be digits and one '.' only (found
     * by test/fuzz/fuzz_duration.c). */
    for (const char *c = s; c < end; c++)
      if (!((*c >= '0' && *c <= '9') || *c == '.'))
        return ZM_E_INVAL;
    s = end;
    size_t best = 0;
    double unit = 0;
    for (size_t i = 0; i < ZM_ARRAY_SIZE(UNITS); i++) {
      size_t n = strlen(UNITS[i].u);
      if (strncmp(s, UNITS[i].u, n) == 0 && n > best) {
        best = n;
        unit = UNITS[i].ns;
      }
    }
    if (best == 0)
      return ZM_E_INVAL; /* Go requires a unit on every number */
    s += best;
    total_ns += v * unit;
  }
  if (total_ns > 1e18)
    return ZM_E_INVAL;
  uint64_t r = (uint64_t)((total_ns + 999999.0) / 1e6);
  *ms = r;
  return 0;
}

static int copy_str(char *dst, size_t cap, const char *v, const char *name,
                    char *err, size_t errlen) {
  size_t n = strlen(v);
  if (n >= cap)
    return fail(err, errlen, "%s is too long (max %zu bytes)", name, cap - 1);
  memcpy(dst, v, n + 1);
  return 0;
}

static int env_duration(const char *(*get)(const char *), const char *name,
                        uint64_t *out, int allow_zero, char *err,
                        size_t errlen) {
  const char *v = get(name);
  if (v == NULL || *v == '\0')
    return 0;
  uint64_t ms;
  if (zm_duration_parse(v, &ms) != 0)
    return fail(err, errlen,
                "%s=%s: not a duration (Go syntax, e.g. 300ms, 5m, 1h30m)",
                name, v);
  if (!allow_zero && ms == 0)
    return fail(err, errlen, "%s must be > 0", name);
  *out = ms;
  return 0;
}

static int env_uint(const char *(*get)(const char *), const char *name,
                    uint64_t min, uint64_t max, uint64_t *out, char *err,
                    size_t errlen) {
  const char *v = get(name);
  if (v == NULL || *v == '\0')
    return 0;
  char *end;
  errno = 0;
  unsigned long long x = strtoull(v, &end, 10);
  if (*end != '\0' || errno != 0 || v[0] == '-' || x < min || x > max)
    return fail(err, errlen, "%s=%s: expected an integer in [%llu, %llu]", name,
                v, (unsigned long long)min, (unsigned long long)max);
  *out = x;
  return 0;
}

static void add_type(zm_config_t *cfg, int number, const char *name,
                     const char *role) {
  zm_service_type_t *t = NULL;
  for (size_t i = 0; i < cfg->n_types; i++)
    if (cfg->types[i].number == number)
      t = &cfg->types[i];
  if (t == NULL)
    t = &cfg->types[cfg->n_types++];
  memset(t, 0, sizeof *t);
  t->number = number;
  snprintf(t->name, sizeof t->name, "%s", name);
  snprintf(t->roles[0], sizeof t->roles[0], "%s", role);
  t->n_roles = 1;
}

static int valid_label(const char *s, size_t n) {
  if (n == 0)
    return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
      return 0;
  }
  return 1;
}

/* "4:llm-proxy:llm-proxies,5:tracing:tracing+otel" */
static int parse_service_types(zm_config_t *cfg, const char *v, char *err,
                               size_t errlen) {
  char buf[1024];
  if (strlen(v) >= sizeof buf)
    return fail(err, errlen, "SERVICE_TYPES is too long");
  strcpy(buf, v);
  char *save = NULL;
  for (char *tok = strtok_r(buf, ",", &save); tok;
       tok = strtok_r(NULL, ",", &save)) {
    char *c1 = strchr(tok, ':');
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (c1 == NULL || c2 == NULL)
      return fail(err, errlen,
                  "SERVICE_TYPES entry '%s': expected number:name:role[+role]",
                  tok);
    *c1 = *c2 = '\0';
    char *end;
    long num = strtol(tok, &end, 10);
    if (*end != '\0' || num <= 0 || num > 1000000)
      return fail(err, errlen, "SERVICE_TYPES: bad number '%s'", tok);
    const char *name = c1 + 1;
    if (!valid_label(name, strlen(name)) || strlen(name) >= 32)
      return fail(err, errlen, "SERVICE_TYPES: bad name '%s'", name);
    zm_service_type_t *t = NULL;
    for (size_t i = 0; i < cfg->n_types; i++)
      if (cfg->types[i].number == (int)num)
        t = &cfg->types[i];
    if (t == NULL) {
      if (cfg->n_types == ZM_MAX_SERVICE_TYPES)
        return fail(err, errlen, "SERVICE_TYPES: more than %d types",
                    ZM_MAX_SERVICE_TYPES);
      t = &cfg->types[cfg->n_types++];
    }
    memset(t, 0, sizeof *t);
    t->number = (int)num;
    snprintf(t->name, sizeof t->name, "%s", name);
    char *rsave = NULL;
    for (char *r = strtok_r(c2 + 1, "+", &rsave); r;
         r = strtok_r(NULL, "+", &rsave)) {
      if (t->n_roles == ZM_MAX_ROLES || !valid_label(r, strlen(r)) ||
          strlen(r) >= sizeof t->roles[0])
        return fail(err, errlen, "SERVICE_TYPES: bad role '%s' for %s", r,
                    name);
      snprintf(t->roles[t->n_roles++], sizeof t->roles[0], "%s", r);
    }
    if (t->n_roles == 0)
      return fail(err, errlen, "SERVICE_TYPES: %s has no role", name);
  }
  return 0;
}

const zm_setting_t zm_settings[] = {
    {"GRPC_ADDRESS", ":50051",
     "gRPC listen address (host:port, :port = all interfaces, [::1]:port)", 1},
    {"METRICS_ADDRESS", "",
     "HTTP listener for /metrics, /healthz, /readyz (empty = off)", 0},
    {"STORE_PATH", "./ziti-management.db", "SQLite store file", 0},
    {"STORE_SYNC", "full", "SQLite durability: full (fsync) or normal", 0},
    {"DATABASE_URL", "", "PostgreSQL connection URL (empty = SQLite)", 1},
    {"DATABASE_POOL_SIZE", "4", "PostgreSQL connections, 2..64", 0},
    {"DATABASE_CONNECT_TIMEOUT", "60s",
     "at start-up, keep retrying an unreachable PostgreSQL this long (0 = "
     "one try)",
     0},
    {"LEASE_FLUSH_INTERVAL", "1s",
     "lease refreshes reach the store at most this late (<= 1m)", 0},
    {"ZITI_CONTROLLER_URL", "", "controller https://host:port (empty = none)",
     1},
    {"ZITI_CA_FILE", "", "CA bundle PEM to verify the controller", 1},
    {"ZITI_CERT_FILE", "", "admin identity client certificate PEM", 1},
    {"ZITI_KEY_FILE", "", "admin identity private key PEM", 1},
    {"ZITI_ENROLLMENT_JWT_FILE", "",
     "one-time JWT: enroll the admin identity at start-up when a cert/key/CA "
     "file is missing",
     1},
    {"ZITI_IDENTITY_NAME_RESOLVE", "false",
     "ResolveIdentity falls back to agent-<uuid>[-...] names", 1},
    {"SERVICE_IDENTITY_LEASE_TTL", "5m", "service identity lease length", 1},
    {"SERVICE_IDENTITY_GC_INTERVAL", "1m", "lease GC period", 1},
    {"LOOP_BUSY_POLL_US", "auto",
     "after its output, poll without sleeping this long while calls come "
     "back to back (0..1000 us; 0 = off; auto = 100, or off under a CPU "
     "quota): lower latency for back-to-back calls at the cost of CPU",
     0},
    {"SERVICE_IDENTITY_GC_CONCURRENCY", "16",
     "controller DELETEs in flight per sweep, 1..1024", 0},
    {"PENDING_RECOVERY_AGE", "",
     "accepted for compatibility and ignored (see README, Lifecycle)", 0},
    {"SERVICE_TYPES", "",
     "extra/overriding service types: number:name:role[+role],...", 0},
    {"ENROLLMENT_KEY_ALG", "ec-p384",
     "key of enrolled identities: ec-p384, ec-p256, rsa-2048, rsa-4096", 0},
    {"ENROLLMENT_TIMEOUT", "60s", "bound of one enrollment", 0},
    {"ENROLLMENT_MAX_INFLIGHT", "256", "enrollments at once, 1..100000", 0},
    {"ENROLLMENT_CRYPTO_THREADS", "2",
     "threads for key generation, JWT verification and TLS handshakes "
     "(lowest priority), 1..64",
     0},
    {"ZITI_REQUEST_TIMEOUT", "15s", "bound of one controller call", 0},
    {"ZITI_POOL_SIZE", "16", "keep-alive connections to the controller", 0},
    {"GRPC_MAX_RECV_MSG_SIZE", "4194304", "largest request message, bytes", 0},
    {"GRPC_MAX_CONCURRENT_STREAMS", "1024", "streams per HTTP/2 connection", 0},
    {"GRPC_IDLE_TIMEOUT", "5m", "close idle connections after (0 = never)", 0},
    {"GRPC_DISABLED_METHODS", "",
     "comma-separated methods answered UNIMPLEMENTED", 0},
    {"SHUTDOWN_GRACE", "20s", "drain time on SIGTERM/SIGINT", 0},
    {"LOG_LEVEL", "info", "debug, info, warn, error", 0},
    {"LOG_FORMAT", "text", "text or json (JSON lines)", 0},
    {"GRPC_TLS_CERT_FILE", "",
     "gRPC listener certificate chain PEM (TLS with GRPC_TLS_KEY_FILE)", 0},
    {"GRPC_TLS_KEY_FILE", "", "gRPC listener private key PEM", 0},
    {"GRPC_TLS_CLIENT_CA_FILE", "",
     "CA bundle PEM: verify client certificates (mTLS)", 0},
    {"GRPC_AUTHZ_POLICY_FILE", "",
     "per-RPC authorization policy JSON (reloaded on SIGHUP)", 0},
    {"AUDIT_LOG", "stderr", "audit log: stderr, a file path, or off", 0},
    {"GRPC_MAX_CONNECTIONS", "65536", "connections at once, 1..1048576", 0},
    {"GRPC_MAX_BUFFERED_BYTES", "268435456",
     "request bytes buffered across all connections", 0},
    {"GRPC_RECV_TIMEOUT", "30s",
     "a request must arrive within this (0 = never)", 0},
    {"GRPC_WRITE_STALL_TIMEOUT", "30s",
     "close a connection whose write is stuck this long (0 = never)", 0},
    {"GRPC_CALLER_RATE", "10",
     "costly RPCs per second per caller (0 = off; default off without a "
     "client CA)",
     0},
    {"GRPC_CALLER_BURST", "20", "per-caller token bucket depth", 0},
    {"GRPC_CALLER_MAX_INFLIGHT", "32",
     "costly RPCs in flight per caller (0 = off; default off without a "
     "client CA)",
     0},
};
const size_t zm_settings_count = ZM_ARRAY_SIZE(zm_settings);

void zm_config_flag_name(const char *env, char *out, size_t cap) {
  size_t o = 0;
  if (cap < 3) {
    if (cap > 0)
      out[0] = '\0';
    return;
  }
  out[o++] = '-';
  out[o++] = '-';
  for (; *env && o + 1 < cap; env++)
    out[o++] =
        *env == '_'
            ? '-'
            : (char)(*env >= 'A' && *env <= 'Z' ? *env - 'A' + 'a' : *env);
  out[o] = '\0';
}

const zm_setting_t *zm_config_setting_by_flag(const char *flag, size_t n) {
  char name[64];
  for (size_t i = 0; i < zm_settings_count; i++) {
    zm_config_flag_name(zm_settings[i].env, name, sizeof name);
    if (strlen(name) == n && memcmp(name, flag, n) == 0)
      return &zm_settings[i];
  }
  return NULL;
}

int zm_parse_bool(const char *s, int *out) {
  static const char *const T[] = {"1", "t", "T", "TRUE", "true", "True"};
  static const char *const F[] = {"0", "f", "F", "FALSE", "false", "False"};
  for (size_t i = 0; i < ZM_ARRAY_SIZE(T); i++) {
    if (strcmp(s, T[i]) == 0) {
      *out = 1;
      return 0;
    }
    if (strcmp(s, F[i]) == 0) {
      *out = 0;
      return 0;
    }
  }
  return ZM_E_INVAL;
}

/* host:port as GRPC_ADDRESS accepts it (the listeners parse it again). */
static int valid_address(const char *a) {
  const char *colon = strrchr(a, ':');
  if (colon == NULL || colon[1] == '\0')
    return 0;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end != '\0' || port < 0 || port > 65535)
    return 0;
  size_t hl = (size_t)(colon - a);
  if (hl > 0 && a[0] == '[')
    return a[hl - 1] == ']';
  return memchr(a, ':', hl) == NULL; /* a bare IPv6 needs brackets */
}

static const char *default_getenv(const char *name) { return getenv(name); }

int zm_config_load(zm_config_t *cfg, const char *(*get)(const char *),
                   char *err, size_t errlen) {
  if (get == NULL)
    get = default_getenv;
  memset(cfg, 0, sizeof *cfg);
  strcpy(cfg->grpc_address, ":50051");
  strcpy(cfg->store_path, "./ziti-management.db");
  cfg->store_sync_full = 1;
  cfg->database_pool = 4;
  cfg->database_connect_ms = 60 * 1000;
  cfg->lease_flush_ms = 1000;
  cfg->lease_ttl_ms = 5 * 60 * 1000;
  cfg->gc_interval_ms = 60 * 1000;
  cfg->gc_concurrency = 16;
  cfg->busy_poll_us = ZM_BUSY_POLL_AUTO;
  cfg->pending_age_ms = 10 * 60 * 1000;
  cfg->enroll_timeout_ms = 60 * 1000;
  cfg->enroll_max_inflight = 256;
  cfg->crypto_threads = 2;
  cfg->key_alg = ZM_KEY_EC_P384;
  cfg->ziti_timeout_ms = 15000;
  cfg->ziti_pool_size = 16;
  cfg->max_recv_msg = 4u << 20;
  cfg->idle_timeout_ms = 5 * 60 * 1000;
  cfg->max_streams = 1024;
  cfg->shutdown_grace_ms = 20000;
  strcpy(cfg->log_level, "info");
  strcpy(cfg->audit_log, "stderr");
  cfg->max_conns = 65536;
  cfg->max_buffered = 256u << 20;
  cfg->recv_timeout_ms = 30000;
  cfg->write_stall_ms = 30000;
  cfg->caller_rate = 10;
  cfg->caller_burst = 20;
  cfg->caller_inflight = 32;
  add_type(cfg, 1, "gateway", "gateway-hosts");
  add_type(cfg, 2, "orchestrator", "orchestrators");
  /* The contract's ServiceType table (3, the old RUNNER, is reserved; a
   * deployment that still sends it maps it with SERVICE_TYPES). */
  add_type(cfg, 4, "llm-proxy", "llm-proxy-hosts");
  add_type(cfg, 5, "tracing", "tracing-hosts");
  add_type(cfg, 6, "runners", "runners-service-hosts");
  add_type(cfg, 7, "egress-gateway", "egress-gateway-hosts");
  add_type(cfg, 8, "terminal-proxy", "terminal-proxy-hosts");

  int rv;
  const char *v;
#define STR(field, name)                                                       \
  if ((v = get(name)) != NULL && *v != '\0' &&                                 \
      (rv = copy_str(cfg->field, sizeof cfg->field, v, name, err, errlen)))    \
    return rv;
  STR(grpc_address, "GRPC_ADDRESS");
  STR(store_path, "STORE_PATH");
  STR(controller_url, "ZITI_CONTROLLER_URL");
  STR(ca_file, "ZITI_CA_FILE");
  STR(cert_file, "ZITI_CERT_FILE");
  STR(key_file, "ZITI_KEY_FILE");
  STR(log_level, "LOG_LEVEL");
  STR(metrics_address, "METRICS_ADDRESS");
  STR(enrollment_jwt_file, "ZITI_ENROLLMENT_JWT_FILE");
  STR(disabled_methods, "GRPC_DISABLED_METHODS");
  STR(tls_cert_file, "GRPC_TLS_CERT_FILE");
  STR(tls_key_file, "GRPC_TLS_KEY_FILE");
  STR(tls_client_ca_file, "GRPC_TLS_CLIENT_CA_FILE");
  STR(authz_policy_file, "GRPC_AUTHZ_POLICY_FILE");
  STR(audit_log, "AUDIT_LOG");
#undef STR
  if ((v = get("DATABASE_URL")) != NULL && *v != '\0') {
    /* never echo the value: it may carry a password */
    if (strlen(v) >= sizeof cfg->database_url)
      return fail(err, errlen, "DATABASE_URL is too long (max %zu bytes)",
                  sizeof cfg->database_url - 1);
    strcpy(cfg->database_url, v);
  }
  if ((v = get("STORE_SYNC")) != NULL && *v != '\0') {
    if (strcmp(v, "full") == 0)
      cfg->store_sync_full = 1;
    else if (strcmp(v, "normal") == 0)
      cfg->store_sync_full = 0;
    else
      return fail(err, errlen, "STORE_SYNC=%s: expected full or normal", v);
  }
  if ((rv = env_duration(get, "SERVICE_IDENTITY_LEASE_TTL", &cfg->lease_ttl_ms,
                         0, err, errlen)) ||
      (rv = env_duration(get, "SERVICE_IDENTITY_GC_INTERVAL",
                         &cfg->gc_interval_ms, 0, err, errlen)) ||
      (rv = env_duration(get, "PENDING_RECOVERY_AGE", &cfg->pending_age_ms, 0,
                         err, errlen)) ||
      (rv = env_duration(get, "ENROLLMENT_TIMEOUT", &cfg->enroll_timeout_ms, 0,
                         err, errlen)) ||
      (rv = env_duration(get, "DATABASE_CONNECT_TIMEOUT",
                         &cfg->database_connect_ms, 1, err, errlen)) ||
      (rv = env_duration(get, "ZITI_REQUEST_TIMEOUT", &cfg->ziti_timeout_ms, 0,
                         err, errlen)) ||
      (rv = env_duration(get, "GRPC_IDLE_TIMEOUT", &cfg->idle_timeout_ms, 1,
                         err, errlen)) ||
      (rv = env_duration(get, "SHUTDOWN_GRACE", &cfg->shutdown_grace_ms, 1, err,
                         errlen)) ||
      (rv = env_duration(get, "LEASE_FLUSH_INTERVAL", &cfg->lease_flush_ms, 0,
                         err, errlen)) ||
      (rv = env_duration(get, "GRPC_RECV_TIMEOUT", &cfg->recv_timeout_ms, 1,
                         err, errlen)) ||
      (rv = env_duration(get, "GRPC_WRITE_STALL_TIMEOUT", &cfg->write_stall_ms,
                         1, err, errlen)))
    return rv;
  if (cfg->lease_flush_ms > 60000)
    return fail(err, errlen, "LEASE_FLUSH_INTERVAL must be at most 1m");
  uint64_t x;
  const char *bp = get("LOOP_BUSY_POLL_US");
  if (bp != NULL && strcmp(bp, "auto") == 0) {
    cfg->busy_poll_us = ZM_BUSY_POLL_AUTO;
  } else if (bp != NULL && *bp != '\0') {
    x = 0;
    if ((rv = env_uint(get, "LOOP_BUSY_POLL_US", 0, 1000, &x, err, errlen)))
      return fail(err, errlen,
                  "LOOP_BUSY_POLL_US=%s: expected auto or an integer in "
                  "[0, 1000]",
                  bp);
    cfg->busy_poll_us = (unsigned)x;
  }
  x = cfg->gc_concurrency;
  if ((rv = env_uint(get, "SERVICE_IDENTITY_GC_CONCURRENCY", 1, 1024, &x, err,
                     errlen)))
    return rv;
  cfg->gc_concurrency = (unsigned)x;
  x = cfg->enroll_max_inflight;
  if ((rv = env_uint(get, "ENROLLMENT_MAX_INFLIGHT", 1, 100000, &x, err,
                     errlen)))
    return rv;
  cfg->enroll_max_inflight = (unsigned)x;
  x = cfg->crypto_threads;
  if ((rv = env_uint(get, "ENROLLMENT_CRYPTO_THREADS", 1, 64, &x, err, errlen)))
    return rv;
  cfg->crypto_threads = (unsigned)x;
  x = cfg->database_pool;
  if ((rv = env_uint(get, "DATABASE_POOL_SIZE", 2, 64, &x, err, errlen)))
    return rv;
  cfg->database_pool = (unsigned)x;
  x = cfg->ziti_pool_size;
  if ((rv = env_uint(get, "ZITI_POOL_SIZE", 1, 1024, &x, err, errlen)))
    return rv;
  cfg->ziti_pool_size = (unsigned)x;
  x = cfg->max_recv_msg;
  if ((rv = env_uint(get, "GRPC_MAX_RECV_MSG_SIZE", 64, 64u << 20, &x, err,
                     errlen)))
    return rv;
  cfg->max_recv_msg = (size_t)x;
  x = cfg->max_streams;
  if ((rv = env_uint(get, "GRPC_MAX_CONCURRENT_STREAMS", 1, 1u << 20, &x, err,
                     errlen)))
    return rv;
  cfg->max_streams = (uint32_t)x;
  x = cfg->max_conns;
  if ((rv =
           env_uint(get, "GRPC_MAX_CONNECTIONS", 1, 1u << 20, &x, err, errlen)))
    return rv;
  cfg->max_conns = (unsigned)x;
  x = cfg->max_buffered;
  if ((rv = env_uint(get, "GRPC_MAX_BUFFERED_BYTES", 1u << 16, 1ull << 40, &x,
                     err, errlen)))
    return rv;
  cfg->max_buffered = (size_t)x;
  x = cfg->caller_rate;
  if ((rv = env_uint(get, "GRPC_CALLER_RATE", 0, 1000000, &x, err, errlen)))
    return rv;
  cfg->caller_rate = (unsigned)x;
  x = cfg->caller_burst;
  if ((rv = env_uint(get, "GRPC_CALLER_BURST", 1, 1000000, &x, err, errlen)))
    return rv;
  cfg->caller_burst = (unsigned)x;
  x = cfg->caller_inflight;
  if ((rv = env_uint(get, "GRPC_CALLER_MAX_INFLIGHT", 0, 1000000, &x, err,
                     errlen)))
    return rv;
  cfg->caller_inflight = (unsigned)x;
  /* Without client certificates the caller key is the peer address, and in
   * a mesh that terminates TLS every caller shares the sidecar's address:
   * per-caller limits are then off unless set explicitly. */
  if (cfg->tls_client_ca_file[0] == '\0') {
    if ((v = get("GRPC_CALLER_RATE")) == NULL || *v == '\0')
      cfg->caller_rate = 0;
    if ((v = get("GRPC_CALLER_MAX_INFLIGHT")) == NULL || *v == '\0')
      cfg->caller_inflight = 0;
  }
  if ((v = get("ENROLLMENT_KEY_ALG")) != NULL && *v != '\0' &&
      zm_key_alg_parse(v, &cfg->key_alg) != 0)
    return fail(err, errlen,
                "ENROLLMENT_KEY_ALG=%s: expected ec-p384, ec-p256, rsa-2048 or "
                "rsa-4096",
                v);
  if ((v = get("SERVICE_TYPES")) != NULL && *v != '\0' &&
      (rv = parse_service_types(cfg, v, err, errlen)))
    return rv;
  if ((v = get("LOG_FORMAT")) != NULL && *v != '\0') {
    if (strcmp(v, "json") == 0)
      cfg->log_json = 1;
    else if (strcmp(v, "text") == 0)
      cfg->log_json = 0;
    else
      return fail(err, errlen, "LOG_FORMAT=%s: expected text or json", v);
  }
  if ((v = get("ZITI_IDENTITY_NAME_RESOLVE")) != NULL && *v != '\0' &&
      zm_parse_bool(v, &cfg->name_resolve) != 0)
    return fail(err, errlen,
                "ZITI_IDENTITY_NAME_RESOLVE=%s: expected true or false", v);
  if (!valid_address(cfg->grpc_address))
    return fail(err, errlen,
                "GRPC_ADDRESS=%s: expected host:port, :port or [v6]:port",
                cfg->grpc_address);
  if (cfg->metrics_address[0] != '\0' && !valid_address(cfg->metrics_address))
    return fail(err, errlen,
                "METRICS_ADDRESS=%s: expected host:port, :port or [v6]:port",
                cfg->metrics_address);
  {
    zm_log_level_t lv;
    if (zm_log_parse_level(cfg->log_level, &lv) != 0)
      return fail(err, errlen,
                  "LOG_LEVEL=%s: expected debug, info, warn or error",
                  cfg->log_level);
  }
  if (cfg->enrollment_jwt_file[0] != '\0' &&
      (cfg->controller_url[0] == '\0' || cfg->ca_file[0] == '\0' ||
       cfg->cert_file[0] == '\0' || cfg->key_file[0] == '\0'))
    return fail(err, errlen,
                "ZITI_ENROLLMENT_JWT_FILE needs ZITI_CONTROLLER_URL, "
                "ZITI_CA_FILE, ZITI_CERT_FILE and ZITI_KEY_FILE (the files "
                "it writes)");
  /* The Go service uses only the URL's host (and port), always over https:
   * http:// is taken the same way. */
  if (cfg->controller_url[0] != '\0' &&
      strncasecmp(cfg->controller_url, "https://", 8) != 0 &&
      strncasecmp(cfg->controller_url, "http://", 7) != 0)
    return fail(err, errlen,
                "ZITI_CONTROLLER_URL must start with https:// (or http://, "
                "which is used as https://)");
  if (cfg->controller_url[0] != '\0' &&
      (cfg->ca_file[0] == '\0' || cfg->cert_file[0] == '\0' ||
       cfg->key_file[0] == '\0'))
    return fail(err, errlen,
                "ZITI_CONTROLLER_URL needs ZITI_CA_FILE, ZITI_CERT_FILE and "
                "ZITI_KEY_FILE");
  return 0;
}

const zm_service_type_t *zm_config_service_type(const zm_config_t *cfg,
                                                int number) {
  for (size_t i = 0; i < cfg->n_types; i++)
    if (cfg->types[i].number == number)
      return &cfg->types[i];
  return NULL;
}
