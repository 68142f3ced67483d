//! One object shard: stored contents, their dedup table, the RAM chunks that
//! hold their payloads, and the per-owner object counters.
//!
//! An object is one stored content, referenced by any number of index entries.
//! Same-filled pages are objects too (metadata only), so an index entry is
//! always one 32-bit handle. Objects are placed in a shard by content hash, so
//! identical pages meet in the same shard and its dedup table.
//!
//! The caller holds the shard's lock around every call. Spill reads for an
//! object happen under that lock: it is the slow path, and it keeps the
//! object from being freed (and its file slot reused) during the read. A
//! writeback is split in two calls ([`ObjShard::begin_evict`],
//! [`ObjShard::end_evict`]) so that its file write runs without the lock.

use std::sync::Arc;

use hashbrown::HashMap;

use super::{
    alloc::{ChunkAlloc, Loc, CHUNK, HDR},
    budget::Budget,
    codec::{self, Decoder},
    dedup::{self, DedupTable},
    dict::Dict,
    keys::Keys,
    owners::{ObjCounters, Owners},
    share::Mask,
    slab::{Codec, Obj, Slab, Tier, FILL_KEY_MASK, INDEXED, MAX_REFS, REFERENCED, WARM},
    spill::{units_for, Label, SpillFile, UNIT},
    Page, StoreError, PAGE_SIZE,
};

/// Most candidates (stored objects whose record key matches) one put
/// compares with its page. Past it the page is stored without dedup and
/// left out of the dedup table, so no chain grows past it either: a guest
/// that finds (or forges) many pages with one key costs itself its dedup,
/// and each of its puts at most this many compares under the shard lock.
/// With keyed 32-bit keys a second candidate is a one-in-4-billion event.
pub const MAX_CANDIDATES: u32 = 4;
/// Payload bytes one compaction call moves at most, under the shard lock:
/// four raw pages, about 2 µs of copying.
pub const COMPACT_STEP: usize = 16 << 10;

/// Who stores: the object's owner, and whether only that guest's objects
/// may be its twins (the `Guest` and `Off` dedup domains).
#[derive(Clone, Copy, Debug)]
pub struct By {
    pub guest: u32,
    pub pool: u32,
    pub private: bool,
    /// The guest has reserved room: its metadata may go past the budget, and
    /// its payloads spill into its own part of the file.
    pub reserved: bool,
}

/// What a dedup lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A twin, on which a reference was taken.
    Hit(u32),
    Miss,
    /// [`MAX_CANDIDATES`] compared without a match: store without dedup.
    TooMany,
}

/// What a put wants stored.
pub enum Content<'a> {
    Fill {
        word: u64,
        /// `Keys::fill(word, domain)`: record key and shard. The domain
        /// itself is not kept: see [`Obj::fill_private`].
        hash: u64,
    },
    /// `payload` is a frame in `codec` (zstd or lz4), or the page itself
    /// when `PAGE_SIZE` long. `key` is the low 32 bits of its 128-bit
    /// content hash, the only part the record keeps: bytes are compared
    /// before any hit.
    Data {
        key: u32,
        codec: Codec,
        /// The high half of the hash, which chose the shard.
        shard_hash: u64,
        payload: &'a [u8],
        /// Most candidates its lookup may compare: what the put's lookup
        /// before compression left of [`MAX_CANDIDATES`]. 0: stored without
        /// dedup (dedup off, or that lookup used them all).
        candidates: u32,
        /// The page itself, when the caller has it. A twin stored by another
        /// put after this put's first lookup, and recompressed before this
        /// one's, is in another encoding: it is then decoded and compared
        /// whole, so the race does not cost a second copy.
        page: Option<&'a Page>,
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
    /// The first `len` bytes of the frame buffer hold a frame to decode so.
    Frame(usize, Decoder),
}

/// A cold object the recompressor copied out, to re-encode with no lock
/// held; [`ObjShard::swap_payload`] checks that it is still the same.
#[derive(Clone, Copy, Debug)]
pub struct Cold {
    pub id: u32,
    pub key: u32,
    pub owner: u16,
    /// The guest that owns it (its dictionary domain follows).
    pub guest: u32,
    pub codec: Codec,
    pub slot: u8,
    pub len: usize,
}

/// Objects by how their payload is encoded, for the stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodecCounts {
    pub raw: u64,
    pub zstd: u64,
    pub lz4: u64,
    pub dict: u64,
    /// Payloads the recompressor re-encoded, and lz4 payloads it left as
    /// they were because zstd did not make them smaller.
    pub recompressed: u64,
    pub kept: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Evicted {
    /// One object went to the file.
    One,
    /// No RAM object fits the request.
    NoVictim,
    /// The spill tier is full (limit or ENOSPC).
    TierFull,
    /// No victim, but another writeback is under way in a shard that had
    /// none to offer: room is coming.
    Busy,
}

/// A writeback under way: the object, its payload length and its slot's label.
#[derive(Debug)]
pub struct Writing {
    id: u32,
    len: usize,
    label: Label,
    /// Its owner, whose part of the file it goes to.
    guest: u32,
}

impl Writing {
    /// Bytes of payload to write.
    pub fn payload_len(&self) -> usize {
        self.len
    }

    /// What the slot is sealed under.
    pub fn label(&self) -> Label {
        self.label
    }

    /// The guest whose part of the spill file it goes to.
    pub fn guest(&self) -> u32 {
        self.guest
    }
}

pub struct ObjShard {
    slab: Slab,
    dedup: DedupTable,
    alloc: ChunkAlloc,
    /// Owner records: object counters by (guest, pool).
    owners: Owners,
    /// Candidates compared by dedup lookups, and lookups that gave up at
    /// [`MAX_CANDIDATES`].
    compared: u64,
    too_many: u64,
    /// Bytes this shard has counted in the budget.
    counted: u64,
    /// Objects with a payload in RAM: writeback gives up at once when none.
    in_ram: u32,
    /// After a compaction finds no sparse chunk, garbage must reach this
    /// before the next try, so a shard with thinly spread holes is not
    /// rescanned on every free.
    compact_floor: u64,
    /// The chunk a compaction stopped in after [`COMPACT_STEP`] bytes.
    draining: Option<u32>,
    /// The object whose payload is being written to the file with the
    /// lock released (see [`ObjShard::begin_evict`]), and whether its last
    /// reference went meanwhile.
    writing: Option<u32>,
    cancelled: bool,
    max_ids: u32,
    /// This shard's part of an object handle: handle = `handle_base | id`.
    handle_base: u32,
    /// The dictionaries this shard's objects were encoded with, by (owner
    /// guest, slot), and how many objects use each: the last one's release
    /// drops the reference, so the store can free a retired dictionary.
    dicts: HashMap<(u32, u8), (Arc<Dict>, u32)>,
    /// Objects by encoding: raw, then by [`Codec`].
    by_codec: [u64; 5],
    recompressed: u64,
    kept: u64,
    /// Where the recompressor's hand is in the slab.
    warm_hand: u32,
}

impl ObjShard {
    /// A shard whose objects' handles are `handle_base | id`, with ids below `max_ids`.
    pub fn new(handle_base: u32, max_ids: u32, keys: &Keys) -> Self {
        ObjShard {
            slab: Slab::new(),
            dedup: DedupTable::new(),
            alloc: ChunkAlloc::new(),
            owners: Owners::new(keys.map_hasher()),
            compared: 0,
            too_many: 0,
            counted: 0,
            in_ram: 0,
            compact_floor: 0,
            draining: None,
            writing: None,
            cancelled: false,
            // A dedup slot holds the id in 26 bits.
            max_ids: max_ids.min(dedup::MAX_IDS),
            handle_base,
            dicts: HashMap::new(),
            by_codec: [0; 5],
            recompressed: 0,
            kept: 0,
            warm_hand: 0,
        }
    }

    /// What the spill file binds the slot of object `id` to: a slot opens only
    /// for the object that wrote it.
    fn label(&self, id: u32, key: u32) -> Label {
        Label {
            handle: self.handle_base | id,
            key,
        }
    }

    /// Bytes of RAM chunks (payloads, their headers, holes and tails).
    pub fn chunk_bytes(&self) -> u64 {
        self.alloc.chunk_bytes()
    }

