//! Virtio devices, independent of how they are attached to a VM.

pub mod fs;
pub mod vsock;
