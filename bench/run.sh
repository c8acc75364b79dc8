#!/usr/bin/env bash
# bench/run.sh - builds (Release, build-bench/), measures ziti-management and
# writes bench/RESULTS.md. Steps (each one records "n/a (reason)" instead of
# stopping the run when a piece is missing):
#   1. zm-bench scenarios against the server pinned to one core, with the
#      controller simulator (test/sim) at 0 ms and 5 ms added latency, 100,000
#      preloaded identities; service CPU per RequestServiceIdentity vs the
#      bare crypto cost (zm-cryptocost); the server's loop-lag probe.
#   2. RSS with 10,000 idle HTTP/2 connections; RSS per in-flight enrollment.
#   3. start-up time with 1,000,000 identities in the store.
#   4. GC sweep of 100,000 expired leases, with ResolveIdentity p99 during it.
#   5. the anchors (shared/anchors/perf/run.sh) side by side, the server added
#      through EXTRA_SERVERS=zm=bench/anchor-server.sh; ratio table.
#   6. bench/run-lifecycle.sh (issue 10: random keys, zm-bench driving the
#      anchors too, PostgreSQL vs go-pg, replicas; SKIP_LIFECYCLE=1 skips it):
#      its own section of RESULTS.md.
#   7. bench/run-perf.sh (issue 15: every performance target as a ratio
#      against what ran beside it in that run: the anchors, nghttpd, the bare
#      crypto, the machine's floor; SKIP_PERF=1 skips it): its own section.
# Env: QUICK=1 (seconds-long everything), DURATION/RUNS/WARMUP (anchors, and
#      DURATION/WARMUP for step 1), SERVER_CPU=0 CLIENT_CPU=1, ANCHORS=path,
#      SKIP_ANCHORS=1, SKIP_BUILD=1, MIXED_RATE (open-loop rate of `mixed`),
#      RESULTS_MD (where to write the report; default bench/RESULTS.md).
# Raw outputs: build-bench/bench-results/. Whole run: about 40 min with steps 6 and 7 (QUICK: ~5).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
REPO=$ZMB_REPO
T_START=$(date +%s)

QUICK=${QUICK:-0}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
ANCHORS=${ANCHORS:-$(cd "$REPO/.." && pwd)/shared/anchors/perf}
[[ -d $ANCHORS ]] || ANCHORS=/work/shared/anchors/perf
BUILD=$REPO/build-bench
OUT=$BUILD/bench-results
if [[ $QUICK == 1 ]]; then
  DUR=${DURATION:-1}; WARM=${WARMUP:-0.5}; A_RUNS=${RUNS:-1}; A_DUR=${DURATION:-1}; A_WARM=${WARMUP:-1}
  IDLE_N=1000; STARTUP_N=100000; GC_N=5000; GC_MAX_S=30
else
  DUR=${DURATION:-5}; WARM=${WARMUP:-1}; A_RUNS=${RUNS:-3}; A_DUR=${DURATION:-5}; A_WARM=${WARMUP:-1}
  IDLE_N=10000; STARTUP_N=1000000; GC_N=100000; GC_MAX_S=90
fi
MIXED_RATE=${MIXED_RATE:-10000}
KEYS=100000

rm -rf "$OUT"; mkdir -p "$OUT"
W=$(mktemp -d "${TMPDIR:-/tmp}/zm-bench-run.XXXXXX")
FACTS=$OUT/facts.tsv; : >"$FACTS"
CASES=$OUT/cases.tsv
printf 'label\tsim_ms\tconns\tstreams\tmode\trate\tjson\twall_s\tsrv_ticks\tcli_cpu_s\targs\n' >"$CASES"
NOTES=()
ZMB_SIM_PID=; ZMB_SRV_PID=; ZMB_SIM_URL=

fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
note() { NOTES+=("$*"); echo "  note: $*"; }
log() { echo "[$(($(date +%s) - T_START))s] $*"; }

