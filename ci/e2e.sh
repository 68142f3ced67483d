#!/usr/bin/env bash
# End-to-end test: Debian guest kernels (the newest one from unstable, 6.12
# and 6.1) swap through the patched QEMU into the daemon; the guest verifies
# every page and the host checks the daemon's counters during and after the
# run. The guest workload: E2E_JOBS processes swapping at once, a churn
# process that maps, fills, verifies and unmaps memory (slots freed in bulk),
# and a suspend cycle before swapon (must work) and one in the middle of the
# workload (the driver must refuse it while the host holds pages).
#   E2E_KERNELS="sid 6.12 6.1"  which guest kernels to run
#   E2E_TIMEOUT=1200        seconds per guest run
#   E2E_JOBS=3              swapping worker processes in the guest
#   E2E_FAULT=1             also kill the daemon under a swapping 6.12 guest
#   E2E_BACKING=1           also run a 6.1 guest whose puts the daemon rejects,
#                           with backing_dev= on a virtio disk
#   E2E_COMPARE=1           also run the 6.12 workload with swap on a plain
#                           virtio-blk disk: it must pass the same checks, and
#                           both workload times are reported
#   E2E_BLK=1               also run each 6.12 and 6.1 kernel against the
#                           daemon's blk device (--socket PATH,blk=SIZE) with
#                           Debian's stock QEMU and no tmem module: the swap
#                           workload, then mkfs.ext4, files and fsck -n
#   E2E_BLK_SIZE=512M       size of that disk
#   E2E_BLK_KERNELS="6.12 6.1"  the kernels of the blk runs
#   E2E_ONLY=blk            only the blk runs (no patched QEMU, no module), on
#                           E2E_KERNELS if given, else on E2E_BLK_KERNELS
# Artifacts: target/e2e/console-<kernel>.log, daemon-<kernel>.log, stats-*.json,
# figures.txt (one line per run: workload time, slot frees, notify misses)
set -euo pipefail
cd "$(dirname "$0")/.."
GUEST_MEM=${GUEST_MEM:-192M}
# shellcheck source=ci/lib-guest.sh
source ci/lib-guest.sh

E2E_KERNELS_GIVEN=${E2E_KERNELS:-}
E2E_KERNELS=${E2E_KERNELS:-sid 6.12 6.1}
E2E_TIMEOUT=${E2E_TIMEOUT:-1200}
E2E_JOBS=${E2E_JOBS:-3}
ART=$TMEM_ROOT/target/e2e
mkdir -p "$ART"
: >"$ART/figures.txt"
WORKLOAD_ARGS=(tmemfactor="${E2E_FACTOR:-1.5}" tmemjobs="$E2E_JOBS" tmemchurn=1 tmemsuspend=1)

cleanup() { stop_guest; stop_daemon || true; }
trap cleanup EXIT

t() { local s=$SECONDS; "$@"; log "$* took $((SECONDS - s))s"; }

FAILED=0
check() { # check NAME CONDITION_RESULT(true/false) DETAIL
    if [ "$2" = true ]; then
        log "ok   $1 ($3)"
    else
        log "FAIL $1 ($3)"
        FAILED=1
    fi
}

# jq over a file of JSON lines: the maximum of a counter across samples.
max_of() { jq -s "map(.store.total.$2) | max // 0" "$1"; }

