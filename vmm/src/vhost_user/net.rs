//! The virtio-net device served as a vhost-user backend
//! (`-netdev vhost-user` in QEMU).
//!
//! [`VhostUserNetBackend`] wraps the transport-independent [`NetDevice`]:
//! queue kicks become `process_tx` / `process_rx` calls, and the device's
//! host side (the tap) is one more event source of the daemon's worker
//! thread, token [`TAP_EVENT`], registered edge-triggered: a frame that
//! finds no receive buffer stays pending and the rest wait in the tap
//! until the guest kicks the receive queue with new buffers, so a full
//! guest never makes the worker spin.
//!
//! The MAC and MTU QEMU shows the guest are its own (`-device
//! virtio-net-device,mac=`); the backend's config space says the same for
//! front-ends that ask (`GET_CONFIG`).

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{run_daemon, with_queue, WorkerFailures};
use crate::devices::net::{FrameIo, NetDevice, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX};

/// Epoll token of the tap in the daemon's worker: `0..NUM_QUEUES` are the
/// queues and `NUM_QUEUES` the exit event.
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;

const RXQ_EVENT: u16 = RXQ_INDEX as u16;
const TXQ_EVENT: u16 = TXQ_INDEX as u16;

/// The net device as a `vhost-user-backend` backend.
pub struct VhostUserNetBackend<T: FrameIo> {
    device: NetDevice<T>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    failures: WorkerFailures,
}

impl<T: FrameIo> VhostUserNetBackend<T> {
    pub fn new(device: NetDevice<T>) -> Self {
        VhostUserNetBackend {
            device,
            mem: None,
            failures: WorkerFailures::default(),
        }
    }

    pub fn device(&self) -> &NetDevice<T> {
        &self.device
    }
}

impl<T: FrameIo + Sync> VhostUserBackendMut for VhostUserNetBackend<T> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    /// With `VHOST_USER_F_PROTOCOL_FEATURES`, which QEMU's vhost-user-net
    /// needs to start (it enables the rings with `SET_VRING_ENABLE`); its
    /// early `SET_VRING_ENABLE` is taken care of by [`super::relay`].
    fn features(&self) -> u64 {
        NetDevice::<T>::avail_features()
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        if let Err(e) = self.device.set_acked_features(features) {
            log::warn!("net: setting the tap's offloads: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&mut self) {
        self.device.reset();
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The handler sets it on each queue, which the device core reads.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        super::exit_event("net")
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let result = self.handle(device_event, vrings);
        self.failures.check("net", result)
    }
}

impl<T: FrameIo + Sync> VhostUserNetBackend<T> {
    fn handle(&mut self, device_event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        if !matches!(device_event, RXQ_EVENT | TXQ_EVENT | TAP_EVENT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("net: unknown device event {device_event}"),
            ));
        }
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.get(RXQ_INDEX), vrings.get(TXQ_INDEX)) else {
            return Ok(());
        };
        let device = &mut self.device;
        if !rx.get_ref().get_queue().ready() {
            // A stopped ring: what was taken from it is not ours any more.
            device.forget_rx_buffers();
        }
        if device_event == TXQ_EVENT {
            with_queue(tx, |q| device.process_tx(q, &mem))?;
        }
        // Any event may have made room or brought frames: the tap is
        // edge-triggered, so it is read until it is empty or the guest's
        // buffers are full, each time.
        with_queue(rx, |q| device.process_rx(q, &mem))?;
        // A transmit budget that ran out: go on, taking turns with receive.
        while device.has_pending_tx() {
            with_queue(tx, |q| device.process_tx(q, &mem))?;
            with_queue(rx, |q| device.process_rx(q, &mem))?;
            if !tx.get_ref().get_queue().ready() {
                break;
            }
        }
        Ok(())
    }
}

/// Errors running the vhost-user net backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error("vhost-user socket {path}: {msg}")]
    Serve { path: String, msg: String },
}

