//! cgroup v2 resource control of containers: pids.max, memory.max with OOM
//! kill and OOM event, update of linux.resources, statistics. Tests needing
//! the cpu/memory/pids controllers print SKIP on hosts where they are bound to
//! cgroup v1 and run in the runner VM:
//! `tests/runner-vm/run cargo test --release -p vmrt-agent --test container_cgroups`.

#[path = "container_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vmrt_agent::container::ProcessStdio;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_usage_in_stats() {
    let fx = fixture();
    let json = serde_json::to_vec(&spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000",
    ]))
    .unwrap();
    fx.mgr
        .create("cpustat", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("cpustat").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let st = fx.mgr.stats("cpustat").await.unwrap();
    assert!(st.cpu_usage_usec > 0, "{st:?}");
    assert!(st.cpu_usage_usec >= st.cpu_user_usec, "{st:?}");
    fx.mgr.delete("cpustat").await.unwrap();
    assert!(fx.mgr.stats("cpustat").await.is_err());
    assert_clean(&fx, "cpustat", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_stops_sixth_process() {
    if skip_without(&["pids"], "pids_limit_stops_sixth_process") {
        return;
    }
    let fx = fixture();
    // sh + 4 sleeps = 5 processes; the 5th `sleep &` (6th process) cannot
    // fork, which is fatal to a non-interactive ash.
    let mut s = spec(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do sleep 1000 & echo forked $i; done; echo unreachable",
    ]);
    s["linux"]["resources"] = json!({"pids": {"limit": 5}});
    let (w, h) = capture();
    let w2 = w.try_clone().unwrap();
    let json = serde_json::to_vec(&s).unwrap();
    fx.mgr
        .create(
            "pids",
            &json,
            &fx.rootfs,
            ProcessStdio {
                stdout: Some(w),
                stderr: Some(w2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    fx.mgr.start("pids").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), fx.mgr.wait("pids", ""))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(exit.status, 0);
    let st = fx.mgr.stats("pids").await.unwrap();
    assert_eq!(st.pids_limit, 5);
    let events = std::fs::read_to_string("/sys/fs/cgroup/vmrt/pids/pids.events").unwrap();
    assert!(
        events.contains("max ") && !events.contains("max 0"),
        "pids.events: {events}"
    );
    fx.mgr.delete("pids").await.unwrap();
    let out = output(h, Duration::from_secs(10)).await;
    assert!(
        out.contains("forked 4\n") && !out.contains("forked 5") && !out.contains("unreachable"),
        "{out}"
    );
    assert!(
        out.contains("can't fork") || out.contains("Resource temporarily unavailable"),
        "{out}"
    );
    assert_clean(&fx, "pids", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kill_raises_event() {
    if skip_without(&["memory"], "memory_limit_oom_kill_raises_event") {
        return;
    }
    let fx = fixture();
    let mut s = spec(&["tail", "/dev/zero"]); // tail buffers an endless line
    s["linux"]["resources"] = json!({"memory": {"limit": 16777216, "swap": 16777216}});
    let json = serde_json::to_vec(&s).unwrap();
    let mut events = fx.mgr.oom_events();
    fx.mgr
        .create("oom", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("oom").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), fx.mgr.wait("oom", ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, 137, "OOM kill is SIGKILL");
    // Already sent when wait returns: a delete right after the exit
    // (`ctr run --rm`) cannot lose it.
    let id = events.try_recv().expect("OOM event sent before wait returned");
    assert_eq!(id, "oom");
    assert!(events.try_recv().is_err(), "one OOM kill, one event");
    let st = fx.mgr.stats("oom").await.unwrap();
    assert_eq!(st.memory_limit, 16777216);
    assert!(
        st.memory_oom_kill >= 1 && st.memory_oom_events >= 1,
        "{st:?}"
    );
    fx.mgr.delete("oom").await.unwrap();
    assert_clean(&fx, "oom", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_resources() {
    if skip_without(&["memory", "pids", "cpu"], "update_resources") {
        return;
    }
    let fx = fixture();
    let json = serde_json::to_vec(&spec(&["sleep", "1000"])).unwrap();
    fx.mgr
        .create("upd", &json, &fx.rootfs, ProcessStdio::default())
        .await
        .unwrap();
    fx.mgr.start("upd").await.unwrap();
    let before = fx.mgr.stats("upd").await.unwrap();
    assert_eq!(before.memory_limit, u64::MAX);
    let res = json!({"memory": {"limit": 33554432}, "pids": {"limit": 10}, "cpu": {"quota": 50000, "period": 100000}});
    fx.mgr
        .update("upd", &serde_json::to_vec(&res).unwrap())
        .await
        .unwrap();
    let st = fx.mgr.stats("upd").await.unwrap();
    assert_eq!(st.memory_limit, 33554432);
    assert_eq!(st.pids_limit, 10);
    assert!(st.memory_usage > 0 && st.pids_current == 1, "{st:?}");
    let cpu_max = std::fs::read_to_string("/sys/fs/cgroup/vmrt/upd/cpu.max").unwrap();
    assert_eq!(cpu_max.trim(), "50000 100000");
    match fx
        .mgr
        .update("upd", b"{\"memory\": {\"limit\": \"lots\"}}")
        .await
    {
        Err(vmrt_agent::container::Error::InvalidSpec { field, .. }) => {
            assert_eq!(field, "resources")
        }
        other => panic!("{other:?}"),
    }
    fx.mgr.delete("upd").await.unwrap();
    assert_clean(&fx, "upd", &[]);
}
