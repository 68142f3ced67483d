//! The tmem virtio device: the vhost-user backend that moves requests between
//! a guest's virtqueues and the page store. The only module that touches
//! virtqueues.
//!
//! - [`request`]: validating one descriptor chain (no store, no allocation).
//! - this file: [`TmemBackend`], the `VhostUserBackend` implementation for one
//!   connection of one device, with its queue workers.
//! - [`daemon`]: one listener thread per device, reconnects, shutdown.
//!
//! ## Threads and locks
//! Each virtqueue has its own worker thread (vhost-user-backend's epoll loop).
//! A worker holds its vring's lock for one batch of requests, store calls
//! included. The vhost-user message thread takes the same lock to stop,
//! disable or reset a ring, so once it has done that no request of that ring
//! is still in flight: pages dropped on a reset cannot be re-added behind
//! our back.
//!
//! ## Reboots
//! See `docs/protocol.md`, "Device reset": a reset drops every page of the
//! device, whether it arrives as RESET_DEVICE, as a disconnect, or as a
//! stop/start of the vrings (GET_VRING_BASE, then the rings come back
//! rewound or moved).

pub mod daemon;
pub mod request;

use std::{
    io,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use self::request::{Rejection, Request};
use crate::{
    error_chain,
    protocol::{ConfigSpace, Op, Status, CAP_EXCLUSIVE_GET, CAP_PUT_FILL, CONFIG_SIZE, PAGE_SIZE},
    stats::{LatencyRecorder, OpClass},
    store::{GetOutcome, GuestId, Page, PutOutcome, Store},
};

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = VringRwLock<GuestMemory>;

/// Largest ring the driver may ask for. Requests are synchronous and small,
/// so deeper rings only add latency under load.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Busy-poll rounds (a few microseconds' worth) between yields of the CPU.
const YIELD_EVERY: u32 = 64;

/// What outlives one VMM connection: identity, counters and the error log.
pub struct DeviceShared {
    pub id: u32,
    pub socket: PathBuf,
    pub queues: u16,
    pub connected: AtomicBool,
    /// One recorder per queue, written only by that queue's worker.
    pub latency: Vec<LatencyRecorder>,
    pub errors: RateLimiter,
}

impl DeviceShared {
    pub fn new(id: u32, socket: PathBuf, queues: u16) -> Self {
        DeviceShared {
            id,
            socket,
            queues,
            connected: AtomicBool::new(false),
            latency: (0..queues).map(|_| LatencyRecorder::default()).collect(),
            errors: RateLimiter::new(20, Duration::from_secs(1)),
        }
    }

    pub fn guest(&self) -> GuestId {
        GuestId(self.id)
    }
}

/// Token bucket for log lines a guest can trigger at will.
pub struct RateLimiter {
    state: Mutex<Bucket>,
    burst: u32,
    refill: Duration,
}

struct Bucket {
    tokens: u32,
    last: Instant,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        RateLimiter {
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                suppressed: 0,
            }),
            burst,
            refill,
        }
    }

    /// Whether to log now; if so, how many lines were dropped since the last one.
    pub fn allow(&self) -> Option<u64> {
        let mut b = self.state.lock();
        let now = Instant::now();
        let earned = now.duration_since(b.last).as_nanos() / self.refill.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(self.burst);
            b.last = now;
        }
        if b.tokens == 0 {
            b.suppressed += 1;
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.suppressed))
    }
}

