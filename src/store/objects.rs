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
    alloc::{ChunkAlloc, Loc, CHUNK, HDR},
    budget::Budget,
    codec,
    slab::{fill_hash, key_hash, Obj, Slab, Tier, INDEXED, MAX_REFS, REFERENCED},
    spill::{units_for, Label, SpillFile, UNIT},
    Counters, Page, StoreError, PAGE_SIZE,
};

/// What a put wants stored.
pub enum Content<'a> {
    Fill {
        word: u64,
        domain: u32,
    },
    /// `payload` is a zstd frame, or the page itself when `PAGE_SIZE` long.
    /// `key` is the low 32 bits of its 128-bit content hash, the only part
    /// the record keeps: bytes are compared before any hit.
    Data {
        key: u32,
        /// The high half of the hash, which chose the shard.
        shard_hash: u64,
        payload: &'a [u8],
        dedup: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Obtained {
    /// The object now carries one more reference; `hit` says it already existed.
    Ref { id: u32, hit: bool },
    /// The budget has no room: make some and retry.
    NeedRoom,
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
    /// Word and dedup domain of each fill object, by id: they do not fit a
    /// record, and distinct fills are few (zero pages are almost all of them).
    fills: HashMap<u32, (u64, u32)>,
    alloc: ChunkAlloc,
    /// Object counters by owner id.
    owners: Vec<Counters>,
    /// Bytes this shard has counted in the budget.
    counted: u64,
    /// Objects with a payload in RAM: writeback gives up at once when none.
    in_ram: u32,
    /// After a compaction finds no sparse chunk, garbage must reach this
    /// before the next try, so a shard with thinly spread holes is not
    /// rescanned on every free.
    compact_floor: u64,
    max_ids: u32,
    /// This shard's part of an object handle: handle = `handle_base | id`.
    handle_base: u32,
}

impl ObjShard {
    /// A shard whose objects' handles are `handle_base | id`, with ids below `max_ids`.
    pub fn new(handle_base: u32, max_ids: u32) -> Self {
        ObjShard {
            slab: Slab::new(),
            dedup: HashTable::new(),
            fills: HashMap::new(),
            alloc: ChunkAlloc::new(),
            owners: Vec::new(),
            counted: 0,
            in_ram: 0,
            compact_floor: 0,
            max_ids,
            handle_base,
        }
    }

    /// What the spill file binds the slot of object `id` to: a slot opens only
    /// for the object that wrote it.
    fn label(&self, id: u32, key: u32, owner: u16) -> Label {
        Label {
            handle: self.handle_base | id,
            key,
            owner,
        }
    }

    /// Bytes of RAM chunks (payloads, their headers, holes and tails).
    pub fn chunk_bytes(&self) -> u64 {
        self.alloc.chunk_bytes()
    }

    pub fn heap_bytes(&self) -> u64 {
        (self.dedup.allocation_size() + self.fills.allocation_size()) as u64
            + self.slab.heap_bytes()
            + self.alloc.heap_bytes()
    }

    pub fn live_objects(&self) -> u32 {
        self.slab.live()
    }

    /// Bytes the dedup table grows by on the next insert.
    fn dedup_growth(&self, dedup: bool) -> usize {
        if dedup && self.dedup.len() == self.dedup.capacity() {
            self.dedup.allocation_size().max(128)
        } else {
            0
        }
    }

    fn settle(&mut self, budget: &Budget) {
        let now = self.heap_bytes();
        budget.settle(&mut self.counted, now);
    }

    fn owner(&mut self, owner: u16) -> &mut Counters {
        let i = usize::from(owner);
        if i >= self.owners.len() {
            self.owners.resize(i + 1, Counters::default());
        }
        &mut self.owners[i]
    }

    /// Finds an equal object in the dedup table or stores a new one, taking a reference.
    ///
    /// A spilled object is a candidate too: its payload is read back from the
    /// file (under this shard's lock) for the byte comparison, so a page is
    /// stored once whichever tier its twin is in. A failed read means "not
    /// equal": the new page gets its own copy.
    pub fn obtain(
        &mut self,
        content: &Content<'_>,
        owner: u16,
        budget: &Budget,
        spill: Option<&SpillFile>,
    ) -> Obtained {
        let (key, dedup) = content_key(content);
        if let Some(hit) = self.lookup(content, spill) {
            return hit;
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
        let fill_growth = match content {
            Content::Fill { .. } if self.fills.len() == self.fills.capacity() => {
                self.fills.allocation_size().max(256)
            }
            _ => 0,
        };
        let growth = (alloc_growth + self.dedup_growth(dedup) + fill_growth + self.slab.growth()) as u64;
        // New chunks for puts leave one chunk of headroom, for compaction to move into.
        let keep = if alloc_growth > 0 { CHUNK as u64 } else { 0 };
        if !self.slab.has_room(self.max_ids)
            || (alloc_growth > 0 && !self.alloc.can_grow())
            || !budget.try_reserve_leaving(growth, keep)
        {
            return Obtained::NeedRoom;
        }
        self.counted += growth;

        let tier = match content {
            Content::Fill { .. } => Tier::Fill,
            Content::Data { .. } => Tier::Ram,
        };
        let flags = REFERENCED | if dedup { INDEXED } else { 0 };
        let id = self.slab.insert(Obj::new(key, tier, payload_len, owner, flags));
        match *content {
            Content::Data { payload, .. } => {
                let loc = self.alloc.alloc(payload.len(), id);
                self.alloc.bytes_mut(loc, payload.len()).copy_from_slice(payload);
                self.slab.get_mut(id).set_loc(loc.pack());
            }
            Content::Fill { word, domain } => {
                self.fills.insert(id, (word, domain));
            }
        }
        if dedup {
            let slab = &self.slab;
            self.dedup
                .insert_unique(key_hash(key), id, |&i| slab.get(i).table_hash());
        }
        if tier == Tier::Ram {
            self.in_ram += 1;
        }
        let c = self.owner(owner);
        c.mem_used_bytes += obj_ram_bytes(tier, payload_len);
        if tier == Tier::Ram {
            c.unique_pages += 1;
            c.compr_data_bytes += payload_len as u64;
        }
        self.settle(budget);
        Obtained::Ref { id, hit: false }
    }

    /// Finds an object equal to `content` and takes a reference on it.
    fn lookup(&mut self, content: &Content<'_>, spill: Option<&SpillFile>) -> Option<Obtained> {
        let (key, dedup) = content_key(content);
        if !dedup {
            return None;
        }
        {
            let found = self.dedup.find(key_hash(key), |&id| {
                let o = self.slab.get(id);
                // A record at its reference limit is passed over: the page gets a new copy.
                if o.refs() == MAX_REFS {
                    return false;
                }
                match *content {
                    Content::Fill { word, domain } => {
                        o.tier() == Tier::Fill && self.fills.get(&id) == Some(&(word, domain))
                    }
                    Content::Data { payload, .. } if o.key() == key && o.len() == payload.len() => {
                        let mut read = [0u8; PAGE_SIZE];
                        self.candidate_payload(id, o, spill, &mut read) == Some(payload)
                    }
                    Content::Data { .. } => false,
                }
            });
            if let Some(&id) = found {
                self.take_ref(id);
                return Some(Obtained::Ref { id, hit: true });
            }
        }
        None
    }

    /// Finds an object holding exactly `page`, before the page is compressed:
    /// candidates share its key (the low bits of a hash of the page), and each
    /// is decoded (read back from the file if spilled) and compared whole.
    /// Takes a reference on the one found. A read or decode that fails counts
    /// as "not equal".
    ///
    /// The decode runs under this shard's lock, but only for candidates whose
    /// 32-bit key matches: all but about one in 4 billion are true twins.
    pub fn find_page(&mut self, key: u32, page: &Page, spill: Option<&SpillFile>) -> Option<u32> {
        let found = self
            .dedup
            .find(key_hash(key), |&id| {
                let o = self.slab.get(id);
                if o.key() != key || o.refs() == MAX_REFS {
                    return false;
                }
                let mut read = [0u8; PAGE_SIZE];
                let Some(payload) = self.candidate_payload(id, o, spill, &mut read) else {
                    return false;
                };
                if o.is_raw() {
                    return payload == &page[..];
                }
                let mut decoded = [0u8; PAGE_SIZE];
                codec::decompress(payload, &mut decoded).is_ok() && decoded == *page
            })
            .copied();
        if let Some(id) = found {
            self.take_ref(id);
        }
        found
    }

    /// The stored payload of a dedup candidate: borrowed from RAM, or read
    /// from the file into `read`. `None` for a fill, or when the file is not
    /// at hand or the read fails: the candidate then counts as "not equal".
    fn candidate_payload<'a>(
        &'a self,
        id: u32,
        o: &Obj,
        spill: Option<&SpillFile>,
        read: &'a mut [u8; PAGE_SIZE],
    ) -> Option<&'a [u8]> {
        let len = o.len();
        match o.tier() {
            Tier::Ram => Some(self.alloc.bytes(Loc::unpack(o.loc()), len)),
            Tier::Spilled => {
                spill?
                    .read(
                        o.loc() * UNIT,
                        len,
                        self.label(id, o.key(), o.owner()),
                        &mut read[..],
                    )
                    .ok()?;
                Some(&read[..len])
            }
            Tier::Fill | Tier::Free => None,
        }
    }

    /// One more reference on `id`, which a put just matched.
    fn take_ref(&mut self, id: u32) {
        let o = self.slab.get_mut(id);
        o.set_refs(o.refs() + 1);
        o.set(REFERENCED, true);
        let (tier, owner) = (o.tier(), o.owner());
        if tier == Tier::Spilled {
            self.owner(owner).spilled_pages += 1;
        }
    }

    /// Stores a new page straight into the spill file, for when RAM has no
    /// room and nothing in it can be moved out: the record still takes RAM,
    /// the payload does not. `NeedRoom` means the file is full too.
    pub fn obtain_spilled(
        &mut self,
        content: &Content<'_>,
        owner: u16,
        budget: &Budget,
        spill: &SpillFile,
    ) -> Result<Obtained, StoreError> {
        let Content::Data {
            key, payload, dedup, ..
        } = *content
        else {
            return Ok(self.obtain(content, owner, budget, Some(spill)));
        };
        if let Some(hit) = self.lookup(content, Some(spill)) {
            return Ok(hit);
        }
        let growth = (self.dedup_growth(dedup) + self.slab.growth()) as u64;
        if !self.slab.has_room(self.max_ids) || !budget.try_reserve(growth) {
            return Ok(Obtained::NeedRoom);
        }
        self.counted += growth;
        // The record is inserted after the write; nothing else takes an id in between.
        let id = self.slab.next_id();
        let Some(offset) = spill.write(payload, self.label(id, key, owner))? else {
            self.settle(budget);
            return Ok(Obtained::NeedRoom);
        };
        let flags = REFERENCED | if dedup { INDEXED } else { 0 };
        let mut obj = Obj::new(key, Tier::Spilled, payload.len(), owner, flags);
        obj.set_loc(offset / UNIT);
        let inserted = self.slab.insert(obj);
        debug_assert_eq!(inserted, id);
        if dedup {
            let slab = &self.slab;
            self.dedup
                .insert_unique(key_hash(key), id, |&i| slab.get(i).table_hash());
        }
        let c = self.owner(owner);
        c.mem_used_bytes += obj_ram_bytes(Tier::Spilled, payload.len());
        c.unique_pages += 1;
        c.compr_data_bytes += payload.len() as u64;
        c.spilled_pages += 1;
        c.spill_file_bytes += units_for(payload.len()) as u64 * UNIT;
        c.spill_writes += 1;
        self.settle(budget);
        Ok(Obtained::Ref { id, hit: false })
    }

    /// Drops one reference; the last one frees the payload in whichever tier it is.
    /// Returns whether the object was a fill.
    pub fn release(&mut self, id: u32, spill: Option<&SpillFile>, budget: &Budget) -> bool {
        let o = self.slab.get_mut(id);
        o.set_refs(o.refs() - 1);
        let obj = *o;
        let fill = obj.tier() == Tier::Fill;
        if obj.tier() == Tier::Spilled {
            self.owner(obj.owner()).spilled_pages -= 1;
        }
        if obj.refs() > 0 {
            return fill;
        }
        if obj.has(INDEXED) {
            if let Ok(entry) = self.dedup.find_entry(obj.table_hash(), |&i| i == id) {
                entry.remove();
            }
        }
        let len = obj.len();
        match obj.tier() {
            Tier::Ram => {
                self.alloc.free(Loc::unpack(obj.loc()), len);
                self.in_ram -= 1;
            }
            Tier::Spilled => {
                if let Some(spill) = spill {
                    spill.free(obj.loc() * UNIT, len);
                }
            }
            Tier::Fill => {
                self.fills.remove(&id);
            }
            Tier::Free => {}
        }
        let c = self.owner(obj.owner());
        c.mem_used_bytes -= obj_ram_bytes(obj.tier(), len);
        if obj.tier() != Tier::Fill {
            c.unique_pages -= 1;
            c.compr_data_bytes -= len as u64;
        }
        if obj.tier() == Tier::Spilled {
            c.spill_file_bytes -= units_for(len) as u64 * UNIT;
        }
        self.slab.remove(id);
        if self.slab.live() == 0 {
            // Empty: give every table back, so the store returns to its start.
            self.slab = Slab::new();
            self.dedup = HashTable::new();
            self.fills = HashMap::new();
            self.alloc = ChunkAlloc::new();
            self.compact_floor = 0;
        } else {
            let (len, cap) = (self.dedup.len(), self.dedup.capacity());
            if cap > 64 && len * 4 < cap {
                let slab = &self.slab;
                self.dedup.shrink_to(len * 2, |&i| slab.get(i).table_hash());
            }
            if fill && self.fills.capacity() > 64 && self.fills.len() * 4 < self.fills.capacity() {
                self.fills.shrink_to(self.fills.len() * 2);
            }
            self.tidy(budget);
        }
        self.settle(budget);
        fill
    }

    /// Compacts when holes exceed an eighth of the chunks (and two chunks), so
    /// churn cannot leave RAM mostly empty space.
    fn tidy(&mut self, budget: &Budget) {
        let garbage = self.alloc.garbage();
        if garbage > 2 * CHUNK as u64 && garbage > self.alloc.chunk_bytes() / 8 {
            self.compact(budget);
        }
    }

    /// Holes and abandoned tails in this shard's chunks.
    pub fn garbage(&self) -> u64 {
        self.alloc.garbage()
    }

    /// Moves the live payloads of the sparsest chunk into the open chunks and
    /// frees it. Returns whether a chunk went back to the host.
    pub fn compact(&mut self, budget: &Budget) -> bool {
        if self.alloc.garbage() < self.compact_floor {
            return false;
        }
        let Some(src) = self.alloc.sparsest() else {
            self.compact_floor = self.alloc.garbage() + CHUNK as u64;
            return false;
        };
        self.compact_floor = 0;
        let mut from = 0;
        let mut done = true;
        while let Some((id, loc)) = self.alloc.next_live(src, from) {
            let len = self.slab.get(id).len();
            let growth = self.alloc.growth_for(len) as u64;
            if (growth > 0 && !self.alloc.can_grow()) || !budget.try_reserve(growth) {
                done = false;
                break;
            }
            self.counted += growth;
            from = loc.off + len as u32;
            let to = self.alloc.relocate(loc, len, id);
            self.slab.get_mut(id).set_loc(to.pack());
        }
        self.settle(budget);
        done
    }

    /// Fetches the payload (reading the file if spilled), marking the object used:
    /// a raw page goes straight to `page`, a zstd frame to `frame`.
    pub fn load(
        &mut self,
        id: u32,
        page: &mut [u8; PAGE_SIZE],
        frame: &mut [u8],
        spill: Option<&SpillFile>,
    ) -> Result<Loaded, StoreError> {
        let o = self.slab.get_mut(id);
        o.set(REFERENCED, true);
        let obj = *o;
        let len = obj.len();
        let (dest, loaded) = if obj.is_raw() {
            (&mut page[..], Loaded::Raw)
        } else {
            (frame, Loaded::Frame(len))
        };
        match obj.tier() {
            Tier::Fill => match self.fills.get(&id) {
                Some(&(word, _)) => Ok(Loaded::Fill(word)),
                None => Err(StoreError::Corrupt { offset: u64::MAX }),
            },
            Tier::Ram => {
                dest[..len].copy_from_slice(self.alloc.bytes(Loc::unpack(obj.loc()), len));
                Ok(loaded)
            }
            Tier::Spilled => {
                let offset = obj.loc() * UNIT;
                let spill = spill.ok_or(StoreError::Corrupt { offset })?;
                self.owner(obj.owner()).spill_reads += 1;
                spill.read(offset, len, self.label(id, obj.key(), obj.owner()), &mut dest[..])?;
                Ok(loaded)
            }
            Tier::Free => Err(StoreError::Corrupt { offset: u64::MAX }),
        }
    }

    /// Writes one cold RAM object to the spill file. Its RAM becomes a hole,
    /// which compaction turns into free host memory.
    pub fn evict(&mut self, spill: &SpillFile, budget: &Budget) -> Result<Evicted, StoreError> {
        if self.in_ram == 0 {
            return Ok(Evicted::NoVictim);
        }
        let scan = 2 * self.slab.high_water() as usize + 1;
        let Some(id) = self.slab.next_victim(scan, |_| true) else {
            return Ok(Evicted::NoVictim);
        };
        let obj = *self.slab.get(id);
        let len = obj.len();
        let loc = Loc::unpack(obj.loc());
        let label = self.label(id, obj.key(), obj.owner());
        let Some(offset) = spill.write(self.alloc.bytes(loc, len), label)? else {
            return Ok(Evicted::TierFull);
        };
        self.alloc.free(loc, len);
        // It stays in the dedup table: equal pages still find it, in the file.
        let o = self.slab.get_mut(id);
        o.set_tier(Tier::Spilled);
        self.in_ram -= 1;
        o.set_loc(offset / UNIT);
        let c = self.owner(obj.owner());
        c.mem_used_bytes -= obj_ram_bytes(Tier::Ram, len) - obj_ram_bytes(Tier::Spilled, len);
        c.spilled_pages += u64::from(obj.refs());
        c.spill_file_bytes += units_for(len) as u64 * UNIT;
        c.spill_writes += 1;
        c.writebacks += u64::from(obj.refs());
        self.settle(budget);
        Ok(Evicted::One)
    }

    /// Hands this shard's object counters to `into`, by owner id.
    pub fn add_stats(&self, mut into: impl FnMut(u16, &Counters)) {
        for (owner, c) in self.owners.iter().enumerate() {
            into(owner as u16, c);
        }
    }
}

