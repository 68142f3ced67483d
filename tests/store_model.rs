//! Model-based tests of the page store: random operation sequences run against
//! the store and against a `HashMap` that encodes frontswap semantics exactly.
//!
//! The model's rules:
//! - a `Stored` put makes the page readable, byte-exact, until it is
//!   invalidated, read exclusively, or its pool or guest is dropped;
//! - a `Rejected` put, or one that returns `Err`, leaves NOTHING at that index:
//!   the older copy is gone too, so a later get must say NotFound;
//! - a get of an index the model does not hold must say NotFound (never stale data);
//! - writeback, set_mem_limit, the spill tier and the recompressor (lz4 puts
//!   re-encoded with zstd, under `auto`) never lose or change a page.
//!
//! Stats invariants checked after every sequence (see `check_stats`): gauges
//! match the model exactly (stored, same-filled, unique objects per dedup
//! domain, original bytes), per-pool and per-guest gauges add up to the totals,
//! cumulative counters match the model's history, host memory never grows past
//! `max(limit, usage before the operation)` (checked after every operation),
//! and a store emptied by dropping every guest is back to its starting footprint.
//!
//! Runs with tiny RAM and spill limits (and with no spill file) so that
//! writeback and rejection paths run, and multi-threaded.

mod common;

use std::collections::{HashMap, HashSet};

use common::StopOnDrop;
use proptest::{
    prelude::*,
    test_runner::{FileFailurePersistence, TestCaseError},
};
use vhost_user_tmem::store::{
    Compression, DedupDomain, GetOutcome, GuestId, Page, PutOutcome, SpillConfig, Store, StoreConfig,
    StoreStats, PAGE_SIZE,
};

const GUESTS: u32 = 3;
const POOLS: u32 = 3;
const INDEXES: u64 = 12;
const BIG: u64 = 1 << 40;

// ---------------------------------------------------------------------------
// Page contents

/// How a page's bytes are made. Seeds come from a small range so that identical
/// pages recur, in the same pool, other pools and other guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Content {
    Zero,
    /// One u64 repeated: stored as metadata only.
    Fill(u64),
    /// A repeated u64 with one word different: NOT same-filled.
    NearFill(u64, u16),
    /// Incompressible.
    Random(u8),
    /// Words and spaces, compresses well.
    Text(u8),
    /// Random first half, text second half.
    Half(u8),
    /// A copy of an earlier page of the same sequence.
    Dup(u16),
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fill_page(fill: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&fill.to_le_bytes());
    }
    p
}

fn text_into(out: &mut [u8], rng: &mut SplitMix) {
    const WORDS: [&str; 12] = [
        "swap",
        "page",
        "guest",
        "host",
        "memory",
        "compressed",
        "the",
        "of",
        "virtio",
        "queue",
        "zstd",
        "kernel",
    ];
    let mut pos = 0;
    while pos < out.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        for &b in w.iter().chain(b" ") {
            if pos == out.len() {
                break;
            }
            out[pos] = b;
            pos += 1;
        }
    }
}

fn make_page(c: Content, history: &[Box<Page>]) -> Box<Page> {
    match c {
        Content::Zero => Box::new([0u8; PAGE_SIZE]),
        Content::Fill(f) => fill_page(f),
        Content::NearFill(f, pos) => {
            let mut p = fill_page(f);
            let w = usize::from(pos) % (PAGE_SIZE / 8) * 8;
            p[w] ^= 0x40;
            p
        }
        Content::Random(s) => {
            let mut rng = SplitMix(u64::from(s) << 32 | 0xabc);
            let mut p = Box::new([0u8; PAGE_SIZE]);
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            p
        }
        Content::Text(s) => {
            let mut rng = SplitMix(u64::from(s) << 32 | 0x7e7);
            let mut p = Box::new([0u8; PAGE_SIZE]);
            text_into(&mut p[..], &mut rng);
            p
        }
        Content::Half(s) => {
            let mut rng = SplitMix(u64::from(s) << 32 | 0x4a1f);
            let mut p = Box::new([0u8; PAGE_SIZE]);
            for w in p[..PAGE_SIZE / 2].chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            text_into(&mut p[PAGE_SIZE / 2..], &mut rng);
            p
        }
        Content::Dup(n) => match history.len() {
            0 => Box::new([0u8; PAGE_SIZE]),
            len => history[usize::from(n) % len].clone(),
        },
    }
}

fn is_same_filled(p: &Page) -> bool {
    let first = &p[..8];
    p.chunks_exact(8).all(|w| w == first)
}

fn content_strategy() -> impl Strategy<Value = Content> {
    let fills = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(0x0101_0101_0101_0101u64),
        any::<u64>()
    ];
    prop_oneof![
        2 => Just(Content::Zero),
        3 => fills.clone().prop_map(Content::Fill),
        1 => (fills, any::<u16>()).prop_map(|(f, p)| Content::NearFill(f, p)),
        3 => (0u8..6).prop_map(Content::Random),
        3 => (0u8..6).prop_map(Content::Text),
        2 => (0u8..6).prop_map(Content::Half),
        3 => any::<u16>().prop_map(Content::Dup),
    ]
}

