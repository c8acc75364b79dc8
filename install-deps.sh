#!/bin/sh
# Installs every Debian 12 package the project needs to build, run, test and
# benchmark. The README, .ci/run and docker/Dockerfile all call this script.
#   scripts/install-deps.sh          build + test + bench dependencies
#   scripts/install-deps.sh --build  only what compiling the binary needs
set -eu
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
BUILD="build-essential cmake pkg-config libuv1-dev libnghttp2-dev libprotobuf-c-dev \
protobuf-c-compiler libprotobuf-dev libwolfssl-dev node-llhttp libjansson-dev libsqlite3-dev libpq-dev"
TEST="libcmocka-dev nghttp2-client postgresql sqlite3 openssl python3 python3-grpcio python3-prometheus-client \
python3-protobuf python3-grpc-tools python3-pytest python3-cryptography python3-psycopg2 python3-h2 clang-format \
clang libclang-rt-14-dev \
util-linux procps"
PKGS="$BUILD"
if [ "${1:-}" != "--build" ]; then PKGS="$BUILD $TEST"; fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
