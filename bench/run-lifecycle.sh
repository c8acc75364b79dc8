#!/usr/bin/env bash
# bench/run-lifecycle.sh - the benchmark of issue 10 (section 7), side by side
# in ONE run, with zm-bench driving every server with the same uniformly random
# keys over the 100,000 preloaded identities 'zid-%06d' (--keys 100000):
#   a. ExtendIdentityLease 32x32 and 1x1 on the embedded store (SQLite) vs the
#      in-memory anchors cpp-async, cpp-callback, go;
#   b. the same on PostgreSQL (zm-pg: the server and its PostgreSQL together on
#      the server core) vs go-pg (the Go + pgx anchor with its own PostgreSQL,
#      pinned the same way, seeded as the anchors' run.sh seeds it);
#   c. two replicas on one PostgreSQL vs one: two zm-bench processes (16x32
#      each), one per replica, total req/s, over the steady-state window; the
#      one-replica control is the same two zm-bench processes against one
#      replica (the second one idle);
#   a'/b'. ExtendIdentityLease 32x32 on zm and zm-pg over a STEADY_DURATION
#      window (default 15 s: the flush granule, so the window holds one store
#      write of every key, as under continuous load; the DURATION windows
#      start cold: every key's first refresh is written inside them);
#   d. ResolveIdentity 32x32 and 1x1 (regression check: same-run ratios
#      against the anchors, and the previous bench/RESULTS.md figures); and
#      grpc.health.v1 Check 1x1 on zm: the floor of a 1x1 round trip here.
# Every server (and PostgreSQL) is pinned to SERVER_CPU, the clients to
# CLIENT_CPU. Rounds are interleaved: each round goes case by case, rotating
# the order of the servers, so compared runs are seconds apart. Everything
# listens on 127.0.0.1 only; every client run is time-bounded.
#
# Env: DURATION=3 WARMUP=1 ROUNDS=3 STEADY_DURATION=15  SERVER_CPU=0 CLIENT_CPU=1
#      BUILD (default build-bench; SKIP_BUILD=1 uses it as it is)
#      ANCHORS (a dir with the anchors built: bin/cpp_server ...; default the
#        shared anchors; if they are not built there, they are copied into the
#        temp dir and built with their build.sh: the shared dir stays as it is)
#      BASELINE_BIN (optional: an earlier build's ziti-management, e.g. from
#        `git archive b445401`: run as zm-prev on its own seeded SQLite store in
#        cases a and d, for a same-run before/after; BASELINE_REV names it)
#      SOURCE_REV (recorded as the source revision; default: git HEAD of the
#        tree this script is in, marked when src/ has uncommitted changes)
#      RESULTS_MD (default bench/RESULTS.md: the section between the
#        "lifecycle-bench" markers is replaced, or appended)
# Whole run: about 9 minutes with the defaults.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
REPO=$ZMB_REPO
T_START=$(date +%s)

DUR=${DURATION:-3}
WARM=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
KEYS=100000
BUILD=${BUILD:-$REPO/build-bench}
ANCHORS=${ANCHORS:-$(cd "$REPO/.." && pwd)/shared/anchors/perf}
[[ -d $ANCHORS ]] || ANCHORS=/work/shared/anchors/perf
RESULTS_MD=${RESULTS_MD:-$here/RESULTS.md}
OUT=$BUILD/bench-results/lifecycle
BIN=$BUILD/ziti-management
BENCH=$BUILD/bench/zm-bench
CLK_TCK=$(getconf CLK_TCK)
STEADY_DUR=${STEADY_DURATION:-15}
CASE_TIMEOUT=$(awk -v d="$DUR" -v s="$STEADY_DUR" -v w="$WARM" 'BEGIN{printf "%d", (d > s ? d : s) + w + 40}')

log() { echo "[$(($(date +%s) - T_START))s] $*"; }