// ---------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
enum Op {
    Put(u32, u32, u64, Content),
    PutFill(u32, u32, u64, u64),
    Get(u32, u32, u64, bool),
    Invalidate(u32, u32, u64),
    InvalidatePool(u32, u32),
    DropGuest(u32),
    /// New limit: the empty store's own usage plus this many bytes.
    SetMemLimit(u64),
    Writeback(u64),
    /// One recompressor round of at most this many pages.
    Recompress(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let key = (0..GUESTS, 0..POOLS, 0..INDEXES);
    prop_oneof![
        12 => (key.clone(), content_strategy()).prop_map(|((g, p, i), c)| Op::Put(g, p, i, c)),
        2 => (key.clone(), prop_oneof![Just(0u64), any::<u64>()])
            .prop_map(|((g, p, i), f)| Op::PutFill(g, p, i, f)),
        8 => (key.clone(), any::<bool>()).prop_map(|((g, p, i), x)| Op::Get(g, p, i, x)),
        3 => key.prop_map(|(g, p, i)| Op::Invalidate(g, p, i)),
        1 => (0..GUESTS, 0..POOLS).prop_map(|(g, p)| Op::InvalidatePool(g, p)),
        1 => (0..GUESTS).prop_map(Op::DropGuest),
        1 => prop_oneof![Just(0u64), Just(8 << 10), Just(32 << 10), Just(1 << 20)]
            .prop_map(Op::SetMemLimit),
        1 => (0u64..20).prop_map(Op::Writeback),
        2 => (1usize..40).prop_map(Op::Recompress),
    ]
}

// ---------------------------------------------------------------------------
// Set-ups

#[derive(Clone, Debug)]
struct Setup {
    /// RAM budget above the empty store's own usage; `None` = practically unlimited.
    mem_extra: Option<u64>,
    /// Use this budget as given at creation (it may be below the empty store's usage).
    absolute_mem: Option<u64>,
    spill_limit: Option<u64>,
    level: i32,
    dedup: DedupDomain,
    /// Budgets so large that any rejection or error is a bug.
    roomy: bool,
    /// Fill every key once and drop it all before measuring the empty store's
    /// usage, so that tables have grown and tight limits are spent on pages.
    warm: bool,
    /// Background writer headroom; multi-threaded runs then run the writer in
    /// a thread of its own beside the workers.
    headroom: u64,
    compression: Compression,
}

impl Setup {
    fn roomy(dedup: DedupDomain) -> Self {
        Setup {
            mem_extra: None,
            absolute_mem: None,
            spill_limit: None,
            level: 1,
            dedup,
            roomy: true,
            warm: false,
            headroom: 0,
            compression: Compression::Zstd,
        }
    }
    fn tight(mem_extra: u64, spill_limit: Option<u64>, dedup: DedupDomain) -> Self {
        Setup {
            mem_extra: Some(mem_extra),
            absolute_mem: None,
            spill_limit,
            level: 1,
            dedup,
            roomy: false,
            warm: true,
            headroom: 0,
            compression: Compression::Zstd,
        }
    }
}

fn all_keys() -> impl Iterator<Item = Key> {
    (0..GUESTS).flat_map(|g| (0..POOLS).flat_map(move |p| (0..INDEXES).map(move |i| (g, p, i))))
}

/// A store plus the directory its spill file lives in.
struct Harness {
    store: Store,
    _dir: tempfile::TempDir,
    /// Host memory of the store right after `Store::new`.
    created: u64,
    /// Host memory of the empty store the limits are set relative to.
    baseline: u64,
    spill_limit: Option<u64>,
}

fn open_store(setup: &Setup) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = setup.spill_limit.map(|limit| SpillConfig {
        path: dir.path().join("spill"),
        limit,
    });
    let store = Store::new(StoreConfig {
        mem_limit: setup.absolute_mem.unwrap_or(BIG),
        spill,
        zstd_level: setup.level,
        compression: setup.compression,
        dedup: setup.dedup,
        writeback_headroom: setup.headroom,
        ..StoreConfig::default()
    })
    .expect("Store::new");
    let created = store.stats().total.mem_used_bytes;
    if setup.warm {
        for (n, (g, p, i)) in all_keys().enumerate() {
            let page = make_page(Content::Random(n as u8), &[]);
            store.put(GuestId(g), p, i, &page).expect("warm-up put");
        }
        for g in 0..GUESTS {
            store.drop_guest(GuestId(g));
        }
    }
    let baseline = store.stats().total.mem_used_bytes;
    if let (Some(extra), None) = (setup.mem_extra, setup.absolute_mem) {
        store
            .set_mem_limit(baseline + extra)
            .expect("set_mem_limit on an empty store");
    }
    Harness {
        store,
        _dir: dir,
        created,
        baseline,
        spill_limit: setup.spill_limit,
    }
}

// ---------------------------------------------------------------------------
// The model

type Key = (u32, u32, u64);

#[derive(Default)]
struct Model {
    pages: HashMap<Key, Box<Page>>,
    succ_stores: u64,
    failed_stores: u64,
    loads: u64,
    failed_loads: u64,
    invalidated_by_page: u64,
}

