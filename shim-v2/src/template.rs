//! VM templates, the shim's part (Kata's `[factory] enable_template`,
//! Firecracker-style snapshot restore): with `factory.template = true` a template
//! VM boots once per machine configuration, its agent asks the VMM to snapshot it
//! once its listeners are up, and later sandboxes start from that snapshot
//! instead of booting the guest kernel.
//!
//! Layout under `factory.template_dir` (created 0700 if missing; it and every
//! `<key>/` used must be directories, not symbolic links, owned by the shim's
//! effective uid and neither group- nor other-writable, else templates are not
//! used: [`check_private`]):
//!
//! * `<key>/` — a complete template: `state.json` and `memory` only. It appears
//!   by `rename(2)` of a finished build, so a `<key>/state.json` is complete.
//! * `<key>.lock` — `flock(2)`ed exclusively by the shim that builds `<key>`
//!   ([`BuildLock`]), from its check for a template to the template's install
//!   (or failure), and by whoever removes `<key>/`; other shims wait for it
//!   (within their sandbox's `agent.timeout_ms`) and then use what it built. It
//!   stays (a few bytes): removing a lock file others may hold would break it.
//! * `<key>.tmp-<pid>-<n>/` — a build in progress: `vm.json`, `vmm.log`,
//!   `console.log`, `vsock.sock`, `vmm.lock` (held by the template VMM), an
//!   empty `share/`, and at the end the VMM's `state.json` and `memory`.
//! * `<key>.del-<pid>-<n>/` — a template being removed.
//! * `<key>.failed` — the reason the last build of `<key>` failed; builds of
//!   `<key>` wait [`RETRY_AFTER`] after it, so that a template that cannot be
//!   built (each try may cost `agent.timeout_ms`) does not slow every sandbox.
//!
//! The key ([`template_key`]) hashes everything the VMM's restore checks plus
//! the identity (path, size, mtime) of the VMM, kernel and initrd files, so
//! that a rebuilt guest or VMM gets a new template. The template VM and each
//! VM restored from it get the same `vm.json` but for the device paths and
//! `snapshot` ([`render_vm_json`]).
//!
//! Nothing is left behind on any path: a failed or cancelled build kills and
//! reaps its VMM and removes its directory; the template VMM dies with the
//! shim (`PR_SET_PDEATHSIG`), and the next build removes the directories of
//! builds whose shim died ([`sweep`]). Templates of other keys idle for
//! [`IDLE_AFTER`] (no sandbox started from them) are removed by the next build.
//!
//! The whole template path of one sandbox — waiting for another shim's build,
//! its own build, the restore — is bounded by one `agent.timeout_ms` from the
//! start of the sandbox ([`prepare`]'s `deadline`), so that a template that
//! fails costs a sandbox at most about that before it boots normally.

use std::{
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, MetadataExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use crate::{
    agent::{self, Agent, AgentError},
    config::Config,
    sandbox::{
        cancelled, cleanup_dir, diagnostics, render_vm_json, signal_group, spawn_vmm, try_flock,
        vmm_alive, CancelBoot, SpawnError, VmPaths, VmStart, VmmChild,
    },
};

/// The file a template VMM writes last (by rename), so its presence means the
/// template is complete, and the template's guest memory: the VMM's names.
pub use vmm::snapshot::{MEMORY_FILE, STATE_FILE};
/// How long after a failed build of a key the next build of it is tried.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// Age after which a build or removal directory whose VMM is not running is
/// taken for one whose shim died.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// How long a template of another key may go unused before a build removes it.
pub const IDLE_AFTER: Duration = Duration::from_secs(3600);
/// Random bytes sent in `Restored` to reseed the guest's CRNG.
pub const ENTROPY_BYTES: usize = 64;

/// Suffix of a build directory.
const TMP_INFIX: &str = ".tmp-";
/// Suffix of a directory being removed.
const DEL_INFIX: &str = ".del-";
/// Suffix of a failed build's marker.
const FAILED_SUFFIX: &str = ".failed";
/// Suffix of a key's build lock ([`BuildLock`]).
const LOCK_SUFFIX: &str = ".lock";
/// How often a sandbox waiting for another's build of its template retries
/// the lock.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// Numbers the build and removal directories of this shim.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Errors building or finding a template. None fails a sandbox: the shim boots
/// it normally instead ([`crate::sandbox::Sandbox::start`]).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The template VMM could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The template VM's hybrid vsock socket path does not fit in `sockaddr_un`.
    #[error("template VM socket {path} is {len} bytes, more than sockaddr_un holds ({max})", max = vmm::config::MAX_UDS_PATH_LEN)]
    SocketPath {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The template VM did not exit within what was left of the sandbox's
    /// `agent.timeout_ms`; it was killed.
    #[error("template VM did not write its snapshot within {after_ms} ms (what was left of agent.timeout_ms); killed it; {diagnostics}")]
    Timeout {
        /// The limit, milliseconds.
        after_ms: u64,
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// The template VM exited with a failure status.
    #[error("template VM exited with status {status}; {diagnostics}")]
    VmmExited {
        /// Exit status (128 + signal if killed).
        status: i32,
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// The template VM exited 0 without a complete snapshot.
    #[error("template VM exited with status 0 without writing {STATE_FILE}; {diagnostics}")]
    Incomplete {
        /// VMM log and console tail.
        diagnostics: String,
    },
    /// Another shim's template won the race to the final directory, and is incomplete.
    #[error("template {0} from another shim has no {STATE_FILE}")]
    Lost(PathBuf),
    /// A build of this key failed recently; it is not tried again yet.
    #[error("its last build failed {ago_s} s ago, not retried before {RETRY_AFTER:?} have passed: {reason}")]
    RecentlyFailed {
        /// Seconds since the failure.
        ago_s: u64,
        /// Why it failed (first line).
        reason: String,
    },
    /// The template directory or `<key>/` may not be trusted: a symbolic
    /// link, not a directory, owned by another uid, or group- or
    /// other-writable ([`check_private`]).
    #[error("{path} {reason}; VM templates need a directory of the shim's uid ({euid}) that only it can write", euid = nix::unistd::geteuid())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another shim's build of this key held `<key>.lock` until too little of
    /// the sandbox's `agent.timeout_ms` was left for a build of its own.
    #[error("another sandbox's build of it held {lock} for {waited_ms} ms, leaving too little of agent.timeout_ms for this sandbox", lock = .lock.display())]
    Busy {
        /// The lock file.
        lock: PathBuf,
        /// How long this sandbox waited for it.
        waited_ms: u128,
    },
    /// The sandbox's boot was called off during the build.
    #[error("template build cancelled")]
    Cancelled,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> TemplateError {
    move |source| TemplateError::Io { context, source }
}

/// A complete template: `<template_dir>/<key>` with `state.json` and `memory`.
#[derive(Debug)]
pub struct Template {
    /// The template key, 16 hex digits.
    pub key: String,
    /// The template directory, `snapshot.dir` of a restore.
    pub dir: PathBuf,
    /// Inode of `dir` when it was found: [`Template::discard`] removes only that one.
    ino: u64,
}

impl Template {
    /// The complete template in `dir`, if there is one (`dir/state.json` exists).
    /// Marks it used (the directory's mtime) so that no build removes it as idle.
    /// `Ok(None)` when `dir` is missing or has no `state.json`.
    ///
    /// Errors: [`TemplateError::Unsafe`] when `dir` exists but is not a
    /// directory of the shim's own that only it can write ([`check_private`];
    /// checked on the opened directory, symbolic links not followed),
    /// [`TemplateError::Io`] when it cannot be opened.
    fn open(key: &str, dir: &Path) -> Result<Option<Template>, TemplateError> {
        let f = match open_dir_nofollow(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                // Say what it is instead of the errno.
                let m = std::fs::symlink_metadata(dir).map_err(io_err(format!("stat {}", dir.display())))?;
                return check_private(dir, &m).map(|()| None);
            }
            Err(e) => return Err(io_err(format!("open {}", dir.display()))(e)),
        };
        let meta = f.metadata().map_err(io_err(format!("stat {}", dir.display())))?;
        check_private(dir, &meta)?;
        match std::fs::symlink_metadata(dir.join(STATE_FILE)) {
            Ok(m) if m.is_file() => {}
            _ => return Ok(None),
        }
        let _ = f.set_modified(SystemTime::now());
        Ok(Some(Template {
            key: key.into(),
            dir: dir.to_path_buf(),
            ino: meta.ino(),
        }))
    }

    /// Removes the template because a sandbox could not start from it
    /// (`reason`), so that the next sandbox builds it again. A directory that is
    /// no longer this template (rebuilt meanwhile by another shim) is kept, and
    /// so is the template while a build of its key holds `<key>.lock` (that
    /// build either finds this template and uses it, or made another one).
    pub fn discard(&self, reason: &str) {
        let Some(root) = self.dir.parent() else { return };
        let _lock = match BuildLock::try_acquire(root, &self.key) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                log::info!(
                    "template {}: not removing it (a build of it holds {}{LOCK_SUFFIX}): {}",
                    self.key,
                    self.key,
                    first_line(reason)
                );
                return;
            }
            Err(e) => {
                log::warn!("template {}: not removing it: {e}", self.key);
                return;
            }
        };
        match std::fs::symlink_metadata(&self.dir) {
            Ok(m) if m.ino() == self.ino => {}
            _ => return,
        }
        log::info!("template {}: removing it: {}", self.key, first_line(reason));
        remove_template_dir(&self.dir);
    }
}

/// Opens the directory `dir` without following a symbolic link there
/// (`O_NOFOLLOW | O_DIRECTORY`): `ELOOP` or `ENOTDIR` when it is none.
fn open_dir_nofollow(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)
}

