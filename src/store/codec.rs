//! Page encoding: same-filled detection, zstd with one reused context per
//! thread, and the raw fallback for pages that do not shrink enough.
//!
//! Nothing here allocates per page: the zstd contexts live in thread locals
//! (created once per thread and per level) and callers pass their own output
//! buffers, which are fixed-size arrays on their stacks.
//!
//! Frames are cut for one 4 KiB page (see [`page_profile`]): every stored
//! frame's length is known from its record and its content is always one
//! page, so the frame keeps neither zstd's magic number nor a content size.

use std::{cell::RefCell, io};

use zstd::{
    stream::raw::{CParameter, DParameter},
    zstd_safe::{FrameFormat, Strategy},
};

use super::{Page, PAGE_SIZE};

/// Room for zstd's worst case on one page (ZSTD_compressBound(4096) is 4177).
pub const COMPRESS_BOUND: usize = PAGE_SIZE + 256;

/// Returns the repeated word if the page is one u64 repeated (zero included).
pub fn fill_value(page: &Page) -> Option<u64> {
    let first = word(&page[..8]);
    // Comparing 8 words per step lets the compiler vectorise; a typical
    // non-filled page differs within the first block anyway.
    let all_same = page.chunks_exact(64).all(|block| {
        block
            .chunks_exact(8)
            .fold(true, |acc, w| acc & (word(w) == first))
    });
    all_same.then_some(first)
}

fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(bytes);
    u64::from_le_bytes(w)
}

/// Whether a sample of the page looks like random bytes, which zstd would
/// only turn into a raw block after searching all of it for matches.
///
/// Encrypted or already-compressed memory is common in some guests, and
/// running the match finder over it costs as much as compressing a text
/// page, for nothing. As in btrfs's compression heuristic, one 8-byte word
/// per 64-byte line is sampled:
/// - if the sample holds several zero bytes, or is far from half its bytes
///   at 0x80 and above, it is not random (about 100 ns on a page in cache,
///   against 600 for the histogram; almost every page ends here);
/// - if the sampled bytes' histogram is lumpy (sum of squared counts well
///   above the ~1,534 that 512 uniform bytes give), an entropy coder can
///   shrink the page, so it is compressed;
/// - otherwise, a repeated sampled word means repeats a match finder would
///   use, so it is compressed too;
/// - otherwise it is stored raw without trying.
///
/// A wrong "random" costs ratio on that page, never correctness. On the
/// corpora in docs/design.md it flags exactly the pages zstd leaves raw.
pub fn looks_incompressible(page: &Page) -> bool {
    const LUMPY: u32 = 2200;
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = [0u64; PAGE_SIZE / 64];
    let (mut zeros, mut high) = (0, 0);
    for (w, line) in words.iter_mut().zip(page.chunks_exact(64)) {
        *w = word(&line[..8]);
        // Zero bytes (the classic test; a 0x01 right after a zero may count
        // too, which only errs towards "compressible") and bytes >= 0x80.
        zeros += (w.wrapping_sub(LOW) & !*w & HIGH).count_ones();
        high += (*w & HIGH).count_ones();
    }
    // The quick look settles almost every page: 512 uniform bytes hold about
    // 2 zeros and 256 +- 11 high bytes. Heaps are full of zeros, text has no
    // high bytes.
    if zeros >= 8 || !(200..=312).contains(&high) {
        return false;
    }
    let mut hist = [0u16; 256];
    for w in &words {
        for b in w.to_le_bytes() {
            hist[usize::from(b)] += 1;
        }
    }
    let sum_sq: u32 = hist.iter().map(|&c| u32::from(c) * u32::from(c)).sum();
    if sum_sq > LUMPY {
        return false;
    }
    words.sort_unstable();
    !words.windows(2).any(|pair| pair[0] == pair[1])
}

/// Writes the page made of `fill` repeated, little-endian as on the wire (PUT_FILL).
pub fn write_fill(out: &mut Page, fill: u64) {
    let bytes = fill.to_le_bytes();
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&bytes);
    }
}

