//! `tmem-bench device`: drives a real `vhost-user-tmem` daemon over its
//! vhost-user socket with the in-process frontend, the way a VMM would, and
//! measures the page store alone on the same pages in the same run.
//!
//! Phases, in order:
//! 1. device throughput: N threads (one per queue), each keeping D requests in
//!    flight, PUT every page of the corpus, then GET and verify every page;
//! 2. device latency at depth 1 on queue 0: the round trip (submit, kick, wait
//!    for the used entry) of each PUT and GET of a sample of pages;
//! 3. store-only: the same pages through [`Store`] in-process, same config, same
//!    thread count, put then get and verify; its per-page time is the wall time of
//!    a phase times the thread count over the page count (time one call takes).
//!
//! The device-path targets (throughput at depth, polling latency at depth 1)
//! are evaluated on those figures and printed.
//!
//! With `--blk` the daemon serves a second device, a virtio-blk disk as large
//! as the corpus, and each round also writes every page to it as a 4 KiB
//! block and reads every block back (same queues, same depth): its throughput
//! is set against the tmem device's of the same round (target: within 10%).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::{
    bench::store::{load_corpus, BenchError as CorpusError},
    config::DedupArg,
    control::{ClientError, ControlClient},
    device::blk_request::{MAX_RANGES, MAX_RANGE_SECTORS},
    harness::{
        daemon::{DaemonProcess, DaemonSpec, HarnessError},
        frontend::{self, header, FrontendError, Virtqueue, Vmm, VmmConfig, WaitMode},
        timing::{timed_parallel, Latency, Mismatches},
    },
    protocol::{Op, Status, PAGE_SIZE},
    size::parse_size,
    store::{
        DedupDomain, GetOutcome, GuestId, Page, Reservation, SpillConfig, Store, StoreConfig, StoreError,
    },
};

const SECTORS_PER_PAGE: u64 = PAGE_SIZE as u64 / 512;

/// Far above any corpus this tool can hold: nothing is rejected or spilled.
const UNLIMITED: u64 = 1 << 40;
const POOL: u32 = 0;
/// Most pages whose round trip is timed one by one.
const LATENCY_SAMPLE: usize = 20_000;
const DAEMON_NAME: &str = "vhost-user-tmem";

#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Raw concatenated 4096-byte pages, or a `.zst` of that.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Virtqueues, each driven by its own thread (the daemon gets --queues N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Requests each thread keeps in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub depth: u16,
    /// Passed to the daemon: how long a worker busy-polls before sleeping.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// How long the frontend busy-polls the used ring before sleeping on the call
    /// eventfd. 0 (the default) sleeps at once: on a host with fewer free cores
    /// than spinning threads, a spinning frontend only takes CPU from the daemon.
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// RAM budget for the daemon's store and the store-only run (e.g. 4G).
    #[arg(long, value_parser = parse_size)]
    pub mem_limit: Option<u64>,
    /// Give the daemon and the store-only run a spill file of this size (in a
    /// temporary directory), so a --mem-limit below the corpus measures writeback.
    #[arg(long, value_parser = parse_size, requires = "mem_limit")]
    pub spill_limit: Option<u64>,
    /// Passed to the daemon as --writeback-headroom (SIZE, auto or 0). The
    /// store-only run has no background writer.
    #[arg(long, requires = "spill_limit")]
    pub writeback_headroom: Option<String>,
    /// zstd level, for the daemon (--compression zstd:LEVEL) and the store run.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub level: i32,
    /// Dedup domain: off, guest or global.
    #[arg(long, value_enum, default_value_t = DedupArg::Guest)]
    pub dedup: DedupArg,
    /// The daemon binary; default: `vhost-user-tmem` beside this program.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Rounds of (device put+get, store-only put+get), alternating so both see the
    /// same machine load; the best round of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub repeat: u16,
    /// Also measure a blk device (`--socket PATH,blk=SIZE`) on the same
    /// corpus, against the tmem device.
    #[arg(long)]
    pub blk: bool,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error)]
