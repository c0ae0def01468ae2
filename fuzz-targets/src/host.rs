//! What the host side parses from the guest (agent replies, the hybrid
//! vsock handshake, stream verdicts) and from its users (`config.json`,
//! `config.toml`), and the stream header the agent parses from the host.

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use tegmen_agent_api::stream::{self, StreamHeader, StreamKind};
use tegmen_supervisor::agent_client::{self, AgentClient, MAX_COMMAND, MAX_LISTENING_PORTS, MAX_PROCESS_DETAILS};

use crate::input::Input;

/// The stream header (both sides), forward lines, and the line readers of
/// the handshakes, over any bytes.
pub fn stream_header(data: &[u8]) {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(h) = StreamHeader::parse(line) {
        let encoded = h.encode().expect("a parsed header encodes");
        let again = StreamHeader::parse(encoded.trim_end_matches('\n').as_bytes()).expect("and parses again");
        assert_eq!(h, again);
    }
    if let Some(Ok(port)) = stream::parse_forward(line) {
        assert_ne!(port, 0);
        let again = stream::forward_line(port);
        assert_eq!(stream::parse_forward(again.trim_end().as_bytes()), Some(Ok(port)));
    }
    // Line readers stop right after the first newline, within bounds.
    let mut c = Cursor::new(data);
    if let Ok(l) = stream::read_line(&mut c) {
        assert!(l.len() <= stream::MAX_LINE);
        assert_eq!(c.position() as usize, l.len() + 1);
    }
    let mut c = Cursor::new(data);
    if agent_client::read_handshake_reply(&mut c, 1024).is_ok() {
        let end = data.iter().position(|&b| b == b'\n').expect("a line was read");
        assert!(data.starts_with(b"OK "));
        assert_eq!(c.position() as usize, end + 1, "the handshake read past its line");
    }
    // The host's opening of a stream against a guest answering `data`.
    struct Duplex<'a>(Cursor<&'a [u8]>, Vec<u8>);
    impl Read for Duplex<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Duplex<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut d = Duplex(Cursor::new(data), Vec::new());
    let header = StreamHeader {
        container_id: "c1".into(),
        exec_id: String::new(),
        kind: StreamKind::Stdout,
    };
    if stream::open_stream(&mut d, &header).is_ok() {
        assert!(data.starts_with(b"OK\n"));
        assert_eq!(d.0.position(), 3);
    }
}

