"""Test helper: start/stop the OpenZiti controller simulator and drive its control API.

    import sys; sys.path.insert(0, "<repo>/test/sim")
    from simctl import Sim
    sim = Sim.start("/tmp/somedir", session_timeout=60)
    ... sim.url, sim.ca_file, sim.cert_file, sim.key_file, sim.mtls_port ...
    sim.faults({"rules": [{"method": "POST", "path_prefix": "/edge/management/v1/identities",
                           "action": "status", "status": 500, "count": 1}]})
    sim.stop()
"""

import http.client
import json
import os
import signal
import subprocess
import time

SIM_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ziti_sim.py")
PYTHON = "/usr/bin/python3"


class SimError(Exception):
    pass


class Sim:
    """A running simulator process. Use Sim.start(); also a context manager."""

    def __init__(self, proc, directory, info):
        self.proc = proc
        self.dir = directory
        self.info = info
        self.url = info["url"]
        self.port = info["port"]
        self.ctl_port = info["ctl_port"]
        self.mtls_port = info["mtls_port"]
        self.ca_file = info["ca_file"]
        self.cert_file = info["cert_file"]
        self.key_file = info["key_file"]
        self.server_cert_file = info.get("server_cert_file")
        self.pid = info["pid"]

    # -- lifecycle

    @classmethod
    def start(cls, directory, timeout=30.0, log_file=None, **opts):
        """Spawn the simulator with --dir directory; opts map to CLI flags (port, ctl_port, mtls_port,
        host, server_key, session_timeout, enrollment_minutes). Waits for sim.json."""
        os.makedirs(directory, exist_ok=True)
        sj = os.path.join(directory, "sim.json")
        try:
            os.unlink(sj)
        except FileNotFoundError:
            pass
        cmd = [PYTHON, SIM_PY, "--dir", directory]
        for k, v in opts.items():
            if v is None:
                continue
            cmd += ["--" + k.replace("_", "-"), str(v)]
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=out if log_file else subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        if log_file:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise SimError("simulator exited with %s: %s" % (proc.returncode, err))
            try:
                with open(sj) as f:
                    info = json.load(f)
                if info.get("pid") == proc.pid:
                    return cls(proc, directory, info)
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise SimError("simulator did not write %s within %.0fs" % (sj, timeout))

    def stop(self, timeout=10.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- control API

    def _ctl(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.ctl_port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        obj = json.loads(raw) if raw else None
        if r.status >= 400:
            raise SimError("control %s %s -> %d %s" % (method, path, r.status, obj))
        return obj

    def state(self):
        """{"identities":[...non-default-admin...], "counters":{"<METHOD> <template>":n}, "sessions":n, ...}"""
        return self._ctl("GET", "/state")

    def faults(self, spec):
        """Replace fault rules; {} clears. See README.md for the rule format."""
        return self._ctl("POST", "/faults", spec)

    def clear_faults(self):
        return self.faults({})

    def refuse(self, on=True):
        return self._ctl("POST", "/refuse", {"on": bool(on)})

    def expire_sessions(self):
        return self._ctl("POST", "/expire_sessions", {})

    def rotate_admin_cert(self):
        """Renews the admin certificate: the controller accepts only the new one, sessions end, and the
        admin.pem/admin.key files are replaced. Returns the new certificate's SHA-1 fingerprint."""
        return self._ctl("POST", "/rotate_admin_cert", {})["fingerprint"]

    def seed_identity(self, name, external_id=None, role_attributes=None, is_admin=False, ott=True):
        """Create an identity directly (bypassing the API); returns the identity detail JSON."""
        body = {"name": name, "isAdmin": is_admin, "ott": ott}
        if external_id is not None:
            body["externalId"] = external_id
        if role_attributes is not None:
            body["roleAttributes"] = role_attributes
        return self._ctl("POST", "/identities", body)

    def identity(self, ident_id):
        """Identity detail JSON as the API would return it (control API, no auth)."""
        return self._ctl("GET", "/identities/" + ident_id)

    def reset(self):
        return self._ctl("POST", "/reset", {})

    def counter(self, key):
        return self.state()["counters"].get(key, 0)

    def seed_bulk(self, prefix, count, ott=False):
        """Create count identities named <prefix>-<n> directly; returns their ids (benchmarks)."""
        return self._ctl("POST", "/identities", {"name": prefix, "count": count, "ott": ott})["ids"]
