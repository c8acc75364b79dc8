/*
 * services.c - OpenZiti services, their host.v1 / intercept.v1 configs and
 * service policies: CreateService, GetService, UpdateService, DeleteService,
 * CreateServicePolicy, GetServicePolicy, DeleteServicePolicy.
 *
 * Every creation runs on one small create-with-intent machine (objop_t):
 *
 *   INTENT (pending "<kind>:<name>", unarmed: one creation per name, any
 *   replica) -> CHECK (the names it will create are looked up: one that
 *   exists ends the call, return_existing answers with it; nothing was
 *   sent) -> ARM (the row becomes armed: recovery may now delete whatever
 *   carries those names) -> CREATE step by step (configs, then the service
 *   that references them) -> HANDOVER (the row goes; the caller keeps the
 *   ids, as with the Go service there is no record of ours) -> reply.
 *   A failure after ARM -> COMPENSATE: what was created (ids known) is
 *   condemned (tombstone, then DELETE); an unanswered create leaves the row
 *   to recovery (src/lease/recover.c), which looks the names up once no
 *   create can land any more.
 *
 * Deletes: DeleteService reads the service's configs, records tombstones for
 * the service and the configs it owns ("<name>-host-v1" / "<name>-intercept-
 * v1") in one unit, then sends the DELETEs (service first); DeleteService
 * of the Go service left those configs behind. Every DELETE is retried from
 * its tombstone after a crash or an ambiguous answer.
 */
#include "rpc_int.h"

#include "zm/lifecycle.h"
#include "zm/log.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PB(x) Agynio__Api__ZitiManagement__V1__##x
#define HOST_V1 "NH5p4FpGR"
#define INTERCEPT_V1 "g7cIWbcGg"
#define MAX_STEPS 3
#define MAX_CHECKS 3
/* A service's configs read, at most (pages of 100). */
#define MAX_CONFIG_PAGES 10
/* Compensation gets its own time budget, not the caller's. */
#define COMPENSATE_MS 30000u

/* ===================== config bodies (behaviour.md §1.2, §2.4) ============ */

static const char *check_ranges(PB(PortRange) * *r, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (r[i]->low < 1 || r[i]->low > 65535 || r[i]->high < 1 ||
        r[i]->high > 65535)
      return "port range out of 1..65535";
    if (r[i]->high < r[i]->low)
      return "port range high < low";
  }
  return NULL;
}

static const char *check_list(char **v, size_t n, const char *field, char *buf,
                              size_t cap) {
  for (size_t i = 0; i < n; i++) {
    const char *s = v[i];
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
      s++;
    if (*s == '\0') {
      snprintf(buf, cap, "%s[%zu] is empty", field, i);
      return buf;
    }
    if (strlen(v[i]) > ZM_RPC_MAX_STR || zm_rpc_check_id(v[i], field) != NULL) {
      snprintf(buf, cap, "%s[%zu] is not valid UTF-8 of bounded length", field,
               i);
      return buf;
    }
  }
  return NULL;
}

/* Validates host_v1_config; returns NULL or the reason (static/buf). */
static const char *check_host(const PB(HostV1Config) * h, char *buf,
                              size_t cap) {
  const char *w;
  char *t;
  size_t n;
  if (!h->forward_protocol) {
    for (t = h->protocol; *t == ' '; t++)
      ;
    if (*t == '\0')
      return "protocol is required";
  }
  if (!h->forward_address) {
    for (t = h->address; *t == ' '; t++)
      ;
    if (*t == '\0')
      return "address is required";
  }
  if (!h->forward_port && (h->port < 1 || h->port > 65535))
    return "port must be between 1 and 65535";
  if (h->forward_port && (h->port < 0 || h->port > 65535))
    return "port must be at most 65535";
  if (h->forward_protocol && h->n_allowed_protocols == 0)
    return "allowed_protocols is required when forward_protocol is set";
  if (h->forward_address && h->n_allowed_addresses == 0)
    return "allowed_addresses is required when forward_address is set";
  if (h->forward_port && h->n_allowed_port_ranges == 0)
    return "allowed_port_ranges is required when forward_port is set";
  if ((w = check_list(h->allowed_protocols, h->n_allowed_protocols,
                      "allowed_protocols", buf, cap)) ||
      (w = check_list(h->allowed_addresses, h->n_allowed_addresses,
                      "allowed_addresses", buf, cap)))
    return w;
  if ((w = check_ranges(h->allowed_port_ranges, h->n_allowed_port_ranges)))
    return w;
  n = strlen(h->protocol) + strlen(h->address);
  if (n > 2 * ZM_RPC_MAX_STR ||
      (h->protocol[0] && zm_rpc_check_id(h->protocol, "protocol")) ||
      (h->address[0] && zm_rpc_check_id(h->address, "address")))
    return "protocol/address must be valid UTF-8 of bounded length";
  return NULL;
}

static const char *check_intercept(const PB(InterceptV1Config) * c, char *buf,
                                   size_t cap) {
  const char *w;
  if (c->n_protocols == 0)
    return "protocols is required";
  if (c->n_addresses == 0)
    return "addresses is required";
  if (c->n_port_ranges == 0)
    return "port_ranges is required";
  if ((w = check_list(c->protocols, c->n_protocols, "protocols", buf, cap)) ||
      (w = check_list(c->addresses, c->n_addresses, "addresses", buf, cap)))
    return w;
  return check_ranges(c->port_ranges, c->n_port_ranges);
}

static json_t *ranges_json(PB(PortRange) * *r, size_t n) {
  json_t *a = json_array();
  for (size_t i = 0; i < n; i++)
    json_array_append_new(
        a, json_pack("{s:i,s:i}", "low", r[i]->low, "high", r[i]->high));
  return a;
}

static json_t *trimmed_strings(char **v, size_t n) {
  json_t *a = json_array();
  for (size_t i = 0; i < n; i++) {
    const char *s = v[i];
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
      s++;
    size_t k = strlen(s);
    while (k > 0 && (s[k - 1] == ' ' || s[k - 1] == '\t' || s[k - 1] == '\n' ||
                     s[k - 1] == '\r'))
      k--;
    json_array_append_new(a, json_stringn(s, k));
  }
  return a;
}

static json_t *host_data(const PB(HostV1Config) * h) {
  json_t *d = json_object();
  if (!h->forward_protocol)
    json_object_set_new(d, "protocol", json_string(h->protocol));
  if (!h->forward_address)
    json_object_set_new(d, "address", json_string(h->address));
  if (!h->forward_port)
    json_object_set_new(d, "port", json_integer(h->port));
  if (h->forward_protocol)
    json_object_set_new(d, "forwardProtocol", json_true());
  if (h->forward_address)
    json_object_set_new(d, "forwardAddress", json_true());
  if (h->forward_port)
    json_object_set_new(d, "forwardPort", json_true());
  if (h->n_allowed_protocols)
    json_object_set_new(
        d, "allowedProtocols",
        trimmed_strings(h->allowed_protocols, h->n_allowed_protocols));
  if (h->n_allowed_addresses)
    json_object_set_new(
        d, "allowedAddresses",
        trimmed_strings(h->allowed_addresses, h->n_allowed_addresses));
  if (h->n_allowed_port_ranges)
    json_object_set_new(
        d, "allowedPortRanges",
        ranges_json(h->allowed_port_ranges, h->n_allowed_port_ranges));
  return d;
}

