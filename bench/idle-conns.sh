#!/usr/bin/env bash
# bench/idle-conns.sh - server memory per idle HTTP/2 connection.
#
# Starts ziti-management (empty SQLite store, no controller) on a free port of
# 127.0.0.1, records its RssAnon and VmRSS, opens N connections (HTTP/2
# handshake + one grpc.health.v1.Health/Check each), lets them sit idle WAIT
# seconds, records again and prints
#   (after - before) / N
# per connection, and where the growth is (heap / other anonymous mappings,
# from smaps). Everything it starts is stopped by PID; nothing else is.
#
#   bench/idle-conns.sh [BUILD_DIR]          (default: build)
#   N=10000 WAIT=3 MODE=h2c bench/idle-conns.sh /tmp/b-rel
#
# MODE=h2c (default): zm-bench --idle-conns. MODE=tls: the listener with a
# throwaway self-signed certificate (openssl), zm-tlsbench --tls --hold (one
# full handshake, the others resume with its ticket; no client certificate).
# An idle connection is trimmed 1 to 2 s after its last activity
# (ZM_CONN_TRIM_MS and the 1 s housekeeping tick), at most ~5 ms of trimming
# per tick: after WAIT the script samples RssAnon every second until it
# stops falling (at most SETTLE_MAX seconds) and reports how long that took.
# BUILD_DIR holds ziti-management, bench/zm-bench and bench/zm-tlsbench (a
# Release build is what the numbers in RESULTS.md are measured with).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
BIN=${BIN:-$build/ziti-management}
BENCH=${BENCH:-$build/bench/zm-bench}
TLSBENCH=${TLSBENCH:-$build/bench/zm-tlsbench}
MODE=${MODE:-h2c}
N=${N:-10000}
WAIT=${WAIT:-2}
SETTLE_MAX=${SETTLE_MAX:-120}

[[ -x $BIN ]] || { echo "idle-conns: no server at $BIN" >&2; exit 2; }
case $MODE in
h2c) [[ -x $BENCH ]] || { echo "idle-conns: no zm-bench at $BENCH" >&2; exit 2; } ;;
tls) [[ -x $TLSBENCH ]] || { echo "idle-conns: no zm-tlsbench at $TLSBENCH" >&2; exit 2; } ;;
*) echo "idle-conns: MODE is h2c or tls" >&2; exit 2 ;;
esac
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
srv_pid='' bench_pid=''
cleanup() {
  local rc=$? pid
  for pid in $bench_pid $srv_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

kb() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }
# Rss (kB) of the heap and of the other anonymous mappings
heap_anon() {
  awk '/^[0-9a-f]+-[0-9a-f]+ /{ n = $6 } /^Rss:/{ if (n == "[heap]") h += $2; else if (n == "") a += $2 }
       END { print h + 0, a + 0 }' "/proc/$1/smaps"
}

tls_env=()
if [[ $MODE == tls ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/key.pem" \
    -out "$work/cert.pem" -subj /CN=localhost -days 1 -addext "subjectAltName=IP:127.0.0.1" 2>/dev/null
  tls_env=(GRPC_TLS_CERT_FILE="$work/cert.pem" GRPC_TLS_KEY_FILE="$work/key.pem")
  printf '\000\000\000\000\000' >"$work/health.bin" # empty HealthCheckRequest, framed
fi

port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
env STORE_PATH="$work/store.db" GRPC_ADDRESS="127.0.0.1:$port" ZITI_CONTROLLER_URL= ZITI_LOG_LEVEL=warn \
  GRPC_MAX_CONNECTIONS=$((N + 64)) "${tls_env[@]}" "$BIN" >"$work/server.log" 2>&1 &
srv_pid=$!

# up when it accepts connections (bounded: 30 s)
up=0
for ((i = 0; i < 300; i++)); do
  kill -0 "$srv_pid" 2>/dev/null || break
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
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
read -r heap0 other0 < <(heap_anon "$srv_pid")

# hold long enough for the wait and the measurement; zm-bench ends itself
hold=$((WAIT + SETTLE_MAX + 30))
: >"$work/bench.out" # before the client starts: the READY poll below reads it at once
if [[ $MODE == tls ]]; then
  "$TLSBENCH" --tls --ca "$work/cert.pem" -c "$N" -m 1 -n 1 -d "$work/health.bin" -p /grpc.health.v1.Health/Check \
    --hold "$hold" 127.0.0.1 "$port" >"$work/bench.out" 2>&1 &
else
  "$BENCH" --target "127.0.0.1:$port" --idle-conns "$N" --hold "$hold" --timeout-ms 20000 >"$work/bench.out" 2>&1 &
fi
bench_pid=$!
ready=
for ((i = 0; i < 3000; i++)); do # bounded: 300 s
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
# settled: two samples in a row not lower than the best so far
settle=0 best=$(kb "$srv_pid" RssAnon) flat=0
while ((flat < 2 && settle < SETTLE_MAX)); do
  sleep 1
  settle=$((settle + 1))
  cur=$(kb "$srv_pid" RssAnon)
  if ((cur < best)); then best=$cur flat=0; else flat=$((flat + 1)); fi
done
anon1=$(kb "$srv_pid" RssAnon)
rss1=$(kb "$srv_pid" VmRSS)
read -r heap1 other1 < <(heap_anon "$srv_pid")
open=$(find "/proc/$srv_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)

awk -v n="$N" -v r="$ready" -v a0="$anon0" -v a1="$anon1" -v v0="$rss0" -v v1="$rss1" -v fds="$open" \
  -v h0="$heap0" -v h1="$heap1" -v o0="$other0" -v o1="$other1" -v mode="$MODE" -v w="$WAIT" -v st="$settle" 'BEGIN {
  printf "%s connections: %d requested, %d ready (health answered), server fds open: %d\n", mode, n, r, fds
  printf "measured %d s after READY (%d s wait, then RssAnon stopped falling)\n", w + st, w
  printf "RssAnon: %.1f MiB -> %.1f MiB\n", a0 / 1024, a1 / 1024
  printf "VmRSS:   %.1f MiB -> %.1f MiB\n", v0 / 1024, v1 / 1024
  if (r > 0) {
    printf "per idle connection: %.2f KiB RssAnon, %.2f KiB VmRSS ((after - before) / %d)\n", (a1 - a0) / r, (v1 - v0) / r, r
    printf "  of which heap %.2f KiB, other anonymous mappings %.2f KiB\n", (h1 - h0) / r, (o1 - o0) / r
  }
}'
[[ $ready == "$N" ]] || { echo "idle-conns: only $ready of $N connections ready" >&2; exit 1; }
