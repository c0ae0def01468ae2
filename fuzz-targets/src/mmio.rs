//! The builtin monitor's virtio-mmio transport as a hostile driver writes
//! its registers: any order, any value, any width, queue set-up pointing
//! anywhere. Behind it a device that takes the queues it is given and uses
//! them (so a queue the transport let through is really walked).

use std::sync::{Arc, Mutex};

use tegmen_vmm::builtin::virtio_mmio::{
    reg, Interrupt, MmioTransport, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::guest;
use crate::input::Input;

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) | 0x5;

#[derive(Default)]
struct State {
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    activations: usize,
    resets: usize,
}

struct Device(Arc<Mutex<State>>);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 16, 1]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = 3u64.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| config.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<(Queue, EventFd)>,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let mut s = self.0.lock().expect("state");
        // The transport activates once per reset, with features the device
        // offered, and only queues whose rings are in guest memory.
        assert_eq!(s.activations, s.resets, "activated twice without a reset");
        assert_eq!(features & !FEATURES, 0, "features {features:#x} were not offered");
        assert!(features & (1 << VIRTIO_F_VERSION_1) != 0, "a legacy driver got through");
        for (q, _) in &queues {
            assert!(q.is_valid(&mem), "an invalid queue reached the device");
            assert!(q.ready());
        }
        s.activations += 1;
        s.queues = queues.into_iter().map(|(q, _)| q).collect();
        s.mem = Some(mem);
        Ok(())
    }
    fn reset(&mut self) {
        let mut s = self.0.lock().expect("state");
        s.resets += 1;
        s.queues.clear();
        s.mem = None;
    }
}

/// Serves every chain on the active queues: the device writes a byte to
/// each writable descriptor and uses the chain.
fn serve(state: &Arc<Mutex<State>>) {
    let mut s = state.lock().expect("state");
    let Some(mem) = s.mem.clone() else { return };
    for q in s.queues.iter_mut() {
        let mut served = 0;
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            served += 1;
            assert!(served <= 256, "more chains than the ring holds");
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain {
                if d.is_write_only() && d.len() > 0 && mem.write_obj(0xa5u8, d.addr()).is_ok() {
                    written += 1;
                }
            }
            let _ = q.add_used(&mem, head, written);
        }
    }
}

fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// A ring address: in the guest's memory mostly, anywhere sometimes.
fn ring_addr(input: &mut Input) -> u32 {
    if input.u8() < 230 {
        (u32::from(input.u16()) * 16) % (guest::MEM_SIZE as u32)
    } else {
        input.u32()
    }
}

pub fn transport(data: &[u8]) {
    let mut input = Input::new(data);
    let state = Arc::new(Mutex::new(State::default()));
    let mem = guest::memory();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let mut t = MmioTransport::new(Box::new(Device(state.clone())), mem.clone(), irq).expect("transport");
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 8 {
            // Any register, any value, any width.
            0 | 1 => {
                let offset = if input.u8() < 240 {
                    u64::from(input.u8() % 0x44) * 4
                } else {
                    input.u64()
                };
                let len = input.pick(&[4usize, 4, 4, 1, 2, 8, 0, 3]);
                let value = input.bytes(len).to_vec();
                t.write(offset, &value);
            }
            2 => {
                let offset = if input.u8() < 240 {
                    u64::from(input.u8()) * 2
                } else {
                    input.u64()
                };
                let len = input.pick(&[4usize, 4, 1, 2, 8, 0, 3, 64]);
                let mut buf = vec![0u8; len];
                t.read(offset, &mut buf);
            }
            // The driver's steps in order (values from the input).
            3 => {
                write32(&mut t, reg::STATUS, 0);
                write32(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
                write32(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                let features = if input.bool() { FEATURES } else { input.u64() };
                write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
                write32(&mut t, reg::DRIVER_FEATURES, features as u32);
                write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
                write32(&mut t, reg::DRIVER_FEATURES, (features >> 32) as u32);
                write32(
                    &mut t,
                    reg::STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                );
            }
            4 => {
                write32(&mut t, reg::QUEUE_SEL, u32::from(input.u8() % 4));
                write32(
                    &mut t,
                    reg::QUEUE_NUM,
                    input.pick(&[1u32, 2, 16, 256, 0, 3, 512, 1 << 16]),
                );
                write32(&mut t, reg::QUEUE_DESC_LOW, ring_addr(&mut input));
                write32(&mut t, reg::QUEUE_DRIVER_LOW, ring_addr(&mut input));
                write32(&mut t, reg::QUEUE_DEVICE_LOW, ring_addr(&mut input));
                if input.u8() == 0xff {
                    write32(&mut t, reg::QUEUE_DESC_HIGH, input.u32());
                }
                write32(&mut t, reg::QUEUE_READY, u32::from(input.u8() % 3));
            }
            5 => {
                let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
                write32(&mut t, reg::STATUS, status);
            }
            // The guest scribbles anywhere in its memory (rings included),
            // then notifies.
            6 => {
                let at = u64::from(input.u16()) * 32 % guest::MEM_SIZE;
                let bytes = input.chunk();
                let _ = mem.write_slice(bytes, vm_memory::GuestAddress(at));
                write32(&mut t, reg::QUEUE_NOTIFY, u32::from(input.u8() % 4));
                serve(&state);
            }
            _ => serve(&state),
        }
        let s = state.lock().expect("state");
        assert!(s.activations <= s.resets + 1);
        assert_eq!(
            t.is_active(),
            s.mem.is_some(),
            "transport and device disagree on activation"
        );
    }
}
