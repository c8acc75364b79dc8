/*
 * keycsr.c - the enrolling identity's key pair and its PKCS#10 request.
 *
 * The CSR is what the OpenZiti Go SDK sends: subject C=US, O=NetFoundry,
 * CN=<identity id>, no attributes, no extensions. The controller copies the
 * subject into the issued certificate and insists on exactly one PEM block
 * with nothing after the END line's newline.
 *
 * Runs on the crypto workers (workers.c): every call has its own keys, and
 * every buffer that held private key bytes is wiped before it is freed.
 * Each thread keeps one Hash-DRBG (WC_RNG), seeded on first use and reseeded
 * by wolfSSL at its reseed interval, as OpenSSL keeps its per-thread DRBGs:
 * instantiating one per key read /dev/urandom and ran the DRBG health test
 * every time, a tenth of the key + CSR cost. It is freed when the thread
 * exits.
 * wolfSSL (FP_ECC + HAVE_THREAD_LS) keeps a per-thread cache of base-point
 * tables, about 1 MB per thread; we keep it (it makes EC key generation ~18x
 * faster) while the workers live; a worker calls wc_ecc_fp_free() as it
 * exits.
 */
#include <wolfssl/options.h>

#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/random.h>
#include <wolfssl/wolfcrypt/rsa.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "zm/crypto.h"
#include "zm/zm.h"

/* X.520 ub-common-name. */
#define CN_MAX 64
/* A DER RSA-4096 private key is ~2.35 KB; a CSR for it ~1.2 KB. */
#define KEY_DER_MAX 4096
#define CSR_DER_MAX 4096

/* ---- the thread's DRBG ----------------------------------------------------
 */

static pthread_key_t rng_key;
static pthread_once_t rng_once = PTHREAD_ONCE_INIT;
static int rng_key_ok;

static void rng_free(void *p) {
  wc_FreeRng(p); /* zeroes the DRBG state */
  free(p);
}

static void rng_key_init(void) {
  rng_key_ok = pthread_key_create(&rng_key, rng_free) == 0;
}

/* The calling thread's WC_RNG, or NULL. */
static WC_RNG *thread_rng(void) {
  pthread_once(&rng_once, rng_key_init);
  if (!rng_key_ok)
    return NULL;
  WC_RNG *r = pthread_getspecific(rng_key);
  if (r != NULL)
    return r;
  r = malloc(sizeof *r);
  if (r == NULL)
    return NULL;
  if (wc_InitRng(r) != 0) {
    free(r);
    return NULL;
  }
  if (pthread_setspecific(rng_key, r) != 0) {
    rng_free(r);
    return NULL;
  }
  return r;
}

/* ---- key algorithm names --------------------------------------------------
 */

int zm_key_alg_parse(const char *s, zm_key_alg_t *out) {
  static const struct {
    const char *name;
    zm_key_alg_t alg;
  } NAMES[] = {
      {"ec-p384", ZM_KEY_EC_P384},   {"ec-p256", ZM_KEY_EC_P256},
      {"rsa-2048", ZM_KEY_RSA_2048}, {"rsa-4096", ZM_KEY_RSA_4096},
      {"ec", ZM_KEY_EC_P384},        {"rsa", ZM_KEY_RSA_4096},
  };
  if (s == NULL || out == NULL)
    return ZM_E_INVAL;
  for (size_t i = 0; i < ZM_ARRAY_SIZE(NAMES); i++) {
    if (strcasecmp(s, NAMES[i].name) == 0) {
      *out = NAMES[i].alg;
      return 0;
    }
  }
  return ZM_E_INVAL;
}

/* ---- subject
 * ----------------------------------------------------------------- */

/* ASN.1 PrintableString alphabet (X.680 §41.4). */
static int printable(const char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
          (c >= '0' && c <= '9') || strchr(" '()+,-./:=?", c) != NULL))
      return 0;
  }
  return 1;
}

