//! "Guest input is hostile" (docs/protocol.md §5): each malformed request gets
//! status INVALID if a status byte can be written, otherwise used length 0; the
//! daemon neither dies nor loses or leaks pages, and keeps serving.

mod common;

use common::{page, Daemon};
use vhost_user_tmem::{
    device::request::MAX_DESCRIPTORS,
    harness::frontend::{
        DescAddr, DescSpec, GuestRequest, Layout, RawChain, Virtqueue, GUEST_MEM_BASE, POISON,
    },
    protocol::{Op, Status, FLAG_EXCLUSIVE, HEADER_SIZE, PAGE_SIZE},
};

const OK: Option<Status> = Some(Status::Ok);
const INVALID: Option<Status> = Some(Status::Invalid);

/// Pages put before the hostile traffic; they must survive it.
fn plant(q: &mut Virtqueue) {
    for i in 0..8 {
        assert_eq!(q.put(1000, i, &page(5000 + i)).unwrap().status, OK);
    }
}

/// The daemon still serves, and the planted pages are still there.
fn still_serving(d: &mut Daemon, q: &mut Virtqueue, what: &str) {
    d.assert_alive();
    for i in 0..8 {
        let r = q.get(1000, i, false).unwrap();
        assert_eq!((r.status, r.used_len), (OK, 4097), "after {what}");
        assert_eq!(r.page, page(5000 + i), "planted page {i} after {what}");
    }
    assert_eq!(q.put(1001, 0, &page(1)).unwrap().status, OK, "after {what}");
    assert_eq!(q.get(1001, 0, true).unwrap().page, page(1), "after {what}");
}

fn raw_header(op: u8, flags: u8, reserved: u16, pool: u32, index: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE];
    h[0] = op;
    h[1] = flags;
    h[2..4].copy_from_slice(&reserved.to_le_bytes());
    h[4..8].copy_from_slice(&pool.to_le_bytes());
    h[8..16].copy_from_slice(&index.to_le_bytes());
    h
}

/// Sends `readable` bytes and `writable_len` writable bytes, one descriptor each.
/// `readable` followed by a readable page, and `writable` with a writable
/// page for the device to fill: both get INVALID and a used length of 1.
fn page_either_way_is_invalid(q: &mut Virtqueue, mut readable: Vec<u8>, writable: Vec<u8>, op: u8) {
    readable.extend(page(3));
    assert_eq!(send(q, readable, 1), (INVALID, 1), "op {op} + readable page");
    assert_eq!(
        send(q, writable, PAGE_SIZE + 1),
        (INVALID, 1),
        "op {op} + writable page"
    );
}

fn send(q: &mut Virtqueue, readable: Vec<u8>, writable_len: usize) -> (Option<Status>, u32) {
    let layout = Layout::merged(readable.len(), writable_len);
    let req = GuestRequest {
        readable,
        writable_len,
        layout,
    };
    let c = q.roundtrip(&req).unwrap();
    (c.status(), c.used_len)
}

/// "Unknown op ... gets status INVALID".
#[test]
fn unknown_op_is_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    for op in [0u8, 6, 7, 0x81, 255] {
        assert_eq!(
            send(&mut q, raw_header(op, 0, 0, 1000, 0), 1),
            (INVALID, 1),
            "op {op}"
        );
        // Also with a page behind it, either way round.
        page_either_way_is_invalid(
            &mut q,
            raw_header(op, 0, 0, 1000, 1),
            raw_header(op, 0, 0, 1000, 2),
            op,
        );
    }
    still_serving(&mut d, &mut q, "unknown ops");
}

/// "Short header".
#[test]
fn short_header_is_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    for len in [0usize, 1, 8, 23] {
        let h = raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0)[..len].to_vec();
        assert_eq!(send(&mut q, h, 1), (INVALID, 1), "{len}-byte header");
    }
    // A GET whose header is short but whose page is there.
    let h = raw_header(Op::Get as u8, 0, 0, 1000, 0)[..20].to_vec();
    assert_eq!(send(&mut q, h, PAGE_SIZE + 1), (INVALID, 1));
    still_serving(&mut d, &mut q, "short headers");
}

