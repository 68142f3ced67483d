//! Multi-page frames in a spill file, for `tmem-bench frames` only (the
//! store writes one object per slot; see docs/design.md, "Multi-page spill
//! frames, measured").
//!
//! A frame is sealed and opened by the spill tier's own AEAD code
//! ([`SpillFile`]'s sealing, under a key of its own) in a private file made
//! as the store makes its spill file; only the associated data differs: the
//! frame's length takes 4 bytes, since a frame of 16 raw pages is over 64 KiB.
//! Frames are appended, never freed: the bench counts what freeing could
//! reclaim rather than doing it. Pages are encoded as the store holds them
//! in RAM, by the store's codec.

use std::{fs::File, os::unix::fs::FileExt, path::Path};

use super::{
    codec::{self, Decoder, COMPRESS_BOUND},
    dict::{self, Dict},
    slab::Codec,
    spill::{units_for, SpillFile, HDR, MAX_FILE_BYTES, UNIT},
    Page, StoreConfig, StoreError, PAGE_SIZE,
};

/// Bytes of a frame's header in its slot: the nonce counter and the tag.
pub const FRAME_HEADER: usize = HDR;

/// Bytes of file a frame of `len` body bytes takes: header and padding to
/// the next 128-byte unit included, as a slot.
pub fn frame_slot_bytes(len: usize) -> u64 {
    units_for(len) as u64 * UNIT
}

/// The associated data of a frame: its offset, length and id.
fn frame_aad(offset: u64, len: usize, id: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&offset.to_le_bytes());
    a[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    a[12..].copy_from_slice(&id.to_le_bytes());
    a
}

/// A private, sealed file of frames, appended one after another.
pub struct FrameFile {
    spill: SpillFile,
    end: u64,
}

impl FrameFile {
    /// A new file in `dir`, made and keyed as the store's spill file is.
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        Ok(FrameFile {
            spill: SpillFile::open(dir, MAX_FILE_BYTES, &[])?,
            end: 0,
        })
    }

    /// Seals `slot[FRAME_HEADER..]` (the frame's body) in place for frame
    /// `id` and writes the slot at the end of the file; returns its offset.
    /// The file then grows by [`frame_slot_bytes`] of the body.
    pub fn append(&mut self, slot: &mut [u8], id: u32) -> Result<u64, StoreError> {
        let offset = self.end;
        let len = slot.len() - HDR;
        self.spill.seal_with(&frame_aad(offset, len, id), slot)?;
        self.spill
            .fd()
            .write_all_at(slot, offset)
            .map_err(StoreError::SpillIo)?;
        self.end += frame_slot_bytes(len);
        Ok(offset)
    }

    /// Reads the frame `id` of `len` body bytes at `offset` into
    /// `slot[..FRAME_HEADER + len]` and opens it: the body is then at
    /// `slot[FRAME_HEADER..]`. A frame that does not authenticate is
    /// [`StoreError::Corrupt`].
    pub fn read(&self, offset: u64, len: usize, id: u32, slot: &mut [u8]) -> Result<(), StoreError> {
        let slot = &mut slot[..HDR + len];
        self.spill
            .fd()
            .read_exact_at(slot, offset)
            .map_err(StoreError::SpillIo)?;
        self.spill.open_with(&frame_aad(offset, len, id), offset, slot)
    }

    /// Bytes of the file written so far, padding included.
    pub fn file_bytes(&self) -> u64 {
        self.end
    }

    /// The file, to damage a frame behind the bench's back.
    pub fn file(&self) -> &File {
        self.spill.fd()
    }
}

/// How pages are held in RAM when the writer takes them, as the store
/// encodes them: `--compression zstd:L`, `lz4`, or the settled form under
/// `auto:L` (zstd at L with a dictionary trained on the guest's pages).
pub enum PagePayloads {
    Zstd(i32),
    Lz4,
    Dict(i32, Dict),
}

impl PagePayloads {
    /// The settled form of `auto:level`, with a dictionary trained as the
    /// store trains one: from up to its sample size of `pages`, spread
    /// evenly. `None` when zstd cannot train on them (too few, too alike).
    pub fn trained(pages: &[&Page], level: i32) -> Option<Self> {
        let step = pages.len().div_ceil(dict::SAMPLE_PAGES).max(1);
        let mut samples = Vec::with_capacity(dict::SAMPLE_PAGES * PAGE_SIZE);
        for page in pages.iter().step_by(step) {
            samples.extend_from_slice(&page[..]);
        }
        let (dict, _) = dict::train(&samples, level, 1)?;
        Some(PagePayloads::Dict(level, dict))
    }

