//! [`ContainerManager`]: the containers of this guest and their processes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxNamespaceType;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::stdio::{dup_high, ConsoleSocket, Terminal};
use super::{cgroups, reaper, spec, Error, ExitInfo, ProcessStdio, Stats};

/// How long delete waits for the container's processes to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for libcontainer's console socket connection.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One process of a container (the init process or an exec).
struct Proc {
    pid: u32,
    exit: watch::Receiver<Option<ExitInfo>>,
    terminal: Option<Terminal>,
}

impl Proc {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

struct Entry {
    id: String,
    /// `<state_dir>/<id>`: the bundle (config.json), exec process files, console sockets.
    dir: PathBuf,
    /// libcontainer's state root (`<dir>/state`; the container's state is in `<dir>/state/<id>`).
    root: PathBuf,
    cgroup_path: PathBuf,
    cgroup_dir: PathBuf,
    init: Arc<Proc>,
    /// `start` succeeded (exec needs a running container).
    started: AtomicBool,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    oom: cgroups::OomWatch,
    oom_task: JoinHandle<()>,
    exit_task: JoinHandle<()>,
}

impl Entry {
    fn process(&self, exec_id: &str) -> Result<Arc<Proc>, Error> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of container {}", self.id)))
    }
}

/// The containers of this guest (OCI runtime spec 1.1 lifecycle: create,
/// start, kill, delete; plus exec, pause/resume, update, stats). Share it in
/// an `Arc`; every method takes `&self` and locks internally. Methods are
/// async and run libcontainer on tokio's blocking pool: they must be called
/// inside a tokio runtime.
pub struct ContainerManager {
    state_dir: PathBuf,
    containers: Mutex<HashMap<String, Arc<Entry>>>,
    oom_tx: broadcast::Sender<String>,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

fn lc_err(what: &str, e: LibcontainerError) -> Error {
    match &e {
        LibcontainerError::Exist => Error::AlreadyExists(what.to_string()),
        LibcontainerError::IncorrectStatus(s) => {
            Error::FailedPrecondition(format!("{what}: container is {s}"))
        }
        LibcontainerError::InvalidSpec(_) | LibcontainerError::MissingSpec(_) => {
            Error::invalid("config.json", chain(&e))
        }
        _ => Error::Internal(format!("{what}: {}", chain(&e))),
    }
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("blocking task failed: {e}"))
}

/// Runs `f` (in-process libcontainer work that may fork and wait, e.g.
/// hooks) with the reaper lock held.
fn with_fork_guard<T>(f: impl FnOnce(&reaper::ReapGuard) -> T) -> T {
    let guard = reaper::lock();
    f(&guard)
}

/// Resets every caught signal of the calling process to its default action
/// (ignored signals stay ignored, as across execve(2)).
fn reset_signal_handlers() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed sigaction is a valid (empty) value of this plain C struct.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sigaction with a null new action only reads the current one
        // into `old`, a struct we own.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
            // SAFETY: installs SIG_DFL, which has no handler to be unsafe in.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

/// Closes every descriptor of the calling process except `keep`.
fn close_fds_except(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut lo: u32 = 0;
    for &k in keep.iter() {
        let k = k as u32;
        if k > lo {
            // SAFETY: close_range only closes descriptors; none of them is in use
            // by Rust objects that outlive this forked, single-threaded child.
            unsafe { libc::syscall(libc::SYS_close_range, lo, k - 1, 0) };
        }
        lo = k + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) };
}

