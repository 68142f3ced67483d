//! What the fuzz targets run and check, kept apart from libFuzzer so that
//! `cargo test` in this package can replay inputs and test the oracles.
//!
//! One module per target (`fuzz_targets/<name>.rs` calls `<module>::run`):
//! - [`device_chain`]: descriptor chains over a guest-memory image, served by
//!   the real backend and queue worker, against a spec oracle and a page model;
//! - [`control_line`]: control request lines, parsed and dispatched against a
//!   store whose pages are known;
//! - [`store_ops`]: store operation sequences with small RAM and spill limits
//!   and faults injected into the spill file, against a `HashMap` model;
//! - [`config_parse`]: the daemon's command line and byte sizes.
//!
//! [`seeds`] builds the seed corpus. [`input`] is the byte format of the structured inputs (and its writer,
//! for seeds); [`pages`] makes page contents from a few bytes of input.
//!
//! Every check failure is a panic with a message saying which invariant broke:
//! that is what libFuzzer reports as a crash.

pub mod config_parse;
pub mod control_line;
pub mod device_chain;
pub mod input;
pub mod pages;
pub mod seeds;
pub mod store_ops;
