//! End to end through the agent binary on a host: the shim's view. Stdio
//! streams connect to the I/O socket with their header line, then the ttrpc
//! API creates, starts, execs into, signals, waits for and removes busybox
//! containers (youki's libcontainer under the agent's ContainerManager).
//!
//! Needs root, /bin/busybox (static) and `unshare`: the agent runs in a
//! private mount namespace with cgroup2 mounted on /sys/fs/cgroup when the
//! host has a hybrid cgroup layout (pure cgroup v2 hosts and the runner VM
//! use theirs as is).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use ttrpc::asynchronous::Client;
use vmrt_protocol::agent::{self as pb, Empty};
use vmrt_protocol::agent_ttrpc::AgentClient;
use vmrt_protocol::{StdioStream, StreamHeader};

struct Agent {
    child: Child,
    tmp: tempfile::TempDir,
    api: PathBuf,
    io: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_agent() -> Agent {
    let tmp = tempfile::Builder::new()
        .prefix("vmrt-agent-ct")
        .tempdir()
        .unwrap();
    let api = tmp.path().join("api.sock");
    let io = tmp.path().join("io.sock");
    let rootfs = tmp.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "sleep", "read", "tr"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let script = r#"[ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || mount -t cgroup2 none /sys/fs/cgroup || exit 99; exec "$0" "$@""#;
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .arg(env!("CARGO_BIN_EXE_vmrt-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", api.display()))
        .arg("--io-listen")
        .arg(format!("unix://{}", io.display()))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["--cmdline", "vmrt.log=debug"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn unshare + vmrt-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(api.exists() && io.exists()) {
        assert!(Instant::now() < deadline, "agent sockets did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    Agent {
        child,
        tmp,
        api,
        io,
    }
}

fn rootfs(agent: &Agent) -> String {
    agent.tmp.path().join("rootfs").display().to_string()
}

fn spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ct",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    }))
    .unwrap()
}

fn connect_stream(agent: &Agent, container: &str, exec: &str, stream: StdioStream) -> UnixStream {
    let mut s = UnixStream::connect(&agent.io).unwrap();
    let line = StreamHeader::new(container, exec, stream).encode().unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s
}

/// Reads a stream to EOF on a thread (bounded by a read timeout).
fn read_all(mut s: UnixStream) -> std::thread::JoinHandle<String> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(60))
}

fn creq(id: &str, agent: &Agent, args: &[&str], stdio: pb::Stdio) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec: spec(args),
        rootfs: rootfs(agent),
        stdio: Some(stdio).into(),
        ..Default::default()
    }
}

fn creq_id(id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

fn preq(id: &str, exec: &str) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    }
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/bin/busybox").exists();
    if !ok {
        println!("SKIP agent_containers: needs root and /bin/busybox");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_stdio_exec_signal_remove_over_ttrpc() {
    if !can_run() {
        return;
    }
    let agent = start_agent();
    let c = AgentClient::new(
        Client::connect(&format!("unix://{}", agent.api.display()))
            .await
            .unwrap(),
    );

    // Init process with stdin + stdout streams, connected before create.
    let mut stdin = connect_stream(&agent, "ct1", "", StdioStream::Stdin);
    let stdout = connect_stream(&agent, "ct1", "", StdioStream::Stdout);
    let out = read_all(stdout);
    let stdio = pb::Stdio {
        stdin: true,
        stdout: true,
        ..Default::default()
    };
    let created = c
        .create_container(
            ctx(),
            &creq(
                "ct1",
                &agent,
                &["sh", "-c", "read x; echo got:$x; exit 7"],
                stdio,
            ),
        )
        .await
        .unwrap();
    assert!(created.pid > 1);
    let started = c.start_container(ctx(), &creq_id("ct1")).await.unwrap();
    assert_eq!(started.pid, created.pid);
    stdin.write_all(b"hello\n").unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    let exit = c.wait_process(ctx(), &preq("ct1", "")).await.unwrap();
    assert_eq!(exit.exit_status, 7);
    assert!(exit.exited_at_ns > 0);
    assert_eq!(out.join().unwrap(), "got:hello\n");
    c.remove_container(ctx(), &creq_id("ct1")).await.unwrap();

    // A long-running container, an exec with its own stdout stream, then
    // SIGKILL of the init process.
    let ct2 = creq("ct2", &agent, &["sleep", "1000"], pb::Stdio::default());
    let pid = c.create_container(ctx(), &ct2).await.unwrap().pid;
    c.start_container(ctx(), &creq_id("ct2")).await.unwrap();
    let pids = c.list_processes(ctx(), &creq_id("ct2")).await.unwrap().pids;
    assert!(pids.contains(&pid), "{pids:?} lacks {pid}");

    let exec_out = read_all(connect_stream(&agent, "ct2", "e1", StdioStream::Stdout));
    let process = json!({
        "terminal": false, "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "echo from-exec; exit 3"], "env": ["PATH=/bin"], "cwd": "/"
    });
    let exec = pb::ExecProcessRequest {
        container_id: "ct2".into(),
        exec_id: "e1".into(),
        process: serde_json::to_vec(&process).unwrap(),
        stdio: Some(pb::Stdio {
            stdout: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    assert!(c.exec_process(ctx(), &exec).await.unwrap().pid > 1);
    assert_eq!(
        c.wait_process(ctx(), &preq("ct2", "e1"))
            .await
            .unwrap()
            .exit_status,
        3
    );
    assert_eq!(exec_out.join().unwrap(), "from-exec\n");

    let kill = pb::SignalProcessRequest {
        container_id: "ct2".into(),
        signal: 9,
        ..Default::default()
    };
    c.signal_process(ctx(), &kill).await.unwrap();
    assert_eq!(
        c.wait_process(ctx(), &preq("ct2", ""))
            .await
            .unwrap()
            .exit_status,
        137
    );
    c.remove_container(ctx(), &creq_id("ct2")).await.unwrap();
    assert!(
        !agent.tmp.path().join("state/ct2").exists(),
        "container state left behind"
    );

    assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
}
