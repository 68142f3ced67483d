//! `--compression lz4` and `auto` through the real daemon: pages put over a
//! virtqueue come back byte-exact, and under `auto` the daemon's
//! recompressor settles cold pages with a trained dictionary while the
//! guest keeps reading them.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use vhost_user_tmem::protocol::{Status, PAGE_SIZE};

const OK: Option<Status> = Some(Status::Ok);

/// Compressible and different per seed: records of a shared layout.
fn text_page(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE_SIZE);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(b"{\"key\":\"");
        out.extend_from_slice(&(x % 100_000).to_string().into_bytes());
        out.extend_from_slice(b"\",\"owner\":\"daemon\",\"next\":");
        out.extend_from_slice(&(x >> 40).to_le_bytes()[..3]);
    }
    out.truncate(PAGE_SIZE);
    out
}

fn codec(d: &Daemon, name: &str) -> u64 {
    d.stats()["store"]["codecs"][name].as_u64().unwrap_or(0)
}

#[test]
fn lz4_pages_round_trip_through_the_daemon() {
    let d = Daemon::with(1, &["--compression", "lz4"]);
    let (_vmm, mut q) = d.connect1();
    for i in 0..64 {
        assert_eq!(q.put(0, i, &text_page(i)).unwrap().status, OK);
    }
    for i in 0..64 {
        assert_eq!(q.get(0, i, false).unwrap().page, text_page(i), "page {i}");
    }
    assert_eq!(codec(&d, "lz4_pages"), 64);
    assert_eq!(codec(&d, "recompressions"), 0);
}

#[test]
fn auto_settles_cold_pages_with_a_dictionary_while_they_stay_readable() {
    let d = Daemon::with(1, &["--compression", "auto:3"]);
    let (_vmm, mut q) = d.connect1();
    const PAGES: u64 = 300;
    for i in 0..PAGES {
        assert_eq!(q.put(1, i, &text_page(i)).unwrap().status, OK);
    }
    assert_eq!(codec(&d, "lz4_pages"), PAGES);
    // Pages 0..10 are read all along (warm); the rest go cold and settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    while codec(&d, "dict_pages") < PAGES - 10 {
        assert!(
            Instant::now() < deadline,
            "not settled: {}",
            d.stats()["store"]["codecs"]
        );
        for i in 0..10 {
            assert_eq!(q.get(1, i, false).unwrap().page, text_page(i), "page {i}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(codec(&d, "dict_versions"), 1);
    assert!(codec(&d, "dict_bytes") > 0);
    for i in 0..PAGES {
        assert_eq!(q.get(1, i, false).unwrap().page, text_page(i), "page {i}");
    }
}
