#!/usr/bin/env bash
# bench/enroll-isolation.sh [BUILD_DIR] - what enrollment costs the server and
# whether it stalls the loop. The controller simulator (test/sim) and the
# server (pinned with taskset to SERVER_CPU, its crypto workers included)
# start on 127.0.0.1; zm-bench then runs, on CLIENT_CPU:
#   - a warm-up of 16 enrollments (CA bundle, controller connections);
#   - request-service-identity, 4 connections x 8 streams, DURATION seconds,
#     alone: the server's CPU per enrollment. This server runs without the
#     loop-lag probe, an instrument whose own wake-ups and clock reads would
#     count as enrollment cost (CPU_PROBE=1: with it);
# then, against a second server on the same store with the probe on:
#   - resolve --rate RATE open loop alone for DURATION seconds (baseline: its
#     latency without enrollments);
#   - a warm-up of 16 enrollments;
#   - request-service-identity as above with resolve --rate RATE open loop
#     alongside (ResolveIdentity, the hot path, answered from memory on the
#     loop).
# Reports: server CPU per enrollment (utime+stime delta of /proc/PID/stat over
# the enrollments-alone window / OK enrollments; user and kernel time, per
# thread), the bare key + CSR cost (zm-cryptocost pinned to SERVER_CPU) and
# the ratio, ResolveIdentity p50/p99/max during the enrollments, the
# loop-lag probe (LOOP_LAG_PROBE: per-second maxima of the
# 1 ms timer's lateness and, where the server reports it, of the CPU one loop
# iteration took), zm_loop_lag_worst_seconds from the metrics listener, and
# how many controller connections were opened in the window; then, after a
# lull long enough for the controller to close the idle connections
# (LULL_S, 5.5), a burst of BURST_N (64) enrollments that reopens them: the
# loop lag and busiest iteration over it, and where the TLS handshake steps
# ran (the crypto threads or the loop).
# Env: DURATION (default 8), RATE (2000), SERVER_CPU (0), CLIENT_CPU (1),
#      KEYS (10000 preloaded identities), CRYPTO_N (200), OUT (results dir),
#      CRYPTO (a zm-cryptocost binary; default the build's: pass the same one
#      to compare builds against one reference),
#      SCHED=1 (perf sched record of SERVER_CPU over the window with both
#      loads: who ran while the loop waited > 1 ms for the CPU),
#      PERF=1 (perf record of the server over the enrollments-alone window,
#      OUT/perf.data; it adds its own overhead to that window's CPU figures;
#      PERF_OPTS, default "-g -F 2000"),
#      SIM_IDLE (1: the simulator runs at SCHED_IDLE on CLIENT_CPU; 0: normal),
#      RESOLVE_RT (1: the measuring resolve client runs SCHED_FIFO 1; 0: normal),
#      FLOOR (a zm-floor binary; default the build's).
# Also reports the hypervisor's steal time on SERVER_CPU (/proc/stat, sampled
# every 100 ms from CLIENT_CPU) in each window: time the guest's CPU was
# runnable but the host ran something else, invisible to the guest scheduler
# (a loop can be late by it with no thread of this VM holding its CPU).
# Bounded: every client runs under `timeout`; only PIDs started here are
# stopped (bench/lib.sh zmb_stop).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BUILD=${1:-$ZMB_REPO/build}
BIN=$BUILD/ziti-management
BENCH=$BUILD/bench/zm-bench
CRYPTO=${CRYPTO:-$BUILD/bench/zm-cryptocost}
FLOOR=${FLOOR:-$BUILD/bench/zm-floor}
DUR=${DURATION:-8}
RATE=${RATE:-2000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEYS=${KEYS:-10000}
CRYPTO_N=${CRYPTO_N:-200}
for f in "$BIN" "$BENCH" "$CRYPTO" "$FLOOR"; do
  [[ -x $f ]] || { echo "missing $f (build with -DZM_BENCH=ON)" >&2; exit 2; }
done
W=$(mktemp -d "${TMPDIR:-/tmp}/zm-enroll-iso.XXXXXX")
OUT=${OUT:-$W/out}
mkdir -p "$OUT"
ZMB_SIM_PID=
ZMB_SRV_PID=
RPID=
PPID_=
SPID_=
STPID=
cleanup() {
  [[ -n $RPID ]] && zmb_stop "$RPID"
  [[ -n $STPID ]] && zmb_stop "$STPID"
  [[ -n $PPID_ ]] && zmb_stop "$PPID_"
  [[ -n $SPID_ ]] && zmb_stop "$SPID_"
  zmb_stop "$ZMB_SRV_PID"
  zmb_stop "$ZMB_SIM_PID"
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$W/sim" "$W"/*.db*
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# thread_by_name PID: "name ticks switches utime stime" per thread name
# (threads of one name summed; the main thread is "loop").
thread_by_name() {
  local t comm
  for t in /proc/"$1"/task/*; do
    comm=$(cat "$t/comm" 2>/dev/null) || continue
    [[ ${t##*/} == "$1" ]] && comm=loop
    echo "$comm $(awk '{print $14+$15}' "$t/stat" 2>/dev/null) $(awk '/^(non)?voluntary_ctxt_switches/{s+=$2} END{print s+0}' "$t/status" 2>/dev/null) $(awk '{print $14, $15}' "$t/stat" 2>/dev/null)"
  done | awk 'NF == 5 {t[$1]+=$2; c[$1]+=$3; u[$1]+=$4; k[$1]+=$5} END{for (n in t) print n, t[n], c[n], u[n], k[n]}' | sort
}
# us_ticks PID: "utime stime" of the whole process, in clock ticks.
us_ticks() { awk '{print $14, $15}' "/proc/$1/stat" 2>/dev/null || echo "0 0"; }
jget() { /usr/bin/python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null; }

