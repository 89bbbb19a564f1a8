//! Facts about the host's KVM that the VMM, the shim and `vmrt check` agree on.
//!
//! kvm-pvm (`/sys/module/kvm_pvm`) provides `/dev/kvm` without VMX/SVM: the guest kernel
//! runs in user mode and its kernel mode is emulated. A guest kernel built with
//! `CONFIG_PVM_GUEST=y` runs there at usable speed; a stock kernel does not.

use std::path::Path;

/// Where the kernel lists loaded modules.
pub const SYS_MODULE: &str = "/sys/module";

/// Why a stock guest kernel cannot be used on a kvm-pvm host, and what to do. `vmrt
/// check` prints it and the shim fails Create with it.
pub const PVM_EXPLANATION: &str = "this host's /dev/kvm is kvm-pvm (no hardware \
virtualization): a stock guest kernel boots only with its kernel mode emulated, unusably \
slowly, and the emulation stops on XRSTOR, INT3, POPCNT and CLAC; a PVM-enabled guest \
kernel (CONFIG_PVM_GUEST=y) is required, declared with `pvm_guest = true` under \
[hypervisor] in the vmrt config";

/// Whether `/dev/kvm` is provided by kvm-pvm: the `kvm_pvm` module is listed under
/// `sys_module` (normally [`SYS_MODULE`]).
pub fn is_kvm_pvm(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_pvm_is_the_module_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_kvm_pvm(d.path()));
        std::fs::create_dir(d.path().join("kvm_pvm")).unwrap();
        assert!(is_kvm_pvm(d.path()));
    }
}
