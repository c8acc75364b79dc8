#!/usr/bin/env bash
# bench/tls-handshake-isolation.sh [BUILD_DIR...] - whether new mTLS clients
# delay the calls of the connected ones. For each build: the service
# (bench/anchor-server.sh, 10,000 preloaded keys, mTLS with a verified client
# certificate and a policy admitting the client to ResolveIdentity, the
# loop-lag probe on, pinned with its threads to SERVER_CPU) serves
#   - ResolveIdentity from one established mTLS connection, 1 x 1 closed
#     loop (zm-tlsbench at SCHED_FIFO 1 where chrt can, on CLIENT_CPU): the
#     latency a connected client sees;
#   - alongside, as long as it runs, a storm of new clients: zm-tlsbench
#     runs of 32 connections, each a full handshake (no resumption) and one
#     call, back to back on CLIENT_CPU;
# first the measuring client alone (baseline), then with the storm.
# Reports per build: the measuring client's p50 / p99 / max, alone and during
# the storm; full handshakes made; the probe's worst loop lag and busiest
# loop iteration (the loop's own CPU) over the storm; and where the
# handshake steps ran (zm_grpc_tls_handshake_steps_total: the crypto threads
# or the loop). Builds are measured one after the other: compare the
# figures of one run only (the host drifts).
# Env: CALLS (the measuring client's calls per window, 100,000), SERVER_CPU
# (0), CLIENT_CPU (1), OUT (results directory).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
(($# > 0)) || set -- "$ZMB_REPO/build"
CALLS=${CALLS:-100000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT=${OUT:-$(mktemp -d /tmp/zm-tls-hs.XXXXXX)}
mkdir -p "$OUT"
T=$(mktemp -d)
pid=
storm=
trap 'zmb_stop "$pid" || true; [[ -n $storm ]] && kill "$storm" 2>/dev/null; rm -rf "$T"' EXIT
cd "$T"
zmb_mtls_pki
# ResolveIdentityRequest{ziti_identity_id: "zid-004242"}, a preloaded key
printf '\000\000\000\000\014\012\012zid-004242' >req.bin
P=/agynio.api.ziti_management.v1.ZitiManagementService/ResolveIdentity
RT=
if chrt -f 1 true 2>/dev/null; then RT="chrt -f 1"; fi

for build in "$@"; do
  BIN=$build/ziti-management
  TB=$build/bench/zm-tlsbench
  [[ -x $BIN && -x $TB ]] || { echo "missing $BIN or $TB" >&2; exit 2; }
  TLS=(--tls --cert client.pem --key client.key --ca ca.pem)
  port=$(zmb_free_port)
  mport=$(zmb_free_port)
  log=$OUT/server-$(basename "$build").log
  env GRPC_TLS_CERT_FILE=server.pem GRPC_TLS_KEY_FILE=server.key GRPC_TLS_CLIENT_CA_FILE=ca.pem \
    GRPC_AUTHZ_POLICY_FILE=policy.json LOOP_LAG_PROBE=1 LOG_LEVEL=info AUDIT_LOG=off \
    METRICS_ADDRESS=127.0.0.1:$mport ZM_BIN="$BIN" ZM_BENCH_TMP="$T" ZM_SEED_KEYS=10000 \
    taskset -c "$SERVER_CPU" "$here/anchor-server.sh" "$port" >"$log" 2>&1 &
  pid=$!
  zmb_wait_port "$port" "$pid" 60 || { echo "server did not come up"; tail "$log"; exit 1; }
  metric() { curl -sf "http://127.0.0.1:$mport/metrics" | awk -v k="$1" '$1==k{print $2}'; }
  # measure FILE: CALLS calls of the measuring client
  measure() {
    $RT taskset -c "$CLIENT_CPU" timeout 300 "$TB" -c 1 -m 1 -n "$CALLS" -d req.bin -p $P \
      "${TLS[@]}" 127.0.0.1 "$port" >"$1" 2>&1 || true
  }
  taskset -c "$CLIENT_CPU" "$TB" -c 1 -m 1 -n 2000 -d req.bin -p $P "${TLS[@]}" 127.0.0.1 "$port" >"$OUT/warm.txt" 2>&1
  measure "$OUT/alone-$(basename "$build").txt"
  hw0=$(metric 'zm_grpc_tls_handshake_steps_total{where="workers"}')
  hl0=$(metric 'zm_grpc_tls_handshake_steps_total{where="loop"}')
  l0=$(wc -l <"$log")
  rm -f stop
  (
    n=0
    while [[ ! -e stop ]]; do
      taskset -c "$CLIENT_CPU" "$TB" -c 32 -m 1 -n 32 -d req.bin -p $P "${TLS[@]}" --no-resume \
        127.0.0.1 "$port" >/dev/null 2>&1 && n=$((n + 32))
    done
    echo "$n" >"$OUT/storm-n"
  ) &
  storm=$!
  measure "$OUT/storm-$(basename "$build").txt"
  touch stop
  wait "$storm" || true
  storm=
  sleep 1.1 # the probe's line for the last second
  l1=$(wc -l <"$log")
  hw1=$(metric 'zm_grpc_tls_handshake_steps_total{where="workers"}')
  hl1=$(metric 'zm_grpc_tls_handshake_steps_total{where="loop"}')
  win=$(sed -n "$((l0 + 2)),${l1}p" "$log")
  lag=$(grep -o 'loop lag: max [0-9]* ms' <<<"$win" | awk '{print $4}' | sort -n | tail -1)
  busy=$(grep -o 'busiest iteration [0-9]* us' <<<"$win" | awk '{print $3}' | sort -n | tail -1)
  lat() { sed -n 's/.*p50_us=\([0-9]*\) p90_us=[0-9]* p99_us=\([0-9]*\) max_us=\([0-9]*\).*/p50 \1 us, p99 \2 us, max \3 us/p' "$1"; }
  echo "== $build ($(git -C "$build" rev-parse --short HEAD 2>/dev/null || echo ?))"
  echo "  1x1 ResolveIdentity over one mTLS connection, alone: $(lat "$OUT/alone-$(basename "$build").txt")"
  secs=$(sed -n 's/.* secs=\([0-9.]*\).*/\1/p' "$OUT/storm-$(basename "$build").txt")
  echo "  the same during a storm of $(cat "$OUT/storm-n") full mTLS handshakes in ${secs:-?} s: $(lat "$OUT/storm-$(basename "$build").txt")"
  echo "  over the storm: loop lag worst ${lag:-?} ms, busiest loop iteration ${busy:-?} us; handshake steps on the crypto threads $(awk -v a="${hw0:-0}" -v b="${hw1:-0}" 'BEGIN{print b - a}'), on the loop $(awk -v a="${hl0:-0}" -v b="${hl1:-0}" 'BEGIN{print b - a}')"
  zmb_stop "$pid" || true
  pid=
done
echo "raw: $OUT"
