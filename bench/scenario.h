/*
 * scenario.h - what zm-bench sends and what it accepts back: one request per
 * operation (encoded with protobuf-c, framed with the 5-byte gRPC prefix) and
 * the verification of its answer. Pure code: no I/O, no libuv, no nghttp2.
 *
 * Key convention (shared with the anchors in shared/anchors/perf): preloaded
 * identities are ziti_identity_id "zid-%06d" for i in 0..keys-1, identity_id
 * "a9e1c0de-0000-4000-8000-%012d" of the same i, type AGENT; a miss uses an
 * index >= keys, so it is never in the preload.
 */
#ifndef ZMB_SCENARIO_H
#define ZMB_SCENARIO_H

#include <stddef.h>
#include <stdint.h>

/* The operations. Order matters only for tables in scenario.c. */
typedef enum {
  ZMB_OP_RESOLVE = 0,
  ZMB_OP_EXTEND,
  ZMB_OP_LIST,
  ZMB_OP_RSI, /* RequestServiceIdentity */
  ZMB_OP_CREATE,
  ZMB_OP_HEALTH,
  ZMB_OP_CSVC, /* CreateService with host.v1 + intercept.v1 (3 creates) */
  ZMB_OP__COUNT
} zmb_op_t;

/* gRPC status codes we name (0..16). */
#define ZMB_GRPC_OK 0
#define ZMB_GRPC_NOT_FOUND 5
#define ZMB_GRPC_CODES 17

/* One request to send, chosen by the scheduler. Strings are borrowed. */
typedef struct {
  zmb_op_t op;
  int64_t key;            /* RESOLVE/EXTEND: index i of "zid-%06d" */
  int expect_miss;        /* RESOLVE/EXTEND: 1 = expect NOT_FOUND */
  const char *page_token; /* LIST: token to continue from ("" = start) */
  const char *after_id;   /* LIST: last id of the previous page, or NULL */
  int32_t page_size;      /* LIST */
  int service_type;       /* RSI: proto ServiceType number */
  uint64_t seq;           /* CREATE, CSVC: agent_id / service name; CREATE:
                             "b3c0PPPP-TTTT-4000-8000-CCCCCCCCCCCC"           from
                             bits 63..48           (P), 47..32 (T), 31..0 (C) */
} zmb_req_t;

/* Results of verifying one answer. */
typedef enum {
  ZMB_V_OK = 0,      /* expected status and content */
  ZMB_V_BAD_STATUS,  /* grpc-status differs from the expected one */
  ZMB_V_BAD_CONTENT, /* expected status, wrong or malformed message */
} zmb_verdict_t;

/* What a LIST answer tells the walker for its next request. */
typedef struct {
  char *next_token; /* malloc'd, "" on the last page; NULL if not LIST/OK */
  char *last_id;    /* malloc'd id of the last row of the page, or NULL */
} zmb_list_next_t;

/* "resolve", "extend", "list", "request-service-identity", "create-agent",
 * "health". */
const char *zmb_op_name(zmb_op_t op);
/* Parses a name of zmb_op_name (also "rsi", "create"). Returns op or -1. */
int zmb_op_parse(const char *name);
/* The HTTP/2 :path of the op's method. */
const char *zmb_op_path(zmb_op_t op);
/* Name of a gRPC status code ("OK", "NOT_FOUND", ...; "UNKNOWN_CODE" when
 * out of range). */
const char *zmb_grpc_code_name(int code);

/* Largest framed request we build (bounded: our own ids are short). */
#define ZMB_REQ_MAX 512u

/*
 * Encodes r as a gRPC-framed message (5-byte prefix + protobuf) into buf.
 * Returns the number of bytes written (> 0), or 0 if cap is too small.
 */
size_t zmb_req_encode(const zmb_req_t *r, uint8_t *buf, size_t cap);

/*
 * Verifies an answer to r: grpc_status (from trailers or Trailers-Only
 * headers) and the response body (the raw DATA bytes, gRPC-framed). For an
 * expected OK the body must hold exactly one uncompressed message that
 * decodes and whose content matches (see the per-op rules in scenario.c).
 * Writes a short reason (never secret material) into why on failure.
 * For LIST, fills *next (caller frees with zmb_list_next_dispose) on OK.
 */
zmb_verdict_t zmb_resp_verify(const zmb_req_t *r, int grpc_status,
                              const uint8_t *body, size_t len,
                              zmb_list_next_t *next, char *why, size_t whylen);

/* Frees the strings of n and zeroes it. */
void zmb_list_next_dispose(zmb_list_next_t *n);

/* The expected status of r (OK, or NOT_FOUND for a planned miss). */
int zmb_req_expected_status(const zmb_req_t *r);

#endif /* ZMB_SCENARIO_H */
