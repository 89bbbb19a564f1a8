//! `vmrt agent`: talk to a sandbox's guest agent through the VMM's hybrid vsock
//! socket (`/run/vmrt/sandboxes/<id>/vsock.sock`), for debugging and for the
//! end-to-end tests and benchmarks of the vsock path.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmrt_protocol::agent as pb;
use vmrt_protocol::client::{ctx, Agent, AgentError};

/// What `vmrt agent version` prints (JSON).
#[derive(Debug, Serialize)]
pub struct VersionReport {
    /// Agent version (its crate version).
    pub agent_version: String,
    /// Guest kernel release.
    pub kernel_release: String,
    /// Agent API version (protocol crate `API_VERSION`).
    pub api_version: u32,
    /// Milliseconds from the first dial attempt to the first answered RPC.
    pub first_rpc_ms: u128,
    /// The agent's resident set size in the guest (page-table count), KiB.
    pub agent_rss_kib: u64,
    /// Its anonymous part (the rest is /init's file pages), KiB.
    pub agent_rss_anon_kib: u64,
    /// Guest uptime when the agent started as /init, microseconds.
    pub agent_started_at_us: u64,
    /// Agent start to API listening, guest clock, microseconds.
    pub agent_start_to_ready_us: u64,
}

/// What `vmrt agent stress` prints (JSON).
#[derive(Debug, Serialize)]
pub struct StressReport {
    /// Sequential Version requests sent on one connection, all answered.
    pub sequential_requests: usize,
    /// Concurrent connections, each answering one Health request.
    pub concurrent_connections: usize,
    /// Wall time of the sequential part, milliseconds.
    pub sequential_ms: u128,
    /// Wall time of the concurrent part, milliseconds.
    pub concurrent_ms: u128,
}

/// Errors of `vmrt agent`.
#[derive(Debug, thiserror::Error)]
pub enum AgentCliError {
    /// Dialing or an RPC failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A concurrent worker task failed to run.
    #[error("worker task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn rpc(method: &'static str) -> impl Fn(ttrpc::Error) -> AgentError {
    move |source| AgentError::Rpc { method, source }
}

/// Dials until the agent answers Health (bounded by `timeout`), then asks Version.
pub async fn version(uds: &Path, timeout: Duration) -> Result<VersionReport, AgentCliError> {
    let t0 = Instant::now();
    let agent = Agent::dial(uds, tokio::time::Instant::now() + timeout).await?;
    let first_rpc_ms = t0.elapsed().as_millis();
    let v = agent
        .client()
        .version(ctx(Some(timeout)), &pb::Empty::new())
        .await
        .map_err(rpc("Version"))?;
    Ok(VersionReport {
        agent_version: v.agent_version,
        kernel_release: v.kernel_release,
        api_version: v.api_version,
        first_rpc_ms,
        agent_rss_kib: v.agent_rss_kib,
        agent_rss_anon_kib: v.agent_rss_anon_kib,
        agent_started_at_us: v.started_at_us,
        agent_start_to_ready_us: v.start_to_ready_us,
    })
}

/// `requests` sequential Version calls on one connection, then `connections`
/// concurrent connections each answering Health. Fails on the first error; the
/// whole command (dial included) has `timeout`, not each request.
pub async fn stress(uds: &Path, timeout: Duration, requests: usize, connections: usize) -> Result<StressReport, AgentCliError> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let agent = Agent::dial(uds, deadline).await?;
    let t0 = Instant::now();
    for i in 0..requests {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(AgentError::Timeout {
                what: format!("{i} of {requests} sequential Version requests answered"),
                after_ms: started.elapsed().as_millis(),
            }
            .into());
        }
        agent
            .client()
            .version(ctx(Some(left)), &pb::Empty::new())
            .await
            .map_err(rpc("Version"))?;
    }
    let sequential_ms = t0.elapsed().as_millis();
    // The agent is up now: each concurrent connection gets one attempt, so a
    // refused or reset connection fails the run instead of being retried.
    let t1 = Instant::now();
    let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let uds = uds.to_path_buf();
            tokio::spawn(async move { Agent::dial_once(&uds, budget).await })
        })
        .collect();
    // Keep every connection open until all of them answered.
    let mut open = Vec::with_capacity(connections);
    for w in workers {
        open.push(w.await??);
    }
    drop(open);
    Ok(StressReport {
        sequential_requests: requests,
        concurrent_connections: connections,
        sequential_ms,
        concurrent_ms: t1.elapsed().as_millis(),
    })
}
