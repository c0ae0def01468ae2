//! The hybrid-vsock muxer: maps guest vsock connections to host Unix sockets.
//!
//! This is the host side of Firecracker's "hybrid vsock", the same protocol
//! Cloud Hypervisor and vhost-device-vsock speak:
//!
//! - A host program connects to the Unix socket `uds_path` and sends
//!   `CONNECT <port>\n`. The muxer picks a free host-side port, sends the
//!   guest an `OP_REQUEST` from CID 2, and when the guest answers
//!   `OP_RESPONSE` writes `OK <host port>\n` back; from then on the Unix
//!   stream is a plain byte stream to the guest's socket. A reset from the
//!   guest, a silent guest, a bad or over-long line, or no line at all in
//!   time closes the Unix stream.
//! - A guest connecting to CID 2, port `P` is connected to the Unix socket
//!   `<uds_path>_<P>`: `OP_RESPONSE` if that works, `OP_RST` if not.
//!
//! All Unix sockets are non-blocking and sit in one epoll set, together
//! with the listener and a timer for the deadlines; the transport (a
//! vhost-user daemon, or a builtin VMM) polls that set's fd and calls
//! [`VsockMuxer::handle_host_events`]. Packets owed to the guest are queued
//! as references to connections (each at most once) plus a bounded number
//! of stand-alone resets, so the receive backlog is bounded by
//! the connection limit + [`MAX_PENDING_RST`].

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, VsockConnection};
use super::defs::{
    CONNECT_PREFIX, LOCAL_PORT_BASE, MAX_ACCEPTS_PER_EVENT, MAX_CONNECT_LINE, MAX_PENDING_RST, OP_REQUEST, OP_RST,
};
use super::metrics::VsockCounters;
use super::packet::VsockHeader;
use super::sys::connect_nonblocking;
use super::Error;

/// Something owed to the guest's receive queue.
#[derive(Debug)]
enum RxItem {
    /// A connection with pending operations.
    Conn(ConnKey),
    /// A reset for a packet that matched no usable connection.
    Rst(VsockHeader),
}

