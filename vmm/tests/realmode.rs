//! Integration tests on the real /dev/kvm: tiny hand-assembled real-mode
//! payloads (16-bit machine code, bytes commented with their assembly) run
//! through `build_and_run`, exercising the vCPU exit paths: port I/O to the
//! 8250 and unhandled ports, MMIO to unbacked addresses, the i8042 reset and a
//! triple fault.

use std::path::Path;

use vmm::config::{SerialConfig, VmResources};
use vmm::ExitReason;

/// Load/entry address of every payload.
const LOAD: u64 = 0x1000;

fn run(bytes: Vec<u8>, dir: &Path) -> (ExitReason, Vec<u8>) {
    run_smp(bytes, 1, dir)
}

/// Runs `bytes` on vCPU 0 of a VM with `vcpus` vCPUs (the others wait for
/// INIT/SIPI).
fn run_smp(bytes: Vec<u8>, vcpus: u32, dir: &Path) -> (ExitReason, Vec<u8>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let console = dir.join("console.log");
    let res = VmResources::real_mode(bytes, LOAD, 64, SerialConfig::File { path: console.clone() })
        .and_then(|r| r.with_vcpus(vcpus))
        .unwrap();
    let reason = vmm::build_and_run(res).expect("VM builds and runs");
    let out = std::fs::read(&console).unwrap_or_default();
    (reason, out)
}

/// `mov al, b; out dx, al` for each byte (dx must hold 0x3f8).
fn print(s: &[u8]) -> Vec<u8> {
    s.iter().flat_map(|b| [0xb0, *b, 0xee]).collect()
}

/// `mov al, 0xfe; out 0x64, al` (i8042 pulse reset line), then `hlt; jmp $-1`.
const RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

#[test]
fn hello_on_serial_then_i8042_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend(print(b"hello\n"));
    code.extend(RESET);
    let (reason, out) = run(code, dir.path());
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(out, b"hello\n");
}

/// Real-mode prologue switching to 32-bit protected mode with flat code
/// (0x08) and data (0x10) segments; the GDT and GDTR live at payload offset
/// 0x100 (see [`finish_pm`]). Returns the code so far; 32-bit code follows.
fn enter_pm(mut c: Vec<u8>) -> Vec<u8> {
    c.extend([
        0xfa, //             cli
        0x0f, 0x01, 0x16, 0x18, 0x11, // lgdt [0x1118]
        0x0f, 0x20, 0xc0, // mov eax, cr0
        0x66, 0x83, 0xc8, 0x01, // or eax, 1
        0x0f, 0x22, 0xc0, // mov cr0, eax
    ]);
    let pm32 = LOAD + c.len() as u64 + 8;
    c.extend([0x66, 0xea]); // jmp dword 0x08:pm32
    c.extend((pm32 as u32).to_le_bytes());
    c.extend([0x08, 0x00]);
    c.extend([
        0x66, 0xb8, 0x10, 0x00, // mov ax, 0x10
        0x8e, 0xd8, //             mov ds, ax
        0x8e, 0xd0, //             mov ss, ax
    ]);
    c
}

/// Pads the code to 0x100 and appends the GDT (0x1100: null, flat 32-bit
/// code, flat data), the GDTR (0x1118: limit 0x17, base 0x1100) and an
/// empty IDTR (0x1120: limit 0, base 0).
fn finish_pm(mut c: Vec<u8>) -> Vec<u8> {
    assert!(c.len() <= 0x100);
    c.resize(0x100, 0x90);
    c.extend(0u64.to_le_bytes());
    c.extend(0x00cf_9a00_0000_ffffu64.to_le_bytes());
    c.extend(0x00cf_9200_0000_ffffu64.to_le_bytes());
    c.extend(0x17u16.to_le_bytes());
    c.extend(0x1100u32.to_le_bytes());
    c.extend([0u8; 2]);
    c.extend([0u8; 6]);
    c
}

