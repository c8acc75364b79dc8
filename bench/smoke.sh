#!/usr/bin/env bash
# bench/smoke.sh - CI smoke of the load harness (seconds, not a speed test):
# starts the controller simulator and the server on a seeded store (100,000
# identities), runs zm-bench for a few seconds per hot scenario and fails on
# any error (a wrong answer, an unexpected status, a transport error).
# Env: ZM_BIN, ZM_BENCH (binaries; default build-bench/ then build/),
#      SMOKE_SECONDS (default 3).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

pick() { # pick VAR name: first existing build output
  local b
  for b in "$ZMB_REPO/build-bench/$2" "$ZMB_REPO/build/$2" "$ZMB_REPO/build-bench/bench/$2" "$ZMB_REPO/build/bench/$2"; do
    [[ -x $b ]] && { printf '%s' "$b"; return; }
  done
}
BIN=${ZM_BIN:-$(pick x ziti-management)}
BENCH=${ZM_BENCH:-$(pick x zm-bench)}
SECS=${SMOKE_SECONDS:-3}
[[ -x $BIN ]] || { echo "smoke: server binary not found (ZM_BIN)"; exit 1; }
[[ -x $BENCH ]] || { echo "smoke: zm-bench not found (ZM_BENCH)"; exit 1; }

W=$(mktemp -d "${TMPDIR:-/tmp}/zm-smoke.XXXXXX")
ZMB_SIM_PID=; ZMB_SRV_PID=
cleanup() {
  zmb_stop "$ZMB_SRV_PID"
  zmb_stop "$ZMB_SIM_PID"
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n "$(ulimit -Hn)" 2>/dev/null

fail() {
  echo "smoke: FAIL: $*"
  for f in "$W/server.log" "$W/sim/sim.log"; do
    [[ -s $f ]] && { echo "--- tail $f"; tail -20 "$f"; }
  done
  exit 1
}

zmb_start_sim "$W/sim" || fail "controller simulator did not start"
store=$W/store.db
zmb_schema "$store" "$BIN" || fail "schema"
zmb_seed "$store" 100000 3600 || fail "seeding"
port=$(zmb_free_port)
zmb_start_server "$BIN" "$store" "$port" "" "$W/server.log" SERVICE_IDENTITY_LEASE_TTL=5m
zmb_wait_health "$BENCH" "$port" "$ZMB_SRV_PID" 30 || fail "server did not answer health SERVING"

rc=0
run() { # label args...
  local label=$1
  shift
  echo "== smoke: $label"
  if ! "$BENCH" --target "127.0.0.1:$port" --timeout-ms 5000 "$@"; then
    echo "smoke: $label FAILED"
    rc=1
  fi
}
run "resolve 10% misses, 4x16" --scenario resolve --miss-ratio 0.1 -c 4 -m 16 -D "$SECS"
run "extend 4x16" --scenario extend -c 4 -m 16 -D "$SECS"
run "list 2x4" --scenario list -c 2 -m 4 -D "$SECS"
run "health 2x8" --scenario health -c 2 -m 8 -D "$SECS"
run "resolve+extend open loop 2000/s" --scenario mixed --mix resolve:80,extend:20 --rate 2000 -c 2 -m 64 -D "$SECS"
kill -0 "$ZMB_SRV_PID" 2>/dev/null || fail "server died during the smoke"
((rc == 0)) || fail "zm-bench reported errors"
echo "smoke: ok"
