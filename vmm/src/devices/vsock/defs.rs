//! Constants of the virtio-vsock device and of its hybrid-vsock host side.
//!
//! Wire-level values come from the virtio specification (v1.2, section 5.10
//! "Socket Device") and from the Linux driver that the guest runs
//! (`include/uapi/linux/virtio_vsock.h`, `include/linux/virtio_vsock.h`);
//! each constant names its source so it can be checked against it. The
//! limits further down are Tegmen's own choices: they bound what a guest or
//! a host client can make the device hold.

use std::time::Duration;

/// Well-known CID of the host. Virtio spec 5.10.4; `VMADDR_CID_HOST` in
/// `include/uapi/linux/vm_sockets.h`.
pub const VSOCK_HOST_CID: u64 = 2;

/// Guest CID used when none is configured (the first CID a guest may have:
/// 0, 1 and 2 are reserved by `include/uapi/linux/vm_sockets.h`).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Largest guest CID: the upper 32 bits of `guest_cid` are reserved and must
/// be zero (virtio spec 5.10.4), and `0xffff_ffff` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = 0xffff_fffe;

/// Virtio device ID of the socket device. Virtio spec 5 "Device Types".
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Number of virtqueues: rx, tx, event. Virtio spec 5.10.2.
pub const NUM_QUEUES: usize = 3;
/// Index of the receive queue (device to driver). Virtio spec 5.10.2.
pub const RXQ_INDEX: usize = 0;
/// Index of the transmit queue (driver to device). Virtio spec 5.10.2.
pub const TXQ_INDEX: usize = 1;
/// Index of the event queue. Virtio spec 5.10.2.
pub const EVQ_INDEX: usize = 2;

/// Largest queue size the device accepts. QEMU's `vhost-vsock-common` sets
/// up its rx and tx rings with 1024 entries (`VHOST_VSOCK_QUEUE_SIZE` in
/// QEMU 7.2) and a backend offering less is refused at `SET_VRING_NUM`.
pub const QUEUE_SIZE: u16 = 1024;

/// Size of the packet header, `struct virtio_vsock_hdr`. Virtio spec 5.10.6.
pub const PKT_HEADER_SIZE: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

/// Stream socket type. Virtio spec 5.10.6, `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// Seqpacket socket type (not supported here). Virtio spec 5.10.6,
/// `VIRTIO_VSOCK_TYPE_SEQPACKET`.
pub const TYPE_SEQPACKET: u16 = 2;

/// Operation codes, virtio spec 5.10.6 (`enum virtio_vsock_op` in
/// `include/uapi/linux/virtio_vsock.h`).
pub const OP_INVALID: u16 = 0;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// Sender will no longer receive and/or send (see the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Payload-carrying packet.
pub const OP_RW: u16 = 5;
/// Unsolicited report of the sender's buffer space.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for a `OP_CREDIT_UPDATE`.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `OP_SHUTDOWN` flag: the sender will receive no more data. Virtio spec
/// 5.10.6.4, `VIRTIO_VSOCK_SHUTDOWN_RCV`.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more data. Virtio spec
/// 5.10.6.4, `VIRTIO_VSOCK_SHUTDOWN_SEND`.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event-queue event telling the driver that all connections were lost.
/// Virtio spec 5.10.6.7, `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event` (one le32 id). Virtio spec 5.10.6.7.
pub const EVENT_SIZE: usize = 4;

/// Largest payload of one packet, both ways: Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (`include/linux/virtio_vsock.h`). A
/// guest packet announcing more is malformed.
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

/// Receive buffer each connection advertises to the guest (`buf_alloc`),
/// and therefore the most guest-to-host data it buffers while the Unix
/// socket cannot take it. Same as Linux's `VIRTIO_VSOCK_DEFAULT_BUF_SIZE`.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Send an unsolicited `OP_CREDIT_UPDATE` once our `fwd_cnt` has moved this
/// far past the last value the guest saw, so a guest waiting for credit is
/// never left waiting.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Most connections (established or being set up, in either direction)
/// alive at once, counting host clients that have not yet sent their
/// `CONNECT` line.
pub const MAX_CONNECTIONS: usize = 1024;

/// Most stand-alone `OP_RST` replies (for packets that match no connection)
/// waiting for a receive buffer; past this they are dropped and counted.
pub const MAX_PENDING_RST: usize = 256;

/// Longest `CONNECT <port>\n` line a host client may send, newline
/// included. `CONNECT 4294967295\n` is 19 bytes.
pub const MAX_CONNECT_LINE: usize = 32;

/// Prefix of the hybrid-vsock handshake line (Firecracker's protocol).
pub const CONNECT_PREFIX: &str = "CONNECT ";

/// How long a host client may take to send its `CONNECT` line, and how long
/// the guest may take to answer the resulting `OP_REQUEST`, before the Unix
/// stream is closed. Linux's own connect timeout is 2 s
/// (`VSOCK_DEFAULT_CONNECT_TIMEOUT`); this leaves room for a slow TCG guest.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection the guest has fully shut down may keep trying to
/// flush buffered data to its Unix socket before it is reset.
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// First host-side port handed to host-initiated connections (as
/// Firecracker does: far above the ports guests usually listen on).
pub const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Most Unix connections accepted per listener wake-up, so one burst of
/// clients cannot starve the queues.
pub const MAX_ACCEPTS_PER_EVENT: usize = 32;
