//! One vsock stream connection between the guest and a host Unix socket.
//!
//! A [`VsockConnection`] is the state machine of one virtio-vsock stream
//! (virtio spec 5.10.6.3–5.10.6.6) bound to one non-blocking [`UnixStream`].
//! It never touches a virtqueue: the muxer hands it each guest packet
//! ([`VsockConnection::send_pkt`]), tells it when its stream is ready
//! ([`VsockConnection::notify`]), and asks it to fill receive buffers
//! ([`VsockConnection::recv_pkt`]). What it still owes the guest is kept as
//! a small set of pending operations, so it never holds more than one packet
//! of host data: bytes are read from the Unix socket straight into the
//! guest's buffer, and only when the guest has credit for them.
//!
//! Flow control follows the spec's credit scheme. Toward the guest, every
//! guest packet updates `peer_buf_alloc`/`peer_fwd_cnt`, and we never send
//! more than `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)` bytes. From the
//! guest, we advertise [`CONN_BUF_ALLOC`](super::defs::CONN_BUF_ALLOC) and
//! buffer whatever the Unix socket cannot take yet up to that bound; a guest
//! that sends beyond it has ignored our credit and is reset.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::defs::{
    CLOSE_FLUSH_TIMEOUT, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, MAX_PKT_BUF_SIZE, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM, VSOCK_HOST_CID,
};
use super::metrics::VsockCounters;
use super::packet::VsockHeader;
use super::sys::{send_nosignal, send_volatile};

/// Identifies a connection: host-side port and guest-side port. The CIDs
/// are implied (host 2, the device's guest CID).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    /// Host-side port (`dst_port` of guest packets).
    pub local_port: u32,
    /// Guest-side port (`src_port` of guest packets).
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked for it: `OP_REQUEST` queued or sent, waiting for
    /// the guest's `OP_RESPONSE`.
    LocalInit,
    /// The guest asked for it and the Unix socket is connected: our
    /// `OP_RESPONSE` is queued.
    PeerInit,
    /// Data flows both ways (possibly half-closed).
    Established,
    /// The guest shut down both directions; buffered guest data is still
    /// being written to the Unix socket before the final `OP_RST`.
    Closing,
    /// Broken: an `OP_RST` is queued, then the connection goes.
    Killed,
    /// Nothing left to say: the muxer forgets it.
    Done,
}

// Operations owed to the guest, in the order `recv_pkt` emits them.
const P_RST: u8 = 1 << 0;
const P_REQUEST: u8 = 1 << 1;
const P_RESPONSE: u8 = 1 << 2;
const P_RW: u8 = 1 << 3;
const P_SHUTDOWN: u8 = 1 << 4;
const P_CREDIT_UPDATE: u8 = 1 << 5;
const P_CREDIT_REQUEST: u8 = 1 << 6;

/// One guest<->Unix-socket stream connection.
#[derive(Debug)]
pub struct VsockConnection {
    key: ConnKey,
    guest_cid: u64,
    stream: Option<UnixStream>,
    state: ConnState,
    deadline: Option<Instant>,
    pending: u8,
    shutdown_flags: u32,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    read_eof: bool,
    stream_hup: bool,

    // Guest -> host.
    buf_alloc: u32,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shut: u32,
    write_shut: bool,

    /// Muxer bookkeeping: whether this connection sits in the muxer's
    /// receive queue.
    pub(super) in_rxq: bool,
}

impl VsockConnection {
    fn new(key: ConnKey, guest_cid: u64, stream: UnixStream, state: ConnState) -> Self {
        VsockConnection {
            key,
            guest_cid,
            stream: Some(stream),
            state,
            deadline: None,
            pending: 0,
            shutdown_flags: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            read_eof: false,
            stream_hup: false,
            buf_alloc: CONN_BUF_ALLOC,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shut: 0,
            write_shut: false,
            in_rxq: false,
        }
    }

    /// A host-initiated connection: queues `OP_REQUEST` to the guest, which
    /// must answer before `deadline`.
    pub fn new_local(key: ConnKey, guest_cid: u64, stream: UnixStream, deadline: Instant) -> Self {
        let mut conn = Self::new(key, guest_cid, stream, ConnState::LocalInit);
        conn.pending = P_REQUEST;
        conn.deadline = Some(deadline);
        conn
    }

