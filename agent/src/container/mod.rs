//! OCI container lifecycle inside the guest (OCI runtime spec 1.1, Linux).
//!
//! [`ContainerManager`] runs containers in-process with youki's `libcontainer`
//! (no runc binary): the bundle lives in `<state_dir>/<container_id>/`
//! (`config.json` = the shim's spec with `root.path` replaced by the guest rootfs
//! path), libcontainer's own state in `<state_dir>/<container_id>/state/`.
//!
//! Processes started by libcontainer are children of the agent; the agent is
//! PID 1 in the guest and must reap every orphan too: call [`start_reaper`]
//! once at agent start. Anything else in the agent that forks and waits for a
//! child must hold [`reaper::lock`] for the whole fork..wait span, or the
//! reaper may collect its child first.

mod cgroups;
mod manager;
pub mod reaper;
mod spec;
mod stdio;

use std::os::fd::OwnedFd;
use std::time::SystemTime;

pub use cgroups::Stats;
pub use manager::ContainerManager;
pub use reaper::start_reaper;

/// Descriptors the libcontainer helper keeps open (at most
/// [`MAX_HELPER_LOG_FDS`]; -1 = unused slot): the agent's log destinations,
/// so that what libcontainer logs in the helper and in the container's init
/// process before its `execve` reaches the log. They must be close-on-exec,
/// so the workload never inherits them.
static HELPER_LOG_FDS: [std::sync::atomic::AtomicI32; MAX_HELPER_LOG_FDS] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; MAX_HELPER_LOG_FDS];

/// How many descriptors [`keep_log_fd_in_helpers`] can register.
pub const MAX_HELPER_LOG_FDS: usize = 4;

/// Registers `fd` (a close-on-exec log descriptor of the agent) to stay open
/// in the forked libcontainer helpers, which otherwise close every descriptor
/// they did not open. Returns false when all [`MAX_HELPER_LOG_FDS`] slots are
/// taken or `fd` is negative.
pub fn keep_log_fd_in_helpers(fd: std::os::fd::RawFd) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    fd >= 0
        && HELPER_LOG_FDS.iter().any(|slot| {
            slot.load(Relaxed) == fd || slot.compare_exchange(-1, fd, Relaxed, Relaxed).is_ok()
        })
}

/// The descriptors registered with [`keep_log_fd_in_helpers`].
fn helper_log_fds() -> impl Iterator<Item = std::os::fd::RawFd> {
    HELPER_LOG_FDS
        .iter()
        .map(|slot| slot.load(std::sync::atomic::Ordering::Relaxed))
        .filter(|&fd| fd >= 0)
}

/// Errors of container operations. The ttrpc server maps them to codes:
/// `NotFound` → NOT_FOUND, `AlreadyExists` → ALREADY_EXISTS, `InvalidSpec` →
/// INVALID_ARGUMENT, `FailedPrecondition` → FAILED_PRECONDITION, `Internal` →
/// INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No container `id` (or no exec `exec_id` in it).
    #[error("{0} not found")]
    NotFound(String),
    /// A container or exec with this id already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request's spec (config.json, process JSON, resources JSON), rootfs
    /// or id is invalid. `field` is the JSON path of the offending field
    /// (e.g. `linux.namespaces[2].type`), `rootfs`, or `container_id`.
    #[error("invalid spec: {field}: {reason}")]
    InvalidSpec {
        /// JSON path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The operation is not allowed in the container's or process's current
    /// state (e.g. start of a running container, exec into a stopped one).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Anything else: libcontainer, cgroup or system call failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The stdio of one container process (OCI `process`).
///
/// Each present fd becomes the process's fd 0/1/2 directly (in the guest these
/// are the vsock stream sockets of the stdio protocol; in tests pipes or
/// socketpairs). The manager closes its own copies once the process started,
/// so EOF propagates to the peer when the process (and its children) close
/// them. A missing stream becomes `/dev/null`.
///
/// With `terminal = true` the process gets a pseudo-terminal (the spec's
/// `process.terminal` is forced to true): the agent copies `stdin` → pty
/// master and pty master → `stdout`; `stderr` is unused and closed.
#[derive(Debug, Default)]
pub struct ProcessStdio {
    /// Readable stream whose bytes become the process's stdin.
    pub stdin: Option<OwnedFd>,
    /// Writable stream that receives the process's stdout (or the terminal output).
    pub stdout: Option<OwnedFd>,
    /// Writable stream that receives the process's stderr (unused with a terminal).
    pub stderr: Option<OwnedFd>,
    /// Give the process a pseudo-terminal.
    pub terminal: bool,
}

/// Exit of a container process, as containerd expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number when killed by a signal (SIGKILL → 137).
    pub status: u32,
    /// When the agent reaped the process.
    pub exited_at: SystemTime,
}
