//! End-to-end: Tegmen's own virtio-net device, served to QEMU by
//! `tegmen-net-backend` on a tap in a network namespace the test made,
//! carries real traffic both ways between a container in the guest and
//! servers in that namespace. Nothing is left in the namespace afterwards.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tegmen_agent_api::stream::StreamKind;
use tegmen_supervisor::container::NewContainer;
use tegmen_supervisor::hypervisor::Nic;
use tegmen_supervisor::sandbox::{Sandbox, SandboxOptions};
use tegmen_tests::netns::{ip, Netns};
use tegmen_tests::{busybox_rootfs, runc_like_spec, TestRoot};

/// A veth pair as CNI makes one: `eth0` in `pod` with `pod_addr`, its peer
/// `eth0p` in `peer` with `peer_addr`, both up.
fn veth_pair(pod: &Netns, peer: &Netns, pod_addr: &str, peer_addr: &str) {
    ip(&[
        "-n", &pod.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p", "netns", &peer.0,
    ]);
    ip(&["-n", &pod.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod.0, "addr", "add", pod_addr, "dev", "eth0"]);
    ip(&["-n", &peer.0, "link", "set", "eth0p", "up"]);
    ip(&["-n", &peer.0, "addr", "add", peer_addr, "dev", "eth0p"]);
}

fn read_all_in_thread(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
}

/// A container in the guest's own network namespace (so it sees the NIC)
/// allowed to configure it.
fn net_admin_spec(script: &str) -> serde_json::Value {
    let mut spec = runc_like_spec(&["sh", "-c", script], false);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "network");
    for set in ["bounding", "effective", "permitted"] {
        let caps = spec["process"]["capabilities"][set].as_array_mut().unwrap();
        caps.push("CAP_NET_ADMIN".into());
        caps.push("CAP_NET_RAW".into());
    }
    spec
}

fn add(sb: &mut Sandbox, id: &str, rootfs: &std::path::Path, script: &str) {
    let spec = net_admin_spec(script);
    sb.add_container(&NewContainer {
        id,
        rootfs,
        readonly: false,
        binds: &[],
        guest_spec: spec,
        mount_destinations: Vec::new(),
        terminal: false,
        stdin: false,
        bundle: None,
        cgroup: None,
    })
    .unwrap_or_else(|e| panic!("adding {id}: {e}"));
}

