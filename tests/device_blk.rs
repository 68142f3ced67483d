//! The virtio-blk device kind (`--socket PATH,blk=SIZE`), checked against the
//! real daemon over a real vhost-user socket: config space and features,
//! every request type, unaligned I/O, the disk's end, malformed chains, data
//! that outlives resets and VMMs, and the room guarantee.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{page, Daemon, StopOnDrop};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_tmem::{
    harness::frontend::{blk_range, feature, Completion, DescAddr, DescSpec, RawChain, Virtqueue},
    protocol::Status,
};
use virtio_bindings::bindings::{
    virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    },
    virtio_config::VIRTIO_F_VERSION_1,
};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const PAGE: usize = 4096;
/// Sectors per page.
const SPP: u64 = 8;
/// The small disk of most tests: 1 MiB, 2048 sectors.
const SMALL: u64 = 1 << 20;

/// A daemon whose device 0 is a blk disk of `size` bytes, with room for it.
fn blk_daemon(size: u64, queues: usize) -> Daemon {
    let spill = (size / 4096 + 64) * 4224 + (4 << 20);
    Daemon::with_options(
        &[&format!("blk={size}")],
        &[
            "--queues",
            &queues.to_string(),
            "--spill-file",
            "{dir}/spill",
            "--spill-limit",
            &spill.to_string(),
        ],
    )
}

fn write(q: &mut Virtqueue, sector: u64, data: &[u8]) -> Completion {
    q.blk(VIRTIO_BLK_T_OUT, sector, data, 0).unwrap()
}

fn read(q: &mut Virtqueue, sector: u64, len: u32) -> Completion {
    q.blk(VIRTIO_BLK_T_IN, sector, &[], len).unwrap()
}

fn status(c: &Completion) -> u8 {
    c.status_byte().expect("a status byte")
}

/// Reads `len` bytes at `sector`, which must succeed.
fn read_ok(q: &mut Virtqueue, sector: u64, len: u32) -> Vec<u8> {
    let c = read(q, sector, len);
    assert_eq!((status(&c), c.used_len), (OK, len + 1), "read of sector {sector}");
    c.payload().to_vec()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

/// virtio 1.2 §5.2.4: config space, at the offsets of `virtio_blk_config`,
/// and a read as long as a VMM's own (longer) struct gets every byte.
#[test]
fn config_space_and_features() {
    let d = blk_daemon(SMALL, 2);
    let (mut vmm, _q) = d.connect(0, Daemon::vmm_config(2, true));
    let c = vmm.read_config(0, 96).unwrap();
    assert_eq!(c.len(), 96, "as long as asked");
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        SMALL / 512,
        "capacity"
    );
    assert_eq!(le32(&c[8..12]), 1 << 20, "size_max");
    assert_eq!(le32(&c[12..16]), 62, "seg_max");
    assert_eq!(le32(&c[20..24]), 4096, "blk_size");
    assert_eq!(c[24], 0, "physical_block_exp: the physical block is 4096 too");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert_eq!(le32(&c[36..40]), 1 << 16, "max_discard_sectors");
    assert_eq!(le32(&c[40..44]), 16, "max_discard_seg");
    assert_eq!(le32(&c[44..48]), 8, "discard_sector_alignment");
    assert_eq!(le32(&c[48..52]), 1 << 16, "max_write_zeroes_sectors");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    assert_eq!(&c[60..], &[0u8; 36], "no secure erase, not zoned");
    let f = vmm.offered_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & feature(bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0, "writable");
    assert!(vmm
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIG));
    let stats = d.stats();
    assert_eq!(stats["devices"][0]["kind"], "blk");
}

/// Aligned pages read back; a block never written reads as zeros, and a
/// read leaves the block where it was.
#[test]
fn aligned_writes_read_back_and_unwritten_blocks_are_zero() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    assert_eq!(read_ok(&mut q, 0, 8192), vec![0u8; 8192]);
    let mut two = page(1);
    two.extend(page(2));
    assert_eq!(status(&write(&mut q, 8, &two)), OK);
    assert_eq!(read_ok(&mut q, 8, 8192), two);
    assert_eq!(read_ok(&mut q, 8, 8192), two, "a read does not take the block");
    assert_eq!(read_ok(&mut q, 16, 4096), page(2));
    assert_eq!(d.guest_counter(0, "stored_pages"), 2);
}

