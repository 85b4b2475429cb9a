#!/usr/bin/env bash
# Side-by-side benchmark of the router against direct, HAProxy, nginx stream
# and socat, each peer both as its users tune it for these workloads ("tuned",
# what the goal rows compare with) and with its default buffers ("(defaults)"),
# on loopback: bulk throughput (1 and 64 streams), 64 B request/response
# latency, new routed connections per second (HTTP Host and TLS SNI), small
# request/response (redis-benchmark, 50 connections, 64 B values), scaling to
# ~10,000 connections with RSS per connection, CPU per GB. Repetitions
# interleave the contenders; medians with min/max. The report prints every
# peer's whole configuration.
#
#   scripts/bench.sh            # full run, ~25 min: docs/bench/RESULTS.md + SVG plots
#   scripts/bench.sh --quick    # < 2 min smoke run: target/bench-quick/RESULTS.md
#   scripts/bench.sh --compare OTHER/router   # A/B of two router builds, both modes,
#                                # interleaved: target/bench-compare/COMPARE.md
#   scripts/bench.sh --skip bulk1,scaling     # measure only the other workloads
#
# Needs root (the router's eBPF mode). Installs its peers from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
peers=(haproxy nginx libnginx-mod-stream socat iperf3 sockperf wrk redis-server redis-tools python3-matplotlib)
missing=()
for package in "${peers[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]}" >&2
    # A machine whose package lists are missing or stale gets them first.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
# Debian starts the packaged daemons; the bench runs its own instances.
systemctl stop haproxy nginx redis-server 2>/dev/null || true

cargo build --release --locked -q -p router -p loadgen
# Proxies hold two descriptors per connection: use the whole hard limit.
ulimit -n "$(ulimit -Hn)"
exec /usr/bin/python3 scripts/bench.py --command "scripts/bench.sh $*" "$@"
