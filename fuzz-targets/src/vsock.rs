//! The vsock device as a hostile guest and busy host clients drive it.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use tegmen_vmm::devices::vsock::defs::*;
use tegmen_vmm::devices::vsock::packet::{check_tx_header, parse_tx_chain, peek_tx_header, VsockHeader};
use tegmen_vmm::devices::vsock::{VsockConfig, VsockDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{self, Ring};
use crate::input::Input;

const GUEST_CID: u64 = 3;
/// The host port a listener serves (`<uds>_5000`).
const SERVED_PORT: u32 = 5000;
const MAX_CONNECTIONS: usize = 8;
const MAX_HOST_CLIENTS: usize = 8;

/// Descriptor chains on the transmit queue, walked and parsed the way the
/// device does; every header is checked and round-trips through bytes.
pub fn packet(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest::memory();
    let mut ring = Ring::new(&mem, 0, input.bool());
    let chains = 1 + input.u8() % 4;
    for _ in 0..chains {
        offer_tx_chain(&mut input, &mem, &mut ring);
        guest::mischief(&mut input, &mem, &mut ring);
    }
    while let Some(chain) = ring.queue.pop_descriptor_chain(&mem) {
        let peeked = peek_tx_header(&mem, chain.clone());
        if let Ok(pkt) = parse_tx_chain(&mem, chain) {
            // A parsed packet's header is the one at the head, and its
            // payload is exactly as long as the header says.
            assert_eq!(peeked, Some(pkt.hdr));
            let got: usize = pkt.data.iter().map(|s| s.len()).sum();
            assert_eq!(got, pkt.hdr.len as usize, "payload length vs header");
            assert!(pkt.hdr.len <= MAX_PKT_BUF_SIZE);
            let _ = check_tx_header(&pkt.hdr, GUEST_CID);
        }
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    let b = input.bytes(PKT_HEADER_SIZE);
    raw[..b.len()].copy_from_slice(b);
    assert_eq!(VsockHeader::from_bytes(&raw).to_bytes(), raw);
}

/// A header from a small vocabulary, so connections get set up and torn
/// down, with anything at all now and then.
fn header(input: &mut Input) -> VsockHeader {
    let mut h = VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port: input.pick(&[1024, 1025, 1026, LOCAL_PORT_BASE, LOCAL_PORT_BASE + 1]),
        dst_port: input.pick(&[SERVED_PORT, SERVED_PORT + 1, 1024, LOCAL_PORT_BASE, LOCAL_PORT_BASE + 1]),
        len: 0,
        type_: TYPE_STREAM,
        op: input.pick(&[
            OP_REQUEST,
            OP_RESPONSE,
            OP_RST,
            OP_SHUTDOWN,
            OP_RW,
            OP_CREDIT_UPDATE,
            OP_CREDIT_REQUEST,
        ]),
        flags: u32::from(input.u8() % 4),
        buf_alloc: input.pick(&[CONN_BUF_ALLOC, 0, 4096, u32::MAX]),
        fwd_cnt: input.pick(&[0, 100, u32::MAX]),
    };
    if input.u8() == 0xff {
        h.src_cid = input.u64();
        h.dst_cid = input.u64();
        h.src_port = input.u32();
        h.dst_port = input.u32();
        h.type_ = input.u16();
        h.op = input.u16();
        h.flags = input.u32();
        h.buf_alloc = input.u32();
        h.fwd_cnt = input.u32();
    }
    h
}

/// One transmit chain: a header and payload laid out in one, two or
/// several descriptors, or raw descriptors of the input's choosing.
fn offer_tx_chain(input: &mut Input, mem: &GuestMemoryMmap, ring: &mut Ring) {
    let mut h = header(input);
    let payload = input.chunk();
    h.len = payload.len() as u32;
    if input.u8() == 0xfe {
        h.len = input.u32();
    }
    let at = guest::DATA_BASE + u64::from(input.u8()) * 0x800;
    let _ = mem.write_slice(&h.to_bytes(), GuestAddress(at));
    let data_at = at + PKT_HEADER_SIZE as u64;
    let _ = mem.write_slice(payload, GuestAddress(data_at));
    let hl = PKT_HEADER_SIZE as u32;
    let pl = payload.len() as u32;
    match input.u8() % 5 {
        0 => ring.add_chain(mem, &[(at, hl + pl, false)]),
        1 => ring.add_chain(mem, &[(at, hl, false), (data_at, pl, false)]),
        2 => {
            let cut = pl / 2;
            ring.add_chain(
                mem,
                &[(at, hl + cut, false), (data_at + u64::from(cut), pl - cut, false)],
            )
        }
        3 => {
            let a = pl / 3;
            let b = pl / 3;
            ring.add_chain(
                mem,
                &[
                    (at, hl, false),
                    (data_at, a, false),
                    (data_at + u64::from(a), b, false),
                    (data_at + u64::from(a + b), pl - a - b, input.bool()),
                ],
            )
        }
        _ => {
            let n = 1 + input.u8() % 4;
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|_| (guest::addr(input), guest::len(input), input.u8().is_multiple_of(8)))
                .collect();
            ring.add_chain(mem, &descs)
        }
    };
}

