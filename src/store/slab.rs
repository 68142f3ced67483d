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
    /// Same-filled page: no payload; the shard keeps the word and domain aside.
    Fill,
}

impl Tier {
    fn from_bits(b: u32) -> Tier {
        match b & 3 {
            0 => Tier::Free,
            1 => Tier::Ram,
            2 => Tier::Spilled,
            _ => Tier::Fill,
        }
    }
}

/// Locations are 40 bits: 2^24 RAM chunks of a shard, or 128 TiB of spill file.
pub const LOC_BITS: u32 = 40;
/// Bits of a fill record's key (see [`Obj::fill`]).
pub const FILL_KEY_BITS: u32 = 21;
pub const FILL_KEY_MASK: u32 = (1 << FILL_KEY_BITS) - 1;
/// References one record can carry; an equal page past this gets a new copy
/// (about a gigabyte of one page: a fill, in practice, costing one more record).
pub const MAX_REFS: u32 = (1 << 18) - 1;

const LEN_SHIFT: u32 = 8;
const LEN_MASK: u32 = (1 << 13) - 1;
const TIER_SHIFT: u32 = 21;
const FLAG_SHIFT: u32 = 23;
const CODEC_SHIFT: u32 = 26;
const SLOT_SHIFT: u32 = 28;
const REFS_HI_SHIFT: u32 = 30;

/// How a compressed payload is encoded (a raw payload, `PAGE_SIZE` long,
/// ignores it). Two bits of the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Codec {
    /// zstd without a dictionary (puts under `zstd:L`, or a recompression
    /// before the domain has a dictionary).
    #[default]
    Zstd,
    /// lz4 block, as a put under `lz4` or `auto` made it.
    Lz4,
    /// zstd with the dictionary in the record's slot of its domain.
    Dict,
    /// lz4 block that the recompressor tried and could not shrink: it is
    /// not tried again.
    Lz4Kept,
}

impl Codec {
    fn from_bits(b: u32) -> Codec {
        match b & 3 {
            0 => Codec::Zstd,
            1 => Codec::Lz4,
            2 => Codec::Dict,
            _ => Codec::Lz4Kept,
        }
    }

    /// Whether the payload is an lz4 block.
    pub fn is_lz4(self) -> bool {
        matches!(self, Codec::Lz4 | Codec::Lz4Kept)
    }
}

/// Dictionaries a domain can have in use at once: a record names one by a
/// 2-bit slot, and a slot is reused only once no object names it.
pub const DICT_SLOTS: usize = 4;

/// One stored content, packed into 16 bytes: records are the largest
/// per-object cost after the payload itself, so every byte here is about
/// 0.1% of the store's ratio on typical swap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Obj {
    /// Low 32 bits of the keyed content hash (of the page and its dedup
    /// domain; the high half chose the shard), or of the keyed fill hash. A dedup hit
    /// always compares bytes, so the key only has to make false candidates rare.
    key: u32,
    loc_lo: u32,
    /// Location bits 32..40, payload length (13 bits, `PAGE_SIZE` = raw),
    /// tier (2), flags (3), codec (2), dictionary slot (2) and the upper 2
    /// bits of the reference count.
    bits: u32,
    /// The shard-local id of the (guest, pool) that created it (see
    /// [`super::owners`]): object counters go there.
    owner: u16,
    refs_lo: u16,
}

/// Used since the CLOCK hand last passed (writeback's second chance).
pub const REFERENCED: u32 = 1;
/// In the dedup table.
pub const INDEXED: u32 = 2;
/// Used since the recompressor's hand last passed: set with [`REFERENCED`],
/// cleared by the recompressor only, so the two hands age objects apart.
pub const WARM: u32 = 4;

