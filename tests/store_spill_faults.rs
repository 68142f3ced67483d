//! The spill tier under faults: a filesystem that fills up (ENOSPC) and a spill
//! file corrupted on disk behind the store's back.
//!
//! The spill file's format belongs to the store, so corruption here is blind:
//! it flips bytes wherever they are, and checks only what frontswap promises:
//! a page comes back byte-exact or the get fails; it is never wrong and never
//! silently missing. The file has no name, so the tests reach it the way
//! anyone with this process's rights would: through `/proc/self/fd`.
//!
//! The file's privacy is checked from outside too: no name, mode 0600, no
//! guest bytes in the clear, and a spill path that is a link or an existing
//! file is refused without touching it.

use std::{
    collections::{hash_map::Entry, HashMap},
    ffi::CString,
    os::unix::{
        ffi::OsStrExt,
        fs::{symlink, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use vhost_user_tmem::store::{
    DedupDomain, GetOutcome, GuestId, Page, PutOutcome, SpillConfig, Store, StoreConfig, StoreError,
    PAGE_SIZE,
};

const G: GuestId = GuestId(0);
const POOL: u32 = 0;
/// Set in the environment of a copy of this test run inside `unshare -rm`.
const REEXEC: &str = "TMEM_TEST_IN_USERNS";

fn random_page(seed: u64) -> Box<Page> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for w in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// Compressible but unique: text with the seed written into it.
fn text_page(seed: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    let line = format!("page {seed} of the spill fault test, swapped out by a guest; ");
    for (i, b) in p.iter_mut().enumerate() {
        *b = line.as_bytes()[i % line.len()];
    }
    p
}

/// A store with little RAM for payload, so pages spill. Pages are put at every
/// index used later and dropped first, so a store that keeps its grown tables
/// spends the tight limit on pages, and one that shrinks them is exercised
/// growing them again under the limit.
fn spilling_store(spill: PathBuf, spill_limit: u64, ram_extra: u64) -> Store {
    let store = Store::new(StoreConfig {
        mem_limit: 1 << 40,
        spill: Some(SpillConfig {
            path: spill,
            limit: spill_limit,
        }),
        zstd_level: 1,
        dedup: DedupDomain::Guest,
        ..StoreConfig::default()
    })
    .expect("Store::new");
    for i in 0..WARM_PAGES {
        let r = store.put(G, POOL, i, &random_page(u64::MAX - i));
        assert_eq!(r.expect("warm-up put"), PutOutcome::Stored);
    }
    assert_eq!(store.drop_guest(G), WARM_PAGES);
    assert_eq!(store.stats().total.spilled_pages, 0, "warm-up spilled");
    let baseline = store.stats().total.mem_used_bytes;
    store
        .set_mem_limit(baseline + ram_extra)
        .expect("set_mem_limit on an empty store");
    store
}

/// Covers every index the tests use.
const WARM_PAGES: u64 = 6000;

fn get(store: &Store, index: u64) -> (Result<GetOutcome, String>, Box<Page>) {
    let mut out = Box::new([0x77u8; PAGE_SIZE]);
    let r = store
        .get(G, POOL, index, &mut out, false)
        .map_err(|e| format!("{e:?}"));
    (r, out)
}

fn assert_reads_back(store: &Store, model: &HashMap<u64, Box<Page>>, what: &str) {
    for (&i, want) in model {
        let (r, out) = get(store, i);
        assert_eq!(r, Ok(GetOutcome::Found), "{what}: page {i}");
        assert!(out[..] == want[..], "{what}: page {i} came back different");
    }
}

// ---------------------------------------------------------------------------
// A small tmpfs, mounted for one test

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let c = CString::new(self.0.as_os_str().as_bytes()).expect("path has no NUL");
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> std::io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).expect("path has no NUL");
    let opts = CString::new(format!("size={size},mode=0700")).expect("no NUL");
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the
    // call; tmpfs takes its options as such a string.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `body` with a directory on a fresh tmpfs of `size`. Without the right
/// to mount, re-runs this one test inside `unshare -rm` (a user and mount
/// namespace where it may), and fails loudly if that is impossible too.
fn with_small_tmpfs(test: &str, size: &str, body: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    match mount_tmpfs(dir.path(), size) {
        Ok(()) => {
            let _unmount = Unmount(dir.path().to_owned());
            body(dir.path());
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && std::env::var_os(REEXEC).is_none() => {
            let exe = std::env::current_exe().expect("current_exe");
            let out = Command::new("unshare")
                .args(["-rm", "--"])
                .arg(exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(REEXEC, "1")
                .output()
                .unwrap_or_else(|e2| {
                    panic!(
                        "mounting a tmpfs needs CAP_SYS_ADMIN ({e}); running `unshare -rm` \
                         to get it in a user namespace failed too: {e2}"
                    )
                });
            let stdout = String::from_utf8_lossy(&out.stdout);
            print!("{stdout}");
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{test} failed inside `unshare -rm` ({}); mounting a tmpfs needs CAP_SYS_ADMIN \
                 or unprivileged user namespaces",
                out.status
            );
        }
        Err(e) => panic!(
            "cannot mount a {size} tmpfs on {}: {e}. This test needs CAP_SYS_ADMIN (root) or \
             unprivileged user namespaces (`unshare -rm`)",
            dir.path().display()
        ),
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let c = CString::new(dir.as_os_str().as_bytes()).expect("path has no NUL");
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path and `st` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
    st.f_bavail * st.f_frsize
}

// ---------------------------------------------------------------------------
// ENOSPC

/// Free space allowed to remain when the store first says the file is full:
/// a few objects' worth, for whatever granularity the spill file grows by.
const ENOSPC_SLACK: u64 = 64 << 10;

#[test]
fn full_spill_filesystem_rejects_only_when_full_and_loses_nothing() {
    with_small_tmpfs(
        "full_spill_filesystem_rejects_only_when_full_and_loses_nothing",
        "256k",
        |dir| {
            // The file's own limit is far above the filesystem: ENOSPC comes first.
            let store = spilling_store(dir.join("spill"), 64 << 20, 256 << 10);
            let mut model: HashMap<u64, Box<Page>> = HashMap::new();
            let mut rejected_at = None;
            // Every fifth page is same-filled: it holds no payload, so
            // overwriting it with a random page once the filesystem is full
            // needs room that no freed copy gives back, and must be rejected.
            // (A random page over a random page frees as much as it needs.)
            let is_fill = |i: u64| i % 5 == 4;
            for i in 0..2000u64 {
                let page = if is_fill(i) {
                    Box::new([i as u8 | 1; PAGE_SIZE])
                } else {
                    random_page(i + 1)
                };
                match store.put(G, POOL, i, &page) {
                    Ok(PutOutcome::Stored) => {
                        model.insert(i, page);
                    }
                    Ok(PutOutcome::Rejected) | Err(_) => {
                        rejected_at = Some(i);
                        break;
                    }
                }
            }
            let first = rejected_at.expect("2000 incompressible pages never filled a 256k filesystem");
            let free = free_bytes(dir);
            assert!(
                free < ENOSPC_SLACK,
                "first put rejected after {first} pages while the filesystem still had {free} bytes free"
            );
            let s = store.stats();
            assert!(s.total.spilled_pages > 0, "nothing spilled before the rejection");
            assert_eq!(s.total.failed_stores, 1);
            assert_eq!(get(&store, first).0, Ok(GetOutcome::NotFound));
            assert_reads_back(&store, &model, "after the first rejection");

            // Overwrites while full: either stored (new bytes) or rejected (gone).
            let mut rejected_overwrites = 0;
            let fills = (0..first).filter(|&i| is_fill(i));
            for i in fills.chain((0..first).step_by(3).filter(|&i| !is_fill(i))) {
                let page = random_page(10_000 + i);
                match store.put(G, POOL, i, &page) {
                    Ok(PutOutcome::Stored) => {
                        model.insert(i, page);
                    }
                    Ok(PutOutcome::Rejected) | Err(_) => {
                        rejected_overwrites += 1;
                        model.remove(&i);
                        assert_eq!(
                            get(&store, i).0,
                            Ok(GetOutcome::NotFound),
                            "old copy of rejected overwrite {i} is still readable"
                        );
                    }
                }
            }
            assert!(
                rejected_overwrites > 0,
                "no overwrite was rejected on a full filesystem"
            );
            assert_reads_back(&store, &model, "after overwrites on a full filesystem");

            // Freed file space is reused: drop pages, and new ones fit again.
            let victims: Vec<u64> = model.keys().copied().take(24).collect();
            for i in &victims {
                assert!(store.invalidate_page(G, POOL, *i));
                model.remove(i);
            }
            let mut stored_again = 0;
            for i in 5000..5004u64 {
                let page = random_page(i);
                if store.put(G, POOL, i, &page).ok() == Some(PutOutcome::Stored) {
                    stored_again += 1;
                    model.insert(i, page);
                }
            }
            assert!(stored_again > 0, "freed spill space was not reused");
            assert_reads_back(&store, &model, "after reuse");
            let s = store.stats();
            assert_eq!(s.total.stored_pages, model.len() as u64);
        },
    );
}

// ---------------------------------------------------------------------------
// Corruption

const PAGES: u64 = 192;

/// The open spill file of the store whose spill path is in `dir`, as a
/// `/proc/self/fd` path: the one descriptor of this process whose link names
/// a deleted file in `dir` (`dir/#INODE (deleted)` for an `O_TMPFILE` file).
fn spill_fd(dir: &Path) -> PathBuf {
    let prefix = format!("{}/", dir.display());
    let found: Vec<PathBuf> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| {
            let fd = e.ok()?.path();
            let target = std::fs::read_link(&fd).ok()?;
            let target = target.to_string_lossy();
            (target.starts_with(&prefix) && target.ends_with(" (deleted)")).then_some(fd)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one open, deleted spill file in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().expect("one")
}

/// Fills a fresh store so that most pages live in the spill file. Returns the
/// spill file's `/proc/self/fd` path.
fn filled_spilling_store(dir: &Path) -> (Store, HashMap<u64, Box<Page>>, PathBuf) {
    let path = dir.join("spill");
    let store = spilling_store(path.clone(), 64 << 20, 256 << 10);
    let mut model = HashMap::new();
    for i in 0..PAGES {
        let page = if i % 3 == 0 {
            text_page(i)
        } else {
            random_page(i + 1)
        };
        assert_eq!(
            store.put(G, POOL, i, &page).expect("put"),
            PutOutcome::Stored,
            "put {i}"
        );
        model.insert(i, page);
    }
    let spilled = store.stats().total.spilled_pages;
    assert!(spilled >= PAGES / 2, "only {spilled} of {PAGES} pages spilled");
    assert!(
        !path.exists(),
        "the spill file must have no name: {} exists",
        path.display()
    );
    let path = spill_fd(dir);
    let len = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("the spill file must be open to corrupt it: {e}"))
        .len();
    assert!(
        len > 0,
        "the spill file is empty although {spilled} pages spilled"
    );
    (store, model, path)
}

/// Gets every page; each must be byte-exact or an error. Returns the failures.
fn read_all_checked(store: &Store, model: &HashMap<u64, Box<Page>>) -> Vec<u64> {
    let mut failed = Vec::new();
    for (&i, want) in model {
        match get(store, i) {
            (Ok(GetOutcome::Found), out) => {
                assert!(
                    out[..] == want[..],
                    "page {i} came back WRONG from a corrupted spill file"
                )
            }
            (Ok(GetOutcome::NotFound), _) => panic!("stored page {i} reported NotFound"),
            (Err(_), _) => failed.push(i),
        }
    }
    failed.sort_unstable();
    failed
}

#[test]
fn every_byte_of_the_spill_file_flipped_gives_errors_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut model, path) = filled_spilling_store(dir.path());
    let spilled = store.stats().total.spilled_pages;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&path, &bytes).unwrap();

    let failed = read_all_checked(&store, &model);
    assert_eq!(
        failed.len() as u64,
        spilled,
        "every spilled page must fail authentication, and only those"
    );
    // Asking again still fails rather than returning something.
    assert_eq!(read_all_checked(&store, &model), failed);

    // The store keeps working: the broken pages can be dropped and replaced.
    for i in &failed {
        assert!(store.invalidate_page(G, POOL, *i), "invalidate {i}");
        model.remove(i);
    }
    for i in 0..PAGES {
        if let Entry::Vacant(slot) = model.entry(i) {
            let page = random_page(1000 + i);
            assert_eq!(store.put(G, POOL, i, &page).unwrap(), PutOutcome::Stored);
            slot.insert(page);
        }
    }
    // New writes may land in slots whose old bytes are garbage: they must not
    // be mistaken for anything.
    assert!(read_all_checked(&store, &model).is_empty());
    assert_eq!(store.stats().total.stored_pages, PAGES);
}

#[test]
fn scattered_flipped_bytes_fail_only_the_pages_they_hit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, model, path) = filled_spilling_store(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // 16 bytes every 16 KiB: each run can touch at most two stored objects.
    const STRIDE: usize = 16 << 10;
    const RUN: usize = 16;
    let mut runs = 0;
    let mut at = 1000;
    while at + RUN <= bytes.len() {
        bytes[at..at + RUN].iter_mut().for_each(|b| *b ^= 0xff);
        runs += 1;
        at += STRIDE;
    }
    assert!(
        runs > 0,
        "spill file of {} bytes is too small to corrupt",
        bytes.len()
    );
    std::fs::write(&path, &bytes).unwrap();

    let failed = read_all_checked(&store, &model);
    assert!(!failed.is_empty(), "{runs} corrupted runs went unnoticed");
    assert!(
        failed.len() <= 2 * runs,
        "{} pages failed from {runs} corrupted 16-byte runs",
        failed.len()
    );
}

