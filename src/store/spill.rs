//! The spill tier: compressed objects written back to one private,
//! encrypted file.
//!
//! **The file** has no name. It is made with `O_TMPFILE | O_EXCL` in the spill
//! directory (so it can never be linked in either), or, on a filesystem
//! without `O_TMPFILE`, created with `O_CREAT | O_EXCL | O_NOFOLLOW`, mode
//! 0600, and unlinked at once. An existing file or a symbolic link is never
//! opened. No other process can open it, and its blocks go back to the
//! filesystem when the last descriptor closes: the pages are gone when the
//! daemon exits. [`SpillFile::open`] says what the path may name.
//!
//! **Slots.** Each object sits in a slot of whole [`UNIT`]s: a 24-byte header
//! (the nonce counter of the write, 8 bytes, then the AES-256-GCM tag, 16
//! bytes) followed by the payload as it was in RAM, encrypted. The key is
//! drawn from the OS when the file is opened and lives only in this process's
//! memory. Nonces come from one 64-bit counter per file, so no two writes
//! share one, even to the same slot. The associated data binds the slot's
//! offset, the payload length and the owning object's [`Label`]. A flipped
//! byte, a freed slot, a slot copied to another offset, or an old slot of
//! another object at the same place all fail to open: a read gives the stored
//! payload or [`StoreError::Corrupt`], never other bytes. The record in RAM
//! keeps nothing for this (the nonce and tag are in the slot).
//!
//! Free slots go on a list per slot length and are reused first; then the
//! file grows, up to its limit; then a longer free slot is split. The lists
//! live in the file itself (each free slot holds a marker and the offset of
//! the next, in the clear: offsets only), so freeing spilled pages never costs
//! host RAM, and the RAM the tier needs is a fixed table of list heads. A
//! freed slot is not wiped: what is left of it is ciphertext under a key that
//! dies with the process. ENOSPC from the filesystem caps the file where it
//! stands, and the tier counts as full from then on (freed slots are still
//! reused).
//!
//! Object payloads move with positioned reads and writes (`pread`/`pwrite`)
//! outside any lock; the space bookkeeping (including the small list-link
//! reads and writes) takes one lock, only on the spill path.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileExt, MetadataExt, OpenOptionsExt},
    },
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use aes_gcm::{
    aead::{self, consts::U12, AeadInPlace, KeyInit},
    Aes256Gcm, Key, Nonce, Tag,
};
use parking_lot::Mutex;
use zeroize::Zeroizing;

use super::{codec, Page, StoreError, PAGE_SIZE};

pub const UNIT: u64 = 128;
/// Offsets a record can hold: 2^40 units, 128 TiB.
pub const MAX_FILE_BYTES: u64 = UNIT << super::slab::LOC_BITS;
/// The slot header: the write's nonce counter, then the AEAD tag.
const CTR: usize = 8;
const TAG: usize = 16;
pub(super) const HDR: usize = CTR + TAG;
const MAX_UNITS: usize = (HDR + PAGE_SIZE).div_ceil(UNIT as usize);
/// Starts a free slot, where a stored slot has its nonce counter.
const FREE_MARK: u32 = u32::from_le_bytes(*b"FREE");
const NONE: u64 = u64::MAX;
/// Nonce counters from here on are never used. 2^63 writes is 290,000 years
/// at a million a second; the check keeps a wrap impossible rather than unlikely.
const CTR_LIMIT: u64 = 1 << 63;

/// Slot length, in units, of a payload of `len` bytes.
pub fn units_for(len: usize) -> usize {
    (HDR + len).div_ceil(UNIT as usize)
}

/// The object a slot belongs to. A slot opens only under the label it was
/// written with, and only at its own offset and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label {
    /// The object's handle: its shard and record id.
    pub handle: u32,
    /// Its record's hash key (the low bits of the content hash).
    pub key: u32,
}

enum Sealing {
    /// AES-256-GCM under a key only this process holds, and the next nonce.
    Aead { cipher: Box<Aes256Gcm>, next: AtomicU64 },
    /// Neither secret nor checked: only the baseline that [`time_spill_tier`]
    /// compares against. No store ever writes like this.
    Plain,
}

impl Sealing {
    /// AES-256-GCM under a fresh key from the OS. The key's bytes are wiped
    /// here once the cipher has its schedule, and the schedule on drop.
    fn fresh() -> Result<Sealing, StoreError> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut key[..]).map_err(StoreError::SpillKey)?;
        Ok(Sealing::Aead {
            cipher: Box::new(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..]))),
            next: AtomicU64::new(0),
        })
    }
}

/// The associated data of a slot: where it is, how long, and whose.
fn aad(offset: u64, len: usize, label: Label) -> [u8; 18] {
    let mut a = [0u8; 18];
    a[..8].copy_from_slice(&offset.to_le_bytes());
    a[8..10].copy_from_slice(&(len as u16).to_le_bytes());
    a[10..14].copy_from_slice(&label.handle.to_le_bytes());
    a[14..18].copy_from_slice(&label.key.to_le_bytes());
    a
}

