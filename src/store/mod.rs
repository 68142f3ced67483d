//! The page store: what the device keeps for its guests.
//!
//! No vhost or virtqueue types appear here; the device calls into this module
//! from one worker thread per virtqueue, so every method takes `&self` and is
//! safe to call concurrently.
//!
//! PLACEHOLDER: this file currently holds the agreed public API backed by a
//! plain map, so that the device can be built against it. The compressed,
//! deduplicated, two-tier implementation replaces the internals (issue 2).

#[allow(dead_code)] // wired into Store in the next commit
mod alloc;
#[allow(dead_code)]
mod budget;
#[allow(dead_code)]
mod codec;
#[allow(dead_code)]
mod objects;
#[allow(dead_code)]
mod slab;
#[allow(dead_code)]
mod spill;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    pub path: PathBuf,
    /// Most bytes the spill file may grow to.
    pub limit: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Host RAM the store may use: payload, allocator slack and metadata.
    pub mem_limit: u64,
    pub spill: Option<SpillConfig>,
    pub zstd_level: i32,
    pub dedup: DedupDomain,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            mem_limit: 256 << 20,
            spill: None,
            zstd_level: 1,
            dedup: DedupDomain::Guest,
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
    #[error("cannot open spill file {path}")]
    OpenSpill {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spill file I/O failed")]
    SpillIo(#[source] std::io::Error),
    #[error("stored object at spill offset {offset} fails its checksum")]
    Corrupt { offset: u64 },
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub total: Counters,
    pub pools: BTreeMap<u32, Counters>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub total: Counters,
    pub mem_limit_bytes: u64,
    pub guests: BTreeMap<u32, GuestStats>,
}

type Key = (GuestId, u32, u64);

pub struct Store {
    config: Mutex<StoreConfig>,
    pages: Mutex<HashMap<Key, Box<Page>>>,
}

impl Store {
    pub fn new(config: StoreConfig) -> Result<Self, StoreError> {
        Ok(Store {
            config: Mutex::new(config),
            pages: Mutex::new(HashMap::new()),
        })
    }

    pub fn put(&self, guest: GuestId, pool: u32, index: u64, page: &Page) -> Result<PutOutcome, StoreError> {
        self.pages.lock().insert((guest, pool, index), Box::new(*page));
        Ok(PutOutcome::Stored)
    }

    /// Stores the page made of `fill` repeated (PUT_FILL).
    pub fn put_fill(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        fill: u64,
    ) -> Result<PutOutcome, StoreError> {
        let mut page = [0u8; PAGE_SIZE];
        for word in page.chunks_exact_mut(8) {
            word.copy_from_slice(&fill.to_ne_bytes());
        }
        self.put(guest, pool, index, &page)
    }

    pub fn get(
        &self,
        guest: GuestId,
        pool: u32,
        index: u64,
        out: &mut Page,
        exclusive: bool,
    ) -> Result<GetOutcome, StoreError> {
        let mut pages = self.pages.lock();
        let key = (guest, pool, index);
        match pages.get(&key) {
            Some(p) => {
                out.copy_from_slice(&p[..]);
                if exclusive {
                    pages.remove(&key);
                }
                Ok(GetOutcome::Found)
            }
            None => Ok(GetOutcome::NotFound),
        }
    }

    /// Returns whether a page was there.
    pub fn invalidate_page(&self, guest: GuestId, pool: u32, index: u64) -> bool {
        self.pages.lock().remove(&(guest, pool, index)).is_some()
    }

    /// Drops every page of one pool (swapoff). Returns how many were dropped.
    pub fn invalidate_pool(&self, guest: GuestId, pool: u32) -> u64 {
        let mut pages = self.pages.lock();
        let before = pages.len();
        pages.retain(|k, _| !(k.0 == guest && k.1 == pool));
        (before - pages.len()) as u64
    }

    /// Drops every page of one guest (device reset, disconnect).
    pub fn drop_guest(&self, guest: GuestId) -> u64 {
        let mut pages = self.pages.lock();
        let before = pages.len();
        pages.retain(|k, _| k.0 != guest);
        (before - pages.len()) as u64
    }

    pub fn mem_limit(&self) -> u64 {
        self.config.lock().mem_limit
    }

    /// Changes the RAM budget at run time, writing pages back until it fits.
    pub fn set_mem_limit(&self, bytes: u64) -> Result<(), StoreError> {
        self.config.lock().mem_limit = bytes;
        Ok(())
    }

    /// Writes up to `pages` of the coldest RAM pages to the spill file.
    pub fn writeback(&self, _pages: u64) -> Result<u64, StoreError> {
        Ok(0)
    }

    pub fn stats(&self) -> StoreStats {
        let pages = self.pages.lock();
        let mut stats = StoreStats {
            mem_limit_bytes: self.mem_limit(),
            ..Default::default()
        };
        stats.total.stored_pages = pages.len() as u64;
        stats
    }
}
