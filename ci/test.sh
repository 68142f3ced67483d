#!/usr/bin/env bash
# Every test of the project: lints, unit, property and protocol tests, then the
# end-to-end run of a real guest kernel swapping through QEMU into the daemon.
# Installs what it needs itself (see ci/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

step "host dependencies"
bash ci/deps.sh rust

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --all-targets --locked -- -D warnings

step "rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --quiet

step "the daemon links no test harness"
# The frontend and the benchmarks sit behind the `harness` feature, which only
# the tests and tmem-bench enable.
cargo build --release --locked --bin vhost-user-tmem --bin tmemctl -q
if nm -C target/release/vhost-user-tmem | grep -E 'vhost_user_tmem::(harness|bench)::' | head -3 | grep .; then
    echo "the daemon binary contains harness or bench code" >&2
    exit 1
fi

step "cargo test"
cargo test --locked 2>&1 | tee target/cargo-test.log

bash ci/fuzz.sh  # the fuzz targets, 60 s each

if [ "${TMEM_SKIP_E2E:-0}" = 1 ]; then
    echo "TMEM_SKIP_E2E=1: skipping the end-to-end guest test"
else
    step "end-to-end: guest kernel swapping through QEMU"
    bash ci/e2e.sh
fi
