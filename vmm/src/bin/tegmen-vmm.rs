//! `tegmen-vmm`: Tegmen's builtin monitor as a process — one KVM VM with
//! the guest kernel, a serial console, and the vsock, virtio-fs and
//! virtio-net devices hosted inline (the same device code
//! `tegmen-vsock-backend`, `tegmen-fs-backend` and `tegmen-net-backend`
//! serve to QEMU). With `--netns` the process lives in the pod's network
//! namespace, where its taps are (`--net`, one per NIC). It runs until the
//! guest resets or powers off, then prints one JSON line with how the VM
//! ended and its timings, and exits: 0 for a guest that ended itself, 1
//! for a VM stopped by an error (the reason is on stderr), 2 for a VM that
//! could not start.
//!
//! Sandbox (`--sandbox chroot`, the default, for a VM with devices): once
//! the kernel is loaded and the console open, the process pivots into the
//! directory of the vsock socket (the sandbox directory) in a mount
//! namespace of its own, so the shared directory must be below it; the
//! devices then use paths relative to it. The rest of the host's file
//! system is gone for it. The virtio-fs device's workers have a root of
//! their own, the share itself: they are started by a thread that chrooted
//! there.
//!
//! Confinement: once set up (sandbox entered, taps open), the process
//! moves to network, IPC and UTS namespaces of its own (its taps stay
//! where they were opened), keeps no capability but the file-serving ones
//! its virtio-fs device needs, and, as the guest starts, runs under its
//! syscall allow-lists (`--seccomp`, default `kill`): the process's,
//! narrowed by each thread to that of its kind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tegmen_vmm::builtin::fs::InlineFs;
use tegmen_vmm::builtin::net::InlineNet;
use tegmen_vmm::builtin::virtio_mmio::VirtioDevice;
use tegmen_vmm::builtin::vsock::InlineVsock;
use tegmen_vmm::builtin::{StopReason, Vm, VmConfig};
use tegmen_vmm::devices::fs::sandbox::{self, SandboxMode};
use tegmen_vmm::devices::fs::{FsConfig, FsDevice};
use tegmen_vmm::devices::net::{enter_netns, NetConfig, NetDevice, NicArg, Tap};
use tegmen_vmm::devices::vsock::{VsockConfig, VsockDevice, DEFAULT_GUEST_CID};
use tegmen_vmm::vhost_user::stats;

#[derive(Debug, Parser)]
#[command(about = "Tegmen's builtin KVM monitor: one VM, devices inline")]
struct Args {
    /// Uncompressed ELF vmlinux with a PVH entry point.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Kernel command line (the virtio-mmio devices are appended).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// File the serial console is appended to.
    #[arg(long, value_name = "PATH")]
    console: Option<PathBuf>,
    /// Hybrid-vsock Unix socket (vsock device when given).
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    guest_cid: u64,
    /// Directory shared over virtio-fs (fs device when given).
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,
    #[arg(long, default_value = "tegmen")]
    fs_tag: String,
    /// The network namespace the process enters first (its taps are there).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// A NIC on a tap: `tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=N]` (repeat for more).
    #[arg(long, value_name = "SPEC")]
    net: Vec<NicArg>,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// `chroot`: pivot into the vsock socket's directory before the guest
    /// runs; `none`: stay in the host's file system (tests, debugging).
    #[arg(long, default_value = "chroot")]
    sandbox: SandboxMode,
    /// Serve each device's counters on `DIR/<device>.stats` (vsock, fs,
    /// net0, ...): one JSON line per connection, for `supervisor metrics`.
    #[arg(long, value_name = "DIR")]
    stats_dir: Option<PathBuf>,
    /// The syscall allow-lists (one for the process, narrowed per thread:
    /// vCPU, device worker, control): `kill` (a syscall off them ends the
    /// process), `log` (logged by the kernel and allowed) or `off`.
    #[arg(long, value_name = "MODE", default_value_t = tegmen_vmm::seccomp::Mode::Kill)]
    seccomp: tegmen_vmm::seccomp::Mode,
}

