/*
 * identities.c - the identity RPCs of the current contract:
 * CreateAgentIdentity (with workload, tags, extra roles, class and
 * environment), CreateSandboxIdentity, CreateAppIdentity,
 * CreateRunnerIdentity, CreateDeviceIdentity, CreateTunnelIdentity (each a
 * kind of the saga engine, src/enroll/saga.c: durable intent, compensation,
 * recovery), DeleteIdentity, DeleteAppIdentity, DeleteRunnerIdentity,
 * DeleteDeviceIdentity, DeleteTunnelIdentity (every DELETE behind a durable
 * tombstone, through the lifecycle), PatchIdentityRoleAttributes and
 * GetIdentityLiveness. Validation, names, role attributes and externalIds
 * as the Go service (shared behaviour.md); where it falls short of its
 * contract, README.md says what this one does instead.
 */
#include "rpc_int.h"

#include "zm/enroll.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PB(x) Agynio__Api__ZitiManagement__V1__##x
/* identity types (agynio.api.identity.v1.IdentityType) */
enum {
  TYPE_AGENT = 1,
  TYPE_RUNNER = 2,
  TYPE_USER = 4,
  TYPE_APP = 5,
  TYPE_AGENT_INSTANCE = 6,
  TYPE_SANDBOX = 7
};
/* Rows of one platform identity looked at, at most. */
#define MAX_ROWS 100u

static int bad(zm_call_t *call, const char *why) {
  if (why == NULL)
    return 0;
  zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
  return 1;
}

static char *fmt(zm_call_t *call, const char *a, const char *b) {
  size_t n = strlen(a) + strlen(b) + 1;
  char *s = zm_call_alloc(call, n);
  snprintf(s, n, "%s%s", a, b);
  return s;
}

/* ===================== creates ============================================ */

void zm_rpc_create_agent(zm_call_t *call, const ProtobufCMessage *msg,
                         void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateAgentIdentityRequest) *req = (const void *)msg;
  char agent[37], workload[37], cls[37], env[37];
  const char *why = NULL;
  if (bad(call, zm_rpc_uuid(call, req->agent_id, "agent_id", agent)))
    return;
  /* A caller built from the 6-RPC contract sends no workload: it keeps the
   * behaviour it was built against (externalId = agent id, type AGENT). */
  int legacy = req->workload_id == NULL || req->workload_id[0] == '\0';
  if (!legacy &&
      bad(call, zm_rpc_uuid(call, req->workload_id, "workload_id", workload)))
    return;
  int has_cls = req->agent_class_id && req->agent_class_id[0];
  int has_env = req->environment_id && req->environment_id[0];
  if (has_cls &&
      bad(call, zm_rpc_uuid(call, req->agent_class_id, "agent_class_id", cls)))
    return;
  if (has_env &&
      bad(call, zm_rpc_uuid(call, req->environment_id, "environment_id", env)))
    return;
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  const char *base[3] = {"agents", fmt(call, "agent-", agent),
                         legacy ? NULL : fmt(call, "workload-", workload)};
  size_t n_roles;
  const char **roles = zm_rpc_merge_roles(
      call, base, legacy ? 2 : 3, req->additional_role_attributes,
      req->n_additional_role_attributes, &n_roles, &why);
  if (bad(call, why))
    return;
  zm_enroll_spec_t sp = {
      .kind = ZM_ENROLL_KIND_AGENT,
      .name_prefix = fmt(call, "agent-", agent),
      .roles = roles,
      .n_roles = n_roles,
      .external_id = legacy ? agent : workload,
      .tags_json = tags,
      .lock = legacy ? agent : fmt(call, "workload:", workload),
      .identity_type = legacy ? TYPE_AGENT : TYPE_AGENT_INSTANCE,
      .identity_id = agent,
      .workload_id = legacy ? NULL : workload,
      /* the Go service's agent_id column holds the agent CLASS */
      .agent_col = legacy    ? agent
                   : has_cls ? cls
                             : NULL,
      .environment_id = has_env ? env : NULL,
  };
  zm_enroll_start(app, call, &sp);
}