/// Serves `device` on the vhost-user socket `socket` until the front-end
/// disconnects; the socket file is removed before returning (removed as
/// soon as the front-end is connected, in fact, so also when `lockdown`
/// leaves the process a user that cannot).
/// With `stats`, the device's counters are served there too
/// ([`super::stats`]).
pub fn serve<T: FrameIo + Sync + 'static>(
    device: NetDevice<T>,
    socket: &Path,
    stats: Option<&Path>,
    lockdown: crate::privileges::Lockdown,
) -> Result<(), VhostUserNetError> {
    let err = |msg: String| VhostUserNetError::Serve {
        path: socket.display().to_string(),
        msg,
    };
    crate::devices::vsock::remove_stale_socket(socket).map_err(|e| err(e.to_string()))?;
    let listener = crate::unix_path::bind(socket).map_err(|e| err(format!("binding: {e}")))?;
    let tap_fd = device.io().as_raw_fd();
    let backend = Arc::new(RwLock::new(VhostUserNetBackend::new(device)));
    let failures = backend.read().unwrap_or_else(|e| e.into_inner()).failures.clone();
    if let Some(path) = stats {
        let b = backend.clone();
        super::stats::bind_and_spawn(path, "net", move || {
            let counters = b.read().unwrap_or_else(|e| e.into_inner()).device().counters().clone();
            super::stats::counters_of(&counters)
        });
    }
    let mut daemon = VhostUserDaemon::new(
        "tegmen-net".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| err(format!("cannot create the vhost-user daemon: {e}")))?;
    let handlers = daemon.get_epoll_handlers();
    let worker = handlers
        .first()
        .ok_or_else(|| err("the vhost-user daemon has no worker thread".into()))?;
    worker
        .register_listener(tap_fd, EventSet::IN | EventSet::EDGE_TRIGGERED, u64::from(TAP_EVENT))
        .map_err(|e| err(format!("registering the tap: {e}")))?;
    log::info!("net: waiting for the front-end on {}", socket.display());
    let (front, _) = listener.accept().map_err(|e| err(format!("accepting: {e}")))?;
    drop(listener);
    let _ = std::fs::remove_file(socket);
    // The daemon gets QEMU's messages through the relay (see its docs),
    // on a socket of its own next to ours, gone once it is connected.
    let inner = socket.with_extension("relay");
    let _ = std::fs::remove_file(&inner);
    let inner_listener = crate::unix_path::bind(&inner).map_err(|e| err(format!("binding the relay: {e}")))?;
    let back = crate::unix_path::connect(&inner).map_err(|e| err(format!("connecting the relay: {e}")))?;
    let mut inner_listener = vhost::vhost_user::Listener::from(inner_listener);
    let started = daemon.start(&mut inner_listener);
    let _ = std::fs::remove_file(&inner);
    // Every socket made: the user and the allow-list are taken before the
    // relay passes the first message, so before any vring can be kicked.
    let result = match started
        .map_err(|e| e.to_string())
        .and_then(|()| lockdown.apply(crate::seccomp::Kind::NetBackend))
        .and_then(|()| super::relay::spawn(front, back).map_err(|e| e.to_string()))
    {
        Ok(_) => run_daemon(daemon, &failures).into_result(),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(socket);
    if let Some(path) = stats {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::test_io::{pair, DatagramIo};
    use crate::devices::net::NetConfig;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;

    fn backend() -> (VhostUserNetBackend<DatagramIo>, UnixDatagram) {
        let (a, b) = pair();
        let dev = NetDevice::new(
            a,
            NetConfig {
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
            },
        );
        (VhostUserNetBackend::new(dev), b)
    }

    #[test]
    fn features_queues_and_config() {
        let (b, _peer) = backend();
        assert_eq!(b.num_queues(), 2);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(
            f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "QEMU's vhost-user-net needs it"
        );
        assert_eq!(b.get_config(0, 6), vec![2, 0, 0, 0, 0, 1]);
        assert!(b.get_config(0, 64).is_empty());
        assert!(TAP_EVENT as usize > NUM_QUEUES);
    }

    #[test]
    fn events_before_memory_or_ready_queues_are_harmless() {
        let (mut b, peer) = backend();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vrings: Vec<VringRwLock> = (0..2)
            .map(|_| VringRwLock::new(mem.clone(), QUEUE_SIZE).unwrap())
            .collect();
        peer.send(&[0u8; 64]).unwrap();
        for ev in [RXQ_EVENT, TXQ_EVENT, TAP_EVENT] {
            b.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
        }
        b.update_memory(mem).unwrap();
        for ev in [RXQ_EVENT, TXQ_EVENT, TAP_EVENT] {
            b.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
        }
        assert!(b.handle_event(99, EventSet::IN, &vrings, 0).is_err());
        assert_eq!(b.device().counters().rx_frames, 0, "no queue was ready");
    }
}
