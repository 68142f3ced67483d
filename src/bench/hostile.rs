//! `tmem-bench hostile`: what one hostile guest's input costs the store, and
//! the others. Each part is an attack a guest can mount through its requests, driven against
//! the page store in this process:
//!
//! - **churn**: N × (PUT_FILL to a new pool, then INVALIDATE_PAGE). Reports
//!   the budget counter, the process RSS and the `stats` snapshot (time and
//!   JSON size) before and after.
//! - **flood**: pages crafted so that xxh3-128 seeded with the guest id (the
//!   store's content hash before it was keyed) gives every one the same
//!   value; reports the time of the last puts. With a keyed hash they are
//!   ordinary distinct pages.
//! - **groups**: one guest opens G index groups (one page in each of G
//!   pools); reports another guest's new-group PUT_FILL and an empty pool's
//!   INVALIDATE_POOL, against a store with no attacker.
//! - **hash**: the cost of the candidate content hashes on one 4 KiB page.
//!
//! docs/design.md ("Hostile guests") has the figures before and after.

use std::{
    hash::{BuildHasher, Hasher},
    time::Instant,
};

use serde::Serialize;

use crate::store::{DedupDomain, GuestId, Page, Store, StoreConfig, StoreError, PAGE_SIZE};

#[derive(Debug, Clone, clap::Args)]
pub struct HostileArgs {
    /// Pools the churn part opens and empties, one page each.
    #[arg(long, default_value_t = 100_000)]
    pub churn: u64,
    /// Crafted colliding pages the flood part stores.
    #[arg(long, default_value_t = 4_000)]
    pub flood: u64,
    /// Index groups (pools with one page) the attacker opens in the groups part.
    #[arg(long, default_value_t = 400_000)]
    pub groups: u64,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnReport {
    pub pools: u64,
    pub mem_used_before: u64,
    pub mem_used_after: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub stats_ms_before: f64,
    pub stats_ms_after: f64,
    pub stats_json_bytes_before: usize,
    pub stats_json_bytes_after: usize,
    /// `Store::guest_metadata_bytes` of the churning guest.
    pub guest_metadata_before: u64,
    pub guest_metadata_after: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FloodReport {
    pub pages: u64,
    /// Whether the crafted pages share one xxh3-128 value under the old seeding.
    pub crafted_collide: bool,
    /// Mean time of the last 100 puts.
    pub last_puts_mean_us: f64,
    pub slowest_put_us: f64,
    pub unique_pages: u64,
    /// Dedup candidates compared by all the puts, and puts stored without
    /// dedup for meeting too many.
    pub candidates_compared: u64,
    pub too_many_candidates: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupsReport {
    pub attacker_groups: u64,
    /// Median of 201 new-group PUT_FILLs by another guest, with no attacker.
    pub victim_new_group_put_ns_alone: f64,
    /// The same, after the attacker opened its groups.
    pub victim_new_group_put_ns_attacked: f64,
    /// Median of 201 INVALIDATE_POOLs of empty pools, with no attacker.
    pub invalidate_empty_pool_ns_alone: f64,
    pub invalidate_empty_pool_ns_attacked: f64,
    /// Index tables the victim's 201 puts and invalidates looked at.
    pub victim_tables_visited_alone: u64,
    pub victim_tables_visited_attacked: u64,
    pub rss_attacked: u64,
    /// The budget counter with the attacker's groups in place.
    pub mem_used_attacked: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HashReport {
    pub xxh3_128_seeded_ns: f64,
    pub xxh3_128_secret_ns: f64,
    pub siphash13_ns: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostileReport {
    pub churn: ChurnReport,
    pub flood: FloodReport,
    pub groups: GroupsReport,
    pub hash: HashReport,
}

pub fn run(args: &HostileArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = HostileReport {
        hash: hash_costs(),
        churn: churn(args.churn)?,
        flood: flood(args.flood)?,
        groups: groups(args.groups)?,
    };
    if !args.json {
        println!("{report:#?}");
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Resident set of this process, in bytes (0 where /proc is missing).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn store(mem_limit: u64) -> Result<Store, StoreError> {
    Store::new(StoreConfig {
        mem_limit,
        dedup: DedupDomain::Guest,
        ..StoreConfig::default()
    })
}

fn timed_stats(s: &Store) -> Result<(f64, usize), serde_json::Error> {
    let t = Instant::now();
    let stats = s.stats();
    let json = serde_json::to_string(&stats)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, json.len()))
}

pub fn churn(pools: u64) -> Result<ChurnReport, Box<dyn std::error::Error>> {
    let s = store(1 << 30)?;
    let g = GuestId(1);
    // A first round so that tables the store keeps for reuse exist before measuring.
    s.put_fill(g, 0, 0, 7)?;
    s.invalidate_page(g, 0, 0);
    let (stats_ms_before, stats_json_bytes_before) = timed_stats(&s)?;
    let (mem_used_before, rss_before) = (s.mem_used(), rss_bytes());
    let guest_metadata_before = s.guest_metadata_bytes(g);
    let t = Instant::now();
    for pool in 1..=pools {
        s.put_fill(g, pool as u32, 0, 7)?;
        s.invalidate_page(g, pool as u32, 0);
    }
    let seconds = t.elapsed().as_secs_f64();
    let (mem_used_after, rss_after) = (s.mem_used(), rss_bytes());
    let guest_metadata_after = s.guest_metadata_bytes(g);
    let (stats_ms_after, stats_json_bytes_after) = timed_stats(&s)?;
    Ok(ChurnReport {
        pools,
        mem_used_before,
        mem_used_after,
        rss_before,
        rss_after,
        stats_ms_before,
        stats_ms_after,
        stats_json_bytes_before,
        stats_json_bytes_after,
        guest_metadata_before,
        guest_metadata_after,
        seconds,
    })
}

/// The first 16 bytes of xxh3's default secret (the seeded secret adds the
/// seed to the first word and subtracts it from the second).
const XXH3_SECRET_HEAD: [u8; 16] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
];

/// Page `n` of a family whose xxh3-128 with `seed` is one value for every n.
///
/// Lane 0 of stripes 0 and 1 (bytes 0..8 and 64..72) feed the same
/// accumulator before the first scramble. Each adds its data word, and the
/// product of the halves of (word ^ secret word). With the low half of each
/// word equal to the low half of its secret word the products are zero,
/// and with high halves n and C - n the sum of the words is the same for
/// every n.
pub fn crafted_page(seed: u64, n: u32) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = b"a crafted page "[i % 15];
    }
    let k0 = u64::from_le_bytes(XXH3_SECRET_HEAD[..8].try_into().unwrap_or_default()).wrapping_add(seed);
    let k1 = u64::from_le_bytes(XXH3_SECRET_HEAD[8..].try_into().unwrap_or_default()).wrapping_sub(seed);
    let w0 = u64::from(n) << 32 | (k0 & 0xffff_ffff);
    let w1 = u64::from(0x5eed_u32.wrapping_sub(n)) << 32 | (k1 & 0xffff_ffff);
    p[..8].copy_from_slice(&w0.to_le_bytes());
    p[64..72].copy_from_slice(&w1.to_le_bytes());
    p
}

pub fn flood(pages: u64) -> Result<FloodReport, Box<dyn std::error::Error>> {
    let s = store(1 << 30)?;
    let g = GuestId(3);
    let h0 = xxhash_rust::xxh3::xxh3_128_with_seed(&crafted_page(3, 0)[..], 3);
    let crafted_collide =
        (1..64).all(|n| xxhash_rust::xxh3::xxh3_128_with_seed(&crafted_page(3, n)[..], 3) == h0);
    let (mut last, mut slowest) = (0.0, 0.0f64);
    for n in 0..pages {
        let page = crafted_page(3, n as u32);
        let t = Instant::now();
        s.put(g, 0, n, &page)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        slowest = slowest.max(us);
        if n + 100 >= pages {
            last += us;
        }
    }
    let (candidates_compared, too_many_candidates) = s.dedup_compares();
    Ok(FloodReport {
        candidates_compared,
        too_many_candidates,
        pages,
        crafted_collide,
        last_puts_mean_us: last / pages.clamp(1, 100) as f64,
        slowest_put_us: slowest,
        unique_pages: s.stats().total.unique_pages,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median times of a victim's new-group PUT_FILL and of INVALIDATE_POOL on
/// empty pools. Each round uses pools it has not used before.
fn victim_ops(s: &Store, round: u32) -> Result<(f64, f64, u64), StoreError> {
    let victim = GuestId(9);
    let visited = s.index_tables_visited();
    let (mut puts, mut invals) = (Vec::new(), Vec::new());
    for k in 0..201u32 {
        let pool = round * 1000 + k;
        let t = Instant::now();
        s.put_fill(victim, pool, 0, 1)?;
        puts.push(t.elapsed().as_secs_f64() * 1e9);
        let t = Instant::now();
        s.invalidate_pool(victim, 100_000 + pool);
        invals.push(t.elapsed().as_secs_f64() * 1e9);
    }
    Ok((median(puts), median(invals), s.index_tables_visited() - visited))
}

pub fn groups(groups: u64) -> Result<GroupsReport, Box<dyn std::error::Error>> {
    let s = store(4 << 30)?;
    let (put_alone, inval_alone, visited_alone) = victim_ops(&s, 1)?;
    let attacker = GuestId(8);
    for pool in 0..groups {
        s.put_fill(attacker, pool as u32, 0, 5)?;
    }
    let (put_attacked, inval_attacked, visited_attacked) = victim_ops(&s, 2)?;
    Ok(GroupsReport {
        attacker_groups: groups,
        victim_new_group_put_ns_alone: put_alone,
        victim_new_group_put_ns_attacked: put_attacked,
        invalidate_empty_pool_ns_alone: inval_alone,
        invalidate_empty_pool_ns_attacked: inval_attacked,
        victim_tables_visited_alone: visited_alone,
        victim_tables_visited_attacked: visited_attacked,
        rss_attacked: rss_bytes(),
        mem_used_attacked: s.mem_used(),
    })
}

/// Nanoseconds per 4 KiB page of each candidate content hash.
pub fn hash_costs() -> HashReport {
    let mut page = [0u8; PAGE_SIZE];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let secret: Vec<u8> = (0..192u32).map(|i| (i * 97 + 13) as u8).collect();
    let sip = std::collections::hash_map::RandomState::new();
    let rounds = 20_000u32;
    // The best of five runs of each: the machine these figures come from is shared.
    let time = |f: &mut dyn FnMut(u32) -> u64| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut acc = 0u64;
                for r in 0..rounds {
                    acc = acc.wrapping_add(f(r));
                }
                std::hint::black_box(acc);
                t.elapsed().as_secs_f64() * 1e9 / f64::from(rounds)
            })
            .fold(f64::INFINITY, f64::min)
    };
    HashReport {
        xxh3_128_seeded_ns: time(&mut |r| {
            xxhash_rust::xxh3::xxh3_128_with_seed(std::hint::black_box(&page[..]), u64::from(r)) as u64
        }),
        xxh3_128_secret_ns: time(&mut |_| {
            xxhash_rust::xxh3::xxh3_128_with_secret(std::hint::black_box(&page[..]), &secret) as u64
        }),
        siphash13_ns: time(&mut |_| {
            let mut h = sip.build_hasher();
            h.write(std::hint::black_box(&page[..]));
            h.finish()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_pages_collide_under_the_old_seeding() {
        let h = |n| xxhash_rust::xxh3::xxh3_128_with_seed(&crafted_page(7, n)[..], 7);
        assert_eq!(h(0), h(1));
        assert_eq!(h(0), h(123_456));
        assert_ne!(crafted_page(7, 0), crafted_page(7, 1));
    }

    #[test]
    fn small_run() {
        let r = churn(50).unwrap();
        assert_eq!((r.pools, r.mem_used_after), (50, r.mem_used_before));
        assert_eq!(r.guest_metadata_after, r.guest_metadata_before);
        let f = flood(20).unwrap();
        assert!(f.crafted_collide, "under the old seeding");
        assert_eq!(
            (f.unique_pages, f.too_many_candidates),
            (20, 0),
            "not under the keyed hash"
        );
        let g = groups(50).unwrap();
        assert_eq!(g.victim_tables_visited_alone, g.victim_tables_visited_attacked);
    }
}