rm -rf "$OUT"; mkdir -p "$OUT"
W=$(mktemp -d "${TMPDIR:-/tmp}/zm-lifecycle.XXXXXX")
chmod 755 "$W"
declare -A SPID PORT
PG_ZM_DIR=; PG_GO_DIR=; PG_ZM_URL=; PG_ZM_PORT=; PG_ZM_PID=; PG_GO_PID=
stop_srv() { zmb_stop "${SPID[$1]:-}"; unset "SPID[$1]"; }
cleanup() {
  local n
  for n in "${!SPID[@]}"; do stop_srv "$n"; done
  zmb_pg_stop "$PG_ZM_DIR"; PG_ZM_DIR=
  zmb_pg_stop "$PG_GO_DIR"; PG_GO_DIR=
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

FACTS=$OUT/facts.tsv; : >"$FACTS"
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
fact date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fact machine "nproc $(nproc); $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo); kernel $(uname -r); $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo); $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}")"
if [[ -n ${SOURCE_REV:-} ]]; then
  fact git "$SOURCE_REV"
else
  fact git "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet -- src include CMakeLists.txt 2>/dev/null || echo ' (src/ with uncommitted changes)')"
fi
fact load "load average at the start $(cut -d' ' -f1-3 /proc/loadavg) (a shared machine: other sessions' processes are not controlled; steal and core busy show it)"
fact postgres "$("$(zmb_pg_bin)/postgres" --version 2>/dev/null)"
cmd_env=("DURATION=$DUR" "WARMUP=$WARM" "ROUNDS=$ROUNDS" "STEADY_DURATION=$STEADY_DUR" "SERVER_CPU=$SERVER_CPU" "CLIENT_CPU=$CLIENT_CPU")
for v in SKIP_BUILD BUILD ANCHORS BASELINE_BIN BASELINE_REV SOURCE_REV; do
  [[ -n ${!v:-} ]] && cmd_env+=("$v=${!v}")
done
fact cmd "$(printf '%q ' "${cmd_env[@]}")bench/run-lifecycle.sh"
fact pinning "servers and PostgreSQL on CPU $SERVER_CPU (taskset), zm-bench on CPU $CLIENT_CPU"
fact shape "-D $DUR --warmup $WARM per case (extend-steady: -D $STEADY_DUR), $ROUNDS interleaved rounds, --keys $KEYS (uniformly random keys), --timeout-ms 10000"

# ---- build -----------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "build (Release) into $BUILD"
  { cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DZM_TESTS=OFF -DZM_BENCH=ON &&
    cmake --build "$BUILD" -j"$(nproc)" --target ziti-management zm-bench; } >"$OUT/build.log" 2>&1 ||
    log "build FAILED (see $OUT/build.log)"
fi
[[ -x $BIN && -x $BENCH ]] || { echo "no $BIN or $BENCH: nothing to measure (see $OUT/build.log)"; exit 1; }
fact cmd_build "cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release -DZM_TESTS=OFF -DZM_BENCH=ON && cmake --build $BUILD --target ziti-management zm-bench"

# ---- anchors (built copy) ---------------------------------------------------------
if [[ ! -x $ANCHORS/bin/goserver || ! -x $ANCHORS/bin/cpp_server || ! -x $ANCHORS/bin/goserver-pg ]]; then
  log "anchors not built in $ANCHORS: building a copy in $W/anchors"
  cp -a "$ANCHORS" "$W/anchors" && chmod -R u+w "$W/anchors" && rm -rf "$W/anchors/results"
  ANCHORS=$W/anchors
  "$ANCHORS/build.sh" >"$OUT/anchors-build.log" 2>&1 || { echo "anchors build failed ($OUT/anchors-build.log)"; exit 1; }
fi
fact anchors "$ANCHORS (cpp-async: bin/cpp_server, cpp-callback: bin/cpp_cb_server, go: GOMAXPROCS=1 bin/goserver, go-pg: GOMAXPROCS=1 bin/goserver-pg DSN?pool_max_conns=8)"

