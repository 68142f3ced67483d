//! The dedup table of one object shard: object ids by record key.
//!
//! A slot is 4 bytes: the object's id and its distance from its home slot.
//! The key is not kept here: candidates are compared through their records
//! (which hold it), and the records are read again when a part grows.
//! hashbrown's table cost a 4-byte slot and a control byte at a load of 7/16
//! to 7/8 (7.9 bytes per entry on average); this one costs 4 bytes at a load
//! of 3/4 to 9/10 (about 4.9).
//!
//! - **Robin Hood placement** (linear probing, an entry passes those nearer
//!   their home): entries with one home sit side by side, so a lookup reads
//!   only those records (about one per lookup) and stops at the first entry
//!   whose home is after its own; deletion shifts the run back by one.
//! - **Bounded probing**: no entry sits more than [`MAX_PROBE`] slots from its
//!   home. An insert that would place one further grows the part instead,
//!   whatever its load. Keys are keyed hashes, so a guest cannot aim pages
//!   at one home.
//! - **Parts that grow alone** by a fifth: [`PARTS`] tables chosen by the top
//!   bits of the key's hash, each sized freely (the home slot is a
//!   multiply-shift of other hash bits). So the load stays high, and one
//!   growth rereads a part's records, not the shard's. A small table is one
//!   part (64 near-empty parts would cost a small store more than it
//!   holds); at [`SPLIT_AT`] entries it splits into [`PARTS`], once.
//! - Every allocation is counted at its malloc size. A part that empties is
//!   freed, one that falls to a quarter shrinks, and an empty table holds
//!   nothing.

use super::{index::malloc_bytes, slab::key_hash};

const PART_BITS: u32 = 6;
/// Parts of a table past [`SPLIT_AT`] entries.
pub const PARTS: usize = 1 << PART_BITS;
/// Entries at which a one-part table splits into [`PARTS`].
pub const SPLIT_AT: usize = 4096;
/// Bits of a slot that hold the object id; the rest hold its distance from home.
const ID_BITS: u32 = 26;
/// Object ids must stay below this to fit a slot.
pub const MAX_IDS: u32 = 1 << ID_BITS;
const ID_MASK: u32 = MAX_IDS - 1;
/// Farthest an entry sits from its home slot (all ones is [`EMPTY`]).
pub const MAX_PROBE: u32 = (1 << (32 - ID_BITS)) - 2;
const EMPTY: u32 = u32::MAX;
/// Slots a part starts with, and the step sizes are rounded to.
const STEP: usize = 8;

fn slot(id: u32, dist: u32) -> u32 {
    debug_assert!(id < MAX_IDS && dist <= MAX_PROBE);
    dist << ID_BITS | id
}

fn id_of(s: u32) -> u32 {
    s & ID_MASK
}

fn dist_of(s: u32) -> u32 {
    s >> ID_BITS
}

/// The part a key's entries live in, of `parts` (1 or [`PARTS`]).
fn part_of(key: u32, parts: usize) -> usize {
    (key_hash(key) >> (64 - PART_BITS)) as usize & parts.wrapping_sub(1)
}

/// The home slot of a key in a part of `cap` slots (bits below the part's).
fn home(key: u32, cap: usize) -> usize {
    let h = (key_hash(key) >> (32 - PART_BITS)) as u32;
    ((u64::from(h) * cap as u64) >> 32) as usize
}

/// Whether `len` entries in `cap` slots is past the load a part grows at (9/10).
fn too_full(len: usize, cap: usize) -> bool {
    len * 10 > cap * 9
}

/// Slots for `len` entries at a load of 4/5 (what a shrink leaves).
fn cap_for(len: usize) -> usize {
    (len * 5 / 4).div_ceil(STEP).max(1) * STEP
}

/// The size a part of `cap` slots grows to.
fn grown(cap: usize) -> usize {
    if cap == 0 {
        STEP
    } else {
        (cap + cap / 5).div_ceil(STEP) * STEP
    }
}

fn slots_bytes(cap: usize) -> u64 {
    malloc_bytes(cap * 4)
}

#[derive(Default)]
struct Part {
    slots: Box<[u32]>,
    len: u32,
}

impl Part {
    fn cap(&self) -> usize {
        self.slots.len()
    }

    /// Whether `key` fits without growing: room under the load, and a free
    /// slot that Robin Hood placement reaches without moving any entry
    /// further than [`MAX_PROBE`] from its home.
    fn fits(&self, key: u32) -> bool {
        let cap = self.cap();
        if cap == 0 || too_full(self.len as usize + 1, cap) {
            return false;
        }
        let (mut at, mut carried) = (home(key, cap), 0);
        loop {
            let s = self.slots[at];
            if s == EMPTY {
                return true;
            }
            // The entry placed here from now on is the one nearer home.
            carried = carried.min(dist_of(s));
            carried += 1;
            if carried > MAX_PROBE {
                return false;
            }
            at = if at + 1 == cap { 0 } else { at + 1 };
        }
    }