/// Where a ring stood: if it comes back anywhere else after a stop, the
/// driver has set it up afresh, which only happens after a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingMark {
    next_avail: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl RingMark {
    fn of(queue: &Queue) -> Self {
        RingMark {
            next_avail: queue.next_avail(),
            size: queue.size(),
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingStop {
    Running,
    /// Stopped by GET_VRING_BASE; where it stood, if it ever ran.
    Stopped(Option<RingMark>),
}

struct RestartState {
    /// A ring was stopped and the restart has not been judged yet.
    pending: bool,
    rings: Vec<RingStop>,
}

/// One queue worker's private state.
struct Worker {
    page: Box<Page>,
}

/// What a batch left behind, for the busy-poll that follows it.
struct Batch {
    processed: usize,
    mark: RingMark,
}

/// The backend of one device for one VMM connection.
pub struct TmemBackend {
    shared: Arc<DeviceShared>,
    store: Arc<Store>,
    mem: GuestMemory,
    config: [u8; CONFIG_SIZE],
    poll: Duration,
    workers: Vec<Mutex<Worker>>,
    /// Last position seen by each ring's worker, read when the ring stops.
    marks: Vec<Mutex<Option<RingMark>>>,
    restart_pending: AtomicBool,
    restart: Mutex<RestartState>,
    /// Set when the connection is over, so busy-polling workers let go.
    closing: AtomicBool,
}

impl TmemBackend {
    pub fn new(
        shared: Arc<DeviceShared>,
        store: Arc<Store>,
        mem: GuestMemory,
        capacity_pages: u64,
        poll: Duration,
    ) -> Self {
        let queues = usize::from(shared.queues);
        let config = ConfigSpace {
            num_queues: shared.queues,
            caps: CAP_EXCLUSIVE_GET | CAP_PUT_FILL,
            capacity_pages,
        }
        .to_bytes();
        TmemBackend {
            shared,
            store,
            mem,
            config,
            poll,
            workers: (0..queues)
                .map(|_| {
                    Mutex::new(Worker {
                        page: Box::new([0u8; PAGE_SIZE]),
                    })
                })
                .collect(),
            marks: (0..queues).map(|_| Mutex::new(None)).collect(),
            restart_pending: AtomicBool::new(false),
            restart: Mutex::new(RestartState {
                pending: false,
                rings: vec![RingStop::Running; queues],
            }),
            closing: AtomicBool::new(false),
        }
    }

    /// Tells busy-polling workers to stop; called once the connection is gone.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    fn guest(&self) -> GuestId {
        self.shared.guest()
    }

    fn log_error(&self, queue: usize, what: &(dyn std::error::Error + 'static)) {
        if let Some(suppressed) = self.shared.errors.allow() {
            let note = if suppressed > 0 {
                format!(" ({suppressed} similar messages suppressed)")
            } else {
                String::new()
            };
            warn!(
                "device {} queue {queue}: {}{note}",
                self.shared.id,
                error_chain(what)
            );
        }
    }

    fn drop_pages(&self, why: &str) {
        let dropped = self.store.drop_guest(self.guest());
        info!("device {}: {why}: dropped {dropped} pages", self.shared.id);
    }

    /// The first batch after a stop decides, once for the device, whether the
    /// rings were resumed as they were (VM paused, then continued: keep the
    /// pages) or set up anew (guest rebooted or driver reloaded: drop them).
    /// Workers of other rings wait on the lock meanwhile, so no request of
    /// the new boot is served before the old pages are gone.
    fn judge_restart(&self, queue: usize, now: RingMark) {
        let mut state = self.restart.lock();
        if !state.pending {
            return;
        }
        let RingStop::Stopped(before) = state.rings[queue] else {
            // This ring was never stopped; the ones that were will judge.
            return;
        };
        state.pending = false;
        state.rings.fill(RingStop::Running);
        self.restart_pending.store(false, Ordering::Release);
        if before == Some(now) {
            debug!(
                "device {}: rings resumed where they stopped, keeping pages",
                self.shared.id
            );
        } else {
            self.drop_pages("rings restarted from a new position (guest reset)");
        }
    }

    fn process_queue(&self, queue: usize, vring: &Vring) {
        let Some(worker) = self.workers.get(queue) else {
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
        if self.restart_pending.load(Ordering::Acquire) {
            self.judge_restart(queue, RingMark::of(state.get_queue()));
        }
        let q = state.get_queue_mut();
        if let Err(e) = q.disable_notification(&*mem) {
            self.log_error(queue, &e);
        }
        let mut processed = 0;
        while let Some(chain) = q.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let used = self.handle_chain(queue, chain, &mem, worker);
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
        *self.marks[queue].lock() = Some(mark);
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
            if self.closing.load(Ordering::Relaxed) {
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

    /// Serves one chain; returns the used length (bytes written).
    fn handle_chain<C>(
        &self,
        queue: usize,
        chain: DescriptorChain<C>,
        mem: &GuestMemoryMmap,
        worker: &mut Worker,
    ) -> u32
    where
        C: std::ops::Deref,
        C::Target: vm_memory::GuestMemory,
    {
        let start = Instant::now();
        let req = match request::parse(chain, mem) {
            Ok(req) => req,
            Err(Rejection { error, status }) => {
                self.log_error(queue, &error);
                return match status {
                    Some(addr) if mem.write_obj(Status::Invalid as u8, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, page_written) = self.execute(queue, &req, mem, worker);
        let used = match mem.write_obj(status as u8, req.status) {
            Ok(()) if page_written => PAGE_SIZE as u32 + 1,
            Ok(()) => 1,
            Err(e) => {
                self.log_error(queue, &e);
                0
            }
        };
        if let Some(recorder) = self.shared.latency.get(queue) {
            recorder.record(OpClass::of(req.header.op), start.elapsed());
        }
        used
    }

    fn put_status(
        &self,
        queue: usize,
        outcome: Result<PutOutcome, crate::store::StoreError>,
    ) -> (Status, bool) {
        match outcome {
            Ok(PutOutcome::Stored) => (Status::Ok, false),
            Ok(PutOutcome::Rejected) => (Status::Rejected, false),
            Err(e) => {
                self.log_error(queue, &e);
                (Status::IoError, false)
            }
        }
    }

    /// Acts on a validated request; returns its status and whether the GET
    /// page was written.
    fn execute(
        &self,
        queue: usize,
        req: &Request,
        mem: &GuestMemoryMmap,
        worker: &mut Worker,
    ) -> (Status, bool) {
        let h = &req.header;
        let guest = self.guest();
        match h.op {
            Op::Put => {
                if let Err(e) = req.read_page(mem, &mut worker.page) {
                    self.log_error(queue, &e);
                    return (Status::Invalid, false);
                }
                self.put_status(queue, self.store.put(guest, h.pool, h.index, &worker.page))
            }
            Op::PutFill => self.put_status(queue, self.store.put_fill(guest, h.pool, h.index, h.arg)),
            Op::Get => {
                match self
                    .store
                    .get(guest, h.pool, h.index, &mut worker.page, h.exclusive())
                {
                    Ok(GetOutcome::Found) => match req.write_page(mem, &worker.page) {
                        Ok(()) => (Status::Ok, true),
                        Err(e) => {
                            self.log_error(queue, &e);
                            (Status::IoError, false)
                        }
                    },
                    Ok(GetOutcome::NotFound) => (Status::NotFound, false),
                    Err(e) => {
                        self.log_error(queue, &e);
                        (Status::IoError, false)
                    }
                }
            }
            Op::InvalidatePage => {
                self.store.invalidate_page(guest, h.pool, h.index);
                (Status::Ok, false)
            }
            Op::InvalidatePool => {
                self.store.invalidate_pool(guest, h.pool);
                (Status::Ok, false)
            }
        }
    }
}

fn ring_live(state: &VringState<GuestMemory>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

#[derive(Debug, thiserror::Error)]
#[error("driver announces requests after {0} that cannot be taken off the ring; waiting for the next kick")]
struct BrokenRing(u16);

impl VhostUserBackend for TmemBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn!(
                "device {}: driver did not accept VIRTIO_F_VERSION_1, which the protocol requires",
                self.shared.id
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    /// The vring threads have been told to stop and every ring has been
    /// disabled under its lock before this runs, so nothing races the drop.
    fn reset_device(&self) {
        let mut state = self.restart.lock();
        state.pending = false;
        state.rings.fill(RingStop::Running);
        self.restart_pending.store(false, Ordering::Release);
        for mark in &self.marks {
            *mark.lock() = None;
        }
        self.drop_pages("device reset");
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag themselves; nothing else depends on it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.config, offset, size).to_vec()
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // Same GuestMemoryAtomic as ours; the handler has already swapped it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(
                    "device {}: no exit event for worker {thread_index}: {e}",
                    self.shared.id
                );
                None
            }
        }
    }

    /// GET_VRING_BASE: the ring is already marked not ready under its lock,
    /// so its worker is idle and the mark below is final.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        let Some(mark) = self.marks.get(queue) else {
            return Ok(());
        };
        let mark = *mark.lock();
        let mut state = self.restart.lock();
        if let Some(ring) = state.rings.get_mut(queue) {
            *ring = RingStop::Stopped(mark);
            state.pending = true;
            self.restart_pending.store(true, Ordering::Release);
        }
        debug!("device {}: ring {queue} stopped at {mark:?}", self.shared.id);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            debug!("device {}: ignoring event set {evset:?}", self.shared.id);
            return Ok(());
        }
        // One queue per thread: the thread id is the queue index, and the
        // thread's only vring is at index 0.
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            self.process_queue(thread_id, vring);
        }
        Ok(())
    }
}

/// The part of config space a GET_CONFIG asks for; empty when out of range.
fn config_slice(config: &[u8; CONFIG_SIZE], offset: u32, size: u32) -> &[u8] {
    let start = offset as usize;
    if start >= CONFIG_SIZE {
        return &[];
    }
    let end = start.saturating_add(size as usize).min(CONFIG_SIZE);
    &config[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CONFIG_MAGIC;

    #[test]
    fn config_reads_are_clamped() {
        let config = ConfigSpace {
            num_queues: 3,
            caps: CAP_EXCLUSIVE_GET | CAP_PUT_FILL,
            capacity_pages: 5,
        }
        .to_bytes();
        assert_eq!(config_slice(&config, 0, 4), &CONFIG_MAGIC.to_le_bytes());
        assert_eq!(config_slice(&config, 6, 2), &3u16.to_le_bytes());
        assert_eq!(config_slice(&config, 0, 1000).len(), CONFIG_SIZE);
        assert_eq!(config_slice(&config, 30, 10).len(), 2);
        assert!(config_slice(&config, 32, 1).is_empty());
        assert!(config_slice(&config, u32::MAX, u32::MAX).is_empty());
        assert_eq!(config_slice(&config, 31, u32::MAX).len(), 1);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_counts() {
        let rl = RateLimiter::new(3, Duration::from_secs(3600));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.allow(), None);
        let rl = RateLimiter::new(1, Duration::from_nanos(1));
        assert_eq!(rl.allow(), Some(0));
        std::thread::sleep(Duration::from_millis(1));
        assert!(rl.allow().is_some());
    }

    fn backend() -> TmemBackend {
        let shared = Arc::new(DeviceShared::new(2, "/tmp/x".into(), 3));
        let store = Arc::new(Store::new(Default::default()).unwrap());
        TmemBackend::new(
            shared,
            store,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            0,
            Duration::ZERO,
        )
    }

    #[test]
    fn features_and_queues() {
        let b = backend();
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::RESET_DEVICE));
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        assert_eq!(b.get_config(6, 2), 3u16.to_le_bytes().to_vec());
    }

    fn mark(next_avail: u16) -> RingMark {
        RingMark {
            next_avail,
            size: 256,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        }
    }

    fn put_one(b: &TmemBackend) {
        b.store.put(b.guest(), 0, 1, &[7u8; PAGE_SIZE]).unwrap();
    }

    fn pages(b: &TmemBackend) -> bool {
        let mut page = [0u8; PAGE_SIZE];
        b.store.get(b.guest(), 0, 1, &mut page, false).unwrap() == GetOutcome::Found
    }

    #[test]
    fn resumed_rings_keep_pages() {
        let b = backend();
        put_one(&b);
        *b.marks[0].lock() = Some(mark(40));
        b.stop_vring(0).unwrap();
        b.judge_restart(0, mark(40));
        assert!(pages(&b));
        assert!(!b.restart_pending.load(Ordering::Relaxed));
    }

    #[test]
    fn rewound_rings_drop_pages_once() {
        let b = backend();
        put_one(&b);
        *b.marks[0].lock() = Some(mark(40));
        *b.marks[1].lock() = Some(mark(7));
        b.stop_vring(0).unwrap();
        b.stop_vring(1).unwrap();
        b.judge_restart(0, mark(0));
        assert!(!pages(&b));
        // A page of the new boot, then ring 1 restarts: not judged again.
        put_one(&b);
        b.judge_restart(1, mark(0));
        assert!(pages(&b));
    }

    #[test]
    fn moved_ring_drops_pages() {
        let b = backend();
        put_one(&b);
        *b.marks[0].lock() = Some(mark(40));
        b.stop_vring(0).unwrap();
        b.judge_restart(
            0,
            RingMark {
                desc: 0x9000,
                ..mark(40)
            },
        );
        assert!(!pages(&b));
    }

    #[test]
    fn ring_that_never_ran_counts_as_reset() {
        let b = backend();
        put_one(&b);
        b.stop_vring(2).unwrap();
        // Ring 0 was not stopped: it does not judge.
        b.judge_restart(0, mark(1));
        assert!(pages(&b));
        b.judge_restart(2, mark(0));
        assert!(!pages(&b));
    }

    #[test]
    fn reset_device_drops_pages_and_forgets_stops() {
        let b = backend();
        put_one(&b);
        *b.marks[0].lock() = Some(mark(3));
        b.stop_vring(0).unwrap();
        b.reset_device();
        assert!(!pages(&b));
        put_one(&b);
        b.judge_restart(0, mark(0));
        assert!(pages(&b), "nothing pending after a reset");
    }

    #[test]
    fn other_guests_pages_survive_a_reset() {
        let b = backend();
        b.store.put(GuestId(5), 0, 1, &[1u8; PAGE_SIZE]).unwrap();
        b.reset_device();
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(
            b.store.get(GuestId(5), 0, 1, &mut page, false).unwrap(),
            GetOutcome::Found
        );
    }
}
