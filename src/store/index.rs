//! One index shard: (guest, pool, index) -> object handle, and the page
//! counters of each pool.
//!
//! Layout: guest -> pool -> halves. A pool record holds its page counters,
//! the half of its indices below 2^32 (swap offsets fit there), and a map of
//! halves by upper index half for any others. A half holds each aligned run
//! of 64 indices ([`RUN_BITS`]) in one of two forms:
//! - sparse, while the run holds fewer than [`DENSE`] pages: one entry per
//!   page, the lower 32 bits of the index and a 32-bit handle, 8 bytes plus
//!   hashbrown's control byte, divided by the load factor (7/16 to 7/8);
//! - dense, once it holds [`DENSE`]: one entry for the run pointing at a leaf
//!   of 64 handles and a presence bitmap (272 bytes from malloc), 4.25 bytes
//!   a page when the run is full. It goes back to entries when it falls below
//!   `DENSE / 2` pages, so a guest cannot make every operation convert.
//!
//! Swap fills clusters of consecutive offsets, so a guest's pages mostly sit
//! in dense runs. A guest that scatters its pages pays for entries, or for
//! leaves of at least `DENSE / 2` pages, and the bytes are its own (see
//! docs/design.md for the figures).
//! Nothing is preallocated by swap size; a table that empties to a quarter
//! shrinks back.
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

/// Pool number under which the "other pools" of a guest report: ops on pools
/// holding no page here, emptied pools, and pools past the stats' top N.
pub const OTHER_POOLS: u32 = u32::MAX;

/// The index has no room for a new entry and the budget could not give it.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoom;

/// Indices in one aligned run of 64 share a shard, a place in its tables
/// and, once dense, one leaf, so sequential swap-ins touch few cache lines.
pub const RUN_BITS: u32 = 6;
const RUN_LEN: usize = 1 << RUN_BITS;
const RUN_MASK: u32 = (1 << RUN_BITS) - 1;

/// Pages at which a run's entries become a leaf. A leaf and its table entry
/// (about 290 bytes) cost what 14 to 29 entries do (9 bytes at 7/8 to 7/16
/// load), so at 16 the change is about even. A leaf goes back to entries below
/// `DENSE / 2` pages: a guest needs `DENSE / 2` operations per conversion, and
/// a leaf's page costs at most about 37 bytes.
pub const DENSE: u32 = 16;

