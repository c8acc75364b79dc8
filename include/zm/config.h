/*
 * config.h - the service configuration, from environment variables (names
 * compatible with the existing Go service) and a few command-line flags.
 * Pure: zm_config_load() reads a getenv-like function so tests can feed it.
 */
#ifndef ZM_CONFIG_H
#define ZM_CONFIG_H

#include "zm/crypto.h"

#include <stddef.h>
#include <stdint.h>

#define ZM_MAX_SERVICE_TYPES 32
#define ZM_MAX_ROLES 4
/* LOOP_BUSY_POLL_US=auto (the default): the app picks ZM_BUSY_POLL_AUTO_US,
 * or 0 under a CPU quota (zm/cpuquota.h). */
#define ZM_BUSY_POLL_AUTO UINT32_MAX
#define ZM_BUSY_POLL_AUTO_US 100u

/* One service type: proto number -> name prefix + role attributes. */
typedef struct {
  int number;    /* ServiceType enum value, > 0 */
  char name[32]; /* "gateway": identities are named svc-<name>-<short> */
  char roles[ZM_MAX_ROLES][64];
  size_t n_roles;
} zm_service_type_t;

typedef struct {
  char grpc_address[128];       /* GRPC_ADDRESS, default ":50051" */
  char store_path[512];         /* STORE_PATH, default "./ziti-management.db" */
  int store_sync_full;          /* STORE_SYNC=full|normal, default full */
  char database_url[1024];      /* DATABASE_URL: PostgreSQL; empty = SQLite */
  unsigned database_pool;       /* DATABASE_POOL_SIZE, default 4 */
  uint64_t database_connect_ms; /* DATABASE_CONNECT_TIMEOUT, default 60s */
  uint64_t lease_flush_ms;  /* LEASE_FLUSH_INTERVAL: lease refreshes reach the
                               store at most this late, default 1s */
  char controller_url[512]; /* ZITI_CONTROLLER_URL; empty = no controller */
  char ca_file[512];        /* ZITI_CA_FILE */
  char cert_file[512];      /* ZITI_CERT_FILE */
  char key_file[512];       /* ZITI_KEY_FILE */
  uint64_t lease_ttl_ms;    /* SERVICE_IDENTITY_LEASE_TTL, default 5m */
  uint64_t gc_interval_ms;  /* SERVICE_IDENTITY_GC_INTERVAL, default 1m */
  unsigned gc_concurrency;  /* SERVICE_IDENTITY_GC_CONCURRENCY, default 16 */
  uint64_t pending_age_ms;  /* PENDING_RECOVERY_AGE: pending records older than
                               this are resolved by GC, default 10m */
  uint64_t
      enroll_timeout_ms; /* ENROLLMENT_TIMEOUT: bound of one enrollment when
                            the caller sets no deadline, default 60s */
  unsigned enroll_max_inflight; /* ENROLLMENT_MAX_INFLIGHT, default 256 */
  unsigned crypto_threads;      /* ENROLLMENT_CRYPTO_THREADS, default 2 */
  zm_key_alg_t key_alg;         /* ENROLLMENT_KEY_ALG, default ec-p384 */
  uint64_t ziti_timeout_ms;     /* ZITI_REQUEST_TIMEOUT, default 15s */
  unsigned ziti_pool_size;      /* ZITI_POOL_SIZE, default 16 */
  size_t max_recv_msg;        /* GRPC_MAX_RECV_MSG_SIZE bytes, default 4 MiB */
  uint64_t idle_timeout_ms;   /* GRPC_IDLE_TIMEOUT, default 5m; 0 = never */
  uint32_t max_streams;       /* GRPC_MAX_CONCURRENT_STREAMS, default 1024 */
  uint64_t shutdown_grace_ms; /* SHUTDOWN_GRACE, default 20s */
  char log_level[16];         /* LOG_LEVEL, default info */
  /* listener security and limits (README "Security") */
  char tls_cert_file[512];      /* GRPC_TLS_CERT_FILE */
  char tls_key_file[512];       /* GRPC_TLS_KEY_FILE: TLS when both set */
  char tls_client_ca_file[512]; /* GRPC_TLS_CLIENT_CA_FILE: mTLS */
  char authz_policy_file[512];  /* GRPC_AUTHZ_POLICY_FILE */
  char audit_log[512];          /* AUDIT_LOG: "stderr" (default), "off", or
                                   a file path */
  unsigned max_conns;           /* GRPC_MAX_CONNECTIONS, default 65536 */
  size_t max_buffered;          /* GRPC_MAX_BUFFERED_BYTES, default 256 MiB */
  uint64_t recv_timeout_ms;     /* GRPC_RECV_TIMEOUT, default 30s; 0 = never */
  uint64_t
      write_stall_ms;    /* GRPC_WRITE_STALL_TIMEOUT, default 30s; 0 = never */
  unsigned caller_rate;  /* GRPC_CALLER_RATE per second, default 10 */
  unsigned caller_burst; /* GRPC_CALLER_BURST, default 20 */
  unsigned caller_inflight;  /* GRPC_CALLER_MAX_INFLIGHT, default 32 */
  unsigned busy_poll_us;     /* LOOP_BUSY_POLL_US; ZM_BUSY_POLL_AUTO (default)
                                until the app resolves it at start-up */
  int log_json;              /* LOG_FORMAT=json (default text) */
  char metrics_address[128]; /* METRICS_ADDRESS; empty = no listener */
  char enrollment_jwt_file[512]; /* ZITI_ENROLLMENT_JWT_FILE */
  int name_resolve;              /* ZITI_IDENTITY_NAME_RESOLVE */
  char disabled_methods[512]; /* GRPC_DISABLED_METHODS: comma-separated method
                                 names answered UNIMPLEMENTED; default none */
  zm_service_type_t types[ZM_MAX_SERVICE_TYPES]; /* built-ins + SERVICE_TYPES */
  size_t n_types;
} zm_config_t;

