/* harden.c - process-level secret hygiene: no core dumps. */
#include "zm/zm.h"

#include <sys/prctl.h>
#include <sys/resource.h>

int zm_disable_core_dumps(void) {
  /* abort() is the out-of-memory and assertion strategy; a core would hold
   * every key and JWT in memory at that moment. Not dumpable also keeps
   * other processes of the same user from ptrace and /proc/PID/mem. */
  struct rlimit rl = {0, 0};
  int rv = 0;
  if (setrlimit(RLIMIT_CORE, &rl) != 0)
    rv = -1;
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    rv = -1;
  return rv;
}
