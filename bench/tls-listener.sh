#!/bin/sh
# bench/tls-listener.sh - ResolveIdentity at 32 connections x 32 streams over
# h2c and over TLS on the same run (issue 13), against build/test/zm-testsrv
# (the real src/grpc server; ResolveIdentity answers from memory like the
# service's hot path). Server pinned to CPU 0, h2load to CPU 1.
# h2load cannot present a client certificate, so the TLS case is server-auth
# TLS; client verification costs only at the handshake (32 of them), not per
# request. Three cases: h2c; TLS as negotiated (the server's order picks
# ChaCha20-Poly1305, zm/tlsconf.h); TLS with a client offering only
# AES-128-GCM (what an AES-only client costs the server).
# Usage: bench/tls-listener.sh [BUILD_DIR] [REQUESTS]
set -eu
BUILD=${1:-build}
N=${2:-400000}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$T/k.pem" -out "$T/c.pem" \
  -subj /CN=localhost -days 1 -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
# gRPC frame of ResolveIdentityRequest{ziti_identity_id: "known"}
printf '\000\000\000\000\007\012\005known' > "$T/req.bin"
for mode in h2c tls tls-aesgcm; do
  suites=
  if [ "$mode" = h2c ]; then
    scheme=http
    env=
  else
    scheme=https
    env="GRPC_TLS_CERT_FILE=$T/c.pem GRPC_TLS_KEY_FILE=$T/k.pem"
    [ "$mode" = tls-aesgcm ] && suites=--tls13-ciphers=TLS_AES_128_GCM_SHA256
  fi
  env $env AUDIT_LOG=off taskset -c 0 "$BUILD/test/zm-testsrv" > "$T/out" 2>/dev/null &
  pid=$!
  sleep 0.5
  port=$(awk '{print $4}' "$T/out")
  # shellcheck disable=SC2086 # $suites: one option or none
  taskset -c 1 h2load $suites -n "$N" -c 32 -m 32 -t 1 -d "$T/req.bin" -H "content-type: application/grpc" \
    -H "te: trailers" "$scheme://127.0.0.1:$port/agynio.api.ziti_management.v1.ZitiManagementService/ResolveIdentity" |
    grep -E "finished in|succeeded" | sed "s/^/$mode: /"
  kill "$pid"
  wait "$pid" || true
done
