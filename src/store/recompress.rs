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
    alloc::CHUNK,
    codec::{self, Decoder, COMPRESS_BOUND},
    dict::Dict,
    objects::Cold,
    slab::{Codec, Obj},
    GuestId, Page, Store, StoreError, PAGE_SIZE,
};

/// Objects copied out of one shard per lock hold.
const BATCH: usize = 64;
/// Highest level of recompression without a dictionary (see `encode_batch`).
const PLAIN_LEVEL: i32 = 3;
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
            // One lap of the shard per round at most: a page left for later
            // (a sample waiting for its dictionary) is not met twice.
            let mut lap = lock.0.lock().records() as usize;
            loop {
                cold.clear();
                bytes.clear();
                let batch = BATCH.min(max_pages - found);
                let (looked, cooled) =
                    lock.0
                        .lock()
                        .cold_batch(batch, SCAN.min(lap), wants, &mut cold, &mut bytes);
                lap = lap.saturating_sub(looked);
                round.warm += cooled as u64;
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
                // Swaps leave holes where the larger payloads were: a background
                // round can afford to give them back now.
                while os.garbage() >= CHUNK as u64 && os.compact(&self.budget) {}
                drop(os);
                if cold.len() < batch || found >= max_pages || lap == 0 {
                    break;
                }
            }
        }
        // Out of cold pages: a domain with a short sample trains on what it has.
        round.trained = self
            .dicts
            .train_and_retire(level, found < max_pages, &self.budget);
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
                    let len =
                        codec::compress_dict(&page, level, &dict, &mut out).map_err(StoreError::Compress)?;
                    self.dicts.note(domain, PAGE_SIZE as u64, len as u64);
                    (len, Codec::Dict, slot, Some(dict))
                }
                // Before the domain's first dictionary: zstd alone, at a level
                // no higher than 3 (cheap; it is encoded again once the
                // dictionary comes, unless the domain stays too small for one).
                None => (
                    codec::compress(&page, level.min(PLAIN_LEVEL), &mut out).map_err(StoreError::Compress)?,
                    Codec::Zstd,
                    0,
                    None,
                ),
            };
            // Each page is sampled once: as it leaves lz4, or while the domain
            // retrains after drift.
            self.dicts.sample(domain, &page, &self.budget);
            encoded.extend_from_slice(&out[..len]);
            encodings.push((len, codec, slot, dict));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Compression, GetOutcome, StoreConfig};

    /// Pages shaped like a program's heap: records of a shared layout (the
    /// same field names and tags in every page) around per-page values, so
    /// a dictionary trained on some pages helps all of them.
    fn heap_page(seed: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let fields: [&[u8]; 6] = [
            b"{\"name\":\"",
            b"\",\"size\":",
            b",\"owner\":\"daemon\",\"flags\":[",
            b"],\"next\":0x7f",
            b"/usr/lib/x86_64-linux-gnu/",
            b"\x00\x00\x00\x00\x10\x00\x00\x00",
        ];
        let mut at = 0;
        while at < PAGE_SIZE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = fields[(x % 6) as usize];
            let n = f.len().min(PAGE_SIZE - at);
            p[at..at + n].copy_from_slice(&f[..n]);
            at += n;
            let v = (x >> 20).to_le_bytes();
            let n = 3.min(PAGE_SIZE - at);
            p[at..at + n].copy_from_slice(&v[..n]);
            at += n;
        }
        p
    }

    fn auto_store() -> Store {
        Store::new(StoreConfig {
            mem_limit: 1 << 30,
            compression: Compression::Auto,
            zstd_level: 3,
            ..StoreConfig::default()
        })
        .unwrap()
    }

    /// Rounds until the recompressor has nothing left; returns them.
    fn settle(s: &Store) -> usize {
        for rounds in 1..200 {
            if s.recompress(100_000).unwrap().idle() {
                return rounds;
            }
        }
        panic!("the recompressor never settled");
    }

    fn reads_back(s: &Store, guest: u32, pages: &[(u64, Page)]) {
        let mut out = [0u8; PAGE_SIZE];
        for (index, page) in pages {
            assert_eq!(
                s.get(GuestId(guest), 0, *index, &mut out, false).unwrap(),
                GetOutcome::Found
            );
            assert!(out == *page, "guest {guest} index {index}");
        }
    }

    #[test]
    fn cold_pages_settle_with_a_dictionary_per_domain_and_read_back() {
        let s = auto_store();
        let big: Vec<(u64, Page)> = (0..700).map(|i| (i, heap_page(i))).collect();
        let small: Vec<(u64, Page)> = (0..20).map(|i| (i, heap_page(10_000 + i))).collect();
        for (i, p) in &big {
            s.put(GuestId(1), 0, *i, p).unwrap();
        }
        for (i, p) in &small {
            s.put(GuestId(2), 0, *i, p).unwrap();
        }
        let hot = s.stats();
        assert_eq!(hot.codecs.lz4_pages, 720);
        assert_eq!(hot.codecs.dict_versions, 0);
        // Just put, everything is warm: the first round only cools.
        let first = s.recompress(100_000).unwrap();
        assert_eq!((first.recompressed, first.warm), (0, 720));
        settle(&s);
        let settled = s.stats();
        let c = &settled.codecs;
        assert_eq!(c.lz4_pages, c.recompress_kept, "{c:?}");
        assert_eq!(
            c.dict_versions, 1,
            "the small guest has too few pages for one: {c:?}"
        );
        assert!(c.dict_pages >= 690 && c.zstd_pages <= 20 + 10, "{c:?}");
        assert!(c.dict_bytes > 0 && c.recompressions >= 720);
        assert!(
            settled.total.compr_data_bytes * 10 < hot.total.compr_data_bytes * 9,
            "{} settled against {} hot",
            settled.total.compr_data_bytes,
            hot.total.compr_data_bytes
        );
        assert_eq!(s.memory().total_bytes, s.mem_used());
        reads_back(&s, 1, &big);
        reads_back(&s, 2, &small);
        // Gets warmed them all; nothing is left to encode.
        let after = s.recompress(100_000).unwrap();
        assert_eq!(after.recompressed, 0);
    }

    #[test]
    fn a_retrained_dictionary_retires_the_old_one_once_unused() {
        let fresh = auto_store().mem_used();
        let s = auto_store();
        let first: Vec<(u64, Page)> = (0..600).map(|i| (i, heap_page(i))).collect();
        for (i, p) in &first {
            s.put(GuestId(1), 0, *i, p).unwrap();
        }
        settle(&s);
        assert_eq!(s.dicts.current_version(1), Some(1));
        // As drift would: sample anew, from the next cold pages.
        s.dicts.start_sampling(1);
        let second: Vec<(u64, Page)> = (1000..1600).map(|i| (i, heap_page(i * 7))).collect();
        for (i, p) in &second {
            s.put(GuestId(1), 0, *i, p).unwrap();
        }
        settle(&s);
        let c = s.stats().codecs;
        assert_eq!(s.dicts.current_version(1), Some(2));
        assert_eq!(
            (c.dicts_trained, c.dicts_freed, c.dict_versions),
            (2, 1, 1),
            "{c:?}"
        );
        let users: u32 = s.objects.iter().map(|o| o.0.lock().dict_users()).sum();
        assert_eq!(u64::from(users), c.dict_pages);
        reads_back(&s, 1, &first);
        reads_back(&s, 1, &second);
        // The guest goes: its dictionary with it, and the budget back to the start.
        s.drop_guest(GuestId(1));
        let c = s.stats().codecs;
        assert_eq!((c.dict_versions, c.dict_bytes, c.dicts_freed), (0, 0, 2), "{c:?}");
        assert_eq!(s.mem_used(), fresh);
    }

    #[test]
    fn a_dictionary_held_by_a_get_is_not_freed_under_it() {
        let s = auto_store();
        let pages: Vec<(u64, Page)> = (0..300).map(|i| (i, heap_page(i))).collect();
        for (i, p) in &pages {
            s.put(GuestId(3), 0, *i, p).unwrap();
        }
        settle(&s);
        let (slot, dict) = s.dicts.current(3).unwrap();
        s.dicts.start_sampling(3);
        for (i, _) in &pages {
            s.put(GuestId(3), 1, *i, &heap_page(*i + 5000).map(|b| b ^ 0x20))
                .unwrap();
        }
        settle(&s);
        // Version 1 is retired and no object names it, but it is held here.
        let c = s.stats().codecs;
        assert_eq!(c.dict_versions, 2, "{c:?}");
        assert_eq!(s.dicts.get(3, slot).map(|d| d.version()), Some(1));
        drop(dict);
        s.recompress(1).unwrap();
        assert_eq!(s.stats().codecs.dict_versions, 1);
    }

    #[test]
    fn lz4_and_zstd_stores_never_recompress() {
        for compression in [Compression::Lz4, Compression::Zstd] {
            let s = Store::new(StoreConfig {
                compression,
                ..StoreConfig::default()
            })
            .unwrap();
            s.put(GuestId(0), 0, 0, &heap_page(1)).unwrap();
            for _ in 0..3 {
                assert!(s.recompress(10).unwrap().idle());
            }
            let c = s.stats().codecs;
            assert_eq!(
                (c.lz4_pages, c.zstd_pages),
                if compression == Compression::Lz4 {
                    (1, 0)
                } else {
                    (0, 1)
                }
            );
            reads_back(&s, 0, &[(0, heap_page(1))]);
        }
    }
}
