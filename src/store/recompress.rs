//! The background recompressor (`--compression auto`): puts store lz4,
//! and pages that stay cold are re-encoded with zstd at the configured level
//! and their domain's trained dictionary (see `dict`).
//!
//! A round takes one object shard at a time: under its lock it copies out a
//! batch of cold payloads (the recompressor's own CLOCK bit, [`WARM`], which
//! gets and dedup hits set), then encodes them with no lock held, then takes
//! the lock again to swap each payload that is still the one it copied (a get
//! meanwhile only warms it; an invalidate, overwrite or compaction may have
//! freed or moved it, and `ObjShard::swap_payload` checks). The shard lock is
//! never held while compressing, and the dictionaries' lock never with a shard
//! lock.
//!
//! [`WARM`]: super::slab::WARM

use std::{collections::HashMap, sync::Arc};

use super::{
    codec::{self, Decoder, COMPRESS_BOUND},
    dict::Dict,
    objects::Cold,
    slab::{Codec, Obj},
    GuestId, Page, Store, StoreError, PAGE_SIZE,
};

/// Objects copied out of one shard per lock hold.
const BATCH: usize = 64;
/// Records one shard's sweep looks at per round, at most.
const SCAN: usize = 8192;

/// One payload encoded again: its length (0: leave the object as it is),
/// codec, dictionary slot and dictionary.
type Encoding = (usize, Codec, u8, Option<Arc<Dict>>);

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecompressRound {
    /// Payloads re-encoded.
    pub recompressed: u64,
    /// lz4 payloads that zstd did not shrink, now left as they are.
    pub kept: u64,
    /// Objects found used since the last sweep (they wait for the next).
    pub warm: u64,
    /// Dictionaries trained at the end of the round.
    pub trained: u64,
}

impl RecompressRound {
    /// Whether the round found nothing to do: every page settled and cold.
    pub fn idle(&self) -> bool {
        self.recompressed + self.kept + self.warm + self.trained == 0
    }
}

impl Store {
    /// One round of the recompressor, for a thread of its own: re-encodes up
    /// to `max_pages` cold pages (the caller's rate limit), then trains
    /// dictionaries whose samples are ready and frees those no object uses.
    /// Without `--compression auto` it does nothing.
    pub fn recompress(&self, max_pages: usize) -> Result<RecompressRound, StoreError> {
        let mut round = RecompressRound::default();
        if !self.recompress {
            return Ok(round);
        }
        let level = self.zstd_level;
        let (mut cold, mut bytes, mut encoded) = (Vec::new(), Vec::new(), Vec::new());
        let mut encodings: Vec<Encoding> = Vec::new();
        let mut found = 0;
        for lock in self.objects.iter() {
            if found >= max_pages {
                break;
            }
            // Each domain's current dictionary slot, looked up before the shard lock.
            let currents = self.dicts.current_slots();
            let wants = |guest: u32, o: &Obj| {
                let current = currents.get(&self.domain(GuestId(guest))).copied();
                match o.codec() {
                    Codec::Lz4 => true,
                    // Recompressed before the domain had a dictionary.
                    Codec::Zstd => current.is_some(),
                    Codec::Dict => current != Some(o.dict_slot()),
                    Codec::Lz4Kept => false,
                }
            };
            loop {
                cold.clear();
                bytes.clear();
                let batch = BATCH.min(max_pages - found);
                round.warm += lock.0.lock().cold_batch(batch, SCAN, wants, &mut cold, &mut bytes) as u64;
                if cold.is_empty() {
                    break;
                }
                found += cold.len();
                self.encode_batch(&cold, &bytes, level, &mut encoded, &mut encodings)?;
                let mut os = lock.0.lock();
                let (mut at, mut new_at) = (0, 0);
                for (c, (len, codec, slot, dict)) in cold.iter().zip(&encodings) {
                    let old = &bytes[at..at + c.len];
                    let new = &encoded[new_at..new_at + len];
                    at += c.len;
                    new_at += len;
                    if *len == 0 {
                        continue;
                    }
                    if *len >= c.len && c.codec == Codec::Lz4 {
                        os.keep_lz4(c, old);
                        round.kept += 1;
                    } else if os.swap_payload(c, old, new, *codec, *slot, dict.as_ref(), &self.budget) {
                        round.recompressed += 1;
                    }
                }
                drop(os);
                if cold.len() < batch || found >= max_pages {
                    break;
                }
            }
        }
        // Out of cold pages: a domain with a short sample trains on what it has.
        round.trained = self.dicts.train_and_retire(level, found < max_pages, &self.budget);
        Ok(round)
    }

    /// Decodes each copied payload and encodes it again: with the domain's
    /// dictionary if it has one, else plain zstd (and the page is sampled
    /// for its first dictionary). Lengths of 0 mean "leave it".
    fn encode_batch(
        &self,
        cold: &[Cold],
        bytes: &[u8],
        level: i32,
        encoded: &mut Vec<u8>,
        encodings: &mut Vec<Encoding>,
    ) -> Result<(), StoreError> {
        encoded.clear();
        encodings.clear();
        let mut dicts: HashMap<u32, Option<(u8, Arc<Dict>)>> = HashMap::new();
        let mut at = 0;
        let mut page: Page = [0u8; PAGE_SIZE];
        let mut out = [0u8; COMPRESS_BOUND];
        for c in cold {
            let old = &bytes[at..at + c.len];
            at += c.len;
            let domain = self.domain(GuestId(c.guest));
            let how = match c.codec {
                Codec::Lz4 | Codec::Lz4Kept => Some(Decoder::Lz4),
                Codec::Zstd => Some(Decoder::Zstd),
                Codec::Dict => self.dicts.get(domain, c.slot).map(Decoder::Dict),
            };
            let decoded = how.is_some_and(|how| codec::decode_frame(old, &how, &mut page).is_ok());
            if !decoded {
                // Changed under us (a retired slot is never reused while held) or
                // damaged: a get will report it; nothing to do here.
                encodings.push((0, Codec::Zstd, 0, None));
                continue;
            }
            let current = dicts
                .entry(domain)
                .or_insert_with(|| self.dicts.current(domain))
                .clone();
            let (len, codec, slot, dict) = match current {
                Some((slot, dict)) => {
                    let len = codec::compress_dict(&page, level, &dict, &mut out).map_err(StoreError::Compress)?;
                    self.dicts.note(domain, PAGE_SIZE as u64, len as u64);
                    (len, Codec::Dict, slot, Some(dict))
                }
                None => (
                    codec::compress(&page, level, &mut out).map_err(StoreError::Compress)?,
                    Codec::Zstd,
                    0,
                    None,
                ),
            };
            // Sampled while the domain trains (its first dictionary, or after drift).
            self.dicts.sample(domain, &page, &self.budget);
            encoded.extend_from_slice(&out[..len]);
            encodings.push((len, codec, slot, dict));
        }
        Ok(())
    }
}
