//! The control socket server, and what it answers from.
//!
//! The server keeps serving whatever a client sends: garbage, lines over
//! [`MAX_LINE`] (answered, then the connection is closed), or a client
//! vanishing mid-line. A request only reaches the store once it has parsed
//! whole into a [`Request`].
//!
//! No client can hold the server up for others. Peers other than the
//! daemon's user and root are refused (`peer.rs`). Each client has a thread
//! of its own and one of [`MAX_CLIENTS`] places (`clients.rs`); a place is
//! busy only while a request is under way, and both halves of that are
//! bounded in time: [`REQUEST_TIMEOUT`] for the request line to arrive and
//! [`REPLY_TIMEOUT`] for the reply to be taken. The accept loop itself never
//! waits on a client.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        io::{AsRawFd, RawFd},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{info, warn};
use thiserror::Error;

use super::{
    clients::{Clients, Place},
    message::{Answer, Cap, ConfigView, DeviceStats, Reply, Request, RequestError, Stats},
    peer, IDLE_TIMEOUT, MAX_CLIENTS, MAX_LINE, REPLY_TIMEOUT, REQUEST_TIMEOUT,
};
use crate::{
    config::{Config, MAX_WEIGHT},
    error_chain,
    protocol::PAGE_SIZE,
    store::{GuestId, ShareError, Store, StoreError},
};

/// Pause after a failed accept (out of file descriptors, say), so that a
/// persistent failure does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the control socket sees of one device: a snapshot of its identity
/// and telemetry, and nothing it could change.
pub trait DeviceReport: Send + Sync {
    fn stats(&self) -> DeviceStats;
}

/// What the server answers from.
#[derive(Clone)]
pub struct ControlContext {
    pub store: Arc<Store>,
    /// Device N is `devices[N]`.
    pub devices: Vec<Arc<dyn DeviceReport>>,
    pub config: Config,
}