/// Whether `path`, whose `lstat` (or `fstat` of it opened without following
/// links) is `meta`, may hold templates: a directory, not a symbolic link,
/// owned by the shim's effective uid, neither group- nor other-writable.
/// Anyone else who could write there could plant a `<key>/` (the key is
/// predictable) and so choose the memory and registers of every guest
/// restored from it.
///
/// Errors: [`TemplateError::Unsafe`] saying which rule `path` breaks.
pub(crate) fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), TemplateError> {
    let euid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let reason = if meta.file_type().is_symlink() {
        "is a symbolic link".to_string()
    } else if !meta.is_dir() {
        "is not a directory".to_string()
    } else if meta.uid() != euid {
        format!("is owned by uid {}", meta.uid())
    } else if mode & 0o022 != 0 {
        format!("has mode {mode:04o} (group- or other-writable)")
    } else {
        return Ok(());
    };
    Err(TemplateError::Unsafe {
        path: path.to_path_buf(),
        reason,
    })
}

/// Creates the template directory `root` (0700, with missing parents) if it
/// is missing, and checks it ([`check_private`], on its `lstat`).
///
/// Errors: [`TemplateError::Unsafe`], [`TemplateError::Io`].
fn ensure_root(root: &Path) -> Result<(), TemplateError> {
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err(format!("create {}", root.display())))?;
            std::fs::symlink_metadata(root).map_err(io_err(format!("stat {}", root.display())))?
        }
        Err(e) => return Err(io_err(format!("stat {}", root.display()))(e)),
    };
    check_private(root, &meta)
}

