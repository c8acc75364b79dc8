#!/usr/bin/env python3
"""results_lifecycle.py OUT RESULTS_MD - renders bench/run-lifecycle.sh's
runs (OUT/runs.tsv, OUT/facts.tsv) as a markdown section and puts it into
RESULTS_MD between the lifecycle-bench markers (replacing an earlier one, or
appended). The previous figures for the ResolveIdentity regression check are
read from the rest of RESULTS_MD (the zm-bench scenario table and the
ratio table of the anchors' run that bench/run.sh writes)."""
import csv
import re
import statistics
import sys
from collections import OrderedDict

BEGIN = "<!-- lifecycle-bench:begin (bench/run-lifecycle.sh writes this section) -->"
END = "<!-- lifecycle-bench:end -->"
ANCHORS = ("cpp-async", "cpp-callback", "go")

out_dir, md_path = sys.argv[1], sys.argv[2]
runs = list(csv.DictReader(open(f"{out_dir}/runs.tsv"), delimiter="\t"))
facts = OrderedDict()
for line in open(f"{out_dir}/facts.tsv"):
    k, _, v = line.rstrip("\n").partition("\t")
    facts[k] = v

try:
    old_md = open(md_path).read()
except FileNotFoundError:
    old_md = ""
rest = old_md
if BEGIN in rest and END in rest:
    rest = rest[: rest.index(BEGIN)] + rest[rest.index(END) + len(END):]


def us(u):
    u = float(u)
    return f"{u:.0f} us" if u < 1000 else (f"{u / 1000:.2f} ms" if u < 1e6 else f"{u / 1e6:.2f} s")


# ---- medians per (group, server, rpc, c, m) ----------------------------------------
groups = OrderedDict()
for r in runs:
    groups.setdefault((r["group"], r["server"], r["rpc"], r["conns"], r["streams"]), []).append(r)
med = {}
rows = []
for key, rs in groups.items():
    # every round that produced a result counts (req/s counts verified
    # answers only; errors are reported next to it, never left out)
    use = [r for r in rs if int(r["errors"]) >= 0] or rs
    m = {
        "rps": statistics.median(float(r["rps"]) for r in use),
        "mean": statistics.median(float(r["lat_mean_us"]) for r in use),
        "p99": statistics.median(float(r["lat_p99_us"]) for r in use),
        "srv": statistics.median(float(r["srv_cpu_pct"]) for r in use),
        "core": statistics.median(float(r["core_busy_pct"]) for r in use),
        "pg": statistics.median(float(r.get("pg_cpu_pct") or 0) for r in use),
        "other": statistics.median(float(r["core_busy_pct"]) - float(r["srv_cpu_pct"]) - float(r.get("pg_cpu_pct") or 0) for r in use),
        "cli": statistics.median(float(r["cli_cpu_pct"]) for r in use),
        "steal": max(float(r["steal_pct"]) for r in rs),
        "errors": sum(max(int(r["errors"]), 0) for r in rs),
        "failed": sum(1 for r in rs if int(r["errors"]) < 0),
        "rounds": "/".join(f"{float(r['rps']):.0f}" for r in sorted(rs, key=lambda r: int(r["round"]))),
    }
    med[(key[1], key[2], key[3] + "x" + key[4])] = m
    rows.append((key, m))


def get(server, rpc, cm, what="rps"):
    m = med.get((server, rpc, cm))
    return m[what] if m else None


def best_anchor(rpc, cm, what="rps"):
    vals = [(get(a, rpc, cm, what), a) for a in ANCHORS if get(a, rpc, cm, what)]
    if not vals:
        return None, None
    return (max(vals) if what == "rps" else min(vals))


def ratio(a, b):
    return a / b if a is not None and b else None


def fx(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}x"


# ---- previous figures (the rest of RESULTS.md) --------------------------------------
def table_cells(md, first_cells, marker=None):
    for line in md.splitlines():
        if not line.startswith("|") or (marker and marker not in line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first_cells)] == list(first_cells):
            return cells
    return None


def num(s):
    if s is None:
        return None
    m = re.search(r"[0-9.]+", s.replace(",", ""))
    return float(m.group()) if m else None


