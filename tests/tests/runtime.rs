//! End-to-end: the `tegmen` OCI runtime binary driven as runc's callers
//! drive it (conmon, containerd-shim), on a busybox bundle, each container
//! in a real guest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tegmen_tests::{busybox_rootfs, processes_mentioning, runc_like_spec, workspace_binary, TestRoot};

/// One test's runtime: its own `--root`, bundles below it.
struct Rt {
    root: TestRoot,
    bin: PathBuf,
}

/// (exit status, stdout, stderr) of one command.
type Out = (i32, String, String);

impl Rt {
    fn new(name: &str) -> Rt {
        Rt {
            root: TestRoot::new(name),
            bin: workspace_binary("tegmen"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(self.root.root()).args(args).stdin(Stdio::null());
        c
    }

    fn out(&self, args: &[&str]) -> Out {
        let o = self.cmd(args).output().expect("running tegmen");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.out(args);
        assert_eq!(code, 0, "tegmen {args:?} failed: {err}");
        out
    }

    /// Runs a command that leaves a monitor behind holding the stdio it
    /// was given (`run -d`, `exec -d`): stdout to null, stderr to a file,
    /// so nothing waits for their EOF.
    fn ok_detached(&self, args: &[&str]) {
        let err_path = self.root.root().join("detached.err");
        let err = std::fs::File::create(&err_path).unwrap();
        let status = self.cmd(args).stdout(Stdio::null()).stderr(err).status().unwrap();
        let text = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(status.success(), "tegmen {args:?} failed: {text}");
    }

    fn state(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state prints JSON")
    }

    fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_string()
    }

    fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status(id);
            if s == want {
                return;
            }
            assert!(Instant::now() < deadline, "{id} stays {s}, never {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A bundle running `args`: a busybox rootfs and runc's default spec.
    fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        self.bundle_with(name, runc_like_spec(args, false))
    }

    fn bundle_with(&self, name: &str, spec: serde_json::Value) -> PathBuf {
        let dir = self.root.root().join("bundles").join(name);
        busybox_rootfs(&dir.join("rootfs"));
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        dir
    }

    fn b(dir: &Path) -> &str {
        dir.to_str().unwrap()
    }
}

impl Drop for Rt {
    /// A failed test must not leave VMs running: force-delete whatever is
    /// left before the root goes.
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.root.config.sandboxes_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = self.cmd(&["delete", "--force", &id]).output();
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn read_all_in_thread(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// create → created (monitor alive, pid-file = state pid) → start → the
/// output arrives on the stdout `create` was given → stopped → delete →
/// nothing left; start and kill after the exit are refused as runc does.
#[test]
fn create_start_state_delete() {
    let rt = Rt::new("rt-life");
    let bundle = rt.bundle("life", &["sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    let pid_file = rt.root.root().join("life.pid");
    let mut create = rt
        .cmd(&[
            "create",
            "--bundle",
            Rt::b(&bundle),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "life",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = read_all_in_thread(create.stdout.take().unwrap());
    let err = read_all_in_thread(create.stderr.take().unwrap());
    assert!(create.wait().unwrap().success(), "create failed");

    let state = rt.state("life");
    assert_eq!(state["status"], "created", "{state}");
    assert_eq!(state["id"], "life");
    assert_eq!(state["bundle"], Rt::b(&bundle));
    assert_eq!(state["rootfs"], Rt::b(&bundle.join("rootfs")));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(state["ociVersion"], config["ociVersion"], "the bundle's spec version");
    let pid = state["pid"].as_i64().unwrap() as i32;
    assert!(pid > 0 && pid_alive(pid), "{state}");
    let from_file: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(from_file, pid, "the pid file names the monitor");
    let mounts = tegmen_tests::mounts_below(rt.root.root());
    assert!(
        mounts.iter().any(|m| m.ends_with("shared/life/rootfs")),
        "rootfs bind-mounted below the share: {mounts:?}"
    );

    rt.ok(&["start", "life"]);
    assert_eq!(out.join().unwrap(), "hello\n", "stdout reaches create's stdout");
    assert_eq!(err.join().unwrap(), "oops\n", "stderr reaches create's stderr");
    rt.wait_status("life", "stopped");
    assert_eq!(rt.state("life")["pid"], 0);
    assert!(!pid_alive(pid), "the monitor exits with the container");

    let (code, _, e) = rt.out(&["start", "life"]);
    assert_eq!((code, e.trim()), (1, "cannot start a container that has stopped"));
    let (code, _, e) = rt.out(&["kill", "life", "KILL"]);
    assert_eq!((code, e.trim()), (1, "container not running"));
    let listed = rt.ok(&["list", "-q"]);
    assert_eq!(listed.trim(), "life");

    rt.ok(&["delete", "life"]);
    rt.root.assert_nothing_left();
    let (code, _, e) = rt.out(&["state", "life"]);
    assert_eq!((code, e.trim()), (1, "container does not exist"));
}

/// Attached `run` exits with the container's status and removes it.
#[test]
fn run_exit_codes() {
    let rt = Rt::new("rt-run");
    for (id, script, want) in [
        ("zero", "echo out", 0),
        ("three", "exit 3", 3),
        // The shell is the container's PID 1, which SIGKILL from inside
        // cannot end; its child can be killed so.
        ("killed", "sh -c 'kill -9 $$'; exit $?", 137),
    ] {
        let bundle = rt.bundle(id, &["sh", "-c", script]);
        let (code, out, err) = rt.out(&["run", "--bundle", Rt::b(&bundle), id]);
        assert_eq!(code, want, "{id}: {err}");
        if id == "zero" {
            assert_eq!(out, "out\n");
        }
        rt.root.assert_nothing_left();
    }
}

/// `kill` (SIGTERM by default) reaches a trapping shell; exec attached and
/// detached; pause/resume; start twice and delete of a running container
/// are refused.
#[test]
fn kill_exec_pause() {
    let rt = Rt::new("rt-kill");
    let script = "trap 'echo got TERM; exit 5' TERM; echo up; while :; do sleep 0.1; done";
    let bundle = rt.bundle("trap", &["sh", "-c", script]);
    let out_path = rt.root.root().join("trap.out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let status = rt
        .cmd(&["run", "-d", "--bundle", Rt::b(&bundle), "trap"])
        .stdout(out_file)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(rt.status("trap"), "running");

    let (code, _, e) = rt.out(&["start", "trap"]);
    assert_eq!((code, e.trim()), (1, "cannot start an already running container"));
    let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&bundle), "trap"]);
    assert_eq!(
        (code, e.trim()),
        (1, "tegmen create failed: container with given ID already exists")
    );
    let (code, _, e) = rt.out(&["delete", "trap"]);
    assert_eq!(
        (code, e.trim()),
        (1, "cannot delete container trap that is not stopped: running")
    );

    let (code, out, err) = rt.out(&["exec", "trap", "sh", "-c", "echo in exec; echo $FOO; exit 4"]);
    assert_eq!((code, out.as_str()), (4, "in exec\n\n"), "{err}");
    let (code, out, _) = rt.out(&[
        "exec",
        "-e",
        "FOO=bar",
        "--cwd",
        "/tmp",
        "trap",
        "sh",
        "-c",
        "echo $FOO; pwd",
    ]);
    assert_eq!((code, out.as_str()), (0, "bar\n/tmp\n"));
    let process_file = rt.root.root().join("process.json");
    let process = serde_json::json!({"args": ["sh", "-c", "id -u; echo $P"], "cwd": "/", "env": ["PATH=/bin", "P=from-file"],
                                     "user": {"uid": 1000, "gid": 1000}});
    std::fs::write(&process_file, process.to_string()).unwrap();
    let (code, out, err) = rt.out(&["exec", "--process", process_file.to_str().unwrap(), "trap"]);
    assert_eq!((code, out.as_str()), (0, "1000\nfrom-file\n"), "{err}");
    let pid_file = rt.root.root().join("exec.pid");
    rt.ok_detached(&[
        "exec",
        "-d",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "trap",
        "sleep",
        "30",
    ]);
    let exec_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(pid_alive(exec_pid), "the exec's monitor runs");
    let pids: Vec<i32> = serde_json::from_str(&rt.ok(&["ps", "--format", "json", "trap"])).unwrap();
    assert!(pids.len() >= 2, "init and the exec'd sleep: {pids:?}");

    rt.ok(&["update", "--pids-limit", "50", "trap"]);
    let (code, out, err) = rt.out(&["exec", "trap", "cat", "/sys/fs/cgroup/pids.max"]);
    assert_eq!((code, out.trim()), (0, "50"), "{err}");

    rt.ok(&["pause", "trap"]);
    assert_eq!(rt.status("trap"), "paused");
    rt.ok(&["resume", "trap"]);
    assert_eq!(rt.status("trap"), "running");

    rt.ok(&["kill", "trap"]);
    rt.wait_status("trap", "stopped");
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(out, "up\ngot TERM\n");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rt.root.config.sandboxes_dir().join("trap/container.json")).unwrap())
            .unwrap();
    assert_eq!(rec["exit_code"], 5, "the monitor recorded the exit status");
    rt.ok(&["delete", "trap"]);
    assert!(!pid_alive(exec_pid), "delete ends the exec's monitor too");
    rt.root.assert_nothing_left();
}

/// `delete --force` of a running container, after its id was refused for
/// a second container.
#[test]
fn force_delete_running() {
    let rt = Rt::new("rt-force");
    let bundle = rt.bundle("busy", &["sleep", "1000"]);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "busy"]);
    let pid = rt.state("busy")["pid"].as_i64().unwrap() as i32;
    assert_eq!(rt.status("busy"), "running");
    rt.ok(&["delete", "--force", "busy"]);
    assert!(!pid_alive(pid));
    rt.root.assert_nothing_left();

