//! `tmem-bench noisy`: a noisy neighbour. Two devices on one daemon, driven
//! over their sockets the way two VMMs would:
//!
//! - the victim (device 0) holds a working set of compressible pages well
//!   within its fair share, and keeps using it at depth 1: it reads a page,
//!   and every fourth time writes it anew (a swap-out);
//! - the attacker (device 1) stores incompressible pages, each at a new
//!   index, as fast as one queue takes them, and never gives any back.
//!
//! The victim is measured alone, then under attack (once the attacker has
//! stored as much as the whole RAM budget, so RAM is full and the
//! attacker's pages are spilling), each phase on a fresh daemon. Reported: the victim's rejected puts,
//! its get latency (p50/p99) in both phases, what the attacker stored, had
//! rejected and spilled, and whether the target holds: no victim rejects,
//! and a victim p99 under attack within 2x of alone.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    control::{ClientError, ControlClient},
    harness::{
        daemon::{DaemonProcess, DaemonSpec, HarnessError},
        frontend::{FrontendError, Virtqueue, Vmm, VmmConfig, WaitMode},
        timing::Latency,
    },
    protocol::{Status, PAGE_SIZE},
    size::parse_size,
    stats::OpLatency,
    store::StoreStats,
};

const POOL: u32 = 0;
const DAEMON_NAME: &str = "vhost-user-tmem";
const VICTIM: usize = 0;
const ATTACKER: usize = 1;

