"""The current contract (issue 12): every RPC of the 29 against the strict
controller simulator, its failure paths, the crash points of the multi-step
creates and deletes, and a client built from the 6-RPC contract.

The invariant checked after every failure and every recovery: nothing on the
controller without a record (a mapping, a lease, a pending intent or a
tombstone - or, for the identities and objects whose ids the caller keeps,
a successful answer), and nothing recorded that the controller lacks.
"""

import concurrent.futures
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
import pytest

import zmtest
from zmtest import pb
from test_enroll import dispose, rpc_code, wait_for

FAST = {"ENROLLMENT_TIMEOUT": "3s", "ZITI_REQUEST_TIMEOUT": "2s", "LEASE_FLUSH_INTERVAL": "200ms",
        "SERVICE_IDENTITY_GC_INTERVAL": "500ms"}
MGMT = "/edge/management/v1"
OK = grpc.StatusCode.OK
HOST = dict(protocol="tcp", address="backend.svc", port=8080)
ICPT = dict(protocols=["tcp"], addresses=["app.ziti"], port_ranges=[dict(low=443, high=443)])


def U():
    return str(uuid.uuid4())


@pytest.fixture
def srv(sim):
    s = zmtest.Server(sim=sim, env=FAST).start()
    yield s
    dispose(s)


@pytest.fixture
def st(srv):
    ch = srv.channel()
    yield srv.stub(ch)
    ch.close()


def ident(sim, zid):
    return [i for i in sim.state()["identities"] if i["id"] == zid]


def objects(sim):
    s = sim.state()
    return ({o["name"]: o for o in s["services"]}, {o["name"]: o for o in s["configs"]},
            {o["name"]: o for o in s["policies"]})


def records(store):
    q = zmtest.query
    return ({r[0] for r in q(store, "SELECT ziti_identity_id FROM managed_identities")},
            {r[0] for r in q(store, "SELECT ziti_identity_id FROM service_identities")},
            {r[0] for r in q(store, "SELECT name FROM pending_identities")},
            {r[0] for r in q(store, "SELECT ziti_identity_id FROM deleting_identities")})


def violations(sim, store, kept=()):
    """kept: controller ids the caller holds (devices, tunnels, services, ...)."""
    man, svc, pend, tombs = records(store)
    s = sim.state()
    out = []
    for i in s["identities"]:
        if i["id"] in man or i["id"] in svc or i["id"] in tombs or i["id"] in kept:
            continue
        if i["name"] in pend or ("device:" + i["name"]) in pend:
            continue
        out.append("identity %s (%s) on the controller without a record" % (i["id"], i["name"]))
    for kind in ("services", "configs", "policies"):
        for o in s[kind]:
            if o["id"] in kept or o["id"] in tombs:
                continue
            if any(p.endswith(":" + o["name"]) or ("service:" + p.split(":", 1)[-1] + "-") in ("service:" + o["name"])
                   for p in pend):
                continue
            out.append("%s %s (%s) on the controller without a record" % (kind, o["id"], o["name"]))
    ids = {i["id"] for i in s["identities"]}
    for zid in man | svc:
        if zid not in ids:
            out.append("record %s whose identity the controller lacks" % zid)
    return out


def settle(sim, store, kept=(), timeout=40):
    """Waits until recovery resolved every intent and tombstone, then checks
    the invariant strictly."""
    wait_for(lambda: not records(store)[2] and not records(store)[3], timeout, "pending rows and tombstones to go",
             interval=0.2)
    v = violations(sim, store, kept)
    assert not v, "\n".join(v)


def faults(sim, *rules):
    sim.faults({"rules": list(rules)})


# ============================================================================
# identities
# ============================================================================


def test_agent_with_options_and_resolve(sim, srv, st):
    agent, wl, cls, env = U(), U(), U(), U()
    r = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(
        agent_id=agent.upper(), workload_id=wl, agent_class_id=cls, environment_id=env,
        additional_role_attributes=["group-1", "agents", "", "group-1"], tags={"agyn.workload.id": wl}), timeout=20)
    assert r.ziti_identity_id and r.enrollment_jwt.count(".") == 2
    (i,) = ident(sim, r.ziti_identity_id)
    assert i["roleAttributes"] == ["agents", "agent-" + agent, "workload-" + wl, "group-1"]
    assert i["externalId"] == wl and i["tags"] == {"agyn.workload.id": wl}
    assert re.fullmatch("agent-%s-[0-9a-f]{8}" % agent, i["name"]), i["name"]
    res = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert res.identity_id == agent and res.identity_type == pb.IDENTITY_TYPE_AGENT_INSTANCE
    assert res.workload_id == wl and res.agent_id == cls and res.environment_id == env
    # without class and environment: absent, not empty
    r2 = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=U(), workload_id=U()), timeout=20)
    res2 = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r2.ziti_identity_id), timeout=5)
    assert res2.HasField("workload_id") and not res2.HasField("agent_id") and not res2.HasField("environment_id")
    # the fields survive a restart (loaded from the store)
    srv.stop()
    srv.start()
    with srv.channel() as ch:
        res = srv.stub(ch).ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
        assert (res.workload_id, res.agent_id, res.environment_id) == (wl, cls, env)
        lst = srv.stub(ch).ListManagedIdentities(
            pb.ListManagedIdentitiesRequest(identity_type=pb.IDENTITY_TYPE_AGENT_INSTANCE), timeout=5)
        assert {m.ziti_identity_id for m in lst.identities} == {r.ziti_identity_id, r2.ziti_identity_id}
        assert all(m.ziti_service_id == "" for m in lst.identities)


