//! Per-device budgets over the wire: two devices on one daemon, one with
//! `max=` or a flood of pages, driven the way a VMM drives them.

mod common;

use std::path::PathBuf;

use common::{page, Daemon, TIMEOUT};
use vhost_user_tmem::{
    harness::frontend::{connect_socket, Virtqueue, Vmm},
    protocol::Status,
};

const OK: Option<Status> = Some(Status::Ok);
const REJECTED: Option<Status> = Some(Status::Rejected);

/// A daemon whose device 0 is the harness's `vm0.sock` and device 1 is
/// `vm1.sock` with `options`, both connected with one queue.
fn two_devices(options: &str, extra: &[&str]) -> (Daemon, [(Vmm, Virtqueue); 2]) {
    let second = format!("{{dir}}/vm1.sock{options}");
    let mut args = vec!["--socket", second.as_str()];
    args.extend_from_slice(extra);
    let mut d = Daemon::with(1, &args);
    let path: PathBuf = d.dir().join("vm1.sock");
    // The harness waits for its own sockets only: wait for this one too.
    drop(connect_socket(&path, TIMEOUT).expect("second socket"));
    d.sockets.push(path);
    let connect = |vm| {
        let (vmm, mut q) = d.connect(vm, Daemon::vmm_config(1, true));
        (vmm, q.remove(0))
    };
    let devices = [connect(0), connect(1)];
    (d, devices)
}

fn budget(d: &Daemon, vm: u32) -> serde_json::Value {
    d.stats()["store"]["guests"][vm.to_string()]["budget"].clone()
}

#[test]
fn a_capped_device_is_rejected_and_the_other_is_not() {
    let (d, [(_vm0, mut free), (_vm1, mut capped)]) = two_devices(",max=256K", &["--mem-limit", "64M"]);
    let mut stored = Vec::new();
    for i in 0..200u64 {
        assert_eq!(free.put(0, i, &page(i)).unwrap().status, OK, "device 0 page {i}");
        let r = capped.put(0, i, &page(1000 + i)).unwrap().status;
        assert!(r == OK || r == REJECTED, "{r:?}");
        if r == OK {
            stored.push(i);
        }
    }
    // 256 KiB holds some 60 raw pages with their metadata.
    assert!(stored.len() > 50 && stored.len() < 64, "{}", stored.len());
    let b = budget(&d, 1);
    assert_eq!(b["max_bytes"], 256 << 10, "{b}");
    assert_eq!(b["max_rejects"], 200 - stored.len() as u64, "{b}");
    assert!(b["ram_bytes"].as_u64().unwrap() <= 256 << 10, "{b}");
    assert_eq!(d.guest_counter(0, "failed_stores"), 0);
    assert_eq!(d.guest_counter(0, "stored_pages"), 200);
    assert_eq!(budget(&d, 0)["max_rejects"], 0);

    // A rejected overwrite drops the old copy (frontswap's rule).
    let old = stored[0];
    assert_eq!(capped.put(0, old, &page(7)).unwrap().status, REJECTED);
    assert_eq!(capped.get(0, old, false).unwrap().status, Some(Status::NotFound));
    for &i in &stored[1..] {
        assert_eq!(capped.get(0, i, false).unwrap().page, page(1000 + i));
    }

    // Lifted at run time: the device stores again.
    let r = d.control(r#"{"cmd":"set-device","device":1,"max":"none"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(capped.put(0, 500, &page(500)).unwrap().status, OK);
    // Lowered below its use: nothing is dropped, new puts are refused.
    let r = d.control(r#"{"cmd":"set-device","device":1,"max":"64K"}"#);
    assert_eq!(r["budget"]["max_bytes"], 64 << 10, "{r}");
    assert_eq!(capped.put(0, 501, &page(501)).unwrap().status, REJECTED);
    assert_eq!(capped.get(0, 500, false).unwrap().page, page(500));
    assert_eq!(free.put(0, 501, &page(501)).unwrap().status, OK);
}

/// An attacker (device 0) stores incompressible pages far past its share;
/// the victim (device 1) holds a working set within its share. The
/// attacker's pages are the ones that spill, and the victim's stay in RAM.
#[test]
fn the_over_share_device_spills_first() {
    let (d, [(_vm0, mut attacker), (_vm1, mut victim)]) = two_devices(
        ",weight=2",
        &[
            "--mem-limit",
            "4M",
            "--spill-file",
            "{dir}/spill",
            "--spill-limit",
            "64M",
        ],
    );
    for i in 0..400u64 {
        assert_eq!(victim.put(0, i, &page(i)).unwrap().status, OK);
    }
    for i in 0..3000u64 {
        assert_eq!(
            attacker.put(0, i, &page(10_000 + i)).unwrap().status,
            OK,
            "attacker page {i}"
        );
        if i % 8 == 0 {
            let k = i / 8 % 400;
            assert_eq!(victim.get(0, k, false).unwrap().page, page(k));
        }
    }
    assert_eq!(d.guest_counter(1, "spilled_pages"), 0);
    assert_eq!(d.guest_counter(1, "spill_reads"), 0);
    assert!(d.guest_counter(0, "spilled_pages") > 2000);
    // Both from one snapshot: the shares move with the store's own part.
    let guests = d.stats()["store"]["guests"].clone();
    let (a, v) = (guests["0"]["budget"].clone(), guests["1"]["budget"].clone());
    assert_eq!(v["weight"], 2);
    let share = |b: &serde_json::Value| b["fair_share_bytes"].as_u64().unwrap();
    assert!((share(&v) / 2).abs_diff(share(&a)) <= 1, "{a} {v}");
    assert!(a["ram_bytes"].as_u64().unwrap() > share(&a) / 2, "{a}");
    assert!(v["ram_bytes"].as_u64().unwrap() < share(&v), "{v}");
    assert!(a["spill_bytes"].as_u64().unwrap() > 2000 * 4096, "{a}");
    assert_eq!(v["spill_bytes"], 0);
    for i in 0..400u64 {
        assert_eq!(victim.get(0, i, false).unwrap().page, page(i));
    }
    // The weight can be changed at run time, the device must exist.
    let r = d.control(r#"{"cmd":"set-device","device":0,"weight":4}"#);
    assert_eq!(r["budget"]["weight"], 4, "{r}");
    let r = d.control(r#"{"cmd":"set-device","device":2,"weight":4}"#);
    assert_eq!(r["ok"], false, "{r}");
}
