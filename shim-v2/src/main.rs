//! `containerd-shim-vmrt-v2`: the containerd shim v2 of vmrt (runtime
//! `io.containerd.vmrt.v2`). Each container runs in a KVM microVM booted with
//! `vmrt-vmm`; the shim talks to the guest agent over hybrid vsock (ttrpc).
//!
//! Layout follows containerd's rust-extensions runc shim: [`service`] (shim
//! lifecycle), [`task`] (Task service), [`sandbox`] (the VM), [`agent`] (agent
//! client), [`io`] (stdio copy), [`preboot`] (the VM boots before Create),
//! [`config`], [`mount`], [`errors`], [`template`] (VM templates).

use vmrt_protocol::client as agent;
mod config;
mod errors;
mod io;
mod mount;
mod preboot;
mod sandbox;
mod service;
mod task;
mod template;

#[tokio::main]
async fn main() {
    if let Err(e) = service::run().await {
        eprintln!("{}: {e}", service::RUNTIME_ID);
        std::process::exit(1);
    }
    // Exit now rather than dropping the runtime: dropping it waits for every
    // blocking task, and stdio copies may still sit in a blocking FIFO open or
    // read that only the process's exit ends.
    std::process::exit(0);
}
