"""RequestServiceIdentity, CreateAgentIdentity and DeleteIdentity against the
real binary and the controller simulator (issue 4).

Every returned service identity is checked the way an OpenZiti SDK would use
it (key matches cert, chain to id.ca, CN, ztAPI, an mTLS handshake against the
simulator's client-cert endpoint); every fault is followed by the invariant
"the simulator holds exactly what the service has a record (or a pending
record) of". The helpers at the top are shared with test_gc.py,
test_crash.py and test/soak/soak.py.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

import zmtest
from zmtest import pb

SVC_TYPES = {1: ("gateway", ["gateway-hosts"]), 2: ("orchestrator", ["orchestrators"]),
             4: ("llm-proxy", ["llm-proxy-hosts"]), 5: ("tracing", ["tracing-hosts"]),
             6: ("runners", ["runners-service-hosts"]), 7: ("egress-gateway", ["egress-gateway-hosts"]),
             8: ("terminal-proxy", ["terminal-proxy-hosts"])}
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

# ============================================================================
# shared helpers
# ============================================================================


def store_records(store_path):
    """(service ids, managed ids, pending names) currently in the store."""
    svc = {r[0] for r in zmtest.query(store_path, "SELECT ziti_identity_id FROM service_identities")}
    man = {r[0] for r in zmtest.query(store_path, "SELECT ziti_identity_id FROM managed_identities")}
    pend = {r[0] for r in zmtest.query(store_path, "SELECT name FROM pending_identities")}
    return svc, man, pend


def tombstones(store_path):
    """Ids in state DELETING (deleting_identities; issue 10). Empty on a
    store without that table (the schema before issue 10)."""
    try:
        return {r[0] for r in zmtest.query(store_path, "SELECT ziti_identity_id FROM deleting_identities")}
    except Exception as e:  # no such table
        if "deleting_identities" in str(e) or "no such table" in str(e):
            return set()
        raise


def invariant_violations(sim, store_path, strict=False):
    """Returns a list of human-readable violations (empty = consistent):
    - an identity on the simulator with neither a committed record, nor a
      pending record of its name, nor a tombstone (DELETING) of its id (a
      leak nothing would ever delete);
    - a committed record whose identity is not on the simulator (wrongly
      deleted / lost);
    - strict: additionally any pending record or tombstone (once recovery
      is done there must be none) and any sim identity that only a pending
      record or a tombstone accounts for.
    Read order: tombstones, then the other records, then the simulator: a
    record only ever moves pending -> live -> deleting -> gone, and the
    controller identity goes only after its tombstone is durable, so no
    false alarm comes from the reads not being one snapshot."""
    tombs = tombstones(store_path)
    svc, man, pend = store_records(store_path)
    tombs |= tombstones(store_path)
    idents = sim.state()["identities"]
    committed = svc | man
    on_sim = {i["id"]: i for i in idents}
    out = []
    for i in idents:
        if i["id"] in committed:
            continue
        if (i["name"] in pend or i["id"] in tombs) and not strict:
            continue
        out.append("leaked: %s (%s) on the simulator has no %srecord" %
                   (i["id"], i["name"], "committed " if strict else ""))
    for z in sorted(committed):
        if z not in on_sim:
            out.append("lost: record %s has no identity on the simulator" % z)
    if strict:
        for n in sorted(pend):
            out.append("pending record left: %s" % n)
        for z in sorted(tombs):
            out.append("tombstone left: %s" % z)
    return out


def wait_invariant(sim, store_path, strict=False, timeout=15.0):
    """The invariant must hold once in-flight work settles; waits up to
    timeout for it, then fails with the violations."""
    deadline = time.monotonic() + timeout
    while True:
        v = invariant_violations(sim, store_path, strict)
        if not v:
            return
        if time.monotonic() > deadline:
            raise AssertionError("invariant violated:\n  " + "\n  ".join(v))
        time.sleep(0.1)


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def load_certs(pem):
    """All certificates of a PEM bundle (cryptography 38 has no
    load_pem_x509_certificates)."""
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)
    return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]


def strip_pem(v):
    assert v.startswith("pem:"), v[:20]
    return v[4:]


def _verify_sig(issuer, cert):
    pub = issuer.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    elif isinstance(pub, rsa.RSAPublicKey):
        pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                   cert.signature_hash_algorithm)
    else:
        raise AssertionError("unexpected issuer key type %r" % type(pub))


def chain_to_ca(leaf, extra, cas):
    """Builds leaf -> ... -> a self-signed CA from `cas` (intermediates may come
    from `extra` or `cas`), verifying every signature. Returns the path."""
    pool = list(extra) + list(cas)
    path = [leaf]
    cur = leaf
    for _ in range(8):
        if cur.issuer == cur.subject and cur in cas:
            _verify_sig(cur, cur)
            return path
        issuers = [c for c in pool if c.subject == cur.issuer and c is not cur]
        assert issuers, "no issuer for %s" % cur.subject.rfc4514_string()
        iss = None
        for c in issuers:
            try:
                _verify_sig(c, cur)
                iss = c
                break
            except Exception:  # noqa: BLE001 - try the next candidate
                continue
        assert iss is not None, "signature of %s does not verify" % cur.subject.rfc4514_string()
        path.append(iss)
        cur = iss
    raise AssertionError("chain too long")


def check_identity(sim, zid, raw_json, tmpdir, type_name=None, roles=None, handshake=True):
    """Proves the identity JSON is usable as an OpenZiti SDK would use it."""
    j = json.loads(raw_json)
    assert set(j) >= {"ztAPI", "id"}, j.keys()
    assert j["ztAPI"] == sim.url + "/edge/client/v1"
    key_pem = strip_pem(j["id"]["key"])
    cert_pem = strip_pem(j["id"]["cert"])
    ca_pem = strip_pem(j["id"]["ca"])
    os.makedirs(tmpdir, exist_ok=True)
    kf, cf, caf = (os.path.join(tmpdir, n) for n in ("id.key", "id.cert", "id.ca"))
    for f, data in ((kf, key_pem), (cf, cert_pem), (caf, ca_pem)):
        with open(f, "w") as fh:
            fh.write(data)
    os.chmod(kf, 0o600)
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    certs = load_certs(cert_pem)
    cas = load_certs(ca_pem)
    leaf = certs[0]
    pub = lambda k: k.public_bytes(serialization.Encoding.DER,  # noqa: E731
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub(key.public_key()) == pub(leaf.public_key()), "key does not match cert"
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [zid]
    path = chain_to_ca(leaf, certs[1:], cas)
    assert len(path) >= 2
    ident = sim.identity(zid)
    if type_name is not None:
        # the Go service's names: svc-<type>-<8 lower-case hex digits>
        assert re.fullmatch("svc-%s-[0-9a-f]{8}" % re.escape(type_name), ident["name"]), ident["name"]
    if roles is not None:
        assert sorted(ident["roleAttributes"] or []) == sorted(roles)
    if handshake:
        r = subprocess.run([OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % sim.mtls_port,
                            "-CAfile", caf, "-cert", cf, "-key", kf, "-quiet", "-verify_return_error"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        out = r.stdout.decode(errors="replace")
        assert "hello %s" % zid in out, (r.returncode, out, r.stderr.decode(errors="replace")[-2000:])
    return j


def dispose(s):
    """Kills a test server and removes its temporary directory."""
    s.kill()
    shutil.rmtree(s.tmp, ignore_errors=True)


def sim_server(sim, env=None, store_path=None):
    return zmtest.Server(sim=sim, env=env, store_path=store_path)


def rpc_code(fn, *a, **kw):
    """Status code of a call (OK or the error's code) and the response/error."""
    try:
        return grpc.StatusCode.OK, fn(*a, **kw)
    except grpc.RpcError as e:
        return e.code(), e


def svc_identities(sim):
    return [i for i in sim.state()["identities"] if i["name"].startswith("svc-")]


# ============================================================================
# fixtures
# ============================================================================


@pytest.fixture
def srv(sim):
    s = sim_server(sim).start()
    yield s
    s.kill()
    shutil.rmtree(s.tmp, ignore_errors=True)


@pytest.fixture
def stub(srv):
    ch = srv.channel()
    yield srv.stub(ch)
    ch.close()


# ============================================================================
# RequestServiceIdentity: happy paths
# ============================================================================


@pytest.mark.parametrize("stype", [1, 2, 4, 5, 6, 7, 8])
def test_request_service_identity_usable(sim, srv, stub, stype, tmp_path):
    name, roles = SVC_TYPES[stype]
    r = stub.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=stype), timeout=30)
    assert r.ziti_identity_id
    check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path), name, roles)
    # enrolled: the one-time token is consumed and the cert authenticator set
    ident = sim.identity(r.ziti_identity_id)
    assert ident["authenticators"].get("cert"), ident["authenticators"]
    assert [i["enrolled"] for i in sim.state()["identities"] if i["id"] == r.ziti_identity_id] == [True]
    # the lease is recorded and can be extended
    rows = zmtest.query(srv.store_path, "SELECT service_type FROM service_identities WHERE ziti_identity_id=?",
                        (r.ziti_identity_id,))
    assert rows == [(stype,)]
    stub.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    wait_invariant(sim, srv.store_path, strict=True)
    # no secret in the log
    log = srv.logtext()
    key_b64 = strip_pem(json.loads(r.identity_json)["id"]["key"]).splitlines()[1]
    assert key_b64 not in log
    assert "BEGIN EC PRIVATE KEY" not in log and "PRIVATE KEY-----" not in log