#[test]
fn a_guest_nic_on_a_tap_carries_traffic_both_ways() {
    let t = TestRoot::new("net");
    let ns = Netns::new(&format!("tgnet{}", std::process::id()));
    let mac = [0x02, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut sb = Sandbox::create(
        &t.config,
        "net",
        &SandboxOptions {
            owned_by_current_process: true,
            nics: vec![Nic {
                tap: "tgtap0".into(),
                netns: Some(ns.path().into()),
                mac,
                mtu: 1500,
            }],
            ..Default::default()
        },
    )
    .expect("boot with a NIC");
    assert!(
        ns.links().contains("tgtap0"),
        "the tap is in the namespace: {}\nbackend: {}\nqemu: {}",
        ns.links(),
        std::fs::read_to_string(sb.dir().join("net0-backend.log")).unwrap_or_default(),
        std::fs::read_to_string(sb.dir().join("qemu.log")).unwrap_or_default()
    );
    ip(&["-n", &ns.0, "addr", "add", "10.251.7.1/24", "dev", "tgtap0"]);
    ip(&["-n", &ns.0, "link", "set", "tgtap0", "up"]);
    // A web server on the namespace's side.
    let www = t.root().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let page: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("page.txt"), &page).unwrap();
    let httpd = ns.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "10.251.7.1:8080",
        "-h",
        www.to_str().unwrap(),
    ]);

    let rootfs = t.root().join("rootfs");
    busybox_rootfs(&rootfs);
    // Out: the guest configures its NIC, pings, fetches ~190 KB over
    // HTTP (many frames both ways). (busybox's wget needs NSS, which the
    // test rootfs lacks: nc speaks the HTTP.)
    add(
        &mut sb,
        "out",
        &rootfs,
        "ip link set eth0 up && ip addr add 10.251.7.2/24 dev eth0 && cat /sys/class/net/eth0/address && \
         ping -c 2 -W 5 10.251.7.1 > /dev/null && echo ping-ok; \
         printf 'GET /page.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.251.7.1 8080 > /tmp/resp; \
         sed '1,/^\\r$/d' /tmp/resp | md5sum; cat /proc/net/dev >&2",
    );
    let endpoint = sb.stream_endpoint();
    let out = read_all_in_thread(endpoint.open("out", "", StreamKind::Stdout).unwrap());
    let err = read_all_in_thread(endpoint.open("out", "", StreamKind::Stderr).unwrap());
    sb.agent().start_container("out").unwrap();
    let code = sb.agent().wait_process("out", "").unwrap().exit_code;
    assert_eq!(code, 0, "the script's last command");
    let out = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
    let err = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    let host_side = Command::new("ip")
        .args(["-n", &ns.0, "-s", "link", "show", "tgtap0"])
        .output()
        .unwrap();
    let diag = format!(
        "{out}{err}\nhost side: {}\nbackend: {}\nqemu: {}",
        String::from_utf8_lossy(&host_side.stdout),
        std::fs::read_to_string(sb.dir().join("net0-backend.log")).unwrap_or_default(),
        std::fs::read_to_string(sb.dir().join("qemu.log")).unwrap_or_default()
    );
    assert_eq!(
        lines.first(),
        Some(&"02:54:00:12:34:56"),
        "the NIC has the MAC given: {diag}"
    );
    assert_eq!(lines.get(1), Some(&"ping-ok"), "{diag}");
    let want = Command::new("md5sum").arg(www.join("page.txt")).output().unwrap();
    let want = String::from_utf8_lossy(&want.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        lines.get(2).and_then(|l| l.split_whitespace().next()),
        Some(want.as_str()),
        "the page, byte for byte: {diag}"
    );
    sb.remove_container("out").unwrap();

    // In: a server in the guest, reached from the namespace.
    add(
        &mut sb,
        "in",
        &rootfs,
        "while :; do echo served-from-the-guest | nc -l -p 8081; done",
    );
    sb.agent().start_container("in").unwrap();
    let got = ns.read_from("10.251.7.2", "8081", "the guest's server");
    assert_eq!(got.trim(), "served-from-the-guest");
    sb.remove_container("in").unwrap();

    drop(httpd);
    sb.destroy();
    // The tap was the backend's: it went with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns.links().contains("tgtap0") {
        assert!(Instant::now() < deadline, "the tap is left: {}", ns.links());
        std::thread::sleep(Duration::from_millis(50));
    }
    t.assert_nothing_left();
}