fn encode_result(r: &Result<u32, Error>) -> Vec<u8> {
    let v = match r {
        Ok(pid) => serde_json::json!({"pid": pid}),
        Err(e) => {
            let (kind, field, reason) = match e {
                Error::NotFound(m) => ("not_found", String::new(), m.clone()),
                Error::AlreadyExists(m) => ("already_exists", String::new(), m.clone()),
                Error::InvalidSpec { field, reason } => ("invalid", field.clone(), reason.clone()),
                Error::FailedPrecondition(m) => ("precondition", String::new(), m.clone()),
                Error::Internal(m) => ("internal", String::new(), m.clone()),
            };
            serde_json::json!({"kind": kind, "field": field, "reason": reason})
        }
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn decode_result(bytes: &[u8]) -> Result<u32, Error> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::Internal(format!("libcontainer helper died without a result ({e})")))?;
    if let Some(pid) = v.get("pid").and_then(|p| p.as_u64()) {
        return Ok(pid as u32);
    }
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    Err(match s("kind").as_str() {
        "not_found" => Error::NotFound(s("reason")),
        "already_exists" => Error::AlreadyExists(s("reason")),
        "invalid" => Error::InvalidSpec {
            field: s("field"),
            reason: s("reason"),
        },
        "precondition" => Error::FailedPrecondition(s("reason")),
        _ => Error::Internal(s("reason")),
    })
}

/// Runs `f` (a libcontainer build that clones the container process) in a
/// forked, single-threaded helper process that keeps only the descriptors in
/// `keep` (the new process's stdio). Returns the pid `f` produced.
///
/// Why: the container process lives between clone and execve (for init: until
/// `start`) with every descriptor of its creator. Built from the agent itself
/// it would hold copies of other containers' stdio streams and pty masters,
/// delaying their EOF. The helper also keeps libcontainer's process-wide
/// changes (dumpable, oom_score_adj, cwd) out of the agent, and forks via
/// glibc `fork` (malloc-safe) instead of cloning the multi-threaded agent.
///
/// The container process is cloned with CLONE_PARENT, so it is the helper's
/// child and is re-parented to the agent (PID 1 / child subreaper) when the
/// helper exits. The caller holds the reaper lock (`_guard`) so that it can
/// wait for the helper and register the new pid before the reaper runs.
fn in_helper(
    _guard: &reaper::ReapGuard,
    keep: &[RawFd],
    f: impl FnOnce() -> Result<u32, Error>,
) -> Result<u32, Error> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::Internal(format!("pipe: {e}")))?;
    // SAFETY: the child only runs `f` (libcontainer, single-threaded now) and
    // leaves with _exit; glibc's fork resets the allocator locks in the child.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Error::Internal(format!("fork libcontainer helper: {e}"))),
        Ok(nix::unistd::ForkResult::Child) => {
            // The agent's signal handlers (the reaper's SIGCHLD, tokio's) write
            // to descriptors this child closes below; libcontainer reuses their
            // numbers for its channel sockets, where a stray wake-up byte from
            // a SIGCHLD (our intermediate process exiting) made the init
            // process's channel end close with unread data: ECONNRESET on
            // "waiting for init ready". The helper needs none of them.
            reset_signal_handlers();
            let mut keep_fds: Vec<RawFd> = keep.to_vec();
            keep_fds.push(w.as_raw_fd());
            keep_fds.extend([0, 1, 2]);
            keep_fds.extend(super::helper_log_fds());
            close_fds_except(&mut keep_fds);
            // 0..2 stay taken (by /dev/null): libcontainer's own sockets must
            // not land there, where the container process dup2s its stdio.
            if let Ok(null) = nix::fcntl::open(
                "/dev/null",
                nix::fcntl::OFlag::O_RDWR,
                nix::sys::stat::Mode::empty(),
            ) {
                for fd in 0..3 {
                    if fd != null {
                        let _ = nix::unistd::dup2(null, fd);
                    }
                }
                if null > 2 {
                    let _ = nix::unistd::close(null);
                }
            }
            std::mem::forget(r);
            log::debug!("libcontainer helper {} running", std::process::id());
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(Error::Internal("libcontainer helper panicked".into())));
            let mut msg = encode_result(&res);
            // Fits the pipe buffer: the parent reads only after we exited.
            msg.truncate(32 * 1024);
            let _ = nix::unistd::write(&w, &msg);
            // SAFETY: ends the helper without running the agent's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(w);
            // Wait for the helper first: the container process it created
            // inherited the pipe's write end too (until its execve), so EOF
            // cannot mark the end of the result. The helper wrote its result
            // (< pipe capacity) before exiting.
            loop {
                match nix::sys::wait::waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    _ => break,
                }
            }
            nix::fcntl::fcntl(
                r.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .map_err(|e| Error::Internal(format!("read libcontainer helper: {e}")))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match nix::unistd::read(r.as_raw_fd(), &mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break, // EAGAIN: all the helper wrote was read
                }
            }
            decode_result(&out)
        }
    }
}

