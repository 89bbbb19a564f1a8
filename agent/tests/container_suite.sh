#!/usr/bin/env bash
# The agent's container tests (vmrt-agent, youki libcontainer in-process).
# Needs root and /bin/busybox (busybox-static).
#
# On a host whose cgroup v2 lacks the cpu/memory/pids controllers the tests
# that need them print SKIP; in the runner VM (pure cgroup2 with controllers,
# VMRT_IN_RUNNER=1) everything runs, with 100 create/delete cycles.
# Meant to run inside the guest-capable environment of tests/e2e/guest-suites.sh
# (i.e. in the runner VM); standalone: tests/runner-vm/run agent/tests/container_suite.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${VMRT_IN_RUNNER:-}" ]; then
  export VMRT_CT_CYCLES=${VMRT_CT_CYCLES:-100}
fi
exec cargo test --release -p vmrt-agent \
  --test container_lifecycle --test container_confinement --test container_cgroups \
  -- --nocapture