void zm_rpc_create_sandbox(zm_call_t *call, const ProtobufCMessage *msg,
                           void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateSandboxIdentityRequest) *req = (const void *)msg;
  char sandbox[37], owner[37], env[37], workload[37];
  const char *why = NULL;
  if (bad(call, zm_rpc_uuid(call, req->sandbox_id, "sandbox_id", sandbox)) ||
      bad(call, zm_rpc_uuid(call, req->owner_id, "owner_id", owner)) ||
      bad(call,
          zm_rpc_uuid(call, req->environment_id, "environment_id", env)) ||
      bad(call, zm_rpc_uuid(call, req->workload_id, "workload_id", workload)))
    return;
  char *org =
      zm_rpc_required(call, req->organization_id, "organization_id", &why);
  if (bad(call, why))
    return;
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  const char *base[6] = {"agents",
                         fmt(call, "sandbox-", sandbox),
                         fmt(call, "sandbox-owner-", owner),
                         fmt(call, "environment-", env),
                         fmt(call, "organization-", org),
                         fmt(call, "workload-", workload)};
  size_t n_roles;
  const char **roles =
      zm_rpc_merge_roles(call, base, 6, req->additional_role_attributes,
                         req->n_additional_role_attributes, &n_roles, &why);
  if (bad(call, why))
    return;
  zm_enroll_spec_t sp = {.kind = ZM_ENROLL_KIND_SANDBOX,
                         .name_prefix = fmt(call, "sandbox-", sandbox),
                         .roles = roles,
                         .n_roles = n_roles,
                         .external_id = workload,
                         .tags_json = tags,
                         .lock = fmt(call, "workload:", workload),
                         .identity_type = TYPE_SANDBOX,
                         .identity_id = sandbox,
                         .workload_id = workload,
                         .environment_id = env};
  zm_enroll_start(app, call, &sp);
}

void zm_rpc_create_app(zm_call_t *call, const ProtobufCMessage *msg,
                       void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateAppIdentityRequest) *req = (const void *)msg;
  char id[37];
  const char *why = NULL;
  if (bad(call, zm_rpc_uuid(call, req->identity_id, "identity_id", id)))
    return;
  char *slug = zm_rpc_required(call, req->slug, "slug", &why);
  if (bad(call, why))
    return;
  if (strlen(slug) > 200) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "slug is too long");
    return;
  }
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  const char *base[2] = {"apps", fmt(call, "app-", id)};
  size_t n_roles;
  const char **roles =
      zm_rpc_merge_roles(call, base, 2, req->additional_role_attributes,
                         req->n_additional_role_attributes, &n_roles, &why);
  if (bad(call, why))
    return;
  zm_enroll_spec_t sp = {.kind = ZM_ENROLL_KIND_APP,
                         .name_prefix = fmt(call, "app-", slug),
                         .roles = roles,
                         .n_roles = n_roles,
                         .external_id = id,
                         .tags_json = tags,
                         .lock = fmt(call, "app:", id),
                         .identity_type = TYPE_APP,
                         .identity_id = id};
  zm_enroll_start(app, call, &sp);
}

void zm_rpc_create_runner(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateRunnerIdentityRequest) *req = (const void *)msg;
  char id[37];
  const char *why = NULL;
  if (bad(call, zm_rpc_uuid(call, req->runner_id, "runner_id", id)))
    return;
  if (req->n_role_attributes == 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "role_attributes is required");
    return;
  }
  if (req->n_role_attributes > ZM_RPC_MAX_ROLES) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "too many role attributes");
    return;
  }
  for (size_t i = 0; i < req->n_role_attributes; i++) {
    const char *r = req->role_attributes[i];
    if (strlen(r) > ZM_RPC_MAX_STR ||
        (r[0] && zm_rpc_check_id(r, "role_attributes") != NULL)) {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "role_attributes: entries must be valid UTF-8 of bounded "
                   "length");
      return;
    }
  }
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  zm_enroll_spec_t sp = {.kind = ZM_ENROLL_KIND_RUNNER,
                         .name_prefix = fmt(call, "runner-", id),
                         /* verbatim, as the Go service (no merge) */
                         .roles = (const char *const *)req->role_attributes,
                         .n_roles = req->n_role_attributes,
                         .external_id = id,
                         .tags_json = tags,
                         .lock = fmt(call, "runner:", id),
                         .identity_type = TYPE_RUNNER,
                         .identity_id = id};
  zm_enroll_start(app, call, &sp);
}

