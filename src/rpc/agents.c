/*
 * agents.c - CreateAgentIdentity and DeleteIdentity.
 *
 * CreateAgentIdentity follows the Go service: one live identity per agent.
 * Steps (each a callback, every state change through the lifecycle, so
 * durable before the controller call it guards): INTENT (pending row that
 * also locks the agent: a second concurrent call for the same agent gets
 * ABORTED, on any replica) -> REPLACE (the agent's previous identities, by
 * externalId: each retired (LIVE -> DELETING) or, without a mapping,
 * condemned as an orphan, then deleted) -> CREATE -> JWT -> COMMIT (mapping
 * + pending removal in one unit) -> reply id + JWT. A failure after CREATE
 * condemns the new identity (compensation); an unanswered create leaves the
 * pending row to recovery.
 *
 * DeleteIdentity retires the mapping (LIVE -> DELETING: the mapping goes and
 * a tombstone is recorded in one unit), then deletes on the controller; an
 * ambiguous failure leaves the tombstone, which recovery retries.
 */
#include "zm/app.h"
#include "zm/enroll.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Accepts the 36-char 8-4-4-4-12 hex form (any case); writes lower case. */
static int parse_uuid(const char *s, char out[37]) {
  if (s == NULL || strlen(s) != 36)
    return -1;
  for (int i = 0; i < 36; i++) {
    char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-')
        return -1;
    } else if (!isxdigit((unsigned char)c)) {
      return -1;
    }
    out[i] = (char)tolower((unsigned char)c);
  }
  out[36] = '\0';
  return 0;
}

/* For lifecycle callbacks that carry only the controller error. */
static zm_grpc_status_t status_of_err(int err) {
  zm_ziti_result_t r = {.err = err};
  return zm_rpc_status_from_ziti(&r, UINT64_MAX, 0);
}

void zm_rpc_create_agent(zm_call_t *call, const ProtobufCMessage *msg,
                         void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest *req =
      (const void *)msg;
  char uuid[37];
  if (req->agent_id == NULL || req->agent_id[0] == '\0') {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "agent_id is required");
    return;
  }
  if (parse_uuid(req->agent_id, uuid) != 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "agent_id must be a UUID");
    return;
  }
  zm_enroll_start_agent(app, call, uuid);
}

/* ===================== DeleteIdentity ===================================== */

typedef struct {
  zm_call_t *call;
  char *id; /* arena */
} delete_op_t;

static void on_retired(int err, void *data) {
  delete_op_t *d = data;
  if (err == ZM_E_NOT_FOUND) {
    zm_call_fail(d->call, ZM_GRPC_NOT_FOUND, "identity not found");
    return;
  }
  if (err == ZM_E_STORE) {
    zm_call_fail(d->call, ZM_GRPC_UNAVAILABLE, "store unavailable; retry");
    return;
  }
  if (err != 0) {
    zm_call_fail(d->call, status_of_err(err),
                 "controller: delete identity failed; the mapping is gone and "
                 "the delete is retried in the background");
    return;
  }
  ZM_INFO("deleted identity %s", d->id);
  Agynio__Api__ZitiManagement__V1__DeleteIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_IDENTITY_RESPONSE__INIT;
  zm_call_reply(d->call, &resp.base);
}

void zm_rpc_delete_identity(zm_call_t *call, const ProtobufCMessage *msg,
                            void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__DeleteIdentityRequest *req =
      (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  /* Without a shared store the index holds every mapping. */
  if (!zm_life_read_through(app->life) &&
      zm_index_lookup_managed(app->index, req->ziti_identity_id,
                              strlen(req->ziti_identity_id)) == NULL) {
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, "identity not found");
    return;
  }
  if (app->ziti == NULL) {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
                 "no OpenZiti controller configured");
    return;
  }
  delete_op_t *d = zm_call_alloc(call, sizeof *d);
  d->call = call;
  d->id = (char *)req->ziti_identity_id;
  zm_life_retire_managed(app->life, d->id, on_retired, d);
}
