/* zm-unit-libs: zm_grpc zm_util */
/* Unit tests of the authorization policy: parsing (strict), matching of
 * principals, methods and scopes, UNAUTHENTICATED vs DENY. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "zm/authz.h"
#include "zm/zm.h"

#define SVC "/agynio.api.ziti_management.v1.ZitiManagementService/"
static const char *const METHODS[] = {
    SVC "ResolveIdentity",        SVC "ExtendIdentityLease",
    SVC "RequestServiceIdentity", SVC "CreateAgentIdentity",
    SVC "DeleteIdentity",         SVC "ListManagedIdentities"};
static const char *const TYPES[] = {"gateway", "orchestrator", "runner"};
static const zm_authz_known_t KNOWN = {METHODS, 6, TYPES, 3};

static const char POLICY[] =
    "{\"rules\": ["
    " {\"name\": \"gw\", \"principals\": "
    "[\"uri:spiffe://agyn/sa/gateway\", \"dns:GW.agyn.svc\"],"
    "  \"methods\": [\"ResolveIdentity\", \"RequestServiceIdentity\"],"
    "  \"service_types\": [\"gateway\"]},"
    " {\"principals\": [\"uri:spiffe://agyn/sa/orch*\"], \"methods\": [\"*\"],"
    "  \"service_types\": [\"orchestrator\", \"runner\"]},"
    " {\"principals\": [\"cn:ops\"], \"methods\": [\"" SVC "DeleteIdentity\"]},"
    " {\"principals\": [\"authenticated\"], \"methods\": "
    "[\"ExtendIdentityLease\"]},"
    " {\"principals\": [\"any\"], \"methods\": [\"ListManagedIdentities\"]}"
    "]}";

static zm_authz_t *load(const char *json) {
  zm_authz_t *a = NULL;
  char err[256] = "";
  int rv = zm_authz_parse(&a, json, strlen(json), &KNOWN, err, sizeof err);
  if (rv != 0)
    fprintf(stderr, "parse: %s\n", err);
  assert_int_equal(rv, 0);
  return a;
}

static void test_decisions(void **state) {
  (void)state;
  zm_authz_t *a = load(POLICY);
  assert_int_equal(zm_authz_rule_count(a), 5);
  const char *gw[] = {"uri:spiffe://agyn/sa/gateway", "cn:gateway"};
  const char *gw_dns[] = {"dns:gw.AGYN.svc"};
  const char *orch[] = {"uri:spiffe://agyn/sa/orchestrator"};
  const char *ops[] = {"cn:ops"};
  const char *other[] = {"uri:spiffe://evil/sa/gateway", "cn:gateway"};

  /* method level */
  assert_int_equal(zm_authz_check(a, gw, 2, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, gw_dns, 1, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, gw, 2, SVC "DeleteIdentity", NULL),
                   ZM_AUTHZ_DENY);
  assert_int_equal(zm_authz_check(a, ops, 1, SVC "DeleteIdentity", NULL),
                   ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, orch, 1, SVC "CreateAgentIdentity", NULL),
                   ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, other, 2, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_DENY);
  /* no identity: UNAUTHENTICATED unless "any" */
  assert_int_equal(zm_authz_check(a, NULL, 0, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_UNAUTHENTICATED);
  assert_int_equal(
      zm_authz_check(a, NULL, 0, SVC "ListManagedIdentities", NULL),
      ZM_AUTHZ_ALLOW);
  /* "authenticated" */
  assert_int_equal(zm_authz_check(a, other, 2, SVC "ExtendIdentityLease", NULL),
                   ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, NULL, 0, SVC "ExtendIdentityLease", NULL),
                   ZM_AUTHZ_UNAUTHENTICATED);

  /* scope level: a gateway pod gets a gateway identity, not an orchestrator
   * one */
  const char *rsi = SVC "RequestServiceIdentity";
  assert_int_equal(zm_authz_check(a, gw, 2, rsi, NULL), ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, gw, 2, rsi, "gateway"), ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, gw, 2, rsi, "orchestrator"),
                   ZM_AUTHZ_DENY);
  assert_int_equal(zm_authz_check(a, orch, 1, rsi, "runner"), ZM_AUTHZ_ALLOW);
  assert_int_equal(zm_authz_check(a, orch, 1, rsi, "gateway"), ZM_AUTHZ_DENY);
  /* rules without service_types allow every scope */
  assert_int_equal(zm_authz_check(a, ops, 1, SVC "DeleteIdentity", "x"),
                   ZM_AUTHZ_ALLOW);
  zm_authz_free(a);
}

