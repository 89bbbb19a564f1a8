#!/usr/bin/env bash
# Runs every end-to-end suite. Suites that boot a real guest run together in
# one guest-capable environment: directly on a host with hardware KVM, or in
# one runner VM boot (tests/runner-vm/run) where /dev/kvm cannot boot standard
# guests (see tests/lib/kvm-path.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/kvm-path.sh

passed=0 failed=0 failed_names=()
suite() {
  local name=$1; shift
  echo "=== e2e suite: $name"
  local t0=$SECONDS
  if "$@"; then
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
# Everything that boots our guest: one environment, one boot.
suite guest vmrt_run_e2e tests/e2e/guest-suites.sh

echo "e2e: $passed passed, $failed failed${failed_names:+ (${failed_names[*]})}"
[ "$failed" -eq 0 ]
