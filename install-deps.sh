#!/bin/sh
# Installs every Debian 12 package the project needs to build, run, test and
# benchmark. The README, the Makefile, .ci/run and docker/Dockerfile all call
# this script. It needs only sh, dpkg and apt-get (a bare Debian 12 has them):
# run it as root, or as a user with sudo.
#   ./install-deps.sh          build + run + test + bench dependencies
#   ./install-deps.sh --build  only what compiling the binary needs
# A second run finds every package installed and does nothing (no apt-get).
set -eu
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
BUILD="build-essential cmake pkg-config libuv1-dev libnghttp2-dev libprotobuf-c-dev \
protobuf-c-compiler libprotobuf-dev libwolfssl-dev node-llhttp libjansson-dev libsqlite3-dev libpq-dev"
# make (the README's commands), ca-certificates (https apt mirrors, tools that
# fetch), PostgreSQL server binaries (tests run initdb/pg_ctl from
# /usr/lib/postgresql/15/bin on their own data directories); nghttp2-client
# (h2load) and nghttp2-server (nghttpd: the HTTP/2 ceiling bench/run-perf.sh
# measures) for the benchmarks.
TEST="make ca-certificates libcmocka-dev nghttp2-client nghttp2-server postgresql sqlite3 openssl python3 python3-grpcio \
python3-prometheus-client python3-protobuf python3-grpc-tools python3-pytest python3-cryptography python3-psycopg2 python3-h2 \
clang-format \
clang libclang-rt-14-dev \
util-linux procps"
PKGS="$BUILD"
if [ "${1:-}" != "--build" ]; then PKGS="$BUILD $TEST"; fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps.sh: missing packages:$missing" >&2
    echo "install-deps.sh: run this script as root (there is no sudo here)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
