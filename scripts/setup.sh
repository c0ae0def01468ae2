#!/usr/bin/env bash
# Installs every system package Tegmen's build, demo and tests need.
# Idempotent: packages already present are not touched, and `apt-get update`
# runs once, only when something is missing.
set -euo pipefail

packages=(
    # the VMM that runs real guests on hosts without hardware virtualization
    qemu-system-x86
    # guest kernel: Debian's source and what building it takes
    linux-source-6.12 make gcc bc bison flex libelf-dev libssl-dev perl xz-utils binutils
    # the static agent (libcontainer's seccomp support links libseccomp.a;
    # its eBPF device rules build libbpf, which needs libelf and zlib)
    libseccomp-dev pkg-config zlib1g-dev
    # test images are built offline from busybox
    busybox-static
    # the real clients the end-to-end tests drive tegmen with (and runc, the
    # reference the benchmarks compare against); `script` (bsdutils) gives
    # them a terminal
    runc containerd podman conmon bsdutils
    # docker 20.10 (dockerd is started by its tests, with its own roots)
    docker.io
    # containerd's CRI plugin runs CNI's loopback plugin for each pod; the
    # tests' CRI client (k8s-cri) is generated with protoc at build time
    containernetworking-plugins protobuf-compiler
    # taps, addresses and links in the network namespaces the tests make
    iproute2
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages: ${missing[*]}; run this script as root" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # docker.io's and containerd's postinst would start their daemons with
    # the system's configuration; the tests start their own. A policy-rc.d
    # that says "not now" (101) stops that, unless the machine has one.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/tegmen-apt.log 2>&1; then
        # linux-source-6.12 is not in every Debian release: fall back to 6.1.
        if printf '%s\n' "${missing[@]}" | grep -qx linux-source-6.12; then
            missing=("${missing[@]/linux-source-6.12/linux-source-6.1}")
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/tegmen-apt.log 2>&1 || {
                tail -20 /tmp/tegmen-apt.log >&2; echo "setup: apt-get install failed" >&2; exit 1; }
        else
            tail -20 /tmp/tegmen-apt.log >&2; echo "setup: apt-get install failed" >&2; exit 1
        fi
    fi
fi
echo "setup: system packages present"