    // `kill --all` signals every process of the container.
    let bundle = rt.bundle("all", &["sh", "-c", "trap '' TERM; sleep 1000 & wait; wait"]);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "all"]);
    rt.ok(&["kill", "--all", "all", "KILL"]);
    rt.wait_status("all", "stopped");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rt.root.config.sandboxes_dir().join("all/container.json")).unwrap())
            .unwrap();
    assert_eq!(rec["exit_code"], 137, "{rec}");
    rt.ok(&["delete", "all"]);
    rt.root.assert_nothing_left();
}

/// The monitor SIGKILLed mid-run: the container counts as stopped, and
/// delete leaves nothing.
#[test]
fn killed_monitor() {
    let rt = Rt::new("rt-mon");
    let bundle = rt.bundle("mon", &["sleep", "1000"]);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "mon"]);
    let pid = rt.state("mon")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill sends a signal to the monitor this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    rt.wait_status("mon", "stopped");
    rt.ok(&["delete", "mon"]);
    rt.root.assert_nothing_left();
}

/// runc's error texts and exit status 1, without booting anything; the
/// JSON log carries the error for containerd.
#[test]
fn errors_without_a_vm() {
    let rt = Rt::new("rt-err");
    for cmd in [
        &["state", "nope"][..],
        &["kill", "nope"],
        &["delete", "nope"],
        &["start", "nope"],
        &["pause", "nope"],
    ] {
        let (code, out, e) = rt.out(cmd);
        assert_eq!(
            (code, out.as_str(), e.trim()),
            (1, "", "container does not exist"),
            "{cmd:?}"
        );
    }
    rt.ok(&["delete", "--force", "nope"]);
    let bundle = rt.bundle("b", &["true"]);
    for bad in ["../x", "a/b", ".."] {
        let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&bundle), bad]);
        assert_eq!(code, 1);
        assert!(e.contains("invalid container ID format"), "{bad}: {e}");
    }
    let empty = rt.root.root().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&empty), "x"]);
    assert_eq!(code, 1);
    assert_eq!(
        e.trim(),
        "tegmen create failed: JSON specification file config.json not found"
    );
    std::fs::write(empty.join("config.json"), "{not json").unwrap();
    let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&empty), "x"]);
    assert_eq!(code, 1);
    assert!(e.contains("config.json"), "{e}");
    let mut s = runc_like_spec(&["true"], false);
    s["linux"]["namespaces"][1]["path"] = "/var/run/netns/tegmen-no-such-netns".into();
    let nsb = rt.bundle_with("ns", s);
    let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&nsb), "x"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("tegmen-no-such-netns"), "the path is named: {e}");
    rt.root.assert_nothing_left();
    let tty = rt.bundle_with("tty", runc_like_spec(&["sh"], true));
    let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&tty), "x"]);
    assert_eq!(
        (code, e.trim()),
        (
            1,
            "tegmen create failed: cannot allocate tty if runc will detach without setting console socket"
        )
    );

    let log = rt.root.root().join("log.json");
    let (code, _, _) = rt.out(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "kill",
        "nope",
        "KILL",
    ]);
    assert_eq!(code, 1);
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container does not exist");
    assert!(last["time"].as_str().unwrap().ends_with('Z'));

    let (code, out, _) = rt.out(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tegmen version "), "{out}");
    let features: serde_json::Value = serde_json::from_str(&rt.ok(&["features"])).unwrap();
    assert_eq!(features["linux"]["cgroup"]["v2"], true);
    assert_eq!(features["annotations"]["io.github.tegmen.network"], "tcfilter");
    let specdir = rt.root.root().join("spec");
    std::fs::create_dir_all(&specdir).unwrap();
    rt.ok(&["spec", "--bundle", specdir.to_str().unwrap()]);
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(specdir.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["process"]["args"], serde_json::json!(["sh"]));
    let (code, _, e) = rt.out(&["spec", "--bundle", specdir.to_str().unwrap()]);
    assert_eq!((code, e.trim()), (1, "File config.json exists. Remove it first"));
    rt.root.assert_nothing_left();
}

