//! Host integration tests of the agent's container layer (`src/container/`),
//! with real containers made from a busybox rootfs.
//!
//! The file is its own test harness (`harness = false`): the container
//! layer wants a process like the agent — SIGCHLD blocked in every thread,
//! one reaper thread collecting every child, cgroup v2 at /sys/fs/cgroup —
//! and `main` makes this process so before any thread exists. On a host
//! whose /sys/fs/cgroup is not cgroup2 (a hybrid v1/v2 host has it at
//! /sys/fs/cgroup/unified), `main` first moves into a private mount
//! namespace and mounts cgroup2 on /sys/fs/cgroup there; nothing of the
//! host's mounts changes. It needs root; without root every test is skipped.
//!
//! Tests that need a cgroup v2 controller the host does not give to v2
//! (memory, on a hybrid host) are skipped with the reason printed; in the
//! guest, where all controllers are v2, they run.
//!
//! Arguments that do not start with `-` filter the tests by name.

#![allow(dead_code)]

#[path = "../src/container/mod.rs"]
mod container;
#[path = "../src/reaper.rs"]
mod reaper;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use container::{ContainerError, ContainerManager, Event, Status, StdioStream};
use serde_json::{json, Value};

struct Env {
    mgr: Arc<ContainerManager>,
    rootfs: PathBuf,
    state_root: PathBuf,
    events: Arc<(Mutex<Vec<Event>>, Condvar)>,
    memory_controller: bool,
    _tmp: tempfile::TempDir,
}

type TestFn = fn(&Env) -> Result<(), String>;

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

macro_rules! ok {
    ($e:expr) => {
        $e.map_err(|e| format!("{}:{}: {}: {e}", file!(), line!(), stringify!($e)))?
    };
}

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let tests: &[(&str, TestFn)] = &[
        ("exit_codes_and_exit_events", exit_codes_and_exit_events),
        ("signal_reaches_a_trap", signal_reaches_a_trap),
        ("stdout_and_stderr_in_order", stdout_and_stderr_in_order),
        ("output_kept_after_exit", output_kept_after_exit),
        ("stdin_piped_and_closed", stdin_piped_and_closed),
        ("terminal_and_resize", terminal_and_resize),
        ("exec_into_running_container", exec_into_running_container),
        ("pause_and_resume", pause_and_resume),
        ("oom_kill_reported", oom_kill_reported),
        ("stats_move", stats_move),
        ("readonly_rootfs_and_masked_paths", readonly_rootfs_and_masked_paths),
        ("identity_env_cwd_hostname", identity_env_cwd_hostname),
        ("seccomp_and_oom_score_adj", seccomp_and_oom_score_adj),
        (
            "invalid_specs_and_missing_executable",
            invalid_specs_and_missing_executable,
        ),
        ("wrong_states_and_unknown_ids", wrong_states_and_unknown_ids),
        ("remove_leaves_nothing", remove_leaves_nothing),
        ("parallel_containers", parallel_containers),
        ("agent_process_unchanged", agent_process_unchanged),
    ];
    let selected: Vec<&(&str, TestFn)> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("container tests need root: {} skipped", selected.len());
        println!("test result: ok. 0 passed; 0 failed; {} ignored", selected.len());
        return;
    }
    let env = match setup() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("container tests: setup failed: {e}");
            std::process::exit(1);
        }
    };
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in selected {
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&env))).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", start.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!(
                    "test {name} ... FAILED ({:.1}s)\n    {e}",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    // Containers a failed test left behind.
    for id in env.mgr.list() {
        let _ = env.mgr.remove(&id, true);
    }
    let _ = std::fs::remove_dir("/sys/fs/cgroup/tegmen");
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; 0 ignored",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn setup() -> Result<Env, String> {
    ensure_cgroup2()?;
    reaper::block_sigchld().map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    let tmp = tempfile::Builder::new()
        .prefix("tegmen-ctr-test")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let rootfs = tmp.path().join("rootfs");
    build_rootfs(&rootfs)?;
    let state_root = tmp.path().join("state");
    let (tx, rx) = mpsc::channel();
    let mgr = Arc::new(ContainerManager::new(state_root.clone(), tx).map_err(|e| e.to_string())?);
    let m = mgr.clone();
    reaper::set_child_listener(Box::new(move |pid, status| m.child_exited(pid, status)));
    reaper::spawn(false).map_err(|e| e.to_string())?;
    let events = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
    let ev = events.clone();
    std::thread::spawn(move || {
        for e in rx {
            ev.0.lock().unwrap().push(e);
            ev.1.notify_all();
        }
    });
    let memory_controller = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == "memory");
    Ok(Env {
        mgr,
        rootfs,
        state_root,
        events,
        memory_controller,
        _tmp: tmp,
    })
}

/// Gives this process cgroup v2 at /sys/fs/cgroup: as it is, or mounted in
/// a private mount namespace (single-threaded still, so the namespace is
/// the whole process's).
fn ensure_cgroup2() -> Result<(), String> {
    if container::mount_private_cgroup2().map_err(|e| e.to_string())? {
        println!("cgroup2 mounted on /sys/fs/cgroup in a private mount namespace");
    }
    Ok(())
}

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "id", "hostname", "pwd", "env", "head", "tail", "dd", "kill", "ps",
    "stty", "seq", "wc", "touch", "mkdir", "grep", "ls", "tr", "uname", "test", "[", "md5sum", "yes",
];