    /// Places `id` (home `at`) by Robin Hood. False if some entry would
    /// end up past [`MAX_PROBE`]: the part is then left as it was only if
    /// the caller checked [`Part::fits`]; a rehash checks the result.
    fn place(&mut self, mut at: usize, id: u32) -> bool {
        let cap = self.cap();
        let mut cur = slot(id, 0);
        loop {
            let s = self.slots[at];
            if s == EMPTY {
                self.slots[at] = cur;
                self.len += 1;
                return true;
            }
            if dist_of(s) < dist_of(cur) {
                self.slots[at] = cur;
                cur = s;
            }
            if dist_of(cur) == MAX_PROBE {
                return false;
            }
            cur += 1 << ID_BITS;
            at = if at + 1 == cap { 0 } else { at + 1 };
        }
    }

    /// A part of `cap` slots holding this one's entries, or `None` if one
    /// of them would sit past [`MAX_PROBE`] there.
    fn rehashed(&self, cap: usize, key_of: &impl Fn(u32) -> u32) -> Option<Part> {
        let mut new = Part {
            slots: vec![EMPTY; cap].into_boxed_slice(),
            len: 0,
        };
        for &s in self.slots.iter().filter(|&&s| s != EMPTY) {
            let id = id_of(s);
            if !new.place(home(key_of(id), cap), id) {
                return None;
            }
        }
        Some(new)
    }

    /// Resizes to at least `cap` slots, going larger in steps if an entry
    /// would sit too far from home (never seen at these loads: the step
    /// after is still counted, when the shard settles its bytes).
    fn resize(&mut self, mut cap: usize, key_of: &impl Fn(u32) -> u32) {
        loop {
            if let Some(new) = self.rehashed(cap, key_of) {
                *self = new;
                return;
            }
            cap = grown(cap);
        }
    }
}

/// Object ids by record key; see the module documentation.
#[derive(Default)]
pub struct DedupTable {
    /// Empty until the first insert, then one part, then [`PARTS`].
    parts: Vec<Part>,
    len: usize,
    /// Host bytes held (at malloc size), kept as parts change.
    bytes: u64,
}

impl DedupTable {
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn heap_bytes(&self) -> u64 {
        self.bytes
    }

    fn parts_bytes(parts: usize) -> u64 {
        malloc_bytes(parts * std::mem::size_of::<Part>())
    }

    /// Whether the next insert splits the one part into [`PARTS`].
    fn splits(&self) -> bool {
        self.parts.len() == 1 && self.len + 1 > SPLIT_AT
    }

    /// Host bytes an insert of `key` adds: a part's growth (the old slots
    /// are freed after the rehash); on the first insert the part; at the
    /// split, a bound on the parts' slots (each part holds its entries at
    /// 4/5 load rounded up to [`STEP`], in an allocation at most 32 bytes
    /// over) less what the one part held.
    pub fn growth(&self, key: u32) -> u64 {
        if self.parts.is_empty() {
            return Self::parts_bytes(1) + slots_bytes(STEP);
        }
        if self.splits() {
            let slots = (self.len + 1) * 5 / 4 + PARTS * STEP;
            let bound = Self::parts_bytes(PARTS) + (slots * 4 + PARTS * 32) as u64;
            return bound.saturating_sub(self.bytes);
        }
        let part = &self.parts[part_of(key, self.parts.len())];
        if part.fits(key) {
            0
        } else {
            slots_bytes(grown(part.cap())) - slots_bytes(part.cap())
        }
    }

    /// Splits the one part into [`PARTS`], each at 4/5 load.
    fn split(&mut self, key_of: &impl Fn(u32) -> u32) {
        let old = std::mem::take(&mut self.parts);
        let mut counts = [0usize; PARTS];
        let ids = || old[0].slots.iter().filter(|&&s| s != EMPTY).map(|&s| id_of(s));
        for id in ids() {
            counts[part_of(key_of(id), PARTS)] += 1;
        }
        self.parts = counts
            .iter()
            .map(|&n| Part {
                slots: vec![EMPTY; if n == 0 { 0 } else { cap_for(n) }].into_boxed_slice(),
                len: 0,
            })
            .collect();
        for id in ids() {
            let key = key_of(id);
            let part = &mut self.parts[part_of(key, PARTS)];
            while !part.fits(key) {
                part.resize(grown(part.cap()), key_of);
            }
            part.place(home(key, part.cap()), id);
        }
        self.bytes = Self::parts_bytes(PARTS) + self.parts.iter().map(|p| slots_bytes(p.cap())).sum::<u64>();
    }

