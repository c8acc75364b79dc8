/*
 * fuzz_grpc_timeout.c - zm_grpc_timeout_parse, the grpc-timeout header
 * (gRPC over HTTP/2: TimeoutValue = 1*8 DIGIT, TimeoutUnit = H/M/S/m/u/n).
 *
 * Properties: a value is accepted iff it matches that grammar; then the
 * result equals the value converted to ms, rounded up for u and n (checked
 * with an independent computation), and never overflows.
 */
#include "fuzz_common.h"

#include "zm/grpc.h"
#include "zm/zm.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *v = malloc(size ? size : 1); /* exact size: ASan sees over-reads */
  memcpy(v, data, size);
  uint64_t ms = 0xDEADBEEF;
  int rv = zm_grpc_timeout_parse(v, size, &ms);

  /* Reference: grammar first, then the value. */
  int ok = size >= 2 && size <= 9;
  uint64_t n = 0;
  for (size_t i = 0; ok && i + 1 < size; i++) {
    if (v[i] < '0' || v[i] > '9')
      ok = 0;
    else
      n = n * 10 + (uint64_t)(v[i] - '0');
  }
  char unit = ok ? v[size - 1] : 0;
  if (ok && strchr("HMSmun", unit) == NULL)
    ok = 0;
  if (ok && unit == '\0')
    ok = 0;
  FUZZ_CHECK((rv == 0) == ok);
  FUZZ_CHECK(rv == 0 || rv == ZM_E_INVAL);
  if (rv == 0) {
    FUZZ_CHECK(n <= 99999999u);
    switch (unit) {
    case 'H':
      FUZZ_CHECK(ms / 3600000u == n && ms % 3600000u == 0);
      break;
    case 'M':
      FUZZ_CHECK(ms / 60000u == n && ms % 60000u == 0);
      break;
    case 'S':
      FUZZ_CHECK(ms / 1000u == n && ms % 1000u == 0);
      break;
    case 'm':
      FUZZ_CHECK(ms == n);
      break;
    case 'u': /* smallest ms with ms * 1000 >= n */
      FUZZ_CHECK(ms * 1000u >= n && (ms == 0 || (ms - 1) * 1000u < n));
      break;
    case 'n':
      FUZZ_CHECK(ms * 1000000u >= n && (ms == 0 || (ms - 1) * 1000000u < n));
      break;
    }
  }
  free(v);
  return 0;
}