/// A device's counters, as `--stats-dir` serves them.
type Counters = Box<dyn Fn() -> serde_json::Value + Send>;
/// The devices, the counters of each by name, and the share's path as
/// the process sees it.
type Devices = (Vec<Box<dyn VirtioDevice>>, Vec<(String, Counters)>, Option<PathBuf>);

/// The devices, with paths as the process will see them: relative to the
/// sandbox directory (the working directory then) when it pivots there.
fn devices(args: &Args, jail: Option<&std::path::Path>) -> Result<Devices, String> {
    let inside = |p: &PathBuf| -> Result<PathBuf, String> {
        let Some(j) = jail else {
            return Ok(p.clone());
        };
        // The socket does not exist yet: resolve the directory it goes in.
        let parent = p.parent().unwrap_or(std::path::Path::new("."));
        let name = p
            .file_name()
            .ok_or_else(|| format!("{} has no file name", p.display()))?;
        let parent = std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        parent
            .join(name)
            .strip_prefix(j)
            .map(PathBuf::from)
            .map_err(|_| format!("{} is not below the sandbox directory {}", p.display(), j.display()))
    };
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    // Each device's counters, served once the process is in its sandbox.
    let mut counters: Vec<(String, Counters)> = Vec::new();
    let mut stats = |name: &str, snapshot: Counters| counters.push((name.to_string(), snapshot));
    if let Some(uds) = &args.vsock_uds {
        let config = VsockConfig::new(inside(uds)?).with_guest_cid(args.guest_cid);
        let device = InlineVsock::new(VsockDevice::new(config).map_err(|e| format!("vsock {}: {e}", uds.display()))?);
        stats("vsock", Box::new(device.counters()));
        devices.push(Box::new(device));
    }
    let mut share = None;
    if let Some(dir) = &args.shared_dir {
        share = Some(inside(dir)?);
        // Jailed, the device's workers have the share as their root
        // (`jail_workers_to`), and they open the served directory by path
        // at FUSE_INIT: for them it is `/`.
        let served = if jail.is_some() {
            PathBuf::from("/")
        } else {
            inside(dir)?
        };
        let mut config = FsConfig::new(served);
        config.tag = args.fs_tag.clone();
        let device = InlineFs::new(FsDevice::new(config).map_err(|e| format!("virtio-fs {}: {e}", dir.display()))?);
        stats("fs", Box::new(device.counters()));
        devices.push(Box::new(device));
    }
    for (i, nic) in args.net.iter().enumerate() {
        let tap = Tap::open(&nic.tap).map_err(|e| format!("--net tap {}: {e}", nic.tap))?;
        let config = NetConfig {
            mac: nic.mac,
            mtu: nic.mtu,
        };
        let device = InlineNet::new(NetDevice::new(tap, config));
        stats(&format!("net{i}"), Box::new(device.counters()));
        devices.push(Box::new(device));
    }
    Ok((devices, counters, share))
}

