//! The virtio-fs device: a host directory served to the guest over FUSE.
//!
//! The device is written against `vm-memory` and `virtio-queue` only, so the
//! same [`FsDevice`] can sit behind the vhost-user backend
//! ([`crate::vhost_user::fs`]) or, later, inline on a virtio-mmio bus of a
//! builtin VMM. Whoever owns the queues calls [`FsDevice::process_queue`]
//! when the guest kicks one (queue 0 is the hiprio queue, 1.. the request
//! queues; all are served the same way) and signals the guest when it
//! returns `true`.
//!
//! Each descriptor chain carries one FUSE request and room for its reply.
//! The device checks the chain ([`chain::inspect_chain`]) and the request
//! header, then hands the request to fuse-backend-rs's `Server` over a
//! passthrough file system behind [`confined::ConfinedFs`]. Whatever the
//! guest sends, the device answers with a FUSE reply, an error reply it
//! writes itself, or — when there is no room or no reply is due — a used
//! entry of length 0; failures are counted in [`FsStats`], never fatal.

pub mod chain;
pub mod config;
pub mod confined;
pub mod counters;
pub mod sandbox;

use std::io::Write;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use log::{debug, warn};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{ByteValued, GuestMemory};

pub use self::chain::{ChainError, ChainLayout};
pub use self::config::{CachePolicy, FsConfig, VirtioFsConfigSpace, DEFAULT_TAG, HIPRIO_QUEUE_INDEX, TAG_MAX_LEN};
pub use self::counters::{FsCounters, FsStats};

use self::chain::{inspect_chain, IN_HEADER_LEN, OUT_HEADER_LEN};
use self::confined::ConfinedFs;
use self::counters::Counter;

/// Largest queue the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Errors of the fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A configuration field is out of range.
    #[error("invalid virtio-fs configuration: {0}")]
    InvalidConfig(String),
    /// The shared directory cannot be served.
    #[error("shared directory {}: {error}", path.display())]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// What stat() said.
        error: std::io::Error,
    },
    /// fuse-backend-rs could not set up the passthrough file system.
    #[error("cannot set up the passthrough file system: {0}")]
    Passthrough(std::io::Error),
    /// The virtqueue itself failed (used ring not writable, ...).
    #[error("virtqueue error: {0}")]
    Queue(virtio_queue::Error),
}

impl From<virtio_queue::Error> for FsError {
    fn from(e: virtio_queue::Error) -> Self {
        FsError::Queue(e)
    }
}

/// The virtio-fs device core.
pub struct FsDevice {
    config: FsConfig,
    server: Server<ConfinedFs>,
    counters: FsCounters,
}

impl FsDevice {
    /// Validate `config` and set up the file system serving
    /// `config.shared_dir`. The directory is opened when the guest sends
    /// FUSE_INIT; fds to `/proc/self/fd` are opened here, so a process that
    /// sandboxes itself builds the device before (with `shared_dir` = `/`)
    /// and enters the sandbox after. Note that FUSE_INIT sets the process
    /// umask to 0 (fuse-backend-rs does, so the modes the guest asks for
    /// apply as given): host the device in a process of its own.
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        config.validate()?;
        let root_dir = config
            .shared_dir
            .to_str()
            .ok_or_else(|| {
                FsError::InvalidConfig(format!("shared_dir {} is not valid UTF-8", config.shared_dir.display()))
            })?
            .to_string();
        let timeout = config.cache.timeout();
        let pt_config = passthrough::Config {
            root_dir,
            xattr: config.xattr,
            cache_policy: config.cache.to_passthrough(),
            entry_timeout: timeout,
            attr_timeout: timeout,
            writeback: false,
            do_import: true,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(pt_config).map_err(FsError::Passthrough)?;
        Ok(FsDevice {
            config,
            server: Server::new(ConfinedFs::new(fs)),
            counters: FsCounters::default(),
        })
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// Number of virtqueues: hiprio plus request queues.
    pub fn num_queues(&self) -> usize {
        self.config.num_queues()
    }

    /// The device's virtio config space (tag, number of request queues).
    pub fn config_space(&self) -> VirtioFsConfigSpace {
        self.config.config_space()
    }

    /// Counters of handled and refused requests.
    pub fn stats(&self) -> FsStats {
        self.counters.snapshot()
    }

    /// Serve every chain the driver has made available on `queue`.
    ///
    /// Returns whether the driver should be interrupted (some chain was
    /// used and the queue's notification suppression allows it). With
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated, notifications are re-enabled
    /// before returning and chains that raced in are served too. An error
    /// means the queue itself is broken (its rings are not in guest
    /// memory); individual bad requests never make this fail.
    pub fn process_queue<Q, M>(&self, queue: &mut Q, mem: &M) -> Result<bool, FsError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        if !queue.ready() {
            return Ok(false);
        }
        let mut used_any = false;
        let mut rounds = crate::devices::Rounds::default();
        loop {
            rounds.begin(queue);
            if queue.event_idx_enabled() {
                queue.disable_notification(mem).inspect_err(|_| {
                    self.counters.bump(Counter::QueueErrors);
                })?;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.handle_chain(chain);
                queue.add_used(mem, head, len).inspect_err(|_| {
                    self.counters.bump(Counter::QueueErrors);
                })?;
                used_any = true;
            }
            if !queue.event_idx_enabled() {
                break;
            }
            let more = queue.enable_notification(mem).inspect_err(|_| {
                self.counters.bump(Counter::QueueErrors);
            })?;
            if !rounds.again(queue, more) {
                break;
            }
        }
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(|e| {
            self.counters.bump(Counter::QueueErrors);
            FsError::Queue(e)
        })
    }