/// Sub-page and unaligned I/O: read-modify-write of the covering blocks.
#[test]
fn unaligned_io_changes_only_its_sectors() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    let base = page(7);
    assert_eq!(status(&write(&mut q, 0, &base)), OK);
    // One sector in the middle of block 0.
    let s = vec![0xAB; 512];
    assert_eq!(status(&write(&mut q, 3, &s)), OK);
    let mut want = base.clone();
    want[1536..2048].copy_from_slice(&s);
    assert_eq!(read_ok(&mut q, 0, 4096), want);
    // 3 KiB across the boundary of blocks 0 and 1 (sectors 6..12).
    let x: Vec<u8> = (0..3072).map(|i| (i % 253) as u8).collect();
    assert_eq!(status(&write(&mut q, 6, &x)), OK);
    want[3072..].copy_from_slice(&x[..1024]);
    let mut block1 = vec![0u8; 4096];
    block1[..2048].copy_from_slice(&x[1024..]);
    assert_eq!(read_ok(&mut q, 0, 4096), want);
    assert_eq!(read_ok(&mut q, 8, 4096), block1);
    // Unaligned reads see the same bytes.
    assert!(read_ok(&mut q, 5, 2048) == [&want[2560..], &block1[..512]].concat());
}

/// The disk's end: the last blocks are there, a sector past them is IOERR,
/// and a request that crosses the end does nothing at all.
#[test]
fn requests_at_and_beyond_the_end() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    let last = SMALL / 512 - SPP;
    assert_eq!(status(&write(&mut q, last, &page(3))), OK);
    assert_eq!(read_ok(&mut q, last, 4096), page(3));
    assert_eq!(read_ok(&mut q, last + 7, 512), page(3)[3584..].to_vec());
    let before = d.guest_counter(0, "succ_stores");
    for (sector, len) in [(last + 1, 4096), (SMALL / 512, 512), (u64::MAX - 3, 4096)] {
        assert_eq!(status(&read(&mut q, sector, len)), IOERR, "read at {sector}");
        assert_eq!(
            status(&write(&mut q, sector, &vec![1u8; len as usize])),
            IOERR,
            "write at {sector}"
        );
    }
    assert_eq!(d.guest_counter(0, "succ_stores"), before, "nothing written");
    assert_eq!(read_ok(&mut q, last, 4096), page(3));
}

/// FLUSH is OK; GET_ID gives the ID; an unknown type is UNSUPP.
#[test]
fn flush_get_id_and_unknown_types() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    let c = q.blk(VIRTIO_BLK_T_FLUSH, 0, &[], 0).unwrap();
    assert_eq!((status(&c), c.used_len), (OK, 1));
    let c = q.blk(VIRTIO_BLK_T_GET_ID, 0, &[], 20).unwrap();
    assert_eq!((status(&c), c.used_len), (OK, 21));
    assert_eq!(&c.payload()[..17], b"vhost-user-tmem-0");
    for kind in [2, 3, 14, 99] {
        assert_eq!(status(&q.blk(kind, 0, &[], 0).unwrap()), UNSUPP, "type {kind}");
    }
}

