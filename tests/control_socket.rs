//! The control socket (README, "Inspecting it: tmemctl"):
//! "A unix socket with mode 0600, carrying newline-delimited JSON."

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, io::AsRawFd, net::UnixStream, process::CommandExt},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{connect_socket_for_test, control_line, page, Daemon};
use vhost_user_tmem::{
    control::{ClientError, ControlClient, MAX_CLIENTS, REPLY_TIMEOUT, REQUEST_TIMEOUT},
    protocol::Status,
};

const OK: Option<Status> = Some(Status::Ok);
const NOT_FOUND: Option<Status> = Some(Status::NotFound);

/// "A unix socket with mode 0600".
#[test]
fn control_socket_is_owner_only() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {:o}", mode & 0o777);
}

/// "stats (global, per device, per pool: the store's counters, plus per-op latency
/// p50/p99 from a histogram)": the counters move with the traffic.
#[test]
fn stats_counters_follow_traffic() {
    let d = Daemon::with(1, &["--queues", "2"]);
    let before = d.stats();
    assert_eq!(before["store"]["total"]["succ_stores"], 0);
    let dev = &before["devices"][0];
    assert_eq!(dev["id"], 0);
    assert_eq!(dev["connected"], false, "no VMM yet");
    assert_eq!(dev["queues"], 2);
    assert_eq!(dev["socket"].as_str().unwrap(), d.sockets[0].to_str().unwrap());

    let (_vmm, mut qs) = d.connect(0, Daemon::vmm_config(2, true));
    for i in 0..3 {
        assert_eq!(qs[0].put(4, i, &page(i)).unwrap().status, OK);
    }
    assert_eq!(qs[1].put_fill(5, 0, 0).unwrap().status, OK);
    assert_eq!(qs[1].get(4, 0, false).unwrap().status, OK);
    assert_eq!(qs[1].get(4, 99, false).unwrap().status, NOT_FOUND);
    assert_eq!(qs[0].invalidate_page(4, 1).unwrap().status, OK);

    let s = d.stats();
    let total = &s["store"]["total"];
    assert_eq!(total["succ_stores"], 4, "{total}");
    // One hit and one miss; whether `loads` counts attempts or hits is the
    // store's choice, a miss is a failed load either way.
    let (loads, failed) = (total["loads"].as_u64(), total["failed_loads"].as_u64());
    assert!(
        matches!((loads, failed), (Some(1), Some(1)) | (Some(2), Some(1))),
        "loads/failed_loads: {total}"
    );
    assert_eq!(total["invalidates"], 1, "{total}");
    assert_eq!(total["stored_pages"], 3, "{total}");
    assert_eq!(total["same_filled_pages"], 1, "{total}");
    let g = &s["store"]["guests"]["0"];
    assert_eq!(g["total"]["succ_stores"], 4, "per guest: {g}");
    assert_eq!(g["pools"]["4"]["succ_stores"], 3, "per pool: {g}");
    assert_eq!(g["pools"]["5"]["succ_stores"], 1, "per pool: {g}");
    let dev = &s["devices"][0];
    assert_eq!(dev["connected"], true);
    let lat = &dev["latency"];
    let puts = lat["put"]["count"].as_u64().unwrap_or(0);
    assert!(puts == 3 || puts == 4, "PUT (+ PUT_FILL) latency samples: {lat}");
    assert_eq!(lat["get"]["count"], 2, "{lat}");
    assert_eq!(lat["invalidate"]["count"], 1, "{lat}");
    for op in ["put", "get", "invalidate"] {
        let p50 = lat[op]["p50_us"].as_f64().expect("p50_us is a number");
        let p99 = lat[op]["p99_us"].as_f64().expect("p99_us is a number");
        assert!(p50 <= p99, "{op}: p50 {p50} > p99 {p99}");
    }
}

