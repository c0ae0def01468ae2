//! A guest driver's side of split virtqueues, laid out in guest memory by a
//! fuzz input: mostly well-formed descriptor chains (so the device parses
//! past the ring), with raw descriptors, bogus heads and addresses outside
//! memory when the input says so.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Input;

/// Guest RAM of every target: rings at the bottom, buffers above.
pub const MEM_SIZE: u64 = 2 << 20;
/// Where buffers go.
pub const DATA_BASE: u64 = 0x10_0000;
/// Descriptors per queue.
pub const QSIZE: u16 = 32;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// One split virtqueue: the device's [`Queue`] and the driver's view.
pub struct Ring {
    pub queue: Queue,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// Queue number `n`'s rings, at `n * 0x3000`.
    pub fn new(mem: &GuestMemoryMmap, n: u64, event_idx: bool) -> Ring {
        let base = n * 0x3000;
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        for a in [desc, avail, used] {
            mem.write_slice(&[0u8; 0x1000], GuestAddress(a))
                .expect("rings in memory");
        }
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ring {
            queue,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptor `index` as given (however bogus).
    pub fn raw_desc(&self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index % QSIZE));
        let _ = mem.write_obj(RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)), at);
    }

    /// Offers a chain of `(addr, len, device-writable)` buffers; returns
    /// its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.raw_desc(mem, index, addr, len, flags, self.next_desc);
        }
        self.publish(mem, first);
        first
    }

    /// Puts `head` on the avail ring (however bogus).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Moves the avail index by a raw amount (a driver lying about how
    /// many chains it offered).
    pub fn bump_avail(&mut self, mem: &GuestMemoryMmap, by: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(by);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Used elements the device added since the last call, as
    /// `(id, len)`; checks the device never used more than a ring's worth
    /// (call it after each pass of the device over the queue).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let mut out = Vec::new();
        assert!(
            used_idx.wrapping_sub(self.used_seen) <= QSIZE,
            "the device used more chains than the ring holds"
        );
        while self.used_seen != used_idx {
            let elem = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap_or(0);
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap_or(0);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A buffer address: usually inside the data area, sometimes anywhere.
pub fn addr(input: &mut Input) -> u64 {
    match input.u8() {
        0..=239 => DATA_BASE + u64::from(input.u16()) * 8,
        240..=247 => MEM_SIZE - u64::from(input.u8()),
        _ => input.u64(),
    }
}

/// A buffer length: usually small, sometimes anything.
pub fn len(input: &mut Input) -> u32 {
    match input.u8() {
        0..=199 => u32::from(input.u8()) * 4,
        200..=239 => u32::from(input.u16()),
        _ => input.u32(),
    }
}

/// Raw ring mischief the input may ask for between chains: a stray
/// descriptor, a bogus head, a lying avail index.
pub fn mischief(input: &mut Input, mem: &GuestMemoryMmap, ring: &mut Ring) {
    match input.u8() {
        0 => {
            let (i, a, l, f, n) = (input.u16(), input.u64(), input.u32(), input.u16(), input.u16());
            ring.raw_desc(mem, i, a, l, f, n);
        }
        1 => {
            let head = input.u16();
            ring.publish(mem, head);
        }
        2 => {
            let by = input.u16();
            ring.bump_avail(mem, by);
        }
        _ => {}
    }
}