/*
 * Fills cfg from getenv_fn (NULL = getenv). On error returns ZM_E_INVAL and
 * writes a one-line reason naming the variable into err.
 * SERVICE_TYPES extends/overrides the built-in table (gateway=1,
 * orchestrator=2, llm-proxy=4, tracing=5, runners=6, egress-gateway=7,
 * terminal-proxy=8; 3 is reserved): "3:runner:runners,9:x:y+z"
 * (number:name:role[+role...], comma-separated).
 */
int zm_config_load(zm_config_t *cfg, const char *(*getenv_fn)(const char *),
                   char *err, size_t errlen);

/* Every setting: its variable, default (as text, "" = none), meaning, and
 * whether the Go service reads the same variable. Each is also a flag:
 * --grpc-address=... for GRPC_ADDRESS (zm_config_flag_name). */
typedef struct {
  const char *env;
  const char *def;
  const char *help;
  int go;
} zm_setting_t;
extern const zm_setting_t zm_settings[];
extern const size_t zm_settings_count;
/* "--grpc-address" for "GRPC_ADDRESS" into out (cap bytes). */
void zm_config_flag_name(const char *env, char *out, size_t cap);
/* The setting whose flag is `flag` (without "=value"; n bytes), or NULL. */
const zm_setting_t *zm_config_setting_by_flag(const char *flag, size_t n);
/* Go strconv.ParseBool: 1 t T TRUE true True / 0 f F FALSE false False.
 * Returns 0 or ZM_E_INVAL. */
int zm_parse_bool(const char *s, int *out);

/* Go time.ParseDuration subset: "300ms", "1.5h", "2h45m", "5m", "10s",
 * "100us"/"100µs", "0". Result rounded up to whole ms (a non-zero duration
 * below 1 ms becomes 1 ms). Returns 0 or ZM_E_INVAL. */
int zm_duration_parse(const char *s, uint64_t *ms);

/* The service type with this proto number, or NULL. */
const zm_service_type_t *zm_config_service_type(const zm_config_t *cfg,
                                                int number);

#endif /* ZM_CONFIG_H */