prev_date = re.search(r"Measured (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", rest)
prev_src = re.search(r"- source: (\S+)", rest)
prev = {}
c = table_cells(rest, ["resolve-32x32"])
prev["resolve_32_rps"] = num(c[4]) if c else None
c = table_cells(rest, ["resolve-1x1"])
prev["resolve_1_rps"] = num(c[4]) if c else None
c = table_cells(rest, ["extend-32x32"])
prev["extend_32_rps"] = num(c[4]) if c else None
c = table_cells(rest, ["zm", "resolve", "32x32"], "**")
prev["resolve_32_ratio"] = num(c[6]) if c else None
c = table_cells(rest, ["zm", "resolve", "1x1"], "**")
prev["resolve_1_latratio"] = num(c[9]) if c else None

# ---- ratios and targets ---------------------------------------------------------------------
R = OrderedDict()
ba_x32, ba_x32_n = best_anchor("extend", "32x32")
ba_x1l, ba_x1l_n = best_anchor("extend", "1x1", "mean")
ba_r32, ba_r32_n = best_anchor("resolve", "32x32")
ba_r1l, ba_r1l_n = best_anchor("resolve", "1x1", "mean")
targets = []


def target(name, value, ok, goal, how):
    targets.append((name, value, "n/a" if ok is None else ("**met**" if ok else "**missed**"), goal, how))


x = ratio(get("zm", "extend", "32x32"), ba_x32)
target("embedded extend 32x32 / fastest in-memory anchor", fx(x), None if x is None else x >= 3, ">= 3x",
       f"zm {get('zm', 'extend', '32x32') or 0:.0f} / {ba_x32_n} {ba_x32 or 0:.0f} req/s")
x = ratio(get("zm", "extend-steady", "32x32"), ba_x32)
target("embedded extend 32x32, steady-state window / fastest in-memory anchor", fx(x), None if x is None else x >= 3, ">= 3x",
       f"zm {get('zm', 'extend-steady', '32x32') or 0:.0f} (window = one flush granule) / {ba_x32_n} {ba_x32 or 0:.0f} req/s")
x = ratio(get("zm", "extend", "1x1", "mean"), ba_x1l)
target("embedded extend 1x1 mean latency / best anchor's", fx(x), None if x is None else x <= 0.5, "<= 0.5x",
       f"zm {us(get('zm', 'extend', '1x1', 'mean') or 0)} / {ba_x1l_n} {us(ba_x1l or 0)}")
x = ratio(get("zm-pg", "extend", "32x32"), get("go-pg", "extend", "32x32"))
target("PostgreSQL extend 32x32 / go-pg", fx(x, 1), None if x is None else x >= 10, ">= 10x",
       f"zm-pg {get('zm-pg', 'extend', '32x32') or 0:.0f} / go-pg {get('go-pg', 'extend', '32x32') or 0:.0f} req/s")
x = ratio(get("zm-pg", "extend-steady", "32x32"), get("go-pg", "extend", "32x32"))
target("PostgreSQL extend 32x32, steady-state window / go-pg", fx(x, 1), None if x is None else x >= 10, ">= 10x",
       f"zm-pg {get('zm-pg', 'extend-steady', '32x32') or 0:.0f} / go-pg {get('go-pg', 'extend', '32x32') or 0:.0f} req/s")
x = ratio(get("zm-pg", "extend", "32x32"), ba_x32)
target("PostgreSQL extend 32x32 / fastest in-memory anchor", fx(x), None if x is None else x > 1, "> 1x",
       f"zm-pg {get('zm-pg', 'extend', '32x32') or 0:.0f} / {ba_x32_n} {ba_x32 or 0:.0f} req/s")
x = ratio(get("zm-pg", "extend-steady", "32x32"), ba_x32)
target("PostgreSQL extend 32x32, steady-state window / fastest in-memory anchor", fx(x), None if x is None else x > 1, "> 1x",
       f"zm-pg {get('zm-pg', 'extend-steady', '32x32') or 0:.0f} / {ba_x32_n} {ba_x32 or 0:.0f} req/s")
x = ratio(get("zm-pg-2rep", "extend-steady", "32x32"), get("zm-pg-1rep", "extend-steady", "32x32"))
target("two replicas / one (one PostgreSQL, same client shape, steady-state window)", fx(x), None if x is None else x > 1, "> 1x",
       f"{get('zm-pg-2rep', 'extend-steady', '32x32') or 0:.0f} / {get('zm-pg-1rep', 'extend-steady', '32x32') or 0:.0f} req/s; both replicas + PostgreSQL on the one server core")
