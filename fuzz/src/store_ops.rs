//! Target `store_ops`: sequences of store operations with small RAM and spill
//! limits, against a `HashMap` model, with faults injected into the spill
//! file.
//!
//! The invariant: every GET returns the last page PUT at that key, or
//! NOT_FOUND when the model holds nothing there; never other data. In detail:
//! - a `Stored` put makes the page readable, byte-exact, until it is
//!   invalidated, read exclusively, or its pool or guest is dropped;
//! - a `Rejected` put, or one that fails, leaves nothing at that key (the
//!   older copy is gone too: a GET right after it says NOT_FOUND);
//! - a GET of a key the model does not hold says NOT_FOUND;
//! - an error is allowed only once a fault has been injected, and a page
//!   whose GET failed may afterwards fail again, come back intact, or be
//!   gone; it never comes back different;
//! - nothing fails while no fault has been injected, and with no limit
//!   below the pages' needs nothing is rejected;
//! - host memory never grows past `max(limit, usage before the operation)`;
//! - the page counts in the stats match the model, and a store emptied by
//!   dropping every guest is back to its starting footprint.
//!
//! Faults, all blind (the spill format belongs to the store): bytes of the
//! spill file flipped, zeroed or copied elsewhere in it, the file truncated,
//! or rolled back to a snapshot taken earlier; and a file-size limit
//! (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored) under which writes past it fail
//! with `EFBIG`, as on a full filesystem. The file is found through
//! `/proc/self/fd`, so it need not have a name.
//!
//! Input format ([`crate::input`]): two set-up bytes (dedup domain, spill
//! limit, RAM budget, zstd level, shards, writeback headroom), then one
//! operation per tag byte until the input ends.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Once, OnceLock},
    time::Duration,
};

use vhost_user_tmem::store::{
    DedupDomain, GetOutcome, GuestId, Page, PutOutcome, SpillConfig, Store, StoreConfig, PAGE_SIZE,
};

use crate::{
    input::{Reader, Writer},
    pages::{fill_page, make_page, Content},
};

pub const GUESTS: u8 = 3;
pub const POOLS: u8 = 3;
pub const INDEXES: u8 = 16;
const MAX_OPS: usize = 400;
const BIG: u64 = 1 << 40;

pub type Key = (u8, u8, u8);

fn key(r: &mut Reader) -> Key {
    (r.u8() % GUESTS, r.u8() % POOLS, r.u8() % INDEXES)
}

fn write_key(w: &mut Writer, k: Key) {
    w.u8(k.0).u8(k.1).u8(k.2);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    pub dedup: DedupDomain,
    pub spill_limit: Option<u64>,
    /// RAM budget over the empty store's own use; `None`: practically unlimited.
    pub mem_extra: Option<u64>,
    pub level: i32,
    pub shards: usize,
    pub headroom: u64,
}

const DEDUP: [DedupDomain; 3] = [DedupDomain::Off, DedupDomain::Guest, DedupDomain::Global];
const SPILL: [Option<u64>; 5] = [
    None,
    Some(16 << 10),
    Some(64 << 10),
    Some(256 << 10),
    Some(1 << 20),
];
const MEM: [Option<u64>; 6] = [
    None,
    Some(8 << 10),
    Some(16 << 10),
    Some(24 << 10),
    Some(64 << 10),
    Some(256 << 10),
];
const LEVEL: [i32; 2] = [1, 3];
const SHARDS: [usize; 3] = [0, 1, 4];
const HEADROOM: [u64; 2] = [0, 16 << 10];
/// `SetMemLimit`: over the empty store's use.
const LIMITS: [u64; 5] = [0, 8 << 10, 32 << 10, 1 << 20, BIG];
/// `FileSizeLimit`: `None` lifts it.
const FSIZE: [Option<u64>; 5] = [
    None,
    Some(16 << 10),
    Some(32 << 10),
    Some(64 << 10),
    Some(128 << 10),
];

