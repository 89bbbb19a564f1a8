//! PID 1 duties of the agent inside the microVM: the early filesystems,
//! console, cgroup v2 controllers, hostname, virtio-fs shares, and the final
//! sync/unmount/reboot.
//!
//! Everything here is best-effort: a failing step is returned as an
//! [`InitError`] for the caller to log, and the agent keeps going (a guest
//! without, say, `/dev/shm` can still run most containers; a guest whose
//! agent exits panics the kernel).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::config::Share;

/// Hostname of the guest (containers get their own UTS namespace).
pub const GUEST_HOSTNAME: &str = "vmrt";

/// cgroup v2 controllers enabled for the children of the root cgroup when
/// the kernel offers them.
pub const CGROUP_CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io"];

/// A failed PID 1 step.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// mount(2) failed.
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        /// Filesystem type.
        fstype: String,
        /// Mount point.
        target: PathBuf,
        /// errno.
        source: nix::Error,
    },
    /// Creating a directory, symlink or file failed.
    #[error("{what} {path}: {source}")]
    Fs {
        /// What was attempted.
        what: &'static str,
        /// Path concerned.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Opening or installing the console failed.
    #[error("console /dev/console: {0}")]
    Console(nix::Error),
    /// sethostname(2) failed.
    #[error("sethostname {GUEST_HOSTNAME}: {0}")]
    Hostname(nix::Error),
    /// Enabling a cgroup controller failed.
    #[error("enable cgroup controller {controller}: {source}")]
    Cgroup {
        /// Controller name.
        controller: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Whether this process is PID 1 (the guest's init).
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

fn mkdir(path: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|source| InitError::Fs {
        what: "mkdir",
        path: path.to_path_buf(),
        source,
    })
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    let t = Path::new(target);
    mkdir(t)?;
    match mount(Some(source), t, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // Already mounted (e.g. the kernel's devtmpfs automount).
        Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype: fstype.to_string(),
            target: t.to_path_buf(),
            source,
        }),
    }
}

