//! The sandbox: one microVM (a `vmrt-vmm` process) with its console, hybrid vsock socket,
//! virtio-fs share directory and agent connection, holding one or more containers.
//!
//! Layout (docs/contracts.md "Sandbox directory"): `<sandbox_dir>/<sandbox_id>/` with
//! `vm.json`, `console.log` (guest serial), `vmm.log` (VMM stdout/stderr), `vsock.sock`,
//! `vmm.pid`, `vmm.lock`, `shared/` (share root, tag `vmrtshared`) and
//! `shared/<container_id>/rootfs` (container rootfs mounts).
//!
//! `vmm.lock` is `flock(2)`ed by the shim and the lock is inherited by the VMM, so it is
//! held exactly while the VMM lives. Cleanup after a crashed shim kills the pid in
//! `vmm.pid` only while the lock is held: no `/proc` lookup (which is wrong when `/proc`
//! belongs to another pid namespace) and no risk of killing a reused pid.
//!
//! Teardown ([`Sandbox::shutdown`], and [`cleanup_dir`] for a crashed shim) leaves no
//! VMM process, mount, socket or directory behind.
//!
//! With `[factory] template = true` the VM starts from a VM template instead of
//! booting its kernel (crate::template); a sandbox started so is the same as a
//! booted one once [`Sandbox::start`] returns.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Mutex,
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::watch, time::Instant};

use crate::{
    agent::{self, Agent, AgentError},
    config::Config,
    mount::{self, MountError},
    template::{self, Template},
};
use containerd_shim::protos::types::mount::Mount;

/// virtio-fs tag of the share (kernel command line `vmrt.share=`).
pub const SHARE_TAG: &str = "vmrtshared";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/vmrt/shared";
/// Guest vsock CID.
pub const GUEST_CID: u32 = 3;
/// Exit status reported for processes of a sandbox whose VMM died.
pub const VMM_DEATH_EXIT_STATUS: u32 = 255;
/// How long the agent's Shutdown RPC may take, and then the VMM to exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Lines of console.log quoted in boot failure errors.
pub const CONSOLE_TAIL_LINES: usize = 30;

/// Errors of the sandbox lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Sandbox directory setup failed.
    #[error("sandbox {id}: {context}: {source}")]
    Io {
        /// Sandbox id.
        id: String,
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A sandbox with this id already has a directory (a previous shim was not cleaned up).
    #[error("sandbox directory {0} already exists")]
    Exists(PathBuf),
    /// The VMM could not be started.
    #[error("spawn {vmm}: {source}")]
    Spawn {
        /// VMM binary.
        vmm: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The VMM exited before the agent answered.
    #[error("VMM exited with status {status} before the agent answered; {diagnostics}")]
    VmmExited {
        /// Exit status (128 + signal if killed).
        status: i32,
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// The agent did not answer within `agent.timeout_ms`.
    #[error("guest agent not ready: {source}; {diagnostics}")]
    AgentNotReady {
        /// Dial error.
        source: AgentError,
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// The agent of a VM started from a template answered Health, but its
    /// `Restored` call failed.
    #[error("guest agent restored from a template: {source}; {diagnostics}")]
    Restore {
        /// The RPC error.
        source: AgentError,
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// The VMM is gone, so the operation cannot be done.
    #[error("sandbox {0}: VMM is not running")]
    VmmGone(String),
    /// The boot was called off (the shim exits, or Create wants another
    /// configuration than the one a pre-boot used) before the agent answered.
    #[error("sandbox {0}: boot cancelled")]
    Cancelled(String),
    /// Mounting/unmounting failed.
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// Calls a boot off: [`Sandbox::start`] stops at the next step once the value is
/// `true`. A receiver whose sender is gone never cancels.
pub type CancelBoot = watch::Receiver<bool>;

/// Resolves once `cancel` holds `true`; never if its sender is dropped first.
pub(crate) async fn cancelled(mut cancel: CancelBoot) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[derive(Serialize)]
struct VmSerial<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    path: &'a Path,
}

#[derive(Serialize)]
struct VmVsock<'a> {
    guest_cid: u32,
    uds_path: &'a Path,
}

#[derive(Serialize)]
struct VmShare<'a> {
    tag: &'a str,
    path: &'a Path,
    cache: &'a str,
}

#[derive(Serialize)]
struct VmSnapshot<'a> {
    mode: &'a str,
    dir: &'a Path,
}

/// `vm.json` as docs/contracts.md "vmrt-vmm" defines it.
#[derive(Serialize)]
struct VmJson<'a> {
    vcpus: u32,
    memory_mib: u32,
    kernel: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<&'a Path>,
    cmdline: String,
    serial: VmSerial<'a>,
    vsock: VmVsock<'a>,
    shares: Vec<VmShare<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<VmSnapshot<'a>>,
}

/// How a VM starts: vm.json's `snapshot` and whether the guest command line
/// carries [`crate::config::TEMPLATE_CMDLINE_KEY`].
#[derive(Debug, Clone, Copy)]
pub enum VmStart<'a> {
    /// Boot the kernel (no `snapshot`).
    Boot,
    /// Boot the kernel as a template VM, which the VMM snapshots into this
    /// directory when the agent asks (`"mode": "template"`).
    Template(&'a Path),
    /// Start from the template in this directory (`"mode": "restore"`).
    Restore(&'a Path),
}

/// The host paths of a VM's devices.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// Serial console log.
    pub console: PathBuf,
    /// Hybrid vsock Unix socket.
    pub uds: PathBuf,
    /// virtio-fs share root.
    pub share: PathBuf,
}

impl VmPaths {
    /// The devices of the sandbox in `dir`: `console.log`, `vsock.sock`, `shared/`.
    pub fn sandbox(dir: &Path) -> VmPaths {
        VmPaths {
            console: dir.join("console.log"),
            uds: dir.join("vsock.sock"),
            share: dir.join("shared"),
        }
    }
}

