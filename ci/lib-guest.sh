#!/usr/bin/env bash
# Shared shell functions for the guest side: extra apt suites, the patched QEMU
# build, Debian guest kernels, the virtio_tmem module, the initramfs and one
# guest boot. Sourced by ci/e2e.sh and ci/demo.sh; nothing runs on sourcing.
# shellcheck disable=SC2034

TMEM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMEM_CACHE=${TMEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-tmem}
QEMU_SUITE=trixie
# Debian guest kernels: "<label> <suite>" (newest linux-image-amd64 of the
# suite). Suites listed in CHROOT_SUITES are used from a chroot (see
# unstable_chroot): "sid" is the newest kernel Debian packages.
GUEST_KERNEL_SUITES=(
    "sid unstable"
    "6.12 bookworm-backports"
    "6.1 bookworm"
)
CHROOT_SUITES=" unstable "

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The machine's own Debian mirror (first non-security URI of its apt sources),
# so that no registry host name is ever written into this repository.
debian_mirror_uri() {
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "cannot find a Debian mirror in the apt sources of this machine"
    printf '%s\n' "$uri"
}

# Adds the suites the guest side needs (trixie sources for QEMU, bookworm-
# backports binaries for the 6.12 guest kernel) in a separate sources file.
# Backports are NotAutomatic, so nothing installed on the host changes.
ensure_apt_suites() {
    local file=/etc/apt/sources.list.d/vhost-user-tmem.sources uri want
    uri=$(debian_mirror_uri)
    want=$(cat <<SRC
# Written by vhost-user-tmem ci/lib-guest.sh (derived from this machine's apt sources).
Types: deb-src
URIs: $uri
Suites: $QEMU_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
)
    if [ ! -f "$file" ] || [ "$(cat "$file")" != "$want" ]; then
        log "adding apt suites ($QEMU_SUITE sources, bookworm-backports) from $uri"
        printf '%s\n' "$want" | as_root tee "$file" >/dev/null
        as_root apt-get update -qq
    elif [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name "*${QEMU_SUITE}_main_source_Sources*" -print -quit)" ]; then
        as_root apt-get update -qq
    fi
}

# ---------------------------------------------------------------------------
# QEMU: Debian's qemu source package for $QEMU_SUITE plus ci/qemu/*.patch,
# built once and cached by version and patch hash.

QEMU_PATCH=$TMEM_ROOT/ci/qemu/vhost-user-tmem.patch
QEMU_FIRMWARE_ARGS=(-L /usr/share/seabios -L /usr/share/qemu)

qemu_cache_dir() {
    local ver hash
    # showsrc lists every suite; pick the newest version known for QEMU_SUITE.
    ver=$(apt-cache showsrc qemu | awk '/^Version:/ { print $2 }' | sort -V | tail -1)
    [ -n "$ver" ] || die "apt knows no qemu source package (is the $QEMU_SUITE deb-src line there?)"
    hash=$(sha256sum "$QEMU_PATCH" | cut -c1-12)
    printf '%s/qemu-%s-%s\n' "$TMEM_CACHE" "${ver//[:~+]/_}" "$hash"
}

