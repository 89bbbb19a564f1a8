//! Shared helpers of the `container_*` integration tests: a busybox rootfs,
//! OCI specs, stdio pipes, leak checks, and the cgroup v2 setup.
//!
//! cgroup v2: libcontainer (built with `v2` only) needs a cgroup2 file system
//! at /sys/fs/cgroup. On a hybrid host (cgroup2 at /sys/fs/cgroup/unified)
//! each test binary moves itself, before `main` (single-threaded, via
//! `.init_array`), into a private mount namespace where the unified hierarchy
//! is mounted at /sys/fs/cgroup. Controllers bound to v1 there (cpu, memory,
//! pids) are missing: tests that need them print SKIP and say to run them in
//! the runner VM (`tests/runner-vm/run cargo test ...`).
#![allow(dead_code)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmrt_agent::container::{ContainerManager, ExitInfo, ProcessStdio};

extern "C" fn setup_cgroup_namespace() {
    // SAFETY: runs before main, single-threaded; plain syscalls with checked results.
    unsafe {
        if libc::geteuid() != 0 {
            return;
        }
        let mut st: libc::statfs = std::mem::zeroed();
        let root = c"/sys/fs/cgroup";
        if libc::statfs(root.as_ptr(), &mut st) == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC {
            return; // pure cgroup v2 already (runner VM, modern hosts)
        }
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return;
        }
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::mount(
            c"cgroup2".as_ptr(),
            root.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

#[used]
#[link_section = ".init_array"]
static SETUP_CGROUP_NAMESPACE: extern "C" fn() = setup_cgroup_namespace;

/// True when /sys/fs/cgroup is cgroup2 and has `controller` available.
pub fn has_controller(controller: &str) -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map(|s| s.split_whitespace().any(|c| c == controller))
        .unwrap_or(false)
}

/// Prints an explicit SKIP line and returns true when a controller is missing.
pub fn skip_without(controllers: &[&str], test: &str) -> bool {
    let missing: Vec<&str> = controllers
        .iter()
        .copied()
        .filter(|c| !has_controller(c))
        .collect();
    if missing.is_empty() {
        return false;
    }
    // Where the controllers must exist (the runner VM's pure cgroup2, or a
    // host that says so), a missing one is a failure, not a skip.
    if std::env::var_os("VMRT_REQUIRE_CGROUP_CONTROLLERS").is_some() {
        panic!("{test}: cgroup v2 controller(s) {missing:?} not available at /sys/fs/cgroup");
    }
    println!(
        "SKIP {test}: cgroup v2 controller(s) {missing:?} not available at /sys/fs/cgroup \
         (bound to cgroup v1 on this host); run it in the runner VM: \
         tests/runner-vm/run cargo test --release -p vmrt-agent --test <this suite>"
    );
    true
}

/// Busybox applets linked into the test rootfs.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "id", "sleep", "hostname", "chown", "mkdir", "stty", "touch", "ls",
    "true", "false", "kill", "head", "dd", "tail", "wc", "grep", "env", "pwd", "ps", "rmdir",
    "test", "tr", "cut", "stat", "mount",
];

/// Tests of one binary run in parallel; one that counts the process's file
/// descriptors (a leak check) must not see another test's. Every fixture
/// holds this shared; [`fixture_exclusive`] holds it alone.
static FD_ACCOUNTING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test fixture: state dir, rootfs and a manager.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub rootfs: PathBuf,
    pub mgr: Arc<ContainerManager>,
    _fd_accounting: FdAccounting,
}

