//! The virtio-mmio transport (virtio 1.x, register layout version 2) of the
//! builtin monitor: the register file a driver programs — feature
//! negotiation in 32-bit halves, queue setup, the status state machine,
//! interrupt status and acknowledgement, device configuration — in front of
//! a [`VirtioDevice`]. The device is activated with its queues when the
//! driver sets DRIVER_OK, and reset when it writes 0 to the status.
//!
//! Notifications: the transport owns one eventfd per queue (its "kick").
//! The monitor registers each as a KVM ioeventfd on QueueNotify with the
//! queue's index as datamatch, so a driver's notification wakes the
//! device's worker without leaving the kernel; a QueueNotify write that
//! does reach the transport kicks the same eventfd.
//!
//! Guest-controlled values are checked: queue sizes beyond the maximum or
//! not a power of two, queues that do not fit guest memory, feature bits
//! the device never offered, status changes out of order, a queue index
//! out of range — each is refused (the device is marked as needing a reset
//! where the spec says so), nothing panics.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
/// The vendor id the transport reports ("TEGM" in ASCII; drivers do not
/// look at it).
pub const VENDOR_ID: u32 = 0x5445_474d;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1: every device here is a modern one.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// How a device raises its interrupt: the InterruptStatus bits the driver
/// reads, and the irqfd of its IRQ line.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Used buffers are ready (`INT_VRING`) or the configuration changed
    /// (`INT_CONFIG`).
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio-mmio: raising the interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Copies `data.len()` bytes of `config` from `offset` into `data`; what
/// lies beyond the config space reads as 0.
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (19 vsock, 26 fs).
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features offered, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads `data.len()` bytes of the configuration space at `offset`;
    /// what lies beyond it reads as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (read-only for most devices).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK: the device starts with the negotiated features and its
    /// ready queues, checked against guest memory, each with the eventfd
    /// the driver's notifications of it signal.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String>;
    /// The driver reset the device: drop queues and state.
    fn reset(&mut self);
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<MmioTransport> {
        let queues = Self::fresh_queues(device.as_ref());
        let kicks = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            kicks,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The eventfd notifications of queue `index` signal.
    pub fn kick(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    /// How many queues the device has.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .into_iter()
            .filter_map(|max| Queue::new(max).ok())
            .collect()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device
    /// up (FEATURES_OK, before DRIVER_OK) and the queue is not ready.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.interrupt.ack(u32::MAX);
    }

    /// Marks the device broken: the driver must reset it.
    fn needs_reset(&mut self, why: &str) {
        log::warn!(
            "virtio-mmio {}: {why}; the device needs a reset",
            self.device.device_type()
        );
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt.raise(INT_CONFIG);
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and read whole.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if self.queue_setup_allowed() => {
                let sel = self.queue_sel;
                let bad = match self.queue() {
                    // A power of two, 1..=QueueNumMax.
                    Some(q) => u16::try_from(v).map_or(true, |s| q.try_set_size(s).is_err()),
                    None => false,
                };
                if bad {
                    self.needs_reset(&format!("queue {sel}: invalid size {v}"));
                }
            }
            reg::QUEUE_READY if self.queue_setup_allowed() => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_setup_allowed() {
                    return;
                }
                let Some(q) = self.queue() else { return };
                if q.ready() {
                    return;
                }
                match offset {
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added (FAILED may come at any time).
        if v & self.status != self.status {
            return;
        }
        let added = v & !self.status;
        if added & STATUS_FAILED != 0 {
            // The driver gave up. FAILED is taken alone: a bit written with
            // it would skip its own checks (FEATURES_OK with features never
            // offered, then DRIVER_OK; found by the virtio_mmio fuzz target).
            self.status |= STATUS_FAILED;
            return;
        }
        if self.status & STATUS_FAILED != 0 {
            // Nothing goes on after FAILED but a reset.
            return;
        }
        let order_ok = match added {
            STATUS_ACKNOWLEDGE => self.status == 0,
            STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_DRIVER_OK => self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_NEEDS_RESET == 0,
            _ => false,
        };
        if !order_ok {
            log::warn!(
                "virtio-mmio {}: status {v:#x} after {:#x} is out of order; ignored",
                self.device.device_type(),
                self.status
            );
            return;
        }
        match added {
            STATUS_FEATURES_OK => {
                // FEATURES_OK only sticks for features the device offered,
                // and a modern driver.
                let offered = self.device.features();
                if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    log::warn!(
                        "virtio-mmio {}: driver features {:#x} not a subset of {offered:#x} or not VERSION_1",
                        self.device.device_type(),
                        self.driver_features
                    );
                    return;
                }
                self.status = v;
            }
            STATUS_DRIVER_OK => {
                self.status = v;
                self.activate();
            }
            _ => self.status = v,
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        if let Some(i) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
            let why = format!("queue {i} is not valid (size or addresses outside guest memory)");
            self.needs_reset(&why);
            return;
        }
        // The ready queues go to the device; the transport keeps stand-ins
        // that answer QueueReady and QueueNumMax until the next reset.
        let mut queues = Vec::new();
        for (q, kick) in self.queues.iter_mut().zip(&self.kicks).filter(|(q, _)| q.ready()) {
            let (Ok(mut stand_in), Ok(kick)) = (Queue::new(q.max_size()), kick.try_clone()) else {
                continue;
            };
            stand_in.set_size(q.size());
            stand_in.set_ready(true);
            let mut queue = std::mem::replace(q, stand_in);
            queue.set_event_idx(event_idx);
            queues.push((queue, kick));
        }
        match self
            .device
            .activate(self.mem.clone(), self.driver_features, queues, self.interrupt.clone())
        {
            Ok(()) => self.active = true,
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// What the fake device saw.
    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<u16>)>,
        kicks: Vec<EventFd>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Fake(Arc<Mutex<Seen>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 256, 64]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) | 0x5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = 42u64.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            f: u64,
            q: Vec<(Queue, EventFd)>,
            _: Arc<Interrupt>,
        ) -> Result<(), String> {
            let mut seen = self.0.lock().unwrap();
            seen.activated = Some((f, q.iter().map(|(q, _)| q.size()).collect()));
            seen.kicks = q.into_iter().map(|(_, k)| k).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(Box::new(Fake(seen.clone())), mem, irq).unwrap(),
            seen,
        )
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiates `features` and sets queue `index` up at a valid place.
    fn set_up(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    fn queue(t: &mut MmioTransport, index: u32, size: u32, base: u32) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, base);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
        w(t, reg::QUEUE_DRIVER_HIGH, 0);
        w(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
        w(t, reg::QUEUE_DEVICE_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        // Narrow or unaligned register reads return zeros.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(reg::MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn features_are_offered_and_negotiated_in_halves() {
        let (mut t, seen) = transport();
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0x2000_0005);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);

        set_up(&mut t, VIRTIO_F_VERSION_1 | 0x1);
        assert_eq!(r(&mut t, reg::STATUS), 0xb, "FEATURES_OK kept");
        queue(&mut t, 0, 128, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.is_active());
        let (features, sizes) = seen.lock().unwrap().activated.clone().unwrap();
        assert_eq!(features, VIRTIO_F_VERSION_1 | 0x1);
        assert_eq!(sizes, vec![128], "only the ready queue");
    }

    #[test]
    fn features_not_offered_or_legacy_drivers_do_not_get_features_ok() {
        let (mut t, _) = transport();
        set_up(&mut t, VIRTIO_F_VERSION_1 | 0x2);
        assert_eq!(
            r(&mut t, reg::STATUS) & STATUS_FEATURES_OK,
            0,
            "bit 1 was never offered"
        );
        let (mut t, _) = transport();
        set_up(&mut t, 0x1);
        assert_eq!(r(&mut t, reg::STATUS) & STATUS_FEATURES_OK, 0, "no VERSION_1");
    }

    #[test]
    fn status_goes_forward_in_order_only() {
        let (mut t, seen) = transport();
        // DRIVER before ACKNOWLEDGE, DRIVER_OK before FEATURES_OK: ignored.
        w(&mut t, reg::STATUS, STATUS_DRIVER);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, reg::STATUS), STATUS_ACKNOWLEDGE);
        assert!(seen.lock().unwrap().activated.is_none());
        // Clearing a bit is not allowed either, FAILED always is.
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_FAILED);
        assert_eq!(r(&mut t, reg::STATUS), STATUS_ACKNOWLEDGE | STATUS_FAILED);
    }

    /// FAILED written together with FEATURES_OK does not let features
    /// the device never offered through, and a driver that failed is not
    /// activated until it resets the device.
    #[test]
    fn failed_carries_no_other_bit_past_its_checks() {
        let (mut t, seen) = transport();
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        let failed_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED;
        w(&mut t, reg::STATUS, failed_ok);
        assert_eq!(
            r(&mut t, reg::STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED
        );
        w(&mut t, reg::STATUS, failed_ok | STATUS_DRIVER_OK);
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED | STATUS_FEATURES_OK,
        );
        assert!(!t.is_active());
        assert!(seen.lock().unwrap().activated.is_none());
        // A reset, then a proper negotiation, works again.
        w(&mut t, reg::STATUS, 0);
        set_up(&mut t, VIRTIO_F_VERSION_1);
        queue(&mut t, 0, 128, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.is_active());
    }

    #[test]
    fn queues_are_set_up_only_between_features_ok_and_driver_ok() {
        let (mut t, seen) = transport();
        // Before FEATURES_OK: ignored.
        queue(&mut t, 0, 128, 0x10000);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 64);
        w(&mut t, reg::QUEUE_SEL, 3);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 3");

        set_up(&mut t, VIRTIO_F_VERSION_1);
        queue(&mut t, 0, 128, 0x10000);
        queue(&mut t, 1, 256, 0x20000);
        queue(&mut t, 7, 16, 0x30000); // no such queue: ignored
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(seen.lock().unwrap().activated.clone().unwrap().1, vec![128, 256]);
        // After DRIVER_OK the queues stay as they are.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn a_bad_queue_marks_the_device_for_reset() {
        for (size, base) in [(100, 0x10000), (512, 0x10000), (128, 0xff000)] {
            let (mut t, seen) = transport();
            set_up(&mut t, VIRTIO_F_VERSION_1);
            // Not a power of two, beyond the maximum, rings past memory.
            queue(&mut t, 0, size, base);
            let status = r(&mut t, reg::STATUS);
            w(&mut t, reg::STATUS, status | STATUS_DRIVER_OK);
            assert!(!t.is_active(), "size {size} at {base:#x}");
            assert_ne!(r(&mut t, reg::STATUS) & STATUS_NEEDS_RESET, 0);
            assert!(seen.lock().unwrap().activated.is_none());
            if size == 128 {
                // Found at DRIVER_OK: the driver hears of it.
                assert_ne!(t.interrupt().status() & INT_CONFIG, 0);
            }
        }
    }

    #[test]
    fn notifications_interrupts_config_and_reset() {
        let (mut t, seen) = transport();
        assert_eq!(t.num_queues(), 3);
        set_up(&mut t, VIRTIO_F_VERSION_1);
        queue(&mut t, 0, 128, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        // A notification signals the queue's kick, which the device got.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 9);
        assert_eq!(seen.lock().unwrap().kicks.len(), 1);
        assert_eq!(seen.lock().unwrap().kicks[0].read().unwrap(), 2);
        assert!(t.kick(1).unwrap().read().is_err(), "queue 1 was not notified");
        assert!(t.kick(9).is_none());

        t.interrupt().raise(INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1, "the irqfd fired");
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);

        let mut b = [0u8; 4];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(u32::from_le_bytes(b), 42);
        t.read(reg::CONFIG + 6, &mut b);
        assert_eq!(b, [0; 4], "beyond the config space");
        t.write(reg::CONFIG + 2, &[1, 2]);
        assert_eq!(seen.lock().unwrap().config_writes, vec![(2, vec![1, 2])]);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);

        w(&mut t, reg::STATUS, 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0, "queues reset");
        // The device can be set up again.
        set_up(&mut t, VIRTIO_F_VERSION_1);
        queue(&mut t, 0, 64, 0x10000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.is_active());
    }
}
