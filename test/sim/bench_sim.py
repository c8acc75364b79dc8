#!/usr/bin/python3
"""Throughput of the simulator with h2load (nghttp2-client) as the load generator:
16 keep-alive HTTP/1.1 TLS connections, one request in flight per connection.

    /usr/bin/python3 test/sim/bench_sim.py [N]

Scenarios: DELETE /identities/{id} of N distinct seeded identities (all 200),
GET /identities/{id} (200, full detail JSON), GET /.well-known/est/cacerts (no auth).
"""

import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simctl import Sim  # noqa: E402


def authenticate(sim):
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    ctx.load_cert_chain(sim.cert_file, sim.key_file)
    c = http.client.HTTPSConnection("127.0.0.1", sim.port, context=ctx)
    c.request("POST", "/edge/management/v1/authenticate?method=cert", body=b"{}",
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    tok = r.getheader("zt-session")
    c.close()
    return tok


def h2load(args):
    out = subprocess.run(["h2load", "--h1", "-c16", "-t1"] + args, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"finished in [0-9.]+s, ([0-9.]+) req/s", out)
    codes = re.search(r"status codes: (.*)", out)
    return float(rate.group(1)), codes.group(1).strip()


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
    if not shutil.which("h2load"):
        print("h2load not found (apt-get install nghttp2-client)")
        return 1
    d = tempfile.mkdtemp(prefix="zsim-bench-")
    sim = Sim.start(d)
    try:
        tok = authenticate(sim)
        ids = sim.seed_bulk("bench", n)
        # h2load replays the same URI list on every client, so run 16 single-connection
        # h2load processes on disjoint id lists at once and time them together.
        procs = []
        per = n // 16
        t0 = time.monotonic()
        for k in range(16):
            uris = os.path.join(d, "uris%d.txt" % k)
            with open(uris, "w") as f:
                for i in ids[k * per:(k + 1) * per]:
                    f.write("%s/edge/management/v1/identities/%s\n" % (sim.url, i))
        t0 = time.monotonic()
        for k in range(16):
            procs.append(subprocess.Popen(["h2load", "--h1", "-c1", "-t1", "-n%d" % per, "-H", "zt-session: " + tok,
                                           "-H", ":method: DELETE", "-i", os.path.join(d, "uris%d.txt" % k)],
                                          stdout=subprocess.PIPE, text=True))
        ok = 0
        for p in procs:
            out = p.communicate()[0]
            ok += int(re.search(r"status codes: ([0-9]+) 2xx", out).group(1))
        el = time.monotonic() - t0
        left = len(sim.state()["identities"])
        print("DELETE identity  : %8.0f req/s  (%d x 200 of %d; identities left %d)" % (16 * per / el, ok, 16 * per,
                                                                                       left))
        one = sim.seed_bulk("get", 1)[0]
        rate, codes = h2load(["-n%d" % n, "-H", "zt-session: " + tok,
                              "%s/edge/management/v1/identities/%s" % (sim.url, one)])
        print("GET identity     : %8.0f req/s  (%s)" % (rate, codes))
        rate, codes = h2load(["-n%d" % n, "%s/.well-known/est/cacerts" % sim.url])
        print("GET cacerts      : %8.0f req/s  (%s)" % (rate, codes))
    finally:
        sim.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
