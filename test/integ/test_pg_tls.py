"""DATABASE_URL asking for TLS: the service talks to PostgreSQL over TLS and
verifies the server against the CA the URL names, and refuses a server it
cannot verify. A throwaway cluster with its own CA, made in the test's temp
dir with the openssl CLI."""

import os
import shutil
import subprocess

import grpc
import pytest

import zmtest
from pgfix import PgCluster
from zmtest import pb


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _pki(d):
    """A CA, a server certificate for 127.0.0.1 signed by it, and an
    unrelated second CA."""
    for ca in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", ca + ".key", "-out", ca + ".pem", "-days", "2",
                 "-subj", "/CN=zm test %s" % ca, cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)


@pytest.fixture
def tls_pg(tmp_path):
    pki = str(tmp_path / "pki")
    os.makedirs(pki)
    _pki(pki)
    pg = PgCluster()
    for name in ("server.pem", "server.key"):
        dst = os.path.join(pg.data, name)
        shutil.copy(os.path.join(pki, name), dst)
        os.chmod(dst, 0o600)
        if os.geteuid() == 0:
            shutil.chown(dst, "postgres", "postgres")
    with open(os.path.join(pg.data, "postgresql.conf"), "a") as f:
        f.write("ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n")
    # TLS only: a plaintext connection from 127.0.0.1 is rejected
    with open(os.path.join(pg.data, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
                "hostnossl all all 127.0.0.1/32 reject\n")
    pg.start()
    try:
        yield pg, pki
    finally:
        pg.destroy()


def test_tls_to_the_database(tls_pg, tmp_path):
    pg, pki = tls_pg
    url = "%s?sslmode=verify-full&sslrootcert=%s" % (pg.url, os.path.join(pki, "ca.pem"))
    srv = zmtest.Server(env={"DATABASE_URL": url})
    try:
        srv.start()
        zid = "tls-svc-1"
        stub = srv.stub()
        with pytest.raises(grpc.RpcError) as e:
            stub.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id=zid), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # answered by the database, over TLS
        assert ", TLS" in srv.logtext()  # PQsslInUse on the pool
    finally:
        srv.stop()
    # plaintext is refused by this server: the service must not have fallen back to it
    plain = zmtest.Server(env={"DATABASE_URL": pg.url + "?sslmode=disable"})
    try:
        with pytest.raises(RuntimeError):
            plain.start(timeout=10)
    finally:
        plain.kill()


def test_tls_refuses_a_server_it_cannot_verify(tls_pg):
    pg, pki = tls_pg
    url = "%s?sslmode=verify-full&sslrootcert=%s" % (pg.url, os.path.join(pki, "other.pem"))
    srv = zmtest.Server(env={"DATABASE_URL": url, "DATABASE_CONNECT_TIMEOUT": "0"})
    try:
        with pytest.raises(RuntimeError):
            srv.start(timeout=10)
        log = srv.logtext()
        assert "certificate" in log.lower() or "ssl" in log.lower(), log
        assert url not in log  # the URL is never logged
    finally:
        srv.kill()
