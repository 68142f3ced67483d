//! `tmem-bench noisy` end to end on a small daemon: the timings are for the
//! benchmark to report; checked here is what must hold whatever the machine:
//! the victim is never rejected, none of its pages spill, and the attacker's
//! do.

use vhost_user_tmem::bench::noisy::{run_bench, NoisyArgs};

#[test]
fn the_victim_keeps_its_pages_while_the_attacker_spills() {
    let args = NoisyArgs {
        mem_limit: 8 << 20,
        spill_limit: 256 << 20,
        spill_dir: None,
        victim_pages: None,
        victim_weight: 1,
        secs: 0.3,
        poll_us: None,
        guest_poll_us: 0,
        writeback_headroom: None,
        daemon: Some(env!("CARGO_BIN_EXE_vhost-user-tmem").into()),
        json: true,
    };
    let r = run_bench(&args).unwrap();
    assert_eq!((r.alone.rejects, r.attacked.rejects), (0, 0), "{r:?}");
    assert!(r.alone.gets > 0 && r.attacked.gets > 0, "{r:?}");
    assert_eq!(r.victim_spilled_pages, 0, "{r:?}");
    assert!(r.attacker_spilled_pages > 0, "{r:?}");
    assert!(r.attacker_ram_bytes > r.attacker_fair_share_bytes, "{r:?}");
    assert!(r.victim_ram_bytes < r.victim_fair_share_bytes, "{r:?}");
    assert!(r.alone_service_get.count > 0 && r.attacked_service_get.count > 0);
}
