//! Wire protocol v1 (docs/protocol.md), checked against the real daemon
//! over a real vhost-user socket. Each test names the clause it checks.

mod common;

use common::{page, Daemon};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_tmem::{
    device::request::MAX_DESCRIPTORS,
    harness::frontend::{feature, fill_page, header, GuestRequest, Layout, Virtqueue},
    protocol::{Op, Status, FLAG_EXCLUSIVE, HEADER_SIZE, PAGE_SIZE},
};
use virtio_bindings::bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC},
};

const OK: Option<Status> = Some(Status::Ok);
const NOT_FOUND: Option<Status> = Some(Status::NotFound);

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

/// "Config space (little-endian, 32 bytes, read-only)": every field at its offset.
#[test]
fn config_space_layout_and_values() {
    let d = Daemon::with(1, &["--queues", "3", "--capacity", "1G"]);
    let (mut vmm, _q) = d.connect(0, Daemon::vmm_config(1, true));
    let c = vmm.config_space().unwrap();
    assert_eq!(&c[0..4], b"TMEM", "magic 0x4D454D54");
    assert_eq!(u16::from_le_bytes([c[4], c[5]]), 1, "version");
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 3, "num_queues = --queues");
    assert_eq!(le32(&c[8..12]), 4096, "page_size");
    assert_eq!(le32(&c[12..16]), 0b11, "caps: EXCLUSIVE_GET | PUT_FILL");
    assert_eq!(
        u64::from_le_bytes(c[16..24].try_into().unwrap()),
        (1u64 << 30) / 4096,
        "capacity_pages = --capacity / page size"
    );
    assert_eq!(&c[24..32], &[0u8; 8], "reserved");
    // A partial read returns the same bytes.
    assert_eq!(vmm.read_config(6, 2).unwrap(), c[6..8].to_vec());
}

/// "capacity_pages: 0 = the driver decides" when --capacity is not given.
#[test]
fn config_capacity_defaults_to_zero() {
    let d = Daemon::start();
    let (mut vmm, _q) = d.connect1();
    let c = vmm.config_space().unwrap();
    assert_eq!(&c[16..24], &[0u8; 8]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "default --queues is 1");
}

/// "Feature bits. VIRTIO_F_VERSION_1 is required; EVENT_IDX and INDIRECT_DESC are
/// offered. There are no device-specific feature bits." Plus the vhost-user
/// protocol features a VMM needs (config space, multiqueue, RESET_DEVICE).
#[test]
fn feature_bits_offered() {
    let d = Daemon::with(1, &["--queues", "2"]);
    let (vmm, _q) = d.connect(0, Daemon::vmm_config(2, true));
    let f = vmm.offered_features();
    assert_ne!(f & feature(VIRTIO_F_VERSION_1), 0, "VERSION_1");
    assert_ne!(f & feature(VIRTIO_RING_F_EVENT_IDX), 0, "EVENT_IDX");
    assert_ne!(f & feature(VIRTIO_RING_F_INDIRECT_DESC), 0, "INDIRECT_DESC");
    assert_eq!(f & 0x00ff_ffff, 0, "no device-specific feature bits (0..23)");
    let p = vmm.protocol_features();
    for needed in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::RESET_DEVICE,
    ] {
        assert!(p.contains(needed), "protocol feature {needed:?} missing");
    }
    assert_eq!(vmm.daemon_queues(), 2, "GET_QUEUE_NUM = --queues");
    assert_eq!(
        vmm.acked_features() & feature(VIRTIO_RING_F_EVENT_IDX),
        feature(VIRTIO_RING_F_EVENT_IDX)
    );
}

