#!/usr/bin/env bash
# bench/enroll-isolation.sh [BUILD_DIR] - what enrollment costs the server and
# whether it stalls the loop. The controller simulator (test/sim) and the
# server (pinned with taskset to SERVER_CPU, its crypto workers included)
# start on 127.0.0.1; zm-bench then runs, on CLIENT_CPU:
#   - request-service-identity, 4 connections x 8 streams, DURATION seconds;
#   - alongside it, resolve --rate RATE open loop (ResolveIdentity, the hot
#     path, answered from memory on the loop) for the same window.
# Reports: server CPU per enrollment (utime+stime delta of /proc/PID/stat over
# the window / OK enrollments), the bare key + CSR cost (zm-cryptocost pinned
# to SERVER_CPU) and the ratio, ResolveIdentity p50/p99/max during the
# enrollments, and the loop-lag probe's worst (zm_loop_lag_worst_seconds from
# the metrics listener) plus the per-second maxima the server logged.
# Env: PERF=1 (perf record of the server over the window, OUT/perf.data;
#      PERF_OPTS, default "-g -F 2000"),
#      DURATION (default 8), RATE (2000), SERVER_CPU (0), CLIENT_CPU (1),
#      KEYS (10000 preloaded identities), CRYPTO_N (200), OUT (results dir).
# Bounded: every client runs under `timeout`; only PIDs started here are
# stopped (bench/lib.sh zmb_stop).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BUILD=${1:-$ZMB_REPO/build}
BIN=$BUILD/ziti-management
BENCH=$BUILD/bench/zm-bench
CRYPTO=$BUILD/bench/zm-cryptocost
DUR=${DURATION:-8}
RATE=${RATE:-2000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEYS=${KEYS:-10000}
CRYPTO_N=${CRYPTO_N:-200}
for f in "$BIN" "$BENCH" "$CRYPTO"; do
  [[ -x $f ]] || { echo "missing $f (build with -DZM_BENCH=ON)" >&2; exit 2; }
done
W=$(mktemp -d "${TMPDIR:-/tmp}/zm-enroll-iso.XXXXXX")
OUT=${OUT:-$W/out}
mkdir -p "$OUT"
ZMB_SIM_PID=
ZMB_SRV_PID=
RPID=
cleanup() {
  [[ -n $RPID ]] && zmb_stop "$RPID"
  zmb_stop "$ZMB_SRV_PID"
  zmb_stop "$ZMB_SIM_PID"
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$W/sim" "$W"/*.db*
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# thread_ticks PID: "loop N crypto N other N" (utime+stime per thread group:
# the main thread, the crypto workers named zm-crypto, the rest).
thread_ticks() {
  local t l=0 c=0 o=0 v comm
  for t in /proc/"$1"/task/*; do
    v=$(awk '{print $14+$15}' "$t/stat" 2>/dev/null) || continue
    comm=$(cat "$t/comm" 2>/dev/null)
    if [[ ${t##*/} == "$1" ]]; then l=$((l + v)); elif [[ $comm == zm-crypto ]]; then c=$((c + v)); else o=$((o + v)); fi
  done
  echo "$l $c $o"
}
jget() { /usr/bin/python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null; }

echo "build: $BUILD ($(git -C "$ZMB_REPO" rev-parse --short HEAD 2>/dev/null))"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg); nproc $(nproc)"

zmb_start_sim "$W/sim" "$CLIENT_CPU" || { echo "simulator did not start" >&2; exit 1; }
store=$W/zm.db
zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 || { echo "seeding failed" >&2; exit 1; }
PORT=$(zmb_free_port)
MPORT=$(zmb_free_port)
zmb_start_server "$BIN" "$store" "$PORT" "$SERVER_CPU" "$OUT/server.log" \
  LOOP_LAG_PROBE=1 STORE_SYNC=normal LOG_LEVEL=info METRICS_ADDRESS="127.0.0.1:$MPORT"
zmb_wait_health "$BENCH" "$PORT" "$ZMB_SRV_PID" 60 || { echo "server did not start" >&2; tail "$OUT/server.log"; exit 1; }
echo "server pid $ZMB_SRV_PID on 127.0.0.1:$PORT (metrics :$MPORT), simulator pid $ZMB_SIM_PID"

# Warm-up outside the window: the first enrollment fetches the CA bundle and
# opens the controller connections.
taskset -c "$CLIENT_CPU" timeout 60 "$BENCH" --target "127.0.0.1:$PORT" --scenario request-service-identity \
  -n 16 -c 4 -m 4 --timeout-ms 20000 --quiet --allow-errors >"$OUT/warmup.txt" 2>&1
