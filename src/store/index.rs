//! One index shard: (guest, pool, index) -> object handle, and the page
//! counters of each pool.
//!
//! Layout: guest -> pool -> tables. A pool record holds its page counters,
//! the table of its indices below 2^32 (swap offsets fit there), and a map of
//! tables by upper index half for any others. An entry is only the lower 32
//! bits of the index and a 32-bit handle: 8 bytes plus hashbrown's control
//! byte, divided by the load factor (7/16 to 7/8). Nothing is preallocated by
//! swap size; a table that empties to a quarter shrinks back.
//!
//! Every byte here is allocated on some guest's behalf, so:
//! - it is counted at the size malloc gives it ([`malloc_bytes`]), in running
//!   totals per pool, per guest and per shard that each change updates: no
//!   operation walks other pools or guests to learn a size;
//! - a pool record leaves with the pool's last page in this shard; its
//!   cumulative counters move to its guest's "other pools" record first;
//! - whole-pool and whole-guest drops find their tables through their own
//!   records, so their cost follows their own pages.
//!
//! The guest record (its "other pools" counters and its map's header) is per
//! device, not per guest input, and stays: it is the fixed overhead.

use std::collections::hash_map::RandomState;

use hashbrown::{HashMap, HashTable};

use super::{budget::Budget, keys::Keys, Counters};

type Table = HashTable<(u32, u32)>;

/// Pool number under which the "other pools" of a guest report: ops on pools
/// holding no page here, emptied pools, and pools past the stats' top N.
pub const OTHER_POOLS: u32 = u32::MAX;

/// The index has no room for a new entry and the budget could not give it.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoom;

/// Indices in one aligned run of 64 share a shard and sit side by side in
/// its table, so sequential swap-ins touch few cache lines.
pub const RUN_BITS: u32 = 6;
const RUN_MASK: u64 = (1 << RUN_BITS) - 1;
/// hashbrown takes its 7-bit tag from the top of the hash.
const TAG_MASK: u64 = 0x7f << 57;

/// What glibc's malloc takes for an allocation of `n` bytes: an 8-byte
/// header, rounded up to 16, at least 32. The index makes many small
/// allocations (a one-page pool's table is 52 bytes), so the header counts.
pub fn malloc_bytes(n: usize) -> u64 {
    if n == 0 {
        0
    } else {
        ((n + 8 + 15) & !15).max(32) as u64
    }
}

/// Bytes reserved for a table's or map's next growth: the doubled
/// allocation (the old one is freed after), or a first one of 4 buckets.
fn growth<T>(len: usize, capacity: usize, allocation: usize) -> u64 {
    if len < capacity {
        0
    } else if capacity == 0 {
        malloc_bytes(4 * std::mem::size_of::<T>() + 32)
    } else {
        malloc_bytes(2 * allocation + 32)
    }
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Table hash of an entry, from the keyed hash of its run: the low bits
/// (the bucket) keep the position within the run and take the run's place
/// from the key, so a guest cannot choose indices that pile into one probe
/// chain; the top 7 bits (the tag) vary within the run.
fn slot_hash(run: u64, lo: u32) -> u64 {
    let place = run & !RUN_MASK & !TAG_MASK;
    place | (u64::from(lo) & RUN_MASK) | (mix(run ^ u64::from(lo)) & TAG_MASK)
}

/// Where an operation is: the page's address and its run's keyed hash.
#[derive(Clone, Copy, Debug)]
pub struct At {
    pub guest: u32,
    pub pool: u32,
    pub index: u64,
    /// `Keys::run(guest, pool, index)`.
    pub run: u64,
}

impl At {
    fn split(&self) -> (u32, u32) {
        ((self.index >> 32) as u32, self.index as u32)
    }
}

/// The counters an index shard keeps per pool (frontswap's and zram's names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageCounters {
    pub succ_stores: u64,
    pub failed_stores: u64,
    pub loads: u64,
    pub failed_loads: u64,
    pub invalidates: u64,
    pub stored_pages: u64,
    pub same_filled_pages: u64,
    pub dedup_hits: u64,
}

impl PageCounters {
    /// A page of this pool is gone from the index (invalidated, read
    /// exclusively, or overwritten by a rejected put).
    pub fn forget_page(&mut self, was_fill: bool) {
        self.stored_pages -= 1;
        self.same_filled_pages -= u64::from(was_fill);
    }