/// Renders `vm.json` for a sandbox directory.
pub fn vm_json(config: &Config, dir: &Path, start: VmStart<'_>) -> String {
    render_vm_json(config, &VmPaths::sandbox(dir), start)
}

/// Renders `vm.json` for a VM whose devices are at `paths`. Template and restore
/// VMs get the template command line; apart from the device paths and
/// `snapshot`, a template VM's `vm.json` and a restored sandbox's are the same.
pub fn render_vm_json(config: &Config, paths: &VmPaths, start: VmStart<'_>) -> String {
    let (template, snapshot) = match start {
        VmStart::Boot => (false, None),
        VmStart::Template(dir) => (true, Some(VmSnapshot { mode: "template", dir })),
        VmStart::Restore(dir) => (true, Some(VmSnapshot { mode: "restore", dir })),
    };
    let vm = VmJson {
        vcpus: config.hypervisor.vcpus,
        memory_mib: config.hypervisor.memory_mib,
        kernel: &config.hypervisor.kernel,
        initrd: config.hypervisor.initrd.as_deref(),
        cmdline: crate::config::kernel_cmdline(config, template),
        serial: VmSerial {
            kind: "file",
            path: &paths.console,
        },
        vsock: VmVsock {
            guest_cid: GUEST_CID,
            uds_path: &paths.uds,
        },
        shares: vec![VmShare {
            tag: SHARE_TAG,
            path: &paths.share,
            cache: config.hypervisor.virtio_fs_cache.as_str(),
        }],
        snapshot,
    };
    serde_json::to_string_pretty(&vm).expect("vm.json serializes")
}

/// Errors starting a VMM process ([`spawn_vmm`]).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Its log or lock file could not be made.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The VMM could not be executed.
    #[error("spawn {vmm}: {source}")]
    Spawn {
        /// VMM binary.
        vmm: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl SpawnError {
    fn into_sandbox(self, id: &str) -> SandboxError {
        match self {
            SpawnError::Io { context, source } => SandboxError::Io {
                id: id.into(),
                context: context.into(),
                source,
            },
            SpawnError::Spawn { vmm, source } => SandboxError::Spawn { vmm, source },
        }
    }
}

/// A VMM process started by [`spawn_vmm`].
#[derive(Debug)]
pub struct VmmChild {
    /// Its pid, which is also its process group.
    pub pid: i32,
    /// Its exit status once it exited (128 + signal if killed); a task reaps it.
    pub exit: watch::Receiver<Option<i32>>,
}

/// Starts `vmm --config <dir>/vm.json` in `dir` as its own process group, with
/// stdout and stderr in `<dir>/vmm.log`, holding `<dir>/vmm.lock`
/// ([`VmmLock`]). A task reaps it and logs its exit as `<label>: VMM exited
/// ...` (with the log and console tails for statuses 1 and 2). With
/// `die_with_shim` the kernel kills it when the shim dies (template VMs, which
/// no bundle records for `delete`).
///
/// Errors: [`SpawnError`].
pub fn spawn_vmm(label: &str, vmm: &Path, dir: &Path, die_with_shim: bool) -> Result<VmmChild, SpawnError> {
    let io = |context: &'static str| move |source| SpawnError::Io { context, source };
    let log = std::fs::File::create(dir.join("vmm.log")).map_err(io("create vmm.log"))?;
    let log2 = log.try_clone().map_err(io("dup vmm.log"))?;
    let lock = VmmLock::acquire(dir).map_err(io("lock vmm.lock"))?;
    let mut cmd = tokio::process::Command::new(vmm);
    // SAFETY: the closure only calls fcntl(2), which is async-signal-safe.
    unsafe { cmd.pre_exec(lock.inherit()) };
    if die_with_shim {
        let shim = std::process::id() as libc::pid_t;
        // SAFETY: prctl(2) and getppid(2) are async-signal-safe; no memory is touched.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The shim died between fork and prctl: do not outlive it.
                if libc::getppid() != shim {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
    }
    cmd.arg("--config")
        .arg(dir.join("vm.json"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        // The shim's own hand-over from `start` (crate::preboot), not the VMM's.
        .env_remove(crate::preboot::PREBOOT_CONFIG_ENV)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        vmm: vmm.to_path_buf(),
        source,
    })?;
    // The VMM holds the lock now; the shim's descriptor is not needed.
    drop(lock);
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let (tx, exit) = watch::channel(None);
    let label = label.to_string();
    let vmm_dir = dir.to_path_buf();
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(s) => exit_code(s),
            Err(e) => {
                log::error!("{label}: wait for VMM: {e}");
                255
            }
        };
        // Statuses 1 and 2 are the VMM's own failures (docs/contracts.md): its log says
        // why, and the directory holding it is removed at teardown.
        if code == 1 || code == 2 {
            log::warn!("{label}: VMM exited with status {code}; {}", diagnostics(&vmm_dir));
        } else {
            log::info!("{label}: VMM exited with status {code}");
        }
        let _ = tx.send(Some(code));
    });
    Ok(VmmChild { pid, exit })
}

/// Bytes read from the end of a file by [`tail`]: the guest writes console.log, so
/// its size is the guest's choice.
const TAIL_MAX_BYTES: u64 = 64 * 1024;

/// Last `n` lines (within the last 64 KiB) of a text file (lossy UTF-8), or a note
/// that it is unreadable.
pub fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read_end = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL_MAX_BYTES)))?;
        let mut b = Vec::new();
        f.take(TAIL_MAX_BYTES).read_to_end(&mut b)?;
        Ok(b)
    };
    match read_end() {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<{}: {e}>", path.display()),
    }
}

/// Maps a wait status to the containerd convention (code, or 128 + signal).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A running microVM and what belongs to it.
pub struct Sandbox {
    /// Sandbox id (the first container's id for `ctr run`).
    pub id: String,
    /// `<sandbox_dir>/<id>`.
    pub dir: PathBuf,
    vmm_pid: i32,
    /// The agent log relay; aborted when the sandbox goes.
    _agent_log: Option<AbortOnDrop>,
    vmm_exit: watch::Receiver<Option<i32>>,
    agent: Agent,
    containers: Mutex<BTreeSet<String>>,
    shut_down: tokio::sync::Mutex<bool>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vmm_pid", &self.vmm_pid)
            .finish()
    }
}

