//! Virtqueue processing for virtio-fs (virtio 1.2 §5.11.6): one FUSE request
//! per descriptor chain, its reply written into the chain's writable part.
//!
//! [`process_queue`] is a plain function over a [`Queue`], guest memory and a
//! FUSE [`Server`], so it runs in unit tests on mock guest memory.
//!
//! Descriptor addresses and lengths and every byte of the request are guest
//! controlled. A chain is always completed (a used-ring entry is added), with:
//! - the reply the server produced (length = bytes written);
//! - a bare `fuse_out_header` carrying `-errno` when the request is malformed
//!   (`fuse_in_header.len` shorter than the header or beyond the readable
//!   bytes, a body the server could not decode) and the chain has room for it;
//! - length 0 when not even that is possible (no readable header, descriptors
//!   outside guest memory, no writable room) or for requests without a reply
//!   (FORGET, BATCH_FORGET, INTERRUPT, DESTROY).
//!
//! A panic inside the backend is caught per request, logged and counted in
//! [`QueueOutcome::panics`]; the chain is completed with EIO.

use std::io::Write;
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::ByteValued;

use super::super::GuestMemory;

/// Rounds in a row without a poppable chain after which [`process_queue`]
/// treats the available ring as corrupt and stops.
const MAX_EMPTY_ROUNDS: u32 = 8;

/// What one call of [`process_queue`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Descriptor chains completed (added to the used ring).
    pub completed: usize,
    /// Chains that carried a malformed request (answered with an error or length 0).
    pub malformed: usize,
    /// Requests whose handling panicked in the backend (caught, answered with EIO).
    pub panics: usize,
    /// The driver must be notified (used buffers were added and it did not suppress interrupts).
    pub needs_notification: bool,
}

/// How one descriptor chain was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainResult {
    /// The server handled the request; `u32` bytes of reply were written.
    Handled(u32),
    /// The request was malformed; `u32` bytes (an error header or nothing) were written.
    Malformed(u32),
    /// The backend panicked; `u32` bytes (an EIO header or nothing) were written.
    Panicked(u32),
}

impl ChainResult {
    /// Bytes written into the chain's writable descriptors (the used-ring `len`).
    pub fn used_len(self) -> u32 {
        match self {
            ChainResult::Handled(n) | ChainResult::Malformed(n) | ChainResult::Panicked(n) => n,
        }
    }
}

/// Writes a reply made of just a `fuse_out_header` with `-errno` for request
/// `unique`; returns the bytes written (16) or 0 if the chain has no room.
fn write_error_reply(writer: &mut VirtioFsWriter<'_>, unique: u64, errno: i32) -> u32 {
    let header = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match writer.write_all(header.as_slice()) {
        Ok(()) => size_of::<OutHeader>() as u32,
        Err(e) => {
            log::debug!("virtio-fs: no room for the error reply to request {unique}: {e}");
            0
        }
    }
}

/// Handles the FUSE request carried by `chain` and writes its reply.
///
/// Never panics on guest input; see the module documentation for the reply
/// written in each malformed case.
pub fn handle_chain<F: FileSystem + Sync>(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    server: &Server<F>,
) -> ChainResult {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("virtio-fs: bad readable descriptors: {e}");
            return ChainResult::Malformed(0);
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("virtio-fs: bad writable descriptors: {e}");
            return ChainResult::Malformed(0);
        }
    };
    // A copy over the same guest buffers, to overwrite the reply with an
    // error if the server fails half-way.
    let mut fallback = writer.clone();

    let header: InHeader = match reader.clone().read_obj() {
        Ok(h) => h,
        Err(e) => {
            log::warn!("virtio-fs: request shorter than fuse_in_header: {e}");
            return ChainResult::Malformed(0);
        }
    };
    let declared = header.len as usize;
    if declared < size_of::<InHeader>() || declared > reader.available_bytes() {
        log::warn!(
            "virtio-fs: request {} (opcode {}) declares {} bytes, chain has {}",
            header.unique,
            header.opcode,
            declared,
            reader.available_bytes()
        );
        return ChainResult::Malformed(write_error_reply(
            &mut fallback,
            header.unique,
            libc::EINVAL,
        ));
    }

    let result = catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, Writer::from(writer), None, None)
    }));
    match result {
        Ok(Ok(written)) => ChainResult::Handled(u32::try_from(written).unwrap_or(u32::MAX)),
        Ok(Err(e)) => {
            log::warn!(
                "virtio-fs: request {} (opcode {}) failed: {e}",
                header.unique,
                header.opcode
            );
            ChainResult::Malformed(write_error_reply(
                &mut fallback,
                header.unique,
                libc::EINVAL,
            ))
        }
        Err(_) => {
            log::error!(
                "virtio-fs: backend panicked on request {} (opcode {})",
                header.unique,
                header.opcode
            );
            ChainResult::Panicked(write_error_reply(&mut fallback, header.unique, libc::EIO))
        }
    }
}

/// Processes every available descriptor chain of `queue`, adding each to the
/// used ring, until the driver has no more buffers.
///
/// Errors of the queue itself (ring addresses outside guest memory, an
/// available index more than the queue size ahead) stop processing and are
/// logged; they cannot panic.
pub fn process_queue<F: FileSystem + Sync>(
    queue: &mut Queue,
    mem: &GuestMemory,
    server: &Server<F>,
) -> QueueOutcome {
    let mut outcome = QueueOutcome::default();
    // Rounds in a row that popped nothing although the driver's available
    // index said there was more: a buffer added while notifications were off
    // is picked up by the next round, but an invalid available index (more
    // than the queue size ahead) would make this loop spin forever.
    let mut empty_rounds = 0u32;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::error!("virtio-fs: cannot disable queue notifications: {e}");
            break;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let result = handle_chain(mem, chain, server);
            match result {
                ChainResult::Handled(_) => {}
                ChainResult::Malformed(_) => outcome.malformed += 1,
                ChainResult::Panicked(_) => outcome.panics += 1,
            }
            if let Err(e) = queue.add_used(mem, head, result.used_len()) {
                log::error!("virtio-fs: cannot add descriptor chain {head} to the used ring: {e}");
                continue;
            }
            outcome.completed += 1;
        }
        empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
        match queue.enable_notification(mem) {
            // More buffers arrived while notifications were off: go again.
            Ok(true) if empty_rounds < MAX_EMPTY_ROUNDS => continue,
            Ok(true) => {
                log::error!("virtio-fs: available ring index is invalid; stopping the queue");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                log::error!("virtio-fs: cannot enable queue notifications: {e}");
                break;
            }
        }
    }
    if outcome.completed > 0 {
        outcome.needs_notification = queue.needs_notification(mem).unwrap_or(true);
    }
    outcome
}