    /// Moves the cumulative counters into `other`; the gauges go (the pages
    /// are gone).
    fn retire_into(&self, other: &mut PageCounters) {
        other.succ_stores += self.succ_stores;
        other.failed_stores += self.failed_stores;
        other.loads += self.loads;
        other.failed_loads += self.failed_loads;
        other.invalidates += self.invalidates;
        other.dedup_hits += self.dedup_hits;
    }

    pub fn add_to(&self, c: &mut Counters) {
        c.succ_stores += self.succ_stores;
        c.failed_stores += self.failed_stores;
        c.loads += self.loads;
        c.failed_loads += self.failed_loads;
        c.invalidates += self.invalidates;
        c.stored_pages += self.stored_pages;
        c.orig_data_bytes += self.stored_pages * super::PAGE_SIZE as u64;
        c.same_filled_pages += self.same_filled_pages;
        c.dedup_hits += self.dedup_hits;
    }
}

struct PoolRec {
    c: PageCounters,
    /// Indices below 2^32.
    low: Table,
    /// Tables of the other upper halves (keyed: the guest picks them).
    high: HashMap<u32, Table, RandomState>,
    /// Bytes of `low`, `high` and `high`'s tables.
    bytes: u64,
}

impl PoolRec {
    fn new(hasher: RandomState) -> Self {
        PoolRec {
            c: PageCounters::default(),
            low: Table::new(),
            high: HashMap::with_hasher(hasher),
            bytes: 0,
        }
    }

    fn table(&self, hi: u32) -> Option<&Table> {
        if hi == 0 {
            Some(&self.low)
        } else {
            self.high.get(&hi)
        }
    }

    /// Bytes the next insert at `hi` may allocate.
    fn growth(&self, hi: u32) -> u64 {
        let t = match self.table(hi) {
            Some(t) => t,
            None => {
                let h = &self.high;
                return growth::<(u32, Table)>(h.len(), h.capacity(), h.allocation_size())
                    + growth::<(u32, u32)>(0, 0, 0);
            }
        };
        growth::<(u32, u32)>(t.len(), t.capacity(), t.allocation_size())
    }

    #[cfg(test)]
    fn recount(&mut self) {
        self.bytes = malloc_bytes(self.low.allocation_size())
            + malloc_bytes(self.high.allocation_size())
            + self
                .high
                .values()
                .map(|t| malloc_bytes(t.allocation_size()))
                .sum::<u64>();
    }

    /// Bytes of the table at `hi` and of the high map, for updating `bytes`
    /// around a change to that one table.
    fn part(&self, hi: u32) -> u64 {
        let t = self.table(hi).map_or(0, |t| malloc_bytes(t.allocation_size()));
        if hi == 0 {
            t
        } else {
            t + malloc_bytes(self.high.allocation_size())
        }
    }
}

struct GuestRec {
    pools: HashMap<u32, PoolRec, RandomState>,
    /// Counters of ops on pools holding no page here, and of emptied pools.
    other: PageCounters,
    /// Bytes of `pools` and of every pool's tables.
    bytes: u64,
}

impl GuestRec {
    fn map_bytes(&self) -> u64 {
        malloc_bytes(self.pools.allocation_size())
    }
}

pub struct IndexShard {
    hasher: RandomState,
    guests: HashMap<u32, GuestRec>,
    /// Bytes of every guest's pools and tables (the sum of their `bytes`).
    heap: u64,
    /// Bytes this shard has counted in the budget.
    counted: u64,
    /// Tables looked at, for tests and benchmarks of what an operation touches.
    visited: u64,
}

impl IndexShard {
    pub fn new(keys: &Keys) -> Self {
        IndexShard {
            hasher: keys.map_hasher(),
            guests: HashMap::new(),
            heap: 0,
            counted: 0,
            visited: 0,
        }
    }

    /// Bytes the index holds for pages: pool maps, pool records and tables.
    /// Guest records are per device and left out, so an emptied store
    /// returns exactly to its starting footprint.
    pub fn heap_bytes(&self) -> u64 {
        self.heap
    }

    /// Of those, the bytes held for one guest.
    pub fn guest_bytes(&self, guest: u32) -> u64 {
        self.guests.get(&guest).map_or(0, |g| g.bytes)
    }