    pub fn heap_bytes(&self) -> u64 {
        self.dicts.allocation_size() as u64
            + self.dedup.heap_bytes()
            + self.slab.heap_bytes()
            + self.alloc.heap_bytes()
            + self.owners.heap_bytes()
    }

    /// Metadata bytes held here for one guest (see [`obj_meta`] and
    /// [`super::owners::OWNER_META`]).
    pub fn guest_meta(&self, guest: u32) -> u64 {
        self.owners.guest_meta(guest)
    }

    /// Candidates compared so far, and lookups that stopped at the bound.
    pub fn dedup_compares(&self) -> (u64, u64) {
        (self.compared, self.too_many)
    }

    /// Records handed out so far, live or free (one lap of a sweep).
    pub fn records(&self) -> u32 {
        self.slab.high_water()
    }

    pub fn live_objects(&self) -> u32 {
        self.slab.live()
    }

    /// Bytes the dedup table grows by on an insert of `key`.
    fn dedup_growth(&self, dedup: bool, key: u32) -> u64 {
        if dedup {
            self.dedup.growth(key)
        } else {
            0
        }
    }

    fn settle(&mut self, budget: &Budget) {
        let now = self.heap_bytes();
        budget.settle(&mut self.counted, now);
    }

    /// The counters object `id` counts in (its owner's).
    fn counters(&mut self, id: u32) -> &mut ObjCounters {
        let owner = self.slab.get(id).owner();
        self.owners.counters(owner, id)
    }

    /// The guest that created object `id` (its account pays for it).
    fn guest_of(&self, id: u32) -> u32 {
        self.owners
            .guest_of(self.slab.get(id).owner(), id)
            .unwrap_or(u32::MAX)
    }

    /// A new record for `obj`, with one reference, owned by `by`; its
    /// metadata goes on `by`'s guest's account.
    fn insert_obj(&mut self, obj: Obj, by: By, budget: &Budget) -> u32 {
        self.count_codec(&obj, true);
        let before = self.owners.guest_meta(by.guest);
        let id = self.slab.insert(obj);
        let owner = self.owners.acquire(by.guest, by.pool, id);
        self.slab.get_mut(id).set_owner(owner);
        let meta = obj_meta(obj.tier(), obj.has(INDEXED));
        self.owners.charge(owner, id, meta, true);
        let after = self.owners.guest_meta(by.guest);
        budget.shares().ram(by.guest, after as i64 - before as i64);
        id
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
        by: By,
        budget: &Budget,
        spill: Option<&SpillFile>,
    ) -> Obtained {
        let (key, limit) = content_key(content);
        let dedup = match self.lookup(content, by, spill) {
            Found::Hit(id) => return Obtained::Ref { id, hit: true },
            Found::Miss => limit > 0,
            Found::TooMany => false,
        };
        let payload_len = match *content {
            Content::Fill { .. } => 0,
            Content::Data { payload, .. } => payload.len(),
        };
        let alloc_growth = if payload_len > 0 {
            self.alloc.growth_for(payload_len)
        } else {
            0
        };
        let growth = (alloc_growth + self.slab.growth()) as u64
            + self.dedup_growth(dedup, key)
            + self.owners.growth(by.guest, by.pool);
        // New chunks for puts leave one chunk of headroom, for compaction to move into.
        let keep = if alloc_growth > 0 { CHUNK as u64 } else { 0 };
        if !self.slab.has_room(self.max_ids) || (alloc_growth > 0 && !self.alloc.can_grow()) {
            return Obtained::NeedRoom;
        }
        // A reserved guest's metadata alone (a fill, or a twin's record) is
        // never refused; its payloads still wait for room or go to the file.
        let fits = if by.reserved && alloc_growth == 0 {
            budget.reserve(growth, true)
        } else {
            budget.try_reserve_leaving(growth, keep)
        };
        if !fits {
            return Obtained::NeedRoom;
        }
        self.counted += growth;

        let tier = match content {
            Content::Fill { .. } => Tier::Fill,
            Content::Data { .. } => Tier::Ram,
        };
        let flags = REFERENCED | WARM | if dedup { INDEXED } else { 0 };
        let obj = match *content {
            Content::Data { codec, .. } => {
                let mut obj = Obj::new(key, tier, payload_len, 0, flags);
                obj.set_codec(codec, 0);
                obj
            }
            Content::Fill { word, .. } => Obj::fill(key, word, 0, flags, by.private),
        };
        let id = self.insert_obj(obj, by, budget);
        match *content {
            Content::Data { payload, .. } => {
                let loc = self.alloc.alloc(payload.len(), id);
                self.alloc.bytes_mut(loc, payload.len()).copy_from_slice(payload);
                self.slab.get_mut(id).set_loc(loc.pack());
            }
            Content::Fill { .. } => {}
        }
        if dedup {
            let slab = &self.slab;
            self.dedup.insert(key, id, |i| slab.get(i).key());
        }
        if tier == Tier::Ram {
            self.in_ram += 1;
        }
        let ram = obj_ram_bytes(tier, payload_len);
        budget.shares().ram(by.guest, ram as i64);
        budget.shares().payload(by.guest, ram as i64);
        let c = self.counters(id);
        c.mem_used_bytes += ram;
        if tier == Tier::Ram {
            c.unique_pages += 1;
            c.compr_data_bytes += payload_len as u64;
        }
        self.settle(budget);
        Obtained::Ref { id, hit: false }
    }

    /// Finds an object equal to `content` and takes a reference on it,
    /// comparing at most [`MAX_CANDIDATES`].
    fn lookup(&mut self, content: &Content<'_>, by: By, spill: Option<&SpillFile>) -> Found {
        let (key, limit) = content_key(content);
        if limit == 0 {
            return Found::Miss;
        }
        let (found, _) = self.candidates(key, by, limit, |shard, id, o| match *content {
            // The domain is the owner's guest's in a private domain (which
            // candidates() checks), and the one shared domain otherwise.
            Content::Fill { word, .. } => {
                o.tier() == Tier::Fill && o.fill_word() == word && o.fill_private() == by.private
            }
            // Equal frames are equal pages only in the same codec (a raw page is
            // the page whatever its record says).
            Content::Data { payload, codec, .. }
                if o.len() == payload.len() && (o.is_raw() || o.codec() == codec) =>
            {
                let mut read = [0u8; PAGE_SIZE];
                shard.candidate_payload(id, o, spill, &mut read) == Some(payload)
            }
            Content::Data { page: Some(page), .. } => shard.holds_page(id, o, spill, page),
            Content::Data { page: None, .. } => false,
        });
        if let Found::Hit(id) = found {
            self.take_ref(id);
        }
        found
    }

    /// Walks the dedup table's entries with record key `key`, calling
    /// `equal` on each that may be a twin (not at its reference limit, and
    /// `by`'s guest's own when the domain is private), until one is equal or
    /// `limit` have been looked at. Returns how many were.
    fn candidates(
        &mut self,
        key: u32,
        by: By,
        limit: u32,
        mut equal: impl FnMut(&Self, u32, &Obj) -> bool,
    ) -> (Found, u32) {
        let mut compared = 0;
        let mut found = Found::Miss;
        for id in self.dedup.candidates(key) {
            let o = self.slab.get(id);
            if o.key() != key {
                continue;
            }
            if compared == limit {
                found = Found::TooMany;
                break;
            }
            compared += 1;
            // A record at its reference limit is passed over: the page gets a new copy.
            if o.refs() == MAX_REFS || (by.private && self.owners.guest_of(o.owner(), id) != Some(by.guest)) {
                continue;
            }
            if equal(self, id, o) {
                found = Found::Hit(id);
                break;
            }
        }
        self.compared += u64::from(compared);
        self.too_many += u64::from(found == Found::TooMany);
        (found, compared)
    }

