#!/usr/bin/env bash
# Runs the kernel integration tests of echo and router (echo/tests/echo.rs,
# router/tests/router.rs, router/tests/upgrade.rs) under several kernels and
# prints a pass/fail table.
#
#   scripts/kernel-matrix.sh                 # 6.1, 6.12 and host
#   scripts/kernel-matrix.sh 6.12            # one kernel
#   scripts/kernel-matrix.sh --force 6.1     # run again even if it passed
#   scripts/kernel-matrix.sh --timeout 90 linux-image-6.1.0-47-amd64
#   scripts/kernel-matrix.sh --smoke         # CI's check: two tests on 6.1
#
# Kernels (positional; default "6.1 6.12 host"):
#   6.1    Debian bookworm's kernel (the package `linux-image-amd64` depends on)
#   6.12   bookworm's 6.12 kernel (the package `linux-image-6.12-amd64` depends on)
#   host   the running kernel: /boot/vmlinuz-$(uname -r) booted like the others
#          if present, else the tests run directly on this machine
#   linux-image-*  any kernel package apt can download
#
# Each Debian kernel boots under qemu-system-x86_64 with software emulation
# (TCG: no KVM needed), `-cpu max -smp 2`, and its whole root filesystem in
# an initramfs: busybox, the test binaries at the absolute paths they were
# built with (the tests find `ebpf-echo`/`router` through CARGO_BIN_EXE_*
# paths baked in at compile time), their shared libraries, and the tools the
# tests run (openssl, curl, setpriv, timeout, bpftool). No disk, network or 9p driver
# is needed, so modules are not either. Tests use the VM's loopback only.
#
# The binaries are built with `cargo test --release --no-run`: under
# emulation a debug build is too slow for the tests' own time limits (the
# 256 MiB transfer alone ran for over 10 minutes). The host row runs the
# same binaries. Each test binary runs with --test-threads 1 by default, so
# that two heavy tests do not share the two emulated CPUs, and with
# TESTKIT_TIME_SCALE=4 in the VMs (see testkit/src/budget.rs): load tests
# get four times their time budget under emulation, never more time for the
# behaviour they check.
#
# Resumable: kernels, root filesystems and results are cached under
# target/kernel-matrix/; a kernel that already passed with the same test
# binaries is skipped unless --force. One VM at a time, bounded by
# --timeout minutes (default 60) per kernel.
#
# Options: --force, --timeout MINUTES, --memory MIB (default 2048),
#          --cpus N (default 2), --test-threads N (default 1),
#          --time-scale N (TESTKIT_TIME_SCALE in the VMs, default 4),
#          --only FILTER[,FILTER...] (run only the tests whose name
#          contains a FILTER; such a run is stored apart and never counts
#          as a pass of the whole matrix),
#          --smoke (the short check CI runs: the oldest kernel, 6.1, unless
#          kernels are named, and only the echo demo's basic test and a
#          router test that asserts splicing; fails if the VM
#          does not boot or a test fails),
#          --table (print the last results only).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

force=0
timeout_min=60
memory=2048
cpus=2
test_threads=1
time_scale=4
only=""
table_only=0
smoke=0
kernels=()
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --timeout) timeout_min=$2; shift ;;
        --memory) memory=$2; shift ;;
        --cpus) cpus=$2; shift ;;
        --test-threads) test_threads=$2; shift ;;
        --time-scale) time_scale=$2; shift ;;
        --only) only=$2; shift ;;
        --smoke) smoke=1 ;;
        --table) table_only=1 ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "kernel-matrix: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) kernels+=("$1") ;;
    esac
    shift
