//! `tegmen`, the OCI runtime: runc's command line, one microVM per
//! container.
//!
//! `create` boots a sandbox VM whose id is the container id, bind-mounts the
//! bundle's rootfs (and the spec's host bind mounts) below the sandbox's
//! shared directory, has the agent create the container in the guest and
//! leaves a host **monitor** process behind ([`monitor`]): the PID callers
//! see in `--pid-file` and `state`, which carries the container's stdio and
//! ends with the container's exit status. `start`, `kill`, `exec`, `pause`…
//! are agent calls from short-lived processes; `delete` tears the VM down.
//!
//! | module | what |
//! | --- | --- |
//! | [`cli`] | runc's flags and commands |
//! | [`log`] | `--log` / `--log-format`: runc's text and JSON lines |
//! | [`store`] | `container.json` in the sandbox directory, status, runc's state JSON |
//! | [`bundle`] | reading and checking `config.json`, mounts, VM sizing |
//! | [`create`] | `create` / `run`: the VM, the mounts, the container, the monitor |
//! | [`hooks`] | OCI hooks of the runtime namespace, on the host |
//! | [`monitor`] | the per-process host monitor |
//! | [`console`] | host ptys and `--console-socket` |
//! | [`events`] | `events`: stats and OOM kills as runc's JSON lines |
//! | [`commands`] | every other command |

pub mod bundle;
pub mod cli;
pub mod commands;
pub mod console;
pub mod create;
pub mod events;
pub mod hooks;
pub mod log;
pub mod monitor;
pub mod store;

use std::path::PathBuf;

/// The runtime's errors. The texts callers parse (containerd, podman,
/// conmon) are runc's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// runc 1.1: the id is not in the message.
    #[error("container does not exist")]
    NotExist(String),
    #[error("container with given ID already exists")]
    Exists(String),
    #[error("invalid container ID format")]
    InvalidId(String),
    #[error("container not running")]
    NotRunning,
    #[error("{0}")]
    State(String),
    #[error("open {}: no such file or directory", .0.display())]
    MissingFile(PathBuf),
    #[error("{0}")]
    Spec(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Sys(String),
    /// A runtime-namespace OCI hook failed (runc's wording inside).
    #[error("{0}")]
    Hook(String),
    #[error(transparent)]
    Supervisor(crate::Error),
}

impl From<crate::Error> for Error {
    /// A container the agent refused is reported in the agent's (runc's)
    /// words, as runc reports it, without the call around them.
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::AgentStatus { message, .. } => Error::Sys(message),
            other => Error::Supervisor(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// runc's id rule (`^[\w+\-\.]+$`, not `.` or `..`), and the sandbox's
/// length bound so every socket path fits.
pub fn validate_id(id: &str) -> Result<()> {
    let word = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if !word || id == "." || id == ".." || id.contains("..") || id.len() > crate::sandbox::MAX_ID_LEN {
        return Err(Error::InvalidId(id.to_string()));
    }
    Ok(())
}

use std::time::Duration;

use crate::agent_client::{AgentClient, StreamEndpoint};
use crate::config::Config;
use crate::sandbox::Layout;

/// How long one agent call from the CLI may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the agent in container `id`'s VM.
pub fn connect_agent(config: &Config, id: &str) -> Result<AgentClient> {
    let socket = Layout::new(config, id).vsock_socket();
    Ok(AgentClient::connect(
        &socket,
        tegmen_agent_api::AGENT_VSOCK_PORT,
        Duration::from_secs(5),
        RPC_TIMEOUT,
    )?)
}

/// Where container `id`'s stdio streams are opened.
pub fn stream_endpoint(config: &Config, id: &str) -> StreamEndpoint {
    StreamEndpoint::HybridVsock(Layout::new(config, id).vsock_socket())
}

/// The global flags every command (and the re-executed monitor) needs.
#[derive(Debug, Clone)]
pub struct Globals {
    pub config: Config,
    pub log: Option<PathBuf>,
    pub log_format: log::Format,
    pub debug: bool,
    /// `--systemd-cgroup`: `linux.cgroupsPath` is `slice:prefix:name`.
    pub systemd_cgroup: bool,
}
