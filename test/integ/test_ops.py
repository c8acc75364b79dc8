"""Operating the service (issue 14): Prometheus metrics and probes, gRPC
server reflection, Health/Watch, zmctl, drop-in start-up (self-enrollment
from a JWT file, ZITI_IDENTITY_NAME_RESOLVE), flags and configuration errors,
JSON logs. Real clients only: prometheus_client's text parser, grpcio,
a reflection client on grpcio (grpcreflect.py), the zmctl binary.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import grpcreflect
import zmtest
from zmtest import pb

SVC = zmtest.SVC


def zmctl_bin():
    return os.path.join(os.environ.get("ZM_BUILD_DIR") or os.path.join(zmtest.REPO, "build"), "zmctl")


def zmctl(addr, *args, timeout=60):
    p = subprocess.run([zmctl_bin(), "--addr", addr] + list(args), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def metrics_server(sim=None, env=None):
    mport = zmtest.free_port()
    e = {"METRICS_ADDRESS": "127.0.0.1:%d" % mport}
    e.update(env or {})
    s = zmtest.Server(sim=sim, env=e)
    s.mport = mport
    return s


def http_get(port, path, method="GET", timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        c.close()


def wait_ready(port, timeout=30):
    """Polls /readyz the way a readiness probe does: right after start-up the
    server may still be on its first heartbeat or controller exchange, and a
    busy machine stretches that. Returns the last (status, body)."""
    deadline = time.time() + timeout
    while True:
        st, body, _ = http_get(port, "/readyz")
        if st == 200 or time.time() > deadline:
            return st, body
        time.sleep(0.1)


def scrape(port):
    st, body, hdrs = http_get(port, "/metrics")
    assert st == 200
    assert hdrs["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def handled(samples, method, code):
    return val(samples, "grpc_server_handled_total", grpc_service=SVC, grpc_method=method, grpc_code=code)


# ============================================================================
# metrics and probes
# ============================================================================


def test_metrics_match_traffic():
    s = metrics_server()
    try:
        s.start()
        zid = "zid-" + uuid.uuid4().hex[:8]
        with s.channel() as ch:
            st = s.stub(ch)
            before = scrape(s.mport)
            for _ in range(7):
                with pytest.raises(grpc.RpcError) as ei:
                    st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=zid), timeout=5)
                assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as ei:
                    st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=""), timeout=5)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for _ in range(5):
                with pytest.raises(grpc.RpcError):
                    st.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id=zid), timeout=5)
            with pytest.raises(grpc.RpcError) as ei:
                ch.unary_unary("/nope.Svc/Nope")(b"", timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        after = scrape(s.mport)
        assert handled(after, "ResolveIdentity", "NOT_FOUND") - handled(before, "ResolveIdentity", "NOT_FOUND") == 7
        assert handled(after, "ResolveIdentity", "INVALID_ARGUMENT") - \
            handled(before, "ResolveIdentity", "INVALID_ARGUMENT") == 3
        assert handled(after, "ExtendIdentityLease", "NOT_FOUND") - \
            handled(before, "ExtendIdentityLease", "NOT_FOUND") == 5
        assert val(after, "grpc_server_handled_total", grpc_service="unknown", grpc_method="unknown",
                   grpc_code="UNIMPLEMENTED") >= 1
        # the histogram counts the same calls
        cnt = val(after, "grpc_server_handling_seconds_count", grpc_service=SVC, grpc_method="ResolveIdentity")
        inf = val(after, "grpc_server_handling_seconds_bucket", grpc_service=SVC, grpc_method="ResolveIdentity",
                  le="+Inf")
        assert cnt == inf == 10
        assert 0 < val(after, "grpc_server_handling_seconds_sum", grpc_service=SVC,
                       grpc_method="ResolveIdentity") < 10
        assert val(after, "grpc_server_inflight_calls", grpc_service=SVC, grpc_method="ResolveIdentity") == 0
        assert any(k[0] == "zm_build_info" for k in after)
        assert val(after, "zm_ready") == 1
        assert val(after, "zm_grpc_connections_accepted_total") >= 2
        assert val(after, "zm_store_heartbeats_total") >= 1
        assert val(after, "zm_controller_configured") == 0
        # a scrape is not a gRPC call, and another scrape counts itself
        assert val(after, "zm_metrics_scrapes_total") == val(before, "zm_metrics_scrapes_total") + 1
    finally:
        s.kill()


def test_controller_and_enrollment_metrics(sim):
    s = metrics_server(sim=sim)
    try:
        s.start()
        with s.channel() as ch:
            r = s.stub(ch).RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=60)
            assert r.ziti_identity_id
        m = scrape(s.mport)
        assert val(m, "zm_enrollments_total", outcome="ok") == 1
        assert val(m, "zm_enrollments_started_total") == 1
        assert val(m, "zm_enrollments_in_state", state="CREATE") == 0
        # one JWT check and one key + CSR ran on the crypto threads, each
        # charged the CPU it took there
        assert val(m, "zm_enroll_crypto_steps_total", step="verify_jwt") == 1
        assert val(m, "zm_enroll_crypto_steps_total", step="keygen_csr") == 1
        assert val(m, "zm_enroll_crypto_cpu_seconds_total", step="verify_jwt") > 0
        assert val(m, "zm_enroll_crypto_cpu_seconds_total", step="keygen_csr") > 0
        assert val(m, "zm_controller_requests_total", endpoint="create_identity", code="201") == 1
        assert val(m, "zm_controller_requests_total", endpoint="enroll", code="200") == 1
        assert val(m, "zm_controller_requests_total", endpoint="authenticate", code="200") >= 1
        assert val(m, "zm_controller_request_duration_seconds_count", endpoint="create_identity") == 1
        assert val(m, "zm_controller_up") == 1
        # the controller connections' TLS handshakes ran on the crypto
        # threads (a ClientHello step and at least one more per connection)
        hs = val(m, "zm_controller_tls_handshake_steps_total", where="workers")
        assert hs >= 2 * val(m, "zm_controller_connects_total") > 0
        assert val(m, "zm_controller_tls_handshake_steps_total", where="loop") == 0
        assert handled(m, "RequestServiceIdentity", "OK") == 1
        assert val(m, "zm_store_commit_seconds_count") >= 1
        assert val(m, "zm_store_commit_units_sum") >= 1
        st, body, _ = http_get(s.mport, "/readyz")
        assert st == 200 and body == "ready\n"
        # the controller goes away: an exchange fails in transport -> unready
        sim.refuse(True)
        try:
            with s.channel() as ch:
                with pytest.raises(grpc.RpcError):
                    s.stub(ch).RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=20)
            st, body, _ = http_get(s.mport, "/readyz")
            assert st == 503 and "controller unreachable" in body
            m = scrape(s.mport)
            assert val(m, "zm_controller_up") == 0
            assert val(m, "zm_controller_requests_total", endpoint="create_identity", code="error") >= 1 or \
                sum(v for k, v in m.items() if k[0] == "zm_controller_requests_total" and
                    ("code", "error") in k[1]) >= 1
        finally:
            sim.refuse(False)
    finally:
        s.kill()


def test_probes_and_drain(sim):
    """/healthz stays live; /readyz turns unready as soon as the drain starts
    (a call held in flight keeps the process draining)."""
    s = metrics_server(sim=sim, env={"SHUTDOWN_GRACE": "20s"})
    try:
        s.start()
        assert http_get(s.mport, "/healthz")[:2] == (200, "ok\n")
        assert wait_ready(s.mport) == (200, "ready\n")
        sim.faults({"rules": [{"method": "POST", "path_prefix": "/edge/management/v1/identities",
                               "action": "delay", "ms": 4000, "apply": True}]})
        result = {}

        def slow():
            with s.channel() as ch:
                try:
                    s.stub(ch).RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1),
                                                      timeout=30)
                    result["ok"] = True
                except grpc.RpcError as e:
                    result["err"] = e.code()

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        st, body, _ = http_get(s.mport, "/readyz")
        assert st == 503 and "draining" in body
        assert http_get(s.mport, "/healthz")[0] == 200
        m = scrape(s.mport)
        assert val(m, "zm_draining") == 1 and val(m, "zm_ready") == 0
        assert val(m, "grpc_server_inflight_calls", grpc_service=SVC, grpc_method="RequestServiceIdentity") == 1
        t.join(30)
        assert s.proc.wait(30) == 0
        assert result.get("ok")
    finally:
        sim.clear_faults()
        s.kill()


@zmtest.pg_only
def test_readyz_store_down():
    pg_cluster = zmtest.pg_cluster()  # the session's cluster, restarted below
    s = metrics_server()
    try:
        s.start()
        assert wait_ready(s.mport) == (200, "ready\n")
        pg_cluster.stop()
        deadline = time.time() + 20
        while time.time() < deadline:
            st, body, _ = http_get(s.mport, "/readyz")
            if st == 503:
                assert "heartbeat" in body or "store" in body
                break
            time.sleep(0.3)
        else:
            pytest.fail("readyz stayed ready with the database down")
    finally:
        pg_cluster.start()
        s.kill()


def test_metrics_listener_bounds():
    s = metrics_server()
    try:
        s.start()
        p = s.mport
        assert http_get(p, "/nope")[0] == 404
        assert http_get(p, "/metrics", method="POST")[0] == 405
        st, body, _ = http_get(p, "/metrics", method="HEAD")
        assert st == 200 and body == ""
        assert http_get(p, "/metrics?x=1")[0] == 200
        # keep-alive: two requests on one connection, pipelined
        c = socket.create_connection(("127.0.0.1", p), timeout=5)
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            chunk = c.recv(4096)
            assert chunk
            data += chunk
        c.close()
        # an oversized head is refused (431, then the connection closes; the
        # close may overtake the answer as a reset while we are still sending)
        c = socket.create_connection(("127.0.0.1", p), timeout=5)
        try:
            c.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 431")
        except (ConnectionResetError, BrokenPipeError):
            pass
        c.close()
        m = scrape(p)
        assert val(m, "zm_metrics_rejected_connections_total") == 0
        # garbage
        c = socket.create_connection(("127.0.0.1", p), timeout=5)
        c.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 400")
        c.close()
        # bounded connections: idle sockets beyond the limit are closed at once
        socks = [socket.create_connection(("127.0.0.1", p), timeout=5) for _ in range(24)]
        time.sleep(0.3)
        closed = 0
        for so in socks:
            so.settimeout(0.2)
            try:
                if so.recv(1) == b"":
                    closed += 1
            except socket.timeout:
                pass
        assert closed >= 8
        # the gRPC side is not disturbed meanwhile
        with s.channel() as ch:
            with pytest.raises(grpc.RpcError) as ei:
                s.stub(ch).ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id="x"), timeout=5)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        for so in socks:
            so.close()
        time.sleep(0.5)  # the server sees those closes and frees their slots
        # a slow client (half a request, then nothing) is closed after the timeout
        c = socket.create_connection(("127.0.0.1", p), timeout=15)
        c.sendall(b"GET /metrics HTTP/1.1\r\n")
        t0 = time.time()
        assert c.recv(100) == b""
        assert 8 <= time.time() - t0 <= 13
        c.close()
        assert http_get(p, "/healthz")[0] == 200
    finally:
        s.kill()


# ============================================================================
# Health/Watch and reflection
# ============================================================================


def test_health_watch_sees_drain():
    s = zmtest.Server(env={"SHUTDOWN_GRACE": "10s"})
    try:
        s.start()
        ch = s.channel()
        got = []
        h = zmtest.HealthStub(ch)
        stream = h.Watch(zmtest.health_pb2.HealthCheckRequest(service=""), timeout=30)
        unknown = list(h.Watch(zmtest.health_pb2.HealthCheckRequest(service="nope"), timeout=2).__iter__()
                       .__next__().__class__.__mro__) and None
        first = next(stream)
        got.append(first.status)
        assert first.status == zmtest.health_pb2.HealthCheckResponse.SERVING
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ei:
            for r in stream:
                got.append(r.status)
        assert got == [zmtest.health_pb2.HealthCheckResponse.SERVING,
                       zmtest.health_pb2.HealthCheckResponse.NOT_SERVING]
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert s.proc.wait(15) == 0
        ch.close()
        del unknown
    finally:
        s.kill()


def test_health_watch_unknown_service():
    s = zmtest.Server()
    try:
        s.start()
        with s.channel() as ch:
            stream = zmtest.HealthStub(ch).Watch(zmtest.health_pb2.HealthCheckRequest(service="nope"), timeout=3)
            r = next(stream)
            assert r.status == zmtest.health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            stream.cancel()
    finally:
        s.kill()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_list_describe_call(version):
    s = zmtest.Server()
    try:
        s.start()
        zid = "zid-" + uuid.uuid4().hex[:10]
        iid = str(uuid.uuid4())
        zmtest.seed(s.store_path, managed=[(zid, iid, 2)])
        s.kill()
        s.start()
        with s.channel() as ch:
            r = grpcreflect.Reflector(ch, version)
            services = r.list_services()
            assert SVC in services
            assert "grpc.health.v1.Health" in services
            assert "grpc.reflection.v1.ServerReflection" in services
            assert "grpc.reflection.v1alpha.ServerReflection" in services
            d = r.describe(SVC)
            assert "rpc ResolveIdentity(agynio.api.ziti_management.v1.ResolveIdentityRequest)" in d
            svc = r.service(SVC)
            # exactly the methods of the contract the tests were generated from
            want = {m.name for m in pb.DESCRIPTOR.services_by_name["ZitiManagementService"].methods}
            assert len(want) == 29
            assert {m.name for m in svc.methods} == want
            # imports come along (timestamp.proto for ManagedIdentity.created_at)
            assert "google/protobuf/timestamp.proto" in r.files
            # symbols of every kind resolve to their file
            for sym in [SVC + ".ResolveIdentity", "agynio.api.ziti_management.v1.ManagedIdentity",
                        "agynio.api.identity.v1.IDENTITY_TYPE_RUNNER",
                        "agynio.api.ziti_management.v1.ManagedIdentity.identity_id",
                        "grpc.health.v1.HealthCheckResponse.ServingStatus"]:
                assert r.file_containing_symbol(sym)
            with pytest.raises(KeyError, match="5 (symbol|file) not found"):
                r.file_containing_symbol("no.such.Symbol")
            with pytest.raises(KeyError, match="5 (symbol|file) not found"):
                r.file_by_filename("no/such.proto")
            assert r.file_by_filename("grpc/health/v1/health.proto")[0].name == "grpc/health/v1/health.proto"
            # several requests on one stream, answered in order
            rs = r.ask(r.pb.ServerReflectionRequest(list_services=""),
                       r.pb.ServerReflectionRequest(file_by_filename="grpc/health/v1/health.proto"),
                       r.pb.ServerReflectionRequest(all_extension_numbers_of_type=
                                                    "agynio.api.ziti_management.v1.ManagedIdentity"),
                       r.pb.ServerReflectionRequest(host="h", file_containing_extension=
                                                    r.pb.ExtensionRequest(containing_type="x",
                                                                          extension_number=1)))
            assert [x.WhichOneof("message_response") for x in rs] == [
                "list_services_response", "file_descriptor_response", "all_extension_numbers_response",
                "error_response"]
            assert rs[3].valid_host == "h" and rs[3].original_request.host == "h"
            # a call made only from what reflection said
            out = r.call(SVC + "/ResolveIdentity", json.dumps({"ziti_identity_id": zid}))
            assert out == {"identity_id": iid, "identity_type": "IDENTITY_TYPE_RUNNER"}
    finally:
        s.kill()


def test_reflection_cli():
    s = zmtest.Server()
    try:
        s.start()
        out = subprocess.run(["/usr/bin/python3", os.path.join(zmtest.HERE, "grpcreflect.py"), s.addr, "list"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert SVC in out
    finally:
        s.kill()


# ============================================================================
# zmctl
# ============================================================================


def test_zmctl_every_command(sim, tmp_path):
    s = zmtest.Server(sim=sim)
    try:
        s.start()
        a = s.addr
        rc, out, _ = zmctl(a, "health")
        assert (rc, out) == (0, "SERVING\n")
        rc, out, _ = zmctl(a, "--json", "health")
        assert rc == 0 and json.loads(out) == {"status": "SERVING"}
        # request-service-identity: file 0600, JSON output
        f = tmp_path / "gw.json"
        rc, out, err = zmctl(a, "--json", "request-service-identity", "gateway", "-o", str(f))
        assert rc == 0, err
        zid = json.loads(out)["ziti_identity_id"]
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        ident = json.loads(f.read_text())
        assert ident["id"]["key"].startswith("pem:-----BEGIN")
        assert "PRIVATE KEY" not in out
        rc, out, _ = zmctl(a, "extend-lease", zid)
        assert (rc, out) == (0, "ok\n")
        # create-agent, resolve, list, delete
        agent = str(uuid.uuid4())
        rc, out, err = zmctl(a, "--json", "create-agent", agent)
        assert rc == 0, err
        j = json.loads(out)
        aid = j["ziti_identity_id"]
        assert j["enrollment_jwt"].count(".") == 2
        rc, out, _ = zmctl(a, "--json", "resolve", aid)
        assert rc == 0 and json.loads(out)["identity_id"] == agent
        rc, out, _ = zmctl(a, "resolve", aid)
        assert rc == 0 and agent in out
        rc, out, _ = zmctl(a, "--json", "list", "--all", "--page-size", "1")
        assert rc == 0 and [i["ziti_identity_id"] for i in json.loads(out)["identities"]] == [aid]
        rc, out, _ = zmctl(a, "list", "--type", "agent")
        assert rc == 0 and aid in out
        rc, out, _ = zmctl(a, "--json", "list", "--type", "runner")
        assert rc == 0 and json.loads(out)["identities"] == []
        jf = tmp_path / "agent.jwt"
        rc, out, _ = zmctl(a, "create-agent", str(uuid.uuid4()), "-o", str(jf))
        assert rc == 0 and stat.S_IMODE(os.stat(jf).st_mode) == 0o600 and jf.read_text().count(".") == 2
        rc, out, _ = zmctl(a, "delete", aid)
        assert (rc, out) == (0, "ok\n")
        # exit codes per class
        rc, out, err = zmctl(a, "--json", "resolve", aid)
        assert rc == 4 and json.loads(out)["error"]["status"] == "NOT_FOUND" and "NOT_FOUND" in err
        assert zmctl(a, "extend-lease", "nope")[0] == 4
        assert zmctl(a, "create-agent", "not-a-uuid")[0] == 5
        assert zmctl(a, "list", "--page-token", "garbage!")[0] == 5
        assert zmctl(a, "bogus")[0] == 2
        assert zmctl(a, "resolve")[0] == 2
        assert zmctl(a, "request-service-identity", "gateway")[0] == 2  # needs -o
        assert zmctl(a, "--timeout", "nonsense", "health")[0] == 2
        assert zmctl("127.0.0.1:1", "health")[0] == 3
        assert zmctl(a, "request-service-identity", "gateway", "-o", "/nonexistent/dir/f")[0] == 11
        assert zmctl(a, "--help")[0] == 0
    finally:
        s.kill()


def test_zmctl_status_classes(tmp_path):
    # no controller: UNAVAILABLE (7); a disabled method: UNIMPLEMENTED (9);
    # draining: health NOT_SERVING would be 1 (covered by the unit test of
    # the exit map); a server that never answers: timeout (3)
    s = zmtest.Server(env={"GRPC_DISABLED_METHODS": "DeleteIdentity"})
    try:
        s.start()
        assert zmtest.SVC
        assert zmctl(s.addr, "create-agent", str(uuid.uuid4()))[0] == 7
        assert zmctl(s.addr, "request-service-identity", "1", "-o", str(tmp_path / "x"))[0] == 7
        assert zmctl(s.addr, "delete", "x")[0] == 9
        rc, out, _ = zmctl(s.addr, "--json", "delete", "x")
        assert rc == 9 and json.loads(out)["error"]["status"] == "UNIMPLEMENTED"
    finally:
        s.kill()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    try:
        t0 = time.time()
        rc, _, err = zmctl("127.0.0.1:%d" % ls.getsockname()[1], "--timeout", "1s", "health")
        assert rc == 3 and "no answer" in err and time.time() - t0 < 5
    finally:
        ls.close()


# ============================================================================
# drop-in start-up
# ============================================================================


def test_self_enrollment_from_jwt_file(sim, tmp_path):
    admin = sim.seed_identity("zm-admin-" + uuid.uuid4().hex[:6], is_admin=True, ott=True)
    data = admin.get("data", admin)
    jwt = data["enrollment"]["ott"]["jwt"]
    d = tmp_path / "ziti"
    d.mkdir()
    jwt_file = tmp_path / "enrollmentJwt"
    jwt_file.write_text(jwt + "\n")
    files = {"ZITI_CERT_FILE": str(d / "cert.pem"), "ZITI_KEY_FILE": str(d / "key.pem"),
             "ZITI_CA_FILE": str(d / "ca.pem")}
    env = dict(files, ZITI_CONTROLLER_URL=sim.url, ZITI_ENROLLMENT_JWT_FILE=str(jwt_file),
               LOG_FORMAT="json")
    s = zmtest.Server(env=env)
    try:
        s.start(timeout=60)
        for f in files.values():
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert "BEGIN CERTIFICATE" in open(files["ZITI_CERT_FILE"]).read()
        assert "PRIVATE KEY" in open(files["ZITI_KEY_FILE"]).read()
        # the service uses its new identity against the controller
        with s.channel() as ch:
            r = s.stub(ch).RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=2), timeout=60)
            assert r.ziti_identity_id
        log = s.logtext()
        assert jwt not in log and jwt.split(".")[2] not in log
        assert "PRIVATE KEY" not in log
        s.stop()
        mtimes = {f: os.stat(f).st_mtime_ns for f in files.values()}
        # restart: the files are there; the (used) JWT is not touched, not even read
        jwt_file.write_text("garbage that would not verify")
        os.chmod(jwt_file, 0)
        s2 = zmtest.Server(env=env)
        try:
            s2.start(timeout=30)
            assert "identity files present" in s2.logtext()
            assert {f: os.stat(f).st_mtime_ns for f in files.values()} == mtimes
        finally:
            s2.kill()
    finally:
        s.kill()


def test_self_enrollment_bad_jwt(sim, tmp_path):
    jwt_file = tmp_path / "enrollmentJwt"
    jwt_file.write_text("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    d = tmp_path
    env = {"ZITI_CERT_FILE": str(d / "c.pem"), "ZITI_KEY_FILE": str(d / "k.pem"), "ZITI_CA_FILE": str(d / "ca.pem"),
           "ZITI_CONTROLLER_URL": sim.url, "ZITI_ENROLLMENT_JWT_FILE": str(jwt_file)}
    s = zmtest.Server(env=env)
    try:
        s.start(wait=False)
        assert s.proc.wait(30) == 1
        assert "does not verify" in s.logtext() or "JWT" in s.logtext()
        assert not os.path.exists(d / "c.pem")
    finally:
        s.kill()


def test_name_resolve_fallback():
    iid = str(uuid.uuid4())
    zid = "zid-" + uuid.uuid4().hex[:10]
    for flag, expect in (("true", grpc.StatusCode.OK), ("false", grpc.StatusCode.NOT_FOUND), (None, None)):
        env = {"ZITI_IDENTITY_NAME_RESOLVE": flag} if flag else {}
        s = zmtest.Server(env=env)
        try:
            s.start()
            zmtest.seed(s.store_path, managed=[(zid, iid, 1)])
            s.kill()
            s.start()
            with s.channel() as ch:
                st = s.stub(ch)
                for name in ("agent-" + iid, "agent-" + iid.upper() + "-replica-2"):
                    if expect == grpc.StatusCode.OK:
                        r = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=name), timeout=5)
                        assert r.identity_id == iid and r.identity_type == 1
                    else:
                        with pytest.raises(grpc.RpcError) as ei:
                            st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=name), timeout=5)
                        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
                # never for other forms, nor for an unknown uuid
                for name in ("agent-" + iid + "x", "agentx-" + iid, "agent-" + str(uuid.uuid4())):
                    with pytest.raises(grpc.RpcError) as ei:
                        st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=name), timeout=5)
                    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            s.kill()


# ============================================================================
# busy polling (LOOP_BUSY_POLL_US)
# ============================================================================

def busy_counters(mport):
    s = scrape(mport)
    return val(s, "zm_loop_busy_polls_total"), val(s, "zm_loop_busy_poll_hits_total")


def resolve_missing(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id="zid-none"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_busy_poll_spins_for_back_to_back_calls_and_never_for_sparse_ones():
    srv = metrics_server(env={"LOOP_BUSY_POLL_US": "1000"})
    srv.start()
    try:
        ch = srv.channel()
        stub = srv.stub(ch)
        # (the connection's set-up exchange is back to back: it may open a
        # window once)
        resolve_missing(stub)
        time.sleep(0.2)
        before = busy_counters(srv.mport)
        # sparse: every gap (100 ms) is far beyond the 1 ms window
        for _ in range(15):
            resolve_missing(stub)
            time.sleep(0.1)
        assert busy_counters(srv.mport) == before
        # back to back: 8 callers keep requests arriving within the window
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda _: resolve_missing(stub), range(800)))
        polls, hits = busy_counters(srv.mport)
        assert polls > 0 and hits > 0, (polls, hits)
        # and once the calls stop the loop sleeps again: no window opens
        time.sleep(0.5)
        polls2, _ = busy_counters(srv.mport)
        time.sleep(0.5)
        assert busy_counters(srv.mport)[0] == polls2
        ch.close()
    finally:
        srv.stop()


def test_busy_poll_leaves_the_core_to_enrollments(sim):
    # back-to-back ResolveIdentity calls keep the loop polling; the crypto
    # threads (lowest priority) get the core because the loop does not poll
    # while they have work: every enrollment completes meanwhile
    srv = metrics_server(sim=sim, env={"LOOP_BUSY_POLL_US": "1000"})
    srv.start()
    try:
        ch = srv.channel()
        stub = srv.stub(ch)
        stop = threading.Event()

        def load():
            while not stop.is_set():
                resolve_missing(stub)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            with ThreadPoolExecutor(4) as ex:
                rs = list(ex.map(lambda i: stub.RequestServiceIdentity(
                    pb.RequestServiceIdentityRequest(service_type=(1, 2, 4)[i % 3]), timeout=60), range(12)))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert all(json.loads(r.identity_json)["id"]["key"].startswith("pem:") for r in rs)
        polls, hits = busy_counters(srv.mport)
        assert polls > 0 and hits > 0, (polls, hits)
        ch.close()
    finally:
        srv.stop()


def test_busy_poll_zero_is_off():
    srv = metrics_server(env={"LOOP_BUSY_POLL_US": "0"})
    srv.start()
    try:
        ch = srv.channel()
        stub = srv.stub(ch)
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda _: resolve_missing(stub), range(200)))
        assert busy_counters(srv.mport) == (0, 0)
        assert scrape(srv.mport)[("zm_loop_busy_poll_window_seconds", ())] == 0
        assert "busy polling: off (LOOP_BUSY_POLL_US=0)" in srv.logtext(limit=None)
        ch.close()
    finally:
        srv.stop()


def test_busy_poll_auto_is_the_default_and_follows_the_cpu_quota():
    # auto polls 100 us unless a cgroup CPU quota applies (the quota parsing
    # is unit-tested on cgroup trees of its own): whatever this machine
    # has, the decision is logged, exported, and is what the loop does
    srv = metrics_server()
    srv.start()
    try:
        log = srv.logtext(limit=None)
        m = re.search(r"busy polling: (off|\d+ us) \(LOOP_BUSY_POLL_US=auto: ([^)]*)\)", log)
        assert m, log
        window = scrape(srv.mport)[("zm_loop_busy_poll_window_seconds", ())]
        # one caller waiting on each answer (h2load, one connection, one
        # stream): gaps of tens of microseconds, within a 100 us window
        d = tempfile.mkdtemp()
        try:
            body = os.path.join(d, "health.bin")
            with open(body, "wb") as f:
                f.write(b"\x00\x00\x00\x00\x00")
            out = subprocess.run(
                ["h2load", "-n", "20000", "-c", "1", "-m", "1", "-d", body,
                 "-H", "content-type: application/grpc", "-H", "te: trailers",
                 "http://127.0.0.1:%d/grpc.health.v1.Health/Check" % srv.port],
                capture_output=True, timeout=120).stdout.decode()
        finally:
            shutil.rmtree(d)
        assert "20000 succeeded, 0 failed, 0 errored" in out, out
        polls, hits = busy_counters(srv.mport)
        if m.group(1) == "off":
            assert m.group(2).startswith("CPU quota of ")
            assert window == 0 and (polls, hits) == (0, 0)
        else:
            assert m.group(1) == "100 us"
            assert m.group(2) in ("no CPU quota", "cgroups unreadable, no quota assumed")
            assert window == pytest.approx(100e-6)
            assert polls > 0 and hits > 0, (polls, hits)
    finally:
        srv.stop()


def test_busy_poll_explicit_value_overrides_auto():
    srv = metrics_server(env={"LOOP_BUSY_POLL_US": "250"})
    srv.start()
    try:
        assert val(scrape(srv.mport), "zm_loop_busy_poll_window_seconds") == pytest.approx(250e-6)
        assert "busy polling: 250 us (LOOP_BUSY_POLL_US=250)" in srv.logtext(limit=None)
    finally:
        srv.stop()


# ============================================================================
# configuration
# ============================================================================


@pytest.mark.parametrize("env,needle", [
    ({"GRPC_ADDRESS": "nonsense"}, "GRPC_ADDRESS"),
    ({"METRICS_ADDRESS": "1.2.3.4"}, "METRICS_ADDRESS"),
    ({"METRICS_ADDRESS": ":99999"}, "METRICS_ADDRESS"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"ZITI_IDENTITY_NAME_RESOLVE": "yes please"}, "ZITI_IDENTITY_NAME_RESOLVE"),
    ({"ZITI_ENROLLMENT_JWT_FILE": "/x"}, "ZITI_ENROLLMENT_JWT_FILE"),
    ({"SERVICE_IDENTITY_LEASE_TTL": "5 minutes"}, "SERVICE_IDENTITY_LEASE_TTL"),
    ({"SERVICE_IDENTITY_GC_INTERVAL": "0"}, "SERVICE_IDENTITY_GC_INTERVAL"),
    ({"SERVICE_IDENTITY_GC_CONCURRENCY": "0"}, "SERVICE_IDENTITY_GC_CONCURRENCY"),
    ({"LOOP_BUSY_POLL_US": "1001"}, "LOOP_BUSY_POLL_US"),
    ({"LOOP_BUSY_POLL_US": "-5"}, "LOOP_BUSY_POLL_US"),
    ({"LOOP_BUSY_POLL_US": "Auto"}, "LOOP_BUSY_POLL_US"),
    ({"ENROLLMENT_KEY_ALG": "dsa"}, "ENROLLMENT_KEY_ALG"),
    ({"STORE_SYNC": "sometimes"}, "STORE_SYNC"),
    ({"GRPC_MAX_RECV_MSG_SIZE": "-1"}, "GRPC_MAX_RECV_MSG_SIZE"),
    ({"SERVICE_TYPES": "x"}, "SERVICE_TYPES"),
    ({"ZITI_CONTROLLER_URL": "ftp://x"}, "ZITI_CONTROLLER_URL"),
    ({"ZITI_CONTROLLER_URL": "https://x:1"}, "ZITI_CONTROLLER_URL"),
    ({"LEASE_FLUSH_INTERVAL": "2m"}, "LEASE_FLUSH_INTERVAL"),
])
def test_config_errors(env, needle):
    s = zmtest.Server(env=env)
    p = subprocess.run([zmtest.zm_bin()], env=s.env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert needle in p.stderr and "configuration" in p.stderr


def test_flags_and_help():
    p = subprocess.run([zmtest.zm_bin(), "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    for name in ("GRPC_ADDRESS (Go)", "METRICS_ADDRESS", "ZITI_ENROLLMENT_JWT_FILE (Go)",
                 "ZITI_IDENTITY_NAME_RESOLVE (Go)", "LOG_FORMAT", "--service-identity-lease-ttl=VALUE",
                 "(default: 5m)", "(default: :50051)"):
        assert name in p.stdout, name
    p = subprocess.run([zmtest.zm_bin(), "--log-format=xml"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "LOG_FORMAT" in p.stderr
    p = subprocess.run([zmtest.zm_bin(), "--no-such-flag=1"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "--no-such-flag" in p.stderr
    p = subprocess.run([zmtest.zm_bin(), "--log-level"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2
    # a flag wins over the environment
    port = zmtest.free_port()
    s = zmtest.Server(env={"GRPC_ADDRESS": "127.0.0.1:1"})
    proc = subprocess.Popen([zmtest.zm_bin(), "--grpc-address", "127.0.0.1:%d" % port,
                             "--store-path=" + os.path.join(s.tmp, "f.db")],
                            env=s.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            if zmctl("127.0.0.1:%d" % port, "health")[0] == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("not serving on the flag's address")
    finally:
        proc.kill()
        proc.wait()


# ============================================================================
# JSON logs
# ============================================================================


def test_json_logs(sim):
    s = zmtest.Server(sim=sim, env={"LOG_FORMAT": "json"})
    try:
        s.start()
        with s.channel() as ch:
            st = s.stub(ch)
            r = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=60)
            a = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=str(uuid.uuid4())), timeout=60)
            with pytest.raises(grpc.RpcError):
                st.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id="nope"), timeout=5)
        s.stop()
        text = s.logtext()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) > 10
        objs = [json.loads(ln) for ln in lines]  # every line is one JSON object
        for o in objs:
            assert set(o) >= {"time", "level", "msg"}
            assert o["level"] in ("debug", "info", "warn", "error")
            assert o["time"].endswith("Z") and "T" in o["time"]
        assert any(o.get("component") == "enroll" for o in objs)
        assert any("saga" in o and o["saga"].startswith("svc-gateway-") for o in objs)
        assert any("request_id" in o and o.get("method", "").endswith("/RequestServiceIdentity") for o in objs)
        # no secret: private key, enrollment JWTs, one-time tokens
        ident = json.loads(r.identity_json)
        key = ident["id"]["key"][len("pem:"):]
        body = key.split("-----")[2].strip().splitlines()[1]
        assert body not in text and "PRIVATE KEY-----" not in text
        assert a.enrollment_jwt not in text and a.enrollment_jwt.split(".")[1] not in text
        jti = json.loads(__import__("base64").urlsafe_b64decode(
            a.enrollment_jwt.split(".")[1] + "==").decode())["jti"]
        assert jti not in text
    finally:
        s.kill()