/// "Short or long page" on PUT (readable) and GET (writable), and a payload on
/// ops that take none.
#[test]
fn wrong_page_length_is_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    for page_len in [0usize, 1, 4095, 4097, 8192] {
        let mut r = raw_header(Op::Put as u8, 0, 0, 1001, 7);
        r.extend(vec![0x42; page_len]);
        assert_eq!(send(&mut q, r, 1), (INVALID, 1), "PUT with {page_len}-byte page");
        // The bad PUT stored nothing.
        assert_eq!(q.get(1001, 7, false).unwrap().status, Some(Status::NotFound));
    }
    for page_len in [0usize, 1, 4095, 4097, 8192] {
        if page_len == 0 {
            continue; // a GET with only a status byte is covered below
        }
        let c = q
            .roundtrip(&GuestRequest {
                readable: raw_header(Op::Get as u8, 0, 0, 1000, 0),
                writable_len: page_len + 1,
                layout: Layout::merged(HEADER_SIZE, page_len + 1),
            })
            .unwrap();
        assert_eq!(
            (c.status(), c.used_len),
            (INVALID, 1),
            "GET with {page_len}-byte page"
        );
        assert!(
            c.payload().iter().all(|&b| b == POISON),
            "a rejected GET must not write page bytes"
        );
    }
    // GET with room for the status only.
    assert_eq!(
        send(&mut q, raw_header(Op::Get as u8, 0, 0, 1000, 0), 1),
        (INVALID, 1)
    );
    // Header-only ops with a page attached, readable or writable.
    for op in [3u8, 4, 5] {
        let h = raw_header(op, 0, 0, 1000, 0);
        page_either_way_is_invalid(&mut q, h.clone(), h, op);
    }
    still_serving(&mut d, &mut q, "wrong page lengths");
}

/// "A readable buffer where a writable one is required" (GET page readable), and
/// the converse (PUT page writable).
#[test]
fn wrong_direction_is_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let mut r = raw_header(Op::Get as u8, 0, 0, 1000, 0);
    r.extend(vec![0u8; PAGE_SIZE]);
    assert_eq!(send(&mut q, r, 1), (INVALID, 1), "GET page device-readable");
    let mut r = raw_header(Op::Get as u8, FLAG_EXCLUSIVE, 0, 1000, 1);
    r.extend(vec![0u8; PAGE_SIZE]);
    assert_eq!(send(&mut q, r, 1), (INVALID, 1), "exclusive GET page readable");
    assert_eq!(
        send(&mut q, raw_header(Op::Put as u8, 0, 0, 1000, 2), PAGE_SIZE + 1),
        (INVALID, 1),
        "PUT page device-writable"
    );
    // The planted pages 1 and 2 are untouched (the exclusive GET did not consume).
    still_serving(&mut d, &mut q, "wrong directions");
}

/// No writable byte at all: nothing can be answered, so used length 0.
#[test]
fn no_status_byte_means_used_len_zero() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    for op in [1u8, 2, 3, 4, 5, 9] {
        let mut r = raw_header(op, 0, 0, 1000, 0);
        if op == 1 {
            r.extend(page(4));
        }
        let (status, used) = send(&mut q, r, 0);
        assert_eq!((status, used), (None, 0), "op {op} without a writable byte");
    }
    // Readable status-sized byte after the header does not count as a status.
    let mut r = raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0);
    r.push(0);
    assert_eq!(send(&mut q, r, 0), (None, 0));
    still_serving(&mut d, &mut q, "status-less chains");
}

