//! Shutdown (README, "Running the daemon"): SIGINT or SIGTERM stops the
//! daemon within SHUTDOWN_DEADLINE, whatever is stuck, and a second signal
//! stops it at once.
//!
//! A thread stuck for good (in I/O on a spill file whose filesystem hangs,
//! say) is played by a thread stopped with ptrace: to the rest of the daemon
//! the two look the same, a thread that never gets anywhere.

mod common;

use std::{
    io,
    process::ExitStatus,
    time::{Duration, Instant},
};

use common::Daemon;
use vhost_user_tmem::daemon::{SHUTDOWN_DEADLINE, SHUTDOWN_GRACE};

/// Room for scheduling on a loaded machine, on top of the daemon's own limits.
const SLACK: Duration = Duration::from_secs(3);

/// Threads of the daemon, stopped with ptrace until this is dropped.
struct Frozen {
    pid: i32,
    /// (tid, name) of each thread stopped and not yet seen to exit.
    threads: Vec<(i32, String)>,
}

impl Frozen {
    fn none(pid: i32) -> Frozen {
        Frozen {
            pid,
            threads: Vec::new(),
        }
    }

    /// Stops every thread of the daemon but the main one, once set-up is
    /// over: the socket exists before the threads do, and a thread started
    /// after the snapshot would not be stopped.
    fn all_but_main(pid: i32) -> Frozen {
        wait_for_set_up(pid);
        let mut frozen = Frozen::none(pid);
        for (tid, name) in threads_of(pid) {
            // A control client's thread (the harness's check that the
            // control socket listens makes one) may end meanwhile: a
            // thread that is gone needs no stopping.
            let transient = name == "tmem-ctl-client";
            if tid != pid {
                frozen.freeze_if_alive(tid, name, transient);
            }
        }
        frozen
    }

    fn freeze(&mut self, tid: i32, name: String) {
        self.freeze_if_alive(tid, name, false);
    }

    /// Stops thread `tid`; with `may_be_gone`, a thread that has exited
    /// (ESRCH, or an exit reported instead of the stop) is skipped.
    fn freeze_if_alive(&mut self, tid: i32, name: String, may_be_gone: bool) {
        let gone = |rc: libc::c_long| {
            rc != 0 && may_be_gone && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        };
        // SAFETY: ptrace requests on a thread of our own child, passing no
        // pointers; waitpid writes one int to a live local.
        unsafe {
            let rc = libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0);
            if gone(rc) {
                return;
            }
            assert_eq!(rc, 0, "PTRACE_SEIZE {name}: {}", io::Error::last_os_error());
            let rc = libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
            if !gone(rc) {
                assert_eq!(rc, 0, "PTRACE_INTERRUPT {name}: {}", io::Error::last_os_error());
            }
            let mut status = 0;
            // The stop is reported to us, the tracer; take the report now,
            // before the harness waits for the process and sees it instead.
            // (A traced thread's exit is reported to us as well.)
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
            if may_be_gone && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
                return;
            }
            assert!(libc::WIFSTOPPED(status), "{name}: status {status:#x}");
        }
        self.threads.push((tid, name));
    }

    fn names(&self) -> Vec<&str> {
        self.threads.iter().map(|(_, name)| name.as_str()).collect()
    }

    /// Reaps the threads that have exited. A traced thread's exit goes to its
    /// tracer, and the process is not seen to exit until that is taken.
    /// The main thread is left to the harness, whose child it is.
    fn reap(&mut self) {
        let pid = self.pid;
        self.threads.retain(|&(tid, _)| {
            if tid == pid {
                return true;
            }
            let mut status = 0;
            // SAFETY: waitpid writes one int to a live local.
            let rc = unsafe { libc::waitpid(tid, &mut status, libc::WNOHANG | libc::__WALL) };
            !(rc == -1 || (rc == tid && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status))))
        });
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Let them go, so that a daemon left behind by a failed test can
        // still be stopped and reaped.
        for &(tid, _) in &self.threads {
            // SAFETY: ptrace on a thread we trace, passing no pointers.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
        }
        self.reap();
    }
}

/// (tid, name) of each thread of `pid`.
fn threads_of(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let entry = entry.unwrap();
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim().to_owned()));
    }
    out
}

