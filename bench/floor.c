/*
 * zm-floor: what this machine itself costs an event loop, with no server
 * running. Run it pinned to the server's CPU (taskset) on a quiet machine:
 *
 *   wake_idle   N waits of epoll_wait(1 ms) on an otherwise idle core: how
 *               late the kernel and the hypervisor hand the CPU back after a
 *               sleep (an idle vCPU halts; waking it is the host's work).
 *               This is the floor under any loop-lag probe that sleeps.
 *   wake_busy   the same while a SCHED_IDLE thread spins on the core, so
 *               the vCPU never halts (what remains: the timer's own path
 *               and the host preempting the vCPU).
 *   switch      two threads of this process on one core handing a token
 *               back and forth (mutex + condition variable, as the server's
 *               loop and its helper threads do): process CPU per hand-off,
 *               one context switch each.
 *   xcpu        the same with the peer thread on PEER_CPU (when given): the
 *               CPU the pinned thread spends per round trip when every wake-up
 *               crosses to the other vCPU, as the server's writes to a client
 *               or the controller do on loopback (against switch_round_us, the
 *               same figure with both threads on one core).
 *   work        N runs of the same fixed computation (about 200 us of CPU,
 *               no memory allocated, no system call), each after a 1 ms
 *               sleep as a loop iteration follows a wake-up: the thread CPU
 *               time one run is charged. A run charged far more than the
 *               median did the same work: the rest is time the thread was
 *               charged while it did not run it (interrupts, or a host that
 *               takes the vCPU without the guest accounting it as steal).
 *               This is the floor under the server's "busiest iteration".
 *
 * Usage: zm-floor [N] [PEER_CPU]   (N waits per wake case, default 3000;
 * hand-offs: 20 * N). Prints "key=value" lines (microseconds).
 * Lateness = elapsed - 1 ms; "over1ms" counts waits more than 1 ms late,
 * the same bound as the loop-lag target.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Sorts the n samples (us) and prints NAME_n, NAME_p50_us, NAME_p99_us,
 * NAME_max_us and NAME_over1ms (samples over 1 ms, the loop-lag bound). */
static void print_dist(const char *name, uint64_t *v, int n) {
  int over = 0;
  for (int i = 0; i < n; i++)
    if (v[i] > 1000)
      over++;
  qsort(v, (size_t)n, sizeof *v, cmp_u64);
  printf("%s_n=%d\n%s_p50_us=%llu\n%s_p99_us=%llu\n%s_max_us=%llu\n"
         "%s_over1ms=%d\n",
         name, n, name, (unsigned long long)v[n / 2], name,
         (unsigned long long)v[(size_t)n * 99 / 100], name,
         (unsigned long long)v[n - 1], name, over);
}

/* N 1 ms epoll waits; prints the lateness distribution under name. */
static int wake_case(const char *name, int n) {
  int ep = epoll_create1(0);
  if (ep < 0) {
    perror("epoll_create1");
    return -1;
  }
  uint64_t *late = calloc((size_t)n, sizeof *late);
  if (late == NULL) {
    close(ep);
    return -1;
  }
  struct epoll_event ev;
  for (int i = 0; i < n; i++) {
    uint64_t a = now_ns(CLOCK_MONOTONIC);
    (void)epoll_wait(ep, &ev, 1, 1);
    uint64_t d = now_ns(CLOCK_MONOTONIC) - a;
    late[i] = d > 1000000u ? (d - 1000000u) / 1000u : 0;
  }
  print_dist(name, late, n);
  free(late);
  close(ep);
  return 0;
}

/* The fixed computation: k rounds of a multiply-xorshift chain. */
static uint64_t work_unit(uint64_t k) {
  volatile uint64_t x = 88172645463325252ull;
  uint64_t v = x;
  for (uint64_t i = 0; i < k; i++) {
    v ^= v << 13;
    v ^= v >> 7;
    v ^= v << 17;
    v *= 0x9E3779B97F4A7C15ull;
  }
  x = v;
  return x;
}

/* N runs of about 200 us of work, each after a 1 ms sleep; prints the
 * thread CPU each run was charged. */
