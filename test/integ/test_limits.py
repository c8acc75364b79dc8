"""Limits that hold under abuse, each while a well-behaved client keeps
getting answers: a client holding 10,000 half-open streams, a non-reading
client, a slowloris (header block never finished, body trickled), a 1 GiB
declared message, the process-wide request-buffer budget, the connection
cap, and a RequestServiceIdentity flood (per-caller rate and in-flight
limits under mTLS)."""

import os
import resource
import shutil
import socket
import struct
import tempfile
import threading
import time

import grpc
import pytest

import h2raw as h
import sectest as st
from sectest import pb

RESOLVE = st.SVC + "ResolveIdentity"


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Prober:
    """A well-behaved client calling ResolveIdentity in a loop."""

    def __init__(self, srv, **chan):
        self.srv, self.chan = srv, chan
        self.ok = 0
        self.errors = []
        self.worst = 0.0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with st.channel(self.srv, **self.chan) as ch:
            s = st.stub(ch)
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    s.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id="known"), timeout=5)
                    self.ok += 1
                except grpc.RpcError as e:
                    self.errors.append(e.code().name)
                self.worst = max(self.worst, time.monotonic() - t0)
                time.sleep(0.01)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join()

    def check(self, min_ok=5, worst=2.0):
        assert self.errors == []
        assert self.ok >= min_ok
        assert self.worst < worst, self.worst


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="zm-lim-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(tmp, **env):
    return st.TestServer({k: str(v) for k, v in env.items()}, tmp=tmp).start()


def raw(srv, **kv):
    return h.Conn(st.raw_socket(srv)).handshake(**kv)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_ten_thousand_half_open_streams(tmp):
    # 10 connections x 1,000 streams, each with a 1 MiB message declared and
    # 1 KiB of it sent, never finished
    srv = start(tmp, GRPC_RECV_TIMEOUT="3s", GRPC_MAX_BUFFERED_BYTES=8 << 20)
    conns = []
    try:
        with Prober(srv) as p:
            base = rss_kb(srv.proc.pid)
            chunk = struct.pack(">BI", 0, 1 << 20) + b"x" * 1019
            for _ in range(10):
                c = raw(srv, INITIAL_WINDOW_SIZE=1 << 20)
                out = b""
                for i in range(1000):
                    sid = 1 + 2 * i
                    out += h.frame(h.HEADERS, h.END_HEADERS, sid, c.hblock(st.grpc_headers(RESOLVE)))
                    out += h.frame(h.DATA, 0, sid, chunk)
                c.send(out)
                conns.append(c)
            time.sleep(1.0)
            stats = srv.stats()
            assert stats["buffered"] <= 8 << 20
            grown = rss_kb(srv.proc.pid) - base
            assert grown < st.rss_budget_kb(120 * 1024), grown  # KiB: bounded, not 10 GB
            # the receive deadline answers and resets every stalled stream
            assert wait_for(lambda: srv.stats().get("recv_timeouts", 0) + srv.stats().get("budget_refusals", 0)
                            >= 10000, 15)
            assert wait_for(lambda: srv.stats()["buffered"] == 0, 10)
        p.check()
    finally:
        for c in conns:
            c.close()
        srv.stop()


def test_slowloris_header_block_never_finished(tmp):
    srv = start(tmp, GRPC_RECV_TIMEOUT="1s")
    try:
        with Prober(srv) as p:
            c = raw(srv)
            c.headers(1, st.grpc_headers(RESOLVE), end_stream=False, end_headers=False)
            t0 = time.monotonic()
            c.frames(5.0)
            assert c.closed
            assert time.monotonic() - t0 < 4.5
        p.check()
    finally:
        srv.stop()


def test_slowloris_trickled_body(tmp):
    srv = start(tmp, GRPC_RECV_TIMEOUT="1s")
    try:
        with Prober(srv) as p:
            c = raw(srv)
            c.headers(1, st.grpc_headers(RESOLVE), end_stream=False)
            c.send_frame(h.DATA, 0, 1, struct.pack(">BI", 0, 100))
            got = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:
                c.send_frame(h.DATA, 0, 1, b"x")
                got += c.frames(0.3)
                if any(f.type == h.RST_STREAM for f in got):
                    break
            hdr = [f for f in got if f.type == h.HEADERS and f.sid == 1]
            assert hdr and c.decode(hdr[0])["grpc-status"] == "4"  # DEADLINE_EXCEEDED
            rst = [f for f in got if f.type == h.RST_STREAM]
            assert rst and rst[0].error_code() == h.NO_ERROR
            c.close()
        p.check()
        assert any(a["event"] == "recv_timeout" for a in srv.audit())
    finally:
        srv.stop()


def test_non_reading_client_is_evicted(tmp):
    srv = start(tmp, GRPC_WRITE_STALL_TIMEOUT="1s")
    try:
        with Prober(srv) as p:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            c = h.Conn(s).handshake(INITIAL_WINDOW_SIZE=2 ** 31 - 1)
            c.send_frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1 - 65535))
            msg = st.grpc_frame(pb.ResolveIdentityRequest(ziti_identity_id="big:262144").SerializeToString())
            out = b""
            for i in range(64):  # 16 MiB of answers
                out += h.frame(h.HEADERS, h.END_HEADERS, 1 + 2 * i, c.hblock(st.grpc_headers(RESOLVE)))
                out += h.frame(h.DATA, h.END_STREAM, 1 + 2 * i, msg)
            c.send(out)
            # ...and never reads again
            assert wait_for(lambda: srv.stats().get("write_stalls", 0) >= 1, 10)
            assert rss_kb(srv.proc.pid) < st.rss_budget_kb(200 * 1024)
            s.close()
        p.check()
        assert any(a["event"] == "write_stall" for a in srv.audit())
    finally:
        srv.stop()


