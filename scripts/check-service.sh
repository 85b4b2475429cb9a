#!/usr/bin/env bash
# Runs packaging/router.service for real, under systemd, without touching the
# host: boots this machine's own /usr in a throw-away container
# (systemd-nspawn --volatile=yes: empty tmpfs root, private network), installs
# the unit, its sysusers file and a configuration there, then checks that the
# router starts as user `router` with only the unit's capabilities, splices in
# the kernel, and that `systemctl reload` checks the file before sending
# SIGHUP. Takes about a minute; not part of CI (scripts/test.sh runs
# `systemd-analyze verify` and a capability test instead).
#
#   scripts/check-service.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'check-service: %s\n' "$*"; }
die() { printf 'check-service: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (systemd-nspawn)"
if ! command -v systemd-nspawn >/dev/null; then
    say "installing systemd-container"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd-container >/dev/null
fi
cargo build --release -p router -q

work=$(mktemp -d)
nspawn=""
cleanup() {
    [ -n "$nspawn" ] && kill "$nspawn" 2>/dev/null && wait "$nspawn" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

cp target/release/router packaging/router.service "$work/"
cp packaging/router.sysusers "$work/router.conf"
cat >"$work/router.toml" <<'EOF'
listen = ["127.0.0.1:80", "[::1]:80"]
mode = "ebpf"
[health_check]
interval = "500ms"
[[route]]
name = "web"
default = true
backends = ["127.0.0.1:8000", "127.0.0.1:8001"]   # 8001 stays down
proxy_protocol = "v1"
EOF
# The backend: prints the PROXY header line it receives, then answers.
cat >"$work/backend.py" <<'EOF'
import socket
server = socket.create_server(("127.0.0.1", 8000))
while True:
    conn, _ = server.accept()
    data = conn.recv(4096)
    header = data.split(b"\r\n", 1)[0].decode()
    body = (header + "\n").encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    conn.close()
EOF

say "booting a container on this machine's /usr"
systemd-nspawn -D / --volatile=yes --register=no --keep-unit --private-network \
    --machine=router-check --bind-ro="$work:/host" \
    --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN --system-call-filter="bpf perf_event_open" \
    -b -- systemd.firstboot=off systemd.mask=systemd-networkd-wait-online.service \
    </dev/null >"$work/console.log" 2>&1 &
nspawn=$!
init=""
for _ in $(seq 100); do
    init=$(pgrep -P "$nspawn" -x systemd || true)
    [ -n "$init" ] && break
    sleep 0.1
done
[ -n "$init" ] || die "the container did not start: $(tail -5 "$work/console.log")"
inside() { timeout 60 nsenter -t "$init" -a "$@"; }
state=""
for _ in $(seq 120); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.5
done
case "$state" in running|degraded) ;; *) die "the container did not boot (state: ${state:-none})" ;; esac

say "installing the unit (binary in /opt: /usr is the host's, read-only)"
inside sh -ec '
    install -Dm755 /host/router /opt/router/bin/router
    install -Dm644 /host/router.conf /etc/sysusers.d/router.conf
    systemd-sysusers >/dev/null 2>&1
    install -Dm640 -g router /host/router.toml /etc/router/router.toml
    mkdir -p /etc/systemd/system
    sed "s#/usr/local/bin/router#/opt/router/bin/router#g" /host/router.service \
        >/etc/systemd/system/router.service
    systemctl daemon-reload
    nohup python3 /host/backend.py >/dev/null 2>&1 &
    systemctl start router'
pid=$(inside systemctl show -p MainPID --value router)
[ "$pid" -gt 0 ] || die "router.service did not start: $(inside journalctl -u router -n 20 --no-pager -o cat)"
status=$(inside cat "/proc/$pid/status")
user=$(inside ps -o user= -p "$pid")
caps=$(awk '/^CapEff:/ {print $2}' <<<"$status")
say "running as $user, CapEff=$caps, $(grep -E '^NoNewPrivs' <<<"$status" | tr -d '\t')"
[ "$user" = router ] || die "runs as $user"
# CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
[ "$caps" = 000000c000001400 ] || die "unexpected capabilities $caps"

# Type=exec: `systemctl start` returns once the binary runs; the probe
# loads (the verifier takes about a second per core) before it serves.
for _ in $(seq 60); do
    inside journalctl -u router --no-pager -o cat | grep -q 'listening on' && break
    sleep 0.5
done
sleep 2   # a few health checks: 8001 is marked down
for url in http://127.0.0.1/ 'http://[::1]/'; do
    answer=$(inside curl -s --max-time 5 "$url")
    say "GET $url -> backend saw: $answer"
    [[ "$answer" == "PROXY TCP"* ]] || die "no PROXY header reached the backend"
done
inside kill -USR1 "$pid"
sleep 0.5
stats=$(inside journalctl -u router --no-pager -o cat | grep '^stats:' | tail -1)
say "$(grep -oE 'spliced=[0-9]+|backend_failures=[0-9]+|backends_down=[0-9]+|kernel_redirected_bytes=[0-9]+' <<<"$stats" | tr '\n' ' ')"
grep -q 'spliced=2 ' <<<"$stats" || die "not spliced: $stats"
grep -q 'backends_down=1 ' <<<"$stats" || die "8001 not marked down: $(inside journalctl -u router --no-pager -o cat | tail -8)"

inside systemctl reload router || die "reload failed"
inside sh -c 'echo "bogus = 1" >>/etc/router/router.toml'
if inside systemctl reload router 2>/dev/null; then die "a broken file was reloaded"; fi
[ "$(inside systemctl show -p MainPID --value router)" = "$pid" ] || die "the router restarted"
say "ok: reload checks the file first (a broken one fails the reload, the router keeps running)"
