//! `tmem-bench store`: puts every page of a corpus through the page store, gets
//! every page back and verifies it, and measures plain per-page zstd on the same
//! pages, at the same level and thread count, as the yardstick; and plain
//! per-page lz4 (`lz4_flex`) as the yardstick of `--compression lz4|auto`.
//! With `--settle`, the recompressor then re-encodes every page (`auto`) and
//! the gets are timed again: hot gets are of pages just put, settled gets of
//! pages the recompressor has finished with.
//!
//! The corpus is raw concatenated 4096-byte pages (for instance a dump made by
//! `ci/make-corpus.sh`), or a zstd frame of that. Page `n` is stored at index `n`
//! of pool 0 of guest 0; with N threads, thread `t` owns the `t`-th contiguous
//! slice of the pages.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    config::{parse_compression, DedupArg},
    harness::timing::{ranges, timed_parallel, Mismatches},
    size::parse_size,
    store::{
        lz4_compress, page_compressor, CodecStats, Compression, DedupDomain, GetOutcome, GuestId, MemoryUse,
        Page, PutOutcome, SpillConfig, SpillTierBench, Store, StoreConfig, StoreError, StoreStats,
        COMPRESS_BOUND, PAGE_SIZE,
    },
};

/// Budget used when `--mem-limit` / `--spill-limit` are not given: far above any
/// corpus this tool can hold in memory, so nothing is written back or rejected.
const UNLIMITED: u64 = 1 << 40;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const POOL: u32 = 0;
const GUEST: GuestId = GuestId(0);

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Raw concatenated 4096-byte pages, or a `.zst` of that.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Threads putting and getting (each owns a contiguous range of pages).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// RAM budget of the store (e.g. 64M); below the data size, pages spill.
    #[arg(long, value_parser = parse_size)]
    pub mem_limit: Option<u64>,
    /// Spill file; a temporary one is used when --mem-limit is given without it.
    #[arg(long)]
    pub spill_file: Option<PathBuf>,
    /// Most bytes the spill file may grow to.
    #[arg(long, value_parser = parse_size)]
    pub spill_limit: Option<u64>,
    /// With --mem-limit: run the store's background writer in a thread of its
    /// own, keeping this much RAM free (as the daemon's --writeback-headroom).
    #[arg(long, value_parser = parse_size, requires = "mem_limit")]
    pub writeback_headroom: Option<u64>,
    /// zstd level, for the store and for the raw zstd yardstick.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub level: i32,
    /// The store's page compression, as the daemon's --compression: zstd (at
    /// --level), lz4, or auto or auto:LEVEL (lz4 puts, recompressed with zstd at
    /// LEVEL, default 9, and trained dictionaries).
    #[arg(long, default_value = "zstd")]
    pub compression: String,
    /// After the hot gets, run the recompressor until every page is settled,
    /// then report the settled ratio and time the gets again.
    #[arg(long)]
    pub settle: bool,
    /// Which pages may share one stored copy: off, guest or global.
    #[arg(long, value_enum, default_value_t = DedupArg::Guest)]
    pub dedup: DedupArg,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Run every phase this many times and report the best round of each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Also time the spill file alone, in one thread: each page's payload
    /// written to a fresh file (in --spill-file's directory, or the temporary
    /// directory) and read back, sealed as the store seals it and, as the
    /// baseline, in plaintext.
    #[arg(long)]
    pub spill_tier: bool,
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("cannot read corpus {path}")]
    ReadCorpus {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decompress corpus {path}")]
    DecompressCorpus {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corpus {path} is {len} bytes, not a whole number of {PAGE_SIZE}-byte pages")]
    PartialPage { path: PathBuf, len: usize },
    #[error("corpus {path} holds no page")]
    EmptyCorpus { path: PathBuf },
    #[error("zstd failed in the raw yardstick")]
    Zstd(#[source] std::io::Error),
    #[error("the store failed")]
    Store(#[source] StoreError),
    #[error("{count} pages did not read back as written (first: page {first})")]
    Mismatch { count: u64, first: u64 },
    #[error("plain zstd did not round-trip {count} pages")]
    RawMismatch { count: u64 },
    #[error("plain lz4 did not round-trip {count} pages")]
    RawLz4Mismatch { count: u64 },
    #[error("bad --compression")]
    Compression(#[source] crate::config::ConfigError),
}

impl From<StoreError> for BenchError {
    fn from(e: StoreError) -> Self {
        BenchError::Store(e)
    }
}

/// What one run measured. Rates are pages per second over the wall-clock time
/// of the whole phase, all threads together.
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    pub pages: u64,
    pub threads: u16,
    pub repeat: u32,
    pub level: i32,
    pub dedup: DedupDomain,
    pub mem_limit: u64,
    pub put_pages_per_sec: f64,
    pub get_pages_per_sec: f64,
    /// Original bytes / host RAM the store uses (after every put).
    pub ratio: Option<f64>,
    /// Original bytes / (host RAM + spill file bytes).
    pub ratio_with_spill: Option<f64>,
    /// Host RAM that is not payload chunks (index, dedup table, object records,
    /// free lists), per stored page, as the store reports it.
    pub meta_bytes_per_page: Option<f64>,
    /// The index part of that: (guest, pool, index) -> object handle.
    pub index_bytes_per_page: Option<f64>,
    /// Object records, dedup and allocator tables, per stored object.
    pub object_meta_bytes_per_object: Option<f64>,
    /// RAM payload chunks: compressed bytes plus slot and chunk-tail slack.
    pub payload_chunk_bytes: u64,
    pub raw_zstd_compress_pages_per_sec: f64,
    pub raw_zstd_decompress_pages_per_sec: f64,
    pub raw_zstd_ratio: f64,
    pub put_vs_raw: f64,
    pub get_vs_raw: f64,
    pub ratio_vs_raw: Option<f64>,
    /// Per-page zstd with the store's own frame settings (the page profile in
    /// `store::codec`), no store: separates what the codec gains over stock
    /// zstd from what the store's dedup, fills and metadata add or cost.
    pub page_zstd_ratio: f64,
    pub ratio_vs_page_zstd: Option<f64>,
    /// `--compression` as given, and the zstd level puts or recompression use.
    pub compression: String,
    pub store_zstd_level: i32,
    /// Plain per-page lz4 blocks (`lz4_flex`), same pages, same threads.
    pub raw_lz4_compress_pages_per_sec: f64,
    pub raw_lz4_decompress_pages_per_sec: f64,
    pub raw_lz4_ratio: f64,
    /// The store's own lz4 encoder alone on the same pages (no store).
    pub page_lz4_compress_pages_per_sec: f64,
    pub put_vs_raw_lz4: f64,
    /// Gets of pages just put (the same figure as `get_pages_per_sec`).
    pub hot_get_pages_per_sec: f64,
    pub hot_get_vs_raw_lz4: f64,
    /// With --settle: seconds the recompressor took to settle every page,
    /// then gets of the settled pages and the settled footprint.
    pub settle_secs: Option<f64>,
    pub settled_get_pages_per_sec: Option<f64>,
    pub settled_get_vs_raw_zstd: Option<f64>,
    pub settled_ratio: Option<f64>,
    pub settled_ratio_vs_raw: Option<f64>,
    pub settled_meta_bytes_per_page: Option<f64>,
    pub settled_compr_data_bytes: Option<u64>,
    /// Payloads by encoding and the dictionaries, at the end of the run.
    pub codecs: CodecStats,
    pub rejected_pages: u64,
    pub stored_pages: u64,
    pub same_filled_pages: u64,
    pub unique_pages: u64,
    pub dedup_hits: u64,
    pub mem_used_bytes: u64,
    pub compr_data_bytes: u64,
    pub spilled_pages: u64,
    pub spill_file_bytes: u64,
    pub spill_writes: u64,
    pub spill_reads: u64,
    /// Of `spill_writes`, those the background writer made.
    pub background_writebacks: u64,
    pub writebacks: u64,
    /// With --spill-tier: the spill file alone, sealed and in plaintext.
    pub spill_tier: Option<SpillTierReport>,
}

/// The spill file alone: the same payloads written and read back with the
/// store's AEAD and without it, in one thread.
#[derive(Debug, Clone, Serialize)]
pub struct SpillTierReport {
    pub payloads: u64,
    pub payload_bytes: u64,
    /// Slot bytes, headers and rounding included.
    pub file_bytes: u64,
    /// By the wall clock: what a caller waits.
    pub wall: SpillTierRates,
    /// By the thread's CPU time (user and system): what the work costs,
    /// steadier than the wall clock on a busy machine.
    pub cpu: SpillTierRates,
}

/// Payload bytes (10^6) per second of each pass, and sealed ÷ plain.
#[derive(Debug, Clone, Serialize)]
pub struct SpillTierRates {
    pub sealed_write_mb_per_sec: f64,
    pub sealed_read_mb_per_sec: f64,
    pub plain_write_mb_per_sec: f64,
    pub plain_read_mb_per_sec: f64,
    pub write_vs_plain: f64,
    pub read_vs_plain: f64,
}

impl SpillTierRates {
    /// From the best (write, read) times, sealed and plain, of `bytes`.
    fn new(bytes: u64, sealed: (Duration, Duration), plain: (Duration, Duration)) -> Self {
        let mb = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
        SpillTierRates {
            sealed_write_mb_per_sec: mb(sealed.0),
            sealed_read_mb_per_sec: mb(sealed.1),
            plain_write_mb_per_sec: mb(plain.0),
            plain_read_mb_per_sec: mb(plain.1),
            write_vs_plain: mb(sealed.0) / mb(plain.0),
            read_vs_plain: mb(sealed.1) / mb(plain.1),
        }
    }
}

pub fn run(args: &StoreArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = run_bench(args)?;
    if !args.json {
        print_table(&report);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Loads the corpus as whole pages, decompressing a zstd frame first.
pub fn load_corpus(path: &Path) -> Result<Vec<u8>, BenchError> {
    let raw = std::fs::read(path).map_err(|source| BenchError::ReadCorpus {
        path: path.to_owned(),
        source,
    })?;
    let data = if raw.starts_with(&ZSTD_MAGIC) {
        zstd::stream::decode_all(&raw[..]).map_err(|source| BenchError::DecompressCorpus {
            path: path.to_owned(),
            source,
        })?
    } else {
        raw
    };
    if data.len() % PAGE_SIZE != 0 {
        return Err(BenchError::PartialPage {
            path: path.to_owned(),
            len: data.len(),
        });
    }
    if data.is_empty() {
        return Err(BenchError::EmptyCorpus {
            path: path.to_owned(),
        });
    }
    Ok(data)
}

/// Removes the spill file this run made up, whatever happens to the run.
struct TempSpill(PathBuf);

impl Drop for TempSpill {
    fn drop(&mut self) {
        // Best effort: the file may never have been created.
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run_bench(args: &StoreArgs) -> Result<StoreReport, BenchError> {
    let data = load_corpus(&args.corpus)?;
    let pages: Vec<&Page> = data
        .chunks_exact(PAGE_SIZE)
        .map(|c| <&Page>::try_from(c).expect("chunks_exact yields whole pages"))
        .collect();
    let threads = usize::from(args.threads);
    let n = pages.len() as u64;

    let mut temp_spill = None;
    let spill_path = match (&args.spill_file, args.mem_limit) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(limit)) if limit < n * PAGE_SIZE as u64 => {
            let p = std::env::temp_dir().join(format!("tmem-bench-{}.spill", std::process::id()));
            temp_spill = Some(TempSpill(p.clone()));
            Some(p)
        }
        (None, _) => None,
    };
    let mem_limit = args.mem_limit.unwrap_or(UNLIMITED);
    let (compression, level) = parse_compression(&args.compression).map_err(BenchError::Compression)?;
    let store_level = match (compression, args.compression.as_str()) {
        (Compression::Zstd, "zstd") => args.level,
        _ => level,
    };
    let config = StoreConfig {
        mem_limit,
        spill: spill_path.map(|path| SpillConfig {
            path,
            limit: args.spill_limit.unwrap_or(UNLIMITED),
        }),
        zstd_level: store_level,
        compression,
        dedup: args.dedup.into(),
        writeback_headroom: args.writeback_headroom.unwrap_or(0),
        ..StoreConfig::default()
    };

    // Each round measures the yardstick and the store back to back, so a busy
    // machine slows both alike; the best round of each phase is reported.
    let mut best: Option<(RawZstd, StoreRun)> = None;
    let mut best_lz4: Option<RawLz4> = None;
    for _ in 0..args.repeat {
        let raw = raw_zstd(&pages, threads, args.level)?;
        let lz4 = raw_lz4(&pages, threads)?;
        best_lz4 = Some(match best_lz4 {
            None => lz4,
            Some(b) => RawLz4 {
                compress: b.compress.min(lz4.compress),
                decompress: b.decompress.min(lz4.decompress),
                ours: b.ours.min(lz4.ours),
                ..lz4
            },
        });
        if let Some(t) = &temp_spill {
            // Best effort: a fresh file each round; it may not exist yet.
            let _ = std::fs::remove_file(&t.0);
        }
        let run = store_run(config.clone(), &pages, threads, args.settle)?;
        best = Some(match best {
            None => (raw, run),
            Some((b_raw, b_run)) => (
                RawZstd {
                    compress: b_raw.compress.min(raw.compress),
                    decompress: b_raw.decompress.min(raw.decompress),
                    compressed_bytes: raw.compressed_bytes,
                    page_profile_bytes: raw.page_profile_bytes,
                },
                StoreRun {
                    put_time: b_run.put_time.min(run.put_time),
                    get_time: b_run.get_time.min(run.get_time),
                    settled: match (b_run.settled, run.settled) {
                        (Some(b), Some(r)) => Some(Settled {
                            time: b.time.min(r.time),
                            get_time: b.get_time.min(r.get_time),
                            ..r
                        }),
                        (_, r) => r,
                    },
                    ..run
                },
            ),
        });
    }
    drop(temp_spill);
    let (raw, run) = best.expect("--repeat is at least 1");
    let lz4 = best_lz4.expect("--repeat is at least 1");
    let spill_tier = if args.spill_tier {
        Some(spill_tier(args, &pages)?)
    } else {
        None
    };
    let mut report = build_report(
        args,
        n,
        mem_limit,
        run.put_time,
        run.get_time,
        &raw,
        &run.outcomes,
        &run.memory,
        &run.after_put,
        &run.after_get,
    );
    report.spill_tier = spill_tier;
    report.compression = args.compression.clone();
    report.store_zstd_level = store_level;
    add_lz4_and_settled(&mut report, &lz4, run.settled.as_ref());
    report.codecs = match &run.settled {
        Some(s) => (*s.stats.codecs).clone(),
        None => (*run.after_put.codecs).clone(),
    };
    Ok(report)
}

/// The lz4 yardsticks, and the settled figures against the zstd ones.
fn add_lz4_and_settled(r: &mut StoreReport, lz4: &RawLz4, settled: Option<&Settled>) {
    let n = r.pages;
    r.raw_lz4_compress_pages_per_sec = per_sec(n, lz4.compress);
    r.raw_lz4_decompress_pages_per_sec = per_sec(n, lz4.decompress);
    r.raw_lz4_ratio = (n * PAGE_SIZE as u64) as f64 / lz4.compressed_bytes as f64;
    r.page_lz4_compress_pages_per_sec = per_sec(n, lz4.ours);
    r.put_vs_raw_lz4 = r.put_pages_per_sec / r.raw_lz4_compress_pages_per_sec;
    r.hot_get_pages_per_sec = r.get_pages_per_sec;
    r.hot_get_vs_raw_lz4 = r.get_pages_per_sec / r.raw_lz4_decompress_pages_per_sec;
    if let Some(s) = settled {
        let orig = (n * PAGE_SIZE as u64) as f64;
        let get = per_sec(n, s.get_time);
        let used = s.stats.total.mem_used_bytes as f64;
        r.settle_secs = Some(s.time.as_secs_f64());
        r.settled_get_pages_per_sec = Some(get);
        r.settled_get_vs_raw_zstd = Some(get / r.raw_zstd_decompress_pages_per_sec);
        r.settled_ratio = quotient(orig, used);
        r.settled_ratio_vs_raw = r.settled_ratio.map(|v| v / r.raw_zstd_ratio);
        r.settled_compr_data_bytes = Some(s.stats.total.compr_data_bytes);
        r.settled_meta_bytes_per_page =
            quotient(s.memory.metadata_bytes as f64, s.memory.stored_pages as f64);
    }
}

/// Times the spill file alone, sealed and plain in turn in each round (so a
/// busy machine slows both alike), and keeps the best round of each pass,
/// by the wall clock and by CPU time separately.
fn spill_tier(args: &StoreArgs, pages: &[&Page]) -> Result<SpillTierReport, BenchError> {
    let dir = match &args.spill_file {
        Some(p) if p.is_dir() => p.clone(),
        Some(p) => p.parent().map_or_else(std::env::temp_dir, Path::to_path_buf),
        None => std::env::temp_dir(),
    };
    let bench = SpillTierBench::new(pages, args.level)?;
    // Best (write, read) times: [sealed, plain] by the wall clock, then by CPU.
    let mut wall = [(Duration::MAX, Duration::MAX); 2];
    let mut cpu = wall;
    let mut file_bytes = 0;
    for _ in 0..args.repeat {
        for (i, sealed) in [true, false].into_iter().enumerate() {
            let mut file = bench.file(&dir, sealed)?;
            let (write_wall, write_cpu) = timed(|| file.write_all())?;
            let (read_wall, read_cpu) = timed(|| file.read_all())?;
            file_bytes = file.file_bytes();
            wall[i] = (wall[i].0.min(write_wall), wall[i].1.min(read_wall));
            cpu[i] = (cpu[i].0.min(write_cpu), cpu[i].1.min(read_cpu));
        }
    }
    let bytes = bench.payload_bytes();
    Ok(SpillTierReport {
        payloads: bench.payloads() as u64,
        payload_bytes: bytes,
        file_bytes,
        wall: SpillTierRates::new(bytes, wall[0], wall[1]),
        cpu: SpillTierRates::new(bytes, cpu[0], cpu[1]),
    })
}

/// Runs `work` and returns how long it took by the wall clock and in this
/// thread's CPU time.
fn timed(work: impl FnOnce() -> Result<(), StoreError>) -> Result<(Duration, Duration), BenchError> {
    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    work()?;
    Ok((wall.elapsed(), thread_cpu_time().saturating_sub(cpu)))
}

/// CPU time (user and system) this thread has used so far.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    // Linux has had this clock since 2.6.12; the call cannot fail with a valid pointer.
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct StoreRun {
    put_time: Duration,
    get_time: Duration,
    outcomes: Vec<PutOutcome>,
    memory: MemoryUse,
    after_put: StoreStats,
    after_get: StoreStats,
    settled: Option<Settled>,
}

/// With --settle: the recompressor's time to finish, the footprint then,
/// and the gets of the settled pages.
struct Settled {
    time: Duration,
    get_time: Duration,
    stats: StoreStats,
    memory: MemoryUse,
}

/// One fresh store: every page put, then every page got back and checked.
/// With a writeback headroom, the store's background writer runs beside the
/// puts and gets, in a thread of its own, as in the daemon.
fn store_run(
    config: StoreConfig,
    pages: &[&Page],
    threads: usize,
    settle: bool,
) -> Result<StoreRun, BenchError> {
    let writer = config.writeback_headroom > 0;
    let store = Store::new(config)?;
    let stop = AtomicBool::new(false);
    let (run, written) = std::thread::scope(|scope| {
        let background = writer.then(|| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    store.background_writeback(Duration::from_millis(10))?;
                }
                Ok::<(), StoreError>(())
            })
        });
        let run = timed_phases(&store, pages, threads);
        stop.store(true, Ordering::Relaxed);
        let written = background.map(|t| t.join().expect("the writer thread panicked"));
        (run, written)
    });
    written.transpose()?;
    let mut run = run?;
    // After the writer stopped, so the counters hold still.
    run.after_get = store.stats();
    if settle {
        run.settled = Some(settle_and_get(&store, pages, &run.outcomes, threads)?);
    }
    Ok(run)
}

/// Runs the recompressor until nothing is left to do (a round that found
/// every page cold and settled), then times every get again.
fn settle_and_get(
    store: &Store,
    pages: &[&Page],
    outcomes: &[PutOutcome],
    threads: usize,
) -> Result<Settled, BenchError> {
    let start = Instant::now();
    while !store.recompress(1 << 20)?.idle() {}
    let time = start.elapsed();
    let stats = store.stats();
    let memory = store.memory();
    let (get_time, mismatches) = timed_store_gets(store, pages, outcomes, threads)?;
    if let Some(first) = mismatches.first {
        return Err(BenchError::Mismatch {
            count: mismatches.count,
            first,
        });
    }
    Ok(Settled {
        time,
        get_time,
        stats,
        memory,
    })
}

/// Every page put, then every page got back and checked.
fn timed_phases(store: &Store, pages: &[&Page], threads: usize) -> Result<StoreRun, BenchError> {
    let (put_time, outcomes) = timed_store_puts(store, pages, threads)?;
    let after_put = store.stats();
    let memory = store.memory();
    let (get_time, mismatches) = timed_store_gets(store, pages, &outcomes, threads)?;
    if let Some(first) = mismatches.first {
        return Err(BenchError::Mismatch {
            count: mismatches.count,
            first,
        });
    }
    Ok(StoreRun {
        put_time,
        get_time,
        outcomes,
        memory,
        after_put,
        after_get: store.stats(),
        settled: None,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    args: &StoreArgs,
    n: u64,
    mem_limit: u64,
    put_time: Duration,
    get_time: Duration,
    raw: &RawZstd,
    outcomes: &[PutOutcome],
    memory: &MemoryUse,
    after_put: &StoreStats,
    after_get: &StoreStats,
) -> StoreReport {
    let orig = (n * PAGE_SIZE as u64) as f64;
    let t = &after_put.total;
    let put_pps = per_sec(n, put_time);
    let get_pps = per_sec(n, get_time);
    let raw_c = per_sec(n, raw.compress);
    let raw_d = per_sec(n, raw.decompress);
    StoreReport {
        pages: n,
        threads: args.threads,
        repeat: args.repeat,
        level: args.level,
        dedup: args.dedup.into(),
        mem_limit,
        put_pages_per_sec: put_pps,
        get_pages_per_sec: get_pps,
        ratio: quotient(orig, t.mem_used_bytes as f64),
        ratio_with_spill: quotient(orig, (t.mem_used_bytes + t.spill_file_bytes) as f64),
        meta_bytes_per_page: quotient(memory.metadata_bytes as f64, memory.stored_pages as f64),
        index_bytes_per_page: quotient(memory.index_bytes as f64, memory.stored_pages as f64),
        object_meta_bytes_per_object: quotient(memory.object_bytes as f64, memory.objects as f64),
        payload_chunk_bytes: memory.payload_chunk_bytes,
        raw_zstd_compress_pages_per_sec: raw_c,
        raw_zstd_decompress_pages_per_sec: raw_d,
        raw_zstd_ratio: orig / raw.compressed_bytes as f64,
        put_vs_raw: put_pps / raw_c,
        get_vs_raw: get_pps / raw_d,
        ratio_vs_raw: quotient(raw.compressed_bytes as f64, t.mem_used_bytes as f64),
        page_zstd_ratio: orig / raw.page_profile_bytes as f64,
        ratio_vs_page_zstd: quotient(raw.page_profile_bytes as f64, t.mem_used_bytes as f64),
        rejected_pages: outcomes.iter().filter(|o| **o == PutOutcome::Rejected).count() as u64,
        stored_pages: t.stored_pages,
        same_filled_pages: t.same_filled_pages,
        unique_pages: t.unique_pages,
        dedup_hits: t.dedup_hits,
        mem_used_bytes: t.mem_used_bytes,
        compr_data_bytes: t.compr_data_bytes,
        spilled_pages: t.spilled_pages,
        spill_file_bytes: t.spill_file_bytes,
        spill_writes: t.spill_writes,
        // Reads happen in the get phase; the rest is counted after the puts.
        spill_reads: after_get.total.spill_reads,
        background_writebacks: after_put.background_writebacks,
        writebacks: t.writebacks,
        spill_tier: None,
        compression: String::new(),
        store_zstd_level: args.level,
        raw_lz4_compress_pages_per_sec: 0.0,
        raw_lz4_decompress_pages_per_sec: 0.0,
        raw_lz4_ratio: 0.0,
        page_lz4_compress_pages_per_sec: 0.0,
        put_vs_raw_lz4: 0.0,
        hot_get_pages_per_sec: get_pps,
        hot_get_vs_raw_lz4: 0.0,
        settle_secs: None,
        settled_get_pages_per_sec: None,
        settled_get_vs_raw_zstd: None,
        settled_ratio: None,
        settled_ratio_vs_raw: None,
        settled_meta_bytes_per_page: None,
        settled_compr_data_bytes: None,
        codecs: CodecStats::default(),
    }
}

fn quotient(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn per_sec(pages: u64, d: Duration) -> f64 {
    pages as f64 / d.as_secs_f64().max(1e-9)
}

struct RawZstd {
    compress: Duration,
    decompress: Duration,
    compressed_bytes: u64,
    /// The same pages in the store's page-profile frames (not timed).
    page_profile_bytes: u64,
}

/// Plain per-page zstd with one reused context per thread, into preallocated
/// slots: the cost of the compression alone, which the store is measured against.
fn raw_zstd(pages: &[&Page], threads: usize, level: i32) -> Result<RawZstd, BenchError> {
    let slot = zstd::zstd_safe::compress_bound(PAGE_SIZE);
    let mut arenas: Vec<(Vec<u8>, Vec<usize>)> = ranges(pages.len(), threads)
        .into_iter()
        // Filled with ones rather than zeroed so the kernel has faulted the memory
        // in before the clock starts.
        .map(|r| (vec![1u8; r.len() * slot], Vec::with_capacity(r.len())))
        .collect();

    let (compress, _) = timed_parallel(pages.len(), &mut arenas, |r, (arena, sizes)| {
        let mut cctx = zstd::bulk::Compressor::new(level).map_err(BenchError::Zstd)?;
        for (i, page) in pages[r].iter().enumerate() {
            let out = &mut arena[i * slot..(i + 1) * slot];
            sizes.push(
                cctx.compress_to_buffer(&page[..], out)
                    .map_err(BenchError::Zstd)?,
            );
        }
        Ok::<_, BenchError>(())
    })?;
    let (decompress, bad) = timed_parallel(pages.len(), &mut arenas, |r, (arena, sizes)| {
        let mut dctx = zstd::bulk::Decompressor::new().map_err(BenchError::Zstd)?;
        let mut out = [0u8; PAGE_SIZE];
        let mut bad = 0u64;
        for (i, page) in pages[r].iter().enumerate() {
            let src = &arena[i * slot..i * slot + sizes[i]];
            let len = dctx
                .decompress_to_buffer(src, &mut out[..])
                .map_err(BenchError::Zstd)?;
            // The same comparison the store's get loop does, so both pay for it.
            bad += u64::from(len != PAGE_SIZE || out != **page);
        }
        Ok::<_, BenchError>(bad)
    })?;
    let bad: u64 = bad.iter().sum();
    if bad != 0 {
        return Err(BenchError::RawMismatch { count: bad });
    }
    let compressed_bytes = arenas
        .iter()
        .flat_map(|(_, sizes)| sizes.iter())
        .map(|s| *s as u64)
        .sum();
    let mut page_ctx = page_compressor(level).map_err(BenchError::Zstd)?;
    let out = &mut arenas[0].0[..slot];
    let mut page_profile_bytes = 0;
    for page in pages {
        page_profile_bytes += page_ctx
            .compress_to_buffer(&page[..], &mut *out)
            .map_err(BenchError::Zstd)? as u64;
    }
    Ok(RawZstd {
        compress,
        decompress,
        compressed_bytes,
        page_profile_bytes,
    })
}

struct RawLz4 {
    compress: Duration,
    decompress: Duration,
    compressed_bytes: u64,
    /// The store's own encoder on the same pages (not decoded again).
    ours: Duration,
}

/// Plain per-page lz4 blocks with `lz4_flex`, into preallocated slots, as
/// [`raw_zstd`] does for zstd; then the store's own lz4 encoder alone.
fn raw_lz4(pages: &[&Page], threads: usize) -> Result<RawLz4, BenchError> {
    let slot = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);
    let mut arenas: Vec<(Vec<u8>, Vec<usize>)> = ranges(pages.len(), threads)
        .into_iter()
        .map(|r| (vec![1u8; r.len() * slot], Vec::with_capacity(r.len())))
        .collect();
    let (compress, _) = timed_parallel(pages.len(), &mut arenas, |r, (arena, sizes)| {
        for (i, page) in pages[r].iter().enumerate() {
            let out = &mut arena[i * slot..(i + 1) * slot];
            let len = lz4_flex::block::compress_into(&page[..], out)
                .map_err(|e| BenchError::Zstd(std::io::Error::other(e)))?;
            sizes.push(len);
        }
        Ok::<_, BenchError>(())
    })?;
    let (decompress, bad) = timed_parallel(pages.len(), &mut arenas, |r, (arena, sizes)| {
        let mut out = [0u8; PAGE_SIZE];
        let mut bad = 0u64;
        for (i, page) in pages[r].iter().enumerate() {
            let src = &arena[i * slot..i * slot + sizes[i]];
            let len = lz4_flex::block::decompress_into(src, &mut out[..]).unwrap_or(0);
            bad += u64::from(len != PAGE_SIZE || out != **page);
        }
        Ok::<_, BenchError>(bad)
    })?;
    let bad: u64 = bad.iter().sum();
    if bad != 0 {
        return Err(BenchError::RawLz4Mismatch { count: bad });
    }
    let compressed_bytes = arenas
        .iter()
        .flat_map(|(_, sizes)| sizes.iter())
        .map(|s| *s as u64)
        .sum();
    let (ours, _) = timed_parallel(pages.len(), &mut vec![(); threads], |r, ()| {
        let mut out = [0u8; COMPRESS_BOUND];
        let mut total = 0;
        for page in &pages[r] {
            total += lz4_compress(page, COMPRESS_BOUND, &mut out).unwrap_or(PAGE_SIZE);
        }
        Ok::<_, BenchError>(total)
    })?;
    Ok(RawLz4 {
        compress,
        decompress,
        compressed_bytes,
        ours,
    })
}

fn timed_store_puts(
    store: &Store,
    pages: &[&Page],
    threads: usize,
) -> Result<(Duration, Vec<PutOutcome>), BenchError> {
    let (time, parts) = timed_parallel(pages.len(), &mut vec![(); threads], |r, ()| {
        let mut outcomes = Vec::with_capacity(r.len());
        for i in r {
            outcomes.push(store.put(GUEST, POOL, i as u64, pages[i])?);
        }
        Ok::<_, BenchError>(outcomes)
    })?;
    Ok((time, parts.into_iter().flatten().collect()))
}

fn timed_store_gets(
    store: &Store,
    pages: &[&Page],
    outcomes: &[PutOutcome],
    threads: usize,
) -> Result<(Duration, Mismatches), BenchError> {
    let (time, parts) = timed_parallel(pages.len(), &mut vec![(); threads], |r, ()| {
        let mut out = [0u8; PAGE_SIZE];
        let mut bad = Mismatches::default();
        for i in r {
            let got = store.get(GUEST, POOL, i as u64, &mut out, false)?;
            // A rejected page must be gone; a stored one must come back exactly.
            let ok = match (outcomes[i], got) {
                (PutOutcome::Stored, GetOutcome::Found) => out == *pages[i],
                (PutOutcome::Rejected, GetOutcome::NotFound) => true,
                _ => false,
            };
            if !ok {
                bad.note(i as u64);
            }
        }
        Ok::<_, BenchError>(bad)
    })?;
    Ok((time, Mismatches::sum(parts)))
}

fn print_table(r: &StoreReport) {
    let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    println!("pages                      {}", r.pages);
    println!("threads / rounds           {} / {}", r.threads, r.repeat);
    println!("zstd level / dedup         {} / {:?}", r.level, r.dedup);
    println!(
        "put   pages/s              {:>12.0}   raw zstd compress   {:>12.0}   ({:.2}x)",
        r.put_pages_per_sec, r.raw_zstd_compress_pages_per_sec, r.put_vs_raw
    );
    println!(
        "get   pages/s              {:>12.0}   raw zstd decompress {:>12.0}   ({:.2}x)",
        r.get_pages_per_sec, r.raw_zstd_decompress_pages_per_sec, r.get_vs_raw
    );
    println!(
        "ratio                      {:>12}   raw zstd ratio      {:>12.2}",
        opt(r.ratio),
        r.raw_zstd_ratio
    );
    println!(
        "                           {:>12}   page-profile zstd   {:>12.2}   (store {}x raw, {}x page-profile)",
        "",
        r.page_zstd_ratio,
        opt(r.ratio_vs_raw),
        opt(r.ratio_vs_page_zstd)
    );
    println!("ratio incl. spill file     {:>12}", opt(r.ratio_with_spill));
    println!(
        "compression {} (zstd level {}); raw lz4 compress {:.0}/s, decompress {:.0}/s, ratio {:.2}; store's lz4 encoder {:.0}/s",
        r.compression,
        r.store_zstd_level,
        r.raw_lz4_compress_pages_per_sec,
        r.raw_lz4_decompress_pages_per_sec,
        r.raw_lz4_ratio,
        r.page_lz4_compress_pages_per_sec
    );
    println!(
        "put / raw lz4 {:.2}x   hot get / raw lz4 {:.2}x",
        r.put_vs_raw_lz4, r.hot_get_vs_raw_lz4
    );
    if let (Some(get), Some(ratio)) = (r.settled_get_pages_per_sec, r.settled_ratio) {
        println!(
            "settled in {:.2} s: get {:.0}/s ({}x raw zstd), ratio {:.2} ({}x raw zstd), meta {} B/page, compr data {:?}",
            r.settle_secs.unwrap_or(0.0),
            get,
            opt(r.settled_get_vs_raw_zstd),
            ratio,
            opt(r.settled_ratio_vs_raw),
            opt(r.settled_meta_bytes_per_page),
            r.settled_compr_data_bytes
        );
    }
    println!("codecs                     {:?}", r.codecs);
    println!(
        "meta bytes per page        {:>12}   (index {} per page, {} per object)",
        opt(r.meta_bytes_per_page),
        opt(r.index_bytes_per_page),
        opt(r.object_meta_bytes_per_object)
    );
    println!(
        "stored / rejected          {:>12} / {}",
        r.stored_pages, r.rejected_pages
    );
    println!(
        "same-filled / unique / dedup hits  {} / {} / {}",
        r.same_filled_pages, r.unique_pages, r.dedup_hits
    );
    println!(
        "mem used / payload chunks / compr data  {} / {} / {} bytes (limit {})",
        r.mem_used_bytes, r.payload_chunk_bytes, r.compr_data_bytes, r.mem_limit
    );
    println!(
        "spilled pages / file bytes {} / {}  (writes {}, reads {}, writebacks {}, in the background {})",
        r.spilled_pages,
        r.spill_file_bytes,
        r.spill_writes,
        r.spill_reads,
        r.writebacks,
        r.background_writebacks
    );
    if let Some(t) = &r.spill_tier {
        println!(
            "spill tier alone           {} payloads, {} bytes in {} file bytes",
            t.payloads, t.payload_bytes, t.file_bytes
        );
        for (clock, x) in [("wall", &t.wall), ("cpu ", &t.cpu)] {
            println!(
                "  {clock} write MB/s  sealed {:>9.0}   plain {:>9.0}   ({:.2}x)",
                x.sealed_write_mb_per_sec, x.plain_write_mb_per_sec, x.write_vs_plain
            );
            println!(
                "  {clock} read  MB/s  sealed {:>9.0}   plain {:>9.0}   ({:.2}x)",
                x.sealed_read_mb_per_sec, x.plain_read_mb_per_sec, x.read_vs_plain
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use assert_matches::assert_matches;
    use clap::Parser;

    use super::*;
    use crate::bench::BenchCommand;

    /// A small mixed corpus: zero, same-filled, text, random and repeated pages.
    fn corpus(pages: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = Vec::with_capacity(pages * PAGE_SIZE);
        for i in 0..pages {
            let mut page = [0u8; PAGE_SIZE];
            match i % 5 {
                0 => {}
                1 => page.fill(0xa5),
                2 => {
                    for (j, b) in page.iter_mut().enumerate() {
                        *b = b"the quick brown fox jumps over the lazy dog "[(j + i) % 44];
                    }
                }
                3 => page.iter_mut().for_each(|b| *b = next() as u8),
                _ => page.copy_from_slice(&out[PAGE_SIZE * 3..PAGE_SIZE * 4]),
            }
            out.extend_from_slice(&page);
        }
        out
    }

    fn args(path: &Path, extra: &[&str]) -> StoreArgs {
        let mut argv = vec!["tmem-bench", "store", "--corpus", path.to_str().unwrap()];
        argv.extend_from_slice(extra);
        match BenchCommand::parse_from(argv) {
            BenchCommand::Store(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn round_trips_a_small_corpus_with_two_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.raw");
        std::fs::write(&path, corpus(40)).unwrap();
        let r = run_bench(&args(&path, &["--threads", "2", "--json"])).unwrap();
        assert_eq!(r.pages, 40);
        assert_eq!(r.threads, 2);
        assert_eq!(r.rejected_pages, 0);
        assert_eq!(r.stored_pages, 40);
        assert!(r.raw_zstd_ratio > 1.0);
        assert!(r.put_pages_per_sec > 0.0 && r.get_pages_per_sec > 0.0);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "pages",
            "put_pages_per_sec",
            "get_pages_per_sec",
            "ratio",
            "meta_bytes_per_page",
            "raw_zstd_compress_pages_per_sec",
            "raw_zstd_decompress_pages_per_sec",
            "raw_zstd_ratio",
            "page_zstd_ratio",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn reads_a_zstd_corpus_and_spills_below_the_mem_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.raw.zst");
        let raw = corpus(64);
        let mut enc = zstd::stream::Encoder::new(std::fs::File::create(&path).unwrap(), 3).unwrap();
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap();
        let spill = dir.path().join("spill");
        let r = run_bench(&args(
            &path,
            &[
                "--mem-limit",
                "64K",
                "--spill-file",
                spill.to_str().unwrap(),
                "--spill-limit",
                "16M",
                "--level",
                "3",
                "--dedup",
                "off",
                "--repeat",
                "2",
                "--spill-tier",
            ],
        ))
        .unwrap();
        assert_eq!(r.pages, 64);
        let tier = r.spill_tier.expect("--spill-tier reports the tier");
        assert!(tier.payloads > 0 && tier.file_bytes > tier.payload_bytes);
        for rates in [&tier.wall, &tier.cpu] {
            assert!(rates.sealed_write_mb_per_sec > 0.0 && rates.plain_read_mb_per_sec > 0.0);
            assert!(rates.write_vs_plain > 0.0 && rates.read_vs_plain > 0.0);
        }
        assert_eq!(r.level, 3);
        assert_eq!(r.dedup, DedupDomain::Off);
        assert_eq!(r.mem_limit, 64 << 10);
    }

    #[test]
    fn partial_page_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.raw");
        let mut data = corpus(2);
        data.push(0);
        std::fs::write(&path, data).unwrap();
        assert_matches!(
            run_bench(&args(&path, &[])),
            Err(BenchError::PartialPage { len, .. }) if len == 2 * PAGE_SIZE + 1
        );
    }

    #[test]
    fn empty_and_missing_corpora_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, []).unwrap();
        assert_matches!(run_bench(&args(&path, &[])), Err(BenchError::EmptyCorpus { .. }));
        let missing = dir.path().join("missing");
        assert_matches!(
            run_bench(&args(&missing, &[])),
            Err(BenchError::ReadCorpus { .. })
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for argv in [
            &["tmem-bench", "store", "--corpus", "x", "--threads", "0"][..],
            &["tmem-bench", "store", "--corpus", "x", "--mem-limit", "12Q"],
            &["tmem-bench", "store", "--corpus", "x", "--dedup", "all"],
        ] {
            assert!(BenchCommand::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }
}
