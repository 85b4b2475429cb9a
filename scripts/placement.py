#!/usr/bin/python3
"""Measures one stream with client and server left to the scheduler, and pinned apart.

All of the bench runs on two cores over loopback, where a packet is received
on the CPU that sent it; for a spliced socket a kworker on the CPU that ran
the verdict sends the bytes on, and so wakes the backend. Where the
scheduler puts the client and the server then weighs on each contender
differently. Per repetition, alternating, this script runs one iperf3 stream
through each contender three times: left to the scheduler (as
`scripts/bench.sh` runs it), with the client pinned to the first CPU and the
server to the last ("apart"), and left to the scheduler again while it
samples every 5 ms the CPU each of them last ran on (the share of samples
where they shared one; that run's throughput is not counted, as sampling
slows the runs it watches).

    scripts/placement.py [--seconds 3] [--reps 3]

Needs root; run scripts/bench.sh once first (it installs the peers and builds
the router). Prints a Markdown table; nothing is written.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The benchmark's own helpers (this script's folder is on sys.path).
from bench import Direct, Haproxy, Nginx, Processes, Router, free_port, iperf_command, iperf_result, med, settle, wait_port

# The peers as their users tune them (bench.py's tuned rows).
CONTENDERS = [Direct, lambda: Router("ebpf"), lambda: Router("copy"), lambda: Haproxy(True), lambda: Nginx(True)]


def last_cpu(pid):
    """The CPU the busiest thread of `pid` last ran on (None once it exited)."""
    busiest = None
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
            cpu_ticks, cpu = int(fields[11]) + int(fields[12]), int(fields[36])
            if busiest is None or cpu_ticks > busiest[0]:
                busiest = (cpu_ticks, cpu)
    except OSError:
        return None
    return busiest and busiest[1]


def iperf3(port, seconds, client_cpu=None):
    """The iperf3 client of one stream, started (pinned to `client_cpu` if set)."""
    command = iperf_command(port, 1, seconds)
    if client_cpu is not None:
        command = ["taskset", "-c", str(client_cpu), *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def finish(client, seconds):
    out, _ = client.communicate(timeout=seconds + 30)
    if client.returncode != 0:
        raise RuntimeError(f"iperf3 exited {client.returncode}")
    return iperf_result(out)["gbit_per_s"]


def stream(port, seconds, client_cpu):
    """Gbit/s of one stream."""
    return finish(iperf3(port, seconds, client_cpu), seconds)


def sharing(port, seconds, server_pid):
    """Share of 5 ms samples of one stream (left to the scheduler) in which
    client and server last ran on the same CPU."""
    client = iperf3(port, seconds)
    shared, samples = 0, 0
    done = threading.Event()

    def sample():
        nonlocal shared, samples
        while not done.wait(0.005):
            cpus = last_cpu(client.pid), last_cpu(server_pid)
            if None not in cpus:
                samples += 1
                shared += cpus[0] == cpus[1]

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        finish(client, seconds)
    finally:
        done.set()
        sampler.join()
    return shared / max(samples, 1)


def summary(values):
    """Median (as the bench's), minimum and maximum."""
    return med(values), min(values), max(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("placement: needs root (the router's eBPF mode)")
    last = os.cpu_count() - 1
    workdir = Path(tempfile.mkdtemp(prefix="placement-"))
    procs = Processes(workdir)
    try:
        servers = {}  # placement -> (port, pid): one iperf3 server each
        for placement, pin in (("free", []), ("apart", ["taskset", "-c", str(last)])):
            port = free_port()
            server = procs.start(f"iperf3-{placement}", [*pin, "iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"])
            wait_port(port, server)
            servers[placement] = (port, server.pid)
        runs = []  # (name, placement, port, server pid)
        for make in CONTENDERS:
            for placement, (backend, server_pid) in servers.items():
                contender = make()
                # One folder per placement: nginx names its pid file.
                (workdir / placement).mkdir(exist_ok=True)
                port = contender.start(procs, workdir / placement, {"kind": "default", "backend": backend})
                settle(contender.pid)
                runs.append((contender.name, placement, port, server_pid))
        results = {}
        for rep in range(args.reps):
            for name, placement, port, server_pid in runs:
                gbit = stream(port, args.seconds, 0 if placement == "apart" else None)
                results.setdefault((name, placement), []).append(gbit)
                print(f"  {name:15} {placement:5} rep {rep + 1}/{args.reps} {gbit:.2f} Gbit/s", file=sys.stderr, flush=True)
                if placement == "free":
                    results.setdefault((name, "shared"), []).append(sharing(port, args.seconds, server_pid))
    finally:
        procs.stop_all()
    direct = {p: summary(results[("direct", p)])[0] for p in servers}
    print(f"One iperf3 stream, {args.seconds} s, {args.reps} repetitions alternating; medians (min–max); "
          f"\"apart\": client on CPU 0, server on CPU {last}.\n")
    print("| contender | free: Gbit/s | free: client and server on one core | apart: Gbit/s | apart / free | of direct, free | of direct, apart |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for make in CONTENDERS:
        name = make().name
        free, apart, shared = (summary(results[(name, p)]) for p in ("free", "apart", "shared"))
        print(f"| {name} | {free[0]:.2f} ({free[1]:.2f}–{free[2]:.2f}) | {shared[0]:.0%} ({shared[1]:.0%}–{shared[2]:.0%}) "
              f"| {apart[0]:.2f} ({apart[1]:.2f}–{apart[2]:.2f}) | {apart[0] / free[0]:.2f} "
              f"| {free[0] / direct['free']:.0%} | {apart[0] / direct['apart']:.0%} |")


if __name__ == "__main__":
    main()
