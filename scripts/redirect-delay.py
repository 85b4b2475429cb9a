#!/usr/bin/python3
"""Measures where the spliced round trip's added latency goes.

An sk_skb verdict that redirects to a socket's egress does not send in the
softirq that ran it: the kernel queues the buffer on the peer's psock and
schedules a work item (sk_psock_skb_redirect → schedule_delayed_work), and a
kworker sends it (sk_psock_backlog). This script runs sockperf ping-pong
(64 B) directly and through `router --mode ebpf` on loopback, and traces the
workqueue events of sk_psock_backlog during the routed run: the delay from
queueing to the kworker starting, and how long each backlog run takes. A
64 B request/response crosses the router twice (request, reply), so twice the
hop delay is added to every round trip however fast the verdict is.

    scripts/redirect-delay.py [--seconds 3]

Needs root and tracefs; run scripts/bench.sh once first (it installs
sockperf and builds the router).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The benchmark's own helpers (this script's folder is on sys.path).
from bench import ROUTER, free_port, sockperf_ping_pong, wait_port

TRACING = Path("/sys/kernel/tracing")
EVENTS = ["workqueue_queue_work", "workqueue_execute_start", "workqueue_execute_end"]
LINE = re.compile(r"\s(\d+\.\d+): (workqueue_\w+): work struct[= ](\w+)")


def sockperf(port, seconds):
    """(p50, p99, p99.9 in µs, round trips) of a 64 B ping-pong."""
    pct, round_trips = sockperf_ping_pong(port, seconds)
    return pct["50.000"], pct["99.000"], pct["99.900"], round_trips


def trace(enable):
    for event in EVENTS:
        path = TRACING / "events/workqueue" / event
        (path / "filter").write_text("function.function == sk_psock_backlog\n" if enable else "0\n")
        (path / "enable").write_text("1\n" if enable else "0\n")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("redirect-delay: needs root (tracefs, the router's eBPF mode)")
    if not (TRACING / "events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=True)
    for tool in ("sockperf",):
        if not shutil.which(tool):
            sys.exit(f"redirect-delay: {tool} missing (scripts/bench.sh installs it)")
    if not ROUTER.exists():
        sys.exit("redirect-delay: target/release/router missing (cargo build --release -p router)")

    backend_port, router_port = free_port(), free_port()
    procs = [subprocess.Popen(["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(backend_port)], stdout=subprocess.DEVNULL)]
    try:
        wait_port(backend_port)
        procs.append(subprocess.Popen(
            [ROUTER, "--listen", f"127.0.0.1:{router_port}", "--mode", "ebpf", f"--route=default=127.0.0.1:{backend_port}"],
            env={**os.environ, "RUST_LOG": "warn"},
        ))
        wait_port(router_port)
        direct = sockperf(backend_port, args.seconds)
        (TRACING / "buffer_size_kb").write_text("65536\n")
        (TRACING / "trace").write_text("")
        trace(True)
        try:
            routed = sockperf(router_port, args.seconds)
        finally:
            trace(False)
        text = (TRACING / "trace").read_text()
        (TRACING / "trace").write_text("")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)

    queued, started, delays, runs = {}, {}, [], []
    lost = "LOST" in text
    for m in LINE.finditer(text):
        at, event, work = float(m.group(1)) * 1e6, m.group(2), m.group(3)
        if event == "workqueue_queue_work":
            queued[work] = at
        elif event == "workqueue_execute_start":
            if work in queued:
                delays.append(at - queued.pop(work))
            started[work] = at
        elif work in started:
            runs.append(at - started.pop(work))

    def row(name, values):
        return f"| {name} | {len(values)} | {percentile(values, .5):.1f} | {percentile(values, .99):.1f} | {percentile(values, .999):.1f} |"

    print(f"Command: `scripts/redirect-delay.py --seconds {args.seconds}`; kernel {os.uname().release}\n")
    print("| sockperf ping-pong 64 B, µs | round trips | p50 | p99 | p99.9 |\n|---|---:|---:|---:|---:|")
    print(f"| direct | {direct[3]} | {direct[0]:.1f} | {direct[1]:.1f} | {direct[2]:.1f} |")
    print(f"| router ebpf | {routed[3]} | {routed[0]:.1f} | {routed[1]:.1f} | {routed[2]:.1f} |")
    print(f"| added by the router | | {routed[0] - direct[0]:.1f} | {routed[1] - direct[1]:.1f} | {routed[2] - direct[2]:.1f} |\n")
    print("| sk_psock_backlog (kworker), µs | count | p50 | p99 | p99.9 |\n|---|---:|---:|---:|---:|")
    print(row("queued → kworker starts", delays))
    print(row("kworker run (sends the buffer)", runs))
    if routed[3]:
        print(f"\nbacklog runs per round trip: {len(runs) / routed[3]:.2f}" + (" (trace buffer overflowed: counts low)" if lost else ""))


if __name__ == "__main__":
    main()
