//! The `vmrt-agent` binary run as a normal process (not PID 1) on Unix
//! sockets, driven through the generated async ttrpc client: Version,
//! Health, load (1000 sequential requests on one connection, 50 concurrent
//! connections), error codes, the stdio stream listener, Shutdown, and the
//! `Restored` gating of an agent started as a VM template (`--cmdline
//! vmrt.template`, which replaces /proc/cmdline; not PID 1, so it asks for
//! no snapshot and leaves the guest's clock, entropy and mounts alone).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ttrpc::asynchronous::Client;
use ttrpc::Code;
use vmrt_protocol::agent::{self as pb, Empty};
use vmrt_protocol::agent_ttrpc::AgentClient;
use vmrt_protocol::{StdioStream, StreamHeader, API_VERSION};

/// A running agent; killed (by its pid) if still running when dropped.
struct Agent {
    child: Child,
    _tmp: tempfile::TempDir,
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

fn start_agent(extra: &[&str]) -> Agent {
    start_agent_with_cmdline("vmrt.log=debug", extra)
}

/// An agent whose kernel command line settings are `cmdline`.
fn start_agent_with_cmdline(cmdline: &str, extra: &[&str]) -> Agent {
    let tmp = tempfile::Builder::new()
        .prefix("vmrt-agent-test")
        .tempdir()
        .unwrap();
    let api = tmp.path().join("api.sock");
    let io = tmp.path().join("io.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vmrt-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", api.display()))
        .arg("--io-listen")
        .arg(format!("unix://{}", io.display()))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--cmdline")
        .arg(cmdline)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmrt-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(api.exists() && io.exists()) {
        assert!(Instant::now() < deadline, "agent sockets did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    Agent {
        child,
        _tmp: tmp,
        api,
        io,
    }
}

async fn client(path: &Path) -> AgentClient {
    let c = Client::connect(&format!("unix://{}", path.display()))
        .await
        .expect("connect to agent API");
    AgentClient::new(c)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(10))
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> Code {
    status_of(r).0
}

/// The code and message of a failed call.
fn status_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

/// A `Restored` request with `entropy_len` bytes and the host's clock.
fn restored_req(entropy_len: usize) -> pb::RestoredRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    pb::RestoredRequest {
        realtime_ns: now.as_nanos() as i64,
        entropy: (0..entropy_len).map(|i| (i * 37) as u8).collect(),
        ..Default::default()
    }
}

