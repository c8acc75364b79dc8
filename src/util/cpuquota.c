/* cpuquota.c - CPU bandwidth limit of this process (see zm/cpuquota.h). */
#include "zm/cpuquota.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FILE_MAX 4096
#define LEVELS_MAX 64
#define PATH_MAX_ 1024

/* Reads at most FILE_MAX - 1 bytes of path into buf (NUL-terminated).
 * Returns the length, or -1. */
static ssize_t read_small(const char *path, char *buf) {
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return -1;
  size_t n = 0;
  while (n < FILE_MAX - 1) {
    ssize_t r = read(fd, buf + n, FILE_MAX - 1 - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    n += (size_t)r;
  }
  close(fd);
  buf[n] = '\0';
  return (ssize_t)n;
}

static int parse_i64(const char *s, char **end, long long *out) {
  errno = 0;
  long long v = strtoll(s, end, 10);
  if (*end == s || errno != 0)
    return -1;
  *out = v;
  return 0;
}

/* One level's limit in cores: 1 and *cores set, 0 = none or unreadable. */
static int level_v2(const char *dir, double *cores) {
  char path[PATH_MAX_ + 16], buf[FILE_MAX];
  if ((size_t)snprintf(path, sizeof path, "%s/cpu.max", dir) >= sizeof path ||
      read_small(path, buf) <= 0)
    return 0;
  if (strncmp(buf, "max", 3) == 0)
    return 0;
  char *end;
  long long quota, period;
  if (parse_i64(buf, &end, &quota) != 0 || *end != ' ' ||
      parse_i64(end + 1, &end, &period) != 0 || quota <= 0 || period <= 0)
    return 0;
  *cores = (double)quota / (double)period;
  return 1;
}

static int level_v1(const char *dir, double *cores) {
  char path[PATH_MAX_ + 32], buf[FILE_MAX];
  char *end;
  long long quota, period;
  if ((size_t)snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", dir) >=
          sizeof path ||
      read_small(path, buf) <= 0 || parse_i64(buf, &end, &quota) != 0 ||
      quota <= 0)
    return 0;
  if ((size_t)snprintf(path, sizeof path, "%s/cpu.cfs_period_us", dir) >=
          sizeof path ||
      read_small(path, buf) <= 0 || parse_i64(buf, &end, &period) != 0 ||
      period <= 0)
    return 0;
  *cores = (double)quota / (double)period;
  return 1;
}

/* Walks base + cg from the leaf up to base itself; the tightest limit wins.
 * Levels that do not exist are skipped: without a cgroup namespace a
 * container sees its host-side path, while its own cgroup is mounted at
 * base. */
static int walk(const char *base, const char *cg, int v2, double *cores,
                char *where, size_t wherelen) {
  char dir[PATH_MAX_];
  if ((size_t)snprintf(dir, sizeof dir, "%s%s", base, cg) >= sizeof dir)
    return 0;
  size_t blen = strlen(base);
  int found = 0;
  for (int level = 0; level < LEVELS_MAX; level++) {
    size_t n = strlen(dir);
    while (n > blen && dir[n - 1] == '/')
      dir[--n] = '\0';
    double c;
    if (v2 ? level_v2(dir, &c) : level_v1(dir, &c)) {
      if (!found || c < *cores) {
        *cores = c;
        if (where != NULL && wherelen > 0)
          snprintf(where, wherelen, "%s/%s", dir,
                   v2 ? "cpu.max" : "cpu.cfs_quota_us");
      }
      found = 1;
    }
    if (n <= blen)
      break;
    char *slash = strrchr(dir + blen, '/');
    if (slash == NULL)
      break;
    *slash = '\0';
  }
  return found;
}

int zm_cpu_quota(const char *proc_cgroup, const char *root, double *cores,
                 char *where, size_t wherelen) {
  char buf[FILE_MAX];
  if (read_small(proc_cgroup, buf) < 0)
    return -1;
  if (where != NULL && wherelen > 0)
    where[0] = '\0';
  int found = 0;
  double best = 0;
  char base[PATH_MAX_];
  /* Lines: "hierarchy-id:controller-list:path". */
  for (char *line = buf, *next; line != NULL && *line != '\0'; line = next) {
    next = strchr(line, '\n');
    if (next != NULL)
      *next++ = '\0';
    char *c1 = strchr(line, ':');
    char *c2 = c1 != NULL ? strchr(c1 + 1, ':') : NULL;
    if (c2 == NULL || c2[1] != '/')
      continue;
    *c1 = '\0';
    *c2 = '\0';
    const char *ctrls = c1 + 1, *cg = c2 + 1;
    double c = 0;
    char w[PATH_MAX_ + 32];
    int got = 0;
    if (strcmp(line, "0") == 0 && *ctrls == '\0') {
      /* v2: mounted at root itself, or at root/unified in hybrid mode (where
       * the cpu controller stays with v1 and cpu.max does not exist). */
      got = walk(root, cg, 1, &c, w, sizeof w);
    } else {
      /* v1: the cpu controller, alone or co-mounted ("cpu,cpuacct"). */
      int has_cpu = 0;
      for (const char *p = ctrls; *p != '\0';) {
        size_t k = strcspn(p, ",");
        if (k == 3 && strncmp(p, "cpu", 3) == 0)
          has_cpu = 1;
        p += k + (p[k] == ',');
      }
      if (!has_cpu)
        continue;
      if ((size_t)snprintf(base, sizeof base, "%s/%s", root, ctrls) <
              sizeof base &&
          access(base, F_OK) == 0)
        got = walk(base, cg, 0, &c, w, sizeof w);
      else if ((size_t)snprintf(base, sizeof base, "%s/cpu", root) <
               sizeof base)
        got = walk(base, cg, 0, &c, w, sizeof w);
    }
    if (got && (!found || c < best)) {
      best = c;
      found = 1;
      if (where != NULL && wherelen > 0)
        snprintf(where, wherelen, "%s", w);
    }
  }
  if (found)
    *cores = best;
  return found;
}
