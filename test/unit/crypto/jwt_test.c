/*
 * jwt_test.c - zm_jwt_verify against tokens signed at test time with keys and
 * self-signed certificates made by the openssl CLI in a scratch directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/hmac.h>

#include "crypto/crypto_test_util.h"
#include "zm/b64.h"
#include "zm/crypto.h"
#include "zm/zm.h"

#define NOW 1700000000LL
#define SUB "Xq3vY_8aB"
#define JTI "6f1c2a4e-8b0d-4c6e-9a3f-2d7b5e1f0a9c"
#define ISS "https://ctrl.example.com:1280"

typedef enum {
  K_EC256,
  K_EC384,
  K_EC521,
  K_RSA,
  K_OTHER256,
  K_ED25519,
  K_N
} kid_t;

static const struct {
  const char *name;
  const char *genpkey; /* openssl genpkey arguments */
  const char *alg;     /* the JWS alg for this key */
  const char *dgst;    /* openssl dgst digest */
  int coord;           /* EC coordinate bytes, 0 = RSA */
} KEYS[K_N] = {
    [K_EC256] = {"ec256", "-algorithm EC -pkeyopt ec_paramgen_curve:P-256",
                 "ES256", "sha256", 32},
    [K_EC384] = {"ec384", "-algorithm EC -pkeyopt ec_paramgen_curve:P-384",
                 "ES384", "sha384", 48},
    [K_EC521] = {"ec521", "-algorithm EC -pkeyopt ec_paramgen_curve:P-521",
                 "ES512", "sha512", 66},
    [K_RSA] = {"rsa", "-algorithm RSA -pkeyopt rsa_keygen_bits:2048", "RS256",
               "sha256", 0},
    [K_OTHER256] = {"other256",
                    "-algorithm EC -pkeyopt ec_paramgen_curve:P-256", "ES256",
                    "sha256", 32},
    [K_ED25519] = {"ed25519", "-algorithm ED25519", "EdDSA", NULL, 0},
};

static uint8_t *cert[K_N];
static size_t cert_len[K_N];

/* ---- token construction ---------------------------------------------------
 */

/* DER ECDSA-Sig-Value -> fixed-width r||s. */
static size_t der_to_raw(const uint8_t *d, size_t n, int coord, uint8_t *out) {
  size_t i = 2;
  assert_true(n > 8 && d[0] == 0x30);
  if (d[1] == 0x81)
    i = 3;
  for (int k = 0; k < 2; k++) {
    assert_int_equal(d[i], 0x02);
    size_t l = d[i + 1];
    const uint8_t *v = d + i + 2;
    i += 2 + l;
    while (l > 0 && *v == 0) {
      v++;
      l--;
    }
    assert_true(l <= (size_t)coord);
    memset(out + k * coord, 0, (size_t)coord);
    memcpy(out + k * coord + (coord - (int)l), v, l);
  }
  return 2 * (size_t)coord;
}

/* header.payload signed by key k (as `alg` may claim anything). */
static char *sign_with(kid_t k, const char *hdr, const char *payload) {
  char *h = tu_b64url((const uint8_t *)hdr, strlen(hdr));
  char *p = tu_b64url((const uint8_t *)payload, strlen(payload));
  size_t in_len = strlen(h) + 1 + strlen(p);
  char *in = malloc(in_len + 1);
  sprintf(in, "%s.%s", h, p);
  free(h);
  free(p);
  assert_int_equal(tu_write(tu_path("in.txt"), in, in_len), 0);
  assert_int_equal(tu_sh(OPENSSL " dgst -%s -sign %s.key -out sig.bin in.txt",
                         KEYS[k].dgst, KEYS[k].name),
                   0);
  size_t sig_len;
  uint8_t *sig = (uint8_t *)tu_read(tu_path("sig.bin"), &sig_len);
  assert_non_null(sig);
  uint8_t raw[2 * 66];
  char *s;
  if (KEYS[k].coord > 0)
    s = tu_b64url(raw, der_to_raw(sig, sig_len, KEYS[k].coord, raw));
  else
    s = tu_b64url(sig, sig_len);
  free(sig);
  char *tok = malloc(in_len + 1 + strlen(s) + 1);
  sprintf(tok, "%s.%s", in, s);
  free(in);
  free(s);
  return tok;
}

