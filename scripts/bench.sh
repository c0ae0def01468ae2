#!/usr/bin/env bash
# `make bench`: measures Tegmen and writes docs/benchmarks.md.
# Installs the reference backends (virtiofsd, vhost-device-vsock) with
# `cargo install` into build/bench-tools: they are benchmark anchors, not
# part of the product.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tools="$repo/build/bench-tools"
mkdir -p "$tools"

# `--only-l1` measures only the nested-L1 section, which needs no reference
# backends (its reference is QEMU with KVM inside L1).
if [ "${1:-}" != --only-l1 ]; then
    # References only the benchmark needs: runc, and what virtiofsd builds with.
    need=()
    for p in runc libcap-ng-dev libseccomp-dev; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    [ -x "$tools/bin/virtiofsd" ] || cargo install --quiet --root "$tools" --locked virtiofsd@1.14.0 || cargo install --quiet --root "$tools" virtiofsd
    [ -x "$tools/bin/vhost-device-vsock" ] || cargo install --quiet --root "$tools" --locked vhost-device-vsock@0.3.0 || cargo install --quiet --root "$tools" vhost-device-vsock
fi

( cd "$repo" && cargo build --quiet --release -p tegmen-vmm -p tegmen-agent -p tegmen-supervisor -p tegmen-tests --bins )
gcc -O2 -static -o "$tools/trivial-init" "$repo/scripts/bench/trivial_init.c"
exec python3 "$repo/scripts/bench/bench.py" --repo "$repo" --tools "$tools" "$@"
