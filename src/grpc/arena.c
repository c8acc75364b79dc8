/*
 * arena.c - per-call arena: inline bytes, then malloc'd blocks freed
 * with the call; protobuf-c decodes into it (failing, not aborting).
 */
#include "server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ===================== arena ============================================ */

static void *call_alloc_soft(zm_call_t *c, size_t n);

/* Handlers' allocations (responses they build) abort on exhaustion, like
 * the rest of our code; decoding uses call_alloc_soft(). */
void *zm_call_alloc(zm_call_t *c, size_t n) {
  void *p = call_alloc_soft(c, n);
  if (p == NULL) {
    fprintf(stderr, "fatal: out of memory in a call arena (%zu bytes)\n", n);
    abort();
  }
  return p;
}

char *zm_call_strdup(zm_call_t *c, const char *s) {
  size_t n = strlen(s);
  char *p = zm_call_alloc(c, n + 1);
  memcpy(p, s, n + 1);
  return p;
}

/* Arena allocation that fails instead of aborting: what protobuf-c asks
 * for while decoding is driven by the client's input. */
static void *call_alloc_soft(zm_call_t *c, size_t n) {
  if (n > SIZE_MAX - 16)
    return NULL;
  n = (n + 15u) & ~(size_t)15u;
  if (c->arena_used + n <= sizeof c->arena) {
    void *p = c->arena + c->arena_used;
    c->arena_used += n;
    return p;
  }
  arena_block_t *b = c->arena_extra;
  if (b == NULL || b->used + n > b->cap) {
    size_t cap = n > ZM_CALL_ARENA_BLOCK ? n : ZM_CALL_ARENA_BLOCK;
    arena_block_t *nb = malloc(sizeof *nb + cap);
    if (nb == NULL)
      return NULL;
    nb->cap = cap;
    nb->used = 0;
    nb->next = b;
    c->arena_extra = b = nb;
  }
  void *p = b->data + b->used;
  b->used += n;
  return p;
}

const char *call_strdup_soft(zm_call_t *c, const char *s) {
  size_t n = strlen(s);
  char *p = call_alloc_soft(c, n + 1);
  if (p == NULL)
    return "";
  memcpy(p, s, n + 1);
  return p;
}

void *pb_alloc(void *data, size_t n) { return call_alloc_soft(data, n); }
void pb_free(void *data, void *p) {
  (void)data;
  (void)p;
}
