//! Every command but `create`: `start`, `state`, `kill`, `delete`, `run`,
//! `exec`, `update`, `list`, `ps`, `pause`, `resume`, `spec`, `features`. Each is a
//! short-lived process talking to the container's agent; `run` and an
//! attached `exec` wait for their monitor and exit with its status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tegmen_agent_api::agent::ExecProcessRequest;

use super::create::{self, write_pid_file, CreateOptions};
use super::hooks;
use super::monitor::{self, MonitorArgs};
use super::store::{self, ContainerRecord, Status};
use super::{connect_agent, log, validate_id, Error, Globals, Result};
use crate::config::Config;
use crate::process::ProcessRecord;
use crate::sandbox;

fn load(config: &Config, id: &str) -> Result<(Option<ContainerRecord>, Status)> {
    validate_id(id).map_err(|_| Error::NotExist(id.to_string()))?;
    let rec = store::load(config, id)?;
    let status = store::status(config, id, rec.as_ref());
    Ok((rec, status))
}

pub fn state(globals: &Globals, id: &str) -> Result<()> {
    let (rec, _) = load(&globals.config, id)?;
    let v = store::state_json(&globals.config, id, rec.as_ref());
    println!("{}", serde_json::to_string_pretty(&v).expect("state serializes"));
    Ok(())
}

pub fn start(globals: &Globals, id: &str) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    match status {
        Status::Created => {}
        Status::Stopped => return Err(Error::State("cannot start a container that has stopped".into())),
        Status::Running => return Err(Error::State("cannot start an already running container".into())),
        other => {
            return Err(Error::State(format!(
                "cannot start a container in the {} state",
                other.as_str()
            )))
        }
    }
    connect_agent(&globals.config, id)?.start_container(id)?;
    let rec = store::update(&globals.config, id, |r| r.started = true)?;
    // runc (1.2) returns a failed poststart hook's error; the container runs on.
    hooks::run(&rec.hooks, "poststart", &rec.hook_state(Status::Running))?;
    Ok(())
}

/// runc's signal names: a number, `KILL` or `SIGKILL` (any case).
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        return Err(Error::State(format!("invalid signal: {s}")));
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return Err(Error::State(format!("unknown signal \"{s}\""))),
    };
    Ok(n)
}

pub fn kill(globals: &Globals, id: &str, signal: &str, all: bool) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    let sig = parse_signal(signal)?;
    if matches!(status, Status::Stopped | Status::Creating) {
        return Err(Error::NotRunning);
    }
    connect_agent(&globals.config, id)?.signal_process(id, "", sig as u32, all)?;
    Ok(())
}

