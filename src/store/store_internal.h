/*
 * store_internal.h - what the files of src/store share and nothing else sees:
 * the UTC timestamp text codec (stime.c) and the schema migrations
 * (migrate.c). Not part of the public API; tests include it directly.
 */
#ifndef ZM_STORE_INTERNAL_H
#define ZM_STORE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#include "zm/store.h"

/* The backends: store.c dispatches every public call through the table of
 * the backend zm_store_open chose. Each backend's own struct begins with a
 * zm_store_t, so a backend casts the pointer it is given to its own type. */
typedef struct zm__store_vt {
  const char *name; /* "sqlite", "postgresql" */
  int shared;       /* other processes may write the same store */
  int (*open)(zm_store_t **out, uv_loop_t *loop, const zm_store_config_t *cfg);
  void (*close)(zm_store_t *st);
  int (*load)(zm_store_t *st,
              void (*on_managed)(const zm_managed_row_t *r, void *data),
              void (*on_service)(const zm_service_row_t *r, void *data),
              void (*on_pending)(const zm_pending_row_t *r, void *data),
              void *data);
  void (*submit)(zm_store_t *st, const zm_store_op_t *ops, size_t n,
                 zm_store_cb cb, void *data);
  void (*list_managed)(zm_store_t *st, int type, const char *after_id,
                       size_t limit, zm_store_managed_list_cb cb, void *data);
  void (*get_managed)(zm_store_t *st, const char *id,
                      zm_store_managed_list_cb cb, void *data);
  void (*find_managed)(zm_store_t *st, const char *identity_id, size_t limit,
                       zm_store_managed_list_cb cb, void *data);
  void (*find_managed_by_identity)(zm_store_t *st, const char *identity_id,
                                   zm_store_managed_list_cb cb, void *data);
  void (*claim_expired)(zm_store_t *st, int64_t cut_ms, int64_t now_ms,
                        int64_t claim_until_ms, size_t limit,
                        zm_store_tomb_list_cb cb, void *data);
  void (*claim_tombs)(zm_store_t *st, int64_t now_ms, int64_t claim_until_ms,
                      size_t limit, zm_store_tomb_list_cb cb, void *data);
  void (*claim_pending)(zm_store_t *st, int64_t now_ms, int64_t claim_until_ms,
                        size_t limit, zm_store_pending_list_cb cb, void *data);
  void (*heartbeat)(zm_store_t *st, int64_t local_now_ms, int64_t gap_ms,
                    zm_store_beat_cb cb, void *data);
  void (*changes)(zm_store_t *st, int64_t after_seq, int64_t since_ms,
                  size_t limit, zm_store_changes_cb cb, void *data);
  void (*get_stats)(const zm_store_t *st, zm_store_stats_t *out);
} zm__store_vt;

struct zm_store {
  const zm__store_vt *vt;
};

extern const zm__store_vt zm__sqlite_vt;
extern const zm__store_vt zm__pg_vt;

/* "YYYY-MM-DD HH:MM:SS.mmm" plus the NUL. */
#define ZM__STORE_TIME_LEN 23
#define ZM__STORE_TIME_BUF (ZM__STORE_TIME_LEN + 1)

/* The range a four-digit year can spell: 0000-01-01 .. 9999-12-31 23:59:59.999
 * in wall ms since the epoch. Formatting clamps into it, so INT64_MAX (a
 * "never" lease) becomes the year 9999 instead of garbage. */
#define ZM__STORE_TIME_MIN_MS (-62167219200000LL)
#define ZM__STORE_TIME_MAX_MS (253402300799999LL)

/* Writes ms (wall ms since the epoch, clamped into the range above) as the
 * canonical UTC text "YYYY-MM-DD HH:MM:SS.mmm" into out (NUL-terminated).
 * Returns ZM__STORE_TIME_LEN. */
size_t zm__store_time_format(int64_t ms, char out[ZM__STORE_TIME_BUF]);

/* Parses s[0..len) as a time. Accepts the canonical form, a 'T' instead of
 * the space, no seconds or no fraction, 1..9 fraction digits (truncated to
 * ms), a date alone, and a trailing "Z", "+HH:MM", "-HH:MM", "+HHMM" or
 * "+HH" zone (converted to UTC; no zone means UTC). Nothing else: trailing
 * garbage, out-of-range fields or len 0 are errors.
 * Returns 0 with *out_ms set, or ZM_E_INVAL. */
int zm__store_time_parse(const char *s, size_t len, int64_t *out_ms);

/* The migrations, newest last. Version numbers are 1, 2, ... */
typedef struct {
  int version;
  const char *name; /* for the log */
  const char *sql;  /* one or more statements, idempotent (IF NOT EXISTS) */
} zm__store_migration_t;

extern const zm__store_migration_t zm__store_migrations[];
extern const size_t zm__store_migrations_count;

/* Applies every migration not yet recorded in schema_migrations, all in one
 * transaction (BEGIN IMMEDIATE .. COMMIT), then rewrites hand-seeded
 * non-canonical timestamps of the columns compared in SQL
 * (service_identities.lease_expires_at, pending_identities.created_at) into
 * the canonical form, so text comparison orders them correctly.
 * Returns 0, or ZM_E_STORE after logging path and SQLite's message. */
int zm__store_migrate(sqlite3 *db, const char *path);

#endif /* ZM_STORE_INTERNAL_H */
