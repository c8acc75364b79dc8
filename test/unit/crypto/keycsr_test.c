/*
 * keycsr_test.c - zm_keycsr_generate and zm_key_alg_parse. Every generated
 * CSR and key is checked by the openssl CLI: the CSR self-signature, the
 * subject, the signature algorithm, no attributes or extensions, and that
 * the private key belongs to the CSR's public key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/ecc.h>

#include "crypto/crypto_test_util.h"
#include "zm/crypto.h"
#include "zm/zm.h"

static int group_setup(void **state) {
  (void)state;
  return tu_mkdtemp();
}

static int group_teardown(void **state) {
  (void)state;
  tu_rmdir();
  return 0;
}

/* Exactly one PEM block of `type`, nothing before it, one "\n" after it. */
static void assert_one_block(const char *pem, const char *type) {
  char begin[64], end[64];
  snprintf(begin, sizeof(begin), "-----BEGIN %s-----\n", type);
  snprintf(end, sizeof(end), "-----END %s-----\n", type);
  assert_int_equal(strncmp(pem, begin, strlen(begin)), 0);
  size_t n = strlen(pem), el = strlen(end);
  assert_true(n > el);
  assert_string_equal(pem + n - el, end);
  assert_int_equal(tu_count(pem, "-----BEGIN"), 1);
  assert_int_equal(tu_count(pem, "-----END"), 1);
  assert_null(strstr(pem, "\n\n"));
  assert_null(strchr(pem, '\r'));
}

/* Generates for alg and checks everything with openssl. */
static void check_alg(zm_key_alg_t alg, const char *cn, const char *key_type,
                      const char *sigalg, const char *keydesc) {
  zm_secret_t key = {0};
  char *csr = NULL;
  assert_int_equal(zm_keycsr_generate(alg, cn, &key, &csr), 0);
  assert_non_null(key.base);
  assert_non_null(csr);
  assert_int_equal(strlen(key.base), key.len);
  assert_one_block(csr, "CERTIFICATE REQUEST");
  assert_one_block(key.base, key_type);

  assert_int_equal(tu_write(tu_path("csr.pem"), csr, strlen(csr)), 0);
  assert_int_equal(tu_write(tu_path("key.pem"), key.base, key.len), 0);

  /* Self-signature verifies; text dump for the content checks. */
  assert_int_equal(tu_sh(OPENSSL " req -in csr.pem -verify -noout -text "
                                 "-nameopt utf8,sep_comma_plus,space_eq"),
                   0);
  char *txt = tu_read(tu_path("last.log"), NULL);
  assert_non_null(txt);
  char want[256];
  snprintf(want, sizeof(want), "Subject: C = US,O = NetFoundry,CN = %s\n", cn);
  if (strstr(txt, want) == NULL)
    fail_msg("subject line '%s' not in:\n%s", want, txt);
  assert_non_null(strstr(txt, "verify OK"));
  assert_non_null(strstr(txt, "Version: 1 (0x0)"));
  assert_non_null(strstr(txt, sigalg));
  assert_non_null(strstr(txt, keydesc));
  assert_non_null(strstr(txt, "Attributes:\n            (none)\n"));
  assert_null(strstr(txt, "X509v3"));
  free(txt);

  /* No attributes at all: the [0] set right after the key is empty. */
  assert_int_equal(tu_sh(OPENSSL " asn1parse -in csr.pem"), 0);
  txt = tu_read(tu_path("last.log"), NULL);
  assert_non_null(strstr(txt, "l=   0 cons: cont [ 0 ]"));
  assert_int_equal(tu_count(txt, "cont ["), 1);
  assert_int_equal(tu_count(txt, ":commonName"), 1);
  /* C and O are PrintableStrings; CN too unless it needs UTF8String. */
  int cn_printable =
      strspn(cn, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"
                 "rstuvwxyz0123456789 '()+,-./:=?") == strlen(cn);
  assert_int_equal(tu_count(txt, "PRINTABLESTRING"), cn_printable ? 3 : 2);
  assert_int_equal(tu_count(txt, "UTF8STRING"), cn_printable ? 0 : 1);
  free(txt);

  /* The key is well-formed and is the CSR's key. */
  assert_int_equal(tu_sh(OPENSSL " pkey -in key.pem -check -noout"), 0);
  assert_int_equal(tu_sh(OPENSSL " pkey -in key.pem -pubout -out k.pub"), 0);
  assert_int_equal(tu_sh(OPENSSL " req -in csr.pem -pubkey -noout -out c.pub"),
                   0);
  char *kp = tu_read(tu_path("k.pub"), NULL),
       *cp = tu_read(tu_path("c.pub"), NULL);
  assert_non_null(kp);
  assert_non_null(cp);
  assert_non_null(strstr(kp, "BEGIN PUBLIC KEY"));
  assert_string_equal(kp, cp);
  free(kp);
  free(cp);

  /* The raw subject DER is exactly C, O, CN in that order. */
  assert_int_equal(tu_sh(OPENSSL " req -in csr.pem -noout -subject "
                                 "-nameopt RFC2253,-esc_msb"),
                   0);
  txt = tu_read(tu_path("last.log"), NULL);
  snprintf(want, sizeof(want), "subject=CN=%s,O=NetFoundry,C=US\n", cn);
  assert_string_equal(txt, want);
  free(txt);

  zm_secret_dispose(&key);
  free(csr);
}

