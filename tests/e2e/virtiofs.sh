#!/usr/bin/env bash
# End-to-end test of the VMM's virtio-fs device (virtio 1.2 §5.11).
#
# Boots target/.../vmrt-vmm with build/vmlinux + build/initramfs-test.cpio and
# one share (tag `vmrtfs`, cache=never). Needs a guest-capable /dev/kvm: run it
# directly on such a host or inside the runner VM (tests/e2e/guest-suites.sh
# does that). Run as root (the host side creates a device node).
#
# Guest hook needed in the test initramfs (tests/image/build-test-initramfs.sh):
#   vmrt.test=run:TAG   mkdir -p /mnt/TAG; mount -t virtiofs TAG /mnt/TAG;
#                       sh /mnt/TAG/guest.sh /mnt/TAG; echo "VMRT-TEST run TAG rc=$?";
#                       umount /mnt/TAG
#
# Checks (each prints `virtiofs: ok|FAIL <name>`):
#   host->guest   a file written on the host before boot is read in the guest
#   guest->host   a file written in the guest is on the host afterwards
#   coherence     while the guest runs, the host answers a guest-written file;
#                 the guest sees the answer (cache=never, no stale cache)
#   sha256        a 100 MiB file copied through the share (guest cp) keeps its sha256
#   dirs          mkdir/rename/rm -r in the guest are visible on the host
#   escape-*      absolute and relative symlinks pointing out of the share,
#                 `..` above the mount, mknod of a char/block device, a hard
#                 link to a file outside, a file swapped for a symlink to the
#                 outside after the guest opened it, and a host disk's device
#                 node placed in the share all fail in the guest; the outside
#                 file is unchanged
# Closing line: `virtiofs: N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")/../.."
top=$PWD
vmm=$top/target/x86_64-unknown-linux-gnu/release/vmrt-vmm
kernel=$top/build/vmlinux
initrd=$top/build/initramfs-test.cpio
timeout_s=${VMRT_VIRTIOFS_TIMEOUT:-900}

for f in "$vmm" "$kernel" "$initrd"; do
  [ -e "$f" ] || { echo "virtiofs: missing $f (cargo build --release -p vmrt-vmm; tests/image/...)"; exit 1; }
done

work=$(mktemp -d /tmp/vmrt-virtiofs.XXXXXX)
vmm_pid=
cleanup() {
  [ -n "$vmm_pid" ] && kill "$vmm_pid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

share=$work/share
outside=$work/outside
mkdir -p "$share" "$outside"
echo "host secret $RANDOM" >"$outside/secret"
secret_sum=$(sha256sum <"$outside/secret")

# Host-side fixtures.
echo "written by the host" >"$share/from-host.txt"
head -c $((100 * 1024 * 1024)) /dev/urandom >"$share/big.bin"
big_sum=$(sha256sum <"$share/big.bin" | cut -d' ' -f1)
ln -s "$outside/secret" "$share/abs-link"
ln -s ../outside/secret "$share/rel-link"
ln -s /etc/hostname "$share/etc-link"
echo "before the swap" >"$share/swap"
# The host's first disk, as an image layer could carry it (block 8:0 is sda;
# the guest has only virtio devices, so it is no device there).
host_disk_ok=0
mknod "$share/host-disk" b 8 0 && host_disk_ok=1

cat >"$share/guest.sh" <<'GUEST'
#!/bin/sh
# Runs inside the guest with the share mounted at $1.
m=$1
r() { echo "VMRT-FS $1 $2"; }
# host->guest
[ "$(cat "$m/from-host.txt")" = "written by the host" ] && r ok host-to-guest || r FAIL host-to-guest
# guest->host
echo "written by the guest" >"$m/from-guest.txt" && sync && r ok guest-write || r FAIL guest-write
# coherence: ask the host, wait for its answer (no cache with cache=never)
echo ping >"$m/ping"
i=0
while [ $i -lt 600 ]; do
  [ -f "$m/pong" ] && [ "$(cat "$m/pong")" = pong ] && break
  sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1))
done
[ "$(cat "$m/pong" 2>/dev/null)" = pong ] && r ok coherence || r FAIL coherence
# 100 MiB copy through the share
cp "$m/big.bin" "$m/big-copy.bin" && sync && r ok big-copy || r FAIL big-copy
echo "VMRT-FS sum $(sha256sum "$m/big-copy.bin" | cut -d' ' -f1)"
# directories
mkdir -p "$m/d1/d2" && echo x >"$m/d1/d2/f" && mv "$m/d1" "$m/d3" && mkdir "$m/gone" && rm -r "$m/gone" \
  && r ok dirs || r FAIL dirs
