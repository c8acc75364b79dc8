/*
 * pg_internal.h - what pg.c and pg_migrate.c share. Not part of the API;
 * tests include it directly.
 */
#ifndef ZM_STORE_PG_INTERNAL_H
#define ZM_STORE_PG_INTERNAL_H

#include <libpq-fe.h>

/* The advisory lock every migration transaction holds, so replicas that
 * start together migrate one after the other ("zm-migr" in ASCII). */
#define ZM__PG_MIGRATE_LOCK 0x7a6d2d6d69677200LL

/* The Go service's migration file names, recorded in its schema_migrations
 * when this service created the Go tables on an empty database. */
extern const char *const zm__pg_go_migrations[];
extern const size_t zm__pg_go_migrations_count;

/* Brings the schema up to date on the blocking connection c, in one
 * transaction under the advisory lock: the Go service's tables when absent
 * (never altered when present; missing Go columns are an error), then this
 * service's own migrations not yet recorded in zm_schema_migrations.
 * what names the database for log lines (host:port/db, never the URL).
 * Returns 0, or ZM_E_STORE after logging why. */
int zm__pg_migrate(PGconn *c, const char *what);

#endif /* ZM_STORE_PG_INTERNAL_H */
