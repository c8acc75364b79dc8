/*
 * h2mem.h - the allocator handed to nghttp2 (nghttp2_mem): large blocks are
 * mmap'd on their own so idle connections stay small, and every block is
 * wiped before it is given back, because nghttp2's frame buffers hold
 * response bytes (enrolled identities' private keys, enrollment JWTs).
 * Loop thread only, like every nghttp2 call. Never aborts: a failed
 * allocation is reported to nghttp2 (NGHTTP2_ERR_NOMEM), which fails the
 * connection.
 */
#ifndef ZM_GRPC_H2MEM_H
#define ZM_GRPC_H2MEM_H

#include <nghttp2/nghttp2.h>

extern nghttp2_mem zm__h2_mem;

/* Test hook: when non-zero, the n-th following allocation fails (1 = the
 * next). Counts down on every allocation. */
extern unsigned long zm__h2_mem_fail_after;

#endif /* ZM_GRPC_H2MEM_H */