static json_t *intercept_data(const PB(InterceptV1Config) * c) {
  return json_pack("{s:o,s:o,s:o}", "protocols",
                   trimmed_strings(c->protocols, c->n_protocols), "addresses",
                   trimmed_strings(c->addresses, c->n_addresses), "portRanges",
                   ranges_json(c->port_ranges, c->n_port_ranges));
}

static char *config_body(const char *type_id, const char *name, json_t *data,
                         const char *tags) {
  json_t *b = json_pack("{s:s,s:s,s:o}", "configTypeId", type_id, "name", name,
                        "data", data);
  if (tags != NULL)
    json_object_set_new(b, "tags", json_loads(tags, 0, NULL));
  char *s = json_dumps(b, JSON_COMPACT);
  json_decref(b);
  return s;
}

/* ===================== the create-with-intent machine ===================== */

typedef struct objop objop_t;
typedef void (*objop_done_fn)(objop_t *o);

typedef struct {
  const char *coll; /* "/services", "/configs", "/service-policies" */
  int tomb_kind;
  char *name;
  char *body; /* JSON text (owned); the service's gets the config ids */
  int wants_configs;
  char *id; /* once created (owned) */
  int sent, unanswered;
} step_t;

struct objop {
  zm_app_t *app;
  zm_call_t *call;
  uint64_t deadline;
  char pname[ZM_MAX_ID_LEN + 200];
  zm_pending_row_t prow;
  int armed_kind;
  struct {
    const char *coll;
    char *name;
  } checks[MAX_CHECKS];
  size_t n_checks, next_check;
  char *existing_id; /* the first check's name exists: its id */
  char *existing_name;
  int other_exists;
  step_t steps[MAX_STEPS];
  size_t n_steps, next_step;
  int return_existing, armed;
  zm_grpc_status_t fail_status;
  char fail_msg[300];
  size_t comp_next;
  objop_done_fn on_created; /* every step created: the RPC goes on */
  objop_done_fn on_failed;  /* fail_status/fail_msg set; pending handled */
  objop_done_fn on_exists;  /* CHECK found the first name, not armed */
  void *ctx;                /* the RPC's state */
};

static void objop_free(objop_t *o) {
  for (size_t i = 0; i < o->n_checks; i++)
    free(o->checks[i].name);
  for (size_t i = 0; i < o->n_steps; i++) {
    free(o->steps[i].name);
    free(o->steps[i].body);
    free(o->steps[i].id);
  }
  free(o->existing_id);
  free(o->existing_name);
  free(o);
}

static objop_t *objop_new(zm_app_t *app, zm_call_t *call, const char *prefix,
                          const char *name, int check_kind, int armed_kind) {
  objop_t *o = zm_xcalloc(1, sizeof *o);
  o->app = app;
  o->call = call;
  uint64_t now = uv_now(app->loop);
  o->deadline = now + app->cfg.enroll_timeout_ms;
  uint64_t cd = zm_call_deadline(call);
  if (cd != 0 && cd < o->deadline)
    o->deadline = cd;
  snprintf(o->pname, sizeof o->pname, "%s:%s", prefix, name);
  o->prow.name = o->pname;
  o->prow.kind = check_kind;
  o->armed_kind = armed_kind;
  return o;
}

static void add_check(objop_t *o, const char *coll, const char *name) {
  o->checks[o->n_checks].coll = coll;
  o->checks[o->n_checks++].name = zm_xstrdup(name);
}

static step_t *add_step(objop_t *o, const char *coll, int tomb_kind,
                        const char *name, char *body) {
  step_t *s = &o->steps[o->n_steps++];
  s->coll = coll;
  s->tomb_kind = tomb_kind;
  s->name = zm_xstrdup(name);
  s->body = body;
  return s;
}

static void objop_fail(objop_t *o, zm_grpc_status_t st, const char *msg);

static void ofail_ziti(objop_t *o, const char *what,
                       const zm_ziti_result_t *r) {
  char m[300];
  snprintf(m, sizeof m, "%s: %s", what,
           r->message ? r->message : zm_strerror(r->err));
  objop_fail(o, zm_rpc_status_from_ziti(r, o->deadline, uv_now(o->app->loop)),
             m);
}

/* ---- compensation ---- */

static void comp_next(objop_t *o);

static void on_comp_done(int err, void *data) {
  objop_t *o = data;
  if (err != 0)
    ZM_WARN("objects %s: compensation delete failed (%s): it stays DELETING "
            "and is retried",
            o->pname, zm_strerror(err));
  comp_next(o);
}

static void on_comp_abandoned(int err, void *data) {
  objop_t *o = data;
  if (err != 0)
    ZM_WARN("objects %s: cannot drop the pending record (%s); recovery will",
            o->pname, zm_strerror(err));
  o->on_failed(o);
}

static void comp_next(objop_t *o) {
  /* the last created object's condemnation drops the pending row */
  size_t last = o->n_steps;
  while (last > 0 && o->steps[last - 1].id == NULL)
    last--;
  while (o->comp_next < o->n_steps && o->steps[o->comp_next].id == NULL)
    o->comp_next++;
  if (o->comp_next >= o->n_steps) {
    if (last == 0) /* nothing was created: PENDING -> GONE */
      zm_life_abandon(o->app->life, o->pname, on_comp_abandoned, o);
    else
      o->on_failed(o);
    return;
  }
  step_t *s = &o->steps[o->comp_next++];
  ZM_INFO("objects %s: compensating: deleting %s %s", o->pname, s->coll, s->id);
  zm_life_condemn_kind(o->app->life, o->comp_next == last ? o->pname : NULL,
                       s->id, s->tomb_kind, 0, on_comp_done, o);
}

static void objop_fail(objop_t *o, zm_grpc_status_t st, const char *msg) {
  if (o->fail_status == ZM_GRPC_OK) {
    o->fail_status = st;
    snprintf(o->fail_msg, sizeof o->fail_msg, "%s", msg);
  }
  ZM_WARN("objects %s: %s", o->pname, o->fail_msg);
  for (size_t i = 0; i < o->n_steps; i++) {
    if (o->steps[i].unanswered) {
      /* the create may still land: recovery resolves the armed row by
       * name once it cannot any more (and deletes what it finds) */
      ZM_WARN("objects %s: an unanswered create may still land; the "
              "pending record stays for recovery",
              o->pname);
      o->on_failed(o);
      return;
    }
  }
  if (!o->armed) {
    zm_life_abandon(o->app->life, o->pname, on_comp_abandoned, o);
    return;
  }
  zm_test_crash_point("OBJ_COMPENSATE");
  o->comp_next = 0;
  comp_next(o);
}

/* ---- steps ---- */

static void step_next(objop_t *o);