impl Obj {
    /// A record with one reference. `len` is at most `PAGE_SIZE`.
    pub fn new(key: u32, tier: Tier, len: usize, owner: u16, flags: u32) -> Obj {
        debug_assert!(len <= PAGE_SIZE && flags <= 7);
        let mut o = Obj {
            key,
            owner,
            bits: (len as u32) << LEN_SHIFT | (tier as u32) << TIER_SHIFT | flags << FLAG_SHIFT,
            ..Obj::default()
        };
        o.set_refs(1);
        o
    }

    /// A fill record: the word takes the key and location fields, and its
    /// [`FILL_KEY_BITS`]-bit key the location's top and the length (a fill
    /// has neither). `private`: stored by a put whose dedup domain is its
    /// guest's own (see [`Obj::fill_private`]).
    pub fn fill(key: u32, word: u64, owner: u16, flags: u32, private: bool) -> Obj {
        let mut o = Obj::new(0, Tier::Fill, 0, owner, flags);
        o.key = word as u32;
        o.loc_lo = (word >> 32) as u32;
        let key = key & FILL_KEY_MASK;
        o.bits |= (key >> 13) | (key & LEN_MASK) << LEN_SHIFT | u32::from(private) << SLOT_SHIFT;
        o
    }

    /// The key the dedup table and candidates go by: a fill's is
    /// [`FILL_KEY_BITS`] long.
    pub fn key(&self) -> u32 {
        if self.tier() == Tier::Fill {
            (self.bits & 0xff) << 13 | (self.bits >> LEN_SHIFT) & LEN_MASK
        } else {
            self.key
        }
    }

    /// A fill record's word.
    pub fn fill_word(&self) -> u64 {
        u64::from(self.loc_lo) << 32 | u64::from(self.key)
    }

    /// Whether a fill record was stored in a private dedup domain (its
    /// guest's own): with the owner's guest that names its domain, which
    /// the record has no room for.
    pub fn fill_private(&self) -> bool {
        (self.bits >> SLOT_SHIFT) & 1 != 0
    }

    pub fn owner(&self) -> u16 {
        self.owner
    }

    pub fn set_owner(&mut self, owner: u16) {
        self.owner = owner;
    }

    pub fn len(&self) -> usize {
        ((self.bits >> LEN_SHIFT) & LEN_MASK) as usize
    }

    pub fn tier(&self) -> Tier {
        Tier::from_bits(self.bits >> TIER_SHIFT)
    }

    pub fn set_tier(&mut self, tier: Tier) {
        self.bits = (self.bits & !(3 << TIER_SHIFT)) | (tier as u32) << TIER_SHIFT;
    }

    pub fn refs(&self) -> u32 {
        (self.bits >> REFS_HI_SHIFT) << 16 | u32::from(self.refs_lo)
    }

    pub fn set_refs(&mut self, refs: u32) {
        debug_assert!(refs <= MAX_REFS);
        self.refs_lo = refs as u16;
        self.bits = (self.bits & !(u32::MAX << REFS_HI_SHIFT)) | (refs >> 16) << REFS_HI_SHIFT;
    }

    pub fn loc(&self) -> u64 {
        u64::from(self.bits & 0xff) << 32 | u64::from(self.loc_lo)
    }

    pub fn set_loc(&mut self, loc: u64) {
        debug_assert!(loc < 1 << LOC_BITS);
        self.loc_lo = loc as u32;
        self.bits = (self.bits & !0xff) | (loc >> 32) as u32 & 0xff;
    }

    pub fn has(&self, flag: u32) -> bool {
        (self.bits >> FLAG_SHIFT) & flag != 0
    }

