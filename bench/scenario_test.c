/*
 * scenario_test.c - unit test of zm-bench's request encoding and answer
 * verification (bench/scenario.c): a right answer passes, every kind of
 * wrong answer is caught. Registered as ctest bench/scenario_test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "scenario.h"

#include "agynio/api/ziti_management/v1/ziti_management.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <string.h>

static uint8_t buf[1 << 16];
static char why[256];

/* Frames a packed message like a server would. */
static size_t frame(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_pack(m, buf + 5);
  buf[0] = 0;
  buf[1] = (uint8_t)(n >> 24);
  buf[2] = (uint8_t)(n >> 16);
  buf[3] = (uint8_t)(n >> 8);
  buf[4] = (uint8_t)n;
  return n + 5;
}

static void test_encode_resolve(void **state) {
  (void)state;
  /* Same bytes as the anchors' payloads/resolve.bin. */
  static const uint8_t want[] = {0x00, 0x00, 0x00, 0x00, 0x0c, 0x0a,
                                 0x0a, 'z',  'i',  'd',  '-',  '0',
                                 '4',  '2',  '4',  '2',  '4'};
  zmb_req_t r = {.op = ZMB_OP_RESOLVE, .key = 42424};
  uint8_t out[ZMB_REQ_MAX];
  size_t n = zmb_req_encode(&r, out, sizeof(out));
  assert_int_equal(n, sizeof(want));
  assert_memory_equal(out, want, n);
  assert_int_equal(zmb_req_encode(&r, out, 10), 0); /* too small */
  assert_string_equal(zmb_op_path(ZMB_OP_EXTEND),
                      "/agynio.api.ziti_management.v1.ZitiManagementService/"
                      "ExtendIdentityLease");
  assert_int_equal(zmb_op_parse("rsi"), ZMB_OP_RSI);
  assert_int_equal(zmb_op_parse("request-service-identity"), ZMB_OP_RSI);
  assert_int_equal(zmb_op_parse("nope"), -1);
}

static void test_encode_create_uuid(void **state) {
  (void)state;
  zmb_req_t r = {.op = ZMB_OP_CREATE,
                 .seq = (0x1234ull << 48) | (0xabcdull << 32) | 7};
  uint8_t out[ZMB_REQ_MAX];
  size_t n = zmb_req_encode(&r, out, sizeof(out));
  assert_true(n > 5);
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityRequest *m =
      agynio__api__ziti_management__v1__create_agent_identity_request__unpack(
          NULL, n - 5, out + 5);
  assert_non_null(m);
  assert_string_equal(m->agent_id, "b3c01234-abcd-4000-8000-000000000007");
  agynio__api__ziti_management__v1__create_agent_identity_request__free_unpacked(
      m, NULL);
}

static size_t resolve_answer(const char *id, int type) {
  Agynio__Api__ZitiManagement__V1__ResolveIdentityResponse m =
      AGYNIO__API__ZITI_MANAGEMENT__V1__RESOLVE_IDENTITY_RESPONSE__INIT;
  m.identity_id = (char *)id;
  m.identity_type = (Agynio__Api__Identity__V1__IdentityType)type;
  return frame(&m.base);
}