# ---- servers ------------------------------------------------------------------------
pin=(taskset -c "$SERVER_CPU")
start_anchor() { # name cmd...
  local name=$1
  shift
  PORT[$name]=$(zmb_free_port)
  (cd "$ANCHORS" && exec "${pin[@]}" "$@" "${PORT[$name]}" ${ANCHOR_TAIL:+"$ANCHOR_TAIL"} >"$OUT/$name.server.log" 2>&1) &
  SPID[$name]=$!
  zmb_wait_port "${PORT[$name]}" "${SPID[$name]}" 30 || { log "$name did not come up"; tail -3 "$OUT/$name.server.log"; stop_srv "$name"; return 1; }
}
start_zm() { # name store ENV=VAL...
  local name=$1 store=$2
  shift 2
  PORT[$name]=$(zmb_free_port)
  ZMB_SIM_URL='' zmb_start_server "$BIN" "$store" "${PORT[$name]}" "$SERVER_CPU" "$OUT/$name.server.log" "$@"
  SPID[$name]=$ZMB_SRV_PID
  zmb_wait_health "$BENCH" "${PORT[$name]}" "${SPID[$name]}" 60 ||
    { log "$name did not become SERVING"; tail -5 "$OUT/$name.server.log"; stop_srv "$name"; return 1; }
}

# Seeded leases run 1 h (no identity can lapse or be collected during the
# run); with the default 5 min TTL a refresh would then never raise the
# durable lease and no refresh would ever reach the store. A 2 h TTL makes
# every refresh raise it by ~1 h, so the first refresh of every key in the
# run, and every later one once the flush granule (min(TTL/10, 15 s)) has
# passed, is written by the lease flush: the store write path is measured.
ZM_ENV=(SERVICE_IDENTITY_LEASE_TTL=2h)
fact zm_env "every zm server: ${ZM_ENV[*]} with leases seeded 1 h out, so every refresh raises the durable lease and is flushed (see the script); the rest default"
log "zm (SQLite): schema + seed $KEYS keys"
store=$W/zm.db
zmb_schema "$store" "$BIN" && zmb_seed "$store" "$KEYS" 3600 || { echo "seeding SQLite failed"; exit 1; }
start_zm zm "$store" "${ZM_ENV[@]}"
fact zm_cmd "taskset -c $SERVER_CPU env STORE_PATH=store.db GRPC_ADDRESS=127.0.0.1:PORT ZITI_CONTROLLER_URL= SERVICE_IDENTITY_LEASE_TTL=2h ziti-management   # defaults: STORE_SYNC=full, LEASE_FLUSH_INTERVAL=1s; store: --migrate-only + bench/lib.sh zmb_seed"

MEM=(zm cpp-async cpp-callback go)
if [[ -n ${BASELINE_BIN:-} && -x ${BASELINE_BIN:-} ]]; then
  log "zm-prev (baseline $BASELINE_BIN): schema + seed"
  pstore=$W/zm-prev.db
  if zmb_schema "$pstore" "$BASELINE_BIN" && zmb_seed "$pstore" "$KEYS" 3600; then
    BIN=$BASELINE_BIN start_zm zm-prev "$pstore" "${ZM_ENV[@]}" && MEM+=(zm-prev)
    fact baseline "zm-prev = $BASELINE_BIN (${BASELINE_REV:-revision not given: set BASELINE_REV}), the same TTL, its default STORE_SYNC=full, its own --migrate-only + zmb_seed"
  fi
fi

log "anchors: cpp-async, cpp-callback, go"
start_anchor cpp-async ./bin/cpp_server
start_anchor cpp-callback ./bin/cpp_cb_server
start_anchor go env GOMAXPROCS=1 ./bin/goserver

log "PostgreSQL for zm-pg (pinned to CPU $SERVER_CPU)"
if zmb_pg_start "$W" "$SERVER_CPU" zm; then
  PG_ZM_DIR=$ZMB_PG_DIR; PG_ZM_URL=$ZMB_PG_URL; PG_ZM_PORT=$ZMB_PG_PORT; PG_ZM_PID=$ZMB_PG_PID
  zmb_pg_schema zm "$BIN"
  fact zm_pg_schema "$ZMB_PG_SCHEMA_HOW"
  if zmb_pg_seed zm "$KEYS" 3600 >/dev/null; then
    start_zm zm-pg "$W/unused-a.db" DATABASE_URL="$PG_ZM_URL" "${ZM_ENV[@]}"
  fi
  fact zm_pg_cmd "taskset -c $SERVER_CPU env DATABASE_URL=postgres://zm@127.0.0.1:PORT/zm GRPC_ADDRESS=127.0.0.1:PORT ZITI_CONTROLLER_URL= SERVICE_IDENTITY_LEASE_TTL=2h ziti-management   # PostgreSQL $(basename "$(dirname "$(zmb_pg_bin)")") started by bench/lib.sh zmb_pg_start (initdb, defaults: fsync=on, synchronous_commit=on), pinned to CPU $SERVER_CPU; second replica: the same with another port"
