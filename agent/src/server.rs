//! ttrpc server of the agent API (`protocol/protos/agent.proto`, service
//! `vmrt.agent.v1.Agent`): every RPC maps onto [`ContainerManager`]; stdio
//! streams come from the [`StreamRegistry`] filled by [`crate::io`].
//!
//! An agent started as a VM template ([`AgentService::with_template`],
//! [`crate::template`]) refuses every container and process call with
//! FAILED_PRECONDITION until `Restored` succeeded (Health, Version,
//! GetOomEvent and Shutdown always work); `Restored` is accepted once, and
//! only by such an agent.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::Code;
use vmrt_agent::container::{self, ContainerManager, ExitInfo, ProcessStdio};
use vmrt_protocol::agent::{self as pb, Empty};
use vmrt_protocol::agent_ttrpc::{self, Agent};
use vmrt_protocol::{is_valid_id, StdioStream, API_VERSION};

use crate::io::{IoError, StreamKey, StreamRegistry};
use crate::template::{self, Restorer};

/// How long `CreateContainer`/`ExecProcess` wait for the stdio streams the
/// request names.
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Guest directory under which the shim's share puts container rootfs
/// directories: `<SHARED_DIR>/<container_id>/rootfs` (docs/contracts.md).
pub const SHARED_DIR: &str = "/run/vmrt/shared";

/// Implementation of the `Agent` ttrpc service.
pub struct AgentService {
    manager: Arc<ContainerManager>,
    streams: Arc<StreamRegistry>,
    stream_timeout: Duration,
    oom_rx: tokio::sync::Mutex<tokio::sync::broadcast::Receiver<String>>,
    shutdown_tx: tokio::sync::mpsc::Sender<()>,
    quiesce: Option<Quiesce>,
    template: Option<Arc<TemplateGate>>,
}

/// Message of the FAILED_PRECONDITION every container and process call gets
/// from a template's agent until `Restored` succeeded.
pub const WAITING_FOR_RESTORED: &str =
    "agent resumed from a VM template is waiting for Restored (no container or process calls before it)";

/// State of an agent started as a VM template (`vmrt.template`): whether
/// `Restored` succeeded, and its steps.
struct TemplateGate {
    /// Set once `Restored` succeeded; never cleared.
    restored: std::sync::atomic::AtomicBool,
    /// One `Restored` at a time: a second one waits, then finds `restored`.
    serial: tokio::sync::Mutex<()>,
    /// The steps (run on the blocking pool).
    restorer: std::sync::Mutex<Restorer>,
}

/// Work `Shutdown` completes before it replies (PID 1: `init::quiesce`, which
/// stops the guest's processes and flushes and unmounts its shares). Runs on
/// the blocking pool; `Err` says what was left undone, and `Shutdown` then
/// fails with it (the VM still reboots).
pub type Quiesce = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Guest CLOCK_BOOTTIME (µs) when the agent started; set first thing in `main`.
pub static STARTED_AT_US: AtomicU64 = AtomicU64::new(0);
/// Guest CLOCK_BOOTTIME (µs) when the agent API server started listening.
pub static READY_AT_US: AtomicU64 = AtomicU64::new(0);

/// CLOCK_BOOTTIME (time since the guest booted, suspend included), microseconds.
pub fn boottime_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The value of the `<name> <n> kB` line `name` (e.g. `"Rss:"`) of a
/// `/proc/<pid>/smaps_rollup` or `/proc/<pid>/status` text, KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// Maps a container error to the ttrpc status code agreed in
/// `container::Error`'s documentation.
fn map_err(e: container::Error) -> ttrpc::Error {
    let code = match &e {
        container::Error::NotFound(_) => Code::NOT_FOUND,
        container::Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
        container::Error::InvalidSpec { .. } => Code::INVALID_ARGUMENT,
        container::Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        container::Error::Internal(_) => Code::INTERNAL,
    };
    status(code, e)
}