/// "Ops and flags" / "Used length = bytes written: 4097 for a successful GET,
/// otherwise 1", run once with EVENT_IDX negotiated and once without.
fn every_op(q: &mut Virtqueue) {
    let p1 = page(1);
    let p2 = page(2);

    let r = q.get(7, 1, false).unwrap();
    assert_eq!((r.status, r.used_len), (NOT_FOUND, 1), "GET of nothing");

    let r = q.put(7, 1, &p1).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 1), "PUT");

    let r = q.get(7, 1, false).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 4097), "GET");
    assert_eq!(r.page, p1, "GET returns the page PUT");

    // "A PUT over an existing page replaces it."
    let r = q.put(7, 1, &p2).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 1));
    let r = q.get(7, 1, false).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 4097));
    assert_eq!(r.page, p2, "PUT replaced the page");

    // "flags bit0 EXCLUSIVE on GET: remove the page after a successful read."
    let r = q.get(7, 1, true).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 4097), "GET exclusive");
    assert_eq!(r.page, p2);
    let r = q.get(7, 1, false).unwrap();
    assert_eq!((r.status, r.used_len), (NOT_FOUND, 1), "exclusive GET removed it");
    let r = q.get(7, 1, true).unwrap();
    assert_eq!((r.status, r.used_len), (NOT_FOUND, 1), "exclusive GET of nothing");

    // "5 PUT_FILL (the page is the u64 arg repeated)."
    let r = q.put_fill(7, 2, 0xDEAD_BEEF_0BAD_F00D).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 1), "PUT_FILL");
    let r = q.get(7, 2, false).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 4097));
    assert_eq!(r.page, fill_page(0xDEAD_BEEF_0BAD_F00D), "fill page");
    let r = q.put_fill(7, 3, 0).unwrap();
    assert_eq!(r.status, OK);
    assert_eq!(q.get(7, 3, false).unwrap().page, vec![0u8; PAGE_SIZE]);

    // "3 INVALIDATE_PAGE"
    let r = q.invalidate_page(7, 2).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 1), "INVALIDATE_PAGE");
    let r = q.get(7, 2, false).unwrap();
    assert_eq!((r.status, r.used_len), (NOT_FOUND, 1), "invalidated");
    // Invalidating what is not there is harmless; the status is OK or NOT_FOUND.
    let r = q.invalidate_page(7, 2).unwrap();
    assert!(matches!(r.status, OK | NOT_FOUND), "{r:?}");
    assert_eq!(r.used_len, 1);

    // "4 INVALIDATE_POOL": the whole pool goes, other pools stay.
    for i in 0..10 {
        assert_eq!(q.put(8, i, &page(100 + i)).unwrap().status, OK);
        assert_eq!(q.put(9, i, &page(200 + i)).unwrap().status, OK);
    }
    let r = q.invalidate_pool(8).unwrap();
    assert_eq!((r.status, r.used_len), (OK, 1), "INVALIDATE_POOL");
    for i in 0..10 {
        assert_eq!(q.get(8, i, false).unwrap().status, NOT_FOUND);
        let r = q.get(9, i, false).unwrap();
        assert_eq!((r.status, r.used_len), (OK, 4097));
        assert_eq!(r.page, page(200 + i), "pool 9 untouched");
    }

    // Pools are separate namespaces: the same index in two pools is two pages.
    assert_eq!(q.put(10, 5, &p1).unwrap().status, OK);
    assert_eq!(q.put(11, 5, &p2).unwrap().status, OK);
    assert_eq!(q.get(10, 5, false).unwrap().page, p1);
    assert_eq!(q.get(11, 5, false).unwrap().page, p2);

    // Index and pool are full-width fields.
    assert_eq!(q.put(u32::MAX, u64::MAX, &p1).unwrap().status, OK);
    assert_eq!(q.get(u32::MAX, u64::MAX, false).unwrap().page, p1);
    assert_eq!(q.get(u32::MAX, u64::MAX - 1, false).unwrap().status, NOT_FOUND);
}

#[test]
fn every_op_with_event_idx() {
    let d = Daemon::start();
    let (_vmm, mut q) = d.connect(0, Daemon::vmm_config(1, true));
    assert!(q[0].event_idx());
    every_op(&mut q[0]);
}

#[test]
fn every_op_without_event_idx() {
    let d = Daemon::start();
    let (_vmm, mut q) = d.connect(0, Daemon::vmm_config(1, false));
    assert!(!q[0].event_idx());
    every_op(&mut q[0]);
}