/// The error a runc-like runtime reported: its exit status and message,
/// the last `msg="…"` of runc's log lines on stderr, or the last line of
/// tegmen's; the program's path (argv[0], in usage errors) is read as
/// `<runtime>`, and runc's name in a message as tegmen's.
fn reported_text(code: i32, err: &str, runc: bool, program: &Path) -> (i32, String) {
    if code == 0 {
        return (0, String::new());
    }
    let err = err.replace(program.to_str().unwrap(), "<runtime>");
    let msg = if runc {
        err.lines()
            .rev()
            .find_map(|l| {
                l.split_once(" msg=\"")
                    .map(|(_, m)| m.strip_suffix('"').unwrap_or(m).to_string())
            })
            .map(|m| m.replace("\\\"", "\"").replace("\\n", "\n").trim().to_string())
            .unwrap_or_default()
            .replacen("runc", "tegmen", 1)
    } else {
        err.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    (code, msg)
}

/// Exit codes and error texts of every command for an unknown id, a
/// container in the wrong state, a bad bundle and bad flags and arguments,
/// side by side with runc's (run here, on the same bundles): the table
/// lists every difference.
#[test]
fn errors_as_runc_reports_them() {
    let rt = Rt::new("rt-errs");
    let runc_root = rt.root.root().join("runc");
    /// runc's containers go even when the test fails.
    struct RuncGone(PathBuf);
    impl Drop for RuncGone {
        fn drop(&mut self) {
            for id in ["w", "missing"] {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&self.0)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }
    let _runc_gone = RuncGone(runc_root.clone());
    // stderr goes to a file: a created container's init (runc's) or
    // monitor (ours) keeps the stdio `create` was given.
    let err_file = rt.root.root().join("stderr");
    let status_and_err = |mut cmd: Command| {
        let f = std::fs::File::create(&err_file).unwrap();
        let status = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .status()
            .unwrap();
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&err_file).unwrap_or_default(),
        )
    };
    let runc = |args: &[&str]| {
        let mut c = Command::new(tegmen_tests::clients::tool("runc"));
        c.arg("--root").arg(&runc_root).args(args);
        let (code, err) = status_and_err(c);
        reported_text(code, &err, true, &tegmen_tests::clients::tool("runc"))
    };
    let tegmen = |args: &[&str]| {
        let (code, err) = status_and_err(rt.cmd(args));
        reported_text(code, &err, false, &rt.bin)
    };
    let mut differences = Vec::new();
    let mut compare = |args: &[&str]| {
        let theirs = runc(args);
        let ours = tegmen(args);
        if theirs != ours {
            differences.push(format!("{args:?}: runc {theirs:?}, tegmen {ours:?}"));
        }
    };
    let bundle = rt.bundle("sleep", &["sleep", "300"]);
    let empty = rt.root.root().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = rt.bundle("missing", &["no-such-program"]);
    let (b, e, m) = (Rt::b(&bundle), Rt::b(&empty), Rt::b(&missing));
    let table: Vec<Vec<&str>> = vec![
        // No such container.
        vec!["state", "nope"],
        vec!["start", "nope"],
        vec!["kill", "nope"],
        vec!["kill", "nope", "BOGUS"],
        vec!["delete", "nope"],
        vec!["pause", "nope"],
        vec!["resume", "nope"],
        vec!["ps", "nope"],
        vec!["events", "nope"],
        vec!["exec", "nope", "true"],
        // Bad bundles and ids.
        vec!["create", "--bundle", e, "x"],
        vec!["run", "--bundle", e, "x"],
        vec!["create", "--bundle", b, "a/b"],
        vec!["create", "--bundle", b, ".."],
        // Bad flags and arguments.
        vec!["create", "--bogus-flag", "x"],
        vec!["kill", "--bogus", "nope"],
        vec!["bogus-command"],
        vec!["state"],
        vec!["delete"],
        vec!["kill"],
        vec!["kill", "a", "b", "c"],
        vec!["start", "a", "b"],
        vec!["exec"],
        vec!["ps"],
        vec!["list", "extra"],
        vec!["list", "--format", "bogus"],
    ];
    for args in &table {
        compare(args);
    }
    // A program that is not in the rootfs: podman maps this text to 127.
    compare(&["create", "--bundle", m, "missing"]);
    let _ = (
        runc(&["delete", "--force", "missing"]),
        tegmen(&["delete", "--force", "missing"]),
    );

    // One container through its states, in both runtimes.
    let steps: Vec<Vec<&str>> = vec![
        vec!["create", "--bundle", b, "w"],
        vec!["create", "--bundle", b, "w"],
        vec!["resume", "w"],
        vec!["start", "w"],
        vec!["start", "w"],
        vec!["delete", "w"],
        vec!["resume", "w"],
        vec!["kill", "w", "BOGUS"],
        vec!["kill", "w", "KILL"],
    ];
    for args in &steps {
        compare(args);
    }
    let wait_stopped = |state: &dyn Fn() -> std::process::Output| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !String::from_utf8_lossy(&state().stdout).contains("\"stopped\"") {
            assert!(Instant::now() < deadline, "w never stopped");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let runc_state = || {
        Command::new(tegmen_tests::clients::tool("runc"))
            .arg("--root")
            .arg(&runc_root)
            .args(["state", "w"])
            .output()
            .unwrap()
    };
    wait_stopped(&runc_state);
    wait_stopped(&|| rt.cmd(&["state", "w"]).output().unwrap());
    for args in [
        &["start", "w"][..],
        &["kill", "w"],
        &["pause", "w"],
        &["resume", "w"],
        &["exec", "w", "true"],
        &["delete", "w"],
        &["delete", "w"],
    ] {
        compare(args);
    }
    assert!(
        differences.is_empty(),
        "differences from runc:\n{}",
        differences.join("\n")
    );
    rt.root.assert_nothing_left();
}

/// No flags at all: the state lives in /run/tegmen (podman calls `state`
/// that way).
#[test]
fn default_root() {
    let rt = Rt::new("rt-default");
    let id = format!("e2e-default-{}", std::process::id());
    let bundle = rt.bundle("d", &["sh", "-c", "echo default"]);
    /// Removes the container from /run/tegmen even if the test fails.
    struct Guard<'a>(&'a Path, &'a str);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0).args(["delete", "--force", self.1]).output();
        }
    }
    let _guard = Guard(&rt.bin, &id);
    let tegmen = |args: &[&str]| Command::new(&rt.bin).args(args).stdin(Stdio::null()).output().unwrap();
    let status = Command::new(&rt.bin)
        .args(["run", "-d", "--bundle", Rt::b(&bundle), &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let dir = Path::new("/run/tegmen/sandboxes").join(&id);
    assert!(dir.join("container.json").exists(), "state under /run/tegmen");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = tegmen(&["state", &id]);
        assert!(o.status.success());
        let state: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if state["status"] == "stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tegmen(&["delete", &id]).status.success());
    assert!(!dir.exists());
    let left = processes_mentioning(&dir);
    assert!(left.is_empty(), "{left:?}");
    assert!(tegmen_tests::mounts_below(&dir).is_empty());
}

/// The VM's monitor process (QEMU, or `tegmen-vmm` on the builtin
/// backend) SIGKILLed mid-container: stopped, and delete leaves nothing.
#[test]
fn killed_vm() {
    let rt = Rt::new("rt-vm");
    let bundle = rt.bundle("vm", &["sleep", "1000"]);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "vm"]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rt.root.config.sandboxes_dir().join("vm/state.json")).unwrap()).unwrap();
    let monitor = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "qemu" || p["name"] == "tegmen-vmm")
        .unwrap_or_else(|| panic!("no monitor recorded: {state}"));
    eprintln!("killed_vm: SIGKILL to {} {}", monitor["name"], monitor["pid"]);
    let monitor = monitor["pid"].as_i64().unwrap() as i32;
    let cgroups = tegmen_tests::host_cgroup::recorded(&rt.root.config.sandboxes_dir().join("vm"));
    assert!(!cgroups.is_empty() && cgroups.iter().all(|d| d.exists()), "{cgroups:?}");
    // SAFETY: kill sends a signal to a monitor this test started.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    rt.wait_status("vm", "stopped");
    rt.ok(&["delete", "vm"]);
    rt.root.assert_nothing_left();
    let left: Vec<_> = cgroups.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "host cgroups left: {left:?}");
}