#[test]
fn port_and_mmio_exits() {
    let dir = tempfile::tempdir().unwrap();
    let c: Vec<u8> = vec![
        0xba, 0x34, 0x12, // mov dx, 0x1234      ; no device there
        0xec, //             in al, dx           ; -> 0xff
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, //             out dx, al          ; print 0xff
        0xe4, 0x64, //       in al, 0x64         ; i8042 status -> 0x04 (SYS)
        0xee, //             out dx, al
        0xe6, 0x80, //       out 0x80, al        ; POST debug port, ignored
        0xe6, 0xed, //       out 0xed, al        ; delay port, ignored
        0xb0, 0x20, //       mov al, 0x20
        0xe6, 0x70, //       out 0x70, al        ; unhandled write (CMOS index)
    ];
    // 32-bit protected mode reaches the MMIO gap and addresses past RAM.
    let mut c = enter_pm(c);
    c.extend([
        0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]   ; virtio slot 0, empty -> all-ones
        0x89, 0xc3, //             mov ebx, eax
        0xc7, 0x05, 0x00, 0x00, 0x00, 0xd0, 0x78, 0x56, 0x34, 0x12, // mov dword [0xd0000000], 0x12345678 ; ignored
        0x8b, 0x0d, 0xf0, 0xff, 0xff, 0x07, // mov ecx, [0x07fffff0]  ; past the 64 MiB of RAM -> MMIO, all-ones
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x88, 0xd8, 0xee, //       mov al, bl ; out dx, al
        0xc1, 0xeb, 0x08, //       shr ebx, 8
        0x88, 0xd8, 0xee, //       mov al, bl ; out dx, al
        0x88, 0xc8, 0xee, //       mov al, cl ; out dx, al
        0xb0, 0x0a, 0xee, //       mov al, '\n' ; out dx, al
    ]);
    c.extend(RESET);
    let (reason, out) = run(finish_pm(c), dir.path());
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(out, [0xff, 0x04, 0xff, 0xff, 0xff, b'\n']);
}

/// Protected-mode code that loads an empty IDT and executes `ud2`.
fn triple_fault_payload() -> Vec<u8> {
    // KVM's real-mode interrupt delivery reads the IVT without checking the
    // IDT limit, so the fault is raised in protected mode, where an empty
    // IDT turns #UD into #GP, #DF and then a triple fault (shutdown).
    let mut c = enter_pm(Vec::new());
    c.extend([
        0x0f, 0x01, 0x1d, 0x20, 0x11, 0x00, 0x00, // lidt [0x1120]  ; limit 0: no vectors
        0x0f, 0x0b, //                              ud2
        0xf4, //                                    hlt (not reached)
    ]);
    finish_pm(c)
}

#[test]
fn ud2_without_idt_is_a_triple_fault() {
    let dir = tempfile::tempdir().unwrap();
    let (reason, out) = run(triple_fault_payload(), dir.path());
    assert_eq!(reason, ExitReason::TripleFault);
    assert_eq!(reason.exit_code(), 2);
    assert!(out.is_empty());
}

/// vCPU 0 wakes the other vCPUs (INIT, then SIPI to 0x2000, where they loop
/// on `out 0x80, al`: an exit to the VMM each time), lets them run, then
/// triple-faults.
fn smp_triple_fault_payload() -> Vec<u8> {
    let delay = [0xb9, 0x00, 0x10, 0x00, 0x00, 0x49, 0x75, 0xfd]; // mov ecx, 0x1000; dec ecx; jnz $-1
    let mut c = enter_pm(Vec::new());
    c.extend([0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe, 0x00, 0x45, 0x0c, 0x00]); // ICR = INIT, all but self
    c.extend(delay);
    c.extend([0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe, 0x02, 0x46, 0x0c, 0x00]); // ICR = SIPI vector 2 (0x2000)
    c.extend(delay);
    c.extend(delay);
    c.extend([
        0x0f, 0x01, 0x1d, 0x20, 0x11, 0x00, 0x00, // lidt [0x1120]  ; limit 0: no vectors
        0x0f, 0x0b, //                              ud2
    ]);
    let mut c = finish_pm(c);
    c.resize(0x1000, 0x90);
    c.extend([0xe6, 0x80, 0xeb, 0xfc]); // 0x2000: out 0x80, al; jmp $-2
    c
}

#[test]
fn triple_fault_on_an_smp_guest_is_never_reported_as_a_stop() {
    // The other vCPUs exit to the VMM all the time; once vCPU 0's triple
    // fault stops the VM they leave with `Stopped`, which must never replace
    // the cause. Repeated because the ordering it guards against is a race.
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let (reason, _) = run_smp(smp_triple_fault_payload(), 4, dir.path());
        assert_eq!(reason, ExitReason::TripleFault, "round {round}");
        assert_eq!(reason.exit_code(), 2, "round {round}");
    }
}