fn map_io_err(e: IoError) -> ttrpc::Error {
    let code = match &e {
        IoError::TakeTimeout(..) => Code::DEADLINE_EXCEEDED,
        IoError::Duplicate(_) => Code::ALREADY_EXISTS,
        _ => Code::INTERNAL,
    };
    status(code, e)
}

fn check_container_id(id: &str) -> ttrpc::Result<()> {
    if is_valid_id(id) && id != "." && id != ".." {
        Ok(())
    } else {
        Err(status(
            Code::INVALID_ARGUMENT,
            format!("container_id {id:?}: must be 1..=128 characters of [A-Za-z0-9_.-]"),
        ))
    }
}

fn check_exec_id(id: &str, allow_init: bool) -> ttrpc::Result<()> {
    if (allow_init && id.is_empty()) || (is_valid_id(id) && id != "-" && id != "." && id != "..") {
        Ok(())
    } else {
        Err(status(
            Code::INVALID_ARGUMENT,
            format!("exec_id {id:?}: must be 1..=128 characters of [A-Za-z0-9_.-]"),
        ))
    }
}

fn exit_to_pb(e: ExitInfo) -> pb::WaitProcessResponse {
    let ns = e
        .exited_at
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    pb::WaitProcessResponse {
        exit_status: e.status,
        exited_at_ns: ns,
        ..Default::default()
    }
}

impl AgentService {
    /// A service over `manager` taking stdio streams from `streams`.
    /// `Shutdown` sends one message on `shutdown_tx` just before it replies
    /// (after [`AgentService::with_quiesce`]'s work if set); the receiver
    /// performs the actual shutdown.
    pub fn new(
        manager: Arc<ContainerManager>,
        streams: Arc<StreamRegistry>,
        stream_timeout: Duration,
        shutdown_tx: tokio::sync::mpsc::Sender<()>,
    ) -> Self {
        let oom_rx = tokio::sync::Mutex::new(manager.oom_events());
        AgentService {
            manager,
            streams,
            stream_timeout,
            oom_rx,
            shutdown_tx,
            quiesce: None,
            template: None,
        }
    }

    /// Makes this the agent of a VM template (`vmrt.template`): every
    /// container and process call fails with FAILED_PRECONDITION
    /// ([`WAITING_FOR_RESTORED`]) until a `Restored` call has run `restorer`
    /// to success; `Restored` is then refused. Without this `Restored` is
    /// always refused.
    pub fn with_template(mut self, restorer: Restorer) -> Self {
        self.template = Some(Arc::new(TemplateGate {
            restored: std::sync::atomic::AtomicBool::new(false),
            serial: tokio::sync::Mutex::new(()),
            restorer: std::sync::Mutex::new(restorer),
        }));
        self
    }

    /// `Err(FAILED_PRECONDITION)` while a template's agent waits for
    /// `Restored`; first thing in every container and process call.
    fn check_restored(&self) -> ttrpc::Result<()> {
        match &self.template {
            Some(gate) if !gate.restored.load(Ordering::Acquire) => {
                Err(status(Code::FAILED_PRECONDITION, WAITING_FOR_RESTORED))
            }
            _ => Ok(()),
        }
    }

    /// Makes `Shutdown` run `quiesce` to completion before it replies, so the
    /// caller may stop the VM once it has a successful reply (the shim does).
    pub fn with_quiesce(mut self, quiesce: Quiesce) -> Self {
        self.quiesce = Some(quiesce);
        self
    }

