/*
 * lists.c - the controller-backed list RPCs: ListServices,
 * ListServicePolicies (exact name filtered by the controller; name prefix,
 * type and roles filtered here, page after page) and ListServicesByTag,
 * ListIdentitiesByTag, ListServicePoliciesByTag (one controller page each,
 * filtered by tags in ZitiQL). Page tokens are decimal controller offsets,
 * as the Go service's. Everything is bounded: at most ZM_ZITI_LIST_MAX
 * items per page (the controller's own cap; the Go service had none), at
 * most MAX_PAGES controller pages per call (a call that reaches the bound
 * answers with what it found and a token to go on from), offsets below the
 * controller's 100000.
 */
#include "rpc_int.h"

#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PB(x) Agynio__Api__ZitiManagement__V1__##x
#define DEFAULT_PAGE 100u
#define MAX_PAGES 20u

void *zm_rpc_service_pb(zm_call_t *call, const void *json);
void *zm_rpc_policy_pb(zm_call_t *call, const void *json);

static int need_ziti(zm_app_t *app, zm_call_t *call) {
  if (app->ziti != NULL)
    return 0;
  zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
               "no OpenZiti controller configured (ZITI_CONTROLLER_URL)");
  return 1;
}

static unsigned page_size(int32_t n) {
  if (n <= 0)
    return DEFAULT_PAGE;
  return (unsigned)n > ZM_ZITI_LIST_MAX ? ZM_ZITI_LIST_MAX : (unsigned)n;
}

/* "" -> 0; a decimal <= the controller's offset bound; else -1. */
static long parse_offset(const char *t) {
  if (t == NULL || t[0] == '\0')
    return 0;
  long v = 0;
  for (const char *p = t; *p; p++) {
    if (*p < '0' || *p > '9' || p - t > 8)
      return -1;
    v = v * 10 + (*p - '0');
  }
  return v > (long)ZM_ZITI_OFFSET_MAX ? -1 : v;
}

static char *token(zm_call_t *call, long long v) {
  char b[32];
  snprintf(b, sizeof b, "%lld", v);
  return zm_call_strdup(call, b);
}

static int has_all(const json_t *arr, char *const *want, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int found = 0;
    size_t k;
    json_t *v;
    json_array_foreach((json_t *)arr, k, v) {
      const char *s = json_string_value(v);
      if (s != NULL && strcmp(s, want[i]) == 0) {
        found = 1;
        break;
      }
    }
    if (!found)
      return 0;
  }
  return 1;
}

/* ===================== ListServices / ListServicePolicies ================= */

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  int policy;
  char *filter; /* exact name, or NULL */
  char *prefix; /* "" = none */
  int type;     /* policies: 0 = any */
  char **roles, **roles2;
  size_t n_roles, n_roles2;
  unsigned limit, pages;
  long long cur;
  void **items;
  size_t n;
} list_t;

static void list_reply(list_t *x, const char *next) {
  if (x->policy) {
    PB(ListServicePoliciesResponse)
    r = AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_SERVICE_POLICIES_RESPONSE__INIT;
    r.service_policies = (void *)x->items;
    r.n_service_policies = x->n;
    r.next_page_token = (char *)next;
    zm_call_reply(x->call, &r.base);
  } else {
    PB(ListServicesResponse)
    r = AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_SERVICES_RESPONSE__INIT;
    r.services = (void *)x->items;
    r.n_services = x->n;
    r.next_page_token = (char *)next;
    zm_call_reply(x->call, &r.base);
  }
}

