"""Durable identity lifecycle (issue 10): one fault test per defect listed
under "Why", against the real binary, the controller simulator and the
store (SQLite, or PostgreSQL with ZM_TEST_BACKEND=pg).

Every test here failed against the code before issue 10 (commit dbcb2d5):
  (a) an outage longer than the TTL deleted every live lease at restart;
  (b) start-up recovery dropped the pending record of a create that landed
      later (a leak);
  (c) a confirmed controller delete whose record removal failed went back
      to LIVE (a zombie lease);
  (d) ambiguous delete failures reverted to LIVE, and a crash between the
      controller DELETE and the record removal reloaded the row as LIVE;
  (e) a failed COMMIT plus a failed compensation left an identity with no
      record;
  (f) two concurrent CreateAgentIdentity calls for one agent returned a dead
      identity and left a dangling mapping.
Faults are injected with the simulator's fault rules and with triggers on
the store's tables, added through a second connection while the server runs.
Where a test installs a trigger on the table a removal deletes from, it picks
deleting_identities (the tombstones, issue 10) or, on the schema before
issue 10 (no such table), service_identities, so that it tests the same
moment on both.
"""

import shutil
import threading
import time
import uuid

import grpc
import pytest

import zmtest
from zmtest import pb
from test_enroll import (dispose, invariant_violations, rpc_code, store_records, svc_identities, tombstones,
                         wait_for, wait_invariant)

IDS = "/edge/management/v1/identities"
DELETES = "DELETE /edge/management/v1/identities/{id}"
CREATES = "POST /edge/management/v1/identities"

FLUSH_S = 0.2
# zm_life_margin_ms: OUTAGE_GAP (5 s) + 2 flush intervals + 2 heartbeats
MARGIN_S = 5.0 + 2 * FLUSH_S + 2.0
FAST = {"SERVICE_IDENTITY_GC_INTERVAL": "500ms", "ZITI_REQUEST_TIMEOUT": "2s", "ENROLLMENT_TIMEOUT": "3s",
        "LEASE_FLUSH_INTERVAL": "%dms" % int(FLUSH_S * 1000)}


def env(**kw):
    e = dict(FAST)
    e.update(kw)
    return e


@pytest.fixture
def servers():
    """Servers a test starts; killed and shown (log tail, on failure) after it."""
    started = []
    yield started
    for s in started:
        s.kill()
    for s in started:
        print("---- server %s log (tail) ----\n%s" % (s.addr, s.logtext()[-12000:]))
        shutil.rmtree(s.tmp, ignore_errors=True)


def start(servers, sim, store_path=None, **kw):
    s = zmtest.Server(sim=sim, store_path=store_path, env=env(**kw))
    servers.append(s)
    return s.start()


def enroll(st, stype=1):
    return st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=stype), timeout=30).ziti_identity_id


def extend(st, zid):
    return rpc_code(st.ExtendIdentityLease, pb.ExtendIdentityLeaseRequest(ziti_identity_id=zid), timeout=5)[0]


def on_sim(sim):
    return {i["id"] for i in sim.state()["identities"]}


# ---- trigger injection ----------------------------------------------------------


def add_failing_trigger(store, table, op):
    """Makes every `op` (INSERT / DELETE) on `table` fail, through a second
    connection while the server runs."""
    if zmtest.store_url(store):
        zmtest.execute_script(store, """
            CREATE OR REPLACE FUNCTION zm_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected'; END $$;
            CREATE TRIGGER zm_test_fail BEFORE %s ON %s FOR EACH ROW EXECUTE FUNCTION zm_test_fail();
        """ % (op, table))
    else:
        zmtest.execute_script(store, "CREATE TRIGGER zm_test_fail BEFORE %s ON %s "
                                     "BEGIN SELECT RAISE(ABORT, 'injected'); END;" % (op, table))


def drop_failing_trigger(store, table):
    if zmtest.store_url(store):
        zmtest.execute_script(store, "DROP TRIGGER IF EXISTS zm_test_fail ON %s" % table)
    else:
        zmtest.execute_script(store, "DROP TRIGGER IF EXISTS zm_test_fail")


def removal_table(store):
    """The table a confirmed controller delete removes the record from."""
    return "deleting_identities" if zmtest.table_exists(store, "deleting_identities") else "service_identities"


# ============================================================================
# (a) an outage longer than the TTL
# ============================================================================


