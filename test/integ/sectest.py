"""Helpers for the listener security tests: a throwaway PKI made with the
openssl CLI inside the test's temp dir (hermetic), the listener test server
(build/test/zm-testsrv: the real src/grpc server with stand-in handlers, or
the real binary when ZM_SECTEST_BIN says so), mTLS grpcio channels and raw
HTTP/2 connections (python3-h2) over TCP or TLS."""

import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import grpc

import zmtest
from zmtest import pb, pb_grpc, health_pb2, HealthStub  # noqa: F401

SVC = "/agynio.api.ziti_management.v1.ZitiManagementService/"


def testsrv_bin():
    return os.environ.get("ZM_TESTSRV_BIN") or os.path.join(zmtest._build_dir(), "test", "zm-testsrv")


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Pki:
    """A CA, a server certificate for localhost/127.0.0.1, and client
    certificates with the SANs the tests ask for."""

    def __init__(self, d, name="ca"):
        self.d = d
        self.name = name
        self.ca_key = os.path.join(d, name + ".key")
        self.ca = os.path.join(d, name + ".pem")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", self.ca_key, "-out", self.ca, "-subj", "/CN=" + name, "-days", "2",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def issue(self, stem, cn, sans=(), server=False):
        key = os.path.join(self.d, stem + ".key")
        csr = os.path.join(self.d, stem + ".csr")
        crt = os.path.join(self.d, stem + ".pem")
        ext = os.path.join(self.d, stem + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n")
            f.write("keyUsage=critical,digitalSignature\n")
            f.write("extendedKeyUsage=%s\n" % ("serverAuth" if server else "clientAuth"))
            if sans:
                f.write("subjectAltName=" + ",".join(sans) + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", "/CN=" + cn, cwd=self.d)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                 "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext, cwd=self.d)
        return crt, key

    def server_cert(self, stem="server"):
        return self.issue(stem, "zm-server", ["DNS:localhost", "IP:127.0.0.1"], server=True)


SANITIZED = os.environ.get("ZM_SANITIZED", "").lower() in ("1", "true", "on", "yes")


def rss_budget_kb(kb):
    """An RSS bound, looser under ASan (its quarantine keeps freed memory)."""
    return kb * 4 if SANITIZED else kb


def read(path):
    with open(path, "rb") as f:
        return f.read()


class TestServer:
    def __init__(self, env=None, tmp=None):
        self.tmp = tmp or tempfile.mkdtemp(prefix="zm-sec-")
        self.log_path = os.path.join(self.tmp, "testsrv.log")
        self.audit_path = os.path.join(self.tmp, "audit.jsonl")
        self.stats_path = os.path.join(self.tmp, "stats")
        e = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "AUDIT_"))}
        e.update(GRPC_ADDRESS="127.0.0.1:0", AUDIT_LOG=self.audit_path,
                 TESTSRV_STATS_FILE=self.stats_path)
        e.update(env or {})
        self.env = e
        self.proc = None
        self.port = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([testsrv_bin()], env=self.env, stdout=subprocess.PIPE,
                                     stderr=self.log, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on port"):
            self.proc.wait(5)
            raise RuntimeError("testsrv did not start: %r\n%s" % (line, self.logtext()))
        self.port = int(line.split()[3])
        self.tls = "(tls)" in line
        self.addr = "localhost:%d" % self.port
        return self

    def logtext(self):
        try:
            return read(self.log_path).decode(errors="replace")
        except OSError:
            return ""

    def audit(self):
        try:
            return [json.loads(l) for l in read(self.audit_path).decode().splitlines() if l.strip()]
        except OSError:
            return []

    def stats(self):
        time.sleep(0.25)
        try:
            parts = read(self.stats_path).decode().split()[1:]
        except OSError:
            return {}
        return {k: int(v) for k, v in (p.split("=") for p in parts)}

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = self.logtext()
        for bad in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
            if bad in log:
                raise AssertionError("sanitizer report in the server log:\n" + log[-6000:])
        return self.proc.returncode if self.proc else None


def channel(srv, ca=None, cert=None, key=None, options=()):
    if not srv.tls:
        return grpc.insecure_channel(srv.addr, options=list(options))
    creds = grpc.ssl_channel_credentials(root_certificates=read(ca),
                                         private_key=read(key) if key else None,
                                         certificate_chain=read(cert) if cert else None)
    return grpc.secure_channel(srv.addr, creds, options=list(options))


def stub(ch):
    return pb_grpc.ZitiManagementServiceStub(ch)


def code_of(fn, *a, **kw):
    """The gRPC status code name of a call (OK when it succeeds)."""
    kw.setdefault("timeout", 5)
    try:
        fn(*a, **kw)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def write_policy(path, rules):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rules": rules}, f)
    os.replace(tmp, path)


# ---- raw HTTP/2 -----------------------------------------------------------

def raw_socket(srv, ca=None, cert=None, key=None, alpn=("h2",), ciphers=None, tls12=False):
    """A connected socket (TLS when the server has it). ciphers: offer only
    these (OpenSSL names, any security level); tls12: at most TLS 1.2."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    if srv.tls:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if ciphers:
            ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
        try:
            s = ctx.wrap_socket(s, server_hostname="localhost")
        except BaseException:
            s.close()
            raise
    return s


def grpc_frame(msg_bytes):
    return b"\x00" + len(msg_bytes).to_bytes(4, "big") + msg_bytes


def grpc_headers(path, extra=()):
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "localhost"), ("content-type", "application/grpc"),
            ("te", "trailers")] + list(extra)
