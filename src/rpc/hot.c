/*
 * hot.c - the hot-path RPCs: ResolveIdentity (a cache lookup; a store read
 * on a miss when replicas share the store), ExtendIdentityLease (the
 * lifecycle's memory-first refresh) and
 * ListManagedIdentities (keyset pagination through the store). None of them
 * ever touches the controller.
 */
#include "zm/app.h"
#include "zm/b64.h"
#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <jansson.h>
#include <string.h>

#define LIST_DEFAULT_PAGE 50
#define LIST_MAX_PAGE 100
/* Page tokens are small: a JSON cursor of at most one id. */
#define LIST_TOKEN_MAX 1024

/* ===================== ResolveIdentity =================================== */

static void reply_resolved(zm_call_t *call, const zm_index_managed_t *m) {
  Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
  resp.identity_id = (char *)m->identity_id;
  resp.identity_type = m->identity_type;
  /* optional fields: present only where recorded (old callers skip them) */
  if (m->workload_id != NULL) {
    resp._workload_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___WORKLOAD_ID_WORKLOAD_ID;
    resp.workload_id = (char *)m->workload_id;
  }
  if (m->agent_id != NULL) {
    resp._agent_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___AGENT_ID_AGENT_ID;
    resp.agent_id = (char *)m->agent_id;
  }
  if (m->environment_id != NULL) {
    resp._environment_id_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE___ENVIRONMENT_ID_ENVIRONMENT_ID;
    resp.environment_id = (char *)m->environment_id;
  }
  zm_call_reply(call, &resp.base);
}

static void on_fetched(int err, const zm_index_managed_t *m, void *data) {
  zm_call_t *call = data;
  if (err == 0)
    reply_resolved(call, m);
  else if (err == ZM_E_NOT_FOUND)
    zm_rpc_resolve_not_found(call);
  else
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE, "store unavailable, retry");
}

void zm_rpc_resolve_identity(zm_call_t *call, const ProtobufCMessage *msg,
                             void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest *req =
      (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  zm_index_managed_t m;
  if (zm_life_cached_managed(app->life, req->ziti_identity_id, &m)) {
    reply_resolved(call, &m);
    return;
  }
  if (!zm_life_read_through(app->life)) {
    zm_rpc_resolve_not_found(call);
    return;
  }
  /* shared store: another replica may have created it */
  zm_life_fetch_managed(app->life, req->ziti_identity_id, on_fetched, call);
}

/* ===================== ExtendIdentityLease =============================== */

static void reply_extended(zm_call_t *call, int err) {
  if (err == 0) {
    Agynio__Api__ZitiManagement__V1__ExtendIdentityLeaseResponse resp =
        AGYNIO__API__ZITI_MANAGEMENT__V1__EXTEND_IDENTITY_LEASE_RESPONSE__INIT;
    zm_call_reply(call, &resp.base);
  } else if (err == ZM_E_NOT_FOUND) {
    /* no live record: deleting, collected, or never known. The pod
     * re-enrolls. */
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, "service identity not found");
  } else {
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
                 "store unavailable; lease not extended, retry");
  }
}

static void on_extended(int err, void *data) { reply_extended(data, err); }