/// "get-config / set-config (mem-limit at run time)", sizes with a unit or in bytes.
#[test]
fn set_and_get_mem_limit() {
    let d = Daemon::with(1, &["--mem-limit", "64M"]);
    let r = d.control(r#"{"cmd":"get-config"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["config"]["mem_limit"], 64 << 20);
    let r = d.control(r#"{"cmd":"set-config","mem_limit":"1G"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let r = d.control(r#"{"cmd":"get-config"}"#);
    assert_eq!(r["config"]["mem_limit"], 1u64 << 30);
    assert_eq!(d.stats()["store"]["mem_limit_bytes"], 1u64 << 30);
    let r = d.control(r#"{"cmd":"set-config","mem_limit":33554432}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        d.control(r#"{"cmd":"get-config"}"#)["config"]["mem_limit"],
        32 << 20
    );
}

/// "writeback {pages}" moves pages to the spill file; they still read back intact.
#[test]
fn writeback_keeps_pages_readable() {
    let d0 = tempfile::tempdir().unwrap();
    let spill = d0.path().join("spill");
    let d = Daemon::with(
        1,
        &["--spill-file", spill.to_str().unwrap(), "--spill-limit", "64M"],
    );
    let (_vmm, mut q) = d.connect1();
    for i in 0..32 {
        assert_eq!(q.put(1, i, &page(i)).unwrap().status, OK);
    }
    let r = d.control(r#"{"cmd":"writeback","pages":16}"#);
    assert_eq!(r["ok"], true, "{r}");
    let written = r["written"].as_u64().expect("written is a count");
    assert!(
        (1..=16).contains(&written),
        "wrote {written} of 16 asked, with 32 pages in RAM and room in the spill file"
    );
    let total = &d.stats()["store"]["total"];
    assert_eq!(total["spilled_pages"], written, "{total}");
    for i in 0..32 {
        let r = q.get(1, i, false).unwrap();
        assert_eq!((r.status, r.used_len), (OK, 4097));
        assert_eq!(r.page, page(i), "page {i} after writeback");
    }
}

/// With a spill file the daemon runs a background writer that keeps
/// --writeback-headroom free below the limit; stats say how much it moved.
#[test]
fn the_background_writer_moves_pages_ahead_of_the_puts() {
    let d0 = tempfile::tempdir().unwrap();
    let spill = d0.path().join("spill");
    let d = Daemon::with(
        1,
        &[
            "--mem-limit",
            "2M",
            "--writeback-headroom",
            "1M",
            "--spill-file",
            spill.to_str().unwrap(),
            "--spill-limit",
            "64M",
        ],
    );
    let (_vmm, mut q) = d.connect1();
    let n = 1500;
    for i in 0..n {
        assert_eq!(q.put(1, i, &page(i)).unwrap().status, OK, "page {i}");
    }
    // The writer also looks every 100 ms: RAM near the limit is work for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stats = loop {
        let stats = d.stats();
        if stats["store"]["background_writebacks"].as_u64() > Some(0) || std::time::Instant::now() > deadline
        {
            break stats;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let store = &stats["store"];
    let background = store["background_writebacks"].as_u64().expect("a count");
    assert!(background > 0, "{store}");
    let total = &store["total"];
    assert!(total["mem_used_bytes"].as_u64().unwrap() <= 2 << 20, "{total}");
    assert!(total["spill_writes"].as_u64().unwrap() >= background, "{total}");
    for i in 0..n {
        let r = q.get(1, i, true).unwrap();
        assert_eq!(r.status, OK);
        assert_eq!(r.page, page(i), "page {i}");
    }
}

/// "drop-pool": the pool of that device goes, other pools and devices stay.
#[test]
fn drop_pool_drops_one_pool_of_one_device() {
    let d = Daemon::with(2, &[]);
    let (_v0, mut q0) = d.connect(0, Daemon::vmm_config(1, true));
    let (_v1, mut q1) = d.connect(1, Daemon::vmm_config(1, true));
    for i in 0..5 {
        assert_eq!(q0[0].put(7, i, &page(i)).unwrap().status, OK);
        assert_eq!(q0[0].put(8, i, &page(10 + i)).unwrap().status, OK);
        assert_eq!(q1[0].put(7, i, &page(20 + i)).unwrap().status, OK);
    }
    let r = d.control(r#"{"cmd":"drop-pool","device":0,"pool":7}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["dropped"], 5, "{r}");
    for i in 0..5 {
        assert_eq!(q0[0].get(7, i, false).unwrap().status, NOT_FOUND);
        assert_eq!(q0[0].get(8, i, false).unwrap().page, page(10 + i));
        assert_eq!(q1[0].get(7, i, false).unwrap().page, page(20 + i));
    }
}

/// "A bad request gets a JSON error naming what was wrong", and the connection
/// and the daemon go on.
#[test]
fn bad_requests_get_json_errors() {
    let mut d = Daemon::start();
    let mut s = connect_socket_for_test(&d.control);
    let bad = [
        ("not json at all", "json"),
        (r#"{"cmd":"no-such-command"}"#, "no-such-command"),
        (r#"{"nocmd":1}"#, "cmd"),
        (r#"[1,2,3]"#, ""),
        (r#"{"cmd":"set-config","mem_limit":"12Q"}"#, "12Q"),
        (r#"{"cmd":"set-config","mem_limit":-5}"#, ""),
        (r#"{"cmd":"writeback"}"#, "pages"),
        (r#"{"cmd":"writeback","pages":"many"}"#, "pages"),
        (r#"{"cmd":"drop-pool","device":0}"#, "pool"),
        (r#"{"cmd":"drop-pool","device":99,"pool":1}"#, "99"),
    ];
    for (req, mentions) in bad {
        let r = control_line(&mut s, req);
        assert_eq!(r["ok"], false, "{req} -> {r}");
        let msg = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{req}: no error string: {r}"));
        assert!(!msg.is_empty());
        assert!(
            msg.to_lowercase().contains(&mentions.to_lowercase()),
            "{req}: error {msg:?} does not name {mentions:?}"
        );
    }
    // Same connection, good request.
    let r = control_line(&mut s, r#"{"cmd":"stats"}"#);
    assert_eq!(r["ok"], true, "{r}");
    d.assert_alive();
}

/// Room for scheduling on a loaded machine, on top of the daemon's own limits.
const SLACK: Duration = Duration::from_secs(3);

/// A client that sends many requests and never reads: the daemon's replies
/// fill the socket and the daemon is left mid-write. The requests it has not
/// yet read stay queued, so this client is never the idle one.
fn never_reads(control: &Path) -> UnixStream {
    let mut s = connect_socket_for_test(control);
    s.set_write_timeout(Some(common::TIMEOUT)).unwrap();
    // Far more reply bytes than a socket buffers (a stats reply is hundreds
    // of bytes), and few enough request bytes to be taken in one write.
    s.write_all("{\"cmd\":\"stats\"}\n".repeat(4000).as_bytes())
        .unwrap();
    s
}

/// Whether the daemon has closed its end of `s`, waiting up to `within`,
/// without reading (which would unblock a daemon stuck writing to `s`).
fn hung_up_within(s: &UnixStream, within: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one live, initialised pollfd, and a count of one.
        let rc = unsafe { libc::poll(&mut fd, 1, left.as_millis() as i32) };
        if rc > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

fn is_too_many(err: &ClientError) -> bool {
    matches!(err, ClientError::Refused(m) if m.contains("too many control clients"))
}

/// Write timeout on replies: a client that sends request after request and
/// never reads a reply does not hold up another client, and its connection
/// is closed once a reply has waited REPLY_TIMEOUT.
#[test]
fn a_client_that_never_reads_does_not_hold_up_others() {
    let d = Daemon::start();
    let hog = never_reads(&d.control);
    let begun = Instant::now();
    let mut client = ControlClient::connect(&d.control).unwrap();
    for _ in 0..3 {
        client.stats().unwrap();
    }
    assert!(
        begun.elapsed() < SLACK,
        "another client waited {:?} behind one that never reads",
        begun.elapsed()
    );
    assert!(
        hung_up_within(&hog, REPLY_TIMEOUT + SLACK),
        "a client that never reads was still connected {:?} after its replies stopped",
        REPLY_TIMEOUT + SLACK
    );
    client.stats().unwrap();
}

/// Every place taken by a client that never reads: a newcomer is turned away
/// with a reason, and served once the stuck clients have been dropped, which
/// is within REPLY_TIMEOUT, not never.
#[test]
fn clients_that_never_read_give_their_places_back() {
    let d = Daemon::start();
    let hogs: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| never_reads(&d.control)).collect();
    let err = ControlClient::connect(&d.control).unwrap().stats().unwrap_err();
    assert!(is_too_many(&err), "{}", vhost_user_tmem::error_chain(&err));
    let begun = Instant::now();
    loop {
        match ControlClient::connect(&d.control).unwrap().stats() {
            Ok(_) => break,
            Err(e) if is_too_many(&e) && begun.elapsed() < REPLY_TIMEOUT + SLACK => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "still refused {:?} after the clients stopped reading: {}",
                begun.elapsed(),
                vhost_user_tmem::error_chain(&e)
            ),
        }
    }
    for hog in &hogs {
        assert!(hung_up_within(hog, SLACK));
    }
}

/// Cap on concurrent clients: with every place held by a client in the middle
/// of a request, one more is told so, in words tmemctl prints; the others
/// finish their requests and are answered.
#[test]
fn too_many_clients_get_a_clear_error_and_the_others_go_on() {
    let d = Daemon::start();
    let mut busy: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| {
            let mut s = connect_socket_for_test(&d.control);
            s.write_all(br#"{"cmd":"#).unwrap();
            s
        })
        .collect();
    let err = ControlClient::connect(&d.control).unwrap().stats().unwrap_err();
    assert!(is_too_many(&err), "{}", vhost_user_tmem::error_chain(&err));
    let out = Command::new(env!("CARGO_BIN_EXE_tmemctl"))
        .arg("--control")
        .arg(&d.control)
        .arg("stats")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("too many control clients") && stderr.contains("try again"),
        "tmemctl said: {stderr}"
    );
    for s in &mut busy {
        let r = control_line(s, r#""stats"}"#);
        assert_eq!(r["ok"], true, "{r}");
    }
}

/// Cap on concurrent clients: connections left open and silent do not lock
/// tmemctl out; the one idle longest is closed to make room.
#[test]
fn idle_connections_make_room() {
    let d = Daemon::start();
    // The daemon takes connections in the order they were made, so the
    // first is the one idle longest.
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| connect_socket_for_test(&d.control))
        .collect();
    let mut first = connect_socket_for_test(&d.control);
    let r = control_line(&mut first, r#"{"cmd":"stats"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        hung_up_within(&idle[0], SLACK),
        "the oldest idle connection is still open"
    );
    // `first` stays connected, and was answered last: the next oldest goes.
    let mut second = ControlClient::connect(&d.control).unwrap();
    second.stats().unwrap();
    assert!(
        hung_up_within(&idle[1], SLACK),
        "the next oldest did not make room"
    );
    assert!(!hung_up_within(&idle[MAX_CLIENTS - 1], Duration::ZERO));
    assert_eq!(control_line(&mut first, r#"{"cmd":"stats"}"#)["ok"], true);
}

/// A client that starts a request and never finishes it is answered why
/// and disconnected after REQUEST_TIMEOUT.
#[test]
fn a_request_line_that_never_ends_is_cut_off() {
    let d = Daemon::start();
    let mut s = connect_socket_for_test(&d.control);
    let begun = Instant::now();
    s.write_all(br#"{"cmd":"st"#).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let waited = begun.elapsed();
    let r: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    let msg = r["error"].as_str().unwrap();
    assert!(
        msg.contains("not finished within") && msg.contains("closing"),
        "{msg}"
    );
    assert!(
        waited >= REQUEST_TIMEOUT - Duration::from_millis(100) && waited < REQUEST_TIMEOUT + SLACK,
        "cut off after {waited:?}"
    );
    assert!(hung_up_within(&s, SLACK));
    d.stats();
}

/// SO_PEERCRED: with the socket's mode opened up, a process of another uid
/// can connect, and is refused by the daemon with a reason it logs; the
/// daemon's own user is still served.
#[test]
fn another_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "another_uid_is_refused: needs root to run a client as another uid; \
             the credential check itself is tested in src/control/peer.rs"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let d = Daemon::start();
    // Everything the other user needs to reach the socket, and tmemctl in a
    // place it can run from.
    let tmemctl = d.dir().join("tmemctl");
    std::fs::copy(env!("CARGO_BIN_EXE_tmemctl"), &tmemctl).unwrap();
    std::fs::set_permissions(&tmemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&d.control, std::fs::Permissions::from_mode(0o666)).unwrap();

    let out = Command::new(&tmemctl)
        .arg("--control")
        .arg(&d.control)
        .arg("stats")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "uid {NOBODY} was served:\n{stdout}");
    assert!(
        stderr.contains(&format!("uid {NOBODY}")) && stderr.contains("may not use this control socket"),
        "tmemctl said: {stderr}"
    );
    let log = d.log();
    assert!(
        log.contains("refused a client") && log.contains(&format!("uid {NOBODY}")),
        "daemon log: {log}"
    );
    assert_eq!(d.control(r#"{"cmd":"stats"}"#)["ok"], true);
}