impl Sandbox {
    /// The directory of sandbox `id` under `config`: `<runtime.sandbox_dir>/<id>`.
    pub fn dir_for(config: &Config, id: &str) -> PathBuf {
        config.runtime.sandbox_dir.join(id)
    }

    /// Boots a sandbox: creates the directory, writes `vm.json`, spawns the VMM in its
    /// own process group and dials the agent until it answers Health or
    /// `agent.timeout_ms` passes. On failure everything is torn down and the error
    /// carries the console tail; once `cancel` turns `true` the boot stops the same
    /// way with [`SandboxError::Cancelled`].
    ///
    /// With `factory.template` the VM starts from the configuration's template
    /// instead ([`template::prepare`] builds it first if there is none), and the
    /// agent is ready once it answered Health and `Restored`. A template that
    /// cannot be built, or a start from it that fails, costs a warning, never the
    /// sandbox: a failed start from a template tears that attempt down and boots
    /// normally. The template is removed (the next sandbox builds it again) only
    /// when the restoring VMM exited with status 1, its verdict on an
    /// unreadable or mismatched template; other failures (an agent slow to
    /// answer under load, a `Restored` step of this sandbox's own such as its
    /// share mount) keep it. The template path (waiting for another sandbox's
    /// build, building, restoring) ends within one `agent.timeout_ms` of the
    /// start; when the build used up more than half of it, this sandbox boots
    /// normally and the next one restores.
    pub async fn start(
        id: &str,
        config: &Config,
        vmm: &Path,
        cancel: CancelBoot,
    ) -> Result<Sandbox, SandboxError> {
        let dir = Self::dir_for(config, id);
        if dir.exists() {
            return Err(SandboxError::Exists(dir));
        }
        if *cancel.borrow() {
            return Err(SandboxError::Cancelled(id.into()));
        }
        let timeout = Duration::from_millis(config.agent.timeout_ms);
        if config.factory.template {
            let deadline = Instant::now() + timeout;
            let t = match template::prepare(id, config, vmm, deadline, cancel.clone()).await {
                Ok(t) => t,
                Err(template::TemplateError::Cancelled) => {
                    return Err(SandboxError::Cancelled(id.into()))
                }
                Err(e) => {
                    log::warn!("sandbox {id}: no VM template: {e}; booting");
                    None
                }
            };
            let t = match t {
                Some(t) if !template::enough_left(deadline, timeout) => {
                    log::info!(
                        "sandbox {id}: template {} took more than half of agent.timeout_ms to get; \
                         booting this sandbox, the next ones start from the template",
                        t.key
                    );
                    None
                }
                t => t,
            };
            if let Some(t) = t {
                let budget = deadline.saturating_duration_since(Instant::now());
                match Self::start_in(id, config, vmm, &dir, cancel.clone(), Some(&t), budget).await {
                    Ok(s) => return Ok(s),
                    Err(e @ (SandboxError::Cancelled(_) | SandboxError::Exists(_))) => return Err(e),
                    Err(e @ SandboxError::VmmExited { status: 1, .. }) => {
                        log::warn!(
                            "sandbox {id}: start from template {} failed; removing the template and booting: {e}",
                            t.key
                        );
                        t.discard(&e.to_string());
                    }
                    Err(e) => log::warn!(
                        "sandbox {id}: start from template {} failed; keeping the template, booting: {e}",
                        t.key
                    ),
                }
            }
        }
        Self::start_in(id, config, vmm, &dir, cancel, None, timeout).await
    }

    /// One start in `dir`: booted, or from `template`; on failure everything it
    /// made is gone.
    async fn start_in(
        id: &str,
        config: &Config,
        vmm: &Path,
        dir: &Path,
        cancel: CancelBoot,
        template: Option<&Template>,
        budget: Duration,
    ) -> Result<Sandbox, SandboxError> {
        if dir.exists() {
            return Err(SandboxError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir.join("shared")).map_err(|source| SandboxError::Io {
            id: id.into(),
            context: format!("create {}", dir.display()),
            source,
        })?;
        match Self::boot(id, config, vmm, dir, cancel, template, budget).await {
            Ok(s) => Ok(s),
            Err((e, vmm)) => {
                if let Some((pid, mut exit_rx)) = vmm {
                    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                    // Reap before returning: no VMM (not even a zombie) outlives a failed start.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        exit_rx.wait_for(|s| s.is_some()),
                    )
                    .await;
                }
                let _ = cleanup_dir(dir);
                Err(e)
            }
        }
    }

