//! The daemon confines itself by default (docs/design.md, "Sandbox"):
//! every thread, the vhost-user and control threads made after set-up
//! included, runs under a seccomp filter (`Seccomp: 2` in its status) with
//! no_new_privs, and `--sandbox off` turns all of it off.

mod common;

use std::os::unix::net::UnixStream;

use common::{connect_socket_for_test, control_line, control_on, page, Daemon};
use vhost_user_tmem::{
    harness::frontend::{Virtqueue, Vmm},
    protocol::Status,
};

/// Each thread of `pid`: its name, and its `Seccomp` and `NoNewPrivs` lines.
fn threads(pid: i32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let dir = task.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((comm.trim().to_owned(), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

/// A daemon with a VMM on two queues, a spill file with its writer, and a
/// control client that stays connected: every kind of thread exists while
/// this lives.
struct Busy {
    daemon: Daemon,
    _vmm: Vmm,
    _queues: Vec<Virtqueue>,
    _client: UnixStream,
}

fn busy_daemon(extra: &[&str]) -> Busy {
    let mut args = vec!["--queues", "2", "--spill-file", "{dir}", "--spill-limit", "16M"];
    args.extend_from_slice(extra);
    let daemon = Daemon::with(1, &args);
    let (vmm, mut queues) = daemon.connect(0, Daemon::vmm_config(2, true));
    for (i, q) in queues.iter_mut().enumerate() {
        let r = q.put(1, i as u64, &page(i as u64)).unwrap();
        assert_eq!(r.status, Some(Status::Ok));
    }
    let mut client = connect_socket_for_test(&daemon.control);
    // The client's thread exists once it has answered.
    assert_eq!(control_line(&mut client, r#"{"cmd":"stats"}"#)["ok"], true);
    Busy {
        daemon,
        _vmm: vmm,
        _queues: queues,
        _client: client,
    }
}

#[test]
fn every_thread_runs_under_seccomp_with_no_new_privs() {
    let busy = busy_daemon(&[]);
    let threads = threads(busy.daemon.pid());
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for wanted in [
        "tmem-control",
        "tmem-ctl-client",
        "tmem-writeback",
        "tmem-dev0",
        "tmem-vhu0",
        "vring_worker",
    ] {
        assert!(names.contains(&wanted), "no {wanted} thread among {names:?}");
    }
    for (name, seccomp, nnp) in &threads {
        assert_eq!(seccomp, "2", "thread {name} is not under a seccomp filter");
        assert_eq!(nnp, "1", "thread {name} has no no_new_privs");
    }
    // Confined, it still serves the control socket and stops cleanly.
    let Busy { daemon: mut d, .. } = busy;
    assert_eq!(control_on(&d.control, r#"{"cmd":"stats"}"#)["ok"], true);
    d.assert_alive();
    let status = d.terminate();
    assert!(status.success(), "{status}:\n{}", d.log());
}

#[test]
fn sandbox_off_confines_nothing() {
    let busy = busy_daemon(&["--sandbox", "off"]);
    for (name, seccomp, nnp) in threads(busy.daemon.pid()) {
        assert_eq!((seccomp.as_str(), nnp.as_str()), ("0", "0"), "thread {name}");
    }
    let Busy { daemon: mut d, .. } = busy;
    assert!(d.terminate().success());
}
