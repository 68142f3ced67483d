//! The spill tier: compressed objects written back to one file.
//!
//! Each object sits in a slot of whole [`UNIT`]s: a 16-byte header (CRC32 of
//! the rest of the header and the payload, payload length, and a 64-bit tag the
//! owner chooses, its record's hash key) followed by the payload as it was in
//! RAM. Reads check all three, so a corrupt or misdirected read is an
//! error, never wrong data.
//!
//! Free slots go on a list per slot length and are reused first; then the
//! file grows, up to its limit; then a longer free slot is split. The lists
//! live in the file itself (each free slot holds a marker and the offset of
//! the next), so freeing spilled pages never costs host RAM, and the RAM the
//! tier needs is a fixed table of list heads. ENOSPC from the filesystem caps
//! the file where it stands, and the tier counts as full from then on (freed
//! slots are still reused).
//!
//! Object payloads move with positioned reads and writes (`pread`/`pwrite`)
//! outside any lock; the space bookkeeping (including the small list-link
//! reads and writes) takes one lock, only on the spill path.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
};

use parking_lot::Mutex;

use super::{StoreError, PAGE_SIZE};

pub const UNIT: u64 = 128;
/// Offsets a record can hold: 2^40 units, 128 TiB.
pub const MAX_FILE_BYTES: u64 = UNIT << super::slab::LOC_BITS;
const HDR: usize = 16;
const MAX_UNITS: usize = (HDR + PAGE_SIZE).div_ceil(UNIT as usize);
/// Starts a free slot, where a stored slot has its CRC: reads of a freed slot fail.
const FREE_MARK: u32 = u32::from_le_bytes(*b"FREE");
const NONE: u64 = u64::MAX;

/// Slot length, in units, of a payload of `len` bytes.
pub fn units_for(len: usize) -> usize {
    (HDR + len).div_ceil(UNIT as usize)
}

struct Space {
    /// First free slot of each slot length (in units), linked through the file.
    heads: [u64; MAX_UNITS + 1],
    /// End of the space ever handed out.
    end: u64,
    /// Most the file may grow to: the limit, lowered when the FS said ENOSPC.
    cap: u64,
    live_bytes: u64,
}

pub struct SpillFile {
    file: File,
    space: Mutex<Space>,
}

impl SpillFile {
    /// Creates (or truncates) the spill file. A limit past [`MAX_FILE_BYTES`]
    /// is lowered to it.
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
                heads: [NONE; MAX_UNITS + 1],
                end: 0,
                cap: limit.min(MAX_FILE_BYTES),
                live_bytes: 0,
            }),
        })
    }

    /// Writes one payload; `Ok(None)` means the tier is full.
    pub fn write(&self, payload: &[u8], tag: u64) -> Result<Option<u64>, StoreError> {
        let units = units_for(payload.len());
        let Some((offset, fresh)) = self.space.lock().take(units, &self.file) else {
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
    pub fn free(&self, offset: u64, len: usize) {
        self.space.lock().give_back(offset, units_for(len), &self.file);
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
            self.end = 0;
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
                if n == NONE || (n < self.end && n % UNIT == 0) {
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
                f.write(&payload(len, i as u8), i as u64).unwrap().unwrap(),
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
        let a = f.write(&payload(1000, 1), 1).unwrap().unwrap();
        let _b = f.write(&payload(1000, 2), 2).unwrap().unwrap();
        let end = f.file_bytes();
        f.free(a, 1000);
        let c = f.write(&payload(900, 3), 3).unwrap().unwrap();
        assert_eq!(c, a, "same slot length reuses the freed slot");
        assert_eq!(f.file_bytes(), end);
        // A shorter payload splits a longer free slot when the file is at its cap.
        let g = SpillFile::open(&dir.path().join("spill2"), 5 * UNIT * 2).unwrap();
        let big = g.write(&payload(4 * UNIT as usize, 4), 4).unwrap().unwrap();
        let _other = g.write(&payload(4 * UNIT as usize, 5), 5).unwrap().unwrap();
        g.free(big, 4 * UNIT as usize);
        let s1 = g.write(&payload(100, 6), 6).unwrap().unwrap();
        let s2 = g.write(&payload(100, 7), 7).unwrap().unwrap();
        assert_eq!((s1, s2), (big, big + UNIT));
        let mut out = [0u8; PAGE_SIZE];
        g.read(s2, 100, 7, &mut out).unwrap();
        assert_eq!(&out[..100], &payload(100, 7)[..]);
    }

    #[test]
    fn free_lists_live_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let f = SpillFile::open(&path, 1 << 20).unwrap();
        let offs: Vec<u64> = (0..4)
            .map(|i| f.write(&payload(300, i), 1).unwrap().unwrap())
            .collect();
        f.free(offs[1], 300);
        f.free(offs[2], 300);
        let mut out = [0u8; PAGE_SIZE];
        // A freed slot no longer reads as an object.
        assert_matches!(f.read(offs[1], 300, 1, &mut out), Err(StoreError::Corrupt { .. }));
        // A damaged link (here: pointing past the end) is dropped, not followed.
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&(1u64 << 40).to_le_bytes(), offs[2] + 8)
            .unwrap();
        let end = f.file_bytes();
        assert_eq!(f.write(&payload(300, 9), 1).unwrap(), Some(offs[2]));
        let next = f.write(&payload(300, 9), 1).unwrap().unwrap();
        assert!(next < (1 << 20) && next != offs[2]);
        assert!(f.file_bytes() <= end + 4 * UNIT);
    }

    #[test]
    fn limit_makes_the_tier_full() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::open(&dir.path().join("spill"), 3 * UNIT).unwrap();
        assert!(f.write(&payload(200, 0), 0).unwrap().is_some());
        assert!(f.write(&payload(200, 0), 0).unwrap().is_none());
        assert!(f.write(&payload(50, 0), 0).unwrap().is_some());
        assert!(f.file_bytes() <= 3 * UNIT);
    }

    #[test]
    fn corrupt_byte_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let f = SpillFile::open(&path, 1 << 20).unwrap();
        let off = f.write(&payload(777, 9), 42).unwrap().unwrap();
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0xff], off + HDR as u64 + 300).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        assert_matches!(f.read(off, 777, 42, &mut out), Err(StoreError::Corrupt { offset }) if offset == off);
        // A read with the wrong tag (a misdirected read) is refused as well.
        let off2 = f.write(&payload(10, 1), 7).unwrap().unwrap();
        assert_matches!(f.read(off2, 10, 8, &mut out), Err(StoreError::Corrupt { .. }));
    }

    #[test]
    fn enospc_means_full_not_error() {
        // /dev/full fails every write with ENOSPC.
        let f = SpillFile::open(Path::new("/dev/full"), 1 << 20).unwrap();
        assert!(f.write(&payload(100, 0), 0).unwrap().is_none());
        assert!(f.write(&payload(100, 0), 0).unwrap().is_none());
        assert_eq!(f.live_bytes(), 0);
    }
}