enum FdAccounting {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// A fixture while no other test of this binary has one: for tests that
/// count the process's file descriptors.
pub fn fixture_exclusive() -> Fixture {
    let guard = FD_ACCOUNTING.write().unwrap_or_else(|p| p.into_inner());
    build_fixture(FdAccounting::Exclusive(guard))
}

/// Builds a busybox rootfs in a fresh temp dir and a manager on another.
pub fn fixture() -> Fixture {
    let guard = FD_ACCOUNTING.read().unwrap_or_else(|p| p.into_inner());
    build_fixture(FdAccounting::Shared(guard))
}

fn build_fixture(fd_accounting: FdAccounting) -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("vmrt-ct")
        .tempdir()
        .unwrap();
    let rootfs = tmp.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root", "data"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(rootfs.join("data/file"), "data\n").unwrap();
    let state_dir = tmp.path().join("state");
    let mgr = Arc::new(ContainerManager::new(state_dir.clone()));
    Fixture {
        tmp,
        state_dir,
        rootfs,
        mgr,
        _fd_accounting: fd_accounting,
    }
}

/// Default capability set of `runc spec`.
pub fn default_caps() -> Value {
    json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ])
}

/// A runc-style config.json running `args` (root.path is replaced by the manager).
pub fn spec(args: &[&str]) -> Value {
    let caps = default_caps();
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "vmrt-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A pipe whose write end goes to the process; the returned handle yields
/// everything written until every write end is closed.
pub fn capture() -> (OwnedFd, std::thread::JoinHandle<String>) {
    let (r, w) = nix::unistd::pipe().unwrap();
    let h = std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    });
    (w, h)
}

/// Joins a capture thread, failing after `timeout` (EOF never came).
pub async fn output(h: std::thread::JoinHandle<String>, timeout: Duration) -> String {
    let t = tokio::task::spawn_blocking(move || h.join().unwrap());
    tokio::time::timeout(timeout, t)
        .await
        .expect("stdout EOF did not arrive (agent kept a copy of the fd?)")
        .unwrap()
}

/// Creates, starts and waits for a container running `spec`; returns its exit
/// and stdout+stderr (both go to one pipe), then deletes it and checks that
/// nothing leaked.
pub async fn run(fx: &Fixture, id: &str, spec: &Value) -> (ExitInfo, String) {
    let (w, h) = capture();
    let w2 = w.try_clone().unwrap();
    let stdio = ProcessStdio {
        stdin: None,
        stdout: Some(w),
        stderr: Some(w2),
        terminal: false,
    };
    let json = serde_json::to_vec(spec).unwrap();
    let pid = fx.mgr.create(id, &json, &fx.rootfs, stdio).await.unwrap();
    assert!(pid > 1);
    fx.mgr.start(id).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), fx.mgr.wait(id, ""))
        .await
        .expect("container did not exit")
        .unwrap();
    let out = output(h, Duration::from_secs(10)).await;
    fx.mgr.delete(id).await.unwrap();
    assert_clean(fx, id, &[pid]);
    (exit, out)
}

/// Asserts that the manager's state dir is empty (no container left).
pub fn assert_state_empty(fx: &Fixture) {
    let leftovers: Vec<_> = std::fs::read_dir(&fx.state_dir)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "files left in state dir: {leftovers:?}"
    );
}

/// Asserts that container `id` left nothing: no state files, no cgroup, no
/// mount referring to the fixture, no process among `pids`.
pub fn assert_clean(fx: &Fixture, id: &str, pids: &[u32]) {
    assert!(
        !fx.state_dir.join(id).exists(),
        "state dir of {id} left behind"
    );
    assert!(
        !Path::new("/sys/fs/cgroup/vmrt").join(id).exists(),
        "cgroup /vmrt/{id} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let tmp = fx.tmp.path().to_str().unwrap();
    assert!(!mounts.contains(tmp), "mount under {tmp} left behind");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left behind (not reaped?)"
        );
    }
}

impl Drop for Fixture {
    /// A failed test must not leave containers running (a created init would
    /// keep its pipes open and hang the other tests): kill what is left.
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.state_dir) else {
            return;
        };
        for e in rd.flatten() {
            let cg = Path::new("/sys/fs/cgroup/vmrt").join(e.file_name());
            if std::fs::write(cg.join("cgroup.kill"), "1").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
                let _ = std::fs::remove_dir(&cg);
            }
        }
    }
}
