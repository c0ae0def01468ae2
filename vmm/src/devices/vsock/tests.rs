//! Device-level tests: the test plays the guest driver.
//!
//! A [`Guest`] owns guest memory, split virtqueues (driven with
//! `virtio-queue`'s descriptor types), and a [`VsockDevice`] whose Unix
//! sockets live in a temporary directory. It writes packets the way the
//! Linux driver does (header descriptor, then payload descriptor), offers
//! receive buffers, and reads back what the device wrote — or writes
//! whatever garbage a hostile guest would.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::defs::*;
use super::packet::VsockHeader;
use super::{VsockConfig, VsockDevice};
use crate::devices::test_queue::{TestQueue, QSIZE};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 32 << 20;
const BUF_BASE: u64 = 0x10_0000;
const SLOT: u64 = 0x1_1000; // one 64 KiB payload plus a header, rounded up
const RX_DATA_LEN: u32 = 4096;

/// A received packet.
#[derive(Debug, Clone)]
struct Pkt {
    hdr: VsockHeader,
    data: Vec<u8>,
}

/// The guest driver and the device under test.
struct Guest {
    mem: &'static GuestMemoryMmap,
    dev: VsockDevice,
    rxq: TestQueue,
    txq: TestQueue,
    evq: TestQueue,
    _dir: tempfile::TempDir,
    uds: PathBuf,
    next_slot: u64,
    rx_bufs: HashMap<u16, (u64, u64)>,
    received: Vec<Pkt>,
    interrupts: usize,
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new() -> Self {
        Self::with(|c| c)
    }

    fn with(cfg: impl FnOnce(VsockConfig) -> VsockConfig) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = VsockDevice::new(cfg(VsockConfig::new(&uds).with_guest_cid(GUEST_CID))).unwrap();
        let mut g = Guest {
            mem,
            dev,
            rxq: TestQueue::new(mem, 0x0),
            txq: TestQueue::new(mem, 0x1_0000),
            evq: TestQueue::new(mem, 0x2_0000),
            _dir: dir,
            uds,
            next_slot: 0,
            rx_bufs: HashMap::new(),
            received: Vec::new(),
            interrupts: 0,
        };
        g.give_rx_buffers(64);
        g
    }

    fn slot(&mut self) -> u64 {
        let n_slots = (MEM_SIZE as u64 - BUF_BASE) / SLOT;
        let addr = BUF_BASE + (self.next_slot % n_slots) * SLOT;
        self.next_slot += 1;
        addr
    }

    fn give_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.slot();
            let w = VRING_DESC_F_WRITE as u16;
            let head = self
                .rxq
                .add_chain(&[(a, PKT_HEADER_SIZE as u32, w), (a + 0x100, RX_DATA_LEN, w)]);
            self.rx_bufs.insert(head, (a, a + 0x100));
        }
    }

    /// Send a raw chain on the tx queue and let the device process it.
    fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        self.txq.add_chain(descs);
        self.kick_tx();
    }

    fn kick_tx(&mut self) {
        if self.dev.process_tx(&mut self.txq.queue, self.mem) {
            self.interrupts += 1;
        }
        self.txq.take_used();
        self.collect_rx();
    }

    /// Send a well-formed packet (header and payload in two descriptors).
    fn send(&mut self, mut h: VsockHeader, data: &[u8]) {
        h.len = data.len() as u32;
        let a = self.slot();
        self.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
        if data.is_empty() {
            self.send_chain(&[(a, PKT_HEADER_SIZE as u32, 0)]);
        } else {
            self.mem.write_slice(data, GuestAddress(a + 0x100)).unwrap();
            self.send_chain(&[(a, PKT_HEADER_SIZE as u32, 0), (a + 0x100, data.len() as u32, 0)]);
        }
    }

    /// Let the device fill receive buffers; remember what it wrote.
    fn collect_rx(&mut self) {
        if self.dev.has_pending_rx() && self.dev.process_rx(&mut self.rxq.queue, self.mem) {
            self.interrupts += 1;
        }
        let used = self.rxq.take_used();
        let n = used.len();
        for (head, len) in used {
            let Some((ha, da)) = self.rx_bufs.remove(&head) else {
                panic!("device used rx head {head} (len {len}) it was never given");
            };
            if (len as usize) < PKT_HEADER_SIZE {
                continue;
            }
            let mut hb = [0u8; PKT_HEADER_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(ha)).unwrap();
            let hdr = VsockHeader::from_bytes(&hb);
            assert_eq!(len as usize, PKT_HEADER_SIZE + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(da)).unwrap();
            self.received.push(Pkt { hdr, data });
        }
        if n > 0 {
            self.give_rx_buffers(n);
        }
    }

    /// Host side events, then receive.
    fn pump(&mut self) {
        self.dev.handle_host_events();
        self.collect_rx();
    }

    fn take(&mut self) -> Vec<Pkt> {
        std::mem::take(&mut self.received)
    }

    /// Pump until a received packet matches `f`; return it (and drop the
    /// ones before it into `skipped`).
    fn wait_for(&mut self, what: &str, f: impl Fn(&Pkt) -> bool) -> Pkt {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.pump();
            if let Some(i) = self.received.iter().position(&f) {
                return self.received.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: got {:?}",
                self.received
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Pump for a while and return everything received.
    fn settle(&mut self) -> Vec<Pkt> {
        for _ in 0..20 {
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take()
    }

    fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Host client connect to guest port `port`, guest accepts. Returns the
    /// client stream and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = self.client();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let req = self.wait_for("REQUEST", |p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == port);
        self.send(hdr(OP_RESPONSE, port, req.hdr.src_port), b"");
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", req.hdr.src_port));
        (c, req.hdr.src_port)
    }

    /// Guest connects to host port `port` (a listener at `<uds>_<port>`).
    fn guest_connect(&mut self, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send(hdr(OP_REQUEST, guest_port, port), b"");
        self.wait_for("RESPONSE", |p| {
            p.hdr.op == OP_RESPONSE && p.hdr.dst_port == guest_port && p.hdr.src_port == port
        });
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }

    /// Receive all RW payload for a connection until `n` bytes arrived.
    fn read_guest_side(&mut self, guest_port: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < n {
            self.pump();
            let pkts = self.take();
            for p in pkts {
                if p.hdr.dst_port == guest_port && p.hdr.op == OP_RW {
                    out.extend_from_slice(&p.data);
                } else {
                    self.received.push(p);
                }
            }
            assert!(Instant::now() < deadline, "only {} of {n} bytes", out.len());
        }
        out
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            Err(e) => panic!("reading line: {e}"),
        }
    }
    String::from_utf8(line).unwrap()
}

