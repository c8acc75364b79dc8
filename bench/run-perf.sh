#!/usr/bin/env bash
# bench/run-perf.sh - the performance targets of issue 15, side by side in ONE
# run, each reported as a ratio against what was measured beside it:
#   1. the anchors' own script (ANCHORS/run.sh: h2load, the anchors' payloads,
#      in-memory cases resolve 32x32 and 1x1, resolve_missing 32x32, extend
#      32x32 and 1x1; idle and peak RSS) with zm (bench/anchor-server.sh: the
#      same 100,000 preloaded identities) and, with BASELINE_BIN, zm-prev (an
#      earlier build: the regression check) added through EXTRA_SERVERS;
#   2. random keys: zm-bench drives zm and the anchors with uniformly random
#      keys over the 100,000 identities (resolve 32x32 and 1x1), interleaved;
#   3. the HTTP/2 ceiling: nghttpd --no-tls (nghttp2-server) serving a 1-byte
#      file at the ResolveIdentity path vs zm's ResolveIdentity, the same
#      h2load command (-c 32 -m 32, same payload and headers), interleaved;
#   4. bytes per idle HTTP/2 connection at IDLE_N connections
#      (bench/idle-conns.sh);
#   5. enrollment: server CPU per RequestServiceIdentity (4x8, simulator) vs
#      the bare key + CSR, ResolveIdentity p99 at 2,000 req/s open loop
#      during the enrollments, loop-lag worst (bench/enroll-isolation.sh);
#   6. bench/results_perf.py: the ratio table, written into RESULTS_MD
#      between the "perf-bench" markers.
# Every server is pinned to SERVER_CPU, every client to CLIENT_CPU; all listen
# on 127.0.0.1; every client run is time-bounded; only PIDs started here are
# stopped.
#
# Env: DURATION=5 WARMUP=1 (whole seconds: h2load) ROUNDS=3  SERVER_CPU=0 CLIENT_CPU=1  IDLE_N=10000
#      BUILD (default build-bench; SKIP_BUILD=1 uses it as it is: it needs
#        ziti-management, zm-bench, zm-cryptocost and zm-floor, Release)
#      ANCHORS (the anchors, built: bin/cpp_server ...; default the shared
#        anchors; the anchors' run.sh writes its results/ inside that dir, so
#        a read-only or unbuilt one is copied into the temp dir and built)
#      BASELINE_BIN / BASELINE_REV (optional earlier build, measured as zm-prev)
#      BUSY_POLL_US=0 (zm-bp: zm with LOOP_BUSY_POLL_US set to this, beside
#        zm at its defaults, where it is auto: the cost and gain of polling)
#      SKIP_ANCHORS=1 SKIP_IDLE=1 SKIP_ENROLL=1 (skip a step; its targets read n/a)
#      RESULTS_MD (default bench/RESULTS.md)
# Whole run: about 20 minutes with the defaults.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
REPO=$ZMB_REPO
T_START=$(date +%s)

DUR=${DURATION:-5}
WARM=${WARMUP:-1}
TMO=$((${DUR%.*} + ${WARM%.*} + 62)) # per client run: duration, warm-up, slack
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
IDLE_N=${IDLE_N:-10000}
BUSY_POLL_US=${BUSY_POLL_US:-0}
BUILD=${BUILD:-$REPO/build-bench}
ANCHORS=${ANCHORS:-$(cd "$REPO/.." && pwd)/shared/anchors/perf}
[[ -d $ANCHORS ]] || ANCHORS=/work/shared/anchors/perf
RESULTS_MD=${RESULTS_MD:-$REPO/bench/RESULTS.md}
SVC=/agynio.api.ziti_management.v1.ZitiManagementService
KEYS=100000

W=$(mktemp -d "${TMPDIR:-/tmp}/zm-perf.XXXXXX")
OUT=$W/out
mkdir -p "$OUT"
FACTS=$OUT/facts.tsv
: >"$FACTS"
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
log() { echo "[$(($(date +%s) - T_START))s] $*"; }

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do zmb_stop "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build --------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "build (Release) into $BUILD"
  cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DZM_TESTS=OFF -DZM_BENCH=ON >"$OUT/build.log" 2>&1 &&
    cmake --build "$BUILD" -j"$(nproc)" --target ziti-management zm-bench zm-tlsbench zm-cryptocost zm-floor >>"$OUT/build.log" 2>&1 ||
    { echo "build failed ($OUT/build.log)"; exit 1; }
