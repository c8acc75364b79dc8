/*
 * crypto.h - the pure (no I/O, no libuv) cryptographic pieces of enrollment,
 * built on wolfSSL: enrollment JWT verification, key pair + CSR generation,
 * the EST cacerts (PKCS#7) decoder, and the identity JSON the OpenZiti SDKs
 * load. All functions are thread-safe (key generation runs on the libuv
 * thread pool) and never log secrets. Wire facts: shared openziti-facts.md.
 */
#ifndef ZM_CRYPTO_H
#define ZM_CRYPTO_H

#include "zm/secret.h"

#include <stddef.h>
#include <stdint.h>

/* ---- enrollment JWT ------------------------------------------------------ */

/* Claims of a verified enrollment JWT. Strings owned, NUL-terminated. */
typedef struct {
  char *iss;       /* "https://host:port" */
  char *sub;       /* identity id */
  char *em;        /* enrollment method, "ott" */
  zm_secret_t jti; /* the one-time enrollment token: a secret */
  int64_t exp;     /* seconds since the epoch */
} zm_jwt_claims_t;

/* Maximum accepted token length in bytes (bounded parser). */
#define ZM_JWT_MAX_LEN (16u * 1024)

/*
 * Verifies `token` (compact JWS) against the public key of the X.509
 * certificate `cert_der` (the controller's TLS server certificate) and
 * fills `out` on success. Accepted algs: ES256/ES384/ES512 (EC key of the
 * matching curve; signature is raw r||s per RFC 7518) and RS256 (RSA key).
 * "none", any other alg, a key/alg mismatch, or a bad signature are errors.
 * Also checks: `exp` present and > now_s; `em` == "ott"; `sub` non-empty and,
 * when expect_sub != NULL, equal to it; `jti` non-empty; `iss` present.
 * Returns 0, or one of: ZM_E_INVAL (malformed token/JSON/claims, too long),
 * ZM_E_BAD_SIGNATURE (alg rejected or signature does not verify),
 * ZM_E_EXPIRED (exp <= now_s), ZM_E_CRYPTO (cert unusable).
 * On error `out` is left empty (safe to dispose).
 */
int zm_jwt_verify(const char *token, size_t len, const uint8_t *cert_der,
                  size_t cert_len, const char *expect_sub, int64_t now_s,
                  zm_jwt_claims_t *out);
/* Frees the claims and wipes the jti. Safe on a zeroed struct. */
void zm_jwt_claims_dispose(zm_jwt_claims_t *c);

/* ---- key pair + CSR ------------------------------------------------------ */

typedef enum {
  ZM_KEY_EC_P384 = 0, /* the OpenZiti Go SDK's default */
  ZM_KEY_EC_P256,
  ZM_KEY_RSA_2048,
  ZM_KEY_RSA_4096,
} zm_key_alg_t;

/* Parses "ec-p384" | "ec-p256" | "rsa-2048" | "rsa-4096" (also "EC" = p384,
 * "RSA" = rsa-4096, case-insensitive). Returns 0 or ZM_E_INVAL. */
int zm_key_alg_parse(const char *s, zm_key_alg_t *out);

/*
 * Generates a key pair and a CSR with subject C=US, O=NetFoundry, CN=<cn>,
 * no extensions/SANs, signed with SHA-256 (EC) / SHA-256 RSA. Outputs:
 * key_pem: "-----BEGIN EC PRIVATE KEY-----" (or RSA PRIVATE KEY) PEM, a secret;
 * csr_pem: exactly one "CERTIFICATE REQUEST" PEM block ending with a single
 * "\n" after the END line, nothing else (malloc'd, caller frees).
 * Returns 0, or ZM_E_INVAL (cn empty/too long > 64), ZM_E_CRYPTO.
 */
int zm_keycsr_generate(zm_key_alg_t alg, const char *cn, zm_secret_t *key_pem,
                       char **csr_pem);

/* ---- EST cacerts -----------------------------------------------------------
 */

/* Bound on the cacerts body we accept. */
#define ZM_CACERTS_MAX_LEN (1u << 20)

/*
 * Decodes the body of GET /.well-known/est/cacerts: base64 (64-char lines,
 * whitespace tolerated) of a degenerate certs-only PKCS#7 SignedData.
 * Produces a PEM bundle of every certificate in it, in order (malloc'd,
 * caller frees) and the count. Returns 0, or ZM_E_INVAL (bad base64, not
 * PKCS#7, no certificates, too large).
 */
int zm_cacerts_decode(const char *body, size_t len, char **pem_out,
                      size_t *n_certs);

/* ---- identity JSON ---------------------------------------------------------
 */

/*
 * Builds the identity file the OpenZiti SDKs load:
 * {"ztAPI":"<zt_api>","ztAPIs":null,"configTypes":null,
 *  "id":{"key":"pem:<key>","cert":"pem:<cert>","ca":"pem:<ca>"},"enableHa":false}
 * with JSON string escaping. The result holds the private key: a secret.
 * Returns 0 or ZM_E_INVAL (a NULL argument).
 */
int zm_idjson_build(const char *zt_api, const char *key_pem,
                    const char *cert_pem, const char *ca_pem, zm_secret_t *out);

/* ---- helpers ----------------------------------------------------------------
 */

/* Lower-case hex SHA-1 of `der` into out (41 bytes incl. NUL). Returns 0 or
 * ZM_E_CRYPTO. */
int zm_sha1_hex(const uint8_t *der, size_t len, char out[41]);

/* Fills buf with n cryptographically random bytes. Returns 0 or ZM_E_CRYPTO. */
int zm_random_bytes(uint8_t *buf, size_t n);

#endif /* ZM_CRYPTO_H */