impl Model {
    fn pool_count(&self, g: u32, p: u32) -> usize {
        self.pages.keys().filter(|k| k.0 == g && k.1 == p).count()
    }
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

/// Stores `page` at `key` and updates the model by the outcome.
fn put_and_model(
    h: &Harness,
    model: &mut Model,
    roomy: bool,
    key: Key,
    page: Box<Page>,
    fill: Option<u64>,
) -> Result<(), TestCaseError> {
    let (g, p, i) = key;
    let r = match fill {
        Some(f) => h.store.put_fill(GuestId(g), p, i, f),
        None => h.store.put(GuestId(g), p, i, &page),
    };
    match r {
        Ok(PutOutcome::Stored) => {
            model.succ_stores += 1;
            model.pages.insert(key, page);
        }
        Ok(PutOutcome::Rejected) | Err(_) => {
            check(!roomy, || {
                format!("put {key:?} refused with room to spare: {r:?}")
            })?;
            model.failed_stores += 1;
            model.pages.remove(&key);
            // Frontswap: the old copy must be gone right away.
            let mut out = [0x5au8; PAGE_SIZE];
            let g2 = h.store.get(GuestId(g), p, i, &mut out, false);
            check(matches!(g2, Ok(GetOutcome::NotFound)), || {
                format!("after a refused put at {key:?}, get returned {g2:?}")
            })?;
            model.failed_loads += 1;
        }
    }
    Ok(())
}

fn get_and_model(h: &Harness, model: &mut Model, key: Key, exclusive: bool) -> Result<(), TestCaseError> {
    let (g, p, i) = key;
    let mut out = [0xa5u8; PAGE_SIZE];
    let r = h.store.get(GuestId(g), p, i, &mut out, exclusive);
    match model.pages.get(&key) {
        Some(want) => {
            check(matches!(r, Ok(GetOutcome::Found)), || {
                format!("get {key:?} (exclusive {exclusive}) of a stored page returned {r:?}")
            })?;
            check(out[..] == want[..], || {
                format!("get {key:?} returned different bytes")
            })?;
            model.loads += 1;
            if exclusive {
                model.pages.remove(&key);
            }
        }
        None => {
            check(matches!(r, Ok(GetOutcome::NotFound)), || {
                format!("get {key:?} of an absent page returned {r:?}")
            })?;
            model.failed_loads += 1;
        }
    }
    Ok(())
}

fn apply(
    h: &Harness,
    setup: &Setup,
    model: &mut Model,
    history: &mut Vec<Box<Page>>,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Put(g, p, i, c) => {
            let page = make_page(c, history);
            history.push(page.clone());
            put_and_model(h, model, setup.roomy, (g, p, i), page, None)?;
        }
        Op::PutFill(g, p, i, f) => {
            put_and_model(h, model, setup.roomy, (g, p, i), fill_page(f), Some(f))?;
        }
        Op::Get(g, p, i, x) => get_and_model(h, model, (g, p, i), x)?,
        Op::Invalidate(g, p, i) => {
            let was = h.store.invalidate_page(GuestId(g), p, i);
            let had = model.pages.remove(&(g, p, i)).is_some();
            check(was == had, || {
                format!("invalidate_page({g},{p},{i}) said {was}, model {had}")
            })?;
            model.invalidated_by_page += u64::from(had);
        }
        Op::InvalidatePool(g, p) => {
            let n = h.store.invalidate_pool(GuestId(g), p);
            let want = model.pool_count(g, p) as u64;
            model.pages.retain(|k, _| !(k.0 == g && k.1 == p));
            check(n == want, || {
                format!("invalidate_pool({g},{p}) dropped {n}, model {want}")
            })?;
        }
        Op::DropGuest(g) => {
            let n = h.store.drop_guest(GuestId(g));
            let before = model.pages.len();
            model.pages.retain(|k, _| k.0 != g);
            let want = (before - model.pages.len()) as u64;
            check(n == want, || format!("drop_guest({g}) dropped {n}, model {want}"))?;
        }
        Op::SetMemLimit(extra) => {
            if setup.roomy {
                return Ok(());
            }
            let r = h.store.set_mem_limit(h.baseline + extra);
            // Without a spill file nothing can be written back: the store stays
            // over budget but must not drop pages. With one, a full file is an
            // acceptable error. Either way the model is unchanged.
            check(r.is_ok() || h.spill_limit.is_some(), || {
                format!("set_mem_limit without a spill file failed: {r:?}")
            })?;
        }
        Op::Recompress(n) => {
            let r = h.store.recompress(n);
            check(r.is_ok(), || format!("recompress({n}) failed: {r:?}"))?;
        }
        Op::Writeback(n) => match h.store.writeback(n) {
            Ok(done) => {
                check(done <= n, || format!("writeback({n}) claims {done} pages"))?;
                check(h.spill_limit.is_some() || done == 0, || {
                    format!("writeback({n}) wrote {done} pages with no spill file")
                })?;
            }
            Err(e) => check(h.spill_limit.is_some() && !setup.roomy, || {
                format!("writeback({n}) failed: {e:?}")
            })?,
        },
    }
    Ok(())
}

fn dedup_key(domain: DedupDomain, g: u32) -> u32 {
    match domain {
        DedupDomain::Global => 0,
        _ => g,
    }
}

/// Distinct stored objects the model implies: same-filled pages cost none.
fn expected_unique(domain: DedupDomain, pages: &HashMap<Key, Box<Page>>) -> u64 {
    let non_fill = pages.iter().filter(|(_, p)| !is_same_filled(p));
    match domain {
        DedupDomain::Off => non_fill.count() as u64,
        _ => non_fill
            .map(|(k, p)| (dedup_key(domain, k.0), &p[..]))
            .collect::<HashSet<_>>()
            .len() as u64,
    }
}

