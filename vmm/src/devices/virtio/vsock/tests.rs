//! Tests of the vsock device on mock guest memory (no KVM): descriptor-chain
//! parsing, the muxer's protocol state machine against real Unix sockets, and
//! the worker thread through `VirtioDevice::activate`.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::event_handler::{process_event_queue, process_rx, process_tx};
use super::muxer::{parse_connect_line, Muxer, HOST_PORT_BASE};
use super::packet::*;
use super::{Error, Vsock};
use crate::devices::virtio::{ActivateContext, GuestMemory, Interrupt, VirtioDevice};

const GUEST_CID: u64 = 3;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const QSIZE: u16 = 64;
const MEM_SIZE: usize = 0x100_0000;
const TX_QUEUE_ADDR: u64 = 0x0;
const RX_QUEUE_ADDR: u64 = 0x1_0000;
const EVENT_QUEUE_ADDR: u64 = 0x2_0000;
const RX_BUF_BASE: u64 = 0x10_0000;
const TX_BUF_BASE: u64 = 0x60_0000;
/// Per-descriptor buffer stride: header + 64 KiB payload, rounded up.
const BUF_STRIDE: u64 = 0x1_1000;
const WAIT: Duration = Duration::from_secs(10);

fn new_mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The driver's side of one split virtqueue, writing guest memory directly
/// (its own layout: see `DriverQueue::new`).
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Sets up the rings at `base` in the split-virtqueue layout (virtio 1.2
    /// §2.7: descriptor table, available ring with `used_event`, used ring with
    /// `avail_event`, each where the previous one ends) and returns the driver
    /// side plus the device's `Queue`.
    fn new(mem: &GuestMemory, base: u64) -> (Self, Queue) {
        let n = u64::from(QSIZE);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        // Zeroed rings: no buffers, no events.
        mem.write_slice(
            &vec![0u8; (used + 6 + 8 * n - base) as usize],
            GuestAddress(base),
        )
        .unwrap();
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let d = DriverQueue {
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (d, q)
    }

    /// Makes a chain of `(addr, len, flags)` available; returns the
    /// descriptor indices used (head first).
    fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> Vec<u16> {
        let n = descs.len() as u16;
        assert!(n > 0 && n <= QSIZE);
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let mut idxs = Vec::new();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags & !VRING_DESC_F_NEXT
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, idx + 1));
            mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(idx)))
                .unwrap();
            idxs.push(idx);
        }
        self.next_desc = (first + n) % QSIZE;
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(first.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        idxs
    }

    /// The device's `avail_event` (after the used ring, virtio 1.2 §2.7.8).
    fn avail_event(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(
            mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(QSIZE)))
                .unwrap(),
        )
    }

    /// Writes the driver's `used_event` (after the available ring, §2.7.6).
    fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(
            idx.to_le(),
            GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE)),
        )
        .unwrap();
    }

    /// Whether a driver that moved the available index from `old` to its current
    /// value must notify the device (`vring_need_event`, §2.7.10).
    fn must_kick(&self, mem: &GuestMemory, old: u16) -> bool {
        // The avail index store must be visible before avail_event is read
        // (Linux: virtio_mb in virtqueue_kick_prepare); the device fences likewise.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let event = self.avail_event(mem);
        self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
    }

    /// Writes a tx packet (header with `len` set, then `data`) into the buffer of
    /// the next descriptor's slot and makes it available as one descriptor.
    /// Returns the available index before the chain was added (for `must_kick`).
    fn put_packet(&mut self, mem: &GuestMemory, hdr: Header, data: &[u8]) -> u16 {
        let a = TX_BUF_BASE + u64::from(self.next_desc) * BUF_STRIDE;
        let hdr = Header { len: data.len() as u32, ..hdr };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(a)).unwrap();
        mem.write_slice(data, GuestAddress(a + PKT_HEADER_SIZE as u64)).unwrap();
        let old = self.avail_idx;
        self.add_chain(mem, &[(a, (PKT_HEADER_SIZE + data.len()) as u32, 0)]);
        old
    }

    /// Whether the device added used entries not taken yet.
    fn has_used(&self, mem: &GuestMemory) -> bool {
        u16::from_le(mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap()) != self.used_seen
    }

    /// Used-ring entries `(head, len)` added since the last call.
    fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let idx = u16::from_le(mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap());
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let at = self.used + 4 + 8 * slot;
            let id = u32::from_le(mem.read_obj::<u32>(GuestAddress(at)).unwrap());
            let len = u32::from_le(mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap());
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// A device model under test: guest memory, tx and rx queues, the muxer,
/// and the guest-side record of received packets.
struct Harness {
    mem: GuestMemory,
    muxer: Muxer,
    txd: DriverQueue,
    tx: Queue,
    rxd: DriverQueue,
    rx: Queue,
    /// rx head index → (header address, data address, data capacity).
    rx_bufs: HashMap<u16, (u64, u64, u32)>,
    rx_posted: usize,
    /// Packets the "guest" received, oldest first.
    received: VecDeque<(Header, Vec<u8>)>,
    /// Keep rx buffers posted automatically in `pump`.
    auto_rx: bool,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_limit(super::muxer::MAX_CONNECTIONS)
    }

    fn with_limit(limit: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = new_mem();
        let (txd, tx) = DriverQueue::new(&mem, TX_QUEUE_ADDR);
        let (rxd, rx) = DriverQueue::new(&mem, RX_QUEUE_ADDR);
        let muxer = Muxer::with_limit(GUEST_CID, &uds, limit).unwrap();
        Harness {
            mem,
            muxer,
            txd,
            tx,
            rxd,
            rx,
            rx_bufs: HashMap::new(),
            rx_posted: 0,
            received: VecDeque::new(),
            auto_rx: true,
            uds,
            _dir: dir,
        }
    }

    /// Guest sends a packet with header and payload in one descriptor.
    fn send(&mut self, mut hdr: Header, data: &[u8]) -> Vec<(u16, u32)> {
        hdr.len = data.len() as u32;
        let slot = u64::from(self.txd.next_desc % QSIZE);
        let addr = TX_BUF_BASE + slot * BUF_STRIDE;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(addr + PKT_HEADER_SIZE as u64))
            .unwrap();
        self.txd.add_chain(
            &self.mem,
            &[(addr, (PKT_HEADER_SIZE + data.len()) as u32, 0)],
        );
        self.run_tx()
    }

    /// Guest sends a packet with header and payload in two descriptors.
    fn send_split(&mut self, mut hdr: Header, data: &[u8]) -> Vec<(u16, u32)> {
        hdr.len = data.len() as u32;
        let slot = u64::from(self.txd.next_desc % QSIZE);
        let addr = TX_BUF_BASE + slot * BUF_STRIDE;
        let daddr = addr + 0x100;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(daddr)).unwrap();
        self.txd.add_chain(
            &self.mem,
            &[
                (addr, PKT_HEADER_SIZE as u32, 0),
                (daddr, data.len() as u32, 0),
            ],
        );
        self.run_tx()
    }

    /// Guest sends raw descriptors on the tx queue.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> Vec<(u16, u32)> {
        self.txd.add_chain(&self.mem, descs);
        self.run_tx()
    }

    fn run_tx(&mut self) -> Vec<(u16, u32)> {
        process_tx(&mut self.tx, &self.mem, &mut self.muxer);
        self.txd.take_used(&self.mem)
    }

    /// Posts one rx buffer of `cap` payload bytes; `split` puts the payload
    /// in a second descriptor (pre-6.2 Linux layout).
    fn post_rx(&mut self, cap: u32, split: bool) {
        let slot = u64::from(self.rxd.next_desc % QSIZE);
        let addr = RX_BUF_BASE + slot * BUF_STRIDE;
        let (idxs, daddr) = if split {
            let daddr = addr + 0x100;
            let w = VRING_DESC_F_WRITE;
            (
                self.rxd.add_chain(
                    &self.mem,
                    &[(addr, PKT_HEADER_SIZE as u32, w), (daddr, cap, w)],
                ),
                daddr,
            )
        } else {
            let len = PKT_HEADER_SIZE as u32 + cap;
            (
                self.rxd
                    .add_chain(&self.mem, &[(addr, len, VRING_DESC_F_WRITE)]),
                addr + PKT_HEADER_SIZE as u64,
            )
        };
        self.rx_bufs.insert(idxs[0], (addr, daddr, cap));
        self.rx_posted += 1;
    }

    /// Runs rx processing and records what the guest received.
    fn run_rx(&mut self) {
        process_rx(&mut self.rx, &self.mem, &mut self.muxer);
        for (head, len) in self.rxd.take_used(&self.mem) {
            self.rx_posted -= 1;
            let (haddr, daddr, cap) = self.rx_bufs.remove(&head).expect("unknown rx head");
            assert!(
                len as usize >= PKT_HEADER_SIZE,
                "rx used len {len} shorter than a header"
            );
            let mut hb = [0u8; PKT_HEADER_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(haddr)).unwrap();
            let hdr = Header::from_bytes(&hb);
            assert_eq!(len as usize, PKT_HEADER_SIZE + hdr.len as usize);
            assert!(
                hdr.len <= cap,
                "payload {} over buffer capacity {cap}",
                hdr.len
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(daddr)).unwrap();
            assert_eq!(hdr.src_cid, VSOCK_HOST_CID);
            assert_eq!(hdr.dst_cid, GUEST_CID);
            assert_eq!(hdr.type_, VSOCK_TYPE_STREAM);
            self.received.push_back((hdr, data));
        }
    }

    /// One round: host socket events, tx, rx (posting rx buffers if `auto_rx`).
    fn pump(&mut self) {
        self.muxer.process_host_events().unwrap();
        self.run_tx();
        if self.auto_rx {
            while self.rx_posted < 8 {
                self.post_rx(4096, false);
            }
        }
        self.run_rx();
    }

    /// Pumps until the guest received a packet matching `pred`; returns it
    /// (earlier packets stay queued).
    fn expect(&mut self, what: &str, pred: impl Fn(&Header) -> bool) -> (Header, Vec<u8>) {
        let start = Instant::now();
        loop {
            if let Some(i) = self.received.iter().position(|(h, _)| pred(h)) {
                return self.received.remove(i).unwrap();
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; got {:?}",
                self.received
            );
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn expect_op(&mut self, op: u16) -> (Header, Vec<u8>) {
        self.expect(&format!("op {op}"), |h| h.op == op)
    }

    /// Pumps a few rounds and returns everything received.
    fn settle(&mut self) -> Vec<(Header, Vec<u8>)> {
        for _ in 0..20 {
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.received.drain(..).collect()
    }

    /// Host client connects with `CONNECT <port>` and the guest accepts;
    /// returns the client and the host port.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.expect_op(VSOCK_OP_REQUEST);
        assert_eq!(req.dst_port, guest_port);
        assert!(req.src_port >= HOST_PORT_BASE);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let host_port = req.src_port;
        self.send(guest_hdr(guest_port, host_port, VSOCK_OP_RESPONSE), &[]);
        let line = read_line(&mut client);
        assert_eq!(line, format!("OK {host_port}\n"));
        (client, host_port)
    }

    /// Collects RW payload for `(local, peer)` until `n` bytes arrived, acking
    /// every packet with a credit update so the host side keeps flowing.
    fn read_guest_bytes(&mut self, local: u32, peer: u32, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut fwd = 0u32;
        while got.len() < n {
            let (h, d) = self.expect("RW data", |h| h.op == VSOCK_OP_RW && h.src_port == local);
            assert_eq!(h.dst_port, peer);
            got.extend_from_slice(&d);
            fwd = fwd.wrapping_add(d.len() as u32);
            let mut upd = guest_hdr(peer, local, VSOCK_OP_CREDIT_UPDATE);
            upd.fwd_cnt = fwd;
            self.send(upd, &[]);
        }
        got
    }
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Reads until the device closed the stream (EOF, or ECONNRESET when it closed
/// with unread bytes from us); panics on timeout.
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return v,
            Err(e) => panic!("waiting for the device to close the stream: {e}"),
        }
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// Packet parsing on mock guest memory.

fn sample_hdr(len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port: 1234,
        dst_port: 1024,
        len,
        type_: VSOCK_TYPE_STREAM,
        op: VSOCK_OP_RW,
        flags: 0x55,
        buf_alloc: 4096,
        fwd_cnt: 77,
    }
}

#[test]
fn vsock_header_roundtrip() {
    let h = sample_hdr(9);
    let b = h.to_bytes();
    assert_eq!(&b[0..8], &3u64.to_le_bytes());
    assert_eq!(&b[30..32], &VSOCK_OP_RW.to_le_bytes());
    assert_eq!(Header::from_bytes(&b), h);
}

#[test]
fn vsock_tx_single_descriptor_packet() {
    let mem = new_mem();
    let payload = pattern(100, 1);
    let hdr = sample_hdr(100);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&payload, GuestAddress(0x10_0000 + PKT_HEADER_SIZE as u64))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44 + 100, 0, 0));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    let pkt = read_tx_packet(&mem, &mut chain).unwrap();
    assert_eq!(pkt.hdr, hdr);
    assert_eq!(pkt.data, payload);
}