/// "Each queue is processed in order": a pipelined batch of dependent requests on
/// one queue sees each earlier request's effect.
#[test]
fn queue_is_processed_in_order() {
    for event_idx in [true, false] {
        let d = Daemon::start();
        let (_vmm, mut qs) = d.connect(0, Daemon::vmm_config(1, event_idx));
        let q = &mut qs[0];
        let mut expect = Vec::new();
        for i in 0..20u64 {
            let p = page(i);
            // Indirect: one ring descriptor each, so all 80 fit the ring at once.
            let ind = |r: GuestRequest| {
                let l = r.layout.clone().with_indirect(true);
                r.with_layout(l)
            };
            q.submit(&ind(GuestRequest::new(header(Op::Put, 0, 1, i, 0), Some(&p))))
                .unwrap();
            expect.push((OK, 1, None));
            q.submit(&ind(GuestRequest::new(header(Op::Get, 0, 1, i, 0), None)))
                .unwrap();
            expect.push((OK, 4097, Some(p)));
            q.submit(&ind(GuestRequest::new(
                header(Op::InvalidatePage, 0, 1, i, 0),
                None,
            )))
            .unwrap();
            expect.push((OK, 1, None));
            q.submit(&ind(GuestRequest::new(
                header(Op::Get, FLAG_EXCLUSIVE, 1, i, 0),
                None,
            )))
            .unwrap();
            expect.push((NOT_FOUND, 1, None));
        }
        for (n, (status, used, data)) in expect.into_iter().enumerate() {
            let c = q.complete().unwrap();
            assert_eq!(c.token, n as u64, "used ring order");
            assert_eq!((c.status(), c.used_len), (status, used), "request {n}");
            if let Some(p) = data {
                assert_eq!(c.payload(), &p[..], "request {n}");
            }
        }
    }
}

/// Ring indices are 16 bits and wrap; with EVENT_IDX the notification arithmetic
/// must survive the wrap too. 2^16 + some requests, pipelined.
#[test]
fn ring_indices_wrap_around() {
    for event_idx in [true, false] {
        let d = Daemon::start();
        let (_vmm, mut qs) = d.connect(0, Daemon::vmm_config(1, event_idx));
        let q = &mut qs[0];
        assert_eq!(q.put(0, 0, &page(9)).unwrap().status, OK);
        let total = (1u64 << 16) + 300;
        let depth = 32;
        let mut sent = 0u64;
        let mut done = 0u64;
        while done < total {
            while sent < total && q.in_flight() < depth {
                // Cheap requests keep this quick; alternate ops so both paths wrap.
                let req = if sent % 2 == 0 {
                    GuestRequest::new(header(Op::InvalidatePage, 0, 1, sent, 0), None)
                } else {
                    GuestRequest::new(header(Op::PutFill, 0, 1, sent, sent), None)
                };
                q.submit(&req).unwrap();
                sent += 1;
            }
            let c = q.complete().unwrap();
            assert_eq!(c.used_len, 1);
            assert!(matches!(c.status(), OK | NOT_FOUND), "{c:?}");
            done += 1;
        }
        let r = q.get(0, 0, false).unwrap();
        assert_eq!((r.status, r.used_len), (OK, 4097));
        assert_eq!(r.page, page(9));
        let r = q.get(1, total - 1, false).unwrap();
        assert_eq!(r.page, fill_page(total - 1));
        let (kicks, interrupts) = q.notify_counts();
        assert!(kicks > 0 && interrupts > 0);
    }
}

/// "--queues N (one worker thread per queue)" / "Queues are independent of each
/// other": four queues driven at once from four threads, all one device, so pages
/// put on one queue are visible on another.
#[test]
fn several_queues_from_several_threads() {
    let d = Daemon::with(1, &["--queues", "4"]);
    let (_vmm, qs) = d.connect(0, Daemon::vmm_config(4, true));
    let handles: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || {
                let pool = t as u32;
                let mut tokens = 0;
                for i in 0..200u64 {
                    let p = page(1000 * t as u64 + i);
                    q.submit(&GuestRequest::new(header(Op::Put, 0, pool, i, 0), Some(&p)))
                        .unwrap();
                    tokens += 1;
                    if q.in_flight() >= 8 {
                        let c = q.complete().unwrap();
                        assert_eq!((c.status(), c.used_len), (OK, 1));
                        tokens -= 1;
                    }
                }
                for _ in 0..tokens {
                    let c = q.complete().unwrap();
                    assert_eq!((c.status(), c.used_len), (OK, 1));
                }
                for i in 0..200u64 {
                    let r = q.get(pool, i, false).unwrap();
                    assert_eq!((r.status, r.used_len), (OK, 4097));
                    assert_eq!(r.page, page(1000 * t as u64 + i));
                }
                q
            })
        })
        .collect();
    let mut qs: Vec<Virtqueue> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Cross-queue visibility: queue 3 reads what queue 0 wrote, and so on.
    for t in 0..4u64 {
        let q = &mut qs[((t + 1) % 4) as usize];
        let r = q.get(t as u32, 199, false).unwrap();
        assert_eq!(r.page, page(1000 * t + 199));
    }
}

