/*
 * reflect.c - gRPC server reflection over the embedded FileDescriptorSet.
 *
 * Start-up indexes the set once: each file's serialized bytes (sliced out of
 * the set as protoc wrote them, not re-encoded), its dependencies, and a
 * symbol table of every fully-qualified name it defines. A request is then
 * a lookup and a copy.
 */
#include "zm/reflect.h"

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
  char *name;
  const uint8_t *bytes; /* into the set */
  size_t len;
  size_t *deps; /* file indices */
  size_t n_deps;
} rfile_t;

typedef struct {
  char *name;
  size_t file;
} rsym_t;

struct zm_reflect {
  rfile_t *files;
  size_t n_files;
  rsym_t *syms; /* sorted by name */
  size_t n_syms, cap_syms;
  char **services;
  size_t n_services;
};

/* ===================== index ============================================= */

static void sym_add(zm_reflect_t *r, const char *scope, const char *name,
                    size_t file) {
  if (r->n_syms == r->cap_syms) {
    r->cap_syms = r->cap_syms ? r->cap_syms * 2 : 128;
    r->syms = zm_xrealloc(r->syms, r->cap_syms * sizeof *r->syms);
  }
  size_t a = strlen(scope), b = strlen(name);
  char *s = zm_xmalloc(a + b + 2);
  memcpy(s, scope, a);
  size_t o = a;
  if (a > 0)
    s[o++] = '.';
  memcpy(s + o, name, b + 1);
  r->syms[r->n_syms].name = s;
  r->syms[r->n_syms].file = file;
  r->n_syms++;
}

static void add_enum(zm_reflect_t *r, const char *scope,
                     const Google__Protobuf__EnumDescriptorProto *e,
                     size_t file) {
  if (e->name == NULL)
    return;
  sym_add(r, scope, e->name, file);
  /* enum values are siblings of their enum (C++ scoping rules) */
  for (size_t i = 0; i < e->n_value; i++)
    if (e->value[i]->name != NULL)
      sym_add(r, scope, e->value[i]->name, file);
}

static void add_message(zm_reflect_t *r, const char *scope,
                        const Google__Protobuf__DescriptorProto *m,
                        size_t file) {
  if (m->name == NULL)
    return;
  sym_add(r, scope, m->name, file);
  const char *full = r->syms[r->n_syms - 1].name;
  char *me = zm_xstrdup(full); /* syms may move while we add */
  for (size_t i = 0; i < m->n_field; i++)
    if (m->field[i]->name != NULL)
      sym_add(r, me, m->field[i]->name, file);
  for (size_t i = 0; i < m->n_oneof_decl; i++)
    if (m->oneof_decl[i]->name != NULL)
      sym_add(r, me, m->oneof_decl[i]->name, file);
  for (size_t i = 0; i < m->n_nested_type; i++)
    add_message(r, me, m->nested_type[i], file);
  for (size_t i = 0; i < m->n_enum_type; i++)
    add_enum(r, me, m->enum_type[i], file);
  free(me);
}

static int sym_cmp(const void *a, const void *b) {
  return strcmp(((const rsym_t *)a)->name, ((const rsym_t *)b)->name);
}

static int read_varint(const uint8_t *p, size_t len, size_t *off, uint64_t *v) {
  *v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (*off >= len)
      return -1;
    uint8_t b = p[(*off)++];
    *v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80))
      return 0;
  }
  return -1;
}

static size_t file_index(const zm_reflect_t *r, const char *name) {
  for (size_t i = 0; i < r->n_files; i++)
    if (strcmp(r->files[i].name, name) == 0)
      return i;
  return SIZE_MAX;
}

