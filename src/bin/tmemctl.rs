//! `tmemctl`: inspect and steer a running `vhost-user-tmem` through its control
//! socket.
//!
//! `stats [--json]`, `watch`, `config`, `set mem-limit SIZE`,
//! `set max DEVICE SIZE|none`, `set weight DEVICE N`, `writeback N`,
//! `drop-pool DEVICE POOL`, `metrics` (Prometheus text exposition).

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::Value;
use vhost_user_tmem::{
    control::{Cap, ClientError, ConfigView, ControlClient, Stats, DEFAULT_CONTROL_PATH},
    error_chain,
    size::ByteSize,
    stats::OpLatency,
    store::{Counters, GuestBudget},
};

#[derive(Parser, Debug)]
#[command(
    name = "tmemctl",
    version,
    about = "Inspect and steer a running vhost-user-tmem daemon"
)]
struct Cli {
    /// The daemon's control socket (its --control).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Store counters, per device and per pool, and request latency.
    Stats {
        /// Print the daemon's stats object as one line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// The stats view, refreshed until interrupted.
    Watch {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// The daemon's configuration.
    Config,
    /// Change a setting at run time.
    Set {
        #[command(subcommand)]
        what: SetCmd,
    },
    /// Write up to N of the coldest RAM pages to the spill file.
    Writeback { pages: u64 },
    /// Drop every page of one pool of one device.
    DropPool { device: u32, pool: u32 },
    /// Counters in the Prometheus text exposition format.
    Metrics,
}

#[derive(Subcommand, Debug)]
enum SetCmd {
    /// RAM budget of the store, e.g. 512M or 4G.
    MemLimit { size: ByteSize },
    /// Cap on one device's RAM plus spill, e.g. 1G, or "none". Lowering it
    /// below what the device holds drops nothing: its puts are refused
    /// until it is under.
    Max { device: u32, size: Cap },
    /// One device's weight (1 to 10000) in the sharing of RAM.
    Weight { device: u32, weight: u32 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tmemctl: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), ClientError> {
    let mut client = ControlClient::connect(&cli.control)?;
    let mut out = io::stdout().lock();
    let print =
        |out: &mut io::StdoutLock, text: &str| out.write_all(text.as_bytes()).map_err(ClientError::Io);
    match cli.cmd {
        Cmd::Stats { json: true } => {
            let stats = client.stats()?;
            // Sorted keys, as the daemon sends them.
            let json = serde_json::to_value(&stats).map_err(ClientError::Encode)?;
            print(&mut out, &format!("{json}\n"))
        }
        Cmd::Stats { json: false } => {
            let stats = client.stats()?;
            print(&mut out, &render_stats(&stats))
        }
        Cmd::Watch { interval } => {
            let pause = Duration::try_from_secs_f64(interval.max(0.1)).unwrap_or(Duration::from_secs(1));
            loop {
                let stats = client.stats()?;
                // Clear the screen and home the cursor, then draw.
                print(&mut out, &format!("\x1b[2J\x1b[H{}", render_stats(&stats)))?;
                out.flush().map_err(ClientError::Io)?;
                std::thread::sleep(pause);
            }
        }
        Cmd::Config => {
            let config = client.config()?;
            print(&mut out, &render_config(&config))
        }
        Cmd::Set {
            what: SetCmd::MemLimit { size },
        } => {
            let config = client.set_mem_limit(size)?;
            print(
                &mut out,
                &format!("mem-limit set to {}\n", bytes_h(config.mem_limit)),
            )
        }
        Cmd::Set {
            what: SetCmd::Max { device, size },
        } => {
            let budget = client.set_device(device, Some(size), None)?;
            print(&mut out, &format!("device {device}: {}\n", budget_line(&budget)))
        }
        Cmd::Set {
            what: SetCmd::Weight { device, weight },
        } => {
            let budget = client.set_device(device, None, Some(weight))?;
            print(&mut out, &format!("device {device}: {}\n", budget_line(&budget)))
        }
        Cmd::Writeback { pages } => {
            let written = client.writeback(pages)?;
            print(&mut out, &format!("wrote back {written} pages\n"))
        }
        Cmd::DropPool { device, pool } => {
            let dropped = client.drop_pool(device, pool)?;
            print(
                &mut out,
                &format!("dropped {dropped} pages of pool {pool} on device {device}\n"),
            )
        }
        Cmd::Metrics => {
            let stats = client.stats()?;
            print(&mut out, &render_metrics(&stats))
        }
    }
}

/// 1536 -> "1.5 KiB".
fn bytes_h(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn ratio(orig: u64, compr: u64) -> String {
    if compr == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}x", orig as f64 / compr as f64)
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

fn latency(l: &OpLatency) -> String {
    if l.count == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}/{:.1}", l.p50_us, l.p99_us)
    }
}

/// "max 1.0 GiB, weight 2, RAM 3.0 MiB (fair share 128.0 MiB), spill 0 B".
fn budget_line(b: &GuestBudget) -> String {
    format!(
        "max {}, weight {}, RAM {} (fair share {}), spill {}",
        b.max_bytes.map_or_else(|| "none".to_owned(), bytes_h),
        b.weight,
        bytes_h(b.ram_bytes),
        bytes_h(b.fair_share_bytes),
        bytes_h(b.spill_bytes),
    )
}

fn render_stats(stats: &Stats) -> String {
    let t = &stats.store.total;
    let limit = stats.store.mem_limit_bytes;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "store: {} pages, RAM {} of {} ({}), spill file {} ({} pages)",
        t.stored_pages,
        bytes_h(t.mem_used_bytes),
        bytes_h(limit),
        percent(t.mem_used_bytes, limit),
        bytes_h(t.spill_file_bytes),
        t.spilled_pages,
    );
    let _ = writeln!(
        s,
        "  data {} -> {} compressed (ratio {}), same-filled {} ({}), unique {}, dedup hits {}",
        bytes_h(t.orig_data_bytes),
        bytes_h(t.compr_data_bytes),
        ratio(t.orig_data_bytes, t.compr_data_bytes),
        t.same_filled_pages,
        percent(t.same_filled_pages, t.stored_pages),
        t.unique_pages,
        t.dedup_hits,
    );
    let _ = writeln!(
        s,
        "  stores {} ok / {} failed, loads {} / {} failed, invalidates {}, writebacks {}, spill reads {} writes {} ({} in the background, {} paid by over-share puts)",
        t.succ_stores,
        t.failed_stores,
        t.loads,
        t.failed_loads,
        t.invalidates,
        t.writebacks,
        t.spill_reads,
        t.spill_writes,
        stats.store.background_writebacks,
        stats.store.throttled_writebacks,
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<4} {:<4} {:<5} {:>6} {:>16} {:>16} {:>16}  SOCKET",
        "DEV", "KIND", "CONN", "QUEUES", "PUT p50/p99 us", "GET p50/p99 us", "INV p50/p99 us"
    );
    for d in &stats.devices {
        let _ = writeln!(
            s,
            "{:<4} {:<4} {:<5} {:>6} {:>16} {:>16} {:>16}  {}",
            d.id,
            d.kind,
            if d.connected { "yes" } else { "no" },
            d.queues,
            latency(&d.latency.put),
            latency(&d.latency.get),
            latency(&d.latency.invalidate),
            d.socket,
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<4} {:>6} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8}",
        "DEV", "WEIGHT", "RAM", "FAIR SHARE", "SPILL", "MAX", "CAPPED", "YIELDED"
    );
    for (dev, guest) in &stats.store.guests {
        let b = &guest.budget;
        let _ = writeln!(
            s,
            "{:<4} {:>6} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8}",
            dev,
            b.weight,
            bytes_h(b.ram_bytes),
            bytes_h(b.fair_share_bytes),
            bytes_h(b.spill_bytes),
            b.max_bytes.map_or_else(|| "none".to_owned(), bytes_h),
            b.max_rejects,
            b.share_rejects,
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<4} {:>10} {:>9} {:>7} {:>11} {:>11} {:>7} {:>8} {:>9} {:>9}",
        "DEV", "POOL", "PAGES", "SAME", "ORIG", "COMPR", "RATIO", "SPILLED", "STORES", "LOADS"
    );
    for (dev, guest) in &stats.store.guests {
        let rows = guest
            .pools
            .iter()
            .map(|(pool, c)| (pool.to_string(), c))
            .chain(std::iter::once(("all".to_owned(), &guest.total)));
        for (pool, c) in rows {
            let _ = writeln!(
                s,
                "{:<4} {:>10} {:>9} {:>7} {:>11} {:>11} {:>7} {:>8} {:>9} {:>9}",
                dev,
                pool,
                c.stored_pages,
                percent(c.same_filled_pages, c.stored_pages),
                bytes_h(c.orig_data_bytes),
                bytes_h(c.compr_data_bytes),
                ratio(c.orig_data_bytes, c.compr_data_bytes),
                c.spilled_pages,
                c.succ_stores,
                c.loads,
            );
        }
    }
    s
}

