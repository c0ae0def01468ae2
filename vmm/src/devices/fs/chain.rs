//! First look at a descriptor chain, before any FUSE parsing.
//!
//! The chain comes from guest memory and is entirely guest controlled. The
//! FUSE server in fuse-backend-rs checks what it reads, but it trusts the
//! device to hand it a sane buffer; [`inspect_chain`] makes sure of that and
//! measures the chain in the same pass: device-readable descriptors must all
//! come before device-writable ones (virtio 1.2, 2.7.4.2), every buffer must
//! lie within one region of guest memory, each direction is capped at
//! [`MAX_DIRECTION_BYTES`], and the readable part must hold at least a
//! `fuse_in_header`.
//!
//! The guest can rewrite the descriptor table between this pass and the one
//! the FUSE reader and writer make; that cannot cause an out-of-bounds
//! access (they check every buffer against guest memory again), it can only
//! make a request fail.

use std::mem::size_of;
use std::ops::Deref;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = size_of::<InHeader>();

/// Size of `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = size_of::<OutHeader>();

/// Most bytes accepted in either direction of one chain: well above the
/// largest FUSE message the server handles (1 MiB of data plus headers),
/// far below anything that could hurt.
pub const MAX_DIRECTION_BYTES: usize = 4 << 20;

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptor (the table could not be read).
    #[error("descriptor chain is empty or unreadable")]
    Empty,
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor {index} follows a writable one")]
    ReadableAfterWritable {
        /// Position of the offending descriptor in the chain.
        index: usize,
    },
    /// A buffer is not entirely inside one region of guest memory.
    #[error("descriptor {index} [{addr:#x}, +{len:#x}) is outside guest memory")]
    OutsideMemory {
        /// Position of the offending descriptor in the chain.
        index: usize,
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// One direction adds up to more than [`MAX_DIRECTION_BYTES`].
    #[error("{direction} part of the chain exceeds {MAX_DIRECTION_BYTES} bytes")]
    TooLarge {
        /// "readable" or "writable".
        direction: &'static str,
    },
    /// The readable part cannot hold a FUSE request header.
    #[error("readable part is {0} bytes, shorter than a FUSE header ({IN_HEADER_LEN})")]
    TooShort(usize),
}

/// Sizes of the two halves of a well-formed chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLayout {
    /// Bytes the device may read (the request).
    pub readable: usize,
    /// Bytes the device may write (room for the reply).
    pub writable: usize,
    /// Number of descriptors.
    pub descriptors: usize,
}

/// Check the shape of `chain` (see the module docs) and measure it.
pub fn inspect_chain<M>(chain: &DescriptorChain<M>) -> Result<ChainLayout, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut layout = ChainLayout {
        readable: 0,
        writable: 0,
        descriptors: 0,
    };
    let mut seen_writable = false;
    for (index, desc) in chain.clone().enumerate() {
        layout.descriptors += 1;
        let len = desc.len();
        // `get_slice` is what the FUSE reader/writer use: the buffer must be
        // inside a single region.
        if mem.get_slice(desc.addr(), len as usize).is_err() {
            return Err(ChainError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len,
            });
        }
        if desc.is_write_only() {
            seen_writable = true;
            layout.writable = layout
                .writable
                .checked_add(len as usize)
                .filter(|&n| n <= MAX_DIRECTION_BYTES)
                .ok_or(ChainError::TooLarge { direction: "writable" })?;
        } else {
            if seen_writable {
                return Err(ChainError::ReadableAfterWritable { index });
            }
            layout.readable = layout
                .readable
                .checked_add(len as usize)
                .filter(|&n| n <= MAX_DIRECTION_BYTES)
                .ok_or(ChainError::TooLarge { direction: "readable" })?;
        }
    }
    if layout.descriptors == 0 {
        return Err(ChainError::Empty);
    }
    if layout.readable < IN_HEADER_LEN {
        return Err(ChainError::TooShort(layout.readable));
    }
    Ok(layout)
}
