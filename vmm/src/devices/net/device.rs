//! The virtio-net device core: see the module docs of [`super`].

use std::io;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::tap::FrameIo;
use super::{
    ETH_HLEN, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, MAX_FRAME_LEN, QUEUE_SIZE, TUN_F_CSUM,
    TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TX_BUDGET, VNET_HDR_LEN,
};

/// The device's identity on the guest's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest NIC's MAC (for pods: the veth's, so neighbours stay valid).
    pub mac: [u8; 6],
    /// The link's MTU.
    pub mtu: u16,
}

/// What the device saw; malformed input is counted, not logged per frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetCounters {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Chains with a device-writable descriptor, a bad address, or a length
    /// outside a frame's bounds.
    pub tx_malformed: u64,
    /// Headers that ask for what was not negotiated or point outside the
    /// frame.
    pub tx_bad_header: u64,
    /// Frames the host side refused (its queue was full, or the link down).
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Receive chains with a device-readable descriptor or a bad address.
    pub rx_malformed: u64,
    /// Frames larger than the guest's buffers (without MRG_RXBUF).
    pub rx_too_big: u64,
    /// Reads from the host side shorter than a vnet header.
    pub rx_runt: u64,
    pub used_ring_errors: u64,
}

/// The virtio-net device core.
pub struct NetDevice<T: FrameIo> {
    io: T,
    config: NetConfig,
    acked: u64,
    /// A frame read from the host side and not yet placed (vnet header
    /// first), and its length.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// Receive chains taken for the pending frame, waiting for more room,
    /// and the ring they came from.
    rx_held: Vec<RxChain>,
    rx_held_ring: Option<(u64, u64, u16)>,
    tx_buf: Vec<u8>,
    tx_more: bool,
    counters: NetCounters,
}

impl<T: FrameIo> std::fmt::Debug for NetDevice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("config", &self.config)
            .field("acked", &self.acked)
            .field("counters", &self.counters)
            .finish()
    }
}

/// One writable descriptor of a receive chain.
struct RxSegment {
    addr: vm_memory::GuestAddress,
    len: usize,
}

/// A receive chain ready to take bytes.
struct RxChain {
    head: u16,
    segments: Vec<RxSegment>,
    capacity: usize,
}

