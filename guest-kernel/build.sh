#!/usr/bin/env bash
# Build the vmrt guest kernel: an uncompressed x86_64 `vmlinux` with the PVH
# entry point, from `make tinyconfig` + guest-kernel/microvm.config.
#
# Outputs: build/vmlinux, build/vmlinux.config (repo root relative), and
#          build/bzImage (the same kernel compressed, for the VMM's bzImage
#          boot path test).
# Source:  $KERNEL_SRC (an unpacked tree) or Debian's
#          /usr/src/linux-source-6.1.tar.xz (package linux-source-6.1).
# Cache:   ${VMRT_CACHE:-$HOME/.cache/vmrt}/kernel/<key>/{vmlinux,bzImage,config,build.log}
#          where <key> = sha256(fragment + source version + this script).
# Env:     JOBS (default nproc), KERNEL_SRC, VMRT_CACHE, PROGRESS_EVERY (objects).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
fragment=$here/microvm.config
cache_root=${VMRT_CACHE:-$HOME/.cache/vmrt}/kernel
jobs=${JOBS:-$(nproc)}
progress_every=${PROGRESS_EVERY:-250}
tarball=/usr/src/linux-source-6.1.tar.xz
out_dir=$root/build

log() { echo "guest-kernel: $*" >&2; }
die() { echo "guest-kernel: ERROR: $*" >&2; exit 1; }

# Options that must be =y after olddefconfig, and options that must be unset.
required_y=(64BIT SMP PVH HYPERVISOR_GUEST PARAVIRT KVM_GUEST PRINTK TTY SERIAL_8250
  SERIAL_8250_CONSOLE BINFMT_ELF BINFMT_SCRIPT BLK_DEV_INITRD DEVTMPFS DEVTMPFS_MOUNT
  TMPFS PROC_FS PROC_PAGE_MONITOR SYSFS FUTEX EPOLL SIGNALFD TIMERFD EVENTFD SHMEM FILE_LOCKING MULTIUSER
  POSIX_TIMERS UNIX98_PTYS SYSVIPC POSIX_MQUEUE VIRTIO VIRTIO_MMIO
  VIRTIO_MMIO_CMDLINE_DEVICES NET UNIX INET VSOCKETS VIRTIO_VSOCKETS FUSE_FS VIRTIO_FS
  OVERLAY_FS BLOCK VIRTIO_BLK EXT4_FS NETDEVICES VIRTIO_NET NAMESPACES UTS_NS IPC_NS
  PID_NS NET_NS USER_NS CGROUP_NS CGROUPS MEMCG CGROUP_PIDS CGROUP_SCHED FAIR_GROUP_SCHED
  CFS_BANDWIDTH CPUSETS CGROUP_FREEZER BLK_CGROUP CGROUP_DEVICE SECCOMP SECCOMP_FILTER
  KEYS BPF_SYSCALL CGROUP_BPF X86_IOPL_IOPERM)
required_unset=(MODULES PCI ACPI)
# Required features that some kernel versions build unconditionally with
# another option: checked through that option when the symbol itself does not
# exist in the tree's Kconfig (cgroup namespaces: part of CGROUPS since 4.6).
declare -A implied_by=([CGROUP_NS]=CGROUPS)

[ -f "$fragment" ] || die "missing config fragment $fragment"

# ---- source version (part of the cache key) ----
if [ -n "${KERNEL_SRC:-}" ]; then
  [ -f "$KERNEL_SRC/Makefile" ] || die "KERNEL_SRC=$KERNEL_SRC is not a kernel tree"
  src_version="tree:$(readlink -f "$KERNEL_SRC"):$(make -s -C "$KERNEL_SRC" kernelversion 2>/dev/null)"
  if git -C "$KERNEL_SRC" rev-parse HEAD >/dev/null 2>&1; then
    src_version+=":$(git -C "$KERNEL_SRC" rev-parse HEAD)"
  fi
else
  [ -f "$tarball" ] || die "$tarball not found: apt-get install linux-source-6.1, or set KERNEL_SRC"
  pkg_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || echo unknown)
  src_version="deb:linux-source-6.1:$pkg_version:$(stat -c '%s:%Y' "$tarball")"
fi

