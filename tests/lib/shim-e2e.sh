# Sourced by the suites that drive containerd-shim-vmrt-v2 through `ctr` (after
# tests/lib/containerd.sh): case bookkeeping, container cleanup and the leak check.
# Needs: T (ctr timeout, seconds); sets passed, failed, failed_names.

SB=/run/vmrt/sandboxes
IMG=docker.io/library/busybox-test:latest
RT=(--runtime io.containerd.vmrt.v2)
passed=0 failed=0 failed_names=()

ok()  { passed=$((passed + 1)); echo "ok   - $1"; }
bad() { failed=$((failed + 1)); failed_names+=("$1"); echo "FAIL - $1${2:+: $2}"; }
# Prints `<suite>: N passed, M failed (...)` and exits 0 iff M = 0.
finish() {
  echo "$1: $passed passed, $failed failed${failed_names:+ (${failed_names[*]})}"
  [ "$failed" -eq 0 ]
  exit $?
}
# Diagnostics for a failed case: containerd's log tail (it holds the shim's log lines).
diag() {
  echo "  --- containerd.log tail:"; tail -n 15 "$CTRD_LOG" 2>/dev/null | sed 's/^/  | /'
}
# Size in bytes of containerd's log: a mark for nested_crash_since.
log_mark() { stat -c %s "$CTRD_LOG" 2>/dev/null || echo 0; }
# In the runner VM only (QEMU 7.2 TCG, nested SVM): true when the containerd log,
# from byte $1 on, shows a VMM that stopped with status 2 (triple fault or KVM
# failure) -- the nested guest crashed under heavy I/O, which happens there now and
# then (README, "The runner VM"). On hardware KVM it is never excused.
nested_crash_since() {
  [ -n "${VMRT_IN_RUNNER:-}" ] || return 1
  tail -c +"$(($1 + 1))" "$CTRD_LOG" 2>/dev/null | grep -q "VMM exited with status 2"
}
# once_more ID CMD...: runs CMD (output in OUT, exit status in RC). In the runner
# VM, when a nested guest crashed meanwhile (see nested_crash_since), removes
# container ID and runs CMD once more, and says so. On hardware KVM: one run.
once_more() {
  local id=$1 try mark; shift
  for try in 1 2; do
    mark=$(log_mark)
    OUT=$("$@" 2>&1); RC=$?
    if [ "$try" = 1 ] && nested_crash_since "$mark"; then
      echo "     $id: the nested guest crashed (VMM exit status 2, runner VM): once more"
      cleanup_c "$id"
      continue
    fi
    break
  done
}
# Removes container $1 whatever state it is in.
cleanup_c() {
  ctr_timeout "$T" tasks kill -s KILL "$1" >/dev/null 2>&1
  ctr_timeout "$T" tasks delete -f "$1" >/dev/null 2>&1
  ctr_timeout "$T" containers rm "$1" >/dev/null 2>&1
}
# Waits up to $T s for task $1 to be RUNNING.
wait_running() {
  for _ in $(seq 1 $((T * 4))); do
    ctr_timeout 5 tasks ls 2>/dev/null | awk -v c="$1" '$1 == c {print $3}' | grep -q RUNNING && return 0
    sleep 0.25
  done
  return 1
}
# VMMs of sandboxes under $SB, and shims of the private containerd (not others').
vmm_pids() { pgrep -f "vmrt-vmm --config $SB/" 2>/dev/null | tr '\n' ' '; }
shim_pids() { pgrep -f "containerd-shim-vmrt-v2 .*-address $CTRD_SOCK" 2>/dev/null | tr '\n' ' '; }
# Prints what a sandbox left behind: VMM processes, sandbox dirs, mounts, and host
# cgroups whose name contains $1 (a container id prefix) when given (empty = none).
leftovers() {
  local l="" cg
  if [ -n "${1:-}" ]; then
    cg=$(find /sys/fs/cgroup -mindepth 1 -type d -name "*$1*" 2>/dev/null | tr '\n' ' ')
    [ -n "$cg" ] && l+="cgroups: $cg; "
  fi
  [ -n "$(vmm_pids)" ] && l+="vmrt-vmm processes: $(vmm_pids); "
  [ -d $SB ] && [ -n "$(ls -A $SB 2>/dev/null)" ] && l+="sandbox dirs: $(ls -A $SB | tr '\n' ' '); "
  grep -q " $SB/" /proc/self/mountinfo && l+="mounts: $(awk -v d="$SB/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | tr '\n' ' '); "
  echo "$l"
}
# Like leftovers, plus shims; waits up to 10 s for teardown to finish first.
settled_leftovers() {
  local l
  for _ in $(seq 1 40); do
    l=$(leftovers "$@"); [ -n "$(shim_pids)" ] && l+="shims: $(shim_pids); "
    [ -z "$l" ] && break
    sleep 0.25
  done
  echo "$l"
}
# Fails suite $1 (and exits) when a binary or image the shim suites use is missing.
require_artifacts() {
  local f
  for f in target/x86_64-unknown-linux-gnu/release/containerd-shim-vmrt-v2 target/x86_64-unknown-linux-gnu/release/vmrt-vmm \
           build/vmlinux build/initramfs.cpio build/busybox-test.oci.tar; do
    [ -e "$f" ] || { bad "prerequisites" "missing $f"; finish "$1"; }
  done
}
# Set-up of shim suite $1 (fails and exits the suite on any step): artifacts,
# /dev/kvm, the vmrt test config in $cfg (initrd from VMRT_TEST_INITRD when
# set, e.g. one built from a newer agent), a private containerd with the
# busybox test image.
shim_suite_setup() {
  require_artifacts "$1"
  if [ ! -c /dev/kvm ]; then bad "prerequisites" "no /dev/kvm (run inside tests/runner-vm/run)"; finish "$1"; fi
  vmrt_test_config "$(mktemp "/tmp/vmrt-$1.XXXXXX.toml")"
  cfg=$VMRT_CONFIG
  if [ -n "${VMRT_TEST_INITRD:-}" ]; then
    sed -i "s|^initrd = .*|initrd = \"$VMRT_TEST_INITRD\"|" "$cfg"
  fi
  ctrd_start || { bad "containerd start"; finish "$1"; }
  ctrd_import build/busybox-test.oci.tar || { bad "image import"; finish "$1"; }
}
