"""zmctl over TLS and mTLS against the real service's TLS listener (a CA,
server and client certificates made with openssl in the test's temp dir):
a verified server and a client certificate get answers; no client
certificate gets UNAUTHENTICATED (exit 8) except for health; a server from
another CA fails the handshake (exit 3)."""

import os
import subprocess
import time

import zmtest
from sectest import Pki


def zmctl_bin():
    return os.path.join(zmtest._build_dir(), "zmctl")


def zmctl(*args, timeout=20):
    r = subprocess.run([zmctl_bin(), "--timeout", "5s"] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def test_zmctl_tls_and_mtls(tmp_path):
    d = str(tmp_path)
    pki = Pki(d, "ca")
    other = Pki(d, "other")
    srv_crt, srv_key = pki.server_cert()
    cli_crt, cli_key = pki.issue("client", "zm-ops", ["URI:spiffe://test/ops"])
    policy = os.path.join(d, "policy.json")
    with open(policy, "w") as f:
        f.write('{"rules": [{"name": "ops", "principals": ["uri:spiffe://test/ops"], "methods": ["*"]}]}')
    s = zmtest.Server(env={"GRPC_TLS_CERT_FILE": srv_crt, "GRPC_TLS_KEY_FILE": srv_key,
                           "GRPC_TLS_CLIENT_CA_FILE": pki.ca, "GRPC_AUTHZ_POLICY_FILE": policy})
    try:
        s.start(wait=False)
        addr = ["--addr", "localhost:%d" % s.port, "--tls", "--cacert", pki.ca]
        mtls = addr + ["--cert", cli_crt, "--key", cli_key]
        deadline = time.monotonic() + 30
        while True:
            rc, out, err = zmctl(*(mtls + ["health"]))
            if rc == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (rc, out) == (0, "SERVING"), (rc, out, err, s.logtext()[-3000:])
        # mTLS: the call reaches the store (an unknown id: NOT_FOUND, exit 4)
        rc, out, err = zmctl(*(mtls + ["extend-lease", "no-such-id"]))
        assert rc == 4, (rc, out, err)
        rc, out, err = zmctl(*(mtls + ["--json", "list"]))
        assert rc == 0 and out.startswith("{"), (rc, out, err)
        # TLS without a client certificate: health only
        rc, out, err = zmctl(*(addr + ["health"]))
        assert (rc, out) == (0, "SERVING"), (rc, out, err)
        rc, out, err = zmctl(*(addr + ["extend-lease", "no-such-id"]))
        assert rc == 8, (rc, out, err)  # UNAUTHENTICATED
        # a server this CA bundle does not vouch for: the handshake fails
        rc, out, err = zmctl("--addr", "localhost:%d" % s.port, "--tls", "--cacert", other.ca, "health")
        assert rc == 3, (rc, out, err)
        # plaintext against the TLS-only listener: no gRPC status either
        rc, out, err = zmctl("--addr", "127.0.0.1:%d" % s.port, "health")
        assert rc == 3, (rc, out, err)
    finally:
        s.kill()
