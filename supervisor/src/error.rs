//! The supervisor library's errors. Each names the thing that failed and
//! why, because most of them end up in front of a user.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("guest image: {0}")]
    GuestImage(String),
    #[error("hypervisor: {0}")]
    Hypervisor(String),
    #[error("invalid sandbox id {id:?}: {why}")]
    InvalidId { id: String, why: &'static str },
    #[error("sandbox {0} already exists")]
    SandboxExists(String),
    #[error("sandbox {0} does not exist")]
    SandboxNotFound(String),
    #[error("the VM of sandbox {id} exited during boot ({status}); last console lines:\n{console}")]
    VmExitedDuringBoot {
        id: String,
        status: String,
        console: String,
    },
    #[error("the agent of sandbox {id} did not answer within {secs}s; last console lines:\n{console}")]
    AgentTimeout { id: String, secs: u64, console: String },
    #[error("agent: {0}")]
    Agent(String),
    /// The agent answered a call with an error status: `message` is its
    /// own words (libcontainer's and runc's, for a container it refused).
    #[error("agent: {method}: {code}: {message}")]
    AgentStatus {
        method: String,
        code: String,
        message: String,
    },
    /// runc's wording where callers may parse it.
    #[error("{0}")]
    Cgroup(String),
    #[error("{0}")]
    Network(String),
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
