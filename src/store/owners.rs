//! Owner ids: each (guest, pool) pair gets a dense 16-bit number, so an
//! object record names the pool that created it in two bytes.
//!
//! The table is read on a put only when the calling thread's one-entry cache
//! misses (device worker threads serve one guest, so that is rare); it is
//! written once per new pool.

use std::{
    cell::Cell,
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use parking_lot::RwLock;

/// Shared by every pair past the first 65535 (their object counters merge).
pub const OVERFLOW: u16 = u16::MAX;
/// The pair `OVERFLOW` reports under.
pub const OVERFLOW_PAIR: (u32, u32) = (u32::MAX, u32::MAX);

static NEXT_TABLE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// (table serial, guest, pool, id) of this thread's last lookup.
    static LAST: Cell<(u64, u32, u32, u16)> = const { Cell::new((0, 0, 0, 0)) };
}

#[derive(Default)]
struct Inner {
    ids: HashMap<(u32, u32), u16>,
    pairs: Vec<(u32, u32)>,
}

pub struct Owners {
    serial: u64,
    inner: RwLock<Inner>,
}

impl Default for Owners {
    fn default() -> Self {
        Self::new()
    }
}

impl Owners {
    pub fn new() -> Self {
        Owners {
            serial: NEXT_TABLE.fetch_add(1, Ordering::Relaxed),
            inner: RwLock::new(Inner::default()),
        }
    }

    pub fn id(&self, guest: u32, pool: u32) -> u16 {
        let (serial, g, p, id) = LAST.with(Cell::get);
        if serial == self.serial && g == guest && p == pool {
            return id;
        }
        let found = self.inner.read().ids.get(&(guest, pool)).copied();
        let id = found.unwrap_or_else(|| {
            let mut inner = self.inner.write();
            if let Some(&id) = inner.ids.get(&(guest, pool)) {
                return id;
            }
            if inner.pairs.len() >= usize::from(OVERFLOW) {
                return OVERFLOW;
            }
            let id = inner.pairs.len() as u16;
            inner.pairs.push((guest, pool));
            inner.ids.insert((guest, pool), id);
            id
        });
        LAST.with(|c| c.set((self.serial, guest, pool, id)));
        id
    }

    pub fn pair(&self, id: u16) -> (u32, u32) {
        self.inner
            .read()
            .pairs
            .get(usize::from(id))
            .copied()
            .unwrap_or(OVERFLOW_PAIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_stable_and_per_table() {
        let a = Owners::new();
        let b = Owners::new();
        assert_eq!(a.id(7, 1), 0);
        assert_eq!(a.id(7, 2), 1);
        assert_eq!(a.id(7, 1), 0);
        // The thread cache must not leak one table's ids into another.
        assert_eq!(b.id(9, 9), 0);
        assert_eq!(b.id(7, 2), 1);
        assert_eq!(a.id(7, 2), 1);
        assert_eq!(a.pair(1), (7, 2));
        assert_eq!(b.pair(0), (9, 9));
        assert_eq!(a.pair(500), OVERFLOW_PAIR);
    }

    #[test]
    fn threads_agree() {
        let o = std::sync::Arc::new(Owners::new());
        let ids: Vec<Vec<u16>> = (0..4)
            .map(|_| {
                let o = o.clone();
                std::thread::spawn(move || (0..100).map(|p| o.id(1, p)).collect())
            })
            .map(|h| h.join().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        for (p, &id) in ids[0].iter().enumerate() {
            assert_eq!(o.pair(id), (1, p as u32));
        }
    }
}