/// Gauges that must add up from pools to guests to the total.
fn gauges(c: &vhost_user_tmem::store::Counters) -> [u64; 4] {
    [
        c.stored_pages,
        c.same_filled_pages,
        c.orig_data_bytes,
        c.spilled_pages,
    ]
}

fn check_stats(
    h: &Harness,
    setup: &Setup,
    s: &StoreStats,
    pages: &HashMap<Key, Box<Page>>,
) -> Result<(), TestCaseError> {
    let t = &s.total;
    let n = pages.len() as u64;
    prop_assert_eq!(t.stored_pages, n, "stored_pages");
    prop_assert_eq!(t.orig_data_bytes, n * PAGE_SIZE as u64, "orig_data_bytes");
    let fills = pages.values().filter(|p| is_same_filled(p)).count() as u64;
    prop_assert_eq!(t.same_filled_pages, fills, "same_filled_pages");
    // Identical contents are stored once, in whichever tier the first copy is.
    prop_assert_eq!(
        t.unique_pages,
        expected_unique(setup.dedup, pages),
        "unique_pages"
    );
    prop_assert!(
        t.spilled_pages <= n,
        "spilled_pages {} > stored {}",
        t.spilled_pages,
        n
    );
    match h.spill_limit {
        None => {
            prop_assert_eq!(t.spilled_pages, 0);
            prop_assert_eq!(t.spill_file_bytes, 0);
        }
        Some(limit) => prop_assert!(
            t.spill_file_bytes <= limit,
            "spill file {} bytes over its limit {}",
            t.spill_file_bytes,
            limit
        ),
    }
    if setup.dedup == DedupDomain::Off {
        prop_assert_eq!(t.dedup_hits, 0, "dedup hits with dedup off");
    }
    prop_assert_eq!(s.mem_limit_bytes, h.store.mem_limit());

    // Per pool against the model, and the sums.
    let mut sum = [0u64; 4];
    for (&g, gs) in &s.guests {
        let mut gsum = [0u64; 4];
        for (&p, pc) in &gs.pools {
            let want = pages.keys().filter(|k| k.0 == g && k.1 == p).count() as u64;
            prop_assert_eq!(pc.stored_pages, want, "stored_pages of guest {} pool {}", g, p);
            for (a, b) in gsum.iter_mut().zip(gauges(pc)) {
                *a += b;
            }
        }
        prop_assert_eq!(gsum, gauges(&gs.total), "pools of guest {} do not add up", g);
        for (a, b) in sum.iter_mut().zip(gauges(&gs.total)) {
            *a += b;
        }
    }
    prop_assert_eq!(sum, gauges(t), "guests do not add up to the total");
    for k in pages.keys() {
        prop_assert!(
            s.guests.get(&k.0).is_some_and(|g| g.pools.contains_key(&k.1)),
            "pool {:?} holds pages but has no stats",
            (k.0, k.1)
        );
    }
    Ok(())
}

/// Runs `ops`, checks, drops everything, and returns the host memory the store
/// still holds then (table capacity it keeps for reuse).
fn run_once(h: &Harness, setup: &Setup, ops: &[Op]) -> Result<u64, TestCaseError> {
    let c0 = h.store.stats().total;
    let mut model = Model::default();
    let mut history = Vec::new();
    let mut used = h.store.stats().total.mem_used_bytes;
    for (n, op) in ops.iter().enumerate() {
        apply(h, setup, &mut model, &mut history, op)
            .map_err(|e| TestCaseError::fail(format!("op #{n} {op:?}: {e}")))?;
        let s = h.store.stats();
        let now = s.total.mem_used_bytes;
        let limit = h.store.mem_limit();
        prop_assert!(
            now <= used.max(limit),
            "op #{} {:?}: mem_used_bytes {} > max(limit {}, before {})",
            n,
            op,
            now,
            limit,
            used
        );
        used = now;
        if n % 16 == 15 {
            check_stats(h, setup, &s, &model.pages)
                .map_err(|e| TestCaseError::fail(format!("after op #{n} {op:?}: {e}")))?;
        }
    }
    // Every page the model holds reads back, then the full invariants.
    let keys: Vec<Key> = model.pages.keys().copied().collect();
    for k in keys {
        get_and_model(h, &mut model, k, false)?;
    }
    let s = h.store.stats();
    check_stats(h, setup, &s, &model.pages)?;
    let t = &s.total;
    prop_assert_eq!(t.succ_stores - c0.succ_stores, model.succ_stores, "succ_stores");
    prop_assert_eq!(
        t.failed_stores - c0.failed_stores,
        model.failed_stores,
        "failed_stores"
    );
    prop_assert_eq!(t.loads - c0.loads, model.loads, "loads");
    prop_assert_eq!(
        t.failed_loads - c0.failed_loads,
        model.failed_loads,
        "failed_loads"
    );
    prop_assert!(
        t.invalidates - c0.invalidates >= model.invalidated_by_page,
        "invalidates {} < pages invalidated one by one {}",
        t.invalidates - c0.invalidates,
        model.invalidated_by_page
    );

    // Dropping everything leaves nothing behind...
    for g in 0..GUESTS {
        h.store.drop_guest(GuestId(g));
    }
    model.pages.clear();
    let s = h.store.stats();
    check_stats(h, setup, &s, &model.pages)?;
    prop_assert_eq!(
        s.total.compr_data_bytes,
        0,
        "compressed bytes left after dropping all"
    );
    prop_assert_eq!(
        h.store.memory().payload_chunk_bytes,
        0,
        "payload chunks left after dropping all"
    );
    // ...and no stale dedup entry survives: every content seen comes back intact.
    for (n, page) in history.iter().enumerate().take(40) {
        let key = (n as u32 % GUESTS, 0, n as u64);
        put_and_model(h, &mut model, setup.roomy, key, page.clone(), None)?;
    }
    let keys: Vec<Key> = model.pages.keys().copied().collect();
    for k in keys {
        get_and_model(h, &mut model, k, false)?;
    }
    for g in 0..GUESTS {
        h.store.drop_guest(GuestId(g));
    }
    let s = h.store.stats();
    prop_assert_eq!(s.total.stored_pages, 0);
    prop_assert_eq!(s.total.unique_pages, 0);
    prop_assert_eq!(
        s.total.mem_used_bytes,
        h.created,
        "an emptied store must return to its starting footprint"
    );
    Ok(s.total.mem_used_bytes)
}

