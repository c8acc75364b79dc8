/* thread.c - helper-thread scheduling (see zm/thread.h). */
#include "zm/thread.h"

#include <pthread.h>
#include <sched.h>

int zm_thread_helper(const char *name) {
  pthread_setname_np(pthread_self(), name);
  struct sched_param sp = {.sched_priority = 0};
  return pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp) == 0 ? 0 : -1;
}