else
  log "PostgreSQL for zm-pg did not start"
fi

log "PostgreSQL for go-pg (pinned to CPU $SERVER_CPU), seeded as the anchors' run.sh does"
if zmb_pg_start "$W" "$SERVER_CPU" zitiperf; then
  PG_GO_DIR=$ZMB_PG_DIR; PG_GO_PID=$ZMB_PG_PID
  zmb_pg_psql zitiperf <<'SQL' >/dev/null
CREATE TABLE service_identities (
  ziti_identity_id TEXT PRIMARY KEY,
  service_type     INTEGER NOT NULL,
  lease_expires_at TIMESTAMPTZ NOT NULL,
  created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO service_identities (ziti_identity_id, service_type, lease_expires_at)
  SELECT 'zid-' || lpad(i::text, 6, '0'), 3, now() FROM generate_series(0, 99999) AS i;
VACUUM ANALYZE service_identities;
SQL
  ANCHOR_TAIL="$ZMB_PG_URL?pool_max_conns=8" start_anchor go-pg env GOMAXPROCS=1 ./bin/goserver-pg
else
  log "PostgreSQL for go-pg did not start"
fi
sleep 1

# ---- measurement -----------------------------------------------------------------------------
RUNS=$OUT/runs.tsv
printf 'group\tserver\trpc\tconns\tstreams\tround\trps\tlat_mean_us\tlat_p50_us\tlat_p99_us\tlat_max_us\terrors\tsrv_cpu_pct\tcore_busy_pct\tcli_cpu_pct\tsteal_pct\tpg_cpu_pct\n' >"$RUNS"
core_stat() { # "busy steal total" jiffies of one CPU
  awk -v c="cpu$1" '$1==c{t=0; for (i=2; i<=9; i++) t+=$i; print $2+$3+$4+$7+$8, $9, t}' /proc/stat
}
# pg_snap POSTMASTER_PID: "pid ticks" (utime+stime) of the postmaster and
# each of its children; two snapshots give the cluster's CPU per process
# (a child that exits in between, e.g. an autovacuum worker, is not counted)
pg_snap() {
  [[ -n $1 ]] || return 0
  /usr/bin/python3 - "$1" <<'PY'
import os, sys
p = sys.argv[1]
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        st = open(f"/proc/{d}/stat").read()
    except OSError:
        continue  # exited meanwhile
    f = st[st.rindex(")") + 2:].split()
    if f[1] == p or d == p:
        print(d, int(f[11]) + int(f[12]))
PY
}
jget() { /usr/bin/python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null; }

# one_case GROUP LABEL RPC C M TARGETS...: TARGETS = server names; with one
# target one zm-bench -c C -m M; with several, one zm-bench per target, each
# -c C/n -m M, all at once (totals summed). Appends to runs.tsv.
one_case() {
  local group=$1 label=$2 rpc=$3 c=$4 m=$5 round=$6
  shift 6
  local targets=("$@") n=$# t i pids=() s0=0 s1=0 k0 k1 cc scen uniq
  cc=$((c / n))
  for t in "${targets[@]}"; do [[ -n ${SPID[$t]:-} ]] || return 0; done
  uniq=$(printf '%s\n' "${targets[@]}" | sort -u)
  case $rpc in resolve*) scen=resolve ;; health) scen=health ;; *) scen=extend ;; esac
  local dur=$DUR
  [[ $rpc == *-steady ]] && dur=$STEADY_DUR
  for t in $uniq; do s0=$((s0 + $(zmb_ticks "${SPID[$t]}"))); done
  local pgp=
  case ${targets[0]} in zm-pg*) pgp=$PG_ZM_PID ;; go-pg) pgp=$PG_GO_PID ;; esac
  local base=$OUT/${label}_${rpc}_c${c}m${m}_r$round
  pg_snap "$pgp" >"$base.pg0"
  k0=$(core_stat "$SERVER_CPU")
  TIMEFORMAT='%R %U %S'
  for ((i = 0; i < n; i++)); do
    t=${targets[$i]}
    { time taskset -c "$CLIENT_CPU" timeout "$CASE_TIMEOUT" "$BENCH" --target "127.0.0.1:${PORT[$t]}" \
        --scenario "$scen" -c "$cc" -m "$m" -D "$dur" --warmup "$WARM" --keys "$KEYS" --seed $((round * 10 + i + 1)) \
        --timeout-ms 10000 --allow-errors --show-errors 3 --json "$base.$i.json" >"$base.$i.txt" 2>&1; } 2>"$base.$i.time" &
    pids+=($!)
  done
  for t in "${pids[@]}"; do wait "$t"; done
  k1=$(core_stat "$SERVER_CPU")
  pg_snap "$pgp" >"$base.pg1"
  for t in $uniq; do s1=$((s1 + $(zmb_ticks "${SPID[$t]}"))); done
  /usr/bin/python3 - "$base" "$n" "$dur" "$WARM" "$((s1 - s0))" "$CLK_TCK" "$k0" "$k1" >"$base.row" <<'PY'
