//! Unix-socket plumbing the muxer needs and `std` does not offer.
//!
//! Three things: binding the hybrid-vsock listener (at a path of any length,
//! see [`crate::unix_path`], replacing a stale socket file), connecting to
//! `<uds_path>_<port>` without blocking (a Unix listener with a full
//! backlog would otherwise stall the whole device), and sending with
//! `MSG_NOSIGNAL` so a host client that went away yields `EPIPE` rather than
//! a `SIGPIPE`, whatever the embedding program does with that signal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::Error;
use crate::unix_path::{self, SUN_PATH_MAX};

/// Remove `path` if it is a socket left behind by an earlier run. Anything
/// else at that path is an error: it is not ours to delete.
pub fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
        Ok(_) => Err(Error::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Bind a non-blocking Unix listener at `path`, replacing a stale socket.
pub fn bind_listener(path: &Path) -> Result<UnixListener, Error> {
    remove_stale_socket(path)?;
    let listener = unix_path::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener.set_nonblocking(true).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(listener)
}

/// Connect a non-blocking Unix stream to `path`. For `AF_UNIX` this either
/// completes at once or fails (`EAGAIN` when the listener's backlog is full,
/// `ECONNREFUSED`, `ENOENT`, ...); it never leaves a connect in progress.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    unix_path::with_short_path(path, connect_nonblocking_short)
}

fn connect_nonblocking_short(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > SUN_PATH_MAX || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: `sockaddr_un` is plain old data, for which all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // `bytes.len() <= SUN_PATH_MAX < sun_path.len()`, so the path fits and
    // the byte after it stays NUL.
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is an initialised `sockaddr_un` and `len` does not
        // exceed its size; `owned` is a valid socket.
        let ret = unsafe {
            libc::connect(
                owned.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(UnixStream::from(owned));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`, retrying on `EINTR`.
pub fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes.
    unsafe { send_raw(fd, buf.as_ptr(), buf.len()) }
}

/// [`send_nosignal`] straight out of guest memory.
pub fn send_volatile<B: BitmapSlice>(fd: RawFd, buf: &VolatileSlice<'_, B>) -> io::Result<usize> {
    let guard = buf.ptr_guard();
    // SAFETY: `guard` keeps the mapping behind `buf` alive and valid for
    // reads of `buf.len()` bytes; send(2) only reads from it.
    unsafe { send_raw(fd, guard.as_ptr(), buf.len()) }
}

/// Non-blocking `send(2)` of `len` bytes at `ptr` without SIGPIPE,
/// retrying on `EINTR`.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the whole call.
unsafe fn send_raw(fd: RawFd, ptr: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
        let ret = unsafe {
            libc::send(
                fd,
                ptr.cast::<libc::c_void>(),
                len,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn long_paths_bind_and_connect() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(120));
        std::fs::create_dir(&deep).unwrap();
        let sock = deep.join("vsock_1025");
        let l = bind_listener(&sock).unwrap();
        let mut c = connect_nonblocking(&sock).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(send_nosignal(s.as_raw_fd(), b"ok").unwrap(), 2);
        let mut buf = [0u8; 2];
        c.set_nonblocking(false).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    }

    #[test]
    fn stale_socket_is_replaced_but_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let first = UnixListener::bind(&sock).unwrap();
        drop(first); // leaves the socket file behind
        let l = bind_listener(&sock).unwrap();
        let mut c = connect_nonblocking(&sock).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(send_nosignal(s.as_raw_fd(), b"hi").unwrap(), 2);
        let mut buf = [0u8; 2];
        c.set_nonblocking(false).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");

        let file = dir.path().join("f");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind_listener(&file), Err(Error::NotASocket { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn connect_to_nothing_fails_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connect_nonblocking(&dir.path().join("none")).is_err());
    }

    #[test]
    fn send_to_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send_nosignal(a.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