fn new_pid_namespace(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|nss| {
            nss.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
        })
        .unwrap_or(false)
}

impl ContainerManager {
    /// A manager keeping bundles and state under `state_dir` (e.g.
    /// `/run/vmrt/containers`, created if missing). Starts the reaper if
    /// [`super::start_reaper`] was not called yet.
    pub fn new(state_dir: PathBuf) -> Self {
        reaper::start_reaper();
        let _ = std::fs::create_dir_all(&state_dir);
        let (oom_tx, _) = broadcast::channel(64);
        Self {
            state_dir,
            containers: Mutex::new(HashMap::new()),
            oom_tx,
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, Error> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// OCI `create`: validates `spec_json` (config.json), writes the bundle
    /// `<state_dir>/<id>/config.json` with `root.path` = `rootfs`, and creates
    /// the container: namespaces, cgroup (`linux.cgroupsPath`, default
    /// `/vmrt/<id>`), mounts, and an init process that waits for [`Self::start`].
    /// `stdio` becomes the init process's stdio (see [`ProcessStdio`]).
    /// Returns the init process's pid.
    ///
    /// Errors: `InvalidSpec` naming the field (malformed JSON, missing rootfs,
    /// unknown namespace type, unknown seccomp syscall, ...), `AlreadyExists`,
    /// `Internal` (libcontainer failure, e.g. a mount or seccomp load failed).
    /// On error nothing is left behind (process, cgroup, state directory).
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &Path,
        stdio: ProcessStdio,
    ) -> Result<u32, Error> {
        let bundle = spec::prepare_bundle(id, spec_json, rootfs, stdio.terminal)?;
        if self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
        {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let dir = self.state_dir.join(id);
        let root = dir.join("state");
        let new_pid_ns = new_pid_namespace(&bundle.spec);
        let cgroup_dir = cgroups::cgroup_dir(&bundle.cgroup_path);
        let id_owned = id.to_string();
        let (dir2, root2) = (dir.clone(), root.clone());
        let (pid, exit, terminal) = tokio::task::spawn_blocking(move || {
            match std::fs::create_dir(&dir2) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::AlreadyExists(format!("container {id_owned}")))
                }
                Err(e) => return Err(Error::Internal(format!("create {}: {e}", dir2.display()))),
            }
            let result = create_blocking(&id_owned, &dir2, &root2, &bundle.json, stdio);
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&dir2);
            }
            result
        })
        .await
        .map_err(join_err)??;

        let init = Arc::new(Proc {
            pid,
            exit: exit.clone(),
            terminal,
        });
        let oom = cgroups::OomWatch::new(id.to_string(), cgroup_dir.clone(), self.oom_tx.clone());
        let oom_task = tokio::spawn(cgroups::watch_oom(oom.clone()));
        let exit_task = {
            let mut exit = exit;
            let cgroup_dir = cgroup_dir.clone();
            tokio::spawn(async move {
                let _ = exit.wait_for(Option::is_some).await;
                if !new_pid_ns {
                    // No PID namespace of its own: the kernel does not end the
                    // other processes with the init process; the cgroup does.
                    let _ = cgroups::signal_all(&cgroup_dir, Signal::SIGKILL);
                }
            })
        };
        let entry = Arc::new(Entry {
            id: id.to_string(),
            dir,
            root,
            cgroup_path: bundle.cgroup_path,
            cgroup_dir,
            init,
            started: AtomicBool::new(false),
            execs: Mutex::new(HashMap::new()),
            oom,
            oom_task,
            exit_task,
        });
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), entry);
        Ok(pid)
    }

    /// OCI `start`: runs the user program in the created container. Returns
    /// the init pid. Errors: `NotFound`, `FailedPrecondition` (not in the
    /// created state), `Internal`.
    pub async fn start(&self, id: &str) -> Result<u32, Error> {
        let entry = self.entry(id)?;
        let state = entry.root.join(id);
        let what = format!("start container {id}");
        tokio::task::spawn_blocking(move || {
            with_fork_guard(|_| {
                let mut c = Container::load(state).map_err(|e| lc_err(&what, e))?;
                if !c.can_start() {
                    return Err(Error::FailedPrecondition(format!(
                        "{what}: container is {}",
                        c.status()
                    )));
                }
                c.start().map_err(|e| lc_err(&what, e))
            })
        })
        .await
        .map_err(join_err)??;
        entry.started.store(true, Ordering::SeqCst);
        Ok(entry.init.pid)
    }

    /// Runs an additional process (OCI `process` object `process_json`) in
    /// the running container `id` (libcontainer tenant: joins its namespaces
    /// and cgroup). `exec_id` must be new for this container. Returns its pid.
    /// Errors: `NotFound`, `AlreadyExists`, `InvalidSpec` (`process.*`),
    /// `FailedPrecondition` (container not running), `Internal`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: ProcessStdio,
    ) -> Result<u32, Error> {
        let entry = self.entry(id)?;
        spec::validate_id("exec_id", exec_id)?;
        let process = spec::prepare_process(process_json, stdio.terminal)?;
        if entry
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(exec_id)
        {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} in container {id}"
            )));
        }
        if !entry.started.load(Ordering::SeqCst) || entry.init.exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let e2 = entry.clone();
        let exec_owned = exec_id.to_string();
        let (pid, exit, terminal) =
            tokio::task::spawn_blocking(move || exec_blocking(&e2, &exec_owned, &process, stdio))
                .await
                .map_err(join_err)??;
        let mut execs = entry.execs.lock().unwrap_or_else(|p| p.into_inner());
        execs.insert(
            exec_id.to_string(),
            Arc::new(Proc {
                pid,
                exit,
                terminal,
            }),
        );
        Ok(pid)
    }

    /// Sends `signal` (a Linux signal number) to the process `exec_id` ("" =
    /// init) of container `id`, or with `all` to every process of the
    /// container's cgroup (containerd's Kill `all`). Errors: `NotFound`
    /// (container, exec, or the process already exited), `InvalidSpec`
    /// (`signal`), `Internal`.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), Error> {
        let entry = self.entry(id)?;
        let sig = Signal::try_from(signal)
            .map_err(|_| Error::invalid("signal", format!("{signal} is not a signal number")))?;
        if all {
            return cgroups::signal_all(&entry.cgroup_dir, sig);
        }
        let proc = entry.process(exec_id)?;
        if proc.exited() {
            return Err(Error::NotFound(format!(
                "process {} of container {id}: already exited",
                if exec_id.is_empty() { "init" } else { exec_id }
            )));
        }
        // Not yet reaped (the reaper records the exit before the pid can be
        // reused), so the pid still names our process.
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(proc.pid as i32), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::Internal(format!("kill({}, {sig}): {e}", proc.pid))),
        }
    }

    /// Waits until process `exec_id` ("" = init) of container `id` exited and
    /// returns its exit (containerd convention: code, or 128 + signal).
    /// Returns at once for a process that already exited. Errors: `NotFound`.
    ///
    /// An OOM kill in the container's cgroup is reported on
    /// [`ContainerManager::oom_events`] before this returns, so it is never
    /// lost to a delete that follows the exit at once (`ctr run --rm`).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, Error> {
        let entry = self.entry(id)?;
        let proc = entry.process(exec_id)?;
        let mut rx = proc.exit.clone();
        let v = *rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Internal("reaper stopped".into()))?;
        entry.oom.check();
        Ok(v.expect("wait_for returned Some"))
    }

    /// OCI `delete`: kills every process of the container (SIGKILL through
    /// the cgroup) if any is left, waits for them to be reaped, removes the
    /// cgroup, libcontainer's state and the bundle directory. Errors:
    /// `NotFound`, `Internal` (then the container stays known and delete can
    /// be retried).
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let entry = self.entry(id)?;
        let mut procs = vec![entry.init.clone()];
        procs.extend(
            entry
                .execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        // Last look at memory.events before the cgroup goes away.
        entry.oom.check();
        if procs.iter().any(|p| !p.exited()) || !cgroups::all_pids(&entry.cgroup_dir).is_empty() {
            cgroups::signal_all(&entry.cgroup_dir, Signal::SIGKILL)?;
        }
        for p in &procs {
            let mut rx = p.exit.clone();
            if tokio::time::timeout(KILL_TIMEOUT, rx.wait_for(Option::is_some))
                .await
                .is_err()
            {
                return Err(Error::Internal(format!(
                    "delete container {id}: pid {} did not exit within {KILL_TIMEOUT:?} of SIGKILL",
                    p.pid
                )));
            }
        }
        let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
        while !cgroups::all_pids(&entry.cgroup_dir).is_empty() {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "delete container {id}: processes left in {}",
                    entry.cgroup_dir.display()
                )));
            }
            let _ = cgroups::signal_all(&entry.cgroup_dir, Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e2 = entry.clone();
        tokio::task::spawn_blocking(move || {
            with_fork_guard(|_| -> Result<(), Error> {
                let state = e2.root.join(&e2.id);
                if state.exists() {
                    let what = format!("delete container {}", e2.id);
                    let mut c = Container::load(state).map_err(|e| lc_err(&what, e))?;
                    c.delete(true).map_err(|e| lc_err(&what, e))?;
                }
                // libcontainer removes the leaf cgroup; remove it ourselves
                // if it is still there (e.g. state was already gone).
                let _ = std::fs::remove_dir(&e2.cgroup_dir);
                std::fs::remove_dir_all(&e2.dir).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(Error::Internal(format!("remove {}: {e}", e2.dir.display())))
                    }
                })
            })
        })
        .await
        .map_err(join_err)??;
        entry.oom_task.abort();
        entry.exit_task.abort();
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// OCI-runtime `pause`: freezes every process of the container (cgroup v2
    /// `cgroup.freeze`). Errors: `NotFound`, `FailedPrecondition` (not
    /// running), `Internal`.
    pub async fn pause(&self, id: &str) -> Result<(), Error> {
        self.freezer(id, true).await
    }

    /// Thaws a paused container. Errors: `NotFound`, `FailedPrecondition`
    /// (not paused), `Internal`.
    pub async fn resume(&self, id: &str) -> Result<(), Error> {
        self.freezer(id, false).await
    }

    async fn freezer(&self, id: &str, freeze: bool) -> Result<(), Error> {
        let entry = self.entry(id)?;
        let state = entry.root.join(id);
        let what = format!("{} container {id}", if freeze { "pause" } else { "resume" });
        tokio::task::spawn_blocking(move || {
            let mut c = Container::load(state).map_err(|e| lc_err(&what, e))?;
            if freeze { c.pause() } else { c.resume() }.map_err(|e| lc_err(&what, e))
        })
        .await
        .map_err(join_err)?
    }

    /// Applies an OCI `linux.resources` object (`resources_json`) to the
    /// container's cgroup. Errors: `NotFound`, `InvalidSpec` (`resources`),
    /// `Internal` (e.g. the controller is not enabled).
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), Error> {
        let entry = self.entry(id)?;
        let resources = spec::parse_resources(resources_json)?;
        tokio::task::spawn_blocking(move || {
            cgroups::update(&entry.id, &entry.cgroup_path, &resources)
        })
        .await
        .map_err(join_err)?
    }

    /// cgroup v2 statistics of the container. Errors: `NotFound`,
    /// `FailedPrecondition` (cgroup gone).
    pub async fn stats(&self, id: &str) -> Result<Stats, Error> {
        let entry = self.entry(id)?;
        cgroups::read_stats(&entry.cgroup_dir)
    }

    /// Pids (in the agent's PID namespace) of every process in the
    /// container's cgroup, sorted. Errors: `NotFound`.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, Error> {
        let entry = self.entry(id)?;
        Ok(cgroups::all_pids(&entry.cgroup_dir))
    }

    /// Sets the window size of the terminal of process `exec_id` ("" = init).
    /// A process without a terminal ignores it (as containerd's runc shim).
    /// Errors: `NotFound`, `Internal`.
    pub async fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), Error> {
        let proc = self.entry(id)?.process(exec_id)?;
        match &proc.terminal {
            Some(t) => t.resize(rows, cols),
            None => Ok(()),
        }
    }

    /// Ends the stdin of process `exec_id` ("" = init). With a terminal: stops
    /// forwarding the stdin stream and sends VEOF (^D). Without: the process
    /// owns the stream itself and sees EOF when the shim closes its write
    /// side, so there is nothing to do. Errors: `NotFound`.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        let proc = self.entry(id)?.process(exec_id)?;
        if let Some(t) = &proc.terminal {
            t.close_stdin();
        }
        Ok(())
    }

    /// Subscribes to OOM kills: receives the container id each time the
    /// kernel OOM-killed a process in a container's cgroup (`memory.events`
    /// `oom_kill` grew).
    pub fn oom_events(&self) -> broadcast::Receiver<String> {
        self.oom_tx.subscribe()
    }
}

