//! The devices: the only module that touches virtqueues. It moves requests
//! between a guest's rings and the page store. Two kinds share everything
//! but their requests: the tmem device, and a virtio-blk disk (`blk`, with
//! its parser [`blk_request`]) for guests and VMMs without a tmem driver.
//!
//! A request's path, by file:
//! - [`backend`]: [`TmemBackend`], the `VhostUserBackend` implementation for
//!   one connection of one device; `handle_event` hands a kicked queue to
//! - `worker`: the queue worker, which takes chains off the ring in batches,
//!   publishes used entries, signals, and busy-polls between batches;
//! - `execute`: one chain served: parsed by [`request`] (checked whole, no
//!   store, no allocation), acted on against the store, answered;
//! - `blk`: the disk's config space, features and block semantics;
//! - `lifecycle`: whether rings that stopped and started again belong to a
//!   paused VM (pages kept) or a rebooted one (pages dropped);
//! - `vring`: the ring type handed to vhost-user-backend, which survives a
//!   kick fd replaced under a pending epoll event.
//!
//! ## Threads and locks
//! Each virtqueue has its own worker thread (vhost-user-backend's epoll loop).
//! A worker holds its vring's lock for one batch of requests, store calls
//! included. The vhost-user message thread takes the same lock to stop,
//! disable or reset a ring, so once it has done that no request of that ring
//! is still in flight: pages dropped on a reset cannot be re-added behind
//! our back.

pub mod backend;
mod blk;
pub mod blk_request;
mod execute;
mod lifecycle;
pub mod request;
mod vring;
mod worker;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use self::backend::TmemBackend;

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = vring::TmemVring<GuestMemory>;

/// Largest ring the driver may ask for. Requests are synchronous and small,
/// so deeper rings only add latency under load.
pub const MAX_QUEUE_SIZE: usize = 1024;
