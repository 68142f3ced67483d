//! Trained zstd dictionaries for the recompressor, one set per dedup domain.
//!
//! A dictionary is trained from pages of its own domain only: shared
//! between guests, its contents (strings of one guest's memory) would shape
//! how another guest's pages compress, a channel between them. Each domain
//! has [`DICT_SLOTS`] slots; an object records its slot, and a slot is reused
//! only once nothing holds its dictionary: not an object (the object shards
//! hold a reference while any object of theirs uses it), nor a get decoding
//! with it, nor the recompressor encoding with it.
//!
//! Only the recompressor thread and the stats take this registry's lock, and
//! never while holding a shard lock: puts and gets do not come here.

use std::{
    collections::HashMap,
    fmt, io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;
use zstd::zstd_safe::DDict;

use super::{budget::Budget, codec, slab::DICT_SLOTS, Page, PAGE_SIZE};

/// Largest dictionary trained. 16 KiB: on the corpora in docs/design.md a
/// larger one gained little per page, and every guest has its own.
pub const DICT_BYTES: usize = 16 << 10;
/// Pages a domain samples before it trains (zstd suggests about a hundred
/// times the dictionary's size).
pub const SAMPLE_PAGES: usize = 512;
/// Fewest pages a dictionary is trained from, when the recompressor has run
/// out of cold pages before [`SAMPLE_PAGES`]. A domain with fewer keeps its
/// sample (and its pages zstd without a dictionary) until it has more.
pub const MIN_SAMPLE_PAGES: usize = 64;
/// Pages encoded with the current dictionary between checks for drift.
pub const DRIFT_WINDOW: u64 = 4096;
/// A ratio below this share of the one measured at training means the
/// domain's pages have drifted from the dictionary: it is retrained.
pub const DRIFT: f64 = 0.9;

/// One trained dictionary: its bytes, which the recompressor's context
/// loads for compression, and its form prepared for decompression.
///
/// No prepared compression form is kept per dictionary: at level 3 zstd's
/// tables made it about 450 KB, against 16 KB of dictionary (see
/// `codec::compress_dict`).
pub struct Dict {
    /// Unique in the process: which dictionary a context has loaded.
    id: u64,
    version: u32,
    raw: Vec<u8>,
    ddict: DDict<'static>,
    bytes: u64,
}

static DICT_IDS: AtomicU64 = AtomicU64::new(1);

impl fmt::Debug for Dict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dict")
            .field("version", &self.version)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Dict {
    /// Prepares `raw` (a trained dictionary) for decompression.
    pub fn new(raw: &[u8], version: u32) -> io::Result<Dict> {
        let ddict =
            DDict::try_create(raw).ok_or_else(|| io::Error::other("zstd cannot load the dictionary"))?;
        let bytes = (raw.len() + ddict.sizeof()) as u64;
        Ok(Dict {
            id: DICT_IDS.fetch_add(1, Ordering::Relaxed),
            version,
            raw: raw.to_vec(),
            ddict,
            bytes,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    #[cfg(test)]
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Host bytes of both prepared forms (what the budget counts).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn ddict(&self) -> &DDict<'static> {
        &self.ddict
    }
}

/// The dictionaries' figures for the stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DictCounts {
    /// Dictionaries alive now (current ones and retired ones still in use).
    pub live: u64,
    pub bytes: u64,
    pub trained: u64,
    pub freed: u64,
}

#[derive(Default)]
struct Domain {
    slots: [Option<Arc<Dict>>; DICT_SLOTS],
    current: Option<u8>,
    /// Versions trained so far in this domain.
    versions: u32,
    /// Pages kept for the next training, while it is wanted.
    samples: Vec<u8>,
    sampling: bool,

    /// Page bytes over encoded bytes on the sample, with the dictionary.
    trained_ratio: f64,
    window_in: u64,
    window_out: u64,
}

impl Domain {
    /// Frees the dictionaries that are not current and that nothing holds.
    fn free_unused(&mut self) -> u64 {
        let mut freed = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let retired = self.current != Some(i as u8);
            if retired && slot.as_ref().is_some_and(|dict| Arc::strong_count(dict) == 1) {
                *slot = None;
                freed += 1;
            }
        }
        freed
    }

    /// Holds nothing: the registry may forget it (it starts sampling again
    /// when it next gets pages).
    fn is_empty(&self) -> bool {
        self.current.is_none() && self.samples.is_empty() && self.slots.iter().all(Option::is_none)
    }

    fn held_bytes(&self) -> u64 {
        let dicts: u64 = self.slots.iter().flatten().map(|d| d.bytes()).sum();
        dicts + self.samples.capacity() as u64
    }
}

/// The dictionaries of every domain.
#[derive(Default)]
pub struct Dictionaries {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    domains: HashMap<u32, Domain>,
    /// Bytes counted in the budget: dictionaries and held samples.
    counted: u64,
    trained: u64,
    freed: u64,
}

impl Inner {
    fn settle(&mut self, budget: &Budget) {
        let now = self.domains.values().map(Domain::held_bytes).sum();
        budget.settle(&mut self.counted, now);
    }
}

impl Dictionaries {
    /// The domain's current dictionary and its slot.
    pub fn current(&self, domain: u32) -> Option<(u8, Arc<Dict>)> {
        let inner = self.inner.lock();
        let d = inner.domains.get(&domain)?;
        let slot = d.current?;
        Some((slot, Arc::clone(d.slots[usize::from(slot)].as_ref()?)))
    }

    /// Each domain's current slot (for the recompressor's choice of pages).
    pub fn current_slots(&self) -> HashMap<u32, u8> {
        let inner = self.inner.lock();
        inner
            .domains
            .iter()
            .filter_map(|(&domain, d)| Some((domain, d.current?)))
            .collect()
    }

    /// The dictionary in a domain's slot, current or retired.
    pub fn get(&self, domain: u32, slot: u8) -> Option<Arc<Dict>> {
        let inner = self.inner.lock();
        inner.domains.get(&domain)?.slots.get(usize::from(slot))?.clone()
    }

    /// Keeps `page` for the domain's next training, if it wants samples and
    /// the budget has room for them. The sample grows as pages come (a
    /// small domain holds a small one), up to [`SAMPLE_PAGES`].
    pub fn sample(&self, domain: u32, page: &Page, budget: &Budget) {
        const WHOLE: usize = SAMPLE_PAGES * PAGE_SIZE;
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let d = inner.domains.entry(domain).or_insert_with(|| Domain {
            sampling: true,
            ..Domain::default()
        });
        if !d.sampling || d.samples.len() >= WHOLE {
            return;
        }
        if d.samples.len() == d.samples.capacity() {
            let cap = d.samples.capacity();
            let grown = (2 * cap).clamp(16 * PAGE_SIZE, WHOLE);
            if !budget.try_reserve((grown - cap) as u64) {
                return;
            }
            inner.counted += (grown - cap) as u64;
            d.samples.reserve_exact(grown - cap);
        }
        d.samples.extend_from_slice(page);
        inner.settle(budget);
    }

    /// Counts one page encoded with the current dictionary; past a window
    /// whose ratio fell below [`DRIFT`] of the trained one, sampling for a
    /// new version starts.
    pub fn note(&self, domain: u32, page_bytes: u64, encoded: u64) {
        let mut inner = self.inner.lock();
        let Some(d) = inner.domains.get_mut(&domain) else {
            return;
        };
        d.window_in += page_bytes;
        d.window_out += encoded;
        if d.window_in >= DRIFT_WINDOW * PAGE_SIZE as u64 {
            let ratio = d.window_in as f64 / d.window_out.max(1) as f64;
            if ratio < DRIFT * d.trained_ratio {
                d.sampling = true;
            }
            d.window_in = 0;
            d.window_out = 0;
        }
    }

    /// Trains a new version for every domain whose sample is full (or, with
    /// `short`, holds at least [`MIN_SAMPLE_PAGES`]) and that has a free
    /// slot, and frees the dictionaries that nothing holds any more.
    /// Returns the dictionaries trained.
    pub fn train_and_retire(&self, level: i32, short: bool, budget: &Budget) -> u64 {
        let mut inner = self.inner.lock();
        let mut trained = 0;
        let mut freed = 0;
        for d in inner.domains.values_mut() {
            freed += d.free_unused();
            let pages = d.samples.len() / PAGE_SIZE;
            let ready = pages >= SAMPLE_PAGES || (short && pages >= MIN_SAMPLE_PAGES);
            let Some(free) = d.slots.iter().position(Option::is_none) else {
                continue;
            };
            if !d.sampling || !ready {
                continue;
            }
            // A failed training (too few distinct samples, say) waits for more pages.
            if let Some((dict, ratio)) = train(&d.samples, level, d.versions + 1) {
                d.versions += 1;
                d.slots[free] = Some(Arc::new(dict));
                d.current = Some(free as u8);
                d.trained_ratio = ratio;
                d.sampling = false;
                d.samples = Vec::new();
                d.window_in = 0;
                d.window_out = 0;
                trained += 1;
            } else if pages >= SAMPLE_PAGES {
                d.samples.clear();
            }
        }
        // A forgotten domain goes once its last dictionary has.
        inner.domains.retain(|_, d| !d.is_empty());
        inner.trained += trained;
        inner.freed += freed;
        inner.settle(budget);
        trained
    }

    /// Forgets a domain (its guest is gone): its samples now, and its
    /// dictionaries as [`Dictionaries::train_and_retire`] finds them unused.
    pub fn forget(&self, domain: u32, budget: &Budget) {
        let mut inner = self.inner.lock();
        if let Some(d) = inner.domains.get_mut(&domain) {
            d.current = None;
            d.samples = Vec::new();
            let freed = d.free_unused();
            if d.is_empty() {
                inner.domains.remove(&domain);
            }
            inner.freed += freed;
        }
        inner.settle(budget);
    }

    pub fn counts(&self) -> DictCounts {
        let inner = self.inner.lock();
        let mut c = DictCounts {
            trained: inner.trained,
            freed: inner.freed,
            ..DictCounts::default()
        };
        for dict in inner.domains.values().flat_map(|d| d.slots.iter().flatten()) {
            c.live += 1;
            c.bytes += dict.bytes();
        }
        c
    }

    /// The version of the domain's current dictionary.
    #[cfg(test)]
    pub fn current_version(&self, domain: u32) -> Option<u32> {
        self.current(domain).map(|(_, d)| d.version())
    }

    /// Starts sampling for a new version now, as drift would.
    #[cfg(test)]
    pub fn start_sampling(&self, domain: u32) {
        if let Some(d) = self.inner.lock().domains.get_mut(&domain) {
            d.sampling = true;
        }
    }
}

/// Trains a dictionary from whole pages; returns it with the ratio it gives
/// on them.
pub(super) fn train(samples: &[u8], level: i32, version: u32) -> Option<(Dict, f64)> {
    let sizes = vec![PAGE_SIZE; samples.len() / PAGE_SIZE];
    let raw = zstd::dict::from_continuous(samples, &sizes, DICT_BYTES).ok()?;
    let dict = Dict::new(&raw, version).ok()?;
    let mut out = [0u8; codec::COMPRESS_BOUND];
    let mut encoded = 0u64;
    for page in samples.chunks_exact(PAGE_SIZE) {
        let mut p = [0u8; PAGE_SIZE];
        p.copy_from_slice(page);
        encoded += codec::compress_dict(&p, level, &dict, &mut out).ok()? as u64;
    }
    Some((dict, samples.len() as f64 / encoded.max(1) as f64))
}
