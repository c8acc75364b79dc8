/*
 * logq.h - an asynchronous line writer: a bounded byte ring filled by any
 * thread without ever waiting on I/O, drained to a file descriptor by a
 * writer thread of its own. When the ring is full a line is dropped and
 * counted; the writer reports the count in a line of its own. This keeps
 * the loop thread off write(2): a full stderr pipe or a slow disk stalls
 * only the writer.
 */
#ifndef ZM_LOGQ_H
#define ZM_LOGQ_H

#include <stddef.h>
#include <stdint.h>

typedef struct zm_logq zm_logq_t;

/* Starts a writer for fd with a ring of cap bytes. own_fd: close fd in
 * zm_logq_free(). After drops the writer adds a line with the count: text
 * ("WARN log: N lines dropped") or, with json_drops, a JSON line
 * {"event":"dropped","count":N}. Returns NULL when out of memory or the
 * thread cannot start. */
zm_logq_t *zm_logq_new(int fd, size_t cap, int own_fd, int json_drops);
/* Queues one line (n bytes, should end in '\n'). Never blocks on I/O.
 * Returns 0, or -1 when it was dropped (ring full or line larger than it). */
int zm_logq_push(zm_logq_t *q, const char *line, size_t n);
/* On the calling thread from now on (on = 1): a push that leaves the ring
 * at most half full does not wake the writer; the thread must then call
 * zm_logq_kick() on every queue it pushed to before it blocks (the event
 * loop: from a uv_prepare handle). Other threads are unaffected. */
void zm_logq_defer_here(int on);
/* Wakes the writer if a deferring push is waiting for it. Only from the
 * deferring thread. NULL is a no-op. */
void zm_logq_kick(zm_logq_t *q);
/* Lines dropped so far. */
uint64_t zm_logq_dropped(zm_logq_t *q);
/* Waits until everything queued so far is written (tests, shutdown). */
void zm_logq_flush(zm_logq_t *q);
/* Writes what is queued, stops the thread, frees. NULL is a no-op. */
void zm_logq_free(zm_logq_t *q);

#endif /* ZM_LOGQ_H */