@pytest.mark.parametrize("req,msg", [
    (dict(agent_id="nope", workload_id=U()), "agent_id"),
    (dict(agent_id=U(), workload_id="x"), "workload_id"),
    (dict(agent_id=U(), workload_id=U(), agent_class_id="bad"), "agent_class_id"),
    (dict(agent_id=U(), workload_id=U(), environment_id="bad"), "environment_id"),
    (dict(agent_id=""), "agent_id: value is empty"),
])
def test_agent_validation(sim, st, req, msg):
    code, e = rpc_code(st.CreateAgentIdentity, pb.CreateAgentIdentityRequest(**req), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg in e.details()
    assert len(sim.state()["identities"]) == 0


def test_agent_jwt_fetch_failure_is_compensated(sim, srv, st):
    """The Go service leaks the identity here; this one deletes it."""
    faults(sim, {"method": "GET", "path_prefix": MGMT + "/identities/", "status": 400, "count": 1})
    code, _ = rpc_code(st.CreateAgentIdentity, pb.CreateAgentIdentityRequest(agent_id=U(), workload_id=U()),
                       timeout=20)
    assert code != OK
    faults(sim)
    settle(sim, srv.store_path)
    assert sim.state()["identities"] == []


def test_sandbox(sim, srv, st):
    sb, owner, env, wl = U(), U(), U(), U()
    r = st.CreateSandboxIdentity(pb.CreateSandboxIdentityRequest(
        sandbox_id=sb, owner_id=owner, environment_id=env, organization_id=" org-1 ", workload_id=wl,
        additional_role_attributes=["llm-native-x"], tags={"agyn.sandbox.id": sb}), timeout=20)
    (i,) = ident(sim, r.ziti_identity_id)
    assert i["roleAttributes"] == ["agents", "sandbox-" + sb, "sandbox-owner-" + owner, "environment-" + env,
                                   "organization-org-1", "workload-" + wl, "llm-native-x"]
    assert i["externalId"] == wl
    res = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert res.identity_type == pb.IDENTITY_TYPE_SANDBOX and res.identity_id == sb
    assert res.workload_id == wl and res.environment_id == env and not res.HasField("agent_id")
    code, e = rpc_code(st.CreateSandboxIdentity, pb.CreateSandboxIdentityRequest(
        sandbox_id=sb, owner_id=owner, environment_id=env, organization_id="  ", workload_id=wl), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "organization_id" in e.details()


def test_app_identity_reenrols_and_deletes(sim, srv, st):
    app = U()
    r1 = st.CreateAppIdentity(pb.CreateAppIdentityRequest(identity_id=app, slug="web", tags={"a": "1"}), timeout=30)
    doc = json.loads(r1.identity_json)
    assert doc["id"]["cert"].startswith("pem:") and doc["ztAPI"].endswith("/edge/client/v1")
    (i,) = ident(sim, r1.ziti_identity_id)
    assert i["roleAttributes"] == ["apps", "app-" + app] and i["externalId"] == app and i["enrolled"]
    r2 = st.CreateAppIdentity(pb.CreateAppIdentityRequest(identity_id=app, slug="web"), timeout=30)
    assert r2.ziti_identity_id != r1.ziti_identity_id
    wait_for(lambda: not ident(sim, r1.ziti_identity_id), 10, "the previous app identity to go")
    man = zmtest.query(srv.store_path, "SELECT ziti_identity_id, identity_type FROM managed_identities")
    assert man == [(r2.ziti_identity_id, pb.IDENTITY_TYPE_APP)]
    svc = st.CreateService(pb.CreateServiceRequest(name="app-web", role_attributes=["app-services"],
                                                   host_v1_config=pb.HostV1Config(**HOST)), timeout=20)
    # without a service id and a row that has none: the identity goes, then INTERNAL (as the Go service)
    code, e = rpc_code(st.DeleteAppIdentity, pb.DeleteAppIdentityRequest(identity_id=app), timeout=10)
    assert code == grpc.StatusCode.INTERNAL
    assert e.details() == "managed identity %s missing ziti service id" % app
    assert sim.state()["identities"] == []
    assert zmtest.query(srv.store_path, "SELECT ziti_identity_id FROM managed_identities") == []
    st.DeleteAppIdentity(pb.DeleteAppIdentityRequest(identity_id=app, ziti_service_id=svc.ziti_service_id),
                         timeout=20)
    s, c, _ = objects(sim)
    assert s == {} and c == {}  # the service and its config
    assert sim.state()["identities"] == []
    code, e = rpc_code(st.DeleteAppIdentity, pb.DeleteAppIdentityRequest(identity_id=app), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ziti_service_id is required" in e.details()
    # again with the (now gone) service: idempotent
    st.DeleteAppIdentity(pb.DeleteAppIdentityRequest(identity_id=app, ziti_service_id=svc.ziti_service_id),
                         timeout=20)
    settle(sim, srv.store_path)


def test_app_enrollment_failure_is_compensated(sim, srv, st):
    faults(sim, {"method": "POST", "path_prefix": "/edge/client/v1/enroll", "status": 400, "count": 1})
    code, _ = rpc_code(st.CreateAppIdentity, pb.CreateAppIdentityRequest(identity_id=U(), slug="x"), timeout=30)
    assert code == grpc.StatusCode.INTERNAL
    faults(sim)
    settle(sim, srv.store_path)
    assert sim.state()["identities"] == []


def test_runner_identity(sim, srv, st):
    rid = U()
    code, e = rpc_code(st.CreateRunnerIdentity, pb.CreateRunnerIdentityRequest(runner_id=rid), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role_attributes is required" in e.details()
    r = st.CreateRunnerIdentity(pb.CreateRunnerIdentityRequest(runner_id=rid, role_attributes=["runners", "runners"]),
                                timeout=30)
    (i,) = ident(sim, r.ziti_identity_id)
    assert i["roleAttributes"] == ["runners", "runners"]  # verbatim
    res = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert res.identity_type == pb.IDENTITY_TYPE_RUNNER and res.identity_id == rid
    st.DeleteRunnerIdentity(pb.DeleteRunnerIdentityRequest(identity_id=rid), timeout=20)
    assert sim.state()["identities"] == []
    code, _ = rpc_code(st.DeleteRunnerIdentity, pb.DeleteRunnerIdentityRequest(identity_id=rid), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND
    settle(sim, srv.store_path)


def test_device_identity(sim, srv, st):
    user = U()
    r = st.CreateDeviceIdentity(pb.CreateDeviceIdentityRequest(user_identity_id=user, name=" laptop ",
                                                               additional_role_attributes=["group-a"]), timeout=20)
    (i,) = ident(sim, r.ziti_identity_id)
    assert i["name"] == "laptop" and i["externalId"] == user
    assert i["roleAttributes"] == ["devices", "user-" + user, "group-a"]
    # no record of ours (the Users service keeps the id), no pending row left
    assert records(srv.store_path) == (set(), set(), set(), set())
    # a second device of that name: refused before anything is created
    code, _ = rpc_code(st.CreateDeviceIdentity, pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="laptop"),
                       timeout=20)
    assert code == grpc.StatusCode.INTERNAL
    assert len(sim.state()["identities"]) == 1
    live = st.GetIdentityLiveness(pb.GetIdentityLivenessRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert live.enrollment_state == pb.IDENTITY_ENROLLMENT_STATE_PENDING and not live.has_edge_router_connection
    st.DeleteDeviceIdentity(pb.DeleteDeviceIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=10)
    st.DeleteDeviceIdentity(pb.DeleteDeviceIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=10)
    assert sim.state()["identities"] == []
    settle(sim, srv.store_path)


def test_device_create_refused_spares_the_other_identity(sim, srv, st):
    # The name is free when checked; while our create is held, somebody else creates it. The controller refuses
    # ours as a duplicate: nothing of ours exists, and the identity under that name is not ours to delete.
    faults(sim, {"method": "POST", "path_prefix": MGMT + "/identities", "action": "delay", "ms": 1500, "count": 1})
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(rpc_code, st.CreateDeviceIdentity,
                        pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="taken"), timeout=20)
        time.sleep(0.5)
        other = sim.seed_identity("taken")
        code, _ = fut.result()
    faults(sim)
    assert code == grpc.StatusCode.INTERNAL
    settle(sim, srv.store_path, kept=(other["id"],))
    assert [i["id"] for i in sim.state()["identities"]] == [other["id"]]


def test_device_jwt_failure_is_compensated(sim, srv, st):
    faults(sim, {"method": "GET", "path_prefix": MGMT + "/identities/", "status": 400, "count": 1})
    code, _ = rpc_code(st.CreateDeviceIdentity, pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="d1"),
                       timeout=20)
    assert code != OK
    faults(sim)
    settle(sim, srv.store_path)
    assert sim.state()["identities"] == []


def test_tunnel_identity_and_patch(sim, srv, st):
    r = st.CreateTunnelIdentity(pb.CreateTunnelIdentityRequest(network_id="net-1", tunnel_credential_id="cred-1",
                                                               tags={"agyn.network": "net-1"}), timeout=20)
    (i,) = ident(sim, r.ziti_identity_id)
    assert i["name"].startswith("tunnel-cred-1-") and i["externalId"] == "cred-1"
    assert i["roleAttributes"] == ["tunnels", "network-net-1"]
    assert r.enrollment_jwt_expires_at.seconds > time.time() + 60
    # enrollment.ott.expiresAt to the millisecond (the controller writes milliseconds)
    exp = sim.identity(r.ziti_identity_id)["enrollment"]["ott"]["expiresAt"]
    when = datetime.datetime.strptime(exp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert (r.enrollment_jwt_expires_at.seconds, r.enrollment_jwt_expires_at.nanos) == \
        (int(when.timestamp()), when.microsecond * 1000)
    st.PatchIdentityRoleAttributes(pb.PatchIdentityRoleAttributesRequest(
        ziti_identity_id=r.ziti_identity_id, add=["x", "tunnels", "y"], remove=["network-net-1", "y"]), timeout=10)
    assert ident(sim, r.ziti_identity_id)[0]["roleAttributes"] == ["tunnels", "x"]
    st.PatchIdentityRoleAttributes(pb.PatchIdentityRoleAttributesRequest(
        ziti_identity_id=r.ziti_identity_id, remove=["tunnels", "x"]), timeout=10)
    assert ident(sim, r.ziti_identity_id)[0]["roleAttributes"] == []
    code, _ = rpc_code(st.PatchIdentityRoleAttributes,
                       pb.PatchIdentityRoleAttributesRequest(ziti_identity_id="gone1", add=["a"]), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND
    lst = st.ListIdentitiesByTag(pb.ListIdentitiesByTagRequest(tags={"agyn.network": "net-1"}), timeout=10)
    assert [x.ziti_identity_id for x in lst.identities] == [r.ziti_identity_id]
    assert dict(lst.identities[0].tags) == {"agyn.network": "net-1"}
    st.DeleteTunnelIdentity(pb.DeleteTunnelIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=10)
    assert sim.state()["identities"] == []
    code, _ = rpc_code(st.GetIdentityLiveness, pb.GetIdentityLivenessRequest(ziti_identity_id=r.ziti_identity_id),
                       timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND  # the contract; the Go service said INTERNAL


def test_liveness_enrolled(sim, st):
    r = st.CreateRunnerIdentity(pb.CreateRunnerIdentityRequest(runner_id=U(), role_attributes=["runners"]),
                                timeout=30)
    live = st.GetIdentityLiveness(pb.GetIdentityLivenessRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert live.enrollment_state == pb.IDENTITY_ENROLLMENT_STATE_ENROLLED


def test_delete_identity_idempotent_and_deferred(sim, srv, st):
    r = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=U(), workload_id=U()), timeout=20)
    # a missing mapping is OK (the Go service's newest behaviour)
    st.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id="never-existed"), timeout=10)
    faults(sim, {"method": "DELETE", "path_prefix": MGMT + "/identities/", "status": 500, "count": 1})
    code, _ = rpc_code(st.DeleteIdentity, pb.DeleteIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=10)
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    faults(sim)
    # the mapping went first; the tombstone is retried until the DELETE lands
    code, e = rpc_code(st.ResolveIdentity, pb.ResolveIdentityRequest(ziti_identity_id=r.ziti_identity_id), timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND and e.details() == "managed identity not found"
    settle(sim, srv.store_path)
    assert sim.state()["identities"] == []


# ============================================================================
# services, configs, policies
# ============================================================================


def test_create_service_with_configs_and_get(sim, srv, st):
    host = pb.HostV1Config(protocol="tcp", forward_address=True, allowed_addresses=[" 0.0.0.0/0 "], port=80)
    r = st.CreateService(pb.CreateServiceRequest(name=" exposed-1 ", role_attributes=["r1"], host_v1_config=host,
                                                 intercept_v1_config=pb.InterceptV1Config(**ICPT),
                                                 tags={"agyn.io/managed-by": "t"}), timeout=20)
    assert r.ziti_service_name == "exposed-1"
    s, c, _ = objects(sim)
    svc = s["exposed-1"]
    assert svc["roleAttributes"] == ["r1"] and svc["encryptionRequired"] is True
    assert svc["tags"] == {"agyn.io/managed-by": "t"}
    h, i = c["exposed-1-host-v1"], c["exposed-1-intercept-v1"]
    assert sorted(svc["configs"]) == sorted([h["id"], i["id"]])
    assert h["configTypeId"] == "NH5p4FpGR" and i["configTypeId"] == "g7cIWbcGg"
    assert h["data"] == {"protocol": "tcp", "port": 80, "forwardAddress": True, "allowedAddresses": ["0.0.0.0/0"]}
    assert i["data"] == {"protocols": ["tcp"], "addresses": ["app.ziti"], "portRanges": [{"low": 443, "high": 443}]}
    assert h["tags"] == {"agyn.io/managed-by": "t"}
    g = st.GetService(pb.GetServiceRequest(ziti_service_id=r.ziti_service_id), timeout=5).service
    assert (g.name, list(g.role_attributes), dict(g.tags)) == ("exposed-1", ["r1"], {"agyn.io/managed-by": "t"})
    assert st.GetService(pb.GetServiceRequest(name="exposed-1"), timeout=5).service.ziti_service_id == \
        r.ziti_service_id
    for req in (pb.GetServiceRequest(ziti_service_id="gone1"), pb.GetServiceRequest(name="nope")):
        code, _ = rpc_code(st.GetService, req, timeout=5)
        assert code == grpc.StatusCode.NOT_FOUND  # by id too: callers re-provision on it
    code, _ = rpc_code(st.GetService, pb.GetServiceRequest(), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # an existing name: INTERNAL, or the existing service with return_existing
    code, _ = rpc_code(st.CreateService, pb.CreateServiceRequest(name="exposed-1", role_attributes=["x"]), timeout=10)
    assert code == grpc.StatusCode.INTERNAL
    again = st.CreateService(pb.CreateServiceRequest(name="exposed-1", role_attributes=["x"], return_existing=True),
                             timeout=10)
    assert again.ziti_service_id == r.ziti_service_id
    # the same create again (a re-provision): its configs exist too, and the service is still the answer
    again = st.CreateService(pb.CreateServiceRequest(name="exposed-1", role_attributes=["r1"], host_v1_config=host,
                                                     intercept_v1_config=pb.InterceptV1Config(**ICPT),
                                                     return_existing=True), timeout=10)
    assert (again.ziti_service_id, again.ziti_service_name) == (r.ziti_service_id, "exposed-1")
    code, _ = rpc_code(st.CreateService, pb.CreateServiceRequest(name="exposed-1", role_attributes=["r1"],
                                                                 host_v1_config=host), timeout=10)
    assert code == grpc.StatusCode.INTERNAL
    assert len(objects(sim)[1]) == 2
    settle(sim, srv.store_path, kept={r.ziti_service_id, h["id"], i["id"]})


@pytest.mark.parametrize("req,msg", [
    (dict(name=" ", role_attributes=["a"]), "name is required"),
    (dict(name="a"), "role_attributes is required"),
    (dict(name="a", role_attributes=["a"], host_v1_config=dict(protocol="tcp", address="x", port=0)), "port"),
    (dict(name="a", role_attributes=["a"], host_v1_config=dict(forward_protocol=True, address="x", port=1)),
     "allowed_protocols"),
    (dict(name="a", role_attributes=["a"], intercept_v1_config=dict(protocols=["tcp"], addresses=["a"])),
     "port_ranges"),
    (dict(name="a", role_attributes=["a"], intercept_v1_config=dict(protocols=[" "], addresses=["a"],
                                                                    port_ranges=[dict(low=1, high=2)])),
     "protocols[0] is empty"),
    (dict(name="a", role_attributes=["a"], intercept_v1_config=dict(protocols=["tcp"], addresses=["a"],
                                                                    port_ranges=[dict(low=5, high=2)])), "high"),
])
def test_create_service_validation(sim, st, req, msg):
    code, e = rpc_code(st.CreateService, pb.CreateServiceRequest(**req), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg in e.details(), e.details()
    assert objects(sim) == ({}, {}, {})


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_create_service_step_failure_is_compensated(sim, srv, st, fail_at):
    """A controller step failing (config 1, config 2, the service): what was
    created is deleted, nothing is left, the pending record goes."""
    rule = {"method": "POST", "status": 400, "count": 1}
    if fail_at == 3:
        rule["path_prefix"] = MGMT + "/services"
    else:
        rule["path_prefix"] = MGMT + "/configs"
        rule["skip"] = fail_at - 1
    faults(sim, rule)
    code, _ = rpc_code(st.CreateService, pb.CreateServiceRequest(
        name="svc-f", role_attributes=["r"], host_v1_config=pb.HostV1Config(**HOST),
        intercept_v1_config=pb.InterceptV1Config(**ICPT)), timeout=20)
    assert code == grpc.StatusCode.INTERNAL
    faults(sim)
    settle(sim, srv.store_path)
    assert objects(sim) == ({}, {}, {})


def test_create_service_unanswered_create_left_to_recovery(sim, srv, st):
    """The service POST is applied but its answer lost: the armed intent
    stays; recovery finds the service and its configs by name and deletes
    them once the create can no longer land."""
    faults(sim, {"method": "POST", "path_prefix": MGMT + "/services", "action": "drop", "apply": True, "count": 1})
    code, _ = rpc_code(st.CreateService, pb.CreateServiceRequest(
        name="svc-u", role_attributes=["r"], host_v1_config=pb.HostV1Config(**HOST)), timeout=20)
    assert code != OK
    faults(sim)
    assert "service:svc-u" in records(srv.store_path)[2]
    settle(sim, srv.store_path, timeout=60)
    assert objects(sim) == ({}, {}, {})


def test_update_service(sim, srv, st):
    r = st.CreateService(pb.CreateServiceRequest(name="u1", role_attributes=["a"], tags={"k": "1"},
                                                 intercept_v1_config=pb.InterceptV1Config(**ICPT)), timeout=20)
    before = objects(sim)
    # tags only: configs and role attributes stay as they are
    out = st.UpdateService(pb.UpdateServiceRequest(ziti_service_id=r.ziti_service_id,
                                                   tags_update=pb.TagsUpdate(tags={"k": "2"})), timeout=20).service
    assert dict(out.tags) == {"k": "2"} and list(out.role_attributes) == ["a"]
    s, c, _ = objects(sim)
    assert s["u1"]["configs"] == before[0]["u1"]["configs"] and c == before[1]
    # role_attributes_update, a new host config, the intercept one patched
    icpt2 = pb.InterceptV1Config(protocols=["tcp", "udp"], addresses=["b.ziti"], port_ranges=[dict(low=1, high=9)])
    out = st.UpdateService(pb.UpdateServiceRequest(
        ziti_service_id=r.ziti_service_id, host_v1_config=pb.HostV1Config(**HOST), intercept_v1_config=icpt2,
        role_attributes_update=pb.RoleAttributesUpdate(role_attributes=["b", "c"])), timeout=20).service
    assert list(out.role_attributes) == ["b", "c"]
    s, c, _ = objects(sim)
    assert set(c) == {"u1-host-v1", "u1-intercept-v1"}
    assert sorted(s["u1"]["configs"]) == sorted(x["id"] for x in c.values())
    assert c["u1-intercept-v1"]["data"]["addresses"] == ["b.ziti"]
    assert c["u1-intercept-v1"]["id"] == before[1]["u1-intercept-v1"]["id"]  # patched in place
    # an empty role list clears
    out = st.UpdateService(pb.UpdateServiceRequest(
        ziti_service_id=r.ziti_service_id, role_attributes_update=pb.RoleAttributesUpdate()), timeout=20).service
    assert list(out.role_attributes) == []
    code, _ = rpc_code(st.UpdateService, pb.UpdateServiceRequest(ziti_service_id="gone1"), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND
    st.DeleteService(pb.DeleteServiceRequest(ziti_service_id=r.ziti_service_id), timeout=20)
    assert objects(sim) == ({}, {}, {})  # its configs too (the Go service left them)
    settle(sim, srv.store_path)


def test_update_service_patch_failure_compensates_new_config(sim, srv, st):
    r = st.CreateService(pb.CreateServiceRequest(name="u2", role_attributes=["a"]), timeout=20)
    faults(sim, {"method": "PATCH", "path_prefix": MGMT + "/services/", "status": 400, "count": 1})
    code, _ = rpc_code(st.UpdateService, pb.UpdateServiceRequest(ziti_service_id=r.ziti_service_id,
                                                                  host_v1_config=pb.HostV1Config(**HOST)), timeout=20)
    assert code == grpc.StatusCode.INTERNAL
    faults(sim)
    settle(sim, srv.store_path, kept={r.ziti_service_id})
    s, c, _ = objects(sim)
    assert c == {} and s["u2"]["configs"] == []


def test_delete_service_deferred_then_retried(sim, srv, st):
    r = st.CreateService(pb.CreateServiceRequest(name="d1", role_attributes=["a"],
                                                 host_v1_config=pb.HostV1Config(**HOST)), timeout=20)
    faults(sim, {"method": "DELETE", "path_prefix": MGMT + "/configs/", "status": 500, "count": 1})
    code, _ = rpc_code(st.DeleteService, pb.DeleteServiceRequest(ziti_service_id=r.ziti_service_id), timeout=20)
    assert code == grpc.StatusCode.UNAVAILABLE
    faults(sim)
    settle(sim, srv.store_path)
    assert objects(sim) == ({}, {}, {})
    st.DeleteService(pb.DeleteServiceRequest(ziti_service_id=r.ziti_service_id), timeout=20)  # idempotent


def test_service_policies(sim, srv, st):
    b = st.CreateServicePolicy(pb.CreateServicePolicyRequest(
        type=pb.SERVICE_POLICY_TYPE_BIND, name="svc-bind", identity_roles=["#workload-1"], service_roles=["@s1"],
        tags={"n": "1"}), timeout=20)
    d = st.CreateServicePolicy(pb.CreateServicePolicyRequest(
        type=pb.SERVICE_POLICY_TYPE_DIAL, name="svc-dial", identity_roles=["#agents"], service_roles=["@s1"]),
        timeout=20)
    _, _, p = objects(sim)
    assert p["svc-bind"]["type"] == "Bind" and p["svc-bind"]["semantic"] == "AnyOf"
    assert p["svc-bind"]["identityRoles"] == ["#workload-1"] and p["svc-bind"]["tags"] == {"n": "1"}
    g = st.GetServicePolicy(pb.GetServicePolicyRequest(ziti_service_policy_id=b.ziti_service_policy_id),
                            timeout=5).service_policy
    assert g.type == pb.SERVICE_POLICY_TYPE_BIND and list(g.service_roles) == ["@s1"]
    assert st.GetServicePolicy(pb.GetServicePolicyRequest(name="svc-dial"), timeout=5).service_policy.\
        ziti_service_policy_id == d.ziti_service_policy_id
    for req in (pb.GetServicePolicyRequest(ziti_service_policy_id="gone1"), pb.GetServicePolicyRequest(name="x")):
        assert rpc_code(st.GetServicePolicy, req, timeout=5)[0] == grpc.StatusCode.NOT_FOUND
    lst = st.ListServicePolicies(pb.ListServicePoliciesRequest(type=pb.SERVICE_POLICY_TYPE_DIAL), timeout=10)
    assert [x.name for x in lst.service_policies] == ["svc-dial"]
    lst = st.ListServicePolicies(pb.ListServicePoliciesRequest(identity_roles=["#workload-1"]), timeout=10)
    assert [x.name for x in lst.service_policies] == ["svc-bind"]
    lst = st.ListServicePoliciesByTag(pb.ListServicePoliciesByTagRequest(tags={"n": "1"}), timeout=10)
    assert [x.name for x in lst.service_policies] == ["svc-bind"]
    again = st.CreateServicePolicy(pb.CreateServicePolicyRequest(
        type=pb.SERVICE_POLICY_TYPE_DIAL, name="svc-bind", identity_roles=["#x"], service_roles=["#y"],
        return_existing=True), timeout=20)
    assert again.ziti_service_policy_id == b.ziti_service_policy_id
    for req, msg in ((dict(name="p", identity_roles=["a"], service_roles=["b"]), "unspecified"),
                     (dict(type=7, name="p", identity_roles=["a"], service_roles=["b"]), "unknown"),
                     (dict(type=1, name="p", service_roles=["b"]), "identity_roles"),
                     (dict(type=1, name="p", identity_roles=["b"]), "service_roles")):
        code, e = rpc_code(st.CreateServicePolicy, pb.CreateServicePolicyRequest(**req), timeout=5)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg in e.details()
    st.DeleteServicePolicy(pb.DeleteServicePolicyRequest(ziti_service_policy_id=b.ziti_service_policy_id), timeout=10)
    st.DeleteServicePolicy(pb.DeleteServicePolicyRequest(ziti_service_policy_id=b.ziti_service_policy_id), timeout=10)
    assert set(objects(sim)[2]) == {"svc-dial"}
    settle(sim, srv.store_path, kept={d.ziti_service_policy_id})


def test_policy_create_failure(sim, srv, st):
    faults(sim, {"method": "POST", "path_prefix": MGMT + "/service-policies", "status": 400, "count": 1})
    code, _ = rpc_code(st.CreateServicePolicy, pb.CreateServicePolicyRequest(
        type=1, name="pf", identity_roles=["#a"], service_roles=["#b"]), timeout=10)
    assert code == grpc.StatusCode.INTERNAL
    faults(sim)
    settle(sim, srv.store_path)
    assert objects(sim)[2] == {}


# ============================================================================
# lists
# ============================================================================


def test_list_services_paged_and_filtered(sim, srv, st):
    for k in range(7):
        st.CreateService(pb.CreateServiceRequest(name="ls-%d" % k, role_attributes=["even" if k % 2 == 0 else "odd"],
                                                 tags={"grp": "a" if k < 4 else "b"}), timeout=20)
    st.CreateService(pb.CreateServiceRequest(name="other", role_attributes=["even"]), timeout=20)
    seen, tok, pages = [], "", 0
    while True:
        r = st.ListServices(pb.ListServicesRequest(name_prefix="ls-", role_attributes=["even"], page_size=2,
                                                   page_token=tok), timeout=10)
        seen += [x.name for x in r.services]
        pages += 1
        tok = r.next_page_token
        if not tok:
            break
    assert sorted(seen) == ["ls-0", "ls-2", "ls-4", "ls-6"] and pages >= 2
    r = st.ListServices(pb.ListServicesRequest(name="other", page_size=2), timeout=10)
    assert [x.name for x in r.services] == ["other"] and r.next_page_token == ""
    seen, tok = [], ""
    while True:
        r = st.ListServicesByTag(pb.ListServicesByTagRequest(tags={"grp": "a"}, page_size=3, page_token=tok),
                                 timeout=10)
        seen += [x.name for x in r.services]
        tok = r.next_page_token
        if not tok:
            break
    assert sorted(seen) == ["ls-0", "ls-1", "ls-2", "ls-3"]
    assert len(st.ListServicesByTag(pb.ListServicesByTagRequest(), timeout=10).services) == 8
    for fn, req in ((st.ListServices, pb.ListServicesRequest(page_token="abc")),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(page_token="-1")),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={'x" or true': "1"})),
                    # keys ZitiQL cannot name (the controller would answer 400 INVALID_FILTER)
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={"env2": "1"})),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={"agyn.io/x": "1"})),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={"a..b": "1"})),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={"-a": "1"})),
                    (st.ListServicesByTag, pb.ListServicesByTagRequest(tags={"": "1"}))):
        assert rpc_code(fn, req, timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # '-' and '_' after a segment's first letter are names ZitiQL accepts
    assert len(st.ListServicesByTag(pb.ListServicesByTagRequest(tags={"agyn.managed-by": "x", "a_b": "y"}),
                                    timeout=10).services) == 0


def test_list_controller_failure(sim, st):
    faults(sim, {"method": "GET", "path_prefix": MGMT + "/services", "status": 400, "count": 1})
    code, _ = rpc_code(st.ListServices, pb.ListServicesRequest(), timeout=10)
    assert code == grpc.StatusCode.INTERNAL


# ============================================================================
# crash points
# ============================================================================


def crash_then_recover(sim, store, crash_at, call, kept_fn=lambda: set()):
    hooked = zmtest.Server(sim=sim, store_path=store, env=dict(FAST, ZM_TEST_CRASH_AT=crash_at)).start()
    with hooked.channel() as ch:
        code, _ = rpc_code(call, hooked.stub(ch), timeout=20)
    assert hooked.proc.wait(15) == 137, "did not crash at %s" % crash_at
    assert "test hook: crashing at %s" % crash_at in hooked.logtext()
    dispose(hooked)
    clean = zmtest.Server(sim=sim, store_path=store, env=FAST).start()
    try:
        settle(sim, store, kept=kept_fn(), timeout=60)
    finally:
        dispose(clean)


SVC_REQ = dict(name="crash-svc", role_attributes=["r"])


def _create_service(stub, **kw):
    return stub.CreateService(pb.CreateServiceRequest(
        host_v1_config=pb.HostV1Config(**HOST), intercept_v1_config=pb.InterceptV1Config(**ICPT), **SVC_REQ), **kw)


@pytest.mark.parametrize("point", ["OBJ_INTENT", "OBJ_CHECKED", "OBJ_ARMED", "OBJ_CREATE_2", "OBJ_CREATE_3",
                                   "OBJ_CREATED"])
def test_crash_create_service(sim, point):
    tmp = tempfile.mkdtemp(prefix="zm-c12-")
    try:
        store = zmtest.new_store(tmp)
        crash_then_recover(sim, store, point, _create_service)
        assert objects(sim) == ({}, {}, {})  # nothing the caller never heard of
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("point", ["OBJ_ARMED", "OBJ_CREATED"])
def test_crash_create_policy(sim, point):
    tmp = tempfile.mkdtemp(prefix="zm-c12-")
    try:
        store = zmtest.new_store(tmp)
        crash_then_recover(sim, store, point, lambda stub, **kw: stub.CreateServicePolicy(
            pb.CreateServicePolicyRequest(type=1, name="crash-pol", identity_roles=["#a"], service_roles=["#b"]), **kw))
        assert objects(sim)[2] == {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("point", ["DELSVC_TOMBS", "DELSVC_CONFIGS"])
def test_crash_delete_service(sim, point):
    tmp = tempfile.mkdtemp(prefix="zm-c12-")
    try:
        store = zmtest.new_store(tmp)
        s = zmtest.Server(sim=sim, store_path=store, env=FAST).start()
        with s.channel() as ch:
            sid = _create_service(s.stub(ch), timeout=20).ziti_service_id
        dispose(s)
        crash_then_recover(sim, store, point, lambda stub, **kw: stub.DeleteService(
            pb.DeleteServiceRequest(ziti_service_id=sid), **kw))
        assert objects(sim) == ({}, {}, {})  # the service and both its configs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_crash_update_service_before_patch(sim):
    tmp = tempfile.mkdtemp(prefix="zm-c12-")
    try:
        store = zmtest.new_store(tmp)
        s = zmtest.Server(sim=sim, store_path=store, env=FAST).start()
        with s.channel() as ch:
            sid = s.stub(ch).CreateService(pb.CreateServiceRequest(**SVC_REQ), timeout=20).ziti_service_id
        dispose(s)
        crash_then_recover(sim, store, "UPDSVC_PATCH", lambda stub, **kw: stub.UpdateService(
            pb.UpdateServiceRequest(ziti_service_id=sid, host_v1_config=pb.HostV1Config(**HOST)), **kw),
            kept_fn=lambda: {sid})
        s, c, _ = objects(sim)
        assert c == {} and s["crash-svc"]["configs"] == []  # the new config was never attached: deleted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


IDENTITY_CRASHES = [
    ("CreateDeviceIdentity", "ARM", lambda: pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="dev-c")),
    ("CreateDeviceIdentity", "CREATE", lambda: pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="dev-c")),
    ("CreateDeviceIdentity", "FETCH_JWT", lambda: pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="dev-c")),
    ("CreateDeviceIdentity", "COMMIT", lambda: pb.CreateDeviceIdentityRequest(user_identity_id=U(), name="dev-c")),
    ("CreateTunnelIdentity", "FETCH_JWT", lambda: pb.CreateTunnelIdentityRequest(network_id="n",
                                                                                 tunnel_credential_id="c")),
    ("CreateAppIdentity", "SIGN", lambda: pb.CreateAppIdentityRequest(identity_id=U(), slug="s")),
    ("CreateRunnerIdentity", "COMMIT", lambda: pb.CreateRunnerIdentityRequest(runner_id=U(),
                                                                              role_attributes=["runners"])),
    ("CreateSandboxIdentity", "FETCH_JWT", lambda: pb.CreateSandboxIdentityRequest(
        sandbox_id=U(), owner_id=U(), environment_id=U(), organization_id="o", workload_id=U())),
    ("CreateAgentIdentity", "REPLACE", lambda: pb.CreateAgentIdentityRequest(agent_id=U(), workload_id=U())),
]