static char *header_for(const char *alg) {
  static char b[128];
  snprintf(b, sizeof(b), "{\"alg\":\"%s\",\"kid\":\"00ff\",\"typ\":\"JWT\"}",
           alg);
  return b;
}

static const char *std_payload(void) {
  static char b[512];
  snprintf(b, sizeof(b),
           "{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"aud\":[\"\"],"
           "\"exp\":%lld,\"jti\":\"" JTI "\",\"em\":\"ott\","
           "\"ctrls\":[\"tls:ctrl.example.com:6262\"]}",
           NOW + 3600);
  return b;
}

/* A valid token of key k with the standard claims. */
static char *valid_token(kid_t k) {
  return sign_with(k, header_for(KEYS[k].alg), std_payload());
}

static int verify(const char *tok, kid_t k, const char *sub,
                  zm_jwt_claims_t *c) {
  return zm_jwt_verify(tok, strlen(tok), cert[k], cert_len[k], sub, NOW, c);
}

static void assert_empty(const zm_jwt_claims_t *c) {
  assert_null(c->iss);
  assert_null(c->sub);
  assert_null(c->em);
  assert_null(c->jti.base);
  assert_int_equal(c->jti.len, 0);
  assert_int_equal(c->exp, 0);
}

/* Verifies and expects rv; on error, that the claims stayed empty. */
static void expect_rv(const char *tok, kid_t k, int want) {
  zm_jwt_claims_t c;
  memset(&c, 0xa5, sizeof(c)); /* garbage in: must come out cleared */
  int rv = verify(tok, k, SUB, &c);
  if (rv != want)
    fail_msg("token %.60s...: want %s, got %s", tok, zm_strerror(want),
             zm_strerror(rv));
  if (rv != 0)
    assert_empty(&c);
  zm_jwt_claims_dispose(&c);
}

/* ---- fixtures --------------------------------------------------------------
 */

static int group_setup(void **state) {
  (void)state;
  if (tu_mkdtemp() != 0)
    return -1;
  for (int k = 0; k < K_N; k++) {
    if (tu_sh(OPENSSL " genpkey %s -out %s.key", KEYS[k].genpkey,
              KEYS[k].name) != 0 ||
        tu_sh(OPENSSL " req -x509 -new -key %s.key -subj /CN=ctrl.example.com"
                      " -days 2 -outform DER -out %s.der",
              KEYS[k].name, KEYS[k].name) != 0) {
      fprintf(stderr, "openssl failed for %s\n", KEYS[k].name);
      return -1;
    }
    char f[64];
    snprintf(f, sizeof(f), "%s.der", KEYS[k].name);
    cert[k] = (uint8_t *)tu_read(tu_path(f), &cert_len[k]);
    if (cert[k] == NULL)
      return -1;
  }
  return 0;
}

static int group_teardown(void **state) {
  (void)state;
  for (int k = 0; k < K_N; k++)
    free(cert[k]);
  tu_rmdir();
  return 0;
}

/* ---- valid tokens ------------------------------------------------------- */

static void check_valid(kid_t k) {
  char *tok = valid_token(k);
  zm_jwt_claims_t c;
  assert_int_equal(verify(tok, k, SUB, &c), 0);
  assert_string_equal(c.iss, ISS);
  assert_string_equal(c.sub, SUB);
  assert_string_equal(c.em, "ott");
  assert_string_equal(c.jti.base, JTI);
  assert_int_equal(c.jti.len, strlen(JTI));
  assert_int_equal(c.exp, NOW + 3600);
  zm_jwt_claims_dispose(&c);
  assert_empty(&c);
  zm_jwt_claims_dispose(&c); /* twice is safe */

  /* expect_sub NULL skips the comparison only. */
  assert_int_equal(verify(tok, k, NULL, &c), 0);
  assert_string_equal(c.sub, SUB);
  zm_jwt_claims_dispose(&c);
  free(tok);
}

