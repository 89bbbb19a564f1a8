//! vsock packet header (virtio 1.2 §5.10.6): constants, parsing of guest tx
//! descriptor chains and writing of rx descriptor chains.
//!
//! Descriptor-chain parsing is done by `virtio_vsock::packet::VsockPacket`, which
//! accepts both layouts Linux uses: header and payload in one descriptor
//! (Linux ≥ 6.2) or header and payload in two descriptors. Everything read from
//! the guest is copied out once (no time-of-check/time-of-use on guest memory)
//! and then validated by [`validate_tx_header`].

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;

use crate::devices::virtio::GuestMemory;

/// CID of the host (virtio 1.2 §5.10.4: "The host CID is 2").
pub const VSOCK_HOST_CID: u64 = 2;
/// Stream socket type, the only one this device supports (§5.10.6).
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Connection request (§5.10.6.4).
pub const VSOCK_OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const VSOCK_OP_RST: u16 = 3;
/// One or both directions shut down; see the `VSOCK_SHUTDOWN_F_*` flags.
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// Payload data.
pub const VSOCK_OP_RW: u16 = 5;
/// Unsolicited credit information (§5.10.6.3).
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Request for a `VSOCK_OP_CREDIT_UPDATE`.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const VSOCK_SHUTDOWN_F_SEND: u32 = 2;

/// Event queue event id: transport reset (§5.10.6.6), sent after the device
/// was reset so the driver drops its connections and re-reads the CID.
pub const VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Size in bytes of `struct virtio_vsock_hdr` (§5.10.6).
pub const PKT_HEADER_SIZE: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

/// Largest payload accepted in one tx packet and produced in one rx packet
/// (64 KiB, Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;

/// An owned copy of `struct virtio_vsock_hdr` (§5.10.6), all fields in host
/// byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source vsock port.
    pub src_port: u32,
    /// Destination vsock port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type (`VSOCK_TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`VSOCK_OP_*`).
    pub op: u16,
    /// Operation-specific flags (`VSOCK_SHUTDOWN_F_*` for `VSOCK_OP_SHUTDOWN`).
    pub flags: u32,
    /// Sender's receive buffer size in bytes (credit, §5.10.6.3).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer since the
    /// connection started (wrapping counter).
    pub fwd_cnt: u32,
}

impl Header {
    /// Encodes the header in its little-endian wire layout (44 bytes).
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the little-endian wire layout (44 bytes).
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Why a guest tx packet was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain does not hold a well-formed packet (too short,
    /// wrong direction, payload `len` over [`MAX_PKT_PAYLOAD`], outside guest
    /// memory). `header` is the raw header when at least it was readable.
    #[error("malformed tx descriptor chain: {reason}")]
    Chain {
        /// What `VsockPacket` reported.
        reason: String,
        /// The header read from the head descriptor, if it was readable.
        header: Option<Header>,
    },
    /// Copying the payload out of guest memory failed.
    #[error("cannot read tx payload of {len} bytes from guest memory")]
    Payload {
        /// Payload length from the header.
        len: u32,
        /// The packet header.
        header: Header,
    },
    /// `src_cid` is not the guest's CID.
    #[error("tx packet src_cid {got} is not the guest CID {expected}")]
    SrcCid {
        /// CID in the header.
        got: u64,
        /// The guest's CID.
        expected: u64,
    },
    /// `dst_cid` is not the host CID (2).
    #[error("tx packet dst_cid {0} is not the host CID 2")]
    DstCid(u64),
    /// `type` is not `VSOCK_TYPE_STREAM`.
    #[error("unsupported vsock socket type {0} (only stream = 1)")]
    Type(u16),
    /// `op` is not one of `VSOCK_OP_REQUEST..=VSOCK_OP_CREDIT_REQUEST`.
    #[error("unknown vsock op {0}")]
    Op(u16),
    /// `len` is non-zero on an op that carries no payload.
    #[error("vsock op {op} carries {len} payload bytes, expected none")]
    UnexpectedPayload {
        /// The op.
        op: u16,
        /// Payload length.
        len: u32,
    },
}

impl PacketError {
    /// The header of the rejected packet, when it was readable and came from
    /// the guest towards the host (i.e. an RST may be sent back for it).
    pub fn header(&self) -> Option<Header> {
        match self {
            PacketError::Chain { header, .. } => *header,
            PacketError::Payload { header, .. } => Some(*header),
            _ => None,
        }
    }
}

/// A tx packet copied out of guest memory: header plus payload (`data.len() == hdr.len`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// The payload, `hdr.len` bytes.
    pub data: Vec<u8>,
}