/// "The layout of descriptors is free: header, page and status may be split across
/// descriptors or share them." PUT with its readable stream (header + page) cut at
/// every byte of the header, around every header/page edge and at page offsets,
/// once and twice, direct and indirect, with and without gaps between buffers.
#[test]
fn put_in_every_layout() {
    let d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    let total = HEADER_SIZE + PAGE_SIZE;
    let mut cuts: Vec<Vec<usize>> = vec![vec![]];
    let singles: Vec<usize> = (1..=40)
        .chain([100, 511, 512, 2048, 2072, 4000])
        .chain(total - 40..total)
        .collect();
    cuts.extend(singles.iter().map(|&c| vec![c]));
    for a in (1..HEADER_SIZE).step_by(5) {
        for b in [HEADER_SIZE, HEADER_SIZE + 1, 1000, total - 1] {
            cuts.push(vec![a, b]);
        }
    }
    // Byte-granular header (24 one-byte descriptors) and the page in 39 pieces:
    // with the status, 64 descriptors, the most the daemon takes in one chain.
    let mut fine: Vec<usize> = (1..=HEADER_SIZE).collect();
    fine.extend((1..39).map(|k| HEADER_SIZE + k * 100));
    assert_eq!(fine.len() + 1 + 1, MAX_DESCRIPTORS);
    cuts.push(fine);
    let mut n = 0u64;
    for c in &cuts {
        for indirect in [false, true] {
            for gap in [0, 64] {
                let p = page(n);
                let layout = Layout {
                    readable: Layout::cut(total, c),
                    writable: vec![1],
                    indirect,
                    gap,
                };
                let req =
                    GuestRequest::new(header(Op::Put, 0, 3, n, 0), Some(&p)).with_layout(layout.clone());
                let done = q.roundtrip(&req).unwrap();
                assert_eq!((done.status(), done.used_len), (OK, 1), "PUT layout {layout:?}");
                let r = q.get(3, n, false).unwrap();
                assert_eq!(r.page, p, "page read back after PUT layout {layout:?}");
                n += 1;
            }
        }
    }
}

/// Same clause for GET: the header cut anywhere, and the writable stream (page +
/// status) cut anywhere, including page and status sharing one descriptor and
/// the status alone.
#[test]
fn get_in_every_layout() {
    let d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    let p = page(77);
    assert_eq!(q.put(4, 4, &p).unwrap().status, OK);
    let wtotal = PAGE_SIZE + 1;
    let mut rcuts: Vec<Vec<usize>> = vec![vec![]];
    rcuts.extend((1..HEADER_SIZE).map(|c| vec![c]));
    let mut wcuts: Vec<Vec<usize>> = vec![vec![], vec![PAGE_SIZE]];
    wcuts.extend((1..=16).map(|c| vec![c]));
    wcuts.extend((PAGE_SIZE - 16..PAGE_SIZE).map(|c| vec![c]));
    wcuts.extend([vec![2048], vec![1, PAGE_SIZE], vec![100, 2000, 4000, PAGE_SIZE]]);
    // With the header, 64 descriptors, the most the daemon takes in one chain:
    // 62 writable of 65 bytes, then the rest with the status.
    wcuts.push((1..63).map(|k| k * 65).collect());
    assert_eq!(wcuts.last().unwrap().len() + 1 + 1, MAX_DESCRIPTORS);
    let mut cases = Vec::new();
    for r in &rcuts {
        cases.push((r.clone(), vec![]));
    }
    for w in &wcuts {
        cases.push((vec![], w.clone()));
        if w.len() + 3 <= MAX_DESCRIPTORS {
            cases.push((vec![7], w.clone()));
        }
    }
    for (rc, wc) in cases {
        for indirect in [false, true] {
            for gap in [0, 64] {
                let layout = Layout {
                    readable: Layout::cut(HEADER_SIZE, &rc),
                    writable: Layout::cut(wtotal, &wc),
                    indirect,
                    gap,
                };
                let req = GuestRequest::new(header(Op::Get, 0, 4, 4, 0), None).with_layout(layout.clone());
                let done = q.roundtrip(&req).unwrap();
                assert_eq!(
                    (done.status(), done.used_len),
                    (OK, 4097),
                    "GET layout {layout:?}"
                );
                assert_eq!(done.payload(), &p[..], "GET layout {layout:?}");
            }
        }
    }
    // A GET that misses writes only the status, into the last writable byte,
    // whatever the layout.
    for wc in [vec![], vec![PAGE_SIZE], vec![10, 4000]] {
        let layout = Layout {
            readable: vec![HEADER_SIZE as u32],
            writable: Layout::cut(wtotal, &wc),
            indirect: false,
            gap: 64,
        };
        let req = GuestRequest::new(header(Op::Get, 0, 4, 5, 0), None).with_layout(layout);
        let done = q.roundtrip(&req).unwrap();
        assert_eq!((done.status(), done.used_len), (NOT_FOUND, 1));
    }
}