/// What glibc's malloc takes for an allocation of `n` bytes: an 8-byte
/// header, rounded up to 16, at least 32. The index makes many small
/// allocations (a one-page pool's table is 52 bytes), so the header counts.
pub const fn malloc_bytes(n: usize) -> u64 {
    if n == 0 {
        0
    } else if n + 8 <= 32 {
        32
    } else {
        ((n + 8 + 15) & !15) as u64
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

/// [`growth`] of a table.
fn grows<T>(t: &HashTable<T>) -> u64 {
    growth::<T>(t.len(), t.capacity(), t.allocation_size())
}

/// Bytes reserved for adding `n` entries to a table at once: the allocation
/// `HashTable::reserve` makes if it must grow (at least the next size up).
fn growth_by<T>(t: &HashTable<T>, n: usize) -> u64 {
    if t.len() + n <= t.capacity() {
        0
    } else {
        malloc_bytes(table_allocation::<T>((t.len() + n).max(t.capacity() + 1)))
    }
}

/// hashbrown's allocation for a table of `n` entries: its bucket count (4, 8,
/// then the power of two at or above 8/7 of `n`), the entries rounded to 16,
/// a control byte per bucket and a group's worth more. A test holds it to
/// `allocation_size`.
fn table_allocation<T>(n: usize) -> usize {
    let buckets = if n < 4 {
        4
    } else if n < 8 {
        8
    } else {
        (n * 8 / 7).next_power_of_two()
    };
    (buckets * std::mem::size_of::<T>()).next_multiple_of(16) + buckets + 16
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Table hash of a run, in both tables of a half: its keyed hash, remixed
/// because the top bits of that picked the shard, and hashbrown takes its
/// 7-bit tag from the top. A guest cannot choose indices whose runs pile into
/// one probe chain, and a run brings at most `DENSE - 1` entries to its own:
/// they sit side by side, and one probe sequence finds them all.
fn run_hash(run: u64) -> u64 {
    mix(run)
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

/// The handles of a dense run, by position in the run.
struct Leaf {
    /// Bit i: position i holds a page. Every u32 can be a handle (object
    /// shard 0's id 0 is 0), so absence cannot be a handle value.
    present: u64,
    handles: [u32; RUN_LEN],
}

/// What malloc takes for a leaf: 264 bytes, 272 with its header.
const LEAF_BYTES: u64 = malloc_bytes(std::mem::size_of::<Leaf>());

impl Leaf {
    fn get(&self, lo: u32) -> Option<u32> {
        let i = (lo & RUN_MASK) as usize;
        (self.present >> i & 1 == 1).then(|| self.handles[i])
    }

    fn set(&mut self, lo: u32, handle: u32) -> Option<u32> {
        let old = self.get(lo);
        let i = (lo & RUN_MASK) as usize;
        self.present |= 1 << i;
        self.handles[i] = handle;
        old
    }

    fn take(&mut self, lo: u32) -> Option<u32> {
        let old = self.get(lo)?;
        self.present &= !(1 << (lo & RUN_MASK));
        Some(old)
    }

    fn len(&self) -> u32 {
        self.present.count_ones()
    }

    /// (position in the run, handle) of each page.
    fn pages(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..RUN_LEN as u32)
            .filter(|&i| self.present >> i & 1 == 1)
            .map(|i| (i, self.handles[i as usize]))
    }
}

/// Recomputes a table hash when a table grows, shrinks or takes a run over:
/// entries keep only the lower half of their index.
#[derive(Clone, Copy)]
struct Rehash<'a> {
    keys: &'a Keys,
    guest: u32,
    pool: u32,
    hi: u32,
}

impl Rehash<'_> {
    fn of(&self, lo: u32) -> u64 {
        run_hash(
            self.keys
                .run(self.guest, self.pool, u64::from(self.hi) << 32 | u64::from(lo)),
        )
    }
}

/// Frees an emptied table, or halves one that has emptied to a quarter.
/// Returns whether its allocation changed.
fn shrink<T>(t: &mut HashTable<T>, hasher: impl Fn(&T) -> u64) -> bool {
    let (len, cap) = (t.len(), t.capacity());
    if len == 0 && cap > 0 {
        *t = HashTable::new();
    } else if cap > 64 && len * 4 < cap {
        t.shrink_to(len * 2, hasher);
    } else {
        return false;
    }
    true
}

/// The indices of a pool that share one upper half. A run is in one table
/// or the other, never both.
#[derive(Default)]
struct Half {
    /// Pages of sparse runs: (lower 32 bits of the index, handle).
    pages: HashTable<(u32, u32)>,
    /// Dense runs: (lower 32 bits of the run's first index, leaf).
    leaves: HashTable<(u32, Box<Leaf>)>,
}

impl Half {
    fn bytes(&self) -> u64 {
        malloc_bytes(self.pages.allocation_size())
            + malloc_bytes(self.leaves.allocation_size())
            + self.leaves.len() as u64 * LEAF_BYTES
    }

    fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.leaves.is_empty()
    }

    fn get(&self, h: u64, lo: u32) -> Option<u32> {
        let first = lo & !RUN_MASK;
        match self.leaves.find(h, |e| e.0 == first) {
            Some((_, leaf)) => leaf.get(lo),
            None => self.pages.find(h, |e| e.0 == lo).map(|e| e.1),
        }
    }

    /// Points a page that is here at `handle`, returning the old one; or, if
    /// it is not here and its run is dense, puts it in the leaf. `None`: the
    /// page needs an entry.
    fn replace(&mut self, h: u64, lo: u32, handle: u32) -> Option<Option<u32>> {
        let first = lo & !RUN_MASK;
        if let Some((_, leaf)) = self.leaves.find_mut(h, |e| e.0 == first) {
            return Some(leaf.set(lo, handle));
        }
        let e = self.pages.find_mut(h, |e| e.0 == lo)?;
        Some(Some(std::mem::replace(&mut e.1, handle)))
    }

    /// Entries of the sparse run of `lo`: one probe sequence, at most
    /// `DENSE - 1` of them and a few of other runs with the same tag.
    fn sparse(&self, h: u64, lo: u32) -> u32 {
        let first = lo & !RUN_MASK;
        self.pages
            .iter_hash(h)
            .filter(|e| e.0 & !RUN_MASK == first)
            .count() as u32
    }

    /// Makes the run of `lo` dense with the new page in it: its entries
    /// (fewer than `DENSE`) move to a new leaf. The caller has reserved the
    /// leaf and the growth of `leaves`.
    fn densify(&mut self, h: u64, lo: u32, handle: u32, r: Rehash<'_>) {
        let first = lo & !RUN_MASK;
        let mut leaf = Box::new(Leaf {
            present: 0,
            handles: [0; RUN_LEN],
        });
        for &(other, held) in self.pages.iter_hash(h) {
            if other & !RUN_MASK == first {
                leaf.set(other, held);
            }
        }
        for (i, _) in leaf.pages() {
            if let Ok(e) = self.pages.find_entry(h, |e| e.0 == first | i) {
                e.remove();
            }
        }
        leaf.set(lo, handle);
        shrink(&mut self.pages, |e| r.of(e.0));
        self.leaves.insert_unique(h, (first, leaf), |e| r.of(e.0));
    }

    /// Turns the dense run at `first` back into entries. The caller has
    /// reserved the growth of `pages` for them.
    fn sparsify(&mut self, h: u64, first: u32, r: Rehash<'_>) {
        let Ok(e) = self.leaves.find_entry(h, |e| e.0 == first) else {
            return;
        };
        let ((_, leaf), _) = e.remove();
        self.pages.reserve(leaf.len() as usize, |e| r.of(e.0));
        for (i, handle) in leaf.pages() {
            self.pages.insert_unique(h, (first | i, handle), |e| r.of(e.0));
        }
        shrink(&mut self.leaves, |e| r.of(e.0));
    }

    fn drain(self, f: &mut impl FnMut(u32)) -> u64 {
        let mut n = 0;
        for (_, h) in self.pages {
            f(h);
            n += 1;
        }
        for (_, leaf) in self.leaves {
            for (_, h) in leaf.pages() {
                f(h);
                n += 1;
            }
        }
        n
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pages.len() + self.leaves.iter().map(|(_, l)| l.len() as usize).sum::<usize>()
    }
}

