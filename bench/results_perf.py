#!/usr/bin/python3
"""bench/results_perf.py OUT RESULTS_MD: the issue-15 section of RESULTS.md
from one bench/run-perf.sh run (OUT = its raw outputs). Every ratio compares
figures measured in that one run; a missing input reads n/a, never a guess.
The section between the perf-bench markers is replaced (or appended)."""

import csv
import json
import os
import re
import sys

BEGIN = "<!-- perf-bench:begin (bench/run-perf.sh writes this section) -->"
END = "<!-- perf-bench:end -->"
ANCHORS = ("cpp-async", "cpp-callback", "go")

out_dir, results_md = sys.argv[1], sys.argv[2]


def read_tsv(name):
    p = os.path.join(out_dir, name)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_text(name):
    p = os.path.join(out_dir, name)
    return open(p, errors="replace").read() if os.path.exists(p) else ""


facts = {}
for line in read_text("facts.tsv").splitlines():
    k, _, v = line.partition("\t")
    facts[k] = v


def median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def fnum(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def ratio(a, b):
    return a / b if a is not None and b else None


def fx(x):
    return "n/a" if x is None else f"{x:.2f}x"


def us(x):
    if x is None:
        return "n/a"
    return f"{x:.0f} us" if x < 1000 else f"{x / 1000:.2f} ms"


def verdict(x, ok):
    if x is None:
        return "n/a"
    return "**met**" if ok(x) else "**missed**"


# ---- 1. the anchors' run.sh (h2load, one key) ----------------------------------------
anch = {}
for r in read_tsv("anchors.tsv"):
    anch[(r["server"], r["rpc"], r["conns"] + "x" + r["streams"])] = r


def a_get(server, rpc, cm, col):
    r = anch.get((server, rpc, cm))
    return fnum(r[col]) if r else None


def a_best(rpc, cm, col, want_max):
    vals = [(a_get(a, rpc, cm, col), a) for a in ANCHORS if a_get(a, rpc, cm, col)]
    if not vals:
        return None, None
    return max(vals) if want_max else min(vals)


peak = {}
for r in read_tsv("anchors.tsv"):
    if fnum(r.get("peak_rss_kb")):
        peak[r["server"]] = fnum(r["peak_rss_kb"])

# ---- 2/3. random keys and the ceiling (cases.tsv) ---------------------------------------
cases = read_tsv("cases.tsv")


def c_med(step, server, cm, col, rpc="resolve"):
    vals = [fnum(r[col]) for r in cases
            if r["step"] == step and r["server"] == server and r["conns"] + "x" + r["streams"] == cm
            and r["rpc"] == rpc and r["ok"] == "1" and fnum(r[col]) is not None]
    return median(vals)


def c_rounds(step, server, cm, rpc="resolve"):
    rs = [r for r in cases if r["step"] == step and r["server"] == server and r["conns"] + "x" + r["streams"] == cm
          and r["rpc"] == rpc]
    return "/".join(f"{fnum(r['rps']) or 0:.0f}" + ("" if r["ok"] == "1" else "!") for r in rs)


# ---- 4. idle connections: bench/idle-conns.sh's summary lines ---------------------------
def idle_of(mode):
    t = read_text(f"idle-{mode}.txt")
    m = re.search(r"per idle connection: ([0-9.]+) KiB RssAnon", t)
    n = re.search(r"connections: (\d+) requested, (\d+) ready", t)
    return (float(m.group(1)) if m else None), (n.group(2) if n else "?")


# ---- 5. enrollment: bench/enroll-isolation.sh prints "key=value" result lines --------
def kv(text):
    d = {}
    for m in re.finditer(r"^([a-z_0-9]+)=(\S+)", text, re.M):
        d[m.group(1)] = m.group(2)
    return d


enroll = kv(read_text("enroll.txt"))

rows = []


def target(what, value, goal, ok, source):
    rows.append((what, value, goal, ok, source))


# resolve 32x32 vs nghttpd
zm_c = c_med("ceiling", "zm", "32x32", "rps")
ng_c = c_med("ceiling", "nghttpd", "32x32", "rps")
x = ratio(zm_c, ng_c)
target("ResolveIdentity 32x32 / nghttpd (h2load, same command)", fx(x), ">= 0.80x",
       verdict(x, lambda v: v >= 0.8),
       f"zm {zm_c or 0:.0f} ({c_rounds('ceiling', 'zm', '32x32')}) / nghttpd {ng_c or 0:.0f} "
       f"({c_rounds('ceiling', 'nghttpd', '32x32')}) req/s")

# 1x1 mean latency vs the best anchor: zm at its defaults, and zm-bp
# (LOOP_BUSY_POLL_US); h2load through the anchors' run.sh (one key), and
# zm-bench (random keys)
BP = facts.get("busy_poll_us", "?")
for srv, label in (("zm", "defaults"), ("zm-bp", f"LOOP_BUSY_POLL_US={BP}")):
    zl = a_get(srv, "resolve", "1x1", "lat_mean_us")
    bl, bn = a_best("resolve", "1x1", "lat_mean_us", False)
    x = ratio(zl, bl)
    target(f"ResolveIdentity 1x1 mean latency / best anchor's (anchors' run.sh, h2load), zm {label}", fx(x),
           "<= 0.50x", verdict(x, lambda v: v <= 0.5), f"{srv} {us(zl)} / {bn} {us(bl)}")
for rpc, name in (("resolve", "ResolveIdentity"), ("extend", "ExtendIdentityLease")):
    for srv, label in (("zm", "defaults"), ("zm-bp", f"LOOP_BUSY_POLL_US={BP}")):
        zr = c_med("random", srv, "1x1", "mean_us", rpc)
        br = [(c_med("random", a, "1x1", "mean_us", rpc), a) for a in ANCHORS
              if c_med("random", a, "1x1", "mean_us", rpc)]
        bl = min(br) if br else (None, None)
        x = ratio(zr, bl[0])
        target(f"{name} 1x1 mean latency / best anchor's, random keys (zm-bench), zm {label}", fx(x), "<= 0.50x",
               verdict(x, lambda v: v <= 0.5), f"{srv} {us(zr)} / {bl[1]} {us(bl[0])}")

# peak RSS with 100,000 identities
zp = peak.get("zm")
ap = [(peak[a], a) for a in ANCHORS if a in peak]
sp = min(ap) if ap else (None, None)
x = ratio(zp, sp[0])
target("peak RSS, 100,000 identities, after the anchors' cases / smallest anchor's", fx(x), "<= 0.33x",
       verdict(x, lambda v: v <= 1 / 3),
       f"zm {zp / 1024 if zp else 0:.1f} MiB / {sp[1]} {sp[0] / 1024 if sp[0] else 0:.1f} MiB (VmHWM)")

# idle connections
for mode in ("h2c", "tls"):
    kib, n = idle_of(mode)
    if mode == "h2c":
        target(f"memory per idle HTTP/2 connection (h2c) at {n} connections", "n/a" if kib is None else f"{kib:.2f} KiB",
               "<= 10 KiB", verdict(kib, lambda v: v <= 10), "RssAnon growth / connections (bench/idle-conns.sh)")
    else:
        other_idle = f"- memory per idle TLS connection at {n} connections: " + ("n/a" if kib is None else f"{kib:.2f} KiB")

# enrollment
cpu = fnum(enroll.get("cpu_us_per_enroll"))
crypto = fnum(enroll.get("crypto_us"))
x = ratio(cpu, crypto)
steal = (f"hypervisor steal on the server's CPU (/proc/stat): {enroll.get('steal_enroll_alone_pct', '?')} % of the "
         f"enrollments-alone window, {enroll.get('steal_enroll_pct', '?')} % of the window with both loads (worst "
         f"100 ms slice: {enroll.get('steal_enroll_worst_ms', '?')} ms), {enroll.get('steal_floor_pct', '?')} % "
         f"during zm-floor")
target("server CPU per RequestServiceIdentity (4x8, alone) / bare key + CSR", fx(x), "<= 2x",
       verdict(x, lambda v: v <= 2),
       f"{us(cpu)} / {us(crypto)} (user {us(fnum(enroll.get('cpu_us_per_enroll_user')))}, kernel "
       f"{us(fnum(enroll.get('cpu_us_per_enroll_sys')))}; with the resolve load alongside, both loads' CPU: "
       f"{us(fnum(enroll.get('cpu_us_per_enroll_mixed')))} per enrollment; "
       f"{'loop-lag probe on' if enroll.get('cpu_probe') == '1' else 'loop-lag probe off'}); "
       f"the same key + CSR with the CPU idle 2 ms between keys: {us(fnum(enroll.get('crypto_gap_us')))} CPU; "
       f"in the service (its zm_enroll_crypto_cpu_seconds_total): key + CSR "
       f"{us(fnum(enroll.get('keygen_inservice_us')))}, JWT check {us(fnum(enroll.get('verify_inservice_us')))}; "
       f"kernel (the process): {us(fnum(enroll.get('kernel_us_per_enroll')))}; those crypto steps and the kernel's "
       f"share alone: {us(fnum(enroll.get('floor_steps_kernel_us')))} = "
       f"{fx(ratio(fnum(enroll.get('floor_steps_kernel_us')), crypto))}; user space of the loop "
       f"{us(fnum(enroll.get('loop_user_us')))}, of the store thread {us(fnum(enroll.get('store_user_us')))}; "
       f"a wake-up round trip costs a thread {us(fnum(enroll.get('floor_switch_round_us')))} CPU on one core and "
       f"{us(fnum(enroll.get('floor_xcpu_round_us')))} across the two CPUs (zm-floor), and each call, "
       f"controller exchange and reply crosses them")
p99 = fnum(enroll.get("resolve_p99_us"))
target("ResolveIdentity p99 at 2,000 req/s open loop during 4x8 enrollments", us(p99), "<= 1 ms",
       verdict(p99, lambda v: v <= 1000),
       f"{'measuring client at SCHED_FIFO 1 on the client CPU (RESOLVE_RT); ' if enroll.get('resolve_rt') == '1' else ''}"
       f"max {us(fnum(enroll.get('resolve_max_us')))}; the same load alone: p99 "
       f"{us(fnum(enroll.get('resolve_alone_p99_us')))}; a bare 1 ms epoll_wait on the server's CPU wakes "
       f"late by p99 {us(fnum(enroll.get('floor_wake_idle_p99_us')))} (zm-floor); {steal}")
lag = fnum(enroll.get("loop_lag_max_us"))
target("loop-lag probe worst during the enrollments", us(lag), "<= 1 ms", verdict(lag, lambda v: v <= 1000),
       f"1 ms timer's lateness (waiting for the CPU included); the busiest loop iteration's own CPU: "
       f"{us(fnum(enroll.get('loop_busy_max_us')))}; the machine's floor (zm-floor, no server running): a bare "
       f"1 ms epoll_wait on the server's CPU woke up to {us(fnum(enroll.get('floor_wake_idle_max_us')))} late "
       f"({enroll.get('floor_wake_idle_over1ms', '?')} of {enroll.get('floor_wake_idle_n', '?')} over 1 ms; "
       f"core kept busy: up to "
       f"{us(fnum(enroll.get('floor_wake_busy_max_us')))}); {steal}")

# no throughput regression > 10 % (zm vs zm-prev, same run)
for rpc, cm in (("resolve", "32x32"), ("resolve_missing", "32x32"), ("extend", "32x32")):
    a = a_get("zm", rpc, cm, "rps_median")
    p = a_get("zm-prev", rpc, cm, "rps_median")
    x = ratio(a, p)
    target(f"{rpc} {cm} req/s, this build / zm-prev (no regression > 10 %)", fx(x), ">= 0.90x",
           verdict(x, lambda v: v >= 0.9),
           f"{a or 0:.0f} / {p:.0f} req/s" if p else "no earlier build measured (BASELINE_BIN unset)")

# ---- the section ----------------------------------------------------------------------------
L = [BEGIN, "## Performance targets (issue 15): one run of bench/run-perf.sh", ""]
L.append(f"Written by `bench/run-perf.sh`, measured {facts.get('when', '?')}; source {facts.get('source', '?')}; "
         f"the run took {facts.get('duration_s', '?')} s.")
L.append("")
for k in ("machine", "pinning", "load_start", "load_end", "baseline", "anchors", "ceiling", "enroll"):
    if k in facts:
        L.append(f"- {k}: {facts[k]}")
L.append("")
L.append("Commands:")
L.append("")
L.append("```sh")
for k in ("cmd_anchors", "cmd_ceiling", "cmd_idle", "cmd_enroll"):
    if k in facts:
        L.append(facts[k])
L.append("```")
L.append("")
L.append("| target | measured | goal | verdict | from |")
L.append("|---|---:|---|---|---|")
for what, value, goal, ok, src in rows:
    L.append(f"| {what} | {value} | {goal} | {ok} | {src} |")
L.append("")
other = [other_idle]
if enroll.get("burst_busy_max_us") not in (None, "n/a"):
    other.append(f"- a burst of enrollments after a 5.5 s lull (the controller closed the idle connections; "
                 f"{enroll.get('burst_connects', '?')} reopened, each with a TLS handshake): loop lag worst "
                 f"{us(fnum(enroll.get('burst_lag_max_us')))}, busiest loop iteration "
                 f"{us(fnum(enroll.get('burst_busy_max_us')))} (bench/enroll-isolation.sh)")
zr32 = a_get("zm", "resolve", "32x32", "rps_median")
br32, bn32 = a_best("resolve", "32x32", "rps_median", True)
other.append(f"- ResolveIdentity 32x32 (h2load, one key) / best anchor ({bn32}): {fx(ratio(zr32, br32))}")
ze = a_get("zm", "extend", "32x32", "rps_median")
be, ben = a_best("extend", "32x32", "rps_median", True)
other.append(f"- ExtendIdentityLease 32x32 (h2load, one key) / best anchor ({ben}): {fx(ratio(ze, be))}")
zel = a_get("zm", "extend", "1x1", "lat_mean_us")
bel, beln = a_best("extend", "1x1", "lat_mean_us", False)
other.append(f"- ExtendIdentityLease 1x1 mean latency (h2load) / best anchor's ({beln}): {fx(ratio(zel, bel))}")
z32 = c_med("random", "zm", "32x32", "rps")
b32 = [(c_med("random", a, "32x32", "rps"), a) for a in ANCHORS if c_med("random", a, "32x32", "rps")]
if b32:
    m = max(b32)
    other.append(f"- ResolveIdentity 32x32, random keys (zm-bench) / best anchor ({m[1]}): {fx(ratio(z32, m[0]))}")
L.append("Other same-run ratios:")
L.append("")
L.extend(other)
L.append("")
if read_text("anchors.md"):
    L.append("The anchors' run.sh table (zm and zm-prev added through EXTRA_SERVERS):")
    L.append("")
    L.extend(l for l in read_text("anchors.md").splitlines() if l.startswith("|"))
    L.append("")
if cases:
    L.append("zm-bench (random keys) and the ceiling runs, every round:")
    L.append("")
    L.append("| step | server | rpc | conns x streams | round | req/s | mean | p99 | ok |")
    L.append("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in cases:
        L.append(f"| {r['step']} | {r['server']} | {r['rpc']} | {r['conns']}x{r['streams']} | {r['round']} | "
                 f"{fnum(r['rps']) or 0:.0f} | {us(fnum(r['mean_us']))} | {us(fnum(r['p99_us']))} | "
                 f"{'ok' if r['ok'] == '1' else 'FAILED'} |")
    L.append("")
for name, title in (("idle-h2c.txt", "bench/idle-conns.sh (h2c)"), ("idle-tls.txt", "bench/idle-conns.sh (TLS)"),
                    ("enroll.txt", "bench/enroll-isolation.sh")):
    t = read_text(name)
    if t:
        L.append(f"{title} printed:")
        L.append("")
        L.append("```")
        L.extend(t.strip().splitlines()[-40:])
        L.append("```")
        L.append("")
L.append(END)
section = "\n".join(L) + "\n"

md = open(results_md).read() if os.path.exists(results_md) else "# ziti-management: benchmark results\n"
if BEGIN in md and END in md:
    md = md[: md.index(BEGIN)] + section + md[md.index(END) + len(END) + 1:]
else:
    md = md.rstrip("\n") + "\n\n" + section
open(results_md, "w").write(md)
print("\n".join(L[L.index("| target | measured | goal | verdict | from |"):][: len(rows) + 2]))