/// DISCARD drops whole blocks (they read as zeros); WRITE_ZEROES zeroes its
/// sectors, whole blocks or not.
#[test]
fn discard_and_write_zeroes() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    for b in 0..4 {
        assert_eq!(status(&write(&mut q, b * SPP, &page(10 + b))), OK);
    }
    let ranges = [blk_range(0, 8, 0), blk_range(16, 8, 0)].concat();
    assert_eq!(status(&q.blk(VIRTIO_BLK_T_DISCARD, 0, &ranges, 0).unwrap()), OK);
    assert_eq!(read_ok(&mut q, 0, 4096), vec![0u8; 4096]);
    assert_eq!(read_ok(&mut q, 8, 4096), page(11));
    assert_eq!(read_ok(&mut q, 16, 4096), vec![0u8; 4096]);
    assert_eq!(d.guest_counter(0, "stored_pages"), 2);
    // Sectors 25..27 of block 3, then all of block 1.
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let ranges = [blk_range(25, 2, 0), blk_range(8, 8, unmap)].concat();
    assert_eq!(
        status(&q.blk(VIRTIO_BLK_T_WRITE_ZEROES, 0, &ranges, 0).unwrap()),
        OK
    );
    let mut want = page(13);
    want[512..1536].fill(0);
    assert_eq!(read_ok(&mut q, 24, 4096), want);
    assert_eq!(read_ok(&mut q, 8, 4096), vec![0u8; 4096]);
    // A discard with the unmap flag, or past the end, does nothing.
    assert_eq!(
        status(
            &q.blk(VIRTIO_BLK_T_DISCARD, 0, &blk_range(24, 8, unmap), 0)
                .unwrap()
        ),
        UNSUPP
    );
    let ranges = [blk_range(24, 8, 0), blk_range(SMALL / 512, 8, 0)].concat();
    assert_eq!(
        status(&q.blk(VIRTIO_BLK_T_DISCARD, 0, &ranges, 0).unwrap()),
        IOERR
    );
    assert_eq!(
        read_ok(&mut q, 24, 4096),
        want,
        "nothing of a refused request was done"
    );
}

/// Malformed chains are answered IOERR where there is a status byte, and
/// change nothing; the device goes on serving.
#[test]
fn malformed_chains_do_nothing() {
    let d = blk_daemon(SMALL, 1);
    let (_vmm, mut q) = d.connect1();
    assert_eq!(status(&write(&mut q, 0, &page(5))), OK);
    // A write of 100 bytes: not whole sectors.
    assert_eq!(status(&write(&mut q, 0, &[9u8; 100])), IOERR);
    // A read whose data is device-readable.
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    let desc = |at: u32, len: u32, writable: bool| DescSpec {
        addr: DescAddr::Slot(at),
        len,
        writable,
    };
    let chain = RawChain {
        descs: vec![desc(0, 16, false), desc(64, 4096, false), desc(8192, 1, true)],
        init: vec![(0, head.to_vec())],
        ..RawChain::default()
    };
    let c = q.roundtrip_raw(&chain).unwrap();
    assert_eq!((status(&c), c.used_len), (IOERR, 1));
    // A short header.
    let chain = RawChain {
        descs: vec![desc(0, 8, false), desc(8192, 1, true)],
        init: vec![(0, head.to_vec())],
        ..RawChain::default()
    };
    assert_eq!(status(&q.roundtrip_raw(&chain).unwrap()), IOERR);
    // A write whose data lies outside guest memory.
    head[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    let chain = RawChain {
        descs: vec![
            desc(0, 16, false),
            DescSpec {
                addr: DescAddr::Gpa(1 << 50),
                len: 4096,
                writable: false,
            },
            desc(8192, 1, true),
        ],
        init: vec![(0, head.to_vec())],
        ..RawChain::default()
    };
    assert_eq!(status(&q.roundtrip_raw(&chain).unwrap()), IOERR);
    // No writable byte at all: nothing to answer with, but the ring goes on.
    let chain = RawChain {
        descs: vec![desc(0, 16, false), desc(64, 4096, false)],
        init: vec![(0, head.to_vec())],
        ..RawChain::default()
    };
    assert_eq!(q.roundtrip_raw(&chain).unwrap().used_len, 0);
    assert_eq!(read_ok(&mut q, 0, 4096), page(5));
}

/// A disk keeps its data: across a device reset (a guest reboot), a ring
/// restart, and a VMM that leaves and comes back (a restarted VM).
#[test]
fn the_disk_outlives_resets_and_vmms() {
    let d = blk_daemon(SMALL, 2);
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    assert_eq!(status(&write(&mut qs[0], 0, &page(1))), OK);
    assert_eq!(status(&write(&mut qs[1], 8, &page(2))), OK);
    vmm.stop().unwrap();
    vmm.reset_device().unwrap();
    drop(qs);
    let mut qs = vmm.start().unwrap();
    assert_eq!(read_ok(&mut qs[1], 0, 4096), page(1), "after a reset");
    assert_eq!(status(&write(&mut qs[0], 16, &page(3))), OK);
    drop(qs);
    vmm.disconnect();
    let (_vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    for (b, seed) in [(0, 1), (1, 2), (2, 3)] {
        assert_eq!(
            read_ok(&mut qs[0], b * SPP, 4096),
            page(seed),
            "block {b} after a new VMM"
        );
    }
    assert_eq!(d.guest_counter(0, "stored_pages"), 3);
}

/// Two queues changing different sectors of the same blocks at once: each
/// read-modify-write holds its block, so both halves of every block survive.
#[test]
fn concurrent_sub_page_writes_to_one_block_both_survive() {
    let d = blk_daemon(SMALL, 2);
    let (_vmm, qs) = d.connect(0, Daemon::vmm_config(2, true));
    let blocks = 32u64;
    let rounds = 20u64;
    let handles: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || {
                for round in 0..rounds {
                    for b in 0..blocks {
                        // Queue 0 owns sectors 0..4 of each block, queue 1 sectors 4..8.
                        let data = vec![(round as u8) << 1 | t as u8; 2048];
                        let c = write(&mut q, b * SPP + 4 * t as u64, &data);
                        assert_eq!(status(&c), OK);
                    }
                }
                q
            })
        })
        .collect();
    let mut qs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let last = (rounds as u8 - 1) << 1;
    for b in 0..blocks {
        let got = read_ok(&mut qs[0], b * SPP, 4096);
        assert!(
            got[..2048].iter().all(|&x| x == last),
            "block {b}: queue 0's half"
        );
        assert!(
            got[2048..].iter().all(|&x| x == last | 1),
            "block {b}: queue 1's half"
        );
    }
}

