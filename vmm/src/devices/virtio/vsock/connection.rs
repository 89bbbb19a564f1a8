//! One vsock stream connection between a guest socket and a host Unix stream,
//! with the credit-based flow control of virtio 1.2 §5.10.6.3.
//!
//! Directions and counters (all byte counts are wrapping `u32`, as on the wire):
//! - guest → host ("tx"): payload of guest `VSOCK_OP_RW` packets is queued in
//!   `tx_buf` and written to the Unix stream; `fwd_cnt` counts bytes written to
//!   the host. We advertise `buf_alloc = CONN_BUF_ALLOC`; a guest that sends
//!   more than that much unconsumed data broke the credit rules and the
//!   connection is reset.
//! - host → guest ("rx"): bytes read from the Unix stream are queued in
//!   `rx_buf` and sent as `VSOCK_OP_RW` packets; `rx_cnt` counts bytes sent to
//!   the guest. We never send more than the guest's free space
//!   `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`, and never read more from the
//!   host than that free space minus what is already buffered.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, MAX_PKT_PAYLOAD, VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_RW,
    VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_F_RECEIVE, VSOCK_SHUTDOWN_F_SEND,
};

/// Receive buffer we advertise to the guest per connection (`buf_alloc`), in bytes.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a `VSOCK_OP_CREDIT_UPDATE` once this many bytes were forwarded to the
/// host since the last `fwd_cnt` the guest saw.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Most host bytes buffered per connection while waiting for guest rx buffers.
pub const RX_BUF_MAX: usize = 256 * 1024;

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more payload than the credit we advertised.
    #[error("guest sent {len} bytes with {unacked} not yet credited back, over the {CONN_BUF_ALLOC}-byte credit")]
    CreditExceeded {
        /// Payload length of the offending packet.
        len: usize,
        /// Bytes the guest sent beyond the last `fwd_cnt` we told it.
        unacked: usize,
    },
    /// The guest sent data after announcing it would not send any more.
    #[error("guest sent data after VSOCK_SHUTDOWN_F_SEND")]
    DataAfterShutdown,
    /// Reading from / writing to the host Unix stream failed.
    #[error("host stream I/O: {0}")]
    Io(#[from] io::Error),
}

/// Connection state (§5.10.6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: `VSOCK_OP_REQUEST` sent, waiting for the guest's
    /// `VSOCK_OP_RESPONSE` (or `VSOCK_OP_RST`).
    LocalInit,
    /// Data flows both ways.
    Established,
}

/// What a connection wants to send to the guest next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRx {
    /// `VSOCK_OP_RW`, `VSOCK_OP_CREDIT_UPDATE`, `VSOCK_OP_CREDIT_REQUEST` or `VSOCK_OP_SHUTDOWN`.
    pub op: u16,
    /// Shutdown flags for `VSOCK_OP_SHUTDOWN`, else 0.
    pub flags: u32,
    /// Payload for `VSOCK_OP_RW`.
    pub data: Vec<u8>,
}

/// One stream connection. `local_port` is the host-side vsock port,
/// `peer_port` the guest's.
#[derive(Debug)]
pub struct Connection {
    pub(crate) stream: UnixStream,
    /// Host-side vsock port.
    pub local_port: u32,
    /// Guest-side vsock port.
    pub peer_port: u32,
    state: ConnState,
    /// Bytes to write to the host before any payload (`OK <port>\n`); not
    /// counted in `fwd_cnt`.
    out_prefix: Vec<u8>,
    tx_buf: VecDeque<u8>,
    /// Payload bytes received from the guest (wrapping).
    guest_tx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_buf: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Read EOF on the host stream.
    host_eof: bool,
    /// Host stream hung up (both directions closed); no longer in epoll.
    pub(crate) hup: bool,
    /// `VSOCK_OP_SHUTDOWN` sent to the guest.
    shutdown_sent: bool,
    /// Union of the shutdown flags the guest sent.
    peer_shutdown: u32,
    /// `shutdown(Write)` done on the host stream.
    host_write_shut: bool,
    credit_update_pending: bool,
    /// A `VSOCK_OP_CREDIT_REQUEST` was sent and the guest's credit did not change since.
    credit_requested: bool,
    /// The host stream was readable while the guest had no credit left.
    host_data_waiting: bool,
    /// Events currently registered in the muxer's epoll, `None` if not registered.
    pub(crate) registered: Option<EventSet>,
    /// Created by a host client (`CONNECT <port>`); its local port came from
    /// the muxer's host port allocator.
    pub(crate) host_initiated: bool,
}

