#!/usr/bin/env bash
# The suites that need a guest-capable /dev/kvm (hardware KVM or the runner VM).
set -uo pipefail
cd "$(dirname "$0")/../.."
failed=0 passed=0
# VMRT_E2E_SUITES picks suites; the default is every suite.
for s in ${VMRT_E2E_SUITES:-vmm-boot agent-guest agent-cgroups vmrt-check virtiofs shim-ctr}; do
  echo "--- guest suite: $s"
  if tests/e2e/$s.sh; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "--- $s FAILED"; fi
done
echo "guest-suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