import json, sys
base, n, dur, warm, ticks, hz = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
k0, k1 = [list(map(int, a.split())) for a in sys.argv[7:9]]
def snap(f):
    try:
        return {a: int(b) for a, b in (l.split() for l in open(f) if l.strip())}
    except FileNotFoundError:
        return {}
p0, p1 = snap(base + ".pg0"), snap(base + ".pg1")
pgt = sum(t - p0.get(pid, 0) for pid, t in p1.items())
rps = cnt = msum = p50 = p99 = mx = err = 0.0
cli = wall = 0.0
for i in range(n):
    try:
        j = json.load(open(f"{base}.{i}.json"))
    except Exception:
        print("0\t0\t0\t0\t0\t-1\t0\t0\t0\t0\t0"); sys.exit(0)
    l = j["latency_us"]
    rps += j["rps"]; c = l["count"]; cnt += c; msum += l["mean"] * c
    p50 = max(p50, l["p50"]); p99 = max(p99, l["p99"]); mx = max(mx, l["max"])
    err += j["errors"]["total"]
    real, user, sys_ = map(float, open(f"{base}.{i}.time").read().split())
    cli += user + sys_; wall = max(wall, real)
d = k1[2] - k0[2] or 1
print("\t".join(str(x) for x in (f"{rps:.0f}", f"{msum / cnt if cnt else 0:.1f}", f"{p50:.1f}", f"{p99:.1f}", f"{mx:.1f}", int(err),
      f"{100 * ticks / hz / wall:.0f}", f"{100 * (k1[0] - k0[0]) / d:.0f}", f"{100 * cli / wall:.0f}", f"{100 * (k1[1] - k0[1]) / d:.0f}", f"{100 * pgt / hz / wall:.0f}")))
PY
  local row
  row=$(cat "$base.row")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$group" "$label" "$rpc" "$c" "$m" "$round" "$row" >>"$RUNS"
  read -r rps mean _ p99 _ err srv core cli _ pgc <<<"$row"
  printf '    %-16s %-13s %3sx%-3s %9s req/s  mean %8s us  p99 %9s us  err %s  srv %s%%  pg %s%%  core%s %s%%  cli %s%%\n' \
    "$label" "$rpc" "$c" "$m" "$rps" "$mean" "$p99" "$err" "$srv" "$pgc" "$SERVER_CPU" "$core" "$cli"
}

# a case over several servers, order rotated per round
rotate_case() { # group rpc c m round servers...
  local group=$1 rpc=$2 c=$3 m=$4 round=$5
  shift 5
  local s=("$@") n=$# k
  for ((k = 0; k < n; k++)); do
    local name=${s[$(((k + round - 1) % n))]}
    one_case "$group" "$name" "$rpc" "$c" "$m" "$round" "$name"
    [[ $name == zm-pg* ]] && sleep 1.5   # let the last lease flush land before the next case
  done
}

start_replica_b() {
  [[ -n ${PG_ZM_URL:-} && -n ${SPID[zm-pg]:-} ]] || return 1
  start_zm zm-pg-b "$W/unused-b.db" DATABASE_URL="$PG_ZM_URL" "${ZM_ENV[@]}"
}

