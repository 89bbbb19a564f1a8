use kvm_ioctls::{Kvm, VcpuExit};
use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{GuestAddress, GuestMemoryMmap, Bytes, GuestMemoryRegion, GuestMemory};

fn attempt(irqchip: bool, mem_mib: usize, base0: bool, step: u32) {
    let kvm2 = Kvm::new().unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_mib << 20)]).unwrap();
    for (slot, r) in mem.iter().enumerate() {
        unsafe { vm.set_user_memory_region(kvm_userspace_memory_region{slot: slot as u32, flags:0, guest_phys_addr: r.start_addr().0, memory_size: r.len(), userspace_addr: r.as_ptr() as u64}).unwrap() };
    }
    if irqchip {
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
    }
    let code = [0xba, 0xf8, 0x03, 0xb0, 0x68, 0xee, 0x88, 0x07, 0xe6, 0x64];
    if step >= 1 { vm.set_identity_map_address(0xfffb_c000).unwrap(); }
    if step >= 2 { vm.create_pit2(kvm_bindings::kvm_pit_config{flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default()}).unwrap(); }
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let sup = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    if step == 3 { vmm::vcpu::configure(&vcpu, 0, 1, &sup, vmm::boot::BootEntry::RealMode{ip: 0x1000}).unwrap(); }
    if step == 4 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap(); }
    if step == 5 { vcpu.set_cpuid2(&sup).unwrap(); }
    if step == 6 { let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }; vcpu.set_fpu(&fpu).unwrap(); }
    if step == 50 || step == 51 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap();
       let e: Vec<_> = vmm::vcpu::boot_msrs().into_iter().map(|(index, data)| kvm_bindings::kvm_msr_entry{index, data, ..Default::default()}).collect(); println!("all msrs {:?}", vcpu.set_msrs(&kvm_bindings::Msrs::from_entries(&e).unwrap()));
       let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }; vcpu.set_fpu(&fpu).unwrap();
       if step == 51 { let mut l = vcpu.get_lapic().unwrap(); l.regs[0x351] = 7; l.regs[0x361] = 4; vcpu.set_lapic(&l).unwrap(); }
    }
    if step == 73 { vmm::vcpu::configure(&vcpu, 0, 1, &sup, vmm::boot::BootEntry::RealMode{ip: 0x1000}).unwrap(); }
    if step == 52 || step == 70 { vmm::vcpu::configure(&vcpu, 0, 1, &sup, vmm::boot::BootEntry::RealMode{ip: 0x1000}).unwrap(); vcpu.set_regs(&kvm_bindings::kvm_regs{rip: 0x1000, rflags: 2, ..Default::default()}).unwrap(); }
    if step == 40 || step == 41 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap(); }
    if step == 50 || step == 51 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap();
       let e: Vec<_> = vmm::vcpu::boot_msrs().into_iter().map(|(index, data)| kvm_bindings::kvm_msr_entry{index, data, ..Default::default()}).collect(); println!("all msrs {:?}", vcpu.set_msrs(&kvm_bindings::Msrs::from_entries(&e).unwrap()));
       let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }; vcpu.set_fpu(&fpu).unwrap();
       if step == 51 { let mut l = vcpu.get_lapic().unwrap(); l.regs[0x351] = 7; l.regs[0x361] = 4; vcpu.set_lapic(&l).unwrap(); }
    }
    if step == 40 || step == 42 { let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }; vcpu.set_fpu(&fpu).unwrap(); }
    if step == 41 || step == 43 { let mut l = vcpu.get_lapic().unwrap(); l.regs[0x351] = 7; l.regs[0x361] = 4; vcpu.set_lapic(&l).unwrap(); }
    if step == 42 { let e: Vec<_> = vmm::vcpu::boot_msrs().into_iter().map(|(index, data)| kvm_bindings::kvm_msr_entry{index, data, ..Default::default()}).collect(); println!("all msrs {:?}", vcpu.set_msrs(&kvm_bindings::Msrs::from_entries(&e).unwrap())); }
    if step == 30 || step == 31 { let e: Vec<_> = vmm::vcpu::boot_msrs().into_iter().map(|(index, data)| kvm_bindings::kvm_msr_entry{index, data, ..Default::default()}).collect(); println!("all msrs {:?}", vcpu.set_msrs(&kvm_bindings::Msrs::from_entries(&e).unwrap())); }
    if step == 31 || step == 32 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap(); }
    if step == 33 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap(); let (i, d) = (0x2ff, 0x806); let m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry{index: i, data: d, ..Default::default()}]).unwrap(); println!("msr {i:#x} -> {:?}", vcpu.set_msrs(&m)); }
    if step == 34 { let mut c = sup.clone(); vmm::cpuid::normalize(c.as_mut_slice(), 0, 1); vcpu.set_cpuid2(&c).unwrap(); let (i, d) = (0x1a0, 1); let m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry{index: i, data: d, ..Default::default()}]).unwrap(); println!("msr {i:#x} -> {:?}", vcpu.set_msrs(&m)); }
    if step >= 10 && step < 30 { let (i, d) = vmm::vcpu::boot_msrs()[(step - 10) as usize]; let m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry{index: i, data: d, ..Default::default()}]).unwrap(); println!("msr {i:#x} -> {:?}", vcpu.set_msrs(&m)); }
    if step == 7 { let l = vcpu.get_lapic().unwrap(); vcpu.set_lapic(&l).unwrap(); }
    let mut s = vcpu.get_sregs().unwrap();
    println!("default cs: {:x?}", s.cs);
    if base0 { s.cs.base = 0; s.cs.selector = 0; }
    if step < 70 { vcpu.set_sregs(&s).unwrap(); }
    let mut r = vcpu.get_regs().unwrap();
    r.rip = if base0 {0x1000} else {0x1000}; r.rflags = 2;
    if step < 70 { vcpu.set_regs(&r).unwrap(); }
    if step == 60 { let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap(); vm.register_irqfd(&evt, 4).unwrap(); std::mem::forget(evt); }
    let t = std::thread::spawn(move || { let mut vcpu = vcpu; let _m = &mem;
    for _ in 0..3 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(p, d)) => println!("step {step} irqchip={irqchip} mem={mem_mib}: out {p:x} {d:?}"),
            Ok(e) => { println!("step {step} irqchip={irqchip} mem={mem_mib}: exit {e:?}"); break }
            Err(e) => { println!("err {e}"); break }
        }
    }});
    if step == 61 { std::thread::sleep(std::time::Duration::from_millis(100)); }
    t.join().unwrap();
}

#[test]
fn exp() {
    for step in [70, 73] { attempt(true, 64, true, step); }
}
