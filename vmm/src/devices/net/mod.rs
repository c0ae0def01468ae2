//! The virtio-net device (virtio spec 5.1), Tegmen's own.
//!
//! [`NetDevice`] is the device core: one receive and one transmit queue on
//! a frame-per-call file descriptor ([`FrameIo`]), in practice a [`Tap`]
//! opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. The tap's vnet header
//! is the virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes), so
//! frames pass through without conversion once they are checked: the
//! guest's transmit headers are validated against the negotiated offloads
//! before the kernel sees them, and the receive path fills `num_buffers`
//! (one chain, or several with `VIRTIO_NET_F_MRG_RXBUF`).
//!
//! Like the vsock and fs devices it is written against `vm-memory` and
//! `virtio-queue` alone; a transport (the builtin monitor's virtio-mmio bus
//! or a vhost-user backend for QEMU) hands it the queues on kicks and calls
//! [`NetDevice::process_rx`] when the tap is readable.
//!
//! Everything the guest supplies is hostile: chains are bounded by
//! [`MAX_FRAME_LEN`], descriptors of the wrong direction, headers that
//! claim offloads the guest did not negotiate, checksum offsets outside
//! the frame and unknown GSO types are dropped and counted, never a panic.

mod device;
mod tap;
#[cfg(test)]
mod tests;

pub use device::{NetConfig, NetCounters, NetDevice};
pub use tap::{FrameIo, Tap};

/// The receive queue's index.
pub const RXQ_INDEX: usize = 0;
/// The transmit queue's index.
pub const TXQ_INDEX: usize = 1;
/// Queues of the device (one pair, no control queue).
pub const NUM_QUEUES: usize = 2;
/// The largest queue the device takes. virtio-mmio lets the driver pick
/// up to 1024, and Linux does.
pub const QUEUE_SIZE: u16 = 1024;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// The largest frame either way, without the vnet header: a 64 KiB GSO
/// packet plus its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_535 + ETH_HLEN + 4;
/// Transmit chains handled per call before the transport is asked to come
/// back ([`NetDevice::has_pending_tx`]), so a flooding guest cannot starve
/// the receive side.
pub const TX_BUDGET: usize = 128;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`.
pub const GSO_ECN: u8 = 0x80;

/// Tap offload flags (`TUNSETOFFLOAD`).
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// TCP ECN with segmentation offload.
pub const TUN_F_TSO_ECN: u32 = 0x08;