static int work_case(const char *name, int n) {
  uint64_t k = 1u << 16, t;
  for (;;) { /* calibrate: rounds for about 200 us */
    uint64_t c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    (void)work_unit(k);
    t = now_ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    if (t >= 50000 || k >= (1ull << 40))
      break;
    k <<= 1;
  }
  k = t > 0 ? k * 200000u / t : k;
  uint64_t *cpu = calloc((size_t)n, sizeof *cpu);
  if (cpu == NULL)
    return -1;
  struct timespec ms = {0, 1000000};
  for (int i = 0; i < n; i++) {
    nanosleep(&ms, NULL);
    uint64_t c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    (void)work_unit(k);
    cpu[i] = (now_ns(CLOCK_THREAD_CPUTIME_ID) - c0) / 1000u;
  }
  print_dist(name, cpu, n);
  free(cpu);
  return 0;
}

static atomic_int spin_stop;

static void *spinner(void *arg) {
  (void)arg;
  struct sched_param sp = {0};
  if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) != 0)
    fprintf(stderr, "zm-floor: SCHED_IDLE refused; the spinner runs "
                    "normal (wake_busy then measures sharing)\n");
  while (!atomic_load_explicit(&spin_stop, memory_order_relaxed))
    ;
  return NULL;
}

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int turn; /* 0: main's, 1: the peer's */
  int rounds;
  int peer_cpu; /* -1: stay where the process is pinned */
} pingpong_t;

static void *peer(void *arg) {
  pingpong_t *p = arg;
  if (p->peer_cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(p->peer_cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0)
      fprintf(stderr, "zm-floor: cannot move the peer to CPU %d\n",
              p->peer_cpu);
  }
  pthread_mutex_lock(&p->mu);
  for (int i = 0; i < p->rounds; i++) {
    while (p->turn != 1)
      pthread_cond_wait(&p->cv, &p->mu);
    p->turn = 0;
    pthread_cond_signal(&p->cv);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Prints NAME_n, NAME_cpu_us (process CPU per hand-off), NAME_wall_us and
 * NAME_round_us (the calling thread's CPU per round trip: one wake-up sent,
 * one received). */
static int switch_case(const char *name, int rounds, int peer_cpu) {
  pingpong_t p = {.turn = 0, .rounds = rounds, .peer_cpu = peer_cpu};
  pthread_mutex_init(&p.mu, NULL);
  pthread_cond_init(&p.cv, NULL);
  pthread_t t;
  if (pthread_create(&t, NULL, peer, &p) != 0)
    return -1;
  usleep(20000); /* let the peer reach its CPU and wait */
  uint64_t c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
  uint64_t t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
  uint64_t w0 = now_ns(CLOCK_MONOTONIC);
  pthread_mutex_lock(&p.mu);
  for (int i = 0; i < rounds; i++) {
    p.turn = 1;
    pthread_cond_signal(&p.cv);
    while (p.turn != 0)
      pthread_cond_wait(&p.cv, &p.mu);
  }
  pthread_mutex_unlock(&p.mu);
  uint64_t c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
  uint64_t t1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
  uint64_t w1 = now_ns(CLOCK_MONOTONIC);
  pthread_join(t, NULL);
  /* two hand-offs per round */
  printf("%s_n=%d\n%s_cpu_us=%.2f\n%s_wall_us=%.2f\n%s_round_us=%.2f\n", name,
         2 * rounds, name, (double)(c1 - c0) / 1e3 / (2.0 * rounds), name,
         (double)(w1 - w0) / 1e3 / (2.0 * rounds), name,
         (double)(t1 - t0) / 1e3 / rounds);
  pthread_mutex_destroy(&p.mu);
  pthread_cond_destroy(&p.cv);
  return 0;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 3000;
  int peer_cpu = argc > 2 ? atoi(argv[2]) : -1;
  if (n < 100 || n > 1000000 || peer_cpu < -1 || peer_cpu >= CPU_SETSIZE) {
    fprintf(stderr, "usage: zm-floor [N] [PEER_CPU]  (100 <= N <= 1000000)\n");
    return 2;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) != 1)
    fprintf(stderr, "zm-floor: not pinned to one CPU (use taskset -c CPU): "
                    "the figures are not those of one core\n");
  printf("cpus=%d\n", CPU_COUNT(&set));
  if (wake_case("wake_idle", n) != 0)
    return 1;
  pthread_t s;
  if (pthread_create(&s, NULL, spinner, NULL) != 0)
    return 1;
  usleep(20000); /* let the spinner reach its policy */
  int rc = wake_case("wake_busy", n);
  atomic_store(&spin_stop, 1);
  pthread_join(s, NULL);
  if (rc != 0 || switch_case("switch", 20 * n, -1) != 0)
    return 1;
  if (peer_cpu >= 0 && switch_case("xcpu", 20 * n, peer_cpu) != 0)
    return 1;
  if (work_case("work", n) != 0)
    return 1;
  return 0;
}