cleanup() {
  zmb_stop "$ZMB_SRV_PID"; ZMB_SRV_PID=
  zmb_stop "$ZMB_SIM_PID"; ZMB_SIM_PID=
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# File descriptors: 10,000 idle connections need them on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- machine facts ------------------------------------------------------------
fact quick "$QUICK"
fact date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact nproc "$(nproc)"
fact cpu "$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
fact kernel "$(uname -r)"
fact mem "$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
fact os "$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}")"
fact h2load "$(h2load --version 2>/dev/null | head -1)"
fact git "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
fact server_cpu "$SERVER_CPU"
fact client_cpu "$CLIENT_CPU"
fact cmd_run "$( [[ $QUICK == 1 ]] && echo 'QUICK=1 ')bench/run.sh   # nofile limit $(ulimit -n)"
log "machine: nproc=$(nproc), $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"

# ---- 1. build ---------------------------------------------------------------------
BIN=$BUILD/ziti-management
BENCH=$BUILD/bench/zm-bench
CRYPTO=$BUILD/bench/zm-cryptocost
fact cmd_build "cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DZM_TESTS=OFF && cmake --build build-bench -j$(nproc) --target ziti-management zm-bench zm-cryptocost zm-tlsbench zm-floor"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "build (Release) into $BUILD"
  cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DZM_TESTS=OFF >"$OUT/build.log" 2>&1 ||
    log "cmake configure reported errors (see $OUT/build.log)"
  for t in zm-bench ziti-management zm-cryptocost zm-tlsbench zm-floor; do
    cmake --build "$BUILD" -j"$(nproc)" --target "$t" >>"$OUT/build.log" 2>&1 || log "build of $t FAILED (see $OUT/build.log)"
  done
fi
[[ -x $BENCH ]] || { echo "zm-bench did not build; nothing to measure (see $OUT/build.log)"; exit 1; }
HAVE_SERVER=1
[[ -x $BIN ]] || { HAVE_SERVER=0; note "the server did not build: every server measurement is n/a (build.log)"; }

# ---- helpers ------------------------------------------------------------------------
PORT=
SRV_LOG=
start_zm() { # label store [ENV=VAL...]: starts the server on a fresh port, waits for SERVING
  local label=$1 store=$2
  shift 2
  PORT=$(zmb_free_port)
  SRV_LOG=$OUT/server-$label.log
  zmb_start_server "$BIN" "$store" "$PORT" "$SERVER_CPU" "$SRV_LOG" "$@"
  if ! zmb_wait_health "$BENCH" "$PORT" "$ZMB_SRV_PID" 60; then
    log "server ($label) did not become SERVING; log tail:"; tail -5 "$SRV_LOG" | sed 's/^/    /'
    zmb_stop "$ZMB_SRV_PID"; ZMB_SRV_PID=
    return 1
  fi
}
stop_zm() { zmb_stop "$ZMB_SRV_PID"; ZMB_SRV_PID=; }

# run_case LABEL SIM_MS zm-bench-args...: one measured run, appended to cases.tsv
run_case() {
  local label=$1 sim=$2
  shift 2
  local json=$OUT/$label.json c=1 m=1 mode=closed rate=0 a prev=
  for a in "$@"; do
    case $prev in -c) c=$a ;; -m) m=$a ;; --rate) mode=open; rate=$a ;; esac
    prev=$a
  done
  local s0 s1 real user sys
  s0=$(zmb_ticks "$ZMB_SRV_PID")
  TIMEFORMAT='%R %U %S'
  { time taskset -c "$CLIENT_CPU" timeout 300 "$BENCH" --target "127.0.0.1:$PORT" --json "$json" \
      --allow-errors --show-errors 3 "$@" >"$OUT/$label.txt" 2>&1; } 2>"$OUT/$label.time"
  s1=$(zmb_ticks "$ZMB_SRV_PID")
  read -r real user sys <"$OUT/$label.time"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$sim" "$c" "$m" "$mode" "$rate" "$json" \
    "$real" "$((s1 - s0))" "$(awk -v u="$user" -v s="$sys" 'BEGIN{print u+s}')" "$*" >>"$CASES"
  local line
  line=$(grep -E '^(throughput|errors)' "$OUT/$label.txt" | tr '\n' ' ')
  log "  $label (sim ${sim} ms): ${line:-no result, see $OUT/$label.txt}"
  LAST_TICKS=$((s1 - s0))
}
json_get() { # file python-expression-on-j
  /usr/bin/python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null
}
LAST_TICKS=0
CLK_TCK=$(getconf CLK_TCK)