impl<T: FrameIo> NetDevice<T> {
    pub fn new(io: T, config: NetConfig) -> NetDevice<T> {
        NetDevice {
            io,
            config,
            acked: 0,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_held: Vec::new(),
            rx_held_ring: None,
            tx_buf: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME_LEN),
            tx_more: false,
            counters: NetCounters::default(),
        }
    }

    /// The features offered: virtio 1.0, MAC, MTU, link status, checksum
    /// and TSO offloads both ways, mergeable receive buffers.
    pub fn avail_features() -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |f, bit| f | (1u64 << bit))
    }

    /// What the driver accepted (anything not offered is ignored), and the
    /// host side's receive offloads to match: the guest gets partial
    /// checksums and large segments only if it said it takes them.
    pub fn set_acked_features(&mut self, features: u64) -> io::Result<()> {
        self.acked = features & Self::avail_features();
        let mut tun = 0;
        if self.has(VIRTIO_NET_F_GUEST_CSUM) {
            tun |= TUN_F_CSUM;
            if self.has(VIRTIO_NET_F_GUEST_TSO4) {
                tun |= TUN_F_TSO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_TSO6) {
                tun |= TUN_F_TSO6;
            }
            if self.has(VIRTIO_NET_F_GUEST_ECN) && tun & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                tun |= TUN_F_TSO_ECN;
            }
        }
        self.io.set_offload(tun)
    }

    /// The features in force.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    fn has(&self, bit: u32) -> bool {
        self.acked & (1u64 << bit) != 0
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }

    /// `len` bytes of configuration space from `offset`; empty outside it.
    pub fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        crate::devices::config_slice(&self.config_space(), offset, len)
    }

    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// The host side, for the transport's event loop (readable: call
    /// [`process_rx`](Self::process_rx)).
    pub fn io(&self) -> &T {
        &self.io
    }

    /// True when the last [`process_tx`](Self::process_tx) stopped at its
    /// budget with chains left: call it again (after the receive side).
    pub fn has_pending_tx(&self) -> bool {
        self.tx_more
    }

    /// True while a frame from the host waits for receive buffers.
    pub fn has_pending_rx(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Forgets receive chains held for a frame (their ring stopped).
    pub fn forget_rx_buffers(&mut self) {
        self.rx_held.clear();
        self.rx_held_ring = None;
    }

    /// Drops what is in flight (the driver reset the device).
    pub fn reset(&mut self) {
        self.rx_pending = None;
        self.forget_rx_buffers();
        self.tx_more = false;
        self.acked = 0;
    }

    /// Sends what the guest queued, at most [`TX_BUDGET`] chains. Returns
    /// whether to interrupt the guest.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut budget = TX_BUDGET;
        self.tx_more = false;
        let mut rounds = crate::devices::Rounds::default();
        'outer: loop {
            rounds.begin(queue);
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem);
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.send_chain(mem, chain);
                if queue.add_used(mem, head, 0).is_err() {
                    self.counters.used_ring_errors += 1;
                }
                used = true;
                budget -= 1;
                if budget == 0 {
                    self.tx_more = true;
                    break 'outer;
                }
            }
            if !queue.event_idx_enabled() {
                break;
            }
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !rounds.again(queue, more) {
                break;
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn send_chain(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        self.tx_buf.clear();
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() || self.tx_buf.len() + len > VNET_HDR_LEN + MAX_FRAME_LEN {
                self.counters.tx_malformed += 1;
                return;
            }
            let start = self.tx_buf.len();
            self.tx_buf.resize(start + len, 0);
            if mem.read_slice(&mut self.tx_buf[start..], desc.addr()).is_err() {
                self.counters.tx_malformed += 1;
                return;
            }
        }
        if self.tx_buf.len() < VNET_HDR_LEN + ETH_HLEN {
            self.counters.tx_malformed += 1;
            return;
        }
        if !self.tx_header_ok() {
            self.counters.tx_bad_header += 1;
            return;
        }
        // Only virtio_net_hdr (10 bytes) means anything to the host side:
        // num_buffers is clear on transmit.
        self.tx_buf[10] = 0;
        self.tx_buf[11] = 0;
        match self.io.send_frame(&self.tx_buf) {
            Ok(n) if n == self.tx_buf.len() => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += (n - VNET_HDR_LEN) as u64;
            }
            _ => self.counters.tx_dropped += 1,
        }
    }

    /// The transmit header asks only for what was negotiated and points
    /// inside the frame.
    fn tx_header_ok(&self) -> bool {
        let h = &self.tx_buf;
        let frame_len = h.len() - VNET_HDR_LEN;
        let (flags, gso_type) = (h[0], h[1]);
        let hdr_len = u16::from_le_bytes([h[2], h[3]]) as usize;
        let gso_size = u16::from_le_bytes([h[4], h[5]]);
        let csum_start = u16::from_le_bytes([h[6], h[7]]) as usize;
        let csum_offset = u16::from_le_bytes([h[8], h[9]]) as usize;
        if flags & !HDR_F_NEEDS_CSUM != 0 {
            return false;
        }
        if flags & HDR_F_NEEDS_CSUM != 0 && (!self.has(VIRTIO_NET_F_CSUM) || csum_start + csum_offset + 2 > frame_len) {
            return false;
        }
        let ecn = gso_type & GSO_ECN != 0;
        let needed = match gso_type & !GSO_ECN {
            GSO_NONE if !ecn => return true,
            GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            // UFO is not offered; anything else is unknown.
            _ => return false,
        };
        self.has(needed)
            && (!ecn || self.has(VIRTIO_NET_F_HOST_ECN))
            && flags & HDR_F_NEEDS_CSUM != 0
            && gso_size > 0
            && hdr_len <= frame_len
    }

    /// Moves frames from the host side into receive buffers until either
    /// runs out. Returns whether to interrupt the guest.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut rounds = crate::devices::Rounds::default();
        loop {
            rounds.begin(queue);
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem);
            }
            let mut out_of_buffers = false;
            while let Some(len) = self.next_frame() {
                match self.place_frame(queue, mem, len) {
                    Placed::Done => {
                        self.rx_pending = None;
                        used = true;
                    }
                    Placed::Dropped { used: u } => {
                        self.rx_pending = None;
                        used |= u;
                    }
                    Placed::NoBuffers { used: u } => {
                        used |= u;
                        out_of_buffers = true;
                        break;
                    }
                }
            }
            if !queue.event_idx_enabled() {
                break;
            }
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !(out_of_buffers && rounds.again(queue, more)) {
                break;
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// The frame to place: the pending one, or the next from the host side.
    fn next_frame(&mut self) -> Option<usize> {
        if let Some(n) = self.rx_pending {
            return Some(n);
        }
        loop {
            match self.io.recv_frame(&mut self.rx_frame) {
                Ok(n) if n >= VNET_HDR_LEN + ETH_HLEN => {
                    self.rx_pending = Some(n);
                    return Some(n);
                }
                Ok(_) => self.counters.rx_runt += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("net: reading the host side: {e}");
                    }
                    return None;
                }
            }
        }
    }

    /// Takes the next receive chain apart; `Err(head)` for one that is of
    /// no use (a readable descriptor).
    fn take_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<RxChain, u16> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(head);
            }
            capacity += desc.len() as usize;
            segments.push(RxSegment {
                addr: desc.addr(),
                len: desc.len() as usize,
            });
        }
        Ok(RxChain {
            head,
            segments,
            capacity,
        })
    }

    fn place_frame(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, len: usize) -> Placed {
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        // Chains taken for this frame on an earlier call that ran out, if
        // they belong to this ring still (a restarted ring has new ones).
        let ring = (queue.desc_table(), queue.avail_ring(), queue.size());
        if self.rx_held_ring != Some(ring) {
            self.rx_held.clear();
        }
        self.rx_held_ring = Some(ring);
        let mut chains: Vec<RxChain> = std::mem::take(&mut self.rx_held);
        let mut capacity: usize = chains.iter().map(|c| c.capacity).sum();
        let mut returned = false;
        while capacity < len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Not enough room yet: hold what was taken (they stay the
                // guest's next buffers, in ring order) until more come.
                self.rx_held = chains;
                return Placed::NoBuffers { used: returned };
            };
            let c = match Self::take_chain(chain) {
                // A buffer with no room (or too little for the header, as
                // the first) is of no use; nor are more chains than the
                // queue holds (a guest that offers the same head again and
                // again).
                Ok(c) if c.capacity == 0 || (chains.is_empty() && c.capacity < VNET_HDR_LEN) => Err(c.head),
                Ok(c) if chains.len() >= usize::from(queue.size()) => Err(c.head),
                other => other,
            };
            match c {
                Ok(c) if !mergeable && c.capacity < len => {
                    // One chain per frame, and it is too small.
                    self.give_back(queue, mem, c.head, 0);
                    self.counters.rx_too_big += 1;
                    return Placed::Dropped { used: true };
                }
                Ok(c) => {
                    capacity += c.capacity;
                    chains.push(c);
                }
                Err(head) => {
                    // Of no use: returned empty. Chains taken before it go
                    // back too, with the frame dropped, so that used
                    // buffers never overtake each other.
                    for c in std::mem::take(&mut chains) {
                        self.give_back(queue, mem, c.head, 0);
                    }
                    self.give_back(queue, mem, head, 0);
                    self.counters.rx_malformed += 1;
                    if capacity > 0 {
                        return Placed::Dropped { used: true };
                    }
                    returned = true;
                }
            }
        }
        // num_buffers, then the bytes, chain after chain.
        let count = chains.len() as u16;
        self.rx_frame[10..12].copy_from_slice(&count.to_le_bytes());
        let mut off = 0usize;
        let mut lens = Vec::with_capacity(chains.len());
        let mut failed = false;
        for c in &chains {
            let start = off;
            for seg in &c.segments {
                if off == len {
                    break;
                }
                let take = seg.len.min(len - off);
                if mem.write_slice(&self.rx_frame[off..off + take], seg.addr).is_err() {
                    failed = true;
                    break;
                }
                off += take;
            }
            lens.push((off - start) as u32);
            if failed {
                break;
            }
        }
        if failed {
            for c in &chains {
                self.give_back(queue, mem, c.head, 0);
            }
            self.counters.rx_malformed += 1;
            return Placed::Dropped { used: true };
        }
        for (c, l) in chains.iter().zip(lens) {
            self.give_back(queue, mem, c.head, l);
        }
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
        Placed::Done
    }

    fn give_back(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if queue.add_used(mem, head, len).is_err() {
            self.counters.used_ring_errors += 1;
        }
    }
}

enum Placed {
    Done,
    /// The frame was dropped; `used` when chains went back to the guest.
    Dropped {
        used: bool,
    },
    /// No room yet: the frame stays pending.
    NoBuffers {
        used: bool,
    },
}

const _: () = assert!(QUEUE_SIZE as usize >= TX_BUDGET);
