//! `supervisor`: inspect what this host offers Tegmen, and list and inspect
//! the sandboxes (VMs) that run on it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tegmen_supervisor::config::Config;
use tegmen_supervisor::guest_image::GuestImage;
use tegmen_supervisor::hypervisor::{self, Accel};
use tegmen_supervisor::sandbox::{self, Sandbox, SandboxOptions};
use tegmen_supervisor::{host, Error};

#[derive(Parser)]
#[command(
    name = "supervisor",
    version,
    about = "Tegmen sandbox supervisor: host checks and running VMs"
)]
struct Cli {
    /// Configuration file (default /etc/tegmen/config.toml, optional)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State root (default from the configuration, else /run/tegmen)
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what this host offers; with --boot, boot a throwaway sandbox
    Check {
        /// Boot a sandbox, print its GuestDetails and boot time, shut it down
        #[arg(long)]
        boot: bool,
    },
    /// List sandboxes
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print one sandbox's state as JSON: its face (tegmen, shim), VM,
    /// host processes and containers (id, bundle, created)
    Inspect { id: String },
    /// Remove sandboxes whose owning process is gone
    Cleanup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supervisor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.root = root;
    }
    match cli.command {
        Command::Check { boot } => check(&config, boot),
        Command::List { json } => {
            let states = sandbox::list(&config);
            if json {
                println!("{}", serde_json::to_string_pretty(&states)?);
            } else {
                println!(
                    "{:<24} {:<9} {:<10} {:<6} {:>8} {:>5} {:>10}  CONTAINERS",
                    "ID", "STATUS", "FACE", "VMM", "MEM MiB", "CPUS", "BOOT ms"
                );
                for s in states {
                    let boot = s.boot_to_agent_ms.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
                    let status = format!("{:?}", s.status).to_lowercase();
                    let containers: Vec<&str> = s.containers.iter().map(|c| c.id.as_str()).collect();
                    let containers = if containers.is_empty() {
                        "-".to_string()
                    } else {
                        containers.join(",")
                    };
                    println!(
                        "{:<24} {:<9} {:<10} {:<6} {:>8} {:>5} {:>10}  {}",
                        s.id,
                        status,
                        s.face.as_str(),
                        s.hypervisor,
                        s.memory_mib,
                        s.vcpus,
                        boot,
                        containers
                    );
                }
            }
            Ok(())
        }
        Command::Inspect { id } => {
            let dir = config.sandboxes_dir().join(&id);
            sandbox::validate_id(&id)?;
            if !dir.exists() {
                return Err(Error::SandboxNotFound(id).into());
            }
            println!("{}", serde_json::to_string_pretty(&sandbox::read_state(&dir)?)?);
            Ok(())
        }
        Command::Cleanup => {
            for id in sandbox::cleanup_stale(&config)? {
                println!("removed stale sandbox {id}");
            }
            Ok(())
        }
    }
}

fn check(config: &Config, boot: bool) -> Result<()> {
    let mut ok = true;
    let (hw, why) = hypervisor::effective_hw_virt(config);
    println!("hardware virtualization: {} ({why})", if hw { "yes" } else { "no" });
    println!(
        "/dev/kvm: {}",
        if host::kvm_device_present() {
            "present"
        } else {
            "absent"
        }
    );
    let choice = match hypervisor::choose_backend(config) {
        Ok(c) => {
            let accel = match c.accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG",
            };
            println!("backend: {} with {accel} ({})", c.backend.name(), c.reason);
            Some(c)
        }
        Err(e) => {
            println!("backend: none ({e})");
            ok = false;
            None
        }
    };
    match host::find_program(&config.qemu.path) {
        Some(q) => println!(
            "qemu: {} ({})",
            q.display(),
            host::qemu_version(&q).unwrap_or_else(|| "version unknown".into())
        ),
        None => {
            println!("qemu: not found ({})", config.qemu.path);
            ok = false;
        }
    }
    match GuestImage::resolve(config) {
        Ok(img) => {
            println!("guest kernel: {}", img.kernel.display());
            println!("guest initramfs: {}", img.initramfs.display());
        }
        Err(e) => {
            println!("guest image: {e}");
            ok = false;
        }
    }
    for helper in ["tegmen-vsock-backend", "tegmen-fs-backend", "tegmen-vmm"] {
        match hypervisor::helper_binary(helper) {
            Ok(p) => println!("{helper}: {}", p.display()),
            Err(e) => {
                println!("{helper}: {e}");
                ok = false;
            }
        }
    }
    if !ok {
        bail!("this host cannot run Tegmen sandboxes yet (see above)");
    }
    if !boot || choice.is_none() {
        return Ok(());
    }

    let id = format!("check-{}", std::process::id());
    println!("booting throwaway sandbox {id} ...");
    let options = SandboxOptions {
        owned_by_current_process: true,
        ..Default::default()
    };
    let sandbox = Sandbox::create(config, &id, &options).with_context(|| format!("booting sandbox {id}"))?;
    let details = sandbox.agent().guest_details();
    let version = sandbox.agent().version();
    println!("boot to agent ready: {:.3} s", sandbox.boot_time().as_secs_f64());
    let result = (|| -> Result<()> {
        let details = details?;
        let version = version?;
        println!(
            "guest: kernel {}, {} MiB memory, {} CPU(s), agent {} (API {})",
            details.kernel_release,
            details.memory_total_bytes / (1024 * 1024),
            details.cpus,
            version.agent_version,
            version.api_version
        );
        for m in &details.mounts {
            println!(
                "  mount: {} on {} type {} ({})",
                m.source, m.target, m.fstype, m.options
            );
        }
        let share = details
            .mounts
            .iter()
            .find(|m| m.target == details.shared_mount && m.fstype == "virtiofs");
        if share.is_none() {
            bail!(
                "the virtio-fs share is not mounted on {} in the guest",
                details.shared_mount
            );
        }
        println!("sandbox id read back through virtio-fs: {}", details.sandbox_id);
        if details.sandbox_id != id {
            bail!(
                "the guest read sandbox id {:?} through virtio-fs, expected {id:?}",
                details.sandbox_id
            );
        }
        Ok(())
    })();
    let dir = sandbox.dir().to_path_buf();
    let shutdown = sandbox.shutdown();
    result?;
    shutdown.context("shutting the sandbox down")?;
    if dir.exists() {
        bail!("{} is still there after shutdown", dir.display());
    }
    println!("shutdown: ok, {} removed", dir.display());
    Ok(())
}
