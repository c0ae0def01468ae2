//! Unix socket paths of any length.
//!
//! A socket address holds at most 107 bytes of path (`sun_path`), and a
//! sandbox's sockets live at `<root>/sandboxes/<id>/…`: a 64-character
//! container id under a root such as containerd's
//! `/run/containerd/runc/k8s.io` does not fit. Binding or connecting
//! through `/proc/self/fd/<dir>/<name>`, with the socket's directory held
//! open for the call, names the same file in a short address.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest path that fits `sockaddr_un.sun_path` (108 bytes with the NUL).
pub const SUN_PATH_MAX: usize = 107;

/// Calls `f` with a path to `path` that fits a socket address: `path`
/// itself when short enough, else one through its open directory.
pub fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} has no file name", path.display()),
        ));
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir = std::fs::File::open(dir)?;
    let short: PathBuf = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
    if short.as_os_str().len() > SUN_PATH_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let result = f(&short);
    drop(dir);
    result
}

/// `UnixListener::bind` for a path of any length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    with_short_path(path, |p| UnixListener::bind(p))
}

/// `UnixStream::connect` for a path of any length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    with_short_path(path, |p| UnixStream::connect(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn long_paths_bind_and_connect() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        while deep.as_os_str().len() < 200 {
            deep.push("a-fairly-long-directory-name");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("vhost-vsock.sock");
        assert!(UnixListener::bind(&path).is_err(), "the plain bind should not fit");

        let listener = bind(&path).unwrap();
        assert!(path.exists(), "the socket file is at the long path");
        let mut client = connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");

        // Short paths are used as they are.
        let short = dir.path().join("s.sock");
        let _l = bind(&short).unwrap();
        connect(&short).unwrap();
        // A missing directory is an error, not a panic.
        let e = connect(&deep.join("missing/x.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
