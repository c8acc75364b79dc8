/* logq.c - bounded ring + writer thread (see zm/logq.h). */
#include "zm/logq.h"

#include "zm/thread.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Bytes the writer takes out of the ring per write(2). */
#define CHUNK (64u * 1024)

struct zm_logq {
  pthread_mutex_t mu;
  pthread_cond_t ready;   /* writer: data queued or stop */
  pthread_cond_t drained; /* flushers: the ring became empty */
  pthread_t thread;
  char *ring;
  size_t cap, head, len; /* data = ring[head .. head+len) modulo cap */
  uint64_t dropped, dropped_reported;
  int writing; /* writer holds a chunk outside the lock */
  int stop;
  int fd, own_fd;
  int json_drops;
  int kick; /* a deferring thread queued lines without waking the writer;
               read and written by that thread only */
};

/* Set on the event loop's thread: its pushes leave waking the writer to
 * zm_logq_kick(), once per loop iteration. On one core, each wake-up is two
 * context switches, and the writer, woken per line, preempts the loop for
 * every line it writes. */
static _Thread_local int defer_here;

void zm_logq_defer_here(int on) { defer_here = on; }

static void write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return; /* nowhere to report it: the log is what failed */
    }
    p += w;
    n -= (size_t)w;
  }
}

static void *writer(void *arg) {
  zm_logq_t *q = arg;
  /* the audit queue is the one that reports drops as JSON */
  zm_thread_helper(q->json_drops ? "zm-audit" : "zm-log");
  char *chunk = malloc(CHUNK);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (q->len == 0 && q->dropped == q->dropped_reported && !q->stop)
      pthread_cond_wait(&q->ready, &q->mu);
    if (q->len == 0 && q->dropped == q->dropped_reported && q->stop)
      break;
    size_t n = 0;
    if (chunk != NULL) {
      while (n < CHUNK && q->len > 0) {
        size_t k = q->cap - q->head; /* contiguous run */
        if (k > q->len)
          k = q->len;
        if (k > CHUNK - n)
          k = CHUNK - n;
        memcpy(chunk + n, q->ring + q->head, k);
        q->head = (q->head + k) % q->cap;
        q->len -= k;
        n += k;
      }
    } else {
      q->len = 0; /* no chunk buffer: cannot write; count as dropped */
    }
    uint64_t drops = q->dropped - q->dropped_reported;
    q->dropped_reported = q->dropped;
    q->writing = 1;
    pthread_mutex_unlock(&q->mu);
    if (n > 0)
      write_all(q->fd, chunk, n);
    if (drops > 0) {
      char line[128];
      int k = q->json_drops
                  ? snprintf(line, sizeof line,
                             "{\"event\":\"dropped\",\"count\":%llu}\n",
                             (unsigned long long)drops)
                  : snprintf(line, sizeof line,
                             "WARN log: %llu lines dropped (queue full)\n",
                             (unsigned long long)drops);
      if (k > 0)
        write_all(q->fd, line,
                  (size_t)k < sizeof line ? (size_t)k : sizeof line);
    }
    pthread_mutex_lock(&q->mu);
    q->writing = 0;
    if (q->len == 0)
      pthread_cond_broadcast(&q->drained);
  }
  pthread_cond_broadcast(&q->drained);
  pthread_mutex_unlock(&q->mu);
  free(chunk);
  return NULL;
}

zm_logq_t *zm_logq_new(int fd, size_t cap, int own_fd, int json_drops) {
  zm_logq_t *q = calloc(1, sizeof *q);
  if (q == NULL)
    return NULL;
  q->ring = malloc(cap);
  if (q->ring == NULL) {
    free(q);
    return NULL;
  }
  q->cap = cap;
  q->fd = fd;
  q->own_fd = own_fd;
  q->json_drops = json_drops;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->ready, NULL);
  pthread_cond_init(&q->drained, NULL);
  if (pthread_create(&q->thread, NULL, writer, q) != 0) {
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->ready);
    pthread_cond_destroy(&q->drained);
    free(q->ring);
    free(q);
    return NULL;
  }
  return q;
}

int zm_logq_push(zm_logq_t *q, const char *line, size_t n) {
  pthread_mutex_lock(&q->mu);
  if (n > q->cap - q->len) {
    q->dropped++;
    pthread_mutex_unlock(&q->mu);
    pthread_cond_signal(&q->ready);
    return -1;
  }
  size_t tail = (q->head + q->len) % q->cap;
  size_t k = q->cap - tail;
  if (k > n)
    k = n;
  memcpy(q->ring + tail, line, k);
  memcpy(q->ring, line + k, n - k);
  q->len += n;
  /* past half the ring, wake it now: a burst must not fill the ring while
   * the loop is still in the same iteration */
  int wake = !defer_here || q->len > q->cap / 2;
  if (!wake)
    q->kick = 1;
  pthread_mutex_unlock(&q->mu);
  /* after the unlock: a writer woken on this core must not find the mutex
   * still held (zm/thread.h) */
  if (wake)
    pthread_cond_signal(&q->ready);
  return 0;
}

void zm_logq_kick(zm_logq_t *q) {
  if (q == NULL || !q->kick)
    return;
  q->kick = 0;
  /* No lock needed: the lines were queued under it, so the writer either
   * sees them before it waits or is waiting and gets this signal. */
  pthread_cond_signal(&q->ready);
}

uint64_t zm_logq_dropped(zm_logq_t *q) {
  pthread_mutex_lock(&q->mu);
  uint64_t d = q->dropped;
  pthread_mutex_unlock(&q->mu);
  return d;
}

void zm_logq_flush(zm_logq_t *q) {
  pthread_mutex_lock(&q->mu);
  while (q->len > 0 || q->writing || q->dropped != q->dropped_reported) {
    pthread_cond_signal(&q->ready);
    pthread_cond_wait(&q->drained, &q->mu);
  }
  pthread_mutex_unlock(&q->mu);
}

void zm_logq_free(zm_logq_t *q) {
  if (q == NULL)
    return;
  pthread_mutex_lock(&q->mu);
  q->stop = 1;
  pthread_cond_signal(&q->ready);
  pthread_mutex_unlock(&q->mu);
  pthread_join(q->thread, NULL);
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->ready);
  pthread_cond_destroy(&q->drained);
  if (q->own_fd)
    close(q->fd);
  free(q->ring);
  free(q);
}