    /// Waits (bounded by the stream timeout, all streams concurrently) for
    /// the stdio connections `stdio` names for process `exec_id` of
    /// `container_id`.
    async fn collect_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: Option<&pb::Stdio>,
    ) -> ttrpc::Result<ProcessStdio> {
        let default = pb::Stdio::default();
        let s = stdio.unwrap_or(&default);
        let take = |want: bool, stream: StdioStream| {
            let key = StreamKey::new(container_id, exec_id, stream);
            let streams = self.streams.clone();
            let timeout = self.stream_timeout;
            async move {
                if want {
                    streams.take(&key, timeout).await.map(Some)
                } else {
                    Ok(None)
                }
            }
        };
        let (stdin, stdout, stderr) = tokio::join!(
            take(s.stdin, StdioStream::Stdin),
            take(s.stdout, StdioStream::Stdout),
            take(s.stderr, StdioStream::Stderr)
        );
        // On error the streams already taken are dropped here (closed), so
        // the shim sees EOF instead of a hanging connection.
        Ok(ProcessStdio {
            stdin: stdin.map_err(map_io_err)?,
            stdout: stdout.map_err(map_io_err)?,
            stderr: stderr.map_err(map_io_err)?,
            terminal: s.terminal,
        })
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        let rootfs = if req.rootfs.is_empty() {
            PathBuf::from(SHARED_DIR)
                .join(&req.container_id)
                .join("rootfs")
        } else {
            PathBuf::from(&req.rootfs)
        };
        let stdio = self
            .collect_stdio(&req.container_id, "", req.stdio.as_ref())
            .await?;
        log::info!(
            "create container {} rootfs {}",
            req.container_id,
            rootfs.display()
        );
        let pid = self
            .manager
            .create(&req.container_id, &req.oci_spec, &rootfs, stdio)
            .await
            .map_err(map_err)?;
        Ok(pb::CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::StartContainerResponse> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        let pid = self
            .manager
            .start(&req.container_id)
            .await
            .map_err(map_err)?;
        Ok(pb::StartContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        self.manager
            .delete(&req.container_id)
            .await
            .map_err(map_err)?;
        let n = self.streams.discard_container(&req.container_id);
        if n > 0 {
            log::warn!(
                "container {}: closed {n} unclaimed stdio streams",
                req.container_id
            );
        }
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        self.manager
            .pause(&req.container_id)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        self.manager
            .resume(&req.container_id)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        self.manager
            .update(&req.container_id, &req.resources)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::ContainerStats> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        let s = self
            .manager
            .stats(&req.container_id)
            .await
            .map_err(map_err)?;
        Ok(pb::ContainerStats {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_periods: s.cpu_nr_periods,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            memory_usage: s.memory_usage,
            memory_limit: s.memory_limit,
            memory_swap_usage: s.memory_swap_usage,
            memory_swap_limit: s.memory_swap_limit,
            memory_anon: s.memory_anon,
            memory_file: s.memory_file,
            memory_oom_events: s.memory_oom_events,
            memory_oom_kill: s.memory_oom_kill,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            ..Default::default()
        })
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        let pids = self
            .manager
            .pids(&req.container_id)
            .await
            .map_err(map_err)?;
        Ok(pb::ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        check_exec_id(&req.exec_id, false)?;
        let stdio = self
            .collect_stdio(&req.container_id, &req.exec_id, req.stdio.as_ref())
            .await?;
        log::info!("exec {} in container {}", req.exec_id, req.container_id);
        let pid = self
            .manager
            .exec(&req.container_id, &req.exec_id, &req.process, stdio)
            .await
            .map_err(map_err)?;
        Ok(pb::ExecProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        check_exec_id(&req.exec_id, true)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("signal {}: not in 1..=64", req.signal),
                )
            })?;
        self.manager
            .signal(&req.container_id, &req.exec_id, signal, req.all)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        check_exec_id(&req.exec_id, true)?;
        let exit = self
            .manager
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(map_err)?;
        Ok(exit_to_pb(exit))
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizeTtyRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        check_exec_id(&req.exec_id, true)?;
        let (rows, cols) = match (u16::try_from(req.rows), u16::try_from(req.cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "tty size {}x{}: rows and cols must be <= 65535",
                        req.rows, req.cols
                    ),
                ))
            }
        };
        self.manager
            .resize_tty(&req.container_id, &req.exec_id, rows, cols)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_restored()?;
        check_container_id(&req.container_id)?;
        check_exec_id(&req.exec_id, true)?;
        self.manager
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map_err(map_err)?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<pb::OomEvent> {
        // One receiver shared by all callers, so events between two calls
        // are buffered rather than lost.
        let mut rx = self.oom_rx.lock().await;
        loop {
            match rx.recv().await {
                Ok(container_id) => {
                    return Ok(pb::OomEvent {
                        container_id,
                        ..Default::default()
                    })
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    log::warn!("OOM events: {n} dropped (nobody was waiting)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(status(Code::UNAVAILABLE, "OOM event source closed"))
                }
            }
        }
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<pb::VersionResponse> {
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok();
        let started = STARTED_AT_US.load(Ordering::Relaxed);
        // A request can be served between the listen(2) and main() storing
        // READY_AT_US: then "ready" is now.
        let ready = match READY_AT_US.load(Ordering::Relaxed) {
            0 => boottime_us(),
            t => t,
        };
        Ok(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release,
            api_version: API_VERSION,
            // smaps_rollup needs CONFIG_PROC_PAGE_MONITOR (guest-kernel/build.sh
            // requires it); without it, the approximate VmRSS.
            agent_rss_kib: rollup
                .as_deref()
                .and_then(|s| kib_field(s, "Rss:"))
                .or_else(|| {
                    std::fs::read_to_string("/proc/self/status")
                        .ok()
                        .and_then(|s| kib_field(&s, "VmRSS:"))
                })
                .unwrap_or(0),
            agent_rss_anon_kib: rollup
                .as_deref()
                .and_then(|s| kib_field(s, "Anonymous:"))
                .unwrap_or(0),
            started_at_us: started,
            start_to_ready_us: ready.saturating_sub(started),
            ..Default::default()
        })
    }

    async fn health(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<pb::HealthResponse> {
        Ok(pb::HealthResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn restored(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RestoredRequest,
    ) -> ttrpc::Result<Empty> {
        let Some(gate) = self.template.clone() else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "Restored: this agent was not started as a VM template (vmrt.template)",
            ));
        };
        let already = || {
            status(
                Code::FAILED_PRECONDITION,
                "Restored: already done (it is accepted once)",
            )
        };
        if gate.restored.load(Ordering::Acquire) {
            return Err(already());
        }
        let input = template::validate_restored(req.realtime_ns, &req.entropy)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("Restored: {e}")))?;
        // In a task of its own: ttrpc drops this handler once the request's
        // timeout has passed, and steps half done must still be recorded.
        let work = tokio::spawn(async move {
            let _one_at_a_time = gate.serial.lock().await;
            if gate.restored.load(Ordering::Acquire) {
                return Err(already());
            }
            let t0 = std::time::Instant::now();
            let g = gate.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                g.restorer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .restore(&input)
            })
            .await;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            match outcome {
                Ok(Ok(done)) => {
                    gate.restored.store(true, Ordering::Release);
                    if done.guest {
                        log::info!(
                            "restored: clock set, CRNG reseeded, {} share(s) mounted in {ms:.1} ms",
                            done.shares
                        );
                    } else {
                        log::info!(
                            "restored in {ms:.1} ms (not PID 1: clock, CRNG and shares left alone)"
                        );
                    }
                    Ok(Empty::new())
                }
                Ok(Err(e)) => {
                    log::error!("Restored failed: {e}");
                    Err(status(Code::INTERNAL, format!("Restored: {e}")))
                }
                Err(e) => Err(status(Code::INTERNAL, format!("Restored: {e}"))),
            }
        });
        match work.await {
            Ok(r) => r,
            Err(e) => Err(status(Code::INTERNAL, format!("Restored: {e}"))),
        }
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        log::info!("Shutdown requested");
        // In a task of its own: ttrpc drops this handler once the request's
        // timeout has passed, and the VM must be shut down all the same.
        let quiesce = self.quiesce.clone();
        let shutdown_tx = self.shutdown_tx.clone();
        let work = tokio::spawn(async move {
            let outcome = match quiesce {
                None => Ok(None),
                Some(q) => {
                    let t0 = std::time::Instant::now();
                    match tokio::task::spawn_blocking(move || q()).await {
                        Ok(Ok(())) => Ok(Some(t0.elapsed())),
                        Ok(Err(left)) => Err(left),
                        Err(e) => Err(format!("quiescing failed: {e}")),
                    }
                }
            };
            // try_send: a second Shutdown while one is in progress is a no-op.
            let _ = shutdown_tx.try_send(());
            outcome
        });
        match work.await {
            Ok(Ok(None)) => Ok(Empty::new()),
            Ok(Ok(Some(took))) => {
                log::info!(
                    "Shutdown: processes stopped, shares synced and unmounted in {:.1} ms",
                    took.as_secs_f64() * 1000.0
                );
                Ok(Empty::new())
            }
            Ok(Err(left)) => {
                log::warn!("Shutdown: guest not quiesced: {left}; rebooting");
                Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("guest not quiesced ({left}); the VM reboots by itself"),
                ))
            }
            Err(e) => Err(status(Code::INTERNAL, format!("Shutdown: {e}"))),
        }
    }
}

