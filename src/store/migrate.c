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
 * Columns are added by ALTER TABLE (ADD_COLUMNS), each after checking that
 * the table lacks it.
 *
 * Tables are WITHOUT ROWID: every lookup and scan is by the TEXT primary key,
 * so one B-tree per table instead of a rowid table plus its key index halves
 * the pages written per commit.
 */
#include "store_internal.h"

#include "zm/log.h"
#include "zm/zm.h"

#include <stdio.h>
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
    /* 3-5: the lifecycle states of store interface v2. Columns are added
     * by ADD_COLUMNS below (ALTER TABLE has no IF NOT EXISTS). */
    {3, "managed identities: service, workload, agent, environment",
     "CREATE INDEX IF NOT EXISTS managed_identities_identity_id_idx"
     " ON managed_identities(identity_id);"},
    {4, "pending identities: agent, resolve_after, claims",
     /* Rows from before: no create of theirs can land after 10 minutes. */
     "UPDATE pending_identities SET resolve_after = coalesce("
     " strftime('%Y-%m-%d %H:%M:%f', created_at, '+600 seconds'),"
     " '1970-01-01 00:00:00.000')"
     " WHERE resolve_after = '1970-01-01 00:00:00.000';"
     /* a second pending row for the same agent -> ZM_E_EXISTS */
     "CREATE UNIQUE INDEX IF NOT EXISTS pending_identities_agent_id_idx"
     " ON pending_identities(agent_id) WHERE agent_id IS NOT NULL;"
     "CREATE INDEX IF NOT EXISTS pending_identities_resolve_after_idx"
     " ON pending_identities(resolve_after);"},
    {5, "deleting identities (tombstones) and the service clock",
     "CREATE TABLE IF NOT EXISTS deleting_identities("
     " ziti_identity_id TEXT PRIMARY KEY,"
     " kind SMALLINT NOT NULL,"
     " type SMALLINT NOT NULL,"
     " attempts INTEGER NOT NULL DEFAULT 0,"
     " next_try_at TIMESTAMP NOT NULL,"
     " claimed_until TIMESTAMP NOT NULL,"
     " created_at TIMESTAMP NOT NULL) WITHOUT ROWID;"
     "CREATE INDEX IF NOT EXISTS deleting_identities_next_try_at_idx"
     " ON deleting_identities(next_try_at);"
     "CREATE TABLE IF NOT EXISTS service_clock("
     " id INTEGER PRIMARY KEY CHECK(id = 1),"
     " last_beat TIMESTAMP NOT NULL,"
     " resumed_at TIMESTAMP NOT NULL);"},
};
const size_t zm__store_migrations_count = ZM_ARRAY_SIZE(zm__store_migrations);

/* Columns a migration adds before its SQL runs, each only if the table does
 * not have it yet (so a table made by hand, or a re-run, is taken over). */
#define EPOCH "'1970-01-01 00:00:00.000'"
static const struct {
  int version;
  const char *table, *column, *decl;
} ADD_COLUMNS[] = {
    {3, "managed_identities", "ziti_service_id", "TEXT"},
    {3, "managed_identities", "workload_id", "TEXT"},
    {3, "managed_identities", "agent_id", "TEXT"},
    {3, "managed_identities", "environment_id", "TEXT"},
    {4, "pending_identities", "agent_id", "TEXT"},
    {4, "pending_identities", "resolve_after",
     "TIMESTAMP NOT NULL DEFAULT " EPOCH},
    {4, "pending_identities", "claimed_until",
     "TIMESTAMP NOT NULL DEFAULT " EPOCH},
};

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
    {"pending_identities.resolve_after",
     NORMALIZE("pending_identities", "resolve_after")},
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

/* 1 if table has column, 0 if not, <0 on error. */
static int has_column(sqlite3 *db, const char *table, const char *column) {
  sqlite3_stmt *st = NULL;
  if (sqlite3_prepare_v2(db, "SELECT 1 FROM pragma_table_info(?) WHERE name=?",
                         -1, &st, NULL) != SQLITE_OK)
    return -1;
  sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, column, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  sqlite3_finalize(st);
  return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

static int add_columns(sqlite3 *db, int version) {
  for (size_t i = 0; i < ZM_ARRAY_SIZE(ADD_COLUMNS); i++) {
    if (ADD_COLUMNS[i].version != version)
      continue;
    int h = has_column(db, ADD_COLUMNS[i].table, ADD_COLUMNS[i].column);
    if (h < 0)
      return -1;
    if (h)
      continue;
    char sql[256];
    snprintf(sql, sizeof sql, "ALTER TABLE %s ADD COLUMN %s %s",
             ADD_COLUMNS[i].table, ADD_COLUMNS[i].column, ADD_COLUMNS[i].decl);
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
      return -1;
  }
  return 0;
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
    if (add_columns(db, m->version) != 0 ||
        sqlite3_exec(db, m->sql, NULL, NULL, NULL) != SQLITE_OK ||
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
