/*
 * cryptocost.c - zm-cryptocost: the bare CPU cost of the crypto one
 * RequestServiceIdentity does in-process (EC P-384 key pair + CSR, the same
 * zm_keycsr_generate() call the service makes), in a tight loop. bench/run.sh
 * compares the service's CPU time per call with this.
 * GAP_US > 0 sleeps that long between two operations (the sleep is not CPU
 * time): in the service a worker runs one key between the loop's events and
 * the CPU idles between enrollments, so its caches are not kept warm as in
 * a tight loop; this measures what that costs on the machine.
 *
 * usage: zm-cryptocost [ITERATIONS] [ALG] [GAP_US]   (default 200, ec-p384, 0)
 * prints: keycsr <alg> iterations=N cpu_us_per_op=X wall_us_per_op=Y gap_us=G
 * (wall_us_per_op leaves the sleeps out)
 */
#include "zm/crypto.h"
#include "zm/secret.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_us(clockid_t clk) {
  struct timespec ts;
  clock_gettime(clk, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? strtol(argv[1], NULL, 10) : 200;
  const char *alg_name = argc > 2 ? argv[2] : "ec-p384";
  long gap = argc > 3 ? strtol(argv[3], NULL, 10) : 0;
  zm_key_alg_t alg;
  if (n <= 0 || gap < 0 || gap > 1000000 ||
      zm_key_alg_parse(alg_name, &alg) != 0) {
    fprintf(stderr,
            "usage: zm-cryptocost [ITERATIONS>0] [ALG] [GAP_US 0..1000000]\n");
    return 2;
  }
  struct timespec pause = {.tv_sec = gap / 1000000,
                           .tv_nsec = (gap % 1000000) * 1000};
  double slept = 0;
  double c0 = now_us(CLOCK_PROCESS_CPUTIME_ID), w0 = now_us(CLOCK_MONOTONIC);
  for (long i = 0; i < n; i++) {
    if (gap > 0 && i > 0) {
      double s0 = now_us(CLOCK_MONOTONIC);
      nanosleep(&pause, NULL);
      slept += now_us(CLOCK_MONOTONIC) - s0;
    }
    zm_secret_t key = {0};
    char *csr = NULL;
    int rv = zm_keycsr_generate(alg, "bench-cryptocost", &key, &csr);
    if (rv != 0) {
      fprintf(stderr, "zm_keycsr_generate failed: %d\n", rv);
      return 1;
    }
    zm_secret_dispose(&key);
    free(csr);
  }
  double c1 = now_us(CLOCK_PROCESS_CPUTIME_ID), w1 = now_us(CLOCK_MONOTONIC);
  printf("keycsr %s iterations=%ld cpu_us_per_op=%.1f wall_us_per_op=%.1f "
         "gap_us=%ld\n",
         alg_name, n, (c1 - c0) / (double)n, (w1 - w0 - slept) / (double)n,
         gap);
  return 0;
}
