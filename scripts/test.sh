#!/usr/bin/env bash
# The project's test command: sets up the machine (idempotent), then runs
# every check: formatting, clippy (host code and the probes' bpf code), all
# tests (kernel tests included), licence/ban/source checks of the
# dependencies (cargo deny), a 60-second fuzz smoke run of the parsers, and
# the container image's tests (scripts/container.sh test).
# Needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON); with CI=true a
# kernel test fails instead of skipping when it cannot run.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -- echo         # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
scripts/setup.sh --test

step "vagrant validate"
# Vagrant and its libvirt provider come from Debian, installed here on demand
# (about 40 s the first time) rather than by setup.sh, which the demo scripts
# run too. With the libvirt provider present, `vagrant validate` checks the
# general settings and the libvirt block (a VirtualBox block is only checked
# where VirtualBox is installed).
vagrant_packages=(vagrant vagrant-libvirt)
for p in "${vagrant_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        printf 'installing %s\n' "${vagrant_packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${vagrant_packages[@]}" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null
            apt-get install -y -q --no-install-recommends "${vagrant_packages[@]}" >/dev/null
        }
        break
    fi
done
vagrant validate

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (host)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy (probes, bpfel-unknown-none)"
for probe in echo-probe router-probe; do
    CARGO_TARGET_DIR=target/bpf-clippy rustup run nightly cargo clippy --locked -q \
        -p "$probe" --bins --release --target bpfel-unknown-none -Z build-std=core -- -D warnings
done

step "cargo test"
if [ "${1:-}" = "--" ]; then shift; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?

# The RustSec advisory database is fetched from GitHub, which this
# project's machines cannot reach: advisories are not checked here (see
# docs/RELIABILITY.md); licences, bans and sources need nothing but the lock
# file.
step "cargo deny check licenses bans sources"
cargo deny --locked check licenses bans sources || status=$?

step "fuzz smoke run (60 s over 4 targets)"
scripts/fuzz.sh smoke 60 || status=$?

# The image, and the router in containers: least privileges, reload, drain,
# the Kubernetes manifests (schemas, podman kube play, a ConfigMap swap),
# two routers behind HAProxy (docs/containers.md). About 30 s once the
# release build is warm (a cold one: about 6 min on 2 cores).
step "containers (scripts/container.sh test)"
scripts/container.sh test || status=$?
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