#[test]
fn vsock_tx_split_header_payload_packet() {
    let mem = new_mem();
    let payload = pattern(3000, 7);
    let hdr = sample_hdr(3000);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 4096, 0, 0)),
    ];
    let mut chain = vq.build_desc_chain(&descs).unwrap();
    let pkt = read_tx_packet(&mem, &mut chain).unwrap();
    assert_eq!(pkt.hdr, hdr);
    assert_eq!(pkt.data, payload);
}

#[test]
fn vsock_tx_malformed_chains_are_errors() {
    let mem = new_mem();
    let vq = MockSplitQueue::new(&mem, 16);
    // Header descriptor shorter than a header.
    let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 20, 0, 0));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    let e = read_tx_packet(&mem, &mut chain).unwrap_err();
    assert!(matches!(e, PacketError::Chain { header: None, .. }), "{e}");

    // Write-only tx descriptor.
    let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, VRING_DESC_F_WRITE, 0));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    assert!(read_tx_packet(&mem, &mut chain).is_err());

    // len over the 64 KiB maximum: error, but the header is recoverable for an RST.
    let hdr = sample_hdr(MAX_PKT_PAYLOAD + 1);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 0x2_0000, 0, 0)),
    ];
    let mut chain = vq.build_desc_chain(&descs).unwrap();
    let e = read_tx_packet(&mem, &mut chain).unwrap_err();
    assert_eq!(e.header(), Some(hdr));

    // len larger than the payload descriptor.
    let hdr = sample_hdr(5000);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 100, 0, 0)),
    ];
    let mut chain = vq.build_desc_chain(&descs).unwrap();
    assert!(read_tx_packet(&mem, &mut chain).is_err());

    // len > 0 but no payload descriptor at all.
    let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    assert!(read_tx_packet(&mem, &mut chain).is_err());

    // Payload outside guest memory.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(MEM_SIZE as u64 - 10, 5000, 0, 0)),
    ];
    let mut chain = vq.build_desc_chain(&descs).unwrap();
    assert!(read_tx_packet(&mem, &mut chain).is_err());
}