/// The 96-bit nonce of counter value `ctr`.
fn nonce(ctr: [u8; CTR]) -> Nonce<U12> {
    let mut n = [0u8; 12];
    n[..CTR].copy_from_slice(&ctr);
    n.into()
}

struct Space {
    /// First free slot of each slot length (in units), linked through the file.
    heads: [u64; MAX_UNITS + 1],
    /// Where this space starts in the file.
    base: u64,
    /// End of the space ever handed out.
    end: u64,
    /// Most the file may grow to: the limit, lowered when the FS said ENOSPC.
    cap: u64,
    live_bytes: u64,
}

pub struct SpillFile {
    file: File,
    sealing: Sealing,
    /// The shared part of the file, from offset 0 to the limit less the
    /// reservations.
    space: Mutex<Space>,
    /// Reserved parts, after the shared one, one per reserved guest.
    reserves: Vec<Reserve>,
}

/// A part of the file only one guest's objects may use, with a slot for each
/// of the pages it may hold. Every slot there is a whole page long, whatever
/// its payload, so freed slots fit any payload and the part never fragments:
/// a guest with at most `slots` objects in the file always finds one.
struct Reserve {
    guest: u32,
    /// Where the part is in the file: `start..end`.
    start: u64,
    end: u64,
    space: Mutex<Space>,
}

/// Bytes of file a reservation of `slots` whole-page slots takes.
pub fn reserve_bytes(slots: u64) -> u64 {
    slots.saturating_mul(MAX_UNITS as u64 * UNIT)
}

/// Shows the descriptor and whether slots are sealed; never the key.
impl std::fmt::Debug for SpillFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillFile")
            .field("file", &self.file)
            .field("sealed", &matches!(self.sealing, Sealing::Aead { .. }))
            .finish_non_exhaustive()
    }
}

impl SpillFile {
    /// Makes a new, unnamed, encrypted spill file. `path` is either:
    /// - an existing directory (not a symbolic link to one): the file is made
    ///   in it;
    /// - a name that does not exist yet, in an existing directory: the file is
    ///   made in that directory, and the name is used only on a filesystem
    ///   without `O_TMPFILE`, for as long as creating and unlinking it take.
    ///
    /// Anything else is refused: a symbolic link, and any existing file
    /// (regular or not), which is never opened, let alone truncated. The
    /// directories leading to `path` are resolved as usual. A limit past
    /// [`MAX_FILE_BYTES`] is lowered to it.
    ///
    /// `reserves` (guest, slots) are set apart at the end of the limit and
    /// allocated now, so that the filesystem has already given their blocks
    /// when a reserved guest needs them: a write there never meets ENOSPC. The shared part gets what the reservations leave.
    pub fn open(path: &Path, limit: u64, reserves: &[(u32, u64)]) -> Result<Self, StoreError> {
        let need = reserves
            .iter()
            .fold(0u64, |sum, &(_, slots)| sum.saturating_add(reserve_bytes(slots)));
        let limit = limit.min(MAX_FILE_BYTES);
        if need > limit {
            return Err(StoreError::ReservationTooLarge { need, limit });
        }
        let mut spill = SpillFile::over(create_private(path)?, Sealing::fresh()?, limit - need);
        let mut base = limit - need;
        for &(guest, slots) in reserves {
            let bytes = reserve_bytes(slots);
            allocate(&spill.file, base, bytes).map_err(StoreError::Reserve)?;
            spill.reserves.push(Reserve {
                guest,
                start: base,
                end: base + bytes,
                space: Mutex::new(Space::new(base, base + bytes)),
            });
            base += bytes;
        }
        Ok(spill)
    }

    fn over(file: File, sealing: Sealing, limit: u64) -> Self {
        SpillFile {
            file,
            sealing,
            space: Mutex::new(Space::new(0, limit.min(MAX_FILE_BYTES))),
            reserves: Vec::new(),
        }
    }

    /// The reserved part of `guest`, if it has one.
    fn reserve_of(&self, guest: u32) -> Option<&Reserve> {
        self.reserves.iter().find(|r| r.guest == guest)
    }

    /// The space a slot at `offset` was taken from, and the units of its slot.
    fn space_at(&self, offset: u64, len: usize) -> (&Mutex<Space>, usize) {
        for r in &self.reserves {
            if (r.start..r.end).contains(&offset) {
                return (&r.space, MAX_UNITS);
            }
        }
        (&self.space, units_for(len))
    }

    /// Writes one payload of an object owned by `guest`: into its reserved
    /// part if it has one (a whole-page slot), else into the shared part.
    /// `Ok(None)` means that part is full.
    pub fn write_for(&self, guest: u32, payload: &[u8], label: Label) -> Result<Option<u64>, StoreError> {
        match self.reserve_of(guest) {
            Some(r) => self.write_in(&r.space, MAX_UNITS, payload, label),
            None => self.write(payload, label),
        }
    }

    /// Writes one payload for the object `label`; `Ok(None)` means the tier is full.
    pub fn write(&self, payload: &[u8], label: Label) -> Result<Option<u64>, StoreError> {
        self.write_in(&self.space, units_for(payload.len()), payload, label)
    }

