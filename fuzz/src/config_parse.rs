//! Target `config_parse`: the daemon's command line ([`Args`] through clap,
//! then [`Config::try_from`]) and byte sizes ([`parse_size`], [`ByteSize`]
//! from text and from JSON), each against a reference written here from the
//! documented rules.
//!
//! Invariants:
//! - nothing panics, and clap never exits the process;
//! - a command line is accepted exactly when the reference accepts it, and
//!   the `Config` holds the values the reference computes (queues 1..=64,
//!   poll at most 1 s, distinct sockets, a control socket that is none of
//!   them, sizes as parsed, "auto" headroom at 1/16 of the budget capped at
//!   64M, no headroom without a spill file, headroom below the budget, a
//!   capacity of 0 or at least a page, zstd levels in zstd's range);
//! - every refusal has a message;
//! - `parse_size` accepts exactly the sizes the reference does (decimal
//!   digits, then optionally K/M/G/T with an optional B or iB, any case,
//!   binary units, surrounding blanks ignored, no overflow), with its value;
//! - a `ByteSize` encodes to JSON and decodes back to itself.
//!
//! Input: command-line arguments separated by NUL bytes (any bytes, not only
//! UTF-8); the whole input is also tried as a size and as JSON.

use std::{ffi::OsString, os::unix::ffi::OsStringExt, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;
use serde_json::Value;
use vhost_user_tmem::{
    config::{
        Args, Config, DeviceKind, DeviceSpec, SandboxArg, AUTO_HEADROOM_MAX, AUTO_LEVEL, MAX_POLL_US,
        MAX_QUEUES,
    },
    error_chain,
    sandbox::Credentials,
    size::{parse_size, ByteSize, SizeError},
    store::{Compression, GuestId, Reservation, PAGE_SIZE},
};

const MAX_ARGS: usize = 32;

/// The size rules, restated: digits, blanks, a unit; checked in 128 bits.
pub fn reference_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return Err(SizeError::NoNumber(text.to_owned()));
    }
    let significant = t[..digits].trim_start_matches('0');
    let unit = t[digits..].trim_start().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if significant.len() > 20 => return Err(SizeError::Overflow(text.to_owned())),
        _ => {
            return Err(SizeError::UnknownUnit {
                input: text.to_owned(),
                unit: t[digits..].to_owned(),
            })
        }
    };
    // 20 digits fit in 67 bits; shifted by 40 they still fit in 128.
    let overflow = || SizeError::Overflow(text.to_owned());
    if significant.len() > 20 {
        return Err(overflow());
    }
    let value: u128 = if significant.is_empty() {
        0
    } else {
        significant.parse().map_err(|_| overflow())?
    };
    u64::try_from(value << shift).map_err(|_| overflow())
}

