//! A split virtqueue driven from the guest driver's side, for the device
//! tests: descriptor chains laid out in guest memory, the avail ring
//! published, used elements read back.

use std::collections::HashMap;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The size of every test queue.
pub(crate) const QSIZE: u16 = 256;

/// One split virtqueue, from the driver's side. (Laid out by hand:
/// `MockSplitQueue::create` places the used ring inside the avail ring for
/// queues this large, which shows up once ~130 chains have been offered.)
pub(crate) struct TestQueue {
    pub(crate) mem: &'static GuestMemoryMmap,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) queue: Queue,
    pub(crate) free: Vec<u16>,
    pub(crate) chains: HashMap<u16, Vec<u16>>,
    pub(crate) avail_idx: u16,
    pub(crate) used_seen: u16,
}

impl TestQueue {
    pub(crate) fn new(mem: &'static GuestMemoryMmap, start: u64) -> Self {
        let (desc, avail, used) = (start, start + 0x1000, start + 0x2000);
        for a in [avail, used] {
            mem.write_slice(&[0u8; 0x1000], GuestAddress(a)).unwrap();
        }
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        TestQueue {
            mem,
            desc,
            avail,
            used,
            queue,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub(crate) fn store_desc(&self, index: u16, d: SplitDescriptor) {
        let addr = GuestAddress(self.desc + 16 * u64::from(index));
        self.mem.write_obj(RawDescriptor::from(d), addr).unwrap();
    }

    /// Put a chain of `(addr, len, flags)` descriptors on the avail ring;
    /// `NEXT` links are added here. Returns the head index.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let idx: Vec<u16> = descs
            .iter()
            .map(|_| self.free.pop().expect("out of descriptors"))
            .collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, idx[i + 1])
            } else {
                (flags, 0)
            };
            self.store_desc(idx[i], SplitDescriptor::new(addr, len, flags, next));
        }
        self.chains.insert(idx[0], idx.clone());
        self.publish(idx[0]);
        idx[0]
    }

    /// Put a raw head index on the avail ring (however bogus).
    pub(crate) fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub(crate) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used elements not seen yet, as `(head, len)`; their descriptors are
    /// freed.
    pub(crate) fn take_used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let used_idx = self.used_idx();
        assert!(used_idx.wrapping_sub(self.used_seen) <= QSIZE);
        while self.used_seen != used_idx {
            let elem = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            let head = id as u16;
            if let Some(descs) = self.chains.remove(&head) {
                self.free.extend(descs);
            }
            out.push((head, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// `avail_event` in the used ring (meaningful with EVENT_IDX).
    pub(crate) fn avail_event(&self) -> u16 {
        let addr = self.used + 4 + 8 * u64::from(QSIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}
