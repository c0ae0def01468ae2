//! Descriptor-chain walking over a descriptor table and avail ring that
//! are entirely the input's (loops, indirect tables, heads out of range,
//! addresses past memory), measured the way the fs device checks a chain.

use tegmen_vmm::devices::fs::chain::{inspect_chain, MAX_DIRECTION_BYTES};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{self, Ring, QSIZE};
use crate::input::Input;

pub fn walk(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest::memory();
    let mut ring = Ring::new(&mem, 0, input.bool());
    let flag_choices = [
        0u16,
        VRING_DESC_F_NEXT as u16,
        VRING_DESC_F_WRITE as u16,
        (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
        VRING_DESC_F_INDIRECT as u16,
    ];
    let n = input.u8() as usize % (QSIZE as usize + 1);
    for i in 0..n {
        let addr = guest::addr(&mut input);
        let len = guest::len(&mut input);
        let flags = if input.u8() == 0xff {
            input.u16()
        } else {
            input.pick(&flag_choices)
        };
        let next = if input.u8() < 200 {
            (i as u16 + 1) % QSIZE
        } else {
            input.u16()
        };
        ring.raw_desc(&mem, i as u16, addr, len, flags, next);
    }
    // Indirect tables: raw 16-byte descriptors somewhere in the data area.
    for _ in 0..input.u8() % 4 {
        let at = guest::DATA_BASE + u64::from(input.u8()) * 0x100;
        let n = 16 * (input.u8() as usize % 17);
        let table = input.bytes(n);
        let _ = mem.write_slice(table, GuestAddress(at));
    }
    for _ in 0..1 + input.u8() % 8 {
        let head = if input.u8() < 200 {
            u16::from(input.u8()) % QSIZE
        } else {
            input.u16()
        };
        ring.publish(&mem, head);
    }
    if input.u8() == 0xff {
        let by = input.u16();
        ring.bump_avail(&mem, by);
    }
    let mut chains = 0;
    while let Some(chain) = ring.queue.pop_descriptor_chain(&mem) {
        chains += 1;
        assert!(chains <= QSIZE as usize, "more chains than the ring holds");
        let head = chain.head_index();
        let walked: Vec<_> = chain.clone().collect();
        // Loops end: a chain is at most the ring's descriptors and one
        // indirect table's (at most 2^16 entries).
        assert!(
            walked.len() <= QSIZE as usize + usize::from(u16::MAX),
            "{} descriptors in one chain",
            walked.len()
        );
        if let Ok(layout) = inspect_chain(&chain) {
            assert_eq!(layout.descriptors, walked.len());
            let total: u64 = walked.iter().map(|d| u64::from(d.len())).sum();
            assert_eq!(total, (layout.readable + layout.writable) as u64);
            assert!(layout.readable <= MAX_DIRECTION_BYTES && layout.writable <= MAX_DIRECTION_BYTES);
        }
        let _ = ring.queue.add_used(&mem, head, 0);
    }
}