run_guest() {
    local label=$1
    local run=$GUEST_OUT/run-$label console=$ART/console-$label.log s
    rm -rf "$run" && mkdir -p "$run"
    : >"$run/samples.jsonl"
    start_daemon "$run" --mem-limit 8M --spill-file "$run/spill.bin" --spill-limit 2G \
        --queues "$GUEST_CPUS" --capacity 1G
    local t0=$SECONDS
    start_guest "$QEMU" "$KERNEL_DIR" "$INITRD" "$run/tmem.sock" "$console" \
        "${WORKLOAD_ARGS[@]}" tmemhold=10
    log "guest $label started (console: $console)"

    # During the run: sample the daemon's stats until the guest swapped off.
    local end=$((SECONDS + E2E_TIMEOUT)) swapped_off=false
    while [ $SECONDS -lt $end ]; do
        stats_json "$run" >>"$run/samples.jsonl" 2>>"$run/tmemctl.err" || true
        if grep -q 'TMEM-E2E: SWAPOFF' "$console"; then swapped_off=true; break; fi
        kill -0 "$QEMU_PID" 2>/dev/null || break
        grep -q 'TMEM-E2E-DONE' "$console" && break
        sleep 2
    done
    grep -a -E 'swaptest.*(pass 3|cycles|killed)|SWAPTEST|TMEM-E2E: (SUSPEND|WORKLOAD)' "$console" | tr -d '\r' || true
    check "$label: guest reached swapoff" "$swapped_off" "after $((SECONDS - t0))s"
    check_workload "$label" "$console" tmem

    # After swapoff the guest holds for tmemhold seconds: every page of the
    # device must be gone from the host by then (pending invalidations drain).
    local stored=-1
    if [ "$swapped_off" = true ]; then
        for s in $(seq 16); do
            stats_json "$run" >"$ART/stats-after-swapoff-$label.json" 2>>"$run/tmemctl.err" || true
            stored=$(jq '.store.total.stored_pages' "$ART/stats-after-swapoff-$label.json" 2>/dev/null || echo -1)
            [ "$stored" = 0 ] && break
            sleep 0.5
        done
    fi
    check "$label: stored_pages == 0 after swapoff" "$([ "$stored" = 0 ] && echo true || echo false)" "stored_pages=$stored"

    wait_console "$console" 'TMEM-E2E-DONE' 60 || true
    local i
    for i in $(seq 60); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.5; done
    stop_guest
    log "guest $label ran $((SECONDS - t0))s"

    stats_json "$run" >"$ART/stats-final-$label.json" 2>>"$run/tmemctl.err" || true
    cat "$run/samples.jsonl" "$ART/stats-final-$label.json" >"$ART/stats-samples-$label.jsonl"
    local all=$ART/stats-samples-$label.jsonl v
    for c in succ_stores loads dedup_hits same_filled_pages spilled_pages; do
        v=$(max_of "$all" "$c")
        check "$label: $c > 0" "$([ "$v" -gt 0 ] && echo true || echo false)" "max $c=$v"
    done
    v=$(max_of "$all" failed_loads)
    check "$label: failed_loads == 0" "$([ "$v" = 0 ] && echo true || echo false)" "failed_loads=$v"
    # The daemon's background writer (auto headroom: 512K of the 8M) spills
    # ahead of the guest's puts; most writes should be its.
    local bg writes
    bg=$(jq -s 'map(.store.background_writebacks // 0) | max // 0' "$all")
    writes=$(max_of "$all" spill_writes)
    check "$label: background writer made most spill writes" \
        "$([ $((bg * 2)) -gt "$writes" ] && echo true || echo false)" "background $bg of $writes"
    check "$label: guest finished cleanly" \
        "$(grep -q 'TMEM-E2E-DONE rc=0' "$console" && echo true || echo false)" "$(grep -a -m1 'TMEM-E2E-DONE' "$console" || echo 'no DONE marker')"
    if grep -a -q -E 'Oops|BUG:|WARNING:|Call Trace|Kernel panic' "$console"; then
        check "$label: no kernel warnings" false "see $console"
    fi

    local rc=0
    stop_daemon || rc=$?
    check "$label: daemon exits 0 on SIGTERM" "$([ $rc = 0 ] && echo true || echo false)" "rc=$rc"
    cp "$run/daemon.log" "$ART/daemon-$label.log"
    if [ $FAILED != 0 ]; then
        echo "---- console ($console), last 40 lines ----" >&2
        tail -40 "$console" >&2
        echo "---- daemon log, last 20 lines ----" >&2
        tail -20 "$run/daemon.log" >&2
    fi
}

