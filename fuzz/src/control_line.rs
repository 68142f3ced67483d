//! Target `control_line`: control socket request lines, as the server reads
//! them, parsed by [`Request::from_line`] and answered by
//! [`ControlContext::handle_line`] against a real store (with a spill file)
//! that holds known pages of two devices and of a guest that is no device.
//!
//! Invariants, per line:
//! - nothing panics; the reply encodes to JSON and decodes back to itself;
//! - a line that does not parse gets an error reply carrying the parse
//!   error's message, and touches nothing;
//! - a request that parses re-encodes to a line that parses to the same
//!   request;
//! - each command does what it says and nothing else: `stats` counts the
//!   model's pages, `get-config` and `set-config` report the store's budget
//!   (the one just set), `writeback` writes at most what was asked,
//!   `drop-pool` drops exactly the model's pages of that pool of an existing
//!   device and refuses other devices; every other page reads back byte for
//!   byte (after each command that could touch it, and at the end).
//!
//! Input: the bytes of up to 64 lines, split at `\n`.

use std::{collections::HashMap, sync::Arc};

use clap::Parser;
use vhost_user_tmem::{
    config::{Args, Config},
    control::{Answer, ControlContext, DeviceReport, Reply, Request},
    error_chain,
    store::{GetOutcome, GuestId, Page, Store, PAGE_SIZE},
    telemetry::DeviceTelemetry,
};

use crate::pages::{fill_page, make_page, Content};

const MAX_LINES: usize = 64;
const DEVICES: u32 = 2;
/// Pages are put in pools 0..POOLS of devices 0 and 1 and of guest 7 (no device).
const OWNERS: [u32; 3] = [0, 1, 7];
const POOLS: u32 = 3;
const PER_POOL: u64 = 2;

