#!/usr/bin/env bash
# Builds the Tegmen guest image: an uncompressed ELF `vmlinux` from Debian's
# linux-source package and an initramfs whose /init is the static agent.
#
#   guest-image/build.sh [kernel|initramfs|all]     (default: all)
#
# Outputs go to $TEGMEN_GUEST_DIR (default: <repo>/build/guest):
#   vmlinux, initramfs.cpio.gz   (symlinks to the cached builds)
# Each artefact is cached under a hash of its inputs, so a second run with
# nothing changed only re-checks the hashes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${TEGMEN_GUEST_DIR:-$repo/build/guest}
what=${1:-all}
mkdir -p "$out"

die() { echo "guest-image: error: $*" >&2; exit 1; }
need_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found (Debian package '$pkg'); run scripts/setup.sh"
}
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

kernel_tarball() {
    local t
    for t in /usr/src/linux-source-6.12.tar.xz /usr/src/linux-source-6.1.tar.xz; do
        [ -f "$t" ] && { echo "$t"; return; }
    done
    die "no kernel source: /usr/src/linux-source-6.12.tar.xz (package linux-source-6.12) or /usr/src/linux-source-6.1.tar.xz (linux-source-6.1) is missing; run scripts/setup.sh"
}

build_kernel() {
    for c in make:make gcc:gcc flex:flex bison:bison bc:bc xz:xz-utils perl:perl; do
        need_cmd "${c%%:*}" "${c#*:}"
    done
    [ -f /usr/include/libelf.h ] || die "libelf.h missing (Debian package 'libelf-dev'); run scripts/setup.sh"
    local tarball; tarball=$(kernel_tarball)
    local h; h=$( { echo "$(basename "$tarball") $(stat -c %s "$tarball")"; cat "$here/kernel.fragment" "$here/required.config"; sed -n '/^build_kernel()/,/^}/p' "$0"; } | sha256sum | cut -c1-16)
    local dest="$out/kernel-$h"
    if [ -f "$dest/vmlinux" ]; then
        ln -sfn "kernel-$h/vmlinux" "$out/vmlinux"
        echo "guest-image: kernel up to date ($dest/vmlinux)"
        return
    fi
    local name; name=$(basename "$tarball" .tar.xz)
    local src="$out/src/$name"
    if [ ! -f "$src/.extracted" ]; then
        echo "guest-image: extracting $tarball"
        rm -rf "$src"; mkdir -p "$out/src"
        tar -C "$out/src" -xf "$tarball"
        touch "$src/.extracted"
    fi
    local kb="$out/kbuild-$h"
    mkdir -p "$kb"
    echo "guest-image: configuring kernel in $kb"
    make -s -C "$src" O="$kb" tinyconfig >/dev/null
    (cd "$kb" && "$src/scripts/kconfig/merge_config.sh" -m -O "$kb" "$kb/.config" "$here/kernel.fragment" >/dev/null)
    make -s -C "$src" O="$kb" olddefconfig >/dev/null
    local missing=""
    while read -r line; do
        case "$line" in ''|'#'*) continue;; esac
        grep -qx "$line" "$kb/.config" || missing="$missing ${line%%=*}"
    done < "$here/required.config"
    [ -z "$missing" ] || die "kernel config lost required options after olddefconfig:$missing"
    echo "guest-image: building vmlinux (a few minutes)"
    make -s -C "$src" O="$kb" -j"$(nproc)" vmlinux
    mkdir -p "$dest"
    cp "$kb/vmlinux" "$dest/vmlinux.tmp"
    cp "$kb/.config" "$dest/config"
    mv "$dest/vmlinux.tmp" "$dest/vmlinux"
    rm -rf "$kb"
    ln -sfn "kernel-$h/vmlinux" "$out/vmlinux"
    echo "guest-image: kernel built ($dest/vmlinux)"
}

build_initramfs() {
    need_cmd cargo "rustup toolchain"
    need_cmd gzip gzip
    need_cmd readelf binutils
    local triple=x86_64-unknown-linux-gnu
    echo "guest-image: building the static agent"
    # The agent is PID 1 in a VM with no libraries: glibc statically linked,
    # libseccomp linked from Debian's static archive; libbpf (device cgroup
    # rules) built from source by libbpf-sys and linked statically.
    ( cd "$repo" && \
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
      LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
      cargo build --quiet --profile guest -p tegmen-agent --features devices-cgroup --target "$triple" )
    local agent="$repo/target/$triple/guest/tegmen-agent"
    [ -x "$agent" ] || die "agent binary missing after build: $agent"
    if readelf -l "$agent" | grep -q INTERP; then
        die "agent is dynamically linked ($agent); it must be static to run as /init"
    fi
    local tarball; tarball=$(kernel_tarball)
    local name; name=$(basename "$tarball" .tar.xz)
    local gen="$out/gen_init_cpio"
    if [ ! -x "$gen" ]; then
        local src="$out/src/$name"
        [ -f "$src/usr/gen_init_cpio.c" ] || { mkdir -p "$out/src"; tar -C "$out/src" -xf "$tarball" "$name/usr/gen_init_cpio.c"; }
        gcc -O2 -o "$gen" "$src/usr/gen_init_cpio.c"
    fi
    local list="$out/initramfs.list"
    cat > "$list.tmp" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0555 0 0
dir /sys 0555 0 0
dir /run 0755 0 0
dir /tmp 1777 0 0
dir /etc 0755 0 0
file /init $agent 0755 0 0
LIST
    # The debug console's tools (`supervisor exec`): a static busybox and
    # its applets as links, moved to the guest's root with /init.
    local busybox=/bin/busybox
    [ -x "$busybox" ] && ! readelf -l "$busybox" | grep -q INTERP \
        || die "a static $busybox is needed for the guest's debug tools (Debian package 'busybox-static'); run scripts/setup.sh"
    {
        echo "dir /bin 0755 0 0"
        echo "file /bin/busybox $busybox 0755 0 0"
        "$busybox" --list | grep -vx busybox | sort -u | sed 's|.*|slink /bin/& busybox 0777 0 0|'
    } >> "$list.tmp"
    local h; h=$(hash_of "$list.tmp" "$agent" "$busybox")
    local dest="$out/initramfs-$h.cpio.gz"
    if [ ! -f "$dest" ]; then
        "$gen" "$list.tmp" | gzip -n -6 > "$dest.tmp"
        mv "$dest.tmp" "$dest"
        # keep only the newest few builds
        ls -1t "$out"/initramfs-*.cpio.gz 2>/dev/null | tail -n +4 | xargs -r rm -f
    fi
    mv "$list.tmp" "$list"
    ln -sfn "$(basename "$dest")" "$out/initramfs.cpio.gz"
    echo "guest-image: initramfs ready ($dest)"
}

case "$what" in
    kernel) build_kernel ;;
    initramfs) build_initramfs ;;
    all) build_kernel; build_initramfs ;;
    *) die "unknown target '$what' (kernel|initramfs|all)" ;;
esac
