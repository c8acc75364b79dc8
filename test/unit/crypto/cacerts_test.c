/*
 * cacerts_test.c - zm_cacerts_decode on degenerate PKCS#7 bundles made by
 * `openssl crl2pkcs7 -nocrl` at test time, plus malformed, truncated and
 * oversized inputs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "crypto/crypto_test_util.h"
#include "zm/crypto.h"
#include "zm/zm.h"

#define NCERTS 3

static char *bundle_pem; /* the certificates, concatenated PEM */
static uint8_t *p7_der;  /* the PKCS#7 */
static size_t p7_len;
static char *p7_b64; /* as the controller sends it: 64-char lines */
static size_t p7_b64_len;
static uint8_t *one_der; /* PKCS#7 with a single certificate */
static size_t one_len;
static char *cert_pem[NCERTS];

static int group_setup(void **state) {
  (void)state;
  if (tu_mkdtemp() != 0)
    return -1;
  /* A root, an intermediate signed by it (RSA), and an EC leaf-ish CA. */
  if (tu_sh(OPENSSL " req -x509 -new -newkey ec -pkeyopt "
                    "ec_paramgen_curve:P-256 -nodes -keyout ca0.key -subj "
                    "/CN=root -days 2 -out c0.pem") != 0 ||
      tu_sh(OPENSSL " req -new -newkey rsa:2048 -nodes -keyout ca1.key "
                    "-subj '/O=Ziti/CN=intermediate' -out ca1.csr && " OPENSSL
                    " x509 -req -in ca1.csr -CA c0.pem -CAkey ca0.key "
                    "-CAcreateserial -days 2 -out c1.pem") != 0 ||
      tu_sh(OPENSSL " req -x509 -new -newkey ec -pkeyopt "
                    "ec_paramgen_curve:P-384 -nodes -keyout ca2.key -subj "
                    "/CN=other-root -days 2 -addext "
                    "'subjectAltName=DNS:ctrl.example.com' -out c2.pem") != 0)
    return -1;
  if (tu_sh("cat c0.pem c1.pem c2.pem > bundle.pem && " OPENSSL
            " crl2pkcs7 -nocrl -certfile bundle.pem -outform DER -out p7.der"
            " && " OPENSSL " base64 -e -in p7.der -out p7.b64 && " OPENSSL
            " crl2pkcs7 -nocrl -certfile c1.pem -outform DER -out one.der") !=
      0)
    return -1;
  bundle_pem = tu_read(tu_path("bundle.pem"), NULL);
  p7_der = (uint8_t *)tu_read(tu_path("p7.der"), &p7_len);
  p7_b64 = tu_read(tu_path("p7.b64"), &p7_b64_len);
  one_der = (uint8_t *)tu_read(tu_path("one.der"), &one_len);
  for (int i = 0; i < NCERTS; i++) {
    char f[32];
    snprintf(f, sizeof(f), "c%d.pem", i);
    cert_pem[i] = tu_read(tu_path(f), NULL);
    if (cert_pem[i] == NULL)
      return -1;
  }
  return bundle_pem && p7_der && p7_b64 && one_der ? 0 : -1;
}

static int group_teardown(void **state) {
  (void)state;
  free(bundle_pem);
  free(p7_der);
  free(p7_b64);
  free(one_der);
  for (int i = 0; i < NCERTS; i++)
    free(cert_pem[i]);
  tu_rmdir();
  return 0;
}

static int decode(const char *b, size_t n, char **pem, size_t *count) {
  *pem = (char *)"sentinel";
  *count = 99;
  int rv = zm_cacerts_decode(b, n, pem, count);
  if (rv != 0) {
    assert_null(*pem);
    assert_int_equal(*count, 0);
  }
  return rv;
}

/* The decoded bundle is byte-for-byte openssl's PEM of the same certs. */
static void test_bundle(void **state) {
  (void)state;
  char *pem;
  size_t n;
  assert_true(strchr(p7_b64, '\n') < p7_b64 + 65); /* really line-broken */
  assert_int_equal(decode(p7_b64, p7_b64_len, &pem, &n), 0);
  assert_int_equal(n, NCERTS);
  assert_string_equal(pem, bundle_pem);
  /* And in order: each cert at its place. */
  const char *p = pem;
  for (int i = 0; i < NCERTS; i++) {
    assert_int_equal(strncmp(p, cert_pem[i], strlen(cert_pem[i])), 0);
    p += strlen(cert_pem[i]);
  }
  assert_int_equal(*p, '\0');
  free(pem);

  /* openssl itself reads our output back as the same 3 certificates. */
  assert_int_equal(decode(p7_b64, p7_b64_len, &pem, &n), 0);
  assert_int_equal(tu_write(tu_path("out.pem"), pem, strlen(pem)), 0);
  free(pem);
  assert_int_equal(tu_sh(OPENSSL " crl2pkcs7 -nocrl -certfile out.pem "
                                 "-outform DER -out again.der && cmp p7.der "
                                 "again.der"),
                   0);
}

