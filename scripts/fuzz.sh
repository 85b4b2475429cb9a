#!/usr/bin/env bash
# Fuzzes the router's parsers (fuzz/: TLS ClientHello, HTTP head, preamble, PROXY header,
# configuration) with cargo fuzz, one target at a time, single job.
#
#   scripts/fuzz.sh smoke [SECONDS]      # every target SECONDS/4 each (CI: 60 s in all)
#   scripts/fuzz.sh long [RUNS] [SECS]   # every target RUNS executions (default 10,000,000),
#                                        # each capped at SECS seconds (default 3600)
#
# New inputs go to fuzz/corpus/<target> (not committed); the committed seeds
# are fuzz/seeds/<target>. A crash or hang fails the script and leaves its
# input in fuzz/artifacts/<target>. Prints one `fuzz:` line per target with
# the executions done.
set -euo pipefail
cd "$(dirname "$0")/.."

# FUZZ_TARGETS="sniff_tls config_toml" limits a run to some targets.
read -r -a TARGETS <<<"${FUZZ_TARGETS:-sniff_tls sniff_http sniff_preamble config_toml proxy_header}"
mode=${1:-smoke}
case "$mode" in
    smoke)
        total=${2:-60}
        limit=(-max_total_time=$(( total / ${#TARGETS[@]} )))
        ;;
    long)
        limit=(-runs="${2:-10000000}" -max_total_time="${3:-3600}")
        ;;
    *) echo "usage: $0 smoke [SECONDS] | long [RUNS] [SECONDS]" >&2; exit 2 ;;
esac

command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz missing (scripts/setup.sh --test installs it)" >&2; exit 1; }
cargo +nightly fuzz build >/dev/null 2>&1 || cargo +nightly fuzz build
status=0
for target in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    started=$(date +%s)
    # One process, one job (the machine has 2 shared cores; -jobs=1 would
    # also work but sends the output to ./fuzz-0.log); -timeout: an input
    # taking over 10 s counts as a hang; -rss_limit_mb bounds memory.
    if cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${limit[@]}" \
        >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        tail -n 40 "$log" >&2
    fi
    runs=$(awk '/stat::number_of_executed_units:/ {print $2}' "$log" | tail -n1)
    printf 'fuzz: %s %s executions=%s seconds=%s\n' "$target" "$result" "${runs:-?}" "$(( $(date +%s) - started ))"
    rm -f "$log"
done
exit "$status"