#[test]
fn vsock_rx_fill_single_and_split() {
    let mem = new_mem();
    let vq = MockSplitQueue::new(&mem, 16);
    let payload = pattern(500, 3);
    let mut hdr = sample_hdr(0);
    hdr.src_cid = 2;
    hdr.dst_cid = GUEST_CID;

    // One descriptor for header and payload.
    let d = RawDescriptor::from(SplitDescriptor::new(
        0x10_0000,
        44 + 4096,
        VRING_DESC_F_WRITE,
        0,
    ));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    assert_eq!(rx_chain_capacity(&mem, &chain), Some(4096));
    let used = write_rx_packet(&mem, &mut chain, &hdr, &payload).unwrap();
    assert_eq!(used, 44 + 500);
    let mut hb = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut hb, GuestAddress(0x10_0000)).unwrap();
    let got = Header::from_bytes(&hb);
    assert_eq!(got.len, 500);
    assert_eq!(Header { len: 0, ..got }, hdr);
    let mut data = vec![0u8; 500];
    mem.read_slice(&mut data, GuestAddress(0x10_0000 + 44))
        .unwrap();
    assert_eq!(data, payload);

    // Header and payload in separate descriptors.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x30_0000, 44, VRING_DESC_F_WRITE, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x40_0000, 4096, VRING_DESC_F_WRITE, 0)),
    ];
    let mut chain = vq.build_desc_chain(&descs).unwrap();
    let used = write_rx_packet(&mem, &mut chain, &hdr, &payload).unwrap();
    assert_eq!(used, 44 + 500);
    let mut data = vec![0u8; 500];
    mem.read_slice(&mut data, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(data, payload);

    // Too small for the payload / read-only: refused.
    let d = RawDescriptor::from(SplitDescriptor::new(
        0x10_0000,
        44 + 100,
        VRING_DESC_F_WRITE,
        0,
    ));
    let mut chain = vq.build_desc_chain(&[d]).unwrap();
    assert_eq!(write_rx_packet(&mem, &mut chain, &hdr, &payload), None);
    let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44 + 4096, 0, 0));
    let chain = vq.build_desc_chain(&[d]).unwrap();
    assert_eq!(rx_chain_capacity(&mem, &chain), None);
}

#[test]
fn vsock_validate_header_cases() {
    let ok = guest_hdr(1, 2, VSOCK_OP_RW);
    assert!(validate_tx_header(&Header { len: 10, ..ok }, GUEST_CID).is_ok());
    assert!(matches!(
        validate_tx_header(&Header { src_cid: 4, ..ok }, GUEST_CID),
        Err(PacketError::SrcCid {
            got: 4,
            expected: 3
        })
    ));
    assert!(matches!(
        validate_tx_header(&Header { dst_cid: 5, ..ok }, GUEST_CID),
        Err(PacketError::DstCid(5))
    ));
    assert!(matches!(
        validate_tx_header(&Header { type_: 2, ..ok }, GUEST_CID),
        Err(PacketError::Type(2))
    ));
    for op in [0u16, 8, 0xffff] {
        assert!(matches!(
            validate_tx_header(&Header { op, ..ok }, GUEST_CID),
            Err(PacketError::Op(o)) if o == op
        ));
    }
    assert!(matches!(
        validate_tx_header(
            &Header {
                op: VSOCK_OP_REQUEST,
                len: 4,
                ..ok
            },
            GUEST_CID
        ),
        Err(PacketError::UnexpectedPayload { op: 1, len: 4 })
    ));
}

#[test]
fn vsock_parse_connect_line() {
    assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
    assert_eq!(parse_connect_line(b"CONNECT 1024\r"), Some(1024));
    assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT 4294967296",
        b"connect 1",
        b"CONNECT 1 2",
        b"\xff",
    ] {
        assert_eq!(
            parse_connect_line(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

// ---------------------------------------------------------------------------
// Protocol flows with real Unix sockets.

#[test]
fn vsock_host_initiated_flow() {
    let mut h = Harness::new();
    let (mut client, host_port) = h.host_connect(1024);
    assert_eq!(host_port, HOST_PORT_BASE);

    // host → guest
    let up = pattern(10_000, 5);
    client.write_all(&up).unwrap();
    let got = h.read_guest_bytes(host_port, 1024, up.len());
    assert_eq!(got, up);

    // guest → host, one-descriptor and split packets
    let down1 = pattern(1500, 9);
    let down2 = pattern(700, 11);
    h.send(guest_hdr(1024, host_port, VSOCK_OP_RW), &down1);
    h.send_split(guest_hdr(1024, host_port, VSOCK_OP_RW), &down2);
    let got = read_exact_timeout(&mut client, 2200);
    assert_eq!(&got[..1500], &down1[..]);
    assert_eq!(&got[1500..], &down2[..]);

    // Second client gets the next host port.
    let (_c2, p2) = h.host_connect(1024);
    assert_eq!(p2, HOST_PORT_BASE + 1);
    assert_eq!(h.muxer.num_connections(), 2);
}

#[test]
fn vsock_host_initiated_guest_refuses() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = h.expect_op(VSOCK_OP_REQUEST);
    h.send(guest_hdr(77, req.src_port, VSOCK_OP_RST), &[]);
    assert_eq!(h.muxer.num_connections(), 0);
    assert_eq!(read_to_eof(&mut client), b"");
    // No RST is answered to an RST.
    assert!(h.settle().is_empty());
}

#[test]
fn vsock_host_client_bad_connect_line_is_closed() {
    let mut h = Harness::new();
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"HELLO 1024\n").unwrap();
    let mut c2 = UnixStream::connect(&h.uds).unwrap();
    c2.write_all(&[b'7'; 100]).unwrap();
    assert!(h.settle().is_empty());
    assert_eq!(read_to_eof(&mut c), b"");
    assert_eq!(read_to_eof(&mut c2), b"");
    assert_eq!(h.muxer.num_connections(), 0);
}

#[test]
fn vsock_guest_initiated_flow() {
    let mut h = Harness::new();
    let svc = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    let mut req = guest_hdr(40_000, 5000, VSOCK_OP_REQUEST);
    req.buf_alloc = 64 * 1024;
    h.send(req, &[]);
    let (resp, _) = h.expect_op(VSOCK_OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 40_000));
    assert_eq!(resp.buf_alloc, CONN_BUF_ALLOC);
    let (mut server, _) = svc.accept().unwrap();

    let down = pattern(20_000, 1);
    for chunk in down.chunks(4096) {
        h.send(guest_hdr(40_000, 5000, VSOCK_OP_RW), chunk);
    }
    assert_eq!(read_exact_timeout(&mut server, down.len()), down);

    let up = pattern(30_000, 2);
    server.write_all(&up).unwrap();
    assert_eq!(h.read_guest_bytes(5000, 40_000, up.len()), up);
}

#[test]
fn vsock_guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.send(guest_hdr(40_001, 6000, VSOCK_OP_REQUEST), &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, 40_001));
    assert_eq!(h.muxer.num_connections(), 0);
    // A stale socket file with nobody listening: refused too.
    let path = format!("{}_6001", h.uds.display());
    drop(UnixListener::bind(&path).unwrap());
    assert!(Path::new(&path).exists());
    h.send(guest_hdr(40_002, 6001, VSOCK_OP_REQUEST), &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.dst_port, 40_002);
}