struct PoolRec {
    c: PageCounters,
    /// Indices below 2^32.
    low: Half,
    /// The other upper halves (keyed: the guest picks them).
    high: HashMap<u32, Half, RandomState>,
    /// Bytes of `low`, `high` and `high`'s halves.
    bytes: u64,
}

impl PoolRec {
    fn new(hasher: RandomState) -> Self {
        PoolRec {
            c: PageCounters::default(),
            low: Half::default(),
            high: HashMap::with_hasher(hasher),
            bytes: 0,
        }
    }

    fn half(&self, hi: u32) -> Option<&Half> {
        if hi == 0 {
            Some(&self.low)
        } else {
            self.high.get(&hi)
        }
    }

    fn half_mut(&mut self, hi: u32) -> Option<&mut Half> {
        if hi == 0 {
            Some(&mut self.low)
        } else {
            self.high.get_mut(&hi)
        }
    }

    /// Bytes a new entry at `hi` may allocate.
    fn growth(&self, hi: u32) -> u64 {
        match self.half(hi) {
            Some(half) => grows(&half.pages),
            None => {
                let h = &self.high;
                growth::<(u32, Half)>(h.len(), h.capacity(), h.allocation_size())
                    + growth::<(u32, u32)>(0, 0, 0)
            }
        }
    }