fn render_config(c: &ConfigView) -> String {
    let unset = || "-".to_owned();
    // The name the daemon gives it, as --dedup takes it.
    let dedup = match serde_json::to_value(c.dedup) {
        Ok(Value::String(name)) => name,
        _ => format!("{:?}", c.dedup),
    };
    let rows = [
        ("capacity_pages", c.capacity_pages.to_string()),
        ("dedup", dedup),
        ("mem_limit", bytes_h(c.mem_limit)),
        ("poll_us", c.poll_us.to_string()),
        ("queues", c.queues.to_string()),
        ("sockets", c.sockets.join(", ")),
        ("spill_file", c.spill_file.clone().unwrap_or_else(unset)),
        ("spill_limit", c.spill_limit.map_or_else(unset, bytes_h)),
        ("zstd_level", c.zstd_level.to_string()),
    ];
    let mut s = String::new();
    for (key, shown) in rows {
        let _ = writeln!(s, "{key:<15} {shown}");
    }
    s
}

/// Counters that only ever grow (Prometheus `counter`, `_total` suffix); the
/// other fields are levels (`gauge`).
const MONOTONIC: [&str; 9] = [
    "succ_stores",
    "failed_stores",
    "loads",
    "failed_loads",
    "invalidates",
    "dedup_hits",
    "spill_reads",
    "spill_writes",
    "writebacks",
];

