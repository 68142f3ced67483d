//! Owner records of one object shard: which (guest, pool) created each object
//! here, and that pool's object counters.
//!
//! An object record names its owner by a 16-bit id local to the shard, so
//! the table is only ever touched under the shard's lock. An owner record
//! lives while objects it created live in the shard: the last one to go
//! retires it, moving its cumulative counters to its guest's "other pools"
//! and freeing its id. A guest churning through pools therefore leaves
//! nothing behind.
//!
//! All 65,535 ids in use (a guest holding objects in that many pools of one
//! shard) is not an error: further objects are owned by [`OVERFLOW`], and a
//! side table keeps each one's guest, so what every guest holds stays exact.
//! The side table is counted like the rest.
//!
//! Counted in the budget: the id map, the records, the free-id stack and the
//! side table. Not counted: one "other pools" record per guest (device),
//! which outlives the pages (fixed overhead).

use std::collections::hash_map::RandomState;

use hashbrown::HashMap;

use super::Counters;

/// The owner id of objects created when every id was in use.
pub const OVERFLOW: u16 = u16::MAX;

/// Bytes of metadata charged to a pool for each owner record it has: the
/// record and the id map's entry (each with a control byte, at full load).
pub const OWNER_META: u64 =
    (std::mem::size_of::<Owner>() + std::mem::size_of::<((u32, u32), u16)>() + 1) as u64;
/// Bytes charged for an object owned by [`OVERFLOW`]: its side-table entry.
const OVERFLOW_META: u64 = (std::mem::size_of::<(u32, u32)>() + 1) as u64;

/// The counters an object shard keeps per owner (zram's names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjCounters {
    pub unique_pages: u64,
    pub compr_data_bytes: u64,
    pub mem_used_bytes: u64,
    pub metadata_bytes: u64,
    pub spilled_pages: u64,
    pub spill_file_bytes: u64,
    pub spill_reads: u64,
    pub spill_writes: u64,
    pub writebacks: u64,
}

impl ObjCounters {
    /// Moves the cumulative counters into `other` (the gauges are zero when
    /// an owner retires: its objects are gone).
    fn retire_into(&self, other: &mut ObjCounters) {
        other.spill_reads += self.spill_reads;
        other.spill_writes += self.spill_writes;
        other.writebacks += self.writebacks;
    }

    pub fn add_to(&self, c: &mut Counters) {
        c.unique_pages += self.unique_pages;
        c.compr_data_bytes += self.compr_data_bytes;
        c.mem_used_bytes += self.mem_used_bytes;
        c.metadata_bytes += self.metadata_bytes;
        c.spilled_pages += self.spilled_pages;
        c.spill_file_bytes += self.spill_file_bytes;
        c.spill_reads += self.spill_reads;
        c.spill_writes += self.spill_writes;
        c.writebacks += self.writebacks;
    }
}

#[derive(Clone, Debug, Default)]
struct Owner {
    guest: u32,
    pool: u32,
    /// Live objects it owns here; 0 marks a free slot.
    objects: u32,
    c: ObjCounters,
}

#[derive(Default)]
struct GuestObjs {
    /// Retired owners' cumulative counters, and objects owned by OVERFLOW.
    other: ObjCounters,
    /// Metadata bytes of all this guest's owners and objects here.
    meta: u64,
}

pub struct Owners {
    ids: HashMap<(u32, u32), u16, RandomState>,
    /// By id. Kept at its high-water mark until no owner is left (as the
    /// slab keeps its blocks), so a release never allocates.
    recs: Vec<Owner>,
    /// Freed ids, with room for every record: a release never allocates.
    free: Vec<u16>,
    /// Objects owned by OVERFLOW -> their guest.
    overflow: HashMap<u32, u32>,
    guests: HashMap<u32, GuestObjs>,
    /// Ids available (OVERFLOW excluded); lowered by tests.
    max_ids: usize,
}

impl Owners {
    pub fn new(hasher: RandomState) -> Self {
        Owners {
            ids: HashMap::with_hasher(hasher),
            recs: Vec::new(),
            free: Vec::new(),
            overflow: HashMap::new(),
            guests: HashMap::new(),
            max_ids: usize::from(OVERFLOW),
        }
    }

    #[cfg(test)]
    pub fn set_max_ids(&mut self, n: usize) {
        self.max_ids = n.min(usize::from(OVERFLOW));
    }

