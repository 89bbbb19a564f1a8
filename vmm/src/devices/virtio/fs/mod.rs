//! virtio-fs device (virtio 1.2 §5.11) served in-process by `fuse-backend-rs`.
//!
//! The guest sees a file system device (device ID 26) with two virtqueues:
//! the high-priority queue (index 0, FORGET/INTERRUPT) and one request queue
//! (index 1). The configuration space (§5.11.4) is 40 bytes:
//! `tag: [u8; 36]` (UTF-8, NUL-padded) followed by `num_request_queues: u32` (LE, = 1).
//! Only `VIRTIO_F_VERSION_1` is offered (no DAX window, no notification queue).
//!
//! Every virtqueue buffer carries one FUSE request (readable descriptors:
//! `fuse_in_header` + op arguments) and room for its reply (writable
//! descriptors: `fuse_out_header` + op reply). Requests are decoded by
//! [`fuse_backend_rs::api::server::Server`] and executed by
//! [`confined::ConfinedFs`], a thin confinement layer over
//! `fuse_backend_rs::passthrough::PassthroughFs` rooted at the share directory.
//!
//! Layout:
//! - [`confined`]: the `FileSystem` wrapper and the confinement rules it adds;
//! - [`queue`]: [`queue::process_queue`], the virtqueue loop over guest memory
//!   (runs in unit tests on mock queues, without KVM);
//! - this module: [`CachePolicy`], [`Fs`] (the [`VirtioDevice`]) and its worker thread.
//!
//! Confinement (the guest is hostile):
//! - every lookup is relative to an `O_PATH` fd of the parent held by the
//!   backend, with `O_NOFOLLOW`: symlinks are never followed host-side; they
//!   are returned to the guest as links and resolved by the guest kernel
//!   inside the share;
//! - `..` looked up from the share root stays at the root;
//! - names containing `/`, and `.`/`..` for create-type operations, are rejected (EINVAL);
//! - inodes are referenced by held `O_PATH` fds (no `open_by_handle_at`:
//!   `inode_file_handles` is off), so swapping a path component for a symlink
//!   after lookup does not redirect operations;
//! - LINK/RENAME only take inodes the guest obtained by looking them up inside the share;
//! - MKNOD of character or block devices is refused with EPERM;
//! - OPEN/CREATE of anything but regular files and directories (device nodes,
//!   FIFOs, sockets, symlinks already present in the share) fails with EBADF
//!   in the backend (`is_safe_inode`), so a device node placed in the share by
//!   the host is never opened host-side on the guest's behalf;
//! - DAX mappings (SETUPMAPPING/REMOVEMAPPING) and ioctls are refused (ENOSYS).
//!
//! Side effect to know about: `PassthroughFs` sets the process umask to 0 on
//! FUSE_INIT so that the modes the guest asks for are applied exactly.

pub mod confined;
pub mod queue;

#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::confined::ConfinedFs;
use super::{
    ActivateContext, ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Device ID of a virtio file system device (virtio 1.2 §5.11.1).
pub const VIRTIO_ID_FS: u32 = 26;
/// Length of the `tag` field of the configuration space (virtio 1.2 §5.11.4).
pub const TAG_LEN: usize = 36;
/// Size of the configuration space in bytes: `tag[36]` + `num_request_queues: u32`.
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// Number of request queues offered (virtio 1.2 §5.11.2); the total queue
/// count is this plus the high-priority queue.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Index of the high-priority queue (virtio 1.2 §5.11.2).
pub const HIPRIO_QUEUE: usize = 0;
/// Index of the (single) request queue.
pub const REQUEST_QUEUE: usize = 1;
/// Maximum size of each virtqueue, in descriptors. Large enough for a 1 MiB
/// FUSE WRITE made of 4 KiB pages without indirect descriptors.
pub const QUEUE_MAX_SIZE: u16 = 1024;

/// How much the guest may cache file data and metadata (`shares[].cache` in
/// the VMM configuration, see `docs/contracts.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// No data caching (files opened with `FOPEN_DIRECT_IO`) and zero entry /
    /// attribute timeouts: the guest always sees host-side changes. Default.
    #[default]
    Never,
    /// Close-to-open consistency: data cached while a file is open, entries
    /// and attributes cached for 1 s, and so are names found missing (negative
    /// entries); directory listings are cached until the guest sees the
    /// directory's mtime change (zero-message opendir).
    Auto,
    /// The guest keeps cached data across opens and caches entries and
    /// attributes for a day; only correct when the guest has exclusive access.
    Always,
}

