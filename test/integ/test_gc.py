"""Lease GC and crash recovery against the real binary and the controller
simulator (issue 5), with short TTL/interval settings.

Issue 10 timing: a lease is collected only when max(lease, resumed_at + TTL)
+ MARGIN <= now, and a server started on a fresh or seeded store counts as a
resume; so nothing is collected within TTL + MARGIN of the start."""

import re
import shutil
import threading
import time

import grpc
import pytest

import zmtest
from zmtest import pb
from test_enroll import (dispose, invariant_violations, rpc_code, store_records, svc_identities, tombstones,
                         wait_for, wait_invariant)

TTL_MS = 1500
INTERVAL_MS = 200
FLUSH_MS = 200
# zm_life_margin_ms: outage gap (5 s) + 2 flush intervals + 2 heartbeats
MARGIN_S = 5.0 + 2 * FLUSH_MS / 1000.0 + 2.0
# the first collection after a start: TTL + MARGIN past the resume
FIRST_S = TTL_MS / 1000.0 + MARGIN_S
IDS = "/edge/management/v1/identities"
COLLECTED_RE = re.compile(r"collect: lease of (\S+) \(service type (\d+)\) expired: deleting")
RECOVERED_RE = re.compile(r"recover: \S+ (?:exists on the controller \(\d+\): deleting|"
                          r"was never created on the controller: dropped)")


def gc_env(**extra):
    e = {"SERVICE_IDENTITY_LEASE_TTL": "%dms" % TTL_MS, "SERVICE_IDENTITY_GC_INTERVAL": "%dms" % INTERVAL_MS,
         "ZITI_REQUEST_TIMEOUT": "2s", "LEASE_FLUSH_INTERVAL": "%dms" % FLUSH_MS}
    e.update(extra)
    return e


@pytest.fixture
def gsrv(sim):
    s = zmtest.Server(sim=sim, env=gc_env()).start()
    s.t_start = time.monotonic()
    yield s
    s.kill()
    print("---- server log (tail) ----\n" + s.logtext()[-15000:])  # shown on failure only
    shutil.rmtree(s.tmp, ignore_errors=True)


def enroll(stub, stype=1):
    return stub.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=stype), timeout=30)


def extend(stub, zid):
    return rpc_code(stub.ExtendIdentityLease, pb.ExtendIdentityLeaseRequest(ziti_identity_id=zid), timeout=5)[0]


def collected_lines(srv):
    # the whole log: logtext() is only its tail, and a debug log (more of it
    # under ASan) can push the first collections out of it
    with open(srv.log_path, "rb") as f:
        return COLLECTED_RE.findall(f.read().decode(errors="replace"))


def no_leak(sim, store_path):
    """Never, not even transiently: an identity on the simulator that has
    neither a committed nor a pending record nor a tombstone (DELETING). The
    store is read first: with no enrollment running, a record can only
    disappear after the simulator deleted its identity, so reading in this
    order has no false alarms."""
    return [v for v in invariant_violations(sim, store_path) if v.startswith("leaked")]