    /// A guest-initiated connection whose Unix socket is already connected:
    /// queues `OP_RESPONSE`. `req` is the guest's `OP_REQUEST`.
    pub fn new_peer(key: ConnKey, guest_cid: u64, stream: UnixStream, req: &VsockHeader) -> Self {
        let mut conn = Self::new(key, guest_cid, stream, ConnState::PeerInit);
        conn.peer_buf_alloc = req.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        conn.pending = P_RESPONSE;
        conn
    }

    /// The connection's key.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// When [`on_deadline`](Self::on_deadline) must be called, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The Unix stream's fd, while the stream is open.
    pub fn stream_fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(|s| s.as_raw_fd())
    }

    /// Whether the Unix stream should be closed now (the connection is
    /// going away; the host client should see EOF without waiting for the
    /// guest to take the final reset).
    pub fn stream_unneeded(&self) -> bool {
        self.stream.is_some() && matches!(self.state, ConnState::Killed | ConnState::Done)
    }

    /// Close the Unix stream.
    pub fn close_stream(&mut self) {
        self.stream = None;
    }

    /// Whether the muxer can forget this connection.
    pub fn is_done(&self) -> bool {
        self.state == ConnState::Done
    }

    /// Whether a packet is owed to the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Bytes buffered from the guest, not yet written to the Unix socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes the guest can still take right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent makes
        // `in_flight` wrap to a huge value: that only starves itself.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// What to wait for on the Unix stream; `None` when it must not be in
    /// the epoll set at all (closed, or hung up: a hung-up socket is always
    /// "ready", so it is read when there is credit, without polling).
    pub fn polled_evset(&self) -> Option<EventSet> {
        self.stream.as_ref()?;
        if self.stream_hup {
            return None;
        }
        match self.state {
            // Only hang-ups matter here; they are reported regardless.
            ConnState::LocalInit | ConnState::PeerInit => Some(EventSet::empty()),
            ConnState::Established | ConnState::Closing => {
                let mut ev = EventSet::empty();
                if self.can_read() && self.pending & P_RW == 0 && self.peer_credit() > 0 {
                    ev |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    ev |= EventSet::OUT;
                }
                Some(ev)
            }
            ConnState::Killed | ConnState::Done => None,
        }
    }

    fn can_read(&self) -> bool {
        matches!(self.state, ConnState::Established | ConnState::Closing)
            && self.stream.is_some()
            && !self.read_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
    }

    /// The guest sent a packet for this connection that could not be taken:
    /// tear it down (see [`VsockMuxer::abort`](super::muxer::VsockMuxer::abort)).
    pub fn abort(&mut self, c: &mut VsockCounters) {
        if !matches!(self.state, ConnState::Killed | ConnState::Done) {
            c.protocol_errors += 1;
            self.kill();
        }
    }

    /// Tear the connection down with an `OP_RST` to the guest.
    fn kill(&mut self) {
        self.state = ConnState::Killed;
        self.pending = P_RST;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// Forget the connection without telling the guest anything.
    fn finish(&mut self) {
        self.state = ConnState::Done;
        self.pending = 0;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// A hung-up stream has no readiness to wait for: read whenever the
    /// guest can take data.
    fn refresh_rw(&mut self) {
        if self.stream_hup && self.can_read() && self.peer_credit() > 0 {
            self.pending |= P_RW;
        }
    }

    fn forwarded(&mut self, n: usize) {
        // `n` is at most CONN_BUF_ALLOC, so it fits a u32.
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Once nothing can flow any more, close with a reset: the guest shut
    /// both directions, or it shut sending after the Unix side hit EOF.
    fn check_finished(&mut self) {
        if !matches!(self.state, ConnState::Established | ConnState::Closing) {
            return;
        }
        if !self.tx_buf.is_empty() {
            if self.peer_shut == SHUTDOWN_BOTH && self.state != ConnState::Closing {
                self.state = ConnState::Closing;
                self.pending &= !P_RW;
                self.deadline = Some(Instant::now() + CLOSE_FLUSH_TIMEOUT);
            }
            return;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 && !self.write_shut {
            if let Some(s) = &self.stream {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            self.write_shut = true;
        }
        let guest_done = self.peer_shut == SHUTDOWN_BOTH;
        let both_eof = self.peer_shut & SHUTDOWN_SEND != 0 && self.read_eof;
        if guest_done || both_eof {
            self.kill();
        }
    }

    /// Handle one packet from the guest for this connection. The header has
    /// passed [`check_tx_header`](super::packet::check_tx_header); `data` is
    /// the payload of an `OP_RW`, possibly in several pieces.
    pub fn send_pkt<B: BitmapSlice>(
        &mut self,
        hdr: &VsockHeader,
        data: &[VolatileSlice<'_, B>],
        c: &mut VsockCounters,
    ) {
        // Every header carries the guest's view of its receive buffer.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        if hdr.op == OP_RST {
            if self.state == ConnState::LocalInit {
                c.host_connects_refused += 1;
            }
            self.finish();
            return;
        }

        match self.state {
            ConnState::Killed | ConnState::Done => {}
            ConnState::LocalInit => {
                if hdr.op == OP_RESPONSE && self.pending & P_REQUEST == 0 {
                    self.accept_response(c);
                } else {
                    c.protocol_errors += 1;
                    self.kill();
                }
            }
            // The guest must wait for our OP_RESPONSE before anything else.
            ConnState::PeerInit => {
                c.protocol_errors += 1;
                self.kill();
            }
            ConnState::Established | ConnState::Closing => match hdr.op {
                OP_RW => self.recv_guest_data(data, c),
                OP_CREDIT_UPDATE => {}
                OP_CREDIT_REQUEST => self.pending |= P_CREDIT_UPDATE,
                OP_SHUTDOWN => self.peer_shutdown(hdr.flags),
                _ => {
                    c.protocol_errors += 1;
                    self.kill();
                }
            },
        }
        self.refresh_rw();
    }

    fn accept_response(&mut self, c: &mut VsockCounters) {
        let line = format!("OK {}\n", self.key.local_port);
        let Some(fd) = self.stream_fd() else {
            self.kill();
            return;
        };
        // The stream is fresh and has sent nothing: its socket buffer has
        // room for these few bytes, so anything short of all is an error.
        match send_nosignal(fd, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.state = ConnState::Established;
                self.deadline = None;
                c.host_connects += 1;
            }
            _ => {
                c.stream_errors += 1;
                self.kill();
            }
        }
    }

    fn recv_guest_data<B: BitmapSlice>(&mut self, data: &[VolatileSlice<'_, B>], c: &mut VsockCounters) {
        let len: usize = data.iter().map(|d| d.len()).sum();
        if len == 0 {
            return;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 {
            // The guest said it would send no more.
            c.protocol_errors += 1;
            self.kill();
            return;
        }
        let Some(fd) = self.stream_fd() else {
            self.kill();
            return;
        };
        if self.tx_buf.len().saturating_add(len) > self.buf_alloc as usize {
            c.credit_violations += 1;
            self.kill();
            return;
        }
        c.tx_bytes += len as u64;

        // Straight from guest memory to the socket while it takes it (and
        // nothing older is waiting), then into the buffer.
        let mut direct = self.tx_buf.is_empty();
        let mut written = 0;
        for piece in data {
            let mut done = 0;
            if direct {
                match send_volatile(fd, piece) {
                    Ok(n) => done = n.min(piece.len()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        c.stream_errors += 1;
                        self.kill();
                        return;
                    }
                }
                written += done;
                direct = done == piece.len();
            }
            if done < piece.len() {
                let Ok(rest) = piece.offset(done) else {
                    self.kill();
                    return;
                };
                let mut tmp = vec![0u8; rest.len()];
                let copied = rest.copy_to(&mut tmp[..]);
                tmp.truncate(copied);
                self.tx_buf.extend(tmp);
            }
        }
        self.forwarded(written);
    }

    fn peer_shutdown(&mut self, flags: u32) {
        let flags = flags & SHUTDOWN_BOTH;
        let new = flags & !self.peer_shut;
        self.peer_shut |= flags;
        if new & SHUTDOWN_RCV != 0 {
            self.pending &= !P_RW;
            if let Some(s) = &self.stream {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
        }
        self.check_finished();
    }

    fn flush_tx_buf(&mut self, c: &mut VsockCounters) {
        let Some(fd) = self.stream_fd() else {
            return;
        };
        while !self.tx_buf.is_empty() {
            let (head, _) = self.tx_buf.as_slices();
            match send_nosignal(fd, head) {
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(head.len());
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.stream_errors += 1;
                    self.kill();
                    return;
                }
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > MAX_PKT_BUF_SIZE as usize {
            self.tx_buf = VecDeque::new();
        }
        self.check_finished();
    }

    /// React to readiness of the Unix stream.
    pub fn notify(&mut self, evset: EventSet, c: &mut VsockCounters) {
        if self.stream.is_none() {
            return;
        }
        if evset.contains(EventSet::ERROR) {
            c.stream_errors += 1;
            if self.state == ConnState::LocalInit && self.pending & P_REQUEST != 0 {
                self.finish();
            } else {
                self.kill();
            }
            return;
        }
        if evset.contains(EventSet::HANG_UP) {
            self.stream_hup = true;
        }
        match self.state {
            ConnState::LocalInit => {
                if self.stream_hup {
                    // The host client gave up before the guest answered.
                    if self.pending & P_REQUEST != 0 {
                        self.finish();
                    } else {
                        self.kill();
                    }
                }
            }
            ConnState::Established | ConnState::Closing => {
                if evset.contains(EventSet::OUT) || self.stream_hup {
                    self.flush_tx_buf(c);
                }
                if evset.contains(EventSet::IN) && self.can_read() {
                    self.pending |= P_RW;
                }
                self.refresh_rw();
            }
            ConnState::PeerInit | ConnState::Killed | ConnState::Done => {}
        }
    }

    /// The deadline passed: the guest never answered our request, or never
    /// let us flush its last data.
    pub fn on_deadline(&mut self, now: Instant, c: &mut VsockCounters) {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return,
        }
        match self.state {
            ConnState::LocalInit => {
                c.connect_timeouts += 1;
                if self.pending & P_REQUEST != 0 {
                    self.finish();
                } else {
                    self.kill();
                }
            }
            ConnState::Closing => self.kill(),
            _ => self.deadline = None,
        }
    }

    fn header(&self, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn emit(&mut self, op: u16) -> VsockHeader {
        // Every header tells the guest our fwd_cnt: no separate update owed.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
        self.header(op)
    }

    /// Produce the next packet owed to the guest, reading host data into
    /// `data` (the receive buffer's payload area) for an `OP_RW`. Returns
    /// `None` when nothing is owed after all.
    pub fn recv_pkt<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
        c: &mut VsockCounters,
    ) -> Option<VsockHeader> {
        if self.pending & P_RST != 0 {
            self.finish();
            return Some(self.emit(OP_RST));
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return Some(self.emit(OP_REQUEST));
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            self.state = ConnState::Established;
            c.guest_connects += 1;
            self.refresh_rw();
            return Some(self.emit(OP_RESPONSE));
        }
        if self.pending & P_RW != 0 {
            self.pending &= !P_RW;
            if let Some(hdr) = self.read_host_data(data, c) {
                return Some(hdr);
            }
            if self.pending & P_RST != 0 {
                self.finish();
                return Some(self.emit(OP_RST));
            }
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            let mut hdr = self.emit(OP_SHUTDOWN);
            hdr.flags = self.shutdown_flags;
            return Some(hdr);
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            return Some(self.emit(OP_CREDIT_UPDATE));
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            return Some(self.emit(OP_CREDIT_REQUEST));
        }
        None
    }

    fn read_host_data<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
        c: &mut VsockCounters,
    ) -> Option<VsockHeader> {
        if !self.can_read() {
            return None;
        }
        let credit = self.peer_credit();
        if credit == 0 {
            self.pending |= P_CREDIT_REQUEST;
            return None;
        }
        let max = data.len().min(credit as usize).min(MAX_PKT_BUF_SIZE as usize);
        if max == 0 {
            return None;
        }
        let mut buf = data.subslice(0, max).ok()?;
        let stream = self.stream.as_mut()?;
        match stream.read_volatile(&mut buf) {
            Ok(0) => {
                // EOF from the host client: it will send no more.
                self.read_eof = true;
                self.shutdown_flags |= SHUTDOWN_SEND;
                self.pending |= P_SHUTDOWN;
                self.check_finished();
                None
            }
            Ok(n) => {
                let n = n.min(max);
                // n <= MAX_PKT_BUF_SIZE, fits a u32.
                self.rx_cnt += Wrapping(n as u32);
                c.rx_bytes += n as u64;
                if self.peer_credit() == 0 {
                    self.pending |= P_CREDIT_REQUEST;
                }
                self.refresh_rw();
                let mut hdr = self.emit(OP_RW);
                hdr.len = n as u32;
                Some(hdr)
            }
            Err(VolatileMemoryError::IOError(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) =>
            {
                None
            }
            Err(_) => {
                c.stream_errors += 1;
                self.kill();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const GUEST_CID: u64 = 3;
    const NO_DATA: &[VolatileSlice<'static, ()>] = &[];

    fn key() -> ConnKey {
        ConnKey {
            local_port: 1024,
            peer_port: 5000,
        }
    }

    fn guest_hdr(op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn established() -> (VsockConnection, UnixStream, VsockCounters) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = VsockCounters::default();
        let mut conn = VsockConnection::new_peer(key(), GUEST_CID, ours, &guest_hdr(OP_REQUEST));
        let mut buf = vec![0u8; 4096];
        let hdr = conn.recv_pkt(&VolatileSlice::from(&mut buf[..]), &mut c).unwrap();
        assert_eq!(hdr.op, OP_RESPONSE);
        assert_eq!(conn.state(), ConnState::Established);
        (conn, theirs, c)
    }

    fn send_rw(conn: &mut VsockConnection, c: &mut VsockCounters, bytes: &mut [u8]) {
        let mut h = guest_hdr(OP_RW);
        h.len = bytes.len() as u32;
        let slice = VolatileSlice::from(bytes);
        conn.send_pkt(&h, &[slice], c);
    }

    #[test]
    fn guest_data_is_buffered_until_the_socket_drains() {
        let (mut conn, mut theirs, mut c) = established();
        // Fill the socket until it pushes back, then buffer within credit.
        let mut chunk = vec![7u8; 16 * 1024];
        let mut sent = 0;
        while conn.buffered() == 0 {
            send_rw(&mut conn, &mut c, &mut chunk);
            sent += chunk.len();
            assert!(sent < 8 * 1024 * 1024, "socket never pushed back");
        }
        assert_eq!(conn.polled_evset(), Some(EventSet::IN | EventSet::OUT));
        // Drain on the host side and flush.
        theirs.set_nonblocking(true).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match theirs.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if conn.buffered() == 0 {
                        break;
                    }
                    conn.notify(EventSet::OUT, &mut c);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, sent);
        assert_eq!(c.tx_bytes, sent as u64);
        assert_eq!(conn.polled_evset(), Some(EventSet::IN));
        // fwd_cnt moved by far more than the threshold: an update is owed.
        assert!(conn.has_pending_rx());
        let mut rbuf = vec![0u8; 4096];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, sent as u32);
    }

    #[test]
    fn guest_beyond_credit_is_reset() {
        let (mut conn, _theirs, mut c) = established();
        // Never drained: the socket buffer fills, then our buffer.
        let mut chunk = vec![1u8; MAX_PKT_BUF_SIZE as usize];
        for _ in 0..1000 {
            send_rw(&mut conn, &mut c, &mut chunk);
            if conn.state() == ConnState::Killed {
                break;
            }
            assert!(conn.buffered() <= CONN_BUF_ALLOC as usize);
        }
        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(c.credit_violations, 1);
        let mut rbuf = [0u8; 16];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_RST);
        assert!(conn.is_done());
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let (mut conn, mut theirs, mut c) = established();
        // Guest says: 10 bytes of buffer.
        let mut h = guest_hdr(OP_CREDIT_UPDATE);
        h.buf_alloc = 10;
        conn.send_pkt(&h, NO_DATA, &mut c);
        theirs.write_all(b"0123456789abcdef").unwrap();
        conn.notify(EventSet::IN, &mut c);
        let mut rbuf = vec![0u8; 4096];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_RW);
        assert_eq!(h.len, 10);
        assert_eq!(&rbuf[..10], b"0123456789");
        assert_eq!(conn.peer_credit(), 0);
        // Out of credit: ask for more, and stop polling for input.
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_CREDIT_REQUEST);
        assert_eq!(conn.polled_evset(), Some(EventSet::empty()));
        assert!(conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).is_none());
        // The guest consumed the 10 bytes.
        let mut h = guest_hdr(OP_CREDIT_UPDATE);
        h.buf_alloc = 10;
        h.fwd_cnt = 10;
        conn.send_pkt(&h, NO_DATA, &mut c);
        assert_eq!(conn.polled_evset(), Some(EventSet::IN));
        conn.notify(EventSet::IN, &mut c);
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 6));
        assert_eq!(&rbuf[..6], b"abcdef");
    }

    #[test]
    fn bogus_fwd_cnt_gives_no_credit() {
        let (mut conn, _theirs, mut c) = established();
        let mut h = guest_hdr(OP_CREDIT_UPDATE);
        h.fwd_cnt = 1000; // more than we ever sent
        conn.send_pkt(&h, NO_DATA, &mut c);
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn eof_and_shutdowns_close_with_reset() {
        let (mut conn, theirs, mut c) = established();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        conn.notify(EventSet::IN, &mut c);
        let mut rbuf = [0u8; 64];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert_eq!(conn.state(), ConnState::Established);
        // Guest shuts its sending side too: nothing can flow, reset.
        let mut h = guest_hdr(OP_SHUTDOWN);
        h.flags = SHUTDOWN_SEND;
        conn.send_pkt(&h, NO_DATA, &mut c);
        assert_eq!(conn.state(), ConnState::Killed);
        assert!(conn.stream_unneeded());
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_RST);
    }

    #[test]
    fn guest_shutdown_send_half_closes_the_unix_stream() {
        let (mut conn, mut theirs, mut c) = established();
        let mut h = guest_hdr(OP_SHUTDOWN);
        h.flags = SHUTDOWN_SEND;
        conn.send_pkt(&h, NO_DATA, &mut c);
        assert_eq!(conn.state(), ConnState::Established);
        let mut buf = [0u8; 8];
        assert_eq!(theirs.read(&mut buf).unwrap(), 0, "host sees EOF");
        // The other direction still works.
        theirs.write_all(b"up").unwrap();
        conn.notify(EventSet::IN, &mut c);
        let mut rbuf = [0u8; 64];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 2));
        // Data after SHUTDOWN(SEND) is a protocol error.
        send_rw(&mut conn, &mut c, &mut [1, 2, 3]);
        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(c.protocol_errors, 1);
    }

    #[test]
    fn local_init_waits_for_response_then_sends_ok_line() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = VsockCounters::default();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut conn = VsockConnection::new_local(key(), GUEST_CID, ours, deadline);
        // A response before our request went out is bogus.
        let mut rbuf = [0u8; 64];
        let h = conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        assert_eq!(h.op, OP_REQUEST);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        conn.send_pkt(&guest_hdr(OP_RESPONSE), NO_DATA, &mut c);
        assert_eq!(conn.state(), ConnState::Established);
        let mut line = [0u8; 8];
        theirs.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1024\n");
        // Deadline no longer applies.
        conn.on_deadline(deadline + std::time::Duration::from_secs(1), &mut c);
        assert_eq!(conn.state(), ConnState::Established);
    }

    #[test]
    fn local_init_times_out() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut c = VsockCounters::default();
        let now = Instant::now();
        let mut conn = VsockConnection::new_local(key(), GUEST_CID, ours, now);
        let mut rbuf = [0u8; 64];
        conn.recv_pkt(&VolatileSlice::from(&mut rbuf[..]), &mut c).unwrap();
        conn.on_deadline(now, &mut c);
        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(c.connect_timeouts, 1);
    }
}
