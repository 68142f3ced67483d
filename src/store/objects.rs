//! One object shard: stored contents, their dedup table, the RAM chunks that
//! hold their payloads, and the per-owner object counters.
//!
//! An object is one stored content, referenced by any number of index entries.
//! Same-filled pages are objects too (metadata only), so an index entry is
//! always one 32-bit handle. Objects are placed in a shard by content hash, so
//! identical pages meet in the same shard and its dedup table.
//!
//! The caller holds the shard's lock around every call. Spill I/O for an
//! object happens under that lock: it is the slow path, and it keeps the
//! object from being freed (and its file slot reused) during the read.

use hashbrown::{HashMap, HashTable};

use super::{
    alloc::{class_of, class_size, Loc, SizeClassAlloc},
    budget::Budget,
    slab::{table_hash, Obj, Slab, Tier, INDEXED, REFERENCED},
    spill::{units_for, SpillFile, UNIT},
    Counters, StoreError, PAGE_SIZE,
};

/// What a put wants stored.
pub enum Content<'a> {
    Fill {
        word: u64,
        domain: u32,
    },
    /// `payload` is a zstd frame, or the page itself when `PAGE_SIZE` long.
    Data {
        hash: [u64; 2],
        payload: &'a [u8],
        dedup: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Obtained {
    /// The object now carries one more reference; `hit` says it already existed.
    Ref { id: u32, hit: bool },
    /// The budget has no room: make some (ideally in `class`) and retry.
    NeedRoom { class: Option<usize> },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    Fill(u64),
    /// The page itself was copied out.
    Raw,
    /// The first `len` bytes of the frame buffer hold a zstd frame.
    Frame(usize),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Evicted {
    /// One object went to the file.
    One,
    /// No RAM object fits the request.
    NoVictim,
    /// The spill tier is full (limit or ENOSPC).
    TierFull,
}

pub struct ObjShard {
    slab: Slab,
    dedup: HashTable<u32>,
    alloc: SizeClassAlloc,
    owners: HashMap<(u32, u32), Counters>,
    /// Bytes this shard has counted in the budget.
    counted: u64,
    max_ids: u32,
}

impl ObjShard {
    pub fn new(max_ids: u32) -> Self {
        ObjShard {
            slab: Slab::new(),
            dedup: HashTable::new(),
            alloc: SizeClassAlloc::new(),
            owners: HashMap::new(),
            counted: 0,
            max_ids,
        }
    }

    /// Bytes of RAM chunks (payload plus slot and chunk-tail slack).
    pub fn chunk_bytes(&self) -> u64 {
        self.alloc.chunk_bytes()
    }

    pub fn heap_bytes(&self) -> u64 {
        self.slab.heap_bytes()
            + self.alloc.heap_bytes()
            + (self.dedup.allocation_size() + self.owners.allocation_size()) as u64
    }

    #[cfg(test)]
    pub fn live_objects(&self) -> u32 {
        self.slab.live()
    }

    fn settle(&mut self, budget: &Budget) {
        let now = self.heap_bytes();
        budget.settle(&mut self.counted, now);
    }

    fn owner(&mut self, guest: u32, pool: u32) -> &mut Counters {
        self.owners.entry((guest, pool)).or_default()
    }

    /// Finds an equal object in the dedup table or stores a new one, taking a reference.
    pub fn obtain(&mut self, content: &Content<'_>, guest: u32, pool: u32, budget: &Budget) -> Obtained {
        let (hash, dedup) = match *content {
            Content::Fill { word, domain } => ([word, u64::from(domain)], true),
            Content::Data { hash, dedup, .. } => (hash, dedup),
        };
        let th = table_hash(hash);
        if dedup {
            let found = self.dedup.find(th, |&id| {
                let o = self.slab.get(id);
                o.hash == hash
                    && match *content {
                        Content::Fill { .. } => o.tier == Tier::Fill,
                        Content::Data { payload, .. } => {
                            o.tier == Tier::Ram
                                && usize::from(o.len) == payload.len()
                                && self.alloc.bytes(Loc::unpack(o.loc), payload.len()) == payload
                        }
                    }
            });
            if let Some(&id) = found {
                let o = self.slab.get_mut(id);
                o.refs += 1;
                o.set(REFERENCED, true);
                return Obtained::Ref { id, hit: true };
            }
        }
        let payload_len = match *content {
            Content::Fill { .. } => 0,
            Content::Data { payload, .. } => payload.len(),
        };
        let alloc_growth = if payload_len > 0 {
            self.alloc.growth_for(payload_len)
        } else {
            0
        };
        let table_growth = if dedup && self.dedup.len() == self.dedup.capacity() {
            self.dedup.allocation_size().max(128)
        } else {
            0
        };
        let growth = (alloc_growth + table_growth + self.slab.growth()) as u64;
        let class = (alloc_growth > 0).then(|| class_of(payload_len));
        if !self.slab.has_room(self.max_ids) || !budget.try_reserve(growth) {
            return Obtained::NeedRoom { class };
        }
        self.counted += growth;

        let (tier, loc) = match *content {
            Content::Fill { .. } => (Tier::Fill, 0),
            Content::Data { payload, .. } => {
                let loc = self.alloc.alloc(payload.len());
                self.alloc.bytes_mut(loc, payload.len()).copy_from_slice(payload);
                (Tier::Ram, loc.pack())
            }
        };
        let id = self.slab.insert(Obj {
            hash,
            loc,
            refs: 1,
            guest,
            pool,
            len: payload_len as u16,
            tier,
            flags: REFERENCED | if dedup { INDEXED } else { 0 },
        });
        if dedup {
            let slab = &self.slab;
            self.dedup.insert_unique(th, id, |&i| slab.get(i).table_hash());
        }
        let c = self.owner(guest, pool);
        c.mem_used_bytes += obj_ram_bytes(tier, payload_len);
        if tier == Tier::Ram {
            c.unique_pages += 1;
            c.compr_data_bytes += payload_len as u64;
        }
        self.settle(budget);
        Obtained::Ref { id, hit: false }
    }

    /// Drops one reference; the last one frees the payload in whichever tier it is.
    /// Returns whether the object was a fill.
    pub fn release(&mut self, id: u32, spill: Option<&SpillFile>, budget: &Budget) -> bool {
        let o = self.slab.get_mut(id);
        o.refs -= 1;
        let obj = *o;
        let fill = obj.tier == Tier::Fill;
        if obj.tier == Tier::Spilled {
            self.owner(obj.guest, obj.pool).spilled_pages -= 1;
        }
        if obj.refs > 0 {
            return fill;
        }
        if obj.has(INDEXED) {
            if let Ok(entry) = self.dedup.find_entry(obj.table_hash(), |&i| i == id) {
                entry.remove();
            }
        }
        let len = usize::from(obj.len);
        match obj.tier {
            Tier::Ram => self.alloc.free(Loc::unpack(obj.loc)),
            Tier::Spilled => {
                if let Some(spill) = spill {
                    spill.free(obj.loc, len, budget);
                }
            }
            Tier::Fill | Tier::Free => {}
        }
        let c = self.owner(obj.guest, obj.pool);
        c.mem_used_bytes -= obj_ram_bytes(obj.tier, len);
        if obj.tier != Tier::Fill {
            c.unique_pages -= 1;
            c.compr_data_bytes -= len as u64;
        }
        if obj.tier == Tier::Spilled {
            c.spill_file_bytes -= units_for(len) as u64 * UNIT;
        }
        self.slab.remove(id);
        self.settle(budget);
        fill
    }

    /// Fetches the payload (reading the file if spilled), marking the object used:
    /// a raw page goes straight to `page`, a zstd frame to `frame`.
    pub fn load(
        &mut self,
        id: u32,
        page: &mut [u8; PAGE_SIZE],
        frame: &mut [u8; PAGE_SIZE],
        spill: Option<&SpillFile>,
    ) -> Result<Loaded, StoreError> {
        let o = self.slab.get_mut(id);
        o.set(REFERENCED, true);
        let obj = *o;
        let len = usize::from(obj.len);
        let (dest, loaded) = if obj.is_raw() {
            (page, Loaded::Raw)
        } else {
            (frame, Loaded::Frame(len))
        };
        match obj.tier {
            Tier::Fill => Ok(Loaded::Fill(obj.hash[0])),
            Tier::Ram => {
                dest[..len].copy_from_slice(self.alloc.bytes(Loc::unpack(obj.loc), len));
                Ok(loaded)
            }
            Tier::Spilled => {
                let spill = spill.ok_or(StoreError::Corrupt { offset: obj.loc })?;
                self.owner(obj.guest, obj.pool).spill_reads += 1;
                spill.read(obj.loc, len, obj.hash[0], &mut dest[..])?;
                Ok(loaded)
            }
            Tier::Free => Err(StoreError::Corrupt { offset: obj.loc }),
        }
    }

    /// Writes one cold RAM object (of `class`, if given) to the spill file.
    pub fn evict(
        &mut self,
        class: Option<usize>,
        spill: &SpillFile,
        budget: &Budget,
    ) -> Result<Evicted, StoreError> {
        // A class-targeted scan may skip many records, so it gets a bounded look.
        let scan = match class {
            Some(_) => 4 * super::slab::BLOCK,
            None => 2 * self.slab.high_water() as usize + 1,
        };
        let Some(id) = self.slab.next_victim(scan, |o| {
            class.map_or(true, |c| class_of(usize::from(o.len)) == c)
        }) else {
            return Ok(Evicted::NoVictim);
        };
        let obj = *self.slab.get(id);
        let len = usize::from(obj.len);
        let loc = Loc::unpack(obj.loc);
        let Some(offset) = spill.write(self.alloc.bytes(loc, len), obj.hash[0], budget)? else {
            return Ok(Evicted::TierFull);
        };
        self.alloc.free(loc);
        if obj.has(INDEXED) {
            // Only RAM objects are dedup candidates: a match must be compared in memory.
            if let Ok(entry) = self.dedup.find_entry(obj.table_hash(), |&i| i == id) {
                entry.remove();
            }
        }
        let o = self.slab.get_mut(id);
        o.tier = Tier::Spilled;
        o.loc = offset;
        o.set(INDEXED, false);
        let c = self.owner(obj.guest, obj.pool);
        c.mem_used_bytes -= obj_ram_bytes(Tier::Ram, len) - obj_ram_bytes(Tier::Spilled, len);
        c.spilled_pages += u64::from(obj.refs);
        c.spill_file_bytes += units_for(len) as u64 * UNIT;
        c.spill_writes += 1;
        c.writebacks += u64::from(obj.refs);
        self.settle(budget);
        Ok(Evicted::One)
    }

    /// Adds this shard's object counters into `into`, by (guest, pool).
    pub fn add_stats(&self, mut into: impl FnMut(u32, u32, &Counters)) {
        for (&(guest, pool), c) in &self.owners {
            into(guest, pool, c);
        }
    }
}

/// RAM attributed to one object: its record plus its payload slot.
fn obj_ram_bytes(tier: Tier, len: usize) -> u64 {
    let slot = if tier == Tier::Ram {
        class_size(class_of(len))
    } else {
        0
    };
    (std::mem::size_of::<Obj>() + slot) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(hash: u64, payload: &[u8], dedup: bool) -> Content<'_> {
        Content::Data {
            hash: [hash, !hash],
            payload,
            dedup,
        }
    }

    fn id_of(o: Obtained) -> (u32, bool) {
        match o {
            Obtained::Ref { id, hit } => (id, hit),
            other => panic!("expected a reference, got {other:?}"),
        }
    }

    #[test]
    fn dedup_refcounts_and_frees_on_last_release() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(1 << 20);
        let p = vec![7u8; 1000];
        let (a, hit) = id_of(s.obtain(&data(1, &p, true), 0, 0, &budget));
        assert!(!hit);
        let (b, hit) = id_of(s.obtain(&data(1, &p, true), 0, 1, &budget));
        assert!(hit);
        assert_eq!(a, b);
        assert_eq!(s.slab.get(a).refs, 2);
        let used = budget.used();
        assert!(!s.release(a, None, &budget));
        assert_eq!(s.live_objects(), 1);
        assert_eq!(budget.used(), used, "one reference left: nothing freed");
        s.release(a, None, &budget);
        assert_eq!(s.live_objects(), 0);
        assert_eq!(s.alloc.chunk_bytes(), 0);
        assert_eq!(s.dedup.len(), 0);
        let mut total = Counters::default();
        s.add_stats(|_, _, c| total.unique_pages += c.unique_pages + c.compr_data_bytes + c.mem_used_bytes);
        assert_eq!(total.unique_pages, 0);
    }

    #[test]
    fn equal_hash_but_different_bytes_is_not_a_hit() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(1 << 20);
        let (a, _) = id_of(s.obtain(&data(5, &[1u8; 100], true), 0, 0, &budget));
        let (b, hit) = id_of(s.obtain(&data(5, &[2u8; 100], true), 0, 0, &budget));
        assert!(!hit);
        assert_ne!(a, b);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(b, &mut page, &mut buf, None).unwrap(), Loaded::Frame(100));
        assert_eq!(&buf[..100], &[2u8; 100]);
    }

    #[test]
    fn dedup_off_stores_copies_and_fills_are_shared() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(1 << 20);
        let p = [3u8; 64];
        let (a, _) = id_of(s.obtain(&data(9, &p, false), 0, 0, &budget));
        let (b, hit) = id_of(s.obtain(&data(9, &p, false), 0, 0, &budget));
        assert!(!hit && a != b);
        let fill = Content::Fill { word: 0, domain: 4 };
        let (f1, _) = id_of(s.obtain(&fill, 4, 0, &budget));
        let (f2, hit) = id_of(s.obtain(&fill, 4, 0, &budget));
        assert!(hit && f1 == f2);
        let other_domain = Content::Fill { word: 0, domain: 5 };
        assert_ne!(id_of(s.obtain(&other_domain, 5, 0, &budget)).0, f1);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(f1, &mut page, &mut buf, None).unwrap(), Loaded::Fill(0));
        assert!(s.release(f1, None, &budget));
    }

    #[test]
    fn budget_refuses_growth_and_names_the_class() {
        let budget = Budget::new(0);
        let mut s = ObjShard::new(1 << 20);
        assert_eq!(
            s.obtain(&data(1, &[1u8; 500], true), 0, 0, &budget),
            Obtained::NeedRoom {
                class: Some(class_of(500))
            }
        );
        assert_eq!(budget.used(), 0);
        budget.set_limit(1 << 20);
        let (_, _) = id_of(s.obtain(&data(1, &[1u8; 500], true), 0, 0, &budget));
        assert_eq!(
            budget.used(),
            s.heap_bytes(),
            "the budget holds exactly the shard's bytes"
        );
    }

    #[test]
    fn spill_round_trip_and_release_frees_file_space() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(1 << 20);
        let p: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let (a, _) = id_of(s.obtain(&data(11, &p, true), 1, 2, &budget));
        s.obtain(&data(11, &p, true), 1, 2, &budget);
        // Referenced once on insert: CLOCK spares it on the first pass.
        assert_eq!(s.evict(None, &spill, &budget).unwrap(), Evicted::One);
        assert_eq!(s.alloc.chunk_bytes(), 0, "payload left RAM");
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(700)
        );
        assert_eq!(&buf[..700], &p[..]);
        // A spilled object is not a dedup candidate: an equal put makes a RAM copy.
        let (c, hit) = id_of(s.obtain(&data(11, &p, true), 1, 2, &budget));
        assert!(!hit && c != a);
        let mut total = Counters::default();
        s.add_stats(|_, _, c| {
            total.spilled_pages += c.spilled_pages;
            total.spill_reads += c.spill_reads;
        });
        assert_eq!((total.spilled_pages, total.spill_reads), (2, 1));
        s.release(a, Some(&spill), &budget);
        assert!(spill.live_bytes() > 0);
        s.release(a, Some(&spill), &budget);
        assert_eq!(spill.live_bytes(), 0);
        assert_eq!(s.evict(Some(0), &spill, &budget).unwrap(), Evicted::NoVictim);
    }

    #[test]
    fn full_tier_keeps_the_object_in_ram() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 0).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(1 << 20);
        let (a, _) = id_of(s.obtain(&data(1, &[5u8; 300], true), 0, 0, &budget));
        assert_eq!(s.evict(None, &spill, &budget).unwrap(), Evicted::TierFull);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(300)
        );
        assert_eq!(&buf[..300], &[5u8; 300]);
    }
}
