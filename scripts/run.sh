#!/usr/bin/env bash
# Sets up the machine, builds, and starts the router on its embedded demo
# configuration: it starts its own demo backends (A: HTTP, B: TLS with
# openssl s_server, C: echo) and prints curl / openssl / nc commands to paste
# in another terminal. Ctrl-C stops it and its backends.
#
#   scripts/run.sh                              # listens on 127.0.0.1:8080
#   scripts/run.sh --listen 127.0.0.1:18080     # elsewhere
#   scripts/run.sh --mode copy --stats          # any other router flag
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p router
exec target/release/router --demo "$@"