#[test]
fn vsock_rst_for_unknown_connections() {
    let mut h = Harness::new();
    for op in [
        VSOCK_OP_RW,
        VSOCK_OP_RESPONSE,
        VSOCK_OP_SHUTDOWN,
        VSOCK_OP_CREDIT_UPDATE,
        VSOCK_OP_CREDIT_REQUEST,
    ] {
        let data: &[u8] = if op == VSOCK_OP_RW { b"xyz" } else { b"" };
        h.send(guest_hdr(999, 888, op), data);
        let (rst, _) = h.expect_op(VSOCK_OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (888, 999));
    }
    h.send(guest_hdr(999, 888, VSOCK_OP_RST), &[]);
    assert!(h.settle().is_empty());
}

#[test]
fn vsock_guest_misbehaviour_resets_connection() {
    let mut h = Harness::new();
    // RW before the guest accepted a host-initiated connection.
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    let (req, _) = h.expect_op(VSOCK_OP_REQUEST);
    h.send(guest_hdr(1, req.src_port, VSOCK_OP_RW), b"early");
    h.expect_op(VSOCK_OP_RST);
    assert_eq!(read_to_eof(&mut client), b"");

    // Duplicate RESPONSE on an established connection.
    let (mut c, port) = h.host_connect(2);
    h.send(guest_hdr(2, port, VSOCK_OP_RESPONSE), &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.src_port, port);
    assert_eq!(read_to_eof(&mut c), b"");
    assert_eq!(h.muxer.num_connections(), 0);
}

#[test]
fn vsock_malformed_headers() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);

    // Wrong source CID / destination CID: dropped silently, chain returned.
    let used = h.send(
        Header {
            src_cid: 99,
            ..guest_hdr(1024, port, VSOCK_OP_RW)
        },
        b"bad",
    );
    assert_eq!(used.len(), 1);
    let used = h.send(
        Header {
            dst_cid: 7,
            ..guest_hdr(1024, port, VSOCK_OP_RW)
        },
        b"bad",
    );
    assert_eq!(used.len(), 1);
    assert!(h.settle().is_empty());
    assert_eq!(h.muxer.num_connections(), 1);

    // Truncated descriptor: dropped, chain returned.
    let used = h.send_raw(&[(TX_BUF_BASE, 10, 0)]);
    assert_eq!(used, vec![(used[0].0, 0)]);
    // Descriptor outside guest memory.
    let used = h.send_raw(&[(MEM_SIZE as u64 + 0x1000, 44, 0)]);
    assert_eq!(used.len(), 1);
    assert!(h.settle().is_empty());
    assert_eq!(h.muxer.num_connections(), 1);

    // Unknown type on an unknown port pair: RST.
    h.send(
        Header {
            type_: 2,
            ..guest_hdr(5, 6, VSOCK_OP_REQUEST)
        },
        &[],
    );
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6, 5));
    // Unknown op on an unknown pair: RST.
    h.send(guest_hdr(5, 6, 42), &[]);
    h.expect_op(VSOCK_OP_RST);
    // Payload on a control op: RST.
    h.send(guest_hdr(5, 6, VSOCK_OP_CREDIT_UPDATE), b"junk");
    h.expect_op(VSOCK_OP_RST);
    assert_eq!(h.muxer.num_connections(), 1);

    // len over the 64 KiB maximum on the live connection: it is reset.
    let mut big = guest_hdr(1024, port, VSOCK_OP_RW);
    big.len = MAX_PKT_PAYLOAD + 1;
    let addr = TX_BUF_BASE;
    h.mem
        .write_slice(&big.to_bytes(), GuestAddress(addr))
        .unwrap();
    let used = h.send_raw(&[(addr, 44, 0), (addr + 0x100, 0x2_0000, 0)]);
    assert_eq!(used.len(), 1);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (port, 1024));
    assert_eq!(h.muxer.num_connections(), 0);
    assert_eq!(read_to_eof(&mut client), b"");
}

#[test]
fn vsock_unknown_op_on_live_connection_resets_it() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    h.send(guest_hdr(1024, port, 9), &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.src_port, port);
    assert_eq!(read_to_eof(&mut client), b"");
}

#[test]
fn vsock_credit_host_to_guest_never_oversends() {
    let mut h = Harness::new();
    let svc = UnixListener::bind(format!("{}_7000", h.uds.display())).unwrap();
    let guest_buf: u32 = 16 * 1024;
    let mut req = guest_hdr(50_000, 7000, VSOCK_OP_REQUEST);
    req.buf_alloc = guest_buf;
    h.send(req, &[]);
    h.expect_op(VSOCK_OP_RESPONSE);
    let (server, _) = svc.accept().unwrap();
    let up = pattern(100_000, 4);
    let writer = {
        let up = up.clone();
        let mut s = server.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&up).unwrap())
    };

    // Without credit updates the device sends exactly the guest's buffer, then
    // asks for credit.
    let (creq, _) = h.expect_op(VSOCK_OP_CREDIT_REQUEST);
    assert_eq!(creq.dst_port, 50_000);
    let rw: Vec<_> = h
        .received
        .drain(..)
        .filter(|(hd, _)| hd.op == VSOCK_OP_RW)
        .collect();
    let sent: usize = rw.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(sent, guest_buf as usize);
    assert!(
        h.settle().iter().all(|(hd, _)| hd.op != VSOCK_OP_RW),
        "sent past the credit"
    );
    let conn = h.muxer.connection(7000, 50_000).unwrap();
    assert_eq!(conn.peer_free(), 0);
    assert!(conn.rx_buffered() <= guest_buf as usize);

    // The guest consumes in steps; every step lets exactly that much through.
    let mut got: Vec<u8> = rw.into_iter().flat_map(|(_, d)| d).collect();
    let mut fwd = 0u32;
    while got.len() < up.len() {
        fwd = got.len() as u32;
        let mut upd = guest_hdr(50_000, 7000, VSOCK_OP_CREDIT_UPDATE);
        upd.buf_alloc = guest_buf;
        upd.fwd_cnt = fwd;
        h.send(upd, &[]);
        let target = (fwd as usize + guest_buf as usize).min(up.len());
        while got.len() < target {
            let (_, d) = h.expect_op(VSOCK_OP_RW);
            got.extend_from_slice(&d);
            assert!(
                got.len() <= target,
                "device sent {} bytes with credit up to {target}",
                got.len()
            );
        }
    }
    assert_eq!(got, up);
    writer.join().unwrap();
    let _ = fwd;
    drop(server);
}

#[test]
fn vsock_credit_request_and_update_from_device() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    // Guest asks for credit: answered with CREDIT_UPDATE carrying buf_alloc and fwd_cnt.
    h.send(guest_hdr(1024, port, VSOCK_OP_CREDIT_REQUEST), &[]);
    let (upd, _) = h.expect_op(VSOCK_OP_CREDIT_UPDATE);
    assert_eq!((upd.buf_alloc, upd.fwd_cnt), (CONN_BUF_ALLOC, 0));

    // After the host consumed the threshold, the device sends an update on its own.
    let reader = std::thread::spawn(move || {
        let n = CREDIT_UPDATE_THRESHOLD as usize + 10;
        let v = read_exact_timeout(&mut client, n);
        (client, v)
    });
    let data = pattern(CREDIT_UPDATE_THRESHOLD as usize + 10, 8);
    for c in data.chunks(MAX_PKT_PAYLOAD as usize) {
        h.send(guest_hdr(1024, port, VSOCK_OP_RW), c);
    }
    let (upd, _) = h.expect("credit update with fwd_cnt", |hd| {
        hd.op == VSOCK_OP_CREDIT_UPDATE && hd.fwd_cnt >= CREDIT_UPDATE_THRESHOLD
    });
    assert!(upd.fwd_cnt as usize <= data.len());
    let (_client, got) = reader.join().unwrap();
    assert_eq!(got, data);
}