    #[cfg(test)]
    fn recount(&mut self) {
        self.bytes = self.low.bytes()
            + malloc_bytes(self.high.allocation_size())
            + self.high.values().map(Half::bytes).sum::<u64>();
    }

    /// Bytes of the half at `hi` and of the high map, for updating `bytes`
    /// around a change to that one half.
    fn part(&self, hi: u32) -> u64 {
        let t = self.half(hi).map_or(0, Half::bytes);
        if hi == 0 {
            t
        } else {
            t + malloc_bytes(self.high.allocation_size())
        }
    }

    /// Frees the half at `hi` if it is empty.
    fn tidy_half(&mut self, hi: u32) {
        if hi == 0 || !self.high.get(&hi).is_some_and(Half::is_empty) {
            return;
        }
        self.high.remove(&hi);
        if self.high.is_empty() {
            self.high.shrink_to_fit();
        }
    }

    fn is_empty(&self) -> bool {
        self.low.is_empty() && self.high.is_empty()
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

    /// Bytes the index holds for pages: pool maps, pool records, tables and
    /// leaves. Guest records are per device and left out, so an emptied store
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

    /// Points the page at `handle`, returning the handle it replaces. A page
    /// of a dense run, or one already here, allocates nothing; the page that
    /// makes its run dense allocates the leaf, which is reserved first.
    pub fn insert(
        &mut self,
        keys: &Keys,
        at: At,
        handle: u32,
        budget: &Budget,
        force: bool,
    ) -> Result<Option<u32>, NoRoom> {
        let (hi, lo) = at.split();
        let h = run_hash(at.run);
        self.visited += 1;
        let hasher = self.hasher.clone();
        let g = self.guest(at.guest);
        let mut dense = false;
        let need = match g.pools.get_mut(&at.pool) {
            Some(p) => match p.half_mut(hi) {
                Some(half) => {
                    if let Some(old) = half.replace(h, lo, handle) {
                        return Ok(old);
                    }
                    dense = half.sparse(h, lo) + 1 >= DENSE;
                    if dense {
                        LEAF_BYTES + grows(&half.leaves)
                    } else {
                        grows(&half.pages)
                    }
                }
                None => p.growth(hi),
            },
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
        let half = if hi == 0 {
            &mut p.low
        } else {
            p.high.entry(hi).or_default()
        };
        let r = Rehash {
            keys,
            guest: at.guest,
            pool: at.pool,
            hi,
        };
        if dense {
            half.densify(h, lo, handle, r);
        } else {
            half.pages.insert_unique(h, (lo, handle), |e| r.of(e.0));
        }
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
        p.half(hi)?.get(run_hash(at.run), lo)
    }

    /// Removes the page. The pool record stays, for the caller to count the
    /// removal, until [`IndexShard::tidy`]. A dense run that falls below
    /// `DENSE / 2` pages goes back to entries if the budget gives their
    /// table's growth; if not, the leaf stays until a later removal finds
    /// room or the run empties.
    pub fn remove(&mut self, keys: &Keys, at: At, budget: &Budget) -> Option<u32> {
        let (hi, lo) = at.split();
        let (h, first) = (run_hash(at.run), lo & !RUN_MASK);
        self.visited += 1;
        let p = self.guests.get_mut(&at.guest)?.pools.get_mut(&at.pool)?;
        let before = p.part(hi);
        let half = p.half_mut(hi)?;
        let r = Rehash {
            keys,
            guest: at.guest,
            pool: at.pool,
            hi,
        };
        let (handle, left) = match half.leaves.find_mut(h, |e| e.0 == first) {
            Some((_, leaf)) => (leaf.take(lo)?, Some(leaf.len())),
            None => {
                let Ok(e) = half.pages.find_entry(h, |e| e.0 == lo) else {
                    return None;
                };
                (e.remove().0 .1, None)
            }
        };
        let mut reserved = 0;
        match left {
            Some(0) => {
                if let Ok(e) = half.leaves.find_entry(h, |e| e.0 == first) {
                    e.remove();
                }
                shrink(&mut half.leaves, |e| r.of(e.0));
            }
            Some(n) if n < DENSE / 2 => {
                reserved = growth_by(&half.pages, n as usize);
                if !budget.try_reserve(reserved) {
                    return Some(handle);
                }
                half.sparsify(h, first, r);
            }
            Some(_) => return Some(handle),
            None => {
                if !shrink(&mut half.pages, |e| r.of(e.0)) {
                    return Some(handle);
                }
            }
        }
        p.tidy_half(hi);
        let after = p.part(hi);
        p.bytes = p.bytes + after - before;
        self.counted += reserved;
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
        debug_assert!(p.is_empty());
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
            .map(|p| p.low.len() + p.high.values().map(Half::len).sum::<usize>())
            .sum()
    }

    /// Capacity of pool (0, 0)'s table of entries below 2^32 (tests).
    #[cfg(test)]
    fn low_pages_capacity(&self) -> usize {
        self.guests[&0].pools[&0].low.pages.capacity()
    }

    /// Dense runs held here (tests).
    #[cfg(test)]
    fn leaves(&self) -> usize {
        self.guests
            .values()
            .flat_map(|g| g.pools.values())
            .map(|p| p.low.leaves.len() + p.high.values().map(|h| h.leaves.len()).sum::<usize>())
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
        assert_eq!(self.heap, heap, "shard bytes");
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

fn drain(p: PoolRec, f: &mut impl FnMut(u32)) -> u64 {
    let mut n = p.low.drain(f);
    for (_, half) in p.high {
        n += half.drain(f);
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
        let h = |i: u64| run_hash(k.run(0, 0, i));
        // One run: one hash, so its entries share a home and a probe sequence.
        assert!((640..704).all(|i| h(i) == h(640)));
        assert_ne!(h(640), h(704));
        // Power-of-two strides (a classic way to pile keys up) spread over the
        // run places: a guest can crowd at most one run's entries into a place.
        let buckets: std::collections::HashSet<u64> = (0..1000).map(|i| h(i << 16) & 0xffff).collect();
        assert!(buckets.len() > 900, "{} distinct buckets", buckets.len());
        // The tag is not the shard: runs whose keyed hashes pick one shard
        // still get most of the 128 tags.
        let tags: std::collections::HashSet<u64> = (0..20_000u64)
            .map(|i| k.run(0, 0, i << RUN_BITS))
            .filter(|run| run >> 60 == 0)
            .map(|run| run_hash(run) >> 57)
            .collect();
        assert!(tags.len() > 100, "{} distinct tags in one shard", tags.len());
    }

    #[test]
    fn table_allocation_is_hashbrowns() {
        let mut t: HashTable<(u32, u32)> = HashTable::new();
        let mut l: HashTable<(u32, Box<Leaf>)> = HashTable::new();
        for n in [1, 3, 4, 7, 8, 14, 15, 28, 29, 100, 1000] {
            t.reserve(n, |_| 0);
            l.reserve(n, |_| 0);
            assert_eq!(table_allocation::<(u32, u32)>(n), t.allocation_size(), "{n}");
            assert_eq!(
                table_allocation::<(u32, Box<Leaf>)>(n),
                l.allocation_size(),
                "{n}"
            );
            t = HashTable::new();
            l = HashTable::new();
        }
        // A full table grows to the next size up at least.
        for i in 0..7 {
            t.insert_unique(u64::from(i), (i, i), |e| u64::from(e.0));
        }
        let need = growth_by(&t, 1);
        t.reserve(1, |e| u64::from(e.0));
        assert_eq!(need, malloc_bytes(t.allocation_size()));
        assert_eq!(growth_by(&t, 1), 0);
        assert_eq!(LEAF_BYTES, 272);
    }

    /// Inserts pages `lo` of run `run` (of guest 0, pool 0).
    fn fill(s: &mut IndexShard, k: &Keys, b: &Budget, run: u64, lo: std::ops::Range<u64>) {
        for i in lo {
            let index = run << RUN_BITS | i;
            assert_eq!(s.insert(k, at(k, 0, 0, index), index as u32, b, false), Ok(None));
        }
    }

    fn empty(s: &mut IndexShard, k: &Keys, b: &Budget, run: u64, lo: std::ops::Range<u64>) {
        for i in lo {
            let index = run << RUN_BITS | i;
            assert_eq!(s.remove(k, at(k, 0, 0, index), b), Some(index as u32));
        }
    }

    /// Every page of `runs` that `has` says is there reads back, and no other.
    fn check(
        s: &mut IndexShard,
        k: &Keys,
        b: &Budget,
        runs: std::ops::Range<u64>,
        has: impl Fn(u64) -> bool,
    ) {
        for index in runs.start << RUN_BITS..runs.end << RUN_BITS {
            let want = has(index).then_some(index as u32);
            assert_eq!(s.get(at(k, 0, 0, index)), want, "index {index}");
        }
        assert_eq!(s.recount(), s.heap_bytes());
        assert_eq!(b.used(), s.heap_bytes());
    }

    #[test]
    fn runs_turn_dense_and_back_with_hysteresis() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        let d = u64::from(DENSE);
        // Scattered order within the run: positions 5, 10, 15, ...
        let pos = |n: u64| (n * 5) % 64;
        for n in 0..d - 1 {
            let index = 3 << RUN_BITS | pos(n);
            s.insert(&k, at(&k, 0, 0, index), index as u32, &b, false)
                .unwrap();
        }
        assert_eq!(s.leaves(), 0);
        let index = 3 << RUN_BITS | pos(d - 1);
        s.insert(&k, at(&k, 0, 0, index), index as u32, &b, false)
            .unwrap();
        assert_eq!((s.leaves(), s.entries()), (1, DENSE as usize));
        let held = |i: u64| i >> RUN_BITS == 3 && (0..d).any(|n| pos(n) == i & 63);
        check(&mut s, &k, &b, 0..8, held);
        // A replace in a leaf allocates nothing.
        let heap = s.heap_bytes();
        assert_eq!(
            s.insert(&k, at(&k, 0, 0, index), 7, &b, false),
            Ok(Some(index as u32))
        );
        assert_eq!(
            s.insert(&k, at(&k, 0, 0, index), index as u32, &b, false),
            Ok(Some(7))
        );
        assert_eq!(s.heap_bytes(), heap);
        // Down to DENSE / 2 it stays a leaf; below, entries again.
        for n in 0..=d / 2 {
            let index = 3 << RUN_BITS | pos(n);
            assert_eq!(s.remove(&k, at(&k, 0, 0, index), &b), Some(index as u32));
            assert_eq!(s.leaves(), usize::from(n < d / 2), "after {} removes", n + 1);
        }
        let held = |i: u64| i >> RUN_BITS == 3 && (d / 2 + 1..d).any(|n| pos(n) == i & 63);
        check(&mut s, &k, &b, 0..8, held);
        // Back up: dense again only at DENSE.
        for n in 0..d / 2 {
            let index = 3 << RUN_BITS | pos(n);
            s.insert(&k, at(&k, 0, 0, index), index as u32, &b, false)
                .unwrap();
        }
        assert_eq!(s.leaves(), 0);
        let index = 3 << RUN_BITS | pos(d / 2);
        s.insert(&k, at(&k, 0, 0, index), index as u32, &b, false)
            .unwrap();
        assert_eq!(s.leaves(), 1);
        // Emptied, the run and every table go.
        for n in 0..d {
            let index = 3 << RUN_BITS | pos(n);
            assert_eq!(s.remove(&k, at(&k, 0, 0, index), &b), Some(index as u32));
        }
        check(&mut s, &k, &b, 0..8, |_| false);
        s.counters(0, 0).stored_pages = 0;
        s.tidy(0, 0, &b);
        assert_eq!((s.heap_bytes(), b.used()), (0, 0));
    }

    #[test]
    fn no_room_for_a_leaf_leaves_the_index_as_it_was() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        fill(&mut s, &k, &b, 1, 0..u64::from(DENSE) - 1);
        b.set_limit(b.used() + LEAF_BYTES - 1);
        let index = 1 << RUN_BITS | 63;
        let before = (s.heap_bytes(), b.used(), s.entries());
        assert_eq!(s.insert(&k, at(&k, 0, 0, index), 1, &b, false), Err(NoRoom));
        assert_eq!((s.heap_bytes(), b.used(), s.entries()), before);
        assert_eq!(s.leaves(), 0);
        check(&mut s, &k, &b, 0..4, |i| {
            i >> RUN_BITS == 1 && i & 63 < u64::from(DENSE) - 1
        });
        // A reserved guest's insert takes it past the limit.
        assert_eq!(
            s.insert(&k, at(&k, 0, 0, index), index as u32, &b, true),
            Ok(None)
        );
        assert_eq!(s.leaves(), 1);
        b.set_limit(1 << 30);
        check(&mut s, &k, &b, 0..4, |i| {
            i >> RUN_BITS == 1 && (i & 63 < u64::from(DENSE) - 1 || i & 63 == 63)
        });
    }

    #[test]
    fn no_room_for_entries_keeps_the_leaf_until_there_is() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        let d = u64::from(DENSE);
        fill(&mut s, &k, &b, 1, 0..d);
        // The run's entries went to the leaf and their table was freed, so
        // going back needs a new table.
        assert_eq!((s.leaves(), s.low_pages_capacity()), (1, 0));
        empty(&mut s, &k, &b, 1, 0..d / 2);
        b.set_limit(b.used());
        let (heap, used) = (s.heap_bytes(), b.used());
        empty(&mut s, &k, &b, 1, d / 2..d / 2 + 1);
        assert_eq!(s.leaves(), 1, "no room: the leaf stays");
        assert_eq!((s.heap_bytes(), b.used()), (heap, used));
        check(&mut s, &k, &b, 0..4, |i| {
            i >> RUN_BITS == 1 && (d / 2 + 1..d).contains(&(i & 63))
        });
        b.set_limit(1 << 30);
        empty(&mut s, &k, &b, 1, d / 2 + 1..d / 2 + 2);
        assert_eq!(s.leaves(), 0, "room: entries again");
        check(&mut s, &k, &b, 0..4, |i| {
            i >> RUN_BITS == 1 && (d / 2 + 2..d).contains(&(i & 63))
        });
        assert!(s.heap_bytes() < heap);
    }

    /// Bytes per page of the index of one guest, beside the pool record.
    fn per_page(s: &IndexShard, pages: usize) -> f64 {
        s.heap_bytes() as f64 / pages as f64
    }

    #[test]
    fn clustered_pages_cost_under_six_bytes() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        for n in [5000, 20_000, 70_000] {
            let start = s.entries() as u64;
            for i in start..n {
                s.insert(&k, at(&k, 0, 0, i), i as u32, &b, false).unwrap();
            }
            let cost = per_page(&s, n as usize);
            assert!(cost <= 5.5, "{cost} bytes per page at {n} pages");
        }
        assert_eq!(s.recount(), s.heap_bytes());
    }

