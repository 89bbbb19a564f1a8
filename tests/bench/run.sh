#!/usr/bin/env bash
# vmrt benchmarks (`make bench`, after `make deps all`). Every number is a ratio
# against a peer run side by side in the same environment (never against
# bare-metal figures); nothing is asserted: a failing step prints `NOTE: ...`
# and the suite goes on. Exit status 0 unless the harness itself broke.
#
#   1. runner boot-to-command (host, only on the `runner` path): median of 5
#      `tests/runner-vm/run true`, from the runner's "up in X s" line.
#   2-5. tests/bench/vm_benches.py: boot vmrt/qemu-microvm, vmm-rss, virtiofs
#      seq-read and stat-10k guest/runner, agent first-rpc / rss / init-to-ready.
#   6. tests/bench/ctr-bench.sh: ctr-run vmrt/runc and per-sandbox RSS.
# 2-6 run in ONE runner VM boot (tests/bench/in-vm.sh via vmrt_run_e2e), or
# directly on a hardware-KVM host (tests/lib/kvm-path.sh decides).
#
# Output: progress lines, `bench: ... samples ...` raw samples, and at the end
# a summary block with every `RESULT:` line and every `NOTE:`.
# Env: VMRT_BENCH_ONLY="runner boot rss virtiofs agent ctr" (subset),
#      VMRT_BENCH_RUNNER_RUNS (default 5), VMRT_BENCH_BOOT_RUNS,
#      VMRT_BENCH_AGENT_RUNS, VMRT_BENCH_CTR_RUNS (default 10),
#      VMRT_BENCH_FS_REPS (default 3), VMRT_BENCH_FS_BUDGET (s per virtio-fs
#      test, default 120), VMRT_BENCH_CTR_BUDGET (s, default 480),
#      VMRT_BENCH_AGENT_INITRD, VMRT_BENCH_AGENT_LOG (vmrt.log= of the agent bench, default
#      info; debug also prints the agent's start-up steps), VMRT_BENCH_VMM (another vmrt-vmm binary, for A/B runs),
#      VMRT_E2E_PATH=direct|runner,
#      VMRT_RUNNER_TIMEOUT (default here 2700 s for the one guest-bench runner),
#      VMRT_RUNNER_STALL (default here 300 s without output: the runner stalled).
set -uo pipefail
export VMRT_RUNNER_TIMEOUT=${VMRT_RUNNER_TIMEOUT:-2700}
# A runner VM silent this long has stalled (README, "The runner VM"): killed
# (exit 126, noted) instead of waiting for the timeout. Every bench step prints
# within a few minutes.
export VMRT_RUNNER_STALL=${VMRT_RUNNER_STALL:-300}
cd "$(dirname "$0")/../.."
. tests/lib/kvm-path.sh

only=${VMRT_BENCH_ONLY:-runner boot rss virtiofs agent ctr}
log=$(mktemp /tmp/vmrt-bench-log.XXXXXX)
trap 'rm -f "$log" "$log.err"' EXIT
t_start=$SECONDS
path=$(vmrt_kvm_path)
echo "bench: path $path ($(vmrt_kvm_path_reason)); host $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {if (NR == 0) exit; if (NR % 2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# 1. Runner boot-to-command.
case " $only " in *" runner "*)
  if [ "$path" = runner ]; then
    n=${VMRT_BENCH_RUNNER_RUNS:-5} ups=""
    echo "bench: --- runner: $n x tests/runner-vm/run true" | tee -a "$log"
    for i in $(seq 1 "$n"); do
      tests/runner-vm/run true 2>"$log.err" >/dev/null
      rc=$?
      up=$(grep -o 'up in [0-9.]* s' "$log.err" | head -1 | awk '{print $3}')
      if [ "$rc" -eq 0 ] && [ -n "$up" ]; then ups+="$up "
      else echo "NOTE: runner: run $i exit $rc: $(tr '\n' ' ' <"$log.err" | cut -c1-300)" | tee -a "$log"; fi
    done
    if [ -n "$ups" ]; then
      echo "bench: runner: samples ${ups}(s)" | tee -a "$log"
      echo "RESULT: runner boot-to-command = $(echo "$ups" | median) s (median of $(echo $ups | wc -w))" | tee -a "$log"
    fi
  else
    echo "bench: runner: skipped (path is $path)" | tee -a "$log"
  fi ;;
esac

# 2-6. Everything that boots a guest, in one runner boot.
inner=""
for b in $only; do [ "$b" = runner ] || inner+="$b "; done
if [ -n "$inner" ]; then
  echo "bench: --- guest benchmarks ($inner) on the $path path" | tee -a "$log"
  VMRT_BENCH_ONLY=$inner vmrt_run_e2e tests/bench/in-vm.sh 2>&1 | sed -u 's/\r//g' | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "NOTE: guest benchmarks: exit $rc (124: runner timeout, 125: runner failure, 126: runner stalled)" | tee -a "$log"
fi

echo
echo "==================== vmrt bench summary ($path path, $((SECONDS - t_start)) s) ===================="
grep -a '^RESULT: ' "$log" | sed 's/^RESULT: /  /'
if grep -aq '^NOTE: ' "$log"; then
  echo "  notes:"
  grep -a "^NOTE: " "$log" | cut -c7-400 | sed "s/^/    - /"
fi
echo "========================================================================================"
exit 0