// ---------------------------------------------------------------------------
// Rejection only when both tiers are full

#[test]
fn puts_are_not_rejected_while_the_spill_file_has_room() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB of RAM beyond the warmed-up tables: room for the metadata of a few
    // hundred pages and a couple of payload chunks; everything else must spill.
    let store = spilling_store(dir.path().join("spill"), 64 << 20, 64 << 10);
    let mut model = HashMap::new();
    for i in 0..200u64 {
        let page = random_page(7_000 + i);
        let r = store.put(G, POOL, i, &page);
        let s = store.stats().total;
        assert_eq!(
            r.expect("put"),
            PutOutcome::Stored,
            "put {i} rejected with a spill file far from full (mem_used {} of limit {}, {} pages spilled, {} file bytes)",
            s.mem_used_bytes,
            store.mem_limit(),
            s.spilled_pages,
            s.spill_file_bytes
        );
        model.insert(i, page);
    }
    assert_reads_back(&store, &model, "after spilling");
}

// ---------------------------------------------------------------------------
// Tampering that keeps the format: one byte, and slots moved around

#[test]
fn one_flipped_byte_fails_at_most_one_page_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, model, path) = filled_spilling_store(dir.path());
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    // A few places, one at a time: the start of the file (a slot header), the
    // middle and near the end (inside payloads, or slack between them).
    let mut failed_somewhere = false;
    for at in [0, 5, 24, len / 2, len - 100] {
        let mut bytes = std::fs::read(&path).unwrap();
        let original = bytes.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let failed = read_all_checked(&store, &model);
        assert!(failed.len() <= 1, "one byte at {at} failed pages {failed:?}");
        failed_somewhere |= !failed.is_empty();
        std::fs::write(&path, &original).unwrap();
        assert!(
            read_all_checked(&store, &model).is_empty(),
            "after undoing byte {at}"
        );
    }
    assert!(failed_somewhere, "no flipped byte was noticed");
}

