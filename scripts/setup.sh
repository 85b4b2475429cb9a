#!/usr/bin/env bash
# Installs what building the router and running its demo need, and checks
# the kernel; with --test, also what the tests need.
#
# Idempotent: on a machine where everything is present it only checks and
# finishes in a few seconds. Safe to run as often as you like.
#
#   scripts/setup.sh            # build + demo: toolchain, a few Debian packages, kernel checks
#   scripts/setup.sh --test     # the same, plus the test tools (scripts/test.sh runs this)
#   SETUP_APT_EXTRA="iperf3" scripts/setup.sh   # also install these packages
#
# What it installs:
#   - the nightly toolchain's rust-src component (probes are built with
#     -Z build-std=core for bpfel-unknown-none);
#   - bpf-linker 0.13.0 linked against the nightly's own libLLVM 22 (no Debian
#     package ships LLVM 22; bpf-linker must read the nightly's bitcode);
#   - Debian packages the demo uses (openssl for its TLS backend, curl and
#     nc for the commands it prints);
#   - with --test: Debian packages the tests use (socat, iproute2, bpftool,
#     setpriv; nginx, a backend that reads the PROXY protocol; systemd's
#     systemd-analyze, which checks the service unit; dnsmasq-base, the DNS
#     server of the backend-name tests; nftables, which drops a vanished
#     peer's packets in the keepalive test). Installing nginx
#     starts no server where no init system runs (invoke-rc.d then refuses);
#     the tests run their own on loopback. And cargo-fuzz (fuzz smoke run)
#     and cargo-deny (licence/ban/source checks), from crates.io, once:
#     building them takes a few minutes on 2 quiet cores (measured here
#     under load: cargo-fuzz 1m45s, cargo-deny 7m20s of CPU).
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
CARGO_FUZZ_VERSION=0.13.2
CARGO_DENY_VERSION=0.20.2
NIGHTLY=${NIGHTLY:-nightly}
APT_PACKAGES=(openssl curl netcat-openbsd procps ${SETUP_APT_EXTRA:-})
TEST_APT_PACKAGES=(iproute2 bpftool socat util-linux nginx systemd dnsmasq-base nftables)
TEST=false
case "${1:-}" in
    --test) TEST=true; APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}") ;;
    "") ;;
    *) printf 'usage: %s [--test]\n' "$0" >&2; exit 2 ;;
esac

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

need_rustup() {
    command -v rustup >/dev/null || die "rustup is not on PATH (install Rust with rustup first)"
    rustup toolchain list | grep -q "^${NIGHTLY}" \
        || die "no '${NIGHTLY}' toolchain (rustup toolchain list); the probes need a nightly with LLVM >= 22"
}

ensure_rust_src() {
    if rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
        return
    fi
    say "adding rust-src to the ${NIGHTLY} toolchain"
    rustup component add rust-src --toolchain "$NIGHTLY"
}

# bpf-linker is tied to the nightly's libLLVM soname: a linker built against
# another nightly fails to start, so "bpf-linker --version" is the test.
ensure_bpf_linker() {
    if bpf-linker --version >/dev/null 2>&1 \
        && [ "$(bpf-linker --version | awk '{print $2}')" = "$BPF_LINKER_VERSION" ]; then
        return
    fi
    local sysroot llvm_so link_dir
    sysroot=$(rustc "+${NIGHTLY}" --print sysroot)
    llvm_so=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*-rust-*' -o -maxdepth 1 -name 'libLLVM-*-rust-*.so' | head -n1)
    [ -n "$llvm_so" ] || die "no libLLVM shared library in $sysroot/lib (the nightly must ship one)"
    local major
    major=$(basename "$llvm_so" | grep -oE '[0-9]+' | head -n1)
    [ "$major" -ge 22 ] || die "the nightly ships LLVM $major; bpf-linker here needs LLVM 22"
    say "building bpf-linker ${BPF_LINKER_VERSION} against $(basename "$llvm_so") (about a minute)"
    # bpf-linker's build script links -lLLVM from $LLVM_PREFIX/lib with an
    # rpath there: point it at the toolchain's own lib dir and give the linker
    # a libLLVM.so name to find, so no lasting helper directory is needed.
    link_dir=$(mktemp -d)
    ln -s "$llvm_so" "$link_dir/libLLVM.so"
    local status=0
    LLVM_PREFIX="$sysroot" RUSTFLAGS="-L native=$link_dir" \
        cargo install --locked --force bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-${major}" || status=$?
    rm -rf "$link_dir"
    [ "$status" -eq 0 ] || die "building bpf-linker failed (exit $status)"
    bpf-linker --version >/dev/null || die "bpf-linker was built but does not start (ldd \$(command -v bpf-linker))"
}

# Installs the cargo subcommand `$1` (crate cargo-$1) at version $2 unless
# that version is there.
ensure_cargo_tool() {
    local tool=$1 version=$2
    if [ "$(cargo "$tool" --version 2>/dev/null | awk '{print $2}')" = "$version" ]; then
        return
    fi
    say "installing cargo-${tool} ${version} from crates.io (a few minutes, once)"
    cargo install --locked --quiet "cargo-${tool}" --version "$version" \
        || die "installing cargo-${tool} failed"
}

ensure_apt_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "Debian packages missing (${missing[*]}); run as root or: sudo apt-get install ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
}

kernel_config() {
    if [ -r /proc/config.gz ]; then zcat /proc/config.gz
    elif [ -r "/boot/config-$(uname -r)" ]; then cat "/boot/config-$(uname -r)"
    fi
}

# Capability bits from /proc/self/status: CAP_NET_ADMIN=12, CAP_PERFMON=38,
# CAP_BPF=39 (without CAP_PERFMON the verifier rejects the probes).
has_cap() {
    local eff
    eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
    (( (16#$eff >> $1) & 1 ))
}

check_kernel() {
    local problems=()
    [ -r /sys/kernel/btf/vmlinux ] || problems+=("kernel has no BTF (/sys/kernel/btf/vmlinux missing; CONFIG_DEBUG_INFO_BTF)")
    local config
    config=$(kernel_config)
    if [ -n "$config" ]; then
        for opt in CONFIG_BPF_SYSCALL CONFIG_BPF_STREAM_PARSER CONFIG_NET_SOCK_MSG; do
            grep -q "^${opt}=y" <<<"$config" || problems+=("kernel lacks ${opt}=y (needed for sockmap + sk_skb verdict)")
        done
    else
        say "warning: kernel config not readable (/proc/config.gz, /boot/config-*); sockmap support is checked when the probe loads"
    fi
    has_cap 12 || problems+=("missing capability CAP_NET_ADMIN (run as root or grant it)")
    has_cap 39 || problems+=("missing capability CAP_BPF (run as root or grant it)")
    has_cap 38 || problems+=("missing capability CAP_PERFMON (run as root or grant it)")
    if [ ${#problems[@]} -gt 0 ]; then
        printf 'setup: kernel/permission problem: %s\n' "${problems[@]}" >&2
        return 1
    fi
}

main() {
    need_rustup
    ensure_rust_src
    ensure_apt_packages
    ensure_bpf_linker
    if $TEST; then
        ensure_cargo_tool fuzz "$CARGO_FUZZ_VERSION"
        ensure_cargo_tool deny "$CARGO_DENY_VERSION"
    fi
    check_kernel || die "the machine cannot load the probes (see above)"
    say "ok: $(rustc --version), $(rustc "+${NIGHTLY}" --version | cut -d' ' -f1-2), $(bpf-linker --version), kernel $(uname -r)"
}

main "$@"
