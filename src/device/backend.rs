//! [`TmemBackend`]: the `VhostUserBackend` implementation for one connection
//! of one device. It answers the vhost-user messages (features, config space,
//! ring stops, resets) and hands each kicked queue to its worker.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use log::{debug, info, warn};
use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use super::{
    blk::{self, Disk},
    lifecycle::{Lifecycle, RingMark, Verdict},
    worker::Worker,
    GuestMemory, Vring, MAX_QUEUE_SIZE,
};
use crate::{
    config::DeviceKind,
    error_chain,
    protocol::{ConfigSpace, CAP_EXCLUSIVE_GET, CAP_PUT_FILL, CONFIG_SIZE, PAGE_SIZE},
    store::{GuestId, Store},
    telemetry::DeviceTelemetry,
};

/// What kind of device a backend serves, with what only that kind needs.
pub(super) enum Kind {
    /// The tmem device, with its config space.
    Tmem([u8; CONFIG_SIZE]),
    /// A virtio-blk disk.
    Blk(Disk),
}

/// Largest config space read answered: vhost-user's limit.
const MAX_CONFIG_READ: u32 = 256;

/// The backend of one device for one VMM connection.
pub struct TmemBackend {
    telemetry: Arc<DeviceTelemetry>,
    pub(super) store: Arc<Store>,
    pub(super) mem: GuestMemory,
    pub(super) kind: Kind,
    /// How long a worker busy-polls its ring after a batch.
    pub(super) poll: Duration,
    workers: Vec<Mutex<Worker>>,
    pub(super) lifecycle: Lifecycle,
    /// Set when the connection is over, so busy-polling workers let go.
    closing: AtomicBool,
}

impl TmemBackend {
    /// A backend for a device of `kind`; `capacity_pages` is what a tmem
    /// device advertises (a blk device's size is in its kind).
    pub fn new(
        telemetry: Arc<DeviceTelemetry>,
        store: Arc<Store>,
        mem: GuestMemory,
        kind: DeviceKind,
        capacity_pages: u64,
        poll: Duration,
    ) -> Self {
        let queues = usize::from(telemetry.queues);
        let kind = match kind {
            DeviceKind::Tmem => Kind::Tmem(
                ConfigSpace {
                    num_queues: telemetry.queues,
                    caps: CAP_EXCLUSIVE_GET | CAP_PUT_FILL,
                    capacity_pages,
                }
                .to_bytes(),
            ),
            DeviceKind::Blk { size } => Kind::Blk(Disk::new(size, telemetry.queues, telemetry.id)),
        };
        TmemBackend {
            telemetry,
            store,
            mem,
            kind,
            poll,
            workers: (0..queues)
                .map(|_| {
                    Mutex::new(Worker {
                        page: Box::new([0u8; PAGE_SIZE]),
                    })
                })
                .collect(),
            lifecycle: Lifecycle::new(queues),
            closing: AtomicBool::new(false),
        }
    }

    /// Tells busy-polling workers to stop; called once the connection is gone.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub(super) fn worker(&self, queue: usize) -> Option<&Mutex<Worker>> {
        self.workers.get(queue)
    }

    pub(super) fn guest(&self) -> GuestId {
        self.telemetry.guest()
    }

    pub(super) fn telemetry(&self) -> &DeviceTelemetry {
        &self.telemetry
    }

    pub(super) fn log_error(&self, queue: usize, what: &(dyn std::error::Error + 'static)) {
        if let Some(suppressed) = self.telemetry.errors.allow() {
            let note = if suppressed > 0 {
                format!(" ({suppressed} similar messages suppressed)")
            } else {
                String::new()
            };
            warn!(
                "device {} queue {queue}: {}{note}",
                self.telemetry.id,
                error_chain(what)
            );
        }
    }

    /// Whether the device's pages outlive its driver: a disk's do (a reboot,
    /// a reset or a new VMM finds the data it left), swap pages do not.
    pub fn keeps_data(&self) -> bool {
        matches!(self.kind, Kind::Blk(_))
    }

    fn drop_pages(&self, why: &str) {
        if self.keeps_data() {
            debug!("device {}: {why}: a disk keeps its data", self.telemetry.id);
            return;
        }
        let dropped = self.store.drop_guest(self.guest());
        info!("device {}: {why}: dropped {dropped} pages", self.telemetry.id);
    }

    /// The first batch after a stop: keep the pages if the rings were resumed
    /// where they stood, drop them if they were set up anew.
    pub(super) fn judge_restart(&self, queue: usize, now: RingMark) {
        let verdict = self.lifecycle.judge(queue, now, || {
            self.drop_pages("rings restarted from a new position (guest reset)")
        });
        match verdict {
            Some(Verdict::Resumed) => debug!(
                "device {}: rings resumed where they stopped, keeping pages",
                self.telemetry.id
            ),
            Some(Verdict::NoEvidence) => info!(
                "device {}: ring {queue} restarted without a position on record; keeping pages",
                self.telemetry.id
            ),
            Some(Verdict::Restarted) | None => {}
        }
    }
}

