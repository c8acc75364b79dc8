/* authz.c - the per-RPC authorization policy (see zm/authz.h). */
#include "zm/authz.h"
#include "zm/zm.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* A policy file larger than this is refused: it is a handful of rules. */
#define ZM_AUTHZ_MAX_FILE (1u << 20)

typedef struct {
  char **v;
  size_t n;
} strlist_t;

typedef struct {
  strlist_t principals, methods, scopes; /* scopes.n == 0: every scope */
} rule_t;

struct zm_authz {
  rule_t *rules;
  size_t n_rules;
};

static void strlist_free(strlist_t *l) {
  for (size_t i = 0; i < l->n; i++)
    free(l->v[i]);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

void zm_authz_free(zm_authz_t *a) {
  if (a == NULL)
    return;
  for (size_t i = 0; i < a->n_rules; i++) {
    strlist_free(&a->rules[i].principals);
    strlist_free(&a->rules[i].methods);
    strlist_free(&a->rules[i].scopes);
  }
  free(a->rules);
  free(a);
}

size_t zm_authz_rule_count(const zm_authz_t *a) { return a ? a->n_rules : 0; }

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int
fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return ZM_E_INVAL;
}

static int valid_principal(const char *p) {
  if (strcmp(p, "any") == 0 || strcmp(p, "authenticated") == 0)
    return 1;
  size_t n = strlen(p);
  const char *star = strchr(p, '*');
  if (star != NULL && star != p + n - 1)
    return 0; /* '*' only as the last character */
  if (strncmp(p, "uri:", 4) == 0 || strncmp(p, "dns:", 4) == 0)
    return n > 4;
  if (strncmp(p, "cn:", 3) == 0)
    return n > 3;
  return 0;
}

static const char *short_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

static int known_method(const zm_authz_known_t *k, const char *m) {
  if (k == NULL || k->methods == NULL || strcmp(m, "*") == 0)
    return 1;
  for (size_t i = 0; i < k->n_methods; i++)
    if (strcmp(k->methods[i], m) == 0 ||
        strcmp(short_name(k->methods[i]), m) == 0)
      return 1;
  return 0;
}

static int known_scope(const zm_authz_known_t *k, const char *s) {
  if (k == NULL || k->scopes == NULL || strcmp(s, "*") == 0)
    return 1;
  for (size_t i = 0; i < k->n_scopes; i++)
    if (strcmp(k->scopes[i], s) == 0)
      return 1;
  return 0;
}

/* Copies a non-empty JSON array of non-empty strings into l. */
static int take_list(strlist_t *l, json_t *arr, const char *what, size_t rule,
                     char *err, size_t errlen) {
  if (!json_is_array(arr) || json_array_size(arr) == 0)
    return fail(err, errlen, "rule %zu: \"%s\" must be a non-empty array", rule,
                what);
  l->n = 0;
  l->v = calloc(json_array_size(arr), sizeof *l->v);
  if (l->v == NULL)
    return fail(err, errlen, "out of memory");
  size_t i;
  json_t *s;
  json_array_foreach(arr, i, s) {
    if (!json_is_string(s) || json_string_length(s) == 0 ||
        strlen(json_string_value(s)) != json_string_length(s))
      return fail(err, errlen, "rule %zu: \"%s\"[%zu] must be a string", rule,
                  what, i);
    l->v[i] = strdup(json_string_value(s));
    if (l->v[i] == NULL)
      return fail(err, errlen, "out of memory");
    l->n = i + 1;
  }
  return 0;
}

static int parse_rule(rule_t *r, json_t *o, size_t idx,
                      const zm_authz_known_t *known, char *err, size_t errlen) {
  if (!json_is_object(o))
    return fail(err, errlen, "rule %zu: not an object", idx);
  const char *key;
  json_t *v;
  json_object_foreach(o, key, v) {
    if (strcmp(key, "principals") != 0 && strcmp(key, "methods") != 0 &&
        strcmp(key, "service_types") != 0 && strcmp(key, "name") != 0)
      return fail(err, errlen, "rule %zu: unknown key \"%.64s\"", idx, key);
  }
  int rv;
  if ((rv = take_list(&r->principals, json_object_get(o, "principals"),
                      "principals", idx, err, errlen)) != 0)
    return rv;
  if ((rv = take_list(&r->methods, json_object_get(o, "methods"), "methods",
                      idx, err, errlen)) != 0)
    return rv;
  json_t *st = json_object_get(o, "service_types");
  if (st != NULL &&
      (rv = take_list(&r->scopes, st, "service_types", idx, err, errlen)) != 0)
    return rv;
  for (size_t i = 0; i < r->principals.n; i++)
    if (!valid_principal(r->principals.v[i]))
      return fail(err, errlen,
                  "rule %zu: principal \"%.128s\": expected uri:, dns:, cn:, "
                  "\"authenticated\" or \"any\"",
                  idx, r->principals.v[i]);
  for (size_t i = 0; i < r->methods.n; i++)
    if (!known_method(known, r->methods.v[i]))
      return fail(err, errlen, "rule %zu: unknown method \"%.128s\"", idx,
                  r->methods.v[i]);
  for (size_t i = 0; i < r->scopes.n; i++)
    if (!known_scope(known, r->scopes.v[i]))
      return fail(err, errlen, "rule %zu: unknown service type \"%.64s\"", idx,
                  r->scopes.v[i]);
  return 0;
}

