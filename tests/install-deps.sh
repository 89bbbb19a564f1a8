#!/usr/bin/env bash
# Installs the Debian packages vmrt's build, tests and demo need. Idempotent:
# when every package is already installed it touches nothing (no apt-get update).
set -euo pipefail

packages=(
  # build
  build-essential pkg-config protobuf-compiler libseccomp-dev file cpio xz-utils
  # guest kernel
  linux-source-6.1 flex bison bc libelf-dev libssl-dev
  # runner VM and the QEMU baseline
  qemu-system-x86
  # containerd harness, runc baseline, test images
  containerd runc busybox-static python3 jq
  # runner VM initramfs (depmod), the suites (pgrep, script)
  kmod procps bsdutils
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#packages[@]} Debian packages present"
  exit 0
fi
echo "deps: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "deps: need root to install packages (run as root or: sudo make deps)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