fn build_rootfs(rootfs: &Path) -> Result<(), String> {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "home"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .map_err(|e| format!("copying /bin/busybox (Debian package busybox-static): {e}"))?;
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).map_err(|e| e.to_string())?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").map_err(|e| e.to_string())?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    Ok(())
}

/// The spec `runc spec` writes, running `args`, without a terminal.
fn spec(args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn process(args: &[&str]) -> Value {
    json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/bin:/bin"],
        "cwd": "/"
    })
}

fn uid(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A thread that reads `fd` to EOF (EIO, for a pty master, counts as EOF).
fn reader(fd: OwnedFd) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(fd);
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        out
    })
}

fn text(h: std::thread::JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
}

/// Creates and starts a container running `spec`; returns its id and the
/// readers of its stdout and stderr (its stdin is closed).
type Output = std::thread::JoinHandle<Vec<u8>>;

fn run(env: &Env, name: &str, spec: &Value) -> Result<(String, Output, Output), String> {
    let id = uid(name);
    ok!(env.mgr.create(&id, &spec.to_string(), &env.rootfs, false));
    ok!(env.mgr.close_stdin(&id, None));
    let out = reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stdout)));
    let err = reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stderr)));
    ok!(env.mgr.start(&id));
    Ok((id, out, err))
}

/// Runs `args` to the end; returns (exit code, stdout, stderr).
fn run_to_end(env: &Env, name: &str, spec: &Value) -> Result<(i32, String, String), String> {
    let (id, out, err) = run(env, name, spec)?;
    let exit = ok!(env.mgr.wait(&id, None));
    let (out, err) = (text(out), text(err));
    ok!(env.mgr.remove(&id, false));
    Ok((exit.exit_code, out, err))
}

