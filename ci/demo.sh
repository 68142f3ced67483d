#!/usr/bin/env bash
# The newcomer's demo: builds everything (daemon, patched QEMU, the guest
# module against a Debian 6.12 guest kernel, a busybox initramfs), starts the
# daemon, boots a small guest that loads virtio_tmem and swaps onto /dev/tmem0,
# and shows `tmemctl stats` while the guest runs. Ctrl-C stops everything.
#   DEMO_KERNEL=6.12|6.1   DEMO_MEM_LIMIT=16M   GUEST_MEM=256M
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=ci/lib-guest.sh
source ci/lib-guest.sh

DEMO_KERNEL=${DEMO_KERNEL:-6.12}
DEMO_MEM_LIMIT=${DEMO_MEM_LIMIT:-16M}
RUN=$TMEM_ROOT/target/demo
mkdir -p "$RUN"

cleanup() { stop_guest; stop_daemon || true; }
trap cleanup EXIT
trap 'echo; log "interrupted"; exit 130' INT TERM

log "step 1/4: host packages"
bash ci/deps.sh guest
log "step 2/4: the patched QEMU (built once, then cached under $TMEM_CACHE)"
QEMU=$(build_qemu)
log "step 3/4: the daemon, tmemctl, guest kernel $DEMO_KERNEL, module and initramfs"
build_daemon
suite=""
for spec in "${GUEST_KERNEL_SUITES[@]}"; do
    read -r label sfx <<<"$spec"
    [ "$label" = "$DEMO_KERNEL" ] && suite=$sfx
done
[ -n "$suite" ] || die "DEMO_KERNEL must be one of: ${GUEST_KERNEL_SUITES[*]}"
prepare_guest "$suite"

log "step 4/4: daemon (--mem-limit $DEMO_MEM_LIMIT, spilling to $RUN/spill.bin) and guest"
start_daemon "$RUN" --mem-limit "$DEMO_MEM_LIMIT" --spill-file "$RUN/spill.bin" --spill-limit 2G \
    --queues "$GUEST_CPUS" --capacity 1G
CONSOLE=$RUN/console.log
start_guest "$QEMU" "$KERNEL_DIR" "$INITRD" "$RUN/tmem.sock" "$CONSOLE" tmemfactor=2 tmemhold=4
cat <<MSG

  daemon : $TMEM_ROOT/target/release/vhost-user-tmem --socket $RUN/tmem.sock --control $RUN/control.sock ...
  guest  : QEMU pid $QEMU_PID, console in $CONSOLE
  inspect: $TMEM_ROOT/target/release/tmemctl --control $RUN/control.sock stats

MSG

shown=0
while kill -0 "$QEMU_PID" 2>/dev/null; do
    sleep 5
    kill -0 "$QEMU_PID" 2>/dev/null || break
    # What the guest said since the last refresh.
    n=$(wc -l <"$CONSOLE")
    if [ "$n" -gt "$shown" ]; then
        sed -n "$((shown + 1)),${n}p" "$CONSOLE" | grep -a -E 'TMEM-E2E|swaptest|SWAPTEST' | sed 's/^/  guest| /' || true
        shown=$n
    fi
    echo "---- tmemctl stats ($(date +%T)) ----"
    tmemctl --control "$RUN/control.sock" stats || true
done
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=""
grep -a -E '^SWAPTEST|TMEM-E2E-DONE' "$CONSOLE" | sed 's/^/  guest| /'
echo "---- tmemctl stats after the guest powered off ----"
tmemctl --control "$RUN/control.sock" stats || true
stop_daemon
if grep -q '^SWAPTEST PASS' "$CONSOLE"; then
    log "demo done: the guest swapped through the daemon and read every page back intact"
else
    die "the guest did not report SWAPTEST PASS; see $CONSOLE and $RUN/daemon.log"
fi