def test_outage_longer_than_ttl_keeps_live_leases(sim, servers):
    """TTL 3 s; the service is stopped for 6.5 s (> TTL, > the 5 s outage
    gap) while its pod keeps trying to extend. After the restart the pod's
    next extend answers OK and the identity survives the first sweeps and
    then as long as the pod extends; an identity nobody extends any more is
    still collected once TTL + margin past the resume have passed."""
    s = start(servers, sim, SERVICE_IDENTITY_LEASE_TTL="3s")
    with s.channel() as ch:
        st = s.stub(ch)
        live = enroll(st, 1)
        idle = enroll(st, 4)
        assert extend(st, live) == grpc.StatusCode.OK
    assert s.stop() == 0
    t_stop = time.monotonic()
    with s.channel() as ch:  # the pod's extends fail meanwhile
        assert extend(s.stub(ch), live) == grpc.StatusCode.UNAVAILABLE
    time.sleep(max(0.0, 6.5 - (time.monotonic() - t_stop)))
    s2 = start(servers, sim, store_path=s.store_path, SERVICE_IDENTITY_LEASE_TTL="3s")
    t_up = time.monotonic()
    time.sleep(1.6)  # the first sweeps (every 500 ms) ran
    assert {live, idle} <= on_sim(sim), "a lease was collected at the first sweeps after the outage"
    with s2.channel() as ch:
        st = s2.stub(ch)
        assert extend(st, live) == grpc.StatusCode.OK, "the pod's first extend after the outage"
        # the pod goes on extending (every second, TTL 3 s) past the point
        # where collection resumes (resume + TTL + margin)
        until = t_up + 3.0 + MARGIN_S + 2.5
        while time.monotonic() < until:
            assert extend(st, live) == grpc.StatusCode.OK
            assert live in on_sim(sim)
            time.sleep(1.0)
        # the identity nobody extends is collected once the outage rule allows it
        wait_for(lambda: idle not in on_sim(sim), 10, "the unextended identity to be collected")
        assert time.monotonic() - t_up >= 3.0 + MARGIN_S - 1.0, "collected within TTL + margin of the resume"
        assert extend(st, idle) == grpc.StatusCode.NOT_FOUND
        assert extend(st, live) == grpc.StatusCode.OK
    assert live in on_sim(sim)
    wait_invariant(sim, s2.store_path, strict=True)


# ============================================================================
# (b) a create that the controller performs late
# ============================================================================


def test_late_create_after_crash_is_not_leaked(sim, servers):
    """The controller holds a create for 6 s and carries it out although the
    client went away; the service is SIGKILLed 1 s in and restarted at once.
    Recovery must not drop the pending record before the create can no
    longer land; once it landed, the identity is deleted: nothing leaks."""
    s = start(servers, sim)
    with s.channel() as ch:
        enroll(s.stub(ch), 2)  # warm: session, CA bundle
    creates0 = sim.counter(CREATES)
    sim.faults({"rules": [{"method": "POST", "path_prefix": IDS, "action": "delay", "ms": 6000, "count": 1,
                           "apply": True}]})
    ch = s.channel()
    fut = s.stub(ch).RequestServiceIdentity.future(pb.RequestServiceIdentityRequest(service_type=1), timeout=30)
    wait_for(lambda: sim.counter(CREATES) > creates0, 5, "the create to reach the controller")
    t_create = time.monotonic()
    pend = store_records(s.store_path)[2]
    assert len(pend) == 1, pend  # INTENT is durable before the create is sent
    (name,) = pend
    time.sleep(1.0)
    s.kill()
    assert fut.exception() is not None
    ch.close()
    s2 = start(servers, sim, store_path=s.store_path)
    # until the create lands, and for a while after, every identity the
    # controller has is accounted for: the pending record is kept
    while True:
        v = invariant_violations(sim, s2.store_path)
        assert v == [], v
        late = [i["id"] for i in sim.state()["identities"] if i["name"] == name]
        if late:
            break
        assert time.monotonic() - t_create < 9, "the late create never landed"
        time.sleep(0.05)
    assert sim.state()["late_applied"] == 1
    v = invariant_violations(sim, s2.store_path)
    assert v == [], "the pending record was dropped before the create landed: %s" % v
    # then recovery resolves it: the late identity is deleted on the controller
    wait_for(lambda: late[0] not in on_sim(sim), 30, "the late identity to be deleted")
    wait_invariant(sim, s2.store_path, strict=True, timeout=20)
    assert len(svc_identities(sim)) == 1  # the warm-up one


# ============================================================================
# (c) a confirmed controller delete whose record removal fails
# ============================================================================