#[derive(Debug, Clone, clap::Args)]
pub struct NoisyArgs {
    /// The daemon's RAM budget.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub mem_limit: u64,
    /// The daemon's spill file limit; 0 runs without a spill file.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub spill_limit: u64,
    /// Directory for the spill file (default: the daemon's temporary
    /// directory), e.g. a tmpfs to leave the disk out of the figures.
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// The victim's working set, in pages (default: an eighth of the RAM
    /// budget in uncompressed pages, a fraction of its share once compressed).
    #[arg(long)]
    pub victim_pages: Option<u64>,
    /// The victim device's weight (the attacker's is 1).
    #[arg(long, default_value_t = 1)]
    pub victim_weight: u32,
    /// Seconds the victim is measured in each phase.
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Passed to the daemon: how long a worker busy-polls before sleeping.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// How long each guest polls its used ring for an answer before it
    /// sleeps on the interrupt, as virtio_tmem's `poll_us` parameter does
    /// (the driver's default is 50). 0, the default here, sleeps at once:
    /// on a host with fewer cores than the two guests and the daemon's
    /// busy threads, a polling guest takes the CPU the daemon needs to
    /// answer it, and the figures measure that instead.
    #[arg(long, default_value_t = 0)]
    pub guest_poll_us: u64,
    /// Passed to the daemon as --writeback-headroom (SIZE, auto or 0).
    #[arg(long)]
    pub writeback_headroom: Option<String>,
    /// The daemon binary; default: `vhost-user-tmem` beside this program.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Print only one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error)]
pub enum NoisyError {
    #[error("cannot find the daemon binary at {0} (build it, or pass --daemon)")]
    NoDaemon(PathBuf),
    #[error("cannot locate this program")]
    CurrentExe(#[source] std::io::Error),
    #[error("starting the daemon")]
    Daemon(#[source] HarnessError),
    #[error("frontend")]
    Frontend(#[from] FrontendError),
    #[error("control socket")]
    Control(#[source] ClientError),
    #[error("{who}: page {index} came back {status:?}")]
    BadReply {
        who: &'static str,
        index: u64,
        status: Option<Status>,
    },
    #[error("victim: page {0} did not read back as written")]
    Mismatch(u64),
    #[error("the attacker's thread panicked")]
    AttackerPanicked,
}

/// What the victim saw in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct VictimPhase {
    pub gets: u64,
    pub puts: u64,
    pub rejects: u64,
    pub get_latency: Latency,
    pub put_latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoisyReport {
    pub mem_limit: u64,
    pub spill_limit: u64,
    pub victim_pages: u64,
    pub victim_weight: u32,
    /// Round trips seen by the victim (submit, kick, used entry).
    pub alone: VictimPhase,
    pub attacked: VictimPhase,
    /// The daemon's own time to serve the victim's gets (from taking a
    /// request off the ring to writing its status), without the wake-ups
    /// and scheduling on either side.
    pub alone_service_get: OpLatency,
    pub attacked_service_get: OpLatency,
    /// Pages the attacker stored and had rejected, over the whole attack.
    pub attacker_puts: u64,
    pub attacker_rejects: u64,
    pub attacker_puts_per_sec: f64,
    /// From the daemon's stats at the end.
    pub attacker_spilled_pages: u64,
    /// Writebacks made by puts of the over-share guest (the attacker) while
    /// the background writer was behind.
    pub throttled_writebacks: u64,
    pub victim_spilled_pages: u64,
    pub victim_ram_bytes: u64,
    pub victim_fair_share_bytes: u64,
    pub attacker_ram_bytes: u64,
    pub attacker_fair_share_bytes: u64,
    /// Attacked p99 over alone p99 (the victim's get round trips).
    pub p99_ratio: f64,
    /// Victim rejects 0 in both phases, and `p99_ratio <= 2`.
    pub target_met: bool,
    /// The same ratio of the daemon's own service times: what the store
    /// and the device layer cost the victim, without the CPU the attacker's
    /// threads take from the victim's on a host with few cores.
    pub service_p99_ratio: f64,
    /// Victim rejects 0, and `service_p99_ratio <= 2`.
    pub service_target_met: bool,
}

pub fn run(args: &NoisyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = run_bench(args)?;
    if !args.json {
        print_table(&report);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A compressible page (about 3:1), distinct per seed.
pub fn victim_page(seed: u64) -> [u8; PAGE_SIZE] {
    let words: [&[u8]; 8] = [
        b"kernel ", b"page ", b"swap ", b"anon ", b"cache ", b"slab ", b"inode ", b"dentry ",
    ];
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut at = 0;
    while at < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x % 8) as usize];
        let n = w.len().min(PAGE_SIZE - at);
        p[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
    p[..8].copy_from_slice(&seed.to_le_bytes());
    p
}

fn noise_page(seed: u64, out: &mut [u8; PAGE_SIZE]) {
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    for w in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

pub fn run_bench(args: &NoisyArgs) -> Result<NoisyReport, NoisyError> {
    let n = args
        .victim_pages
        .unwrap_or(args.mem_limit / 8 / PAGE_SIZE as u64)
        .max(1);
    let alone = phase(args, n, false)?;
    let attacked = phase(args, n, true)?;
    let p99_ratio = attacked.victim.get_latency.p99_us / alone.victim.get_latency.p99_us.max(1e-3);
    let service_p99_ratio = attacked.service_get.p99_us / alone.service_get.p99_us.max(1e-3);
    let no_rejects = alone.victim.rejects == 0 && attacked.victim.rejects == 0;
    let store = &attacked.stats;
    let guest = |id: usize| store.guests.get(&(id as u32)).cloned().unwrap_or_default();
    let (v, a) = (guest(VICTIM), guest(ATTACKER));
    Ok(NoisyReport {
        mem_limit: args.mem_limit,
        spill_limit: args.spill_limit,
        victim_pages: n,
        victim_weight: args.victim_weight,
        target_met: no_rejects && p99_ratio <= 2.0,
        p99_ratio,
        service_target_met: no_rejects && service_p99_ratio <= 2.0,
        service_p99_ratio,
        alone_service_get: alone.service_get,
        attacked_service_get: attacked.service_get,
        alone: alone.victim,
        attacked: attacked.victim,
        attacker_puts: attacked.attacker_puts,
        attacker_rejects: attacked.attacker_rejects,
        attacker_puts_per_sec: attacked.attacker_puts_per_sec,
        attacker_spilled_pages: a.total.spilled_pages,
        throttled_writebacks: store.throttled_writebacks,
        victim_spilled_pages: v.total.spilled_pages,
        victim_ram_bytes: v.budget.ram_bytes,
        victim_fair_share_bytes: v.budget.fair_share_bytes,
        attacker_ram_bytes: a.budget.ram_bytes,
        attacker_fair_share_bytes: a.budget.fair_share_bytes,
    })
}

/// One phase, on a daemon of its own (so its latency counters hold this
/// phase alone): the victim fills its working set, then, with or without
/// the attacker flooding, is measured for `--secs`.
struct Phase {
    victim: VictimPhase,
    /// The daemon's own time to serve the victim's gets.
    service_get: OpLatency,
    attacker_puts: u64,
    attacker_rejects: u64,
    attacker_puts_per_sec: f64,
    stats: StoreStats,
}

fn phase(args: &NoisyArgs, n: u64, attack: bool) -> Result<Phase, NoisyError> {
    let mut daemon = start_daemon(args)?;
    let control = daemon.control().map(|p| p.to_owned()).unwrap_or_default();
    let mut ctl = ControlClient::connect(&control).map_err(NoisyError::Control)?;
    if args.victim_weight != 1 {
        ctl.set_device(VICTIM as u32, None, Some(args.victim_weight))
            .map_err(NoisyError::Control)?;
    }
    let (_victim_vmm, mut victim) = connect(&daemon, VICTIM, args.guest_poll_us)?;
    let (_attacker_vmm, mut attacker) = connect(&daemon, ATTACKER, args.guest_poll_us)?;
    for i in 0..n {
        expect(victim.put(POOL, i, &victim_page(i))?.status, "victim", i)?;
    }
    let span = Duration::from_secs_f64(args.secs.max(0.1));
    let mut versions = vec![0u64; n as usize];
    let stop = AtomicBool::new(false);
    let (stored, rejected) = (AtomicU64::new(0), AtomicU64::new(0));
    // Attacked, RAM is full of the attacker's pages before the clock starts.
    let fill = args.mem_limit / PAGE_SIZE as u64;
    let (victim_phase, attack_time) = std::thread::scope(|scope| {
        if !attack {
            return Ok((victim_phase(&mut victim, &mut versions, span)?, Duration::ZERO));
        }
        let flood = scope.spawn(|| flood(&mut attacker, &stop, &stored, &rejected));
        while stored.load(Ordering::Relaxed) + rejected.load(Ordering::Relaxed) < fill && !flood.is_finished()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let measured = victim_phase(&mut victim, &mut versions, span);
        stop.store(true, Ordering::Relaxed);
        let attack_time = flood.join().map_err(|_| NoisyError::AttackerPanicked)?;
        Ok::<_, NoisyError>((measured?, attack_time?))
    })?;
    let stats = ctl.stats().map_err(NoisyError::Control)?;
    daemon.terminate(Duration::from_secs(10));
    let service_get = stats
        .devices
        .get(VICTIM)
        .map(|d| d.latency.get)
        .unwrap_or_default();
    let (puts, rejects) = (stored.load(Ordering::Relaxed), rejected.load(Ordering::Relaxed));
    Ok(Phase {
        victim: victim_phase,
        service_get,
        attacker_puts: puts,
        attacker_rejects: rejects,
        attacker_puts_per_sec: (puts + rejects) as f64 / attack_time.as_secs_f64().max(1e-9),
        stats: stats.store,
    })
}

fn expect(status: Option<Status>, who: &'static str, index: u64) -> Result<(), NoisyError> {
    match status {
        Some(Status::Ok) => Ok(()),
        status => Err(NoisyError::BadReply { who, index, status }),
    }
}

/// The victim's loop for `span`: gets (verified) over its working set in
/// a scattered order, and every fourth op a put of a new version.
fn victim_phase(q: &mut Virtqueue, versions: &mut [u64], span: Duration) -> Result<VictimPhase, NoisyError> {
    let n = versions.len() as u64;
    let (mut get_ns, mut put_ns) = (Vec::new(), Vec::new());
    let mut rejects = 0;
    let mut x = 0x853c_49e6_748f_ea9bu64;
    let start = Instant::now();
    let mut op = 0u64;
    while start.elapsed() < span {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = (x >> 33) % n;
        let seed = |v: u64| i + v * n;
        op += 1;
        if op % 4 == 0 {
            let v = versions[i as usize] + 1;
            let page = victim_page(seed(v));
            let t = Instant::now();
            let r = q.put(POOL, i, &page)?;
            put_ns.push(t.elapsed().as_nanos() as u64);
            match r.status {
                Some(Status::Ok) => versions[i as usize] = v,
                Some(Status::Rejected) => {
                    rejects += 1;
                    // The old copy is gone too; store it back for the gets.
                    let old = victim_page(seed(versions[i as usize]));
                    expect(q.put(POOL, i, &old)?.status, "victim", i)?;
                }
                status => {
                    return Err(NoisyError::BadReply {
                        who: "victim",
                        index: i,
                        status,
                    })
                }
            }
        } else {
            let t = Instant::now();
            let r = q.get(POOL, i, false)?;
            get_ns.push(t.elapsed().as_nanos() as u64);
            expect(r.status, "victim", i)?;
            if r.page[..] != victim_page(seed(versions[i as usize]))[..] {
                return Err(NoisyError::Mismatch(i));
            }
        }
    }
    Ok(VictimPhase {
        gets: get_ns.len() as u64,
        puts: put_ns.len() as u64,
        rejects,
        get_latency: Latency::of_ns(get_ns),
        put_latency: Latency::of_ns(put_ns),
    })
}

/// The attacker: a new incompressible page at a new index, as fast as the
/// queue takes them, until `stop`. Returns how long it ran.
fn flood(
    q: &mut Virtqueue,
    stop: &AtomicBool,
    stored: &AtomicU64,
    rejected: &AtomicU64,
) -> Result<Duration, NoisyError> {
    let start = Instant::now();
    let mut page = [0u8; PAGE_SIZE];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        noise_page(i, &mut page);
        match q.put(POOL, i, &page)?.status {
            Some(Status::Ok) => stored.fetch_add(1, Ordering::Relaxed),
            Some(Status::Rejected) => rejected.fetch_add(1, Ordering::Relaxed),
            status => {
                return Err(NoisyError::BadReply {
                    who: "attacker",
                    index: i,
                    status,
                })
            }
        };
        i += 1;
    }
    Ok(start.elapsed())
}

fn connect(daemon: &DaemonProcess, vm: usize, poll_us: u64) -> Result<(Vmm, Virtqueue), NoisyError> {
    let wait = match poll_us {
        0 => WaitMode::Interrupt,
        us => WaitMode::Spin(Duration::from_micros(us)),
    };
    let cfg = VmmConfig {
        queues: 1,
        event_idx: true,
        wait,
        timeout: Duration::from_secs(30),
        ..VmmConfig::default()
    };
    let mut vmm = Vmm::connect(daemon.socket(vm), cfg)?;
    let mut queues = vmm.start()?;
    let mut q = queues.remove(0);
    // Every get is checked against what was put.
    q.set_poison(false);
    Ok((vmm, q))
}

fn start_daemon(args: &NoisyArgs) -> Result<DaemonProcess, NoisyError> {
    let binary = match &args.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(NoisyError::CurrentExe)?
            .with_file_name(DAEMON_NAME),
    };
    if !binary.is_file() {
        return Err(NoisyError::NoDaemon(binary));
    }
    let mut spec = DaemonSpec::new(binary).args(["--mem-limit".to_owned(), args.mem_limit.to_string()]);
    spec.vms = 2;
    if args.spill_limit > 0 {
        let dir = args
            .spill_dir
            .as_ref()
            .map_or_else(|| "{dir}".to_owned(), |d| d.display().to_string());
        spec = spec.args([
            "--spill-file".to_owned(),
            dir,
            "--spill-limit".into(),
            args.spill_limit.to_string(),
        ]);
    }
    if let Some(us) = args.poll_us {
        spec = spec.args(["--poll-us".to_owned(), us.to_string()]);
    }
    if let (Some(headroom), true) = (&args.writeback_headroom, args.spill_limit > 0) {
        spec = spec.args(["--writeback-headroom", headroom.as_str()]);
    }
    spec.log_filter = "warn".into();
    DaemonProcess::start(&spec).map_err(NoisyError::Daemon)
}

fn print_table(r: &NoisyReport) {
    println!(
        "noisy neighbour: RAM {} MiB, spill {} MiB, victim {} pages (weight {})",
        r.mem_limit >> 20,
        r.spill_limit >> 20,
        r.victim_pages,
        r.victim_weight
    );
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>12} {:>12} {:>12}",
        "victim", "gets", "puts", "rejects", "get p50 us", "get p99 us", "put p99 us"
    );
    for (name, p) in [("alone", &r.alone), ("attacked", &r.attacked)] {
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>12.1} {:>12.1} {:>12.1}",
            name, p.gets, p.puts, p.rejects, p.get_latency.p50_us, p.get_latency.p99_us, p.put_latency.p99_us
        );
    }
    println!(
        "victim gets as the daemon served them (p50/p99 us): alone {:.1}/{:.1}, attacked {:.1}/{:.1}",
        r.alone_service_get.p50_us,
        r.alone_service_get.p99_us,
        r.attacked_service_get.p50_us,
        r.attacked_service_get.p99_us
    );
    println!(
        "attacker: {} stored, {} rejected ({:.0} puts/s), {} spilled ({} by its own puts); RAM {} KiB of a {} KiB share (victim {} KiB of {} KiB, {} spilled)",
        r.attacker_puts,
        r.attacker_rejects,
        r.attacker_puts_per_sec,
        r.attacker_spilled_pages,
        r.throttled_writebacks,
        r.attacker_ram_bytes >> 10,
        r.attacker_fair_share_bytes >> 10,
        r.victim_ram_bytes >> 10,
        r.victim_fair_share_bytes >> 10,
        r.victim_spilled_pages,
    );
    let met = |m: bool| if m { "met" } else { "NOT met" };
    println!(
        "target (victim rejects 0, get p99 within 2x of alone): round trip {} (p99 ratio {:.2}), daemon service {} (ratio {:.2})",
        met(r.target_met),
        r.p99_ratio,
        met(r.service_target_met),
        r.service_p99_ratio
    );
}
