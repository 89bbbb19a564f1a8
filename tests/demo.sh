#!/usr/bin/env bash
# make demo: `ctr run --runtime io.containerd.vmrt.v2` runs busybox's `uname -a`
# in a microVM through a private containerd, and prints the guest's kernel line
# next to the host's. Runs through the runner VM when this host's /dev/kvm
# cannot boot standard guests (tests/lib/kvm-path.sh).
# No errexit: the harness functions return statuses of their own (e.g. wait on
# containerd's PID) that are not failures of the demo.
set -uo pipefail
cd "$(dirname "$0")/.."
. tests/lib/kvm-path.sh

if [ "${1:-}" != --inner ] && [ "$(vmrt_kvm_path)" = runner ]; then
  exec tests/runner-vm/run tests/demo.sh --inner
fi

. tests/lib/containerd.sh
. tests/lib/vmrt-config.sh
vmrt_test_config
ctrd_start || exit 1
ctrd_import build/busybox-test.oci.tar || { ctrd_stop; exit 1; }
t0=$(date +%s.%N)
if ! guest=$(ctr_ run --runtime io.containerd.vmrt.v2 --rm docker.io/library/busybox-test:latest demo uname -a); then
  echo "demo: ctr run failed; containerd log (shim log included) tail:" >&2
  tail -n 60 "$CTRD_LOG" >&2
  ctrd_stop
  exit 1
fi
t1=$(date +%s.%N)
ctrd_stop || echo "demo: containerd harness reported leftovers at stop (see above)" >&2
echo
echo "guest (vmrt microVM): $guest"
echo "host:                 $(uname -a)"
printf 'ctr run --rm took %.2f s\n' "$(echo "$t1 - $t0" | bc)"
