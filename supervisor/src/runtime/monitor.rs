//! The host monitor: one long-lived process per container init (and per
//! `exec`), the PID callers see in `--pid-file` and in `state`.
//!
//! `create` / `exec` re-execute the `tegmen` binary as `tegmen monitor ID
//! [--exec-id E] --ready-fd N …` with the caller's stdin/stdout/stderr (pipes
//! from conmon or containerd-shim) and `--preserve-fds` descriptors; every
//! other descriptor is closed. The monitor opens the process's guest
//! streams (stdin/stdout/stderr, or one `tty` stream), reports `OK` on the
//! ready pipe, then copies its own descriptors to and from the streams
//! until EOF, waits for the process with `WaitProcess`, records an init's
//! exit status in `container.json` and exits with that status. The caller
//! exits once the monitor is ready, so the monitor is re-parented to the
//! caller's subreaper, which reaps it and reads the status, as it would
//! runc's container init.
//!
//! Signals: SIGPIPE is ignored; SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1
//! and SIGUSR2 sent to the monitor are forwarded to the process with
//! `SignalProcess`; SIGWINCH is taken and left to the size poll. The
//! monitor exits only once the process has exited (or its VM is gone).
//!
//! No agent connection is kept open while the process runs (an idle ttrpc
//! client polls every 10 ms): the init's monitor waits for the EOF of its
//! output, which comes when the init's PID namespace is gone, then calls
//! `WaitProcess`; signals and resizes connect when they happen. An exec's
//! monitor calls `WaitProcess` at once, since background children of the
//! exec may hold its output open past its exit.
//!
//! Terminals: with `--console-socket`, a host pty pair is opened, its master
//! sent over the socket and the slave copied to and from the guest `tty`
//! stream, and the monitor's own stdio is /dev/null (as runc's init, it
//! holds none of the caller's pipes); without, the monitor's own
//! stdin/stdout are (attached `run -t`).
//! Window sizes of the host side are polled every 100 ms and passed on with
//! `ResizeTty`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tegmen_agent_api::stream::StreamKind;

use super::{console, log, store, Error, Globals, Result};
use crate::config::Config;

/// Output copies may go on this long without progress after the process
/// exited (a background child of an exec may hold its stdout).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// How often the host terminal's size is looked at.
const RESIZE_POLL: Duration = Duration::from_millis(100);

/// What a monitor is for.
#[derive(Debug, Clone, Default)]
pub struct MonitorArgs {
    pub id: String,
    /// Empty for the container's init.
    pub exec_id: String,
    pub terminal: bool,
    pub console_socket: Option<PathBuf>,
}

/// The signals a monitor forwards (SIGWINCH is handled, not forwarded).
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the forwarded signals in the calling thread (and every thread it
/// starts later), so that one thread can take them with `sigwait`.
pub fn block_forwarded_signals() {
    let set = forwarded_set();
    // SAFETY: pthread_sigmask reads the set we pass; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: ignoring SIGPIPE installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Starts a thread that takes the forwarded signals and hands each to `f`.
/// [`block_forwarded_signals`] must have run first, in the main thread.
pub fn spawn_signal_thread(f: impl Fn(libc::c_int) + Send + 'static) {
    std::thread::spawn(move || {
        let set = forwarded_set();
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads the set and writes one int we own.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                f(sig);
            }
        }
    });
}

/// Starts a monitor for `args` and waits until it has opened its streams.
/// With `detach` it gets a session of its own (`create`, `exec -d`);
/// without, it stays in the caller's process group (attached `run`/`exec`).
pub fn spawn(globals: &Globals, args: &MonitorArgs, preserve_fds: u32, detach: bool) -> Result<Child> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding", "/proc/self/exe", e))?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Sys(format!("pipe: {e}")))?;
    let ready_fd: RawFd = 3 + preserve_fds as RawFd;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&globals.config.root);
    if let Some(l) = &globals.log {
        cmd.arg("--log").arg(l);
    }
    if globals.log_format == log::Format::Json {
        cmd.args(["--log-format", "json"]);
    }
    if globals.debug {
        cmd.arg("--debug");
    }
    cmd.arg("monitor").arg(&args.id);
    if !args.exec_id.is_empty() {
        cmd.arg("--exec-id").arg(&args.exec_id);
    }
    if args.terminal {
        cmd.arg("--terminal");
    }
    if let Some(s) = &args.console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    cmd.arg("--ready-fd").arg(ready_fd.to_string());
    if args.console_socket.is_some() {
        // The process's terminal is the pty whose master goes over the
        // socket; like runc's init, the monitor keeps none of the caller's
        // stdio. containerd's shim reads `create`'s output to EOF before
        // it takes the master (go-runc's cmdOutput), so a monitor holding
        // it would keep the container in `created` for ever.
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    }
    let raw_w = ready_w.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl, close_range,
    // close) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if detach {
                libc::setsid();
            }
            if raw_w == ready_fd {
                libc::fcntl(ready_fd, libc::F_SETFD, 0);
            } else if libc::dup2(raw_w, ready_fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Everything above the preserved descriptors and the ready pipe
            // is the caller's business, not the monitor's.
            let first = (ready_fd + 1) as libc::c_uint;
            if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) != 0 {
                for fd in first as RawFd..4096 {
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Sys(format!("starting the monitor: {e}")))?;
    drop(ready_w);
    let mut reply = String::new();
    let _ = File::from(ready_r).read_to_string(&mut reply);
    if reply.starts_with("OK") {
        return Ok(child);
    }
    let _ = child.kill();
    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
    let why = reply.strip_prefix("ERR ").unwrap_or(&reply).trim().to_string();
    Err(Error::Sys(if why.is_empty() {
        format!("the monitor of {} exited before it was ready ({status})", args.id)
    } else {
        why
    }))
}

