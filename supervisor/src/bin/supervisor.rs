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
use tegmen_supervisor::{host, inspect, Error};

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
    /// Print what this host offers; with --boot, boot a throwaway sandbox;
    /// with a sandbox id, the confinement of its host processes (uid,
    /// no_new_privs, seccomp, capabilities, namespaces)
    Check {
        /// Boot a sandbox, print its GuestDetails and boot time, shut it down
        #[arg(long, conflicts_with = "id")]
        boot: bool,
        /// A running sandbox whose host processes to report
        id: Option<String>,
        /// With an id: print JSON instead of text
        #[arg(long, requires = "id")]
        json: bool,
    },
    /// List sandboxes: face, status, VM size, host RSS, uptime, containers
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox: its state, host processes (RSS, CPU time), the
    /// guest (kernel, memory, mounts) and its containers (guest pids, use)
    Inspect {
        id: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        /// Seconds the agent gets to answer
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// The guest's processes per container: pid and ppid in the guest,
    /// uid, state, CPU time, RSS, age, command line
    Ps {
        id: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Seconds the agent gets to answer
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Prometheus text exposition of every sandbox (or those named): host
    /// RSS and CPU, VM size, guest memory, containers' memory, CPU, pids
    Metrics {
        ids: Vec<String>,
        /// Serve it over HTTP at this loopback address (GET /metrics)
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Seconds each agent gets to answer
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// The agent's events (exits, OOM kills) as JSON lines as they happen:
    /// of one sandbox until its VM is gone, or of every sandbox (those
    /// that start later too) until interrupted
    Events { id: Option<String> },
    /// Print the guest's serial console log
    Console {
        id: String,
        /// Go on printing what the guest writes until the VM is gone
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a program in the guest outside every container, as root, through
    /// the agent's debug console (on only in sandboxes created with
    /// `debug_console = true` under [guest]); exits with its status
    Exec {
        id: String,
        /// KEY=VALUE in the program's environment (repeatable)
        #[arg(short, long)]
        env: Vec<String>,
        /// A terminal even when stdin is not one
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// No terminal even when stdin is one
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// The program and its arguments (after `--`)
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// The host-side logs of a sandbox (QEMU or the builtin monitor, the
    /// vhost-user backends) merged in time order
    Logs {
        id: String,
        /// JSON lines (time, source, line) instead of text
        #[arg(long)]
        json: bool,
    },
    /// Remove sandboxes whose owning process is gone
    Cleanup,
}

/// Exit status for a sandbox that does not exist (1: anything else).
const EXIT_NO_SANDBOX: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("supervisor: error: {e:#}");
            let missing = e
                .downcast_ref::<Error>()
                .is_some_and(|e| matches!(e, Error::SandboxNotFound(_) | Error::InvalidId { .. }));
            ExitCode::from(if missing { EXIT_NO_SANDBOX } else { 1 })
        }
    }
}

/// `3600` → `1h0m`, `75` → `1m15s`.
fn duration_text(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn print_inspection(i: &inspect::Inspection) {
    let s = &i.summary.state;
    let status = format!("{:?}", s.status).to_lowercase();
    let vm = if i.summary.vm_alive { "VM running" } else { "VM gone" };
    println!("sandbox      {}", s.id);
    println!("status       {status} ({vm})");
    println!("face         {}", s.face.as_str());
    println!("hypervisor   {}", s.hypervisor);
    println!("uptime       {}", duration_text(i.summary.uptime_s));
    let boot = s.boot_to_agent_ms.map_or("-".to_string(), |m| format!("{m} ms"));
    println!(
        "vm           {} MiB, {} vCPU(s), boot to agent {boot}",
        s.memory_mib, s.vcpus
    );
    println!("host rss     {} KiB", i.summary.host_rss_kib);
    if let Some(b) = &s.boot {
        println!("kernel       {} ({})", b.kernel.display(), b.accel);
        println!("initramfs    {}", b.initramfs.display());
        let params = if b.kernel_params.is_empty() {
            "-"
        } else {
            &b.kernel_params
        };
        println!("parameters   {params}");
    }
    println!("debug        console {}", if s.debug_console { "on" } else { "off" });
    println!("host processes:");
    println!(
        "  {:>8}  {:<22} {:>10} {:>10}  ALIVE",
        "PID", "NAME", "RSS KiB", "CPU ms"
    );
    for p in &i.host_processes {
        let alive = if p.alive { "yes" } else { "no" };
        println!(
            "  {:>8}  {:<22} {:>10} {:>10}  {alive}",
            p.pid, p.name, p.rss_kib, p.cpu_ms
        );
    }
    match (&i.guest, &i.guest_error) {
        (Some(g), _) => {
            println!("guest:");
            println!("  kernel     {}", g.kernel_release);
            println!(
                "  memory     {} MiB ({} MiB available), {} CPU(s), agent {}",
                g.memory_total_bytes >> 20,
                g.memory_available_bytes >> 20,
                g.cpus,
                g.agent_version
            );
            let load: Vec<String> = g.load_average.iter().map(|l| format!("{l:.2}")).collect();
            println!(
                "  load       {}",
                if load.is_empty() { "-".into() } else { load.join(" ") }
            );
            println!("  mounts:");
            for m in &g.mounts {
                println!("    {m}");
            }
        }
        (None, Some(e)) => println!("guest:       {e}"),
        (None, None) => {}
    }
    println!("containers:");
    println!(
        "  {:<32} {:<8} {:>12} {:>22} {:>12}  GUEST PIDS",
        "ID", "STATUS", "PIDS/LIMIT", "MEMORY/LIMIT KiB", "CPU ms"
    );
    let limit = |l: Option<u64>, shift: u32| l.map_or("-".to_string(), |v| (v >> shift).to_string());
    for c in &i.container_details {
        let pids: Vec<String> = c.guest_pids.iter().map(|p| p.to_string()).collect();
        let pids = match &c.error {
            Some(e) => e.clone(),
            None => pids.join(","),
        };
        println!(
            "  {:<32} {:<8} {:>12} {:>22} {:>12}  {pids}",
            c.id,
            c.status.as_deref().unwrap_or("-"),
            format!("{}/{}", c.pids_current, limit(c.pids_limit, 0)),
            format!("{}/{}", c.memory_usage_bytes >> 10, limit(c.memory_limit_bytes, 10)),
            c.cpu_usage_usec / 1000
        );
    }
}

/// The exit status of the command (a debug process's own for `exec`).
fn run(cli: Cli) -> Result<u8> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.root = root;
    }
    match cli.command {
        Command::Exec {
            id,
            env,
            tty,
            no_tty,
            command,
        } => {
            let terminal = tty || (!no_tty && tegmen_supervisor::runtime::console::is_tty(0));
            match inspect::exec_debug(&config, &id, &command, &env, terminal)? {
                inspect::DebugExit::Exited(code) => Ok(code.clamp(0, 255) as u8),
                inspect::DebugExit::Failed { code, message } => {
                    eprintln!("supervisor: error: {message}");
                    Ok(code as u8)
                }
            }
        }
        other => run_command(&config, other).map(|()| 0),
    }
}

