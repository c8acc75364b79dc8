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
    protos = ["agynio/api/identity/v1/identity.proto", "agynio/api/ziti_management/v1/ziti_management.proto",
              "grpc/health/v1/health.proto"]
    newest = max(os.path.getmtime(os.path.join(REPO, "proto", p)) for p in protos)
    if not os.path.exists(marker) or os.path.getmtime(marker) < newest:
        os.makedirs(out, exist_ok=True)
        from grpc_tools import protoc

        # grpc_tools' protoc (3.5) predates proto3 `optional`: compile a copy in
        # which each such field is the wire-identical one-field oneof (as the C
        # build does, cmake/proto_optional.cmake); HasField() works the same.
        import re

        src = os.path.join(out, "proto-src")
        for p in protos:
            os.makedirs(os.path.dirname(os.path.join(src, p)), exist_ok=True)
            with open(os.path.join(REPO, "proto", p)) as f:
                text = f.read()
            text = re.sub(r"\n([ ]*)optional ([A-Za-z0-9_.]+) ([a-z0-9_]+) = ([0-9]+)([^;\n]*);",
                          r"\n\1oneof _\3 { \2 \3 = \4\5; }", text)
            with open(os.path.join(src, p), "w") as f:
                f.write(text)
        for p in protos:
            args = ["protoc", "-I", src, "-I", "/usr/include",
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
from agynio.api.identity.v1 import identity_pb2 as idpb  # noqa: E402

# IdentityType moved to agynio.api.identity.v1 (same numbers): tests keep
# writing pb.IDENTITY_TYPE_*.
for _k, _v in idpb.IdentityType.items():
    setattr(pb, _k, _v)



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


# ---- store backends -----------------------------------------------------------
#
# ZM_TEST_BACKEND=sqlite (default) or pg. A "store reference" is what a test
# passes around as `store_path`: with SQLite it is the file; with PostgreSQL
# it is a database URL, and a file path given by a test (to share one store
# between several Server objects) is mapped to its own fresh database, so the
# same test code runs on both. One PostgreSQL cluster (test/integ/pgfix.py)
# serves the whole pytest session; every store gets a database of its own.

BACKEND = os.environ.get("ZM_TEST_BACKEND", "sqlite").strip().lower() or "sqlite"
if BACKEND in ("postgres", "postgresql", "pg"):
    BACKEND = "pg"
elif BACKEND != "sqlite":
    raise RuntimeError("ZM_TEST_BACKEND must be sqlite or pg, not %r" % BACKEND)
PG = BACKEND == "pg"

_pg_cluster = None
_pg_dbs = {}  # file path given by a test -> database URL
_pg_seq = [0]


def pg_cluster():
    """The session's PostgreSQL cluster (started on first use)."""
    global _pg_cluster
    if _pg_cluster is None:
        import atexit

        from pgfix import PgCluster

        c = PgCluster()
        c.start()
        atexit.register(c.destroy)
        _pg_cluster = c
    return _pg_cluster


def pg_connect(url, **kw):
    import psycopg2

    c = psycopg2.connect(url, options="-c TimeZone=UTC", connect_timeout=10, **kw)
    c.autocommit = True
    return c


def pg_new_database(cluster=None, prefix="zm"):
    """CREATE DATABASE on cluster (default: the session's); returns its URL."""
    c = cluster or pg_cluster()
    _pg_seq[0] += 1
    name = "%s_%d_%d" % (prefix, os.getpid(), _pg_seq[0])
    adm = pg_connect(c.url)
    try:
        adm.cursor().execute("CREATE DATABASE " + name)
    finally:
        adm.close()
    return c.url.rsplit("/", 1)[0] + "/" + name


def is_url(ref):
    return isinstance(ref, str) and ref.startswith(("postgres://", "postgresql://"))


def store_url(ref):
    """The DATABASE_URL of a store reference (PostgreSQL), else None."""
    if is_url(ref):
        return ref
    if not PG:
        return None
    ref = os.path.abspath(ref)
    if ref not in _pg_dbs:
        _pg_dbs[ref] = pg_new_database()
    return _pg_dbs[ref]


def new_store(tmpdir):
    """A fresh store reference for the current backend."""
    return pg_new_database() if PG else os.path.join(tmpdir, "zm.db")


def store_env(ref):
    """Environment variables that point the binary at store ref."""
    url = store_url(ref)
    if url:
        return {"DATABASE_URL": url}
    return {"STORE_PATH": ref}


def migrate(store_path):
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(store_env(store_path))
    subprocess.run([zm_bin(), "--migrate-only"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def ts(ms):
    """Store timestamp text for wall ms (also what query() returns for a
    time column on either backend)."""
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + ".%03d" % (ms % 1000)


def ts_ms(text):
    """Inverse of ts()."""
    import calendar

    base, _, frac = text.partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%d %H:%M:%S")) * 1000 + int((frac + "000")[:3])


def now_ms():
    return int(time.time() * 1000)


def _pg_value(v):
    import datetime

    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc)
        return v.strftime("%Y-%m-%d %H:%M:%S") + ".%03d" % (v.microsecond // 1000)
    return v


def _pg_sql(sql):
    # sqlite's ? placeholders -> psycopg2's %s (no test SQL has a literal ?)
    return sql.replace("%", "%%").replace("?", "%s")


def query(store_path, sql, args=()):
    """Runs one statement on the store; returns the rows (a list of tuples;
    [] for statements without a result). Times come back as ts() text on
    both backends; ? placeholders work on both."""
    url = store_url(store_path)
    if url:
        db = pg_connect(url)
        try:
            cur = db.cursor()
            cur.execute(_pg_sql(sql), tuple(args))
            if cur.description is None:
                return []
            return [tuple(_pg_value(v) for v in r) for r in cur.fetchall()]
        finally:
            db.close()
    db = sqlite3.connect(store_path, timeout=10)
    try:
        cur = db.execute(sql, args)
        rows = cur.fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def execute_script(store_path, sql):
    """Runs several statements (DDL, triggers) through a connection of its
    own, next to a running server."""
    url = store_url(store_path)
    if url:
        db = pg_connect(url)
        try:
            db.cursor().execute(sql)
        finally:
            db.close()
        return
    db = sqlite3.connect(store_path, timeout=10)
    try:
        db.executescript(sql)
        db.commit()
    finally:
        db.close()


def table_columns(store_path, table):
    if store_url(store_path):
        return [r[0] for r in query(store_path, "SELECT column_name FROM information_schema.columns "
                                                "WHERE table_name=? AND table_schema=current_schema()", (table,))]
    return [r[1] for r in query(store_path, "SELECT * FROM pragma_table_info(?)", (table,))]


def table_exists(store_path, table):
    return bool(table_columns(store_path, table))


def seed(store_path, managed=(), service=(), pending=()):
    """managed: (zid, identity_id, type); service: (zid, service_type, lease_ms);
    pending: (name, kind, type, created_ms[, resolve_after_ms[, agent_id]]):
    resolve_after defaults to created_ms (a create that can no longer land).
    A seeded store has no service clock: the service counts its start as a
    resume (nothing is collected within TTL + margin of it)."""
    migrate(store_path)
    now = ts(now_ms())
    for z, i, t in managed:
        query(store_path, "INSERT INTO managed_identities (ziti_identity_id, identity_id, identity_type, "
                          "created_at) VALUES (?,?,?,?)", (z, i, t, now))
    for z, t, lease in service:
        query(store_path, "INSERT INTO service_identities (ziti_identity_id, service_type, lease_expires_at, "
                          "created_at) VALUES (?,?,?,?)", (z, t, ts(lease), now))
    if pending:
        cols = set(table_columns(store_path, "pending_identities"))
        for p in pending:
            name, kind, typ, created = p[:4]
            row = {"name": name, "kind": kind, "type": typ, "created_at": ts(created)}
            if "resolve_after" in cols:
                row["resolve_after"] = ts(p[4] if len(p) > 4 and p[4] is not None else created)
            if "agent_id" in cols and len(p) > 5:
                row["agent_id"] = p[5]
            query(store_path, "INSERT INTO pending_identities (%s) VALUES (%s)"
                  % (",".join(row), ",".join("?" * len(row))), tuple(row.values()))


class Server:
    """The real ziti-management binary on a free loopback port."""

    def __init__(self, store_path=None, sim=None, env=None, log_path=None, port=None):
        self.tmp = tempfile.mkdtemp(prefix="zm-test-")
        # a file (SQLite) or a database URL (PostgreSQL): see store_url()
        self.store_path = store_path or new_store(self.tmp)
        self.port = port or free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.log_path = log_path or os.path.join(self.tmp, "server.log")
        e = dict(os.environ)
        for k in list(e):
            if k.startswith(("ZITI_", "SERVICE_", "GRPC_", "STORE_", "ZM_TEST_", "DATABASE_", "LEASE_",
                             "ENROLLMENT_", "PENDING_")):
                del e[k]
        e.update(GRPC_ADDRESS=self.addr, STORE_PATH=os.path.join(self.tmp, "zm.db"), LOG_LEVEL="debug",
                 STORE_SYNC="normal")
        e.update(store_env(self.store_path))
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

    def logtext(self, limit=20000):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
                return text if limit is None else text[-limit:]
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


def sqlite_only(fn):
    """Marks a test about the SQLite file itself (skipped with ZM_TEST_BACKEND=pg)."""
    import pytest

    return pytest.mark.skipif(PG, reason="SQLite file specific")(fn)


def pg_only(fn):
    import pytest

    return pytest.mark.skipif(not PG, reason="PostgreSQL only (ZM_TEST_BACKEND=pg)")(fn)
