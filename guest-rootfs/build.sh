#!/usr/bin/env bash
# Builds the guest initramfs: a newc cpio whose /init is the statically linked
# vmrt-agent (stripped), plus the empty mount points the agent mounts itself
# (/proc /sys /dev /run /tmp /etc) and /dev/console (5,1) so the kernel can
# give /init its stdio before devtmpfs is mounted.
#
# Usage: guest-rootfs/build.sh [--debug] [--agent PATH] [-o OUTPUT]
#   --debug     also add Debian's busybox-static at /bin/busybox with every
#               applet symlinked (default output build/initramfs-debug.cpio)
#   --agent P   agent binary (default $VMRT_AGENT or
#               target/x86_64-unknown-linux-gnu/guest/vmrt-agent, the
#               size-optimized build of Cargo.toml's profile.guest)
#   -o OUTPUT   output path (default build/initramfs.cpio)
#
# The output is byte-for-byte reproducible: entries sorted, mtimes 0, owner
# 0:0, inode numbers assigned in order (cpio --reproducible).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
debug=0
agent="${VMRT_AGENT:-$repo/target/x86_64-unknown-linux-gnu/guest/vmrt-agent}"
out=""
busybox_bin="${VMRT_BUSYBOX:-/bin/busybox}"

die() { echo "guest-rootfs: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --debug) debug=1 ;;
    --agent) [ $# -ge 2 ] || die "--agent needs a path"; agent="$2"; shift ;;
    -o|--output) [ $# -ge 2 ] || die "-o needs a path"; out="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
if [ -z "$out" ]; then
  if [ "$debug" = 1 ]; then out="$repo/build/initramfs-debug.cpio"; else out="$repo/build/initramfs.cpio"; fi
fi

for tool in cpio file find sort strip; do
  command -v "$tool" >/dev/null || die "missing tool '$tool' (run tests/install-deps.sh)"
done

# The agent is /init: it must run with no dynamic loader and no libc in the guest.
is_static() {
  local desc
  desc="$(file -L "$1")"
  case "$desc" in
    *ELF*"statically linked"*|*ELF*"static-pie linked"*) return 0 ;;
    *) echo "guest-rootfs: $1 is not a static ELF: $desc" >&2; return 1 ;;
  esac
}
[ -f "$agent" ] || die "agent binary not found: $agent (build it: make rust)"
is_static "$agent" || die "refusing to use a dynamically linked /init"
if [ "$debug" = 1 ]; then
  [ -f "$busybox_bin" ] || die "busybox not found at $busybox_bin (apt-get install busybox-static)"
  is_static "$busybox_bin" || die "busybox must be busybox-static"
fi

stage="$(mktemp -d "${TMPDIR:-/tmp}/vmrt-initramfs.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

umask 022
mkdir -p "$stage"/{proc,sys,dev,run,tmp,etc}
chmod 1777 "$stage/tmp"
chmod 0755 "$stage"/{proc,sys,dev,run,etc}
# Without its symbol tables: every byte of /init stays in the guest's RAM (the
# initramfs is unpacked into tmpfs) and is copied at each boot. The unstripped
# binary in target/ symbolizes addresses from the guest.
install -m 0755 "$agent" "$stage/init"
strip --strip-all "$stage/init" || die "strip failed on $stage/init"
mknod -m 0600 "$stage/dev/console" c 5 1 || die "mknod /dev/console failed (needs root or CAP_MKNOD)"

if [ "$debug" = 1 ]; then
  mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin}
  install -m 0755 "$busybox_bin" "$stage/bin/busybox"
  # Applet paths are relative (bin/sh, usr/bin/env, linuxrc, ...).
  while IFS= read -r applet; do
    case "$applet" in ''|*..*|/*) continue ;; esac
    [ -e "$stage/$applet" ] || [ -L "$stage/$applet" ] && continue
    mkdir -p "$stage/$(dirname "$applet")"
    ln -s /bin/busybox "$stage/$applet"
  done <<<"$("$busybox_bin" --list-full | LC_ALL=C sort)"
fi

# Fixed metadata for reproducibility (symlinks themselves too: -h).
find "$stage" -exec touch -h -d @0 {} +

mkdir -p "$(dirname "$out")"
tmp_out="$out.tmp.$$"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | \
  cpio --quiet -o -H newc --reproducible -R 0:0 >"$tmp_out") || { rm -f "$tmp_out"; die "cpio failed"; }
mv -f "$tmp_out" "$out"
echo "guest-rootfs: wrote $out ($(stat -c %s "$out") bytes, $(cpio -it <"$out" 2>/dev/null | wc -l) entries, sha256 $(sha256sum "$out" | cut -c1-16))"
