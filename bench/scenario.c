/*
 * scenario.c - request encoding and answer verification for zm-bench.
 *
 * Verification rules (a fast wrong answer is an error, not a result):
 *  RESOLVE  hit: OK, identity_id == "a9e1c0de-0000-4000-8000-%012d" (same i),
 *                identity_type == AGENT; miss: NOT_FOUND.
 *  EXTEND   hit: OK (empty message); miss: NOT_FOUND.
 *  LIST     OK; ids strictly ascending, each with a non-empty identity_id,
 *           at most page_size rows, the first row after the previous page's
 *           last id; a non-empty next_page_token implies a non-empty page.
 *  RSI      OK; non-empty ziti_identity_id; identity_json is well-formed JSON
 *           with a non-empty "ztAPI" string and "id".{key,cert,ca} strings
 *           starting with "pem:". Checked in place: the key material is
 *           never copied, and the caller wipes the body.
 *  CREATE   OK; non-empty ziti_identity_id; enrollment_jwt has three
 *           non-empty dot-separated parts.
 *  HEALTH   OK; status SERVING.
 */
#include "scenario.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SVC "/agynio.api.ziti_management.v1.ZitiManagementService/"

/* Longest identity JSON we accept (keys + certs + CA bundle fit easily). */
#define IDJSON_MAX (1u << 20)
/* Nesting bound of the JSON checker. */
#define JSON_MAX_DEPTH 16

static const struct {
  const char *name;
  const char *alias;
  const char *path;
} OPS[ZMB_OP__COUNT] = {
    [ZMB_OP_RESOLVE] = {"resolve", "resolve", SVC "ResolveIdentity"},
    [ZMB_OP_EXTEND] = {"extend", "extend", SVC "ExtendIdentityLease"},
    [ZMB_OP_LIST] = {"list", "list", SVC "ListManagedIdentities"},
    [ZMB_OP_RSI] = {"request-service-identity", "rsi",
                    SVC "RequestServiceIdentity"},
    [ZMB_OP_CREATE] = {"create-agent", "create", SVC "CreateAgentIdentity"},
    [ZMB_OP_HEALTH] = {"health", "health", "/grpc.health.v1.Health/Check"},
    [ZMB_OP_CSVC] = {"create-service", "csvc", SVC "CreateService"},
};

static const char *const CODES[ZMB_GRPC_CODES] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *zmb_op_name(zmb_op_t op) {
  return (unsigned)op < ZMB_OP__COUNT ? OPS[op].name : "?";
}

int zmb_op_parse(const char *name) {
  for (int i = 0; i < ZMB_OP__COUNT; i++)
    if (strcmp(name, OPS[i].name) == 0 || strcmp(name, OPS[i].alias) == 0)
      return i;
  return -1;
}

const char *zmb_op_path(zmb_op_t op) {
  return (unsigned)op < ZMB_OP__COUNT ? OPS[op].path : "/";
}

const char *zmb_grpc_code_name(int code) {
  return code >= 0 && code < ZMB_GRPC_CODES ? CODES[code] : "UNKNOWN_CODE";
}

int zmb_req_expected_status(const zmb_req_t *r) {
  if ((r->op == ZMB_OP_RESOLVE || r->op == ZMB_OP_EXTEND) && r->expect_miss)
    return ZMB_GRPC_NOT_FOUND;
  return ZMB_GRPC_OK;
}

/* ---- encoding ------------------------------------------------------------ */

