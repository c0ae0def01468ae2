//! virtio-vsock device with a hybrid-vsock host side.
//!
//! The guest sees a standard virtio socket device (virtio spec 5.10); the
//! host sees Unix sockets, as in Firecracker's "hybrid vsock": host programs
//! connect to one Unix socket and ask for a guest port with
//! `CONNECT <port>\n`, and guest connections to host port `P` arrive on the
//! Unix socket `<uds_path>_<P>`. The pieces, one concern per file, in the
//! layout of Firecracker's vsock device:
//!
//! - [`defs`]: wire constants (with their sources) and Tegmen's limits;
//! - [`packet`]: header copies and the checks every guest packet passes;
//! - [`connection`]: one connection's state machine and credit flow control;
//! - [`muxer`]: connections <-> Unix sockets, epoll, the handshake;
//! - [`device`]: the virtqueue side, independent of the transport;
//! - [`metrics`]: counters of everything refused;
//! - `sys`: the few Unix-socket syscalls `std` lacks.
//!
//! A guest is not trusted: whatever it writes is validated, and malformed
//! input is dropped or answered with a reset, never trusted for a length or
//! an address.

pub mod connection;
pub mod defs;
pub mod device;
pub mod metrics;
pub mod muxer;
pub mod packet;
mod sys;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use self::defs::{DEFAULT_GUEST_CID, VSOCK_HOST_CID};
pub use self::device::{VsockConfig, VsockDevice};
pub use self::metrics::VsockCounters;
pub use self::muxer::VsockMuxer;
pub use self::sys::remove_stale_socket;

/// Errors setting up a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest CID is reserved or too large.
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidGuestCid(u64),
    /// Something that is not a socket sits where a socket is to be bound.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Binding the hybrid-vsock listener failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Creating or using the epoll fd failed.
    #[error("vsock epoll: {0}")]
    Epoll(#[source] io::Error),
    /// Creating the timer fd failed.
    #[error("vsock timerfd: {0}")]
    Timer(#[source] io::Error),
}