/// The tcfilter wiring on its own: a veth CNI-style in a namespace, a tap
/// beside it; the veth is found with its address (loopback and address-less
/// links are not), the tap gets its MTU and both get ingress redirects to
/// each other; unwiring leaves the namespace as it was. Bad paths are
/// named.
#[test]
fn a_netns_interface_is_wired_to_a_tap_and_unwired() {
    use tegmen_supervisor::netns;
    let pod = Netns::new(&format!("tgpod{}", std::process::id()));
    let peer = Netns::new(&format!("tgpeer{}", std::process::id()));
    veth_pair(&pod, &peer, "10.252.0.2/24", "10.252.0.1/24");
    ip(&["-n", &pod.0, "link", "set", "eth0", "mtu", "1400"]);
    ip(&["-n", &pod.0, "tuntap", "add", "tgtap1", "mode", "tap"]);
    let eps = netns::endpoints(std::path::Path::new(&pod.path())).unwrap();
    assert_eq!(
        eps.len(),
        1,
        "only the veth with an address (not lo, not the tap): {eps:?}"
    );
    let ep = &eps[0];
    assert_eq!((ep.name.as_str(), ep.mtu), ("eth0", 1400));
    assert_eq!(ep.addresses, vec![("10.252.0.2".parse().unwrap(), 24)]);
    let sys_mac = Command::new("ip")
        .args(["-n", &pod.0, "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let mac_text = ep.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    assert!(
        String::from_utf8_lossy(&sys_mac.stdout).contains(&mac_text),
        "the veth's MAC"
    );
    netns::wire(std::path::Path::new(&pod.path()), ep, "tgtap1").unwrap();
    let tc = |dev: &str| {
        let o = Command::new("tc")
            .args(["-n", &pod.0, "filter", "show", "dev", dev, "ingress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(tc("eth0").contains("Redirect to device tgtap1"), "{}", tc("eth0"));
    assert!(tc("tgtap1").contains("Redirect to device eth0"), "{}", tc("tgtap1"));
    assert!(
        pod.links()
            .lines()
            .any(|l| l.contains("tgtap1") && l.contains("mtu 1400")),
        "{}",
        pod.links()
    );
    netns::unwire(std::path::Path::new(&pod.path()), ep.index).unwrap();
    let qdiscs = Command::new("tc")
        .args(["-n", &pod.0, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"),
        "the veth's ingress qdisc is gone"
    );
    assert!(tc("eth0").is_empty());
    // Unwiring twice is no error; bad paths are named.
    netns::unwire(std::path::Path::new(&pod.path()), ep.index).unwrap();
    let e = netns::endpoints(std::path::Path::new("/var/run/netns/no-such-ns"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-ns"), "{e}");
    let e = netns::endpoints(std::path::Path::new("/etc/hostname"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a network namespace"), "{e}");
}

/// A sandbox given a CNI-style network namespace: its veth is found, a
/// tap made beside it and wired both ways; the guest NIC has the veth's
/// MAC, the agent gave it the veth's address and the namespace's default
/// route before any container, and the guest talks to a host on the other
/// end of the veth, both ways. After the sandbox, the namespace is as CNI
/// left it.
#[test]
fn a_sandbox_takes_over_a_cni_namespace() {
    let t = TestRoot::new("cni-net");
    let pod = Netns::new(&format!("tgcpod{}", std::process::id()));
    let peer = Netns::new(&format!("tgcpeer{}", std::process::id()));
    veth_pair(&pod, &peer, "10.252.1.2/24", "10.252.1.1/24");
    ip(&["-n", &pod.0, "link", "set", "eth0", "address", "02:42:0a:fc:01:02"]);
    ip(&["-n", &pod.0, "route", "add", "default", "via", "10.252.1.1"]);
    // A static ARP entry (permanent): the guest gets it; a learnt one not.
    ip(&[
        "-n",
        &pod.0,
        "neigh",
        "add",
        "10.252.1.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    ip(&[
        "-n",
        &pod.0,
        "neigh",
        "add",
        "10.252.1.78",
        "lladdr",
        "02:00:00:00:00:78",
        "dev",
        "eth0",
        "nud",
        "reachable",
    ]);
    let server = peer.spawn(&[
        "sh",
        "-c",
        "while :; do echo from-the-peer | busybox nc -l -p 8082; done",
    ]);

    // A path that is not a namespace: refused, naming it, nothing left.
    let e = Sandbox::create(
        &t.config,
        "bad",
        &SandboxOptions {
            owned_by_current_process: true,
            netns: Some("/var/run/netns/no-such-netns".into()),
            ..Default::default()
        },
    )
    .err()
    .expect("a missing netns is refused")
    .to_string();
    assert!(e.contains("no-such-netns"), "{e}");
    t.assert_nothing_left();
    // The host's own namespace: refused, its interfaces untouched.
    let e = Sandbox::create(
        &t.config,
        "host",
        &SandboxOptions {
            owned_by_current_process: true,
            netns: Some("/proc/self/ns/net".into()),
            ..Default::default()
        },
    )
    .err()
    .expect("the host's netns is refused")
    .to_string();
    assert!(e.contains("/proc/self/ns/net") && e.contains("the host's"), "{e}");
    t.assert_nothing_left();

    let mut sb = Sandbox::create(
        &t.config,
        "cni",
        &SandboxOptions {
            owned_by_current_process: true,
            netns: Some(pod.path().into()),
            ..Default::default()
        },
    )
    .expect("boot in the pod's namespace");
    let net = sb.state().network.clone().expect("the wiring is recorded");
    assert_eq!(net.endpoints.len(), 1);
    let ep = &net.endpoints[0];
    assert_eq!((ep.name.as_str(), ep.mac.as_str()), ("eth0", "02:42:0a:fc:01:02"));
    assert_eq!(ep.addresses, ["10.252.1.2/24"]);
    assert_eq!(
        ep.routes,
        [(String::new(), "10.252.1.1".to_string())],
        "the default route, not the kernel's"
    );
    assert_eq!(
        ep.neighbours,
        [("10.252.1.77".to_string(), "02:00:00:00:00:77".to_string())],
        "the permanent neighbour only"
    );
    let rootfs = t.root().join("rootfs");
    busybox_rootfs(&rootfs);
    // The agent configured the NIC before any container: the container
    // only looks.
    let script = "cat /sys/class/net/eth0/address; ip -o -4 addr show eth0 | grep -o 'inet [0-9./]*'; \
         ip route | grep default; grep 10.252.1.7 /proc/net/arp; \
         for i in 1 2 3 4 5; do nc -w 5 10.252.1.1 8082 && break; sleep 1; done; \
         while :; do echo from-the-guest | nc -l -p 8083; done";
    add(&mut sb, "app", &rootfs, script);
    let endpoint = sb.stream_endpoint();
    let mut out = endpoint.open("app", "", StreamKind::Stdout).unwrap();
    sb.agent().start_container("app").unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    out.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    while !seen.contains("from-the-peer") {
        assert!(Instant::now() < deadline, "the guest never reached the peer: {seen:?}");
        if let Ok(n) = out.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(
        seen.starts_with("02:42:0a:fc:01:02"),
        "the guest NIC has the veth's MAC: {seen:?}"
    );
    assert!(
        seen.contains("inet 10.252.1.2/24"),
        "the veth's address, set by the agent: {seen:?}"
    );
    assert!(
        seen.contains("default via 10.252.1.1 dev eth0"),
        "the default route: {seen:?}"
    );
    let arp: Vec<&str> = seen.lines().filter(|l| l.starts_with("10.252.1.7")).collect();
    assert!(
        arp.len() == 1 && arp[0].contains("02:00:00:00:00:77") && arp[0].contains("0x6"),
        "the permanent neighbour is in the guest, as permanent (flags 0x6): {seen:?}"
    );
    let got = peer.read_from("10.252.1.2", "8083", "the guest, from the peer,");
    assert_eq!(got.trim(), "from-the-guest");
    drop(out);
    sb.destroy();
    drop(server);
    let qdiscs = Command::new("tc")
        .args(["-n", &pod.0, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"),
        "the veth's redirect is gone"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.links().contains("_tg") {
        assert!(Instant::now() < deadline, "the tap is left: {}", pod.links());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pod.links().contains("eth0"), "CNI's veth stays");
    t.assert_nothing_left();
}

/// The namespace's interface goes away while the VM runs (CNI's DEL
/// before the pod's teardown, an operator): the VM and its containers go
/// on without it, and teardown still leaves the namespace empty.
#[test]
fn an_interface_that_disappears_leaves_the_vm_running_and_nothing_behind() {
    let t = TestRoot::new("gone-net");
    let pod = Netns::new(&format!("tggpod{}", std::process::id()));
    let peer = Netns::new(&format!("tggpeer{}", std::process::id()));
    veth_pair(&pod, &peer, "10.252.4.2/24", "10.252.4.1/24");
    let mut sb = Sandbox::create(
        &t.config,
        "gone",
        &SandboxOptions {
            owned_by_current_process: true,
            netns: Some(pod.path().into()),
            ..Default::default()
        },
    )
    .expect("boot in the pod's namespace");
    assert!(pod.links().contains("tap0_tg"), "{}", pod.links());
    ip(&["-n", &pod.0, "link", "delete", "eth0"]);
    assert!(!peer.links().contains("eth0p"), "the pair went together");

    // The guest goes on: a container runs, and sees its NIC still there.
    let rootfs = t.root().join("rootfs");
    busybox_rootfs(&rootfs);
    add(
        &mut sb,
        "after",
        &rootfs,
        "cat /sys/class/net/eth0/operstate; echo still-running",
    );
    let out = read_all_in_thread(sb.stream_endpoint().open("after", "", StreamKind::Stdout).unwrap());
    sb.agent().start_container("after").unwrap();
    assert_eq!(sb.agent().wait_process("after", "").unwrap().exit_code, 0);
    let text = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
    assert!(text.ends_with("still-running\n"), "{text:?}");
    sb.remove_container("after").unwrap();

    sb.shutdown().expect("teardown without the interface");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.links().contains("_tg") {
        assert!(Instant::now() < deadline, "the tap is left: {}", pod.links());
        std::thread::sleep(Duration::from_millis(50));
    }
    let links = pod.links();
    assert_eq!(links.lines().count(), 1, "only lo is left: {links}");
    t.assert_nothing_left();
}

/// `tegmen run` with a spec that names a network namespace by path, as
/// podman passes its `netns-…`: the container has the namespace's address
/// and reaches the far end of its veth; after delete the namespace is as
/// before.
#[test]
fn tegmen_runs_a_container_in_a_given_network_namespace() {
    let t = TestRoot::new("tegmen-net");
    let pod = Netns::new(&format!("tgtpod{}", std::process::id()));
    let peer = Netns::new(&format!("tgtpeer{}", std::process::id()));
    veth_pair(&pod, &peer, "10.252.3.2/24", "10.252.3.1/24");
    let _server = peer.spawn(&[
        "sh",
        "-c",
        "while :; do echo hello-tegmen | busybox nc -l -p 8084; done",
    ]);
    let bundle = t.root().join("bundle");
    busybox_rootfs(&bundle.join("rootfs"));
    let mut spec = runc_like_spec(
        &[
            "sh",
            "-c",
            "ip -o -4 addr show eth0 | grep -o 'inet [0-9./]*'; \
             for i in 1 2 3 4 5; do nc -w 5 10.252.3.1 8084 && break; sleep 1; done",
        ],
        false,
    );
    for n in spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if n["type"] == "network" {
            n["path"] = pod.path().into();
        }
    }
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let o = Command::new(tegmen_tests::workspace_binary("tegmen"))
        .arg("--root")
        .arg(t.root())
        .args(["run", "--bundle", bundle.to_str().unwrap(), "netc"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("inet 10.252.3.2/24"), "{out}");
    assert!(out.contains("hello-tegmen"), "{out}");
    let qdiscs = Command::new("tc")
        .args(["-n", &pod.0, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"));
    assert!(!pod.links().contains("_tg"), "{}", pod.links());
    t.assert_nothing_left();

    // kill -9 of every host process of a networked container: delete
    // still finds the namespace's redirect from state.json and removes it.
    spec["process"]["args"] = serde_json::json!(["sleep", "600"]);
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let tegmen = |args: &[&str]| {
        Command::new(tegmen_tests::workspace_binary("tegmen"))
            .arg("--root")
            .arg(t.root())
            .args(args)
            // Not a pipe: the detached monitor keeps its stdio.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(t.root().join("tegmen.err")).unwrap())
            .status()
            .unwrap()
    };
    let err = || std::fs::read_to_string(t.root().join("tegmen.err")).unwrap_or_default();
    assert!(
        tegmen(&["run", "-d", "--bundle", bundle.to_str().unwrap(), "netk"]).success(),
        "{}",
        err()
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.config.sandboxes_dir().join("netk/state.json")).unwrap()).unwrap();
    assert_eq!(state["network"]["endpoints"][0]["wired"], true, "{state}");
    let qdisc = || {
        let o = Command::new("tc")
            .args(["-n", &pod.0, "qdisc", "show", "dev", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(qdisc().contains("ingress"), "wired: {}", qdisc());
    let mut pids: Vec<i64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .collect();
    let st = Command::new(tegmen_tests::workspace_binary("tegmen"))
        .arg("--root")
        .arg(t.root())
        .args(["state", "netk"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    pids.push(st["pid"].as_i64().expect("the monitor's pid"));
    for pid in &pids {
        // SAFETY: kill(2) of processes this test's tegmen started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert!(tegmen(&["delete", "--force", "netk"]).success(), "{}", err());
    assert!(!qdisc().contains("ingress"), "the redirect is gone: {}", qdisc());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.links().contains("_tg") {
        assert!(Instant::now() < deadline, "the tap is left: {}", pod.links());
        std::thread::sleep(Duration::from_millis(50));
    }
    t.assert_nothing_left();

    // A path that is no network namespace at all is named.
    for n in spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if n["type"] == "network" {
            n["path"] = "/etc/hostname".into();
        }
    }
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let failed = !tegmen(&["create", "--bundle", bundle.to_str().unwrap(), "netbad"]).success();
    let e = err();
    assert!(failed && e.contains("/etc/hostname"), "{e}");
    t.assert_nothing_left();
}
