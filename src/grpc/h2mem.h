/*
 * h2mem.h - the allocator handed to nghttp2 (nghttp2_mem): large blocks are
 * mmap'd on their own so idle connections stay small, and every block is
 * wiped before it is given back, because nghttp2's frame buffers hold
 * response bytes (enrolled identities' private keys, enrollment JWTs).
 * Loop thread only, like every nghttp2 call. Never aborts: a failed
 * allocation is reported to nghttp2 (NGHTTP2_ERR_NOMEM), which fails the
 * connection.
 *
 * Each session gets its own zm_h2_mem_t (nghttp2 passes it back as
 * mem_user_data), so the allocator knows which blocks are whose: what a
 * session holds is counted, and an idle session's mapped blocks can give
 * back the pages that hold nothing (zm_h2_mem_trim).
 */
#ifndef ZM_GRPC_H2MEM_H
#define ZM_GRPC_H2MEM_H

#include <nghttp2/nghttp2.h>

#include <stddef.h>

/* Mapped blocks remembered per session for trimming: a session maps two
 * (its 16 KiB outbound frame buffer and its stream map) unless a peer makes
 * it grow; blocks past these are freed normally but never trimmed. */
#define ZM_H2_MEM_TRACKED 4

typedef struct zm_h2_mem {
  nghttp2_mem mem;     /* what nghttp2_session_*_new3 takes */
  size_t heap_bytes;   /* usable bytes of the session's heap blocks */
  size_t mapped_bytes; /* bytes of its mapped blocks (resident or not) */
  struct {
    void *p;
    size_t n;
  } mapped[ZM_H2_MEM_TRACKED];
} zm_h2_mem_t;

/* Prepares m for one session; pass &m->mem to nghttp2. m must stay where
 * it is until the session is deleted. */
void zm_h2_mem_init(zm_h2_mem_t *m);

/* Gives back to the kernel every resident page of the session's mapped
 * blocks that holds only zero bytes. Contents do not change (an all-zero
 * page reads as zeros again, and a write maps a fresh one), so this is safe
 * whatever nghttp2 keeps in the block; what makes it worth calling is that
 * sent frames are wiped (conn.c) and an empty stream map is zeros. Returns
 * the bytes given back (a page only read since the last trim maps the
 * kernel's zero page and is counted again: harmless). */
size_t zm_h2_mem_trim(zm_h2_mem_t *m);

/* The same for any block [p, p + n) the caller owns whole (a malloc'd one
 * with its malloc_usable_size): only the pages entirely inside it are
 * looked at, so its neighbours and the allocator's headers are not. */
size_t zm_trim_zero_pages(void *p, size_t n);

/* Test hook: when non-zero, the n-th following allocation fails (1 = the
 * next). Counts down on every allocation. */
extern unsigned long zm__h2_mem_fail_after;

#endif /* ZM_GRPC_H2MEM_H */
