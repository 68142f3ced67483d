//! Running the daemon: one store, one listener thread per device, the control
//! socket, and shutdown on SIGINT/SIGTERM.
//!
//! Each device thread accepts one VMM at a time on its socket. When the VMM
//! goes away, that connection's workers are stopped and joined (through the
//! backend's exit events), the device's pages are dropped, and the thread
//! accepts again on the same socket.
//!
//! Signals are blocked in every thread and taken synchronously by the main
//! thread with `sigwait`, so no code runs in signal context.

use std::{
    fmt, io,
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{error, info, warn};
use parking_lot::Mutex;
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{
    config::Config,
    control::{ControlContext, ControlError, ControlServer, DeviceReport},
    device::TmemBackend,
    error_chain,
    store::{Store, StoreError},
    telemetry::DeviceTelemetry,
};

/// How long shutdown waits for device threads before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the background writer looks at the budget when no put has
/// woken it; it also bounds how long shutdown waits for it.
const WRITER_TICK: Duration = Duration::from_millis(100);
/// Pause after a spill error before the writer tries again (puts still make
/// their own room meanwhile).
const WRITER_BACKOFF: Duration = Duration::from_secs(1);
/// Pause before accepting again after a connection failed to set up, so a
/// persistent failure does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot create the page store")]
    Store(#[source] StoreError),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot start the control socket")]
    Control(#[source] ControlError),
    #[error("cannot block SIGINT and SIGTERM")]
    Signals(#[source] io::Error),
    #[error("cannot start the thread of device {id}")]
    Spawn {
        id: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the background writeback thread")]
    SpawnWriter(#[source] io::Error),
}

/// vhost-user-backend's error type implements `Display` but not `Error`.
#[derive(Debug)]
struct BackendError(vhost_user_backend::Error);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {}

/// What the main thread needs to stop one device.
struct DeviceHandle {
    telemetry: Arc<DeviceTelemetry>,
    /// The live connection, if any.
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: JoinHandle<()>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before any thread exists, so that all of them inherit the mask.
    let signals = block_signals().map_err(DaemonError::Signals)?;

    let store = Arc::new(Store::new(config.store.clone()).map_err(DaemonError::Store)?);
    let devices: Vec<Arc<DeviceTelemetry>> = config
        .sockets
        .iter()
        .enumerate()
        .map(|(id, path)| Arc::new(DeviceTelemetry::new(id as u32, path.clone(), config.queues)))
        .collect();

    let mut listeners = Vec::with_capacity(devices.len());
    for device in &devices {
        listeners.push(listen(&device.socket)?);
    }

    let control = match &config.control {
        Some(path) => {
            let ctx = ControlContext {
                store: store.clone(),
                devices: devices
                    .iter()
                    .map(|d| Arc::clone(d) as Arc<dyn DeviceReport>)
                    .collect(),
                config: config.clone(),
            };
            Some(ControlServer::start(path, ctx).map_err(DaemonError::Control)?)
        }
        None => None,
    };

    let stopping = Arc::new(AtomicBool::new(false));
    let writer = if config.store.writeback_headroom > 0 && config.store.spill.is_some() {
        let (store, stopping) = (store.clone(), stopping.clone());
        let thread = thread::Builder::new()
            .name("tmem-writeback".into())
            .spawn(move || writeback_loop(&store, &stopping))
            .map_err(DaemonError::SpawnWriter)?;
        Some(thread)
    } else {
        None
    };
    let mut handles = Vec::with_capacity(devices.len());
    for (device, listener) in devices.iter().zip(listeners) {
        let conn = Arc::new(Mutex::new(None));
        let serve = DeviceLoop {
            telemetry: device.clone(),
            store: store.clone(),
            capacity_pages: config.capacity_pages,
            poll: config.poll,
            conn: conn.clone(),
            stopping: stopping.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("tmem-dev{}", device.id))
            .spawn(move || serve.run(listener))
            .map_err(|source| DaemonError::Spawn {
                id: device.id,
                source,
            })?;
        handles.push(DeviceHandle {
            telemetry: device.clone(),
            conn,
            thread,
        });
    }
    info!(
        "serving {} device(s), {} queue(s) each, memory limit {} bytes, writeback headroom {} bytes",
        devices.len(),
        config.queues,
        store.mem_limit(),
        config.store.writeback_headroom
    );

    let signal = wait_for_signal(&signals);
    info!("received signal {signal}, shutting down");
    stopping.store(true, Ordering::SeqCst);
    for handle in &handles {
        match handle.conn.lock().as_ref() {
            Some(conn) => conn.shutdown(),
            // Blocked in accept: wake it with a connection of our own.
            None => drop(UnixStream::connect(&handle.telemetry.socket)),
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    for handle in handles {
        while !handle.thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if handle.thread.is_finished() {
            if handle.thread.join().is_err() {
                error!("device {} thread panicked", handle.telemetry.id);
            }
        } else {
            warn!(
                "device {} did not stop within {SHUTDOWN_GRACE:?}; exiting anyway",
                handle.telemetry.id
            );
        }
    }
    if let Some(writer) = writer {
        // It notices `stopping` within one tick.
        if writer.join().is_err() {
            error!("the background writeback thread panicked");
        }
    }
    if let Some(control) = control {
        control.stop();
    }
    info!("stopped");
    Ok(())
}

/// Runs the store's background writer until shutdown.
fn writeback_loop(store: &Store, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        if let Err(e) = store.background_writeback(WRITER_TICK) {
            warn!("background writeback: {e}; retrying in {WRITER_BACKOFF:?}");
            thread::sleep(WRITER_BACKOFF);
        }
    }
}

/// Binds a vhost-user socket, replacing a stale socket file but nothing else.
fn listen(path: &Path) -> Result<Listener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::NotASocket(path.to_owned()));
        }
    }
    Listener::new(path, true).map_err(|source| DaemonError::Listen {
        path: path.to_owned(),
        source,
    })
}

struct DeviceLoop {
    telemetry: Arc<DeviceTelemetry>,
    store: Arc<Store>,
    capacity_pages: u64,
    poll: Duration,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    stopping: Arc<AtomicBool>,
}

impl DeviceLoop {
    fn run(self, mut listener: Listener) {
        let id = self.telemetry.id;
        while !self.stopping.load(Ordering::SeqCst) {
            if let Err(e) = self.serve_one(&mut listener) {
                error!("device {id}: {}", error_chain(&e));
                thread::sleep(RETRY_PAUSE);
            }
        }
        info!("device {id}: stopped");
    }

    /// Accepts one VMM, serves it until it leaves, then drops its pages.
    fn serve_one(&self, listener: &mut Listener) -> Result<(), BackendError> {
        let id = self.telemetry.id;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(TmemBackend::new(
            self.telemetry.clone(),
            self.store.clone(),
            mem.clone(),
            self.capacity_pages,
            self.poll,
        ));
        let mut daemon =
            VhostUserDaemon::new(format!("tmem-vhu{id}"), backend.clone(), mem).map_err(BackendError)?;
        daemon.start(listener).map_err(BackendError)?;
        if let Some(handle) = daemon.shutdown_handle() {
            *self.conn.lock() = Some(handle.clone());
            // The main thread may have looked at `conn` just before we set it
            // (or this is its wake-up connection).
            if self.stopping.load(Ordering::SeqCst) {
                handle.shutdown();
            }
        }
        if !self.stopping.load(Ordering::SeqCst) {
            self.telemetry.connected.store(true, Ordering::SeqCst);
            info!("device {id}: VMM connected");
        }
        let result = match daemon.wait() {
            // The VMM closing its end, even mid-message, is how a session ends.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            other => other.map_err(BackendError),
        };
        *self.conn.lock() = None;
        self.telemetry.connected.store(false, Ordering::SeqCst);
        // Dropping the daemon joins the queue workers (they leave on their
        // exit events); only then is it safe to drop the pages.
        backend.close();
        drop(daemon);
        let dropped = self.store.drop_guest(self.telemetry.guest());
        if dropped > 0 || !self.stopping.load(Ordering::SeqCst) {
            info!("device {id}: VMM disconnected, dropped {dropped} pages");
        }
        result
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; zeroed memory is a
    // valid starting value for the plain C struct.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

fn block_signals() -> io::Result<libc::sigset_t> {
    let set = signal_set();
    // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are to valid, initialised locals.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}