fn run_sequence(setup: &Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let h = open_store(setup);
    let kept = run_once(&h, setup, ops)?;
    if setup.roomy {
        // The same work again on the same store must not need more memory: what
        // stays after dropping everything is capacity kept for reuse, not a leak.
        let again = run_once(&h, setup, ops)?;
        prop_assert!(
            again <= kept,
            "memory kept after dropping everything grew from {} to {} bytes when the same \
             operations ran again (a leak)",
            kept,
            again
        );
    }
    Ok(())
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(), 1..160)
}

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        // Integration tests have no lib.rs for proptest to find: name the file.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/store_model.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg(48))]

    #[test]
    fn roomy_dedup_off(ops in ops()) {
        run_sequence(&Setup::roomy(DedupDomain::Off), &ops)?;
    }

    #[test]
    fn roomy_dedup_guest(ops in ops()) {
        run_sequence(&Setup::roomy(DedupDomain::Guest), &ops)?;
    }

    #[test]
    fn roomy_dedup_global_level_5(ops in ops()) {
        let setup = Setup { level: 5, ..Setup::roomy(DedupDomain::Global) };
        run_sequence(&setup, &ops)?;
    }

    #[test]
    fn roomy_lz4_global(ops in ops()) {
        let setup = Setup { compression: Compression::Lz4, ..Setup::roomy(DedupDomain::Global) };
        run_sequence(&setup, &ops)?;
    }

    #[test]
    fn roomy_auto_guest(ops in ops()) {
        let setup = Setup { compression: Compression::Auto, level: 3, ..Setup::roomy(DedupDomain::Guest) };
        run_sequence(&setup, &ops)?;
    }

    #[test]
    fn tiny_ram_tiny_spill_auto_off(ops in ops()) {
        let setup = Setup {
            compression: Compression::Auto,
            ..Setup::tight(16 << 10, Some(32 << 10), DedupDomain::Off)
        };
        run_sequence(&setup, &ops)?;
    }

    #[test]
    fn tiny_ram_tiny_spill_guest(ops in ops()) {
        run_sequence(&Setup::tight(16 << 10, Some(32 << 10), DedupDomain::Guest), &ops)?;
    }

    #[test]
    fn tiny_ram_tiny_spill_global(ops in ops()) {
        run_sequence(&Setup::tight(8 << 10, Some(20 << 10), DedupDomain::Global), &ops)?;
    }

    #[test]
    fn tiny_ram_tiny_spill_off(ops in ops()) {
        run_sequence(&Setup::tight(24 << 10, Some(48 << 10), DedupDomain::Off), &ops)?;
    }

    #[test]
    fn tiny_ram_no_spill(ops in ops()) {
        run_sequence(&Setup::tight(24 << 10, None, DedupDomain::Guest), &ops)?;
    }

    #[test]
    fn tiny_ram_no_spill_cold(ops in ops()) {
        let setup = Setup { warm: false, ..Setup::tight(24 << 10, None, DedupDomain::Guest) };
        run_sequence(&setup, &ops)?;
    }

    #[test]
    fn tiny_ram_big_spill(ops in ops()) {
        run_sequence(&Setup::tight(8 << 10, Some(4 << 20), DedupDomain::Guest), &ops)?;
    }

    #[test]
    fn limit_below_empty_store(ops in ops()) {
        let setup = Setup {
            absolute_mem: Some(4096),
            warm: false,
            ..Setup::tight(0, Some(16 << 10), DedupDomain::Global)
        };
        run_sequence(&setup, &ops)?;
    }
}

// ---------------------------------------------------------------------------
// Dedup domains, deterministically

fn random_page(seed: u8) -> Box<Page> {
    make_page(Content::Random(seed), &[])
}