    async fn boot(
        id: &str,
        config: &Config,
        vmm: &Path,
        dir: &Path,
        cancel: CancelBoot,
        template: Option<&Template>,
        budget: Duration,
    ) -> Result<Sandbox, (SandboxError, Option<(i32, watch::Receiver<Option<i32>>)>)> {
        if *cancel.borrow() {
            return Err((SandboxError::Cancelled(id.into()), None));
        }
        let ioerr = |context: String| {
            let id = id.to_string();
            move |source| {
                (
                    SandboxError::Io {
                        id,
                        context,
                        source,
                    },
                    None,
                )
            }
        };
        let start = match template {
            Some(t) => VmStart::Restore(&t.dir),
            None => VmStart::Boot,
        };
        std::fs::write(dir.join("vm.json"), vm_json(config, dir, start))
            .map_err(ioerr("write vm.json".into()))?;
        // The agent's log, if the socket can be made (best effort: without a
        // listener the agent logs everything to the console).
        let agent_log = match tokio::net::UnixListener::bind(agent_log_socket(dir)) {
            Ok(l) => Some(AbortOnDrop(tokio::spawn(forward_agent_log(id.to_string(), l)))),
            Err(e) => {
                log::warn!("sandbox {id}: agent log socket: {e}; the agent log stays in console.log");
                None
            }
        };
        let spawned = Instant::now();
        let VmmChild { pid, exit: vmm_exit } = spawn_vmm(&format!("sandbox {id}"), vmm, dir, false)
            .map_err(|e| (e.into_sandbox(id), None))?;
        if let Err(e) = std::fs::write(dir.join("vmm.pid"), pid.to_string()) {
            return Err((
                SandboxError::Io {
                    id: id.into(),
                    context: "write vmm.pid".into(),
                    source: e,
                },
                Some((pid, vmm_exit)),
            ));
        }
        log::info!("sandbox {id}: VMM pid {pid} started");
        let deadline = Instant::now() + budget;
        let uds = dir.join("vsock.sock");
        let mut exit_rx = vmm_exit.clone();
        let ready = async {
            let agent = Agent::dial(&uds, deadline).await.map_err(|source| SandboxError::AgentNotReady {
                source,
                diagnostics: diagnostics(dir),
            })?;
            if template.is_some() {
                let entropy = template::entropy().map_err(|source| SandboxError::Io {
                    id: id.into(),
                    context: "read /dev/urandom".into(),
                    source,
                })?;
                template::restored(&agent, entropy, deadline).await.map_err(|source| SandboxError::Restore {
                    source,
                    diagnostics: diagnostics(dir),
                })?;
            }
            Ok(agent)
        };
        let agent = tokio::select! {
            r = ready => match r {
                Ok(a) => a,
                Err(e) => {
                    // The VMM's exit says more than the connection it took down.
                    let exited = *vmm_exit.borrow();
                    if let Some(status) = exited {
                        return Err((SandboxError::VmmExited { status, diagnostics: diagnostics(dir) }, None));
                    }
                    return Err((e, Some((pid, vmm_exit))));
                }
            },
            r = exit_rx.wait_for(|s| s.is_some()) => {
                let status = r.map(|s| s.unwrap_or(255)).unwrap_or(255);
                return Err((SandboxError::VmmExited { status, diagnostics: diagnostics(dir) }, None));
            }
            _ = cancelled(cancel) => return Err((SandboxError::Cancelled(id.into()), Some((pid, vmm_exit)))),
        };
        match template {
            Some(t) => log::info!(
                "sandbox {id}: restored from template {} in {} ms",
                t.key,
                spawned.elapsed().as_millis()
            ),
            None => log::info!("sandbox {id}: agent ready"),
        }
        Ok(Sandbox {
            id: id.into(),
            dir: dir.to_path_buf(),
            vmm_pid: pid,
            vmm_exit,
            _agent_log: agent_log,
            agent,
            containers: Mutex::new(BTreeSet::new()),
            shut_down: tokio::sync::Mutex::new(false),
        })
    }
    /// The tails of `vmm.log` and `console.log`, for messages about a VMM that died.
    pub fn diagnostics(&self) -> String {
        diagnostics(&self.dir)
    }

    /// The agent client.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The VMM's exit status if it has exited.
    pub fn vmm_exited(&self) -> Option<i32> {
        *self.vmm_exit.borrow()
    }

    /// Resolves when the VMM process has exited, with its status.
    pub async fn wait_vmm_exit(&self) -> i32 {
        let mut rx = self.vmm_exit.clone();
        let r = rx.wait_for(|s| s.is_some()).await.map(|s| s.unwrap_or(255));
        r.unwrap_or(255)
    }

    /// Fails with [`SandboxError::VmmGone`] if the VMM has exited.
    pub fn check_running(&self) -> Result<(), SandboxError> {
        match self.vmm_exited() {
            Some(_) => Err(SandboxError::VmmGone(self.id.clone())),
            None => Ok(()),
        }
    }

    /// Guest path of a container's rootfs.
    pub fn rootfs_guest_path(container_id: &str) -> String {
        format!("{GUEST_SHARE_DIR}/{container_id}/rootfs")
    }

    /// Mounts a container's rootfs into the share, shares the host sources of
    /// the spec's bind mounts next to it (`shared/<id>/mounts/<i>`, see
    /// [`mount::share_bind_mounts`]) and registers the container. Returns the
    /// OCI spec with the bind sources rewritten to their guest paths. On
    /// error nothing of the container stays mounted.
    pub async fn add_container(
        &self,
        container_id: &str,
        mounts: &[Mount],
        bundle_rootfs: &Path,
        spec: &[u8],
    ) -> Result<Vec<u8>, SandboxError> {
        // Below the sandbox directory everything in shared/ is guest-writable:
        // mount points are reached from the sandbox directory without
        // following symlinks (crate::mount).
        let rel = Path::new("shared").join(container_id);
        mount::mount_rootfs(mounts, bundle_rootfs, &self.dir, &rel.join("rootfs")).await?;
        let guest = format!("{GUEST_SHARE_DIR}/{container_id}/mounts");
        let spec = match mount::share_bind_mounts(spec, &self.dir, &rel.join("mounts"), &guest) {
            Ok(s) => s,
            Err(e) => {
                let cdir = self.dir.join(&rel);
                let _ = mount::unmount_all_beneath(&self.dir, &rel).and_then(|_| mount::remove_dir_safely(&cdir));
                return Err(e.into());
            }
        };
        self.containers.lock().unwrap().insert(container_id.into());
        Ok(spec)
    }

    /// Whether `container_id` is the only container the sandbox holds, so that
    /// deleting it tears the sandbox down.
    pub fn holds_only(&self, container_id: &str) -> bool {
        let c = self.containers.lock().unwrap();
        c.len() == 1 && c.contains(container_id)
    }

    /// Unmounts a container's rootfs, removes its share directory and unregisters it.
    /// Returns how many containers remain.
    pub fn remove_container(&self, container_id: &str) -> Result<usize, SandboxError> {
        let rel = Path::new("shared").join(container_id);
        let cdir = self.dir.join(&rel);
        let r = mount::unmount_all_beneath(&self.dir, &rel).and_then(|_| mount::remove_dir_safely(&cdir));
        let mut c = self.containers.lock().unwrap();
        c.remove(container_id);
        let left = c.len();
        r?;
        Ok(left)
    }