#[test]
fn vsock_guest_exceeding_credit_is_reset() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    // Exactly the advertised buffer is fine even though the host reads nothing.
    let chunk = pattern(MAX_PKT_PAYLOAD as usize, 1);
    for _ in 0..(CONN_BUF_ALLOC / MAX_PKT_PAYLOAD) {
        h.send(guest_hdr(1024, port, VSOCK_OP_RW), &chunk);
    }
    assert_eq!(h.muxer.num_connections(), 1);
    assert!(h.received.iter().all(|(hd, _)| hd.op != VSOCK_OP_RST));
    // One byte more than the credit: reset.
    h.send(guest_hdr(1024, port, VSOCK_OP_RW), b"!");
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.src_port, port);
    assert_eq!(h.muxer.num_connections(), 0);
    // The host client sees (part of) the data, then EOF.
    let got = read_to_eof(&mut client);
    assert!(got.len() <= CONN_BUF_ALLOC as usize);
}

#[test]
fn vsock_shutdown_host_write_side() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    client.write_all(b"last words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (sd, _) = h.expect_op(VSOCK_OP_SHUTDOWN);
    assert_ne!(sd.flags & VSOCK_SHUTDOWN_F_SEND, 0);
    assert_eq!(sd.flags & VSOCK_SHUTDOWN_F_RECEIVE, 0);
    // All data came before the SHUTDOWN.
    let (d, payload) = h.received.pop_front().unwrap();
    assert_eq!(
        (d.op, payload.as_slice()),
        (VSOCK_OP_RW, &b"last words"[..])
    );
    // The other direction still works.
    h.send(guest_hdr(1024, port, VSOCK_OP_RW), b"reply");
    assert_eq!(read_exact_timeout(&mut client, 5), b"reply");
}

#[test]
fn vsock_shutdown_guest_send_then_close() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    h.send(guest_hdr(1024, port, VSOCK_OP_RW), b"bye");
    let mut sd = guest_hdr(1024, port, VSOCK_OP_SHUTDOWN);
    sd.flags = VSOCK_SHUTDOWN_F_SEND;
    h.send(sd, &[]);
    // The client reads the data then EOF, and can still write.
    let mut buf = Vec::new();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"bye");
    client.write_all(b"still here").unwrap();
    assert_eq!(h.read_guest_bytes(port, 1024, 10), b"still here");
    assert_eq!(h.muxer.num_connections(), 1);
    // Data after SHUTDOWN(SEND) is a protocol violation.
    h.send(guest_hdr(1024, port, VSOCK_OP_RW), b"zombie");
    h.expect_op(VSOCK_OP_RST);
    assert_eq!(h.muxer.num_connections(), 0);
}

#[test]
fn vsock_shutdown_both_closes_with_rst() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    h.send(guest_hdr(1024, port, VSOCK_OP_RW), b"final");
    let mut sd = guest_hdr(1024, port, VSOCK_OP_SHUTDOWN);
    sd.flags = VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE;
    h.send(sd, &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (port, 1024));
    assert_eq!(h.muxer.num_connections(), 0);
    assert_eq!(read_to_eof(&mut client), b"final");
}

#[test]
fn vsock_host_full_close_sends_shutdown_both() {
    let mut h = Harness::new();
    let (client, port) = h.host_connect(1024);
    drop(client);
    let (sd, _) = h.expect_op(VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.src_port, port);
    assert_ne!(sd.flags & VSOCK_SHUTDOWN_F_SEND, 0);
    // The guest closes its end with RST: the connection is gone.
    h.send(guest_hdr(1024, port, VSOCK_OP_RST), &[]);
    assert_eq!(h.muxer.num_connections(), 0);
    // Writes from the guest to a closed host socket are answered with RST.
    let (_c, port2) = h.host_connect(1024);
    drop(_c);
    h.expect_op(VSOCK_OP_SHUTDOWN);
    h.send(guest_hdr(1024, port2, VSOCK_OP_RW), b"anyone?");
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.src_port, port2);
}

#[test]
fn vsock_buffers_host_data_without_rx_buffers() {
    let mut h = Harness::new();
    let (mut client, port) = h.host_connect(1024);
    h.auto_rx = false;
    let posted = h.rx_posted;
    let data = pattern(50_000, 6);
    client.write_all(&data).unwrap();
    for _ in 0..50 {
        h.pump();
    }
    // The posted buffers were filled; the rest waits in the device.
    assert_eq!(h.rx_posted, 0);
    assert_eq!(h.received.len(), posted);
    assert!(h.muxer.has_rx());
    let conn = h.muxer.connection(port, 1024).unwrap();
    assert!(conn.rx_buffered() > 0);
    assert!(
        conn.rx_buffered() <= 256 * 1024,
        "buffered beyond the guest's credit"
    );
    // Buffers arrive; split layout this time.
    for _ in 0..20 {
        h.post_rx(4096, true);
    }
    h.auto_rx = true;
    assert_eq!(h.read_guest_bytes(port, 1024, data.len()), data);
}

#[test]
fn vsock_connection_limit() {
    let mut h = Harness::with_limit(2);
    let svc = UnixListener::bind(format!("{}_8000", h.uds.display())).unwrap();
    for src in [1u32, 2] {
        h.send(guest_hdr(src, 8000, VSOCK_OP_REQUEST), &[]);
        h.expect_op(VSOCK_OP_RESPONSE);
    }
    h.send(guest_hdr(3, 8000, VSOCK_OP_REQUEST), &[]);
    let (rst, _) = h.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.dst_port, 3);
    assert_eq!(h.muxer.num_connections(), 2);
    // Host clients beyond the limit are closed.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    let _ = c.write_all(b"CONNECT 1024\n");
    h.settle();
    assert_eq!(read_to_eof(&mut c), b"");
    // Freeing one slot admits a new connection.
    h.send(guest_hdr(1, 8000, VSOCK_OP_RST), &[]);
    h.send(guest_hdr(4, 8000, VSOCK_OP_REQUEST), &[]);
    h.expect_op(VSOCK_OP_RESPONSE);
    drop(svc);
}

/// Host clients that connect and never send `CONNECT` cannot lock out the
/// shim: they do not take connection slots, and beyond
/// `MAX_PENDING_CLIENTS` the oldest silent one is closed.
#[test]
fn vsock_silent_host_clients_do_not_block_new_ones() {
    use crate::devices::virtio::vsock::muxer::MAX_PENDING_CLIENTS;
    let mut h = Harness::with_limit(2);
    let mut silent: Vec<UnixStream> = (0..MAX_PENDING_CLIENTS + 3)
        .map(|_| {
            let c = UnixStream::connect(&h.uds).unwrap();
            h.settle();
            c
        })
        .collect();
    // The shim's client still gets its connection, twice (the slot limit).
    let (_a, _) = h.host_connect(1024);
    let (_b, _) = h.host_connect(1025);
    assert_eq!(h.muxer.num_connections(), 2);
    // The oldest silent clients were closed; the newest are still waiting.
    for c in silent.iter_mut().take(3) {
        assert_eq!(read_to_eof(c), b"", "oldest silent client closed");
    }
    let newest = silent.last_mut().unwrap();
    newest.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        newest.read(&mut b).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "newest silent client still open"
    );
}