thread_local! {
    /// Per-thread scratch for frames, so the hot path neither allocates nor
    /// zeroes a page-sized buffer per call.
    static SCRATCH: RefCell<Box<[u8; COMPRESS_BOUND]>> = RefCell::new(Box::new([0u8; COMPRESS_BOUND]));
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's scratch buffer. Not reentrant: `f` must not
/// call it again (the store's put and get each use it once, at top level).
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8; COMPRESS_BOUND]) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// Encodes a page that is not same-filled: `Some(len)` when the first `len`
/// bytes of `out` hold its zstd frame, `None` when it is kept raw.
///
/// A compressed size at or above `raw_threshold` means the page is stored raw:
/// it saves the decompression on every get for almost no space.
pub fn encode_data(
    page: &Page,
    level: i32,
    raw_threshold: usize,
    out: &mut [u8; COMPRESS_BOUND],
) -> io::Result<Option<usize>> {
    if looks_incompressible(page) {
        return Ok(None);
    }
    let len = compress(page, level, out)?;
    Ok((len < raw_threshold.min(PAGE_SIZE)).then_some(len))
}

/// The zstd parameters for one page at `level`, on top of the level's own.
///
/// - Magicless frames without a content size save 5 bytes per page (the
///   window byte comes back); the record already knows what they said.
/// - Levels 1 and 2 use the double-fast match finder instead of fast. On a
///   4 KiB input its second hash table costs next to nothing (the input, not
///   the tables, sets the work), and it finds the short repeats that process
///   memory is made of: 5-6% smaller pages at the same speed on the corpora
///   measured in docs/design.md. Level 3 is double-fast already; negative
///   levels stay as they are, since they ask for speed over size.
pub fn page_profile(level: i32) -> impl Iterator<Item = CParameter> {
    let dfast = (1..=2)
        .contains(&level)
        .then_some(CParameter::Strategy(Strategy::ZSTD_dfast));
    [
        CParameter::Format(FrameFormat::Magicless),
        CParameter::ContentSizeFlag(false),
        CParameter::ChecksumFlag(false),
    ]
    .into_iter()
    .chain(dfast)
}

/// A compression context set up for pages at `level`: zstd at that level with
/// the page profile (magicless frames, no content size, double-fast at levels
/// 1 and 2; see docs/design.md).
pub fn page_compressor(level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut ctx = zstd::bulk::Compressor::new(level)?;
    for param in page_profile(level) {
        ctx.set_parameter(param)?;
    }
    Ok(ctx)
}

/// A decompression context for frames made by [`page_compressor`].
pub fn page_decompressor() -> io::Result<zstd::bulk::Decompressor<'static>> {
    let mut ctx = zstd::bulk::Decompressor::new()?;
    ctx.set_parameter(DParameter::Format(FrameFormat::Magicless))?;
    Ok(ctx)
}

/// Compresses one page with this thread's context at `level`.
pub fn compress(page: &Page, level: i32, out: &mut [u8; COMPRESS_BOUND]) -> io::Result<usize> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some((l, ctx)) if *l == level => ctx,
            _ => &mut slot.insert((level, page_compressor(level)?)).1,
        };
        ctx.compress_to_buffer(&page[..], &mut out[..])
    })
}

/// Decompresses one stored frame; anything but exactly one page is an error.
pub fn decompress(frame: &[u8], out: &mut Page) -> io::Result<()> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some(ctx) => ctx,
            None => slot.insert(page_decompressor()?),
        };
        let n = ctx.decompress_to_buffer(frame, &mut out[..])?;
        if n == PAGE_SIZE {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("stored frame holds {n} bytes, not one page"),
            ))
        }
    })
}

