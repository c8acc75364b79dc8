/*
 * zm.h - the few things every module of ziti-management shares: the error
 * space, byte slices, container_of, the aborting allocator and assertions.
 *
 * Error codes are negative ints. Our own codes live in a band of their own
 * (-2000..-2999) so that libuv codes (-errno, -3000.., -4095..) pass through
 * every layer unchanged; zm_strerror() names both.
 */
#ifndef ZM_ZM_H
#define ZM_ZM_H

#include <stddef.h>
#include <stdint.h>

/* XX(name, message): the project's error codes. Append only. */
#define ZM_ERRNO_MAP(XX)                                                       \
  XX(INCOMPLETE, "need more input")                                            \
  XX(MSG_TOO_LARGE, "message exceeds limit")                                   \
  XX(PROTO, "protocol error")                                                  \
  XX(INVAL, "invalid argument")                                                \
  XX(NOT_FOUND, "not found")                                                   \
  XX(EXISTS, "already exists")                                                 \
  XX(NOMEM, "out of memory")                                                   \
  XX(TIMEOUT, "timed out")                                                     \
  XX(CANCELLED, "cancelled")                                                   \
  XX(STORE, "store failure")                                                   \
  XX(TLS, "TLS failure")                                                       \
  XX(HTTP, "HTTP failure")                                                     \
  XX(JSON, "malformed JSON")                                                   \
  XX(UNAVAILABLE, "peer unavailable")                                          \
  XX(CRYPTO, "cryptographic failure")                                          \
  XX(BAD_SIGNATURE, "signature does not verify")                               \
  XX(EXPIRED, "expired")                                                       \
  XX(UNAUTHORIZED, "unauthorized")                                             \
  XX(SHUTDOWN, "shutting down")

typedef enum {
  ZM_E__BASE = -2999,
#define XX(code, _) ZM_E_##code,
  ZM_ERRNO_MAP(XX)
#undef XX
} zm_err_t;

/* Returns a static string for err: ours, or libuv's for anything else. */
const char *zm_strerror(int err);

/* A slice: (base, len), layout-compatible with uv_buf_t on Unix. Not owned. */
typedef struct {
  char *base;
  size_t len;
} zm_iov_t;

#define ZM_IOV_LIT(s) ((zm_iov_t){(char *)(s), sizeof(s) - 1})

#ifndef container_of
#define container_of(ptr, type, member)                                        \
  ((type *)((char *)(ptr)-offsetof(type, member)))
#endif

#define ZM_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Allocation that aborts with file:line on exhaustion: our own code never
 * carries out-of-memory paths; limits bound what we ask for instead. */
#define zm_xmalloc(n) zm__xmalloc((n), __FILE__, __LINE__)
#define zm_xcalloc(n, s) zm__xcalloc((n), (s), __FILE__, __LINE__)
#define zm_xrealloc(p, n) zm__xrealloc((p), (n), __FILE__, __LINE__)
#define zm_xstrdup(s) zm__xstrdup((s), __FILE__, __LINE__)
#define zm_xstrndup(s, n) zm__xstrndup((s), (n), __FILE__, __LINE__)
void *zm__xmalloc(size_t n, const char *file, int line);
void *zm__xcalloc(size_t n, size_t size, const char *file, int line);
void *zm__xrealloc(void *p, size_t n, const char *file, int line);
char *zm__xstrdup(const char *s, const char *file, int line);
char *zm__xstrndup(const char *s, size_t n, const char *file, int line);

/* Always-on assertion (not compiled out by NDEBUG): an invariant broken is a
 * bug, and a crash with a location beats silent corruption. */
#define ZM_ASSERT(cond)                                                        \
  do {                                                                         \
    if (!(cond))                                                               \
      zm__assert_fail(#cond, __FILE__, __LINE__);                              \
  } while (0)
_Noreturn void zm__assert_fail(const char *expr, const char *file, int line);

/* Wipes a secret buffer in a way the compiler may not elide. */
void zm_wipe(void *p, size_t n);

/* No core dumps (RLIMIT_CORE 0, PR_SET_DUMPABLE 0). Returns 0 or -1. */
int zm_disable_core_dumps(void);

/* Wall-clock time in milliseconds since the Unix epoch (for stored times). */
int64_t zm_wall_ms(void);

/* The calling thread's CPU time in nanoseconds (CLOCK_THREAD_CPUTIME_ID;
 * 0 if unreadable). A system call on some clock sources. */
uint64_t zm_thread_cpu_ns(void);

#endif /* ZM_ZM_H */