/// A client whose CONNECT line is already sent survives a burst of silent
/// clients accepted in the same wake-up: it is served, not evicted.
#[test]
fn vsock_client_ahead_of_a_burst_of_silent_ones_is_served() {
    use crate::devices::virtio::vsock::muxer::MAX_PENDING_CLIENTS;
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let _silent: Vec<UnixStream> = (0..MAX_PENDING_CLIENTS + 8).map(|_| UnixStream::connect(&h.uds).unwrap()).collect();
    let (req, _) = h.expect_op(VSOCK_OP_REQUEST);
    assert_eq!(req.dst_port, 1024);
    h.send(guest_hdr(1024, req.src_port, VSOCK_OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
}

#[test]
fn vsock_host_ports_do_not_collide() {
    let mut h = Harness::new();
    let mut ports = std::collections::HashSet::new();
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (c, p) = h.host_connect(1024);
        assert!(ports.insert(p), "port {p} reused while live");
        clients.push(c);
    }
    // Close one; later ones still never collide with live ones.
    h.send(guest_hdr(1024, HOST_PORT_BASE + 1, VSOCK_OP_RST), &[]);
    for _ in 0..3 {
        let (c, p) = h.host_connect(1024);
        let live: Vec<u32> = h
            .muxer
            .connection_keys()
            .iter()
            .map(|k| k.local_port)
            .collect();
        assert_eq!(live.iter().filter(|&&x| x == p).count(), 1);
        clients.push(c);
    }
}

#[test]
fn vsock_event_queue_transport_reset() {
    let mem = new_mem();
    let (mut d, mut q) = DriverQueue::new(&mem, EVENT_QUEUE_ADDR);
    let mut pending = false;
    assert!(!process_event_queue(&mut q, &mem, &mut pending));
    pending = true;
    // A read-only buffer is returned unused, the next good one gets the event.
    d.add_chain(&mem, &[(0x10_0000, 4, 0)]);
    d.add_chain(&mem, &[(0x10_1000, 8, VRING_DESC_F_WRITE)]);
    mem.write_obj(0xdead_beef_u32, GuestAddress(0x10_1000))
        .unwrap();
    assert!(process_event_queue(&mut q, &mem, &mut pending));
    assert!(!pending);
    let used = d.take_used(&mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 4);
    let id: u32 = mem.read_obj(GuestAddress(0x10_1000)).unwrap();
    assert_eq!(u32::from_le(id), VSOCK_EVENT_TRANSPORT_RESET);
}

// ---------------------------------------------------------------------------
// The device: config space, socket file lifecycle, worker thread.

#[test]
fn vsock_device_config_and_socket_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    // A stale socket file is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(0x1_2345, &path).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(
        dev.features(),
        crate::devices::virtio::VIRTIO_F_VERSION_1
            | crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX
    );
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x1_2345);
    let mut hi = [0xffu8; 6];
    dev.read_config(6, &mut hi);
    assert_eq!(hi, [0, 0, 0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut hi);
    assert_eq!(hi, [0; 6]);
    UnixStream::connect(&path).unwrap();
    drop(dev);
    assert!(!path.exists(), "socket file not removed on drop");

    // A regular file is not clobbered.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(Vsock::new(3, &path), Err(Error::Muxer(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    for cid in [0u64, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, &dir.path().join("x")),
            Err(Error::InvalidCid(_))
        ));
    }
}