/// A host client that has connected but not yet sent its `CONNECT` line.
#[derive(Debug)]
struct PendingStream {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Parse `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// is tolerated). Anything else is refused.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(CONNECT_PREFIX.as_bytes())?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse::<u32>().ok()
}

/// Maps guest vsock connections to host Unix sockets. See the module docs.
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    remove_path_on_drop: bool,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    deadlines_dirty: bool,
    connect_timeout: Duration,
    max_connections: usize,
    conns: HashMap<ConnKey, VsockConnection>,
    /// Epoll interest currently registered for each connection's stream.
    registered: HashMap<ConnKey, EventSet>,
    /// Stream fd -> connection.
    fd_owners: HashMap<RawFd, ConnKey>,
    pending_streams: HashMap<RawFd, PendingStream>,
    rxq: VecDeque<RxItem>,
    queued_rsts: usize,
    next_local_port: u32,
    counters: VsockCounters,
}

impl VsockMuxer {
    /// A muxer for the guest `guest_cid`, accepting host clients on
    /// `listener` (bound at `uds_path`; it is made non-blocking). Guest
    /// connections to port `P` go to `<uds_path>_<P>`. When
    /// `remove_path_on_drop` is set, dropping the muxer removes `uds_path`.
    /// Host clients get `connect_timeout` to send their line, and the guest
    /// as long to answer; at most `max_connections` live at once.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        remove_path_on_drop: bool,
        connect_timeout: Duration,
        max_connections: usize,
    ) -> Result<Self, Error> {
        listener.set_nonblocking(true).map_err(|source| Error::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(Error::Epoll)?;
        }
        Ok(VsockMuxer {
            guest_cid,
            uds_path,
            remove_path_on_drop,
            listener,
            epoll,
            timer,
            timer_deadline: None,
            deadlines_dirty: false,
            connect_timeout,
            max_connections,
            conns: HashMap::new(),
            registered: HashMap::new(),
            fd_owners: HashMap::new(),
            pending_streams: HashMap::new(),
            rxq: VecDeque::new(),
            queued_rsts: 0,
            next_local_port: LOCAL_PORT_BASE,
            counters: VsockCounters::default(),
        })
    }

    /// The hybrid-vsock listener's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Event counters.
    pub fn counters(&self) -> &VsockCounters {
        &self.counters
    }

    pub(super) fn counters_mut(&mut self) -> &mut VsockCounters {
        &mut self.counters
    }

    /// Connections alive (any state), plus host clients still to send
    /// their `CONNECT` line.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending_streams.len()
    }

    /// Whether a packet is owed to the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Forget every connection (after a transport reset): host clients see
    /// their streams close.
    pub fn reset(&mut self) {
        for (key, conn) in self.conns.drain() {
            if let (Some(fd), Some(_)) = (conn.stream_fd(), self.registered.remove(&key)) {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        for (fd, _) in self.pending_streams.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.registered.clear();
        self.fd_owners.clear();
        self.rxq.clear();
        self.queued_rsts = 0;
        self.deadlines_dirty = true;
        self.sync_timer(false);
    }

    /// Queue an `OP_RST` answering the guest packet `hdr` (never answering
    /// a reset with a reset).
    pub fn push_rst(&mut self, hdr: &VsockHeader) {
        if hdr.op == OP_RST {
            return;
        }
        if self.queued_rsts >= MAX_PENDING_RST {
            self.counters.rst_dropped += 1;
            return;
        }
        self.queued_rsts += 1;
        self.rxq.push_back(RxItem::Rst(VsockHeader::rst_reply_to(hdr)));
    }

    /// A guest packet with a valid header whose payload could not be read:
    /// the connection it belongs to is torn down on both sides (the host
    /// client sees its stream close, the guest an `OP_RST`); for no
    /// connection, the guest just gets the `OP_RST`.
    pub fn abort(&mut self, hdr: &VsockHeader) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.abort(&mut self.counters);
                self.after_conn_activity(key);
            }
            None => self.push_rst(hdr),
        }
    }

    /// Handle one validated guest packet (see
    /// [`check_tx_header`](super::packet::check_tx_header)).
    /// `data` is the payload, possibly in several pieces.
    pub fn send_pkt<B: BitmapSlice>(&mut self, hdr: &VsockHeader, data: &[VolatileSlice<'_, B>]) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(hdr, data, &mut self.counters);
            self.after_conn_activity(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(key, hdr),
            OP_RST => {}
            _ => {
                self.counters.unknown_conn += 1;
                self.push_rst(hdr);
            }
        }
    }

    /// Fill one receive packet: returns its header (with `len` set to the
    /// bytes written to `data`), or `None` if nothing is owed after all.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> Option<VsockHeader> {
        // One pass over the queue: a connection with nothing to say after
        // all goes back to the end and must not be asked twice.
        for _ in 0..self.rxq.len() {
            match self.rxq.pop_front()? {
                RxItem::Rst(hdr) => {
                    self.queued_rsts = self.queued_rsts.saturating_sub(1);
                    return Some(hdr);
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.in_rxq = false;
                    let out = conn.recv_pkt(data, &mut self.counters);
                    self.after_conn_activity(key);
                    if out.is_some() {
                        return out;
                    }
                }
            }
        }
        None
    }

    /// Handle whatever is ready on the host side: new clients, `CONNECT`
    /// lines, connection streams, expired deadlines. Never blocks.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!("vsock: epoll_wait failed: {e}");
                0
            }
        };
        let listener_fd = self.listener.as_raw_fd();
        let timer_fd = self.timer.as_raw_fd();
        let mut timer_fired = false;
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let evset = EventSet::from_bits_truncate(ev.events());
            if fd == listener_fd {
                self.accept_clients();
            } else if fd == timer_fd {
                timer_fired = true;
            } else if self.pending_streams.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.fd_owners.get(&fd) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.notify(evset, &mut self.counters);
                }
                self.after_conn_activity(key);
            }
        }
        let now = Instant::now();
        if timer_fired || self.timer_deadline.is_some_and(|d| d <= now) {
            self.expire(now);
        }
        self.sync_timer(timer_fired);
    }

    /// Re-arm the deadline timer if the set of deadlines changed (call after
    /// a batch of [`send_pkt`](Self::send_pkt)).
    pub fn sync_timer(&mut self, force: bool) {
        if !force && !self.deadlines_dirty {
            return;
        }
        self.deadlines_dirty = false;
        let next = self
            .pending_streams
            .values()
            .map(|p| p.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline()))
            .min();
        if !force && next == self.timer_deadline {
            return;
        }
        self.timer_deadline = next;
        // Re-arming (or disarming) also clears an expiration not yet read.
        let res = match next {
            Some(d) => {
                let dur = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(dur, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            warn!("vsock: cannot arm timer: {e}");
        }
    }

    fn expire(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .pending_streams
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            self.counters.connect_timeouts += 1;
            self.drop_pending_stream(fd);
        }
        let due: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline().is_some_and(|d| d <= now))
            .map(|c| c.key())
            .collect();
        for key in due {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_deadline(now, &mut self.counters);
            }
            self.after_conn_activity(key);
        }
        self.deadlines_dirty = true;
    }

    fn accept_clients(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.connection_count() >= self.max_connections {
                self.counters.conn_limit_hits += 1;
                continue; // dropping the stream closes it
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
            {
                warn!("vsock: cannot poll a host client: {e}");
                continue;
            }
            self.pending_streams.insert(
                fd,
                PendingStream {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: Instant::now() + self.connect_timeout,
                },
            );
            self.deadlines_dirty = true;
        }
    }

    fn drop_pending_stream(&mut self, fd: RawFd) {
        if self.pending_streams.remove(&fd).is_some() {
            // Closing the fd would drop it from the set anyway; be explicit.
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.deadlines_dirty = true;
        }
    }

    /// Read what there is of a host client's `CONNECT` line, one byte at a
    /// time so not a byte of the data that follows it is consumed.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending_streams.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match (&p.stream).read(&mut b) {
                Ok(0) => break None, // the client left
                Ok(_) if b[0] == b'\n' => match parse_connect_line(&p.line) {
                    Some(port) => break Some(port),
                    None => {
                        self.counters.bad_connect_lines += 1;
                        break None;
                    }
                },
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() >= MAX_CONNECT_LINE {
                        self.counters.bad_connect_lines += 1;
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(peer_port) = port else {
            self.drop_pending_stream(fd);
            return;
        };
        let Some(p) = self.pending_streams.remove(&fd) else {
            return;
        };
        self.deadlines_dirty = true;
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        let key = ConnKey { local_port, peer_port };
        debug!("vsock: host client connects to guest port {peer_port} from host port {local_port}");
        let deadline = Instant::now() + self.connect_timeout;
        let conn = VsockConnection::new_local(key, self.guest_cid, p.stream, deadline);
        // The stream is still registered for IN from its pending days.
        self.registered.insert(key, EventSet::IN);
        self.fd_owners.insert(fd, key);
        self.conns.insert(key, conn);
        self.after_conn_activity(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.max_connections {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.connection_count() >= self.max_connections {
            self.counters.conn_limit_hits += 1;
            self.push_rst(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {} refused: {e}", path.display());
                self.counters.guest_connects_refused += 1;
                self.push_rst(hdr);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::empty(), fd as u64))
        {
            warn!("vsock: cannot poll {}: {e}", path.display());
            self.push_rst(hdr);
            return;
        }
        self.registered.insert(key, EventSet::empty());
        self.fd_owners.insert(fd, key);
        self.conns
            .insert(key, VsockConnection::new_peer(key, self.guest_cid, stream, hdr));
        self.after_conn_activity(key);
    }

    /// Bring the muxer's view of one connection up to date after it did
    /// something: epoll interest, receive queue, removal.
    fn after_conn_activity(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.deadline().is_some() {
            self.deadlines_dirty = true;
        }
        if conn.stream_unneeded() {
            if let Some(fd) = conn.stream_fd() {
                if self.registered.remove(&key).is_some() {
                    let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.fd_owners.remove(&fd);
            }
            conn.close_stream();
        }
        if conn.is_done() {
            self.conns.remove(&key);
            self.registered.remove(&key);
            self.deadlines_dirty = true;
            return;
        }

        let want = conn.polled_evset();
        let have = self.registered.get(&key).copied();
        if let Some(fd) = conn.stream_fd() {
            let res = match (have, want) {
                (None, Some(w)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(w, fd as u64)),
                (Some(h), Some(w)) if h != w => {
                    self.epoll
                        .ctl(ControlOperation::Modify, fd, EpollEvent::new(w, fd as u64))
                }
                (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                _ => Ok(()),
            };
            match res {
                Ok(()) => match want {
                    Some(w) => {
                        self.registered.insert(key, w);
                    }
                    None => {
                        self.registered.remove(&key);
                    }
                },
                Err(e) => warn!("vsock: epoll_ctl for a connection stream failed: {e}"),
            }
        }

        if conn.has_pending_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }
}

impl AsRawFd for VsockMuxer {
    /// The epoll fd covering every host-side socket and the timer: readable
    /// when [`VsockMuxer::handle_host_events`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        if self.remove_path_on_drop {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 0"), Some(0));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT 99999999999",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
            b"CONNECT  1",
            b"connect 1",
            b"CONNECT 1x",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
