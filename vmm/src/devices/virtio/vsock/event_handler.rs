//! Virtqueue processing for the vsock device and its worker thread.
//!
//! The queue functions ([`process_tx`], [`process_rx`], [`process_event_queue`])
//! are plain functions over a [`Queue`], [`GuestMemory`] and the [`Muxer`], so
//! unit tests drive them on mock guest memory. [`Worker::run`] is the thread
//! body: it epolls the three queue eventfds, a kill eventfd and the muxer's
//! epoll fd, and signals the driver through [`Interrupt::signal_used_queue`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::VSOCK_EVENT_TRANSPORT_RESET;
use super::packet::{read_tx_packet, rx_chain_capacity, write_event, write_rx_packet};
use crate::devices::virtio::{GuestMemory, Interrupt};

/// Index of the rx virtqueue (device → driver packets), virtio 1.2 §5.10.2.
pub const RX_QUEUE: usize = 0;
/// Index of the tx virtqueue (driver → device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event virtqueue.
pub const EVENT_QUEUE: usize = 2;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 3;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_MUXER: u64 = 4;

/// Asks the driver to notify the device about buffers it makes available from
/// now on (with `VIRTIO_RING_F_EVENT_IDX`: `avail_event` = the next index the
/// device reads, virtio 1.2 §2.7.10). Returns whether buffers arrived meanwhile,
/// i.e. whether the caller must look at the queue again before sleeping. A ring
/// the guest broke (unreadable, or `avail.idx` more than a ring ahead of the
/// device, which `pop_descriptor_chain` refuses) reads as "nothing more", so a
/// hostile guest cannot keep the worker spinning.
fn rearm(queue: &mut Queue, mem: &GuestMemory, which: &str) -> bool {
    match queue.enable_notification(mem) {
        Ok(false) => false,
        Ok(true) => match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0.wrapping_sub(queue.next_avail()) <= queue.size() => true,
            Ok(idx) => {
                log::warn!(
                    "vsock: {which} queue: available index {} is more than a ring ahead of {}",
                    idx.0,
                    queue.next_avail()
                );
                false
            }
            Err(e) => {
                log::warn!("vsock: {which} queue: cannot read the available index: {e}");
                false
            }
        },
        Err(e) => {
            log::warn!("vsock: {which} queue: cannot enable notifications: {e}");
            false
        }
    }
}

/// Drains the tx queue: every chain is parsed, handed to the muxer and
/// returned to the driver with used length 0. Malformed chains are returned
/// too (the muxer answers with RST where it can). Stops early while the
/// muxer's control backlog is full (it empties only through rx, and
/// [`Worker::run_queues`] runs tx again after rx progress);
/// otherwise re-arms the driver's notifications before it returns. Returns
/// whether any chain was used.
pub fn process_tx(queue: &mut Queue, mem: &GuestMemory, muxer: &mut Muxer) -> bool {
    let mut used = false;
    loop {
        while !muxer.ctrl_backlog_full() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match read_tx_packet(mem, &mut chain) {
                Ok(pkt) => muxer.send_pkt(pkt),
                Err(e) => {
                    log::debug!("vsock: {e}");
                    muxer.reject(&e);
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::error!("vsock: tx add_used: {e}");
            }
            used = true;
        }
        if muxer.ctrl_backlog_full() || !rearm(queue, mem, "tx") {
            return used;
        }
    }
}

/// Fills guest rx buffers with the muxer's pending packets. Malformed rx
/// chains are returned with used length 0 without losing a packet. When the
/// driver has no buffer left while packets wait, re-arms its notifications so
/// that it kicks the rx queue when it adds buffers. Returns whether any chain
/// was used.
pub fn process_rx(queue: &mut Queue, mem: &GuestMemory, muxer: &mut Muxer) -> bool {
    let mut used = false;
    while muxer.has_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            if rearm(queue, mem, "rx") {
                continue;
            }
            break;
        };
        let head = chain.head_index();
        let len = match rx_chain_capacity(mem, &chain) {
            Some(cap) => match muxer.next_rx(cap) {
                Some((hdr, data)) => match write_rx_packet(mem, &mut chain, &hdr, &data) {
                    Some(n) => n,
                    None => {
                        // Capacity was checked: only a racing guest gets here.
                        log::warn!("vsock: rx chain became unusable, packet dropped");
                        0
                    }
                },
                None => {
                    // Nothing to send after all: give the chain back untouched.
                    queue.go_to_previous_position();
                    break;
                }
            },
            None => {
                log::debug!("vsock: malformed rx descriptor chain");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            log::error!("vsock: rx add_used: {e}");
        }
        used = true;
    }
    used
}