    fn write_in(
        &self,
        space: &Mutex<Space>,
        units: usize,
        payload: &[u8],
        label: Label,
    ) -> Result<Option<u64>, StoreError> {
        let Some((offset, fresh)) = space.lock().take(units, &self.file) else {
            return Ok(None);
        };
        let mut buf = [0u8; HDR + PAGE_SIZE];
        let len = HDR + payload.len();
        buf[HDR..len].copy_from_slice(payload);
        let written = match self.seal(offset, label, &mut buf[..len]) {
            Ok(()) => self.file.write_all_at(&buf[..len], offset),
            Err(e) => {
                space.lock().give_back(offset, units, &self.file);
                return Err(e);
            }
        };
        match written {
            Ok(()) => Ok(Some(offset)),
            Err(e) => {
                let mut space = space.lock();
                space.give_back(offset, units, &self.file);
                if is_no_space(&e) {
                    if fresh {
                        // The filesystem cannot back new file blocks: stop growing.
                        space.cap = space.cap.min(offset);
                    }
                    Ok(None)
                } else {
                    Err(StoreError::SpillIo(e))
                }
            }
        }
    }

    /// Encrypts `slot[HDR..]` in place and fills in the header.
    fn seal(&self, offset: u64, label: Label, slot: &mut [u8]) -> Result<(), StoreError> {
        self.seal_with(&aad(offset, slot.len() - HDR, label), slot)
    }

    /// [`SpillFile::seal`] under associated data `aad` of the caller's
    /// (the bench's multi-page frames bind a longer length).
    pub(super) fn seal_with(&self, aad: &[u8], slot: &mut [u8]) -> Result<(), StoreError> {
        let Sealing::Aead { cipher, next } = &self.sealing else {
            return Ok(());
        };
        let ctr = next.fetch_add(1, Ordering::Relaxed);
        if ctr >= CTR_LIMIT {
            return Err(StoreError::SpillSeal);
        }
        let ctr = ctr.to_le_bytes();
        let (hdr, body) = slot.split_at_mut(HDR);
        let tag = match cipher.encrypt_in_place_detached(&nonce(ctr), aad, body) {
            Ok(tag) => tag,
            // Only for messages of 64 GiB and more; a payload is a page at most.
            Err(aead::Error) => return Err(StoreError::SpillSeal),
        };
        hdr[..CTR].copy_from_slice(&ctr);
        hdr[CTR..].copy_from_slice(&tag);
        Ok(())
    }

    /// Reads back a payload of `len` bytes written for `label` into
    /// `out[..len]`, after checking it. On any failure `out` is untouched.
    pub fn read(&self, offset: u64, len: usize, label: Label, out: &mut [u8]) -> Result<(), StoreError> {
        let mut buf = [0u8; HDR + PAGE_SIZE];
        let total = HDR + len;
        self.file
            .read_exact_at(&mut buf[..total], offset)
            .map_err(StoreError::SpillIo)?;
        self.open_with(&aad(offset, len, label), offset, &mut buf[..total])?;
        out[..len].copy_from_slice(&buf[HDR..total]);
        Ok(())
    }

    /// Checks and decrypts in place a slot read from `offset`, sealed under
    /// `aad`: its plaintext is then `slot[HDR..]`.
    pub(super) fn open_with(&self, aad: &[u8], offset: u64, slot: &mut [u8]) -> Result<(), StoreError> {
        let Sealing::Aead { cipher, .. } = &self.sealing else {
            return Ok(());
        };
        let (hdr, body) = slot.split_at_mut(HDR);
        let mut ctr = [0u8; CTR];
        ctr.copy_from_slice(&hdr[..CTR]);
        let tag = Tag::clone_from_slice(&hdr[CTR..]);
        cipher
            .decrypt_in_place_detached(&nonce(ctr), aad, body, &tag)
            // `aead::Error` carries nothing more to say.
            .map_err(|aead::Error| StoreError::Corrupt { offset })
    }

    /// Returns the slot of a payload of `len` bytes at `offset` for reuse.
    pub fn free(&self, offset: u64, len: usize) {
        let (space, units) = self.space_at(offset, len);
        space.lock().give_back(offset, units, &self.file);
    }

    /// Host memory this holds outside itself: the cipher's key schedule.
    pub fn heap_bytes(&self) -> u64 {
        match self.sealing {
            Sealing::Aead { .. } => std::mem::size_of::<Aes256Gcm>() as u64,
            Sealing::Plain => 0,
        }
    }

    /// Most bytes the file may grow to (the limit, lowered after ENOSPC).
    pub fn cap(&self) -> u64 {
        self.space.lock().cap
    }

    /// Bytes of the file handed out so far (its length, holes included).
    pub fn file_bytes(&self) -> u64 {
        let reserved = self.reserves.iter().map(|r| r.end).max().unwrap_or(0);
        self.space.lock().end.max(reserved)
    }

    /// The file, for the bench's multi-page frames, which place their own slots.
    #[cfg(feature = "harness")]
    pub(super) fn fd(&self) -> &File {
        &self.file
    }

    /// Bytes of slots holding live objects.
    #[cfg(test)]
    pub fn live_bytes(&self) -> u64 {
        self.space.lock().live_bytes
    }
}