# ResolveIdentity regression: decided by the same-run before/after (zm vs
# zm-prev, same client, same seconds); the cross-run and cross-client
# comparisons are listed as information only.
xp = ratio(get("zm", "resolve", "32x32"), get("zm-prev", "resolve", "32x32"))
target("resolve 32x32 req/s: this build / previous build, same run", fx(xp), None if xp is None else xp >= 0.9, ">= 0.9x",
       f"zm {get('zm', 'resolve', '32x32') or 0:.0f} / zm-prev {get('zm-prev', 'resolve', '32x32') or 0:.0f} req/s")
xp = ratio(get("zm", "resolve", "1x1", "mean"), get("zm-prev", "resolve", "1x1", "mean"))
target("resolve 1x1 mean latency: this build / previous build, same run", fx(xp), None if xp is None else xp <= 1.1, "<= 1.1x",
       f"zm {us(get('zm', 'resolve', '1x1', 'mean') or 0)} / zm-prev {us(get('zm-prev', 'resolve', '1x1', 'mean') or 0)}")
info = []
x = ratio(get("zm", "resolve", "32x32"), ba_r32)
xq = ratio(get("zm-prev", "resolve", "32x32"), ba_r32)
info.append(f"resolve 32x32 / best anchor ({ba_r32_n}): zm {fx(x)}, zm-prev {fx(xq)} (the earlier file's {fx(prev.get('resolve_32_ratio'))} "
            "was h2load repeating one key: another client, not comparable)")
x = ratio(get("zm", "resolve", "1x1", "mean"), ba_r1l)
xq = ratio(get("zm-prev", "resolve", "1x1", "mean"), ba_r1l)
info.append(f"resolve 1x1 mean latency / best anchor's ({ba_r1l_n}): zm {fx(x)}, zm-prev {fx(xq)} (earlier file, h2load: "
            f"{fx(prev.get('resolve_1_latratio'))})")
xa, p = get("zm", "resolve", "32x32"), prev.get("resolve_32_rps")
info.append(f"resolve 32x32 req/s against the earlier file's zm-bench figure (another day on a shared VM): {fx(ratio(xa, p))} "
            f"({xa or 0:.0f} / {p or 0:.0f})")

# ---- markdown -------------------------------------------------------------------------------------
L = [BEGIN, "", "## Identity lifecycle benchmark (issue 10): random keys, one run", ""]
L.append(f"Written by `bench/run-lifecycle.sh`, measured {facts.get('date', '?')}; source {facts.get('git', '?')}; "
         f"the run took {facts.get('total', '?')}.")
L.append("")
L.append(f"- machine: {facts.get('machine', '?')}; {facts.get('postgres', '')}")
L.append(f"- {facts.get('pinning', '')}; {facts.get('shape', '')}")
if "load" in facts:
    L.append(f"- {facts['load']}")
L.append("- zm-bench drives every server, the anchors included, with the same uniformly random keys `zid-%06d` over "
         "the 100,000 preloaded identities; every answer is checked (status, and for ResolveIdentity the identity id "
         "and type). req/s = verified answers in the window / window.")
L.append("- req/s and mean latency = median over the rounds (each column on its own); CPU columns: median; srv CPU = "
         "the server process(es) CPU time / wall (PostgreSQL not included), core busy = the whole server core "
         "(server + PostgreSQL + kernel work there + anything else on it), PostgreSQL CPU = the postmaster and its "
         "children (the cluster of that server), rest of core = core busy - srv - PostgreSQL: kernel work not charged "
         "to a process (loopback softirq) and other processes on the core (this machine is shared with other sessions' "
         "builds and tests), cli CPU = zm-bench CPU / wall.")
L.append("")
L.append("Commands:")
L.append("")
L.append("```sh")
L.append(facts.get("cmd", "bench/run-lifecycle.sh"))
L.append(facts.get("cmd_build", ""))
L.append(facts.get("zm_cmd", ""))
L.append(facts.get("zm_pg_cmd", ""))
L.append("# go-pg: as the anchors' run.sh: its own PostgreSQL (same zmb_pg_start), the anchors' service_identities table, "
         "taskset -c CPU env GOMAXPROCS=1 bin/goserver-pg PORT 'postgres://zm@127.0.0.1:PORT/zitiperf?pool_max_conns=8'")
L.append("zm-bench --target 127.0.0.1:PORT --scenario extend|resolve -c C -m M -D DUR --warmup W --keys 100000 "
         "--seed N --timeout-ms 10000 --json FILE   # pinned to the client CPU")
L.append("# two replicas: two zm-bench processes at once, -c 16 -m 32 each, one per replica (the one-replica control: "
         "the same two processes against one replica)")