pub fn delete(globals: &Globals, id: &str, force: bool) -> Result<()> {
    let config = &globals.config;
    let (rec, status) = match load(config, id) {
        Ok(x) => x,
        // runc: a forced delete of what does not exist succeeds.
        Err(Error::NotExist(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    match status {
        Status::Stopped | Status::Created => {}
        _ if force => {}
        other => {
            return Err(Error::State(format!(
                "cannot delete container {id} that is not stopped: {}",
                other.as_str()
            )))
        }
    }
    destroy(config, id, rec.as_ref())
}

/// Removes everything of container `id`: its monitors, its host mounts, its
/// VM and its directory.
pub fn destroy(config: &Config, id: &str, rec: Option<&ContainerRecord>) -> Result<()> {
    // A `create` still at work (its caller was killed, a daemon forces the
    // removal) would start a monitor or a VM process after we looked.
    sandbox::stop_owner(config, id);
    let mut monitors: Vec<ProcessRecord> = find_monitors(config, id);
    if let Some(m) = rec.and_then(|r| r.monitor.clone()) {
        monitors.push(m);
    }
    for m in &monitors {
        m.kill();
    }
    for m in &monitors {
        m.wait_gone(Duration::from_secs(2));
    }
    let dir = store::container_dir(config, id);
    // The container's part of the share (`shared/<id>.<n>`): whatever is
    // mounted below the share (the share itself goes with the sandbox).
    let shared = dir.join("shared");
    let parts = || -> Vec<PathBuf> {
        sandbox::mounts_below(&shared)
            .into_iter()
            .filter(|p| *p != shared)
            .collect()
    };
    for _ in 0..5 {
        let left = parts();
        if left.is_empty() {
            break;
        }
        for p in left.iter().rev() {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let left = parts();
    if !left.is_empty() {
        return Err(Error::Sys(format!(
            "container {id}: could not unmount {}",
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    match sandbox::destroy(config, id) {
        Ok(()) | Err(crate::Error::SandboxNotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    // The OCI spec: a failed poststop hook is a warning, the delete stands.
    if let Some(rec) = rec {
        if let Err(e) = hooks::run(&rec.hooks, "poststop", &rec.hook_state(Status::Stopped)) {
            super::log::warn(&e.to_string());
        }
    }
    Ok(())
}

/// Monitors of container `id` (the init's and every exec's), found by
/// their command line: `tegmen --root ROOT … monitor ID …`.
fn find_monitors(config: &Config, id: &str) -> Vec<ProcessRecord> {
    let root = config.root.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let has_root = args.windows(2).any(|w| w[0] == "--root" && w[1] == root);
            let is_monitor = args.windows(2).any(|w| w[0] == "monitor" && w[1] == id);
            has_root && is_monitor
        })
        .filter_map(|pid| ProcessRecord::of("monitor", pid))
        .collect()
}

/// Forwards the signals this process gets to `child` (the monitor, which
/// passes them on to the container).
fn forward_signals_to(child: &Child) {
    let pid = child.id() as i32;
    monitor::spawn_signal_thread(move |sig| {
        // SAFETY: kill sends a signal; no memory is involved.
        unsafe { libc::kill(pid, sig) };
    });
}

fn wait_exit_code(mut child: Child) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match child.wait() {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 255,
    }
}

/// `run`: create, start, and (attached) wait and delete. Returns the exit
/// status for the process.
pub fn run(globals: &Globals, opts: &CreateOptions) -> Result<i32> {
    if !opts.detach {
        monitor::block_forwarded_signals();
    }
    let child = create::create(globals, opts)?;
    let t = Instant::now();
    if let Err(e) = start(globals, &opts.id) {
        let rec = store::load(&globals.config, &opts.id).ok().flatten();
        let _ = destroy(&globals.config, &opts.id, rec.as_ref());
        return Err(e);
    }
    if opts.detach {
        return Ok(0);
    }
    log::phase("start", t.elapsed());
    let t = Instant::now();
    forward_signals_to(&child);
    let code = wait_exit_code(child);
    log::phase("exit", t.elapsed());
    let t = Instant::now();
    let rec = store::load(&globals.config, &opts.id).ok().flatten();
    destroy(&globals.config, &opts.id, rec.as_ref())?;
    log::phase("teardown", t.elapsed());
    Ok(code)
}

#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub id: String,
    pub command: Vec<String>,
    pub process: Option<PathBuf>,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub tty: bool,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub additional_gids: Vec<u32>,
    pub preserve_fds: u32,
}

/// The process to exec: `--process FILE`, or the container's own process
/// with the command and flags of the command line (runc's rules).
fn exec_process(rec: &ContainerRecord, opts: &ExecOptions) -> Result<serde_json::Value> {
    if let Some(path) = &opts.process {
        let text = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile(path.clone()),
            _ => Error::io("open", path, e),
        })?;
        return serde_json::from_slice(&text).map_err(|e| Error::Spec(format!("parsing {}: {e}", path.display())));
    }
    if opts.command.is_empty() {
        return Err(Error::Spec("exec: the command to run is missing".into()));
    }
    // The bundle's current config, as runc reads it; the recorded copy if
    // the bundle is gone.
    let mut p = std::fs::read(rec.bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .map(|s| s["process"].clone())
        .filter(|p| p.is_object())
        .unwrap_or_else(|| rec.process.clone());
    p["args"] = serde_json::json!(opts.command);
    if let Some(cwd) = &opts.cwd {
        p["cwd"] = cwd.clone().into();
    }
    if !opts.env.is_empty() {
        let mut env: Vec<serde_json::Value> = p["env"].as_array().cloned().unwrap_or_default();
        env.extend(opts.env.iter().map(|e| serde_json::Value::from(e.clone())));
        p["env"] = env.into();
    }
    p["terminal"] = opts.tty.into();
    if let Some(user) = &opts.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| Error::Spec(format!("parsing {s} as int for uid/gid failed")))
        };
        p["user"]["uid"] = parse(uid)?.into();
        if let Some(g) = gid {
            p["user"]["gid"] = parse(g)?.into();
        }
    }
    if !opts.additional_gids.is_empty() {
        p["user"]["additionalGids"] = serde_json::json!(opts.additional_gids);
    }
    Ok(p)
}

/// `exec`: the exit status of the process (attached), or 0 (`-d`).
pub fn exec(globals: &Globals, opts: &ExecOptions) -> Result<i32> {
    let config = &globals.config;
    let (rec, status) = load(config, &opts.id)?;
    match status {
        Status::Created | Status::Running => {}
        Status::Paused => return Err(Error::State("cannot exec in a paused container".into())),
        _ => return Err(Error::State("cannot exec in a stopped container".into())),
    }
    let rec = rec.expect("a created container has a record");
    let process = exec_process(&rec, opts)?;
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    if terminal && opts.detach && opts.console_socket.is_none() {
        return Err(Error::Spec(
            "cannot allocate tty if runc will detach without setting console socket".into(),
        ));
    }
    if !terminal && opts.console_socket.is_some() {
        return Err(Error::Spec(
            "cannot use console socket if runc will not detach or allocate tty".into(),
        ));
    }
    if !opts.detach {
        monitor::block_forwarded_signals();
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let req = ExecProcessRequest {
        container_id: opts.id.clone(),
        exec_id: exec_id.clone(),
        process_json: process.to_string(),
        terminal,
        stdin: true,
        ..Default::default()
    };
    let agent = connect_agent(config, &opts.id)?;
    agent.exec_process(&req)?;
    let args = MonitorArgs {
        id: opts.id.clone(),
        exec_id: exec_id.clone(),
        terminal,
        console_socket: opts.console_socket.clone(),
    };
    let child = match monitor::spawn(globals, &args, opts.preserve_fds, opts.detach) {
        Ok(c) => c,
        Err(e) => {
            let _ = agent.signal_process(&opts.id, &exec_id, libc::SIGKILL as u32, false);
            return Err(e);
        }
    };
    // In the container's cgroup, as runc's exec process is.
    let sandbox_dir = crate::sandbox::Layout::new(config, &opts.id).dir;
    if let Some(cg) = crate::sandbox::read_state(&sandbox_dir)
        .ok()
        .and_then(|s| s.host_cgroup)
    {
        if let Err(e) = cg.add(child.id() as i32) {
            log::debug(&format!("exec {}: joining {}: {e}", opts.id, cg.path.display()));
        }
    }
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, child.id())?;
    }
    if opts.detach {
        return Ok(0);
    }
    forward_signals_to(&child);
    Ok(wait_exit_code(child))
}

pub fn pause(globals: &Globals, id: &str) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    if status != Status::Running {
        return Err(Error::NotRunning);
    }
    connect_agent(&globals.config, id)?.pause_container(id)?;
    store::update(&globals.config, id, |r| r.paused = true)?;
    Ok(())
}

pub fn resume(globals: &Globals, id: &str) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    if status != Status::Paused {
        return Err(Error::State("container not paused".into()));
    }
    connect_agent(&globals.config, id)?.resume_container(id)?;
    store::update(&globals.config, id, |r| r.paused = false)?;
    Ok(())
}