static int create_answered(const zm_ziti_result_t *r) {
  switch (r->err) {
  case ZM_E_NOT_FOUND:
  case ZM_E_UNAUTHORIZED:
  case ZM_E_EXISTS:
  case ZM_E_INVAL:
  case ZM_E_HTTP:
  case ZM_E_JSON:
    return 1;
  case ZM_E_UNAVAILABLE:
    return r->http_status == 500;
  default:
    return 0;
  }
}

static void on_step_created(const zm_ziti_result_t *r, void *data) {
  objop_t *o = data;
  step_t *s = &o->steps[o->next_step - 1];
  if (r->err != 0) {
    s->unanswered = !create_answered(r);
    char what[160];
    snprintf(what, sizeof what, "create %s %s", s->coll + 1, s->name);
    ofail_ziti(o, what, r);
    return;
  }
  s->id = zm_xstrdup(r->id);
  step_next(o);
}

static void step_next(objop_t *o) {
  if (o->next_step >= o->n_steps) {
    zm_test_crash_point("OBJ_CREATED");
    o->on_created(o);
    return;
  }
  step_t *s = &o->steps[o->next_step++];
  char crash[32];
  snprintf(crash, sizeof crash, "OBJ_CREATE_%zu", o->next_step);
  zm_test_crash_point(crash);
  if (s->wants_configs) {
    json_t *b = json_loads(s->body, 0, NULL);
    json_t *ids = json_array();
    for (size_t i = 0; i < o->n_steps; i++)
      if (o->steps[i].tomb_kind == ZM_TOMB_ZCONFIG && o->steps[i].id)
        json_array_append_new(ids, json_string(o->steps[i].id));
    json_object_set_new(b, "configs", ids);
    free(s->body);
    s->body = json_dumps(b, JSON_COMPACT);
    json_decref(b);
  }
  s->sent = 1;
  zm_ziti_call(o->app->ziti, "POST", s->coll, s->body, o->deadline,
               on_step_created, o);
}

static void on_armed(int err, void *data) {
  objop_t *o = data;
  if (err != 0) {
    objop_fail(o, ZM_GRPC_UNAVAILABLE, "store: cannot arm the intent");
    return;
  }
  o->armed = 1;
  zm_test_crash_point("OBJ_ARMED");
  step_next(o);
}

static void check_next(objop_t *o);

static void on_exists_abandoned(int err, void *data) {
  objop_t *o = data;
  (void)err; /* an unarmed row is dropped by recovery anyway */
  if (o->fail_status == ZM_GRPC_OK && o->existing_id != NULL) {
    o->on_exists(o);
    return;
  }
  o->on_failed(o);
}

static void on_checked(const zm_ziti_result_t *r, void *data) {
  objop_t *o = data;
  size_t k = o->next_check - 1;
  if (r->err != 0) {
    ofail_ziti(o, "look up existing names", r);
    return;
  }
  json_t *arr = json_object_get((json_t *)r->json, "data");
  size_t i;
  json_t *it;
  json_array_foreach(arr, i, it) {
    const char *id = json_string_value(json_object_get(it, "id"));
    const char *nm = json_string_value(json_object_get(it, "name"));
    if (id == NULL || nm == NULL || strcmp(nm, o->checks[k].name) != 0)
      continue;
    if (k == 0 && o->existing_id == NULL) {
      o->existing_id = zm_xstrdup(id);
      o->existing_name = zm_xstrdup(nm);
    } else if (k != 0) {
      o->other_exists = 1;
    }
  }
  check_next(o);
}

static void check_next(objop_t *o) {
  if (o->next_check < o->n_checks) {
    size_t k = o->next_check++;
    char *q = zm_ziti_quote(o->checks[k].name);
    if (q == NULL) {
      objop_fail(o, ZM_GRPC_INVALID_ARGUMENT,
                 "name holds a character ZitiQL cannot express");
      return;
    }
    size_t n = strlen(q) + 16;
    char *f = zm_xmalloc(n);
    snprintf(f, n, "name = %s", q);
    free(q);
    zm_ziti_list(o->app->ziti, o->checks[k].coll, f, 2, 0, o->deadline,
                 on_checked, o);
    free(f);
    return;
  }
  if (o->existing_id != NULL || o->other_exists) {
    /* With return_existing an existing object is the answer whatever else
     * exists (its configs, typically: the Go service finds the service
     * after its config creates fail, and compares nothing). */
    if (o->existing_id == NULL || !o->return_existing) {
      o->fail_status = ZM_GRPC_INTERNAL; /* as the Go service's create */
      snprintf(o->fail_msg, sizeof o->fail_msg,
               "create: %.200s exists already on the controller",
               o->existing_id ? o->checks[0].name : "a config of that name");
    }
    zm_life_abandon(o->app->life, o->pname, on_exists_abandoned, o);
    return;
  }
  zm_test_crash_point("OBJ_CHECKED");
  o->prow.kind = o->armed_kind;
  zm_life_arm(o->app->life, &o->prow, on_armed, o);
}

static void on_intent(int err, void *data) {
  objop_t *o = data;
  if (err == ZM_E_EXISTS) {
    o->fail_status = ZM_GRPC_ABORTED;
    snprintf(o->fail_msg, sizeof o->fail_msg,
             "another creation of %.200s is in progress; retry", o->pname);
    o->on_failed(o);
    return;
  }
  if (err != 0) {
    o->fail_status = ZM_GRPC_UNAVAILABLE;
    snprintf(o->fail_msg, sizeof o->fail_msg, "store: cannot record intent: %s",
             zm_strerror(err));
    o->on_failed(o);
    return;
  }
  zm_test_crash_point("OBJ_INTENT");
  check_next(o);
}

static void objop_start(objop_t *o) {
  zm_life_intent(o->app->life, &o->prow, o->deadline, on_intent, o);
}

static void on_handed_over(int err, void *data) {
  objop_t *o = data;
  if (err != 0)
    ZM_WARN("objects %s: cannot drop the pending record (%s): recovery finds "
            "the objects and DELETES them; the caller is told to retry",
            o->pname, zm_strerror(err));
  o->fail_status = err ? ZM_GRPC_UNAVAILABLE : ZM_GRPC_OK;
  if (err)
    snprintf(o->fail_msg, sizeof o->fail_msg, "store: cannot commit");
  o->on_created(o); /* second call: after HANDOVER */
}

/* ===================== common ============================================ */

static int need_ziti(zm_app_t *app, zm_call_t *call) {
  if (app->ziti != NULL)
    return 0;
  zm_call_fail(call, ZM_GRPC_UNAVAILABLE,
               "no OpenZiti controller configured (ZITI_CONTROLLER_URL)");
  return 1;
}

static PB(OpenZitiService) *
    service_from_json(zm_call_t *call, const json_t *d) {
  PB(OpenZitiService) *s = zm_call_alloc(call, sizeof *s);
  agynio__api__ziti_management__v1__open_ziti_service__init(s);
  const char *id = json_string_value(json_object_get(d, "id"));
  const char *nm = json_string_value(json_object_get(d, "name"));
  s->ziti_service_id = zm_call_strdup(call, id ? id : "");
  s->name = zm_call_strdup(call, nm ? nm : "");
  s->role_attributes = zm_rpc_strings_from_json(
      call, json_object_get(d, "roleAttributes"), &s->n_role_attributes);
  s->tags = (void *)zm_rpc_tags_from_json(
      call, json_object_get(d, "tags"),
      &agynio__api__ziti_management__v1__open_ziti_service__tags_entry__descriptor,
      &s->n_tags);
  return s;
}

