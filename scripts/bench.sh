#!/usr/bin/env bash
# Side-by-side benchmark of the router against direct, HAProxy (with and
# without splice-auto), nginx stream and socat, on loopback: bulk throughput
# (1 and 64 streams), 64 B request/response latency, new routed connections
# per second (HTTP Host and TLS SNI), scaling to ~10,000 connections, CPU per
# GB. Repetitions interleave the contenders; medians with min/max.
#
#   scripts/bench.sh            # full run, ≤ 15 min: docs/bench/RESULTS.md + SVG plots
#   scripts/bench.sh --quick    # ≈ 1.5 min smoke run: target/bench-quick/RESULTS.md
#   scripts/bench.sh --compare OTHER/router   # A/B of two router builds, both modes,
#                                # interleaved: target/bench-compare/COMPARE.md
#
# Needs root (the router's eBPF mode). Installs its peers from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
peers=(haproxy nginx libnginx-mod-stream socat iperf3 sockperf wrk python3-matplotlib)
missing=()
for package in "${peers[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons; the bench runs its own instances.
systemctl stop haproxy nginx 2>/dev/null || true

cargo build --release --locked -q -p router -p loadgen
# Proxies hold two descriptors per connection: use the whole hard limit.
ulimit -n "$(ulimit -Hn)"
exec /usr/bin/python3 scripts/bench.py --command "scripts/bench.sh $*" "$@"
