//! One index shard: (guest, pool, index) -> object handle, and per-pool page counters.
//!
//! Entries are grouped by (guest, pool, upper 32 bits of the index), so each
//! entry is only the lower 32 bits of the index and a 32-bit handle: 8 bytes
//! plus hashbrown's control byte, divided by the load factor (7/16 to 7/8).
//! Swap offsets fit in 32 bits, so a pool normally has one group per shard.
//! Nothing is preallocated by swap size; a table that empties to a quarter
//! shrinks back.

use hashbrown::{HashMap, HashTable};

use super::{budget::Budget, Counters};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Group {
    guest: u32,
    pool: u32,
    hi: u32,
}

#[derive(Default)]
struct PoolIndex {
    entries: HashTable<(u32, u32)>,
}

pub struct IndexShard {
    groups: HashMap<Group, PoolIndex>,
    counters: HashMap<(u32, u32), Counters>,
    counted: u64,
}

/// The index has no room for a new entry and the budget could not give it.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoom;

/// Spreads the lower index bits over the whole hash (shard choice took others).
fn lo_hash(lo: u32) -> u64 {
    let mut x = u64::from(lo).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 32)
}

fn split(guest: u32, pool: u32, index: u64) -> (Group, u32) {
    (
        Group {
            guest,
            pool,
            hi: (index >> 32) as u32,
        },
        index as u32,
    )
}

impl Default for IndexShard {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexShard {
    pub fn new() -> Self {
        IndexShard {
            groups: HashMap::new(),
            counters: HashMap::new(),
            counted: 0,
        }
    }

    pub fn heap_bytes(&self) -> u64 {
        let tables: usize = self.groups.values().map(|g| g.entries.allocation_size()).sum();
        (tables + self.groups.allocation_size() + self.counters.allocation_size()) as u64
    }

    fn settle(&mut self, budget: &Budget) {
        let now = self.heap_bytes();
        budget.settle(&mut self.counted, now);
    }

    pub fn counters(&mut self, guest: u32, pool: u32) -> &mut Counters {
        self.counters.entry((guest, pool)).or_default()
    }

    /// Points (guest, pool, index) at `handle`, returning the handle it replaces.
    pub fn insert(
        &mut self,
        guest: u32,
        pool: u32,
        index: u64,
        handle: u32,
        budget: &Budget,
    ) -> Result<Option<u32>, NoRoom> {
        let (group, lo) = split(guest, pool, index);
        let h = lo_hash(lo);
        let g = self.groups.entry(group).or_default();
        if let Some(entry) = g.entries.find_mut(h, |e| e.0 == lo) {
            return Ok(Some(std::mem::replace(&mut entry.1, handle)));
        }
        if g.entries.len() == g.entries.capacity() {
            // hashbrown doubles its buckets: the growth is about the current size.
            let growth = g.entries.allocation_size().max(256) as u64;
            if !budget.try_reserve(growth) {
                return Err(NoRoom);
            }
            self.counted += growth;
        }
        g.entries.insert_unique(h, (lo, handle), |e| lo_hash(e.0));
        self.settle(budget);
        Ok(None)
    }

    pub fn get(&self, guest: u32, pool: u32, index: u64) -> Option<u32> {
        let (group, lo) = split(guest, pool, index);
        let g = self.groups.get(&group)?;
        g.entries.find(lo_hash(lo), |e| e.0 == lo).map(|e| e.1)
    }

    pub fn remove(&mut self, guest: u32, pool: u32, index: u64, budget: &Budget) -> Option<u32> {
        let (group, lo) = split(guest, pool, index);
        let g = self.groups.get_mut(&group)?;
        let Ok(entry) = g.entries.find_entry(lo_hash(lo), |e| e.0 == lo) else {
            return None;
        };
        let ((_, handle), _) = entry.remove();
        let (len, cap) = (g.entries.len(), g.entries.capacity());
        if cap > 64 && len * 4 < cap {
            g.entries.shrink_to(len * 2, |e| lo_hash(e.0));
            self.settle(budget);
        }
        Some(handle)
    }

    /// Removes every entry of the pools `which` selects, returning their handles
    /// as (guest, pool, handle).
    pub fn take_pools(&mut self, which: impl Fn(u32, u32) -> bool, budget: &Budget) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        self.groups.retain(|k, g| {
            if which(k.guest, k.pool) {
                out.extend(g.entries.drain().map(|(_, h)| (k.guest, k.pool, h)));
                false
            } else {
                true
            }
        });
        if self.groups.is_empty() {
            self.groups.shrink_to_fit();
        }
        self.settle(budget);
        out
    }

    /// Calls `f` with the counters of every pool, plus the index bytes it holds.
    pub fn add_stats(&self, mut f: impl FnMut(u32, u32, &Counters, u64)) {
        let mut bytes: HashMap<(u32, u32), u64> = HashMap::new();
        for (k, g) in &self.groups {
            *bytes.entry((k.guest, k.pool)).or_default() += g.entries.allocation_size() as u64;
        }
        for (&(guest, pool), c) in &self.counters {
            f(guest, pool, c, bytes.get(&(guest, pool)).copied().unwrap_or(0));
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.groups.values().map(|g| g.entries.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replace_get_remove() {
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new();
        assert_eq!(s.insert(1, 2, 3, 10, &b), Ok(None));
        assert_eq!(s.insert(1, 2, 3, 11, &b), Ok(Some(10)));
        assert_eq!(s.get(1, 2, 3), Some(11));
        assert_eq!(s.get(1, 2, 4), None);
        assert_eq!(s.get(1, 3, 3), None);
        assert_eq!(s.get(2, 2, 3), None);
        // The upper half of the index is part of the key.
        assert_eq!(s.insert(1, 2, 3 | (1 << 32), 12, &b), Ok(None));
        assert_eq!(s.get(1, 2, 3), Some(11));
        assert_eq!(s.remove(1, 2, 3, &b), Some(11));
        assert_eq!(s.remove(1, 2, 3, &b), None);
        assert_eq!(s.get(1, 2, 3 | (1 << 32)), Some(12));
    }

    #[test]
    fn budget_counts_and_limits_the_tables() {
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new();
        for i in 0..10_000 {
            s.insert(0, 0, i, i as u32, &b).unwrap();
        }
        assert_eq!(b.used(), s.heap_bytes());
        let per_entry = s.heap_bytes() as f64 / 10_000.0;
        assert!(per_entry <= 21.0, "{per_entry} bytes per entry");
        for i in 0..10_000 {
            assert_eq!(s.remove(0, 0, i, &b), Some(i as u32));
        }
        assert_eq!(b.used(), s.heap_bytes());
        assert!(s.heap_bytes() < 4096, "tables shrink back");

        let tight = Budget::new(0);
        let mut t = IndexShard::new();
        assert_eq!(t.insert(0, 0, 1, 1, &tight), Err(NoRoom));
        assert_eq!(t.get(0, 0, 1), None);
    }

    #[test]
    fn take_pools_selects_by_guest_and_pool() {
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new();
        for (g, p) in [(0, 0), (0, 1), (1, 0)] {
            for i in 0..5 {
                s.insert(g, p, i, g * 100 + p * 10 + i as u32, &b).unwrap();
            }
        }
        let mut taken = s.take_pools(|g, p| g == 0 && p == 1, &b);
        taken.sort();
        assert_eq!(taken, (10..15).map(|h| (0, 1, h)).collect::<Vec<_>>());
        assert_eq!(s.take_pools(|g, _| g == 1, &b).len(), 5);
        assert_eq!(s.entries(), 5);
        assert_eq!(s.get(0, 0, 4), Some(4));
    }
}
