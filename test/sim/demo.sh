#!/bin/sh
# Demo mode for `make run`: starts the bundled OpenZiti controller simulator
# and the service pointed at it, on 127.0.0.1:50051. Ctrl-C stops both.
set -eu
BUILD=${1:-build}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(mktemp -d /tmp/zm-demo.XXXXXX)
/usr/bin/python3 "$REPO/test/sim/ziti_sim.py" --dir "$DIR/sim" --port 0 --ctl-port 0 \
  > "$DIR/sim.log" 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null; wait $SIM 2>/dev/null' EXIT INT TERM
for _ in $(seq 300); do [ -f "$DIR/sim/sim.json" ] && break; sleep 0.1; done
[ -f "$DIR/sim/sim.json" ] || { echo "simulator did not start; see $DIR/sim.log" >&2; exit 1; }
get() { /usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$DIR/sim/sim.json" "$1"; }
export ZITI_CONTROLLER_URL="$(get url)" ZITI_CA_FILE="$(get ca_file)"
export ZITI_CERT_FILE="$(get cert_file)" ZITI_KEY_FILE="$(get key_file)"
export GRPC_ADDRESS="${GRPC_ADDRESS:-127.0.0.1:50051}" STORE_PATH="${STORE_PATH:-$DIR/ziti-management.db}"
echo "controller simulator: $ZITI_CONTROLLER_URL (control API on 127.0.0.1:$(get ctl_port))"
echo "ziti-management:      $GRPC_ADDRESS, store $STORE_PATH"
echo "try: $BUILD/zmctl request-service-identity gateway -o gateway.json"
case $BUILD in /*) BIN=$BUILD/ziti-management ;; *) BIN=$REPO/$BUILD/ziti-management ;; esac
"$BIN" &
ZM=$!
trap 'kill $ZM 2>/dev/null; wait $ZM 2>/dev/null; kill $SIM 2>/dev/null; wait $SIM 2>/dev/null' EXIT INT TERM
wait $ZM