size_t zmb_req_encode(const zmb_req_t *r, uint8_t *buf, size_t cap) {
  char key[32], agent[64];
  const ProtobufCMessage *m = NULL;
  Agynio__Api__ZitiManagement__V1__ResolveIdentityRequest res =
      AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__ExtendIdentityLeaseRequest ext =
      AGYNIO__API__ZITI_MANAGEMENT__V1__EXTEND_IDENTITY_LEASE_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesRequest lst =
      AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_MANAGED_IDENTITIES_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityRequest rsi =
      AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest cre =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_REQUEST__INIT;
  Grpc__Health__V1__HealthCheckRequest hc =
      GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__CreateServiceRequest csv =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SERVICE_REQUEST__INIT;
  Agynio__Api__ZitiManagement__V1__HostV1Config host =
      AGYNIO__API__ZITI_MANAGEMENT__V1__HOST_V1_CONFIG__INIT;
  Agynio__Api__ZitiManagement__V1__InterceptV1Config icpt =
      AGYNIO__API__ZITI_MANAGEMENT__V1__INTERCEPT_V1_CONFIG__INIT;
  Agynio__Api__ZitiManagement__V1__PortRange pr =
      AGYNIO__API__ZITI_MANAGEMENT__V1__PORT_RANGE__INIT;
  Agynio__Api__ZitiManagement__V1__PortRange *prs[1] = {&pr};
  char *roles[1] = {(char *)"bench-services"};
  char *tcp[1] = {(char *)"tcp"};
  char addr[96];
  char *addrs[1] = {addr};

  switch (r->op) {
  case ZMB_OP_RESOLVE:
  case ZMB_OP_EXTEND:
    snprintf(key, sizeof(key), "zid-%06lld", (long long)r->key);
    if (r->op == ZMB_OP_RESOLVE) {
      res.ziti_identity_id = key;
      m = &res.base;
    } else {
      ext.ziti_identity_id = key;
      m = &ext.base;
    }
    break;
  case ZMB_OP_LIST:
    lst.identity_type =
        AGYNIO__API__IDENTITY__V1__IDENTITY_TYPE__IDENTITY_TYPE_UNSPECIFIED;
    lst.page_size = r->page_size;
    lst.page_token = (char *)(r->page_token ? r->page_token : "");
    m = &lst.base;
    break;
  case ZMB_OP_RSI:
    rsi.service_type =
        (Agynio__Api__ZitiManagement__V1__ServiceType)r->service_type;
    m = &rsi.base;
    break;
  case ZMB_OP_CREATE:
    /* agent_id must be a UUID: fixed version/variant nibbles, the seq's
     * high bits (pid, start time) and counter in the other groups. */
    snprintf(agent, sizeof(agent), "b3c0%04x-%04x-4000-8000-%012llx",
             (unsigned)((r->seq >> 48) & 0xffff),
             (unsigned)((r->seq >> 32) & 0xffff),
             (unsigned long long)(r->seq & 0xffffffffull));
    cre.agent_id = agent;
    m = &cre.base;
    break;
  case ZMB_OP_HEALTH:
    hc.service = (char *)"";
    m = &hc.base;
    break;
  case ZMB_OP_CSVC:
    /* a unique name per request: service + two configs, three creates */
    snprintf(agent, sizeof(agent), "bench-%04x-%04x-%llx",
             (unsigned)((r->seq >> 48) & 0xffff),
             (unsigned)((r->seq >> 32) & 0xffff),
             (unsigned long long)(r->seq & 0xffffffffull));
    snprintf(addr, sizeof(addr), "%s.ziti", agent);
    csv.name = agent;
    csv.n_role_attributes = 1;
    csv.role_attributes = roles;
    host.protocol = (char *)"tcp";
    host.address = (char *)"127.0.0.1";
    host.port = 8080;
    pr.low = pr.high = 443;
    icpt.n_protocols = 1;
    icpt.protocols = tcp;
    icpt.n_addresses = 1;
    icpt.addresses = addrs;
    icpt.n_port_ranges = 1;
    icpt.port_ranges = prs;
    csv._host_v1_config_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SERVICE_REQUEST___HOST_V1_CONFIG_HOST_V1_CONFIG;
    csv.host_v1_config = &host;
    csv._intercept_v1_config_case =
        AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_SERVICE_REQUEST___INTERCEPT_V1_CONFIG_INTERCEPT_V1_CONFIG;
    csv.intercept_v1_config = &icpt;
    m = &csv.base;
    break;
  default:
    return 0;
  }
  size_t n = protobuf_c_message_get_packed_size(m);
  if (n + 5 > cap || n > UINT32_MAX)
    return 0;
  buf[0] = 0;
  buf[1] = (uint8_t)(n >> 24);
  buf[2] = (uint8_t)(n >> 16);
  buf[3] = (uint8_t)(n >> 8);
  buf[4] = (uint8_t)n;
  protobuf_c_message_pack(m, buf + 5);
  return n + 5;
}

