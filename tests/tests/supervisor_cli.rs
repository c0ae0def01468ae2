//! End-to-end: the `supervisor` CLI against running sandboxes (`tegmen`
//! containers, each in its VM): `list`, `inspect` and `ps` as text and
//! JSON, `metrics` (also over HTTP) read by a Prometheus parser, the
//! numbers checked against `/proc`; `console` and `console
//! --follow`; `events`; `check ID` (the confinement of the host
//! processes); and its faults: an unknown id, a VM that died, an agent that does not
//! answer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tegmen_tests::{busybox_rootfs, runc_like_spec, wait_child, workspace_binary, TestRoot};

struct Cli {
    root: TestRoot,
    bundle: PathBuf,
}

impl Cli {
    fn new(name: &str) -> Cli {
        let root = TestRoot::new(name);
        let bundle = root.root().join("bundle");
        busybox_rootfs(&bundle.join("rootfs"));
        std::fs::write(
            bundle.join("config.json"),
            runc_like_spec(&["sleep", "300"], false).to_string(),
        )
        .unwrap();
        Cli { root, bundle }
    }

    fn tegmen(&self, args: &[&str]) -> Command {
        let mut c = Command::new(workspace_binary("tegmen"));
        c.arg("--root").arg(self.root.root()).args(args).stdin(Stdio::null());
        c
    }