/// Restores a page from its stored payload (`len == PAGE_SIZE` means raw).
#[cfg(test)]
pub fn decode(payload: &[u8], out: &mut Page) -> io::Result<()> {
    if payload.len() == PAGE_SIZE {
        out.copy_from_slice(payload);
        Ok(())
    } else {
        decompress(payload, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page() -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let text = b"the quick brown fox jumps over the lazy dog; ";
        for (i, b) in p.iter_mut().enumerate() {
            *b = text[i % text.len()] ^ (i / 512) as u8;
        }
        p
    }

    fn noise_page(seed: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = seed | 1;
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    #[test]
    fn zero_and_repeated_words_are_fill() {
        assert_eq!(fill_value(&[0u8; PAGE_SIZE]), Some(0));
        let mut p = [0u8; PAGE_SIZE];
        write_fill(&mut p, 0xdead_beef_0123_4567);
        assert_eq!(fill_value(&p), Some(0xdead_beef_0123_4567));
    }

    #[test]
    fn one_different_byte_anywhere_is_not_fill() {
        for pos in [0, 7, 8, 63, 64, 2048, PAGE_SIZE - 1] {
            let mut p = [0x11u8; PAGE_SIZE];
            p[pos] = 0x12;
            assert_eq!(fill_value(&p), None, "byte {pos}");
        }
    }

    #[test]
    fn text_compresses_and_round_trips() {
        let page = text_page();
        let mut buf = [0u8; COMPRESS_BOUND];
        let Some(len) = encode_data(&page, 1, 3968, &mut buf).unwrap() else {
            panic!("text page should compress")
        };
        assert!(len < 1024, "compressed to {len}");
        let mut out = [0u8; PAGE_SIZE];
        decode(&buf[..len], &mut out).unwrap();
        assert_eq!(out, page);
    }

    #[test]
    fn noise_is_stored_raw() {
        let page = noise_page(7);
        let mut buf = [0u8; COMPRESS_BOUND];
        assert_eq!(encode_data(&page, 1, 3968, &mut buf).unwrap(), None);
        let mut out = [0u8; PAGE_SIZE];
        decode(&page, &mut out).unwrap();
        assert_eq!(out, page);
    }

    #[test]
    fn only_random_looking_pages_skip_compression() {
        assert!(looks_incompressible(&noise_page(3)));
        assert!(!looks_incompressible(&text_page()));
        assert!(!looks_incompressible(&[0u8; PAGE_SIZE]));
        // Half noise, half zeros: the histogram gives it away.
        let mut half = noise_page(4);
        half[PAGE_SIZE / 2..].fill(0);
        assert!(!looks_incompressible(&half));
        // Noise repeated at a line-aligned distance: the sampled words repeat.
        let mut twice = noise_page(5);
        twice.copy_within(..PAGE_SIZE / 2, PAGE_SIZE / 2);
        assert!(!looks_incompressible(&twice));
        let mut buf = [0u8; COMPRESS_BOUND];
        let Some(len) = encode_data(&twice, 1, 3968, &mut buf).unwrap() else {
            panic!("a page that repeats itself compresses")
        };
        assert!(len < 2200, "{len}");
        // Small integers in 8-byte slots, as in many heaps: lumpy.
        let mut ints = [0u8; PAGE_SIZE];
        for (i, w) in ints.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((i as u64 * 2_654_435_761) % 100_000).to_le_bytes());
        }
        assert!(!looks_incompressible(&ints));
    }

    #[test]
    fn level_change_replaces_the_context() {
        let page = text_page();
        let mut buf = [0u8; COMPRESS_BOUND];
        for level in [1, 3, 1, 9] {
            let len = compress(&page, level, &mut buf).unwrap();
            let mut out = [0u8; PAGE_SIZE];
            decompress(&buf[..len], &mut out).unwrap();
            assert_eq!(out, page);
        }
    }

    #[test]
    fn page_frames_are_smaller_than_stock_frames() {
        // Without a content size the frame needs a window byte: 4 + 2 - 1 bytes saved.
        let page = text_page();
        let mut buf = [0u8; COMPRESS_BOUND];
        for level in [-3, 1, 2, 3, 6] {
            let ours = compress(&page, level, &mut buf).unwrap();
            let stock = zstd::bulk::compress(&page[..], level).unwrap().len();
            assert!(ours + 5 <= stock, "level {level}: {ours} against stock {stock}");
        }
    }

    #[test]
    fn garbage_frame_is_an_error() {
        let mut out = [0u8; PAGE_SIZE];
        assert!(decode(&[1, 2, 3, 4, 5], &mut out).is_err());
        // A valid frame of the wrong size is refused too.
        let small = page_compressor(1).unwrap().compress(&[0u8; 100]).unwrap();
        assert!(decode(&small, &mut out).is_err());
    }
}
