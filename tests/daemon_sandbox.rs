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

/// Each thread of `pid`: its name and one of its files under /proc.
fn task_files(pid: i32, file: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let dir = task.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        out.push((comm.trim().to_owned(), text));
    }
    out
}

/// Each thread of `pid`: its name and its status file.
fn threads(pid: i32) -> Vec<(String, String)> {
    task_files(pid, "status")
}

/// The value of one line of a status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or("", str::trim)
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
    for (name, status) in &threads {
        assert_eq!(
            field(status, "Seccomp:"),
            "2",
            "thread {name} is not under a seccomp filter"
        );
        assert_eq!(
            field(status, "NoNewPrivs:"),
            "1",
            "thread {name} has no no_new_privs"
        );
        // The refusing filter and the role's allow-list; a thread made by a
        // confined one has narrowed its creator's with a third.
        let filters = match name.as_str() {
            "vring_worker" | "tmem-ctl-client" => "3",
            _ => "2",
        };
        let counted = field(status, "Seccomp_filters:");
        if !counted.is_empty() {
            assert_eq!(counted, filters, "thread {name}: filters installed");
        }
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
    for (name, status) in threads(busy.daemon.pid()) {
        let fields = (field(&status, "Seccomp:"), field(&status, "NoNewPrivs:"));
        assert_eq!(fields, ("0", "0"), "thread {name}");
    }
    let Busy { daemon: mut d, .. } = busy;
    assert!(d.terminate().success());
}

/// The nice value of each thread of `pid`, by name (field 19 of its stat).
fn nice_values(pid: i32) -> Vec<(String, i32)> {
    task_files(pid, "stat")
        .into_iter()
        .map(|(name, stat)| {
            // The name may hold spaces and parentheses; the fields after it
            // start with the state (field 3).
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let nice = after.split_whitespace().nth(19 - 3).and_then(|f| f.parse().ok());
            (name, nice.expect("a nice value in /proc/PID/task/TID/stat"))
        })
        .collect()
}

/// Work no guest waits for (writeback, recompression) runs at a lower
/// priority than the threads that answer guests, sandboxed as always.
#[test]
fn background_threads_run_below_the_device_workers() {
    let busy = busy_daemon(&["--compression", "auto"]);
    let nice = nice_values(busy.daemon.pid());
    let names: Vec<&str> = nice.iter().map(|t| t.0.as_str()).collect();
    for wanted in ["tmem-writeback", "tmem-recompress", "vring_worker", "tmem-dev0"] {
        assert!(names.contains(&wanted), "no {wanted} thread among {names:?}");
    }
    // Relative to the daemon's own, in case the tests themselves run niced.
    let base = nice
        .iter()
        .find(|t| t.0 == "vhost-user-tmem")
        .expect("the main thread")
        .1;
    for (name, value) in &nice {
        let expected = match name.as_str() {
            "tmem-writeback" | "tmem-recompress" => (base + vhost_user_tmem::daemon::BACKGROUND_NICE).min(19),
            _ => base,
        };
        assert_eq!(*value, expected, "thread {name}'s nice value");
    }
    let Busy { daemon: mut d, .. } = busy;
    assert!(d.terminate().success(), "{}", d.log());
}

/// `--user`: every thread drops to the user (and its group) once set-up
/// is over, and the daemon still serves guests, spills, and answers root on
/// its control socket. Needs root to start with.
#[test]
fn user_drops_root_in_every_thread() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing to drop");
        return;
    }
    let busy = busy_daemon(&["--user", "65534", "--group", "65534", "--mem-limit", "1M"]);
    for (name, status) in threads(busy.daemon.pid()) {
        for name_of_ids in ["Uid:", "Gid:"] {
            let ids: Vec<&str> = field(&status, name_of_ids).split_whitespace().collect();
            assert_eq!(ids, ["65534"; 4], "thread {name}: {name_of_ids}");
        }
        assert_eq!(field(&status, "Groups:"), "65534", "thread {name}");
    }
    let Busy {
        daemon: mut d,
        _vmm: vmm,
        _queues: mut queues,
        ..
    } = busy;
    // Past the 1M limit: pages go to the spill file, opened as root.
    for i in 0..1024u64 {
        assert_eq!(
            queues[0].put(2, i, &page(1000 + i)).unwrap().status,
            Some(Status::Ok)
        );
    }
    assert_eq!(queues[0].get(2, 3, false).unwrap().page, page(1003));
    assert!(d.total_counter("spill_writes") > 0, "{}", d.stats());
    drop((vmm, queues));
    d.assert_alive();
    assert!(d.terminate().success(), "{}", d.log());
}