type Started = (u32, watch::Receiver<Option<ExitInfo>>, Option<Terminal>);

/// A libcontainer builder for `id`, with the stdio streams (re-numbered to
/// fds >= 3; their numbers are pushed on `keep`) or the console socket.
fn builder(
    id: &str,
    root: &Path,
    stdio: &mut ProcessStdio,
    console: Option<&ConsoleSocket>,
    keep: &mut Vec<RawFd>,
) -> Result<ContainerBuilder, Error> {
    let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map_err(|e| lc_err("state root", e))?;
    match console {
        Some(c) => b = b.with_console_socket(Some(c.path())),
        None => {
            if let Some(fd) = stdio.stdin.take() {
                let fd = dup_high(fd)?;
                keep.push(fd.as_raw_fd());
                b = b.with_stdin(fd);
            }
            if let Some(fd) = stdio.stdout.take() {
                let fd = dup_high(fd)?;
                keep.push(fd.as_raw_fd());
                b = b.with_stdout(fd);
            }
            if let Some(fd) = stdio.stderr.take() {
                let fd = dup_high(fd)?;
                keep.push(fd.as_raw_fd());
                b = b.with_stderr(fd);
            }
        }
    }
    Ok(b)
}

fn attach_terminal(
    console: Option<ConsoleSocket>,
    stdio: ProcessStdio,
) -> Result<Option<Terminal>, Error> {
    match console {
        Some(c) => {
            let master: OwnedFd = c.receive_master(CONSOLE_TIMEOUT)?;
            Ok(Some(Terminal::start(master, stdio.stdin, stdio.stdout)?))
        }
        None => Ok(None),
    }
}