def test_extended_lease_survives_unextended_collected(sim, gsrv):
    with gsrv.channel() as ch:
        st = gsrv.stub(ch)
        keep = enroll(st, 1).ziti_identity_id
        drop = enroll(st, 4).ziti_identity_id
        t_drop = time.monotonic()
        stop = threading.Event()
        errors = []

        def extender():
            with gsrv.channel() as ch2:
                st2 = gsrv.stub(ch2)
                while not stop.wait(TTL_MS / 3000.0):
                    c = extend(st2, keep)
                    if c != grpc.StatusCode.OK:
                        errors.append(c)

        th = threading.Thread(target=extender)
        th.start()
        try:
            # the unextended one goes within TTL + MARGIN after the start
            # (a resume) + one interval (+ slack)
            wait_for(lambda: drop not in {i["id"] for i in sim.state()["identities"]},
                     FIRST_S + INTERVAL_MS / 1000.0 + 2.0, "the unextended identity to be collected")
            gone_after = time.monotonic() - t_drop
            assert gone_after >= TTL_MS / 1000.0 - 0.05, "collected before its lease expired (%.2fs)" % gone_after
            assert time.monotonic() - gsrv.t_start >= FIRST_S - 1.0, "collected within TTL + margin of the start"
            wait_for(lambda: drop not in store_records(gsrv.store_path)[0] | tombstones(gsrv.store_path), 2,
                     "its record to be removed")
            assert extend(st, drop) == grpc.StatusCode.NOT_FOUND
            # the extended one survives at least 10 sweeps
            time.sleep(10 * INTERVAL_MS / 1000.0 + 0.5)
        finally:
            stop.set()
            th.join()
        assert errors == []
        assert keep in {i["id"] for i in sim.state()["identities"]}
        assert keep in store_records(gsrv.store_path)[0]
        assert extend(st, keep) == grpc.StatusCode.OK
        # the GC log line: one per collected identity, with type and lateness
        lines = collected_lines(gsrv)
        assert lines == [(drop, "4")], lines
        # now stop extending: collected too, MARGIN past its lease (the
        # memory-first refreshes may reach the store that late)
        t_last = time.monotonic()
        wait_for(lambda: keep not in {i["id"] for i in sim.state()["identities"]},
                 TTL_MS / 1000.0 + MARGIN_S + INTERVAL_MS / 1000.0 + 2.0,
                 "the formerly extended identity to be collected")
        assert time.monotonic() - t_last >= TTL_MS / 1000.0 - 0.05
        wait_for(lambda: store_records(gsrv.store_path)[0] | tombstones(gsrv.store_path) == set(), 2,
                 "records removed")
        assert extend(st, keep) == grpc.StatusCode.NOT_FOUND
    ids = [z for z, _ in collected_lines(gsrv)]
    assert sorted(ids) == sorted([drop, keep]) and len(ids) == len(set(ids))
    wait_invariant(sim, gsrv.store_path, strict=True)


FAULTS = {
    "500": {"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "status", "status": 500}]},
    "503": {"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "status", "status": 503}]},
    "429_retry_after": {"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "status", "status": 429,
                                   "retry_after": 1}]},
    # beyond ZITI_REQUEST_TIMEOUT (2s): the controller still executes it later
    "latency": {"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "delay", "ms": 3000}]},
    "drop_applied": {"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "drop_mid",
                                "apply": True}]},
    "refused": None,
}


