"""The audit log over a whole identity lifecycle, through the real binary and
the controller simulator: every lifecycle event is one JSON line with its
event name and the identity, and no line carries a secret."""

import json
import os
import time

import grpc
import pytest

import zmtest
from zmtest import pb

IDS = "/edge/management/v1/identities"
AGENT = "5f0c1d2e-3a4b-4c5d-8e6f-708192a3b4c5"


def events(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))  # every line is one JSON object
    return out


def wait_event(path, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and any(pred(e) for e in events(path)):
            return
        time.sleep(0.1)
    raise AssertionError("no audit event for %s in %.0fs:\n%s" %
                         (what, timeout, open(path).read() if os.path.exists(path) else "(no file)"))


def test_audit_events_of_a_full_lifecycle(sim, tmp_path):
    audit = str(tmp_path / "audit.log")
    s = zmtest.Server(sim=sim, env={"AUDIT_LOG": audit, "SERVICE_IDENTITY_LEASE_TTL": "2s",
                                    "SERVICE_IDENTITY_GC_INTERVAL": "500ms",
                                    "LEASE_FLUSH_INTERVAL": "200ms", "ZITI_REQUEST_TIMEOUT": "2s"})
    secrets = []
    try:
        s.start()
        st = s.stub()
        # issued
        r = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1), timeout=30)
        ident = json.loads(r.identity_json)
        secrets.append(ident["id"]["key"].split("pem:")[-1].strip().splitlines()[1])
        # created, then replaced
        a1 = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=AGENT), timeout=30)
        secrets.append(a1.enrollment_jwt)
        a2 = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=AGENT), timeout=30)
        secrets.append(a2.enrollment_jwt)
        # deleted by a caller
        st.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=a2.ziti_identity_id), timeout=30)
        # a failed enrollment compensated (the enroll step fails once)
        sim.faults({"rules": [{"method": "POST", "path_prefix": "/edge/client/v1/enroll", "action": "status",
                               "status": 400, "count": 1}]})
        with pytest.raises(grpc.RpcError):
            st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=2), timeout=30)
        sim.faults({})
        # the lease of the first identity runs out (no extension): collected after TTL + margin
        wait_event(audit, lambda e: e.get("event") == "lease_expired" and e.get("id") == r.ziti_identity_id,
                   30, "lease_expired")
        wait_event(audit, lambda e: e.get("event") == "identity_deleted" and e.get("id") == r.ziti_identity_id,
                   10, "identity_deleted after collection")
    finally:
        s.stop()
    ev = events(audit)
    names = [e.get("event") for e in ev]
    for want in ("service_identity_issued", "agent_identity_replaced", "identity_retired", "identity_deleted",
                 "compensated", "lease_expired"):
        assert want in names, (want, names)
    issued = [e for e in ev if e.get("event") == "service_identity_issued" and e.get("status") == "OK"]
    assert issued and issued[0]["id"] == r.ziti_identity_id and issued[0]["service_type"]
    replaced = [e for e in ev if e.get("event") == "agent_identity_replaced"]
    assert replaced[0]["agent"] == AGENT and replaced[0]["old_id"] == a1.ziti_identity_id
    deleted = {e["id"] for e in ev if e.get("event") == "identity_deleted"}
    assert {a1.ziti_identity_id, a2.ziti_identity_id, r.ziti_identity_id} <= deleted
    assert all(e.get("msg") == "audit" and e.get("time") for e in ev)
    text = open(audit).read()
    for sec in secrets:
        assert sec not in text
    assert "BEGIN" not in text and "PRIVATE KEY" not in text