/// Whether the peer closed `s` (EOF) within the read timeout.
/// (Closing a socket with unread data makes the peer see a reset instead.)
fn sees_eof(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut g = Guest::new();
    let mut c = g.client();
    // Data right behind the CONNECT line must not be eaten by the handshake.
    c.write_all(b"CONNECT 1234\nearly").unwrap();
    let req = g.wait_for("REQUEST", |p| p.hdr.op == OP_REQUEST);
    assert_eq!(req.hdr.src_cid, VSOCK_HOST_CID);
    assert_eq!(req.hdr.dst_cid, GUEST_CID);
    assert_eq!(req.hdr.dst_port, 1234);
    assert!(req.hdr.src_port >= LOCAL_PORT_BASE);
    assert_eq!(req.hdr.type_, TYPE_STREAM);
    assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
    let host_port = req.hdr.src_port;
    assert!(g.interrupts > 0);

    g.send(hdr(OP_RESPONSE, 1234, host_port), b"");
    assert_eq!(read_line(&mut c), format!("OK {host_port}\n"));
    assert_eq!(g.read_guest_side(1234, 5), b"early");

    c.write_all(b"hello guest").unwrap();
    assert_eq!(g.read_guest_side(1234, 11), b"hello guest");

    g.send(hdr(OP_RW, 1234, host_port), b"hello host");
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    assert_eq!(g.dev.counters().host_connects, 1);
}

#[test]
fn host_connect_refused_by_guest_closes_the_stream() {
    let mut g = Guest::new();
    let mut c = g.client();
    c.write_all(b"CONNECT 99\n").unwrap();
    let req = g.wait_for("REQUEST", |p| p.hdr.op == OP_REQUEST);
    g.send(hdr(OP_RST, 99, req.hdr.src_port), b"");
    g.pump();
    assert!(sees_eof(&mut c));
    assert_eq!(g.dev.counters().host_connects_refused, 1);
    assert_eq!(g.dev.connection_count(), 0);
    // No reset is sent back for a reset.
    assert!(g.settle().is_empty());
}

