//! The control socket: newline-delimited JSON over a unix socket (mode 0600),
//! one request object per line, one reply object per line.
//!
//! - `message.rs`: the requests and replies, typed, shared by the daemon and
//!   `tmemctl`; see [`Request`] and [`Reply`].
//! - `server.rs`: [`ControlServer`], and the [`ControlContext`] it answers
//!   from. It sees a device only through [`DeviceReport`].
//! - `client.rs`: [`ControlClient`], the other end.

mod client;
mod message;
mod server;

pub use self::{
    client::{ClientError, ControlClient},
    message::{Answer, ConfigView, DeviceStats, Reply, Request, RequestError, Stats},
    server::{CommandError, ControlContext, ControlError, ControlServer, DeviceReport},
};

/// Where `tmemctl` looks when not given `--control`.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-user-tmem/control.sock";

/// Longest request line accepted. Real requests are under 100 bytes; the cap
/// only keeps a misbehaving client from growing our buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;
