//! Device life cycle (docs/protocol.md §6): reset, reboot, pause, disconnect and reconnect,
//! several VMs on one daemon, shutdown. "A device reset drops every page of that
//! device. No page from an earlier boot can ever be returned."

mod common;

use std::time::{Duration, Instant};

use common::{page, Daemon, TIMEOUT};
use vhost_user_tmem::{
    harness::frontend::{header, GuestRequest, Virtqueue},
    protocol::Op,
    protocol::Status,
};

const OK: Option<Status> = Some(Status::Ok);
const NOT_FOUND: Option<Status> = Some(Status::NotFound);

/// A GET of (pool, index) finds nothing: NOT_FOUND, with only the status byte written.
fn assert_not_found(q: &mut Virtqueue, pool: u32, index: u64, what: &str) {
    let r = q.get(pool, index, false).unwrap();
    assert_eq!((r.status, r.used_len), (NOT_FOUND, 1), "{what}");
}

/// Polls `cond` until it holds; the daemon drops pages asynchronously after a
/// disconnect, so this is how a test waits for it without fixed sleeps.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    let mut backoff = Duration::from_millis(1);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

/// "Device reset: ... Offer [RESET_DEVICE], and drop the device's pages in
/// reset_device()". The sequence QEMU sends on a virtio reset: stop every ring
/// (GET_VRING_BASE), RESET_DEVICE, then the driver sets the device up again.
#[test]
fn reset_device_drops_pages() {
    let d = Daemon::with(1, &["--queues", "2"]);
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    for i in 0..10 {
        assert_eq!(qs[(i % 2) as usize].put(1, i, &page(i)).unwrap().status, OK);
    }
    assert_eq!(d.guest_counter(0, "stored_pages"), 10);
    vmm.stop().unwrap();
    vmm.reset_device().unwrap();
    drop(qs);
    let mut qs = vmm.start().unwrap();
    for i in 0..10 {
        assert_not_found(
            &mut qs[(i % 2) as usize],
            1,
            i,
            &format!("page {i} survived the reset"),
        );
    }
    // "... nor leak host memory."
    assert_eq!(d.guest_counter(0, "stored_pages"), 0);
    // And the device works in its new life.
    assert_eq!(qs[1].put(1, 3, &page(33)).unwrap().status, OK);
    assert_eq!(qs[0].get(1, 3, false).unwrap().page, page(33));
}

/// "Check what QEMU actually sends when a guest reboots: it stops the vrings with
/// GET_VRING_BASE." A reboot with no RESET_DEVICE: rings stopped, then set up anew
/// by the new boot's driver (fresh rings, base 0). Old pages must not come back.
#[test]
fn reboot_without_reset_message_drops_pages() {
    let d = Daemon::start();
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(1, true));
    for i in 0..5 {
        assert_eq!(qs[0].put(2, i, &page(i)).unwrap().status, OK);
    }
    vmm.stop().unwrap();
    drop(qs);
    let mut qs = vmm.start().unwrap();
    for i in 0..5 {
        assert_not_found(&mut qs[0], 2, i, &format!("page {i} from the old boot"));
    }
    assert_eq!(d.guest_counter(0, "stored_pages"), 0, "old boot's pages leaked");
}

/// The legacy reset: a VMM that does not ack RESET_DEVICE stops the rings and
/// sends RESET_OWNER. Pages go all the same.
#[test]
fn reset_owner_drops_pages() {
    let d = Daemon::start();
    let mut cfg = Daemon::vmm_config(1, true);
    cfg.reset_device = false;
    let (mut vmm, mut qs) = d.connect(0, cfg);
    for i in 0..5 {
        assert_eq!(qs[0].put(2, i, &page(i)).unwrap().status, OK);
    }
    vmm.stop().unwrap();
    vmm.reset_owner().unwrap();
    drop(qs);
    let mut qs = vmm.start().unwrap();
    for i in 0..5 {
        assert_not_found(&mut qs[0], 2, i, &format!("page {i} after RESET_OWNER"));
    }
}

/// A paused VM is not a rebooted one: QEMU stops the rings on `stop` and resumes
/// them on `cont` with the same rings and SET_VRING_BASE at the old position. The
/// guest still relies on its pages, so they must all be there.
#[test]
fn pause_and_continue_keeps_pages() {
    let d = Daemon::with(1, &["--queues", "2"]);
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    for i in 0..10 {
        assert_eq!(qs[(i % 2) as usize].put(1, i, &page(i)).unwrap().status, OK);
    }
    let bases = vmm.stop().unwrap();
    assert_eq!(bases, vec![5, 5], "GET_VRING_BASE returns the next avail index");
    vmm.resume(&qs, &bases).unwrap();
    for i in 0..10 {
        let r = qs[((i + 1) % 2) as usize].get(1, i, false).unwrap();
        assert_eq!((r.status, r.used_len), (OK, 4097), "page {i} lost by a pause");
        assert_eq!(r.page, page(i));
    }
}

