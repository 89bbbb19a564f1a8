#!/usr/bin/env bash
# End-to-end test of containerd-shim-vmrt-v2 through `ctr` against the private
# containerd 1.6 of tests/lib/containerd.sh, runtime io.containerd.vmrt.v2.
# Needs a guest-capable /dev/kvm: on this project's hosts run it inside the
# runner VM:   tests/runner-vm/run tests/e2e/shim-ctr.sh
# Needs: target/.../release/{containerd-shim-vmrt-v2,vmrt-vmm}, build/vmlinux,
# build/initramfs.cpio (agent as /init; VMRT_TEST_INITRD=path overrides it),
# build/busybox-test.oci.tar.
# Closing line: `shim-ctr: N passed, M failed`; exit status 0 iff M = 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
top=$PWD
. tests/lib/containerd.sh
. tests/lib/vmrt-config.sh

. tests/lib/shim-e2e.sh

T=${CTRD_OP_TIMEOUT:-120}

shim_suite_setup shim-ctr
# Every event the shim publishes, for the checks at the end.
events=$(mktemp /tmp/vmrt-shim-ctr-events.XXXXXX)
ctr --address "$CTRD_SOCK" -n "$CTRD_NS" events >"$events" 2>&1 &
events_pid=$!

# 1. Output reaches ctr; the kernel is the guest's, not the host's.
once_more u1 ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" u1 uname -a; out=$OUT rc=$RC
guest_rel=$(strings build/vmlinux 2>/dev/null | grep -m1 -oE '^Linux version [^ ]+' | cut -d' ' -f3)
if [ $rc -eq 0 ] && [[ $out == Linux* ]] && [[ $out != *"$(uname -r)"* ]] && { [ -z "$guest_rel" ] || [[ $out == *"$guest_rel"* ]]; }; then
  ok "uname -a shows the guest kernel ($guest_rel)"
else
  bad "uname -a in the guest" "rc=$rc out=$out host=$(uname -r) guest=$guest_rel"; diag
fi
cleanup_c u1

# 1b. The VM boots when the serving shim starts, not at Create (shim-v2/src/preboot.rs),
#     and Create uses that sandbox.
order=$(grep -E "sandbox u1: booting at shim start|Create u1 bundle|create u1: using the sandbox booted at shim start" "$CTRD_LOG" \
  | grep -oE "booting at shim start|Create u1|using the sandbox" | head -3 | tr '\n' ',')
[ "$order" = "booting at shim start,Create u1,using the sandbox," ] && ok "the VM boots at shim start and Create uses it" \
  || bad "pre-boot at shim start" "order in containerd.log: '$order'"

# 2. Exit code passes through.
once_more x3 ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" x3 sh -c 'exit 3'; rc=$RC
[ $rc -eq 3 ] && ok "sh -c 'exit 3' -> ctr exits 3" || { bad "exit code 3" "rc=$rc"; diag; }
cleanup_c x3

# 3. Killed by SIGKILL -> 137. (The workload is its pid namespace's init, which ignores
#    signals it sends itself, so the SIGKILL comes from `ctr task kill`.)
ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" k9 sleep 100000 >/dev/null 2>&1 &
ctrpid=$!
if wait_running k9; then
  ctr_timeout "$T" tasks kill -s KILL k9 >/dev/null 2>&1
  wait "$ctrpid"; rc=$?
  [ $rc -eq 137 ] && ok "ctr task kill -s KILL of the workload -> 137" || { bad "SIGKILL -> 137" "rc=$rc"; diag; }
else
  bad "SIGKILL -> 137" "container k9 never ran"; kill "$ctrpid" 2>/dev/null; wait "$ctrpid"
fi
cleanup_c k9

