/*
 * log.h - one-line structured logs to stderr.
 *
 * Lines look like `2026-11-24T01:02:03.456Z INFO enroll: svc-gateway-x: CREATE
 * -> FETCH_JWT`. Never pass secrets (keys, JWTs, session tokens) to these
 * functions.
 */
#ifndef ZM_LOG_H
#define ZM_LOG_H

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

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void zm_log(zm_log_level_t level, const char *fmt, ...);

#define ZM_DEBUG(...)                                                          \
  do {                                                                         \
    if (zm_log_enabled(ZM_LOG_DEBUG))                                          \
      zm_log(ZM_LOG_DEBUG, __VA_ARGS__);                                       \
  } while (0)
#define ZM_INFO(...) zm_log(ZM_LOG_INFO, __VA_ARGS__)
#define ZM_WARN(...) zm_log(ZM_LOG_WARN, __VA_ARGS__)
#define ZM_ERROR(...) zm_log(ZM_LOG_ERROR, __VA_ARGS__)

#endif /* ZM_LOG_H */