/// Why a well-formed request could not be carried out.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("set-config: nothing to set; settable: mem_limit")]
    NothingToSet,
    #[error("set-config: cannot set mem_limit")]
    MemLimit(#[source] StoreError),
    #[error("writeback failed")]
    Writeback(#[source] StoreError),
    #[error("{cmd}: no device {device}; this daemon has {devices} (numbered from 0)")]
    NoDevice {
        cmd: &'static str,
        device: u32,
        devices: usize,
    },
    #[error("set-device: nothing to set; settable: max, weight")]
    NothingToSetDevice,
    #[error("set-device: max {0} is smaller than one page ({PAGE_SIZE} bytes); \"none\" removes the cap")]
    MaxTooSmall(u64),
    #[error("set-device: weight {0} must be between 1 and {MAX_WEIGHT}")]
    Weight(u32),
    #[error("set-device: cannot set device {device}")]
    Share {
        device: u32,
        #[source]
        source: ShareError,
    },
}

impl ControlContext {
    /// Answers one request line; a line that is not a request, or a request
    /// that fails, gets an error reply.
    pub fn handle_line(&self, line: &[u8]) -> Reply {
        let answer = match Request::from_line(line) {
            Ok(request) => self.handle(request).map_err(|e| error_chain(&e)),
            Err(e) => Err(error_chain(&e)),
        };
        match answer {
            Ok(answer) => Reply::Ok(answer),
            Err(message) => Reply::Error(message),
        }
    }

    pub fn handle(&self, request: Request) -> Result<Answer, CommandError> {
        match request {
            Request::Stats {} => Ok(Answer::Stats(self.stats())),
            Request::GetConfig {} => Ok(Answer::Config(self.config_view())),
            Request::SetConfig { mem_limit } => {
                let bytes = mem_limit.ok_or(CommandError::NothingToSet)?.bytes();
                self.store.set_mem_limit(bytes).map_err(CommandError::MemLimit)?;
                info!("control: memory limit set to {bytes} bytes");
                Ok(Answer::Config(self.config_view()))
            }
            Request::Writeback { pages } => self
                .store
                .writeback(pages)
                .map(Answer::Written)
                .map_err(CommandError::Writeback),
            Request::DropPool { device, pool } => {
                self.check_device("drop-pool", device)?;
                let dropped = self.store.invalidate_pool(GuestId(device), pool);
                info!("control: dropped pool {pool} of device {device} ({dropped} pages)");
                Ok(Answer::Dropped(dropped))
            }
            Request::SetDevice { device, max, weight } => self.set_device(device, max, weight),
        }
    }

    fn check_device(&self, cmd: &'static str, device: u32) -> Result<(), CommandError> {
        if device as usize >= self.devices.len() {
            return Err(CommandError::NoDevice {
                cmd,
                device,
                devices: self.devices.len(),
            });
        }
        Ok(())
    }

    /// Checks every value before changing anything, then sets them.
    fn set_device(&self, device: u32, max: Option<Cap>, weight: Option<u32>) -> Result<Answer, CommandError> {
        self.check_device("set-device", device)?;
        if max.is_none() && weight.is_none() {
            return Err(CommandError::NothingToSetDevice);
        }
        let max = max.map(|cap| cap.bytes());
        if let Some(Some(bytes)) = max {
            if bytes < PAGE_SIZE as u64 {
                return Err(CommandError::MaxTooSmall(bytes));
            }
        }
        if let Some(w) = weight {
            if !(1..=MAX_WEIGHT).contains(&w) {
                return Err(CommandError::Weight(w));
            }
        }
        let guest = GuestId(device);
        let share = |source| CommandError::Share { device, source };
        if let Some(max) = max {
            self.store.set_guest_max(guest, max).map_err(share)?;
            match max {
                Some(bytes) => info!("control: device {device} capped at {bytes} bytes"),
                None => info!("control: device {device} uncapped"),
            }
        }
        if let Some(w) = weight {
            self.store.set_guest_weight(guest, w).map_err(share)?;
            info!("control: device {device} weight set to {w}");
        }
        Ok(Answer::Budget(self.store.guest_budget(guest)))
    }

    pub fn stats(&self) -> Stats {
        Stats {
            store: self.store.stats(),
            devices: self.devices.iter().map(|d| d.stats()).collect(),
        }
    }

    pub fn config_view(&self) -> ConfigView {
        let c = &self.config;
        ConfigView {
            mem_limit: self.store.mem_limit(),
            spill_file: c.store.spill.as_ref().map(|s| s.path.display().to_string()),
            spill_limit: c.store.spill.as_ref().map(|s| s.limit),
            zstd_level: c.store.zstd_level,
            dedup: c.store.dedup,
            queues: c.queues,
            capacity_pages: c.capacity_pages,
            poll_us: u64::try_from(c.poll.as_micros()).unwrap_or(u64::MAX),
            sockets: c.devices.iter().map(|d| d.path.display().to_string()).collect(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {0} is in use by a running daemon")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove stale control socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict control socket {path} to mode 0600")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up control socket {path}")]
    Setup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the control thread")]
    Spawn(#[source] io::Error),
}

/// How much a client may cost; [`Limits::default`] is what the daemon uses.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_clients: usize,
    idle: Duration,
    request: Duration,
    reply: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: MAX_CLIENTS,
            idle: IDLE_TIMEOUT,
            request: REQUEST_TIMEOUT,
            reply: REPLY_TIMEOUT,
        }
    }
}

/// The running control socket server.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's device and inode: stopping removes this server's
    /// socket, never one that has since been put at the same path.
    file: (u64, u64),
    /// The accept loop watches the other end; closing this one wakes it,
    /// which needs no path (the socket file may be gone by then).
    wake: UnixStream,
    clients: Arc<Clients>,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (mode 0600 from the start) and serves it on a new thread.
    pub fn start(path: &Path, ctx: ControlContext) -> Result<Self, ControlError> {
        Self::start_with(path, ctx, Limits::default())
    }

    fn start_with(path: &Path, ctx: ControlContext, limits: Limits) -> Result<Self, ControlError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        let listener = bind_private(path)?;
        let setup = |source| ControlError::Setup {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::symlink_metadata(path).map_err(setup)?;
        // A client that gives up between poll and accept must not leave
        // the loop blocked in accept.
        listener.set_nonblocking(true).map_err(setup)?;
        let (wake, woken) = UnixStream::pair().map_err(setup)?;
        let clients = Clients::new(limits.max_clients);
        let thread_clients = clients.clone();
        let thread = thread::Builder::new()
            .name("tmem-control".into())
            .spawn(move || accept_loop(&listener, &woken, &ctx, &thread_clients, limits))
            .map_err(ControlError::Spawn)?;
        info!("control socket at {}", path.display());
        Ok(ControlServer {
            path: path.to_owned(),
            file: (meta.dev(), meta.ino()),
            wake,
            clients,
            thread,
        })
    }

    /// Stops accepting, disconnects every client, and removes the socket
    /// file if it is still this server's. Waits for the accept thread until
    /// `deadline` at most, and for client threads not at all: one may be in
    /// a store call that waits on a spill file whose filesystem hangs.
    pub fn stop(self, deadline: Instant) {
        drop(self.wake);
        self.clients.close_all();
        if !join_by(self.thread, deadline) {
            warn!("control: the accept thread did not stop in time; leaving it");
        }
        remove_if_ours(&self.path, self.file);
    }
}

