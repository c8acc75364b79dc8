/* main.c - flags -> configuration -> run the service -> exit code. */
#include "zm/app.h"
#include "zm/audit.h"
#include "zm/config.h"
#include "zm/healthcheck.h"
#include "zm/log.h"

#include <jansson.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

/* jansson keeps copies of parsed strings (enrollment JWTs, one-time tokens,
 * session tokens) in its own allocations: wipe every one before it is freed. */
static void wiping_free(void *p) {
  if (p != NULL) {
    explicit_bzero(p, malloc_usable_size(p));
    free(p);
  }
}

static void usage(FILE *f) {
  fputs(
      "usage: ziti-management [--health-check [ADDR]] [--migrate-only] "
      "[--help]\n"
      "Configuration comes from environment variables; see README.md.\n"
      "  --health-check [ADDR]  call grpc.health.v1.Health/Check on ADDR\n"
      "                         (default: GRPC_ADDRESS); exit 0 if SERVING\n"
      "  --migrate-only         create/migrate the store at STORE_PATH, exit\n",
      f);
}

int main(int argc, char **argv) {
  zm_config_t cfg;
  char err[256];
  int health = 0, migrate_only = 0;
  const char *health_addr = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--health-check") == 0) {
      health = 1;
      if (i + 1 < argc && argv[i + 1][0] != '-')
        health_addr = argv[++i];
    } else if (strcmp(argv[i], "--migrate-only") == 0) {
      migrate_only = 1;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "ziti-management: unknown argument '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  /* A peer that closes while we write must cost an EPIPE on that write,
   * not the process (libuv leaves SIGPIPE to the application); the log
   * writer thread relies on it too when stderr is a closed pipe. */
  signal(SIGPIPE, SIG_IGN);
  json_set_alloc_funcs(malloc, wiping_free);
  wolfSSL_Init();
  if (zm_config_load(&cfg, NULL, err, sizeof err) != 0) {
    fprintf(stderr, "ziti-management: configuration: %s\n", err);
    return 2;
  }
  if (health)
    return zm_healthcheck_run(health_addr ? health_addr : cfg.grpc_address, "",
                              3000);
  zm_log_level_t level;
  if (zm_log_parse_level(cfg.log_level, &level) != 0) {
    fprintf(stderr,
            "ziti-management: LOG_LEVEL=%s: expected debug, info, "
            "warn or error\n",
            cfg.log_level);
    return 2;
  }
  zm_log_set_level(level);
  /* abort() is the OOM/assertion strategy: no core with keys in it */
  if (zm_disable_core_dumps() != 0)
    fprintf(stderr, "ziti-management: cannot disable core dumps\n");
  if (migrate_only)
    return zm_app_migrate_only(&cfg);
  if (zm_audit_open(cfg.audit_log, err, sizeof err) != 0) {
    fprintf(stderr, "ziti-management: AUDIT_LOG: %s\n", err);
    return 2;
  }
  /* from here on no log line waits on stderr on the loop thread */
  zm_log_start_async();
  int rc = zm_app_run(&cfg);
  zm_audit_close();
  zm_log_stop_async();
  return rc;
}
