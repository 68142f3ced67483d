//! The `tmem-bench` benchmarks. They live in the library so that integration
//! tests can run them on small inputs.

use clap::Parser;

pub mod device;
pub mod frames;
pub mod hostile;
pub mod noisy;
pub mod store;
pub mod zram;

#[derive(Debug, Parser)]
#[command(name = "tmem-bench", about = "Benchmarks for vhost-user-tmem")]
pub enum BenchCommand {
    /// Put, then get and verify, every page of a corpus through the page store.
    Store(store::StoreArgs),
    /// Drive a vhost-user-tmem daemon over its socket with an in-process frontend
    /// (N queues, depth D), and the store alone on the same pages, for comparison.
    Device(device::DeviceArgs),
    /// What one hostile guest's input costs: pool churn, dedup hash
    /// flooding, index-group scans.
    Hostile(hostile::HostileArgs),
    /// A noisy neighbour: two devices on one daemon, an attacker flooding
    /// incompressible pages and a victim using a working set within its
    /// share; the victim's rejects and get latency, alone and attacked.
    Noisy(noisy::NoisyArgs),
    /// Multi-page spill frames: N cold pages of one guest packed or
    /// compressed together in one sealed frame, against one slot a page
    /// (file bytes, write and get rates, read amplification, fragmentation).
    Frames(frames::FramesArgs),
    /// The kernel's zram on the same pages (a hot-added device; root), then
    /// the store beside it.
    ZramPeer(zram::ZramArgs),
}

impl BenchCommand {
    pub fn run(self) -> Result<(), Box<dyn std::error::Error>> {
        match self {
            BenchCommand::Store(args) => store::run(&args),
            BenchCommand::Device(args) => device::run(&args),
            BenchCommand::Hostile(args) => hostile::run(&args),
            BenchCommand::Noisy(args) => noisy::run(&args),
            BenchCommand::Frames(args) => frames::run(&args),
            BenchCommand::ZramPeer(args) => zram::run(&args),
        }
    }
}