static int policy_type(const char *t) {
  if (t && strcmp(t, "Bind") == 0)
    return 1;
  if (t && strcmp(t, "Dial") == 0)
    return 2;
  return 0;
}

static PB(OpenZitiServicePolicy) *
    policy_from_json(zm_call_t *call, const json_t *d) {
  PB(OpenZitiServicePolicy) *p = zm_call_alloc(call, sizeof *p);
  agynio__api__ziti_management__v1__open_ziti_service_policy__init(p);
  const char *id = json_string_value(json_object_get(d, "id"));
  const char *nm = json_string_value(json_object_get(d, "name"));
  p->ziti_service_policy_id = zm_call_strdup(call, id ? id : "");
  p->name = zm_call_strdup(call, nm ? nm : "");
  p->type = policy_type(json_string_value(json_object_get(d, "type")));
  p->identity_roles = zm_rpc_strings_from_json(
      call, json_object_get(d, "identityRoles"), &p->n_identity_roles);
  p->service_roles = zm_rpc_strings_from_json(
      call, json_object_get(d, "serviceRoles"), &p->n_service_roles);
  p->tags = (void *)zm_rpc_tags_from_json(
      call, json_object_get(d, "tags"),
      &agynio__api__ziti_management__v1__open_ziti_service_policy__tags_entry__descriptor,
      &p->n_tags);
  return p;
}

/* Exposed to lists.c. */
void *zm_rpc_service_pb(zm_call_t *call, const void *json);
void *zm_rpc_policy_pb(zm_call_t *call, const void *json);
void *zm_rpc_service_pb(zm_call_t *call, const void *json) {
  return service_from_json(call, json);
}
void *zm_rpc_policy_pb(zm_call_t *call, const void *json) {
  return policy_from_json(call, json);
}

/* ===================== CreateService ====================================== */

static void cs_reply(objop_t *o, const char *id, const char *name) {
  PB(CreateServiceResponse)
  resp = AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SERVICE_RESPONSE__INIT;
  resp.ziti_service_id = (char *)id;
  resp.ziti_service_name = (char *)name;
  zm_call_reply(o->call, &resp.base);
}

static void cs_on_exists(objop_t *o) {
  cs_reply(o, o->existing_id, o->existing_name);
  objop_free(o);
}

static void cs_on_failed(objop_t *o) {
  zm_call_fail(o->call, o->fail_status, o->fail_msg);
  objop_free(o);
}

static void cs_on_committed(objop_t *o) {
  if (o->fail_status != ZM_GRPC_OK) {
    zm_call_fail(o->call, o->fail_status, o->fail_msg);
  } else {
    step_t *svc = &o->steps[o->n_steps - 1];
    ZM_INFO("objects %s: created service %s", o->pname, svc->id);
    cs_reply(o, svc->id, svc->name);
  }
  objop_free(o);
}

static void cs_on_created(objop_t *o) {
  o->on_created = cs_on_committed;
  zm_life_handover(o->app->life, o->pname, on_handed_over, o);
}

void zm_rpc_create_service(zm_call_t *call, const ProtobufCMessage *msg,
                           void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateServiceRequest) *req = (const void *)msg;
  const char *why = NULL;
  char buf[160];
  char *name = zm_rpc_required(call, req->name, "name", &why);
  if (why == NULL && strlen(name) > 200)
    why = "name is too long";
  if (why == NULL && req->n_role_attributes == 0)
    why = "role_attributes is required";
  size_t n_roles = 0;
  if (why == NULL)
    zm_rpc_merge_roles(call, NULL, 0, req->role_attributes,
                       req->n_role_attributes, &n_roles, &why);
  char *tags =
      why ? NULL
          : zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  const PB(HostV1Config) *host =
      req->_host_v1_config_case ? req->host_v1_config : NULL;
  const PB(InterceptV1Config) *icpt =
      req->_intercept_v1_config_case ? req->intercept_v1_config : NULL;
  const char *cw = NULL;
  if (why == NULL && host != NULL && (cw = check_host(host, buf, sizeof buf)))
    snprintf(buf, sizeof buf, "host_v1_config: %s", cw), why = buf;
  char buf2[160];
  if (why == NULL && icpt != NULL &&
      (cw = check_intercept(icpt, buf2, sizeof buf2)))
    snprintf(buf, sizeof buf, "intercept_v1_config: %s", cw), why = buf;
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  if (need_ziti(app, call))
    return;
  objop_t *o = objop_new(app, call, "service", name, ZM_PENDING_ZSERVICE_CHECK,
                         ZM_PENDING_ZSERVICE);
  o->return_existing = req->return_existing;
  o->on_created = cs_on_created;
  o->on_failed = cs_on_failed;
  o->on_exists = cs_on_exists;
  char cname[300];
  add_check(o, "/services", name);
  if (host != NULL) {
    snprintf(cname, sizeof cname, "%s-host-v1", name);
    add_check(o, "/configs", cname);
    add_step(o, "/configs", ZM_TOMB_ZCONFIG, cname,
             config_body(HOST_V1, cname, host_data(host), tags));
  }
  if (icpt != NULL) {
    snprintf(cname, sizeof cname, "%s-intercept-v1", name);
    add_check(o, "/configs", cname);
    add_step(o, "/configs", ZM_TOMB_ZCONFIG, cname,
             config_body(INTERCEPT_V1, cname, intercept_data(icpt), tags));
  }
  json_t *b = json_pack(
      "{s:s,s:o,s:b}", "name", name, "roleAttributes",
      zm_rpc_json_strings(req->role_attributes, req->n_role_attributes),
      "encryptionRequired", 1);
  if (tags != NULL)
    json_object_set_new(b, "tags", json_loads(tags, 0, NULL));
  char *body = json_dumps(b, JSON_COMPACT);
  json_decref(b);
  step_t *s = add_step(o, "/services", ZM_TOMB_ZSERVICE, name, body);
  s->wants_configs = host != NULL || icpt != NULL;
  objop_start(o);
}

/* ===================== CreateServicePolicy ================================ */

static void cp_reply(objop_t *o, const char *id) {
  PB(CreateServicePolicyResponse)
  resp = AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SERVICE_POLICY_RESPONSE__INIT;
  resp.ziti_service_policy_id = (char *)id;
  zm_call_reply(o->call, &resp.base);
}

static void cp_on_exists(objop_t *o) {
  cp_reply(o, o->existing_id);
  objop_free(o);
}

static void cp_on_committed(objop_t *o) {
  if (o->fail_status != ZM_GRPC_OK)
    zm_call_fail(o->call, o->fail_status, o->fail_msg);
  else
    cp_reply(o, o->steps[0].id);
  objop_free(o);
}

static void cp_on_created(objop_t *o) {
  o->on_created = cp_on_committed;
  zm_life_handover(o->app->life, o->pname, on_handed_over, o);
}