/// The record key of what a put wants stored, and whether it is looked up at all.
fn content_key(content: &Content<'_>) -> (u32, bool) {
    match *content {
        Content::Fill { word, domain } => (fill_hash(word, domain) as u32, true),
        Content::Data { key, dedup, .. } => (key, dedup),
    }
}

/// RAM attributed to one object: its record plus its payload and header.
fn obj_ram_bytes(tier: Tier, len: usize) -> u64 {
    let slot = if tier == Tier::Ram { HDR + len } else { 0 };
    (std::mem::size_of::<Obj>() + slot) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: u32, payload: &[u8], dedup: bool) -> Content<'_> {
        Content::Data {
            key,
            shard_hash: !u64::from(key),
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
        let mut s = ObjShard::new(0, 1 << 20);
        let p = vec![7u8; 1000];
        let (a, hit) = id_of(s.obtain(&data(1, &p, true), 0, &budget, None));
        assert!(!hit);
        let (b, hit) = id_of(s.obtain(&data(1, &p, true), 1, &budget, None));
        assert!(hit);
        assert_eq!(a, b);
        assert_eq!(s.slab.get(a).refs(), 2);
        let used = budget.used();
        assert!(!s.release(a, None, &budget));
        assert_eq!(s.live_objects(), 1);
        assert_eq!(budget.used(), used, "one reference left: nothing freed");
        s.release(a, None, &budget);
        assert_eq!(s.live_objects(), 0);
        assert_eq!(s.alloc.garbage(), 0);
        assert_eq!(s.dedup.len(), 0);
        let mut total = Counters::default();
        s.add_stats(|_, c| total.unique_pages += c.unique_pages + c.compr_data_bytes + c.mem_used_bytes);
        assert_eq!(total.unique_pages, 0);
    }

    #[test]
    fn a_record_at_its_reference_limit_gets_a_twin() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let p = [9u8; 300];
        let (a, _) = id_of(s.obtain(&data(3, &p, true), 0, &budget, None));
        s.slab.get_mut(a).set_refs(MAX_REFS - 1);
        assert_eq!(id_of(s.obtain(&data(3, &p, true), 0, &budget, None)), (a, true));
        assert_eq!(s.slab.get(a).refs(), MAX_REFS);
        let (b, hit) = id_of(s.obtain(&data(3, &p, true), 0, &budget, None));
        assert!(!hit && b != a, "a full record takes no more references");
        // Fills too: the zero page is the one most likely to get there.
        let zero = Content::Fill { word: 0, domain: 1 };
        let (f, _) = id_of(s.obtain(&zero, 0, &budget, None));
        s.slab.get_mut(f).set_refs(MAX_REFS);
        let (g, hit) = id_of(s.obtain(&zero, 0, &budget, None));
        assert!(!hit && g != f);
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(g, &mut page, &mut frame, None).unwrap(), Loaded::Fill(0));
        // With one reference released, either copy may take the next one.
        s.release(a, None, &budget);
        let (c, hit) = id_of(s.obtain(&data(3, &p, true), 0, &budget, None));
        assert!(hit && (c == a || c == b));
    }

    #[test]
    fn find_page_decodes_candidates_in_either_tier_and_compares_whole_pages() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i % 7) as u8 ^ (i / 300) as u8;
        }
        let mut frame = [0u8; codec::COMPRESS_BOUND];
        let len = codec::compress(&page, 1, &mut frame).unwrap();
        let (a, _) = id_of(s.obtain(&data(42, &frame[..len], true), 0, &budget, None));
        assert_eq!(s.find_page(42, &page, None), Some(a));
        assert_eq!(s.slab.get(a).refs(), 2);
        // Same key, other bytes: decoded, compared, refused.
        let mut other = page;
        other[4000] ^= 1;
        assert_eq!(s.find_page(42, &other, None), None);
        assert_eq!(s.find_page(43, &page, None), None, "another key is another page");
        // A raw page is compared as it is.
        let noise: Vec<u8> = (0..PAGE_SIZE as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let noise: Page = noise.try_into().unwrap();
        let (r, _) = id_of(s.obtain(&data(7, &noise, true), 0, &budget, None));
        assert_eq!(s.find_page(7, &noise, None), Some(r));
        // Spilled: read back from the file, only with the file at hand.
        while s.evict(&spill, &budget).unwrap() == Evicted::One {}
        assert_eq!(s.slab.get(a).tier(), Tier::Spilled);
        assert_eq!(s.find_page(42, &page, None), None);
        assert_eq!(s.find_page(42, &page, Some(&spill)), Some(a));
        assert_eq!(s.slab.get(a).refs(), 3);
        let mut total = Counters::default();
        s.add_stats(|_, c| total.spilled_pages += c.spilled_pages);
        assert_eq!(
            total.spilled_pages,
            3 + 2,
            "every reference of a spilled object counts"
        );
    }

    #[test]
    fn equal_hash_but_different_bytes_is_not_a_hit() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let (a, _) = id_of(s.obtain(&data(5, &[1u8; 100], true), 0, &budget, None));
        let (b, hit) = id_of(s.obtain(&data(5, &[2u8; 100], true), 0, &budget, None));
        assert!(!hit);
        assert_ne!(a, b);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(b, &mut page, &mut buf, None).unwrap(), Loaded::Frame(100));
        assert_eq!(&buf[..100], &[2u8; 100]);
    }

    #[test]
    fn dedup_off_stores_copies_and_fills_are_shared() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let p = [3u8; 64];
        let (a, _) = id_of(s.obtain(&data(9, &p, false), 0, &budget, None));
        let (b, hit) = id_of(s.obtain(&data(9, &p, false), 0, &budget, None));
        assert!(!hit && a != b);
        let fill = Content::Fill { word: 0, domain: 4 };
        let (f1, _) = id_of(s.obtain(&fill, 4, &budget, None));
        let (f2, hit) = id_of(s.obtain(&fill, 4, &budget, None));
        assert!(hit && f1 == f2);
        let other_domain = Content::Fill { word: 0, domain: 5 };
        assert_ne!(id_of(s.obtain(&other_domain, 5, &budget, None)).0, f1);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(f1, &mut page, &mut buf, None).unwrap(), Loaded::Fill(0));
        assert!(s.release(f1, None, &budget));
    }

    #[test]
    fn budget_refuses_growth_and_counts_exactly() {
        let budget = Budget::new(0);
        let mut s = ObjShard::new(0, 1 << 20);
        assert_eq!(
            s.obtain(&data(1, &[1u8; 500], true), 0, &budget, None),
            Obtained::NeedRoom
        );
        assert_eq!(budget.used(), 0);
        budget.set_limit(1 << 20);
        let (_, _) = id_of(s.obtain(&data(1, &[1u8; 500], true), 0, &budget, None));
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
        let mut s = ObjShard::new(0, 1 << 20);
        let p: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let (a, _) = id_of(s.obtain(&data(11, &p, true), 1, &budget, None));
        s.obtain(&data(11, &p, true), 1, &budget, None);
        // Referenced once on insert: CLOCK spares it on the first pass.
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::One);
        assert_eq!(s.chunk_bytes(), 0, "the payload left RAM");
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(700)
        );
        assert_eq!(&buf[..700], &p[..]);
        // A spilled object is still a dedup candidate, compared from the file.
        let (c, hit) = id_of(s.obtain(&data(11, &p, true), 1, &budget, Some(&spill)));
        assert!(hit && c == a);
        // Without the file to compare against, equal hashes are not enough.
        let (d, hit) = id_of(s.obtain(&data(11, &p, true), 1, &budget, None));
        assert!(!hit && d != a);
        let mut total = Counters::default();
        s.add_stats(|_, c| {
            total.spilled_pages += c.spilled_pages;
            total.spill_reads += c.spill_reads;
        });
        assert_eq!((total.spilled_pages, total.spill_reads), (3, 1));
        for _ in 0..2 {
            s.release(a, Some(&spill), &budget);
            assert!(spill.live_bytes() > 0);
        }
        s.release(a, Some(&spill), &budget);
        assert_eq!(spill.live_bytes(), 0);
        s.release(d, Some(&spill), &budget);
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::NoVictim);
        assert_eq!(s.chunk_bytes(), 0);
    }

    #[test]
    fn compaction_moves_live_payloads_and_frees_chunks() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let payload = |i: u32| -> Vec<u8> { (0..900).map(|k| (i as u8).wrapping_add(k as u8)).collect() };
        let ids: Vec<u32> = (0..800u32)
            .map(|i| id_of(s.obtain(&data(i + 1, &payload(i), true), 0, &budget, None)).0)
            .collect();
        let full = s.chunk_bytes();
        // Free three in four: release() tidies up once holes pass an eighth.
        for (i, &id) in ids.iter().enumerate() {
            if i % 4 != 0 {
                s.release(id, None, &budget);
            }
        }
        while s.garbage() >= CHUNK as u64 && s.compact(&budget) {}
        assert!(s.chunk_bytes() < full / 2, "{} of {full}", s.chunk_bytes());
        assert_eq!(budget.used(), s.heap_bytes());
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        for (i, &id) in ids.iter().enumerate().filter(|(i, _)| i % 4 == 0) {
            assert_eq!(
                s.load(id, &mut page, &mut frame, None).unwrap(),
                Loaded::Frame(900)
            );
            assert_eq!(&frame[..900], &payload(i as u32)[..]);
        }
        // Moved payloads are still found by dedup.
        let (again, hit) = id_of(s.obtain(&data(1, &payload(0), true), 0, &budget, None));
        assert!(hit && again == ids[0]);
    }

    #[test]
    fn full_tier_keeps_the_object_in_ram() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 0).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20);
        let (a, _) = id_of(s.obtain(&data(1, &[5u8; 300], true), 0, &budget, None));
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::TierFull);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(300)
        );
        assert_eq!(&buf[..300], &[5u8; 300]);
    }
}