/// The host side of one process's stdio, opened but not yet copying.
enum Streams {
    Pipes {
        stdin: UnixStream,
        stdout: UnixStream,
        stderr: UnixStream,
    },
    Tty {
        stream: UnixStream,
        /// The host slave with `--console-socket`, else our own 0/1.
        host_in: RawFd,
        host_out: RawFd,
        slave: Option<OwnedFd>,
        raw: Option<console::RawMode>,
    },
}

/// The monitor process's body; returns its exit status.
pub fn run(globals: &Globals, args: &MonitorArgs, ready_fd: RawFd) -> i32 {
    block_forwarded_signals();
    // SAFETY: the ready descriptor was handed to us by `spawn` and nothing
    // else in this process owns it.
    let mut ready = unsafe { File::from_raw_fd(ready_fd) };
    let target = Target::of(args);
    let streams = match open(&globals.config, &target, args.terminal, args.console_socket.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            log::error(&format!("monitor of {}: {e}", args.id));
            let _ = writeln!(ready, "ERR {}", e.to_string().replace('\n', " "));
            return 1;
        }
    };
    let _ = ready.write_all(b"OK\n");
    drop(ready);
    let code = supervise(&globals.config, &target, streams);
    if args.exec_id.is_empty() {
        if let Some(code) = code {
            if let Err(e) = store::update(&globals.config, &args.id, |r| r.exit_code = Some(code)) {
                log::error(&format!("monitor of {}: recording the exit status: {e}", args.id));
            }
        }
    }
    code.unwrap_or(255)
}

/// The process whose stdio is carried: the sandbox whose agent serves it,
/// and the process as that agent names it.
#[derive(Debug, Clone)]
pub struct Target {
    pub sandbox: String,
    pub container: String,
    /// Empty for the container's init.
    pub exec_id: String,
}

impl Target {
    /// A `tegmen` container's process: its sandbox has the container's id.
    fn of(args: &MonitorArgs) -> Target {
        Target {
            sandbox: args.id.clone(),
            container: args.id.clone(),
            exec_id: args.exec_id.clone(),
        }
    }
}

/// Carries `target`'s stdio on this process's own stdin/stdout/stderr (or,
/// with `terminal`, its terminal in raw mode), forwards signals, and
/// returns the exit status once the process has exited and its output is
/// drained (`None`: its VM went away first). For `supervisor exec`.
pub fn attach(config: &Config, target: &Target, terminal: bool) -> Result<Option<i32>> {
    block_forwarded_signals();
    let streams = open(config, target, terminal, None)?;
    Ok(supervise(config, target, streams))
}

fn open(config: &Config, target: &Target, terminal: bool, console_socket: Option<&std::path::Path>) -> Result<Streams> {
    let endpoint = super::stream_endpoint(config, &target.sandbox);
    let open = |kind| {
        endpoint
            .open(&target.container, &target.exec_id, kind)
            .map_err(Error::from)
    };
    if !terminal {
        return Ok(Streams::Pipes {
            stdout: open(StreamKind::Stdout)?,
            stderr: open(StreamKind::Stderr)?,
            stdin: open(StreamKind::Stdin)?,
        });
    }
    let stream = open(StreamKind::Tty)?;
    if let Some(path) = console_socket {
        let (master, slave) = console::open_pty()?;
        console::send_console(path, &master)?;
        drop(master);
        let fd = slave.as_raw_fd();
        return Ok(Streams::Tty {
            stream,
            host_in: fd,
            host_out: fd,
            slave: Some(slave),
            raw: None,
        });
    }
    let raw = if console::is_tty(0) {
        console::RawMode::enter(0)
    } else {
        None
    };
    Ok(Streams::Tty {
        stream,
        host_in: 0,
        host_out: 1,
        slave: None,
        raw,
    })
}

