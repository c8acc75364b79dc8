/*
 * app.h - the service context (zm_app_t) that wires the modules together,
 * and the entry points of the RPC handlers, the enrollment saga and the
 * lease GC. server wiring lives in src/app/app.c; it is the only code that
 * knows every module.
 */
#ifndef ZM_APP_H
#define ZM_APP_H

#include "zm/collect.h"
#include "zm/config.h"
#include "zm/grpc.h"
#include "zm/health.h"
#include "zm/index.h"
#include "zm/lifecycle.h"
#include "zm/metrics.h"
#include "zm/reflect.h"
#include "zm/store.h"
#include "zm/workers.h"
#include "zm/ziti.h"

#include <uv.h>

/* Bound on id-like strings from clients (ziti ids, agent ids). */
#define ZM_MAX_ID_LEN 256u

typedef struct {
  uint64_t enroll_started, enroll_ok, enroll_failed, enroll_compensated,
      enroll_compensate_failed;
  /* loop lag probe: max lateness of a 1 ms repeating timer since the last
   * report, and the worst ever (ms) */
  uint64_t lag_max_ms, lag_worst_ms;
  /* ... and the most CPU time one loop iteration took (us): the loop's own
   * work, apart from the time it waited for the CPU */
  uint64_t busy_max_us, busy_worst_us;
  /* the page faults and the involuntary context switches (preemptions)
   * within that busiest iteration of the last second */
  uint64_t busy_max_faults, busy_max_preempt;
  uint32_t enroll_gauge[16]; /* sagas currently in each ZM_ENROLL_* state */
  /* crypto worker steps that ran (VERIFY_JWT, KEYGEN_CSR) and the CPU time
   * they took on their threads (ns) */
  uint64_t verify_steps, verify_cpu_ns, keygen_steps, keygen_cpu_ns;
} zm_app_stats_t;

struct enroll;

typedef struct zm_app {
  uv_loop_t *loop;
  zm_config_t cfg;
  zm_grpc_server_t *grpc;
  zm_health_t health;
  zm_store_t *store;
  zm_index_t *index;
  zm_ziti_t *ziti;       /* NULL when no controller is configured */
  zm_workers_t *workers; /* key generation, JWT verification (with ziti) */
  zm_life_t *life;
  zm_collect_t *collect;
  zm_recover_t *recover;
  int stops_pending; /* collect/recover/life stops not yet done */
  uv_signal_t sigterm, sigint;
  uv_signal_t sighup; /* reloads the listener's TLS material and policy */
  const char *type_names[32]; /* service type names (authorization scopes) */
  size_t n_type_names;
  uv_timer_t lag_timer;
  unsigned busy_poll_us;  /* LOOP_BUSY_POLL_US as resolved at start-up */
  uv_prepare_t log_prep;  /* wakes the log writers once per iteration */
  uv_prepare_t busy_prep; /* LOOP_LAG_PROBE: once per iteration */
  uint64_t busy_last_ns;  /* thread CPU time at the last iteration */
  uint64_t busy_last_faults, busy_last_preempt; /* ... and its counts */
  uv_timer_t
      shutdown_timer; /* runs the last shutdown steps outside callbacks */
  uint64_t lag_expected;
  uint64_t lag_report_s; /* uv_now()/1000 of the last lag report */
  int shutting_down;
  int serving; /* on_ready ran */
  int exit_code;
  int64_t start_wall_ms;
  zm_metrics_srv_t *metrics; /* NULL without METRICS_ADDRESS */
  zm_reflect_t *reflect;
  unsigned enroll_inflight;
  /* Enrollment steps ready to run (saga.c), FIFO, run from enroll_idle a
   * slice at a time. */
  uv_idle_t enroll_idle;
  struct enroll *enroll_ready, *enroll_ready_tail;
  zm_app_stats_t stats;
} zm_app_t;

/* Runs the service until SIGTERM/SIGINT; returns the process exit code. */
int zm_app_run(const zm_config_t *cfg);
/* ZITI_ENROLLMENT_JWT_FILE: when set and a cert/key/CA file is missing,
 * enrolls the admin identity from the JWT and writes the three files
 * (src/app/bootstrap.c). Runs `loop` until done; call it before anything
 * else uses the loop. Returns 0 (files present or written) or 1. */
int zm_bootstrap_enroll(uv_loop_t *loop, const zm_config_t *cfg);
/* Opens/migrates the store and exits: returns 0 or 1. */
int zm_app_migrate_only(const zm_config_t *cfg);

/* ---- observability (src/app/observe.c) ---------------------------------- */
/* Renders every metric (the metrics listener's render callback). */
void zm_app_render_metrics(zm_prom_t *p, void *data);
/* /readyz: 1 when serving, not draining, the store open with a fresh
 * heartbeat and the controller answering (or not configured); else 0 and
 * the reason in why (may be NULL). */