void zm_rpc_extend_lease(zm_call_t *call, const ProtobufCMessage *msg,
                         void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__ExtendIdentityLeaseRequest *req =
      (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_identity_id, "ziti_identity_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  int rv = zm_life_extend(app->life, req->ziti_identity_id, on_extended, call);
  if (rv != 1)
    reply_extended(call, rv);
}

/* ===================== ListManagedIdentities ============================= */

typedef struct {
  zm_call_t *call;
  int type;
  size_t page;
} list_ctx_t;

/* Token: base64url of {"v":1,"t":<type>,"a":"<last id>"}. */
static char *make_token(zm_call_t *call, int type, const char *after) {
  json_t *j = json_pack("{s:i,s:i,s:s}", "v", 1, "t", type, "a", after);
  if (j == NULL)
    return NULL;
  char *s = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (s == NULL)
    return NULL;
  size_t n = strlen(s);
  char *tok = zm_call_alloc(call, ZM_B64URL_LEN(n) + 1);
  zm_b64url_encode(s, n, tok, ZM_B64URL_LEN(n) + 1);
  free(s);
  return tok;
}

/* Returns 0 and the cursor (arena), or -1 for a garbled token. */
static int parse_token(zm_call_t *call, const char *tok, int type,
                       const char **after) {
  size_t n = strlen(tok);
  if (n > LIST_TOKEN_MAX)
    return -1;
  char buf[LIST_TOKEN_MAX];
  long m = zm_b64url_decode(tok, n, buf, sizeof buf - 1);
  if (m <= 0)
    return -1;
  json_error_t e;
  json_t *j = json_loadb(buf, (size_t)m, JSON_REJECT_DUPLICATES, &e);
  if (j == NULL)
    return -1;
  json_int_t v = 0, t = -1;
  const char *a = NULL;
  int rv = -1;
  if (json_unpack(j, "{s:I,s:I,s:s}", "v", &v, "t", &t, "a", &a) == 0 &&
      v == 1 && t == type && zm_rpc_check_id(a, "cursor") == NULL) {
    *after = zm_call_strdup(call, a);
    rv = 0;
  }
  json_decref(j);
  return rv;
}

static void on_listed(int err, const zm_managed_row_t *rows, size_t n,
                      void *data) {
  list_ctx_t *x = data;
  zm_call_t *call = x->call;
  if (err != 0) {
    ZM_WARN("list managed identities: store: %s", zm_strerror(err));
    zm_call_fail(call, ZM_GRPC_UNAVAILABLE, "store unavailable, retry");
    return;
  }
  size_t take = n > x->page ? x->page : n;
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesResponse resp =
      AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_MANAGED_IDENTITIES_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__ManagedIdentity *items =
      zm_call_alloc(call, take * sizeof *items + 1);
  Agynio__Api__ZitiManagement__V1__ManagedIdentity **ptrs =
      zm_call_alloc(call, take * sizeof *ptrs + 1);
  Google__Protobuf__Timestamp *ts = zm_call_alloc(call, take * sizeof *ts + 1);
  for (size_t i = 0; i < take; i++) {
    agynio__api__ziti_management__v1__managed_identity__init(&items[i]);
    google__protobuf__timestamp__init(&ts[i]);
    items[i].ziti_identity_id = (char *)rows[i].ziti_identity_id;
    items[i].identity_id = (char *)rows[i].identity_id;
    items[i].identity_type = rows[i].identity_type;
    items[i].ziti_service_id =
        (char *)(rows[i].ziti_service_id != NULL ? rows[i].ziti_service_id
                                                 : "");
    int64_t ms = rows[i].created_at_ms;
    int64_t sec = ms >= 0 ? ms / 1000 : -((-ms + 999) / 1000);
    ts[i].seconds = sec;
    ts[i].nanos = (int32_t)((ms - sec * 1000) * 1000000);
    items[i].created_at = &ts[i];
    ptrs[i] = &items[i];
  }
  resp.n_identities = take;
  resp.identities = ptrs;
  resp.next_page_token = (char *)"";
  if (n > x->page && take > 0) {
    char *tok = make_token(call, x->type, rows[take - 1].ziti_identity_id);
    if (tok == NULL) {
      zm_call_fail(call, ZM_GRPC_INTERNAL, "cannot build page token");
      return;
    }
    resp.next_page_token = tok;
  }
  zm_call_reply(call, &resp.base);
}

void zm_rpc_list_managed(zm_call_t *call, const ProtobufCMessage *msg,
                         void *ctx) {
  zm_app_t *app = ctx;
  const Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesRequest *req =
      (const void *)msg;
  int type = req->identity_type;
  /* The contract's IdentityType: 3 (the old CHANNEL) is reserved but a
   * row of it may exist, so it stays a valid filter. */
  if (type < 0 || type > 8) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "unknown identity_type");
    return;
  }
  size_t page = req->page_size <= 0              ? LIST_DEFAULT_PAGE
                : req->page_size > LIST_MAX_PAGE ? LIST_MAX_PAGE
                                                 : (size_t)req->page_size;
  const char *after = "";
  if (req->page_token != NULL && req->page_token[0] != '\0' &&
      parse_token(call, req->page_token, type, &after) != 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "invalid page_token");
    return;
  }
  list_ctx_t *x = zm_call_alloc(call, sizeof *x);
  x->call = call;
  x->type = type;
  x->page = page;
  /* one extra row tells whether another page exists */
  zm_store_list_managed(app->store, type, after, page + 1, on_listed, x);
}