def test_controller_tls_negotiates_chacha20(sim, tmp_path):
    """The service's TLS contexts list ChaCha20-Poly1305 first (zm/tlsconf.h)
    and the controller, like Go's crypto/tls, follows the client's choice:
    every connection a fresh server opens (management API, the enroll call)
    negotiates it."""
    before = sim.state()["tls_ciphers"]
    s = sim_server(sim).start()
    try:
        ch = s.channel()
        r = s.stub(ch).RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=30)
        ch.close()
        assert r.ziti_identity_id
    finally:
        dispose(s)
    after = sim.state()["tls_ciphers"]
    opened = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    assert opened and set(opened) == {"TLS_CHACHA20_POLY1305_SHA256"}, opened


def test_unknown_service_type(sim, srv, stub):
    for t, why in ((0, "service_type: service type unspecified"), (99, "service_type: unknown service type 99")):
        code, e = rpc_code(stub.RequestServiceIdentity, pb.RequestServiceIdentityRequest(service_type=t), timeout=5)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, t
        assert e.details() == why
    assert sim.state()["identities"] == []
    assert store_records(srv.store_path) == (set(), set(), set())


def test_service_types_extension(sim, tmp_path):
    s = sim_server(sim, env={"SERVICE_TYPES": "4:llm-proxy:llm-proxies"}).start()
    try:
        with s.channel() as ch:
            st = s.stub(ch)
            r = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=4), timeout=30)
            check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path), "llm-proxy", ["llm-proxies"])
            # the built-in types still work next to the extension
            r1 = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=30)
            assert sim.identity(r1.ziti_identity_id)["roleAttributes"] == ["gateway-hosts"]
            # 3 (reserved by the contract) and unknown numbers are refused
            for t in (3, 9):
                code, _ = rpc_code(st.RequestServiceIdentity, pb.RequestServiceIdentityRequest(service_type=t),
                                   timeout=5)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
        wait_invariant(sim, s.store_path, strict=True)
    finally:
        dispose(s)


