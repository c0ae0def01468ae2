//! A process's stdio between containerd's side (FIFOs, or a `file://`
//! log) and its guest streams.
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
}

/// Parses a stdio path as containerd passes it: empty, a FIFO path (no
/// scheme, or `fifo://`), `file:///path`. `binary://` loggers are refused.
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
    if uri.starts_with("binary://") {
        return Err(format!("stdio {uri}: binary:// log drivers are not supported yet"));
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
}

fn open_writer(target: &Target) -> std::io::Result<Option<File>> {
    match target {
        Target::None => Ok(None),
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
        };
        let clone = |s: &UnixStream| s.try_clone().map_err(|e| err("a stream", e));
        if paths.terminal {
            let tty = endpoint.open(container_id, exec_id, StreamKind::Tty)?;
            io.guest.push(clone(&tty)?);
            let w = open_writer(&stdout).map_err(|e| err(&paths.stdout, e))?;
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
        let out_w = open_writer(&stdout).map_err(|e| err(&paths.stdout, e))?;
        let err_w = if stderr == stdout && matches!(stdout, Target::File(_)) {
            out_w
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(|e| err(&paths.stderr, e))?
        } else {
            open_writer(&stderr).map_err(|e| err(&paths.stderr, e))?
        };
        for (kind, w) in [(StreamKind::Stdout, out_w), (StreamKind::Stderr, err_w)] {
            let s = endpoint.open(container_id, exec_id, kind)?;
            io.guest.push(clone(&s)?);
            io.outputs.push(copy_out(s, w, progress.clone()));
        }
        Ok(io)
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
        assert!(parse_uri("binary:///usr/bin/logger?x=1")
            .unwrap_err()
            .contains("binary://"));
        assert!(parse_uri("http://x").unwrap_err().contains("unknown scheme"));
    }
}