@pytest.mark.parametrize("rpc,point,req", IDENTITY_CRASHES, ids=["%s-%s" % (a, b) for a, b, _ in IDENTITY_CRASHES])
def test_crash_identity_creates(sim, rpc, point, req):
    tmp = tempfile.mkdtemp(prefix="zm-c12-")
    try:
        store = zmtest.new_store(tmp)
        crash_then_recover(sim, store, point, lambda stub, **kw: getattr(stub, rpc)(req(), **kw))
        assert sim.state()["identities"] == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================
# a caller built from the 6-RPC contract
# ============================================================================

OLD_CLIENT = r'''
import sys, uuid
sys.path.insert(0, sys.argv[1])
import grpc
from agynio.api.ziti_management.v1 import ziti_management_pb2 as pb, ziti_management_pb2_grpc as rpc
st = rpc.ZitiManagementServiceStub(grpc.insecure_channel(sys.argv[2]))
agent = str(uuid.uuid4())
a = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=30)
r = st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=a.ziti_identity_id), timeout=5)
assert r.identity_id == agent and r.identity_type == pb.IDENTITY_TYPE_AGENT, r
l = st.ListManagedIdentities(pb.ListManagedIdentitiesRequest(identity_type=pb.IDENTITY_TYPE_AGENT), timeout=5)
assert [m.ziti_identity_id for m in l.identities] == [a.ziti_identity_id], l
s = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=pb.SERVICE_TYPE_GATEWAY), timeout=30)
assert s.identity_json
st.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id=s.ziti_identity_id), timeout=5)
st.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=a.ziti_identity_id), timeout=10)
try:
    st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=pb.SERVICE_TYPE_RUNNER), timeout=10)
    raise SystemExit("RUNNER (3) must be refused: the contract reserved it")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
print("OLD CLIENT OK", a.ziti_identity_id)
'''


def test_client_built_from_the_6_rpc_contract(sim, srv):
    out = os.path.join(srv.tmp, "oldstubs")
    os.makedirs(out)
    old = os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", old, "-I", "/usr/include",
                    "--python_out", out, "--grpc_python_out", out,
                    "agynio/api/ziti_management/v1/ziti_management.proto"], check=True)
    for d, _, _ in os.walk(out):
        open(os.path.join(d, "__init__.py"), "a").close()
    p = subprocess.run([sys.executable, "-c", OLD_CLIENT, out, srv.addr], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "OLD CLIENT OK" in p.stdout, p.stdout + p.stderr
    # its agent was deleted again; its service identity holds a lease
    assert zmtest.query(srv.store_path, "SELECT identity_type FROM managed_identities") == []
    assert [t for (t,) in zmtest.query(srv.store_path, "SELECT service_type FROM service_identities")] == [1]
