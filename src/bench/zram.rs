//! `tmem-bench zram-peer`: the kernel's zram on the same pages, as the peer
//! the store is measured against.
//!
//! Hot-adds a zram device (`/sys/class/zram-control`, as root), sets its
//! algorithm and size, writes every page of the corpus to it with 4 KiB
//! `O_DIRECT` writes, reads them back and compares, reads its `mm_stat`, and
//! removes the device, whatever happened. Then runs `tmem-bench store` on the
//! same pages in one thread, so both lines come from one run.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use super::store::{load_corpus, run_bench, StoreArgs, StoreReport};
use crate::{config::DedupArg, store::PAGE_SIZE};

const CONTROL: &str = "/sys/class/zram-control";

#[derive(Debug, Clone, clap::Args)]
pub struct ZramArgs {
    /// Raw concatenated 4096-byte pages, or a `.zst` of that.
    #[arg(long)]
    pub corpus: PathBuf,
    /// zram's compression algorithm (as in its comp_algorithm file).
    #[arg(long, default_value = "lz4")]
    pub alg: String,
    /// The store's --compression for the run beside it.
    #[arg(long, default_value = "auto")]
    pub compression: String,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error)]
pub enum ZramError {
    #[error("{CONTROL} is missing: no zram module, or not root")]
    NoControl,
    #[error("zram sysfs file {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("zram-control returned {0:?}, not a device number")]
    BadId(String),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} pages read back from zram differ from what was written")]
    Mismatch(u64),
}

/// What zram did with the pages.
#[derive(Debug, Clone, Serialize)]
pub struct ZramReport {
    pub alg: String,
    pub pages: u64,
    pub put_pages_per_sec: f64,
    pub get_pages_per_sec: f64,
    /// From mm_stat (orig_data_size leaves out same-filled pages).
    pub orig_data_size: u64,
    pub compr_data_size: u64,
    pub mem_used_total: u64,
    pub same_pages: u64,
    /// Every page written over mem_used_total (zsmalloc's pages; zram's own
    /// table, about 16 bytes a page, is not in it).
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
struct PeerReport {
    zram: ZramReport,
    store: StoreReport,
    /// The store's put, hot get and settled get over zram's put and get,
    /// and its (settled) ratio over zram's (orig / mem_used_total).
    put_vs_zram: f64,
    hot_get_vs_zram: f64,
    settled_get_vs_zram: Option<f64>,
    ratio_vs_zram: Option<f64>,
}

pub fn run(args: &ZramArgs) -> Result<(), Box<dyn std::error::Error>> {
    let zram = zram_run(args)?;
    let store = run_bench(&StoreArgs {
        corpus: args.corpus.clone(),
        threads: 1,
        mem_limit: None,
        spill_file: None,
        spill_limit: None,
        writeback_headroom: None,
        level: 1,
        compression: args.compression.clone(),
        settle: true,
        dedup: DedupArg::Guest,
        json: true,
        repeat: 1,
        spill_tier: false,
    })?;
    let report = PeerReport {
        put_vs_zram: store.put_pages_per_sec / zram.put_pages_per_sec,
        hot_get_vs_zram: store.hot_get_pages_per_sec / zram.get_pages_per_sec,
        settled_get_vs_zram: store
            .settled_get_pages_per_sec
            .map(|g| g / zram.get_pages_per_sec),
        ratio_vs_zram: store.settled_ratio.or(store.ratio).map(|r| r / zram.ratio),
        zram,
        store,
    };
    if !args.json {
        println!(
            "zram {}: put {:.0}/s, get {:.0}/s, ratio {:.2} (mem_used_total)",
            report.zram.alg, report.zram.put_pages_per_sec, report.zram.get_pages_per_sec, report.zram.ratio
        );
        println!(
            "store {}: put {:.0}/s ({:.2}x zram), hot get {:.0}/s ({:.2}x), settled get {:?}x, ratio {:?}x",
            report.store.compression,
            report.store.put_pages_per_sec,
            report.put_vs_zram,
            report.store.hot_get_pages_per_sec,
            report.hot_get_vs_zram,
            report.settled_get_vs_zram,
            report.ratio_vs_zram
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn sysfs_write(path: &Path, value: &str) -> Result<(), ZramError> {
    std::fs::write(path, value).map_err(|source| ZramError::Sysfs {
        path: path.to_owned(),
        source,
    })
}

fn sysfs_read(path: &Path) -> Result<String, ZramError> {
    std::fs::read_to_string(path).map_err(|source| ZramError::Sysfs {
        path: path.to_owned(),
        source,
    })
}

/// A hot-added zram device, reset and removed when dropped.
struct Device {
    id: u32,
}

impl Device {
    fn add() -> Result<Device, ZramError> {
        let control = Path::new(CONTROL);
        if !control.join("hot_add").exists() {
            return Err(ZramError::NoControl);
        }
        let text = sysfs_read(&control.join("hot_add"))?;
        let id = text.trim().parse().map_err(|_| ZramError::BadId(text.clone()))?;
        Ok(Device { id })
    }

    fn sys(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{name}", self.id))
    }

    fn dev(&self) -> PathBuf {
        PathBuf::from(format!("/dev/zram{}", self.id))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Best effort: a device left behind is visible in /sys/block.
        let _ = std::fs::write(self.sys("reset"), "1");
        let _ = std::fs::write(Path::new(CONTROL).join("hot_remove"), self.id.to_string());
    }
}

/// One page-aligned page for O_DIRECT, cut from a buffer twice its size.
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let skip = (PAGE_SIZE - buf.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE;
    &mut buf[skip..skip + PAGE_SIZE]
}

fn zram_run(args: &ZramArgs) -> Result<ZramReport, Box<dyn std::error::Error>> {
    let data = load_corpus(&args.corpus)?;
    let n = (data.len() / PAGE_SIZE) as u64;
    let device = Device::add()?;
    sysfs_write(&device.sys("comp_algorithm"), &args.alg)?;
    sysfs_write(&device.sys("disksize"), &(data.len() + (1 << 20)).to_string())?;
    let path = device.dev();
    let io_err = |source| ZramError::Io {
        path: path.clone(),
        source,
    };
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(io_err)?;
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    let page = aligned(&mut buf);
    let mut put = Duration::ZERO;
    for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
        page.copy_from_slice(chunk);
        let start = Instant::now();
        file.write_all_at(page, (i * PAGE_SIZE) as u64).map_err(io_err)?;
        put += start.elapsed();
    }
    let mut get = Duration::ZERO;
    let mut bad = 0;
    for (i, chunk) in data.chunks_exact(PAGE_SIZE).enumerate() {
        let start = Instant::now();
        file.read_exact_at(page, (i * PAGE_SIZE) as u64).map_err(io_err)?;
        get += start.elapsed();
        bad += u64::from(page != chunk);
    }
    if bad > 0 {
        return Err(ZramError::Mismatch(bad).into());
    }
    let mm = sysfs_read(&device.sys("mm_stat"))?;
    let f: Vec<u64> = mm.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    drop(file);
    drop(device);
    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(ZramReport {
        alg: args.alg.clone(),
        pages: n,
        put_pages_per_sec: rate(put),
        get_pages_per_sec: rate(get),
        orig_data_size: field(0),
        compr_data_size: field(1),
        mem_used_total: field(2),
        same_pages: field(5),
        ratio: (n * PAGE_SIZE as u64) as f64 / field(2).max(1) as f64,
    })
}