done
# The smoke check: the echo demo's basic test, a router test that asserts
# every connection was spliced, and one that a bulky connection moved into
# the kernel mid-stream (the lazy splice), on the minimum kernel.
SMOKE_TESTS=ebpf_mode_all_cores_echoes_64_concurrent_clients_in_the_kernel,a_hundred_concurrent_connections_get_their_bytes_back,short_connections_stay_in_userspace_and_bulky_ones_move_into_the_kernel
if [ "$smoke" -eq 1 ]; then
    [ -z "$only" ] || { echo "kernel-matrix: --smoke and --only do not go together" >&2; exit 2; }
    only=$SMOKE_TESTS
    [ ${#kernels[@]} -gt 0 ] || kernels=(6.1)
fi
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.12 host)
[[ "$only" =~ ^[A-Za-z0-9_:,]*$ ]] || { echo "kernel-matrix: --only wants test names (letters, digits, _ and :), comma-separated" >&2; exit 2; }
[[ "$timeout_min" =~ ^[0-9]+$ && "$timeout_min" -gt 0 ]] || { echo "kernel-matrix: --timeout wants minutes" >&2; exit 2; }

work=$root/target/kernel-matrix
mkdir -p "$work/kernels" "$work/results"

say() { printf 'kernel-matrix: %s\n' "$*" >&2; }
die() { printf 'kernel-matrix: error: %s\n' "$*" >&2; exit 1; }

# The integration test binaries, in the order they run: CRATE:TEST (the
# test runs from its crate's directory; its results are named TEST).
TEST_TARGETS=(echo:echo router:router router:upgrade)

# counts RESULT: what each test binary passed, as "echo 17/17, router ...".
counts() {
    local target out=""
    for target in "${TEST_TARGETS[@]}"; do
        out+="${target#*:} $(result_get "$1" "${target#*:}"), "
    done
    echo "${out%, }"
}

# --- Results --------------------------------------------------------------

# result_get FILE KEY: the value of KEY=... in a result file.
result_get() { sed -n "s/^$2=//p" "$1" | head -n1; }

print_table() {
    local files=() f
    for f in "$work"/results/*.result; do
        case "$f" in *--only.result) continue ;; esac
        [ -e "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || { say "no results yet"; return; }
    printf '| kernel | how | echo | router | upgrade | result | minutes | failing tests |\n'
    printf '|---|---|---|---|---|---|---:|---|\n'
    for f in $(printf '%s\n' "${files[@]}" | xargs -n1 basename | sort -V); do
        f=$work/results/$f
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' \
            "$(result_get "$f" kernel)" "$(result_get "$f" how)" \
            "$(result_get "$f" echo)" "$(result_get "$f" router)" \
            "$(result_get "$f" upgrade | sed 's/^$/—/')" \
            "$(result_get "$f" status)" "$(result_get "$f" minutes)" \
            "$(result_get "$f" failing | sed 's/^$/—/')"
    done
}

if [ "$table_only" -eq 1 ]; then print_table; exit 0; fi

# --- Setup ----------------------------------------------------------------

# qemu-system-x86 and qemu-utils must come from one Debian release: a machine
# image may carry qemu-utils from bookworm-backports (1:10.x, which
# `Breaks: qemu-system-common (< 1:8.0)`) while apt offers bookworm's
# qemu-system-x86 (1:7.2), and apt then refuses the install. Vagrant's
# libvirt provider needs qemu-utils of any version, so the matching release's
# qemu-utils serves both; it is installed next to qemu-system-x86, and what
# changed is said. Idempotent: nothing happens once qemu-system-x86 is there.
ensure_consistent_qemu() {
    dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q 'install ok installed' && return
    [ "$(id -u)" -eq 0 ] || die "qemu-system-x86 is missing; run as root or: sudo apt-get install qemu-system-x86"
    local candidate utils
    candidate=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
        apt-get update -q >/dev/null
        candidate=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    fi
    [ -n "$candidate" ] && [ "$candidate" != "(none)" ] || die "apt offers no qemu-system-x86 (apt-cache policy qemu-system-x86)"
    local packages=("qemu-system-x86=$candidate")
    utils=$(dpkg-query -W -f='${Status} ${Version}' qemu-utils 2>/dev/null | awk '/install ok installed/ { print $4 }')
    if [ -n "$utils" ] && [ "$utils" != "$candidate" ]; then
        apt-cache madison qemu-utils | awk '{ print $3 }' | grep -qxF "$candidate" \
            || die "qemu-utils $utils is installed and apt has no qemu-utils $candidate to match qemu-system-x86 $candidate (apt-cache policy qemu-utils)"
        say "qemu-utils $utils (another release than apt's qemu-system-x86 $candidate, which it Breaks) is replaced by qemu-utils $candidate, so every qemu package comes from one release"
        packages+=("qemu-utils=$candidate")
    fi
    say "installing ${packages[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades "${packages[@]}" >/dev/null \
        || die "apt-get install ${packages[*]} failed"
    say "installed: $(dpkg-query -W -f='${Package} ${Version}\n' qemu-system-x86 qemu-system-common qemu-utils 2>/dev/null | paste -sd, - | sed 's/,/, /g')"
}
ensure_consistent_qemu

# Toolchain and the test tools, plus what the matrix itself needs (all
# idempotent: nothing is installed twice).
SETUP_APT_EXTRA="busybox-static cpio jq binutils ${SETUP_APT_EXTRA:-}" scripts/setup.sh >&2

# --- Build ----------------------------------------------------------------

say "building the test binaries (cargo test --release --no-run)"
build_json=$(cargo test --release -p echo -p router --no-run --locked --message-format=json)
# "package:target-kind:name executable" for the test and bin targets.
artifacts=$(jq -r 'select(.reason == "compiler-artifact" and .executable != null)
    | "\(.package_id | sub(".*/"; "") | sub("#.*"; "")):\(.target.kind[0]):\(.target.name):\(.profile.test) \(.executable)"' <<<"$build_json")
out_dirs=$(jq -r 'select(.reason == "build-script-executed")
    | select(.package_id | test("^path\\+file://")) | .out_dir' <<<"$build_json")

declare -A test_bin=()
bins=()
for target in "${TEST_TARGETS[@]}"; do
    exe=$(awk -v key="${target%%:*}:test:${target#*:}:true" '$1 == key { print $2 }' <<<"$artifacts")
    [ -n "$exe" ] || die "cargo built no test binary for ${target}"
    test_bin[$target]=$exe
done
while read -r key exe; do
    case "$key" in *:bin:*:false) bins+=("$exe") ;; esac
done <<<"$artifacts"
[ ${#bins[@]} -gt 0 ] || die "cargo built no server binary"

# What the tests run: their identity decides whether a cached result holds.
fingerprint=$(printf '%s\n' "${test_bin[@]}" "${bins[@]}" \
    $(for d in $out_dirs; do find "$d" -maxdepth 1 -type f; done) \
    | sort | xargs sha256sum | sha256sum | cut -c1-16)
say "test binaries: fingerprint $fingerprint"

# --- Root filesystem (an initramfs) -----------------------------------------

# Tools the tests run besides the binaries under test.
TOOLS=(openssl curl setpriv timeout bpftool)

# copy_with_libs FILE...: copies executables and their shared libraries into
# the root filesystem at their own paths.
copy_into_rootfs() {
    local dest=$1 file
    shift
    for file in "$@"; do
        mkdir -p "$dest$(dirname "$file")"
        cp -L "$file" "$dest$file"
    done
}

build_rootfs() {
    local cpio=$1 dir
    dir=$(mktemp -d "$work/rootfs.XXXXXX")
    chmod 755 "$dir"
    mkdir -p "$dir"/{bin,sbin,proc,sys,dev,tmp,run,root,etc,usr/bin,usr/lib,lib64}
    chmod 1777 "$dir/tmp"
    cp /bin/busybox "$dir/bin/busybox"
    local applet
    for applet in sh mount umount ip cat echo mkdir ln ls sleep poweroff uname dmesg date sync env sed grep; do
        ln -sf busybox "$dir/bin/$applet"
    done
    # Executables, stripped of debug info (the debug builds are ~80 MB each).
    local exe tools=()
    for exe in "${test_bin[@]}" "${bins[@]}"; do
        mkdir -p "$dir$(dirname "$exe")"
        strip --strip-debug -o "$dir$exe" "$exe"
    done
    for exe in "${TOOLS[@]}"; do tools+=("$(command -v "$exe")"); done
    copy_into_rootfs "$dir" "${tools[@]}"
    # Shared libraries of all of them (ldd prints "name => /path (addr)" or
    # "/path (addr)" for the loader).
    local libs
    libs=$(for exe in "${test_bin[@]}" "${bins[@]}" "${tools[@]}"; do ldd "$exe"; done \
        | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u)
    copy_into_rootfs "$dir" $libs
    # The build scripts' outputs (probe objects the tests load by path).
    local d
    for d in $out_dirs; do
        mkdir -p "$dir$d"
        find "$d" -maxdepth 1 -type f -exec cp {} "$dir$d/" \;
    done
    # Files tests read relative to their crate, and the crates' directories
    # (the tests run from them, as under cargo).
    mkdir -p "$dir$root/echo" "$dir$root/router"
    cp router.example.toml "$dir$root/"
    # openssl's configuration (openssl req reads it) and name resolution.
    copy_into_rootfs "$dir" /usr/lib/ssl/openssl.cnf /etc/ssl/openssl.cnf
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' >"$dir/etc/hosts"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$dir/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
    write_init "$dir/init"
    (cd "$dir" && find . -print0 | cpio --null -o -H newc --quiet) >"$cpio.tmp"
    rm -rf "$dir"
    mv "$cpio.tmp" "$cpio"
}

# The VM's /init: mounts the kernel file systems (not a tmpfs on /tmp: the
# root file system is in memory already, and a checkout under /tmp would be
# hidden by it), brings up loopback, runs
# each test binary from its crate directory, marks the output for the host,
# and powers off.
write_init() {
    local runs="" target
    for target in "${TEST_TARGETS[@]}"; do
        runs+="run_tests ${target#*:} ${test_bin[$target]} $root/${target%%:*}"$'\n'
    done
    cat >"$1" <<EOF
#!/bin/sh
export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root CI=true RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
echo "KMATRIX kernel \$(uname -r)"
run_tests() {
    echo "KMATRIX begin \$1"
    cd "\$3"
    # KMATRIX_THREADS and KMATRIX_ONLY (filters, comma-separated) come from
    # the kernel command line.
    "\$2" --test-threads="\${KMATRIX_THREADS:-1}" \$(echo "\${KMATRIX_ONLY:-}" | sed 's/,/ /g') 2>&1
    echo "KMATRIX end \$1 rc=\$?"
}
$runs
# TCP memory pressure and the resets it caused (docs/kernels.md).
awk '/^TcpExt:/ { if (!n) { split(\$0, k); n = 1 } else { for (i = 2; i <= NF; i++) if (k[i] ~ /^TCP(MemoryPressures|AbortOnMemory)\$/) printf "%s=%s ", k[i], \$i } } END { print "" }' /proc/net/netstat | sed 's/^/KMATRIX tcp-memory: /'
echo "KMATRIX dmesg-begin"
dmesg -r | grep '^<[0-4]>' | grep -v 'evm: '
echo "KMATRIX dmesg-end"
echo "KMATRIX done"
sync
poweroff -f
EOF
    chmod +x "$1"
}

# --- Kernels --------------------------------------------------------------

# kernel_package SPEC: the linux-image package behind a row name.
kernel_package() {
    local meta
    case "$1" in
        6.1) meta=linux-image-amd64 ;;
        6.12) meta=linux-image-6.12-amd64 ;;
        linux-image-*) echo "$1"; return ;;
        *) die "unknown kernel '$1' (6.1, 6.12, host or a linux-image-* package)" ;;
    esac
    local pkg
    pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        say "apt does not know $meta: apt-get update"
        apt-get update -q >/dev/null
        pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || die "apt offers no $meta here (apt-cache policy $meta)"
    echo "$pkg"
}

# fetch_kernel PACKAGE: downloads and unpacks its /boot (vmlinuz + config)
# once; prints the directory.
fetch_kernel() {
    local pkg=$1 dir=$work/kernels/$1
    if ! ls "$dir"/boot/vmlinuz-* >/dev/null 2>&1; then
        say "downloading $pkg"
        local tmp
        tmp=$(mktemp -d "$work/kernels/download.XXXXXX")
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) \
            || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
        rm -rf "$dir" && mkdir -p "$dir"
        dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$dir" ./boot
        rm -rf "$tmp"
    fi
    echo "$dir"
}

