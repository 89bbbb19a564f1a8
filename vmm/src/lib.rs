//! vmrt VMM: boots a Linux microVM on KVM with rust-vmm crates.
//!
//! Flow: [`config::VmConfig`] (serde) → [`config::VmResources`] (validated
//! once) → [`builder::build_and_run`] → KVM VM with guest memory, vCPU
//! threads, the 8250 serial console, an i8042 for `reboot=k`, and
//! virtio-mmio devices (vsock, virtio-fs) → [`vcpu::ExitReason`].

pub mod boot;
pub mod builder;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod host;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;

pub use builder::build_and_run;
pub use config::{VmConfig, VmResources};
pub use vcpu::ExitReason;
