#!/usr/bin/env bash
# bench/idle-conns.sh - server memory per idle HTTP/2 connection.
#
# Starts ziti-management (empty SQLite store, no controller) on a free port of
# 127.0.0.1, records its RssAnon and VmRSS, opens N h2c connections with
# zm-bench --idle-conns (HTTP/2 handshake + one grpc.health.v1.Health/Check
# each), lets them sit idle WAIT seconds, records again and prints
#   (after - before) / N
# per connection. Everything it starts is stopped by PID; nothing else is.
#
#   bench/idle-conns.sh [BUILD_DIR]          (default: build)
#   N=10000 WAIT=2 bench/idle-conns.sh /tmp/b-rel
#
# BUILD_DIR holds ziti-management and bench/zm-bench (a Release build is what
# the numbers in RESULTS.md are measured with).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
BIN=${BIN:-$build/ziti-management}
BENCH=${BENCH:-$build/bench/zm-bench}
N=${N:-10000}
WAIT=${WAIT:-3}

[[ -x $BIN ]] || { echo "idle-conns: no server at $BIN" >&2; exit 2; }
[[ -x $BENCH ]] || { echo "idle-conns: no zm-bench at $BENCH" >&2; exit 2; }
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 60000)); then
  echo "idle-conns: N must be 1..60000" >&2
  exit 2
fi

# one descriptor per connection on each side, plus the process's own
need=$((N + 256))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited ]] && (($(ulimit -n) < need)); then
  echo "idle-conns: ulimit -n is $(ulimit -n), need $need (raise the hard limit)" >&2
  exit 2
fi

work=$(mktemp -d /tmp/zm-idle.XXXXXX)
srv_pid= bench_pid=
cleanup() {
  [[ -n $bench_pid ]] && kill "$bench_pid" 2>/dev/null && wait "$bench_pid" 2>/dev/null
  [[ -n $srv_pid ]] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

kb() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }

port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
env STORE_PATH="$work/store.db" GRPC_ADDRESS="127.0.0.1:$port" ZITI_CONTROLLER_URL= ZITI_LOG_LEVEL=warn \
  GRPC_MAX_CONNECTIONS=$((N + 64)) "$BIN" >"$work/server.log" 2>&1 &
srv_pid=$!

# up when it answers a health call (bounded: 30 s)
up=0
for ((i = 0; i < 300; i++)); do
  kill -0 "$srv_pid" 2>/dev/null || break
  if "$BENCH" --target "127.0.0.1:$port" --idle-conns 1 --hold 0 --timeout-ms 2000 2>/dev/null | grep -q '^READY 1$'; then
    up=1
    break
  fi
  sleep 0.1
done
if ((!up)); then
  echo "idle-conns: server did not come up:" >&2
  tail -5 "$work/server.log" >&2
  exit 1
fi
sleep 1

anon0=$(kb "$srv_pid" RssAnon)
rss0=$(kb "$srv_pid" VmRSS)

# hold long enough for the wait and the measurement; zm-bench ends itself
hold=$((WAIT + 30))
"$BENCH" --target "127.0.0.1:$port" --idle-conns "$N" --hold "$hold" --timeout-ms 20000 >"$work/bench.out" 2>&1 &
bench_pid=$!
ready=
for ((i = 0; i < 1200; i++)); do # bounded: 120 s
  ready=$(sed -n 's/^READY \([0-9]*\)$/\1/p' "$work/bench.out")
  [[ -n $ready ]] && break
  kill -0 "$bench_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z $ready ]]; then
  echo "idle-conns: zm-bench did not report READY:" >&2
  tail -5 "$work/bench.out" >&2
  exit 1
fi
sleep "$WAIT"
[[ -n ${SMAPS:-} ]] && $SMAPS "$srv_pid" >&2
anon1=$(kb "$srv_pid" RssAnon)
rss1=$(kb "$srv_pid" VmRSS)
open=$(find "/proc/$srv_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)

awk -v n="$N" -v r="$ready" -v a0="$anon0" -v a1="$anon1" -v v0="$rss0" -v v1="$rss1" -v fds="$open" 'BEGIN {
  printf "connections: %d requested, %d ready (health answered), server fds open: %d\n", n, r, fds
  printf "RssAnon: %.1f MiB -> %.1f MiB\n", a0 / 1024, a1 / 1024
  printf "VmRSS:   %.1f MiB -> %.1f MiB\n", v0 / 1024, v1 / 1024
  if (r > 0) {
    printf "per idle connection: %.2f KiB RssAnon, %.2f KiB VmRSS ((after - before) / %d)\n", (a1 - a0) / r, (v1 - v0) / r, r
  }
}'
[[ $ready == "$N" ]] || { echo "idle-conns: only $ready of $N connections ready" >&2; exit 1; }