    /// Host bytes of the tables (guest records excluded).
    pub fn heap_bytes(&self) -> u64 {
        (self.ids.allocation_size()
            + self.recs.capacity() * std::mem::size_of::<Owner>()
            + self.free.capacity() * 2
            + self.overflow.allocation_size()) as u64
    }

    /// Bytes the next [`Owners::acquire`] for (guest, pool) may allocate.
    pub fn growth(&self, guest: u32, pool: u32) -> u64 {
        if self.ids.contains_key(&(guest, pool)) {
            return 0;
        }
        if self.ids.len() >= self.max_ids {
            return map_growth(&self.overflow);
        }
        let recs = if self.free.is_empty() && self.recs.len() == self.recs.capacity() {
            self.recs.capacity().max(4) * 2 * (std::mem::size_of::<Owner>() + 2)
        } else {
            0
        };
        map_growth(&self.ids) + recs as u64
    }

    /// The owner id for a new object `obj` of (guest, pool).
    pub fn acquire(&mut self, guest: u32, pool: u32, obj: u32) -> u16 {
        if let Some(&id) = self.ids.get(&(guest, pool)) {
            self.recs[usize::from(id)].objects += 1;
            return id;
        }
        if self.ids.len() >= self.max_ids {
            self.overflow.insert(obj, guest);
            let g = self.guests.entry(guest).or_default();
            g.other.metadata_bytes += OVERFLOW_META;
            g.meta += OVERFLOW_META;
            return OVERFLOW;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.recs.push(Owner::default());
                let room = self.recs.capacity() - self.free.len();
                self.free.reserve_exact(room);
                (self.recs.len() - 1) as u16
            }
        };
        self.ids.insert((guest, pool), id);
        self.recs[usize::from(id)] = Owner {
            guest,
            pool,
            objects: 1,
            c: ObjCounters {
                metadata_bytes: OWNER_META,
                ..ObjCounters::default()
            },
        };
        self.guests.entry(guest).or_default().meta += OWNER_META;
        id
    }

    /// The counters object `obj` (owned by `owner`) counts in.
    pub fn counters(&mut self, owner: u16, obj: u32) -> &mut ObjCounters {
        if owner == OVERFLOW {
            let guest = self.overflow.get(&obj).copied().unwrap_or(u32::MAX);
            return &mut self.guests.entry(guest).or_default().other;
        }
        &mut self.recs[usize::from(owner)].c
    }

    /// The guest that created object `obj`.
    pub fn guest_of(&self, owner: u16, obj: u32) -> Option<u32> {
        if owner == OVERFLOW {
            self.overflow.get(&obj).copied()
        } else {
            self.recs.get(usize::from(owner)).map(|o| o.guest)
        }
    }

    /// Charges (or with `add` false, gives back) `bytes` of metadata to the
    /// owner of `obj` and to its guest.
    pub fn charge(&mut self, owner: u16, obj: u32, bytes: u64, add: bool) {
        let guest = self.guest_of(owner, obj).unwrap_or(u32::MAX);
        let c = self.counters(owner, obj);
        if add {
            c.metadata_bytes += bytes;
        } else {
            c.metadata_bytes -= bytes;
        }
        let g = &mut self.guests.entry(guest).or_default().meta;
        if add {
            *g += bytes;
        } else {
            *g -= bytes;
        }
    }

    /// Object `obj` of `owner` is gone (its counters already back to what it
    /// added); the owner's last object retires the record.
    pub fn release(&mut self, owner: u16, obj: u32) {
        if owner == OVERFLOW {
            if let Some(guest) = self.overflow.remove(&obj) {
                let g = self.guests.entry(guest).or_default();
                g.other.metadata_bytes -= OVERFLOW_META;
                g.meta -= OVERFLOW_META;
            }
            shrink_map(&mut self.overflow);
            return;
        }
        let i = usize::from(owner);
        self.recs[i].objects -= 1;
        if self.recs[i].objects > 0 {
            return;
        }
        let rec = std::mem::take(&mut self.recs[i]);
        let g = self.guests.entry(rec.guest).or_default();
        rec.c.retire_into(&mut g.other);
        g.meta -= OWNER_META;
        debug_assert_eq!(rec.c.metadata_bytes, OWNER_META, "objects gone, metadata left");
        self.ids.remove(&(rec.guest, rec.pool));
        shrink_map(&mut self.ids);
        if self.ids.is_empty() {
            self.recs = Vec::new();
            self.free = Vec::new();
        } else {
            self.free.push(owner);
        }
    }

    /// Metadata bytes held here for `guest`.
    pub fn guest_meta(&self, guest: u32) -> u64 {
        self.guests.get(&guest).map_or(0, |g| g.meta)
    }

    /// Calls `f` with every owner's counters, and each guest's other pools'
    /// under `other_pool`.
    pub fn add_stats(&self, other_pool: u32, mut f: impl FnMut(u32, u32, &ObjCounters)) {
        for o in self.recs.iter().filter(|o| o.objects > 0) {
            f(o.guest, o.pool, &o.c);
        }
        for (&guest, g) in &self.guests {
            f(guest, other_pool, &g.other);
        }
    }

    /// Calls `f` with up to `n` (guest, pool) pairs of each guest that own
    /// objects here.
    pub fn pools(&self, n: usize, mut f: impl FnMut(u32, u32)) {
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for o in self.recs.iter().filter(|o| o.objects > 0) {
            let k = seen.entry(o.guest).or_default();
            if *k < n {
                *k += 1;
                f(o.guest, o.pool);
            }
        }
    }

    /// Live owner records (tests).
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.ids.len()
    }
}