static void test_es256_valid(void **state) {
  (void)state;
  check_valid(K_EC256);
}
static void test_es384_valid(void **state) {
  (void)state;
  check_valid(K_EC384);
}
static void test_es512_valid(void **state) {
  (void)state;
  check_valid(K_EC521);
}
static void test_rs256_valid(void **state) {
  (void)state;
  check_valid(K_RSA);
}

/* A fractional NumericDate is accepted and truncated to whole seconds. */
static void test_fractional_exp(void **state) {
  (void)state;
  char p[512];
  snprintf(p, sizeof(p),
           "{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":%lld.75,"
           "\"jti\":\"" JTI "\",\"em\":\"ott\"}",
           NOW + 10);
  char *tok = sign_with(K_EC256, header_for("ES256"), p);
  zm_jwt_claims_t c;
  assert_int_equal(verify(tok, K_EC256, SUB, &c), 0);
  assert_int_equal(c.exp, NOW + 10);
  zm_jwt_claims_dispose(&c);
  free(tok);
}

/* ---- signature failures ------------------------------------------------- */

static void test_bad_signature(void **state) {
  (void)state;
  for (kid_t k = K_EC256; k <= K_RSA; k++) {
    char *tok = valid_token(k);
    char *sig = strrchr(tok, '.') + 1;
    /* Flip a bit in the middle of the signature (stays valid base64url). */
    size_t mid = strlen(sig) / 2;
    sig[mid] = sig[mid] == 'A' ? 'B' : 'A';
    expect_rv(tok, k, ZM_E_BAD_SIGNATURE);
    free(tok);
  }
}

static void test_tampered_payload(void **state) {
  (void)state;
  char *tok = valid_token(K_EC256);
  char *good = valid_token(K_EC256);
  /* Same header and signature, a payload naming another subject. */
  char p[512];
  snprintf(p, sizeof(p),
           "{\"iss\":\"" ISS "\",\"sub\":\"evil\",\"exp\":%lld,\"jti\":\"" JTI
           "\",\"em\":\"ott\"}",
           NOW + 3600);
  char *pe = tu_b64url((const uint8_t *)p, strlen(p));
  char *d1 = strchr(good, '.'), *d2 = strrchr(good, '.');
  char *forged = malloc(strlen(good) + strlen(pe) + 4);
  sprintf(forged, "%.*s.%s%s", (int)(d1 - good), good, pe, d2);
  zm_jwt_claims_t c;
  assert_int_equal(zm_jwt_verify(forged, strlen(forged), cert[K_EC256],
                                 cert_len[K_EC256], NULL, NOW, &c),
                   ZM_E_BAD_SIGNATURE);
  assert_empty(&c);
  free(forged);
  free(pe);
  free(good);
  free(tok);
}

/* RS256 signature s + n (n the modulus) is the same residue as s, but RFC
 * 8017 says a representative >= n is invalid; wolfSSL 5.5.4 accepted it, so
 * a token had two valid spellings (found by test/fuzz/fuzz_jwt.c). The test
 * makes its own key with n <= 0xC0.. * 2^2040, so that s + n fits in 256
 * bytes for at least a third of all s, and tries payloads until one does. */