zm_reflect_t *zm_reflect_new(const uint8_t *set, size_t len,
                             const zm_grpc_method_t *methods, size_t n) {
  zm_reflect_t *r = zm_xcalloc(1, sizeof *r);
  /* FileDescriptorSet: repeated FileDescriptorProto file = 1. */
  size_t off = 0, cap = 0;
  Google__Protobuf__FileDescriptorProto **parsed = NULL;
  while (off < len) {
    uint64_t tag, flen;
    if (read_varint(set, len, &off, &tag) != 0 || tag != ((1u << 3) | 2u) ||
        read_varint(set, len, &off, &flen) != 0 || flen > len - off)
      goto fail;
    Google__Protobuf__FileDescriptorProto *fd =
        google__protobuf__file_descriptor_proto__unpack(NULL, (size_t)flen,
                                                        set + off);
    if (fd == NULL || fd->name == NULL) {
      if (fd != NULL)
        google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
      goto fail;
    }
    if (r->n_files == cap) {
      cap = cap ? cap * 2 : 8;
      r->files = zm_xrealloc(r->files, cap * sizeof *r->files);
      parsed = zm_xrealloc(parsed, cap * sizeof *parsed);
    }
    rfile_t *f = &r->files[r->n_files];
    memset(f, 0, sizeof *f);
    f->name = zm_xstrdup(fd->name);
    f->bytes = set + off;
    f->len = (size_t)flen;
    parsed[r->n_files++] = fd;
    off += (size_t)flen;
  }
  for (size_t i = 0; i < r->n_files; i++) {
    Google__Protobuf__FileDescriptorProto *fd = parsed[i];
    const char *pkg = fd->package ? fd->package : "";
    rfile_t *f = &r->files[i];
    f->deps = zm_xcalloc(fd->n_dependency + 1, sizeof *f->deps);
    for (size_t d = 0; d < fd->n_dependency; d++) {
      size_t k = file_index(r, fd->dependency[d]);
      if (k != SIZE_MAX) /* --include_imports: always present */
        f->deps[f->n_deps++] = k;
    }
    for (size_t m = 0; m < fd->n_message_type; m++)
      add_message(r, pkg, fd->message_type[m], i);
    for (size_t e = 0; e < fd->n_enum_type; e++)
      add_enum(r, pkg, fd->enum_type[e], i);
    for (size_t s = 0; s < fd->n_service; s++) {
      const Google__Protobuf__ServiceDescriptorProto *sv = fd->service[s];
      if (sv->name == NULL)
        continue;
      sym_add(r, pkg, sv->name, i);
      char *full = zm_xstrdup(r->syms[r->n_syms - 1].name);
      for (size_t k = 0; k < sv->n_method; k++)
        if (sv->method[k]->name != NULL)
          sym_add(r, full, sv->method[k]->name, i);
      free(full);
    }
  }
  for (size_t i = 0; i < r->n_files; i++)
    google__protobuf__file_descriptor_proto__free_unpacked(parsed[i], NULL);
  free(parsed);
  parsed = NULL;
  if (r->n_syms > 0)
    qsort(r->syms, r->n_syms, sizeof *r->syms, sym_cmp);
  /* Services to list: those of the method table that the set defines. */
  r->services = zm_xcalloc(n + 1, sizeof *r->services);
  for (size_t i = 0; i < n; i++) {
    const char *p = methods[i].path;
    const char *slash = strrchr(p, '/');
    if (p[0] != '/' || slash == NULL || slash == p)
      continue;
    char *svc = zm_xstrndup(p + 1, (size_t)(slash - p - 1));
    int skip = zm_reflect_file_of(r, svc) == NULL; /* not in the set */
    for (size_t k = 0; k < r->n_services && !skip; k++)
      skip = strcmp(r->services[k], svc) == 0;
    if (skip)
      free(svc);
    else
      r->services[r->n_services++] = svc;
  }
  return r;

fail:
  if (parsed != NULL) {
    for (size_t i = 0; i < r->n_files; i++)
      google__protobuf__file_descriptor_proto__free_unpacked(parsed[i], NULL);
    free(parsed);
  }
  zm_reflect_free(r);
  return NULL;
}

void zm_reflect_free(zm_reflect_t *r) {
  if (r == NULL)
    return;
  for (size_t i = 0; i < r->n_files; i++) {
    free(r->files[i].name);
    free(r->files[i].deps);
  }
  free(r->files);
  for (size_t i = 0; i < r->n_syms; i++)
    free(r->syms[i].name);
  free(r->syms);
  for (size_t i = 0; i < r->n_services; i++)
    free(r->services[i]);
  free(r->services);
  free(r);
}

static const rsym_t *sym_find(const zm_reflect_t *r, const char *symbol) {
  if (r->n_syms == 0)
    return NULL;
  rsym_t key = {(char *)symbol, 0};
  return bsearch(&key, r->syms, r->n_syms, sizeof *r->syms, sym_cmp);
}

const char *zm_reflect_file_of(const zm_reflect_t *r, const char *symbol) {
  const rsym_t *s = sym_find(r, symbol);
  return s ? r->files[s->file].name : NULL;
}

size_t zm_reflect_service_count(const zm_reflect_t *r) { return r->n_services; }
const char *zm_reflect_service(const zm_reflect_t *r, size_t i) {
  return r->services[i];
}

