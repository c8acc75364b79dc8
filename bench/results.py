#!/usr/bin/python3
"""bench/results.py - renders bench/RESULTS.md from what bench/run.sh collected.

usage: results.py WORKDIR OUT_MD

WORKDIR holds:
  facts.tsv    key<TAB>value lines (machine facts, commands, single measurements,
               "n/a (reason)" strings)
  cases.tsv    one zm-bench run per line: label sim_ms conns streams mode rate
               json wall_s srv_ticks cli_cpu_s args
  *.json       zm-bench --json outputs
  anchors/results.tsv  (optional) the anchors' run.sh medians, zm included
"""

import csv
import json
import os
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


def us(v):
    v = float(v)
    if v < 1000:
        return f"{v:.0f} us"
    if v < 1e6:
        return f"{v / 1000:.2f} ms"
    return f"{v / 1e6:.2f} s"


def load_facts(work):
    facts = {}
    p = os.path.join(work, "facts.tsv")
    if os.path.exists(p):
        for line in open(p):
            line = line.rstrip("\n")
            if "\t" in line:
                k, v = line.split("\t", 1)
                facts[k] = v
    return facts


def case_rows(work):
    p = os.path.join(work, "cases.tsv")
    if not os.path.exists(p):
        return []
    return list(csv.DictReader(open(p), delimiter="\t"))


def errors_text(j):
    e = j.get("errors", {})
    if not e.get("total"):
        return "0"
    parts = [f"{k}={v}" for k, v in e.get("by_status", {}).items()]
    if e.get("wrong_content"):
        parts.append(f"wrong_content={e['wrong_content']}")
    parts += [f"{k}={v}" for k, v in e.get("transport", {}).items()]
    return f"**{e['total']}** ({', '.join(parts)})"