void zm_rpc_create_device(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateDeviceIdentityRequest) *req = (const void *)msg;
  char user[37];
  const char *why = NULL;
  if (bad(call,
          zm_rpc_uuid(call, req->user_identity_id, "user_identity_id", user)))
    return;
  char *name = zm_rpc_required(call, req->name, "name", &why);
  if (bad(call, why))
    return;
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  const char *base[2] = {"devices", fmt(call, "user-", user)};
  size_t n_roles;
  const char **roles =
      zm_rpc_merge_roles(call, base, 2, req->additional_role_attributes,
                         req->n_additional_role_attributes, &n_roles, &why);
  if (bad(call, why))
    return;
  zm_enroll_spec_t sp = {.kind = ZM_ENROLL_KIND_DEVICE,
                         .name_prefix = name,
                         .roles = roles,
                         .n_roles = n_roles,
                         .external_id = user,
                         .tags_json = tags,
                         .identity_type = TYPE_USER};
  zm_enroll_start(app, call, &sp);
}

void zm_rpc_create_tunnel(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateTunnelIdentityRequest) *req = (const void *)msg;
  const char *why = NULL;
  char *net = zm_rpc_required(call, req->network_id, "network_id", &why);
  if (bad(call, why))
    return;
  char *cred = zm_rpc_required(call, req->tunnel_credential_id,
                               "tunnel_credential_id", &why);
  if (bad(call, why))
    return;
  char *tags =
      zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (bad(call, why))
    return;
  const char *roles[2] = {"tunnels", fmt(call, "network-", net)};
  zm_enroll_spec_t sp = {.kind = ZM_ENROLL_KIND_TUNNEL,
                         .name_prefix = fmt(call, "tunnel-", cred),
                         .roles = roles,
                         .n_roles = 2,
                         .external_id = cred,
                         .tags_json = tags};
  zm_enroll_start(app, call, &sp);
}

/* ===================== deletes ============================================ */

typedef struct {
  zm_app_t *app;
  zm_rpc_done_cb cb;
  void *data;
  char *id;
} anydel_t;

static void on_any_condemned(int err, void *data) {
  anydel_t *d = data;
  d->cb(err,
        err == 0 ? NULL
                 : "controller: delete identity failed; it stays "
                   "DELETING and is retried in the background",
        d->data);
  free(d->id);
  free(d);
}

static void on_any_retired(int err, void *data) {
  anydel_t *d = data;
  if (err == ZM_E_NOT_FOUND) {
    /* no mapping: tombstone it as an identity we were asked to delete */
    zm_life_condemn(d->app->life, NULL, d->id, 0, on_any_condemned, d);
    return;
  }
  if (err == ZM_E_STORE) {
    d->cb(err, "store unavailable; retry", d->data);
    free(d->id);
    free(d);
    return;
  }
  on_any_condemned(err, d);
}

void zm_rpc_delete_identity_any(zm_app_t *app, const char *id,
                                zm_rpc_done_cb cb, void *data) {
  anydel_t *d = zm_xcalloc(1, sizeof *d);
  d->app = app;
  d->cb = cb;
  d->data = data;
  d->id = zm_xstrdup(id);
  zm_life_retire_managed(app->life, d->id, on_any_retired, d);
}

static zm_grpc_status_t status_of(int err) {
  if (err == ZM_E_STORE)
    return ZM_GRPC_UNAVAILABLE;
  zm_ziti_result_t r = {.err = err};
  return zm_rpc_status_from_ziti(&r, UINT64_MAX, 0);
}

static int need_ziti(zm_app_t *app, zm_call_t *call) {
  if (app->ziti != NULL)
    return 0;
  zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
               "no OpenZiti controller configured (ZITI_CONTROLLER_URL)");
  return 1;
}

/* DeleteIdentity, DeleteDeviceIdentity, DeleteTunnelIdentity: idempotent
 * (a missing mapping or a controller 404 is OK). */