/// One frame of ttrpc: 10-byte header (length, stream id, type, flags;
/// big-endian) and the payload.
fn frame(stream_id: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&stream_id.to_be_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(payload);
    f
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A ttrpc `Response`: an optional status (code, message), the payload.
fn response(code: Option<(u32, &[u8])>, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    if let Some((code, msg)) = code {
        let mut status = vec![0x08];
        varint(u64::from(code), &mut status);
        status.push(0x12);
        varint(msg.len() as u64, &mut status);
        status.extend_from_slice(msg);
        r.push(0x0a);
        varint(status.len() as u64, &mut r);
        r.extend_from_slice(&status);
    }
    r.push(0x12);
    varint(payload.len() as u64, &mut r);
    r.extend_from_slice(payload);
    r
}

/// How the fake agent answers one request.
enum Answer {
    Reply(Vec<u8>),
    Raw(Vec<u8>),
    Close,
}

/// The supervisor's agent client against a fake agent whose replies are
/// the input's: well-framed replies with any payload, errors, raw frames,
/// lies about stream ids and lengths. Every reply the client accepts is
/// within the bounds the client promises.
pub fn agent_reply(data: &[u8]) {
    // As in the supervisor's binaries (Rust's runtime does it there): a
    // peer that goes away is an EPIPE, not a signal.
    static SIGPIPE: std::sync::Once = std::sync::Once::new();
    SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let mut input = Input::new(data);
    let dir = tempfile::tempdir().expect("scratch dir");
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).expect("listener");
    let calls = 1 + usize::from(input.u8() % 6);
    let mut methods = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..calls {
        methods.push(input.u8() % 10);
        answers.push(match input.u8() % 8 {
            0..=4 => {
                let n = usize::from(input.u16() % 4096);
                Answer::Reply(response(None, input.bytes(n)))
            }
            5 => {
                let code = u32::from(input.u8() % 17);
                Answer::Reply(response(Some((code, input.chunk())), &[]))
            }
            6 => {
                let n = usize::from(input.u8());
                Answer::Raw(input.bytes(n).to_vec())
            }
            _ => Answer::Close,
        });
    }
    let server = std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        for answer in answers {
            let mut hdr = [0u8; 10];
            if conn.read_exact(&mut hdr).is_err() {
                return;
            }
            let len = u32::from_be_bytes(hdr[0..4].try_into().unwrap()) as usize;
            let stream_id = u32::from_be_bytes(hdr[4..8].try_into().unwrap());
            let mut req = vec![0u8; len.min(1 << 20)];
            if conn.read_exact(&mut req).is_err() {
                return;
            }
            let ok = match answer {
                Answer::Reply(body) => conn.write_all(&frame(stream_id, 2, &body)).is_ok(),
                Answer::Raw(bytes) => {
                    let _ = conn.write_all(&bytes);
                    false
                }
                Answer::Close => false,
            };
            if !ok {
                return;
            }
        }
    });
    let threads = || std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    let before = threads();
    if let Ok(client) = AgentClient::connect_unix(&sock, Duration::from_millis(100)) {
        for m in methods {
            call(&client, m);
        }
    }
    server.join().expect("fake agent");
    // ttrpc's client reads in a thread of its own, which ends once it sees
    // the connection closed. Wait for it: libFuzzer's leak check at the end
    // of the input would otherwise take the buffer it is reading into for
    // a leak.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while threads() >= before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn call(client: &AgentClient, method: u8) {
    match method {
        0 => {
            let _ = client.check();
        }
        1 => {
            let _ = client.version();
        }
        2 => {
            let _ = client.guest_details();
        }
        3 => {
            if let Ok(st) = client.container_state("c1") {
                assert!(st.exec_ids.len() <= MAX_PROCESS_DETAILS);
                assert!(st.exec_ids.iter().all(|e| e.len() <= MAX_COMMAND));
                assert!(st.status.len() <= 32);
            }
        }
        4 => {
            if let Ok(ps) = client.list_process_details("c1") {
                assert!(ps.len() <= MAX_PROCESS_DETAILS);
                for p in ps {
                    assert!(p.command.len() <= MAX_COMMAND && p.state.len() <= 4);
                }
            }
        }
        5 => {
            let _ = client.stats_container("c1");
        }
        6 => {
            if let Ok(ports) = client.listening_ports() {
                assert!(ports.len() <= MAX_LISTENING_PORTS);
                assert!(ports.iter().all(|&p| p != 0));
            }
        }
        7 => {
            if let Ok(Some(e)) = client.watch_event("fuzz", Duration::from_millis(1)) {
                let _ = tegmen_supervisor::inspect::event_line("s1", &e);
            }
        }
        8 => {
            let _ = client.wait_process("c1", "");
        }
        _ => {
            let _ = client.list_processes("c1");
        }
    }
}

/// `config.toml` as the supervisor, the runtime and the shim load it.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = tegmen_supervisor::config::Config::parse(text, Path::new("/etc/tegmen/config.toml")) {
        assert!(config.root.is_absolute());
        assert!((1..=255).contains(&config.guest.vcpus));
        let _ = config.sandboxes_dir();
    }
}

/// A bundle's `config.json` as `tegmen create` and the shim read it, and
/// what they derive from it on the host.
pub fn oci_config(data: &[u8]) {
    use tegmen_supervisor::runtime::bundle;
    let dir = tempfile::tempdir().expect("scratch bundle");
    std::fs::create_dir(dir.path().join("rootfs")).expect("rootfs");
    let path = dir.path().join("config.json");
    let Ok(b) = bundle::Bundle::parse(dir.path().to_path_buf(), data, &path) else {
        return;
    };
    assert!(b.rootfs.is_dir());
    let _ = b.oci_version();
    let _ = b.annotations();
    for bind in b.host_binds() {
        assert!(bind.source.is_absolute());
    }
    let mut guest = b.guest_spec();
    let _ = b.host_hooks();
    let _ = bundle::network_namespace_path(&b.spec);
    bundle::join_guest_network(&mut guest);
    let (mem, cpus) = b.vm_size(&tegmen_supervisor::config::GuestConfig::default());
    assert!(mem > 0 && cpus > 0, "a VM of {mem} MiB and {cpus} vCPUs");
    let _ = tegmen_supervisor::container::mount_destinations(&b.spec);
}