#[cfg(test)]
impl SpillFile {
    /// A spill file over `file` as it is (for a device that fails writes).
    pub fn sealed_over(file: File, limit: u64) -> Self {
        SpillFile::over(file, Sealing::fresh().expect("the OS gives random bytes"), limit)
    }

    /// The descriptor, to damage the file behind the store's back.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Space {
    fn new(base: u64, cap: u64) -> Self {
        Space {
            heads: [NONE; MAX_UNITS + 1],
            base,
            end: base,
            cap,
            live_bytes: 0,
        }
    }

    /// Finds a slot of `units`; the flag says whether it extends the file.
    fn take(&mut self, units: usize, file: &File) -> Option<(u64, bool)> {
        let bytes = units as u64 * UNIT;
        let found = if let Some(off) = self.pop(units, file) {
            Some((off, false))
        } else if self.end + bytes <= self.cap {
            let off = self.end;
            self.end += bytes;
            Some((off, true))
        } else {
            (units + 1..=MAX_UNITS).find_map(|longer| {
                let off = self.pop(longer, file)?;
                self.push(longer - units, off + bytes, file);
                Some((off, false))
            })
        };
        if found.is_some() {
            self.live_bytes += bytes;
        }
        found
    }

    fn give_back(&mut self, offset: u64, units: usize, file: &File) {
        let bytes = units as u64 * UNIT;
        self.live_bytes -= bytes;
        if self.live_bytes == 0 {
            // Nothing live: the whole file is free again.
            self.heads = [NONE; MAX_UNITS + 1];
            self.end = self.base;
        } else if offset + bytes == self.end {
            self.end = offset;
        } else {
            self.push(units, offset, file);
        }
    }

    /// Links a free slot in. If the link cannot be written the slot is lost
    /// (file space only, never data).
    fn push(&mut self, units: usize, offset: u64, file: &File) {
        let mut link = [0u8; 16];
        link[..4].copy_from_slice(&FREE_MARK.to_le_bytes());
        link[8..].copy_from_slice(&self.heads[units].to_le_bytes());
        if file.write_all_at(&link, offset).is_ok() {
            self.heads[units] = offset;
        }
    }

    /// Unlinks the first free slot of `units`. A link that does not read back
    /// as one drops the rest of that list (file space only).
    fn pop(&mut self, units: usize, file: &File) -> Option<u64> {
        let off = self.heads[units];
        if off == NONE {
            return None;
        }
        let mut link = [0u8; 16];
        let next = match file.read_exact_at(&mut link, off) {
            Ok(()) if link[..4] == FREE_MARK.to_le_bytes() => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&link[8..]);
                let n = u64::from_le_bytes(n);
                // A damaged link must not hand out space past the end or off the grid.
                if n == NONE || ((self.base..self.end).contains(&n) && n % UNIT == 0) {
                    n
                } else {
                    NONE
                }
            }
            _ => NONE,
        };
        self.heads[units] = next;
        Some(off)
    }
}

/// Makes the filesystem allocate `len` bytes at `offset` now, so that no
/// later write there can fail for room. fallocate does that without writing
/// (ext4, xfs, tmpfs); where it is not supported, zeros are written instead.
fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

/// Makes the spill file: unnamed, 0600, never an existing file (see
/// [`SpillFile::open`] for what `path` may name).
fn create_private(path: &Path) -> Result<File, StoreError> {
    let err = |at: &Path| {
        let at = at.to_path_buf();
        move |source| StoreError::OpenSpill { path: at, source }
    };
    // The directory to make the file in, and the name to fall back to.
    let (dir, name) = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(StoreError::SpillSymlink(path.to_path_buf())),
        Ok(m) if m.is_dir() => (path, None),
        Ok(_) => return Err(StoreError::SpillExists(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match (path.parent(), path.file_name()) {
            // "new/" asks for a directory that is not there.
            (Some(parent), Some(name)) if path.as_os_str().as_bytes().last() != Some(&b'/') => {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                (parent, Some(name.to_owned()))
            }
            _ => return Err(err(path)(e)),
        },
        Err(e) => return Err(err(path)(e)),
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    // A directory named by the operator must still not be a link when opened;
    // the parent of a new name is resolved as usual.
    let nofollow = if name.is_none() { libc::O_NOFOLLOW } else { 0 };
    // O_EXCL: not even a process that reaches our descriptors can link it in.
    match options
        .clone()
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL | nofollow)
        .open(dir)
    {
        Ok(file) => return checked_private(file, dir),
        Err(e) if !tmpfile_unsupported(&e) => return Err(err(dir)(e)),
        Err(_) => {}
    }
    let at = dir.join(match name {
        Some(name) => name,
        None => random_name()?,
    });
    create_unlinked(&at)
}

/// The fallback: creates `at`, which must not exist (a link there is not
/// followed), and removes the name at once.
fn create_unlinked(at: &Path) -> Result<File, StoreError> {
    let err = |source| StoreError::OpenSpill {
        path: at.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(at)
        .map_err(err)?;
    std::fs::remove_file(at).map_err(err)?;
    checked_private(file, at)
}

/// Whether `open` said the filesystem (or kernel) has no `O_TMPFILE`.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    // Kernels before 3.11 see O_DIRECTORY | O_RDWR, hence EISDIR.
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
    )
}