def test_confirmed_delete_with_failed_removal_never_turns_live(sim, servers):
    s = start(servers, sim, SERVICE_IDENTITY_LEASE_TTL="1s")
    table = removal_table(s.store_path)
    with s.channel() as ch:
        st = s.stub(ch)
        zid = enroll(st, 1)
        add_failing_trigger(s.store_path, table, "DELETE")
        try:
            wait_for(lambda: zid not in on_sim(sim), 1.0 + MARGIN_S + 10, "the lease to be collected")
            # the controller deleted it, the removal failed: never OK again
            t_end = time.monotonic() + 3.0  # several sweeps
            while time.monotonic() < t_end:
                assert extend(st, zid) == grpc.StatusCode.NOT_FOUND, "a deleted identity's lease is live again"
                time.sleep(0.1)
            assert zid not in store_records(s.store_path)[0]
            if table == "deleting_identities":
                assert zid in tombstones(s.store_path)
        finally:
            drop_failing_trigger(s.store_path, table)
        # a later retry finds it gone (404) and removes the tombstone
        wait_invariant(sim, s.store_path, strict=True, timeout=25)
        assert extend(st, zid) == grpc.StatusCode.NOT_FOUND
    assert s.proc.poll() is None


# ============================================================================
# (d) ambiguous delete failures; a crash between DELETE and removal
# ============================================================================

AMBIGUOUS = {
    # not carried out, twice: retried until it is
    "500": {"action": "status", "status": 500, "count": 2},
    # carried out, but the answer is a 500 / a connection lost mid-response
    "500_applied": {"action": "status", "status": 500, "count": 1, "apply": True},
    "drop_mid_applied": {"action": "drop_mid", "count": 1, "apply": True},
    # no first byte within ZITI_REQUEST_TIMEOUT (2 s); carried out at 3 s
    "first_byte_timeout": {"action": "delay", "ms": 3000, "count": 1, "apply": True},
}


@pytest.mark.parametrize("fault", sorted(AMBIGUOUS))
def test_ambiguous_delete_stays_deleting_until_done(sim, servers, fault):
    s = start(servers, sim, SERVICE_IDENTITY_LEASE_TTL="1s")
    with s.channel() as ch:
        st = s.stub(ch)
        keep = enroll(st, 2)
        zid = enroll(st, 1)
        rule = dict(AMBIGUOUS[fault], method="DELETE", path_prefix=IDS + "/" + zid)
        sim.faults({"rules": [rule]})
        deletes0 = sim.counter(DELETES)
        stop = threading.Event()
        errors = []

        def pod():  # `keep` is extended all along
            with s.channel() as ch2:
                st2 = s.stub(ch2)
                while not stop.wait(0.3):
                    c = extend(st2, keep)
                    if c != grpc.StatusCode.OK:
                        errors.append(c)

        th = threading.Thread(target=pod)
        th.start()
        try:
            wait_for(lambda: sim.counter(DELETES) > deletes0, 1.0 + MARGIN_S + 10, "the lease to be collected")
            # from the first DELETE on: DELETING, never OK, until it is gone
            seen_tomb = False
            t_end = time.monotonic() + 30
            while True:
                c = extend(st, zid)
                assert c == grpc.StatusCode.NOT_FOUND, "extend during an ambiguous delete answered %s" % c
                tombs = tombstones(s.store_path)
                seen_tomb |= zid in tombs
                assert zid not in store_records(s.store_path)[0]
                if zid not in on_sim(sim) and zid not in tombs:
                    break
                assert time.monotonic() < t_end, "the delete was not finished"
                time.sleep(0.1)
        finally:
            stop.set()
            th.join()
            sim.clear_faults()
        assert sim.counter(DELETES) >= deletes0 + 2, "the ambiguous delete was not retried"
        if fault == "500":
            assert sim.counter(DELETES) >= deletes0 + 3
        assert extend(st, zid) == grpc.StatusCode.NOT_FOUND
        assert errors == []
        assert extend(st, keep) == grpc.StatusCode.OK
    assert keep in on_sim(sim)
    wait_invariant(sim, s.store_path, strict=True, timeout=20)


def test_crash_between_controller_delete_and_removal_reloads_deleting(sim, servers):
    """The controller deleted the identity, the process died before the
    record was removed (held there by a failing trigger, then SIGKILL). The
    restarted service must answer NOT_FOUND for it, even while the
    controller is unreachable (no sweep can clean up first), and recovery
    finishes the delete once it is reachable."""
    s = start(servers, sim, SERVICE_IDENTITY_LEASE_TTL="1s")
    table = removal_table(s.store_path)
    with s.channel() as ch:
        st = s.stub(ch)
        zid = enroll(st, 4)
        add_failing_trigger(s.store_path, table, "DELETE")
        wait_for(lambda: zid not in on_sim(sim), 1.0 + MARGIN_S + 10, "the controller delete")
        time.sleep(0.3)  # the removal was attempted (and failed)
    s.kill()
    drop_failing_trigger(s.store_path, table)
    assert zid not in store_records(s.store_path)[0] or table == "service_identities"
    sim.refuse(True)
    try:
        s2 = start(servers, sim, store_path=s.store_path, SERVICE_IDENTITY_LEASE_TTL="1s")
        with s2.channel() as ch:
            st = s2.stub(ch)
            for _ in range(10):
                assert extend(st, zid) == grpc.StatusCode.NOT_FOUND, "reloaded as a live lease"
                time.sleep(0.1)
    finally:
        sim.refuse(False)
    wait_invariant(sim, s2.store_path, strict=True, timeout=30)
    with s2.channel() as ch:
        assert extend(s2.stub(ch), zid) == grpc.StatusCode.NOT_FOUND