#[test]
fn dedup_domains_share_exactly_as_configured() {
    // (guest, pool) pairs that all store the same page.
    let places = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 5)];
    for (domain, hits, unique) in [
        (DedupDomain::Off, 0, 5),
        (DedupDomain::Guest, 2, 3),
        (DedupDomain::Global, 4, 1),
    ] {
        let h = open_store(&Setup::roomy(domain));
        let page = random_page(7);
        let before = h.store.stats().total.mem_used_bytes;
        for &(g, p) in &places {
            assert_eq!(h.store.put(GuestId(g), p, 3, &page).unwrap(), PutOutcome::Stored);
        }
        let s = h.store.stats();
        assert_eq!(s.total.dedup_hits, hits, "{domain:?}: dedup_hits");
        assert_eq!(s.total.unique_pages, unique, "{domain:?}: unique_pages");
        let used = s.total.mem_used_bytes - before;
        assert!(
            used >= unique * 4096,
            "{domain:?}: {unique} incompressible objects in {used} bytes"
        );
        // Dropping one sharer leaves the others intact.
        assert!(h.store.invalidate_page(GuestId(0), 0, 3));
        assert_eq!(h.store.drop_guest(GuestId(1)), 2);
        let mut out = [0u8; PAGE_SIZE];
        for (g, p) in [(0, 1), (2, 5)] {
            assert_eq!(
                h.store.get(GuestId(g), p, 3, &mut out, false).unwrap(),
                GetOutcome::Found
            );
            assert_eq!(out[..], page[..], "{domain:?}: guest {g} pool {p}");
        }
        for (g, p) in [(0, 0), (1, 0), (1, 1)] {
            assert_eq!(
                h.store.get(GuestId(g), p, 3, &mut out, false).unwrap(),
                GetOutcome::NotFound
            );
        }
    }
}

#[test]
fn guest_domain_never_shares_across_guests() {
    let h = open_store(&Setup::roomy(DedupDomain::Guest));
    for seed in 0..20u8 {
        for g in 0..4 {
            h.store
                .put(GuestId(g), 0, u64::from(seed), &random_page(seed))
                .unwrap();
        }
    }
    let s = h.store.stats();
    assert_eq!(s.total.dedup_hits, 0);
    assert_eq!(s.total.unique_pages, 80);
    let h = open_store(&Setup::roomy(DedupDomain::Global));
    for seed in 0..20u8 {
        for g in 0..4 {
            h.store
                .put(GuestId(g), 0, u64::from(seed), &random_page(seed))
                .unwrap();
        }
    }
    let s = h.store.stats();
    assert_eq!(s.total.dedup_hits, 60);
    assert_eq!(s.total.unique_pages, 20);
}

// ---------------------------------------------------------------------------
// Multi-threaded: disjoint keys, shared contents

fn thread_content(rng: &mut SplitMix) -> Content {
    // Few seeds, so threads keep storing what other threads store.
    match rng.below(6) {
        0 => Content::Zero,
        1 => Content::Fill(rng.below(3)),
        2 => Content::Random(rng.below(5) as u8),
        3 => Content::Text(rng.below(5) as u8),
        4 => Content::Half(rng.below(5) as u8),
        _ => Content::NearFill(7, rng.below(4) as u16),
    }
}

/// Under `auto`, a thread running recompressor rounds until `done`, racing
/// the workers' gets, puts and invalidates for the same objects.
fn spawn_recompressor<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    h: &'s Harness,
    setup: &Setup,
    done: &'s std::sync::atomic::AtomicBool,
    seed: u64,
) -> Option<std::thread::ScopedJoinHandle<'s, ()>> {
    (setup.compression == Compression::Auto).then(|| {
        s.spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = h.store.recompress(16) {
                    panic!("seed {seed:#x}: recompressor: {e}");
                }
            }
        })
    })
}