/* ---- verification helpers ------------------------------------------------ */

static zmb_verdict_t fail(zmb_verdict_t v, char *why, size_t whylen,
                          const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static zmb_verdict_t fail(zmb_verdict_t v, char *why, size_t whylen,
                          const char *fmt, ...) {
  if (why && whylen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
  }
  return v;
}

/* Splits a gRPC-framed body holding exactly one uncompressed message.
 * Returns 0 and the message span, or -1. */
static int one_message(const uint8_t *body, size_t len, const uint8_t **msg,
                       size_t *mlen) {
  if (len < 5 || body[0] != 0)
    return -1;
  size_t n = ((size_t)body[1] << 24) | ((size_t)body[2] << 16) |
             ((size_t)body[3] << 8) | body[4];
  if (n != len - 5)
    return -1;
  *msg = body + 5;
  *mlen = n;
  return 0;
}

/* -- a bounded, non-copying JSON checker for the identity file -- */

typedef struct {
  const uint8_t *s;
  size_t len, pos;
  int have_ztapi; /* top-level "ztAPI": non-empty string */
  int have_id;    /* bits: 1 key, 2 cert, 4 ca: "pem:..." strings in "id" */
} jchk_t;

static void jws(jchk_t *j) {
  while (j->pos < j->len && (j->s[j->pos] == ' ' || j->s[j->pos] == '\t' ||
                             j->s[j->pos] == '\n' || j->s[j->pos] == '\r'))
    j->pos++;
}

/* Parses a string; returns 0 and its raw (still escaped) span. */
static int jstr(jchk_t *j, size_t *start, size_t *slen) {
  if (j->pos >= j->len || j->s[j->pos] != '"')
    return -1;
  size_t p = ++j->pos;
  while (p < j->len) {
    uint8_t ch = j->s[p];
    if (ch == '"') {
      *start = j->pos;
      *slen = p - j->pos;
      j->pos = p + 1;
      return 0;
    }
    if (ch < 0x20)
      return -1;
    if (ch == '\\') {
      if (p + 1 >= j->len)
        return -1;
      uint8_t e = j->s[p + 1];
      if (e == 'u') {
        if (p + 5 >= j->len)
          return -1;
        for (int k = 2; k < 6; k++) {
          uint8_t h = j->s[p + k];
          if (!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') ||
                (h >= 'A' && h <= 'F')))
            return -1;
        }
        p += 6;
        continue;
      }
      if (!strchr("\"\\/bfnrt", e))
        return -1;
      p += 2;
      continue;
    }
    p++;
  }
  return -1;
}

static int jlit(jchk_t *j, const char *lit) {
  size_t n = strlen(lit);
  if (j->len - j->pos < n || memcmp(j->s + j->pos, lit, n) != 0)
    return -1;
  j->pos += n;
  return 0;
}

static int jnum(jchk_t *j) {
  size_t p = j->pos;
  if (p < j->len && j->s[p] == '-')
    p++;
  size_t digits = p;
  while (p < j->len &&
         ((j->s[p] >= '0' && j->s[p] <= '9') || j->s[p] == '.' ||
          j->s[p] == 'e' || j->s[p] == 'E' || j->s[p] == '+' || j->s[p] == '-'))
    p++;
  if (p == digits)
    return -1;
  j->pos = p;
  return 0;
}

/* where: 0 = nested somewhere, 1 = top-level object, 2 = the "id" object */
static int jvalue(jchk_t *j, int depth, int where, int *is_obj);

