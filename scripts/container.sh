#!/usr/bin/env bash
# The router as an OCI image, and its tests in containers (docs/containers.md).
#
#   scripts/container.sh build   # the image localhost/ebpf-router:latest
#   scripts/container.sh test    # build if needed, then test it for real
#
# `build` installs what it needs first (podman, buildah, runc, and the
# /etc/containers/containers.conf settings this kind of host needs), once,
# and says what it changed. The image is made FROM scratch (no registry is
# reachable): the release binary, the libraries `ldd` lists and the loader,
# router.example.toml as /etc/ebpf-router/router.toml, a non-root user.
#
# `test` runs, on loopback and the host's network only:
#   1. podman run as the non-root user, read-only root, only BPF, NET_ADMIN
#      and PERFMON added: curl by Host, openssl s_client by SNI and a
#      preamble client are routed, and a bulky echo is spliced in the kernel (/metrics);
#      `podman kill --signal HUP` reloads; `podman stop` drains;
#   2. the same without capabilities: --mode auto copies and says why;
#   3. an upgrade: a second container started with --upgrade-from on a
#      shared /run/router takes over the listeners and a live connection,
#      with short connections arriving throughout, none failed;
#   4. deploy/kubernetes/ against the API schemas (kubernetes-validate, in
#      a venv under target/), then `podman kube play` of the Deployment:
#      it serves, and reloads when its ConfigMap file is swapped;
#   5. two routers behind HAProxy (health checks on /readyz): one stopped
#      during 1,000 short connections, none fails.
# With CI=true a step that cannot run fails; elsewhere it is skipped with
# the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=localhost/ebpf-router:latest
IMAGE_CONFIG=/etc/ebpf-router/router.toml
METRICS_PORT=9100
# The user the router runs as inside the image (the "nonroot" id of
# distroless images).
UID_INSIDE=65532
# Loopback ports of the tests: BASE+1.. backends, BASE+10.. routers.
BASE=${CONTAINER_TEST_PORT_BASE:-18800}
WORK=target/container
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
# The runtime's default seccomp profile plus io_uring and bpf(2).
SECCOMP=deploy/seccomp/ebpf-router.json

say() { printf 'container: %s\n' "$*"; }
die() { printf 'container: error: %s\n' "$*" >&2; exit 1; }
step() { printf '\n==> container: %s\n' "$*"; }

# --- what the host needs ---------------------------------------------------

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends)
    "${apt[@]}" "${missing[@]}" >/dev/null 2>&1 || {
        apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
        "${apt[@]}" "${missing[@]}" >/dev/null
    }
}

# crun 1.8 fails here ("cgroups in hybrid mode not supported") and podman
# cannot set its default ulimits: runc, and no default ulimits (the host's
# are inherited). Written if the file is absent or ours; another file must
# carry both settings already.
CONTAINERS_CONF=/etc/containers/containers.conf
ensure_containers_conf() {
    local marker='# Written by ebpf-router scripts/container.sh'
    local wanted="$marker (docs/containers.md): runc, as crun 1.8
# fails on hybrid cgroups; no default ulimits, which podman cannot set here.
[containers]
default_ulimits = []

[engine]
runtime = \"runc\""
    if [ -f "$CONTAINERS_CONF" ] && [ "$(cat "$CONTAINERS_CONF")" = "$wanted" ]; then
        return
    fi
    if [ -f "$CONTAINERS_CONF" ] && ! head -n1 "$CONTAINERS_CONF" | grep -qF "$marker"; then
        { grep -q '^default_ulimits *= *\[\]' "$CONTAINERS_CONF" && grep -q '^runtime *= *"runc"' "$CONTAINERS_CONF"; } \
            || die "$CONTAINERS_CONF exists and lacks 'default_ulimits = []' under [containers] or 'runtime = \"runc\"' under [engine]: add them (docs/containers.md)"
        return
    fi
    mkdir -p "$(dirname "$CONTAINERS_CONF")"
    printf '%s\n' "$wanted" >"$CONTAINERS_CONF"
    say "wrote $CONTAINERS_CONF: runtime = \"runc\", default_ulimits = []"
}

ensure_tools() {
    [ "$(id -u)" = 0 ] || die "run as root: podman here is rootful (the probes need CAP_BPF anyway)"
    apt_install podman buildah runc libcap2-bin "$@"
    ensure_containers_conf
}

# --- build -----------------------------------------------------------------

# Copies `$1` into the root file system `$2` at the same path, following
# links (ldd names the links; the image needs the files).
copy_in() {
    mkdir -p "$2$(dirname "$1")"
    cp -L "$1" "$2$1"
}