void zm_rpc_create_policy(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(CreateServicePolicyRequest) *req = (const void *)msg;
  const char *why = NULL;
  char *name = zm_rpc_required(call, req->name, "name", &why);
  if (why == NULL && strlen(name) > 200)
    why = "name is too long";
  if (why == NULL && req->type == 0)
    why = "type: service policy type unspecified";
  if (why == NULL && req->type != 1 && req->type != 2)
    why = "type: unknown service policy type";
  if (why == NULL && req->n_identity_roles == 0)
    why = "identity_roles is required";
  if (why == NULL && req->n_service_roles == 0)
    why = "service_roles is required";
  size_t n;
  if (why == NULL)
    zm_rpc_merge_roles(call, NULL, 0, req->identity_roles,
                       req->n_identity_roles, &n, &why);
  if (why == NULL)
    zm_rpc_merge_roles(call, NULL, 0, req->service_roles, req->n_service_roles,
                       &n, &why);
  char *tags =
      why ? NULL
          : zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  if (need_ziti(app, call))
    return;
  objop_t *o = objop_new(app, call, "policy", name, ZM_PENDING_ZPOLICY_CHECK,
                         ZM_PENDING_ZPOLICY);
  o->return_existing = req->return_existing;
  o->on_created = cp_on_created;
  o->on_failed = cs_on_failed;
  o->on_exists = cp_on_exists;
  add_check(o, "/service-policies", name);
  json_t *b = json_pack(
      "{s:s,s:s,s:s,s:o,s:o,s:n}", "name", name, "type",
      req->type == 1 ? "Bind" : "Dial", "semantic", "AnyOf", "identityRoles",
      zm_rpc_json_strings(req->identity_roles, req->n_identity_roles),
      "serviceRoles",
      zm_rpc_json_strings(req->service_roles, req->n_service_roles),
      "postureCheckRoles");
  if (tags != NULL)
    json_object_set_new(b, "tags", json_loads(tags, 0, NULL));
  char *body = json_dumps(b, JSON_COMPACT);
  json_decref(b);
  add_step(o, "/service-policies", ZM_TOMB_ZPOLICY, name, body);
  objop_start(o);
}

/* ===================== GetService / GetServicePolicy ====================== */

typedef struct {
  zm_call_t *call;
  int policy;
  char *name; /* by name: the exact name wanted */
} get_t;

static void get_reply(get_t *g, const json_t *d) {
  if (g->policy) {
    PB(GetServicePolicyResponse)
    resp = AGYNIO__API__ZITI_MANAGEMENT__V1__GET_SERVICE_POLICY_RESPONSE__INIT;
    resp.service_policy = policy_from_json(g->call, d);
    zm_call_reply(g->call, &resp.base);
  } else {
    PB(GetServiceResponse)
    resp = AGYNIO__API__ZITI_MANAGEMENT__V1__GET_SERVICE_RESPONSE__INIT;
    resp.service = service_from_json(g->call, d);
    zm_call_reply(g->call, &resp.base);
  }
}

static void on_get(const zm_ziti_result_t *r, void *data) {
  get_t *g = data;
  const char *nf = g->policy ? "service policy not found" : "service not found";
  if (r->err != 0) {
    /* a 404 by id is NOT_FOUND (the Go service said INTERNAL for services;
     * callers re-provision on NOT_FOUND) */
    zm_rpc_fail_ziti(
        g->call, r,
        g->policy ? "get ziti service policy" : "detail ziti service", nf);
    return;
  }
  json_t *d = json_object_get((json_t *)r->json, "data");
  if (g->name == NULL) {
    if (!json_is_object(d)) {
      zm_call_fail(g->call, ZM_GRPC_INTERNAL, "controller: data is missing");
      return;
    }
    get_reply(g, d);
    return;
  }
  size_t i;
  json_t *it;
  json_array_foreach(d, i, it) {
    const char *nm = json_string_value(json_object_get(it, "name"));
    if (nm != NULL && strcmp(nm, g->name) == 0) {
      get_reply(g, it);
      return;
    }
  }
  zm_call_fail(g->call, ZM_GRPC_NOT_FOUND, nf);
}

static void get_object(zm_call_t *call, zm_app_t *app, int policy,
                       const char *id, const char *name) {
  const char *coll = policy ? "service-policies" : "services";
  if (id != NULL && id[0] != '\0') {
    const char *why = zm_rpc_check_id(id, "id");
    if (why != NULL) {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
      return;
    }
  } else {
    char *t = zm_rpc_trim(call, name);
    if (t[0] == '\0') {
      zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                   policy ? "ziti_service_policy_id or name is required"
                          : "ziti_service_id or name is required");
      return;
    }
    name = t;
  }
  if (need_ziti(app, call))
    return;
  get_t *g = zm_call_alloc(call, sizeof *g);
  g->call = call;
  g->policy = policy;
  g->name = NULL;
  if (id != NULL && id[0] != '\0') {
    char *path = zm_ziti_path(coll, id, NULL);
    zm_ziti_call(app->ziti, "GET", path, NULL, zm_call_deadline(call), on_get,
                 g);
    free(path);
    return;
  }
  char *q = zm_ziti_quote(name);
  if (q == NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT,
                 "name holds a character ZitiQL cannot express");
    return;
  }
  g->name = zm_call_strdup(call, name);
  size_t n = strlen(q) + 16;
  char *f = zm_xmalloc(n);
  snprintf(f, n, "name = %s", q);
  free(q);
  zm_ziti_list(app->ziti, policy ? "/service-policies" : "/services", f, 2, 0,
               zm_call_deadline(call), on_get, g);
  free(f);
}

void zm_rpc_get_service(zm_call_t *call, const ProtobufCMessage *msg,
                        void *ctx) {
  const PB(GetServiceRequest) *req = (const void *)msg;
  get_object(call, ctx, 0, req->ziti_service_id, req->name);
}

void zm_rpc_get_policy(zm_call_t *call, const ProtobufCMessage *msg,
                       void *ctx) {
  const PB(GetServicePolicyRequest) *req = (const void *)msg;
  get_object(call, ctx, 1, req->ziti_service_policy_id, req->name);
}

/* ===================== deletes ============================================ */

typedef struct {
  zm_app_t *app;
  zm_rpc_done_cb cb;
  void *data;
  uint64_t deadline;
  char *id;
  char *name;
  char **ids; /* tombstoned: [0] the service, then its configs */
  int *kinds;
  size_t n, next, cap;
  unsigned page;
  int err;
} sdel_t;

static void sdel_finish(sdel_t *d, int err, const char *msg) {
  d->cb(err, msg, d->data);
  for (size_t i = 0; i < d->n; i++)
    free(d->ids[i]);
  free(d->ids);
  free(d->kinds);
  free(d->id);
  free(d->name);
  free(d);
}

static void sdel_next(sdel_t *d);

static void on_obj_deleted(int err, void *data) {
  sdel_t *d = data;
  if (err != 0 && d->err == 0)
    d->err = err;
  sdel_next(d);
}

