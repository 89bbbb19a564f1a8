//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! finds its vCPUs, the IOAPIC and the ISA interrupt routing.
//!
//! Layout at [`layout::EBDA_START`](crate::layout::EBDA_START): the 16-byte
//! MP floating pointer structure ("_MP_", MP spec §4.1), then the MP
//! configuration table ("PCMP", §4.2) with processor, bus, I/O APIC, I/O
//! interrupt assignment and local interrupt assignment entries (§4.3).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, LOW_MEM_END};

/// Number of IOAPIC input pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPEC_REV: u8 = 4;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many vCPUs for the EBDA area (or for the 8-bit APIC ID space).
    #[error("MP table: {0} vCPUs do not fit")]
    TooManyCpus(usize),
    /// Writing into guest memory failed.
    #[error("MP table: writing guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer + configuration table for `num_cpus` vCPUs
/// (APIC IDs 0..num_cpus, IOAPIC ID `num_cpus`), to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    let n = usize::from(num_cpus);
    let table_len =
        HEADER_LEN + n * CPU_ENTRY_LEN + SMALL_ENTRY_LEN * (2 + usize::from(IOAPIC_PINS) + 2);
    if n == 0 || num_cpus == u8::MAX || FLOATING_LEN + table_len > (LOW_MEM_END - base) as usize {
        return Err(Error::TooManyCpus(n));
    }
    let ioapic_id = num_cpus;
    let mut t = Vec::with_capacity(table_len);
    // Configuration table header; length and checksum patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(table_len as u16).to_le_bytes());
    t.push(MP_SPEC_REV);
    t.push(0); // checksum
    t.extend_from_slice(b"VMRT    "); // OEM ID
    t.extend_from_slice(b"VMRTMICROVM "); // product ID
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    let entries = n + 2 + usize::from(IOAPIC_PINS) + 2;
    t.extend_from_slice(&(entries as u16).to_le_bytes());
    t.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(t.len(), HEADER_LEN);
    // Processor entries (§4.3.1).
    for id in 0..num_cpus {
        t.push(0);
        t.push(id);
        t.push(APIC_VERSION);
        t.push(if id == 0 { 0x3 } else { 0x1 }); // EN, BP for the boot processor
        t.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        t.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        t.extend_from_slice(&[0; 8]);
    }
    // Bus entry (§4.3.2): bus 0 is ISA.
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    // I/O APIC entry (§4.3.3).
    t.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    // I/O interrupt assignments (§4.3.4): ISA IRQ i -> IOAPIC pin i, INT, conforming.
    for irq in 0..IOAPIC_PINS {
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // Local interrupt assignments (§4.3.5): ExtINT -> LINT0, NMI -> LINT1, all APICs.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    debug_assert_eq!(t.len(), table_len);
    t[7] = checksum(&t);

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MP_SPEC_REV);
    out.push(0); // checksum
    out.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    out[10] = checksum(&out);
    out.extend_from_slice(&t);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn setup<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), Error> {
    let table = build(num_cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        for cpus in [1u8, 2, 32] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "configuration table checksum");
            assert!(EBDA_START + t.len() as u64 <= LOW_MEM_END);
        }
    }

    #[test]
    fn contents() {
        let t = build(2, EBDA_START).unwrap();
        let cfg = &t[16..];
        let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()) as u64, APIC_ADDR);
        // Walk the entries.
        let mut off = HEADER_LEN;
        let (mut cpus, mut bsp, mut ioapics, mut intsrc, mut lint) = (vec![], 0, 0, 0, 0);
        for _ in 0..count {
            match cfg[off] {
                0 => {
                    cpus.push(cfg[off + 1]);
                    assert_eq!(cfg[off + 3] & 1, 1, "enabled");
                    bsp += usize::from(cfg[off + 3] & 2 != 0);
                    off += 20;
                }
                1 => {
                    assert_eq!(&cfg[off + 2..off + 8], b"ISA   ");
                    off += 8;
                }
                2 => {
                    assert_eq!(cfg[off + 1], 2, "IOAPIC ID after the CPUs");
                    assert_eq!(u32::from_le_bytes(cfg[off + 4..off + 8].try_into().unwrap()) as u64, IOAPIC_ADDR);
                    ioapics += 1;
                    off += 8;
                }
                3 => {
                    assert_eq!(cfg[off + 5], cfg[off + 7], "identity IRQ -> pin");
                    intsrc += 1;
                    off += 8;
                }
                4 => {
                    lint += 1;
                    off += 8;
                }
                x => panic!("unexpected entry type {x}"),
            }
        }
        assert_eq!(off, cfg.len());
        assert_eq!(cpus, vec![0, 1]);
        assert_eq!((bsp, ioapics, intsrc, lint), (1, 1, 24, 2));
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(matches!(build(0, EBDA_START), Err(Error::TooManyCpus(0))));
        assert!(matches!(build(255, EBDA_START), Err(Error::TooManyCpus(255))));
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
