#!/usr/bin/env bash
# The fuzz targets (fuzz/, cargo-fuzz with libFuzzer): builds them, runs each
# for a bounded time from the corpus in the repository, and fails on any
# crash (a panic, an invariant that broke, a timeout, an out-of-memory).
# Installs what it needs itself: a C++ compiler for libFuzzer, and
# cargo-fuzz (kept in ~/.cargo/bin, installed only when missing).
#
#   TMEM_FUZZ_SECONDS  seconds per target (default 60)
#   TMEM_FUZZ_TARGETS  which targets (default: all four)
#
# New inputs a run finds go to a scratch directory, not into fuzz/corpus.
# A crash input is left in fuzz/artifacts/<target>/; replay it with
#   cargo fuzz run -O -a -s none <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${TMEM_FUZZ_SECONDS:-60}
targets=${TMEM_FUZZ_TARGETS:-device_chain store_ops control_line config_parse}

step() { printf '\n=== %s ===\n' "$*"; }

step "fuzz: tools"
if ! command -v c++ >/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends g++
fi
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
cargo fuzz --version

# -O -a: optimised, with debug assertions and overflow checks.
# -s none: no sanitizer. The code fuzzed is safe Rust (the one unsafe-heavy
# dependency, zstd, is C and would not be instrumented by -Zsanitizer anyway),
# so AddressSanitizer would halve the executions for little; and without it
# the stable toolchain needs no -Z flag. Should a sanitizer be wanted:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a -s address <target>
flags=(-O -a -s none)

step "fuzz: build"
time cargo fuzz build "${flags[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in $targets; do
    step "fuzz: $t for ${seconds}s"
    mkdir -p "$scratch/$t"
    extra=()
    [ -f "fuzz/dict/$t.dict" ] && extra+=("-dict=fuzz/dict/$t.dict")
    # The scratch directory comes first: libFuzzer adds what it finds there.
    rc=0
    cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"$scratch/$t.log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+ +(INITED|DONE)|stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs)' \
        "$scratch/$t.log" || true
    if [ "$rc" -ne 0 ] || ! grep -q "^Done [0-9]* runs" "$scratch/$t.log"; then
        echo "fuzz target $t FAILED; its output ends with:" >&2
        tail -40 "$scratch/$t.log" >&2
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: all targets ran ${seconds}s without a crash"
