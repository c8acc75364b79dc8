/* Configuration: defaults, Go durations, validation messages, service types. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/config.h"
#include "zm/zm.h"

static const char *const *env_pairs;

static const char *fake_getenv(const char *name) {
  for (const char *const *p = env_pairs; p && p[0]; p += 2)
    if (strcmp(p[0], name) == 0)
      return p[1];
  return NULL;
}

static int load(zm_config_t *cfg, const char *const *pairs, char *err,
                size_t errlen) {
  env_pairs = pairs;
  return zm_config_load(cfg, fake_getenv, err, errlen);
}

static void test_defaults(void **state) {
  (void)state;
  zm_config_t cfg;
  char err[256];
  const char *none[] = {NULL};
  assert_int_equal(load(&cfg, none, err, sizeof err), 0);
  assert_string_equal(cfg.grpc_address, ":50051");
  assert_string_equal(cfg.store_path, "./ziti-management.db");
  assert_int_equal(cfg.lease_ttl_ms, 300000);
  assert_int_equal(cfg.gc_interval_ms, 60000);
  assert_int_equal(cfg.max_recv_msg, 4u << 20);
  assert_int_equal(cfg.key_alg, ZM_KEY_EC_P384);
  assert_int_equal(cfg.busy_poll_us, ZM_BUSY_POLL_AUTO);
  const zm_service_type_t *t = zm_config_service_type(&cfg, 1);
  assert_non_null(t);
  assert_string_equal(t->name, "gateway");
  assert_string_equal(t->roles[0], "gateway-hosts");
  assert_string_equal(zm_config_service_type(&cfg, 2)->roles[0],
                      "orchestrators");
  /* 3 (the old RUNNER) is reserved by the contract */
  assert_null(zm_config_service_type(&cfg, 3));
  assert_string_equal(zm_config_service_type(&cfg, 4)->name, "llm-proxy");
  assert_string_equal(zm_config_service_type(&cfg, 4)->roles[0],
                      "llm-proxy-hosts");
  assert_string_equal(zm_config_service_type(&cfg, 5)->roles[0],
                      "tracing-hosts");
  assert_string_equal(zm_config_service_type(&cfg, 6)->name, "runners");
  assert_string_equal(zm_config_service_type(&cfg, 6)->roles[0],
                      "runners-service-hosts");
  assert_string_equal(zm_config_service_type(&cfg, 7)->roles[0],
                      "egress-gateway-hosts");
  assert_string_equal(zm_config_service_type(&cfg, 8)->name, "terminal-proxy");
  assert_string_equal(zm_config_service_type(&cfg, 8)->roles[0],
                      "terminal-proxy-hosts");
  assert_null(zm_config_service_type(&cfg, 0));
  assert_null(zm_config_service_type(&cfg, 9));
}

static void test_busy_poll(void **state) {
  (void)state;
  zm_config_t cfg;
  char err[256];
  const char *a[] = {"LOOP_BUSY_POLL_US", "auto", NULL};
  assert_int_equal(load(&cfg, a, err, sizeof err), 0);
  assert_int_equal(cfg.busy_poll_us, ZM_BUSY_POLL_AUTO);
  const char *empty[] = {"LOOP_BUSY_POLL_US", "", NULL};
  assert_int_equal(load(&cfg, empty, err, sizeof err), 0);
  assert_int_equal(cfg.busy_poll_us, ZM_BUSY_POLL_AUTO);
  const char *zero[] = {"LOOP_BUSY_POLL_US", "0", NULL};
  assert_int_equal(load(&cfg, zero, err, sizeof err), 0);
  assert_int_equal(cfg.busy_poll_us, 0);
  const char *max[] = {"LOOP_BUSY_POLL_US", "1000", NULL};
  assert_int_equal(load(&cfg, max, err, sizeof err), 0);
  assert_int_equal(cfg.busy_poll_us, 1000);
  const char *bad[][3] = {{"LOOP_BUSY_POLL_US", "1001", NULL},
                          {"LOOP_BUSY_POLL_US", "AUTO", NULL},
                          {"LOOP_BUSY_POLL_US", "4294967295", NULL},
                          {"LOOP_BUSY_POLL_US", "10us", NULL}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_not_equal(load(&cfg, bad[i], err, sizeof err), 0);
    assert_non_null(strstr(err, "LOOP_BUSY_POLL_US"));
  }
}

