//! The agent as PID 1 of a real microVM: `vmrt-vmm` boots `build/vmlinux`
//! with an initramfs whose `/init` is this build's `vmrt-agent`; the test
//! talks ttrpc over the VMM's hybrid vsock socket (`CONNECT 1024\n`), checks
//! Version/Health and the stdio port, receives the agent's log over a
//! guest-initiated connection (`vmrt.log_port`, forwarded to `<uds>_<port>`),
//! then `Shutdown` must quiesce the guest before it replies and make the VMM
//! exit 0 (guest reboot).
//!
//! Needs a /dev/kvm that boots Linux guests: runs inside the runner VM
//! (`VMRT_IN_RUNNER` set), or where `VMRT_E2E_PATH=direct`; prints SKIP
//! otherwise. From the host:
//! `tests/runner-vm/run target/x86_64-unknown-linux-gnu/release/deps/agent_in_vm-<hash>`
//! (after `cargo test --release -p vmrt-agent --test agent_in_vm --no-run`
//! and building `vmrt-vmm` and `build/vmlinux`).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ttrpc::asynchronous::transport::Socket;
use ttrpc::asynchronous::Client;
use vmrt_protocol::agent::Empty;
use vmrt_protocol::agent_ttrpc::AgentClient;
use vmrt_protocol::{StdioStream, StreamHeader, API_VERSION, DEFAULT_API_PORT, DEFAULT_IO_PORT};

