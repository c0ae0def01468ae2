//! Device tests: the test plays the guest driver on one side and the host
//! network on the other. The host side is a datagram socket pair, which
//! moves one frame per call as a tap does.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::test_queue::{TestQueue, QSIZE};

const MEM_SIZE: usize = 32 << 20;
const BUF_BASE: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct FakeTap {
    sock: UnixDatagram,
    offload: Option<u32>,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl FrameIo for FakeTap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sock.send(frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload = Some(flags);
        Ok(())
    }
}

struct Guest {
    mem: &'static GuestMemoryMmap,
    dev: NetDevice<FakeTap>,
    /// The host network's end.
    host: UnixDatagram,
    rxq: TestQueue,
    txq: TestQueue,
    next_buf: u64,
}

const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x58, 0x00, 0x07];

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl Guest {
    fn new(features: u64) -> Guest {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut dev = NetDevice::new(FakeTap { sock: a, offload: None }, NetConfig { mac: MAC, mtu: 1450 });
        dev.set_acked_features(features).unwrap();
        Guest {
            mem,
            dev,
            host: b,
            rxq: TestQueue::new(mem, 0x0),
            txq: TestQueue::new(mem, 0x1_0000),
            next_buf: BUF_BASE,
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).div_ceil(0x1000) * 0x1000;
        assert!(self.next_buf < MEM_SIZE as u64);
        a
    }

    /// Queues one frame for transmission: the header in one descriptor,
    /// the frame in another, as Linux does without ANY_LAYOUT tricks.
    fn send(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> u16 {
        let h = self.alloc(VNET_HDR_LEN as u32);
        let f = self.alloc(frame.len() as u32);
        self.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
        self.mem.write_slice(frame, GuestAddress(f)).unwrap();
        self.txq
            .add_chain(&[(h, VNET_HDR_LEN as u32, 0), (f, frame.len() as u32, 0)])
    }

    /// Queues one frame with its header in a single descriptor (what
    /// Linux does with VERSION_1, whose layout is free).
    fn send_one(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> u16 {
        let bytes = host_frame(hdr, frame);
        let a = self.alloc(bytes.len() as u32);
        self.mem.write_slice(&bytes, GuestAddress(a)).unwrap();
        self.txq.add_chain(&[(a, bytes.len() as u32, 0)])
    }

    fn process_tx(&mut self) -> bool {
        self.dev.process_tx(&mut self.txq.queue, self.mem)
    }

    fn process_rx(&mut self) -> bool {
        self.dev.process_rx(&mut self.rxq.queue, self.mem)
    }

    /// What reached the host network.
    fn host_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Offers a receive buffer of `len` bytes; returns (head, addr).
    fn offer(&mut self, len: u32) -> (u16, u64) {
        let a = self.alloc(len);
        (self.rxq.add_chain(&[(a, len, W)]), a)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn plain_hdr() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

fn host_frame(hdr: [u8; VNET_HDR_LEN], body: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_vec();
    v.extend_from_slice(body);
    v
}

fn all_features() -> u64 {
    NetDevice::<FakeTap>::avail_features()
}

#[test]
fn features_config_space_and_offloads_follow_the_driver() {
    let f = all_features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b} offered");
    }
    assert_eq!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(f & bit(VIRTIO_NET_F_GUEST_UFO), 0);
    let g = Guest::new(f | bit(VIRTIO_NET_F_CTRL_VQ));
    assert_eq!(g.dev.acked_features(), f, "what was not offered is not acked");
    assert_eq!(
        g.dev.io().offload,
        Some(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    );
    let cfg = g.dev.config_space();
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1450);
    assert_eq!(g.dev.read_config(10, 2), 1450u16.to_le_bytes());
    assert!(g.dev.read_config(11, 2).is_empty());
    assert!(g.dev.read_config(u32::MAX, 2).is_empty());
    // TSO without checksum offload is no offload at all.
    let g = Guest::new(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_GUEST_TSO4));
    assert_eq!(g.dev.io().offload, Some(0));
}

#[test]
fn transmitted_frames_reach_the_host_whole_with_their_header() {
    let mut g = Guest::new(all_features());
    let body = frame(1400, 1);
    let head = g.send(plain_hdr(), &body);
    // A GSO frame with a partial checksum, as Linux sends with TSO.
    let mut gso = plain_hdr();
    gso[0] = HDR_F_NEEDS_CSUM;
    gso[1] = GSO_TCPV4;
    gso[2..4].copy_from_slice(&54u16.to_le_bytes());
    gso[4..6].copy_from_slice(&1448u16.to_le_bytes());
    gso[6..8].copy_from_slice(&34u16.to_le_bytes());
    gso[8..10].copy_from_slice(&16u16.to_le_bytes());
    gso[10] = 7; // num_buffers: meaningless on transmit, cleared
    let big = frame(30_000, 2);
    g.send(gso, &big);
    assert!(g.process_tx(), "the guest is told its buffers are back");
    let sent = g.host_frames();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], host_frame(plain_hdr(), &body));
    let mut want = gso;
    want[10] = 0;
    assert_eq!(sent[1], host_frame(want, &big));
    let used = g.txq.take_used();
    assert_eq!(used[0], (head, 0));
    assert_eq!(g.dev.counters().tx_frames, 2);
    assert_eq!(g.dev.counters().tx_bytes, 31_400);
}

