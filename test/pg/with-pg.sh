#!/bin/sh
# with-pg.sh CMD ARGS... - runs CMD against a throwaway PostgreSQL cluster.
#
# Creates a temporary directory, initdb's a cluster there (trust auth,
# listening on 127.0.0.1 only, on a free port), starts it, creates database
# "zm_test", and runs CMD with
#   ZM_TEST_DATABASE_URL  postgresql://zm@127.0.0.1:PORT/zm_test
#   ZM_TEST_PG_BIN        the directory of pg_ctl, initdb, ...
#   ZM_TEST_PG_DATA       the cluster's data directory
#   ZM_TEST_PG_CTL        a command prefix that runs a PostgreSQL binary as
#                         the cluster's owner ("runuser -u postgres --" when
#                         we are root, else empty)
# so a test can restart or stop the server itself, e.g.
#   $ZM_TEST_PG_CTL "$ZM_TEST_PG_BIN/pg_ctl" -D "$ZM_TEST_PG_DATA" -w restart -m fast
# The cluster is stopped and the directory removed when CMD exits (trap).
# Exit status: CMD's, or 2 when the cluster cannot be set up.
#
# initdb refuses to run as root: as root, the directory belongs to the
# `postgres` system user (Debian's postgresql package creates it) and every
# PostgreSQL binary runs through runuser. PG_BIN overrides the binary
# directory (default: the newest /usr/lib/postgresql/*/bin).
set -eu

die() {
  echo "with-pg.sh: $*" >&2
  exit 2
}

[ $# -ge 1 ] || die "usage: with-pg.sh CMD [ARGS...]"

bin=${PG_BIN:-}
if [ -z "$bin" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$bin" ] && [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] ||
  die "PostgreSQL server binaries not found (install postgresql, or set PG_BIN)"

as=""
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user"
  as="runuser -u postgres --"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/zm-pg.XXXXXX")
data=$tmp/data
chmod 755 "$tmp"
[ -z "$as" ] || chown postgres: "$tmp"

cleanup() {
  rc=$?
  $as "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port: ask the kernel for one (a tiny race with other processes is
# acceptable for tests).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
  echo $((20000 + $$ % 20000)))

$as "$bin/initdb" -D "$data" -U zm --auth=trust --encoding=UTF8 --locale=C \
  >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; die "initdb failed"; }
cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$tmp'
fsync = off
full_page_writes = off
max_connections = 100
CONF
$as "$bin/pg_ctl" -D "$data" -l "$tmp/server.log" -w -t 60 start >/dev/null ||
  { cat "$tmp/server.log" >&2; die "pg_ctl start failed"; }
$as "$bin/createdb" -h 127.0.0.1 -p "$port" -U zm zm_test ||
  die "createdb failed"

export ZM_TEST_DATABASE_URL="postgresql://zm@127.0.0.1:$port/zm_test"
export ZM_TEST_PG_BIN="$bin"
export ZM_TEST_PG_DATA="$data"
export ZM_TEST_PG_CTL="$as"
export ZM_TEST_PG_LOG="$tmp/server.log"

set +e
"$@"
rc=$?
set -e
exit $rc
