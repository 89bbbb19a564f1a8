//! VM templates on the real /dev/kvm (`vmm::snapshot`): a real-mode payload
//! prints, keeps a value in a register and one in memory, asks for its
//! snapshot (a 32-bit `out` of "SNAP" to port 0x5e0), then prints again and
//! checks both values. The template VM must stop at the request and write
//! the template; a VM restored from it must resume after the `out` with the
//! register and the memory as they were, and never run the code before it.

use std::path::Path;

use vmm::config::{SerialConfig, SnapshotConfig, SnapshotMode, VmResources};
use vmm::snapshot::{MEMORY_FILE, REQUEST_MAGIC, REQUEST_PORT, STATE_FILE};
use vmm::ExitReason;

const LOAD: u64 = 0x1000;

/// `mov al, b; out dx, al` for each byte (dx must hold 0x3f8).
fn print(s: &[u8]) -> Vec<u8> {
    s.iter().flat_map(|b| [0xb0, *b, 0xee]).collect()
}

fn payload() -> Vec<u8> {
    let mut c = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend(print(b"A"));
    c.extend([0xbb, 0x34, 0x12]); // mov bx, 0x1234
    c.extend([0xc7, 0x06, 0x00, 0x20, 0x78, 0x56]); // mov word [0x2000], 0x5678
    c.extend([0xba]); // mov dx, REQUEST_PORT
    c.extend(REQUEST_PORT.to_le_bytes());
    c.extend([0x66, 0xb8]); // mov eax, REQUEST_MAGIC
    c.extend(REQUEST_MAGIC.to_le_bytes());
    c.extend([0x66, 0xef]); // out dx, eax
    c.extend([0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend(print(b"B"));
    c.extend([0x81, 0xfb, 0x34, 0x12, 0x75, 0x03]); // cmp bx, 0x1234; jne +3
    c.extend(print(b"r"));
    c.extend([0x81, 0x3e, 0x00, 0x20, 0x78, 0x56, 0x75, 0x03]); // cmp word [0x2000], 0x5678; jne +3
    c.extend(print(b"m"));
    c.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]); // i8042 reset; hlt; jmp $-1
    c
}

fn run(vcpus: u32, snapshot: Option<SnapshotConfig>, console: &Path) -> Result<ExitReason, vmm::builder::Error> {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut res = VmResources::real_mode(payload(), LOAD, 64, SerialConfig::File { path: console.to_path_buf() })
        .and_then(|r| r.with_vcpus(vcpus))
        .unwrap();
    if let Some(s) = snapshot {
        res = res.with_snapshot(s).unwrap();
    }
    vmm::build_and_run(res)
}

#[test]
fn a_restored_vm_resumes_after_the_request_with_its_registers_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template");
    std::fs::create_dir(&template).unwrap();
    let mode = |mode| Some(SnapshotConfig { mode, dir: template.clone() });

    let reason = run(1, mode(SnapshotMode::Template), &dir.path().join("template.log")).unwrap();
    assert_eq!(reason, ExitReason::Snapshotted);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(std::fs::read(dir.path().join("template.log")).unwrap(), b"A");
    assert!(template.join(STATE_FILE).is_file());
    assert_eq!(std::fs::metadata(template.join(MEMORY_FILE)).unwrap().len(), 64 << 20);

    // Twice from the same template: it is only read.
    for n in 0..2 {
        let log = dir.path().join(format!("restored-{n}.log"));
        let reason = run(1, mode(SnapshotMode::Restore), &log).unwrap();
        assert_eq!(reason, ExitReason::Reset);
        assert_eq!(std::fs::read(&log).unwrap(), b"Brm", "restore {n}");
    }

    // Another machine is refused before anything runs.
    let err = run(2, mode(SnapshotMode::Restore), &dir.path().join("other.log")).unwrap_err();
    assert!(err.to_string().contains("1 vCPUs in the template, 2 configured"), "{err}");
}

#[test]
fn a_template_with_a_waiting_application_processor_restores() {
    // vCPU 1 waits for INIT/SIPI in KVM (mp_state) when the template is taken.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template");
    std::fs::create_dir(&template).unwrap();
    let mode = |mode| Some(SnapshotConfig { mode, dir: template.clone() });
    assert_eq!(run(2, mode(SnapshotMode::Template), &dir.path().join("t.log")).unwrap(), ExitReason::Snapshotted);
    let log = dir.path().join("r.log");
    assert_eq!(run(2, mode(SnapshotMode::Restore), &log).unwrap(), ExitReason::Reset);
    assert_eq!(std::fs::read(&log).unwrap(), b"Brm");
}

#[test]
fn the_request_is_ignored_by_a_vm_that_is_not_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    assert_eq!(run(1, None, &log).unwrap(), ExitReason::Reset);
    assert_eq!(std::fs::read(&log).unwrap(), b"ABrm");
}

#[test]
fn a_missing_or_incomplete_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let restore = Some(SnapshotConfig { mode: SnapshotMode::Restore, dir: dir.path().to_path_buf() });
    let err = run(1, restore.clone(), &dir.path().join("a.log")).unwrap_err();
    assert!(err.to_string().contains(STATE_FILE), "{err}");
    std::fs::write(dir.path().join(STATE_FILE), b"not json").unwrap();
    let err = run(1, restore, &dir.path().join("b.log")).unwrap_err();
    assert!(err.to_string().contains("restoring the template"), "{err}");
}
