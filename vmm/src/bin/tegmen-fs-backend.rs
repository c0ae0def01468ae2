//! `tegmen-fs-backend`: the virtio-fs device as a vhost-user backend
//! process, serving one host directory to one VM.
//!
//! It listens on `--socket` (QEMU connects to it as the vhost-user client
//! with `-chardev socket,path=...`), confines itself to `--shared-dir`
//! (see `tegmen_vmm::devices::fs::sandbox`) in network, IPC and UTS
//! namespaces of its own with only the capabilities of serving files,
//! serves the single connection,
//! and exits 0 when QEMU disconnects. It does not die with the process that
//! started it — SIGHUP is ignored and no parent-death signal is set — since
//! the VM outlives the CLI that launched it. SIGTERM or SIGINT end it
//! early. Either way the socket file is removed.
//!
//! Logs go to stderr (`RUST_LOG` filters, default `info`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::{info, warn};
use tegmen_vmm::devices::fs::sandbox::{self, SandboxMode};
use tegmen_vmm::devices::fs::{CachePolicy, FsConfig, FsDevice, DEFAULT_TAG};
use tegmen_vmm::vhost_user::fs::{serve, FsBackend};
use vhost::vhost_user::Listener;

#[derive(Debug, Parser)]
#[command(
    name = "tegmen-fs-backend",
    version,
    about = "virtio-fs vhost-user backend serving one host directory"
)]
struct Args {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Host directory to share with the guest.
    #[arg(long, value_name = "DIR")]
    shared_dir: PathBuf,
    /// Mount tag (at most 36 bytes); must match QEMU's `tag=`.
    #[arg(long, default_value = DEFAULT_TAG)]
    tag: String,
    /// Confinement: `chroot` pivots into the shared directory in a private
    /// mount namespace; `none` serves it by path (tests only).
    #[arg(long, default_value_t = SandboxMode::Chroot)]
    sandbox: SandboxMode,
    /// Threads serving requests; 0 serves them on the vring thread.
    #[arg(long, default_value_t = 0, value_name = "N")]
    thread_pool_size: usize,
    /// Guest caching: never, auto or always.
    #[arg(long, default_value_t = CachePolicy::Auto)]
    cache: CachePolicy,
    /// Pass extended attributes through.
    #[arg(long)]
    xattr: bool,
    /// Number of request queues (besides the hiprio queue).
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_request_queues: u16,
    /// Serve the device's counters as one JSON line per connection on
    /// this Unix socket (`supervisor metrics` reads it).
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
    /// The syscall allow-list: `kill` (a syscall off it ends the process),
    /// `log` (logged by the kernel and allowed) or `off`.
    #[arg(long, value_name = "MODE", default_value_t = tegmen_vmm::seccomp::Mode::Kill)]
    seccomp: tegmen_vmm::seccomp::Mode,
}

/// The socket file, kept removable after the process has pivoted away from
/// the directory that holds it: an fd of that directory, the file name,
/// and the identity of the file we bound.
struct SocketFile {
    path: PathBuf,
    dir: File,
    name: CString,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Remove the socket if the file at its name is still the one we made.
    fn remove(&self) {
        // SAFETY: a zeroed stat is a valid out-buffer for fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: dir is an open directory fd, name a valid C string, st a
        // valid out-pointer.
        let r = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("cannot stat socket {}: {e}", self.path.display());
            }
            return;
        }
        if st.st_dev != self.dev || st.st_ino != self.ino {
            warn!("socket {} was replaced; leaving it", self.path.display());
            return;
        }
        // SAFETY: as above.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
            warn!(
                "cannot remove socket {}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }
}

fn open_dir(dir: &Path) -> io::Result<File> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid C string; the returned fd is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Check the socket path, remove a stale socket there, bind, and remember
/// how to remove it later.
fn bind_socket(path: &Path) -> Result<(UnixListener, SocketFile)> {
    let name = path
        .file_name()
        .with_context(|| format!("socket path {} has no file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("refusing to replace {}: it exists and is not a socket", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot stat socket path {}", path.display())),
    }
    let listener =
        tegmen_vmm::unix_path::bind(path).with_context(|| format!("cannot bind socket {}", path.display()))?;
    let bound = std::fs::symlink_metadata(path).with_context(|| format!("cannot stat socket {}", path.display()))?;
    let dir = open_dir(parent).with_context(|| format!("cannot open socket directory {}", parent.display()))?;
    let socket = SocketFile {
        path: path.to_path_buf(),
        dir,
        name: CString::new(name.as_bytes()).context("socket name contains NUL")?,
        dev: bound.dev(),
        ino: bound.ino(),
    };
    Ok((listener, socket))
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset takes valid
    // signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Ignore SIGHUP (the launcher's terminal going away must not end the VM's