/// Drives the real worker thread through `activate`: host-initiated connect,
/// data both ways, then reset + re-activate delivers TRANSPORT_RESET.
#[test]
fn vsock_device_worker_thread_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mem = new_mem();

    let activate = |dev: &mut Vsock, mem: &GuestMemory| {
        let (rxd, rx) = DriverQueue::new(mem, RX_QUEUE_ADDR);
        let (txd, tx) = DriverQueue::new(mem, TX_QUEUE_ADDR);
        let (evd, ev) = DriverQueue::new(mem, EVENT_QUEUE_ADDR);
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![rx, tx, ev],
            queue_evts: evts,
            interrupt: irq.clone(),
            acked_features: crate::devices::virtio::VIRTIO_F_VERSION_1,
        };
        dev.activate(ctx).unwrap();
        (rxd, txd, evd, kicks, irq)
    };
    let (mut rxd, mut txd, _evd, kicks, irq) = activate(&mut dev, &mem);

    // Guest posts rx buffers and kicks.
    let mut rx_addrs = HashMap::new();
    for i in 0..16u64 {
        let a = RX_BUF_BASE + i * BUF_STRIDE;
        let idx = rxd.add_chain(&mem, &[(a, 44 + 4096, VRING_DESC_F_WRITE)]);
        rx_addrs.insert(idx[0], a);
    }
    kicks[0].write(1).unwrap();

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let wait_rx = |rxd: &mut DriverQueue| -> Header {
        let start = Instant::now();
        loop {
            let used = rxd.take_used(&mem);
            if let Some(&(head, _)) = used.first() {
                assert_eq!(used.len(), 1);
                let mut hb = [0u8; PKT_HEADER_SIZE];
                mem.read_slice(&mut hb, GuestAddress(rx_addrs[&head]))
                    .unwrap();
                return Header::from_bytes(&hb);
            }
            assert!(start.elapsed() < WAIT, "no rx packet from the worker");
            // The worker signals the irqfd when it used buffers.
            let _ = irq.irqfd().read();
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let req = wait_rx(&mut rxd);
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    assert_ne!(
        irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_VRING,
        0
    );

    let put_tx = |txd: &mut DriverQueue, hdr: Header, data: &[u8]| {
        txd.put_packet(&mem, hdr, data);
        kicks[1].write(1).unwrap();
    };
    put_tx(
        &mut txd,
        guest_hdr(1024, req.src_port, VSOCK_OP_RESPONSE),
        &[],
    );
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
    put_tx(
        &mut txd,
        guest_hdr(1024, req.src_port, VSOCK_OP_RW),
        b"ping",
    );
    assert_eq!(read_exact_timeout(&mut client, 4), b"ping");
    client.write_all(b"pong").unwrap();
    let rw = wait_rx(&mut rxd);
    assert_eq!((rw.op, rw.len), (VSOCK_OP_RW, 4));

    // Reset drops the connection; the next activation reports TRANSPORT_RESET.
    assert!(dev.reset());
    assert_eq!(read_to_eof(&mut client), b"");
    let (_rxd, _txd, mut evd, kicks2, _irq2) = activate(&mut dev, &mem);
    evd.add_chain(&mem, &[(0x10_0000, 4, VRING_DESC_F_WRITE)]);
    mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
        .unwrap();
    kicks2[2].write(1).unwrap();
    let start = Instant::now();
    loop {
        let used = evd.take_used(&mem);
        if !used.is_empty() {
            assert_eq!(used[0].1, 4);
            break;
        }
        assert!(start.elapsed() < WAIT, "no transport reset event");
        std::thread::sleep(Duration::from_millis(2));
    }
    let id: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(id, VSOCK_EVENT_TRANSPORT_RESET);
    drop(dev);
    assert!(!path.exists());
}

// ---------------------------------------------------------------------------
// VIRTIO_RING_F_EVENT_IDX: notification suppression in both directions.

/// A guest REQUEST to a port nobody listens on: the device answers with RST,
/// which gives the rx queue a packet to deliver.
fn refused_request(port: u32) -> Header {
    guest_hdr(port, 4242, VSOCK_OP_REQUEST)
}

#[test]
fn vsock_event_idx_tx_rearms_after_draining() {
    let mut h = Harness::new();
    h.tx.set_event_idx(true);
    for (i, port) in (5000..5003).enumerate() {
        let old = h.txd.avail_idx;
        h.txd
            .add_chain(&h.mem, &[(TX_BUF_BASE, PKT_HEADER_SIZE as u32, 0)]);
        h.mem
            .write_slice(&refused_request(port).to_bytes(), GuestAddress(TX_BUF_BASE))
            .unwrap();
        // Before the device ran, avail_event still names the chain just added:
        // the driver kicks.
        assert!(
            h.txd.must_kick(&h.mem, old),
            "packet {i}: no kick asked for"
        );
        assert_eq!(h.run_tx().len(), 1);
        // Drained: the device asks to hear about the next chain.
        assert_eq!(h.txd.avail_event(&h.mem), h.txd.avail_idx);
    }
    // Two chains added without running the device: only the first needs a kick.
    let old = h.txd.avail_idx;
    h.mem
        .write_slice(&refused_request(6000).to_bytes(), GuestAddress(TX_BUF_BASE))
        .unwrap();
    h.txd
        .add_chain(&h.mem, &[(TX_BUF_BASE, PKT_HEADER_SIZE as u32, 0)]);
    assert!(h.txd.must_kick(&h.mem, old));
    let mid = h.txd.avail_idx;
    h.txd
        .add_chain(&h.mem, &[(TX_BUF_BASE, PKT_HEADER_SIZE as u32, 0)]);
    assert!(
        !h.txd.must_kick(&h.mem, mid),
        "a second kick for the same batch"
    );
    assert_eq!(h.run_tx().len(), 2);
}

#[test]
fn vsock_event_idx_rx_rearms_when_out_of_buffers() {
    let mut h = Harness::new();
    h.rx.set_event_idx(true);
    h.auto_rx = false;
    for port in 5000..5003 {
        h.send(refused_request(port), &[]);
    }
    // One buffer for three pending RSTs: one delivered, then the queue runs dry
    // and the device asks for a kick at the next buffer.
    h.post_rx(4096, false);
    h.run_rx();
    assert_eq!(h.received.len(), 1);
    assert_eq!(h.rxd.avail_event(&h.mem), 1);
    let old = h.rxd.avail_idx;
    h.post_rx(4096, false);
    assert!(h.rxd.must_kick(&h.mem, old));
    h.run_rx();
    assert_eq!(h.received.len(), 2);
    assert_eq!(h.rxd.avail_event(&h.mem), 2);
    // The last RST takes the next buffer; then nothing is pending and a further
    // buffer stays posted, with avail_event unchanged.
    h.post_rx(4096, false);
    h.run_rx();
    assert_eq!(h.received.len(), 3);
    let event = h.rxd.avail_event(&h.mem);
    h.post_rx(4096, false);
    h.run_rx();
    assert_eq!(h.received.len(), 3);
    assert_eq!(h.rx_posted, 1);
    assert_eq!(h.rxd.avail_event(&h.mem), event);
}

#[test]
fn vsock_event_idx_interrupt_only_past_used_event() {
    let dir = tempfile::tempdir().unwrap();
    let mem = new_mem();
    let (rxd, mut rx) = DriverQueue::new(&mem, RX_QUEUE_ADDR);
    let (mut txd, mut tx) = DriverQueue::new(&mem, TX_QUEUE_ADDR);
    let (_evd, ev) = DriverQueue::new(&mem, EVENT_QUEUE_ADDR);
    rx.set_event_idx(true);
    tx.set_event_idx(true);
    let mut worker = super::event_handler::Worker {
        mem: mem.clone(),
        queues: vec![rx, tx, ev],
        queue_evts: (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        muxer: Muxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap(),
        kill_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        reset_pending: false,
    };
    let send = |txd: &mut DriverQueue, port: u32| {
        txd.put_packet(&mem, refused_request(port), &[]);
    };
    // The driver wants an interrupt once the used index passes 2 (third entry).
    txd.set_used_event(&mem, 2);
    rxd.set_used_event(&mem, 0);
    send(&mut txd, 5000);
    assert!(
        !worker.run_queues(),
        "interrupt before used_event was reached"
    );
    send(&mut txd, 5001);
    assert!(
        !worker.run_queues(),
        "interrupt before used_event was reached"
    );
    send(&mut txd, 5002);
    assert!(
        worker.run_queues(),
        "no interrupt once used_event was passed"
    );
    assert_eq!(txd.take_used(&mem).len(), 3);
    // The RSTs wait for rx buffers; nothing used, nothing to signal.
    assert!(!worker.run_queues());
}

/// A guest that sets `avail.idx` more than a ring ahead (which the queue refuses)
/// must not keep `process_tx`/`process_rx` looping on "buffers arrived meanwhile".
#[test]
fn vsock_event_idx_broken_avail_index_does_not_spin() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut h = Harness::new();
        h.tx.set_event_idx(true);
        h.rx.set_event_idx(true);
        h.auto_rx = false;
        h.send(refused_request(5000), &[]); // an RST now waits for rx
        let bogus = QSIZE + 5;
        for q in [h.txd.avail, h.rxd.avail] {
            h.mem.write_obj(bogus.to_le(), GuestAddress(q + 2)).unwrap();
        }
        let tx_used = process_tx(&mut h.tx, &h.mem, &mut h.muxer);
        let rx_used = process_rx(&mut h.rx, &h.mem, &mut h.muxer);
        done_tx.send((tx_used, rx_used)).unwrap();
    });
    let got = done_rx.recv_timeout(WAIT).expect("process_tx/process_rx spin on a broken ring");
    assert_eq!(got, (false, false));
}