/// What `update` changes: a whole `linux.resources` object, or single
/// values (runc's flags).
#[derive(Debug, Clone, Default)]
pub struct UpdateOptions {
    pub resources: Option<PathBuf>,
    pub memory: Option<String>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub pids_limit: Option<i64>,
}

/// runc's sizes: bytes, or a number with a k/m/g suffix (powers of 1024);
/// -1 for no limit.
pub fn parse_size(s: &str) -> Result<i64> {
    let lower = s.trim().to_ascii_lowercase();
    let t = lower.trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.parse().map_err(|_| Error::Spec(format!("invalid size: {s:?}")))?;
    Ok(if n < 0.0 { -1 } else { (n * mult as f64) as i64 })
}

pub fn update(globals: &Globals, id: &str, opts: &UpdateOptions) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    if matches!(status, Status::Stopped | Status::Creating) {
        return Err(Error::NotRunning);
    }
    let mut r = match &opts.resources {
        Some(p) if p.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| Error::io("reading", "stdin", e))?;
            serde_json::from_str(&text).map_err(|e| Error::Spec(format!("decoding resources from stdin: {e}")))?
        }
        Some(p) => {
            let text = std::fs::read(p).map_err(|e| Error::io("open", p, e))?;
            serde_json::from_slice(&text)
                .map_err(|e| Error::Spec(format!("decoding resources from {}: {e}", p.display())))?
        }
        None => serde_json::json!({}),
    };
    if let Some(m) = &opts.memory {
        r["memory"]["limit"] = parse_size(m)?.into();
    }
    if let Some(q) = opts.cpu_quota {
        r["cpu"]["quota"] = q.into();
    }
    if let Some(p) = opts.cpu_period {
        r["cpu"]["period"] = p.into();
    }
    if let Some(s) = opts.cpu_shares {
        r["cpu"]["shares"] = s.into();
    }
    if let Some(p) = opts.pids_limit {
        r["pids"]["limit"] = p.into();
    }
    connect_agent(&globals.config, id)?.update_container(id, &r.to_string())?;
    // The VM's host cgroup follows, as runc's container cgroup does.
    let state = crate::sandbox::read_state(&crate::sandbox::Layout::new(&globals.config, id).dir)?;
    if let Some(cg) = &state.host_cgroup {
        cg.update(&crate::cgroup::vm_update(&r, state.vcpus)?)?;
    }
    Ok(())
}