fn create_blocking(
    id: &str,
    dir: &Path,
    root: &Path,
    config_json: &[u8],
    mut stdio: ProcessStdio,
) -> Result<Started, Error> {
    std::fs::write(dir.join("config.json"), config_json)
        .map_err(|e| Error::Internal(format!("write config.json: {e}")))?;
    std::fs::create_dir(root)
        .map_err(|e| Error::Internal(format!("create {}: {e}", root.display())))?;
    let console = if stdio.terminal {
        Some(ConsoleSocket::bind(dir)?)
    } else {
        None
    };
    let mut keep = Vec::new();
    let b = builder(id, root, &mut stdio, console.as_ref(), &mut keep)?;
    let what = format!("create container {id}");
    // With the helper's first line below, splits the time before libcontainer's
    // own first line (docs/design.md: where a `ctr run` spends its time).
    log::debug!("{what}: spec and bundle ready; forking the libcontainer helper");
    let (pid, exit) = with_fork_guard(|guard| {
        let pid = in_helper(guard, &keep, move || {
            let c = b
                .as_init(dir)
                .with_systemd(false)
                .with_no_pivot(root_is_initramfs())
                .with_detach(true)
                .build()
                .map_err(|e| lc_err(&what, e))?;
            Ok(c.pid()
                .ok_or_else(|| Error::Internal(format!("{what}: no init pid")))?
                .as_raw() as u32)
        })?;
        Ok::<_, Error>((pid, reaper::register(guard, pid)))
    })?;
    match attach_terminal(console, stdio) {
        Ok(t) => Ok((pid, exit, t)),
        Err(e) => {
            // Undo the created container: kill it and let libcontainer clean up.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            with_fork_guard(|_| {
                if let Ok(mut c) = Container::load(root.join(id)) {
                    let _ = c.delete(true);
                }
            });
            Err(e)
        }
    }
}

