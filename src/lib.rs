//! vhost-user-tmem: a vhost-user backend for a transcendent-memory virtio device.
//!
//! A guest kernel puts, gets and invalidates its swap pages synchronously over a
//! virtqueue; this crate keeps them compressed and deduplicated within a RAM
//! budget, spilling the coldest to a file.
//!
//! Data flows one way: virtqueue → request parse → store → response.
//!
//! - [`protocol`]: the wire format shared with the guest driver.
//! - [`store`]: the page store (no vhost types).
//! - [`config`]: the daemon's command line, validated into one `Config`.
//! - [`device`]: the vhost-user backend (the only module touching virtqueues),
//!   request parsing, and the daemon's run loop.
//! - [`control`]: the control socket server, its messages, and the client.
//! - [`stats`]: per-op latency histograms.
//! - [`size`]: byte sizes as operators write them (`512M`, `4GiB`).
//! - [`frontend`]: an in-process vhost-user frontend (a VMM stand-in) for tests and benches.

pub mod bench;
pub mod config;
pub mod control;
pub mod device;
pub mod frontend;
pub mod protocol;
pub mod size;
pub mod stats;
pub mod store;

/// Renders an error and its `source()` chain on one line, for top-level reporting.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
