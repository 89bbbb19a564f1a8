//! containerd Task service (shim v2 API, `containerd.task.v2.Task` /
//! `containerd.task.v3.Task`) over containers running in vmrt sandboxes.
//!
//! Each container lives in a [`Sandbox`]; `ctr run` gives one sandbox per container
//! (sandbox id = container id). Processes are the container's init process
//! (exec id `""`) and exec'd processes. Every started process has a monitor task that
//! waits for its exit through the agent (or for the VMM to die: exit status 255),
//! waits for its stdout/stderr to be copied completely, records the exit and
//! publishes TaskExit.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use containerd_shim::{
    api::{
        CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
        DeleteRequest, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
        PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
        StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
        WaitRequest, WaitResponse,
    },
    asynchronous::publisher::RemotePublisher,
    protos::{
        api::CheckpointTaskRequest,
        cgroups_v2::metrics as cg2,
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
            TaskPaused, TaskResumed, TaskStart,
        },
        protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
        topics,
        types::task::{ProcessInfo, Status},
    },
    util::convert_to_any,
    Context, DeleteResponse, ExitSignal, TtrpcContext, TtrpcResult,
};
use tokio::sync::watch;
use vmrt_protocol::agent as pb;

use crate::{
    agent::{ctx, RPC_TIMEOUT},
    config::config_path_from_options,
    errors::{rpc, Error, Result},
    io::{ProcessIo, StdioPaths},
    preboot::{boot_sandbox, Preboot},
    sandbox::{Sandbox, VMM_DEATH_EXIT_STATUS},
};

/// Name of the file in the bundle that records the sandbox directory, so the
/// `delete` action of a later shim binary finds it after a crash.
pub const BUNDLE_SANDBOX_FILE: &str = "vmrt-sandbox";
/// How long a sandbox booted at shim start waits for its Create before it is torn
/// down (containerd sends Create right after `start` returns).
const PREBOOT_CLAIM_DEADLINE: Duration = Duration::from_secs(120);
/// How long after an exit the shim waits for stdout/stderr to drain.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Drain limit when the VMM is dead (the streams are gone anyway).
const OUTPUT_DRAIN_LIMIT_DEAD: Duration = Duration::from_secs(2);

/// Exit status and time of a process.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// Exit time.
    pub at: Timestamp,
}

/// Converts Unix nanoseconds to a protobuf timestamp (0 = now).
pub fn timestamp_from_ns(ns: u64) -> Timestamp {
    let ns = if ns == 0 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    } else {
        ns
    };
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

/// Maps the outcome of the agent's WaitProcess to an exit: the agent's status, or
/// [`VMM_DEATH_EXIT_STATUS`] (255) if the call failed or the VMM exited first.
pub fn exit_from_wait(r: Option<ttrpc::Result<pb::WaitProcessResponse>>) -> ExitInfo {
    match r {
        Some(Ok(w)) => ExitInfo {
            status: w.exit_status,
            at: timestamp_from_ns(w.exited_at_ns),
        },
        _ => ExitInfo {
            status: VMM_DEATH_EXIT_STATUS,
            at: timestamp_from_ns(0),
        },
    }
}

/// Process states as containerd knows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

impl From<ProcStatus> for Status {
    fn from(s: ProcStatus) -> Status {
        match s {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Paused => Status::PAUSED,
            ProcStatus::Stopped => Status::STOPPED,
        }
    }
}

/// One process: the init process (exec id "") or an exec.
struct Process {
    exec_id: String,
    stdio: StdioPaths,
    /// Exec: OCI `process` JSON.
    spec: Vec<u8>,
    state: Mutex<(ProcStatus, u32)>,
    exit: watch::Sender<Option<ExitInfo>>,
    io: tokio::sync::Mutex<Option<ProcessIo>>,
}

