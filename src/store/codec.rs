//! Page encoding: same-filled detection, zstd with one reused context per
//! thread, lz4 blocks for the fast path, zstd with a trained dictionary for
//! pages the recompressor settles, and the raw fallback for pages that do not
//! shrink enough.
//!
//! Nothing here allocates per page: the zstd contexts and the lz4 match
//! table live in thread locals (created once per thread and per level) and
//! callers pass their own output buffers, which are fixed-size arrays on
//! their stacks.
//!
//! Frames are cut for one 4 KiB page (see [`page_profile`]): every stored
//! frame's length is known from its record and its content is always one
//! page, so the frame keeps neither zstd's magic number nor a content size.

use std::{cell::RefCell, io};

use zstd::{
    stream::raw::{CParameter, DParameter},
    zstd_safe::{CCtx, DCtx, FrameFormat, Strategy},
};

use super::{dict::Dict, slab::Codec, Page, PAGE_SIZE};

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
    static LZ4_TABLE: RefCell<Lz4Table> = RefCell::new(Lz4Table::new());
    /// The recompressor's context: its level and the id of the dictionary loaded.
    static DICT_CCTX: RefCell<Option<(i32, u64, CCtx<'static>)>> = const { RefCell::new(None) };
    static DICT_DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's scratch buffer. Not reentrant: `f` must not
/// call it again (the store's put and get each use it once, at top level).
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8; COMPRESS_BOUND]) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// Encodes a page that is not same-filled with `codec` (zstd at `level`, or
/// lz4): `Some(len)` when the first `len` bytes of `out` hold its frame,
/// `None` when it is kept raw.
///
/// A compressed size at or above `raw_threshold` means the page is stored raw:
/// it saves the decompression on every get for almost no space.
pub fn encode_data(
    page: &Page,
    codec: Codec,
    level: i32,
    raw_threshold: usize,
    out: &mut [u8; COMPRESS_BOUND],
) -> io::Result<Option<usize>> {
    if looks_incompressible(page) {
        return Ok(None);
    }
    let limit = raw_threshold.min(PAGE_SIZE);
    if codec.is_lz4() {
        return Ok(lz4_compress(page, limit, out));
    }
    let len = compress(page, level, out)?;
    Ok((len < limit).then_some(len))
}

/// How a stored frame is decoded: its record's codec, with the dictionary
/// itself for [`Codec::Dict`] (held, so it outlives a retirement meanwhile).
#[derive(Clone, Debug)]
pub enum Decoder {
    Zstd,
    Lz4,
    Dict(std::sync::Arc<Dict>),
}

