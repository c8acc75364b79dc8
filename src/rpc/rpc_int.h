/*
 * rpc_int.h - helpers shared by the RPC handlers of the current contract
 * (src/rpc/args.c): argument checks with the Go service's messages, role
 * merging, tags, and the JSON readers of controller entities. Internal to
 * src/rpc and src/enroll.
 */
#ifndef ZM_RPC_INT_H
#define ZM_RPC_INT_H

#include "zm/app.h"

#include <jansson.h>
#include <stddef.h>

/* Bounds on client-supplied lists (the message size bounds them too). */
#define ZM_RPC_MAX_ROLES 256u
#define ZM_RPC_MAX_TAGS 256u
#define ZM_RPC_MAX_STR 1024u

/* Every generated map entry (map<string,string>) has this layout. */
typedef struct {
  ProtobufCMessage base;
  char *key;
  char *value;
} zm_pb_tag_t;

/* A UUID as google/uuid accepts it (36-char, 32 hex, {...}, urn:uuid:...,
 * any case) into the canonical lower-case form. Returns NULL, or the
 * reason ("<field>: value is empty", "<field>: invalid UUID ..."), in a
 * buffer of the call's arena. */
const char *zm_rpc_uuid(zm_call_t *call, const char *s, const char *field,
                        char out[37]);
/* s trimmed of ASCII/Unicode-space-free blanks (strings.TrimSpace for the
 * ASCII blanks), a copy in the call arena. */
char *zm_rpc_trim(zm_call_t *call, const char *s);
/* A required trimmed string: NULL and *why set when empty, too long or not
 * clean UTF-8. */
char *zm_rpc_required(zm_call_t *call, const char *s, const char *field,
                      const char **why);
/* base then extra, empty strings and exact duplicates dropped, first
 * occurrence kept (the Go service's mergeRoleAttributes). Arena array;
 * NULL and *why on a role that is too long / not UTF-8 or too many. */
const char **zm_rpc_merge_roles(zm_call_t *call, const char *const *base,
                                size_t n_base, char *const *extra,
                                size_t n_extra, size_t *n_out,
                                const char **why);
/* Tags as a compact JSON object (arena), NULL when there are none; *why
 * set (and NULL returned) when a key/value is not clean UTF-8. */
char *zm_rpc_tags_json(zm_call_t *call, void *const *entries, size_t n,
                       const char **why);
/* A JSON string array from a proto repeated string (new reference). */
json_t *zm_rpc_json_strings(char *const *v, size_t n);
/* Copies a JSON array of strings into the arena (non-strings skipped). */
char **zm_rpc_strings_from_json(zm_call_t *call, const json_t *arr, size_t *n);
/* String-valued tags of a JSON object into arena map entries (others are
 * dropped, as the Go service does). */
zm_pb_tag_t **zm_rpc_tags_from_json(zm_call_t *call, const json_t *obj,
                                    const ProtobufCMessageDescriptor *entry,
                                    size_t *n);
/* A controller failure as the call's status: 404 NOT_FOUND when not_found
 * is given, else the shared mapping; message "<what>: <error>". */
void zm_rpc_fail_ziti(zm_call_t *call, const zm_ziti_result_t *r,
                      const char *what, const char *not_found);

/* DELETE of a service with the configs it owns ("<name>-host-v1" /
 * "<name>-intercept-v1" attached to it): every DELETE is guarded by a
 * durable tombstone (one unit for all) and retried by recovery.
 * cb(0) when gone (404 counts), else a ZM_E_* error (the tombstones stay). */
typedef void (*zm_rpc_done_cb)(int err, const char *msg, void *data);
void zm_rpc_delete_service(zm_app_t *app, const char *id, uint64_t deadline,
                           zm_rpc_done_cb cb, void *data);
/* DELETE of an identity: a mapping is retired (LIVE -> DELETING), anything
 * else is tombstoned as an orphan; 404 counts as gone. cb(0) when gone. */
void zm_rpc_delete_identity_any(zm_app_t *app, const char *id,
                                zm_rpc_done_cb cb, void *data);

#endif /* ZM_RPC_INT_H */