    /// Tables looked at so far.
    pub fn visited(&self) -> u64 {
        self.visited
    }

    fn guest(&mut self, guest: u32) -> &mut GuestRec {
        let hasher = &self.hasher;
        self.guests.entry(guest).or_insert_with(|| GuestRec {
            pools: HashMap::with_hasher(hasher.clone()),
            other: PageCounters::default(),
            bytes: 0,
        })
    }

    /// Brings the guest's and the shard's totals from `before` to `after`
    /// bytes, and the budget and the guest's account with them.
    fn moved(&mut self, guest: u32, before: u64, after: u64, budget: &Budget) {
        if let Some(g) = self.guests.get_mut(&guest) {
            g.bytes = g.bytes + after - before;
        }
        self.heap = self.heap + after - before;
        budget.settle(&mut self.counted, self.heap);
        budget.shares().ram(guest, after as i64 - before as i64);
    }

    /// The counters of a pool holding pages here; ops on any other pool
    /// count under the guest's "other pools", so a guest naming random pools
    /// cannot make the host allocate.
    pub fn counters(&mut self, guest: u32, pool: u32) -> &mut PageCounters {
        let GuestRec { pools, other, .. } = self.guest(guest);
        match pools.get_mut(&pool) {
            Some(p) => &mut p.c,
            None => other,
        }
    }

    /// Points the page at `handle`, returning the handle it replaces.
    pub fn insert(
        &mut self,
        keys: &Keys,
        at: At,
        handle: u32,
        budget: &Budget,
        force: bool,
    ) -> Result<Option<u32>, NoRoom> {
        let (hi, lo) = at.split();
        let h = slot_hash(at.run, lo);
        self.visited += 1;
        let hasher = self.hasher.clone();
        let g = self.guest(at.guest);
        let need = match g.pools.get_mut(&at.pool) {
            Some(p) => {
                let found = if hi == 0 {
                    Some(&mut p.low)
                } else {
                    p.high.get_mut(&hi)
                };
                if let Some(e) = found.and_then(|t| t.find_mut(h, |e| e.0 == lo)) {
                    return Ok(Some(std::mem::replace(&mut e.1, handle)));
                }
                p.growth(hi)
            }
            None => {
                let m = &g.pools;
                growth::<(u32, PoolRec)>(m.len(), m.capacity(), m.allocation_size())
                    + PoolRec::new(hasher.clone()).growth(hi)
            }
        };
        if !budget.reserve(need, force) {
            return Err(NoRoom);
        }
        self.counted += need;
        let g = self.guest(at.guest);
        let map_before = g.map_bytes();
        let p = g.pools.entry(at.pool).or_insert_with(|| PoolRec::new(hasher));
        let part_before = p.part(hi);
        let t = if hi == 0 {
            &mut p.low
        } else {
            p.high.entry(hi).or_default()
        };
        let (guest, pool) = (at.guest, at.pool);
        t.insert_unique(h, (lo, handle), |e| {
            slot_hash(keys.run(guest, pool, u64::from(hi) << 32 | u64::from(e.0)), e.0)
        });
        let part_after = p.part(hi);
        p.bytes = p.bytes + part_after - part_before;
        let map_after = g.map_bytes();
        self.moved(at.guest, map_before + part_before, map_after + part_after, budget);
        Ok(None)
    }

    pub fn get(&mut self, at: At) -> Option<u32> {
        let (hi, lo) = at.split();
        self.visited += 1;
        let p = self.guests.get(&at.guest)?.pools.get(&at.pool)?;
        p.table(hi)?
            .find(slot_hash(at.run, lo), |e| e.0 == lo)
            .map(|e| e.1)
    }