#[test]
fn host_connect_times_out_when_guest_is_silent() {
    let mut g = Guest::with(|c| c.with_connect_timeout(Duration::from_millis(100)));
    let mut c = g.client();
    c.write_all(b"CONNECT 7\n").unwrap();
    let req = g.wait_for("REQUEST", |p| p.hdr.op == OP_REQUEST);
    // The guest never answers: the device gives up and resets its request.
    let rst = g.wait_for("RST", |p| p.hdr.op == OP_RST);
    assert_eq!(rst.hdr.src_port, req.hdr.src_port);
    assert_eq!(rst.hdr.dst_port, 7);
    assert!(sees_eof(&mut c));
    assert_eq!(g.dev.counters().connect_timeouts, 1);
    // A late response finds nothing and is answered with a reset.
    g.send(hdr(OP_RESPONSE, 7, req.hdr.src_port), b"");
    let late = g.wait_for("RST for late RESPONSE", |p| p.hdr.op == OP_RST);
    assert_eq!(late.hdr.dst_port, 7);
}

#[test]
fn bad_connect_lines_close_the_stream() {
    let mut g = Guest::with(|c| c.with_connect_timeout(Duration::from_millis(200)));
    let mut garbage = g.client();
    garbage.write_all(b"HELLO 1\n").unwrap();
    let mut too_big = g.client();
    too_big.write_all(b"CONNECT 99999999999\n").unwrap();
    let mut long = g.client();
    long.write_all(&[b'C'; 40]).unwrap();
    let mut binary = g.client();
    binary.write_all(b"CONNECT \x00\xff\n").unwrap();
    let mut silent = g.client();
    let start = Instant::now();
    g.pump();
    g.pump();
    for s in [&mut garbage, &mut too_big, &mut long, &mut binary] {
        assert!(sees_eof(s));
    }
    assert_eq!(g.dev.counters().bad_connect_lines, 4);
    // The silent one is closed only by its deadline.
    while start.elapsed() < Duration::from_millis(400) {
        g.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(sees_eof(&mut silent));
    assert_eq!(g.dev.counters().connect_timeouts, 1);
    assert_eq!(g.dev.connection_count(), 0);
    assert!(g.take().iter().all(|p| p.hdr.op != OP_REQUEST));
}

#[test]
fn guest_initiated_connection_succeeds_and_carries_data() {
    let mut g = Guest::new();
    let l = g.listen(5000);
    let mut s = g.guest_connect(&l, 40000, 5000);
    g.send(hdr(OP_RW, 40000, 5000), b"ping");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(g.read_guest_side(40000, 4), b"pong");
    assert_eq!(g.dev.counters().guest_connects, 1);
}

#[test]
fn guest_connect_to_nothing_is_reset() {
    let mut g = Guest::new();
    g.send(hdr(OP_REQUEST, 40001, 5001), b"");
    let rst = g.wait_for("RST", |p| p.hdr.op == OP_RST);
    assert_eq!(rst.hdr.src_cid, VSOCK_HOST_CID);
    assert_eq!(rst.hdr.dst_cid, GUEST_CID);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 40001));
    assert_eq!(g.dev.counters().guest_connects_refused, 1);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_data_beyond_guest_credit_waits_for_credit_update() {
    let mut g = Guest::new();
    let l = g.listen(6000);
    let mut req = hdr(OP_REQUEST, 41000, 6000);
    req.buf_alloc = 100;
    g.send(req, b"");
    g.wait_for("RESPONSE", |p| p.hdr.op == OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();

    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    s.write_all(&payload).unwrap();
    let first = g.read_guest_side(41000, 100);
    assert_eq!(first, &payload[..100]);
    // Out of credit: the device asks for some and sends nothing more.
    let rest = g.settle();
    assert!(rest.iter().all(|p| p.hdr.op != OP_RW), "{rest:?}");
    assert!(rest.iter().any(|p| p.hdr.op == OP_CREDIT_REQUEST));

    // The guest consumed 100 bytes.
    let mut upd = hdr(OP_CREDIT_UPDATE, 41000, 6000);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    g.send(upd, b"");
    assert_eq!(g.read_guest_side(41000, 100), &payload[100..200]);
    assert!(g.settle().iter().all(|p| p.hdr.op != OP_RW));
    upd.fwd_cnt = 200;
    g.send(upd, b"");
    assert_eq!(g.read_guest_side(41000, 100), &payload[200..300]);
}

#[test]
fn payload_scattered_over_several_descriptors_is_reassembled() {
    // Linux sends the pages of a non-linear skb as separate descriptors.
    let mut g = Guest::new();
    let l = g.listen(6010);
    let mut s = g.guest_connect(&l, 41010, 6010);
    let mut h = hdr(OP_RW, 41010, 6010);
    h.len = 10 + 4 + 6;
    let a = g.slot();
    // Header plus the first 10 bytes in the head, then 4 and 6 more.
    g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    g.mem
        .write_slice(b"0123456789", GuestAddress(a + PKT_HEADER_SIZE as u64))
        .unwrap();
    g.mem.write_slice(b"abcd", GuestAddress(a + 0x200)).unwrap();
    g.mem.write_slice(b"efghijXXXX", GuestAddress(a + 0x300)).unwrap();
    g.send_chain(&[
        (a, PKT_HEADER_SIZE as u32 + 10, 0),
        (a + 0x200, 4, 0),
        (a + 0x300, 10, 0),
    ]);
    let mut buf = [0u8; 20];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"0123456789abcdefghij");

    // Header alone, payload in three descriptors.
    h.len = 9;
    g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    g.mem.write_slice(b"xyz", GuestAddress(a + 0x400)).unwrap();
    g.send_chain(&[
        (a, PKT_HEADER_SIZE as u32, 0),
        (a + 0x400, 3, 0),
        (a + 0x400, 3, 0),
        (a + 0x400, 3, 0),
    ]);
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"xyzxyzxyz");
    assert_eq!(g.dev.counters().tx_malformed, 0);

    // Too little payload, a device-writable piece, a piece outside memory.
    let bad: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(a, PKT_HEADER_SIZE as u32, 0), (a + 0x400, 3, 0), (a + 0x400, 3, 0)],
        vec![
            (a, PKT_HEADER_SIZE as u32, 0),
            (a + 0x400, 3, 0),
            (a + 0x400, 6, VRING_DESC_F_WRITE as u16),
        ],
        vec![
            (a, PKT_HEADER_SIZE as u32, 0),
            (a + 0x400, 3, 0),
            (MEM_SIZE as u64, 6, 0),
        ],
    ];
    g.send_chain(&bad[0]);
    assert_eq!(g.dev.counters().tx_malformed, 1);
    assert_eq!(g.dev.counters().tx_bytes, 29);
    // Bytes the host never took could never be credited back: the stream
    // is reset on both sides rather than left stalling.
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 41010);
    assert!(sees_eof(&mut s));
    for c in &bad[1..] {
        g.send_chain(c);
    }
    assert_eq!(g.dev.counters().tx_malformed, 3);
    assert_eq!(g.dev.counters().tx_bytes, 29);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn credit_request_is_answered_with_our_fwd_cnt() {
    let mut g = Guest::new();
    let l = g.listen(6001);
    let mut s = g.guest_connect(&l, 41001, 6001);
    g.send(hdr(OP_RW, 41001, 6001), &[9u8; 1000]);
    let mut buf = vec![0u8; 1000];
    s.read_exact(&mut buf).unwrap();
    g.send(hdr(OP_CREDIT_REQUEST, 41001, 6001), b"");
    let upd = g.wait_for("CREDIT_UPDATE", |p| p.hdr.op == OP_CREDIT_UPDATE);
    assert_eq!(upd.hdr.fwd_cnt, 1000);
    assert_eq!(upd.hdr.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(upd.hdr.dst_port, 41001);
}

#[test]
fn guest_ignoring_credit_is_reset() {
    let mut g = Guest::new();
    let l = g.listen(6002);
    let mut s = g.guest_connect(&l, 41002, 6002);
    // The host side never reads: the socket fills, then our buffer.
    let chunk = vec![0xabu8; MAX_PKT_BUF_SIZE as usize];
    let mut sent = 0usize;
    while g.dev.counters().credit_violations == 0 {
        g.send(hdr(OP_RW, 41002, 6002), &chunk);
        sent += chunk.len();
        assert!(sent < 64 << 20, "never reset");
    }
    let rst = g.wait_for("RST", |p| p.hdr.op == OP_RST);
    assert_eq!(rst.hdr.dst_port, 41002);
    // The host side gets what fit, then EOF.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(total < sent);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn half_close_both_ways_then_reset() {
    let mut g = Guest::new();
    let l = g.listen(6003);
    let mut s = g.guest_connect(&l, 41003, 6003);
    // Guest: no more sending. Host sees EOF, can still send.
    let mut sh = hdr(OP_SHUTDOWN, 41003, 6003);
    sh.flags = SHUTDOWN_SEND;
    g.send(sh, b"");
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    s.write_all(b"last").unwrap();
    assert_eq!(g.read_guest_side(41003, 4), b"last");
    // Host: no more sending either. Nothing can flow: reset.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let rst = g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 41003);
    assert_eq!(rst.hdr.src_port, 6003);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_eof_is_shutdown_send_to_guest() {
    let mut g = Guest::new();
    let (c, host_port) = g.host_connect(80);
    drop(c);
    let sh = g.wait_for("SHUTDOWN", |p| p.hdr.op == OP_SHUTDOWN);
    assert_eq!(sh.hdr.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    assert_eq!((sh.hdr.src_port, sh.hdr.dst_port), (host_port, 80));
    // The guest closes its end: both flags, answered with a reset.
    let mut fin = hdr(OP_SHUTDOWN, 80, host_port);
    fin.flags = SHUTDOWN_BOTH;
    g.send(fin, b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 80);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_full_shutdown_and_reset_close_the_stream() {
    let mut g = Guest::new();
    let l = g.listen(6004);
    let mut a = g.guest_connect(&l, 41004, 6004);
    let mut b = g.guest_connect(&l, 41005, 6004);
    assert_eq!(g.dev.connection_count(), 2);

    let mut fin = hdr(OP_SHUTDOWN, 41004, 6004);
    fin.flags = SHUTDOWN_BOTH;
    g.send(fin, b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 41004);
    assert!(sees_eof(&mut a));

    g.send(hdr(OP_RST, 41005, 6004), b"");
    assert!(sees_eof(&mut b));
    assert_eq!(g.dev.connection_count(), 0);
    // A guest reset is never answered.
    assert!(g.settle().iter().all(|p| p.hdr.dst_port != 41005));
}

#[test]
fn many_connections_at_once() {
    let mut g = Guest::new();
    let l = g.listen(7000);
    let mut hosts = Vec::new();
    for i in 0..16u32 {
        hosts.push(g.host_connect(100 + i));
    }
    let mut guests = Vec::new();
    for i in 0..16u32 {
        guests.push(g.guest_connect(&l, 50000 + i, 7000));
    }
    assert_eq!(g.dev.connection_count(), 32);

    // Everyone writes at once; then every payload must come out on the
    // right connection, in order.
    for (i, (c, _)) in hosts.iter_mut().enumerate() {
        c.write_all(format!("host-{i}-").repeat(50).as_bytes()).unwrap();
    }
    for (i, s) in guests.iter_mut().enumerate() {
        s.write_all(format!("uds-{i}-").repeat(50).as_bytes()).unwrap();
    }
    for i in 0..16u32 {
        g.send(hdr(OP_RW, 100 + i, hosts[i as usize].1), format!("g2h-{i}").as_bytes());
        g.send(hdr(OP_RW, 50000 + i, 7000), format!("g2u-{i}").as_bytes());
    }
    let mut per_port: HashMap<u32, Vec<u8>> = HashMap::new();
    let want: usize = (0..16)
        .map(|i| format!("host-{i}-").len() * 50 + format!("uds-{i}-").len() * 50)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(5);
    while per_port.values().map(Vec::len).sum::<usize>() < want {
        g.pump();
        for p in g.take() {
            if p.hdr.op == OP_RW {
                per_port.entry(p.hdr.dst_port).or_default().extend(p.data);
            }
        }
        assert!(Instant::now() < deadline);
    }
    for i in 0..16u32 {
        assert_eq!(per_port[&(100 + i)], format!("host-{i}-").repeat(50).into_bytes());
        assert_eq!(per_port[&(50000 + i)], format!("uds-{i}-").repeat(50).into_bytes());
        let mut buf = vec![0u8; format!("g2h-{i}").len()];
        hosts[i as usize].0.read_exact(&mut buf).unwrap();
        assert_eq!(buf, format!("g2h-{i}").into_bytes());
        let mut buf = vec![0u8; format!("g2u-{i}").len()];
        guests[i as usize].read_exact(&mut buf).unwrap();
        assert_eq!(buf, format!("g2u-{i}").into_bytes());
    }
}

#[test]
fn connection_limit_is_enforced() {
    let mut g = Guest::with(|c| c.with_max_connections(2));
    let l = g.listen(7001);
    let _a = g.host_connect(1);
    let _b = g.guest_connect(&l, 50100, 7001);
    // A third host client is dropped at once.
    let mut c = g.client();
    g.pump();
    assert!(sees_eof(&mut c));
    // A third guest connection is refused.
    g.send(hdr(OP_REQUEST, 50101, 7001), b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 50101);
    assert_eq!(g.dev.counters().conn_limit_hits, 2);
    assert_eq!(g.dev.connection_count(), 2);
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let mut g = Guest::new();
    let a = g.slot();
    g.mem
        .write_slice(&hdr(OP_REQUEST, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    let out_of_memory = MEM_SIZE as u64 + 0x1000;
    let chains: Vec<Vec<(u64, u32, u16)>> = vec![
        // header descriptor too short
        vec![(a, 20, 0)],
        // header in a device-writable buffer
        vec![(a, PKT_HEADER_SIZE as u32, VRING_DESC_F_WRITE as u16)],
        // header outside guest memory
        vec![(out_of_memory, PKT_HEADER_SIZE as u32, 0)],
        // header straddling the end of guest memory
        vec![(MEM_SIZE as u64 - 8, PKT_HEADER_SIZE as u32, 0)],
        // address that overflows
        vec![(u64::MAX - 10, PKT_HEADER_SIZE as u32, 0)],
    ];
    for c in &chains {
        g.send_chain(c);
    }
    assert_eq!(g.dev.counters().tx_malformed, chains.len() as u64);

    // Payload length beyond the data buffer, beyond the maximum, or with the
    // data outside memory / write-only.
    let mut h = hdr(OP_RW, 1, 2);
    for (len, data_desc) in [
        (1000u32, (a + 0x100, 10u32, 0u16)),
        (MAX_PKT_BUF_SIZE + 1, (a + 0x100, MAX_PKT_BUF_SIZE + 1, 0)),
        (u32::MAX, (a + 0x100, 64, 0)),
        (64, (out_of_memory, 64, 0)),
        (64, (a + 0x100, 64, VRING_DESC_F_WRITE as u16)),
    ] {
        h.len = len;
        g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
        g.send_chain(&[(a, PKT_HEADER_SIZE as u32, 0), data_desc]);
    }
    // Payload announced but no data descriptor at all.
    h.len = 64;
    g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    g.send_chain(&[(a, PKT_HEADER_SIZE as u32, 0)]);
    assert_eq!(g.dev.counters().tx_malformed, chains.len() as u64 + 6);
    // Every chain was returned to the guest, nothing was taken, and each
    // chain with a readable header got an OP_RST (no connection had them).
    assert_eq!(g.txq.free.len(), QSIZE as usize);
    assert_eq!(g.dev.counters().tx_packets, 0);
    let got = g.settle();
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.iter().all(|p| p.hdr.op == OP_RST && p.hdr.dst_port == 1), "{got:?}");
}

#[test]
fn bogus_descriptor_indices_and_loops_do_not_hang_or_panic() {
    let mut g = Guest::new();
    // A head index beyond the queue.
    g.txq.publish(QSIZE + 5);
    g.kick_tx();
    assert!(g.dev.counters().tx_malformed >= 1);
    assert!(g.dev.counters().used_ring_errors >= 1);
    // A descriptor chained to itself.
    let a = g.slot();
    g.mem
        .write_slice(&hdr(OP_RW, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    let idx = g.txq.free.pop().unwrap();
    let d = SplitDescriptor::new(a, PKT_HEADER_SIZE as u32, VRING_DESC_F_NEXT as u16, idx);
    g.txq.store_desc(idx, d);
    g.txq.publish(idx);
    g.kick_tx();
    // Still alive and serving.
    g.send(hdr(OP_REQUEST, 40009, 5009), b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 40009);
}

#[test]
fn bad_addresses_types_and_ops_are_dropped_or_reset() {
    let mut g = Guest::new();
    // src_cid not the guest's: dropped silently.
    let mut h = hdr(OP_REQUEST, 1, 2);
    h.src_cid = 99;
    g.send(h, b"");
    // dst_cid not the host: a request is refused, anything else dropped.
    let mut h = hdr(OP_REQUEST, 3, 4);
    h.dst_cid = 42;
    g.send(h, b"");
    h.op = OP_RW;
    g.send(h, b"xyz");
    // Wrong socket type: reset.
    let mut h = hdr(OP_REQUEST, 5, 6);
    h.type_ = TYPE_SEQPACKET;
    g.send(h, b"");
    // Unknown ops: reset.
    g.send(hdr(0, 7, 8), b"");
    g.send(hdr(99, 9, 10), b"");
    // Packets for no connection: reset (except a reset).
    g.send(hdr(OP_RW, 11, 12), b"data");
    g.send(hdr(OP_CREDIT_UPDATE, 13, 14), b"");
    g.send(hdr(OP_RST, 15, 16), b"");

    let c = g.dev.counters().clone();
    assert_eq!(c.bad_src_cid, 1);
    assert_eq!(c.bad_dst_cid, 2);
    assert_eq!(c.bad_type, 1);
    assert_eq!(c.unknown_op, 2);
    assert_eq!(c.unknown_conn, 2);
    let mut rst_ports: Vec<u32> = g
        .settle()
        .iter()
        .inspect(|p| assert_eq!(p.hdr.op, OP_RST))
        .map(|p| p.hdr.dst_port)
        .collect();
    rst_ports.sort();
    assert_eq!(rst_ports, vec![3, 5, 7, 9, 11, 13]);
    // The refused request to CID 42 is reset from CID 42.
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn unexpected_ops_on_a_connection_reset_it() {
    let mut g = Guest::new();
    let l = g.listen(6005);
    let mut s = g.guest_connect(&l, 41006, 6005);
    // A second REQUEST on an established connection.
    g.send(hdr(OP_REQUEST, 41006, 6005), b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 41006);
    assert!(sees_eof(&mut s));
    assert_eq!(g.dev.counters().protocol_errors, 1);
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem));
    let dev = VsockDevice::new(VsockConfig::new(dir.path().join("v.sock"))).unwrap();
    let mut rxq = TestQueue::new(mem, 0);
    let w = VRING_DESC_F_WRITE as u16;
    let a = BUF_BASE;
    // Read-only, outside memory, too short, no payload room.
    let bad: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(a, PKT_HEADER_SIZE as u32, 0), (a + 0x100, 4096, w)],
        vec![(MEM_SIZE as u64, PKT_HEADER_SIZE as u32, w), (a + 0x100, 4096, w)],
        vec![(a, 8, w), (a + 0x100, 4096, w)],
        vec![(a, PKT_HEADER_SIZE as u32, w)],
        vec![(a, PKT_HEADER_SIZE as u32, w), (a + 0x100, 0, w)],
        vec![(a, PKT_HEADER_SIZE as u32, w), (a + 0x100, 4096, 0)],
        vec![(a, PKT_HEADER_SIZE as u32, w), (MEM_SIZE as u64 - 16, 4096, w)],
        vec![(a, PKT_HEADER_SIZE as u32, w), (a + 0x100, MAX_PKT_BUF_SIZE + 1, w)],
    ];
    for c in &bad {
        rxq.add_chain(c);
    }
    let mut dev = dev;
    // Something to deliver: a reset for a stray packet.
    let mut txq = TestQueue::new(mem, 0x1_0000);
    mem.write_slice(&hdr(OP_RW, 1, 2).to_bytes(), GuestAddress(a + 0x10000))
        .unwrap();
    txq.add_chain(&[(a + 0x10000, PKT_HEADER_SIZE as u32, 0)]);
    dev.process_tx(&mut txq.queue, mem);
    assert!(dev.has_pending_rx());
    dev.process_rx(&mut rxq.queue, mem);
    let used = rxq.take_used();
    assert_eq!(used.len(), bad.len());
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    assert_eq!(dev.counters().rx_malformed, bad.len() as u64);
    // The reset is still owed, and goes out in a good buffer.
    assert!(dev.has_pending_rx());
    rxq.add_chain(&[(a, PKT_HEADER_SIZE as u32, w), (a + 0x100, 4096, w)]);
    dev.process_rx(&mut rxq.queue, mem);
    let used = rxq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, PKT_HEADER_SIZE as u32);
    let mut hb = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut hb, GuestAddress(a)).unwrap();
    assert_eq!(VsockHeader::from_bytes(&hb).op, OP_RST);
}

#[test]
fn random_garbage_never_panics() {
    let mut g = Guest::new();
    let l = g.listen(6006);
    let _s = g.guest_connect(&l, 41007, 6006);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..2000 {
        let a = g.slot();
        let mut h = VsockHeader::from_bytes(&{
            let mut b = [0u8; PKT_HEADER_SIZE];
            for x in b.iter_mut() {
                *x = rnd() as u8;
            }
            b
        });
        // Keep some packets plausible so they reach deeper code.
        if i % 2 == 0 {
            h.src_cid = GUEST_CID;
            h.dst_cid = VSOCK_HOST_CID;
            h.type_ = TYPE_STREAM;
            h.op = (rnd() % 9) as u16;
            h.len = (rnd() % 128) as u32;
            if i % 4 == 0 {
                h.src_port = 41007;
                h.dst_port = 6006;
            }
        }
        g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
        let hlen = if rnd() % 8 == 0 {
            (rnd() % 64) as u32
        } else {
            PKT_HEADER_SIZE as u32
        };
        let dlen = (rnd() % 256) as u32;
        let flags = if rnd() % 16 == 0 { VRING_DESC_F_WRITE as u16 } else { 0 };
        if rnd() % 3 == 0 {
            g.send_chain(&[(a, hlen + dlen, flags)]);
        } else {
            g.send_chain(&[(a, hlen, flags), (a + 0x100, dlen, 0)]);
        }
        g.pump();
    }
    // The device still works.
    g.send(hdr(OP_REQUEST, 40010, 5010), b"");
    g.wait_for("RST", |p| p.hdr.op == OP_RST && p.hdr.dst_port == 40010);
}

#[test]
fn event_idx_publishes_avail_event() {
    let mut g = Guest::new();
    g.txq.queue.set_event_idx(true);
    g.rxq.queue.set_event_idx(true);
    g.send(hdr(OP_RW, 1, 2), b"");
    // The device consumed one chain and asked to be kicked for the next.
    assert_eq!(g.txq.avail_event(), 1);
    g.wait_for("RST", |p| p.hdr.op == OP_RST);
    g.send(hdr(OP_RW, 3, 4), b"");
    assert_eq!(g.txq.avail_event(), 2);
    g.wait_for("RST", |p| p.hdr.op == OP_RST);
}

#[test]
fn transport_reset_event_and_connection_teardown() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(55);
    let a = g.slot();
    g.evq.add_chain(&[(a, EVENT_SIZE as u32, VRING_DESC_F_WRITE as u16)]);
    assert!(!g.dev.process_event_queue(&mut g.evq.queue, g.mem));
    assert!(g.dev.send_transport_reset(&mut g.evq.queue, g.mem));
    let used = g.evq.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, EVENT_SIZE as u32);
    let id: u32 = g.mem.read_obj(GuestAddress(a)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(sees_eof(&mut c));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn socket_files_are_cleaned_up() {
    let g = Guest::new();
    let uds = g.uds.clone();
    assert!(uds.exists());
    drop(g);
    assert!(!uds.exists());
}

#[test]
fn invalid_guest_cids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, 0xffff_ffff, 1 << 32] {
        let cfg = VsockConfig::new(dir.path().join("s")).with_guest_cid(cid);
        assert!(matches!(
            VsockDevice::new(cfg),
            Err(super::Error::InvalidGuestCid(c)) if c == cid
        ));
    }
}
