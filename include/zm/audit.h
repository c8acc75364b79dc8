/*
 * audit.h - the audit log: one JSON object per line for every
 * security-relevant decision and lifecycle event, written asynchronously
 * (zm/logq.h) to its own file or to stderr.
 *
 *   {"time":"2026-12-01T13:45:32.123Z","level":"info","msg":"audit",
 *    "component":"audit","event":"authz_denied",
 *    "caller":"uri:spiffe://agyn/sa/runner","peer":"10.0.0.7:50312",
 *    "method":"/agynio...ZitiManagementService/RequestServiceIdentity",
 *    "service_type":"gateway","status":"PERMISSION_DENIED"}
 *
 * Values are strings, JSON-escaped; never pass a secret (key, JWT, token).
 */
#ifndef ZM_AUDIT_H
#define ZM_AUDIT_H

#include <stddef.h>

/* dest: "" or "off" = disabled, "stderr", or a file path (appended, created
 * 0600). Returns 0 or a negative error with a reason in err. */
int zm_audit_open(const char *dest, char *err, size_t errlen);
/* Writes what is queued and closes. */
void zm_audit_close(void);
int zm_audit_enabled(void);
/* As zm_log_kick, for the audit writer. */
void zm_audit_kick(void);

/* One event: key/value string pairs, NULL-terminated. A NULL value omits
 * its key. Example:
 *   zm_audit("identity_issued", "service_type", "gateway", "id", id,
 *            "caller", caller, NULL); */
void zm_audit(const char *event, ...);

/* Test hook: the line an event would produce, without writing it. Returns
 * the length (truncated at cap-1). */
size_t zm_audit_format(char *buf, size_t cap, const char *event, ...);

#endif /* ZM_AUDIT_H */
