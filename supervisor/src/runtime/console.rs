//! Host terminals: the pty pair a monitor opens for `--console-socket`
//! (the master travels to the caller over the Unix socket in one
//! `SCM_RIGHTS` message, exactly as runc sends it), raw mode, and window
//! sizes read from the host side to pass on with `ResizeTty`.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};

use super::{Error, Result};

/// Opens a pty pair; returns (master, slave), the slave in raw mode: the
/// line discipline that matters is the guest's.
pub fn open_pty() -> Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(None, None).map_err(|e| Error::Sys(format!("openpty: {e}")))?;
    let mut t = termios::tcgetattr(&pty.slave).map_err(|e| Error::Sys(format!("tcgetattr: {e}")))?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(|e| Error::Sys(format!("tcsetattr: {e}")))?;
    Ok((pty.master, pty.slave))
}

/// Sends `master` over the Unix socket at `path` as runc does: one message
/// whose data is the terminal's name and whose control message carries the
/// descriptor.
pub fn send_console(path: &Path, master: &OwnedFd) -> Result<()> {
    let sock = tegmen_vmm::unix_path::connect(path).map_err(|e| Error::io("connecting to console socket", path, e))?;
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let name = b"/dev/ptmx";
    let iov = [IoSlice::new(name)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| Error::Sys(format!("sending the console to {}: {e}", path.display())))?;
    Ok(())
}

/// (rows, cols) of the terminal on `fd`, `None` if it is not one or has no
/// size yet.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts the terminal on `fd` in raw mode until dropped (an attached
/// `run -t` / `exec -t` on the user's terminal).
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    pub fn enter(fd: RawFd) -> Option<RawMode> {
        // SAFETY: the descriptor outlives this guard (it is one of 0/1/2).
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let saved = termios::tcgetattr(borrowed).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(borrowed, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(borrowed, SetArg::TCSANOW, &self.saved);
    }
}
