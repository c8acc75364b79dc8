/*
 * pg_migrate.c - the PostgreSQL schema: the Go service's two tables, taken
 * over as its migrations leave them, and this service's own tables.
 *
 * The Go tables (managed_identities, service_identities) are created only
 * when neither exists: an empty database. Then, and only then, the Go
 * service's schema_migrations table is created if absent and, when it is
 * empty, filled with the names of the nine Go migration files, so the Go
 * service can later run on this database without re-running (and failing
 * on) migrations whose effect is already there. A database the Go service
 * already migrated keeps its tables and its schema_migrations rows exactly
 * as they are: nothing here drops, alters or writes them. What this service
 * needs from them is checked instead (the columns below); an older Go
 * schema that lacks one is an error, not something to patch behind the Go
 * service's back.
 *
 * This service's own schema lives in versioned, idempotent migrations
 * recorded in zm_schema_migrations. Everything runs in one transaction
 * under pg_advisory_xact_lock, so two replicas starting at once migrate one
 * after the other and the second finds the work done.
 */
#include "pg_internal.h"
#include "pq_dl.h"
#include "store_internal.h"

#include "zm/log.h"
#include "zm/zm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The Go service's migration files (agynio/ziti-management migrations/),
 * by name: its migrator applies, at start, every file whose name
 * schema_migrations does not hold. */
const char *const zm__pg_go_migrations[] = {
    "0001_init.sql",
    "0002_service_identities.sql",
    "0003_drop_tenant_id.sql",
    "0004_add_ziti_service_id.sql",
    "0005_add_identity_id_index.sql",
    "0006_make_identity_id_unique.sql",
    "0007_add_workload_id.sql",
    "0007_make_identity_id_non_unique.sql",
    "0008_identity_agent_environment.sql",
};
const size_t zm__pg_go_migrations_count = ZM_ARRAY_SIZE(zm__pg_go_migrations);

/* The Go schema, as its migrations leave it (index names included). */
static const char GO_SCHEMA[] =
    "CREATE TABLE managed_identities ("
    " ziti_identity_id TEXT PRIMARY KEY,"
    " identity_id UUID NOT NULL,"
    " identity_type SMALLINT NOT NULL,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),"
    " ziti_service_id TEXT,"
    " workload_id UUID,"
    " agent_id UUID,"
    " environment_id UUID);"
    "CREATE INDEX idx_managed_identities_type"
    " ON managed_identities (identity_type);"
    "CREATE INDEX idx_managed_identities_identity_id"
    " ON managed_identities (identity_id);"
    "CREATE TABLE service_identities ("
    " ziti_identity_id TEXT PRIMARY KEY,"
    " service_type SMALLINT NOT NULL,"
    " lease_expires_at TIMESTAMPTZ NOT NULL,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());"
    "CREATE INDEX idx_service_identities_lease"
    " ON service_identities (lease_expires_at);";

static const char GO_MIGRATIONS_TABLE[] =
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version TEXT PRIMARY KEY,"
    " applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())";

/* The columns this service reads and writes in the Go tables. */
static const struct {
  const char *table, *column, *type;
} GO_COLUMNS[] = {
    {"managed_identities", "ziti_identity_id", "text"},
    {"managed_identities", "identity_id", "uuid"},
    {"managed_identities", "identity_type", "smallint"},
    {"managed_identities", "created_at", "timestamp with time zone"},
    {"managed_identities", "ziti_service_id", "text"},
    {"managed_identities", "workload_id", "uuid"},
    {"managed_identities", "agent_id", "uuid"},
    {"managed_identities", "environment_id", "uuid"},
    {"service_identities", "ziti_identity_id", "text"},
    {"service_identities", "service_type", "smallint"},
    {"service_identities", "lease_expires_at", "timestamp with time zone"},
    {"service_identities", "created_at", "timestamp with time zone"},
};

