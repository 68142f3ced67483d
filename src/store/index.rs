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
    seed: u64,
    groups: HashMap<Group, PoolIndex>,
    counters: HashMap<(u32, u32), Counters>,
    counted: u64,
}

/// Pool number under which ops on pools that never held a page are counted.
pub const OTHER_POOLS: u32 = u32::MAX;

/// Bytes reserved when a put starts a new group or pool (table, map entry, counters).
const NEW_GROUP_BYTES: u64 = 512;

/// The index has no room for a new entry and the budget could not give it.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoom;

/// Indices in one aligned run of [`RUN`] share a shard and sit side by side
/// in its table, so sequential swap-ins touch few cache lines.
pub const RUN_BITS: u32 = 6;

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Table hash of the lower index half. The low bits (the bucket) keep the
/// position within a run and place runs by a seeded mix, so a guest cannot
/// choose indices that pile into one probe chain without knowing the seed;
/// the top 7 bits (hashbrown's tag) come from a mix of the whole value.
fn lo_hash(seed: u64, lo: u32) -> u64 {
    let run_mask = (1u64 << RUN_BITS) - 1;
    let place = mix(u64::from(lo >> RUN_BITS) ^ seed) << RUN_BITS;
    let tag = mix(u64::from(lo) ^ seed.rotate_left(32)) & (0x7f << 57);
    (place & !run_mask & !(0x7f << 57)) | (u64::from(lo) & run_mask) | tag
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

impl IndexShard {
    pub fn new(seed: u64) -> Self {
        IndexShard {
            seed,
            groups: HashMap::new(),
            counters: HashMap::new(),
            counted: 0,
        }
    }

    /// Bytes the index holds for pages. The per-pool counters are left out:
    /// they are statistics that outlive the pages (one entry per pool ever
    /// used), so an emptied store returns exactly to its starting footprint.
    pub fn heap_bytes(&self) -> u64 {
        let tables: usize = self.groups.values().map(|g| g.entries.allocation_size()).sum();
        (tables + self.groups.allocation_size()) as u64
    }

    fn settle(&mut self, budget: &Budget) {
        let now = self.heap_bytes();
        budget.settle(&mut self.counted, now);
    }

    /// The counters of a pool that has held pages; ops on any other pool
    /// count under [`OTHER_POOLS`], so a guest naming random pools cannot make
    /// the host allocate.
    pub fn counters(&mut self, guest: u32, pool: u32) -> &mut Counters {
        let key = if self.counters.contains_key(&(guest, pool)) {
            (guest, pool)
        } else {
            (guest, OTHER_POOLS)
        };
        self.counters.entry(key).or_default()
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
        let h = lo_hash(self.seed, lo);
        if !self.groups.contains_key(&group) {
            if !budget.try_reserve(NEW_GROUP_BYTES) {
                return Err(NoRoom);
            }
            self.counted += NEW_GROUP_BYTES;
            self.counters.entry((guest, pool)).or_default();
        }
        let g = self.groups.entry(group).or_default();
        if let Some(entry) = g.entries.find_mut(h, |e| e.0 == lo) {
            return Ok(Some(std::mem::replace(&mut entry.1, handle)));
        }
        if g.entries.len() == g.entries.capacity() {
            // hashbrown doubles its buckets: the growth is about the current size.
            let growth = g.entries.allocation_size().max(256) as u64;
            if !budget.try_reserve(growth) {
                // Give back what a new group reserved above, if anything.
                if g.entries.is_empty() {
                    self.groups.remove(&group);
                    if self.groups.is_empty() {
                        self.groups.shrink_to_fit();
                    }
                }
                self.settle(budget);
                return Err(NoRoom);
            }
            self.counted += growth;
        }
        let seed = self.seed;
        g.entries.insert_unique(h, (lo, handle), |e| lo_hash(seed, e.0));
        self.settle(budget);
        Ok(None)
    }

    pub fn get(&self, guest: u32, pool: u32, index: u64) -> Option<u32> {
        let (group, lo) = split(guest, pool, index);
        let g = self.groups.get(&group)?;
        g.entries.find(lo_hash(self.seed, lo), |e| e.0 == lo).map(|e| e.1)
    }

    pub fn remove(&mut self, guest: u32, pool: u32, index: u64, budget: &Budget) -> Option<u32> {
        let (group, lo) = split(guest, pool, index);
        let g = self.groups.get_mut(&group)?;
        let Ok(entry) = g.entries.find_entry(lo_hash(self.seed, lo), |e| e.0 == lo) else {
            return None;
        };
        let ((_, handle), _) = entry.remove();
        let (len, cap) = (g.entries.len(), g.entries.capacity());
        if len == 0 {
            self.groups.remove(&group);
            if self.groups.is_empty() {
                self.groups.shrink_to_fit();
            }
            self.settle(budget);
        } else if cap > 64 && len * 4 < cap {
            let seed = self.seed;
            g.entries.shrink_to(len * 2, |e| lo_hash(seed, e.0));
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
        if out.is_empty() {
            return out;
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
        let mut s = IndexShard::new(12345);
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
        let mut s = IndexShard::new(12345);
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
        let mut t = IndexShard::new(12345);
        assert_eq!(t.insert(0, 0, 1, 1, &tight), Err(NoRoom));
        assert_eq!(t.get(0, 0, 1), None);
    }

    #[test]
    fn take_pools_selects_by_guest_and_pool() {
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(12345);
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

    #[test]
    fn runs_stay_together_and_strides_spread() {
        let seed = 99;
        // One run: consecutive buckets.
        let base = lo_hash(seed, 640) & 0xffff;
        for k in 0..64 {
            assert_eq!(lo_hash(seed, 640 + k) & 0xffff, base + u64::from(k));
        }
        // Power-of-two strides (a classic way to pile keys up) spread over the
        // run places: a guest can crowd at most one run's worth into a place.
        let buckets: std::collections::HashSet<u64> =
            (0..1000u32).map(|i| lo_hash(seed, i << 16) & 0xffff).collect();
        assert!(buckets.len() > 500, "{} distinct buckets", buckets.len());
        // Tags vary inside a run.
        let tags: std::collections::HashSet<u64> = (0..64).map(|k| lo_hash(seed, k) >> 57).collect();
        assert!(tags.len() > 20);
    }

    #[test]
    fn misses_on_unknown_pools_allocate_nothing() {
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(12345);
        s.insert(0, 1, 1, 1, &b).unwrap();
        let before = s.heap_bytes();
        for pool in 100..10_000 {
            assert_eq!(s.remove(0, pool, 1, &b), None);
            s.counters(0, pool).failed_loads += 1;
        }
        s.counters(0, 1).loads += 1;
        assert!(s.heap_bytes() <= before + 256, "one shared bucket at most");
        let mut seen = Vec::new();
        s.add_stats(|g, p, c, _| seen.push((g, p, c.loads, c.failed_loads)));
        seen.sort();
        assert_eq!(seen, vec![(0, 1, 1, 0), (0, OTHER_POOLS, 0, 9900)]);
    }
}