/// The room guarantee: a disk far larger than the RAM limit is filled whole
/// with incompressible data while a tmem guest fills the store as fast as it
/// can; every write succeeds, and every block reads back.
#[test]
fn the_whole_disk_fills_with_incompressible_data_beside_a_tmem_guest() {
    let size = 24u64 << 20;
    let reserve = (size / 4096 + 64) * 4224;
    let d = Daemon::with_options(
        &[&format!("blk={size}"), ""],
        &[
            "--mem-limit",
            "8M",
            "--queues",
            "2",
            "--spill-file",
            "{dir}/spill",
            "--spill-limit",
            &(reserve + (4 << 20)).to_string(),
        ],
    );
    let (_blk_vmm, mut blk) = d.connect(0, Daemon::vmm_config(2, true));
    let (_tmem_vmm, mut tmem) = d.connect(1, Daemon::vmm_config(1, true));
    let stop = AtomicBool::new(false);
    let pages = size / PAGE as u64;
    let (rejected, stored) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let hammer = s.spawn(|| {
            let q = &mut tmem[0];
            let (mut rejected, mut stored, mut i) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match q.put(0, i % 20_000, &page(1 << 40 | i)).unwrap().status {
                    Some(Status::Ok) => stored += 1,
                    Some(Status::Rejected) => rejected += 1,
                    other => panic!("tmem put: {other:?}"),
                }
                i += 1;
            }
            (rejected, stored)
        });
        let (a, b) = blk.split_at_mut(1);
        let writers = [(&mut a[0], 0u64), (&mut b[0], 1u64)];
        std::thread::scope(|w| {
            for (q, half) in writers {
                w.spawn(move || {
                    for p in (half..pages).step_by(2) {
                        let c = write(q, p * SPP, &page(p));
                        assert_eq!(status(&c), OK, "write of block {p}");
                    }
                });
            }
        });
        stop.store(true, Ordering::Relaxed);
        hammer.join().unwrap()
    });
    for p in 0..pages {
        assert_eq!(
            read_ok(&mut blk[(p % 2) as usize], p * SPP, 4096),
            page(p),
            "block {p}"
        );
    }
    assert_eq!(d.guest_counter(0, "stored_pages"), pages);
    assert_eq!(d.guest_counter(0, "failed_stores"), 0);
    assert!(d.guest_counter(0, "spilled_pages") > 0, "the disk went past RAM");
    assert!(stored > 0, "the tmem guest stored pages too");
    eprintln!("tmem guest beside the disk: {stored} stored, {rejected} rejected");
}

/// Without a spill file large enough for the whole disk the daemon does not start.
#[test]
fn a_disk_without_room_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-tmem"))
        .args(["--socket", "/nonexistent/x.sock,blk=1G"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--spill-limit of at least"), "{err}");
}