/// A host bind mount reaches the container at the spec's destination; a
/// read-only rootfs stays read-only; the VM is sized from the resources.
#[test]
fn binds_readonly_and_sizing() {
    let rt = Rt::new("rt-binds");
    let data = rt.root.root().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("file"), "from the host\n").unwrap();
    let hosts = rt.root.root().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 box\n").unwrap();
    let script = "cat /data/file; cat /etc/hosts; echo new > /data/out; touch /x 2>/dev/null || echo ro; nproc; \
                  grep MemTotal /proc/meminfo";
    let mut s = runc_like_spec(&["sh", "-c", script], false);
    s["root"]["readonly"] = true.into();
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts
        .push(serde_json::json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}));
    mounts.push(
        serde_json::json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]}),
    );
    s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 512u64 << 20});
    s["linux"]["resources"]["cpu"] = serde_json::json!({"quota": 200000, "period": 100000});
    let bundle = rt.bundle_with("binds", s);
    let (code, out, err) = rt.out(&["run", "--bundle", Rt::b(&bundle), "binds"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], ["from the host", "127.0.0.1 box", "ro", "2"], "{out}");
    let kib: u64 = lines[4].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        kib > 512 * 1024 && kib <= (512 + 128) * 1024,
        "guest memory {kib} KiB: {out}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("out")).unwrap(),
        "new\n",
        "written through the bind"
    );
    rt.root.assert_nothing_left();
}

/// Every entry below `rootfs`: (path, type, mode, device number, link
/// target), to compare what two runtimes left in a rootfs.
fn rootfs_listing(rootfs: &Path) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let t = meta.file_type();
            let kind = if t.is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if t.is_dir() {
                "dir".to_string()
            } else if t.is_char_device() || t.is_block_device() {
                format!("dev {:x}", meta.rdev())
            } else {
                format!("file {}", meta.len())
            };
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            out.push(format!("{rel} {kind} {:o}", meta.mode() & 0o7777));
            if t.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(rootfs, rootfs, &mut out);
    out.sort();
    out
}

