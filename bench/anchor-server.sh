#!/usr/bin/env bash
# bench/anchor-server.sh PORT - runs ziti-management the way the anchor
# servers of shared/anchors/perf run: 127.0.0.1:PORT, plaintext h2c, the same
# 100,000 preloaded keys (managed 'zid-%06d' -> 'a9e1c0de-0000-4000-8000-%012d'
# AGENT, and service identities with the same ids), no controller (hot paths
# only). Seeds a fresh SQLite store in a new temp dir, then execs the server,
# so this script's PID is the server's (the anchors' run.sh measures CPU and
# RSS by PID).
#
# Used as: EXTRA_SERVERS="zm=$REPO/bench/anchor-server.sh {PORT}" .../run.sh
# Env: ZM_BIN (default: build-bench/ziti-management, else build/ziti-management)
#      ZM_BENCH_TMP  parent of the temp dir (default $TMPDIR or /tmp)
#      ZM_SEED_KEYS  (default 100000)   ZM_SEED_LEASE_S (default 3600, see below)
#      STORE_SYNC, LOG_LEVEL, ... pass through to the server.
# The anchors' verify step expects UNIMPLEMENTED from CreateAgentIdentity and
# ListManagedIdentities (the anchors implement only the two hot RPCs), so the
# server is asked to disable every non-hot method (GRPC_DISABLED_METHODS).
# Leases are seeded 1 h out (not 5 min): the anchors' run lasts ~7 min, and
# expiring leases would turn the measurement into a GC run.
set -euo pipefail
port=${1:?usage: anchor-server.sh PORT}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

bin=${ZM_BIN:-}
if [[ -z $bin ]]; then
  for b in "$ZMB_REPO/build-bench/ziti-management" "$ZMB_REPO/build/ziti-management"; do
    [[ -x $b ]] && { bin=$b; break; }
  done
fi
[[ -n $bin && -x $bin ]] || { echo "anchor-server.sh: no server binary (set ZM_BIN)" >&2; exit 1; }

base=${ZM_BENCH_TMP:-${TMPDIR:-/tmp}}
dir=$(mktemp -d "$base/zm-anchor.XXXXXX")
store=$dir/store.db
zmb_schema "$store" "$bin" || { echo "anchor-server.sh: cannot create the schema" >&2; exit 1; }
zmb_seed "$store" "${ZM_SEED_KEYS:-100000}" "${ZM_SEED_LEASE_S:-3600}" ||
  { echo "anchor-server.sh: seeding failed" >&2; exit 1; }
echo "anchor-server.sh: store $store seeded with ${ZM_SEED_KEYS:-100000} keys; exec $bin on 127.0.0.1:$port" >&2

exec env STORE_PATH="$store" GRPC_ADDRESS="127.0.0.1:$port" ZITI_CONTROLLER_URL= \
  GRPC_DISABLED_METHODS="${GRPC_DISABLED_METHODS-CreateAgentIdentity,DeleteIdentity,ListManagedIdentities,RequestServiceIdentity}" \
  "$bin"