# check_workload LABEL CONSOLE KIND: the checks every run of the concurrent
# workload passes, and its figures appended to figures.txt.
check_workload() {
    local label=$1 console=$2 kind=$3 line
    check "$label: guest printed SWAPTEST PASS" \
        "$(grep -a -q '^SWAPTEST PASS' "$console" && echo true || echo false)" \
        "$(grep -a -m1 '^SWAPTEST' "$console" | tr -d '\r' || echo none)"
    check "$label: no page corrupt in any process" \
        "$(grep -a -q -E 'corrupt|killed by signal' "$console" && echo false || echo true)" \
        "$(grep -a -c -E 'corrupt' "$console" || true) corrupt-page lines"
    check "$label: no OOM kill" \
        "$(grep -a -q -E 'invoked oom-killer|Out of memory' "$console" && echo false || echo true)" "see $console"
    check "$label: the churn process ran" \
        "$(grep -a -q 'swaptest\[churn\]: [1-9][0-9]* cycles' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -o 'swaptest\[churn\]: [0-9]* cycles.*' "$console" | tr -d '\r' || echo none)"
    if [ "$kind" = tmem ]; then
        check "$label: io_timeout_ms=0 refused" \
            "$(grep -a -q 'TMEM-E2E: PARAM io_timeout_ms=0 refused' "$console" && echo true || echo false)" \
            "$(grep -a -m1 'TMEM-E2E: PARAM' "$console" | tr -d '\r' || echo none)"
    fi
    check "$label: suspend before swapon went through" \
        "$(grep -a -q -E 'TMEM-E2E: SUSPEND idle (done|unsupported)' "$console" && echo true || echo false)" \
        "$(grep -a -m1 'TMEM-E2E: SUSPEND idle' "$console" | tr -d '\r' || echo none)"
    if [ "$kind" = tmem ]; then
        # The host holds pages then: the driver must refuse, not lose them.
        check "$label: suspend mid-workload refused cleanly" \
            "$(grep -a -q -E 'TMEM-E2E: SUSPEND busy (refused|unsupported)' "$console" &&
                grep -a -q -E 'suspend refused: the host holds [1-9]|SUSPEND busy unsupported' "$console" &&
                echo true || echo false)" \
            "$(grep -a -m1 -E 'suspend refused|TMEM-E2E: SUSPEND busy' "$console" | tr -d '\r' || echo none)"
    else
        check "$label: suspend mid-workload went through" \
            "$(grep -a -q -E 'TMEM-E2E: SUSPEND busy (done|unsupported)' "$console" && echo true || echo false)" \
            "$(grep -a -m1 'TMEM-E2E: SUSPEND busy' "$console" | tr -d '\r' || echo none)"
    fi
    line=$(grep -a -m1 'TMEM-E2E: WORKLOAD' "$console" | tr -d '\r' || true)
    log "$label figures: ${line#TMEM-E2E: }"
    printf '%s %s %s\n' "$label" "$kind" "${line#TMEM-E2E: WORKLOAD }" >>"$ART/figures.txt"
}

# The same workload with swap on a plain virtio-blk disk (the tmem device is
# there but unused): the tmem guest must do at least as well.
run_compare() {
    local label=$1
    local run=$GUEST_OUT/run-compare-$label console=$ART/console-compare-$label.log
    rm -rf "$run" && mkdir -p "$run"
    truncate -s 1G "$run/swap.img"
    start_daemon "$run" --mem-limit 8M --queues "$GUEST_CPUS" --capacity 1G
    local t0=$SECONDS
    QEMU_EXTRA_ARGS=(-drive "file=$run/swap.img,format=raw,if=none,id=sw,cache=unsafe"
        -device virtio-blk-pci,drive=sw)
    start_guest "$QEMU" "$KERNEL_DIR" "$INITRD" "$run/tmem.sock" "$console" \
        "${WORKLOAD_ARGS[@]}" tmemswap=vda tmemhold=1
    QEMU_EXTRA_ARGS=()
    log "compare run $label (swap on virtio-blk): guest started (console: $console)"
    wait_console "$console" 'TMEM-E2E-DONE' "$E2E_TIMEOUT" || true
    stop_guest
    stop_daemon || true
    check_workload "$label virtio-blk" "$console" blk
    local tm bl
    tm=$(grep -a -m1 'TMEM-E2E: WORKLOAD' "$ART/console-$label.log" |
        sed -n 's/.* seconds=\([0-9]*\).*/\1/p' || true)
    bl=$(grep -a -m1 'TMEM-E2E: WORKLOAD' "$console" | sed -n 's/.* seconds=\([0-9]*\).*/\1/p' || true)
    # Both runs must pass the same checks (above), with every page verified.
    # The times are reported, not gated: under TCG each synchronous tmem
    # request costs a few hundred microseconds of emulated exits and
    # interrupts, while virtio-blk batches swap I/O and reads ahead, so on
    # this machine virtio-blk is faster (see figures.txt).
    log "$label: workload time tmem ${tm:-?}s, virtio-blk ${bl:-?}s"
    log "compare run $label took $((SECONDS - t0))s"
}

