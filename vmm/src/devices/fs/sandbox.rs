//! Confining a backend process to the shared directory (or to the
//! directory of its sockets).
//!
//! The passthrough file system resolves names relative to directory fds, and
//! [`super::confined::ConfinedFs`] refuses names that would walk; the
//! sandbox is the second wall. A process serving one share calls
//! [`enter_chroot`] once, single-threaded, after it has opened what it needs
//! from outside (its listening socket, `/proc/self/fd` — opened by
//! [`super::FsDevice::new`]) and before it serves anything:
//!
//! 1. `unshare(CLONE_NEWNS)`: a mount namespace of its own, so nothing below
//!    leaks to the host;
//! 2. every mount made a slave (`MS_REC | MS_SLAVE`): nothing mounted here
//!    reaches the host, while mounts the host makes below a *shared* mount
//!    do reach us. The supervisor makes the share a shared mount before it
//!    starts a backend, so a container added to a running sandbox (its
//!    rootfs bind-mounted below the share) appears to the guest at once,
//!    and its unmount propagates the same way;
//! 3. the share bind-mounted onto itself, which makes it a mount point;
//! 4. `pivot_root(".", ".")` inside it and a lazy unmount of the old root
//!    stacked on top: the share is now `/` and the host tree is gone from
//!    the namespace. Where `pivot_root` is refused (the current root is not
//!    a mount point, as in some containers) it falls back to `chroot(".")`.
//!
//! Afterwards `..` of `/` is `/`, and an absolute symlink inside the share
//! resolves inside the share. This is the same idea as virtiofsd's
//! sandbox, in our own code; it does not drop capabilities or install a
//! seccomp filter.
//!
//! A process that serves sockets rather than files (the vsock and net
//! backends) calls [`enter_socket_dir`] instead: the same pivot into the
//! directory of its sockets, but every mount made private and the
//! directory bound alone, without the mounts below it. It then holds no
//! copy of the share's container mounts (which would keep their file
//! systems busy after the host unmounts them) and sees nothing the host
//! mounts later.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How a backend process confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// No confinement beyond the fd-relative passthrough (tests, debugging).
    None,
    /// Private mount namespace, pivot into the share (the default).
    #[default]
    Chroot,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(SandboxMode::None),
            "chroot" => Ok(SandboxMode::Chroot),
            other => Err(format!("unknown sandbox mode {other:?} (expected none or chroot)")),
        }
    }
}

impl std::fmt::Display for SandboxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxMode::None => "none",
            SandboxMode::Chroot => "chroot",
        })
    }
}

/// A step of [`enter_chroot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The process already runs other threads, which would keep the old
    /// root (chroot and namespaces are per thread until they are shared).
    #[error("cannot sandbox: the process has {0} threads, it must enter the sandbox before starting any")]
    Threaded(usize),
    /// A system call failed.
    #[error("cannot sandbox into {}: {step}: {error}", dir.display())]
    Step {
        /// The directory to sandbox into.
        dir: PathBuf,
        /// Which step failed.
        step: &'static str,
        /// The errno.
        error: io::Error,
    },
    /// After the pivot, `/` is not the directory entered.
    #[error("sandbox check failed: / is not {} after the pivot", .0.display())]
    Verify(PathBuf),
}

fn threads_of_self() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make `dir` the root of this process, in a mount namespace of its own;
/// see the module docs. Must be called while the process is
/// single-threaded. On success the working directory is `/`.
pub fn enter_chroot(dir: &Path) -> Result<(), SandboxError> {
    pivot_into(dir, HostMounts::Followed)
}

/// Make `dir` the root of this process, in a mount namespace of its own
/// where no mount below `dir` exists and none of the host's reaches; see
/// the module docs. Single-threaded, like [`enter_chroot`].
pub fn enter_socket_dir(dir: &Path) -> Result<(), SandboxError> {
    pivot_into(dir, HostMounts::Hidden)
}

/// What a sandbox sees of the host's mounts below its root.
#[derive(Clone, Copy)]
enum HostMounts {
    /// Those there now and those made later (slave propagation, the
    /// directory bound recursively): the fs backend's view of the share.
    Followed,
    /// None (private propagation, the directory bound alone).
    Hidden,
}

