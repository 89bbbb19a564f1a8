//! SIGTERM stops a running VM: the vCPU is kicked out of KVM_RUN and
//! `build_and_run` returns `Stopped` (exit status 0); the handler wakes the
//! waiting main thread through an eventfd. Own test binary because
//! the termination flag is process-wide.

use std::time::Duration;

use vmm::config::{SerialConfig, VmResources};
use vmm::ExitReason;

#[test]
fn sigterm_stops_a_spinning_guest() {
    // jmp $ : the guest never exits on its own.
    let res = VmResources::real_mode(vec![0xeb, 0xfe], 0x1000, 64, SerialConfig::None).unwrap();
    vmm::builder::install_termination_handlers().unwrap();
    let vm = std::thread::spawn(move || vmm::build_and_run(res).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vm.is_finished(), "guest spins until told to stop");
    // SAFETY: sending a signal to our own process; the handler sets a flag and
    // writes an eventfd.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    // The VMM's main thread wakes on the signal; a lost wake-up shows as a
    // failure here, not as a hung test.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !vm.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(vm.is_finished(), "the VM did not stop within 10 s of SIGTERM");
    let reason = vm.join().unwrap();
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(reason.exit_code(), 0);
}
