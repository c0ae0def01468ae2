//! Vsock packet headers: a plain copy of `struct virtio_vsock_hdr` and the
//! checks every guest packet goes through.
//!
//! Descriptor chains are parsed by the `virtio-vsock` crate's
//! [`VsockPacket`], which already refuses chains that are too short, point
//! the wrong way, lie about lengths, or leave guest memory. It only knows
//! two layouts, though — header and payload in one descriptor, or in two —
//! while Linux guests also send a payload scattered over several
//! descriptors (the pages of a non-linear skb). [`parse_tx_chain`] hands
//! such chains, and only those, to a scatter-gather parser that applies
//! the same checks to every descriptor.
//!
//! The header lives in guest memory, which the guest may rewrite at any
//! time, so it is copied once into a [`VsockHeader`] and only the copy is
//! looked at. [`check_tx_header`] then decides whether the header is one the
//! device will act on. Receive packets are written the other way round: the
//! device builds a `VsockHeader` and stores it in one go.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{Error as PacketError, VsockPacket};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, VolatileSlice};

use super::defs::{
    MAX_PKT_BUF_SIZE, OP_CREDIT_REQUEST, OP_REQUEST, OP_RST, PKT_HEADER_SIZE, TYPE_STREAM, VSOCK_HOST_CID,
};

/// A host-side copy of a packet header (`struct virtio_vsock_hdr`, virtio
/// spec 5.10.6), in native byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Copy the header out of a parsed packet.
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        VsockHeader {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// The header in its little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parse the little-endian wire layout.
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Store this header into a receive packet's header buffer.
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) -> Result<(), PacketError> {
        pkt.set_header_from_raw(&self.to_bytes())
    }

    /// An `OP_RST` answering `hdr`: ports and CIDs swapped, from the host.
    /// `src_cid` is the CID the guest addressed (normally the host's).
    pub fn rst_reply_to(hdr: &VsockHeader) -> Self {
        VsockHeader {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }
}

/// A packet from the transmit queue: the header copy and the payload, as
/// one or more slices of guest memory (exactly `hdr.len` bytes in all).
#[derive(Debug)]
pub struct TxPacket<'a> {
    /// The header, copied out of guest memory.
    pub hdr: VsockHeader,
    /// The payload, in order.
    pub data: Vec<VolatileSlice<'a, ()>>,
}

/// Parse a transmit chain, refusing anything malformed: a short or
/// device-writable header descriptor, a payload longer than
/// [`MAX_PKT_BUF_SIZE`] or than the buffers holding it, a device-writable
/// payload descriptor, or any buffer not entirely inside guest memory.
pub fn parse_tx_chain<'a, T>(
    mem: &'a GuestMemoryMmap,
    mut chain: DescriptorChain<T>,
) -> Result<TxPacket<'a>, PacketError>
where
    T: Deref + Clone,
    T::Target: GuestMemory,
{
    let spare = chain.clone();
    match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE) {
        Ok(pkt) => Ok(TxPacket {
            hdr: VsockHeader::from_packet(&pkt),
            data: pkt.data_slice().into_iter().copied().collect(),
        }),
        // The payload may be spread over more descriptors than
        // `VsockPacket` looks at.
        Err(e @ (PacketError::DescriptorLengthTooSmall | PacketError::DescriptorChainTooShort)) => {
            parse_scattered(mem, spare).ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// The header of a transmit chain whose payload could not be taken, if its
/// head descriptor holds a readable one: the connection it names has lost
/// bytes and must be reset rather than left waiting for them.
pub fn peek_tx_header<T>(mem: &GuestMemoryMmap, mut chain: DescriptorChain<T>) -> Option<VsockHeader>
where
    T: Deref,
    T::Target: GuestMemory,
{
    head_header(mem, &chain.next()?)
}

/// The header in a chain's head descriptor, if it is device-readable and
/// large enough.
fn head_header(mem: &GuestMemoryMmap, head: &Descriptor) -> Option<VsockHeader> {
    if head.is_write_only() || (head.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw, head.addr()).ok()?;
    Some(VsockHeader::from_bytes(&raw))
}

/// Header in the head descriptor; payload in whatever follows the header
/// there and in the next descriptors, all device-readable.
fn parse_scattered<'a, T>(mem: &'a GuestMemoryMmap, mut chain: DescriptorChain<T>) -> Option<TxPacket<'a>>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let head = chain.next()?;
    let hdr = head_header(mem, &head)?;
    if hdr.len == 0 || hdr.len > MAX_PKT_BUF_SIZE {
        return None;
    }
    let mut need = hdr.len as usize;
    let mut data = Vec::new();
    let in_head = (head.len() as usize - PKT_HEADER_SIZE).min(need);
    if in_head > 0 {
        let addr = head.addr().checked_add(PKT_HEADER_SIZE as u64)?;
        data.push(mem.get_slice(addr, in_head).ok()?);
        need -= in_head;
    }
    // The chain iterator stops after at most queue-size descriptors, so a
    // looping chain ends here too.
    while need > 0 {
        let desc = chain.next()?;
        if desc.is_write_only() {
            return None;
        }
        let n = (desc.len() as usize).min(need);
        if n > 0 {
            data.push(mem.get_slice(desc.addr(), n).ok()?);
            need -= n;
        }
    }
    Some(TxPacket { hdr, data })
}