/// "It serves again after a VMM disconnects: a disconnect means that device's
/// pages are dropped." Several times in a row.
#[test]
fn disconnect_drops_pages_and_serves_again() {
    let mut d = Daemon::start();
    for round in 0..3u64 {
        let (vmm, mut q) = d.connect1();
        assert_not_found(
            &mut q,
            1,
            1,
            &format!("round {round}: page from the previous connection"),
        );
        for i in 0..20 {
            assert_eq!(q.put(1, i, &page(round * 100 + i)).unwrap().status, OK);
        }
        assert_eq!(q.get(1, 1, false).unwrap().page, page(round * 100 + 1));
        vmm.disconnect();
        drop(q);
        eventually("pages dropped after disconnect", || {
            d.guest_counter(0, "stored_pages") == 0
        });
        eventually("device shown disconnected", || {
            d.stats()["devices"][0]["connected"] == false
        });
        d.assert_alive();
    }
}

/// A VMM that vanishes with requests in flight (never waits for them).
#[test]
fn disconnect_with_requests_in_flight() {
    let mut d = Daemon::start();
    {
        let (vmm, mut q) = d.connect1();
        // 40 three-descriptor chains: as much as the 128-entry ring holds.
        for i in 0..40 {
            let p = page(i);
            q.submit(&GuestRequest::new(header(Op::Put, 0, 1, i, 0), Some(&p)))
                .unwrap();
        }
        vmm.disconnect();
        drop(q);
    }
    eventually("pages dropped", || d.guest_counter(0, "stored_pages") == 0);
    d.assert_alive();
    let (_vmm, mut q) = d.connect1();
    assert_eq!(q.get(1, 0, false).unwrap().status, NOT_FOUND);
    assert_eq!(q.put(1, 0, &page(1)).unwrap().status, OK);
}

/// "--socket PATH (repeatable: each socket is one device for one VM; all share one
/// store)" with "no page visible across them": same pool and index on two VMs are
/// two pages, and one VM's invalidate, reset or disconnect leaves the other alone.
#[test]
fn two_vms_are_isolated() {
    let d = Daemon::with(2, &[]);
    let (mut vmm0, mut q0) = d.connect(0, Daemon::vmm_config(1, true));
    let (_vmm1, mut q1) = d.connect(1, Daemon::vmm_config(1, false));
    for i in 0..10 {
        assert_eq!(q0[0].put(1, i, &page(i)).unwrap().status, OK);
        assert_eq!(q1[0].put(1, i, &page(1000 + i)).unwrap().status, OK);
    }
    // VM 1 only has pool 2.
    assert_eq!(q1[0].put(2, 0, &page(2000)).unwrap().status, OK);
    for i in 0..10 {
        assert_eq!(q0[0].get(1, i, false).unwrap().page, page(i));
        assert_eq!(q1[0].get(1, i, false).unwrap().page, page(1000 + i));
    }
    assert_eq!(
        q0[0].get(2, 0, false).unwrap().status,
        NOT_FOUND,
        "VM 1's page seen by VM 0"
    );
    // Exclusive GET and INVALIDATE_POOL on VM 0 leave VM 1's copies.
    assert_eq!(q0[0].get(1, 0, true).unwrap().status, OK);
    assert_eq!(q0[0].invalidate_pool(1).unwrap().status, OK);
    assert_eq!(q1[0].get(1, 0, false).unwrap().page, page(1000));
    assert_eq!(q1[0].get(1, 9, false).unwrap().page, page(1009));
    // A reset of VM 0 leaves VM 1's pages.
    assert_eq!(q0[0].put(3, 3, &page(3)).unwrap().status, OK);
    vmm0.stop().unwrap();
    vmm0.reset_device().unwrap();
    drop(q0);
    let mut q0 = vmm0.start().unwrap();
    assert_eq!(q0[0].get(3, 3, false).unwrap().status, NOT_FOUND);
    for i in 0..10 {
        assert_eq!(q1[0].get(1, i, false).unwrap().page, page(1000 + i));
    }
    // Per-guest accounting: the store sees two guests.
    assert_eq!(d.guest_counter(1, "stored_pages"), 11);
    // A disconnect of VM 0 leaves VM 1's pages.
    assert_eq!(q0[0].put(3, 3, &page(3)).unwrap().status, OK);
    vmm0.disconnect();
    drop(q0);
    eventually("VM 0 pages dropped", || d.guest_counter(0, "stored_pages") == 0);
    for i in 0..10 {
        assert_eq!(q1[0].get(1, i, false).unwrap().page, page(1000 + i));
    }
    assert_eq!(d.guest_counter(1, "stored_pages"), 11);
}