# Prints the path of the patched qemu-system-x86_64, building it if needed.
build_qemu() {
    ensure_apt_suites
    local out src work venv
    out=$(qemu_cache_dir)
    if [ -x "$out/bin/qemu-system-x86_64" ]; then
        printf '%s\n' "$out/bin/qemu-system-x86_64"
        return 0
    fi
    mkdir -p "$TMEM_CACHE"
    work=$(mktemp -d "$TMEM_CACHE/qemu-build.XXXXXX")
    log "building QEMU into $out (work dir $work; takes several minutes)"
    (
        set -euo pipefail
        cd "$work"
        apt-get source --download-only -qq "qemu/$QEMU_SUITE" >/dev/null 2>&1 ||
            apt-get source --download-only "qemu/$QEMU_SUITE"
        tar xf qemu_*.orig.tar.*
        src=$(find . -maxdepth 1 -type d -name 'qemu-*' | head -1)
        cd "$src"
        patch -p1 --forward <"$QEMU_PATCH"
        grep -q '\[63\] = "virtio-tmem"' hw/virtio/virtio.c
        venv=$TMEM_CACHE/qemu-venv
        if [ ! -x "$venv/bin/meson" ]; then
            /usr/bin/python3 -m venv "$venv"
            "$venv/bin/pip" install -q 'meson>=1.5,<2' pycotap
        fi
        mkdir build
        cd build
        ../configure --python="$venv/bin/python3" \
            --target-list=x86_64-softmmu --without-default-features \
            --enable-vhost-user --enable-tcg --enable-kvm --enable-fdt=system \
            --disable-docs --disable-install-blobs >configure.log 2>&1 ||
            { tail -40 configure.log >&2; exit 1; }
        ninja -j"$(nproc)" qemu-system-x86_64 >ninja.log 2>&1 ||
            { tail -60 ninja.log >&2; exit 1; }
        mkdir -p "$out.tmp/bin"
        cp qemu-system-x86_64 "$out.tmp/bin/"
        cp "$QEMU_PATCH" "$out.tmp/"
        rm -rf "$out"
        mv "$out.tmp" "$out"
    ) >&2 || { rm -rf "$work"; die "QEMU build failed"; }
    rm -rf "$work"
    log "QEMU built: $out/bin/qemu-system-x86_64"
    printf '%s\n' "$out/bin/qemu-system-x86_64"
}

# ---------------------------------------------------------------------------
# Debian unstable in a chroot. Its kernel headers cannot be used on a bookworm
# host (they need a newer gcc and glibc), so the newest kernel's module is
# built inside a minimal sid chroot. The chroot is cached outside the checkout,
# keyed by suite and date (UTC), and older ones are removed.

# unstable_chroot SUITE: prints the path of a ready chroot of SUITE.
unstable_chroot() {
    local suite=$1 dir uri old
    dir=$TMEM_CACHE/chroot-$suite-$(date -u +%Y%m%d)
    if [ -f "$dir/.ready" ]; then
        printf '%s\n' "$dir"
        return 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap is missing (ci/deps.sh guest)"
    uri=$(debian_mirror_uri)
    mkdir -p "$TMEM_CACHE"
    for old in "$TMEM_CACHE"/chroot-"$suite"-*; do
        [ -d "$old" ] && [ "$old" != "$dir" ] || continue
        # A build that was interrupted may have left /proc mounted there.
        if mountpoint -q "$old/proc"; then as_root umount "$old/proc"; fi
        as_root rm -rf --one-file-system "$old"
    done
    if mountpoint -q "$dir/proc"; then as_root umount "$dir/proc"; fi
    as_root rm -rf --one-file-system "$dir"
    log "creating a $suite chroot in $dir from $uri"
    as_root debootstrap --variant=minbase --include=make,gcc,libc6-dev \
        "$suite" "$dir" "$uri" >"$TMEM_CACHE/debootstrap-$suite.log" 2>&1 ||
        { tail -20 "$TMEM_CACHE/debootstrap-$suite.log" >&2; die "debootstrap $suite failed"; }
    # The mirror's unstable Release file may be past its Valid-Until date.
    printf 'Acquire::Check-Valid-Until "false";\n' |
        as_root tee "$dir/etc/apt/apt.conf.d/99vhost-user-tmem" >/dev/null
    in_chroot "$dir" apt-get update -qq || die "apt-get update in the $suite chroot failed"
    as_root touch "$dir/.ready"
    printf '%s\n' "$dir"
}

# in_chroot DIR CMD...: runs CMD as root inside the chroot DIR.
in_chroot() {
    local dir=$1
    shift
    as_root env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive chroot "$dir" "$@"
}

