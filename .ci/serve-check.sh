#!/usr/bin/env bash
# Runs the README's `make run` command (given as $1, word for word) in the
# background and checks that it serves: health SERVING, then one
# RequestServiceIdentity that returns an identity JSON. Then stops it (SIGTERM
# to its whole process group: make, test/sim/demo.sh, the service and the
# controller simulator) and exits 0 only if every check passed.
#
# Meant to run inside the fresh container of .ci/fresh-debian-check.sh, from
# the project root:   .ci/serve-check.sh './install-deps.sh && make run'
#   GRPC_ADDRESS       where the service listens (demo.sh honours it; the
#                      container shares the host's network, so the caller
#                      picks a free port); default 127.0.0.1:50051
#   ZM_SERVE_TIMEOUT   seconds allowed from start to SERVING (default 1800:
#                      the first run installs packages and builds)
set -uo pipefail
[[ $# == 1 ]] || { echo "usage: $0 'RUN COMMAND'" >&2; exit 2; }
cmd=$1
addr=${GRPC_ADDRESS:-127.0.0.1:50051}
log=${ZM_RUN_LOG:-/tmp/make-run.log}
limit=${ZM_SERVE_TIMEOUT:-1800}

# Job control: the command gets its own process group, so one signal reaches
# everything it started.
set -m
bash -c "$cmd" >"$log" 2>&1 </dev/null &
pid=$!
set +m

stopped=0
stop() {
  ((stopped)) && return 0
  stopped=1
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  for _ in $(seq 60); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "serve-check: '$cmd' still running 30 s after SIGTERM: SIGKILL" >&2
  kill -KILL -- "-$pid" 2>/dev/null
  return 1
}
trap stop EXIT

fail() {
  echo "serve-check: FAIL: $*" >&2
  echo "---- last lines of $log" >&2
  grep -vE '^(\(Reading database|Preparing to unpack|Unpacking|Selecting previously|Setting up|Processing triggers)' \
    "$log" | tail -n 40 >&2
  exit 1
}

echo "serve-check: started '$cmd' (process group $pid), waiting for $addr to be SERVING"
SECONDS=0
until [[ -x build/ziti-management ]] && build/ziti-management --health-check "$addr" >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || fail "'$cmd' exited before serving"
  ((SECONDS < limit)) || fail "not SERVING after $limit s"
  sleep 2
done
echo "serve-check: SERVING after $SECONDS s"

# What a newcomer sees (the lines after the build), for the CI log.
echo "---- '$cmd' printed (build and install lines left out):"
grep -E '^(controller simulator|ziti-management|try):' "$log" || fail "demo.sh's address lines are missing"

# The README's client, as a newcomer would call it.
health=$(build/zmctl --addr "$addr" health) || fail "zmctl health failed"
[[ $health == SERVING ]] || fail "zmctl health said '$health'"
echo "serve-check: zmctl health: $health"

out=$(mktemp /tmp/serve-check.XXXXXX.json)
build/zmctl --addr "$addr" request-service-identity gateway -o "$out" ||
  fail "RequestServiceIdentity failed"
/usr/bin/python3 - "$out" <<'EOF' || fail "RequestServiceIdentity returned no usable identity"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["ztAPI"].startswith("https://"), j.get("ztAPI")
for k in ("key", "cert", "ca"):
    assert j["id"][k].startswith("pem:-----BEGIN "), k
print("serve-check: RequestServiceIdentity returned an identity for", j["ztAPI"])
EOF
rm -f "$out"

stop || fail "did not stop on SIGTERM"
echo "serve-check: stopped; OK"
