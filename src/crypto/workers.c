/* workers.c - the crypto worker pool (see include/zm/workers.h).
 *
 * The threads run at SCHED_IDLE, so a worker can be off the CPU for as long
 * as the loop is busy. Nothing the loop does may therefore wait for a
 * worker: no mutex shared with them, and no uv_async_send() from them
 * (libuv's loop spins until a sender that was preempted halfway through
 * finishes, which an idle-class thread does only when the loop lets go of
 * the core). Instead:
 * - the FIFO of work not yet started is the loop's alone; the loop hands
 *   one job at a time to an idle thread through that thread's slot and wakes
 *   it with sem_post();
 * - a thread pushes what it finished onto a lock-free stack and writes an
 *   eventfd, which the loop polls; a thread preempted between the two only
 *   delays the wake-up, and the loop takes the whole stack in one exchange.
 */
#include "zm/workers.h"

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/ecc.h>

#include "zm/log.h"
#include "zm/zm.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ZM_WORKERS_MAX_THREADS 64u

typedef struct {
  zm_workers_t *p;
  unsigned idx;
  pthread_t thread;
  sem_t go;
  zm_work_t *job; /* set by the loop before sem_post; NULL = leave */
} slot_t;

struct zm_workers {
  uv_loop_t *loop;
  uv_poll_t poll;
  int efd;
  slot_t slots[ZM_WORKERS_MAX_THREADS];
  unsigned n_threads;
  _Atomic(zm_work_t *) done; /* finished, newest first (workers push) */
  atomic_uint exited;        /* threads that left their loop */
  atomic_int prio;           /* lowest the threads got */
  /* loop thread only: */
  unsigned idle[ZM_WORKERS_MAX_THREADS]; /* stack of idle slot indices */
  unsigned n_idle;
  size_t max_queued;
  size_t n_queued;
  size_t n_running;
  size_t outstanding;          /* queued, running or done, not called back */
  zm_work_t *todo, *todo_tail; /* FIFO, not started */
  zm_work_t *cancelled, *cancelled_tail; /* FIFO, called back next turn */
  int closing;                           /* 1: closing, 2: handle closing */
  int referenced;                        /* poll handle ref'd */
  void (*close_done)(void *);
  void *close_data;
};

/* Lowest priority this thread may take: SCHED_IDLE (Linux lets any thread
 * switch to it), else nice +19 for this thread only. */
static zm_workers_prio_t lower_priority(void) {
#ifdef SCHED_IDLE
  struct sched_param sp = {.sched_priority = 0};
  if (sched_setscheduler(0, SCHED_IDLE, &sp) == 0)
    return ZM_WORKERS_PRIO_IDLE;
#endif
  if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) == 0)
    return ZM_WORKERS_PRIO_NICE;
  return ZM_WORKERS_PRIO_NORMAL;
}

/* One write: the counter changes atomically, so a thread preempted before
 * or after it leaves nothing half done for the loop to wait on. */
static void notify(zm_workers_t *p) {
  uint64_t one = 1;
  while (write(p->efd, &one, sizeof one) < 0 && errno == EINTR)
    ;
}

static void *worker(void *arg) {
  slot_t *s = arg;
  zm_workers_t *p = s->p;
  /* named so that per-thread CPU figures (top -H, /proc) tell them apart */
  pthread_setname_np(pthread_self(), "zm-crypto");
  int prio = (int)lower_priority();
  int cur = atomic_load(&p->prio);
  while (prio < cur && !atomic_compare_exchange_weak(&p->prio, &cur, prio))
    ;
  for (;;) {
    while (sem_wait(&s->go) != 0 && errno == EINTR)
      ;
    zm_work_t *w = s->job;
    if (w == NULL)
      break;
    /* two clock reads per job: a job costs 100 us or more of CPU */
    uint64_t c0 = zm_thread_cpu_ns();
    w->work(w);
    uint64_t c1 = zm_thread_cpu_ns();
    w->cpu_ns = c1 > c0 ? c1 - c0 : 0;
    w->status = 0;
    zm_work_t *head = atomic_load_explicit(&p->done, memory_order_relaxed);
    do
      w->next = head;
    while (!atomic_compare_exchange_weak_explicit(
        &p->done, &head, w, memory_order_release, memory_order_relaxed));
    notify(p);
  }
#ifdef FP_ECC
  /* wolfSSL's per-thread cache of base-point tables (see keycsr.c) */
  wc_ecc_fp_free();
#endif
  atomic_fetch_add_explicit(&p->exited, 1, memory_order_release);
  notify(p);
  return NULL;
}