# ============================================================================
# CreateAgentIdentity / DeleteIdentity
# ============================================================================


def _b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(token, server_cert_file):
    h, c, s = token.split(".")
    header = json.loads(_b64url(h))
    claims = json.loads(_b64url(c))
    sig = _b64url(s)
    with open(server_cert_file, "rb") as f:
        pub = x509.load_pem_x509_certificate(f.read()).public_key()
    msg = (h + "." + c).encode()
    alg = header["alg"]
    if alg.startswith("ES"):
        hl = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}[alg]
        n = len(sig) // 2
        der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
        pub.verify(der, msg, ec.ECDSA(hl))
    elif alg == "RS256":
        pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise AssertionError("unexpected alg " + alg)
    return header, claims


def test_create_agent_identity(sim, srv, stub):
    # (the 32-hex, {...} and urn:uuid: forms are UUIDs too, as google/uuid parses them)
    for bad in ("", "not-a-uuid", "1234", str(uuid.uuid4()) + "x", str(uuid.uuid4()).replace("-", "")[:31]):
        code, _ = rpc_code(stub.CreateAgentIdentity, pb.CreateAgentIdentityRequest(agent_id=bad), timeout=5)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
    agent = str(uuid.uuid4())
    r = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=30)
    _, claims = verify_jwt(r.enrollment_jwt, sim.server_cert_file)
    assert claims["sub"] == r.ziti_identity_id
    assert claims["em"] == "ott"
    assert claims["exp"] > time.time()
    ident = sim.identity(r.ziti_identity_id)
    assert ident["externalId"] == agent
    assert sorted(ident["roleAttributes"]) == sorted(["agents", "agent-" + agent])
    assert ident["name"].startswith("agent-" + agent + "-")
    res = stub.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert res.identity_id == agent and res.identity_type == pb.IDENTITY_TYPE_AGENT
    wait_invariant(sim, srv.store_path, strict=True)
    assert r.enrollment_jwt not in srv.logtext()

    # a second call for the same agent replaces the first identity
    r2 = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent.upper()), timeout=30)
    assert r2.ziti_identity_id != r.ziti_identity_id
    ids = {i["id"] for i in sim.state()["identities"]}
    assert r.ziti_identity_id not in ids and r2.ziti_identity_id in ids
    code, _ = rpc_code(stub.ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    res = stub.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r2.ziti_identity_id), timeout=5)
    assert res.identity_id == agent
    wait_invariant(sim, srv.store_path, strict=True)


