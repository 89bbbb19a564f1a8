//! Process stdio: copies between containerd's stdio FIFOs and the agent's stdio
//! streams (docs/contracts.md "Agent API": one vsock connection to the I/O port per
//! stream, first line `<container_id> <exec_id or -> <stdin|stdout|stderr>\n`).
//!
//! * stdin: FIFO → stream; on FIFO EOF the stream's write side is shut down, which the
//!   agent turns into EOF on the process's stdin.
//! * stdout/stderr: stream → FIFO until the agent closes the stream (process exited and
//!   drained). [`ProcessIo::wait_output`] waits for both, so TaskExit is published only
//!   after all output reached containerd.
//! * terminal mode: only stdin and stdout (the pty output).
//!
//! Paths may also be `file:///abs/path` (appended to); `binary://` log drivers are refused.

use std::{
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{io::AsyncWriteExt, net::UnixStream, task::JoinHandle};

use vmrt_protocol::{StdioStream, StreamHeader};

use crate::agent::{hybrid_connect, AgentError, IO_PORT};

/// Time allowed for opening one stdio stream (handshake + header).
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Copy buffer size.
const COPY_BUF: usize = 128 * 1024;

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// Opening the vsock stream failed.
    #[error("open {kind} stream of {container_id}/{exec_id}: {source}")]
    Stream {
        /// Container.
        container_id: String,
        /// Exec id or `-`.
        exec_id: String,
        /// stdin/stdout/stderr.
        kind: &'static str,
        /// Handshake error.
        source: AgentError,
    },
    /// Sending the stream header failed.
    #[error("send {kind} stream header: {source}")]
    Header {
        /// stdin/stdout/stderr.
        kind: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A stdio path containerd gave cannot be used.
    #[error("stdio {kind} {path:?}: {message}")]
    Path {
        /// stdin/stdout/stderr.
        kind: &'static str,
        /// Path or URI.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The stdio paths containerd passed for a process (empty = stream not used).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO (or file:// URI).
    pub stdout: String,
    /// stderr FIFO (or file:// URI).
    pub stderr: String,
    /// Whether the process has a pseudo-terminal.
    pub terminal: bool,
}

impl StdioPaths {
    /// Which streams the shim connects: `(stdin, stdout, stderr)`. In terminal mode
    /// stderr is never connected (the pty merges it into stdout).
    pub fn streams(&self) -> (bool, bool, bool) {
        (
            !self.stdin.is_empty(),
            !self.stdout.is_empty(),
            !self.stderr.is_empty() && !self.terminal,
        )
    }
}

/// Opens one stdio stream: hybrid `CONNECT 1025` then the header line.
pub async fn open_stream(
    uds: &Path,
    container_id: &str,
    exec_id: &str,
    kind: &'static str,
) -> Result<UnixStream, StdioError> {
    let stream = match kind {
        "stdin" => StdioStream::Stdin,
        "stdout" => StdioStream::Stdout,
        _ => StdioStream::Stderr,
    };
    let header = StreamHeader::new(container_id, exec_id, stream)
        .encode()
        .map_err(|e| StdioError::Path {
            kind,
            path: format!("{container_id}/{exec_id}"),
            message: e.to_string(),
        })?;
    let mut s = hybrid_connect(uds, IO_PORT, STREAM_OPEN_TIMEOUT)
        .await
        .map_err(|source| StdioError::Stream {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            kind,
            source,
        })?;
    s.write_all(header.as_bytes())
        .await
        .map_err(|source| StdioError::Header { kind, source })?;
    Ok(s)
}

/// Where output goes: a FIFO (opened read-write so opening never fails with ENXIO) or a
/// regular file from a `file://` URI (appended).
fn output_target(kind: &'static str, path: &str) -> Result<PathBuf, StdioError> {
    let bad = |message: &str| StdioError::Path {
        kind,
        path: path.into(),
        message: message.into(),
    };
    if let Some(p) = path.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if path.contains("://") {
        return Err(bad(
            "unsupported log URI scheme (only FIFOs and file:// are supported)",
        ));
    }
    if !Path::new(path).is_absolute() {
        return Err(bad("not an absolute path"));
    }
    Ok(PathBuf::from(path))
}

fn open_output(kind: &'static str, path: &str) -> Result<tokio::fs::File, StdioError> {
    let target = output_target(kind, path)?;
    let is_fifo = std::fs::metadata(&target)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let mut o = std::fs::OpenOptions::new();
    if is_fifo {
        o.read(true).write(true);
    } else {
        o.create(true).append(true);
    }
    let f = o
        .custom_flags(libc::O_CLOEXEC)
        .open(&target)
        .map_err(|e| StdioError::Path {
            kind,
            path: path.into(),
            message: e.to_string(),
        })?;
    Ok(tokio::fs::File::from_std(f))
}

/// Running copies of one process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Option<JoinHandle<()>>,
    stdin_path: Option<PathBuf>,
    output: Vec<JoinHandle<u64>>,
}

impl ProcessIo {
    /// Connects the streams `paths` asks for (see [`StdioPaths::streams`]) to the agent
    /// reached through `uds` and starts copying. Output FIFOs are opened before the
    /// streams so a bad path fails before anything is connected.
    pub async fn start(
        uds: &Path,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> Result<ProcessIo, StdioError> {
        let (want_in, want_out, want_err) = paths.streams();
        let mut io = ProcessIo::default();
        let mut outputs = Vec::new();
        if want_out {
            outputs.push(("stdout", open_output("stdout", &paths.stdout)?));
        }
        if want_err {
            outputs.push(("stderr", open_output("stderr", &paths.stderr)?));
        }
        for (kind, mut file) in outputs {
            let stream = open_stream(uds, container_id, exec_id, kind).await?;
            let label = format!("{container_id}/{exec_id} {kind}");
            io.output.push(tokio::spawn(async move {
                let mut r = tokio::io::BufReader::with_capacity(COPY_BUF, stream);
                let n = match tokio::io::copy_buf(&mut r, &mut file).await {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("{label}: copy ended: {e}");
                        0
                    }
                };
                let _ = file.flush().await;
                log::debug!("{label}: {n} bytes copied");
                n
            }));
        }
        if want_in {
            let stream = open_stream(uds, container_id, exec_id, "stdin").await?;
            let path = PathBuf::from(&paths.stdin);
            io.stdin_path = Some(path.clone());
            let label = format!("{container_id}/{exec_id} stdin");
            io.stdin = Some(tokio::spawn(async move {
                // Opening a FIFO for reading blocks until containerd opens the write side;
                // only then does EOF mean "stdin closed".
                let p = path.clone();
                let file = match tokio::task::spawn_blocking(move || std::fs::File::open(p)).await {
                    Ok(Ok(f)) => tokio::fs::File::from_std(f),
                    Ok(Err(e)) => {
                        log::warn!("{label}: open {}: {e}", path.display());
                        return;
                    }
                    Err(_) => return,
                };
                let (_r, mut w) = stream.into_split();
                let mut file = tokio::io::BufReader::with_capacity(COPY_BUF, file);
                if let Err(e) = tokio::io::copy_buf(&mut file, &mut w).await {
                    log::debug!("{label}: copy ended: {e}");
                }
                // EOF: shut down the write side so the process sees EOF on stdin.
                let _ = w.shutdown().await;
                log::debug!("{label}: EOF");
            }));
        }
        Ok(io)
    }

    /// Stops forwarding stdin (containerd CloseIO): the stream's write side is shut down.
    pub fn close_stdin(&mut self) {
        if let Some(h) = self.stdin.take() {
            h.abort();
            self.unblock_stdin_open();
        }
    }

    /// A stdin copier may be blocked opening the FIFO if no writer ever came; opening
    /// the write side ourselves (non-blocking) releases it, and it then sees EOF.
    fn unblock_stdin_open(&mut self) {
        if let Some(p) = self.stdin_path.take() {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(p);
        }
    }

    /// Waits until stdout and stderr were copied to the end (the agent closed the
    /// streams), at most `limit`; copies still running then are aborted.
    /// Returns the number of output bytes copied.
    pub async fn wait_output(&mut self, limit: Duration) -> u64 {
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + limit;
        for h in self.output.drain(..) {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(n)) => total += n,
                Ok(Err(_)) => {}
                Err(_) => {
                    log::warn!("stdio copy did not finish within {limit:?}; aborting it");
                    abort.abort();
                }
            }
        }
        total
    }

    /// Aborts every copy (teardown).
    pub fn abort(&mut self) {
        for h in self.output.drain(..) {
            h.abort();
        }
        self.close_stdin();
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt},
        net::UnixListener,
    };

    #[test]
    fn terminal_mode_has_no_stderr_stream() {
        let p = StdioPaths {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: true,
        };
        assert_eq!(p.streams(), (true, true, false));
        let p = StdioPaths {
            terminal: false,
            ..p
        };
        assert_eq!(p.streams(), (true, true, true));
        assert_eq!(StdioPaths::default().streams(), (false, false, false));
    }

    #[test]
    fn output_uris() {
        assert_eq!(
            output_target("stdout", "file:///var/log/x").unwrap(),
            PathBuf::from("/var/log/x")
        );
        assert!(output_target("stdout", "binary:///bin/logger?x=1").is_err());
        assert!(output_target("stdout", "relative").is_err());
    }

    /// A fake hybrid vsock endpoint (real Unix listener) that acknowledges CONNECT,
    /// records the header lines, sends `payload` on stdout streams and collects stdin.
    async fn endpoint(
        dir: &Path,
        payload: Vec<u8>,
        conns: usize,
    ) -> (PathBuf, tokio::task::JoinHandle<(Vec<String>, Vec<u8>)>) {
        let p = dir.join("vsock.sock");
        let l = UnixListener::bind(&p).unwrap();
        let h = tokio::spawn(async move {
            let mut headers = Vec::new();
            let mut stdin = Vec::new();
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let (s, _) = l.accept().await.unwrap();
                let mut r = tokio::io::BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                assert_eq!(line, "CONNECT 1025\n");
                r.get_mut().write_all(b"OK 77\n").await.unwrap();
                let mut header = String::new();
                r.read_line(&mut header).await.unwrap();
                headers.push(header.clone());
                let payload = payload.clone();
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    if header.ends_with("stdin\n") {
                        r.read_to_end(&mut got).await.unwrap();
                    } else {
                        r.get_mut().write_all(&payload).await.unwrap();
                    }
                    got
                }));
            }
            for t in tasks {
                stdin.extend(t.await.unwrap());
            }
            (headers, stdin)
        });
        (p, h)
    }

    fn mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[tokio::test]
    async fn output_is_copied_completely_and_stdin_eof_is_forwarded() {
        let d = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (uds, server) = endpoint(d.path(), payload.clone(), 2).await;
        let (fin, fout) = (d.path().join("in"), d.path().join("out"));
        mkfifo(&fin);
        mkfifo(&fout);
        // containerd's side: reader of stdout, writer of stdin.
        let fout2 = fout.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(fout2).unwrap();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut v).unwrap();
            v
        });
        let paths = StdioPaths {
            stdin: fin.to_string_lossy().into(),
            stdout: fout.to_string_lossy().into(),
            stderr: String::new(),
            terminal: false,
        };
        let mut io = ProcessIo::start(&uds, "c1", "", &paths).await.unwrap();
        let fin2 = fin.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(fin2).unwrap();
            std::io::Write::write_all(&mut f, b"hi\n").unwrap();
        })
        .await
        .unwrap();
        let (headers, stdin) = server.await.unwrap();
        assert!(
            headers.contains(&"c1 - stdout\n".to_string()),
            "{headers:?}"
        );
        assert!(headers.contains(&"c1 - stdin\n".to_string()), "{headers:?}");
        assert_eq!(stdin, b"hi\n");
        let n = io.wait_output(Duration::from_secs(10)).await;
        assert_eq!(n, payload.len() as u64);
        drop(io); // closes our read-write handle of the FIFO: the reader sees EOF
        let got = reader.await.unwrap();
        assert_eq!(got.len(), payload.len());
        assert!(got == payload);
    }

    #[tokio::test]
    async fn exec_streams_name_the_exec_and_file_uri_appends() {
        let d = tempfile::tempdir().unwrap();
        let (uds, server) = endpoint(d.path(), b"out".to_vec(), 2).await;
        let log = d.path().join("log.txt");
        std::fs::write(&log, b"old ").unwrap();
        let paths = StdioPaths {
            stdin: String::new(),
            stdout: format!("file://{}", log.display()),
            stderr: format!("file://{}", log.display()),
            terminal: false,
        };
        let mut io = ProcessIo::start(&uds, "c1", "e7", &paths).await.unwrap();
        let (headers, _) = server.await.unwrap();
        assert_eq!(
            headers,
            vec!["c1 e7 stdout\n".to_string(), "c1 e7 stderr\n".to_string()]
        );
        assert_eq!(io.wait_output(Duration::from_secs(10)).await, 6);
        assert_eq!(std::fs::read(&log).unwrap(), b"old outout");
    }

    #[tokio::test]
    async fn close_stdin_without_writer_unblocks() {
        let d = tempfile::tempdir().unwrap();
        let (uds, server) = endpoint(d.path(), Vec::new(), 1).await;
        let fin = d.path().join("in");
        mkfifo(&fin);
        let paths = StdioPaths {
            stdin: fin.to_string_lossy().into(),
            ..Default::default()
        };
        let mut io = ProcessIo::start(&uds, "c1", "", &paths).await.unwrap();
        io.close_stdin();
        // The agent side sees EOF on stdin (write side shut down when the task ended).
        let (_, got) = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(got.is_empty());
    }
}
