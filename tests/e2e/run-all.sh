#!/usr/bin/env bash
# Runs every end-to-end suite. Suites that boot a real guest run together in
# one guest-capable environment: directly on a host with hardware KVM, or in
# one runner VM boot (tests/runner-vm/run) where /dev/kvm cannot boot standard
# guests (see tests/lib/kvm-path.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/kvm-path.sh

passed=0 failed=0 failed_names=()
# Everything the suites print, for the summary of failed cases at the end (CI
# logs are often read from their tail).
all=$(mktemp /tmp/vmrt-e2e-all.XXXXXX)
trap 'rm -f "$all"' EXIT
suite() {
  local name=$1 rc; shift
  echo "=== e2e suite: $name"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$all"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1)); echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1)); failed_names+=("$name"); echo "=== $name: FAILED ($((SECONDS - t0)) s)"
  fi
}

# On the host itself: the containerd harness with runc, and the runner VM.
suite runc-baseline tests/e2e/runc-baseline.sh
suite shim-host tests/e2e/shim-host.sh
if [ "$(vmrt_kvm_path)" = runner ]; then
  suite runner-selftest tests/e2e/runner-selftest.sh
fi
# Everything that boots our guest: one environment, one boot. In the runner VM
# (QEMU 7.2 TCG, nested SVM) nested guests sometimes crash or the runner stalls
# (tests/runner-vm/run exits 126 after VMRT_RUNNER_STALL s without output); there
# the suites that did not pass run again (at most three times more), each time in a new
# boot, and the log says so.
# On hardware KVM there is no second attempt.
guest_stage() {
  local out rc todo="${VMRT_E2E_SUITES:-vmm-boot agent-guest agent-cgroups vmrt-check virtiofs shim-ctr shim-cycles}" left s
  out=$(mktemp /tmp/vmrt-e2e-guest.XXXXXX)
  for attempt in 1 2 3 4; do
    VMRT_E2E_SUITES="$todo" VMRT_RUNNER_STALL=${VMRT_RUNNER_STALL:-180} \
      vmrt_run_e2e tests/e2e/guest-suites.sh 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && [ "$attempt" -lt 4 ] && [ "$(vmrt_kvm_path)" = runner ] || break
    left=""
    for s in $todo; do grep -Eq "^$s: [0-9]+ passed, 0 failed" "$out" || left+="$s "; done
    if [ -z "$left" ]; then rc=0; break; fi
    local why="failed"; [ "$rc" -eq 126 ] && why="stalled"
    echo "=== guest: attempt $attempt $why (exit $rc); again in a new runner boot for: $left"
    todo=$left
  done
  rm -f "$out"
  return "$rc"
}
suite guest guest_stage

if [ "$failed" -gt 0 ]; then
  echo "=== what failed, in order (every attempt):"
  grep -aE '^(FAIL|[a-z-]+: FAIL|--- .* FAILED|=== guest: attempt|runner VM: (no output|command timed out|command exited|no exit status|setup failed|sample 0))' "$all" \
    | cut -c1-300 | head -n 40 | sed 's/^/  /'
fi
echo "e2e: $passed passed, $failed failed${failed_names:+ (${failed_names[*]})}"
[ "$failed" -eq 0 ]
