//! Running the daemon: one store, one listener thread per device, the control
//! socket, and shutdown on SIGINT/SIGTERM.
//!
//! Each device thread accepts one VMM at a time on its socket. When the VMM
//! goes away, that connection's workers are stopped and joined (through the
//! backend's exit events), the device's pages are dropped (a blk device's
//! are kept: it is a disk), and the thread accepts again on the same socket.
//!
//! Signals are blocked in every thread and taken synchronously by the main
//! thread with `sigwait`, so no code runs in signal context.
//!
//! Shutdown never waits on anything that might not end. Every thread is
//! woken without going through a path on disk (the sockets' files may be
//! gone by then), and joined only until [`SHUTDOWN_GRACE`] is up; what has
//! not ended by then (a writer blocked on a spill file whose filesystem
//! hangs, say) is left to end with the process. A watchdog thread, started
//! at the first signal, ends the process at [`SHUTDOWN_DEADLINE`] if the
//! rest of shutdown is stuck too, and at once on a second signal.

use std::{
    fmt, io,
    os::unix::{
        fs::FileTypeExt,
        io::{AsRawFd, BorrowedFd, OwnedFd},
    },
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
    config::{Config, DeviceKind, DeviceSpec},
    control::{ControlContext, ControlError, ControlServer, DeviceReport},
    device::TmemBackend,
    error_chain,
    sandbox::{self, Role, SandboxError},
    store::{Compression, GuestId, ShareError, Store, StoreError},
    telemetry::DeviceTelemetry,
};

