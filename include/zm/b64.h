/* b64.h - base64url (RFC 4648 §5, no padding) for opaque tokens. Leaf module.
 */
#ifndef ZM_B64_H
#define ZM_B64_H

#include <stddef.h>

/* Encoded length for n input bytes (no padding), excluding the NUL. */
#define ZM_B64URL_LEN(n) (((n)*4 + 2) / 3)

/* Encodes n bytes into dst (cap >= ZM_B64URL_LEN(n) + 1), NUL-terminated.
 * Returns the length. */
size_t zm_b64url_encode(const void *src, size_t n, char *dst, size_t cap);
/* Decodes; accepts optional '=' padding. Returns the decoded length, or -1
 * on an invalid character/length or when it would not fit in cap. */
long zm_b64url_decode(const char *src, size_t n, void *dst, size_t cap);

#endif /* ZM_B64_H */