def test_one_gib_declared_message(tmp):
    srv = start(tmp)
    try:
        with Prober(srv) as p:
            c = raw(srv)
            c.headers(1, st.grpc_headers(RESOLVE), end_stream=False)
            c.send_frame(h.DATA, 0, 1, struct.pack(">BI", 0, 1 << 30) + b"x" * 1000)
            f = c.expect(lambda f: f.type == h.HEADERS and f.sid == 1)
            assert c.decode(f)["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
            # the rest of the "message" is discarded as it arrives
            for _ in range(16):
                c.send_frame(h.DATA, 0, 1, b"y" * 16384)
            assert srv.stats()["buffered"] == 0
            c.close()
        p.check()
    finally:
        srv.stop()


def test_global_buffer_budget(tmp):
    # 4 connections x 12 streams x ~1 MiB unfinished messages (within the
    # server's flow-control windows: 1 MiB per stream, 16 MiB per
    # connection): without a process-wide budget that is 48 MiB
    srv = start(tmp, GRPC_MAX_BUFFERED_BYTES=16 << 20, GRPC_RECV_TIMEOUT="60s")
    conns = []
    try:
        with Prober(srv) as p:
            base = rss_kb(srv.proc.pid)
            for _ in range(4):
                c = raw(srv, INITIAL_WINDOW_SIZE=4 << 20)
                for i in range(12):
                    sid = 1 + 2 * i
                    c.headers(sid, st.grpc_headers(RESOLVE), end_stream=False)
                    c.send_frame(h.DATA, 0, sid, struct.pack(">BI", 0, (4 << 20) - 16))
                    for _ in range(63):  # 1008 KiB
                        c.send_frame(h.DATA, 0, sid, b"z" * 16384)
                conns.append(c)
            time.sleep(1.0)
            stats = srv.stats()
            assert stats["buffered"] <= 16 << 20
            assert stats["budget_refusals"] > 0
            assert rss_kb(srv.proc.pid) - base < st.rss_budget_kb(60 * 1024)
        p.check()
    finally:
        for c in conns:
            c.close()
        srv.stop()


def test_connection_cap_refuses_clearly(tmp):
    srv = start(tmp, GRPC_MAX_CONNECTIONS=5)
    conns = []
    try:
        for _ in range(4):
            conns.append(raw(srv))
        with Prober(srv) as p:  # the 5th
            time.sleep(0.3)
            s = socket.create_connection(("127.0.0.1", srv.port))
            c = h.Conn(s)
            c.send(h.PREFACE + h.frame(h.SETTINGS, 0, 0))
            g = c.goaway()
            assert g.error_code() == h.ENHANCE_YOUR_CALM
            assert b"connection limit" in g.payload
            c.frames(1.0)
            assert c.closed
        p.check()
        assert "connection limit (5) reached" in srv.logtext()
        assert any(a["event"] == "connection_refused" for a in srv.audit())
    finally:
        for c in conns:
            c.close()
        srv.stop()


def test_request_service_identity_flood(tmp):
    # mTLS: the flooding caller is limited by identity; another caller is
    # not affected
    pki = st.Pki(tmp)
    crt, key = pki.server_cert()
    flood = pki.issue("flood", "flood", ["URI:spiffe://agyn/sa/gateway"])
    other = pki.issue("other", "other", ["URI:spiffe://agyn/sa/orchestrator"])
    srv = start(tmp, GRPC_TLS_CERT_FILE=crt, GRPC_TLS_KEY_FILE=key, GRPC_TLS_CLIENT_CA_FILE=pki.ca,
                GRPC_CALLER_RATE=5, GRPC_CALLER_BURST=10, GRPC_CALLER_MAX_INFLIGHT=4,
                TESTSRV_RSI_DELAY_MS=200)
    try:
        with Prober(srv, ca=pki.ca, cert=other[0], key=other[1]) as p:
            with st.channel(srv, ca=pki.ca, cert=flood[0], key=flood[1]) as ch:
                s = st.stub(ch)
                futs = [s.RequestServiceIdentity.future(
                    pb.RequestServiceIdentityRequest(service_type=pb.SERVICE_TYPE_GATEWAY), timeout=10)
                    for _ in range(200)]
                codes = []
                for f in futs:
                    try:
                        f.result()
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)
                assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
                assert codes.count("OK") <= 10 and codes.count("OK") >= 1
            with st.channel(srv, ca=pki.ca, cert=other[0], key=other[1]) as ch:
                assert st.code_of(st.stub(ch).RequestServiceIdentity,
                                  pb.RequestServiceIdentityRequest(service_type=pb.SERVICE_TYPE_GATEWAY)) == "OK"
        p.check()
        lim = [a for a in srv.audit() if a["event"] == "rate_limited"]
        assert lim and all(a["caller"] == "uri:spiffe://agyn/sa/gateway" for a in lim)
    finally:
        srv.stop()
