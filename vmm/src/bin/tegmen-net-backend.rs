//! `tegmen-net-backend`: Tegmen's virtio-net device as a vhost-user
//! backend on a tap.
//!
//! It enters the network namespace `--netns` (a pod's, from CNI or
//! podman) before anything else, opens (or makes) the tap `--tap` there
//! with a virtio-net header, and listens on the vhost-user socket
//! `--socket` for QEMU (`-netdev vhost-user` with `virtio-net-device`). It
//! serves one front-end and exits when that front-end disconnects,
//! removing the socket file; a tap it made goes with it.
//!
//! Confinement (`--sandbox chroot`, the default): once the tap is open,
//! the process pivots into the directory of its sockets (they must all be
//! in one), moves to mount, network, IPC and UTS namespaces of its own
//! (the tap stays in the namespace it was opened in), and keeps no
//! capability; once its sockets are bound it takes the user `--user` (if
//! given), then its syscall allow-list (`--seccomp`) holds it.
//!
//! Logs go to stderr; `RUST_LOG` = `error`, `warn`, `info` (default),
//! `debug` or `trace`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use tegmen_vmm::devices::fs::sandbox::SandboxMode;
use tegmen_vmm::devices::net::{enter_netns, parse_mac, NetConfig, NetDevice, Tap};
use tegmen_vmm::vhost_user::net::serve;

/// virtio-net vhost-user backend on a tap.
#[derive(Debug, Parser)]
#[command(name = "tegmen-net-backend", version)]
struct Args {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The tap to open (made if missing).
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// The network namespace to open the tap in (a file such as
    /// /var/run/netns/cni-…).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// The guest NIC's MAC, as in the config space.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: [u8; 6],
    /// The link's MTU.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
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

/// Serves until the front-end goes; on return `args` names the sockets as
/// the process sees them (inside its sandbox once it entered it).
fn run(args: &mut Args) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        // Still one thread: the whole process moves.
        enter_netns(ns).map_err(|e| format!("--netns: {e}"))?;
    }
    let tap = Tap::open(&args.tap).map_err(|e| format!("--tap {}: {e}", args.tap))?;
    log::info!("tap {} (MTU {})", tap.name(), args.mtu);
    // The tap is open (the namespace and TUNSETIFF took CAP_SYS_ADMIN and
    // CAP_NET_ADMIN); its offload and header ioctls take none. Taking the
    // user (--user) does, until it is taken.
    let lockdown = tegmen_vmm::privileges::Lockdown {
        seccomp: args.seccomp,
        user: args.user,
    };
    let mut paths = vec![("--socket", &mut args.socket)];
    if let Some(stats) = &mut args.stats_socket {
        paths.push(("--stats-socket", stats));
    }
    tegmen_vmm::privileges::confine_socket_server(
        args.sandbox,
        &mut paths,
        &lockdown,
        tegmen_vmm::privileges::Limits::NET,
    )?;
    let device = NetDevice::new(
        tap,
        NetConfig {
            mac: args.mac,
            mtu: args.mtu,
        },
    );
    serve(device, &args.socket, args.stats_socket.as_deref(), lockdown).map_err(|e| e.to_string())?;
    log::info!("front-end disconnected; exiting");
    Ok(())
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    tegmen_vmm::init_logging();
    tegmen_vmm::seccomp::one_malloc_arena();
    let result = run(&mut args);
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&args.socket);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
