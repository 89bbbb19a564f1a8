//! Host-side client of the guest agent (`vmrt.agent.v1.Agent`, protos/agent.proto)
//! over the VMM's hybrid vsock Unix socket (docs/contracts.md "Hybrid vsock"),
//! used by the shim and by `vmrt agent`.
//!
//! Host → guest connection: connect to the sandbox's `vsock.sock`, send
//! `CONNECT <vsock port>\n`, read one line `OK <host port>\n` byte by byte (so no byte
//! of the following stream is consumed), then the socket carries the raw stream: ttrpc
//! for [`AGENT_PORT`], one stdio stream for [`IO_PORT`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    time::Instant,
};
use ttrpc::asynchronous::{transport::Socket, Client};
use crate::{agent as pb, agent_ttrpc::AgentClient};

/// Guest vsock port of the agent's ttrpc API (`vmrt.port=`).
pub const AGENT_PORT: u32 = crate::DEFAULT_API_PORT;
/// Guest vsock port of the agent's stdio streams (`vmrt.io_port=`).
pub const IO_PORT: u32 = crate::DEFAULT_IO_PORT;
/// Longest accepted handshake reply line, newline included (`OK 4294967295\n` is 14).
pub const MAX_REPLY_LINE: usize = 32;
/// Time one connection attempt (connect + handshake + Health) may take while dialing.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between dial attempts.
const RETRY_INTERVAL: Duration = Duration::from_millis(25);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connecting to the hybrid vsock Unix socket failed.
    #[error("connect to hybrid vsock {path}: {source}")]
    Connect {
        /// The VMM's `uds_path`.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The handshake reply was not `OK <port>\n` (or the socket closed first).
    #[error("hybrid vsock handshake with {path} for port {port}: {message}")]
    Handshake {
        /// The VMM's `uds_path`.
        path: PathBuf,
        /// Guest vsock port asked for.
        port: u32,
        /// What was wrong with the reply.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("{what} timed out after {after_ms} ms")]
    Timeout {
        /// What timed out.
        what: String,
        /// Time allowed, milliseconds.
        after_ms: u128,
    },
    /// An agent RPC failed (transport error or status returned by the agent).
    #[error("agent {method}: {}", rpc_message(source))]
    Rpc {
        /// RPC method name.
        method: &'static str,
        /// ttrpc error; `RpcStatus` carries the agent's code and message.
        source: ttrpc::Error,
    },
    /// The agent answered Health with serving = false until the deadline.
    #[error("agent is not serving")]
    NotServing,
}

/// Readable text of a ttrpc error: `<code>: <message>` for a status from the agent.
pub fn rpc_message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// Parses the handshake reply line (without trailing newline): `OK <host port>` where the
/// port is a decimal u32. Any other content is an error message describing it.
pub fn parse_ok_line(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line)
        .map_err(|_| format!("reply is not UTF-8: {:?}", String::from_utf8_lossy(line)))?;
    let rest = text
        .strip_prefix("OK ")
        .ok_or_else(|| format!("unexpected reply {text:?}, expected \"OK <port>\""))?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port in reply {text:?}"));
    }
    rest.parse::<u32>()
        .map_err(|e| format!("bad port in reply {text:?}: {e}"))
}

/// Connects to the hybrid vsock socket `uds` and opens guest vsock port `port`.
/// Returns the connected stream positioned right after the `OK` line.
///
/// Errors: [`AgentError::Connect`], [`AgentError::Handshake`] (garbage reply, line longer
/// than [`MAX_REPLY_LINE`], EOF), [`AgentError::Timeout`] if the whole exchange exceeds `timeout`.
pub async fn hybrid_connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, AgentError> {
    let fut = async {
        let mut s = UnixStream::connect(uds)
            .await
            .map_err(|source| AgentError::Connect {
                path: uds.to_path_buf(),
                source,
            })?;
        let hs = |message: String| AgentError::Handshake {
            path: uds.to_path_buf(),
            port,
            message,
        };
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| hs(format!("send CONNECT: {e}")))?;
        let mut line = Vec::with_capacity(MAX_REPLY_LINE);
        loop {
            let mut b = [0u8; 1];
            let n = s
                .read(&mut b)
                .await
                .map_err(|e| hs(format!("read reply: {e}")))?;
            if n == 0 {
                return Err(hs(format!(
                    "connection closed after {:?} (port not listening?)",
                    String::from_utf8_lossy(&line)
                )));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() >= MAX_REPLY_LINE {
                return Err(hs(format!(
                    "reply longer than {MAX_REPLY_LINE} bytes without newline"
                )));
            }
        }
        parse_ok_line(&line).map_err(hs)?;
        Ok(s)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| AgentError::Timeout {
            what: format!("hybrid vsock CONNECT {port} on {}", uds.display()),
            after_ms: timeout.as_millis(),
        })?
}

/// A ttrpc context with the given timeout (`None` = wait forever, for WaitProcess).
pub fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(t.as_nanos().min(i64::MAX as u128) as i64),
        None => ttrpc::context::Context::default(),
    }
}

/// Default timeout of ordinary agent RPCs (generous: the runner VM is slow TCG).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Connected agent client. Cloning shares the ttrpc connection, which multiplexes
/// concurrent requests (long WaitProcess calls next to short ones).
#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    uds: PathBuf,
}