# steal_sampler: "<monotonic s> <steal ticks of SERVER_CPU>" every 100 ms.
# /proc/stat counts in USER_HZ ticks (10 ms), so one slice reads 0-10 ticks.
steal_sampler() {
  local cpu=cpu$SERVER_CPU line f
  while :; do
    while read -r line; do
      [[ $line == "$cpu "* ]] || continue
      read -ra f <<<"$line"
      echo "$(cut -d' ' -f1 /proc/uptime) ${f[8]}"
      break
    done </proc/stat
    sleep 0.1
  done
}
# mark NAME: the sampler's clock (/proc/uptime) at a window's edge.
mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >>"$OUT/marks.txt"; }
# steal_in A B: "<percent of the window> <worst 100 ms slice, ms>" of SERVER_CPU
# steal between marks A and B.
steal_in() {
  awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" '
    FNR == NR { m[$1] = $2; next }
    $1 >= m[a] && $1 <= m[b] {
      if (n++) { d = $2 - last; if (d > worst) worst = d; sum += d; span += $1 - lt }
      last = $2; lt = $1 }
    END { if (span > 0) printf "%.1f %.0f\n", sum / hz / span * 100, worst / hz * 1000; else print "n/a n/a" }
  ' "$OUT/marks.txt" "$OUT/steal.txt"
}
: >"$OUT/marks.txt"
taskset -c "$CLIENT_CPU" bash -c "$(declare -f steal_sampler); SERVER_CPU=$SERVER_CPU steal_sampler" >"$OUT/steal.txt" 2>/dev/null &
STPID=$!

echo "build: $BIN; crypto reference: $CRYPTO"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg); nproc $(nproc)"

# The machine's own floor, before anything of ours runs: how late a bare
# 1 ms epoll_wait on SERVER_CPU wakes (idle core, and a core kept busy by a
# SCHED_IDLE spinner), and the CPU of one thread hand-off on that core and
# across to CLIENT_CPU (where the clients and the simulator run: every answer
# the server writes wakes a reader there, every request wakes the server).
mark floor0
floor=$(taskset -c "$SERVER_CPU" timeout 120 "$FLOOR" 3000 "$CLIENT_CPU" 2>&1)
mark floor1
fget() { sed -n "s/^$1=//p" <<<"$floor"; }

# The measuring client (resolve --rate) shares CLIENT_CPU with the enrolling
# client and the simulator; with RESOLVE_RT=1 (the default where chrt can set
# SCHED_FIFO) it runs at real-time priority 1, so a request is sent and an
# answer read when due, not after the other client's turn: the latency is
# then the server's, as with a client on a core of its own.
RT=
if [[ ${RESOLVE_RT:-1} == 1 ]] && chrt -f 1 true 2>/dev/null; then RT="chrt -f 1"; fi