# Surprise loss of the device: the daemon is killed while the guest swaps.
# The driver must turn the stalled requests into I/O errors (io_timeout_ms)
# instead of hanging the guest: the guest must still reach its DONE marker
# and no kernel oops/BUG may appear.
run_fault() {
    local label=$1
    local run=$GUEST_OUT/run-fault-$label console=$ART/console-fault-$label.log
    rm -rf "$run" && mkdir -p "$run"
    start_daemon "$run" --mem-limit 8M --spill-file "$run/spill.bin" --spill-limit 2G \
        --queues "$GUEST_CPUS" --capacity 1G
    local t0=$SECONDS
    start_guest "$QEMU" "$KERNEL_DIR" "$INITRD" "$run/tmem.sock" "$console" \
        tmemfactor=2 tmemhold=1 tmemcg=48M tmemargs=io_timeout_ms=3000 tmemunbind=1
    log "fault run $label: guest started (console: $console)"
    if wait_console "$console" 'swaptest: filled [4-9][0-9]%' "$E2E_TIMEOUT"; then
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
        DAEMON_PID=""
        log "fault run $label: daemon killed after $((SECONDS - t0))s"
    fi
    local done=false
    wait_console "$console" 'TMEM-E2E-DONE' 300 && done=true
    check "$label fault: guest survives losing the device" "$done" \
        "$(grep -a -m1 'TMEM-E2E-DONE' "$console" || echo 'no DONE marker: guest hung')"
    check "$label fault: driver reported the device unusable" \
        "$(grep -a -q 'device unusable' "$console" && echo true || echo false)" \
        "$(grep -a -m1 'device unusable' "$console" | tr -d '\r' || echo none)"
    check "$label fault: unbinding with swap on is warned about" \
        "$(grep -a -q 'unbound while open' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -o 'tmem0 unbound while open.*' "$console" | tr -d '\r' || echo none)"
    check "$label fault: no kernel oops or BUG" \
        "$(grep -a -q -E 'Oops|BUG:|Kernel panic|hung_task|blocked for more than' "$console" && echo false || echo true)" "see $console"
    stop_guest
    log "fault run $label took $((SECONDS - t0))s"
}