impl Setup {
    fn read(r: &mut Reader) -> Self {
        let (a, b) = (usize::from(r.u8()), usize::from(r.u8()));
        let c = b / MEM.len();
        Setup {
            dedup: DEDUP[a % 3],
            spill_limit: SPILL[(a / 3) % SPILL.len()],
            mem_extra: MEM[b % MEM.len()],
            level: LEVEL[c % 2],
            shards: SHARDS[(c / 2) % 3],
            headroom: HEADROOM[(c / 6) % 2],
        }
    }

    fn write(&self, w: &mut Writer) {
        let pos = |found: Option<usize>| found.expect("a setting the format can say") as u8;
        let dedup = pos(DEDUP.iter().position(|&d| d == self.dedup));
        let spill = pos(SPILL.iter().position(|&s| s == self.spill_limit));
        let mem = pos(MEM.iter().position(|&m| m == self.mem_extra));
        let level = pos(LEVEL.iter().position(|&l| l == self.level));
        let shards = pos(SHARDS.iter().position(|&s| s == self.shards));
        let headroom = pos(HEADROOM.iter().position(|&h| h == self.headroom));
        let c = level + 2 * shards + 6 * headroom;
        w.u8(dedup + 3 * spill).u8(mem + MEM.len() as u8 * c);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// XOR up to 512 bytes from `at` (modulo the file's length) with `xor` (0 acts as 1).
    Flip {
        at: u32,
        len: u16,
        xor: u8,
    },
    Zero {
        at: u32,
        len: u16,
    },
    /// Copies up to 4 KiB within the file.
    Copy {
        from: u32,
        to: u32,
        len: u16,
    },
    /// Cuts the file to `to` modulo its length plus one.
    Truncate {
        to: u32,
    },
    /// Puts the file back as it was at the last `Snapshot`.
    Rollback,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(Key, Content),
    PutFill(Key, u64),
    Get(Key, bool),
    Invalidate(Key),
    InvalidatePool(u8, u8),
    DropGuest(u8),
    /// The empty store's use plus `LIMITS[n % 5]`.
    SetMemLimit(u8),
    Writeback(u8),
    /// One round of the background writer, without waiting.
    Background,
    Snapshot,
    Fault(Fault),
    /// `FSIZE[n % 5]` from now on, around every store call.
    FileSizeLimit(u8),
}

impl Op {
    fn read(r: &mut Reader) -> Self {
        match r.choice(16) {
            0..=3 => Op::Put(key(r), Content::read(r)),
            4 => Op::PutFill(key(r), r.u64()),
            5..=7 => Op::Get(key(r), r.u8() & 1 != 0),
            8 => Op::Invalidate(key(r)),
            9 => Op::InvalidatePool(r.u8() % GUESTS, r.u8() % POOLS),
            10 => Op::DropGuest(r.u8() % GUESTS),
            11 => Op::SetMemLimit(r.u8()),
            12 => Op::Writeback(r.u8()),
            13 => match r.choice(3) {
                0 => Op::Background,
                1 => Op::Snapshot,
                _ => Op::FileSizeLimit(r.u8()),
            },
            _ => Op::Fault(match r.choice(5) {
                0 => Fault::Flip {
                    at: r.u32(),
                    len: r.u16(),
                    xor: r.u8(),
                },
                1 => Fault::Zero {
                    at: r.u32(),
                    len: r.u16(),
                },
                2 => Fault::Copy {
                    from: r.u32(),
                    to: r.u32(),
                    len: r.u16(),
                },
                3 => Fault::Truncate { to: r.u32() },
                _ => Fault::Rollback,
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        match *self {
            Op::Put(k, c) => {
                w.u8(0);
                write_key(w, k);
                c.write(w);
            }
            Op::PutFill(k, f) => {
                w.u8(4);
                write_key(w, k);
                w.u64(f);
            }
            Op::Get(k, x) => {
                w.u8(5);
                write_key(w, k);
                w.u8(u8::from(x));
            }
            Op::Invalidate(k) => {
                w.u8(8);
                write_key(w, k);
            }
            Op::InvalidatePool(g, p) => {
                w.u8(9).u8(g).u8(p);
            }
            Op::DropGuest(g) => {
                w.u8(10).u8(g);
            }
            Op::SetMemLimit(n) => {
                w.u8(11).u8(n);
            }
            Op::Writeback(n) => {
                w.u8(12).u8(n);
            }
            Op::Background => {
                w.u8(13).u8(0);
            }
            Op::Snapshot => {
                w.u8(13).u8(1);
            }
            Op::FileSizeLimit(n) => {
                w.u8(13).u8(2).u8(n);
            }
            Op::Fault(f) => {
                w.u8(14);
                match f {
                    Fault::Flip { at, len, xor } => w.u8(0).u32(at).u16(len).u8(xor),
                    Fault::Zero { at, len } => w.u8(1).u32(at).u16(len),
                    Fault::Copy { from, to, len } => w.u8(2).u32(from).u32(to).u16(len),
                    Fault::Truncate { to } => w.u8(3).u32(to),
                    Fault::Rollback => w.u8(4),
                };
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub setup: Setup,
    pub ops: Vec<Op>,
}

impl Input {
    pub fn read(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let setup = Setup::read(&mut r);
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < MAX_OPS {
            ops.push(Op::read(&mut r));
        }
        Input { setup, ops }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.setup.write(&mut w);
        for op in &self.ops {
            op.write(&mut w);
        }
        w.data
    }
}

// ---------------------------------------------------------------------------
// File-size limit

static ORIGINAL_FSIZE: OnceLock<libc::rlimit> = OnceLock::new();

/// Ignores SIGXFSZ (a write past the limit then fails with EFBIG), and makes
/// a panic lift the limit first, so that the report and the crash input can
/// be written.
fn init_fsize() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass, which outlives the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) };
        assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
        let _ = ORIGINAL_FSIZE.set(lim);
        // SAFETY: setting a signal's disposition to SIG_IGN has no handler to get wrong.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_fsize();
            previous(info)
        }));
    });
}

