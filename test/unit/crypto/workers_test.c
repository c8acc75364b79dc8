/* zm-unit-libs: zm_crypto
 * workers_test.c - the crypto worker pool: FIFO completion on the loop
 * thread, queue-full refusal, shutdown with queued work (cancelled), the
 * loop reference while work is outstanding, low thread priority. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "zm/workers.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  zm_work_t w;
  int idx;
  int status; /* from done */
  int ran;    /* work ran */
  pthread_t ran_on;
  int done_calls;
} job_t;

static pthread_t loop_thread;
static int order[64];
static int n_order;
/* a gate the first jobs wait on, to hold the threads busy */
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;
static atomic_int n_started;

static void gate_set(int open) {
  pthread_mutex_lock(&gate_mu);
  gate_open = open;
  pthread_cond_broadcast(&gate_cv);
  pthread_mutex_unlock(&gate_mu);
}

static void job_work(zm_work_t *w) {
  job_t *j = (job_t *)w;
  atomic_fetch_add(&n_started, 1);
  pthread_mutex_lock(&gate_mu);
  while (!gate_open)
    pthread_cond_wait(&gate_cv, &gate_mu);
  pthread_mutex_unlock(&gate_mu);
  j->ran = 1;
  j->ran_on = pthread_self();
}

static void job_done(zm_work_t *w, int status) {
  job_t *j = (job_t *)w;
  assert_true(pthread_equal(pthread_self(), loop_thread));
  j->status = status;
  j->done_calls++;
  order[n_order++] = j->idx;
}

static void reset(void) {
  loop_thread = pthread_self();
  n_order = 0;
  atomic_store(&n_started, 0);
  gate_set(1);
}

static void wait_started(uv_loop_t *loop, int n) {
  (void)loop;
  for (int i = 0; i < 5000 && atomic_load(&n_started) < n; i++)
    usleep(1000);
  assert_int_equal(atomic_load(&n_started), n);
}

static int closed;
static void on_closed(void *data) {
  (void)data;
  closed++;
}

/* One thread: work runs and completes in submission order, on the loop
 * thread, off the loop thread for the work itself; uv_run returns once all
 * is done (the pool holds the loop only while work is outstanding). */
