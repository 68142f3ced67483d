//! The `vhost-user-tmem` binary run as a child process in a private
//! temporary directory, for tests and benchmarks that drive it over its
//! sockets. Start-up is over once every socket exists, so callers never
//! sleep and hope.

use std::{
    ffi::OsString,
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum HarnessError {
    #[error("cannot set up the daemon's directory")]
    Dir(#[source] io::Error),
    #[error("no daemon binary at {0}")]
    NoBinary(PathBuf),
    #[error("cannot start {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon exited ({status}) before creating {path}:\n{log}")]
    Exited {
        status: ExitStatus,
        path: PathBuf,
        log: String,
    },
    #[error("{0} did not appear in time")]
    NoSocket(PathBuf),
}

/// What to start: the binary, how many VM sockets, and any further arguments.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    pub binary: PathBuf,
    pub vms: usize,
    /// Options after VM N's socket path (`blk=64M`, say), by N.
    pub socket_options: Vec<String>,
    /// Give the daemon a control socket.
    pub control: bool,
    pub args: Vec<OsString>,
    /// `RUST_LOG` for the daemon.
    pub log_filter: String,
    /// How long to wait for the sockets.
    pub timeout: Duration,
}

impl DaemonSpec {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        DaemonSpec {
            binary: binary.into(),
            vms: 1,
            socket_options: Vec::new(),
            control: true,
            args: Vec::new(),
            log_filter: "warn".into(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running daemon; SIGTERM and reaped when dropped. Its directory (sockets,
/// log, and whatever the caller puts there) goes with it.
pub struct DaemonProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    sockets: Vec<PathBuf>,
    control: Option<PathBuf>,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts the daemon with `--socket DIR/vmN.sock` for each VM, `--control
    /// DIR/control.sock` if asked, then the spec's arguments, and returns once
    /// every socket exists. An argument may name a file in the directory with
    /// the `{dir}` prefix, e.g. `{dir}/spill`.
    pub fn start(spec: &DaemonSpec) -> Result<Self, HarnessError> {
        if !spec.binary.is_file() {
            return Err(HarnessError::NoBinary(spec.binary.clone()));
        }
        let dir = tempfile::Builder::new()
            .prefix("tmem-harness-")
            .tempdir()
            .map_err(HarnessError::Dir)?;
        let sockets: Vec<PathBuf> = (0..spec.vms)
            .map(|i| dir.path().join(format!("vm{i}.sock")))
            .collect();
        let control = spec.control.then(|| dir.path().join("control.sock"));
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(&spec.binary);
        for (i, s) in sockets.iter().enumerate() {
            let mut value = s.clone().into_os_string();
            if let Some(options) = spec.socket_options.get(i).filter(|o| !o.is_empty()) {
                value.push(",");
                value.push(options);
            }
            cmd.arg("--socket").arg(value);
        }
        if let Some(c) = &control {
            cmd.arg("--control").arg(c);
        }
        for a in &spec.args {
            cmd.arg(expand_dir(a, dir.path()));
        }
        let logfile = File::create(&log).map_err(HarnessError::Dir)?;
        let errfile = logfile.try_clone().map_err(HarnessError::Dir)?;
        cmd.stdin(Stdio::null())
            .stdout(logfile)
            .stderr(errfile)
            .env("RUST_LOG", &spec.log_filter);
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            path: spec.binary.clone(),
            source,
        })?;
        let mut d = DaemonProcess {
            child: Some(child),
            dir,
            sockets,
            control,
            log,
        };
        let wanted: Vec<PathBuf> = d.sockets.iter().chain(d.control.iter()).cloned().collect();
        for p in wanted {
            d.wait_for(&p, spec.timeout)?;
        }
        // The control socket's path exists from bind(), a moment before
        // listen(): a client connecting in between is refused. Callers
        // connect to it once, without retrying (as tmemctl does), so wait
        // here until it listens. (VMMs retry: `connect_socket`.)
        if let Some(control) = &d.control {
            crate::harness::frontend::connect_socket(control, spec.timeout)
                .map_err(|_| HarnessError::NoSocket(control.clone()))?;
        }
        Ok(d)
    }

    fn wait_for(&mut self, p: &Path, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(1);
        while !p.exists() {
            if let Some(status) = self.try_wait() {
                return Err(HarnessError::Exited {
                    status,
                    path: p.to_owned(),
                    log: self.log(),
                });
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NoSocket(p.to_owned()));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The vhost-user socket of VM `vm`.
    pub fn socket(&self, vm: usize) -> &Path {
        &self.sockets[vm]
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    pub fn control(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// 0 once the daemon has been stopped.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The exit status, if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits up to `grace` for the exit status; kills the
    /// daemon after that. `None` if it was already stopped or had to be killed.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child, which has not been reaped, so
            // its pid cannot have been reused.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

fn expand_dir(arg: &OsString, dir: &Path) -> OsString {
    match arg.to_str().and_then(|s| s.strip_prefix("{dir}")) {
        Some(rest) => {
            let mut out = dir.as_os_str().to_owned();
            out.push(rest);
            out
        }
        None => arg.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_prefix_names_a_file_in_the_daemon_dir() {
        let dir = Path::new("/tmp/x");
        assert_eq!(
            expand_dir(&"{dir}/spill".into(), dir),
            OsString::from("/tmp/x/spill")
        );
        assert_eq!(expand_dir(&"--queues".into(), dir), OsString::from("--queues"));
    }

    #[test]
    fn a_missing_binary_is_reported() {
        let spec = DaemonSpec::new("/nonexistent/vhost-user-tmem");
        assert!(matches!(
            DaemonProcess::start(&spec),
            Err(HarnessError::NoBinary(_))
        ));
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported_with_its_status() {
        let spec = DaemonSpec::new("/bin/false");
        assert!(matches!(
            DaemonProcess::start(&spec),
            Err(HarnessError::Exited { .. })
        ));
    }
}