class Extender:
    """Keeps one lease alive from a background thread (every TTL/3)."""

    def __init__(self, srv, zid):
        self.srv, self.zid, self.errors = srv, zid, []
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run)

    def _run(self):
        with self.srv.channel() as ch:
            st = self.srv.stub(ch)
            while not self.stop.wait(TTL_MS / 3000.0):
                c = extend(st, self.zid)
                if c != grpc.StatusCode.OK:
                    self.errors.append(c)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.th.join()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faults_during_sweeps(sim, gsrv, fault):
    n = 6
    with gsrv.channel() as ch:
        st = gsrv.stub(ch)
        ids = [enroll(st, (1, 2, 4)[i % 3]).ziti_identity_id for i in range(n)]
        # a live lease that must survive everything
        live = enroll(st, 2).ziti_identity_id
    with Extender(gsrv, live) as ext:
        if fault == "refused":
            sim.refuse(True)
        else:
            sim.faults(FAULTS[fault])
        t_fault = time.monotonic()
        try:
            # leases expire and sweeps run against the faulty controller
            # (collection starts TTL + MARGIN after the start)
            end = gsrv.t_start + FIRST_S + 2.5
            while time.monotonic() < end:
                if fault != "refused":
                    leaks = no_leak(sim, gsrv.store_path)
                    assert leaks == [], "identity without a record: %s" % leaks
                time.sleep(0.1)
            assert gsrv.proc.poll() is None, "server died"
            if fault in ("500", "503", "refused"):
                # nothing could be deleted: every record is still there
                # (live, or DELETING since its collection)
                assert set(ids) | {live} <= store_records(gsrv.store_path)[0] | tombstones(gsrv.store_path)
                assert live in store_records(gsrv.store_path)[0]
                assert set(ids) <= {i["id"] for i in sim.state()["identities"]}
        finally:
            sim.refuse(False)
            sim.clear_faults()
        if fault == "refused":
            assert no_leak(sim, gsrv.store_path) == []
        assert time.monotonic() - t_fault > 3
        # healthy again: everything expired is collected; per-identity backoff
        # (1 s doubling) after a ~4 s fault window means a few seconds more
        wait_for(lambda: not (set(ids) & {i["id"] for i in sim.state()["identities"]}), 20,
                 "the expired identities to be collected after the fault")
        wait_for(lambda: store_records(gsrv.store_path)[0] == {live} and not tombstones(gsrv.store_path), 25,
                 "their records to be removed")
    assert ext.errors == []
    assert {i["id"] for i in svc_identities(sim)} == {live}
    collected = [z for z, _ in collected_lines(gsrv)]
    assert sorted(collected) == sorted(ids), "one log line per collected identity"
    with gsrv.channel() as ch:
        st = gsrv.stub(ch)
        assert extend(st, live) == grpc.StatusCode.OK
        for z in ids:
            assert extend(st, z) == grpc.StatusCode.NOT_FOUND
    wait_invariant(sim, gsrv.store_path, strict=True)
    if fault in ("500", "refused", "latency"):
        # latency: bounded by ZITI_REQUEST_TIMEOUT (2s), not the 3s delay
        assert "stays DELETING, retried in" in gsrv.logtext()
    if fault == "latency":
        assert re.search(r"lifecycle: delete \S+ failed: (timed out|deadline|timeout)", gsrv.logtext(), re.I), \
            re.findall(r"lifecycle: delete .*", gsrv.logtext())[:3]
    if fault == "429_retry_after":
        assert "HTTP 429, retrying in 1000 ms" in gsrv.logtext()


def test_session_expiry_mid_sweep(sim, gsrv):
    with gsrv.channel() as ch:
        st = gsrv.stub(ch)
        ids = [enroll(st, 1).ziti_identity_id for _ in range(4)]
    auth0 = sim.counter("POST /edge/management/v1/authenticate")
    # hold the deletes a little so the sessions expire while they are in flight
    sim.faults({"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "delay", "ms": 400,
                           "count": 4}]})
    wait_for(lambda: sim.state()["faults_applied"] >= 1, FIRST_S + 3, "a sweep to start deleting")
    sim.expire_sessions()
    wait_for(lambda: not (set(ids) & {i["id"] for i in sim.state()["identities"]}), 15, "collection")
    wait_for(lambda: store_records(gsrv.store_path)[0] | tombstones(gsrv.store_path) == set(), 5,
             "records removed")
    assert sim.counter("POST /edge/management/v1/authenticate") > auth0
    assert gsrv.proc.poll() is None
    wait_invariant(sim, gsrv.store_path, strict=True)


