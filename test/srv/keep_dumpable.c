/* keep_dumpable.c - LD_PRELOAD shim for test_secrets.py.
 *
 * The service makes itself non-dumpable at start; reading a non-dumpable
 * process's /proc/PID/mem then needs CAP_SYS_PTRACE, which a CI container
 * does not grant. This shim records the request (to $ZM_TEST_PRCTL_LOG, so
 * the test still proves the service asked) and leaves the process dumpable
 * so the test, its parent, can scan its memory without privileges. Every
 * other prctl goes through to libc. Test-only: never linked into the
 * service. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

typedef int (*prctl_fn)(int, unsigned long, unsigned long, unsigned long,
                        unsigned long);

int prctl(int option, ...) {
  va_list ap;
  va_start(ap, option);
  unsigned long a2 = va_arg(ap, unsigned long);
  unsigned long a3 = va_arg(ap, unsigned long);
  unsigned long a4 = va_arg(ap, unsigned long);
  unsigned long a5 = va_arg(ap, unsigned long);
  va_end(ap);
  if (option == PR_SET_DUMPABLE && a2 == 0) {
    const char *path = getenv("ZM_TEST_PRCTL_LOG");
    if (path != NULL) {
      int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (fd >= 0) {
        static const char line[] = "PR_SET_DUMPABLE 0\n";
        ssize_t n = write(fd, line, sizeof line - 1);
        (void)n;
        close(fd);
      }
    }
    return 0;
  }
  prctl_fn next = (prctl_fn)dlsym(RTLD_NEXT, "prctl");
  if (next == NULL)
    return -1;
  return next(option, a2, a3, a4, a5);
}