static void test_durations(void **state) {
  (void)state;
  struct {
    const char *s;
    int rv;
    uint64_t ms;
  } c[] = {{"5m", 0, 300000},        {"200ms", 0, 200},
           {"1h30m", 0, 5400000},    {"1.5h", 0, 5400000},
           {"2h45m10s", 0, 9910000}, {"0", 0, 0},
           {"100us", 0, 1},          {"1ns", 0, 1},
           {"10\xc2\xb5s", 0, 1},    {"300", ZM_E_INVAL, 0},
           {"", ZM_E_INVAL, 0},      {"-5m", ZM_E_INVAL, 0},
           {"5 m", ZM_E_INVAL, 0},   {"5d", ZM_E_INVAL, 0},
           {"m", ZM_E_INVAL, 0}};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    uint64_t ms = 777;
    assert_int_equal(zm_duration_parse(c[i].s, &ms), c[i].rv);
    if (c[i].rv == 0)
      assert_int_equal(ms, c[i].ms);
  }
  /* Found by test/fuzz/fuzz_duration.c: a lone sign parsed as 0 ms, and
   * strtod let exponents and hex floats through. */
  uint64_t ms = 777;
  assert_int_equal(zm_duration_parse("+", &ms), ZM_E_INVAL);
  assert_int_equal(zm_duration_parse("1e3s", &ms), ZM_E_INVAL);
  assert_int_equal(zm_duration_parse("4E5m", &ms), ZM_E_INVAL);
  assert_int_equal(zm_duration_parse("0x1p3s", &ms), ZM_E_INVAL);
  assert_int_equal(ms, 777);
  assert_int_equal(zm_duration_parse("+0", &ms), 0);
  assert_int_equal(ms, 0);
  assert_int_equal(zm_duration_parse("+1.s", &ms), 0);
  assert_int_equal(ms, 1000);
}

static void test_env_overrides_and_errors(void **state) {
  (void)state;
  zm_config_t cfg;
  char err[256];
  const char *ok[] = {"GRPC_ADDRESS",
                      "127.0.0.1:6000",
                      "SERVICE_IDENTITY_LEASE_TTL",
                      "200ms",
                      "SERVICE_IDENTITY_GC_INTERVAL",
                      "1m30s",
                      "STORE_SYNC",
                      "normal",
                      "ENROLLMENT_KEY_ALG",
                      "ec-p256",
                      "SERVICE_TYPES",
                      "4:llm-proxy:llm-proxies,2:orch:o1+o2",
                      NULL};
  assert_int_equal(load(&cfg, ok, err, sizeof err), 0);
  assert_string_equal(cfg.grpc_address, "127.0.0.1:6000");
  assert_int_equal(cfg.lease_ttl_ms, 200);
  assert_int_equal(cfg.gc_interval_ms, 90000);
  assert_int_equal(cfg.store_sync_full, 0);
  assert_int_equal(cfg.key_alg, ZM_KEY_EC_P256);
  const zm_service_type_t *t = zm_config_service_type(&cfg, 4);
  assert_non_null(t);
  assert_string_equal(t->name, "llm-proxy");
  assert_string_equal(t->roles[0], "llm-proxies");
  t = zm_config_service_type(&cfg, 2);
  assert_string_equal(t->name, "orch");
  assert_int_equal(t->n_roles, 2);
  assert_string_equal(t->roles[1], "o2");

  const char *bad_ttl[] = {"SERVICE_IDENTITY_LEASE_TTL", "0s", NULL};
  assert_int_equal(load(&cfg, bad_ttl, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "SERVICE_IDENTITY_LEASE_TTL"));
  const char *bad_dur[] = {"SERVICE_IDENTITY_GC_INTERVAL", "soon", NULL};
  assert_int_equal(load(&cfg, bad_dur, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "SERVICE_IDENTITY_GC_INTERVAL"));
  const char *bad_url[] = {"ZITI_CONTROLLER_URL", "ftp://x", NULL};
  assert_int_equal(load(&cfg, bad_url, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "must start with https://"));
  /* http:// is taken as https:// (the Go service keeps only host and port):
   * what is missing then is the files */
  const char *http_url[] = {"ZITI_CONTROLLER_URL", "HTTP://x:1", NULL};
  assert_int_equal(load(&cfg, http_url, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "ZITI_CA_FILE"));
  const char *no_files[] = {"ZITI_CONTROLLER_URL", "https://x:1", NULL};
  assert_int_equal(load(&cfg, no_files, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "ZITI_CA_FILE"));
  const char *bad_types[] = {"SERVICE_TYPES", "4:llm proxy:x", NULL};
  assert_int_equal(load(&cfg, bad_types, err, sizeof err), ZM_E_INVAL);
  const char *bad_types2[] = {"SERVICE_TYPES", "x:y:z", NULL};
  assert_int_equal(load(&cfg, bad_types2, err, sizeof err), ZM_E_INVAL);
  const char *pg[] = {"DATABASE_URL", "postgres://u:secret@db:5432/zm", NULL};
  assert_int_equal(load(&cfg, pg, err, sizeof err), 0);
  assert_string_equal(cfg.database_url, "postgres://u:secret@db:5432/zm");
  assert_int_equal(cfg.database_pool, 4);
  assert_int_equal(cfg.lease_flush_ms, 1000);
  const char *pool[] = {"DATABASE_POOL_SIZE", "1", NULL};
  assert_int_equal(load(&cfg, pool, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "DATABASE_POOL_SIZE"));
  const char *flush[] = {"LEASE_FLUSH_INTERVAL", "2m", NULL};
  assert_int_equal(load(&cfg, flush, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "LEASE_FLUSH_INTERVAL"));
  /* a URL too long is refused without echoing it (it may hold a password) */
  static char long_url[2048];
  memset(long_url, 'p', sizeof long_url - 1);
  const char *pg_long[] = {"DATABASE_URL", long_url, NULL};
  assert_int_equal(load(&cfg, pg_long, err, sizeof err), ZM_E_INVAL);
  assert_null(strstr(err, "ppppppppp"));
  const char *sync[] = {"STORE_SYNC", "sometimes", NULL};
  assert_int_equal(load(&cfg, sync, err, sizeof err), ZM_E_INVAL);
}

