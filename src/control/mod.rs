//! The control socket: newline-delimited JSON over a unix socket (mode 0600),
//! one request object per line, one reply object per line.
//!
//! - `message.rs`: the requests and replies, typed, shared by the daemon and
//!   `tmemctl`; see [`Request`] and [`Reply`].
//! - `server.rs`: [`ControlServer`], and the [`ControlContext`] it answers
//!   from. It sees a device only through [`DeviceReport`].
//! - `peer.rs`: who may connect: the daemon's user and root, by the
//!   credentials the kernel took at `connect(2)`.
//! - `clients.rs`: the clients being served, at most [`MAX_CLIENTS`], the
//!   idle ones closed first to make room.
//! - `client.rs`: [`ControlClient`], the other end.

mod client;
mod clients;
mod message;
mod peer;
mod server;

use std::time::Duration;

pub use self::{
    client::{ClientError, ControlClient},
    message::{Answer, Cap, ConfigView, DeviceStats, Reply, Request, RequestError, Stats},
    server::{CommandError, ControlContext, ControlError, ControlServer, DeviceReport},
};

/// Where `tmemctl` looks when not given `--control`.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vhost-user-tmem/control.sock";

/// Longest request line accepted. Real requests are under 100 bytes; the cap
/// only keeps a misbehaving client from growing our buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// Clients served at once. A newcomer finding every place taken gets the
/// place of the client idle longest, or, if all are in the middle of a
/// request, an error reply.
pub const MAX_CLIENTS: usize = 16;

/// A client with no request under way is disconnected after this long
/// (`tmemctl watch` asks every second).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// From the first byte of a request line to its newline. `tmemctl` sends a
/// line in one write; a client slower than this loses its connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// To write a whole reply. A client that does not read its replies loses
/// its connection, and its place, after this long.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