static int jobject(jchk_t *j, int depth, int where) {
  j->pos++; /* '{' */
  jws(j);
  if (j->pos < j->len && j->s[j->pos] == '}') {
    j->pos++;
    return 0;
  }
  for (;;) {
    size_t ks, kl, vs, vl;
    jws(j);
    if (jstr(j, &ks, &kl) != 0)
      return -1;
    jws(j);
    if (j->pos >= j->len || j->s[j->pos] != ':')
      return -1;
    j->pos++;
    jws(j);
    const char *key = (const char *)j->s + ks;
#define KEY_IS(lit) (kl == sizeof(lit) - 1 && memcmp(key, lit, kl) == 0)
    int child = 0;
    if (where == 1 && KEY_IS("id"))
      child = 2;
    int str_bit = 0;
    if (where == 2 && KEY_IS("key"))
      str_bit = 1;
    else if (where == 2 && KEY_IS("cert"))
      str_bit = 2;
    else if (where == 2 && KEY_IS("ca"))
      str_bit = 4;
    int is_ztapi = where == 1 && KEY_IS("ztAPI");
#undef KEY_IS
    if ((str_bit || is_ztapi) && j->pos < j->len && j->s[j->pos] == '"') {
      if (jstr(j, &vs, &vl) != 0)
        return -1;
      if (is_ztapi && vl > 0)
        j->have_ztapi = 1;
      if (str_bit && vl > 4 && memcmp(j->s + vs, "pem:", 4) == 0)
        j->have_id |= str_bit;
    } else {
      int is_obj = 0;
      if (jvalue(j, depth + 1, child, &is_obj) != 0)
        return -1;
    }
    jws(j);
    if (j->pos >= j->len)
      return -1;
    if (j->s[j->pos] == ',') {
      j->pos++;
      continue;
    }
    if (j->s[j->pos] == '}') {
      j->pos++;
      return 0;
    }
    return -1;
  }
}

static int jvalue(jchk_t *j, int depth, int where, int *is_obj) {
  size_t s, l;
  if (depth > JSON_MAX_DEPTH)
    return -1;
  jws(j);
  if (j->pos >= j->len)
    return -1;
  *is_obj = 0;
  switch (j->s[j->pos]) {
  case '{':
    *is_obj = 1;
    return jobject(j, depth, where);
  case '[':
    j->pos++;
    jws(j);
    if (j->pos < j->len && j->s[j->pos] == ']') {
      j->pos++;
      return 0;
    }
    for (;;) {
      int o;
      if (jvalue(j, depth + 1, 0, &o) != 0)
        return -1;
      jws(j);
      if (j->pos >= j->len)
        return -1;
      if (j->s[j->pos] == ',') {
        j->pos++;
        continue;
      }
      if (j->s[j->pos] == ']') {
        j->pos++;
        return 0;
      }
      return -1;
    }
  case '"':
    return jstr(j, &s, &l);
  case 't':
    return jlit(j, "true");
  case 'f':
    return jlit(j, "false");
  case 'n':
    return jlit(j, "null");
  default:
    return jnum(j);
  }
}

/* Returns 0 if s is one well-formed JSON object carrying the identity-file
 * fields, else -1 with *what naming the first thing missing. */
static int check_identity_json(const uint8_t *s, size_t len,
                               const char **what) {
  jchk_t j = {.s = s, .len = len};
  int is_obj = 0;
  jws(&j);
  if (j.pos >= len || s[j.pos] != '{') {
    *what = "not a JSON object";
    return -1;
  }
  if (jvalue(&j, 0, 1, &is_obj) != 0) {
    *what = "malformed JSON";
    return -1;
  }
  jws(&j);
  if (j.pos != len) {
    *what = "trailing bytes after JSON";
    return -1;
  }
  if (!j.have_ztapi) {
    *what = "no ztAPI";
    return -1;
  }
  if (j.have_id != 7) {
    *what = "id.key/id.cert/id.ca missing or not pem:";
    return -1;
  }
  return 0;
}