fn map_growth<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(m: &HashMap<K, V, S>) -> u64 {
    if m.len() < m.capacity() {
        0
    } else {
        (m.allocation_size().max(4 * std::mem::size_of::<(K, V)>() + 32) * 2) as u64
    }
}

fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.is_empty() {
        m.shrink_to_fit();
    } else if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_and_records_retire_with_their_last_object() {
        let mut o = Owners::new(RandomState::new());
        assert_eq!(o.acquire(7, 1, 100), 0);
        assert_eq!(o.acquire(7, 2, 101), 1);
        assert_eq!(o.acquire(7, 1, 102), 0);
        assert_eq!(o.guest_of(1, 101), Some(7));
        o.counters(0, 100).spill_reads += 3;
        o.release(0, 100);
        assert_eq!(o.live(), 2, "one object left");
        o.release(0, 102);
        assert_eq!(o.live(), 1);
        // The retired pool's cumulative counters stay with its guest.
        let mut seen = Vec::new();
        o.add_stats(u32::MAX, |g, p, c| seen.push((g, p, c.spill_reads)));
        seen.sort();
        assert_eq!(seen, vec![(7, 2, 0), (7, u32::MAX, 3)]);
        assert_eq!(o.acquire(8, 8, 103), 0, "the freed id is reused");
        assert_eq!(o.guest_meta(7), OWNER_META);
        o.release(1, 101);
        o.release(0, 103);
        assert_eq!((o.heap_bytes(), o.guest_meta(7), o.guest_meta(8)), (0, 0, 0));
    }

    #[test]
    fn a_full_table_keeps_every_guest_exact() {
        let mut o = Owners::new(RandomState::new());
        o.set_max_ids(2);
        assert_eq!(o.acquire(1, 1, 10), 0);
        assert_eq!(o.acquire(1, 2, 11), 1);
        assert_eq!(o.acquire(2, 9, 12), OVERFLOW);
        assert_eq!(o.acquire(1, 3, 13), OVERFLOW);
        assert_eq!(o.guest_of(OVERFLOW, 12), Some(2));
        assert_eq!(o.guest_of(OVERFLOW, 13), Some(1));
        o.counters(OVERFLOW, 12).unique_pages += 1;
        let mut seen = Vec::new();
        o.add_stats(u32::MAX, |g, p, c| seen.push((g, p, c.unique_pages)));
        seen.sort();
        assert_eq!(
            seen,
            vec![(1, 1, 0), (1, 2, 0), (1, u32::MAX, 0), (2, u32::MAX, 1)]
        );
        o.counters(OVERFLOW, 12).unique_pages -= 1;
        for (owner, obj) in [(0, 10), (1, 11), (OVERFLOW, 12), (OVERFLOW, 13)] {
            o.release(owner, obj);
        }
        assert_eq!((o.heap_bytes(), o.guest_meta(1), o.guest_meta(2)), (0, 0, 0));
    }
}