/// Delivers a pending `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (§5.10.6.6) into
/// the event queue when `*reset_pending`; clears it once delivered. Returns
/// whether a chain was used.
pub fn process_event_queue(queue: &mut Queue, mem: &GuestMemory, reset_pending: &mut bool) -> bool {
    if !*reset_pending {
        return false;
    }
    let mut used = false;
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = write_event(mem, &mut chain, VSOCK_EVENT_TRANSPORT_RESET);
        if let Err(e) = queue.add_used(mem, head, len.unwrap_or(0)) {
            log::error!("vsock: event add_used: {e}");
        }
        used = true;
        if len.is_some() {
            *reset_pending = false;
            break;
        }
    }
    used
}

/// The device's queues, eventfds and muxer, owned by the worker thread.
pub struct Worker {
    /// Guest memory.
    pub mem: GuestMemory,
    /// rx, tx, event queues in that order.
    pub queues: Vec<Queue>,
    /// One ioeventfd per queue.
    pub queue_evts: Vec<EventFd>,
    /// Interrupt line towards the driver.
    pub interrupt: Arc<Interrupt>,
    /// The connection table.
    pub muxer: Muxer,
    /// Written by the device to stop the thread.
    pub kill_evt: EventFd,
    /// A transport-reset event must be delivered on the event queue.
    pub reset_pending: bool,
}

impl Worker {
    /// Processes tx then rx until neither makes progress; returns whether the
    /// driver must be interrupted: buffers were added to the rx or tx used ring
    /// and, with `VIRTIO_RING_F_EVENT_IDX`, that ring's `used_event` was passed
    /// (virtio 1.2 §2.7.10; without it, always).
    pub fn run_queues(&mut self) -> bool {
        let (mut rx_any, mut tx_any) = (false, false);
        loop {
            let (rx, rest) = self.queues.split_at_mut(TX_QUEUE);
            let tx_used = process_tx(&mut rest[0], &self.mem, &mut self.muxer);
            let rx_used = process_rx(&mut rx[RX_QUEUE], &self.mem, &mut self.muxer);
            rx_any |= rx_used;
            tx_any |= tx_used;
            if !tx_used && !rx_used {
                break;
            }
        }
        let mut notify = false;
        for (queue, used) in [(RX_QUEUE, rx_any), (TX_QUEUE, tx_any)] {
            // A ring the guest broke gets its interrupt anyway.
            notify |= used
                && self.queues[queue]
                    .needs_notification(&self.mem)
                    .unwrap_or(true);
        }
        notify
    }

    /// Thread body: runs until the kill eventfd fires or epoll fails, then
    /// returns the muxer so the device can reuse it after a reset.
    pub fn run(mut self) -> Muxer {
        if let Err(e) = self.event_loop() {
            log::error!("vsock: worker stopped: {e}");
        }
        self.muxer
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.queue_evts[RX_QUEUE].as_raw_fd(), TOKEN_RX)?;
        add(self.queue_evts[TX_QUEUE].as_raw_fd(), TOKEN_TX)?;
        add(self.queue_evts[EVENT_QUEUE].as_raw_fd(), TOKEN_EVENT)?;
        add(self.kill_evt.as_raw_fd(), TOKEN_KILL)?;
        add(self.muxer.epoll_fd(), TOKEN_MUXER)?;

        // Work queued before activation (e.g. host clients that connected early).
        self.process_all();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Ok(()),
                    TOKEN_RX => {
                        let _ = self.queue_evts[RX_QUEUE].read();
                    }
                    TOKEN_TX => {
                        let _ = self.queue_evts[TX_QUEUE].read();
                    }
                    TOKEN_EVENT => {
                        let _ = self.queue_evts[EVENT_QUEUE].read();
                    }
                    _ => {}
                }
            }
            self.process_all();
        }
    }

    fn process_all(&mut self) {
        if let Err(e) = self.muxer.process_host_events() {
            log::error!("vsock: host events: {e}");
        }
        let mut notify = self.run_queues();
        notify |= process_event_queue(
            &mut self.queues[EVENT_QUEUE],
            &self.mem,
            &mut self.reset_pending,
        );
        if notify {
            self.interrupt.signal_used_queue();
        }
    }
}