def test_restart_with_unreachable_controller_then_recovery(sim):
    now = zmtest.now_ms()
    live = sim.seed_identity("svc-gateway-live000001", role_attributes=["gateway-hosts"], ott=False)["id"]
    expired = sim.seed_identity("svc-runner-expired0001", role_attributes=["runners"], ott=False)["id"]
    agent = sim.seed_identity("agent-x", external_id="a9e1c0de-0000-4000-8000-000000000007", ott=False)["id"]
    p1 = sim.seed_identity("svc-gateway-pending001")["id"]  # created, never committed
    p2 = sim.seed_identity("agent-a9e1c0de-0000-4000-8000-000000000008-pend0002")["id"]
    s = zmtest.Server(sim=sim, env=gc_env(ENROLLMENT_TIMEOUT="60s", PENDING_RECOVERY_AGE="10m"))
    zmtest.seed(s.store_path,
                managed=[(agent, "a9e1c0de-0000-4000-8000-000000000007", 1)],
                service=[(live, 1, now + 3600 * 1000), (expired, 3, now - 60 * 1000)],
                pending=[("svc-gateway-pending001", 1, 1, now - 5000),
                         ("agent-a9e1c0de-0000-4000-8000-000000000008-pend0002", 2, 1, now - 5000),
                         ("svc-orchestrator-nothing01", 1, 2, now - 5000)])  # crashed before CREATE
    sim.refuse(True)
    try:
        s.start()
        with s.channel() as ch:
            st = s.stub(ch)
            # hot paths serve while the controller is unreachable
            r = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=agent), timeout=5)
            assert r.identity_id == "a9e1c0de-0000-4000-8000-000000000007"
            assert extend(st, live) == grpc.StatusCode.OK
            time.sleep(1.5)  # several sweeps fail
            for _ in range(50):
                st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=agent), timeout=5)
            svc, man, pend = store_records(s.store_path)
            assert svc == {live, expired} and man == {agent} and len(pend) == 3
            assert s.proc.poll() is None
        sim.refuse(False)
        # a seeded store is a fresh start: pending rows wait until the clock
        # has been steady for ZITI_REQUEST_TIMEOUT + MARGIN, the expired
        # lease for TTL + MARGIN
        wait_for(lambda: store_records(s.store_path)[2] == set(), 25, "pending records to be recovered")
        wait_for(lambda: store_records(s.store_path)[0] == {live}, 25, "the expired lease to be collected")
        wait_for(lambda: not tombstones(s.store_path), 15, "the deletes to finish")
        ids = {i["id"] for i in sim.state()["identities"]}
        assert ids == {live, agent}, ids  # p1, p2 and `expired` deleted
        assert p1 not in ids and p2 not in ids
        assert [z for z, _ in collected_lines(s)] == [expired]
        log = s.logtext()
        assert len(RECOVERED_RE.findall(log)) == 3, RECOVERED_RE.findall(log)
        wait_invariant(sim, s.store_path, strict=True)
    finally:
        sim.refuse(False)
        dispose(s)


def test_sigterm_during_a_busy_recovery_sweep_exits_promptly(sim):
    """SIGTERM while a sweep still has pending records it has not started:
    the sweep starts nothing new and the service exits 0 within its grace
    (a stopped sweep once waited forever for work it would never start)."""
    s = zmtest.Server(sim=sim, env={"SERVICE_IDENTITY_GC_CONCURRENCY": "2", "SHUTDOWN_GRACE": "2s",
                                    "ZITI_REQUEST_TIMEOUT": "1s", "LEASE_FLUSH_INTERVAL": "%dms" % FLUSH_MS,
                                    "SERVICE_IDENTITY_GC_INTERVAL": "%dms" % INTERVAL_MS})
    old = zmtest.now_ms() - 3600 * 1000
    zmtest.seed(s.store_path, pending=[("svc-gateway-pend%03d" % i, 1, 1, old) for i in range(60)])
    sim.faults({"latency_ms": 300})
    try:
        s.start()
        # recovery starts once the clock was steady for ZITI_REQUEST_TIMEOUT
        # + MARGIN after the start; then it is busy, 2 at a time
        wait_for(lambda: "recover: " in s.logtext(), 1.0 + MARGIN_S + 5, "recovery to start")
        time.sleep(0.3)
        assert s.stop(timeout=20) == 0
        # it stopped early: what was not reached stays for the next process
        left = zmtest.query(s.store_path, "SELECT count(*) FROM pending_identities")[0][0]
        assert 0 < left <= 60
    finally:
        sim.faults({})
        s.kill()