#[test]
fn slots_copied_over_other_slots_give_errors_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let (store, model, path) = filled_spilling_store(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    // Well-formed slots, moved: the second half of the file becomes a copy of
    // the first (what a CRC-checked format accepted, with each slot's own
    // check intact), then the halves are swapped.
    let half = bytes.len() / 2 / 128 * 128;
    let mut copied = bytes.clone();
    copied.copy_within(..half, half);
    std::fs::write(&path, &copied).unwrap();
    let failed = read_all_checked(&store, &model);
    assert!(!failed.is_empty(), "copied slots went unnoticed");
    let mut swapped = bytes[half..2 * half].to_vec();
    swapped.extend_from_slice(&bytes[..half]);
    swapped.extend_from_slice(&bytes[2 * half..]);
    std::fs::write(&path, &swapped).unwrap();
    let failed = read_all_checked(&store, &model);
    assert!(
        failed.len() as u64 >= store.stats().total.spilled_pages / 2,
        "{failed:?}"
    );
    // Put back as written, every page reads again: nothing was dropped.
    std::fs::write(&path, &bytes).unwrap();
    assert!(read_all_checked(&store, &model).is_empty());
}

// ---------------------------------------------------------------------------
// Privacy

#[test]
fn the_spill_file_is_unnamed_0600_and_holds_no_page_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let store = spilling_store(dir.path().to_owned(), 64 << 20, 64 << 10);
    // Pages a reader of the file would recognise: a compressible text page
    // (its frame keeps one copy of the line as literals) and an
    // incompressible one (kept raw), each with a marker.
    const MARKER: &[u8] = b"-----BEGIN OPENSSH PRIVATE KEY----- swapped out";
    let mut text = text_page(42);
    text[1000..1000 + MARKER.len()].copy_from_slice(MARKER);
    let mut noise = random_page(43);
    noise[2000..2000 + MARKER.len()].copy_from_slice(MARKER);
    let mut model = HashMap::new();
    for i in 0..100u64 {
        let page = match i % 3 {
            0 => text.clone(),
            1 => noise.clone(),
            _ => random_page(i + 100),
        };
        // Equal pages would share one copy: make each a little different.
        let mut page = page;
        page[8..16].copy_from_slice(&i.to_le_bytes());
        assert_eq!(store.put(G, POOL, i, &page).unwrap(), PutOutcome::Stored);
        model.insert(i, page);
    }
    assert!(store.stats().total.spilled_pages >= 50);
    let fd = spill_fd(dir.path());
    let meta = std::fs::metadata(&fd).unwrap();
    assert_eq!(meta.nlink(), 0, "the spill file has a name");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the spill directory shows an entry"
    );
    let bytes = std::fs::read(&fd).unwrap();
    let line = b"page 42 of the spill fault test, swapped out by a guest; ";
    for needle in [MARKER, &line[..24], &noise[3000..3024]] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{:?} is in the spill file in the clear",
            String::from_utf8_lossy(needle)
        );
    }
    assert_reads_back(&store, &model, "after looking at the file");
    // Gone with the store: nothing is left in the directory.
    drop(store);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_link_or_an_existing_file_at_the_spill_path_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let config = |path: PathBuf| StoreConfig {
        spill: Some(SpillConfig { path, limit: 1 << 20 }),
        ..StoreConfig::default()
    };
    let target = dir.path().join("target");
    std::fs::write(&target, b"not yours to truncate").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.path().join("spill");
    symlink(&target, &link).unwrap();
    match Store::new(config(link.clone())) {
        Err(StoreError::SpillSymlink(p)) => assert_eq!(p, link),
        Err(e) => panic!("wrong error for a symlink: {e}"),
        Ok(_) => panic!("a symlink at the spill path was accepted"),
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"not yours to truncate");
    assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o644);
    // The target itself is an existing file: refused, not reused or truncated.
    match Store::new(config(target.clone())) {
        Err(StoreError::SpillExists(p)) => assert_eq!(p, target),
        Err(e) => panic!("wrong error for an existing file: {e}"),
        Ok(_) => panic!("an existing file was reused as the spill file"),
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"not yours to truncate");
    assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o644);
}