/* This service's migrations, newest last; each idempotent. */
static const zm__store_migration_t PG_MIGRATIONS[] = {
    {1, "own tables",
     "CREATE TABLE IF NOT EXISTS pending_identities ("
     " name TEXT PRIMARY KEY,"
     " kind SMALLINT NOT NULL,"
     " type SMALLINT NOT NULL,"
     " ziti_identity_id TEXT,"
     " agent_id TEXT,"
     " created_at TIMESTAMPTZ NOT NULL,"
     " resolve_after TIMESTAMPTZ NOT NULL,"
     " claimed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity');"
     "CREATE UNIQUE INDEX IF NOT EXISTS pending_identities_agent_id_key"
     " ON pending_identities (agent_id) WHERE agent_id IS NOT NULL;"
     "CREATE INDEX IF NOT EXISTS pending_identities_resolve_after_idx"
     " ON pending_identities (resolve_after);"
     "CREATE TABLE IF NOT EXISTS deleting_identities ("
     " ziti_identity_id TEXT PRIMARY KEY,"
     " kind SMALLINT NOT NULL,"
     " type SMALLINT NOT NULL,"
     " attempts INT NOT NULL DEFAULT 0,"
     " next_try_at TIMESTAMPTZ NOT NULL,"
     " claimed_until TIMESTAMPTZ NOT NULL,"
     " created_at TIMESTAMPTZ NOT NULL);"
     "CREATE INDEX IF NOT EXISTS deleting_identities_next_try_at_idx"
     " ON deleting_identities (next_try_at);"
     "CREATE TABLE IF NOT EXISTS identity_changes ("
     " seq BIGSERIAL PRIMARY KEY,"
     " ziti_identity_id TEXT NOT NULL,"
     " changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());"
     "CREATE INDEX IF NOT EXISTS identity_changes_changed_at_idx"
     " ON identity_changes (changed_at);"
     "CREATE TABLE IF NOT EXISTS service_clock ("
     " id INT PRIMARY KEY CHECK (id = 1),"
     " last_beat TIMESTAMPTZ NOT NULL,"
     " resumed_at TIMESTAMPTZ NOT NULL);"
     /* Wall ms <-> timestamptz. INT64_MAX / INT64_MIN (and anything past
      * the year 9999 / before the year 1) are +-infinity, and back. */
     "CREATE OR REPLACE FUNCTION zm_ts(ms BIGINT) RETURNS TIMESTAMPTZ"
     " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$"
     " SELECT CASE WHEN ms > 253402300799999 THEN 'infinity'::timestamptz"
     " WHEN ms < -62135596800000 THEN '-infinity'::timestamptz"
     " ELSE to_timestamp(ms / 1000.0) END $$;"
     "CREATE OR REPLACE FUNCTION zm_ms(t TIMESTAMPTZ) RETURNS BIGINT"
     " LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$"
     " SELECT CASE WHEN t = 'infinity' THEN 9223372036854775807"
     " WHEN t = '-infinity' THEN -9223372036854775807 - 1"
     " ELSE floor(extract(epoch FROM t) * 1000)::bigint END $$;"
     /* A unit's "no such row": raises no_data_found, which pg.c maps to
      * ZM_E_NOT_FOUND (and which aborts the unit, not just the
      * statement). */
     "CREATE OR REPLACE FUNCTION zm_found(n BIGINT) RETURNS BIGINT"
     " LANGUAGE plpgsql AS $$ BEGIN"
     " IF n = 0 THEN RAISE EXCEPTION 'no such row' USING ERRCODE = 'P0002';"
     " END IF; RETURN n; END $$;"},
};

static int exec_ok(PGconn *c, const char *what, const char *sql) {
  PGresult *r = PQexec(c, sql);
  ExecStatusType s = PQresultStatus(r);
  int ok = s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK;
  if (!ok)
    ZM_ERROR("store postgresql %s: migrate: %s", what, PQerrorMessage(c));
  PQclear(r);
  return ok;
}

/* Runs sql (one row, one column expected); returns the value as an int, or
 * -1 on error (logged). */
static long long query_int(PGconn *c, const char *what, const char *sql,
                           int nparams, const char *const *params) {
  PGresult *r = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
  long long v = -1;
  if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
    v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
  else
    ZM_ERROR("store postgresql %s: migrate: %s", what, PQerrorMessage(c));
  PQclear(r);
  return v;
}

static int table_exists(PGconn *c, const char *what, const char *table) {
  const char *p[1] = {table};
  return (int)query_int(c, what,
                        "SELECT count(*) FROM pg_catalog.pg_tables"
                        " WHERE tablename = $1 AND schemaname = ANY"
                        " (current_schemas(false))",
                        1, p);
}