    /// Adds `id` under `key`, growing its part if needed. `key_of` gives the
    /// key of any id in the table (from its record), for a rehash.
    pub fn insert(&mut self, key: u32, id: u32, key_of: impl Fn(u32) -> u32) {
        if self.parts.is_empty() {
            self.parts = vec![Part::default()];
            self.bytes += Self::parts_bytes(1);
        }
        if self.splits() {
            self.split(&key_of);
        }
        let parts = self.parts.len();
        let part = &mut self.parts[part_of(key, parts)];
        let before = slots_bytes(part.cap());
        // One step, as growth() said; more only where entries crowd one
        // home, which keyed hashes make as rare as a guessed key (then the
        // shard counts the bytes when it settles).
        while !part.fits(key) {
            part.resize(grown(part.cap()), &key_of);
        }
        self.bytes = self.bytes + slots_bytes(part.cap()) - before;
        let placed = part.place(home(key, part.cap()), id);
        debug_assert!(placed, "fits() said the entry has room");
        self.len += 1;
    }

    /// The ids whose key has `key`'s home: every entry with that key, and
    /// now and then another key's (compare the record's key).
    pub fn candidates(&self, key: u32) -> impl Iterator<Item = u32> + '_ {
        let part = self
            .parts
            .get(part_of(key, self.parts.len()))
            .filter(|p| p.len > 0);
        let cap = part.map_or(0, Part::cap);
        let start = part.map_or(0, |_| home(key, cap));
        (0..=MAX_PROBE)
            .map_while(move |dist| {
                let part = part?;
                let at = (start + dist as usize) % cap;
                let s = part.slots[at];
                // Empty, or an entry whose home is after ours: the run is over.
                (s != EMPTY && dist_of(s) >= dist).then_some((s, dist))
            })
            .filter(|&(s, dist)| dist_of(s) == dist)
            .map(|(s, _)| id_of(s))
    }

    /// Takes `id` (whose key is `key`) out. Returns whether it was there.
    /// A part left at a quarter of its slots shrinks (`key_of` as for
    /// [`DedupTable::insert`]); one left empty is freed, and the table
    /// with its last entry.
    pub fn remove(&mut self, key: u32, id: u32, key_of: impl Fn(u32) -> u32) -> bool {
        let parts = self.parts.len();
        let Some(part) = self.parts.get_mut(part_of(key, parts)) else {
            return false;
        };
        let cap = part.cap();
        if part.len == 0 {
            return false;
        }
        let start = home(key, cap);
        let mut found = None;
        for dist in 0..=MAX_PROBE {
            let at = (start + dist as usize) % cap;
            let s = part.slots[at];
            if s == EMPTY || dist_of(s) < dist {
                break;
            }
            if dist_of(s) == dist && id_of(s) == id {
                found = Some(at);
                break;
            }
        }
        let Some(mut at) = found else {
            return false;
        };
        // Backward shift: the entries after it, up to an empty slot or one
        // at home, each move one nearer home.
        loop {
            let next = if at + 1 == cap { 0 } else { at + 1 };
            let s = part.slots[next];
            if s == EMPTY || dist_of(s) == 0 {
                part.slots[at] = EMPTY;
                break;
            }
            part.slots[at] = s - (1 << ID_BITS);
            at = next;
        }
        part.len -= 1;
        self.len -= 1;
        let before = slots_bytes(cap);
        if part.len == 0 {
            *part = Part::default();
        } else if cap > STEP && (part.len as usize) * 4 < cap {
            part.resize(cap_for(part.len as usize), &key_of);
        }
        self.bytes = self.bytes + slots_bytes(part.cap()) - before;
        if self.len == 0 {
            *self = DedupTable::new();
        }
        true
    }

    /// Entries and slots of each part (for tests and measurements).
    #[cfg(test)]
    fn load(&self) -> (usize, usize) {
        self.parts
            .iter()
            .fold((0, 0), |(l, c), p| (l + p.len as usize, c + p.cap()))
    }

    /// Checks every invariant: counts equal a recount, every entry within
    /// [`MAX_PROBE`] of the home its key gives and in Robin Hood order, and
    /// the bytes equal a recount.
    #[cfg(test)]
    pub fn check(&self, key_of: impl Fn(u32) -> u32) {
        let mut total = 0;
        assert!(matches!(self.parts.len(), 0 | 1 | PARTS));
        let mut bytes = if self.parts.is_empty() {
            0
        } else {
            Self::parts_bytes(self.parts.len())
        };
        for p in &self.parts {
            let cap = p.cap();
            bytes += slots_bytes(cap);
            let mut n = 0;
            for (at, &s) in p.slots.iter().enumerate() {
                if s == EMPTY {
                    continue;
                }
                n += 1;
                let key = key_of(id_of(s));
                assert!(std::ptr::eq(p, &self.parts[part_of(key, self.parts.len())]));
                let home = home(key, cap);
                assert_eq!(
                    (at + cap - home) % cap,
                    dist_of(s) as usize,
                    "distance of {}",
                    id_of(s)
                );
                let prev = p.slots[(at + cap - 1) % cap];
                if dist_of(s) > 0 {
                    assert!(
                        prev != EMPTY && dist_of(prev) + 1 >= dist_of(s),
                        "Robin Hood order"
                    );
                }
            }
            assert_eq!(n, p.len as usize);
            total += n;
        }
        assert_eq!(total, self.len);
        assert_eq!(bytes, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Keys as a keyed hash would give them (spread), with ids as a slab
    /// hands them out.
    fn spread(i: u32) -> u32 {
        (u64::from(i).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    #[test]
    fn entries_are_found_removed_and_the_table_empties_to_nothing() {
        let mut t = DedupTable::new();
        let mut keys = HashMap::new();
        for id in 0..20_000u32 {
            let key = spread(id);
            keys.insert(id, key);
            let growth = t.growth(key);
            let before = t.heap_bytes();
            let split = t.splits();
            t.insert(key, id, |i| keys[&i]);
            if split {
                assert!(t.heap_bytes() - before <= growth, "the split stays in its bound");
                t.check(|i| keys[&i]);
            } else {
                assert_eq!(
                    t.heap_bytes() - before,
                    growth,
                    "growth said what the insert took"
                );
            }
        }
        assert_eq!(t.parts.len(), PARTS);
        t.check(|i| keys[&i]);
        let (len, cap) = t.load();
        assert!(len * 4 > cap * 3, "load {len}/{cap} is at least 3/4");
        for id in (0..20_000u32).step_by(7) {
            assert!(t.candidates(keys[&id]).any(|c| c == id));
        }
        assert!(!t.remove(spread(99_999), 99_999, |i| keys[&i]), "not there");
        for id in 0..20_000u32 {
            if id % 3 != 0 {
                assert!(t.remove(keys[&id], id, |i| keys[&i]));
                assert!(!t.candidates(keys[&id]).any(|c| c == id));
            }
        }
        t.check(|i| keys[&i]);
        let (len, cap) = t.load();
        assert!(len * 4 >= cap, "shrunk: {len}/{cap}");
        for id in (0..20_000u32).filter(|i| i % 3 == 0) {
            assert!(t.candidates(keys[&id]).any(|c| c == id));
            assert!(t.remove(keys[&id], id, |i| keys[&i]));
        }
        assert_eq!((t.len(), t.heap_bytes(), t.parts.len()), (0, 0, 0));
    }

    #[test]
    fn equal_keys_sit_together_and_each_is_found() {
        let mut t = DedupTable::new();
        let key_of = |i: u32| if i < 6 { 77 } else { spread(i) };
        for id in 0..3000 {
            t.insert(key_of(id), id, key_of);
        }
        t.check(key_of);
        let mut same: Vec<u32> = t.candidates(77).filter(|&i| key_of(i) == 77).collect();
        same.sort_unstable();
        assert_eq!(same, [0, 1, 2, 3, 4, 5]);
        // Other keys' entries come up only if they share the home slot.
        assert!(t.candidates(77).count() < 12);
        assert!(t.remove(77, 3, key_of));
        assert_eq!(t.candidates(77).filter(|&i| key_of(i) == 77).count(), 5);
        t.check(key_of);
    }

    #[test]
    fn a_part_grows_before_any_entry_would_sit_past_the_probe_bound() {
        // Keys that all share one part and crowd its first slots, as no
        // keyed hash would give them: the part grows instead.
        let mut t = DedupTable::new();
        let keys: Vec<u32> = (0..u32::MAX)
            .step_by(97)
            .filter(|&k| home(k, 1 << 16) < 64)
            .take(100)
            .collect();
        assert_eq!(keys.len(), 100);
        let key_of = |i: u32| keys[i as usize];
        for id in 0..100 {
            t.insert(key_of(id), id, key_of);
            t.check(key_of);
        }
        let (len, cap) = t.load();
        assert_eq!(len, 100);
        assert!(cap > 1000, "grew far past the load, for the bound: {cap}");
        for id in 0..100 {
            assert!(t.candidates(key_of(id)).any(|c| c == id));
        }
    }
}