pub enum DeviceBenchError {
    #[error("loading the corpus")]
    Corpus(#[source] CorpusError),
    #[error(
        "cannot find the daemon binary at {0} (build it, e.g. `cargo build --release`, or pass --daemon)"
    )]
    NoDaemon(PathBuf),
    #[error("cannot locate this program")]
    CurrentExe(#[source] std::io::Error),
    #[error("temporary directory")]
    TempDir(#[source] std::io::Error),
    #[error("starting the daemon")]
    Daemon(#[source] HarnessError),
    #[error("frontend")]
    Frontend(#[source] FrontendError),
    #[error("the store")]
    Store(#[source] StoreError),
    #[error("{what}: page {index} came back {status:?} with used length {used_len}")]
    BadReply {
        what: &'static str,
        index: u64,
        status: Option<Status>,
        used_len: u32,
    },
    #[error("{count} pages did not read back as written (first: page {first}) via {path}")]
    Mismatch {
        path: &'static str,
        count: u64,
        first: u64,
    },
    #[error("asking the daemon for its stats")]
    Control(#[source] ClientError),
}

impl From<FrontendError> for DeviceBenchError {
    fn from(e: FrontendError) -> Self {
        DeviceBenchError::Frontend(e)
    }
}

impl From<StoreError> for DeviceBenchError {
    fn from(e: StoreError) -> Self {
        DeviceBenchError::Store(e)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub pages: u64,
    pub queues: u16,
    pub depth: u16,
    pub poll_us: Option<u64>,
    pub spin_us: u64,
    pub level: i32,
    pub dedup: String,
    pub device_put_pages_per_sec: f64,
    pub device_get_pages_per_sec: f64,
    /// Best of this many rounds.
    pub repeat: u16,
    /// Round trips at depth 1 on one queue.
    pub put_latency: Latency,
    pub get_latency: Latency,
    /// The same pages, one store call at a time, in-process.
    pub store_put_latency: Latency,
    pub store_get_latency: Latency,
    pub store_put_pages_per_sec: f64,
    pub store_get_pages_per_sec: f64,
    /// Time one store call takes, in microseconds (phase time x threads / pages).
    pub store_put_us_per_page: f64,
    pub store_get_us_per_page: f64,
    pub put_ratio: f64,
    pub get_ratio: f64,
    /// depth >= 32: device throughput >= 0.8 x store-only (put and get). `None`
    /// when the run's depth does not apply.
    pub target_throughput_met: Option<bool>,
    /// depth 1 with polling: p50 round trip <= store per-page time + 10 us.
    pub target_latency_met: Option<bool>,
    /// The daemon's own counters over the whole run (every round): objects
    /// written to its spill file, the part its background writer wrote, and
    /// rejected puts.
    pub daemon_spill_writes: u64,
    pub daemon_background_writebacks: u64,
    pub daemon_failed_stores: u64,
    /// With `--blk`: the blk device's writes and reads of every page as a
    /// 4 KiB block (best round), their depth-1 round trips, and the ratio to
    /// the tmem device's PUT and GET throughput.
    pub blk: Option<BlkReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlkReport {
    pub write_pages_per_sec: f64,
    pub read_pages_per_sec: f64,
    pub write_latency: Latency,
    pub read_latency: Latency,
    pub write_ratio_to_tmem_put: f64,
    pub read_ratio_to_tmem_get: f64,
    /// depth >= 32: both ratios >= 0.9.
    pub target_met: Option<bool>,
}

pub fn run(args: &DeviceArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = run_bench(args)?;
    if !args.json {
        print_table(&report);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

pub fn run_bench(args: &DeviceArgs) -> Result<DeviceReport, DeviceBenchError> {
    let dedup = DedupDomain::from(args.dedup);
    let data = load_corpus(&args.corpus).map_err(DeviceBenchError::Corpus)?;
    let pages: Vec<&Page> = data
        .chunks_exact(PAGE_SIZE)
        .map(|c| <&Page>::try_from(c).expect("chunks_exact yields whole pages"))
        .collect();
    let n = pages.len() as u64;
    let mem_limit = args.mem_limit.unwrap_or(UNLIMITED);
    let spin_us = args.spin_us.unwrap_or(0);

    let store_dir = tempfile::Builder::new()
        .prefix("tmem-bench-")
        .tempdir()
        .map_err(DeviceBenchError::TempDir)?;
    let store_config = StoreConfig {
        mem_limit,
        spill: args.spill_limit.map(|limit| SpillConfig {
            path: store_dir.path().join("spill"),
            limit,
        }),
        zstd_level: args.level,
        dedup,
        ..StoreConfig::default()
    };
    let threads = usize::from(args.queues);
    let mut daemon = start_daemon(args, mem_limit, n)?;
    let mut session = Session::open(args, &daemon, spin_us, Device::Tmem)?;
    let mut disk = match args.blk {
        true => Some(Session::open(args, &daemon, spin_us, Device::Blk)?),
        false => None,
    };
    let mut put_time = Duration::MAX;
    let mut get_time = Duration::MAX;
    let mut blk_times = (Duration::MAX, Duration::MAX);
    let mut store_put = Duration::MAX;
    let mut store_get = Duration::MAX;
    for round in 0..args.repeat {
        if round > 0 {
            // Each round starts from an empty device, like the store-only run.
            session.clear()?;
            if let Some(disk) = &mut disk {
                disk.clear()?;
            }
        }
        let (p, g) = session.throughput(&pages)?;
        put_time = put_time.min(p);
        get_time = get_time.min(g);
        if let Some(disk) = &mut disk {
            let (w, r) = disk.throughput(&pages)?;
            blk_times = (blk_times.0.min(w), blk_times.1.min(r));
        }
        let store = Store::new(store_config.clone())?;
        store_put = store_put.min(store_puts(&store, &pages, threads)?);
        store_get = store_get.min(store_gets(&store, &pages, threads)?);
    }
    let sample = latency_sample(pages.len());
    let (put_lat, get_lat) = session.latency(&pages, &sample)?;
    let blk_lat = match &mut disk {
        Some(disk) => Some(disk.latency(&pages, &sample)?),
        None => None,
    };
    let daemon_stats = ControlClient::connect(daemon.control().unwrap_or(std::path::Path::new("")))
        .and_then(|mut c| c.stats())
        .map_err(DeviceBenchError::Control)?
        .store;
    session.close();
    if let Some(disk) = disk {
        disk.close();
    }
    daemon.terminate(Duration::from_secs(10));
    // The same sample, one call at a time, straight into a store.
    let store = Store::new(store_config)?;
    let (store_put_lat, store_get_lat) = store_latency(&store, &pages, &sample)?;
    drop(store);

    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let per_page_us = |d: Duration| d.as_secs_f64() * 1e6 * threads as f64 / n as f64;
    let device_put = rate(put_time);
    let device_get = rate(get_time);
    let store_put_rate = rate(store_put);
    let store_get_rate = rate(store_get);
    let put_ratio = device_put / store_put_rate;
    let get_ratio = device_get / store_get_rate;
    let store_put_us = per_page_us(store_put);
    let store_get_us = per_page_us(store_get);
    let target_throughput_met = (args.depth >= 32).then_some(put_ratio >= 0.8 && get_ratio >= 0.8);
    let polling = args.poll_us.unwrap_or(0) > 0;
    let target_latency_met = (args.depth == 1 && polling)
        .then_some(put_lat.p50_us <= store_put_us + 10.0 && get_lat.p50_us <= store_get_us + 10.0);
    let blk = blk_lat.map(|(write_latency, read_latency)| {
        let (write, read) = (rate(blk_times.0), rate(blk_times.1));
        let (w, r) = (write / device_put, read / device_get);
        BlkReport {
            write_pages_per_sec: write,
            read_pages_per_sec: read,
            write_latency,
            read_latency,
            write_ratio_to_tmem_put: w,
            read_ratio_to_tmem_get: r,
            target_met: (args.depth >= 32).then_some(w >= 0.9 && r >= 0.9),
        }
    });
    Ok(DeviceReport {
        pages: n,
        queues: args.queues,
        depth: args.depth,
        poll_us: args.poll_us,
        spin_us,
        level: args.level,
        dedup: args.dedup.as_str().to_owned(),
        device_put_pages_per_sec: device_put,
        device_get_pages_per_sec: device_get,
        put_latency: put_lat,
        get_latency: get_lat,
        store_put_latency: store_put_lat,
        store_get_latency: store_get_lat,
        repeat: args.repeat,
        store_put_pages_per_sec: store_put_rate,
        store_get_pages_per_sec: store_get_rate,
        store_put_us_per_page: store_put_us,
        store_get_us_per_page: store_get_us,
        put_ratio,
        get_ratio,
        target_throughput_met,
        target_latency_met,
        daemon_spill_writes: daemon_stats.total.spill_writes,
        daemon_background_writebacks: daemon_stats.background_writebacks,
        daemon_failed_stores: daemon_stats.total.failed_stores,
        blk,
    })
}

/// The daemon, on a socket in a temporary directory of its own; with
/// `--blk`, a second socket serves a disk of `pages` pages, whose room the
/// spill file must hold on top of `--spill-limit`.
fn start_daemon(args: &DeviceArgs, mem_limit: u64, pages: u64) -> Result<DaemonProcess, DeviceBenchError> {
    let binary = match &args.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(DeviceBenchError::CurrentExe)?
            .with_file_name(DAEMON_NAME),
    };
    if !binary.is_file() {
        return Err(DeviceBenchError::NoDaemon(binary));
    }
    let mut spec = DaemonSpec::new(binary).args([
        "--queues".to_owned(),
        args.queues.to_string(),
        "--mem-limit".into(),
        mem_limit.to_string(),
        "--compression".into(),
        format!("zstd:{}", args.level),
        "--dedup".into(),
        args.dedup.as_str().into(),
    ]);
    let reserve = match args.blk {
        true => Reservation {
            guest: GuestId(1),
            pages: pages.max(1),
        }
        .spill_bytes(),
        false => 0,
    };
    if args.blk {
        spec.vms = 2;
        spec.socket_options = vec![String::new(), format!("blk={}", pages.max(1) * PAGE_SIZE as u64)];
    }
    if let Some(limit) = args.spill_limit.or(args.blk.then_some(0)) {
        let limit = limit + reserve;
        spec = spec.args([
            "--spill-file".to_owned(),
            "{dir}/spill".into(),
            "--spill-limit".into(),
            limit.to_string(),
        ]);
    }
    if let Some(headroom) = &args.writeback_headroom {
        spec = spec.args(["--writeback-headroom", headroom.as_str()]);
    }
    if let Some(us) = args.poll_us {
        spec = spec.args(["--poll-us".to_owned(), us.to_string()]);
    }
    // The daemon's log would interleave with the figures: it stays in the
    // daemon's directory and is shown only if the daemon dies.
    spec.log_filter = "info".into();
    DaemonProcess::start(&spec).map_err(DeviceBenchError::Daemon)
}

/// Which of the daemon's devices a session drives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Device {
    /// Socket 0: the tmem device.
    Tmem,
    /// Socket 1 (with `--blk`): the disk, one page per 4 KiB block.
    Blk,
}

/// The frontend's connection to the daemon, with one queue per thread.
struct Session {
    vmm: Vmm,
    queues: Vec<Virtqueue>,
    depth: usize,
    indirect: bool,
    device: Device,
    pages: u64,
}

impl Session {
    fn open(
        args: &DeviceArgs,
        daemon: &DaemonProcess,
        spin_us: u64,
        device: Device,
    ) -> Result<Self, DeviceBenchError> {
        let depth = usize::from(args.depth);
        // Each request is header, page and status in three descriptors, as a Linux
        // driver lays it out; the ring must hold `depth` of them, else they go
        // indirect (one ring descriptor each).
        let direct = depth * 3 <= 1024;
        let queue_size = if direct { depth * 3 } else { depth }
            .next_power_of_two()
            .clamp(64, 1024) as u16;
        let wait = if spin_us > 0 {
            WaitMode::Spin(Duration::from_micros(spin_us))
        } else {
            WaitMode::Interrupt
        };
        let cfg = VmmConfig {
            queues: usize::from(args.queues),
            queue_size,
            event_idx: true,
            indirect: true,
            wait,
            honour_no_notify: true,
            timeout: Duration::from_secs(30),
            reset_device: true,
        };
        let socket = if device == Device::Blk { 1 } else { 0 };
        let mut vmm = Vmm::connect(daemon.socket(socket), cfg)?;
        let mut queues = vmm.start()?;
        for q in &mut queues {
            // Every GET is verified against the corpus; no need to pre-fill.
            q.set_poison(false);
        }
        Ok(Session {
            vmm,
            queues,
            depth,
            indirect: !direct,
            device,
            pages: 0,
        })
    }

    /// Wall time to PUT every page, then to GET and verify every page.
    fn throughput(&mut self, pages: &[&Page]) -> Result<(Duration, Duration), DeviceBenchError> {
        let (depth, indirect) = (self.depth, self.indirect);
        self.pages = pages.len() as u64;
        if self.device == Device::Blk {
            let (write, _) = timed_parallel(pages.len(), &mut self.queues, |range, q| {
                pipelined_blk(q, pages, range, depth, VIRTIO_BLK_T_OUT)
            })?;
            let (read, _) = timed_parallel(pages.len(), &mut self.queues, |range, q| {
                pipelined_blk(q, pages, range, depth, VIRTIO_BLK_T_IN)
            })?;
            return Ok((write, read));
        }
        let (put, _) = timed_parallel(pages.len(), &mut self.queues, |range, q| {
            pipelined(q, pages, range, depth, indirect, Op::Put)
        })?;
        let (get, _) = timed_parallel(pages.len(), &mut self.queues, |range, q| {
            pipelined(q, pages, range, depth, indirect, Op::Get)
        })?;
        Ok((put, get))
    }

    fn clear(&mut self) -> Result<(), DeviceBenchError> {
        if self.device == Device::Blk {
            // The disk's blocks go with DISCARDs of the most ranges allowed.
            let per_range = u64::from(MAX_RANGE_SECTORS);
            let sectors = self.pages * SECTORS_PER_PAGE;
            let mut start = 0;
            while start < sectors {
                let mut ranges = Vec::new();
                while start < sectors && ranges.len() < MAX_RANGES * 16 {
                    let n = per_range.min(sectors - start);
                    ranges.extend(frontend::blk_range(start, n as u32, 0));
                    start += n;
                }
                let c = self.queues[0].blk(VIRTIO_BLK_T_DISCARD, 0, &ranges, 0)?;
                blk_check(&c, "discard", start, 1)?;
            }
            return Ok(());
        }
        let r = self.queues[0].invalidate_pool(POOL)?;
        check(&r, "invalidate pool", 0, Status::Ok, 1)
    }

    /// Round trip of each PUT and GET of the sample, at depth 1.
    fn latency(&mut self, pages: &[&Page], sample: &[usize]) -> Result<(Latency, Latency), DeviceBenchError> {
        // Start from an empty device, as the store-only latency pass starts from an
        // empty store: a PUT then stores, rather than replaces, a page.
        self.clear()?;
        if self.device == Device::Blk {
            return self.blk_latency(pages, sample);
        }
        let indirect = self.indirect;
        let q = &mut self.queues[0];
        let mut put_ns = Vec::with_capacity(sample.len());
        let mut get_ns = Vec::with_capacity(sample.len());
        for &i in sample {
            let h = header(Op::Put, 0, POOL, i as u64, 0);
            let t = Instant::now();
            q.submit_op(&h, Some(&pages[i][..]), indirect)?;
            let c = q.complete()?;
            put_ns.push(t.elapsed().as_nanos() as u64);
            check(&frontend::Reply::from(c), "put", i as u64, Status::Ok, 1)?;
        }
        for &i in sample {
            let h = header(Op::Get, 0, POOL, i as u64, 0);
            let t = Instant::now();
            q.submit_op(&h, None, indirect)?;
            let c = q.complete()?;
            get_ns.push(t.elapsed().as_nanos() as u64);
            let r = frontend::Reply::from(c);
            check(&r, "get", i as u64, Status::Ok, 4097)?;
            if r.page[..] != pages[i][..] {
                return Err(DeviceBenchError::Mismatch {
                    path: "device (latency pass)",
                    count: 1,
                    first: i as u64,
                });
            }
        }
        Ok((Latency::of_ns(put_ns), Latency::of_ns(get_ns)))
    }

    /// Round trip of each block write and read of the sample, at depth 1.
    fn blk_latency(
        &mut self,
        pages: &[&Page],
        sample: &[usize],
    ) -> Result<(Latency, Latency), DeviceBenchError> {
        let q = &mut self.queues[0];
        let mut write_ns = Vec::with_capacity(sample.len());
        let mut read_ns = Vec::with_capacity(sample.len());
        for &i in sample {
            let sector = i as u64 * SECTORS_PER_PAGE;
            let t = Instant::now();
            let c = q.blk(VIRTIO_BLK_T_OUT, sector, &pages[i][..], 0)?;
            write_ns.push(t.elapsed().as_nanos() as u64);
            blk_check(&c, "write", i as u64, 1)?;
        }
        for &i in sample {
            let sector = i as u64 * SECTORS_PER_PAGE;
            let t = Instant::now();
            let c = q.blk(VIRTIO_BLK_T_IN, sector, &[], PAGE_SIZE as u32)?;
            read_ns.push(t.elapsed().as_nanos() as u64);
            blk_check(&c, "read", i as u64, PAGE_SIZE as u32 + 1)?;
            if c.payload() != &pages[i][..] {
                return Err(DeviceBenchError::Mismatch {
                    path: "blk device (latency pass)",
                    count: 1,
                    first: i as u64,
                });
            }
        }
        Ok((Latency::of_ns(write_ns), Latency::of_ns(read_ns)))
    }

    fn close(self) {
        drop(self.queues);
        self.vmm.disconnect();
    }
}

/// A blk request's answer: OK with `used_len` bytes written.
fn blk_check(
    c: &frontend::Completion,
    what: &'static str,
    index: u64,
    used_len: u32,
) -> Result<(), DeviceBenchError> {
    if c.status_byte() == Some(0) && c.used_len == used_len {
        Ok(())
    } else {
        Err(DeviceBenchError::BadReply {
            what,
            index,
            status: c.status_byte().and_then(|b| Status::try_from(b).ok()),
            used_len: c.used_len,
        })
    }
}

/// Writes (OUT) or reads and verifies (IN) the pages of `range` as blocks,
/// keeping `depth` requests in flight.
fn pipelined_blk(
    q: &mut Virtqueue,
    pages: &[&Page],
    range: std::ops::Range<usize>,
    depth: usize,
    kind: u32,
) -> Result<(), DeviceBenchError> {
    let write = kind == VIRTIO_BLK_T_OUT;
    let mut first_token = None;
    let mut next = range.start;
    let mut done = range.start;
    let mut bad = Mismatches::default();
    while done < range.end {
        while next < range.end && q.in_flight() < depth {
            let sector = next as u64 * SECTORS_PER_PAGE;
            let token = if write {
                q.submit_blk(kind, sector, &pages[next][..], 0)?
            } else {
                q.submit_blk(kind, sector, &[], PAGE_SIZE as u32)?
            };
            first_token.get_or_insert(token - (next - range.start) as u64);
            next += 1;
        }
        let c = q.complete()?;
        let index = range.start + (c.token - first_token.unwrap_or(0)) as usize;
        let used = if write { 1 } else { PAGE_SIZE as u32 + 1 };
        blk_check(&c, if write { "write" } else { "read" }, index as u64, used)?;
        if !write && pages.get(index).map_or(true, |p| c.payload() != &p[..]) {
            bad.note(index as u64);
        }
        done += 1;
    }
    mismatch_error("blk device", bad)
}

/// Up to LATENCY_SAMPLE page numbers spread evenly over the corpus.
fn latency_sample(n: usize) -> Vec<usize> {
    let k = n.min(LATENCY_SAMPLE);
    (0..k).map(|j| j * n / k.max(1)).collect()
}

fn store_latency(
    store: &Store,
    pages: &[&Page],
    sample: &[usize],
) -> Result<(Latency, Latency), DeviceBenchError> {
    let mut put_ns = Vec::with_capacity(sample.len());
    let mut get_ns = Vec::with_capacity(sample.len());
    for &i in sample {
        let t = Instant::now();
        store.put(GuestId(0), POOL, i as u64, pages[i])?;
        put_ns.push(t.elapsed().as_nanos() as u64);
    }
    let mut out = [0u8; PAGE_SIZE];
    for &i in sample {
        let t = Instant::now();
        let found = store.get(GuestId(0), POOL, i as u64, &mut out, false)?;
        get_ns.push(t.elapsed().as_nanos() as u64);
        if found != GetOutcome::Found || out[..] != pages[i][..] {
            return Err(DeviceBenchError::Mismatch {
                path: "store (latency pass)",
                count: 1,
                first: i as u64,
            });
        }
    }
    Ok((Latency::of_ns(put_ns), Latency::of_ns(get_ns)))
}

fn check(
    r: &frontend::Reply,
    what: &'static str,
    index: u64,
    status: Status,
    used_len: u32,
) -> Result<(), DeviceBenchError> {
    if r.status == Some(status) && r.used_len == used_len {
        Ok(())
    } else {
        Err(DeviceBenchError::BadReply {
            what,
            index,
            status: r.status,
            used_len: r.used_len,
        })
    }
}

/// PUTs or GETs (and verifies) the pages of `range` keeping `depth` in flight.
fn pipelined(
    q: &mut Virtqueue,
    pages: &[&Page],
    range: std::ops::Range<usize>,
    depth: usize,
    indirect: bool,
    op: Op,
) -> Result<(), DeviceBenchError> {
    // Tokens are handed out in submission order, so a token maps to a page.
    let mut first_token = None;
    let mut next = range.start;
    let mut done = range.start;
    let mut bad = Mismatches::default();
    while done < range.end {
        while next < range.end && q.in_flight() < depth {
            let token = match op {
                Op::Put => q.submit_op(
                    &header(Op::Put, 0, POOL, next as u64, 0),
                    Some(&pages[next][..]),
                    indirect,
                )?,
                _ => q.submit_op(&header(Op::Get, 0, POOL, next as u64, 0), None, indirect)?,
            };
            first_token.get_or_insert(token - (next - range.start) as u64);
            next += 1;
        }
        let c = q.complete()?;
        let index = range.start + (c.token - first_token.unwrap_or(0)) as usize;
        let (status, used) = match op {
            Op::Put => (Status::Ok, 1),
            _ => (Status::Ok, 4097),
        };
        if c.status() != Some(status) || c.used_len != used {
            return Err(DeviceBenchError::BadReply {
                what: if op == Op::Put { "put" } else { "get" },
                index: index as u64,
                status: c.status(),
                used_len: c.used_len,
            });
        }
        if op == Op::Get && pages.get(index).map_or(true, |p| c.payload() != &p[..]) {
            bad.note(index as u64);
        }
        done += 1;
    }
    mismatch_error("device", bad)
}

fn mismatch_error(path: &'static str, bad: Mismatches) -> Result<(), DeviceBenchError> {
    match bad.first {
        Some(first) => Err(DeviceBenchError::Mismatch {
            path,
            count: bad.count,
            first,
        }),
        None => Ok(()),
    }
}

fn store_puts(store: &Store, pages: &[&Page], threads: usize) -> Result<Duration, DeviceBenchError> {
    let (time, _) = timed_parallel(pages.len(), &mut vec![(); threads], |range, ()| {
        for i in range {
            store.put(GuestId(0), POOL, i as u64, pages[i])?;
        }
        Ok::<_, DeviceBenchError>(())
    })?;
    Ok(time)
}

fn store_gets(store: &Store, pages: &[&Page], threads: usize) -> Result<Duration, DeviceBenchError> {
    let (time, parts) = timed_parallel(pages.len(), &mut vec![(); threads], |range, ()| {
        let mut out = [0u8; PAGE_SIZE];
        let mut bad = Mismatches::default();
        for i in range {
            let found = store.get(GuestId(0), POOL, i as u64, &mut out, false)?;
            if found != GetOutcome::Found || out[..] != pages[i][..] {
                bad.note(i as u64);
            }
        }
        Ok::<_, DeviceBenchError>(bad)
    })?;
    mismatch_error("store", Mismatches::sum(parts)).map(|()| time)
}

fn print_table(r: &DeviceReport) {
    let yes_no = |v: Option<bool>| match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a at this depth/polling",
    };
    println!(
        "corpus: {} pages, {} queue(s), depth {}, daemon --poll-us {}, frontend spin {} us, zstd {}, dedup {}, best of {}",
        r.pages,
        r.queues,
        r.depth,
        r.poll_us.map_or("default".into(), |u| u.to_string()),
        r.spin_us,
        r.level,
        r.dedup,
        r.repeat
    );
    println!("{:<22} {:>14} {:>14}", "", "put pages/s", "get pages/s");
    println!(
        "{:<22} {:>14.0} {:>14.0}",
        "device (vhost-user)", r.device_put_pages_per_sec, r.device_get_pages_per_sec
    );
    println!(
        "{:<22} {:>14.0} {:>14.0}",
        "store only", r.store_put_pages_per_sec, r.store_get_pages_per_sec
    );
    println!(
        "{:<22} {:>14.2} {:>14.2}",
        "device / store", r.put_ratio, r.get_ratio
    );
    println!(
        "store per-page time:   put {:.2} us, get {:.2} us",
        r.store_put_us_per_page, r.store_get_us_per_page
    );
    for (name, l) in [
        ("put", &r.put_latency),
        ("get", &r.get_latency),
        ("store-only put", &r.store_put_latency),
        ("store-only get", &r.store_get_latency),
    ] {
        println!(
            "depth-1 {name}: p50 {:.2} us, p99 {:.2} us, p999 {:.2} us, mean {:.2} us ({} samples)",
            l.p50_us, l.p99_us, l.p999_us, l.mean_us, l.samples
        );
    }
    println!(
        "target depth>=32 throughput >= 0.8x store: {}",
        yes_no(r.target_throughput_met)
    );
    println!(
        "target depth-1 polling p50 <= store per-page + 10 us: {}",
        yes_no(r.target_latency_met)
    );
    println!(
        "daemon spill writes {} ({} by the background writer), rejected puts {}",
        r.daemon_spill_writes, r.daemon_background_writebacks, r.daemon_failed_stores
    );
    if let Some(b) = &r.blk {
        println!(
            "blk device: write {:.0} pages/s ({:.2}x tmem put), read {:.0} pages/s ({:.2}x tmem get)",
            b.write_pages_per_sec, b.write_ratio_to_tmem_put, b.read_pages_per_sec, b.read_ratio_to_tmem_get
        );
        for (name, l) in [("write", &b.write_latency), ("read", &b.read_latency)] {
            println!(
                "depth-1 blk {name}: p50 {:.2} us, p99 {:.2} us, mean {:.2} us ({} samples)",
                l.p50_us, l.p99_us, l.mean_us, l.samples
            );
        }
        println!(
            "target blk >= 0.9x tmem device at depth>=32: {}",
            yes_no(b.target_met)
        );
    }
}

/// Where `tmem-bench` looks for the daemon by default.
pub fn default_daemon_path() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name(DAEMON_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_daemon_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c");
        std::fs::write(&corpus, vec![1u8; PAGE_SIZE]).unwrap();
        let args = DeviceArgs {
            corpus,
            queues: 1,
            depth: 1,
            poll_us: None,
            spin_us: None,
            mem_limit: None,
            spill_limit: None,
            writeback_headroom: None,
            level: 1,
            dedup: DedupArg::Guest,
            daemon: Some(dir.path().join("nope")),
            repeat: 1,
            blk: false,
            json: true,
        };
        assert!(matches!(run_bench(&args), Err(DeviceBenchError::NoDaemon(_))));
    }

    #[test]
    fn default_daemon_is_beside_this_program() {
        let p = default_daemon_path().unwrap();
        assert_eq!(p.file_name().unwrap(), "vhost-user-tmem");
    }
}
