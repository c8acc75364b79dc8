/* security.c - loading TLS material and the authorization policy as one
 * unit (start-up and SIGHUP reload): all or nothing. */
#include "zm/authz.h"
#include "zm/grpc.h"

#include <stdio.h>
#include <string.h>

static int set(const char *s) { return s != NULL && s[0] != '\0'; }

/* Methods a policy may name: at most this many are served. */
#define MAX_METHODS 64

int zm_grpc_server_load_security(zm_grpc_server_t *srv,
                                 const zm_grpc_security_t *sec, char *err,
                                 size_t errlen) {
  int tls = set(sec->cert_file) || set(sec->key_file);
  if (tls && !(set(sec->cert_file) && set(sec->key_file))) {
    snprintf(err, errlen,
             "GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE must be set together");
    return ZM_E_INVAL;
  }
  if (set(sec->client_ca_file) && !tls) {
    snprintf(err, errlen,
             "GRPC_TLS_CLIENT_CA_FILE needs GRPC_TLS_CERT_FILE "
             "and GRPC_TLS_KEY_FILE");
    return ZM_E_INVAL;
  }
  if (tls != zm_grpc_server_tls_enabled(srv) && zm_grpc_server_port(srv) != 0) {
    snprintf(err, errlen, "TLS cannot be switched %s without a restart",
             tls ? "on" : "off");
    return ZM_E_INVAL;
  }
  /* the policy first: it cannot fail after the TLS context is swapped */
  zm_authz_t *authz = NULL;
  if (set(sec->policy_file)) {
    const char *paths[MAX_METHODS];
    size_t n = zm_grpc_server_methods(srv, paths, MAX_METHODS);
    zm_authz_known_t known = {paths, n, sec->scopes, sec->n_scopes};
    int rv = zm_authz_load(&authz, sec->policy_file, &known, err, errlen);
    if (rv != 0)
      return rv;
  }
  if (tls) {
    int rv = zm_grpc_server_set_tls(srv, sec->cert_file, sec->key_file,
                                    sec->client_ca_file, err, errlen);
    if (rv != 0) {
      zm_authz_free(authz);
      return rv;
    }
  }
  zm_grpc_server_set_authz(srv, authz);
  return 0;
}
