//! virtio-vsock device (virtio 1.2 §5.10) with a hybrid Unix-socket host side.
//!
//! The guest sees a vsock device (device ID 19) with three virtqueues
//! (rx = 0, tx = 1, event = 2) and the configuration space `guest_cid: u64` (LE).
//! Only stream sockets (`VIRTIO_VSOCK_TYPE_STREAM`) are supported.
//!
//! Host side (Firecracker's "hybrid vsock" convention, see `docs/contracts.md`):
//! - host → guest: a client connects to the Unix socket `uds_path`, sends
//!   `CONNECT <port>\n`, receives `OK <host_port>\n` once the guest accepted, then
//!   the stream carries raw bytes both ways;
//! - guest → host port `P`: forwarded to the Unix socket `<uds_path>_<P>` if it
//!   exists and accepts, else the guest gets `VIRTIO_VSOCK_OP_RST`.
//!
//! Layout:
//! - [`packet`]: header constants, parsing and validation of tx descriptor
//!   chains, writing rx descriptor chains (via `virtio_vsock::packet::VsockPacket`);
//! - [`connection`]: one stream connection and its credit accounting (§5.10.6.3);
//! - [`muxer`]: the connection table, the Unix listener and the protocol state machine;
//! - [`event_handler`]: virtqueue processing and the worker thread's epoll loop;
//! - [`device`]: [`Vsock`], the [`crate::devices::virtio::VirtioDevice`] implementation.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

pub use self::device::{Error, Vsock};
