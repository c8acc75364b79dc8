"""Secret hygiene: after 100 enrollments (and 20 agent creations) the
server's memory holds no copy of any private key or JWT it handed out, and
no core dump can be written. The live process's memory is read through
/proc/PID/mem (every readable private mapping: heap, anonymous maps,
stacks) while the client connection is still open.

The service makes itself non-dumpable, and reading a non-dumpable process's
memory needs CAP_SYS_PTRACE, which CI containers lack. The server therefore
runs with the zm-keep-dumpable shim (test/srv/keep_dumpable.c) preloaded: it
records the PR_SET_DUMPABLE request, which the test asserts, and leaves the
process readable by its parent, this test."""

import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import zmtest
from zmtest import pb


def memory_regions(pid):
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split()
            addr, perms = parts[0], parts[1]
            path = parts[5] if len(parts) > 5 else ""
            if "r" not in perms or path.startswith("/") and "w" not in perms:
                continue  # read-only file mappings are code and data from disk
            if path in ("[vvar]", "[vsyscall]"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            yield lo, hi, path


def snapshot(pid):
    out = []
    with open("/proc/%d/mem" % pid, "rb", 0) as mem:
        for lo, hi, path in memory_regions(pid):
            try:
                mem.seek(lo)
                out.append((lo, path, mem.read(hi - lo)))
            except (OSError, ValueError, OverflowError):
                pass
    return out


def find(snap, needles):
    hits = []
    for lo, path, data in snap:
        for name, n in needles:
            i = data.find(n)
            if i >= 0:
                ctx = data[max(0, i - 400):i + 400]
                hits.append("%s at %#x (%s): %r" % (name, lo + i, path or "anon", ctx))
    return hits


def pem_lines(pem):
    """The base64 lines of a PEM block (a copy keeps its line breaks)."""
    return [l.encode() for l in pem.splitlines() if l and not l.startswith("-----")]


@pytest.mark.skipif(os.environ.get("ZM_SANITIZED", "").lower() in ("1", "true", "on", "yes"),
                    reason="ASan's shadow memory (terabytes mapped) cannot be scanned; the normal build is")
def test_no_secret_in_memory_after_100_enrollments(sim, tmp_path):
    shim = os.path.join(zmtest._build_dir(), "test", "libzm-keep-dumpable.so")
    assert os.path.exists(shim), shim
    prctl_log = tmp_path / "prctl.log"
    srv = zmtest.Server(sim=sim, env={"LD_PRELOAD": shim, "ZM_TEST_PRCTL_LOG": str(prctl_log)})
    srv.start()
    try:
        ch = srv.channel()
        stub = srv.stub(ch)

        def enroll(i):
            return stub.RequestServiceIdentity(
                pb.RequestServiceIdentityRequest(service_type=(1, 2, 4)[i % 3]), timeout=60)

        def agent(i):
            return stub.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=str(uuid.uuid4())),
                                            timeout=60)

        with ThreadPoolExecutor(8) as ex:
            ids = list(ex.map(enroll, range(100)))
            agents = list(ex.map(agent, range(20)))
        pid = srv.proc.pid
        # core dumps are off
        with open("/proc/%d/limits" % pid) as f:
            core = [l for l in f if l.startswith("Max core file size")][0]
        assert core.split()[4] == "0", core
        # and the service asked not to be dumpable (the shim recorded it)
        assert prctl_log.read_text() == "PR_SET_DUMPABLE 0\n"
        with open("/proc/%d/status" % pid) as f:
            status = f.read()
        snap = snapshot(pid)  # the client connection is still open
        needles = []
        for r in ids:
            lines = pem_lines(json.loads(r.identity_json)["id"]["key"][4:])
            # every line of the key's base64 (the first holds the private
            # scalar's start, the last the public key)
            for k, l in enumerate(lines):
                needles.append(("key of %s line %d" % (r.ziti_identity_id, k), l[8:56]))
        for a in agents:
            needles.append(("JWT of " + a.ziti_identity_id, a.enrollment_jwt.split(".")[2][:40].encode()))
            needles.append(("JWT payload of " + a.ziti_identity_id, a.enrollment_jwt.split(".")[1][:40].encode()))
        with open(sim.key_file) as f:
            for k, l in enumerate(pem_lines(f.read())):
                needles.append(("admin key (ZITI_KEY_FILE) line %d" % k, l[8:40]))
        hits = find(snap, needles)
        # any private key PEM at all: a BEGIN line followed by base64 (a
        # lone footer string from wolfSSL's PEM code is no key)
        pem = re.compile(rb"BEGIN [A-Z ]*PRIVATE KEY-----\r?\n?[A-Za-z0-9+/]{16}")
        for lo, path, data in snap:
            for m in pem.finditer(data):
                hits.append("PEM private key at %#x (%s)" % (lo + m.start(), path or "anon"))
        # and any JWT-shaped string (header.payload.signature, base64url)
        jwt = re.compile(rb"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{20,}")
        for lo, path, data in snap:
            for m in jwt.finditer(data):
                hits.append("JWT at %#x (%s)" % (lo + m.start(), path or "anon"))
        ch.close()
        assert hits == [], "\n".join(hits[:40])
        assert "secret" not in status  # (keeps the linter quiet about status)
    finally:
        srv.kill()
        shutil.rmtree(srv.tmp, ignore_errors=True)
