//! A process's stdio between containerd's side (FIFOs, a `file://` log,
//! or a `binary://` logging program) and its guest streams.
//!
//! Each output stream is copied by a thread of its own, blocking, so the
//! guest waits when the reader is slow and nothing is dropped. When the
//! process has exited, [`ProcessIo::drain`] lets the copies run until
//! they end by themselves or make no progress for [`DRAIN_IDLE`] (a
//! background child may hold an exec's stdout for ever: CRI's ExecSync
//! would wait with it), then cuts the guest streams and closes the
//! writers. Exits are reported only after that, so a reader that saw the
//! exit has every byte.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tegmen_agent_api::stream::StreamKind;

use crate::agent_client::StreamEndpoint;

/// How long output copies may go on without progress after an exit.
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// Where one of containerd's stdio URIs points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    Fifo(PathBuf),
    /// `file:///path`: both output streams appended to one file.
    File(PathBuf),
    /// `binary:///path?k=v&…`: a logging program started for the process,
    /// reading stdout on fd 3 and stderr on fd 4, ready once it closes fd 5
    /// (containerd's protocol; its arguments are the query's keys and
    /// values, in order).
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

/// How long a logging binary may take to say it is ready.
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a logging binary may take to end after its pipes closed,
/// before SIGTERM, and after SIGTERM, before SIGKILL.
const LOGGER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `%XX` and `+` of a URL query.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {s:?}"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

/// Parses a stdio path as containerd passes it: empty, a FIFO path (no
/// scheme, or `fifo://`), `file:///path`, `binary:///path?args`.
pub fn parse_uri(uri: &str) -> Result<Target, String> {
    if uri.is_empty() {
        return Ok(Target::None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!("stdio {uri}: a file:// log needs an absolute path"));
        }
        return Ok(Target::File(path.into()));
    }
    if let Some(path) = uri.strip_prefix("fifo://") {
        return Ok(Target::Fifo(path.into()));
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode(path).map_err(|e| format!("stdio {uri}: {e}"))?;
        if !path.starts_with('/') {
            return Err(format!("stdio {uri}: a binary:// logger needs an absolute path"));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(percent_decode(k).map_err(|e| format!("stdio {uri}: {e}"))?);
            if !v.is_empty() {
                args.push(percent_decode(v).map_err(|e| format!("stdio {uri}: {e}"))?);
            }
        }
        return Ok(Target::Binary {
            path: path.into(),
            args,
        });
    }
    if uri.contains("://") {
        return Err(format!("stdio {uri}: unknown scheme"));
    }
    Ok(Target::Fifo(uri.into()))
}

/// The stdio paths of one process, as containerd gave them.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// containerd's namespace, for a logging binary's environment.
    pub namespace: String,
}

impl StdioPaths {
    /// Checks every path's form before anything is created.
    pub fn validate(&self) -> Result<(), String> {
        parse_uri(&self.stdin)?;
        parse_uri(&self.stdout)?;
        parse_uri(&self.stderr)?;
        Ok(())
    }
}

#[derive(Default)]
struct Progress(AtomicU64);

