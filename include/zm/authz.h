/*
 * authz.h - the per-RPC authorization policy: which client identities may
 * call which methods and, for methods with a scope (RequestServiceIdentity's
 * service type), which scopes.
 *
 * A client identity is the set of names its verified certificate carries,
 * each with a kind prefix: "uri:<SAN URI>" (a SPIFFE ID), "dns:<SAN DNS
 * name>", "cn:<subject CN>". A connection without a verified client
 * certificate has no names.
 *
 * Policy file (JSON, strict: unknown keys are errors so a typo cannot widen
 * or narrow access silently):
 *
 *   {"rules": [
 *     {"principals": ["uri:spiffe://agyn/ns/platform/sa/gateway"],
 *      "methods": ["ResolveIdentity", "ExtendIdentityLease",
 *                  "RequestServiceIdentity"],
 *      "service_types": ["gateway"]},
 *     {"principals": ["any"], "methods": ["ResolveIdentity"]}
 *   ]}
 *
 * principals: "uri:..", "dns:..", "cn:.." (exact; dns case-insensitive; a
 * trailing '*' matches any suffix), "authenticated" (any verified client
 * certificate) or "any" (also clients without a certificate).
 * methods: short names ("ResolveIdentity"), full paths ("/pkg.Svc/Method") or
 * "*". service_types: scope names or "*"; absent = every scope.
 * A call is allowed when one rule matches principal, method and scope.
 * Pure module: no I/O except zm_authz_load() reading the file.
 */
#ifndef ZM_AUTHZ_H
#define ZM_AUTHZ_H

#include <stddef.h>

typedef struct zm_authz zm_authz_t;

typedef enum {
  ZM_AUTHZ_ALLOW = 0,
  ZM_AUTHZ_UNAUTHENTICATED, /* no identity, and no rule admits "any" */
  ZM_AUTHZ_DENY,            /* an identity, and no rule admits it */
} zm_authz_decision_t;

/* What a policy may name: used to reject unknown methods and scopes at load
 * time. NULL lists (or a NULL known) accept any name. */
typedef struct {
  const char *const *methods; /* full paths "/pkg.Svc/Method" */
  size_t n_methods;
  const char *const *scopes; /* e.g. service type names */
  size_t n_scopes;
} zm_authz_known_t;

/* Parses a policy. Returns 0, or ZM_E_INVAL with a one-line reason in err. */
int zm_authz_parse(zm_authz_t **out, const char *json, size_t len,
                   const zm_authz_known_t *known, char *err, size_t errlen);
/* Reads and parses the file at path (at most 1 MiB). Returns 0 or ZM_E_INVAL
 * (reason in err, naming the file). */
int zm_authz_load(zm_authz_t **out, const char *path,
                  const zm_authz_known_t *known, char *err, size_t errlen);
void zm_authz_free(zm_authz_t *a);
size_t zm_authz_rule_count(const zm_authz_t *a);

/*
 * Decides one call. names[0..n) is the caller's identity (may be empty),
 * method the full path, scope NULL for the method-level check (passes when
 * some rule allows the method for at least one scope) or the scope name.
 */
zm_authz_decision_t zm_authz_check(const zm_authz_t *a,
                                   const char *const *names, size_t n,
                                   const char *method, const char *scope);

#endif /* ZM_AUTHZ_H */