static int strictly_less(const char *a, const char *b) {
  return strcmp(a, b) < 0;
}

/* ---- verification ----------------------------------------------------------
 */

zmb_verdict_t zmb_resp_verify(const zmb_req_t *r, int grpc_status,
                              const uint8_t *body, size_t len,
                              zmb_list_next_t *next, char *why, size_t whylen) {
  int want = zmb_req_expected_status(r);
  const uint8_t *msg;
  size_t mlen;
  zmb_verdict_t v = ZMB_V_OK;

  if (grpc_status != want)
    return fail(ZMB_V_BAD_STATUS, why, whylen, "%s: grpc-status %d, want %d",
                zmb_op_name(r->op), grpc_status, want);
  if (want != ZMB_GRPC_OK)
    return ZMB_V_OK;
  if (one_message(body, len, &msg, &mlen) != 0)
    return fail(ZMB_V_BAD_CONTENT, why, whylen,
                "%s: body is not one uncompressed gRPC message (%zu bytes)",
                zmb_op_name(r->op), len);

  switch (r->op) {
  case ZMB_OP_RESOLVE: {
    Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse *m =
        agynio__api__ziti_management__v1__resolve_identity_response__unpack(
            NULL, mlen, msg);
    char want_id[64];
    snprintf(want_id, sizeof(want_id), "a9e1c0de-0000-4000-8000-%012lld",
             (long long)r->key);
    if (!m)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen, "resolve: undecodable reply");
    else if (strcmp(m->identity_id, want_id) != 0)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "resolve zid-%06lld: identity_id '%.64s', want '%s'",
               (long long)r->key, m->identity_id, want_id);
    else if (m->identity_type !=
             AGYNIO__API__IDENTITY__V1__IDENTITY_TYPE__IDENTITY_TYPE_AGENT)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "resolve zid-%06lld: identity_type %d, want AGENT",
               (long long)r->key, (int)m->identity_type);
    if (m)
      agynio__api__ziti_management__v1__resolve_identity_response__free_unpacked(
          m, NULL);
    return v;
  }
  case ZMB_OP_EXTEND: {
    Agynio__Api__ZitiManagement__V1__ExtendIdentityLeaseResponse *m =
        agynio__api__ziti_management__v1__extend_identity_lease_response__unpack(
            NULL, mlen, msg);
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "extend: undecodable reply");
    agynio__api__ziti_management__v1__extend_identity_lease_response__free_unpacked(
        m, NULL);
    return ZMB_V_OK;
  }
  case ZMB_OP_LIST: {
    Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesResponse *m =
        agynio__api__ziti_management__v1__list_managed_identities_response__unpack(
            NULL, mlen, msg);
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "list: undecodable reply");
    size_t limit = r->page_size <= 0
                       ? 50
                       : (r->page_size > 100 ? 100 : (size_t)r->page_size);
    if (m->n_identities > limit)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen, "list: %zu rows > page size %zu",
               m->n_identities, limit);
    else if (m->n_identities == 0 && m->next_page_token &&
             m->next_page_token[0])
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "list: empty page with a next_page_token");
    for (size_t i = 0; v == ZMB_V_OK && i < m->n_identities; i++) {
      const Agynio__Api__ZitiManagement__V1__ManagedIdentity *e =
          m->identities[i];
      const char *prev =
          i ? m->identities[i - 1]->ziti_identity_id
            : (r->page_token && r->page_token[0] ? r->after_id : NULL);
      if (!e->ziti_identity_id[0] || !e->identity_id[0])
        v = fail(ZMB_V_BAD_CONTENT, why, whylen, "list: row %zu has empty ids",
                 i);
      else if (prev && !strictly_less(prev, e->ziti_identity_id))
        v = fail(ZMB_V_BAD_CONTENT, why, whylen,
                 "list: row %zu '%.64s' not after '%.64s'", i,
                 e->ziti_identity_id, prev);
    }
    if (v == ZMB_V_OK && next) {
      next->next_token = strdup(m->next_page_token ? m->next_page_token : "");
      next->last_id =
          m->n_identities
              ? strdup(m->identities[m->n_identities - 1]->ziti_identity_id)
              : NULL;
    }
    agynio__api__ziti_management__v1__list_managed_identities_response__free_unpacked(
        m, NULL);
    return v;
  }
  case ZMB_OP_RSI: {
    Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse *m =
        agynio__api__ziti_management__v1__request_service_identity_response__unpack(
            NULL, mlen, msg);
    const char *what = NULL;
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "rsi: undecodable reply");
    if (!m->ziti_identity_id[0])
      v = fail(ZMB_V_BAD_CONTENT, why, whylen, "rsi: empty ziti_identity_id");
    else if (m->identity_json.len == 0 || m->identity_json.len > IDJSON_MAX)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen, "rsi: identity_json size %zu",
               m->identity_json.len);
    else if (check_identity_json(m->identity_json.data, m->identity_json.len,
                                 &what) != 0)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen, "rsi: identity_json: %s", what);
    /* The identity file holds a private key: wipe the decoded copy. */
    if (m->identity_json.data && m->identity_json.len) {
      volatile uint8_t *p = m->identity_json.data;
      for (size_t i = 0; i < m->identity_json.len; i++)
        p[i] = 0;
    }
    agynio__api__ziti_management__v1__request_service_identity_response__free_unpacked(
        m, NULL);
    return v;
  }
  case ZMB_OP_CREATE: {
    Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse *m =
        agynio__api__ziti_management__v1__create_agent_identity_response__unpack(
            NULL, mlen, msg);
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "create: undecodable reply");
    const char *jwt = m->enrollment_jwt;
    const char *d1 = strchr(jwt, '.');
    const char *d2 = d1 ? strchr(d1 + 1, '.') : NULL;
    if (!m->ziti_identity_id[0])
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "create: empty ziti_identity_id");
    else if (!d1 || !d2 || strchr(d2 + 1, '.') || d1 == jwt || d2 == d1 + 1 ||
             d2[1] == '\0')
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "create: enrollment_jwt is not three dot-separated parts");
    {
      volatile char *p = m->enrollment_jwt;
      for (size_t i = 0; p[i]; i++)
        p[i] = 0;
    }
    agynio__api__ziti_management__v1__create_agent_identity_response__free_unpacked(
        m, NULL);
    return v;
  }
  case ZMB_OP_CSVC: {
    Agynio__Api__ZitiManagement__V1__CreateServiceResponse *m =
        agynio__api__ziti_management__v1__create_service_response__unpack(
            NULL, mlen, msg);
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "csvc: undecodable reply");
    if (!m->ziti_service_id[0] || strncmp(m->ziti_service_name, "bench-", 6))
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "csvc: empty id or a name that is not ours");
    agynio__api__ziti_management__v1__create_service_response__free_unpacked(
        m, NULL);
    return v;
  }
  case ZMB_OP_HEALTH: {
    Grpc__Health__V1__HealthCheckResponse *m =
        grpc__health__v1__health_check_response__unpack(NULL, mlen, msg);
    if (!m)
      return fail(ZMB_V_BAD_CONTENT, why, whylen, "health: undecodable reply");
    if (m->status !=
        GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING)
      v = fail(ZMB_V_BAD_CONTENT, why, whylen,
               "health: status %d, want SERVING", (int)m->status);
    grpc__health__v1__health_check_response__free_unpacked(m, NULL);
    return v;
  }
  default:
    return fail(ZMB_V_BAD_CONTENT, why, whylen, "unknown op");
  }
}

void zmb_list_next_dispose(zmb_list_next_t *n) {
  free(n->next_token);
  free(n->last_id);
  n->next_token = NULL;
  n->last_id = NULL;
}