/// Thread `t` owns pool `t` of guests 0 and 1, and all of guest `2 + t`.
/// Returns the objects the background writer wrote (0 without one).
fn run_disjoint_threads(setup: &Setup, seed: u64, threads: u32, ops_per_thread: usize) -> u64 {
    let h = open_store(setup);
    let workers_done = std::sync::atomic::AtomicBool::new(false);
    let models: Vec<HashMap<Key, Box<Page>>> = std::thread::scope(|s| {
        let _stop = StopOnDrop(&workers_done);
        let writer = (setup.headroom > 0).then(|| {
            let (h, done) = (&h, &workers_done);
            s.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = h.store.background_writeback(std::time::Duration::from_millis(1)) {
                        panic!("seed {seed:#x}: background writer: {e}");
                    }
                }
            })
        });
        let recompressor = spawn_recompressor(s, &h, setup, &workers_done, seed);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let h = &h;
                s.spawn(move || {
                    let mut rng = SplitMix(seed ^ (u64::from(t) << 48));
                    let mut model = Model::default();
                    let mut history = Vec::new();
                    for n in 0..ops_per_thread {
                        let key = |rng: &mut SplitMix| -> Key {
                            let g = [0, 1, 2 + t][rng.below(3) as usize];
                            (g, t, rng.below(INDEXES))
                        };
                        let op = match rng.below(20) {
                            0..=8 => Op::Put(0, 0, 0, thread_content(&mut rng)),
                            9..=14 => Op::Get(0, 0, 0, rng.below(3) == 0),
                            15..=17 => Op::Invalidate(0, 0, 0),
                            18 => Op::InvalidatePool(0, 0),
                            _ => Op::DropGuest(2 + t),
                        };
                        let (g, p, i) = key(&mut rng);
                        let op = match op {
                            Op::Put(.., c) => Op::Put(g, p, i, c),
                            Op::Get(.., x) => Op::Get(g, p, i, x),
                            Op::Invalidate(..) => Op::Invalidate(g, p, i),
                            Op::InvalidatePool(..) => Op::InvalidatePool(g, p),
                            other => other,
                        };
                        if let Err(e) = apply(h, setup, &mut model, &mut history, &op) {
                            panic!("seed {seed:#x} thread {t} op #{n} {op:?}: {e}");
                        }
                    }
                    model.pages
                })
            })
            .collect();
        let models = handles
            .into_iter()
            .map(|j| j.join().expect("worker panicked"))
            .collect();
        workers_done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = writer {
            w.join().expect("writer panicked");
        }
        if let Some(r) = recompressor {
            r.join().expect("recompressor panicked");
        }
        models
    });
    let mut all = HashMap::new();
    for m in models {
        all.extend(m);
    }
    for (k, want) in &all {
        let mut out = [0u8; PAGE_SIZE];
        let r = h.store.get(GuestId(k.0), k.1, k.2, &mut out, false);
        assert!(
            matches!(r, Ok(GetOutcome::Found)),
            "seed {seed:#x}: {k:?} -> {r:?}"
        );
        assert_eq!(out[..], want[..], "seed {seed:#x}: {k:?}");
    }
    let s = h.store.stats();
    if let Err(e) = check_stats(&h, setup, &s, &all) {
        panic!("seed {seed:#x} ({setup:?}): {e}");
    }
    let background = s.background_writebacks;
    let limit = h.store.mem_limit();
    assert!(
        s.total.mem_used_bytes <= limit || setup.absolute_mem.is_some(),
        "seed {seed:#x}: mem_used_bytes {} > limit {limit}",
        s.total.mem_used_bytes
    );
    for g in 0..2 + threads {
        h.store.drop_guest(GuestId(g));
    }
    let s = h.store.stats();
    assert_eq!(s.total.stored_pages, 0);
    assert_eq!(s.total.unique_pages, 0, "seed {seed:#x}: objects leaked");
    assert_eq!(
        h.store.memory().payload_chunk_bytes,
        0,
        "seed {seed:#x}: payload chunks left after dropping everything"
    );
    assert_eq!(
        s.total.mem_used_bytes, h.created,
        "seed {seed:#x}: an emptied store must return to its starting footprint"
    );
    background
}

const MT_SEEDS: [u64; 3] = [1, 0xdead_beef, 0x1234_5678_9abc];

#[test]
fn threads_disjoint_keys_roomy_every_domain() {
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            run_disjoint_threads(&Setup::roomy(domain), seed, 4, 1500);
        }
    }
}

#[test]
fn threads_disjoint_keys_tiny_ram_tiny_spill_every_domain() {
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            run_disjoint_threads(&Setup::tight(32 << 10, Some(64 << 10), domain), seed, 4, 1500);
        }
    }
}

/// With the background writer racing the workers for the shards. RAM has
/// room for a few chunks (below that, payloads go straight to the file and
/// the writer has nothing to move).
#[test]
fn threads_disjoint_keys_small_ram_small_spill_with_the_writer() {
    let mut background = 0;
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            let setup = Setup {
                headroom: 96 << 10,
                ..Setup::tight(256 << 10, Some(1 << 20), domain)
            };
            background += run_disjoint_threads(&setup, seed, 4, 1500);
        }
    }
    // Per run the writer may lose every race on a busy machine; over nine it must not.
    assert!(background > 0, "the writer never wrote anything back");
}

#[test]
fn threads_disjoint_keys_auto_with_the_recompressor() {
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            let auto = |setup: Setup| Setup {
                compression: Compression::Auto,
                ..setup
            };
            run_disjoint_threads(&auto(Setup::roomy(domain)), seed, 4, 1500);
            run_disjoint_threads(
                &auto(Setup::tight(256 << 10, Some(1 << 20), domain)),
                seed,
                4,
                1500,
            );
        }
    }
}

#[test]
fn threads_disjoint_keys_tiny_ram_no_spill() {
    for seed in MT_SEEDS {
        run_disjoint_threads(&Setup::tight(32 << 10, None, DedupDomain::Global), seed, 4, 1500);
    }
}

// ---------------------------------------------------------------------------
// Multi-threaded: every thread on the SAME indexes

/// What an index holds right after an operation, as that operation saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum After {
    Holds(usize),
    Empty,
}

const SHARED_KEYS: [Key; 6] = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (2, 3, 9)];

/// The contents threads may write at key `k`: some only ever written there (to
/// catch a page landing at the wrong index), some written at every key (so
/// reference counts are raced), and same-filled ones.
fn hammer_contents(k: usize) -> Vec<Box<Page>> {
    vec![
        random_page(100 + k as u8),
        make_page(Content::Text(100 + k as u8), &[]),
        random_page(1),
        make_page(Content::Half(2), &[]),
        fill_page(0),
        fill_page(k as u64 + 1),
    ]
}

