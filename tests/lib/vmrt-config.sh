# Sourced by tests: writes a vmrt runtime config for the artifacts in build/
# and exports VMRT_CONFIG so the shim (started by containerd, which passes its
# environment on) reads it. VMRT_TEMPLATE=1 adds `[factory] template = true`
# with `template_dir` = VMRT_TEMPLATE_DIR (default build/templates).
vmrt_test_config() {
  local top out
  top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  out=${1:-$top/build/vmrt-test.toml}
  cat > "$out" <<TOML
[hypervisor]
path = "$top/target/x86_64-unknown-linux-gnu/release/vmrt-vmm"
kernel = "$top/build/vmlinux"
initrd = "$top/build/initramfs.cpio"
vcpus = 1
memory_mib = 256

[agent]
timeout_ms = ${VMRT_AGENT_TIMEOUT_MS:-60000}
log_level = "${VMRT_LOG_LEVEL:-info}"

[runtime]
log_level = "${VMRT_LOG_LEVEL:-info}"
TOML
  # VMRT_TEMPLATE=1: sandboxes start from a VM template (built by the first one)
  # kept in VMRT_TEMPLATE_DIR (at most 56 bytes: the template VM's socket path
  # must fit in sockaddr_un).
  if [ "${VMRT_TEMPLATE:-0}" = 1 ]; then
    cat >> "$out" <<TOML

[factory]
template = true
template_dir = "${VMRT_TEMPLATE_DIR:-$top/build/templates}"
TOML
  fi
  export VMRT_CONFIG=$out
}
