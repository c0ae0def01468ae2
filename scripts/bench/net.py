"""Pod networking benchmark (part of `make bench`).

One topology, made here and removed after: network namespace `tgb-node`
holds a Linux bridge with 10.253.0.1/24 (the "node", where the server
runs), and `tgb-pod` holds eth0, 10.253.0.2/24, the far end of a veth on
that bridge, with a default route through it: the shape CNI's bridge
plugin leaves. In that pod namespace, one after another:

  * `tegmen`: `tegmen create/start` of a busybox bundle naming the pod
    namespace: the VM takes it over (tap + tc redirects, Tegmen's virtio-net
    device over vhost-user), the container runs in the guest;
  * `qemu`: the reference device, QEMU's own virtio-net on a tap in the
    same namespace with the same tc redirects, the same guest kernel, and
    busybox as the guest's /init running the same script;
  * `runc`: a runc container in the pod namespace (the host kernel's
    network, no VM).

Each runs the same busybox script: a TCP echo server (`nc -ll -e cat`) and
a bulk send of 32 MiB to a sink on the bridge. Measured from the node's
side: the sink's throughput (first byte to the last), and the median round
trip of 64-byte requests over one TCP connection to the echo server.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import time

NODE, POD = "tgb-node", "tgb-pod"
NODE_IP, POD_IP = "10.253.0.1", "10.253.0.2"
POD_MAC = "02:42:0a:fd:00:02"
BULK = 32 << 20
ECHO_ROUNDS = 200

SCRIPT = (f"nc -ll -p 5002 -e cat & "
          f"dd if=/dev/zero bs=65536 count={BULK // 65536} 2>/dev/null | nc {NODE_IP} 5001; "
          f"sleep 600")

SINK = r"""
import json, socket, sys, time
want = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
got, first = 0, None
while got < want:
    b = c.recv(1 << 20)
    if not b:
        break
    if first is None:
        first = time.monotonic()
    got += len(b)
end = time.monotonic()
c.close()
print(json.dumps({"bytes": got, "seconds": end - (first or end)}), flush=True)
"""

ECHO = r"""
import json, socket, statistics, sys, time
addr, rounds = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while True:
    try:
        c = socket.create_connection((addr, 5002), timeout=10)
        c.sendall(b"x" * 64)
        got = b""
        while len(got) < 64:
            b = c.recv(64 - len(got))
            if not b:
                raise OSError("closed")
            got += b
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(rounds):
    t = time.monotonic()
    c.sendall(b"y" * 64)
    got = 0
    while got < 64:
        got += len(c.recv(64 - got))
    times.append(time.monotonic() - t)
print(json.dumps({"rtt": times}), flush=True)
"""


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def topology():
    teardown()
    sh("ip", "netns", "add", NODE)
    sh("ip", "netns", "add", POD)
    for ns in (NODE, POD):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", NODE, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", NODE, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
    sh("ip", "-n", NODE, "link", "set", "br0", "up")
    sh("ip", "-n", POD, "link", "add", "eth0", "type", "veth", "peer", "name", "vethpod", "netns", NODE)
    sh("ip", "-n", POD, "link", "set", "eth0", "address", POD_MAC)
    sh("ip", "-n", POD, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
    sh("ip", "-n", POD, "link", "set", "eth0", "up")
    sh("ip", "-n", POD, "route", "add", "default", "via", NODE_IP)
    sh("ip", "-n", NODE, "link", "set", "vethpod", "master", "br0")
    sh("ip", "-n", NODE, "link", "set", "vethpod", "up")


def teardown():
    for ns in (POD, NODE):
        sh("ip", "netns", "delete", ns, check=False)


def measure(start, stop_variant, work, name):
    """Starts the sink, then the variant; returns (MB/s, [rtt seconds])."""
    sink = subprocess.Popen(["ip", "netns", "exec", NODE, "python3", "-c", SINK, str(BULK)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "listening"
        handle = start()
        try:
            line = ""
            deadline = time.monotonic() + 600
            while not line and time.monotonic() < deadline and sink.poll() is None:
                line = sink.stdout.readline().strip()
            res = json.loads(line)
            if res["bytes"] != BULK:
                raise RuntimeError(f"{name}: the sink got {res['bytes']} of {BULK} bytes")
            echo = sh("ip", "netns", "exec", NODE, "python3", "-c", ECHO, POD_IP, str(ECHO_ROUNDS))
            rtt = json.loads(echo.stdout)["rtt"]
        finally:
            stop_variant(handle)
        return res["bytes"] / res["seconds"] / 1e6, rtt
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait()


def bundle(path):
    """A busybox bundle in the pod namespace running SCRIPT (runc spec)."""
    rootfs = os.path.join(path, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"))
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin/busybox"))
    for applet in ("sh", "nc", "dd", "cat", "sleep"):
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    with open(os.path.join(path, "config.json")) as f:
        spec = json.load(f)
    spec["process"]["args"] = ["sh", "-c", SCRIPT]
    spec["process"]["terminal"] = False
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = f"/var/run/netns/{POD}"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f)


def oci(runtime, root, path, cid):
    """create + start with a runc-like CLI; returns the stop function's handle."""
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    subprocess.run([runtime, "--root", root, "create", "-b", path, cid], **quiet)
    subprocess.run([runtime, "--root", root, "start", cid], **quiet)
    return (runtime, root, cid)


