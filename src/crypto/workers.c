/* workers.c - the crypto worker pool (see include/zm/workers.h). */
#include "zm/workers.h"

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/ecc.h>

#include "zm/log.h"
#include "zm/zm.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ZM_WORKERS_MAX_THREADS 64u

struct zm_workers {
  uv_loop_t *loop;
  uv_async_t async;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  pthread_t threads[ZM_WORKERS_MAX_THREADS];
  unsigned n_threads;
  unsigned exited; /* threads that left their loop (mu) */
  size_t max_queued;
  size_t n_queued;             /* mu */
  size_t n_running;            /* mu */
  size_t outstanding;          /* loop thread: queued, running or done */
  zm_work_t *todo, *todo_tail; /* mu: FIFO */
  zm_work_t *done, *done_tail; /* mu: FIFO, completed */
  int prio;                    /* mu: lowest the threads got */
  int stop;                    /* mu */
  int closing;                 /* loop thread */
  int referenced;              /* loop thread: async ref'd */
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

static void *worker(void *arg) {
  zm_workers_t *p = arg;
  zm_workers_prio_t prio = lower_priority();
  pthread_mutex_lock(&p->mu);
  if ((int)prio < p->prio)
    p->prio = (int)prio;
  for (;;) {
    while (p->todo == NULL && !p->stop)
      pthread_cond_wait(&p->cond, &p->mu);
    if (p->todo == NULL)
      break;
    zm_work_t *w = p->todo;
    p->todo = w->next;
    if (p->todo == NULL)
      p->todo_tail = NULL;
    p->n_queued--;
    p->n_running++;
    pthread_mutex_unlock(&p->mu);
    w->work(w);
    pthread_mutex_lock(&p->mu);
    p->n_running--;
    w->status = 0;
    w->next = NULL;
    if (p->done_tail != NULL)
      p->done_tail->next = w;
    else
      p->done = w;
    p->done_tail = w;
    uv_async_send(&p->async);
  }
  pthread_mutex_unlock(&p->mu);
#ifdef FP_ECC
  /* wolfSSL's per-thread cache of base-point tables (see keycsr.c) */
  wc_ecc_fp_free();
#endif
  pthread_mutex_lock(&p->mu);
  p->exited++;
  uv_async_send(&p->async);
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static void on_closed(uv_handle_t *h) {
  zm_workers_t *p = h->data;
  void (*done)(void *) = p->close_done;
  void *data = p->close_data;
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cond);
  free(p);
  if (done != NULL)
    done(data);
}

static void set_ref(zm_workers_t *p) {
  int want = p->outstanding > 0;
  if (want == p->referenced)
    return;
  p->referenced = want;
  if (want)
    uv_ref((uv_handle_t *)&p->async);
  else
    uv_unref((uv_handle_t *)&p->async);
}

static void on_async(uv_async_t *a) {
  zm_workers_t *p = a->data;
  pthread_mutex_lock(&p->mu);
  zm_work_t *list = p->done;
  p->done = p->done_tail = NULL;
  int all_exited = p->stop && p->exited == p->n_threads;
  pthread_mutex_unlock(&p->mu);
  while (list != NULL) {
    zm_work_t *w = list;
    list = w->next;
    w->next = NULL;
    p->outstanding--;
    w->done(w, w->status);
  }
  set_ref(p);
  if (all_exited && p->closing == 1) {
    p->closing = 2;
    /* every thread has left its loop: joining does not wait */
    for (unsigned i = 0; i < p->n_threads; i++)
      pthread_join(p->threads[i], NULL);
    uv_close((uv_handle_t *)&p->async, on_closed);
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
  p->prio = ZM_WORKERS_PRIO_IDLE;
  int rc = uv_async_init(loop, &p->async, on_async);
  if (rc != 0) {
    free(p);
    return rc;
  }
  p->async.data = p;
  uv_unref((uv_handle_t *)&p->async);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cond, NULL);
  for (unsigned i = 0; i < threads; i++) {
    if (pthread_create(&p->threads[i], NULL, worker, p) != 0)
      break;
    p->n_threads++;
  }
  if (p->n_threads == 0) {
    p->closing = 2;
    uv_close((uv_handle_t *)&p->async, on_closed); /* frees p */
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
  w->work = work;
  w->done = done;
  w->status = 0;
  w->next = NULL;
  pthread_mutex_lock(&p->mu);
  if (p->n_queued >= p->max_queued) {
    pthread_mutex_unlock(&p->mu);
    return UV_EAGAIN;
  }
  if (p->todo_tail != NULL)
    p->todo_tail->next = w;
  else
    p->todo = w;
  p->todo_tail = w;
  p->n_queued++;
  pthread_cond_signal(&p->cond);
  pthread_mutex_unlock(&p->mu);
  p->outstanding++;
  set_ref(p);
  return 0;
}

void zm_workers_close(zm_workers_t *p, void (*done)(void *), void *data) {
  if (p->closing)
    return;
  p->closing = 1;
  p->close_done = done;
  p->close_data = data;
  pthread_mutex_lock(&p->mu);
  /* queued work completes as cancelled, after what already finished */
  while (p->todo != NULL) {
    zm_work_t *w = p->todo;
    p->todo = w->next;
    w->next = NULL;
    w->status = UV_ECANCELED;
    if (p->done_tail != NULL)
      p->done_tail->next = w;
    else
      p->done = w;
    p->done_tail = w;
  }
  p->todo_tail = NULL;
  p->n_queued = 0;
  p->stop = 1;
  pthread_cond_broadcast(&p->cond);
  pthread_mutex_unlock(&p->mu);
  /* keep the loop alive until the threads have left */
  uv_ref((uv_handle_t *)&p->async);
  p->referenced = 1;
  p->outstanding++; /* released by nothing: the handle closes instead */
  uv_async_send(&p->async);
}

size_t zm_workers_queued(const zm_workers_t *p) {
  pthread_mutex_lock((pthread_mutex_t *)&p->mu);
  size_t n = p->n_queued;
  pthread_mutex_unlock((pthread_mutex_t *)&p->mu);
  return n;
}

size_t zm_workers_running(const zm_workers_t *p) {
  pthread_mutex_lock((pthread_mutex_t *)&p->mu);
  size_t n = p->n_running;
  pthread_mutex_unlock((pthread_mutex_t *)&p->mu);
  return n;
}

zm_workers_prio_t zm_workers_priority(const zm_workers_t *p) {
  pthread_mutex_lock((pthread_mutex_t *)&p->mu);
  int prio = p->prio;
  pthread_mutex_unlock((pthread_mutex_t *)&p->mu);
  return (zm_workers_prio_t)prio;
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