    /// Finds an object holding exactly `page`, before the page is compressed:
    /// candidates share its key (the low bits of a keyed hash of the page),
    /// and each is decoded (read back from the file if spilled) and compared
    /// whole. Takes a reference on the one found. A read or decode that fails
    /// counts as "not equal".
    ///
    /// The decode runs under this shard's lock, for at most
    /// [`MAX_CANDIDATES`] candidates; with a keyed hash all but about one in
    /// 4 billion of them are true twins.
    /// Returns what it found and how many candidates it compared.
    pub fn find_page(&mut self, key: u32, page: &Page, by: By, spill: Option<&SpillFile>) -> (Found, u32) {
        let (found, compared) = self.candidates(key, by, MAX_CANDIDATES, |shard, id, o| {
            shard.holds_page(id, o, spill, page)
        });
        if let Found::Hit(id) = found {
            self.take_ref(id);
        }
        (found, compared)
    }

    /// Whether object `id` (record `o`) holds exactly `page`: its payload
    /// decoded, read back from the file if spilled, and compared whole. A
    /// read or decode that fails counts as "not equal".
    fn holds_page(&self, id: u32, o: &Obj, spill: Option<&SpillFile>, page: &Page) -> bool {
        let mut read = [0u8; PAGE_SIZE];
        let Some(payload) = self.candidate_payload(id, o, spill, &mut read) else {
            return false;
        };
        if o.is_raw() {
            return payload == &page[..];
        }
        let Some(how) = self.decoder(id, o) else {
            return false;
        };
        let mut decoded = [0u8; PAGE_SIZE];
        codec::decode_frame(payload, &how, &mut decoded).is_ok() && decoded == *page
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
                    .read(o.loc() * UNIT, len, self.label(id, o.key()), &mut read[..])
                    .ok()?;
                Some(&read[..len])
            }
            Tier::Fill | Tier::Free => None,
        }
    }

    /// How the frame of object `id` decodes; `None` for a dictionary this
    /// shard does not hold (never, while the object lives).
    fn decoder(&self, id: u32, o: &Obj) -> Option<Decoder> {
        Some(match o.codec() {
            Codec::Zstd => Decoder::Zstd,
            Codec::Lz4 | Codec::Lz4Kept => Decoder::Lz4,
            Codec::Dict => {
                let guest = self.owners.guest_of(o.owner(), id)?;
                Decoder::Dict(Arc::clone(&self.dicts.get(&(guest, o.dict_slot()))?.0))
            }
        })
    }

    fn count_codec(&mut self, o: &Obj, add: bool) {
        if o.tier() == Tier::Fill {
            return;
        }
        let at = if o.is_raw() { 0 } else { 1 + o.codec() as usize };
        if add {
            self.by_codec[at] += 1;
        } else {
            self.by_codec[at] -= 1;
        }
    }

    /// Objects by encoding, and the recompressor's work here.
    pub fn codec_counts(&self) -> CodecCounts {
        let [raw, zstd, lz4, dict, kept_now] = self.by_codec;
        CodecCounts {
            raw,
            zstd,
            lz4: lz4 + kept_now,
            dict,
            recompressed: self.recompressed,
            kept: self.kept,
        }
    }

    /// One more reference on `id`, which a put just matched.
    fn take_ref(&mut self, id: u32) {
        let o = self.slab.get_mut(id);
        o.set_refs(o.refs() + 1);
        o.set(REFERENCED | WARM, true);
        if o.tier() == Tier::Spilled {
            self.counters(id).spilled_pages += 1;
        }
    }

    /// Stores a new page straight into the spill file, for when RAM has no
    /// room and nothing in it can be moved out: the record still takes RAM,
    /// the payload does not. `NeedRoom` means the file is full too.
    pub fn obtain_spilled(
        &mut self,
        content: &Content<'_>,
        by: By,
        budget: &Budget,
        spill: &SpillFile,
    ) -> Result<Obtained, StoreError> {
        let Content::Data {
            key, payload, codec, ..
        } = *content
        else {
            return Ok(self.obtain(content, by, budget, Some(spill)));
        };
        let dedup = match self.lookup(content, by, Some(spill)) {
            Found::Hit(id) => return Ok(Obtained::Ref { id, hit: true }),
            Found::Miss => content_key(content).1 > 0,
            Found::TooMany => false,
        };
        let growth =
            self.dedup_growth(dedup, key) + self.slab.growth() as u64 + self.owners.growth(by.guest, by.pool);
        if !self.slab.has_room(self.max_ids) || !budget.reserve(growth, by.reserved) {
            return Ok(Obtained::NeedRoom);
        }
        self.counted += growth;
        // The record is inserted after the write; nothing else takes an id in between.
        let id = self.slab.next_id();
        let Some(offset) = spill.write_for(by.guest, payload, self.label(id, key))? else {
            budget.shares().set_spill_full();
            self.settle(budget);
            return Ok(Obtained::NeedRoom);
        };
        let flags = REFERENCED | WARM | if dedup { INDEXED } else { 0 };
        let mut obj = Obj::new(key, Tier::Spilled, payload.len(), 0, flags);
        obj.set_codec(codec, 0);
        obj.set_loc(offset / UNIT);
        let inserted = self.insert_obj(obj, by, budget);
        debug_assert_eq!(inserted, id);
        if dedup {
            let slab = &self.slab;
            self.dedup.insert(key, id, |i| slab.get(i).key());
        }
        let c = self.counters(id);
        c.mem_used_bytes += obj_ram_bytes(Tier::Spilled, payload.len());
        c.unique_pages += 1;
        c.compr_data_bytes += payload.len() as u64;
        c.spilled_pages += 1;
        let slot = units_for(payload.len()) as u64 * UNIT;
        c.spill_file_bytes += slot;
        c.spill_writes += 1;
        budget.shares().spill(by.guest, slot as i64);
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
            self.counters(id).spilled_pages -= 1;
        }
        if obj.refs() > 0 {
            return fill;
        }
        if self.writing == Some(id) {
            self.cancelled = true;
        }
        if obj.has(INDEXED) {
            let slab = &self.slab;
            self.dedup.remove(obj.key(), id, |i| slab.get(i).key());
        }
        self.count_codec(&obj, false);
        if obj.codec() == Codec::Dict && !obj.is_raw() {
            self.drop_dict_user(obj.owner(), id, obj.dict_slot());
        }
        let len = obj.len();
        let guest = self.guest_of(id);
        let shares = budget.shares();
        match obj.tier() {
            Tier::Ram => {
                self.alloc.free(Loc::unpack(obj.loc()), len);
                self.in_ram -= 1;
            }
            Tier::Spilled => {
                if let Some(spill) = spill {
                    spill.free(obj.loc() * UNIT, len);
                    shares.spill_freed();
                }
            }
            Tier::Fill | Tier::Free => {}
        }
        let ram = obj_ram_bytes(obj.tier(), len);
        let slot = if obj.tier() == Tier::Spilled {
            units_for(len) as u64 * UNIT
        } else {
            0
        };
        let c = self.counters(id);
        c.mem_used_bytes -= ram;
        if obj.tier() != Tier::Fill {
            c.unique_pages -= 1;
            c.compr_data_bytes -= len as u64;
        }
        c.spill_file_bytes -= slot;
        let meta_before = self.owners.guest_meta(guest);
        self.owners
            .charge(obj.owner(), id, obj_meta(obj.tier(), obj.has(INDEXED)), false);
        self.owners.release(obj.owner(), id);
        let meta_freed = meta_before - self.owners.guest_meta(guest);
        shares.ram(guest, -((ram + meta_freed) as i64));
        shares.payload(guest, -(ram as i64));
        shares.spill(guest, -(slot as i64));
        self.slab.remove(id);
        if self.slab.live() == 0 {
            // Empty: give every table back, so the store returns to its start.
            self.slab = Slab::new();
            self.dedup = DedupTable::new();
            self.alloc = ChunkAlloc::new();
            self.dicts = HashMap::new();
            self.compact_floor = 0;
            self.draining = None;
            self.warm_hand = 0;
        } else {
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

    /// Moves live payloads of the sparsest chunk into the open chunks, at
    /// most [`COMPACT_STEP`] bytes a call, and frees the chunk once they are
    /// all out. Returns whether it made progress (moved a payload or freed a
    /// chunk); callers loop, and the shard lock they drop between calls lets
    /// gets and puts of other guests in: a whole chunk's move, with its page
    /// faults, held it for tens of microseconds.
    pub fn compact(&mut self, budget: &Budget) -> bool {
        if self.alloc.garbage() < self.compact_floor {
            return false;
        }
        // Finish the chunk a bounded call left part-drained before looking
        // over every chunk for the sparsest again.
        let draining = self.draining.take().filter(|&id| self.alloc.closed(id));
        let Some(src) = draining.or_else(|| self.alloc.sparsest()) else {
            self.compact_floor = self.alloc.garbage() + CHUNK as u64;
            return false;
        };
        self.compact_floor = 0;
        let mut from = 0;
        let mut done = true;
        let mut moved = 0;
        while let Some((id, loc)) = self.alloc.next_live(src, from) {
            let len = self.slab.get(id).len();
            if moved >= COMPACT_STEP {
                self.draining = Some(src);
                done = false;
                break;
            }
            let growth = self.alloc.growth_for(len) as u64;
            if (growth > 0 && !self.alloc.can_grow()) || !budget.try_reserve(growth) {
                done = false;
                break;
            }
            self.counted += growth;
            from = loc.off + len as u32;
            let to = self.alloc.relocate(loc, len, id);
            self.slab.get_mut(id).set_loc(to.pack());
            moved += len;
        }
        self.settle(budget);
        done || moved > 0
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
        o.set(REFERENCED | WARM, true);
        let obj = *o;
        let len = obj.len();
        let (dest, loaded) = if obj.is_raw() || obj.tier() == Tier::Fill {
            (&mut page[..], Loaded::Raw)
        } else {
            let how = self
                .decoder(id, &obj)
                .ok_or(StoreError::Corrupt { offset: u64::MAX })?;
            (frame, Loaded::Frame(len, how))
        };
        match obj.tier() {
            Tier::Fill => Ok(Loaded::Fill(obj.fill_word())),
            Tier::Ram => {
                dest[..len].copy_from_slice(self.alloc.bytes(Loc::unpack(obj.loc()), len));
                Ok(loaded)
            }
            Tier::Spilled => {
                let offset = obj.loc() * UNIT;
                let spill = spill.ok_or(StoreError::Corrupt { offset })?;
                self.counters(id).spill_reads += 1;
                spill.read(offset, len, self.label(id, obj.key()), &mut dest[..])?;
                Ok(loaded)
            }
            Tier::Free => Err(StoreError::Corrupt { offset: u64::MAX }),
        }
    }

    /// Writes one cold RAM object to the spill file. Its RAM becomes a hole,
    /// which compaction turns into free host memory.
    #[cfg(test)]
    pub fn evict(&mut self, spill: &SpillFile, budget: &Budget) -> Result<Evicted, StoreError> {
        self.evict_of(spill, budget, None)
    }

    /// [`ObjShard::evict`], or with `prefer`, the coldest object of one of
    /// those guests among the next `scan` records the CLOCK hand passes:
    /// other guests' records are passed over with their referenced bits
    /// left alone. The bound keeps a guest that holds few RAM objects (or
    /// only metadata) from making each call walk the whole shard.
    #[cfg(test)]
    pub fn evict_of(
        &mut self,
        spill: &SpillFile,
        budget: &Budget,
        prefer: Option<(&Mask, usize)>,
    ) -> Result<Evicted, StoreError> {
        let mut buf = [0u8; PAGE_SIZE];
        let Some(pick) = self.begin_evict(prefer, &mut buf) else {
            return Ok(Evicted::NoVictim);
        };
        let written = spill.write_for(pick.guest, &buf[..pick.len], pick.label);
        self.end_evict(pick, written, spill, budget)
    }

    /// The first half of a writeback, under the lock: picks the victim (as
    /// [`ObjShard::evict_of`] says) and copies its payload into `buf`. The
    /// caller writes it to the file with the lock released, so guests'
    /// gets and puts on this shard do not wait for the file, then calls
    /// [`ObjShard::end_evict`]. One writeback at a time per shard: while
    /// one is out, this finds no victim here (see [`ObjShard::writing`]).
    pub fn begin_evict(
        &mut self,
        prefer: Option<(&Mask, usize)>,
        buf: &mut [u8; PAGE_SIZE],
    ) -> Option<Writing> {
        if self.in_ram == 0 || self.writing.is_some() {
            return None;
        }
        let id = match prefer {
            None => {
                let scan = 2 * self.slab.high_water() as usize + 1;
                self.slab.next_victim(scan, |_, _| true)
            }
            Some((mask, scan)) => {
                let owners = &self.owners;
                self.slab.next_victim(scan, |id, o| {
                    owners.guest_of(o.owner(), id).is_some_and(|g| mask.contains(g))
                })
            }
        }?;
        let obj = *self.slab.get(id);
        let len = obj.len();
        buf[..len].copy_from_slice(self.alloc.bytes(Loc::unpack(obj.loc()), len));
        self.writing = Some(id);
        self.cancelled = false;
        Some(Writing {
            id,
            len,
            label: self.label(id, obj.key()),
            // A blk guest's objects go to its own part of the file.
            guest: self.owners.guest_of(obj.owner(), id).unwrap_or(u32::MAX),
        })
    }

    /// Whether a writeback of this shard is under way.
    pub fn writing(&self) -> bool {
        self.writing.is_some()
    }

    /// The second half: the write's outcome. The object may have been
    /// freed meanwhile (its last reference dropped): then the slot just
    /// written goes back. It may have been read, referenced again or moved
    /// by compaction: its record is read afresh.
    pub fn end_evict(
        &mut self,
        pick: Writing,
        written: Result<Option<u64>, StoreError>,
        spill: &SpillFile,
        budget: &Budget,
    ) -> Result<Evicted, StoreError> {
        debug_assert_eq!(self.writing, Some(pick.id));
        self.writing = None;
        let cancelled = std::mem::take(&mut self.cancelled);
        let Some(offset) = written? else {
            budget.shares().set_spill_full();
            return Ok(Evicted::TierFull);
        };
        if cancelled {
            spill.free(offset, pick.len);
            // Its RAM was freed all the same.
            return Ok(Evicted::One);
        }
        let id = pick.id;
        let obj = *self.slab.get(id);
        let len = obj.len();
        debug_assert_eq!((obj.tier(), len), (Tier::Ram, pick.len));
        self.alloc.free(Loc::unpack(obj.loc()), len);
        // It stays in the dedup table: equal pages still find it, in the file.
        let o = self.slab.get_mut(id);
        o.set_tier(Tier::Spilled);
        self.in_ram -= 1;
        o.set_loc(offset / UNIT);
        let guest = self.guest_of(id);
        let freed = obj_ram_bytes(Tier::Ram, len) - obj_ram_bytes(Tier::Spilled, len);
        let slot = units_for(len) as u64 * UNIT;
        budget.shares().ram(guest, -(freed as i64));
        budget.shares().payload(guest, -(freed as i64));
        budget.shares().spill(guest, slot as i64);
        let c = self.counters(id);
        c.mem_used_bytes -= freed;
        c.spilled_pages += u64::from(obj.refs());
        c.spill_file_bytes += slot;
        c.spill_writes += 1;
        c.writebacks += u64::from(obj.refs());
        self.settle(budget);
        Ok(Evicted::One)
    }

    fn drop_dict_user(&mut self, owner: u16, id: u32, slot: u8) {
        let Some(guest) = self.owners.guest_of(owner, id) else {
            return;
        };
        if let Some((_, users)) = self.dicts.get_mut(&(guest, slot)) {
            *users -= 1;
            if *users == 0 {
                self.dicts.remove(&(guest, slot));
            }
        }
    }

    /// Objects here that use a dictionary (for tests of retirement).
    #[cfg(test)]
    pub fn dict_users(&self) -> u32 {
        self.dicts.values().map(|&(_, users)| users).sum()
    }

    /// The recompressor's sweep: walks at most `scan` records from its own
    /// hand, clearing [`WARM`] on each RAM object it passes; an object found
    /// without it has not been used since the last sweep (it is cold), and
    /// if `wants` it, its record goes to `out` and its payload to the end of
    /// `bytes`. Stops at `max` objects. Returns how many records it looked
    /// at, and how many objects it found warm (and cooled).
    pub fn cold_batch(
        &mut self,
        max: usize,
        scan: usize,
        mut wants: impl FnMut(u32, &Obj) -> bool,
        out: &mut Vec<Cold>,
        bytes: &mut Vec<u8>,
    ) -> (usize, usize) {
        let high = self.slab.high_water();
        let (mut looked, mut cooled) = (0, 0);
        while looked < scan.min(high as usize) && out.len() < max {
            looked += 1;
            let id = self.warm_hand;
            self.warm_hand = if id + 1 >= high { 0 } else { id + 1 };
            let o = self.slab.get_mut(id);
            if o.tier() != Tier::Ram || o.is_raw() {
                continue;
            }
            if o.has(WARM) {
                o.set(WARM, false);
                cooled += 1;
                continue;
            }
            let o = *o;
            let Some(guest) = self.owners.guest_of(o.owner(), id) else {
                continue;
            };
            if !wants(guest, &o) {
                continue;
            }
            bytes.extend_from_slice(self.alloc.bytes(Loc::unpack(o.loc()), o.len()));
            out.push(Cold {
                id,
                key: o.key(),
                owner: o.owner(),
                guest,
                codec: o.codec(),
                slot: o.dict_slot(),
                len: o.len(),
            });
        }
        (looked, cooled)
    }

    /// Whether object `cold.id` is still the one [`ObjShard::cold_batch`]
    /// copied out: in RAM, same key, owner and encoding, and the same payload
    /// bytes. Meanwhile it may have been got, released and its id reused, or
    /// moved by compaction (same bytes elsewhere: still the same object).
    fn still(&self, cold: &Cold, old: &[u8]) -> bool {
        // An emptied shard starts a new slab: the id may be past its end.
        if cold.id >= self.slab.high_water() {
            return false;
        }
        let o = self.slab.get(cold.id);
        o.tier() == Tier::Ram
            && o.key() == cold.key
            && o.owner() == cold.owner
            && o.codec() == cold.codec
            && o.dict_slot() == cold.slot
            && o.len() == cold.len
            && old.len() == cold.len
            && self.owners.guest_of(o.owner(), cold.id) == Some(cold.guest)
            && self.alloc.bytes(Loc::unpack(o.loc()), o.len()) == old
    }

    /// Replaces the payload of `cold.id` by `new`, encoded with `codec` (and
    /// `dict`, in `slot` of the owner's domain), if the object is still the
    /// one whose payload was `old`. False when it changed meanwhile, or the
    /// budget has no room for the new payload: nothing is touched then.
    #[allow(clippy::too_many_arguments)]
    pub fn swap_payload(
        &mut self,
        cold: &Cold,
        old: &[u8],
        new: &[u8],
        codec: Codec,
        slot: u8,
        dict: Option<&Arc<Dict>>,
        budget: &Budget,
    ) -> bool {
        // A writeback copied this payload out and is writing it to the
        // file with the lock released; its end takes the record as it left
        // it. Swapping now would leave the file holding the old encoding
        // under the new one's codec and length.
        if self.writing == Some(cold.id) {
            return false;
        }
        if !self.still(cold, old) || new.is_empty() || new.len() >= PAGE_SIZE {
            return false;
        }
        if let (Codec::Dict, Some(dict)) = (codec, dict) {
            // A slot holds one dictionary while any object here names it.
            if let Some((held, _)) = self.dicts.get(&(cold.guest, slot)) {
                if !Arc::ptr_eq(held, dict) {
                    return false;
                }
            }
        } else if codec == Codec::Dict {
            return false;
        }
        let growth = (self.alloc.growth_for(new.len()) + self.dicts_growth(codec, cold.guest, slot)) as u64;
        if (growth > 0 && !self.alloc.can_grow()) || !budget.try_reserve(growth) {
            return false;
        }
        self.counted += growth;
        let obj = *self.slab.get(cold.id);
        let from = Loc::unpack(obj.loc());
        let to = self.alloc.alloc(new.len(), cold.id);
        self.alloc.bytes_mut(to, new.len()).copy_from_slice(new);
        self.alloc.free(from, obj.len());
        self.count_codec(&obj, false);
        if obj.codec() == Codec::Dict {
            self.drop_dict_user(obj.owner(), cold.id, obj.dict_slot());
        }
        if let (Codec::Dict, Some(dict)) = (codec, dict) {
            self.dicts
                .entry((cold.guest, slot))
                .or_insert_with(|| (Arc::clone(dict), 0))
                .1 += 1;
        }
        let o = self.slab.get_mut(cold.id);
        o.set_loc(to.pack());
        o.set_len(new.len());
        o.set_codec(codec, slot);
        let o = *o;
        self.count_codec(&o, true);
        // The owner's account follows its payload's size, as the stats do.
        let delta = obj_ram_bytes(Tier::Ram, new.len()) as i64 - obj_ram_bytes(Tier::Ram, obj.len()) as i64;
        let guest = self.guest_of(cold.id);
        budget.shares().ram(guest, delta);
        budget.shares().payload(guest, delta);
        let c = self.counters(cold.id);
        c.compr_data_bytes = c.compr_data_bytes + new.len() as u64 - obj.len() as u64;
        c.mem_used_bytes =
            c.mem_used_bytes + obj_ram_bytes(Tier::Ram, new.len()) - obj_ram_bytes(Tier::Ram, obj.len());
        self.recompressed += 1;
        self.tidy(budget);
        self.settle(budget);
        true
    }

    fn dicts_growth(&self, codec: Codec, guest: u32, slot: u8) -> usize {
        if codec == Codec::Dict
            && !self.dicts.contains_key(&(guest, slot))
            && self.dicts.len() == self.dicts.capacity()
        {
            self.dicts.allocation_size().max(256)
        } else {
            0
        }
    }

    /// Marks an lz4 object that zstd could not shrink, so it is not tried
    /// again (if it is still the one copied out).
    pub fn keep_lz4(&mut self, cold: &Cold, old: &[u8]) {
        if cold.codec != Codec::Lz4 || !self.still(cold, old) {
            return;
        }
        let o = *self.slab.get(cold.id);
        self.count_codec(&o, false);
        let r = self.slab.get_mut(cold.id);
        r.set_codec(Codec::Lz4Kept, 0);
        let r = *r;
        self.count_codec(&r, true);
        self.kept += 1;
    }

    /// Hands this shard's object counters to `into`, by (guest, pool); each
    /// guest's other pools report under `other_pool`.
    pub fn add_stats(&self, other_pool: u32, into: impl FnMut(u32, u32, &ObjCounters)) {
        self.owners.add_stats(other_pool, into);
    }

    /// Calls `f` with up to `n` (guest, pool) pairs of each guest that own
    /// objects here.
    pub fn pools(&self, n: usize, f: impl FnMut(u32, u32)) {
        self.owners.pools(n, f);
    }
}