static void set_ref(zm_workers_t *p) {
  int want = p->outstanding > 0 || p->closing;
  if (want == p->referenced)
    return;
  p->referenced = want;
  if (want)
    uv_ref((uv_handle_t *)&p->poll);
  else
    uv_unref((uv_handle_t *)&p->poll);
}

/* Hands queued work to idle threads; while closing, lets idle threads go. */
static void assign(zm_workers_t *p) {
  while (p->n_idle > 0 && (p->todo != NULL || p->closing)) {
    slot_t *s = &p->slots[p->idle[--p->n_idle]];
    if (p->closing) {
      s->job = NULL;
    } else {
      zm_work_t *w = p->todo;
      p->todo = w->next;
      if (p->todo == NULL)
        p->todo_tail = NULL;
      p->n_queued--;
      p->n_running++;
      w->next = NULL;
      w->slot_ = s->idx;
      s->job = w;
    }
    sem_post(&s->go);
  }
}

static void on_poll_closed(uv_handle_t *h) {
  zm_workers_t *p = h->data;
  void (*done)(void *) = p->close_done;
  void *data = p->close_data;
  close(p->efd);
  for (unsigned i = 0; i < p->n_threads; i++)
    sem_destroy(&p->slots[i].go);
  free(p);
  if (done != NULL)
    done(data);
}

static void on_event(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  zm_workers_t *p = h->data;
  uint64_t n;
  while (read(p->efd, &n, sizeof n) < 0 && errno == EINTR)
    ;
  /* Newest first on the stack: reversed, completions run oldest first. */
  zm_work_t *list = NULL;
  zm_work_t *w = atomic_exchange_explicit(&p->done, NULL, memory_order_acquire);
  while (w != NULL) {
    zm_work_t *next = w->next;
    w->next = list;
    list = w;
    w = next;
  }
  for (w = list; w != NULL; w = w->next) {
    p->n_running--;
    p->idle[p->n_idle++] = w->slot_;
  }
  assign(p); /* before the callbacks, which may queue more */
  zm_work_t *cancelled = p->cancelled;
  p->cancelled = p->cancelled_tail = NULL;
  /* cancelled work was queued before anything still to finish: first */
  while (cancelled != NULL) {
    w = cancelled;
    cancelled = w->next;
    w->next = NULL;
    p->outstanding--;
    w->done(w, UV_ECANCELED);
  }
  while (list != NULL) {
    w = list;
    list = w->next;
    w->next = NULL;
    p->outstanding--;
    w->done(w, w->status);
  }
  set_ref(p);
  if (p->closing == 1 &&
      atomic_load_explicit(&p->exited, memory_order_acquire) == p->n_threads) {
    p->closing = 2;
    /* every thread has left its loop: joining does not wait */
    for (unsigned i = 0; i < p->n_threads; i++)
      pthread_join(p->slots[i].thread, NULL);
    uv_close((uv_handle_t *)&p->poll, on_poll_closed);
  }
}

