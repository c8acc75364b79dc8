/*
 * cpuquota.h - whether this process runs under a CPU bandwidth limit
 * (a Kubernetes CPU limit, `docker run --cpus`, systemd CPUQuota=).
 *
 * Busy polling spends CPU to save wake-ups; under a quota that CPU is
 * charged against the limit and the cgroup is throttled for the rest of the
 * period, which costs far more latency than the wake-ups saved. The app
 * therefore resolves LOOP_BUSY_POLL_US=auto with this. Leaf module (libc).
 *
 * cgroup v2: every cpu.max from the process's cgroup up to the root
 * ("max 100000" = none, "50000 100000" = half a core). cgroup v1: the
 * cpu controller's cpu.cfs_quota_us (-1 = none), likewise up the tree.
 * Reads are bounded (4 KiB per file, 64 levels); a file that is missing or
 * unreadable counts as no limit at that level.
 */
#ifndef ZM_CPUQUOTA_H
#define ZM_CPUQUOTA_H

#include <stddef.h>

/* proc_cgroup: the /proc/self/cgroup text to read ("/proc/self/cgroup");
 * root: where the cgroup hierarchy is mounted ("/sys/fs/cgroup").
 * Returns 1 and sets *cores (quota / period, the tightest level) when a
 * limit applies, 0 when none does, -1 when proc_cgroup cannot be read.
 * where (may be NULL) receives the file that set the limit. */
int zm_cpu_quota(const char *proc_cgroup, const char *root, double *cores,
                 char *where, size_t wherelen);

#endif
