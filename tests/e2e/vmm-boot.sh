#!/usr/bin/env bash
# vmrt-vmm boots the project's guest kernel with the busybox test initramfs,
# whose /init prints a marker and reboots: the marker must appear, the guest
# must see the requested vCPUs, and the VMM must exit 0 on the guest's reboot.
# Needs a guest-capable /dev/kvm: run directly on hardware KVM or through
# tests/runner-vm/run (tests/e2e/run-all.sh does that).
set -uo pipefail
cd "$(dirname "$0")/../.."
vmm=target/x86_64-unknown-linux-gnu/release/vmrt-vmm
passed=0 failed=0
check() { # name, condition result
  if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "ok   - $1"; else failed=$((failed + 1)); echo "FAIL - $1"; fi
}
for cpus in 1 2; do
  out=$(mktemp)
  t0=$(date +%s%N)
  timeout -k 10 300 "$vmm" --kernel build/vmlinux --initrd build/initramfs-test.cpio \
    --cmdline "console=ttyS0" --vcpus "$cpus" --memory-mib 256 --serial stdout >"$out" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  grep -q "VMRT-GUEST-INIT-OK cpus=$cpus " "$out"; check "$cpus vCPU(s): init marker with cpus=$cpus ($ms ms)" $?
  [ "$rc" -eq 0 ]; check "$cpus vCPU(s): vmrt-vmm exits 0 on guest reboot (got $rc)" $?
  if [ "$failed" -gt 0 ]; then echo "--- output:"; tail -n 40 "$out"; fi
  rm -f "$out"
done
echo "vmm-boot: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