/// "Reserved bits set": the header's reserved u16, and flags other than EXCLUSIVE
/// (which is only meaningful on GET).
#[test]
fn reserved_bits_are_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    for reserved in [1u16, 0x100, 0x8000] {
        assert_eq!(
            send(
                &mut q,
                raw_header(Op::InvalidatePage as u8, 0, reserved, 1000, 0),
                1
            ),
            (INVALID, 1),
            "reserved {reserved:#x}"
        );
    }
    for flags in [0x02u8, 0x80, 0xff] {
        assert_eq!(
            send(
                &mut q,
                raw_header(Op::Get as u8, flags, 0, 1000, 0),
                PAGE_SIZE + 1
            ),
            (INVALID, 1),
            "GET flags {flags:#x}"
        );
    }
    let mut r = raw_header(Op::Put as u8, FLAG_EXCLUSIVE, 0, 1000, 3);
    r.extend(page(9));
    assert_eq!(send(&mut q, r, 1), (INVALID, 1), "PUT with EXCLUSIVE");
    for op in [3u8, 4, 5] {
        assert_eq!(
            send(&mut q, raw_header(op, FLAG_EXCLUSIVE, 0, 1000, 0), 1),
            (INVALID, 1),
            "op {op} with EXCLUSIVE"
        );
    }
    // The PUT with EXCLUSIVE did not replace planted page 3, the INVALIDATEs with
    // flags did not drop page 0 or the pool.
    still_serving(&mut d, &mut q, "reserved bits");
}

fn slot(off: u32, len: u32, writable: bool) -> DescSpec {
    DescSpec {
        addr: DescAddr::Slot(off),
        len,
        writable,
    }
}

fn gpa(addr: u64, len: u32, writable: bool) -> DescSpec {
    DescSpec {
        addr: DescAddr::Gpa(addr),
        len,
        writable,
    }
}

