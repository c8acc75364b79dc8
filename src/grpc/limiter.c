/* limiter.c - per-caller token bucket + in-flight cap (see limiter.h). */
#include "limiter.h"

#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096u /* power of two */

struct zm_lim_entry {
  zm_lim_entry_t *next;
  double tokens;
  uint64_t last_ms;
  unsigned inflight;
  char key[];
};

struct zm_limiter {
  double rate;
  unsigned burst, max_inflight;
  size_t n;
  zm_lim_entry_t *b[BUCKETS];
};

static size_t hash(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return (size_t)h & (BUCKETS - 1);
}

zm_limiter_t *zm_limiter_new(double rate, unsigned burst, unsigned inflight) {
  zm_limiter_t *l = calloc(1, sizeof *l);
  if (l == NULL)
    return NULL;
  l->rate = rate;
  l->burst = burst ? burst : 1;
  l->max_inflight = inflight;
  return l;
}

void zm_limiter_free(zm_limiter_t *l) {
  if (l == NULL)
    return;
  for (size_t i = 0; i < BUCKETS; i++)
    for (zm_lim_entry_t *e = l->b[i], *n; e != NULL; e = n) {
      n = e->next;
      free(e);
    }
  free(l);
}

static void refill(const zm_limiter_t *l, zm_lim_entry_t *e, uint64_t now) {
  if (now > e->last_ms) {
    e->tokens += (double)(now - e->last_ms) * l->rate / 1000.0;
    if (e->tokens > l->burst)
      e->tokens = l->burst;
  }
  e->last_ms = now;
}

zm_lim_result_t zm_limiter_acquire(zm_limiter_t *l, const char *key,
                                   uint64_t now_ms, zm_lim_entry_t **entry) {
  size_t h = hash(key);
  zm_lim_entry_t *e = l->b[h];
  while (e != NULL && strcmp(e->key, key) != 0)
    e = e->next;
  if (e == NULL) {
    if (l->n >= ZM_LIMITER_MAX_CALLERS)
      return ZM_LIM_TABLE;
    size_t kl = strlen(key);
    e = malloc(sizeof *e + kl + 1);
    if (e == NULL)
      return ZM_LIM_TABLE;
    memcpy(e->key, key, kl + 1);
    e->tokens = l->burst;
    e->last_ms = now_ms;
    e->inflight = 0;
    e->next = l->b[h];
    l->b[h] = e;
    l->n++;
  }
  if (l->max_inflight != 0 && e->inflight >= l->max_inflight)
    return ZM_LIM_INFLIGHT;
  if (l->rate > 0) {
    refill(l, e, now_ms);
    if (e->tokens < 1.0)
      return ZM_LIM_RATE;
    e->tokens -= 1.0;
  }
  e->inflight++;
  *entry = e;
  return ZM_LIM_OK;
}

void zm_limiter_release(zm_limiter_t *l, zm_lim_entry_t *e) {
  (void)l;
  if (e != NULL && e->inflight > 0)
    e->inflight--;
}

size_t zm_limiter_sweep(zm_limiter_t *l, uint64_t now_ms) {
  for (size_t i = 0; i < BUCKETS; i++) {
    for (zm_lim_entry_t **pp = &l->b[i]; *pp != NULL;) {
      zm_lim_entry_t *e = *pp;
      if (l->rate > 0)
        refill(l, e, now_ms);
      if (e->inflight == 0 && (l->rate <= 0 || e->tokens >= l->burst)) {
        *pp = e->next;
        free(e);
        l->n--;
      } else {
        pp = &e->next;
      }
    }
  }
  return l->n;
}