/// Mounts devtmpfs on `/dev`: first, so that `/dev/console` exists before
/// the console is opened.
pub fn mount_dev() -> Result<(), InitError> {
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// Makes `/dev/console` the agent's stdin, stdout and stderr (the serial
/// console), so logs written to stderr reach the console.
pub fn setup_console() -> Result<(), InitError> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let fd = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(InitError::Console)?;
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `fd` is a valid open
        // descriptor and 0..=2 are ours to replace.
        if unsafe { libc::dup2(fd, target) } < 0 {
            let e = nix::Error::last();
            let _ = nix::unistd::close(fd);
            return Err(InitError::Console(e));
        }
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Mounts the other early filesystems: `/proc`, `/sys`, `/dev/pts`
/// (new instance, ptmxmode 0666) with the `/dev/ptmx` symlink, `/dev/shm`,
/// `/run`, `/tmp`, cgroup2 on `/sys/fs/cgroup`, plus the `/dev/fd`,
/// `/dev/std{in,out,err}` symlinks. Returns the steps that failed.
pub fn mount_early_filesystems() -> Vec<InitError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let steps: Vec<Result<(), InitError>> = vec![
        mount_fs("proc", "/proc", "proc", nodev, None),
        mount_fs("sysfs", "/sys", "sysfs", nodev, None),
        mount_fs(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        mount_fs(
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        mount_fs(
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        mount_fs(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        mount_fs(
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nodev,
            Some("nsdelegate"),
        ),
    ];
    let mut errors: Vec<InitError> = steps.into_iter().filter_map(Result::err).collect();
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        // devtmpfs has a /dev/ptmx character device: replace it by the link
        // to the new devpts instance's ptmx.
        if let Ok(md) = std::fs::symlink_metadata(link) {
            if !md.file_type().is_symlink() {
                let _ = std::fs::remove_file(link);
            } else {
                continue;
            }
        }
        if let Err(source) = std::os::unix::fs::symlink(target, link) {
            errors.push(InitError::Fs {
                what: "symlink",
                path: link.into(),
                source,
            });
        }
    }
    errors
}

/// Enables [`CGROUP_CONTROLLERS`] (those listed in `cgroup.controllers`)
/// in `<root>/cgroup.subtree_control`, one write per controller so one
/// refusal does not block the others. Returns the controllers enabled and
/// the failures.
pub fn enable_cgroup_controllers(root: &Path) -> (Vec<String>, Vec<InitError>) {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let available: Vec<&str> = available.split_whitespace().collect();
    let mut enabled = Vec::new();
    let mut errors = Vec::new();
    for c in CGROUP_CONTROLLERS.iter().filter(|c| available.contains(c)) {
        match std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            Ok(()) => enabled.push(c.to_string()),
            Err(source) => errors.push(InitError::Cgroup {
                controller: c.to_string(),
                source,
            }),
        }
    }
    (enabled, errors)
}

/// Sets the guest hostname to [`GUEST_HOSTNAME`].
pub fn set_hostname() -> Result<(), InitError> {
    nix::unistd::sethostname(GUEST_HOSTNAME).map_err(InitError::Hostname)
}

/// Mounts a virtio-fs share: `mount -t virtiofs <tag> <dir>` (virtio 1.2
/// §5.11), creating the mount point.
pub fn mount_share(share: &Share) -> Result<(), InitError> {
    mkdir(&share.mount_point)?;
    mount(
        Some(share.tag.as_str()),
        &share.mount_point,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| InitError::Mount {
        fstype: "virtiofs".into(),
        target: share.mount_point.clone(),
        source,
    })
}

/// Runs the early PID 1 steps in order and logs what failed: `/dev`, the
/// console as fds 0-2, the other early filesystems, cgroup v2 controllers,
/// hostname. Call first thing when [`is_pid1`], after installing the logger
/// (it writes to stderr, which [`setup_console`] points at the console).
/// Returns the cgroup v2 controllers enabled, for the caller to log once the
/// log's destination is settled.
pub fn pid1_setup() -> Vec<String> {
    use crate::startup::mark;
    if let Err(e) = mount_dev() {
        log::error!("{e}");
    }
    mark("/dev");
    if let Err(e) = setup_console() {
        log::error!("{e}");
    }
    mark("console");
    for e in mount_early_filesystems() {
        log::error!("{e}");
    }
    mark("early mounts");
    let (enabled, errors) = enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    for e in errors {
        log::warn!("{e}");
    }
    mark("cgroup controllers");
    if let Err(e) = set_hostname() {
        log::warn!("{e}");
    }
    mark("hostname");
    enabled
}

/// Mounts every share (see [`mount_share_logged`]); a share that fails is
/// logged and skipped.
pub fn mount_shares(shares: &[Share]) {
    for share in shares {
        let _ = mount_share_logged(share);
    }
}

/// [`mount_share`], logging the outcome: info when mounted, error when not
/// (the error is returned too). What a booted agent does for each
/// `vmrt.share` at start-up, and a template's agent in `Restored`.
///
/// # Errors
/// As [`mount_share`].
pub fn mount_share_logged(share: &Share) -> Result<(), InitError> {
    match mount_share(share) {
        Ok(()) => {
            log::info!(
                "virtio-fs share {} mounted on {}",
                share.tag,
                share.mount_point.display()
            );
            Ok(())
        }
        Err(e) => {
            log::error!("{e}");
            Err(e)
        }
    }
}

/// Mount points of `/proc/self/mounts` below `/` other than `/` itself, in
/// reverse mount order (children before parents).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| *p != "/")
        // /proc/mounts escapes spaces etc. as octal; skip those rather than
        // unmount a wrong path.
        .filter(|p| !p.contains('\\'))
        .map(PathBuf::from)
        .collect();
    v.reverse();
    v
}

/// What [`quiesce`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quiesced {
    /// User processes still alive after the wait (`None`: `/proc` unreadable).
    pub survivors: Option<usize>,
    /// Shares that would not unmount and were only detached (still busy).
    pub detached: Vec<PathBuf>,
}

impl Quiesced {
    /// No process left and every share unmounted: the guest owes the host's
    /// side of the shares nothing more.
    pub fn is_clean(&self) -> bool {
        self.survivors == Some(0) && self.detached.is_empty()
    }
}

impl std::fmt::Display for Quiesced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.survivors {
            Some(n) => write!(f, "{n} process(es) still alive")?,
            None => write!(f, "live processes unknown (/proc unreadable)")?,
        }
        if !self.detached.is_empty() {
            let d: Vec<String> = self.detached.iter().map(|p| p.display().to_string()).collect();
            write!(f, ", share(s) busy and only detached: {}", d.join(" "))?;
        }
        Ok(())
    }
}