    #[test]
    fn hostile_patterns_stay_within_their_bound() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let d = u64::from(DENSE);
        // One page per run: entries only, as before leaves (8 + 1 bytes at
        // 7/16 load at worst, and the pool record).
        let mut s = IndexShard::new(&k);
        for n in 0..20_000u64 {
            s.insert(&k, at(&k, 0, 0, n << RUN_BITS | (n % 64)), 1, &b, false)
                .unwrap();
            if n >= 1000 {
                let cost = per_page(&s, n as usize + 1);
                assert!(cost <= 21.5, "{cost} bytes per page at {n} runs");
            }
        }
        assert_eq!(s.leaves(), 0);
        // DENSE - 1 pages per run: still entries.
        let (b, mut s) = (Budget::new(1 << 30), IndexShard::new(&k));
        for run in 0..1000 {
            fill(&mut s, &k, &b, run, 0..d - 1);
        }
        assert_eq!(s.leaves(), 0);
        assert!(per_page(&s, s.entries()) <= 21.5);
        // Leaves held at DENSE / 2 pages, the fewest a leaf keeps: at most
        // (272 + a 16-byte entry at 7/16 load) / 8.
        let (b, mut s) = (Budget::new(1 << 30), IndexShard::new(&k));
        for run in 0..1000 {
            fill(&mut s, &k, &b, run, 0..d);
            empty(&mut s, &k, &b, run, 0..d / 2);
        }
        assert_eq!(s.leaves(), 1000);
        let cost = per_page(&s, s.entries());
        assert!(cost <= 39.0, "{cost} bytes per page in half-empty leaves");
        // Alternating around either threshold converts once, not every time.
        // The leaves hold positions DENSE / 2 .. DENSE; position 0 toggles.
        for round in 0..10 {
            for run in 0..1000 {
                if round % 2 == 0 {
                    empty(&mut s, &k, &b, run, d / 2..d / 2 + 1);
                } else {
                    fill(&mut s, &k, &b, run, d / 2..d / 2 + 1);
                }
            }
            assert_eq!(s.leaves(), 0, "round {round}");
            assert!(per_page(&s, s.entries()) <= 21.5);
            assert_eq!(b.used(), s.heap_bytes());
        }
        for run in 0..1000 {
            fill(&mut s, &k, &b, run, 0..d / 2 - 1);
        }
        assert_eq!(s.entries(), 1000 * (d as usize - 1));
        for round in 0..10 {
            for run in 0..1000 {
                if round % 2 == 0 {
                    fill(&mut s, &k, &b, run, d / 2 - 1..d / 2);
                } else {
                    empty(&mut s, &k, &b, run, d / 2 - 1..d / 2);
                }
            }
            assert_eq!(s.leaves(), 1000, "round {round}");
            assert!(per_page(&s, s.entries()) <= 21.5);
            assert_eq!(b.used(), s.heap_bytes());
        }
        assert_eq!(s.recount(), s.heap_bytes());
    }

    #[test]
    fn drops_take_leaves_and_entries() {
        let k = Keys::new();
        let b = Budget::new(1 << 30);
        let mut s = IndexShard::new(&k);
        let d = u64::from(DENSE);
        // Pool 0 of guest 0: dense and sparse runs, low and high halves.
        fill(&mut s, &k, &b, 0, 0..64);
        fill(&mut s, &k, &b, 1, 0..d - 1);
        for i in 0..64 {
            let index = 1 << 40 | i;
            s.insert(&k, at(&k, 0, 0, index), i as u32, &b, false).unwrap();
        }
        // Another guest's pages, dense too.
        for i in 0..200 {
            s.insert(&k, at(&k, 1, 0, i), 7, &b, false).unwrap();
        }
        s.counters(0, 0).stored_pages = 64 + d - 1 + 64;
        assert_eq!(s.leaves(), 2 + 3);
        let other = s.guest_bytes(1);
        let mut taken = 0;
        assert_eq!(s.take_pool(0, 0, &b, |h| taken += u64::from(h)), 64 + d - 1 + 64);
        assert_eq!(
            taken,
            (0..64).sum::<u64>() + (64..64 + d - 1).sum::<u64>() + (0..64).sum::<u64>()
        );
        assert_eq!((s.heap_bytes(), s.guest_bytes(1)), (other, other));
        assert_eq!(b.used(), s.heap_bytes());
        assert_eq!(s.take_guest(1, &b, |h| assert_eq!(h, 7)), 200);
        assert_eq!((s.heap_bytes(), b.used(), s.leaves()), (0, 0, 0));
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