/* Appends one RDN { SET { SEQ { OID 2.5.4.<attr>, <tag> value } } }. */
static size_t put_rdn(uint8_t *p, uint8_t attr, const char *val) {
  size_t n = strlen(val);
  uint8_t tag = printable(val) ? 0x13 /* PrintableString */
                               : 0x0c /* UTF8String */;
  /* Every length here is < 128 (CN_MAX bounds the value): short form. */
  p[0] = 0x31;
  p[1] = (uint8_t)(9 + n);
  p[2] = 0x30;
  p[3] = (uint8_t)(7 + n);
  p[4] = 0x06;
  p[5] = 0x03;
  p[6] = 0x55;
  p[7] = 0x04;
  p[8] = attr;
  p[9] = tag;
  p[10] = (uint8_t)n;
  memcpy(p + 11, val, n);
  return 11 + n;
}

/*
 * The subject as a DER Name, in the Go SDK's order (pkix.Name.ToRDNSequence:
 * C, O, CN). We encode it ourselves because wolfSSL's CertName fields hold
 * at most 63 characters, one short of the X.520 bound.
 */
static size_t subject_der(uint8_t *buf, const char *cn) {
  size_t n = 2;
  n += put_rdn(buf + n, 0x06, "US");
  n += put_rdn(buf + n, 0x0a, "NetFoundry");
  n += put_rdn(buf + n, 0x03, cn);
  buf[0] = 0x30;
  buf[1] = (uint8_t)(n - 2); /* <= 109: short form */
  return n;
}

static int cn_valid(const char *cn) {
  if (cn == NULL)
    return 0;
  size_t n = strnlen(cn, CN_MAX + 1);
  if (n == 0 || n > CN_MAX)
    return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)cn[i];
    if (c < 0x20 || c == 0x7f)
      return 0;
  }
  return 1;
}

/* ---- PEM
 * ----------------------------------------------------------------------- */

/*
 * DER -> one PEM block of `type`, ending in exactly one "\n". The buffer is
 * malloc'd and NUL-terminated; *out_len excludes the NUL. Returns NULL on
 * failure, wiping whatever was written (the DER may be a private key).
 */
static char *to_pem(const uint8_t *der, size_t der_len, int type,
                    size_t *out_len) {
  /* Base64 grows by 4/3, plus a newline per 64 chars and ~70 of armour. */
  size_t cap = der_len * 2 + 128;
  char *pem = zm_xmalloc(cap + 1);
  int n = wc_DerToPem(der, (word32)der_len, (byte *)pem, (word32)cap, type);
  if (n <= 0 || (size_t)n > cap) {
    zm_wipe(pem, cap + 1);
    free(pem);
    return NULL;
  }
  size_t len = (size_t)n;
  while (len > 0 &&
         (pem[len - 1] == '\n' || pem[len - 1] == '\r' || pem[len - 1] == ' '))
    len--;
  pem[len++] = '\n';
  pem[len] = '\0';
  *out_len = len;
  return pem;
}

/* ---- generation
 * ------------------------------------------------------------------ */

typedef struct {
  int is_ec;
  int ec_curve;
  int ec_size;
  int rsa_bits;
} keyspec_t;

static int keyspec(zm_key_alg_t alg, keyspec_t *ks) {
  memset(ks, 0, sizeof(*ks));
  switch (alg) {
  case ZM_KEY_EC_P384:
    *ks = (keyspec_t){1, ECC_SECP384R1, 48, 0};
    return 0;
  case ZM_KEY_EC_P256:
    *ks = (keyspec_t){1, ECC_SECP256R1, 32, 0};
    return 0;
  case ZM_KEY_RSA_2048:
    ks->rsa_bits = 2048;
    return 0;
  case ZM_KEY_RSA_4096:
    ks->rsa_bits = 4096;
    return 0;
  }
  return ZM_E_INVAL;
}