int zm_authz_parse(zm_authz_t **out, const char *json, size_t len,
                   const zm_authz_known_t *known, char *err, size_t errlen) {
  *out = NULL;
  json_error_t je;
  json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
  if (root == NULL)
    return fail(err, errlen, "line %d: %.128s", je.line, je.text);
  int rv = 0;
  zm_authz_t *a = calloc(1, sizeof *a);
  if (a == NULL) {
    rv = fail(err, errlen, "out of memory");
    goto done;
  }
  const char *key;
  json_t *v;
  if (!json_is_object(root)) {
    rv = fail(err, errlen, "top level: expected an object with \"rules\"");
    goto done;
  }
  json_object_foreach(root, key, v) {
    if (strcmp(key, "rules") != 0 && strcmp(key, "version") != 0) {
      rv = fail(err, errlen, "top level: unknown key \"%.64s\"", key);
      goto done;
    }
  }
  json_t *rules = json_object_get(root, "rules");
  if (!json_is_array(rules)) {
    rv = fail(err, errlen, "\"rules\" must be an array");
    goto done;
  }
  a->rules = calloc(json_array_size(rules) + 1, sizeof *a->rules);
  if (a->rules == NULL) {
    rv = fail(err, errlen, "out of memory");
    goto done;
  }
  size_t i;
  json_array_foreach(rules, i, v) {
    a->n_rules = i + 1; /* so that free() sees a half-built rule */
    if ((rv = parse_rule(&a->rules[i], v, i, known, err, errlen)) != 0)
      goto done;
  }
done:
  json_decref(root);
  if (rv != 0) {
    zm_authz_free(a);
    return rv;
  }
  *out = a;
  return 0;
}

int zm_authz_load(zm_authz_t **out, const char *path,
                  const zm_authz_known_t *known, char *err, size_t errlen) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return fail(err, errlen, "%s: cannot open", path);
  char *buf = malloc(ZM_AUTHZ_MAX_FILE + 1);
  if (buf == NULL) {
    fclose(f);
    return fail(err, errlen, "out of memory");
  }
  size_t n = fread(buf, 1, ZM_AUTHZ_MAX_FILE + 1, f);
  int rd_err = ferror(f);
  fclose(f);
  int rv;
  if (rd_err) {
    rv = fail(err, errlen, "%s: read error", path);
  } else if (n > ZM_AUTHZ_MAX_FILE) {
    rv = fail(err, errlen, "%s: larger than %u bytes", path, ZM_AUTHZ_MAX_FILE);
  } else {
    char why[256];
    rv = zm_authz_parse(out, buf, n, known, why, sizeof why);
    if (rv != 0)
      fail(err, errlen, "%s: %s", path, why);
  }
  free(buf);
  return rv;
}

/* ---- decisions ------------------------------------------------------------
 */

static int name_matches(const char *pat, const char *name) {
  size_t pl = strlen(pat);
  int dns = strncmp(pat, "dns:", 4) == 0;
  if (pl > 0 && pat[pl - 1] == '*')
    return dns ? strncasecmp(pat, name, pl - 1) == 0
               : strncmp(pat, name, pl - 1) == 0;
  return dns ? strcasecmp(pat, name) == 0 : strcmp(pat, name) == 0;
}

static int principal_matches(const rule_t *r, const char *const *names,
                             size_t n) {
  for (size_t i = 0; i < r->principals.n; i++) {
    const char *p = r->principals.v[i];
    if (strcmp(p, "any") == 0)
      return 1;
    if (strcmp(p, "authenticated") == 0) {
      if (n > 0)
        return 1;
      continue;
    }
    for (size_t j = 0; j < n; j++)
      if (name_matches(p, names[j]))
        return 1;
  }
  return 0;
}

static int method_matches(const rule_t *r, const char *method) {
  const char *sn = short_name(method);
  for (size_t i = 0; i < r->methods.n; i++) {
    const char *m = r->methods.v[i];
    if (strcmp(m, "*") == 0 || strcmp(m, method) == 0 || strcmp(m, sn) == 0)
      return 1;
  }
  return 0;
}

static int scope_matches(const rule_t *r, const char *scope) {
  if (scope == NULL || r->scopes.n == 0)
    return 1;
  for (size_t i = 0; i < r->scopes.n; i++)
    if (strcmp(r->scopes.v[i], "*") == 0 || strcmp(r->scopes.v[i], scope) == 0)
      return 1;
  return 0;
}

zm_authz_decision_t zm_authz_check(const zm_authz_t *a,
                                   const char *const *names, size_t n,
                                   const char *method, const char *scope) {
  for (size_t i = 0; i < a->n_rules; i++) {
    const rule_t *r = &a->rules[i];
    if (method_matches(r, method) && scope_matches(r, scope) &&
        principal_matches(r, names, n))
      return ZM_AUTHZ_ALLOW;
  }
  return n == 0 ? ZM_AUTHZ_UNAUTHENTICATED : ZM_AUTHZ_DENY;
}