# ---------------------------------------------------------------------------
# Debian guest kernels: the image (vmlinuz + the virtio modules it needs) is
# downloaded and unpacked into the cache; the matching headers are installed
# with apt, so that Debian's kbuild symlinks resolve.

GUEST_MODULES=(virtio_pci virtio_blk)
# The blk run's guests also make an ext4 filesystem (crc32c for its checksums).
GUEST_BLK_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)

# Prints "<abi> <version>" of the newest linux-image-amd64 in a suite.
guest_kernel_abi() {
    local suite=$1 ver pkg chroot
    if [[ $CHROOT_SUITES == *" $suite "* ]]; then
        chroot=$(unstable_chroot "$suite")
        ver=$(in_chroot "$chroot" apt-cache show linux-image-amd64 |
            awk '/^Version:/ { print $2 }' | sort -V | tail -1)
        pkg=$(in_chroot "$chroot" apt-cache show "linux-image-amd64=$ver" |
            sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\).*/\1/p' | head -1)
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in the $suite chroot"
        printf '%s %s\n' "${pkg#linux-image-}" "$ver"
        return 0
    fi
    ver=$(apt-cache madison linux-image-amd64 |
        awk -F' *[|] *' -v s="$suite" '$3 ~ (" " s "(-security|-updates)?/") { print $2 }' |
        sort -V | tail -1)
    [ -n "$ver" ] || die "no linux-image-amd64 in suite $suite"
    pkg=$(apt-cache show "linux-image-amd64=$ver" |
        sed -n 's/^Depends: *\(linux-image-[^ ,]*\).*/\1/p' | head -1)
    [ -n "$pkg" ] || die "cannot resolve linux-image-amd64=$ver"
    printf '%s %s\n' "${pkg#linux-image-}" "$ver"
}