impl Process {
    fn new(exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Arc<Process> {
        Arc::new(Process {
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new((ProcStatus::Created, 0)),
            exit: watch::channel(None).0,
            io: tokio::sync::Mutex::new(None),
        })
    }

    fn status(&self) -> ProcStatus {
        self.state.lock().unwrap().0
    }

    fn pid(&self) -> u32 {
        self.state.lock().unwrap().1
    }

    fn set(&self, status: ProcStatus, pid: Option<u32>) {
        let mut s = self.state.lock().unwrap();
        s.0 = status;
        if let Some(p) = pid {
            s.1 = p;
        }
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await.map(|e| e.clone());
        match r {
            Ok(Some(e)) => e,
            _ => exit_from_wait(None),
        }
    }
}

/// A container in a sandbox.
struct Container {
    id: String,
    bundle: String,
    sandbox: Arc<Sandbox>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!("exec {exec_id} of container {} not found", self.id))
            })
    }
}

/// Shared state of the task service.
struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<std::collections::HashSet<String>>,
    /// The sandbox booted at shim start, until Create takes it. An async mutex:
    /// whoever discards it holds the lock until the teardown is done, so a Create
    /// that comes meanwhile finds the sandbox directory gone.
    preboot: tokio::sync::Mutex<Option<Preboot>>,
    exit: Arc<ExitSignal>,
}