#[test]
fn hostile_transmit_chains_are_dropped_counted_and_returned() {
    let mut g = Guest::new(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
    let body = frame(100, 3);
    // A device-writable descriptor in a transmit chain.
    let a = g.alloc(200);
    g.txq.add_chain(&[(a, 200, W)]);
    // Shorter than a header and an Ethernet header.
    g.txq.add_chain(&[(a, 20, 0)]);
    // Longer than any frame.
    let big = g.alloc(70_000);
    g.txq.add_chain(&[(big, 70_000, 0)]);
    // Outside guest memory.
    g.txq.add_chain(&[(MEM_SIZE as u64 - 8, 64, 0)]);
    // Offloads that were not negotiated.
    let mut csum = plain_hdr();
    csum[0] = HDR_F_NEEDS_CSUM;
    g.send(csum, &body);
    let mut tso = plain_hdr();
    tso[1] = GSO_TCPV4;
    g.send(tso, &body);
    // Unknown flags and GSO types.
    let mut flags = plain_hdr();
    flags[0] = 0x80;
    g.send(flags, &body);
    let mut ufo = plain_hdr();
    ufo[1] = GSO_UDP;
    g.send(ufo, &body);
    let sent_ok = g.send(plain_hdr(), &body);
    assert!(g.process_tx());
    assert_eq!(
        g.host_frames(),
        vec![host_frame(plain_hdr(), &body)],
        "only the good frame"
    );
    let c = g.dev.counters();
    assert_eq!((c.tx_malformed, c.tx_bad_header, c.tx_frames), (4, 4, 1), "{c:?}");
    let used = g.txq.take_used();
    assert_eq!(used.len(), 9, "every chain went back");
    assert_eq!(used.last().unwrap().0, sent_ok);

    // With CSUM negotiated, a checksum that would land outside the frame.
    let mut g = Guest::new(all_features());
    let mut out = plain_hdr();
    out[0] = HDR_F_NEEDS_CSUM;
    out[6..8].copy_from_slice(&90u16.to_le_bytes());
    out[8..10].copy_from_slice(&16u16.to_le_bytes());
    g.send(out, &body);
    // GSO without the partial checksum Linux always sets with it, and a
    // zero segment size.
    let mut nocsum = plain_hdr();
    nocsum[1] = GSO_TCPV6;
    nocsum[4..6].copy_from_slice(&1000u16.to_le_bytes());
    g.send(nocsum, &body);
    let mut zero = plain_hdr();
    zero[0] = HDR_F_NEEDS_CSUM;
    zero[1] = GSO_TCPV4;
    zero[6..8].copy_from_slice(&34u16.to_le_bytes());
    g.send(zero, &body);
    g.process_tx();
    assert!(g.host_frames().is_empty());
    assert_eq!(g.dev.counters().tx_bad_header, 3);
}

#[test]
fn a_flooding_guest_is_served_in_budgets() {
    let mut g = Guest::new(all_features());
    let body = frame(60, 4);
    for _ in 0..(TX_BUDGET + 50) {
        g.send_one(plain_hdr(), &body);
    }
    g.process_tx();
    assert!(g.dev.has_pending_tx(), "the budget ran out");
    let sent = g.host_frames();
    assert_eq!(sent.len(), TX_BUDGET);
    assert_eq!(sent[0], host_frame(plain_hdr(), &body));
    g.process_tx();
    assert!(!g.dev.has_pending_tx());
    assert_eq!(g.host_frames().len(), 50);
    assert_eq!(g.txq.take_used().len(), TX_BUDGET + 50);
}

#[test]
fn received_frames_fill_one_buffer_with_num_buffers_set() {
    let mut g = Guest::new(all_features());
    let mut hdr = plain_hdr();
    hdr[0] = HDR_F_DATA_VALID;
    let body = frame(1000, 5);
    g.host.send(&host_frame(hdr, &body)).unwrap();
    let (head, addr) = g.offer(2048);
    assert!(g.process_rx());
    let used = g.rxq.take_used();
    assert_eq!(used, vec![(head, (VNET_HDR_LEN + 1000) as u32)]);
    let got = g.read(addr, VNET_HDR_LEN + 1000);
    assert_eq!(got[0], HDR_F_DATA_VALID);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &body[..]);
    assert_eq!(g.dev.counters().rx_frames, 1);
}