    /// Tears the sandbox down (idempotent): agent Shutdown, which stops the guest's
    /// processes and syncs and unmounts its shares before it replies; on that reply
    /// SIGTERM to the VMM (it stops its vCPUs and exits 0) instead of waiting for the
    /// guest's own reboot. Then wait up to 2 s for the VMM to exit (the reboot's, if the
    /// RPC failed), SIGKILL its process group otherwise, then unmount everything below
    /// the sandbox directory and remove it.
    pub async fn shutdown(&self) -> Result<(), SandboxError> {
        let mut done = self.shut_down.lock().await;
        if *done {
            return Ok(());
        }
        if self.vmm_exited().is_none() {
            let req = vmrt_protocol::agent::Empty::new();
            let r = tokio::time::timeout(
                SHUTDOWN_GRACE,
                self.agent
                    .client()
                    .shutdown(agent::ctx(Some(SHUTDOWN_GRACE)), &req),
            )
            .await;
            match &r {
                Ok(Ok(_)) if self.vmm_exited().is_none() => {
                    log::debug!("sandbox {}: guest quiesced; stopping the VMM", self.id);
                    signal_group(self.vmm_pid, nix::sys::signal::Signal::SIGTERM);
                }
                Ok(Err(e)) => log::debug!("sandbox {}: agent Shutdown: {e}", self.id),
                _ => {}
            }
            let exited = tokio::time::timeout(SHUTDOWN_GRACE, self.wait_vmm_exit()).await;
            if exited.is_err() {
                log::warn!(
                    "sandbox {}: VMM did not exit after Shutdown; killing it",
                    self.id
                );
                if self.vmm_exited().is_none() {
                    signal_group(self.vmm_pid, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), self.wait_vmm_exit()).await;
            }
        }
        cleanup_dir(&self.dir)?;
        *done = true;
        log::info!("sandbox {}: torn down", self.id);
        Ok(())
    }
}

/// Host side of the agent's `vmrt.log_port` connection: `<dir>/vsock.sock_<port>`,
/// where the VMM's hybrid vsock forwards the guest's connection to host port
/// [`vmrt_protocol::DEFAULT_LOG_PORT`].
fn agent_log_socket(dir: &Path) -> PathBuf {
    dir.join(format!("vsock.sock_{}", vmrt_protocol::DEFAULT_LOG_PORT))
}

/// Longest agent log line forwarded; the rest of a longer line is skipped.
const AGENT_LOG_LINE_MAX: usize = 4096;
/// Budget of the agent log relay per second, in bytes: each line costs its length
/// plus [`AGENT_LOG_LINE_COST`] (the record it becomes in containerd's log).
const AGENT_LOG_BUDGET_PER_SEC: usize = 64 * 1024;
/// Fixed cost of one forwarded line: containerd's log record around it.
const AGENT_LOG_LINE_COST: usize = 128;

/// Accepts the agent's log connection and writes each line into the shim's log
/// (containerd's log) as `sandbox <id> agent: <line>`. Ends when the guest closes
/// the connection; the sandbox aborts it at teardown.
async fn forward_agent_log(id: String, listener: tokio::net::UnixListener) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    drop(listener);
    relay_log_lines(tokio::io::BufReader::new(stream), &TokioClock, |line| {
        log::info!("sandbox {id} agent: {line}")
    })
    .await;
}

/// Passes each line of `reader` (without its newline, lossy UTF-8) to `emit`,
/// bounded for a hostile guest: a line is cut at [`AGENT_LOG_LINE_MAX`] bytes (the
/// rest is read and skipped), and once a second's [`AGENT_LOG_BUDGET_PER_SEC`] is
/// spent (skipped bytes count too) the relay stops reading until the next second.
/// The VMM's vsock credit then stops the guest's writes (the agent's socket is
/// non-blocking, so the agent drops lines rather than stalls).
async fn relay_log_lines<R>(mut reader: R, clock: &impl Clock, mut emit: impl FnMut(&str))
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = Vec::with_capacity(256);
    let mut window = clock.now();
    let mut used = 0usize;
    // Inside an overlong line whose first AGENT_LOG_LINE_MAX bytes were passed on.
    let mut skipping = false;
    loop {
        if used >= AGENT_LOG_BUDGET_PER_SEC {
            clock.sleep_until(window + Duration::from_secs(1)).await;
        }
        if clock.now() - window >= Duration::from_secs(1) {
            window = clock.now();
            used = 0;
        }
        line.clear();
        // Bounded: at most AGENT_LOG_LINE_MAX bytes are read per step.
        let n = match (&mut reader)
            .take(AGENT_LOG_LINE_MAX as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let complete = line.last() == Some(&b'\n');
        if std::mem::replace(&mut skipping, !complete) {
            used += n;
            continue;
        }
        used += n + AGENT_LOG_LINE_COST;
        emit(String::from_utf8_lossy(&line).trim_end());
    }
}

/// Time as the agent log relay sees it: tokio's clock in the shim, a
/// virtual one in tests (so pacing is tested without waiting and without
/// tokio's `test-util`, which would be compiled into the release build too).
trait Clock {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Waits until `deadline`.
    fn sleep_until(&self, deadline: Instant) -> impl std::future::Future<Output = ()>;
}

/// [`Clock`] on tokio's timer.
struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep_until(&self, deadline: Instant) -> impl std::future::Future<Output = ()> {
        tokio::time::sleep_until(deadline)
    }
}

/// Aborts a task when dropped: ties a background task's life to its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// VMM log and console tails for error messages.
pub(crate) fn diagnostics(dir: &Path) -> String {
    format!(
        "vmm.log:\n{}\nconsole.log (last {CONSOLE_TAIL_LINES} lines):\n{}",
        tail(&dir.join("vmm.log"), 10),
        tail(&dir.join("console.log"), CONSOLE_TAIL_LINES)
    )
}

