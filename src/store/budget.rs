//! The RAM budget: one counter of host bytes held by the whole store.
//!
//! Shards touch it only when their footprint changes (a chunk, a slab block or
//! a hash table grows or shrinks), not once per page, so its cache line does
//! not bounce on the hot path. Growth is reserved before it happens, so the
//! counter never passes the limit because of a reserved item.
//!
//! It carries the guests' own accounts too ([`Shares`]), since every place
//! that changes what a guest holds already has the budget at hand.

use std::sync::atomic::{AtomicU64, Ordering};

use super::share::Shares;

pub struct Budget {
    used: AtomicU64,
    limit: AtomicU64,
    shares: Shares,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Budget {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            shares: Shares::default(),
        }
    }

    /// Each guest's use, cap and weight.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn over(&self) -> bool {
        self.used() > self.limit()
    }

    /// Takes `bytes` from the budget if they fit.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        self.try_reserve_leaving(bytes, 0)
    }

    /// Takes `bytes` from the budget if they fit with `keep` bytes to spare.
    pub fn try_reserve_leaving(&self, bytes: u64, keep: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes)
                    .filter(|&n| n.saturating_add(keep) <= limit)
            })
            .is_ok()
    }

    /// Takes `bytes` from the budget, past the limit if need be: for the
    /// metadata of a guest whose room is guaranteed (see `Reservation`).
    pub fn force(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// [`Budget::try_reserve`], or [`Budget::force`] when `force`.
    pub fn reserve(&self, bytes: u64, force: bool) -> bool {
        if force {
            self.force(bytes);
            true
        } else {
            self.try_reserve(bytes)
        }
    }

    /// Moves the counter from what a holder had counted to what it now holds.
    pub fn settle(&self, counted: &mut u64, now: u64) {
        if now > *counted {
            self.used.fetch_add(now - *counted, Ordering::Relaxed);
        } else if now < *counted {
            self.used.fetch_sub(*counted - now, Ordering::Relaxed);
        }
        *counted = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_respects_the_limit() {
        let b = Budget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(41));
        assert!(b.try_reserve(40));
        assert_eq!(b.used(), 100);
        assert!(!b.over());
        b.set_limit(50);
        assert!(b.over());
        assert!(b.try_reserve(0));
        let c = Budget::new(100);
        assert!(!c.try_reserve_leaving(60, 50));
        assert!(c.try_reserve_leaving(50, 50));
        assert!(c.try_reserve(50));
    }

    #[test]
    fn settle_moves_by_the_difference() {
        let b = Budget::new(1000);
        let mut counted = 0;
        b.settle(&mut counted, 300);
        assert_eq!((b.used(), counted), (300, 300));
        // A reservation is added to what the holder counted, then settled.
        assert!(b.try_reserve(200));
        counted += 200;
        b.settle(&mut counted, 450);
        assert_eq!((b.used(), counted), (450, 450));
        b.settle(&mut counted, 0);
        assert_eq!(b.used(), 0);
    }
}