# The simulator stands in for a remote controller: it runs at SCHED_IDLE on
# the client CPU, so the Python process signing CSRs never holds that CPU
# while a zm-bench client has a request to send or an answer to read (the
# latency measured is the server's, not the client's wait for its CPU).
ZMB_SIM_IDLE=${SIM_IDLE:-1} zmb_start_sim "$W/sim" "$CLIENT_CPU" || { echo "simulator did not start" >&2; exit 1; }
store=$W/zm.db
zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 || { echo "seeding failed" >&2; exit 1; }
# start_server PROBE LOG: a server on the store, on fresh ports; PROBE=1
# turns the loop-lag probe on (a 1 ms timer waking the loop, and a
# CLOCK_THREAD_CPUTIME_ID system call in every loop iteration).
start_server() {
  local probe=()
  [[ $1 == 1 ]] && probe=(LOOP_LAG_PROBE=1)
  PORT=$(zmb_free_port)
  MPORT=$(zmb_free_port)
  zmb_start_server "$BIN" "$store" "$PORT" "$SERVER_CPU" "$2" \
    "${probe[@]}" STORE_SYNC=normal LOG_LEVEL=info METRICS_ADDRESS="127.0.0.1:$MPORT"
  zmb_wait_health "$BENCH" "$PORT" "$ZMB_SRV_PID" 60 || { echo "server did not start" >&2; tail "$2"; exit 1; }
  echo "server pid $ZMB_SRV_PID on 127.0.0.1:$PORT (metrics :$MPORT, loop-lag probe $([[ $1 == 1 ]] && echo on || echo off)), simulator pid $ZMB_SIM_PID"
}
metric() { curl -sf "http://127.0.0.1:$MPORT/metrics" | awk -v k="$1" '$1==k{print $2}'; }
hz=$(getconf CLK_TCK)
# Warm-up outside the windows: the first enrollment fetches the CA bundle and
# opens the controller connections.
warmup() {
  taskset -c "$CLIENT_CPU" timeout 60 "$BENCH" --target "127.0.0.1:$PORT" --scenario request-service-identity \
    -n 16 -c 4 -m 4 --timeout-ms 20000 --quiet --allow-errors >"$1" 2>&1
}

# Window 1, the enrollments alone: what one costs the server (CPU by thread,
# user and kernel time, context switches). Nothing else runs against it, so
# no other load's cost has to be estimated and subtracted. The probe is an
# instrument, not the server's work: this server runs without it
# (CPU_PROBE=1 keeps it on, to measure what it costs).
start_server "${CPU_PROBE:-0}" "$OUT/server-cpu.log"
warmup "$OUT/warmup-cpu.txt"
rsi_run() {
  taskset -c "$CLIENT_CPU" timeout $((DUR + 30)) "$BENCH" --target "127.0.0.1:$PORT" \
    --scenario request-service-identity -c 4 -m 8 -D "$DUR" --timeout-ms 20000 --allow-errors \
    --json "$1" >"${1%.json}.txt" 2>&1
}
su0=$(metric zm_store_units_total)
sc0=$(metric zm_store_commits_total)
# crypto_steps: "verify_n verify_s keygen_n keygen_s" (the service's own
# count and CPU seconds of the steps on the crypto threads)
crypto_steps() {
  local s
  s=$(curl -sf "http://127.0.0.1:$MPORT/metrics")
  for k in 'zm_enroll_crypto_steps_total{step="verify_jwt"}' 'zm_enroll_crypto_cpu_seconds_total{step="verify_jwt"}' \
    'zm_enroll_crypto_steps_total{step="keygen_csr"}' 'zm_enroll_crypto_cpu_seconds_total{step="keygen_csr"}'; do
    awk -v k="$k" '$1==k{v=$2} END{printf "%s ", (v == "" ? "0" : v)}' <<<"$s"
  done
}
read -r vn0 vs0 kn0 ks0 <<<"$(crypto_steps)"
read -r eu0 es0 <<<"$(us_ticks "$ZMB_SRV_PID")"
thread_by_name "$ZMB_SRV_PID" >"$OUT/threads0.txt"
PPID_=
if [[ ${PERF:-0} == 1 ]] && command -v perf >/dev/null; then
  perf record ${PERF_OPTS:--g -F 2000} -o "$OUT/perf.data" -p "$ZMB_SRV_PID" -- sleep "$DUR" >"$OUT/perf.log" 2>&1 &
  PPID_=$!
