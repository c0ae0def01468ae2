//! The virtio-fs device served as a vhost-user backend (vhost-user-fs).
//!
//! QEMU's `vhost-user-fs-device` (or `-pci`) owns the virtio transport and
//! hands the rings and guest memory to this process over a unix socket;
//! [`FsBackend`] implements `vhost-user-backend`'s [`VhostUserBackend`] on
//! top of the device core in [`crate::devices::fs`]. Queue 0 is the hiprio
//! queue, queues 1.. the request queues; a kick on any of them runs
//! [`FsDevice::process_queue`] on that ring, inline on the vring worker
//! thread, or — with a thread pool — the chains are popped there and served
//! by pool threads, each completing its own used entry.
//!
//! Offered: `VIRTIO_F_VERSION_1`, indirect descriptors, event index and
//! `VHOST_USER_F_PROTOCOL_FEATURES`, with the MQ, CONFIG and REPLY_ACK
//! protocol features. The config space (tag and number of request queues)
//! is answered from the device configuration; QEMU passes the tag itself
//! with `tag=`, so it does not need it. No DAX window: the backend request
//! channel is not used.
//!
//! [`serve`] runs one front-end connection to its end: when QEMU goes away
//! the vhost-user request loop ends with a disconnect, the vring workers
//! are told to stop, and `serve` returns `Ok`.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use super::{run_daemon, WorkerFailures};
use crate::devices::fs::{FsDevice, FsStats, MAX_QUEUE_SIZE};

/// Guest memory as the vhost-user library hands it over.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors of the vhost-user-fs backend.
#[derive(Debug, thiserror::Error)]
pub enum FsBackendError {
    /// The thread pool could not be started.
    #[error("cannot start fs worker thread: {0}")]
    SpawnWorker(io::Error),
    /// The vhost-user daemon could not be created.
    #[error("cannot create the vhost-user daemon: {0}")]
    NewDaemon(String),
    /// The front end did not connect, or the connection could not be set up.
    #[error("cannot accept the vhost-user front end: {0}")]
    Accept(String),
    /// The vhost-user request loop failed (other than by a disconnect).
    #[error("vhost-user connection failed: {0}")]
    Serve(String),
}

/// One chain handed to a pool thread, with the ring to complete it on.
struct Job {
    chain: DescriptorChain<Arc<GuestMemoryMmap>>,
    vring: VringRwLock,
}

/// Threads serving chains popped by the vring worker.
struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Pool {
    fn start(device: Arc<FsDevice>, threads: usize) -> Result<Self, FsBackendError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let device = device.clone();
            thread::Builder::new()
                .name(format!("fs-worker-{i}"))
                .spawn(move || loop {
                    // A poisoned lock only means another worker panicked
                    // while waiting; the receiver is still sound.
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return, // the backend is gone
                    };
                    complete(&device, job);
                })
                .map_err(FsBackendError::SpawnWorker)?;
        }
        Ok(Pool { tx: Mutex::new(tx) })
    }

    fn submit(&self, job: Job) -> Result<(), Job> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|e| e.0)
    }
}

