/*
 * workers.h - a small bounded pool of low-priority threads for CPU work of
 * the enrollment saga (key generation, JWT signature verification), apart
 * from libuv's shared pool so DNS and store work never queue behind it.
 *
 * - N threads (ENROLLMENT_CRYPTO_THREADS), each at the lowest priority the
 *   process may set: SCHED_IDLE, else nice +19, else unchanged (logged).
 * - A bounded FIFO of work not yet started: zm_workers_queue() refuses with
 *   UV_EAGAIN when it is full, UV_ECANCELED once the pool is closing.
 * - Completions run on the loop thread, oldest first, woken through an
 *   eventfd: done(w, 0) after work(w) ran, done(w, UV_ECANCELED) for work
 *   that was still queued when zm_workers_close() was called (the same
 *   statuses uv_queue_work() gives). w->cpu_ns says what work(w) cost its
 *   thread, for the service's per-step CPU metrics.
 * - The loop never waits for a worker (no shared mutex, no uv_async_send
 *   from the threads): an idle-class thread may be off the CPU for as long
 *   as the loop keeps it busy.
 * - The pool holds a loop reference while any work is queued or running
 *   (like uv_queue_work); idle, it does not keep the loop alive.
 * - zm_workers_close() never blocks the loop: threads finish the job they
 *   run, queued jobs complete as cancelled, and when every thread has left,
 *   its poll handle closes and done(data) runs; then the pool is freed.
 *
 * Everything but the work callbacks runs on the loop thread.
 */
#ifndef ZM_WORKERS_H
#define ZM_WORKERS_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct zm_workers zm_workers_t;
typedef struct zm_work zm_work_t;
typedef void (*zm_work_cb)(zm_work_t *w);
typedef void (*zm_after_work_cb)(zm_work_t *w, int status);

/* Embedded in the caller's state (container_of), like uv_work_t. */
struct zm_work {
  zm_work_t *next; /* the pool's */
  zm_work_cb work;
  zm_after_work_cb done;
  int status;
  unsigned slot_;  /* the pool's: the thread that runs it */
  uint64_t cpu_ns; /* set before done(w, 0): the CPU time work(w) took on
                      its thread (CLOCK_THREAD_CPUTIME_ID); 0 if cancelled */
};

typedef enum {
  ZM_WORKERS_PRIO_NORMAL = 0, /* neither could be set */
  ZM_WORKERS_PRIO_NICE,       /* nice +19 */
  ZM_WORKERS_PRIO_IDLE,       /* SCHED_IDLE */
} zm_workers_prio_t;

/* threads: 1..64; max_queued: work not yet started, >= 1. Returns 0 or a
 * UV_* error (nothing to free then). */
int zm_workers_new(zm_workers_t **out, uv_loop_t *loop, unsigned threads,
                   size_t max_queued);
/* 0, UV_EAGAIN (queue full) or UV_ECANCELED (closing); on error done is
 * never called. */
int zm_workers_queue(zm_workers_t *p, zm_work_t *w, zm_work_cb work,
                     zm_after_work_cb done);
/* Takes w back if no thread has started it: 1, and w's done will not be
 * called (the caller runs the work itself, e.g. when the threads, at their
 * idle priority, have not had the CPU for too long); 0 when it is running
 * or finished. */
int zm_workers_steal(zm_workers_t *p, zm_work_t *w);
/* See above; p is freed before done(data) runs. */
void zm_workers_close(zm_workers_t *p, void (*done)(void *), void *data);

/* Work queued and not started / running now. */
size_t zm_workers_queued(const zm_workers_t *p);
size_t zm_workers_running(const zm_workers_t *p);
/* The priority the threads got (the lowest of them: all try the same). */
zm_workers_prio_t zm_workers_priority(const zm_workers_t *p);
const char *zm_workers_prio_name(zm_workers_prio_t prio);

#endif /* ZM_WORKERS_H */