fi
mark alone_e0
rsi_run "$OUT/rsi-alone.json"
mark alone_e1
[[ -n $PPID_ ]] && wait "$PPID_"
PPID_=
thread_by_name "$ZMB_SRV_PID" >"$OUT/threads1.txt"
read -r eu1 es1 <<<"$(us_ticks "$ZMB_SRV_PID")"
su1=$(metric zm_store_units_total)
sc1=$(metric zm_store_commits_total)
read -r vn1 vs1 kn1 ks1 <<<"$(crypto_steps)"
# per_step N0 S0 N1 S1: microseconds of CPU per step in the window
per_step() { awk -v n="$(($3 - $1))" -v s0="$2" -v s1="$4" 'BEGIN{if (n > 0) printf "%.0f", (s1 - s0) / n * 1e6; else print "n/a"}'; }
verify_us=$(per_step "$vn0" "$vs0" "$vn1" "$vs1")
keygen_us=$(per_step "$kn0" "$ks0" "$kn1" "$ks1")
ok=$(jget "$OUT/rsi-alone.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
errs=$(jget "$OUT/rsi-alone.json" 'j["errors"]["total"]')
zmb_stop "$ZMB_SRV_PID"
ZMB_SRV_PID=

# The latency windows: a server on the same store with the probe on.
start_server 1 "$OUT/server.log"
# Baseline: the same ResolveIdentity load alone, for its latency without
# enrollments.
mark alone0
$RT taskset -c "$CLIENT_CPU" timeout $((DUR + 30)) "$BENCH" --target "127.0.0.1:$PORT" --scenario resolve \
  --rate "$RATE" -c 4 -m 64 -D "$DUR" --keys "$KEYS" --quiet --allow-errors \
  --json "$OUT/resolve-alone.json" >"$OUT/resolve-alone.txt" 2>&1
mark alone1
warmup "$OUT/warmup.txt"

# pt TICKS: microseconds per OK enrollment of window 1
pt() { awk -v t="$1" -v h="$hz" -v n="${ok:-0}" 'BEGIN{if(n>0) printf "%.0f", t/h*1e6/n; else print "n/a"}'; }
per=$(pt $(( (eu1 - eu0) + (es1 - es0) )))

# Window 2, the enrollments with ResolveIdentity at RATE alongside: the hot
# path's latency, the loop-lag probe, and what the two loads cost together.
lag0=$(metric zm_loop_lag_worst_seconds)
conn0=$(metric zm_controller_connects_total)
loglines=$(wc -l <"$OUT/server.log")
SPID_=
if [[ ${SCHED:-0} == 1 ]] && command -v perf >/dev/null; then
  perf sched record -C "$SERVER_CPU" -o "$OUT/sched.data" -- sleep "$DUR" >"$OUT/sched.log" 2>&1 &
  SPID_=$!
fi
t0=$(zmb_ticks "$ZMB_SRV_PID")
mark enroll0
$RT taskset -c "$CLIENT_CPU" timeout $((DUR + 30)) "$BENCH" --target "127.0.0.1:$PORT" --scenario resolve \
  --rate "$RATE" -c 4 -m 64 -D "$DUR" --keys "$KEYS" --quiet --allow-errors \
  --json "$OUT/resolve.json" >"$OUT/resolve.txt" 2>&1 &
RPID=$!
rsi_run "$OUT/rsi.json"
mark enroll1
t1=$(zmb_ticks "$ZMB_SRV_PID")
sleep 1.1 # the probe's line for the last second of the window
logend=$(wc -l <"$OUT/server.log")
wait "$RPID"
RPID=
[[ -n $SPID_ ]] && wait "$SPID_"
SPID_=
lag=$(metric zm_loop_lag_worst_seconds)
conn1=$(metric zm_controller_connects_total)

# Window 3, a burst after a lull: the controller closes keep-alive
# connections idle for 5 s (the client closes them at 4 s), so the next
# enrollments open them again, each with a TLS handshake (resumed, when the
# controller accepts the session). The probe over the burst: what
# reconnecting costs the loop.
sleep "${LULL_S:-5.5}"
hsw='zm_controller_tls_handshake_steps_total{where="workers"}'
hsl='zm_controller_tls_handshake_steps_total{where="loop"}'
bconn0=$(metric zm_controller_connects_total)
bhw0=$(metric "$hsw")
bhl0=$(metric "$hsl")
bl0=$(wc -l <"$OUT/server.log")
mark burst0
taskset -c "$CLIENT_CPU" timeout 60 "$BENCH" --target "127.0.0.1:$PORT" --scenario request-service-identity \
  -n "${BURST_N:-64}" -c 4 -m 8 --timeout-ms 20000 --allow-errors --json "$OUT/burst.json" >"$OUT/burst.txt" 2>&1
mark burst1
sleep 1.1 # the probe's line for the burst's last second
bl1=$(wc -l <"$OUT/server.log")
bconn1=$(metric zm_controller_connects_total)
bhw1=$(metric "$hsw")
bhl1=$(metric "$hsl")
bok=$(jget "$OUT/burst.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
burst_busy=$(sed -n "$((bl0 + 1)),${bl1}p" "$OUT/server.log" | grep -o 'busiest iteration [0-9]* us' | awk '{print $3}' | sort -n | tail -1)
burst_lag=$(sed -n "$((bl0 + 1)),${bl1}p" "$OUT/server.log" | grep -o 'loop lag: max [0-9]* ms' | awk '{print $4}' | sort -n | tail -1)
# The probe logs once a second the worst lateness of that second; the first
# line after the window opened covers warm-up time, so it is left out.
lagw=$(sed -n "$((loglines + 1)),${logend}p" "$OUT/server.log" | grep -o 'loop lag: max [0-9]* ms' | awk 'NR>1{print $4}')
lagsec=$(sort -n <<<"$lagw" | uniq -c | awk 'NF==2{printf "%s%s s at %s ms", (NR>1?", ":""), $1, $2}')
secmax=$(sort -n <<<"$lagw" | tail -1)
busyw=$(sed -n "$((loglines + 1)),${logend}p" "$OUT/server.log" | grep -o 'busiest iteration [0-9]* us' | awk 'NR>1{print $3}')
busymax=$(sort -n <<<"$busyw" | tail -1)
# the page faults and preemptions within the busiest iteration of the window
busyfp=$(sed -n "$((loglines + 1)),${logend}p" "$OUT/server.log" |
  grep -o 'busiest iteration [0-9]* us CPU with [0-9]* page faults and [0-9]* preemptions' |
  awk 'NR>1 && $3 + 0 > m {m = $3 + 0; f = $7; p = $11} END {if (m > 0) printf "%d page faults and %d preemptions in it", f, p}')
busyover=$(awk '$1>1000{n++} END{print n+0}' <<<"$busyw")
ok2=$(jget "$OUT/rsi.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
errs2=$(jget "$OUT/rsi.json" 'j["errors"]["total"]')
mixed=$(awk -v t="$((t1 - t0))" -v h="$hz" -v n="${ok2:-0}" 'BEGIN{if(n>0) printf "%.0f", t/h*1e6/n; else print "n/a"}')

cc=$(taskset -c "$SERVER_CPU" timeout 120 "$CRYPTO" "$CRYPTO_N" ec-p384 2>&1)
cus=$(sed -n 's/.*cpu_us_per_op=\([0-9.]*\).*/\1/p' <<<"$cc")
# The same keys with the CPU idle 2 ms between two of them, as a worker's
# are (one key between the loop's events, the core idle between
# enrollments): what cold caches cost on this machine. Not the reference of
# the ratio, which is the tight loop.
ccg=$(taskset -c "$SERVER_CPU" timeout 120 "$CRYPTO" "$CRYPTO_N" ec-p384 2000 2>&1)
cgus=$(sed -n 's/.*cpu_us_per_op=\([0-9.]*\).*/\1/p' <<<"$ccg")
cgwall=$(sed -n 's/.*wall_us_per_op=\([0-9.]*\).*/\1/p' <<<"$ccg")
ratio=$(awk -v a="$per" -v b="$cus" 'BEGIN{if(a+0>0 && b+0>0) printf "%.2fx", a/b; else print "n/a"}')
rp50=$(jget "$OUT/resolve.json" 'j["latency_us"]["p50"]')
rp99=$(jget "$OUT/resolve.json" 'j["latency_us"]["p99"]')
rmax=$(jget "$OUT/resolve.json" 'j["latency_us"]["max"]')
rerr=$(jget "$OUT/resolve.json" 'j["errors"]["total"]')

echo "enrollments alone: ${ok:-?} OK in ${DUR}s, ${errs:-?} errors (4 conns x 8 streams)"
echo "server CPU: ${per} us per enrollment ($(( (eu1 - eu0) + (es1 - es0) )) ticks at $hz/s)"
echo "  user space $(pt $((eu1 - eu0))) us, kernel $(pt $((es1 - es0))) us (utime/stime; the kernel's share is system calls and wake-ups, and on loopback also the peers' TCP receive path, which runs in the sender's context)"
# by_group FIELD FORMAT: the per-name snapshots' deltas of FIELD (2: ticks,
# 3: context switches; joined, the second snapshot's is FIELD + 4) grouped as loop, crypto workers, the rest, each /
# enrollment (ticks -> us), printed with FORMAT
by_group() {
  join "$OUT/threads0.txt" "$OUT/threads1.txt" |
    awk -v n="${ok:-0}" -v f="$1" -v fmt="$2" -v h="$hz" '{d = $(f + 4) - $f; if (f == 2) d = d / h * 1e6
      if ($1 == "loop") l += d; else if ($1 == "zm-crypto") c += d; else o += d}
      END {if (n > 0) printf fmt, l/n, c/n, o/n; else print "n/a"}'
}
echo "  by thread: $(by_group 2 'loop %.0f us, crypto workers %.0f us, other threads (store, log, resolver) %.0f us') per enrollment"
echo "  context switches per enrollment: $(by_group 3 'loop %.1f, crypto workers %.1f, other threads %.1f')"
echo "  by thread name, per enrollment (CPU us, context switches): $(join "$OUT/threads0.txt" "$OUT/threads1.txt" |
  awk -v n="${ok:-0}" -v h="$hz" 'n>0{printf "%s%s %.0f us %.1f", (NR>1?"; ":""), $1, ($6-$2)/h*1e6/n, ($7-$3)/n}')"
echo "  by thread name, per enrollment (user / kernel CPU us): $(join "$OUT/threads0.txt" "$OUT/threads1.txt" |
  awk -v n="${ok:-0}" -v h="$hz" 'n>0{printf "%s%s %.0f / %.0f", (NR>1?"; ":""), $1, ($8-$4)/h*1e6/n, ($9-$5)/h*1e6/n}')"