/// Parses one guest tx descriptor chain (§5.10.6.1: device-readable buffers)
/// into an owned [`TxPacket`]. Does not validate the header fields beyond
/// `len <= MAX_PKT_PAYLOAD`; see [`validate_tx_header`].
///
/// Errors: [`PacketError::Chain`] / [`PacketError::Payload`] when the chain is
/// too short, has write-only descriptors, or points outside guest memory.
pub fn read_tx_packet<M>(
    mem: &GuestMemory,
    chain: &mut DescriptorChain<M>,
) -> Result<TxPacket, PacketError>
where
    M: Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    // Keep a copy of the chain so the raw header can still be read when
    // `VsockPacket` rejects the chain (to answer with an RST).
    let mut peek = chain.clone();
    let pkt = match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_PAYLOAD) {
        Ok(p) => p,
        Err(e) => {
            let header = peek.next().and_then(|d| {
                if d.is_write_only() || (d.len() as usize) < PKT_HEADER_SIZE {
                    return None;
                }
                let mut b = [0u8; PKT_HEADER_SIZE];
                mem.read_slice(&mut b, d.addr()).ok()?;
                Some(Header::from_bytes(&b))
            });
            return Err(PacketError::Chain {
                reason: e.to_string(),
                header,
            });
        }
    };
    let hdr = Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    };
    let mut data = Vec::new();
    if hdr.len > 0 {
        let slice = pkt.data_slice().ok_or(PacketError::Payload {
            len: hdr.len,
            header: hdr,
        })?;
        // `VsockPacket` guarantees `slice.len() == hdr.len <= MAX_PKT_PAYLOAD`.
        if slice.len() != hdr.len as usize {
            return Err(PacketError::Payload {
                len: hdr.len,
                header: hdr,
            });
        }
        data = vec![0u8; hdr.len as usize];
        let copied = slice.copy_to(&mut data[..]);
        if copied != data.len() {
            return Err(PacketError::Payload {
                len: hdr.len,
                header: hdr,
            });
        }
    }
    Ok(TxPacket { hdr, data })
}

/// Checks the guest-controlled header fields of a tx packet: `src_cid` must be
/// the guest's CID, `dst_cid` the host (2), `type` stream, `op` a known op and
/// `len` zero except for `VSOCK_OP_RW`.
pub fn validate_tx_header(hdr: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if hdr.src_cid != guest_cid {
        return Err(PacketError::SrcCid {
            got: hdr.src_cid,
            expected: guest_cid,
        });
    }
    if hdr.dst_cid != VSOCK_HOST_CID {
        return Err(PacketError::DstCid(hdr.dst_cid));
    }
    if hdr.type_ != VSOCK_TYPE_STREAM {
        return Err(PacketError::Type(hdr.type_));
    }
    if !(VSOCK_OP_REQUEST..=VSOCK_OP_CREDIT_REQUEST).contains(&hdr.op) {
        return Err(PacketError::Op(hdr.op));
    }
    if hdr.op != VSOCK_OP_RW && hdr.len != 0 {
        return Err(PacketError::UnexpectedPayload {
            op: hdr.op,
            len: hdr.len,
        });
    }
    Ok(())
}

/// Writes `hdr` and `data` into a guest rx descriptor chain (§5.10.6.2:
/// device-writable buffers, header first, payload in the same or the next
/// descriptor). `hdr.len` is set to `data.len()`.
///
/// Returns the number of bytes written (used length), or `None` when the chain
/// is malformed or too small for the payload (the caller then returns the chain
/// with used length 0 and keeps the packet for the next chain).
pub fn write_rx_packet<M>(
    mem: &GuestMemory,
    chain: &mut DescriptorChain<M>,
    hdr: &Header,
    data: &[u8],
) -> Option<u32>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_PAYLOAD).ok()?;
    if !data.is_empty() {
        let slice = pkt.data_slice()?;
        if slice.len() < data.len() {
            return None;
        }
        slice.write_slice(data, 0).ok()?;
    }
    let mut hdr = *hdr;
    hdr.len = u32::try_from(data.len()).ok()?;
    pkt.set_header_from_raw(&hdr.to_bytes()).ok()?;
    Some(PKT_HEADER_SIZE as u32 + hdr.len)
}

/// Payload capacity of a guest rx descriptor chain without consuming it:
/// `Some(bytes)` (capped at [`MAX_PKT_PAYLOAD`]) when it can hold a packet.
pub fn rx_chain_capacity<M>(mem: &GuestMemory, chain: &DescriptorChain<M>) -> Option<usize>
where
    M: Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut c = chain.clone();
    let pkt = VsockPacket::from_rx_virtq_chain(mem, &mut c, MAX_PKT_PAYLOAD).ok()?;
    let cap = pkt.data_slice().map(|s| s.len()).unwrap_or(0);
    Some(cap.min(MAX_PKT_PAYLOAD as usize))
}

/// Writes event `id` into a guest event-queue chain (§5.10.6.6): the head must
/// be a device-writable descriptor of at least 4 bytes (`struct virtio_vsock_event`).
/// Returns the used length (4), or `None` when the buffer is unusable.
pub fn write_event<M>(mem: &GuestMemory, chain: &mut DescriptorChain<M>, id: u32) -> Option<u32>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let d = chain.next()?;
    if !d.is_write_only() || d.len() < 4 {
        return None;
    }
    mem.write_obj(id.to_le(), d.addr()).ok()?;
    Some(4)
}
