//! The daemon's command line, and the one validated [`Config`] it turns into.
//!
//! [`Args`] is what clap parses; it holds strings exactly as the operator typed
//! them. [`Config::try_from`] checks them all at once, so the rest of the daemon
//! only ever sees values that make sense.

mod device;

use std::{collections::HashSet, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use thiserror::Error;

pub use self::device::{DeviceKind, DeviceSpec, DeviceSpecError, MAX_WEIGHT};
use crate::{
    protocol::PAGE_SIZE,
    sandbox::{Credentials, LookupError, SandboxConfig, SandboxMode},
    size::{parse_size, SizeError},
    store::{Compression, DedupDomain, GuestId, Reservation, SpillConfig, StoreConfig},
};

/// Most virtqueues per device. The worker-thread layout is a 64-bit queue
/// mask in vhost-user-backend, so 64 is a hard ceiling anyway.
pub const MAX_QUEUES: u16 = 64;
/// Longest busy-poll we accept: beyond this a worker burns a core for nothing
/// a kick would not have given it faster.
pub const MAX_POLL_US: u64 = 1_000_000;

#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "vhost-user-tmem",
    version,
    about = "vhost-user backend for the tmem virtio device (ID 63): compressed, deduplicated swap for guests"
)]
pub struct Args {
    /// vhost-user socket to listen on; repeat for more devices (one per VM).
    /// Device N is the N-th socket. Options follow the path after commas
    /// (`PATH,max=2G,weight=2`); a comma in the path is written twice.
    #[arg(long = "socket", value_name = "PATH[,OPTION=VALUE]...", required = true)]
    pub sockets: Vec<String>,
    /// Control socket for tmemctl (mode 0600). Without it there is no control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Host RAM the page store may use, e.g. 512M or 4G.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub mem_limit: String,
    /// Where the coldest pages spill once RAM is full: a directory, or a name
    /// that does not exist yet in one. The file made there has no name and
    /// mode 0600, and its pages are encrypted; a symbolic link or an existing
    /// file is refused.
    #[arg(long, value_name = "PATH", requires = "spill_limit")]
    pub spill_file: Option<PathBuf>,
    /// Largest size the spill file may grow to, e.g. 8G.
    #[arg(long, value_name = "SIZE", requires = "spill_file")]
    pub spill_limit: Option<String>,
    /// RAM a background thread keeps free below --mem-limit by writing the
    /// coldest pages to the spill file ahead of need, so puts seldom wait for
    /// file I/O. "auto" is 1/16 of the limit, at most 64M; 0 turns it off.
    #[arg(long, value_name = "SIZE|auto", default_value = "auto")]
    pub writeback_headroom: String,
    /// Page compression: zstd or zstd:LEVEL; lz4; or auto or auto:LEVEL: lz4 on the
    /// way in, and pages that stay cold recompressed in the background with
    /// zstd at LEVEL (default 9) and a dictionary trained per dedup domain.
    #[arg(long, value_name = "ALGO[:LEVEL]", default_value = "zstd:1")]
    pub compression: String,
    /// Virtqueues per device; each is served by its own worker thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Swap size advertised to the guest in config space; 0 lets the driver decide.
    #[arg(long, value_name = "SIZE", default_value = "0")]
    pub capacity: String,
    /// Microseconds a worker busy-polls its queue after the last request before sleeping on the kick eventfd.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u64,
    /// Which pages may share one stored copy.
    #[arg(long, value_enum, default_value_t = DedupArg::Guest)]
    pub dedup: DedupArg,
    /// Confinement once set up: seccomp allow-lists (a forbidden syscall
    /// kills the daemon), Landlock and no_new_privs. "log" only logs a
    /// forbidden syscall (kernel audit log); "off" is for debugging.
    #[arg(long, value_enum, default_value_t = SandboxArg::On)]
    pub sandbox: SandboxArg,
    /// User (name or id) to run as once the sockets are bound.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Group (name or id) to run as once the sockets are bound; the user's
    /// primary group by default.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxArg {
    On,
    Log,
    Off,
}

