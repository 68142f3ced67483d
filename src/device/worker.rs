//! The queue worker: one thread per virtqueue takes every available chain
//! off its ring, has it served, publishes the used entries and signals the
//! driver, then either busy-polls for more or re-enables kicks and sleeps.

use std::{sync::atomic::Ordering, time::Instant};

use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use super::{backend::TmemBackend, lifecycle::RingMark, request::DescTable, GuestMemory, Vring};
use crate::store::Page;

/// Busy-poll rounds (a few microseconds' worth) between yields of the CPU.
const YIELD_EVERY: u32 = 64;

/// One queue worker's private state: the page buffer its requests use, so
/// that serving a request allocates nothing.
pub(super) struct Worker {
    pub(super) page: Box<Page>,
}

/// What a batch left behind, for the busy-poll that follows it.
struct Batch {
    processed: usize,
    mark: RingMark,
}

impl TmemBackend {
    pub(super) fn process_queue(&self, queue: usize, vring: &Vring) {
        let Some(worker) = self.worker(queue) else {
            return;
        };
        let mut worker = worker.lock();
        // Rounds in a row that took nothing although the ring said there was
        // work: a legitimate race costs one, a broken ring keeps them coming.
        let mut idle_rounds = 0;
        loop {
            let Some(batch) = self.run_batch(queue, vring, &mut worker) else {
                return;
            };
            idle_rounds = if batch.processed == 0 { idle_rounds + 1 } else { 0 };
            if !self.poll.is_zero() && idle_rounds < 2 && self.spin(&batch.mark) {
                continue;
            }
            // Ask for kicks again; if the driver slipped in more work before
            // seeing that, take it now rather than wait for a kick that will
            // not come.
            let mem = self.mem.memory();
            let mut state = vring.get_mut();
            if !ring_live(&state) {
                return;
            }
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(false) => return,
                Ok(true) if idle_rounds < 2 => continue,
                // Work announced again and again but none could be taken: the
                // avail index or ring is garbage. Wait for the next kick
                // instead of spinning on it.
                Ok(true) => {
                    self.log_error(queue, &BrokenRing(batch.mark.next_avail));
                    return;
                }
                Err(e) => {
                    self.log_error(queue, &e);
                    return;
                }
            }
        }
    }

    /// Serves every chain available now, under the vring lock.
    fn run_batch(&self, queue: usize, vring: &Vring, worker: &mut Worker) -> Option<Batch> {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if !ring_live(&state) {
            return None;
        }
        if self.lifecycle.pending() {
            self.judge_restart(queue, RingMark::of(state.get_queue()));
        }
        let q = state.get_queue_mut();
        if let Err(e) = q.disable_notification(&*mem) {
            self.log_error(queue, &e);
        }
        let table = DescTable {
            addr: GuestAddress(q.desc_table()),
            size: q.size(),
        };
        let mut processed = 0;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let used = self.handle_chain(queue, table, chain, &mem, worker);
            if let Err(e) = q.add_used(&*mem, head, used) {
                self.log_error(queue, &e);
            }
            processed += 1;
        }
        if processed > 0 {
            match q.needs_notification(&*mem) {
                Ok(true) => {
                    if let Err(e) = state.signal_used_queue() {
                        self.log_error(queue, &e);
                    }
                }
                Ok(false) => {}
                Err(e) => self.log_error(queue, &e),
            }
        }
        let mark = RingMark::of(state.get_queue());
        self.lifecycle.mark(queue, mark);
        Some(Batch { processed, mark })
    }

    /// Busy-polls the avail index for up to `poll`, with notifications still
    /// off so the driver need not kick. Reads guest memory without the vring
    /// lock, so the vhost-user thread is never held up by a polling worker.
    /// Returns whether new work arrived.
    fn spin(&self, mark: &RingMark) -> bool {
        let Some(idx_addr) = GuestAddress(mark.avail).checked_add(2) else {
            return false;
        };
        let mem = self.mem.memory();
        let deadline = Instant::now() + self.poll;
        let mut round: u32 = 0;
        loop {
            if self.is_closing() {
                return false;
            }
            round = round.wrapping_add(1);
            // On an oversubscribed host a poller that never yields can delay
            // the very vCPU (or driver thread) it is waiting for.
            if round % YIELD_EVERY == 0 {
                std::thread::yield_now();
            }
            match mem.load::<u16>(idx_addr, Ordering::Acquire) {
                Ok(idx) => {
                    let pending = u16::from_le(idx).wrapping_sub(mark.next_avail);
                    if pending != 0 && pending <= mark.size {
                        return true;
                    }
                }
                Err(_) => return false,
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

fn ring_live(state: &VringState<GuestMemory>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

#[derive(Debug, thiserror::Error)]
#[error("driver announces requests after {0} that cannot be taken off the ring; waiting for the next kick")]
struct BrokenRing(u16);
