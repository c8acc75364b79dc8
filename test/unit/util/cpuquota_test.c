/* zm-unit-libs: zm_util */
/* Unit tests of the CPU quota detection (LOOP_BUSY_POLL_US=auto) over
 * cgroup trees built in a temp dir: v2, v1 (alone and co-mounted), a limit
 * on a parent level, the tightest of several, "max", missing levels (a
 * container without a cgroup namespace), malformed files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "zm/cpuquota.h"

typedef struct {
  char dir[256];
} fx_t;

static void put(const fx_t *f, const char *rel, const char *text) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", f->dir, rel);
  /* mkdir -p of the parent */
  for (char *p = path + strlen(f->dir) + 1; *p != '\0'; p++) {
    if (*p == '/') {
      *p = '\0';
      mkdir(path, 0755);
      *p = '/';
    }
  }
  FILE *fp = fopen(path, "w");
  assert_non_null(fp);
  fputs(text, fp);
  fclose(fp);
}

static int setup(void **state) {
  fx_t *f = calloc(1, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "%s/zm-cpuq-XXXXXX",
           getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  assert_non_null(mkdtemp(f->dir));
  *state = f;
  return 0;
}

static int teardown(void **state) {
  fx_t *f = *state;
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->dir);
  assert_int_equal(system(cmd), 0);
  free(f);
  return 0;
}

static int detect(const fx_t *f, double *cores, char *where, size_t n) {
  char pc[300], root[300];
  snprintf(pc, sizeof pc, "%s/proc_cgroup", f->dir);
  snprintf(root, sizeof root, "%s/fs", f->dir);
  return zm_cpu_quota(pc, root, cores, where, n);
}

static void test_v2_none_and_limit(void **state) {
  fx_t *f = *state;
  double c = -1;
  char where[512];
  put(f, "proc_cgroup", "0::/kubepods/pod1/ctr\n");
  put(f, "fs/cpu.max", "max 100000\n");
  put(f, "fs/kubepods/pod1/ctr/cpu.max", "max 100000\n");
  assert_int_equal(detect(f, &c, where, sizeof where), 0);
  /* a limit on the pod level applies to the container below it */
  put(f, "fs/kubepods/pod1/cpu.max", "50000 100000\n");
  assert_int_equal(detect(f, &c, where, sizeof where), 1);
  assert_true(c > 0.49 && c < 0.51);
  assert_non_null(strstr(where, "kubepods/pod1/cpu.max"));
  /* the tightest level wins */
  put(f, "fs/kubepods/pod1/ctr/cpu.max", "25000 100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 1);
  assert_true(c > 0.24 && c < 0.26);
}

static void test_v2_root_namespace(void **state) {
  fx_t *f = *state;
  double c = 0;
  put(f, "proc_cgroup", "0::/\n");
  put(f, "fs/cpu.max", "200000 100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 1);
  assert_true(c > 1.99 && c < 2.01);
}

static void test_v1_comounted_and_missing_levels(void **state) {
  fx_t *f = *state;
  double c = 0;
  char where[512];
  /* no cgroup namespace: the host path does not exist in the mount, whose
   * root is the container's own cgroup */
  put(f, "proc_cgroup",
      "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n");
  put(f, "fs/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  put(f, "fs/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  assert_int_equal(detect(f, &c, where, sizeof where), 0);
  put(f, "fs/cpu,cpuacct/cpu.cfs_quota_us", "150000\n");
  assert_int_equal(detect(f, &c, where, sizeof where), 1);
  assert_true(c > 1.49 && c < 1.51);
  assert_non_null(strstr(where, "cpu.cfs_quota_us"));
}

static void test_v1_cpu_alone(void **state) {
  fx_t *f = *state;
  double c = 0;
  put(f, "proc_cgroup", "3:cpuset:/a\n2:cpuacct:/a\n1:cpu:/a\n");
  put(f, "fs/cpu/a/cpu.cfs_quota_us", "-1\n");
  put(f, "fs/cpu/a/cpu.cfs_period_us", "100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 0);
  put(f, "fs/cpu/a/cpu.cfs_quota_us", "10000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 1);
  assert_true(c > 0.09 && c < 0.11);
}

static void test_malformed_and_unreadable(void **state) {
  fx_t *f = *state;
  double c = 7;
  char pc[300];
  snprintf(pc, sizeof pc, "%s/nope", f->dir);
  assert_int_equal(zm_cpu_quota(pc, f->dir, &c, NULL, 0), -1);
  put(f, "proc_cgroup", "garbage\n::\n0::relative\n0::/x\n");
  put(f, "fs/x/cpu.max", "fifty 100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 0);
  put(f, "fs/x/cpu.max", "50000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 0);
  put(f, "fs/x/cpu.max", "0 100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 0);
  put(f, "fs/x/cpu.max", "-5 100000\n");
  assert_int_equal(detect(f, &c, NULL, 0), 0);
  assert_true(c == 7); /* untouched when no limit was found */
  /* an oversized file is read only up to its bound and does not crash */
  char big[10000];
  memset(big, '1', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  put(f, "fs/x/cpu.max", big);
  assert_int_equal(detect(f, &c, NULL, 0), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_v2_none_and_limit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_v2_root_namespace, setup, teardown),
      cmocka_unit_test_setup_teardown(test_v1_comounted_and_missing_levels,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_v1_cpu_alone, setup, teardown),
      cmocka_unit_test_setup_teardown(test_malformed_and_unreadable, setup,
                                      teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