/// A read-only rootfs whose spec mounts nothing on `/dev`, without `/dev`
/// and without the directory of one of its mount points: it runs as under
/// runc, which makes the device nodes, links and mount points in the
/// rootfs before it makes it read-only, and the rootfs on the host then
/// holds exactly what runc leaves in the same bundle (run here too). A
/// writable rootfs without a `/dev` mount runs twice (the second time its
/// `/dev` holds the nodes of the first).
#[test]
fn rootfs_without_dev_mount_as_runc() {
    let rt = Rt::new("rt-nodev");
    let script = "test -c /dev/null && echo x > /dev/null && echo null-ok; readlink /dev/fd; \
                  touch /x 2>/dev/null || echo rootfs-ro; touch /dev/y 2>/dev/null || echo dev-ro; \
                  test -d /data && echo data-ok";
    let mut s = runc_like_spec(&["sh", "-c", script], false);
    s["root"]["readonly"] = true.into();
    let mut mounts: Vec<serde_json::Value> = s["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["destination"] == "/proc")
        .cloned()
        .collect();
    mounts.push(serde_json::json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}));
    s["mounts"] = mounts.into();
    let ours = rt.bundle_with("nodev", s.clone());
    let theirs = rt.bundle_with("nodev-runc", s.clone());
    for b in [&ours, &theirs] {
        std::fs::remove_dir(b.join("rootfs/dev")).unwrap();
    }
    let want = "null-ok\n/proc/self/fd\nrootfs-ro\ndev-ro\ndata-ok\n";
    let (code, out, err) = rt.out(&["run", "--bundle", Rt::b(&ours), "nodev"]);
    assert_eq!((code, out.as_str()), (0, want), "tegmen run: {err}");
    let runc = Command::new(tegmen_tests::clients::tool("runc"))
        .arg("--root")
        .arg(rt.root.root().join("runc"))
        .args([
            "run",
            "--bundle",
            Rt::b(&theirs),
            &format!("tegmen-e2e-nodev-{}", std::process::id()),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (code, out, err) = tegmen_tests::clients::text(&runc);
    assert_eq!((code, out.as_str()), (0, want), "runc run: {err}");
    assert_eq!(
        rootfs_listing(&ours.join("rootfs")),
        rootfs_listing(&theirs.join("rootfs")),
        "the rootfs holds what runc leaves"
    );

    let mut s = runc_like_spec(&["sh", "-c", "test -c /dev/null && readlink /dev/stdout"], false);
    let mounts: Vec<serde_json::Value> = s["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["destination"] == "/proc")
        .cloned()
        .collect();
    s["mounts"] = mounts.into();
    let rw = rt.bundle_with("nodev-rw", s);
    for run in ["first", "second"] {
        let (code, out, err) = rt.out(&["run", "--bundle", Rt::b(&rw), "nodev-rw"]);
        assert_eq!((code, out.as_str()), (0, "/proc/self/fd/1\n"), "{run} run: {err}");
    }
    rt.root.assert_nothing_left();
}

/// `--console-socket`: the pty master arrives over the socket as runc
/// sends it; input, output and window sizes reach the guest's terminal.
#[test]
fn console_socket_terminal() {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixListener;

    let rt = Rt::new("rt-tty");
    let bundle = rt.bundle_with(
        "tty",
        runc_like_spec(&["sh", "-c", "stty size; tty; read x; echo got $x; stty size"], true),
    );
    let sock = rt.root.root().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut create = rt
        .cmd(&[
            "create",
            "--bundle",
            Rt::b(&bundle),
            "--console-socket",
            sock.to_str().unwrap(),
            "tty",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // containerd's shim reads `create`'s output to EOF before it takes the
    // master (go-runc's cmdOutput): nothing of the container may hold it.
    let (out_r, err_r) = (create.stdout.take().unwrap(), create.stderr.take().unwrap());
    let (eof_tx, eof_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (out, err) = (read_all_in_thread(out_r), read_all_in_thread(err_r));
        let _ = eof_tx.send((out.join().unwrap(), err.join().unwrap()));
    });
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(f) = c {
            fds.extend(f);
        }
    }
    assert_eq!(fds.len(), 1, "one descriptor in one message");
    // SAFETY: the descriptor just arrived with SCM_RIGHTS and is ours.
    let master = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    assert!(create.wait().unwrap().success());
    let (out, err) = eof_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("create's stdout and stderr reach EOF when it exits, before start");
    assert_eq!(out, "", "create prints nothing: {err}");
    let master_fd = master.as_raw_fd();
    let set_size = |rows: u16, cols: u16| {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the struct we pass.
        assert_eq!(unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &ws) }, 0);
    };
    set_size(33, 99);
    std::thread::sleep(Duration::from_millis(500));
    let mut writer = std::fs::File::from(master.try_clone().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut b = [0u8; 256];
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rt.ok(&["start", "tty"]);
    let mut seen = String::new();
    let mut wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {what:?} on the terminal: {seen:?}"),
            }
        }
        seen.clone()
    };
    let first = wait_for("/dev/pts/");
    assert!(first.contains("33 99"), "{first:?}");
    set_size(44, 111);
    std::thread::sleep(Duration::from_millis(500));
    writer.write_all(b"hi\n").unwrap();
    let all = wait_for("44 111");
    assert!(all.contains("got hi"), "{all:?}");
    rt.wait_status("tty", "stopped");
    rt.ok(&["delete", "tty"]);
    rt.root.assert_nothing_left();
}