impl PartialEq for Decoder {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Decoder::Zstd, Decoder::Zstd) | (Decoder::Lz4, Decoder::Lz4) => true,
            (Decoder::Dict(a), Decoder::Dict(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Decoder {}

/// Decodes one stored frame into a page.
pub fn decode_frame(frame: &[u8], how: &Decoder, out: &mut Page) -> io::Result<()> {
    match how {
        Decoder::Zstd => decompress(frame, out),
        Decoder::Lz4 => lz4_decompress(frame, out),
        Decoder::Dict(dict) => decompress_dict(frame, dict, out),
    }
}

/// lz4's match table for one page: 4,096 entries, each a position tagged
/// with the call that wrote it, so a new page needs no clearing and stale
/// entries are never matched (the output depends only on the page).
struct Lz4Table {
    tag: u32,
    slots: Box<[u32; LZ4_SLOTS]>,
}

const LZ4_HASH_BITS: u32 = 12;
const LZ4_SLOTS: usize = 1 << LZ4_HASH_BITS;
/// lz4's block rules: a match is at least 4 bytes; the last 5 bytes are
/// literals and the last match starts at least 12 bytes before the end.
const LZ4_MIN_MATCH: usize = 4;
const LZ4_LAST_LITERALS: usize = 5;
const LZ4_MF_LIMIT: usize = 12;

impl Lz4Table {
    fn new() -> Self {
        Lz4Table {
            tag: 0,
            slots: Box::new([0; LZ4_SLOTS]),
        }
    }

    /// The tag for the next page (in the high 16 bits of an entry).
    fn next_tag(&mut self) -> u32 {
        self.tag = (self.tag + 1) & 0xffff;
        if self.tag == 0 {
            // Wrapped: an entry of 65,536 pages ago could look current.
            self.slots.fill(0);
            self.tag = 1;
        }
        self.tag << 16
    }
}

fn read32(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[at..at + 4]);
    u32::from_le_bytes(b)
}

fn lz4_hash(seq: u32) -> usize {
    (seq.wrapping_mul(2_654_435_761) >> (32 - LZ4_HASH_BITS)) as usize
}

/// Compresses one page as an lz4 block (the format `lz4_flex` and the
/// kernel's lz4 decode), with this thread's match table. `None` when the
/// block would be `limit` bytes or more.
///
/// Written here rather than taken from `lz4_flex`, whose encoder allocates
/// and zeroes its table on every call: the put path allocates nothing.
pub fn lz4_compress(page: &Page, limit: usize, out: &mut [u8; COMPRESS_BOUND]) -> Option<usize> {
    LZ4_TABLE.with(|t| lz4_block(page, limit, out, &mut t.borrow_mut()))
}

fn lz4_block(
    src: &Page,
    limit: usize,
    out: &mut [u8; COMPRESS_BOUND],
    table: &mut Lz4Table,
) -> Option<usize> {
    let tag = table.next_tag();
    let n = src.len();
    let match_end = n - LZ4_LAST_LITERALS;
    let (mut anchor, mut pos, mut o) = (0usize, 0usize, 0usize);
    while pos + LZ4_MF_LIMIT <= n {
        let seq = read32(src, pos);
        let h = lz4_hash(seq);
        let entry = table.slots[h];
        table.slots[h] = tag | pos as u32;
        let cand = (entry & 0xffff) as usize;
        if entry & 0xffff_0000 != tag || read32(src, cand) != seq {
            // Skip faster through stretches without matches, as lz4 does.
            pos += 1 + ((pos - anchor) >> 6);
            continue;
        }
        let (mut start, mut from) = (pos, cand);
        while start > anchor && from > 0 && src[start - 1] == src[from - 1] {
            start -= 1;
            from -= 1;
        }
        let mut end = pos + LZ4_MIN_MATCH;
        let mut at = cand + LZ4_MIN_MATCH;
        while end + 8 <= match_end {
            let diff = word(&src[end..end + 8]) ^ word(&src[at..at + 8]);
            if diff != 0 {
                end += (diff.trailing_zeros() / 8) as usize;
                at = usize::MAX;
                break;
            }
            end += 8;
            at += 8;
        }
        if at != usize::MAX {
            while end < match_end && src[end] == src[at] {
                end += 1;
                at += 1;
            }
        }
        o = lz4_sequence(out, o, &src[anchor..start], Some((start - from, end - start)));
        if o >= limit {
            return None;
        }
        // The position just before the match's end starts the next search well.
        let back = end - 2;
        table.slots[lz4_hash(read32(src, back))] = tag | back as u32;
        pos = end;
        anchor = end;
    }
    o = lz4_sequence(out, o, &src[anchor..], None);
    (o < limit).then_some(o)
}

/// Writes one lz4 sequence (literals, then a match of `(offset, len)`, or
/// none for the last one) at `o`; returns where the next one goes. The
/// worst case for a page is under [`COMPRESS_BOUND`].
fn lz4_sequence(out: &mut [u8], mut o: usize, literals: &[u8], matched: Option<(usize, usize)>) -> usize {
    let ll = literals.len();
    let ml = matched.map_or(0, |(_, len)| len - LZ4_MIN_MATCH);
    out[o] = (ll.min(15) << 4 | ml.min(15)) as u8;
    o += 1;
    if ll >= 15 {
        o = lz4_length(out, o, ll - 15);
    }
    out[o..o + ll].copy_from_slice(literals);
    o += ll;
    if let Some((offset, _)) = matched {
        out[o..o + 2].copy_from_slice(&(offset as u16).to_le_bytes());
        o += 2;
        if ml >= 15 {
            o = lz4_length(out, o, ml - 15);
        }
    }
    o
}

fn lz4_length(out: &mut [u8], mut o: usize, mut rest: usize) -> usize {
    while rest >= 255 {
        out[o] = 255;
        o += 1;
        rest -= 255;
    }
    out[o] = rest as u8;
    o + 1
}

/// Decodes one lz4 block; anything but exactly one page is an error.
pub fn lz4_decompress(frame: &[u8], out: &mut Page) -> io::Result<()> {
    let n = lz4_flex::block::decompress_into(frame, &mut out[..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    whole_page(n)
}

fn whole_page(n: usize) -> io::Result<()> {
    if n == PAGE_SIZE {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stored frame holds {n} bytes, not one page"),
        ))
    }
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(zstd::zstd_safe::get_error_name(code))
}

/// Compresses one page with zstd at `level` and `dict` (the page profile,
/// and no dictionary id: the record names the dictionary).
///
/// The context loads (copies) the dictionary and keeps it until another is
/// asked for, so its tables, sized for one page, exist once per thread
/// rather than once per dictionary. Callers that batch pages by domain
/// load each dictionary once per batch.
pub fn compress_dict(
    page: &Page,
    level: i32,
    dict: &Dict,
    out: &mut [u8; COMPRESS_BOUND],
) -> io::Result<usize> {
    DICT_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (_, loaded, ctx) = match &mut *slot {
            Some(s) if s.0 == level => s,
            _ => {
                let mut ctx = CCtx::try_create().ok_or_else(|| io::Error::other("zstd context"))?;
                for param in page_profile(level).chain([
                    CParameter::CompressionLevel(level),
                    CParameter::DictIdFlag(false),
                    CParameter::SrcSizeHint(PAGE_SIZE as u32),
                ]) {
                    ctx.set_parameter(param).map_err(zstd_error)?;
                }
                slot.insert((level, 0, ctx))
            }
        };
        if *loaded != dict.id() {
            *loaded = 0;
            ctx.load_dictionary(dict.raw()).map_err(zstd_error)?;
            *loaded = dict.id();
        }
        ctx.compress2(&mut out[..], &page[..]).map_err(zstd_error)
    })
}

