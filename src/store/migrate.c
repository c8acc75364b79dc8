/*
 * migrate.c - versioned, idempotent schema migrations for the SQLite store.
 *
 * schema_migrations holds one row per applied version. At open every missing
 * version is applied in order, all inside one BEGIN IMMEDIATE transaction, so
 * a crash mid-way leaves the file as it was, and two processes opening the
 * same new file do not both migrate (the second waits on busy_timeout, then
 * sees the rows). Every statement is IF NOT EXISTS as well, so a database
 * whose tables were created by hand (or by the Go service) is taken over.
 *
 * Tables are WITHOUT ROWID: every lookup and scan is by the TEXT primary key,
 * so one B-tree per table instead of a rowid table plus its key index halves
 * the pages written per commit.
 */
#include "store_internal.h"

#include "zm/log.h"
#include "zm/zm.h"

#include <string.h>

const zm__store_migration_t zm__store_migrations[] = {
    {1, "managed and service identities",
     "CREATE TABLE IF NOT EXISTS managed_identities("
     " ziti_identity_id TEXT PRIMARY KEY,"
     " identity_id TEXT NOT NULL,"
     " identity_type SMALLINT NOT NULL,"
     " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
     "CREATE TABLE IF NOT EXISTS service_identities("
     " ziti_identity_id TEXT PRIMARY KEY,"
     " service_type SMALLINT NOT NULL,"
     " lease_expires_at TIMESTAMP NOT NULL,"
     " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
     /* (lease, id): the GC cursor order, so list_expired needs no sort. */
     "CREATE INDEX IF NOT EXISTS service_identities_lease_expires_at_idx"
     " ON service_identities(lease_expires_at, ziti_identity_id);"},
    {2, "pending identities (enrollment intents)",
     "CREATE TABLE IF NOT EXISTS pending_identities("
     " name TEXT PRIMARY KEY,"
     " kind SMALLINT NOT NULL,"
     " type SMALLINT NOT NULL,"
     " ziti_identity_id TEXT,"
     " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
     "CREATE INDEX IF NOT EXISTS pending_identities_created_at_idx"
     " ON pending_identities(created_at);"},
};
const size_t zm__store_migrations_count = ZM_ARRAY_SIZE(zm__store_migrations);

/* Exactly the canonical text; anything else (a 'T', a 'Z', no fraction, an
 * offset) is rewritten by strftime, which parses all of those. Rows SQLite
 * cannot parse are left alone (zm_store_load warns about them). */
#define CANON_GLOB                                                             \
  "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] "                               \
  "[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]'"
#define NORMALIZE(table, col)                                                  \
  "UPDATE " table " SET " col " = strftime('%Y-%m-%d %H:%M:%f', " col ")"      \
  " WHERE typeof(" col ") = 'text' AND " col " NOT GLOB " CANON_GLOB           \
  " AND strftime('%Y-%m-%d %H:%M:%f', " col ") IS NOT NULL"

static const struct {
  const char *what;
  const char *sql;
} NORMALIZERS[] = {
    {"service_identities.lease_expires_at",
     NORMALIZE("service_identities", "lease_expires_at")},
    {"pending_identities.created_at",
     NORMALIZE("pending_identities", "created_at")},
};

static int fail(sqlite3 *db, const char *path, const char *what) {
  ZM_ERROR("store %s: %s: %s", path, what, sqlite3_errmsg(db));
  sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
  return ZM_E_STORE;
}

/* 1 if version v is recorded, 0 if not, <0 on error. */
static int applied(sqlite3 *db, int v) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "SELECT 1 FROM schema_migrations WHERE version=?",
                         -1, &st, NULL) != SQLITE_OK)
    return -1;
  sqlite3_bind_int(st, 1, v);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

static int record(sqlite3 *db, int v, const char *now) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db,
                         "INSERT INTO schema_migrations(version, applied_at)"
                         " VALUES(?, ?)",
                         -1, &st, NULL) != SQLITE_OK)
    return -1;
  sqlite3_bind_int(st, 1, v);
  sqlite3_bind_text(st, 2, now, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_DONE ? 0 : -1;
}

int zm__store_migrate(sqlite3 *db, const char *path) {
  char now[ZM__STORE_TIME_BUF];
  zm__store_time_format(zm_wall_ms(), now);
  if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
    return fail(db, path, "begin migration");
  if (sqlite3_exec(db,
                   "CREATE TABLE IF NOT EXISTS schema_migrations("
                   " version INTEGER PRIMARY KEY,"
                   " applied_at TIMESTAMP NOT NULL)",
                   NULL, NULL, NULL) != SQLITE_OK)
    return fail(db, path, "create schema_migrations");
  for (size_t i = 0; i < zm__store_migrations_count; i++) {
    const zm__store_migration_t *m = &zm__store_migrations[i];
    int a = applied(db, m->version);
    if (a < 0)
      return fail(db, path, "read schema_migrations");
    if (a)
      continue;
    if (sqlite3_exec(db, m->sql, NULL, NULL, NULL) != SQLITE_OK ||
        record(db, m->version, now) != 0) {
      ZM_ERROR("store %s: migration %d (%s) failed", path, m->version, m->name);
      return fail(db, path, "migrate");
    }
    ZM_INFO("store %s: applied migration %d (%s)", path, m->version, m->name);
  }
  for (size_t i = 0; i < ZM_ARRAY_SIZE(NORMALIZERS); i++) {
    if (sqlite3_exec(db, NORMALIZERS[i].sql, NULL, NULL, NULL) != SQLITE_OK)
      return fail(db, path, "normalize timestamps");
    int n = sqlite3_changes(db);
    if (n > 0)
      ZM_WARN("store %s: rewrote %d non-canonical timestamps in %s", path, n,
              NORMALIZERS[i].what);
  }
  if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
    return fail(db, path, "commit migration");
  return 0;
}
