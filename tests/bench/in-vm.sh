#!/usr/bin/env bash
# The benchmarks that boot guests, in one place (one runner VM boot for all of
# them): tests/bench/vm_benches.py (boot, rss, virtiofs, agent), then
# tests/bench/ctr-bench.sh. Run where /dev/kvm boots Linux guests: inside the
# runner VM (tests/bench/run.sh does that) or on a hardware-KVM host.
# VMRT_BENCH_ONLY="boot rss virtiofs agent ctr" picks a subset.
set -uo pipefail
cd "$(dirname "$0")/../.."
only=${VMRT_BENCH_ONLY:-boot rss virtiofs agent ctr}
say() { echo "bench: $*"; }
say "in $(uname -r) on $(nproc) CPUs; /tmp is $(stat -f -c %T /tmp)${VMRT_IN_RUNNER:+ (inside the runner VM)}"
vm=()
for b in $only; do
  case $b in
    boot | rss | virtiofs | agent) vm+=("$b") ;;
    ctr) ;;
    *) echo "NOTE: unknown benchmark '$b' in VMRT_BENCH_ONLY (boot rss virtiofs agent ctr)" ;;
  esac
done
# Warm the QEMU and VMM binaries (in a fresh runner they come over 9p).
qemu-system-x86_64 --version >/dev/null 2>&1
target/x86_64-unknown-linux-gnu/release/vmrt-vmm --version >/dev/null 2>&1
[ ${#vm[@]} -gt 0 ] && python3 tests/bench/vm_benches.py "${vm[@]}"
case " $only " in
  *" ctr "*)
    t0=$SECONDS
    say "--- ctr"
    tests/bench/ctr-bench.sh
    say "--- ctr took $((SECONDS - t0)) s" ;;
esac
exit 0