echo "  store: $(awk -v u="$(( ${su1:-0} - ${su0:-0} ))" -v c="$(( ${sc1:-0} - ${sc0:-0} ))" -v n="${ok:-0}" 'BEGIN{if(n>0 && c>0) printf "%d units in %d commits (%.1f units per commit, %.2f commits per enrollment)", u, c, u/c, c/n; else print "n/a"}')"
echo "with ResolveIdentity at ${RATE}/s alongside: ${ok2:-?} enrollments OK, ${errs2:-?} errors; server CPU $((t1 - t0)) ticks -> ${mixed} us per enrollment, the resolve load's share included"
echo "bare crypto: ${cus:-n/a} us per EC P-384 key + CSR ($cc)"
echo "the same with the CPU idle 2 ms between keys: ${cgus:-n/a} us CPU, ${cgwall:-n/a} us of running time per key + CSR ($ccg)"
echo "ratio: $ratio"
# tpart NAME FIELD: CPU us per enrollment of window 1 of the threads named
# NAME ("other": all but loop, zm-crypto, zm-store; "all") in FIELD (8: user,
# 9: kernel, of the joined snapshots)
tpart() {
  join "$OUT/threads0.txt" "$OUT/threads1.txt" | awk -v want="$1" -v f="$2" -v n="${ok:-0}" -v h="$hz" '
    { g = ($1 == "loop" || $1 == "zm-crypto" || $1 == "zm-store") ? $1 : "other"
      if (want == "all" || want == g) d += $f - $(f - 4) }
    END { if (n > 0) printf "%.0f", d / h * 1e6 / n; else print "n/a" }'
}
# the process's kernel time (per-thread figures round each thread's ticks)
k_all=$(pt $((es1 - es0)))
floor_us=$(awk -v a="$verify_us" -v b="$keygen_us" -v k="$k_all" 'BEGIN{if (a+0 > 0 && b+0 > 0) printf "%.0f", a + b + k; else print "n/a"}')
echo "where one enrollment's CPU goes (window 1): crypto threads: key + CSR ${keygen_us} us (the service's own measure, zm_enroll_crypto_cpu_seconds_total; $(awk -v a="$keygen_us" -v b="$cus" 'BEGIN{if (a+0 > 0 && b+0 > 0) printf "%.2fx", a/b; else print "n/a"}') the tight loop's), JWT check ${verify_us} us; kernel: ${k_all} us (by thread: loop $(tpart loop 9), crypto $(tpart zm-crypto 9), store $(tpart zm-store 9), other $(tpart other 9)); user space: loop $(tpart loop 8) us, store thread $(tpart zm-store 8) us, other threads $(tpart other 8) us"
echo "the crypto steps and the kernel's share alone: ${floor_us} us = $(awk -v a="$floor_us" -v b="$cus" 'BEGIN{if (a+0 > 0 && b+0 > 0) printf "%.2fx", a/b; else print "n/a"}') the bare key + CSR"
rap99=$(jget "$OUT/resolve-alone.json" 'j["latency_us"]["p99"]')
ramax=$(jget "$OUT/resolve-alone.json" 'j["latency_us"]["max"]')
echo "ResolveIdentity @${RATE}/s alone (baseline): p99 ${rap99:-?} us, max ${ramax:-?} us"
echo "ResolveIdentity @${RATE}/s open loop during enrollments: p50 ${rp50:-?} us, p99 ${rp99:-?} us, max ${rmax:-?} us, ${rerr:-?} errors"
echo "loop lag during the window (per-second maxima, 1 ms probe): worst ${secmax:-?} ms; ${lagsec:-?}"
echo "loop iterations (CPU time of one iteration, the loop's own work): worst ${busymax:-n/a} us${busyfp:+ ($busyfp)}; seconds with one > 1 ms: ${busyover:-n/a} of $(wc -w <<<"$busyw")"
echo "loop lag worst since start (zm_loop_lag_worst_seconds): ${lag0:-?} s after warm-up, ${lag:-?} s at the end"
echo "controller connections opened during the window: $(( ${conn1:-0} - ${conn0:-0} )) (${conn1:-?} since start)"
echo "a burst of ${BURST_N:-64} enrollments after a ${LULL_S:-5.5} s lull: ${bok:-?} OK; controller connections reopened: $(( ${bconn1:-0} - ${bconn0:-0} )); TLS handshake steps on the crypto threads $(awk -v a="${bhw0:-0}" -v b="${bhw1:-0}" 'BEGIN{print b - a}'), on the loop $(awk -v a="${bhl0:-0}" -v b="${bhl1:-0}" 'BEGIN{print b - a}'); loop lag worst ${burst_lag:-?} ms, busiest loop iteration ${burst_busy:-?} us"
if [[ -s $OUT/sched.data ]]; then
  # Every time the loop thread waited > 1 ms to get the CPU back: who ran.
  perf sched timehist -i "$OUT/sched.data" 2>/dev/null | awk 'NR>3' >"$OUT/timehist.txt"
  /usr/bin/python3 - "$OUT/timehist.txt" "$ZMB_SRV_PID" <<'PY'