static int matches(const list_t *x, const json_t *it) {
  const char *nm = json_string_value(json_object_get(it, "name"));
  if (nm == NULL)
    return 0;
  if (x->prefix[0] && strncmp(nm, x->prefix, strlen(x->prefix)) != 0)
    return 0;
  if (x->policy) {
    const char *t = json_string_value(json_object_get(it, "type"));
    if (x->type == 1 && (t == NULL || strcmp(t, "Bind") != 0))
      return 0;
    if (x->type == 2 && (t == NULL || strcmp(t, "Dial") != 0))
      return 0;
    return has_all(json_object_get(it, "identityRoles"), x->roles,
                   x->n_roles) &&
           has_all(json_object_get(it, "serviceRoles"), x->roles2, x->n_roles2);
  }
  return has_all(json_object_get(it, "roleAttributes"), x->roles, x->n_roles);
}

static void list_page(list_t *x);

static void on_page(const zm_ziti_result_t *r, void *data) {
  list_t *x = data;
  if (r->err != 0) {
    zm_rpc_fail_ziti(
        x->call, r,
        x->policy ? "list ziti service policies" : "list ziti services", NULL);
    return;
  }
  json_t *arr = json_object_get((json_t *)r->json, "data");
  size_t len = json_array_size(arr);
  for (size_t i = 0; i < len; i++) {
    json_t *it = json_array_get(arr, i);
    if (!matches(x, it))
      continue;
    x->items[x->n++] = x->policy ? zm_rpc_policy_pb(x->call, it)
                                 : zm_rpc_service_pb(x->call, it);
    if (x->n == x->limit) {
      long long next = x->cur + (long long)i + 1;
      list_reply(x, next < r->total ? token(x->call, next) : "");
      return;
    }
  }
  long long next = r->page_offset + (long long)len;
  if (len == 0 || next >= r->total) {
    list_reply(x, "");
    return;
  }
  x->cur = next;
  if (++x->pages >= MAX_PAGES || next > (long long)ZM_ZITI_OFFSET_MAX) {
    /* bounded: what was found so far, and where to go on */
    list_reply(x, token(x->call, next));
    return;
  }
  list_page(x);
}

static void list_page(list_t *x) {
  zm_ziti_list(x->app->ziti, x->policy ? "/service-policies" : "/services",
               x->filter, x->limit, (unsigned long)x->cur,
               zm_call_deadline(x->call), on_page, x);
}

static list_t *list_new(zm_call_t *call, zm_app_t *app, int policy,
                        const char *name, const char *prefix, int32_t size,
                        const char *tok) {
  long off = parse_offset(tok);
  if (off < 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "invalid page_token");
    return NULL;
  }
  char *nm = zm_rpc_trim(call, name);
  list_t *x = zm_call_alloc(call, sizeof *x);
  memset(x, 0, sizeof *x);
  x->app = app;
  x->call = call;
  x->policy = policy;
  x->prefix = zm_rpc_trim(call, prefix);
  x->limit = page_size(size);
  x->cur = off;
  x->items = zm_call_alloc(call, (x->limit + 1) * sizeof *x->items);
  if (nm[0] != '\0') {
    char *q = zm_ziti_quote(nm);
    if (q == NULL) {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "name holds a character ZitiQL cannot express");
      return NULL;
    }
    size_t n = strlen(q) + 16;
    x->filter = zm_call_alloc(call, n);
    snprintf(x->filter, n, "name = %s", q);
    free(q);
  }
  return x;
}

void zm_rpc_list_services(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(ListServicesRequest) *req = (const void *)msg;
  if (need_ziti(app, call))
    return;
  list_t *x = list_new(call, app, 0, req->name, req->name_prefix,
                       req->page_size, req->page_token);
  if (x == NULL)
    return;
  x->roles = req->role_attributes;
  x->n_roles = req->n_role_attributes;
  list_page(x);
}

void zm_rpc_list_policies(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(ListServicePoliciesRequest) *req = (const void *)msg;
  if (req->type < 0 || req->type > 2) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                 "type: unknown service policy type");
    return;
  }
  if (need_ziti(app, call))
    return;
  list_t *x = list_new(call, app, 1, req->name, req->name_prefix,
                       req->page_size, req->page_token);
  if (x == NULL)
    return;
  x->type = req->type;
  x->roles = req->identity_roles;
  x->n_roles = req->n_identity_roles;
  x->roles2 = req->service_roles;
  x->n_roles2 = req->n_service_roles;
  list_page(x);
}