# ---- 2. scenarios with the simulator ------------------------------------------------------
fact cmd_sim "taskset -c $CLIENT_CPU /usr/bin/python3 test/sim/ziti_sim.py --dir DIR --port 0 --ctl-port 0   # latency: curl -X POST http://127.0.0.1:CTL/faults -d '{\"latency_ms\":5}'"
fact cmd_server "taskset -c $SERVER_CPU env STORE_PATH=store.db GRPC_ADDRESS=127.0.0.1:PORT ZITI_CONTROLLER_URL=<sim url> ZITI_CA_FILE=.. ZITI_CERT_FILE=.. ZITI_KEY_FILE=.. LOOP_LAG_PROBE=1 build-bench/ziti-management   # store seeded by bench/lib.sh zmb_seed (sqlite3 CLI, recursive CTE)"
fact cases_note "Each case: \`-D $DUR --warmup $WARM\`; req/s = verified answers completed in the window / window; latency from zm-bench's log-linear histogram (< 0.8 % error), measured from send (closed loop) or from the intended send time (open loop). Every answer is verified (status and content); errors count wrong answers, unexpected statuses and transport errors. Server CPU = its utime+stime over the run / wall (100 % = the whole core); the controller simulator (Python) shares the client's core."
SIM_OK=0
if ((HAVE_SERVER)); then
  log "controller simulator"
  if zmb_start_sim "$W/sim" "$CLIENT_CPU"; then
    SIM_OK=1
  else
    note "the controller simulator did not start (test/sim/ziti_sim.py): controller scenarios are n/a"
    ZMB_SIM_URL=
  fi
  store=$W/main.db
  if zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600; then
    # STORE_SYNC=normal: an acknowledged write survives a crash of the
    # process (WAL, no fsync per commit); the fsync'ed mode is measured below.
    if start_zm main "$store" LOOP_LAG_PROBE=1 STORE_SYNC=normal; then
      log "server up on 127.0.0.1:$PORT (pid $ZMB_SRV_PID, CPU $SERVER_CPU); scenarios, -D $DUR --warmup $WARM"
      B=(-D "$DUR" --warmup "$WARM" --keys "$KEYS" --timeout-ms 10000)
      run_case resolve-32x32 0 "${B[@]}" --scenario resolve -c 32 -m 32
      run_case resolve-1x1 0 "${B[@]}" --scenario resolve -c 1 -m 1
      run_case resolve-miss-32x32 0 "${B[@]}" --scenario resolve --miss-ratio 1 -c 32 -m 32
      run_case resolve-open-20k 0 "${B[@]}" --scenario resolve --rate 20000 -c 8 -m 128
      run_case extend-32x32 0 "${B[@]}" --scenario extend -c 32 -m 32
      run_case extend-1x1 0 "${B[@]}" --scenario extend -c 1 -m 1
      run_case extend-256x32 0 "${B[@]}" --scenario extend -c 256 -m 32
      run_case list-4x8 0 "${B[@]}" --scenario list -c 4 -m 8
      run_case health-32x32 0 "${B[@]}" --scenario health -c 32 -m 32
      rsi_ticks=0; rsi_ok=0
      if ((SIM_OK)); then
        for lat in 0 5; do
          zmb_sim_latency "$lat" || note "could not set simulator latency $lat ms"
          run_case "rsi-4x8-sim${lat}" "$lat" "${B[@]}" --scenario request-service-identity -c 4 -m 8
          n=$(json_get "$OUT/rsi-4x8-sim${lat}.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
          if [[ -n $n && $n -gt 0 ]]; then rsi_ticks=$((rsi_ticks + LAST_TICKS)); rsi_ok=$((rsi_ok + n)); fi
          run_case "create-agent-4x8-sim${lat}" "$lat" "${B[@]}" --scenario create-agent -c 4 -m 8
          run_case "mixed-open-sim${lat}" "$lat" "${B[@]}" --scenario mixed --rate "$MIXED_RATE" -c 32 -m 64
        done
        zmb_sim_latency 0
      fi
      # 200 concurrent RequestServiceIdentity calls, ResolveIdentity meanwhile
      # (issue 4: resolve p99 < 5 ms during them)
      if ((SIM_OK)); then
        taskset -c "$CLIENT_CPU" "$BENCH" --target "127.0.0.1:$PORT" --scenario resolve --rate 5000 -c 4 -m 64 \
          -D 6 --keys "$KEYS" --quiet --allow-errors --json "$OUT/rsi200-resolve.json" >"$OUT/rsi200-resolve.txt" 2>&1 &
        rpid=$!
        sleep 1
        taskset -c "$CLIENT_CPU" "$BENCH" --target "127.0.0.1:$PORT" --scenario request-service-identity -n 200 \
          -c 4 -m 50 --timeout-ms 60000 --allow-errors --json "$OUT/rsi200.json" >"$OUT/rsi200.txt" 2>&1
        wait "$rpid"
        ok200=$(json_get "$OUT/rsi200.json" 'j["ops"]["request-service-identity"]["status"].get("OK", 0)')
        e200=$(json_get "$OUT/rsi200.json" 'j["errors"]["total"]')
        rp99=$(json_get "$OUT/rsi200-resolve.json" 'j["latency_us"]["p99"]')
        rmax=$(json_get "$OUT/rsi200-resolve.json" 'j["latency_us"]["max"]')
        re=$(json_get "$OUT/rsi200-resolve.json" 'j["errors"]["total"]')
        fact rsi200 "${ok200:-?} of 200 concurrent RequestServiceIdentity OK (${e200:-?} errors); ResolveIdentity at 5000 req/s open loop meanwhile: p99 ${rp99:-?} us, max ${rmax:-?} us, ${re:-?} errors"
      fi
      # service CPU per RequestServiceIdentity vs the bare crypto cost
      if ((rsi_ok > 0)); then
        rsi_us=$(awk -v t="$rsi_ticks" -v h="$CLK_TCK" -v n="$rsi_ok" 'BEGIN{printf "%.0f", t / h * 1e6 / n}')
        fact rsi_cpu "$rsi_us us CPU per call ($rsi_ok OK calls, $rsi_ticks ticks)"
      else
        fact rsi_cpu "n/a (no successful RequestServiceIdentity: $( ((SIM_OK)) && echo 'see rsi-*.txt' || echo 'no simulator'))"
      fi
      if [[ -x $CRYPTO ]]; then
        cc=$(taskset -c "$SERVER_CPU" "$CRYPTO" "$([[ $QUICK == 1 ]] && echo 50 || echo 300)" ec-p384 2>&1)
        cus=$(sed -n 's/.*cpu_us_per_op=\([0-9.]*\).*/\1/p' <<<"$cc")
        if [[ -n $cus ]]; then
          fact crypto_cost "$cus us CPU per EC P-384 key + CSR ($cc)"
          [[ ${rsi_us:-} ]] && fact rsi_cpu_ratio "$(awk -v a="$rsi_us" -v b="$cus" 'BEGIN{printf "%.2fx", a / b}')"
        else
          fact crypto_cost "n/a (zm-cryptocost: $cc)"
        fi
      else
        fact crypto_cost "n/a (zm-cryptocost did not build)"
      fi
      stop_zm
      lag=$(grep -iE 'loop[ _-]?lag' "$SRV_LOG" | tail -1)
      fact loop_lag "${lag:-n/a (the server logged no loop-lag line at shutdown)}"
    else
      note "the server did not start for the scenario runs (server-main.log)"
    fi
  else
    note "seeding the store failed"
  fi
fi

# ---- 2b. ExtendIdentityLease durable against power loss (fsync per group commit) ---------------
if ((HAVE_SERVER)); then
  log "ExtendIdentityLease with STORE_SYNC=full (fsync per group commit)"
  store=$W/fsync.db
  if zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 && start_zm fsync "$store" STORE_SYNC=full; then
    B=(-D "$DUR" --warmup "$WARM" --keys "$KEYS" --timeout-ms 10000)
    run_case extend-fsync-32x32 0 "${B[@]}" --scenario extend -c 32 -m 32
    run_case extend-fsync-256x32 0 "${B[@]}" --scenario extend -c 256 -m 32
    run_case extend-fsync-1x1 0 "${B[@]}" --scenario extend -c 1 -m 1
    stop_zm
  else
    note "the STORE_SYNC=full server did not start"
  fi
  rm -f "$store" "$store"-*
fi

# ---- 3. RSS: idle connections, in-flight enrollments -------------------------------------------
if ((HAVE_SERVER)); then
  log "RSS per in-flight enrollment, and with $IDLE_N idle HTTP/2 connections"
  store=$W/rss.db
  if zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 && start_zm rss "$store"; then
    # (first, on the fresh server: allocator reuse after 10,000 connections
    # would hide the growth)
    # in-flight enrollments: a slow controller (1 s per answer) keeps 256
    # calls in flight; sample VmRSS for 3 s, then stop the client (the
    # server then cancels and compensates them).
    if ((SIM_OK)); then
      zmb_sim_latency 1000
      sleep 1
      base=$(zmb_vm "$ZMB_SRV_PID" VmRSS)
      taskset -c "$CLIENT_CPU" "$BENCH" --target "127.0.0.1:$PORT" --scenario request-service-identity \
        -c 4 -m 64 -D 60 --timeout-ms 60000 --allow-errors >"$OUT/rsi-inflight.txt" 2>&1 &
      bpid=$!
      peak=$base
      for ((i = 0; i < 30; i++)); do
        r=$(zmb_vm "$ZMB_SRV_PID" VmRSS); [[ -n $r && $r -gt $peak ]] && peak=$r
        sleep 0.1
      done
      kill "$bpid" 2>/dev/null; wait "$bpid" 2>/dev/null
      zmb_sim_latency 0
      fact rsi_rss "$(awk -v p="$peak" -v b="$base" 'BEGIN{printf "%.1f KiB per in-flight call (peak %.1f MiB - base %.1f MiB, 256 in flight, simulator answering after 1 s)", (p-b)/256, p/1024, b/1024}')"
    else
      fact rsi_rss "n/a (no simulator)"
    fi
    ((SIM_OK)) && zmb_sim_latency 0
    sleep 1
    base=$(zmb_vm "$ZMB_SRV_PID" VmRSS)
    fifo=$W/idle.out
    taskset -c "$CLIENT_CPU" "$BENCH" --target "127.0.0.1:$PORT" --idle-conns "$IDLE_N" --hold 150 \
      --json "$OUT/idle.json" --timeout-ms 20000 >"$fifo" 2>&1 &
    bpid=$!
    ready=
    for ((i = 0; i < 1200; i++)); do
      ready=$(sed -n 's/^READY \([0-9]*\)$/\1/p' "$fifo")
      [[ -n $ready ]] && break
      kill -0 "$bpid" 2>/dev/null || break
      sleep 0.05
    done
    if [[ -n $ready ]]; then
      # idle connections are trimmed 1-2 s after their last activity, ~5 ms
      # of that per second: measure once VmRSS stops falling (at most 120 s)
      sleep 2
      best=$(zmb_vm "$ZMB_SRV_PID" VmRSS) flat=0
      for ((i = 0; i < 120 && flat < 2; i++)); do
        sleep 1
        r=$(zmb_vm "$ZMB_SRV_PID" VmRSS)
        if ((r < best)); then best=$r flat=0; else flat=$((flat + 1)); fi
      done
      rss=$(zmb_vm "$ZMB_SRV_PID" VmRSS)
      kill "$bpid" 2>/dev/null
      fact idle_rss "$(awk -v r="$rss" -v n="$ready" -v w="$IDLE_N" 'BEGIN{printf "%.1f MiB with %d of %d connections ready", r/1024, n, w}')"
      fact idle_rss_per_conn "$(awk -v r="$rss" -v b="$base" -v n="$ready" 'BEGIN{ if (n > 0) printf "%.1f KiB per connection (base %.1f MiB)", (r-b)/n, b/1024; else print "n/a" }')"
    else
      fact idle_rss "n/a (zm-bench --idle-conns did not report READY: $(tail -2 "$fifo" | tr '\n' ' '))"
    fi
    wait "$bpid" 2>/dev/null
    cp "$fifo" "$OUT/idle.txt"
    stop_zm
  else
    fact idle_rss "n/a (server did not start)"
  fi
fi

# ---- 4. start-up with many identities ---------------------------------------------------------------
if ((HAVE_SERVER)); then
  log "start-up with $STARTUP_N identities"
  store=$W/startup.db
  if zmb_schema "$store" "$BIN" && zmb_seed "$store" "$STARTUP_N" 3600; then
    saved_url=$ZMB_SIM_URL; ZMB_SIM_URL=   # no controller: the store load alone
    PORT=$(zmb_free_port)
    SRV_LOG=$OUT/server-startup.log
    t0=$(date +%s.%N)
    zmb_start_server "$BIN" "$store" "$PORT" "$SERVER_CPU" "$SRV_LOG"
    if zmb_wait_port "$PORT" "$ZMB_SRV_PID" 120; then
      t1=$(date +%s.%N)
      if zmb_wait_health "$BENCH" "$PORT" "$ZMB_SRV_PID" 60; then
        t2=$(date +%s.%N)
        fact startup "$(awk -v a="$t0" -v b="$t1" -v c="$t2" -v n="$STARTUP_N" 'BEGIN{printf "%d identities: port accepting after %.2f s, health SERVING after %.2f s", n, b-a, c-a}')"
        fact startup_rss "$(awk -v r="$(zmb_vm "$ZMB_SRV_PID" VmRSS)" 'BEGIN{printf "%.1f MiB", r/1024}')"
      else
        fact startup "n/a (port open but no SERVING; server-startup.log)"
      fi
    else
      fact startup "n/a (the server did not open its port within 120 s; server-startup.log)"
    fi
    stop_zm
    ZMB_SIM_URL=$saved_url
    rm -f "$store" "$store"-*
  else
    fact startup "n/a (seeding failed)"
  fi
fi

# ---- 5. GC sweep of expired leases ---------------------------------------------------------------------
if ((HAVE_SERVER)) && ((SIM_OK)); then
  log "GC sweep of $GC_N expired leases"
  store=$W/gc.db
  if zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 && zmb_seed_expired "$store" "$GC_N" &&
    start_zm gc "$store" SERVICE_IDENTITY_GC_INTERVAL=1s; then
    t0=$(date +%s.%N)
    left=$GC_N; i=0; p99s=()
    while ((left > 0)); do
      taskset -c "$CLIENT_CPU" "$BENCH" --target "127.0.0.1:$PORT" --scenario resolve --rate 5000 -c 4 -m 64 -D 2 \
        --quiet --allow-errors --json "$W/gc-resolve.json" >/dev/null 2>&1
      p=$(json_get "$W/gc-resolve.json" 'j["latency_us"]["p99"]')
      e=$(json_get "$W/gc-resolve.json" 'j["errors"]["total"]')
      [[ -n $p ]] && p99s+=("$p/${e:-?}")
      left=$(sqlite3 "file:$store?mode=ro" "SELECT count(*) FROM service_identities WHERE ziti_identity_id LIKE 'gc-%'" 2>/dev/null) || left=
      [[ -n $left ]] || { left=-1; break; }
      (($(date +%s) - ${t0%.*} > GC_MAX_S)) && break
      i=$((i + 1))
    done
    t1=$(date +%s.%N)
    if ((left == 0)); then
      fact gc "$(awk -v a="$t0" -v b="$t1" -v n="$GC_N" 'BEGIN{printf "%d expired leases swept in <= %.1f s (polled every ~2 s)", n, b-a}')"
    elif ((left < 0)); then
      fact gc "n/a (could not read the store while the server runs)"
    else
      fact gc "incomplete: $left of $GC_N expired leases left after $GC_MAX_S s"
    fi
    fact gc_resolve "5000 req/s open loop, p99 per 2 s window (us/errors): ${p99s[*]:-none}"
    stop_zm
  else
    fact gc "n/a (server did not start)"
  fi
elif ((HAVE_SERVER)); then
  fact gc "n/a (no simulator)"
fi
zmb_stop "$ZMB_SIM_PID"; ZMB_SIM_PID=

# ---- 6. the anchors, side by side ---------------------------------------------------------------------
fact anchors_note "\`$ANCHORS/run.sh\` with \`DURATION=$A_DUR WARMUP=$A_WARM RUNS=$A_RUNS EXTRA_SERVERS=\"zm=env STORE_SYNC=normal $here/anchor-server.sh {PORT};zm-fsync=env STORE_SYNC=full $here/anchor-server.sh {PORT}\"\`: h2load with the anchors' payloads (always key zid-042424), every server pinned to CPU 0, h2load on CPU 1, rounds interleaved. zm = this server on a freshly seeded store (100,000 keys; SQLite; zm with STORE_SYNC=normal, zm-fsync with STORE_SYNC=full), no controller, non-hot methods disabled so the anchors' verify step (which expects UNIMPLEMENTED for them) passes. Best anchor = highest req/s among cpp-async, cpp-callback and go with checks ok; for latency, the lowest mean."
if [[ ${SKIP_ANCHORS:-0} == 1 ]]; then
  fact anchors_status "skipped (SKIP_ANCHORS=1)"
elif ((!HAVE_SERVER)); then
  fact anchors_status "the server did not build"
elif [[ ! -x $ANCHORS/run.sh ]]; then
  fact anchors_status "no anchors at $ANCHORS"
else
  if [[ ! -x $ANCHORS/bin/goserver || ! -x $ANCHORS/bin/verify || ! -x $ANCHORS/bin/cpp_server ]]; then
    log "building the anchors ($ANCHORS/build.sh)"
    "$ANCHORS/build.sh" >"$OUT/anchors-build.log" 2>&1 || log "anchors build FAILED (anchors-build.log)"
  fi
  # Run a private copy (in the temp dir, not in the project) on free ports:
  # other sessions may run the shared anchors at the same time, and their
  # results/ directory must stay as it is.
  log "anchors side by side (DURATION=$A_DUR RUNS=$A_RUNS)"
  ACOPY=$W/anchors-perf
  cp -a "$ANCHORS" "$ACOPY" && rm -rf "$ACOPY/results"
  a_base=$(zmb_free_range 8) || a_base=51150
  a_pg=$(( $(zmb_free_range 1 || echo 55531) + 1 ))
  mkdir -p "$W/anchor-tmp"
  fact anchors_ports "BASE_PORT=$a_base PGPORT=$a_pg"
  ZM_BIN=$BIN ZM_BENCH_TMP=$W/anchor-tmp DURATION=$A_DUR WARMUP=$A_WARM RUNS=$A_RUNS \
    BASE_PORT=$a_base PGPORT=$a_pg SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU \
    EXTRA_SERVERS="zm=env STORE_SYNC=normal $here/anchor-server.sh {PORT};zm-fsync=env STORE_SYNC=full $here/anchor-server.sh {PORT}" \
    "$ACOPY/run.sh" >"$OUT/anchors-run.log" 2>&1
  arc=$?
  mkdir -p "$OUT/anchors"
  if [[ -f $ACOPY/results/results.tsv ]]; then
    cp -a "$ACOPY/results/." "$OUT/anchors/"
    cp "$OUT/anchors-run.log" "$OUT/anchors/run.log"
    fact anchors_status "exit $arc"
    if grep -q 'zm: verification FAILED' "$OUT/anchors-run.log"; then
      fact anchors_zm_status "the anchors' verify step rejected zm: $(grep -h 'FAIL' "$OUT/anchors/raw/zm.verify.txt" 2>/dev/null | head -3 | sed 's/^ *//' | tr '\n' ';')"
    elif grep -q 'zm did not come up' "$OUT/anchors-run.log"; then
      fact anchors_zm_status "zm did not come up under the anchors' run.sh (anchors/raw/zm.server.log)"
    fi
    grep -q 'did not come up' "$OUT/anchors-run.log" &&
      note "anchors' run: $(grep -c 'did not come up' "$OUT/anchors-run.log") server(s) did not come up (anchors-run.log)"
  else
    fact anchors_status "the anchors' run.sh (exit $arc) wrote no results.tsv; see anchors-run.log"
  fi
  rm -rf "$ACOPY"
  tail -3 "$OUT/anchors-run.log" | sed 's/^/  /'
fi

# ---- 7. RESULTS.md -----------------------------------------------------------------------------------------
total=$(($(date +%s) - T_START))
NOTES+=("whole bench/run.sh: ${total} s; raw outputs (zm-bench text/JSON, server logs, anchors' results) in build-bench/bench-results/")
notes_joined=$(printf '%s || ' "${NOTES[@]}"); notes_joined=${notes_joined% || }
fact notes "$notes_joined"
RESULTS_MD=${RESULTS_MD:-$here/RESULTS.md}
/usr/bin/python3 "$here/results.py" "$OUT" "$RESULTS_MD" || { echo "rendering RESULTS.md failed"; exit 1; }
log "wrote $RESULTS_MD (total ${total} s)"

# ---- 8. identity lifecycle benchmark (issue 10): bench/run-lifecycle.sh --------------------------------
# random-key ExtendIdentityLease / ResolveIdentity, embedded store and
# PostgreSQL, anchors driven by zm-bench, replicas; its own section of RESULTS.md
if [[ ${SKIP_LIFECYCLE:-0} != 1 ]] && ((HAVE_SERVER)); then
  log "identity lifecycle benchmark (bench/run-lifecycle.sh)"
  # (run-lifecycle.sh builds a private copy of the anchors if they are not built)
  SKIP_BUILD=1 BUILD=$BUILD ANCHORS=$ANCHORS SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU RESULTS_MD=$RESULTS_MD \
    DURATION=$([[ $QUICK == 1 ]] && echo 1 || echo 3) ROUNDS=$([[ $QUICK == 1 ]] && echo 1 || echo 3) \
    STEADY_DURATION=$([[ $QUICK == 1 ]] && echo 3 || echo 15) \
    "$here/run-lifecycle.sh" >"$OUT/lifecycle.log" 2>&1 || log "run-lifecycle.sh failed (see $OUT/lifecycle.log)"
fi
# ---- 9. performance targets (issue 15): bench/run-perf.sh ---------------------------------------------------
# the anchors' run.sh again with zm, zm-bp and no baseline, random keys,
# nghttpd, idle connections, enrollment isolation; its own section of RESULTS.md
if [[ ${SKIP_PERF:-0} != 1 ]] && ((HAVE_SERVER)); then
  log "performance targets (bench/run-perf.sh)"
  SKIP_BUILD=1 BUILD=$BUILD ANCHORS=$ANCHORS SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU RESULTS_MD=$RESULTS_MD \
    DURATION=$([[ $QUICK == 1 ]] && echo 1 || echo 4) ROUNDS=$([[ $QUICK == 1 ]] && echo 1 || echo 3) \
    IDLE_N=$([[ $QUICK == 1 ]] && echo 1000 || echo 10000) \
    "$here/run-perf.sh" >"$OUT/perf.log" 2>&1 || log "run-perf.sh failed (see $OUT/perf.log)"
fi
errs=$(for f in "$OUT"/*.json; do json_get "$f" 'j["errors"]["total"]'; done | awk '{s+=$1} END{print s+0}')
if ((errs > 0)); then
  log "zm-bench saw $errs errors across the runs (see RESULTS.md)"
  exit 1
fi
exit 0
