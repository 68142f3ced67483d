//! The control socket: newline-delimited JSON over a unix socket (mode 0600),
//! one request object per line, one reply object per line.
//!
//! Requests (`cmd`): `stats`, `get-config`, `set-config` (`mem_limit`),
//! `writeback` (`pages`), `drop-pool` (`device`, `pool`). Every reply has
//! `ok`; a failed one has `error` naming what was wrong. The server keeps
//! serving whatever a client sends: garbage, lines over [`MAX_LINE`] (answered,
//! then the connection is closed), or a client vanishing mid-line.
//!
//! [`ControlClient`] is the other end, used by `tmemctl`.

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
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

use crate::{
    config::Config,
    error_chain,
    size::parse_size,
    stats::{summarize, Latency},
    store::{DedupDomain, GuestId, Store, StoreStats},
    telemetry::DeviceTelemetry,
};

/// Where `tmemctl` looks when not given `--control`.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-user-tmem/control.sock";

/// Longest request line accepted. Real requests are under 100 bytes; the cap
/// only keeps a misbehaving client from growing our buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; more are told to come back later.
const MAX_CLIENTS: usize = 16;
/// A client silent this long is disconnected (`tmemctl watch` asks every second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A request, as parsed from one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Stats,
    GetConfig,
    SetConfig {
        /// Bytes, or a size string such as "1G".
        #[serde(skip_serializing_if = "Option::is_none")]
        mem_limit: Option<Value>,
    },
    Writeback {
        pages: u64,
    },
    DropPool {
        device: u32,
        pool: u32,
    },
}

const COMMANDS: &str = "stats, get-config, set-config, writeback, drop-pool";

impl Request {
    /// Decodes a request object, with errors that name the offending field
    /// (serde's own messages give a column number instead).
    pub fn from_value(value: &Value) -> Result<Request, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("expected a JSON object with a \"cmd\" field, got {value}"))?;
        let cmd = match obj.get("cmd") {
            Some(Value::String(cmd)) => cmd.as_str(),
            Some(other) => return Err(format!("\"cmd\" must be a string, got {other}")),
            None => return Err(format!("missing \"cmd\" field (one of {COMMANDS})")),
        };
        let fields: &[&str] = match cmd {
            "stats" | "get-config" => &[],
            "set-config" => &["mem_limit"],
            "writeback" => &["pages"],
            "drop-pool" => &["device", "pool"],
            other => return Err(format!("unknown cmd {other:?}; expected one of {COMMANDS}")),
        };
        if let Some(extra) = obj
            .keys()
            .find(|k| k.as_str() != "cmd" && !fields.contains(&k.as_str()))
        {
            return Err(format!(
                "{cmd}: unknown field {extra:?} (accepted: {})",
                if fields.is_empty() {
                    "none".to_owned()
                } else {
                    fields.join(", ")
                }
            ));
        }
        let uint = |name: &str| -> Result<u64, String> {
            match obj.get(name) {
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| format!("{cmd}: field {name:?} must be a non-negative integer, got {v}")),
                None => Err(format!("{cmd}: missing field {name:?}")),
            }
        };
        let uint32 = |name: &str| -> Result<u32, String> {
            let v = uint(name)?;
            u32::try_from(v).map_err(|e| format!("{cmd}: field {name:?} = {v}: {e}"))
        };
        Ok(match cmd {
            "stats" => Request::Stats,
            "get-config" => Request::GetConfig,
            "set-config" => Request::SetConfig {
                mem_limit: obj.get("mem_limit").cloned(),
            },
            "writeback" => Request::Writeback {
                pages: uint("pages")?,
            },
            _ => Request::DropPool {
                device: uint32("device")?,
                pool: uint32("pool")?,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub id: u32,
    pub socket: String,
    pub connected: bool,
    pub queues: u16,
    pub latency: Latency,
}

/// The `stats` object of a `stats` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub store: StoreStats,
    pub devices: Vec<DeviceStats>,
}

/// The `config` object of `get-config` and `set-config` replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigView {
    pub mem_limit: u64,
    pub spill_file: Option<String>,
    pub spill_limit: Option<u64>,
    pub zstd_level: i32,
    pub dedup: DedupDomain,
    pub queues: u16,
    pub capacity_pages: u64,
    pub poll_us: u64,
    pub sockets: Vec<String>,
}