impl VhostUserBackend for TmemBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.telemetry.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        if let Kind::Blk(_) = self.kind {
            return blk::features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn!(
                "device {}: driver did not accept VIRTIO_F_VERSION_1, which the protocol requires",
                self.telemetry.id
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
        self.lifecycle.reset(|| self.drop_pages("device reset"));
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag themselves; nothing else depends on it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match &self.kind {
            Kind::Tmem(config) => config_slice(config, offset, size).to_vec(),
            // A VMM reads the config as long as its own virtio_blk_config,
            // which may have fields this device does not offer, and takes a
            // short answer as an error: the rest reads as zeros.
            Kind::Blk(disk) => {
                let size = size.min(MAX_CONFIG_READ) as usize;
                let mut out = vec![0u8; size];
                let config = disk.config();
                let start = (offset as usize).min(config.len());
                let n = (config.len() - start).min(size);
                out[..n].copy_from_slice(&config[start..start + n]);
                out
            }
        }
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // Same GuestMemoryAtomic as ours; the handler has already swapped it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.telemetry.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(
                    "device {}: no exit event for worker {thread_index}: {e}",
                    self.telemetry.id
                );
                None
            }
        }
    }

    /// GET_VRING_BASE.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        if let Some(mark) = self.lifecycle.ring_stopped(queue) {
            debug!("device {}: ring {queue} stopped at {mark:?}", self.telemetry.id);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // vhost-user-backend starts the workers; this is the first code of
        // ours that runs on one.
        crate::sandbox::enter_once(crate::sandbox::Role::Worker);
        if evset != EventSet::IN {
            debug!("device {}: ignoring event set {evset:?}", self.telemetry.id);
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
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::{protocol::CONFIG_MAGIC, store::GetOutcome};

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

    fn backend() -> TmemBackend {
        let telemetry = Arc::new(DeviceTelemetry::new(2, "/tmp/x".into(), 3));
        let store = Arc::new(Store::new(Default::default()).unwrap());
        TmemBackend::new(
            telemetry,
            store,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            DeviceKind::Tmem,
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
        b.lifecycle.mark(0, mark(40));
        b.stop_vring(0).unwrap();
        b.judge_restart(0, mark(40));
        assert!(pages(&b));
        assert!(!b.lifecycle.pending());
    }

    #[test]
    fn rewound_rings_drop_pages_once() {
        let b = backend();
        put_one(&b);
        b.lifecycle.mark(0, mark(40));
        b.lifecycle.mark(1, mark(7));
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
        b.lifecycle.mark(0, mark(40));
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

    /// A ring stopped before it ever served a batch has no position on
    /// record: its restart tells a pause from a reboot no better than a coin,
    /// so it keeps the pages (a pause must never lose them).
    #[test]
    fn ring_that_never_ran_keeps_pages() {
        let b = backend();
        put_one(&b);
        b.stop_vring(2).unwrap();
        // Ring 0 was not stopped: it does not judge.
        b.judge_restart(0, mark(1));
        assert!(b.lifecycle.pending());
        b.judge_restart(2, mark(0));
        assert!(pages(&b));
        assert!(!b.lifecycle.pending(), "decided once");
    }

    /// Pause and resume in any subset of queues: rings that ran come back
    /// where they stood, idle ones have nothing on record; no page is lost,
    /// whichever ring serves first.
    #[test]
    fn pause_with_idle_queues_keeps_pages() {
        for first in 0..3 {
            let b = backend();
            put_one(&b);
            b.lifecycle.mark(1, mark(9));
            for q in 0..3 {
                b.stop_vring(q).unwrap();
            }
            let now = if first == 1 { mark(9) } else { mark(0) };
            b.judge_restart(first as usize, now);
            for q in 0..3 {
                b.judge_restart(q, if q == 1 { mark(9) } else { mark(0) });
            }
            assert!(pages(&b), "first ring to serve: {first}");
        }
    }

    /// The decision stays pending while the old pages are being dropped, so
    /// a worker of another queue cannot slip a new boot's request past it.
    #[test]
    fn decision_is_published_after_the_drop() {
        let b = backend();
        put_one(&b);
        b.lifecycle.mark(0, mark(4));
        b.stop_vring(0).unwrap();
        let mut seen_pending = false;
        let verdict = b
            .lifecycle
            .judge(0, mark(0), || seen_pending = b.lifecycle.pending());
        assert_eq!(verdict, Some(Verdict::Restarted));
        assert!(seen_pending);
        assert!(!b.lifecycle.pending());
    }

    /// Reboot under traffic on every queue: each worker judges first, then
    /// serves its new boot's puts at once, while the first judge drops a
    /// large old boot. Every put answered OK must be there afterwards, and
    /// no GET of the new boot may see an old page.
    #[test]
    fn reboot_under_concurrent_traffic_loses_no_acknowledged_page() {
        let queues = 3usize;
        for round in 0..20u64 {
            let b = backend();
            for i in 0..5_000u64 {
                b.store.put_fill(b.guest(), 0, i, round + 1).unwrap();
            }
            for q in 0..queues {
                b.lifecycle.mark(q, mark(40));
                b.stop_vring(q as u32).unwrap();
            }
            let stale = std::sync::atomic::AtomicU64::new(0);
            std::thread::scope(|s| {
                for q in 0..queues {
                    let (b, stale) = (&b, &stale);
                    s.spawn(move || {
                        // What a worker does at the start of each batch.
                        if b.lifecycle.pending() {
                            b.judge_restart(q, mark(0));
                        }
                        let mut page = [0u8; PAGE_SIZE];
                        for i in (q as u64..200).step_by(queues) {
                            if b.store.get(b.guest(), 0, i + 1_000, &mut page, false).unwrap()
                                == GetOutcome::Found
                            {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                            b.store.put_fill(b.guest(), 0, i, 1_000 + i).unwrap();
                        }
                    });
                }
            });
            assert_eq!(
                stale.load(Ordering::Relaxed),
                0,
                "round {round}: old pages served"
            );
            let mut page = [0u8; PAGE_SIZE];
            for i in 0..200u64 {
                assert_eq!(
                    b.store.get(b.guest(), 0, i, &mut page, false).unwrap(),
                    GetOutcome::Found,
                    "round {round}: acknowledged page {i} lost"
                );
                assert_eq!(page[..8], (1_000 + i).to_le_bytes(), "round {round}: page {i}");
            }
            assert_eq!(b.store.stats().total.stored_pages, 200, "round {round}");
        }
    }

    #[test]
    fn reset_device_drops_pages_and_forgets_stops() {
        let b = backend();
        put_one(&b);
        b.lifecycle.mark(0, mark(3));
        b.stop_vring(0).unwrap();
        b.reset_device();
        assert!(!pages(&b));
        put_one(&b);
        b.judge_restart(0, mark(0));
        assert!(pages(&b), "nothing pending after a reset");
    }

    /// A disk keeps its blocks through everything that drops a tmem
    /// device's pages: a reset, and rings that come back set up anew.
    #[test]
    fn a_disk_keeps_its_blocks_through_resets_and_restarts() {
        let telemetry = Arc::new(DeviceTelemetry::new(2, "/tmp/x".into(), 1));
        let store = Arc::new(Store::new(Default::default()).unwrap());
        let b = TmemBackend::new(
            telemetry,
            store,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            DeviceKind::Blk { size: 1 << 20 },
            0,
            Duration::ZERO,
        );
        assert!(b.keeps_data());
        put_one(&b);
        b.lifecycle.mark(0, mark(40));
        b.stop_vring(0).unwrap();
        b.judge_restart(0, mark(0));
        assert!(pages(&b), "rings set up anew");
        b.reset_device();
        assert!(pages(&b), "device reset");
        assert!(!backend().keeps_data(), "a tmem device does not");
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
