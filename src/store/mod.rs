//! The page store: what the device keeps for its guests.
//!
//! No vhost or virtqueue types appear here; the device calls into this module
//! from one worker thread per virtqueue, so every method takes `&self` and is
//! safe to call concurrently.
//!
//! Layout (see docs/design.md for the reasons):
//! - `codec`: same-filled detection, zstd with per-thread contexts, lz4
//!   blocks, zstd with a dictionary, raw fallback;
//! - `dict`: trained zstd dictionaries per dedup domain, versioned and freed
//!   once unused;
//! - `recompress`: the background recompressor (lz4 to zstd for cold pages);
//! - `keys`: the secret keys drawn at start, and the keyed hashes (content,
//!   fill, index placement) that decide where a guest's data goes;
//! - `index`: index shards, (guest, pool, index) -> 32-bit object handle, page counters;
//! - `objects`: object shards, stored contents with dedup, refcounts, tiers;
//! - `slab`: the object records of a shard and the CLOCK hand over them;
//! - `dedup`: a shard's dedup table, object ids by record key;
//! - `alloc`: the byte-packed chunk allocator (with compaction) that holds RAM payloads;
//! - `spill`: the spill file: private, encrypted slots, and its free space;
//! - `frames` (feature `harness`): multi-page spill frames, for `tmem-bench frames`;
//! - `budget`: the RAM budget counter;
//! - `share`: each guest's use, cap (`max`), weight and fair share, and
//!   which guests give up room first;
//! - `owners`: per object shard, the (guest, pool) records objects are counted under;
//! - `stats`: summing the shards' counters, the largest pools of each guest apart.
//!
//! Lock order: an index shard, then an object shard, then the spill space
//! lock; never backwards. No lock is global: each put or get takes one index
//! shard and one object shard.
//!
//! What a guest can make the store hold is bounded by the budget: every
//! table, record and counter allocated for its pages, pools and objects is
//! counted in it, and freed when emptied. Per device (not per guest input)
//! the store keeps one record of cumulative counters per shard: the fixed
//! overhead. See docs/design.md, "Hostile guests".

mod alloc;
mod budget;
mod codec;
mod dedup;
mod dict;
#[cfg(feature = "harness")]
mod frames;
mod index;
mod keys;
mod objects;
mod owners;
mod pressure;
mod recompress;
mod share;
mod slab;
mod spill;
mod stats;

/// The store's zstd set-up for pages and its lz4 encoder, for benchmarks
/// that compare against them.
pub use codec::{lz4_compress, page_compressor, COMPRESS_BOUND};
/// The spill tier alone, sealed and in plaintext, for `tmem-bench store --spill-tier`.
pub use spill::{SpillTierBench, SpillTierFile};
/// Multi-page spill frames, sealed as the spill tier seals a slot, and pages
/// encoded as the store holds them, for `tmem-bench frames`.
#[cfg(feature = "harness")]
pub use {
    codec::{fill_value, page_decompressor},
    frames::{frame_slot_bytes, FrameFile, PagePayloads, FRAME_HEADER},
};

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use self::{
    budget::Budget,
    index::{At, IndexShard, NoRoom, PageCounters},
    keys::Keys,
    objects::{By, Content, Evicted, Found, Loaded, ObjShard, Obtained},
    spill::SpillFile,
    stats::Gather,
};

pub use self::{
    index::OTHER_POOLS,
    objects::MAX_CANDIDATES,
    recompress::RecompressRound,
    share::{GuestBudget, ShareError, MAX_GUESTS},
};

/// Pools listed by name in each guest's stats; the rest are summed under
/// [`OTHER_POOLS`], so a `stats` reply stays small whatever a guest does.
pub const STATS_POOLS_PER_GUEST: usize = 32;

pub use crate::protocol::PAGE_SIZE;

pub type Page = [u8; PAGE_SIZE];

/// One device (one VM): the unit that a reset or disconnect drops whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GuestId(pub u32);

/// Which pages may share one stored copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DedupDomain {
    Off,
    /// Pages of one guest (all of its pools) are deduplicated together.
    #[default]
    Guest,
    /// Pages are shared across guests: a timing side channel, so opt-in.
    Global,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpillConfig {
    /// Where the spill file is made: an existing directory, or a name that
    /// does not exist yet in an existing directory. The file itself never has
    /// a name (see [`Store::new`]). A symbolic link or an existing file here is
    /// refused, never opened.
    pub path: PathBuf,
    /// Most bytes the spill file may grow to.
    pub limit: u64,
}

/// How pages are encoded (`--compression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// zstd at `zstd_level` on every put.
    #[default]
    Zstd,
    /// lz4 on every put; nothing is recompressed.
    Lz4,
    /// lz4 on every put; [`Store::recompress`] re-encodes pages that stay
    /// cold with zstd at `zstd_level` and a dictionary trained per dedup domain.
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Host RAM the store may use: payload, allocator slack and metadata.
    pub mem_limit: u64,
    pub spill: Option<SpillConfig>,
    /// The zstd level of puts (`Zstd`) or of recompression (`Auto`).
    pub zstd_level: i32,
    pub compression: Compression,
    pub dedup: DedupDomain,
    /// Pages whose zstd frame is this long or longer are stored raw.
    pub raw_threshold: usize,
    /// Object shards (rounded up to a power of two, at least 2, at most 64); 0 = from the CPU count
    /// (eight per CPU, at least 16) and the budget (one per MiB at most, at least 4).
    pub shards: usize,
    /// RAM the background writer keeps free below `mem_limit` (see
    /// [`Store::background_writeback`]); 0 = puts make their own room.
    pub writeback_headroom: u64,
    /// Guests whose puts must never be rejected for room (blk devices), with
    /// the most pages each may hold. See [`Reservation`].
    pub reserved: Vec<Reservation>,
}

/// Room set apart for one guest that cannot be told "rejected" (a block
/// device): a whole-page slot in the spill file for each of its `pages`
/// (plus [`RESERVE_SLACK`]), taken from the spill limit at start. Its puts
/// then never fail for room: when RAM is full, its pages go to its own part
/// of the file, and its metadata (records, index entries; a few dozen bytes
/// a page) is counted in the RAM budget even past the limit, which other
/// guests then make up for. Its objects are never shared with another guest,
/// so the slots it holds are its own pages'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub guest: GuestId,
    pub pages: u64,
}

/// Slots a reservation holds beyond its pages: an overwrite stores the new
/// object before it lets go of the old one, so each put in flight (one per
/// queue worker, at most 64 queues) may hold one slot more for a moment.
pub const RESERVE_SLACK: u64 = 64;

