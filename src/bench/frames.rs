//! `tmem-bench frames`: whether the spill tier should pack several cold
//! pages of one guest into one frame (one header, one padding and one AEAD
//! tag per frame instead of per page), measured for reads and fragmentation.
//!
//! The pages the writer would spill are the corpus's objects: one per
//! distinct page that is not same-filled (fills never reach the file, and
//! duplicates share one object), encoded as the store holds them in RAM
//! (`--compression`). They are taken in the order the store's writer takes
//! them (`--order writer`): each object lands in an object shard by a keyed
//! hash of its content (random here, as the key is), each shard's CLOCK
//! hands its objects out in the order they were made, and a frame is N
//! victims of one shard, as a writer holding that shard's lock would take
//! them. `--order address` packs pages in corpus order instead: the best
//! case for compressing them together.
//!
//! For each frame size N and each form, every frame is written to a fresh
//! private file, sealed by the spill tier's code, then every page is got
//! once, in random order, and compared. The forms:
//! - `packed`: the pages' payloads as they are, back to back in one frame;
//! - `joint-zstd` / `joint-lz4`: the pages decoded from their payloads (the
//!   writer has them only so) and compressed together, zstd with the
//!   store's page profile at the store's level, or lz4; a frame that does
//!   not shrink below N times the store's raw threshold is written raw.
//!
//! A get must read and open (authenticate) the whole frame, and for a joint
//! frame decompress it whole. Fragmentation is counted, not simulated:
//! after a random share of the pages is invalidated, a frame whose pages
//! are all dead is reusable; a dead page's share of a frame that still
//! holds a live page is dead but not reusable ("stranded").

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use super::store::{load_corpus, thread_cpu_time, BenchError as CorpusError};
use crate::{
    config::parse_compression,
    store::{
        fill_value, frame_slot_bytes, page_compressor, page_decompressor, Compression, FrameFile, Page,
        PagePayloads, StoreConfig, StoreError, COMPRESS_BOUND, FRAME_HEADER, PAGE_SIZE,
    },
};

/// Largest frame size taken: 64 pages, 256 KiB uncompressed.
const MAX_FRAME_PAGES: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct FramesArgs {
    /// Raw concatenated 4096-byte pages, or a `.zst` of that.
    #[arg(long)]
    pub corpus: PathBuf,
    /// How pages are held in RAM when they spill, as the daemon's
    /// --compression: zstd or zstd:LEVEL, lz4, or auto or auto:LEVEL (the
    /// settled form: zstd at LEVEL with a dictionary trained on the pages).
    /// Joint zstd frames use the same level (1 for lz4).
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// Frame sizes, in pages.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16",
          value_parser = clap::value_parser!(u16).range(1..=MAX_FRAME_PAGES as i64))]
    pub frames: Vec<u16>,
    /// Shares of the spilled pages invalidated for the fragmentation count.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75", value_parser = parse_share)]
    pub invalidate: Vec<f64>,
    /// Which pages share a frame: the writer's (one shard's CLOCK victims)
    /// or consecutive pages of the corpus.
    #[arg(long, value_enum, default_value_t = Order::Writer)]
    pub order: Order,
    /// Object shards the writer's order is drawn over; 0: as the store
    /// picks them (twice the CPUs, 4 to 64).
    #[arg(long, default_value_t = 0)]
    pub shards: usize,
    /// Where the frame files are made (unnamed, as the spill file); the
    /// temporary directory by default.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the shard placement, the get order and the invalidations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Time every write and get pass this many times and keep the best.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not a share between 0 and 1")),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    Writer,
    Address,
}