fn check_size(text: &str) {
    let got = parse_size(text);
    let want = reference_size(text);
    match (&got, &want) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parse_size({text:?})"),
        // Digits that overflow before an unknown unit: either error is right.
        (Err(SizeError::Overflow(_)), Err(SizeError::UnknownUnit { .. })) => {}
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "parse_size({text:?}) = {a:?}, the rules say {b:?}"
        ),
        _ => panic!("parse_size({text:?}) = {got:?}, the rules say {want:?}"),
    }
    match ByteSize::from_str(text) {
        Ok(size) => {
            assert_eq!(
                Ok(size.bytes()),
                want.as_ref().map(|&b| b).map_err(|_| ()),
                "ByteSize({text:?})"
            );
            round_trip(&size);
        }
        Err(e) => {
            assert!(want.is_err(), "ByteSize({text:?}) refused: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
}

fn round_trip(size: &ByteSize) {
    let json = serde_json::to_string(size).expect("a size encodes");
    let back: ByteSize =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not decode: {e}"));
    assert_eq!(&back, size, "{json}");
}

/// A size in a JSON request: a non-negative integer, or a size string.
fn check_json_size(data: &[u8]) {
    let direct = serde_json::from_slice::<ByteSize>(data);
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        assert!(direct.is_err(), "a size from bytes that are not JSON");
        return;
    };
    let want = match &value {
        Value::Number(n) => n.as_u64().ok_or(()),
        Value::String(s) => reference_size(s).map_err(|_| ()),
        _ => Err(()),
    };
    let via_value = serde_json::from_value::<ByteSize>(value.clone());
    assert_eq!(
        direct.as_ref().map(ByteSize::bytes).map_err(|_| ()),
        want,
        "ByteSize from {value}"
    );
    assert_eq!(via_value.as_ref().map(ByteSize::bytes).map_err(|_| ()), want);
    if let Ok(size) = direct {
        round_trip(&size);
    }
}

/// What the reference makes of parsed arguments; `None`: refused.
struct Expected {
    devices: Vec<DeviceSpec>,
    compression: Compression,
    mem_limit: u64,
    spill_limit: Option<u64>,
    headroom: u64,
    capacity_pages: u64,
    zstd_level: i32,
}

/// Device options that go together: a disk's room is set apart whole, so
/// it takes no max.
fn supported(spec: &DeviceSpec) -> bool {
    !matches!(spec.kind, DeviceKind::Blk { .. }) || spec.max.is_none()
}

/// Spill file bytes the blk devices set apart: each disk's blocks and a few
/// spare slots, never wrapping.
fn blk_room(devices: &[DeviceSpec]) -> u128 {
    devices
        .iter()
        .enumerate()
        .filter_map(|(n, spec)| match spec.kind {
            DeviceKind::Blk { size } => Some(u128::from(
                Reservation {
                    guest: GuestId(n as u32),
                    pages: size / PAGE_SIZE as u64,
                }
                .spill_bytes(),
            )),
            DeviceKind::Tmem => None,
        })
        .sum()
}

fn expected(args: &Args) -> Option<Expected> {
    let size = |t: &str| reference_size(t).ok();
    if !(1..=MAX_QUEUES).contains(&args.queues) || args.poll_us > MAX_POLL_US {
        return None;
    }
    // The option syntax after a path has its own tests beside its parser;
    // here it only must not panic, and the paths must be distinct.
    let devices: Vec<DeviceSpec> = args
        .sockets
        .iter()
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    let paths: Vec<&PathBuf> = devices.iter().map(|d| &d.path).collect();
    for (i, p) in paths.iter().enumerate() {
        if paths[..i].contains(p) {
            return None;
        }
    }
    if args.control.as_ref().is_some_and(|c| paths.contains(&c)) {
        return None;
    }
    if !devices.iter().all(supported) {
        return None;
    }
    let mem_limit = size(&args.mem_limit)?;
    let spill_limit = match (&args.spill_file, &args.spill_limit) {
        (Some(_), Some(limit)) => Some(size(limit)?),
        _ => None,
    };
    let room = blk_room(&devices);
    if room > 0 && room > u128::from(spill_limit.unwrap_or(0)) {
        return None;
    }
    let headroom = match (spill_limit, args.writeback_headroom.as_str()) {
        (None, _) => 0,
        (Some(_), "auto") => (mem_limit / 16).min(AUTO_HEADROOM_MAX),
        (Some(_), text) => size(text)?,
    };
    if headroom != 0 && headroom >= mem_limit {
        return None;
    }
    let capacity = size(&args.capacity)?;
    if capacity != 0 && capacity < PAGE_SIZE as u64 {
        return None;
    }
    if args.user.is_some() || args.group.is_some() {
        // Names are looked up in the host's user database, so the
        // reference takes the lookup as given and checks only the rule.
        if args.sandbox == SandboxArg::Off {
            return None;
        }
        Credentials::resolve(args.user.as_deref(), args.group.as_deref()).ok()?;
    }
    let (compression, zstd_level) = match args.compression.as_str() {
        "zstd" => (Compression::Zstd, 1),
        "lz4" => (Compression::Lz4, 1),
        "auto" => (Compression::Auto, AUTO_LEVEL),
        text => {
            let (name, level) = text.split_once(':')?;
            let compression = match name {
                "zstd" => Compression::Zstd,
                "auto" => Compression::Auto,
                _ => return None,
            };
            (compression, level.parse().ok()?)
        }
    };
    if !zstd::compression_level_range().contains(&zstd_level) {
        return None;
    }
    Some(Expected {
        devices,
        compression,
        mem_limit,
        spill_limit,
        headroom,
        capacity_pages: capacity / PAGE_SIZE as u64,
        zstd_level,
    })
}

fn check_config(args: Args) {
    let want = expected(&args);
    let got = Config::try_from(args.clone());
    let (c, w) = match (got, want) {
        (Err(e), None) => {
            assert!(
                !error_chain(&e).is_empty(),
                "{args:?}: a refusal without a message"
            );
            return;
        }
        (Err(e), Some(_)) => panic!("{args:?} refused: {}", error_chain(&e)),
        (Ok(c), None) => panic!("{args:?} accepted as {c:?}, the rules refuse it"),
        (Ok(c), Some(w)) => (c, w),
    };
    let what = format!("{args:?} -> {c:?}");
    assert_eq!(c.devices, w.devices, "{what}");
    assert_eq!(c.control, args.control, "{what}");
    assert_eq!(c.queues, args.queues, "{what}");
    assert_eq!(c.poll, Duration::from_micros(args.poll_us), "{what}");
    assert_eq!(c.store.mem_limit, w.mem_limit, "{what}");
    assert_eq!(c.store.spill.as_ref().map(|s| s.limit), w.spill_limit, "{what}");
    assert_eq!(
        c.store.spill.as_ref().map(|s| &s.path),
        args.spill_file.as_ref().filter(|_| w.spill_limit.is_some()),
        "{what}"
    );
    assert_eq!(c.store.writeback_headroom, w.headroom, "{what}");
    assert_eq!(c.capacity_pages, w.capacity_pages, "{what}");
    assert_eq!(c.store.zstd_level, w.zstd_level, "{what}");
    assert_eq!(c.store.compression, w.compression, "{what}");
    assert_eq!(c.store.dedup, args.dedup.into(), "{what}");
}

/// Runs one input; panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let args: Vec<OsString> = data
        .split(|&b| b == 0)
        .take(MAX_ARGS)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    for a in &args {
        if let Some(text) = a.to_str() {
            check_size(text);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_size(text);
    }
    check_json_size(data);
    let argv = std::iter::once(OsString::from("vhost-user-tmem")).chain(args);
    match Args::try_parse_from(argv) {
        Ok(args) => check_config(args),
        Err(e) => {
            // Rendering the message (usage, suggestions) must not panic either.
            let _ = e.render().to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_agrees_on_the_unit_tests_cases() {
        for t in [
            "4096",
            "0",
            " 7 ",
            "512K",
            "512KiB",
            "3 M",
            "4gb",
            "1TiB",
            "",
            "M",
            "-1",
            "5X",
            "1.5G",
            "4iB",
            "1P",
            "16777216T",
            "16777215T",
            "18446744073709551615",
            "18446744073709551616",
            "000000000000000000000000001T",
            "99999999999999999999999X",
        ] {
            check_size(t);
        }
    }

    #[test]
    fn command_lines() {
        for line in [
            "--socket\0/a",
            "--socket\0/a\0--socket\0/a",
            "--socket\0/a,,b,max=1G\0--socket\0/c,blk=8M,weight=2",
            "--socket\0/a\0--control\0/a",
            "--socket\0/a\0--spill-file\0/s\0--spill-limit\x008G\0--mem-limit\x001G\0--writeback-headroom\0auto",
            "--socket\0/a\0--spill-file\0/s\0--spill-limit\x008G\0--mem-limit\x001M\0--writeback-headroom\x001M",
            "--socket\0/a\0--compression\0zstd:-5\0--queues\x0064\0--poll-us\x001000000",
            "--socket\0/a\0--compression\0zstd:+3\0--capacity\x004095",
            "--socket\0/a\0--compression\0auto:9",
            "--socket\0/a\0--compression\0lz4:1",
            "--socket\0/a\0--help",
        ] {
            run(line.as_bytes());
        }
        check_json_size(b"\"1G\"");
        check_json_size(b"-1");
        check_json_size(b"1e3");
    }
}
