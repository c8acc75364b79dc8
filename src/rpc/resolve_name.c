/*
 * resolve_name.c - ResolveIdentity's name fallback (ZITI_IDENTITY_NAME_RESOLVE,
 * as the Go service has it since 4bd4536): when no mapping has the given
 * ziti_identity_id and the value reads agent-<36-char UUID> optionally
 * followed by -<anything>, the mapping whose identity_id is that UUID
 * answers. Off by default.
 */
#include "zm/app.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <ctype.h>
#include <string.h>

int zm_rpc_agent_name_uuid(const char *name, char out[37]) {
  static const char PREFIX[] = "agent-";
  if (strncmp(name, PREFIX, sizeof PREFIX - 1) != 0)
    return -1;
  const char *u = name + sizeof PREFIX - 1;
  for (int i = 0; i < 36; i++) {
    char c = u[i];
    int dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? c != '-' : !isxdigit((unsigned char)c))
      return -1;
    out[i] = (char)tolower((unsigned char)c);
  }
  out[36] = '\0';
  if (u[36] != '\0' && u[36] != '-')
    return -1;
  return 0;
}

static void on_found(int err, const zm_managed_row_t *rows, size_t n,
                     void *data) {
  zm_call_t *call = data;
  if (err != 0) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE, "store unavailable, retry");
    return;
  }
  if (n == 0) {
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, "managed identity not found");
    return;
  }
  ZM_DEBUG("resolve: answered by identity_id %s (name fallback)",
           rows[0].identity_id);
  Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
  resp.identity_id = (char *)rows[0].identity_id;
  resp.identity_type = rows[0].identity_type;
  if (rows[0].workload_id != NULL) {
    resp._workload_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___WORKLOAD_ID_WORKLOAD_ID;
    resp.workload_id = (char *)rows[0].workload_id;
  }
  if (rows[0].agent_id != NULL) {
    resp._agent_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___AGENT_ID_AGENT_ID;
    resp.agent_id = (char *)rows[0].agent_id;
  }
  if (rows[0].environment_id != NULL) {
    resp._environment_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___ENVIRONMENT_ID_ENVIRONMENT_ID;
    resp.environment_id = (char *)rows[0].environment_id;
  }
  zm_call_reply(call, &resp.base);
}

/* The lookup by identity_id goes to the store, whose index on identity_id
 * answers it: a scan of the in-memory table would hold the loop for
 * milliseconds per call at a million mappings, and miss mappings another
 * replica made. */
void zm_rpc_resolve_not_found(zm_call_t *call) {
  zm_app_t *app = zm_call_ctx(call);
  const Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest *req =
      (const void *)zm_call_request(call);
  const char *id = req != NULL ? req->ziti_identity_id : NULL;
  char uuid[37];
  if (app != NULL && app->cfg.name_resolve && id != NULL &&
      zm_rpc_agent_name_uuid(id, uuid) == 0) {
    zm_store_find_managed_by_identity(app->store, uuid, on_found, call);
    return;
  }
  zm_call_fail(call, ZM_GRPC_NOT_FOUND, "managed identity not found");
}