fn run_command(config: &Config, command: Command) -> Result<()> {
    match command {
        Command::Check { id: Some(id), json, .. } => check_confinement(config, &id, json),
        Command::Check { boot, .. } => check(config, boot),
        Command::List { json } => {
            let summaries = inspect::list(config);
            if json {
                println!("{}", serde_json::to_string_pretty(&summaries)?);
            } else {
                println!(
                    "{:<24} {:<9} {:<10} {:<11} {:>8} {:>5} {:>10} {:>10} {:>8}  CONTAINERS",
                    "ID", "STATUS", "FACE", "VMM", "MEM MiB", "CPUS", "BOOT ms", "RSS KiB", "UPTIME"
                );
                for summary in summaries {
                    let s = &summary.state;
                    let boot = s.boot_to_agent_ms.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
                    let mut status = format!("{:?}", s.status).to_lowercase();
                    if s.status == sandbox::Status::Running && !summary.vm_alive {
                        status = "vm-gone".into();
                    }
                    let containers: Vec<&str> = s.containers.iter().map(|c| c.id.as_str()).collect();
                    let containers = if containers.is_empty() {
                        "-".to_string()
                    } else {
                        containers.join(",")
                    };
                    println!(
                        "{:<24} {:<9} {:<10} {:<11} {:>8} {:>5} {:>10} {:>10} {:>8}  {}",
                        s.id,
                        status,
                        s.face.as_str(),
                        s.hypervisor,
                        s.memory_mib,
                        s.vcpus,
                        boot,
                        summary.host_rss_kib,
                        duration_text(summary.uptime_s),
                        containers
                    );
                }
            }
            Ok(())
        }
        Command::Inspect { id, json, timeout } => {
            let i = inspect::inspect(config, &id, std::time::Duration::from_secs(timeout.max(1)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_inspection(&i);
            }
            Ok(())
        }
        Command::Ps { id, json, timeout } => {
            let procs = inspect::ps(config, &id, std::time::Duration::from_secs(timeout.max(1)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&procs)?);
            } else {
                println!(
                    "{:<24} {:>7} {:>7} {:>6} {:<5} {:>9} {:>9} {:>8}  CMD",
                    "CONTAINER", "PID", "PPID", "UID", "STATE", "TIME ms", "RSS KiB", "AGE"
                );
                for p in procs {
                    println!(
                        "{:<24} {:>7} {:>7} {:>6} {:<5} {:>9} {:>9} {:>8}  {}",
                        p.container,
                        p.pid,
                        p.ppid,
                        p.uid,
                        p.state,
                        p.cpu_ms,
                        p.rss_kib,
                        duration_text(p.age_s),
                        p.command
                    );
                }
            }
            Ok(())
        }
        Command::Metrics { ids, listen, timeout } => {
            let timeout = std::time::Duration::from_secs(timeout.max(1));
            match listen {
                Some(addr) => inspect::serve_metrics(config, addr, timeout)?,
                None => print!("{}", inspect::metrics(config, &ids, timeout)?),
            }
            Ok(())
        }
        Command::Events { id } => {
            let mut out = std::io::stdout().lock();
            match id {
                Some(id) => inspect::events(config, &id, &mut out)?,
                None => inspect::events_all(config, &mut out)?,
            }
            Ok(())
        }
        Command::Console { id, follow } => {
            inspect::console(config, &id, follow, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Exec { .. } => unreachable!("exec is run by `run`"),
        Command::Logs { id, json } => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for l in tegmen_supervisor::logs::logs(config, &id)? {
                let text = if json {
                    serde_json::to_string(&l)?
                } else {
                    format!("{} {:<14} {}", l.time, l.source, l.line)
                };
                if writeln!(out, "{text}").is_err() {
                    // The reader went away (a pager quit).
                    break;
                }
            }
            Ok(())
        }
        Command::Cleanup => {
            for id in sandbox::cleanup_stale(config)? {
                println!("removed stale sandbox {id}");
            }
            Ok(())
        }
    }
}

fn check_confinement(config: &Config, id: &str, json: bool) -> Result<()> {
    let processes = inspect::confinement(config, id)?;
    if processes.is_empty() {
        bail!("sandbox {id} has no live host processes (its VM is gone)");
    }
    if json {
        let v: Vec<serde_json::Value> = processes
            .iter()
            .map(|p| match p {
                Ok(c) => serde_json::to_value(c).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let known = tegmen_supervisor::confinement::known_caps();
    for p in &processes {
        match p {
            Ok(c) => println!("{}", c.describe(known)),
            Err(e) => println!("{e}"),
        }
    }
    Ok(())
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
    println!(
        "debug console: {}",
        if config.guest.debug_console {
            "on (supervisor exec may run programs in the guests of sandboxes created from now)"
        } else {
            "off (debug_console = true under [guest] lets supervisor exec into new sandboxes)"
        }
    );
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