/// How a frame's pages are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    Packed,
    JointZstd,
    JointLz4,
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("cannot load the corpus")]
    Corpus(#[source] CorpusError),
    #[error("bad --compression")]
    Compression(#[source] crate::config::ConfigError),
    #[error("the corpus has no page that would spill (all fills or duplicates)")]
    NothingSpills,
    #[error("zstd cannot train a dictionary on these pages")]
    NoDictionary,
    #[error("the spill code failed")]
    Store(#[from] StoreError),
    #[error("zstd failed on a frame")]
    Zstd(#[source] std::io::Error),
    #[error("lz4 failed on a frame")]
    Lz4(#[source] std::io::Error),
    #[error("{count} pages did not read back as written ({form:?}, {pages} pages a frame)")]
    Mismatch { form: Form, pages: usize, count: u64 },
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FramesReport {
    pub pages: u64,
    /// Objects the writer would spill: distinct pages that are not fills.
    pub spilled_pages: u64,
    pub same_filled_pages: u64,
    pub duplicate_pages: u64,
    pub compression: String,
    /// The level of the payloads (zstd or the dictionary's) and of joint zstd.
    pub zstd_level: i32,
    /// Their bytes, as held in RAM.
    pub payload_bytes: u64,
    pub order: Order,
    pub shards: usize,
    pub repeat: u32,
    pub rows: Vec<FrameRow>,
}

/// One form at one frame size. Rates are pages per second, by the wall
/// clock and by the thread's CPU time (steadier on a busy machine).
#[derive(Debug, Clone, Serialize)]
pub struct FrameRow {
    pub form: Form,
    pub pages_per_frame: usize,
    pub frames: u64,
    /// Slot bytes, headers and padding included.
    pub file_bytes: u64,
    pub file_bytes_per_page: f64,
    /// File bytes against today's slots (packed, one page a frame).
    pub file_vs_single: Option<f64>,
    /// Packing, (for joint frames) decoding the payloads and compressing
    /// them together, sealing, and the positioned writes.
    pub write_pages_per_sec: f64,
    pub write_pages_per_cpu_sec: f64,
    /// Random single-page gets: read, open, decode, compare.
    pub get_pages_per_sec: f64,
    pub get_pages_per_cpu_sec: f64,
    pub read_bytes_per_get: f64,
    pub decrypted_bytes_per_get: f64,
    pub decompressed_bytes_per_get: f64,
    pub fragmentation: Vec<FragRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FragRow {
    pub invalidated: f64,
    pub live_pages: u64,
    /// Of the file bytes, the share that is dead but held by a frame with a
    /// live page.
    pub stranded_share: f64,
    /// Of the file bytes, the share in frames with no live page (free).
    pub reusable_share: f64,
    /// File bytes that must be kept, per live page.
    pub held_bytes_per_live_page: f64,
}

/// A frame as fragmentation sees it: its slot bytes, its pages, and each
/// page's share of the slot (summing to the slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameShape {
    pub slot: u64,
    pub pages: Vec<usize>,
    pub shares: Vec<u64>,
}

/// What invalidating the pages marked `dead` leaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fragmentation {
    /// Dead pages' shares of frames that still hold a live page.
    pub stranded_bytes: u64,
    /// Slot bytes of frames that still hold a live page.
    pub held_bytes: u64,
    pub live_pages: u64,
}

pub fn fragmentation(frames: &[FrameShape], dead: &[bool]) -> Fragmentation {
    let mut f = Fragmentation::default();
    for frame in frames {
        let live = frame.pages.iter().filter(|&&p| !dead[p]).count() as u64;
        if live == 0 {
            continue;
        }
        f.live_pages += live;
        f.held_bytes += frame.slot;
        f.stranded_bytes += frame
            .pages
            .iter()
            .zip(&frame.shares)
            .filter(|(&p, _)| dead[p])
            .map(|(_, &s)| s)
            .sum::<u64>();
    }
    f
}

/// Each page's share of a slot: packed, its payload and an equal part of
/// the header and padding; joint, an equal part of the whole.
fn shares(slot: u64, lens: &[usize], packed: bool) -> Vec<u64> {
    let n = lens.len() as u64;
    let body: u64 = if packed {
        lens.iter().map(|&l| l as u64).sum()
    } else {
        0
    };
    let rest = slot - body;
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            let own = if packed { l as u64 } else { 0 };
            // The remainder goes to the first page, so the shares sum to the slot.
            own + rest / n + u64::from(i == 0) * (rest % n)
        })
        .collect()
}

/// xorshift64*: the bench's randomness, reproducible from --seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }
}

/// The frames of `n` pages each that the writer makes of `objects` objects
/// (numbered in the order they were made) placed in `shard_of` shards:
/// each shard's objects in order, cut into runs of `n`, the shards taken in
/// turn. With one shard, runs of consecutive objects.
pub fn frame_plan(shard_of: &[usize], shards: usize, n: usize) -> Vec<Vec<usize>> {
    let mut lists = vec![Vec::new(); shards.max(1)];
    for (obj, &s) in shard_of.iter().enumerate() {
        lists[s].push(obj);
    }
    let mut runs: Vec<std::slice::Chunks<'_, usize>> = lists.iter().map(|l| l.chunks(n)).collect();
    let mut plan = Vec::new();
    loop {
        let before = plan.len();
        for r in &mut runs {
            if let Some(frame) = r.next() {
                plan.push(frame.to_vec());
            }
        }
        if plan.len() == before {
            return plan;
        }
    }
}

/// One frame in the file.
struct Written {
    offset: u64,
    len: usize,
    /// Pages it holds; for a joint frame, how many it decompresses to.
    pages: usize,
    /// Compressed together (joint), rather than raw or packed.
    joint: bool,
}

/// Where a page is: its frame, and its bytes in the frame's body.
#[derive(Clone, Copy, Default)]
struct Place {
    frame: u32,
    start: u32,
    len: u32,
}

/// The spilled pages and their payloads.
struct Objects<'a> {
    pages: Vec<&'a Page>,
    payloads: Vec<Vec<u8>>,
    codec: PagePayloads,
    level: i32,
}