lag0=$(curl -sf "http://127.0.0.1:$MPORT/metrics" | awk '$1=="zm_loop_lag_worst_seconds"{print $2}')

loglines=$(wc -l <"$OUT/server.log")
PPID_=
if [[ ${PERF:-0} == 1 ]] && command -v perf >/dev/null; then
  perf record ${PERF_OPTS:--g -F 2000} -o "$OUT/perf.data" -p "$ZMB_SRV_PID" -- sleep "$DUR" >"$OUT/perf.log" 2>&1 &
  PPID_=$!
fi
read -r l0 c0 o0 <<<"$(thread_ticks "$ZMB_SRV_PID")"
t0=$(zmb_ticks "$ZMB_SRV_PID")
taskset -c "$CLIENT_CPU" timeout $((DUR + 30)) "$BENCH" --target "127.0.0.1:$PORT" --scenario resolve \
  --rate "$RATE" -c 4 -m 64 -D "$DUR" --keys "$KEYS" --quiet --allow-errors \
  --json "$OUT/resolve.json" >"$OUT/resolve.txt" 2>&1 &
RPID=$!
taskset -c "$CLIENT_CPU" timeout $((DUR + 30)) "$BENCH" --target "127.0.0.1:$PORT" \
  --scenario request-service-identity -c 4 -m 8 -D "$DUR" --timeout-ms 20000 --allow-errors \
  --json "$OUT/rsi.json" >"$OUT/rsi.txt" 2>&1
t1=$(zmb_ticks "$ZMB_SRV_PID")
read -r l1 c1 o1 <<<"$(thread_ticks "$ZMB_SRV_PID")"
wait "$RPID"
RPID=
[[ -n $PPID_ ]] && wait "$PPID_"
lag=$(curl -sf "http://127.0.0.1:$MPORT/metrics" | awk '$1=="zm_loop_lag_worst_seconds"{print $2}')

ok=$(jget "$OUT/rsi.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
errs=$(jget "$OUT/rsi.json" 'j["errors"]["total"]')
hz=$(getconf CLK_TCK)
per=$(awk -v t="$((t1 - t0))" -v h="$hz" -v n="${ok:-0}" 'BEGIN{if(n>0) printf "%.0f", t/h*1e6/n; else print "n/a"}')
cc=$(taskset -c "$SERVER_CPU" timeout 120 "$CRYPTO" "$CRYPTO_N" ec-p384 2>&1)
cus=$(sed -n 's/.*cpu_us_per_op=\([0-9.]*\).*/\1/p' <<<"$cc")
ratio=$(awk -v a="$per" -v b="$cus" 'BEGIN{if(a+0>0 && b+0>0) printf "%.2fx", a/b; else print "n/a"}')
rp50=$(jget "$OUT/resolve.json" 'j["latency_us"]["p50"]')
rp99=$(jget "$OUT/resolve.json" 'j["latency_us"]["p99"]')
rmax=$(jget "$OUT/resolve.json" 'j["latency_us"]["max"]')
rerr=$(jget "$OUT/resolve.json" 'j["errors"]["total"]')
rthr=$(jget "$OUT/resolve.json" 'j["throughput"]' || true)
secmax=$(tail -n +"$((loglines + 1))" "$OUT/server.log" | grep -o 'loop lag: max [0-9]* ms' | awk '{print $4}' | sort -n | tail -1)

echo "enrollments: ${ok:-?} OK in ${DUR}s, ${errs:-?} errors (4 conns x 8 streams)"
echo "server CPU: $((t1 - t0)) ticks ($hz/s) -> ${per} us per enrollment"
pt() { awk -v t="$1" -v h="$hz" -v n="${ok:-0}" 'BEGIN{if(n>0) printf "%.0f", t/h*1e6/n; else print "n/a"}'; }
echo "  by thread: loop $(pt $((l1 - l0))) us, crypto workers $(pt $((c1 - c0))) us, other threads (store, log, resolver) $(pt $((o1 - o0))) us per enrollment"
echo "bare crypto: ${cus:-n/a} us per EC P-384 key + CSR ($cc)"
echo "ratio: $ratio"
echo "ResolveIdentity @${RATE}/s open loop during enrollments: p50 ${rp50:-?} us, p99 ${rp99:-?} us, max ${rmax:-?} us, ${rerr:-?} errors"
echo "loop lag worst: ${lag:-?} s over the run (${lag0:-?} s after warm-up); worst per-second max logged during the window: ${secmax:-?} ms"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw: $OUT"