# fetch_guest_kernel SUITE: prints the cache dir holding vmlinuz, modules/
# (the virtio .ko files, decompressed, with modules.order listing them in load
# order) and kdir (the path of the installed headers).
fetch_guest_kernel() {
    local suite=$1 abi ver dir tmp kdir chroot=""
    ensure_apt_suites
    read -r abi ver < <(guest_kernel_abi "$suite")
    # A kernel fetched with other modules (GUEST_KERNEL_FLAVOUR=blk) has a
    # cache dir of its own, so the two never refetch each other's.
    dir=$TMEM_CACHE/kernels/$abi${GUEST_KERNEL_FLAVOUR:+-$GUEST_KERNEL_FLAVOUR}
    kdir=/usr/src/linux-headers-$abi
    if [[ $CHROOT_SUITES == *" $suite "* ]]; then
        chroot=$(unstable_chroot "$suite")
        if [ ! -f "$chroot$kdir/Makefile" ]; then
            log "installing headers linux-headers-$abi ($ver) in $chroot"
            in_chroot "$chroot" apt-get install -y -qq --no-install-recommends \
                "linux-headers-$abi=$ver" >/dev/null ||
                die "apt-get install linux-headers-$abi=$ver in $chroot failed"
        fi
    elif [ ! -f "$kdir/Makefile" ]; then
        log "installing headers linux-headers-$abi ($ver)"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            "linux-headers-$abi=$ver" >/dev/null ||
            die "apt-get install linux-headers-$abi=$ver failed"
    fi
    if [ -f "$dir/modules/modules.order" ] && [ -f "$dir/vmlinuz" ] &&
        [ "$(cat "$dir/modules/wanted" 2>/dev/null)" = "${GUEST_MODULES[*]}" ] &&
        [ "$(cat "$dir/chroot" 2>/dev/null)" = "$chroot" ]; then
        printf '%s\n' "$dir"
        return 0
    fi
    log "fetching guest kernel linux-image-$abi ($ver)"
    rm -rf "$dir" && mkdir -p "$dir/modules"
    tmp=$(mktemp -d "$TMEM_CACHE/kernel.XXXXXX")
    if [ -n "$chroot" ]; then
        # Newer kernels split the image package: linux-image-<abi> is a
        # metapackage of linux-binary-<abi> (vmlinuz) and linux-modules-<abi>.
        local pkgs=("linux-image-$abi=$ver") p dl=/tmp/tmem-kernel
        for p in linux-binary linux-modules; do
            in_chroot "$chroot" apt-cache show "$p-$abi=$ver" >/dev/null 2>&1 &&
                pkgs+=("$p-$abi=$ver")
        done
        as_root rm -rf "$chroot$dl" && as_root mkdir -p "$chroot$dl"
        in_chroot "$chroot" sh -c "cd $dl && apt-get download -qq ${pkgs[*]}" >/dev/null 2>"$tmp/apt.err" ||
            { cat "$tmp/apt.err" >&2; die "apt-get download ${pkgs[*]} in $chroot failed"; }
        cp "$chroot$dl"/*.deb "$tmp/"
        as_root rm -rf "$chroot$dl"
    else
        # stderr only on failure: as root apt warns that its sandbox user cannot
        # write into the cache directory, which is harmless.
        (cd "$tmp" && apt-get download -qq "linux-image-$abi=$ver" >/dev/null 2>"$tmp/apt.err") ||
            { cat "$tmp/apt.err" >&2; die "apt-get download linux-image-$abi=$ver failed"; }
    fi
    local deb
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/root"; done
    if [ -f "$tmp/root/boot/vmlinuz-$abi" ]; then
        cp "$tmp/root/boot/vmlinuz-$abi" "$dir/vmlinuz"
    else
        cp "$tmp/root/usr/lib/modules/$abi/vmlinuz" "$dir/vmlinuz"
    fi
    local moddir=$tmp/root/lib/modules/$abi
    [ -d "$moddir" ] || moddir=$tmp/root/usr/lib/modules/$abi
    # The package ships no modules.dep (the postinst makes it); make one here.
    depmod -b "${moddir%/lib/modules/*}" "$abi" ||
        die "depmod failed for $abi"
    # Walk modules.dep depth-first so that dependencies come first.
    local -A seen=()
    local order=()
    add_module() {
        local name=$1 path deps d
        path=$(awk -F: -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f) } f == n { print $1; exit }' "$moddir/modules.dep")
        if [ -z "$path" ]; then
            if [ -f "$moddir/modules.builtin" ]; then
                grep -q "/$name.ko" "$moddir/modules.builtin" || die "module $name neither loadable nor built in"
            else
                # Newer packages ship no modules.builtin (it is in another package).
                log "module $name is not loadable in $abi: taken as built in"
            fi
            return 0
        fi
        [ -n "${seen[$path]:-}" ] && return 0
        seen[$path]=1
        deps=$(awk -F: -v p="$path" '$1 == p { print $2; exit }' "$moddir/modules.dep")
        for d in $deps; do
            d=${d##*/}; d=${d%%.ko*}; add_module "${d//-/_}"
        done
        order+=("$path")
    }
    local m p base
    for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
    : >"$dir/modules/modules.order"
    for p in "${order[@]}"; do
        base=${p##*/}
        case $base in
        *.ko.xz) xz -dc "$moddir/$p" >"$dir/modules/${base%.xz}" ;;
        *.ko.zst) zstd -qdc "$moddir/$p" >"$dir/modules/${base%.zst}" ;;
        *.ko.gz) gzip -dc "$moddir/$p" >"$dir/modules/${base%.gz}" ;;
        *) cp "$moddir/$p" "$dir/modules/" ;;
        esac
        printf '%s\n' "${base%.ko*}.ko" >>"$dir/modules/modules.order"
    done
    printf '%s\n' "${GUEST_MODULES[*]}" >"$dir/modules/wanted"
    printf '%s\n' "$kdir" >"$dir/kdir"
    printf '%s\n' "$chroot" >"$dir/chroot"
    printf '%s\n' "$ver" >"$dir/version"
    rm -rf "$tmp"
    log "guest kernel $abi: modules $(tr '\n' ' ' <"$dir/modules/modules.order")"
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------------------
# Builds: the module (W=1, warnings are errors), the test program, the daemon.