    /// `tegmen run -d`: the monitor keeps its stdio, so none is a pipe.
    fn run_detached(&self, id: &str) {
        let status = self
            .tegmen(&["run", "-d", "--bundle", self.bundle.to_str().unwrap(), id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tegmen run -d {id}");
    }

    fn supervisor(&self, args: &[&str]) -> Command {
        let mut c = Command::new(workspace_binary("supervisor"));
        c.arg("--root").arg(self.root.root()).args(args).stdin(Stdio::null());
        c
    }

    fn out(&self, args: &[&str]) -> (i32, String, String) {
        tegmen_tests::clients::text(&self.supervisor(args).output().unwrap())
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.out(args);
        assert_eq!(code, 0, "supervisor {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("supervisor {args:?}: {e}: {out}"))
    }

    fn qemu_pid(&self, id: &str) -> i32 {
        let i = self.json(&["inspect", "--json", id]);
        i["host_processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "qemu")
            .and_then(|p| p["pid"].as_i64())
            .unwrap_or_else(|| panic!("no qemu in {i}")) as i32
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        for id in ["c1", "c2", "c3"] {
            let _ = self.tegmen(&["delete", "--force", id]).output();
        }
    }
}

/// The lines a child writes, as they come.
fn lines_of(out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn vm_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// `supervisor logs ID`: the backends' lines, in time order, as text and
/// as JSON lines.
fn check_logs(cli: &Cli, id: &str) {
    let (code, text, err) = cli.out(&["logs", id]);
    assert_eq!(code, 0, "{err}");
    let sources: std::collections::HashSet<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert!(
        sources.contains("vsock-backend") && sources.contains("fs-backend"),
        "{sources:?}:\n{text}"
    );
    let times: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert!(
        times.iter().all(|t| t.len() == 27 && t.ends_with('Z')) && times.windows(2).all(|w| w[0] <= w[1]),
        "fixed-width times in order:\n{text}"
    );
    assert!(text.contains("INFO "), "levels kept:\n{text}");
    let (code, json, _) = cli.out(&["logs", "--json", id]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), text.lines().count());
    assert!(lines
        .iter()
        .all(|l| l["time"].is_string() && l["source"].is_string() && l["line"].is_string()));
    let (code, _, err) = cli.out(&["logs", "nope"]);
    assert_eq!(code, 3, "{err}");
}

/// `supervisor check ID`: every live host process of the sandbox, each as
/// `/proc` has it (seccomp mode, effective capabilities, uid), and which of
/// its namespaces are its own; as JSON and as text.
fn check_confinement(cli: &Cli, id: &str, qemu: i32) {
    let report = cli.json(&["check", id, "--json"]);
    let report = report.as_array().unwrap();
    assert!(report.len() >= 3, "QEMU and two backends at least: {report:?}");
    let field = |pid: i64, name: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| Some(l.strip_prefix(name)?.strip_prefix(':')?.trim().to_string()))
            .unwrap()
    };
    for p in report {
        let pid = p["pid"].as_i64().unwrap_or_else(|| panic!("{p}"));
        let mode = match field(pid, "Seccomp").as_str() {
            "0" => "disabled",
            "1" => "strict",
            _ => "filter",
        };
        assert_eq!(p["seccomp"], mode, "{p}");
        assert_eq!(
            p["cap_effective"].as_u64().unwrap(),
            u64::from_str_radix(&field(pid, "CapEff"), 16).unwrap(),
            "{p}"
        );
        let uid: u64 = field(pid, "Uid").split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(p["uid"][0].as_u64().unwrap(), uid, "{p}");
        let own = |ns: &str| {
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
                != std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap()
        };
        for ns in ["mnt", "net", "pid", "uts", "ipc"] {
            let listed = p["own_namespaces"].as_array().unwrap().iter().any(|n| n == ns);
            assert_eq!(listed, own(ns), "{ns} of {p}");
        }
    }
    assert!(
        report.iter().any(|p| p["pid"] == qemu && p["name"] == "qemu"),
        "{report:?}"
    );
    // QEMU filters itself too (`-sandbox on`, seccomp = "kill").
    let q = report.iter().find(|p| p["pid"] == qemu).unwrap();
    assert_eq!(q["seccomp"], "filter", "{q}");
    // Each backend serves the guest under its allow-list (issue 12).
    let backends: Vec<_> = report
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("tegmen-") && n.contains("-backend"))
        })
        .collect();
    assert!(backends.len() >= 2, "{report:?}");
    for p in backends {
        assert_eq!(p["seccomp"], "filter", "{p}");
        assert!(p["seccomp_filters"].as_u64().unwrap() >= 1, "{p}");
        assert_eq!(p["no_new_privs"], true, "{p}");
        // And with the capabilities the code says: none, but for the fs
        // backend the file-serving set; nothing in the bounding set or
        // ambient.
        let want = if p["name"] == "tegmen-fs-backend" {
            tegmen_vmm::privileges::mask_of(tegmen_vmm::privileges::FILE_SERVING)
        } else {
            0
        };
        for set in ["cap_effective", "cap_permitted"] {
            assert_eq!(p[set].as_u64().unwrap(), want, "{set} of {p}");
        }
        assert_eq!(p["cap_bounding"].as_u64().unwrap(), 0, "{p}");
        assert_eq!(p["cap_ambient"].as_u64().unwrap(), 0, "{p}");
        // Rlimits as the code says, no core dumps, and the private memory
        // in use well below its bound.
        use tegmen_vmm::privileges::Limits;
        let limits = match p["name"].as_str().unwrap() {
            "tegmen-fs-backend" => Limits::FS,
            "tegmen-vsock-backend" => Limits::VSOCK,
            "tegmen-net-backend" => Limits::NET,
            other => panic!("a backend of no known kind: {other}"),
        };
        // Lowered to the code's bounds, or the hard limits the backend
        // inherited (this host's) where those are lower.
        let hard = |resource| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct it is given.
            assert_eq!(unsafe { libc::getrlimit(resource, &mut r) }, 0);
            r.rlim_max
        };
        assert_eq!(
            p["limits"]["open_files"],
            limits.files.min(hard(libc::RLIMIT_NOFILE)),
            "{p}"
        );
        assert_eq!(p["limits"]["data"], limits.data.min(hard(libc::RLIMIT_DATA)), "{p}");
        assert_eq!(p["limits"]["core"], 0, "{p}");
        let used = p["data_bytes"].as_u64().unwrap_or_else(|| panic!("{p}"));
        eprintln!("{}: {} MiB of private memory", p["name"], used >> 20);
        assert!(used < limits.data / 2, "{p}");
        // In namespaces of its own: no network, IPC or host name of the
        // host's, and a file system that is its sandbox alone.
        for ns in ["mnt", "net", "ipc", "uts"] {
            assert!(
                p["own_namespaces"].as_array().unwrap().iter().any(|n| n == ns),
                "{ns} of {p}"
            );
        }
        let pid = p["pid"].as_i64().unwrap();
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let rootfs_bin = |dir: &Path| dir.join(id).join("rootfs/bin").exists();
        // The fs backend serves files as their owners, as root; the others
        // serve as nobody.
        let user = if p["name"] == "tegmen-fs-backend" { 0 } else { 65534 };
        assert_eq!(p["uid"], serde_json::json!([user, user]), "{p}");
        if p["name"] == "tegmen-fs-backend" {
            // The share is its root: the container's rootfs is there.
            assert!(rootfs_bin(&root), "{p}: no {id}/rootfs/bin in its root");
            assert!(!root.join("vhost-fs.sock").exists(), "{p}: sees the sandbox directory");
        } else {
            // The sandbox directory is its root, without the mounts below it:
            // its sockets are there, the container's files are not.
            let name = p["name"].as_str().unwrap();
            let socket = match name.strip_prefix("tegmen-net-backend-") {
                Some(i) => format!("vhost-net{i}.sock"),
                None => "vhost-vsock.sock".to_string(),
            };
            assert!(root.join(&socket).exists(), "{p}: no {socket} in its root");
            assert!(!rootfs_bin(&root.join("shared")), "{p}: sees the container's rootfs");
            assert!(!root.join("etc/passwd").exists(), "{p}: sees the host");
        }
    }
    let (code, text, err) = cli.out(&["check", id]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&format!("qemu (pid {qemu}):")), "{text}");
    assert!(
        text.contains("seccomp: ") && text.contains("capabilities: effective "),
        "{text}"
    );
    let (code, _, err) = cli.out(&["check", "no-such-sandbox"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no-such-sandbox"), "{err}");
}

/// `supervisor metrics` text, read by a Prometheus parser, against /proc
/// and the guest.
fn check_metrics(_cli: &Cli, text: &str, qemu: i32) {
    use prometheus_parse::{Scrape, Value};
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format");
    let find = |metric: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| s.value.clone())
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in:\n{text}"))
    };
    let gauge = |metric: &str, labels: &[(&str, &str)]| match find(metric, labels) {
        Value::Gauge(v) => v,
        other => panic!("{metric} is not a gauge: {other:?}"),
    };
    assert_eq!(gauge("tegmen_sandbox_vm_up", &[("sandbox", "c1")]), 1.0);
    assert_eq!(gauge("tegmen_guest_agent_up", &[("sandbox", "c1")]), 1.0);
    let pid = qemu.to_string();
    let rss = gauge(
        "tegmen_host_process_rss_bytes",
        &[("sandbox", "c1"), ("process", "qemu"), ("pid", &pid)],
    );
    let now = (vm_rss_kib(qemu) * 1024) as f64;
    assert!(
        rss > 0.0 && rss * 2.0 > now && now * 2.0 > rss,
        "QEMU's RSS: {rss} in metrics, {now} in /proc"
    );
    assert!(gauge("tegmen_sandbox_host_rss_bytes", &[("sandbox", "c1")]) >= rss);
    assert!(gauge("tegmen_guest_memory_total_bytes", &[("sandbox", "c1")]) > (64 << 20) as f64);
    assert!(gauge("tegmen_container_pids", &[("sandbox", "c1"), ("container", "c1")]) >= 1.0);
    assert!(
        gauge(
            "tegmen_container_memory_usage_bytes",
            &[("sandbox", "c1"), ("container", "c1")]
        ) > 0.0
    );
    assert!(matches!(
        find("tegmen_container_cpu_seconds_total", &[("container", "c1")]),
        Value::Counter(v) if v >= 0.0
    ));
    assert!(matches!(
        find("tegmen_host_process_cpu_seconds_total", &[("process", "qemu")]),
        Value::Counter(v) if v > 0.0
    ));
    // The device backends' own counters: the agent's connections went over
    // vsock, the guest's mount over virtio-fs; nothing refused.
    let counter = |device: &str, name: &str| match find(
        "tegmen_device_events_total",
        &[("sandbox", "c1"), ("device", device), ("counter", name)],
    ) {
        Value::Counter(v) => v,
        other => panic!("{device} {name} is not a counter: {other:?}"),
    };
    assert!(counter("vsock", "tx_packets") > 0.0 && counter("vsock", "host_connects") > 0.0);
    assert_eq!(counter("vsock", "tx_malformed"), 0.0);
    assert!(counter("fs", "replies") > 0.0);
    assert_eq!(counter("fs", "malformed_chains"), 0.0);
}