def render_cases(work, out):
    rows = case_rows(work)
    if not rows:
        out.append("_no zm-bench runs were recorded_\n")
        return
    out.append("| case | sim latency | conns x streams | mode | req/s | p50 | p90 | p99 | p99.9 | max "
               "| errors | server CPU | zm-bench CPU |")
    out.append("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        jp = r["json"]
        try:
            j = json.load(open(jp))
        except (OSError, ValueError):
            out.append(f"| {r['label']} | {r['sim_ms']} ms | {r['conns']}x{r['streams']} | {r['mode']} "
                       f"| n/a (no result: see {os.path.basename(jp)[:-5]}.txt) | | | | | | | | |")
            continue
        lat = j["latency_us"]
        wall = float(r["wall_s"] or 0) or 1.0
        srv = 100.0 * float(r["srv_ticks"] or 0) / CLK_TCK / wall
        cli = 100.0 * float(r["cli_cpu_s"] or 0) / wall
        mode = r["mode"] if r["mode"] == "closed" else f"open {float(r['rate']):.0f}/s"
        out.append(f"| {r['label']} | {r['sim_ms']} ms | {r['conns']}x{r['streams']} | {mode} | {j['rps']:.0f} "
                   f"| {us(lat['p50'])} | {us(lat['p90'])} | {us(lat['p99'])} | {us(lat['p999'])} | {us(lat['max'])} "
                   f"| {errors_text(j)} | {srv:.0f}% | {cli:.0f}% |")
    out.append("")
    out.append("Exact zm-bench arguments per case (all with `--target 127.0.0.1:PORT --json FILE --allow-errors`):\n")
    for r in rows:
        out.append(f"- `{r['label']}` (sim {r['sim_ms']} ms): `zm-bench {r['args']}`")
    out.append("")


ANCHORS = ["cpp-async", "cpp-callback", "go"]
PG_ANCHORS = ["go-pg", "go-pg-nosync"]


def render_anchors(work, out, facts):
    p = os.path.join(work, "anchors", "results.tsv")
    if not os.path.exists(p):
        out.append(f"n/a ({facts.get('anchors_status', 'the anchors run did not produce results.tsv')})\n")
        return
    rows = list(csv.DictReader(open(p), delimiter="\t"))
    md = os.path.join(work, "anchors", "results.md")
    if os.path.exists(md):
        out.append("The anchors' own table (`results/results.md` of that run, copied verbatim):\n")
        out.extend(l.rstrip("\n") for l in open(md))
        out.append("")
    by = {}
    for r in rows:
        by[(r["server"], r["rpc"], f"{r['conns']}x{r['streams']}")] = r
    cases = []
    for r in rows:
        c = (r["rpc"], f"{r['conns']}x{r['streams']}")
        if c not in cases:
            cases.append(c)
    out.append("### zm against the best anchor, per case (ratios from this one run)\n")
    if not any(k[0] == "zm" for k in by):
        out.append(f"n/a: zm was not measured in that run ({facts.get('anchors_zm_status', 'see anchors/run.log')})\n")
        return
    out.append("zm = `STORE_SYNC=normal` (an acknowledged write survives a process crash); zm-fsync = "
               "`STORE_SYNC=full` (fsync per group commit: survives power loss).\n")
    out.append("| server | rpc | conns x streams | req/s | best anchor | its req/s | **/ best (req/s)** "
               "| lat mean | best anchor lat mean | **/ best (mean lat)** | / go-pg (req/s) |")
    out.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for zname in [n for n in ("zm", "zm-fsync") if any(k[0] == n for k in by)]:
        for rpc, cm in cases:
            z = by.get((zname, rpc, cm))
            if not z:
                continue
            cands = [by[(a, rpc, cm)] for a in ANCHORS if (a, rpc, cm) in by and by[(a, rpc, cm)]["checks"] == "ok"]
            if not cands:
                continue
            best = max(cands, key=lambda r: float(r["rps_median"]))
            best_lat = min(cands, key=lambda r: float(r["lat_mean_us"]))
            zr, br = float(z["rps_median"]), float(best["rps_median"])
            zl, bl = float(z["lat_mean_us"]), float(best_lat["lat_mean_us"])
            pg = by.get(("go-pg", rpc, cm))
            pgr = f"{zr / float(pg['rps_median']):.1f}x" if pg and float(pg["rps_median"]) > 0 else "-"
            flag = "" if z["checks"] == "ok" else " (checks FAILED)"
            out.append(f"| {zname} | {rpc} | {cm} | {zr:.0f}{flag} | {best['server']} | {br:.0f} | **{zr / br:.2f}x** "
                       f"| {us(zl)} | {us(bl)} ({best_lat['server']}) | **{zl / bl:.2f}x** | {pgr} |")
    out.append("")
    # memory
    rss = {}
    for r in rows:
        rss[r["server"]] = (int(r["idle_rss_kb"] or 0), int(r["peak_rss_kb"] or 0))
    if "zm" in rss:
        anc = {k: v for k, v in rss.items() if k in ANCHORS + PG_ANCHORS and v[1] > 0}
        if anc:
            small = min(anc, key=lambda k: anc[k][1])
            z = rss["zm"]
            out.append(f"Peak RSS: zm {z[1] / 1024:.1f} MiB vs smallest anchor {small} {anc[small][1] / 1024:.1f} MiB "
                       f"= **{z[1] / anc[small][1]:.2f}x** (idle: zm {z[0] / 1024:.1f} MiB).\n")


def main():
    work, out_md = sys.argv[1], sys.argv[2]
    f = load_facts(work)
    out = []
    out.append("# ziti-management: benchmark results\n")
    out.append("Written by `bench/run.sh`"
               + (" in **QUICK** mode (seconds-long runs: a smoke of the harness, not numbers to quote)" if f.get("quick") == "1" else "")
               + f". Measured {f.get('date', '?')}.\n")
    out.append("## Machine\n")
    for k, label in [("nproc", "nproc"), ("cpu", "CPU"), ("kernel", "kernel"), ("mem", "memory"),
                     ("os", "OS"), ("h2load", "h2load"), ("git", "source")]:
        if k in f:
            out.append(f"- {label}: {f[k]}")
    out.append(f"- server pinned to CPU {f.get('server_cpu', '0')} (`taskset`), zm-bench and the controller "
               f"simulator on CPU {f.get('client_cpu', '1')}")
    out.append("")
    out.append("## Commands\n")
    out.append("```sh")
    out.append(f.get("cmd_run", "bench/run.sh"))
    out.append(f.get("cmd_build", ""))
    out.append(f.get("cmd_server", ""))
    out.append(f.get("cmd_sim", ""))
    out.append("```\n")
    out.append("## zm-bench scenarios against the server (100,000 preloaded identities)\n")
    out.append(f.get("cases_note", ""))
    out.append("")
    render_cases(work, out)
    out.append("## Single measurements\n")
    out.append("| what | value | how |")
    out.append("|---|---|---|")
    for k, how in [
        ("rsi_cpu", "server utime+stime (/proc/PID/stat) over the request-service-identity runs / OK answers"),
        ("crypto_cost", "`zm-cryptocost`: zm_keycsr_generate(ZM_KEY_EC_P384) in a loop (CPU time per op)"),
        ("rsi_cpu_ratio", "service CPU per RequestServiceIdentity / bare crypto cost (target <= 2)"),
        ("loop_lag", "server's own loop-lag probe (LOOP_LAG_PROBE=1), from its log"),
        ("idle_rss", "server VmRSS with N idle HTTP/2 connections (h2 handshake + one health call each)"),
        ("idle_rss_per_conn", "(VmRSS with the idle connections, once it stops falling - VmRSS before) / N"),
        ("rsi_rss", "(max VmRSS while enrollments are in flight - VmRSS before) / in-flight calls"),
        ("startup", "exec -> port accepting / health SERVING, store with N identities (no controller)"),
        ("startup_rss", "VmRSS right after that start-up"),
        ("gc", "expired leases swept (records gone from the store), simulator as controller"),
        ("gc_resolve", "ResolveIdentity open loop while the sweep runs"),
        ("rsi200", "zm-bench -n 200 -c 4 -m 50 request-service-identity, with zm-bench resolve --rate 5000 -c 4 -m 64 running alongside"),
    ]:
        if k in f:
            out.append(f"| {k} | {f[k]} | {how} |")
    out.append("")
    out.append("## Side by side with the anchors (shared/anchors/perf, one run)\n")
    out.append(f.get("anchors_note", ""))
    out.append("")
    render_anchors(work, out, f)
    if f.get("notes"):
        out.append("## Notes\n")
        for n in f["notes"].split(" || "):
            out.append(f"- {n}")
        out.append("")
    with open(out_md, "w") as fp:
        fp.write("\n".join(out).rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
