/*
 * log.h - one-line structured logs to stderr.
 *
 * Text lines (the default) look like `2026-11-24T01:02:03.456Z INFO enroll
 * svc-gateway-x: CREATE -> FETCH_JWT`. With zm_log_set_json(1)
 * (LOG_FORMAT=json) every line is one JSON object with stable fields:
 *   time     RFC 3339 UTC with milliseconds
 *   level    "debug" | "info" | "warn" | "error"
 *   msg      the message
 *   component  the message's leading word before ':' or ' ' when it names a
 *              module ("enroll", "grpc", "store", "ziti", ...), if any
 *   saga     the enrollment saga (identity name) of "enroll <name>: ..." lines
 *   request_id, method   the gRPC call being handled, when the line was
 *              written synchronously inside its handler
 *   identity the controller identity id, when the code set it (zm_log_ctx)
 * plus any fields passed to zm_log_kv(). Never pass secrets (keys, JWTs,
 * session tokens) to these functions.
 */
#ifndef ZM_LOG_H
#define ZM_LOG_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
  ZM_LOG_DEBUG,
  ZM_LOG_INFO,
  ZM_LOG_WARN,
  ZM_LOG_ERROR
} zm_log_level_t;

/* Sets the threshold; lines below it are dropped. Default INFO. */
void zm_log_set_level(zm_log_level_t level);
/* Parses "debug"/"info"/"warn"/"error"; returns 0, or ZM_E_INVAL. */
int zm_log_parse_level(const char *s, zm_log_level_t *out);
int zm_log_enabled(zm_log_level_t level);
/* From now on lines go through a bounded queue and a writer thread (never
 * a blocking write on the caller's thread; lines that do not fit are
 * dropped and counted). zm_log_stop_async() at exit writes what is queued.
 * Returns 0 or ZM_E_NOMEM. */
int zm_log_start_async(void);
/* Writes what is queued and stops the writer (at exit). */
void zm_log_stop_async(void);
/* Lines dropped because the queue was full. */
uint64_t zm_log_dropped(void);
/* Wakes the asynchronous writer for lines the loop thread queued without
 * waking it (zm_logq_defer_here). */
void zm_log_kick(void);
/* 1 = JSON lines, 0 = text (default). */
void zm_log_set_json(int on);

/* The context of the code running now (loop thread): set around a handler
 * invocation by the gRPC server, cleared after. Strings are not copied. */
typedef struct {
  uint64_t request_id; /* 0 = none */
  const char *method;
  const char *identity;
} zm_log_ctx_t;
/* Installs ctx (NULL clears) and returns the previous one. */
const zm_log_ctx_t *zm_log_ctx_swap(const zm_log_ctx_t *ctx);

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void zm_log(zm_log_level_t level, const char *fmt, ...);
/* A line with extra fields: kv holds n (key, value) pairs of strings. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
void zm_log_kv(zm_log_level_t level, const char *const *kv, size_t n,
               const char *fmt, ...);

/* Formats one line into out (cap bytes, ending in '\n'); returns its
 * length. Pure except for the context; for tests. */
size_t zm_log_format(char *out, size_t cap, int json, int64_t wall_ms,
                     zm_log_level_t level, const char *const *kv, size_t n,
                     const char *msg);

#define ZM_DEBUG(...)                                                          \
  do {                                                                         \
    if (zm_log_enabled(ZM_LOG_DEBUG))                                          \
      zm_log(ZM_LOG_DEBUG, __VA_ARGS__);                                       \
  } while (0)
#define ZM_INFO(...) zm_log(ZM_LOG_INFO, __VA_ARGS__)
#define ZM_WARN(...) zm_log(ZM_LOG_WARN, __VA_ARGS__)
#define ZM_ERROR(...) zm_log(ZM_LOG_ERROR, __VA_ARGS__)

#endif /* ZM_LOG_H */
