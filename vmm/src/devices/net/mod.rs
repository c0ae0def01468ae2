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
pub(crate) use tap::TUNSETOFFLOAD;
pub use tap::{FrameIo, Tap};

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC (six hex bytes with ':')");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Moves the calling thread (the whole process while it has one thread)
/// into the network namespace at `path`, where its taps are.
pub fn enter_netns(path: &std::path::Path) -> Result<(), String> {
    use std::os::fd::AsFd;
    let f = std::fs::File::open(path).map_err(|e| format!("network namespace {}: {e}", path.display()))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("{}: not a network namespace ({e})", path.display()))
}

/// A NIC of the builtin monitor, as `--net` gives it:
/// `tap=NAME,mac=aa:bb:cc:dd:ee:ff[,mtu=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub tap: String,
    pub mac: [u8; 6],
    pub mtu: u16,
}

impl std::str::FromStr for NicArg {
    type Err = String;
    fn from_str(s: &str) -> Result<NicArg, String> {
        let (mut tap, mut mac, mut mtu) = (None, None, 1500u16);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(parse_mac(v)?),
                Some(("mtu", v)) => {
                    mtu = v
                        .parse()
                        .ok()
                        .filter(|m| (68..=65_535).contains(m))
                        .ok_or_else(|| format!("mtu {v:?}: 68 to 65535"))?
                }
                _ => return Err(format!("{kv:?}: expected tap=NAME, mac=MAC or mtu=N")),
            }
        }
        Ok(NicArg {
            tap: tap.ok_or_else(|| format!("{s:?}: no tap=NAME"))?,
            mac: mac.ok_or_else(|| format!("{s:?}: no mac=MAC"))?,
            mtu,
        })
    }
}

#[cfg(test)]
mod arg_tests {
    use super::*;

    #[test]
    fn macs_and_nic_args_parse_and_bad_ones_are_named() {
        assert_eq!(parse_mac("02:42:0a:58:00:07").unwrap(), [2, 0x42, 10, 0x58, 0, 7]);
        for bad in [
            "",
            "02:42:0a:58:00",
            "02:42:0a:58:00:zz",
            "02-42-0a-58-00-07",
            "2:42:a:58:0:7:",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let n: NicArg = "tap=tap0_tg,mac=02:00:00:00:00:01,mtu=1400".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.mac, n.mtu), ("tap0_tg", [2, 0, 0, 0, 0, 1], 1400));
        assert_eq!("mac=02:00:00:00:00:01,tap=t".parse::<NicArg>().unwrap().mtu, 1500);
        for (bad, why) in [
            ("mac=02:00:00:00:00:01", "no tap"),
            ("tap=t", "no mac"),
            ("tap=t,mac=02:00:00:00:00:01,mtu=10", "68 to 65535"),
            ("tap=t,mac=02:00:00:00:00:01,speed=10", "expected"),
        ] {
            let e = bad.parse::<NicArg>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}

/// A host side for tests of the transports: one datagram per frame.
#[cfg(test)]
pub(crate) mod test_io {
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixDatagram;

    pub struct DatagramIo(pub UnixDatagram);

    impl AsRawFd for DatagramIo {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl super::FrameIo for DatagramIo {
        fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.0.send(frame)
        }
        fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
            Ok(())
        }
    }

    /// The device's end (non-blocking) and the peer's.
    pub fn pair() -> (DatagramIo, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (DatagramIo(a), b)
    }
}

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