/// "Addresses outside guest memory": header, page or status buffers below, beyond
/// or straddling the end of guest memory, or wrapping the address space.
#[test]
fn addresses_outside_guest_memory() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let end = q.guest_mem_end();
    let hdr = raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0);
    let put = raw_header(Op::Put as u8, 0, 0, 1000, 5);
    let outside = [
        (0u64, "address 0, below guest memory"),
        (GUEST_MEM_BASE - 24, "just below guest memory"),
        (end, "the end of guest memory"),
        (end - 10, "straddling the end"),
        (u64::MAX - 10, "wrapping the address space"),
    ];
    for (addr, what) in outside {
        // Header outside, status fine: INVALID.
        let chain = RawChain {
            descs: vec![gpa(addr, 24, false), slot(0, 1, true)],
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!((c.status(), c.used_len), (INVALID, 1), "header at {what}");
        // PUT page outside: INVALID, and planted page 5 not replaced.
        let chain = RawChain {
            descs: vec![
                slot(0, 24, false),
                gpa(addr, PAGE_SIZE as u32, false),
                slot(100, 1, true),
            ],
            init: vec![(0, put.clone())],
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!((c.status(), c.used_len), (INVALID, 1), "PUT page at {what}");
        // GET page outside, status inside: INVALID.
        let chain = RawChain {
            descs: vec![
                slot(0, 24, false),
                gpa(addr, PAGE_SIZE as u32, true),
                slot(100, 1, true),
            ],
            init: vec![(0, raw_header(Op::Get as u8, 0, 0, 1000, 0))],
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!((c.status(), c.used_len), (INVALID, 1), "GET page at {what}");
        // Status outside: nowhere to answer. (16 bytes, so that the one at the
        // end of memory does straddle it: its last byte, the status, is outside.)
        let chain = RawChain {
            descs: vec![slot(0, 24, false), gpa(addr, 16, true)],
            init: vec![(0, hdr.clone())],
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!(c.used_len, 0, "status at {what}");
    }
    // A writable buffer of 4 GiB - 1: its last byte is outside memory.
    let chain = RawChain {
        descs: vec![slot(0, 24, false), slot(100, u32::MAX, true)],
        init: vec![(0, hdr.clone())],
        ..RawChain::default()
    };
    assert_eq!(q.roundtrip_raw(&chain).unwrap().used_len, 0, "huge status buffer");
    // Indirect tables outside memory, or of a length that is not whole descriptors.
    for (table, len, what) in [
        (end, 32u32, "table beyond the end"),
        (0, 32, "table at 0"),
        (end - 16, 32, "table straddling the end"),
    ] {
        let chain = RawChain {
            descs: vec![slot(0, 24, false), slot(100, 1, true)],
            init: vec![(0, hdr.clone())],
            indirect: true,
            indirect_addr: Some(table),
            indirect_len: Some(len),
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!(c.used_len, 0, "indirect {what}");
    }
    still_serving(&mut d, &mut q, "out-of-memory addresses");
}

/// "An indirect descriptor with NEXT also set": virtio 1.x forbids it, and a
/// device that follows the table and ignores NEXT answers a chain other than
/// the one the driver built. Nothing is executed and nothing is written.
#[test]
fn indirect_with_next_is_not_executed() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let mut put = raw_header(Op::Put as u8, 0, 0, 1000, 77);
    put.extend(page(77));
    for next in [0u16, 1, 5, 1000] {
        let chain = RawChain {
            descs: vec![
                slot(0, HEADER_SIZE as u32, false),
                slot(64, PAGE_SIZE as u32, false),
                slot(8192, 1, true),
            ],
            init: vec![(0, put[..HEADER_SIZE].to_vec()), (64, page(77))],
            indirect: true,
            indirect_next: Some(next),
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!(c.used_len, 0, "INDIRECT|NEXT (next {next}) was answered");
        assert_eq!(c.status_byte(), Some(POISON), "status written for next {next}");
        assert_eq!(
            q.get(1000, 77, false).unwrap().status,
            Some(Status::NotFound),
            "INDIRECT|NEXT (next {next}) stored its page"
        );
    }
    // The same chain without NEXT is a well-formed PUT.
    let chain = RawChain {
        descs: vec![
            slot(0, HEADER_SIZE as u32, false),
            slot(64, PAGE_SIZE as u32, false),
            slot(8192, 1, true),
        ],
        init: vec![(0, put[..HEADER_SIZE].to_vec()), (64, page(77))],
        indirect: true,
        ..RawChain::default()
    };
    assert_eq!(q.roundtrip_raw(&chain).unwrap().status(), OK);
    assert_eq!(q.get(1000, 77, false).unwrap().page, page(77));
    still_serving(&mut d, &mut q, "indirect with next");
}

/// Indirect table lengths that are not a whole number of descriptors, or zero.
#[test]
fn bad_indirect_table_lengths() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let hdr = raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0);
    for len in [0u32, 8, 17, 31] {
        let chain = RawChain {
            descs: vec![slot(0, 24, false), slot(100, 1, true)],
            init: vec![(0, hdr.clone())],
            indirect: true,
            indirect_len: Some(len),
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert_eq!(c.used_len, 0, "indirect table of {len} bytes");
    }
    still_serving(&mut d, &mut q, "bad indirect lengths");
}

/// "An over-long chain": more than the daemon's cap of 64 non-empty descriptors
/// per chain, direct or indirect; also an endless (cyclic) chain.
#[test]
fn over_long_chains_are_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let total = HEADER_SIZE + PAGE_SIZE;
    let mut bytes = raw_header(Op::Put as u8, 0, 0, 1000, 6);
    bytes.extend(page(66));
    // 24 one-byte header descriptors + the page in 40 pieces + the status: one
    // descriptor more than the daemon's cap.
    let mut cuts: Vec<usize> = (1..=HEADER_SIZE).collect();
    cuts.extend((1..40).map(|k| HEADER_SIZE + k * 100));
    assert_eq!(cuts.len() + 1 + 1, MAX_DESCRIPTORS + 1);
    for indirect in [false, true] {
        let req = GuestRequest {
            readable: bytes.clone(),
            writable_len: 1,
            layout: Layout {
                readable: Layout::cut(total, &cuts),
                writable: vec![1],
                indirect,
                gap: 0,
            },
        };
        let c = q.roundtrip(&req).unwrap();
        assert_eq!(
            (c.status(), c.used_len),
            (INVALID, 1),
            "65 descriptors (64 readable), indirect={indirect}"
        );
    }
    // GET: the header and 64 writable descriptors.
    let wcuts: Vec<usize> = (1..64).map(|k| k * 64).collect();
    assert_eq!(wcuts.len() + 1 + 1, MAX_DESCRIPTORS + 1);
    for indirect in [false, true] {
        let req = GuestRequest {
            readable: raw_header(Op::Get as u8, 0, 0, 1000, 0),
            writable_len: PAGE_SIZE + 1,
            layout: Layout {
                readable: vec![HEADER_SIZE as u32],
                writable: Layout::cut(PAGE_SIZE + 1, &wcuts),
                indirect,
                gap: 0,
            },
        };
        let c = q.roundtrip(&req).unwrap();
        assert_eq!(
            (c.status(), c.used_len),
            (INVALID, 1),
            "65 descriptors (64 writable), indirect={indirect}"
        );
    }
    // 200 descriptors in an indirect table (more than the ring holds).
    let req = GuestRequest {
        readable: bytes.clone(),
        writable_len: 1,
        layout: Layout {
            readable: Layout::cut(total, &(1..200).map(|k| k * 20).collect::<Vec<_>>()),
            writable: vec![1],
            indirect: true,
            gap: 0,
        },
    };
    let c = q.roundtrip(&req).unwrap();
    assert_eq!((c.status(), c.used_len), (INVALID, 1), "200 indirect descriptors");
    // A cycle in the ring: header -> status -> header -> ...
    let chain = RawChain {
        descs: vec![slot(0, 24, false), slot(100, 1, true)],
        init: vec![(0, raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0))],
        cycle: true,
        ..RawChain::default()
    };
    let c = q.roundtrip_raw(&chain).unwrap();
    assert_eq!((c.status(), c.used_len), (INVALID, 1), "cyclic chain");
    still_serving(&mut d, &mut q, "over-long chains");
}

/// Chains that stop without ending: a cycle inside an indirect table (the walk
/// is cut after as many descriptors as the table holds), or a last descriptor
/// whose NEXT names an index beyond the ring or table. Such a chain is malformed
/// and must not be acted on: INVALID, and the INVALIDATE_PAGE it carries (of
/// planted page 0) does not happen.
#[test]
fn chains_that_do_not_end_are_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let base = RawChain {
        descs: vec![slot(0, 24, false), slot(100, 1, true)],
        init: vec![(0, raw_header(Op::InvalidatePage as u8, 0, 0, 1000, 0))],
        ..RawChain::default()
    };
    let cases = [
        (
            "cycle in an indirect table",
            RawChain {
                indirect: true,
                cycle: true,
                ..base.clone()
            },
        ),
        (
            "NEXT beyond the ring",
            RawChain {
                dangling_next: Some(q.size() + 3),
                ..base.clone()
            },
        ),
        (
            "NEXT beyond the indirect table",
            RawChain {
                indirect: true,
                dangling_next: Some(7),
                ..base.clone()
            },
        ),
    ];
    let mut failures = Vec::new();
    for (what, chain) in cases {
        let c = q.roundtrip_raw(&chain).unwrap();
        if (c.status(), c.used_len) != (INVALID, 1) {
            failures.push(format!("{what}: got {:?} used {}", c.status(), c.used_len));
        }
    }
    assert!(failures.is_empty(), "accepted as well-formed: {failures:#?}");
    still_serving(&mut d, &mut q, "chains that do not end");
}