/// list and inspect of a running sandbox, as text and JSON; the console,
/// and `console --follow` showing a line the guest writes after it
/// started, ending when the VM is gone.
#[test]
fn list_inspect_and_console() {
    let cli = Cli::new("sv-cli");
    cli.run_detached("c1");

    let list = cli.json(&["list", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let s = &list[0];
    assert_eq!(
        (s["id"].as_str(), s["face"].as_str()),
        (Some("c1"), Some("tegmen")),
        "{s}"
    );
    assert_eq!(s["vm_alive"], true, "{s}");
    assert!(s["host_rss_kib"].as_u64().unwrap() > 10_000, "{s}");
    assert_eq!(s["containers"][0]["id"], "c1", "{s}");
    let (code, text, _) = cli.out(&["list"]);
    assert_eq!(code, 0);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().contains("RSS KiB"), "{text}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[2], row.last().copied()),
        ("c1", "running", "tegmen", Some("c1")),
        "{text}"
    );

    let i = cli.json(&["inspect", "--json", "c1"]);
    let qemu = cli.qemu_pid("c1");
    let reported = i["host_processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == qemu)
        .unwrap()["rss_kib"]
        .as_u64()
        .unwrap();
    let now = vm_rss_kib(qemu);
    assert!(
        reported > 0 && reported * 2 > now && now * 2 > reported,
        "QEMU's RSS: inspect says {reported} KiB, /proc {now} KiB"
    );
    let guest = &i["guest"];
    let release = guest["kernel_release"].as_str().unwrap();
    assert!(!release.is_empty() && release != nix::sys::utsname::uname().unwrap().release().to_str().unwrap());
    assert!(guest["memory_total_bytes"].as_u64().unwrap() > 64 << 20, "{guest}");
    assert!(
        guest["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("virtiofs")),
        "{guest}"
    );
    let c = &i["container_details"][0];
    assert_eq!(c["id"], "c1");
    assert!(!c["guest_pids"].as_array().unwrap().is_empty(), "{c}");
    assert!(c["pids_current"].as_u64().unwrap() >= 1, "{c}");
    let (code, text, err) = cli.out(&["inspect", "c1"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&format!("kernel     {release}")), "{text}");
    assert!(text.contains("status       running (VM running)"), "{text}");

    let ps = cli.json(&["ps", "--json", "c1"]);
    let sleep = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["command"] == "sleep 300")
        .unwrap_or_else(|| panic!("no sleep 300 in {ps}"));
    assert_eq!(
        (&sleep["container"], &sleep["uid"]),
        (&"c1".into(), &0.into()),
        "{sleep}"
    );
    assert!(
        c["guest_pids"].as_array().unwrap().contains(&sleep["pid"]),
        "{sleep} {c}"
    );
    assert!(["S", "R"].contains(&sleep["state"].as_str().unwrap()), "{sleep}");
    let (code, text, err) = cli.out(&["ps", "c1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.lines().any(|l| l.starts_with("c1 ") && l.ends_with("  sleep 300")),
        "{text}"
    );

    check_metrics(&cli, &cli.out(&["metrics"]).1, qemu);
    check_metrics(&cli, &cli.out(&["metrics", "c1"]).1, qemu);
    check_logs(&cli, "c1");
    check_confinement(&cli, "c1", qemu);
    // No debug console unless the configuration asks for one: the agent
    // refuses, and the error says how to turn it on.
    let (code, out, err) = cli.out(&["exec", "c1", "--", "uname", "-r"]);
    assert_eq!((code, out.as_str()), (125, ""), "{err}");
    assert!(
        err.contains("sandbox c1") && err.contains("debug console is off") && err.contains("debug_console = true"),
        "{err}"
    );
    let (code, text, _) = cli.out(&["inspect", "c1"]);
    assert_eq!(code, 0);
    assert!(text.contains("debug        console off"), "{text}");
    // Served over HTTP on loopback; nowhere else.
    let (code, _, err) = cli.out(&["metrics", "--listen", "0.0.0.0:9109"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("loopback"), "{err}");
    let mut server = cli
        .supervisor(&["metrics", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stderr.take().unwrap()), &mut line).unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string();
    let get = |path: &str| {
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        reply
    };
    let reply = get("/metrics");
    let _ = server.kill();
    let _ = server.wait();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("version=0.0.4"),
        "{head}"
    );
    check_metrics(&cli, body, qemu);

    let (code, console, _) = cli.out(&["console", "c1"]);
    assert_eq!(code, 0);
    assert!(console.contains("tegmen-agent: info: agent "), "{console}");
    assert!(console.contains("container c1 created"), "{console}");

    // --follow: a line the guest writes afterwards, then the end with the VM.
    let mut follow = cli
        .supervisor(&["console", "--follow", "c1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = out.read(&mut b) {
            if n == 0 || tx.send(String::from_utf8_lossy(&b[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    // The agent's events, as a watcher of their own: an exec's exit, then the init's.
    let mut events = cli
        .supervisor(&["events", "c1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(events.stdout.take().unwrap());
    let event = |want: &str| -> serde_json::Value {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("supervisor events: no {want} line"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert_eq!(event("watching")["type"], "watching");
    // ... and of every sandbox, with no id.
    let mut all_events = cli.supervisor(&["events"]).stdout(Stdio::piped()).spawn().unwrap();
    let all_lines = lines_of(all_events.stdout.take().unwrap());
    let first = all_lines
        .recv_timeout(Duration::from_secs(30))
        .expect("events: a watching line");
    assert!(first.contains("\"watching\"") && first.contains("\"c1\""), "{first}");
    let status = cli
        .tegmen(&["exec", "c1", "sh", "-c", "exit 3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let e = event("exec exit");
    assert_eq!(
        (&e["type"], &e["sandbox"], &e["container"], &e["exit_code"]),
        (&"exit".into(), &"c1".into(), &"c1".into(), &3.into()),
        "{e}"
    );
    assert!(
        !e["exec_id"].as_str().unwrap().is_empty() && e["time"].as_str().unwrap().ends_with('Z'),
        "{e}"
    );
    let line = all_lines
        .recv_timeout(Duration::from_secs(30))
        .expect("events: the exec's exit");
    let all_e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(all_e, e, "the same event, seen by a watcher of every sandbox");
    let _ = all_events.kill();
    let _ = all_events.wait();
    std::thread::sleep(Duration::from_millis(500));
    let status = cli.tegmen(&["kill", "c1", "KILL"]).status().unwrap();
    assert!(status.success());
    let e = event("init exit");
    assert_eq!((&e["exit_code"], e.get("exec_id")), (&137.into(), None), "{e}");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("container c1: init") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => seen.push_str(&s),
            Err(_) => panic!("console --follow never showed the init's exit: {seen:?}"),
        }
    }
    assert!(seen.contains("exited with status 137"), "{seen:?}");
    let status = cli.tegmen(&["delete", "--force", "c1"]).status().unwrap();
    assert!(status.success());
    assert_eq!(
        wait_child(&mut follow, Duration::from_secs(20)),
        Some(0),
        "console --follow ends with the VM"
    );
    assert_eq!(
        wait_child(&mut events, Duration::from_secs(20)),
        Some(0),
        "events ends with the VM"
    );
    cli.root.assert_nothing_left();
}

/// An unknown id (exit 3, named); a sandbox whose VM died (inspect shows
/// what is known and says the VM is gone); an agent that does not answer
/// (inspect gives up after its bound).
#[test]
fn inspect_faults() {
    let cli = Cli::new("sv-faults");
    let (code, _, err) = cli.out(&["inspect", "nope"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
    let (code, _, err) = cli.out(&["console", "nope"]);
    assert_eq!(code, 3, "{err}");

    cli.run_detached("c2");
    cli.run_detached("c3");
    let qemu2 = cli.qemu_pid("c2");
    // SAFETY: kill() sends a signal to a QEMU of this test's.
    unsafe { libc::kill(qemu2, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let i = loop {
        let i = cli.json(&["inspect", "--json", "c2"]);
        if i["vm_alive"] == false || Instant::now() > deadline {
            break i;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(i["vm_alive"], false, "{i}");
    assert_eq!(i["guest_error"], "the VM is gone", "{i}");
    assert_eq!(i["container_details"][0]["id"], "c2", "{i}");
    let (code, text, _) = cli.out(&["inspect", "c2"]);
    assert_eq!(code, 0);
    assert!(text.contains("VM gone"), "{text}");
    let (code, _, err) = cli.out(&["ps", "c2"]);
    assert_eq!(code, 1);
    assert!(err.contains("sandbox c2: the VM is gone"), "{err}");

    let qemu3 = cli.qemu_pid("c3");
    // SAFETY: as above; SIGSTOP freezes the guest, SIGCONT below thaws it.
    unsafe { libc::kill(qemu3, libc::SIGSTOP) };
    let t0 = Instant::now();
    let i = cli.json(&["inspect", "--json", "--timeout", "2", "c3"]);
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(qemu3, libc::SIGCONT) };
    assert!(
        i["guest_error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not answer within 2s"),
        "{i}"
    );
    assert!(took < Duration::from_secs(15), "inspect took {took:?} with a 2 s bound");
    for id in ["c2", "c3"] {
        let status = cli.tegmen(&["delete", "--force", id]).status().unwrap();
        assert!(status.success());
    }
    cli.root.assert_nothing_left();
}

/// Every command against a pod of two containers in one VM (the shim,
/// under containerd), booted with the debug console on: list, inspect, ps
/// and metrics see both containers; `exec` runs programs in the guest
/// outside both (uname -r is the guest kernel's release; exit codes,
/// stdin, a missing program); events and logs of the pod.
#[test]
fn a_pod_of_two_containers_from_the_supervisor() {
    use tegmen_tests::clients::{assert_pods_gone, shim_pids, Containerd, IMAGE};
    const RUNTIME: &str = "io.containerd.tegmen.v2";
    let root = TestRoot::new("sv-pod");
    let state = root.root().join("state");
    let config = root.root().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\n[guest]\nboot_timeout_secs = 180\ndebug_console = true\n",
            state.display()
        ),
    )
    .unwrap();
    let before = shim_pids();
    let c = Containerd::start("sv-pod");
    let pod = "svpod";
    // A read-only volume of app1's: read-only on the host too, so that not
    // even the guest's root, outside the container, writes through it.
    let volume = root.root().join("ro-volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("file"), "host data\n").unwrap();
    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", volume.display());
    let run = |id: &str, kind: &str, script: &str| {
        let mount: &[&str] = if kind == "sandbox" {
            &[]
        } else {
            &["--mount", &ro_mount]
        };
        c.ok(&[
            &["run", "-d"][..],
            mount,
            &[
                "--runtime",
                RUNTIME,
                "--runtime-config-path",
                config.to_str().unwrap(),
                "--annotation",
                &format!("io.kubernetes.cri.sandbox-id={pod}"),
                "--annotation",
                &format!("io.kubernetes.cri.container-type={kind}"),
                IMAGE,
                id,
                "sh",
                "-c",
                script,
            ][..],
        ]
        .concat());
    };
    run(pod, "sandbox", "exec sleep 301");
    run("app1", "container", "exec sleep 302");
    let supervisor = |args: &[&str]| {
        let mut cmd = Command::new(workspace_binary("supervisor"));
        cmd.arg("--root").arg(&state).args(args).stdin(Stdio::null());
        cmd
    };
    let out = |args: &[&str]| tegmen_tests::clients::text(&supervisor(args).output().unwrap());
    let json = |args: &[&str]| -> serde_json::Value {
        let (code, text, err) = out(args);
        assert_eq!(code, 0, "supervisor {args:?}: {err}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    };

    let list = json(&["list", "--json"]);
    let s = &list.as_array().unwrap()[0];
    assert_eq!(
        (&s["id"], &s["face"], s["debug_console"].as_bool()),
        (&pod.into(), &"shim".into(), Some(true)),
        "{s}"
    );
    let ids: Vec<&str> = s["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [pod, "app1"], "{s}");

    let i = json(&["inspect", "--json", pod]);
    let details = i["container_details"].as_array().unwrap();
    assert_eq!(details.len(), 2, "{i}");
    for d in details {
        assert_eq!(d["status"], "running", "{d}");
        assert!(d["init_pid"].as_i64().unwrap() > 1, "{d}");
        assert!(!d["guest_pids"].as_array().unwrap().is_empty(), "{d}");
        assert!(d["pids_current"].as_u64().unwrap() >= 1, "{d}");
    }
    let release = i["guest"]["kernel_release"].as_str().unwrap().to_string();
    // The configuration it was booted with.
    let boot = &i["boot"];
    assert!(
        std::path::Path::new(boot["kernel"].as_str().unwrap()).is_file(),
        "{boot}"
    );
    assert!(
        boot["kernel_params"]
            .as_str()
            .unwrap()
            .contains("tegmen.debug_console=1"),
        "{boot}"
    );
    assert!(["tcg", "kvm"].contains(&boot["accel"].as_str().unwrap()), "{boot}");
    assert_eq!(boot["boot_timeout_secs"], 180, "{boot}");
    assert_eq!(i["guest"]["load_average"].as_array().map(|l| l.len()), Some(3), "{i}");
    assert!(i["guest"]["memory_available_bytes"].as_u64().unwrap() > 0, "{i}");

    let ps = json(&["ps", "--json", pod]);
    let of = |cmd: &str| -> String {
        ps.as_array()
            .unwrap()
            .iter()
            .find(|p| p["command"] == cmd)
            .unwrap_or_else(|| panic!("no {cmd} in {ps}"))["container"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (of("sleep 301"), of("sleep 302")),
        (pod.to_string(), "app1".to_string())
    );

    let (code, metrics, _) = out(&["metrics", pod]);
    assert_eq!(code, 0);
    for container in [pod, "app1"] {
        assert!(
            metrics.contains(&format!(
                "tegmen_container_pids{{sandbox=\"{pod}\",container=\"{container}\"}} 1"
            )),
            "{container}:\n{metrics}"
        );
    }

    // The debug console: programs in the guest, outside both containers.
    let (code, text, err) = out(&["exec", pod, "--", "uname", "-r"]);
    assert_eq!((code, text.trim()), (0, release.as_str()), "{err}");
    let (code, text, _) = out(&[
        "exec",
        pod,
        "--",
        "sh",
        "-c",
        "ls /run/tegmen/shared >/dev/null && echo $HOME; exit 7",
    ]);
    assert_eq!((code, text.as_str()), (7, "/root\n"));
    // The guest's root writes to app1's read-only volume through the share
    // itself (its kernel's view of the container's mount is beside the
    // point): refused, and the host file is as it was.
    let (code, text, err) = out(&[
        "exec",
        pod,
        "--",
        "sh",
        "-c",
        "n=0; for f in /run/tegmen/shared/*/mounts/*/file; do [ -f $f ] || continue; n=$((n+1)); \
         echo pwned > $f 2>/dev/null && echo wrote $f; echo pwned >> $f.new 2>/dev/null && echo made $f.new; \
         done; echo tried=$n",
    ]);
    assert_eq!((code, text.as_str()), (0, "tried=1\n"), "{err}");
    assert_eq!(std::fs::read_to_string(volume.join("file")).unwrap(), "host data\n");
    assert!(!volume.join("file.new").exists());
    // The guest's own root sees every container's process.
    let (code, text, _) = out(&[
        "exec",
        "-e",
        "WANT=sleep 30",
        pod,
        "--",
        "sh",
        "-c",
        "ps -o args | grep -c \"^$WANT\"",
    ]);
    assert_eq!((code, text.trim()), (0, "2"), "both containers' sleeps: {text}");
    let mut cat = supervisor(&["exec", pod, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(b"through the debug console\n").unwrap();
    }
    let o = cat.wait_with_output().unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "through the debug console\n")
    );
    // With a terminal: a pty in the guest, the caller's size passed on.
    let line = format!(
        "stty rows 31 cols 97; {} --root {} exec {pod} -- sh -c 'tty; stty size; exit 5'",
        workspace_binary("supervisor").display(),
        state.display()
    );
    let (code, text) = tegmen_tests::clients::run_in_terminal(&line, Duration::from_secs(60));
    assert_eq!(code, Some(5), "{text}");
    assert!(text.contains("/dev/pts/") && text.contains("31 97"), "{text}");
    let (code, _, err) = out(&["exec", pod, "--", "no-such-program"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("no-such-program") && err.contains("not found"), "{err}");
    let (code, _, err) = out(&["exec", "-e", "NOEQUALS", pod, "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("NOEQUALS"), "{err}");
    let (code, _, err) = out(&["exec", "nope", "--", "true"]);
    assert_eq!(code, 3, "{err}");

    // Events of the pod: the app's end.
    let mut events = supervisor(&["events", pod]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = lines_of(events.stdout.take().unwrap());
    let next = || -> serde_json::Value {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("an event line");
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next()["type"], "watching");
    c.ok(&["tasks", "kill", "-s", "KILL", "app1"]);
    let e = next();
    assert_eq!(
        (&e["type"], &e["container"], &e["exit_code"]),
        (&"exit".into(), &"app1".into(), &137.into()),
        "{e}"
    );
    let (code, logs, err) = out(&["logs", pod]);
    assert_eq!(code, 0, "{err}");
    assert!(logs.contains("fs-backend") && logs.contains("vsock-backend"), "{logs}");

    c.wait_stopped("app1");
    c.ok(&["tasks", "delete", "app1"]);
    c.ok(&["containers", "delete", "app1"]);
    c.ok(&["tasks", "kill", "-s", "KILL", pod]);
    c.wait_stopped(pod);
    c.ok(&["tasks", "delete", pod]);
    c.ok(&["containers", "delete", pod]);
    assert_eq!(
        wait_child(&mut events, Duration::from_secs(20)),
        Some(0),
        "events ends with the VM"
    );
    assert_pods_gone(&state, &before);
}