fi
BIN=$BUILD/ziti-management
BENCH=$BUILD/bench/zm-bench
for b in "$BIN" "$BENCH"; do [[ -x $b ]] || { echo "missing $b"; exit 1; }; done
command -v h2load >/dev/null || { echo "h2load missing (nghttp2-client; ./install-deps.sh)"; exit 1; }

rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$REPO" status --porcelain -- src 2>/dev/null) ]] && rev="$rev+uncommitted src/ changes"
fact source "${SOURCE_REV:-$rev}"
fact when "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact machine "nproc $(nproc); $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo); kernel $(uname -r); $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
fact load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
fact busy_poll_us "$BUSY_POLL_US"
fact pinning "servers on CPU $SERVER_CPU, clients on CPU $CLIENT_CPU (taskset); -D $DUR --warm-up-time $WARM; $ROUNDS interleaved rounds"
[[ -n ${BASELINE_BIN:-} ]] && fact baseline "zm-prev = $BASELINE_BIN (${BASELINE_REV:-unknown revision})"

# ---- 1. the anchors' own script, zm beside them ----------------------------------
if [[ ${SKIP_ANCHORS:-0} != 1 ]]; then
  if [[ ! -w $ANCHORS || ! -x $ANCHORS/bin/cpp_server || ! -x $ANCHORS/bin/goserver ]]; then
    log "anchors not built or not writable in $ANCHORS: building a copy in $W/anchors"
    cp -a "$ANCHORS" "$W/anchors" && chmod -R u+w "$W/anchors" && rm -rf "$W/anchors/results"
    ANCHORS=$W/anchors
    "$ANCHORS/build.sh" >"$OUT/anchors-build.log" 2>&1 || { echo "anchors build failed ($OUT/anchors-build.log)"; exit 1; }
  fi
  fact anchors "$ANCHORS"
  extra="zm=env ZM_BIN=$BIN ZM_BENCH_TMP=$W $here/anchor-server.sh {PORT}"
  extra="$extra;zm-bp=env LOOP_BUSY_POLL_US=$BUSY_POLL_US ZM_BIN=$BIN ZM_BENCH_TMP=$W $here/anchor-server.sh {PORT}"
  servers=(cpp-async cpp-callback go zm zm-bp)
  if [[ -n ${BASELINE_BIN:-} ]]; then
    extra="$extra;zm-prev=env ZM_BIN=$BASELINE_BIN ZM_BENCH_TMP=$W $here/anchor-server.sh {PORT}"
    servers+=(zm-prev)
  fi
  log "anchors' run.sh: ${servers[*]} (about $(awk -v r="$ROUNDS" -v n="${#servers[@]}" -v d="$DUR" -v w="$WARM" 'BEGIN{printf "%.0f", r * 5 * n * (d + w + 1) / 60 + 1}') min)"
  fact cmd_anchors "cd $ANCHORS && EXTRA_SERVERS='$extra' DURATION=$DUR WARMUP=$WARM RUNS=$ROUNDS SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU ./run.sh ${servers[*]}"
  (cd "$ANCHORS" && BASE_PORT=$(zmb_free_range 8) EXTRA_SERVERS=$extra DURATION=$DUR WARMUP=$WARM RUNS=$ROUNDS SERVER_CPU=$SERVER_CPU \
    CLIENT_CPU=$CLIENT_CPU ./run.sh "${servers[@]}") >"$OUT/anchors.log" 2>&1 ||
    log "the anchors' run.sh reported a failure (see $OUT/anchors.log)"
  cp "$ANCHORS/results/results.tsv" "$OUT/anchors.tsv" 2>/dev/null || log "no anchors results.tsv"
  cp "$ANCHORS/results/results.md" "$OUT/anchors.md" 2>/dev/null
fi

# ---- servers for steps 2 and 3 ------------------------------------------------------
# start_bg NAME PORT CMD...: pinned to the server CPU, tracked by PID
start_bg() {
  local name=$1 port=$2
  shift 2
  taskset -c "$SERVER_CPU" "$@" >"$OUT/$name.server.log" 2>&1 &
  PIDS+=($!)
  zmb_wait_port "$port" "$!" 60 || { log "$name did not come up ($OUT/$name.server.log)"; return 1; }
}

# h2load_case OUT PORT C M PATH: one h2load run; prints "rps mean_us ok"
h2load_case() {
  local out=$1 port=$2 c=$3 m=$4 path=$5
  taskset -c "$CLIENT_CPU" timeout "$TMO" h2load -D "$DUR" --warm-up-time "$WARM" -c "$c" -m "$m" -t 1 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$ANCHORS/payloads/resolve.bin" \
    "http://127.0.0.1:$port$path" >"$out" 2>&1
  local rps total succ x2 mean
  rps=$(awk '/^finished in/{gsub(",","",$4); print $4}' "$out")
  read -r total succ < <(awk '/^requests:/{print $2, $8}' "$out")
  x2=$(awk '/^status codes:/{print $3}' "$out")
  mean=$(awk '/^time for request:/{v=$6; if (v ~ /us$/) x=v+0; else if (v ~ /ms$/) x=v*1000; else x=v*1e6; printf "%.0f", x}' "$out")
  local ok=0
  [[ -n $rps && ${total:-0} -gt 0 && $succ == "$total" && $x2 == "$total" ]] && ok=1
  echo "${rps:-0} ${mean:-0} $ok"
}

CASES=$OUT/cases.tsv
printf 'step\tserver\trpc\tconns\tstreams\tround\trps\tmean_us\tp99_us\tok\n' >"$CASES"
# zm at its defaults, and zm-bp: the same with LOOP_BUSY_POLL_US
declare -A APORT
for s in zm zm-bp; do
  p=$(zmb_free_port)
  st=$W/$s-steps.db
  bp= # empty: the default (auto)
  [[ $s == zm-bp ]] && bp=$BUSY_POLL_US
  if zmb_schema "$st" "$BIN" && zmb_seed "$st" "$KEYS" 3600 &&
    start_bg "$s" "$p" env STORE_PATH="$st" GRPC_ADDRESS="127.0.0.1:$p" ZITI_CONTROLLER_URL= LOOP_BUSY_POLL_US=$bp "$BIN"; then
    APORT[$s]=$p
  fi
done
ZM_PORT=${APORT[zm]:-}

# ---- 2. random keys: zm-bench against zm and the in-memory anchors -----------------
if [[ ${SKIP_ANCHORS:-0} != 1 && -n $ZM_PORT ]]; then
  log "random keys (zm-bench) against zm and the anchors"
  for a in cpp-async:bin/cpp_server cpp-callback:bin/cpp_cb_server go:bin/goserver; do
    n=${a%%:*}
    p=$(zmb_free_port)
    if start_bg "$n" "$p" env -C "$ANCHORS" GOMAXPROCS=1 "./${a#*:}" "$p"; then APORT[$n]=$p; fi
  done
  names=("${!APORT[@]}")
  for round in $(seq "$ROUNDS"); do
    for case in resolve:32x32 resolve:1x1 extend:1x1; do
      rpc=${case%%:*}
      cm=${case#*:}
      c=${cm%x*}
      m=${cm#*x}
      n=${#names[@]}
      for ((k = 0; k < n; k++)); do
        s=${names[$(((k + round - 1) % n))]}
        j=$OUT/rand-$s-$rpc-$cm-$round.json
        taskset -c "$CLIENT_CPU" timeout "$TMO" "$BENCH" --target "127.0.0.1:${APORT[$s]}" \
          --scenario "$rpc" -c "$c" -m "$m" -D "$DUR" --warmup "$WARM" --keys "$KEYS" --seed "$round" \
          --timeout-ms 10000 --quiet --json "$j" >"$OUT/rand-$s-$rpc-$cm-$round.txt" 2>&1
        read -r rps mean p99 errs < <(/usr/bin/python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
print(j["rps"], j["latency_us"]["mean"], j["latency_us"]["p99"], j["errors"]["total"])' "$j" 2>/dev/null || echo "0 0 0 1")
        printf 'random\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$rpc" "$c" "$m" "$round" "$rps" "$mean" "$p99" \
          "$([[ $errs == 0 ]] && echo 1 || echo 0)" >>"$CASES"
        log "  random $s $rpc $cm round $round: $rps req/s, mean $mean us"
      done
    done
  done
fi

# ---- 3. the HTTP/2 ceiling: nghttpd beside zm ----------------------------------------
if command -v nghttpd >/dev/null && [[ -n $ZM_PORT ]]; then
  log "HTTP/2 ceiling: nghttpd --no-tls (1-byte file) vs zm ResolveIdentity, h2load 32x32"
  mkdir -p "$W/htdocs$SVC"
  printf x >"$W/htdocs$SVC/ResolveIdentity"
  NGD_PORT=$(zmb_free_port)
  if start_bg nghttpd "$NGD_PORT" nghttpd --no-tls -d "$W/htdocs" "$NGD_PORT"; then
    fact cmd_ceiling "taskset -c $SERVER_CPU nghttpd --no-tls -d DIR PORT (DIR$SVC/ResolveIdentity = 1 byte); taskset -c $CLIENT_CPU h2load -D $DUR --warm-up-time $WARM -c 32 -m 32 -t 1 -H 'content-type: application/grpc' -H 'te: trailers' -d payloads/resolve.bin http://127.0.0.1:PORT$SVC/ResolveIdentity (the same command against zm)"
    for round in $(seq "$ROUNDS"); do
      order=(zm nghttpd)
      ((round % 2 == 0)) && order=(nghttpd zm)
      for s in "${order[@]}"; do
        p=$ZM_PORT
        [[ $s == nghttpd ]] && p=$NGD_PORT
        read -r rps mean ok < <(h2load_case "$OUT/ceiling-$s-$round.txt" "$p" 32 32 "$SVC/ResolveIdentity")
        printf 'ceiling\t%s\tresolve\t32\t32\t%s\t%s\t%s\t\t%s\n' "$s" "$round" "$rps" "$mean" "$ok" >>"$CASES"
        log "  ceiling $s round $round: $rps req/s"
      done
    done
  fi
else
  fact ceiling "n/a (nghttpd not installed: nghttp2-server, ./install-deps.sh)"
fi
cleanup
PIDS=()

# ---- 4. idle connections -----------------------------------------------------------------
if [[ ${SKIP_IDLE:-0} != 1 ]]; then
  log "idle connections: $IDLE_N, h2c then TLS"
  for mode in h2c tls; do
    N=$IDLE_N MODE=$mode "$here/idle-conns.sh" "$BUILD" >"$OUT/idle-$mode.txt" 2>&1 ||
      log "idle-conns.sh ($mode) failed (see $OUT/idle-$mode.txt)"
  done
  fact cmd_idle "N=$IDLE_N MODE=h2c|tls bench/idle-conns.sh $BUILD"
fi

# ---- 5. enrollment cost and isolation ---------------------------------------------------------
if [[ ${SKIP_ENROLL:-0} != 1 ]]; then
  if [[ -x $here/enroll-isolation.sh ]]; then
    log "enrollment cost and isolation"
    SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU "$here/enroll-isolation.sh" "$BUILD" >"$OUT/enroll.txt" 2>&1 ||
      log "enroll-isolation.sh failed (see $OUT/enroll.txt)"
    fact cmd_enroll "bench/enroll-isolation.sh $BUILD"
  else
    fact enroll "n/a (bench/enroll-isolation.sh missing)"
  fi
fi

# ---- 6. the table ------------------------------------------------------------------------------
fact load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
fact duration_s "$(($(date +%s) - T_START))"
/usr/bin/python3 "$here/results_perf.py" "$OUT" "$RESULTS_MD" || { echo "results_perf.py failed; raw outputs in $OUT"; exit 1; }
log "wrote $RESULTS_MD; raw outputs in $OUT"