    /// Encodes a page that is not same-filled (fills never reach the file)
    /// into `out`: `Some(len)` for a frame of the store's codec, `None` when
    /// the store keeps it raw.
    pub fn encode(&self, page: &Page, out: &mut [u8; COMPRESS_BOUND]) -> Result<Option<usize>, StoreError> {
        let raw_threshold = StoreConfig::default().raw_threshold;
        let encoded = match self {
            PagePayloads::Zstd(level) => codec::encode_data(page, Codec::Zstd, *level, raw_threshold, out),
            PagePayloads::Lz4 => codec::encode_data(page, Codec::Lz4, 1, raw_threshold, out),
            PagePayloads::Dict(..) if codec::looks_incompressible(page) => Ok(None),
            PagePayloads::Dict(level, dict) => {
                codec::compress_dict(page, *level, dict, out).map(|len| (len < raw_threshold).then_some(len))
            }
        };
        encoded.map_err(StoreError::Compress)
    }

    /// Decodes a payload [`PagePayloads::encode`] made (a whole page is raw).
    pub fn decode(&self, payload: &[u8], out: &mut Page) -> Result<(), StoreError> {
        if payload.len() == PAGE_SIZE {
            out.copy_from_slice(payload);
            return Ok(());
        }
        let decoded = match self {
            PagePayloads::Zstd(_) => codec::decode_frame(payload, &Decoder::Zstd, out),
            PagePayloads::Lz4 => codec::decode_frame(payload, &Decoder::Lz4, out),
            PagePayloads::Dict(_, dict) => codec::decompress_dict(payload, dict, out),
        };
        decoded.map_err(StoreError::Decompress)
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    fn text(seed: u8) -> Box<Page> {
        let words = b"swap page guest host memory kernel virtio queue ";
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = words[(i * 7 + usize::from(seed)) % words.len()] ^ (i / 1024) as u8;
        }
        p
    }

    #[test]
    fn a_frame_opens_only_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = FrameFile::create(dir.path()).unwrap();
        // Longer than a u16 can say: 16 raw pages and a bit.
        let body: Vec<u8> = (0..16 * PAGE_SIZE + 5).map(|i| (i % 251) as u8).collect();
        let mut slot = vec![0u8; HDR + body.len()];
        slot[HDR..].copy_from_slice(&body);
        let first = f.append(&mut slot, 7).unwrap();
        assert_ne!(slot[HDR..], body[..], "sealed in place");
        let mut slot2 = vec![0u8; HDR + 100];
        slot2[HDR..].fill(3);
        let second = f.append(&mut slot2, 8).unwrap();
        assert_eq!(second, frame_slot_bytes(body.len()));
        assert_eq!(f.file_bytes(), second + frame_slot_bytes(100));
        assert_eq!(frame_slot_bytes(100), UNIT);

        let mut buf = vec![0u8; HDR + body.len()];
        f.read(first, body.len(), 7, &mut buf).unwrap();
        assert_eq!(buf[HDR..], body[..]);
        // Another id, length or offset does not open.
        assert_matches!(
            f.read(first, body.len(), 8, &mut buf),
            Err(StoreError::Corrupt { .. })
        );
        assert_matches!(
            f.read(first, body.len() - 1, 7, &mut buf),
            Err(StoreError::Corrupt { .. })
        );
        // One flipped byte in the body, the tag or the counter does not open.
        for at in [HDR as u64 + 40_000, 10, 0] {
            let mut b = [0u8];
            f.file().read_exact_at(&mut b, first + at).unwrap();
            f.file().write_all_at(&[b[0] ^ 1], first + at).unwrap();
            assert_matches!(
                f.read(first, body.len(), 7, &mut buf),
                Err(StoreError::Corrupt { offset }) if offset == first
            );
            f.file().write_all_at(&b, first + at).unwrap();
        }
        f.read(first, body.len(), 7, &mut buf).unwrap();
        assert_eq!(buf[HDR..], body[..]);
        f.read(second, 100, 8, &mut buf).unwrap();
        assert!(buf[HDR..HDR + 100].iter().all(|&b| b == 3));
    }

    #[test]
    fn every_payload_form_round_trips() {
        let pages: Vec<Box<Page>> = (0..80).map(text).collect();
        let refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
        let trained = PagePayloads::trained(&refs, 3).expect("enough pages to train on");
        let mut noise = [0u8; PAGE_SIZE];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for w in noise.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        for form in [PagePayloads::Zstd(1), PagePayloads::Lz4, trained] {
            let mut out = [0u8; COMPRESS_BOUND];
            let mut back = [0u8; PAGE_SIZE];
            let len = form
                .encode(&pages[3], &mut out)
                .unwrap()
                .expect("text compresses");
            assert!(len < PAGE_SIZE / 2);
            form.decode(&out[..len], &mut back).unwrap();
            assert_eq!(back, *pages[3]);
            assert_eq!(form.encode(&noise, &mut out).unwrap(), None, "kept raw");
            form.decode(&noise, &mut back).unwrap();
            assert_eq!(back, noise);
            assert_matches!(form.decode(&[1, 2, 3], &mut back), Err(StoreError::Decompress(_)));
        }
    }
}