/// The worker thread against a driver that kicks only when `avail_event` asks
/// for it and looks at its used rings only after an interrupt: a lost
/// notification in either direction stalls the transfer and fails the test.
#[test]
fn vsock_event_idx_worker_loses_no_notification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mem = new_mem();
    let (mut rxd, mut rx) = DriverQueue::new(&mem, RX_QUEUE_ADDR);
    let (mut txd, mut tx) = DriverQueue::new(&mem, TX_QUEUE_ADDR);
    let (_evd, ev) = DriverQueue::new(&mem, EVENT_QUEUE_ADDR);
    rx.set_event_idx(true);
    tx.set_event_idx(true);
    let evts: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![rx, tx, ev],
        queue_evts: evts,
        interrupt: irq.clone(),
        acked_features: crate::devices::virtio::VIRTIO_F_VERSION_1
            | crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX,
    })
    .unwrap();

    // Few, small rx buffers so the device runs dry again and again.
    const RX_BUFS: u64 = 8;
    const RX_CAP: u32 = 4096;
    let mut rx_addr = HashMap::new();
    let post_rx = |rxd: &mut DriverQueue, rx_addr: &mut HashMap<u16, u64>, slot: u64| {
        let a = RX_BUF_BASE + slot * BUF_STRIDE;
        let old = rxd.avail_idx;
        let idx = rxd.add_chain(
            &mem,
            &[(a, PKT_HEADER_SIZE as u32 + RX_CAP, VRING_DESC_F_WRITE)],
        );
        rx_addr.insert(idx[0], a);
        if rxd.must_kick(&mem, old) {
            kicks[0].write(1).unwrap();
        }
    };
    for slot in 0..RX_BUFS {
        post_rx(&mut rxd, &mut rx_addr, slot);
    }
    let send = |txd: &mut DriverQueue, hdr: Header, data: &[u8]| {
        let old = txd.put_packet(&mem, hdr, data);
        if txd.must_kick(&mem, old) {
            kicks[1].write(1).unwrap();
        }
    };
    // Like Linux's virtqueue_enable_cb + virtqueue_poll: re-arms both used_event
    // fields, looks once, and otherwise sleeps until an interrupt. Returns what
    // the rx ring delivered (its buffers re-posted at once).
    let wait_irq = |rxd: &mut DriverQueue,
                    txd: &mut DriverQueue,
                    rx_addr: &mut HashMap<u16, u64>| {
        let start = Instant::now();
        loop {
            rxd.set_used_event(&mem, rxd.used_seen);
            txd.set_used_event(&mem, txd.used_seen);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if rxd.has_used(&mem) || txd.has_used(&mem) {
                break;
            }
            while irq.irqfd().read().is_err() {
                assert!(
                    start.elapsed() < WAIT,
                    "no interrupt: a notification was lost (rx avail {} used {}/{} avail_event {}; tx avail {} used {} avail_event {})",
                    rxd.avail_idx, rxd.used_seen, u16::from_le(mem.read_obj::<u16>(GuestAddress(rxd.used + 2)).unwrap()), rxd.avail_event(&mem),
                    txd.avail_idx, txd.used_seen, txd.avail_event(&mem)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut got = Vec::new();
        for (head, len) in rxd.take_used(&mem) {
            let a = rx_addr.remove(&head).expect("unknown rx head");
            let mut hb = [0u8; PKT_HEADER_SIZE];
            mem.read_slice(&mut hb, GuestAddress(a)).unwrap();
            let hdr = Header::from_bytes(&hb);
            assert_eq!(len as usize, PKT_HEADER_SIZE + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            mem.read_slice(&mut data, GuestAddress(a + PKT_HEADER_SIZE as u64))
                .unwrap();
            got.push((hdr, data));
            post_rx(rxd, rx_addr, (a - RX_BUF_BASE) / BUF_STRIDE);
        }
        txd.take_used(&mem);
        got
    };

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let req = loop {
        if let Some((h, _)) = wait_irq(&mut rxd, &mut txd, &mut rx_addr)
            .into_iter()
            .next()
        {
            break h;
        }
    };
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    let host_port = req.src_port;
    send(&mut txd, guest_hdr(1024, host_port, VSOCK_OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {host_port}\n"));

    // Host → guest: 8 times the rx ring, exactly the guest's credit (guest_hdr).
    let total = 8 * RX_BUFS as usize * RX_CAP as usize;
    assert_eq!(total, 256 * 1024);
    let sent = pattern(total, 7);
    let writer = {
        let mut c = client.try_clone().unwrap();
        let data = sent.clone();
        std::thread::spawn(move || c.write_all(&data).unwrap())
    };
    let mut got = Vec::new();
    while got.len() < total {
        for (h, d) in wait_irq(&mut rxd, &mut txd, &mut rx_addr) {
            assert_eq!(
                (h.op, h.src_port, h.dst_port),
                (VSOCK_OP_RW, host_port, 1024)
            );
            got.extend_from_slice(&d);
        }
    }
    writer.join().unwrap();
    assert!(got == sent, "host → guest data differs");

    // Guest → host: more packets than the tx ring holds.
    for i in 0..(2 * QSIZE as usize) {
        send(
            &mut txd,
            guest_hdr(1024, host_port, VSOCK_OP_RW),
            &pattern(1000, i as u8),
        );
        if txd.next_desc == 0 || (txd.avail_idx.wrapping_sub(txd.used_seen)) >= QSIZE / 2 {
            // Let the device return buffers before reusing descriptors.
            while txd.avail_idx != txd.used_seen {
                wait_irq(&mut rxd, &mut txd, &mut rx_addr);
            }
        }
    }
    for i in 0..(2 * QSIZE as usize) {
        assert_eq!(
            read_exact_timeout(&mut client, 1000),
            pattern(1000, i as u8),
            "packet {i}"
        );
    }
    drop(dev);
}

// ---------------------------------------------------------------------------
// Property test: random tx chains never panic and keep the state consistent.

mod proptests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Input {
        /// A packet with a (mostly) plausible header, one or two descriptors.
        Packet {
            hdr: Header,
            payload_len: u16,
            split: bool,
        },
        /// Arbitrary descriptors: (offset into the tx area or wild address, len, flags).
        Raw(Vec<(u64, u32, u16)>),
        /// Arbitrary raw header bytes in one descriptor of arbitrary length.
        Bytes(Vec<u8>, u32),
    }

    fn header() -> impl Strategy<Value = Header> {
        (
            prop_oneof![Just(GUEST_CID), Just(GUEST_CID), any::<u64>()],
            prop_oneof![Just(2u64), Just(2u64), any::<u64>()],
            prop_oneof![1u32..4, any::<u32>()],
            prop_oneof![
                Just(9000u32),
                1u32..4,
                HOST_PORT_BASE..HOST_PORT_BASE + 3,
                any::<u32>()
            ],
            prop_oneof![Just(1u16), Just(1u16), any::<u16>()],
            prop_oneof![0u16..9, any::<u16>()],
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(
                |(src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc, fwd_cnt)| {
                    Header {
                        src_cid,
                        dst_cid,
                        src_port,
                        dst_port,
                        len: 0,
                        type_,
                        op,
                        flags,
                        buf_alloc,
                        fwd_cnt,
                    }
                },
            )
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            6 => (header(), prop_oneof![Just(0u16), 1u16..2048, any::<u16>()], any::<bool>())
                .prop_map(|(hdr, payload_len, split)| Input::Packet { hdr, payload_len, split }),
            2 => proptest::collection::vec(
                (
                    prop_oneof![0u64..0x40_0000, any::<u64>()],
                    prop_oneof![0u32..128, any::<u32>()],
                    0u16..8,
                ),
                1..4,
            )
            .prop_map(Input::Raw),
            2 => (proptest::collection::vec(any::<u8>(), 0..80), any::<u32>()).prop_map(|(b, l)| Input::Bytes(b, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn vsock_random_tx_chains_keep_state_consistent(inputs in proptest::collection::vec(input(), 1..24)) {
            let mut h = Harness::with_limit(4);
            let _svc = UnixListener::bind(format!("{}_9000", h.uds.display())).unwrap();
            let mut chains = 0usize;
            for inp in inputs {
                let used = match inp {
                    Input::Packet { mut hdr, payload_len, split } => {
                        let data = pattern(payload_len as usize, 1);
                        hdr.len = data.len() as u32;
                        if split { h.send_split(hdr, &data) } else { h.send(hdr, &data) }
                    }
                    Input::Raw(descs) => {
                        let descs: Vec<_> = descs
                            .into_iter()
                            .map(|(a, l, f)| (if a < 0x40_0000 { TX_BUF_BASE + a } else { a }, l, f))
                            .collect();
                        h.send_raw(&descs)
                    }
                    Input::Bytes(bytes, len) => {
                        h.mem.write_slice(&bytes, GuestAddress(TX_BUF_BASE)).unwrap();
                        h.send_raw(&[(TX_BUF_BASE, len, 0)])
                    }
                };
                chains += 1;
                // Every chain is returned to the driver exactly once, with used length 0.
                prop_assert_eq!(used.len(), 1);
                prop_assert_eq!(used[0].1, 0);
                h.pump();
                prop_assert!(h.muxer.num_connections() <= 4);
                for k in h.muxer.connection_keys() {
                    let c = h.muxer.connection(k.local_port, k.peer_port).unwrap();
                    prop_assert!(c.tx_buffered() <= CONN_BUF_ALLOC as usize);
                    prop_assert!(c.rx_buffered() <= c.peer_free() as usize + 256 * 1024);
                }
            }
            // Everything the device still wants to send goes out to rx buffers.
            for _ in 0..4 {
                h.pump();
            }
            prop_assert!(chains > 0);
            for (hdr, data) in h.received.drain(..) {
                prop_assert_eq!(hdr.len as usize, data.len());
                prop_assert!((VSOCK_OP_REQUEST..=VSOCK_OP_CREDIT_REQUEST).contains(&hdr.op));
            }
        }
    }
}
