/*
 * tlsconf.h - the cipher suites every TLS context of the service offers or
 * accepts (the gRPC listener, the controller client, the enrollment calls).
 *
 * Set explicitly because Debian's wolfSSL enables by default anonymous
 * (ADH), unencrypted (NULL, TLS13-SHA256-SHA256), RC4 and 3DES suites: a
 * peer that offered only those would get them. The list is forward secret
 * AEAD only, ChaCha20-Poly1305 first: that wolfSSL build has no AES-NI code,
 * so its AES-GCM is table-driven C, not constant-time, and measured 1.7-2.4x
 * slower than its ChaCha20-Poly1305 on records of 64 B to 16 KiB. A server
 * context picks in this order; a client context asks for it (Go's
 * crypto/tls, the controller's, honours a client that lists ChaCha first).
 */
#ifndef ZM_TLSCONF_H
#define ZM_TLSCONF_H

#define ZM_TLS_CIPHERS                                                         \
  "TLS13-CHACHA20-POLY1305-SHA256:"                                            \
  "TLS13-AES128-GCM-SHA256:"                                                   \
  "TLS13-AES256-GCM-SHA384:"                                                   \
  "ECDHE-ECDSA-CHACHA20-POLY1305:"                                             \
  "ECDHE-RSA-CHACHA20-POLY1305:"                                               \
  "ECDHE-ECDSA-AES128-GCM-SHA256:"                                             \
  "ECDHE-RSA-AES128-GCM-SHA256:"                                               \
  "ECDHE-ECDSA-AES256-GCM-SHA384:"                                             \
  "ECDHE-RSA-AES256-GCM-SHA384"

#endif
