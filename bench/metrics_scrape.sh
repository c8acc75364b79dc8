#!/usr/bin/env bash
# bench/metrics_scrape.sh [BUILD_DIR] - does scraping /metrics disturb the hot
# path? ResolveIdentity under h2load (server pinned to CPU 0, load on CPU 1),
# three rounds each: without a scraper, and with one scraping every second
# (RATE; Prometheus's usual interval is 15 s). Also the server's own CPU time
# per scrape, measured over 2000 keep-alive scrapes without load.
# Every process is tracked by PID; nothing is killed by name.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BUILD=${1:-$ZMB_REPO/build}
BIN=$BUILD/ziti-management
DUR=${DUR:-10s}
ROUNDS=${ROUNDS:-3}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

zmb_schema "$tmp/zm.db" "$BIN"
zmb_seed "$tmp/zm.db" 10000 >/dev/null
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mport=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
STORE_PATH=$tmp/zm.db GRPC_ADDRESS=127.0.0.1:$port METRICS_ADDRESS=127.0.0.1:$mport \
  LOG_LEVEL=warn STORE_SYNC=normal taskset -c 0 "$BIN" 2>"$tmp/server.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf "127.0.0.1:$mport/readyz" >/dev/null && break; sleep 0.1; done
# ResolveIdentityRequest{ziti_identity_id:"zid-000042"} framed for gRPC
python3 -c 'import sys;m=b"\x0a\x0azid-000042";sys.stdout.buffer.write(b"\x00"+len(m).to_bytes(4,"big")+m)' >"$tmp/body"
run() {
  taskset -c 1 h2load -c 32 -m 32 -D "$DUR" -d "$tmp/body" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$port/agynio.api.ziti_management.v1.ZitiManagementService/ResolveIdentity" \
    | awk '/^finished in/ {rps=$4} /^time for request:/ {mean=$6} END {printf "%s req/s, mean %s\n", rps, mean}'
}
# Server CPU per scrape: 2000 keep-alive scrapes, the server's own CPU time
# (utime + stime from /proc) before and after.
spid=${pids[0]}
cpu() { awk '{print $14 + $15}' "/proc/$spid/stat"; }
c0=$(cpu)
python3 - "$mport" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(2000):
    c.request("GET", "/metrics"); c.getresponse().read()
PY
c1=$(cpu)
tck=$(getconf CLK_TCK)
echo "server CPU per scrape: $(( (c1 - c0) * 1000000 / tck / 2000 )) us (2000 scrapes, $(curl -s "127.0.0.1:$mport/metrics" | wc -c) bytes each)"
# Throughput with a Prometheus-like scraper (RATE scrapes/s, default 1,
# far more often than the usual 15 s) against none.
RATE=${RATE:-1}
scraper() {
  python3 - "$mport" "${DUR%s}" "$RATE" <<'PY'
import http.client, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    c.request("GET", "/metrics"); c.getresponse().read(); n += 1
    time.sleep(1.0 / float(sys.argv[3]))
print(n)
PY
}
for r in $(seq "$ROUNDS"); do
  echo "round $r without scraper: $(run)"
  taskset -c 1 bash -c "$(declare -f scraper); mport=$mport DUR=$DUR RATE=$RATE scraper" >"$tmp/scrapes" &
  sp=$!
  pids+=($sp)
  res=$(run)
  wait "$sp" || true
  echo "round $r with scraper:    $res ($(cat "$tmp/scrapes") scrapes at ${RATE}/s)"
done
