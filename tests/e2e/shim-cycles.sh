#!/usr/bin/env bash
# 20 sequential `ctr run --rm` cycles with containerd-shim-vmrt-v2 (runtime
# io.containerd.vmrt.v2) against the private containerd 1.6 of
# tests/lib/containerd.sh: each prints its line, and afterwards no vmrt-vmm
# process, mount, socket, sandbox directory or cgroup is left. Its own suite
# (not part of shim-ctr) so that a runner-VM fault in one is retried alone.
# Needs a guest-capable /dev/kvm: on this project's hosts run it inside the
# runner VM:   tests/runner-vm/run tests/e2e/shim-cycles.sh
# Needs: target/.../release/{containerd-shim-vmrt-v2,vmrt-vmm}, build/vmlinux,
# build/initramfs.cpio (agent as /init; VMRT_TEST_INITRD=path overrides it),
# build/busybox-test.oci.tar.
# Closing line: `shim-cycles: N passed, M failed`; exit status 0 iff M = 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
top=$PWD
. tests/lib/containerd.sh
. tests/lib/vmrt-config.sh

. tests/lib/shim-e2e.sh

T=${CTRD_OP_TIMEOUT:-120}

shim_suite_setup shim-cycles

# 20 sequential run/rm cycles leave no VMM, mount, socket or sandbox dir.
cyc_ok=0
for i in $(seq 1 20); do
  for try in 1 2; do
    mark=$(log_mark)
    out=$(ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" cyc$i echo "cycle $i" 2>&1); rc=$?
    cleanup_c cyc$i
    [ "$out" != "cycle $i" ] && [ $try = 1 ] && nested_crash_since "$mark" || break
    echo "     cycle $i: the nested guest crashed (VMM exit status 2, runner VM): once more"
  done
  if [ $rc -eq 0 ] && [ "$out" = "cycle $i" ]; then
    cyc_ok=$((cyc_ok + 1))
    echo "     cycle $i: $cyc_ok/$i printed their line"
  else
    echo "     cycle $i: FAILED: rc=$rc out=$(head -c 300 <<<"$out" | tr '\n' ' ')"
    tail -c +"$((mark + 1))" "$CTRD_LOG" | grep -E "cyc$i|level=(warn|error)" | tail -n 12 | cut -c1-400 | sed 's/^/       | /'
  fi
done
sleep 1
l=$(leftovers cyc)
socks=$(find /run/vmrt -type s 2>/dev/null | tr '\n' ' ')
[ "$cyc_ok" = 20 ] && ok "20 sequential run/rm cycles" || bad "20 run/rm cycles" "$cyc_ok/20 printed their line"
[ -z "$l$socks" ] && ok "no vmrt-vmm, mount, socket, sandbox dir or cgroup left" || bad "leftovers after cycles" "$l $socks"

rm -f "$cfg"
ctrd_stop || bad "ctrd_stop clean" "the harness had to clean up after the shim"
finish shim-cycles