    /// Removes the page's entry. The pool record stays, for the caller to
    /// count the removal, until [`IndexShard::tidy`].
    pub fn remove(&mut self, keys: &Keys, at: At, budget: &Budget) -> Option<u32> {
        let (hi, lo) = at.split();
        self.visited += 1;
        let p = self.guests.get_mut(&at.guest)?.pools.get_mut(&at.pool)?;
        let before = p.part(hi);
        let t = if hi == 0 { &mut p.low } else { p.high.get_mut(&hi)? };
        let Ok(entry) = t.find_entry(slot_hash(at.run, lo), |e| e.0 == lo) else {
            return None;
        };
        let ((_, handle), _) = entry.remove();
        let (len, cap) = (t.len(), t.capacity());
        if len == 0 {
            if hi == 0 {
                p.low = Table::new();
            } else {
                p.high.remove(&hi);
                if p.high.is_empty() {
                    p.high.shrink_to_fit();
                }
            }
        } else if cap > 64 && len * 4 < cap {
            let (guest, pool) = (at.guest, at.pool);
            t.shrink_to(len * 2, |e| {
                slot_hash(keys.run(guest, pool, u64::from(hi) << 32 | u64::from(e.0)), e.0)
            });
        } else {
            return Some(handle);
        }
        let after = p.part(hi);
        p.bytes = p.bytes + after - before;
        self.moved(at.guest, before, after, budget);
        Some(handle)
    }

    /// Drops the pool's record if it holds no page here, moving its
    /// cumulative counters to the guest's "other pools".
    pub fn tidy(&mut self, guest: u32, pool: u32, budget: &Budget) {
        let Some(g) = self.guests.get_mut(&guest) else {
            return;
        };
        if !g.pools.get(&pool).is_some_and(|p| p.c.stored_pages == 0) {
            return;
        }
        let before = g.map_bytes();
        let Some(p) = g.pools.remove(&pool) else {
            return;
        };
        debug_assert!(p.low.is_empty() && p.high.is_empty());
        p.c.retire_into(&mut g.other);
        shrink_map(&mut g.pools);
        let after = g.map_bytes();
        self.moved(guest, before + p.bytes, after, budget);
    }

    /// Removes every entry of one pool, calling `f` with each handle, and
    /// returns how many there were. Costs what the pool holds here.
    pub fn take_pool(&mut self, guest: u32, pool: u32, budget: &Budget, mut f: impl FnMut(u32)) -> u64 {
        let Some(g) = self.guests.get_mut(&guest) else {
            return 0;
        };
        let before = g.map_bytes();
        let Some(p) = g.pools.remove(&pool) else {
            return 0;
        };
        p.c.retire_into(&mut g.other);
        shrink_map(&mut g.pools);
        let after = g.map_bytes();
        self.visited += 1 + p.high.len() as u64;
        self.moved(guest, before + p.bytes, after, budget);
        drain(p, &mut f)
    }

    /// Removes every entry of one guest, calling `f` with each handle.
    pub fn take_guest(&mut self, guest: u32, budget: &Budget, mut f: impl FnMut(u32)) -> u64 {
        let Some(g) = self.guests.get_mut(&guest) else {
            return 0;
        };
        let hasher = self.hasher.clone();
        let pools = std::mem::replace(&mut g.pools, HashMap::with_hasher(hasher));
        let before = g.bytes;
        for p in pools.values() {
            p.c.retire_into(&mut g.other);
        }
        self.moved(guest, before, 0, budget);
        let mut n = 0;
        for (_, p) in pools {
            self.visited += 1 + p.high.len() as u64;
            n += drain(p, &mut f);
        }
        n
    }

    /// Calls `f` with the counters of every pool and of each guest's other
    /// pools, and the index bytes each holds.
    pub fn add_stats(&self, mut f: impl FnMut(u32, u32, &PageCounters, u64)) {
        for (&guest, g) in &self.guests {
            for (&pool, p) in &g.pools {
                f(guest, pool, &p.c, p.bytes);
            }
            f(guest, OTHER_POOLS, &g.other, g.map_bytes());
        }
    }

    /// Calls `f` with every pool holding pages here and its page count.
    pub fn pool_pages(&self, mut f: impl FnMut(u32, u32, u64)) {
        for (&guest, g) in &self.guests {
            for (&pool, p) in &g.pools {
                f(guest, pool, p.c.stored_pages);
            }
        }
    }