fn run_hammer(setup: &Setup, seed: u64, threads: u32, ops_per_thread: usize) -> u64 {
    let h = open_store(setup);
    let contents: Vec<Vec<Box<Page>>> = (0..SHARED_KEYS.len()).map(hammer_contents).collect();
    let which = |k: usize, page: &Page| contents[k].iter().position(|c| c[..] == page[..]);
    // Each thread's last view of each key.
    let workers_done = std::sync::atomic::AtomicBool::new(false);
    let lasts: Vec<Vec<Option<After>>> = std::thread::scope(|s| {
        let _stop = StopOnDrop(&workers_done);
        let recompressor = spawn_recompressor(s, &h, setup, &workers_done, seed);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (h, which, contents) = (&h, &which, &contents);
                s.spawn(move || {
                    let mut rng = SplitMix(seed ^ (u64::from(t) << 40));
                    let mut last = vec![None; SHARED_KEYS.len()];
                    let mut out = [0u8; PAGE_SIZE];
                    for n in 0..ops_per_thread {
                        let k = rng.below(SHARED_KEYS.len() as u64) as usize;
                        let (g, p, i) = SHARED_KEYS[k];
                        let after = match rng.below(10) {
                            0..=4 => {
                                let c = rng.below(contents[k].len() as u64) as usize;
                                match h.store.put(GuestId(g), p, i, &contents[k][c]) {
                                    Ok(PutOutcome::Stored) => After::Holds(c),
                                    Ok(PutOutcome::Rejected) | Err(_) => {
                                        assert!(!setup.roomy, "put refused with room to spare");
                                        After::Empty
                                    }
                                }
                            }
                            5..=8 => {
                                let exclusive = rng.below(4) == 0;
                                match h.store.get(GuestId(g), p, i, &mut out, exclusive) {
                                    Ok(GetOutcome::Found) => {
                                        let Some(c) = which(k, &out) else {
                                            panic!("seed {seed:#x} thread {t} op #{n}: get {:?} returned bytes never written there", SHARED_KEYS[k]);
                                        };
                                        if exclusive { After::Empty } else { After::Holds(c) }
                                    }
                                    Ok(GetOutcome::NotFound) => After::Empty,
                                    Err(e) => panic!("seed {seed:#x} thread {t} op #{n}: get failed: {e:?}"),
                                }
                            }
                            _ => {
                                h.store.invalidate_page(GuestId(g), p, i);
                                After::Empty
                            }
                        };
                        last[k] = Some(after);
                    }
                    last
                })
            })
            .collect();
        let lasts = handles
            .into_iter()
            .map(|j| j.join().expect("worker panicked"))
            .collect();
        workers_done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = recompressor {
            r.join().expect("recompressor panicked");
        }
        lasts
    });
    // Linearizability of each key: the final state is what some thread's last
    // operation on it left there.
    let mut stored = HashMap::new();
    for (k, &(g, p, i)) in SHARED_KEYS.iter().enumerate() {
        let candidates: Vec<&After> = lasts.iter().filter_map(|l| l[k].as_ref()).collect();
        let mut out = [0u8; PAGE_SIZE];
        let r = h.store.get(GuestId(g), p, i, &mut out, false);
        let now = match r {
            Ok(GetOutcome::Found) => {
                let c = which(k, &out).unwrap_or_else(|| {
                    panic!(
                        "seed {seed:#x}: {:?} holds bytes never written there",
                        SHARED_KEYS[k]
                    )
                });
                stored.insert((g, p, i), contents[k][c].clone());
                After::Holds(c)
            }
            Ok(GetOutcome::NotFound) => After::Empty,
            Err(e) => panic!("seed {seed:#x}: final get failed: {e:?}"),
        };
        assert!(
            candidates.contains(&&now) || (candidates.is_empty() && now == After::Empty),
            "seed {seed:#x}: {:?} ends as {now:?}, but the threads' last operations left {candidates:?}",
            SHARED_KEYS[k]
        );
    }
    let s = h.store.stats();
    if let Err(e) = check_stats(&h, setup, &s, &stored) {
        panic!("seed {seed:#x} ({setup:?}): {e}");
    }
    let recompressed = s.codecs.recompressions;
    for g in 0..GUESTS {
        h.store.drop_guest(GuestId(g));
    }
    let s = h.store.stats();
    assert_eq!(s.total.unique_pages, 0, "seed {seed:#x}: objects leaked");
    assert_eq!(
        h.store.memory().payload_chunk_bytes,
        0,
        "seed {seed:#x}: payload chunks left after dropping everything"
    );
    assert_eq!(
        s.total.mem_used_bytes, h.created,
        "seed {seed:#x}: an emptied store must return to its starting footprint"
    );
    recompressed
}

#[test]
fn threads_hammer_same_indexes_auto_with_the_recompressor() {
    let mut recompressed = 0;
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            let auto = |setup: Setup| Setup {
                compression: Compression::Auto,
                ..setup
            };
            recompressed += run_hammer(&auto(Setup::roomy(domain)), seed, 4, 2500);
            recompressed += run_hammer(
                &auto(Setup::tight(16 << 10, Some(32 << 10), domain)),
                seed,
                4,
                2500,
            );
        }
    }
    assert!(recompressed > 0, "the recompressor never swapped a payload");
}

#[test]
fn threads_hammer_same_indexes_every_domain() {
    for domain in [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global] {
        for seed in MT_SEEDS {
            run_hammer(&Setup::roomy(domain), seed, 4, 2500);
            run_hammer(&Setup::tight(16 << 10, Some(32 << 10), domain), seed, 4, 2500);
        }
    }
}

#[test]
fn threads_hammer_same_indexes_no_spill() {
    for seed in MT_SEEDS {
        run_hammer(&Setup::tight(12 << 10, None, DedupDomain::Global), seed, 4, 2500);
    }
}