int zm_app_ready(void *data, char *why, size_t cap);

/* ---- RPC handlers (ctx = zm_app_t *) ---------------------------------------
 */
void zm_rpc_resolve_identity(zm_call_t *c, const ProtobufCMessage *req,
                             void *ctx);
void zm_rpc_extend_lease(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_list_managed(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
/* the current contract's other RPCs (src/rpc/identities.c, services.c,
 * lists.c; RequestServiceIdentity in src/enroll/saga.c) */
void zm_rpc_create_agent(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_create_sandbox(zm_call_t *c, const ProtobufCMessage *req,
                           void *ctx);
void zm_rpc_create_app(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_create_runner(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_create_device(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_create_tunnel(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_delete_identity(zm_call_t *c, const ProtobufCMessage *req,
                            void *ctx);
void zm_rpc_delete_app(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_delete_runner(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_delete_device(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_delete_tunnel(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_patch_identity_roles(zm_call_t *c, const ProtobufCMessage *req,
                                 void *ctx);
void zm_rpc_identity_liveness(zm_call_t *c, const ProtobufCMessage *req,
                              void *ctx);
void zm_rpc_request_service_identity(zm_call_t *c, const ProtobufCMessage *req,
                                     void *ctx);
void zm_rpc_create_service(zm_call_t *c, const ProtobufCMessage *req,
                           void *ctx);
void zm_rpc_get_service(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_list_services(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_update_service(zm_call_t *c, const ProtobufCMessage *req,
                           void *ctx);
void zm_rpc_delete_service_rpc(zm_call_t *c, const ProtobufCMessage *req,
                               void *ctx);
void zm_rpc_create_policy(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_get_policy(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_list_policies(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_delete_policy(zm_call_t *c, const ProtobufCMessage *req, void *ctx);
void zm_rpc_list_services_by_tag(zm_call_t *c, const ProtobufCMessage *req,
                                 void *ctx);
void zm_rpc_list_identities_by_tag(zm_call_t *c, const ProtobufCMessage *req,
                                   void *ctx);
void zm_rpc_list_policies_by_tag(zm_call_t *c, const ProtobufCMessage *req,
                                 void *ctx);

/* ResolveIdentity found no mapping for the requested id: with
 * ZITI_IDENTITY_NAME_RESOLVE, an id of the form agent-<uuid>[-...] resolves
 * by identity_id = <uuid> (the Go service's fallback); otherwise, or when
 * that finds nothing, NOT_FOUND. Finishes the call (src/rpc/resolve_name.c). */
void zm_rpc_resolve_not_found(zm_call_t *call);
/* The canonical lower-case UUID of an agent-<uuid>[-...] name into out, or
 * -1 when name has another form. Pure. */
int zm_rpc_agent_name_uuid(const char *name, char out[37]);

/* An identity creation on the saga engine (src/enroll/saga.c), for
 * validated arguments (everything is copied). */
typedef struct {
  int kind;                /* zm_enroll_kind_t (include/zm/enroll.h) */
  const char *name_prefix; /* "<prefix>-<short id>"; DEVICE: the name */
  const char *const *roles;
  size_t n_roles;
  const char *external_id; /* NULL = none */
  const char *tags_json;   /* JSON object, NULL = none */
  const char *lock;  /* one creation at a time per lock key, any replica */
  int identity_type; /* stored / tombstone type */
  /* the mapping (agent, sandbox, app, runner); NULL = not recorded */
  const char *identity_id, *workload_id, *agent_col, *environment_id;
} zm_enroll_spec_t;
void zm_enroll_start(zm_app_t *app, zm_call_t *call,
                     const zm_enroll_spec_t *spec);

/* Validates a client-supplied id: non-empty, <= ZM_MAX_ID_LEN bytes, valid
 * UTF-8, no NUL/control characters. Returns NULL if valid, else the reason. */
const char *zm_rpc_check_id(const char *s, const char *field);

/* The gRPC status for a failed controller call: DEADLINE_EXCEEDED when it
 * timed out at or past `deadline` (uv_now() ms), UNAVAILABLE for a timeout
 * before it, an unreachable/overloaded controller (5xx, 429, transport
 * errors, TLS failures) or shutdown, else INTERNAL. */
zm_grpc_status_t zm_rpc_status_from_ziti(const zm_ziti_result_t *r,
                                         uint64_t deadline, uint64_t now);

/* ---- test hooks
 * -------------------------------------------------------------- */
/* With ZM_TEST_HOOKS builds, env ZM_TEST_CRASH_AT=<STATE> makes the enrollment
 * saga _exit(137) when it enters that state (crash tests). */
void zm_test_crash_point(const char *state);

#endif /* ZM_APP_H */