impl Progress {
    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
    fn touch(&self) {
        self.0.store(Self::now_ms(), Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        Duration::from_millis(Self::now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// The copies of one running process.
pub struct ProcessIo {
    outputs: Vec<JoinHandle<()>>,
    /// Clones of the guest streams, to cut them after the drain.
    guest: Vec<UnixStream>,
    /// The stdin stream, to close it on CloseIO.
    stdin: Option<UnixStream>,
    /// containerd's stdin FIFO: its copy may still wait for a writer.
    stdin_fifo: Option<PathBuf>,
    progress: Arc<Progress>,
    /// A `binary://` logger of this process.
    logger: Option<Logger>,
}

/// A running `binary://` logger: ended gently by [`ProcessIo::drain`],
/// killed and reaped if dropped otherwise (an error before the process
/// ran), so none is left behind.
struct Logger(Option<std::process::Child>);

impl Logger {
    fn stop(mut self) {
        if let Some(child) = self.0.take() {
            stop_logger(child);
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a `binary://` logger for `container_id`: the write ends of its
/// stdout and stderr pipes, once it said it is ready.
fn start_logger(
    path: &std::path::Path,
    args: &[String],
    container_id: &str,
    namespace: &str,
) -> std::io::Result<(std::process::Child, File, File)> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let pipe = || -> std::io::Result<(File, File)> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        Ok((File::from(r), File::from(w)))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds: [OwnedFd; 3] = [out_r.into(), err_r.into(), ready_w.into()];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // Checked here: a failed exec after the descriptors were moved onto
    // 3..5 could go unreported.
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: access(2) on a NUL-terminated path we own.
    if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null());
    // SAFETY: dup2 is async-signal-safe; the descriptors stay open in the
    // parent until spawn returns. dup2 clears close-on-exec on the copies.
    unsafe {
        cmd.pre_exec(move || {
            // Move them above 5 first, so dup2 onto 3..5 cannot clobber one.
            let mut high = [0i32; 3];
            for (i, fd) in raw.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(fds);
    // Ready when it closes (or writes to) fd 5.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut ready_r = ready_r;
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(ready_r.read(&mut b));
    });
    match rx.recv_timeout(LOGGER_READY_TIMEOUT) {
        Ok(_) => Ok((child, out_w, err_w)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(std::io::Error::other(format!(
                "the logging binary {} was not ready within {}s",
                path.display(),
                LOGGER_READY_TIMEOUT.as_secs()
            )))
        }
    }
}

/// Waits for a logger to end once its pipes are closed: SIGTERM after
/// [`LOGGER_EXIT_TIMEOUT`], SIGKILL after as long again.
fn stop_logger(mut child: std::process::Child) {
    let wait = |child: &mut std::process::Child| {
        let deadline = std::time::Instant::now() + LOGGER_EXIT_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    if wait(&mut child) {
        return;
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    if !wait(&mut child) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn open_writer(target: &Target) -> std::io::Result<Option<File>> {
    match target {
        // A logger is started for both streams at once (start_logger).
        Target::None | Target::Binary { .. } => Ok(None),
        // The reader (containerd) opened its end before asking: this does
        // not block. O_RDWR would never fail, but hide a vanished reader.
        Target::Fifo(p) => OpenOptions::new().write(true).open(p).map(Some),
        Target::File(p) => OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(p)
            .map(Some),
    }
}

fn copy_out(mut from: UnixStream, mut to: Option<File>, progress: Arc<Progress>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            progress.touch();
            if let Some(w) = to.as_mut() {
                if w.write_all(&buf[..n]).is_err() {
                    // The reader went away: keep draining the guest so the
                    // process is not blocked on a full stream.
                    to = None;
                }
            }
        }
    })
}

fn copy_in(path: PathBuf, mut to: UnixStream) {
    std::thread::spawn(move || {
        // Blocks until containerd's writer is there (it opens before Create).
        let Ok(mut from) = File::open(&path) else {
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl ProcessIo {
    /// Opens the process's guest streams and starts the copies. For an
    /// init, call before StartContainer; for an exec, after ExecProcess.
    pub fn open(
        endpoint: &StreamEndpoint,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> crate::Result<ProcessIo> {
        let err = |what: &str, e: std::io::Error| crate::Error::Agent(format!("{container_id}: opening {what}: {e}"));
        let stdin = parse_uri(&paths.stdin).map_err(crate::Error::Agent)?;
        let stdout = parse_uri(&paths.stdout).map_err(crate::Error::Agent)?;
        let stderr = parse_uri(&paths.stderr).map_err(crate::Error::Agent)?;
        let progress = Arc::new(Progress::default());
        progress.touch();
        let mut io = ProcessIo {
            outputs: Vec::new(),
            guest: Vec::new(),
            stdin: None,
            stdin_fifo: None,
            progress: progress.clone(),
            logger: None,
        };
        // A logging binary takes both output streams (containerd gives
        // the same URI for stdout and stderr).
        let mut logged: Option<(File, File)> = None;
        if let Target::Binary { path, args } = &stdout {
            let (child, out_w, err_w) =
                start_logger(path, args, container_id, &paths.namespace).map_err(|e| err(&paths.stdout, e))?;
            io.logger = Some(Logger(Some(child)));
            logged = Some((out_w, err_w));
        }
        let clone = |s: &UnixStream| s.try_clone().map_err(|e| err("a stream", e));
        if paths.terminal {
            let tty = endpoint.open(container_id, exec_id, StreamKind::Tty)?;
            io.guest.push(clone(&tty)?);
            let w = match logged.take() {
                Some((out_w, _)) => Some(out_w),
                None => open_writer(&stdout).map_err(|e| err(&paths.stdout, e))?,
            };
            if let Target::Fifo(p) = &stdin {
                let s = clone(&tty)?;
                io.stdin = Some(clone(&tty)?);
                io.stdin_fifo = Some(p.clone());
                copy_in(p.clone(), s);
            }
            io.outputs.push(copy_out(tty, w, progress));
            return Ok(io);
        }
        if let Target::Fifo(p) = &stdin {
            let s = endpoint.open(container_id, exec_id, StreamKind::Stdin)?;
            io.stdin = Some(clone(&s)?);
            io.stdin_fifo = Some(p.clone());
            copy_in(p.clone(), s);
        }
        let (out_w, err_w) = match logged.take() {
            Some((o, e)) => (Some(o), Some(e)),
            None => io.writers(&stdout, &stderr, paths)?,
        };
        for (kind, w) in [(StreamKind::Stdout, out_w), (StreamKind::Stderr, err_w)] {
            let s = endpoint.open(container_id, exec_id, kind)?;
            io.guest.push(clone(&s)?);
            io.outputs.push(copy_out(s, w, progress.clone()));
        }
        Ok(io)
    }

    fn writers(
        &self,
        stdout: &Target,
        stderr: &Target,
        paths: &StdioPaths,
    ) -> crate::Result<(Option<File>, Option<File>)> {
        let err = |what: &str, e: std::io::Error| crate::Error::Agent(format!("opening {what}: {e}"));
        let out_w = open_writer(stdout).map_err(|e| err(&paths.stdout, e))?;
        let err_w = if stderr == stdout && matches!(stdout, Target::File(_)) {
            out_w
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(|e| err(&paths.stderr, e))?
        } else {
            open_writer(stderr).map_err(|e| err(&paths.stderr, e))?
        };
        Ok((out_w, err_w))
    }

    /// Closes the process's stdin (CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(s) = self.stdin.take() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    /// After the process exited: waits for the copies as the module docs
    /// say, then closes everything.
    pub fn drain(self) {
        self.progress.touch();
        for h in &self.outputs {
            while !h.is_finished() && self.progress.idle() < DRAIN_IDLE {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for s in &self.guest {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.outputs {
            let _ = h.join();
        }
        if let Some(s) = self.stdin {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(p) = self.stdin_fifo {
            // A stdin copy still waiting in open(2) for containerd's writer
            // gets one (ours, closed at once): it sees EOF and ends.
            let _ = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(p);
        }
        // The copies ended and dropped the pipes' write ends: the logger
        // sees EOF and flushes.
        if let Some(logger) = self.logger {
            logger.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_uris_are_parsed_as_containerd_writes_them() {
        assert_eq!(parse_uri("").unwrap(), Target::None);
        assert_eq!(
            parse_uri("/run/x/c-stdout").unwrap(),
            Target::Fifo("/run/x/c-stdout".into())
        );
        assert_eq!(parse_uri("fifo:///run/x").unwrap(), Target::Fifo("/run/x".into()));
        assert_eq!(
            parse_uri("file:///var/log/c.log").unwrap(),
            Target::File("/var/log/c.log".into())
        );
        assert!(parse_uri("file://relative").is_err());
        assert_eq!(
            parse_uri("binary:///usr/bin/my%20logger?--tag=a+b&-v&id=%2Fx").unwrap(),
            Target::Binary {
                path: "/usr/bin/my logger".into(),
                args: vec!["--tag".into(), "a b".into(), "-v".into(), "id".into(), "/x".into()],
            }
        );
        assert!(parse_uri("binary://relative").is_err());
        assert!(parse_uri("binary:///x?a=%zz").unwrap_err().contains("bad escape"));
        assert!(parse_uri("http://x").unwrap_err().contains("unknown scheme"));
    }

    #[test]
    fn a_logging_binary_gets_both_streams_and_its_environment_and_ends_at_eof() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("logger");
        std::fs::write(
            &script,
            "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\" > \"$1.env\"\n\
             cat <&3 > \"$1.out\" & cat <&4 > \"$1.err\"; wait\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let base = t.path().join("log");
        let args = vec![base.display().to_string(), "--x".into()];
        let (child, mut out, mut err) = start_logger(&script, &args, "c1", "k8s.io").unwrap();
        out.write_all(b"to stdout\n").unwrap();
        err.write_all(b"to stderr\n").unwrap();
        drop((out, err));
        let pid = child.id() as i32;
        stop_logger(child);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the logger was reaped"
        );
        let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", base.display())).unwrap();
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        assert_eq!(read("env"), format!("k8s.io/c1 {} --x\n", base.display()));
    }
}