static void sdel_next(sdel_t *d) {
  if (d->next < d->n) {
    size_t k = d->next++;
    if (k == 1)
      zm_test_crash_point("DELSVC_CONFIGS");
    zm_life_delete_kind(d->app->life, d->ids[k], d->kinds[k], 0, on_obj_deleted,
                        d);
    return;
  }
  sdel_finish(d, d->err,
              d->err ? "controller: delete ziti service failed; it stays "
                       "DELETING and is retried in the background"
                     : NULL);
}

static void on_tombs(int err, void *data) {
  sdel_t *d = data;
  if (err != 0) {
    sdel_finish(d, ZM_E_STORE, "store unavailable; retry");
    return;
  }
  zm_test_crash_point("DELSVC_TOMBS");
  sdel_next(d);
}

static void sdel_push(sdel_t *d, const char *id, int kind) {
  if (d->n == d->cap) {
    d->cap = d->cap ? 2 * d->cap : 4;
    d->ids = zm_xrealloc(d->ids, d->cap * sizeof *d->ids);
    d->kinds = zm_xrealloc(d->kinds, d->cap * sizeof *d->kinds);
  }
  d->ids[d->n] = zm_xstrdup(id);
  d->kinds[d->n++] = kind;
}

static void sdel_page(sdel_t *d, unsigned long offset);

static void on_svc_configs(const zm_ziti_result_t *r, void *data) {
  sdel_t *d = data;
  if (r->err != 0 && r->err != ZM_E_NOT_FOUND) {
    char m[300];
    snprintf(m, sizeof m, "list the service's configs: %s",
             r->message ? r->message : zm_strerror(r->err));
    sdel_finish(d, r->err, m);
    return;
  }
  char host[300], icpt[300];
  snprintf(host, sizeof host, "%s-host-v1", d->name);
  snprintf(icpt, sizeof icpt, "%s-intercept-v1", d->name);
  json_t *arr = json_object_get((json_t *)r->json, "data");
  size_t i;
  json_t *it;
  json_array_foreach(arr, i, it) {
    const char *id = json_string_value(json_object_get(it, "id"));
    const char *nm = json_string_value(json_object_get(it, "name"));
    if (id != NULL && nm != NULL &&
        (strcmp(nm, host) == 0 || strcmp(nm, icpt) == 0))
      sdel_push(d, id, ZM_TOMB_ZCONFIG);
  }
  unsigned long next =
      (unsigned long)(r->page_offset + (long long)json_array_size(arr));
  if (r->err == 0 && json_array_size(arr) > 0 && (long long)next < r->total &&
      ++d->page < MAX_CONFIG_PAGES) {
    sdel_page(d, next);
    return;
  }
  zm_life_tomb(d->app->life, d->n, (const char *const *)d->ids, d->kinds,
               on_tombs, d);
}

static void sdel_page(sdel_t *d, unsigned long offset) {
  char *path = zm_ziti_path("services", d->id, "/configs");
  zm_ziti_list(d->app->ziti, path, NULL, 100, offset, d->deadline,
               on_svc_configs, d);
  free(path);
}

static void on_svc_read(const zm_ziti_result_t *r, void *data) {
  sdel_t *d = data;
  if (r->err == ZM_E_NOT_FOUND) {
    sdel_finish(d, 0, NULL); /* gone already (idempotent) */
    return;
  }
  if (r->err != 0) {
    char m[300];
    snprintf(m, sizeof m, "detail ziti service: %s",
             r->message ? r->message : zm_strerror(r->err));
    sdel_finish(d, r->err, m);
    return;
  }
  const char *nm = json_string_value(
      json_object_get(json_object_get((json_t *)r->json, "data"), "name"));
  d->name = zm_xstrdup(nm ? nm : "");
  sdel_push(d, d->id, ZM_TOMB_ZSERVICE);
  sdel_page(d, 0);
}

void zm_rpc_delete_service(zm_app_t *app, const char *id, uint64_t deadline,
                           zm_rpc_done_cb cb, void *data) {
  sdel_t *d = zm_xcalloc(1, sizeof *d);
  d->app = app;
  d->cb = cb;
  d->data = data;
  d->deadline = deadline;
  d->id = zm_xstrdup(id);
  char *path = zm_ziti_path("services", id, NULL);
  zm_ziti_call(app->ziti, "GET", path, NULL, deadline, on_svc_read, d);
  free(path);
}

static zm_grpc_status_t status_of(int err) {
  if (err == ZM_E_STORE)
    return ZM_GRPC_UNAVAILABLE;
  zm_ziti_result_t r = {.err = err};
  return zm_rpc_status_from_ziti(&r, UINT64_MAX, 0);
}

static void on_deleted_reply(int err, const char *msg, void *data) {
  zm_call_t *call = data;
  if (err != 0) {
    zm_call_fail(call, status_of(err), msg);
    return;
  }
  PB(DeleteServiceResponse)
  resp = AGYNIO__API__ZITI_MANAGEMENT__V1__DELETE_SERVICE_RESPONSE__INIT;
  /* every Delete*Response is empty: the same bytes */
  zm_call_reply(call, &resp.base);
}

void zm_rpc_delete_service_rpc(zm_call_t *call, const ProtobufCMessage *msg,
                               void *ctx) {
  zm_app_t *app = ctx;
  const PB(DeleteServiceRequest) *req = (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_service_id, "ziti_service_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  if (need_ziti(app, call))
    return;
  zm_rpc_delete_service(app, req->ziti_service_id, zm_call_deadline(call),
                        on_deleted_reply, call);
}

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  char *id;
} pdel_t;

static void on_policy_deleted(int err, void *data) {
  pdel_t *d = data;
  on_deleted_reply(err,
                   err ? "controller: delete ziti service policy failed; it "
                         "stays DELETING and is retried in the background"
                       : NULL,
                   d->call);
}

static void on_policy_tomb(int err, void *data) {
  pdel_t *d = data;
  if (err != 0) {
    on_deleted_reply(ZM_E_STORE, "store unavailable; retry", d->call);
    return;
  }
  zm_life_delete_kind(d->app->life, d->id, ZM_TOMB_ZPOLICY, 0,
                      on_policy_deleted, d);
}

void zm_rpc_delete_policy(zm_call_t *call, const ProtobufCMessage *msg,
                          void *ctx) {
  zm_app_t *app = ctx;
  const PB(DeleteServicePolicyRequest) *req = (const void *)msg;
  const char *why =
      zm_rpc_check_id(req->ziti_service_policy_id, "ziti_service_policy_id");
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  if (need_ziti(app, call))
    return;
  pdel_t *d = zm_call_alloc(call, sizeof *d);
  d->app = app;
  d->call = call;
  d->id = zm_call_strdup(call, req->ziti_service_policy_id);
  const char *ids[1] = {d->id};
  int kinds[1] = {ZM_TOMB_ZPOLICY};
  zm_life_tomb(app->life, 1, ids, kinds, on_policy_tomb, d);
}

/* ===================== UpdateService ====================================== */
/*
 * GET the service -> its configs (paged, bounded) -> PATCH the attached
 * host.v1 / intercept.v1 config, or create it (create-with-intent, pending
 * "config:<service id>:<name>": recovery deletes it unless the service
 * references it) -> PATCH the service with only what changes (configs,
 * tags, roleAttributes) -> HANDOVER of the created configs -> GET -> reply.
 * A failure before the service PATCH condemns the configs created here.
 * A tags-only update touches neither configs nor role attributes.
 */