/// file system) and block SIGTERM/SIGINT in every thread; a dedicated
/// thread waits for them. Called before any thread exists.
fn setup_signals() -> Result<()> {
    // SAFETY: installing SIG_IGN for SIGHUP has no memory effects.
    if unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error()).context("cannot ignore SIGHUP");
    }
    let set = sigset(&[libc::SIGTERM, libc::SIGINT]);
    // SAFETY: set is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r)).context("cannot block SIGTERM/SIGINT");
    }
    Ok(())
}

fn spawn_signal_thread(socket: Arc<SocketFile>) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = sigset(&[libc::SIGTERM, libc::SIGINT]);
            let mut sig: libc::c_int = 0;
            // SAFETY: set is initialised, sig a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                info!("signal {sig} received, exiting");
                socket.remove();
                std::process::exit(0);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    setup_signals()?;

    let mut host_config = FsConfig::new(&args.shared_dir);
    host_config.tag = args.tag.clone();
    host_config.cache = args.cache;
    host_config.xattr = args.xattr;
    host_config.num_request_queues = args.num_request_queues;
    host_config.validate()?;
    let shared_dir = std::fs::canonicalize(&args.shared_dir)
        .with_context(|| format!("shared directory {}", args.shared_dir.display()))?;

    let (listener, socket) = bind_socket(&args.socket)?;
    let socket = Arc::new(socket);
    // Bound here, by path, before the sandbox hides the directory.
    // Without it the device still works: a warning, not a failure.
    let stats = args.stats_socket.as_ref().and_then(|p| match bind_socket(p) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("counters not served on {}: {e:#}", p.display());
            None
        }
    });
    if let Ok(sock_dir) = std::fs::canonicalize(args.socket.parent().unwrap_or(Path::new("."))) {
        if sock_dir.starts_with(&shared_dir) {
            warn!(
                "socket {} lies inside the shared directory: the guest can see it",
                args.socket.display()
            );
        }
    }

    let result = (|| -> Result<()> {
        // The device opens /proc/self/fd now; in the sandbox the share is /.
        let device = match args.sandbox {
            SandboxMode::Chroot => {
                let mut cfg = host_config.clone();
                cfg.shared_dir = PathBuf::from("/");
                let device = FsDevice::new(cfg)?;
                sandbox::enter_chroot(&shared_dir)?;
                info!("sandboxed: {} is now /", shared_dir.display());
                device
            }
            SandboxMode::None => {
                warn!("no sandbox: serving {} by path", shared_dir.display());
                FsDevice::new(host_config.clone())?
            }
        };
        // The sandbox is entered; own namespaces, and serving files keeps
        // a few capabilities (every thread from here on inherits just
        // those).
        tegmen_vmm::privileges::confine(tegmen_vmm::privileges::FILE_SERVING, tegmen_vmm::privileges::Limits::FS)
            .map_err(anyhow::Error::msg)?;
        spawn_signal_thread(socket.clone())?;
        let backend = Arc::new(FsBackend::with_thread_pool(device, args.thread_pool_size)?);
        if let Some((stats_listener, _)) = &stats {
            let (b, l) = (backend.clone(), stats_listener.try_clone()?);
            tegmen_vmm::vhost_user::stats::spawn(l, "fs", move || {
                tegmen_vmm::vhost_user::stats::counters_of(&b.stats())
            })?;
        }
        info!(
            "serving {} as tag {:?} on {} ({} request queue(s), cache {}, sandbox {})",
            shared_dir.display(),
            args.tag,
            args.socket.display(),
            args.num_request_queues,
            args.cache,
            args.sandbox
        );
        // A Listener made from the bare socket: its Drop must not unlink by
        // path, which after the pivot would name a file inside the share.
        let mut listener = Listener::from(listener);
        // Every socket bound, the sandbox entered, every thread started:
        // from here on only what serving files takes.
        tegmen_vmm::seccomp::install(tegmen_vmm::seccomp::Kind::FsBackend, args.seccomp)?;
        serve(backend, &mut listener)?;
        info!("front end disconnected, exiting");
        Ok(())
    })();
    socket.remove();
    if let Some((_, file)) = &stats {
        file.remove();
    }
    result
}

fn main() {
    tegmen_vmm::init_logging();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("tegmen-fs-backend: error: {e:#}");
        std::process::exit(1);
    }
}