/// What PID 1 does before it answers the `Shutdown` RPC, so that the host
/// may stop the VM as soon as the reply arrives: sync, kill every other
/// process (waiting up to 50 ms while one still lives), unmount the
/// virtio-fs shares (lazily if busy) and sync again. When the result
/// [`Quiesced::is_clean`], nothing of the guest's is left unwritten on the
/// host's side of the shares. Safe to call again (it then finds nothing to
/// kill or unmount).
pub fn quiesce(shares: &[Share]) -> Quiesced {
    nix::unistd::sync();
    // kill(-1) from PID 1 signals every process except itself. Wait (up to
    // 50 ms) only while one is still alive: usually there is none, the shim
    // deletes the containers first.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
    let survivors = loop {
        let live = live_user_processes(Path::new("/proc"));
        if live == Some(0) || std::time::Instant::now() >= deadline {
            break live;
        }
        match live {
            // Cannot tell: wait the whole time.
            None => {
                std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()))
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    };
    let mut detached = Vec::new();
    for share in shares {
        match umount2(&share.mount_point, MntFlags::empty()) {
            Ok(()) => {}
            // Not mounted (any more): a second call, or the mount failed at boot.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                log::warn!("unmount {}: {e}; detaching", share.mount_point.display());
                let _ = umount2(&share.mount_point, MntFlags::MNT_DETACH);
                detached.push(share.mount_point.clone());
            }
        }
    }
    nix::unistd::sync();
    Quiesced {
        survivors,
        detached,
    }
}

/// Final PID 1 step of the `Shutdown` RPC: [`quiesce`] (again, in case the
/// RPC's did not finish or new processes appeared), unmount every other
/// filesystem (best-effort, lazily if busy), sync again and
/// `reboot(RB_AUTOBOOT)` — the VMM exits 0 on guest reboot. Does not return;
/// if reboot fails the process exits.
pub fn shutdown_and_reboot(shares: &[Share]) -> ! {
    log::info!("shutdown: syncing, stopping processes, unmounting, rebooting");
    let _ = quiesce(shares);
    for mp in mount_points() {
        if matches!(mp.to_str(), Some("/dev") | Some("/proc") | Some("/sys")) {
            continue;
        }
        if umount2(&mp, MntFlags::empty()).is_err() {
            let _ = umount2(&mp, MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
    // Make sure the last log lines are out before the VM goes away.
    let _ = nix::unistd::fsync(std::io::stderr().as_raw_fd());
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log::error!("reboot: {err:?}");
    std::process::exit(1)
}

/// `PF_KTHREAD` in the flags of `/proc/<pid>/stat` (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Number of processes under `proc` (a procfs mount) other than PID 1 that
/// are neither kernel threads nor zombies; a zombie thread-group leader whose
/// other threads still run counts as live. `None` if `proc` cannot be read.
fn live_user_processes(proc: &Path) -> Option<usize> {
    let dir = std::fs::read_dir(proc).ok()?;
    Some(
        dir.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n != "1" && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter(|e| {
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    return false;
                };
                match stat_process_state(&stat) {
                    Some(ProcessState::Live) => true,
                    // The leader exited first; its threads (and fds) may live on.
                    Some(ProcessState::Zombie) => std::fs::read_dir(e.path().join("task"))
                        .map(|tasks| tasks.count() > 1)
                        .unwrap_or(false),
                    Some(ProcessState::KernelThread) | None => false,
                }
            })
            .count(),
    )
}

/// What a `/proc/<pid>/stat` line says about its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessState {
    /// A user process that has not exited.
    Live,
    /// Exited (state `Z` or `X`), not yet reaped.
    Zombie,
    /// A kernel thread (`PF_KTHREAD` in its flags).
    KernelThread,
}

/// Parses a `/proc/<pid>/stat` line (proc(5)): state is field 3, flags field 9.
/// The command name (field 2) may hold spaces and parentheses, so the fields
/// are counted from its last `)`. `None` if the line is malformed.
fn stat_process_state(stat: &str) -> Option<ProcessState> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?; // field 3
    let flags: u64 = fields.nth(5)?.parse().ok()?; // field 9
    Some(if flags & PF_KTHREAD != 0 {
        ProcessState::KernelThread
    } else if state == "Z" || state == "X" {
        ProcessState::Zombie
    } else {
        ProcessState::Live
    })
}