static void test_fifo_on_loop(void **state) {
  (void)state;
  reset();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 1, 64), 0);
  job_t jobs[32];
  memset(jobs, 0, sizeof jobs);
  for (int i = 0; i < 32; i++) {
    jobs[i].idx = i;
    assert_int_equal(zm_workers_queue(p, &jobs[i].w, job_work, job_done), 0);
  }
  uv_run(&loop, UV_RUN_DEFAULT); /* returns: nothing outstanding */
  assert_int_equal(n_order, 32);
  for (int i = 0; i < 32; i++) {
    assert_int_equal(order[i], i);
    assert_int_equal(jobs[i].status, 0);
    assert_int_equal(jobs[i].done_calls, 1);
    assert_true(jobs[i].ran);
    assert_false(pthread_equal(jobs[i].ran_on, loop_thread));
  }
  assert_int_equal(zm_workers_queued(p), 0);
  assert_int_equal(zm_workers_running(p), 0);
  zm_workers_prio_t prio = zm_workers_priority(p);
  /* Linux lets any thread take SCHED_IDLE, and raise its nice value */
  assert_true(prio == ZM_WORKERS_PRIO_IDLE || prio == ZM_WORKERS_PRIO_NICE);
  assert_string_not_equal(zm_workers_prio_name(prio), "normal");
  closed = 0;
  zm_workers_close(p, on_closed, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Two threads: every job completes exactly once. */
static void test_many_threads(void **state) {
  (void)state;
  reset();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 2, 64), 0);
  job_t jobs[64];
  memset(jobs, 0, sizeof jobs);
  for (int i = 0; i < 64; i++) {
    jobs[i].idx = i;
    assert_int_equal(zm_workers_queue(p, &jobs[i].w, job_work, job_done), 0);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(n_order, 64);
  for (int i = 0; i < 64; i++)
    assert_int_equal(jobs[i].done_calls, 1);
  closed = 0;
  zm_workers_close(p, on_closed, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* The queue bound counts work not yet started: with the only thread busy
 * and 4 queued, the 5th is refused with UV_EAGAIN (and its done never
 * runs); once the thread moves on there is room again. */
static void test_queue_full(void **state) {
  (void)state;
  reset();
  gate_set(0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 1, 4), 0);
  job_t jobs[7];
  memset(jobs, 0, sizeof jobs);
  for (int i = 0; i < 7; i++)
    jobs[i].idx = i;
  assert_int_equal(zm_workers_queue(p, &jobs[0].w, job_work, job_done), 0);
  wait_started(&loop, 1); /* job 0 runs (held), the queue is empty */
  for (int i = 1; i <= 4; i++)
    assert_int_equal(zm_workers_queue(p, &jobs[i].w, job_work, job_done), 0);
  assert_int_equal(zm_workers_queued(p), 4);
  assert_int_equal(zm_workers_running(p), 1);
  assert_int_equal(zm_workers_queue(p, &jobs[5].w, job_work, job_done),
                   UV_EAGAIN);
  gate_set(1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(n_order, 5);
  assert_int_equal(jobs[5].done_calls, 0);
  assert_int_equal(zm_workers_queue(p, &jobs[6].w, job_work, job_done), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(n_order, 6);
  assert_int_equal(order[5], 6);
  closed = 0;
  zm_workers_close(p, on_closed, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Stealing takes back only work no thread has started, from anywhere in
 * the queue (head, middle, tail): its done never runs, the rest keep their
 * order, the queue has room again, and a stolen job can be queued anew. */
static void test_steal(void **state) {
  (void)state;
  reset();
  gate_set(0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 1, 4), 0);
  job_t jobs[6];
  memset(jobs, 0, sizeof jobs);
  for (int i = 0; i < 6; i++)
    jobs[i].idx = i;
  assert_int_equal(zm_workers_queue(p, &jobs[0].w, job_work, job_done), 0);
  wait_started(&loop, 1); /* job 0 runs (held) */
  for (int i = 1; i <= 4; i++)
    assert_int_equal(zm_workers_queue(p, &jobs[i].w, job_work, job_done), 0);
  assert_int_equal(zm_workers_steal(p, &jobs[0].w), 0); /* running */
  assert_int_equal(zm_workers_steal(p, &jobs[2].w), 1); /* middle */
  assert_int_equal(zm_workers_steal(p, &jobs[2].w), 0); /* not queued now */
  assert_int_equal(zm_workers_steal(p, &jobs[1].w), 1); /* head */
  assert_int_equal(zm_workers_steal(p, &jobs[4].w), 1); /* tail */
  assert_int_equal(zm_workers_queued(p), 1);
  assert_int_equal(zm_workers_queue(p, &jobs[5].w, job_work, job_done), 0);
  assert_int_equal(zm_workers_queue(p, &jobs[4].w, job_work, job_done), 0);
  gate_set(1);
  uv_run(&loop, UV_RUN_DEFAULT);
  static const int want[] = {0, 3, 5, 4};
  assert_int_equal(n_order, 4);
  for (int i = 0; i < 4; i++)
    assert_int_equal(order[i], want[i]);
  assert_int_equal(jobs[1].done_calls, 0);
  assert_int_equal(jobs[2].done_calls, 0);
  assert_false(jobs[1].ran);
  assert_false(jobs[2].ran);
  assert_int_equal(jobs[4].done_calls, 1);
  assert_int_equal(zm_workers_steal(p, &jobs[3].w), 0); /* finished */
  closed = 0;
  zm_workers_close(p, on_closed, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* Close with one job running and three queued: the running one finishes
 * (status 0), the queued ones complete with UV_ECANCELED without running,
 * in order; new work is refused; the close callback runs last and
 * the loop closes cleanly (threads joined, handle closed). */
static void test_shutdown_with_queued(void **state) {
  (void)state;
  reset();
  gate_set(0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 1, 16), 0);
  job_t jobs[5];
  memset(jobs, 0, sizeof jobs);
  for (int i = 0; i < 5; i++)
    jobs[i].idx = i;
  assert_int_equal(zm_workers_queue(p, &jobs[0].w, job_work, job_done), 0);
  wait_started(&loop, 1);
  for (int i = 1; i <= 3; i++)
    assert_int_equal(zm_workers_queue(p, &jobs[i].w, job_work, job_done), 0);
  closed = 0;
  zm_workers_close(p, on_closed, NULL);
  assert_int_equal(zm_workers_queue(p, &jobs[4].w, job_work, job_done),
                   UV_ECANCELED);
  gate_set(1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(closed, 1);
  assert_int_equal(jobs[0].status, 0);
  assert_true(jobs[0].ran);
  for (int i = 1; i <= 3; i++) {
    assert_int_equal(jobs[i].status, UV_ECANCELED);
    assert_false(jobs[i].ran);
    assert_int_equal(jobs[i].done_calls, 1);
  }
  assert_int_equal(jobs[4].done_calls, 0);
  for (int i = 1; i <= 3; i++)
    assert_int_equal(jobs[i].w.cpu_ns, 0); /* never ran */
  assert_int_equal(n_order, 4);
  /* the cancelled ones, in order, do not wait for the one running */
  static const int want[] = {1, 2, 3, 0};
  for (int i = 0; i < 4; i++)
    assert_int_equal(order[i], want[i]);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* CPU-bound work: at least `ns` of this thread's CPU time, which it
 * records (as read by the job itself) for the test to compare. */
typedef struct {
  zm_work_t w;
  uint64_t ns, seen, sink;
  int done_status;
} burn_t;

static uint64_t cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void burn_work(zm_work_t *w) {
  burn_t *b = (burn_t *)w;
  uint64_t t0 = cpu_now();
  volatile uint64_t x = 0;
  while (cpu_now() - t0 < b->ns)
    for (int i = 0; i < 1000; i++)
      x += (uint64_t)i;
  b->seen = cpu_now() - t0;
  b->sink = x;
}

static void burn_done(zm_work_t *w, int status) {
  ((burn_t *)w)->done_status = status;
}

/* w->cpu_ns is the CPU the work took on its thread: at least what the job
 * measured inside itself, and a job that waits without using CPU (the gated
 * job above) is not charged its wait. */
static void test_cpu_accounting(void **state) {
  (void)state;
  reset();
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p;
  assert_int_equal(zm_workers_new(&p, &loop, 1, 8), 0);
  burn_t b = {.ns = 20u * 1000 * 1000}; /* 20 ms of CPU */
  job_t idle;
  memset(&idle, 0, sizeof idle);
  gate_set(0);
  assert_int_equal(zm_workers_queue(p, &idle.w, job_work, job_done), 0);
  wait_started(&loop, 1);
  usleep(200 * 1000); /* blocked on the gate, off the CPU */
  gate_set(1);
  assert_int_equal(zm_workers_queue(p, &b.w, burn_work, burn_done), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(b.done_status, 0);
  assert_true(b.seen >= b.ns);
  assert_true(b.w.cpu_ns >= b.seen);
  assert_int_equal(idle.status, 0);
  assert_true(idle.w.cpu_ns < b.w.cpu_ns); /* its 200 ms wait is not CPU */
  zm_workers_close(p, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_bad_args(void **state) {
  (void)state;
  uv_loop_t loop;
  uv_loop_init(&loop);
  zm_workers_t *p = (zm_workers_t *)&loop;
  assert_int_equal(zm_workers_new(&p, &loop, 0, 4), UV_EINVAL);
  assert_null(p);
  assert_int_equal(zm_workers_new(&p, &loop, 65, 4), UV_EINVAL);
  assert_int_equal(zm_workers_new(&p, &loop, 1, 0), UV_EINVAL);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fifo_on_loop),
      cmocka_unit_test(test_many_threads),
      cmocka_unit_test(test_queue_full),
      cmocka_unit_test(test_steal),
      cmocka_unit_test(test_shutdown_with_queued),
      cmocka_unit_test(test_cpu_accounting),
      cmocka_unit_test(test_bad_args),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
