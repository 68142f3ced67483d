//! Test and benchmark harness: what stands in for a VMM and a test runner.
//! Built only with the `harness` feature, which the daemon and `tmemctl` do
//! not enable; the integration tests and `tmem-bench` do.
//!
//! - [`frontend`]: an in-process vhost-user frontend with hand-built split
//!   virtqueues in shared guest memory.
//! - [`daemon`]: the real daemon binary started in a private directory, with
//!   its sockets waited for.
//! - [`timing`]: timed parallel phases, mismatch counts and latency samples.

pub mod daemon;
pub mod frontend;
pub mod timing;
