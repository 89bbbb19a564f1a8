//! Zombie reaper of the agent (PID 1 in the guest).
//!
//! One thread collects every exited child with `waitpid(-1, WNOHANG | __WALL)`
//! (`__WALL` because libcontainer clones container processes with
//! `CLONE_PARENT` and no exit signal: they never raise SIGCHLD and plain
//! `waitpid` ignores them). It wakes on SIGCHLD (orphans re-parented to PID 1,
//! ordinary children), on the readability of a pidfd of each registered
//! process (container processes, which raise no SIGCHLD), and every second as
//! a safety net.
//!
//! libcontainer `waitpid`s its own intermediate process and hook processes:
//! code that forks and waits must hold [`lock`] for the whole span, which keeps
//! the reaper from collecting those children first (Kata's agent serialises
//! the same way).
//!
//! Exits of pids nobody registered are kept in a bounded table, so a
//! [`register`] that comes later still gets the status.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::SystemTime;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::ExitInfo;

/// Bound of the table of exits nobody registered yet (oldest dropped first).
const MAX_UNCLAIMED: usize = 4096;

struct Watched {
    tx: watch::Sender<Option<ExitInfo>>,
    /// pidfd of the process (None if pidfd_open failed: then SIGCHLD/timeout
    /// wake the reaper).
    pidfd: Option<OwnedFd>,
}

#[derive(Default)]
struct Table {
    watched: HashMap<i32, Watched>,
    unclaimed: HashMap<i32, ExitInfo>,
    unclaimed_order: VecDeque<i32>,
}

struct Reaper {
    reap_lock: Mutex<()>,
    table: Mutex<Table>,
    /// eventfd that wakes the reaper thread (SIGCHLD handler, new registrations).
    wake: OwnedFd,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();
static START: Once = Once::new();
/// Raw eventfd for the async-signal-safe SIGCHLD handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGCHLD disposition found when the handler was installed (chained).
static OLD_ACTION: OnceLock<libc::sigaction> = OnceLock::new();
/// The pid of the process that installed the handler. A forked child (the
/// libcontainer helper) inherits the handler but not the descriptors behind
/// `WAKE_FD` and the chained handler's: there their numbers name whatever the
/// child opened since (libcontainer's channel sockets), so the handler must
/// do nothing outside this process.
static HANDLER_PID: AtomicI32 = AtomicI32::new(0);

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(
            fd >= 0,
            "eventfd for the reaper: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        WAKE_FD.store(fd, Ordering::SeqCst);
        Reaper {
            reap_lock: Mutex::new(()),
            table: Mutex::new(Table::default()),
            wake,
        }
    })
}

/// Held while code forks children and waits for them itself (libcontainer
/// create/start/exec/delete, `std::process::Command`): the reaper does not
/// call `waitpid` while any guard is alive.
pub struct ReapGuard {
    _guard: MutexGuard<'static, ()>,
}

/// Takes the reaper lock (blocking). See [`ReapGuard`].
pub fn lock() -> ReapGuard {
    let guard = reaper()
        .reap_lock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    ReapGuard { _guard: guard }
}

fn wake() {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd; async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_sigchld(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: getpid(2) is async-signal-safe and has no preconditions.
    if unsafe { libc::getpid() } != HANDLER_PID.load(Ordering::SeqCst) {
        return;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    wake();
    if let Some(old) = OLD_ACTION.get() {
        let handler = old.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so
                // it has this signature; we forward the kernel's arguments.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(sig);
            }
        }
    }
    if let Some(e) = errno {
        // SAFETY: restores errno of the interrupted code; __errno_location is thread-local.
        unsafe { *libc::__errno_location() = e };
    }
}

/// Starts the reaper thread and installs the SIGCHLD handler (chaining any
/// previous handler). Idempotent; [`super::ContainerManager::new`] calls it
/// too. Call it once at agent start, before any child is forked.
pub fn start_reaper() {
    START.call_once(|| {
        let r = reaper();
        // Orphans of our children (container processes whose libcontainer
        // helper exited) come to us even when we are not PID 1 (tests).
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) has no memory preconditions.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        // SAFETY: sigaction with a zeroed, then filled, struct; the handler only
        // performs async-signal-safe operations (write to an eventfd, chaining).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigchld as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            HANDLER_PID.store(libc::getpid(), Ordering::SeqCst);
            if libc::sigaction(libc::SIGCHLD, &new, &mut old) == 0 {
                let _ = OLD_ACTION.set(old);
            } else {
                log::warn!(
                    "reaper: sigaction(SIGCHLD): {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        std::thread::Builder::new()
            .name("vmrt-reaper".into())
            .spawn(move || reaper_thread(r))
            .expect("spawn reaper thread");
    });
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        log::warn!(
            "reaper: pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: fresh descriptor returned by the kernel.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Registers interest in the exit of child `pid` and returns a receiver that
/// holds `Some(ExitInfo)` once it was reaped. The caller must hold the reaper
/// lock since before the child was forked (so it cannot have been reaped by
/// anybody else); an exit already recorded as unclaimed is returned at once.
pub fn register(_guard: &ReapGuard, pid: u32) -> watch::Receiver<Option<ExitInfo>> {
    start_reaper();
    let r = reaper();
    let pid = pid as i32;
    let mut table = r.table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(info) = table.unclaimed.remove(&pid) {
        table.unclaimed_order.retain(|p| *p != pid);
        let (_tx, rx) = watch::channel(Some(info));
        return rx;
    }
    if let Some(w) = table.watched.get(&pid) {
        return w.tx.subscribe();
    }
    let (tx, rx) = watch::channel(None);
    table.watched.insert(
        pid,
        Watched {
            tx,
            pidfd: pidfd_open(pid),
        },
    );
    drop(table);
    wake();
    rx
}

/// Converts a wait status into containerd's exit status convention.
fn exit_status(status: WaitStatus) -> Option<(i32, u32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code as u32)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as u32)),
        _ => None,
    }
}

fn record(r: &Reaper, pid: i32, status: u32) {
    let info = ExitInfo {
        status,
        exited_at: SystemTime::now(),
    };
    let mut table = r.table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = table.watched.remove(&pid) {
        w.tx.send_replace(Some(info));
        return;
    }
    if table.unclaimed.insert(pid, info).is_none() {
        table.unclaimed_order.push_back(pid);
    }
    while table.unclaimed_order.len() > MAX_UNCLAIMED {
        if let Some(old) = table.unclaimed_order.pop_front() {
            table.unclaimed.remove(&old);
        }
    }
}

fn reap_all(r: &Reaper) {
    let _guard = lock();
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::StillAlive) => break,
            Ok(status) => {
                if let Some((pid, code)) = exit_status(status) {
                    log::debug!("reaper: pid {pid} exited with status {code}");
                    record(r, pid, code);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break, // ECHILD: no children at all
        }
    }
}

fn reaper_thread(r: &'static Reaper) {
    loop {
        let mut fds = vec![libc::pollfd {
            fd: r.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        {
            let table = r.table.lock().unwrap_or_else(|p| p.into_inner());
            // Only this thread removes entries (in `record`, called below after
            // poll returned), so these raw fds stay open while polling.
            fds.extend(
                table
                    .watched
                    .values()
                    .filter_map(|w| w.pidfd.as_ref())
                    .map(|fd| libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }),
            );
        }
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(r.wake.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        reap_all(r);
    }
}