/// SIGTERM sent to the monitor (the pid-file pid, as some callers signal
/// it) and to an attached `run` reaches the container's init.
#[test]
fn signals_reach_the_container() {
    let rt = Rt::new("rt-sig");
    let script = "trap 'echo got TERM; exit 5' TERM; echo up; while :; do sleep 0.1; done";

    let bundle = rt.bundle("det", &["sh", "-c", script]);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "det"]);
    let monitor = rt.state("det")["pid"].as_i64().unwrap() as i32;
    // Give the shell time to install its trap.
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill sends a signal to the monitor this test started.
    unsafe { libc::kill(monitor, libc::SIGTERM) };
    rt.wait_status("det", "stopped");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rt.root.config.sandboxes_dir().join("det/container.json")).unwrap())
            .unwrap();
    assert_eq!(rec["exit_code"], 5, "the trap ran: {rec}");
    rt.ok(&["delete", "det"]);

    let bundle = rt.bundle("att", &["sh", "-c", script]);
    let mut run = rt
        .cmd(&["run", "--bundle", Rt::b(&bundle), "att"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = run.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"up\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "output ended: {seen:?}");
        seen.push(byte[0]);
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill sends a signal to the `tegmen run` this test started.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let rest = read_all_in_thread(stdout);
    assert_eq!(run.wait().unwrap().code(), Some(5));
    assert_eq!(rest.join().unwrap(), "got TERM\n");
    rt.root.assert_nothing_left();
}

/// `events --stats` prints one runc-shaped stats event; `events --interval`
/// streams stats and reports an OOM kill in the container, and ends by
/// itself when the container stops; stopped and unknown containers are
/// refused with runc's words.
#[test]
fn events_stats_and_oom() {
    let rt = Rt::new("rt-events");
    let mut spec = runc_like_spec(&["sh", "-c", "echo up; while :; do sleep 1; done"], false);
    spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": 32 << 20, "swap": 32 << 20});
    let bundle = rt.bundle_with("ev", spec);
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "ev"]);

    let one: serde_json::Value = serde_json::from_str(&rt.ok(&["events", "--stats", "ev"])).expect("one JSON event");
    assert_eq!(one["type"], "stats", "{one}");
    assert_eq!(one["id"], "ev", "{one}");
    assert_eq!(one["data"]["memory"]["usage"]["limit"], 32 << 20, "{one}");
    assert!(one["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{one}");
    assert!(one["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{one}");
    assert!(one["data"]["cpu"]["usage"]["total"].as_u64().is_some(), "{one}");

    let mut stream = rt
        .cmd(&["events", "--interval", "300ms", "ev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let out = stream.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("each line is one JSON event");
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let next = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no {what} event from `tegmen events`"),
            }
        }
    };
    next("stats", &|v| v["type"] == "stats");
    next("second stats", &|v| v["type"] == "stats");

    // An exec that allocates without bound: the guest kernel OOM-kills it.
    let (code, _, err) = rt.out(&["exec", "ev", "tail", "/dev/zero"]);
    assert_eq!(code, 137, "the hog was OOM-killed: {err}");
    let oom = next("oom", &|v| v["type"] == "oom");
    assert_eq!(oom["id"], "ev");
    let after = next("stats after the OOM kill", &|v| v["type"] == "stats");
    assert!(
        after["data"]["memory"]["usage"]["failcnt"].as_u64().unwrap() >= 1,
        "{after}"
    );

    rt.ok(&["kill", "ev", "KILL"]);
    let status = tegmen_tests::wait_child(&mut stream, Duration::from_secs(30));
    assert_eq!(status, Some(0), "events ends with the container");
    reader.join().unwrap();

    let (code, _, e) = rt.out(&["events", "ev"]);
    assert_eq!((code, e.trim()), (1, "container with id ev is not running"));
    let (code, _, e) = rt.out(&["events", "--stats", "nope"]);
    assert_eq!((code, e.trim()), (1, "container does not exist"));
    rt.ok(&["delete", "ev"]);
    rt.root.assert_nothing_left();
}

/// The runtime-namespace hooks run on the host with the OCI state on
/// stdin (prestart and createRuntime at create, poststart after start,
/// poststop at delete); the container-namespace ones run in the guest
/// (startContainer, in the container before its process); a failing
/// createRuntime hook fails create with runc's words and leaves nothing.
#[test]
fn hooks_host_and_guest() {
    let rt = Rt::new("rt-hooks");
    let dir = rt.root.root().join("hooks-out");
    std::fs::create_dir_all(&dir).unwrap();
    let host_hook = |phase: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/{phase}.json", dir.display())]});
    let mut spec = runc_like_spec(&["sh", "-c", "cat /tmp/start-hook"], false);
    spec["root"]["readonly"] = false.into();
    spec["hooks"] = serde_json::json!({
        "prestart": [host_hook("prestart")],
        "createRuntime": [host_hook("createRuntime")],
        "poststart": [host_hook("poststart")],
        "poststop": [host_hook("poststop")],
        // In the guest. createContainer runs before pivot_root, so its path
        // is the guest's: the container's rootfs is on the share there.
        "createContainer": [{"path": "/run/tegmen/shared/hk/rootfs/bin/busybox",
                             "args": ["sh", "-c", "echo create hook > /run/tegmen/shared/hk/rootfs/tmp/start-hook"]}],
        // startContainer runs in the container: its /tmp, its busybox.
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo \"start hook in $(hostname)\" >> /tmp/start-hook"]}],
    });
    let bundle = rt.bundle_with("hk", spec);
    let read = |phase: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join(format!("{phase}.json"))).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{phase} hook got {text:?}: {e}")))
    };

    let out_path = rt.root.root().join("hk.out");
    let pid_file = rt.root.root().join("hk.pid");
    let status = rt
        .cmd(&[
            "create",
            "--bundle",
            Rt::b(&bundle),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "hk",
        ])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i64 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    for phase in ["prestart", "createRuntime"] {
        let s = read(phase).unwrap_or_else(|| panic!("{phase} hook did not run on the host"));
        assert_eq!(s["status"], "creating", "{phase}: {s}");
        assert_eq!(s["id"], "hk", "{phase}: {s}");
        assert_eq!(s["pid"], pid, "{phase}: {s}");
        assert_eq!(s["bundle"], Rt::b(&bundle), "{phase}: {s}");
    }
    assert!(read("poststart").is_none(), "poststart ran before start");

    rt.ok(&["start", "hk"]);
    let s = read("poststart").expect("poststart hook ran");
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("running"), Some(pid)),
        "{s}"
    );
    rt.wait_status("hk", "stopped");
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(
        out, "create hook\nstart hook in runc\n",
        "the createContainer and startContainer hooks ran in the container"
    );
    assert!(read("poststop").is_none(), "poststop ran before delete");
    rt.ok(&["delete", "hk"]);
    let s = read("poststop").expect("poststop hook ran");
    assert_eq!(s["status"], "stopped", "{s}");
    rt.root.assert_nothing_left();

    // A failing createRuntime hook fails create; a hook the spec gets
    // wrong is refused before any VM boots. Nothing is left either way.
    let cases = [
        (
            serde_json::json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "echo boom >&2; exit 3"]}]}),
            "error running hook #0: error running hook: exit status 3, stdout: , stderr: boom",
        ),
        (
            serde_json::json!({"poststart": [{"path": "relative/hook"}]}),
            "\"hooks.poststart[0].path\" must be an absolute path",
        ),
    ];
    for (i, (hooks, want)) in cases.into_iter().enumerate() {
        let mut spec = runc_like_spec(&["true"], false);
        spec["hooks"] = hooks;
        let id = format!("bad{i}");
        let bundle = rt.bundle_with(&id, spec);
        let (code, _, e) = rt.out(&["create", "--bundle", Rt::b(&bundle), &id]);
        assert_eq!(code, 1, "{e}");
        assert!(e.contains(want), "{e}");
        rt.root.assert_nothing_left();
    }
}