fn wait_event(env: &Env, what: impl Fn(&Event) -> bool, timeout: Duration) -> Option<Event> {
    let (lock, cv) = &*env.events;
    let deadline = Instant::now() + timeout;
    let mut events = lock.lock().unwrap();
    loop {
        if let Some(e) = events.iter().find(|e| what(e)) {
            return Some(e.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        events = cv.wait_timeout(events, left).unwrap().0;
    }
}

fn exit_event(env: &Env, id: &str, exec_id: &str) -> Option<i32> {
    match wait_event(
        env,
        |e| matches!(e, Event::Exit { id: i, exec_id: x, .. } if i == id && x == exec_id),
        Duration::from_secs(10),
    ) {
        Some(Event::Exit { exit_code, .. }) => Some(exit_code),
        _ => None,
    }
}

fn sh(script: &str) -> Value {
    spec(&["sh", "-c", script])
}

// ---------------------------------------------------------------- tests

fn exit_codes_and_exit_events(env: &Env) -> Result<(), String> {
    // The init is pid 1 of its pid namespace, which the kernel protects
    // from its own signals: `kill -9 $$` (with `true` after it, so that sh
    // does not exec kill) is ignored there; without a pid namespace it
    // kills. 0 and 1 also when the program itself is the init.
    let no_pidns = |script: &str| {
        let mut s = sh(script);
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
        s
    };
    let cases = [
        (sh("exit 0"), 0),
        (sh("exit 1"), 1),
        (sh("exit 42"), 42),
        (spec(&["true"]), 0),
        (spec(&["false"]), 1),
        (sh("kill -9 $$; true"), 0),
        (no_pidns("kill -9 $$; true"), 137),
        (no_pidns("kill -15 $$; true"), 143),
    ];
    for (spec, want) in cases {
        let script = spec["process"]["args"].to_string();
        let (id, out, err) = run(env, "exit", &spec)?;
        let exit = ok!(env.mgr.wait(&id, None));
        check!(
            exit.exit_code == want,
            "{script:?}: exit code {} (want {want})",
            exit.exit_code
        );
        check!(
            exit_event(env, &id, "") == Some(want),
            "{script:?}: no Exit event with code {want}"
        );
        // wait again, after the exit: the same answer at once.
        let again = ok!(env.mgr.wait(&id, None));
        check!(again == exit, "second wait differs");
        check!(ok!(env.mgr.state(&id)).status == Status::Stopped, "not stopped");
        let _ = (text(out), text(err));
        ok!(env.mgr.remove(&id, false));
    }
    Ok(())
}

fn signal_reaches_a_trap(env: &Env) -> Result<(), String> {
    let (id, out, _err) = run(
        env,
        "trap",
        &sh("trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done"),
    )?;
    // The trap is set once "ready" is out: read stdout up to it.
    std::thread::sleep(Duration::from_millis(300));
    ok!(env.mgr.signal(&id, None, libc::SIGTERM, false));
    let exit = ok!(env.mgr.wait(&id, None));
    let out = text(out);
    check!(
        exit.exit_code == 3,
        "exit code {} (want 3), stdout {out:?}",
        exit.exit_code
    );
    check!(out == "ready\ngot TERM\n", "stdout {out:?}");
    // The init is gone: signalling it is a state error, as with runc.
    let e = env.mgr.signal(&id, None, libc::SIGTERM, false).unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    check!(e.to_string() == format!("container {id} is not running"), "{e}");
    ok!(env.mgr.remove(&id, false));

    // SIGKILL from outside: 137; a bad signal number is refused.
    let (id, _out, _err) = run(env, "kill", &sh("sleep 100"))?;
    let e = env.mgr.signal(&id, None, 0, false).unwrap_err();
    check!(matches!(e, ContainerError::InvalidArgument(_)), "{e:?}");
    ok!(env.mgr.signal(&id, None, libc::SIGKILL, false));
    check!(ok!(env.mgr.wait(&id, None)).exit_code == 137, "not 137");
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn stdout_and_stderr_in_order(env: &Env) -> Result<(), String> {
    // ~2.7 MB on stdout, then ~2 MB on stderr, then exit: both pipes fill
    // while the readers drain them; nothing may be lost or reordered.
    let (id, out, err) = run(env, "bigout", &sh("seq 1 400000; seq 1 300000 >&2; exit 5"))?;
    let exit = ok!(env.mgr.wait(&id, None));
    let (out, err) = (text(out), text(err));
    let want_out: String = (1..=400000).map(|i| format!("{i}\n")).collect();
    let want_err: String = (1..=300000).map(|i| format!("{i}\n")).collect();
    check!(exit.exit_code == 5, "exit code {}", exit.exit_code);
    check!(
        out.len() == want_out.len(),
        "stdout: {} bytes (want {})",
        out.len(),
        want_out.len()
    );
    check!(out == want_out, "stdout differs");
    check!(err == want_err, "stderr differs ({} bytes)", err.len());
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn output_kept_after_exit(env: &Env) -> Result<(), String> {
    // The streams are taken only after the process has exited and been
    // reaped: what it wrote waits in the pipes.
    let id = uid("late");
    ok!(env
        .mgr
        .create(&id, &sh("echo hello; echo oops >&2").to_string(), &env.rootfs, false));
    ok!(env.mgr.close_stdin(&id, None));
    ok!(env.mgr.start(&id));
    let exit = ok!(env.mgr.wait(&id, None));
    check!(exit.exit_code == 0, "exit {}", exit.exit_code);
    let out = text(reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stdout))));
    let err = text(reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stderr))));
    check!(out == "hello\n", "stdout {out:?}");
    check!(err == "oops\n", "stderr {err:?}");
    // Each stream is handed out once.
    let e = env.mgr.take_stdio(&id, None, StdioStream::Stdout).unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    let e = env.mgr.take_stdio(&id, None, StdioStream::Tty).unwrap_err();
    check!(matches!(e, ContainerError::InvalidArgument(_)), "{e:?}");
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn stdin_piped_and_closed(env: &Env) -> Result<(), String> {
    // 1 MiB through cat and back.
    let id = uid("cat");
    ok!(env.mgr.create(&id, &spec(&["cat"]).to_string(), &env.rootfs, false));
    let stdin = ok!(env.mgr.take_stdio(&id, None, StdioStream::Stdin));
    let out = reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stdout)));
    ok!(env.mgr.start(&id));
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(stdin);
            f.write_all(&data)
            // dropping f closes stdin: cat sees EOF
        })
    };
    ok!(writer.join().unwrap());
    let exit = ok!(env.mgr.wait(&id, None));
    let got = out.join().unwrap();
    check!(exit.exit_code == 0, "exit {}", exit.exit_code);
    check!(got == data, "cat gave back {} bytes, differing", got.len());
    ok!(env.mgr.remove(&id, false));

    // close_stdin while the agent still holds the write end: cat ends.
    let id = uid("cat-close");
    ok!(env.mgr.create(&id, &spec(&["cat"]).to_string(), &env.rootfs, false));
    let out = reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Stdout)));
    ok!(env.mgr.start(&id));
    std::thread::sleep(Duration::from_millis(200));
    check!(
        ok!(env.mgr.state(&id)).status == Status::Running,
        "cat ended before its stdin closed"
    );
    ok!(env.mgr.close_stdin(&id, None));
    let exit = ok!(env.mgr.wait(&id, None));
    check!(exit.exit_code == 0 && text(out).is_empty(), "exit {}", exit.exit_code);
    let e = env.mgr.take_stdio(&id, None, StdioStream::Stdin).unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn terminal_and_resize(env: &Env) -> Result<(), String> {
    let id = uid("tty");
    let script = "[ -t 0 ] && [ -t 1 ] && echo tty; stty size; read line; echo \"got $line\"; stty size";
    ok!(env.mgr.create(&id, &sh(script).to_string(), &env.rootfs, true));
    ok!(env.mgr.resize_tty(&id, None, 33, 77));
    let master = ok!(env.mgr.take_stdio(&id, None, StdioStream::Tty));
    let e = env.mgr.take_stdio(&id, None, StdioStream::Stdout).unwrap_err();
    check!(matches!(e, ContainerError::InvalidArgument(_)), "{e:?}");
    let mut input = std::fs::File::from(ok!(master.try_clone()));
    let out = reader(master);
    ok!(env.mgr.start(&id));
    std::thread::sleep(Duration::from_millis(500));
    ok!(env.mgr.resize_tty(&id, None, 40, 100));
    ok!(input.write_all(b"hi there\n"));
    let exit = ok!(env.mgr.wait(&id, None));
    drop(input);
    let out = text(out).replace('\r', "");
    check!(exit.exit_code == 0, "exit {} output {out:?}", exit.exit_code);
    check!(out.contains("tty\n33 77\n"), "output {out:?}");
    check!(out.contains("got hi there\n40 100\n"), "output {out:?}");
    ok!(env.mgr.remove(&id, false));

    // What a terminal process wrote just before exiting is still there.
    let id = uid("tty-late");
    ok!(env.mgr.create(&id, &sh("echo bye").to_string(), &env.rootfs, true));
    ok!(env.mgr.start(&id));
    ok!(env.mgr.wait(&id, None));
    let out = text(reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Tty))));
    check!(out.replace('\r', "") == "bye\n", "output {out:?}");
    ok!(env.mgr.remove(&id, false));

    // A 64-character id (podman's, kubelet's) puts the console sockets
    // beyond sun_path's 108 bytes: the container and an exec still get one.
    let id = format!("{:0<64}", uid("tty-long"));
    check!(
        env.state_root
            .join("@bundles")
            .join(&id)
            .join("console.sock")
            .as_os_str()
            .len()
            > 108,
        "id too short for the case"
    );
    ok!(env.mgr.create(
        &id,
        &sh("[ -t 1 ] && echo tty; sleep 30").to_string(),
        &env.rootfs,
        true
    ));
    let out = reader(ok!(env.mgr.take_stdio(&id, None, StdioStream::Tty)));
    ok!(env.mgr.start(&id));
    let exec = process(&["sh", "-c", "[ -t 1 ] && echo exec-tty"]).to_string();
    ok!(env.mgr.exec(&id, "e1", &exec, true));
    let exec_out = text(reader(ok!(env.mgr.take_stdio(&id, Some("e1"), StdioStream::Tty))));
    check!(exec_out.replace('\r', "") == "exec-tty\n", "exec output {exec_out:?}");
    ok!(env.mgr.signal(&id, None, 9, false));
    ok!(env.mgr.wait(&id, None));
    let out = text(out);
    check!(out.replace('\r', "") == "tty\n", "output {out:?}");
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn exec_into_running_container(env: &Env) -> Result<(), String> {
    let (id, _out, _err) = run(env, "exec", &sh("echo $$ > /dev/shm/init; sleep 1000"))?;
    // An exec that prints and ends.
    let pid = ok!(env.mgr.exec(
        &id,
        "e1",
        &process(&[
            "sh",
            "-c",
            "echo in $(hostname); cat /dev/shm/init; echo err >&2; exit 7"
        ])
        .to_string(),
        false
    ));
    check!(pid > 0, "pid {pid}");
    ok!(env.mgr.close_stdin(&id, Some("e1")));
    let out = reader(ok!(env.mgr.take_stdio(&id, Some("e1"), StdioStream::Stdout)));
    let err = reader(ok!(env.mgr.take_stdio(&id, Some("e1"), StdioStream::Stderr)));
    let exit = ok!(env.mgr.wait(&id, Some("e1")));
    let (out, err) = (text(out), text(err));
    check!(exit.exit_code == 7 && exit.pid == pid, "exit {exit:?}");
    check!(
        out == "in runc\n1\n",
        "stdout {out:?} (the init is pid 1 of the container)"
    );
    check!(err == "err\n", "stderr {err:?}");
    check!(exit_event(env, &id, "e1") == Some(7), "no Exit event for e1");

    // A long exec, waited on from another thread; it shows in processes().
    let spid = ok!(env
        .mgr
        .exec(&id, "sleeper", &process(&["sleep", "1"]).to_string(), false));
    let pids = ok!(env.mgr.processes(&id));
    let init = ok!(env.mgr.state(&id)).pid;
    check!(
        pids.contains(&spid) && pids.contains(&init),
        "processes {pids:?} lack {spid} or {init}"
    );
    let mgr = env.mgr.clone();
    let idc = id.clone();
    let waiter = std::thread::spawn(move || mgr.wait(&idc, Some("sleeper")));
    let t = Instant::now();
    let exit = ok!(waiter.join().unwrap());
    check!(exit.exit_code == 0, "sleeper exit {exit:?}");
    check!(t.elapsed() > Duration::from_millis(500), "sleeper ended too soon");

    // An exec with a terminal.
    ok!(env.mgr.exec(
        &id,
        "t",
        &process(&["sh", "-c", "[ -t 1 ] && echo tty"]).to_string(),
        true
    ));
    let out = text(reader(ok!(env.mgr.take_stdio(&id, Some("t"), StdioStream::Tty))));
    check!(ok!(env.mgr.wait(&id, Some("t"))).exit_code == 0, "tty exec failed");
    check!(out.replace('\r', "") == "tty\n", "tty exec output {out:?}");

    // Errors: a taken exec id, a missing program, an unknown exec id.
    let e = env
        .mgr
        .exec(&id, "e1", &process(&["true"]).to_string(), false)
        .unwrap_err();
    check!(matches!(e, ContainerError::AlreadyExists(_)), "{e:?}");
    check!(
        e.to_string() == format!("exec e1 already exists in container {id}"),
        "{e}"
    );
    let e = env
        .mgr
        .exec(&id, "e2", &process(&["no-such-program"]).to_string(), false)
        .unwrap_err();
    check!(
        e.to_string()
            == "unable to start container process: exec: \"no-such-program\": executable file not found in $PATH",
        "{e:?}"
    );
    let e = env.mgr.wait(&id, Some("nope")).unwrap_err();
    check!(matches!(e, ContainerError::NotFound(_)), "{e:?}");
    let e = env.mgr.signal(&id, Some("e1"), libc::SIGTERM, false).unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");

    // An exited exec can be forgotten, and its id used again; a running one
    // cannot.
    ok!(env.mgr.remove_exec(&id, "e1"));
    check!(
        matches!(env.mgr.wait(&id, Some("e1")), Err(ContainerError::NotFound(_))),
        "e1 still known"
    );
    ok!(env.mgr.exec(&id, "e1", &process(&["true"]).to_string(), false));
    check!(ok!(env.mgr.wait(&id, Some("e1"))).exit_code == 0, "second e1");

    // An exec that outlives the wait on another: kill -all ends both.
    ok!(env.mgr.exec(&id, "bg", &process(&["sleep", "1000"]).to_string(), false));
    let e = env.mgr.remove_exec(&id, "bg").unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    ok!(env.mgr.signal(&id, None, libc::SIGKILL, true));
    check!(ok!(env.mgr.wait(&id, Some("bg"))).exit_code == 137, "bg not killed");
    check!(ok!(env.mgr.wait(&id, None)).exit_code == 137, "init not killed");
    let e = env
        .mgr
        .exec(&id, "late", &process(&["true"]).to_string(), false)
        .unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn cgroup_file(env: &Env, id: &str, file: &str) -> Result<String, String> {
    let dir = ok!(env.mgr.state(id)).cgroup;
    std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{}/{file}: {e}", dir.display()))
}

fn pause_and_resume(env: &Env) -> Result<(), String> {
    let (id, out, _err) = run(
        env,
        "pause",
        &sh("i=0; while true; do i=$((i+1)); echo $i > /dev/shm/n; sleep 0.05; done"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    ok!(env.mgr.pause(&id));
    check!(ok!(env.mgr.state(&id)).status == Status::Paused, "not paused");
    check!(
        cgroup_file(env, &id, "cgroup.freeze")?.trim() == "1",
        "cgroup.freeze not 1"
    );
    check!(
        cgroup_file(env, &id, "cgroup.events")?.contains("frozen 1"),
        "not frozen"
    );
    let e = env.mgr.pause(&id).unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    let e = env
        .mgr
        .exec(&id, "x", &process(&["true"]).to_string(), false)
        .unwrap_err();
    check!(matches!(e, ContainerError::WrongState { .. }), "{e:?}");
    let e = env.mgr.remove(&id, false).unwrap_err();
    check!(
        e.to_string() == format!("cannot delete container {id} that is not stopped: paused"),
        "{e}"
    );
    // Frozen: the loop's counter does not move.
    let count = |env: &Env| -> Result<String, String> {
        let mut out = String::new();
        let pid = ok!(env.mgr.state(&id)).pid;
        let p = format!("/proc/{pid}/root/dev/shm/n");
        let _ = std::fs::File::open(&p).and_then(|mut f| f.read_to_string(&mut out));
        Ok(out)
    };
    let a = count(env)?;
    std::thread::sleep(Duration::from_millis(300));
    let b = count(env)?;
    check!(a == b && !a.is_empty(), "counter moved while paused: {a:?} -> {b:?}");
    ok!(env.mgr.resume(&id));
    check!(ok!(env.mgr.state(&id)).status == Status::Running, "not running");
    check!(
        cgroup_file(env, &id, "cgroup.events")?.contains("frozen 0"),
        "still frozen"
    );
    std::thread::sleep(Duration::from_millis(300));
    let c = count(env)?;
    check!(c != b, "counter did not move after resume: {b:?} -> {c:?}");
    let e = env.mgr.resume(&id).unwrap_err();
    check!(e.to_string() == format!("container {id} is not paused"), "{e}");
    ok!(env.mgr.remove(&id, true));
    let _ = text(out);
    Ok(())
}

fn oom_kill_reported(env: &Env) -> Result<(), String> {
    if !env.memory_controller {
        println!("    skipped: the memory controller is not available in cgroup v2 on this host (hybrid cgroups)");
        return Ok(());
    }
    let mut s = sh("echo start; tail /dev/zero");
    s["linux"]["resources"]["memory"] = json!({"limit": 32 << 20, "swap": 32 << 20});
    let (id, out, _err) = run(env, "oom", &s)?;
    let exit = ok!(env.mgr.wait(&id, None));
    check!(exit.exit_code == 137, "exit {exit:?}");
    let oom = wait_event(
        env,
        |e| matches!(e, Event::Oom { id: i } if *i == id),
        Duration::from_secs(10),
    );
    check!(oom.is_some(), "no Oom event");
    let stats = ok!(env.mgr.stats(&id));
    check!(stats.oom_kills >= 1, "oom_kills {}", stats.oom_kills);
    check!(stats.memory_limit == 32 << 20, "memory_limit {}", stats.memory_limit);
    check!(
        stats.memory_max_usage > 16 << 20,
        "memory_max_usage {}",
        stats.memory_max_usage
    );
    let _ = text(out);
    ok!(env.mgr.remove(&id, false));
    Ok(())
}

fn stats_move(env: &Env) -> Result<(), String> {
    let (id, _out, _err) = run(env, "stats", &sh("while true; do :; done"))?;
    std::thread::sleep(Duration::from_millis(200));
    let a = ok!(env.mgr.stats(&id));
    std::thread::sleep(Duration::from_millis(500));
    let b = ok!(env.mgr.stats(&id));
    check!(
        b.cpu_usage_usec > a.cpu_usage_usec + 100_000,
        "cpu usage {} -> {}",
        a.cpu_usage_usec,
        b.cpu_usage_usec
    );
    check!(b.cpu_user_usec > 0, "no user time");
    if env.memory_controller {
        check!(b.memory_usage > 0, "memory usage 0");
        check!(b.memory_limit == u64::MAX, "memory limit {}", b.memory_limit);
    }
    // update: a memory limit, where the controller exists; bad JSON is an invalid spec.
    let e = env.mgr.update(&id, "{\"memory\": 5}").unwrap_err();
    check!(matches!(e, ContainerError::InvalidSpec(_)), "{e:?}");
    if env.memory_controller {
        ok!(env.mgr.update(&id, &json!({"memory": {"limit": 64 << 20}}).to_string()));
        check!(ok!(env.mgr.stats(&id)).memory_limit == 64 << 20, "limit not applied");
    } else {
        ok!(env.mgr.update(&id, "{}"));
    }
    ok!(env.mgr.remove(&id, true));
    check!(
        exit_event(env, &id, "") == Some(137),
        "no exit event after forced remove"
    );
    Ok(())
}

fn readonly_rootfs_and_masked_paths(env: &Env) -> Result<(), String> {
    // /etc/secret (a file) and /home (a directory) are masked besides
    // runc's defaults; /proc/timer_list is one of those.
    std::fs::write(env.rootfs.join("etc/secret"), "secret\n").map_err(|e| e.to_string())?;
    std::fs::write(env.rootfs.join("home/file"), "x\n").map_err(|e| e.to_string())?;
    let script = "touch /x 2>&1; echo rc=$?; wc -c < /etc/secret; ls /home | wc -l; wc -c < /proc/timer_list; \
                  grep -q ' /proc/sys proc ro,' /proc/mounts && echo sys-ro; touch /dev/shm/ok && echo shm-rw";
    let mut s = sh(script);
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .extend([json!("/etc/secret"), json!("/home")]);
    let (code, out, err) = run_to_end(env, "ro", &s)?;
    check!(code == 0, "exit {code}, stderr {err:?}");
    check!(
        out.contains("Read-only file system") && out.contains("rc=1"),
        "rootfs writable? {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    check!(
        lines.get(2).map(|l| l.trim()) == Some("0"),
        "/etc/secret not masked: {out:?}"
    );
    check!(lines.get(3).map(|l| l.trim()) == Some("0"), "/home not masked: {out:?}");
    check!(
        lines.get(4).map(|l| l.trim()) == Some("0"),
        "/proc/timer_list not masked: {out:?}"
    );
    check!(out.contains("sys-ro\n") && out.contains("shm-rw\n"), "{out:?}");
    // The rootfs on the host was not written.
    check!(!env.rootfs.join("x").exists(), "/x appeared in the rootfs");
    Ok(())
}

fn identity_env_cwd_hostname(env: &Env) -> Result<(), String> {
    let mut s = sh("hostname; id -u; id -g; id -G; echo $FOO; pwd; cat /proc/self/status | grep -i '^CapEff'");
    s["hostname"] = json!("box-1");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000, 3000]});
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/tmp");
    let (code, out, err) = run_to_end(env, "who", &s)?;
    check!(code == 0, "exit {code}: {err}");
    let lines: Vec<&str> = out.lines().collect();
    check!(
        lines[..6] == ["box-1", "1000", "1001", "1001 2000 3000", "bar baz", "/tmp"],
        "output {out:?}"
    );
    // A non-root user keeps no effective capabilities.
    check!(
        lines.get(6).is_some_and(|l| l.ends_with("0000000000000000")),
        "caps {out:?}"
    );
    Ok(())
}