log "measuring: $ROUNDS rounds, -D $DUR --warmup $WARM per case"
for round in $(seq "$ROUNDS"); do
  log "-- round $round/$ROUNDS"
  rotate_case a extend 32 32 "$round" "${MEM[@]}"
  rotate_case a extend 1 1 "$round" "${MEM[@]}"
  rotate_case b extend 32 32 "$round" zm-pg go-pg
  rotate_case b extend 1 1 "$round" zm-pg go-pg
  # steady state: a window as long as the flush granule (15 s), so it holds
  # one write of every key, as continuous load does, not a cold start
  rotate_case a extend-steady 32 32 "$round" zm
  rotate_case b extend-steady 32 32 "$round" zm-pg
  # c: one replica vs two, the same two zm-bench processes (16x32 each), over
  # the steady-state window (one flush granule: each replica writes each key
  # it refreshed once, as under continuous load; a short window would compare
  # flush timing, not replicas); order alternated per round. The second
  # replica starts fresh each round (it loads the durable leases) and idles
  # during the one-replica case.
  if start_replica_b; then
    if ((round % 2)); then rorder=(1 2); else rorder=(2 1); fi
    for r in "${rorder[@]}"; do
      if ((r == 1)); then
        one_case c zm-pg-1rep extend-steady 32 32 "$round" zm-pg zm-pg
      else
        one_case c zm-pg-2rep extend-steady 32 32 "$round" zm-pg zm-pg-b
      fi
      sleep 1.5
    done
    stop_srv zm-pg-b
    cp "$OUT/zm-pg-b.server.log" "$OUT/zm-pg-b.server.r$round.log"
  else
    one_case c zm-pg-1rep extend-steady 32 32 "$round" zm-pg zm-pg
  fi
  rotate_case d resolve 32 32 "$round" "${MEM[@]}" zm-pg
  rotate_case d resolve 1 1 "$round" "${MEM[@]}"
  # the floor of a 1x1 round trip through this client, kernel and h2 stack:
  # grpc.health.v1 Check (no store, no index)
  rotate_case d health 1 1 "$round" zm
done

# server-side facts after the load
for n in zm zm-pg zm-prev; do
  [[ -n ${SPID[$n]:-} ]] && fact "rss_$n" "$(awk '{printf "%.1f MiB", $1/1024}' <<<"$(zmb_vm "${SPID[$n]}" VmHWM)") peak RSS"
done
if [[ -n $PG_ZM_DIR ]]; then
  # the seed gave every row the same lease (one transaction's now() + 1 h)
  fact zm_pg_rows "$(ZMB_PG_PORT=$PG_ZM_PORT zmb_pg_psql zm -At -c \
    "SELECT count(*) || ' service_identities rows, ' || count(*) FILTER (WHERE lease_expires_at > (SELECT min(created_at) FROM service_identities) + interval '3600 seconds') || ' of them with a lease written by the runs (flushed refreshes), while the servers still ran' FROM service_identities" 2>&1)"
fi
for n in "${!SPID[@]}"; do stop_srv "$n"; done
# the servers' own counters, logged at shutdown (memory-first refreshes,
# durable ones, lease flushes and the rows they wrote)
for n in zm zm-prev zm-pg; do
  [[ -f $OUT/$n.server.log ]] && fact "stats_$n" "$(grep -o 'stats: enroll.*' "$OUT/$n.server.log" | tail -1 | sed 's/^stats: //')"
done
for f in "$OUT"/zm-pg-b.server.r*.log; do
  [[ -f $f ]] && fact "stats_zm-pg-b_$(basename "$f" .log | sed 's/.*\.//')" "$(grep -o 'stats: enroll.*' "$f" | tail -1 | sed 's/^stats: //')"
done
zmb_pg_stop "$PG_ZM_DIR"; PG_ZM_DIR=
zmb_pg_stop "$PG_GO_DIR"; PG_GO_DIR=
total=$(($(date +%s) - T_START))
fact total "${total} s"
log "rendering into $RESULTS_MD"
/usr/bin/python3 "$here/results_lifecycle.py" "$OUT" "$RESULTS_MD" || { echo "rendering failed"; exit 1; }
log "done (${total} s); raw outputs in $OUT"
