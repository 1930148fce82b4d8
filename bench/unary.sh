#!/usr/bin/env bash
# The unary figures of BENCHMARKS.md: user-bench's default scenarios
# (ceiling, get, lookup, create, update) with h2load run beside user-bench's
# own generator for ceiling, get and lookup in the same run.
#
#   bench/unary.sh [user-bench options...]
#   bench/unary.sh --database-url postgres://postgres@127.0.0.1:5432/bench
#
# Installs h2load (Debian's nghttp2-client) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
cargo build --release --bins -q
exec target/release/user-bench "$@"