/// Why a guest packet is not acted on as it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxVerdict {
    /// Well-formed: hand it to the muxer.
    Accept,
    /// `src_cid` is not the guest's own CID: drop silently (answering would
    /// mean talking to an address the guest does not own).
    BadSrcCid,
    /// Addressed to a CID other than the host's: drop, but refuse a
    /// connection request with `OP_RST` so the guest's `connect()` fails now.
    BadDstCid {
        /// Whether the packet should be answered with `OP_RST`.
        reset: bool,
    },
    /// Not a stream packet: answer with `OP_RST` (unless it is one).
    BadType {
        /// Whether the packet should be answered with `OP_RST`.
        reset: bool,
    },
    /// Unknown operation code: answer with `OP_RST`.
    UnknownOp,
}

/// Decide what to do with a header the guest put on its transmit queue.
pub fn check_tx_header(hdr: &VsockHeader, guest_cid: u64) -> TxVerdict {
    if hdr.src_cid != guest_cid {
        return TxVerdict::BadSrcCid;
    }
    if hdr.dst_cid != VSOCK_HOST_CID {
        return TxVerdict::BadDstCid {
            reset: hdr.op == OP_REQUEST,
        };
    }
    if hdr.type_ != TYPE_STREAM {
        return TxVerdict::BadType {
            reset: hdr.op != OP_RST,
        };
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
        return TxVerdict::UnknownOp;
    }
    TxVerdict::Accept
}

#[cfg(test)]
mod tests {
    use super::super::defs::{OP_RW, TYPE_SEQPACKET};
    use super::*;

    fn hdr() -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1234,
            dst_port: 5678,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_bytes_round_trip_in_wire_layout() {
        let h = hdr();
        let b = h.to_bytes();
        // Spot-check the wire offsets of virtio spec 5.10.6.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&b), h);
    }

    #[test]
    fn header_checks() {
        assert_eq!(check_tx_header(&hdr(), 3), TxVerdict::Accept);
        assert_eq!(check_tx_header(&hdr(), 4), TxVerdict::BadSrcCid);

        let mut h = hdr();
        h.dst_cid = 7;
        assert_eq!(check_tx_header(&h, 3), TxVerdict::BadDstCid { reset: false });
        h.op = OP_REQUEST;
        assert_eq!(check_tx_header(&h, 3), TxVerdict::BadDstCid { reset: true });

        let mut h = hdr();
        h.type_ = TYPE_SEQPACKET;
        assert_eq!(check_tx_header(&h, 3), TxVerdict::BadType { reset: true });
        h.op = OP_RST;
        assert_eq!(check_tx_header(&h, 3), TxVerdict::BadType { reset: false });

        for op in [0u16, 8, 0xffff] {
            let mut h = hdr();
            h.op = op;
            assert_eq!(check_tx_header(&h, 3), TxVerdict::UnknownOp);
        }
    }

    #[test]
    fn rst_reply_swaps_addresses() {
        let r = VsockHeader::rst_reply_to(&hdr());
        assert_eq!(r.src_cid, VSOCK_HOST_CID);
        assert_eq!(r.dst_cid, 3);
        assert_eq!(r.src_port, 5678);
        assert_eq!(r.dst_port, 1234);
        assert_eq!(r.op, OP_RST);
        assert_eq!(r.len, 0);
    }
}
