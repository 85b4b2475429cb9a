#!/usr/bin/env bash
# Sets up the machine, builds, and shows the echo demo end to end: starts
# ebpf-echo, sends bytes over TCP, shows them echoed, and prints the counters
# that prove the bytes were echoed by the eBPF probe in the kernel while
# userspace read none of them. Stops the server when done.
#
#   scripts/demo.sh                # listen on 127.0.0.1:10000
#   DEMO_ADDR=127.0.0.1:10500 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
addr=${DEMO_ADDR:-127.0.0.1:10000}
host=${addr%:*}
port=${addr##*:}

scripts/setup.sh
cargo build --release --locked -q -p echo
bin=target/release/ebpf-echo

out=$(mktemp)
"$bin" --listen "$addr" --mode ebpf > "$out" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$out" && break; sleep 0.05; done
grep -q "listening on" "$out" || { cat "$out"; exit 1; }
head -n1 "$out"

echo_once() { # send $1, print what comes back (the connection stays open: no FIN)
    exec 3<>"/dev/tcp/$host/$port"
    printf '%s' "$1" >&3
    local reply
    reply=$(timeout 2 head -c "${#1}" <&3)
    exec 3>&-
    printf 'sent %-30s echoed %s\n' "\"$1\"" "\"$reply\""
}
echo_once "hello from userspace"
echo_once "echoed by the kernel"
echo_once "bytes before the insert too"

# 64 MiB through the probe, compared by hash, from a client that reads what
# it sends (never more than 2 MiB ahead of the echo).
timeout 60 python3 - "$host" "$port" <<'PY'
import hashlib, os, socket, sys, threading
data = os.urandom(64 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
received = 0
room = threading.Condition()
def send():
    for i in range(0, len(data), 1 << 18):
        with room:
            room.wait_for(lambda: i - received < 2 << 20)
        s.sendall(data[i:i + (1 << 18)])
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
got = hashlib.sha256()
while chunk := s.recv(1 << 16):
    got.update(chunk)
    with room:
        received += len(chunk)
        room.notify()
sent = hashlib.sha256(data).hexdigest()
print(f"sent 64 MiB, echoed {received} bytes: sha256 {'equal' if got.hexdigest() == sent else 'DIFFERENT'} ({sent[:16]}...)")
PY

kill -USR1 "$server"; sleep 0.3
line=$(grep '^stats:' "$out" | tail -n1)
echo "$line"
kernel=$(grep -o 'kernel_redirected_bytes=[0-9]*' <<<"$line" | cut -d= -f2)
user=$(grep -o 'userspace_bytes=[0-9]*' <<<"$line" | cut -d= -f2)
echo
echo "=> the probe redirected $kernel bytes inside the kernel; userspace read $user bytes."
echo "   Run it yourself: $bin --stats   (then: nc $host $port)"