fn seccomp_and_oom_score_adj(env: &Env) -> Result<(), String> {
    let mut s = sh("mkdir /tmp/d 2>&1; echo rc=$?; cat /proc/self/oom_score_adj");
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}));
    s["process"]["oomScoreAdj"] = json!(500);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (code, out, err) = run_to_end(env, "seccomp", &s)?;
    check!(code == 0, "exit {code}: {err}");
    check!(
        out.contains("Operation not permitted") && out.contains("rc=1"),
        "seccomp not applied: {out:?}"
    );
    check!(out.lines().last() == Some("500"), "oom_score_adj: {out:?}");
    // Without the filter, mkdir in the tmpfs works.
    s["linux"].as_object_mut().unwrap().remove("seccomp");
    let (_, out, _) = run_to_end(env, "noseccomp", &s)?;
    check!(out.contains("rc=0"), "{out:?}");
    Ok(())
}

fn invalid_specs_and_missing_executable(env: &Env) -> Result<(), String> {
    let bad = |spec: String, want: &str| -> Result<(), String> {
        let id = uid("bad");
        match env.mgr.create(&id, &spec, &env.rootfs, false) {
            Ok(_) => Err(format!("spec accepted, wanted an error with {want:?}")),
            Err(e) => {
                check!(matches!(e, ContainerError::InvalidSpec(_)), "{e:?}");
                check!(e.to_string().contains(want), "error {e} lacks {want:?}");
                check!(
                    env.mgr.state(&id).is_err(),
                    "container {id} exists after a failed create"
                );
                Ok(())
            }
        }
    };
    bad("{not json".into(), "config.json")?;
    let mut s = spec(&["sh"]);
    s.as_object_mut().unwrap().remove("process");
    bad(s.to_string(), "process: missing")?;
    bad(spec(&[]).to_string(), "process.args")?;
    let mut s = spec(&["sh"]);
    s["process"]["cwd"] = json!("relative");
    bad(s.to_string(), "process.cwd")?;
    let mut s = spec(&["sh"]);
    s["linux"]["namespaces"][1] = json!({"type": "network", "path": "/var/run/netns/x"});
    bad(s.to_string(), "only /proc/<pid>/ns/<name>")?;
    let mut s = spec(&["sh"]);
    s["ociVersion"] = json!("0.9");
    bad(s.to_string(), "ociVersion")?;
    let mut s = spec(&["sh"]);
    s.as_object_mut().unwrap().remove("linux");
    bad(s.to_string(), "linux")?;
    // hostname without a UTS namespace: libcontainer's validation.
    let mut s = spec(&["sh"]);
    s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}]);
    bad(s.to_string(), "UTS")?;

    // A missing program: runc's message; nothing left behind.
    let id = uid("noexe");
    let e = env
        .mgr
        .create(&id, &spec(&["no-such-program", "x"]).to_string(), &env.rootfs, false)
        .unwrap_err();
    check!(
        matches!(e, ContainerError::ExecutableNotFound(ref p) if p == "no-such-program"),
        "{e:?}"
    );
    check!(
        e.to_string()
            == "unable to start container process: exec: \"no-such-program\": executable file not found in $PATH",
        "{e}"
    );
    check!(!env.state_root.join(&id).exists(), "state left");
    check!(!Path::new("/sys/fs/cgroup/tegmen").join(&id).exists(), "cgroup left");
    let e = env.mgr.start(&id).unwrap_err();
    check!(e.to_string() == format!("container {id} does not exist"), "{e}");

    // Bad ids and a rootfs that is not there.
    for bad_id in ["", "a/b", "..", "x y"] {
        let e = env
            .mgr
            .create(bad_id, &spec(&["sh"]).to_string(), &env.rootfs, false)
            .unwrap_err();
        check!(matches!(e, ContainerError::InvalidArgument(_)), "{bad_id:?}: {e:?}");
    }
    let e = env
        .mgr
        .create(
            &uid("nofs"),
            &spec(&["sh"]).to_string(),
            Path::new("/nonexistent/rootfs"),
            false,
        )
        .unwrap_err();
    check!(e.to_string().contains("/nonexistent/rootfs"), "{e}");
    Ok(())
}