/// 20 containers created and deleted one after another (half of them
/// started and force-deleted while running) leave no process, mount,
/// socket or directory behind.
#[test]
fn twenty_in_a_row_leave_nothing() {
    let rt = Rt::new("rt-loop");
    let bundle = rt.bundle("loop", &["sleep", "300"]);
    for i in 0..20 {
        let id = format!("loop{i}");
        if i % 2 == 0 {
            // The monitor keeps create's stdio: nothing may wait for its EOF.
            rt.ok_detached(&["create", "--bundle", Rt::b(&bundle), &id]);
            assert_eq!(rt.status(&id), "created");
            rt.ok(&["delete", &id]);
        } else {
            rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), &id]);
            assert_eq!(rt.status(&id), "running");
            rt.ok(&["delete", "--force", &id]);
        }
        assert_eq!(rt.ok(&["list", "-q"]).trim(), "", "after {id}");
    }
    rt.root.assert_nothing_left();
    let left: Vec<_> = std::fs::read_dir(rt.root.config.sandboxes_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// kill -9 of one Tegmen process at a random moment (the `tegmen run -d`
/// call itself, the monitor, QEMU or a device backend), or a forced delete
/// while the call is still at work, for 25 containers in a row: `tegmen
/// delete --force` answers 0, and when it has, nothing of the container is
/// left (processes, mounts, its directory). The seed is printed;
/// `TEGMEN_KILL_SEED` replays a run.
#[test]
fn kill_nine_at_random_then_force_delete() {
    let rt = Rt::new("rt-kill9");
    let bundle = rt.bundle("k9", &["sleep", "300"]);
    let seed: u64 = std::env::var("TEGMEN_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill -9 loop: TEGMEN_KILL_SEED={seed}");
    let mut rng = seed | 1;
    let mut below = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    const KINDS: [&str; 5] = [
        "the tegmen call",
        "the monitor",
        "QEMU",
        "a backend",
        "nothing (delete at once)",
    ];
    let root = rt.root.root().to_path_buf();
    for i in 0..25 {
        let id = format!("k{i}");
        let kind = i % KINDS.len();
        let delay = Duration::from_millis(below(6000));
        let dir = rt.root.config.sandboxes_dir().join(&id);
        let mut call = rt
            .cmd(&["run", "-d", "--bundle", Rt::b(&bundle), &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let what = format!("{id}: kill -9 of {} after {delay:?}", KINDS[kind]);
        loop {
            let running = call.try_wait().unwrap().is_none();
            let mentioning = |p: &Path, pat: &str| {
                processes_mentioning(p)
                    .into_iter()
                    .find(|(_, cmd)| cmd.contains(pat))
                    .map(|(pid, _)| pid)
            };
            let victim = match kind {
                0 => running.then_some(call.id() as i32),
                1 => mentioning(&root, &format!(" monitor {id}")),
                2 => mentioning(&dir, "qemu-system"),
                3 => mentioning(&dir, "-backend"),
                _ => None,
            };
            let due = start.elapsed() >= delay;
            if due && kind == 4 && (dir.exists() || !running) {
                break;
            }
            if let (true, Some(pid)) = (due, victim) {
                // SAFETY: kill() sends a signal to a process of this test's.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            if start.elapsed() > Duration::from_secs(60) || (kind == 0 && !running) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if kind != 4 {
            // The call ends by itself (done, or failing on what was killed).
            let _ = tegmen_tests::wait_child(&mut call, Duration::from_secs(120));
        }
        let (code, _, err) = rt.out(&["delete", "--force", &id]);
        assert_eq!(code, 0, "{what}: delete --force: {err}");
        let _ = tegmen_tests::wait_child(&mut call, Duration::from_secs(120));
        let procs: Vec<_> = processes_mentioning(&dir)
            .into_iter()
            .chain(
                processes_mentioning(&root)
                    .into_iter()
                    .filter(|(_, c)| c.contains(&format!(" monitor {id}"))),
            )
            .collect();
        let mounts = tegmen_tests::mounts_below(&dir);
        assert!(
            procs.is_empty() && mounts.is_empty() && !dir.exists(),
            "{what}: delete --force said 0, but left processes {procs:?}, mounts {mounts:?}, directory present: {}",
            dir.exists()
        );
    }
    rt.root.assert_nothing_left();
}

/// `linux.cgroupsPath` on the host, as runc makes it: the VM's processes
/// and the monitor (the container's pid) and exec's monitors are in it, in
/// every hierarchy; CPU limits as given, memory for the whole VM, pids
/// never below what the VM needs; the systemd form with
/// `--systemd-cgroup`; bad paths and limits refused with nothing left;
/// gone after delete.
#[test]
fn host_cgroups_hold_the_vm() {
    use tegmen_tests::host_cgroup::{self as cg, dir, procs, read};
    let rt = Rt::new("rt-cgroup");
    let scratch = cg::Scratch(format!("/tegmen-e2e-{}", std::process::id()));
    let slice = cg::Scratch(format!("/tegmen.slice/tegmen-e2e{}.slice", std::process::id()));
    let parent = scratch.0.clone();
    let path = format!("{parent}/c1");
    let mut s = runc_like_spec(&["sleep", "1000"], false);
    s["linux"]["cgroupsPath"] = path.clone().into();
    s["linux"]["resources"] = serde_json::json!({
        "cpu": {"shares": 512, "quota": 150000, "period": 100000},
        "memory": {"limit": 64u64 << 20},
        "pids": {"limit": 5}
    });
    let bundle = rt.bundle_with("c1", s.clone());
    rt.ok_detached(&["run", "-d", "--bundle", Rt::b(&bundle), "c1"]);
    let monitor = rt.state("c1")["pid"].as_i64().unwrap() as i32;
    let vm = cg::vm_pids(&rt.root.config.sandboxes_dir().join("c1"));
    assert_eq!(vm.len(), 3, "QEMU and two backends: {vm:?}");
    for controller in ["memory", "cpu", "pids", "cpuset", "systemd"] {
        let inside = procs(controller, &path);
        for pid in vm.iter().chain([&monitor]) {
            assert!(inside.contains(pid), "{controller}: {pid} not in {inside:?}");
        }
    }
    assert_eq!(
        read("cpu", &path, "cpu.shares", "cpu.weight"),
        if cg::pure_v2() { "20" } else { "512" }
    );
    if !cg::pure_v2() {
        assert_eq!(read("cpu", &path, "cpu.cfs_quota_us", "cpu.max"), "150000");
    }
    // 64 MiB for the container: a VM of 256 MiB (the default floor) plus
    // 256 MiB for its host processes.
    let memory: u64 = read("memory", &path, "memory.limit_in_bytes", "memory.max")
        .parse()
        .unwrap();
    assert_eq!(memory, 512 << 20);
    let pids_max: u64 = read("pids", &path, "pids.max", "pids.max").parse().unwrap();
    let pids_now: u64 = read("pids", &path, "pids.current", "pids.current").parse().unwrap();
    assert_eq!(pids_max, 128 + 8 * 2, "5 asked, the VM's floor given (2 vCPUs)");
    assert!(pids_now * 2 < pids_max, "{pids_now} threads of {pids_max}");
    // The container itself is limited in the guest.
    let (code, out, err) = rt.out(&[
        "exec",
        "c1",
        "cat",
        "/sys/fs/cgroup/pids.max",
        "/sys/fs/cgroup/memory.max",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["5", &(64u64 << 20).to_string()]
    );
    // An exec's monitor joins the container's cgroup, as runc's exec does.
    rt.ok_detached(&[
        "exec",
        "-d",
        "--pid-file",
        rt.root.root().join("exec.pid").to_str().unwrap(),
        "c1",
        "sleep",
        "100",
    ]);
    let exec_pid: i32 = std::fs::read_to_string(rt.root.root().join("exec.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(procs("memory", &path).contains(&exec_pid));
    // `update` reaches the host cgroup too (the VM keeps its memory).
    rt.ok(&[
        "update",
        "--cpu-quota",
        "50000",
        "--pids-limit",
        "2000",
        "--memory",
        "32M",
        "c1",
    ]);
    if !cg::pure_v2() {
        assert_eq!(read("cpu", &path, "cpu.cfs_quota_us", "cpu.max"), "50000");
    }
    assert_eq!(read("pids", &path, "pids.max", "pids.max"), "2000");
    let memory: u64 = read("memory", &path, "memory.limit_in_bytes", "memory.max")
        .parse()
        .unwrap();
    assert_eq!(memory, 512 << 20, "the VM's memory bound stays");
    rt.ok(&["delete", "--force", "c1"]);
    assert!(
        !dir("memory", &path).exists() && cg::gone_everywhere(&path),
        "{path} left"
    );
    rt.root.assert_nothing_left();

    // The systemd form, laid out as systemd would.
    let mut sd = s.clone();
    sd["linux"]["cgroupsPath"] = format!("tegmen-e2e{}.slice:tegmen:c2", std::process::id()).into();
    sd["linux"]["resources"] = serde_json::Value::Null;
    let bundle = rt.bundle_with("c2", sd);
    let sd_path = format!("/tegmen.slice/tegmen-e2e{}.slice/tegmen-c2.scope", std::process::id());
    rt.ok_detached(&["--systemd-cgroup", "run", "-d", "--bundle", Rt::b(&bundle), "c2"]);
    let monitor = rt.state("c2")["pid"].as_i64().unwrap() as i32;
    assert!(procs("memory", &sd_path).contains(&monitor), "{sd_path}");
    rt.ok(&["delete", "--force", "c2"]);
    assert!(cg::gone_everywhere(&sd_path));
    drop(slice);
    // The systemd form's top slice, if this test made it (empty: removable).
    for d in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(d.path().join("tegmen.slice"));
    }

    // Bad input: named, and nothing made.
    let mut bad = s.clone();
    bad["linux"]["cgroupsPath"] = format!("{parent}/../escape").into();
    let bundle = rt.bundle_with("bad1", bad);
    let (code, _, err) = rt.out(&["run", "--bundle", Rt::b(&bundle), "bad1"]);
    assert_eq!(code, 1);
    assert!(err.contains("cgroupsPath") && err.contains(".."), "{err}");
    let mut bad = s.clone();
    bad["linux"]["cgroupsPath"] = format!("{parent}/bad2").into();
    bad["linux"]["resources"]["cpu"]["period"] = 10.into();
    let bundle = rt.bundle_with("bad2", bad);
    let (code, _, err) = rt.out(&["run", "--bundle", Rt::b(&bundle), "bad2"]);
    assert_eq!(code, 1);
    assert!(err.contains("cpu.cfs_period_us") || err.contains("cpu.max"), "{err}");
    assert!(cg::gone_everywhere(&format!("{parent}/bad2")));
    let (code, _, err) = rt.out(&["--systemd-cgroup", "run", "--bundle", Rt::b(&bundle), "bad3"]);
    assert_eq!(code, 1);
    assert!(err.contains("slice:prefix:name"), "{err}");
    rt.root.assert_nothing_left();
    drop(scratch);
    assert!(cg::gone_everywhere(&parent));
}