static void on_simple_deleted(int err, const char *msg, void *data) {
  zm_call_t *call = data;
  if (err != 0) {
    zm_call_fail(call, status_of(err), msg);
    return;
  }
  Agynio__Api__ZitiManagement__V1__DeleteIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_IDENTITY_RESPONSE__INIT;
  /* every Delete*Response is an empty message: the same bytes */
  zm_call_reply(call, &resp.base);
}

static void refuse_service(zm_call_t *call) {
  zm_call_fail(call, ZM_GRPC_FAILED_PRECONDITION,
               "ziti_identity_id is a service identity: it goes when its "
               "lease runs out");
}

typedef struct {
  zm_call_t *call;
  zm_app_t *app;
  char id[];
} simple_t;

static void on_service_checked(int err, void *data) {
  simple_t *s = data;
  if (err == 0)
    refuse_service(s->call);
  else if (err == ZM_E_NOT_FOUND)
    zm_rpc_delete_identity_any(s->app, s->id, on_simple_deleted, s->call);
  else
    zm_call_fail(s->call, ZM_GRPC_UNAVAILABLE, "store unavailable; retry");
  free(s);
}

static void delete_simple(zm_call_t *call, zm_app_t *app, const char *id) {
  const char *why = zm_rpc_check_id(id, "ziti_identity_id");
  if (bad(call, why) || need_ziti(app, call))
    return;
  /* A leased identity deleted here would leave its lease record LIVE: the
   * pod's refreshes would be answered OK for an identity that is gone. */
  size_t len = strlen(id);
  simple_t *s = zm_xmalloc(sizeof *s + len + 1);
  s->call = call;
  s->app = app;
  memcpy(s->id, id, len + 1);
  int is = zm_life_is_service(app->life, s->id, on_service_checked, s);
  if (is < 0)
    return;
  free(s);
  if (is)
    refuse_service(call);
  else
    zm_rpc_delete_identity_any(app, id, on_simple_deleted, call);
}

void zm_rpc_delete_identity(zm_call_t *call, const ProtobufCMessage *msg,
                            void *ctx) {
  const PB(DeleteIdentityRequest) *req = (const void *)msg;
  delete_simple(call, ctx, req->ziti_identity_id);
}

void zm_rpc_delete_device(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  const PB(DeleteDeviceIdentityRequest) *req = (const void *)msg;
  delete_simple(call, ctx, req->ziti_identity_id);
}

void zm_rpc_delete_tunnel(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  const PB(DeleteTunnelIdentityRequest) *req = (const void *)msg;
  delete_simple(call, ctx, req->ziti_identity_id);
}

/* ---- DeleteAppIdentity / DeleteRunnerIdentity ----------------------------
 */

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  int runner;
  char identity_id[37];
  char *service_id; /* arena */
  char **zids;      /* arena */
  size_t n, next;
  int missing_sid; /* an app's rows name no service: an error, once deleted */
} appdel_t;

static void appdel_next(appdel_t *d);

static void on_app_service_deleted(int err, const char *msg, void *data) {
  appdel_t *d = data;
  if (err != 0) {
    zm_call_fail(d->call, status_of(err), msg);
    return;
  }
  Agynio__Api__ZitiManagement__V1__DeleteAppIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_APP_IDENTITY_RESPONSE__INIT;
  zm_call_reply(d->call, &resp.base);
}

static void on_app_identity_deleted(int err, const char *msg, void *data) {
  appdel_t *d = data;
  if (err != 0) {
    zm_call_fail(d->call, status_of(err), msg);
    return;
  }
  appdel_next(d);
}

static void appdel_next(appdel_t *d) {
  if (d->next < d->n) {
    zm_rpc_delete_identity_any(d->app, d->zids[d->next++],
                               on_app_identity_deleted, d);
    return;
  }
  if (d->missing_sid) {
    char m[128];
    snprintf(m, sizeof m, "managed identity %s missing ziti service id",
             d->identity_id);
    zm_call_fail(d->call, ZM_GRPC_INTERNAL, m);
    return;
  }
  if (d->service_id == NULL || d->service_id[0] == '\0') {
    on_app_service_deleted(0, NULL, d); /* runner without a service */
    return;
  }
  zm_rpc_delete_service(d->app, d->service_id, 0, on_app_service_deleted, d);
}