# ============================================================================
# (e) a failed COMMIT plus a failed compensation
# ============================================================================


def test_failed_commit_and_failed_compensation_leaks_nothing(sim, servers):
    s = start(servers, sim)
    with s.channel() as ch:
        st = s.stub(ch)
        warm = enroll(st, 2)
        add_failing_trigger(s.store_path, "service_identities", "INSERT")
        sim.faults({"rules": [{"method": "DELETE", "path_prefix": IDS + "/", "action": "status", "status": 500}]})
        try:
            code, r = rpc_code(st.RequestServiceIdentity, pb.RequestServiceIdentityRequest(service_type=1),
                               timeout=30)
            assert code != grpc.StatusCode.OK, r
            assert len(svc_identities(sim)) == 2  # created, not compensated
            # the identity keeps a record (pending or DELETING) through
            # several recovery sweeps while the controller refuses deletes
            t_end = time.monotonic() + 4
            while time.monotonic() < t_end:
                v = invariant_violations(sim, s.store_path)
                assert v == [], v
                time.sleep(0.1)
        finally:
            sim.clear_faults()
            drop_failing_trigger(s.store_path, "service_identities")
        # eventually it is deleted on the controller
        wait_invariant(sim, s.store_path, strict=True, timeout=30)
        assert {i["id"] for i in svc_identities(sim)} == {warm}
        assert extend(st, warm) == grpc.StatusCode.OK


# ============================================================================
# (f) two CreateAgentIdentity calls for the same agent at once
# ============================================================================


def test_concurrent_create_agent_identity_same_agent(sim, servers):
    s = start(servers, sim)
    """The second call starts 0..240 ms after the first (every controller
    request takes 60 ms more): at some offsets both run at once; before
    issue 10 the second then found the first one's new identity by
    externalId and deleted it while the first was about to return it."""
    chans = [s.channel() for _ in range(2)]
    try:
        stubs = [s.stub(c) for c in chans]
        with s.channel() as ch:  # warm: session, CA bundle
            s.stub(ch).CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=str(uuid.uuid4())), timeout=30)
        sim.faults({"latency_ms": 60})
        for offset_ms in range(0, 260, 20):
            agent = str(uuid.uuid4())
            req = pb.CreateAgentIdentityRequest(agent_id=agent)
            futs = [stubs[0].CreateAgentIdentity.future(req, timeout=30)]
            time.sleep(offset_ms / 1000.0)
            futs.append(stubs[1].CreateAgentIdentity.future(req, timeout=30))
            out = [rpc_code(f.result) for f in futs]
            codes = sorted(c.name for c, _ in out)
            assert codes in (["ABORTED", "OK"], ["OK", "OK"]), (offset_ms, [(c, r) for c, r in out])
            oks = [r.ziti_identity_id for c, r in out if c == grpc.StatusCode.OK]
            mapped = [z for (z,) in zmtest.query(s.store_path, "SELECT ziti_identity_id FROM managed_identities "
                                                               "WHERE identity_id=?", (agent,))]
            assert len(mapped) == 1, mapped  # one live identity per agent
            live = on_sim(sim)
            assert mapped[0] in live, "offset %d ms: the agent's mapping points at a deleted identity" % offset_ms
            assert mapped[0] in oks
            for z in oks:
                code, r = rpc_code(stubs[0].ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=z),
                                   timeout=5)
                if z == mapped[0]:
                    assert code == grpc.StatusCode.OK and r.identity_id == agent
                    assert z in live
                else:  # serialized: the later call replaced it
                    assert code == grpc.StatusCode.NOT_FOUND, \
                        "offset %d ms: a replaced identity still resolves" % offset_ms
            if codes == ["ABORTED", "OK"]:
                assert oks == mapped
    finally:
        sim.clear_faults()
        for c in chans:
            c.close()
    wait_invariant(sim, s.store_path, strict=True, timeout=20)