/// `vmrt.debug_console`: starts `/bin/sh` (present in the debug initramfs
/// only) as a session leader on `/dev/console`, with the console as its
/// controlling terminal. The shell is not waited for here: the reaper
/// collects it when it exits.
///
/// # Errors
/// [`InitError::Fs`] when `/bin/sh` is missing or cannot be started.
pub fn spawn_debug_console() -> Result<u32, InitError> {
    use std::os::unix::process::CommandExt;
    let fs_err = |source| InitError::Fs {
        what: "debug console",
        path: PathBuf::from("/bin/sh"),
        source,
    };
    let console = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .map_err(fs_err)
    };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.stdin(console()?)
        .stdout(console()?)
        .stderr(console()?)
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("TERM", "linux")
        .env("HOME", "/");
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // system calls (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Best-effort: make the console the controlling terminal.
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(fs_err)?;
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiesce_is_clean_only_without_survivors_and_detached_shares() {
        let clean = Quiesced {
            survivors: Some(0),
            detached: vec![],
        };
        assert!(clean.is_clean());
        let unknown = Quiesced {
            survivors: None,
            detached: vec![],
        };
        assert!(!unknown.is_clean());
        assert_eq!(unknown.to_string(), "live processes unknown (/proc unreadable)");
        let busy = Quiesced {
            survivors: Some(2),
            detached: vec![PathBuf::from("/run/vmrt/shared")],
        };
        assert!(!busy.is_clean());
        assert_eq!(
            busy.to_string(),
            "2 process(es) still alive, share(s) busy and only detached: /run/vmrt/shared"
        );
    }

    #[test]
    fn stat_lines_tell_user_processes_from_kernel_threads_and_zombies() {
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(stat_process_state(&own), Some(ProcessState::Live), "{own}");
        // kthreadd's line (flags 0x208040 = PF_KTHREAD | PF_NOFREEZE | ...).
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0";
        assert_eq!(
            stat_process_state(kthread),
            Some(ProcessState::KernelThread)
        );
        // A command name with spaces and parentheses, as a zombie and running.
        let zombie = "42 (a) b (c)) Z 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0";
        assert_eq!(stat_process_state(zombie), Some(ProcessState::Zombie));
        let sleeping = "42 (a) b (c)) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0";
        assert_eq!(stat_process_state(sleeping), Some(ProcessState::Live));
        assert_eq!(stat_process_state("42 (no close paren S 1"), None);
        assert_eq!(stat_process_state("42 (x) S 1 2"), None);
        // On a host whose pid 2 is kthreadd (not in a container's pid namespace).
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            let real = std::fs::read_to_string("/proc/2/stat").unwrap();
            assert_eq!(
                stat_process_state(&real),
                Some(ProcessState::KernelThread),
                "{real}"
            );
        }
    }

    #[test]
    fn a_live_child_is_counted_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dir = Path::new("/proc").join(child.id().to_string());
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        assert_eq!(stat_process_state(&stat), Some(ProcessState::Live));
        assert!(live_user_processes(Path::new("/proc")).unwrap() >= 1);
        child.kill().unwrap();
        // Killed but not yet waited for: a zombie, not counted as live.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            if stat_process_state(&stat) == Some(ProcessState::Zombie) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie: {stat}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_directory_without_processes_counts_none_and_a_missing_one_is_unknown() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("7")).unwrap();
        std::fs::create_dir(d.path().join("self")).unwrap();
        assert_eq!(live_user_processes(d.path()), Some(0));
        assert_eq!(live_user_processes(&d.path().join("missing")), None);
    }

    #[test]
    fn a_zombie_leader_with_a_live_thread_counts_as_live() {
        let d = tempfile::tempdir().unwrap();
        let zombie = "9 (x) Z 1 9 9 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 2 0 1 0 0\n";
        for (pid, tasks) in [("9", &["9", "10"][..]), ("11", &["11"][..])] {
            let p = d.path().join(pid);
            std::fs::create_dir_all(p.join("task")).unwrap();
            std::fs::write(p.join("stat"), zombie).unwrap();
            for t in tasks {
                std::fs::create_dir(p.join("task").join(t)).unwrap();
            }
        }
        assert_eq!(live_user_processes(d.path()), Some(1));
    }
}
