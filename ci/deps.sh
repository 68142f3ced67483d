#!/usr/bin/env bash
# Installs the host packages a part of the project needs. Idempotent and quiet
# when everything is already there.
#   ci/deps.sh rust   - building and testing the Rust crate
#   ci/deps.sh guest  - building QEMU, the guest module and the initramfs
#   ci/deps.sh bench  - building benchmark corpora (ci/make-corpus.sh)
set -euo pipefail

need_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

case "${1:-rust}" in
rust)
    need_apt gcc make pkg-config
    command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
    ;;
bench)
    need_apt python3 zstd coreutils
    ;;
guest)
    # QEMU build (patched, from Debian's source package), the kernel module
    # build against Debian's headers, the initramfs and the guest boot.
    need_apt gcc make pkg-config build-essential bc flex bison libelf-dev \
        python3-venv ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev \
        dpkg-dev patch xz-utils zstd cpio busybox-static jq seabios qemu-system-data \
        kmod util-linux debootstrap e2fsprogs
    command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
    ;;
*)
    echo "unknown part: $1" >&2
    exit 2
    ;;
esac