# 4. stdin: echo hi | ctr run ... cat (ctr 1.6 `run` always attaches stdin; it has no -i)
stdin_hi() { echo hi | ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" i1 cat; }
once_more i1 stdin_hi; out=$OUT rc=$RC
[ $rc -eq 0 ] && [ "$out" = hi ] && ok "echo hi | ctr run cat prints hi and exits" || { bad "stdin to cat" "rc=$rc out=$out"; diag; }
cleanup_c i1

# 5. 10 MiB of stdout arrives complete. In the runner VM, a nested guest crash
#    (VMM status 2) gets one more try, said in the log.
for try in 1 2; do
  mark=$(log_mark)
  n=$(ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" big sh -c 'head -c 10485760 /dev/zero' 2>/dev/null | wc -c)
  cleanup_c big
  [ "$n" != 10485760 ] && [ $try = 1 ] && nested_crash_since "$mark" || break
  echo "     the nested guest crashed after $n bytes (VMM exit status 2, runner VM): once more"
done
[ "$n" = 10485760 ] && ok "10 MiB stdout arrives complete" || { bad "10 MiB stdout" "got $n bytes"; diag; }

# 6. A long-running container: exec, pids, pause/resume, metrics, kill.
if ctr_timeout "$T" run -d "${RT[@]}" "$IMG" lr sleep 100000 >/dev/null 2>&1; then
  ok "ctr run -d starts a long-running container"
  out=$(ctr_timeout "$T" tasks exec --exec-id ex1 lr sh -c 'echo in-exec; exit 5' 2>&1); rc=$?
  [ $rc -eq 5 ] && [ "$out" = in-exec ] && ok "ctr task exec: output and exit code 5" || { bad "ctr task exec" "rc=$rc out=$out"; diag; }
  out=$(ctr_timeout "$T" tasks ps lr 2>&1); rc=$?
  [ $rc -eq 0 ] && [ "$(echo "$out" | tail -n +2 | grep -c .)" -ge 1 ] && ok "ctr task ps lists the processes" || { bad "ctr task ps" "rc=$rc out=$out"; }
  if ctr_timeout "$T" tasks pause lr >/dev/null 2>&1 && ctr_timeout "$T" tasks ls 2>/dev/null | grep -E "^lr " | grep -q PAUSED; then
    if ctr_timeout "$T" tasks resume lr >/dev/null 2>&1 && ctr_timeout "$T" tasks ls 2>/dev/null | grep -E "^lr " | grep -q RUNNING; then
      ok "pause -> PAUSED, resume -> RUNNING"
    else bad "resume" "$(ctr_timeout "$T" tasks ls 2>&1 | grep -E '^lr ')"; diag; fi
  else bad "pause" "$(ctr_timeout "$T" tasks ls 2>&1 | grep -E '^lr ')"; diag; fi
  out=$(ctr_timeout "$T" tasks metrics lr 2>&1); rc=$?
  if [ $rc -eq 0 ] && echo "$out" | grep -qiE 'memory|pids'; then ok "ctr task metrics decodes cgroup v2 metrics"
  else bad "ctr task metrics" "rc=$rc out=$(echo "$out" | head -5 | tr '\n' ' ')"; diag; fi
  ctr_timeout "$T" tasks kill -a -s KILL lr >/dev/null 2>&1; rc=$?
  st=""
  for _ in $(seq 1 $((T * 2))); do
    st=$(ctr_timeout "$T" tasks ls 2>/dev/null | awk '$1 == "lr" {print $3}')
    [ "$st" = STOPPED ] && break; sleep 0.5
  done
  [ $rc -eq 0 ] && [ "$st" = STOPPED ] && ok "ctr task kill --all -s KILL stops the task" || { bad "ctr task kill" "rc=$rc status=$st"; diag; }
  ctr_timeout "$T" tasks delete lr >/dev/null 2>&1 && ok "ctr task delete" || bad "ctr task delete"
else
  bad "ctr run -d" "$(tail -n 5 "$CTRD_LOG")"
fi
cleanup_c lr

# 7. ctr task kill (SIGTERM) of a process with a handler.
if ctr_timeout "$T" run -d "${RT[@]}" "$IMG" tk sh -c 'trap "exit 42" TERM; while :; do sleep 1; done' >/dev/null 2>&1; then
  sleep 2
  ctr_timeout "$T" tasks kill tk >/dev/null 2>&1
  st=""
  for _ in $(seq 1 $((T * 2))); do
    st=$(ctr_timeout "$T" tasks ls 2>/dev/null | awk '$1 == "tk" {print $3}')
    [ "$st" = STOPPED ] && break; sleep 0.5
  done
  [ "$st" = STOPPED ] && ok "ctr task kill (SIGTERM) ends a trapping workload" || { bad "ctr task kill SIGTERM" "status=$st"; diag; }
else bad "ctr run -d tk"; fi
cleanup_c tk

# 7a. Terminal mode: `ctr run -t` on a 33x77 terminal (tests/lib/pty-run.py)
#     gets a pty in the guest, and the window size reaches it (ResizePty ->
#     agent ResizeTty).
tty_case() {
  python3 tests/lib/pty-run.py 33 77 "$T" ctr --address "$CTRD_SOCK" -n "$CTRD_NS" run --fifo-dir "$CTRD_FIFO_DIR" \
    -t --rm "${RT[@]}" "$IMG" tt \
    sh -c 'for i in $(seq 1 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.2; done; [ -t 0 ] && echo tty-yes; echo "size $s"; exit 6' \
    </dev/null | tr -d '\r'; return "${PIPESTATUS[0]}"
}
once_more tt tty_case; out=$OUT rc=$RC
cleanup_c tt
if [ $rc -eq 6 ] && grep -q "tty-yes" <<<"$out" && grep -q "size 33 77" <<<"$out"; then
  ok "ctr run -t: a terminal in the guest, its size 33x77 from ctr's, exit 6"
else bad "ctr run -t" "rc=$rc out=$(head -c 300 <<<"$out")"; diag; fi

# 7b0. Bind mounts (volumes): a host directory read-write and read-only, and a
#      host file, reach the container through the share; nothing stays mounted.
vol=$(mktemp -d /tmp/vmrt-shim-ctr-vol.XXXXXX)
echo "host data" >"$vol/in"; echo "a host file" >"$vol.file"
once_more bm ctr_timeout "$T" run --rm "${RT[@]}" --mount "type=bind,src=$vol,dst=/data,options=rbind:rw" \
      --mount "type=bind,src=$vol,dst=/ro,options=rbind:ro" --mount "type=bind,src=$vol.file,dst=/etc/vmrt-file,options=rbind:ro" \
      "$IMG" bm sh -c 'cat /data/in /etc/vmrt-file; echo guest >/data/out; echo x 2>/dev/null >/ro/y; echo "ro-write=$?"'
out=$OUT rc=$RC
cleanup_c bm
l=$(settled_leftovers bm)
if [ $rc -eq 0 ] && grep -q "host data" <<<"$out" && grep -q "a host file" <<<"$out" && grep -q "ro-write=[1-9]" <<<"$out" \
   && [ "$(cat "$vol/out" 2>/dev/null)" = guest ] && [ ! -e "$vol/y" ] && [ -z "$l" ]; then
  ok "bind mounts: host dir rw and ro, host file; the host sees the guest's write; nothing left mounted"
else bad "bind mounts" "rc=$rc out=$(head -c 300 <<<"$out") host out=$(cat "$vol/out" 2>/dev/null) leftovers=$l"; diag; fi
# The read-only bind is read-only on the host side too (the guest's own `ro`
# is no defence against a hostile guest): its mount under the share is ro.
if ctr_timeout "$T" run -d "${RT[@]}" --mount "type=bind,src=$vol,dst=/ro,options=rbind:ro" "$IMG" bmro sleep 100000 >/dev/null 2>&1 \
   && wait_running bmro; then
  opts=$(awk -v p="$SB/bmro/shared/bmro/mounts/" 'index($5, p) == 1 {print $5, $6}' /proc/self/mountinfo)
  [[ $opts == *" ro"* ]] && ok "the ro bind's mount under the share is read-only on the host ($opts)" \
    || bad "host-side ro bind" "mountinfo: ${opts:-none}"
else bad "host-side ro bind" "container bmro never ran"; diag; fi
cleanup_c bmro
rm -rf "$vol" "$vol.file"

# 7b. memory.max in the guest: the workload is OOM-killed (137) and TaskOOM is published.
once_more oom1 ctr_timeout "$T" run --rm "${RT[@]}" --memory-limit 33554432 "$IMG" oom1 tail /dev/zero; rc=$RC
cleanup_c oom1
sleep 1
if [ $rc -eq 137 ] && grep -q '/tasks/oom.*"container_id":"oom1"' "$events"; then
  ok "--memory-limit 32 MiB: tail /dev/zero is OOM-killed (137) and TaskOOM is published"
else bad "OOM kill" "rc=$rc events: $(grep -c . "$events") lines, oom lines: $(grep /tasks/oom "$events" | head -2)"; diag; fi

# 7c. The shim dies (SIGKILL): containerd runs `containerd-shim-vmrt-v2 delete`,
#     which must end the VMM and leave no mount, socket or sandbox directory.
if ctr_timeout "$T" run -d "${RT[@]}" "$IMG" sc sleep 100000 >/dev/null 2>&1 && wait_running sc; then
  spid=$(pgrep -f "containerd-shim-vmrt-v2 .*-id sc( |\$)" | head -1)
  if [ -n "$spid" ]; then
    kill -9 "$spid"
    st=RUNNING
    for _ in $(seq 1 $((T * 2))); do
      if ls_out=$(ctr_timeout "$T" tasks ls 2>/dev/null); then
        st=$(awk '$1 == "sc" {print $3}' <<<"$ls_out")
        [ "$st" != RUNNING ] && break
      fi
      sleep 0.5
    done
    # Before any cleanup of ours: what containerd's own cleanup left.
    l=$(settled_leftovers sc)
    cleanup_c sc
    [ "$st" != RUNNING ] && [ -z "$l" ] && ok "shim killed: containerd's cleanup (shim delete) leaves no VMM, mount or sandbox dir (task: ${st:-gone})" \
      || { bad "shim crash cleanup" "task=$st leftovers: $l"; diag; }
  else bad "shim crash cleanup" "no shim process for sc"; fi
else bad "shim crash cleanup" "container sc never ran"; fi
cleanup_c sc

# 7d. The agent never answers (a guest whose /init is not the agent): Create
#     fails after agent.timeout_ms with the guest console's tail, nothing left.
nocfg=$(mktemp /tmp/vmrt-shim-ctr-noagent.XXXXXX.toml)
sed -e "s|^initrd = .*|initrd = \"$top/build/initramfs-test.cpio\"|" -e 's|^timeout_ms = .*|timeout_ms = 20000|' \
    -e 's|^memory_mib = .*|memory_mib = 256\nkernel_params = "vmrt.test=sleep:600"|' "$cfg" > "$nocfg"
out=$(ctr_timeout "$T" run --rm "${RT[@]}" --runtime-config-path "$nocfg" "$IMG" na true 2>&1); rc=$?
cleanup_c na
l=$(settled_leftovers na)
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "VMRT-GUEST-INIT-OK" <<<"$out" && grep -qi "agent" <<<"$out" && [ -z "$l" ]; then
  ok "agent not ready in 20 s: Create fails with the console tail, nothing left"
else bad "agent timeout" "rc=$rc leftovers=$l out=$(head -c 400 <<<"$out")"; diag; fi
rm -f "$nocfg"

# 8. Killing vmrt-vmm mid-run ends the task with 255 and leaves nothing behind.
ctr_timeout "$T" run --rm "${RT[@]}" "$IMG" vk sleep 100000 >/dev/null 2>&1 &
ctrpid=$!
vpid=""
for _ in $(seq 1 $((T * 4))); do
  vpid=$(cat "$SB/vk/vmm.pid" 2>/dev/null)
  [ -n "$vpid" ] && ctr_timeout 5 tasks ls 2>/dev/null | awk '$1 == "vk" {print $3}' | grep -q RUNNING && break
  sleep 0.25
done
if [ -n "$vpid" ]; then
  kill -9 "$vpid"
  wait "$ctrpid"; rc=$?
  [ $rc -eq 255 ] && ok "killing vmrt-vmm mid-run -> task exits 255" || { bad "VMM death -> 255" "rc=$rc"; diag; }
else
  bad "VMM death -> 255" "container vk never ran"; kill "$ctrpid" 2>/dev/null; wait "$ctrpid"
fi
cleanup_c vk
sleep 1
l=$(leftovers); [ -z "$l" ] && ok "nothing left after VMM death" || bad "leftovers after VMM death" "$l"

# 9. VM templates (`[factory] template = true`, given as the runtime's ConfigPath):
#    the first sandbox builds the template, every sandbox starts from it; in the
#    clone the wall clock is the host's, the CRNG is reseeded (two clones read
#    different bytes), the rootfs (virtio-fs, mounted after the restore) and stdio
#    work; afterwards nothing is left but the template.
tcfg=$(mktemp /tmp/vmrt-shim-ctr-template.XXXXXX.toml)
tdir=$(mktemp -d /tmp/vmrt-tpl.XXXXXX)
cp "$cfg" "$tcfg"
printf '\n[factory]\ntemplate = true\ntemplate_dir = "%s"\n' "$tdir" >>"$tcfg"
TRT=(--runtime io.containerd.vmrt.v2 --runtime-config-path "$tcfg")
clone() {
  local mark; mark=$(log_mark)
  once_more "$1" ctr_timeout "$T" run --rm "${TRT[@]}" "$IMG" "$1" \
    sh -c 'date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; cat; test -x /bin/busybox && echo rootfs' <<<"hi"
  HOST_NOW=$(date +%s)
  LOG_SINCE=$(tail -c +"$((mark + 1))" "$CTRD_LOG")
}
clone tm1; out1=$OUT rc1=$RC now1=$HOST_NOW log1=$LOG_SINCE
clone tm2; out2=$OUT rc2=$RC log2=$LOG_SINCE
if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [[ $out1 == *$'\nhi\nrootfs'* ]] && [[ $out2 == *$'\nhi\nrootfs'* ]]; then
  ok "ctr run from a VM template: exit 0, stdin reaches the workload, the rootfs is there"
else
  bad "ctr run from a VM template" "rc=$rc1/$rc2 out1=$(echo "$out1" | tr '\n' '|') out2=$(echo "$out2" | tr '\n' '|')"; diag
fi
if grep -q "template [0-9a-f]* built in" <<<"$log1" && grep -q "sandbox tm1: restored from template" <<<"$log1" \
  && ! grep -q "built in" <<<"$log2" && grep -q "sandbox tm2: restored from template" <<<"$log2"; then
  ok "the first sandbox builds the template, both start from it"
else
  bad "template built once, used twice" "$(grep -h "template" <<<"$log1$log2" | cut -c1-200 | tr '\n' '|')"
fi
guest_now=$(head -1 <<<"$out1")
if [[ $guest_now =~ ^[0-9]+$ ]] && [ $((now1 - guest_now)) -ge 0 ] && [ $((now1 - guest_now)) -le 30 ]; then
  ok "the clone's wall clock is the host's (guest $guest_now, host after the run $now1)"
else
  bad "clock of a clone" "guest '$guest_now', host $now1"
fi
r1=$(sed -n 2p <<<"$out1") r2=$(sed -n 2p <<<"$out2")
if [[ $r1 =~ ^[0-9a-f]{32}$ ]] && [[ $r2 =~ ^[0-9a-f]{32}$ ]] && [ "$r1" != "$r2" ]; then
  ok "two clones of one template read different random bytes ($r1 / $r2)"
else
  bad "CRNG reseeded in each clone" "'$r1' vs '$r2'"
fi
sleep 1
l=$(leftovers tm)
# Allowed: the template `<key>/` and its build lock `<key>.lock` (docs/contracts.md).
extra=$(find "$tdir" -mindepth 1 -maxdepth 1 | grep -vE '/[0-9a-f]{16}(\.lock)?$' | tr '\n' ' ')
tpl=$(find "$tdir" -mindepth 2 -maxdepth 2 -name state.json | wc -l)
if [ -z "$l" ] && [ -z "$extra" ] && [ "$tpl" -eq 1 ]; then
  ok "nothing left after the clones but one complete template"
else
  bad "leftovers after the clones" "$l; in $tdir: $(ls -A "$tdir" | tr '\n' ' ') (templates with state.json: $tpl)"
fi
rm -rf "$tdir" "$tcfg"

# Events: every kind the shim publishes was seen, and a task's start comes
# before its exit (x3: `sh -c 'exit 3'`).
kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null
missing=""
for topic in create start exit delete exec-added exec-started paused resumed oom; do
  grep -q "/tasks/$topic " "$events" || missing+="$topic "
done
[ -z "$missing" ] && ok "events: TaskCreate, Start, Exit, Delete, ExecAdded, ExecStarted, Paused, Resumed, OOM" \
  || bad "events" "never published: $missing"
order=$(grep '"container_id":"x3"' "$events" | grep -o ' /tasks/[a-z-]* ' | tr -d ' ' | tr '\n' ' ')
[[ $order == "/tasks/create /tasks/start /tasks/exit"* ]] && ok "events of x3 in order: $order" \
  || bad "event order of x3" "$order"
grep -q '/tasks/exit .*"container_id":"x3".*"exit_status":3' "$events" && ok "TaskExit of x3 carries exit_status 3" \
  || bad "TaskExit of x3" "$(grep '/tasks/exit .*"x3"' "$events" | head -1)"
rm -f "$events"

rm -f "$cfg"
ctrd_stop || bad "ctrd_stop clean" "the harness had to clean up after the shim"
finish shim-ctr