    /// Calls `f` with the `n` pools of each guest that hold the most pages
    /// here (ties: the lower pool id). Takes O(n) memory whatever the number
    /// of pools.
    pub fn top_pools(&self, n: usize, mut f: impl FnMut(u32, u32)) {
        use std::{cmp::Reverse, collections::BinaryHeap};
        let mut heap = BinaryHeap::with_capacity(n + 1);
        for (&guest, g) in &self.guests {
            heap.clear();
            for (&pool, p) in &g.pools {
                heap.push(Reverse((p.c.stored_pages, Reverse(pool))));
                if heap.len() > n {
                    heap.pop();
                }
            }
            for Reverse((_, Reverse(pool))) in heap.drain() {
                f(guest, pool);
            }
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.guests
            .values()
            .flat_map(|g| g.pools.values())
            .map(|p| p.low.len() + p.high.values().map(Table::len).sum::<usize>())
            .sum()
    }

    /// Recomputes every total from the tables (tests: the running totals
    /// must equal it).
    #[cfg(test)]
    pub fn recount(&mut self) -> u64 {
        let mut heap = 0;
        for g in self.guests.values_mut() {
            let mut bytes = g.map_bytes();
            for p in g.pools.values_mut() {
                let kept = p.bytes;
                p.recount();
                assert_eq!(kept, p.bytes, "pool bytes");
                bytes += p.bytes;
            }
            assert_eq!(g.bytes, bytes, "guest bytes");
            heap += bytes;
        }
        heap
    }
}

fn shrink_map<V>(m: &mut HashMap<u32, V, RandomState>) {
    if m.is_empty() {
        m.shrink_to_fit();
    } else if m.capacity() > 16 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

fn drain(mut p: PoolRec, f: &mut impl FnMut(u32)) -> u64 {
    let mut n = 0;
    for (_, h) in p.low.drain() {
        f(h);
        n += 1;
    }
    for (_, mut t) in p.high.drain() {
        for (_, h) in t.drain() {
            f(h);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(keys: &Keys, guest: u32, pool: u32, index: u64) -> At {
        At {
            guest,
            pool,
            index,
            run: keys.run(guest, pool, index),
        }
    }

    #[test]
    fn insert_replace_get_remove() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        assert_eq!(s.insert(&k, at(&k, 1, 2, 3), 10, &b, false), Ok(None));
        assert_eq!(s.insert(&k, at(&k, 1, 2, 3), 11, &b, false), Ok(Some(10)));
        assert_eq!(s.get(at(&k, 1, 2, 3)), Some(11));
        assert_eq!(s.get(at(&k, 1, 2, 4)), None);
        assert_eq!(s.get(at(&k, 1, 3, 3)), None);
        assert_eq!(s.get(at(&k, 2, 2, 3)), None);
        // The upper half of the index is part of the key.
        assert_eq!(s.insert(&k, at(&k, 1, 2, 3 | (1 << 32)), 12, &b, false), Ok(None));
        assert_eq!(s.get(at(&k, 1, 2, 3)), Some(11));
        assert_eq!(s.remove(&k, at(&k, 1, 2, 3), &b), Some(11));
        assert_eq!(s.remove(&k, at(&k, 1, 2, 3), &b), None);
        assert_eq!(s.get(at(&k, 1, 2, 3 | (1 << 32))), Some(12));
        assert_eq!(s.recount(), s.heap_bytes());
    }

    #[test]
    fn budget_counts_and_limits_the_tables() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        for i in 0..10_000 {
            s.insert(&k, at(&k, 0, 0, i), i as u32, &b, false).unwrap();
        }
        assert_eq!(b.used(), s.heap_bytes());
        assert_eq!(s.recount(), s.heap_bytes());
        let per_entry = s.heap_bytes() as f64 / 10_000.0;
        assert!(per_entry <= 21.0, "{per_entry} bytes per entry");
        for i in 0..10_000 {
            assert_eq!(s.remove(&k, at(&k, 0, 0, i), &b), Some(i as u32));
        }
        assert_eq!(b.used(), s.heap_bytes());
        assert!(s.heap_bytes() < 4096, "tables shrink back");
        s.counters(0, 0).stored_pages = 0;
        s.tidy(0, 0, &b);
        assert_eq!((s.heap_bytes(), b.used()), (0, 0), "and the pool record goes");

        let tight = Budget::new(0);
        let mut t = IndexShard::new(&k);
        assert_eq!(t.insert(&k, at(&k, 0, 0, 1), 1, &tight, false), Err(NoRoom));
        assert_eq!(t.get(at(&k, 0, 0, 1)), None);
        assert_eq!((t.heap_bytes(), tight.used()), (0, 0));
    }

    #[test]
    fn take_pools_selects_by_guest_and_pool() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        for (g, p) in [(0, 0), (0, 1), (1, 0)] {
            for i in 0..5 {
                s.insert(&k, at(&k, g, p, i), g * 100 + p * 10 + i as u32, &b, false)
                    .unwrap();
                s.counters(g, p).stored_pages += 1;
            }
        }
        let mut taken = Vec::new();
        assert_eq!(s.take_pool(0, 1, &b, |h| taken.push((0, 1, h))), 5);
        taken.sort();
        assert_eq!(taken, (10..15).map(|h| (0, 1, h)).collect::<Vec<_>>());
        assert_eq!(s.take_guest(1, &b, |_| {}), 5);
        assert_eq!(s.entries(), 5);
        assert_eq!(s.get(at(&k, 0, 0, 4)), Some(4));
        assert_eq!(s.recount(), s.heap_bytes());
        assert_eq!(b.used(), s.heap_bytes());
    }

    #[test]
    fn runs_stay_together_and_strides_spread() {
        let k = Keys::new();
        let h = |lo: u32| slot_hash(k.run(0, 0, u64::from(lo)), lo);
        // One run: consecutive buckets.
        let base = h(640) & 0xffff;
        for i in 0..64 {
            assert_eq!(h(640 + i) & 0xffff, base + u64::from(i));
        }
        // Power-of-two strides (a classic way to pile keys up) spread over the
        // run places: a guest can crowd at most one run's worth into a place.
        let buckets: std::collections::HashSet<u64> = (0..1000u32).map(|i| h(i << 16) & 0xffff).collect();
        assert!(buckets.len() > 500, "{} distinct buckets", buckets.len());
        // Tags vary inside a run.
        let tags: std::collections::HashSet<u64> = (0..64).map(|i| h(i) >> 57).collect();
        assert!(tags.len() > 20);
    }

    #[test]
    fn misses_on_unknown_pools_allocate_nothing() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        s.insert(&k, at(&k, 0, 1, 1), 1, &b, false).unwrap();
        let before = s.heap_bytes();
        for pool in 100..10_000 {
            assert_eq!(s.remove(&k, at(&k, 0, pool, 1), &b), None);
            s.counters(0, pool).failed_loads += 1;
        }
        s.counters(0, 1).loads += 1;
        assert!(s.heap_bytes() <= before + 256, "one shared bucket at most");
        let mut seen = Vec::new();
        s.add_stats(|g, p, c, _| seen.push((g, p, c.loads, c.failed_loads)));
        seen.sort();
        assert_eq!(seen, vec![(0, 1, 1, 0), (0, OTHER_POOLS, 0, 9900)]);
    }

