/* wire.c - pure gRPC wire helpers: message deframing, grpc-timeout,
 * grpc-message percent-encoding. No I/O, no allocation. */
#include "zm/grpc.h"

#include <string.h>

ssize_t zm_grpc_deframe(const uint8_t *src, size_t len, size_t max,
                        uint8_t *flags, const uint8_t **msg, size_t *msg_len) {
  if (len < 5)
    return ZM_E_INCOMPLETE;
  uint32_t n = ((uint32_t)src[1] << 24) | ((uint32_t)src[2] << 16) |
               ((uint32_t)src[3] << 8) | (uint32_t)src[4];
  if (n > max)
    return ZM_E_MSG_TOO_LARGE;
  if (len - 5 < n)
    return ZM_E_INCOMPLETE;
  *flags = src[0];
  *msg = src + 5;
  *msg_len = n;
  return (ssize_t)(5 + n);
}

int zm_grpc_timeout_parse(const char *v, size_t len, uint64_t *ms) {
  /* TimeoutValue is at most 8 ASCII digits, then one unit char. */
  if (len < 2 || len > 9)
    return ZM_E_INVAL;
  uint64_t n = 0;
  for (size_t i = 0; i + 1 < len; i++) {
    if (v[i] < '0' || v[i] > '9')
      return ZM_E_INVAL;
    n = n * 10 + (uint64_t)(v[i] - '0');
  }
  switch (v[len - 1]) {
  case 'H':
    *ms = n * 3600000u;
    break;
  case 'M':
    *ms = n * 60000u;
    break;
  case 'S':
    *ms = n * 1000u;
    break;
  case 'm':
    *ms = n;
    break;
  case 'u':
    *ms = (n + 999u) / 1000u;
    break;
  case 'n':
    *ms = (n + 999999u) / 1000000u;
    break;
  default:
    return ZM_E_INVAL;
  }
  return 0;
}

size_t zm_grpc_pct_encode(const char *src, size_t len, char *dst, size_t cap) {
  static const char HEX[] = "0123456789ABCDEF";
  size_t o = 0;
  if (cap == 0)
    return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)src[i];
    if (ch >= 0x20 && ch <= 0x7E && ch != '%') {
      if (o + 1 >= cap)
        break;
      dst[o++] = (char)ch;
    } else {
      if (o + 3 >= cap)
        break;
      dst[o++] = '%';
      dst[o++] = HEX[ch >> 4];
      dst[o++] = HEX[ch & 15];
    }
  }
  dst[o] = '\0';
  return o;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

size_t zm_grpc_pct_decode(const char *src, size_t len, char *dst, size_t cap) {
  size_t o = 0;
  if (cap == 0)
    return 0;
  for (size_t i = 0; i < len && o + 1 < cap; i++) {
    int hi, lo;
    if (src[i] == '%' && i + 2 < len && (hi = hexval(src[i + 1])) >= 0 &&
        (lo = hexval(src[i + 2])) >= 0) {
      dst[o++] = (char)(hi << 4 | lo);
      i += 2;
    } else {
      dst[o++] = src[i];
    }
  }
  dst[o] = '\0';
  return o;
}

const zm_grpc_method_t *zm_grpc_route(const zm_grpc_method_t *methods,
                                      const size_t *path_lens, size_t n,
                                      const uint8_t *path, size_t len) {
  for (size_t i = 0; i < n; i++)
    if (path_lens[i] == len && memcmp(methods[i].path, path, len) == 0)
      return &methods[i];
  return NULL;
}

static int read_varint(const uint8_t *p, size_t len, size_t *off, uint64_t *v) {
  uint64_t r = 0;
  for (int shift = 0; shift < 64 && *off < len; shift += 7) {
    uint8_t b = p[(*off)++];
    r |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = r;
      return 0;
    }
  }
  return -1;
}

int zm_grpc_strings_nul_free(const ProtobufCMessageDescriptor *desc,
                             const uint8_t *data, size_t len) {
  size_t off = 0;
  while (off < len) {
    uint64_t key, n;
    if (read_varint(data, len, &off, &key) != 0)
      return 1;
    switch (key & 7) {
    case 0:
      if (read_varint(data, len, &off, &n) != 0)
        return 1;
      break;
    case 1:
      off += 8;
      break;
    case 5:
      off += 4;
      break;
    case 2: {
      if (read_varint(data, len, &off, &n) != 0 || n > len - off)
        return 1;
      const ProtobufCFieldDescriptor *f =
          key >> 3 <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(
                                       desc, (unsigned)(key >> 3))
                                 : NULL;
      if (f != NULL && f->type == PROTOBUF_C_TYPE_STRING &&
          memchr(data + off, 0, (size_t)n) != NULL)
        return 0;
      off += (size_t)n;
      break;
    }
    default:
      return 1;
    }
  }
  return 1;
}