/// Decodes a frame made by [`compress_dict`] with the same dictionary.
pub fn decompress_dict(frame: &[u8], dict: &Dict, out: &mut Page) -> io::Result<()> {
    DICT_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some(ctx) => ctx,
            None => {
                let mut ctx = DCtx::try_create().ok_or_else(|| io::Error::other("zstd context"))?;
                ctx.set_parameter(DParameter::Format(FrameFormat::Magicless))
                    .map_err(zstd_error)?;
                slot.insert(ctx)
            }
        };
        ctx.ref_ddict(dict.ddict()).map_err(zstd_error)?;
        let done = ctx.decompress(&mut out[..], frame).map_err(zstd_error);
        ctx.disable_dictionary().map_err(zstd_error)?;
        whole_page(done?)
    })
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
        whole_page(n)
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
        let Some(len) = encode_data(&page, Codec::Zstd, 1, 3968, &mut buf).unwrap() else {
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
        assert_eq!(encode_data(&page, Codec::Zstd, 1, 3968, &mut buf).unwrap(), None);
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
        let Some(len) = encode_data(&twice, Codec::Zstd, 1, 3968, &mut buf).unwrap() else {
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

    /// Pages of several shapes: text, structs of small integers, noise
    /// repeated, runs, a page that is almost all one byte.
    fn shapes() -> Vec<Page> {
        let mut pages = vec![text_page(), noise_page(9)];
        let mut ints = [0u8; PAGE_SIZE];
        for (i, w) in ints.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((i as u64 * 2_654_435_761) % 1000).to_le_bytes());
        }
        pages.push(ints);
        let mut twice = noise_page(5);
        twice.copy_within(..PAGE_SIZE / 2, PAGE_SIZE / 2);
        pages.push(twice);
        let mut runs = [0u8; PAGE_SIZE];
        for (i, b) in runs.iter_mut().enumerate() {
            *b = ((i / 300) * 7) as u8;
        }
        pages.push(runs);
        let mut almost = [0x55u8; PAGE_SIZE];
        almost[4090] = 1;
        almost[3] = 2;
        pages.push(almost);
        let mut tail = noise_page(11);
        tail[..PAGE_SIZE - 20].fill(0);
        pages.push(tail);
        pages
    }

    #[test]
    fn lz4_blocks_round_trip_through_lz4_flex_and_are_deterministic() {
        for (i, page) in shapes().iter().enumerate() {
            let mut buf = [0u8; COMPRESS_BOUND];
            let Some(len) = lz4_compress(page, COMPRESS_BOUND, &mut buf) else {
                panic!("shape {i}: no block within the bound")
            };
            let mut out = [0u8; PAGE_SIZE];
            lz4_decompress(&buf[..len], &mut out).unwrap();
            assert_eq!(out, *page, "shape {i}");
            // Another page in between must not change the block (stale table entries).
            let mut other = [0u8; COMPRESS_BOUND];
            lz4_compress(&noise_page(i as u64 + 100), COMPRESS_BOUND, &mut other);
            let mut again = [0u8; COMPRESS_BOUND];
            assert_eq!(
                lz4_compress(page, COMPRESS_BOUND, &mut again),
                Some(len),
                "shape {i}"
            );
            assert_eq!(buf[..len], again[..len], "shape {i}");
            // About as small as lz4_flex's own blocks.
            let theirs = lz4_flex::block::compress(&page[..]).len();
            assert!(
                len <= theirs + theirs / 8 + 16,
                "shape {i}: {len} against {theirs}"
            );
        }
    }

    #[test]
    fn lz4_gives_up_at_the_limit_and_the_table_survives_wrapping() {
        let mut buf = [0u8; COMPRESS_BOUND];
        assert_eq!(lz4_compress(&noise_page(1), 3968, &mut buf), None);
        let page = text_page();
        let len = lz4_compress(&page, 3968, &mut buf).unwrap();
        assert_eq!(
            lz4_compress(&page, len, &mut buf),
            None,
            "a block of exactly the limit is refused"
        );
        let mut table = Lz4Table::new();
        table.tag = 0xfffe;
        for _ in 0..3 {
            let n = lz4_block(&page, COMPRESS_BOUND, &mut buf, &mut table).unwrap();
            let mut out = [0u8; PAGE_SIZE];
            lz4_decompress(&buf[..n], &mut out).unwrap();
            assert_eq!(out, page);
        }
        assert_eq!(table.tag, 2, "wrapped to 1 on the second page");
    }

    #[test]
    fn lz4_rejects_bad_blocks() {
        let mut out = [0u8; PAGE_SIZE];
        assert!(lz4_decompress(&[0xff, 1, 2], &mut out).is_err());
        // A valid block of less than a page.
        let short = lz4_flex::block::compress(&[7u8; 100]);
        assert!(lz4_decompress(&short, &mut out).is_err());
    }

    #[test]
    fn dictionary_frames_round_trip_only_with_their_dictionary() {
        let mut samples = Vec::new();
        for seed in 0..200u64 {
            let mut p = text_page();
            p[..8].copy_from_slice(&seed.to_le_bytes());
            p[2000..2008].copy_from_slice(&(seed * 77).to_le_bytes());
            samples.extend_from_slice(&p);
        }
        let sizes = vec![PAGE_SIZE; 200];
        let raw = zstd::dict::from_continuous(&samples, &sizes, 4096).unwrap();
        let dict = Dict::new(&raw, 1).unwrap();
        let page = text_page();
        let mut buf = [0u8; COMPRESS_BOUND];
        let len = compress_dict(&page, 3, &dict, &mut buf).unwrap();
        let plain = compress(&page, 3, &mut [0u8; COMPRESS_BOUND]).unwrap();
        assert!(len < plain, "{len} with the dictionary against {plain}");
        let mut out = [0u8; PAGE_SIZE];
        decode_frame(&buf[..len], &Decoder::Dict(std::sync::Arc::new(dict)), &mut out).unwrap();
        assert_eq!(out, page);
        // Without it the frame does not decode (to the page, at least).
        assert!(decompress(&buf[..len], &mut out).is_err() || out != page);
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