def test_delete_identity(sim, srv, stub):
    code, _ = rpc_code(stub.DeleteIdentity, pb.DeleteIdentityRequest(ziti_identity_id=""), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # idempotent (the contract, as the Go service's newest version): no mapping is OK
    code, _ = rpc_code(stub.DeleteIdentity, pb.DeleteIdentityRequest(ziti_identity_id="nope"), timeout=5)
    assert code == grpc.StatusCode.OK
    a = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=str(uuid.uuid4())), timeout=30)
    b = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=str(uuid.uuid4())), timeout=30)
    stub.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=a.ziti_identity_id), timeout=10)
    ids = {i["id"] for i in sim.state()["identities"]}
    assert a.ziti_identity_id not in ids and b.ziti_identity_id in ids
    code, _ = rpc_code(stub.ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=a.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = rpc_code(stub.DeleteIdentity, pb.DeleteIdentityRequest(ziti_identity_id=a.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.OK
    # already gone on the controller: still OK, mapping removed
    _delete_on_sim(sim, b.ziti_identity_id)
    stub.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=b.ziti_identity_id), timeout=10)
    code, _ = rpc_code(stub.ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=b.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    wait_invariant(sim, srv.store_path, strict=True)
    assert store_records(srv.store_path) == (set(), set(), set())


def _delete_on_sim(sim, zid):
    """Deletes an identity on the simulator behind the service's back, through
    the management API with the admin cert (the control API has no delete)."""
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=sim.ca_file)
    ctx.load_cert_chain(sim.cert_file, sim.key_file)
    conn = http.client.HTTPSConnection("127.0.0.1", sim.port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/edge/management/v1/authenticate?method=cert", body=b"{}",
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        tok = r.getheader("Zt-Session")
        conn.request("DELETE", "/edge/management/v1/identities/" + zid, headers={"Zt-Session": tok})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    finally:
        conn.close()


# ============================================================================
# faults
# ============================================================================

IDS = "/edge/management/v1/identities"
ENROLL = "/edge/client/v1/enroll"


def _req(stub, stype=1, timeout=30):
    t0 = time.monotonic()
    code, r = rpc_code(stub.RequestServiceIdentity, pb.RequestServiceIdentityRequest(service_type=stype),
                       timeout=timeout)
    return code, r, time.monotonic() - t0


def _warm(stub):
    """One enrollment first: session, server cert and CA bundle are known."""
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.OK, r
    return r.ziti_identity_id


def test_fault_500_on_create(sim, srv, stub):
    _warm(stub)
    sim.faults({"rules": [{"method": "POST", "path_prefix": IDS, "action": "status", "status": 500, "count": 1}]})
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.UNAVAILABLE, r
    assert len(svc_identities(sim)) == 1
    wait_invariant(sim, srv.store_path, strict=True)


def test_fault_500_after_create_applied(sim, srv, stub):
    """The controller created the identity but the answer was a 500: the
    saga must find it by name and delete it."""
    _warm(stub)
    sim.faults({"rules": [{"method": "POST", "path_prefix": IDS, "action": "status", "status": 500,
                           "count": 1, "apply": True}]})
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.UNAVAILABLE, r
    assert len(svc_identities(sim)) == 1
    wait_invariant(sim, srv.store_path, strict=True)


def test_fault_500_on_jwt_fetch_compensates(sim, srv, stub):
    _warm(stub)
    before = sim.counter("DELETE /edge/management/v1/identities/{id}")
    sim.faults({"rules": [{"method": "GET", "path_prefix": IDS + "/", "action": "status", "status": 500,
                           "count": 1}]})
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.UNAVAILABLE, r
    assert sim.counter("DELETE /edge/management/v1/identities/{id}") == before + 1
    assert len(svc_identities(sim)) == 1  # only the warm-up one
    wait_invariant(sim, srv.store_path, strict=True)


def test_fault_500_on_enroll_compensates(sim, srv, stub):
    _warm(stub)
    sim.faults({"rules": [{"method": "POST", "path_prefix": ENROLL, "action": "status", "status": 500,
                           "count": 1}]})
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.UNAVAILABLE, r
    assert len(svc_identities(sim)) == 1
    wait_invariant(sim, srv.store_path, strict=True)


def test_fault_429_retry_after_succeeds(sim, srv, stub, tmp_path):
    _warm(stub)
    sim.faults({"rules": [{"method": "POST", "path_prefix": IDS, "action": "status", "status": 429,
                           "retry_after": 1, "count": 1}]})
    code, r, dt = _req(stub)
    assert code == grpc.StatusCode.OK, r
    assert dt >= 0.9, "Retry-After: 1 was not honoured (%.3fs)" % dt
    assert sim.state()["faults_applied"] >= 1
    check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path), "gateway", ["gateway-hosts"])
    wait_invariant(sim, srv.store_path, strict=True)