/// Milliseconds since `start`, shared by the copy threads as "last progress".
struct Progress {
    start: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A copy of `fd` as a File (so dropping it leaves `fd` open).
fn dup_file(fd: RawFd) -> Option<File> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (or -1) that we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: `new` is a fresh descriptor nothing else owns.
    (new >= 0).then(|| unsafe { File::from_raw_fd(new) })
}

/// Copies until EOF or a read error. Write errors (the reader went away)
/// do not stop the copy: the rest is discarded, so the process never
/// blocks on a full pipe.
fn copy(mut from: impl Read, mut to: Option<impl Write>, progress: Option<&Progress>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if let Some(p) = progress {
            p.touch();
        }
        if let Some(w) = to.as_mut() {
            if w.write_all(&buf[..n]).is_err() {
                to = None;
            }
        }
    }
}

/// Copies, forwards signals and waits; the exit status, `None` when the
/// VM went away first.
fn supervise(config: &Config, target: &Target, streams: Streams) -> Option<i32> {
    // Agent connections are opened when needed and not kept: an idle ttrpc
    // client polls its socket every 10 ms, which adds up over many
    // containers.
    let (config, sandbox) = (config.clone(), target.sandbox.clone());
    let connect = move || super::connect_agent(&config, &sandbox);
    let (id, exec) = (target.container.as_str(), target.exec_id.as_str());
    let progress = Arc::new(Progress {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let mut outputs = Vec::new();
    match streams {
        Streams::Pipes { stdin, stdout, stderr } => {
            std::thread::spawn(move || {
                if let Some(input) = dup_file(0) {
                    copy(input, Some(&stdin), None);
                }
                let _ = stdin.shutdown(Shutdown::Write);
            });
            for (stream, fd) in [(stdout, 1), (stderr, 2)] {
                let p = progress.clone();
                outputs.push(std::thread::spawn(move || copy(stream, dup_file(fd), Some(&p))));
            }
        }
        Streams::Tty {
            stream,
            host_in,
            host_out,
            slave,
            raw,
        } => {
            let input = stream.try_clone().ok();
            let host = dup_file(host_in);
            if let (Some(input), Some(host)) = (input, host) {
                std::thread::spawn(move || copy(host, Some(&input), None));
            }
            let p = progress.clone();
            let out = dup_file(host_out);
            outputs.push(std::thread::spawn(move || copy(stream, out, Some(&p))));
            // Window sizes: polled.
            let (connect, id, exec) = (connect.clone(), id.to_string(), exec.to_string());
            std::thread::spawn(move || {
                let mut last = None;
                loop {
                    let size = console::window_size(host_in);
                    if size.is_some() && size != last {
                        if let (Some((rows, cols)), Ok(a)) = (size, connect()) {
                            if a.resize_tty(&id, &exec, rows.into(), cols.into()).is_ok() {
                                last = size;
                            }
                        }
                    }
                    std::thread::sleep(RESIZE_POLL);
                }
            });
            // Keep the slave and the raw-mode guard until the process ends.
            std::mem::forget(slave);
            if let Some(raw) = raw {
                RAW.with(|r| *r.borrow_mut() = Some(raw));
            }
        }
    }
    {
        let (connect, id, exec) = (connect.clone(), id.to_string(), exec.to_string());
        spawn_signal_thread(move |sig| {
            if sig == libc::SIGWINCH {
                // The size poll picks the new size up.
                return;
            }
            log::debug(&format!("monitor of {id}: forwarding signal {sig}"));
            if let Ok(a) = connect() {
                let _ = a.signal_process(&id, &exec, sig as u32, false);
            }
        });
    }
    if exec.is_empty() {
        // The init's output ends when it has exited: its PID namespace goes
        // with it, and every copy of its stdio is closed. (An exec's
        // background children may keep its stdio open past its exit, so an
        // exec is waited for at once.)
        for h in outputs.drain(..) {
            let _ = h.join();
        }
    }
    let waited = connect().and_then(|a| Ok(a.wait_process(id, exec)?));
    let code = match waited {
        Ok(r) => Some(r.exit_code),
        Err(e) => {
            log::warn(&format!("monitor of {id}: {e}"));
            None
        }
    };
    // Drain what the process wrote before it exited.
    progress.touch();
    for h in outputs {
        while !h.is_finished() && progress.idle() < DRAIN_IDLE {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    RAW.with(|r| drop(r.borrow_mut().take()));
    if !exec.is_empty() && code.is_some() {
        // The exec is over and its output drained: the agent may forget it.
        if let Err(e) = connect().and_then(|a| Ok(a.remove_process(id, exec)?)) {
            log::debug(&format!("monitor of {id} exec {exec}: {e}"));
        }
    }
    code
}

thread_local! {
    /// The user's terminal in raw mode (attached `run -t`), restored at exit.
    static RAW: std::cell::RefCell<Option<console::RawMode>> = const { std::cell::RefCell::new(None) };
}