static void test_empty_policy_denies(void **state) {
  (void)state;
  zm_authz_t *a = load("{\"rules\": []}");
  const char *gw[] = {"cn:gw"};
  assert_int_equal(zm_authz_check(a, gw, 1, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_DENY);
  assert_int_equal(zm_authz_check(a, NULL, 0, SVC "ResolveIdentity", NULL),
                   ZM_AUTHZ_UNAUTHENTICATED);
  zm_authz_free(a);
}

static void expect_bad(const char *json, const char *needle) {
  zm_authz_t *a = (zm_authz_t *)1;
  char err[256] = "";
  assert_int_equal(
      zm_authz_parse(&a, json, strlen(json), &KNOWN, err, sizeof err),
      ZM_E_INVAL);
  assert_null(a);
  if (strstr(err, needle) == NULL)
    fail_msg("error '%s' lacks '%s'", err, needle);
}

static void test_bad_policies(void **state) {
  (void)state;
  expect_bad("", "line");
  expect_bad("[]", "top level");
  expect_bad("{\"rule\": []}", "unknown key \"rule\"");
  expect_bad("{\"rules\": {}}", "must be an array");
  expect_bad("{\"rules\": [1]}", "not an object");
  expect_bad("{\"rules\": [{\"methods\": [\"*\"]}]}", "principals");
  expect_bad("{\"rules\": [{\"principals\": [\"cn:a\"]}]}", "methods");
  expect_bad("{\"rules\": [{\"principals\": [], \"methods\": [\"*\"]}]}",
             "non-empty");
  expect_bad("{\"rules\": [{\"principals\": [\"spiffe://x\"], \"methods\": "
             "[\"*\"]}]}",
             "expected uri:");
  expect_bad("{\"rules\": [{\"principals\": [\"uri:a*b\"], \"methods\": "
             "[\"*\"]}]}",
             "expected uri:");
  expect_bad("{\"rules\": [{\"principals\": [\"cn:a\"], \"methods\": "
             "[\"ResolveIdentiy\"]}]}",
             "unknown method \"ResolveIdentiy\"");
  expect_bad("{\"rules\": [{\"principals\": [\"cn:a\"], \"methods\": [\"*\"], "
             "\"service_types\": [\"gatewy\"]}]}",
             "unknown service type");
  expect_bad("{\"rules\": [{\"principals\": [\"cn:a\"], \"methods\": [\"*\"], "
             "\"servce_types\": [\"gateway\"]}]}",
             "unknown key \"servce_types\"");
  expect_bad("{\"rules\": [{\"principals\": [\"cn:a\", 3], \"methods\": "
             "[\"*\"]}]}",
             "principals\"[1]");
  expect_bad("{\"rules\": [], \"rules\": []}", "line");
}

static void test_load_file(void **state) {
  (void)state;
  char path[] = "/tmp/zm_authz_testXXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, POLICY, strlen(POLICY)), (ssize_t)strlen(POLICY));
  close(fd);
  zm_authz_t *a = NULL;
  char err[256];
  assert_int_equal(zm_authz_load(&a, path, &KNOWN, err, sizeof err), 0);
  assert_int_equal(zm_authz_rule_count(a), 5);
  zm_authz_free(a);
  unlink(path);
  assert_int_equal(zm_authz_load(&a, path, &KNOWN, err, sizeof err),
                   ZM_E_INVAL);
  assert_non_null(strstr(err, "cannot open"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_decisions),
      cmocka_unit_test(test_empty_policy_denies),
      cmocka_unit_test(test_bad_policies),
      cmocka_unit_test(test_load_file),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
