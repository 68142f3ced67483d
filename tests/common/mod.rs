//! Shared harness for the integration tests: runs the real `vhost-user-tmem` binary
//! in a temporary directory and connects to it the way a VMM does.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use serde_json::Value;
use vhost_user_tmem::{
    error_chain,
    harness::{
        daemon::{DaemonProcess, DaemonSpec},
        frontend::{connect_socket, Virtqueue, Vmm, VmmConfig},
    },
    protocol::PAGE_SIZE,
};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon, stopped with SIGTERM when dropped. Its log is printed if the
/// test fails.
pub struct Daemon {
    process: DaemonProcess,
    pub sockets: Vec<PathBuf>,
    pub control: PathBuf,
}

impl Daemon {
    /// One VM socket, one queue.
    pub fn start() -> Daemon {
        Daemon::with(1, &[])
    }

    /// `vms` sockets plus extra command-line arguments.
    pub fn with(vms: usize, extra: &[&str]) -> Daemon {
        Daemon::with_options(&vec![""; vms], extra)
    }

    /// One socket per entry of `options`, with those options after its path
    /// (`blk=16M`, say), plus extra command-line arguments.
    pub fn with_options(options: &[&str], extra: &[&str]) -> Daemon {
        let mut spec = DaemonSpec::new(env!("CARGO_BIN_EXE_vhost-user-tmem"));
        spec.vms = options.len();
        spec.socket_options = options.iter().map(|o| o.to_string()).collect();
        spec.timeout = TIMEOUT;
        spec.log_filter = std::env::var("RUST_LOG").unwrap_or("warn".into());
        if !extra.contains(&"--mem-limit") {
            spec = spec.args(["--mem-limit", "256M"]);
        }
        let process =
            DaemonProcess::start(&spec.args(extra)).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        let sockets = process.sockets().to_vec();
        let control = process.control().expect("control socket").to_owned();
        Daemon {
            process,
            sockets,
            control,
        }
    }

    /// The daemon's private directory, removed when it stops.
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.process.try_wait()
    }

    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_wait() {
            panic!("daemon died ({st}):\n{}", self.log());
        }
    }

    /// Sends `signal` (SIGTERM, say) and returns at once.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        assert!(pid > 0, "the daemon has already been stopped");
        // SAFETY: kill(2) on our own child; tests signal it only before they
        // have seen it exit, so it has not been reaped and the pid is its own.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        match self.process.terminate(TIMEOUT) {
            Some(st) => st,
            None => panic!("daemon ignored SIGTERM or was already stopped:\n{}", self.log()),
        }
    }

    pub fn vmm_config(queues: usize, event_idx: bool) -> VmmConfig {
        VmmConfig {
            queues,
            event_idx,
            timeout: TIMEOUT,
            ..VmmConfig::default()
        }
    }

    /// Connects to VM socket `vm` and starts its queues.
    pub fn connect(&self, vm: usize, cfg: VmmConfig) -> (Vmm, Vec<Virtqueue>) {
        let mut vmm = Vmm::connect(&self.sockets[vm], cfg).expect("connect + negotiate");
        let queues = vmm.start().expect("start queues");
        (vmm, queues)
    }

    /// Connects to VM 0 with one queue, EVENT_IDX on.
    pub fn connect1(&self) -> (Vmm, Virtqueue) {
        let (vmm, mut q) = self.connect(0, Daemon::vmm_config(1, true));
        (vmm, q.remove(0))
    }

    /// One control request and its reply.
    pub fn control(&self, request: &str) -> Value {
        control_on(&self.control, request)
    }

    /// `stats` object of the control socket (panics if not ok).
    pub fn stats(&self) -> Value {
        let r = self.control(r#"{"cmd":"stats"}"#);
        assert_eq!(r["ok"], true, "stats failed: {r}");
        r["stats"].clone()
    }

    /// A store counter of guest `vm` (0 when the guest has no entry yet).
    pub fn guest_counter(&self, vm: u32, name: &str) -> u64 {
        self.stats()["store"]["guests"][vm.to_string()]["total"][name]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn total_counter(&self, name: &str) -> u64 {
        self.stats()["store"]["total"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no store.total.{name} in stats"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.log());
        }
    }
}

/// One request line on a control socket, one reply line back.
pub fn control_on(path: &Path, request: &str) -> Value {
    let mut s = connect_socket(path, TIMEOUT).expect("connect control socket");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    s.write_all(b"\n").expect("send");
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
}

/// Raw exchange on an open control connection.
pub fn control_line(s: &mut UnixStream, request: &str) -> Value {
    s.write_all(request.as_bytes()).expect("send");
    s.write_all(b"\n").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
}

/// A page that is neither same-filled nor like any other seed's.
pub fn page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(PAGE_SIZE);
    while out.len() < PAGE_SIZE {
        // xorshift64*: cheap, deterministic, incompressible enough.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out
}

/// An open control connection, for several requests on one stream.
pub fn connect_socket_for_test(path: &Path) -> UnixStream {
    let s = connect_socket(path, TIMEOUT).expect("connect control socket");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s
}

/// Tells the background threads of a scope to stop when it ends, also when
/// a panic unwinds it: the scope waits for every thread, so one left running
/// would turn a failed test into one that never ends.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