fn set_fsize(bytes: u64) {
    let original = ORIGINAL_FSIZE.get().expect("init_fsize ran");
    let lim = libc::rlimit {
        rlim_cur: bytes.min(original.rlim_max),
        rlim_max: original.rlim_max,
    };
    // SAFETY: setrlimit only reads the rlimit we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) };
}

fn restore_fsize() {
    if let Some(original) = ORIGINAL_FSIZE.get() {
        // SAFETY: as in `set_fsize`.
        unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, original) };
    }
}

// ---------------------------------------------------------------------------
// The spill file, from outside

/// The open spill file of the store whose spill path is in `dir`, reopened
/// through `/proc/self/fd` (it may have no name).
fn spill_file(dir: &Path) -> Option<File> {
    let prefix = dir.to_string_lossy().into_owned();
    let fd = std::fs::read_dir("/proc/self/fd").ok()?.find_map(|e| {
        let fd = e.ok()?.path();
        let target = std::fs::read_link(&fd).ok()?;
        target.to_string_lossy().starts_with(&prefix).then_some(fd)
    })?;
    std::fs::OpenOptions::new().read(true).write(true).open(fd).ok()
}

fn inject(file: &File, fault: Fault, snapshot: Option<&[u8]>) {
    let Ok(size) = file.metadata().map(|m| m.len()) else {
        return;
    };
    let span = |at: u32, len: u16, cap: u64| {
        let at = u64::from(at) % size.max(1);
        (at, (u64::from(len) % cap + 1).min(size - at) as usize)
    };
    match fault {
        Fault::Rollback => {
            if let Some(bytes) = snapshot {
                let _ = file.set_len(bytes.len() as u64);
                let _ = file.write_all_at(bytes, 0);
            }
        }
        Fault::Truncate { to } => {
            let _ = file.set_len(u64::from(to) % (size + 1));
        }
        _ if size == 0 => {}
        Fault::Flip { at, len, xor } => {
            let (at, n) = span(at, len, 512);
            let mut buf = vec![0u8; n];
            if file.read_exact_at(&mut buf, at).is_ok() {
                buf.iter_mut().for_each(|b| *b ^= xor.max(1));
                let _ = file.write_all_at(&buf, at);
            }
        }
        Fault::Zero { at, len } => {
            let (at, n) = span(at, len, 512);
            let _ = file.write_all_at(&vec![0u8; n], at);
        }
        Fault::Copy { from, to, len } => {
            let (from, n) = span(from, len, 4096);
            let to = u64::from(to) % size;
            let mut buf = vec![0u8; n];
            if file.read_exact_at(&mut buf, from).is_ok() {
                let _ = file.write_all_at(&buf, to);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The model

#[derive(Clone, Debug)]
enum Slot {
    Page(Box<Page>),
    /// A GET of this page failed: it may fail again, come back intact, or be gone.
    Damaged(Box<Page>),
}

impl Slot {
    fn page(&self) -> &Page {
        match self {
            Slot::Page(p) | Slot::Damaged(p) => p,
        }
    }
}

/// What a run went through, for the tests (to see that inputs reach the paths
/// they aim at).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub stored: u32,
    pub refused: u32,
    pub failed_gets: u32,
    pub faults: u32,
    pub spilled_pages: u64,
}

struct Harness {
    tally: Tally,
    store: Store,
    dir: PathBuf,
    setup: Setup,
    /// Host memory right after `Store::new`.
    created: u64,
    /// Host memory of the empty store with its tables grown: limits count from here.
    baseline: u64,
    /// Puts may be refused: a RAM budget is set.
    tight: bool,
    fsize: Option<u64>,
    snapshot: Option<Vec<u8>>,
    faulted: bool,
    model: HashMap<Key, Slot>,
}

impl Harness {
    fn new(setup: &Setup, dir: PathBuf) -> Self {
        let spill = setup.spill_limit.map(|limit| SpillConfig {
            path: dir.join("spill"),
            limit,
        });
        let store = Store::new(StoreConfig {
            mem_limit: BIG,
            spill,
            zstd_level: setup.level,
            dedup: setup.dedup,
            shards: setup.shards,
            writeback_headroom: setup.headroom,
            ..StoreConfig::default()
        })
        .expect("Store::new");
        let created = store.mem_used();
        let baseline = match setup.mem_extra {
            None => created,
            Some(extra) => {
                // Grow the tables to every key first (with fills: no
                // compression), so that the tight budget is spent on pages.
                for (n, (g, p, i)) in all_keys().enumerate() {
                    let r = store.put_fill(GuestId(g.into()), p.into(), i.into(), n as u64 + 1);
                    assert_eq!(r.expect("warm-up"), PutOutcome::Stored);
                }
                for g in 0..GUESTS {
                    store.drop_guest(GuestId(g.into()));
                }
                let baseline = store.mem_used();
                store
                    .set_mem_limit(baseline + extra)
                    .expect("limit on an empty store");
                baseline
            }
        };
        Harness {
            tally: Tally::default(),
            store,
            dir,
            setup: setup.clone(),
            created,
            baseline,
            tight: setup.mem_extra.is_some(),
            fsize: None,
            snapshot: None,
            faulted: false,
            model: HashMap::new(),
        }
    }

    /// Runs a store call under the file-size limit in force.
    fn call<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        if let Some(bytes) = self.fsize {
            set_fsize(bytes);
        }
        let out = f(&self.store);
        if self.fsize.is_some() {
            restore_fsize();
        }
        out
    }

    fn get_checked(&mut self, n: usize, k: Key, exclusive: bool) {
        let mut out = Box::new([0x5au8; PAGE_SIZE]);
        let r = self.call(|s| s.get(GuestId(k.0.into()), k.1.into(), k.2.into(), &mut out, exclusive));
        let what = || format!("op {n}: get {k:?} (exclusive {exclusive})");
        match (self.model.get(&k), r) {
            (None, Ok(GetOutcome::NotFound)) => {}
            (None, r) => panic!("{}: the model holds nothing there, the store said {r:?}", what()),
            (Some(slot), Ok(GetOutcome::Found)) => {
                assert!(out[..] == slot.page()[..], "{}: WRONG DATA", what());
                if exclusive {
                    self.model.remove(&k);
                } else {
                    self.model.insert(k, Slot::Page(Box::new(*slot.page())));
                }
            }
            (Some(Slot::Damaged(_)), Ok(GetOutcome::NotFound)) => {
                self.model.remove(&k);
            }
            (Some(Slot::Page(_)), Ok(GetOutcome::NotFound)) => {
                panic!("{}: a stored page is gone", what())
            }
            (Some(slot), Err(e)) => {
                self.tally.failed_gets += 1;
                assert!(self.faulted, "{}: failed with no fault injected: {e:?}", what());
                if exclusive {
                    self.model.remove(&k);
                } else {
                    let page = Box::new(*slot.page());
                    self.model.insert(k, Slot::Damaged(page));
                }
            }
        }
    }

    fn put_checked(&mut self, n: usize, k: Key, page: Box<Page>, fill: Option<u64>) {
        let (g, p, i) = (GuestId(k.0.into()), k.1.into(), k.2.into());
        let r = self.call(|s| match fill {
            Some(word) => s.put_fill(g, p, i, word),
            None => s.put(g, p, i, &page),
        });
        match r {
            Ok(PutOutcome::Stored) => {
                self.tally.stored += 1;
                self.model.insert(k, Slot::Page(page));
            }
            Ok(PutOutcome::Rejected) | Err(_) => {
                self.tally.refused += 1;
                assert!(self.tight, "op {n}: put {k:?} refused with room to spare: {r:?}");
                if let Err(e) = &r {
                    assert!(
                        self.faulted,
                        "op {n}: put {k:?} failed with no fault injected: {e:?}"
                    );
                }
                self.model.remove(&k);
                // Frontswap: the old copy must be gone at once.
                self.get_checked(n, k, false);
            }
        }
    }

    fn dropped(&mut self, n: usize, what: &str, got: u64, pick: impl Fn(&Key) -> bool) {
        let (mut sure, mut maybe) = (0u64, 0u64);
        self.model.retain(|k, slot| {
            if pick(k) {
                match slot {
                    Slot::Page(_) => sure += 1,
                    Slot::Damaged(_) => maybe += 1,
                }
            }
            !pick(k)
        });
        assert!(
            (sure..=sure + maybe).contains(&got),
            "op {n}: {what} dropped {got} pages, the model holds {sure} (and {maybe} damaged)"
        );
    }

    fn apply(&mut self, n: usize, op: &Op) {
        match *op {
            Op::Put(k, c) => self.put_checked(n, k, make_page(c), None),
            Op::PutFill(k, word) => self.put_checked(n, k, fill_page(word), Some(word)),
            Op::Get(k, x) => self.get_checked(n, k, x),
            Op::Invalidate(k) => {
                let was = self.call(|s| s.invalidate_page(GuestId(k.0.into()), k.1.into(), k.2.into()));
                self.dropped(n, "invalidate_page", u64::from(was), |&m| m == k);
            }
            Op::InvalidatePool(g, p) => {
                let got = self.call(|s| s.invalidate_pool(GuestId(g.into()), p.into()));
                self.dropped(n, "invalidate_pool", got, |m| m.0 == g && m.1 == p);
            }
            Op::DropGuest(g) => {
                let got = self.call(|s| s.drop_guest(GuestId(g.into())));
                self.dropped(n, "drop_guest", got, |m| m.0 == g);
            }
            Op::SetMemLimit(which) => {
                let extra = LIMITS[usize::from(which) % LIMITS.len()];
                let limit = self.baseline.saturating_add(extra);
                let r = self.call(|s| s.set_mem_limit(limit));
                // Without a spill file nothing can move: the store stays over
                // its budget but keeps every page.
                assert!(
                    r.is_ok() || self.faulted,
                    "op {n}: set_mem_limit failed with no fault injected: {r:?}"
                );
                self.tight = true;
            }
            Op::Writeback(pages) => {
                let pages = u64::from(pages % 32);
                match self.call(|s| s.writeback(pages)) {
                    Ok(done) => {
                        assert!(done <= pages, "op {n}: writeback({pages}) wrote {done}");
                        assert!(
                            done == 0 || self.setup.spill_limit.is_some(),
                            "op {n}: writeback({pages}) wrote {done} pages with no spill file"
                        );
                    }
                    Err(e) => assert!(self.faulted, "op {n}: writeback failed with no fault: {e:?}"),
                }
            }
            Op::Background => {
                if let Err(e) = self.call(|s| s.background_writeback(Duration::ZERO)) {
                    assert!(
                        self.faulted,
                        "op {n}: background writeback failed with no fault: {e:?}"
                    );
                }
            }
            Op::Snapshot => {
                if let Some(file) = spill_file(&self.dir) {
                    let len = file.metadata().map_or(0, |m| m.len());
                    let mut bytes = vec![0u8; len as usize];
                    if file.read_exact_at(&mut bytes, 0).is_ok() {
                        self.snapshot = Some(bytes);
                    }
                }
            }
            Op::Fault(fault) => {
                if let Some(file) = spill_file(&self.dir) {
                    self.tally.faults += 1;
                    self.faulted = true;
                    inject(&file, fault, self.snapshot.as_deref());
                }
            }
            Op::FileSizeLimit(which) => self.fsize = FSIZE[usize::from(which) % FSIZE.len()],
        }
    }

    fn check_counts(&mut self, n: usize) {
        let s = self.store.stats();
        self.tally.spilled_pages = self.tally.spilled_pages.max(s.total.spilled_pages);
        let sure = self.model.values().filter(|s| matches!(s, Slot::Page(_))).count() as u64;
        let maybe = self.model.len() as u64 - sure;
        let stored = s.total.stored_pages;
        assert!(
            (sure..=sure + maybe).contains(&stored),
            "after op {n}: stored_pages {stored}, the model holds {sure} (and {maybe} damaged)"
        );
        assert!(s.total.spilled_pages <= stored, "after op {n}: spilled > stored");
        match self.setup.spill_limit {
            None => assert_eq!(s.total.spilled_pages, 0, "after op {n}: spilled with no file"),
            Some(limit) => assert!(
                s.total.spill_file_bytes <= limit,
                "after op {n}: spill file {} bytes over its limit {limit}",
                s.total.spill_file_bytes
            ),
        }
    }

    fn run(&mut self, ops: &[Op]) {
        for (n, op) in ops.iter().enumerate() {
            let before = self.store.mem_used();
            self.apply(n, op);
            let (now, limit) = (self.store.mem_used(), self.store.mem_limit());
            assert!(
                now <= before.max(limit),
                "op {n} {op:?}: memory use {now} > max(limit {limit}, before {before})"
            );
            if n % 16 == 15 {
                self.check_counts(n);
            }
        }
        // Every page reads back (or, once damaged, fails or is gone).
        self.fsize = None;
        let end = ops.len();
        let mut keys: Vec<Key> = self.model.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            self.get_checked(end, k, false);
        }
        self.check_counts(end);
        for g in 0..GUESTS {
            self.store.drop_guest(GuestId(g.into()));
        }
        self.model.clear();
        let s = self.store.stats();
        assert_eq!(s.total.stored_pages, 0, "pages left after dropping every guest");
        assert_eq!(
            s.total.compr_data_bytes, 0,
            "compressed bytes left after dropping all"
        );
        assert_eq!(
            self.store.memory().payload_chunk_bytes,
            0,
            "payload chunks left after dropping all"
        );
        assert_eq!(
            self.store.mem_used(),
            self.created,
            "an emptied store must be back to its starting footprint"
        );
    }
}

fn all_keys() -> impl Iterator<Item = Key> {
    (0..GUESTS).flat_map(|g| (0..POOLS).flat_map(move |p| (0..INDEXES).map(move |i| (g, p, i))))
}

/// The directory every run's spill directory is made in: on tmpfs when there
/// is one, as a disk file system costs more than the store does.
fn root() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir")
    })
    .path()
}