static void test_rs256_sig_plus_modulus(void **state) {
  (void)state;
  uint8_t n[256], *der = NULL;
  size_t der_len = 0;
  for (int i = 0; i < 64 && der == NULL; i++) {
    assert_int_equal(
        tu_sh(OPENSSL " genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048"
                      " -out pn.key && " OPENSSL
                      " rsa -in pn.key -noout -modulus > mod.txt"),
        0);
    size_t mlen;
    char *mtxt = tu_read(tu_path("mod.txt"), &mlen);
    assert_non_null(mtxt);
    assert_true(mlen > 8 + 512 && strncmp(mtxt, "Modulus=", 8) == 0);
    for (size_t k = 0; k < sizeof(n); k++) {
      unsigned v;
      assert_int_equal(sscanf(mtxt + 8 + 2 * k, "%2x", &v), 1);
      n[k] = (uint8_t)v;
    }
    free(mtxt);
    if (n[0] > 0xC0)
      continue;
    assert_int_equal(tu_sh(OPENSSL " req -x509 -new -key pn.key -subj /CN=x"
                                   " -days 2 -outform DER -out pn.der"),
                     0);
    der = (uint8_t *)tu_read(tu_path("pn.der"), &der_len);
    assert_non_null(der);
  }
  assert_non_null(der); /* 64 keys all above 0xC0..: practically never */

  int tried = 0;
  for (int i = 0; i < 64 && !tried; i++) {
    char p[512];
    snprintf(p, sizeof(p),
             "{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":%lld,"
             "\"jti\":\"" JTI "\",\"em\":\"ott\"}",
             NOW + 3600 + i);
    const char *h = header_for("RS256");
    char *he = tu_b64url((const uint8_t *)h, strlen(h));
    char *pe = tu_b64url((const uint8_t *)p, strlen(p));
    char in[1024];
    snprintf(in, sizeof(in), "%s.%s", he, pe);
    free(he);
    free(pe);
    assert_int_equal(tu_write(tu_path("in.txt"), in, strlen(in)), 0);
    assert_int_equal(
        tu_sh(OPENSSL " dgst -sha256 -sign pn.key -out sig.bin in.txt"), 0);
    size_t sig_len;
    uint8_t *sig = (uint8_t *)tu_read(tu_path("sig.bin"), &sig_len);
    assert_non_null(sig);
    assert_int_equal(sig_len, 256);
    char *s1 = tu_b64url(sig, sig_len);
    unsigned carry = 0;
    for (size_t k = sig_len; k-- > 0;) {
      unsigned v = sig[k] + n[k] + carry;
      sig[k] = (uint8_t)v;
      carry = v >> 8;
    }
    if (carry == 0) { /* s + n still fits in the modulus length */
      char *s2 = tu_b64url(sig, sig_len);
      char tok[2048], forged[2048];
      snprintf(tok, sizeof(tok), "%s.%s", in, s1);
      snprintf(forged, sizeof(forged), "%s.%s", in, s2);
      zm_jwt_claims_t c;
      assert_int_equal(
          zm_jwt_verify(tok, strlen(tok), der, der_len, SUB, NOW, &c), 0);
      zm_jwt_claims_dispose(&c);
      assert_int_equal(
          zm_jwt_verify(forged, strlen(forged), der, der_len, SUB, NOW, &c),
          ZM_E_BAD_SIGNATURE);
      assert_empty(&c);
      free(s2);
      tried = 1;
    }
    free(s1);
    free(sig);
  }
  free(der);
  assert_true(tried); /* p(miss) per payload <= 2/3: 64 misses ~ 1e-11 */
}

static void test_other_key(void **state) {
  (void)state;
  char *tok = valid_token(K_OTHER256);
  expect_rv(tok, K_OTHER256, 0);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok);
}

static void test_alg_none(void **state) {
  (void)state;
  char *h =
      tu_b64url((const uint8_t *)"{\"alg\":\"none\",\"typ\":\"JWT\"}", 26);
  const char *p = std_payload();
  char *pe = tu_b64url((const uint8_t *)p, strlen(p));
  char tok[2048];
  snprintf(tok, sizeof(tok), "%s.%s.", h, pe);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  /* Same with a signature appended: still refused for the alg. */
  char *valid = valid_token(K_EC256);
  snprintf(tok, sizeof(tok), "%s.%s.%s", h, pe, strrchr(valid, '.') + 1);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  /* Variant spellings are unknown algs, refused the same way. */
  char *tok2 = sign_with(K_EC256, "{\"alg\":\"None\"}", p);
  expect_rv(tok2, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok2);
  tok2 = sign_with(K_EC256, "{\"alg\":\"es256\"}", p);
  expect_rv(tok2, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok2);
  tok2 = sign_with(K_EC256, "{\"alg\":\"PS256\"}", p);
  expect_rv(tok2, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok2);
  free(valid);
  free(h);
  free(pe);
}

