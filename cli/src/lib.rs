//! vmrt's host-side command-line tool. `vmrt check` reports whether this host
//! can run vmrt sandboxes (KVM flavour, capabilities, guest kernel and initrd,
//! containerd registration, installed binaries) and what to do when not;
//! `vmrt agent` talks to a sandbox's guest agent over hybrid vsock.

pub mod agent;
pub mod check;
