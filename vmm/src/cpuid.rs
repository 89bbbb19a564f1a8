//! Per-vCPU CPUID: `KVM_GET_SUPPORTED_CPUID` normalized so that each vCPU
//! sees a consistent topology of one package with `count` cores and one
//! thread per core (Intel SDM Vol. 2A "CPUID"; AMD APM Vol. 3 App. E).
//!
//! The KVM paravirtual leaves (0x4000_0000..=0x4000_00ff: signature
//! "KVMKVMKVM", KVM features) are left exactly as KVM reports them: guests
//! (including PVM-enabled ones) detect their hypervisor through them.
//!
//! Everything here is a pure function over `kvm_cpuid_entry2` slices.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (the logical processor count in EBX is valid).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bit 24: TSC-deadline mode of the local APIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x8000_0001 ECX bit 1: CmpLegacy (multi-core, AMD).
pub const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Processor vendor from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" (or "HygonGenuine").
    Amd,
    /// Anything else.
    Other,
}

/// Reads the vendor string of leaf 0 (EBX, EDX, ECX).
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&e.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&e.edx.to_le_bytes());
    s[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    match &s {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Announces the TSC-deadline timer (leaf 1 ECX bit 24). KVM emulates it
/// when it has `KVM_CAP_TSC_DEADLINE_TIMER` but never reports the bit in
/// `KVM_GET_SUPPORTED_CPUID` (Linux `Documentation/virt/kvm/api.rst`); the
/// VMM sets it. Without it a Linux guest calibrates the LAPIC timer against
/// the PIT at boot, a 100 ms wait (`LAPIC_CAL_LOOPS`).
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Bits needed to number `count` items (ceil(log2(count))), 0 for count <= 1.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Normalizes `entries` (a copy of the supported CPUID) for vCPU `cpu_id`
/// of `count` vCPUs. The APIC ID of vCPU `i` is `i`.
///
/// * leaf 0x1: EBX[31:24] = APIC ID, EBX[23:16] = `count`, EDX.HTT set when
///   `count > 1`, ECX.hypervisor set;
/// * leaf 0x4 (Intel deterministic cache): L1/L2 shared by 1 thread, L3 by
///   all cores; EAX[31:26] = cores per package - 1;
/// * leaves 0xb / 0x1f (x2APIC topology): SMT level of 1 thread, core level
///   of `count` cores, EDX = x2APIC ID on every subleaf;
/// * leaf 0x8000_0001 ECX.CmpLegacy, 0x8000_0008 ECX (AMD core count),
///   0x8000_001d (AMD cache topology), 0x8000_001e (AMD extended APIC ID);
/// * leaves 0x4000_0000.. untouched.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, count: u8) {
    let apic_id = u32::from(cpu_id);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    let is_amd = vendor(entries) == Vendor::Amd;
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                let level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax &= !(0xfff << 14 | 0x3f << 26);
                e.eax |= (sharing.min(0xfff) << 14) | ((count - 1).min(0x3f) << 26);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: all vCPUs in one package.
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        // Invalid level: ends the enumeration.
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 if is_amd => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if is_amd => {
                // ECX[15:12] ApicIdCoreIdSize, ECX[7:0] NC = cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits.max(1) << 12) | ((count - 1) & 0xff);
            }
            0x8000_001d => {
                if e.eax & 0x1f == 0 {
                    continue;
                }
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing.min(0xfff) << 14);
            }
            0x8000_001e if is_amd => {
                // Extended APIC ID; compute unit = core, 1 thread per unit; node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags: 0, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "GenuineIntel": EBX "Genu", EDX "ineI", ECX "ntel".
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x000906ea, 0xff0f_0800, 0x7ffa_fbff, 0xbfeb_fbff & !LEAF1_EDX_HTT),
            entry(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0), // L1d
            entry(4, 1, 0x1c00_4122, 0x01c0_003f, 0x3f, 0), // L1i
            entry(4, 2, 0x1c00_4143, 0x03c0_003f, 0x3ff, 0), // L2
            entry(4, 3, 0x1c03_c163, 0x03c0_003f, 0x3fff, 6), // L3
            entry(4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
        ]
    }

    #[test]
    fn leaf1_topology_and_hypervisor_bit() {
        for (cpu, count) in [(0u8, 1u8), (1, 2), (5, 8)] {
            let mut e = intel();
            normalize(&mut e, cpu, count);
            let l1 = find(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(cpu));
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, count > 1);
        }
    }

    #[test]
    fn cache_leaves_one_thread_per_core() {
        let mut e = intel();
        normalize(&mut e, 0, 4);
        for i in 0..3 {
            let l = find(&e, 4, i);
            assert_eq!((l.eax >> 14) & 0xfff, 0, "L1/L2 subleaf {i} private to a core");
            assert_eq!(l.eax >> 26, 3, "4 cores per package");
            assert_eq!(l.eax & 0x3fff, intel()[2 + i as usize].eax & 0x3fff, "type/level kept");
        }
        let l3 = find(&e, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by 4 cores");
        assert_eq!(find(&e, 4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn x2apic_topology() {
        let mut e = intel();
        normalize(&mut e, 2, 3);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx >> 8, end.edx), (0, 0, 0, 2));
    }

    #[test]
    fn tsc_deadline_bit_is_set_on_leaf_1_only() {
        let mut e = intel();
        let before: Vec<_> = e.iter().map(|x| (x.function, x.index, x.eax, x.ebx, x.ecx, x.edx)).collect();
        enable_tsc_deadline(&mut e);
        for (x, b) in e.iter().zip(before) {
            if x.function == 1 {
                assert_eq!(x.ecx, b.4 | LEAF1_ECX_TSC_DEADLINE);
                assert_eq!((x.eax, x.ebx, x.edx), (b.2, b.3, b.5));
            } else {
                assert_eq!((x.function, x.index, x.eax, x.ebx, x.ecx, x.edx), b);
            }
        }
    }

    #[test]
    fn kvm_leaves_untouched() {
        let orig = intel();
        let mut e = intel();
        normalize(&mut e, 3, 4);
        for f in [0x4000_0000, 0x4000_0001, 0] {
            assert_eq!(find(&e, f, 0), find(&orig, f, 0));
        }
    }

    #[test]
    fn amd_leaves() {
        let mut e = vec![
            // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
            entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x00a00f11, 0x0008_0800, 0x7ed8_320b, 0x178b_fbff),
            entry(0x8000_0001, 0, 0, 0, 0x7583_f3ff, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0x0000_703f, 0),
            entry(0x8000_001d, 0, 0x0000_4121, 0, 0, 0),
            entry(0x8000_001d, 3, 0x0003_c163, 0, 0, 0),
            entry(0x8000_001e, 0, 9, 0x100, 0x300, 0),
        ];
        assert_eq!(vendor(&e), Vendor::Amd);
        normalize(&mut e, 1, 2);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
        let l8 = find(&e, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 1);
        assert_eq!((l8.ecx >> 12) & 0xf, 1);
        assert_eq!((find(&e, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 0x8000_001d, 3).eax >> 14) & 0xfff, 1);
        let l1e = find(&e, 0x8000_001e, 0);
        assert_eq!((l1e.eax, l1e.ebx, l1e.ecx), (1, 1, 0));
        let mut single = e.clone();
        normalize(&mut single, 0, 1);
        assert_eq!(find(&single, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(32), 5);
        assert_eq!(id_bits(33), 6);
    }
}
