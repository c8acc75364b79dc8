/* Reflection index over the embedded descriptor set: every kind of symbol,
 * the service list follows the method table, a corrupt set is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/reflect.h"

#define SVC "agynio.api.ziti_management.v1.ZitiManagementService"

static void test_symbols(void **state) {
  (void)state;
  zm_grpc_method_t m[] = {
      {"/" SVC "/ResolveIdentity", NULL, NULL, NULL, NULL, 0, NULL, NULL},
      {"/" SVC "/ExtendIdentityLease", NULL, NULL, NULL, NULL, 0, NULL, NULL},
      {"/grpc.health.v1.Health/Check", NULL, NULL, NULL, NULL, 0, NULL, NULL},
      {"/not.in.the.Set/X", NULL, NULL, NULL, NULL, 0, NULL, NULL},
  };
  zm_reflect_t *r =
      zm_reflect_new(zm_descriptor_set, zm_descriptor_set_len, m, 4);
  assert_non_null(r);
  const char *zf = "agynio/api/ziti_management/v1/ziti_management.proto";
  assert_string_equal(zm_reflect_file_of(r, SVC), zf);
  assert_string_equal(zm_reflect_file_of(r, SVC ".ResolveIdentity"), zf);
  assert_string_equal(
      zm_reflect_file_of(r, "agynio.api.ziti_management.v1.ManagedIdentity"),
      zf);
  assert_string_equal(
      zm_reflect_file_of(
          r, "agynio.api.ziti_management.v1.ManagedIdentity.created_at"),
      zf);
  /* IdentityType lives in agynio/api/identity/v1 (the current contract) */
  const char *idf = "agynio/api/identity/v1/identity.proto";
  assert_string_equal(
      zm_reflect_file_of(r, "agynio.api.identity.v1.IdentityType"), idf);
  assert_string_equal(
      zm_reflect_file_of(r, "agynio.api.identity.v1.IDENTITY_TYPE_AGENT"), idf);
  assert_null(
      zm_reflect_file_of(r, "agynio.api.ziti_management.v1.IdentityType"));
  assert_string_equal(
      zm_reflect_file_of(r, "agynio.api.ziti_management.v1.ServiceType"), zf);
  assert_string_equal(
      zm_reflect_file_of(r, "grpc.health.v1.HealthCheckResponse.SERVING"),
      "grpc/health/v1/health.proto");
  assert_string_equal(zm_reflect_file_of(r, "google.protobuf.Timestamp"),
                      "google/protobuf/timestamp.proto");
  assert_string_equal(
      zm_reflect_file_of(r, "grpc.reflection.v1alpha.ServerReflection"),
      "grpc/reflection/v1alpha/reflection.proto");
  assert_null(zm_reflect_file_of(r, "agynio.api"));
  assert_null(zm_reflect_file_of(r, "nope"));
  assert_int_equal(zm_reflect_service_count(r), 2);
  assert_string_equal(zm_reflect_service(r, 0), SVC);
  assert_string_equal(zm_reflect_service(r, 1), "grpc.health.v1.Health");
  zm_reflect_free(r);
}

static void test_corrupt(void **state) {
  (void)state;
  uint8_t bad[64];
  memcpy(bad, zm_descriptor_set, sizeof bad);
  bad[1] = 0x7f; /* a length past the end */
  assert_null(zm_reflect_new(bad, sizeof bad, NULL, 0));
  const uint8_t wrongtag[] = {0x12, 0x00};
  assert_null(zm_reflect_new(wrongtag, sizeof wrongtag, NULL, 0));
  zm_reflect_t *empty = zm_reflect_new(NULL, 0, NULL, 0);
  assert_non_null(empty);
  assert_int_equal(zm_reflect_service_count(empty), 0);
  zm_reflect_free(empty);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_symbols),
      cmocka_unit_test(test_corrupt),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