/// Makes the VM: kernel, console and KVM first, then (sandboxed) the
/// devices from inside the sandbox directory.
fn make_vm(args: &Args, config: &VmConfig) -> Result<Vm, String> {
    if let Some(ns) = &args.netns {
        // Before any thread: the whole process moves.
        enter_netns(ns).map_err(|e| format!("--netns: {e}"))?;
    }
    let slots = usize::from(args.vsock_uds.is_some()) + usize::from(args.shared_dir.is_some()) + args.net.len();
    let mut vm = Vm::prepare(config, slots).map_err(|e| e.to_string())?;
    let jail = match args.sandbox {
        // Without devices the guest reaches nothing on the host: no jail.
        SandboxMode::None => None,
        SandboxMode::Chroot if slots == 0 => None,
        SandboxMode::Chroot => {
            let Some(uds) = &args.vsock_uds else {
                return Err("--sandbox chroot needs --vsock-uds: its directory is the sandbox".into());
            };
            let dir = uds
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let dir = std::fs::canonicalize(dir).map_err(|e| format!("sandbox directory {}: {e}", dir.display()))?;
            std::env::set_current_dir(&dir).map_err(|e| format!("entering {}: {e}", dir.display()))?;
            Some(dir)
        }
    };
    let (devices, counters, share) = devices(args, jail.as_deref())?;
    for device in devices {
        vm.attach(device).map_err(|e| e.to_string())?;
    }
    // Bound by the host's paths before the pivot; served by threads,
    // which may only start once the process is in its sandbox.
    let mut listeners = Vec::new();
    if let Some(dir) = &args.stats_dir {
        for (name, snapshot) in counters {
            let path = dir.join(format!("{name}.stats"));
            let _ = tegmen_vmm::devices::vsock::remove_stale_socket(&path);
            match tegmen_vmm::unix_path::bind(&path) {
                Ok(l) => listeners.push((name, l, snapshot)),
                Err(e) => log::warn!("{name}: counters not served on {}: {e}", path.display()),
            }
        }
    }
    use tegmen_vmm::privileges;
    if let Some(dir) = &jail {
        sandbox::enter_chroot(dir).map_err(|e| format!("sandbox: {e}"))?;
        log::info!("sandboxed: {} is now /", dir.display());
    }
    // Namespaces are per thread until a thread starts: the process leaves
    // the host's before the file server's spawner below.
    privileges::unshare_namespaces().map_err(|e| format!("dropping privileges: {e}"))?;
    if let (Some(_), Some(share)) = (&jail, share) {
        // The file server's threads see only the share.
        tegmen_vmm::builtin::fs::jail_workers_to(share.clone()).map_err(|e| format!("sandbox: {e}"))?;
        log::info!("sandboxed: the virtio-fs workers' root is {}", share.display());
    }
    // Set up: from here on the process needs no capability but those of
    // serving files as the guest's users (with a share); every thread
    // started after this one has no more (the spawner has dropped its own).
    let keep = match args.shared_dir {
        Some(_) => privileges::FILE_SERVING,
        None => &[],
    };
    privileges::limit_resources(privileges::Limits::VMM)
        .and_then(|()| privileges::drop_capabilities(keep))
        .map_err(|e| format!("dropping privileges: {e}"))?;
    for (name, listener, snapshot) in listeners {
        if let Err(e) = stats::spawn(listener, &name, snapshot) {
            log::warn!("{name}: counters not served: {e}");
        }
    }
    Ok(vm)
}

fn main() -> ExitCode {
    tegmen_vmm::init_logging();
    tegmen_vmm::seccomp::one_malloc_arena();
    let args = Args::parse();
    let config = VmConfig {
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        kernel: args.kernel.clone(),
        initramfs: args.initramfs.clone(),
        cmdline: args.cmdline.clone(),
        console: args.console.clone(),
        seccomp: args.seccomp,
    };
    let vm = match make_vm(&args, &config) {
        Ok(vm) => vm,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let out = match vm.run(args.timeout_secs.map(Duration::from_secs)) {
        Ok(out) => out,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let (reason, clean) = match &out.reason {
        StopReason::Reset => ("reset".to_string(), true),
        StopReason::Shutdown { vcpu, rip } => {
            // A triple fault, with reboot=k: the guest did not ask for it.
            let at = if *rip == 0xfff0 {
                "RIP 0xfff0, the reset vector: on AMD, KVM resets the vCPU before it reports a triple fault, \
                 so where it happened is lost"
                    .to_string()
            } else {
                format!("RIP {rip:#x}")
            };
            log::warn!("vCPU {vcpu}: shutdown (a triple fault or a KVM system event) at {at}");
            ("shutdown".to_string(), true)
        }
        StopReason::Stopped => ("stopped by the host".to_string(), true),
        StopReason::Unhandled { vcpu, reason, rip } => (
            format!("unhandled exit on vCPU {vcpu} at RIP {rip:#x}: {reason}"),
            false,
        ),
        StopReason::Failed { vcpu, error } => (format!("vCPU {vcpu} failed: {error}"), false),
    };
    println!(
        "{}",
        serde_json::json!({
            "reason": reason,
            "boot_mark_ms": ms(out.boot_mark),
            "first_entry_ms": ms(out.first_entry),
        })
    );
    if clean {
        ExitCode::SUCCESS
    } else {
        log::error!("the VM stopped: {reason}");
        ExitCode::FAILURE
    }
}
