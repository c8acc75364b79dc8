#!/bin/sh
# bench/tls-mtls.sh - ResolveIdentity at 32 connections x 32 streams over h2c
# and over mTLS (client certificate verified, sessions resumed) in one run,
# against build/test/zm-testsrv (the real src/grpc server; ResolveIdentity
# answers from memory like the service's hot path). Server pinned to CPU 0,
# the client to CPU 1. The client is zm-tlsbench (h2load cannot present a
# client certificate); h2load's h2c figure is printed beside it as a check of
# the client. Cases: h2c, mTLS with resumed sessions (the first connection
# makes a full handshake, the other 31 resume its session), mTLS with 32 full
# handshakes (reference). With the client CA, a policy that admits only the
# client's SPIFFE ID to ResolveIdentity (so every answer proves the identity
# was known on that connection, resumed or not).
# Usage: bench/tls-mtls.sh [BUILD_DIR] [REQUESTS] [ROUNDS]
set -eu
BUILD=${1:-build}
N=${2:-400000}
ROUNDS=${3:-3}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cd "$T"
# CA, server (127.0.0.1) and client (SPIFFE URI) certificates, EC P-256
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
  -subj /CN=bench-ca -days 1 2>/dev/null
for who in server client; do
  if [ $who = server ]; then san="DNS:localhost,IP:127.0.0.1"; else san="URI:spiffe://bench/client"; fi
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr \
    -subj /CN=$who 2>/dev/null
  printf 'subjectAltName=%s\n' "$san" > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile $who.ext -out $who.pem 2>/dev/null
done
# only this client's SPIFFE ID may resolve: a resumed session that lost the
# client's identity would be answered PERMISSION_DENIED/UNAUTHENTICATED
cat > policy.json <<'POL'
{"rules": [{"name": "bench", "principals": ["uri:spiffe://bench/client"], "methods": ["ResolveIdentity"]}]}
POL
# gRPC frame of ResolveIdentityRequest{ziti_identity_id: "known"}
printf '\000\000\000\000\007\012\005known' > req.bin
P=/agynio.api.ziti_management.v1.ZitiManagementService/ResolveIdentity
start() {
  env "$@" AUDIT_LOG=off taskset -c 0 "$BUILD/test/zm-testsrv" > out 2>/dev/null &
  pid=$!
  sleep 0.5
  port=$(awk '{print $4}' out)
}
stop() { kill "$pid"; wait "$pid" || true; }
echo "# $(date -u +%FT%TZ) N=$N rounds=$ROUNDS"
r=1
while [ $r -le "$ROUNDS" ]; do
  start
  if command -v h2load > /dev/null; then
    taskset -c 1 h2load -n "$N" -c 32 -m 32 -t 1 -d req.bin -H "content-type: application/grpc" \
      -H "te: trailers" "http://127.0.0.1:$port$P" | grep -E "finished in" | sed "s/^/round $r h2load-h2c: /"
  fi
  taskset -c 1 "$BUILD/bench/zm-tlsbench" -c 32 -m 32 -n "$N" -d req.bin -p $P 127.0.0.1 "$port" |
    sed "s/^/round $r: /"
  stop
  start GRPC_TLS_CERT_FILE=server.pem GRPC_TLS_KEY_FILE=server.key GRPC_TLS_CLIENT_CA_FILE=ca.pem GRPC_AUTHZ_POLICY_FILE=policy.json
  taskset -c 1 "$BUILD/bench/zm-tlsbench" -c 32 -m 32 -n "$N" -d req.bin -p $P --tls \
    --cert client.pem --key client.key --ca ca.pem 127.0.0.1 "$port" | sed "s/^/round $r resumed: /"
  taskset -c 1 "$BUILD/bench/zm-tlsbench" -c 32 -m 32 -n "$N" -d req.bin -p $P --tls --no-resume \
    --cert client.pem --key client.key --ca ca.pem 127.0.0.1 "$port" | sed "s/^/round $r full-hs: /"
  stop
  r=$((r + 1))
done
