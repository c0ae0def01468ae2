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
//! Logs go to stderr; `RUST_LOG` = `error`, `warn`, `info` (default),
//! `debug` or `trace`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

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
}

fn run(args: &Args) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        // Still one thread: the whole process moves.
        enter_netns(ns).map_err(|e| format!("--netns: {e}"))?;
    }
    let tap = Tap::open(&args.tap).map_err(|e| format!("--tap {}: {e}", args.tap))?;
    log::info!("tap {} (MTU {})", tap.name(), args.mtu);
    // The tap is open (the namespace and TUNSETIFF took CAP_SYS_ADMIN and
    // CAP_NET_ADMIN); its offload and header ioctls take none.
    tegmen_vmm::privileges::confine(&[], tegmen_vmm::privileges::NET_MAX_FILES)?;
    let device = NetDevice::new(
        tap,
        NetConfig {
            mac: args.mac,
            mtu: args.mtu,
        },
    );
    serve(device, &args.socket, args.stats_socket.as_deref(), args.seccomp).map_err(|e| e.to_string())?;
    log::info!("front-end disconnected; exiting");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tegmen_vmm::init_logging();
    let result = run(&args);
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
