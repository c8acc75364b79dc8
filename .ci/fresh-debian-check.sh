#!/usr/bin/env bash
# CI step: the README's two commands, word for word, in a fresh Debian 12
# (bookworm, debootstrap minbase: bash, apt-get and the checkout, nothing
# else), one after the other in the same container, as a newcomer would:
#   1. the `make run` line, started in the background by .ci/serve-check.sh,
#      which waits for health SERVING, calls RequestServiceIdentity once
#      (build/zmctl) and checks it returns an identity, then stops it;
#   2. the `make test` line, which must pass;
#   3. ./install-deps.sh once more, which must install nothing (print nothing).
# The two lines are read from the README's "Two commands" block, so what the
# README prints is what is run. The container gets the committed HEAD (git
# archive), as a fresh clone would.
#
# Uses ../shared/tools/fresh-debian.sh (buildah, chroot isolation, host
# network; no Docker engine). Override with FRESH_DEBIAN_SH=/path/to/it.
# Logs: $FRESH_LOGS (default: a new /tmp/zm-fresh-debian.XXXXXX).
# Budget: about 5 minutes on 2 cores with a near mirror (measured: 290 s;
# packages, builds, the whole test suite); hard limit ZM_FRESH_TIMEOUT
# seconds (default 4800).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- fresh-debian.sh: beside the repository (CI: /work/main + /work/shared)
fresh=${FRESH_DEBIAN_SH:-}
if [[ -z $fresh ]]; then
  for c in "$ROOT/../shared/tools/fresh-debian.sh" \
           "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../../shared/tools/fresh-debian.sh" \
           /work/shared/tools/fresh-debian.sh; do
    if [[ -x $c ]]; then fresh=$c; break; fi
  done
fi
if [[ -z $fresh || ! -x $fresh ]]; then
  echo "fresh-debian-check: fresh-debian.sh not found (looked for ../shared/tools/fresh-debian.sh" \
       "beside $ROOT and /work/shared/tools/fresh-debian.sh; set FRESH_DEBIAN_SH)" >&2
  exit 1
fi

# ---- the README's two commands
readme_cmds=$(awk '
  /^## Two commands/ { sec = 1; next }
  sec && /^## / { exit }
  sec && !blk && /^```sh[[:space:]]*$/ { blk = 1; next }
  blk && /^```/ { exit }
  blk && NF { print }' README.md)
mapfile -t cmds <<<"$readme_cmds"
if [[ ${#cmds[@]} != 2 || ${cmds[0]} != *"make run" || ${cmds[1]} != *"make test" ]]; then
  echo "fresh-debian-check: README.md's 'Two commands' block must hold exactly two lines," \
       "the first ending in 'make run', the second in 'make test'; found:" >&2
  printf '  %s\n' "${cmds[@]}" >&2
  exit 1
fi
run_cmd=${cmds[0]} test_cmd=${cmds[1]}
[[ $run_cmd != *"'"* ]] || { echo "fresh-debian-check: the run command may not hold a single quote" >&2; exit 1; }

if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
  echo "fresh-debian-check: note: uncommitted changes are not in the container (it gets HEAD)" >&2
fi

# The container shares the host's network: serve on a port that is free now
# (demo.sh honours GRPC_ADDRESS; zmctl gets --addr) rather than 50051, which another
# process of this machine may hold.
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
       echo $((20000 + RANDOM % 20000)))

export FRESH_LOGS=${FRESH_LOGS:-$(mktemp -d /tmp/zm-fresh-debian.XXXXXX)}
echo "== fresh Debian 12 container: the README's two commands (logs: $FRESH_LOGS)"
echo "   1. $run_cmd   (serves? health + RequestServiceIdentity on 127.0.0.1:$port)"
echo "   2. $test_cmd"
echo "   3. ./install-deps.sh again: installs nothing"
rc=0
timeout --kill-after=60 "${ZM_FRESH_TIMEOUT:-4800}" "$fresh" -C "$ROOT" \
  "export GRPC_ADDRESS=127.0.0.1:$port && .ci/serve-check.sh '$run_cmd'" \
  "$test_cmd" \
  'SECONDS=0; out=$(./install-deps.sh 2>&1); echo "install-deps.sh: ${SECONDS}s"; [ -z "$out" ] || { echo "$out"; false; }' \
  || rc=$?
if ((rc != 0)); then
  for f in "$FRESH_LOGS"/cmd-*.log; do
    [[ -f $f ]] || continue
    echo "---- $f (last 60 lines, apt noise left out)" >&2
    grep -vE '^(\(Reading database|Preparing to unpack|Unpacking|Selecting previously|Setting up|Processing triggers)' \
      "$f" | tail -n 60 >&2
  done
  echo "== fresh Debian 12 check FAILED (exit $rc)" >&2
  exit 1
fi
echo "== fresh Debian 12 check: OK"