static void test_ec_p384(void **state) {
  (void)state;
  check_alg(ZM_KEY_EC_P384, "Xq3vY_8aB", "EC PRIVATE KEY", "ecdsa-with-SHA256",
            "NIST CURVE: P-384");
}

static void test_ec_p256(void **state) {
  (void)state;
  check_alg(ZM_KEY_EC_P256, "id-256", "EC PRIVATE KEY", "ecdsa-with-SHA256",
            "NIST CURVE: P-256");
}

static void test_rsa_2048(void **state) {
  (void)state;
  check_alg(ZM_KEY_RSA_2048, "rsa.identity", "RSA PRIVATE KEY",
            "sha256WithRSAEncryption", "Public-Key: (2048 bit)");
}

static void test_rsa_4096(void **state) {
  (void)state;
  check_alg(ZM_KEY_RSA_4096, "rsa-4096", "RSA PRIVATE KEY",
            "sha256WithRSAEncryption", "Public-Key: (4096 bit)");
}

/* The full X.520 length, and a non-PrintableString (UTF-8) common name. */
static void test_cn_edges(void **state) {
  (void)state;
  char cn64[65];
  memset(cn64, 'a', 64);
  cn64[64] = '\0';
  check_alg(ZM_KEY_EC_P256, cn64, "EC PRIVATE KEY", "ecdsa-with-SHA256",
            "NIST CURVE: P-256");
  check_alg(ZM_KEY_EC_P256, "caf\xc3\xa9_*&", "EC PRIVATE KEY",
            "ecdsa-with-SHA256", "NIST CURVE: P-256");
}

static void test_invalid_args(void **state) {
  (void)state;
  zm_secret_t key = {0};
  char *csr = (char *)"sentinel";
  char cn65[66];
  memset(cn65, 'a', 65);
  cn65[65] = '\0';

  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "", &key, &csr),
                   ZM_E_INVAL);
  assert_null(csr);
  assert_null(key.base);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, NULL, &key, &csr),
                   ZM_E_INVAL);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, cn65, &key, &csr),
                   ZM_E_INVAL);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "a\nb", &key, &csr),
                   ZM_E_INVAL);
  assert_int_equal(zm_keycsr_generate((zm_key_alg_t)99, "abc", &key, &csr),
                   ZM_E_INVAL);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "abc", NULL, &csr),
                   ZM_E_INVAL);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "abc", &key, NULL),
                   ZM_E_INVAL);
  assert_null(csr);
  assert_null(key.base);
}

/* Two calls never produce the same key. */
static void test_keys_differ(void **state) {
  (void)state;
  zm_secret_t k1 = {0}, k2 = {0};
  char *c1, *c2;
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "x", &k1, &c1), 0);
  assert_int_equal(zm_keycsr_generate(ZM_KEY_EC_P256, "x", &k2, &c2), 0);
  assert_string_not_equal(k1.base, k2.base);
  assert_string_not_equal(c1, c2);
  zm_secret_dispose(&k1);
  zm_secret_dispose(&k2);
  free(c1);
  free(c2);
}