fn wrong_states_and_unknown_ids(env: &Env) -> Result<(), String> {
    let e = env.mgr.start("nope").unwrap_err();
    check!(
        matches!(e, ContainerError::NotFound(_)) && e.to_string() == "container nope does not exist",
        "{e}"
    );
    check!(
        matches!(env.mgr.wait("nope", None), Err(ContainerError::NotFound(_))),
        "wait"
    );
    check!(
        matches!(env.mgr.stats("nope"), Err(ContainerError::NotFound(_))),
        "stats"
    );
    check!(
        matches!(env.mgr.remove("nope", true), Err(ContainerError::NotFound(_))),
        "remove"
    );
    check!(
        matches!(env.mgr.signal("nope", None, 9, false), Err(ContainerError::NotFound(_))),
        "signal"
    );

    let id = uid("states");
    let pid = ok!(env.mgr.create(&id, &sh("sleep 1000").to_string(), &env.rootfs, false));
    check!(
        pid > 0 && ok!(env.mgr.state(&id)).status == Status::Created,
        "not created"
    );
    let e = env
        .mgr
        .create(&id, &sh("true").to_string(), &env.rootfs, false)
        .unwrap_err();
    check!(matches!(e, ContainerError::AlreadyExists(_)), "{e:?}");
    check!(e.to_string() == format!("container {id} already exists"), "{e}");
    let e = env
        .mgr
        .exec(&id, "x", &process(&["true"]).to_string(), false)
        .unwrap_err();
    check!(
        matches!(e, ContainerError::WrongState { .. }),
        "exec before start: {e:?}"
    );
    let e = env.mgr.pause(&id).unwrap_err();
    check!(e.to_string() == format!("container {id} is not running"), "{e}");
    // The process is stopped before the user's program runs: sleep has not started.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    check!(!comm.contains("sleep"), "the program runs before start: {comm:?}");
    ok!(env.mgr.start(&id));
    // start returns once the init was told to go on (as runc's does); it
    // execs the program right after.
    let t = Instant::now();
    let mut comm = String::new();
    while t.elapsed() < Duration::from_secs(5) {
        comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sleep" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check!(comm.trim() == "sleep", "comm after start {comm:?}");
    let e = env.mgr.start(&id).unwrap_err();
    check!(
        e.to_string() == format!("cannot start container {id}: it is already running"),
        "{e}"
    );
    let e = env.mgr.remove(&id, false).unwrap_err();
    check!(
        e.to_string() == format!("cannot delete container {id} that is not stopped: running"),
        "{e}"
    );
    ok!(env.mgr.signal(&id, None, libc::SIGKILL, false));
    ok!(env.mgr.wait(&id, None));
    let e = env.mgr.start(&id).unwrap_err();
    check!(
        e.to_string() == format!("cannot start container {id}: it has stopped"),
        "{e}"
    );
    ok!(env.mgr.remove(&id, false));
    let e = env.mgr.state(&id).unwrap_err();
    check!(matches!(e, ContainerError::NotFound(_)), "{e:?}");

    // A created container that never started is removed without force.
    let id = uid("created");
    let pid = ok!(env.mgr.create(&id, &sh("sleep 1000").to_string(), &env.rootfs, false));
    ok!(env.mgr.remove(&id, false));
    check!(!Path::new(&format!("/proc/{pid}")).exists(), "init {pid} still there");
    Ok(())
}

fn remove_leaves_nothing(env: &Env) -> Result<(), String> {
    let (id, _out, _err) = run(env, "rm", &sh("sleep 1000 & sleep 1000"))?;
    let epid = ok!(env.mgr.exec(&id, "e", &process(&["sleep", "1000"]).to_string(), false));
    std::thread::sleep(Duration::from_millis(200));
    let st = ok!(env.mgr.state(&id));
    let pids = ok!(env.mgr.processes(&id));
    // sh, the background sleep, the sleep sh execs last, the exec'd sleep.
    check!(
        pids.len() >= 3 && pids.contains(&epid) && pids.contains(&st.pid),
        "processes {pids:?}"
    );
    let mntns = std::fs::read_link(format!("/proc/{}/ns/mnt", st.pid)).map_err(|e| e.to_string())?;
    check!(
        st.cgroup.exists() && env.state_root.join(&id).exists() && st.bundle.exists(),
        "state missing"
    );

    ok!(env.mgr.remove(&id, true));
    for pid in &pids {
        check!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} left");
    }
    check!(!st.cgroup.exists(), "cgroup {} left", st.cgroup.display());
    check!(!env.state_root.join(&id).exists(), "state dir left");
    check!(!st.bundle.exists(), "bundle left");
    // No process anywhere is left in the container's mount namespace, and
    // the host's mount table does not hold the rootfs.
    for p in std::fs::read_dir("/proc").map_err(|e| e.to_string())?.flatten() {
        if let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) {
            check!(
                ns != mntns,
                "{} is in the container's mount namespace",
                p.path().display()
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    check!(
        !mounts.contains(env.rootfs.to_str().unwrap()),
        "rootfs mounted on the host"
    );
    check!(
        exit_event(env, &id, "") == Some(137) && exit_event(env, &id, "e") == Some(137),
        "exit events"
    );
    check!(!env.mgr.list().contains(&id), "still listed");
    Ok(())
}

fn parallel_containers(env: &Env) -> Result<(), String> {
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let mgr = env.mgr.clone();
            let rootfs = env.rootfs.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let id = uid(&format!("par{i}"));
                let script = format!("echo {i}; exit {i}");
                ok!(mgr.create(&id, &sh(&script).to_string(), &rootfs, false));
                ok!(mgr.close_stdin(&id, None));
                let out = reader(ok!(mgr.take_stdio(&id, None, StdioStream::Stdout)));
                ok!(mgr.start(&id));
                let exec = mgr.exec(&id, "x", &process(&["true"]).to_string(), false);
                let exit = ok!(mgr.wait(&id, None));
                if exec.is_ok() {
                    ok!(mgr.wait(&id, Some("x")));
                }
                check!(exit.exit_code == i, "container {i}: exit {}", exit.exit_code);
                check!(text(out) == format!("{i}\n"), "container {i}: output");
                ok!(mgr.remove(&id, false));
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "thread panicked".to_string())??;
    }
    Ok(())
}

