/* pq_dl.c - libpq loaded on first use (see pq_dl.h). */
#define ZM_PQ_DL_IMPL
#include "pq_dl.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Debian's libpq5; the soname has been 5 since PostgreSQL 8.0. */
#define ZM_PQ_SONAME "libpq.so.5"

zm_pq_api_t zm__pq;
int zm__pq_loaded;

int zm_pq_load(char *err, size_t errlen) {
  if (zm__pq_loaded)
    return 0;
  void *h = dlopen(ZM_PQ_SONAME, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    const char *why = dlerror();
    snprintf(err, errlen,
             "cannot load the PostgreSQL client library " ZM_PQ_SONAME
             " (Debian package libpq5): %s",
             why ? why : "unknown error");
    return -1;
  }
  zm_pq_api_t api;
  void *sym;
#define ZM_PQ_SYM(name)                                                        \
  if ((sym = dlsym(h, #name)) == NULL) {                                       \
    snprintf(err, errlen,                                                      \
             ZM_PQ_SONAME " has no %s (libpq 14 or later needed)", #name);     \
    dlclose(h);                                                                \
    return -1;                                                                 \
  }                                                                            \
  memcpy(&api.name, &sym, sizeof sym);
  ZM_PQ_FUNCS(ZM_PQ_SYM)
#undef ZM_PQ_SYM
  /* stays loaded for the life of the process: connections outlive any
   * one store */
  zm__pq = api;
  zm__pq_loaded = 1;
  return 0;
}

const zm_pq_api_t *zm__pq_api_slow(void) {
  char err[512];
  if (zm_pq_load(err, sizeof err) != 0) {
    fprintf(stderr, "fatal: %s\n", err);
    abort();
  }
  return &zm__pq;
}