# Rejected puts with backing_dev=: the daemon gets a RAM and spill budget far
# below the workload, so it rejects puts; the driver must write those pages
# to the guest's virtio disk and read them back from there.
run_backing() {
    local label=$1
    local run=$GUEST_OUT/run-backing-$label console=$ART/console-backing-$label.log
    rm -rf "$run" && mkdir -p "$run"
    truncate -s 1G "$run/backing.img"
    start_daemon "$run" --mem-limit 4M --spill-file "$run/spill.bin" --spill-limit 16M \
        --queues "$GUEST_CPUS" --capacity 1G
    local t0=$SECONDS
    QEMU_EXTRA_ARGS=(-drive "file=$run/backing.img,format=raw,if=none,id=bk,cache=unsafe"
        -device virtio-blk-pci,drive=bk)
    # This run also covers MSI-X per queue (the other runs use INTx).
    QEMU_VECTORS=$((GUEST_CPUS + 1)) start_guest "$QEMU" "$KERNEL_DIR" "$INITRD" \
        "$run/tmem.sock" "$console" tmemfactor=1.5 tmemhold=1 tmemargs=backing_dev=/dev/vda \
        tmemlate=virtio_blk
    QEMU_EXTRA_ARGS=()
    log "backing run $label: guest started (console: $console)"
    wait_console "$console" 'TMEM-E2E-DONE' "$E2E_TIMEOUT" || true
    stats_json "$run" >"$ART/stats-backing-$label.json" 2>>"$run/tmemctl.err" || true
    local bw br rej
    bw=$(awk '$1 == "tmem0" && $2 == "backing_writes" { v = $3 } END { print v + 0 }' "$console")
    br=$(awk '$1 == "tmem0" && $2 == "backing_reads" { v = $3 } END { print v + 0 }' "$console")
    rej=$(jq '.store.total.failed_stores' "$ART/stats-backing-$label.json" 2>/dev/null || echo 0)
    check "$label backing: daemon rejected puts" "$([ "$rej" -gt 0 ] && echo true || echo false)" "failed_stores=$rej"
    check "$label backing: a backing_dev that came after probe was taken up" \
        "$(grep -a -q 'TMEM-E2E: LATE backing_dev taken up' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -E 'not usable yet|backing_dev /dev' "$console" | tr -d '\r' || echo none)"
    check "$label backing: rejected pages written to and read from backing_dev" \
        "$([ "$bw" -gt 0 ] && [ "$br" -gt 0 ] && echo true || echo false)" "backing_writes=$bw backing_reads=$br"
    check "$label backing: guest printed SWAPTEST PASS" \
        "$(grep -q '^SWAPTEST PASS' "$console" && echo true || echo false)" "$(grep -a -m1 '^SWAPTEST' "$console" || echo none)"
    check "$label backing: MSI-X vector per queue" \
        "$(grep -a -q -E 'PCI-MSI.*virtio[0-9]+-tmem[.]0' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -E 'virtio[0-9]+-tmem[.]0' "$console" | tr -s ' ' || echo 'no tmem.0 interrupt')"
    check "$label backing: no kernel oops or BUG" \
        "$(grep -a -q -E 'Oops|BUG:|Kernel panic|WARNING:' "$console" && echo false || echo true)" "see $console"
    stop_guest
    stop_daemon || true
    log "backing run $label took $((SECONDS - t0))s"
}