/* Key generation runs on the libuv pool: run several at once. */
#define NTHREADS 4
typedef struct {
  int rv;
  zm_secret_t key;
  char *csr;
} job_t;

static void *gen_thread(void *arg) {
  job_t *j = arg;
  for (int i = 0; i < 3 && j->rv == 0; i++) {
    zm_secret_dispose(&j->key);
    free(j->csr);
    j->csr = NULL;
    j->rv = zm_keycsr_generate(i % 2 ? ZM_KEY_EC_P384 : ZM_KEY_EC_P256,
                               "thread", &j->key, &j->csr);
  }
  /* wolfSSL's FP_ECC point cache is per thread (~1 MB, kept for speed);
   * a thread that exits frees its own. libuv's workers never exit. */
  wc_ecc_fp_free();
  return NULL;
}

static void test_threads(void **state) {
  (void)state;
  pthread_t th[NTHREADS];
  job_t jobs[NTHREADS];
  memset(jobs, 0, sizeof(jobs));
  for (int i = 0; i < NTHREADS; i++)
    assert_int_equal(pthread_create(&th[i], NULL, gen_thread, &jobs[i]), 0);
  for (int i = 0; i < NTHREADS; i++)
    assert_int_equal(pthread_join(th[i], NULL), 0);
  for (int i = 0; i < NTHREADS; i++) {
    assert_int_equal(jobs[i].rv, 0);
    assert_one_block(jobs[i].csr, "CERTIFICATE REQUEST");
    assert_one_block(jobs[i].key.base, "EC PRIVATE KEY");
    for (int j = 0; j < i; j++)
      assert_string_not_equal(jobs[i].key.base, jobs[j].key.base);
  }
  for (int i = 0; i < NTHREADS; i++) {
    zm_secret_dispose(&jobs[i].key);
    free(jobs[i].csr);
  }
}

static void test_alg_parse(void **state) {
  (void)state;
  static const struct {
    const char *s;
    int rv;
    zm_key_alg_t alg;
  } C[] = {
      {"ec-p384", 0, ZM_KEY_EC_P384},   {"EC-P384", 0, ZM_KEY_EC_P384},
      {"ec-p256", 0, ZM_KEY_EC_P256},   {"rsa-2048", 0, ZM_KEY_RSA_2048},
      {"rsa-4096", 0, ZM_KEY_RSA_4096}, {"EC", 0, ZM_KEY_EC_P384},
      {"ec", 0, ZM_KEY_EC_P384},        {"RSA", 0, ZM_KEY_RSA_4096},
      {"Rsa", 0, ZM_KEY_RSA_4096},      {"", ZM_E_INVAL, 0},
      {"ec-p521", ZM_E_INVAL, 0},       {"rsa-1024", ZM_E_INVAL, 0},
      {"ec ", ZM_E_INVAL, 0},           {"ec-p384x", ZM_E_INVAL, 0},
  };
  for (size_t i = 0; i < ZM_ARRAY_SIZE(C); i++) {
    zm_key_alg_t a = (zm_key_alg_t)-1;
    int rv = zm_key_alg_parse(C[i].s, &a);
    if (rv != C[i].rv)
      fail_msg("'%s': want %d got %d", C[i].s, C[i].rv, rv);
    if (rv == 0)
      assert_int_equal(a, C[i].alg);
  }
  zm_key_alg_t a;
  assert_int_equal(zm_key_alg_parse(NULL, &a), ZM_E_INVAL);
  assert_int_equal(zm_key_alg_parse("ec", NULL), ZM_E_INVAL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_alg_parse),    cmocka_unit_test(test_ec_p384),
      cmocka_unit_test(test_ec_p256),      cmocka_unit_test(test_rsa_2048),
      cmocka_unit_test(test_rsa_4096),     cmocka_unit_test(test_cn_edges),
      cmocka_unit_test(test_invalid_args), cmocka_unit_test(test_keys_differ),
      cmocka_unit_test(test_threads),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
