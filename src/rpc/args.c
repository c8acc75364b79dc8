/* args.c - argument checks and conversions shared by the RPC handlers
 * (src/rpc/rpc_int.h). */
#include "rpc_int.h"

#include "zm/log.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#define ARENA_PRINTF(call, ...)                                                \
  do {                                                                         \
    char buf_[256];                                                            \
    snprintf(buf_, sizeof buf_, __VA_ARGS__);                                  \
    return zm_call_strdup((call), buf_);                                       \
  } while (0)

const char *zm_rpc_uuid(zm_call_t *call, const char *s, const char *field,
                        char out[37]) {
  if (s == NULL || s[0] == '\0')
    ARENA_PRINTF(call, "%s: value is empty", field);
  size_t n = strlen(s);
  const char *p = s;
  size_t len = n;
  if (n == 45 && strncasecmp(s, "urn:uuid:", 9) == 0) {
    p = s + 9;
    len = 36;
  } else if (n == 38 && s[0] == '{' && s[37] == '}') {
    p = s + 1;
    len = 36;
  } else if (n != 36 && n != 32) {
    ARENA_PRINTF(call, "%s: invalid UUID length: %zu", field, n);
  }
  char hex[32];
  size_t k = 0;
  for (size_t i = 0; i < len; i++) {
    char c = p[i];
    if (len == 36 && (i == 8 || i == 13 || i == 18 || i == 23)) {
      if (c != '-')
        ARENA_PRINTF(call, "%s: invalid UUID format", field);
      continue;
    }
    if (!isxdigit((unsigned char)c))
      ARENA_PRINTF(call, "%s: invalid UUID format", field);
    hex[k++] = (char)tolower((unsigned char)c);
  }
  size_t o = 0;
  for (size_t i = 0; i < 32; i++) {
    if (i == 8 || i == 12 || i == 16 || i == 20)
      out[o++] = '-';
    out[o++] = hex[i];
  }
  out[36] = '\0';
  return NULL;
}

static int blank(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
         c == '\f';
}

char *zm_rpc_trim(zm_call_t *call, const char *s) {
  if (s == NULL)
    return zm_call_strdup(call, "");
  while (blank(*s))
    s++;
  size_t n = strlen(s);
  while (n > 0 && blank(s[n - 1]))
    n--;
  char *r = zm_call_alloc(call, n + 1);
  memcpy(r, s, n);
  r[n] = '\0';
  return r;
}

char *zm_rpc_required(zm_call_t *call, const char *s, const char *field,
                      const char **why) {
  char *t = zm_rpc_trim(call, s);
  if (t[0] == '\0') {
    char b[160];
    snprintf(b, sizeof b, "%s is required", field);
    *why = zm_call_strdup(call, b);
    return NULL;
  }
  const char *w = zm_rpc_check_id(t, field);
  if (w != NULL) {
    *why = zm_call_strdup(call, w);
    return NULL;
  }
  return t;
}

static const char *check_str(zm_call_t *call, const char *s,
                             const char *field) {
  if (strlen(s) > ZM_RPC_MAX_STR)
    ARENA_PRINTF(call, "%s: an entry is longer than the bound", field);
  if (s[0] != '\0') {
    const char *w = zm_rpc_check_id(s, field);
    if (w != NULL)
      return zm_call_strdup(call, w);
  }
  return NULL;
}

const char **zm_rpc_merge_roles(zm_call_t *call, const char *const *base,
                                size_t n_base, char *const *extra,
                                size_t n_extra, size_t *n_out,
                                const char **why) {
  if (n_base + n_extra > ZM_RPC_MAX_ROLES) {
    *why = "too many role attributes";
    return NULL;
  }
  const char **out = zm_call_alloc(call, (n_base + n_extra + 1) * sizeof *out);
  size_t n = 0;
  for (size_t i = 0; i < n_base + n_extra; i++) {
    const char *r = i < n_base ? base[i] : extra[i - n_base];
    if (r == NULL || r[0] == '\0')
      continue;
    const char *w = check_str(call, r, "additional_role_attributes");
    if (w != NULL) {
      *why = w;
      return NULL;
    }
    int dup = 0;
    for (size_t k = 0; k < n && !dup; k++)
      dup = strcmp(out[k], r) == 0;
    if (!dup)
      out[n++] = r;
  }
  *n_out = n;
  return out;
}

char *zm_rpc_tags_json(zm_call_t *call, void *const *entries, size_t n,
                       const char **why) {
  if (n == 0)
    return NULL;
  if (n > ZM_RPC_MAX_TAGS) {
    *why = "tags: too many entries";
    return NULL;
  }
  json_t *o = json_object();
  for (size_t i = 0; i < n; i++) {
    const zm_pb_tag_t *t = entries[i];
    const char *k = t->key ? t->key : "";
    const char *v = t->value ? t->value : "";
    if (strlen(k) > ZM_RPC_MAX_STR || strlen(v) > ZM_RPC_MAX_STR ||
        json_object_set_new(o, k, json_string(v)) != 0) {
      json_decref(o);
      *why = "tags: keys and values must be valid UTF-8 of bounded length";
      return NULL;
    }
  }
  char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(o);
  char *r = zm_call_strdup(call, s ? s : "{}");
  free(s);
  return r;
}

json_t *zm_rpc_json_strings(char *const *v, size_t n) {
  json_t *a = json_array();
  for (size_t i = 0; i < n; i++) {
    json_t *s = json_string(v[i] ? v[i] : "");
    if (s != NULL)
      json_array_append_new(a, s);
  }
  return a;
}

char **zm_rpc_strings_from_json(zm_call_t *call, const json_t *arr, size_t *n) {
  size_t cap = json_array_size(arr);
  char **out = zm_call_alloc(call, (cap + 1) * sizeof *out);
  size_t k = 0;
  for (size_t i = 0; i < cap; i++) {
    const char *s = json_string_value(json_array_get(arr, i));
    if (s != NULL)
      out[k++] = zm_call_strdup(call, s);
  }
  *n = k;
  return out;
}

zm_pb_tag_t **zm_rpc_tags_from_json(zm_call_t *call, const json_t *obj,
                                    const ProtobufCMessageDescriptor *entry,
                                    size_t *n) {
  size_t cap = json_object_size(obj);
  zm_pb_tag_t **out = zm_call_alloc(call, (cap + 1) * sizeof *out);
  size_t k = 0;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)obj, key, v) {
    if (!json_is_string(v))
      continue;
    zm_pb_tag_t *t = zm_call_alloc(call, sizeof *t);
    protobuf_c_message_init(entry, t);
    t->key = zm_call_strdup(call, key);
    t->value = zm_call_strdup(call, json_string_value(v));
    out[k++] = t;
  }
  *n = k;
  return out;
}

void zm_rpc_fail_ziti(zm_call_t *call, const zm_ziti_result_t *r,
                      const char *what, const char *not_found) {
  if (r->err == ZM_E_NOT_FOUND && not_found != NULL) {
    zm_call_fail(call, ZM_GRPC_NOT_FOUND, not_found);
    return;
  }
  char msg[512];
  snprintf(msg, sizeof msg, "%s: %s", what,
           r->message ? r->message : zm_strerror(r->err));
  zm_call_fail(call, zm_rpc_status_from_ziti(r, UINT64_MAX, 0), msg);
}
