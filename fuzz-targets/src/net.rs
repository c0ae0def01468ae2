//! The virtio-net device between a hostile guest's queues and a host
//! network that sends it any frame at all.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use tegmen_vmm::devices::net::{
    FrameIo, NetConfig, NetDevice, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, MAX_FRAME_LEN,
    VNET_HDR_LEN,
};
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{self, Ring};
use crate::input::Input;

/// The host side: frames queued for the guest, and a check of every frame
/// the device hands the tap against what the spec lets the guest ask for.
struct FakeTap {
    fd: vmm_sys_util::eventfd::EventFd,
    incoming: Arc<Mutex<VecDeque<Vec<u8>>>>,
    acked: u64,
    sent: usize,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn has(acked: u64, bit: u32) -> bool {
    acked & (1u64 << bit) != 0
}

impl FrameIo for FakeTap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .incoming
            .lock()
            .expect("frames")
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        assert!(
            (VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&frame.len()),
            "a {}-byte frame reached the tap",
            frame.len()
        );
        let (flags, gso) = (frame[0], frame[1]);
        assert_eq!(&frame[10..12], &[0, 0], "num_buffers set on transmit");
        assert_eq!(flags & !HDR_F_NEEDS_CSUM, 0, "transmit flags {flags:#x}");
        if flags & HDR_F_NEEDS_CSUM != 0 {
            assert!(has(self.acked, VIRTIO_NET_F_CSUM), "checksum offload not negotiated");
            let start = u16::from_le_bytes([frame[6], frame[7]]) as usize;
            let offset = u16::from_le_bytes([frame[8], frame[9]]) as usize;
            assert!(
                start + offset + 2 <= frame.len() - VNET_HDR_LEN,
                "checksum outside the frame"
            );
        }
        match gso & !GSO_ECN {
            GSO_NONE => assert_eq!(gso & GSO_ECN, 0, "ECN without GSO"),
            GSO_TCPV4 => assert!(has(self.acked, VIRTIO_NET_F_HOST_TSO4), "TSO4 not negotiated"),
            GSO_TCPV6 => assert!(has(self.acked, VIRTIO_NET_F_HOST_TSO6), "TSO6 not negotiated"),
            other => panic!("GSO type {other} reached the tap"),
        }
        if gso & GSO_ECN != 0 {
            assert!(has(self.acked, VIRTIO_NET_F_HOST_ECN), "ECN not negotiated");
        }
        self.sent += 1;
        Ok(frame.len())
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fn offer(input: &mut Input, mem: &GuestMemoryMmap, ring: &mut Ring, writable: bool) {
    let at = guest::DATA_BASE + u64::from(input.u8()) * 0x1000;
    match input.u8() % 4 {
        0 => {
            // A vnet header and a frame, as Linux sends them.
            let bytes = input.chunk();
            let _ = mem.write_slice(bytes, GuestAddress(at));
            let _ = ring.add_chain(mem, &[(at, VNET_HDR_LEN as u32, writable), (at + 64, 0x800, writable)]);
        }
        1 => {
            let bytes = input.chunk();
            let _ = mem.write_slice(bytes, GuestAddress(at));
            let _ = ring.add_chain(mem, &[(at, bytes.len() as u32, writable)]);
        }
        _ => {
            let n = 1 + input.u8() % 4;
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|_| (guest::addr(input), guest::len(input), !input.u8().is_multiple_of(8)))
                .collect();
            for &(a, _, _) in &descs {
                let _ = mem.write_slice(input.chunk(), GuestAddress(a));
            }
            let _ = ring.add_chain(mem, &descs);
        }
    }
}

pub fn device(data: &[u8]) {
    let mut input = Input::new(data);
    let acked = NetDevice::<FakeTap>::avail_features() & input.u64();
    let incoming = Arc::new(Mutex::new(VecDeque::new()));
    let tap = FakeTap {
        fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        incoming: incoming.clone(),
        acked,
        sent: 0,
    };
    let mut dev = NetDevice::new(
        tap,
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        },
    );
    if dev.set_acked_features(acked).is_err() {
        return;
    }
    let mem = guest::memory();
    let event_idx = input.bool();
    let mut rx = Ring::new(&mem, 0, event_idx);
    let mut tx = Ring::new(&mem, 1, event_idx);
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 6 {
            0 | 1 => {
                offer(&mut input, &mem, &mut tx, false);
                dev.process_tx(&mut tx.queue, &mem);
                tx.take_used(&mem);
            }
            2 => offer(&mut input, &mem, &mut rx, true),
            3 => {
                // A frame from the host network: any bytes, any length.
                let len = match input.u8() {
                    0..=250 => input.u8() as usize * 8,
                    _ => VNET_HDR_LEN + MAX_FRAME_LEN + input.u8() as usize,
                };
                let mut frame = input.bytes(len).to_vec();
                frame.resize(len, 0x5a);
                incoming.lock().expect("frames").push_back(frame);
            }
            4 => {
                dev.process_rx(&mut rx.queue, &mem);
                rx.take_used(&mem);
            }
            _ => {
                let ring = if input.bool() { &mut rx } else { &mut tx };
                guest::mischief(&mut input, &mem, ring);
                if input.u8() == 0 {
                    dev.reset();
                }
            }
        }
        let _ = dev.read_config(u32::from(input.u8() % 16), u32::from(input.u8() % 16));
    }
    let c = dev.counters();
    assert!(c.tx_frames as usize <= dev.io().sent);
}
