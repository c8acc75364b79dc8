"""Shared helpers for the integration tests: generated gRPC stubs, the real
server binary as a subprocess, store seeding, and the controller simulator.

Everything talks to real processes over loopback: the ziti-management binary
($ZM_BIN), Python grpcio clients, and test/sim/ziti_sim.py.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "test", "sim"))

import grpc  # noqa: E402


def _build_dir():
    return os.environ.get("ZM_BUILD_DIR") or os.path.join(REPO, "build")


def zm_bin():
    return os.environ.get("ZM_BIN") or os.path.join(_build_dir(), "ziti-management")


def _gen_stubs():
    out = os.path.join(_build_dir(), "pystubs")
    marker = os.path.join(out, ".done")
    protos = ["agynio/api/ziti_management/v1/ziti_management.proto", "grpc/health/v1/health.proto"]
    newest = max(os.path.getmtime(os.path.join(REPO, "proto", p)) for p in protos)
    if not os.path.exists(marker) or os.path.getmtime(marker) < newest:
        os.makedirs(out, exist_ok=True)
        from grpc_tools import protoc

        for p in protos:
            args = ["protoc", "-I", os.path.join(REPO, "proto"), "-I", "/usr/include",
                    "--python_out=" + out]
            if "health" not in p:
                args.append("--grpc_python_out=" + out)
            rc = protoc.main(args + [p])
            if rc != 0:
                raise RuntimeError("protoc failed for " + p)
        for d, _, _ in os.walk(out):
            init = os.path.join(d, "__init__.py")
            if not os.path.exists(init):
                open(init, "w").close()
        open(marker, "w").close()
    if out not in sys.path:
        sys.path.insert(0, out)


_gen_stubs()
from agynio.api.ziti_management.v1 import ziti_management_pb2 as pb  # noqa: E402
from agynio.api.ziti_management.v1 import ziti_management_pb2_grpc as pb_grpc  # noqa: E402



def _load_health():
    # grpc/health/v1/health_pb2.py would shadow grpcio's own `grpc` package,
    # so load it under a private name.
    import importlib.util

    path = os.path.join(_build_dir(), "pystubs", "grpc", "health", "v1", "health_pb2.py")
    spec = importlib.util.spec_from_file_location("zm_health_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


health_pb2 = _load_health()


class HealthStub:
    def __init__(self, ch):
        self.Check = ch.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.Watch = ch.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)

SVC = "agynio.api.ziti_management.v1.ZitiManagementService"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def migrate(store_path):
    env = dict(os.environ, STORE_PATH=store_path)
    subprocess.run([zm_bin(), "--migrate-only"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def ts(ms):
    """Store timestamp text for wall ms."""
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + ".%03d" % (ms % 1000)


def now_ms():
    return int(time.time() * 1000)


def seed(store_path, managed=(), service=(), pending=()):
    """managed: (zid, identity_id, type); service: (zid, service_type, lease_ms);
    pending: (name, kind, type, created_ms)."""
    migrate(store_path)
    db = sqlite3.connect(store_path)
    now = ts(now_ms())
    db.executemany("INSERT INTO managed_identities VALUES (?,?,?,?)",
                   [(z, i, t, now) for z, i, t in managed])
    db.executemany("INSERT INTO service_identities VALUES (?,?,?,?)",
                   [(z, t, ts(lease), now) for z, t, lease in service])
    db.executemany("INSERT INTO pending_identities (name, kind, type, ziti_identity_id, created_at) "
                   "VALUES (?,?,?,NULL,?)", [(n, k, t, ts(c)) for n, k, t, c in pending])
    db.commit()
    db.close()


def query(store_path, sql, args=()):
    db = sqlite3.connect(store_path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class Server:
    """The real ziti-management binary on a free loopback port."""

    def __init__(self, store_path=None, sim=None, env=None, log_path=None, port=None):
        self.tmp = tempfile.mkdtemp(prefix="zm-test-")
        self.store_path = store_path or os.path.join(self.tmp, "zm.db")
        self.port = port or free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.log_path = log_path or os.path.join(self.tmp, "server.log")
        e = dict(os.environ)
        for k in list(e):
            if k.startswith(("ZITI_", "SERVICE_", "GRPC_", "STORE_", "ZM_TEST_")):
                del e[k]
        e.update(GRPC_ADDRESS=self.addr, STORE_PATH=self.store_path, LOG_LEVEL="debug",
                 STORE_SYNC="normal")
        if sim is not None:
            e.update(ZITI_CONTROLLER_URL=sim.url, ZITI_CA_FILE=sim.ca_file,
                     ZITI_CERT_FILE=sim.cert_file, ZITI_KEY_FILE=sim.key_file)
        e.update(env or {})
        self.env = e
        self.proc = None

    def start(self, wait=True, timeout=30):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([zm_bin()], env=self.env, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout=30):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s; log:\n%s" % (self.proc.returncode, self.logtext()))
            try:
                with grpc.insecure_channel(self.addr) as ch:
                    r = HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as ex:
                last = ex
            time.sleep(0.05)
        raise RuntimeError("server not serving after %ss (%s); log:\n%s" % (timeout, last, self.logtext()))

    def channel(self):
        return grpc.insecure_channel(self.addr)

    def stub(self, ch=None):
        return pb_grpc.ZitiManagementServiceStub(ch or self.channel())

    def logtext(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.kill()
