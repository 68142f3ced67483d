//! Shared harness for the integration tests: runs the real `vhost-user-tmem` binary
//! in a temporary directory and connects to it the way a VMM does.
#![allow(dead_code)]

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use vhost_user_tmem::{
    frontend::{connect_socket, Virtqueue, Vmm, VmmConfig},
    protocol::PAGE_SIZE,
};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon, stopped with SIGTERM when dropped. Its log is printed if the
/// test fails.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub sockets: Vec<PathBuf>,
    pub control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// One VM socket, one queue.
    pub fn start() -> Daemon {
        Daemon::with(1, &[])
    }

    /// `vms` sockets plus extra command-line arguments.
    pub fn with(vms: usize, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sockets: Vec<PathBuf> = (0..vms).map(|i| dir.path().join(format!("vm{i}.sock"))).collect();
        let control = dir.path().join("control.sock");
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-tmem"));
        for s in &sockets {
            cmd.arg("--socket").arg(s);
        }
        cmd.arg("--control").arg(&control);
        if !extra.contains(&"--mem-limit") {
            cmd.args(["--mem-limit", "256M"]);
        }
        cmd.args(extra);
        let logfile = File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("log fd"))
            .stderr(logfile)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or("warn".into()));
        let child = cmd.spawn().expect("spawn vhost-user-tmem");
        let mut d = Daemon {
            child: Some(child),
            dir,
            sockets,
            control,
            log,
        };
        // Everything the tests talk to must exist before they start talking.
        let paths: Vec<PathBuf> = d
            .sockets
            .iter()
            .chain(std::iter::once(&d.control))
            .cloned()
            .collect();
        for p in paths {
            d.wait_for_path(&p);
        }
        d
    }

    fn wait_for_path(&mut self, p: &Path) {
        let deadline = Instant::now() + TIMEOUT;
        let mut backoff = Duration::from_millis(1);
        while !p.exists() {
            if let Some(st) = self.try_wait() {
                panic!(
                    "daemon exited ({st}) before creating {}:\n{}",
                    p.display(),
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "{} never appeared", p.display());
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_wait() {
            panic!("daemon died ({st}):\n{}", self.log());
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(5));
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
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: plain kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
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
