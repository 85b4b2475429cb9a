#!/usr/bin/env bash
# Echo throughput, in-kernel (ebpf) vs userspace (copy), measured side by
# side in one run: both servers run at once, the workloads alternate between
# them, each repeated; medians with min/max. Loopback only.
#
#   scripts/bench-echo.sh                 # 5 repetitions x 3 s per point
#   REPS=3 SECONDS_PER_RUN=2 scripts/bench-echo.sh
#
# Writes docs/bench/ECHO.md.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-5}
seconds=${SECONDS_PER_RUN:-3}
out=docs/bench/ECHO.md

scripts/setup.sh >/dev/null
cargo build --release --locked -q -p echo -p loadgen
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

start() { # mode: starts a server on a free port
    RUST_LOG=${RUST_LOG:-warn} target/release/ebpf-echo --listen 127.0.0.1:0 --mode "$1" >"$dir/$1.out" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do grep -q "listening on" "$dir/$1.out" && return; sleep 0.05; done
    cat "$dir/$1.out" >&2
    exit 1
}
address() { grep -o 'listening on [0-9.:]*' "$dir/$1.out" | cut -d' ' -f3; }
start ebpf
start copy
ebpf=$(address ebpf)
copy=$(address copy)

results="$dir/results"
: >"$results"
for rep in $(seq "$reps"); do
    for conns in 1 8 64; do
        for mode in ebpf copy; do
            addr=$ebpf; [ "$mode" = copy ] && addr=$copy
            line=$(target/release/loadgen echo --addr "$addr" --connections "$conns" --seconds "$seconds")
            echo "$mode $conns $(grep -o 'gbit_per_s=[0-9.]*' <<<"$line" | cut -d= -f2)" >>"$results"
            echo "rep $rep: $mode $conns connections: $line" >&2
        done
    done
done

python3 - "$results" "$reps" "$seconds" >"$out" <<'PY'
import statistics, subprocess, sys, platform
rows = [line.split() for line in open(sys.argv[1])]
reps, seconds = sys.argv[2], sys.argv[3]
def values(mode, conns):
    return [float(r[2]) for r in rows if r[0] == mode and r[1] == conns]
def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"
print("# Echo throughput: in-kernel (ebpf) vs userspace (copy)\n")
print(f"Command: `scripts/bench-echo.sh` (REPS={reps}, SECONDS_PER_RUN={seconds}): both servers")
print("run at once on all cores; `loadgen echo` streams 64 KiB writes, at most 4 MiB ahead of")
print("the echo it read back, and counts echoed bytes; runs alternate between the modes.\n")
print(f"Machine: {platform.node()}, kernel {platform.release()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; {ver(['rustc', '--version'])}.\n")
print("| connections | ebpf Gbit/s median (min-max) | copy Gbit/s median (min-max) | ebpf / copy |")
print("|---:|---:|---:|---:|")
for conns in ["1", "8", "64"]:
    e, c = values("ebpf", conns), values("copy", conns)
    me, mc = statistics.median(e), statistics.median(c)
    print(f"| {conns} | {me:.2f} ({min(e):.2f}-{max(e):.2f}) | {mc:.2f} ({min(c):.2f}-{max(c):.2f}) | {me/mc:.2f} |")
print("\nClient and servers share the machine's cores, so these are echo rates under load, not")
print("ceilings. See docs/performance.md for what limits the in-kernel echo.")
PY
cat "$out"