# The options the probes need, as the kernel's config states them.
config_summary() {
    local opt out=""
    for opt in BPF_SYSCALL BPF_STREAM_PARSER NET_SOCK_MSG DEBUG_INFO_BTF; do
        grep -q "^CONFIG_${opt}=y" "$1" && out+="$opt=y " || out+="$opt=n "
    done
    echo "${out% }"
}

# --- Running --------------------------------------------------------------

# result_paths RELEASE: sets $result and $log for a run on that kernel
# (apart for an --only run).
result_paths() {
    local name=$1
    [ -z "$only" ] || name+="--only"
    result=$work/results/$name.result
    log=$work/results/$name.log
}

# already_passed LABEL: true (and says so) if $result holds a pass with
# these binaries and --force was not given.
already_passed() {
    [ "$force" -eq 0 ] && [ -z "$only" ] && [ -f "$result" ] \
        && [ "$(result_get "$result" status)" = pass ] \
        && [ "$(result_get "$result" fingerprint)" = "$fingerprint" ] || return 1
    say "$1: passed before with these binaries (--force runs it again)"
}

# parse_log LOG RESULT KERNEL HOW SECONDS [STATUS]: turns a run's output into
# a result file of key=value lines.
parse_log() {
    local log=$1 result=$2 kernel=$3 how=$4 seconds=$5 status=${6:-}
    local target name summary failing="" all_ok=1 ran_any=0
    {
        echo "kernel=$kernel"
        echo "how=$how"
        echo "fingerprint=$fingerprint"
        echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
        echo "seconds=$seconds"
        echo "minutes=$(( (seconds + 30) / 60 ))"
        for target in "${TEST_TARGETS[@]}"; do
            name=${target#*:}
            # libtest's last line: "test result: ok. 24 passed; 0 failed; ..."
            summary=$(awk -v n="$name" '
                $0 ~ "KMATRIX begin " n "\r?$" { on = 1; next }
                on && /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p = $i; if ($(i+1) ~ /^failed;/) f = $i } }
                on && $0 ~ "KMATRIX end " n " " { print p + 0 "/" p + f; done = 1; exit }
                END { if (!done) print "incomplete" }' "$log")
            echo "$name=$summary"
            case "$summary" in
                # A binary that ran no test (e.g. missing from the image) is
                # no pass, unless --only selected none of its tests.
                0/0) [ -n "$only" ] || all_ok=0 ;;
                */*)
                    ran_any=1
                    [ "${summary%/*}" = "${summary#*/}" ] || all_ok=0
                    ;;
                *) all_ok=0 ;;
            esac
            failing+=$(awk -v n="$name" '
                $0 ~ "KMATRIX begin " n "\r?$" { on = 1; next }
                on && $0 ~ "KMATRIX end " n " " { exit }
                on && /^test .* \.\.\. FAILED/ { sub(/^test /, ""); sub(/ \.\.\. FAILED.*/, ""); printf "%s::%s ", n, $0 }' "$log")
        done
        [ "$ran_any" -eq 1 ] || all_ok=0
        if [ -z "$status" ]; then
            if [ "$all_ok" -eq 1 ]; then status=pass; else status=fail; fi
        fi
        echo "status=$status"
        echo "failing=${failing% }"
    } >"$result"
}

