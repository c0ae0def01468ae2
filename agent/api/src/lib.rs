//! The agent API shared by the host supervisor and the in-guest agent.
//!
//! Kept in its own small crate so the host side links only the generated
//! messages and ttrpc stubs, not the agent's container code.

/// Messages of `protos/agent.proto`.
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server stubs of the `Agent` service.
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Version of the API described in `protos/agent.proto`; bumped on
/// incompatible changes.
pub const API_VERSION: u32 = 1;

/// The vsock port the agent serves the API on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port of the agent's stdio streams (see [`stream`]).
pub const STREAM_VSOCK_PORT: u32 = 1025;

/// The virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "tegmen";

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/tegmen/shared";

/// File in the shared directory that holds the sandbox id, written by the
/// supervisor before boot and read back by the agent through virtio-fs.
pub const SANDBOX_ID_FILE: &str = "sandbox-id";

/// The container id the debug console's processes go by (`ExecDebug`): `@`
/// cannot occur in a container id.
pub const DEBUG_CONTAINER: &str = "@debug";

/// The kernel command-line word that turns the debug console on.
pub const DEBUG_CONSOLE_PARAM: &str = "tegmen.debug_console=1";

pub mod stream;