/* HS256 keyed with the (public) certificate: the classic confusion attack. */
static void test_alg_hs256(void **state) {
  (void)state;
  const char *hdr = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
  const char *p = std_payload();
  char *h = tu_b64url((const uint8_t *)hdr, strlen(hdr));
  char *pe = tu_b64url((const uint8_t *)p, strlen(p));
  char in[2048];
  snprintf(in, sizeof(in), "%s.%s", h, pe);
  Hmac hmac;
  uint8_t mac[32];
  assert_int_equal(wc_HmacInit(&hmac, NULL, INVALID_DEVID), 0);
  assert_int_equal(
      wc_HmacSetKey(&hmac, WC_SHA256, cert[K_EC256], (word32)cert_len[K_EC256]),
      0);
  assert_int_equal(wc_HmacUpdate(&hmac, (const byte *)in, (word32)strlen(in)),
                   0);
  assert_int_equal(wc_HmacFinal(&hmac, mac), 0);
  wc_HmacFree(&hmac);
  char *m = tu_b64url(mac, sizeof(mac));
  char tok[2100];
  snprintf(tok, sizeof(tok), "%s.%s", in, m);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  expect_rv(tok, K_RSA, ZM_E_BAD_SIGNATURE);
  free(m);
  free(h);
  free(pe);
}

static void test_alg_key_mismatch(void **state) {
  (void)state;
  const char *p = std_payload();
  char *tok;
  /* Signed correctly by the P-256 key, but labelled ES384 / ES512. */
  tok = sign_with(K_EC256, header_for("ES384"), p);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok);
  tok = sign_with(K_EC256, header_for("ES512"), p);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok);
  /* Signed by P-384 labelled ES256 (hash would otherwise be truncated). */
  tok = sign_with(K_EC384, header_for("ES256"), p);
  expect_rv(tok, K_EC384, ZM_E_BAD_SIGNATURE);
  free(tok);
  /* RSA alg against an EC certificate, and the reverse. */
  tok = sign_with(K_RSA, header_for("RS256"), p);
  expect_rv(tok, K_EC256, ZM_E_BAD_SIGNATURE);
  free(tok);
  tok = sign_with(K_EC256, header_for("ES256"), p);
  expect_rv(tok, K_RSA, ZM_E_BAD_SIGNATURE);
  free(tok);
}

static void test_cert_unusable(void **state) {
  (void)state;
  char *tok = valid_token(K_EC256);
  zm_jwt_claims_t c;
  uint8_t junk[64];
  memset(junk, 0x30, sizeof(junk));
  assert_int_equal(
      zm_jwt_verify(tok, strlen(tok), junk, sizeof(junk), SUB, NOW, &c),
      ZM_E_CRYPTO);
  assert_empty(&c);
  assert_int_equal(zm_jwt_verify(tok, strlen(tok), NULL, 0, SUB, NOW, &c),
                   ZM_E_CRYPTO);
  /* Truncated certificate. */
  assert_int_equal(zm_jwt_verify(tok, strlen(tok), cert[K_EC256],
                                 cert_len[K_EC256] / 2, SUB, NOW, &c),
                   ZM_E_CRYPTO);
  /* An Ed25519 certificate is not a key the controller signs JWTs with. */
  expect_rv(tok, K_ED25519, ZM_E_CRYPTO);
  free(tok);
}

/* ---- claims
 * ------------------------------------------------------------------ */

static void claims_case(const char *payload, const char *sub, int want) {
  char *tok = sign_with(K_EC256, header_for("ES256"), payload);
  zm_jwt_claims_t c;
  int rv = zm_jwt_verify(tok, strlen(tok), cert[K_EC256], cert_len[K_EC256],
                         sub, NOW, &c);
  if (rv != want)
    fail_msg("payload %s: want %s, got %s", payload, zm_strerror(want),
             zm_strerror(rv));
  if (rv != 0)
    assert_empty(&c);
  zm_jwt_claims_dispose(&c);
  free(tok);
}