def oci_stop(handle):
    runtime, root, cid = handle
    subprocess.run([runtime, "--root", root, "kill", cid, "KILL"], capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run([runtime, "--root", root, "delete", "-f", cid], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)


def qemu_variant(kernel, work, qemu_cmd, cpio_newc):
    init = "\n".join([
        "#!/bin/sh",
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev",
        "ip link set lo up; ip link set eth0 up",
        f"ip addr add {POD_IP}/24 dev eth0; ip route add default via {NODE_IP}",
        SCRIPT, ""])
    busybox = open("/bin/busybox", "rb").read()
    entries = [("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)),
               ("proc", 0o040755, b"", (0, 0)), ("sys", 0o040755, b"", (0, 0)),
               ("bin", 0o040755, b"", (0, 0)), ("bin/busybox", 0o100755, busybox, (0, 0)),
               ("init", 0o100755, init.encode(), (0, 0))]
    for applet in ("sh", "mount", "ip", "nc", "dd", "cat", "sleep"):
        entries.append((f"bin/{applet}", 0o120777, b"busybox", (0, 0)))
    initrd = os.path.join(work, "net-ref.cpio")
    with open(initrd, "wb") as f:
        f.write(cpio_newc(entries))
    console = os.path.join(work, "net-ref.log")

    def start():
        dev = ["-netdev", "tap,id=n0,ifname=tapq0,script=no,downscript=no,vhost=off",
               "-device", f"virtio-net-device,netdev=n0,mac={POD_MAC},rx_queue_size=1024,tx_queue_size=1024"]
        cmd = qemu_cmd(kernel, initrd, console, dev)
        p = subprocess.Popen(["ip", "netns", "exec", POD, *cmd],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "tapq0" not in sh("ip", "-n", POD, "-o", "link").stdout:
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("QEMU made no tap")
            time.sleep(0.05)
        # Kata's tcfilter wiring, as Tegmen does it.
        sh("ip", "-n", POD, "link", "set", "tapq0", "up")
        for dev_ in ("eth0", "tapq0"):
            sh("tc", "-n", POD, "qdisc", "add", "dev", dev_, "ingress")
        for a, b in (("eth0", "tapq0"), ("tapq0", "eth0")):
            sh("tc", "-n", POD, "filter", "add", "dev", a, "parent", "ffff:", "protocol", "all",
               "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", b)
        return p

    def stop(p):
        if p.poll() is None:
            p.kill()
        p.wait()
        sh("tc", "-n", POD, "qdisc", "del", "dev", "eth0", "ingress", check=False)

    return start, stop


def bench_network(repo, work, kernel, qemu_cmd, cpio_newc, tegmen=None):
    """{variant: (MB/s, [rtt s])} for tegmen, qemu, runc."""
    results = {}
    topology()
    try:
        path = os.path.join(work, "net-bundle")
        bundle(path)
        tegmen = tegmen or os.path.join(repo, "target/release/tegmen")
        results["tegmen"] = measure(lambda: oci(tegmen, os.path.join(work, "net-tegmen-root"), path, "net-tegmen"),
                                    oci_stop, work, "tegmen")
        start, stop = qemu_variant(kernel, work, qemu_cmd, cpio_newc)
        results["qemu"] = measure(start, stop, work, "qemu")
        results["runc"] = measure(lambda: oci("runc", os.path.join(work, "net-runc-root"), path, "net-runc"),
                                  oci_stop, work, "runc")
    finally:
        teardown()
    return results


def table(results, accel, fmt_ms):
    t, q, r = results["tegmen"], results["qemu"], results["runc"]
    return [
        "## Pod networking (`scripts/bench/net.py`)",
        "",
        "A pod namespace wired as CNI's bridge plugin leaves it (eth0 on a veth to a bridge in a",
        "\"node\" namespace, default route through the bridge); the node side runs the servers. Bulk:",
        f"{BULK >> 20} MiB sent from the pod (`dd | nc`) to a sink on the bridge. Round trip: {ECHO_ROUNDS}",
        "requests of 64 bytes over one TCP connection from the bridge to `nc -ll -e cat` in the pod.",
        "",
        f"| what | bulk, pod → bridge | request round trip (median) |",
        "| --- | --- | --- |",
        f"| Tegmen: `tegmen` container in a VM, Tegmen's virtio-net over vhost-user, tc redirects ({accel}) | "
        f"{t[0]:.1f} MB/s | {fmt_ms(t[1])} |",
        f"| reference: QEMU's own virtio-net on a tap, same tc redirects, same guest kernel, busybox /init ({accel}) | "
        f"{q[0]:.1f} MB/s | {fmt_ms(q[1])} |",
        f"| reference: runc container in the pod namespace (no VM) | {r[0]:.1f} MB/s | {fmt_ms(r[1])} |",
        f"| Tegmen / QEMU's device | {t[0] / q[0]:.2f}× | {statistics.median(t[1]) / statistics.median(q[1]):.2f}× |",
        "",
    ]
