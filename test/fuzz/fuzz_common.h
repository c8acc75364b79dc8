/*
 * fuzz_common.h - shared by the libFuzzer drivers in test/fuzz: the entry
 * point's prototype (the build has -Wmissing-prototypes) and FUZZ_CHECK, an
 * assertion that is never compiled out, so a violated property crashes the
 * run and libFuzzer saves the input.
 */
#ifndef ZM_FUZZ_COMMON_H
#define ZM_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: property violated: %s\n", __FILE__, __LINE__,    \
              #cond);                                                          \
      abort();                                                                 \
    }                                                                          \
  } while (0)

#endif /* ZM_FUZZ_COMMON_H */