fn help(name: &str) -> &'static str {
    match name {
        "succ_stores" => "Pages stored (PUT and PUT_FILL answered OK).",
        "failed_stores" => "Stores that were rejected or failed.",
        "loads" => "GET requests served.",
        "failed_loads" => "GET requests that found no page or failed.",
        "invalidates" => "Pages invalidated.",
        "stored_pages" => "Pages currently held.",
        "same_filled_pages" => "Held pages made of one repeated 8-byte value (metadata only).",
        "dedup_hits" => "Stores that found an identical page already held.",
        "unique_pages" => "Distinct page contents held.",
        "orig_data_bytes" => "Uncompressed size of the pages held.",
        "compr_data_bytes" => "Compressed size of the pages held.",
        "mem_used_bytes" => "Host RAM used by the store.",
        "spilled_pages" => "Pages held in the spill file.",
        "spill_file_bytes" => "Size of the spill file.",
        "spill_reads" => "Pages read back from the spill file.",
        "spill_writes" => "Pages written to the spill file.",
        "writebacks" => "Pages moved from RAM to the spill file.",
        _ => "Store counter.",
    }
}

/// The counter fields of a `Counters`, by name, in a stable order.
fn fields(c: &Counters) -> Vec<(String, u64)> {
    match serde_json::to_value(c) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_metrics(stats: &Stats) -> String {
    let mut s = String::new();
    let total = fields(&stats.store.total);
    for (name, value) in &total {
        let monotonic = MONOTONIC.contains(&name.as_str());
        let kind = if monotonic { "counter" } else { "gauge" };
        let suffix = if monotonic { "_total" } else { "" };

        let metric = format!("tmem_store_{name}{suffix}");
        let _ = writeln!(s, "# HELP {metric} {} All devices.", help(name));
        let _ = writeln!(s, "# TYPE {metric} {kind}");
        let _ = writeln!(s, "{metric} {value}");

        let metric = format!("tmem_{name}{suffix}");
        let _ = writeln!(s, "# HELP {metric} {} Per device and pool.", help(name));
        let _ = writeln!(s, "# TYPE {metric} {kind}");
        for (dev, guest) in &stats.store.guests {
            for (pool, counters) in &guest.pools {
                if let Some((_, v)) = fields(counters).into_iter().find(|(k, _)| k == name) {
                    let _ = writeln!(s, "{metric}{{device=\"{dev}\",pool=\"{pool}\"}} {v}");
                }
            }
        }
    }
    let _ = writeln!(s, "# HELP tmem_mem_limit_bytes RAM budget of the store.");
    let _ = writeln!(s, "# TYPE tmem_mem_limit_bytes gauge");
    let _ = writeln!(s, "tmem_mem_limit_bytes {}", stats.store.mem_limit_bytes);
    let metric = "tmem_store_background_writebacks_total";
    let _ = writeln!(
        s,
        "# HELP {metric} Objects the background writer moved to the spill file ahead of need."
    );
    let _ = writeln!(s, "# TYPE {metric} counter");
    let _ = writeln!(s, "{metric} {}", stats.store.background_writebacks);
    let metric = "tmem_store_throttled_writebacks_total";
    let _ = writeln!(
        s,
        "# HELP {metric} Objects written back by puts of guests over their fair share while the background writer was behind."
    );
    let _ = writeln!(s, "# TYPE {metric} counter");
    let _ = writeln!(s, "{metric} {}", stats.store.throttled_writebacks);
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&GuestBudget) -> Option<u64>,
    );
    let budgets: [Family; 7] = [
        (
            "tmem_device_ram_bytes",
            "gauge",
            "RAM the device's pages and metadata hold.",
            |b| Some(b.ram_bytes),
        ),
        (
            "tmem_device_spill_bytes",
            "gauge",
            "Spill file space the device's pages hold.",
            |b| Some(b.spill_bytes),
        ),
        (
            "tmem_device_fair_share_bytes",
            "gauge",
            "The device's fair share of RAM.",
            |b| Some(b.fair_share_bytes),
        ),
        (
            "tmem_device_max_bytes",
            "gauge",
            "Cap on the device's RAM plus spill (absent: none).",
            |b| b.max_bytes,
        ),
        (
            "tmem_device_weight",
            "gauge",
            "The device's weight in the sharing of RAM.",
            |b| Some(u64::from(b.weight)),
        ),
        (
            "tmem_device_max_rejects_total",
            "counter",
            "Puts refused at the device's cap.",
            |b| Some(b.max_rejects),
        ),
        (
            "tmem_device_share_rejects_total",
            "counter",
            "Puts refused while over its share with both tiers full.",
            |b| Some(b.share_rejects),
        ),
    ];
    for (metric, kind, what, value) in budgets {
        let _ = writeln!(s, "# HELP {metric} {what}");
        let _ = writeln!(s, "# TYPE {metric} {kind}");
        for (dev, guest) in &stats.store.guests {
            if let Some(v) = value(&guest.budget) {
                let _ = writeln!(s, "{metric}{{device=\"{dev}\"}} {v}");
            }
        }
    }
    let _ = writeln!(
        s,
        "# HELP tmem_device_connected Whether a VMM is attached to the device."
    );
    let _ = writeln!(s, "# TYPE tmem_device_connected gauge");
    for d in &stats.devices {
        let _ = writeln!(
            s,
            "tmem_device_connected{{device=\"{}\",socket=\"{}\"}} {}",
            d.id,
            escape_label(&d.socket),
            u8::from(d.connected)
        );
    }
    let metric = "tmem_request_latency_microseconds";
    let _ = writeln!(s, "# HELP {metric} Time to serve one request, by op.");
    let _ = writeln!(s, "# TYPE {metric} summary");
    for d in &stats.devices {
        // A disk's writes, reads and discards are its puts, gets and invalidates.
        let ops = if d.kind == "blk" {
            ["write", "read", "discard"]
        } else {
            ["put", "get", "invalidate"]
        };
        for (op, l) in ops
            .into_iter()
            .zip([&d.latency.put, &d.latency.get, &d.latency.invalidate])
        {
            let labels = format!("device=\"{}\",kind=\"{}\",op=\"{op}\"", d.id, d.kind);
            let _ = writeln!(s, "{metric}{{{labels},quantile=\"0.5\"}} {}", l.p50_us);
            let _ = writeln!(s, "{metric}{{{labels},quantile=\"0.99\"}} {}", l.p99_us);
            let _ = writeln!(s, "{metric}_count{{{labels}}} {}", l.count);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vhost_user_tmem::{
        control::DeviceStats,
        stats::Latency,
        store::{DedupDomain, GuestStats, StoreStats},
    };

    use super::*;

    fn sample() -> Stats {
        let pool = Counters {
            succ_stores: 10,
            stored_pages: 8,
            same_filled_pages: 2,
            orig_data_bytes: 8 * 4096,
            compr_data_bytes: 8192,
            ..Counters::default()
        };
        let mut pools = BTreeMap::new();
        pools.insert(4, pool.clone());
        let mut guests = BTreeMap::new();
        guests.insert(
            0,
            GuestStats {
                total: pool.clone(),
                pools,
                budget: GuestBudget {
                    ram_bytes: 3 << 20,
                    max_bytes: Some(1 << 30),
                    weight: 2,
                    fair_share_bytes: 512 << 20,
                    max_rejects: 7,
                    ..GuestBudget::default()
                },
            },
        );
        Stats {
            store: StoreStats {
                total: Counters {
                    mem_used_bytes: 3 << 20,
                    ..pool
                },
                mem_limit_bytes: 512 << 20,
                background_writebacks: 0,
                throttled_writebacks: 0,
                codecs: Default::default(),
                guests,
            },
            devices: vec![DeviceStats {
                kind: "tmem".into(),
                id: 0,
                socket: "/run/vm\"0\".sock".into(),
                connected: true,
                queues: 2,
                latency: Latency {
                    put: OpLatency {
                        p50_us: 3.5,
                        p99_us: 12.0,
                        count: 10,
                    },
                    ..Latency::default()
                },
            }],
        }
    }

    #[test]
    fn units() {
        assert_eq!(bytes_h(0), "0 B");
        assert_eq!(bytes_h(1023), "1023 B");
        assert_eq!(bytes_h(1536), "1.5 KiB");
        assert_eq!(bytes_h(512 << 20), "512.0 MiB");
        assert_eq!(bytes_h(5 << 30), "5.0 GiB");
        assert_eq!(ratio(8, 2), "4.00x");
        assert_eq!(ratio(8, 0), "-");
        assert_eq!(percent(1, 4), "25.0%");
        assert_eq!(percent(1, 0), "-");
    }

    #[test]
    fn stats_table() {
        let text = render_stats(&sample());
        assert!(text.contains("RAM 3.0 MiB of 512.0 MiB (0.6%)"), "{text}");
        assert!(text.contains("ratio 4.00x"), "{text}");
        assert!(text.contains("3.5/12.0"), "{text}");
        assert!(text.contains("25.0%"), "{text}");
        assert!(text.contains(" all "), "{text}");
        assert!(
            text.contains("0         2     3.0 MiB   512.0 MiB         0 B     1.0 GiB        7        0"),
            "{text}"
        );
    }

    #[test]
    fn config_table() {
        let mut config = ConfigView {
            mem_limit: 512 << 20,
            spill_file: None,
            spill_limit: None,
            zstd_level: 1,
            dedup: DedupDomain::Global,
            queues: 2,
            capacity_pages: 0,
            poll_us: 50,
            sockets: vec!["/run/a.sock".into(), "/run/b.sock".into()],
        };
        let text = render_config(&config);
        assert!(text.contains("dedup           global\n"), "{text}");
        assert!(text.contains("mem_limit       512.0 MiB\n"), "{text}");
        assert!(
            text.contains("sockets         /run/a.sock, /run/b.sock\n"),
            "{text}"
        );
        assert!(text.contains("spill_limit     -\n"), "{text}");
        config.spill_limit = Some(1 << 30);
        assert!(render_config(&config).contains("spill_limit     1.0 GiB\n"));
    }

    #[test]
    fn metrics_exposition() {
        let text = render_metrics(&sample());
        assert!(text.contains("# TYPE tmem_succ_stores_total counter"), "{text}");
        assert!(
            text.contains("tmem_succ_stores_total{device=\"0\",pool=\"4\"} 10"),
            "{text}"
        );
        assert!(text.contains("tmem_store_stored_pages 8"), "{text}");
        assert!(text.contains("# TYPE tmem_stored_pages gauge"), "{text}");
        assert!(text.contains("tmem_mem_limit_bytes 536870912"), "{text}");
        assert!(
            text.contains("tmem_store_background_writebacks_total 0"),
            "{text}"
        );
        assert!(text.contains(r#"socket="/run/vm\"0\".sock"} 1"#), "{text}");
        assert!(
            text.contains("tmem_device_max_bytes{device=\"0\"} 1073741824\n"),
            "{text}"
        );
        assert!(
            text.contains("tmem_device_max_rejects_total{device=\"0\"} 7\n"),
            "{text}"
        );
        assert!(text.contains(
            "tmem_request_latency_microseconds{device=\"0\",kind=\"tmem\",op=\"put\",quantile=\"0.99\"} 12"
        ));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name.strip_suffix("_count").unwrap_or(name);
                assert!(declared.contains(name) || declared.contains(family), "{line}");
            }
        }
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::parse_from(["tmemctl", "--control", "/tmp/c", "stats", "--json"]);
        assert_eq!(cli.control, PathBuf::from("/tmp/c"));
        assert!(matches!(cli.cmd, Cmd::Stats { json: true }));
        let cli = Cli::parse_from(["tmemctl", "set", "mem-limit", "1G"]);
        assert!(
            matches!(cli.cmd, Cmd::Set { what: SetCmd::MemLimit { ref size } } if size.bytes() == 1 << 30)
        );
        assert!(Cli::try_parse_from(["tmemctl", "set", "mem-limit", "12Q"]).is_err());
        assert_eq!(cli.control, PathBuf::from(DEFAULT_CONTROL_PATH));
        let cli = Cli::parse_from(["tmemctl", "set", "max", "1", "2G"]);
        assert!(
            matches!(cli.cmd, Cmd::Set { what: SetCmd::Max { device: 1, size: Cap::Bytes(ref s) } } if s.bytes() == 2 << 30)
        );
        let cli = Cli::parse_from(["tmemctl", "set", "max", "0", "none"]);
        assert!(matches!(
            cli.cmd,
            Cmd::Set {
                what: SetCmd::Max {
                    device: 0,
                    size: Cap::None
                }
            }
        ));
        let cli = Cli::parse_from(["tmemctl", "set", "weight", "2", "3"]);
        assert!(matches!(
            cli.cmd,
            Cmd::Set {
                what: SetCmd::Weight { device: 2, weight: 3 }
            }
        ));
        assert!(Cli::try_parse_from(["tmemctl", "set", "max", "1", "lots"]).is_err());
        assert!(Cli::try_parse_from(["tmemctl", "set", "weight", "x", "3"]).is_err());
        assert!(Cli::try_parse_from(["tmemctl", "set", "weight", "1"]).is_err());
        let cli = Cli::parse_from(["tmemctl", "drop-pool", "1", "7"]);
        assert!(matches!(cli.cmd, Cmd::DropPool { device: 1, pool: 7 }));
        assert!(Cli::try_parse_from(["tmemctl", "writeback", "-3"]).is_err());
    }
}
