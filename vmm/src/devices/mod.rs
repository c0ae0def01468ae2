//! Virtio devices, independent of how they are attached to a VM.

pub mod fs;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_queue;

#[cfg(test)]
mod tests {
    use super::Rounds;
    use virtio_queue::{Queue, QueueT};

    #[test]
    fn rounds_go_on_while_chains_come_and_stop_after_two_idle_ones() {
        let mut q = Queue::new(16).unwrap();
        let mut r = Rounds::default();
        r.begin(&q);
        assert!(!r.again(&q, false), "nothing more: done");
        r.begin(&q);
        q.set_next_avail(3);
        assert!(r.again(&q, true), "chains were taken: go round");
        r.begin(&q);
        assert!(r.again(&q, true), "one idle round may be a race with the driver");
        r.begin(&q);
        assert!(!r.again(&q, true), "two idle rounds: the index lies");
        r.begin(&q);
        q.set_next_avail(4);
        assert!(r.again(&q, true), "progress resets the count");
    }
}

/// Guards a device's serving loop under `VIRTIO_RING_F_EVENT_IDX`: serve
/// what is available, re-enable notifications, and go round again if
/// `enable_notification` says more came meanwhile. A driver whose avail
/// index runs more than a ring ahead makes that answer "more" for ever
/// while no chain can be taken (virtio-queue refuses the index), which
/// would spin the device's thread; two rounds in a row that take no chain
/// end the loop instead (the next kick starts a new one).
#[derive(Debug, Default)]
pub struct Rounds {
    start: u16,
    idle: u32,
}

impl Rounds {
    /// Call at the top of each round.
    pub fn begin(&mut self, queue: &impl virtio_queue::QueueT) {
        self.start = queue.next_avail();
    }

    /// Whether to go round again, given what `enable_notification` said.
    pub fn again(&mut self, queue: &impl virtio_queue::QueueT, more: bool) -> bool {
        if !more {
            return false;
        }
        if queue.next_avail() != self.start {
            self.idle = 0;
            return true;
        }
        self.idle += 1;
        if self.idle >= 2 {
            log::debug!("virtqueue: the avail index promises chains that cannot be taken; waiting for the next kick");
            return false;
        }
        true
    }
}

/// `len` bytes of a configuration space from `offset`; empty if that range
/// is not inside it (what a device answers a driver's config read).
pub fn config_slice(cfg: &[u8], offset: u32, len: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(len as usize) {
        Some(end) if end <= cfg.len() => cfg[start..end].to_vec(),
        _ => Vec::new(),
    }
}
