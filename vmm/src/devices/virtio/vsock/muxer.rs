//! The vsock multiplexer: routes guest packets to host Unix streams and host
//! bytes to guest packets (virtio 1.2 §5.10.6.4 connection protocol), using
//! Firecracker's hybrid Unix-socket convention on the host side:
//!
//! - host → guest: a client of the listener at `uds_path` writes
//!   `CONNECT <port>\n`; the muxer allocates a host port (from
//!   [`HOST_PORT_BASE`] upward), sends `VSOCK_OP_REQUEST` to the guest and, on
//!   `VSOCK_OP_RESPONSE`, writes `OK <host_port>\n` to the client. A guest
//!   `VSOCK_OP_RST` closes the client.
//! - guest → host port `P`: `VSOCK_OP_REQUEST` is forwarded by connecting to
//!   `<uds_path>_<P>`; if that fails the guest gets `VSOCK_OP_RST`.
//!
//! All host sockets are non-blocking and registered in the muxer's own epoll
//! instance ([`Muxer::epoll_fd`]); the worker thread nests it in its epoll and
//! calls [`Muxer::process_host_events`] when it is readable. Packets for the
//! guest are pulled with [`Muxer::next_rx`]; guest packets are pushed with
//! [`Muxer::send_pkt`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection, CONN_BUF_ALLOC};
use super::packet::{
    validate_tx_header, Header, PacketError, TxPacket, VSOCK_HOST_CID, VSOCK_OP_CREDIT_REQUEST,
    VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE, VSOCK_OP_RST, VSOCK_OP_RW,
    VSOCK_OP_SHUTDOWN, VSOCK_TYPE_STREAM,
};

/// Most connections; beyond it guest requests get `VSOCK_OP_RST` and host
/// clients are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have connected but not yet sent their `CONNECT`
/// line. They do not count against [`MAX_CONNECTIONS`]; when a new client
/// comes and this many are waiting, the oldest is closed, so clients that
/// never speak cannot lock the shim out of the agent.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// How long a host client may take to send its `CONNECT` line; older ones
/// are closed when the next client arrives.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// First host vsock port handed to host-initiated connections.
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// Control packets (RST, RESPONSE, REQUEST) queued for the guest beyond which
/// the device stops taking tx packets until the guest supplies rx buffers.
pub const MAX_CTRL_BACKLOG: usize = 4096;
/// Longest accepted `CONNECT <port>\n` line, newline included.
const CONNECT_LINE_MAX: usize = 32;

/// Errors creating the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// `uds_path` exists and is not a Unix socket; it is left alone.
    #[error("{0} exists and is not a Unix socket")]
    NotASocket(PathBuf),
    /// Removing a stale socket file failed.
    #[error("removing stale socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Binding or configuring the listener failed.
    #[error("listening on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating or updating the epoll instance failed.
    #[error("epoll: {0}")]
    Epoll(io::Error),
}

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side vsock port.
    pub local_port: u32,
    /// Guest-side vsock port.
    pub peer_port: u32,
}

#[derive(Debug)]
struct CtrlPkt {
    key: ConnKey,
    op: u16,
    flags: u32,
}

#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    since: std::time::Instant,
}