/// Binds the ttrpc server at `addr` (`vsock://-1:<port>` or
/// `unix://<path>`, as ttrpc's `Server::bind`) with `service` registered,
/// and starts accepting. Keep the returned server alive.
///
/// # Errors
/// The ttrpc bind/start error.
pub async fn start(
    addr: &str,
    service: AgentService,
) -> ttrpc::Result<ttrpc::asynchronous::Server> {
    let services = agent_ttrpc::create_agent(Arc::new(service));
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(addr)?
        .register_service(services);
    server.start().await?;
    log::info!("agent API: listening on {addr}");
    Ok(server)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_fields_from_smaps_rollup() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  4004 kB\nPss:  4000 kB\n\
                      Pss_Anon:  552 kB\nAnonymous:  552 kB\n";
        assert_eq!(kib_field(rollup, "Rss:"), Some(4004));
        assert_eq!(kib_field(rollup, "Anonymous:"), Some(552));
        assert_eq!(kib_field("Name:\tx\n", "Rss:"), None);
        assert_eq!(kib_field("Rss:\t12 MB\n", "Rss:"), None);
        // The real file: the anonymous part is part of the whole, and the page
        // tables' count is at least the pages this test just touched.
        let buf = std::hint::black_box(vec![1u8; 8 << 20]);
        let own = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
        let (rss, anon) = (
            kib_field(&own, "Rss:").unwrap(),
            kib_field(&own, "Anonymous:").unwrap(),
        );
        assert!(anon <= rss && anon >= 8 << 10, "rss {rss} anon {anon}");
        drop(buf);
    }

    use super::*;

    #[test]
    fn error_codes() {
        let cases = [
            (container::Error::NotFound("c".into()), Code::NOT_FOUND),
            (
                container::Error::AlreadyExists("c".into()),
                Code::ALREADY_EXISTS,
            ),
            (
                container::Error::InvalidSpec {
                    field: "process.args".into(),
                    reason: "empty".into(),
                },
                Code::INVALID_ARGUMENT,
            ),
            (
                container::Error::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (container::Error::Internal("x".into()), Code::INTERNAL),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            match map_err(e) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code);
                    assert_eq!(s.message(), msg);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn id_checks() {
        assert!(check_container_id("abc-1.2_3").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_container_id(bad).is_err(), "{bad}");
        }
        assert!(check_exec_id("", true).is_ok());
        assert!(check_exec_id("", false).is_err());
        assert!(check_exec_id("-", false).is_err());
        assert!(check_exec_id("e1", false).is_ok());
    }

    #[test]
    fn exit_conversion() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let r = exit_to_pb(ExitInfo {
            status: 137,
            exited_at: at,
        });
        assert_eq!(r.exit_status, 137);
        assert_eq!(r.exited_at_ns, 1_700_000_000_123_456_789);
    }
}
