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
//! - [`device`]: the vhost-user backend, the only module touching virtqueues:
//!   the backend, the queue worker, request parsing and execution, and
//!   reset/reboot detection; for the tmem device and for a virtio-blk disk
//!   on the same store.
//! - [`telemetry`]: what a device reports (identity, latency, error rate
//!   limit), written by the device and read by the control socket.
//! - [`control`]: the control socket server, its typed messages, and the client.
//! - [`daemon`]: the run loop: one store, one listener per device, the control
//!   socket, the background writer, and shutdown.
//! - [`sandbox`]: the daemon's confinement once set up: seccomp allow-lists
//!   per thread role, Landlock, no_new_privs, `--user`/`--group`.
//! - [`stats`]: per-op latency histograms.
//! - [`size`]: byte sizes as operators write them (`512M`, `4GiB`).
//!
//! With the `harness` feature (tests and `tmem-bench`; never the daemon):
//! - `harness`: an in-process vhost-user frontend (a VMM stand-in), the daemon
//!   launcher, and timed phases.
//! - `bench`: the `tmem-bench` benchmarks.

#[cfg(feature = "harness")]
pub mod bench;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
#[cfg(feature = "harness")]
pub mod harness;
pub mod protocol;
pub mod sandbox;
pub mod size;
pub mod stats;
pub mod store;
pub mod telemetry;

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
