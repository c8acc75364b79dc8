"""The container image, built from docker/Dockerfile, doing its real job.

Run by .ci/container.sh after it has built the image; skipped when
ZM_CONTAINER_IMAGE is not set (so the plain ctest run, which registers every
test/integ/test_*.py, does not build images).

Environment:
  ZM_CONTAINER_IMAGE  the image tag to test (required, else the module skips)
  ZM_CONTAINER_SH     the runner (default: ../shared/tools/container.sh from
                      the repository root); `run`, `kill` are used
  ZM_PYTHON           interpreter for the controller simulator (/usr/bin/python3)

The image runs with host networking against test/sim/ziti_sim.py. Everything
is checked from outside the container with grpcio, as a pod would see it:
health SERVING, RequestServiceIdentity returns an identity JSON whose key
matches its certificate and whose certificate chains to id.ca,
ExtendIdentityLease works (and is NOT_FOUND for an unknown id), the image's
own --health-check mode answers 0 (and 1 when nothing listens), SIGTERM ends
PID 1 with exit status 0, and a restart on the same volume still knows the
identity's lease.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

IMAGE = os.environ.get("ZM_CONTAINER_IMAGE")
# Collected and skipped (not a module-level skip: pytest would exit 5,
# "no tests collected", and ctest would count that as a failure).
pytestmark = pytest.mark.skipif(not IMAGE, reason="ZM_CONTAINER_IMAGE not set (.ci/container.sh sets it)")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONTAINER_SH = os.environ.get(
    "ZM_CONTAINER_SH", os.path.join(ROOT, "..", "shared", "tools", "container.sh"))
PYTHON = os.environ.get("ZM_PYTHON", "/usr/bin/python3")
BIN = "/usr/local/bin/ziti-management"
DATA = "/var/lib/ziti-management"
SECRETS = DATA + "/controller"
NONROOT = 65532  # the image's USER
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


# ---- helpers -----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_stubs(out):
    """Python stubs for the service, as (pb, pb_grpc). If another module of
    this pytest run (conftest/zmtest) already imported them, those are
    reused: the protobuf descriptor pool accepts each .proto file once."""
    # zmtest compiles the contract (with the proto3-optional rewrite that the
    # bundled protoc 3.5 needs) into the build directory
    import zmtest

    pb, pb_grpc = zmtest.pb, zmtest.pb_grpc
    return pb, pb_grpc


# grpc.health.v1 is spoken in raw bytes: its generated Python module would be
# a package named `grpc` (clashing with grpcio) and would register
# grpc/health/v1/health.proto a second time when zmtest has already done so.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1


def health_check(ch, timeout):
    """Calls Health/Check with service "" and returns the ServingStatus."""
    raw = ch.unary_unary(HEALTH_CHECK)(b"", timeout=timeout)
    # HealthCheckResponse: field 1 (status), varint; absent = UNKNOWN (0).
    status, i = 0, 0
    while i < len(raw):
        tag = raw[i]
        i += 1
        if tag != 0x08:
            raise ValueError(f"unexpected HealthCheckResponse bytes {raw!r}")
        status, shift = 0, 0
        while True:
            b = raw[i]
            i += 1
            status |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
    return status


class Container:
    """One `container.sh run IMAGE` in the foreground of a child process."""

    def __init__(self, env, volumes, log_path):
        self.env, self.volumes, self.log_path = env, volumes, log_path
        self.proc = None

    def start(self):
        env = dict(os.environ)
        env["CONTAINER_ENV"] = " ".join(f"{k}={v}" for k, v in self.env.items())
        env["CONTAINER_VOLUMES"] = " ".join(self.volumes)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([CONTAINER_SH, "run", IMAGE], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def signal(self, sig="TERM"):
        # buildah run does not forward signals: container.sh finds PID 1.
        subprocess.run([CONTAINER_SH, "kill", str(self.proc.pid), sig], check=True)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is not None:
                self.log.close()

    def ensure_stopped(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in ("TERM", "KILL"):
            subprocess.run([CONTAINER_SH, "kill", str(self.proc.pid), sig], check=False)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
                break
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


def wait_serving(target, ctr):
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    with grpc.insecure_channel(target) as ch:
        while time.monotonic() < deadline:
            if ctr.proc.poll() is not None:
                pytest.fail(f"container exited ({ctr.proc.returncode}) before serving:\n{ctr.tail()}")
            try:
                last = health_check(ch, timeout=2)
                if last == SERVING:
                    return
            except grpc.RpcError as e:
                last = e.code()
            time.sleep(0.3)
    pytest.fail(f"not SERVING within {START_TIMEOUT}s (last: {last}):\n{ctr.tail()}")


def verify_issued_by(cert, issuer):
    """True if `issuer`'s key signed `cert` (cryptography 38 has no
    verify_directly_issued_by)."""
    if cert.issuer != issuer.subject:
        return False
    pub = issuer.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       cert.signature_hash_algorithm)
        else:
            return False
    except Exception:
        return False
    return True


def chains_to(leaf, pool):
    """Walks issuer links from leaf through pool up to a self-signed cert."""
    cur = leaf
    for _ in range(len(pool) + 1):
        parents = [c for c in pool if verify_issued_by(cur, c)]
        if not parents:
            return False
        cur = parents[0]
        if verify_issued_by(cur, cur):
            return True
    return False


def load_certs(pem):
    """All certificates of a PEM bundle (cryptography 38 has no
    load_pem_x509_certificates)."""
    end = "-----END CERTIFICATE-----"
    out = []
    for block in pem.split(end)[:-1]:
        out.append(x509.load_pem_x509_certificate((block.strip() + "\n" + end + "\n").encode()))
    return out


def spki(key_or_cert):
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# ---- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def work():
    d = tempfile.mkdtemp(prefix="zm-container-")
    yield d
    if os.environ.get("ZM_KEEP_WORK") == "1":
        print(f"work directory kept: {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def stubs(work):
    out = os.path.join(work, "stubs")
    os.mkdir(out)
    return gen_stubs(out)


@pytest.fixture(scope="module")
def sim(work):
    simdir = os.path.join(work, "sim")
    os.mkdir(simdir)
    script = os.path.join(ROOT, "test", "sim", "ziti_sim.py")
    assert os.path.exists(script), "test/sim/ziti_sim.py is missing"
    log = open(os.path.join(work, "sim.log"), "wb")
    p = subprocess.Popen([PYTHON, script, "--dir", simdir, "--port", "0", "--ctl-port", "0"],
                         stdout=log, stderr=subprocess.STDOUT)
    info_path = os.path.join(simdir, "sim.json")
    deadline = time.monotonic() + 30
    info = None
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with open(info_path) as f:
                info = json.load(f)
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    if info is None:
        p.kill()
        p.wait()
        log.close()
        with open(os.path.join(work, "sim.log"), "rb") as f:
            pytest.fail("simulator did not start:\n" + f.read().decode(errors="replace"))
    yield info
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    log.close()


@pytest.fixture(scope="module")
def volume(work):
    v = os.path.join(work, "volume")
    os.mkdir(v, 0o750)
    os.chown(v, NONROOT, NONROOT)
    return v


@pytest.fixture(scope="module")
def server(work, sim, volume, stubs):
    port = free_port()
    env = {
        "GRPC_ADDRESS": f"127.0.0.1:{port}",
        "ZITI_CONTROLLER_URL": sim["url"],
        "ZITI_CA_FILE": f"{SECRETS}/ca.pem",
        "ZITI_CERT_FILE": f"{SECRETS}/cert.pem",
        "ZITI_KEY_FILE": f"{SECRETS}/key.pem",
        "SERVICE_IDENTITY_LEASE_TTL": "10m",
        "LOG_LEVEL": "debug",
    }
    # The container runs as a non-root user: hand it copies of the controller
    # credentials it may read, as a Kubernetes secret volume with fsGroup
    # would. They live inside the data volume because container.sh (buildah
    # run, chroot isolation) mounts the image's VOLUME over our bind mount at
    # random when a second --volume is given (seen in about 1 run of 4), so
    # exactly one bind mount is used.
    sec = os.path.join(volume, "controller")
    os.mkdir(sec, 0o750)
    for k, name in (("ca_file", "ca.pem"), ("cert_file", "cert.pem"), ("key_file", "key.pem")):
        shutil.copy(sim[k], os.path.join(sec, name))
        os.chmod(os.path.join(sec, name), 0o440)
        os.chown(os.path.join(sec, name), NONROOT, NONROOT)
    os.chown(sec, NONROOT, NONROOT)
    vols = [f"{volume}:{DATA}"]
    state = {"port": port, "env": env, "vols": vols, "target": f"127.0.0.1:{port}",
             "log": os.path.join(work, "container.log"), "ctr": None}
    state["ctr"] = Container(env, vols, state["log"])
    state["ctr"].start()
    wait_serving(state["target"], state["ctr"])
    yield state
    state["ctr"].ensure_stopped()


def svc(stubs, target):
    ch = grpc.insecure_channel(target)
    return ch, stubs[1].ZitiManagementServiceStub(ch)


# ---- tests (in order: they share one server and its volume) ------------------

def test_image_config_and_contents():
    """What docker/README.md promises: non-root, port, volume, health check,
    and no shell, package manager or compiler inside."""
    out = subprocess.run(["buildah", "inspect", "--type", "image", IMAGE],
                         capture_output=True, check=True).stdout
    info = json.loads(out)
    cfg = info["OCIv1"]["config"]
    assert cfg.get("User") not in (None, "", "0", "root", "0:0")
    assert "50051/tcp" in (cfg.get("ExposedPorts") or {})
    assert DATA in (cfg.get("Volumes") or {})
    assert cfg.get("Entrypoint") == [BIN]
    env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
    assert env.get("STORE_PATH", "").startswith(DATA + "/")
    hc = (info.get("Docker") or {}).get("config", {}).get("Healthcheck")
    assert hc and hc["Test"] == ["CMD", BIN, "--health-check"], hc
    ctr = subprocess.run(["buildah", "from", "--pull=never", IMAGE], capture_output=True,
                         check=True, text=True).stdout.strip()
    try:
        root = subprocess.run(["buildah", "mount", ctr], capture_output=True, check=True,
                              text=True).stdout.strip()
        files = []
        for d, _, names in os.walk(root):
            files += [os.path.relpath(os.path.join(d, n), root) for n in names]
        for banned in ("sh", "bash", "dash", "busybox", "apt", "apt-get", "dpkg", "cc", "gcc",
                       "ld", "as", "make", "cmake"):
            hits = [f for f in files if os.path.basename(f) == banned]
            assert not hits, f"{banned} in the image: {hits}"
        assert "usr/local/bin/ziti-management" in files
        assert not [f for f in files if f.endswith((".h", ".a"))], "headers or static libs"
        st = os.stat(os.path.join(root, DATA.lstrip("/")))
        assert st.st_uid == NONROOT
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def test_health_serving_from_outside(server):
    with grpc.insecure_channel(server["target"]) as ch:
        assert health_check(ch, timeout=5) == SERVING


def test_postgresql_client_library_loads_in_image():
    # The server dlopens libpq when DATABASE_URL is set (it is not in ldd's
    # list, so the image carries it by name): against a database nobody
    # listens on, it must get as far as connecting, and say so.
    url = f"postgresql://zm@127.0.0.1:{free_port()}/zm?connect_timeout=2"
    env = dict(os.environ, CONTAINER_ENV=f"DATABASE_URL={url}")
    r = subprocess.run([CONTAINER_SH, "run", IMAGE, BIN, "--migrate-only"], env=env,
                       capture_output=True, timeout=120)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 1, out
    assert "cannot connect" in out, out
    assert "cannot load" not in out, out


def test_health_check_mode_inside_image(server):
    # A HEALTHCHECK runs with the container's environment, as this does.
    def ctr_env(**over):
        e = dict(server["env"], **over)
        return " ".join(f"{k}={v}" for k, v in e.items())

    env = dict(os.environ, CONTAINER_ENV=ctr_env())
    ok = subprocess.run([CONTAINER_SH, "run", IMAGE, BIN, "--health-check"], env=env,
                        capture_output=True, timeout=120)
    assert ok.returncode == 0, ok.stderr.decode(errors="replace")
    # and it can fail: nothing listens on this port
    env["CONTAINER_ENV"] = ctr_env(GRPC_ADDRESS=f"127.0.0.1:{free_port()}")
    bad = subprocess.run([CONTAINER_SH, "run", IMAGE, BIN, "--health-check"], env=env,
                         capture_output=True, timeout=120)
    assert bad.returncode == 1
    assert b"health-check" in bad.stderr


def test_request_service_identity(stubs, server, sim):
    pb = stubs[0]
    ch, stub = svc(stubs, server["target"])
    with ch:
        r = stub.RequestServiceIdentity(
            pb.RequestServiceIdentityRequest(service_type=pb.SERVICE_TYPE_GATEWAY), timeout=60)
    assert r.ziti_identity_id
    ident = json.loads(r.identity_json)
    assert ident["ztAPI"].startswith("https://")
    for k in ("key", "cert", "ca"):
        assert ident["id"][k].startswith("pem:"), k
    key = serialization.load_pem_private_key(ident["id"]["key"][4:].encode(), password=None)
    certs = load_certs(ident["id"]["cert"][4:])
    cas = load_certs(ident["id"]["ca"][4:])
    assert spki(key) == spki(certs[0]), "id.key does not match id.cert"
    assert chains_to(certs[0], certs[1:] + cas), "id.cert does not chain to id.ca"
    server["identity_id"] = r.ziti_identity_id


def test_extend_identity_lease(stubs, server):
    pb = stubs[0]
    assert server.get("identity_id"), "needs test_request_service_identity"
    ch, stub = svc(stubs, server["target"])
    with ch:
        stub.ExtendIdentityLease(
            pb.ExtendIdentityLeaseRequest(ziti_identity_id=server["identity_id"]), timeout=10)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ExtendIdentityLease(
                pb.ExtendIdentityLeaseRequest(ziti_identity_id="no-such-identity"), timeout=10)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_exits_zero(server):
    ctr = server["ctr"]
    ctr.signal("TERM")
    rc = ctr.wait(STOP_TIMEOUT)
    assert rc == 0, ctr.tail()


def test_restart_on_same_volume_keeps_lease(stubs, server, volume):
    pb = stubs[0]
    assert server.get("identity_id"), "needs test_request_service_identity"
    assert os.path.exists(os.path.join(volume, "ziti-management.db")), \
        "the store wrote nothing to the volume"
    ctr = Container(server["env"], server["vols"], server["log"])
    server["ctr"] = ctr  # the fixture's teardown stops this one
    ctr.start()
    wait_serving(server["target"], ctr)
    ch, stub = svc(stubs, server["target"])
    with ch:
        try:
            stub.ExtendIdentityLease(
                pb.ExtendIdentityLeaseRequest(ziti_identity_id=server["identity_id"]), timeout=10)
        except grpc.RpcError as e:
            pytest.fail(f"lease of {server['identity_id']} lost across the restart: "
                        f"{e.code()} {e.details()}\n{ctr.tail(80)}")
    ctr.signal("TERM")
    assert ctr.wait(STOP_TIMEOUT) == 0, ctr.tail()
