//! Telling a paused VM from a rebooted one.
//!
//! A VMM stops a device's rings (GET_VRING_BASE) both when it pauses the VM
//! and when the guest resets the device; in both cases the rings come back
//! with SET_VRING_BASE and friends. A ring that comes back where it stopped
//! was resumed, and the guest's pages are still wanted. A ring that comes back
//! anywhere else (rewound, or moved to new addresses) was set up afresh by a
//! new driver instance, and the old pages must go before any request of the
//! new one is served. See `docs/protocol.md`, "Device reset".

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueT};

/// Where a ring stood: if it comes back anywhere else after a stop, the
/// driver has set it up afresh, which only happens after a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingMark {
    pub next_avail: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingMark {
    pub fn of(queue: &Queue) -> Self {
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

/// What the first batch after a stop decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The rings were resumed where they stopped: keep the pages.
    Resumed,
    /// The rings were set up anew: the pages of the old boot must go.
    Restarted,
    /// The deciding ring had not run before it stopped: nothing tells a
    /// reboot from a pause, so the pages stay.
    NoEvidence,
}

/// Where each ring stood and which were stopped, for one device connection.
pub struct Lifecycle {
    /// Last position seen by each ring's worker, read when the ring stops.
    marks: Vec<Mutex<Option<RingMark>>>,
    /// Whether a restart waits to be judged; read without the lock on every
    /// batch.
    pending: AtomicBool,
    restart: Mutex<RestartState>,
}

impl Lifecycle {
    pub fn new(queues: usize) -> Self {
        Lifecycle {
            marks: (0..queues).map(|_| Mutex::new(None)).collect(),
            pending: AtomicBool::new(false),
            restart: Mutex::new(RestartState {
                pending: false,
                rings: vec![RingStop::Running; queues],
            }),
        }
    }

    /// Records where ring `queue` stands after a batch.
    pub fn mark(&self, queue: usize, mark: RingMark) {
        if let Some(m) = self.marks.get(queue) {
            *m.lock() = Some(mark);
        }
    }

    /// Whether a stop has not been judged yet.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// GET_VRING_BASE on ring `queue`: the ring is already marked not ready
    /// under its lock, so its worker is idle and its mark is final. Returns
    /// that mark.
    pub fn ring_stopped(&self, queue: usize) -> Option<Option<RingMark>> {
        let mark = *self.marks.get(queue)?.lock();
        let mut state = self.restart.lock();
        let ring = state.rings.get_mut(queue)?;
        *ring = RingStop::Stopped(mark);
        state.pending = true;
        self.pending.store(true, Ordering::Release);
        Some(mark)
    }

    /// The first batch after a stop decides, once for the device, whether the
    /// rings were resumed or set up anew, before it serves anything. Every
    /// worker of a stopped ring that sees the decision pending waits here on
    /// the lock, and the decision stays pending until `on_restart` (dropping
    /// the old pages) has returned: so no request of a new boot is served on
    /// any queue while old pages remain, and no page a new boot stores can be
    /// dropped by the old boot's restart. `None` if there was nothing for this
    /// ring to decide.
    ///
    /// Evidence comes only from a ring whose position was on record when it
    /// stopped: back where it stood is a pause, anywhere else a new driver.
    /// A ring with no position on record (it never served a batch) tells
    /// nothing, and the pages are kept: dropping them on a pause would lose
    /// pages the guest was told are stored, while keeping them after a reboot
    /// cannot hand a conforming driver a stale page, because a driver clears
    /// its pool before it first uses it in a boot (`docs/protocol.md` §6).
    pub fn judge(&self, queue: usize, now: RingMark, on_restart: impl FnOnce()) -> Option<Verdict> {
        let mut state = self.restart.lock();
        if !state.pending {
            return None;
        }
        // A ring that was not stopped goes on serving the boot it served;
        // the stopped ones decide.
        let RingStop::Stopped(before) = *state.rings.get(queue)? else {
            return None;
        };
        let verdict = match before {
            Some(before) if before != now => {
                on_restart();
                Verdict::Restarted
            }
            Some(_) => Verdict::Resumed,
            None => Verdict::NoEvidence,
        };
        state.pending = false;
        state.rings.fill(RingStop::Running);
        // Published only now: a worker that reads false from here on finds
        // the old pages already gone.
        self.pending.store(false, Ordering::Release);
        Some(verdict)
    }

    /// RESET_DEVICE or a disconnect: every stop is forgotten, and so is where
    /// the rings stood; `on_reset` drops the pages under the lock.
    pub fn reset(&self, on_reset: impl FnOnce()) {
        let mut state = self.restart.lock();
        state.pending = false;
        state.rings.fill(RingStop::Running);
        self.pending.store(false, Ordering::Release);
        for mark in &self.marks {
            *mark.lock() = None;
        }
        on_reset();
    }
}