    pub fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.bits |= flag << FLAG_SHIFT;
        } else {
            self.bits &= !(flag << FLAG_SHIFT);
        }
    }

    pub fn codec(&self) -> Codec {
        Codec::from_bits(self.bits >> CODEC_SHIFT)
    }

    /// The dictionary slot, meaningful for [`Codec::Dict`].
    pub fn dict_slot(&self) -> u8 {
        ((self.bits >> SLOT_SHIFT) & 3) as u8
    }

    pub fn set_codec(&mut self, codec: Codec, slot: u8) {
        debug_assert!(usize::from(slot) < DICT_SLOTS);
        self.bits = (self.bits & !(0xf << CODEC_SHIFT))
            | (codec as u32) << CODEC_SHIFT
            | u32::from(slot & 3) << SLOT_SHIFT;
    }

    /// Sets the length of a payload that was re-encoded in place.
    pub fn set_len(&mut self, len: usize) {
        debug_assert!(len <= PAGE_SIZE);
        self.bits = (self.bits & !(LEN_MASK << LEN_SHIFT)) | (len as u32) << LEN_SHIFT;
    }

    pub fn is_raw(&self) -> bool {
        self.len() == PAGE_SIZE
    }
}

/// Spreads a 32-bit key over 64 bits, for the dedup table (its part from
/// the top bits, its home slot from the next ones).
pub fn key_hash(key: u32) -> u64 {
    u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Block pointers to add when the table is full: a quarter more (at least
/// 4), not double, so its slack stays small.
fn table_step(cap: usize) -> usize {
    (cap / 4).max(4)
}

#[derive(Default)]
pub struct Slab {
    /// Thin pointers, added a quarter at a time (see [`table_step`]). Boxed
    /// so that growing the table moves pointers, never records.
    #[allow(clippy::vec_box)]
    blocks: Vec<Box<[Obj; BLOCK]>>,
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
            + self.blocks.capacity() * std::mem::size_of::<Box<[Obj; BLOCK]>>()) as u64
    }

    pub fn live(&self) -> u32 {
        self.live
    }

    /// Host bytes the next insert adds (a new block when all are in use).
    pub fn growth(&self) -> usize {
        if self.free_head == NONE && self.len as usize == self.blocks.len() * BLOCK {
            let table = if self.blocks.len() == self.blocks.capacity() {
                table_step(self.blocks.capacity()) * std::mem::size_of::<Box<[Obj; BLOCK]>>()
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

    /// The id the next [`Slab::insert`] hands out.
    pub fn next_id(&self) -> u32 {
        if self.free_head != NONE {
            self.free_head
        } else {
            self.len
        }
    }

    pub fn insert(&mut self, obj: Obj) -> u32 {
        let id = if self.free_head != NONE {
            let id = self.free_head;
            self.free_head = self.get(id).loc() as u32;
            id
        } else {
            if self.len as usize == self.blocks.len() * BLOCK {
                if self.blocks.len() == self.blocks.capacity() {
                    self.blocks.reserve_exact(table_step(self.blocks.capacity()));
                }
                self.blocks.push(Box::new([Obj::default(); BLOCK]));
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

    /// CLOCK: the next RAM object accepted by `want` (given its id and
    /// record) whose referenced bit is clear, clearing the bits of the
    /// accepted ones it passes. Looks at `budget` records at most.
    pub fn next_victim(&mut self, mut budget: usize, want: impl Fn(u32, &Obj) -> bool) -> Option<u32> {
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
            if obj.tier() != Tier::Ram || !want(id, obj) {
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
        Obj::new(0, Tier::Ram, usize::from(len), 0, 0)
    }

    #[test]
    fn record_is_sixteen_bytes_and_keeps_every_field_apart() {
        assert_eq!(std::mem::size_of::<Obj>(), 16);
        let mut o = Obj::new(0xdead_beef, Tier::Spilled, PAGE_SIZE, 0xfffe, INDEXED);
        for loc in [0, 1, 0xffff_ffff, 0x1_0000_0000, (1 << LOC_BITS) - 1] {
            for refs in [0, 1, 0xffff, 0x1_0000, MAX_REFS] {
                o.set_loc(loc);
                o.set_refs(refs);
                o.set(REFERENCED, refs % 2 == 0);
                assert_eq!((o.loc(), o.refs()), (loc, refs));
                assert_eq!(o.has(REFERENCED), refs % 2 == 0);
                assert!(o.has(INDEXED));
                assert_eq!((o.key(), o.len(), o.owner()), (0xdead_beef, PAGE_SIZE, 0xfffe));
                assert_eq!(o.tier(), Tier::Spilled);
                for (codec, slot) in [(Codec::Lz4Kept, 3), (Codec::Dict, 2), (Codec::Zstd, 0)] {
                    o.set_codec(codec, slot);
                    assert_eq!((o.codec(), o.dict_slot()), (codec, slot));
                    assert_eq!((o.loc(), o.refs(), o.len()), (loc, refs, PAGE_SIZE));
                }
                o.set(WARM, true);
                assert!(o.has(WARM) && o.has(INDEXED));
                assert_eq!(o.codec(), Codec::Zstd);
            }
        }
        o.set_len(100);
        assert_eq!(
            (o.len(), o.loc(), o.key()),
            (100, (1 << LOC_BITS) - 1, 0xdead_beef)
        );
        o.set_len(PAGE_SIZE);
        o.set_tier(Tier::Ram);
        assert_eq!(
            (o.tier(), o.loc(), o.refs()),
            (Tier::Ram, (1 << LOC_BITS) - 1, MAX_REFS)
        );
        assert!(o.is_raw());
    }

    #[test]
    fn a_fill_record_keeps_its_word_key_and_domain_kind_apart() {
        for (key, word, private) in [
            (0xffff_ffff, u64::MAX, true),
            (0x1f_ffff, 0, false),
            (0x12_3456, 0x0123_4567_89ab_cdef, true),
            (1 << 13, 1 << 32, false),
        ] {
            let mut o = Obj::fill(key, word, 0xabcd, INDEXED, private);
            o.set_refs(MAX_REFS);
            o.set(REFERENCED | WARM, true);
            assert_eq!(o.tier(), Tier::Fill);
            assert_eq!((o.key(), o.fill_word()), (key & FILL_KEY_MASK, word));
            assert_eq!(
                (o.fill_private(), o.owner(), o.refs()),
                (private, 0xabcd, MAX_REFS)
            );
            assert!(o.has(INDEXED) && o.has(WARM));
            assert_eq!(o.codec(), Codec::Zstd, "no dictionary to drop");
        }
    }

    #[test]
    fn ids_are_reused_and_blocks_added_on_demand() {
        let mut s = Slab::new();
        assert!(s.growth() > 0);
        let ids: Vec<u32> = (0..BLOCK as u32 + 5).map(|i| s.insert(ram(i as u16))).collect();
        assert_eq!(s.blocks.len(), 2);
        assert_eq!(s.get(ids[7]).len(), 7);
        s.remove(ids[3]);
        s.remove(ids[9]);
        assert_eq!(s.live(), BLOCK as u32 + 3);
        assert_eq!(s.growth(), 0);
        assert_eq!(s.insert(ram(1)), ids[9]);
        assert_eq!(s.insert(ram(1)), ids[3]);
        assert_eq!(s.get(ids[3]).tier(), Tier::Ram);
    }

    #[test]
    fn clock_spares_referenced_objects_once() {
        let mut s = Slab::new();
        for i in 0..4 {
            s.insert(ram(i));
        }
        s.get_mut(0).set(REFERENCED, true);
        s.get_mut(1).set_tier(Tier::Fill);
        assert_eq!(s.next_victim(100, |_, _| true), Some(2));
        assert_eq!(s.next_victim(100, |_, _| true), Some(3));
        // 0 lost its bit on the first pass, so it goes now.
        assert_eq!(s.next_victim(100, |_, _| true), Some(0));
        assert!(!s.get(0).has(REFERENCED));
        assert_eq!(s.next_victim(100, |_, o| o.len() == 3), Some(3));
        assert_eq!(s.next_victim(100, |_, o| o.len() == 99), None);
    }
}