build() {
    ensure_tools
    local started=$SECONDS
    say "cargo build --release (router)"
    cargo build --release --locked -q -p router --bin router
    local binary=target/release/router
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ebpf-router" "$rootfs/tmp"
    # No debug sections in the image (the release profile keeps some).
    objcopy --strip-debug "$binary" "$rootfs/usr/local/bin/router"
    # glibc's dynamic binary: the libraries it links and the loader. (A
    # static musl build would need glommio's liburing to build for musl.)
    local lib
    for lib in $(ldd "$binary" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }'); do
        copy_in "$lib" "$rootfs"
    done
    [ -e "$rootfs/lib64/ld-linux-x86-64.so.2" ] || die "ldd listed no loader for $binary"
    cp router.example.toml "$rootfs$IMAGE_CONFIG"
    printf 'root:x:0:0:root:/:/nonexistent\nrouter:x:%s:%s:ebpf-router:/:/nonexistent\n' "$UID_INSIDE" "$UID_INSIDE" >"$rootfs/etc/passwd"
    printf 'root:x:0:\nrouter:x:%s:\n' "$UID_INSIDE" >"$rootfs/etc/group"
    chmod 1777 "$rootfs/tmp"
    # Permitted (not effective) file capabilities: a runtime that gives a
    # non-root user no ambient capabilities (Kubernetes) still lets it
    # have those of the bounding set the pod adds; the router makes them
    # effective itself, and starts (and says what is missing) without them.
    setcap cap_bpf,cap_net_admin,cap_perfmon,cap_net_bind_service=p "$rootfs/usr/local/bin/router"
    local digest
    digest=$(cd "$rootfs" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
    if podman image exists "$IMAGE" \
        && [ "$(podman image inspect --format '{{ index .Labels "io.ebpf-router.content" }}' "$IMAGE")" = "$digest" ]; then
        say "$IMAGE is up to date ($(image_size))"
        return
    fi
    local container mount
    container=$(buildah from scratch)
    mount=$(buildah mount "$container")
    # cp -a keeps the file capability (an extended attribute).
    cp -a "$rootfs/." "$mount/"
    buildah umount "$container" >/dev/null
    buildah config \
        --entrypoint '["/usr/local/bin/router"]' \
        --cmd "--config $IMAGE_CONFIG" \
        --user "$UID_INSIDE:$UID_INSIDE" \
        --port "$METRICS_PORT/tcp" \
        --stop-signal SIGTERM \
        --label org.opencontainers.image.title=ebpf-router \
        --label org.opencontainers.image.description="Thread-per-core L4 router that splices TCP in the kernel with eBPF" \
        --label org.opencontainers.image.version="$(cargo pkgid -p router | sed 's/.*[#@]//')" \
        --label io.ebpf-router.config="$IMAGE_CONFIG" \
        --label io.ebpf-router.metrics-port="$METRICS_PORT" \
        --label io.ebpf-router.capabilities="BPF,NET_ADMIN,PERFMON (and NET_BIND_SERVICE to listen below 1024)" \
        --label io.ebpf-router.content="$digest" \
        "$container"
    buildah commit -q --rm "$container" "$IMAGE" >/dev/null
    say "built $IMAGE in $((SECONDS - started)) s: $(image_size)"
}

image_size() {
    podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.1f MB", $1 / 1e6 }'
}

# --- test helpers ------------------------------------------------------------

# Which test step cannot run: fail under CI, skip with the reason elsewhere.
cannot() {
    if [ "${CI:-}" = true ]; then die "$*"; fi
    say "SKIPPED: $*"
}

PIDS=()
CONTAINERS=()
cleanup() {
    local c p
    for c in "${CONTAINERS[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -n "${KUBE_PLAYED:-}" ]; then podman kube down "$KUBE_PLAYED" >/dev/null 2>&1 || true; fi
}

background() {
    "$@" >/dev/null 2>&1 &
    PIDS+=("$!")
}

port_free() {
    ! ss -Htln "sport = :$1" | grep -q .
}

# Waits (up to 10 s) until port $1 can be bound as the router binds it
# (SO_REUSEADDR and SO_REUSEPORT: the stopped router's connections in
# TIME-WAIT do not count then, as they do for a bind without
# SO_REUSEPORT). Fails naming what holds it.
wait_port_free() {
    local bind="import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); s.bind(('127.0.0.1', $1))"
    wait_for "port_free $1 && python3 -c \"$bind\"" 10 \
        || die "port $1 is still held: $(ss -Htanp "sport = :$1" | tr -s ' ' | paste -sd';' -)"
}

# Waits (up to $2 s) until `$1` (a command) succeeds.
wait_for() {
    local deadline=$((SECONDS + $2))
    until eval "$1" >/dev/null 2>&1; do
        [ $SECONDS -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

metric() {
    curl -fsS "http://127.0.0.1:$1/metrics" | awk -v name="$2" '$1 == name { print $2; found = 1 } END { if (!found) print "none" }'
}

expect() {
    local what=$1 got=$2 want=$3
    [ "$got" = "$want" ] || die "$what: got '$got', want '$want'"
    say "ok: $what"
}

# Replaces the file `$1` with `$2` at once (write, then rename), as an
# operator's tooling does.
replace_file() {
    printf '%s\n' "$2" >"$1.next"
    chmod 644 "$1.next"
    mv "$1.next" "$1"
}

ROUTER_PORT=$((BASE + 10))
ROUTER_METRICS=$((BASE + 19))

# The configuration of the podman run tests: host, SNI and preamble routes
# to the backends on loopback; `$1` adds a route.
run_config() {
    cat <<EOF
listen = ["127.0.0.1:$ROUTER_PORT"]
metrics = "127.0.0.1:$ROUTER_METRICS"
drain_timeout = "20s"

[[route]]
name = "a"
host = "a.test"
backends = ["127.0.0.1:$((BASE + 1))"]

[[route]]
name = "tls"
sni = "tls.test"
backends = ["127.0.0.1:$((BASE + 3))"]

[[route]]
name = "db"
preamble = "db"
token = "s3cret"
backends = ["127.0.0.1:$((BASE + 4))"]
${1:-}
EOF
}

start_backends() {
    local dir=$1
    background python3 scripts/netkit.py http $((BASE + 1)) backend-a
    background python3 scripts/netkit.py http $((BASE + 2)) backend-b
    background python3 scripts/netkit.py echo $((BASE + 4))
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=tls-backend \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" >/dev/null 2>&1
    background openssl s_server -quiet -accept "127.0.0.1:$((BASE + 3))" -cert "$dir/cert.pem" -key "$dir/key.pem" -www
    wait_for "! port_free $((BASE + 1)) && ! port_free $((BASE + 2)) && ! port_free $((BASE + 3)) && ! port_free $((BASE + 4))" 10 \
        || die "the test backends did not start"
}

# The podman run flags of the least-privileged router: non-root (the
# image's user), read-only root, every capability dropped but `$1`, the
# default seccomp profile with io_uring and bpf(2) allowed.
least_privileged() {
    local flags=(--network host --read-only --cap-drop all --security-opt "seccomp=$PWD/$SECCOMP")
    [ -n "$1" ] && flags+=(--cap-add "$1")
    printf '%s\n' "${flags[@]}"
}

# Routes a curl by Host, an openssl s_client by SNI and a preamble client
# through the router on ROUTER_PORT.
route_three_ways() {
    expect "curl by Host a.test" "$(curl -fsS --max-time 5 -H 'Host: a.test' "http://127.0.0.1:$ROUTER_PORT/")" backend-a
    local tls
    tls=$(openssl s_client -connect "127.0.0.1:$ROUTER_PORT" -servername tls.test </dev/null 2>/dev/null | grep -c 'subject=.*CN *= *tls-backend' || true)
    expect "openssl s_client by SNI tls.test reaches the TLS backend" "$tls" 1
    python3 scripts/netkit.py hold "127.0.0.1:$ROUTER_PORT" "ROUTE db s3cret" 0.2 >/dev/null \
        || die "the preamble client (ROUTE db s3cret) was not echoed"
    say "ok: preamble client ROUTE db s3cret echoed"
}

test_podman_run() {
    local dir=$1
    step "podman run: non-root, read-only root, only BPF, NET_ADMIN, PERFMON; --mode ebpf"
    mkdir -p "$dir/etc"
    chmod 755 "$dir" "$dir/etc"
    replace_file "$dir/etc/router.toml" "$(run_config)"
    local name=ebpf-router-test-run
    CONTAINERS+=("$name")
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    mapfile -t flags < <(least_privileged BPF,NET_ADMIN,PERFMON)
    podman run -d --name "$name" "${flags[@]}" -v "$PWD/$dir/etc:/etc/ebpf-router:ro" \
        "$IMAGE" --config "$IMAGE_CONFIG" --mode ebpf >/dev/null
    wait_for "curl -fsS http://127.0.0.1:$ROUTER_METRICS/readyz" 20 \
        || { podman logs "$name" >&2; die "the router container did not become ready"; }
    expect "user inside (and its id on the host)" "$(podman top "$name" user huser | tail -n1 | xargs)" "router $UID_INSIDE"
    expect "effective capabilities once serving" "$(podman top "$name" capeff | tail -n1 | tr -d ' ')" NET_ADMIN
    expect "read-only root" "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name")" true
    local before
    before=$(metric "$ROUTER_METRICS" router_kernel_redirected_bytes_total)
    [ "$before" != none ] || die "no kernel counters on /metrics: not splicing"
    route_three_ways
    # Short exchanges stay in userspace (the lazy splice); a bulky one moves
    # into the kernel past `splice_after`.
    python3 scripts/netkit.py bulk "127.0.0.1:$ROUTER_PORT" "ROUTE db s3cret" 1048576 >/dev/null \
        || die "a 1 MiB echo through the preamble route was not intact"
    local after
    after=$(metric "$ROUTER_METRICS" router_kernel_redirected_bytes_total)
    [ "$after" -gt "$before" ] || die "router_kernel_redirected_bytes_total did not grow ($before -> $after)"
    say "ok: a 1 MiB echo spliced in the kernel mid-stream: router_kernel_redirected_bytes_total $before -> $after"

    step "podman kill --signal HUP reloads the mounted configuration"
    [ "$(curl -sS --max-time 5 -H 'Host: b.test' "http://127.0.0.1:$ROUTER_PORT/" -o /dev/null -w '%{http_code}' || true)" != 200 ] \
        || die "b.test is routed before the reload"
    replace_file "$dir/etc/router.toml" "$(run_config "[[route]]
name = \"b\"
host = \"b.test\"
backends = [\"127.0.0.1:$((BASE + 2))\"]")"
    podman kill --signal HUP "$name" >/dev/null
    wait_for "[ \"\$(curl -fsS --max-time 2 -H 'Host: b.test' http://127.0.0.1:$ROUTER_PORT/)\" = backend-b ]" 5 \
        || die "b.test not routed 5 s after SIGHUP: $(podman logs "$name" 2>&1 | tail -n3)"
    say "ok: after SIGHUP, b.test reaches backend-b"

    step "podman stop drains: a live connection finishes, readiness turns false, exit 0"
    local hold_log=$dir/hold.log
    python3 scripts/netkit.py hold "127.0.0.1:$ROUTER_PORT" "ROUTE db s3cret" 3 >"$hold_log" 2>&1 &
    local holder=$!
    sleep 0.5
    local stop_started=$SECONDS stop_ms
    stop_ms=$(date +%s%3N)
    podman stop -t 25 "$name" >/dev/null &
    local stopper=$!
    wait_for "[ \"\$(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:$ROUTER_METRICS/readyz)\" = 503 ]" 2 \
        || die "/readyz did not turn 503 while draining"
    say "ok: /readyz answers 503 while draining"
    ! curl -sS --max-time 2 -H 'Host: a.test' "http://127.0.0.1:$ROUTER_PORT/" >/dev/null 2>&1 \
        || die "a new connection was served while draining"
    say "ok: new connections are refused while draining"
    wait "$holder" || die "the live connection failed during the drain: $(cat "$hold_log")"
    say "ok: the live connection finished during the drain: $(cat "$hold_log")"
    wait "$stopper" || die "podman stop failed"
    STOP_SECONDS=$(awk -v ms=$(($(date +%s%3N) - stop_ms)) 'BEGIN { printf "%.2f", ms / 1000 }')
    [ $((SECONDS - stop_started)) -lt 25 ] || die "podman stop took its whole timeout"
    expect "exit status after podman stop" "$(podman inspect --format '{{.State.ExitCode}}' "$name")" 0
    # The whole log first: `grep -q` stops reading at the first match, and
    # under pipefail the writer's SIGPIPE would fail the check.
    local log
    log=$(podman logs "$name" 2>&1)
    grep -q 'drained: every connection ended' <<<"$log" || die "no 'drained' line in the log"
    say "ok: podman stop took ${STOP_SECONDS} s (the live connection's last 2.5 s), drained, exit 0"
    podman rm "$name" >/dev/null

    step "podman run without the capabilities: --mode auto copies and says why"
    name=ebpf-router-test-nocaps
    CONTAINERS+=("$name")
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    mapfile -t flags < <(least_privileged "")
    wait_port_free "$ROUTER_PORT"
    podman run -d --name "$name" "${flags[@]}" -v "$PWD/$dir/etc:/etc/ebpf-router:ro" \
        "$IMAGE" --config "$IMAGE_CONFIG" --mode auto >/dev/null
    wait_for "curl -fsS http://127.0.0.1:$ROUTER_METRICS/readyz" 20 \
        || { podman logs "$name" >&2; die "the router container without capabilities did not become ready"; }
    route_three_ways
    local why
    why=$(podman logs "$name" 2>&1 | grep -c 'missing capability.*forwarding in userspace' || true)
    expect "log lines saying why it copies" "$why" 1
    say "ok: $(podman logs "$name" 2>&1 | grep -o 'missing capability [A-Z_ and]*' | head -n1)"
    expect "kernel counters without the probe" "$(metric "$ROUTER_METRICS" router_kernel_redirected_bytes_total)" none
    podman stop -t 25 "$name" >/dev/null
    podman rm "$name" >/dev/null
}

# docs/containers.md's upgrade: a second container takes over from the
# first through the upgrade socket on a shared /run/router, with a live
# connection and new ones arriving throughout.
test_upgrade() {
    local dir=$1
    step "podman run --upgrade-from: a new container takes over the listeners and a live connection"
    mkdir -p "$dir/run"
    chown "$UID_INSIDE" "$dir/run"
    chmod 700 "$dir/run"
    local old=ebpf-router-test-upgrade-1 new=ebpf-router-test-upgrade-2 name
    CONTAINERS+=("$old" "$new")
    podman rm -f -t 0 "$old" "$new" >/dev/null 2>&1 || true
    mapfile -t flags < <(least_privileged BPF,NET_ADMIN,PERFMON)
    # As docs/containers.md says: the same flags for both.
    local same=("${flags[@]}" -v "$PWD/$dir/etc:/etc/ebpf-router:ro"
        -v "$PWD/$dir/run:/run/router" "$IMAGE" --config "$IMAGE_CONFIG" --mode ebpf
        --upgrade-from /run/router/upgrade.sock)
    wait_port_free "$ROUTER_PORT"
    podman run -d --name "$old" "${same[@]}" >/dev/null
    wait_for "curl -fsS http://127.0.0.1:$ROUTER_METRICS/readyz" 20 \
        || { podman logs "$old" >&2; die "the first router container did not become ready"; }
    python3 scripts/netkit.py hold "127.0.0.1:$ROUTER_PORT" "ROUTE db s3cret" 4 >"$dir/upgrade-hold.log" 2>&1 &
    local holder=$!
    python3 scripts/netkit.py load "127.0.0.1:$ROUTER_PORT" a.test 600 4 200 30 >"$dir/upgrade-load.log" 2>&1 &
    local loader=$!
    sleep 1
    local started_ms
    started_ms=$(date +%s%3N)
    podman run -d --name "$new" "${same[@]}" >/dev/null
    timeout 20 podman wait "$old" >/dev/null \
        || { podman logs "$new" >&2; die "the first router did not exit after the upgrade"; }
    UPGRADE_SECONDS=$(awk -v ms=$(($(date +%s%3N) - started_ms)) 'BEGIN { printf "%.2f", ms / 1000 }')
    expect "the first router's exit status after the hand-over" "$(podman inspect --format '{{.State.ExitCode}}' "$old")" 0
    wait "$holder" || die "the live connection broke in the upgrade: $(cat "$dir/upgrade-hold.log")"
    say "ok: the live connection went on through the new container: $(cat "$dir/upgrade-hold.log")"
    local load_status=0
    wait "$loader" || load_status=$?
    cat "$dir/upgrade-load.log"
    [ "$load_status" = 0 ] || die "connections failed during the upgrade (above)"
    local took
    took=$(podman logs "$new" 2>&1 | grep -o 'took over the listeners and [0-9]* connection(s)' || true)
    [ -n "$took" ] || { podman logs "$new" >&2; die "the new router does not say it took over"; }
    say "ok: the new router $took"
    route_three_ways
    python3 scripts/netkit.py bulk "127.0.0.1:$ROUTER_PORT" "ROUTE db s3cret" 1048576 >/dev/null \
        || die "a 1 MiB echo through the new router was not intact"
    say "ok: a 1 MiB echo through the new router"
    podman stop -t 25 "$new" >/dev/null
    for name in "$old" "$new"; do podman rm "$name" >/dev/null; done
}

# --- Kubernetes --------------------------------------------------------------

KUBE=deploy/kubernetes
KUBE_PORT=$((BASE + 20))
KUBE_METRICS=$((BASE + 29))

# Checks deploy/kubernetes/ against the API schemas, offline: every
# resource, strictly (no unknown field), for the oldest and newest API
# versions kept; a broken copy must fail, so the check can fail.
test_manifests() {
    local dir=$1
    step "deploy/kubernetes/ against the Kubernetes API schemas (kubernetes-validate, offline)"
    local venv=target/kubernetes-validate
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        say "installing $KUBERNETES_VALIDATE into $venv (PyPI)"
        { python3 -m venv "$venv" && "$venv/bin/pip" install -q "$KUBERNETES_VALIDATE"; } \
            || { cannot "kubernetes-validate could not be installed from PyPI"; return; }
    fi
    local listed f version
    listed=$(python3 -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["resources"]))' "$KUBE/kustomization.yaml")
    for f in $listed; do [ -f "$KUBE/$f" ] || die "kustomization.yaml lists $f, which does not exist"; done
    local resources=()
    for f in "$KUBE"/*.yaml; do [ "$(basename "$f")" = kustomization.yaml ] || resources+=("$f"); done
    for version in 1.30.0 1.37.0; do
        "$venv/bin/kubernetes-validate" --quiet --no-warn --strict -k "$version" "${resources[@]}" \
            || die "deploy/kubernetes/ fails the $version schemas (above)"
    done
    sed 's/replicas: 2/replicas: "two"/' "$KUBE/deployment.yaml" >"$dir/broken.yaml"
    ! "$venv/bin/kubernetes-validate" --quiet --strict "$dir/broken.yaml" >/dev/null 2>&1 \
        || die "the schema check passed a Deployment with replicas: \"two\""
    say "ok: ${#resources[@]} resources pass the 1.30 and 1.37 schemas, strictly; replicas: \"two\" is refused"
    # The ConfigMap's router.toml is a valid configuration (the image's
    # router checks it).
    python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["router.toml"], end="")' \
        "$KUBE/configmap.yaml" >"$dir/configmap-router.toml"
    chmod 644 "$dir/configmap-router.toml"
    podman run --rm --network none -v "$PWD/$dir/configmap-router.toml:$IMAGE_CONFIG:ro" \
        "$IMAGE" --config "$IMAGE_CONFIG" --check-config >/dev/null \
        || die "the ConfigMap's router.toml is not a valid configuration"
    say "ok: the ConfigMap's router.toml passes router --check-config"
}

# A ConfigMap like configmap.yaml, with the test's loopback addresses; `$1`
# is the backend of route a.test.
kube_configmap() {
    cat <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: ebpf-router
data:
  router.toml: |
$(kube_router_toml "$1" | sed 's/^/    /')
EOF
}

kube_router_toml() {
    cat <<EOF
listen = ["127.0.0.1:$KUBE_PORT"]
metrics = "127.0.0.1:$KUBE_METRICS"
mode = "ebpf"
cores = 1
drain_timeout = "5s"
# Every connection spliced from its first packet: one curl shows the pod's
# kernel path.
splice_after = 0
[[route]]
name = "a"
host = "a.test"
backends = ["127.0.0.1:$1"]
EOF
}

# Swaps a kubelet-style ConfigMap directory `$1` (router.toml ->
# ..data/router.toml, ..data -> ..VERSION) to a new version holding `$2`,
# by renaming the ..data link as the kubelet does (the first call turns
# podman's plain file into that layout).
kubelet_swap() {
    local volume=$1 version
    version="..$(date +%s%N)"
    mkdir "$volume/$version"
    printf '%s\n' "$2" >"$volume/$version/router.toml"
    chmod 755 "$volume/$version"
    chmod 644 "$volume/$version/router.toml"
    ln -sfn "$version" "$volume/..data_tmp"
    mv -T "$volume/..data_tmp" "$volume/..data"
    if [ ! -L "$volume/router.toml" ]; then
        ln -s ..data/router.toml "$volume/router.toml.tmp"
        mv -T "$volume/router.toml.tmp" "$volume/router.toml"
    fi
}

# deployment.yaml as podman 4.3 can play it on one host, changed only where
# podman differs from a cluster: one replica (every pod of the host network
# would bind the same metrics port), the host network (the test's
# backends are on loopback), no `ports` (podman refuses port mappings on
# the host network; the probes name the port by number instead), and the
# seccomp profile as the annotation podman reads (it ignores
# securityContext.seccompProfile).
kube_for_podman() {
    python3 - "$KUBE/deployment.yaml" <<'PY'
import sys, yaml
deployment = yaml.safe_load(open(sys.argv[1]))
deployment["spec"]["replicas"] = 1
template = deployment["spec"]["template"]
spec = template["spec"]
spec["hostNetwork"] = True
profile = spec["securityContext"]["seccompProfile"]
assert profile["type"] == "Localhost", profile
template["metadata"]["annotations"]["seccomp.security.alpha.kubernetes.io/pod"] = (
    "localhost/" + profile["localhostProfile"])
for container in spec["containers"]:
    ports = {p["name"]: p["containerPort"] for p in container.pop("ports")}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        get["port"] = ports.get(get["port"], get["port"])
print(yaml.safe_dump(deployment, sort_keys=False), end="")
PY
}

test_kube_play() {
    local dir=$1
    step "podman kube play deploy/kubernetes/deployment.yaml (with a loopback ConfigMap)"
    kube_configmap $((BASE + 1)) >"$dir/configmap.yaml"
    kube_for_podman >"$dir/deployment.yaml"
    # The kubelet's seccomp root, with the profile the manifest names.
    mkdir -p "$dir/seccomp"
    cp "$SECCOMP" "$dir/seccomp/ebpf-router.json"
    podman kube down "$dir/deployment.yaml" >/dev/null 2>&1 || true
    KUBE_PLAYED=$dir/deployment.yaml
    podman kube play --seccomp-profile-root "$PWD/$dir/seccomp" --configmap "$dir/configmap.yaml" \
        "$dir/deployment.yaml" >"$dir/kube-play.log" 2>&1 \
        || { cat "$dir/kube-play.log" >&2; die "podman kube play failed"; }
    wait_for "curl -fsS http://127.0.0.1:$KUBE_METRICS/readyz" 20 \
        || { podman logs ebpf-router-pod-0-router >&2 || true; die "the played Deployment did not become ready"; }
    # podman names the container POD-CONTAINER, the pod NAME-pod-REPLICA.
    local container=ebpf-router-pod-0-router
    podman container exists "$container" || die "no container $container: $(podman ps -a --format '{{.Names}}')"
    expect "played pod: user inside (and its id on the host)" "$(podman top "$container" user huser | tail -n1 | xargs)" "router $UID_INSIDE"
    expect "played pod: read-only root" "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$container")" true
    expect "played pod: curl by Host a.test" "$(curl -fsS --max-time 5 -H 'Host: a.test' "http://127.0.0.1:$KUBE_PORT/")" backend-a
    [ "$(metric "$KUBE_METRICS" router_kernel_redirected_bytes_total)" -gt 0 ] || die "the played pod does not splice"
    say "ok: the played pod splices (router_kernel_redirected_bytes_total > 0)"

    step "the ConfigMap file is replaced as the kubelet does: the router reloads (watch_config)"
    local volume
    volume=$(podman inspect --format '{{ range .Mounts }}{{ if eq .Destination "/etc/ebpf-router" }}{{ .Source }}{{ end }}{{ end }}' "$container")
    { [ -n "$volume" ] && [ -f "$volume/router.toml" ]; } || die "no ConfigMap volume at /etc/ebpf-router in $container"
    local backend name
    for backend in $((BASE + 2)) $((BASE + 1)); do
        name="backend-a"
        if [ "$backend" = $((BASE + 2)) ]; then name="backend-b"; fi
        kubelet_swap "$volume" "$(kube_router_toml "$backend")"
        wait_for "[ \"\$(curl -fsS --max-time 2 -H 'Host: a.test' http://127.0.0.1:$KUBE_PORT/)\" = $name ]" 5 \
            || die "a.test does not reach $name 5 s after the ConfigMap swap: $(podman logs "$container" 2>&1 | tail -n3)"
        say "ok: after the ..data swap, a.test reaches $name"
    done
    # The line is logged just after the new routes are in force, and podman
    # collects the log on its own: allow it a moment. (A plain grep: `-q`
    # stops reading at the first match, and under pipefail the writer's
    # SIGPIPE would fail the check.)
    wait_for "podman logs $container 2>&1 | grep 'config file changed: configuration reloaded'" 5 \
        || die "no 'config file changed' reload line in the log"
    podman kube down "$dir/deployment.yaml" >/dev/null 2>&1
    KUBE_PLAYED=
}

# --- scaling out: two routers behind HAProxy ----------------------------------

test_scaling() {
    local dir=$1
    step "two routers behind HAProxy (checks on /readyz): one stopped under 1,000 short connections"
    local i name
    for i in 1 2; do
        name=ebpf-router-test-r$i
        CONTAINERS+=("$name")
        podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
        mkdir -p "$dir/r$i"
        chmod 755 "$dir/r$i"
        # r1 routes to backend-a, r2 to backend-b: the answers say who served.
        replace_file "$dir/r$i/router.toml" "listen = [\"127.0.0.1:$((BASE + 30 + i))\"]
metrics = \"127.0.0.1:$((BASE + 37 + i))\"
cores = 1
drain_delay = \"1s\"
drain_timeout = \"20s\"
[[route]]
name = \"a\"
host = \"a.test\"
backends = [\"127.0.0.1:$((BASE + i))\"]"
        mapfile -t flags < <(least_privileged BPF,NET_ADMIN,PERFMON)
        podman run -d --name "$name" "${flags[@]}" -v "$PWD/$dir/r$i:/etc/ebpf-router:ro" \
            "$IMAGE" --config "$IMAGE_CONFIG" --mode ebpf >/dev/null
    done
    for i in 1 2; do
        wait_for "curl -fsS http://127.0.0.1:$((BASE + 37 + i))/readyz" 20 || die "router r$i did not become ready"
    done
    # As HAProxy's users run it in front of servers that drain: checks on
    # the readiness endpoint, and a refused connection retried on another
    # server (redispatch on every retry, so without the 1 s turn-around).
    cat >"$dir/haproxy.cfg" <<EOF
global
    stats socket $PWD/$dir/haproxy.sock
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch 1
frontend routers
    bind 127.0.0.1:$((BASE + 30))
    default_backend routers
backend routers
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 200ms fall 1 rise 2
    server r1 127.0.0.1:$((BASE + 31)) port $((BASE + 38))
    server r2 127.0.0.1:$((BASE + 32)) port $((BASE + 39))
EOF
    haproxy -c -q -f "$dir/haproxy.cfg" || die "haproxy.cfg is invalid"
    haproxy -db -f "$dir/haproxy.cfg" 2>"$dir/haproxy.log" &
    PIDS+=("$!")
    # Field 6 of "show servers state" is the operational state (2: up).
    wait_for "[ \"\$(echo 'show servers state routers' | socat stdio unix-connect:$PWD/$dir/haproxy.sock | awk '\$6 == 2' | wc -l)\" = 2 ]" 10 \
        || die "HAProxy does not see both routers up: $(cat "$dir/haproxy.log")"
    python3 scripts/netkit.py load "127.0.0.1:$((BASE + 30))" a.test 1000 8 250 60 >"$dir/load.log" 2>&1 &
    local loader=$!
    sleep 2
    local stop_ms
    stop_ms=$(date +%s%3N)
    podman stop -t 25 ebpf-router-test-r1 >/dev/null
    DRAIN_SECONDS=$(awk -v ms=$(($(date +%s%3N) - stop_ms)) 'BEGIN { printf "%.2f", ms / 1000 }')
    local load_status=0
    wait "$loader" || load_status=$?
    cat "$dir/load.log"
    [ "$load_status" = 0 ] || die "connections failed while a router stopped (above)"
    expect "r1's exit status after podman stop" "$(podman inspect --format '{{.State.ExitCode}}' ebpf-router-test-r1)" 0
    LOAD_LINE=$(head -n1 "$dir/load.log")
    # Readiness, not a refused connection, took r1 out of the rotation.
    local down
    down=$(grep -o 'Server routers/r1 is DOWN, reason: [^,]*, code: [0-9]*' "$dir/haproxy.log" | head -n1)
    expect "HAProxy's first reason for taking r1 out" "${down#*reason: }" "Layer7 wrong status, code: 503"
    say "ok: r1 stopped in ${DRAIN_SECONDS} s (drain_delay 1 s) during the load"
    podman stop -t 25 ebpf-router-test-r2 >/dev/null
}

test_all() {
    ensure_tools haproxy socat curl openssl python3-venv python3-yaml iproute2
    local started=$SECONDS dir=$WORK/test
    rm -rf "$dir"
    mkdir -p "$dir"
    chmod 755 "$dir"
    trap cleanup EXIT
    local port
    for port in $(seq $((BASE + 1)) $((BASE + 40))); do
        port_free "$port" || die "port $port is taken: set CONTAINER_TEST_PORT_BASE to a free range"
    done
    start_backends "$dir"
    test_podman_run "$dir"
    test_upgrade "$dir"
    test_manifests "$dir"
    test_kube_play "$dir"
    test_scaling "$dir"
    step "summary"
    say "image $IMAGE: $(image_size)"
    say "podman stop with a live connection: ${STOP_SECONDS} s"
    say "upgrade: the new container started to the old one gone: ${UPGRADE_SECONDS} s"
    say "scaling: ${LOAD_LINE}; podman stop of one router took ${DRAIN_SECONDS} s"
    say "all container tests passed in $((SECONDS - started)) s"
}


# --- entry -------------------------------------------------------------------

case "${1:-}" in
    build) build ;;
    test)
        build
        test_all
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 2
        ;;
esac