#[test]
fn a_large_frame_spans_mergeable_buffers() {
    let mut g = Guest::new(all_features());
    let body = frame(5000, 6);
    g.host.send(&host_frame(plain_hdr(), &body)).unwrap();
    let offered: Vec<(u16, u64)> = (0..6).map(|_| g.offer(1526)).collect();
    g.process_rx();
    let used = g.rxq.take_used();
    let total = VNET_HDR_LEN + 5000;
    assert_eq!(used.len(), total.div_ceil(1526), "{used:?}");
    let mut got = Vec::new();
    for ((head, len), (h, addr)) in used.iter().zip(&offered) {
        assert_eq!(head, h, "in ring order");
        got.extend(g.read(*addr, *len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), used.len() as u16);
    assert_eq!(&got[VNET_HDR_LEN..], &body[..]);
}

#[test]
fn a_frame_waits_for_buffers_and_keeps_its_order() {
    let mut g = Guest::new(all_features());
    let first = frame(3000, 7);
    let second = frame(100, 8);
    g.host.send(&host_frame(plain_hdr(), &first)).unwrap();
    g.host.send(&host_frame(plain_hdr(), &second)).unwrap();
    // Room for part of the first frame only.
    let (_, a1) = g.offer(1526);
    assert!(!g.process_rx(), "nothing completed yet");
    assert!(g.dev.has_pending_rx());
    assert!(g.rxq.take_used().is_empty());
    let (_, a2) = g.offer(1526);
    let (_, a3) = g.offer(1526);
    g.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used.len(), 3, "{used:?}");
    let mut got = g.read(a1, used[0].1 as usize);
    got.extend(g.read(a2, used[1].1 as usize));
    assert_eq!(&got[VNET_HDR_LEN..], &first[..], "the first frame first");
    let third = g.read(a3, used[2].1 as usize);
    assert_eq!(&third[VNET_HDR_LEN..], &second[..]);
    assert!(!g.dev.has_pending_rx());
}

#[test]
fn hostile_receive_buffers_are_returned_and_frames_not_lost_to_them() {
    // Without MRG_RXBUF a frame larger than the buffer is dropped.
    let mut g = Guest::new(bit(VIRTIO_F_VERSION_1));
    g.host.send(&host_frame(plain_hdr(), &frame(3000, 9))).unwrap();
    let (small, _) = g.offer(1526);
    g.process_rx();
    assert_eq!(g.rxq.take_used(), vec![(small, 0)]);
    assert_eq!(g.dev.counters().rx_too_big, 1);

    let mut g = Guest::new(all_features());
    let body = frame(200, 10);
    g.host.send(&host_frame(plain_hdr(), &body)).unwrap();
    // A device-readable buffer, one smaller than the header, one outside
    // guest memory: each goes back empty; the frame lands in the next.
    let a = g.alloc(2048);
    let ro = g.rxq.add_chain(&[(a, 2048, 0)]);
    let tiny = g.rxq.add_chain(&[(a, 4, W)]);
    let wild = g.rxq.add_chain(&[(MEM_SIZE as u64 - 16, 2048, W)]);
    let (good, addr) = g.offer(2048);
    g.process_rx();
    let used = g.rxq.take_used();
    assert_eq!(used[..3], [(ro, 0), (tiny, 0), (wild, 0)], "{used:?}");
    // The wild buffer failed the write: that frame is dropped, counted.
    assert_eq!(g.dev.counters().rx_malformed, 3);
    assert_eq!(used.len(), 3, "the good buffer is still the guest's");
    // The next frame reaches it.
    g.host.send(&host_frame(plain_hdr(), &body)).unwrap();
    g.process_rx();
    assert_eq!(g.rxq.take_used(), vec![(good, (VNET_HDR_LEN + 200) as u32)]);
    assert_eq!(&g.read(addr + VNET_HDR_LEN as u64, 200), &body);
    // Runts from the host side are skipped.
    g.host.send(&[1, 2, 3]).unwrap();
    g.process_rx();
    assert_eq!(g.dev.counters().rx_runt, 1);
    assert_eq!(g.rxq.free.len() + g.rxq.chains.len(), QSIZE as usize);
}