# The same store behind a stock vhost-user-blk device: Debian's unpatched
# QEMU, the kernel's own virtio_blk, no tmem module. The guest swaps on the
# disk (every page verified), then makes an ext4 filesystem on it, writes
# files, reads them back after a remount, and runs fsck -n.
run_blk() {
    local label=$1 suite kdir initrd qemu saved
    local run=$GUEST_OUT/run-blk-$label console=$ART/console-blk-$label.log
    rm -rf "$run" && mkdir -p "$run"
    suite=$(suite_of "$label")
    qemu=$(stock_qemu)
    saved=("${GUEST_MODULES[@]}")
    GUEST_MODULES=("${GUEST_BLK_MODULES[@]}")
    kdir=$(GUEST_KERNEL_FLAVOUR=blk fetch_guest_kernel "$suite")
    GUEST_MODULES=("${saved[@]}")
    initrd=$GUEST_OUT/blk-$label/initramfs.cpio.gz
    mkdir -p "$(dirname "$initrd")"
    build_blk_initramfs "$kdir" "$(build_swaptest)" "$initrd"
    : >"$run/samples.jsonl"
    # The spill file must hold the whole disk uncompressed (a 4224-byte slot
    # a page, plus 64), and leaves 64M for nothing else here.
    local size bytes pages
    size=$E2E_BLK_SIZE
    bytes=$(numfmt --from=iec "$size")
    pages=$((bytes / 4096))
    DAEMON_SOCKET_OPTS=blk=$size start_daemon "$run" --mem-limit 16M \
        --spill-file "$run/spill.bin" --spill-limit $(((pages + 64) * 4224 + (64 << 20))) \
        --queues "$GUEST_CPUS"
    local t0=$SECONDS
    start_blk_guest "$qemu" "$kdir" "$initrd" "$run/tmem.sock" "$console" \
        tmemfactor="${E2E_FACTOR:-1.5}" tmemjobs="$E2E_JOBS" tmemchurn=1
    log "blk run $label: stock $("$qemu" --version | head -1), guest started (console: $console)"
    local end=$((SECONDS + E2E_TIMEOUT))
    while [ $SECONDS -lt $end ]; do
        stats_json "$run" >>"$run/samples.jsonl" 2>>"$run/tmemctl.err" || true
        grep -q 'TMEM-E2E-DONE' "$console" && break
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 2
    done
    grep -a -E 'TMEM-E2E: (DISK|WORKLOAD|FS)|SWAPTEST|swaptest.*cycles' "$console" | tr -d '\r' || true
    stats_json "$run" >"$ART/stats-blk-$label.json" 2>>"$run/tmemctl.err" || true
    cat "$run/samples.jsonl" "$ART/stats-blk-$label.json" >"$ART/stats-samples-blk-$label.jsonl"
    local all=$ART/stats-samples-blk-$label.jsonl v
    check "$label blk: guest printed SWAPTEST PASS" \
        "$(grep -a -q '^SWAPTEST PASS' "$console" && echo true || echo false)" \
        "$(grep -a -m1 '^SWAPTEST' "$console" | tr -d '\r' || echo none)"
    check "$label blk: no page corrupt in any process" \
        "$(grep -a -q -E 'corrupt|killed by signal' "$console" && echo false || echo true)" \
        "$(grep -a -c -E 'corrupt' "$console" || true) corrupt-page lines"
    check "$label blk: the churn process ran" \
        "$(grep -a -q 'swaptest\[churn\]: [1-9][0-9]* cycles' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -o 'swaptest\[churn\]: [0-9]* cycles.*' "$console" | tr -d '\r' || echo none)"
    check "$label blk: $GUEST_CPUS queues, 4096-byte blocks, discard and write-zeroes" \
        "$(grep -a -q -E "TMEM-E2E: DISK sectors=$((bytes / 512)) queues=$GUEST_CPUS lbs=4096 pbs=4096 discard_max=[1-9][0-9]* write_zeroes_max=[1-9][0-9]* ro=0" "$console" && echo true || echo false)" \
        "$(grep -a -m1 'TMEM-E2E: DISK' "$console" | tr -d '\r' || echo none)"
    check "$label blk: ext4 made, files read back, fsck -n clean" \
        "$(grep -a -q 'TMEM-E2E: FS PASS' "$console" && echo true || echo false)" \
        "$(grep -a -m1 -E 'TMEM-E2E: FS (FAIL|PASS)' "$console" | tr -d '\r' || echo 'no FS line')"
    check "$label blk: guest finished cleanly" \
        "$(grep -a -q 'TMEM-E2E-DONE rc=0' "$console" && echo true || echo false)" \
        "$(grep -a -m1 'TMEM-E2E-DONE' "$console" || echo 'no DONE marker')"
    check "$label blk: stats show a blk device" \
        "$(jq -e '.devices[0].kind == "blk"' "$ART/stats-blk-$label.json" >/dev/null 2>&1 && echo true || echo false)" \
        "kind=$(jq -r '.devices[0].kind' "$ART/stats-blk-$label.json" 2>/dev/null)"
    for c in succ_stores loads spilled_pages; do
        v=$(max_of "$all" "$c")
        check "$label blk: $c > 0" "$([ "$v" -gt 0 ] && echo true || echo false)" "max $c=$v"
    done
    v=$(max_of "$all" failed_stores)
    check "$label blk: no put refused (room is reserved)" "$([ "$v" = 0 ] && echo true || echo false)" "failed_stores=$v"
    check "$label blk: no kernel warnings, no I/O errors" \
        "$(grep -a -q -E 'Oops|BUG:|WARNING:|Call Trace|Kernel panic|I/O error' "$console" && echo false || echo true)" "see $console"
    for i in $(seq 60); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.5; done
    stop_guest
    local rc=0
    stop_daemon || rc=$?
    check "$label blk: daemon exits 0 on SIGTERM" "$([ $rc = 0 ] && echo true || echo false)" "rc=$rc"
    cp "$run/daemon.log" "$ART/daemon-blk-$label.log"
    local line
    line=$(grep -a -m1 'TMEM-E2E: WORKLOAD' "$console" | tr -d '\r' || true)
    printf '%s %s %s\n' "$label" blk "${line#TMEM-E2E: WORKLOAD }" >>"$ART/figures.txt"
    log "blk run $label took $((SECONDS - t0))s"
}

