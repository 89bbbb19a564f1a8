//! The forked libcontainer helper keeps the descriptors registered with
//! `keep_log_fd_in_helpers`: what libcontainer logs in the helper and in the
//! container's init process (before its execve) reaches the agent's log, and
//! the workload still does not inherit the descriptor. Needs root and
//! /bin/busybox (static). Its own test binary: it installs the `log` logger.

#[path = "container_common/mod.rs"]
mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;

/// A logger writing `<pid> <target>: <message>` lines to one descriptor with
/// one write(2) each, as the agent's logger does (no lock: it runs in forked
/// children of a multithreaded process).
struct FdLogger(RawFd);

impl log::Log for FdLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let line = format!("{} {}: {}\n", std::process::id(), r.target(), r.args());
        // SAFETY: writes from a live buffer to a descriptor this test keeps open.
        let _ = unsafe { libc::write(self.0, line.as_ptr().cast(), line.len()) };
    }
    fn flush(&self) {}
}

/// Everything logged so far, collected from the log pipe by a thread.
static LOGGED: OnceLock<Arc<Mutex<String>>> = OnceLock::new();

/// Installs the logger on a close-on-exec pipe registered for the helpers;
/// returns the write end's number.
fn install_logger() -> RawFd {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let fd = w.as_raw_fd();
    std::mem::forget(w); // the logger's, for the life of the process
    assert!(vmrt_agent::container::keep_log_fd_in_helpers(fd));
    assert!(
        vmrt_agent::container::keep_log_fd_in_helpers(fd),
        "registering twice is fine"
    );
    let logged = LOGGED.get_or_init(Default::default).clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut buf = [0u8; 8192];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            logged
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log::set_boxed_logger(Box::new(FdLogger(fd))).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    fd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcontainer_logs_from_helper_and_init_reach_the_log_fd() {
    let log_fd = install_logger();
    let fx = fixture();
    let (exit, out) = run(&fx, "helperlog", &spec(&["ls", "/proc/self/fd"])).await;
    assert_eq!(exit.status, 0, "ls failed: {out}");
    // The workload sees its stdio and ls's own directory fd, not the log fd.
    let fds: Vec<&str> = out.split_whitespace().collect();
    assert!(
        !fds.contains(&log_fd.to_string().as_str()),
        "log fd {log_fd} leaked into the workload: {fds:?}"
    );
    assert!(fds.len() <= 4, "unexpected fds in the workload: {fds:?}");

    let me = std::process::id().to_string();
    let mut logged = String::new();
    for _ in 0..100 {
        logged = LOGGED.get().unwrap().lock().unwrap().clone();
        if logged.contains("libcontainer::rootfs") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let foreign: Vec<&str> = logged
        .lines()
        .filter(|l| l.split(' ').next() != Some(me.as_str()) && l.contains(" libcontainer"))
        .collect();
    // The container's init process prepares the rootfs; it is neither this
    // process nor the helper that created it.
    let pids: std::collections::BTreeSet<&str> =
        foreign.iter().filter_map(|l| l.split(' ').next()).collect();
    assert!(
        foreign.iter().any(|l| l.contains("libcontainer::rootfs")),
        "no libcontainer rootfs line from the container's init; logged:\n{logged}"
    );
    assert!(
        pids.len() >= 2,
        "expected lines from the helper and the init process, got pids {pids:?}:\n{logged}"
    );
}
