//! The agent's ends of a container process's stdio: three pipes when the
//! process has no terminal, or the master of a pty when it has one.
//!
//! Pipes keep what the process wrote after it exits: the agent holds the
//! read ends until the transport takes them and reads them to EOF. With a
//! terminal, libcontainer opens the pty inside the container (on its own
//! devpts, like runc) and sends the master over a console socket, which the
//! agent listens on here.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::pipe2;

/// The process's ends: what libcontainer makes its stdin, stdout and stderr.
pub(super) struct ChildPipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends: the write end of stdin, the read ends of stdout/stderr.
pub(super) struct AgentPipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

pub(super) fn pipes() -> std::io::Result<(AgentPipes, ChildPipes)> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        AgentPipes {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        },
        ChildPipes {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
    ))
}

/// A close-on-exec pipe whose descriptors are above 2, so that
/// libcontainer's `dup2(fd, 0..2)` + `close(fd)` never closes the very
/// descriptor it just made stdio (the agent's 0-2 may be closed).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The socket libcontainer's init sends the pty master to (runc's
/// `--console-socket`). The file is removed when this is dropped.
pub(super) struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> std::io::Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        let listener = bind_long(path)?;
        listener.set_nonblocking(true)?;
        Ok(ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master the container's process sent. It was sent
    /// before libcontainer reported the process ready, so it is waiting on
    /// the socket already: nothing here blocks for long.
    pub fn receive_master(&self) -> std::io::Result<OwnedFd> {
        let (conn, _) = self.listener.accept().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                std::io::Error::new(e.kind(), "the container process did not connect to the console socket")
            } else {
                e
            }
        })?;
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut master = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS delivered a new descriptor that
                    // nothing else in this process owns.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if master.is_none() {
                        master = Some(owned);
                    }
                }
            }
        }
        master.ok_or_else(|| std::io::Error::other("the console socket message carried no pty master"))
    }
}

/// Binds a Unix socket at `path` even when it is longer than `sun_path`
/// (108 bytes; container ids of 64 characters under a state root get
/// there): the address given to the kernel is then
/// `/proc/self/fd/<dir>/<name>`, with the directory held open for the call.
/// libcontainer connects through a short symlink in the container's own
/// directory, so the long path never has to fit an address.
fn bind_long(path: &Path) -> std::io::Result<UnixListener> {
    const SUN_PATH_MAX: usize = 107;
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixListener::bind(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path has no file name",
        ));
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
    UnixListener::bind(short)
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets the terminal's window size (the process gets SIGWINCH).
pub(super) fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid
    // for the duration of the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