DROP_CASES = [(IDS, "POST", False), (IDS, "POST", True), (IDS + "/", "GET", False), (ENROLL, "POST", False),
              (ENROLL, "POST", True)]


@pytest.mark.parametrize("path,method,apply", DROP_CASES)
@pytest.mark.parametrize("action", ["drop", "drop_mid"])
def test_fault_dropped_connection(sim, srv, stub, path, method, apply, action, tmp_path):
    _warm(stub)
    sim.faults({"rules": [{"method": method, "path_prefix": path, "action": action, "count": 1,
                           "apply": apply}]})
    code, r, _ = _req(stub)
    assert sim.state()["faults_applied"] == 1
    # whatever the outcome, it is consistent: compensated or committed
    if code == grpc.StatusCode.OK:
        check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path), handshake=False)
        assert len(svc_identities(sim)) == 2
    else:
        wait_for(lambda: len(svc_identities(sim)) == 1, 10, "compensation")
    # A create that got no answer at all may still land on a real controller
    # later: its pending record stays for recovery instead of being dropped
    # on a lookup that came too early (see saga.c create_answered).
    unanswered_create = path == IDS and method == "POST" and action == "drop"
    wait_invariant(sim, srv.store_path, strict=not unanswered_create)
    # a create or enroll POST is never re-sent blindly (it may have been
    # carried out): the caller sees UNAVAILABLE, not a confusing INTERNAL
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (code, r.details())
    if action == "drop_mid" and method == "POST" and apply:
        # a response had started: never re-sent, the caller is told to retry
        assert code == grpc.StatusCode.UNAVAILABLE


