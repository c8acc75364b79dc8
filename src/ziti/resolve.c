/* resolve.c - getaddrinfo on dedicated threads (see resolve.h). */
#include "resolve.h"

#include "zm/thread.h"
#include "zm/zm.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

struct zm__resolver {
  uv_loop_t *loop;
  uv_async_t async;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  pthread_t threads[ZM_RESOLVER_THREADS];
  int n_threads;
  int stop;
  zm__resolve_req_t *todo, *todo_tail; /* FIFO */
  zm__resolve_req_t *done;             /* LIFO, completed */
  unsigned outstanding; /* loop thread: requested and not yet called back */
  void (*close_done)(void *);
  void *close_data;
};

static void on_closed(uv_handle_t *h);

static void *worker(void *arg) {
  zm__resolver_t *r = arg;
  zm_thread_helper("zm-resolve");
  pthread_mutex_lock(&r->mu);
  for (;;) {
    while (r->todo == NULL && !r->stop)
      pthread_cond_wait(&r->cond, &r->mu);
    if (r->todo == NULL)
      break;
    zm__resolve_req_t *q = r->todo;
    r->todo = q->next;
    if (r->todo == NULL)
      r->todo_tail = NULL;
    int cancelled = q->cancelled;
    pthread_mutex_unlock(&r->mu);
    struct addrinfo *res = NULL;
    int status = UV_ECANCELED;
    if (!cancelled) {
      struct addrinfo hints;
      memset(&hints, 0, sizeof hints);
      hints.ai_family = q->family;
      hints.ai_socktype = SOCK_STREAM;
      int rc = getaddrinfo(q->host, q->port, &hints, &res);
      status = rc == 0             ? 0
               : rc == EAI_AGAIN   ? UV_EAI_AGAIN
               : rc == EAI_NONAME  ? UV_EAI_NONAME
               : rc == EAI_SERVICE ? UV_EAI_SERVICE
                                   : UV_EAI_FAIL;
      if (rc != 0)
        res = NULL;
    }
    pthread_mutex_lock(&r->mu);
    q->status = status;
    q->res = res;
    q->next = r->done;
    r->done = q;
    uv_async_send(&r->async);
  }
  pthread_mutex_unlock(&r->mu);
  return NULL;
}

static void on_async(uv_async_t *a) {
  zm__resolver_t *r = a->data;
  pthread_mutex_lock(&r->mu);
  zm__resolve_req_t *list = r->done;
  r->done = NULL;
  pthread_mutex_unlock(&r->mu);
  /* oldest first */
  zm__resolve_req_t *rev = NULL;
  while (list != NULL) {
    zm__resolve_req_t *n = list->next;
    list->next = rev;
    rev = list;
    list = n;
  }
  while (rev != NULL) {
    zm__resolve_req_t *q = rev;
    rev = q->next;
    q->next = NULL;
    if (--r->outstanding == 0)
      uv_unref((uv_handle_t *)&r->async);
    struct addrinfo *res = q->res;
    int status = q->cancelled ? UV_ECANCELED : q->status;
    q->res = NULL;
    if (status != 0 && res != NULL) {
      freeaddrinfo(res);
      res = NULL;
    }
    q->cb(q, status, res);
  }
}

int zm__resolver_new(zm__resolver_t **out, uv_loop_t *loop) {
  zm__resolver_t *r = zm_xcalloc(1, sizeof *r);
  r->loop = loop;
  int rc = uv_async_init(loop, &r->async, on_async);
  if (rc != 0) {
    free(r);
    return rc;
  }
  r->async.data = r;
  /* referenced only while a request is outstanding: an idle resolver must
   * not keep uv_run alive, and a pending answer must (its owner may have
   * no other handle left, e.g. a connection closing while it resolves) */
  uv_unref((uv_handle_t *)&r->async);
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->cond, NULL);
  for (int i = 0; i < ZM_RESOLVER_THREADS; i++) {
    if (pthread_create(&r->threads[i], NULL, worker, r) != 0)
      break;
    r->n_threads++;
  }
  if (r->n_threads == 0) {
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    uv_close((uv_handle_t *)&r->async, on_closed); /* frees r */
    *out = NULL;
    return UV_EAGAIN;
  }
  *out = r;
  return 0;
}

int zm__resolve(zm__resolver_t *r, zm__resolve_req_t *q, const char *host,
                const char *port, zm__resolve_cb cb) {
  size_t hl = strlen(host), pl = strlen(port);
  if (hl >= sizeof q->host || pl >= sizeof q->port)
    return UV_EINVAL;
  memcpy(q->host, host, hl + 1);
  memcpy(q->port, port, pl + 1);
  if (q->family == 0)
    q->family = AF_UNSPEC;
  q->cb = cb;
  q->cancelled = 0;
  q->res = NULL;
  q->next = NULL;
  if (r->outstanding++ == 0)
    uv_ref((uv_handle_t *)&r->async);
  pthread_mutex_lock(&r->mu);
  if (r->todo_tail != NULL)
    r->todo_tail->next = q;
  else
    r->todo = q;
  r->todo_tail = q;
  pthread_cond_signal(&r->cond);
  pthread_mutex_unlock(&r->mu);
  return 0;
}

void zm__resolve_cancel(zm__resolver_t *r, zm__resolve_req_t *q) {
  pthread_mutex_lock(&r->mu);
  q->cancelled = 1;
  pthread_mutex_unlock(&r->mu);
}

static void on_closed(uv_handle_t *h) {
  zm__resolver_t *r = h->data;
  void (*done)(void *) = r->close_done;
  void *data = r->close_data;
  free(r);
  if (done != NULL)
    done(data);
}

void zm__resolver_close(zm__resolver_t *r, void (*done)(void *), void *data) {
  pthread_mutex_lock(&r->mu);
  ZM_ASSERT(r->todo == NULL);
  r->stop = 1;
  pthread_cond_broadcast(&r->cond);
  pthread_mutex_unlock(&r->mu);
  for (int i = 0; i < r->n_threads; i++)
    pthread_join(r->threads[i], NULL);
  pthread_mutex_destroy(&r->mu);
  pthread_cond_destroy(&r->cond);
  r->close_done = done;
  r->close_data = data;
  uv_close((uv_handle_t *)&r->async, on_closed);
}
