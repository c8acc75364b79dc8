/* h2mem.c - nghttp2's allocator: mmap for large blocks, wipe on free. */
#include "h2mem.h"

#include "zm/zm.h"

#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

unsigned long zm__h2_mem_fail_after;

static int injected_failure(void) {
  return zm__h2_mem_fail_after != 0 && --zm__h2_mem_fail_after == 0;
}

/*
 * nghttp2 allocates about 25 KB per session up front (a 16 KB outbound frame
 * buffer, a 4 KB stream map, ...), of which an idle connection touches a
 * page or two. On the heap, neighbouring allocations make all those pages
 * resident; mapped on their own, untouched pages cost nothing. This is what
 * keeps 10,000 idle connections small. Blocks of H2_MMAP_MIN bytes or more
 * are mmap'd, with their sizes in a side table (a header would touch a page);
 * smaller ones stay on the heap.
 *
 * Wiping: heap blocks are cleared (malloc_usable_size bytes) before free();
 * mapped blocks go back to the kernel with munmap, which leaves nothing in
 * the process (the kernel zeroes pages before it hands them out again).
 */
#define H2_MMAP_MIN 4096u

typedef struct {
  void *p;
  size_t n;
} h2_big_t;

static h2_big_t *h2_big;  /* open addressing, linear probing */
static size_t h2_big_cap; /* power of two, 0 = not allocated */
static size_t h2_big_len;

static size_t h2_slot(const void *p, size_t cap) {
  return (size_t)(((uintptr_t)p >> 12) * 0x9E3779B97F4A7C15ull) & (cap - 1);
}

/* Returns 0, or -1 when the table cannot grow. */
static int h2_big_put(void *p, size_t n) {
  if ((h2_big_len + 1) * 2 > h2_big_cap) {
    size_t ncap = h2_big_cap ? h2_big_cap * 2 : 1024;
    h2_big_t *nt = calloc(ncap, sizeof *nt);
    if (nt == NULL)
      return -1;
    for (size_t i = 0; i < h2_big_cap; i++) {
      if (h2_big[i].p == NULL)
        continue;
      size_t j = h2_slot(h2_big[i].p, ncap);
      while (nt[j].p != NULL)
        j = (j + 1) & (ncap - 1);
      nt[j] = h2_big[i];
    }
    free(h2_big);
    h2_big = nt;
    h2_big_cap = ncap;
  }
  size_t j = h2_slot(p, h2_big_cap);
  while (h2_big[j].p != NULL)
    j = (j + 1) & (h2_big_cap - 1);
  h2_big[j].p = p;
  h2_big[j].n = n;
  h2_big_len++;
  return 0;
}

/* Removes p; returns its size, or 0 when p is a heap block. */
static size_t h2_big_take(void *p) {
  if (h2_big_cap == 0)
    return 0;
  size_t mask = h2_big_cap - 1, j = h2_slot(p, h2_big_cap);
  while (h2_big[j].p != NULL && h2_big[j].p != p)
    j = (j + 1) & mask;
  if (h2_big[j].p == NULL)
    return 0;
  size_t n = h2_big[j].n;
  h2_big[j].p = NULL;
  h2_big_len--;
  /* backward-shift deletion keeps probe chains intact */
  for (size_t k = (j + 1) & mask; h2_big[k].p != NULL; k = (k + 1) & mask) {
    size_t home = h2_slot(h2_big[k].p, h2_big_cap);
    if (((k - home) & mask) >= ((k - j) & mask)) {
      h2_big[j] = h2_big[k];
      h2_big[k].p = NULL;
      j = k;
    }
  }
  return n;
}

static void *h2_mmap(size_t n) {
  if (injected_failure())
    return NULL;
  void *p =
      mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return NULL;
  if (h2_big_put(p, n) != 0) {
    munmap(p, n);
    return NULL;
  }
  return p;
}

static void *h2_malloc(size_t n, void *ud) {
  (void)ud;
  if (n >= H2_MMAP_MIN)
    return h2_mmap(n);
  return injected_failure() ? NULL : malloc(n);
}

static void heap_free_wiped(void *p) {
  zm_wipe(p, malloc_usable_size(p));
  free(p);
}

static void h2_free(void *p, void *ud) {
  (void)ud;
  if (p == NULL)
    return;
  size_t n = h2_big_take(p);
  if (n != 0)
    munmap(p, n);
  else
    heap_free_wiped(p);
}

static void *h2_calloc(size_t nmemb, size_t size, void *ud) {
  (void)ud;
  if (size != 0 && nmemb > SIZE_MAX / size)
    return NULL;
  size_t n = nmemb * size;
  if (n >= H2_MMAP_MIN)
    return h2_mmap(n); /* zero already */
  return injected_failure() ? NULL : calloc(nmemb, size);
}

/* Always a new block + copy + wiped free: realloc() could move the block
 * and leave the old bytes behind unwiped. */
static void *h2_realloc(void *p, size_t n, void *ud) {
  if (p == NULL)
    return h2_malloc(n, ud);
  size_t old = h2_big_take(p);
  if (old != 0) {
    /* put back until the copy is done; cannot fail: the table holds the
     * same number of entries as before the take */
    int rv = h2_big_put(p, old);
    ZM_ASSERT(rv == 0);
  } else {
    old = malloc_usable_size(p);
  }
  void *np = h2_malloc(n, ud);
  if (np == NULL)
    return NULL;
  memcpy(np, p, old < n ? old : n);
  h2_free(p, ud);
  return np;
}

nghttp2_mem zm__h2_mem = {NULL, h2_malloc, h2_free, h2_calloc, h2_realloc};