/// The record key of what a put wants stored, and how many candidates its
/// lookup may compare (0: none, and it is stored without dedup).
fn content_key(content: &Content<'_>) -> (u32, u32) {
    match *content {
        Content::Fill { hash, .. } => (hash as u32 & FILL_KEY_MASK, MAX_CANDIDATES),
        Content::Data { key, candidates, .. } => (key, candidates),
    }
}

/// RAM payload attributed to one object: its slot (header and payload) in a chunk.
fn obj_ram_bytes(tier: Tier, len: usize) -> u64 {
    if tier == Tier::Ram {
        (HDR + len) as u64
    } else {
        0
    }
}

/// Metadata charged to an object's owner: its record and its dedup-table
/// slot (at full load; the table's slack is the shard's). A fill's word
/// is in its record.
pub fn obj_meta(_tier: Tier, indexed: bool) -> u64 {
    let record = std::mem::size_of::<Obj>();
    let dedup = if indexed { 4 } else { 0 };
    (record + dedup) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Counters;

    fn data(key: u32, payload: &[u8], dedup: bool) -> Content<'_> {
        Content::Data {
            key,
            codec: Codec::Zstd,
            shard_hash: !u64::from(key),
            payload,
            candidates: if dedup { MAX_CANDIDATES } else { 0 },
            page: None,
        }
    }

    fn by(pool: u32) -> By {
        By {
            guest: 0,
            pool,
            private: false,
            reserved: false,
        }
    }

    fn fill(word: u64, domain: u32) -> Content<'static> {
        Content::Fill {
            word,
            hash: (word ^ u64::from(domain) << 7).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        }
    }

    impl ObjShard {
        fn find_page_found(&mut self, key: u32, page: &Page, by: By, spill: Option<&SpillFile>) -> Found {
            self.find_page(key, page, by, spill).0
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
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p = vec![7u8; 1000];
        let (a, hit) = id_of(s.obtain(&data(1, &p, true), by(0), &budget, None));
        assert!(!hit);
        let (b, hit) = id_of(s.obtain(&data(1, &p, true), by(1), &budget, None));
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
        s.add_stats(u32::MAX, |_, _, c| {
            total.unique_pages += c.unique_pages + c.compr_data_bytes + c.mem_used_bytes
        });
        assert_eq!(total.unique_pages, 0);
    }

    /// Recounts the dedup table against the records: its invariants, and
    /// one entry per live record flagged as indexed.
    fn check_dedup(s: &ObjShard) {
        s.dedup.check(|i| s.slab.get(i).key());
        let indexed = (0..s.slab.high_water())
            .filter(|&i| s.slab.get(i).tier() != Tier::Free && s.slab.get(i).has(INDEXED))
            .count();
        assert_eq!(indexed, s.dedup.len());
    }

    /// Spread keys, as the keyed hash gives them.
    fn spread(i: u32) -> u32 {
        (u64::from(i).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    #[test]
    fn dedup_growth_under_a_full_budget_leaves_nothing_changed() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        // Short payloads, and freed records: only the table can need room.
        let p = [4u8; 1];
        let ids: Vec<u32> = (0..6000)
            .map(|i| id_of(s.obtain(&data(spread(i), &p, true), by(0), &budget, None)).0)
            .collect();
        for &id in &ids[3000..] {
            s.release(id, None, &budget);
        }
        check_dedup(&s);
        budget.set_limit(budget.used());
        let (mut refused, mut stored) = (0, 0);
        for i in 6000..9000 {
            let key = spread(i);
            let needs = s.dedup.growth(key) > 0;
            if s.slab.growth() > 0 || s.alloc.growth_for(p.len()) > 0 || s.owners.growth(0, 0) > 0 {
                break;
            }
            let (heap, used, live, indexed) =
                (s.heap_bytes(), budget.used(), s.live_objects(), s.dedup.len());
            match s.obtain(&data(key, &p, true), by(0), &budget, None) {
                Obtained::NeedRoom => {
                    assert!(needs, "refused only for the table's growth");
                    assert_eq!(
                        (s.heap_bytes(), budget.used(), s.live_objects(), s.dedup.len()),
                        (heap, used, live, indexed)
                    );
                    refused += 1;
                }
                Obtained::Ref { hit, .. } => {
                    assert!(!needs && !hit);
                    assert_eq!(budget.used(), s.heap_bytes());
                    stored += 1;
                }
            }
        }
        assert!(refused > 0 && stored > 0, "{refused} refused, {stored} stored");
        check_dedup(&s);
        budget.set_limit(1 << 30);
        let (_, hit) = id_of(s.obtain(&data(spread(5), &p, true), by(0), &budget, None));
        assert!(hit, "what was stored is still found");
        assert_eq!(budget.used(), s.heap_bytes());
    }

    #[test]
    fn dedup_table_recounts_through_churn_and_an_emptied_shard_holds_nothing() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let start = s.heap_bytes();
        let payload = |i: u32| vec![(i % 251) as u8; 30 + (i % 50) as usize];
        let mut live: Vec<u32> = Vec::new();
        for i in 0..12_000u32 {
            // Some pages repeat (dedup hits), some fills, some without dedup.
            let content = match i % 10 {
                0 => fill(u64::from(i % 7), 0),
                1 => data(spread(i), &[], false),
                _ => data(spread(i % 9000), &[], true),
            };
            let p = payload(i % 9000);
            let content = match content {
                Content::Data { key, candidates, .. } => Content::Data {
                    key,
                    codec: Codec::Zstd,
                    shard_hash: 0,
                    payload: &p,
                    candidates,
                    page: None,
                },
                fill => fill,
            };
            live.push(id_of(s.obtain(&content, by(i % 3), &budget, None)).0);
            if i % 4 == 3 {
                let id = live.swap_remove((i as usize * 7919) % live.len());
                s.release(id, None, &budget);
            }
            if i % 1000 == 0 {
                check_dedup(&s);
            }
        }
        check_dedup(&s);
        assert_eq!(budget.used(), s.heap_bytes());
        for id in live {
            s.release(id, None, &budget);
        }
        assert_eq!((s.live_objects(), s.dedup.len()), (0, 0));
        assert_eq!(s.heap_bytes(), start, "an emptied shard is back to its start");
        assert_eq!(budget.used(), s.heap_bytes());
    }

    #[test]
    fn a_record_at_its_reference_limit_gets_a_twin() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p = [9u8; 300];
        let (a, _) = id_of(s.obtain(&data(3, &p, true), by(0), &budget, None));
        s.slab.get_mut(a).set_refs(MAX_REFS - 1);
        assert_eq!(
            id_of(s.obtain(&data(3, &p, true), by(0), &budget, None)),
            (a, true)
        );
        assert_eq!(s.slab.get(a).refs(), MAX_REFS);
        let (b, hit) = id_of(s.obtain(&data(3, &p, true), by(0), &budget, None));
        assert!(!hit && b != a, "a full record takes no more references");
        // Fills too: the zero page is the one most likely to get there.
        let zero = fill(0, 1);
        let (f, _) = id_of(s.obtain(&zero, by(0), &budget, None));
        s.slab.get_mut(f).set_refs(MAX_REFS);
        let (g, hit) = id_of(s.obtain(&zero, by(0), &budget, None));
        assert!(!hit && g != f);
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(g, &mut page, &mut frame, None).unwrap(), Loaded::Fill(0));
        // With one reference released, either copy may take the next one.
        s.release(a, None, &budget);
        let (c, hit) = id_of(s.obtain(&data(3, &p, true), by(0), &budget, None));
        assert!(hit && (c == a || c == b));
    }

    #[test]
    fn find_page_decodes_candidates_in_either_tier_and_compares_whole_pages() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i % 7) as u8 ^ (i / 300) as u8;
        }
        let mut frame = [0u8; codec::COMPRESS_BOUND];
        let len = codec::compress(&page, 1, &mut frame).unwrap();
        let (a, _) = id_of(s.obtain(&data(42, &frame[..len], true), by(0), &budget, None));
        assert_eq!(s.find_page_found(42, &page, by(0), None), Found::Hit(a));
        assert_eq!(s.slab.get(a).refs(), 2);
        // Same key, other bytes: decoded, compared, refused.
        let mut other = page;
        other[4000] ^= 1;
        assert_eq!(s.find_page_found(42, &other, by(0), None), Found::Miss);
        assert_eq!(
            s.find_page_found(43, &page, by(0), None),
            Found::Miss,
            "another key is another page"
        );
        // A raw page is compared as it is.
        let noise: Vec<u8> = (0..PAGE_SIZE as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let noise: Page = noise.try_into().unwrap();
        let (r, _) = id_of(s.obtain(&data(7, &noise, true), by(0), &budget, None));
        assert_eq!(s.find_page_found(7, &noise, by(0), None), Found::Hit(r));
        // Spilled: read back from the file, only with the file at hand.
        while s.evict(&spill, &budget).unwrap() == Evicted::One {}
        assert_eq!(s.slab.get(a).tier(), Tier::Spilled);
        assert_eq!(s.find_page_found(42, &page, by(0), None), Found::Miss);
        assert_eq!(s.find_page_found(42, &page, by(0), Some(&spill)), Found::Hit(a));
        assert_eq!(s.slab.get(a).refs(), 3);
        let mut total = Counters::default();
        s.add_stats(u32::MAX, |_, _, c| total.spilled_pages += c.spilled_pages);
        assert_eq!(
            total.spilled_pages,
            3 + 2,
            "every reference of a spilled object counts"
        );
    }

    #[test]
    fn equal_hash_but_different_bytes_is_not_a_hit() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let (a, _) = id_of(s.obtain(&data(5, &[1u8; 100], true), by(0), &budget, None));
        let (b, hit) = id_of(s.obtain(&data(5, &[2u8; 100], true), by(0), &budget, None));
        assert!(!hit);
        assert_ne!(a, b);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(b, &mut page, &mut buf, None).unwrap(),
            Loaded::Frame(100, Decoder::Zstd)
        );
        assert_eq!(&buf[..100], &[2u8; 100]);
    }

    #[test]
    fn dedup_off_stores_copies_and_fills_are_shared() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p = [3u8; 64];
        let (a, _) = id_of(s.obtain(&data(9, &p, false), by(0), &budget, None));
        let (b, hit) = id_of(s.obtain(&data(9, &p, false), by(0), &budget, None));
        assert!(!hit && a != b);
        let zero = fill(0, 4);
        let (f1, _) = id_of(s.obtain(&zero, by(4), &budget, None));
        let (f2, hit) = id_of(s.obtain(&zero, by(4), &budget, None));
        assert!(hit && f1 == f2);
        let other_domain = fill(0, 5);
        assert_ne!(id_of(s.obtain(&other_domain, by(5), &budget, None)).0, f1);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(s.load(f1, &mut page, &mut buf, None).unwrap(), Loaded::Fill(0));
        assert!(s.release(f1, None, &budget));
        // The word is in the record, and so is whether its domain was a
        // guest's own: the same key from a put in the shared domain (an
        // equal hash, as only a guessed key gives) is not its twin.
        let word = 0x0123_4567_89ab_cdef;
        let own = By {
            private: true,
            ..by(0)
        };
        let (p, _) = id_of(s.obtain(&fill(word, 9), own, &budget, None));
        assert_eq!(s.load(p, &mut page, &mut buf, None).unwrap(), Loaded::Fill(word));
        let (shared, hit) = id_of(s.obtain(&fill(word, 9), by(0), &budget, None));
        assert!(!hit && shared != p);
        assert_eq!(id_of(s.obtain(&fill(word, 9), own, &budget, None)), (p, true));
        assert_eq!(
            id_of(s.obtain(&fill(word, 9), by(1), &budget, None)),
            (shared, true)
        );
        check_dedup(&s);
    }

    #[test]
    fn budget_refuses_growth_and_counts_exactly() {
        let budget = Budget::new(0);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        assert_eq!(
            s.obtain(&data(1, &[1u8; 500], true), by(0), &budget, None),
            Obtained::NeedRoom
        );
        assert_eq!(budget.used(), 0);
        budget.set_limit(1 << 20);
        let (_, _) = id_of(s.obtain(&data(1, &[1u8; 500], true), by(0), &budget, None));
        assert_eq!(
            budget.used(),
            s.heap_bytes(),
            "the budget holds exactly the shard's bytes"
        );
    }

    #[test]
    fn spill_round_trip_and_release_frees_file_space() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let (a, _) = id_of(s.obtain(&data(11, &p, true), by(1), &budget, None));
        s.obtain(&data(11, &p, true), by(1), &budget, None);
        // Referenced once on insert: CLOCK spares it on the first pass.
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::One);
        assert_eq!(s.chunk_bytes(), 0, "the payload left RAM");
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(700, Decoder::Zstd)
        );
        assert_eq!(&buf[..700], &p[..]);
        // A spilled object is still a dedup candidate, compared from the file.
        let (c, hit) = id_of(s.obtain(&data(11, &p, true), by(1), &budget, Some(&spill)));
        assert!(hit && c == a);
        // Without the file to compare against, equal hashes are not enough.
        let (d, hit) = id_of(s.obtain(&data(11, &p, true), by(1), &budget, None));
        assert!(!hit && d != a);
        let mut total = Counters::default();
        s.add_stats(u32::MAX, |_, _, c| {
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
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let payload = |i: u32| -> Vec<u8> { (0..900).map(|k| (i as u8).wrapping_add(k as u8)).collect() };
        let ids: Vec<u32> = (0..800u32)
            .map(|i| id_of(s.obtain(&data(i + 1, &payload(i), true), by(0), &budget, None)).0)
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
                Loaded::Frame(900, Decoder::Zstd)
            );
            assert_eq!(&frame[..900], &payload(i as u32)[..]);
        }
        // Moved payloads are still found by dedup.
        let (again, hit) = id_of(s.obtain(&data(1, &payload(0), true), by(0), &budget, None));
        assert!(hit && again == ids[0]);
    }

    #[test]
    fn one_compaction_call_moves_a_bounded_amount() {
        // A step of half a chunk or more would move these chunks' 30 KB at once.
        const { assert!(COMPACT_STEP < CHUNK / 2) };
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let payload = |i: u32| -> Vec<u8> {
            (0..900)
                .map(|k| (i as u8).wrapping_mul(3).wrapping_add(k as u8))
                .collect()
        };
        let ids: Vec<u32> = (0..800u32)
            .map(|i| id_of(s.obtain(&data(i + 1, &payload(i), true), by(0), &budget, None)).0)
            .collect();
        // Every other one goes: chunks half full, about 30 KB live each.
        for &id in ids.iter().step_by(2) {
            s.release(id, None, &budget);
        }
        let kept: Vec<(usize, u32)> = ids.iter().copied().enumerate().skip(1).step_by(2).collect();
        let mut calls = 0;
        while s.garbage() >= CHUNK as u64 {
            let before: Vec<u64> = kept.iter().map(|&(_, id)| s.slab.get(id).loc()).collect();
            if !s.compact(&budget) {
                break;
            }
            calls += 1;
            let moved = kept
                .iter()
                .zip(&before)
                .filter(|(&(_, id), &loc)| s.slab.get(id).loc() != loc)
                .count();
            assert!(moved * 900 <= COMPACT_STEP + 900, "{moved} payloads in one call");
        }
        assert!(calls > 1, "{calls}");
        assert!(s.garbage() < CHUNK as u64);
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        for &(i, id) in &kept {
            s.load(id, &mut page, &mut frame, None).unwrap();
            assert_eq!(&frame[..900], &payload(i as u32)[..]);
        }
        assert_eq!(budget.used(), s.heap_bytes());
    }

    fn lz4(key: u32, payload: &[u8]) -> Content<'_> {
        Content::Data {
            key,
            codec: Codec::Lz4,
            shard_hash: !u64::from(key),
            payload,
            candidates: MAX_CANDIDATES,
            page: None,
        }
    }

    /// What the recompressor copies out, then what happens to each object
    /// while it encodes with no lock held, then whether its swap goes in.
    #[test]
    fn a_swap_goes_in_only_if_the_object_is_still_the_one_copied() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let payload = |i: u8| vec![i; 200 + usize::from(i)];
        let ids: Vec<u32> = (0..5u8)
            .map(|i| id_of(s.obtain(&lz4(u32::from(i) + 1, &payload(i)), by(0), &budget, None)).0)
            .collect();
        let (mut cold, mut bytes) = (Vec::new(), Vec::new());
        assert_eq!(
            s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes),
            (5, 5),
            "all warm at first"
        );
        assert!(cold.is_empty());
        s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes);
        assert_eq!(cold.len(), 5);
        let old = |k: usize| {
            let at: usize = cold[..k].iter().map(|c| c.len).sum();
            bytes[at..at + cold[k].len].to_vec()
        };
        // 0: got meanwhile (only warmed: the same payload, so the swap is right).
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        s.load(ids[0], &mut page, &mut frame, None).unwrap();
        // 1: invalidated, and its id reused by another page.
        s.release(ids[1], None, &budget);
        let (reused, _) = id_of(s.obtain(&lz4(99, &payload(9)), by(0), &budget, None));
        assert_eq!(reused, ids[1]);
        // 2: overwritten by a page with the same key and length but other bytes.
        s.release(ids[2], None, &budget);
        let mut other = payload(2);
        other[7] ^= 1;
        assert_eq!(id_of(s.obtain(&lz4(3, &other), by(0), &budget, None)).0, ids[2]);
        // 3: invalidated, nothing in its place.
        s.release(ids[3], None, &budget);
        // 4: untouched.
        let new = [0xabu8; 50];
        let swapped: Vec<bool> = (0..5)
            .map(|k| s.swap_payload(&cold[k], &old(k), &new, Codec::Zstd, 0, None, &budget))
            .collect();
        assert_eq!(swapped, [true, false, false, false, true]);
        assert_eq!(s.slab.get(ids[4]).codec(), Codec::Zstd);
        assert_eq!(s.slab.get(ids[4]).len(), 50);
        assert_eq!(
            s.load(ids[1], &mut page, &mut frame, None).unwrap(),
            Loaded::Frame(209, Decoder::Lz4)
        );
        assert_eq!(&frame[..209], &payload(9)[..]);
        assert_eq!(
            s.load(ids[4], &mut page, &mut frame, None).unwrap(),
            Loaded::Frame(50, Decoder::Zstd)
        );
        let c = s.codec_counts();
        assert_eq!((c.lz4, c.zstd, c.recompressed), (2, 2, 2));
        // A lookup never matches equal bytes in another codec.
        let (fresh, hit) = id_of(s.obtain(&data(5, &new, true), by(0), &budget, None));
        assert!(!hit || fresh == ids[4]);
        let (twin, hit) = id_of(s.obtain(&lz4(5, &new), by(0), &budget, None));
        assert!(!hit && twin != ids[4]);
        assert_eq!(budget.used(), s.heap_bytes());
    }

    #[test]
    fn preferred_writeback_takes_only_the_named_guests_objects() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let of = |guest| By {
            guest,
            pool: 0,
            private: true,
            reserved: false,
        };
        let mut ids = [Vec::new(), Vec::new()];
        for i in 0..40u32 {
            let guest = i % 2;
            let p = vec![i as u8; 200];
            ids[guest as usize].push(id_of(s.obtain(&data(i + 1, &p, true), of(guest), &budget, None)).0);
        }
        let ram = |g: u32| budget.shares().view(g, 1 << 30, 0).ram_bytes;
        let guest0 = ram(0);
        let mut mask = Mask::default();
        mask.insert_guest(1);
        let mut written = 0;
        while s.evict_of(&spill, &budget, Some((&mask, 64))).unwrap() == Evicted::One {
            written += 1;
        }
        assert_eq!(written, 20, "every object of guest 1, none of guest 0");
        for &id in &ids[0] {
            let o = s.slab.get(id);
            assert_eq!(o.tier(), Tier::Ram);
            assert!(o.has(REFERENCED), "guest 0's objects keep their bit");
        }
        assert!(ids[1].iter().all(|&id| s.slab.get(id).tier() == Tier::Spilled));
        assert_eq!(ram(0), guest0);
        assert_eq!(budget.shares().view(1, 1 << 30, 0).spill_bytes, 20 * 2 * UNIT);
        // Unpreferred, the CLOCK takes guest 0's.
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::One);
    }

    /// The lock is let go while the file is written: the object may be
    /// read, or freed, meanwhile.
    #[test]
    fn a_writeback_survives_what_happens_while_the_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p: Vec<u8> = (0..900u32).map(|i| (i * 7) as u8).collect();
        let (a, _) = id_of(s.obtain(&data(1, &p, true), by(0), &budget, None));
        let (b, _) = id_of(s.obtain(&data(2, &p[..800], true), by(0), &budget, None));
        let mut buf = [0u8; PAGE_SIZE];
        let pick = s.begin_evict(None, &mut buf).unwrap();
        let first = pick.id;
        assert!(
            s.begin_evict(None, &mut [0u8; PAGE_SIZE]).is_none(),
            "one at a time"
        );
        // Read while it is written: still in RAM.
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_matches::assert_matches!(
            s.load(first, &mut page, &mut frame, Some(&spill)),
            Ok(Loaded::Frame(..))
        );
        let written = spill.write_for(pick.guest(), &buf[..pick.payload_len()], pick.label());
        assert_eq!(s.end_evict(pick, written, &spill, &budget).unwrap(), Evicted::One);
        assert_eq!(s.slab.get(first).tier(), Tier::Spilled);
        // Freed while it is written: the slot goes back, the counters balance.
        let pick = s.begin_evict(None, &mut buf).unwrap();
        let second = pick.id;
        assert_eq!(second, if first == a { b } else { a });
        let written = spill.write_for(pick.guest(), &buf[..pick.payload_len()], pick.label());
        s.release(second, Some(&spill), &budget);
        assert_eq!(s.end_evict(pick, written, &spill, &budget).unwrap(), Evicted::One);
        s.release(first, Some(&spill), &budget);
        assert_eq!((spill.live_bytes(), s.live_objects(), s.chunk_bytes()), (0, 0, 0));
        let v = budget.shares().view(0, 1 << 30, 0);
        assert_eq!((v.ram_bytes, v.spill_bytes), (0, 0));
    }

    /// The recompressor copied a payload out, and a writeback took the same
    /// object before the swap came back: the swap is refused, so the file
    /// gets the encoding the record names, and the page reads back.
    #[test]
    fn a_twin_recompressed_since_the_first_lookup_is_still_found() {
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = b"swap page text "[i % 15] ^ (i / 512) as u8;
        }
        let mut lz = [0u8; codec::COMPRESS_BOUND];
        let n = codec::lz4_compress(&page, PAGE_SIZE, &mut lz).unwrap();
        let (id, hit) = id_of(s.obtain(&lz4(7, &lz[..n]), by(0), &budget, None));
        assert!(!hit);
        // The recompressor turns the cold lz4 payload into zstd.
        let (mut cold, mut bytes) = (Vec::new(), Vec::new());
        s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes);
        s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes);
        assert_eq!(cold.len(), 1);
        let mut zs = [0u8; codec::COMPRESS_BOUND];
        let z = codec::encode_data(&page, Codec::Zstd, 1, PAGE_SIZE, &mut zs)
            .unwrap()
            .unwrap();
        assert!(s.swap_payload(&cold[0], &bytes, &zs[..z], Codec::Zstd, 0, None, &budget));
        // A put of the same page that compressed with lz4 before the swap:
        // without the page its frame matches nothing, with it the twin is found.
        let with_page = |page| Content::Data {
            key: 7,
            codec: Codec::Lz4,
            shard_hash: !7,
            payload: &lz[..n],
            candidates: MAX_CANDIDATES,
            page,
        };
        let blind = with_page(None);
        let (other, hit) = id_of(s.obtain(&blind, by(0), &budget, None));
        assert!(!hit && other != id);
        s.release(other, None, &budget);
        assert_eq!(
            id_of(s.obtain(&with_page(Some(&page)), by(0), &budget, None)),
            (id, true)
        );
    }

    #[test]
    fn a_payload_being_written_back_is_not_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 1 << 20, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let p = vec![5u8; 300];
        let (id, _) = id_of(s.obtain(&lz4(1, &p), by(0), &budget, None));
        let (mut cold, mut bytes) = (Vec::new(), Vec::new());
        s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes);
        s.cold_batch(10, 100, |_, _| true, &mut cold, &mut bytes);
        assert_eq!(cold.len(), 1);
        let mut buf = [0u8; PAGE_SIZE];
        let pick = s.begin_evict(None, &mut buf).unwrap();
        assert_eq!(pick.id, id);
        let new = [0xabu8; 40];
        assert!(!s.swap_payload(&cold[0], &bytes, &new, Codec::Zstd, 0, None, &budget));
        let written = spill.write_for(pick.guest(), &buf[..pick.payload_len()], pick.label());
        assert_eq!(s.end_evict(pick, written, &spill, &budget).unwrap(), Evicted::One);
        let (mut page, mut frame) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(id, &mut page, &mut frame, Some(&spill)).unwrap(),
            Loaded::Frame(300, Decoder::Lz4)
        );
        assert_eq!(&frame[..300], &p[..]);
    }

    #[test]
    fn full_tier_keeps_the_object_in_ram() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::open(&dir.path().join("s"), 0, &[]).unwrap();
        let budget = Budget::new(1 << 30);
        let mut s = ObjShard::new(0, 1 << 20, &Keys::new());
        let (a, _) = id_of(s.obtain(&data(1, &[5u8; 300], true), by(0), &budget, None));
        assert_eq!(s.evict(&spill, &budget).unwrap(), Evicted::TierFull);
        let (mut page, mut buf) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        assert_eq!(
            s.load(a, &mut page, &mut buf, Some(&spill)).unwrap(),
            Loaded::Frame(300, Decoder::Zstd)
        );
        assert_eq!(&buf[..300], &[5u8; 300]);
    }
}
