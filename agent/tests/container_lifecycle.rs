//! Container lifecycle through `ContainerManager` with youki's libcontainer:
//! exit codes, signals, stdio, exec, terminal, reaping, create/delete cycles,
//! and rejected specs. Needs root and /bin/busybox (static).

#[path = "container_common/mod.rs"]
mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::json;
use vmrt_agent::container::{Error, ProcessStdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_is_reported() {
    let fx = fixture();
    let (exit, out) = run(&fx, "exit3", &spec(&["sh", "-c", "echo hello; exit 3"])).await;
    assert_eq!(exit.status, 3);
    assert_eq!(out, "hello\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_gives_137_and_ends_all_processes() {
    let fx = fixture();
    let (w, h) = capture();
    // `echo` before the background `sleep`: two processes in the cgroup then
    // mean the line was written (the other order raced the SIGKILL below).
    let json = serde_json::to_vec(&spec(&["sh", "-c", "echo started; sleep 1000 & wait"])).unwrap();
    let stdio = ProcessStdio {
        stdout: Some(w),
        ..Default::default()
    };
    let pid = fx
        .mgr
        .create("kill9", &json, &fx.rootfs, stdio)
        .await
        .unwrap();
    fx.mgr.start("kill9").await.unwrap();
    // Wait until the background sleep runs: two processes in the cgroup.
    let mut pids = Vec::new();
    for _ in 0..200 {
        pids = fx.mgr.pids("kill9").await.unwrap();
        if pids.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pids.len(), 2, "expected sh and sleep, got {pids:?}");
    assert!(pids.contains(&pid));
    fx.mgr.signal("kill9", "", 9, false).await.unwrap();
    let exit = fx.mgr.wait("kill9", "").await.unwrap();
    assert_eq!(exit.status, 137);
    // The PID namespace ended the background sleep too; stdout EOF arrives.
    assert_eq!(output(h, Duration::from_secs(10)).await, "started\n");
    for _ in 0..100 {
        if fx.mgr.pids("kill9").await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fx.mgr.pids("kill9").await.unwrap().is_empty());
    // Signalling an exited process: NotFound.
    assert!(matches!(
        fx.mgr.signal("kill9", "", 15, false).await,
        Err(Error::NotFound(_))
    ));
    fx.mgr.delete("kill9").await.unwrap();
    assert_clean(&fx, "kill9", &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_143() {
    let fx = fixture();
    let (w, h) = capture();
    // A shell as PID 1 of its namespace ignores SIGTERM unless it traps it.
    let json = serde_json::to_vec(&spec(&[
        "sh",
        "-c",
        "trap 'exit 143' TERM; echo ready; while true; do sleep 0.05; done",
    ]))
    .unwrap();
    let stdio = ProcessStdio {
        stdout: Some(w),
        ..Default::default()
    };
    fx.mgr
        .create("term", &json, &fx.rootfs, stdio)
        .await
        .unwrap();
    fx.mgr.start("term").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fx.mgr.signal("term", "", 15, false).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("term", ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, 143);
    assert_eq!(output(h, Duration::from_secs(10)).await, "ready\n");
    fx.mgr.delete("term").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_ends_cat() {
    let fx = fixture();
    let (r, w) = nix::unistd::pipe().unwrap();
    let (ow, h) = capture();
    let json = serde_json::to_vec(&spec(&["cat"])).unwrap();
    let stdio = ProcessStdio {
        stdin: Some(r),
        stdout: Some(ow),
        ..Default::default()
    };
    fx.mgr
        .create("cat", &json, &fx.rootfs, stdio)
        .await
        .unwrap();
    fx.mgr.start("cat").await.unwrap();
    let mut wf = std::fs::File::from(w);
    wf.write_all(b"line one\nline two\n").unwrap();
    drop(wf); // EOF: only if the agent closed its copy of the read end
    let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("cat", ""))
        .await
        .expect("cat did not see EOF")
        .unwrap();
    assert_eq!(exit.status, 0);
    assert_eq!(
        output(h, Duration::from_secs(10)).await,
        "line one\nline two\n"
    );
    fx.mgr.delete("cat").await.unwrap();
    assert_clean(&fx, "cat", &[]);
}

/// Many execs in a row all start. Each exec's libcontainer helper gets a
/// SIGCHLD when its intermediate process exits; the agent's inherited SIGCHLD
/// handler once wrote its wake-up byte into libcontainer's channel socket
/// there, failing about half the execs with ECONNRESET "waiting for init
/// ready". 20 in a row make a regression near certain to show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_execs_all_start() {
    let fx = fixture();
    let json = serde_json::to_vec(&spec(&["sleep", "1000"])).unwrap();
    fx.mgr
        .create("execs", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("execs").await.unwrap();
    let p = serde_json::to_vec(
        &json!({"args": ["sh", "-c", "exit 4"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}),
    )
    .unwrap();
    for i in 0..20 {
        let id = format!("x{i}");
        fx.mgr
            .exec("execs", &id, &p, ProcessStdio::default())
            .await
            .unwrap_or_else(|e| panic!("exec {i}: {e}"));
        let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("execs", &id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.status, 4, "exec {i}");
    }
    fx.mgr.delete("execs").await.unwrap();
    assert_clean(&fx, "execs", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_into_running_container() {
    let fx = fixture();
    let json =
        serde_json::to_vec(&spec(&["sh", "-c", "echo marker > /tmp/m; sleep 1000"])).unwrap();
    let init = fx
        .mgr
        .create("execct", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    // exec before start: the container is not running.
    let p = serde_json::to_vec(
        &json!({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}),
    )
    .unwrap();
    assert!(matches!(
        fx.mgr
            .exec("execct", "early", &p, ProcessStdio::default())
            .await,
        Err(Error::FailedPrecondition(_))
    ));
    fx.mgr.start("execct").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The exec shares the container's mount, PID and UTS namespaces.
    let (w, h) = capture();
    let process = json!({
        "args": ["sh", "-c", "cat /tmp/m; hostname; echo pid1=$(cat /proc/1/cmdline | tr '\\0' ' '); exit 7"],
        "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    let p = serde_json::to_vec(&process).unwrap();
    let epid = fx
        .mgr
        .exec(
            "execct",
            "e1",
            &p,
            ProcessStdio {
                stdout: Some(w),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_ne!(epid, init);
    let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("execct", "e1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, 7);
    let out = output(h, Duration::from_secs(10)).await;
    // ash execs its last command: PID 1 of the container is now `sleep`.
    assert_eq!(out, "marker\nvmrt-test\npid1=sleep 1000\n");
    // Duplicate exec id, unknown exec id, bad process JSON.
    assert!(matches!(
        fx.mgr
            .exec("execct", "e1", &p, ProcessStdio::default())
            .await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        fx.mgr.wait("execct", "nope").await,
        Err(Error::NotFound(_))
    ));
    match fx
        .mgr
        .exec(
            "execct",
            "e2",
            br#"{"args": [], "cwd": "/"}"#,
            ProcessStdio::default(),
        )
        .await
    {
        Err(Error::InvalidSpec { field, .. }) => assert_eq!(field, "process.args"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    // The init keeps running; a second wait on the exec returns the same exit.
    assert_eq!(fx.mgr.wait("execct", "e1").await.unwrap(), exit);
    fx.mgr.signal("execct", "", 9, false).await.unwrap();
    assert_eq!(fx.mgr.wait("execct", "").await.unwrap().status, 137);
    fx.mgr.delete("execct").await.unwrap();
    assert_clean(&fx, "execct", &[init, epid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_before_wait_is_remembered_and_reaped() {
    let fx = fixture();
    let json = serde_json::to_vec(&spec(&["sh", "-c", "exit 42"])).unwrap();
    let pid = fx
        .mgr
        .create("early", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("early").await.unwrap();
    // Let it exit and be reaped long before anybody waits.
    let zombie = format!("/proc/{pid}");
    for _ in 0..200 {
        if !std::path::Path::new(&zombie).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !std::path::Path::new(&zombie).exists(),
        "exited init {pid} was not reaped"
    );
    let exit = fx.mgr.wait("early", "").await.unwrap();
    assert_eq!(exit.status, 42);
    assert!(exit.exited_at <= std::time::SystemTime::now());
    fx.mgr.delete("early").await.unwrap();
    assert_clean(&fx, "early", &[pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_errors() {
    let fx = fixture();
    assert!(matches!(
        fx.mgr.start("ghost").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fx.mgr.delete("ghost").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fx.mgr.wait("ghost", "").await,
        Err(Error::NotFound(_))
    ));
    let json = serde_json::to_vec(&spec(&["sleep", "1000"])).unwrap();
    let pid = fx
        .mgr
        .create("dup", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    assert!(matches!(
        fx.mgr
            .create("dup", &json, &fx.rootfs, ProcessStdio::default())
            .await,
        Err(Error::AlreadyExists(_))
    ));
    fx.mgr.start("dup").await.unwrap();
    assert!(matches!(
        fx.mgr.start("dup").await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        fx.mgr.signal("dup", "", 12345, false).await,
        Err(Error::InvalidSpec { .. })
    ));
    // Delete of a running container kills it.
    fx.mgr.delete("dup").await.unwrap();
    assert_clean(&fx, "dup", &[pid]);
    // Delete of a created, never started container.
    let pid = fx
        .mgr
        .create("created", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.delete("created").await.unwrap();
    assert_clean(&fx, "created", &[pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_resize_seen_by_stty() {
    let fx = fixture();
    let (r, w) = nix::unistd::pipe().unwrap();
    let (ow, h) = capture();
    // Reads one line (after the resize), then prints the terminal size.
    let json = serde_json::to_vec(&spec(&[
        "sh",
        "-c",
        "read x; stty size; [ -t 0 ] && echo tty",
    ]))
    .unwrap();
    let stdio = ProcessStdio {
        stdin: Some(r),
        stdout: Some(ow),
        stderr: None,
        terminal: true,
    };
    fx.mgr
        .create("tty", &json, &fx.rootfs, stdio)
        .await
        .unwrap();
    fx.mgr.start("tty").await.unwrap();
    fx.mgr.resize_tty("tty", "", 33, 101).await.unwrap();
    let mut wf = std::fs::File::from(w);
    wf.write_all(b"go\n").unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("tty", ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, 0);
    let out = output(h, Duration::from_secs(10)).await;
    // The terminal echoes input and uses CRLF.
    assert!(out.contains("33 101\r\n"), "output: {out:?}");
    assert!(out.contains("tty\r\n"), "output: {out:?}");
    fx.mgr.delete("tty").await.unwrap();
    assert_clean(&fx, "tty", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_exec_and_close_stdin() {
    let fx = fixture();
    let json = serde_json::to_vec(&spec(&["sleep", "1000"])).unwrap();
    fx.mgr
        .create("ttyexec", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("ttyexec").await.unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let (ow, h) = capture();
    let p = serde_json::to_vec(
        &json!({"args": ["cat"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}),
    )
    .unwrap();
    let stdio = ProcessStdio {
        stdin: Some(r),
        stdout: Some(ow),
        stderr: None,
        terminal: true,
    };
    fx.mgr.exec("ttyexec", "cat", &p, stdio).await.unwrap();
    let mut wf = std::fs::File::from(w);
    wf.write_all(b"abc\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // cat on a terminal only ends on VEOF: close_stdin sends it.
    fx.mgr.close_stdin("ttyexec", "cat").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), fx.mgr.wait("ttyexec", "cat"))
        .await
        .expect("cat on a tty did not end after close_stdin")
        .unwrap();
    assert_eq!(exit.status, 0);
    let out = output(h, Duration::from_secs(10)).await;
    assert_eq!(
        out.matches("abc\r\n").count(),
        2,
        "echo + cat output expected: {out:?}"
    );
    drop(wf);
    fx.mgr.delete("ttyexec").await.unwrap();
    assert_clean(&fx, "ttyexec", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_delete_cycles_leave_nothing() {
    let fx = fixture_exclusive();
    // 100 (about 1 s here); VMRT_CT_CYCLES sets another count.
    let n: usize = std::env::var("VMRT_CT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let json = serde_json::to_vec(&spec(&["sh", "-c", "echo hi; sleep 1000"])).unwrap();
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut pids = Vec::new();
    for i in 0..n {
        let id = format!("cycle{i}");
        let (w, h) = capture();
        let pid = fx
            .mgr
            .create(
                &id,
                &json,
                &fx.rootfs,
                ProcessStdio {
                    stdout: Some(w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        if i % 2 == 0 {
            fx.mgr.start(&id).await.unwrap();
        }
        pids.push(pid);
        fx.mgr.delete(&id).await.unwrap();
        let out = output(h, Duration::from_secs(10)).await;
        assert!(out.is_empty() || out == "hi\n", "{out:?}");
        assert_clean(&fx, &id, &[pid]);
    }
    assert_state_empty(&fx);
    // No fd leak in the agent (small slack for runtime threads).
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        fds_after <= fds_before + 4,
        "fds {fds_before} -> {fds_after}"
    );
    println!("{n} create/delete cycles clean");
}

async fn expect_invalid(
    fx: &Fixture,
    id: &str,
    json: &[u8],
    rootfs: &std::path::Path,
    want_field: &str,
    want_reason: &str,
) {
    match fx
        .mgr
        .create(id, json, rootfs, ProcessStdio::default())
        .await
    {
        Err(Error::InvalidSpec { field, reason }) => {
            assert_eq!(field, want_field, "reason: {reason}");
            assert!(
                reason.contains(want_reason),
                "reason {reason:?} lacks {want_reason:?}"
            );
            let msg = Error::InvalidSpec { field, reason }.to_string();
            assert!(msg.contains(want_field), "{msg}");
        }
        other => panic!("{id}: expected InvalidSpec({want_field}), got {other:?}"),
    }
    assert_clean(fx, id, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_cleanly() {
    let fx = fixture();
    let good = spec(&["true"]);
    expect_invalid(
        &fx,
        "nofs",
        &serde_json::to_vec(&good).unwrap(),
        &fx.tmp.path().join("missing"),
        "rootfs",
        "No such file",
    )
    .await;
    expect_invalid(
        &fx,
        "json",
        b"{\"ociVersion\": \"1.1.0\", \"process\": ",
        &fx.rootfs,
        "config.json",
        "malformed JSON",
    )
    .await;
    let mut s = good.clone();
    s["linux"]["namespaces"][2]["type"] = json!("bogus");
    expect_invalid(
        &fx,
        "ns",
        &serde_json::to_vec(&s).unwrap(),
        &fx.rootfs,
        "linux.namespaces[2].type",
        "unknown namespace type \"bogus\"",
    )
    .await;
    let mut s = good.clone();
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "no_such_syscall"], "action": "SCMP_ACT_ERRNO"}]});
    expect_invalid(
        &fx,
        "sc",
        &serde_json::to_vec(&s).unwrap(),
        &fx.rootfs,
        "linux.seccomp.syscalls[0].names[1]",
        "no_such_syscall",
    )
    .await;
    let mut s = good.clone();
    s["process"]["args"] = json!([]);
    expect_invalid(
        &fx,
        "args",
        &serde_json::to_vec(&s).unwrap(),
        &fx.rootfs,
        "process.args",
        "non-empty",
    )
    .await;
    let mut s = good.clone();
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]);
    expect_invalid(
        &fx,
        "rl",
        &serde_json::to_vec(&s).unwrap(),
        &fx.rootfs,
        "process",
        "RLIMIT_BOGUS",
    )
    .await;
    expect_invalid(
        &fx,
        "bad/id",
        &serde_json::to_vec(&good).unwrap(),
        &fx.rootfs,
        "container_id",
        "invalid character",
    )
    .await;
    // A spec that passes validation but fails inside libcontainer (a mount
    // of an unknown file system type) is undone completely too.
    let mut s = good.clone();
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/x", "type": "nosuchfs", "source": "none"}));
    let r = fx
        .mgr
        .create(
            "mountfail",
            &serde_json::to_vec(&s).unwrap(),
            &fx.rootfs,
            ProcessStdio::default(),
        )
        .await;
    assert!(r.is_err(), "{r:?}");
    println!("libcontainer failure reported as: {}", r.unwrap_err());
    assert_clean(&fx, "mountfail", &[]);
    assert_state_empty(&fx);
}