static void test_single(void **state) {
  (void)state;
  char *b64 = tu_b64(one_der, one_len), *pem;
  size_t n;
  assert_int_equal(decode(b64, strlen(b64), &pem, &n), 0);
  assert_int_equal(n, 1);
  assert_string_equal(pem, cert_pem[1]);
  free(pem);
  free(b64);
}

/* One line, CRLF line breaks, spaces, and missing padding all decode. */
static void test_whitespace_variants(void **state) {
  (void)state;
  char *one_line = tu_b64(p7_der, p7_len), *pem;
  size_t n, L = strlen(one_line);
  assert_int_equal(decode(one_line, L, &pem, &n), 0);
  assert_string_equal(pem, bundle_pem);
  free(pem);

  char *crlf = malloc(L * 2 + 8);
  size_t k = 0;
  for (size_t i = 0; i < L; i++) {
    crlf[k++] = one_line[i];
    if (i % 64 == 63) {
      crlf[k++] = '\r';
      crlf[k++] = '\n';
    } else if (i % 17 == 5) {
      crlf[k++] = ' ';
    } else if (i % 29 == 3) {
      crlf[k++] = '\t';
    }
  }
  crlf[k++] = '\r';
  crlf[k++] = '\n';
  assert_int_equal(decode(crlf, k, &pem, &n), 0);
  assert_string_equal(pem, bundle_pem);
  free(pem);

  while (L > 0 && one_line[L - 1] == '=')
    L--;
  assert_int_equal(decode(one_line, L, &pem, &n), 0);
  assert_int_equal(n, NCERTS);
  free(pem);
  free(crlf);
  free(one_line);
}

static void test_garbage(void **state) {
  (void)state;
  char *pem;
  size_t n;
  static const char *const bad[] = {
      "",          "!!!!",  "AAAA", "====",
      "QUJD=RA==", "QQ===", "Q",    "-----BEGIN PKCS7-----",
      "MAA=", /* SEQ {} */
      "\n\n\r\n",
  };
  for (size_t i = 0; i < ZM_ARRAY_SIZE(bad); i++) {
    if (decode(bad[i], strlen(bad[i]), &pem, &n) != ZM_E_INVAL)
      fail_msg("'%s' accepted", bad[i]);
  }
  /* A certificate on its own is not a PKCS#7. */
  char *c = strdup(cert_pem[0]);
  char *body = strchr(c, '\n') + 1;
  *strstr(body, "-----END") = '\0';
  assert_int_equal(decode(body, strlen(body), &pem, &n), ZM_E_INVAL);
  free(c);
  /* A PKCS#7 without certificates. */
  assert_int_equal(tu_sh(OPENSSL " crl2pkcs7 -nocrl -outform DER -out e.der"),
                   0);
  size_t el;
  uint8_t *e = (uint8_t *)tu_read(tu_path("e.der"), &el);
  char *eb = tu_b64(e, el);
  assert_int_equal(decode(eb, strlen(eb), &pem, &n), ZM_E_INVAL);
  free(e);
  free(eb);
  /* Trailing bytes after the ContentInfo. */
  uint8_t *t = malloc(p7_len + 3);
  memcpy(t, p7_der, p7_len);
  memcpy(t + p7_len, "\x05\x00\x00", 3);
  char *tb = tu_b64(t, p7_len + 3);
  assert_int_equal(decode(tb, strlen(tb), &pem, &n), ZM_E_INVAL);
  free(tb);
  /* Not signedData: change the last OID byte (7.2 -> 7.1, data). */
  memcpy(t, p7_der, p7_len);
  uint8_t *oid = memmem(t, p7_len, "\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02", 9);
  assert_non_null(oid);
  oid[8] = 0x01;
  tb = tu_b64(t, p7_len);
  assert_int_equal(decode(tb, strlen(tb), &pem, &n), ZM_E_INVAL);
  free(tb);
  free(t);
  /* NULL arguments. */
  assert_int_equal(zm_cacerts_decode(NULL, 4, &pem, &n), ZM_E_INVAL);
  assert_int_equal(zm_cacerts_decode(p7_b64, p7_b64_len, NULL, &n), ZM_E_INVAL);
  assert_int_equal(zm_cacerts_decode(p7_b64, p7_b64_len, &pem, NULL),
                   ZM_E_INVAL);
}

