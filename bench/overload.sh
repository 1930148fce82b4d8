#!/usr/bin/env bash
# Overload: under 10x the sustainable load, the calls the server accepts keep
# their latency (the rest are shed with RESOURCE_EXHAUSTED / OVERLOADED).
#
#   [SERVER_ARGS='--max-in-flight 32 ...'] [SUSTAINABLE='4 8'] [DURATION=10] \
#     bench/overload.sh [DATABASE_URL]     (default: a temporary SQLite file)
#
# h2load (Debian's nghttp2-client) drives GetUser of one seeded user; the
# latency of accepted and shed calls is read from the server's own histogram
# (grpc_server_handling_seconds by grpc_code) between two scrapes, since
# h2load cannot tell a gRPC error from a success (both are HTTP 200).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
cargo build --release --bins -q
WORK=$(mktemp -d)
DB=${1:-"sqlite://$WORK/overload.db?mode=rwc"}
PORT=${PORT:-50151}
METRICS=${METRICS:-50152}
DURATION=${DURATION:-10}
RUST_LOG=warn target/release/user-service serve --listen "127.0.0.1:$PORT" \
  --database-url "$DB" --metrics-listen "127.0.0.1:$METRICS" ${SERVER_ARGS:-} &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
  target/release/user-service healthcheck --addr "http://127.0.0.1:$PORT" --timeout 1s >/dev/null 2>&1 && break
  sleep 0.1
done
# 10,000 users, then the one every request reads.
target/release/user-bench --target "127.0.0.1:$PORT" --users 10000 --connections 1 --in-flight 16 --seed-in-flight 4 --duration 1s --warmup 0s get >/dev/null
python3 bench/grpc_frame.py create projects/bench probe probe@example.com >"$WORK/create.bin"
python3 bench/grpc_frame.py get projects/bench/users/probe >"$WORK/get.bin"
grpc=(-H 'content-type: application/grpc' -H 'te: trailers')
h2load -n 1 -c 1 "${grpc[@]}" -d "$WORK/create.bin" "http://127.0.0.1:$PORT/users.v1.UserService/CreateUser" >/dev/null

run() { # name connections streams
  curl -s "http://127.0.0.1:$METRICS/metrics" >"$WORK/before"
  local out
  out=$(h2load -t 1 -c "$2" -m "$3" -D "$DURATION" --warm-up-time 2 "${grpc[@]}" -d "$WORK/get.bin" \
    "http://127.0.0.1:$PORT/users.v1.UserService/GetUser")
  curl -s "http://127.0.0.1:$METRICS/metrics" >"$WORK/after"
  echo "== $1: h2load -c $2 -m $3 ($(( $2 * $3 )) streams), ${DURATION}s"
  echo "$out" | grep -E '^finished in|^requests:|^time for request:'
  python3 bench/histogram.py "$WORK/before" "$WORK/after" GetUser OK RESOURCE_EXHAUSTED | sed "s/^/   server: /"
}
run "light (1 stream)" 1 1
# "sustainable": where throughput stops growing (SUSTAINABLE="connections
# streams", default 4 x 8); the flood has ten times its connections.
read -r C M <<<"${SUSTAINABLE:-4 8}"
run "sustainable" "$C" "$M"
run "10x sustainable" "$((C * 10))" "$M"