/// Both VMs busy at once from their own threads.
#[test]
fn two_vms_concurrently() {
    let d = Daemon::with(2, &["--queues", "2"]);
    let mut threads = Vec::new();
    let mut vmms = Vec::new();
    for vm in 0..2 {
        let (vmm, qs) = d.connect(vm, Daemon::vmm_config(2, vm == 0));
        for (qi, mut q) in qs.into_iter().enumerate() {
            threads.push(std::thread::spawn(move || {
                let seed = (vm * 10 + qi) as u64 * 10_000;
                for i in 0..300u64 {
                    assert_eq!(q.put(qi as u32, i, &page(seed + i)).unwrap().status, OK);
                }
                for i in 0..300u64 {
                    let r = q.get(qi as u32, i, false).unwrap();
                    assert_eq!(r.page, page(seed + i), "vm {vm} queue {qi} page {i}");
                }
            }));
        }
        // The connection must stay open until the threads are done.
        vmms.push(vmm);
    }
    for t in threads {
        t.join().unwrap();
    }
    drop(vmms);
}

/// "It exits 0 on SIGINT/SIGTERM", with and without a VMM attached.
#[test]
fn exits_zero_on_sigterm() {
    let mut d = Daemon::start();
    assert!(d.terminate().success(), "idle daemon, SIGTERM");
    let mut d = Daemon::start();
    let (_vmm, mut q) = d.connect1();
    assert_eq!(q.put(0, 0, &page(0)).unwrap().status, OK);
    assert!(d.terminate().success(), "daemon with a VMM attached, SIGTERM");
    let mut d = Daemon::start();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.pid(), libc::SIGINT) };
    let deadline = Instant::now() + TIMEOUT;
    let st = loop {
        if let Some(st) = d.try_wait() {
            break st;
        }
        assert!(Instant::now() < deadline, "SIGINT ignored");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(st.success(), "SIGINT exit status {st}");
}

/// A reboot under traffic on every queue, again and again: the old boot
/// leaves many pages, so dropping them takes a while, and the new boot's
/// requests arrive on every queue as soon as the rings are up. No request of
/// the new boot may be served before the old pages are gone: an old page
/// must never be returned, and no put answered OK may be lost to a late drop.
#[test]
fn reboot_under_traffic_on_every_queue_loses_no_acknowledged_page() {
    const QUEUES: usize = 4;
    const OLD: u64 = 20_000;
    const NEW: u64 = 400;
    let d = Daemon::with(1, &["--queues", "4"]);
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(QUEUES, true));
    for round in 0..5u64 {
        std::thread::scope(|s| {
            for (k, q) in qs.iter_mut().enumerate() {
                s.spawn(move || {
                    for i in (k as u64..OLD).step_by(QUEUES) {
                        let r = q.put_fill(1, i, (round << 32) | i).unwrap();
                        assert_eq!(r.status, OK, "round {round}: old put {i}");
                    }
                });
            }
        });
        vmm.stop().unwrap();
        drop(qs);
        qs = vmm.start().unwrap();
        std::thread::scope(|s| {
            for (k, q) in qs.iter_mut().enumerate() {
                s.spawn(move || {
                    for i in (k as u64..NEW).step_by(QUEUES) {
                        // Only the old boot stored at NEW + i.
                        let r = q.get(1, NEW + i, false).unwrap();
                        assert_eq!(r.status, NOT_FOUND, "round {round}: old page {} served", NEW + i);
                        let r = q.put(1, i, &page(round * 1_000 + i)).unwrap();
                        assert_eq!(r.status, OK, "round {round}: new put {i}");
                    }
                });
            }
        });
        for i in 0..NEW {
            let r = qs[(i as usize + 1) % QUEUES].get(1, i, false).unwrap();
            assert_eq!(
                (r.status, r.used_len),
                (OK, 4097),
                "round {round}: acknowledged page {i} lost"
            );
            assert_eq!(r.page, page(round * 1_000 + i), "round {round}: page {i}");
        }
        assert_eq!(d.guest_counter(0, "stored_pages"), NEW, "round {round}");
    }
}

/// A pause in which only one queue ever carried requests: the idle rings
/// stop and resume with nothing done, and the first request after the resume
/// lands on one of them. Every page must still be there, pause after pause.
#[test]
fn pause_with_idle_queues_keeps_pages() {
    let d = Daemon::with(1, &["--queues", "4"]);
    let (mut vmm, mut qs) = d.connect(0, Daemon::vmm_config(4, true));
    for i in 0..10 {
        assert_eq!(qs[1].put(1, i, &page(i)).unwrap().status, OK);
    }
    for (round, idle) in [0usize, 2, 3].into_iter().enumerate() {
        let bases = vmm.stop().unwrap();
        assert_eq!(bases[1], 10 + 10 * round as u32, "round {round}");
        vmm.resume(&qs, &bases).unwrap();
        let r = qs[idle].get(1, 0, false).unwrap();
        assert_eq!(
            (r.status, r.used_len),
            (OK, 4097),
            "round {round}: first get on idle queue {idle}"
        );
        for i in 0..10 {
            let r = qs[1].get(1, i, false).unwrap();
            assert_eq!(
                (r.status, r.used_len),
                (OK, 4097),
                "round {round}: page {i} lost by a pause"
            );
            assert_eq!(r.page, page(i));
        }
    }
}
