#!/usr/bin/env bash
# bench/index-memory.sh [BIN] [N]: memory the in-memory index costs per
# identity. Starts the server twice on a SQLite store, once empty and once
# seeded with N identities (default 100000; each a managed AND a service row,
# as zmb_seed writes them), reads /proc/PID/status 3 s after start (idle,
# loaded), and prints VmRSS, VmHWM (the peak, i.e. the start-up load) and
# RssAnon of both, then (RssAnon_N - RssAnon_0) / N as bytes per identity.
# RssAnon leaves out the shared libraries' pages, which do not depend on N.
# Only the PIDs started here are stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BIN=$(realpath "${1:-$ZMB_REPO/build/ziti-management}")
N=${2:-100000}
[[ -x $BIN ]] || { echo "no server binary at $BIN" >&2; exit 2; }

dir=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && zmb_stop "$pid"; rm -rf "$dir"; }
trap cleanup EXIT

# measure STORE: prints "VmRSS VmHWM RssAnon" in kB of an idle loaded server.
measure() {
  STORE_PATH=$1 GRPC_ADDRESS=127.0.0.1:0 ZITI_CONTROLLER_URL= ZITI_LOG_LEVEL=warn \
    "$BIN" >"$1.log" 2>&1 &
  pid=$!
  sleep 3
  kill -0 "$pid" 2>/dev/null || { echo "server died: $(cat "$1.log")" >&2; exit 1; }
  echo "$(zmb_vm "$pid" VmRSS) $(zmb_vm "$pid" VmHWM) $(zmb_vm "$pid" RssAnon)"
  zmb_stop "$pid"
  pid=
}

cd "$dir"
STORE_PATH=e.db ZITI_CONTROLLER_URL= "$BIN" --migrate-only >/dev/null 2>&1
STORE_PATH=s.db ZITI_CONTROLLER_URL= "$BIN" --migrate-only >/dev/null 2>&1
zmb_seed s.db "$N" 3600
read -r rss0 hwm0 anon0 < <(measure e.db)
read -r rssn hwmn anonn < <(measure s.db)
printf '%-10s %10s %10s %10s\n' store VmRSS_kB VmHWM_kB RssAnon_kB
printf '%-10s %10s %10s %10s\n' empty "$rss0" "$hwm0" "$anon0" "$N" "$rssn" "$hwmn" "$anonn"
echo "bytes/identity (RssAnon): $(((anonn - anon0) * 1024 / N))"
echo "bytes/identity (VmRSS):   $(((rssn - rss0) * 1024 / N))"
echo "peak over empty (VmHWM):  $(((hwmn - hwm0) * 1024 / N)) bytes/identity"
