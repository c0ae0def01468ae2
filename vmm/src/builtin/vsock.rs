//! The vsock device hosted inline by the builtin monitor: the same
//! [`VsockDevice`] QEMU reaches through `tegmen-vsock-backend`, behind the
//! virtio-mmio transport. Its [`Worker`] wakes on the device's host-side
//! events and on the driver's queue kicks and runs the device's queue
//! handlers — what the vhost-user backend's handler does for QEMU.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::worker::{Trigger, Worker, WorkerEvent};
use crate::devices::vsock::defs::{EVQ_INDEX, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX};
use crate::devices::vsock::VsockDevice;

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;

pub struct InlineVsock {
    device: Arc<Mutex<VsockDevice>>,
    worker: Option<Worker>,
}

impl InlineVsock {
    pub fn new(device: VsockDevice) -> InlineVsock {
        InlineVsock {
            device: Arc::new(Mutex::new(device)),
            worker: None,
        }
    }

    /// Takes snapshots of the device's counters (`tegmen-vmm --stats-dir`).
    pub fn counters(&self) -> impl Fn() -> serde_json::Value + Send + 'static {
        let device = self.device.clone();
        move || {
            let c = device.lock().unwrap_or_else(|p| p.into_inner()).counters().clone();
            crate::vhost_user::stats::counters_of(&c)
        }
    }
}

impl VirtioDevice for InlineVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.device.lock().unwrap_or_else(|p| p.into_inner()).config_space();
        super::virtio_mmio::copy_config(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        if queues.len() != NUM_QUEUES {
            return Err(format!(
                "vsock needs its {NUM_QUEUES} queues, the driver readied {}",
                queues.len()
            ));
        }
        self.worker = None;
        let device = self.device.clone();
        let host_fd = device.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd();
        let worker = Worker::spawn(
            "vsock",
            crate::seccomp::Kind::VsockBackend,
            Some((host_fd, Trigger::Level)),
            queues,
            mem,
            interrupt,
            move |event, queues, mem| {
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                let mut signal = false;
                match event {
                    WorkerEvent::Host => dev.handle_host_events(),
                    WorkerEvent::Queue(TXQ_INDEX) => signal |= dev.process_tx(&mut queues[TXQ_INDEX], mem),
                    WorkerEvent::Queue(EVQ_INDEX) => signal |= dev.process_event_queue(&mut queues[EVQ_INDEX], mem),
                    // New rx buffers: the pending rx below uses them.
                    WorkerEvent::Queue(_) => {}
                }
                if dev.has_pending_rx() {
                    signal |= dev.process_rx(&mut queues[RXQ_INDEX], mem);
                }
                signal
            },
        )?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.device.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }
}

#[cfg(test)]
mod tests {
    use super::super::virtio_mmio::INT_VRING;
    use super::*;
    use crate::devices::vsock::VsockConfig;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const RX_BUF: u64 = 0x10_0000;

    fn queue(mem: &GuestMemoryMmap, base: u64) -> Queue {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// A host program connects to guest port 1024: the inline device puts
    /// the connection request in the guest's rx buffer, marks it used and
    /// raises the interrupt.
    #[test]
    fn a_host_connection_reaches_the_guest_rx_queue() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let device = VsockDevice::new(VsockConfig::new(&uds).with_guest_cid(3)).unwrap();
        let mut inline = InlineVsock::new(device);
        assert_eq!(inline.device_type(), 19);
        let mut cid = [0u8; 8];
        inline.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let queues = vec![queue(&mem, 0x1_0000), queue(&mem, 0x2_0000), queue(&mem, 0x3_0000)];
        // One write-only rx buffer: descriptor 0, on the avail ring.
        let rx = 0x1_0000u64;
        mem.write_obj(RX_BUF, GuestAddress(rx)).unwrap();
        mem.write_obj(4096u32, GuestAddress(rx + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(rx + 12)).unwrap(); // VRING_DESC_F_WRITE
        mem.write_obj(0u16, GuestAddress(rx + 0x1000 + 4)).unwrap(); // ring[0] = 0
        mem.write_obj(1u16, GuestAddress(rx + 0x1000 + 2)).unwrap(); // avail idx = 1

        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let queues = queues
            .into_iter()
            .zip(&kicks)
            .map(|(q, k)| (q, k.try_clone().unwrap()))
            .collect();
        inline
            .activate(mem.clone(), VIRTIO_F_VERSION_1, queues, irq.clone())
            .unwrap();
        // The driver's notification of the rx queue.
        kicks[RXQ_INDEX].write(1).unwrap();

        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(rx + 0x2000 + 2)).unwrap() == 0 {
            assert!(Instant::now() < deadline, "the request never reached the rx queue");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The header: dst_port 1024 at offset 20, op REQUEST (1) at 30.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(RX_BUF + 20)).unwrap(), 1024);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(RX_BUF + 30)).unwrap(), 1);
        assert_ne!(irq.status() & INT_VRING, 0);
        assert_eq!(irq.irqfd().read().unwrap(), 1);

        // Reset stops the worker and drops the connection.
        inline.reset();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        match host.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the reset should close the host side: {other:?}"),
        }
    }
}
