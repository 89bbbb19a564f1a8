#!/usr/bin/env bash
# The benchmarks that boot guests, in one place (one runner VM boot for all of
# them): tests/bench/vm_benches.py boot, rss, virtiofs, agent, then
# tests/bench/ctr-bench.sh. Run where /dev/kvm boots Linux guests: inside the
# runner VM (tests/bench/run.sh does that) or on a hardware-KVM host.
# Each benchmark runs under a time limit (a hung step is stopped with a NOTE and
# the suite goes on): VMRT_BENCH_LIMIT_<NAME> seconds, defaults below; they add
# up to less than run.sh's runner timeout.
# VMRT_BENCH_ONLY="boot rss virtiofs agent ctr" picks a subset.
set -uo pipefail
cd "$(dirname "$0")/../.."
only=${VMRT_BENCH_ONLY:-boot rss virtiofs agent ctr}
say() { echo "bench: $*"; }
say "in $(uname -r) on $(nproc) CPUs; /tmp is $(stat -f -c %T /tmp)${VMRT_IN_RUNNER:+ (inside the runner VM)}"
# Warm the QEMU and VMM binaries (in a fresh runner they come over 9p).
qemu-system-x86_64 --version >/dev/null 2>&1
target/x86_64-unknown-linux-gnu/release/vmrt-vmm --version >/dev/null 2>&1
declare -A limit=([boot]=${VMRT_BENCH_LIMIT_BOOT:-480} [rss]=${VMRT_BENCH_LIMIT_RSS:-240}
  [virtiofs]=${VMRT_BENCH_LIMIT_VIRTIOFS:-600} [agent]=${VMRT_BENCH_LIMIT_AGENT:-420}
  [ctr]=${VMRT_BENCH_LIMIT_CTR:-900})
for b in $only; do
  case $b in
    boot | rss | virtiofs | agent)
      # vm_benches.py's own watchdog stops it (with stacks) 20 s before the
      # timeout(1) backstop, which signals the whole process group.
      VMRT_BENCH_LIMIT=$((limit[$b] - 20)) timeout -k 10 "${limit[$b]}" python3 tests/bench/vm_benches.py "$b"
      rc=$?
      [ "$rc" -eq 0 ] || echo "NOTE: $b: stopped with exit $rc (limit ${limit[$b]} s, VMRT_BENCH_LIMIT_${b^^})" ;;
    ctr)
      t0=$SECONDS
      say "--- ctr"
      timeout -k 10 "${limit[ctr]}" tests/bench/ctr-bench.sh
      rc=$?
      [ "$rc" -eq 0 ] || echo "NOTE: ctr: stopped with exit $rc (limit ${limit[ctr]} s, VMRT_BENCH_LIMIT_CTR)"
      say "--- ctr took $((SECONDS - t0)) s" ;;
    *) echo "NOTE: unknown benchmark '$b' in VMRT_BENCH_ONLY (boot rss virtiofs agent ctr)" ;;
  esac
done
exit 0
