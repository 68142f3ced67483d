//! Page contents from a few bytes of fuzz input: zero and same-filled pages
//! (stored as metadata), near-fills, text (compresses), random (does not) and
//! half-and-half. Seeds come from small ranges so that equal pages recur and
//! deduplication is exercised.

use vhost_user_tmem::store::{Page, PAGE_SIZE};

use crate::input::{Reader, Writer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// One u64 repeated.
    Fill(u64),
    /// A fill with one byte changed: not same-filled.
    NearFill(u64, u16),
    Text(u8),
    Random(u8),
    Half(u8),
}

impl Content {
    pub fn read(r: &mut Reader) -> Self {
        match r.choice(6) {
            0 => Content::Zero,
            1 => Content::Fill(r.u64()),
            2 => Content::NearFill(r.u64(), r.u16()),
            3 => Content::Text(r.u8()),
            4 => Content::Random(r.u8()),
            _ => Content::Half(r.u8()),
        }
    }

    pub fn write(self, w: &mut Writer) {
        match self {
            Content::Zero => w.u8(0),
            Content::Fill(f) => w.u8(1).u64(f),
            Content::NearFill(f, pos) => w.u8(2).u64(f).u16(pos),
            Content::Text(s) => w.u8(3).u8(s),
            Content::Random(s) => w.u8(4).u8(s),
            Content::Half(s) => w.u8(5).u8(s),
        };
    }
}

/// SplitMix64, for page bytes.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub fn fill_page(word: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&word.to_le_bytes());
    }
    p
}

fn text_into(out: &mut [u8], rng: &mut SplitMix) {
    const WORDS: [&[u8]; 8] = [
        b"swap ", b"page ", b"guest ", b"memory ", b"the ", b"of ", b"virtio ", b"kernel ",
    ];
    let mut pos = 0;
    while pos < out.len() {
        let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
        let n = w.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
    }
}

fn random_into(out: &mut [u8], rng: &mut SplitMix) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Seeds are taken modulo 8: few distinct pages, many repeats.
pub fn make_page(c: Content) -> Box<Page> {
    let seed = |s: u8| u64::from(s % 8) << 32;
    match c {
        Content::Zero => Box::new([0u8; PAGE_SIZE]),
        Content::Fill(f) => fill_page(f),
        Content::NearFill(f, pos) => {
            let mut p = fill_page(f);
            p[usize::from(pos) % PAGE_SIZE] ^= 0x40;
            p
        }
        Content::Text(s) => {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            text_into(&mut p[..], &mut SplitMix(seed(s) | 0x7e7));
            p
        }
        Content::Random(s) => {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            random_into(&mut p[..], &mut SplitMix(seed(s) | 0xabc));
            p
        }
        Content::Half(s) => {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            let mut rng = SplitMix(seed(s) | 0x4a1f);
            random_into(&mut p[..PAGE_SIZE / 2], &mut rng);
            text_into(&mut p[PAGE_SIZE / 2..], &mut rng);
            p
        }
    }
}
