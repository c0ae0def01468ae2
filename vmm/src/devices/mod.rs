//! Virtio devices, independent of how they are attached to a VM.

pub mod fs;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_queue;

/// `len` bytes of a configuration space from `offset`; empty if that range
/// is not inside it (what a device answers a driver's config read).
pub fn config_slice(cfg: &[u8], offset: u32, len: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(len as usize) {
        Some(end) if end <= cfg.len() => cfg[start..end].to_vec(),
        _ => Vec::new(),
    }
}