static void test_expired(void **state) {
  (void)state;
  char p[512];
#define FMT                                                                    \
  "{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":%lld,\"jti\":\"" JTI       \
  "\",\"em\":\"ott\"}"
  snprintf(p, sizeof(p), FMT, NOW - 1);
  claims_case(p, SUB, ZM_E_EXPIRED);
  snprintf(p, sizeof(p), FMT, NOW); /* exp == now is expired */
  claims_case(p, SUB, ZM_E_EXPIRED);
  snprintf(p, sizeof(p), FMT, NOW + 1);
  claims_case(p, SUB, 0);
  snprintf(p, sizeof(p), FMT, 0LL);
  claims_case(p, SUB, ZM_E_EXPIRED);
#undef FMT
}

static void test_bad_claims(void **state) {
  (void)state;
  /* em other than ott */
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"jti\":\"" JTI "\",\"em\":\"ottca\"}",
              SUB, ZM_E_INVAL);
  /* sub mismatch */
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"someone-else\","
              "\"exp\":1800000000,\"jti\":\"" JTI "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  /* sub missing / empty */
  claims_case("{\"iss\":\"" ISS "\",\"exp\":1800000000,\"jti\":\"" JTI
              "\",\"em\":\"ott\"}",
              NULL, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"\",\"exp\":1800000000,"
              "\"jti\":\"" JTI "\",\"em\":\"ott\"}",
              NULL, ZM_E_INVAL);
  /* jti missing, empty, not a string, with an embedded NUL */
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"jti\":\"\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"jti\":42,\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"jti\":\"a\\u0000b\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  /* exp missing or not a number */
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"jti\":\"" JTI
              "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":\"1800000000\","
              "\"jti\":\"" JTI "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1e300,"
              "\"jti\":\"" JTI "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  /* iss missing, em missing */
  claims_case("{\"sub\":\"" SUB "\",\"exp\":1800000000,\"jti\":\"" JTI
              "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"exp\":1800000000,"
              "\"jti\":\"" JTI "\"}",
              SUB, ZM_E_INVAL);
  /* payload not an object / not JSON / duplicate keys */
  claims_case("[1,2,3]", SUB, ZM_E_INVAL);
  claims_case("not json", SUB, ZM_E_INVAL);
  claims_case("{\"iss\":\"" ISS "\",\"sub\":\"" SUB "\",\"sub\":\"other\","
              "\"exp\":1800000000,\"jti\":\"" JTI "\",\"em\":\"ott\"}",
              SUB, ZM_E_INVAL);
}

/* ---- malformed tokens -----------------------------------------------------
 */

static void test_malformed(void **state) {
  (void)state;
  char *good = valid_token(K_EC256);
  size_t n = strlen(good);
  char *d1 = strchr(good, '.'), *d2 = strrchr(good, '.');
  char buf[4096];
  zm_jwt_claims_t c;

  expect_rv("", K_EC256, ZM_E_INVAL);
  expect_rv("abc", K_EC256, ZM_E_INVAL);
  expect_rv("abc.def", K_EC256, ZM_E_INVAL);
  expect_rv("..", K_EC256, ZM_E_INVAL);
  expect_rv("a.b.c.d.e", K_EC256, ZM_E_INVAL);
  /* A fourth segment. */
  snprintf(buf, sizeof(buf), "%s.AAAA", good);
  expect_rv(buf, K_EC256, ZM_E_INVAL);
  /* Padding, whitespace and standard-alphabet characters are not base64url. */
  snprintf(buf, sizeof(buf), "%.*s=%s", (int)(d1 - good), good, d1);
  expect_rv(buf, K_EC256, ZM_E_INVAL);
  snprintf(buf, sizeof(buf), "%.*s %s", (int)(d1 - good), good, d1);
  expect_rv(buf, K_EC256, ZM_E_INVAL);
  snprintf(buf, sizeof(buf), "%.*s+/%s", (int)(d2 - good), good, d2);
  expect_rv(buf, K_EC256, ZM_E_INVAL);
  /* Non-JSON header, header array, header without alg, alg not a string. */
  const char *p = std_payload();
  char *pe = tu_b64url((const uint8_t *)p, strlen(p));
  const char *bad_hdrs[] = {"garbage", "[\"ES256\"]", "{\"typ\":\"JWT\"}",
                            "{\"alg\":256}", "{\"alg\":\"ES256\""};
  for (size_t i = 0; i < ZM_ARRAY_SIZE(bad_hdrs); i++) {
    char *he = tu_b64url((const uint8_t *)bad_hdrs[i], strlen(bad_hdrs[i]));
    snprintf(buf, sizeof(buf), "%s.%s%s", he, pe, d2);
    expect_rv(buf, K_EC256, ZM_E_INVAL);
    free(he);
  }
  free(pe);
  /* Embedded NUL inside the given length. */
  memcpy(buf, good, n + 1);
  buf[5] = '\0';
  assert_int_equal(
      zm_jwt_verify(buf, n, cert[K_EC256], cert_len[K_EC256], SUB, NOW, &c),
      ZM_E_INVAL);
  assert_empty(&c);
  /* Over the length bound: refused before anything is decoded. */
  char *huge = malloc(ZM_JWT_MAX_LEN + 2);
  memset(huge, 'A', ZM_JWT_MAX_LEN + 1);
  memcpy(huge, good, n);
  huge[ZM_JWT_MAX_LEN + 1] = '\0';
  assert_int_equal(zm_jwt_verify(huge, ZM_JWT_MAX_LEN + 1, cert[K_EC256],
                                 cert_len[K_EC256], SUB, NOW, &c),
                   ZM_E_INVAL);
  assert_empty(&c);
  free(huge);
  /* NULL arguments. */
  assert_int_equal(
      zm_jwt_verify(NULL, 10, cert[K_EC256], cert_len[K_EC256], SUB, NOW, &c),
      ZM_E_INVAL);
  assert_int_equal(
      zm_jwt_verify(good, n, cert[K_EC256], cert_len[K_EC256], SUB, NOW, NULL),
      ZM_E_INVAL);
  free(good);
}