static void test_security_settings(void **state) {
  (void)state;
  zm_config_t cfg;
  char err[256];
  const char *none[] = {NULL};
  assert_int_equal(load(&cfg, none, err, sizeof err), 0);
  assert_string_equal(cfg.audit_log, "stderr");
  assert_string_equal(cfg.tls_cert_file, "");
  assert_int_equal(cfg.max_conns, 65536);
  assert_int_equal(cfg.max_buffered, 256u << 20);
  assert_int_equal(cfg.recv_timeout_ms, 30000);
  assert_int_equal(cfg.write_stall_ms, 30000);
  /* no client CA: callers are addresses (maybe a sidecar): limits off */
  assert_int_equal(cfg.caller_rate, 0);
  assert_int_equal(cfg.caller_inflight, 0);
  const char *mtls[] = {"GRPC_TLS_CERT_FILE",
                        "/c.pem",
                        "GRPC_TLS_KEY_FILE",
                        "/k.pem",
                        "GRPC_TLS_CLIENT_CA_FILE",
                        "/ca.pem",
                        "GRPC_AUTHZ_POLICY_FILE",
                        "/p.json",
                        "AUDIT_LOG",
                        "/var/log/zm-audit.jsonl",
                        "GRPC_RECV_TIMEOUT",
                        "10s",
                        "GRPC_WRITE_STALL_TIMEOUT",
                        "0",
                        "GRPC_MAX_CONNECTIONS",
                        "1000",
                        "GRPC_MAX_BUFFERED_BYTES",
                        "67108864",
                        NULL};
  assert_int_equal(load(&cfg, mtls, err, sizeof err), 0);
  assert_string_equal(cfg.tls_client_ca_file, "/ca.pem");
  assert_string_equal(cfg.authz_policy_file, "/p.json");
  assert_string_equal(cfg.audit_log, "/var/log/zm-audit.jsonl");
  assert_int_equal(cfg.recv_timeout_ms, 10000);
  assert_int_equal(cfg.write_stall_ms, 0);
  assert_int_equal(cfg.max_conns, 1000);
  assert_int_equal(cfg.max_buffered, 64u << 20);
  assert_int_equal(cfg.caller_rate, 10);
  assert_int_equal(cfg.caller_burst, 20);
  assert_int_equal(cfg.caller_inflight, 32);
  const char *explicit_[] = {"GRPC_CALLER_RATE", "5",
                             "GRPC_CALLER_MAX_INFLIGHT", "2", NULL};
  assert_int_equal(load(&cfg, explicit_, err, sizeof err), 0);
  assert_int_equal(cfg.caller_rate, 5);
  assert_int_equal(cfg.caller_inflight, 2);
  const char *bad[] = {"GRPC_MAX_CONNECTIONS", "0", NULL};
  assert_int_equal(load(&cfg, bad, err, sizeof err), ZM_E_INVAL);
  assert_non_null(strstr(err, "GRPC_MAX_CONNECTIONS"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_defaults),
      cmocka_unit_test(test_security_settings),
      cmocka_unit_test(test_durations),
      cmocka_unit_test(test_busy_poll),
      cmocka_unit_test(test_env_overrides_and_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