static void on_app_rows(int err, const zm_managed_row_t *rows, size_t n,
                        void *data) {
  appdel_t *d = data;
  if (err != 0) {
    zm_call_fail(d->call, ZM_GRPC_UNAVAILABLE, "store unavailable; retry");
    return;
  }
  if (n == 0 && d->runner) {
    zm_call_fail(d->call, ZM_GRPC_NOT_FOUND, "managed identity not found");
    return;
  }
  const char *row_sid = NULL;
  d->zids = zm_call_alloc(d->call, (n + 1) * sizeof *d->zids);
  for (size_t i = 0; i < n; i++) {
    d->zids[i] = zm_call_strdup(d->call, rows[i].ziti_identity_id);
    if (row_sid == NULL && rows[i].ziti_service_id != NULL &&
        rows[i].ziti_service_id[0] != '\0')
      row_sid = rows[i].ziti_service_id;
  }
  d->n = n;
  if ((d->service_id == NULL || d->service_id[0] == '\0') && row_sid)
    d->service_id = zm_call_strdup(d->call, row_sid);
  if (!d->runner && (d->service_id == NULL || d->service_id[0] == '\0')) {
    if (n == 0) {
      zm_call_fail(d->call, ZM_GRPC_INVALID_ARGUMENT,
                   "ziti_service_id is required when managed identity is "
                   "missing");
      return;
    }
    /* as the Go service: its identities are deleted first, then the
     * missing service id is the error */
    d->missing_sid = 1;
  }
  appdel_next(d);
}

static void delete_app_or_runner(zm_call_t *call, zm_app_t *app, int runner,
                                 const char *identity_id,
                                 const char *service_id) {
  appdel_t *d = zm_call_alloc(call, sizeof *d);
  memset(d, 0, sizeof *d);
  if (bad(call, zm_rpc_uuid(call, identity_id, "identity_id", d->identity_id)))
    return;
  if (service_id != NULL && service_id[0] != '\0' &&
      bad(call, zm_rpc_check_id(service_id, "ziti_service_id")))
    return;
  if (need_ziti(app, call))
    return;
  d->app = app;
  d->call = call;
  d->runner = runner;
  d->service_id = service_id ? zm_call_strdup(call, service_id) : NULL;
  zm_store_find_managed(app->store, d->identity_id, MAX_ROWS, on_app_rows, d);
}

void zm_rpc_delete_app(zm_call_t *call, const ProtobufCMessage *msg,
                       void *ctx) {
  const PB(DeleteAppIdentityRequest) *req = (const void *)msg;
  delete_app_or_runner(call, ctx, 0, req->identity_id, req->ziti_service_id);
}

void zm_rpc_delete_runner(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  const PB(DeleteRunnerIdentityRequest) *req = (const void *)msg;
  delete_app_or_runner(call, ctx, 1, req->identity_id, req->ziti_service_id);
}

/* ===================== PatchIdentityRoleAttributes ======================== */

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  const PB(PatchIdentityRoleAttributesRequest) * req;
  char *path;
} patch_t;

static void on_patched(const zm_ziti_result_t *r, void *data) {
  patch_t *p = data;
  if (r->err != 0) {
    zm_rpc_fail_ziti(p->call, r, "patch ziti identity role attributes",
                     "ziti identity not found");
    return;
  }
  Agynio__Api__ZitiManagement__V1__PatchIdentityRoleAttributesResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__PATCH_IDENTITY_ROLE_ATTRIBUTES_RESPONSE__INIT;
  zm_call_reply(p->call, &resp.base);
}

static int in_list(char *const *v, size_t n, const char *s) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(v[i], s) == 0)
      return 1;
  return 0;
}