/* ===================== *ByTag ============================================= */

typedef enum { BT_SERVICES, BT_IDENTITIES, BT_POLICIES } bt_kind_t;

typedef struct {
  zm_call_t *call;
  bt_kind_t kind;
} bytag_t;

static int is_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* The key goes into the filter unquoted, after "tags.", as part of one
 * ZitiQL identifier (openziti/storage zitiql/ZitiQl.g4 IDENTIFIER): dotted
 * segments, each a letter then letters, '_' or '-'. No digits: the
 * controller would answer 400 INVALID_FILTER for "tags.env2". */
static int tag_key_ok(const char *k) {
  if (k == NULL || strlen(k) > 128)
    return 0;
  const char *p = k;
  for (;;) {
    if (!is_alpha(*p++))
      return 0; /* a segment starts with a letter */
    while (is_alpha(*p) || *p == '_' || *p == '-')
      p++;
    if (*p == '\0')
      return 1;
    if (*p++ != '.')
      return 0;
  }
}

static int cmp_tag(const void *a, const void *b) {
  const zm_pb_tag_t *x = *(zm_pb_tag_t *const *)a;
  const zm_pb_tag_t *y = *(zm_pb_tag_t *const *)b;
  return strcmp(x->key, y->key);
}

static void on_bytag(const zm_ziti_result_t *r, void *data) {
  bytag_t *b = data;
  zm_call_t *call = b->call;
  static const char *const WHAT[] = {"list ziti services",
                                     "list ziti identities",
                                     "list ziti service policies"};
  if (r->err != 0) {
    zm_rpc_fail_ziti(call, r, WHAT[b->kind], NULL);
    return;
  }
  json_t *arr = json_object_get((json_t *)r->json, "data");
  size_t len = json_array_size(arr);
  void **items = zm_call_alloc(call, (len + 1) * sizeof *items);
  for (size_t i = 0; i < len; i++) {
    json_t *it = json_array_get(arr, i);
    if (b->kind == BT_SERVICES) {
      items[i] = zm_rpc_service_pb(call, it);
    } else if (b->kind == BT_POLICIES) {
      items[i] = zm_rpc_policy_pb(call, it);
    } else {
      PB(OpenZitiIdentity) *o = zm_call_alloc(call, sizeof *o);
      agynio__api__ziti_management__v1__open_ziti_identity__init(o);
      const char *id = json_string_value(json_object_get(it, "id"));
      const char *nm = json_string_value(json_object_get(it, "name"));
      o->ziti_identity_id = zm_call_strdup(call, id ? id : "");
      o->name = zm_call_strdup(call, nm ? nm : "");
      o->role_attributes = zm_rpc_strings_from_json(
          call, json_object_get(it, "roleAttributes"), &o->n_role_attributes);
      o->tags = (void *)zm_rpc_tags_from_json(
          call, json_object_get(it, "tags"),
          &agynio__api__ziti_management__v1__open_ziti_identity__tags_entry__descriptor,
          &o->n_tags);
      items[i] = o;
    }
  }
  long long next = r->page_offset + r->page_limit;
  char *tok = next < r->total ? token(call, next) : (char *)"";
  if (b->kind == BT_SERVICES) {
    PB(ListServicesByTagResponse)
    resp =
        AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_SERVICES_BY_TAG_RESPONSE__INIT;
    resp.services = (void *)items;
    resp.n_services = len;
    resp.next_page_token = tok;
    zm_call_reply(call, &resp.base);
  } else if (b->kind == BT_POLICIES) {
    PB(ListServicePoliciesByTagResponse)
    resp =
        AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_SERVICE_POLICIES_BY_TAG_RESPONSE__INIT;
    resp.service_policies = (void *)items;
    resp.n_service_policies = len;
    resp.next_page_token = tok;
    zm_call_reply(call, &resp.base);
  } else {
    PB(ListIdentitiesByTagResponse)
    resp =
        AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_IDENTITIES_BY_TAG_RESPONSE__INIT;
    resp.identities = (void *)items;
    resp.n_identities = len;
    resp.next_page_token = tok;
    zm_call_reply(call, &resp.base);
  }
}