/// How long shutdown waits, in all, for the threads it stops (the control
/// server's, the devices', the background writer) before exiting, with
/// status 0, without those that have not ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// From the first SIGINT or SIGTERM to the process's end, whatever is
/// stuck: past it the watchdog exits with status 1.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How often the background writer looks at the budget when no put has
/// woken it; it also bounds how long shutdown waits for it.
const WRITER_TICK: Duration = Duration::from_millis(100);
/// Pause after a spill error before the writer tries again (puts still make
/// their own room meanwhile).
const WRITER_BACKOFF: Duration = Duration::from_secs(1);
/// Most pages the recompressor re-encodes per round (`--compression auto`).
const RECOMPRESS_PAGES: usize = 1024;
/// After a round it rests this many times as long as the round took, so it
/// uses at most a third of one core whatever the level.
const RECOMPRESS_REST: u32 = 2;
/// Its pause between rounds, and when there was nothing cold (it also
/// bounds how long shutdown waits for it).
const RECOMPRESS_TICK: Duration = Duration::from_millis(100);
const RECOMPRESS_IDLE: Duration = Duration::from_secs(1);
/// What the background writer and the recompressor add to the daemon's
/// nice value. Their work is never what a guest waits for, so when CPUs are
/// short the device workers go first: at the same priority the writer's
/// bursts for a flooding guest delayed the wake-ups of its neighbour's
/// worker, and on 2 CPUs the neighbour's get p99 rose 2-4x under attack;
/// 10 levels down it stays within 1.4x (docs/design.md, "Per-guest budgets
/// and fair sharing"). A put that finds RAM full while the writer is behind
/// makes its own room, and a guest over its share pays for its writebacks
/// itself, so a slow writer costs the flooder.
pub const BACKGROUND_NICE: i32 = 10;
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
    #[error("cannot keep a second descriptor of vhost-user socket {path}")]
    DupListener {
        path: PathBuf,
        #[source]
        source: io::Error,
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
    #[error("cannot confine the daemon (--sandbox off runs it unconfined)")]
    Sandbox(#[source] SandboxError),
    #[error("cannot set the max= or weight= of device {id}")]
    Budget {
        id: u32,
        #[source]
        source: ShareError,
    },
    #[error("cannot start the recompressor thread")]
    SpawnRecompressor(#[source] io::Error),
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
    /// The device's listening socket, also held by its thread: shutting it
    /// down wakes the thread from accept, and works with the socket's file
    /// gone, which connecting to it by path does not.
    listener: OwnedFd,
    thread: JoinHandle<()>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before any thread exists, so that all of them inherit the mask.
    let signals = block_signals().map_err(DaemonError::Signals)?;

    let store = Arc::new(Store::new(config.store.clone()).map_err(DaemonError::Store)?);
    set_budgets(&store, &config.devices)?;
    let devices: Vec<Arc<DeviceTelemetry>> = config
        .devices
        .iter()
        .enumerate()
        .map(|(id, spec)| {
            Arc::new(DeviceTelemetry::new(id as u32, spec.path.clone(), config.queues).with_kind(spec.kind))
        })
        .collect();

    let mut listeners = Vec::with_capacity(devices.len());
    for device in &devices {
        listeners.push(listen(&device.socket)?);
    }

    // Before the first thread, which confines itself as it starts.
    let socket_dirs: Vec<PathBuf> = devices
        .iter()
        .map(|d| d.socket.as_path())
        .chain(config.control.as_deref())
        .map(|p| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        })
        .collect();
    sandbox::prepare(&config.sandbox, &socket_dirs).map_err(DaemonError::Sandbox)?;

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
            .spawn(move || {
                lower_priority("the background writer");
                sandbox::enter_or_exit(Role::Writeback);
                writeback_loop(&store, &stopping)
            })
            .map_err(DaemonError::SpawnWriter)?;
        Some(thread)
    } else {
        None
    };
    let recompressor = if config.store.compression == Compression::Auto {
        let (store, stopping) = (store.clone(), stopping.clone());
        let thread = thread::Builder::new()
            .name("tmem-recompress".into())
            .spawn(move || {
                lower_priority("the recompressor");
                sandbox::enter_or_exit(Role::Recompress);
                recompress_loop(&store, &stopping)
            })
            .map_err(DaemonError::SpawnRecompressor)?;
        Some(thread)
    } else {
        None
    };
    let mut handles = Vec::with_capacity(devices.len());
    for (device, listener) in devices.iter().zip(listeners) {
        let listener_fd = dup_listener(&listener).map_err(|source| DaemonError::DupListener {
            path: device.socket.clone(),
            source,
        })?;
        let conn = Arc::new(Mutex::new(None));
        let serve = DeviceLoop {
            kind: config.devices[device.id as usize].kind,
            telemetry: device.clone(),
            store: store.clone(),
            capacity_pages: config.capacity_pages,
            poll: config.poll,
            conn: conn.clone(),
            stopping: stopping.clone(),
        };
        let thread = thread::Builder::new()
            .name(format!("tmem-dev{}", device.id))
            .spawn(move || {
                sandbox::enter_or_exit(Role::Device);
                serve.run(listener)
            })
            .map_err(|source| DaemonError::Spawn {
                id: device.id,
                source,
            })?;
        handles.push(DeviceHandle {
            telemetry: device.clone(),
            conn,
            listener: listener_fd,
            thread,
        });
    }
    sandbox::enter(Role::Main).map_err(DaemonError::Sandbox)?;
    info!(
        "serving {} device(s), {} queue(s) each, memory limit {} bytes, writeback headroom {} bytes",
        devices.len(),
        config.queues,
        store.mem_limit(),
        config.store.writeback_headroom
    );

    let signal = wait_for_signal(&signals);
    info!("received signal {signal}, shutting down");
    let begun = Instant::now();
    start_watchdog(signals, begun + SHUTDOWN_DEADLINE);
    let deadline = begun + SHUTDOWN_GRACE;
    stopping.store(true, Ordering::SeqCst);
    if let Some(control) = control {
        control.stop(deadline);
    }
    for handle in &handles {
        stop_accepting(&handle.listener);
        // A thread that accepts a VMM after this look sees `stopping` once
        // it has published the connection, and shuts it down itself.
        if let Some(conn) = handle.conn.lock().as_ref() {
            conn.shutdown();
        }
    }
    let mut left = Vec::new();
    for handle in handles {
        let name = format!("device {}", handle.telemetry.id);
        if !join_by(handle.thread, deadline, &name) {
            left.push(name);
        }
    }
    if let Some(writer) = writer {
        // It notices `stopping` within one tick, unless a spill write holds it.
        let name = "the background writer".to_owned();
        if !join_by(writer, deadline, &name) {
            left.push(name);
        }
    }
    if let Some(recompressor) = recompressor {
        let name = "the recompressor".to_owned();
        if !join_by(recompressor, deadline, &name) {
            left.push(name);
        }
    }
    if left.is_empty() {
        info!("stopped");
    } else {
        warn!(
            "{} did not stop within {SHUTDOWN_GRACE:?}; exiting without waiting for them",
            left.join(", ")
        );
    }
    Ok(())
}

/// Joins `thread` if it ends by `deadline`. `false` if it is still running
/// then: it is left to end with the process.
fn join_by(thread: JoinHandle<()>, deadline: Instant, name: &str) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    if thread.join().is_err() {
        error!("{name} panicked");
    }
    true
}

/// A second descriptor of a listening socket, for [`stop_accepting`].
fn dup_listener(listener: &Listener) -> io::Result<OwnedFd> {
    // SAFETY: the descriptor is the listener's, open for as long as the
    // borrow, which ends once the duplicate is made.
    unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) }.try_clone_to_owned()
}

/// Makes a listening socket refuse new connections and fail `accept`,
/// waking a thread blocked in it.
fn stop_accepting(listener: &OwnedFd) {
    // SAFETY: shutdown(2) on a descriptor we own; it changes the socket's
    // state, not our memory.
    let rc = unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
    if rc != 0 {
        warn!(
            "cannot shut down a listening socket: {}",
            io::Error::last_os_error()
        );
    }
}

