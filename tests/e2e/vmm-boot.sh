#!/usr/bin/env bash
# vmrt-vmm boots the project's guest kernel with the busybox test initramfs,
# whose /init prints a marker and reboots: the marker must appear, the guest
# must see the requested vCPUs, and the VMM must exit 0 on the guest's reboot.
# Each boot path is used: PVH (build/vmlinux), bzImage and an ELF without the
# PVH note (both the 64-bit boot protocol). SIGTERM and SIGINT stop a running
# guest with exit 0.
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
  grep -q "VMRT-GUEST-INIT-OK cpus=$cpus " "$out" && grep -q "booting via PVH entry" "$out"
  check "$cpus vCPU(s): PVH boot to the init marker with cpus=$cpus ($ms ms)" $?
  [ "$rc" -eq 0 ]; check "$cpus vCPU(s): vmrt-vmm exits 0 on guest reboot (got $rc)" $?
  if [ "$failed" -gt 0 ]; then echo "--- output:"; tail -n 40 "$out"; fi
  rm -f "$out"
done
# The other boot paths: the compressed bzImage, and an ELF vmlinux without the
# PVH note (the 64-bit boot protocol). Same marker, same exit.
nopvh=$(mktemp /tmp/vmrt-vmlinux-nopvh.XXXXXX)
objcopy --remove-section=.notes build/vmlinux "$nopvh"
for kernel in build/bzImage "$nopvh"; do
  case $kernel in build/bzImage) what="bzImage"; how="64-bit boot protocol" ;; *) what="vmlinux without PVH note"; how="64-bit boot protocol" ;; esac
  out=$(mktemp)
  timeout -k 10 300 "$vmm" --kernel "$kernel" --initrd build/initramfs-test.cpio \
    --cmdline "console=ttyS0" --vcpus 1 --memory-mib 256 --serial stdout >"$out" 2>&1
  rc=$?
  grep -q "VMRT-GUEST-INIT-OK cpus=1 " "$out" && grep -q "booting via $how" "$out"
  check "$what boots via the $how to the init marker" $?
  [ "$rc" -eq 0 ]; check "$what: vmrt-vmm exits 0 on guest reboot (got $rc)" $?
  if [ "$failed" -gt 0 ]; then echo "--- output:"; tail -n 40 "$out"; fi
  rm -f "$out"
done
rm -f "$nopvh"

# SIGTERM and SIGINT stop a running guest: exit 0, promptly, and the log says why.
for sig in TERM INT; do
  out=$(mktemp)
  "$vmm" --kernel build/vmlinux --initrd build/initramfs-test.cpio \
    --cmdline "console=ttyS0 vmrt.test=sleep:600" --vcpus 2 --memory-mib 256 --serial stdout >"$out" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do grep -q VMRT-GUEST-INIT-OK "$out" && break; sleep 0.5; done
  if grep -q VMRT-GUEST-INIT-OK "$out"; then
    t0=$(date +%s%N)
    kill -s "$sig" "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    wait "$pid"; rc=$?
    [ "$rc" -eq 0 ] && [ "$ms" -lt 10000 ] && grep -q "termination signal received" "$out"
    check "SIG$sig stops a running 2-vCPU guest: exit $rc after $ms ms (want 0, < 10 s)" $?
  else
    kill -9 "$pid" 2>/dev/null; wait "$pid"
    check "SIG$sig: the guest never reached init" 1
  fi
  if [ "$failed" -gt 0 ]; then echo "--- output:"; tail -n 20 "$out"; fi
  rm -f "$out"
done

echo "vmm-boot: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
