//! The store's secret keys, drawn once at start, and the hashes made with them.
//!
//! Every hash whose value decides where a guest's data goes, or which stored
//! objects a put compares against, is keyed, so a guest cannot choose inputs
//! that pile up in one place:
//! - the content hash of a page (dedup key and object shard);
//! - the hash of a fill (dedup key and object shard of a same-filled page);
//! - index placement (index shard and the place of a run in its table), and
//!   the maps of a guest's pools and index groups.
//!
//! Keys: std's `RandomState` takes a 128-bit SipHash key from the OS
//! (`getrandom(2)`). SipHash-1-3 under that key (std's `DefaultHasher`) hashes
//! the short inputs, and expands the 192-byte xxh3 secret in counter mode.
//!
//! Why xxh3 with a secret for the 4 KiB content hash, and not SipHash: on
//! this machine SipHash-1-3 costs 2.7-4.2 µs a page against 0.2-0.8 µs for
//! xxh3 (`tmem-bench hostile` prints both), a fifth to a third of a put.
//! What xxh3 promises, and what it does not:
//! - xxh3 is not a cryptographic hash or a PRF. Its authors say a custom
//!   secret makes collisions hard to produce from outside, not impossible;
//!   there is no proof.
//! - The attack that works on the seeded hash (making a word's product term
//!   zero by matching its low half to the secret's, then balancing the
//!   words' sum; see `bench::hostile::crafted_page`) needs the secret, and
//!   with 1,536 unknown bits every lane's product is a random-looking
//!   function of the data. The known differential tricks then hold with
//!   probability about 2^-32 per lane, and every one of the 8 accumulators
//!   must cancel before the block's scramble.
//! - The guest never sees a hash value: only the time of a put, when it meets
//!   a candidate, leaks a bit, and a candidate is met once in 2^32 unrelated
//!   pages.
//! - And the bound does not rest on it: whatever the hash, a put compares at
//!   most [`super::objects::MAX_CANDIDATES`] candidates and then stores its
//!   page without dedup, so a collision costs the colliding guest its dedup
//!   and nothing more.

use std::{collections::hash_map::RandomState, hash::BuildHasher};

use super::Page;

/// xxh3's default secret length (the most it reads from a custom one).
const SECRET_LEN: usize = 192;

pub struct Keys {
    /// SipHash-1-3 keyed from the OS.
    sip: RandomState,
    secret: [u8; SECRET_LEN],
    /// Test hook: every page and every fill hashes to one value.
    #[cfg(test)]
    pub collide: bool,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

impl Keys {
    pub fn new() -> Self {
        let sip = RandomState::new();
        let mut secret = [0u8; SECRET_LEN];
        for (i, w) in secret.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&sip.hash_one((b"tmem xxh3 secret", i)).to_le_bytes());
        }
        Keys {
            sip,
            secret,
            #[cfg(test)]
            collide: false,
        }
    }

    /// A keyed hasher for maps whose keys a guest chooses (pool ids, upper
    /// index halves).
    pub fn map_hasher(&self) -> RandomState {
        self.sip.clone()
    }

    /// The content hash of a page in a dedup domain: (32-bit record key,
    /// 64-bit shard hash). Equal pages in one domain get equal values; the
    /// domain is hashed in, so the same page lands apart in two domains.
    pub fn page(&self, page: &Page, domain: u32) -> (u32, u64) {
        #[cfg(test)]
        if self.collide {
            return (0x5eed, 0);
        }
        let h = xxhash_rust::xxh3::xxh3_128_with_secret(&page[..], &self.secret);
        let x = self.sip.hash_one((h, domain));
        (x as u32, x.rotate_left(32))
    }

    /// The hash of a same-filled page: its low 32 bits are its record key,
    /// its high bits pick the object shard.
    pub fn fill(&self, word: u64, domain: u32) -> u64 {
        #[cfg(test)]
        if self.collide {
            return 0x5eed;
        }
        self.sip.hash_one((word, domain, b'f'))
    }

    /// The placement hash of the aligned run of 64 indices `index` is in: its
    /// top bits pick the index shard, the rest place the run in its table.
    pub fn run(&self, guest: u32, pool: u32, index: u64) -> u64 {
        self.sip.hash_one((guest, pool, index >> super::index::RUN_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_store_and_domains_separate() {
        let (a, b) = (Keys::new(), Keys::new());
        assert_ne!(a.secret, b.secret);
        let mut page = [0u8; crate::store::PAGE_SIZE];
        page[7] = 1;
        assert_eq!(a.page(&page, 1), a.page(&page, 1));
        assert_ne!(a.page(&page, 1), a.page(&page, 2));
        assert_ne!(a.page(&page, 1), b.page(&page, 1));
        assert_ne!(a.fill(0, 1), a.fill(0, 2));
        assert_eq!(a.run(1, 2, 0), a.run(1, 2, 63));
        assert_ne!(a.run(1, 2, 0), a.run(1, 2, 64));
    }

    #[test]
    fn the_seeded_collisions_do_not_carry_over() {
        let k = Keys::new();
        let pages: std::collections::HashSet<_> = (0..64)
            .map(|n| k.page(&crate::bench::hostile::crafted_page(3, n), 3))
            .collect();
        assert_eq!(pages.len(), 64);
    }
}