def test_fault_latency_beyond_deadline(sim, srv, stub):
    _warm(stub)
    sim.faults({"rules": [{"method": "GET", "path_prefix": IDS + "/", "action": "delay", "ms": 3000,
                           "count": 1}]})
    code, r, _ = _req(stub, timeout=1.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, r
    # the service compensates on its own (the caller is gone already)
    wait_for(lambda: len(svc_identities(sim)) == 1, 10, "the half-created identity to be compensated")
    wait_invariant(sim, srv.store_path, strict=True)
    assert "deadline exceeded" in srv.logtext()


# Issue 10 timing for tests that wait for recovery: a pending record resolves
# after intent + saga deadline + ZITI_REQUEST_TIMEOUT + margin (~7.4 s with a
# 200 ms flush interval), tombstones are retried at every recovery sweep.
FAST_RECOVERY = {"ZITI_REQUEST_TIMEOUT": "2s", "ENROLLMENT_TIMEOUT": "3s", "LEASE_FLUSH_INTERVAL": "200ms",
                 "SERVICE_IDENTITY_GC_INTERVAL": "500ms"}


@pytest.fixture
def fast_srv(sim):
    s = sim_server(sim, env=FAST_RECOVERY).start()
    yield s
    s.kill()
    shutil.rmtree(s.tmp, ignore_errors=True)


@pytest.fixture
def fast_stub(fast_srv):
    ch = fast_srv.channel()
    yield fast_srv.stub(ch)
    ch.close()


def test_fault_create_unanswered_then_lands_late_no_leak(sim, fast_srv, fast_stub):
    srv, stub = fast_srv, fast_stub
    """The create got no answer before the deadline: a real controller may
    still execute it after the saga looked the name up and found nothing.
    The pending record must stay for recovery, or that identity would leak.
    (The simulator drops a delayed request whose client went away, so the
    late landing is emulated by creating the identity with that name through
    the control API after the compensation ran.)"""
    _warm(stub)
    sim.faults({"rules": [{"method": "POST", "path_prefix": IDS, "action": "delay", "ms": 2500, "count": 1}]})
    fut = stub.RequestServiceIdentity.future(pb.RequestServiceIdentityRequest(service_type=1), timeout=1.0)
    names = set()
    while not fut.done():
        names |= store_records(srv.store_path)[2]
        time.sleep(0.02)
    assert fut.exception() is not None and fut.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(names) == 1, names
    (name,) = names
    time.sleep(0.5)  # the service's compensation (lookup by name) is done
    late = sim.seed_identity(name, role_attributes=["gateway-hosts"])["id"]
    wait_invariant(sim, srv.store_path, timeout=1)  # accounted for by the pending record
    assert "may still land" in srv.logtext()
    assert name in store_records(srv.store_path)[2]
    # start-up recovery of the next process resolves it
    assert srv.stop() == 0
    s2 = sim_server(sim, store_path=srv.store_path, env=FAST_RECOVERY).start()
    try:
        wait_for(lambda: not store_records(s2.store_path)[2], 30, "recovery")
        assert late not in {i["id"] for i in sim.state()["identities"]}
        wait_invariant(sim, s2.store_path, strict=True)
    finally:
        dispose(s2)


def test_fault_latency_beyond_enrollment_timeout(sim):
    """Server-side bound (ENROLLMENT_TIMEOUT) with a patient caller: the
    service itself answers DEADLINE_EXCEEDED and compensates."""
    s = sim_server(sim, env={"ENROLLMENT_TIMEOUT": "1500ms"}).start()
    try:
        with s.channel() as ch:
            st = s.stub(ch)
            _warm(st)
            sim.faults({"rules": [{"method": "POST", "path_prefix": ENROLL, "action": "delay", "ms": 3000,
                                   "count": 1}]})
            # the caller allows 20 s: DEADLINE_EXCEEDED comes from the service
            code, r, _ = _req(st, timeout=20)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, r
            wait_for(lambda: len(svc_identities(sim)) == 1, 10, "compensation")
            wait_invariant(sim, s.store_path, strict=True)
    finally:
        dispose(s)


def test_fault_refused_fast(sim, srv, stub):
    _warm(stub)
    sim.refuse(True)
    try:
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the refusal is reported, not
        # waited out (no time is asserted; that is bench/'s business)
        code, r, _ = _req(stub, timeout=20)
        assert code == grpc.StatusCode.UNAVAILABLE, r
        # nothing was created; the pending record may stay for recovery
        wait_invariant(sim, srv.store_path)
    finally:
        sim.refuse(False)
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.OK, r
    wait_invariant(sim, srv.store_path)


def test_session_expiry_mid_flow(sim, srv, stub, tmp_path):
    _warm(stub)
    auth0 = sim.counter("POST /edge/management/v1/authenticate")
    # the JWT fetch is held for 600 ms; the session expires meanwhile, so the
    # request itself is answered 401 and the client must re-authenticate
    sim.faults({"rules": [{"method": "GET", "path_prefix": IDS + "/", "action": "delay", "ms": 600,
                           "count": 1}]})
    out = {}
    t = threading.Thread(target=lambda: out.update(res=_req(stub)))
    t.start()
    time.sleep(0.3)
    sim.expire_sessions()
    t.join(30)
    code, r, _ = out["res"]
    assert code == grpc.StatusCode.OK, r
    assert sim.counter("POST /edge/management/v1/authenticate") > auth0
    check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path), handshake=False)
    # and once more between calls
    sim.expire_sessions()
    code, r, _ = _req(stub)
    assert code == grpc.StatusCode.OK, r
    wait_invariant(sim, srv.store_path, strict=True)


