//! The virtio-net device hosted inline by the builtin monitor: the same
//! [`NetDevice`] QEMU reaches through `tegmen-net-backend`, behind the
//! virtio-mmio transport. Its [`Worker`] wakes on the driver's kicks and
//! on the tap (edge-triggered: the device reads it until it is empty or
//! the guest has no room, and the next rx kick brings the rest), and runs
//! the device's queue handlers as the vhost-user backend's handler does.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{Interrupt, VirtioDevice};
use super::worker::{Trigger, Worker, WorkerEvent};
use crate::devices::net::{FrameIo, NetDevice, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX};

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;

pub struct InlineNet<T: FrameIo + 'static> {
    device: Arc<Mutex<NetDevice<T>>>,
    worker: Option<Worker>,
}

impl<T: FrameIo + 'static> InlineNet<T> {
    pub fn new(device: NetDevice<T>) -> InlineNet<T> {
        InlineNet {
            device: Arc::new(Mutex::new(device)),
            worker: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetDevice<T>> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes snapshots of the device's counters (`tegmen-vmm --stats-dir`).
    pub fn counters(&self) -> impl Fn() -> serde_json::Value + Send + 'static
    where
        T: Send,
    {
        let device = self.device.clone();
        move || {
            let c = device.lock().unwrap_or_else(|p| p.into_inner()).counters().clone();
            crate::vhost_user::stats::counters_of(&c)
        }
    }
}

impl<T: FrameIo + 'static> VirtioDevice for InlineNet<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        // VERSION_1 is among the device's own.
        NetDevice::<T>::avail_features() | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.lock().config_space();
        super::virtio_mmio::copy_config(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        if queues.len() != NUM_QUEUES {
            return Err(format!(
                "net needs its {NUM_QUEUES} queues, the driver readied {}",
                queues.len()
            ));
        }
        self.worker = None;
        let tap_fd = {
            let mut dev = self.lock();
            dev.set_acked_features(features)
                .map_err(|e| format!("net: the tap's offloads: {e}"))?;
            dev.io().as_raw_fd()
        };
        let device = self.device.clone();
        let worker = Worker::spawn(
            "virtio-net",
            crate::seccomp::Kind::NetBackend,
            Some((tap_fd, Trigger::Edge)),
            queues,
            mem,
            interrupt,
            move |event, queues, mem| {
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                let mut signal = false;
                if event == WorkerEvent::Queue(TXQ_INDEX) {
                    signal |= dev.process_tx(&mut queues[TXQ_INDEX], mem);
                }
                // Any event may have brought frames or room for them.
                signal |= dev.process_rx(&mut queues[RXQ_INDEX], mem);
                // A transmit budget that ran out: take turns with receive.
                while dev.has_pending_tx() {
                    signal |= dev.process_tx(&mut queues[TXQ_INDEX], mem);
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
        self.lock().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::super::virtio_mmio::{INT_VRING, VIRTIO_F_VERSION_1};
    use super::*;
    use crate::devices::net::test_io::{pair, DatagramIo};
    use crate::devices::net::{NetConfig, VNET_HDR_LEN};
    use std::time::{Duration, Instant};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    const RX_BUF: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x20_0000;
    const RXQ: u64 = 0x1_0000;
    const TXQ: u64 = 0x2_0000;

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

    /// Puts a one-descriptor chain (`flags`) at `base`'s descriptor 0 and
    /// on its avail ring.
    fn offer(mem: &GuestMemoryMmap, base: u64, addr: u64, len: u32, flags: u16) {
        mem.write_obj(addr, GuestAddress(base)).unwrap();
        mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(base + 0x1000 + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(base + 0x1000 + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap, base: u64) -> u16 {
        mem.read_obj(GuestAddress(base + 0x2000 + 2)).unwrap()
    }

    fn wait(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn inline() -> (InlineNet<DatagramIo>, std::os::unix::net::UnixDatagram) {
        let (io, peer) = pair();
        let dev = NetDevice::new(
            io,
            NetConfig {
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 1400,
            },
        );
        (InlineNet::new(dev), peer)
    }

    #[test]
    fn identity_features_and_config_space() {
        let (net, _peer) = inline();
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), [QUEUE_SIZE, QUEUE_SIZE]);
        assert_ne!(net.features() & VIRTIO_F_VERSION_1, 0);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 9]);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1400);
    }

    /// A frame from the host side lands in the guest's rx buffer with its
    /// vnet header, and one the guest queues reaches the host side; the
    /// interrupt is raised; a missing queue is refused.
    #[test]
    fn frames_cross_both_ways_behind_the_mmio_transport() {
        let (mut net, peer) = inline();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let one = vec![(queue(&mem, RXQ), EventFd::new(libc::EFD_NONBLOCK).unwrap())];
        let e = net
            .activate(mem.clone(), VIRTIO_F_VERSION_1, one, irq.clone())
            .unwrap_err();
        assert!(e.contains("2 queues"), "{e}");

        let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let queues = vec![
            (queue(&mem, RXQ), kicks[0].try_clone().unwrap()),
            (queue(&mem, TXQ), kicks[1].try_clone().unwrap()),
        ];
        offer(&mem, RXQ, RX_BUF, 2048, 2); // VRING_DESC_F_WRITE
        net.activate(mem.clone(), VIRTIO_F_VERSION_1, queues, irq.clone())
            .unwrap();

        // Host → guest: an Ethernet frame behind a zero vnet header.
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(b"\x02\x00\x00\x00\x00\x01\x08\x06arp-ish-payload");
        peer.send(&frame).unwrap();
        wait("the frame reached the rx queue", || used_idx(&mem, RXQ) == 1);
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got[VNET_HDR_LEN..], GuestAddress(RX_BUF + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &frame[VNET_HDR_LEN..]);
        let num_buffers: u16 = mem.read_obj(GuestAddress(RX_BUF + 10)).unwrap();
        assert_eq!(num_buffers, 1);
        assert_ne!(irq.status() & INT_VRING, 0);

        // Guest → host: a frame in a device-readable buffer, then a kick.
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x09\x08\x00from-the-guest");
        mem.write_slice(&out, GuestAddress(TX_BUF)).unwrap();
        offer(&mem, TXQ, TX_BUF, out.len() as u32, 0);
        kicks[1].write(1).unwrap();
        let mut buf = [0u8; 256];
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &out[..]);
        wait("the tx chain was used", || used_idx(&mem, TXQ) == 1);

        // Reset stops the worker: frames wait on the host side.
        net.reset();
        peer.send(&frame).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&mem, RXQ), 1);
    }
}
