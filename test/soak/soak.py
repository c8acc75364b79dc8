#!/usr/bin/python3
"""Soak of ziti-management against the controller simulator: random kills
(SIGKILL, SIGTERM, crashes at saga states through ZM_TEST_CRASH_AT), random
controller faults, random enrollments / extensions / agent identities, and
periodic invariant checks. With --backend pg --replicas 2 it runs two
replicas on one PostgreSQL database (every call to a random replica) and also
kills the database (SIGKILL of the postmaster, pg_ctl stop -m immediate) and
stops every replica for longer than the TTL (an outage). See README.md.

    ZM_BUILD_DIR=/work/build /usr/bin/python3 test/soak/soak.py --duration 3600
    ZM_BUILD_DIR=/work/build /usr/bin/python3 test/soak/soak.py --backend pg --replicas 2 --duration 600

Exit code 0 only if it ends with zero leaked, zero wrongly deleted, zero
zombies and the service never died on its own.
"""

import argparse
import collections
import json
import os
import random
import signal
import shutil
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integ"))
sys.path.insert(0, os.path.join(HERE, "..", "sim"))

import grpc  # noqa: E402

import zmtest  # noqa: E402
from zmtest import pb  # noqa: E402
from simctl import Sim  # noqa: E402

STATES = ["CREATE", "FETCH_JWT", "VERIFY_JWT", "KEYGEN_CSR", "SIGN", "ASSEMBLE", "COMMIT", "REPLY"]
IDS = "/edge/management/v1/identities"
ENROLL = "/edge/client/v1/enroll"
MAX_DELAY_MS = 2500


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()
        self.problems = []

    def inc(self, k, n=1):
        with self.lock:
            self.c[k] += n

    def problem(self, kind, msg):
        with self.lock:
            self.c[kind] += 1
            self.problems.append("%s: %s" % (kind, msg))
        log("PROBLEM %s: %s" % (kind, msg))


