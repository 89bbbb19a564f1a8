#!/usr/bin/python3
"""Holds one idle KVM vCPU for the runner VM's lifetime (started by init.sh).

Why: KVM counts the vCPUs whose local APIC is software-disabled in a static
key (arch/x86/kvm/lapic.c, `apic_sw_disabled`). Every vCPU starts with its
APIC software-disabled and the guest enables it soon after, so each microVM
moves that count 0 -> 1 -> 0, and every such move patches the runner kernel's
text (int3 breakpoints, then an IPI to every CPU to sync). Under QEMU TCG those
IPIs are where the runner was seen stalling (vCPUs looping in `exc_int3`).
A vCPU that exists and never runs keeps the count at 1 or more, so the key
never flips again while the tests run.

Plain ioctls on /dev/kvm (linux/kvm.h): KVM_CREATE_VM, KVM_CREATE_IRQCHIP
(the in-kernel LAPIC is what the key counts), KVM_CREATE_VCPU; then sleep.
"""
import fcntl
import os
import signal
import sys

KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_VCPU = 0xAE41

def main():
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    except OSError as e:
        # Said on the job's stderr: the runner then runs without the workaround.
        print(f"kvm-keeper: cannot hold an idle vCPU ({e}); the runner kernel may stall", file=sys.stderr, flush=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()

if __name__ == "__main__":
    main()