/// Serve one chain on a pool thread and complete it on its ring.
fn complete(device: &FsDevice, job: Job) {
    let head = job.chain.head_index();
    let len = device.handle_chain(job.chain);
    let mut state = job.vring.get_mut();
    if let Err(e) = state.add_used(head, len) {
        error!("virtio-fs: cannot add used entry {head}: {e}");
        return;
    }
    match state.needs_notification() {
        Ok(true) => {
            if let Err(e) = state.signal_used_queue() {
                warn!("virtio-fs: cannot signal the guest: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => warn!("virtio-fs: cannot read the used event: {e}"),
    }
}

/// The vhost-user-fs backend.
pub struct FsBackend {
    device: Arc<FsDevice>,
    mem: RwLock<Option<GuestMem>>,
    pool: Option<Pool>,
    failures: WorkerFailures,
}

impl FsBackend {
    /// A backend serving `device`, every request inline on the vring worker
    /// thread.
    pub fn new(device: FsDevice) -> Self {
        FsBackend {
            device: Arc::new(device),
            mem: RwLock::new(None),
            pool: None,
            failures: WorkerFailures::default(),
        }
    }

    /// A backend serving requests on `threads` pool threads (0 = inline, as
    /// [`FsBackend::new`]). Start it after any sandboxing: the threads
    /// are spawned here.
    pub fn with_thread_pool(device: FsDevice, threads: usize) -> Result<Self, FsBackendError> {
        let mut backend = FsBackend::new(device);
        if threads > 0 {
            backend.pool = Some(Pool::start(backend.device.clone(), threads)?);
        }
        Ok(backend)
    }

    /// The device core.
    pub fn device(&self) -> &FsDevice {
        &self.device
    }

    /// Counters of the device.
    pub fn stats(&self) -> FsStats {
        self.device.stats()
    }

    fn memory(&self) -> Option<GuestMem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serve queue `vring` inline.
    fn process_inline(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) -> io::Result<()> {
        let mut state = vring.get_mut();
        match self.device.process_queue(state.get_queue_mut(), mem) {
            Ok(true) => state.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e) => {
                // The guest broke its own ring; keep the daemon alive.
                warn!("virtio-fs: queue error: {e}");
                Ok(())
            }
        }
    }

    /// Pop every available chain of `vring` and hand it to the pool.
    fn process_pooled(&self, pool: &Pool, vring: &VringRwLock, mem: Arc<GuestMemoryMmap>) {
        let mut state = vring.get_mut();
        let mut rounds = crate::devices::Rounds::default();
        loop {
            rounds.begin(state.get_queue());
            let event_idx = state.get_queue().event_idx_enabled();
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    warn!("virtio-fs: queue error: {e}");
                    return;
                }
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let job = Job {
                    chain,
                    vring: vring.clone(),
                };
                if let Err(job) = pool.submit(job) {
                    // No worker left: serve it here rather than lose it.
                    let head = job.chain.head_index();
                    let len = self.device.handle_chain(job.chain);
                    if let Err(e) = state.add_used(head, len) {
                        warn!("virtio-fs: queue error: {e}");
                    }
                    let _ = state.signal_used_queue();
                }
            }
            if !event_idx {
                return;
            }
            match state.enable_notification() {
                Ok(more) if rounds.again(state.get_queue(), more) => continue,
                Ok(_) => return,
                Err(e) => {
                    warn!("virtio-fs: queue error: {e}");
                    return;
                }
            }
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        // The rings carry the flag themselves (set by the library).
        debug!("virtio-fs: event idx {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config_space().read(offset, size).unwrap_or_else(|| {
            warn!("virtio-fs: config read outside the config space: offset {offset} size {size}");
            Vec::new()
        })
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("virtio-fs: cannot create exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("virtio-fs: unexpected event set {evset:?} for event {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("virtio-fs: event for unknown queue {device_event}");
            return Ok(());
        };
        let Some(mem) = self.memory() else {
            warn!("virtio-fs: queue {device_event} kicked before the memory table was set");
            return Ok(());
        };
        let mem = mem.memory();
        match &self.pool {
            None => self.failures.check("virtio-fs", self.process_inline(vring, &mem)),
            Some(pool) => {
                self.process_pooled(pool, vring, mem.into_inner());
                Ok(())
            }
        }
    }
}

/// Serve one vhost-user front end that connects to `listener`, until it
/// disconnects. A disconnect is the normal end and returns `Ok`.
pub fn serve(backend: Arc<FsBackend>, listener: &mut Listener) -> Result<(), FsBackendError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("tegmen-fs".to_string(), backend.clone(), mem)
        .map_err(|e| FsBackendError::NewDaemon(e.to_string()))?;
    daemon
        .start(listener)
        .map_err(|e| FsBackendError::Accept(e.to_string()))?;
    info!("vhost-user front end connected");
    let result = run_daemon(daemon, &backend.failures).into_result();
    info!("virtio-fs stats at exit: {:?}", backend.stats());
    result.map_err(FsBackendError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::FsConfig;
    use std::os::unix::net::{UnixListener, UnixStream};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn backend(dir: &std::path::Path, threads: usize) -> FsBackend {
        let mut cfg = FsConfig::new(dir);
        cfg.tag = "share0".into();
        FsBackend::with_thread_pool(FsDevice::new(cfg).unwrap(), threads).unwrap()
    }

    #[test]
    fn fs_backend_features_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), 0);
        assert_eq!(b.num_queues(), 2, "hiprio + one request queue");
        let f = b.features();
        assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(f & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
        let pf = b.protocol_features();
        assert!(pf.contains(VhostUserProtocolFeatures::MQ));
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        let cfg = b.get_config(0, 40);
        assert_eq!(&cfg[..6], b"share0");
        assert_eq!(&cfg[36..], &1u32.to_le_bytes());
        assert_eq!(b.get_config(36, 4), 1u32.to_le_bytes().to_vec());
        assert!(b.get_config(30, 20).is_empty());
    }

    /// Drive `handle_event` as the vring worker would, on a ring laid out by
    /// a mock driver in the same memory: FUSE_INIT on the request queue.
    fn kick_init(threads: usize) {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), threads);
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let atomic = GuestMemoryAtomic::new(gm);
        let guard = atomic.memory();
        let vq = MockSplitQueue::new(&*guard, 16);

        let vrings: Vec<VringRwLock> = (0..2).map(|_| VringRwLock::new(atomic.clone(), 16).unwrap()).collect();
        let ring = &vrings[1];
        ring.set_queue_size(16);
        ring.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        ring.set_queue_ready(true);
        ring.set_enabled(true);

        // Before the memory table arrives a kick is ignored, not fatal.
        b.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
        b.update_memory(atomic.clone()).unwrap();

        let mut req = Vec::new();
        for v in [56u32, 26] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        req.extend_from_slice(&77u64.to_le_bytes()); // unique
        req.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, padding
        for v in [7u32, 31, 0, 0] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        guard.write_slice(&req, GuestAddress(0x10_0000)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 56, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 256, VRING_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        b.handle_event(1, EventSet::IN, &vrings, 0).unwrap();

        // With a pool the reply lands asynchronously.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while vq.used().idx().load() == 0 {
            assert!(std::time::Instant::now() < deadline, "no used entry");
            thread::sleep(std::time::Duration::from_millis(5));
        }
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.len(), 80);
        let mut out = [0u8; 24];
        guard.read_slice(&mut out, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 0, "no error");
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 77);
        assert_eq!(u32::from_le_bytes(out[16..20].try_into().unwrap()), 7, "major");

        // An event for a queue that does not exist is ignored.
        b.handle_event(9, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(b.stats().replies, 1);
    }

    #[test]
    fn fs_backend_kick_inline() {
        kick_init(0);
    }

    #[test]
    fn fs_backend_kick_thread_pool() {
        kick_init(2);
    }

    #[test]
    fn fs_backend_serve_ends_on_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = tempfile::tempdir().unwrap();
        let path = sock_dir.path().join("fs.sock");
        let mut listener = Listener::from(UnixListener::bind(&path).unwrap());
        let b = Arc::new(backend(dir.path(), 0));
        let server = thread::spawn(move || serve(b, &mut listener));
        let client = UnixStream::connect(&path).unwrap();
        drop(client);
        let result = server.join().unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}