/// Sends `signal` to the process group led by `pid` (the VMM runs in its own
/// group): SIGTERM stops its vCPUs and it exits 0, SIGKILL when it would not.
pub(crate) fn signal_group(pid: i32, signal: nix::sys::signal::Signal) {
    if pid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// The exclusive `flock(2)` on `<sandbox>/vmm.lock` that marks a live VMM.
///
/// The shim takes it before spawning the VMM and passes the descriptor to the VMM across
/// `exec` ([`VmmLock::inherit`]); the lock then lives in the open file description the
/// VMM shares, and the kernel releases it when the VMM (its last holder) exits. Dropping
/// this value closes the shim's descriptor only; it never unlocks.
pub struct VmmLock(std::fs::File);

impl VmmLock {
    /// Creates `dir/vmm.lock` and locks it without blocking.
    ///
    /// Errors: the file cannot be created, or it is locked already (`EWOULDBLOCK`: a VMM
    /// of this sandbox is running).
    pub fn acquire(dir: &Path) -> std::io::Result<VmmLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(VMM_LOCK_FILE))?;
        try_flock(&file)?;
        Ok(VmmLock(file))
    }

    /// A `pre_exec` hook that keeps the lock's descriptor open across `exec` in the child
    /// (it clears `FD_CLOEXEC` there only, never in the shim).
    pub fn inherit(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        move || {
            // SAFETY: fcntl on a descriptor this process owns; no memory is touched.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

/// File name of the VMM liveness lock in the sandbox directory.
const VMM_LOCK_FILE: &str = "vmm.lock";

/// `flock(LOCK_EX | LOCK_NB)` on `file`.
pub(crate) fn try_flock(file: &std::fs::File) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: flock on a descriptor owned by `file`; no memory is touched.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the VMM of the sandbox in `dir` is alive: someone holds `vmm.lock`.
/// A missing lock file means no VMM was ever started there.
pub(crate) fn vmm_alive(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join(VMM_LOCK_FILE)) else {
        return false;
    };
    match try_flock(&file) {
        // Taken by us: nobody else holds it. Closing `file` releases it again.
        Ok(()) => false,
        Err(e) => e.raw_os_error() == Some(libc::EWOULDBLOCK),
    }
}

/// Cleanup after a crashed shim (`delete` action): while the VMM is alive (it holds
/// `vmm.lock`), SIGKILL its process group and pid from `vmm.pid` and wait up to 5 s for
/// it to go; then unmount everything below `dir` and remove `dir`. A missing `dir` is
/// fine.
pub async fn cleanup_after_crash(dir: &Path) -> Result<(), SandboxError> {
    if vmm_alive(dir) {
        let pid = std::fs::read_to_string(dir.join("vmm.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|p| *p > 1);
        match pid {
            Some(pid) => {
                signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                for _ in 0..100 {
                    if !vmm_alive(dir) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if vmm_alive(dir) {
                    log::warn!("VMM pid {pid} of {} still alive after SIGKILL", dir.display());
                }
            }
            None => log::warn!(
                "VMM of {} holds vmm.lock but vmm.pid is unreadable; not killing",
                dir.display()
            ),
        }
    }
    cleanup_dir(dir)
}

/// Unmounts everything below `dir` and removes it (never following into a mount).
pub fn cleanup_dir(dir: &Path) -> Result<(), SandboxError> {
    if !dir.exists() {
        return Ok(());
    }
    mount::unmount_all_under(dir)?;
    mount::remove_dir_safely(dir)?;
    Ok(())
}

/// Fake VMMs for the shim's tests: shell scripts called as `vmrt-vmm --config
/// <sandbox>/vm.json`.
#[cfg(test)]
pub(crate) mod fake_vmm {
    use std::path::{Path, PathBuf};

    /// A VMM that records its pid in `<sandbox_dir>/../fake.pid` and never opens the
    /// vsock socket, so the agent never answers.
    pub const SLEEPS: &str =
        "#!/bin/sh\nd=$(dirname \"$2\")\necho $$ > \"$d/../../fake.pid\"\nexec sleep 60\n";

    /// Writes `script` as an executable `dir/vmrt-vmm` and returns its path.
    pub fn install(dir: &Path, script: &str) -> PathBuf {
        let fake = dir.join("vmrt-vmm");
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        fake
    }

    /// Asserts that the process whose pid `pid_file` holds is gone, reaped (not even a
    /// zombie). kill(pid, 0) rather than /proc: /proc may belong to another pid namespace.
    pub fn assert_gone(pid_file: &Path) {
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
        assert_eq!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH),
            "VMM {pid} still exists"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_json_follows_the_contract() {
        let mut c = Config::default();
        c.hypervisor.kernel = "/k/vmlinux".into();
        c.hypervisor.initrd = Some("/k/initrd".into());
        c.agent.log_level = "debug".into();
        let v: serde_json::Value =
            serde_json::from_str(&vm_json(&c, Path::new("/run/vmrt/sandboxes/abc"), VmStart::Boot)).unwrap();
        assert_eq!(v["vcpus"], 1);
        assert_eq!(v["memory_mib"], 256);
        assert_eq!(v["kernel"], "/k/vmlinux");
        assert_eq!(v["initrd"], "/k/initrd");
        assert_eq!(v["serial"]["type"], "file");
        assert_eq!(v["serial"]["path"], "/run/vmrt/sandboxes/abc/console.log");
        assert_eq!(v["vsock"]["guest_cid"], 3);
        assert_eq!(v["vsock"]["uds_path"], "/run/vmrt/sandboxes/abc/vsock.sock");
        assert_eq!(v["shares"][0]["tag"], "vmrtshared");
        assert_eq!(v["shares"][0]["path"], "/run/vmrt/sandboxes/abc/shared");
        assert_eq!(v["shares"][0]["cache"], "auto");
        let cmd = v["cmdline"].as_str().unwrap();
        assert!(cmd.starts_with("console=ttyS0 quiet"), "{cmd}");
        assert!(
            cmd.contains("vmrt.share=vmrtshared:/run/vmrt/shared")
                && cmd.contains("vmrt.log=debug"),
            "{cmd}"
        );
        c.hypervisor.initrd = None;
        let v: serde_json::Value = serde_json::from_str(&vm_json(&c, Path::new("/x"), VmStart::Boot)).unwrap();
        assert!(v.get("initrd").is_none());
        assert!(v.get("snapshot").is_none());
        assert!(!v["cmdline"].as_str().unwrap().contains("vmrt.template"));
    }

    /// A template VM's vm.json and a restored sandbox's describe the same machine
    /// (same fields, the template command line) and differ only in the device
    /// paths and `snapshot`.
    #[test]
    fn vm_json_for_template_and_restore_is_the_same_machine() {
        let mut c = Config::default();
        c.hypervisor.kernel = "/k/vmlinux".into();
        c.hypervisor.kernel_params = "foo=1".into();
        let tmp = Path::new("/run/vmrt/templates/0123456789abcdef.tmp-7-0");
        let paths = VmPaths {
            console: tmp.join("console.log"),
            uds: tmp.join("vsock.sock"),
            share: tmp.join("share"),
        };
        let mut t: serde_json::Value =
            serde_json::from_str(&render_vm_json(&c, &paths, VmStart::Template(tmp))).unwrap();
        assert_eq!(t["snapshot"]["mode"], "template");
        assert_eq!(t["snapshot"]["dir"], tmp.to_str().unwrap());
        assert_eq!(t["vsock"]["uds_path"], tmp.join("vsock.sock").to_str().unwrap());
        assert_eq!(t["shares"][0]["path"], tmp.join("share").to_str().unwrap());
        let cmd = t["cmdline"].as_str().unwrap();
        assert!(cmd.contains(" vmrt.template=1 ") && cmd.ends_with(" foo=1"), "{cmd}");

        let tdir = Path::new("/run/vmrt/templates/0123456789abcdef");
        let sb = Path::new("/run/vmrt/sandboxes/abc");
        let mut r: serde_json::Value =
            serde_json::from_str(&vm_json(&c, sb, VmStart::Restore(tdir))).unwrap();
        assert_eq!(r["snapshot"]["mode"], "restore");
        assert_eq!(r["snapshot"]["dir"], tdir.to_str().unwrap());
        assert_eq!(r["serial"]["path"], "/run/vmrt/sandboxes/abc/console.log");
        assert_eq!(r["vsock"]["uds_path"], "/run/vmrt/sandboxes/abc/vsock.sock");
        assert_eq!(r["shares"][0]["path"], "/run/vmrt/sandboxes/abc/shared");
        for v in [&mut t, &mut r] {
            let o = v.as_object_mut().unwrap();
            o.remove("snapshot");
            o["serial"]["path"] = "".into();
            o["vsock"]["uds_path"] = "".into();
            o["shares"][0]["path"] = "".into();
        }
        assert_eq!(t, r);
        // A normal boot: no snapshot, no template key, otherwise the same.
        let mut b: serde_json::Value = serde_json::from_str(&vm_json(&c, sb, VmStart::Boot)).unwrap();
        assert!(b.get("snapshot").is_none());
        assert_eq!(
            b["cmdline"].as_str().unwrap(),
            r["cmdline"].as_str().unwrap().replace(" vmrt.template=1", "")
        );
        let o = b.as_object_mut().unwrap();
        o["serial"]["path"] = "".into();
        o["vsock"]["uds_path"] = "".into();
        o["shares"][0]["path"] = "".into();
        o["cmdline"] = r["cmdline"].clone();
        assert_eq!(b, r);

        // The VMM's own parser takes all three (it rejects unknown fields).
        use vmm::config::{SnapshotMode, VmConfig};
        let parse = |text: String| serde_json::from_str::<VmConfig>(&text).unwrap().snapshot;
        assert!(parse(vm_json(&c, sb, VmStart::Boot)).is_none());
        let t = parse(render_vm_json(&c, &paths, VmStart::Template(tmp))).unwrap();
        assert_eq!((t.mode, t.dir.as_path()), (SnapshotMode::Template, tmp));
        let r = parse(vm_json(&c, sb, VmStart::Restore(tdir))).unwrap();
        assert_eq!((r.mode, r.dir.as_path()), (SnapshotMode::Restore, tdir));
    }

    #[test]
    fn tail_takes_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let t = tail(&p, 30);
        assert_eq!(t.lines().count(), 30);
        assert!(t.starts_with("line 70") && t.ends_with("line 99"), "{t}");
        assert!(tail(&d.path().join("none"), 3).contains("none"));
    }

    #[test]
    fn tail_reads_only_the_end_of_a_huge_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        // 1 GiB of zeros, sparse, then the last line.
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"\nlast words\n").unwrap();
        let t = tail(&p, 2);
        assert!(t.ends_with("last words"), "{t:?}");
        assert!(t.len() <= TAIL_MAX_BYTES as usize + 16);
    }

    /// A "VMM" that exits at once: start fails with VmmExited, quoting the console, and
    /// leaves no directory behind.
    #[tokio::test]
    async fn vmm_that_dies_at_boot_fails_start_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let fake = fake_vmm::install(
            d.path(),
            "#!/bin/sh\nd=$(dirname \"$2\")\necho 'Kernel panic - not syncing: test' > \"$d/console.log\"\necho 'bad config' >&2\nexit 1\n",
        );
        let mut c = Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 20_000;
        let e = Sandbox::start("sb1", &c, &fake, watch::channel(false).1).await.unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(e, SandboxError::VmmExited { status: 1, .. }),
            "{m}"
        );
        assert!(
            m.contains("Kernel panic - not syncing: test") && m.contains("bad config"),
            "{m}"
        );
        assert!(!c.runtime.sandbox_dir.join("sb1").exists());
    }

    /// A "VMM" that never opens the vsock socket: start fails after the agent timeout
    /// with the console tail, the process group is killed and the directory removed.
    #[tokio::test]
    async fn agent_timeout_fails_start_kills_vmm_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let fake = fake_vmm::install(
            d.path(),
            "#!/bin/sh\nd=$(dirname \"$2\")\necho $$ > \"$d/../../fake.pid\"\necho 'booting slowly' > \"$d/console.log\"\nexec sleep 60\n",
        );
        let mut c = Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 500;
        let e = Sandbox::start("sb2", &c, &fake, watch::channel(false).1).await.unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, SandboxError::AgentNotReady { .. }), "{m}");
        assert!(m.contains("booting slowly"), "{m}");
        assert!(!c.runtime.sandbox_dir.join("sb2").exists());
        // The VMM was killed and reaped: not even a zombie is left.
        fake_vmm::assert_gone(&d.path().join("fake.pid"));
    }

    /// Cancelling a boot that waits for the agent stops it at once with Cancelled; the
    /// VMM is killed and reaped and the directory removed.
    #[tokio::test]
    async fn cancelled_boot_kills_vmm_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let fake = fake_vmm::install(d.path(), fake_vmm::SLEEPS);
        let mut c = Config::default();
        c.runtime.sandbox_dir = d.path().join("sandboxes");
        c.agent.timeout_ms = 30_000;
        let (cancel, rx) = watch::channel(false);
        let pid_file = d.path().join("fake.pid");
        let boot = tokio::spawn({
            let c = c.clone();
            async move { Sandbox::start("sb3", &c, &fake, rx).await }
        });
        while !pid_file.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t0 = std::time::Instant::now();
        cancel.send(true).unwrap();
        let e = boot.await.unwrap().unwrap_err();
        assert!(matches!(e, SandboxError::Cancelled(ref id) if id == "sb3"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(!c.runtime.sandbox_dir.join("sb3").exists());
        fake_vmm::assert_gone(&pid_file);
        // A boot cancelled before it begins starts nothing.
        let (cancel, rx) = watch::channel(true);
        let e = Sandbox::start("sb4", &c, Path::new("/nonexistent"), rx).await.unwrap_err();
        drop(cancel);
        assert!(matches!(e, SandboxError::Cancelled(_)), "{e}");
        assert!(!c.runtime.sandbox_dir.join("sb4").exists());
    }

    /// After the VMM is gone, `vmm.pid` may name a reused pid: cleanup must not kill it,
    /// because nobody holds `vmm.lock` any more.
    #[tokio::test]
    async fn cleanup_spares_a_process_that_reused_the_vmm_pid() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("sb");
        std::fs::create_dir_all(&dir).unwrap();
        // The VMM ran and exited: its lock file exists but is not held.
        drop(VmmLock::acquire(&dir).unwrap());
        let mut bystander = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        std::fs::write(dir.join("vmm.pid"), bystander.id().to_string()).unwrap();
        cleanup_after_crash(&dir).await.unwrap();
        assert!(!dir.exists());
        assert!(bystander.try_wait().unwrap().is_none(), "bystander was killed");
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }

    /// The lock is held exactly while a process that inherited it lives.
    #[test]
    fn vmm_lock_is_held_while_the_inheriting_process_lives() {
        let d = tempfile::tempdir().unwrap();
        let lock = VmmLock::acquire(d.path()).unwrap();
        let mut cmd = std::process::Command::new("sleep");
        // SAFETY: the hook only calls fcntl(2).
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, lock.inherit()) };
        let mut child = cmd.arg("30").spawn().unwrap();
        drop(lock);
        assert!(vmm_alive(d.path()));
        assert!(VmmLock::acquire(d.path()).is_err(), "a second VMM lock must fail");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!vmm_alive(d.path()));
    }

    /// A clock that only moves when slept on.
    struct VirtualClock(std::cell::Cell<Instant>);

    impl Clock for VirtualClock {
        fn now(&self) -> Instant {
            self.0.get()
        }
        fn sleep_until(&self, deadline: Instant) -> impl std::future::Future<Output = ()> {
            self.0.set(self.0.get().max(deadline));
            std::future::ready(())
        }
    }

    /// Agent log lines pass through whole; an overlong line is cut and its rest
    /// skipped; beyond a second's budget the relay waits for the next second
    /// instead of reading (on a virtual clock: the waits take no time).
    #[tokio::test]
    async fn agent_log_lines_are_bounded() {
        let mut input = b"[ 0.1] vmrt-agent INFO x: starting\n".to_vec();
        input.extend(vec![b'A'; AGENT_LOG_LINE_MAX * 3]);
        input.extend(b"\nafter\n");
        for _ in 0..2000 {
            input.push(b'\n');
        }
        let clock = VirtualClock(std::cell::Cell::new(Instant::now()));
        let t0 = clock.now();
        let mut got = Vec::new();
        relay_log_lines(&input[..], &clock, |l| got.push(l.to_string())).await;
        assert_eq!(got[0], "[ 0.1] vmrt-agent INFO x: starting");
        assert_eq!(got[1].len(), AGENT_LOG_LINE_MAX);
        assert_eq!(got[2], "after");
        // Every line arrives, but paced: each line costs its bytes plus the record
        // around it (skipped bytes cost their length), at most one budget (plus one
        // line) per second.
        assert_eq!(got.len(), 3 + 2000);
        let emitted = [35, AGENT_LOG_LINE_MAX, 6].iter().sum::<usize>() + 2000;
        let skipped = 2 * AGENT_LOG_LINE_MAX + 1;
        let cost = emitted + (3 + 2000) * AGENT_LOG_LINE_COST + skipped;
        let secs = (clock.now() - t0).as_secs() as usize;
        let max_window = AGENT_LOG_BUDGET_PER_SEC + AGENT_LOG_LINE_MAX + AGENT_LOG_LINE_COST;
        assert!((secs + 1) * max_window >= cost, "{cost} bytes of cost in {secs} s");
        assert!(secs <= cost / AGENT_LOG_BUDGET_PER_SEC, "needless waits: {secs} s for {cost}");
        assert_eq!(secs, 4);
    }
}
