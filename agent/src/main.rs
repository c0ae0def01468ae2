//! `tegmen-agent`: the agent inside every Tegmen sandbox VM.
//!
//! In the guest it is `/init` (PID 1): it sets up the guest's base file
//! systems, mounts the sandbox's virtio-fs share, reaps orphans and serves
//! the agent API over vsock. Started with `--listen ADDR` by anything other
//! than the kernel, it serves the same API on that address (e.g.
//! `unix:///run/agent.sock`) without touching the host's mounts, which is how
//! the container layer is tested on the host.

mod container;
mod eventhub;
mod fatal;
mod guest;
mod init;
mod logger;
mod network;
mod ports;
mod procinfo;
mod reaper;
mod service;
mod streams;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tegmen_agent_api::{AGENT_VSOCK_PORT, GUEST_SHARED_DIR, STREAM_VSOCK_PORT};

fn main() {
    logger::init();
    fatal::install_panic_hook();
    let as_init = std::process::id() == 1;
    if let Err(err) = run(as_init) {
        if as_init {
            fatal::fatal(&format!("{err:#}"));
        }
        eprintln!("tegmen-agent: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(as_init: bool) -> Result<()> {
    if as_init {
        init::switch_root_off_initramfs().context("leaving the initramfs")?;
    }
    let mut opts = Options::parse(as_init)?;
    // Block SIGCHLD before any thread exists so that only the reaper thread
    // receives it.
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    if as_init {
        init::setup_guest().context("setting up the guest")?;
        // /proc is there now.
        opts.debug_console = std::fs::read_to_string("/proc/cmdline")
            .is_ok_and(|c| cmdline_has(&c, tegmen_agent_api::DEBUG_CONSOLE_PARAM));
    } else {
        // On a host whose cgroup v2 is not at /sys/fs/cgroup, give this
        // agent a private mount namespace where it is (before any thread).
        container::mount_private_cgroup2().context("mounting cgroup v2 for the container layer")?;
    }

    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let containers = Arc::new(
        container::ContainerManager::new(opts.state_root.clone(), events_tx).context("starting the container layer")?,
    );
    let listener = containers.clone();
    reaper::set_child_listener(Box::new(move |pid, status| listener.child_exited(pid, status)));
    reaper::spawn(as_init).context("starting the reaper")?;
    streams::spawn(streams::StreamListener::bind(&opts.stream_listen)?, containers.clone())
        .context("starting the stream listener")?;

    let service = Arc::new(service::AgentService::new(
        as_init,
        opts.shared_dir,
        containers,
        eventhub::EventHub::start(events_rx),
        opts.debug_console,
    ));
    if opts.debug_console {
        log::warn!("the debug console is on: the host may run any program in this guest");
    }
    let methods = tegmen_agent_api::agent_ttrpc::create_agent(service);
    // Wait and GetEvent block a handler thread each until something
    // happens: allow many per connection.
    let mut server = ttrpc::Server::new()
        .bind(&opts.listen)
        .with_context(|| format!("listening on {}", opts.listen))?
        .set_thread_count_min(2)
        .set_thread_count_default(4)
        .set_thread_count_max(256)
        .register_service(methods);
    server
        .start()
        .with_context(|| format!("serving the agent API on {}", opts.listen))?;
    log::info!("agent {} serving on {}", env!("CARGO_PKG_VERSION"), opts.listen);
    if as_init {
        init::signal_boot_mark();
    }
    loop {
        std::thread::park();
    }
}

const USAGE: &str = "usage: tegmen-agent --listen unix:///PATH --stream-listen unix:///PATH \
[--shared-dir DIR] [--state-root DIR] [--debug-console yes|no]   (or run as the guest's PID 1 without arguments)";

/// Where the agent serves, and the directories it works in.
struct Options {
    listen: String,
    stream_listen: String,
    shared_dir: PathBuf,
    state_root: PathBuf,
    /// Serve `ExecDebug`: `tegmen.debug_console=1` on the kernel command
    /// line as PID 1, `--debug-console yes` on the host.
    debug_console: bool,
}

/// Whether the word `param` is on the kernel command line `cmdline`.
fn cmdline_has(cmdline: &str, param: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == param)
}

impl Options {
    /// As PID 1: vsock ports 1024/1025, the virtio-fs share; on the host
    /// the addresses must be given.
    fn parse(as_init: bool) -> Result<Options> {
        let mut opts = Options {
            listen: format!("vsock://-1:{AGENT_VSOCK_PORT}"),
            stream_listen: format!("vsock://-1:{STREAM_VSOCK_PORT}"),
            shared_dir: PathBuf::from(GUEST_SHARED_DIR),
            state_root: PathBuf::from("/run/tegmen/containers"),
            // As PID 1: read from the kernel command line once /proc is
            // mounted.
            debug_console: false,
        };
        let mut args = std::env::args().skip(1);
        let mut given = false;
        while let Some(flag) = args.next() {
            let value = args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            match flag.as_str() {
                "--listen" => opts.listen = value,
                "--stream-listen" => opts.stream_listen = value,
                "--shared-dir" => opts.shared_dir = value.into(),
                "--state-root" => opts.state_root = value.into(),
                "--debug-console" => {
                    opts.debug_console = match value.as_str() {
                        "yes" => true,
                        "no" => false,
                        _ => anyhow::bail!("--debug-console takes yes or no, not {value:?}\n{USAGE}"),
                    }
                }
                _ => anyhow::bail!("unknown argument {flag}\n{USAGE}"),
            }
            given = true;
        }
        if !as_init && (!given || opts.listen.starts_with("vsock") != opts.stream_listen.starts_with("vsock")) {
            anyhow::bail!("{USAGE}");
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_debug_console_word_must_be_whole() {
        let p = tegmen_agent_api::DEBUG_CONSOLE_PARAM;
        assert!(super::cmdline_has("console=ttyS0 tegmen.debug_console=1 quiet\n", p));
        assert!(!super::cmdline_has("console=ttyS0 tegmen.debug_console=10", p));
        assert!(!super::cmdline_has("x=tegmen.debug_console=1", p));
        assert!(!super::cmdline_has("", p));
    }
}