impl CachePolicy {
    /// Entry and attribute timeout reported to the guest for this policy.
    pub fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }

    fn backend(self) -> passthrough::CachePolicy {
        match self {
            CachePolicy::Never => passthrough::CachePolicy::Never,
            CachePolicy::Auto => passthrough::CachePolicy::Auto,
            CachePolicy::Always => passthrough::CachePolicy::Always,
        }
    }
}

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tag is empty, longer than 36 bytes or contains a NUL byte.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes of UTF-8 without NUL")]
    InvalidTag(String),
    /// The share directory does not exist or cannot be resolved.
    #[error("virtio-fs share {path}: {source}")]
    SharedDir {
        /// The share directory as configured.
        path: PathBuf,
        /// Why it could not be resolved.
        source: std::io::Error,
    },
    /// The share path resolves to something that is not a directory.
    #[error("virtio-fs share {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The share path is not valid UTF-8 or contains a NUL byte.
    #[error("virtio-fs share path {0:?} must be UTF-8 without NUL")]
    InvalidPath(PathBuf),
    /// The passthrough backend could not be created.
    #[error("virtio-fs backend for {path}: {source}")]
    Backend {
        /// The share directory.
        path: PathBuf,
        /// The backend's error.
        source: std::io::Error,
    },
}

/// The worker thread serving the virtqueues after activation.
struct Worker {
    kill: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-fs device exporting one host directory under a tag.
///
/// Created by the builder from `shares[]` of the VMM configuration; the guest
/// mounts it with `mount -t virtiofs <tag> <dir>`.
pub struct Fs {
    tag: String,
    root: PathBuf,
    cache: CachePolicy,
    config_space: [u8; CONFIG_SPACE_LEN],
    server: Arc<Server<ConfinedFs>>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("root", &self.root)
            .field("cache", &self.cache)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

/// Builds the FUSE server over the confined passthrough backend for `root`
/// (an absolute, canonical directory path).
pub fn build_server(root: &Path, cache: CachePolicy) -> Result<Server<ConfinedFs>, Error> {
    let root_str = root
        .to_str()
        .filter(|s| !s.contains('\0'))
        .ok_or_else(|| Error::InvalidPath(root.to_path_buf()))?;
    let timeout = cache.timeout();
    let cfg = passthrough::Config {
        root_dir: root_str.to_string(),
        cache_policy: cache.backend(),
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: true,
        do_import: true,
        writeback: false,
        no_open: false,
        // Zero-message opendir (FUSE_NO_OPENDIR_SUPPORT, Linux >= 5.1) unless
        // caching is off: the guest opens directories without OPENDIR and
        // RELEASEDIR round trips (READDIR then carries no handle and the
        // backend opens the directory per request) and keeps listings, which
        // it drops when it sees the directory's mtime change, i.e. within the
        // policy's attribute timeout. With `never` listings must not be kept.
        no_opendir: cache != CachePolicy::Never,
        killpriv_v2: false,
        // Inodes are held as O_PATH fds; never reopened by file handle.
        inode_file_handles: false,
        no_readdir: false,
        seal_size: false,
        enable_mntid: false,
        dax_file_size: None,
        dir_entry_timeout: None,
        dir_attr_timeout: None,
        use_host_ino: false,
        allow_direct_io: true,
    };
    let backend = PassthroughFs::<()>::new(cfg).map_err(|source| Error::Backend {
        path: root.to_path_buf(),
        source,
    })?;
    let fs = ConfinedFs::new(backend, root, timeout).map_err(|source| Error::Backend {
        path: root.to_path_buf(),
        source,
    })?;
    Ok(Server::new(fs))
}

impl Fs {
    /// Creates the device for `shared_dir` (must exist and be a directory;
    /// symlinks in the path are resolved once, here) exported under `tag`
    /// (1..=36 bytes of UTF-8, no NUL).
    ///
    /// Errors: [`Error::InvalidTag`], [`Error::SharedDir`], [`Error::NotADirectory`],
    /// [`Error::InvalidPath`], [`Error::Backend`].
    pub fn new(tag: &str, shared_dir: &Path, cache: CachePolicy) -> Result<Fs, Error> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(Error::InvalidTag(tag.to_string()));
        }
        let root = std::fs::canonicalize(shared_dir).map_err(|source| Error::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        })?;
        let meta = std::fs::metadata(&root).map_err(|source| Error::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory(shared_dir.to_path_buf()));
        }
        let server = build_server(&root, cache)?;

        let mut config_space = [0u8; CONFIG_SPACE_LEN];
        config_space[..tag.len()].copy_from_slice(tag.as_bytes());
        config_space[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());

        Ok(Fs {
            tag: tag.to_string(),
            root,
            cache,
            config_space,
            server: Arc::new(server),
            worker: None,
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The canonical host directory being shared.
    pub fn shared_dir(&self) -> &Path {
        &self.root
    }

    /// Stops the worker thread, if running, and waits for it.
    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            if let Err(e) = worker.kill.write(1) {
                log::error!("virtio-fs {}: cannot signal worker to stop: {e}", self.tag);
                return;
            }
            if worker.thread.join().is_err() {
                log::error!("virtio-fs {}: worker thread panicked", self.tag);
            }
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE; 1 + NUM_REQUEST_QUEUES as usize]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_SPACE_LEN {
            return;
        }
        let n = data.len().min(CONFIG_SPACE_LEN - start);
        data[..n].copy_from_slice(&self.config_space[start..start + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The virtio-fs configuration space is read-only for the driver (§5.11.4).
        log::warn!(
            "virtio-fs {}: ignoring driver write of {} bytes to config offset {offset}",
            self.tag,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let expected = 1 + NUM_REQUEST_QUEUES as usize;
        if ctx.queues.len() != expected || ctx.queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: ctx.queues.len().min(ctx.queue_evts.len()),
            });
        }
        self.stop_worker();

        let kill = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| ActivateError::Backend(format!("virtio-fs kill eventfd: {e}")))?;
        let kill_thread = kill
            .try_clone()
            .map_err(|e| ActivateError::Backend(format!("virtio-fs kill eventfd: {e}")))?;
        let server = Arc::clone(&self.server);
        let tag = self.tag.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-fs-{}", self.tag))
            .spawn(move || {
                if let Err(e) = run_worker(
                    &tag,
                    ctx.mem,
                    ctx.queues,
                    ctx.queue_evts,
                    kill_thread,
                    ctx.interrupt,
                    &server,
                ) {
                    log::error!("virtio-fs {tag}: worker stopped: {e}");
                }
            })
            .map_err(|e| ActivateError::Backend(format!("virtio-fs worker thread: {e}")))?;
        self.worker = Some(Worker { kill, thread });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        // A fresh backend: inodes and handles of the previous driver are dropped.
        match build_server(&self.root, self.cache) {
            Ok(server) => {
                self.server = Arc::new(server);
                true
            }
            Err(e) => {
                log::error!(
                    "virtio-fs {}: cannot rebuild backend on reset: {e}",
                    self.tag
                );
                false
            }
        }
    }
}