    #[test]
    fn a_new_pool_costs_the_same_beside_any_number_of_others() {
        let k = Keys::new();
        let b = Budget::new(1 << 34);
        let mut s = IndexShard::new(&k);
        let cost = |s: &mut IndexShard, pool| {
            let (v, heap) = (s.visited(), s.heap_bytes());
            s.insert(&k, at(&k, 9, pool, 0), 1, &b, false).unwrap();
            (s.visited() - v, s.heap_bytes() - heap)
        };
        let alone = cost(&mut s, 0);
        for pool in 0..20_000 {
            s.insert(&k, at(&k, 8, pool, u64::from(pool) << 32), pool, &b, false)
                .unwrap();
        }
        assert_eq!(cost(&mut s, 1).0, alone.0, "tables visited by one insert");
        assert_eq!(b.used(), s.heap_bytes());
        assert_eq!(s.recount(), s.heap_bytes());
        // An empty pool's drop looks at nothing; a pool's drop at its own tables.
        let v = s.visited();
        assert_eq!(s.take_pool(9, 77, &b, |_| {}), 0);
        assert_eq!(s.take_pool(7, 77, &b, |_| {}), 0);
        assert_eq!(s.visited(), v);
        assert_eq!(s.take_pool(9, 0, &b, |_| {}), 1);
        assert_eq!(s.visited(), v + 1);
        // The attacker's guest goes whole, and its bytes with it.
        let victim = s.guest_bytes(9);
        assert_eq!(s.take_guest(8, &b, |_| {}), 20_000);
        assert_eq!(s.heap_bytes(), victim);
        assert_eq!(b.used(), s.heap_bytes());
    }
}