impl Reservation {
    /// Spill file bytes this reservation takes.
    pub fn spill_bytes(&self) -> u64 {
        spill::reserve_bytes(self.pages.saturating_add(RESERVE_SLACK))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            mem_limit: 256 << 20,
            spill: None,
            zstd_level: 1,
            compression: Compression::Zstd,
            dedup: DedupDomain::Guest,
            raw_threshold: PAGE_SIZE - PAGE_SIZE / 32,
            shards: 0,
            writeback_headroom: 0,
            reserved: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// Neither tier had room. Any older copy at that index is gone too.
    Rejected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetOutcome {
    Found,
    NotFound,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot make the spill file at {path}")]
    OpenSpill {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spill path {0} is a symbolic link: name the directory itself, or a new name in it")]
    SpillSymlink(PathBuf),
    #[error(
        "spill path {0} exists and is not a directory: an existing file is never reused; \
         name a directory, or a new name in one"
    )]
    SpillExists(PathBuf),
    #[error("spill file made at {path} is not private ({links} links, mode {mode:o})")]
    SpillNotPrivate { path: PathBuf, links: u64, mode: u32 },
    #[error("cannot draw random bytes for the spill file from the OS")]
    SpillKey(#[source] getrandom::Error),
    #[error("a guest with reserved room needs a spill file to hold it")]
    ReservationWithoutSpill,
    #[error("reserved room needs {need} bytes of spill file, the limit is {limit}")]
    ReservationTooLarge { need: u64, limit: u64 },
    #[error("cannot write out the spill file's reserved room")]
    Reserve(#[source] std::io::Error),
    #[error("spill file cannot seal another page")]
    SpillSeal,
    #[error("spill file I/O failed")]
    SpillIo(#[source] std::io::Error),
    #[error("stored object at spill offset {offset} fails authentication")]
    Corrupt { offset: u64 },
    #[error("page compression failed")]
    Compress(#[source] std::io::Error),
    #[error("stored page does not decompress")]
    Decompress(#[source] std::io::Error),
}

/// Counters named after zram and frontswap where they mean the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub succ_stores: u64,
    pub failed_stores: u64,
    pub loads: u64,
    pub failed_loads: u64,
    pub invalidates: u64,
    pub stored_pages: u64,
    pub same_filled_pages: u64,
    pub dedup_hits: u64,
    pub unique_pages: u64,
    pub orig_data_bytes: u64,
    pub compr_data_bytes: u64,
    pub mem_used_bytes: u64,
    pub spilled_pages: u64,
    pub spill_file_bytes: u64,
    pub spill_reads: u64,
    pub spill_writes: u64,
    pub writebacks: u64,
    /// Of `mem_used_bytes`, what the store holds to keep track of pages:
    /// index tables and pool records, object records, dedup and fill table
    /// entries, owner records. Per guest it is what its pages, pools and
    /// objects cost beyond their payload.
    #[serde(default)]
    pub metadata_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub total: Counters,
    /// The guest's largest pools (by stored pages, at most
    /// [`STATS_POOLS_PER_GUEST`]); pool [`OTHER_POOLS`] sums the rest, ops on
    /// pools that hold nothing, and the counters of emptied pools.
    pub pools: BTreeMap<u32, Counters>,
    /// What the guest holds against its cap and its fair share.
    #[serde(default)]
    pub budget: GuestBudget,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub total: Counters,
    pub mem_limit_bytes: u64,
    /// Objects the background writer moved to the spill file (they are in
    /// `total.spill_writes` too); the rest were written back by puts that
    /// needed room.
    #[serde(default)]
    pub background_writebacks: u64,
    /// Objects written back by puts of guests over their fair share while
    /// the background writer was behind (they pay for their own room).
    #[serde(default)]
    pub throttled_writebacks: u64,
    /// Stored payloads by encoding, the recompressor's work and its
    /// dictionaries (boxed: replies that carry stats stay small).
    #[serde(default)]
    pub codecs: Box<CodecStats>,
    pub guests: BTreeMap<u32, GuestStats>,
}

/// Unique stored payloads (objects, fills aside) by how they are encoded,
/// in either tier, and what the recompressor has done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecStats {
    pub raw_pages: u64,
    pub zstd_pages: u64,
    pub lz4_pages: u64,
    /// zstd with a trained dictionary.
    pub dict_pages: u64,
    pub recompressions: u64,
    /// lz4 payloads the recompressor left alone: zstd did not shrink them.
    pub recompress_kept: u64,
    /// Dictionaries alive (current, or retired and still used), their host
    /// bytes (counted in `mem_used_bytes`), trained and freed so far.
    pub dict_versions: u64,
    pub dict_bytes: u64,
    pub dicts_trained: u64,
    pub dicts_freed: u64,
}

/// A breakdown of `mem_used_bytes`, for benchmarks and operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Everything the store holds (the budgeted figure).
    pub total_bytes: u64,
    /// RAM chunks: compressed payloads plus slot and chunk-tail slack.
    pub payload_chunk_bytes: u64,
    /// The rest: index and dedup tables, object records, free lists, shard arrays.
    pub metadata_bytes: u64,
    /// Part of the metadata: the index tables ((guest, pool, index) -> handle).
    pub index_bytes: u64,
    /// Part of the metadata: object records, dedup tables, allocator tables, object counters.
    pub object_bytes: u64,
    pub stored_pages: u64,
    pub objects: u64,
}

/// Keeps each shard's lock on its own cache lines (two, for adjacent-line prefetch).
#[repr(align(128))]
struct Padded<T>(T);

const MAX_OBJ_SHARD_BITS: u32 = 6;
/// RAM budget per object shard below which fewer shards are made (4 at least).
const SHARD_BUDGET: u64 = 1 << 20;

/// Most object records one preferred writeback looks at, over all shards,
/// for a page of a guest over its fair share before it falls back to any
/// cold page: bounds what a guest can make one put's room cost.
pub const FAIR_SCAN: usize = 4096;

pub struct Store {
    zstd_level: i32,
    raw_threshold: usize,
    dedup: DedupDomain,
    budget: Budget,
    index: Box<[Padded<Mutex<IndexShard>>]>,
    index_bits: u32,
    objects: Box<[Padded<Mutex<ObjShard>>]>,
    obj_bits: u32,
    spill: Option<SpillFile>,
    /// Secret per store: keeps content hashes and index placement
    /// unpredictable to guests.
    keys: Keys,
    /// Where general writeback starts next, so it spreads over the object shards.
    evict_hand: AtomicUsize,
    headroom: u64,
    pressure: pressure::Pressure,
    background_writebacks: AtomicU64,
    throttled_writebacks: AtomicU64,
    /// Guests with a [`Reservation`]: few (one per blk device), so a scan.
    reserved: Vec<u32>,
    /// What puts encode with: zstd, or lz4 (`lz4` and `auto`).
    put_codec: slab::Codec,
    /// Whether [`Store::recompress`] works (`auto`).
    recompress: bool,
    dicts: dict::Dictionaries,
}

/// An object a put holds a reference on, about to be linked at its index.
#[derive(Clone, Copy)]
struct Placed {
    shard: usize,
    id: u32,
    kind: Kind,
}

/// What the referenced object is to the put, for its counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The page was stored anew.
    Fresh,
    /// An equal page was already stored (a dedup hit).
    Twin,
    /// A same-filled page, kept as its word.
    Fill,
}

/// Why a put could not get room.
enum Room {
    Made,
    /// Both tiers are full (or there is no spill tier).
    Full,
}

fn bits_for(n: usize) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

impl Store {
    /// A store, with its spill file made as [`SpillConfig`] says: unnamed
    /// (`O_TMPFILE`, or created 0600 with `O_EXCL | O_NOFOLLOW` and unlinked
    /// at once), and sealed with AES-256-GCM under a key drawn from the OS now
    /// and kept only in this process. Its pages go with the process.
    pub fn new(config: StoreConfig) -> Result<Self, StoreError> {
        let reserves: Vec<(u32, u64)> = config
            .reserved
            .iter()
            .map(|r| (r.guest.0, r.pages.saturating_add(RESERVE_SLACK)))
            .collect();
        let spill = match &config.spill {
            Some(s) => Some(SpillFile::open(&s.path, s.limit, &reserves)?),
            None if !reserves.is_empty() => return Err(StoreError::ReservationWithoutSpill),
            None => None,
        };
        Ok(Store::with_spill(config, spill))
    }

    /// A store over a spill file already open (`config.spill` is not looked at).
    fn with_spill(config: StoreConfig, spill: Option<SpillFile>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        // A guest's get waits whenever another guest's put, writeback or
        // compaction holds its object shard, which happens 1/n of the time
        // under a flood: with 4 shards on 2 CPUs, 1.2% of a victim's gets
        // waited 32 us or more for one; with 16, 0.3%. 16 shards cost 0.2
        // B/page more metadata at 1M pages (docs/design.md, "Fair sharing").
        // But each shard keeps a part-filled chunk and tables of its own,
        // which a small budget cannot spare: a shard per MiB at most.
        let obj_shards = if config.shards == 0 {
            let by_budget = usize::try_from(config.mem_limit / SHARD_BUDGET).unwrap_or(usize::MAX);
            (cpus * 8).clamp(16, 64).min(by_budget).max(4)
        } else {
            config.shards.min(64)
        };
        // At least two shards: a handle needs one bit for the shard, or its
        // 32 id bits would overflow the id count and the shifts below.
        let obj_bits = bits_for(obj_shards).clamp(1, MAX_OBJ_SHARD_BITS);
        let index_bits = bits_for((cpus * 8).clamp(16, 1024));
        let max_ids = 1u32 << (32 - obj_bits);
        let keys = Keys::new();
        let spill_heap = spill.as_ref().map_or(0, SpillFile::heap_bytes);
        let spill_cap = spill.as_ref().map_or(0, SpillFile::cap);
        let store = Store {
            zstd_level: config.zstd_level,
            raw_threshold: config.raw_threshold,
            dedup: config.dedup,
            budget: Budget::new(config.mem_limit),
            index: (0..1usize << index_bits)
                .map(|_| Padded(Mutex::new(IndexShard::new(&keys))))
                .collect(),
            index_bits,
            objects: (0..1u32 << obj_bits)
                .map(|shard| {
                    let base = shard.checked_shl(32 - obj_bits).unwrap_or(0);
                    Padded(Mutex::new(ObjShard::new(base, max_ids, &keys)))
                })
                .collect(),
            obj_bits,
            spill,
            keys,
            evict_hand: AtomicUsize::new(0),
            headroom: config.writeback_headroom,
            pressure: pressure::Pressure::default(),
            background_writebacks: AtomicU64::new(0),
            throttled_writebacks: AtomicU64::new(0),
            reserved: config.reserved.iter().map(|r| r.guest.0).collect(),
            put_codec: match config.compression {
                Compression::Zstd => slab::Codec::Zstd,
                Compression::Lz4 | Compression::Auto => slab::Codec::Lz4,
            },
            recompress: config.compression == Compression::Auto,
            dicts: dict::Dictionaries::default(),
        };
        // The fixed part (the shard arrays, the spill cipher) is host memory too.
        let fixed = std::mem::size_of::<Store>()
            + store.index.len() * std::mem::size_of::<Padded<Mutex<IndexShard>>>()
            + store.objects.len() * std::mem::size_of::<Padded<Mutex<ObjShard>>>();
        let mut counted = 0;
        let shares = store.budget.shares().heap_bytes();
        store.budget.shares().set_spill_limit(spill_cap);
        // New chunks for puts leave one free (see objects::ObjShard::obtain).
        store.budget.shares().set_kept(alloc::CHUNK as u64);
        store
            .budget
            .settle(&mut counted, fixed as u64 + shares + spill_heap);
        store
    }

    /// Where a page is, with its run's keyed hash (see `keys::Keys::run`).
    fn at(&self, guest: GuestId, pool: u32, index: u64) -> At {
        At {
            guest: guest.0,
            pool,
            index,
            run: self.keys.run(guest.0, pool, index),
        }
    }

    /// The index shard of a page: a run of neighbouring indices shares one
    /// (see index::RUN_BITS), picked by the top bits of the run's keyed hash.
    fn index_shard(&self, at: At) -> MutexGuard<'_, IndexShard> {
        self.index[(at.run >> (64 - self.index_bits)) as usize & (self.index.len() - 1)]
            .0
            .lock()
    }

    fn by(&self, guest: GuestId, pool: u32) -> By {
        let reserved = self.is_reserved(guest);
        By {
            guest: guest.0,
            pool,
            private: self.dedup != DedupDomain::Global || reserved,
            reserved,
        }
    }

    /// Whether `guest`'s puts must never be rejected for room.
    fn is_reserved(&self, guest: GuestId) -> bool {
        self.reserved.contains(&guest.0)
    }

    fn split_handle(&self, handle: u32) -> (usize, u32) {
        let slot_bits = 32 - self.obj_bits;
        ((handle >> slot_bits) as usize, handle & ((1u32 << slot_bits) - 1))
    }

    fn domain(&self, guest: GuestId) -> u32 {
        match self.dedup {
            DedupDomain::Off | DedupDomain::Guest => guest.0,
            // A reserved guest's objects are its own (its slots count only
            // its pages): a domain of its own keeps other guests' keys apart.
            DedupDomain::Global if self.is_reserved(guest) => guest.0.wrapping_add(1),
            DedupDomain::Global => 0,
        }
    }

    /// Stores a page. A page equal to one already stored (in its dedup
    /// domain) is found before compression, by a hash of the page itself, and
    /// then costs a decompression to confirm instead of a compression.
    pub fn put(&self, guest: GuestId, pool: u32, index: u64, page: &Page) -> Result<PutOutcome, StoreError> {
        if !self.admits(guest) {
            return Ok(self.reject(guest, pool, index));
        }
        self.pay_own_writeback(guest)?;
        if let Some(word) = codec::fill_value(page) {
            return self.put_fill_admitted(guest, pool, index, word);
        }
        let (key, shard_hash) = self.keys.page(page, self.domain(guest));
        let mut candidates = 0;
        if self.dedup != DedupDomain::Off {
            let shard = self.shard_of_hash(shard_hash);
            let (twin, compared) =
                self.objects[shard]
                    .0
                    .lock()
                    .find_page(key, page, self.by(guest, pool), self.spill.as_ref());
            match twin {
                Found::Hit(id) => {
                    return self.link(
                        guest,
                        pool,
                        index,
                        Placed {
                            shard,
                            id,
                            kind: Kind::Twin,
                        },
                    )
                }
                // The lookup after compression (which catches a twin stored
                // meanwhile) gets what this one left of the bound.
                Found::Miss => candidates = MAX_CANDIDATES - compared,
                // Too many candidates share the key: this page goes without dedup.
                Found::TooMany => {}
            }
        }
        codec::with_scratch(|frame| {
            let encoded =
                codec::encode_data(page, self.put_codec, self.zstd_level, self.raw_threshold, frame);
            let (payload, codec) = match encoded {
                Ok(Some(len)) => (&frame[..len], self.put_codec),
                Ok(None) => (&page[..], slab::Codec::Zstd),
                Err(e) => {
                    self.reject(guest, pool, index);
                    return Err(StoreError::Compress(e));
                }
            };
            let content = Content::Data {
                key,
                codec,
                shard_hash,
                payload,
                candidates,
                page: Some(page),
            };
            self.put_content(guest, pool, index, &content)
        })
    }

    /// Stores the page made of `fill` repeated (PUT_FILL).
    pub fn put_fill(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        fill: u64,
    ) -> Result<PutOutcome, StoreError> {
        if !self.admits(guest) {
            return Ok(self.reject(guest, pool, index));
        }
        self.pay_own_writeback(guest)?;
        self.put_fill_admitted(guest, pool, index, fill)
    }

    fn put_fill_admitted(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        fill: u64,
    ) -> Result<PutOutcome, StoreError> {
        let domain = self.domain(guest);
        let content = Content::Fill {
            word: fill,
            hash: self.keys.fill(fill, domain),
        };
        self.put_content(guest, pool, index, &content)
    }

    /// Whether `guest` may store a page now: not at its max, and not over
    /// its fair share while the room left in both tiers is what the guests
    /// under theirs may still claim (see `share::Shares::must_yield`). A
    /// refused put is rejected like any other (its index's old copy goes
    /// too).
    ///
    /// Costs relaxed loads of each device's record: no lock, no store.
    fn admits(&self, guest: GuestId) -> bool {
        // A guest with reserved room (a disk) has no max and cannot be
        // refused; being over its share costs it RAM, as its coldest
        // pages spill first, and never a put.
        if self.is_reserved(guest) {
            return true;
        }
        let shares = self.budget.shares();
        if shares.at_max(guest.0) {
            shares.count_max_reject(guest.0);
            return false;
        }
        if shares.must_yield(guest.0, self.budget.limit(), self.budget.used()) {
            shares.count_share_reject(guest.0);
            return false;
        }
        true
    }

    fn obj_shard_of(&self, content: &Content<'_>) -> usize {
        self.shard_of_hash(match *content {
            Content::Fill { hash, .. } => hash,
            Content::Data { shard_hash, .. } => shard_hash,
        })
    }

    fn shard_of_hash(&self, h: u64) -> usize {
        (h >> (64 - self.obj_bits)) as usize & (self.objects.len() - 1)
    }

    fn put_content(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        content: &Content<'_>,
    ) -> Result<PutOutcome, StoreError> {
        let shard = self.obj_shard_of(content);
        let owner = self.by(guest, pool);
        // Object first, with no index lock held: the object shard lock is never
        // held while taking an index lock.
        let (id, hit) = match self.obtain(shard, content, owner) {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(self.reject(guest, pool, index)),
            Err(e) => {
                self.reject(guest, pool, index);
                return Err(e);
            }
        };
        let kind = match (content, hit) {
            (Content::Fill { .. }, _) => Kind::Fill,
            (Content::Data { .. }, true) => Kind::Twin,
            (Content::Data { .. }, false) => Kind::Fresh,
        };
        self.link(guest, pool, index, Placed { shard, id, kind })
    }

    /// Points (guest, pool, index) at the placed object, on which the caller
    /// holds a reference, and counts the store.
    fn link(&self, guest: GuestId, pool: u32, index: u64, placed: Placed) -> Result<PutOutcome, StoreError> {
        let Placed { shard, id, kind } = placed;
        let handle = ((shard as u32) << (32 - self.obj_bits)) | id;
        let at = self.at(guest, pool, index);
        loop {
            let mut ix = self.index_shard(at);
            match ix.insert(&self.keys, at, handle, &self.budget, self.is_reserved(guest)) {
                Ok(old) => {
                    let old_fill = old.map(|h| self.release(h));
                    let c = ix.counters(guest.0, pool);
                    c.succ_stores += 1;
                    if old.is_none() {
                        c.stored_pages += 1;
                    }
                    if old_fill == Some(true) {
                        c.same_filled_pages -= 1;
                    }
                    match kind {
                        Kind::Fill => c.same_filled_pages += 1,
                        Kind::Twin => c.dedup_hits += 1,
                        Kind::Fresh => {}
                    }
                    drop(ix);
                    self.note_pressure();
                    return Ok(PutOutcome::Stored);
                }
                Err(NoRoom) => {
                    drop(ix);
                    let room = self.make_room(Some(guest));
                    if !matches!(room, Ok(Room::Made)) {
                        self.release(handle);
                        self.reject(guest, pool, index);
                        return room.map(|_| PutOutcome::Rejected);
                    }
                }
            }
        }
    }

    /// Gets a reference on an object holding `content`, making room as needed.
    /// `None`: both tiers are full.
    fn obtain(
        &self,
        shard: usize,
        content: &Content<'_>,
        owner: By,
    ) -> Result<Option<(u32, bool)>, StoreError> {
        let guest = Some(GuestId(owner.guest));
        let spill = self.spill.as_ref();
        loop {
            let got = self.objects[shard]
                .0
                .lock()
                .obtain(content, owner, &self.budget, spill);
            if let Obtained::Ref { id, hit } = got {
                return Ok(Some((id, hit)));
            }
            if let Room::Made = self.make_room(guest)? {
                continue;
            }
            // Nothing in RAM can move: the new page itself goes to the file.
            let Some(spill) = spill else {
                return Ok(None);
            };
            let got = self.objects[shard]
                .0
                .lock()
                .obtain_spilled(content, owner, &self.budget, spill)?;
            return Ok(match got {
                Obtained::Ref { id, hit } => Some((id, hit)),
                Obtained::NeedRoom => None,
            });
        }
    }

    /// Drops one reference; returns whether the object was a fill.
    fn release(&self, handle: u32) -> bool {
        let (shard, id) = self.split_handle(handle);
        self.objects[shard]
            .0
            .lock()
            .release(id, self.spill.as_ref(), &self.budget)
    }

    /// Removes whatever is stored at (guest, pool, index), counts the removal
    /// with `count`, and returns whether a page was there.
    fn remove_page(&self, guest: GuestId, pool: u32, index: u64, count: fn(&mut PageCounters)) -> bool {
        let at = self.at(guest, pool, index);
        let mut ix = self.index_shard(at);
        let old = ix.remove(&self.keys, at, &self.budget);
        let old_fill = old.map(|h| self.release(h));
        let c = ix.counters(guest.0, pool);
        count(c);
        if let Some(was_fill) = old_fill {
            c.forget_page(was_fill);
        }
        ix.tidy(guest.0, pool, &self.budget);
        old.is_some()
    }

    /// A put failed: the old copy must not survive it.
    fn reject(&self, guest: GuestId, pool: u32, index: u64) -> PutOutcome {
        self.remove_page(guest, pool, index, |c| c.failed_stores += 1);
        PutOutcome::Rejected
    }

    /// Makes progress towards free RAM: compacts a shard whose holes add up
    /// to a chunk, or else writes back one cold object (whose RAM becomes a
    /// hole), of a guest over its fair share if there is one (see
    /// [`Store::evict_fair`]). `Full` when neither is possible. `guest` is
    /// the guest whose put needs the room (none: the operator).
    fn make_room(&self, guest: Option<GuestId>) -> Result<Room, StoreError> {
        let n = self.objects.len();
        let start = self.evict_hand.load(Ordering::Relaxed);
        for k in 0..n {
            let mut shard = self.objects[(start + k) % n].0.lock();
            if shard.garbage() >= alloc::CHUNK as u64 && shard.compact(&self.budget) {
                return Ok(Room::Made);
            }
        }
        let Some(spill) = &self.spill else {
            return Ok(Room::Full);
        };
        Ok(match self.evict_fair(spill, guest, false)? {
            Evicted::One => Room::Made,
            // Another thread's writeback will free RAM: wait for it rather
            // than store the page straight into the file under a shard lock.
            Evicted::Busy => {
                std::thread::yield_now();
                Room::Made
            }
            Evicted::TierFull | Evicted::NoVictim => Room::Full,
        })
    }

    /// Writes back one cold object: first from the guests over their fair
    /// share (their coldest pages spill first), and only when none of
    /// theirs is found, from anyone. A guest over its share (`guest`), or
    /// the background writer (`writer`), never takes the fallback while
    /// some guest is over its share: room for an over-share guest comes
    /// from over-share guests, and the writer's headroom is not bought with
    /// the pages of guests within their share.
    ///
    /// The preferred pass looks at [`FAIR_SCAN`] records at most, over all
    /// shards; the fallback is the plain CLOCK.
    fn evict_fair(
        &self,
        spill: &SpillFile,
        guest: Option<GuestId>,
        writer: bool,
    ) -> Result<Evicted, StoreError> {
        let over = self
            .budget
            .shares()
            .over_share(self.budget.limit(), self.budget.used());
        if !over.is_empty() {
            match self.evict_any(spill, Some(&over))? {
                Evicted::NoVictim => {}
                done => return Ok(done),
            }
            if writer || guest.is_some_and(|g| over.contains(g.0)) {
                return Ok(Evicted::NoVictim);
            }
        }
        self.evict_any(spill, None)
    }

    /// Writes back the next cold object (of a guest in `prefer`, if given),
    /// taking the object shards in turn.
    fn evict_any(&self, spill: &SpillFile, prefer: Option<&share::Mask>) -> Result<Evicted, StoreError> {
        let n = self.objects.len();
        let start = self.evict_hand.fetch_add(1, Ordering::Relaxed);
        let scan = (FAIR_SCAN / n).max(slab::BLOCK);
        let mut payload = [0u8; PAGE_SIZE];
        let mut busy = false;
        for k in 0..n {
            let shard = &self.objects[(start + k) % n].0;
            let mut locked = shard.lock();
            let Some(pick) = locked.begin_evict(prefer.map(|m| (m, scan)), &mut payload) else {
                busy |= locked.writing();
                continue;
            };
            drop(locked);
            // The file write (sealing and all) runs with no lock held: a
            // disk that stalls it stalls this writeback, not other guests'
            // gets on the shard.
            let written = spill.write_for(pick.guest(), &payload[..pick.payload_len()], pick.label());
            return shard.lock().end_evict(pick, written, spill, &self.budget);
        }
        Ok(if busy { Evicted::Busy } else { Evicted::NoVictim })
    }

    pub fn get(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        out: &mut Page,
        exclusive: bool,
    ) -> Result<GetOutcome, StoreError> {
        codec::with_scratch(|frame| self.get_into(guest, pool, index, out, exclusive, &mut frame[..]))
    }

    fn get_into(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        out: &mut Page,
        exclusive: bool,
        frame: &mut [u8],
    ) -> Result<GetOutcome, StoreError> {
        let at = self.at(guest, pool, index);
        let mut ix = self.index_shard(at);
        let handle = if exclusive {
            ix.remove(&self.keys, at, &self.budget)
        } else {
            ix.get(at)
        };
        let Some(handle) = handle else {
            ix.counters(guest.0, pool).failed_loads += 1;
            return Ok(GetOutcome::NotFound);
        };
        let (shard, id) = self.split_handle(handle);
        let (loaded, was_fill) = {
            let mut os = self.objects[shard].0.lock();
            let loaded = os.load(id, out, frame, self.spill.as_ref());
            let was_fill = exclusive.then(|| os.release(id, self.spill.as_ref(), &self.budget));
            (loaded, was_fill)
        };
        let c = ix.counters(guest.0, pool);
        if loaded.is_ok() {
            c.loads += 1;
        } else {
            c.failed_loads += 1;
        }
        if let Some(was_fill) = was_fill {
            c.forget_page(was_fill);
            ix.tidy(guest.0, pool, &self.budget);
        }
        drop(ix);
        // Decompression runs with no lock held.
        match loaded? {
            Loaded::Fill(word) => codec::write_fill(out, word),
            Loaded::Raw => {}
            Loaded::Frame(len, how) => {
                codec::decode_frame(&frame[..len], &how, out).map_err(StoreError::Decompress)?
            }
        }
        Ok(GetOutcome::Found)
    }

    /// Returns whether a page was there.
    pub fn invalidate_page(&self, guest: GuestId, pool: u32, index: u64) -> bool {
        self.remove_page(guest, pool, index, |c| c.invalidates += 1)
    }

    /// Drops every page of one pool (swapoff). Returns how many were dropped.
    /// Each index shard finds the pool's tables through its own record, so
    /// the cost is one lookup per index shard plus the pool's pages.
    pub fn invalidate_pool(&self, guest: GuestId, pool: u32) -> u64 {
        self.index
            .iter()
            .map(|shard| {
                shard.0.lock().take_pool(guest.0, pool, &self.budget, |h| {
                    self.release(h);
                })
            })
            .sum()
    }

    /// Drops every page of one guest (device reset, disconnect): the cost
    /// follows that guest's pools and pages.
    pub fn drop_guest(&self, guest: GuestId) -> u64 {
        let dropped = self
            .index
            .iter()
            .map(|shard| {
                shard.0.lock().take_guest(guest.0, &self.budget, |h| {
                    self.release(h);
                })
            })
            .sum();
        // The shared domain's samples and dictionaries go with its last page.
        let forget =
            self.dedup != DedupDomain::Global || self.objects.iter().all(|s| s.0.lock().live_objects() == 0);
        if forget {
            self.dicts.forget(self.domain(guest), &self.budget);
        }
        dropped
    }

    /// Host bytes of metadata the store holds for one guest: its index
    /// tables and pool records, and its objects' records, dedup and fill
    /// entries and owner records (part of the budget; what a per-guest cap
    /// on metadata would be checked against).
    pub fn guest_metadata_bytes(&self, guest: GuestId) -> u64 {
        let index: u64 = self.index.iter().map(|s| s.0.lock().guest_bytes(guest.0)).sum();
        let objects: u64 = self.objects.iter().map(|s| s.0.lock().guest_meta(guest.0)).sum();
        index + objects
    }

    pub fn mem_limit(&self) -> u64 {
        self.budget.limit()
    }

    /// Host bytes the store holds now (what `mem_used_bytes` reports in total).
    pub fn mem_used(&self) -> u64 {
        self.budget.used()
    }

    /// Changes the RAM budget at run time, writing pages back until it fits
    /// (or the spill tier is full: then puts that need memory are rejected
    /// until enough pages go away).
    pub fn set_mem_limit(&self, bytes: u64) -> Result<(), StoreError> {
        self.budget.set_limit(bytes);
        while self.budget.over() {
            if let Room::Full = self.make_room(None)? {
                break;
            }
        }
        Ok(())
    }

    /// Under pressure (RAM within half the headroom of its limit: the
    /// background writer is behind), a guest over its fair share writes one
    /// cold object of the over-share guests back itself before its put is
    /// served, as `balance_dirty_pages` makes a task that dirties pages pay
    /// for their writeback. A flood's writeback cost then lands on the
    /// flooding guest's own worker rather than on the writer that every
    /// guest shares, and its put rate falls to what its own writebacks
    /// allow. Guests within their share never pay here.
    ///
    /// One relaxed load per put while there is room.
    fn pay_own_writeback(&self, guest: GuestId) -> Result<(), StoreError> {
        let Some(spill) = &self.spill else {
            return Ok(());
        };
        let (limit, used) = (self.budget.limit(), self.budget.used());
        if self.headroom == 0 || used + self.headroom / 2 <= limit {
            return Ok(());
        }
        if !self.budget.shares().is_over(guest.0, limit, used) {
            return Ok(());
        }
        match self.evict_fair(spill, Some(guest), false)? {
            Evicted::One => {
                self.throttled_writebacks.fetch_add(1, Ordering::Relaxed);
            }
            // Someone else's writeback is making room, or there is nothing
            // to write: the put goes on and makes room as any put does.
            Evicted::Busy | Evicted::TierFull | Evicted::NoVictim => {}
        }
        Ok(())
    }

    /// Wakes the background writer once RAM is within half the headroom of
    /// its limit. One atomic load per put while there is room.
    fn note_pressure(&self) {
        if self.headroom > 0
            && self.spill.is_some()
            && self.budget.used() + self.headroom / 2 > self.budget.limit()
        {
            self.pressure.raise();
        }
    }

    /// One round of the background writer, for a thread of its own: waits
    /// until a put reports pressure (or `timeout` passes), then writes the
    /// coldest objects back and compacts until RAM is a whole headroom below
    /// the limit. Returns the objects written.
    ///
    /// Puts still make their own room when they meet the limit; with the
    /// writer ahead of them they rarely do, so a put seldom waits for file
    /// I/O. Without a spill tier or headroom it only waits.
    pub fn background_writeback(&self, timeout: std::time::Duration) -> Result<u64, StoreError> {
        self.pressure.wait(timeout);
        let Some(spill) = &self.spill else {
            return Ok(0);
        };
        if self.headroom == 0 {
            return Ok(0);
        }
        let target = self.budget.limit().saturating_sub(self.headroom);
        let mut written = 0;
        while self.budget.used() > target {
            // Holes first: reclaiming them costs no I/O.
            if self.compact_any() {
                continue;
            }
            if self.evict_fair(spill, None, true)? != Evicted::One {
                break;
            }
            written += 1;
        }
        self.background_writebacks.fetch_add(written, Ordering::Release);
        Ok(written)
    }

    /// Compacts one shard whose holes add up to a chunk; false when none has.
    fn compact_any(&self) -> bool {
        self.objects.iter().any(|shard| {
            let mut shard = shard.0.lock();
            shard.garbage() >= alloc::CHUNK as u64 && shard.compact(&self.budget)
        })
    }

    /// Writes up to `pages` of the coldest RAM objects to the spill file.
    pub fn writeback(&self, pages: u64) -> Result<u64, StoreError> {
        let Some(spill) = &self.spill else {
            return Ok(0);
        };
        let mut written = 0;
        while written < pages {
            if self.evict_fair(spill, None, false)? != Evicted::One {
                break;
            }
            written += 1;
        }
        // Turn the holes left behind into free host memory.
        for shard in self.objects.iter() {
            let mut shard = shard.0.lock();
            while shard.garbage() >= alloc::CHUNK as u64 && shard.compact(&self.budget) {}
        }
        Ok(written)
    }

    /// Where the RAM goes: payload chunks versus everything else.
    pub fn memory(&self) -> MemoryUse {
        let (mut payload_chunk_bytes, mut object_bytes, mut objects) = (0, 0, 0);
        for shard in self.objects.iter() {
            let shard = shard.0.lock();
            payload_chunk_bytes += shard.chunk_bytes();
            object_bytes += shard.heap_bytes() - shard.chunk_bytes();
            objects += u64::from(shard.live_objects());
        }
        let (mut index_bytes, mut stored_pages) = (0, 0);
        for shard in self.index.iter() {
            let shard = shard.0.lock();
            index_bytes += shard.heap_bytes();
            shard.pool_pages(|_, _, pages| stored_pages += pages);
        }
        let total_bytes = self.budget.used();
        MemoryUse {
            total_bytes,
            payload_chunk_bytes,
            metadata_bytes: total_bytes.saturating_sub(payload_chunk_bytes),
            index_bytes,
            object_bytes,
            stored_pages,
            objects,
        }
    }

    /// Counters of the whole store, per guest and per pool, with each
    /// guest's [`STATS_POOLS_PER_GUEST`] largest pools by name.
    pub fn stats(&self) -> StoreStats {
        self.stats_top(STATS_POOLS_PER_GUEST)
    }

    /// [`Store::stats`] with at most `top` pools per guest by name (the
    /// largest by stored pages); the rest are summed under [`OTHER_POOLS`].
    ///
    /// Two passes, one shard locked at a time, in memory bounded by `top`,
    /// the shard count and the guest count, whatever the number of pools:
    /// the first takes each shard's `top` largest pools of each guest as
    /// candidates (any pool among a guest's `top` largest in total is among
    /// them, unless its pages are spread thinner than `top` other pools'
    /// in every shard); the second sums the candidates' counters and each
    /// guest's other pools, and keeps the `top` candidates with the most
    /// pages.
    pub fn stats_top(&self, top: usize) -> StoreStats {
        // Read before the shards: the writer adds its count (Release) after its
        // writes are in the shard counters, so it never exceeds `spill_writes`.
        let background_writebacks = self.background_writebacks.load(Ordering::Acquire);
        let mut candidates: HashSet<(u32, u32)> = HashSet::new();
        for shard in self.index.iter() {
            shard.0.lock().top_pools(top, |guest, pool| {
                candidates.insert((guest, pool));
            });
        }
        for shard in self.objects.iter() {
            shard.0.lock().pools(top, |guest, pool| {
                candidates.insert((guest, pool));
            });
        }
        let name = |guest: u32, pool: u32| {
            if candidates.contains(&(guest, pool)) {
                pool
            } else {
                OTHER_POOLS
            }
        };
        let mut gather = Gather::default();
        for shard in self.index.iter() {
            shard.0.lock().add_stats(|guest, pool, c, bytes| {
                gather.add_pages(guest, name(guest, pool), c, bytes);
            });
        }
        for shard in self.objects.iter() {
            shard.0.lock().add_stats(OTHER_POOLS, |guest, pool, c| {
                gather.add_objects(guest, name(guest, pool), c);
            });
        }
        gather.keep_largest(top, OTHER_POOLS);
        let spill_file = self.spill.as_ref().map_or(0, SpillFile::file_bytes);
        let mut stats = gather.finish(self.budget.used(), self.budget.limit(), spill_file);
        stats.background_writebacks = background_writebacks;
        stats.throttled_writebacks = self.throttled_writebacks.load(Ordering::Relaxed);
        let (shares, limit, used) = (self.budget.shares(), self.budget.limit(), self.budget.used());
        for guest in shares.listed() {
            stats.guests.entry(guest).or_default();
        }
        for (&guest, g) in stats.guests.iter_mut() {
            g.budget = shares.view(guest, limit, used);
        }
        stats.codecs = Box::new(self.codec_stats());
        stats
    }

    /// Caps what `guest` may hold, RAM and spill together (`None`: no cap).
    /// A cap below what it holds now drops nothing: its puts are rejected
    /// until invalidations bring it under.
    pub fn set_guest_max(&self, guest: GuestId, max: Option<u64>) -> Result<(), ShareError> {
        if max.is_some() && self.is_reserved(guest) {
            return Err(ShareError::Reserved { guest: guest.0 });
        }
        self.budget.shares().set_max(guest.0, max)
    }

    /// Sets `guest`'s weight: its share of the RAM budget is the limit
    /// times its weight over the sum of the weights of the guests holding
    /// pages. It takes effect the next time room is made.
    pub fn set_guest_weight(&self, guest: GuestId, weight: u32) -> Result<(), ShareError> {
        self.budget.shares().set_weight(guest.0, weight)
    }

    /// What `guest` holds, its cap, weight and fair share now.
    pub fn guest_budget(&self, guest: GuestId) -> GuestBudget {
        self.budget
            .shares()
            .view(guest.0, self.budget.limit(), self.budget.used())
    }

    /// Payloads by encoding, recompressions and dictionaries.
    pub fn codec_stats(&self) -> CodecStats {
        let mut c = CodecStats::default();
        for shard in self.objects.iter() {
            let n = shard.0.lock().codec_counts();
            c.raw_pages += n.raw;
            c.zstd_pages += n.zstd;
            c.lz4_pages += n.lz4;
            c.dict_pages += n.dict;
            c.recompressions += n.recompressed;
            c.recompress_kept += n.kept;
        }
        let d = self.dicts.counts();
        c.dict_versions = d.live;
        c.dict_bytes = d.bytes;
        c.dicts_trained = d.trained;
        c.dicts_freed = d.freed;
        c
    }

    /// Dedup candidates compared by all puts so far, and puts that stopped
    /// at [`MAX_CANDIDATES`] and were stored without dedup.
    pub fn dedup_compares(&self) -> (u64, u64) {
        self.objects.iter().fold((0, 0), |(c, t), shard| {
            let (dc, dt) = shard.0.lock().dedup_compares();
            (c + dc, t + dt)
        })
    }

    /// Index tables looked at by all operations so far (benchmarks and
    /// tests of what one operation touches).
    pub fn index_tables_visited(&self) -> u64 {
        self.index.iter().map(|s| s.0.lock().visited()).sum()
    }
}

#[cfg(test)]
mod fair_tests;

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, os::unix::fs::FileExt, sync::Arc, time::Duration};

    use assert_matches::assert_matches;

    use super::*;

    /// Compressible and unique per seed (about 4:1 with zstd -1).
    fn text_page(seed: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let words: [&[u8]; 8] = [
            b"alpha ", b"beta ", b"gamma ", b"delta ", b"swap ", b"page ", b"tmem ", b"host ",
        ];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut at = 0;
        while at < PAGE_SIZE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = words[(x % 8) as usize];
            let n = w.len().min(PAGE_SIZE - at);
            p[at..at + n].copy_from_slice(&w[..n]);
            at += n;
        }
        p[..8].copy_from_slice(&seed.to_le_bytes());
        p
    }

    /// Incompressible: stored raw, a whole page each.
    pub(super) fn noise_page(seed: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    fn store(mem_limit: u64) -> Store {
        Store::new(StoreConfig {
            mem_limit,
            ..StoreConfig::default()
        })
        .unwrap()
    }

    fn reserving_store(dir: &tempfile::TempDir, mem_limit: u64, spill_limit: u64, pages: u64) -> Store {
        Store::new(StoreConfig {
            mem_limit,
            spill: Some(SpillConfig {
                path: dir.path().join("spill"),
                limit: spill_limit,
            }),
            reserved: vec![Reservation {
                guest: GuestId(1),
                pages,
            }],
            ..StoreConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_reservation_needs_a_spill_file_that_holds_it() {
        let r = Reservation {
            guest: GuestId(0),
            pages: 100,
        };
        let no_spill = Store::new(StoreConfig {
            reserved: vec![r],
            ..StoreConfig::default()
        });
        assert_matches!(no_spill.err(), Some(StoreError::ReservationWithoutSpill));
        let dir = tempfile::tempdir().unwrap();
        let small = Store::new(StoreConfig {
            spill: Some(SpillConfig {
                path: dir.path().to_owned(),
                limit: r.spill_bytes() - 1,
            }),
            reserved: vec![r],
            ..StoreConfig::default()
        });
        assert_matches!(small.err(), Some(StoreError::ReservationTooLarge { need, .. }) if need == r.spill_bytes());
    }

    /// The room guarantee: with RAM far too small and another guest filling
    /// the shared part of the file, every put of the reserved guest is
    /// stored, overwrites included, and reads back.
    #[test]
    fn a_reserved_guest_is_never_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pages = 600u64;
        let r = Reservation {
            guest: GuestId(1),
            pages,
        };
        let s = reserving_store(&dir, 1 << 20, r.spill_bytes() + (256 << 10), pages);
        // The reserved guest is far over its fair share all along: that
        // costs it RAM (its pages spill first), never a put.
        s.set_guest_weight(GuestId(0), 10_000).unwrap();
        let mut other_rejected = 0;
        for round in 0..2u64 {
            for i in 0..pages {
                // The other guest takes whatever RAM and shared file there is.
                for j in 0..3 {
                    if put(&s, 0, 0, i * 3 + j, &noise_page(round << 40 | i << 2 | j)) == PutOutcome::Rejected
                    {
                        other_rejected += 1;
                    }
                }
                let outcome = s
                    .put(GuestId(1), 0, i, &noise_page(1 << 50 | round << 40 | i))
                    .unwrap();
                assert_eq!(outcome, PutOutcome::Stored, "round {round} page {i}");
                // Zero pages and twins are metadata only: never refused either.
                if i % 7 == 0 {
                    assert_eq!(s.put_fill(GuestId(1), 1, i, 0).unwrap(), PutOutcome::Stored);
                }
            }
        }
        assert!(other_rejected > 0, "the other guest met a full store");
        assert_matches!(
            s.set_guest_max(GuestId(1), Some(1 << 20)),
            Err(ShareError::Reserved { guest: 1 })
        );
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..pages {
            assert_eq!(
                s.get(GuestId(1), 0, i, &mut page, false).unwrap(),
                GetOutcome::Found
            );
            assert_eq!(page, noise_page(1 << 50 | 1 << 40 | i), "page {i}");
        }
        let g = &s.stats().guests[&1];
        assert_eq!(g.total.stored_pages, pages + pages.div_ceil(7));
        assert_eq!(g.total.failed_stores, 0);
    }

    fn spill_store(dir: &tempfile::TempDir, mem_limit: u64, spill_limit: u64) -> Store {
        Store::new(StoreConfig {
            mem_limit,
            spill: Some(SpillConfig {
                path: dir.path().join("spill"),
                limit: spill_limit,
            }),
            ..StoreConfig::default()
        })
        .unwrap()
    }

    fn get(s: &Store, g: u32, pool: u32, index: u64) -> Option<Page> {
        let mut out = [0u8; PAGE_SIZE];
        match s.get(GuestId(g), pool, index, &mut out, false).unwrap() {
            GetOutcome::Found => Some(out),
            GetOutcome::NotFound => None,
        }
    }

    fn put(s: &Store, g: u32, pool: u32, index: u64, page: &Page) -> PutOutcome {
        s.put(GuestId(g), pool, index, page).unwrap()
    }

    #[test]
    fn every_kind_of_page_round_trips() {
        let s = store(64 << 20);
        let mut filled = [0u8; PAGE_SIZE];
        codec::write_fill(&mut filled, 0x0102_0304_0506_0708);
        let pages = [[0u8; PAGE_SIZE], filled, text_page(1), noise_page(2)];
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(put(&s, 0, 0, i as u64, p), PutOutcome::Stored);
        }
        assert_eq!(
            s.put_fill(GuestId(0), 0, 9, 0x0102_0304_0506_0708).unwrap(),
            PutOutcome::Stored
        );
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(get(&s, 0, 0, i as u64).as_ref(), Some(p), "page {i}");
        }
        assert_eq!(get(&s, 0, 0, 9), Some(filled));
        assert_eq!(get(&s, 0, 0, 4), None);
        let t = s.stats().total;
        assert_eq!(t.stored_pages, 5);
        assert_eq!(t.same_filled_pages, 3);
        assert_eq!(t.unique_pages, 2);
        assert_eq!(t.orig_data_bytes, 5 * PAGE_SIZE as u64);
        assert_eq!(t.loads, 5);
        assert_eq!(t.failed_loads, 1);
        assert!(t.compr_data_bytes < 2 * PAGE_SIZE as u64 && t.compr_data_bytes > PAGE_SIZE as u64);
    }

    #[test]
    fn put_replaces_and_exclusive_get_removes() {
        let s = store(64 << 20);
        put(&s, 0, 1, 5, &text_page(1));
        put(&s, 0, 1, 5, &text_page(2));
        assert_eq!(get(&s, 0, 1, 5), Some(text_page(2)));
        let mut out = [0u8; PAGE_SIZE];
        assert_eq!(
            s.get(GuestId(0), 1, 5, &mut out, true).unwrap(),
            GetOutcome::Found
        );
        assert_eq!(out, text_page(2));
        assert_eq!(get(&s, 0, 1, 5), None);
        let t = s.stats().total;
        assert_eq!((t.stored_pages, t.unique_pages, t.succ_stores), (0, 0, 2));
    }

    /// Found by the `store_ops` fuzz target: one object shard left no handle
    /// bit for the shard, and `Store::new` overflowed shifting by 32
    /// (`fuzz/corpus/store_ops/regression-one-shard`).
    #[test]
    fn one_object_shard_is_rounded_up_to_two() {
        for shards in [1, 2, 3] {
            let s = Store::new(StoreConfig {
                shards,
                ..StoreConfig::default()
            })
            .unwrap();
            for i in 0..64u8 {
                assert_eq!(put(&s, 0, 0, i.into(), &noise_page(i.into())), PutOutcome::Stored);
            }
            for i in 0..64u8 {
                assert_eq!(
                    get(&s, 0, 0, i.into()),
                    Some(noise_page(i.into())),
                    "shards {shards}, page {i}"
                );
            }
        }
    }

    #[test]
    fn invalidate_page_pool_and_guest() {
        let s = store(64 << 20);
        for g in 0..2 {
            for pool in 0..2 {
                for i in 0..50 {
                    put(&s, g, pool, i, &text_page(u64::from(g * 1000 + pool * 100) + i));
                }
            }
        }
        assert!(s.invalidate_page(GuestId(0), 0, 3));
        assert!(!s.invalidate_page(GuestId(0), 0, 3));
        assert_eq!(get(&s, 0, 0, 3), None);
        assert_eq!(s.invalidate_pool(GuestId(0), 1), 50);
        assert_eq!(get(&s, 0, 1, 7), None);
        assert_eq!(get(&s, 0, 0, 7), Some(text_page(7)));
        assert_eq!(s.drop_guest(GuestId(1)), 100);
        assert_eq!(get(&s, 1, 0, 7), None);
        let st = s.stats();
        assert_eq!(st.total.stored_pages, 49);
        assert_eq!(st.total.unique_pages, 49);
        assert_eq!(st.guests[&0].pools[&0].stored_pages, 49);
        assert_eq!(st.guests[&0].pools[&0].invalidates, 2);
        assert_eq!(st.guests[&1].total.stored_pages, 0);
    }

    #[test]
    fn accounting_returns_to_the_start_when_emptied() {
        let s = store(64 << 20);
        let empty = s.mem_used();
        for i in 0..3000 {
            put(&s, 0, 0, i, &text_page(i));
        }
        let full = s.memory();
        assert!(full.total_bytes > empty + 3000 * 500);
        assert_eq!(s.stats().total.mem_used_bytes, full.total_bytes);
        s.drop_guest(GuestId(0));
        let mem = s.memory();
        assert_eq!(mem.payload_chunk_bytes, 0);
        // Slab blocks are kept for reuse; everything else is back.
        assert!(
            mem.total_bytes < empty + (256 << 10),
            "{} vs {}",
            mem.total_bytes,
            empty
        );
    }

    #[test]
    fn dedup_within_guest_by_default() {
        let s = store(64 << 20);
        let p = text_page(42);
        put(&s, 0, 0, 1, &p);
        put(&s, 0, 1, 2, &p);
        put(&s, 1, 0, 1, &p);
        let t = s.stats().total;
        assert_eq!(t.stored_pages, 3);
        assert_eq!(t.unique_pages, 2, "shared in guest 0, not across guests");
        assert_eq!(t.dedup_hits, 1);
        // Refcounting: dropping one reference leaves the other readable.
        assert!(s.invalidate_page(GuestId(0), 0, 1));
        assert_eq!(get(&s, 0, 1, 2), Some(p));
        assert_eq!(s.stats().total.unique_pages, 2);
        assert!(s.invalidate_page(GuestId(0), 1, 2));
        assert_eq!(s.stats().total.unique_pages, 1);
    }

    #[test]
    fn dedup_domains() {
        for (dedup, unique) in [
            (DedupDomain::Off, 3),
            (DedupDomain::Guest, 2),
            (DedupDomain::Global, 1),
        ] {
            let s = Store::new(StoreConfig {
                dedup,
                ..StoreConfig::default()
            })
            .unwrap();
            let p = text_page(7);
            put(&s, 0, 0, 1, &p);
            put(&s, 0, 0, 2, &p);
            put(&s, 1, 0, 1, &p);
            assert_eq!(s.stats().total.unique_pages, unique, "{dedup:?}");
            for (g, i) in [(0, 1), (0, 2), (1, 1)] {
                assert_eq!(get(&s, g, 0, i), Some(p));
            }
        }
    }

    /// Puts pages over indices 0..n (several rounds, so later puts overwrite),
    /// checking against a model that a rejection drops exactly the old copy.
    /// Returns how many rejections overwrote a stored page.
    fn fill_until_rejections(s: &Store, n: u64, limit: u64) -> u64 {
        let mut model: HashMap<u64, Page> = HashMap::new();
        let mut overwrites_rejected = 0;
        for step in 0..4 * n {
            let i = step % n;
            let p = noise_page(step + 1);
            match put(s, 0, 0, i, &p) {
                PutOutcome::Stored => {
                    model.insert(i, p);
                }
                PutOutcome::Rejected => {
                    overwrites_rejected += u64::from(model.remove(&i).is_some());
                }
            }
            assert!(s.mem_used() <= limit);
        }
        for i in 0..n {
            assert_eq!(get(s, 0, 0, i), model.get(&i).copied(), "page {i}");
        }
        let t = s.stats().total;
        assert_eq!(t.stored_pages, model.len() as u64);
        assert!(t.failed_stores > 0);
        overwrites_rejected
    }

    #[test]
    fn ram_only_budget_is_hard_and_rejection_drops_the_old_copy() {
        let limit = 512 << 10;
        let s = store(limit);
        assert!(fill_until_rejections(&s, 400, limit) > 0);
    }

    #[test]
    fn churn_within_a_ram_budget_keeps_working() {
        // Invalidations leave holes; compaction must turn them back into room,
        // or a RAM-only store would start rejecting for good.
        let limit = 1 << 20;
        let s = store(limit);
        let mut model: HashMap<u64, Page> = HashMap::new();
        let mut x = 7u64;
        let mut rejected = 0;
        for step in 0..6000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (x >> 33) % 600;
            if x % 5 == 0 {
                s.invalidate_page(GuestId(0), 0, i);
                model.remove(&i);
            } else {
                let p = text_page(step);
                match put(&s, 0, 0, i, &p) {
                    PutOutcome::Stored => {
                        model.insert(i, p);
                    }
                    PutOutcome::Rejected => {
                        rejected += 1;
                        model.remove(&i);
                    }
                }
            }
            assert!(s.mem_used() <= limit);
        }
        for i in 0..600 {
            assert_eq!(get(&s, 0, 0, i), model.get(&i).copied(), "page {i}");
        }
        // 600 text pages need well under the budget once packed.
        assert_eq!(rejected, 0);
        let mem = s.memory();
        assert!(mem.payload_chunk_bytes < 2 * model.len() as u64 * 1400, "{mem:?}");
    }

    #[test]
    fn spill_round_trip_keeps_ram_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 1 << 20;
        let s = spill_store(&dir, limit, 64 << 20);
        let n = 2000;
        for i in 0..n {
            let p = if i % 2 == 0 { text_page(i) } else { noise_page(i) };
            assert_eq!(put(&s, 0, 0, i, &p), PutOutcome::Stored, "page {i}");
            assert!(s.mem_used() <= limit);
        }
        let t = s.stats().total;
        assert!(t.spilled_pages > n / 2, "{t:?}");
        assert!(t.spill_writes > 0 && t.writebacks >= t.spill_writes);
        for i in 0..n {
            let p = if i % 2 == 0 { text_page(i) } else { noise_page(i) };
            assert_eq!(get(&s, 0, 0, i), Some(p), "page {i}");
        }
        assert!(s.stats().total.spill_reads > 0);
        // Exclusive gets free the file slots and the next puts reuse them.
        let file = s.stats().total.spill_file_bytes;
        let mut out = [0u8; PAGE_SIZE];
        for round in 0..3 {
            for i in 0..n {
                s.get(GuestId(0), 0, i, &mut out, true).unwrap();
            }
            for i in 0..n {
                let p = if i % 2 == 0 {
                    text_page(i + round)
                } else {
                    noise_page(i + round)
                };
                assert_eq!(put(&s, 0, 0, i, &p), PutOutcome::Stored);
            }
        }
        assert!(
            s.stats().total.spill_file_bytes <= file + (256 << 10),
            "file space is reused"
        );
    }

    fn headroom_store(dir: &tempfile::TempDir, mem_limit: u64, headroom: u64) -> Store {
        Store::new(StoreConfig {
            mem_limit,
            spill: Some(SpillConfig {
                path: dir.path().join("spill"),
                limit: 64 << 20,
            }),
            writeback_headroom: headroom,
            ..StoreConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn the_background_writer_restores_the_headroom() {
        let dir = tempfile::tempdir().unwrap();
        let (limit, headroom) = (2 << 20, 512 << 10);
        let s = headroom_store(&dir, limit, headroom);
        assert_eq!(
            s.background_writeback(Duration::ZERO).unwrap(),
            0,
            "no pressure, nothing to do"
        );
        let mut i = 0;
        // Until a put reports pressure: RAM within half the headroom of the limit.
        while s.mem_used() + headroom / 2 <= limit {
            assert_eq!(put(&s, 0, 0, i, &text_page(i)), PutOutcome::Stored);
            i += 1;
        }
        assert_eq!(s.stats().total.spill_writes, 0, "no put had to write back yet");
        let written = s.background_writeback(Duration::from_secs(10)).unwrap();
        assert!(written > 0);
        assert!(s.mem_used() <= limit - headroom, "{} of {limit}", s.mem_used());
        let stats = s.stats();
        assert_eq!(stats.background_writebacks, written);
        assert_eq!(stats.total.spill_writes, written);
        for k in 0..i {
            assert_eq!(get(&s, 0, 0, k), Some(text_page(k)), "page {k}");
        }
    }

    #[test]
    fn without_headroom_or_spill_the_writer_only_waits() {
        let dir = tempfile::tempdir().unwrap();
        for s in [headroom_store(&dir, 1 << 20, 0), store(1 << 20)] {
            for i in 0..600 {
                put(&s, 0, 0, i, &text_page(i));
            }
            assert_eq!(s.background_writeback(Duration::ZERO).unwrap(), 0);
            assert_eq!(s.stats().background_writebacks, 0);
        }
    }

    #[test]
    fn a_writer_thread_keeps_ahead_of_the_puts() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 2 << 20;
        let s = Arc::new(headroom_store(&dir, limit, 1 << 20));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    s.background_writeback(Duration::from_millis(5)).unwrap();
                }
            })
        };
        let n = 6000;
        for i in 0..n {
            assert_eq!(put(&s, 0, 0, i, &text_page(i)), PutOutcome::Stored);
            assert!(s.mem_used() <= limit);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let stats = s.stats();
        assert!(stats.background_writebacks > 0, "{stats:?}");
        assert!(stats.total.spilled_pages > 0);
        for i in 0..n {
            assert_eq!(get(&s, 0, 0, i), Some(text_page(i)), "page {i}");
        }
    }

    #[test]
    fn with_almost_no_ram_new_pages_go_straight_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = spill_store(&dir, 1 << 40, 64 << 20);
        let base = s.mem_used();
        // Room for the records each shard makes for its first objects, and
        // not for one payload chunk.
        let slack = s.objects.len() as u64 * (4 << 10);
        assert!(slack < alloc::CHUNK as u64 * 2);
        s.set_mem_limit(base + slack).unwrap();
        for i in 0..50 {
            assert_eq!(put(&s, 0, 0, i, &noise_page(i)), PutOutcome::Stored, "page {i}");
            assert!(s.mem_used() <= base + slack);
        }
        // Dedup still finds the copy in the file.
        assert_eq!(put(&s, 0, 1, 0, &noise_page(0)), PutOutcome::Stored);
        let t = s.stats().total;
        assert_eq!((t.spilled_pages, t.unique_pages, t.dedup_hits), (51, 50, 1));
        for i in 0..50 {
            assert_eq!(get(&s, 0, 0, i), Some(noise_page(i)));
        }
        s.drop_guest(GuestId(0));
        assert_eq!(s.mem_used(), base);
        assert_eq!(s.stats().total.spill_file_bytes, 0);
    }

    #[test]
    fn both_tiers_full_rejects_and_invalidates_only_that_page() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 256 << 10;
        let s = spill_store(&dir, limit, 256 << 10);
        assert!(fill_until_rejections(&s, 300, limit) > 0);
        assert!(s.stats().total.spilled_pages > 0);
    }

    #[test]
    fn corrupt_spill_byte_is_an_error_never_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = spill_store(&dir, 256 << 10, 64 << 20);
        let n = 200;
        for i in 0..n {
            put(&s, 0, 0, i, &text_page(i));
        }
        s.writeback(1000).unwrap();
        assert!(s.stats().total.spilled_pages > 0);
        // The file has no name: write through the store's own descriptor.
        let file = s.spill.as_ref().unwrap().file();
        let len = s.stats().total.spill_file_bytes;
        for off in (40..len).step_by(4096) {
            file.write_all_at(&[0x5a], off).unwrap();
        }
        let mut errors = 0;
        for i in 0..n {
            let mut out = [0u8; PAGE_SIZE];
            match s.get(GuestId(0), 0, i, &mut out, false) {
                Ok(GetOutcome::Found) => assert_eq!(out, text_page(i), "page {i}"),
                Ok(GetOutcome::NotFound) => panic!("page {i} lost"),
                Err(e) => {
                    assert_matches!(e, StoreError::Corrupt { .. });
                    errors += 1;
                }
            }
        }
        assert!(errors > 0);
    }

    #[test]
    fn enospc_from_the_filesystem_means_full() {
        // /dev/full fails every write with ENOSPC; the spill path never opens a device.
        let full = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .unwrap();
        let s = Store::with_spill(
            StoreConfig {
                mem_limit: 256 << 10,
                ..StoreConfig::default()
            },
            Some(SpillFile::sealed_over(full, 1 << 30)),
        );
        let mut rejected = false;
        for i in 0..500 {
            match s.put(GuestId(0), 0, i, &noise_page(i)) {
                Ok(PutOutcome::Stored) => {}
                Ok(PutOutcome::Rejected) => rejected = true,
                Err(e) => panic!("ENOSPC must reject, not fail: {e}"),
            }
        }
        assert!(rejected);
        assert_eq!(s.stats().total.spilled_pages, 0);
    }

    #[test]
    fn lowering_the_limit_and_writeback_spill_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = spill_store(&dir, 64 << 20, 64 << 20);
        for i in 0..500 {
            put(&s, 0, 0, i, &text_page(i));
        }
        assert_eq!(s.writeback(10).unwrap(), 10);
        assert_eq!(s.stats().total.spilled_pages, 10);
        let target = s.mem_used() / 2;
        s.set_mem_limit(target).unwrap();
        assert!(s.mem_used() <= target);
        assert_eq!(s.mem_limit(), target);
        for i in 0..500 {
            assert_eq!(get(&s, 0, 0, i), Some(text_page(i)));
        }
        assert_eq!(store(1 << 20).writeback(5).unwrap(), 0, "no spill tier");
    }

    #[test]
    fn threads_share_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(spill_store(&dir, 2 << 20, 256 << 20));
        // Every fourth page is shared by all threads, to exercise dedup under contention.
        let page_for = |t: u32, i: u64| {
            if i % 4 == 0 {
                text_page(i)
            } else {
                text_page(u64::from(t) << 32 | i)
            }
        };
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for round in 0..3u64 {
                        for i in 0..400u64 {
                            let p = page_for(t, i);
                            assert_eq!(s.put(GuestId(0), t, i, &p).unwrap(), PutOutcome::Stored);
                            let mut out = [0u8; PAGE_SIZE];
                            if round % 2 == 1 {
                                s.get(GuestId(0), t, i, &mut out, i % 3 == 0).unwrap();
                                assert_eq!(out, p);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(s.mem_used() <= 2 << 20);
        for t in 0..4u32 {
            for i in 0..400u64 {
                assert_eq!(get(&s, 0, t, i), Some(page_for(t, i)));
            }
        }
    }

    // Hostile input: one test per attack on the store, each asserting its bound.

    /// 20,000 x (PUT_FILL or PUT to a new pool, then INVALIDATE_PAGE) leaves
    /// the budget, the guest's metadata and the stats where they started.
    #[test]
    fn pool_churn_leaves_no_metadata_behind() {
        let s = store(64 << 20);
        let g = GuestId(4);
        s.put_fill(g, 0, 0, 9).unwrap();
        s.invalidate_page(g, 0, 0);
        let (used, meta) = (s.mem_used(), s.guest_metadata_bytes(g));
        assert_eq!(meta, 0);
        for pool in 1..=20_000u32 {
            if pool % 10 == 0 {
                put(&s, 4, pool, u64::from(pool), &text_page(u64::from(pool)));
            } else {
                s.put_fill(g, pool, u64::from(pool), u64::from(pool)).unwrap();
            }
            assert!(s.guest_metadata_bytes(g) > 0);
            assert!(s.invalidate_page(g, pool, u64::from(pool)));
            assert_eq!(s.mem_used(), used, "pool {pool}");
        }
        assert_eq!(s.guest_metadata_bytes(g), meta);
        let st = s.stats();
        assert_eq!(st.guests[&4].pools.keys().collect::<Vec<_>>(), vec![&OTHER_POOLS]);
        let other = &st.guests[&4].pools[&OTHER_POOLS];
        assert_eq!(
            (other.succ_stores, other.invalidates, other.stored_pages),
            (20_001, 20_001, 0)
        );
        assert!(serde_json::to_string(&st).unwrap().len() < 4096);
    }

    /// Metadata is counted while it lives: pools holding pages cost their
    /// guest budget, are listed at most 32 by name, and go with their pages.
    #[test]
    fn live_pools_are_counted_listed_within_a_bound_and_freed() {
        let s = store(64 << 20);
        let (g, other) = (GuestId(5), GuestId(6));
        put(&s, 6, 0, 0, &text_page(1));
        let (used, victim_meta) = (s.mem_used(), s.guest_metadata_bytes(other));
        assert!(victim_meta > 0);
        for pool in 0..3000u32 {
            s.put_fill(g, pool, 0, 1).unwrap();
            s.put_fill(g, pool, 1 << 40, 2).unwrap();
        }
        let meta = s.guest_metadata_bytes(g);
        // Two tables and a pool record per pool: at least 100 bytes each.
        assert!(meta > 3000 * 100, "{meta}");
        // The two fill objects (deduped across the pools) are charged to `g`
        // whole, but when the keyed placement puts them in guest 6's shard
        // their record, dedup slot and owner may sit in blocks and tables
        // that guest 6's page already made (and that `used` counts). The
        // pools' own tables are never shared.
        let objects_meta: u64 = s.objects.iter().map(|sh| sh.0.lock().guest_meta(g.0)).sum();
        assert!(objects_meta < 1024, "{objects_meta}");
        assert!(
            s.mem_used() + objects_meta >= used + meta,
            "{} vs {used} + {meta}",
            s.mem_used()
        );
        assert_eq!(s.guest_metadata_bytes(other), victim_meta);
        let st = s.stats();
        let pools = &st.guests[&5].pools;
        assert_eq!(pools.len(), STATS_POOLS_PER_GUEST + 1);
        assert_eq!(pools[&OTHER_POOLS].stored_pages, 2 * (3000 - 32));
        assert_eq!(st.guests[&5].total.stored_pages, 6000);
        assert_eq!(st.guests[&5].total.metadata_bytes, meta);
        assert!(serde_json::to_string(&st).unwrap().len() < 32 << 10);
        for pool in 0..3000u32 {
            assert_eq!(s.invalidate_pool(g, pool), 2);
        }
        assert_eq!((s.mem_used(), s.guest_metadata_bytes(g)), (used, 0));
        assert_eq!(get(&s, 6, 0, 0), Some(text_page(1)));
    }

    /// With every page and fill hashing to one value (the test hook), each
    /// put compares at most MAX_CANDIDATES stored objects, then stores its
    /// page without dedup; every page still reads back as written.
    #[test]
    fn colliding_hashes_cost_each_put_at_most_the_candidate_bound() {
        let mut s = store(64 << 20);
        s.keys.collide = true;
        let n = 300u64;
        for i in 0..n {
            let (before, _) = s.dedup_compares();
            if i % 3 == 0 {
                s.put_fill(GuestId(1), 0, i, i + 1).unwrap();
            } else {
                put(&s, 1, 0, i, &text_page(i));
            }
            let (after, _) = s.dedup_compares();
            assert!(
                after - before <= u64::from(MAX_CANDIDATES),
                "put {i}: {} compares",
                after - before
            );
        }
        let (_, too_many) = s.dedup_compares();
        assert!(too_many >= n - 2 * u64::from(MAX_CANDIDATES), "{too_many}");
        for i in 0..n {
            let want = if i % 3 == 0 {
                let mut p = [0u8; PAGE_SIZE];
                codec::write_fill(&mut p, i + 1);
                p
            } else {
                text_page(i)
            };
            assert_eq!(get(&s, 1, 0, i), Some(want), "page {i}");
        }
        assert_eq!(s.stats().total.unique_pages, n - n / 3);
        // Another guest's puts and gets on the same (flooded) key still work.
        put(&s, 2, 0, 0, &text_page(5));
        assert_eq!(get(&s, 2, 0, 0), Some(text_page(5)));
        s.drop_guest(GuestId(1));
        s.drop_guest(GuestId(2));
        assert_eq!(s.memory().objects, 0);
    }

    /// In the Guest domain the owner is checked too: a page equal to another
    /// guest's, with an equal hash, is not shared.
    #[test]
    fn equal_hashes_never_share_across_guests_in_the_guest_domain() {
        let mut s = store(64 << 20);
        s.keys.collide = true;
        let p = text_page(3);
        put(&s, 0, 0, 0, &p);
        put(&s, 1, 0, 0, &p);
        put(&s, 0, 1, 0, &p);
        let t = s.stats().total;
        assert_eq!((t.unique_pages, t.dedup_hits), (2, 1));
    }

    /// A new index group costs the same whatever other guests hold, and
    /// INVALIDATE_POOL looks only at that pool's tables.
    #[test]
    fn a_new_group_costs_the_same_beside_any_number_of_groups() {
        let s = store(1 << 30);
        let victim = GuestId(9);
        let cost = |pool: u32| {
            let v = s.index_tables_visited();
            s.put_fill(victim, pool, 0, 1).unwrap();
            s.index_tables_visited() - v
        };
        let alone = cost(0);
        for pool in 0..30_000u32 {
            s.put_fill(GuestId(8), pool, u64::from(pool) << 32, 3).unwrap();
        }
        assert_eq!(cost(1), alone, "tables visited by a new group's put");
        let v = s.index_tables_visited();
        assert_eq!(s.invalidate_pool(victim, 77), 0);
        assert_eq!(
            s.index_tables_visited(),
            v,
            "an empty pool's invalidate looks at nothing"
        );
        for i in 0..200 {
            s.put_fill(victim, 2, i, 1).unwrap();
        }
        let v = s.index_tables_visited();
        assert_eq!(s.invalidate_pool(victim, 2), 200);
        // One table per index shard holding the pool's pages at most.
        assert!(s.index_tables_visited() - v <= s.index.len() as u64);
        assert_eq!(s.drop_guest(GuestId(8)), 30_000);
    }
}