import collections, sys
rows = []
for l in open(sys.argv[1]):
    f = l.split()
    try:
        rows.append((float(f[0]), f[2], float(f[-2]), float(f[-1])))
    except (ValueError, IndexError):
        pass
loop = "[%s]" % sys.argv[2]
n = 0
for t, task, delay, run in rows:
    if not task.endswith(loop) or delay <= 1.0:
        continue
    n += 1
    end, start = t - run / 1e3, t - run / 1e3 - delay / 1e3
    who = collections.Counter()
    for t2, task2, _, run2 in rows:
        s2 = t2 - run2 / 1e3
        if task2 != task and t2 > start and s2 < end:
            who[task2.split("[")[0]] += (min(t2, end) - max(s2, start)) * 1e3
    print("  loop waited %.2f ms for the CPU at %.3f; meanwhile: %s" % (
        delay, t, ", ".join("%s %.2f ms" % kv for kv in who.most_common(4))))
print("  loop scheduling delays > 1 ms in the window: %d" % n)
PY
fi
echo "machine floor on CPU $SERVER_CPU (zm-floor, before the run): a bare 1 ms epoll_wait wakes late by p50 $(fget wake_idle_p50_us) us, p99 $(fget wake_idle_p99_us) us, max $(fget wake_idle_max_us) us, $(fget wake_idle_over1ms) of $(fget wake_idle_n) more than 1 ms late (idle core); p99 $(fget wake_busy_p99_us) us, max $(fget wake_busy_max_us) us, $(fget wake_busy_over1ms) over 1 ms (core kept busy at SCHED_IDLE); one thread hand-off $(fget switch_cpu_us) us CPU; a wake-up round trip costs the waking thread $(fget switch_round_us) us CPU on one core, $(fget xcpu_round_us) us with the peer on CPU $CLIENT_CPU; a fixed computation after a 1 ms sleep was charged p50 $(fget work_p50_us) us, max $(fget work_max_us) us of thread CPU ($(fget work_over1ms) of $(fget work_n) over 1 ms)"
read -r st_floor st_floor_w <<<"$(steal_in floor0 floor1)"
read -r st_alone st_alone_w <<<"$(steal_in alone0 alone1)"
read -r st_enr st_enr_w <<<"$(steal_in enroll0 enroll1)"
read -r st_e1 st_e1_w <<<"$(steal_in alone_e0 alone_e1)"
echo "hypervisor steal on CPU $SERVER_CPU (/proc/stat): ${st_enr}% of the window with both loads (worst 100 ms slice: ${st_enr_w} ms), ${st_e1}% while the enrollments ran alone (worst ${st_e1_w} ms), ${st_alone}% while the resolve load ran alone (worst ${st_alone_w} ms), ${st_floor}% during zm-floor (worst ${st_floor_w} ms)"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
# machine-readable summary (bench/results_perf.py reads these lines)
echo "cpu_us_per_enroll=$per"
echo "cpu_us_per_enroll_user=$(pt $((eu1 - eu0)))"
echo "cpu_us_per_enroll_sys=$(pt $((es1 - es0)))"
echo "cpu_us_per_enroll_mixed=$mixed"
echo "crypto_us=${cus:-n/a}"
echo "crypto_gap_us=${cgus:-n/a}"
echo "keygen_inservice_us=$keygen_us"
echo "verify_inservice_us=$verify_us"
echo "kernel_us_per_enroll=$k_all"
echo "loop_user_us=$(tpart loop 8)"
echo "store_user_us=$(tpart zm-store 8)"
echo "other_user_us=$(tpart other 8)"
echo "floor_steps_kernel_us=$floor_us"
echo "crypto_gap_wall_us=${cgwall:-n/a}"
echo "resolve_alone_p99_us=${rap99:-n/a}"
echo "resolve_p99_us=${rp99:-n/a}"
echo "resolve_max_us=${rmax:-n/a}"
echo "loop_lag_max_us=$(awk -v m="${secmax:-}" 'BEGIN{if (m != "") printf "%.0f", m * 1000; else print "n/a"}')"
echo "loop_busy_max_us=${busymax:-n/a}"
echo "burst_connects=$(( ${bconn1:-0} - ${bconn0:-0} ))"
echo "burst_lag_max_us=$(awk -v m="${burst_lag:-}" 'BEGIN{if (m != "") printf "%.0f", m * 1000; else print "n/a"}')"
echo "burst_busy_max_us=${burst_busy:-n/a}"
for k in wake_idle_n wake_idle_p99_us wake_idle_max_us wake_idle_over1ms wake_busy_p99_us wake_busy_max_us switch_cpu_us switch_round_us xcpu_round_us work_p50_us work_max_us work_over1ms; do
  echo "floor_$k=$(v=$(fget $k); echo "${v:-n/a}")"
done
echo "steal_enroll_pct=$st_enr"
echo "steal_enroll_worst_ms=$st_enr_w"
echo "steal_alone_pct=$st_alone"
echo "steal_enroll_alone_pct=$st_e1"
echo "steal_floor_pct=$st_floor"
echo "steal_floor_worst_ms=$st_floor_w"
echo "sim_idle=${SIM_IDLE:-1}"
echo "resolve_rt=$([[ -n $RT ]] && echo 1 || echo 0)"
echo "cpu_probe=${CPU_PROBE:-0}"
echo "raw: $OUT"