/// `ps`: the container's processes as the guest numbers them.
pub fn ps(globals: &Globals, id: &str, json: bool) -> Result<()> {
    let (_, status) = load(&globals.config, id)?;
    if matches!(status, Status::Stopped | Status::Creating) {
        return Err(Error::NotRunning);
    }
    let pids = connect_agent(&globals.config, id)?.list_processes(id)?;
    if json {
        println!("{}", serde_json::to_string(&pids).expect("pids serialize"));
    } else {
        println!("PID");
        for p in pids {
            println!("{p}");
        }
    }
    Ok(())
}

/// `list`: every container under the root.
pub fn list(globals: &Globals, format: &str, quiet: bool) -> Result<()> {
    let config = &globals.config;
    let states: Vec<store::StateJson> = store::list_ids(config)
        .iter()
        .filter_map(|id| {
            let rec = store::load(config, id).ok()?;
            Some(store::state_json(config, id, rec.as_ref()))
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if quiet {
        for s in &states {
            let _ = writeln!(out, "{}", s.id);
        }
        return Ok(());
    }
    match format {
        "json" => {
            let _ = writeln!(out, "{}", serde_json::to_string(&states).expect("states serialize"));
        }
        "table" => {
            let mut rows = vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from)];
            for s in &states {
                rows.push([
                    s.id.clone(),
                    s.pid.to_string(),
                    s.status.clone(),
                    s.bundle.clone(),
                    s.created.clone(),
                    s.owner.clone(),
                ]);
            }
            let _ = out.write_all(table(&rows).as_bytes());
        }
        _ => return Err(Error::Spec("invalid format option".into())),
    }
    Ok(())
}

/// Columns padded as Go's tabwriter (min width 12, padding 3) pads them.
fn table(rows: &[[String; 6]]) -> String {
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len() + 3).max().unwrap_or(0).max(12))
        .collect();
    let mut s = String::new();
    for r in rows {
        for (c, cell) in r.iter().enumerate() {
            if c == 5 {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}", w = widths[c]));
            }
        }
        s.push('\n');
    }
    s
}

/// `spec`: a runc-like `config.json` in `bundle` (default: here).
pub fn spec(bundle: Option<&Path>) -> Result<()> {
    let dir = bundle.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join("config.json");
    if path.exists() {
        return Err(Error::State("File config.json exists. Remove it first".into()));
    }
    let text = serde_json::to_string_pretty(&default_spec()).expect("spec serializes");
    std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))
}

/// What `runc spec` writes.
pub fn default_spec() -> serde_json::Value {
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// `features`: what this runtime supports, in runc's `features` format.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
                         "private", "rprivate", "shared", "rshared", "slave", "rslave", "relatime", "strictatime"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
                             "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_CHROOT",
                             "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP", "CAP_SYS_ADMIN"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.tegmen.version": env!("CARGO_PKG_VERSION"),
            "io.github.tegmen.sandbox": "microvm",
            // A spec's network namespace (by path) is the VM's: its
            // interfaces are mirrored to virtio-net NICs by tc redirects,
            // and the container runs in the guest's namespace. IPv4.
            "io.github.tegmen.network": "tcfilter",
            "io.github.tegmen.network.families": "ipv4"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_runc() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64kb").unwrap(), 64 << 10);
        assert_eq!(parse_size("-1").unwrap(), -1);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn signals_parse_like_runc() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").unwrap_err().to_string().contains("unknown signal"));
        assert!(parse_signal("0").is_err());
    }

    #[test]
    fn exec_flags_override_the_container_process() {
        let rec = ContainerRecord {
            id: "c".into(),
            oci_version: "1.0.2".into(),
            bundle: PathBuf::from("/nonexistent"),
            rootfs: PathBuf::from("/nonexistent/rootfs"),
            created: String::new(),
            annotations: Default::default(),
            process: serde_json::json!({"args": ["sh"], "env": ["A=1"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            terminal: false,
            monitor: None,
            started: true,
            paused: false,
            exit_code: None,
            mounts: Vec::new(),
            hooks: serde_json::Value::Null,
        };
        let opts = ExecOptions {
            command: vec!["ls".into(), "-l".into()],
            env: vec!["B=2".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:100".into()),
            ..Default::default()
        };
        let p = exec_process(&rec, &opts).unwrap();
        assert_eq!(p["args"], serde_json::json!(["ls", "-l"]));
        assert_eq!(p["env"], serde_json::json!(["A=1", "B=2"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["user"]["gid"], 100);
        assert_eq!(p["terminal"], false);
    }
}
