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

void zm_rpc_resolve_not_found(zm_call_t *call) {
  zm_app_t *app = zm_call_ctx(call);
  const Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest *req =
      (const void *)zm_call_request(call);
  const char *id = req != NULL ? req->ziti_identity_id : NULL;
  char uuid[37];
  if (app != NULL && app->cfg.name_resolve && id != NULL &&
      zm_rpc_agent_name_uuid(id, uuid) == 0) {
    const zm_index_managed_t *m =
        zm_index_find_managed_by_identity(app->index, uuid, 36);
    if (m != NULL) {
      ZM_DEBUG("resolve: %s answered by identity_id %s (name fallback)", id,
               uuid);
      Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse resp =
          AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
      resp.identity_id = (char *)m->identity_id;
      resp.identity_type = m->identity_type;
      zm_call_reply(call, &resp.base);
      return;
    }
  }
  zm_call_fail(call, ZM_GRPC_NOT_FOUND, "identity not found");
}