key=$( { cat "$fragment"; echo "$src_version"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-64)
cache=$cache_root/$key
mkdir -p "$cache_root" "$out_dir"

install_outputs() {
  cp -f "$cache/vmlinux" "$out_dir/vmlinux.tmp" && mv -f "$out_dir/vmlinux.tmp" "$out_dir/vmlinux"
  cp -f "$cache/bzImage" "$out_dir/bzImage.tmp" && mv -f "$out_dir/bzImage.tmp" "$out_dir/bzImage"
  cp -f "$cache/config" "$out_dir/vmlinux.config"
  log "build/vmlinux ($(du -h "$out_dir/vmlinux" | cut -f1)), build/bzImage ($(du -h "$out_dir/bzImage" | cut -f1)) and build/vmlinux.config ready (cache $cache)"
}

# Serialise concurrent builds of the same key.
exec 9>"$cache_root/$key.lock"
flock 9

if [ -f "$cache/done" ] && [ -f "$cache/vmlinux" ] && [ -f "$cache/bzImage" ] && [ -f "$cache/config" ]; then
  log "cached kernel $key"
  install_outputs
  exit 0
fi

mkdir -p "$cache"
buildlog=$cache/build.log
: >"$buildlog"
start=$(date +%s)

# ---- source tree ----
if [ -n "${KERNEL_SRC:-}" ]; then
  src=$(readlink -f "$KERNEL_SRC")
else
  src_parent=$cache_root/src-${pkg_version//[^A-Za-z0-9.+-]/_}
  src=$src_parent/linux-source-6.1
  if [ ! -f "$src_parent/.unpacked" ]; then
    log "unpacking $tarball (~30 s)"
    rm -rf "$src_parent"; mkdir -p "$src_parent"
    tar -xJf "$tarball" -C "$src_parent"
    touch "$src_parent/.unpacked"
  fi
fi
obj=$cache/obj
mkdir -p "$obj"

# ---- configuration ----
log "configuring: tinyconfig + $(basename "$fragment") (source $src_version)"
{
  make -C "$src" O="$obj" tinyconfig
  (cd "$src" && scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$fragment")
  make -C "$src" O="$obj" olddefconfig
} >>"$buildlog" 2>&1 || { tail -n 40 "$buildlog" >&2; die "configuration failed (full log: $buildlog)"; }

missing=()
for o in "${required_y[@]}"; do
  if [ -n "${implied_by[$o]:-}" ] && ! grep -rqx --include='Kconfig*' "config $o" "$src"; then
    grep -qx "CONFIG_${implied_by[$o]}=y" "$obj/.config" \
      || missing+=("CONFIG_$o (no such symbol in this tree; needs CONFIG_${implied_by[$o]}=y)")
    continue
  fi
  grep -qx "CONFIG_$o=y" "$obj/.config" || missing+=("CONFIG_$o (want y, got: $(grep -E "^(# )?CONFIG_$o[= ]" "$obj/.config" || echo absent))")
done
for o in "${required_unset[@]}"; do
  if grep -qE "^CONFIG_$o=[ym]" "$obj/.config"; then missing+=("CONFIG_$o (want unset, got: $(grep -E "^CONFIG_$o=" "$obj/.config"))"); fi
done
total=$(( ${#required_y[@]} + ${#required_unset[@]} ))
log "option check: $(( total - ${#missing[@]} ))/$total required options set"
if [ ${#missing[@]} -gt 0 ]; then
  printf 'guest-kernel:   missing %s\n' "${missing[@]}" >&2
  die "required kernel options did not survive olddefconfig (config: $obj/.config)"
fi
# Non-required fragment lines that did not survive: warn only.
while IFS= read -r line; do
  case $line in
    CONFIG_*=*) name=${line%%=*} ;;
    "# CONFIG_"*" is not set") name=${line#\# }; name=${name%% *} ;;
    *) continue ;;
  esac
  actual=$(grep -E "^(# )?$name[= ]" "$obj/.config" || true)
  if [ "$actual" != "$line" ]; then
    log "note: fragment asks '$line', final config has '${actual:-absent}'"
  fi
done <"$fragment"

# ---- build ----
log "building vmlinux with -j$jobs (log: $buildlog)"
set +e
make -C "$src" O="$obj" -j"$jobs" vmlinux 2>&1 | tee -a "$buildlog" \
  | awk -v every="$progress_every" -v start="$start" '
      /^  (CC|AS|LD|AR)  / { n++; if (n % every == 0) {
          cmd = "date +%s"; cmd | getline now; close(cmd)
          printf "guest-kernel:   %d objects built, %d s elapsed\n", n, now - start > "/dev/stderr"
          fflush("/dev/stderr") } }
      END { printf "guest-kernel:   %d objects built in total\n", n > "/dev/stderr" }'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  tail -n 60 "$buildlog" >&2
  die "make vmlinux failed (exit $rc); full log: $buildlog"
fi

# ---- verify the PVH entry note (Xen ELF note type 18 = XEN_ELFNOTE_PHYS32_ENTRY) ----
notes=$(readelf -n "$obj/vmlinux")
if ! echo "$notes" | grep -qE '^\s*Xen\s.*(PHYS32_ENTRY|\(0x00000012\))'; then
  echo "$notes" >&2
  die "vmlinux has no Xen PHYS32_ENTRY ELF note: PVH boot is impossible (is CONFIG_PVH set?)"
fi
log "PVH entry note (Xen PHYS32_ENTRY) present"

# ---- bzImage: the same kernel, compressed (reuses vmlinux; ~30 s) ----
log "building bzImage"
make -C "$src" O="$obj" -j"$jobs" bzImage >>"$buildlog" 2>&1 \
  || { tail -n 40 "$buildlog" >&2; die "make bzImage failed; full log: $buildlog"; }
cp -f "$obj/arch/x86/boot/bzImage" "$cache/bzImage"

cp -f "$obj/vmlinux" "$cache/vmlinux"
cp -f "$obj/.config" "$cache/config"
cp -f "$fragment" "$cache/fragment"
touch "$cache/done"
log "kernel built in $(( $(date +%s) - start )) s"
install_outputs