run_in_vm() {
    local row=$1 pkg=$2 kdir vmlinuz release cpio
    kdir=$(fetch_kernel "$pkg")
    vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n1)
    release=${vmlinuz##*/vmlinuz-}
    result_paths "$release"
    if already_passed "$release ($row)"; then return; fi
    say "$release ($row): $(config_summary "$kdir/boot/config-$release")"
    # The image depends on the binaries and on this script (its /init).
    cpio=$work/rootfs-$( (echo "$fingerprint"; sha256sum "$root/scripts/kernel-matrix.sh") | sha256sum | cut -c1-16).cpio
    if [ ! -f "$cpio" ]; then
        say "building the root filesystem (initramfs)"
        rm -f "$work"/rootfs-*.cpio
        build_rootfs "$cpio"
    fi
    say "$release ($row): booting under qemu (TCG, ${cpus} CPUs, ${memory} MiB, timeout ${timeout_min} min); console in ${log#"$root"/}"
    local start status="" rc=0
    start=$(date +%s)
    timeout --foreground -k 10 "$((timeout_min * 60))" \
        qemu-system-x86_64 -accel tcg -cpu max -smp "$cpus" -m "$memory" \
        -nographic -no-reboot -monitor none -serial stdio -nic none \
        -kernel "$vmlinuz" -initrd "$cpio" \
        -append "console=ttyS0 rdinit=/init panic=-1 loglevel=4 KMATRIX_THREADS=$test_threads TESTKIT_TIME_SCALE=$time_scale${only:+ KMATRIX_ONLY=$only}" \
        </dev/null >"$log" 2>&1 || rc=$?
    local seconds=$(( $(date +%s) - start ))
    tr -d '\r' <"$log" >"$log.tmp" && mv "$log.tmp" "$log"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
    elif ! grep -q '^KMATRIX done' "$log"; then
        status=crashed
    fi
    parse_log "$log" "$result" "$release" "qemu (TCG)" "$seconds" "$status"
    say "$release: $(result_get "$result" status) in ${seconds} s ($(counts "$result"))"
}

