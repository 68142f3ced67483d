//! Summing the counters kept in the shards into [`StoreStats`].
//!
//! Counters are kept where their lock is already held: page counters per pool
//! in the index shards, object counters per creating (guest, pool) in the
//! object shards. Nothing on the per-page path touches a shared counter; the
//! sum is built only when someone asks.
//!
//! The report is bounded: each guest's largest pools are listed by name and
//! the rest summed under [`super::OTHER_POOLS`], so its size does not follow
//! how many pools a guest opens.

use std::collections::BTreeMap;

use super::{index::PageCounters, owners::ObjCounters, Counters, GuestStats, StoreStats};

impl Counters {
    /// Adds every field of `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        let Counters {
            succ_stores,
            failed_stores,
            loads,
            failed_loads,
            invalidates,
            stored_pages,
            same_filled_pages,
            dedup_hits,
            unique_pages,
            orig_data_bytes,
            compr_data_bytes,
            mem_used_bytes,
            spilled_pages,
            spill_file_bytes,
            spill_reads,
            spill_writes,
            writebacks,
            metadata_bytes,
        } = other;
        self.succ_stores += succ_stores;
        self.failed_stores += failed_stores;
        self.loads += loads;
        self.failed_loads += failed_loads;
        self.invalidates += invalidates;
        self.stored_pages += stored_pages;
        self.same_filled_pages += same_filled_pages;
        self.dedup_hits += dedup_hits;
        self.unique_pages += unique_pages;
        self.orig_data_bytes += orig_data_bytes;
        self.compr_data_bytes += compr_data_bytes;
        self.mem_used_bytes += mem_used_bytes;
        self.spilled_pages += spilled_pages;
        self.spill_file_bytes += spill_file_bytes;
        self.spill_reads += spill_reads;
        self.spill_writes += spill_writes;
        self.writebacks += writebacks;
        self.metadata_bytes += metadata_bytes;
    }
}

/// Per-(guest, pool) partial sums, gathered from the shards.
#[derive(Default)]
pub struct Gather {
    pools: BTreeMap<(u32, u32), Counters>,
}

impl Gather {
    #[cfg(test)]
    pub fn add(&mut self, guest: u32, pool: u32, c: &Counters) {
        self.pools.entry((guest, pool)).or_default().add(c);
    }

    /// A pool's page counters and the index bytes it holds (metadata).
    pub fn add_pages(&mut self, guest: u32, pool: u32, c: &PageCounters, bytes: u64) {
        let sum = self.pools.entry((guest, pool)).or_default();
        c.add_to(sum);
        sum.mem_used_bytes += bytes;
        sum.metadata_bytes += bytes;
    }

    /// A pool's object counters: its RAM is its payload slots plus its metadata.
    pub fn add_objects(&mut self, guest: u32, pool: u32, c: &ObjCounters) {
        let sum = self.pools.entry((guest, pool)).or_default();
        c.add_to(sum);
        sum.mem_used_bytes += c.metadata_bytes;
    }

    #[cfg(test)]
    pub fn add_mem(&mut self, guest: u32, pool: u32, bytes: u64) {
        self.pools.entry((guest, pool)).or_default().mem_used_bytes += bytes;
    }

    /// Keeps by name the `top` pools of each guest with the most stored
    /// pages (ties: the lower pool id) and sums the others into `other`.
    pub fn keep_largest(&mut self, top: usize, other: u32) {
        let mut named: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
        for (&(guest, pool), c) in &self.pools {
            if pool != other {
                named.entry(guest).or_default().push((c.stored_pages, pool));
            }
        }
        for (guest, mut pools) in named {
            if pools.len() <= top {
                continue;
            }
            pools.sort_unstable_by_key(|&(n, pool)| (std::cmp::Reverse(n), pool));
            for &(_, pool) in &pools[top..] {
                if let Some(c) = self.pools.remove(&(guest, pool)) {
                    self.pools.entry((guest, other)).or_default().add(&c);
                }
            }
        }
    }

    /// Builds the report. Totals of `mem_used_bytes` and `spill_file_bytes`
    /// are the store's exact figures, which include what no pool owns
    /// (allocator slack, shard tables, holes in the file).
    pub fn finish(self, mem_used: u64, mem_limit: u64, spill_file: u64) -> StoreStats {
        let mut stats = StoreStats {
            mem_limit_bytes: mem_limit,
            ..StoreStats::default()
        };
        for ((guest, pool), c) in self.pools {
            let g: &mut GuestStats = stats.guests.entry(guest).or_default();
            g.total.add(&c);
            stats.total.add(&c);
            g.pools.insert(pool, c);
        }
        stats.total.mem_used_bytes = mem_used;
        stats.total.spill_file_bytes = spill_file;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sums_every_field() {
        let one = Counters {
            succ_stores: 1,
            failed_stores: 1,
            loads: 1,
            failed_loads: 1,
            invalidates: 1,
            stored_pages: 1,
            same_filled_pages: 1,
            dedup_hits: 1,
            unique_pages: 1,
            orig_data_bytes: 1,
            compr_data_bytes: 1,
            mem_used_bytes: 1,
            spilled_pages: 1,
            spill_file_bytes: 1,
            spill_reads: 1,
            spill_writes: 1,
            writebacks: 1,
            metadata_bytes: 1,
        };
        let mut sum = one.clone();
        sum.add(&one);
        let json = serde_json::to_value(&sum).unwrap();
        for (name, v) in json.as_object().unwrap() {
            assert_eq!(v, 2, "{name}");
        }
    }

    #[test]
    fn gather_groups_by_guest_and_pool() {
        let mut g = Gather::default();
        let c = Counters {
            stored_pages: 3,
            mem_used_bytes: 10,
            ..Counters::default()
        };
        g.add(0, 1, &c);
        g.add(0, 1, &c);
        g.add(0, 2, &c);
        g.add(5, 1, &c);
        g.add_mem(5, 1, 7);
        let s = g.finish(1000, 2000, 64);
        assert_eq!(s.total.stored_pages, 12);
        assert_eq!(s.total.mem_used_bytes, 1000);
        assert_eq!(s.total.spill_file_bytes, 64);
        assert_eq!(s.mem_limit_bytes, 2000);
        assert_eq!(s.guests[&0].total.stored_pages, 9);
        assert_eq!(s.guests[&0].pools[&1].stored_pages, 6);
        assert_eq!(s.guests[&5].pools[&1].mem_used_bytes, 17);
    }
}

#[cfg(test)]
mod top_tests {
    use super::*;

    #[test]
    fn keep_largest_sums_the_rest_under_other() {
        let mut g = Gather::default();
        for pool in 0..100u32 {
            let c = Counters {
                stored_pages: u64::from(pool % 10),
                succ_stores: 1,
                ..Counters::default()
            };
            g.add(1, pool, &c);
        }
        g.add(2, 5, &Counters::default());
        g.keep_largest(3, u32::MAX);
        let s = g.finish(0, 0, 0);
        let kept: Vec<_> = s.guests[&1].pools.keys().copied().collect();
        assert_eq!(kept, vec![9, 19, 29, u32::MAX]);
        assert_eq!(s.guests[&1].pools[&u32::MAX].succ_stores, 97);
        assert_eq!(s.guests[&1].total.stored_pages, 450);
        assert_eq!(s.guests[&2].pools.len(), 1);
    }
}
