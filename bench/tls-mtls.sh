#!/usr/bin/env bash
# bench/tls-mtls.sh - ResolveIdentity at 32 connections x 32 streams, h2c and
# mTLS (client certificate verified, TLS sessions resumed) in one run
# (issue 13), against:
#   zm      the service itself (bench/anchor-server.sh: 100,000 preloaded
#           keys, hot paths only), with GRPC_TLS_CERT_FILE/KEY_FILE/
#           CLIENT_CA_FILE and a policy admitting only the client's SPIFFE ID
#           to ResolveIdentity (so every OK answer proves the identity was
#           known on that connection, resumed or not);
#   cpp     the gRPC C++ anchor (shared/anchors/perf/cpp/server.cc, async CQ),
#           built here with SslServerCredentials requiring and verifying a
#           client certificate in place of InsecureServerCredentials (nothing
#           else changed), when libgrpc++-dev is installed.
# Server pinned to CPU 0, the client to CPU 1. The client is zm-tlsbench
# (h2load cannot present a client certificate); on h2c, h2load's figure is
# printed beside it as a check of the client. TLS cases: "resumed" (the first
# connection makes a full handshake and one call; the other 31 resume its
# session) and "full-hs" (32 full handshakes, reference). Server CPU
# (utime+stime) around each client run gives calls per server CPU second,
# the figure to compare when the client (which decrypts too) is near its
# own limit.
# Usage: bench/tls-mtls.sh [BUILD_DIR] [REQUESTS] [ROUNDS]
#   BUILD_DIR: a build with ziti-management, bench/zm-tlsbench, bench/zm-bench
#   ANCHORS (env): shared/anchors/perf (default /work/shared/anchors/perf)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
BUILD=$(cd "${1:-build-bench}" && pwd)
N=${2:-1000000}
ROUNDS=${3:-3}
ANCHORS=${ANCHORS:-/work/shared/anchors/perf}
T=$(mktemp -d)
pid=
trap 'zmb_stop "$pid" || true; rm -rf "$T"' EXIT
cd "$T"

# CA, server (127.0.0.1) and client (SPIFFE URI) certificates, EC P-256,
# and the policy
zmb_mtls_pki
# gRPC frame of ResolveIdentityRequest{ziti_identity_id: "zid-042424"} (a
# preloaded key of both servers; the anchors' payloads/resolve.bin)
printf '\000\000\000\000\014\012\012zid-042424' > req.bin
P=/agynio.api.ziti_management.v1.ZitiManagementService/ResolveIdentity

# The C++ anchor with TLS: server.cc with its credentials swapped.
cpp=
if [[ -f $ANCHORS/cpp/server.cc ]] && pkg-config --exists grpc++ && command -v grpc_cpp_plugin > /dev/null; then
  mkdir -p cpp/gen
  cp "$ANCHORS/cpp/common.h" cpp/
  /usr/bin/python3 - "$ANCHORS/cpp/server.cc" cpp/server_tls.cc <<'PY'
import sys
s = open(sys.argv[1]).read()
old = "builder.AddListeningPort(addr, grpc::InsecureServerCredentials());"
assert old in s
creds = '''#include <fstream>
#include <sstream>
// ANCHOR_TLS_DIR set: TLS with a required, verified client certificate.
static std::shared_ptr<grpc::ServerCredentials> AnchorCreds() {
  const char* d = std::getenv("ANCHOR_TLS_DIR");
  if (d == nullptr) return grpc::InsecureServerCredentials();
  auto rd = [d](const char* f) {
    std::ifstream in(std::string(d) + "/" + f);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  grpc::SslServerCredentialsOptions o(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = rd("ca.pem");
  o.pem_key_cert_pairs.push_back({rd("server.key"), rd("server.pem")});
  return grpc::SslServerCredentials(o);
}
'''
s = s.replace('#include "common.h"\n', '#include "common.h"\n' + creds, 1)
s = s.replace(old, "builder.AddListeningPort(addr, AnchorCreds());")
open(sys.argv[2], "w").write(s)
PY
  protoc -I "$ANCHORS/proto" --cpp_out=cpp/gen --grpc_out=cpp/gen \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" "$ANCHORS/proto/ziti_management.proto"
  flags=(-O2 -std=c++17 -Icpp -Icpp/gen $(pkg-config --cflags grpc++ protobuf))
  if g++ "${flags[@]}" cpp/server_tls.cc cpp/gen/ziti_management.pb.cc cpp/gen/ziti_management.grpc.pb.cc \
    -o cpp_server_tls $(pkg-config --libs grpc++ protobuf) 2> cpp.err; then
    cpp=$T/cpp_server_tls
  else
    echo "# gRPC C++ anchor with TLS: build failed: $(head -3 cpp.err)"
  fi