suite_of() { # suite_of LABEL: the apt suite of a guest kernel label
    local spec label sfx
    for spec in "${GUEST_KERNEL_SUITES[@]}"; do
        read -r label sfx <<<"$spec"
        [ "$label" = "$1" ] && { printf '%s\n' "$sfx"; return 0; }
    done
    die "unknown guest kernel $1 (known: ${GUEST_KERNEL_SUITES[*]})"
}

T_START=$SECONDS
E2E_BLK_SIZE=${E2E_BLK_SIZE:-512M}
E2E_BLK_KERNELS=${E2E_BLK_KERNELS:-6.12 6.1}
t bash ci/deps.sh guest
ensure_apt_suites
for want in $E2E_KERNELS; do suite_of "$want" >/dev/null; done
if [ "${E2E_ONLY:-}" = blk ]; then
    t build_daemon
    for want in ${E2E_KERNELS_GIVEN:-$E2E_BLK_KERNELS}; do run_blk "$want"; done
else
    # The guest kernels (downloads, headers, the unstable chroot) are fetched in
    # the background while QEMU and the daemon build.
    (
        for want in $E2E_KERNELS; do
            s=$SECONDS
            fetch_guest_kernel "$(suite_of "$want")" >/dev/null
            log "kernel $want fetched in $((SECONDS - s))s"
        done
    ) >"$ART/fetch-kernels.log" 2>&1 &
    FETCH_PID=$!
    s=$SECONDS; QEMU=$(build_qemu); log "QEMU ready after $((SECONDS - s))s: $QEMU"
    t build_daemon
    s=$SECONDS
    wait "$FETCH_PID" || { cat "$ART/fetch-kernels.log" >&2; die "fetching the guest kernels failed"; }
    log "guest kernels ready $((SECONDS - s))s after the builds:"
    sed 's/^/  /' "$ART/fetch-kernels.log" >&2

    for want in $E2E_KERNELS; do
        suite=$(suite_of "$want")
        s=$SECONDS
        prepare_guest "$suite"
        log "kernel $want fetched and module built in $((SECONDS - s))s"
        run_guest "$want"
        if [ "$want" = "${E2E_FAULT_KERNEL:-6.12}" ] && [ "${E2E_FAULT:-1}" = 1 ]; then
            run_fault "$want"
        fi
        if [ "$want" = "${E2E_BACKING_KERNEL:-6.1}" ] && [ "${E2E_BACKING:-1}" = 1 ]; then
            run_backing "$want"
        fi
        if [ "$want" = "${E2E_COMPARE_KERNEL:-6.12}" ] && [ "${E2E_COMPARE:-1}" = 1 ]; then
            run_compare "$want"
        fi
        if [[ " $E2E_BLK_KERNELS " == *" $want "* ]] && [ "${E2E_BLK:-1}" = 1 ]; then
            run_blk "$want"
        fi
    done
fi
log "figures (label kind rc seconds slot_frees notify_misses inval_waits):"
sed 's/^/  /' "$ART/figures.txt" >&2

log "end-to-end total $((SECONDS - T_START))s"
if [ $FAILED != 0 ]; then
    echo "END-TO-END FAILED (artifacts in $ART)" >&2
    exit 1
fi
echo "end-to-end passed (artifacts in $ART)"