/// Header-only ops (INVALIDATE_*, PUT_FILL) in split layouts too.
#[test]
fn header_only_ops_in_split_layouts() {
    let d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    for cut in 1..HEADER_SIZE {
        for indirect in [false, true] {
            let layout = Layout {
                readable: Layout::cut(HEADER_SIZE, &[cut]),
                writable: vec![1],
                indirect,
                gap: 16,
            };
            let v = cut as u64 * 0x0101_0101;
            let req =
                GuestRequest::new(header(Op::PutFill, 0, 2, cut as u64, v), None).with_layout(layout.clone());
            assert_eq!(q.roundtrip(&req).unwrap().status(), OK, "{layout:?}");
            assert_eq!(q.get(2, cut as u64, false).unwrap().page, fill_page(v));
            let req = GuestRequest::new(header(Op::InvalidatePage, 0, 2, cut as u64, 0), None)
                .with_layout(layout.clone());
            assert_eq!(q.roundtrip(&req).unwrap().status(), OK, "{layout:?}");
            assert_eq!(q.get(2, cut as u64, false).unwrap().status, NOT_FOUND);
        }
    }
    let req = GuestRequest::new(header(Op::InvalidatePool, 0, 2, 0, 0), None).with_layout(Layout {
        readable: vec![1; HEADER_SIZE],
        writable: vec![1],
        indirect: true,
        gap: 1,
    });
    assert_eq!(q.roundtrip(&req).unwrap().status(), OK);
}

/// "A REJECTED put also invalidates the old copy": with a tiny RAM budget and no
/// spill file, PUTs of incompressible pages are eventually REJECTED; whatever a
/// PUT answers, a GET of that index must agree with it (the new page after OK,
/// nothing after REJECTED, never the old page).
#[test]
fn rejected_put_invalidates_the_old_copy() {
    let d = Daemon::with(1, &["--mem-limit", "1M"]);
    let (_vmm, mut q) = d.connect1();
    let mut rejected = 0;
    for i in 0..600u64 {
        let r = q.put(1, i, &page(i)).unwrap();
        assert_eq!(r.used_len, 1);
        match r.status {
            OK => {}
            Some(Status::Rejected) => rejected += 1,
            other => panic!("PUT {i}: {other:?}"),
        }
    }
    assert!(rejected > 0, "a 1 MiB budget took 600 random pages");
    // Overwrite every index with a different page and check each answer.
    for i in 0..600u64 {
        let new = page(10_000 + i);
        let put = q.put(1, i, &new).unwrap();
        let get = q.get(1, i, false).unwrap();
        match put.status {
            OK => assert_eq!(get.page, new, "index {i}: OK put, GET differs"),
            Some(Status::Rejected) => assert_eq!(
                (get.status, get.used_len),
                (NOT_FOUND, 1),
                "index {i}: REJECTED put left a copy"
            ),
            other => panic!("PUT {i}: {other:?}"),
        }
    }
}
