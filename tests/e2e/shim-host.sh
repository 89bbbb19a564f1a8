#!/usr/bin/env bash
# containerd-shim-vmrt-v2 failures that need no guest, on the host itself through the
# private containerd of tests/lib/containerd.sh: each Create below must fail with a
# clear error and leave no shim, VMM, sandbox directory or mount behind.
#  - a vmrt config with an unknown key;
#  - a missing guest kernel;
#  - on a kvm-pvm host (/sys/module/kvm_pvm), a guest kernel not declared PVM-enabled
#    (the shim refuses instead of hanging in an emulated boot; `vmrt check` explains).
# Needs: target/.../release/{containerd-shim-vmrt-v2,vmrt-vmm}, build/vmlinux,
# build/initramfs.cpio, build/busybox-test.oci.tar.
# Closing line: `shim-host: N passed, M failed`; exit status 0 iff M = 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/lib/containerd.sh
. tests/lib/vmrt-config.sh
. tests/lib/shim-e2e.sh

T=${CTRD_OP_TIMEOUT:-60}

require_artifacts shim-host
tmp=$(mktemp -d /tmp/vmrt-shim-host.XXXXXX)
vmrt_test_config "$tmp/good.toml"
ctrd_start || { bad "containerd start"; finish shim-host; }
ctrd_import build/busybox-test.oci.tar || { bad "image import"; finish shim-host; }

# expect_create_fails NAME CONFIG PATTERN...: `ctr run` with CONFIG fails, its output
# contains every PATTERN, and nothing of the sandbox is left afterwards.
expect_create_fails() {
  local name=$1 cfg=$2; shift 2
  local t0=$SECONDS out rc missing=""
  out=$(ctr_timeout "$T" run --rm "${RT[@]}" --runtime-config-path "$cfg" "$IMG" "$name" true 2>&1); rc=$?
  local took=$((SECONDS - t0))
  for p in "$@"; do [[ $out == *"$p"* ]] || missing+="'$p' "; done
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ -z "$missing" ]; then
    ok "$name: Create fails in ${took} s with: $(grep -m1 -o 'vmrt config.*\|refusing.*' <<<"$out" | head -c 160)"
  else
    bad "$name" "rc=$rc missing ${missing:-nothing}; out=$(head -c 600 <<<"$out")"; diag
  fi
  cleanup_c "$name"
  local l; l=$(settled_leftovers "$name")
  [ -z "$l" ] && ok "$name: nothing left behind" || bad "$name: leftovers" "$l"
}

sed 's|^\[agent\]|[agent]\nno_such_key = 1|' "$tmp/good.toml" > "$tmp/unknown-key.toml"
expect_create_fails badkey "$tmp/unknown-key.toml" "invalid vmrt config" "no_such_key"

sed 's|^kernel = .*|kernel = "/nonexistent/vmlinux-missing"|' "$tmp/good.toml" > "$tmp/no-kernel.toml"
expect_create_fails nokernel "$tmp/no-kernel.toml" "hypervisor.kernel" "/nonexistent/vmlinux-missing"

if [ -d /sys/module/kvm_pvm ]; then
  expect_create_fails pvmhost "$tmp/good.toml" "kvm-pvm" "CONFIG_PVM_GUEST" "pvm_guest = true"
else
  echo "skip - pvmhost: not a kvm-pvm host (/sys/module/kvm_pvm absent)"
fi

ctrd_stop || bad "ctrd_stop clean" "the harness had to clean up after the shim"
rm -rf "$tmp"
finish shim-host