int zm_workers_new(zm_workers_t **out, uv_loop_t *loop, unsigned threads,
                   size_t max_queued) {
  *out = NULL;
  if (threads == 0 || threads > ZM_WORKERS_MAX_THREADS || max_queued == 0)
    return UV_EINVAL;
  zm_workers_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return UV_ENOMEM;
  p->loop = loop;
  p->max_queued = max_queued;
  atomic_init(&p->done, NULL);
  atomic_init(&p->exited, 0);
  atomic_init(&p->prio, ZM_WORKERS_PRIO_IDLE);
  p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (p->efd < 0) {
    int rc = -errno;
    free(p);
    return rc;
  }
  int rc = uv_poll_init(loop, &p->poll, p->efd);
  if (rc != 0) {
    close(p->efd);
    free(p);
    return rc;
  }
  p->poll.data = p;
  uv_poll_start(&p->poll, UV_READABLE, on_event);
  uv_unref((uv_handle_t *)&p->poll);
  for (unsigned i = 0; i < threads; i++) {
    slot_t *s = &p->slots[i];
    s->p = p;
    s->idx = i;
    if (sem_init(&s->go, 0, 0) != 0)
      break;
    if (pthread_create(&s->thread, NULL, worker, s) != 0) {
      sem_destroy(&s->go);
      break;
    }
    p->n_threads++;
    p->idle[p->n_idle++] = i;
  }
  if (p->n_threads == 0) {
    p->closing = 2;
    uv_close((uv_handle_t *)&p->poll, on_poll_closed); /* frees p */
    return UV_EAGAIN;
  }
  if (p->n_threads < threads)
    ZM_WARN("crypto workers: started %u of %u threads", p->n_threads, threads);
  *out = p;
  return 0;
}

int zm_workers_queue(zm_workers_t *p, zm_work_t *w, zm_work_cb work,
                     zm_after_work_cb done) {
  if (p->closing)
    return UV_ECANCELED;
  if (p->n_queued >= p->max_queued)
    return UV_EAGAIN;
  w->work = work;
  w->done = done;
  w->status = 0;
  w->cpu_ns = 0;
  w->next = NULL;
  if (p->todo_tail != NULL)
    p->todo_tail->next = w;
  else
    p->todo = w;
  p->todo_tail = w;
  p->n_queued++;
  p->outstanding++;
  assign(p);
  set_ref(p);
  return 0;
}

int zm_workers_steal(zm_workers_t *p, zm_work_t *w) {
  zm_work_t *prev = NULL;
  for (zm_work_t *q = p->todo; q != NULL; prev = q, q = q->next) {
    if (q != w)
      continue;
    if (prev != NULL)
      prev->next = w->next;
    else
      p->todo = w->next;
    if (p->todo_tail == w)
      p->todo_tail = prev;
    w->next = NULL;
    p->n_queued--;
    p->outstanding--;
    set_ref(p);
    return 1;
  }
  return 0;
}

void zm_workers_close(zm_workers_t *p, void (*done)(void *), void *data) {
  if (p->closing)
    return;
  p->closing = 1;
  p->close_done = done;
  p->close_data = data;
  /* queued work completes as cancelled, on the next turn */
  p->cancelled = p->todo;
  p->cancelled_tail = p->todo_tail;
  p->todo = p->todo_tail = NULL;
  p->n_queued = 0;
  assign(p);  /* idle threads leave now, busy ones after their job */
  set_ref(p); /* the loop lives until the threads have left */
  notify(p);
}

size_t zm_workers_queued(const zm_workers_t *p) { return p->n_queued; }

size_t zm_workers_running(const zm_workers_t *p) { return p->n_running; }

zm_workers_prio_t zm_workers_priority(const zm_workers_t *p) {
  return (zm_workers_prio_t)atomic_load(&((zm_workers_t *)p)->prio);
}

const char *zm_workers_prio_name(zm_workers_prio_t prio) {
  switch (prio) {
  case ZM_WORKERS_PRIO_IDLE:
    return "SCHED_IDLE";
  case ZM_WORKERS_PRIO_NICE:
    return "nice 19";
  default:
    return "normal";
  }
}
