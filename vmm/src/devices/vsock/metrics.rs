//! Event counters of one vsock device.
//!
//! Everything the device refuses — malformed chains, packets with bad
//! addresses, credit violations, garbage from host clients — is dropped or
//! answered with a reset and counted here instead of being logged one line
//! per packet: a hostile guest must not be able to flood the log. The
//! counters are plain integers because one thread owns the device.

/// Counters of one vsock device. All only ever increase.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VsockCounters {
    /// Packets taken from the transmit queue and accepted.
    pub tx_packets: u64,
    /// Guest payload bytes accepted.
    pub tx_bytes: u64,
    /// Packets written to the receive queue.
    pub rx_packets: u64,
    /// Host payload bytes written to the receive queue.
    pub rx_bytes: u64,
    /// Transmit chains the `virtio-vsock` parser refused (too short, wrong
    /// direction, bad length, outside guest memory, payload too large).
    pub tx_malformed: u64,
    /// Receive chains unusable for a packet.
    pub rx_malformed: u64,
    /// Descriptor heads that could not be returned on the used ring.
    pub used_ring_errors: u64,
    /// Guest packets whose `src_cid` was not the guest's CID.
    pub bad_src_cid: u64,
    /// Guest packets not addressed to the host CID.
    pub bad_dst_cid: u64,
    /// Guest packets of a socket type other than stream.
    pub bad_type: u64,
    /// Guest packets with an unknown operation code.
    pub unknown_op: u64,
    /// Guest packets for no known connection (answered with a reset).
    pub unknown_conn: u64,
    /// Guest packets that made no sense in the connection's state.
    pub protocol_errors: u64,
    /// Guest connections reset for sending beyond the credit we granted.
    pub credit_violations: u64,
    /// Connections refused because `MAX_CONNECTIONS` were alive.
    pub conn_limit_hits: u64,
    /// Resets dropped because `MAX_PENDING_RST` were already queued.
    pub rst_dropped: u64,
    /// Host clients whose `CONNECT` line was malformed or too long.
    pub bad_connect_lines: u64,
    /// Host clients that sent no line, or whose guest never answered, in time.
    pub connect_timeouts: u64,
    /// Host-initiated connections the guest refused with a reset.
    pub host_connects_refused: u64,
    /// Host-initiated connections established.
    pub host_connects: u64,
    /// Guest-initiated connections established.
    pub guest_connects: u64,
    /// Guest-initiated connections refused (nothing at `<uds_path>_<port>`).
    pub guest_connects_refused: u64,
    /// Unix socket errors that reset a connection.
    pub stream_errors: u64,
}