static void test_oversized(void **state) {
  (void)state;
  char *pem;
  size_t n;
  /* A valid body padded with whitespace past the bound is still refused. */
  size_t big = ZM_CACERTS_MAX_LEN + 1;
  char *b = malloc(big);
  memset(b, '\n', big);
  memcpy(b, p7_b64, p7_b64_len);
  assert_int_equal(decode(b, big, &pem, &n), ZM_E_INVAL);
  /* ...and accepted exactly at the bound. */
  assert_int_equal(decode(b, big - 1, &pem, &n), 0);
  assert_int_equal(n, NCERTS);
  free(pem);
  free(b);
}

/* Every truncation of the DER is refused; nothing crashes. */
static void test_truncations(void **state) {
  (void)state;
  char *pem;
  size_t n;
  for (size_t cut = 0; cut < p7_len; cut++) {
    char *b = tu_b64(p7_der, cut);
    if (decode(b, strlen(b), &pem, &n) == 0)
      fail_msg("DER prefix of %zu/%zu bytes accepted", cut, p7_len);
    free(b);
  }
  /* Every prefix of the base64 text: refused unless it ends after the
   * last data symbol (padding is optional) or after all the padding. A
   * prefix ending inside "==" (one '=' of two) is malformed: refused. */
  size_t pad_end = p7_b64_len, data_end;
  while (pad_end > 0 && p7_b64[pad_end - 1] == '\n')
    pad_end--;
  data_end = pad_end;
  while (data_end > 0 && p7_b64[data_end - 1] == '=')
    data_end--;
  for (size_t cut = 0; cut < p7_b64_len; cut++) {
    int rv = decode(p7_b64, cut, &pem, &n);
    int want_ok = cut == data_end || cut >= pad_end;
    if (!want_ok && rv == 0)
      fail_msg("base64 prefix of %zu bytes accepted", cut);
    if (want_ok) {
      assert_int_equal(rv, 0);
      assert_string_equal(pem, bundle_pem);
      free(pem);
    }
  }
}

/* Flipped bytes in the DER never crash; anything accepted is well-formed
 * PEM with no more certificates than went in. Length and tag bytes are
 * where the walker's bounds are tested. */
static void test_flips(void **state) {
  (void)state;
  char *pem;
  size_t n;
  uint8_t *t = malloc(p7_len);
  static const uint8_t flips[] = {0x01, 0x80, 0xff};
  size_t accepted = 0;
  for (size_t i = 0; i < p7_len; i++) {
    for (size_t f = 0; f < sizeof(flips); f++) {
      memcpy(t, p7_der, p7_len);
      t[i] ^= flips[f];
      char *b = tu_b64(t, p7_len);
      if (decode(b, strlen(b), &pem, &n) == 0) {
        accepted++;
        assert_true(n >= 1 && n <= NCERTS);
        assert_int_equal(tu_count(pem, "-----BEGIN CERTIFICATE-----\n"), n);
        assert_int_equal(tu_count(pem, "-----END CERTIFICATE-----\n"), n);
        free(pem);
      }
      free(b);
    }
  }
  /* Flips inside certificate bodies keep the shape and are accepted (we
   * do not verify certificates here); flips of the framing are not. */
  assert_true(accepted > 0);
  static const size_t framing[] = {0, 1, 2, 3, 4, 5};
  for (size_t i = 0; i < ZM_ARRAY_SIZE(framing); i++) {
    memcpy(t, p7_der, p7_len);
    t[framing[i]] ^= 0x01;
    char *b = tu_b64(t, p7_len);
    if (decode(b, strlen(b), &pem, &n) == 0)
      fail_msg("flip of framing byte %zu accepted", framing[i]);
    free(b);
  }
  free(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bundle),
      cmocka_unit_test(test_single),
      cmocka_unit_test(test_whitespace_variants),
      cmocka_unit_test(test_garbage),
      cmocka_unit_test(test_oversized),
      cmocka_unit_test(test_truncations),
      cmocka_unit_test(test_flips),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