/// Runs one input; panics when an invariant breaks.
pub fn run(data: &[u8]) -> Tally {
    run_input(&Input::read(data))
}

pub fn run_input(input: &Input) -> Tally {
    init_fsize();
    let dir = tempfile::tempdir_in(root()).expect("spill directory");
    let mut h = Harness::new(&input.setup, dir.path().to_owned());
    h.run(&input.ops);
    h.tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(spill: Option<u64>, mem: Option<u64>) -> Setup {
        Setup {
            dedup: DedupDomain::Guest,
            spill_limit: spill,
            mem_extra: mem,
            level: 1,
            shards: 0,
            headroom: 16 << 10,
        }
    }

    #[test]
    fn input_round_trips() {
        let input = Input {
            setup: setup(Some(64 << 10), Some(8 << 10)),
            ops: vec![
                Op::Put((1, 2, 3), Content::Text(4)),
                Op::Get((1, 2, 3), true),
                Op::Fault(Fault::Copy {
                    from: 1,
                    to: 2,
                    len: 3,
                }),
                Op::FileSizeLimit(2),
                Op::Background,
                Op::Snapshot,
            ],
        };
        assert_eq!(Input::read(&input.to_bytes()), input);
    }

    /// Pages spill, the file is damaged every way, and reading goes on.
    #[test]
    fn faults_give_errors_never_wrong_data() {
        let mut ops = Vec::new();
        for i in 0..INDEXES {
            ops.push(Op::Put((0, 0, i), Content::Random(i)));
            ops.push(Op::Put((1, 1, i), Content::Text(i)));
        }
        ops.push(Op::Snapshot);
        for i in 0..INDEXES {
            ops.push(Op::Put((0, 0, i), Content::Half(i)));
        }
        ops.extend([
            Op::Fault(Fault::Flip {
                at: 100,
                len: 300,
                xor: 0xff,
            }),
            Op::Fault(Fault::Copy {
                from: 0,
                to: 8192,
                len: 4000,
            }),
            Op::Fault(Fault::Rollback),
            Op::Fault(Fault::Truncate { to: 20_000 }),
        ]);
        for i in 0..INDEXES {
            ops.push(Op::Get((0, 0, i), false));
            ops.push(Op::Get((1, 1, i), i % 2 == 0));
        }
        let t = run_input(&Input {
            setup: setup(Some(256 << 10), Some(16 << 10)),
            ops,
        });
        assert_eq!(t.faults, 4, "{t:?}");
        assert!(t.spilled_pages > 8, "{t:?}");
        assert!(t.failed_gets > 0, "{t:?}");
    }

    #[test]
    fn file_size_limit_rejects_and_loses_nothing() {
        let mut ops = vec![Op::FileSizeLimit(1)];
        for i in 0..INDEXES {
            ops.push(Op::Put((2, 0, i), Content::Random(i)));
        }
        ops.push(Op::Writeback(31));
        let t = run_input(&Input {
            setup: setup(Some(1 << 20), Some(8 << 10)),
            ops,
        });
        assert!(t.refused > 0, "{t:?}");
        assert!(t.spilled_pages > 0, "{t:?}");
    }
}
