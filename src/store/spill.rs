//! The spill tier: compressed objects written back to one file.
//!
//! Each object sits in a slot of whole [`UNIT`]s: a 16-byte header (CRC32 of
//! the rest of the header and the payload, payload length, and a 64-bit tag the
//! owner chooses, the low half of the content hash) followed by the payload as
//! it was in RAM. Reads check all three, so a corrupt or misdirected read is an
//! error, never wrong data.
//!
//! Free slots go on a list per slot length and are reused first, splitting a
//! longer free slot when no exact one is left; only then does the file grow, up
//! to its limit. ENOSPC from the filesystem caps the file where it stands, and
//! the tier counts as full from then on (freed slots are still reused).
//!
//! Data moves with positioned reads and writes (`pread`/`pwrite`) outside any
//! lock; the space bookkeeping takes one short lock, only on the spill path.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
};

use parking_lot::Mutex;

use super::{budget::Budget, StoreError, PAGE_SIZE};

pub const UNIT: u64 = 128;
const HDR: usize = 16;
const MAX_UNITS: usize = (HDR + PAGE_SIZE).div_ceil(UNIT as usize);

/// Slot length, in units, of a payload of `len` bytes.
pub fn units_for(len: usize) -> usize {
    (HDR + len).div_ceil(UNIT as usize)
}

struct Space {
    /// Free slot offsets, by slot length in units.
    free: Vec<Vec<u64>>,
    /// End of the space ever handed out.
    end: u64,
    /// Most the file may grow to: the limit, lowered when the FS said ENOSPC.
    cap: u64,
    live_bytes: u64,
    /// Bytes of the free lists counted in the RAM budget.
    counted: u64,
}

pub struct SpillFile {
    file: File,
    space: Mutex<Space>,
}

impl SpillFile {
    /// Creates (or truncates) the spill file.
    pub fn open(path: &Path, limit: u64) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| StoreError::OpenSpill {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(SpillFile {
            file,
            space: Mutex::new(Space {
                free: vec![Vec::new(); MAX_UNITS + 1],
                end: 0,
                cap: limit,
                live_bytes: 0,
                counted: 0,
            }),
        })
    }