/* Every prefix and every single-byte change of a valid token is refused,
 * and nothing crashes (run under ASan in the sanitizer build). */
static void fuzz_one(kid_t k) {
  char *good = valid_token(k);
  size_t n = strlen(good);
  char *buf = malloc(n + 1);
  zm_jwt_claims_t c;

  for (size_t cut = 0; cut < n; cut++) {
    memcpy(buf, good, cut);
    buf[cut] = '\0';
    int rv = zm_jwt_verify(buf, cut, cert[k], cert_len[k], SUB, NOW, &c);
    if (rv == 0)
      fail_msg("prefix of %zu/%zu bytes verified", cut, n);
    assert_empty(&c);
  }
  static const uint8_t flips[] = {0x01, 0x20, 0x80, 0xff};
  for (size_t i = 0; i < n; i++) {
    for (size_t f = 0; f < sizeof(flips); f++) {
      memcpy(buf, good, n + 1);
      buf[i] = (char)(buf[i] ^ flips[f]);
      int rv = zm_jwt_verify(buf, n, cert[k], cert_len[k], SUB, NOW, &c);
      if (rv == 0)
        fail_msg("byte %zu ^ 0x%02x verified", i, flips[f]);
      assert_empty(&c);
    }
  }
  free(buf);
  free(good);
}

static void test_fuzz_es256(void **state) {
  (void)state;
  fuzz_one(K_EC256);
}

static void test_fuzz_rs256(void **state) {
  (void)state;
  fuzz_one(K_RSA);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_es256_valid),
      cmocka_unit_test(test_es384_valid),
      cmocka_unit_test(test_es512_valid),
      cmocka_unit_test(test_rs256_valid),
      cmocka_unit_test(test_fractional_exp),
      cmocka_unit_test(test_bad_signature),
      cmocka_unit_test(test_tampered_payload),
      cmocka_unit_test(test_rs256_sig_plus_modulus),
      cmocka_unit_test(test_other_key),
      cmocka_unit_test(test_alg_none),
      cmocka_unit_test(test_alg_hs256),
      cmocka_unit_test(test_alg_key_mismatch),
      cmocka_unit_test(test_cert_unusable),
      cmocka_unit_test(test_expired),
      cmocka_unit_test(test_bad_claims),
      cmocka_unit_test(test_malformed),
      cmocka_unit_test(test_fuzz_es256),
      cmocka_unit_test(test_fuzz_rs256),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