/// A name no one can guess ahead, for the fallback in a directory.
fn random_name() -> Result<OsString, StoreError> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(StoreError::SpillKey)?;
    Ok(format!(".tmem-spill-{:016x}", u64::from_le_bytes(r)).into())
}

/// Checks what the open promised: a regular file, with no name, that only
/// its owner may open.
fn checked_private(file: File, dir: &Path) -> Result<File, StoreError> {
    let meta = file.metadata().map_err(|source| StoreError::OpenSpill {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_file() || meta.nlink() != 0 || meta.mode() & 0o077 != 0 {
        return Err(StoreError::SpillNotPrivate {
            path: dir.to_path_buf(),
            links: meta.nlink(),
            mode: meta.mode(),
        });
    }
    Ok(file)
}

/// The spill tier alone, for `tmem-bench store --spill-tier`: the payloads
/// that puts would write for some pages, to time through spill files.
pub struct SpillTierBench {
    payloads: Vec<Vec<u8>>,
}

impl SpillTierBench {
    /// Encodes each page that is not same-filled as a put does (zstd at
    /// `zstd_level`, raw past the default threshold). Fills never reach the file.
    pub fn new(pages: &[&Page], zstd_level: i32) -> Result<Self, StoreError> {
        let raw_threshold = super::StoreConfig::default().raw_threshold;
        let mut payloads = Vec::with_capacity(pages.len());
        for page in pages.iter().filter(|p| codec::fill_value(p).is_none()) {
            payloads.push(codec::with_scratch(|frame| {
                let encoded =
                    codec::encode_data(page, super::slab::Codec::Zstd, zstd_level, raw_threshold, frame);
                Ok::<_, StoreError>(match encoded.map_err(StoreError::Compress)? {
                    Some(len) => frame[..len].to_vec(),
                    None => page.to_vec(),
                })
            })?);
        }
        Ok(SpillTierBench { payloads })
    }

    /// Payloads that go to the file.
    pub fn payloads(&self) -> usize {
        self.payloads.len()
    }

    /// Their bytes, before slot headers and rounding.
    pub fn payload_bytes(&self) -> u64 {
        self.payloads.iter().map(|p| p.len() as u64).sum()
    }

    /// A fresh spill file made at `path` (as
    /// [`SpillConfig::path`](super::SpillConfig::path) takes it), for one
    /// pass of writes and one of reads. With `sealed: false` its slots are
    /// written in plaintext and read with no check, by the same code
    /// otherwise: the baseline that shows what the AEAD costs. Nothing else
    /// makes a spill file like that.
    pub fn file(&self, path: &Path, sealed: bool) -> Result<SpillTierFile<'_>, StoreError> {
        let sealing = if sealed { Sealing::fresh()? } else { Sealing::Plain };
        Ok(SpillTierFile {
            payloads: &self.payloads,
            file: SpillFile::over(create_private(path)?, sealing, MAX_FILE_BYTES),
            offsets: Vec::with_capacity(self.payloads.len()),
        })
    }
}

/// One spill file of a [`SpillTierBench`].
pub struct SpillTierFile<'a> {
    payloads: &'a [Vec<u8>],
    file: SpillFile,
    offsets: Vec<u64>,
}

