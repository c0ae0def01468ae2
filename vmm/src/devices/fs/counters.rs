//! Counters of what the device did with the guest's requests.
//!
//! A hostile or buggy guest must never crash the device, so every rejected
//! chain and every failed request is counted instead: the counters are the
//! one place where the operator (and the tests) can see that something was
//! refused. They are plain relaxed atomics, bumped from whichever thread
//! serves a queue, and read as a [`FsStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by every queue of one device.
#[derive(Debug, Default)]
pub struct FsCounters {
    chains: AtomicU64,
    replies: AtomicU64,
    no_reply: AtomicU64,
    malformed_chains: AtomicU64,
    bad_headers: AtomicU64,
    server_errors: AtomicU64,
    synthesized_errors: AtomicU64,
    dropped: AtomicU64,
    panics: AtomicU64,
    queue_errors: AtomicU64,
}

/// A snapshot of [`FsCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FsStats {
    /// Descriptor chains taken from any queue.
    pub chains: u64,
    /// Requests answered by the FUSE server (success or FUSE error reply).
    pub replies: u64,
    /// Requests the FUSE server handled without a reply (FORGET, ...).
    pub no_reply: u64,
    /// Chains refused before parsing: bad layout, memory outside the guest,
    /// lengths out of bounds, too short for a FUSE header.
    pub malformed_chains: u64,
    /// FUSE headers whose `len` disagrees with the chain.
    pub bad_headers: u64,
    /// Requests the FUSE server failed to decode or answer.
    pub server_errors: u64,
    /// Error replies the device wrote itself after a failure.
    pub synthesized_errors: u64,
    /// Chains returned with a used length of 0 after a failure.
    pub dropped: u64,
    /// Panics caught while serving a request (should stay 0).
    pub panics: u64,
    /// Failures of the virtqueue itself (used ring not writable, ...).
    pub queue_errors: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Chains,
    Replies,
    NoReply,
    MalformedChains,
    BadHeaders,
    ServerErrors,
    SynthesizedErrors,
    Dropped,
    Panics,
    QueueErrors,
}

impl FsCounters {
    /// Add one to `counter`; returns the new value.
    pub(crate) fn bump(&self, counter: Counter) -> u64 {
        let c = match counter {
            Counter::Chains => &self.chains,
            Counter::Replies => &self.replies,
            Counter::NoReply => &self.no_reply,
            Counter::MalformedChains => &self.malformed_chains,
            Counter::BadHeaders => &self.bad_headers,
            Counter::ServerErrors => &self.server_errors,
            Counter::SynthesizedErrors => &self.synthesized_errors,
            Counter::Dropped => &self.dropped,
            Counter::Panics => &self.panics,
            Counter::QueueErrors => &self.queue_errors,
        };
        c.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Read every counter.
    pub fn snapshot(&self) -> FsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FsStats {
            chains: get(&self.chains),
            replies: get(&self.replies),
            no_reply: get(&self.no_reply),
            malformed_chains: get(&self.malformed_chains),
            bad_headers: get(&self.bad_headers),
            server_errors: get(&self.server_errors),
            synthesized_errors: get(&self.synthesized_errors),
            dropped: get(&self.dropped),
            panics: get(&self.panics),
            queue_errors: get(&self.queue_errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_counters_snapshot() {
        let c = FsCounters::default();
        c.bump(Counter::Chains);
        c.bump(Counter::Chains);
        c.bump(Counter::Dropped);
        let s = c.snapshot();
        assert_eq!(s.chains, 2);
        assert_eq!(s.dropped, 1);
        assert_eq!(s.replies, 0);
    }
}