# escapes: none of these may reach the host's files
leak=$(cat "$m/abs-link" "$m/rel-link" "$m/../outside/secret" "$m/../../outside/secret" 2>/dev/null)
case $leak in *"host secret"*) r FAIL escape-symlink ;; *) r ok escape-symlink ;; esac
echo overwrite >"$m/abs-link" 2>/dev/null; echo overwrite >"$m/rel-link" 2>/dev/null
cd "$m" && cd .. && cd .. && [ "$(pwd)" = / ] && [ ! -e "$(pwd)/outside/secret" ] && r ok escape-dotdot || r FAIL escape-dotdot
cd /
mknod "$m/chr" c 1 3 2>/dev/null && r FAIL escape-mknod-chr || r ok escape-mknod-chr
mknod "$m/blk" b 8 0 2>/dev/null && r FAIL escape-mknod-blk || r ok escape-mknod-blk
ln "$m/abs-link" "$m/hardlink-to-link" 2>/dev/null
[ "$(cat "$m/hardlink-to-link" 2>/dev/null)" = "" ] && r ok escape-hardlink || r FAIL escape-hardlink
# A regular file swapped for a symlink to the outside while the guest holds it
# open: neither the open file nor a new lookup reads the outside. (The VMM's
# own lookup-then-open race is covered by the unit test
# fs_symlink_swapped_in_after_lookup; this checks what the guest sees.)
exec 3<"$m/swap"
echo swap >"$m/swap-request"
i=0
while [ $i -lt 600 ] && [ ! -f "$m/swap-done" ]; do sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1)); done
held=$(cat <&3 2>/dev/null); exec 3<&-
again=$(cat "$m/swap" 2>/dev/null)
case "$held$again" in
  *"host secret"*) r FAIL escape-swapped-symlink ;;
  *) [ -f "$m/swap-done" ] && [ "$held" = "before the swap" ] && r ok escape-swapped-symlink || r FAIL escape-swapped-symlink ;;
esac
# Device nodes the host put in the share (an image layer can carry them) are
# the guest's own devices, never the host's: the host disk's node reads nothing.
# (The guest kernel resolves device nodes itself and never asks the VMM to
# open one; that the VMM refuses such an open anyway is the unit test
# fs_device_nodes_refused.)
dd if="$m/host-disk" of=/dev/null bs=512 count=1 2>/dev/null && r FAIL escape-host-device || r ok escape-host-device
echo x 2>/dev/null >"$m/host-disk" && r FAIL escape-host-device-write || r ok escape-host-device-write
r done all
GUEST

cat >"$work/vm.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 512,
  "kernel": "$kernel",
  "initrd": "$initrd",
  "cmdline": "console=ttyS0 quiet vmrt.test=run:vmrtfs",
  "serial": { "type": "file", "path": "$work/console.log" },
  "shares": [ { "tag": "vmrtfs", "path": "$share", "cache": "never" } ]
}
JSON

t0=$SECONDS
echo "virtiofs: booting the guest (a 100 MiB copy through the share follows; progress every 30 s)"
"$vmm" --config "$work/vm.json" >"$work/vmm.log" 2>&1 &
vmm_pid=$!
next_note=30
# Answer the guest's ping while it runs (host-side change seen live).
while kill -0 "$vmm_pid" 2>/dev/null; do
  if [ -f "$share/ping" ] && [ ! -f "$share/pong" ]; then echo pong >"$share/pong"; fi
  if [ -f "$share/swap-request" ] && [ ! -f "$share/swap-done" ]; then
    rm -f "$share/swap" && ln -s "$outside/secret" "$share/swap" && touch "$share/swap-done"
  fi
  [ $((SECONDS - t0)) -gt "$timeout_s" ] && { echo "virtiofs: guest timed out after $timeout_s s"; kill "$vmm_pid"; break; }
  if [ $((SECONDS - t0)) -ge "$next_note" ]; then
    echo "virtiofs: guest running for $((SECONDS - t0)) s; last: $(grep -a 'VMRT-FS' "$work/console.log" 2>/dev/null | tail -n 1)"
    next_note=$((next_note + 30))
  fi
  sleep 0.2
done
wait "$vmm_pid"; rc=$?
vmm_pid=

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "virtiofs: ok   $1"; }
bad() { failed=$((failed + 1)); echo "virtiofs: FAIL $1"; }
check() { if eval "$2"; then ok "$1"; else bad "$1"; fi; }

check "vmm exit status 0 (got $rc, $((SECONDS - t0)) s)" '[ "$rc" -eq 0 ]'
check "guest booted" 'grep -q VMRT-GUEST-INIT-OK "$work/console.log"'
check "guest ran the share script (run: hook)" 'grep -q "VMRT-FS done all" "$work/console.log"'
for name in host-to-guest guest-write coherence big-copy dirs escape-symlink escape-dotdot \
            escape-mknod-chr escape-mknod-blk escape-hardlink escape-swapped-symlink \
            escape-host-device escape-host-device-write; do
  check "guest: $name" 'grep -q "VMRT-FS ok $name" "$work/console.log"'
done
check "host sees the guest's file" '[ "$(cat "$share/from-guest.txt" 2>/dev/null)" = "written by the guest" ]'
check "sha256 of the 100 MiB copy on the host" '[ "$(sha256sum <"$share/big-copy.bin" 2>/dev/null | cut -d" " -f1)" = "$big_sum" ]'
check "sha256 of the copy seen in the guest" 'grep -q "VMRT-FS sum $big_sum" "$work/console.log"'
check "host sees guest dirs" '[ -f "$share/d3/d2/f" ] && [ ! -e "$share/d1" ] && [ ! -e "$share/gone" ]'
check "no device node created" '[ ! -e "$share/chr" ] && [ ! -e "$share/blk" ]'
check "the host-placed disk node is still a block device (made: $host_disk_ok)" '[ "$host_disk_ok" = 1 ] && [ -b "$share/host-disk" ]'
check "outside file unchanged" '[ "$(sha256sum <"$outside/secret")" = "$secret_sum" ] && [ "$(stat -c %h "$outside/secret")" = 1 ]'
check "symlinks still point where they did" '[ "$(readlink "$share/abs-link")" = "$outside/secret" ]'

if [ "$failed" -gt 0 ]; then
  echo "--- console (last 40 lines)"; tail -n 40 "$work/console.log" 2>/dev/null
  echo "--- vmm log (last 20 lines)"; tail -n 20 "$work/vmm.log" 2>/dev/null
fi
echo "virtiofs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