/// Ends the process if shutdown has not finished by `deadline`, or at once
/// on a second signal.
fn start_watchdog(signals: libc::sigset_t, deadline: Instant) {
    let spawned = thread::Builder::new()
        .name("tmem-shutdown".into())
        .spawn(move || {
            sandbox::enter_or_exit(Role::Watchdog);
            // Made now: nothing may be allocated once shutdown is stuck.
            let late = format!("shutdown did not finish within {SHUTDOWN_DEADLINE:?}");
            match wait_for_signal_until(&signals, deadline) {
                Some(libc::SIGINT) => exit_now("received SIGINT again"),
                Some(_) => exit_now("received SIGTERM again"),
                None => exit_now(&late),
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the shutdown watchdog ({e}): a second signal will go unnoticed");
    }
}

/// Ends the process now, with status 1.
fn exit_now(why: &str) -> ! {
    // Straight to the descriptor, and _exit rather than exit: the logger's
    // lock, or whatever exit would run, may be held by the stuck thread.
    let parts = [
        "vhost-user-tmem: ".as_bytes(),
        why.as_bytes(),
        "; exiting now\n".as_bytes(),
    ];
    for part in parts {
        // SAFETY: write(2) reads `part.len()` bytes of a live slice.
        unsafe { libc::write(libc::STDERR_FILENO, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit(2) ends the process without returning or touching its memory.
    unsafe { libc::_exit(1) }
}

/// Gives each device (guest N is device N) the cap and weight of its
/// `--socket` options.
fn set_budgets(store: &Store, devices: &[DeviceSpec]) -> Result<(), DaemonError> {
    for (id, spec) in devices.iter().enumerate() {
        let id = id as u32;
        if spec.max.is_none() && spec.weight == 1 {
            continue;
        }
        let budget = |source| DaemonError::Budget { id, source };
        store.set_guest_max(GuestId(id), spec.max).map_err(budget)?;
        store.set_guest_weight(GuestId(id), spec.weight).map_err(budget)?;
    }
    Ok(())
}

/// Raises the calling thread's nice value by [`BACKGROUND_NICE`] (the kernel
/// stops at 19), before the sandbox, which does not allow it. Raising one's
/// own nice value needs no privilege; if it fails anyway the thread runs on
/// at its old priority.
fn lower_priority(what: &str) {
    // SAFETY: errno is this thread's own; clearing it tells a failed nice()
    // apart from a new nice value of -1.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: nice() only changes a scheduling attribute, and on Linux that
    // of the calling thread alone.
    let rc = unsafe { libc::nice(BACKGROUND_NICE) };
    let err = std::io::Error::last_os_error();
    if rc == -1 && err.raw_os_error() != Some(0) {
        warn!("cannot lower the priority of {what}: {err}");
    }
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

/// Runs the store's recompressor until shutdown: rounds of at most
/// [`RECOMPRESS_PAGES`], each followed by a rest of [`RECOMPRESS_REST`] times
/// its length (a tick at least), and a longer one while nothing is cold.
fn recompress_loop(store: &Store, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        let start = std::time::Instant::now();
        let pause = match store.recompress(RECOMPRESS_PAGES) {
            Ok(round) if round.recompressed + round.kept + round.trained == 0 => RECOMPRESS_IDLE,
            Ok(_) => RECOMPRESS_TICK.max(start.elapsed() * RECOMPRESS_REST),
            Err(e) => {
                warn!("recompression: {e}; retrying in {RECOMPRESS_IDLE:?}");
                RECOMPRESS_IDLE
            }
        };
        // Sleeps in ticks, so shutdown is noticed within one.
        let mut slept = Duration::ZERO;
        while slept < pause && !stopping.load(Ordering::SeqCst) {
            thread::sleep(RECOMPRESS_TICK);
            slept += RECOMPRESS_TICK;
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
    kind: DeviceKind,
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
                if self.stopping.load(Ordering::SeqCst) {
                    // The listener was shut down to stop us.
                    break;
                }
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
            self.kind,
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
        if backend.keeps_data() {
            // A disk outlives the VM that used it, as a disk image would: a
            // VMM that connects again (a restarted VM) finds its data.
            info!("device {id}: VMM disconnected, the disk keeps its data");
        } else {
            let dropped = self.store.drop_guest(self.telemetry.guest());
            if dropped > 0 || !self.stopping.load(Ordering::SeqCst) {
                info!("device {id}: VMM disconnected, dropped {dropped} pages");
            }
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

/// Waits for one of `set` until `deadline`; `None` once it has passed.
fn wait_for_signal_until(set: &libc::sigset_t, deadline: Instant) -> Option<i32> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let timeout = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` and `timeout` are initialised; a null info pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        if signal > 0 {
            return Some(signal);
        }
        // EAGAIN (time is up, checked above) or EINTR.
    }
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
