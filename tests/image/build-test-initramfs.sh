#!/usr/bin/env bash
# Builds build/initramfs-test.cpio: the busybox debug guest used by the VMM
# end-to-end tests and the QEMU baseline.
#
# Format: cpio "newc", uncompressed, deterministic (entries sorted, uid/gid 0,
# mtime 0, inode numbers assigned in order), written directly (no root needed
# for the device nodes).
# Contents: /bin/busybox (Debian busybox-static) + one symlink per applet,
# /dev/console, empty mount points and /init (below).
#
# /init prints `VMRT-GUEST-INIT-OK cpus=N uptime=S` on the console, runs the
# tests named by `vmrt.test=a,b,...` on the kernel command line, prints
# `VMRT-GUEST-DONE` and ends with `reboot -f` (a microVM ends by reboot:
# `reboot=k` on x86, the VMM/QEMU exits when the guest resets).
# Tests:
#   virtio       one line per virtio device: `VMRT-TEST virtio <dev> device=<id>`
#   virtiofs:TAG mount virtio-fs TAG on /mnt, list it, print /mnt/vmrt-test.txt
#   run:TAG      mount virtio-fs TAG on /mnt/TAG, run `sh /mnt/TAG/guest.sh /mnt/TAG`,
#                print `VMRT-TEST run TAG rc=N`, unmount (tests/e2e/virtiofs.sh,
#                tests/bench/)
#   blk          print the size of /dev/vda (`VMRT-TEST blk vda sectors=N`)
#   cgroups      print the cgroup2 controllers (`VMRT-TEST cgroups <list>`)
#   sh           interactive shell on the console (ends the VM when it exits)
#   sleep:N      sleep N seconds before rebooting
# Unknown names print `VMRT-TEST unknown <name>` and are otherwise ignored.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$root/build/initramfs-test.cpio}
busybox=${BUSYBOX:-/bin/busybox}

[ -x "$busybox" ] || { echo "initramfs-test: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' \
  || { echo "initramfs-test: $busybox is not statically linked (need busybox-static)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cat >"$stage/init" <<'INIT'
#!/bin/sh
# vmrt test guest init (tests/image/build-test-initramfs.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "VMRT-GUEST-INIT-OK cpus=$(nproc) uptime=$(cut -d' ' -f1 /proc/uptime)"

tests=
for arg in $(cat /proc/cmdline); do
  case $arg in vmrt.test=*) tests=${arg#vmrt.test=} ;; esac
done
for t in $(echo "$tests" | tr ',' ' '); do
  case $t in
    virtio)
      for d in /sys/bus/virtio/devices/*; do
        [ -e "$d" ] || { echo "VMRT-TEST virtio none"; continue; }
        echo "VMRT-TEST virtio $(basename "$d") device=$(cat "$d/device")"
      done ;;
    virtiofs:*)
      tag=${t#virtiofs:}
      mkdir -p /mnt
      if mount -t virtiofs "$tag" /mnt; then
        echo "VMRT-TEST virtiofs $tag mounted: $(ls /mnt | tr '\n' ' ')"
        [ -f /mnt/vmrt-test.txt ] && echo "VMRT-TEST virtiofs content: $(cat /mnt/vmrt-test.txt)"
        umount /mnt
      else
        echo "VMRT-TEST virtiofs $tag FAILED"
      fi ;;
    run:*)
      tag=${t#run:}
      mkdir -p "/mnt/$tag"
      if mount -t virtiofs "$tag" "/mnt/$tag"; then
        sh "/mnt/$tag/guest.sh" "/mnt/$tag"
        echo "VMRT-TEST run $tag rc=$?"
        cd /
        umount "/mnt/$tag"
      else
        echo "VMRT-TEST run $tag FAILED (mount)"
      fi ;;
    blk)
      if [ -e /sys/block/vda/size ]; then echo "VMRT-TEST blk vda sectors=$(cat /sys/block/vda/size)"
      else echo "VMRT-TEST blk none"; fi ;;
    cgroups)
      mkdir -p /sys/fs/cgroup
      mount -t cgroup2 cgroup2 /sys/fs/cgroup && echo "VMRT-TEST cgroups $(cat /sys/fs/cgroup/cgroup.controllers)" ;;
    sh)
      setsid cttyhack sh ;;
    sleep:*)
      sleep "${t#sleep:}" ;;
    *) echo "VMRT-TEST unknown $t" ;;
  esac
done
echo "VMRT-GUEST-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
reboot -f
INIT

# gen_init_cpio-style spec; tests/runner-vm/mkcpio.py writes it deterministically.
{
  for d in bin sbin usr usr/bin usr/sbin dev proc sys mnt root etc run; do echo "dir /$d 0755 0 0"; done
  echo "dir /tmp 1777 0 0"
  echo "nod /dev/console 0600 0 0 c 5 1"
  echo "nod /dev/null 0666 0 0 c 1 3"
  echo "file /bin/busybox $busybox 0755 0 0"
  echo "file /init $stage/init 0755 0 0"
  "$busybox" --list-full | sort -u | while read -r applet; do
    [ "$applet" = bin/busybox ] || echo "slink /$applet /bin/busybox 0777 0 0"
  done
} >"$stage/spec"
python3 "$root/tests/runner-vm/mkcpio.py" "$stage/spec" "$out.tmp"
mv -f "$out.tmp" "$out"
echo "initramfs-test: wrote $out ($(du -h "$out" | cut -f1), sha256 $(sha256sum "$out" | cut -c1-16))"