/* Checks that the Go tables have every column this service uses. */
static int check_go_columns(PGconn *c, const char *what) {
  for (size_t i = 0; i < ZM_ARRAY_SIZE(GO_COLUMNS); i++) {
    const char *p[3] = {GO_COLUMNS[i].table, GO_COLUMNS[i].column,
                        GO_COLUMNS[i].type};
    long long n = query_int(
        c, what,
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = $1 AND column_name = $2 AND data_type = $3"
        " AND table_schema = ANY (current_schemas(false))",
        3, p);
    if (n < 0)
      return ZM_E_STORE;
    if (n == 0) {
      ZM_ERROR("store postgresql %s: table %s has no column %s of type %s:"
               " the Go service's migrations are not all applied",
               what, GO_COLUMNS[i].table, GO_COLUMNS[i].column,
               GO_COLUMNS[i].type);
      return ZM_E_STORE;
    }
  }
  return 0;
}

static int migrate_tx(PGconn *c, const char *what) {
  char sql[160];
  snprintf(sql, sizeof sql, "SELECT pg_advisory_xact_lock(%lld)",
           (long long)ZM__PG_MIGRATE_LOCK);
  if (!exec_ok(c, what, sql))
    return ZM_E_STORE;

  int managed = table_exists(c, what, "managed_identities");
  int service = table_exists(c, what, "service_identities");
  if (managed < 0 || service < 0)
    return ZM_E_STORE;
  if (managed == 0 && service == 0) {
    /* An empty database: create the Go tables exactly as the Go service's
     * migrations would, and record those migrations for it -- but only in
     * an empty schema_migrations (never next to rows of its own). */
    if (!exec_ok(c, what, GO_SCHEMA) || !exec_ok(c, what, GO_MIGRATIONS_TABLE))
      return ZM_E_STORE;
    long long rows =
        query_int(c, what, "SELECT count(*) FROM schema_migrations", 0, NULL);
    if (rows < 0)
      return ZM_E_STORE;
    for (size_t i = 0; rows == 0 && i < zm__pg_go_migrations_count; i++) {
      const char *p[1] = {zm__pg_go_migrations[i]};
      PGresult *r =
          PQexecParams(c, "INSERT INTO schema_migrations(version) VALUES ($1)",
                       1, NULL, p, NULL, NULL, 0);
      int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
      PQclear(r);
      if (!ok) {
        ZM_ERROR("store postgresql %s: migrate: %s", what, PQerrorMessage(c));
        return ZM_E_STORE;
      }
    }
    ZM_INFO("store postgresql %s: created the Go service's tables", what);
  } else if (managed == 0 || service == 0) {
    ZM_ERROR("store postgresql %s: only one of managed_identities and"
             " service_identities exists: the Go service's migrations are"
             " not all applied",
             what);
    return ZM_E_STORE;
  }
  if (check_go_columns(c, what) != 0)
    return ZM_E_STORE;

  if (!exec_ok(c, what,
               "CREATE TABLE IF NOT EXISTS zm_schema_migrations ("
               " version INTEGER PRIMARY KEY,"
               " applied_at TIMESTAMPTZ NOT NULL)"))
    return ZM_E_STORE;
  long long have = query_int(
      c, what, "SELECT coalesce(max(version), 0) FROM zm_schema_migrations", 0,
      NULL);
  if (have < 0)
    return ZM_E_STORE;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(PG_MIGRATIONS); i++) {
    const zm__store_migration_t *m = &PG_MIGRATIONS[i];
    if (m->version <= have)
      continue;
    if (!exec_ok(c, what, m->sql))
      return ZM_E_STORE;
    char v[16];
    snprintf(v, sizeof v, "%d", m->version);
    const char *p[1] = {v};
    PGresult *r = PQexecParams(c,
                               "INSERT INTO zm_schema_migrations(version,"
                               " applied_at) VALUES ($1, now())",
                               1, NULL, p, NULL, NULL, 0);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
    if (!ok) {
      ZM_ERROR("store postgresql %s: migrate: %s", what, PQerrorMessage(c));
      return ZM_E_STORE;
    }
    ZM_INFO("store postgresql %s: applied migration %d (%s)", what, m->version,
            m->name);
  }
  return 0;
}

int zm__pg_migrate(PGconn *c, const char *what) {
  if (!exec_ok(c, what, "BEGIN"))
    return ZM_E_STORE;
  int rv = migrate_tx(c, what);
  if (rv == 0 && !exec_ok(c, what, "COMMIT"))
    rv = ZM_E_STORE;
  if (rv != 0) {
    PGresult *r = PQexec(c, "ROLLBACK");
    PQclear(r);
  }
  return rv;
}
