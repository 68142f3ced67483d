//! `tmem-bench device` end to end on a tiny corpus against the real daemon: the
//! figures are not checked (speed is for the benchmark to report), only that every
//! page went through the device and the store and read back intact.

use vhost_user_tmem::bench::device::{run_bench, DeviceArgs};

fn corpus(dir: &std::path::Path, pages: usize) -> std::path::PathBuf {
    let mut data = Vec::with_capacity(pages * 4096);
    for p in 0..pages {
        match p % 3 {
            0 => data.extend([0u8; 4096]),
            1 => data.extend((0..4096).map(|i| ((i * 31 + p * 7) % 251) as u8)),
            _ => data.extend(format!("page {p} ").bytes().cycle().take(4096)),
        }
    }
    let path = dir.join("corpus.raw");
    std::fs::write(&path, data).unwrap();
    path
}

fn args(corpus: std::path::PathBuf, queues: u16, depth: u16, poll_us: Option<u64>) -> DeviceArgs {
    DeviceArgs {
        corpus,
        queues,
        depth,
        poll_us,
        spin_us: None,
        mem_limit: None,
        spill_limit: None,
        writeback_headroom: None,
        level: 1,
        dedup: vhost_user_tmem::config::DedupArg::Guest,
        daemon: Some(env!("CARGO_BIN_EXE_vhost-user-tmem").into()),
        repeat: 2,
        blk: false,
        json: true,
    }
}

/// Below its RAM limit the daemon spills (with and without its background
/// writer), and every page still reads back.
#[test]
fn device_bench_round_trips_every_page_through_the_spill_file() {
    let dir = tempfile::tempdir().unwrap();
    // Incompressible pages: 600 of them are well past 1 MiB of RAM.
    let mut data = Vec::with_capacity(600 * 4096);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..600 * 512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend(x.to_le_bytes());
    }
    let c = dir.path().join("noise.raw");
    std::fs::write(&c, data).unwrap();
    for headroom in ["0", "256K"] {
        let a = DeviceArgs {
            mem_limit: Some(1 << 20),
            spill_limit: Some(64 << 20),
            writeback_headroom: Some(headroom.into()),
            ..args(c.clone(), 1, 4, None)
        };
        let r = run_bench(&a).unwrap();
        assert_eq!(r.pages, 600, "headroom {headroom}");
        assert!(r.daemon_spill_writes > 0, "headroom {headroom}: {r:?}");
        assert_eq!(r.daemon_failed_stores, 0, "headroom {headroom}: {r:?}");
        if headroom == "0" {
            assert_eq!(r.daemon_background_writebacks, 0, "no writer without headroom");
        }
    }
}

#[test]
fn device_bench_round_trips_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 300);
    for (queues, depth, poll) in [(1, 1, Some(20)), (2, 8, None), (3, 40, None), (1, 400, None)] {
        let r = run_bench(&args(c.clone(), queues, depth, poll)).unwrap();
        assert_eq!(r.pages, 300);
        assert_eq!((r.queues, r.depth), (queues, depth));
        assert!(r.device_put_pages_per_sec > 0.0 && r.store_get_pages_per_sec > 0.0);
        assert_eq!(r.get_latency.samples, 300);
        assert_eq!(r.target_throughput_met.is_some(), depth >= 32);
        assert_eq!(r.target_latency_met.is_some(), depth == 1 && poll.is_some());
    }
}

/// `--blk`: the same pages as blocks of a disk beside the tmem device, every
/// one read back, the rounds clearing the disk with DISCARDs in between.
#[test]
fn device_bench_blk_round_trips_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let c = corpus(dir.path(), 300);
    for (queues, depth) in [(1, 1), (2, 32)] {
        let a = DeviceArgs {
            blk: true,
            ..args(c.clone(), queues, depth, None)
        };
        let r = run_bench(&a).unwrap();
        let b = r.blk.expect("a blk report");
        assert!(b.write_pages_per_sec > 0.0 && b.read_pages_per_sec > 0.0);
        assert!(b.write_ratio_to_tmem_put > 0.0 && b.read_ratio_to_tmem_get > 0.0);
        assert_eq!(b.read_latency.samples, 300);
        assert_eq!(b.target_met.is_some(), depth >= 32);
        assert_eq!(r.daemon_failed_stores, 0);
    }
}