    /// Writes one payload; `Ok(None)` means the tier is full.
    pub fn write(&self, payload: &[u8], tag: u64, budget: &Budget) -> Result<Option<u64>, StoreError> {
        let units = units_for(payload.len());
        let Some((offset, fresh)) = self.space.lock().take(units, budget) else {
            return Ok(None);
        };
        let mut buf = [0u8; HDR + PAGE_SIZE];
        let len = HDR + payload.len();
        buf[4..6].copy_from_slice(&(payload.len() as u16).to_le_bytes());
        buf[8..16].copy_from_slice(&tag.to_le_bytes());
        buf[HDR..len].copy_from_slice(payload);
        let crc = crc32fast::hash(&buf[4..len]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        match self.file.write_all_at(&buf[..len], offset) {
            Ok(()) => Ok(Some(offset)),
            Err(e) => {
                let mut space = self.space.lock();
                space.give_back(offset, units, budget);
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

    /// Reads back a payload written with `tag` into `out[..len]`, verifying it.
    pub fn read(&self, offset: u64, len: usize, tag: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let mut buf = [0u8; HDR + PAGE_SIZE];
        let total = HDR + len;
        self.file
            .read_exact_at(&mut buf[..total], offset)
            .map_err(StoreError::SpillIo)?;
        let crc = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let stored_len = usize::from(u16::from_le_bytes([buf[4], buf[5]]));
        let mut stored_tag = [0u8; 8];
        stored_tag.copy_from_slice(&buf[8..16]);
        if stored_len != len
            || u64::from_le_bytes(stored_tag) != tag
            || crc32fast::hash(&buf[4..total]) != crc
        {
            return Err(StoreError::Corrupt { offset });
        }
        out[..len].copy_from_slice(&buf[HDR..total]);
        Ok(())
    }

    /// Returns the slot of a payload of `len` bytes at `offset` for reuse.
    pub fn free(&self, offset: u64, len: usize, budget: &Budget) {
        self.space.lock().give_back(offset, units_for(len), budget);
    }

    /// Bytes of the file handed out so far (its length, holes included).
    pub fn file_bytes(&self) -> u64 {
        self.space.lock().end
    }

    /// Bytes of slots holding live objects.
    #[cfg(test)]
    pub fn live_bytes(&self) -> u64 {
        self.space.lock().live_bytes
    }
}

impl Space {
    /// Finds a slot of `units`; the flag says whether it extends the file.
    fn take(&mut self, units: usize, budget: &Budget) -> Option<(u64, bool)> {
        let bytes = units as u64 * UNIT;
        if let Some(off) = self.free[units].pop() {
            self.live_bytes += bytes;
            return Some((off, false));
        }
        if self.end + bytes <= self.cap {
            let off = self.end;
            self.end += bytes;
            self.live_bytes += bytes;
            return Some((off, true));
        }
        for longer in units + 1..=MAX_UNITS {
            if let Some(off) = self.free[longer].pop() {
                self.push_free(longer - units, off + bytes, budget);
                self.live_bytes += bytes;
                return Some((off, false));
            }
        }
        None
    }

    fn give_back(&mut self, offset: u64, units: usize, budget: &Budget) {
        let bytes = units as u64 * UNIT;
        self.live_bytes -= bytes;
        if offset + bytes == self.end {
            self.end = offset;
        } else {
            self.push_free(units, offset, budget);
        }
    }

    fn push_free(&mut self, units: usize, offset: u64, budget: &Budget) {
        let cap = self.free[units].capacity();
        self.free[units].push(offset);
        if self.free[units].capacity() != cap {
            let now = self.heap_bytes();
            budget.settle(&mut self.counted, now);
        }
    }

    fn heap_bytes(&self) -> u64 {
        let lists: usize = self.free.iter().map(|l| l.capacity() * 8).sum();
        (lists + self.free.capacity() * std::mem::size_of::<Vec<u64>>()) as u64
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    fn b() -> Budget {
        Budget::new(1 << 30)
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 1 << 20).unwrap();
        let mut offs = Vec::new();
        for (i, len) in [1usize, 100, 1000, 4096].into_iter().enumerate() {
            offs.push((
                f.write(&payload(len, i as u8), i as u64, &b()).unwrap().unwrap(),
                len,
                i,
            ));
        }
        for (off, len, i) in offs {
            let mut out = [0u8; PAGE_SIZE];
            f.read(off, len, i as u64, &mut out).unwrap();
            assert_eq!(&out[..len], &payload(len, i as u8)[..]);
        }
    }

    #[test]
    fn freed_space_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 1 << 20).unwrap();
        let a = f.write(&payload(1000, 1), 1, &b()).unwrap().unwrap();
        let _b = f.write(&payload(1000, 2), 2, &b()).unwrap().unwrap();
        let end = f.file_bytes();
        f.free(a, 1000, &b());
        let c = f.write(&payload(900, 3), 3, &b()).unwrap().unwrap();
        assert_eq!(c, a, "same slot length reuses the freed slot");
        assert_eq!(f.file_bytes(), end);
        // A shorter payload splits a longer free slot when the file is at its cap.
        let g = SpillFile::open(&dir.path().join("spill2"), 5 * UNIT * 2).unwrap();
        let big = g.write(&payload(4 * UNIT as usize, 4), 4, &b()).unwrap().unwrap();
        let _other = g.write(&payload(4 * UNIT as usize, 5), 5, &b()).unwrap().unwrap();
        g.free(big, 4 * UNIT as usize, &b());
        let s1 = g.write(&payload(100, 6), 6, &b()).unwrap().unwrap();
        let s2 = g.write(&payload(100, 7), 7, &b()).unwrap().unwrap();
        assert_eq!((s1, s2), (big, big + UNIT));
        let mut out = [0u8; PAGE_SIZE];
        g.read(s2, 100, 7, &mut out).unwrap();
        assert_eq!(&out[..100], &payload(100, 7)[..]);
    }

    #[test]
    fn limit_makes_the_tier_full() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 3 * UNIT).unwrap();
        assert!(f.write(&payload(200, 0), 0, &b()).unwrap().is_some());
        assert!(f.write(&payload(200, 0), 0, &b()).unwrap().is_none());
        assert!(f.write(&payload(50, 0), 0, &b()).unwrap().is_some());
        assert!(f.file_bytes() <= 3 * UNIT);
    }

    #[test]
    fn corrupt_byte_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let f = SpillFile::open(&path, 1 << 20).unwrap();
        let off = f.write(&payload(777, 9), 42, &b()).unwrap().unwrap();
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0xff], off + HDR as u64 + 300).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        assert_matches!(f.read(off, 777, 42, &mut out), Err(StoreError::Corrupt { offset }) if offset == off);
        // A read with the wrong tag (a misdirected read) is refused as well.
        let off2 = f.write(&payload(10, 1), 7, &b()).unwrap().unwrap();
        assert_matches!(f.read(off2, 10, 8, &mut out), Err(StoreError::Corrupt { .. }));
    }

    #[test]
    fn enospc_means_full_not_error() {
        // /dev/full fails every write with ENOSPC.
        let f = SpillFile::open(Path::new("/dev/full"), 1 << 20).unwrap();
        assert!(f.write(&payload(100, 0), 0, &b()).unwrap().is_none());
        assert!(f.write(&payload(100, 0), 0, &b()).unwrap().is_none());
        assert_eq!(f.live_bytes(), 0);
    }
}
