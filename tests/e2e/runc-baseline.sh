#!/usr/bin/env bash
# Baseline: the private containerd harness + the test images + the stock runc
# runtime (io.containerd.runc.v2). Proves the harness, the images and the host
# (or runner VM) before vmrt is involved.
#
# Usage: tests/e2e/runc-baseline.sh     (root; prints timings as "time:" lines,
# closes with "runc-baseline: N passed, M failed")
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/lib/containerd.sh
. "$repo/tests/lib/containerd.sh"

passed=0
failed=0
run_timeout=$((CTRD_OP_TIMEOUT * 4))
ok() { passed=$((passed + 1)); echo "ok   - $*"; }
nok() { failed=$((failed + 1)); echo "FAIL - $*"; }
finish() {
  echo "runc-baseline: $passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
  exit $?
}

if [ "$(id -u)" -ne 0 ]; then echo "runc-baseline: must run as root" >&2; nok "running as root"; finish; fi

busybox_img="$repo/build/busybox-test.oci.tar"
pause_img="$repo/build/pause-test.oci.tar"
if [ ! -f "$busybox_img" ] || [ ! -f "$pause_img" ]; then
  python3 "$repo/tests/image/build-oci.py" >/dev/null || { nok "build test images"; finish; }
fi

# The image builder is reproducible: two builds, same bytes.
imgtmp="$(mktemp -d /tmp/vmrt-img.XXXXXX)"
for n in 1 2; do
  python3 "$repo/tests/image/build-oci.py" --name docker.io/library/repro:latest \
    --output "$imgtmp/$n.tar" --cmd '["/bin/sh"]' >/dev/null
done
if [ -s "$imgtmp/1.tar" ] && cmp -s "$imgtmp/1.tar" "$imgtmp/2.tar"; then
  ok "build-oci.py output is byte-identical across builds"
else
  nok "build-oci.py output differs between two builds"
fi
rm -rf "$imgtmp"

# Host state the run must leave as it found it: shim sockets, runc state,
# the namespace's cgroups.
host_state() {
  { ls -1 /run/containerd/s "/run/containerd/runc/${VMRT_CTRD_NS:-vmrt-test}" 2>/dev/null
    find /sys/fs/cgroup -maxdepth 3 -path "*/${VMRT_CTRD_NS:-vmrt-test}*" 2>/dev/null
    [ -e /run/containerd ] && echo /run/containerd; } | sort
}
host_before="$(host_state)"

# --- start ---------------------------------------------------------------
t0=$(ctrd_now_ms)
if ctrd_start; then
  ok "private containerd answers ctr version (pid $CTRD_PID, $CTRD_DIR)"
else
  nok "private containerd starts"; finish
fi
echo "time: containerd start $(( $(ctrd_now_ms) - t0 )) ms"
dir="$CTRD_DIR"; sock="$CTRD_SOCK"; pid="$CTRD_PID"
bin_dir="${VMRT_BIN_DIR:-$repo/target/x86_64-unknown-linux-gnu/release}"
ctrd_path="$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^PATH=//p')"
case "$ctrd_path" in
  "$bin_dir:"*) ok "containerd PATH starts with the shim dir $bin_dir" ;;
  *) nok "containerd PATH is '$ctrd_path', want it to start with $bin_dir" ;;
esac

# --- import --------------------------------------------------------------
t0=$(ctrd_now_ms)
if ctrd_import "$busybox_img" && ctrd_import "$pause_img"; then
  echo "time: import 2 images $(( $(ctrd_now_ms) - t0 )) ms"
  images="$(ctr_ images ls -q)"
  for ref in docker.io/library/busybox-test:latest docker.io/library/pause-test:latest; do
    if grep -qx "$ref" <<<"$images"; then ok "import names image $ref"; else nok "image $ref missing after import (have: $images)"; fi
  done
else
  nok "import test images"
fi

# --- ctr run with runc ---------------------------------------------------
img=docker.io/library/busybox-test:latest
t0=$(ctrd_now_ms)
out="$(ctr_timeout "$run_timeout" run --rm "$img" t1 /bin/echo hello-from-busybox 2>&1)"
rc=$?
echo "time: ctr run --rm (runc) echo $(( $(ctrd_now_ms) - t0 )) ms"
if [ "$rc" -eq 0 ] && [ "$out" = "hello-from-busybox" ]; then
  ok "runc: echo prints hello-from-busybox"
else
  nok "runc: echo: rc=$rc output='$out'"
fi

ctr_timeout "$run_timeout" run --rm "$img" t2 /bin/sh -c 'exit 3' >/dev/null 2>&1
rc=$?
if [ "$rc" -eq 3 ]; then ok "runc: sh -c 'exit 3' makes ctr exit 3"; else nok "runc: exit status: ctr exited $rc, want 3"; fi

# Image contents: users, /tmp mode, image Env reaches the process.
# shellcheck disable=SC2016  # expanded by the container's shell
out="$(ctr_timeout "$run_timeout" run --rm "$img" t3 /bin/sh -c \
  'grep -c . /etc/passwd; stat -c %a /tmp; echo "$PATH"; grep ^vmrt: /etc/passwd | cut -d: -f3' 2>&1)"
want="$(printf '3\n1777\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n1000')"
if [ "$out" = "$want" ]; then ok "runc: image rootfs has passwd, /tmp 1777, PATH"; else nok "runc: image contents: got '$out'"; fi

# Default Cmd of pause-test never exits: run detached, see it RUNNING, kill it.
if ctr_timeout "$run_timeout" run -d docker.io/library/pause-test:latest p1 >/dev/null 2>&1; then
  sleep 0.3
  status="$(ctr_ tasks ls 2>/dev/null | awk '$1 == "p1" { print $3 }')"
  if [ "$status" = "RUNNING" ]; then ok "runc: pause-test default Cmd keeps running"; else nok "runc: pause-test status '$status', want RUNNING"; fi
  # Left running on purpose: ctrd_stop must kill and delete it.
else
  nok "runc: ctr run -d pause-test"
fi

# --- stop and leak checks ------------------------------------------------
t0=$(ctrd_now_ms)
if ctrd_stop; then ok "ctrd_stop cleans up (killed task p1, deleted containers)"; else nok "ctrd_stop reported a problem"; fi
echo "time: ctrd_stop $(( $(ctrd_now_ms) - t0 )) ms"

if kill -0 "$pid" 2>/dev/null; then nok "containerd pid $pid still alive"; else ok "containerd pid $pid gone"; fi
leaked_mounts="$(awk -v d="$dir" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo)"
if [ -z "$leaked_mounts" ]; then ok "no mounts left under $dir"; else nok "mounts left: $leaked_mounts"; fi
leaked_procs="$(ctrd_pids_referring "$sock" | tr '\n' ' ')"
if [ -z "$leaked_procs" ]; then ok "no process refers to $sock"; else nok "processes left: $leaked_procs"; fi
if [ ! -e "$dir" ]; then ok "temp dir removed"; else nok "temp dir $dir still exists"; fi
host_after="$(host_state)"
if [ "$host_after" = "$host_before" ]; then
  ok "no shim socket, runc state or cgroup left on the host"
else
  nok "host state changed: before [$(tr '\n' ' ' <<<"$host_before")] after [$(tr '\n' ' ' <<<"$host_after")]"
fi

finish