else
  echo "# gRPC C++ anchor with TLS: not built (no $ANCHORS/cpp/server.cc or no libgrpc++-dev/grpc_cpp_plugin)"
fi

start() { # start zm|cpp h2c|tls
  local port
  port=$(zmb_free_port)
  if [[ $1 == zm ]]; then
    local tls=()
    [[ $2 == tls ]] && tls=(GRPC_TLS_CERT_FILE=server.pem GRPC_TLS_KEY_FILE=server.key
      GRPC_TLS_CLIENT_CA_FILE=ca.pem GRPC_AUTHZ_POLICY_FILE=policy.json)
    env "${tls[@]}" ZM_BIN="$BUILD/ziti-management" ZM_BENCH_TMP="$T" LOG_LEVEL=warn AUDIT_LOG=off \
      taskset -c 0 "$here/anchor-server.sh" "$port" > "zm-$2.log" 2>&1 &
  else
    local tls=()
    [[ $2 == tls ]] && tls=(ANCHOR_TLS_DIR="$T")
    env "${tls[@]}" taskset -c 0 "$cpp" "$port" > "cpp-$2.log" 2>&1 &
  fi
  pid=$!
  zmb_wait_port "$port" "$pid" 60 || { echo "$1 $2 did not come up"; cat "$1-$2.log"; exit 1; }
  if [[ $1 == zm && $2 == h2c ]]; then
    zmb_wait_health "$BUILD/bench/zm-bench" "$port" "$pid" 60 || { echo "zm not serving"; exit 1; }
  fi
  PORT=$port
}
measure() { # measure LABEL CMD...
  local label=$1 t0 t1 ok hz
  shift
  t0=$(zmb_ticks "$pid")
  taskset -c 1 "$@" > res
  t1=$(zmb_ticks "$pid")
  ok=$(sed 's/.* ok=\([0-9]*\).*/\1/' res)
  hz=$(getconf CLK_TCK)
  awk -v ok="$ok" -v d=$((t1 - t0)) -v hz="$hz" -v l="$label" -v r="$r" \
    '{printf "round %s %s: %s server_cpu_s=%.2f calls_per_server_cpu_s=%.0f\n", r, l, $0, d / hz, ok / (d / hz)}' res
}
TB=("$BUILD/bench/zm-tlsbench" -c 32 -m 32 -n "$N" -d req.bin -p $P)
TLS=(--tls --cert client.pem --key client.key --ca ca.pem)
echo "# $(date -u +%FT%TZ) N=$N rounds=$ROUNDS source=$(git -C "$here" rev-parse --short HEAD) cpp_anchor=${cpp:+built}"
for ((r = 1; r <= ROUNDS; r++)); do
  for srv in zm ${cpp:+cpp}; do
    start $srv h2c
    if command -v h2load > /dev/null; then
      taskset -c 1 h2load -n "$N" -c 32 -m 32 -t 1 -d req.bin -H "content-type: application/grpc" \
        -H "te: trailers" "http://127.0.0.1:$PORT$P" | grep -E "finished in" | sed "s/^/round $r $srv-h2load-h2c: /"
    fi
    measure $srv-h2c "${TB[@]}" 127.0.0.1 "$PORT"
    zmb_stop "$pid" || true
    start $srv tls
    measure $srv-mtls-resumed "${TB[@]}" "${TLS[@]}" 127.0.0.1 "$PORT"
    measure $srv-mtls-full-hs "${TB[@]}" "${TLS[@]}" --no-resume 127.0.0.1 "$PORT"
    zmb_stop "$pid" || true
    pid=
  done
done