    /// Serve one descriptor chain and return the number of bytes written to
    /// its device-writable part: the length to put in the used ring. Never
    /// fails: a chain that cannot be served gets an error reply or 0.
    pub fn handle_chain<M>(&self, chain: DescriptorChain<M>) -> u32
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        self.counters.bump(Counter::Chains);
        let holder = chain.clone();
        let mem = holder.memory();

        let layout = match inspect_chain(&chain) {
            Ok(layout) => layout,
            Err(e) => {
                self.note(Counter::MalformedChains, format_args!("chain dropped: {e}"));
                self.counters.bump(Counter::Dropped);
                return 0;
            }
        };
        let (reader, writer) = match (
            Reader::from_descriptor_chain(mem, chain.clone()),
            VirtioFsWriter::new(mem, chain.clone()),
        ) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                self.note(Counter::MalformedChains, format_args!("chain dropped: {e}"));
                self.counters.bump(Counter::Dropped);
                return 0;
            }
        };
        let header: InHeader = match reader.clone().read_obj() {
            Ok(h) => h,
            Err(e) => {
                self.note(
                    Counter::MalformedChains,
                    format_args!("chain dropped: cannot read FUSE header: {e}"),
                );
                self.counters.bump(Counter::Dropped);
                return 0;
            }
        };
        let claimed = header.len as usize;
        if claimed < IN_HEADER_LEN || claimed > layout.readable {
            self.note(
                Counter::BadHeaders,
                format_args!(
                    "FUSE opcode {} unique {}: header len {} but the request holds {} bytes",
                    header.opcode, header.unique, header.len, layout.readable
                ),
            );
            return self.reply_error(mem, chain, &header, layout, libc::EINVAL);
        }

        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.server.handle_message(reader, Writer::VirtioFs(writer), None, None)
        }));
        match outcome {
            Ok(Ok(written)) => {
                if written > 0 {
                    self.counters.bump(Counter::Replies);
                } else {
                    self.counters.bump(Counter::NoReply);
                }
                u32::try_from(written.min(layout.writable)).unwrap_or(0)
            }
            Ok(Err(e)) => {
                let errno = errno_for(&e);
                self.note(
                    Counter::ServerErrors,
                    format_args!("FUSE opcode {} unique {} failed: {e}", header.opcode, header.unique),
                );
                self.reply_error(mem, chain, &header, layout, errno)
            }
            Err(_) => {
                self.note(
                    Counter::Panics,
                    format_args!(
                        "FUSE opcode {} unique {}: the server panicked",
                        header.opcode, header.unique
                    ),
                );
                self.reply_error(mem, chain, &header, layout, libc::EIO)
            }
        }
    }

    /// Write a bare `fuse_out_header` carrying `-errno` at the start of the
    /// writable part, if the request expects a reply and there is room.
    fn reply_error<M>(
        &self,
        mem: &M::Target,
        chain: DescriptorChain<M>,
        header: &InHeader,
        layout: ChainLayout,
        errno: i32,
    ) -> u32
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        if !expects_reply(header.opcode) || layout.writable < OUT_HEADER_LEN {
            self.counters.bump(Counter::Dropped);
            return 0;
        }
        let out = OutHeader {
            len: OUT_HEADER_LEN as u32,
            error: -errno,
            unique: header.unique,
        };
        let written = VirtioFsWriter::new(mem, chain)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|mut w| w.write_all(out.as_slice()));
        match written {
            Ok(()) => {
                self.counters.bump(Counter::SynthesizedErrors);
                OUT_HEADER_LEN as u32
            }
            Err(e) => {
                debug!("virtio-fs: cannot write error reply: {e}");
                self.counters.bump(Counter::Dropped);
                0
            }
        }
    }

    /// Count an event; the first few of each kind are logged as warnings,
    /// the rest at debug level so a guest cannot flood the log.
    fn note(&self, counter: Counter, msg: std::fmt::Arguments<'_>) {
        const LOUD: u64 = 8;
        let n = self.counters.bump(counter);
        if n <= LOUD {
            warn!("virtio-fs: {msg}");
            if n == LOUD {
                warn!("virtio-fs: further {counter:?} events are logged at debug level");
            }
        } else {
            debug!("virtio-fs: {msg}");
        }
    }
}

/// Whether the kernel waits for a reply to `opcode`.
fn expects_reply(opcode: u32) -> bool {
    opcode != Opcode::Forget as u32 && opcode != Opcode::BatchForget as u32 && opcode != Opcode::Interrupt as u32
}

/// The errno to report for a server-side failure.
fn errno_for(e: &fuse_backend_rs::Error) -> i32 {
    use fuse_backend_rs::Error as E;
    match e {
        E::DecodeMessage(_)
        | E::MissingParameter
        | E::InvalidCString(_)
        | E::InvalidHeaderLength
        | E::InvalidXattrSize(_) => libc::EINVAL,
        E::FailedToRemapID(_) => libc::EPERM,
        E::EncodeMessage(_) | E::FailedToWrite(_) | E::FailedToSplitWriter(_) => libc::EIO,
        E::InvalidMessage(io) => io.raw_os_error().unwrap_or(libc::EIO),
    }
}

#[cfg(test)]
mod tests;