/// Removes the listener's socket file when dropped.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The connection table and host-side sockets of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    fd_to_key: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingClient>,
    ctrl: VecDeque<CtrlPkt>,
    rx_ready: VecDeque<ConnKey>,
    rx_ready_set: HashSet<ConnKey>,
    host_ports: HashSet<u32>,
    next_host_port: u32,
    max_conns: usize,
    // Declared last: the socket file goes after the listener is closed.
    _socket_file: SocketFile,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is removed first) for
    /// host clients of the guest with CID `guest_cid`.
    ///
    /// Errors: [`MuxerError::NotASocket`] if `uds_path` is another kind of
    /// file, [`MuxerError::RemoveStale`] / [`MuxerError::Listen`] /
    /// [`MuxerError::Epoll`] on OS errors.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        Self::with_limit(guest_cid, uds_path, MAX_CONNECTIONS)
    }

    /// Like [`Muxer::new`] with a connection limit of `max_conns`.
    pub fn with_limit(
        guest_cid: u64,
        uds_path: &Path,
        max_conns: usize,
    ) -> Result<Self, MuxerError> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(MuxerError::NotASocket(uds_path.to_path_buf()));
            }
            std::fs::remove_file(uds_path).map_err(|source| MuxerError::RemoveStale {
                path: uds_path.to_path_buf(),
                source,
            })?;
        }
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        let socket_file = SocketFile(uds_path.to_path_buf());
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            fd_to_key: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_ready_set: HashSet::new(),
            host_ports: HashSet::new(),
            next_host_port: HOST_PORT_BASE,
            max_conns,
            _socket_file: socket_file,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The muxer's epoll fd: readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (host clients still sending `CONNECT` not included).
    pub fn num_connections(&self) -> usize {
        self.conns.len()
    }

    /// The connection `(local_port, peer_port)`, if live.
    pub fn connection(&self, local_port: u32, peer_port: u32) -> Option<&Connection> {
        self.conns.get(&ConnKey {
            local_port,
            peer_port,
        })
    }

    /// Keys of all live connections.
    pub fn connection_keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }

    /// Whether so many control packets wait for rx buffers that tx processing
    /// should pause (a guest flooding bad packets without reading).
    pub fn ctrl_backlog_full(&self) -> bool {
        self.ctrl.len() >= MAX_CTRL_BACKLOG
    }

    /// Drops every connection and host client (device reset, §5.10.6.6); the
    /// listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.pending.keys().copied().collect();
        for fd in fds {
            self.drop_pending(fd);
        }
        self.ctrl.clear();
        self.rx_ready.clear();
        self.rx_ready_set.clear();
        self.host_ports.clear();
    }

    /// Handles a tx chain that could not be parsed: when its header was
    /// readable and addressed a live connection, the connection is reset.
    pub fn reject(&mut self, err: &PacketError) {
        let Some(hdr) = err.header() else { return };
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID || hdr.op == VSOCK_OP_RST
        {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.kill(key);
        } else {
            self.push_ctrl(key, VSOCK_OP_RST, 0);
        }
    }

    /// Processes one packet the guest sent on the tx queue.
    ///
    /// Packets with a wrong `src_cid` or `dst_cid` are dropped; other invalid
    /// packets (type, op, payload on a control op) and packets for unknown
    /// connections are answered with `VSOCK_OP_RST` (never an RST to an RST).
    pub fn send_pkt(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        if let Err(e) = validate_tx_header(&hdr, self.guest_cid) {
            log::debug!("vsock: dropping tx packet: {e}");
            if matches!(e, PacketError::SrcCid { .. } | PacketError::DstCid(_)) {
                return;
            }
            let key = ConnKey {
                local_port: hdr.dst_port,
                peer_port: hdr.src_port,
            };
            if hdr.op != VSOCK_OP_RST {
                if self.conns.contains_key(&key) {
                    self.kill(key);
                } else {
                    self.push_ctrl(key, VSOCK_OP_RST, 0);
                }
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == VSOCK_OP_REQUEST {
            self.guest_connect(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != VSOCK_OP_RST {
                self.push_ctrl(key, VSOCK_OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        match hdr.op {
            VSOCK_OP_RESPONSE => {
                if conn.state() != ConnState::LocalInit {
                    log::debug!("vsock: unexpected RESPONSE on {key:?}");
                    self.kill(key);
                    return;
                }
                conn.establish();
            }
            VSOCK_OP_RST => {
                self.remove(key);
                return;
            }
            VSOCK_OP_SHUTDOWN => conn.recv_shutdown(hdr.flags),
            VSOCK_OP_RW => {
                if conn.state() != ConnState::Established {
                    self.kill(key);
                    return;
                }
                if let Err(e) = conn.recv_from_guest(&pkt.data) {
                    log::debug!("vsock: resetting {key:?}: {e}");
                    self.kill(key);
                    return;
                }
            }
            VSOCK_OP_CREDIT_UPDATE => {}
            VSOCK_OP_CREDIT_REQUEST => conn.request_credit_update(),
            _ => unreachable!("validate_tx_header accepts only ops 1..=7"),
        }
        self.service(key);
    }

    /// Whether [`Muxer::next_rx`] has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .rx_ready
                .iter()
                .any(|k| self.conns.get(k).is_some_and(|c| c.has_rx()))
    }

    /// The next packet for the guest's rx queue, with at most `max_payload`
    /// payload bytes: control packets first, then connections round-robin.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(c) = self.ctrl.pop_front() {
            let mut hdr = self.header(c.key, c.op, c.flags);
            if let Some(conn) = self.conns.get_mut(&c.key) {
                conn.stamp(&mut hdr);
            }
            return Some((hdr, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            self.rx_ready_set.remove(&key);
            let hdr_base = self.header(key, 0, 0);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(p) = conn.next_rx(max_payload) else {
                continue;
            };
            let mut hdr = hdr_base;
            hdr.op = p.op;
            hdr.flags = p.flags;
            hdr.len = p.data.len() as u32;
            conn.stamp(&mut hdr);
            // Sending freed guest credit / rx buffer room: read more, requeue.
            self.service(key);
            return Some((hdr, p.data));
        }
        None
    }

    /// Handles whatever is ready on the host sockets (non-blocking).
    ///
    /// Errors: only if `epoll_wait` itself fails.
    pub fn process_host_events(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 64];
        let n = loop {
            match self.epoll.wait(0, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept_clients();
            } else if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.fd_to_key.get(&fd) {
                self.conn_event(key, set);
            }
        }
        Ok(())
    }

    fn header(&self, key: ConnKey, op: u16, flags: u32) -> Header {
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn push_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.ctrl.push_back(CtrlPkt { key, op, flags });
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.contains_key(&key) {
            log::debug!("vsock: guest REQUEST for existing connection {key:?}");
            self.kill(key);
            return;
        }
        if self.conns.len() + self.pending.len() >= self.max_conns {
            log::warn!(
                "vsock: connection limit {} reached, refusing {key:?}",
                self.max_conns
            );
            self.push_ctrl(key, VSOCK_OP_RST, 0);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.local_port));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.push_ctrl(key, VSOCK_OP_RST, 0);
                return;
            }
        };
        let conn = Connection::new_established(
            stream,
            key.local_port,
            key.peer_port,
            hdr.buf_alloc,
            hdr.fwd_cnt,
        );
        self.fd_to_key.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_ctrl(key, VSOCK_OP_RESPONSE, 0);
        self.service(key);
    }

    /// Flushes, reads, closes or resets connection `key` as its state requires,
    /// then refreshes its epoll registration and rx readiness.
    fn service(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let io = conn.flush_to_host().and_then(|_| conn.fill_from_host());
        if let Err(e) = io {
            log::debug!("vsock: resetting {key:?}: {e}");
            self.kill(key);
            return;
        }
        if conn.guest_closed_and_flushed() {
            self.kill(key);
            return;
        }
        let has_rx = conn.has_rx();
        if let Err(e) = self.update_epoll(key) {
            log::error!("vsock: epoll update for {key:?}: {e}");
            self.kill(key);
            return;
        }
        if has_rx && self.rx_ready_set.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    fn update_epoll(&mut self, key: ConnKey) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        let fd = conn.stream.as_raw_fd();
        if conn.hup {
            if conn.registered.take().is_some() {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
            }
            return Ok(());
        }
        let want = conn.wanted_events();
        match conn.registered {
            Some(cur) if cur == want => Ok(()),
            Some(_) => {
                self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(want, fd as u64),
                )?;
                conn.registered = Some(want);
                Ok(())
            }
            None => {
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(want, fd as u64))?;
                conn.registered = Some(want);
                Ok(())
            }
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        if set.contains(EventSet::ERROR) {
            self.kill(key);
            return;
        }
        if set.contains(EventSet::IN) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.host_readable();
            }
        }
        if set.contains(EventSet::HANG_UP) {
            if let Some(conn) = self.conns.get_mut(&key) {
                // Level-triggered HUP cannot be masked: stop watching, the
                // remaining bytes are read eagerly as credit allows.
                conn.hup = true;
            }
        }
        self.service(key);
    }

    /// Resets connection `key`: RST to the guest, host stream closed.
    fn kill(&mut self, key: ConnKey) {
        if self.remove(key) {
            self.push_ctrl(key, VSOCK_OP_RST, 0);
        }
    }

    /// Removes connection `key` and closes its host stream. Returns whether it existed.
    fn remove(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.remove(&key) else {
            return false;
        };
        let fd = conn.stream.as_raw_fd();
        if conn.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.fd_to_key.remove(&fd);
        if conn.host_initiated {
            self.host_ports.remove(&conn.local_port);
        }
        if self.rx_ready_set.remove(&key) {
            self.rx_ready.retain(|k| *k != key);
        }
        true
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.conns.len() >= self.max_conns {
                log::warn!(
                    "vsock: connection limit {} reached, closing host client",
                    self.max_conns
                );
                continue;
            }
            self.make_room_for_pending();
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock: host client: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                log::warn!("vsock: epoll add host client: {e}");
                continue;
            }
            self.pending.insert(
                fd,
                PendingClient {
                    stream,
                    line: Vec::new(),
                    since: std::time::Instant::now(),
                },
            );
        }
    }

    /// Before a new host client is admitted: closes clients that have waited
    /// longer than [`CONNECT_TIMEOUT`] without a `CONNECT` line, then the
    /// oldest ones while [`MAX_PENDING_CLIENTS`] are waiting.
    fn make_room_for_pending(&mut self) {
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() > CONNECT_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            log::debug!("vsock: host client sent no CONNECT within {CONNECT_TIMEOUT:?}: closed");
            self.drop_pending(fd);
        }
        while self.pending.len() >= MAX_PENDING_CLIENTS {
            let Some(oldest) = self.pending.iter().min_by_key(|(_, p)| p.since).map(|(fd, _)| *fd) else {
                break;
            };
            // Its CONNECT line may be waiting unread (clients accepted in one
            // burst are read only after the burst): serve it rather than evict it.
            self.read_connect_line(oldest);
            if self.pending.contains_key(&oldest) {
                log::warn!("vsock: {MAX_PENDING_CLIENTS} host clients wait for CONNECT: closing the oldest");
                self.drop_pending(oldest);
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd) -> Option<PendingClient> {
        let p = self.pending.remove(&fd)?;
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        Some(p)
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no payload after it
    /// is consumed), then starts the connection to the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let complete = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break false,
                Ok(_) => {
                    if byte[0] == b'\n' {
                        break true;
                    }
                    p.line.push(byte[0]);
                    if p.line.len() >= CONNECT_LINE_MAX {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break false,
            }
        };
        let Some(p) = self.drop_pending(fd) else {
            return;
        };
        if !complete {
            log::debug!("vsock: host client closed or sent an overlong line before CONNECT");
            return;
        }
        let Some(peer_port) = parse_connect_line(&p.line) else {
            log::debug!(
                "vsock: bad host request {:?}",
                String::from_utf8_lossy(&p.line)
            );
            return;
        };
        if self.conns.len() >= self.max_conns {
            log::warn!(
                "vsock: connection limit {} reached, closing host client",
                self.max_conns
            );
            return;
        }
        let Some(local_port) = self.alloc_host_port() else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = Connection::new_local_init(p.stream, local_port, peer_port);
        self.host_ports.insert(local_port);
        self.fd_to_key.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_ctrl(key, VSOCK_OP_REQUEST, 0);
        self.service(key);
    }

    /// A host port from [`HOST_PORT_BASE`] upward not used by a live
    /// host-initiated connection.
    fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=self.max_conns {
            let p = self.next_host_port;
            self.next_host_port = if p == u32::MAX { HOST_PORT_BASE } else { p + 1 };
            if !self.host_ports.contains(&p) && !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }
}

/// Parses `CONNECT <port>` (newline already stripped; a trailing `\r` is allowed).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects a non-blocking Unix stream socket to `path`; fails instead of
/// blocking when the listener's backlog is full.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