GUEST_OUT=${GUEST_OUT:-$TMEM_ROOT/target/guest}

# build_module KDIR OUTDIR [CHROOT]: prints the path of virtio_tmem.ko. With
# CHROOT, KDIR is a path inside that chroot and the build runs there.
build_module() {
    local kdir=$1 out=$2 chroot=${3:-} logf rc=0 build
    rm -rf "$out" && mkdir -p "$out"
    cp "$TMEM_ROOT"/guest-driver/{Kbuild,virtio_tmem.c,virtio_tmem.h,compat.h} "$out/"
    logf=$out/build.log
    if [ -z "$chroot" ]; then
        make -s -C "$kdir" M="$out" W=1 modules >"$logf" 2>&1 || rc=$?
    else
        build=$chroot/build/module
        as_root rm -rf "$build" && as_root mkdir -p "$build"
        as_root cp "$out"/{Kbuild,virtio_tmem.c,virtio_tmem.h,compat.h} "$build/"
        # objtool reads /proc.
        mountpoint -q "$chroot/proc" || as_root mount -t proc proc "$chroot/proc"
        in_chroot "$chroot" make -s -C "$kdir" M=/build/module W=1 modules >"$logf" 2>&1 || rc=$?
        as_root umount "$chroot/proc" || true
        [ $rc = 0 ] && cp "$build/virtio_tmem.ko" "$out/"
    fi
    if [ $rc != 0 ]; then
        cat "$logf" >&2
        die "module build against $kdir${chroot:+ in $chroot} failed"
    fi
    if grep -E 'warning:|error:' "$logf" >&2; then
        die "module build against $kdir has warnings (W=1)"
    fi
    printf '%s\n' "$out/virtio_tmem.ko"
}

# The guest test program, built by the driver's Makefile into GUEST_OUT (the
# source tree holds no binary).
build_swaptest() {
    local out=$GUEST_OUT/swaptest
    mkdir -p "$GUEST_OUT"
    make -s -C "$TMEM_ROOT/guest-driver" SWAPTEST="$out" test >&2 ||
        die "building swaptest failed"
    printf '%s\n' "$out"
}

build_daemon() {
    log "building the daemon and tmemctl (cargo build --release)"
    (cd "$TMEM_ROOT" && cargo build --release --locked --bins -q) >&2 || die "cargo build failed"
    [ -x "$TMEM_ROOT/target/release/vhost-user-tmem" ] || die "no vhost-user-tmem binary"
    [ -x "$TMEM_ROOT/target/release/tmemctl" ] || die "no tmemctl binary"
}

# build_initramfs KERNEL_CACHE_DIR MODULE_KO SWAPTEST OUT: a busybox initramfs
# whose /init loads the virtio modules and virtio_tmem, swaps onto /dev/tmem0,
# runs swaptest, swaps off and powers off.
build_initramfs() {
    local kdir=$1 ko=$2 swaptest=$3 out=$4 root m
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,tmp}
    cp /bin/busybox "$root/bin/busybox"
    cp "$swaptest" "$root/bin/swaptest"
    while read -r m; do
        [ -n "$m" ] && cp "$kdir/modules/$m" "$root/lib/modules/"
    done <"$kdir/modules/modules.order"
    cp "$kdir/modules/modules.order" "$root/lib/modules/order"
    cp "$ko" "$root/lib/modules/virtio_tmem.ko"
    cp "$TMEM_ROOT/ci/guest/init" "$root/init"
    chmod 755 "$root/init" "$root/bin/busybox" "$root/bin/swaptest"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$root"
}

# ---------------------------------------------------------------------------
# Running: the daemon and one guest.

DAEMON_PID=""
QEMU_PID=""

