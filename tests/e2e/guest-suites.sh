#!/usr/bin/env bash
# The suites that need a guest-capable /dev/kvm (hardware KVM or the runner VM).
set -uo pipefail
cd "$(dirname "$0")/../.."
failed=0 passed=0
# A line a minute while the suites run. Inside the runner VM it comes from the
# runner itself, so a frozen runner still goes silent (the stall watchdog of
# tests/runner-vm/run), while a case that waits on a slow nested guest does not.
( t0=$SECONDS; trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do sleep 60 & nap=$!; wait "$nap"; echo "   (guest suites: $((SECONDS - t0)) s)"; done ) &
heartbeat=$!
trap 'kill "$heartbeat" 2>/dev/null' EXIT
# VMRT_E2E_SUITES picks suites; the default is every suite.
for s in ${VMRT_E2E_SUITES:-vmm-boot agent-guest agent-cgroups vmrt-check virtiofs shim-ctr shim-cycles}; do
  echo "--- guest suite: $s"
  if tests/e2e/$s.sh; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "--- $s FAILED"; fi
done
echo "guest-suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