fn pivot_into(dir: &Path, host_mounts: HostMounts) -> Result<(), SandboxError> {
    let step = |step: &'static str| {
        move |error: io::Error| SandboxError::Step {
            dir: dir.to_path_buf(),
            step,
            error,
        }
    };

    let threads = threads_of_self().map_err(step("count threads in /proc/self/task"))?;
    if threads != 1 {
        return Err(SandboxError::Threaded(threads));
    }

    let dir = std::fs::canonicalize(dir).map_err(step("resolve the directory"))?;
    let want = std::fs::metadata(&dir).map_err(step("stat the directory"))?;
    let step = |step: &'static str| {
        let dir = dir.clone();
        move |error: io::Error| SandboxError::Step { dir, step, error }
    };
    let cdir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
        .map_err(step("path contains NUL"))?;

    // SAFETY: unshare takes a flag word and touches no memory of ours.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(step("unshare(CLONE_NEWNS)"))?;

    let (propagation, bind, make_them) = match host_mounts {
        HostMounts::Followed => (
            libc::MS_SLAVE,
            libc::MS_BIND | libc::MS_REC,
            "make mounts slaves (MS_REC|MS_SLAVE on /)",
        ),
        HostMounts::Hidden => (
            libc::MS_PRIVATE,
            libc::MS_BIND,
            "make mounts private (MS_REC|MS_PRIVATE on /)",
        ),
    };

    // SAFETY: all pointers are NUL-terminated C strings that outlive the
    // call, or null where mount(2) allows it.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | propagation,
            std::ptr::null(),
        )
    })
    .map_err(step(make_them))?;

    // SAFETY: as above.
    check(unsafe { libc::mount(cdir.as_ptr(), cdir.as_ptr(), std::ptr::null(), bind, std::ptr::null()) })
        .map_err(step("bind-mount the directory onto itself"))?;

    // SAFETY: cdir is a valid C string.
    check(unsafe { libc::chdir(cdir.as_ptr()) }).map_err(step("chdir into the directory"))?;

    // SAFETY: pivot_root takes two C strings that outlive the call.
    let pivot = check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int });
    match pivot {
        Ok(()) => {
            // The old root now sits on top of the new one; detach it.
            // SAFETY: "." is a valid C string.
            check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }).map_err(step("detach the old root"))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!("pivot_root refused ({e}); falling back to chroot");
            // SAFETY: "." is a valid C string.
            check(unsafe { libc::chroot(c".".as_ptr()) }).map_err(step("chroot(.)"))?;
        }
        Err(e) => return Err(step("pivot_root(., .)")(e)),
    }
    // SAFETY: "/" is a valid C string.
    check(unsafe { libc::chdir(c"/".as_ptr()) }).map_err(step("chdir(/)"))?;

    let got = std::fs::metadata("/").map_err(step("stat the new root"))?;
    if got.dev() != want.dev() || got.ino() != want.ino() {
        return Err(SandboxError::Verify(dir));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_sandbox_mode_parse() {
        assert_eq!("none".parse::<SandboxMode>().unwrap(), SandboxMode::None);
        assert_eq!("chroot".parse::<SandboxMode>().unwrap(), SandboxMode::Chroot);
        assert!("jail".parse::<SandboxMode>().is_err());
        assert_eq!(SandboxMode::default(), SandboxMode::Chroot);
    }

    #[test]
    fn fs_sandbox_refuses_a_threaded_process() {
        // The test harness runs this on a worker thread next to the main
        // thread: the process is threaded, and nothing may be unshared.
        let dir = tempfile::tempdir().unwrap();
        match enter_chroot(dir.path()) {
            Err(SandboxError::Threaded(n)) => assert!(n > 1),
            other => panic!("expected Threaded, got {other:?}"),
        }
    }

    /// In a forked child (single-threaded by construction), enter the
    /// sandbox and look around: `/` must be the share, `/..` too, and an
    /// absolute symlink must resolve inside the share.
    #[test]
    fn fs_sandbox_pivots_into_the_share() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), b"inside").unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/hostname"), b"share-hostname").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        let path = dir.path().to_path_buf();

        // SAFETY: the child only runs code below and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = (|| {
                if let Err(e) = enter_chroot(&path) {
                    eprintln!("enter_chroot: {e}");
                    return 10;
                }
                if std::fs::read("/marker").ok().as_deref() != Some(&b"inside"[..]) {
                    return 11;
                }
                if std::fs::read("/../../marker").ok().as_deref() != Some(&b"inside"[..]) {
                    return 12;
                }
                if std::fs::read("/link").ok().as_deref() != Some(&b"share-hostname"[..]) {
                    return 13;
                }
                if Path::new("/proc/self").exists() || Path::new("/usr").exists() {
                    return 14;
                }
                0
            })();
            // SAFETY: leaving the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "see the child's exit code");
        // The host's view of the share is untouched.
        assert!(dir.path().join("marker").exists());
    }

    fn sys(what: &str, ret: libc::c_int) {
        if ret != 0 {
            eprintln!("{what}: {}", io::Error::last_os_error());
            // SAFETY: leaving a forked child.
            unsafe { libc::_exit(20) };
        }
    }

    fn cstr(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    /// One byte over a pipe: the two sides of the propagation test take turns.
    fn send(fd: libc::c_int) {
        // SAFETY: writing one byte from a local buffer.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
    fn recv(fd: libc::c_int) -> bool {
        let mut b = 0u8;
        // SAFETY: reading one byte into a local buffer.
        unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) == 1 }
    }

    fn wait_child(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// The host side makes the share a shared mount (as the supervisor
    /// does) in a mount namespace of its own; a backend child enters the
    /// sandbox; then a mount the host makes below the share shows in the
    /// backend, its unmount too, and a mount the backend makes stays in
    /// the backend.
    #[test]
    fn fs_sandbox_sees_host_mounts_made_after_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir_all(share.join("late")).unwrap();
        std::fs::create_dir_all(share.join("own")).unwrap();
        let extra = dir.path().join("extra");
        std::fs::create_dir(&extra).unwrap();
        std::fs::write(extra.join("hello"), b"from the host").unwrap();

        // SAFETY: the child only runs code below and leaves with _exit.
        let host = unsafe { libc::fork() };
        assert!(host >= 0);
        if host == 0 {
            // The "host": a private copy of the test machine's mounts.
            // SAFETY: plain system calls on C strings that outlive them.
            unsafe {
                sys("unshare", libc::unshare(libc::CLONE_NEWNS));
                let null = std::ptr::null::<libc::c_char>();
                let no_data = std::ptr::null::<libc::c_void>();
                sys(
                    "rprivate",
                    libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, no_data),
                );
                let s = cstr(&share);
                sys(
                    "bind share",
                    libc::mount(s.as_ptr(), s.as_ptr(), null, libc::MS_BIND, no_data),
                );
                sys(
                    "make shared",
                    libc::mount(null, s.as_ptr(), null, libc::MS_SHARED, no_data),
                );
            }
            let mut to_backend = [0; 2];
            let mut to_host = [0; 2];
            // SAFETY: pipe writes two fds into the arrays.
            unsafe {
                sys("pipe", libc::pipe(to_backend.as_mut_ptr()));
                sys("pipe", libc::pipe(to_host.as_mut_ptr()));
            }
            // SAFETY: as above.
            let backend = unsafe { libc::fork() };
            if backend == 0 {
                // SAFETY: closing our copies of the other side's ends, so
                // a side that dies gives the other EOF instead of a hang.
                unsafe {
                    libc::close(to_host[0]);
                    libc::close(to_backend[1]);
                }
                let code = (|| {
                    if let Err(e) = enter_chroot(&share) {
                        eprintln!("enter_chroot: {e}");
                        return 10;
                    }
                    send(to_host[1]);
                    // The host has mounted `extra` on late/.
                    if !recv(to_backend[0]) {
                        return 11;
                    }
                    if std::fs::read("/late/hello").ok().as_deref() != Some(&b"from the host"[..]) {
                        return 12;
                    }
                    // SAFETY: mounting a tmpfs on a directory of ours.
                    let r = unsafe {
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            c"/own".as_ptr(),
                            c"tmpfs".as_ptr(),
                            0,
                            std::ptr::null(),
                        )
                    };
                    if r != 0 {
                        return 13;
                    }
                    std::fs::write("/own/mine", b"x").unwrap();
                    send(to_host[1]);
                    // The host has unmounted late/.
                    if !recv(to_backend[0]) {
                        return 14;
                    }
                    if Path::new("/late/hello").exists() {
                        return 15;
                    }
                    0
                })();
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(code) };
            }
            // SAFETY: as in the backend.
            unsafe {
                libc::close(to_host[1]);
                libc::close(to_backend[0]);
            }
            let code = (|| {
                if !recv(to_host[0]) {
                    return 30;
                }
                let late = cstr(&share.join("late"));
                let src = cstr(&extra);
                // SAFETY: C strings that outlive the call.
                if unsafe {
                    libc::mount(
                        src.as_ptr(),
                        late.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                } != 0
                {
                    return 31;
                }
                send(to_backend[1]);
                if !recv(to_host[0]) {
                    return 100 + wait_child(backend); // the backend failed
                }
                if share.join("own/mine").exists() {
                    return 33; // the backend's mount leaked out
                }
                // SAFETY: as above.
                if unsafe { libc::umount2(late.as_ptr(), 0) } != 0 {
                    return 34;
                }
                send(to_backend[1]);
                wait_child(backend)
            })();
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(code) };
        }
        assert_eq!(wait_child(host), 0, "see the exit codes in the test");
    }
}