L.append("```")
L.append("")
for k, v in facts.items():
    if k in ("zm_env", "zm_pg_schema", "baseline", "zm_pg_rows") or k.startswith(("rss_", "stats_")):
        L.append(f"- {k}: {v}")
L.append("")
L.append("| case | server | rpc | conns x streams | req/s (median) | rounds req/s | mean lat | p99 lat | errors | srv CPU | PostgreSQL CPU | core busy | rest of core | cli CPU | steal max |")
L.append("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
names = {"a": "a. extend, embedded vs in-memory", "b": "b. extend on PostgreSQL", "c": "c. replicas",
         "d": "d. resolve"}
for (g, s, rpc, cc, mm), m in rows:
    err = str(m["errors"]) + (f" ({m['failed']} runs without result)" if m["failed"] else "")
    L.append(f"| {names.get(g, g)} | {s} | {rpc} | {cc}x{mm} | {m['rps']:.0f} | {m['rounds']} | {us(m['mean'])} | {us(m['p99'])} "
             f"| {err} | {m['srv']:.0f}% | {m['pg']:.0f}% | {m['core']:.0f}% | {m['other']:.0f}% | {m['cli']:.0f}% | {m['steal']:.0f}% |")
L.append("")
L.append("### Ratios and the targets of issue 10")
L.append("")
L.append("| what | ratio | target | | from |")
L.append("|---|---:|---|---|---|")
for name, value, ok, goal, how in targets:
    L.append(f"| {name} | {value} | {goal} | {ok} | {how} |")
L.append("")
L.append("Resolve, for information (not the regression verdict):")
L.append("")
for t in info:
    L.append(f"- {t}")
L.append("")
L.append("Other same-run ratios:")
L.append("")
extra = [
    ("zm extend 32x32 / zm-prev (before memory-first)", ratio(get("zm", "extend", "32x32"), get("zm-prev", "extend", "32x32"))),
    ("zm-prev extend 32x32 / fastest in-memory anchor", ratio(get("zm-prev", "extend", "32x32"), ba_x32)),
    ("zm extend 1x1 mean latency / zm-prev", ratio(get("zm", "extend", "1x1", "mean"), get("zm-prev", "extend", "1x1", "mean"))),
    ("zm health 1x1 mean latency (round-trip floor: client, kernel, h2) / best anchor's extend 1x1 mean", ratio(get("zm", "health", "1x1", "mean"), ba_x1l)),
    ("zm extend 1x1 mean latency / zm health 1x1 mean", ratio(get("zm", "extend", "1x1", "mean"), get("zm", "health", "1x1", "mean"))),
    ("zm-pg extend 1x1 mean latency / go-pg", ratio(get("zm-pg", "extend", "1x1", "mean"), get("go-pg", "extend", "1x1", "mean"))),
    ("zm-pg extend 1x1 mean latency / best in-memory anchor", ratio(get("zm-pg", "extend", "1x1", "mean"), ba_x1l)),
    ("zm-pg resolve 32x32 / zm (SQLite) resolve 32x32", ratio(get("zm-pg", "resolve", "32x32"), get("zm", "resolve", "32x32"))),
    ("zm-pg (one zm-bench, 32x32) / zm (SQLite) extend 32x32", ratio(get("zm-pg", "extend", "32x32"), get("zm", "extend", "32x32"))),
]
for name, v in extra:
    if v is not None:
        L.append(f"- {name}: {fx(v)}")
L.append("")
L.append(f"Previous figures (rest of this file: {prev_date.group(1) if prev_date else '?'}, source "
         f"{prev_src.group(1) if prev_src else '?'}): zm-bench resolve-32x32 {prev['resolve_32_rps'] or 0:.0f} req/s, "
         f"resolve-1x1 {prev['resolve_1_rps'] or 0:.0f} req/s, extend-32x32 {prev['extend_32_rps'] or 0:.0f} req/s (STORE_SYNC=normal); "
         f"h2load one-key ratios zm/best anchor: resolve 32x32 {fx(prev['resolve_32_ratio'])}, resolve 1x1 mean latency "
         f"{fx(prev['resolve_1_latratio'])}.")
L.append("")
L.append(END)
section = "\n".join(L) + "\n"

if BEGIN in old_md and END in old_md:
    new_md = old_md[: old_md.index(BEGIN)] + section.rstrip("\n") + old_md[old_md.index(END) + len(END):]
else:
    new_md = old_md.rstrip("\n") + "\n\n" + section
open(md_path, "w").write(new_md)
print(section)