int zm_keycsr_generate(zm_key_alg_t alg, const char *cn, zm_secret_t *key_pem,
                       char **csr_pem) {
  keyspec_t ks;
  WC_RNG *rng;
  ecc_key ec;
  RsaKey rsa;
  Cert *req = NULL;
  uint8_t subj[128];
  uint8_t *key_der = NULL, *csr_der = NULL;
  char *kpem = NULL, *cpem = NULL;
  size_t kpem_len = 0, cpem_len = 0;
  int key_type, der_len, rv;
  void *key;

  if (key_pem == NULL || csr_pem == NULL)
    return ZM_E_INVAL;
  key_pem->base = NULL;
  key_pem->len = 0;
  *csr_pem = NULL;
  if (!cn_valid(cn) || keyspec(alg, &ks) != 0)
    return ZM_E_INVAL;

  rv = ZM_E_CRYPTO;
  if ((rng = thread_rng()) == NULL)
    return ZM_E_CRYPTO;
  if (ks.is_ec) {
    if (wc_ecc_init(&ec) != 0)
      goto fail_key_init;
    key = &ec;
    key_type = ECC_TYPE;
    if (wc_ecc_make_key_ex(rng, ks.ec_size, &ec, ks.ec_curve) != 0)
      goto fail_key;
  } else {
    if (wc_InitRsaKey(&rsa, NULL) != 0)
      goto fail_key_init;
    key = &rsa;
    key_type = RSA_TYPE;
    if (wc_MakeRsaKey(&rsa, ks.rsa_bits, WC_RSA_EXPONENT, rng) != 0 ||
        wc_RsaSetRNG(&rsa, rng) != 0)
      goto fail_key;
  }

  /* The private key, SEC1 ECPrivateKey or PKCS#1 RSAPrivateKey. */
  key_der = zm_xmalloc(KEY_DER_MAX);
  der_len = ks.is_ec ? wc_EccKeyToDer(&ec, key_der, KEY_DER_MAX)
                     : wc_RsaKeyToDer(&rsa, key_der, KEY_DER_MAX);
  if (der_len <= 0)
    goto fail_key_der;
  kpem = to_pem(key_der, (size_t)der_len,
                ks.is_ec ? ECC_PRIVATEKEY_TYPE : PRIVATEKEY_TYPE, &kpem_len);
  if (kpem == NULL)
    goto fail_key_der;

  /* The request: version 0, our subject, no attributes, SHA-256. */
  if ((req = wc_CertNew(NULL)) == NULL)
    goto fail_req;
  req->version = 0;
  req->sigType = ks.is_ec ? CTC_SHA256wECDSA : CTC_SHA256wRSA;
  /* wc_SetSubjectRaw wants a whole certificate to copy the name from, so
   * fill the raw subject ourselves: the RDNs without the outer SEQUENCE
   * header, which wolfSSL adds. It measures sbjRaw with strlen, and our RDNs
   * have no 0x00 byte (lengths are 1..127, cn has no control bytes). */
  size_t subj_len = subject_der(subj, cn) - 2;
  if (subj_len >= sizeof(req->sbjRaw) || memchr(subj + 2, 0, subj_len) != NULL)
    goto fail_req;
  memcpy(req->sbjRaw, subj + 2, subj_len);
  req->sbjRaw[subj_len] = 0;
  csr_der = zm_xmalloc(CSR_DER_MAX);
  if (wc_MakeCertReq_ex(req, csr_der, CSR_DER_MAX, key_type, key) <= 0)
    goto fail_req;
  der_len = wc_SignCert_ex(req->bodySz, req->sigType, csr_der, CSR_DER_MAX,
                           key_type, key, rng);
  if (der_len <= 0)
    goto fail_req;
  if ((cpem = to_pem(csr_der, (size_t)der_len, CERTREQ_TYPE, &cpem_len)) ==
      NULL)
    goto fail_req;

  key_pem->base = kpem;
  key_pem->len = kpem_len;
  kpem = NULL;
  *csr_pem = cpem;
  rv = 0;

fail_req:
  free(csr_der);
  if (req != NULL)
    wc_CertFree(req);
  if (kpem != NULL) {
    zm_wipe(kpem, kpem_len + 1);
    free(kpem);
  }
fail_key_der:
  zm_wipe(key_der, KEY_DER_MAX);
  free(key_der);
fail_key:
  if (ks.is_ec)
    wc_ecc_free(&ec);
  else
    wc_FreeRsaKey(&rsa);
fail_key_init:
  return rv;
}