fn exec_blocking(
    entry: &Entry,
    exec_id: &str,
    process_json: &[u8],
    mut stdio: ProcessStdio,
) -> Result<Started, Error> {
    let process_file = entry.dir.join(format!("exec-{exec_id}.json"));
    std::fs::write(&process_file, process_json)
        .map_err(|e| Error::Internal(format!("write {}: {e}", process_file.display())))?;
    let result = (|| {
        let console = if stdio.terminal {
            Some(ConsoleSocket::bind(&entry.dir)?)
        } else {
            None
        };
        let mut keep = Vec::new();
        let b = builder(
            &entry.id,
            &entry.root,
            &mut stdio,
            console.as_ref(),
            &mut keep,
        )?;
        let what = format!("exec {exec_id} in container {}", entry.id);
        let (pid, exit) = with_fork_guard(|guard| {
            let pid = in_helper(guard, &keep, || {
                Ok(b.as_tenant()
                    .with_detach(true)
                    .with_process(Some(&process_file))
                    .build()
                    .map_err(|e| lc_err(&what, e))?
                    .as_raw() as u32)
            })?;
            Ok::<_, Error>((pid, reaper::register(guard, pid)))
        })?;
        match attach_terminal(console, stdio) {
            Ok(t) => Ok((pid, exit, t)),
            Err(e) => {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
                Err(e)
            }
        }
    })();
    let _ = std::fs::remove_file(&process_file);
    result
}

/// True when `/` is the kernel's initial rootfs (the initramfs the agent runs
/// from as PID 1). pivot_root(2) fails with EINVAL there, so containers are
/// entered by moving their rootfs onto `/` and chroot-ing instead, as runc's
/// `--no-pivot` does; the container still gets its own mount namespace.
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // mountinfo: id parent major:minor root mountpoint ... - fstype source
                f.get(4) == Some(&"/")
                    && l.split(" - ")
                        .nth(1)
                        .is_some_and(|t| t.starts_with("rootfs "))
            })
        })
        .unwrap_or(false)
}
