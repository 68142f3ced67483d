//! The control socket server, and what it answers from.
//!
//! The server keeps serving whatever a client sends: garbage, lines over
//! [`MAX_LINE`] (answered, then the connection is closed), or a client
//! vanishing mid-line. A request only reaches the store once it has parsed
//! whole into a [`Request`].

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use log::{info, warn};
use thiserror::Error;

use super::{
    message::{Answer, ConfigView, DeviceStats, Reply, Request, RequestError, Stats},
    MAX_LINE,
};
use crate::{
    config::Config,
    error_chain,
    store::{GuestId, Store, StoreError},
};

/// Clients served at once; more are told to come back later.
const MAX_CLIENTS: usize = 16;
/// A client silent this long is disconnected (`tmemctl watch` asks every second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

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
    #[error("drop-pool: no device {device}; this daemon has {devices} (numbered from 0)")]
    NoDevice { device: u32, devices: usize },
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
                if device as usize >= self.devices.len() {
                    return Err(CommandError::NoDevice {
                        device,
                        devices: self.devices.len(),
                    });
                }
                let dropped = self.store.invalidate_pool(GuestId(device), pool);
                info!("control: dropped pool {pool} of device {device} ({dropped} pages)");
                Ok(Answer::Dropped(dropped))
            }
        }
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
            sockets: c.sockets.iter().map(|p| p.display().to_string()).collect(),
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
    #[error("cannot start the control thread")]
    Spawn(#[source] io::Error),
}

/// The running control socket server.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (mode 0600 from the start) and serves it on a new thread.
    pub fn start(path: &Path, ctx: ControlContext) -> Result<Self, ControlError> {
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
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name("tmem-control".into())
            .spawn(move || accept_loop(listener, ctx, thread_stop))
            .map_err(ControlError::Spawn)?;
        info!("control socket at {}", path.display());
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread,
        })
    }

    /// Stops accepting, and removes the socket file.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        drop(UnixStream::connect(&self.path));
        if self.thread.join().is_err() {
            warn!("control thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
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

fn accept_loop(listener: UnixListener, ctx: ControlContext, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
            let _ = write_reply(
                &mut stream,
                &Reply::Error(format!("too many control clients (max {MAX_CLIENTS}); try again")),
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let ctx = ctx.clone();
        let client_active = active.clone();
        let spawned = thread::Builder::new()
            .name("tmem-control-client".into())
            .spawn(move || {
                serve_client(stream, &ctx);
                client_active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a control client thread: {e}");
        }
    }
}

fn write_reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut out = encode(reply);
    out.push('\n');
    stream.write_all(out.as_bytes())
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

fn serve_client(stream: UnixStream, ctx: &ControlContext) {
    if let Err(e) = stream.set_read_timeout(Some(IDLE_TIMEOUT)) {
        warn!("control client: cannot set a read timeout: {e}");
        return;
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("control client: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let reply = match read_line_capped(&mut reader, &mut line, MAX_LINE) {
            Ok(Line::Complete) => ctx.handle_line(&line),
            Ok(Line::TooLong) => {
                let message = format!("{}; closing the connection", RequestError::TooLong);
                let _ = write_reply(&mut writer, &Reply::Error(message));
                return;
            }
            // Gone, timed out, or reset: nothing to answer.
            Ok(Line::Eof) | Err(_) => return,
        };
        if write_reply(&mut writer, &reply).is_err() {
            return;
        }
    }
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
        protocol::PAGE_SIZE,
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
            stats.starts_with(r#"{"ok":true,"stats":{"devices":[{"connected":false,"id":0,"latency":{"get":{"count":0,"p50_us":0.0,"#),
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
        server.stop();
        assert!(!path.exists());
    }
}