/// Joint compressors, made once per run.
struct Joint {
    cctx: zstd::bulk::Compressor<'static>,
    dctx: zstd::bulk::Decompressor<'static>,
}

/// One pass of writes and one of gets of one form at one frame size.
struct Pass {
    write: (Duration, Duration),
    get: (Duration, Duration),
    file_bytes: u64,
    shapes: Vec<FrameShape>,
    read_bytes: u64,
    decrypted_bytes: u64,
    decompressed_bytes: u64,
}

pub fn run(args: &FramesArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = run_bench(args)?;
    if !args.json {
        print_table(&report);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

pub fn run_bench(args: &FramesArgs) -> Result<FramesReport, BenchError> {
    let data = load_corpus(&args.corpus).map_err(BenchError::Corpus)?;
    let all: Vec<&Page> = data
        .chunks_exact(PAGE_SIZE)
        .map(|c| <&Page>::try_from(c).expect("chunks_exact yields whole pages"))
        .collect();
    let (compression, level) = parse_compression(&args.compression).map_err(BenchError::Compression)?;
    let mut seen = std::collections::HashSet::new();
    let fills = all.iter().filter(|p| fill_value(p).is_some()).count();
    let pages: Vec<&Page> = all
        .iter()
        .copied()
        .filter(|p| fill_value(p).is_none() && seen.insert(&p[..]))
        .collect();
    if pages.is_empty() {
        return Err(BenchError::NothingSpills);
    }
    let codec = match compression {
        Compression::Zstd => PagePayloads::Zstd(level),
        Compression::Lz4 => PagePayloads::Lz4,
        Compression::Auto => PagePayloads::trained(&pages, level).ok_or(BenchError::NoDictionary)?,
    };
    let mut payloads = Vec::with_capacity(pages.len());
    let mut out = [0u8; COMPRESS_BOUND];
    for page in &pages {
        payloads.push(match codec.encode(page, &mut out)? {
            Some(len) => out[..len].to_vec(),
            None => page.to_vec(),
        });
    }
    let objects = Objects {
        pages,
        payloads,
        codec,
        level,
    };
    let n = objects.pages.len();

    let shards = match (args.order, args.shards) {
        (Order::Address, _) => 1,
        (Order::Writer, 0) => {
            let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
            (cpus * 2).clamp(4, 64)
        }
        (Order::Writer, s) => s,
    };
    let mut rng = Rng::new(args.seed);
    let shard_of: Vec<usize> = (0..n).map(|_| rng.below(shards)).collect();
    let get_order = rng.shuffled(n);
    // The same pages die at each share, whatever the form and size.
    let kill_order = rng.shuffled(n);
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut joint = Joint {
        cctx: page_compressor(level).map_err(BenchError::Zstd)?,
        dctx: page_decompressor().map_err(BenchError::Zstd)?,
    };

    let mut rows = Vec::new();
    let mut single = None;
    let mut sizes = args.frames.clone();
    sizes.sort_unstable();
    sizes.dedup();
    for &size in &sizes {
        let size = usize::from(size);
        let plan = frame_plan(&shard_of, shards, size);
        for form in [Form::Packed, Form::JointZstd, Form::JointLz4] {
            let mut best: Option<Pass> = None;
            for _ in 0..args.repeat {
                let mut file = FrameFile::create(&dir)?;
                let pass = one_pass(&objects, &plan, form, &mut file, &mut joint, &get_order)?;
                best = Some(match best {
                    None => pass,
                    Some(b) => Pass {
                        write: (b.write.0.min(pass.write.0), b.write.1.min(pass.write.1)),
                        get: (b.get.0.min(pass.get.0), b.get.1.min(pass.get.1)),
                        ..pass
                    },
                });
            }
            let pass = best.expect("--repeat is at least 1");
            let per_page = pass.file_bytes as f64 / n as f64;
            if form == Form::Packed && size == 1 {
                single = Some(per_page);
            }
            let fragmentation = args
                .invalidate
                .iter()
                .map(|&share| {
                    let mut dead = vec![false; n];
                    let count = ((share * n as f64).round() as usize).min(n);
                    for &p in &kill_order[..count] {
                        dead[p] = true;
                    }
                    let f = fragmentation(&pass.shapes, &dead);
                    FragRow {
                        invalidated: share,
                        live_pages: f.live_pages,
                        stranded_share: f.stranded_bytes as f64 / pass.file_bytes as f64,
                        reusable_share: (pass.file_bytes - f.held_bytes) as f64 / pass.file_bytes as f64,
                        held_bytes_per_live_page: quotient(f.held_bytes as f64, f.live_pages as f64),
                    }
                })
                .collect();
            let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
            rows.push(FrameRow {
                form,
                pages_per_frame: size,
                frames: plan.len() as u64,
                file_bytes: pass.file_bytes,
                file_bytes_per_page: per_page,
                file_vs_single: single.map(|s| per_page / s),
                write_pages_per_sec: rate(pass.write.0),
                write_pages_per_cpu_sec: rate(pass.write.1),
                get_pages_per_sec: rate(pass.get.0),
                get_pages_per_cpu_sec: rate(pass.get.1),
                read_bytes_per_get: pass.read_bytes as f64 / n as f64,
                decrypted_bytes_per_get: pass.decrypted_bytes as f64 / n as f64,
                decompressed_bytes_per_get: pass.decompressed_bytes as f64 / n as f64,
                fragmentation,
            });
        }
    }
    Ok(FramesReport {
        pages: all.len() as u64,
        spilled_pages: n as u64,
        same_filled_pages: fills as u64,
        duplicate_pages: (all.len() - fills - n) as u64,
        compression: args.compression.clone(),
        zstd_level: objects.level,
        payload_bytes: objects.payloads.iter().map(|p| p.len() as u64).sum(),
        order: args.order,
        shards,
        repeat: args.repeat,
        rows,
    })
}

fn quotient(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Writes every frame of `plan` in `form` to `file`, then gets every page
/// once in `get_order` and compares it.
fn one_pass(
    objects: &Objects<'_>,
    plan: &[Vec<usize>],
    form: Form,
    file: &mut FrameFile,
    joint: &mut Joint,
    get_order: &[usize],
) -> Result<Pass, BenchError> {
    let most = plan.iter().map(Vec::len).max().unwrap_or(1);
    let bound = zstd::zstd_safe::compress_bound(most * PAGE_SIZE)
        .max(lz4_flex::block::get_maximum_output_size(most * PAGE_SIZE));
    let mut slot = vec![0u8; FRAME_HEADER + bound];
    let mut plain = vec![0u8; most * PAGE_SIZE];
    let mut places = vec![Place::default(); objects.pages.len()];
    let mut written = Vec::with_capacity(plan.len());
    let raw_threshold = StoreConfig::default().raw_threshold;

    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    for (id, frame) in plan.iter().enumerate() {
        let k = frame.len();
        let body = &mut slot[FRAME_HEADER..];
        let (len, joined) = match form {
            Form::Packed => {
                let mut at = 0;
                for &obj in frame {
                    let p = &objects.payloads[obj];
                    body[at..at + p.len()].copy_from_slice(p);
                    places[obj] = Place {
                        frame: id as u32,
                        start: at as u32,
                        len: p.len() as u32,
                    };
                    at += p.len();
                }
                (at, false)
            }
            Form::JointZstd | Form::JointLz4 => {
                for (i, &obj) in frame.iter().enumerate() {
                    let page = <&mut Page>::try_from(&mut plain[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                        .expect("a page's bytes");
                    objects.codec.decode(&objects.payloads[obj], page)?;
                    places[obj] = Place {
                        frame: id as u32,
                        start: (i * PAGE_SIZE) as u32,
                        len: PAGE_SIZE as u32,
                    };
                }
                let src = &plain[..k * PAGE_SIZE];
                let len = if form == Form::JointZstd {
                    joint
                        .cctx
                        .compress_to_buffer(src, &mut body[..])
                        .map_err(BenchError::Zstd)?
                } else {
                    lz4_flex::block::compress_into(src, &mut body[..])
                        .map_err(|e| BenchError::Lz4(std::io::Error::other(e)))?
                };
                if len < k * raw_threshold {
                    (len, true)
                } else {
                    body[..src.len()].copy_from_slice(src);
                    (src.len(), false)
                }
            }
        };
        let offset = file.append(&mut slot[..FRAME_HEADER + len], id as u32)?;
        written.push(Written {
            offset,
            len,
            pages: k,
            joint: joined,
        });
    }
    let write = (wall.elapsed(), thread_cpu_time().saturating_sub(cpu));

    let (mut read_bytes, mut decrypted_bytes, mut decompressed_bytes) = (0u64, 0u64, 0u64);
    let mut bad = 0u64;
    let mut out = [0u8; PAGE_SIZE];
    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    for &obj in get_order {
        let at = places[obj];
        let w = &written[at.frame as usize];
        file.read(w.offset, w.len, at.frame, &mut slot)?;
        read_bytes += (FRAME_HEADER + w.len) as u64;
        decrypted_bytes += w.len as u64;
        let body = &slot[FRAME_HEADER..FRAME_HEADER + w.len];
        let (start, len) = (at.start as usize, at.len as usize);
        if !w.joint {
            let payload = &body[start..start + len];
            if form == Form::Packed && len < PAGE_SIZE {
                decompressed_bytes += PAGE_SIZE as u64;
            }
            objects.codec.decode(payload, &mut out)?;
        } else {
            let whole = &mut plain[..w.pages * PAGE_SIZE];
            let got = if form == Form::JointZstd {
                joint
                    .dctx
                    .decompress_to_buffer(body, whole)
                    .map_err(BenchError::Zstd)?
            } else {
                lz4_flex::block::decompress_into(body, whole)
                    .map_err(|e| BenchError::Lz4(std::io::Error::other(e)))?
            };
            decompressed_bytes += got as u64;
            if got != whole.len() {
                bad += 1;
                continue;
            }
            out.copy_from_slice(&whole[start..start + len]);
        }
        bad += u64::from(out != *objects.pages[obj]);
    }
    let get = (wall.elapsed(), thread_cpu_time().saturating_sub(cpu));
    if bad != 0 {
        return Err(BenchError::Mismatch {
            form,
            pages: plan.iter().map(Vec::len).max().unwrap_or(0),
            count: bad,
        });
    }

    let shapes = plan
        .iter()
        .zip(&written)
        .map(|(frame, w)| {
            let slot = frame_slot_bytes(w.len);
            let lens: Vec<usize> = frame.iter().map(|&o| places[o].len as usize).collect();
            FrameShape {
                slot,
                pages: frame.clone(),
                shares: shares(slot, &lens, form == Form::Packed),
            }
        })
        .collect();
    Ok(Pass {
        write,
        get,
        file_bytes: file.file_bytes(),
        shapes,
        read_bytes,
        decrypted_bytes,
        decompressed_bytes,
    })
}

fn print_table(r: &FramesReport) {
    println!(
        "pages {}: {} would spill ({} fills, {} duplicates); {} payload bytes ({}, level {})",
        r.pages,
        r.spilled_pages,
        r.same_filled_pages,
        r.duplicate_pages,
        r.payload_bytes,
        r.compression,
        r.zstd_level
    );
    println!(
        "order {:?} over {} shards, best of {} rounds; rates are pages/s (wall / CPU)",
        r.order, r.shards, r.repeat
    );
    let shares: Vec<String> = r
        .rows
        .first()
        .map(|row| {
            row.fragmentation
                .iter()
                .map(|f| format!("strand@{:.0}%", f.invalidated * 100.0))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{:<11} {:>3} {:>9} {:>6} {:>17} {:>17} {:>8} {:>8} {:>8}  {}",
        "form",
        "N",
        "B/page",
        "vs 1",
        "write",
        "get",
        "read B",
        "decr B",
        "dec B",
        shares.join(" ")
    );
    for row in &r.rows {
        let frag: Vec<String> = row
            .fragmentation
            .iter()
            .map(|f| format!("{:>12.1}%", f.stranded_share * 100.0))
            .collect();
        println!(
            "{:<11} {:>3} {:>9.1} {:>6.3} {:>8.0}/{:<8.0} {:>8.0}/{:<8.0} {:>8.0} {:>8.0} {:>8.0}  {}",
            format!("{:?}", row.form),
            row.pages_per_frame,
            row.file_bytes_per_page,
            row.file_vs_single.unwrap_or(f64::NAN),
            row.write_pages_per_sec,
            row.write_pages_per_cpu_sec,
            row.get_pages_per_sec,
            row.get_pages_per_cpu_sec,
            row.read_bytes_per_get,
            row.decrypted_bytes_per_get,
            row.decompressed_bytes_per_get,
            frag.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;
    use clap::Parser;

    use super::*;
    use crate::bench::BenchCommand;

    fn args(corpus: &std::path::Path, extra: &[&str]) -> FramesArgs {
        let mut argv = vec!["tmem-bench", "frames", "--corpus", corpus.to_str().unwrap()];
        argv.extend_from_slice(extra);
        match BenchCommand::parse_from(argv) {
            BenchCommand::Frames(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    /// Text pages alike enough to compress better together, a few random
    /// ones, zero pages and duplicates.
    fn corpus(pages: usize) -> Vec<u8> {
        let mut rng = Rng::new(7);
        let mut out = Vec::with_capacity(pages * PAGE_SIZE);
        for i in 0..pages {
            let mut page = [0u8; PAGE_SIZE];
            match i % 8 {
                0 => {}
                1 => page.iter_mut().for_each(|b| *b = rng.next() as u8),
                2 if i > 8 => page.copy_from_slice(&out[PAGE_SIZE * 3..PAGE_SIZE * 4]),
                _ => {
                    let line = format!("guest {} swaps page {} of pool {}; ", i % 5, i, rng.below(1000));
                    for (j, b) in page.iter_mut().enumerate() {
                        *b = line.as_bytes()[j % line.len()];
                    }
                }
            }
            out.extend_from_slice(&page);
        }
        out
    }

    #[test]
    fn the_plan_takes_each_shards_victims_in_runs() {
        let one = frame_plan(&[0; 7], 1, 3);
        assert_eq!(one, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        let two = frame_plan(&[0, 1, 0, 0, 1, 1, 1, 0], 2, 2);
        assert_eq!(two, vec![vec![0, 2], vec![1, 4], vec![3, 7], vec![5, 6]]);
        assert_eq!(frame_plan(&[1, 1], 3, 4), vec![vec![0, 1]]);
        // Every object in exactly one frame.
        let mut rng = Rng::new(3);
        let shard_of: Vec<usize> = (0..1000).map(|_| rng.below(8)).collect();
        let mut all: Vec<usize> = frame_plan(&shard_of, 8, 16).concat();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn shares_add_up_to_the_slot() {
        assert_eq!(
            shares(384, &[100, 150, 50], true),
            vec![100 + 28, 150 + 28, 50 + 28]
        );
        assert_eq!(shares(256, &[100, 120], true), vec![100 + 18, 120 + 18]);
        assert_eq!(shares(385, &[4096; 3], false), vec![129, 128, 128]);
    }

    /// Three frames: pages 0-3 in one of 1,024 bytes (a quarter each),
    /// pages 4-5 in one of 256 bytes, page 6 alone in 128.
    #[test]
    fn fragmentation_counts_dead_bytes_held_by_live_pages() {
        let frames = [
            FrameShape {
                slot: 1024,
                pages: vec![0, 1, 2, 3],
                shares: vec![256; 4],
            },
            FrameShape {
                slot: 256,
                pages: vec![4, 5],
                shares: vec![100, 156],
            },
            FrameShape {
                slot: 128,
                pages: vec![6],
                shares: vec![128],
            },
        ];
        let mut dead = [false; 7];
        assert_eq!(
            fragmentation(&frames, &dead),
            Fragmentation {
                stranded_bytes: 0,
                held_bytes: 1408,
                live_pages: 7
            }
        );
        // Pages 1 and 2 die: half the first frame is stranded; page 4 too:
        // its 100 bytes are; page 6: its frame is free.
        for p in [1, 2, 4, 6] {
            dead[p] = true;
        }
        assert_eq!(
            fragmentation(&frames, &dead),
            Fragmentation {
                stranded_bytes: 512 + 100,
                held_bytes: 1024 + 256,
                live_pages: 3
            }
        );
        // Page 5 dies too: the second frame is free, nothing of it stranded.
        dead[5] = true;
        assert_eq!(
            fragmentation(&frames, &dead),
            Fragmentation {
                stranded_bytes: 512,
                held_bytes: 1024,
                live_pages: 2
            }
        );
    }

    #[test]
    fn every_form_and_size_gets_every_page_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.raw");
        let data = corpus(300);
        std::fs::write(&path, &data).unwrap();
        for compression in ["zstd", "lz4", "auto:3"] {
            for order in ["writer", "address"] {
                let a = args(
                    &path,
                    &[
                        "--compression",
                        compression,
                        "--order",
                        order,
                        "--frames",
                        "4,1,2",
                        "--dir",
                        dir.path().to_str().unwrap(),
                        "--repeat",
                        "2",
                    ],
                );
                let r = run_bench(&a).unwrap();
                assert_eq!(r.pages, 300);
                assert_eq!(r.same_filled_pages, 38);
                assert!(r.duplicate_pages > 30, "{}", r.duplicate_pages);
                assert_eq!(r.spilled_pages + r.same_filled_pages + r.duplicate_pages, 300);
                assert_eq!(r.rows.len(), 9, "three sizes, three forms");
                let row = |form, n| {
                    r.rows
                        .iter()
                        .find(|x| x.form == form && x.pages_per_frame == n)
                        .unwrap()
                };
                let today = row(Form::Packed, 1);
                assert_eq!(today.frames, r.spilled_pages);
                assert_eq!(today.file_vs_single, Some(1.0));
                let expect = r.payload_bytes as f64 / r.spilled_pages as f64 + FRAME_HEADER as f64;
                assert!((today.read_bytes_per_get - expect).abs() < 1e-6);
                for f in &today.fragmentation {
                    assert_eq!(f.stranded_share, 0.0, "one page a slot strands nothing");
                }
                // Packing saves headers and padding, and reads more per get.
                let packed = row(Form::Packed, 4);
                assert!(packed.file_bytes < today.file_bytes);
                assert!(packed.read_bytes_per_get > 2.0 * today.read_bytes_per_get);
                assert!(packed.fragmentation.iter().all(|f| f.stranded_share > 0.0));
                // Joint frames decompress whole frames.
                let joint = row(Form::JointZstd, 4);
                assert!(joint.decompressed_bytes_per_get > 3.0 * PAGE_SIZE as f64);
                assert!(joint.file_bytes < row(Form::JointZstd, 1).file_bytes);
                for x in &r.rows {
                    assert!(x.write_pages_per_sec > 0.0 && x.get_pages_per_cpu_sec > 0.0);
                    assert_eq!(x.fragmentation.len(), 3);
                    let live: Vec<u64> = x.fragmentation.iter().map(|f| f.live_pages).collect();
                    let n = r.spilled_pages as f64;
                    let expect: Vec<u64> = [0.75, 0.5, 0.25]
                        .iter()
                        .map(|s| n - (n * (1.0 - s)).round())
                        .map(|v| v as u64)
                        .collect();
                    assert_eq!(live, expect);
                }
            }
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "frame files have no name"
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for argv in [
            &["tmem-bench", "frames", "--corpus", "x", "--frames", "0"][..],
            &["tmem-bench", "frames", "--corpus", "x", "--frames", "65"],
            &["tmem-bench", "frames", "--corpus", "x", "--invalidate", "1.5"],
            &["tmem-bench", "frames", "--corpus", "x", "--order", "random"],
        ] {
            assert!(BenchCommand::try_parse_from(argv).is_err(), "{argv:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let zeros = dir.path().join("zeros");
        std::fs::write(&zeros, vec![0u8; 4 * PAGE_SIZE]).unwrap();
        assert_matches!(run_bench(&args(&zeros, &[])), Err(BenchError::NothingSpills));
        assert_matches!(
            run_bench(&args(&zeros, &["--compression", "zstd:99"])),
            Err(BenchError::Compression(_))
        );
    }
}
