#!/usr/bin/env bash
# The long variants of the reliability tests (CI runs short ones), each
# bounded in time, one after the other; prints each test's figures.
#
#   scripts/soak.sh                 # all of them (about 15 minutes)
#   scripts/soak.sh concurrent      # only one: concurrent | sequential | slow-reader
#
# Scales (environment, defaults below):
#   SOAK_CONNECTIONS=9800 SOAK_SECONDS=60   concurrent connections with random traffic
#   SOAK_SEQUENTIAL=200000                  sequential short connections
#   SLOW_READER_SECONDS=60                  a 1 KiB/s reader against a fast sender
#
# Why 9,800 and not 10,000 concurrent connections: the open-files hard
# limit here is 20,000 per process and cannot be raised (no
# CAP_SYS_RESOURCE); the router holds two descriptors per connection, and
# the test process holds the clients and the echo backend's sockets.
# The fuzzing long run is scripts/fuzz.sh long.
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_CONNECTIONS=${SOAK_CONNECTIONS:-9800}
export SOAK_SECONDS=${SOAK_SECONDS:-60}
export SOAK_SEQUENTIAL=${SOAK_SEQUENTIAL:-200000}
export SLOW_READER_SECONDS=${SLOW_READER_SECONDS:-60}
export CI=${CI:-true}

run() { # test file, test name
    printf '\n==> %s (%s)\n' "$2" "$1"
    timeout 1800 cargo test --locked -q -p router --test "$1" -- --exact "$2" --nocapture 2>&1 \
        | grep -vE '^(running|test result|$)'
}

which=${1:-all}
case "$which" in
    all | concurrent | sequential | slow-reader) ;;
    *) echo "usage: $0 [all|concurrent|sequential|slow-reader]" >&2; exit 2 ;;
esac
if [ "$which" = all ] || [ "$which" = concurrent ]; then
    run reliability concurrent_connections_exchange_random_traffic_without_error
fi
if [ "$which" = all ] || [ "$which" = sequential ]; then
    run router closed_connections_leave_no_route_slot_or_descriptor
fi
if [ "$which" = all ] || [ "$which" = slow-reader ]; then
    run reliability a_slow_reader_holds_the_sender_back_without_buffering
fi