/// Receive buffers: header and data descriptors as Linux offers them, or
/// whatever the input makes of them.
fn offer_rx_chain(input: &mut Input, mem: &GuestMemoryMmap, ring: &mut Ring) {
    let at = guest::DATA_BASE + 0x8_0000 + u64::from(input.u8()) * 0x1000;
    let hl = PKT_HEADER_SIZE as u32;
    match input.u8() % 4 {
        0 | 1 => ring.add_chain(mem, &[(at, hl, true), (at + 0x100, 0xf00, true)]),
        2 => ring.add_chain(mem, &[(at, hl + 0xf00, true)]),
        _ => {
            let n = 1 + input.u8() % 4;
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|_| (guest::addr(input), guest::len(input), !input.u8().is_multiple_of(8)))
                .collect();
            ring.add_chain(mem, &descs)
        }
    };
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// The whole device (muxer, connection state machines, credit, the
/// hybrid-vsock handshake) between a hostile guest's queues and host
/// clients on its Unix sockets. Afterwards the connection limit held and
/// no file descriptor is left behind.
pub fn device(data: &[u8]) {
    let fds_before = open_fds();
    {
        let dir = tempfile::tempdir().expect("scratch dir");
        let uds = dir.path().join("v.sock");
        let config = VsockConfig::new(&uds)
            .with_guest_cid(GUEST_CID)
            .with_max_connections(MAX_CONNECTIONS)
            .with_connect_timeout(Duration::from_millis(20));
        let mut dev = VsockDevice::new(config).expect("vsock device");
        let served = UnixListener::bind(format!("{}_{SERVED_PORT}", uds.display())).expect("listener");
        served.set_nonblocking(true).expect("nonblocking");
        let mut accepted: Vec<UnixStream> = Vec::new();
        let mut clients: Vec<UnixStream> = Vec::new();

        let mut input = Input::new(data);
        let mem = guest::memory();
        let event_idx = input.bool();
        let mut rx = Ring::new(&mem, 0, event_idx);
        let mut tx = Ring::new(&mem, 1, event_idx);
        for _ in 0..4 {
            offer_rx_chain(&mut Input::new(&[0, 0]), &mem, &mut rx);
        }
        let mut steps = 0;
        while !input.is_empty() && steps < 256 {
            steps += 1;
            match input.u8() % 10 {
                0 | 1 => {
                    offer_tx_chain(&mut input, &mem, &mut tx);
                    dev.process_tx(&mut tx.queue, &mem);
                    tx.take_used(&mem);
                }
                2 => offer_rx_chain(&mut input, &mem, &mut rx),
                3 => {
                    dev.process_rx(&mut rx.queue, &mem);
                    rx.take_used(&mem);
                }
                4 if clients.len() < MAX_HOST_CLIENTS => {
                    if let Ok(mut c) = UnixStream::connect(&uds) {
                        let _ = c.set_nonblocking(true);
                        let line = if input.bool() {
                            format!("CONNECT {}\n", input.pick(&[1024u32, 1025, 0, u32::MAX])).into_bytes()
                        } else {
                            input.chunk().to_vec()
                        };
                        let _ = c.write_all(&line);
                        clients.push(c);
                    }
                }
                5 => {
                    let payload = input.chunk();
                    let n = input.u8() as usize;
                    let nc = clients.len().max(1);
                    if let Some(c) = clients.get_mut(n % nc) {
                        let _ = c.write_all(payload);
                    }
                    let n = input.u8() as usize;
                    let na = accepted.len().max(1);
                    if let Some(a) = accepted.get_mut(n % na) {
                        let _ = a.write_all(payload);
                    }
                }
                6 => {
                    let n = input.u8() as usize;
                    if !clients.is_empty() {
                        clients.swap_remove(n % clients.len());
                    } else if !accepted.is_empty() {
                        accepted.swap_remove(n % accepted.len());
                    }
                }
                7 => {
                    dev.handle_host_events();
                    while let Ok((s, _)) = served.accept() {
                        let _ = s.set_nonblocking(true);
                        accepted.push(s);
                    }
                }
                8 => {
                    let ring = if input.bool() { &mut rx } else { &mut tx };
                    guest::mischief(&mut input, &mem, ring);
                }
                9 if input.u8() == 0 => dev.reset(),
                _ => {}
            }
            assert!(
                dev.connection_count() <= MAX_CONNECTIONS,
                "{} connections, limit {MAX_CONNECTIONS}",
                dev.connection_count()
            );
            let _ = dev.read_config(u32::from(input.u8() % 16), u32::from(input.u8() % 16));
        }
        // Whatever the guest did, a reset leaves no connection.
        dev.reset();
        assert_eq!(dev.connection_count(), 0);
    }
    let fds_after = open_fds();
    assert_eq!(fds_before, fds_after, "file descriptors leaked");
}