struct Harness {
    ctx: ControlContext,
    store: Arc<Store>,
    model: HashMap<(u32, u32, u64), Box<Page>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = dir.path().join("spill");
        let argv = [
            "vhost-user-tmem",
            "--socket",
            "/run/tmem-fuzz/0.sock",
            "--socket",
            "/run/tmem-fuzz/1.sock",
            "--mem-limit",
            "64M",
            "--spill-limit",
            "256K",
            "--spill-file",
        ];
        let args = Args::parse_from(argv.iter().copied().chain([spill.to_str().expect("UTF-8 path")]));
        let config = Config::try_from(args).expect("config");
        let store = Arc::new(Store::new(config.store.clone()).expect("store"));
        let devices = (0..DEVICES)
            .map(|id| {
                let socket = config.devices[id as usize].path.clone();
                Arc::new(DeviceTelemetry::new(id, socket, 2)) as Arc<dyn DeviceReport>
            })
            .collect();
        let mut model = HashMap::new();
        for (n, &guest) in OWNERS.iter().enumerate() {
            for pool in 0..POOLS {
                for index in 0..PER_POOL {
                    // Half of them fills: no compression to pay for at every run.
                    let seed = (n as u32 * POOLS + pool) as u8 * 2 + index as u8;
                    let page = match index {
                        0 => fill_page(u64::from(seed)),
                        _ => make_page(Content::Text(seed)),
                    };
                    store.put(GuestId(guest), pool, index, &page).expect("put");
                    model.insert((guest, pool, index), page);
                }
            }
        }
        Harness {
            ctx: ControlContext {
                store: store.clone(),
                devices,
                config,
            },
            store,
            model,
            _dir: dir,
        }
    }

    fn line(&mut self, n: usize, line: &[u8]) {
        let what = || format!("line {n} {:?}", String::from_utf8_lossy(line));
        let parsed = Request::from_line(line);
        let reply = self.ctx.handle_line(line);
        let wire = serde_json::to_string(&reply)
            .unwrap_or_else(|e| panic!("{}: reply does not encode: {e}", what()));
        let back: Reply = serde_json::from_str(&wire)
            .unwrap_or_else(|e| panic!("{}: reply {wire} does not decode: {e}", what()));
        assert_eq!(back, reply, "{}: the reply changes on the wire", what());
        let request = match parsed {
            Err(e) => {
                let message = error_chain(&e);
                assert!(!message.is_empty(), "{}: empty error", what());
                assert_eq!(reply, Reply::Error(message), "{}", what());
                return;
            }
            Ok(request) => request,
        };
        let text = serde_json::to_string(&request).expect("a request encodes");
        match Request::from_line(text.as_bytes()) {
            Ok(again) => assert_eq!(again, request, "{}: re-encoded as {text}", what()),
            Err(e) => panic!("{}: re-encoded as {text}, which does not parse: {e}", what()),
        }
        let count = |model: &HashMap<(u32, u32, u64), _>, f: &dyn Fn(u32, u32) -> bool| {
            model.keys().filter(|k| f(k.0, k.1)).count() as u64
        };
        match (&request, &reply) {
            (Request::Stats {}, Reply::Ok(Answer::Stats(s))) => {
                assert_eq!(s.store.total.stored_pages, self.model.len() as u64, "{}", what());
                assert_eq!(s.devices.len(), DEVICES as usize, "{}", what());
            }
            (Request::GetConfig {}, Reply::Ok(Answer::Config(c))) => {
                assert_eq!(c.mem_limit, self.store.mem_limit(), "{}", what());
            }
            (Request::SetConfig { mem_limit: None }, Reply::Error(_)) => {}
            (
                Request::SetConfig {
                    mem_limit: Some(size),
                },
                Reply::Ok(Answer::Config(c)),
            ) => {
                assert_eq!(c.mem_limit, size.bytes(), "{}: the answer's budget", what());
                assert_eq!(
                    self.store.mem_limit(),
                    size.bytes(),
                    "{}: the store's budget",
                    what()
                );
            }
            (Request::Writeback { pages }, Reply::Ok(Answer::Written(done))) => {
                assert!(done <= pages, "{}: wrote {done}", what());
            }
            (Request::DropPool { device, pool }, reply) if *device < DEVICES => {
                let (device, pool) = (*device, *pool);
                let want = count(&self.model, &|g, p| g == device && p == pool);
                assert_eq!(reply, &Reply::Ok(Answer::Dropped(want)), "{}", what());
                self.model.retain(|k, _| !(k.0 == device && k.1 == pool));
            }
            (Request::DropPool { .. }, Reply::Error(_)) => {}
            (Request::SetDevice { device, max, weight }, Reply::Ok(Answer::Budget(b))) => {
                assert!(*device < DEVICES, "{}: a device that does not exist", what());
                if let Some(max) = max {
                    assert_eq!(b.max_bytes, max.bytes(), "{}: the cap", what());
                }
                if let Some(weight) = weight {
                    assert_eq!(b.weight, *weight, "{}: the weight", what());
                }
            }
            (Request::SetDevice { .. }, Reply::Error(_)) => {}
            (request, reply) => panic!("{}: {request:?} answered {reply:?}", what()),
        }
        // The pages are read back after every command that could touch them,
        // and once at the end for the others.
        if matches!(
            request,
            Request::SetConfig { .. }
                | Request::Writeback { .. }
                | Request::DropPool { .. }
                | Request::SetDevice { .. }
        ) {
            self.check_pages(n);
        }
    }

    fn check_pages(&self, n: usize) {
        let mut out = Box::new([0u8; PAGE_SIZE]);
        for (&(g, p, i), page) in &self.model {
            let r = self.store.get(GuestId(g), p, i, &mut out, false);
            assert!(
                matches!(r, Ok(GetOutcome::Found)) && out[..] == page[..],
                "after line {n}: page {:?} lost or changed: {r:?}",
                (g, p, i)
            );
        }
        let stored = self.store.stats().total.stored_pages;
        assert_eq!(stored, self.model.len() as u64, "after line {n}: page count");
    }
}

/// Runs one input; panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let mut h = Harness::new();
    let mut lines = 0;
    for (n, line) in data.split(|&b| b == b'\n').take(MAX_LINES).enumerate() {
        h.line(n, line);
        lines = n + 1;
    }
    h.check_pages(lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_once() {
        run(concat!(
            "{\"cmd\":\"stats\"}\n",
            "{\"cmd\":\"get-config\"}\n",
            "{\"cmd\":\"set-config\",\"mem_limit\":\"1M\"}\n",
            "{\"cmd\":\"set-config\",\"mem_limit\":0}\n",
            "{\"cmd\":\"set-config\"}\n",
            "{\"cmd\":\"writeback\",\"pages\":5}\n",
            "{\"cmd\":\"drop-pool\",\"device\":1,\"pool\":2}\n",
            "{\"cmd\":\"drop-pool\",\"device\":7,\"pool\":0}\n",
            "{\"cmd\":\"stats\",\"x\":1}\n",
            "[]\n",
            "\n",
            "{\"cmd\":\"writeback\",\"pages\":-1}\n",
        )
        .as_bytes());
    }
}
