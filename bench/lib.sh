# bench/lib.sh - shell helpers shared by bench/anchor-server.sh, bench/run.sh
# and bench/smoke.sh. Source it; it defines functions only (plus ZMB_REPO).
# Every process it starts is tracked by PID by the caller; nothing here kills
# by name.

ZMB_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The server's schema (mirrors src/store/migrate.c: the tables the seeding
# below writes, with the Go service's columns): used only when the binary
# cannot create it itself (no --migrate-only). Idempotent, like the server's
# own migrations, which run again at start-up, record their versions and add
# their own tables and columns to a store made by hand.
ZMB_SCHEMA_SQL="
CREATE TABLE IF NOT EXISTS managed_identities(
  ziti_identity_id TEXT PRIMARY KEY, identity_id TEXT NOT NULL,
  identity_type SMALLINT NOT NULL, created_at TIMESTAMP NOT NULL,
  ziti_service_id TEXT, workload_id TEXT, agent_id TEXT, environment_id TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS service_identities(
  ziti_identity_id TEXT PRIMARY KEY, service_type SMALLINT NOT NULL,
  lease_expires_at TIMESTAMP NOT NULL, created_at TIMESTAMP NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS service_identities_lease_expires_at_idx
  ON service_identities(lease_expires_at, ziti_identity_id);
CREATE INDEX IF NOT EXISTS managed_identities_identity_id_idx
  ON managed_identities(identity_id);"

# zmb_schema STORE_PATH BIN: creates the schema (the server's own
# --migrate-only when it works, else the DDL above). Returns non-zero on failure.
zmb_schema() {
  local store=$1 bin=$2
  if [[ -x $bin ]] && DATABASE_URL= STORE_PATH=$store ZITI_CONTROLLER_URL= LOG_LEVEL=warn \
    "$bin" --migrate-only >/dev/null 2>&1; then
    return 0
  fi
  sqlite3 "$store" "$ZMB_SCHEMA_SQL"
}

# zmb_seed STORE_PATH N [LEASE_S] [FIRST]: inserts the anchors' keys
# i = FIRST..FIRST+N-1 into both tables: managed 'zid-%06d' ->
# 'a9e1c0de-0000-4000-8000-%012d', AGENT; service identities with the same
# ids, service_type 3 (runner), lease now+LEASE_S s (default 300); times as
# the server's canonical TEXT 'YYYY-MM-DD HH:MM:SS.mmm' UTC. One transaction.
zmb_seed() {
  local store=$1 n=$2 lease=${3:-300} first=${4:-0}
  sqlite3 "$store" >/dev/null <<SQL
PRAGMA journal_mode=WAL;
BEGIN;
WITH RECURSIVE seq(i) AS (SELECT $first UNION ALL SELECT i + 1 FROM seq WHERE i < $first + $n - 1)
INSERT INTO managed_identities(ziti_identity_id, identity_id, identity_type, created_at)
  SELECT printf('zid-%06d', i), printf('a9e1c0de-0000-4000-8000-%012d', i), 1,
         strftime('%Y-%m-%d %H:%M:%f', 'now') FROM seq;
WITH RECURSIVE seq(i) AS (SELECT $first UNION ALL SELECT i + 1 FROM seq WHERE i < $first + $n - 1)
INSERT INTO service_identities(ziti_identity_id, service_type, lease_expires_at, created_at)
  SELECT printf('zid-%06d', i), 3, strftime('%Y-%m-%d %H:%M:%f', 'now', '+$lease seconds'),
         strftime('%Y-%m-%d %H:%M:%f', 'now') FROM seq;
COMMIT;
SQL
}

# zmb_seed_expired STORE_PATH N: N service identities 'gc-%06d' whose lease
# expired a minute ago (with their managed rows, type RUNNER): GC work.
zmb_seed_expired() {
  local store=$1 n=$2
  sqlite3 "$store" >/dev/null <<SQL
PRAGMA journal_mode=WAL;
BEGIN;
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < $n - 1)
INSERT INTO managed_identities(ziti_identity_id, identity_id, identity_type, created_at)
  SELECT printf('gc-%06d', i), printf('9c000000-0000-4000-8000-%012d', i), 2,
         strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour') FROM seq;
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < $n - 1)
INSERT INTO service_identities(ziti_identity_id, service_type, lease_expires_at, created_at)
  SELECT printf('gc-%06d', i), 3, strftime('%Y-%m-%d %H:%M:%f', 'now', '-60 seconds'),
         strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour') FROM seq;
COMMIT;
SQL
}