const TEMPLATE_CMDLINE: &str = "vmrt.log=debug vmrt.template";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_health() {
    let agent = start_agent(&[]);
    let c = client(&agent.api).await;
    let v = c.version(ctx(), &Empty::new()).await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, API_VERSION);
    let release = nix::sys::utsname::uname().unwrap();
    assert_eq!(v.kernel_release, release.release().to_str().unwrap());
    // The agent measures itself: it has resident memory, and it started before it
    // listened (on this host's uptime clock).
    assert!(v.agent_rss_kib > 0, "agent_rss_kib = 0");
    assert!(v.started_at_us > 0 && v.start_to_ready_us > 0, "{v:?}");
    let h = c.health(ctx(), &Empty::new()).await.unwrap();
    assert!(h.serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sequential_requests_on_one_connection() {
    let agent = start_agent(&["--log", "warn"]);
    let c = client(&agent.api).await;
    let mut ok = 0;
    for i in 0..1000 {
        if i % 2 == 0 {
            assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
        } else {
            let v = c.version(ctx(), &Empty::new()).await.unwrap();
            assert_eq!(v.api_version, API_VERSION);
        }
        ok += 1;
    }
    assert_eq!(ok, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections() {
    let agent = start_agent(&["--log", "warn"]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let api = agent.api.clone();
        tasks.push(tokio::spawn(async move {
            let c = client(&api).await;
            let mut ok = 0u32;
            for _ in 0..20 {
                let v = c.version(ctx(), &Empty::new()).await.unwrap();
                assert_eq!(v.api_version, API_VERSION);
                assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
                ok += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 50 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_reach_the_client() {
    let agent = start_agent(&["--stream-timeout-ms", "300"]);
    let c = client(&agent.api).await;
    let req = |id: &str| pb::ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.start_container(ctx(), &req("nosuch")).await),
        Code::NOT_FOUND
    );
    assert_eq!(
        code_of(c.remove_container(ctx(), &req("nosuch")).await),
        Code::NOT_FOUND
    );
    assert_eq!(
        code_of(c.start_container(ctx(), &req("a/b")).await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code_of(c.start_container(ctx(), &req("")).await),
        Code::INVALID_ARGUMENT
    );
    let sig = pb::SignalProcessRequest {
        container_id: "c".into(),
        signal: 0,
        ..Default::default()
    };
    assert_eq!(
        code_of(c.signal_process(ctx(), &sig).await),
        Code::INVALID_ARGUMENT
    );
    let exec = pb::ExecProcessRequest {
        container_id: "c".into(),
        exec_id: "".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.exec_process(ctx(), &exec).await),
        Code::INVALID_ARGUMENT
    );
    let resize = pb::ResizeTtyRequest {
        container_id: "c".into(),
        rows: 70000,
        cols: 80,
        ..Default::default()
    };
    assert_eq!(
        code_of(c.resize_tty(ctx(), &resize).await),
        Code::INVALID_ARGUMENT
    );

    // A requested stdio stream that never connects: DEADLINE_EXCEEDED after
    // the stream timeout, not a hang.
    let create = pb::CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: b"{}".to_vec(),
        rootfs: "/nonexistent".into(),
        stdio: Some(pb::Stdio {
            stdout: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let t = Instant::now();
    assert_eq!(
        code_of(c.create_container(ctx(), &create).await),
        Code::DEADLINE_EXCEEDED
    );
    assert!(t.elapsed() >= Duration::from_millis(300));

    // The agent still serves after all of that.
    assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
}

/// Reads until EOF or `timeout`; returns whether EOF was seen.
fn sees_eof(s: &mut UnixStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_streams_are_validated_and_handed_to_create() {
    use std::io::Write;
    let agent = start_agent(&["--stream-timeout-ms", "5000"]);

    // Garbage first lines are rejected by closing the connection.
    for junk in [
        &b"hello world\n"[..],
        b"c1 - stdio\n",
        &[b'A'; 400][..],
        b"c1 x/y stdin\n",
    ] {
        let mut s = UnixStream::connect(&agent.io).unwrap();
        s.write_all(junk).unwrap();
        assert!(
            sees_eof(&mut s, Duration::from_secs(5)),
            "{junk:?} not rejected"
        );
    }

    // A valid stdout stream is taken by CreateContainer; the create then
    // fails on the bad spec and the stream is closed (peer sees EOF).
    let mut out = UnixStream::connect(&agent.io).unwrap();
    let header = StreamHeader::new("c2", "", StdioStream::Stdout)
        .encode()
        .unwrap();
    out.write_all(header.as_bytes()).unwrap();
    // Still open while nobody has taken it.
    assert!(!sees_eof(&mut out, Duration::from_millis(300)));

    let c = client(&agent.api).await;
    let create = pb::CreateContainerRequest {
        container_id: "c2".into(),
        oci_spec: b"this is not json".to_vec(),
        rootfs: "/nonexistent".into(),
        stdio: Some(pb::Stdio {
            stdout: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let t = Instant::now();
    assert_eq!(
        code_of(c.create_container(ctx(), &create).await),
        Code::INVALID_ARGUMENT
    );
    // It did not wait for the stream timeout: the stream was there.
    assert!(t.elapsed() < Duration::from_secs(4));
    assert!(sees_eof(&mut out, Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_makes_the_host_agent_exit_zero() {
    let mut agent = start_agent(&[]);
    let c = client(&agent.api).await;
    c.shutdown(ctx(), &Empty::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        !agent.api.exists() && !agent.io.exists(),
        "sockets left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booted_agent_refuses_restored() {
    let agent = start_agent(&[]);
    let c = client(&agent.api).await;
    let (code, msg) = status_of(c.restored(ctx(), &restored_req(32)).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("not started as a VM template"), "{msg}");
    // Also with arguments that are wrong: the state is what is wrong first.
    assert_eq!(
        code_of(c.restored(ctx(), &restored_req(0)).await),
        Code::FAILED_PRECONDITION
    );
    // An explicit vmrt.template=0 is a booted agent too.
    drop(agent);
    let agent = start_agent_with_cmdline("vmrt.template=0", &[]);
    let c = client(&agent.api).await;
    assert_eq!(
        code_of(c.restored(ctx(), &restored_req(32)).await),
        Code::FAILED_PRECONDITION
    );
    // And it is not gated: a container call gets its ordinary answer.
    let req = pb::ContainerRequest {
        container_id: "nosuch".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.start_container(ctx(), &req).await),
        Code::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_agent_serves_containers_only_after_one_restored() {
    let mut agent = start_agent_with_cmdline(TEMPLATE_CMDLINE, &["--stream-timeout-ms", "300"]);
    let c = client(&agent.api).await;
    // Health and Version work while it waits.
    assert!(c.health(ctx(), &Empty::new()).await.unwrap().serving);
    assert_eq!(
        c.version(ctx(), &Empty::new()).await.unwrap().api_version,
        API_VERSION
    );

    // Every container and process call is refused, before its own checks
    // (the create would otherwise wait for its stdout stream and time out).
    let create = pb::CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: b"{}".to_vec(),
        rootfs: "/nonexistent".into(),
        stdio: Some(pb::Stdio {
            stdout: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let (code, msg) = status_of(c.create_container(ctx(), &create).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("waiting for Restored"), "{msg}");
    let req = pb::ContainerRequest {
        container_id: "nosuch".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.start_container(ctx(), &req).await),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(c.remove_container(ctx(), &req).await),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(c.stats_container(ctx(), &req).await),
        Code::FAILED_PRECONDITION
    );
    let exec = pb::ExecProcessRequest {
        container_id: "nosuch".into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.exec_process(ctx(), &exec).await),
        Code::FAILED_PRECONDITION
    );
    let proc_req = pb::ProcessRequest {
        container_id: "nosuch".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.wait_process(ctx(), &proc_req).await),
        Code::FAILED_PRECONDITION
    );
    let sig = pb::SignalProcessRequest {
        container_id: "nosuch".into(),
        signal: 9,
        ..Default::default()
    };
    assert_eq!(
        code_of(c.signal_process(ctx(), &sig).await),
        Code::FAILED_PRECONDITION
    );

    // Bad arguments: INVALID_ARGUMENT, and nothing changed.
    for bad in [restored_req(0), restored_req(15), restored_req(513)] {
        let (code, msg) = status_of(c.restored(ctx(), &bad).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("16..=512"), "{msg}");
    }
    let mut before_epoch = restored_req(16);
    before_epoch.realtime_ns = -1;
    assert_eq!(
        code_of(c.restored(ctx(), &before_epoch).await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code_of(c.start_container(ctx(), &req).await),
        Code::FAILED_PRECONDITION
    );

    // Accepted once, with the fewest entropy bytes allowed ...
    c.restored(ctx(), &restored_req(16)).await.unwrap();
    // ... after which container calls get their ordinary answers ...
    assert_eq!(
        code_of(c.start_container(ctx(), &req).await),
        Code::NOT_FOUND
    );
    let t = Instant::now();
    assert_eq!(
        code_of(c.create_container(ctx(), &create).await),
        Code::DEADLINE_EXCEEDED
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    // ... and a second Restored is refused.
    let (code, msg) = status_of(c.restored(ctx(), &restored_req(512)).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("already"), "{msg}");

    // Shutdown still ends it.
    c.shutdown(ctx(), &Empty::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_restored_calls_succeed_once() {
    let agent = start_agent_with_cmdline(TEMPLATE_CMDLINE, &[]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let api = agent.api.clone();
        tasks.push(tokio::spawn(async move {
            let c = client(&api).await;
            c.restored(ctx(), &restored_req(64)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            r => assert_eq!(code_of(r), Code::FAILED_PRECONDITION),
        }
    }
    assert_eq!(ok, 1);
}
