//! The vsock device served as a vhost-user backend.
//!
//! QEMU's `vhost-user-vsock-device` (or `-pci`) connects to the socket this
//! backend listens on and hands it guest memory and the rx/tx virtqueues;
//! it reads the guest CID from the config space over `GET_CONFIG`, and
//! keeps the event queue for itself. [`VhostUserVsockBackend`] wraps the
//! transport-independent [`VsockDevice`]: queue kicks become
//! `process_tx`/`process_rx` calls, and the device's epoll fd is registered
//! as one more event source of the daemon's worker thread (token
//! [`BACKEND_EVENT`], the first one `vhost-user-backend` leaves free), so
//! the Unix sockets of the hybrid-vsock side are served on the same thread
//! as the queues without any locking between them.
//!
//! [`serve`] runs the whole thing until the front-end disconnects.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{run_daemon, with_queue, WorkerFailures};
use crate::devices::vsock::defs::{EVQ_INDEX, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX};
use crate::devices::vsock::{remove_stale_socket, VsockDevice};

/// Epoll token of the device's host-side fd in the daemon's worker:
/// `0..NUM_QUEUES` are the queues and `NUM_QUEUES` the exit event.
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

const RXQ_EVENT: u16 = RXQ_INDEX as u16;
const TXQ_EVENT: u16 = TXQ_INDEX as u16;
const EVQ_EVENT: u16 = EVQ_INDEX as u16;

/// Errors running the vhost-user vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    /// The vhost-user socket path is unusable.
    #[error(transparent)]
    SocketPath(#[from] crate::devices::vsock::Error),
    /// The daemon could not be created.
    #[error("cannot create the vhost-user daemon: {0}")]
    NewDaemon(String),
    /// The daemon has no worker thread to register the device's fd with.
    #[error("the vhost-user daemon has no worker thread")]
    NoWorker,
    /// Registering the device's epoll fd with the worker failed.
    #[error("cannot register the vsock event fd with the vhost-user worker: {0}")]
    RegisterListener(#[source] io::Error),
    /// The user or the syscall allow-list could not be taken.
    #[error("{0}")]
    Seccomp(String),
    /// Serving the vhost-user socket failed.
    #[error("vhost-user socket {}: {msg}", path.display())]
    Serve {
        /// The vhost-user socket path.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
}

/// The vsock device as a `vhost-user-backend` backend.
#[derive(Debug)]
pub struct VhostUserVsockBackend {
    device: VsockDevice,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    failures: WorkerFailures,
}

impl VhostUserVsockBackend {
    /// Wrap a device.
    pub fn new(device: VsockDevice) -> Self {
        VhostUserVsockBackend {
            device,
            mem: None,
            event_idx: false,
            failures: WorkerFailures::default(),
        }
    }

    /// The wrapped device.
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    /// Whether the front-end negotiated `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
}

impl VhostUserBackendMut for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // The handler also sets it on each queue, which is what the device
        // core looks at.
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        super::exit_event("vsock")
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let result = self.handle(device_event, vrings);
        self.failures.check("vsock", result)
    }
}

impl VhostUserVsockBackend {
    fn handle(&mut self, device_event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        if device_event == BACKEND_EVENT {
            // Always drain host events, even before the guest is up: the fd
            // is level-triggered and would otherwise keep firing.
            self.device.handle_host_events();
        }
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.get(RXQ_INDEX), vrings.get(TXQ_INDEX)) else {
            return Ok(());
        };
        let device = &mut self.device;
        match device_event {
            RXQ_EVENT | BACKEND_EVENT => {}
            TXQ_EVENT => with_queue(tx, |q| device.process_tx(q, &mem))?,
            EVQ_EVENT => {
                if let Some(evq) = vrings.get(EVQ_INDEX) {
                    with_queue(evq, |q| device.process_event_queue(q, &mem))?;
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("vsock: unknown device event {other}"),
                ))
            }
        }
        // Whatever happened may have left packets for the guest.
        if device.has_pending_rx() {
            with_queue(rx, |q| device.process_rx(q, &mem))?;
        }
        Ok(())
    }
}

