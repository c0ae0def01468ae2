//! Virtio devices, independent of how they are attached to a VM.

pub mod fs;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_queue;