typedef struct {
  zm_app_t *app;
  zm_call_t *call;
  const PB(UpdateServiceRequest) * req;
  uint64_t deadline;
  char *id, *name; /* arena */
  char *tags;      /* tags to set (JSON), or NULL */
  char *cfg_tags;  /* tags for created configs, or NULL */
  json_t *config_ids;
  char *host_cid, *icpt_cid; /* attached configs found (arena) */
  unsigned page;
  int phase;
  objop_t *made[2];
  size_t n_made, handed;
  zm_grpc_status_t fail_status;
  char fail_msg[300];
} upd_t;

static void upd_step(upd_t *u);

static void upd_finish_fail(upd_t *u) {
  json_decref(u->config_ids);
  u->config_ids = NULL;
  zm_call_fail(u->call, u->fail_status, u->fail_msg);
}

/* compensation of the configs created here, one objop after the other */
static void upd_comp_next(objop_t *o);
static void upd_on_comp_failed(objop_t *o) {
  upd_t *u = o->ctx;
  objop_free(o);
  u->made[u->handed++] = NULL;
  if (u->handed < u->n_made) {
    objop_t *n = u->made[u->handed];
    upd_comp_next(n);
    return;
  }
  upd_finish_fail(u);
}

static void upd_comp_next(objop_t *o) {
  upd_t *u = o->ctx;
  o->on_failed = upd_on_comp_failed;
  objop_fail(o, u->fail_status, u->fail_msg);
}

static void upd_fail(upd_t *u, zm_grpc_status_t st, const char *msg) {
  if (u->fail_status == ZM_GRPC_OK) {
    u->fail_status = st;
    if (msg != u->fail_msg) {
      size_t n = strlen(msg);
      if (n >= sizeof u->fail_msg)
        n = sizeof u->fail_msg - 1;
      memmove(u->fail_msg, msg, n);
      u->fail_msg[n] = '\0';
    }
  }
  ZM_WARN("update service %s: %s", u->id, u->fail_msg);
  u->handed = 0;
  if (u->n_made > 0) {
    upd_comp_next(u->made[0]);
    return;
  }
  upd_finish_fail(u);
}

static void upd_fail_ziti(upd_t *u, const char *what,
                          const zm_ziti_result_t *r) {
  if (r->err == ZM_E_NOT_FOUND && u->phase <= 1) {
    u->fail_status = ZM_GRPC_NOT_FOUND;
    snprintf(u->fail_msg, sizeof u->fail_msg, "service not found");
  } else {
    char m[300];
    snprintf(m, sizeof m, "%s: %s", what,
             r->message ? r->message : zm_strerror(r->err));
    u->fail_status =
        zm_rpc_status_from_ziti(r, u->deadline, uv_now(u->app->loop));
    snprintf(u->fail_msg, sizeof u->fail_msg, "%s", m);
  }
  upd_fail(u, u->fail_status, u->fail_msg);
}

static void on_upd_ziti(const zm_ziti_result_t *r, void *data);

static void add_config_id(upd_t *u, const char *id) {
  size_t i;
  json_t *v;
  json_array_foreach(u->config_ids, i, v) {
    if (strcmp(json_string_value(v), id) == 0)
      return;
  }
  json_array_append_new(u->config_ids, json_string(id));
}

static void on_config_created(objop_t *o) {
  upd_t *u = o->ctx;
  if (o->steps[0].id != NULL)
    add_config_id(u, o->steps[0].id);
  u->made[u->n_made++] = o;
  upd_step(u);
}

static void on_config_failed(objop_t *o) {
  upd_t *u = o->ctx;
  u->fail_status = o->fail_status;
  snprintf(u->fail_msg, sizeof u->fail_msg, "%s", o->fail_msg);
  objop_free(o);
  upd_fail(u, u->fail_status, u->fail_msg);
}

static void create_config(upd_t *u, const char *type_id, const char *suffix,
                          json_t *data) {
  char cname[300];
  snprintf(cname, sizeof cname, "%s%s", u->name, suffix);
  char key[400];
  snprintf(key, sizeof key, "%s:%s", u->id, cname);
  objop_t *o = objop_new(u->app, u->call, "config", key,
                         ZM_PENDING_ZCONFIG_CHECK, ZM_PENDING_ZCONFIG);
  o->deadline = u->deadline;
  o->ctx = u;
  o->on_created = on_config_created;
  o->on_failed = on_config_failed;
  o->on_exists = on_config_failed; /* not reached: no return_existing */
  add_check(o, "/configs", cname);
  add_step(o, "/configs", ZM_TOMB_ZCONFIG, cname,
           config_body(type_id, cname, data, u->cfg_tags));
  objop_start(o);
}

static void patch_config(upd_t *u, const char *cid, const char *suffix,
                         json_t *data) {
  char cname[300];
  snprintf(cname, sizeof cname, "%s%s", u->name, suffix);
  json_t *b = json_pack("{s:o,s:s}", "data", data, "name", cname);
  if (u->tags != NULL)
    json_object_set_new(b, "tags", json_loads(u->tags, 0, NULL));
  char *body = json_dumps(b, JSON_COMPACT);
  json_decref(b);
  char *path = zm_ziti_path("configs", cid, NULL);
  zm_ziti_call(u->app->ziti, "PATCH", path, body, u->deadline, on_upd_ziti, u);
  free(path);
  free(body);
}

static void upd_reply_get(const zm_ziti_result_t *r, upd_t *u) {
  PB(UpdateServiceResponse)
  resp = AGYNIO__API__ZITI_MANAGEMENT__V1__UPDATE_SERVICE_RESPONSE__INIT;
  resp.service =
      service_from_json(u->call, json_object_get((json_t *)r->json, "data"));
  json_decref(u->config_ids);
  u->config_ids = NULL;
  zm_call_reply(u->call, &resp.base);
}

static void upd_on_handed(objop_t *o) {
  upd_t *u = o->ctx;
  if (o->fail_status != ZM_GRPC_OK)
    ZM_WARN("update service %s: config %s: %s", u->id, o->steps[0].name,
            o->fail_msg);
  objop_free(o);
  u->made[u->handed++] = NULL;
  upd_step(u);
}

static void on_upd_configs(const zm_ziti_result_t *r, void *data) {
  upd_t *u = data;
  if (r->err != 0) {
    upd_fail_ziti(u, "list the service's configs", r);
    return;
  }
  json_t *arr = json_object_get((json_t *)r->json, "data");
  size_t i;
  json_t *it;
  json_array_foreach(arr, i, it) {
    const char *id = json_string_value(json_object_get(it, "id"));
    const char *t = json_string_value(json_object_get(it, "configTypeId"));
    if (id == NULL || t == NULL)
      continue;
    if (strcmp(t, HOST_V1) == 0 && u->host_cid == NULL)
      u->host_cid = zm_call_strdup(u->call, id);
    if (strcmp(t, INTERCEPT_V1) == 0 && u->icpt_cid == NULL)
      u->icpt_cid = zm_call_strdup(u->call, id);
  }
  long long next = r->page_offset + (long long)json_array_size(arr);
  if (json_array_size(arr) > 0 && next < r->total &&
      ++u->page < MAX_CONFIG_PAGES) {
    char *path = zm_ziti_path("services", u->id, "/configs");
    zm_ziti_list(u->app->ziti, path, NULL, 100, (unsigned long)next,
                 u->deadline, on_upd_configs, u);
    free(path);
    return;
  }
  upd_step(u);
}

