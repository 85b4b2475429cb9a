#!/usr/bin/python3
"""Measures how long a burst takes through the router after the connection
was idle, with many other idle connections held.

The flow control looks at an idle (cold) source once per 100 ms, a slice of
the connections per scan. A source that sends more than its window of
credit after idle needs the scan to see the bytes the probe passed up; this
script shows whether that waits for the source's slice. It holds `--hold`
idle connections through `router --mode ebpf` (loadgen hold, routed by a
preamble), then sends `--mib` MiB bursts on one more connection, each after
1 s of idle, to a backend that reads as fast as it can, and prints how long
each burst took to reach the backend, with the probe's counters.

    scripts/burst-after-idle.py [--router target/release/router] [--mib 64] [--hold 4000]

Needs root (BPF); run scripts/bench.sh once first (it builds the router and
loadgen).
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

BURSTS = 6
IDLE_S = 1.0
BURST_TIMEOUT_S = 10.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", default=bench.ROUTER)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--hold", type=int, default=4000)
    args = parser.parse_args()
    bench.ROUTER = args.router
    workdir = Path(tempfile.mkdtemp(prefix="burst-after-idle-"))
    procs = bench.Processes(workdir)
    sink = socket.create_server(("127.0.0.1", 0))
    received = [0]
    lock = threading.Lock()

    def read_all():
        conn, _ = sink.accept()
        while data := conn.recv(1 << 20):
            with lock:
                received[0] += len(data)

    threading.Thread(target=read_all, daemon=True).start()
    hold = None
    try:
        idle = bench.free_port()
        procs.start("idle", [bench.LOADGEN, "serve", "--listen", f"127.0.0.1:{idle}", "--reply", "k"])
        bench.wait_port(idle)
        router = bench.Router("ebpf")
        port = router.start(procs, workdir, {"kind": "default", "backend": sink.getsockname()[1], "idle": idle})
        hold = subprocess.Popen(
            [bench.LOADGEN, "hold", "--addr", f"127.0.0.1:{port}", "--first", "ROUTE idle\\r\\nx",
             "--connections", str(args.hold), "--seconds", "120"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hold.stdout.readline()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"x")  # no known protocol: the default route, to the sink
        chunk = b"z" * (1 << 20)
        took_ms = []
        for _ in range(BURSTS):
            time.sleep(IDLE_S)
            with lock:
                start = received[0]
            began = time.monotonic()
            for _ in range(args.mib):
                client.sendall(chunk)
            while time.monotonic() - began < BURST_TIMEOUT_S:
                with lock:
                    if received[0] - start >= args.mib << 20:
                        break
                time.sleep(0.0005)
            took_ms.append(round((time.monotonic() - began) * 1000))
        os.kill(router.pid, signal.SIGUSR1)
        time.sleep(0.3)
        log = "".join(p.read_text(errors="replace") for p in workdir.glob("*") if p.is_file())
        stats = [line for line in log.splitlines() if "kernel_credit_exhausted" in line]
        counters = re.findall(r"kernel_(?:credit_exhausted|passed_bytes)=\d+", stats[-1]) if stats else []
        print(f"{args.mib} MiB bursts after {IDLE_S:.0f} s idle, {args.hold} idle connections held: "
              f"ms {took_ms}; {' '.join(counters)}")
    finally:
        if hold:
            hold.stdin.close()
            hold.wait(30)
        procs.stop_all()


if __name__ == "__main__":
    main()
