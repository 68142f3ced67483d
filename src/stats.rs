//! Per-operation request latency, recorded by the queue workers and read by
//! the control socket.
//!
//! Each worker owns its [`LatencyRecorder`]: one writer per histogram, so a
//! sample is a relaxed load and store of one bucket (no lock, no atomic
//! read-modify-write on the hot path). Readers add up the buckets of every
//! worker of a device at whatever moment they look; a sample that lands while
//! they read is either counted or not, which is all a percentile needs.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::protocol::Op;

/// Values below this many nanoseconds get one bucket each.
const LINEAR: u64 = 16;
/// Sub-buckets per power of two above [`LINEAR`]: bucket width is at most
/// 1/8 of its lower bound, so a reported percentile is within 12.5 %.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Powers of two covered: 2^4 ns up to 2^44 ns (about 4.9 hours).
const OCTAVES: u64 = 40;
pub const BUCKETS: usize = (LINEAR + OCTAVES * SUB) as usize;

fn bucket_of(ns: u64) -> usize {
    if ns < LINEAR {
        return ns as usize;
    }
    let octave = 63 - u64::from(ns.leading_zeros()); // >= 4
    let sub = (ns >> (octave - u64::from(SUB_BITS))) & (SUB - 1);
    let index = LINEAR + (octave - 4) * SUB + sub;
    index.min(BUCKETS as u64 - 1) as usize
}

/// Lower bound and width, in nanoseconds, of one bucket.
fn bucket_range(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR {
        return (index, 1);
    }
    let octave = 4 + (index - LINEAR) / SUB;
    let sub = (index - LINEAR) % SUB;
    let width = 1u64 << (octave - u64::from(SUB_BITS));
    ((1u64 << octave) + sub * width, width)
}

/// The ops a latency is reported for: PUT_FILL counts as a put, both
/// invalidates as an invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Put = 0,
    Get = 1,
    Invalidate = 2,
}

impl OpClass {
    pub const ALL: [OpClass; 3] = [OpClass::Put, OpClass::Get, OpClass::Invalidate];

    pub fn of(op: Op) -> OpClass {
        match op {
            Op::Put | Op::PutFill => OpClass::Put,
            Op::Get => OpClass::Get,
            Op::InvalidatePage | Op::InvalidatePool => OpClass::Invalidate,
        }
    }
}

/// A histogram with one writer.
pub struct Histogram {
    buckets: Box<[AtomicU64; BUCKETS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl Histogram {
    /// Must only be called from the histogram's single writer thread: the
    /// load-then-store would lose samples if two threads raced on it.
    #[inline]
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = &self.buckets[bucket_of(ns)];
        bucket.store(bucket.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn add_to(&self, sum: &mut Snapshot) {
        for (total, bucket) in sum.buckets.iter_mut().zip(self.buckets.iter()) {
            *total += bucket.load(Ordering::Relaxed);
        }
    }
}

/// One worker's histograms, one per [`OpClass`].
#[derive(Default)]
pub struct LatencyRecorder {
    ops: [Histogram; 3],
}

impl LatencyRecorder {
    #[inline]
    pub fn record(&self, class: OpClass, latency: Duration) {
        self.ops[class as usize].record(latency);
    }
}

/// Summed buckets of several histograms, for computing percentiles.
#[derive(Clone)]
pub struct Snapshot {
    buckets: Vec<u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            buckets: vec![0; BUCKETS],
        }
    }
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q`-quantile (0 < q <= 1) in nanoseconds, taken as the middle of the
    /// bucket it falls in; None when empty.
    pub fn quantile_ns(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // Rank of the sample we want, 1-based: ceil(q * count), at least 1.
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_range(index);
                return Some(low as f64 + (width as f64 - 1.0) / 2.0);
            }
        }
        None
    }

    pub fn summary(&self) -> OpLatency {
        let us = |q| self.quantile_ns(q).map_or(0.0, |ns| round2(ns / 1000.0));
        OpLatency {
            p50_us: us(0.5),
            p99_us: us(0.99),
            count: self.count(),
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// What the control socket reports for one op class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpLatency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub put: OpLatency,
    pub get: OpLatency,
    pub invalidate: OpLatency,
}

/// Sums the recorders of a device's workers into the reported latencies.
pub fn summarize<'a>(recorders: impl IntoIterator<Item = &'a LatencyRecorder>) -> Latency {
    let mut sums: [Snapshot; 3] = Default::default();
    for recorder in recorders {
        for class in OpClass::ALL {
            recorder.ops[class as usize].add_to(&mut sums[class as usize]);
        }
    }
    Latency {
        put: sums[OpClass::Put as usize].summary(),
        get: sums[OpClass::Get as usize].summary(),
        invalidate: sums[OpClass::Invalidate as usize].summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 30, 1 << 43, (1 << 44) - 1]) {
            let index = bucket_of(ns);
            assert!(index >= last, "buckets are monotonic");
            last = index;
            let (low, width) = bucket_range(index);
            assert!(low <= ns && ns < low + width, "{ns} in bucket {index}");
            assert!(width == 1 || width * 8 <= low, "relative width <= 1/8");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let h = LatencyRecorder::default();
        // 1..=1000 microseconds, once each.
        for us in 1..=1000u64 {
            h.record(OpClass::Get, Duration::from_micros(us));
        }
        let lat = summarize([&h]);
        assert_eq!(lat.get.count, 1000);
        assert_eq!(lat.put.count, 0);
        assert!((lat.get.p50_us - 500.0).abs() <= 500.0 / 8.0, "{lat:?}");
        assert!((lat.get.p99_us - 990.0).abs() <= 990.0 / 8.0, "{lat:?}");
        assert_eq!(lat.put.p50_us, 0.0);
    }

    #[test]
    fn p99_sees_the_tail() {
        let h = LatencyRecorder::default();
        for _ in 0..980 {
            h.record(OpClass::Put, Duration::from_micros(2));
        }
        for _ in 0..20 {
            h.record(OpClass::Put, Duration::from_millis(5));
        }
        let lat = summarize([&h]);
        assert!(lat.put.p50_us < 2.5, "{lat:?}");
        assert!(lat.put.p99_us > 4000.0, "{lat:?}");
    }

    #[test]
    fn workers_are_summed() {
        let a = LatencyRecorder::default();
        let b = LatencyRecorder::default();
        a.record(OpClass::Invalidate, Duration::from_nanos(100));
        b.record(OpClass::Invalidate, Duration::from_nanos(100));
        b.record(OpClass::Invalidate, Duration::from_secs(1));
        let lat = summarize([&a, &b]);
        assert_eq!(lat.invalidate.count, 3);
        assert!(lat.invalidate.p50_us < 0.2);
        assert!(lat.invalidate.p99_us > 900_000.0);
    }

    #[test]
    fn op_classes() {
        assert_eq!(OpClass::of(Op::PutFill), OpClass::Put);
        assert_eq!(OpClass::of(Op::InvalidatePool), OpClass::Invalidate);
        assert_eq!(OpClass::of(Op::Get), OpClass::Get);
    }
}