impl Agent {
    /// Dials the agent on `uds` until it answers `Health` with serving = true, retrying
    /// every 25 ms until `deadline` (a failed attempt costs the booting guest one
    /// vsock request and reset; at 100 ms the wait after the agent listened was
    /// 50 ms on average). Returns the last error wrapped in a timeout error
    /// description if the deadline passes.
    pub async fn dial(uds: &Path, deadline: Instant) -> Result<Agent, AgentError> {
        let started = Instant::now();
        let mut last: Option<AgentError> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let what = match last {
                    Some(e) => format!("waiting for the agent (last error: {e})"),
                    None => "waiting for the agent".into(),
                };
                return Err(AgentError::Timeout {
                    what,
                    after_ms: (now - started).as_millis(),
                });
            }
            let budget = ATTEMPT_TIMEOUT.min(deadline - now);
            match Self::try_once(uds, budget).await {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// One attempt, no retry: connect through the hybrid socket and wait up
    /// to `budget` for `Health`. For callers that must see every failure
    /// (the agent stress test); Create uses [`Agent::dial`].
    ///
    /// Errors: as [`Agent::dial`]'s attempts (connect, handshake, RPC).
    pub async fn dial_once(uds: &Path, budget: Duration) -> Result<Agent, AgentError> {
        Self::try_once(uds, budget).await
    }

    async fn try_once(uds: &Path, budget: Duration) -> Result<Agent, AgentError> {
        let start = Instant::now();
        let stream = hybrid_connect(uds, AGENT_PORT, budget).await?;
        let client = AgentClient::new(Client::new(Socket::new(stream)));
        let left = budget
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        let r = client
            .health(ctx(Some(left)), &pb::Empty::new())
            .await
            .map_err(|source| AgentError::Rpc {
                method: "Health",
                source,
            })?;
        if !r.serving {
            return Err(AgentError::NotServing);
        }
        Ok(Agent {
            client,
            uds: uds.to_path_buf(),
        })
    }

    /// The generated ttrpc client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// The hybrid vsock socket this agent is reached through.
    pub fn uds(&self) -> &Path {
        &self.uds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::{io::AsyncBufReadExt, net::UnixListener};

    #[test]
    fn ok_line_parsing() {
        assert_eq!(parse_ok_line(b"OK 1073741824"), Ok(1073741824));
        assert_eq!(parse_ok_line(b"OK 0"), Ok(0));
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 5",
            b"OK -1",
            b"OK 5x",
            b"OK 99999999999",
            b"\xff\xfe",
            b"ERR",
        ] {
            assert!(
                parse_ok_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn ok_line_parser_never_panics(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_ok_line(&line);
        }

        #[test]
        fn ok_line_roundtrip(port in any::<u32>()) {
            prop_assert_eq!(parse_ok_line(format!("OK {port}").as_bytes()), Ok(port));
        }
    }

    /// Runs a one-connection server on a real Unix listener that checks the CONNECT
    /// line and answers with `reply`, then sends `after`.
    async fn server(
        reply: &'static [u8],
        after: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<String>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vsock.sock");
        let l = UnixListener::bind(&p).unwrap();
        let h = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let mut s = r.into_inner();
            s.write_all(reply).await.unwrap();
            s.write_all(after).await.unwrap();
            // keep the connection open a moment so the client sees data, not EOF
            tokio::time::sleep(Duration::from_millis(300)).await;
            line
        });
        (d, p, h)
    }

    #[tokio::test]
    async fn handshake_ok_leaves_following_bytes_unread() {
        let (_d, p, h) = server(b"OK 1073741825\n", b"payload").await;
        let mut s = hybrid_connect(&p, 1025, Duration::from_secs(5))
            .await
            .unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload");
        assert_eq!(h.await.unwrap(), "CONNECT 1025\n");
    }

    #[tokio::test]
    async fn garbage_reply_is_an_error() {
        let (_d, p, _h) = server(b"HELLO THERE\n", b"").await;
        let e = hybrid_connect(&p, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Handshake { port: 1024, .. }), "{e}");
        assert!(e.to_string().contains("HELLO THERE"), "{e}");
    }

    #[tokio::test]
    async fn overlong_reply_is_an_error() {
        let (_d, p, _h) = server(
            b"OK 11111111111111111111111111111111111111111111111111",
            b"",
        )
        .await;
        let e = hybrid_connect(&p, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[tokio::test]
    async fn closed_without_reply_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vsock.sock");
        let l = UnixListener::bind(&p).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let e = hybrid_connect(&p, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        // EOF or ECONNRESET (the peer closed with our CONNECT line unread).
        assert!(matches!(e, AgentError::Handshake { port: 1024, .. }), "{e}");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vsock.sock");
        let l = UnixListener::bind(&p).unwrap();
        let _h = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let e = hybrid_connect(&p, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let d = tempfile::tempdir().unwrap();
        let e = hybrid_connect(&d.path().join("none.sock"), 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn dial_gives_up_at_the_deadline_with_the_last_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vsock.sock");
        let e = Agent::dial(&p, Instant::now() + Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        let m = e.to_string();
        assert!(
            m.contains("timed out") && m.contains("connect to hybrid vsock"),
            "{m}"
        );
    }
}
