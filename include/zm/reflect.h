/*
 * reflect.h - gRPC server reflection (grpc.reflection.v1 and v1alpha, the
 * same wire format) over the FileDescriptorSet embedded at build time
 * (protoc --descriptor_set_out --include_imports; gen/zm_descriptors.c).
 *
 * A reflection call is a bidirectional stream: every request gets one
 * response, in order. Files are served as protoc serialized them, each
 * with its transitive dependencies. Symbols: packages' messages (nested
 * too), their fields and oneofs, enums and enum values, services and
 * methods. Extensions: none are defined (NOT_FOUND / an empty list).
 */
#ifndef ZM_REFLECT_H
#define ZM_REFLECT_H

#include "zm/grpc.h"

#include <stddef.h>
#include <stdint.h>

/* The embedded descriptor set (generated). */
extern const unsigned char zm_descriptor_set[];
extern const size_t zm_descriptor_set_len;

typedef struct zm_reflect zm_reflect_t;

/* Indexes a serialized FileDescriptorSet. list_services answers the
 * services of `methods` (paths "/pkg.Svc/Method") that the set defines.
 * Returns NULL if the set does not parse. */
zm_reflect_t *zm_reflect_new(const uint8_t *set, size_t len,
                             const zm_grpc_method_t *methods, size_t n);
void zm_reflect_free(zm_reflect_t *r);

/* The file defining a fully-qualified symbol, or NULL. */
const char *zm_reflect_file_of(const zm_reflect_t *r, const char *symbol);
/* Number of services listed, and the i-th name. */
size_t zm_reflect_service_count(const zm_reflect_t *r);
const char *zm_reflect_service(const zm_reflect_t *r, size_t i);

/* The stream operations of ServerReflectionInfo; ctx is the zm_reflect_t. */
extern const zm_grpc_stream_ops_t zm_reflect_ops;

#endif /* ZM_REFLECT_H */