/// Host vsock port the agent's log is sent to (`vmrt.log_port`).
const LOG_PORT: u32 = 1026;

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Opens a hybrid vsock connection to guest port `port` (Firecracker
/// convention); None if the guest refused (not listening yet).
fn hybrid_connect(uds: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the OK line may be consumed.
    while line.len() < 64 {
        match std::io::Read::read(&mut s, &mut byte) {
            Ok(1) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            _ => return None,
        }
    }
    if !line.starts_with(b"OK ") {
        return None;
    }
    s.set_read_timeout(None).ok()?;
    Some(s)
}

fn runnable() -> bool {
    let ok = std::env::var_os("VMRT_IN_RUNNER").is_some()
        || std::env::var("VMRT_E2E_PATH").as_deref() == Ok("direct");
    if !ok {
        println!(
            "SKIP agent_in_vm: needs a /dev/kvm that boots Linux (run it through tests/runner-vm/run, \
             or set VMRT_E2E_PATH=direct)"
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_agent_serves_and_shuts_down_the_vm() {
    if !runnable() {
        return;
    }
    let repo = repo();
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_vmrt-agent"));
    let vmm = agent.parent().unwrap().join("vmrt-vmm");
    let kernel = repo.join("build/vmlinux");
    assert!(
        vmm.exists(),
        "{} missing: cargo build --release -p vmrt-vmm",
        vmm.display()
    );
    assert!(
        kernel.exists(),
        "{} missing: build the guest kernel",
        kernel.display()
    );

    let tmp = tempfile::Builder::new()
        .prefix("vmrt-agent-vm")
        .tempdir()
        .unwrap();
    let initrd = tmp.path().join("initramfs.cpio");
    let st = Command::new(repo.join("guest-rootfs/build.sh"))
        .arg("--agent")
        .arg(&agent)
        .arg("-o")
        .arg(&initrd)
        .status()
        .unwrap();
    assert!(st.success(), "guest-rootfs/build.sh failed");

    let uds = tmp.path().join("vsock.sock");
    let console = tmp.path().join("console.log");
    // A host listener for the guest-initiated connection of vmrt.log_port: the VMM
    // forwards guest connections to host port P to `<uds>_<P>`.
    let log_listener =
        std::os::unix::net::UnixListener::bind(format!("{}_{LOG_PORT}", uds.display())).unwrap();
    let config = serde_json::json!({
        "vcpus": 1,
        "memory_mib": 256,
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": format!("console=ttyS0 vmrt.log=debug vmrt.bogus=1 vmrt.log_port={LOG_PORT}"),
        "serial": {"type": "file", "path": console},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let config_path = tmp.path().join("vm.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let mut vmm = Vmm(Command::new(&vmm)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmrt-vmm"));

    // Wait for the agent to listen (boot included).
    let deadline = Instant::now() + Duration::from_secs(120);
    let stream = loop {
        if let Some(s) = hybrid_connect(&uds, DEFAULT_API_PORT) {
            break s;
        }
        if let Some(st) = vmm.0.try_wait().unwrap() {
            panic!(
                "vmrt-vmm exited early ({st}); console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent API not reachable; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    stream.set_nonblocking(true).unwrap();
    let socket = Socket::try_from(stream).unwrap();
    let c = AgentClient::new(Client::new(socket));
    let ctx = || ttrpc::context::with_duration(Duration::from_secs(30));

    let v = c.version(ctx(), &Empty::new()).await.unwrap();
    assert_eq!(v.api_version, API_VERSION);
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(v.kernel_release.starts_with("6."), "{}", v.kernel_release);
    assert!(v.agent_rss_kib > 0 && v.started_at_us > 0, "{v:?}");
    eprintln!(
        "agent in the VM: RSS {} KiB, started at guest uptime {} us, ready {} us later",
        v.agent_rss_kib, v.started_at_us, v.start_to_ready_us
    );
    for _ in 0..100 {
        assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
    }

    // The stdio port accepts a valid header and keeps the connection; a
    // garbage header is closed.
    let mut good = hybrid_connect(&uds, DEFAULT_IO_PORT).expect("connect to io port");
    good.write_all(
        StreamHeader::new("c1", "", StdioStream::Stdout)
            .encode()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let mut bad = hybrid_connect(&uds, DEFAULT_IO_PORT).expect("connect to io port");
    bad.write_all(b"garbage\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        std::io::Read::read(&mut bad, &mut buf).unwrap_or(0),
        0,
        "garbage stream not closed"
    );

    // The agent connected out to the host listener and sends its log there too.
    log_listener.set_nonblocking(true).unwrap();
    let accept_deadline = Instant::now() + Duration::from_secs(30);
    let mut from_guest = loop {
        match log_listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < accept_deadline,
                    "no guest-initiated connection to {}_{LOG_PORT} within 30 s",
                    uds.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept on the log port listener: {e}"),
        }
    };
    from_guest.set_nonblocking(false).unwrap();
    from_guest
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut forwarded = Vec::new();
    let mut chunk = [0u8; 4096];
    // Up to the end of the start-up steps line, logged (at debug) right after the
    // API's listening line (a read may end mid-line).
    let steps_done = |f: &[u8]| {
        let t = String::from_utf8_lossy(f);
        t.find("start-up steps on the guest clock")
            .is_some_and(|i| t[i..].contains("from main)\n"))
    };
    while !steps_done(&forwarded) {
        match std::io::Read::read(&mut from_guest, &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => forwarded.extend_from_slice(&chunk[..n]),
        }
    }
    let forwarded = String::from_utf8_lossy(&forwarded);
    assert!(
        forwarded.contains("vmrt-agent") && forwarded.contains("agent API: listening"),
        "log over the guest-initiated vsock connection: {forwarded:?}"
    );
    // The start-up trace names the PID 1 steps and ends at the API listening.
    let steps = forwarded
        .lines()
        .find(|l| l.contains("start-up steps on the guest clock (ms): "))
        .unwrap_or_else(|| panic!("no start-up steps line: {forwarded:?}"));
    for step in [
        "/dev ",
        "early mounts ",
        "cgroup controllers ",
        "log port ",
        "tokio runtime ",
        "API listening ",
    ] {
        assert!(steps.contains(step), "step {step:?} missing: {steps}");
    }

    c.shutdown(ctx(), &Empty::new()).await.unwrap();
    // As PID 1 the agent stops the guest's processes and syncs and unmounts
    // its shares before it replies (the shim stops the VMM on a successful
    // reply); the reply was Ok, so the quiesce was clean and logged as such.
    let mut after = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&after);
        if text.contains("Shutdown: processes stopped, shares synced and unmounted in ") {
            break;
        }
        match std::io::Read::read(&mut from_guest, &mut chunk) {
            Ok(0) | Err(_) => panic!(
                "no quiesce line before the log connection ended: {:?}",
                String::from_utf8_lossy(&after)
            ),
            Ok(n) => after.extend_from_slice(&chunk[..n]),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = vmm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "VMM still running after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(status.success(), "vmrt-vmm exit {status}; console:\n{log}");
    // With the log connection up, info and debug lines go to the host only;
    // warnings (the unknown key) reach both. The shutdown lines come after
    // the agent went back to the console (the VM resets right after them).
    for want in [
        "unknown kernel command line key \"vmrt.bogus\"",
        "shutdown: syncing",
    ] {
        assert!(log.contains(want), "console lacks {want:?}:\n{log}");
    }
    assert!(
        forwarded.contains("unknown kernel command line key \"vmrt.bogus\""),
        "vsock log lacks the warning: {forwarded:?}"
    );
    for want in [
        "starting (pid 1,",
        "cgroup v2 controllers enabled: cpu cpuset memory pids io",
        "listening on vsock://-1:1024",
    ] {
        assert!(
            forwarded.contains(want),
            "vsock log lacks {want:?}: {forwarded:?}"
        );
        assert!(
            !log.contains(want),
            "info line {want:?} on the console too:\n{log}"
        );
    }
    drop(good);
}