impl SpillTierFile<'_> {
    fn label(i: usize) -> Label {
        Label {
            handle: i as u32,
            key: 0,
        }
    }

    /// Writes every payload, in order.
    pub fn write_all(&mut self) -> Result<(), StoreError> {
        for (i, p) in self.payloads.iter().enumerate() {
            match self.file.write(p, Self::label(i))? {
                Some(offset) => self.offsets.push(offset),
                None => return Err(StoreError::SpillIo(io::Error::from_raw_os_error(libc::ENOSPC))),
            }
        }
        Ok(())
    }

    /// Reads back every payload [`Self::write_all`] wrote, and compares it.
    pub fn read_all(&self) -> Result<(), StoreError> {
        let mut out = [0u8; PAGE_SIZE];
        for (i, (p, &offset)) in self.payloads.iter().zip(&self.offsets).enumerate() {
            self.file.read(offset, p.len(), Self::label(i), &mut out)?;
            if out[..p.len()] != p[..] {
                return Err(StoreError::Corrupt { offset });
            }
        }
        Ok(())
    }

    /// Slot bytes written so far, headers and rounding included.
    pub fn file_bytes(&self) -> u64 {
        self.file.file_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use assert_matches::assert_matches;

    use super::*;

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    fn label(n: u32) -> Label {
        Label {
            handle: n,
            key: n.wrapping_mul(0x9e37_79b9),
        }
    }

    fn slot_bytes(f: &SpillFile, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; HDR + len];
        f.file.read_exact_at(&mut b, offset).unwrap();
        b
    }

    fn whole_file(f: &SpillFile) -> Vec<u8> {
        let mut b = vec![0u8; f.file.metadata().unwrap().len() as usize];
        f.file.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 1 << 20, &[]).unwrap();
        let mut offs = Vec::new();
        for (i, len) in [1usize, 100, 1000, 4096].into_iter().enumerate() {
            offs.push((
                f.write(&payload(len, i as u8), label(i as u32)).unwrap().unwrap(),
                len,
                i,
            ));
        }
        for (off, len, i) in offs {
            let mut out = [0u8; PAGE_SIZE];
            f.read(off, len, label(i as u32), &mut out).unwrap();
            assert_eq!(&out[..len], &payload(len, i as u8)[..]);
        }
    }

    #[test]
    fn a_page_still_takes_33_units() {
        // The 24-byte header costs no more than the old 16-byte one for a raw page.
        assert_eq!(units_for(PAGE_SIZE), 33);
        assert_eq!(MAX_UNITS, 33);
        assert_eq!(units_for(104), 1);
        assert_eq!(units_for(105), 2);
    }

    #[test]
    fn freed_space_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 1 << 20, &[]).unwrap();
        let a = f.write(&payload(1000, 1), label(1)).unwrap().unwrap();
        let _b = f.write(&payload(1000, 2), label(2)).unwrap().unwrap();
        let end = f.file_bytes();
        f.free(a, 1000);
        let c = f.write(&payload(900, 3), label(3)).unwrap().unwrap();
        assert_eq!(c, a, "same slot length reuses the freed slot");
        assert_eq!(f.file_bytes(), end);
        // A shorter payload splits a longer free slot when the file is at its cap.
        let g = SpillFile::open(dir.path(), 5 * UNIT * 2, &[]).unwrap();
        let big = g
            .write(&payload(4 * UNIT as usize, 4), label(4))
            .unwrap()
            .unwrap();
        let _other = g
            .write(&payload(4 * UNIT as usize, 5), label(5))
            .unwrap()
            .unwrap();
        g.free(big, 4 * UNIT as usize);
        let s1 = g.write(&payload(100, 6), label(6)).unwrap().unwrap();
        let s2 = g.write(&payload(100, 7), label(7)).unwrap().unwrap();
        assert_eq!((s1, s2), (big, big + UNIT));
        let mut out = [0u8; PAGE_SIZE];
        g.read(s2, 100, label(7), &mut out).unwrap();
        assert_eq!(&out[..100], &payload(100, 7)[..]);
    }

    #[test]
    fn free_lists_live_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        let offs: Vec<u64> = (0..4)
            .map(|i| f.write(&payload(300, i), label(1)).unwrap().unwrap())
            .collect();
        f.free(offs[1], 300);
        f.free(offs[2], 300);
        let mut out = [0u8; PAGE_SIZE];
        // A freed slot no longer reads as an object.
        assert_matches!(
            f.read(offs[1], 300, label(1), &mut out),
            Err(StoreError::Corrupt { .. })
        );
        // A damaged link (here: pointing past the end) is dropped, not followed.
        f.file
            .write_all_at(&(1u64 << 40).to_le_bytes(), offs[2] + 8)
            .unwrap();
        let end = f.file_bytes();
        assert_eq!(f.write(&payload(300, 9), label(1)).unwrap(), Some(offs[2]));
        let next = f.write(&payload(300, 9), label(1)).unwrap().unwrap();
        assert!(next < (1 << 20) && next != offs[2]);
        assert!(f.file_bytes() <= end + 4 * UNIT);
    }

    #[test]
    fn limit_makes_the_tier_full() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 3 * UNIT, &[]).unwrap();
        assert!(f.write(&payload(200, 0), label(0)).unwrap().is_some());
        assert!(f.write(&payload(200, 0), label(0)).unwrap().is_none());
        assert!(f.write(&payload(50, 0), label(0)).unwrap().is_some());
        assert!(f.file_bytes() <= 3 * UNIT);
    }

    /// A reserved part holds exactly its slots, each whole-page long: any mix
    /// of payload sizes fits until every slot is taken, a freed slot takes a
    /// page, and the other guests' writes stay in the shared part.
    #[test]
    fn a_reserved_part_holds_its_slots_whatever_their_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let shared = 40 * UNIT;
        let f = SpillFile::open(dir.path(), shared + reserve_bytes(3), &[(7, 3)]).unwrap();
        let small = f.write_for(7, &payload(10, 1), label(1)).unwrap().unwrap();
        let page = f.write_for(7, &payload(PAGE_SIZE, 2), label(2)).unwrap().unwrap();
        let mid = f.write_for(7, &payload(1000, 3), label(3)).unwrap().unwrap();
        for off in [small, page, mid] {
            assert!(off >= shared, "in the reserved part: {off}");
        }
        assert!(
            f.write_for(7, &payload(10, 4), label(4)).unwrap().is_none(),
            "three slots"
        );
        // Other guests fill the shared part and never reach the reserved one.
        while let Some(off) = f.write_for(1, &payload(500, 5), label(5)).unwrap() {
            assert!(off + units_for(500) as u64 * UNIT <= shared);
        }
        f.free(small, 10);
        let again = f.write_for(7, &payload(PAGE_SIZE, 6), label(6)).unwrap().unwrap();
        assert_eq!(again, small, "the freed small slot takes a whole page");
        let mut out = [0u8; PAGE_SIZE];
        f.read(again, PAGE_SIZE, label(6), &mut out).unwrap();
        assert_eq!(out[..], payload(PAGE_SIZE, 6)[..]);
        f.read(mid, 1000, label(3), &mut out).unwrap();
        assert_eq!(out[..1000], payload(1000, 3)[..]);
    }

    #[test]
    fn corrupt_byte_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        let off = f.write(&payload(777, 9), label(42)).unwrap().unwrap();
        let keep = f.write(&payload(500, 3), label(43)).unwrap().unwrap();
        // One byte in the payload, in the tag and in the nonce counter: each fails,
        // and `out` is left as it was.
        for at in [HDR as u64 + 300, CTR as u64 + 5, 0] {
            let before = slot_bytes(&f, off, 777);
            f.file
                .write_all_at(&[before[at as usize] ^ 0xff], off + at)
                .unwrap();
            let mut out = [0x77u8; PAGE_SIZE];
            assert_matches!(f.read(off, 777, label(42), &mut out), Err(StoreError::Corrupt { offset }) if offset == off);
            assert!(
                out.iter().all(|&b| b == 0x77),
                "a failed read wrote to its output"
            );
            f.file.write_all_at(&before, off).unwrap();
            f.read(off, 777, label(42), &mut out).unwrap();
        }
        // Reads with another label, length or offset (a misdirected read) are refused.
        let mut out = [0u8; PAGE_SIZE];
        for wrong in [
            Label {
                handle: 41,
                ..label(42)
            },
            Label { key: 0, ..label(42) },
        ] {
            assert_matches!(f.read(off, 777, wrong, &mut out), Err(StoreError::Corrupt { .. }));
        }
        assert_matches!(
            f.read(off, 776, label(42), &mut out),
            Err(StoreError::Corrupt { .. })
        );
        f.read(keep, 500, label(43), &mut out).unwrap();
        assert_eq!(&out[..500], &payload(500, 3)[..]);
    }

    #[test]
    fn a_slot_replayed_elsewhere_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        let a = f.write(&payload(600, 1), label(1)).unwrap().unwrap();
        let b = f.write(&payload(600, 2), label(1)).unwrap().unwrap();
        let mut out = [0u8; PAGE_SIZE];
        // Object 1's slot copied over the other one, same label and length:
        // the offset in the associated data tells them apart.
        f.file.write_all_at(&slot_bytes(&f, a, 600), b).unwrap();
        assert_matches!(f.read(b, 600, label(1), &mut out), Err(StoreError::Corrupt { offset }) if offset == b);
        // An old slot put back where another object now lives.
        let old = slot_bytes(&f, a, 600);
        f.free(a, 600);
        let c = f.write(&payload(600, 3), label(3)).unwrap().unwrap();
        assert_eq!(c, a);
        f.file.write_all_at(&old, c).unwrap();
        assert_matches!(
            f.read(c, 600, label(3), &mut out),
            Err(StoreError::Corrupt { .. })
        );
    }

    #[test]
    fn every_write_has_its_own_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        let p = payload(1000, 5);
        let a = f.write(&p, label(9)).unwrap().unwrap();
        let first = slot_bytes(&f, a, 1000);
        f.free(a, 1000);
        // Same bytes, same slot, same label: a new nonce, so new ciphertext.
        assert_eq!(f.write(&p, label(9)).unwrap(), Some(a));
        let second = slot_bytes(&f, a, 1000);
        assert_ne!(first[..CTR], second[..CTR]);
        assert_ne!(first[HDR..], second[HDR..]);
        // A second file has its own key: the same write looks different again.
        let g = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        assert_eq!(g.write(&p, label(9)).unwrap(), Some(0));
        assert_eq!(f.write(&p, label(9)).unwrap(), Some(a + 8 * UNIT));
        assert_ne!(
            slot_bytes(&g, 0, 1000)[HDR..],
            slot_bytes(&f, a + 8 * UNIT, 1000)[HDR..]
        );
    }

    #[test]
    fn no_plaintext_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        let marker = b"guest secret: hunter2 ";
        let page: Vec<u8> = marker.iter().copied().cycle().take(PAGE_SIZE).collect();
        let off = f.write(&page, label(1)).unwrap().unwrap();
        f.write(&page[..1000], label(2)).unwrap().unwrap();
        let bytes = whole_file(&f);
        assert!(bytes.len() >= PAGE_SIZE + 1000);
        assert!(
            !bytes.windows(8).any(|w| marker.windows(8).any(|m| m == w)),
            "8 bytes of the page are in the file in the clear"
        );
        let mut out = [0u8; PAGE_SIZE];
        f.read(off, PAGE_SIZE, label(1), &mut out).unwrap();
        assert_eq!(out[..], page[..]);
    }

    #[test]
    fn enospc_means_full_not_error() {
        // /dev/full fails every write with ENOSPC.
        let full = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .unwrap();
        let f = SpillFile::sealed_over(full, 1 << 20);
        assert!(f.write(&payload(100, 0), label(0)).unwrap().is_none());
        assert!(f.write(&payload(100, 0), label(0)).unwrap().is_none());
        assert_eq!(f.live_bytes(), 0);
    }

    fn assert_private(f: &SpillFile) {
        let m = f.file.metadata().unwrap();
        assert!(m.is_file());
        assert_eq!(m.nlink(), 0, "the spill file has a name");
        assert_eq!(m.mode() & 0o777, 0o600);
    }

    fn entries(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_directory_gets_an_unnamed_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(dir.path(), 1 << 20, &[]).unwrap();
        assert_private(&f);
        f.write(&payload(100, 1), label(1)).unwrap().unwrap();
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    #[test]
    fn a_new_name_is_never_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill.bin"), 1 << 20, &[]).unwrap();
        assert_private(&f);
        assert!(entries(dir.path()).is_empty());
        // A relative name is made in the working directory, likewise.
        let g = SpillFile::open(Path::new("target-spill-test-name-never-made"), 1 << 20, &[]).unwrap();
        assert_private(&g);
        assert!(!Path::new("target-spill-test-name-never-made").exists());
    }

    #[test]
    fn the_fallback_creates_0600_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("spill");
        let file = create_unlinked(&at).unwrap();
        let f = SpillFile::over(file, Sealing::fresh().unwrap(), 1 << 20);
        assert_private(&f);
        assert!(entries(dir.path()).is_empty());
        // It never opens what is there: a file, or a link, dangling or not.
        std::fs::write(&at, b"keep me").unwrap();
        assert_matches!(create_unlinked(&at), Err(StoreError::OpenSpill { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&at).unwrap(), b"keep me");
        let link = dir.path().join("link");
        symlink(&at, &link).unwrap();
        assert_matches!(create_unlinked(&link), Err(StoreError::OpenSpill { .. }));
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_matches!(create_unlinked(&dangling), Err(StoreError::OpenSpill { .. }));
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&at).unwrap(), b"keep me");
        // The random names of the fallback in a directory differ.
        assert_ne!(random_name().unwrap(), random_name().unwrap());
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"do not truncate").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
        let link = dir.path().join("spill");
        symlink(&target, &link).unwrap();
        assert_matches!(SpillFile::open(&link, 1 << 20, &[]), Err(StoreError::SpillSymlink(p)) if p == link);
        assert_eq!(std::fs::read(&target).unwrap(), b"do not truncate");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o666);
        // A link to a directory, or a dangling one, is refused too.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let dir_link = dir.path().join("dir-link");
        symlink(&sub, &dir_link).unwrap();
        assert_matches!(
            SpillFile::open(&dir_link, 1 << 20, &[]),
            Err(StoreError::SpillSymlink(_))
        );
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_matches!(
            SpillFile::open(&dangling, 1 << 20, &[]),
            Err(StoreError::SpillSymlink(_))
        );
        assert!(!dir.path().join("nowhere").exists());
        assert!(entries(&sub).is_empty());
    }

    #[test]
    fn an_existing_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("spill");
        std::fs::write(&old, b"an old spill file").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = SpillFile::open(&old, 1 << 20, &[]).err().unwrap();
        assert_matches!(&e, StoreError::SpillExists(p) if *p == old);
        assert!(e.to_string().contains("never reused"), "{e}");
        assert_eq!(std::fs::read(&old).unwrap(), b"an old spill file");
        assert_eq!(std::fs::metadata(&old).unwrap().mode() & 0o777, 0o666);
        // Devices are files too.
        assert_matches!(
            SpillFile::open(Path::new("/dev/null"), 1 << 20, &[]),
            Err(StoreError::SpillExists(_))
        );
    }

    #[test]
    fn bad_paths_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        // No such directory, for a directory or for a new name in one.
        let missing = dir.path().join("missing");
        for path in [missing.join("spill"), dir.path().join("new/")] {
            assert_matches!(
                SpillFile::open(&path, 1 << 20, &[]),
                Err(StoreError::OpenSpill { source, .. }) if source.kind() == io::ErrorKind::NotFound,
                "{path:?}"
            );
        }
        assert!(!missing.exists() && !dir.path().join("new").exists());
        // A directory this process may not write to.
        if !is_root() {
            let ro = dir.path().join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
            assert_matches!(
                SpillFile::open(&ro, 1 << 20, &[]),
                Err(StoreError::OpenSpill { source, .. }) if source.kind() == io::ErrorKind::PermissionDenied
            );
        }
    }

    fn is_root() -> bool {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    #[test]
    fn the_tier_bench_runs_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let pages: Vec<Box<Page>> = (0..40u8)
            .map(|i| {
                let mut p = Box::new([i; PAGE_SIZE]);
                if i % 4 != 0 {
                    p[..2000].copy_from_slice(&payload(2000, i));
                }
                p
            })
            .collect();
        let refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
        let bench = SpillTierBench::new(&refs, 1).unwrap();
        assert_eq!(bench.payloads(), 30, "fills never go to the file");
        for sealed in [true, false] {
            let mut f = bench.file(dir.path(), sealed).unwrap();
            f.write_all().unwrap();
            f.read_all().unwrap();
            assert!(f.file_bytes() >= bench.payload_bytes() + 30 * HDR as u64);
            assert_eq!(f.file.heap_bytes() > 0, sealed);
        }
        assert!(entries(dir.path()).is_empty());
    }
}