# zmb_wait_port PORT PID TIMEOUT_S: 0 once 127.0.0.1:PORT accepts, 1 if PID
# died or time ran out.
zmb_wait_port() {
  local port=$1 pid=$2 t=$3 i
  for ((i = 0; i < t * 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.02
  done
  return 1
}

# zmb_wait_health BENCH PORT PID TIMEOUT_S: 0 once grpc.health.v1 Check
# answers SERVING.
zmb_wait_health() {
  local bench=$1 port=$2 pid=$3 t=$4 i
  for ((i = 0; i < t * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    "$bench" --target "127.0.0.1:$port" --scenario health -n 1 --timeout-ms 1000 \
      --quiet --show-errors 0 >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  return 1
}

# zmb_stop PID: SIGTERM, then SIGKILL after 10 s; reaps it if it is our child.
zmb_stop() {
  local pid=$1 i
  [[ -n $pid ]] || return 0
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

# zmb_vm PID KEY: a /proc/PID/status field in kB (VmRSS, VmHWM).
zmb_vm() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status" 2>/dev/null; }
# zmb_ticks PID: utime+stime in clock ticks.
zmb_ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# zmb_mtls_pki: in the current directory, an EC P-256 CA (ca.pem, ca.key),
# a server certificate for localhost / 127.0.0.1 (server.pem, server.key), a
# client certificate with the SPIFFE ID spiffe://bench/client (client.pem,
# client.key), and policy.json admitting that client to ResolveIdentity.
zmb_mtls_pki() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -subj /CN=bench-ca -days 1 2>/dev/null || return 1
  local who san
  for who in server client; do
    if [[ $who == server ]]; then san="DNS:localhost,IP:127.0.0.1"; else san="URI:spiffe://bench/client"; fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr \
      -subj /CN=$who 2>/dev/null || return 1
    printf 'subjectAltName=%s\n' "$san" >$who.ext
    openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
      -extfile $who.ext -out $who.pem 2>/dev/null || return 1
  done
  cat >policy.json <<'POL'
{"rules": [{"name": "bench", "principals": ["uri:spiffe://bench/client"], "methods": ["ResolveIdentity"]}]}
POL
}

# zmb_free_port: prints a currently free TCP port on 127.0.0.1.
zmb_free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# zmb_start_sim DIR [CPU]: starts the controller simulator (test/sim) in DIR,
# optionally pinned to CPU, at SCHED_IDLE if ZMB_SIM_IDLE=1; sets ZMB_SIM_PID,
# ZMB_SIM_URL, ZMB_SIM_CA, ZMB_SIM_CERT, ZMB_SIM_KEY, ZMB_SIM_CTL. Returns
# non-zero if it did not come up.
zmb_start_sim() {
  local dir=$1 cpu=${2:-} i pin=()
  mkdir -p "$dir"
  [[ -n $cpu ]] && pin=(taskset -c "$cpu")
  [[ ${ZMB_SIM_IDLE:-0} == 1 ]] && pin+=(chrt -i 0)
  "${pin[@]}" /usr/bin/python3 "$ZMB_REPO/test/sim/ziti_sim.py" --dir "$dir" --port 0 --ctl-port 0 \
    >"$dir/sim.log" 2>&1 &
  ZMB_SIM_PID=$!
  for ((i = 0; i < 600; i++)); do
    [[ -s $dir/sim.json ]] && break
    kill -0 "$ZMB_SIM_PID" 2>/dev/null || return 1
    sleep 0.05
  done
  [[ -s $dir/sim.json ]] || return 1
  local vals
  vals=$(/usr/bin/python3 -c 'import json,sys; d=json.load(open(sys.argv[1]));
print(d["url"], d["ca_file"], d["cert_file"], d["key_file"], d["ctl_port"])' "$dir/sim.json") || return 1
  read -r ZMB_SIM_URL ZMB_SIM_CA ZMB_SIM_CERT ZMB_SIM_KEY ZMB_SIM_CTL <<<"$vals"
}

# zmb_sim_latency MS: added latency of every simulator answer.
zmb_sim_latency() {
  curl -sf -X POST "http://127.0.0.1:$ZMB_SIM_CTL/faults" -d "{\"latency_ms\":$1}" >/dev/null
}

# zmb_start_server BIN STORE PORT CPU LOG [ENV=VAL...]: starts the server
# (pinned to CPU when non-empty) with the simulator as its controller when
# ZMB_SIM_URL is set; sets ZMB_SRV_PID.
zmb_start_server() {
  local bin=$1 store=$2 port=$3 cpu=$4 log=$5 pin=()
  shift 5
  [[ -n $cpu ]] && pin=(taskset -c "$cpu")
  local ctl=(ZITI_CONTROLLER_URL=)
  [[ -n ${ZMB_SIM_URL:-} ]] && ctl=(ZITI_CONTROLLER_URL="$ZMB_SIM_URL" ZITI_CA_FILE="$ZMB_SIM_CA"
    ZITI_CERT_FILE="$ZMB_SIM_CERT" ZITI_KEY_FILE="$ZMB_SIM_KEY")
  "${pin[@]}" env STORE_PATH="$store" GRPC_ADDRESS="127.0.0.1:$port" "${ctl[@]}" "$@" "$bin" >"$log" 2>&1 &
  ZMB_SRV_PID=$!
}

# zmb_free_range N: prints a port P such that P+1..P+N are free on 127.0.0.1
# (the anchors' run.sh numbers its servers BASE_PORT+1, +2, ...).
zmb_free_range() {
  /usr/bin/python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randint(20000, 59000)
    socks = []
    try:
        for p in range(base + 1, base + n + 1):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    break
else:
    sys.exit(1)
PY
}

# ---- PostgreSQL: a throwaway cluster, pinned like the anchors' ---------------
# (shared/anchors/perf/run.sh): initdb in a temp dir, trust auth, 127.0.0.1 on
# a free port, the socket in the temp dir, every other setting the default
# (fsync=on, synchronous_commit=on). As root, every postgres binary runs as the
# postgres user (runuser), as the anchors do. Stopped by pg_ctl on its data
# dir only; nothing is killed by name.

# zmb_as_pg CMD...: runs CMD as the postgres user when we are root.
zmb_as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# zmb_pg_bin: prints the newest /usr/lib/postgresql/*/bin (empty if none).
zmb_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

# zmb_pg_start PARENT_DIR CPU [DB]: initdb + pg_ctl start (pinned to CPU when
# non-empty), creates database DB (default zm) owned by user zm. Sets
# ZMB_PG_DIR, ZMB_PG_PORT, ZMB_PG_PID (the postmaster), ZMB_PG_URL
# (postgres://zm@127.0.0.1:PORT/DB). Non-zero on failure (ZMB_PG_DIR is set as
# soon as the dir exists, so zmb_pg_stop cleans up after a partial start).
zmb_pg_start() {
  local parent=$1 cpu=${2:-} db=${3:-zm} bin pin=() i
  bin=$(zmb_pg_bin)
  [[ -n $bin && -x $bin/initdb ]] || { echo "zmb_pg_start: no PostgreSQL server binaries" >&2; return 1; }
  ZMB_PG_DIR=$(mktemp -d "$parent/zm-pg.XXXXXX") || return 1
  [[ $(id -u) == 0 ]] && chown postgres:postgres "$ZMB_PG_DIR"
  chmod 755 "$ZMB_PG_DIR"
  zmb_as_pg "$bin/initdb" -D "$ZMB_PG_DIR/data" -A trust -U zm >"$ZMB_PG_DIR/initdb.log" 2>&1 ||
    { cat "$ZMB_PG_DIR/initdb.log" >&2; return 1; }
  [[ -n $cpu ]] && pin=(taskset -c "$cpu")
  for ((i = 0; i < 5; i++)); do # a free port can be taken between probe and bind: retry
    ZMB_PG_PORT=$(zmb_free_port)
    if zmb_as_pg "${pin[@]}" "$bin/pg_ctl" -D "$ZMB_PG_DIR/data" -l "$ZMB_PG_DIR/server.log" \
      -o "-c listen_addresses=127.0.0.1 -p $ZMB_PG_PORT -k $ZMB_PG_DIR" -w -t 60 start >/dev/null 2>&1; then
      break
    fi
    ZMB_PG_PORT=
  done
  [[ -n $ZMB_PG_PORT ]] || { tail -5 "$ZMB_PG_DIR/server.log" >&2; return 1; }
  ZMB_PG_PID=$(head -1 "$ZMB_PG_DIR/data/postmaster.pid" 2>/dev/null)
  zmb_pg_psql postgres -c "CREATE DATABASE $db" || return 1
  ZMB_PG_URL="postgres://zm@127.0.0.1:$ZMB_PG_PORT/$db"
}

# zmb_pg_psql DB ARGS...: psql on the running cluster (ON_ERROR_STOP).
zmb_pg_psql() {
  local db=$1
  shift
  "$(zmb_pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$ZMB_PG_PORT" -U zm -d "$db" "$@"
}

# The Go service's tables as its migrations 0001..0008 leave them (issue 10):
# used only when the binary's --migrate-only does not run against PostgreSQL.
# The server adds its own tables and columns at start-up.
ZMB_PG_SCHEMA_SQL="
CREATE TABLE IF NOT EXISTS managed_identities(
  ziti_identity_id TEXT PRIMARY KEY, identity_id UUID NOT NULL,
  identity_type SMALLINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  ziti_service_id TEXT, workload_id UUID, agent_id UUID, environment_id UUID);
CREATE INDEX IF NOT EXISTS managed_identities_identity_id_idx ON managed_identities(identity_id);
CREATE TABLE IF NOT EXISTS service_identities(
  ziti_identity_id TEXT PRIMARY KEY, service_type SMALLINT NOT NULL,
  lease_expires_at TIMESTAMPTZ NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT NOW());
CREATE INDEX IF NOT EXISTS service_identities_lease_expires_at_idx ON service_identities(lease_expires_at);"

# zmb_pg_schema DB BIN: the server's own migrations (DATABASE_URL=... BIN
# --migrate-only) when that works, else the Go tables above. Prints which.
ZMB_PG_SCHEMA_HOW=
zmb_pg_schema() {
  local db=$1 bin=$2
  if [[ -x $bin ]] && DATABASE_URL="postgres://zm@127.0.0.1:$ZMB_PG_PORT/$db" STORE_PATH= \
    ZITI_CONTROLLER_URL= LOG_LEVEL=warn timeout 60 "$bin" --migrate-only >"$ZMB_PG_DIR/migrate-$db.log" 2>&1; then
    ZMB_PG_SCHEMA_HOW="the server's --migrate-only"
    return 0
  fi
  ZMB_PG_SCHEMA_HOW="bench/lib.sh's copy of the Go tables (--migrate-only failed: $(tail -1 "$ZMB_PG_DIR/migrate-$db.log" 2>/dev/null))"
  zmb_pg_psql "$db" -c "$ZMB_PG_SCHEMA_SQL"
}

# zmb_pg_seed DB N [LEASE_S]: the anchors' keys 0..N-1 into both tables (as
# zmb_seed does for SQLite): managed 'zid-%06d' -> 'a9e1c0de-0000-4000-8000-%012d',
# AGENT (1); service identities with the same ids, type 3, lease now+LEASE_S s
# (default 300). One transaction, then VACUUM ANALYZE.
zmb_pg_seed() {
  local db=$1 n=$2 lease=${3:-300}
  zmb_pg_psql "$db" <<SQL
BEGIN;
INSERT INTO managed_identities(ziti_identity_id, identity_id, identity_type)
  SELECT 'zid-' || lpad(i::text, 6, '0'), ('a9e1c0de-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 1
  FROM generate_series(0, $n - 1) AS i;
INSERT INTO service_identities(ziti_identity_id, service_type, lease_expires_at)
  SELECT 'zid-' || lpad(i::text, 6, '0'), 3, now() + interval '$lease seconds'
  FROM generate_series(0, $n - 1) AS i;
COMMIT;
VACUUM ANALYZE managed_identities;
VACUUM ANALYZE service_identities;
SQL
}

# zmb_pg_stop [DIR]: pg_ctl stop (fast) of the cluster in DIR (default the
# last one zmb_pg_start made, ZMB_PG_DIR), then removes DIR.
zmb_pg_stop() {
  local dir=${1:-${ZMB_PG_DIR:-}}
  [[ -n $dir ]] || return 0
  if [[ -f $dir/data/postmaster.pid ]]; then
    zmb_as_pg "$(zmb_pg_bin)/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1
  fi
  rm -rf "$dir"
  [[ $dir == "${ZMB_PG_DIR:-}" ]] && ZMB_PG_DIR= ZMB_PG_PORT= ZMB_PG_PID= ZMB_PG_URL=
  return 0
}
