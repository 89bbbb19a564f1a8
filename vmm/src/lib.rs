//! vmrt VMM: boots a Linux microVM on KVM with rust-vmm crates.
//!
//! Flow: [`config::VmConfig`] (serde, validated once) → [`builder::build_and_run`]
//! → KVM VM with guest memory, vCPU threads, the 8250 serial console, an i8042
//! for `reboot=k`, and virtio-mmio devices (vsock, virtio-fs).

pub mod devices;
