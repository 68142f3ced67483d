#!/usr/bin/env bash
# Builds (once; cached by QEMU version and patch hash) qemu-system-x86_64 from
# Debian trixie's qemu source package with ci/qemu/vhost-user-tmem.patch, and
# prints the path of the binary. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=ci/lib-guest.sh
source ci/lib-guest.sh
bash ci/deps.sh guest >&2
build_qemu