#[test]
fn a_real_tap_opens_with_a_vnet_header_in_a_namespace_of_its_own() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs /dev/net/tun");
        return;
    }
    assert!(Tap::open("").is_err());
    assert!(Tap::open("a-name-far-too-long").is_err());
    // A thread in a fresh network namespace: nothing of the host's changes.
    std::thread::spawn(|| {
        // SAFETY: unshare(2) affects this thread only (CLONE_NEWNET).
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "{}",
            io::Error::last_os_error()
        );
        let mut tap = Tap::open("tgtest%d").unwrap();
        assert_eq!(tap.name(), "tgtest0");
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6).unwrap();
        let mut buf = [0u8; 2048];
        let e = tap.recv_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "non-blocking, nothing yet");
        // The device core runs on it: the guest's ARP request for the
        // tap's address is answered by this namespace's kernel.
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("ip(8)");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["addr", "add", "10.251.0.1/24", "dev", "tgtest0"]);
        ip(&["link", "set", "tgtest0", "up"]);
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let mut dev = NetDevice::new(tap, NetConfig { mac: MAC, mtu: 1500 });
        dev.set_acked_features(all_features()).unwrap();
        let mut txq = TestQueue::new(mem, 0x1_0000);
        let mut rxq = TestQueue::new(mem, 0x0);
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[10, 251, 0, 2]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 251, 0, 1]);
        let bytes = host_frame(plain_hdr(), &arp);
        mem.write_slice(&bytes, GuestAddress(BUF_BASE)).unwrap();
        txq.add_chain(&[(BUF_BASE, bytes.len() as u32, 0)]);
        dev.process_tx(&mut txq.queue, mem);
        assert_eq!(dev.counters().tx_frames, 1, "{:?}", dev.counters());
        let rx_buf = BUF_BASE + 0x1_0000;
        rxq.add_chain(&[(rx_buf, 2048, W)]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let reply = loop {
            dev.process_rx(&mut rxq.queue, mem);
            let used = rxq.take_used();
            if let Some((_, len)) = used.first() {
                let mut v = vec![0u8; *len as usize];
                mem.read_slice(&mut v, GuestAddress(rx_buf)).unwrap();
                let f = v[VNET_HDR_LEN..].to_vec();
                // IPv6 router solicitations and the like may come first.
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                    break f;
                }
                rxq.add_chain(&[(rx_buf, 2048, W)]);
            }
            assert!(std::time::Instant::now() < deadline, "no ARP reply through the tap");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(&reply[..6], &MAC, "addressed to the guest NIC");
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[28..32], &[10, 251, 0, 1], "from the tap's address");
    })
    .join()
    .unwrap();
}

#[test]
fn empty_receive_buffers_are_returned_not_hoarded() {
    let mut g = Guest::new(all_features());
    let body = frame(3000, 11);
    g.host.send(&host_frame(plain_hdr(), &body)).unwrap();
    let (first, a1) = g.offer(1526);
    // Zero-length buffers after a good one: each goes back empty, and the
    // frame (which now cannot keep ring order) is dropped.
    let a = g.alloc(64);
    let empty: Vec<u16> = (0..5).map(|_| g.rxq.add_chain(&[(a, 0, W)])).collect();
    g.process_rx();
    let mut used = g.rxq.take_used();
    assert_eq!(used[..2], [(first, 0), (empty[0], 0)], "{used:?}");
    assert!(!g.dev.has_pending_rx(), "the frame was dropped");
    // The next frame is placed in the next good buffer; the other empty
    // ones before it go back empty.
    g.host.send(&host_frame(plain_hdr(), &body[..500])).unwrap();
    let (good, addr) = g.offer(1526);
    g.process_rx();
    used.extend(g.rxq.take_used());
    let mut want: Vec<(u16, u32)> = vec![(first, 0)];
    want.extend(empty.iter().map(|h| (*h, 0)));
    want.push((good, (VNET_HDR_LEN + 500) as u32));
    assert_eq!(used, want);
    assert_eq!(&g.read(addr + VNET_HDR_LEN as u64, 500), &body[..500]);
    assert_eq!(g.dev.counters().rx_malformed, 5);
    let _ = a1;
}