# ============================================================================
# load: 200 concurrent enrollments, ResolveIdentity p99 meanwhile
# ============================================================================

HAMMER = r"""
import os, sys, time, json
sys.path.insert(0, sys.argv[1])
import zmtest
from zmtest import pb
addr, zid, stop_file = sys.argv[2], sys.argv[3], sys.argv[4]
import grpc, os
lat = []
with grpc.insecure_channel(addr) as ch:
    st = zmtest.pb_grpc.ZitiManagementServiceStub(ch)
    req = pb.ResolveIdentityRequest(ziti_identity_id=zid)
    for _ in range(200):
        st.ResolveIdentity(req, timeout=5)   # warm-up
    print("ready", flush=True)
    while not os.path.exists(stop_file):
        t0 = time.perf_counter()
        r = st.ResolveIdentity(req, timeout=5)
        lat.append(time.perf_counter() - t0)
        assert r.identity_id == "a9e1c0de-0000-4000-8000-000000000001"
print(json.dumps(lat), flush=True)
"""


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def test_200_concurrent_enrollments_all_valid_while_resolving(sim, tmp_path):
    s = zmtest.Server(sim=sim)
    # a mapping for ResolveIdentity, backed by a real identity on the simulator
    seeded = sim.seed_identity("agent-seeded", external_id="a9e1c0de-0000-4000-8000-000000000001")
    zmtest.seed(s.store_path, managed=[(seeded["id"], "a9e1c0de-0000-4000-8000-000000000001", 1)])
    s.start()
    with s.channel() as ch:
        _warm(s.stub(ch))  # also starts libuv's thread pool (key generation)
    # The ResolveIdentity latency printed here is informational: a timed
    # assertion on a shared 2-core CI box would be a flaky test. The p99
    # requirement is measured by the benchmark (bench/run.sh, recorded in
    # bench/RESULTS.md); this test proves correctness under the same load.
    stop_file = str(tmp_path / "stop")
    hammer = subprocess.Popen([sys.executable, "-c", HAMMER, os.path.dirname(os.path.abspath(__file__)), s.addr,
                               seeded["id"], stop_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ))
    try:
        assert hammer.stdout.readline().strip() == b"ready"
        n = 200
        chans = [s.channel() for _ in range(4)]
        stubs = [s.stub(c) for c in chans]
        t0 = time.monotonic()
        futs = [stubs[i % 4].RequestServiceIdentity.future(pb.RequestServiceIdentityRequest(service_type=(1, 2, 4)[i % 3]),
                                                           timeout=120) for i in range(n)]
        results = []
        for f in futs:
            results.append(f.result())
        wall = time.monotonic() - t0
        open(stop_file, "w").close()
        out, err = hammer.communicate(timeout=60)
        assert hammer.returncode == 0, err.decode()[-3000:]
        lat = json.loads(out.decode().splitlines()[-1])
        for c in chans:
            c.close()
        ids = [r.ziti_identity_id for r in results]
        assert len(set(ids)) == n
        for i, r in enumerate(results):
            tname, roles = SVC_TYPES[(1, 2, 4)[i % 3]]
            check_identity(sim, r.ziti_identity_id, r.identity_json, str(tmp_path / ("id%d" % i)), tname, roles,
                           handshake=(i % 20 == 0))
        p50, p99 = _pct(lat, 50) * 1000, _pct(lat, 99) * 1000
        msg = ("200 concurrent enrollments in %.2fs; ResolveIdentity during them: %d samples, p50 %.3f ms, "
               "p99 %.3f ms, max %.3f ms" % (wall, len(lat), p50, p99, max(lat) * 1000))
        print("\n" + msg)
        with open(os.path.join(zmtest._build_dir(), "enroll_bench.txt"), "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        assert len(lat) > 0, "ResolveIdentity made no progress during the enrollments"
        svc, _, pend = store_records(s.store_path)
        assert set(ids) <= svc and not pend
        assert len(svc_identities(sim)) == n + 1
        wait_invariant(sim, s.store_path, strict=True)
    finally:
        if hammer.poll() is None:
            hammer.kill()
            hammer.wait()
        dispose(s)


def test_agent_replacement_when_controller_delete_fails_leaks_nothing(sim, fast_srv, fast_stub):
    """The previous identity must never be left on the controller without a
    record when its delete fails. Since issue 10 the replacement retires it
    first (LIVE -> DELETING: the mapping goes and a tombstone is recorded in
    one unit), so a failed delete leaves the tombstone, which recovery
    retries until the controller has deleted it (the soak once caught an
    order that left it with no record at all)."""
    srv, stub = fast_srv, fast_stub
    agent = "7d1f3c2a-5b6e-4f70-8a91-b2c3d4e5f607"
    first = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=30)
    sim.faults({"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "status", "status": 500,
                           "count": 1}]})
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # the old identity still exists and is accounted for: nothing leaked
    assert invariant_violations(sim, srv.store_path) == []
    sim.faults({})
    # DELETING: it no longer resolves, and the retried delete finishes it
    code, _ = rpc_code(stub.ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=first.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    wait_invariant(sim, srv.store_path, strict=True, timeout=20)
    assert first.ziti_identity_id not in {i["id"] for i in sim.state()["identities"]}
    # a retry replaces it
    second = stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=30)
    assert second.ziti_identity_id != first.ziti_identity_id
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=first.ziti_identity_id), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    wait_invariant(sim, srv.store_path, strict=True)