/// Waits until the daemon has a thread called `name`.
fn wait_for_thread(d: &Daemon, name: &str) {
    let deadline = Instant::now() + common::TIMEOUT;
    while !threads_of(d.pid()).iter().any(|(_, n)| n == name) {
        assert!(Instant::now() < deadline, "no thread {name} in the daemon");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the main thread has confined itself (`Seccomp: 2`), which
/// it does once every other thread is started.
fn wait_for_set_up(pid: i32) {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
        if status
            .lines()
            .any(|line| line.split_whitespace().eq(["Seccomp:", "2"]))
        {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon's set-up did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until no thread of the daemon has `signal` pending any longer:
/// one of them has taken it.
fn wait_until_taken(d: &Daemon, signal: i32) {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let shared = status
            .lines()
            .find_map(|line| line.strip_prefix("ShdPnd:"))
            .expect("ShdPnd in /proc/PID/status");
        let pending = u64::from_str_radix(shared.trim(), 16).unwrap();
        if pending & (1 << (signal - 1)) == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "signal {signal} still pending");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon's exit status, if it exits within `within`.
fn exit_within(d: &mut Daemon, frozen: &mut Frozen, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        frozen.reap();
        if let Some(status) = d.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a daemon with a spill file, so that it also has a background
/// writer: the thread that would be stuck on a hung spill filesystem.
fn daemon_with_writer() -> Daemon {
    Daemon::with(1, &["--spill-file", "{dir}/spill", "--spill-limit", "64M"])
}

/// The control socket's file removed first (as a runtime directory's
/// teardown does): SIGTERM still stops the daemon, promptly and cleanly.
#[test]
fn sigterm_with_the_control_socket_removed() {
    let mut d = daemon_with_writer();
    std::fs::remove_file(&d.control).unwrap();
    let begun = Instant::now();
    d.signal(libc::SIGTERM);
    let status = exit_within(&mut d, &mut Frozen::none(0), SHUTDOWN_DEADLINE + SLACK);
    let status = status.unwrap_or_else(|| panic!("still running {:?} after SIGTERM", begun.elapsed()));
    assert_eq!(status.code(), Some(0), "{status}");
    // Nothing was waited out: every thread was woken.
    assert!(begun.elapsed() < SHUTDOWN_GRACE, "took {:?}", begun.elapsed());
    assert!(!d.log().contains("did not stop"), "{}", d.log());
}

/// Every socket file removed, one VMM connected and one not: each device
/// thread is woken without its path, from a connection or from accept.
#[test]
fn sigterm_with_every_socket_removed() {
    let mut d = Daemon::with(2, &[]);
    let (_vmm, _queues) = d.connect(0, Daemon::vmm_config(1, true));
    for path in d.sockets.iter().chain([&d.control]) {
        std::fs::remove_file(path).unwrap();
    }
    let begun = Instant::now();
    d.signal(libc::SIGTERM);
    let status = exit_within(&mut d, &mut Frozen::none(0), SHUTDOWN_DEADLINE + SLACK);
    let status = status.unwrap_or_else(|| panic!("still running {:?} after SIGTERM", begun.elapsed()));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(begun.elapsed() < SHUTDOWN_GRACE, "took {:?}", begun.elapsed());
    assert!(!d.log().contains("did not stop"), "{}", d.log());
}

/// Every thread but the main one stuck for good: SIGTERM waits SHUTDOWN_GRACE
/// for them, then exits 0 without them, naming them in the log.
#[test]
fn stuck_threads_do_not_hold_up_sigterm() {
    let mut d = daemon_with_writer();
    let mut client = common::connect_socket_for_test(&d.control);
    // Answered, so its thread exists (and is not the passing one of the
    // harness's check that the socket listens).
    assert_eq!(
        common::control_line(&mut client, r#"{"cmd":"stats"}"#)["ok"],
        true
    );
    let mut frozen = Frozen::all_but_main(d.pid());
    for name in ["tmem-writeback", "tmem-dev0", "tmem-control", "tmem-ctl-client"] {
        assert!(
            frozen.names().contains(&name),
            "{name} not among {:?}",
            frozen.names()
        );
    }
    let begun = Instant::now();
    d.signal(libc::SIGTERM);
    let status = exit_within(&mut d, &mut frozen, SHUTDOWN_DEADLINE + SLACK);
    let waited = begun.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running {waited:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "{status}\n{}", d.log());
    assert!(waited >= SHUTDOWN_GRACE, "exited after {waited:?}");
    assert!(waited < SHUTDOWN_DEADLINE + SLACK, "exited after {waited:?}");
    let log = d.log();
    assert!(
        log.contains("device 0, the background writer did not stop"),
        "{log}"
    );
}

/// A second signal during a shutdown held up by stuck threads: the daemon
/// exits at once, with status 1, for SIGTERM and for SIGINT.
#[test]
fn a_second_signal_exits_at_once() {
    for (second, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut d = daemon_with_writer();
        let mut frozen = Frozen::all_but_main(d.pid());
        d.signal(libc::SIGTERM);
        // Sent while the first is still pending, the second would merge
        // with it.
        wait_until_taken(&d, libc::SIGTERM);
        let begun = Instant::now();
        d.signal(second);
        let status = exit_within(&mut d, &mut frozen, SHUTDOWN_GRACE);
        let waited = begun.elapsed();
        let status =
            status.unwrap_or_else(|| panic!("still running {waited:?} after a second signal ({name})"));
        assert_eq!(status.code(), Some(1), "{status}");
        assert!(
            waited < SLACK,
            "{name}: exited {waited:?} after the second signal"
        );
        let log = d.log();
        assert!(
            log.contains(&format!("received {name} again; exiting now")),
            "{log}"
        );
    }
}

/// Shutdown itself stuck (here: the main thread stopped after taking
/// SIGTERM, as it would be closing a spill file on a hung filesystem): the
/// watchdog ends the process at SHUTDOWN_DEADLINE, with status 1.
#[test]
fn a_stuck_shutdown_ends_at_the_deadline() {
    let mut d = daemon_with_writer();
    let mut frozen = Frozen::all_but_main(d.pid());
    let begun = Instant::now();
    d.signal(libc::SIGTERM);
    wait_for_thread(&d, "tmem-shutdown");
    frozen.freeze(d.pid(), "main".to_owned());
    let status = exit_within(&mut d, &mut frozen, SHUTDOWN_DEADLINE + SLACK);
    let waited = begun.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running {waited:?} after SIGTERM"));
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(
        waited >= SHUTDOWN_DEADLINE - Duration::from_millis(100),
        "exited after {waited:?}"
    );
    let log = d.log();
    assert!(
        log.contains(&format!(
            "shutdown did not finish within {SHUTDOWN_DEADLINE:?}; exiting now"
        )),
        "{log}"
    );
}