/* ===================== the stream ======================================== */

/* Collects file f and its transitive dependencies, requested file first. */
static void collect(const zm_reflect_t *r, size_t f, uint8_t *seen,
                    ProtobufCBinaryData *out, size_t *n) {
  if (seen[f])
    return;
  seen[f] = 1;
  out[(*n)++] =
      (ProtobufCBinaryData){r->files[f].len, (uint8_t *)r->files[f].bytes};
  for (size_t i = 0; i < r->files[f].n_deps; i++)
    collect(r, r->files[f].deps[i], seen, out, n);
}

static void on_reflect_cancel(zm_call_t *call, void *data) {
  (void)data;
  zm_call_finish(call, ZM_GRPC_CANCELLED, "cancelled");
}

static void reflect_open(zm_call_t *call, void *ctx) {
  zm_call_on_cancel(call, on_reflect_cancel, ctx);
}

static void reflect_message(zm_call_t *call, const ProtobufCMessage *msg,
                            void *ctx) {
  const zm_reflect_t *r = ctx;
  const Grpc__Reflection__V1__ServerReflectionRequest *req = (const void *)msg;
  Grpc__Reflection__V1__ServerReflectionResponse resp =
      GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
  Grpc__Reflection__V1__FileDescriptorResponse fdr =
      GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
  Grpc__Reflection__V1__ListServiceResponse lsr =
      GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
  Grpc__Reflection__V1__ExtensionNumberResponse enr =
      GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT;
  Grpc__Reflection__V1__ErrorResponse err =
      GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
  resp.valid_host = req->host;
  resp.original_request = (Grpc__Reflection__V1__ServerReflectionRequest *)req;
  size_t file = SIZE_MAX;
  const char *not_found = NULL;
  switch (req->message_request_case) {
  case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
    file = file_index(r, req->file_by_filename);
    not_found = "file not found";
    break;
  case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL: {
    const rsym_t *s = sym_find(r, req->file_containing_symbol);
    file = s ? s->file : SIZE_MAX;
    not_found = "symbol not found";
    break;
  }
  case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
    not_found = "extension not found";
    break;
  case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
    if (sym_find(r, req->all_extension_numbers_of_type) != NULL) {
      enr.base_type_name = req->all_extension_numbers_of_type;
      resp.message_response_case =
          GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
      resp.all_extension_numbers_response = &enr;
    } else {
      not_found = "type not found";
    }
    break;
  case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES: {
    Grpc__Reflection__V1__ServiceResponse *items =
        zm_xcalloc(r->n_services + 1, sizeof *items);
    Grpc__Reflection__V1__ServiceResponse **ptrs =
        zm_xcalloc(r->n_services + 1, sizeof *ptrs);
    for (size_t i = 0; i < r->n_services; i++) {
      grpc__reflection__v1__service_response__init(&items[i]);
      items[i].name = r->services[i];
      ptrs[i] = &items[i];
    }
    lsr.n_service = r->n_services;
    lsr.service = ptrs;
    resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
    resp.list_services_response = &lsr;
    zm_call_send(call, &resp.base);
    free(items);
    free(ptrs);
    return;
  }
  default:
    err.error_code = ZM_GRPC_INVALID_ARGUMENT;
    err.error_message = (char *)"invalid MessageRequest";
    resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
    resp.error_response = &err;
    zm_call_send(call, &resp.base);
    return;
  }
  if (file != SIZE_MAX) {
    uint8_t *seen = zm_xcalloc(r->n_files, 1);
    ProtobufCBinaryData *out = zm_xcalloc(r->n_files, sizeof *out);
    size_t n = 0;
    collect(r, file, seen, out, &n);
    fdr.n_file_descriptor_proto = n;
    fdr.file_descriptor_proto = out;
    resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
    resp.file_descriptor_response = &fdr;
    zm_call_send(call, &resp.base);
    free(seen);
    free(out);
    return;
  }
  if (resp.message_response_case ==
      GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
    err.error_code = ZM_GRPC_NOT_FOUND;
    err.error_message = (char *)not_found;
    resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
    resp.error_response = &err;
  }
  zm_call_send(call, &resp.base);
}

static void reflect_half_close(zm_call_t *call, void *ctx) {
  (void)ctx;
  zm_call_finish(call, ZM_GRPC_OK, NULL);
}

const zm_grpc_stream_ops_t zm_reflect_ops = {
    .on_open = reflect_open,
    .on_message = reflect_message,
    .on_half_close = reflect_half_close,
};