class Router:
    """Stubs for every replica; each call goes to a random one (a load
    balancer). Same call interface as a stub for the methods the soak uses."""

    def __init__(self, ports, rng):
        self.rng = rng
        self.chans = [grpc.insecure_channel("127.0.0.1:%d" % p) for p in ports]
        self.stubs = [zmtest.pb_grpc.ZitiManagementServiceStub(c) for c in self.chans]

    def __getattr__(self, name):
        def call(req, timeout):
            return getattr(self.rng.choice(self.stubs), name)(req, timeout=timeout)
        return call

    def call_retry(self, name, req, timeout):
        """UNAVAILABLE from one replica: at once to another (if any)."""
        order = list(range(len(self.stubs)))
        self.rng.shuffle(order)
        for k, i in enumerate(order):
            try:
                return getattr(self.stubs[i], name)(req, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or k == len(order) - 1:
                    raise

    def close(self):
        for c in self.chans:
            c.close()


class Soak:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.ttl = args.ttl
        self.dir = tempfile.mkdtemp(prefix="zm-soak-")
        self.pg = None
        if args.backend == "pg":
            from pgfix import PgCluster

            self.pg = PgCluster()
            self.pg.start()
            self.store = self.pg.url
        else:
            self.store = os.path.join(self.dir, "zm.db")
        self.n = args.replicas
        self.log_paths = [os.path.join(self.dir, "server.log" if self.n == 1 else "server-%d.log" % i)
                          for i in range(self.n)]
        self.ports = [zmtest.free_port() for _ in range(self.n)]
        self.sim = Sim.start(os.path.join(self.dir, "sim"), log_file=os.path.join(self.dir, "sim.log"))
        self.stats = Stats()
        self.stop = threading.Event()
        self.srvs = [None] * self.n
        self.hooked = [None] * self.n
        self.srv_lock = threading.Lock()
        self.db_lock = threading.Lock()
        self.keepers = {}  # slot -> (ziti id, last OK extend send time)
        self.deleting = set()  # agent ziti ids the soak asked to delete/replace
        self.agents = {}  # agent uuid -> current ziti id

    # ---- the service ------------------------------------------------------

    def env(self, hook=None):
        e = {"SERVICE_IDENTITY_LEASE_TTL": "%dms" % int(self.ttl * 1000),
             "SERVICE_IDENTITY_GC_INTERVAL": "300ms", "ZITI_REQUEST_TIMEOUT": "2s",
             "ENROLLMENT_TIMEOUT": "5s", "SHUTDOWN_GRACE": "3s", "LOG_LEVEL": "info",
             "LEASE_FLUSH_INTERVAL": "200ms"}
        if hook:
            e["ZM_TEST_CRASH_AT"] = hook
        return e

    def start_server(self, i=0, hook=None):
        s = zmtest.Server(sim=self.sim, store_path=self.store, port=self.ports[i], log_path=self.log_paths[i],
                          env=self.env(hook))
        shutil.rmtree(s.tmp, ignore_errors=True)  # store and log live in self.dir
        try:
            s.start(timeout=60)
        except RuntimeError:
            # The workers never stop calling: with a crash hook set, an
            # enrollment can reach the hooked state before the health check
            # saw SERVING. That is the crash we asked for, not a failure.
            if hook and s.proc.returncode == 137:
                self.stats.inc("hook_crash_during_start")
                return self.start_server(i, hook=None)
            raise
        with self.srv_lock:
            self.srvs[i], self.hooked[i] = s, hook
        self.stats.inc("starts")
        return s

    def start_all(self):
        for i in range(self.n):
            with self.srv_lock:
                s = self.srvs[i]
            if s is None or s.proc.poll() is not None:
                self.start_server(i)

    def kill_server(self, how, i=0):
        with self.srv_lock:
            s = self.srvs[i]
        if s is None or s.proc.poll() is not None:
            return
        if how == "SIGKILL":
            s.proc.kill()
            s.proc.wait()
        else:
            rc = s.stop(signal.SIGTERM, timeout=30)
            if rc != 0:
                self.stats.problem("bad_exit", "SIGTERM exit code %s (replica %d)" % (rc, i))
        self.stats.inc("kills_" + how)

    def kill_all(self, how="SIGKILL"):
        for i in range(self.n):
            self.kill_server(how, i)

    def check_alive(self):
        """An exit we did not cause: a crash hook (expected, code 137) or a bug."""
        for i in range(self.n):
            with self.srv_lock:
                s, hook = self.srvs[i], self.hooked[i]
            if s is None or s.proc.poll() is None:
                continue
            rc = s.proc.returncode
            if hook and rc == 137:
                self.stats.inc("hook_crashes")
            else:
                self.stats.problem("server_died", "exit code %s (hook %s); log %s" % (rc, hook, self.log_paths[i]))
            self.start_server(i)

    # ---- the database (--backend pg) --------------------------------------

    def db_crash(self, how):
        """SIGKILL of the postmaster or an immediate shutdown, down for a
        random 0.3-4 s, then crash recovery."""
        with self.db_lock:
            if how == "DB_KILL":
                self.pg.kill()
            else:
                self.pg._ctl("stop", "-m", "immediate", check=False)
            self.stop.wait(self.rng.uniform(0.3, 4.0))
            self.pg.start()
        self.stats.inc("db_" + how.lower())

    def outage(self):
        """Every replica down for longer than the TTL (and the 5 s outage
        gap): no live pod may lose its lease because of it."""
        self.kill_all("SIGKILL")
        self.stop.wait(max(self.ttl, 5.0) + self.rng.uniform(0.5, 2.0))
        self.start_all()
        self.stats.inc("outages")

    # ---- clients ----------------------------------------------------------

    def stub(self):
        return Router(self.ports, random.Random(self.rng.random()))

    def worker(self, wid):
        rng = random.Random(self.a.seed * 1000 + wid)
        st = ch = self.stub()
        while not self.stop.is_set():
            r = rng.random()
            try:
                if r < 0.6:
                    st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=rng.randint(1, 3)),
                                              timeout=rng.choice([2, 6, 10]))
                    self.stats.inc("enroll_ok")
                elif r < 0.8:
                    agent = rng.choice(list(self.agents) or [str(uuid.uuid4())]) if rng.random() < 0.5 \
                        else str(uuid.uuid4())
                    old = self.agents.get(agent)
                    if old:
                        self.deleting.add(old)
                    resp = st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=agent), timeout=10)
                    self.agents[agent] = resp.ziti_identity_id
                    self.stats.inc("agent_ok")
                else:
                    if not self.agents:
                        continue
                    agent = rng.choice(list(self.agents))
                    zid = self.agents[agent]
                    self.deleting.add(zid)
                    try:
                        st.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=zid), timeout=10)
                        self.agents.pop(agent, None)
                        self.stats.inc("delete_ok")
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.NOT_FOUND:
                            self.agents.pop(agent, None)
                        raise
            except grpc.RpcError as e:
                self.stats.inc("rpc_" + e.code().name)
                time.sleep(0.05)
            except Exception as e:  # noqa: BLE001
                self.stats.problem("client_error", repr(e))
            time.sleep(rng.random() * 0.2)
        ch.close()

    def keeper(self, slot):
        """A pod: enrolls, then tries to extend every TTL/3 (an UNAVAILABLE
        is retried at once on another replica, as a pod behind a load
        balancer would); on NOT_FOUND it re-enrolls. Since issue 10 a lease
        never expires because the service or its database was down, and
        this pod never stops trying: any NOT_FOUND is a wrongly deleted
        identity. An OK for an identity the controller no longer has is a
        zombie."""
        st = ch = self.stub()
        zid, last_ok = None, 0.0
        while not self.stop.is_set():
            try:
                if zid is None:
                    zid = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=1 + slot % 3),
                                                    timeout=10).ziti_identity_id
                    last_ok = time.time()
                    self.keepers[slot] = (zid, last_ok)
                    self.stats.inc("keeper_enroll")
                else:
                    t = time.time()
                    st.call_retry("ExtendIdentityLease", pb.ExtendIdentityLeaseRequest(ziti_identity_id=zid),
                                  timeout=2)
                    last_ok = t
                    self.keepers[slot] = (zid, last_ok)
                    self.stats.inc("extend_ok")
                    try:
                        self.sim.identity(zid)
                    except Exception as e:  # noqa: BLE001
                        if "404" in str(e):
                            self.stats.problem("zombie", "%s: ExtendIdentityLease OK, but the controller "
                                                         "no longer has it" % zid)
                            self.keepers.pop(slot, None)
                            zid = None
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and zid is not None:
                    age = time.time() - last_ok
                    self.stats.problem("wrongly_deleted", "%s NOT_FOUND %.2fs after a successful extension "
                                       "(TTL %.1fs; the pod never stopped trying)" % (zid, age, self.ttl))
                    self.keepers.pop(slot, None)
                    zid = None
                else:
                    self.stats.inc("extend_" + e.code().name)
            self.stop.wait(self.ttl / 3.0 if zid else 0.2)
        ch.close()

    def chaos(self):
        rng = random.Random(self.a.seed + 7)
        while not self.stop.wait(rng.uniform(0.5, 3.0)):
            if self.pause_chaos.is_set():
                continue
            f = rng.choice(["500", "503", "429", "delay", "drop", "drop_mid", "refuse", "expire", "none"])
            path, method = rng.choice([(IDS, "POST"), (IDS + "/", "GET"), (IDS + "/", "DELETE"), (IDS, "GET"),
                                       (ENROLL, "POST")])
            rule = {"method": method, "path_prefix": path, "count": rng.randint(1, 5),
                    "apply": rng.random() < 0.5}
            try:
                if f in ("500", "503", "429"):
                    rule.update(action="status", status=int(f))
                    if f == "429":
                        rule["retry_after"] = 1
                    self.sim.faults({"rules": [rule]})
                elif f == "delay":
                    rule.update(action="delay", ms=rng.randint(100, MAX_DELAY_MS))
                    self.sim.faults({"rules": [rule]})
                elif f in ("drop", "drop_mid"):
                    rule.update(action=f)
                    self.sim.faults({"rules": [rule]})
                elif f == "refuse":
                    self.sim.refuse(True)
                    self.stop.wait(rng.uniform(0.2, 2.0))
                    self.sim.refuse(False)
                elif f == "expire":
                    self.sim.expire_sessions()
                else:
                    self.sim.clear_faults()
                self.stats.inc("fault_" + f)
            except Exception as e:  # noqa: BLE001
                log("chaos: %r" % e)

    # ---- invariants -------------------------------------------------------

    def records(self):
        tomb = {r[0] for r in zmtest.query(self.store, "SELECT ziti_identity_id FROM deleting_identities")}
        svc = dict(zmtest.query(self.store, "SELECT ziti_identity_id, lease_expires_at FROM service_identities"))
        man = {r[0] for r in zmtest.query(self.store, "SELECT ziti_identity_id FROM managed_identities")}
        pend = {r[0] for r in zmtest.query(self.store, "SELECT name FROM pending_identities")}
        tomb |= {r[0] for r in zmtest.query(self.store, "SELECT ziti_identity_id FROM deleting_identities")}
        return svc, man, pend, tomb

    def checkpoint(self, final=False):
        """With the service stopped and the simulator quiet: no identity on
        the simulator without a record (leak); no committed record with a
        live lease, or a mapping nobody asked to delete, without its identity
        (wrongly deleted). final=True: after full recovery, exact equality."""
        self.sim.refuse(False)
        self.sim.clear_faults()
        time.sleep(MAX_DELAY_MS / 1000.0 + 0.5)  # delayed requests land
        svc, man, pend, tomb = self.records()
        idents = self.sim.state()["identities"]
        on_sim = {i["id"] for i in idents}
        now_ts = zmtest.ts(zmtest.now_ms() + 200)
        leaked = [i for i in idents if i["id"] not in svc and i["id"] not in man and
                  (final or (i["name"] not in pend and i["id"] not in tomb))]
        wrong = [z for z, lease in svc.items() if z not in on_sim and lease > now_ts]
        stale = [z for z in man if z not in on_sim]
        wrong_man = [z for z in stale if z not in self.deleting]
        for i in leaked:
            self.stats.problem("leaked", "%s (%s)" % (i["id"], i["name"]))
        for z in wrong + wrong_man:
            self.stats.problem("wrongly_deleted", "record %s has no identity" % z)
        if final:
            expired_gone = [z for z, lease in svc.items() if z not in on_sim]
            if expired_gone:
                self.stats.problem("unresolved", "records without identity after recovery: %s" % expired_gone)
            if pend:
                self.stats.problem("unresolved", "pending records after recovery: %s" % sorted(pend))
            if tomb:
                self.stats.problem("unresolved", "tombstones after recovery: %s" % sorted(tomb))
        self.stats.inc("stale_mappings_seen", len(set(stale) - set(wrong_man)))
        self.stats.inc("checkpoints")
        log("checkpoint%s: %d on sim, %d service, %d managed, %d pending, %d deleting; leaked %d, "
            "wrongly deleted %d" % (" (final)" if final else "", len(idents), len(svc), len(man), len(pend),
                                    len(tomb), len(leaked), len(wrong) + len(wrong_man)))

    # ---- main -------------------------------------------------------------

    def run(self):
        a = self.a
        self.pause_chaos = threading.Event()
        t_start = time.monotonic()
        self.start_all()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(a.workers)]
        threads += [threading.Thread(target=self.keeper, args=(i,), daemon=True) for i in range(a.keepers)]
        threads.append(threading.Thread(target=self.chaos, daemon=True))
        for t in threads:
            t.start()
        t_end = time.monotonic() + a.duration
        next_check = time.monotonic() + a.check_every
        deck = []
        try:
            while time.monotonic() < t_end:
                time.sleep(self.rng.uniform(a.kill_min, a.kill_max))
                self.check_alive()
                if time.monotonic() >= next_check:
                    self.pause_chaos.set()
                    self.kill_all("SIGKILL")
                    self.checkpoint()
                    self.start_all()
                    self.pause_chaos.clear()
                    next_check = time.monotonic() + a.check_every
                    continue
                if not deck:  # every kind once per round, in random order
                    deck = ["SIGKILL", "SIGKILL", "SIGTERM", "HOOK"]
                    if self.pg is not None:
                        deck += ["DB_KILL", "DB_IMMEDIATE", "OUTAGE"]
                    self.rng.shuffle(deck)
                how = deck.pop()
                i = self.rng.randrange(self.n)
                if how == "HOOK":
                    self.kill_server("SIGKILL", i)
                    self.start_server(i, hook=self.rng.choice(STATES))
                elif how in ("DB_KILL", "DB_IMMEDIATE"):
                    self.db_crash(how)
                elif how == "OUTAGE":
                    self.outage()
                else:
                    self.kill_server(how, i)
                    self.start_server(i)
            # final: quiet controller, no hook, wait for recovery and GC
            log("final phase")
            self.stop.set()
            for t in threads:
                t.join(15)
            self.pause_chaos.set()
            self.sim.refuse(False)
            self.sim.clear_faults()
            self.check_alive()
            self.kill_all("SIGTERM")
            time.sleep(MAX_DELAY_MS / 1000.0 + 0.5)
            self.start_all()
            # recovery and GC: pending rows resolve after intent + deadline +
            # ZITI_REQUEST_TIMEOUT + margin, leases go TTL + margin after the
            # (re)start, deferred deletes back off up to a few tens of seconds
            deadline = time.monotonic() + self.ttl + a.settle
            while time.monotonic() < deadline:
                svc, man, pend, tomb = self.records()
                if not pend and not svc and not tomb:
                    break
                time.sleep(0.5)
            self.kill_all("SIGTERM")
            self.checkpoint(final=True)
        finally:
            self.stop.set()
            self.kill_all("SIGKILL")
            self.sim.stop()
            if self.pg is not None:
                self.pg.destroy()
        c = self.stats.c
        wall = time.monotonic() - t_start
        summary = {"duration_s": a.duration, "wall_s": round(wall, 1), "seed": a.seed, "backend": a.backend,
                   "replicas": self.n, "leaked": c["leaked"], "wrongly_deleted": c["wrongly_deleted"],
                   "zombies": c["zombie"], "server_died": c["server_died"],
                   "unresolved": c["unresolved"], "counters": dict(sorted(c.items())),
                   "problems": self.stats.problems[:50], "dir": self.dir}
        print(json.dumps(summary, indent=1))
        ok = not (c["leaked"] or c["wrongly_deleted"] or c["zombie"] or c["server_died"] or c["unresolved"]
                  or c["bad_exit"] or c["client_error"])
        log("RESULT: %s - leaked %d, wrongly deleted %d, zombies %d, server died %d (seed %d, %s x%d, "
            "chaos %.0f s, wall %.0f s)" %
            ("PASS" if ok else "FAIL", c["leaked"], c["wrongly_deleted"], c["zombie"], c["server_died"],
             a.seed, a.backend, self.n, a.duration, wall))
        if ok and not a.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3600, help="seconds of chaos (default 3600)")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--workers", type=int, default=4, help="threads doing random RPCs")
    p.add_argument("--keepers", type=int, default=4, help="threads acting as pods that extend their lease")
    p.add_argument("--ttl", type=float, default=3.0, help="lease TTL in seconds")
    p.add_argument("--kill-min", type=float, default=2.0)
    p.add_argument("--kill-max", type=float, default=8.0)
    p.add_argument("--check-every", type=float, default=30.0, help="seconds between invariant checkpoints")
    p.add_argument("--keep", action="store_true", help="keep the work directory even on success")
    p.add_argument("--backend", choices=["sqlite", "pg"], default="sqlite",
                   help="pg: a throwaway PostgreSQL cluster (DATABASE_URL), also killed now and then")
    p.add_argument("--replicas", type=int, default=1, help="replicas on the one store (pg only for > 1)")
    p.add_argument("--settle", type=float, default=90.0, help="seconds (plus TTL) the final phase may take")
    a = p.parse_args()
    if a.replicas > 1 and a.backend != "pg":
        p.error("--replicas > 1 needs --backend pg")
    log("soak: seed %d, duration %.0fs, backend %s, replicas %d, binary %s" %
        (a.seed, a.duration, a.backend, a.replicas, zmtest.zm_bin()))
    sys.exit(Soak(a).run())


if __name__ == "__main__":
    main()
