//! Object records of one object shard, and the CLOCK hand that walks them.
//!
//! Records live in fixed blocks of [`BLOCK`] entries so that growth never
//! copies the table and the unused tail is at most one block. Free records
//! form a list threaded through their `loc` field.

use super::PAGE_SIZE;

pub const BLOCK: usize = 64;
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tier {
    #[default]
    Free,
    /// Payload in a RAM chunk; `loc` is a packed [`super::alloc::Loc`].
    Ram,
    /// Payload in the spill file; `loc` is the file offset in spill units.
    Spilled,
    /// Same-filled page: `hash[0]` is the word, no payload.
    Fill,
}

/// One stored content (32 bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Obj {
    /// 128-bit content hash, seeded by the dedup domain; for fills, the word and the domain.
    pub hash: [u64; 2],
    /// A 48-bit location, split so the record packs into 32 bytes.
    pub loc_hi: u32,
    pub loc_lo: u16,
    /// Payload length; `PAGE_SIZE` means stored raw.
    pub len: u16,
    pub refs: u32,
    /// The (guest, pool) that created it (see [`super::owners`]): object counters go there.
    pub owner: u16,
    pub tier: Tier,
    /// [`REFERENCED`] (CLOCK's bit) and [`INDEXED`] (in the dedup table).
    pub flags: u8,
}

pub const REFERENCED: u8 = 1;
pub const INDEXED: u8 = 2;

impl Obj {
    pub fn loc(&self) -> u64 {
        (u64::from(self.loc_hi) << 16) | u64::from(self.loc_lo)
    }

    pub fn set_loc(&mut self, loc: u64) {
        debug_assert!(loc < 1 << 48);
        self.loc_hi = (loc >> 16) as u32;
        self.loc_lo = loc as u16;
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn is_raw(&self) -> bool {
        usize::from(self.len) == PAGE_SIZE
    }

    /// Hash used by the dedup table (mixes both halves, so fills spread too).
    pub fn table_hash(&self) -> u64 {
        table_hash(self.hash)
    }
}

pub fn table_hash(hash: [u64; 2]) -> u64 {
    let x = (hash[0] ^ hash[1].rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 31)
}

#[derive(Default)]
pub struct Slab {
    blocks: Vec<Box<[Obj]>>,
    /// Records ever handed out (the high-water mark).
    len: u32,
    free_head: u32,
    live: u32,
    hand: u32,
}

impl Slab {
    pub fn new() -> Self {
        Slab {
            free_head: NONE,
            ..Default::default()
        }
    }

    pub fn heap_bytes(&self) -> u64 {
        (self.blocks.len() * BLOCK * std::mem::size_of::<Obj>()
            + self.blocks.capacity() * std::mem::size_of::<Box<[Obj]>>()) as u64
    }

    pub fn live(&self) -> u32 {
        self.live
    }

    /// Host bytes the next insert adds (a new block when all are in use).
    pub fn growth(&self) -> usize {
        if self.free_head == NONE && self.len as usize == self.blocks.len() * BLOCK {
            let table = if self.blocks.len() == self.blocks.capacity() {
                self.blocks.capacity().max(4) * std::mem::size_of::<Box<[Obj]>>()
            } else {
                0
            };
            BLOCK * std::mem::size_of::<Obj>() + table
        } else {
            0
        }
    }

    /// Whether one more record keeps ids below `max_ids`.
    pub fn has_room(&self, max_ids: u32) -> bool {
        self.free_head != NONE || self.len < max_ids
    }

    pub fn insert(&mut self, obj: Obj) -> u32 {
        let id = if self.free_head != NONE {
            let id = self.free_head;
            self.free_head = self.get(id).loc() as u32;
            id
        } else {
            if self.len as usize == self.blocks.len() * BLOCK {
                self.blocks.push(vec![Obj::default(); BLOCK].into_boxed_slice());
            }
            self.len += 1;
            self.len - 1
        };
        *self.get_mut(id) = obj;
        self.live += 1;
        id
    }

    pub fn remove(&mut self, id: u32) {
        let free_head = self.free_head;
        let obj = self.get_mut(id);
        *obj = Obj::default();
        obj.set_loc(u64::from(free_head));
        self.free_head = id;
        self.live -= 1;
    }

    pub fn get(&self, id: u32) -> &Obj {
        &self.blocks[id as usize / BLOCK][id as usize % BLOCK]
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Obj {
        &mut self.blocks[id as usize / BLOCK][id as usize % BLOCK]
    }

    /// CLOCK: the next RAM object accepted by `want` whose referenced bit is
    /// clear, clearing the bits it passes. Looks at `budget` records at most.
    pub fn next_victim(&mut self, mut budget: usize, want: impl Fn(&Obj) -> bool) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        while budget > 0 {
            budget -= 1;
            let id = self.hand;
            self.hand = if self.hand + 1 >= self.len {
                0
            } else {
                self.hand + 1
            };
            let obj = self.get_mut(id);
            if obj.tier != Tier::Ram || !want(obj) {
                continue;
            }
            if obj.has(REFERENCED) {
                obj.set(REFERENCED, false);
            } else {
                return Some(id);
            }
        }
        None
    }

    /// Records handed out so far (for full scans).
    pub fn high_water(&self) -> u32 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(len: u16) -> Obj {
        Obj {
            tier: Tier::Ram,
            refs: 1,
            len,
            ..Obj::default()
        }
    }

    #[test]
    fn record_is_thirty_two_bytes_and_holds_48_bit_locations() {
        assert_eq!(std::mem::size_of::<Obj>(), 32);
        let mut o = Obj::default();
        for loc in [0, 1, 0xffff, 0x1_0000, (1 << 48) - 1] {
            o.set_loc(loc);
            assert_eq!(o.loc(), loc);
        }
    }

    #[test]
    fn ids_are_reused_and_blocks_added_on_demand() {
        let mut s = Slab::new();
        assert!(s.growth() > 0);
        let ids: Vec<u32> = (0..BLOCK as u32 + 5).map(|i| s.insert(ram(i as u16))).collect();
        assert_eq!(s.blocks.len(), 2);
        assert_eq!(s.get(ids[7]).len, 7);
        s.remove(ids[3]);
        s.remove(ids[9]);
        assert_eq!(s.live(), BLOCK as u32 + 3);
        assert_eq!(s.growth(), 0);
        assert_eq!(s.insert(ram(1)), ids[9]);
        assert_eq!(s.insert(ram(1)), ids[3]);
        assert_eq!(s.get(ids[3]).tier, Tier::Ram);
    }

    #[test]
    fn clock_spares_referenced_objects_once() {
        let mut s = Slab::new();
        for i in 0..4 {
            s.insert(ram(i));
        }
        s.get_mut(0).set(REFERENCED, true);
        s.get_mut(1).tier = Tier::Fill;
        assert_eq!(s.next_victim(100, |_| true), Some(2));
        assert_eq!(s.next_victim(100, |_| true), Some(3));
        // 0 lost its bit on the first pass, so it goes now.
        assert_eq!(s.next_victim(100, |_| true), Some(0));
        assert!(!s.get(0).has(REFERENCED));
        assert_eq!(s.next_victim(100, |o| o.len == 3), Some(3));
        assert_eq!(s.next_victim(100, |o| o.len == 99), None);
    }
}
