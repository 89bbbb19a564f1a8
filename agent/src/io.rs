//! Stdio stream listener (docs/contracts.md, "Agent API").
//!
//! Each stdio stream of a container process is its own connection to the
//! agent's I/O port (vsock port `vmrt.io_port`, default 1025; a Unix socket
//! when the agent runs on a host for tests). The first line of a connection
//! is a [`StreamHeader`]; the connection is then registered in the
//! [`StreamRegistry`] under (container id, exec id, stream), from which the
//! ttrpc server [`StreamRegistry::take`]s it when `CreateContainer` or
//! `ExecProcess` asks for that stream. A connection with a malformed header,
//! or none within [`HEADER_TIMEOUT`], is closed.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use vmrt_protocol::{StdioStream, StreamHeader, StreamHeaderError, MAX_HEADER_LINE};

/// Time a new connection has to send its complete header line.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a registered connection waits to be taken before it is closed.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// Most connections held in the registry at once (registered, not taken).
pub const MAX_PENDING: usize = 1024;

/// Errors of the stream listener and registry.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The listen address is neither `vsock://<cid>:<port>` nor
    /// `unix://<path>`.
    #[error("bad listen address {0:?}: expected vsock://<cid>:<port> or unix://<path>")]
    BadAddress(String),
    /// Binding the listener failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer closed or failed before a complete header line.
    #[error("reading stream header: {0}")]
    Read(std::io::Error),
    /// No complete header line within [`HEADER_TIMEOUT`].
    #[error("no stream header within {HEADER_TIMEOUT:?}")]
    HeaderTimeout,
    /// The header line is malformed.
    #[error("bad stream header: {0}")]
    Header(#[from] StreamHeaderError),
    /// A connection for this stream is already registered.
    #[error("duplicate {0} stream")]
    Duplicate(String),
    /// The registry holds [`MAX_PENDING`] connections already.
    #[error("too many unclaimed stdio streams ({MAX_PENDING})")]
    Full,
    /// The wanted stream did not connect in time.
    #[error("{0} stream not connected within {1:?}")]
    TakeTimeout(String, Duration),
    /// Turning the connection into a blocking fd failed.
    #[error("preparing stream fd: {0}")]
    Fd(std::io::Error),
}

/// Registry key: (container id, exec id — `""` for init —, stream).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// Container id.
    pub container_id: String,
    /// Exec id, `""` for the container's init process.
    pub exec_id: String,
    /// Which stream.
    pub stream: StdioStream,
}

impl StreamKey {
    /// Builds a key.
    pub fn new(container_id: &str, exec_id: &str, stream: StdioStream) -> Self {
        StreamKey {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stream,
        }
    }
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        write!(f, "{} {} {}", self.container_id, exec, self.stream)
    }
}

impl From<StreamHeader> for StreamKey {
    fn from(h: StreamHeader) -> Self {
        StreamKey {
            container_id: h.container_id,
            exec_id: h.exec_id,
            stream: h.stream,
        }
    }
}

enum Slot {
    /// A connection arrived and waits to be taken.
    Ready(OwnedFd, Instant),
    /// The server waits for this connection.
    Waiting(oneshot::Sender<OwnedFd>),
}

/// Connections that sent their header, keyed by [`StreamKey`]; each is
/// handed out once. Thread safe; share it in an `Arc`.
#[derive(Default)]
pub struct StreamRegistry {
    slots: Mutex<HashMap<StreamKey, Slot>>,
}

