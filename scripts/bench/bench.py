#!/usr/bin/env python3
"""Tegmen's benchmarks (run by `make bench` through scripts/bench.sh).

Measures, in one run on this machine, each number side by side with its
reference:
  * boot to agent ready of a Tegmen sandbox (`supervisor check --boot`)
    next to plain QEMU booting the same kernel to a trivial /init;
  * host memory (RSS) of Tegmen's vsock and fs vhost-user backends next to
    vhost-device-vsock and virtiofsd serving the same guest;
  * and the rest listed in docs/benchmarks.md, pod networking among them
    (scripts/bench/net.py: Tegmen's virtio-net next to QEMU's and runc).
Writes docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

import net

RUNS = 5
# Guests per variant, and MiB moved per workload, of the allow-list section.
CONFINEMENT_RUNS = 5
CONFINEMENT_MIB = 128
# 2-vCPU boots in L1 with 2 L1 vCPUs, for their failure rate.
L1_SMP_BOOTS = 40


def cpio_newc(entries):
    """entries: (name, mode, body, (major, minor)) -> newc archive bytes."""
    out = bytearray()
    ino = 1
    for name, mode, body, rdev in entries + [("TRAILER!!!", 0, b"", (0, 0))]:
        hdr = "070701" + "".join("%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0))
        ino += 1
        out += hdr.encode() + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4)
        out += body
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def qemu_cmd(kernel, initrd, console, devices, mem=256, smp=1):
    """The flags of supervisor/src/hypervisor/qemu.rs (TCG here)."""
    accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if has_hw_virt():
        accel = ["-accel", "kvm", "-cpu", "host"]
    return ["qemu-system-x86_64",
            "-M", "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            *accel, "-m", f"{mem}M", "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            *devices,
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 reboot=t panic=-1 quiet", "-no-reboot"]


def has_hw_virt():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and re.search(r"\b(vmx|svm)\b", line):
                return True
    return False


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


def hybrid_connect(path, port, timeout=2.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                return False
            line += b
        return line.startswith(b"OK ")
    except OSError:
        return False
    finally:
        s.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def bench_tegmen_boot(repo, root):
    sup = os.path.join(repo, "target/debug/supervisor")
    times = []
    for _ in range(RUNS):
        out = subprocess.run([sup, "--root", root, "check", "--boot"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError("supervisor check --boot failed:\n" + out.stdout + out.stderr)
        m = re.search(r"boot to agent ready: ([0-9.]+) s", out.stdout)
        times.append(float(m.group(1)))
    return times


def bench_plain_boot(kernel, tools, work):
    init = open(os.path.join(tools, "trivial-init"), "rb").read()
    initrd = os.path.join(work, "trivial.cpio")
    with open(initrd, "wb") as f:
        f.write(cpio_newc([("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)),
                           ("init", 0o100755, init, (0, 0))]))
    times = []
    for i in range(RUNS):
        console = os.path.join(work, f"plain-{i}.log")
        open(console, "w").close()
        start = time.monotonic()
        p = subprocess.Popen(qemu_cmd(kernel, initrd, console, []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: b"TRIVIAL-INIT-READY" in open(console, "rb").read(), 120, "the trivial init")
            times.append(time.monotonic() - start)
        finally:
            stop([p])
    return times


def boot_with_backends(kind, repo, tools, kernel, initrd, d, seccomp="kill", cache=None):
    """Boots our agent with one pair of backends, `tegmen` (our release
    builds, `seccomp` their allow-lists' mode) or `reference`
    (vhost-device-vsock and virtiofsd, `cache` its cache policy), in the
    fresh directory `d`. Returns (processes, hybrid vsock socket, shared
    directory, seconds from QEMU's start to the agent's answer); the caller
    stops the processes."""
    shutil.rmtree(d, ignore_errors=True)
    shared = os.path.join(d, "shared")
    os.makedirs(shared)
    with open(os.path.join(shared, "sandbox-id"), "w") as f:
        f.write(kind)
    vs_sock, fs_sock, uds = (os.path.join(d, n) for n in ("vhost-vsock.sock", "vhost-fs.sock", "vsock"))
    if kind == "tegmen":
        bins = os.path.join(repo, "target/release")
        vsock_cmd = [os.path.join(bins, "tegmen-vsock-backend"), "--socket", vs_sock, "--uds-path", uds,
                     "--seccomp", seccomp]
        fs_cmd = [os.path.join(bins, "tegmen-fs-backend"), "--socket", fs_sock, "--shared-dir", shared,
                  "--seccomp", seccomp]
    else:
        vsock_cmd = [os.path.join(tools, "bin/vhost-device-vsock"), "--vm", f"guest-cid=3,socket={vs_sock},uds-path={uds}"]
        fs_cmd = [os.path.join(tools, "bin/virtiofsd"), f"--socket-path={fs_sock}", f"--shared-dir={shared}"]
        if cache:
            fs_cmd.append(f"--cache={cache}")
    log = open(os.path.join(d, "backends.log"), "w")
    procs = [subprocess.Popen(vsock_cmd, stdout=log, stderr=log), subprocess.Popen(fs_cmd, stdout=log, stderr=log)]
    try:
        wait_for(lambda: os.path.exists(vs_sock) and os.path.exists(fs_sock), 20, f"{kind} backend sockets")
        devices = ["-chardev", f"socket,id=vsock,path={vs_sock}", "-device", "vhost-user-vsock-device,chardev=vsock",
                   "-chardev", f"socket,id=fs,path={fs_sock}", "-device", "vhost-user-fs-device,chardev=fs,tag=tegmen"]
        console = os.path.join(d, "console.log")
        start = time.monotonic()
        procs.append(subprocess.Popen(qemu_cmd(kernel, initrd, console, devices), stdout=log, stderr=log))
        wait_for(lambda: hybrid_connect(uds, 1024), 180, f"the agent behind {kind} backends")
        return procs, uds, shared, time.monotonic() - start
    except BaseException:
        stop(list(reversed(procs)))
        raise


def backend_memory(kind, repo, tools, kernel, initrd, work):
    """Boots our agent with one pair of backends; RSS of each once ready."""
    procs, _, _, _ = boot_with_backends(kind, repo, tools, kernel, initrd, os.path.join(work, kind), cache="never")
    try:
        time.sleep(1.0)
        return rss_kib(procs[0].pid), rss_kib(procs[1].pid)
    finally:
        stop(list(reversed(procs)))


CONFINEMENT_HEADING = "## The backends under their allow-lists"
# (label, kind, seccomp): ours with the filters in force and switched off,
# and the references serving the same guest.
CONFINEMENT_VARIANTS = [
    ("Tegmen, filters on (`seccomp = \"kill\"`)", "tegmen", "kill"),
    ("Tegmen, filters off", "tegmen", "off"),
    ("reference: virtiofsd 1.14 + vhost-device-vsock 0.3", "reference", None),
]


def confinement_section(repo, tools, kernel, initrd, work, runs, mib):
    """fs and vsock throughput and boot to agent with our backends under
    their allow-lists, without them, and with the references, each guest
    booted the same way (bench.py's QEMU flags, the guest image's agent);
    the variants take turns, so that drift hits all alike."""
    got = {label: {"boot": [], "write": [], "read": [], "walk": [], "vsock": [], "stalls": [], "failures": []}
           for label, _, _ in CONFINEMENT_VARIANTS}
    for i in range(runs):
        for label, kind, seccomp in CONFINEMENT_VARIANTS:
            d = os.path.join(work, f"confinement-{kind}-{seccomp}")
            procs, uds, shared, boot = boot_with_backends(kind, repo, tools, kernel, initrd, d, seccomp=seccomp or "kill")
            try:
                r = tegmen_bench(repo, "workloads", uds, shared, str(mib))
            finally:
                stop(list(reversed(procs)))
            g = got[label]
            g["boot"].append(boot)
            for k, key in (("write", "write_mib_s"), ("read", "read_mib_s"), ("walk", "walk_s")):
                if isinstance(r[key], dict):
                    g["failures"].append(f"{k}: {r[key]['failed']}")
                else:
                    g[k].append(r[key])
            if isinstance(r["vsock_mib_s"], dict):
                # A stream that stopped moving (tegmen-bench's STALL).
                g["stalls"].append((r["vsock_mib_s"]["stalled_after_bytes"], r["vsock_mib_s"]["stall_s"]))
            else:
                g["vsock"].append(r["vsock_mib_s"])
    med = lambda label, k: statistics.median(got[label][k]) if got[label][k] else None
    on, off, ref = (label for label, _, _ in CONFINEMENT_VARIANTS)
    rows = [
        ("boot to agent ready (s)", "boot", "{:.2f}"),
        (f"fs sequential write, {mib} MiB + fsync (MiB/s)", "write", "{:.1f}"),
        (f"fs sequential read, {mib} MiB, cold in the guest (MiB/s)", "read", "{:.1f}"),
        ("fs metadata walk, `ls -lR` of 2000 files in 20 directories (s)", "walk", "{:.2f}"),
        (f"vsock, a container's stdout to the host, {mib} MiB (MiB/s)", "vsock", "{:.1f}"),
    ]
    accel = "KVM" if has_hw_virt() else "TCG"
    lines = [
        CONFINEMENT_HEADING,
        "",
        f"`make bench` (alone: `scripts/bench.sh --only-confinement`), {runs} guests per variant, taking turns;",
        f"medians. Each guest is QEMU ({accel}) with the",
        "guest image's agent and one pair of vhost-user backends: ours (release builds) with their",
        "syscall allow-lists in force and switched off (`--seccomp off`; the namespaces, jail and",
        "capability drops stay), and the references. The fs numbers are timed by the guest's own",
        "clock inside a container (`dd`, `ls -lR`, `tegmen-bench workloads`; /proc/uptime, 10 ms steps);",
        "cache policy `auto` on both fs backends. The vsock rate is the host's, first byte to the end.",
        "A ratio above 1 is better for rates (MiB/s), below 1 for times (s).",
        "",
        "| what | filters on | filters off | reference | on / off | on / reference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cell = lambda x, f: "none" if x is None else f.format(x)
    ratio = lambda x, y: "n/a" if x is None or y is None else f"{x / y:.2f}×"
    for what, k, f in rows:
        a, b, c = med(on, k), med(off, k), med(ref, k)
        lines.append(f"| {what} | {cell(a, f)} | {cell(b, f)} | {cell(c, f)} | {ratio(a, b)} | {ratio(a, c)} |")
    lines.append("")
    for label, _, _ in CONFINEMENT_VARIANTS:
        stalls = got[label]["stalls"]
        if stalls:
            lines.append(f"- {label}: the vsock stream stopped moving (no byte for {stalls[0][1]} s) in {len(stalls)} "
                         f"of {runs} guests, after {', '.join(f'{b / 2**20:.1f}' for b, _ in stalls)} MiB; its rate "
                         "is over the others, or \"none\" if none moved it all.")
        for failure in got[label]["failures"]:
            lines.append(f"- {label}: a workload failed ({failure}); the medians are over the others.")
    lines.append("")
    return lines


def bench_runc_true(work):
    """`runc run` of /bin/true in a busybox bundle: the reference."""
    bundle = os.path.join(work, "runc-bundle")
    busybox_bundle(bundle, ["/bin/true"])
    root = os.path.join(work, "runc-root")
    times = []
    for i in range(RUNS * 2):
        start = time.monotonic()
        subprocess.run(["runc", "--root", root, "run", "-b", bundle, f"true-{i}"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.monotonic() - start)
    return times


def busybox_bundle(bundle, args):
    """A busybox bundle whose config.json is `runc spec` running `args`."""
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"))
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    for applet in ("true", "sleep", "sh"):
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["process"]["args"] = args
    spec["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)


def memory_kib(pid):
    """(RSS, PSS) in KiB of one process."""
    rss = rss_kib(pid)
    pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


PHASES = [
    ("vm-setup", "host: share and mounts, device backends and QEMU started"),
    ("guest-boot", "guest kernel boot to the agent's first answer"),
    ("container-create", "container created in the guest (CreateContainer)"),
    ("monitor", "host monitor started, streams open, pid file"),
    ("start", "start (StartContainer)"),
    ("exit", "process runs and exits, the monitor sees it"),
    ("teardown", "delete: VM, backends, mounts, directories"),
]


def bench_tegmen_run(repo, work):
    """`tegmen run` of /bin/true (create → start → exit → delete): total
    times, and per phase the times tegmen logs with --debug."""
    tegmen = os.path.join(repo, "target/release/tegmen")
    bundle = os.path.join(work, "tegmen-true")
    busybox_bundle(bundle, ["/bin/true"])
    root = os.path.join(work, "tegmen-root")
    times = []
    phases = {name: [] for name, _ in PHASES}
    for i in range(RUNS):
        log = os.path.join(work, f"run-{i}.log")
        start = time.monotonic()
        subprocess.run([tegmen, "--root", root, "--debug", "--log", log, "--log-format", "json",
                        "run", "-b", bundle, f"true-{i}"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.monotonic() - start)
        with open(log) as f:
            for line in f:
                msg = json.loads(line).get("msg", "")
                if msg.startswith("phase "):
                    name, ms = msg[len("phase "):].split(": ")
                    phases.setdefault(name, []).append(float(ms.split()[0]) / 1000)
    return times, phases


def idle_memory(repo, work):
    """Host memory of one idle container (`sleep`): every host process of a
    Tegmen sandbox (QEMU, both backends, the monitor) next to runc's."""
    tegmen = os.path.join(repo, "target/release/tegmen")
    bundle = os.path.join(work, "idle")
    busybox_bundle(bundle, ["sleep", "100000"])
    out = {}
    for name, cmd, root in (("tegmen", tegmen, os.path.join(work, "idle-tegmen")),
                            ("runc", "runc", os.path.join(work, "idle-runc"))):
        pid_file = os.path.join(work, f"{name}.pid")
        subprocess.run([cmd, "--root", root, "create", "-b", bundle, "--pid-file", pid_file, "idle"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            subprocess.run([cmd, "--root", root, "start", "idle"], check=True)
            time.sleep(2.0)
            pids = [int(open(pid_file).read())]
            if name == "tegmen":
                with open(os.path.join(root, "sandboxes/idle/state.json")) as f:
                    pids += [p["pid"] for p in json.load(f)["processes"]]
            mem = [memory_kib(p) for p in pids]
            out[name] = (sum(m[0] for m in mem), sum(m[1] for m in mem), len(pids))
        finally:
            subprocess.run([cmd, "--root", root, "delete", "--force", "idle"], check=False)
    return out


TINY_GUEST = """
    .code32
    .section .text
    .globl _start
_start:
{body}
1:  hlt
    jmp 1b
    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18
    .asciz "Xen"
    .long _start
"""
# Prints a line, writes the boot mark (port 0x440), resets through the i8042.
BOOT_BODY = """
    mov $0x3f8, %dx
    mov $'h', %al
    out %al, %dx
    mov $0x440, %dx
    mov $1, %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
"""
SPIN_BODY = "2:  jmp 2b"


def tiny_guest(work, name, body):
    """A PVH ELF of a few instructions, booted like a kernel by both monitors."""
    src, obj, elf = (os.path.join(work, f"{name}.{ext}") for ext in ("S", "o", "elf"))
    with open(src, "w") as f:
        f.write(TINY_GUEST.format(body=body))
    subprocess.run(["as", "--64", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext-segment=0x100000", "-e", "_start", "-o", elf, obj], check=True)
    return elf


def qemu_tiny_cmd(elf, accel):
    # isa-debug-exit on the boot mark port: QEMU ends when the guest marks its boot.
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-m", "32M",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "null",
            "-kernel", elf, "-no-reboot", "-device", "isa-debug-exit,iobase=0x440,iosize=1", "-accel", accel]


def bench_builtin_tiny(repo, work):
    """The builtin monitor against QEMU microvm on the same tiny guest:
    process start to the boot mark (wall clock), and the monitor's own
    first guest entry and boot mark."""
    vmm = os.path.join(repo, "target/release/tegmen-vmm")
    elf = tiny_guest(work, "boot", BOOT_BODY)
    ours, first, mark = [], [], []
    for _ in range(RUNS * 2):
        start = time.monotonic()
        out = subprocess.run([vmm, "--kernel", elf, "--memory-mib", "32"], capture_output=True, text=True, check=True)
        ours.append(time.monotonic() - start)
        v = json.loads(out.stdout.strip().splitlines()[-1])
        first.append(v["first_entry_ms"] / 1000)
        mark.append(v["boot_mark_ms"] / 1000)
    accel = "kvm" if has_hw_virt() else "tcg"
    qemu = []
    for _ in range(RUNS * 2):
        start = time.monotonic()
        rc = subprocess.run(qemu_tiny_cmd(elf, accel), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).returncode
        qemu.append(time.monotonic() - start)
        if rc != 3:
            raise RuntimeError(f"QEMU did not end at the boot mark (exit {rc})")
    return ours, first, mark, qemu, accel


def non_guest_rss_kib(pid, guest_ram_marker):
    """RSS of every mapping of `pid` but the guest RAM's (KiB)."""
    total, skip = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                skip = guest_ram_marker in line
            elif fields and fields[0] == "Rss:" and not skip:
                total += int(fields[1])
    return total


def builtin_memory(repo, work):
    """Host memory of the monitor process beyond guest RAM, with a tiny
    guest spinning: tegmen-vmm next to QEMU microvm."""
    vmm = os.path.join(repo, "target/release/tegmen-vmm")
    elf = tiny_guest(work, "spin", SPIN_BODY)
    accel = "kvm" if has_hw_virt() else "tcg"
    out = {}
    for name, cmd, marker in (
        ("tegmen-vmm", [vmm, "--kernel", elf, "--memory-mib", "32", "--timeout-secs", "30"], "memfd:tegmen-guest-ram"),
        ("qemu", qemu_tiny_cmd(elf, accel)[:-4] + ["-object", "memory-backend-memfd,id=ram,size=32M",
                                                  "-M", "microvm,memory-backend=ram", "-accel", accel], "memfd:ram"),
    ):
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            out[name] = (non_guest_rss_kib(p.pid, marker), rss_kib(p.pid))
        finally:
            p.kill()
            p.wait()
    return out


def tegmen_bench(repo, *args):
    out = subprocess.run([os.path.join(repo, "target/release/tegmen-bench"), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tegmen-bench {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_ms(xs):
    return f"{statistics.median(xs) * 1000:.1f} ms (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f}, n={len(xs)})"


def fmt(xs):
    return f"{statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


L1_HEADING = "## Inside a nested L1: the builtin monitor next to QEMU with KVM"


def l1_section(repo, runs, smp_boots):
    """The real guest image on both backends of the same KVM, inside an L1
    booted under this host's QEMU TCG (emulated SVM): `tegmen-bench l1`."""
    r = tegmen_bench(repo, "l1", str(runs), str(smp_boots))
    by = {x["hypervisor"]: x for x in r["single"]}
    b, q = by["builtin"], by["qemu"]
    ratio = lambda key: statistics.median(b[key]) / statistics.median(q[key])
    lines = [
        L1_HEADING,
        "",
        f"`tegmen-bench l1 {runs} {smp_boots}` (release build; part of `make bench`, alone with",
        "`scripts/bench.sh --only-l1`): one L1 (1 vCPU, `kvm_amd.vgif=0`) runs both backends,",
        "same kernel, same guest image, 256 MiB and 1 vCPU per guest. An exit costs ~36 µs in L1",
        "(~1 µs on hardware), so the absolute times are not hardware figures; the ratios count.",
        "",
        "| what | builtin (`tegmen-vmm`) | QEMU microvm + vhost-user backends, `-accel kvm` | ratio |",
        "| --- | --- | --- | --- |",
        f"| boot to agent ready (`Sandbox::create`) | {fmt(b['boot_seconds'])} | {fmt(q['boot_seconds'])} | {ratio('boot_seconds'):.2f}× |",
        f"| `tegmen run` of `echo hello` (create → start → exit → delete) | {fmt(b['tegmen_run_seconds'])} | "
        f"{fmt(q['tegmen_run_seconds'])} | {ratio('tegmen_run_seconds'):.2f}× |",
        f"| host RSS of the VM's processes beyond guest RAM (RssAnon + RssFile) | {b['rss_beyond_guest_kib']} KiB | "
        f"{q['rss_beyond_guest_kib']} KiB | {b['rss_beyond_guest_kib'] / q['rss_beyond_guest_kib']:.2f}× |",
        f"| host RSS of the VM's processes in all | {b['rss_kib']} KiB | {q['rss_kib']} KiB | {b['rss_kib'] / q['rss_kib']:.2f}× |",
        "",
        "2-vCPU guests with 2 L1 vCPUs (the suite uses 1 L1 vCPU because of this): boots that",
        "did not reach the agent, measured, not hidden.",
        "",
        "| backend | failed boots | first failure |",
        "| --- | --- | --- |",
        *[f"| {x['hypervisor']} | {x['failed']} of {x['boots']} ({100 * x['failed'] / x['boots']:.0f} %) | "
          f"{(x['first_failure'] or '-').replace('|', '/')} |" for x in r["smp"]],
        "",
    ]
    return lines


# Written by `make fuzz` (scripts/fuzz.sh), kept as it is by a full run.
FUZZ_HEADING = "## Fuzzing (`make fuzz`)"


def section_lines(path, heading):
    """The section `heading` of the markdown file at `path` (up to the next
    `## `), or nothing."""
    text = open(path).read().split("\n") if os.path.exists(path) else []
    if heading not in text:
        return []
    start = text.index(heading)
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    return text[start:end]


def replace_section(path, heading, lines):
    """Replaces the section `heading` of the markdown file at `path` (up to the
    next `## `) with `lines`, or appends it."""
    text = open(path).read().split("\n") if os.path.exists(path) else ["# Benchmarks", ""]
    if heading in text:
        start = text.index(heading)
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
        text[start:end] = lines
    else:
        text += [""] + lines
    with open(path, "w") as f:
        f.write("\n".join(text))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--tools", required=True)
    ap.add_argument("--only-l1", action="store_true", help="only the nested-L1 section, in place")
    ap.add_argument("--only-confinement", action="store_true",
                    help="only the section of the backends under their allow-lists, in place")
    args = ap.parse_args()
    repo, tools = args.repo, args.tools
    if args.only_l1:
        print("bench: inside a nested L1, builtin vs QEMU-KVM ...", flush=True)
        replace_section(os.path.join(repo, "docs/benchmarks.md"), L1_HEADING, l1_section(repo, RUNS, L1_SMP_BOOTS))
        return
    kernel = os.path.realpath(os.path.join(repo, "build/guest/vmlinux"))
    initrd = os.path.realpath(os.path.join(repo, "build/guest/initramfs.cpio.gz"))
    work = "/run/tegmen-bench"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if args.only_confinement:
        try:
            print("bench: the backends with filters on, off, and the references ...", flush=True)
            section = confinement_section(repo, tools, kernel, initrd, work, CONFINEMENT_RUNS, CONFINEMENT_MIB)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        replace_section(os.path.join(repo, "docs/benchmarks.md"), CONFINEMENT_HEADING, section)
        print("\n".join(section))
        return
    try:
        print("bench: Tegmen sandbox boot to agent ready ...", flush=True)
        tegmen = bench_tegmen_boot(repo, os.path.join(work, "root"))
        print("bench: plain QEMU boot to a trivial /init ...", flush=True)
        plain = bench_plain_boot(kernel, tools, work)
        print("bench: backend memory ...", flush=True)
        ours = backend_memory("tegmen", repo, tools, kernel, initrd, work)
        ref = backend_memory("reference", repo, tools, kernel, initrd, work)
        print("bench: containers through the agent, and runc ...", flush=True)
        runc = bench_runc_true(work)
        agent_host = tegmen_bench(repo, "agent-true", "host", str(RUNS * 2))["seconds"]
        agent_guest = tegmen_bench(repo, "agent-true", "guest", str(RUNS * 2))["seconds"]
        tput = tegmen_bench(repo, "stdout-throughput", "256")
        print("bench: tegmen run, idle memory ...", flush=True)
        tegmen_run, phases = bench_tegmen_run(repo, work)
        idle = idle_memory(repo, work)
        print("bench: pods through containerd's CRI plugin, tegmen and runc handlers ...", flush=True)
        cri = tegmen_bench(repo, "cri", str(RUNS))
        print("bench: builtin monitor with a tiny guest ...", flush=True)
        tiny = bench_builtin_tiny(repo, work)
        vmm_mem = builtin_memory(repo, work)
        print("bench: pod networking: tegmen, QEMU's own virtio-net, runc ...", flush=True)
        network = net.bench_network(repo, work, kernel, qemu_cmd, cpio_newc)
        print("bench: the backends with filters on, off, and the references ...", flush=True)
        confinement = confinement_section(repo, tools, kernel, initrd, work, CONFINEMENT_RUNS, CONFINEMENT_MIB)
        print("bench: inside a nested L1, builtin vs QEMU-KVM ...", flush=True)
        l1 = l1_section(repo, RUNS, L1_SMP_BOOTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    accel = "KVM" if has_hw_virt() else "TCG (no vmx/svm on this host)"
    ratio = statistics.median(tegmen) / statistics.median(plain)
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (scripts/bench.sh → scripts/bench/bench.py) on {datetime.date.today()},",
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}, {qemu_version}, accel {accel}.",
        "Each Tegmen number stands next to its reference, measured in the same run.",
        "",
        "## Boot to agent ready",
        "",
        "| what | median |",
        "| --- | --- |",
        f"| Tegmen sandbox: VM start → agent answers `Check` over vsock (`supervisor check --boot`, backends + QEMU + virtio-fs mount) | {fmt(tegmen)} |",
        f"| reference: plain QEMU, same kernel and flags, no devices, trivial static /init prints a line | {fmt(plain)} |",
        f"| ratio (our overhead) | {ratio:.2f}× |",
        "",
        "## Host memory of the device backends (RSS, guest idle after boot)",
        "",
        "| device | Tegmen | reference |",
        "| --- | --- | --- |",
        f"| vsock | tegmen-vsock-backend: {ours[0]} KiB | vhost-device-vsock 0.3: {ref[0]} KiB |",
        f"| fs | tegmen-fs-backend: {ours[1]} KiB | virtiofsd 1.14: {ref[1]} KiB |",
        "",
        "Both sides are release builds: Tegmen's from `cargo build --release`, the",
        "references from `cargo install`.",
        "",
        "## A container's life through the agent (create → start → wait → remove of `/bin/true`)",
        "",
        "| what | median |",
        "| --- | --- |",
        f"| reference: `runc run` of the same busybox bundle on the host | {fmt_ms(runc)} |",
        f"| Tegmen agent on the host over Unix sockets (same container code as in the guest) | {fmt_ms(agent_host)} |",
        f"| ratio agent on host / runc | {statistics.median(agent_host) / statistics.median(runc):.2f}× |",
        f"| Tegmen agent inside a guest (over vsock and virtio-fs, {accel}) | {fmt_ms(agent_guest)} |",
        "",
        "## `tegmen run` of `/bin/true` (create → start → exit → delete, one VM per container)",
        "",
        "| what | median |",
        "| --- | --- |",
        f"| reference: `runc run` (same bundle, same run) | {fmt_ms(runc)} |",
        f"| `tegmen run` ({accel}) | {fmt_ms(tegmen_run)} |",
        f"| ratio | {statistics.median(tegmen_run) / statistics.median(runc):.1f}× |",
        "",
        "Where the time of one `tegmen run` goes (medians of the phases `tegmen --debug` logs;",
        "the process's own start-up and CLI work make up the rest):",
        "",
        "| phase | what | median |",
        "| --- | --- | --- |",
        *[f"| {name} | {what} | {fmt_ms(phases[name]) if phases.get(name) else 'n/a'} |" for name, what in PHASES],
        "",
        "## Host memory of one idle container",
        "",
        "| what | RSS | PSS | processes |",
        "| --- | --- | --- | --- |",
        f"| runc: the container's process | {idle['runc'][0]} KiB | {idle['runc'][1]} KiB | {idle['runc'][2]} |",
        f"| Tegmen: QEMU (256 MiB guest, memfd RAM), both backends, the monitor | {idle['tegmen'][0]} KiB | "
        f"{idle['tegmen'][1]} KiB | {idle['tegmen'][2]} |",
        "",
        "## Pods through containerd's CRI plugin (`tegmen-bench cri`)",
        "",
        "containerd 1.6 with its CRI plugin, driven by a CRI v1 client; each pod runs `sleep`",
        "containers of the busybox image. The `tegmen` handler is `containerd-shim-tegmen-v2`",
        f"(one VM per pod, {accel}); the reference is the `runc` handler (containerd's runc shim).",
        "",
        "| what | runc handler | tegmen handler | ratio |",
        "| --- | --- | --- | --- |",
        f"| RunPodSandbox → first container running | {fmt_ms(cri['runc']['first'])} | {fmt_ms(cri['tegmen']['first'])} | "
        f"{statistics.median(cri['tegmen']['first']) / statistics.median(cri['runc']['first']):.1f}× |",
        f"| a second container added to the running pod (create + start) | {fmt_ms(cri['runc']['second'])} | "
        f"{fmt_ms(cri['tegmen']['second'])} | {statistics.median(cri['tegmen']['second']) / statistics.median(cri['runc']['second']):.1f}× |",
        f"| shim RSS, pod with one container | {cri['runc']['shim_rss_kib']} KiB | {cri['tegmen']['shim_rss_kib']} KiB | "
        f"{cri['tegmen']['shim_rss_kib'] / cri['runc']['shim_rss_kib']:.2f}× |",
        f"| shim RSS, pod with ten containers | {cri['runc']['shim_rss_10_kib']} KiB | {cri['tegmen']['shim_rss_10_kib']} KiB | "
        f"{cri['tegmen']['shim_rss_10_kib'] / cri['runc']['shim_rss_10_kib']:.2f}× |",
        "",
        "The shim's RSS is the shim process alone (the runc shim is one process per pod too);",
        "the VM's own processes are in \"Host memory of one idle container\" above.",
        "",
        "## The builtin monitor with a tiny guest",
        "",
        "A PVH ELF of a few instructions (prints, writes the boot mark to port 0x440, resets",
        "through the i8042), booted like a kernel by both monitors. Process start to the",
        f"process's exit at the boot mark; QEMU with accel {tiny[4]} ends at the mark through",
        "`isa-debug-exit` on the same port.",
        "",
        "| what | median |",
        "| --- | --- |",
        f"| `tegmen-vmm` (release): VMM start → first guest entry (KVM_RUN) | {fmt_ms(tiny[1])} |",
        f"| `tegmen-vmm`: VMM start → boot mark | {fmt_ms(tiny[2])} |",
        f"| reference: QEMU microvm, same guest, process start → exit at the boot mark | {fmt_ms(tiny[3])} |",
        f"| ratio, to the boot mark | {statistics.median(tiny[2]) / statistics.median(tiny[3]):.2f}× |",
        f"| `tegmen-vmm`: process start → exit, after the guest's reset and the VM's teardown | {fmt_ms(tiny[0])} |",
        "",
        "QEMU's time ends at the boot mark (`isa-debug-exit`); `tegmen-vmm`'s whole-process time",
        "also holds the guest's reset and closing the KVM VM, which this host's KVM takes ~17 ms for",
        "(TCG has no KVM VM to close).",
        "",
        "Host memory of the monitor process with the tiny guest running (32 MiB guest RAM):",
        "",
        "| process | RSS beyond guest RAM | total RSS |",
        "| --- | --- | --- |",
        f"| `tegmen-vmm` | {vmm_mem['tegmen-vmm'][0]} KiB | {vmm_mem['tegmen-vmm'][1]} KiB |",
        f"| reference: QEMU microvm ({tiny[4]}) | {vmm_mem['qemu'][0]} KiB | {vmm_mem['qemu'][1]} KiB |",
        "",
        "On this host /dev/kvm emulates guest code (no vmx/svm), so only tiny guests run on the",
        "builtin monitor here; the guest image boots on it where vmx/svm exist.",
        "",
        "## stdout throughput from a container in a guest",
        "",
        f"`dd if=/dev/zero bs=1M count=256` in a container, read by the host over the vsock stream: "
        f"{tput['bytes'] / tput['seconds'] / 1e6:.1f} MB/s ({tput['bytes']} bytes in {tput['seconds']:.2f} s, {accel}).",
        "",
        *net.table(network, accel, fmt_ms),
        "Under TCG the guest's CPU bounds both VM rows alike (busybox `nc` in an emulated CPU);",
        "the ratio between the two devices is the number to read here.",
        "",
        *confinement,
        *l1,
        *section_lines(os.path.join(repo, "docs/benchmarks.md"), FUZZ_HEADING),
    ]
    os.makedirs(os.path.join(repo, "docs"), exist_ok=True)
    with open(os.path.join(repo, "docs/benchmarks.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