run_on_host() {
    local release
    release=$(uname -r)
    result_paths "$release"
    if already_passed "$release (host)"; then return; fi
    say "$release (host): no /boot/vmlinuz-$release to boot; running the tests on this machine"
    local start target name
    start=$(date +%s)
    {
        echo "KMATRIX kernel $release"
        for target in "${TEST_TARGETS[@]}"; do
            name=${target#*:}
            echo "KMATRIX begin $name"
            local rc=0
            (cd "$root/${target%%:*}" && CI=true timeout -k 10 "$((timeout_min * 60))" \
                "${test_bin[$target]}" --test-threads="$test_threads" ${only//,/ } 2>&1) || rc=$?
            echo "KMATRIX end $name rc=$rc"
        done
        echo "KMATRIX done"
    } >"$log" 2>&1
    parse_log "$log" "$result" "$release" "host, no VM" "$(( $(date +%s) - start ))"
    say "$release: $(result_get "$result" status) ($(counts "$result"))"
}

status=0
result="" log=""
ran=()
for row in "${kernels[@]}"; do
    if [ "$row" = host ]; then
        if [ -r "/boot/vmlinuz-$(uname -r)" ]; then
            # Booted like the others; its config sits next to it.
            mkdir -p "$work/kernels/host-$(uname -r)/boot"
            cp -u "/boot/vmlinuz-$(uname -r)" "/boot/config-$(uname -r)" "$work/kernels/host-$(uname -r)/boot/" 2>/dev/null || true
            run_in_vm host "host-$(uname -r)"
        else
            run_on_host
        fi
    else
        run_in_vm "$row" "$(kernel_package "$row")"
    fi
    ran+=("$result")
done

echo
if [ -n "$only" ]; then
    for f in "${ran[@]}"; do
        say "$(result_get "$f" kernel) (--only $only): $(result_get "$f" status); $(counts "$f"); log ${f%.result}.log"
    done
else
    print_table
fi
for f in "${ran[@]}"; do
    [ "$(result_get "$f" status)" = pass ] || status=1
done
exit "$status"