/// Serve `device` on the vhost-user socket `socket` (a stale socket file
/// there is replaced) until the front-end disconnects. The socket file is
/// removed before returning.
///
/// With `stats`, the device's counters are served there too
/// ([`super::stats`]).
/// `lockdown` (its user, then its allow-list) is applied once every
/// socket is bound and every thread started, before the front-end is
/// accepted.
pub fn serve(
    device: VsockDevice,
    socket: &Path,
    stats: Option<&Path>,
    lockdown: crate::privileges::Lockdown,
) -> Result<(), VhostUserVsockError> {
    remove_stale_socket(socket)?;
    let listener = crate::unix_path::bind(socket).map_err(|e| VhostUserVsockError::Serve {
        path: socket.to_path_buf(),
        msg: format!("binding: {e}"),
    })?;

    let device_fd = device.as_raw_fd();
    let backend = Arc::new(RwLock::new(VhostUserVsockBackend::new(device)));
    if let Some(path) = stats {
        let b = backend.clone();
        super::stats::bind_and_spawn(path, "vsock", move || {
            let counters = b.read().unwrap_or_else(|e| e.into_inner()).device().counters().clone();
            super::stats::counters_of(&counters)
        });
    }
    let mut daemon = VhostUserDaemon::new(
        "tegmen-vsock".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserVsockError::NewDaemon(e.to_string()))?;

    let handlers = daemon.get_epoll_handlers();
    let worker = handlers.first().ok_or(VhostUserVsockError::NoWorker)?;
    worker
        .register_listener(device_fd, EventSet::IN, u64::from(BACKEND_EVENT))
        .map_err(VhostUserVsockError::RegisterListener)?;

    lockdown
        .apply(crate::seccomp::Kind::VsockBackend)
        .map_err(VhostUserVsockError::Seccomp)?;
    log::info!("vsock: waiting for the front-end on {}", socket.display());
    let mut listener = vhost::vhost_user::Listener::from(listener);
    let failures = backend.read().unwrap_or_else(|e| e.into_inner()).failures.clone();
    let result = match daemon.start(&mut listener) {
        Ok(()) => run_daemon(daemon, &failures).into_result(),
        Err(e) => Err(e.to_string()),
    };
    let _ = std::fs::remove_file(socket);
    if let Some(path) = stats {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(|msg| VhostUserVsockError::Serve {
        path: socket.to_path_buf(),
        msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::VsockConfig;
    use vhost_user_backend::VringT;

    fn backend(dir: &Path, cid: u64) -> VhostUserVsockBackend {
        let dev = VsockDevice::new(VsockConfig::new(dir.join("v.sock")).with_guest_cid(cid)).unwrap();
        VhostUserVsockBackend::new(dev)
    }

    #[test]
    fn config_space_holds_the_guest_cid() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), 0x1234_5678);
        assert_eq!(b.get_config(0, 8), 0x1234_5678u64.to_le_bytes().to_vec());
        assert_eq!(b.get_config(4, 4), vec![0, 0, 0, 0]);
        assert_eq!(b.get_config(0, 4), vec![0x78, 0x56, 0x34, 0x12]);
        assert!(b.get_config(4, 8).is_empty());
        assert!(b.get_config(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn features_and_queues() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), 3);
        assert_eq!(b.num_queues(), 3);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(b.protocol_features().contains(VhostUserProtocolFeatures::CONFIG));
        assert!(BACKEND_EVENT as usize > NUM_QUEUES);
    }

    #[test]
    fn events_before_memory_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(dir.path(), 3);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vrings: Vec<VringRwLock> = (0..3)
            .map(|_| VringRwLock::new(mem.clone(), QUEUE_SIZE).unwrap())
            .collect();
        for ev in [RXQ_EVENT, TXQ_EVENT, EVQ_EVENT, BACKEND_EVENT] {
            b.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
        }
        b.update_memory(mem).unwrap();
        // Queues not ready: nothing is touched.
        for ev in [RXQ_EVENT, TXQ_EVENT, EVQ_EVENT, BACKEND_EVENT] {
            b.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
        }
        assert!(b.handle_event(99, EventSet::IN, &vrings, 0).is_err());
    }

    /// A started daemon serving a front-end that is a bare socket.
    fn started(
        dir: &Path,
    ) -> (
        VhostUserDaemon<Arc<RwLock<VhostUserVsockBackend>>>,
        WorkerFailures,
        std::os::unix::net::UnixStream,
    ) {
        let b = Arc::new(RwLock::new(backend(dir, 3)));
        let failures = b.read().unwrap().failures.clone();
        let sock = dir.join("vu.sock");
        let mut listener = vhost::vhost_user::Listener::from(crate::unix_path::bind(&sock).unwrap());
        let front = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let mut daemon = VhostUserDaemon::new("t".into(), b, GuestMemoryAtomic::new(GuestMemoryMmap::new())).unwrap();
        daemon.start(&mut listener).unwrap();
        (daemon, failures, front)
    }

    #[test]
    fn a_failed_vring_worker_ends_the_serving() {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, failures, _front) = started(dir.path());
        // What vhost-user-backend's worker does with a backend's error:
        // its thread ends. The report must end the serving too.
        let f = failures.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let e = f.check("vsock", Err(io::Error::other("queue gone")));
            assert!(e.is_err());
        });
        let ended = run_daemon(daemon, &failures);
        t.join().unwrap();
        let err = ended.into_result().unwrap_err();
        assert_eq!(err, "vsock: a vring worker failed: queue gone");
    }

    #[test]
    fn a_front_end_that_goes_is_the_normal_end() {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, failures, front) = started(dir.path());
        drop(front);
        assert_eq!(run_daemon(daemon, &failures).into_result(), Ok(()));
        // A failure reported after the end goes nowhere and harms nothing.
        assert!(failures.check("vsock", Err(io::Error::other("late"))).is_err());
    }
}