/// The worker's epoll loop: one event per queue eventfd (data = queue index)
/// plus the kill eventfd. Returns when killed or on an epoll error.
fn run_worker(
    tag: &str,
    mem: GuestMemory,
    mut queues: Vec<virtio_queue::Queue>,
    queue_evts: Vec<EventFd>,
    kill: EventFd,
    interrupt: Arc<Interrupt>,
    server: &Server<ConfinedFs>,
) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    let kill_token = queue_evts.len() as u64;
    for (i, evt) in queue_evts.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, kill_token),
    )?;

    // Buffers may already be available before the first notification.
    for queue in queues.iter_mut() {
        let outcome = queue::process_queue(queue, &mem, server);
        if outcome.needs_notification {
            interrupt.signal_used_queue();
        }
    }

    let mut events = vec![EpollEvent::default(); queue_evts.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            let token = event.data();
            if token == kill_token {
                log::debug!("virtio-fs {tag}: worker stopping");
                return Ok(());
            }
            let Some(idx) = usize::try_from(token).ok().filter(|&i| i < queues.len()) else {
                continue;
            };
            // Drain the eventfd; EAGAIN just means a spurious wakeup.
            let _ = queue_evts[idx].read();
            let outcome = queue::process_queue(&mut queues[idx], &mem, server);
            if outcome.panics > 0 {
                log::error!(
                    "virtio-fs {tag}: {} request(s) on queue {idx} panicked in the backend",
                    outcome.panics
                );
            }
            if outcome.needs_notification {
                interrupt.signal_used_queue();
            }
        }
    }
}
