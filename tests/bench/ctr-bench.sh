#!/usr/bin/env bash
# Benchmark: `ctr run --rm <image> <id> true` latency, vmrt vs runc, against the
# private containerd of tests/lib/containerd.sh (busybox-test image), 10 runs
# each, alternating, after one untimed warm-up each. vmrt runs twice per round:
# booting its guest (`vmrt`) and starting it from a VM template (`vmrt-template`:
# the same config plus `[factory] template = true`, passed as the runtime's
# ConfigPath; its warm-up builds the template). Then the per-sandbox RSS of
# containerd-shim-vmrt-v2, vmrt-vmm (Rss and without guest memory) and the
# agent (`vmrt agent --uds <sandbox>/vsock.sock version`, agent_rss_kib) with
# one `ctr run -d ... sleep 30` on vmrt.
# Needs a guest-capable /dev/kvm (inside the runner VM on kvm-pvm hosts).
# Asserts nothing: failures print `NOTE: ...`, results `RESULT: ...`; exit 0.
# Env: VMRT_BENCH_CTR_RUNS (default 10), VMRT_BENCH_CTR_BUDGET (s, default 480:
# no new pair of runs starts after that), VMRT_BENCH_AGENT_INITRD (guest
# initramfs instead of build/initramfs.cpio).
set -uo pipefail
cd "$(dirname "$0")/../.."
top=$PWD
. tests/lib/containerd.sh
. tests/lib/vmrt-config.sh

IMG=docker.io/library/busybox-test:latest
VMRT_RT=io.containerd.vmrt.v2
RUNC_RT=io.containerd.runc.v2
RUNS=${VMRT_BENCH_CTR_RUNS:-10}
BUDGET=${VMRT_BENCH_CTR_BUDGET:-480}
T=${CTRD_OP_TIMEOUT:-120}
REL=$top/target/x86_64-unknown-linux-gnu/release
MEM_MIB=256  # tests/lib/vmrt-config.sh

