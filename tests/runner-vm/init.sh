#!/bin/sh
# PID 1 of the runner VM (busybox sh, in the runner initramfs built by
# tests/runner-vm/prepare). Runs one job given by the host (tests/runner-vm/run)
# and powers the VM off.
#
# Serial ports: ttyS0 = kernel console + this script's log (the host keeps it
#               as the console log), ttyS1 = the job's stdout, ttyS2 = its stderr.
# 9p shares:    hostroot = host `/` (read-only), vmrtjob = the job directory
#               (read-write): job.sh in, status out.
# Kernel command line (all optional):
#   vmrt_runner.modules_dir=PATH  host path of this kernel's lib/modules/<kver>,
#                                 bind-mounted at /lib/modules/<kver>
#   vmrt_runner.keep_tmp=1        /tmp stays part of the overlay root (the job's
#                                 cwd is under the host's /tmp) instead of a tmpfs
#   vmrt_runner.pump=0            no interrupt pump (below), for experiments
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1

say() { echo "vmrt-runner: [$(cut -d" " -f1 /proc/uptime)] $*"; }
fatal() {
  say "FATAL: $*"
  echo "VMRT-RUNNER-FATAL $*"
  [ -d /job ] && echo "runner VM: setup failed: $*" >/job/setup-error 2>/dev/null
  echo "runner VM: setup failed: $*" >/dev/ttyS2 2>/dev/null
  sync
  poweroff -f
  sleep 5
}

modules_dir='' keep_tmp='' pump=1
for arg in $(cat /proc/cmdline); do
  case $arg in
    vmrt_runner.modules_dir=*) modules_dir=${arg#*=} ;;
    vmrt_runner.keep_tmp=1) keep_tmp=1 ;;
    vmrt_runner.pump=0) pump=0 ;;
  esac
done

# /modules.load: "<group> <path>" lines, dependencies first; groups share no
# module, so each group loads in its own process.
say "loading modules"
for g in $(cut -d' ' -f1 /modules.load | sort -u); do
  (
    while read -r grp ko; do
      [ "$grp" = "$g" ] || continue
      insmod "/$ko" || { echo "$ko" >>/modules.failed; exit 1; }
    done </modules.load
  ) &
done
wait
[ -s /modules.failed ] && fatal "insmod failed: $(cat /modules.failed)"

say "mounting host root and job share"
mkdir -p /host /job /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fatal "9p mount of hostroot failed"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmrtjob /job || fatal "9p mount of vmrtjob failed"
mount -t tmpfs -o mode=0755 tmpfs /upper || fatal "tmpfs for the overlay upper failed"
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w overlay /newroot \
  || fatal "overlay of host root failed"

r=/newroot
mount -t proc proc $r/proc || fatal "proc"
mount -t sysfs sysfs $r/sys || fatal "sysfs"
mount -t cgroup2 -o nsdelegate cgroup2 $r/sys/fs/cgroup || fatal "cgroup2"
mount -t devtmpfs devtmpfs $r/dev || fatal "devtmpfs"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $r/dev/pts || fatal "devpts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $r/dev/shm || fatal "/dev/shm"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $r/run || fatal "/run"
if [ -z "$keep_tmp" ]; then mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $r/tmp || fatal "/tmp"; fi
mkdir -p $r/run/vmrt-runner $r/run/lock
mount -o bind /job $r/run/vmrt-runner || fatal "bind of the job share"
if [ -n "$modules_dir" ] && [ -d "/host$modules_dir" ]; then
  mkdir -p "$r/lib/modules/$(uname -r)"
  mount -o bind,ro "/host$modules_dir" "$r/lib/modules/$(uname -r)" || say "warning: bind of $modules_dir failed"
fi

for c in cpu cpuset io memory pids; do
  echo "+$c" >$r/sys/fs/cgroup/cgroup.subtree_control || say "warning: cgroup controller $c not enabled"
done
[ -c /dev/kvm ] || fatal "/dev/kvm missing (kvm_amd did not load: no nested SVM?)"
[ -c /dev/net/tun ] || say "warning: /dev/net/tun missing"
hostname vmrt-runner
ip link set lo up 2>/dev/null

[ -f /job/job.sh ] || fatal "no job.sh in the job share"
# Interrupt pump. Under QEMU 7.2 TCG with nested SVM a vCPU of this VM sometimes
# stops taking interrupts that are pending in its local APIC until a new one
# arrives; when that vCPU holds the timekeeping duty and every timer, the whole
# VM stops. Once a second each vCPU reads an MSR of every other vCPU through
# /dev/cpu/N/msr (module msr), which sends it an inter-processor interrupt.
ncpu=$(grep -c '^processor' /proc/cpuinfo)
if [ "$pump" = 1 ] && [ "$ncpu" -gt 1 ] && [ -e /dev/cpu/0/msr ]; then
  for c in $(seq 0 $((ncpu - 1))); do
    others=$(seq 0 $((ncpu - 1)) | grep -vx "$c" | tr '\n' ' ')
    # dd reads one MSR: one interrupt (a longer read would send one per 8 bytes).
    taskset "$(printf %x $((1 << c)))" sh -c "while sleep 1; do for o in $others; do dd if=/dev/cpu/\$o/msr bs=8 count=1; done; done" >/dev/null 2>&1 &
  done
fi
# The host keeps this kernel's symbols for its stall report (tests/runner-vm/where.py).
[ -f /job/want-kallsyms ] && cp /proc/kallsyms /job/kallsyms
stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/ttyS2 raw -echo 2>/dev/null
mkfifo /job-out /job-err
cat /job-out >/dev/ttyS1 &
c1=$!
cat /job-err >/dev/ttyS2 &
c2=$!
up=$(cut -d' ' -f1 /proc/uptime)
say "ready at uptime $up s, starting job"
echo "VMRT-RUNNER-READY uptime=$up"
# the first line on the stderr channel tells the host the runner is up
echo "VMRT-RUNNER-UP uptime=$up" >/dev/ttyS2

chroot $r /usr/bin/env -i /bin/bash /run/vmrt-runner/job.sh </dev/null >/job-out 2>/job-err
rc=$?
echo "$rc" >/job/status
sync
say "job exited with status $rc at uptime $(cut -d' ' -f1 /proc/uptime) s"
echo "VMRT-RUNNER-EXIT status=$rc"

# Let the output readers drain; daemons the job left behind may keep the
# pipes open, so do not wait for them for long.
i=0
while [ $i -lt 50 ] && { kill -0 $c1 2>/dev/null || kill -0 $c2 2>/dev/null; }; do
  sleep 0.1; i=$((i + 1))
done
kill $c1 $c2 2>/dev/null
# stty applies its settings with TCSADRAIN: returns once the UARTs sent everything
stty -F /dev/ttyS1 raw 2>/dev/null
stty -F /dev/ttyS2 raw 2>/dev/null
poweroff -f
sleep 5
