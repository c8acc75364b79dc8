/* Controller exchange -> endpoint label (metrics). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "zm/ziti.h"

static zm_ziti_endpoint_t c(const char *req) {
  return zm_ziti_classify(req, strlen(req));
}

static void test_classify(void **state) {
  (void)state;
  assert_int_equal(
      c("POST /edge/management/v1/authenticate?method=cert HTTP/1.1\r\n"),
      ZM_ZITI_EP_AUTHENTICATE);
  assert_int_equal(c("POST /edge/management/v1/identities HTTP/1.1\r\n"),
                   ZM_ZITI_EP_CREATE_IDENTITY);
  assert_int_equal(c("GET /edge/management/v1/identities/abc HTTP/1.1\r\n"),
                   ZM_ZITI_EP_GET_IDENTITY);
  assert_int_equal(
      c("GET /edge/management/v1/identities?filter=x HTTP/1.1\r\n"),
      ZM_ZITI_EP_LIST_IDENTITIES);
  assert_int_equal(c("DELETE /edge/management/v1/identities/abc HTTP/1.1\r\n"),
                   ZM_ZITI_EP_DELETE_IDENTITY);
  assert_int_equal(
      c("POST /edge/client/v1/enroll?method=ott&token=s HTTP/1.1\r\n"),
      ZM_ZITI_EP_ENROLL);
  assert_int_equal(c("GET /.well-known/est/cacerts HTTP/1.1\r\n"),
                   ZM_ZITI_EP_CACERTS);
  assert_int_equal(c("GET /edge/management/v1/services HTTP/1.1\r\n"),
                   ZM_ZITI_EP_OTHER);
  assert_int_equal(c("garbage"), ZM_ZITI_EP_OTHER);
  assert_int_equal(zm_ziti_classify(NULL, 0), ZM_ZITI_EP_OTHER);
  assert_string_equal(zm_ziti_endpoint_name(ZM_ZITI_EP_ENROLL), "enroll");
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_classify)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