impl From<SandboxArg> for SandboxMode {
    fn from(arg: SandboxArg) -> Self {
        match arg {
            SandboxArg::On => SandboxMode::On,
            SandboxArg::Log => SandboxMode::Log,
            SandboxArg::Off => SandboxMode::Off,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupArg {
    Off,
    Guest,
    Global,
}

impl DedupArg {
    /// The spelling on the command line, for passing the choice on to a daemon.
    pub fn as_str(self) -> &'static str {
        match self {
            DedupArg::Off => "off",
            DedupArg::Guest => "guest",
            DedupArg::Global => "global",
        }
    }
}

impl From<DedupArg> for DedupDomain {
    fn from(arg: DedupArg) -> Self {
        match arg {
            DedupArg::Off => DedupDomain::Off,
            DedupArg::Guest => DedupDomain::Guest,
            DedupArg::Global => DedupDomain::Global,
        }
    }
}

/// Everything the daemon needs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Device N is `devices[N]` and is `GuestId(N)` in the store.
    pub devices: Vec<DeviceSpec>,
    pub control: Option<PathBuf>,
    pub store: StoreConfig,
    pub queues: u16,
    pub capacity_pages: u64,
    pub poll: Duration,
    pub sandbox: SandboxConfig,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid --{option} value")]
    Size {
        option: &'static str,
        #[source]
        source: SizeError,
    },
    #[error("--queues must be between 1 and {MAX_QUEUES}, got {0}")]
    Queues(u16),
    #[error("--poll-us must be at most {MAX_POLL_US}, got {0}")]
    PollUs(u64),
    #[error(
        "--compression must be zstd, zstd:LEVEL, lz4, auto or auto:LEVEL with LEVEL in {min}..={max}, got {value:?}"
    )]
    Compression { value: String, min: i32, max: i32 },
    #[error("--compression level in {value:?} is not a number")]
    CompressionLevel {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("invalid --socket {value:?}")]
    Socket {
        value: String,
        #[source]
        source: DeviceSpecError,
    },
    #[error("--socket {0}: a blk device has its whole disk's room set apart, so max= does not apply")]
    MaxOnBlk(PathBuf),
    #[error("--socket {0} is given more than once")]
    DuplicateSocket(PathBuf),
    #[error("--capacity {0} is smaller than one page ({PAGE_SIZE} bytes)")]
    CapacityTooSmall(u64),
    #[error("--control {0} is also a vhost-user --socket")]
    ControlIsSocket(PathBuf),
    #[error(
        "blk devices need {need} bytes of spill file set apart for their whole disks, \
         and --spill-limit is {limit}: give --spill-file and a --spill-limit of at least {need}"
    )]
    BlkRoom { need: u64, limit: u64 },
    #[error("--writeback-headroom {headroom} must be below --mem-limit {limit}")]
    HeadroomTooLarge { headroom: u64, limit: u64 },
    #[error("invalid --user or --group")]
    Credentials(#[source] LookupError),
    #[error("--user and --group need the sandbox; they cannot go with --sandbox off")]
    CredentialsWithoutSandbox,
}

