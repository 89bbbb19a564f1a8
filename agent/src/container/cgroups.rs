//! cgroup v2 side of a container: statistics, OOM watching, signalling every
//! process, resource updates (Linux kernel cgroup-v2 interface files; OCI
//! runtime spec 1.1 `linux.resources`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tokio::sync::broadcast;

use super::Error;

/// Mount point of the cgroup v2 hierarchy (libcontainer's fixed root).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Poll interval of the OOM watcher on `memory.events`.
const OOM_POLL: Duration = Duration::from_millis(200);

/// Absolute directory of cgroup path `cgroup_path` (e.g. `/vmrt/<id>`).
pub fn cgroup_dir(cgroup_path: &Path) -> PathBuf {
    let rel = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    Path::new(CGROUP_ROOT).join(rel)
}

/// cgroup v2 figures of one container (same fields as `ContainerStats` in
/// `protocol/protos/agent.proto`). Times in microseconds, memory in bytes. A
/// figure whose controller is not enabled in the container's cgroup is 0; a
/// limit of `max` is `u64::MAX`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `cpu.stat` usage_usec.
    pub cpu_usage_usec: u64,
    /// `cpu.stat` user_usec.
    pub cpu_user_usec: u64,
    /// `cpu.stat` system_usec.
    pub cpu_system_usec: u64,
    /// `cpu.stat` nr_periods (cpu controller).
    pub cpu_nr_periods: u64,
    /// `cpu.stat` nr_throttled (cpu controller).
    pub cpu_nr_throttled: u64,
    /// `cpu.stat` throttled_usec (cpu controller).
    pub cpu_throttled_usec: u64,
    /// `memory.current`.
    pub memory_usage: u64,
    /// `memory.max`.
    pub memory_limit: u64,
    /// `memory.swap.current`.
    pub memory_swap_usage: u64,
    /// `memory.swap.max`.
    pub memory_swap_limit: u64,
    /// `memory.stat` anon.
    pub memory_anon: u64,
    /// `memory.stat` file.
    pub memory_file: u64,
    /// `memory.events` oom.
    pub memory_oom_events: u64,
    /// `memory.events` oom_kill.
    pub memory_oom_kill: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `pids.max`.
    pub pids_limit: u64,
}

fn read_value(dir: &Path, file: &str) -> u64 {
    match std::fs::read_to_string(dir.join(file)) {
        Ok(s) => {
            let s = s.trim();
            if s == "max" {
                u64::MAX
            } else {
                s.parse().unwrap_or(0)
            }
        }
        Err(_) => 0,
    }
}

/// Value of `key` in a flat-keyed file (`cpu.stat`, `memory.stat`, `memory.events`).
fn read_keyed(dir: &Path, file: &str, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(dir.join(file)) else {
        return 0;
    };
    s.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads the statistics of the cgroup at `dir`. Errors: the cgroup does not
/// exist (`FailedPrecondition`).
pub fn read_stats(dir: &Path) -> Result<Stats, Error> {
    if !dir.join("cgroup.procs").exists() {
        return Err(Error::FailedPrecondition(format!(
            "cgroup {} does not exist",
            dir.display()
        )));
    }
    Ok(Stats {
        cpu_usage_usec: read_keyed(dir, "cpu.stat", "usage_usec"),
        cpu_user_usec: read_keyed(dir, "cpu.stat", "user_usec"),
        cpu_system_usec: read_keyed(dir, "cpu.stat", "system_usec"),
        cpu_nr_periods: read_keyed(dir, "cpu.stat", "nr_periods"),
        cpu_nr_throttled: read_keyed(dir, "cpu.stat", "nr_throttled"),
        cpu_throttled_usec: read_keyed(dir, "cpu.stat", "throttled_usec"),
        memory_usage: read_value(dir, "memory.current"),
        memory_limit: read_value(dir, "memory.max"),
        memory_swap_usage: read_value(dir, "memory.swap.current"),
        memory_swap_limit: read_value(dir, "memory.swap.max"),
        memory_anon: read_keyed(dir, "memory.stat", "anon"),
        memory_file: read_keyed(dir, "memory.stat", "file"),
        memory_oom_events: read_keyed(dir, "memory.events", "oom"),
        memory_oom_kill: read_keyed(dir, "memory.events", "oom_kill"),
        pids_current: read_value(dir, "pids.current"),
        pids_limit: read_value(dir, "pids.max"),
    })
}

/// Every pid of the cgroup at `dir` and its descendants (`cgroup.procs`),
/// sorted. A missing cgroup gives an empty list.
pub fn all_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Sends `signal` to every process of the cgroup at `dir`. SIGKILL uses
/// `cgroup.kill` (atomic against forks) when the kernel has it.
pub fn signal_all(dir: &Path, signal: Signal) -> Result<(), Error> {
    if signal == Signal::SIGKILL && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return Ok(());
    }
    for pid in all_pids(dir) {
        match kill(Pid::from_raw(pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(Error::Internal(format!("kill({pid}, {signal}): {e}"))),
        }
    }
    Ok(())
}

/// Applies `resources` to the container's cgroup (libcgroups v2 manager).
pub fn update(
    container_id: &str,
    cgroup_path: &Path,
    resources: &LinuxResources,
) -> Result<(), Error> {
    use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
    let manager = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.to_path_buf(),
        systemd_cgroup: false,
        container_name: container_id.to_string(),
    })
    .map_err(|e| Error::Internal(format!("cgroup manager for {}: {e}", cgroup_path.display())))?;
    manager
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| Error::Internal(format!("apply resources to {}: {e}", cgroup_path.display())))
}

/// The OOM-kill count of one container's cgroup (`memory.events`
/// `oom_kill`) as last reported, and where to report growth. The poll loop
/// ([`watch_oom`]) and the manager's synchronous checks (before a wait
/// returns the init process's exit, and before delete) share it, so an OOM
/// kill is reported exactly once, and always before the exit it caused is
/// reported or the cgroup is removed.
#[derive(Debug, Clone)]
pub struct OomWatch {
    container_id: String,
    dir: PathBuf,
    seen: Arc<AtomicU64>,
    tx: broadcast::Sender<String>,
}

impl OomWatch {
    /// Starts from the cgroup's current count (kills before now are not news).
    pub fn new(container_id: String, dir: PathBuf, tx: broadcast::Sender<String>) -> Self {
        let seen = Arc::new(AtomicU64::new(read_keyed(&dir, "memory.events", "oom_kill")));
        OomWatch { container_id, dir, seen, tx }
    }

    /// Reads the count now and sends the container id once if it grew since
    /// the last check. Returns whether it did.
    pub fn check(&self) -> bool {
        let now = read_keyed(&self.dir, "memory.events", "oom_kill");
        let before = self.seen.fetch_max(now, Ordering::SeqCst);
        if now > before {
            log::info!(
                "container {}: OOM kill (memory.events oom_kill {before} -> {now})",
                self.container_id
            );
            let _ = self.tx.send(self.container_id.clone());
            return true;
        }
        false
    }
}

/// Polls [`OomWatch::check`] every [`OOM_POLL`] until the cgroup is gone;
/// the manager aborts it on delete (after a last check).
pub async fn watch_oom(watch: OomWatch) {
    loop {
        tokio::time::sleep(OOM_POLL).await;
        if !watch.dir.exists() {
            return;
        }
        watch.check();
    }
}