static void on_patch_read(const zm_ziti_result_t *r, void *data) {
  patch_t *p = data;
  if (r->err != 0) {
    zm_rpc_fail_ziti(p->call, r, "get ziti identity",
                     "ziti identity not found");
    return;
  }
  json_t *cur = json_object_get(json_object_get((json_t *)r->json, "data"),
                                "roleAttributes");
  json_t *out = json_array();
  size_t i;
  json_t *v;
  /* current (deduplicated) minus remove, then add; remove wins */
  json_array_foreach(cur, i, v) {
    const char *s = json_string_value(v);
    if (s == NULL || in_list(p->req->remove, p->req->n_remove, s))
      continue;
    int dup = 0;
    for (size_t k = 0; k < json_array_size(out) && !dup; k++)
      dup = strcmp(json_string_value(json_array_get(out, k)), s) == 0;
    if (!dup)
      json_array_append_new(out, json_string(s));
  }
  for (size_t a = 0; a < p->req->n_add; a++) {
    const char *s = p->req->add[a];
    if (in_list(p->req->remove, p->req->n_remove, s))
      continue;
    int dup = 0;
    for (size_t k = 0; k < json_array_size(out) && !dup; k++)
      dup = strcmp(json_string_value(json_array_get(out, k)), s) == 0;
    if (!dup)
      json_array_append_new(out, json_string(s));
  }
  json_t *body = json_pack("{s:o}", "roleAttributes", out);
  char *text = json_dumps(body, JSON_COMPACT);
  json_decref(body);
  zm_ziti_call(p->app->ziti, "PATCH", p->path, text, zm_call_deadline(p->call),
               on_patched, p);
  free(text);
}

void zm_rpc_patch_identity_roles(zm_call_t *call, const ProtobufCMessage *msg,
                                 void *ctx) {
  zm_app_t *app = ctx;
  const PB(PatchIdentityRoleAttributesRequest) *req = (const void *)msg;
  if (bad(call, zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id")) ||
      need_ziti(app, call))
    return;
  if (req->n_add > ZM_RPC_MAX_ROLES || req->n_remove > ZM_RPC_MAX_ROLES) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "too many role attributes");
    return;
  }
  for (size_t i = 0; i < req->n_add; i++) {
    json_t *t = json_string(req->add[i]);
    if (t == NULL || strlen(req->add[i]) > ZM_RPC_MAX_STR) {
      json_decref(t);
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "add: entries must be valid UTF-8 of bounded length");
      return;
    }
    json_decref(t);
  }
  patch_t *p = zm_call_alloc(call, sizeof *p);
  p->app = app;
  p->call = call;
  p->req = req;
  char *path = zm_ziti_path("identities", req->ziti_identity_id, NULL);
  p->path = zm_call_strdup(call, path);
  free(path);
  zm_ziti_call(app->ziti, "GET", p->path, NULL, zm_call_deadline(call),
               on_patch_read, p);
}

/* ===================== GetIdentityLiveness ================================ */

static void on_liveness(const zm_ziti_result_t *r, void *data) {
  zm_call_t *call = data;
  if (r->err != 0) {
    /* the contract: a 404 is NOT_FOUND (the Go service says INTERNAL) */
    zm_rpc_fail_ziti(call, r, "get ziti identity liveness",
                     "ziti identity not found");
    return;
  }
  json_t *d = json_object_get((json_t *)r->json, "data");
  json_t *ott = json_object_get(json_object_get(d, "enrollment"), "ott");
  Agynio__Api__ZitiManagement__V1__GetIdentityLivenessResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__GET_IDENTITY_LIVENESS_RESPONSE__INIT;
  resp.enrollment_state =
      json_is_object(ott)
          ? AGYNIO__API__ZITI_MANAGEMENT__V1__IDENTITY_ENROLLMENT_STATE__IDENTITY_ENROLLMENT_STATE_PENDING
          : AGYNIO__API__ZITI_MANAGEMENT__V1__IDENTITY_ENROLLMENT_STATE__IDENTITY_ENROLLMENT_STATE_ENROLLED;
  resp.has_edge_router_connection =
      json_is_true(json_object_get(d, "hasEdgeRouterConnection"));
  zm_call_reply(call, &resp.base);
}

void zm_rpc_identity_liveness(zm_call_t *call, const ProtobufCMessage *msg,
                              void *ctx) {
  zm_app_t *app = ctx;
  const PB(GetIdentityLivenessRequest) *req = (const void *)msg;
  if (bad(call, zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id")) ||
      need_ziti(app, call))
    return;
  char *path = zm_ziti_path("identities", req->ziti_identity_id, NULL);
  zm_ziti_call(app->ziti, "GET", path, NULL, zm_call_deadline(call),
               on_liveness, call);
  free(path);
}