static void by_tag(zm_call_t *call, zm_app_t *app, bt_kind_t kind,
                   void *const *tags, size_t n_tags, int32_t size,
                   const char *tok) {
  long off = parse_offset(tok);
  if (off < 0) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "invalid page_token");
    return;
  }
  if (n_tags > ZM_RPC_MAX_TAGS) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, "tags: too many entries");
    return;
  }
  if (need_ziti(app, call))
    return;
  /* tags.<key>="<value>" joined by " and ", keys in a stable order; a key
   * goes into the query unquoted (ZitiQL has no quoting for it), so only
   * key characters ZitiQL accepts pass */
  zm_pb_tag_t **sorted = zm_call_alloc(call, (n_tags + 1) * sizeof *sorted);
  if (n_tags > 0) {
    memcpy(sorted, tags, n_tags * sizeof *sorted);
    qsort(sorted, n_tags, sizeof *sorted, cmp_tag);
  }
  size_t cap = 1;
  for (size_t i = 0; i < n_tags; i++)
    cap += strlen(sorted[i]->key) + 2 * strlen(sorted[i]->value) + 24;
  char *filter = zm_call_alloc(call, cap);
  filter[0] = '\0';
  size_t len = 0;
  for (size_t i = 0; i < n_tags; i++) {
    if (!tag_key_ok(sorted[i]->key) ||
        zm_rpc_check_id(sorted[i]->value[0] ? sorted[i]->value : "x",
                        "value") != NULL) {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "tags: a key must be dotted segments of a letter then "
                   "letters, '_' or '-' (ZitiQL has no digits in names; at "
                   "most 128), a value valid UTF-8");
      return;
    }
    char *q = zm_ziti_quote(sorted[i]->value);
    if (q == NULL) {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   "tags: a value holds a character ZitiQL cannot express");
      return;
    }
    len += (size_t)snprintf(filter + len, cap - len, "%stags.%s=%s",
                            i ? " and " : "", sorted[i]->key, q);
    free(q);
  }
  bytag_t *b = zm_call_alloc(call, sizeof *b);
  b->call = call;
  b->kind = kind;
  static const char *const PATH[] = {"/services", "/identities",
                                     "/service-policies"};
  zm_ziti_list(app->ziti, PATH[kind], filter, page_size(size),
               (unsigned long)off, zm_call_deadline(call), on_bytag, b);
}

void zm_rpc_list_services_by_tag(zm_call_t *call, const ProtobufCMessage *msg,
                                 void *ctx) {
  const PB(ListServicesByTagRequest) *req = (const void *)msg;
  by_tag(call, ctx, BT_SERVICES, (void *const *)req->tags, req->n_tags,
         req->page_size, req->page_token);
}

void zm_rpc_list_identities_by_tag(zm_call_t *call, const ProtobufCMessage *msg,
                                   void *ctx) {
  const PB(ListIdentitiesByTagRequest) *req = (const void *)msg;
  by_tag(call, ctx, BT_IDENTITIES, (void *const *)req->tags, req->n_tags,
         req->page_size, req->page_token);
}

void zm_rpc_list_policies_by_tag(zm_call_t *call, const ProtobufCMessage *msg,
                                 void *ctx) {
  const PB(ListServicePoliciesByTagRequest) *req = (const void *)msg;
  by_tag(call, ctx, BT_POLICIES, (void *const *)req->tags, req->n_tags,
         req->page_size, req->page_token);
}
