//! `tegmen-agent`: the agent inside every Tegmen sandbox VM.
//!
//! In the guest it is `/init` (PID 1): it sets up the guest's base file
//! systems, mounts the sandbox's virtio-fs share, reaps orphans and serves
//! the agent API over vsock. Started with `--listen ADDR` by anything other
//! than the kernel, it serves the same API on that address (e.g.
//! `unix:///run/agent.sock`) without touching the host's mounts, which is how
//! the container layer is tested on the host.

mod fatal;
mod guest;
mod init;
mod logger;
mod reaper;
mod service;

use std::sync::Arc;

use anyhow::{Context, Result};
use tegmen_agent_api::AGENT_VSOCK_PORT;

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
    let listen = listen_address(as_init)?;
    // Block SIGCHLD before any thread exists so that only the reaper thread
    // receives it.
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    if as_init {
        init::setup_guest().context("setting up the guest")?;
    }
    reaper::spawn(as_init).context("starting the reaper")?;

    let service = Arc::new(service::AgentService::new(as_init));
    let methods = tegmen_agent_api::agent_ttrpc::create_agent(service);
    let mut server = ttrpc::Server::new()
        .bind(&listen)
        .with_context(|| format!("listening on {listen}"))?
        .register_service(methods);
    server
        .start()
        .with_context(|| format!("serving the agent API on {listen}"))?;
    log::info!("agent {} serving on {listen}", env!("CARGO_PKG_VERSION"));
    loop {
        std::thread::park();
    }
}

/// `vsock://-1:1024` as init; else the address given with `--listen`.
fn listen_address(as_init: bool) -> Result<String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => Ok(addr),
        (None, _) if as_init => Ok(format!("vsock://-1:{AGENT_VSOCK_PORT}")),
        _ => anyhow::bail!("usage: tegmen-agent --listen unix:///PATH|vsock://CID:PORT (or run as PID 1)"),
    }
}