tmemctl() { "${TMEMCTL:-$TMEM_ROOT/target/release/tmemctl}" "$@"; }

# start_daemon RUNDIR [extra daemon args...]: socket RUNDIR/tmem.sock (with
# DAEMON_SOCKET_OPTS after it, e.g. blk=512M), control RUNDIR/control.sock,
# log RUNDIR/daemon.log.
start_daemon() {
    local run=$1 i
    shift
    rm -f "$run/tmem.sock" "$run/control.sock"
    RUST_LOG=${RUST_LOG:-info} "$TMEM_ROOT/target/release/vhost-user-tmem" \
        --socket "$run/tmem.sock${DAEMON_SOCKET_OPTS:+,$DAEMON_SOCKET_OPTS}" \
        --control "$run/control.sock" "$@" \
        >"$run/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for i in $(seq 100); do
        [ -S "$run/tmem.sock" ] && [ -S "$run/control.sock" ] && {
            check_sandboxed "$run" "$@"
            return 0
        }
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$run/daemon.log" >&2
    die "daemon did not come up (log: $run/daemon.log)"
}

# check_sandboxed RUNDIR [daemon args...]: unless given --sandbox off, every
# thread of the daemon is under its seccomp filter ("Seccomp: 2") once
# set-up is over, which follows the sockets' binding by a moment.
check_sandboxed() {
    local run=$1 i status
    shift
    case " $* " in *" --sandbox off "*) return 0 ;; esac
    for i in $(seq 50); do
        status=$(cat /proc/"$DAEMON_PID"/task/*/status 2>/dev/null | grep '^Seccomp:' | sort -u)
        [ "$(printf '%s\n' "$status" | tr -d '[:space:]')" = "Seccomp:2" ] && return 0
        sleep 0.1
    done
    cat "$run/daemon.log" >&2
    die "daemon threads are not all sandboxed (seccomp: $(printf '%s' "$status" | tr '\n' ' '))"
}

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    local rc=0
    wait "$DAEMON_PID" || rc=$?
    DAEMON_PID=""
    return $rc
}

GUEST_MEM=${GUEST_MEM:-256M}
GUEST_CPUS=${GUEST_CPUS:-2}
# Unset: the device's single MSI-X vector, so the guest uses INTx.
# QEMU_VECTORS=3 (queues + 1): MSI-X per queue (our QEMU patch).
QEMU_VECTORS=${QEMU_VECTORS:-}
QEMU_EXTRA_ARGS=()

# start_guest QEMU KERNEL_CACHE_DIR INITRD SOCKET CONSOLE_LOG [init env...]
start_guest() {
    local qemu=$1 kdir=$2 initrd=$3 sock=$4 console=$5
    shift 5
    "$qemu" "${QEMU_FIRMWARE_ARGS[@]}" \
        -machine q35,accel=tcg,memory-backend=mem \
        -cpu max -smp "$GUEST_CPUS" -m "$GUEST_MEM" \
        -object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on" \
        -chardev "socket,id=c0,path=$sock" \
        -device "vhost-user-device-pci,chardev=c0,virtio-id=63,num_vqs=$GUEST_CPUS,config_size=32${QEMU_VECTORS:+,vectors=$QEMU_VECTORS}" \
        -nographic -nic none -vga none -no-reboot "${QEMU_EXTRA_ARGS[@]}" \
        -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 loglevel=4 panic=-1 oops=panic $*" \
        </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

# Debian's own, unpatched QEMU (bookworm-backports has 10.0), for the blk
# device, which every QEMU has: prints the path of its qemu-system-x86_64.
STOCK_QEMU=/usr/bin/qemu-system-x86_64
stock_qemu() {
    local major
    major=$("$STOCK_QEMU" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
    if [ "${major:-0}" -lt 10 ]; then
        ensure_apt_suites
        log "installing Debian's qemu-system-x86 from bookworm-backports"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86 >/dev/null ||
            die "apt-get install qemu-system-x86 failed"
    fi
    printf '%s\n' "$STOCK_QEMU"
}

# build_blk_initramfs KERNEL_CACHE_DIR SWAPTEST OUT: a busybox initramfs whose
# /init (ci/guest/init-blk) loads the stock virtio_blk, swaps onto /dev/vda,
# then makes and checks an ext4 filesystem there (the host's mke2fs and
# e2fsck, with the libraries they link).
build_blk_initramfs() {
    local kdir=$1 swaptest=$2 out=$3 root m bin lib
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,dev,etc,proc,sys,lib/modules,tmp}
    cp /bin/busybox "$root/bin/busybox"
    cp "$swaptest" "$root/bin/swaptest"
    for bin in mke2fs e2fsck; do
        cp "$(command -v "$bin" || echo "/sbin/$bin")" "$root/sbin/$bin" || die "no $bin on the host (e2fsprogs)"
        for lib in $(ldd "$root/sbin/$bin" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
    while read -r m; do
        [ -n "$m" ] && cp "$kdir/modules/$m" "$root/lib/modules/"
    done <"$kdir/modules/modules.order"
    cp "$kdir/modules/modules.order" "$root/lib/modules/order"
    cp "$TMEM_ROOT/ci/guest/init-blk" "$root/init"
    chmod 755 "$root/init" "$root/bin/busybox" "$root/bin/swaptest"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$root"
}

# start_blk_guest QEMU KERNEL_CACHE_DIR INITRD SOCKET CONSOLE_LOG [init env...]:
# the daemon's disk as a stock vhost-user-blk-pci device, one queue per vCPU.
start_blk_guest() {
    local qemu=$1 kdir=$2 initrd=$3 sock=$4 console=$5
    shift 5
    "$qemu" -machine q35,accel=tcg,memory-backend=mem \
        -cpu max -smp "$GUEST_CPUS" -m "$GUEST_MEM" \
        -object "memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on" \
        -chardev "socket,id=c0,path=$sock" \
        -device "vhost-user-blk-pci,chardev=c0,num-queues=$GUEST_CPUS" \
        -nographic -nic none -vga none -no-reboot \
        -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 loglevel=4 panic=-1 oops=panic $*" \
        </dev/null >"$console" 2>&1 &
    QEMU_PID=$!
}

stop_guest() {
    [ -n "$QEMU_PID" ] || return 0
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
}

# wait_console LOG PATTERN TIMEOUT_S: 0 once PATTERN shows up, 1 on timeout
# or when QEMU has exited without it.
wait_console() {
    local logf=$1 pat=$2 t=$3 end=$((SECONDS + $3))
    while [ $SECONDS -lt $end ]; do
        grep -q -- "$pat" "$logf" 2>/dev/null && return 0
        if [ -n "$QEMU_PID" ] && ! kill -0 "$QEMU_PID" 2>/dev/null; then
            grep -q -- "$pat" "$logf" 2>/dev/null && return 0
            return 1
        fi
        sleep 0.5
    done
    return 1
}

# Everything the guest side needs for one kernel suite; sets KERNEL_DIR,
# MODULE_KO and INITRD.
prepare_guest() {
    local suite=$1 abi
    KERNEL_DIR=$(fetch_guest_kernel "$suite")
    abi=$(basename "$KERNEL_DIR")
    MODULE_KO=$(build_module "$(cat "$KERNEL_DIR/kdir")" "$GUEST_OUT/$abi/module" \
        "$(cat "$KERNEL_DIR/chroot" 2>/dev/null)")
    INITRD=$GUEST_OUT/$abi/initramfs.cpio.gz
    build_initramfs "$KERNEL_DIR" "$MODULE_KO" "$(build_swaptest)" "$INITRD"
    log "guest $abi ready: $INITRD"
}

# stats_json RUNDIR: one line, the `stats` object of the control socket.
stats_json() { tmemctl --control "$1/control.sock" stats --json; }