/// The virtio rule that device-readable descriptors come before device-writable
/// ones: a readable buffer after the status is a malformed chain.
#[test]
fn readable_after_writable_is_invalid() {
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    plant(&mut q);
    let chain = RawChain {
        descs: vec![slot(0, 24, false), slot(100, 1, true), slot(200, 4096, false)],
        init: vec![(0, raw_header(Op::Put as u8, 0, 0, 1000, 0))],
        ..RawChain::default()
    };
    let c = q.roundtrip_raw(&chain).unwrap();
    assert_eq!((c.status(), c.used_len), (INVALID, 1));
    still_serving(&mut d, &mut q, "readable after writable");
}

/// Ring-level abuse: an avail entry naming a descriptor beyond the table, and an
/// avail index moved further than the ring is long. The daemon may give up on
/// that queue, but must not die, and other queues and devices keep working.
#[test]
fn bogus_avail_ring_does_not_kill_the_daemon() {
    let mut d = Daemon::with(2, &["--queues", "2"]);
    let (_vmm1, mut q1) = d.connect(1, Daemon::vmm_config(1, true));
    plant(&mut q1[0]);
    let (_vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    plant(&mut qs[0]);
    let size = qs[1].size();
    qs[1].publish_bogus(size + 5, 1).unwrap();
    qs[1].publish_bogus(0, size + 10).unwrap();
    // Give the daemon the chance to trip over it: a round trip on queue 0 of the
    // same device is processed by another worker; then check everything.
    let mut q0 = qs.remove(0);
    still_serving(&mut d, &mut q0, "bogus avail ring (same device, other queue)");
    still_serving(&mut d, &mut q1[0], "bogus avail ring (other device)");
}

/// "Nothing the guest sends makes the daemon panic, exit, or touch another
/// device's pages": a few hundred random chains (random lengths, directions,
/// addresses, header bytes) on VM 0 while VM 1's pages sit in the store.
#[test]
fn random_chains_do_no_harm() {
    let mut d = Daemon::with(2, &[]);
    let (_vmm1, mut q1) = d.connect(1, Daemon::vmm_config(1, true));
    plant(&mut q1[0]);
    let (_vmm, mut q0) = d.connect(0, Daemon::vmm_config(1, true));
    let q = &mut q0[0];
    plant(q);
    let end = q.guest_mem_end();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..400 {
        let ndesc = 1 + rnd(6) as usize;
        let mut descs = Vec::new();
        let mut off = 0u32;
        let mut init = Vec::new();
        let mut hdr = raw_header(1 + rnd(6) as u8, 0, 0, 1000 + rnd(3) as u32, rnd(10));
        if rnd(4) == 0 {
            hdr[1] = rnd(256) as u8;
        }
        init.push((0u32, hdr));
        for _ in 0..ndesc {
            let len = match rnd(5) {
                0 => rnd(30) as u32,
                1 => 24,
                2 => 4096,
                3 => 1,
                _ => rnd(5000) as u32,
            };
            let writable = rnd(2) == 0;
            let addr = match rnd(10) {
                0 => DescAddr::Gpa(rnd(2) * end + rnd(1 << 20)),
                1 => DescAddr::Gpa(u64::MAX - rnd(4096)),
                _ => DescAddr::Slot(off.min(8000)),
            };
            descs.push(DescSpec {
                addr,
                len: len.min(4200),
                writable,
            });
            off += len.min(4200);
        }
        let chain = RawChain {
            descs,
            init,
            indirect: rnd(3) == 0,
            ..RawChain::default()
        };
        let c = q.roundtrip_raw(&chain).unwrap();
        assert!(
            matches!(c.used_len, 0 | 1 | 4097),
            "round {round}: used len {} for {chain:?}",
            c.used_len
        );
        if c.used_len > 0 && c.written.len() == c.used_len as usize {
            assert!(
                c.status().is_some(),
                "round {round}: status byte {:?}",
                c.status_byte()
            );
        }
    }
    // Planted pages 0..8 of pool 1000 on VM 0 may have been legitimately changed by
    // random but valid requests; VM 1's must be exactly as planted.
    let mut q1 = q1.remove(0);
    still_serving(&mut d, &mut q1, "random chains on the other VM");
}
