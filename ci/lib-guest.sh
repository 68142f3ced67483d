#!/usr/bin/env bash
# Shared shell functions for the guest side: extra apt suites, the patched QEMU
# build, Debian guest kernels, the virtio_tmem module, the initramfs and one
# guest boot. Sourced by ci/e2e.sh and ci/demo.sh; nothing runs on sourcing.
# shellcheck disable=SC2034

TMEM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMEM_CACHE=${TMEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-tmem}
QEMU_SUITE=trixie
# Debian guest kernels: "<label> <suite> <apt version glob of linux-image-amd64>"
GUEST_KERNEL_SUITES=(
    "6.12 bookworm-backports"
    "6.1 bookworm"
)

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
# Debian guest kernels: the image (vmlinuz + the virtio modules it needs) is
# downloaded and unpacked into the cache; the matching headers are installed
# with apt, so that Debian's kbuild symlinks resolve.

GUEST_MODULES=(virtio_pci)

# Prints "<abi> <version>" of the newest linux-image-amd64 in a suite.
guest_kernel_abi() {
    local suite=$1 ver pkg
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
    local suite=$1 abi ver dir tmp kdir
    ensure_apt_suites
    read -r abi ver < <(guest_kernel_abi "$suite")
    dir=$TMEM_CACHE/kernels/$abi
    kdir=/usr/src/linux-headers-$abi
    if [ ! -f "$kdir/Makefile" ]; then
        log "installing headers linux-headers-$abi ($ver)"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            "linux-headers-$abi=$ver" >/dev/null ||
            die "apt-get install linux-headers-$abi=$ver failed"
    fi
    if [ -f "$dir/modules/modules.order" ] && [ -f "$dir/vmlinuz" ]; then
        printf '%s\n' "$dir"
        return 0
    fi
    log "fetching guest kernel linux-image-$abi ($ver)"
    rm -rf "$dir" && mkdir -p "$dir/modules"
    tmp=$(mktemp -d "$TMEM_CACHE/kernel.XXXXXX")
    (cd "$tmp" && apt-get download -qq "linux-image-$abi=$ver" >/dev/null) ||
        die "apt-get download linux-image-$abi=$ver failed"
    dpkg -x "$tmp"/linux-image-*.deb "$tmp/root"
    cp "$tmp/root/boot/vmlinuz-$abi" "$dir/vmlinuz"
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
            grep -q "/$name.ko" "$moddir/modules.builtin" || die "module $name neither loadable nor built in"
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
    printf '%s\n' "$kdir" >"$dir/kdir"
    printf '%s\n' "$ver" >"$dir/version"
    rm -rf "$tmp"
    log "guest kernel $abi: modules $(tr '\n' ' ' <"$dir/modules/modules.order")"
    printf '%s\n' "$dir"
}