/// What the server answers from.
#[derive(Clone)]
pub struct ControlContext {
    pub store: Arc<Store>,
    pub devices: Vec<Arc<DeviceTelemetry>>,
    pub config: Config,
}

impl ControlContext {
    /// Answers one request line; never fails, errors become `ok: false` replies.
    pub fn handle_line(&self, line: &[u8]) -> Value {
        let text = match std::str::from_utf8(line) {
            Ok(text) => text.trim(),
            Err(e) => return error_reply(format!("request is not UTF-8: {e}")),
        };
        if text.is_empty() {
            return error_reply("empty request: expected a JSON object such as {\"cmd\":\"stats\"}");
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => return error_reply(format!("request is not valid JSON: {e}")),
        };
        match Request::from_value(&value) {
            Ok(req) => self.handle(req),
            Err(msg) => error_reply(format!("bad request: {msg}")),
        }
    }

    pub fn handle(&self, req: Request) -> Value {
        match req {
            Request::Stats => json!({"ok": true, "stats": self.stats()}),
            Request::GetConfig => json!({"ok": true, "config": self.config_view()}),
            Request::SetConfig { mem_limit } => {
                let Some(value) = mem_limit else {
                    return error_reply("set-config: nothing to set; settable: mem_limit");
                };
                let bytes = match size_value(&value) {
                    Ok(bytes) => bytes,
                    Err(msg) => return error_reply(format!("set-config: mem_limit {value}: {msg}")),
                };
                match self.store.set_mem_limit(bytes) {
                    Ok(()) => {
                        info!("control: memory limit set to {bytes} bytes");
                        json!({"ok": true, "config": self.config_view()})
                    }
                    Err(e) => error_reply(format!("set-config: cannot set mem_limit: {}", error_chain(&e))),
                }
            }
            Request::Writeback { pages } => match self.store.writeback(pages) {
                Ok(written) => json!({"ok": true, "written": written}),
                Err(e) => error_reply(format!("writeback failed: {}", error_chain(&e))),
            },
            Request::DropPool { device, pool } => {
                if device as usize >= self.devices.len() {
                    return error_reply(format!(
                        "drop-pool: no device {device}; this daemon has {} (numbered from 0)",
                        self.devices.len()
                    ));
                }
                let dropped = self.store.invalidate_pool(GuestId(device), pool);
                info!("control: dropped pool {pool} of device {device} ({dropped} pages)");
                json!({"ok": true, "dropped": dropped})
            }
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            store: self.store.stats(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceStats {
                    id: d.id,
                    socket: d.socket.display().to_string(),
                    connected: d.connected.load(Ordering::Relaxed),
                    queues: d.queues,
                    latency: summarize(&d.latency),
                })
                .collect(),
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

fn error_reply(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

/// A size given as a JSON number of bytes or a string such as "512M".
fn size_value(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a whole, non-negative number of bytes")),
        Value::String(s) => parse_size(s).map_err(|e| e.to_string()),
        other => Err(format!(
            "must be a number of bytes or a size string like \"1G\", not {other}"
        )),
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
                &error_reply(format!("too many control clients (max {MAX_CLIENTS}); try again")),
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

fn write_reply(stream: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut out = reply.to_string();
    out.push('\n');
    stream.write_all(out.as_bytes())
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
                let _ = write_reply(
                    &mut writer,
                    &error_reply(format!(
                        "request line longer than {MAX_LINE} bytes; closing the connection"
                    )),
                );
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

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
    #[error("daemon closed the connection without replying")]
    Closed,
    #[error("daemon sent a reply that is not JSON")]
    BadReply(#[source] serde_json::Error),
    #[error("daemon sent a reply without the expected fields")]
    Shape(#[source] serde_json::Error),
    #[error("daemon refused the request: {0}")]
    Refused(String),
}

/// A connection to the daemon's control socket.
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let reader = BufReader::new(stream.try_clone().map_err(ClientError::Io)?);
        Ok(ControlClient {
            writer: stream,
            reader,
        })
    }

    /// Sends one request; returns the whole reply if `ok` is true.
    pub fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        let mut line = serde_json::to_string(request).map_err(ClientError::Shape)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(ClientError::Io)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::Closed);
        }
        let reply: Value = serde_json::from_str(&reply).map_err(ClientError::BadReply)?;
        if reply.get("ok") == Some(&Value::Bool(true)) {
            Ok(reply)
        } else {
            let msg = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error message")
                .to_owned();
            Err(ClientError::Refused(msg))
        }
    }

    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        let mut reply = self.call(&Request::Stats)?;
        serde_json::from_value(reply["stats"].take()).map_err(ClientError::Shape)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use clap::Parser;

    use super::*;
    use crate::{config::Args, protocol::PAGE_SIZE, stats::OpClass};

    fn context() -> ControlContext {
        let config = Config::try_from(Args::parse_from([
            "x", "--socket", "/tmp/a", "--socket", "/tmp/b", "--queues", "2",
        ]))
        .unwrap();
        ControlContext {
            store: Arc::new(Store::new(config.store.clone()).unwrap()),
            devices: vec![
                Arc::new(DeviceTelemetry::new(0, "/tmp/a".into(), 2)),
                Arc::new(DeviceTelemetry::new(1, "/tmp/b".into(), 2)),
            ],
            config,
        }
    }

    fn reply(ctx: &ControlContext, line: &str) -> Value {
        ctx.handle_line(line.as_bytes())
    }

    fn error_of(v: &Value) -> &str {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap()
    }

    #[test]
    fn requests_parse() {
        let parse = |s: &str| Request::from_value(&serde_json::from_str(s).unwrap()).unwrap();
        assert_eq!(parse(r#"{"cmd":"stats"}"#), Request::Stats);
        assert_eq!(parse(r#"{"cmd":"get-config"}"#), Request::GetConfig);
        assert_eq!(
            parse(r#"{"cmd":"set-config","mem_limit":"1G"}"#),
            Request::SetConfig {
                mem_limit: Some(json!("1G"))
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"writeback","pages":10}"#),
            Request::Writeback { pages: 10 }
        );
        assert_eq!(
            parse(r#"{"cmd":"drop-pool","device":1,"pool":2}"#),
            Request::DropPool { device: 1, pool: 2 }
        );
    }

    #[test]
    fn stats_reply_shape() {
        let ctx = context();
        ctx.devices[1].latency[0].record(OpClass::Get, Duration::from_micros(3));
        ctx.store.put(GuestId(1), 4, 9, &[1u8; PAGE_SIZE]).unwrap();
        let v = reply(&ctx, r#"{"cmd":"stats"}"#);
        assert_eq!(v["ok"], true);
        let stats: Stats = serde_json::from_value(v["stats"].clone()).unwrap();
        assert_eq!(stats.devices.len(), 2);
        assert_eq!(stats.devices[1].socket, "/tmp/b");
        assert_eq!(stats.devices[1].queues, 2);
        assert!(!stats.devices[1].connected);
        assert_eq!(stats.devices[1].latency.get.count, 1);
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
    }

    #[test]
    fn bad_requests() {
        let ctx = context();
        let e = reply(&ctx, "garbage");
        assert!(error_of(&e).contains("not valid JSON"), "{e}");
        let e = reply(&ctx, "[1,2]");
        assert!(error_of(&e).contains("JSON object"), "{e}");
        let e = reply(&ctx, r#"{"cmd":7}"#);
        assert!(error_of(&e).contains("must be a string"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"drop-pool","device":0,"pool":4294967296}"#);
        assert!(error_of(&e).contains("\"pool\""), "{e}");
        let e = reply(&ctx, r#"{"cmd":"stats","x":1}"#);
        assert!(error_of(&e).contains("unknown field \"x\""), "{e}");
        let e = reply(&ctx, r#"{"cmd":"explode"}"#);
        assert!(error_of(&e).contains("explode"), "{e}");
        let e = reply(&ctx, r#"{"pages":3}"#);
        assert!(error_of(&e).contains("cmd"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"writeback"}"#);
        assert!(error_of(&e).contains("pages"), "{e}");
        let e = reply(&ctx, r#"{"cmd":"writeback","pages":"x"}"#);
        assert!(error_of(&e).contains("\"pages\" must be"), "{e}");
        let e = reply(&ctx, "");
        assert!(error_of(&e).contains("empty"), "{e}");
        let e = ctx.handle_line(b"\xff\xfe");
        assert!(error_of(&e).contains("UTF-8"), "{e}");
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
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(
            ctx.store.get(GuestId(0), 4, 9, &mut page, false).unwrap(),
            crate::store::GetOutcome::Found
        );
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
        let err = client
            .call(&Request::DropPool { device: 9, pool: 0 })
            .unwrap_err();
        assert!(matches!(err, ClientError::Refused(ref m) if m.contains("no device 9")));
        server.stop();
        assert!(!path.exists());
    }
}
