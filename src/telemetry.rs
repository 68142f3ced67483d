//! What the control socket reads of a device: its identity, whether a VMM is
//! connected, per-queue latency, and the rate limit on the log lines a guest
//! can trigger. The device writes it, the control server reads it; neither
//! depends on the other.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    config::DeviceKind,
    control::{DeviceReport, DeviceStats},
    stats::{summarize, LatencyRecorder},
    store::GuestId,
};

/// What outlives one VMM connection: identity, counters and the error log.
pub struct DeviceTelemetry {
    pub id: u32,
    /// "tmem" or "blk".
    pub kind: &'static str,
    pub socket: PathBuf,
    pub queues: u16,
    pub connected: AtomicBool,
    /// One recorder per queue, written only by that queue's worker.
    pub latency: Vec<LatencyRecorder>,
    pub errors: RateLimiter,
}

impl DeviceTelemetry {
    pub fn new(id: u32, socket: PathBuf, queues: u16) -> Self {
        DeviceTelemetry {
            id,
            kind: "tmem",
            socket,
            queues,
            connected: AtomicBool::new(false),
            latency: (0..queues).map(|_| LatencyRecorder::default()).collect(),
            errors: RateLimiter::new(20, Duration::from_secs(1)),
        }
    }

    /// The same, for a device of `kind`.
    pub fn with_kind(mut self, kind: DeviceKind) -> Self {
        self.kind = match kind {
            DeviceKind::Tmem => "tmem",
            DeviceKind::Blk { .. } => "blk",
        };
        self
    }

    /// The store's name for this device's pages.
    pub fn guest(&self) -> GuestId {
        GuestId(self.id)
    }
}

impl DeviceReport for DeviceTelemetry {
    fn stats(&self) -> DeviceStats {
        DeviceStats {
            id: self.id,
            kind: self.kind.to_owned(),
            socket: self.socket.display().to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            queues: self.queues,
            latency: summarize(&self.latency),
        }
    }
}

/// Token bucket for log lines a guest can trigger at will.
pub struct RateLimiter {
    state: Mutex<Bucket>,
    burst: u32,
    refill: Duration,
}

struct Bucket {
    tokens: u32,
    last: Instant,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        RateLimiter {
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                suppressed: 0,
            }),
            burst,
            refill,
        }
    }

    /// Whether to log now; if so, how many lines were dropped since the last one.
    pub fn allow(&self) -> Option<u64> {
        let mut b = self.state.lock();
        let now = Instant::now();
        let earned = now.duration_since(b.last).as_nanos() / self.refill.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(self.burst);
            b.last = now;
        }
        if b.tokens == 0 {
            b.suppressed += 1;
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_a_burst_then_counts() {
        let rl = RateLimiter::new(3, Duration::from_secs(3600));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), Some(0));
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.allow(), None);
        let rl = RateLimiter::new(1, Duration::from_nanos(1));
        assert_eq!(rl.allow(), Some(0));
        std::thread::sleep(Duration::from_millis(1));
        assert!(rl.allow().is_some());
    }
}
