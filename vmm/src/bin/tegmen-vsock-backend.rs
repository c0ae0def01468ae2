//! `tegmen-vsock-backend`: Tegmen's virtio-vsock device as a vhost-user
//! backend, with a hybrid-vsock host side.
//!
//! It listens on the vhost-user socket `--socket` for QEMU (which connects
//! as the client, `-chardev socket,path=...` with `vhost-user-vsock-device`)
//! and on the hybrid-vsock socket `--uds-path` for host programs
//! (`CONNECT <port>\n`); guest connections to host port `P` go to
//! `<uds-path>_<P>`. It serves exactly one front-end and exits when that
//! front-end disconnects, removing both socket files. It deliberately does
//! not die with its parent: the VM outlives the command that started it.
//!
//! Confinement (`--sandbox chroot`, the default): before it serves, the
//! process pivots into the directory of its sockets (they must all be in
//! one), in mount, network, IPC and UTS namespaces of its own, and keeps
//! no capability; once its sockets are bound it takes the user `--user`
//! (if given), then its syscall allow-list (`--seccomp`) holds it.
//!
//! Logs go to stderr; `RUST_LOG` = `error`, `warn`,
//! `info` (default), `debug` or `trace`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::Parser;

use tegmen_vmm::devices::fs::sandbox::SandboxMode;
use tegmen_vmm::devices::vsock::{VsockConfig, VsockDevice, DEFAULT_GUEST_CID};
use tegmen_vmm::vhost_user::vsock::serve;

/// virtio-vsock vhost-user backend with a hybrid-vsock host side.
#[derive(Debug, Parser)]
#[command(name = "tegmen-vsock-backend", version)]
struct Args {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Hybrid-vsock Unix socket to listen on; guest connections to host
    /// port P go to `<PATH>_<P>`.
    #[arg(long, value_name = "PATH")]
    uds_path: PathBuf,
    /// The guest's CID.
    #[arg(long, value_name = "CID", default_value_t = DEFAULT_GUEST_CID)]
    guest_cid: u64,
    /// Serve the device's counters as one JSON line per connection on
    /// this Unix socket (`supervisor metrics` reads it).
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,
    /// The syscall allow-list: `kill` (a syscall off it ends the process),
    /// `log` (logged by the kernel and allowed) or `off`.
    #[arg(long, value_name = "MODE", default_value_t = tegmen_vmm::seccomp::Mode::Kill)]
    seccomp: tegmen_vmm::seccomp::Mode,
    /// Confinement: `chroot` pivots into the sockets' directory (which
    /// must hold them all) in a mount namespace of its own; `none` stays
    /// in the host's file system (debugging).
    #[arg(long, default_value_t = SandboxMode::Chroot)]
    sandbox: SandboxMode,
    /// Serve as this user and group (numbers), with no supplementary
    /// groups, once the sockets are bound: it must be able to reach the
    /// sockets' directory and, for guest connections, the host's sockets.
    #[arg(long, value_name = "UID:GID", value_parser = tegmen_vmm::privileges::parse_user)]
    user: Option<(u32, u32)>,
}

/// Socket files to remove if a signal ends us early, as C strings so the
/// handler needs no allocation.
static CLEANUP_PATHS: OnceLock<Vec<CString>> = OnceLock::new();

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    if let Some(paths) = CLEANUP_PATHS.get() {
        for p in paths {
            // SAFETY: unlink(2) is async-signal-safe and `p` is a valid C
            // string that lives for the rest of the program.
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + sig) };
}

fn install_cleanup(paths: &[&Path]) {
    let cpaths = paths
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let _ = CLEANUP_PATHS.set(cpaths);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `sa` is fully initialised before use; the handler only
        // calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn remove_if_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves until the front-end goes; on return `args` names the sockets as
/// the process sees them (inside its sandbox once it entered it).
fn run(args: &mut Args) -> Result<(), String> {
    if args.socket == args.uds_path {
        return Err(format!("--socket and --uds-path are both {}", args.socket.display()));
    }
    // Unix sockets in root's own directories take no capability at all;
    // taking the user (--user) does, until it is taken.
    let lockdown = tegmen_vmm::privileges::Lockdown {
        seccomp: args.seccomp,
        user: args.user,
    };
    let mut paths = vec![("--socket", &mut args.socket), ("--uds-path", &mut args.uds_path)];
    if let Some(stats) = &mut args.stats_socket {
        paths.push(("--stats-socket", stats));
    }
    tegmen_vmm::privileges::confine_socket_server(
        args.sandbox,
        &mut paths,
        &lockdown,
        tegmen_vmm::privileges::Limits::VSOCK,
    )?;

    let config = VsockConfig::new(&args.uds_path).with_guest_cid(args.guest_cid);
    let device = VsockDevice::new(config).map_err(|e| format!("--uds-path: {e}"))?;
    log::info!(
        "guest CID {}, hybrid vsock on {}",
        args.guest_cid,
        args.uds_path.display()
    );
    // The device removes uds_path when dropped, serve() the vhost-user
    // socket; this covers SIGINT/SIGTERM/SIGHUP.
    install_cleanup(&[&args.socket, &args.uds_path]);

    serve(device, &args.socket, args.stats_socket.as_deref(), lockdown).map_err(|e| e.to_string())?;
    log::info!("front-end disconnected; exiting");
    Ok(())
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    tegmen_vmm::init_logging();
    tegmen_vmm::seccomp::one_malloc_arena();
    let result = run(&mut args);
    // Whatever happened, leave no socket files of ours behind (and nothing
    // that is not a socket is ours).
    for path in [&args.socket, &args.uds_path] {
        remove_if_socket(path);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