impl StreamRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a connection (a blocking-mode stream socket fd). Hands it over
    /// directly if [`Self::take`] is waiting for it.
    ///
    /// # Errors
    /// [`IoError::Duplicate`] if a connection for `key` is already
    /// registered, [`IoError::Full`] at [`MAX_PENDING`]; the fd is then
    /// dropped (closed).
    pub fn register(&self, key: StreamKey, fd: OwnedFd) -> Result<(), IoError> {
        let mut slots = self.lock();
        let now = Instant::now();
        slots.retain(|k, slot| match slot {
            Slot::Ready(_, at) if now.duration_since(*at) > UNCLAIMED_TTL => {
                log::warn!("stdio stream {k} never claimed; closing it");
                false
            }
            Slot::Waiting(tx) => !tx.is_closed(),
            _ => true,
        });
        let fd = match slots.remove(&key) {
            Some(Slot::Waiting(tx)) => match tx.send(fd) {
                Ok(()) => return Ok(()),
                // The waiter gave up meanwhile: keep the connection.
                Err(fd) => fd,
            },
            Some(ready @ Slot::Ready(..)) => {
                slots.insert(key.clone(), ready);
                return Err(IoError::Duplicate(key.to_string()));
            }
            None => fd,
        };
        if slots.len() >= MAX_PENDING {
            return Err(IoError::Full);
        }
        slots.insert(key, Slot::Ready(fd, now));
        Ok(())
    }

    /// Takes the connection for `key`, waiting at most `timeout` for it.
    ///
    /// # Errors
    /// [`IoError::TakeTimeout`] if it did not arrive in time;
    /// [`IoError::Duplicate`] if another caller is already waiting for it.
    pub async fn take(&self, key: &StreamKey, timeout: Duration) -> Result<OwnedFd, IoError> {
        let rx = {
            let mut slots = self.lock();
            match slots.remove(key) {
                Some(Slot::Ready(fd, _)) => return Ok(fd),
                Some(Slot::Waiting(tx)) if !tx.is_closed() => {
                    slots.insert(key.clone(), Slot::Waiting(tx));
                    return Err(IoError::Duplicate(key.to_string()));
                }
                _ => {}
            }
            let (tx, rx) = oneshot::channel();
            slots.insert(key.clone(), Slot::Waiting(tx));
            rx
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(fd)) => Ok(fd),
            _ => {
                let mut slots = self.lock();
                // A connection may have been registered right at the deadline.
                match slots.remove(key) {
                    Some(Slot::Ready(fd, _)) => Ok(fd),
                    Some(Slot::Waiting(tx)) if !tx.is_closed() => {
                        slots.insert(key.clone(), Slot::Waiting(tx));
                        Err(IoError::TakeTimeout(key.to_string(), timeout))
                    }
                    _ => Err(IoError::TakeTimeout(key.to_string(), timeout)),
                }
            }
        }
    }

    /// Closes every unclaimed connection of container `container_id`
    /// (called when the container is removed). Returns how many.
    pub fn discard_container(&self, container_id: &str) -> usize {
        let mut slots = self.lock();
        let before = slots.len();
        slots.retain(|k, slot| k.container_id != container_id || matches!(slot, Slot::Waiting(_)));
        before - slots.len()
    }

    /// Number of connections registered and not yet taken.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn pending(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, Slot::Ready(..)))
            .count()
    }
}

/// Where to listen: a vsock port (guest) or a Unix socket path (host tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `vsock://<cid>:<port>`; cid `-1` = `VMADDR_CID_ANY`.
    Vsock {
        /// Local CID to bind (`u32::MAX` = any).
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// `unix://<path>`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `vsock://<cid>:<port>` or `unix://<absolute or relative path>`.
    ///
    /// # Errors
    /// [`IoError::BadAddress`].
    pub fn parse(s: &str) -> Result<Self, IoError> {
        let bad = || IoError::BadAddress(s.to_string());
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            let cid = if cid == "-1" {
                u32::MAX
            } else {
                cid.parse().map_err(|_| bad())?
            };
            let port = port.parse().map_err(|_| bad())?;
            Ok(ListenAddr::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else {
            Err(bad())
        }
    }

    /// The address as ttrpc's `Server::bind` expects it.
    pub fn to_ttrpc(&self) -> String {
        match self {
            ListenAddr::Vsock { cid, port } if *cid == u32::MAX => format!("vsock://-1:{port}"),
            ListenAddr::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
            ListenAddr::Unix(p) => format!("unix://{}", p.display()),
        }
    }
}

/// Removes a stale Unix socket file at `path` (only if it is a socket).
pub fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener),
}

