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

/* Settings given as flags override the environment. */
static const char *flag_values[64];

/* jansson keeps copies of parsed strings (enrollment JWTs, one-time tokens,
 * session tokens) in its own allocations: wipe every one before it is freed. */
static void wiping_free(void *p) {
  if (p != NULL) {
    explicit_bzero(p, malloc_usable_size(p));
    free(p);
  }
}

static const char *get_setting(const char *name) {
  for (size_t i = 0; i < zm_settings_count; i++)
    if (strcmp(zm_settings[i].env, name) == 0 && flag_values[i] != NULL)
      return flag_values[i];
  return getenv(name);
}

static void usage(FILE *f) {
  fputs(
      "usage: ziti-management [--SETTING=VALUE ...] [--health-check [ADDR]]\n"
      "                       [--migrate-only] [--version] [--help]\n"
      "  --health-check [ADDR]  call grpc.health.v1.Health/Check on ADDR\n"
      "                         (default: GRPC_ADDRESS); exit 0 if SERVING\n"
      "  --migrate-only         create/migrate the store, then exit\n"
      "\n"
      "Settings: each is an environment variable and a flag (the flag wins).\n"
      "(Go) marks the variables the Go service reads with the same "
      "meaning.\n\n",
      f);
  for (size_t i = 0; i < zm_settings_count; i++) {
    char flag[64];
    zm_config_flag_name(zm_settings[i].env, flag, sizeof flag);
    fprintf(f, "  %s=VALUE  %s%s\n      %s (default: %s)\n", flag,
            zm_settings[i].env, zm_settings[i].go ? " (Go)" : "",
            zm_settings[i].help,
            zm_settings[i].def[0] ? zm_settings[i].def : "none");
  }
}

int main(int argc, char **argv) {
  zm_config_t cfg;
  char err[256];
  int health = 0, migrate_only = 0;
  const char *health_addr = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--health-check") == 0) {
      health = 1;
      if (i + 1 < argc && argv[i + 1][0] != '-')
        health_addr = argv[++i];
    } else if (strcmp(a, "--migrate-only") == 0) {
      migrate_only = 1;
    } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(a, "--version") == 0) {
      printf("ziti-management %s (%s)\n", ZM_VERSION, ZM_GIT_COMMIT);
      return 0;
    } else if (strncmp(a, "--", 2) == 0) {
      size_t n = strcspn(a, "=");
      const zm_setting_t *s = zm_config_setting_by_flag(a, n);
      if (s == NULL) {
        fprintf(stderr, "ziti-management: unknown flag '%.*s' (see --help)\n",
                (int)n, a);
        return 2;
      }
      const char *v;
      if (a[n] == '=') {
        v = a + n + 1;
      } else if (i + 1 < argc) {
        v = argv[++i];
      } else {
        fprintf(stderr, "ziti-management: %s needs a value (%s)\n", a, s->env);
        return 2;
      }
      flag_values[s - zm_settings] = v;
    } else {
      fprintf(stderr, "ziti-management: unknown argument '%s' (see --help)\n",
              a);
      return 2;
    }
  }
  /* A peer that closes while we write must cost an EPIPE on that write,
   * not the process (libuv leaves SIGPIPE to the application); the log
   * writer thread relies on it too when stderr is a closed pipe. */
  signal(SIGPIPE, SIG_IGN);
  json_set_alloc_funcs(malloc, wiping_free);
  wolfSSL_Init();
  if (zm_config_load(&cfg, get_setting, err, sizeof err) != 0) {
    fprintf(stderr, "ziti-management: configuration: %s\n", err);
    return 2;
  }
  if (health)
    return zm_healthcheck_run(health_addr ? health_addr : cfg.grpc_address, "",
                              3000);
  zm_log_level_t level;
  zm_log_parse_level(cfg.log_level, &level); /* validated by config */
  zm_log_set_level(level);
  zm_log_set_json(cfg.log_json);
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