impl Connection {
    /// A host-initiated connection waiting for the guest's response.
    pub fn new_local_init(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self::new(stream, local_port, peer_port, ConnState::LocalInit, 0, 0)
    }

    /// A guest-initiated connection, established as soon as it is created;
    /// the guest's credit comes from its `VSOCK_OP_REQUEST`.
    pub fn new_established(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        Self::new(
            stream,
            local_port,
            peer_port,
            ConnState::Established,
            peer_buf_alloc,
            peer_fwd_cnt,
        )
    }

    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            out_prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            guest_tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(peer_fwd_cnt),
            host_eof: false,
            hup: false,
            shutdown_sent: false,
            peer_shutdown: 0,
            host_write_shut: false,
            credit_update_pending: false,
            credit_requested: false,
            host_data_waiting: false,
            registered: None,
            host_initiated: state == ConnState::LocalInit,
        }
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Guest accepted a host-initiated connection: queue `OK <local_port>\n`
    /// for the host client.
    pub fn establish(&mut self) {
        self.state = ConnState::Established;
        self.out_prefix = format!("OK {}\n", self.local_port).into_bytes();
    }

    /// Records the guest's credit from any packet it sent on this connection.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        if self.peer_buf_alloc != hdr.buf_alloc || self.peer_fwd_cnt.0 != hdr.fwd_cnt {
            // New credit information: another request may be sent if it runs out again
            // (not on every packet, which would ping-pong with an unchanged credit).
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Guest's free receive space in bytes: `buf_alloc - (rx_cnt - fwd_cnt)`,
    /// 0 if the guest shrank its buffer below what is in flight.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes sent to the guest so far (wrapping).
    pub fn rx_cnt(&self) -> u32 {
        self.rx_cnt.0
    }

    /// Bytes forwarded from the guest to the host so far (wrapping).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// Guest payload bytes queued towards the host.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Host bytes queued towards the guest.
    pub fn rx_buffered(&self) -> usize {
        self.rx_buf.len()
    }

    /// Union of the shutdown flags the guest sent.
    pub fn peer_shutdown(&self) -> u32 {
        self.peer_shutdown
    }

    /// Whether read EOF was seen on the host stream.
    pub fn host_eof(&self) -> bool {
        self.host_eof
    }

    /// Fills `buf_alloc` / `fwd_cnt` of a packet about to go to the guest and
    /// remembers the `fwd_cnt` the guest now knows.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_pending = false;
    }

    /// Queues guest payload for the host.
    ///
    /// Errors: [`ConnError::CreditExceeded`] when the guest exceeded the credit
    /// we advertised, [`ConnError::DataAfterShutdown`] after its SHUTDOWN(SEND).
    pub fn recv_from_guest(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.peer_shutdown & VSOCK_SHUTDOWN_F_SEND != 0 {
            return Err(ConnError::DataAfterShutdown);
        }
        // The guest may have in flight at most `buf_alloc` bytes beyond the
        // last `fwd_cnt` it was told (§5.10.6.3); that also bounds `tx_buf`.
        let unacked = (self.guest_tx_cnt - self.last_fwd_cnt_sent).0 as usize;
        if unacked + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                unacked,
            });
        }
        self.tx_buf.extend(data);
        self.guest_tx_cnt += Wrapping(data.len() as u32);
        Ok(())
    }

    /// Guest sent `VSOCK_OP_SHUTDOWN` with `flags`.
    pub fn recv_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE);
        if self.peer_shutdown & VSOCK_SHUTDOWN_F_RECEIVE != 0 {
            // The guest will not read any more: drop what is buffered for it.
            self.rx_buf.clear();
        }
    }

    /// Guest asked for our credit.
    pub fn request_credit_update(&mut self) {
        self.credit_update_pending = true;
    }

    /// The guest fully shut the connection and everything it sent reached the
    /// host: the connection can be reset and closed.
    pub fn guest_closed_and_flushed(&self) -> bool {
        self.peer_shutdown == (VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE)
            && self.tx_buf.is_empty()
            && self.out_prefix.is_empty()
    }

    /// Writes as much queued guest data to the host as the stream accepts
    /// without blocking; shuts the host stream's write side once the guest
    /// sent SHUTDOWN(SEND) and everything is flushed.
    ///
    /// Errors: any write error other than `WouldBlock` (e.g. `EPIPE`).
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        if self.state != ConnState::Established {
            return Ok(());
        }
        while !self.out_prefix.is_empty() {
            match self.stream.write(&self.out_prefix) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    self.out_prefix.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_pending = true;
        }
        if self.tx_buf.is_empty()
            && self.peer_shutdown & VSOCK_SHUTDOWN_F_SEND != 0
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            // ENOTCONN when the host already closed: nothing left to tell it.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Room for more host bytes: the guest's free space minus what is already
    /// buffered, capped by [`RX_BUF_MAX`]; 0 while the guest cannot receive.
    pub fn rx_room(&self) -> usize {
        if self.state != ConnState::Established
            || self.host_eof
            || self.peer_shutdown & VSOCK_SHUTDOWN_F_RECEIVE != 0
        {
            return 0;
        }
        let credit = (self.peer_free() as usize).saturating_sub(self.rx_buf.len());
        credit.min(RX_BUF_MAX.saturating_sub(self.rx_buf.len()))
    }

    /// Reads from the host stream while there is room; records EOF.
    ///
    /// Errors: any read error other than `WouldBlock`.
    pub fn fill_from_host(&mut self) -> Result<(), ConnError> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let room = self.rx_room();
            if room == 0 {
                return Ok(());
            }
            let want = room.min(scratch.len());
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    self.host_data_waiting = false;
                    return Ok(());
                }
                Ok(n) => {
                    self.host_data_waiting = false;
                    self.rx_buf.extend(&scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_data_waiting = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The host stream became readable: if the guest has no credit for it,
    /// remember that so a `VSOCK_OP_CREDIT_REQUEST` is sent.
    pub fn host_readable(&mut self) {
        if self.rx_room() == 0 && self.peer_free() == 0 {
            self.host_data_waiting = true;
        }
    }

    /// Host data is held back only because the guest has no credit, and no
    /// credit request is outstanding.
    fn needs_credit_request(&self) -> bool {
        (!self.rx_buf.is_empty() || self.host_data_waiting)
            && self.peer_free() == 0
            && !self.credit_requested
            && self.peer_shutdown & VSOCK_SHUTDOWN_F_RECEIVE == 0
    }

    /// Whether [`Connection::next_rx`] would produce a packet.
    pub fn has_rx(&self) -> bool {
        self.state == ConnState::Established
            && (self.credit_update_pending
                || (!self.rx_buf.is_empty() && self.peer_free() > 0)
                || self.needs_credit_request()
                || (self.host_eof && self.rx_buf.is_empty() && !self.shutdown_sent))
    }

    /// The next packet for the guest on this connection, with at most
    /// `max_payload` payload bytes: data if the guest has credit, else a
    /// credit request, then the SHUTDOWN(SEND) after host EOF once all data
    /// went out, or a pending credit update. Updates `rx_cnt`.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<PendingRx> {
        if self.state != ConnState::Established {
            return None;
        }
        let free = self.peer_free() as usize;
        if !self.rx_buf.is_empty() && free > 0 && max_payload > 0 {
            let n = self
                .rx_buf
                .len()
                .min(free)
                .min(max_payload)
                .min(MAX_PKT_PAYLOAD as usize);
            let data: Vec<u8> = self.rx_buf.drain(..n).collect();
            self.rx_cnt += Wrapping(n as u32);
            return Some(PendingRx {
                op: VSOCK_OP_RW,
                flags: 0,
                data,
            });
        }
        if self.needs_credit_request() {
            self.credit_requested = true;
            self.host_data_waiting = false;
            return Some(PendingRx {
                op: VSOCK_OP_CREDIT_REQUEST,
                flags: 0,
                data: Vec::new(),
            });
        }
        if self.host_eof && self.rx_buf.is_empty() && !self.shutdown_sent {
            self.shutdown_sent = true;
            let mut flags = VSOCK_SHUTDOWN_F_SEND;
            if self.hup {
                // The host side is fully closed: it will not receive either.
                flags |= VSOCK_SHUTDOWN_F_RECEIVE;
            }
            return Some(PendingRx {
                op: VSOCK_OP_SHUTDOWN,
                flags,
                data: Vec::new(),
            });
        }
        if self.credit_update_pending {
            return Some(PendingRx {
                op: VSOCK_OP_CREDIT_UPDATE,
                flags: 0,
                data: Vec::new(),
            });
        }
        None
    }

    /// Events the muxer's epoll should watch on the host stream.
    pub fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        let watch_without_credit = self.state == ConnState::Established
            && !self.host_eof
            && self.peer_free() == 0
            && self.rx_buf.is_empty()
            && !self.credit_requested
            && !self.host_data_waiting
            && self.peer_shutdown & VSOCK_SHUTDOWN_F_RECEIVE == 0;
        if self.rx_room() > 0 || watch_without_credit {
            ev |= EventSet::IN;
        }
        if self.state == ConnState::Established
            && (!self.out_prefix.is_empty() || !self.tx_buf.is_empty())
        {
            ev |= EventSet::OUT;
        }
        ev
    }
}
