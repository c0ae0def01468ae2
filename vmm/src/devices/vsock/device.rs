//! The virtio-vsock device core: virtqueues in, muxer out.
//!
//! [`VsockDevice`] is everything of the device that does not depend on how
//! it is attached to a VM. It is written against `vm-memory` and
//! `virtio-queue` alone: a transport hands it a [`Queue`] and the guest
//! memory whenever a queue is kicked, registers [`VsockDevice::as_raw_fd`]
//! in its event loop and calls [`VsockDevice::handle_host_events`] when that
//! fd is readable, and raises the queue's interrupt when a `process_*`
//! method says so. The vhost-user backend in
//! [`crate::vhost_user::vsock`] is one such transport; a builtin VMM's
//! virtio-mmio bus can be another.
//!
//! Here every transmit chain is parsed (by `virtio-vsock`, see
//! [`super::packet`]) and its header checked before the muxer sees it;
//! chains that cannot be used are returned to the guest empty and counted.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::defs::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_GUEST_CID, EVENT_SIZE, EVENT_TRANSPORT_RESET, MAX_CONNECTIONS, MAX_GUEST_CID,
    MAX_PKT_BUF_SIZE, PKT_HEADER_SIZE, VSOCK_HOST_CID,
};
use super::metrics::VsockCounters;
use super::muxer::VsockMuxer;
use super::packet::{check_tx_header, parse_tx_chain, peek_tx_header, TxPacket, TxVerdict};
use super::sys::bind_listener;
use super::Error;

/// How to build a [`VsockDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 ..= 0xffff_fffe).
    pub guest_cid: u64,
    /// Where host clients connect; guest connections to port `P` go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    /// How long a host client has to send `CONNECT <port>\n`, and the guest
    /// to answer the resulting request.
    pub connect_timeout: Duration,
    /// Most connections alive at once (see
    /// [`MAX_CONNECTIONS`](super::defs::MAX_CONNECTIONS)).
    pub max_connections: usize,
}

impl VsockConfig {
    /// Defaults for everything but the path: CID 3, 5 s connect timeout,
    /// 1024 connections.
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: uds_path.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }

    /// Set the guest CID.
    pub fn with_guest_cid(mut self, cid: u64) -> Self {
        self.guest_cid = cid;
        self
    }

    /// Set the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Set the connection limit.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }
}

/// The virtio-vsock device core. See the module docs.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    muxer: VsockMuxer,
}

