/*
 * thread.h - how the service's helper threads (store writer, checkpointer,
 * log and audit writers, resolver) share a core with the event loop.
 *
 * The loop hands work to them by signalling a condition variable. A woken
 * thread of the normal class preempts the loop at once when they share a
 * core (a pinned or one-CPU deployment): the loop is switched out in the
 * middle of its iteration, the thread blocks on the mutex the loop still
 * holds, and every hand-off costs four context switches instead of none
 * (perf sched, bench/enroll-isolation.sh). SCHED_BATCH keeps the thread's
 * share of the CPU (same nice value) but gives up wake-up preemption: the
 * thread runs when the loop sleeps or at the next scheduler tick. Leaf
 * module (libc).
 */
#ifndef ZM_THREAD_H
#define ZM_THREAD_H

/* Names the calling thread (15 characters at most: top -H, /proc) and puts
 * it in SCHED_BATCH. Returns 0, or -1 if the policy could not be set (the
 * thread still runs, in the normal class). */
int zm_thread_helper(const char *name);

#endif