result() { echo "RESULT: $*"; }
note() { echo "NOTE: $*"; }
say() { echo "bench: $*"; }
now_ns() { date +%s%N; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {if (NR == 0) exit; if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for f in "$REL/containerd-shim-vmrt-v2" "$REL/vmrt-vmm" build/vmlinux build/initramfs.cpio build/busybox-test.oci.tar; do
  [ -e "$f" ] || { note "ctr: missing $f (make all); skipping the ctr benchmark"; exit 0; }
done

work=$(mktemp -d /tmp/vmrt-bench-ctr.XXXXXX)
vmrt_test_config "$work/vmrt.toml"
if [ -n "${VMRT_BENCH_AGENT_INITRD:-}" ]; then
  sed -i "s|^initrd = .*|initrd = \"$VMRT_BENCH_AGENT_INITRD\"|" "$work/vmrt.toml"
fi
cp "$work/vmrt.toml" "$work/vmrt-template.toml"
printf '\n[factory]\ntemplate = true\ntemplate_dir = "%s"\n' "$work/templates" >>"$work/vmrt-template.toml"
ctrd_start || { note "ctr: private containerd did not start"; rm -rf "$work"; exit 0; }
trap 'ctrd_stop; rm -rf "$work"' EXIT
ctrd_import build/busybox-test.oci.tar || { note "ctr: image import failed"; exit 0; }

# run_once VARIANT ID: prints the latency in ms, or returns 1 (output in $work/out).
run_once() {
  local t0 t1 extra=()
  [ "$1" = vmrt-template ] && extra=(--runtime-config-path "$work/vmrt-template.toml")
  t0=$(now_ns)
  ctr_timeout "$T" run --rm --runtime "${rt[$1]}" "${extra[@]}" "$IMG" "$2" true >"$work/out" 2>&1 || {
    ctr_timeout "$T" tasks delete -f "$2" >/dev/null 2>&1
    ctr_timeout "$T" containers rm "$2" >/dev/null 2>&1
    return 1
  }
  t1=$(now_ns)
  echo $(((t1 - t0) / 1000000))
}
why() { tr '\n' ' ' <"$work/out" | cut -c1-300; }

variants="vmrt vmrt-template runc"
declare -A samples=([vmrt]="" [vmrt-template]="" [runc]="")
declare -A rt=([vmrt]=$VMRT_RT [vmrt-template]=$VMRT_RT [runc]=$RUNC_RT)
declare -A broken=()
for name in $variants; do
  if ms=$(run_once "$name" "bench-warm-$name"); then
    say "ctr: warm-up $name $ms ms"
  else
    note "ctr: $name: ctr run failed on the warm-up: $(why)"
    broken[$name]=1
  fi
done
t_loop=$SECONDS
for i in $(seq 1 "$RUNS"); do
  if [ $((SECONDS - t_loop)) -ge "$BUDGET" ]; then
    note "ctr: time budget of $BUDGET s spent after $((i - 1)) runs each (VMRT_BENCH_CTR_BUDGET)"
    break
  fi
  for name in $variants; do
    [ -n "${broken[$name]:-}" ] && continue
    if ms=$(run_once "$name" "bench-$name-$i"); then
      samples[$name]+="$ms "
    else
      note "ctr: $name run $i failed: $(why)"
    fi
  done
done
for name in $variants; do
  [ -n "${samples[$name]}" ] || continue
  say "ctr: samples $name ${samples[$name]}(ms)"
  result "ctr-run $name = $(echo "${samples[$name]}" | median) ms (median of $(echo ${samples[$name]} | wc -w))"
done
for name in vmrt vmrt-template; do
  if [ -n "${samples[$name]}" ] && [ -n "${samples[runc]}" ]; then
    mv=$(echo "${samples[$name]}" | median); mr=$(echo "${samples[runc]}" | median)
    result "ctr-run $name/runc = $(awk -v a="$mv" -v b="$mr" 'BEGIN {printf "%.2f", a / b}') (target <= 1.5)"
  else
    note "ctr: no $name/runc ratio (a side has no samples)"
  fi
done

# Per-sandbox RSS with one long-running vmrt container.
# Rss of smaps_rollup: counted from the page tables (VmRSS of status is kept in
# per-thread caches on Linux 6.1 and can be megabytes short).
rss_kib() { awk '/^Rss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null; }
id=bench-rss
if [ -n "${broken[vmrt]:-}" ]; then
  note "ctr: skipping the per-sandbox RSS (vmrt ctr run does not work here)"
  exit 0
fi
if ! ctr_timeout "$T" run -d --runtime "$VMRT_RT" "$IMG" "$id" sleep 30 >"$work/out" 2>&1; then
  note "ctr: ctr run -d ... sleep 30 failed: $(why)"
  exit 0
fi
sleep 2
shim_pid=
for p in $(ctrd_pids_referring "$CTRD_SOCK"); do
  case $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) in *containerd-shim-vmrt-v2*) shim_pid=$p ;; esac
done
sb=/run/vmrt/sandboxes/$id
vmm_pid=$(cat "$sb/vmm.pid" 2>/dev/null)
if [ -n "$shim_pid" ]; then
  result "sandbox rss shim = $(rss_kib "$shim_pid") KiB (containerd-shim-vmrt-v2 Rss)"
else
  note "ctr: could not find the containerd-shim-vmrt-v2 process"
fi
if [[ "$vmm_pid" =~ ^[0-9]+$ ]] && [ -d "/proc/$vmm_pid" ]; then
  read -r without total maps <<<"$(python3 tests/bench/vm_benches.py smaps "$vmm_pid" "$MEM_MIB")"
  say "ctr: vmrt-vmm pid $vmm_pid: Rss total $total KiB, guest memory mapping(s) $maps"
  result "sandbox rss vmm = $without KiB without guest memory (Rss $(rss_kib "$vmm_pid") KiB)"
else
  note "ctr: no VMM pid in $sb/vmm.pid"
fi
if "$REL/vmrt" agent --help >/dev/null 2>&1; then
  v=$("$REL/vmrt" agent --uds "$sb/vsock.sock" version 2>"$work/err")
  say "ctr: agent version: $v"
  a=$(printf '%s' "$v" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("agent_rss_kib", ""))' 2>/dev/null)
  if [ -n "$a" ]; then result "sandbox rss agent = $a KiB"; else note "ctr: no agent_rss_kib from vmrt agent version: $(head -c 300 "$work/err")"; fi
else
  note "ctr: \`vmrt agent\` subcommand not available: no agent RSS"
fi
ctr_timeout "$T" tasks kill -s KILL "$id" >/dev/null 2>&1
sleep 1
ctr_timeout "$T" tasks delete -f "$id" >/dev/null 2>&1
ctr_timeout "$T" containers rm "$id" >/dev/null 2>&1
exit 0