impl VsockDevice {
    /// Check the configuration and bind the hybrid-vsock listener at
    /// `config.uds_path` (replacing a stale socket file there). The path is
    /// removed again when the device is dropped.
    pub fn new(config: VsockConfig) -> Result<Self, Error> {
        if !(DEFAULT_GUEST_CID..=MAX_GUEST_CID).contains(&config.guest_cid) {
            return Err(Error::InvalidGuestCid(config.guest_cid));
        }
        let listener = bind_listener(&config.uds_path)?;
        let muxer = VsockMuxer::new(
            config.guest_cid,
            config.uds_path,
            listener,
            true,
            config.connect_timeout,
            config.max_connections,
        )?;
        Ok(VsockDevice {
            guest_cid: config.guest_cid,
            muxer,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device configuration space, `struct virtio_vsock_config` (virtio
    /// spec 5.10.4): the guest CID as le64.
    pub fn config_space(&self) -> [u8; 8] {
        self.guest_cid.to_le_bytes()
    }

    /// `len` bytes of configuration space from `offset`; empty if that range
    /// is not inside it.
    pub fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        crate::devices::config_slice(&self.config_space(), offset, len)
    }

    /// Event counters.
    pub fn counters(&self) -> &VsockCounters {
        self.muxer.counters()
    }

    /// Connections alive, in any state.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Whether packets are waiting for receive buffers.
    pub fn has_pending_rx(&self) -> bool {
        self.muxer.has_pending_rx()
    }

    /// Drop every connection, e.g. when the driver resets the device.
    pub fn reset(&mut self) {
        self.muxer.reset();
    }

    /// Handle whatever is ready on the host side (new clients, data from
    /// Unix sockets, timeouts). Call when [`as_raw_fd`](AsRawFd::as_raw_fd)
    /// is readable, then [`process_rx`](Self::process_rx).
    pub fn handle_host_events(&mut self) {
        self.muxer.handle_host_events();
    }

    /// Consume the transmit queue. Returns whether the guest must be
    /// interrupted. Call [`process_rx`](Self::process_rx) afterwards: guest
    /// packets often call for an answer.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut rounds = crate::devices::Rounds::default();
        loop {
            rounds.begin(queue);
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem);
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let spare = chain.clone();
                match parse_tx_chain(mem, chain) {
                    Ok(pkt) => self.handle_tx_packet(&pkt),
                    Err(e) => {
                        log::debug!("vsock: dropping malformed tx chain: {e}");
                        self.muxer.counters_mut().tx_malformed += 1;
                        // Its bytes never reach the host, so they can never
                        // be credited back: the connection it names is reset
                        // instead of stalling on a credit that leaked.
                        if let Some(hdr) = peek_tx_header(mem, spare) {
                            if check_tx_header(&hdr, self.guest_cid) == TxVerdict::Accept {
                                self.muxer.abort(&hdr);
                            }
                        }
                    }
                }
                if queue.add_used(mem, head, 0).is_err() {
                    self.muxer.counters_mut().used_ring_errors += 1;
                }
                used = true;
            }
            if !queue.event_idx_enabled() {
                break;
            }
            // Re-enabling publishes avail_event; go round again if the
            // guest slipped more chains in meanwhile.
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !rounds.again(queue, more) {
                break;
            }
        }
        self.muxer.sync_timer(false);
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn handle_tx_packet(&mut self, pkt: &TxPacket<'_>) {
        let hdr = pkt.hdr;
        let c = self.muxer.counters_mut();
        match check_tx_header(&hdr, self.guest_cid) {
            TxVerdict::Accept => {
                c.tx_packets += 1;
                self.muxer.send_pkt(&hdr, &pkt.data);
            }
            TxVerdict::BadSrcCid => c.bad_src_cid += 1,
            TxVerdict::BadDstCid { reset } => {
                c.bad_dst_cid += 1;
                if reset {
                    self.muxer.push_rst(&hdr);
                }
            }
            TxVerdict::BadType { reset } => {
                c.bad_type += 1;
                if reset {
                    self.muxer.push_rst(&hdr);
                }
            }
            TxVerdict::UnknownOp => {
                c.unknown_op += 1;
                self.muxer.push_rst(&hdr);
            }
        }
    }

    /// Fill receive buffers with what is owed to the guest. Returns whether
    /// the guest must be interrupted.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut rounds = crate::devices::Rounds::default();
        loop {
            rounds.begin(queue);
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem);
            }
            let mut out_of_buffers = false;
            while self.muxer.has_pending_rx() {
                let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE) {
                    Ok(mut pkt) => match self.fill_rx_packet(&mut pkt) {
                        Some(len) => len,
                        None => {
                            // Nothing was owed after all: leave the buffer.
                            queue.go_to_previous_position();
                            break;
                        }
                    },
                    Err(e) => {
                        log::debug!("vsock: dropping malformed rx chain: {e}");
                        self.muxer.counters_mut().rx_malformed += 1;
                        0
                    }
                };
                if queue.add_used(mem, head, len).is_err() {
                    self.muxer.counters_mut().used_ring_errors += 1;
                }
                used = true;
            }
            if !queue.event_idx_enabled() {
                break;
            }
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !(out_of_buffers && self.muxer.has_pending_rx() && rounds.again(queue, more)) {
                break;
            }
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Write the next packet into `pkt`; returns the used length, or `None`
    /// when there was nothing to send.
    fn fill_rx_packet(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        let Some(data) = pkt.data_slice().filter(|d| !d.is_empty()).cloned() else {
            // A receive buffer with no room for payload is of no use to a
            // stream device: hand it back empty rather than spin on it.
            self.muxer.counters_mut().rx_malformed += 1;
            return Some(0);
        };
        let hdr = self.muxer.recv_pkt(&data)?;
        let c = self.muxer.counters_mut();
        if hdr.write_to(pkt).is_err() {
            c.rx_malformed += 1;
            return Some(0);
        }
        c.rx_packets += 1;
        // hdr.len <= MAX_PKT_BUF_SIZE, so this cannot overflow.
        Some(PKT_HEADER_SIZE as u32 + hdr.len)
    }

    /// The event queue: the device only writes to it on a transport reset
    /// (see [`send_transport_reset`](Self::send_transport_reset)), so a
    /// kick needs nothing. Returns whether to interrupt the guest (never).
    pub fn process_event_queue(&mut self, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
        false
    }

    /// Tell the guest every connection is gone
    /// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, e.g. after a snapshot
    /// restore) and drop them on the host side too. Returns whether to
    /// interrupt the guest.
    pub fn send_transport_reset(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.muxer.reset();
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut len = 0;
        if let Some(desc) = chain.next() {
            if desc.is_write_only()
                && desc.len() as usize >= EVENT_SIZE
                && mem
                    .write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), desc.addr())
                    .is_ok()
            {
                len = EVENT_SIZE as u32;
            }
        }
        if queue.add_used(mem, head, len).is_err() {
            self.muxer.counters_mut().used_ring_errors += 1;
        }
        queue.needs_notification(mem).unwrap_or(true)
    }

    /// The host CID, for completeness (always 2).
    pub const fn host_cid() -> u64 {
        VSOCK_HOST_CID
    }
}

impl AsRawFd for VsockDevice {
    /// An epoll fd, readable when [`VsockDevice::handle_host_events`] has
    /// work. Register it (level-triggered, `EPOLLIN`) in the transport's
    /// event loop.
    fn as_raw_fd(&self) -> RawFd {
        self.muxer.as_raw_fd()
    }
}