/* phases: 0 GET, 1 configs listed, 2 host, 3 intercept, 4 service PATCH,
 * 5 handovers, 6 GET -> reply */
static void upd_step(upd_t *u) {
  const PB(UpdateServiceRequest) *req = u->req;
  const PB(HostV1Config) *host =
      req->_host_v1_config_case ? req->host_v1_config : NULL;
  const PB(InterceptV1Config) *icpt =
      req->_intercept_v1_config_case ? req->intercept_v1_config : NULL;
  switch (u->phase++) {
  case 0: {
    char *path = zm_ziti_path("services", u->id, NULL);
    zm_ziti_call(u->app->ziti, "GET", path, NULL, u->deadline, on_upd_ziti, u);
    free(path);
    return;
  }
  case 1:
    if (host == NULL && icpt == NULL) {
      u->phase = 4;
      upd_step(u);
      return;
    }
    {
      char *path = zm_ziti_path("services", u->id, "/configs");
      zm_ziti_list(u->app->ziti, path, NULL, 100, 0, u->deadline,
                   on_upd_configs, u);
      free(path);
    }
    return;
  case 2:
    if (host == NULL) {
      upd_step(u);
    } else if (u->host_cid != NULL) {
      add_config_id(u, u->host_cid);
      patch_config(u, u->host_cid, "-host-v1", host_data(host));
    } else {
      create_config(u, HOST_V1, "-host-v1", host_data(host));
    }
    return;
  case 3:
    if (icpt == NULL) {
      upd_step(u);
    } else if (u->icpt_cid != NULL) {
      add_config_id(u, u->icpt_cid);
      patch_config(u, u->icpt_cid, "-intercept-v1", intercept_data(icpt));
    } else {
      create_config(u, INTERCEPT_V1, "-intercept-v1", intercept_data(icpt));
    }
    return;
  case 4: {
    json_t *b = json_object();
    if (host != NULL || icpt != NULL)
      json_object_set(b, "configs", u->config_ids);
    if (u->tags != NULL)
      json_object_set_new(b, "tags", json_loads(u->tags, 0, NULL));
    if (req->_role_attributes_update_case)
      json_object_set_new(
          b, "roleAttributes",
          zm_rpc_json_strings(req->role_attributes_update->role_attributes,
                              req->role_attributes_update->n_role_attributes));
    if (json_object_size(b) == 0) {
      json_decref(b);
      upd_step(u);
      return;
    }
    zm_test_crash_point("UPDSVC_PATCH");
    char *body = json_dumps(b, JSON_COMPACT);
    json_decref(b);
    char *path = zm_ziti_path("services", u->id, NULL);
    zm_ziti_call(u->app->ziti, "PATCH", path, body, u->deadline, on_upd_ziti,
                 u);
    free(path);
    free(body);
    return;
  }
  case 5:
    if (u->handed < u->n_made) {
      u->phase = 5;
      objop_t *o = u->made[u->handed];
      o->on_created = upd_on_handed;
      zm_life_handover(u->app->life, o->pname, on_handed_over, o);
      return;
    }
    upd_step(u);
    return;
  default: {
    char *path = zm_ziti_path("services", u->id, NULL);
    zm_ziti_call(u->app->ziti, "GET", path, NULL, u->deadline, on_upd_ziti, u);
    free(path);
    return;
  }
  }
}

static void on_upd_ziti(const zm_ziti_result_t *r, void *data) {
  upd_t *u = data;
  int phase = u->phase; /* the phase whose call answered, + 1 */
  if (r->err != 0) {
    upd_fail_ziti(u, phase == 1 ? "detail ziti service" : "update ziti service",
                  r);
    return;
  }
  if (phase == 1) {
    json_t *d = json_object_get((json_t *)r->json, "data");
    const char *nm = json_string_value(json_object_get(d, "name"));
    u->name = zm_call_strdup(u->call, nm ? nm : "");
    u->config_ids = json_array();
    json_t *cur = json_object_get(d, "configs");
    size_t i;
    json_t *v;
    json_array_foreach(cur, i, v) {
      if (json_is_string(v))
        json_array_append_new(u->config_ids, json_string(json_string_value(v)));
    }
  } else if (phase >= 7) {
    upd_reply_get(r, u);
    return;
  }
  upd_step(u);
}

void zm_rpc_update_service(zm_call_t *call, const ProtobufCMessage *msg,
                           void *ctx) {
  zm_app_t *app = ctx;
  const PB(UpdateServiceRequest) *req = (const void *)msg;
  const char *why = zm_rpc_check_id(req->ziti_service_id, "ziti_service_id");
  char buf[160], buf2[160];
  const char *cw;
  if (why == NULL && req->_host_v1_config_case &&
      (cw = check_host(req->host_v1_config, buf2, sizeof buf2)))
    snprintf(buf, sizeof buf, "host_v1_config: %s", cw), why = buf;
  if (why == NULL && req->_intercept_v1_config_case &&
      (cw = check_intercept(req->intercept_v1_config, buf2, sizeof buf2)))
    snprintf(buf, sizeof buf, "intercept_v1_config: %s", cw), why = buf;
  if (why == NULL && req->_role_attributes_update_case &&
      req->role_attributes_update->n_role_attributes > ZM_RPC_MAX_ROLES)
    why = "role_attributes_update: too many role attributes";
  /* tags: tags_update wins; the deprecated map counts only when non-empty;
   * an empty map leaves the tags as they are (as the Go service) */
  char *tags = NULL;
  char *cfg_tags = NULL;
  if (why == NULL) {
    if (req->_tags_update_case) {
      tags = zm_rpc_tags_json(call, (void *const *)req->tags_update->tags,
                              req->tags_update->n_tags, &why);
    } else {
      /* the deprecated map, still sent by older callers */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      tags =
          zm_rpc_tags_json(call, (void *const *)req->tags, req->n_tags, &why);
#pragma GCC diagnostic pop
    }
    cfg_tags = tags;
  }
  if (why != NULL) {
    zm_call_fail(call, ZM_GRPC_INVALID_ARGUMENT, why);
    return;
  }
  if (need_ziti(app, call))
    return;
  upd_t *u = zm_call_alloc(call, sizeof *u);
  memset(u, 0, sizeof *u);
  u->app = app;
  u->call = call;
  u->req = req;
  u->id = zm_call_strdup(call, req->ziti_service_id);
  u->tags = tags;
  u->cfg_tags = cfg_tags;
  uint64_t now = uv_now(app->loop);
  u->deadline = now + app->cfg.enroll_timeout_ms;
  uint64_t cd = zm_call_deadline(call);
  if (cd != 0 && cd < u->deadline)
    u->deadline = cd;
  upd_step(u);
}