static void test_verify_resolve(void **state) {
  (void)state;
  zmb_req_t hit = {.op = ZMB_OP_RESOLVE, .key = 7};
  zmb_req_t miss = {.op = ZMB_OP_RESOLVE, .key = 100007, .expect_miss = 1};
  size_t n = resolve_answer("a9e1c0de-0000-4000-8000-000000000007", 1);
  assert_int_equal(zmb_resp_verify(&hit, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_OK);
  /* another key's id, wrong type, truncated frame, compressed flag */
  n = resolve_answer("a9e1c0de-0000-4000-8000-000000000008", 1);
  assert_int_equal(zmb_resp_verify(&hit, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  n = resolve_answer("a9e1c0de-0000-4000-8000-000000000007", 2);
  assert_int_equal(zmb_resp_verify(&hit, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(zmb_resp_verify(&hit, 0, buf, n - 1, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  buf[0] = 1;
  assert_int_equal(zmb_resp_verify(&hit, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(zmb_resp_verify(&hit, 0, NULL, 0, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  /* status: a miss must be NOT_FOUND, a hit must be OK */
  assert_int_equal(zmb_resp_verify(&miss, 5, NULL, 0, NULL, why, sizeof(why)),
                   ZMB_V_OK);
  assert_int_equal(zmb_resp_verify(&miss, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_STATUS);
  assert_int_equal(zmb_resp_verify(&hit, 14, NULL, 0, NULL, why, sizeof(why)),
                   ZMB_V_BAD_STATUS);
  assert_non_null(strstr(why, "grpc-status 14"));
}

static size_t list_answer(const char *const *ids, size_t n, const char *next) {
  Agynio__Api__ZitiManagement__V1__ListManagedIdentitiesResponse m =
      AGYNIO__API__ZITI_MANAGEMENT__V1__LIST_MANAGED_IDENTITIES_RESPONSE__INIT;
  Agynio__Api__ZitiManagement__V1__ManagedIdentity rows[8], *ptrs[8];
  for (size_t i = 0; i < n; i++) {
    Agynio__Api__ZitiManagement__V1__ManagedIdentity r =
        AGYNIO__API__ZITI_MANAGEMENT__V1__MANAGED_IDENTITY__INIT;
    rows[i] = r;
    rows[i].ziti_identity_id = (char *)ids[i];
    rows[i].identity_id = (char *)"x";
    ptrs[i] = &rows[i];
  }
  m.n_identities = n;
  m.identities = ptrs;
  m.next_page_token = (char *)next;
  return frame(&m.base);
}

static void test_verify_list(void **state) {
  (void)state;
  const char *asc[] = {"zid-000001", "zid-000002", "zid-000003"};
  const char *desc[] = {"zid-000002", "zid-000001"};
  zmb_req_t first = {.op = ZMB_OP_LIST, .page_size = 3, .page_token = ""};
  zmb_list_next_t next = {0};
  size_t n = list_answer(asc, 3, "tok");
  assert_int_equal(zmb_resp_verify(&first, 0, buf, n, &next, why, sizeof(why)),
                   ZMB_V_OK);
  assert_string_equal(next.next_token, "tok");
  assert_string_equal(next.last_id, "zid-000003");
  zmb_list_next_dispose(&next);
  /* too many rows for the page size */
  zmb_req_t small = {.op = ZMB_OP_LIST, .page_size = 2, .page_token = ""};
  assert_int_equal(zmb_resp_verify(&small, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  /* not ascending */
  n = list_answer(desc, 2, "");
  assert_int_equal(zmb_resp_verify(&first, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  /* the next page must start after the previous page's last id */
  zmb_req_t cont = {.op = ZMB_OP_LIST,
                    .page_size = 3,
                    .page_token = "tok",
                    .after_id = "zid-000002"};
  n = list_answer(asc, 3, "");
  assert_int_equal(zmb_resp_verify(&cont, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
  /* an empty page with a next token */
  n = list_answer(asc, 0, "more");
  assert_int_equal(zmb_resp_verify(&first, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
}

static zmb_verdict_t rsi_with(const char *json) {
  Agynio__Api__ZitiManagement__V1__RequestServiceIdentityResponse m =
      AGYNIO__API__ZITI_MANAGEMENT__V1__REQUEST_SERVICE_IDENTITY_RESPONSE__INIT;
  m.ziti_identity_id = (char *)"abc";
  m.identity_json.data = (uint8_t *)json;
  m.identity_json.len = strlen(json);
  size_t n = frame(&m.base);
  zmb_req_t r = {.op = ZMB_OP_RSI, .service_type = 3};
  return zmb_resp_verify(&r, 0, buf, n, NULL, why, sizeof(why));
}

static void test_verify_rsi(void **state) {
  (void)state;
  assert_int_equal(
      rsi_with("{\"ztAPI\":\"https://c:1\",\"ztAPIs\":null,\"configTypes\":"
               "null,\"id\":{\"key\":\"pem:-----BEGIN EC PRIVATE KEY-----\\n"
               "x\\n\",\"cert\":\"pem:c\",\"ca\":\"pem:a\"},\"enableHa\":false,"
               "\"n\":[1,-2.5e3,true,{}]}"),
      ZMB_V_OK);
  /* missing ca, not pem:, no ztAPI, malformed, trailing bytes, bad escape */
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\",\"id\":{\"key\":\"pem:k\","
                            "\"cert\":\"pem:c\"}}"),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\",\"id\":{\"key\":\"k\",\"cert\":"
                            "\"pem:c\",\"ca\":\"pem:a\"}}"),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(
      rsi_with(
          "{\"id\":{\"key\":\"pem:k\",\"cert\":\"pem:c\",\"ca\":\"pem:a\"}}"),
      ZMB_V_BAD_CONTENT);
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\",\"id\":{\"key\":\"pem:k\","
                            "\"cert\":\"pem:c\",\"ca\":\"pem:a\"}"),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\",\"id\":{\"key\":\"pem:k\","
                            "\"cert\":\"pem:c\",\"ca\":\"pem:a\"}} x"),
                   ZMB_V_BAD_CONTENT);
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\\q\",\"id\":{\"key\":\"pem:k\","
                            "\"cert\":\"pem:c\",\"ca\":\"pem:a\"}}"),
                   ZMB_V_BAD_CONTENT);
  /* "id" nested deeper does not count */
  assert_int_equal(rsi_with("{\"ztAPI\":\"u\",\"x\":{\"id\":{\"key\":\"pem:k\","
                            "\"cert\":\"pem:c\",\"ca\":\"pem:a\"}}}"),
                   ZMB_V_BAD_CONTENT);
  /* nesting beyond the bound is rejected, not recursed into */
  char deep[256];
  strcpy(deep, "{\"ztAPI\":\"u\",\"x\":");
  size_t at = strlen(deep);
  memset(deep + at, '[', 100);
  deep[at + 100] = '\0';
  assert_int_equal(rsi_with(deep), ZMB_V_BAD_CONTENT);
}

static zmb_verdict_t create_with(const char *zid, const char *jwt) {
  Agynio__Api__ZitiManagement__V1__CreateAgentIdentityResponse m =
      AGYNIO__API__ZITI_MANAGEMENT__V1__CREATE_AGENT_IDENTITY_RESPONSE__INIT;
  m.ziti_identity_id = (char *)zid;
  m.enrollment_jwt = (char *)jwt;
  size_t n = frame(&m.base);
  zmb_req_t r = {.op = ZMB_OP_CREATE};
  return zmb_resp_verify(&r, 0, buf, n, NULL, why, sizeof(why));
}

static void test_verify_create_health(void **state) {
  (void)state;
  assert_int_equal(create_with("id1", "aGVhZA.Ym9keQ.c2ln"), ZMB_V_OK);
  assert_int_equal(create_with("", "a.b.c"), ZMB_V_BAD_CONTENT);
  assert_int_equal(create_with("id1", "a.b"), ZMB_V_BAD_CONTENT);
  assert_int_equal(create_with("id1", "a.b.c.d"), ZMB_V_BAD_CONTENT);
  assert_int_equal(create_with("id1", "a..c"), ZMB_V_BAD_CONTENT);
  assert_int_equal(create_with("id1", "a.b."), ZMB_V_BAD_CONTENT);

  Grpc__Health__V1__HealthCheckResponse h =
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  zmb_req_t r = {.op = ZMB_OP_HEALTH};
  h.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
  size_t n = frame(&h.base);
  assert_int_equal(zmb_resp_verify(&r, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_OK);
  h.status =
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
  n = frame(&h.base);
  assert_int_equal(zmb_resp_verify(&r, 0, buf, n, NULL, why, sizeof(why)),
                   ZMB_V_BAD_CONTENT);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_encode_resolve),
      cmocka_unit_test(test_encode_create_uuid),
      cmocka_unit_test(test_verify_resolve),
      cmocka_unit_test(test_verify_list),
      cmocka_unit_test(test_verify_rsi),
      cmocka_unit_test(test_verify_create_health),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