/// Joins `thread` if it ends by `deadline`; `false` if it is still running.
fn join_by(thread: JoinHandle<()>, deadline: Instant) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    if thread.join().is_err() {
        warn!("control: the accept thread panicked");
    }
    true
}

fn remove_if_ours(path: &Path, file: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == file => {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("control: cannot remove {}: {e}", path.display());
            }
        }
        Ok(_) => info!(
            "control: {} is no longer this daemon's socket; leaving it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("control: cannot look at {}: {e}", path.display()),
    }
}

/// Binds with a umask that leaves the socket 0600 from the moment it exists,
/// so nobody else can connect in the window before a chmod. The umask is
/// process-wide; this runs at start-up before other threads create files.
fn bind_private(path: &Path) -> Result<UnixListener, ControlError> {
    // SAFETY: umask only swaps the process file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

fn accept_loop(
    listener: &UnixListener,
    woken: &UnixStream,
    ctx: &ControlContext,
    clients: &Arc<Clients>,
    limits: Limits,
) {
    crate::sandbox::enter_or_exit(crate::sandbox::Role::Control);
    let daemon_uid = peer::daemon_uid();
    loop {
        match wait_for_client(listener, woken) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("control: poll failed: {e}");
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => take_client(stream, ctx, clients, daemon_uid, limits),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                warn!("control socket accept failed: {e}");
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Waits until a client is waiting on `listener` (`true`) or the other end
/// of `woken` has been closed (`false`).
fn wait_for_client(listener: &UnixListener, woken: &UnixStream) -> io::Result<bool> {
    let [client, stop] = poll_readable([listener.as_raw_fd(), woken.as_raw_fd()], None)?;
    // Stopping comes first, even with clients waiting.
    Ok(client && !stop)
}

/// Waits until one of `fds` is readable (or hung up), or until `deadline`;
/// says which are.
fn poll_readable<const N: usize>(fds: [RawFd; N], deadline: Option<Instant>) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        let timeout = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up, so that a wake-up is never early.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `polled` is a live array of initialised pollfds, and its
        // length is the count passed with it.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout) };
        if rc >= 0 {
            return Ok(polled.map(|p| p.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Checks who a new client is and finds it a place, then serves it on a
/// thread of its own.
fn take_client(
    stream: UnixStream,
    ctx: &ControlContext,
    clients: &Arc<Clients>,
    daemon_uid: u32,
    limits: Limits,
) {
    // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux,
    // but the timeouts below rely on blocking I/O, so do not depend on it.
    if let Err(e) = stream.set_nonblocking(false) {
        warn!("control: cannot set up a client's socket: {e}");
        return;
    }
    let peer = match peer::peer_of(&stream).and_then(|peer| peer::admit(peer, daemon_uid)) {
        Ok(peer) => peer,
        Err(e) => {
            warn!("control: refused a client: {}", error_chain(&e));
            turn_away(&stream, &e);
            return;
        }
    };
    let place = match clients.admit(&stream) {
        Ok(place) => place,
        Err(e) => {
            info!("control: turned away pid {}: {}", peer.pid, error_chain(&e));
            turn_away(&stream, &e);
            return;
        }
    };
    let ctx = ctx.clone();
    let spawned = thread::Builder::new()
        .name("tmem-ctl-client".into())
        .spawn(move || serve_client(stream, &ctx, &place, limits));
    if let Err(e) = spawned {
        warn!("control: cannot start a client thread: {e}");
    }
}

/// Tells a client why it is not served, on the accept loop's thread and so
/// without waiting: the line goes into the empty buffer of a socket just
/// accepted, or not at all.
fn turn_away(mut stream: &UnixStream, why: &(dyn std::error::Error + 'static)) {
    let mut line = encode(&Reply::Error(error_chain(why)));
    line.push('\n');
    if stream.set_nonblocking(true).is_ok() {
        let _ = stream.write(line.as_bytes());
    }
}

/// Writes one reply line, giving up at `deadline`. The deadline covers the
/// whole line, so a client reading a byte at a time cannot stretch it.
fn write_reply(mut stream: &UnixStream, reply: &Reply, deadline: Instant) -> io::Result<()> {
    let mut line = encode(reply);
    line.push('\n');
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The time until `deadline`, or a timeout error once it has passed.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// Whether an I/O error is a socket timeout running out.
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// One reply as a line of JSON, keys sorted at every level.
fn encode(reply: &Reply) -> String {
    // A Value's maps are sorted, which is how replies have always come out:
    // going through one keeps them byte for byte what scripts have seen.
    match serde_json::to_value(reply) {
        Ok(value) => value.to_string(),
        Err(e) => {
            warn!("control: cannot encode a reply: {e}");
            r#"{"error":"the daemon could not encode its reply","ok":false}"#.to_owned()
        }
    }
}

/// What reading one line produced.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Complete,
    /// End of stream; any partial line is discarded.
    Eof,
    TooLong,
}

/// Reads up to and excluding the next `\n` into `line`, keeping at most `cap` bytes.
fn read_line_capped(reader: &mut impl BufRead, line: &mut Vec<u8>, cap: usize) -> io::Result<Line> {
    line.clear();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(pos) => (pos, true),
            None => (buf.len(), false),
        };
        if line.len() + take > cap {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Line::Complete);
        }
    }
}

/// A client's socket, read against a deadline rather than a per-read
/// timeout: each read waits only for what is left, so a client that sends a
/// byte now and then cannot stretch the time it is given.
struct Timed {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(time_left(self.deadline)?))?;
        self.stream.read(buf)
    }
}

fn serve_client(stream: UnixStream, ctx: &ControlContext, place: &Place, limits: Limits) {
    crate::sandbox::enter_or_exit(crate::sandbox::Role::ControlClient);
    let mut reader = BufReader::new(Timed {
        stream,
        deadline: Instant::now() + limits.request,
    });
    let mut line = Vec::new();
    loop {
        // A request already read ahead keeps the client busy. Otherwise it
        // is idle until a byte arrives, and turns busy before reading it:
        // while the byte sits in the socket, the table sees it there and
        // does not close the client to make room, so no request that has
        // reached the daemon is dropped that way.
        if reader.buffer().is_empty() {
            place.idle();
            let fd = reader.get_ref().stream.as_raw_fd();
            match poll_readable([fd], Some(Instant::now() + limits.idle)) {
                Ok([true]) => {}
                // Idle too long: nothing to answer.
                Ok([false]) | Err(_) => return,
            }
            if !place.busy() {
                return;
            }
        }
        reader.get_mut().deadline = Instant::now() + limits.request;
        let reply = match read_line_capped(&mut reader, &mut line, MAX_LINE) {
            Ok(Line::Complete) => ctx.handle_line(&line),
            Ok(Line::TooLong) => return farewell(reader.get_ref(), RequestError::TooLong, limits),
            Err(e) if timed_out(&e) => {
                info!(
                    "control: a client took over {:?} to send a request line",
                    limits.request
                );
                return farewell(reader.get_ref(), RequestError::TooSlow(limits.request), limits);
            }
            // Gone mid-line, or reset: nothing to answer.
            Ok(Line::Eof) | Err(_) => return,
        };
        if let Err(e) = write_reply(&reader.get_ref().stream, &reply, Instant::now() + limits.reply) {
            if timed_out(&e) {
                info!(
                    "control: a client did not take its reply within {:?}",
                    limits.reply
                );
            }
            return;
        }
    }
}

/// The last reply on a connection the server is about to close: why.
fn farewell(client: &Timed, why: RequestError, limits: Limits) {
    let message = format!("{}; closing the connection", error_chain(&why));
    let _ = write_reply(
        &client.stream,
        &Reply::Error(message),
        Instant::now() + limits.reply,
    );
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use clap::Parser;
    use serde_json::Value;

    use super::*;
    use crate::{
        config::Args,
        control::{ClientError, ControlClient},
        stats::{Latency, OpLatency},
        store::GetOutcome,
    };

    struct FakeDevice(DeviceStats);

    impl DeviceReport for FakeDevice {
        fn stats(&self) -> DeviceStats {
            self.0.clone()
        }
    }

    fn device(id: u32, socket: &str, latency: Latency) -> Arc<dyn DeviceReport> {
        Arc::new(FakeDevice(DeviceStats {
            kind: "tmem".into(),
            id,
            socket: socket.to_owned(),
            connected: false,
            queues: 2,
            latency,
        }))
    }

    fn context() -> ControlContext {
        let config = Config::try_from(Args::parse_from([
            "x", "--socket", "/tmp/a", "--socket", "/tmp/b", "--queues", "2",
        ]))
        .unwrap();
        let got_one = Latency {
            get: OpLatency {
                p50_us: 3.0,
                p99_us: 3.0,
                count: 1,
            },
            ..Latency::default()
        };
        ControlContext {
            store: Arc::new(Store::new(config.store.clone()).unwrap()),
            devices: vec![
                device(0, "/tmp/a", Latency::default()),
                device(1, "/tmp/b", got_one),
            ],
            config,
        }
    }

    /// The reply to `line` as it goes on the wire.
    fn wire(ctx: &ControlContext, line: &str) -> String {
        encode(&ctx.handle_line(line.as_bytes()))
    }

    fn reply(ctx: &ControlContext, line: &str) -> Value {
        serde_json::from_str(&wire(ctx, line)).unwrap()
    }

    fn error_of(v: &Value) -> &str {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap()
    }

    fn page_is_held(ctx: &ControlContext, guest: u32, pool: u32, index: u64) -> bool {
        let mut page = [0u8; PAGE_SIZE];
        ctx.store
            .get(GuestId(guest), pool, index, &mut page, false)
            .unwrap()
            == GetOutcome::Found
    }

    #[test]
    fn replies_keep_their_bytes() {
        let ctx = context();
        assert_eq!(
            wire(&ctx, r#"{"cmd":"writeback","pages":5}"#),
            r#"{"ok":true,"written":0}"#
        );
        assert_eq!(
            wire(&ctx, r#"{"cmd":"drop-pool","device":1,"pool":4}"#),
            r#"{"dropped":0,"ok":true}"#
        );
        assert_eq!(
            wire(&ctx, r#"{"cmd":"drop-pool","device":2,"pool":4}"#),
            r#"{"error":"drop-pool: no device 2; this daemon has 2 (numbered from 0)","ok":false}"#
        );
        assert_eq!(
            wire(&ctx, r#"{"cmd":"get-config"}"#),
            r#"{"config":{"capacity_pages":0,"dedup":"guest","mem_limit":268435456,"poll_us":0,"queues":2,"sockets":["/tmp/a","/tmp/b"],"spill_file":null,"spill_limit":null,"zstd_level":1},"ok":true}"#
        );
        let stats = wire(&ctx, r#"{"cmd":"stats"}"#);
        assert!(
            stats.starts_with(r#"{"ok":true,"stats":{"devices":[{"connected":false,"id":0,"kind":"tmem","latency":{"get":{"count":0,"p50_us":0.0,"#),
            "{stats}"
        );
    }

    #[test]
    fn stats_reply_shape() {
        let ctx = context();
        ctx.store.put(GuestId(1), 4, 9, &[1u8; PAGE_SIZE]).unwrap();
        let v = reply(&ctx, r#"{"cmd":"stats"}"#);
        assert_eq!(v["ok"], true);
        let stats: Stats = serde_json::from_value(v["stats"].clone()).unwrap();
        assert_eq!(stats.devices.len(), 2);
        assert_eq!(stats.devices[1].socket, "/tmp/b");
        assert_eq!(stats.devices[1].queues, 2);
        assert!(!stats.devices[1].connected);
        assert_eq!(stats.devices[1].latency.get.count, 1);
        assert_eq!(stats.store.total.succ_stores, 1);
        assert!(v["stats"]["store"]["total"]["succ_stores"].is_u64());
        assert!(v["stats"]["devices"][0]["latency"]["put"]["p99_us"].is_f64());
    }

    #[test]
    fn set_config_accepts_strings_and_numbers() {
        let ctx = context();
        let v = reply(&ctx, r#"{"cmd":"set-config","mem_limit":"1G"}"#);
        assert_eq!(v["config"]["mem_limit"], 1u64 << 30, "{v}");
        assert_eq!(ctx.store.mem_limit(), 1 << 30);
        let v = reply(&ctx, r#"{"cmd":"set-config","mem_limit":1048576}"#);
        assert_eq!(v["ok"], true);
        assert_eq!(ctx.store.mem_limit(), 1 << 20);
        let v = reply(&ctx, r#"{"cmd":"get-config"}"#);
        assert_eq!(v["config"]["mem_limit"], 1 << 20);
        assert_eq!(v["config"]["queues"], 2);
    }

    #[test]
    fn set_config_errors_name_the_problem() {
        let ctx = context();
        let e = reply(&ctx, r#"{"cmd":"set-config","mem_limit":"lots"}"#);
        assert!(error_of(&e).contains("mem_limit"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"set-config","mem_limit":-1}"#);
        assert!(error_of(&e).contains("mem_limit"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"set-config","mem_limit":[1]}"#);
        assert!(error_of(&e).contains("size string"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"set-config"}"#);
        assert!(error_of(&e).contains("nothing to set"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"set-config","queues":3}"#);
        assert!(error_of(&e).contains("queues"), "{e}");
        assert_eq!(ctx.store.mem_limit(), 256 << 20);
    }

    #[test]
    fn bad_requests_get_error_replies_that_name_the_problem() {
        let ctx = context();
        for (line, says) in [
            ("garbage", "not valid JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"cmd":7}"#, "must be a string"),
            (r#"{"cmd":"drop-pool","device":0,"pool":4294967296}"#, "\"pool\""),
            (r#"{"cmd":"stats","x":1}"#, "unknown field \"x\""),
            (r#"{"cmd":"explode"}"#, "explode"),
            (r#"{"pages":3}"#, "cmd"),
            (r#"{"cmd":"writeback"}"#, "pages"),
            (r#"{"cmd":"writeback","pages":"x"}"#, "\"pages\" must be"),
            ("", "empty"),
        ] {
            let e = reply(&ctx, line);
            assert!(error_of(&e).contains(says), "{line}: {e}");
        }
        let e = encode(&ctx.handle_line(b"\xff\xfe"));
        assert!(e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn bad_requests_leave_the_pages_alone() {
        let ctx = context();
        ctx.store.put(GuestId(0), 4, 9, &[1u8; PAGE_SIZE]).unwrap();
        let oversized = format!(
            r#"{{"cmd":"drop-pool","device":0,"pool":4,"pad":"{}"}}"#,
            "x".repeat(MAX_LINE)
        );
        let nested = format!("{}{}", "[".repeat(MAX_LINE / 2), "]".repeat(MAX_LINE / 2));
        for line in [
            r#"{"cmd":"drop-pool","device":0,"pool":4,"extra":1}"#,
            r#"{"cmd":"drop-pool","device":"0","pool":4}"#,
            r#"{"cmd":"drop-pool","device":0,"pool":-4}"#,
            r#"{"cmd":"drop-pool","device":0}"#,
            r#"{"cmd":"drop-pool","device":0,"pool":4.0}"#,
            r#"{"cmd":0,"device":0,"pool":4}"#,
            r#"["drop-pool",0,4]"#,
            r#"{"cmd":"drop-pool","device":0,"pool":4"#,
            &oversized,
            &nested,
        ] {
            let e = reply(&ctx, line);
            assert!(!error_of(&e).is_empty(), "{e}");
            assert!(page_is_held(&ctx, 0, 4, 9), "{line}");
        }
        // The well-formed request does what the others did not.
        let v = reply(&ctx, r#"{"cmd":"drop-pool","device":0,"pool":4}"#);
        assert_eq!(v["dropped"], 1, "{v}");
        assert!(!page_is_held(&ctx, 0, 4, 9));
    }

    #[test]
    fn writeback_and_drop_pool() {
        let ctx = context();
        let v = reply(&ctx, r#"{"cmd":"writeback","pages":5}"#);
        assert!(v["written"].is_u64(), "{v}");
        ctx.store.put(GuestId(1), 4, 9, &[1u8; PAGE_SIZE]).unwrap();
        ctx.store.put(GuestId(0), 4, 9, &[1u8; PAGE_SIZE]).unwrap();
        let v = reply(&ctx, r#"{"cmd":"drop-pool","device":1,"pool":4}"#);
        assert_eq!(v["dropped"], 1, "{v}");
        // Device 0's pool 4 is untouched.
        assert!(page_is_held(&ctx, 0, 4, 9));
        let e = reply(&ctx, r#"{"cmd":"drop-pool","device":2,"pool":4}"#);
        assert!(error_of(&e).contains("no device 2"), "{e}");
    }

    #[test]
    fn set_device_caps_and_weighs_one_device() {
        let ctx = context();
        let v = reply(&ctx, r#"{"cmd":"set-device","device":1,"max":"1M"}"#);
        assert_eq!(v["budget"]["max_bytes"], 1 << 20, "{v}");
        assert_eq!(ctx.store.guest_budget(GuestId(1)).max_bytes, Some(1 << 20));
        assert_eq!(ctx.store.guest_budget(GuestId(0)).max_bytes, None);
        let v = reply(&ctx, r#"{"cmd":"set-device","device":1,"weight":5,"max":"none"}"#);
        assert_eq!(
            (v["budget"]["weight"].as_u64(), v["budget"]["max_bytes"].is_null()),
            (Some(5), true)
        );
        // The cap shows in the stats, with the device's use and share.
        ctx.store.set_guest_max(GuestId(1), Some(1 << 20)).unwrap();
        ctx.store.put(GuestId(1), 0, 0, &[3u8; PAGE_SIZE]).unwrap();
        let v = reply(&ctx, r#"{"cmd":"stats"}"#);
        let b = &v["stats"]["store"]["guests"]["1"]["budget"];
        assert_eq!(b["max_bytes"], 1 << 20, "{v}");
        assert_eq!(b["weight"], 5);
        assert!(b["ram_bytes"].as_u64().unwrap() > 0, "{b}");
        assert!(b["fair_share_bytes"].as_u64().unwrap() > 0, "{b}");
        assert_eq!(b["spill_bytes"], 0);
    }

    #[test]
    fn set_device_refuses_bad_values_and_changes_nothing() {
        let ctx = context();
        for (line, says) in [
            (
                r#"{"cmd":"set-device","device":2,"max":"1G"}"#,
                "set-device: no device 2; this daemon has 2",
            ),
            (
                r#"{"cmd":"set-device","device":0}"#,
                "nothing to set; settable: max, weight",
            ),
            (
                r#"{"cmd":"set-device","device":0,"max":100}"#,
                "max 100 is smaller than one page",
            ),
            (
                r#"{"cmd":"set-device","device":0,"max":"1G","weight":0}"#,
                "weight 0 must be between 1 and 10000",
            ),
            (
                r#"{"cmd":"set-device","device":0,"weight":10001}"#,
                "weight 10001",
            ),
            (
                r#"{"cmd":"set-device","device":0,"max":"12Q"}"#,
                "\"12Q\" has an unknown unit",
            ),
            (
                r#"{"cmd":"set-device","device":0,"weight":-1}"#,
                "field \"weight\" must be",
            ),
            (
                r#"{"cmd":"set-device","device":0,"max":"1G","colour":1}"#,
                "unknown field \"colour\"",
            ),
        ] {
            let e = reply(&ctx, line);
            assert!(error_of(&e).contains(says), "{line}: {e}");
        }
        let b = ctx.store.guest_budget(GuestId(0));
        assert_eq!(
            (b.max_bytes, b.weight),
            (None, 1),
            "a refused request sets nothing"
        );
    }

    #[test]
    fn line_reader_caps_and_handles_partial_lines() {
        let mut line = Vec::new();
        let mut r = BufReader::with_capacity(4, &b"ab\ncdefgh\nxyz"[..]);
        assert_eq!(read_line_capped(&mut r, &mut line, 8).unwrap(), Line::Complete);
        assert_eq!(line, b"ab");
        assert_eq!(read_line_capped(&mut r, &mut line, 8).unwrap(), Line::Complete);
        assert_eq!(line, b"cdefgh");
        // A client gone mid-line: the fragment is not a request.
        assert_eq!(read_line_capped(&mut r, &mut line, 8).unwrap(), Line::Eof);
        let mut r = BufReader::with_capacity(4, &b"0123456789\n"[..]);
        assert_eq!(read_line_capped(&mut r, &mut line, 8).unwrap(), Line::TooLong);
    }

    #[test]
    fn server_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, context()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the same path is refused.
        assert!(matches!(
            ControlServer::start(&path, context()),
            Err(ControlError::InUse(_))
        ));

        // Garbage and a client that leaves mid-line do not stop the server.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"\x00\x01 not json\n").unwrap();
        let mut buf = [0u8; 256];
        let n = raw.read(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().contains("\"ok\":false"));
        raw.write_all(b"{\"cmd\":\"sta").unwrap();
        drop(raw);

        // An over-long line gets an error, then the connection closes.
        let mut raw = UnixStream::connect(&path).unwrap();
        let big = vec![b'x'; MAX_LINE + 10];
        let _ = raw.write_all(&big);
        let mut out = String::new();
        let _ = BufReader::new(&raw).read_line(&mut out);
        assert!(out.contains("longer than"), "{out}");

        let mut client = ControlClient::connect(&path).unwrap();
        let stats = client.stats().unwrap();
        assert_eq!(stats.devices.len(), 2);
        assert_eq!(client.config().unwrap().queues, 2);
        let config = client.set_mem_limit("64M".parse().unwrap()).unwrap();
        assert_eq!(config.mem_limit, 64 << 20);
        assert_eq!(client.writeback(3).unwrap(), 0);
        assert_eq!(client.drop_pool(1, 0).unwrap(), 0);
        let err = client.drop_pool(9, 0).unwrap_err();
        assert!(matches!(err, ClientError::Refused(ref m) if m.contains("no device 9")));
        let budget = client.set_device(1, Some(Cap::None), Some(2)).unwrap();
        assert_eq!((budget.max_bytes, budget.weight), (None, 2));
        let err = client.set_device(7, None, Some(2)).unwrap_err();
        assert!(matches!(err, ClientError::Refused(ref m) if m.contains("no device 7")));
        server.stop(Instant::now() + Duration::from_secs(5));
        assert!(!path.exists());
    }

    #[test]
    fn stopping_needs_no_path_and_leaves_a_newcomers_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, context()).unwrap();
        let _idle = UnixStream::connect(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let successor = UnixListener::bind(&path).unwrap();
        let begun = Instant::now();
        server.stop(Instant::now() + Duration::from_secs(5));
        assert!(begun.elapsed() < Duration::from_secs(1), "{:?}", begun.elapsed());
        assert!(path.exists(), "removed a socket that was not its own");
        drop(successor);
    }

    #[test]
    fn a_busy_place_is_given_back_when_its_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let limits = Limits {
            max_clients: 1,
            request: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = ControlServer::start_with(&path, context(), limits).unwrap();
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(br#"{"cmd":"#).unwrap();
        let err = ControlClient::connect(&path).unwrap().stats().unwrap_err();
        assert!(
            matches!(err, ClientError::Refused(ref m) if m.contains("too many control clients")),
            "{err}"
        );
        let mut out = String::new();
        BufReader::new(&slow).read_line(&mut out).unwrap();
        assert!(out.contains("not finished within 300ms; closing"), "{out}");
        // The place is given back once the slow client's thread has gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ControlClient::connect(&path).unwrap().stats().is_err() {
            assert!(Instant::now() < deadline, "the place was not given back");
            thread::sleep(Duration::from_millis(10));
        }
        server.stop(Instant::now() + Duration::from_secs(5));
    }
}