/// Cap of the "auto" headroom: past this, the writer runs long enough ahead.
pub const AUTO_HEADROOM_MAX: u64 = 64 << 20;

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let size = |option: &'static str, text: &str| {
            parse_size(text).map_err(|source| ConfigError::Size { option, source })
        };
        if args.queues == 0 || args.queues > MAX_QUEUES {
            return Err(ConfigError::Queues(args.queues));
        }
        if args.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(args.poll_us));
        }
        let devices = args
            .sockets
            .iter()
            .map(|value| {
                value.parse::<DeviceSpec>().map_err(|source| ConfigError::Socket {
                    value: value.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for spec in &devices {
            if !seen.insert(&spec.path) {
                return Err(ConfigError::DuplicateSocket(spec.path.clone()));
            }
            if let (DeviceKind::Blk { .. }, Some(_)) = (spec.kind, spec.max) {
                return Err(ConfigError::MaxOnBlk(spec.path.clone()));
            }
        }
        if let Some(control) = &args.control {
            if seen.contains(control) {
                return Err(ConfigError::ControlIsSocket(control.clone()));
            }
        }
        let mem_limit = size("mem-limit", &args.mem_limit)?;
        let spill = match (args.spill_file, args.spill_limit) {
            (Some(path), Some(limit)) => Some(SpillConfig {
                path,
                limit: size("spill-limit", &limit)?,
            }),
            // clap's `requires` makes a lone half impossible; treat it as no spill.
            _ => None,
        };
        let reserved = reservations(&devices);
        // Saturating: disks too large to add up are as refused as any other
        // that does not fit.
        let need = reserved
            .iter()
            .map(Reservation::spill_bytes)
            .fold(0u64, u64::saturating_add);
        let limit = spill.as_ref().map_or(0, |s| s.limit);
        if !reserved.is_empty() && need > limit {
            return Err(ConfigError::BlkRoom { need, limit });
        }
        let writeback_headroom = match args.writeback_headroom.as_str() {
            _ if spill.is_none() => 0,
            "auto" => (mem_limit / 16).min(AUTO_HEADROOM_MAX),
            text => size("writeback-headroom", text)?,
        };
        if writeback_headroom != 0 && writeback_headroom >= mem_limit {
            return Err(ConfigError::HeadroomTooLarge {
                headroom: writeback_headroom,
                limit: mem_limit,
            });
        }
        let capacity = size("capacity", &args.capacity)?;
        if capacity != 0 && capacity < PAGE_SIZE as u64 {
            return Err(ConfigError::CapacityTooSmall(capacity));
        }
        if args.sandbox == SandboxArg::Off && (args.user.is_some() || args.group.is_some()) {
            return Err(ConfigError::CredentialsWithoutSandbox);
        }
        let credentials = Credentials::resolve(args.user.as_deref(), args.group.as_deref())
            .map_err(ConfigError::Credentials)?;
        let (compression, zstd_level) = parse_compression(&args.compression)?;
        Ok(Config {
            devices,
            control: args.control,
            store: StoreConfig {
                mem_limit,
                spill,
                compression,
                zstd_level,
                dedup: args.dedup.into(),
                writeback_headroom,
                reserved,
                ..StoreConfig::default()
            },
            queues: args.queues,
            capacity_pages: capacity / PAGE_SIZE as u64,
            poll: Duration::from_micros(args.poll_us),
            sandbox: SandboxConfig {
                mode: args.sandbox.into(),
                credentials,
            },
        })
    }
}

/// Room every blk device's guest (device N is `GuestId(N)`) must be sure of:
/// its whole disk. The store checks that the spill file can hold it.
fn reservations(devices: &[DeviceSpec]) -> Vec<Reservation> {
    devices
        .iter()
        .enumerate()
        .filter_map(|(n, spec)| match spec.kind {
            DeviceKind::Blk { size } => Some(Reservation {
                guest: GuestId(n as u32),
                pages: size / PAGE_SIZE as u64,
            }),
            DeviceKind::Tmem => None,
        })
        .collect()
}

/// The zstd level `auto` recompresses at unless told: with a dictionary,
/// the lowest that stores smaller than per-page zstd-1 on the corpora in
/// docs/design.md (levels 3 and 6 did not), and it decodes as fast.
pub const AUTO_LEVEL: i32 = 9;

/// `zstd` (level 1: fast, and swap pages compress well at any level),
/// `zstd:LEVEL`, `lz4`, `auto` or `auto:LEVEL` (the level of recompression).
pub fn parse_compression(text: &str) -> Result<(Compression, i32), ConfigError> {
    let range = zstd::compression_level_range();
    let bad = || ConfigError::Compression {
        value: text.to_owned(),
        min: *range.start(),
        max: *range.end(),
    };
    let level = |level: &str| {
        level
            .parse::<i32>()
            .map_err(|source| ConfigError::CompressionLevel {
                value: text.to_owned(),
                source,
            })
    };
    let (compression, level) = match text.split_once(':') {
        None if text == "zstd" => (Compression::Zstd, 1),
        None if text == "lz4" => (Compression::Lz4, 1),
        None if text == "auto" => (Compression::Auto, AUTO_LEVEL),
        Some(("zstd", l)) => (Compression::Zstd, level(l)?),
        Some(("auto", l)) => (Compression::Auto, level(l)?),
        _ => return Err(bad()),
    };
    if range.contains(&level) {
        Ok((compression, level))
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["vhost-user-tmem", "--socket", "/tmp/a.sock"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::parse_from(argv))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].path, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.devices[0].kind, DeviceKind::Tmem);
        assert_eq!(c.control, None);
        assert_eq!(c.store.mem_limit, 256 << 20);
        assert_eq!(c.store.spill, None);
        assert_eq!(c.store.zstd_level, 1);
        assert_eq!(c.store.dedup, DedupDomain::Guest);
        assert_eq!(c.queues, 1);
        assert_eq!(c.capacity_pages, 0);
        assert_eq!(c.poll, Duration::ZERO);
        assert_eq!(c.store.writeback_headroom, 0, "no spill file, no writer");
    }

    #[test]
    fn writeback_headroom_is_auto_sized_set_or_refused() {
        let spill = ["--spill-file", "/tmp/s", "--spill-limit", "1G"];
        let with = |extra: &[&str]| parse(&[&spill[..], extra].concat());
        assert_eq!(
            with(&["--mem-limit", "256M"]).unwrap().store.writeback_headroom,
            16 << 20
        );
        assert_eq!(
            with(&["--mem-limit", "8G"]).unwrap().store.writeback_headroom,
            AUTO_HEADROOM_MAX
        );
        assert_eq!(
            with(&["--writeback-headroom", "3M"])
                .unwrap()
                .store
                .writeback_headroom,
            3 << 20
        );
        assert_eq!(
            with(&["--writeback-headroom", "0"])
                .unwrap()
                .store
                .writeback_headroom,
            0
        );
        assert_matches!(
            with(&["--mem-limit", "8M", "--writeback-headroom", "8M"]),
            Err(ConfigError::HeadroomTooLarge { headroom, limit }) if headroom == limit
        );
        assert_matches!(
            with(&["--writeback-headroom", "soon"]),
            Err(ConfigError::Size {
                option: "writeback-headroom",
                ..
            })
        );
    }

    #[test]
    fn every_option() {
        let c = parse(&[
            "--socket",
            "/tmp/b.sock",
            "--control",
            "/tmp/ctl",
            "--mem-limit",
            "4G",
            "--spill-file",
            "/tmp/spill",
            "--spill-limit",
            "16G",
            "--compression",
            "zstd:3",
            "--queues",
            "4",
            "--capacity",
            "1G",
            "--poll-us",
            "50",
            "--dedup",
            "global",
            "--writeback-headroom",
            "32M",
        ])
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[1].path, PathBuf::from("/tmp/b.sock"));
        assert_eq!(c.control, Some(PathBuf::from("/tmp/ctl")));
        assert_eq!(c.store.mem_limit, 4 << 30);
        assert_eq!(
            c.store.spill,
            Some(SpillConfig {
                path: "/tmp/spill".into(),
                limit: 16 << 30
            })
        );
        assert_eq!(c.store.zstd_level, 3);
        assert_eq!(c.store.dedup, DedupDomain::Global);
        assert_eq!(c.store.writeback_headroom, 32 << 20);
        assert_eq!(c.queues, 4);
        assert_eq!(c.capacity_pages, (1 << 30) / 4096);
        assert_eq!(c.poll, Duration::from_micros(50));
    }

    #[test]
    fn a_blk_device_needs_its_room_in_the_spill_file() {
        let blk = ["--socket", "/tmp/b.sock,blk=1M"];
        assert_matches!(parse(&blk), Err(ConfigError::BlkRoom { limit: 0, .. }));
        let mut small = blk.to_vec();
        small.extend(["--spill-file", "/tmp", "--spill-limit", "1M"]);
        assert_matches!(parse(&small), Err(ConfigError::BlkRoom { need, limit }) if need > limit);
        let mut enough = blk.to_vec();
        enough.extend(["--spill-file", "/tmp", "--spill-limit", "2M"]);
        let c = parse(&enough).unwrap();
        assert_eq!(c.devices[1].kind, DeviceKind::Blk { size: 1 << 20 });
        assert_eq!(
            c.store.reserved,
            vec![Reservation {
                guest: GuestId(1),
                pages: 256
            }]
        );
    }

    #[test]
    fn socket_is_required() {
        assert!(Args::try_parse_from(["vhost-user-tmem"]).is_err());
    }

    #[test]
    fn spill_file_and_limit_come_together() {
        let only_file = ["x", "--socket", "s", "--spill-file", "/tmp/f"];
        assert!(Args::try_parse_from(only_file).is_err());
        let only_limit = ["x", "--socket", "s", "--spill-limit", "1G"];
        assert!(Args::try_parse_from(only_limit).is_err());
    }

    #[test]
    fn bad_queues() {
        assert_matches!(parse(&["--queues", "0"]), Err(ConfigError::Queues(0)));
        assert_matches!(parse(&["--queues", "65"]), Err(ConfigError::Queues(65)));
    }

    #[test]
    fn bad_poll() {
        assert_matches!(
            parse(&["--poll-us", "1000001"]),
            Err(ConfigError::PollUs(1_000_001))
        );
    }

    #[test]
    fn bad_compression() {
        for value in ["lz4:1", "zstd:99", "zstd3", "auto:99", "lz5", "Auto"] {
            assert_matches!(
                parse(&["--compression", value]),
                Err(ConfigError::Compression { .. }),
                "{value}"
            );
        }
        for value in ["zstd:", "zstd:x", "auto:y"] {
            assert_matches!(
                parse(&["--compression", value]),
                Err(ConfigError::CompressionLevel { .. }),
                "{value}"
            );
        }
        assert_eq!(parse(&["--compression", "zstd"]).unwrap().store.zstd_level, 1);
        assert_eq!(parse(&["--compression", "zstd:-5"]).unwrap().store.zstd_level, -5);
        let chosen = |value: &str| {
            let store = parse(&["--compression", value]).unwrap().store;
            (store.compression, store.zstd_level)
        };
        assert_eq!(chosen("zstd:2"), (Compression::Zstd, 2));
        assert_eq!(chosen("lz4"), (Compression::Lz4, 1));
        assert_eq!(chosen("auto"), (Compression::Auto, AUTO_LEVEL));
        assert_eq!(chosen("auto:7"), (Compression::Auto, 7));
    }

    #[test]
    fn duplicate_socket() {
        assert_matches!(
            parse(&["--socket", "/tmp/a.sock"]),
            Err(ConfigError::DuplicateSocket(_))
        );
    }

    #[test]
    fn socket_options_are_checked() {
        assert_matches!(
            parse(&["--socket", "/tmp/b.sock,colour=red"]),
            Err(ConfigError::Socket {
                source: DeviceSpecError::UnknownKey(_),
                ..
            })
        );
        assert_matches!(
            parse(&["--socket", "/tmp/a.sock,max=1G"]),
            Err(ConfigError::DuplicateSocket(_)),
            "options do not make a path another socket"
        );
    }

    #[test]
    fn caps_and_weights_are_taken() {
        let c = parse(&["--socket", "/tmp/b.sock,max=64M,weight=3"]).unwrap();
        assert_eq!((c.devices[0].max, c.devices[0].weight), (None, 1));
        assert_eq!((c.devices[1].max, c.devices[1].weight), (Some(64 << 20), 3));
    }

    #[test]
    fn control_must_differ_from_sockets() {
        assert_matches!(
            parse(&["--control", "/tmp/a.sock"]),
            Err(ConfigError::ControlIsSocket(_))
        );
    }

    #[test]
    fn capacity_below_a_page() {
        assert_matches!(
            parse(&["--capacity", "100"]),
            Err(ConfigError::CapacityTooSmall(100))
        );
    }

    #[test]
    fn bad_size_names_the_option() {
        assert_matches!(
            parse(&["--mem-limit", "lots"]),
            Err(ConfigError::Size {
                option: "mem-limit",
                source: SizeError::NoNumber(_)
            })
        );
    }

    #[test]
    fn sandbox_is_on_by_default_and_can_log_or_be_off() {
        assert_eq!(parse(&[]).unwrap().sandbox, SandboxConfig::default());
        assert_eq!(SandboxConfig::default().mode, SandboxMode::On);
        for (arg, mode) in [
            ("on", SandboxMode::On),
            ("log", SandboxMode::Log),
            ("off", SandboxMode::Off),
        ] {
            assert_eq!(parse(&["--sandbox", arg]).unwrap().sandbox.mode, mode);
        }
        assert!(Args::try_parse_from(["vhost-user-tmem", "--socket", "/a", "--sandbox", "maybe"]).is_err());
    }

    #[test]
    fn user_and_group_are_resolved_and_need_the_sandbox() {
        let c = parse(&["--user", "root"]).unwrap();
        assert_eq!(
            c.sandbox.credentials,
            Credentials {
                uid: Some(0),
                gid: Some(0)
            }
        );
        let c = parse(&["--group", "0"]).unwrap();
        assert_eq!(
            c.sandbox.credentials,
            Credentials {
                uid: None,
                gid: Some(0)
            }
        );
        assert_matches!(
            parse(&["--user", "no-such-user-tmem"]),
            Err(ConfigError::Credentials(LookupError::NoUser(_)))
        );
        assert_matches!(
            parse(&["--group", "no-such-group-tmem"]),
            Err(ConfigError::Credentials(LookupError::NoGroup(_)))
        );
        assert_eq!(
            parse(&["--sandbox", "off", "--user", "root"]),
            Err(ConfigError::CredentialsWithoutSandbox)
        );
    }
}
