/* h2mem.c - nghttp2's allocator: mmap for large blocks, wipe on free,
 * per-session accounting and trimming of idle sessions' zero pages. */
#include "h2mem.h"

#include "zm/zm.h"

#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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
 *
 * Touched pages stay resident: the frame buffer's first page is written by
 * every frame sent, the stream map's by every stream opened. Once a session
 * is idle those pages hold zeros (sent frames are wiped, closed streams
 * leave their buckets empty), and zm_h2_mem_trim hands them back: that is
 * 8 KiB of the cost of every idle connection.
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

static void owner_add_mapped(zm_h2_mem_t *m, void *p, size_t n) {
  m->mapped_bytes += n;
  for (size_t i = 0; i < ZM_H2_MEM_TRACKED; i++) {
    if (m->mapped[i].p == NULL) {
      m->mapped[i].p = p;
      m->mapped[i].n = n;
      return;
    }
  }
}

static void owner_remove_mapped(zm_h2_mem_t *m, const void *p, size_t n) {
  m->mapped_bytes -= n;
  for (size_t i = 0; i < ZM_H2_MEM_TRACKED; i++) {
    if (m->mapped[i].p == p) {
      m->mapped[i].p = NULL;
      m->mapped[i].n = 0;
      return;
    }
  }
}

static void *h2_mmap(size_t n, zm_h2_mem_t *m) {
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
  owner_add_mapped(m, p, n);
  return p;
}

static void *h2_heap_got(void *p, zm_h2_mem_t *m) {
  if (p != NULL)
    m->heap_bytes += malloc_usable_size(p);
  return p;
}

static void *h2_malloc(size_t n, void *ud) {
  zm_h2_mem_t *m = ud;
  if (n >= H2_MMAP_MIN)
    return h2_mmap(n, m);
  return injected_failure() ? NULL : h2_heap_got(malloc(n), m);
}

static void h2_free(void *p, void *ud) {
  zm_h2_mem_t *m = ud;
  if (p == NULL)
    return;
  size_t n = h2_big_take(p);
  if (n != 0) {
    owner_remove_mapped(m, p, n);
    munmap(p, n);
  } else {
    size_t u = malloc_usable_size(p);
    m->heap_bytes -= u;
    zm_wipe(p, u);
    free(p);
  }
}

static void *h2_calloc(size_t nmemb, size_t size, void *ud) {
  zm_h2_mem_t *m = ud;
  if (size != 0 && nmemb > SIZE_MAX / size)
    return NULL;
  size_t n = nmemb * size;
  if (n >= H2_MMAP_MIN)
    return h2_mmap(n, m); /* zero already */
  return injected_failure() ? NULL : h2_heap_got(calloc(nmemb, size), m);
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

void zm_h2_mem_init(zm_h2_mem_t *m) {
  memset(m, 0, sizeof *m);
  m->mem.mem_user_data = m;
  m->mem.malloc = h2_malloc;
  m->mem.free = h2_free;
  m->mem.calloc = h2_calloc;
  m->mem.realloc = h2_realloc;
}

/* n is a multiple of the page size, itself a multiple of 4096. */
static int page_is_zero(const unsigned char *p, size_t n) {
  static const unsigned char zeros[4096];
  for (size_t off = 0; off < n; off += sizeof zeros)
    if (memcmp(p + off, zeros, sizeof zeros) != 0)
      return 0;
  return 1;
}

static size_t page_size(void) {
  static size_t pg;
  if (pg == 0)
    pg = (size_t)sysconf(_SC_PAGESIZE);
  return pg;
}

/* Gives back the zero pages among the pages [p, p + n) that are resident
 * (mincore: a page never touched is not read, so it is not faulted in),
 * one madvise per run of them. */
static size_t trim_pages(unsigned char *p, size_t n, size_t pg) {
  size_t pages = n / pg, released = 0;
  unsigned char vec[64];
  for (size_t first = 0; first < pages; first += sizeof vec) {
    size_t k = pages - first < sizeof vec ? pages - first : sizeof vec;
    if (mincore(p + first * pg, k * pg, vec) != 0)
      return released;
    unsigned char *run = NULL;
    for (size_t i = 0; i <= k; i++) {
      unsigned char *page = p + (first + i) * pg;
      if (i < k && (vec[i] & 1) && page_is_zero(page, pg)) {
        if (run == NULL)
          run = page;
        continue;
      }
      if (run != NULL && madvise(run, (size_t)(page - run), MADV_DONTNEED) == 0)
        released += (size_t)(page - run);
      run = NULL;
    }
  }
  return released;
}

size_t zm_trim_zero_pages(void *p, size_t n) {
  size_t pg = page_size();
  uintptr_t a = ((uintptr_t)p + pg - 1) & ~(uintptr_t)(pg - 1);
  uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)(pg - 1);
  if (p == NULL || e <= a)
    return 0;
  return trim_pages((unsigned char *)a, (size_t)(e - a), pg);
}

size_t zm_h2_mem_trim(zm_h2_mem_t *m) {
  size_t pg = page_size(), released = 0;
  for (size_t i = 0; i < ZM_H2_MEM_TRACKED; i++) {
    /* a mapping covers the whole of its last page */
    if (m->mapped[i].p != NULL)
      released +=
          trim_pages(m->mapped[i].p, (m->mapped[i].n + pg - 1) / pg * pg, pg);
  }
  return released;
}
