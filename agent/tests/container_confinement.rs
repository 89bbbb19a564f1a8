//! Confinement passed through to libcontainer, each observed from inside the
//! container: hostname, user, capabilities, rlimits, readonly and masked
//! paths, seccomp, env/cwd, oomScoreAdj, sysctl, devices, joining a namespace
//! by path, no-PID-namespace cleanup, and the cgroup v2 freezer.

#[path = "container_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vmrt_agent::container::ProcessStdio;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_env_cwd() {
    let fx = fixture();
    let mut s = spec(&["sh", "-c", "hostname; echo $FOO; pwd"]);
    s["hostname"] = json!("box-one");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/data");
    let (exit, out) = run(&fx, "host", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(out, "box-one\nbar baz\n/data\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_additional_gids() {
    let fx = fixture();
    let mut s = spec(&["id"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000, 3000]});
    let (exit, out) = run(&fx, "user", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert!(out.starts_with("uid=1000 gid=1000 groups="), "{out}");
    let groups = out.trim().split("groups=").nth(1).unwrap().to_string();
    assert!(groups.contains("2000") && groups.contains("3000"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_capability_is_enforced() {
    let fx = fixture();
    // Control: with CAP_CHOWN the chown works.
    let (exit, out) = run(&fx, "capok", &spec(&["chown", "1234", "/data/file"])).await;
    assert_eq!(exit.status, 0, "{out}");
    let mut s = spec(&["sh", "-c", "chown 4321 /data/file || echo refused"]);
    let caps: Vec<_> = default_caps()
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| *c != "CAP_CHOWN")
        .cloned()
        .collect();
    s["process"]["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    let (exit, out) = run(&fx, "capdrop", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert!(
        out.contains("Operation not permitted") && out.contains("refused"),
        "{out}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(fx.rootfs.join("data/file"))
            .unwrap()
            .uid(),
        1234
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rlimit_nofile_applied() {
    let fx = fixture();
    let mut s = spec(&["sh", "-c", "ulimit -n; ulimit -Hn"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]);
    let (exit, out) = run(&fx, "rlimit", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(out, "123\n456\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_and_masked_paths() {
    let fx = fixture();
    std::fs::create_dir_all(fx.rootfs.join("secret")).unwrap();
    std::fs::write(fx.rootfs.join("secret/key"), "s3cr3t\n").unwrap();
    std::fs::write(fx.rootfs.join("masked"), "hidden\n").unwrap();
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /data/new; echo rc=$?; echo [$(cat /masked)]; ls /secret | wc -l",
    ]);
    s["linux"]["readonlyPaths"] = json!(["/data"]);
    s["linux"]["maskedPaths"] = json!(["/masked", "/secret"]);
    let (exit, out) = run(&fx, "paths", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("rc=1\n[]\n0\n"), "{out}");
    assert!(!fx.rootfs.join("data/new").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_errno_and_errno_ret() {
    let fx = fixture();
    let mut s = spec(&[
        "sh",
        "-c",
        "mkdir /tmp/d; echo mk=$?; ln -s a /tmp/l; echo ln=$?; echo alive",
    ]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["symlink", "symlinkat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 28}
        ]
    });
    let fx_ln = fx.rootfs.join("bin/ln");
    std::os::unix::fs::symlink("busybox", fx_ln).unwrap();
    let (exit, out) = run(&fx, "seccomp", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert!(
        out.contains("Operation not permitted"),
        "EPERM expected: {out}"
    );
    assert!(
        out.contains("No space left on device"),
        "errnoRet 28 (ENOSPC) expected: {out}"
    );
    assert!(
        out.contains("mk=1\n") && out.contains("ln=1\n") && out.ends_with("alive\n"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_score_adj_and_sysctl() {
    let fx = fixture();
    let before = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /proc/self/oom_score_adj /proc/sys/net/ipv4/ip_forward",
    ]);
    s["process"]["oomScoreAdj"] = json!(500);
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    let (exit, out) = run(&fx, "oomadj", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(out, "500\n1\n");
    // The agent's own score is restored after libcontainer set it.
    assert_eq!(
        std::fs::read_to_string("/proc/self/oom_score_adj").unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_created() {
    let fx = fixture();
    let mut s = spec(&[
        "sh",
        "-c",
        "echo x > /dev/mynull && echo wrote; stat -c '%t:%T %a' /dev/mynull",
    ]);
    s["linux"]["devices"] = json!([{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}]);
    let (exit, out) = run(&fx, "devices", &s).await;
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(out, "wrote\n1:3 666\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_namespace_by_path() {
    let fx = fixture();
    let mut a = spec(&["sleep", "1000"]);
    a["hostname"] = json!("shared-uts");
    let a_json = serde_json::to_vec(&a).unwrap();
    let a_pid = fx
        .mgr
        .create("nsa", &a_json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("nsa").await.unwrap();
    let mut b = spec(&["hostname"]);
    b.as_object_mut().unwrap().remove("hostname");
    b["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "mount"},
        {"type": "uts", "path": format!("/proc/{a_pid}/ns/uts")},
        {"type": "network", "path": format!("/proc/{a_pid}/ns/net")}
    ]);
    let (exit, out) = run(&fx, "nsb", &b).await;
    assert_eq!(exit.status, 0, "{out}");
    assert_eq!(out, "shared-uts\n");
    fx.mgr.delete("nsa").await.unwrap();
    assert_clean(&fx, "nsa", &[a_pid]);
    assert_state_empty(&fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pid_namespace_init_exit_kills_the_rest() {
    let fx = fixture();
    let mut s = spec(&["sh", "-c", "sleep 1000 & sleep 1000 & wait"]);
    s["linux"]["namespaces"] = json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    let json = serde_json::to_vec(&s).unwrap();
    let pid = fx
        .mgr
        .create("nopidns", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("nopidns").await.unwrap();
    let mut pids = Vec::new();
    for _ in 0..200 {
        pids = fx.mgr.pids("nopidns").await.unwrap();
        if pids.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pids.len(), 3, "sh + 2 sleeps expected: {pids:?}");
    fx.mgr.signal("nopidns", "", 9, false).await.unwrap();
    assert_eq!(fx.mgr.wait("nopidns", "").await.unwrap().status, 137);
    let mut left = pids.clone();
    for _ in 0..200 {
        left = fx.mgr.pids("nopidns").await.unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.is_empty(), "processes survived the init: {left:?}");
    fx.mgr.delete("nopidns").await.unwrap();
    assert_clean(&fx, "nopidns", &[pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume() {
    let fx = fixture();
    let (w, h) = capture();
    let json = serde_json::to_vec(&spec(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.02; done",
    ]))
    .unwrap();
    let pid = fx
        .mgr
        .create(
            "pause",
            &json,
            &fx.rootfs,
            ProcessStdio {
                stdout: Some(w),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    fx.mgr.start("pause").await.unwrap();
    let counter = format!("/proc/{pid}/root/tmp/c");
    tokio::time::sleep(Duration::from_millis(300)).await;
    fx.mgr.pause("pause").await.unwrap();
    let freeze = std::fs::read_to_string("/sys/fs/cgroup/vmrt/pause/cgroup.freeze").unwrap();
    assert_eq!(freeze.trim(), "1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = std::fs::read_to_string(&counter).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(a, b, "counter moved while paused");
    // Pausing twice is a state error.
    assert!(fx.mgr.pause("pause").await.is_err());
    fx.mgr.resume("pause").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = std::fs::read_to_string(&counter).unwrap();
    assert_ne!(b, c, "counter did not move after resume");
    // A paused container can still be killed and deleted.
    fx.mgr.pause("pause").await.unwrap();
    fx.mgr.delete("pause").await.unwrap();
    assert_eq!(output(h, Duration::from_secs(10)).await, "");
    assert_clean(&fx, "pause", &[pid]);
}