fn agent_process_unchanged(env: &Env) -> Result<(), String> {
    // libcontainer runs in a forked helper: the agent's own oom_score_adj,
    // dumpable flag, cwd and signal mask stay as they were.
    let adj = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    let mut s = sh("true");
    s["process"]["oomScoreAdj"] = json!(900);
    run_to_end(env, "agent", &s)?;
    let (id, _o, _e) = run(env, "agent2", &sh("sleep 10"))?;
    ok!(env.mgr.exec(&id, "x", &process(&["true"]).to_string(), true));
    ok!(env.mgr.wait(&id, Some("x")));
    ok!(env.mgr.remove(&id, true));
    check!(
        std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default() == adj,
        "oom_score_adj changed"
    );
    // SAFETY: prctl(PR_GET_DUMPABLE) takes no pointers.
    check!(
        unsafe { libc::prctl(libc::PR_GET_DUMPABLE) } == 1,
        "the agent became non-dumpable"
    );
    check!(
        std::env::current_dir().map_err(|e| e.to_string())? == cwd,
        "cwd changed"
    );
    // The container's process got a clean signal mask (SIGCHLD is blocked
    // here). `; true` keeps busybox sh from exec'ing grep: sh ignores
    // SIGQUIT itself, and an exec'd grep would inherit that.
    let (_, out, _) = run_to_end(env, "sigmask", &sh("grep -E '^Sig(Blk|Ign)' /proc/self/status; true"))?;
    check!(
        out.contains("SigBlk:\t0000000000000000"),
        "blocked signals in the container: {out:?}"
    );
    check!(
        out.contains("SigIgn:\t0000000000000000"),
        "ignored signals in the container: {out:?}"
    );
    Ok(())
}