/// `<root>/<key>.lock`, locked exclusively (`flock(2)`): the right to build
/// `<key>/` or remove it. Released when dropped, or when the shim dies; the
/// file stays (see the module docs).
pub(crate) struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    /// The lock file of `key` in `root`, opened (created 0600 if `create`)
    /// without following a symbolic link; `Ok(None)` when it is missing and
    /// not `create`d.
    fn open(root: &Path, key: &str, create: bool) -> std::io::Result<Option<std::fs::File>> {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(lock_path(root, key))
        {
            Ok(f) => Ok(Some(f)),
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the lock of `key` if nobody holds it; `Ok(None)` if someone does.
    fn try_acquire(root: &Path, key: &str) -> Result<Option<BuildLock>, TemplateError> {
        let path = lock_path(root, key);
        let file = BuildLock::open(root, key, true)
            .map_err(io_err(format!("open {}", path.display())))?
            .expect("created");
        match try_flock(&file) {
            Ok(()) => Ok(Some(BuildLock { _file: file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(io_err(format!("flock {}", path.display()))(e)),
        }
    }

    /// Takes the lock of `key`, waiting while another build holds it (polling
    /// every [`LOCK_POLL`], so that `cancel` still stops the wait) until
    /// `deadline`. Returns the lock and whether it had to wait; `Ok(None)`
    /// when `deadline` passed first.
    ///
    /// Errors: [`TemplateError::Cancelled`], [`TemplateError::Io`].
    async fn acquire(
        root: &Path,
        key: &str,
        deadline: Instant,
        cancel: CancelBoot,
    ) -> Result<Option<(BuildLock, bool)>, TemplateError> {
        let path = lock_path(root, key);
        let file = BuildLock::open(root, key, true)
            .map_err(io_err(format!("open {}", path.display())))?
            .expect("created");
        let mut waited = false;
        let mut cancelled = std::pin::pin!(cancelled(cancel));
        loop {
            match try_flock(&file) {
                Ok(()) => return Ok(Some((BuildLock { _file: file }, waited))),
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
                Err(e) => return Err(io_err(format!("flock {}", path.display()))(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if !waited {
                log::info!("template {key}: another sandbox is building it; waiting for {}", path.display());
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(LOCK_POLL)) => {}
                _ = &mut cancelled => return Err(TemplateError::Cancelled),
            }
        }
    }
}

/// `<root>/<key>.lock`.
fn lock_path(root: &Path, key: &str) -> PathBuf {
    root.join(format!("{key}{LOCK_SUFFIX}"))
}

/// Renames `dir` (a template) out of the way and removes it: a concurrent
/// restore sees the whole template or none, and a concurrent build's rename to
/// `dir` can succeed at once.
fn remove_template_dir(dir: &Path) {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let del = dir.with_file_name(format!(
        "{name}{DEL_INFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    match std::fs::rename(dir, &del) {
        Ok(()) => {
            if let Err(e) = std::fs::remove_dir_all(&del) {
                log::warn!("template: remove {}: {e}", del.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("template: rename {} away: {e}", dir.display()),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// FNV-1a, 64 bits: small, and stable across builds and Rust versions (the key
/// names directories that outlive the shim binary).
struct KeyHasher(u64);

impl KeyHasher {
    fn new() -> Self {
        KeyHasher(0xcbf2_9ce4_8422_2325)
    }

    fn raw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }

    /// Length-prefixed, so that fields cannot run into each other.
    fn field(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    fn file(&mut self, what: &str, path: &Path) -> Result<(), TemplateError> {
        let m = std::fs::metadata(path).map_err(io_err(format!("stat {what} {}", path.display())))?;
        self.field(what.as_bytes());
        self.field(path.as_os_str().as_bytes());
        self.u64(m.len());
        self.u64(m.mtime() as u64);
        self.u64(m.mtime_nsec() as u64);
        Ok(())
    }
}

/// The template key of `config` with VMM binary `vmm`: 16 hex digits of a hash
/// over the VMM, kernel and initrd (path, size, mtime) and the template VM's
/// `vm.json` without its paths: vCPUs, memory, kernel and initrd paths, the full
/// guest command line (with `vmrt.template=1`), the serial, vsock and share
/// devices in order with the share's cache mode.
///
/// Errors: [`TemplateError::Io`] when one of the files cannot be read.
pub fn template_key(config: &Config, vmm: &Path) -> Result<String, TemplateError> {
    let mut h = KeyHasher::new();
    h.field(b"vmrt-template-v1");
    h.file("VMM", vmm)?;
    h.file("kernel", &config.hypervisor.kernel)?;
    match &config.hypervisor.initrd {
        Some(initrd) => h.file("initrd", initrd)?,
        None => h.field(b"no initrd"),
    }
    let placeholder = VmPaths {
        console: "console".into(),
        uds: "vsock".into(),
        share: "share".into(),
    };
    h.field(render_vm_json(config, &placeholder, VmStart::Template(Path::new("template"))).as_bytes());
    Ok(format!("{:016x}", h.0))
}

/// Whether a template step that must end by `deadline` still has at least
/// half of `timeout` (the sandbox's `agent.timeout_ms`) left: when less is
/// left, the template path has used up most of the sandbox's budget, and the
/// sandbox boots normally instead (so that a template costs it at most about
/// one `agent.timeout_ms`).
pub fn enough_left(deadline: Instant, timeout: Duration) -> bool {
    deadline.saturating_duration_since(Instant::now()) >= timeout / 2
}

/// The template for `config` (booting sandbox `id`): the existing one, or one
/// built now with a template VM (the first sandbox pays for it; others that
/// start meanwhile wait for its `<key>.lock` and use it). `Ok(None)` when
/// there is none and none could be built by `deadline` (the sandbox's start
/// plus `agent.timeout_ms`): the reason is logged as a warning (with the
/// template VM's log and console tails) or, when it is not news (another
/// sandbox's build recently failed or is taking long), as info, and the
/// sandbox boots normally.
///
/// Errors: only [`TemplateError::Cancelled`], when `cancel` turned `true`.
pub async fn prepare(
    id: &str,
    config: &Config,
    vmm: &Path,
    deadline: Instant,
    cancel: CancelBoot,
) -> Result<Option<Template>, TemplateError> {
    let key = match template_key(config, vmm) {
        Ok(k) => k,
        Err(e) => {
            log::warn!("sandbox {id}: no VM template: {e}; booting");
            return Ok(None);
        }
    };
    match find_or_build(config, vmm, &key, deadline, cancel).await {
        Ok(t) => Ok(Some(t)),
        Err(TemplateError::Cancelled) => Err(TemplateError::Cancelled),
        Err(e @ (TemplateError::RecentlyFailed { .. } | TemplateError::Busy { .. })) => {
            log::info!("sandbox {id}: no VM template {key}: {e}; booting");
            Ok(None)
        }
        Err(e @ TemplateError::Unsafe { .. }) => {
            log::warn!("sandbox {id}: not using VM templates: {e}; booting");
            Ok(None)
        }
        Err(e) => {
            log::warn!("sandbox {id}: building VM template {key} failed: {e}; booting");
            Ok(None)
        }
    }
}

/// [`prepare`] for the template `key`: the complete `<key>/`, else (holding
/// `<key>.lock`, and after looking again: a build that held it may have made
/// it) one built now. A failed build is recorded in `<key>.failed` before the
/// lock goes.
async fn find_or_build(
    config: &Config,
    vmm: &Path,
    key: &str,
    deadline: Instant,
    cancel: CancelBoot,
) -> Result<Template, TemplateError> {
    let root = &config.factory.template_dir;
    ensure_root(root)?;
    let dir = root.join(key);
    if let Some(t) = Template::open(key, &dir)? {
        return Ok(t);
    }
    check_recent_failure(root, key)?;
    let t0 = Instant::now();
    let Some((_lock, waited)) = BuildLock::acquire(root, key, deadline, cancel.clone()).await? else {
        return Err(TemplateError::Busy {
            lock: lock_path(root, key),
            waited_ms: t0.elapsed().as_millis(),
        });
    };
    // Only now is it settled whether a complete <key>/ is there: a build that
    // held the lock installs its template (by rename) before releasing it.
    if let Some(t) = Template::open(key, &dir)? {
        if waited {
            log::info!(
                "template {key}: built by another sandbox meanwhile ({} ms); using it",
                t0.elapsed().as_millis()
            );
        }
        return Ok(t);
    }
    check_recent_failure(root, key)?;
    let timeout = Duration::from_millis(config.agent.timeout_ms);
    if waited && !enough_left(deadline, timeout) {
        return Err(TemplateError::Busy {
            lock: lock_path(root, key),
            waited_ms: t0.elapsed().as_millis(),
        });
    }
    let limit = deadline.saturating_duration_since(Instant::now());
    let t1 = Instant::now();
    match build(config, vmm, key, &dir, limit, cancel).await {
        Ok(t) => {
            log::info!("template {key} built in {} ms", t1.elapsed().as_millis());
            Ok(t)
        }
        // A build cut short by the wait for another's is no verdict on the template.
        Err(e @ (TemplateError::Cancelled | TemplateError::Unsafe { .. })) => Err(e),
        Err(e @ TemplateError::Timeout { .. }) if waited => Err(e),
        Err(e) => {
            mark_failed(root, key, &e.to_string());
            Err(e)
        }
    }
}

/// [`TemplateError::RecentlyFailed`] if the last build of `key` failed within
/// [`RETRY_AFTER`].
fn check_recent_failure(root: &Path, key: &str) -> Result<(), TemplateError> {
    match recent_failure(root, key) {
        Some((age, reason)) => Err(TemplateError::RecentlyFailed {
            ago_s: age.as_secs(),
            reason,
        }),
        None => Ok(()),
    }
}

/// How long ago the last build of `key` failed and why, if within [`RETRY_AFTER`].
fn recent_failure(root: &Path, key: &str) -> Option<(Duration, String)> {
    let marker = root.join(format!("{key}{FAILED_SUFFIX}"));
    let age = std::fs::metadata(&marker).ok()?.modified().ok()?.elapsed().unwrap_or_default();
    if age >= RETRY_AFTER {
        return None;
    }
    let reason = std::fs::read_to_string(&marker).unwrap_or_default();
    Some((age, first_line(&reason).to_string()))
}

fn mark_failed(root: &Path, key: &str, reason: &str) {
    let marker = root.join(format!("{key}{FAILED_SUFFIX}"));
    if let Err(e) = std::fs::write(&marker, first_line(reason)) {
        log::warn!("template {key}: write {}: {e}", marker.display());
    }
}

/// Builds the template `key` into `dir` (see the module docs), the template
/// VM running for at most `limit`. Only with `<key>.lock` held, and after
/// [`Template::open`] found no complete template in `dir`: a `dir` still
/// there then has no `state.json` (a build whose rename was interrupted) and
/// is replaced.
async fn build(
    config: &Config,
    vmm: &Path,
    key: &str,
    dir: &Path,
    limit: Duration,
    cancel: CancelBoot,
) -> Result<Template, TemplateError> {
    let root = &config.factory.template_dir;
    sweep(root, key);
    if std::fs::symlink_metadata(dir).is_ok() {
        log::warn!("template {key}: {} has no {STATE_FILE}; replacing it", dir.display());
        remove_template_dir(dir);
    }
    let tmp = root.join(format!(
        "{key}{TMP_INFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let paths = VmPaths {
        console: tmp.join("console.log"),
        uds: tmp.join("vsock.sock"),
        share: tmp.join("share"),
    };
    let len = paths.uds.as_os_str().len();
    if len > vmm::config::MAX_UDS_PATH_LEN {
        return Err(TemplateError::SocketPath { path: paths.uds, len });
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io_err(format!("create {}", tmp.display())))?;
    log::info!("building template {key} in {}", tmp.display());
    let r = match run_template_vm(vmm, key, &tmp, &paths, limit, config, cancel).await {
        Ok(()) => install(key, &tmp, dir),
        Err(e) => Err(e),
    };
    if r.is_err() {
        if let Err(e) = cleanup_dir(&tmp) {
            log::warn!("template {key}: remove {}: {e}", tmp.display());
        }
    }
    r
}

/// Writes the template VM's `vm.json` in `tmp`, runs it and waits until it
/// exits (bounded by `limit`; killed on timeout or cancel).
async fn run_template_vm(
    vmm: &Path,
    key: &str,
    tmp: &Path,
    paths: &VmPaths,
    limit: Duration,
    config: &Config,
    cancel: CancelBoot,
) -> Result<(), TemplateError> {
    std::fs::create_dir(&paths.share).map_err(io_err(format!("create {}", paths.share.display())))?;
    std::fs::write(tmp.join("vm.json"), render_vm_json(config, paths, VmStart::Template(tmp)))
        .map_err(io_err(format!("write {}/vm.json", tmp.display())))?;
    let VmmChild { pid, exit } = spawn_vmm(&format!("template {key}"), vmm, tmp, true)?;
    log::debug!("template {key}: VMM pid {pid} started");
    let mut exit_rx = exit.clone();
    let stop = tokio::select! {
        r = exit_rx.wait_for(|s| s.is_some()) => {
            let status = r.map(|s| s.unwrap_or(255)).unwrap_or(255);
            if status != 0 {
                return Err(TemplateError::VmmExited { status, diagnostics: diagnostics(tmp) });
            }
            if !tmp.join(STATE_FILE).is_file() {
                return Err(TemplateError::Incomplete { diagnostics: diagnostics(tmp) });
            }
            return Ok(());
        }
        _ = tokio::time::sleep(limit) => TemplateError::Timeout {
            after_ms: limit.as_millis() as u64,
            diagnostics: diagnostics(tmp),
        },
        _ = cancelled(cancel) => TemplateError::Cancelled,
    };
    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    // Reap it before its directory goes: no template VMM outlives a failed build.
    let mut exit = exit;
    if tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|s| s.is_some())).await.is_err() {
        log::warn!("template {key}: VMM pid {pid} still running 10 s after SIGKILL");
    }
    Err(stop)
}

/// Keeps only `state.json` and `memory` of the finished build `tmp` and
/// renames it to `dir`. When another shim's template got there first, ours is
/// removed and theirs used.
fn install(key: &str, tmp: &Path, dir: &Path) -> Result<Template, TemplateError> {
    let entries = std::fs::read_dir(tmp).map_err(io_err(format!("read {}", tmp.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("read {}", tmp.display())))?;
        let name = entry.file_name();
        if name == STATE_FILE || name == MEMORY_FILE {
            continue;
        }
        let path = entry.path();
        let r = match entry.file_type() {
            Ok(t) if t.is_dir() => cleanup_dir(&path).map_err(|e| std::io::Error::other(e.to_string())),
            _ => std::fs::remove_file(&path),
        };
        r.map_err(io_err(format!("remove {}", path.display())))?;
    }
    let lost = || TemplateError::Lost(dir.to_path_buf());
    match std::fs::rename(tmp, dir) {
        Ok(()) => Template::open(key, dir)?.ok_or_else(lost),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
            // Only a shim that does not take <key>.lock gets here.
            let _ = std::fs::remove_dir_all(tmp);
            log::info!("template {key}: another shim built it first; using theirs");
            Template::open(key, dir)?.ok_or_else(lost)
        }
        Err(e) => Err(io_err(format!("rename {} to {}", tmp.display(), dir.display()))(e)),
    }
}

/// Removes what dead shims left in `root`: build directories older than
/// [`STALE_AFTER`] whose VMM is not running, removal directories older than
/// that, failure markers older than [`RETRY_AFTER`], and templates of keys
/// other than `key` unused for [`IDLE_AFTER`] whose `<key>.lock` is free (no
/// shim is building or removing that key). Lock files (`<key>.lock`) are never
/// removed: another shim may hold one or be about to take it, and a lock file
/// removed and created again would let two shims hold "the" lock at once.
/// Best effort.
fn sweep(root: &Path, key: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
        let r = if name.contains(TMP_INFIX) && meta.is_dir() {
            if age < STALE_AFTER || vmm_alive(&path) {
                continue;
            }
            cleanup_dir(&path).map_err(|e| std::io::Error::other(e.to_string()))
        } else if name.contains(DEL_INFIX) && meta.is_dir() {
            if age < STALE_AFTER {
                continue;
            }
            std::fs::remove_dir_all(&path)
        } else if name.ends_with(FAILED_SUFFIX) && meta.is_file() {
            if age < RETRY_AFTER {
                continue;
            }
            std::fs::remove_file(&path)
        } else if is_key(&name) && name != key && meta.is_dir() {
            if age < IDLE_AFTER {
                continue;
            }
            // Not while a shim builds or removes that key (it may be about to use it).
            let lock = match BuildLock::open(root, &name, false) {
                Ok(Some(file)) => match try_flock(&file) {
                    Ok(()) => Some(file),
                    Err(_) => continue,
                },
                Ok(None) => None,
                Err(_) => continue,
            };
            log::info!("template {name}: unused for {} s; removing it", age.as_secs());
            remove_template_dir(&path);
            drop(lock);
            continue;
        } else {
            continue;
        };
        match r {
            Ok(()) => log::info!("template: removed the leftover {}", path.display()),
            Err(e) => log::warn!("template: remove the leftover {}: {e}", path.display()),
        }
    }
}

/// Whether `name` is a template key (16 lower-case hex digits).
fn is_key(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// [`ENTROPY_BYTES`] random bytes from the OS (`/dev/urandom`).
///
/// Errors: the device cannot be read.
pub fn entropy() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Completes the start of an agent restored from a template: its `Restored`
/// RPC with the host's wall clock and `entropy`, within `deadline` (at least 1 s).
///
/// Errors: [`AgentError::Rpc`] (the agent's status, e.g. FAILED_PRECONDITION),
/// [`AgentError::Timeout`].
pub async fn restored(agent: &Agent, entropy: Vec<u8>, deadline: Instant) -> Result<(), AgentError> {
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let realtime_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0);
    let req = vmrt_protocol::agent::RestoredRequest {
        realtime_ns,
        entropy,
        ..Default::default()
    };
    match tokio::time::timeout(budget, agent.client().restored(agent::ctx(Some(budget)), &req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(AgentError::Rpc {
            method: "Restored",
            source,
        }),
        Err(_) => Err(AgentError::Timeout {
            what: "agent Restored".into(),
            after_ms: budget.as_millis(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{fake_vmm, Sandbox, SandboxError};
    use std::sync::{Arc, Mutex};
    use tokio::sync::watch;
    use vmrt_protocol::{agent as pb, agent_ttrpc};

    /// Files the key is taken over, and a configuration naming them.
    fn key_inputs() -> (tempfile::TempDir, Config, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.hypervisor.kernel = d.path().join("vmlinux");
        c.hypervisor.initrd = Some(d.path().join("initrd"));
        let vmm = d.path().join("vmrt-vmm");
        for f in [&c.hypervisor.kernel, c.hypervisor.initrd.as_ref().unwrap(), &vmm] {
            std::fs::write(f, b"contents").unwrap();
        }
        (d, c, vmm)
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        std::fs::OpenOptions::new().write(true).open(path).unwrap().set_modified(t).unwrap();
    }

    /// The key is the same for the same inputs, and changes with each file's
    /// size and mtime and with each setting the template VM's vm.json holds;
    /// settings the VM does not see leave it alone.
    #[test]
    fn key_follows_every_input_that_must_match() {
        let (_d, c, vmm) = key_inputs();
        let k0 = template_key(&c, &vmm).unwrap();
        assert!(is_key(&k0), "{k0}");
        assert_eq!(template_key(&c.clone(), &vmm).unwrap(), k0);
        let kernel = c.hypervisor.kernel.clone();
        let initrd = c.hypervisor.initrd.clone().unwrap();
        let old = std::fs::metadata(&kernel).unwrap().modified().unwrap();
        let key = |c: &Config| template_key(c, &vmm).unwrap();
        let mut seen = std::collections::BTreeSet::from([k0.clone()]);

        // File identity: mtime, then size, of the kernel, the initrd and the VMM.
        for file in [&kernel, &initrd, &vmm] {
            let t = std::fs::metadata(file).unwrap().modified().unwrap();
            set_mtime(file, t + Duration::from_secs(7));
            assert!(seen.insert(key(&c)), "mtime of {}", file.display());
            set_mtime(file, t);
        }
        assert_eq!(key(&c), k0, "same mtimes again, same key");
        std::fs::write(&kernel, b"contents, longer").unwrap();
        set_mtime(&kernel, old);
        assert!(seen.insert(key(&c)), "kernel size");
        std::fs::write(&kernel, b"contents").unwrap();
        set_mtime(&kernel, old);
        assert_eq!(key(&c), k0);

        // The machine: each change gives a key not seen before.
        let changes: [fn(&mut Config); 6] = [
            |c| c.hypervisor.vcpus = 2,
            |c| c.hypervisor.memory_mib = 512,
            |c| c.hypervisor.kernel_params = "foo=1".into(),
            |c| c.agent.log_level = "debug".into(),
            |c| c.hypervisor.virtio_fs_cache = vmrt_config::VirtioFsCache::Never,
            |c| c.hypervisor.initrd = None,
        ];
        let other_vmm = vmm.with_file_name("vmrt-vmm-2");
        std::fs::copy(&vmm, &other_vmm).unwrap();
        set_mtime(&other_vmm, std::fs::metadata(&vmm).unwrap().modified().unwrap());
        assert!(seen.insert(template_key(&c, &other_vmm).unwrap()), "VMM path");
        for (i, change) in changes.iter().enumerate() {
            let mut c2 = c.clone();
            change(&mut c2);
            assert!(seen.insert(key(&c2)), "change {i}");
        }
        // Not part of the machine.
        let mut c2 = c.clone();
        c2.agent.timeout_ms = 1;
        c2.runtime.sandbox_dir = "/elsewhere".into();
        c2.factory.template_dir = "/elsewhere".into();
        assert_eq!(key(&c2), k0);

        std::fs::remove_file(&kernel).unwrap();
        let e = template_key(&c, &vmm).unwrap_err();
        assert!(matches!(e, TemplateError::Io { .. }) && e.to_string().contains("vmlinux"), "{e}");
    }

    /// A fake guest agent behind a fake hybrid vsock endpoint (`<root>/agent.sock`,
    /// which the fake VMM links as the sandbox's `vsock.sock`): answers Health,
    /// records Restored (or fails it) and accepts Shutdown.
    struct FakeAgent {
        restored: Arc<Mutex<Vec<pb::RestoredRequest>>>,
        fail_restored: bool,
    }

    #[async_trait::async_trait]
    impl agent_ttrpc::Agent for FakeAgent {
        async fn health(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            _: pb::Empty,
        ) -> ttrpc::Result<pb::HealthResponse> {
            Ok(pb::HealthResponse {
                serving: true,
                ..Default::default()
            })
        }

        async fn restored(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            req: pb::RestoredRequest,
        ) -> ttrpc::Result<pb::Empty> {
            self.restored.lock().unwrap().push(req);
            if self.fail_restored {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "not a restored template",
                )));
            }
            Ok(pb::Empty::new())
        }

        async fn shutdown(&self, _: &ttrpc::r#async::TtrpcContext, _: pb::Empty) -> ttrpc::Result<pb::Empty> {
            Ok(pb::Empty::new())
        }
    }

    /// Serves [`FakeAgent`] at `<root>/agent.sock` (hybrid vsock: `CONNECT 1024\n`
    /// → `OK 1\n`, then ttrpc relayed to a ttrpc server on `<root>/ttrpc.sock`).
    async fn serve_fake_agent(root: &Path, fail_restored: bool) -> (Arc<Mutex<Vec<pb::RestoredRequest>>>, ttrpc::r#async::Server) {
        let restored = Arc::new(Mutex::new(Vec::new()));
        let ttrpc_sock = root.join("ttrpc.sock");
        let service = agent_ttrpc::create_agent(Arc::new(FakeAgent {
            restored: restored.clone(),
            fail_restored,
        }));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", ttrpc_sock.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        let listener = tokio::net::UnixListener::bind(root.join("agent.sock")).unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let ttrpc_sock = ttrpc_sock.clone();
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, b"CONNECT 1024");
                    s.write_all(b"OK 1\n").await.unwrap();
                    let mut t = tokio::net::UnixStream::connect(&ttrpc_sock).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut t).await;
                });
            }
        });
        (restored, server)
    }

    /// A fake VMM: `template` (what a template VM does), `restore` and `boot`
    /// are shell snippets run for each mode of vm.json; every call is appended to
    /// `<root>/calls`.
    fn fake(root: &Path, template: &str, restore: &str, boot: &str) -> PathBuf {
        let script = format!(
            "#!/bin/sh\nd=$(dirname \"$2\")\nroot=\"$d/../..\"\n\
             if grep -q '\"mode\": \"template\"' \"$2\"; then\n echo template >> \"$root/calls\"\n cp \"$2\" \"$root/template-vm.json\"\n echo $$ > \"$root/template.pid\"\n {template}\n\
             elif grep -q '\"mode\": \"restore\"' \"$2\"; then\n echo restore >> \"$root/calls\"\n {restore}\n\
             else\n echo boot >> \"$root/calls\"\n {boot}\nfi\n"
        );
        fake_vmm::install(root, &script)
    }

    /// A template VM that snapshots at once, leaving its socket and share behind.
    const SNAPSHOTS: &str = "echo 'template guest up' > \"$d/console.log\"; : > \"$d/vsock.sock\"; \
        printf mem > \"$d/memory\"; echo '{}' > \"$d/state.tmp\"; mv \"$d/state.tmp\" \"$d/state.json\"; exit 0";
    /// A VM whose agent answers: the fake agent's socket becomes its vsock.sock.
    const SERVES: &str =
        "echo $$ > \"$root/fake.pid\"; ln -s \"$root/agent.sock\" \"$d/vsock.sock\"; exec sleep 60";

    fn config(root: &Path, vmm_timeout_ms: u64) -> Config {
        let mut c = Config::default();
        c.hypervisor.kernel = root.join("vmlinux");
        c.hypervisor.initrd = Some(root.join("initrd"));
        std::fs::write(&c.hypervisor.kernel, b"kernel").unwrap();
        std::fs::write(c.hypervisor.initrd.as_ref().unwrap(), b"initrd").unwrap();
        c.runtime.sandbox_dir = root.join("sandboxes");
        c.factory.template = true;
        c.factory.template_dir = root.join("templates");
        c.agent.timeout_ms = vmm_timeout_ms;
        c
    }

    fn calls(root: &Path) -> Vec<String> {
        std::fs::read_to_string(root.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn never() -> CancelBoot {
        watch::channel(false).1
    }

    /// The first sandbox builds the template (a fake template VM that snapshots and
    /// exits 0); only state.json and memory stay. It and the next sandbox start
    /// from it: vm.json asks for a restore with the template's command line and
    /// the sandbox's own paths, and the agent gets one Restored with the host's
    /// clock and 64 random bytes before the sandbox is ready. Teardown leaves the
    /// template and nothing else.
    #[tokio::test]
    async fn template_is_built_once_and_sandboxes_restore_from_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (restored, mut server) = serve_fake_agent(root, false).await;
        let vmm = fake(root, SNAPSHOTS, SERVES, SERVES);
        let c = config(root, 20_000);
        let key = template_key(&c, &vmm).unwrap();
        let tdir = c.factory.template_dir.join(&key);

        let sb = Sandbox::start("r1", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "restore"]);
        assert_eq!(names(&tdir), [MEMORY_FILE, STATE_FILE]);
        assert_eq!(names(&c.factory.template_dir), [key.clone(), format!("{key}{LOCK_SUFFIX}")]);
        let mode = std::fs::metadata(&c.factory.template_dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        // The template VM: booted with the template command line, its own paths.
        let tv: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("template-vm.json")).unwrap()).unwrap();
        assert_eq!(tv["snapshot"]["mode"], "template");
        let tmp = tv["snapshot"]["dir"].as_str().unwrap();
        assert!(tmp.starts_with(&format!("{}/{key}.tmp-", c.factory.template_dir.display())), "{tmp}");
        assert_eq!(tv["vsock"]["uds_path"], format!("{tmp}/vsock.sock"));
        assert_eq!(tv["shares"][0]["path"], format!("{tmp}/share"));
        assert!(tv["cmdline"].as_str().unwrap().contains(" vmrt.template=1"));
        // The sandbox: restored from it, same machine, its own paths.
        let sv: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sb.dir.join("vm.json")).unwrap()).unwrap();
        assert_eq!(sv["snapshot"]["mode"], "restore");
        assert_eq!(sv["snapshot"]["dir"], tdir.to_str().unwrap());
        assert_eq!(sv["cmdline"], tv["cmdline"]);
        assert_eq!(sv["vsock"]["uds_path"], sb.dir.join("vsock.sock").to_str().unwrap());
        assert_eq!(sv["shares"][0]["path"], sb.dir.join("shared").to_str().unwrap());
        {
            let r = restored.lock().unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].entropy.len(), ENTROPY_BYTES);
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i64;
            assert!((now - r[0].realtime_ns).abs() < 30_000_000_000, "{} vs {now}", r[0].realtime_ns);
        }
        sb.shutdown().await.unwrap();
        fake_vmm::assert_gone(&root.join("fake.pid"));

        // The next sandbox uses the template as it is; its entropy is its own.
        let sb = Sandbox::start("r2", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "restore", "restore"]);
        {
            let r = restored.lock().unwrap();
            assert_eq!(r.len(), 2);
            assert_ne!(r[0].entropy, r[1].entropy);
        }
        sb.shutdown().await.unwrap();
        fake_vmm::assert_gone(&root.join("fake.pid"));
        assert_eq!(names(&c.runtime.sandbox_dir), Vec::<String>::new());
        assert_eq!(names(&c.factory.template_dir), [key.clone(), format!("{key}{LOCK_SUFFIX}")]);
        server.shutdown().await.unwrap();
    }

    /// A template VM that fails: its directory goes, the sandbox boots normally
    /// (no snapshot, no vmrt.template=1), and the next sandbox does not try again
    /// before RETRY_AFTER.
    #[tokio::test]
    async fn failed_template_build_leaves_nothing_and_the_sandbox_boots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (restored, mut server) = serve_fake_agent(root, false).await;
        let vmm = fake(
            root,
            "echo 'Kernel panic - template test' > \"$d/console.log\"; echo 'no snapshot' >&2; exit 1",
            SERVES,
            SERVES,
        );
        let c = config(root, 20_000);
        let key = template_key(&c, &vmm).unwrap();
        let sb = Sandbox::start("f1", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "boot"]);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sb.dir.join("vm.json")).unwrap()).unwrap();
        assert!(v.get("snapshot").is_none());
        assert!(!v["cmdline"].as_str().unwrap().contains("vmrt.template"));
        assert!(restored.lock().unwrap().is_empty());
        // Only the failure's marker, naming why (and the lock file).
        assert_eq!(
            names(&c.factory.template_dir),
            [format!("{key}{FAILED_SUFFIX}"), format!("{key}{LOCK_SUFFIX}")]
        );
        let why = std::fs::read_to_string(c.factory.template_dir.join(format!("{key}{FAILED_SUFFIX}"))).unwrap();
        assert!(why.contains("status 1"), "{why}");
        sb.shutdown().await.unwrap();

        let sb = Sandbox::start("f2", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "boot", "boot"]);
        sb.shutdown().await.unwrap();
        assert_eq!(names(&c.runtime.sandbox_dir), Vec::<String>::new());
        server.shutdown().await.unwrap();
    }

    /// A template VM that never snapshots is killed (and reaped) after
    /// agent.timeout_ms, its directory removed, and the sandbox boots.
    #[tokio::test]
    async fn template_build_timeout_kills_the_template_vm() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (_restored, mut server) = serve_fake_agent(root, false).await;
        let vmm = fake(root, "exec sleep 60", SERVES, SERVES);
        let c = config(root, 700);
        let key = template_key(&c, &vmm).unwrap();
        let t0 = std::time::Instant::now();
        let sb = Sandbox::start("t1", &c, &vmm, never()).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(700));
        assert_eq!(calls(root), ["template", "boot"]);
        fake_vmm::assert_gone(&root.join("template.pid"));
        assert_eq!(
            names(&c.factory.template_dir),
            [format!("{key}{FAILED_SUFFIX}"), format!("{key}{LOCK_SUFFIX}")]
        );
        sb.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
    }

    /// Cancelling the boot while the template VM runs kills it and removes its
    /// directory; no sandbox is started and no failure is recorded.
    #[tokio::test]
    async fn cancel_during_the_template_build_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let vmm = fake(root, "exec sleep 60", "exit 1", "exit 1");
        let c = config(root, 60_000);
        let (cancel, rx) = watch::channel(false);
        let boot = tokio::spawn({
            let (c, vmm) = (c.clone(), vmm.clone());
            async move { Sandbox::start("c1", &c, &vmm, rx).await }
        });
        let pid = root.join("template.pid");
        while !pid.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.send(true).unwrap();
        let e = boot.await.unwrap().unwrap_err();
        assert!(matches!(e, SandboxError::Cancelled(ref id) if id == "c1"), "{e}");
        fake_vmm::assert_gone(&pid);
        let key = template_key(&c, &vmm).unwrap();
        assert_eq!(names(&c.factory.template_dir), [format!("{key}{LOCK_SUFFIX}")]);
        assert!(!c.runtime.sandbox_dir.join("c1").exists());
        assert_eq!(calls(root), ["template"]);
    }

    /// A restore the VMM rejects (status 1: unreadable or mismatched template)
    /// tears that attempt down, removes the template and boots normally; the
    /// next sandbox builds the template again.
    #[tokio::test]
    async fn a_template_the_vmm_rejects_is_removed_and_the_sandbox_boots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (restored, mut server) = serve_fake_agent(root, false).await;
        let restore = "echo 'snapshot: template does not match' >&2; exit 1";
        let vmm = fake(root, SNAPSHOTS, restore, SERVES);
        let c = config(root, 20_000);
        let key = template_key(&c, &vmm).unwrap();
        let sb = Sandbox::start("b1", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "restore", "boot"]);
        assert!(restored.lock().unwrap().is_empty());
        assert_eq!(names(&c.factory.template_dir), [format!("{key}{LOCK_SUFFIX}")]);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sb.dir.join("vm.json")).unwrap()).unwrap();
        assert!(v.get("snapshot").is_none());
        sb.shutdown().await.unwrap();
        fake_vmm::assert_gone(&root.join("fake.pid"));

        let sb = Sandbox::start("b2", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root)[3..], ["template", "restore", "boot"]);
        sb.shutdown().await.unwrap();
        assert_eq!(names(&c.runtime.sandbox_dir), Vec::<String>::new());
        assert!(!c.factory.template_dir.join(&key).exists());
        server.shutdown().await.unwrap();
    }

    /// Restores that fail for a reason other than the template (the agent's
    /// Restored fails, the restored VM crashes with status 2, the agent does
    /// not answer in time) fall back to a normal boot and keep the template:
    /// the next sandbox tries it again without building it.
    #[tokio::test]
    async fn a_template_is_kept_when_a_restore_fails_otherwise() {
        for (case, restore, fail_restored, timeout_ms) in [
            ("Restored fails", SERVES, true, 20_000),
            ("status 2", "echo 'KVM internal error' >&2; exit 2", false, 20_000),
            ("agent never answers", "echo $$ > \"$root/fake.pid\"; exec sleep 60", false, 1_500),
        ] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path();
            let (restored, mut server) = serve_fake_agent(root, fail_restored).await;
            let vmm = fake(root, SNAPSHOTS, restore, SERVES);
            let c = config(root, timeout_ms);
            let key = template_key(&c, &vmm).unwrap();
            let t0 = std::time::Instant::now();
            let sb = Sandbox::start("k1", &c, &vmm, never()).await.unwrap();
            assert_eq!(calls(root), ["template", "restore", "boot"], "{case}");
            assert!(t0.elapsed() < Duration::from_millis(timeout_ms) * 2, "{case}: {:?}", t0.elapsed());
            assert_eq!(restored.lock().unwrap().len(), usize::from(fail_restored), "{case}");
            assert_eq!(
                names(&c.factory.template_dir),
                [key.clone(), format!("{key}{LOCK_SUFFIX}")],
                "{case}"
            );
            assert_eq!(names(&c.factory.template_dir.join(&key)), [MEMORY_FILE, STATE_FILE], "{case}");
            sb.shutdown().await.unwrap();
            fake_vmm::assert_gone(&root.join("fake.pid"));

            let sb = Sandbox::start("k2", &c, &vmm, never()).await.unwrap();
            assert_eq!(calls(root)[3..], ["restore", "boot"], "{case}");
            sb.shutdown().await.unwrap();
            assert_eq!(names(&c.runtime.sandbox_dir), Vec::<String>::new(), "{case}");
            assert!(c.factory.template_dir.join(&key).join(STATE_FILE).exists(), "{case}");
            server.shutdown().await.unwrap();
        }
    }

    /// A build that takes more than half of agent.timeout_ms leaves too little
    /// for a restore: the sandbox boots normally (within about one
    /// agent.timeout_ms of template work), the template stays, and the next
    /// sandbox restores from it.
    #[tokio::test]
    async fn a_slow_build_boots_that_sandbox_and_keeps_the_template() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let (restored, mut server) = serve_fake_agent(root, false).await;
        let vmm = fake(root, &format!("sleep 1.8; {SNAPSHOTS}"), SERVES, SERVES);
        let c = config(root, 3_000);
        let key = template_key(&c, &vmm).unwrap();
        let sb = Sandbox::start("s1", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "boot"]);
        assert!(restored.lock().unwrap().is_empty());
        assert!(c.factory.template_dir.join(&key).join(STATE_FILE).exists());
        sb.shutdown().await.unwrap();
        let sb = Sandbox::start("s2", &c, &vmm, never()).await.unwrap();
        assert_eq!(calls(root), ["template", "boot", "restore"]);
        assert_eq!(restored.lock().unwrap().len(), 1);
        sb.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
    }

    /// Sandboxes that start together build their template once: the others
    /// wait for its lock and use it.
    #[tokio::test]
    async fn concurrent_first_sandboxes_build_the_template_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let vmm = fake(root, &format!("sleep 0.3; {SNAPSHOTS}"), "exit 1", "exit 1");
        let c = config(root, 20_000);
        let key = template_key(&c, &vmm).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let tasks: Vec<_> = (0..3)
            .map(|i| {
                let (c, vmm) = (c.clone(), vmm.clone());
                tokio::spawn(async move { prepare(&format!("p{i}"), &c, &vmm, deadline, never()).await })
            })
            .collect();
        for t in tasks {
            let t = t.await.unwrap().unwrap().expect("a template");
            assert_eq!(t.dir, c.factory.template_dir.join(&key));
        }
        assert_eq!(calls(root), ["template"]);
        assert_eq!(names(&c.factory.template_dir), [key.clone(), format!("{key}{LOCK_SUFFIX}")]);
    }

    /// What a sandbox waiting for another's build finds once it holds the
    /// lock: a complete <key>/ that appeared meanwhile is used as it is (not
    /// removed, nothing built); a <key>/ without state.json is replaced by a
    /// build; a lock held until too little of agent.timeout_ms is left means
    /// no template and no build for this sandbox, and no failure recorded.
    #[tokio::test]
    async fn waiting_for_the_lock() {
        for case in ["complete", "incomplete", "held too long", "released late"] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path();
            let vmm = fake(root, SNAPSHOTS, "exit 1", "exit 1");
            let c = config(root, 1_000);
            let key = template_key(&c, &vmm).unwrap();
            let templates = c.factory.template_dir.clone();
            let dir = templates.join(&key);
            std::fs::DirBuilder::new().mode(0o700).create(&templates).unwrap();
            let lock = BuildLock::try_acquire(&templates, &key).unwrap().unwrap();
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_millis(1_000);
            let waiter = tokio::spawn({
                let (c, vmm) = (c.clone(), vmm.clone());
                async move { prepare("w", &c, &vmm, deadline, never()).await }
            });
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(!waiter.is_finished(), "{case}");
            match case {
                "complete" | "incomplete" => {
                    // As another shim's build installs it (or a rename left it half done).
                    let tmp = templates.join(format!("{key}.tmp-x"));
                    std::fs::DirBuilder::new().mode(0o700).create(&tmp).unwrap();
                    if case == "complete" {
                        std::fs::write(tmp.join(MEMORY_FILE), b"theirs").unwrap();
                        std::fs::write(tmp.join(STATE_FILE), b"{}").unwrap();
                    }
                    std::fs::rename(&tmp, &dir).unwrap();
                    drop(lock);
                }
                "held too long" => {
                    let r = waiter.await.unwrap().unwrap();
                    assert!(r.is_none(), "{case}");
                    assert!(t0.elapsed() >= Duration::from_millis(1_000), "{case}");
                    drop(lock);
                    assert_eq!(calls(root), Vec::<String>::new(), "{case}");
                    assert_eq!(names(&templates), [format!("{key}{LOCK_SUFFIX}")], "{case}");
                    continue;
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    drop(lock);
                    let r = waiter.await.unwrap().unwrap();
                    assert!(r.is_none(), "{case}");
                    assert_eq!(calls(root), Vec::<String>::new(), "{case}");
                    assert_eq!(names(&templates), [format!("{key}{LOCK_SUFFIX}")], "{case}");
                    continue;
                }
            }
            let t = waiter.await.unwrap().unwrap().expect(case);
            assert_eq!(t.dir, dir, "{case}");
            if case == "complete" {
                assert_eq!(calls(root), Vec::<String>::new());
                assert_eq!(std::fs::read(dir.join(MEMORY_FILE)).unwrap(), b"theirs");
            } else {
                assert_eq!(calls(root), ["template"]);
                assert_eq!(std::fs::read(dir.join(MEMORY_FILE)).unwrap(), b"mem");
            }
            assert_eq!(names(&templates), [key.clone(), format!("{key}{LOCK_SUFFIX}")], "{case}");
        }
    }

    /// Templates are used only from a template_dir and <key>/ that are
    /// directories (not symbolic links) of the shim's uid that nobody else can
    /// write; otherwise a planted template is neither used nor removed,
    /// nothing is built, and the sandbox boots normally.
    #[tokio::test]
    async fn templates_need_directories_only_the_shim_can_write() {
        use std::os::unix::fs::{chown, symlink, PermissionsExt};
        let euid = nix::unistd::geteuid().as_raw();
        let chmod = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        let plant = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            chmod(dir, 0o700);
            std::fs::write(dir.join(STATE_FILE), b"{}").unwrap();
            std::fs::write(dir.join(MEMORY_FILE), b"planted").unwrap();
        };
        // (case, what is checked, expected reason, setup of templates/ and templates/<key>)
        type Setup = fn(&Path, &Path, &dyn Fn(&Path), &dyn Fn(&Path, u32)) -> bool;
        let cases: [(&str, bool, &str, Setup); 7] = [
            ("template_dir 0777", true, "has mode 0777", |t, k, plant, chmod| {
                plant(k);
                chmod(t, 0o777);
                true
            }),
            ("template_dir 0770", true, "has mode 0770", |t, k, plant, chmod| {
                plant(k);
                chmod(t, 0o770);
                true
            }),
            ("template_dir a symlink", true, "is a symbolic link", |t, k, plant, _| {
                let real = t.with_file_name("real-templates");
                plant(&real.join(k.file_name().unwrap()));
                symlink(&real, t).unwrap();
                true
            }),
            ("template_dir of another uid", true, "is owned by uid 65534", |t, k, plant, _| {
                plant(k);
                chown(t, Some(65534), None).is_ok()
            }),
            ("<key> 0777", false, "has mode 0777", |_, k, plant, chmod| {
                plant(k);
                chmod(k, 0o777);
                true
            }),
            ("<key> a symlink", false, "is a symbolic link", |t, k, plant, _| {
                let real = t.join("elsewhere");
                plant(&real);
                symlink(&real, k).unwrap();
                true
            }),
            ("<key> of another uid", false, "is owned by uid 65534", |_, k, plant, _| {
                plant(k);
                chown(k, Some(65534), None).is_ok()
            }),
        ];
        for (case, is_root, reason, setup) in cases {
            let d = tempfile::tempdir().unwrap();
            let root = d.path();
            let (_restored, mut server) = serve_fake_agent(root, false).await;
            let vmm = fake(root, SNAPSHOTS, SERVES, SERVES);
            let c = config(root, 20_000);
            let key = template_key(&c, &vmm).unwrap();
            let templates = c.factory.template_dir.clone();
            let dir = templates.join(&key);
            if !setup(&templates, &dir, &plant, &chmod) {
                assert_ne!(euid, 0, "{case}: chown failed as root");
                eprintln!("{case}: skipped (chown needs root)");
                server.shutdown().await.unwrap();
                continue;
            }
            let before = names(&templates);
            let e = find_or_build(&c, &vmm, &key, Instant::now() + Duration::from_secs(20), never())
                .await
                .unwrap_err();
            match &e {
                TemplateError::Unsafe { path, reason: r } => {
                    assert_eq!(path, if is_root { &templates } else { &dir }, "{case}");
                    assert!(r.starts_with(reason), "{case}: {r}");
                }
                e => panic!("{case}: {e}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(&format!("uid ({euid})")), "{msg}");
            assert!(prepare("u", &c, &vmm, Instant::now() + Duration::from_secs(20), never())
                .await
                .unwrap()
                .is_none());
            let sb = Sandbox::start("u1", &c, &vmm, never()).await.unwrap();
            assert_eq!(calls(root), ["boot"], "{case}");
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(sb.dir.join("vm.json")).unwrap()).unwrap();
            assert!(v.get("snapshot").is_none(), "{case}");
            sb.shutdown().await.unwrap();
            // Nothing planted was removed or used, and nothing was added.
            assert_eq!(names(&templates), before, "{case}");
            server.shutdown().await.unwrap();
        }
        // A template_dir that others can read but not write is fine.
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let vmm = fake(root, SNAPSHOTS, "exit 1", "exit 1");
        let c = config(root, 20_000);
        let key = template_key(&c, &vmm).unwrap();
        plant(&c.factory.template_dir.join(&key));
        chmod(&c.factory.template_dir, 0o755);
        let t = prepare("ok", &c, &vmm, Instant::now() + Duration::from_secs(20), never())
            .await
            .unwrap()
            .expect("the template");
        assert_eq!(t.dir, c.factory.template_dir.join(&key));
        assert_eq!(calls(root), Vec::<String>::new());
    }

    /// Two builds of one key: the second rename finds the first's template and
    /// uses it, removing its own.
    #[test]
    fn a_build_that_loses_the_race_uses_the_winner() {
        let d = tempfile::tempdir().unwrap();
        let key = "0123456789abcdef";
        let dir = d.path().join(key);
        for tmp in ["a.tmp", "b.tmp"] {
            let t = d.path().join(tmp);
            std::fs::create_dir_all(t.join("share")).unwrap();
            std::fs::write(t.join(STATE_FILE), tmp).unwrap();
            std::fs::write(t.join(MEMORY_FILE), b"m").unwrap();
            std::fs::write(t.join("vsock.sock"), b"").unwrap();
        }
        let a = install(key, &d.path().join("a.tmp"), &dir).unwrap();
        let b = install(key, &d.path().join("b.tmp"), &dir).unwrap();
        assert_eq!(a.dir, b.dir);
        assert_eq!(std::fs::read_to_string(dir.join(STATE_FILE)).unwrap(), "a.tmp");
        assert_eq!(names(d.path()), [key]);
        assert_eq!(names(&dir), [MEMORY_FILE, STATE_FILE]);
        // Discarding removes it; a directory rebuilt meanwhile is kept.
        std::fs::rename(&dir, d.path().join("moved")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        a.discard("test");
        assert!(dir.exists());
        std::fs::remove_dir(&dir).unwrap();
        std::fs::rename(d.path().join("moved"), &dir).unwrap();
        // Not while a build of the key holds its lock.
        let lock = BuildLock::try_acquire(d.path(), key).unwrap().unwrap();
        a.discard("test");
        assert!(dir.join(STATE_FILE).exists());
        drop(lock);
        a.discard("test");
        assert_eq!(names(d.path()), [format!("{key}{LOCK_SUFFIX}")]);
    }

    /// The sweep removes what dead shims left: stale build directories whose VMM
    /// is gone, stale removals, old failure markers and other keys' idle
    /// templates; it keeps fresh and running builds, the current key, idle
    /// templates whose lock is held, and every lock file.
    #[test]
    fn sweep_removes_only_what_dead_shims_left() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let old = SystemTime::now() - IDLE_AFTER - Duration::from_secs(1);
        let mk = |name: &str, is_dir: bool, t: Option<SystemTime>| {
            let p = root.join(name);
            if is_dir {
                std::fs::create_dir_all(p.join("share")).unwrap();
            } else {
                std::fs::write(&p, b"x").unwrap();
            }
            if let Some(t) = t {
                std::fs::File::open(&p).unwrap().set_modified(t).unwrap();
            }
        };
        let cur = "00000000000000aa";
        mk(&format!("{cur}.tmp-1-0"), true, Some(old)); // stale, VMM gone
        mk(&format!("{cur}.tmp-1-1"), true, None); // fresh
        mk(&format!("{cur}.tmp-1-2"), true, Some(old)); // stale but its VMM runs
        let running = root.join(format!("{cur}.tmp-1-2"));
        let lock = crate::sandbox::VmmLock::acquire(&running).unwrap();
        std::fs::File::open(&running).unwrap().set_modified(old).unwrap();
        mk(&format!("{cur}.del-1-3"), true, Some(old));
        mk(&format!("{cur}{FAILED_SUFFIX}"), false, Some(old));
        mk("00000000000000bb", true, Some(old)); // another key, idle
        mk("00000000000000cc", true, None); // another key, in use
        mk("00000000000000dd", true, Some(old)); // another key, idle, but its lock is held
        let dd_lock = BuildLock::try_acquire(root, "00000000000000dd").unwrap().unwrap();
        mk(cur, true, Some(old)); // ours
        mk(&format!("{cur}{LOCK_SUFFIX}"), false, Some(old)); // lock files stay
        mk(&format!("00000000000000bb{LOCK_SUFFIX}"), false, Some(old));
        mk("unrelated", true, Some(old));
        sweep(root, cur);
        assert_eq!(
            names(root),
            [
                cur.to_string(),
                format!("{cur}{LOCK_SUFFIX}"),
                format!("{cur}.tmp-1-1"),
                format!("{cur}.tmp-1-2"),
                format!("00000000000000bb{LOCK_SUFFIX}"),
                "00000000000000cc".into(),
                "00000000000000dd".into(),
                format!("00000000000000dd{LOCK_SUFFIX}"),
                "unrelated".into()
            ]
        );
        drop(dd_lock);
        drop(lock);
    }
}