/// The Task service registered with the shim's ttrpc server.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl Inner {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("publish {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    /// Waits for `p` to exit, drains its output, records the exit, publishes TaskExit.
    async fn monitor(self: Arc<Self>, c: Arc<Container>, p: Arc<Process>) {
        let req = pb::ProcessRequest {
            container_id: c.id.clone(),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        };
        let agent = c.sandbox.agent().clone();
        let r = tokio::select! {
            r = agent.client().wait_process(ctx(None), &req) => Some(r),
            _ = c.sandbox.wait_vmm_exit() => None,
        };
        if let Some(Err(e)) = &r {
            log::warn!("{}/{}: WaitProcess failed: {e}", c.id, p.exec_id);
        }
        let vmm_dead = c.sandbox.vmm_exited().is_some();
        let exit = exit_from_wait(if vmm_dead { None } else { r });
        let limit = if vmm_dead {
            OUTPUT_DRAIN_LIMIT_DEAD
        } else {
            OUTPUT_DRAIN_LIMIT
        };
        let copied = match p.io.lock().await.as_mut() {
            Some(io) => io.wait_output(limit).await,
            None => 0,
        };
        log::info!(
            "{}/{}: exited with status {} ({} output bytes)",
            c.id,
            p.exec_id,
            exit.status,
            copied
        );
        p.set(ProcStatus::Stopped, None);
        let _ = p.exit.send(Some(exit.clone()));
        let id = if p.exec_id.is_empty() {
            c.id.clone()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: c.id.clone(),
                id,
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Forwards the agent's OOM events of a sandbox as TaskOOM until the VMM exits.
    async fn watch_oom(self: Arc<Self>, sandbox: Arc<Sandbox>) {
        loop {
            let empty = pb::Empty::new();
            let r = tokio::select! {
                r = sandbox.agent().client().get_oom_event(ctx(None), &empty) => r,
                _ = sandbox.wait_vmm_exit() => return,
            };
            match r {
                Ok(ev) => {
                    log::info!("container {} OOM", ev.container_id);
                    self.publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id: ev.container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
                }
                Err(e) => {
                    log::debug!("sandbox {}: GetOomEvent: {e}", sandbox.id);
                    if sandbox.vmm_exited().is_some() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn create(self: &Arc<Self>, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        let id = req.id.clone();
        if !vmrt_protocol::stream::is_valid_id(&id) {
            return Err(Error::InvalidArgument(format!(
                "container id {id:?} must be 1..=128 characters of [A-Za-z0-9_.-]"
            )));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "vmrt does not support restoring from a checkpoint".into(),
            ));
        }
        {
            let containers = self.containers.lock().unwrap();
            let mut creating = self.creating.lock().unwrap();
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(Error::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
        }
        let r = self.create_inner(&req).await;
        self.creating.lock().unwrap().remove(&id);
        let c = r?;
        let pid = c.init.pid();
        self.containers
            .lock()
            .unwrap()
            .insert(id.clone(), c.clone());
        tokio::spawn(self.clone().watch_oom(c.sandbox.clone()));
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn create_inner(&self, req: &CreateTaskRequest) -> Result<Arc<Container>> {
        let (config_path, spec_bytes, bundle, bundle_rootfs) = read_create_request(req)?;
        // One VM per container for now; the sandbox id is the container id.
        let preboot = self.preboot.lock().await.take();
        let mut claimed = None;
        if let Some(p) = preboot {
            if p.fits(&req.id, config_path.as_deref()) {
                log::info!("create {}: using the sandbox booted at shim start", req.id);
                claimed = Some(p.claim().await?);
            } else {
                log::info!(
                    "create {}: the sandbox booted at shim start was for another id or config",
                    req.id
                );
                p.discard().await;
            }
        }
        // A VM booted at shim start may have died while it waited for Create: say
        // why, clear it away and boot another.
        if let Some(status) = claimed.as_ref().and_then(|s| s.vmm_exited()) {
            let dead = claimed.take().expect("checked above");
            log::warn!(
                "create {}: the VMM booted at shim start exited with status {status} before Create; booting another; {}",
                req.id,
                dead.diagnostics()
            );
            if let Err(e) = dead.shutdown().await {
                log::error!("create {}: teardown of the dead sandbox: {e}", req.id);
            }
            let _ = std::fs::remove_file(bundle.join(BUNDLE_SANDBOX_FILE));
        }
        let sandbox = match claimed {
            Some(s) => s,
            None => {
                let never = watch::channel(false).1;
                boot_sandbox(&req.id, config_path.as_deref(), &bundle, never).await?
            }
        };
        let sandbox = Arc::new(sandbox);
        match self
            .create_in_sandbox(req, &sandbox, spec_bytes, &bundle_rootfs)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) => {
                log::error!(
                    "create {}: {e}; tearing the sandbox down; guest console (last {} lines):\n{}",
                    req.id,
                    crate::sandbox::CONSOLE_TAIL_LINES,
                    crate::sandbox::tail(&sandbox.dir.join("console.log"), crate::sandbox::CONSOLE_TAIL_LINES)
                );
                if let Err(e2) = sandbox.remove_container(&req.id) {
                    log::error!("create {}: cleanup: {e2}", req.id);
                }
                if let Err(e2) = sandbox.shutdown().await {
                    log::error!("create {}: sandbox teardown: {e2}", req.id);
                }
                let _ = std::fs::remove_file(bundle.join(BUNDLE_SANDBOX_FILE));
                Err(e)
            }
        }
    }

    async fn create_in_sandbox(
        &self,
        req: &CreateTaskRequest,
        sandbox: &Arc<Sandbox>,
        spec_bytes: Vec<u8>,
        bundle_rootfs: &Path,
    ) -> Result<Arc<Container>> {
        let spec_bytes = sandbox
            .add_container(&req.id, &req.rootfs, bundle_rootfs, &spec_bytes)
            .await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", stdio.clone(), Vec::new());
        let creq = pb::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: spec_bytes,
            rootfs: Sandbox::rootfs_guest_path(&req.id),
            stdio: Some(agent_stdio(&stdio)).into(),
            ..Default::default()
        };
        let agent = sandbox.agent().clone();
        let resp = start_with_io(
            agent
                .client()
                .create_container(ctx(Some(RPC_TIMEOUT)), &creq),
            "CreateContainer",
            agent.uds(),
            &req.id,
            "",
            &stdio,
            &init,
        )
        .await?;
        init.set(ProcStatus::Created, Some(resp.pid));
        Ok(Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            sandbox: sandbox.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
        }))
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> Result<StartResponse> {
        let c = self.container(&req.id)?;
        c.sandbox.check_running()?;
        let p = c.process(&req.exec_id)?;
        if p.status() != ProcStatus::Created {
            return Err(Error::FailedPrecondition(format!(
                "{}/{} cannot be started: it is {:?}",
                req.id,
                req.exec_id,
                p.status()
            )));
        }
        let agent = c.sandbox.agent().clone();
        let pid = if req.exec_id.is_empty() {
            let r = agent
                .client()
                .start_container(
                    ctx(Some(RPC_TIMEOUT)),
                    &pb::ContainerRequest {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                )
                .await;
            rpc("StartContainer", r)?.pid
        } else {
            let ereq = pb::ExecProcessRequest {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                process: p.spec.clone(),
                stdio: Some(agent_stdio(&p.stdio)).into(),
                ..Default::default()
            };
            start_with_io(
                agent.client().exec_process(ctx(Some(RPC_TIMEOUT)), &ereq),
                "ExecProcess",
                agent.uds(),
                &c.id,
                &p.exec_id,
                &p.stdio,
                &p,
            )
            .await?
            .pid
        };
        p.set(ProcStatus::Running, Some(pid));
        // One task publishes the start and then monitors the process: a process
        // that ends at once still has TaskStart/TaskExecStarted before its
        // TaskExit, and the monitor runs even if this request is abandoned.
        let this = self.clone();
        let (c2, p2, exec_id) = (c.clone(), p.clone(), req.exec_id.clone());
        tokio::spawn(async move {
            if exec_id.is_empty() {
                this.publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: c2.id.clone(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
            } else {
                this.publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: c2.id.clone(),
                        exec_id,
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
            }
            this.monitor(c2, p2).await;
        });
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(self: &Arc<Self>, req: DeleteRequest) -> Result<DeleteResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if matches!(p.status(), ProcStatus::Running | ProcStatus::Paused)
            && c.sandbox.vmm_exited().is_none()
        {
            return Err(Error::FailedPrecondition(format!(
                "{}/{} is still running; kill it first",
                req.id, req.exec_id
            )));
        }
        let exit = p.exit_info().unwrap_or_else(|| ExitInfo {
            status: 0,
            at: timestamp_from_ns(0),
        });
        if !req.exec_id.is_empty() {
            c.execs.lock().unwrap().remove(&req.exec_id);
            if let Some(mut io) = p.io.lock().await.take() {
                io.abort();
            }
            return Ok(DeleteResponse {
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            });
        }
        // Init: remove the container from the guest, its rootfs from the share, and the
        // sandbox with it once it holds no container. The sandbox's last container is
        // not removed in the guest first: the Shutdown below stops every guest process
        // and syncs and unmounts the share, and the VM goes with it (an agent round
        // trip and libcontainer's cleanup less on every `ctr run --rm`).
        if c.sandbox.vmm_exited().is_none() && !c.sandbox.holds_only(&c.id) {
            let r = c
                .sandbox
                .agent()
                .client()
                .remove_container(
                    ctx(Some(RPC_TIMEOUT)),
                    &pb::ContainerRequest {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                )
                .await;
            if let Err(e) = r {
                log::warn!("RemoveContainer {}: {e}", c.id);
            }
        }
        if let Some(mut io) = p.io.lock().await.take() {
            io.abort();
        }
        for (_, e) in c.execs.lock().unwrap().drain() {
            if let Ok(mut io) = e.io.try_lock() {
                io.take();
            }
        }
        let left = match c.sandbox.remove_container(&c.id) {
            Ok(n) => n,
            Err(e) => {
                log::error!("delete {}: {e}", c.id);
                0
            }
        };
        let mut result = Ok(());
        if left == 0 {
            result = c.sandbox.shutdown().await;
        }
        let _ = std::fs::remove_file(Path::new(&c.bundle).join(BUNDLE_SANDBOX_FILE));
        self.containers.lock().unwrap().remove(&c.id);
        result?;
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: Some(exit.at.clone()).into(),
                id: c.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(DeleteResponse {
            pid: p.pid(),
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn exec(self: &Arc<Self>, req: ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        c.sandbox.check_running()?;
        if !vmrt_protocol::stream::is_valid_id(&req.exec_id) || req.exec_id == "-" {
            return Err(Error::InvalidArgument(format!(
                "exec id {:?} must be 1..=128 characters of [A-Za-z0-9_.-]",
                req.exec_id
            )));
        }
        let spec =
            req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
                Error::InvalidArgument("exec request without process spec".into())
            })?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| Error::InvalidArgument(format!("malformed exec process spec: {e}")))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = c.execs.lock().unwrap();
            if execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!(
                    "exec {} already exists in {}",
                    req.exec_id, req.id
                )));
            }
            execs.insert(req.exec_id.clone(), Process::new(&req.exec_id, stdio, spec));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    async fn kill(&self, req: KillRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.status() == ProcStatus::Stopped && !req.all {
            return Err(Error::NotFound(format!(
                "process {}/{} already finished",
                req.id, req.exec_id
            )));
        }
        c.sandbox.check_running()?;
        let r = c
            .sandbox
            .agent()
            .client()
            .signal_process(
                ctx(Some(RPC_TIMEOUT)),
                &pb::SignalProcessRequest {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    signal: req.signal,
                    all: req.all,
                    ..Default::default()
                },
            )
            .await;
        rpc("SignalProcess", r)?;
        Ok(())
    }

    fn state(&self, req: StateRequest) -> Result<StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exit_info();
        // A running exec of a paused container is paused too (as runc's shim
        // reports it): the whole cgroup is frozen.
        let status = match p.status() {
            ProcStatus::Running if c.init.status() == ProcStatus::Paused => ProcStatus::Paused,
            s => s,
        };
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: p.pid(),
            status: Status::from(status).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn pause_resume(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        c.sandbox.check_running()?;
        let creq = pb::ContainerRequest {
            container_id: c.id.clone(),
            ..Default::default()
        };
        let client = c.sandbox.agent().client();
        if pause {
            if c.init.status() != ProcStatus::Running {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            rpc(
                "PauseContainer",
                client.pause_container(ctx(Some(RPC_TIMEOUT)), &creq).await,
            )?;
            c.init.set(ProcStatus::Paused, None);
            self.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: c.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            if c.init.status() != ProcStatus::Paused {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not paused"
                )));
            }
            rpc(
                "ResumeContainer",
                client.resume_container(ctx(Some(RPC_TIMEOUT)), &creq).await,
            )?;
            c.init.set(ProcStatus::Running, None);
            self.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: c.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<StatsResponse> {
        let c = self.container(id)?;
        c.sandbox.check_running()?;
        let s = rpc(
            "StatsContainer",
            c.sandbox
                .agent()
                .client()
                .stats_container(
                    ctx(Some(RPC_TIMEOUT)),
                    &pb::ContainerRequest {
                        container_id: c.id.clone(),
                        ..Default::default()
                    },
                )
                .await,
        )?;
        let any = convert_to_any(Box::new(metrics_from_stats(&s)))
            .map_err(|e| Error::Internal(format!("encode metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }
}

/// Agent `Stdio` flags for a process's stdio paths.
fn agent_stdio(p: &StdioPaths) -> pb::Stdio {
    let (stdin, stdout, stderr) = p.streams();
    pb::Stdio {
        stdin,
        stdout,
        stderr,
        terminal: p.terminal,
        ..Default::default()
    }
}

/// Runs a process-creating RPC and connects its stdio streams concurrently (the agent
/// waits for the streams the request names before starting the process). A stdio
/// failure aborts the RPC. The stdio copies are stored in `p`.
async fn start_with_io<T>(
    call: impl std::future::Future<Output = ttrpc::Result<T>>,
    method: &'static str,
    uds: &Path,
    container_id: &str,
    exec_id: &str,
    stdio: &StdioPaths,
    p: &Process,
) -> Result<T> {
    let io = ProcessIo::start(uds, container_id, exec_id, stdio);
    tokio::pin!(call);
    tokio::pin!(io);
    let mut io_result: Option<ProcessIo> = None;
    let resp = loop {
        tokio::select! {
            r = &mut call, if true => {
                let r = rpc(method, r)?;
                if io_result.is_none() {
                    // The RPC answered first: finish connecting the streams.
                    io_result = Some((&mut io).await?);
                }
                break r;
            }
            r = &mut io, if io_result.is_none() => {
                io_result = Some(r?);
            }
        }
    };
    *p.io.lock().await = io_result;
    Ok(resp)
}

/// Builds containerd's cgroup v2 metrics (`io.containerd.cgroups.v2.Metrics`, what
/// `ctr task metrics` decodes) from the agent's figures.
pub fn metrics_from_stats(s: &pb::ContainerStats) -> cg2::Metrics {
    cg2::Metrics {
        pids: Some(cg2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(cg2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(cg2::MemoryStat {
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            swap_usage: s.memory_swap_usage,
            swap_limit: s.memory_swap_limit,
            anon: s.memory_anon,
            file: s.memory_file,
            ..Default::default()
        })
        .into(),
        memory_events: Some(cg2::MemoryEvents {
            oom: s.memory_oom_events,
            oom_kill: s.memory_oom_kill,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

impl TaskService {
    /// Creates the service; `exit` is signalled by Shutdown when no container is left.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                publisher,
                containers: Mutex::new(HashMap::new()),
                creating: Mutex::new(Default::default()),
                preboot: tokio::sync::Mutex::new(None),
                exit,
            }),
        }
    }
}

/// What Create needs from its request before a sandbox exists: the `ConfigPath`
/// option, the OCI spec (read from `<bundle>/config.json` and checked to parse), the
/// bundle and the host path of the bundle's rootfs.
///
/// Errors: [`Error::Config`] for malformed options, [`Error::InvalidArgument`] for a
/// missing or malformed spec.
fn read_create_request(
    req: &CreateTaskRequest,
) -> Result<(Option<PathBuf>, Vec<u8>, PathBuf, PathBuf)> {
    let config_path = config_path_from_options(req.options.as_ref())?;
    let bundle = PathBuf::from(&req.bundle);
    let spec_path = bundle.join("config.json");
    let spec_bytes = std::fs::read(&spec_path).map_err(|e| {
        Error::InvalidArgument(format!("read OCI spec {}: {e}", spec_path.display()))
    })?;
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(&spec_bytes).map_err(|e| {
        Error::InvalidArgument(format!("malformed OCI spec {}: {e}", spec_path.display()))
    })?;
    let bundle_rootfs = spec
        .root()
        .as_ref()
        .map(|r| bundle.join(r.path()))
        .unwrap_or_else(|| bundle.join("rootfs"));
    Ok((config_path, spec_bytes, bundle, bundle_rootfs))
}

fn done<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::warn!("{e}");
        e.into()
    })
}

#[async_trait]
impl containerd_shim::Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        done(self.inner.state(req))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        log::info!("Create {} bundle {}", req.id, req.bundle);
        // Create runs to its end in a task of its own: ttrpc drops a handler once its
        // request's deadline passes, and a Create cut off while it boots or mounts
        // would leave its VM and mounts behind.
        let inner = self.inner.clone();
        let r = tokio::spawn(async move { inner.create(req).await })
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("create: {e}"))));
        done(r)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        log::info!("Start {}/{}", req.id, req.exec_id);
        done(self.inner.start(req).await)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        log::info!("Delete {}/{}", req.id, req.exec_id);
        done(self.inner.delete(req).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let r = async {
            let c = self.inner.container(&req.id)?;
            c.sandbox.check_running()?;
            let l = rpc(
                "ListProcesses",
                c.sandbox
                    .agent()
                    .client()
                    .list_processes(
                        ctx(Some(RPC_TIMEOUT)),
                        &pb::ContainerRequest {
                            container_id: c.id.clone(),
                            ..Default::default()
                        },
                    )
                    .await,
            )?;
            Ok(PidsResponse {
                processes: l
                    .pids
                    .into_iter()
                    .map(|pid| ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        done(r.await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        done(
            self.inner
                .pause_resume(&req.id, true)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        done(
            self.inner
                .pause_resume(&req.id, false)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        done(Err(Error::Unimplemented(
            "checkpoint is not implemented by vmrt".into(),
        )))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        log::info!(
            "Kill {}/{} signal {} all {}",
            req.id,
            req.exec_id,
            req.signal,
            req.all
        );
        done(self.inner.kill(req).await.map(|_| Empty::new()))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        log::info!("Exec {}/{}", req.id, req.exec_id);
        done(self.inner.exec(req).await.map(|_| Empty::new()))
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let r = async {
            let c = self.inner.container(&req.id)?;
            c.process(&req.exec_id)?;
            c.sandbox.check_running()?;
            let r = c
                .sandbox
                .agent()
                .client()
                .resize_tty(
                    ctx(Some(RPC_TIMEOUT)),
                    &pb::ResizeTtyRequest {
                        container_id: c.id.clone(),
                        exec_id: req.exec_id.clone(),
                        rows: req.height,
                        cols: req.width,
                        ..Default::default()
                    },
                )
                .await;
            rpc("ResizeTty", r)?;
            Ok(Empty::new())
        };
        done(r.await)
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let r = async {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if req.stdin {
                if let Some(io) = p.io.lock().await.as_mut() {
                    io.close_stdin();
                }
                if c.sandbox.vmm_exited().is_none() && p.status() != ProcStatus::Stopped {
                    let r = c
                        .sandbox
                        .agent()
                        .client()
                        .close_stdin(
                            ctx(Some(RPC_TIMEOUT)),
                            &pb::ProcessRequest {
                                container_id: c.id.clone(),
                                exec_id: req.exec_id.clone(),
                                ..Default::default()
                            },
                        )
                        .await;
                    if let Err(e) = r {
                        log::debug!("CloseStdin {}/{}: {e}", c.id, req.exec_id);
                    }
                }
            }
            Ok(Empty::new())
        };
        done(r.await)
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let r = async {
            let c = self.inner.container(&req.id)?;
            c.sandbox.check_running()?;
            let resources = req
                .resources
                .as_ref()
                .map(|a| a.value.clone())
                .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
                .map_err(|e| Error::InvalidArgument(format!("malformed linux resources: {e}")))?;
            let r = c
                .sandbox
                .agent()
                .client()
                .update_container(
                    ctx(Some(RPC_TIMEOUT)),
                    &pb::UpdateContainerRequest {
                        container_id: c.id.clone(),
                        resources,
                        ..Default::default()
                    },
                )
                .await;
            rpc("UpdateContainer", r)?;
            Ok(Empty::new())
        };
        done(r.await)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let r = async {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let e = p.wait().await;
            Ok(WaitResponse {
                exit_status: e.status,
                exited_at: Some(e.at).into(),
                ..Default::default()
            })
        };
        done(r.await)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        done(self.inner.stats(&req.id).await)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .inner
            .container(&req.id)
            .map(|c| c.init.pid())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let left: Vec<Arc<Container>> = self
            .inner
            .containers
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        if !left.is_empty() || !self.inner.creating.lock().unwrap().is_empty() {
            log::info!("Shutdown: {} container(s) left, staying up", left.len());
            return Ok(Empty::new());
        }
        log::info!("Shutdown: no container left, exiting");
        self.inner.exit.signal();
        Ok(Empty::new())
    }
}

impl TaskService {
    /// Hands the service the sandbox booting since shim start, for the first Create.
    /// If no Create takes it within [`PREBOOT_CLAIM_DEADLINE`] (containerd went away
    /// between `start` and Create), it is torn down.
    pub async fn set_preboot(&self, preboot: Preboot) {
        self.set_preboot_until(preboot, PREBOOT_CLAIM_DEADLINE).await;
    }

    /// [`TaskService::set_preboot`] with the claim deadline given.
    async fn set_preboot_until(&self, preboot: Preboot, deadline: Duration) {
        *self.inner.preboot.lock().await = Some(preboot);
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let Some(inner) = inner.upgrade() else { return };
            let mut slot = inner.preboot.lock().await;
            if let Some(p) = slot.take() {
                log::warn!(
                    "no Create within {:.1} s of shim start; tearing the sandbox booted for it down",
                    deadline.as_secs_f64()
                );
                p.discard().await;
            }
        });
    }

    /// Tears down every sandbox still present, and one booted at shim start that no
    /// Create took (shim exit path).
    pub async fn teardown_all(&self) {
        let mut preboot = self.inner.preboot.lock().await;
        if let Some(p) = preboot.take() {
            p.discard().await;
        }
        drop(preboot);
        let all: Vec<Arc<Container>> = self
            .inner
            .containers
            .lock()
            .unwrap()
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in all {
            let _ = c.sandbox.remove_container(&c.id);
            if let Err(e) = c.sandbox.shutdown().await {
                log::error!("teardown {}: {e}", c.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;

    /// A sandbox booted at shim start that no Create claims by the deadline
    /// (containerd went away between `start` and Create) is torn down while it
    /// still waits for its agent: the VMM is killed and reaped, the sandbox
    /// directory and the bundle's record are gone.
    #[tokio::test]
    async fn an_unclaimed_preboot_is_torn_down_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let fake = crate::sandbox::fake_vmm::install(d.path(), crate::sandbox::fake_vmm::SLEEPS);
        let bundle = d.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let mut c = crate::config::Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 600_000;
        let sb = c.runtime.sandbox_dir.join("pc1");
        // containerd's event socket, so the service can be made; nothing is published.
        let events = d.path().join("events.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&events).unwrap();
        let publisher = RemotePublisher::new(events.to_string_lossy()).await.unwrap();
        let service = TaskService::new("default", publisher, Arc::new(ExitSignal::default()));
        let p = Preboot::spawn_with("pc1", None, &bundle, {
            let (c, fake, bundle) = (c.clone(), fake.clone(), bundle.clone());
            move |cancel| async move {
                crate::preboot::start_recorded("pc1", &c, &fake, &bundle, cancel).await
            }
        });
        let started = std::time::Instant::now();
        service.set_preboot_until(p, Duration::from_millis(1500)).await;
        let pid_file = d.path().join("fake.pid");
        while !pid_file.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "no VMM started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(bundle.join(BUNDLE_SANDBOX_FILE).exists());
        // Still booting before the deadline; gone after it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(sb.exists());
        while sb.exists() || service.inner.preboot.lock().await.is_some() {
            assert!(started.elapsed() < Duration::from_secs(20), "not torn down");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert!(!bundle.join(BUNDLE_SANDBOX_FILE).exists());
        crate::sandbox::fake_vmm::assert_gone(&pid_file);
    }

    #[test]
    fn vmm_death_maps_to_255() {
        let e = exit_from_wait(None);
        assert_eq!(e.status, 255);
        assert!(e.at.seconds > 1_600_000_000);
        let e = exit_from_wait(Some(Err(ttrpc::Error::RemoteClosed)));
        assert_eq!(e.status, 255);
        let ok = pb::WaitProcessResponse {
            exit_status: 137,
            exited_at_ns: 1_700_000_000_123_456_789,
            ..Default::default()
        };
        let e = exit_from_wait(Some(Ok(ok)));
        assert_eq!(e.status, 137);
        assert_eq!((e.at.seconds, e.at.nanos), (1_700_000_000, 123_456_789));
    }

    #[tokio::test]
    async fn process_wait_sees_the_recorded_exit() {
        let p = Process::new("e1", StdioPaths::default(), vec![]);
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.wait().await });
        tokio::task::yield_now().await;
        let _ = p.exit.send(Some(ExitInfo {
            status: 3,
            at: timestamp_from_ns(5),
        }));
        assert_eq!(waiter.await.unwrap().status, 3);
        assert_eq!(p.wait().await.status, 3);
    }

    #[test]
    fn metrics_are_cgroup_v2_metrics_any() {
        let s = pb::ContainerStats {
            cpu_usage_usec: 10,
            memory_usage: 4096,
            memory_limit: 8192,
            pids_current: 2,
            memory_oom_kill: 1,
            ..Default::default()
        };
        let any = convert_to_any(Box::new(metrics_from_stats(&s))).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = cg2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 10);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 8192);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
    }

    #[test]
    fn agent_stdio_flags() {
        let s = agent_stdio(&StdioPaths {
            stdin: "".into(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: true,
        });
        assert!(!s.stdin && s.stdout && !s.stderr && s.terminal);
    }
}
