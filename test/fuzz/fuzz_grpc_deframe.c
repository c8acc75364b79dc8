/*
 * fuzz_grpc_deframe.c - the gRPC request path below HTTP/2: a DATA stream is
 * cut into length-prefixed messages by zm_grpc_deframe, each message is
 * screened by zm_grpc_strings_nul_free and unpacked (then freed) with the
 * generated descriptor of one of the service's request types.
 *
 * Input: byte 0 picks the descriptor (low 4 bits) and the size limit (bit 7:
 * 64 bytes instead of 4 MiB, to reach ZM_E_MSG_TOO_LARGE); the rest is the
 * stream. Properties: deframe never reads past len, returns exactly
 * 5 + msg_len with the message inside the input, reports INCOMPLETE only when
 * the frame really is cut short and TOO_LARGE only above the limit; a
 * message flagged as holding a NUL does hold one; the unpacker, fed the same
 * bytes, does not crash or leak.
 */
#include "fuzz_common.h"

#include "zm/grpc.h"
#include "zm/zm.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <string.h>

#define DESC(x) &agynio__api__ziti_management__v1__##x##__descriptor
static const ProtobufCMessageDescriptor *const DESCS[] = {
    DESC(resolve_identity_request),
    DESC(create_agent_identity_request),
    DESC(delete_identity_request),
    DESC(list_managed_identities_request),
    DESC(request_service_identity_request),
    DESC(extend_identity_lease_request),
    DESC(managed_identity),
    DESC(list_managed_identities_response),
    &grpc__health__v1__health_check_request__descriptor,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const ProtobufCMessageDescriptor *desc =
      DESCS[(data[0] & 0x0f) % ZM_ARRAY_SIZE(DESCS)];
  size_t max = (data[0] & 0x80) ? 64 : (4u << 20);
  /* A heap copy of exactly the stream, so ASan sees any over-read. */
  size_t len = size - 1;
  uint8_t *buf = malloc(len ? len : 1);
  memcpy(buf, data + 1, len);

  size_t off = 0;
  for (;;) {
    uint8_t flags = 0xAA;
    const uint8_t *msg = NULL;
    size_t msg_len = 0;
    size_t rest = len - off;
    ssize_t r = zm_grpc_deframe(buf + off, rest, max, &flags, &msg, &msg_len);
    if (r == ZM_E_INCOMPLETE) {
      uint32_t n = 0;
      if (rest >= 5)
        n = ((uint32_t)buf[off + 1] << 24) | ((uint32_t)buf[off + 2] << 16) |
            ((uint32_t)buf[off + 3] << 8) | buf[off + 4];
      FUZZ_CHECK(rest < 5 || (n <= max && rest - 5 < n));
      break;
    }
    if (r == ZM_E_MSG_TOO_LARGE) {
      FUZZ_CHECK(rest >= 5);
      uint32_t n = ((uint32_t)buf[off + 1] << 24) |
                   ((uint32_t)buf[off + 2] << 16) |
                   ((uint32_t)buf[off + 3] << 8) | buf[off + 4];
      FUZZ_CHECK(n > max);
      break;
    }
    FUZZ_CHECK(r >= 5);
    FUZZ_CHECK((size_t)r == 5 + msg_len && (size_t)r <= rest);
    FUZZ_CHECK(msg_len <= max);
    FUZZ_CHECK(msg == buf + off + 5 && flags == buf[off]);

    int clean = zm_grpc_strings_nul_free(desc, msg, msg_len);
    FUZZ_CHECK(clean == 0 || clean == 1);
    if (!clean)
      FUZZ_CHECK(msg_len > 0 && memchr(msg, 0, msg_len) != NULL);
    /* The server unpacks only clean, uncompressed messages; the unpacker
     * gets every message here, as the screen must not be what keeps it
     * safe. */
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, msg_len, msg);
    if (m != NULL) {
      /* Re-packing what was unpacked must work and fit its own size. */
      size_t need = protobuf_c_message_get_packed_size(m);
      uint8_t *out = malloc(need ? need : 1);
      FUZZ_CHECK(protobuf_c_message_pack(m, out) == need);
      free(out);
      protobuf_c_message_free_unpacked(m, NULL);
    }
    off += (size_t)r;
    if (off == len)
      break;
  }
  free(buf);
  return 0;
}
