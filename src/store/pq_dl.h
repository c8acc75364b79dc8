/*
 * pq_dl.h - libpq, loaded the first time a PostgreSQL store is used.
 *
 * The embedded store (SQLite) is the default, and libpq's dependencies
 * (libcrypto, libssl, GnuTLS through LDAP, Kerberos, p11-kit ...) cost a
 * SQLite deployment about 5 MB of resident memory and their constructors'
 * start-up time for nothing. So libpq is opened with dlopen(3) on first use:
 * pg.c and pg_migrate.c include this header after <libpq-fe.h>, and every
 * PQ* call they make goes through the table below. libpq's own headers
 * still define the types.
 */
#ifndef ZM_STORE_PQ_DL_H
#define ZM_STORE_PQ_DL_H

#include <libpq-fe.h>

#include <stddef.h>

/* Every libpq function the store calls. */
#define ZM_PQ_FUNCS(X)                                                         \
  X(PQclear)                                                                   \
  X(PQconnectPoll)                                                             \
  X(PQconnectStartParams)                                                      \
  X(PQconnectdbParams)                                                         \
  X(PQconsumeInput)                                                            \
  X(PQdb)                                                                      \
  X(PQenterPipelineMode)                                                       \
  X(PQerrorMessage)                                                            \
  X(PQexec)                                                                    \
  X(PQexecParams)                                                              \
  X(PQfinish)                                                                  \
  X(PQflush)                                                                   \
  X(PQgetResult)                                                               \
  X(PQgetisnull)                                                               \
  X(PQgetvalue)                                                                \
  X(PQhost)                                                                    \
  X(PQisBusy)                                                                  \
  X(PQntuples)                                                                 \
  X(PQpipelineSync)                                                            \
  X(PQport)                                                                    \
  X(PQprepare)                                                                 \
  X(PQresultErrorField)                                                        \
  X(PQresultErrorMessage)                                                      \
  X(PQresultStatus)                                                            \
  X(PQsendPrepare)                                                             \
  X(PQsendQueryPrepared)                                                       \
  X(PQsetNoticeProcessor)                                                      \
  X(PQsetnonblocking)                                                          \
  X(PQsocket)                                                                  \
  X(PQsslInUse)                                                                \
  X(PQstatus)

typedef struct {
#define ZM_PQ_FIELD(name) __typeof__(name) *name;
  ZM_PQ_FUNCS(ZM_PQ_FIELD)
#undef ZM_PQ_FIELD
} zm_pq_api_t;

extern zm_pq_api_t zm__pq;
extern int zm__pq_loaded;

/* Loads libpq (once). Returns 0, or -1 with why in err. Loop thread or
 * start-up: the store calls it before its first connection. */
int zm_pq_load(char *err, size_t errlen);

/* The table, loaded on demand; a load failure here aborts (callers that
 * can report an error call zm_pq_load first). */
const zm_pq_api_t *zm__pq_api_slow(void);
static inline const zm_pq_api_t *zm__pq_api(void) {
  return zm__pq_loaded ? &zm__pq : zm__pq_api_slow();
}

#ifndef ZM_PQ_DL_IMPL
#define PQclear (zm__pq_api()->PQclear)
#define PQconnectPoll (zm__pq_api()->PQconnectPoll)
#define PQconnectStartParams (zm__pq_api()->PQconnectStartParams)
#define PQconnectdbParams (zm__pq_api()->PQconnectdbParams)
#define PQconsumeInput (zm__pq_api()->PQconsumeInput)
#define PQdb (zm__pq_api()->PQdb)
#define PQenterPipelineMode (zm__pq_api()->PQenterPipelineMode)
#define PQerrorMessage (zm__pq_api()->PQerrorMessage)
#define PQexec (zm__pq_api()->PQexec)
#define PQexecParams (zm__pq_api()->PQexecParams)
#define PQfinish (zm__pq_api()->PQfinish)
#define PQflush (zm__pq_api()->PQflush)
#define PQgetResult (zm__pq_api()->PQgetResult)
#define PQgetisnull (zm__pq_api()->PQgetisnull)
#define PQgetvalue (zm__pq_api()->PQgetvalue)
#define PQhost (zm__pq_api()->PQhost)
#define PQisBusy (zm__pq_api()->PQisBusy)
#define PQntuples (zm__pq_api()->PQntuples)
#define PQpipelineSync (zm__pq_api()->PQpipelineSync)
#define PQport (zm__pq_api()->PQport)
#define PQprepare (zm__pq_api()->PQprepare)
#define PQresultErrorField (zm__pq_api()->PQresultErrorField)
#define PQresultErrorMessage (zm__pq_api()->PQresultErrorMessage)
#define PQresultStatus (zm__pq_api()->PQresultStatus)
#define PQsendPrepare (zm__pq_api()->PQsendPrepare)
#define PQsendQueryPrepared (zm__pq_api()->PQsendQueryPrepared)
#define PQsetNoticeProcessor (zm__pq_api()->PQsetNoticeProcessor)
#define PQsetnonblocking (zm__pq_api()->PQsetnonblocking)
#define PQsocket (zm__pq_api()->PQsocket)
#define PQsslInUse (zm__pq_api()->PQsslInUse)
#define PQstatus (zm__pq_api()->PQstatus)
#endif

#endif /* ZM_STORE_PQ_DL_H */