enum Conn {
    Vsock(tokio_vsock::VsockStream),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    fn bind(addr: &ListenAddr) -> Result<Self, IoError> {
        let err = |source| IoError::Bind {
            addr: addr.to_ttrpc(),
            source,
        };
        match addr {
            ListenAddr::Vsock { cid, port } => {
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .map(Listener::Vsock)
                    .map_err(err)
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path);
                tokio::net::UnixListener::bind(path)
                    .map(Listener::Unix)
                    .map_err(err)
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Vsock(l) => l.accept().await.map(|(s, _)| Conn::Vsock(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

/// Reads one header line byte by byte (so not one byte of the stream's
/// payload is consumed) and parses it.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, IoError> {
    let mut line = Vec::with_capacity(64);
    loop {
        let b = r.read_u8().await.map_err(IoError::Read)?;
        line.push(b);
        if b == b'\n' {
            return Ok(StreamHeader::parse(&line)?);
        }
        if line.len() >= MAX_HEADER_LINE {
            return Err(StreamHeaderError::TooLong.into());
        }
    }
}

fn set_blocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; flags are read then written back.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Conn {
    async fn header(&mut self) -> Result<StreamHeader, IoError> {
        let fut = async {
            match self {
                Conn::Vsock(s) => read_header(s).await,
                Conn::Unix(s) => read_header(s).await,
            }
        };
        tokio::time::timeout(HEADER_TIMEOUT, fut)
            .await
            .map_err(|_| IoError::HeaderTimeout)?
    }

    /// Deregisters from tokio and returns the socket in blocking mode.
    fn into_blocking_fd(self) -> Result<OwnedFd, IoError> {
        let fd = match self {
            Conn::Vsock(s) => OwnedFd::from(s),
            Conn::Unix(s) => OwnedFd::from(s.into_std().map_err(IoError::Fd)?),
        };
        set_blocking(&fd).map_err(IoError::Fd)?;
        Ok(fd)
    }
}

async fn handle(conn: Conn, registry: Arc<StreamRegistry>) -> Result<StreamKey, IoError> {
    let mut conn = conn;
    let header = conn.header().await?;
    let key = StreamKey::from(header);
    let fd = conn.into_blocking_fd()?;
    registry.register(key.clone(), fd)?;
    Ok(key)
}

/// Binds the stdio stream listener at `addr` and spawns its accept loop on
/// the current tokio runtime. Each connection's header is read in its own
/// task; good connections go to `registry`, bad ones are closed and logged.
///
/// # Errors
/// [`IoError::Bind`] if the address cannot be bound.
pub fn spawn_listener(addr: &ListenAddr, registry: Arc<StreamRegistry>) -> Result<(), IoError> {
    let listener = Listener::bind(addr)?;
    log::info!("stdio streams: listening on {}", addr.to_ttrpc());
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        match handle(conn, registry).await {
                            Ok(key) => log::debug!("stdio stream {key} connected"),
                            Err(e) => log::warn!("stdio stream connection closed: {e}"),
                        }
                    });
                }
                Err(e) => {
                    log::error!("stdio stream accept: {e}");
                    // Avoid a busy loop on persistent errors (e.g. EMFILE).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (OwnedFd, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (OwnedFd::from(a), b)
    }

    #[tokio::test]
    async fn register_then_take() {
        let reg = StreamRegistry::new();
        let key = StreamKey::new("c1", "", StdioStream::Stdout);
        let (fd, mut peer) = pair();
        reg.register(key.clone(), fd).unwrap();
        assert_eq!(reg.pending(), 1);
        let got = reg.take(&key, Duration::from_millis(10)).await.unwrap();
        assert_eq!(reg.pending(), 0);
        let mut s = UnixStream::from(got);
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[tokio::test]
    async fn take_waits_for_register() {
        let reg = Arc::new(StreamRegistry::new());
        let key = StreamKey::new("c1", "e1", StdioStream::Stdin);
        let r2 = reg.clone();
        let k2 = key.clone();
        let waiter = tokio::spawn(async move { r2.take(&k2, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (fd, _peer) = pair();
        reg.register(key, fd).unwrap();
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(reg.pending(), 0);
    }

    #[tokio::test]
    async fn take_times_out_and_later_register_is_kept() {
        let reg = StreamRegistry::new();
        let key = StreamKey::new("c1", "", StdioStream::Stderr);
        let err = reg.take(&key, Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(err, IoError::TakeTimeout(..)), "{err}");
        let (fd, _peer) = pair();
        reg.register(key.clone(), fd).unwrap();
        assert_eq!(reg.pending(), 1);
        assert!(reg.take(&key, Duration::from_millis(1)).await.is_ok());
    }

    #[tokio::test]
    async fn duplicate_register_rejected_and_discard() {
        let reg = StreamRegistry::new();
        let key = StreamKey::new("c1", "", StdioStream::Stdout);
        let (fd1, _p1) = pair();
        let (fd2, mut p2) = pair();
        reg.register(key.clone(), fd1).unwrap();
        assert!(matches!(
            reg.register(key.clone(), fd2),
            Err(IoError::Duplicate(_))
        ));
        // The rejected connection was closed: its peer sees EOF.
        let mut buf = [0u8; 1];
        assert_eq!(p2.read(&mut buf).unwrap(), 0);
        reg.register(StreamKey::new("c2", "", StdioStream::Stdout), pair().0)
            .unwrap();
        assert_eq!(reg.discard_container("c1"), 1);
        assert_eq!(reg.pending(), 1);
    }

    #[tokio::test]
    async fn header_is_read_exactly() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut b, b"c1 e2 stdin\npayload")
            .await
            .unwrap();
        let reg = Arc::new(StreamRegistry::new());
        let key = handle(Conn::Unix(a), reg.clone()).await.unwrap();
        assert_eq!(key, StreamKey::new("c1", "e2", StdioStream::Stdin));
        let mut s = UnixStream::from(reg.take(&key, Duration::ZERO).await.unwrap());
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"payload");
    }

    #[tokio::test]
    async fn garbage_headers_rejected() {
        let reg = Arc::new(StreamRegistry::new());
        for junk in [&b"c1 - stdio\n"[..], b"\n", &[b'x'; 400], b"c1 - stdin"] {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut b, junk)
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut b).await.unwrap();
            assert!(
                handle(Conn::Unix(a), reg.clone()).await.is_err(),
                "{junk:?}"
            );
        }
        assert_eq!(reg.pending(), 0);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("vsock://-1:1024").unwrap(),
            ListenAddr::Vsock {
                cid: u32::MAX,
                port: 1024
            }
        );
        assert_eq!(
            ListenAddr::parse("vsock://-1:1024").unwrap().to_ttrpc(),
            "vsock://-1:1024"
        );
        assert_eq!(
            ListenAddr::parse("unix:///tmp/x.sock").unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "",
            "tcp://1:2",
            "vsock://1",
            "vsock://a:1",
            "vsock://1:x",
            "unix://",
        ] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
