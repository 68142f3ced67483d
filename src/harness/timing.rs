//! Timed phases for the benchmarks: work split over threads that start
//! together, wrong pages counted, and round-trip times summarised.

use std::{
    ops::Range,
    sync::Barrier,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Splits `0..len` into `parts` contiguous ranges, the first ones one longer.
pub fn ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let base = len / parts;
    let extra = len % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let r = start..end;
            start = end;
            r
        })
        .collect()
}

/// Runs `work` on each contiguous range of `0..len` in its own thread, with
/// that thread's own state (one per thread), all starting together. Returns
/// the wall-clock time from the common start to the last finish, and each
/// thread's result in order; the first error wins.
pub fn timed_parallel<S, T, E, F>(len: usize, states: &mut [S], work: F) -> Result<(Duration, Vec<T>), E>
where
    S: Send,
    T: Send,
    E: Send,
    F: Fn(Range<usize>, &mut S) -> Result<T, E> + Sync,
{
    let barrier = Barrier::new(states.len() + 1);
    let parts = ranges(len, states.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .zip(states.iter_mut())
            .map(|(r, state)| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    work(r, state)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut results = Vec::with_capacity(handles.len());
        let mut first_err = None;
        for h in handles {
            // A panic is a bug in the harness or the code under test: let it
            // surface as one.
            match h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                Ok(t) => results.push(t),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let elapsed = start.elapsed();
        match first_err {
            Some(e) => Err(e),
            None => Ok((elapsed, results)),
        }
    })
}

/// Pages that did not come back as they went in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mismatches {
    pub count: u64,
    /// The lowest page number among them.
    pub first: Option<u64>,
}

impl Mismatches {
    pub fn note(&mut self, page: u64) {
        self.count += 1;
        self.first = Some(self.first.map_or(page, |f| f.min(page)));
    }

    /// The mismatches of several threads together.
    pub fn sum(parts: impl IntoIterator<Item = Mismatches>) -> Mismatches {
        parts.into_iter().fold(Mismatches::default(), |mut all, part| {
            all.count += part.count;
            all.first = match (all.first, part.first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            all
        })
    }
}

/// Round-trip times of individual requests, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Summarises samples in nanoseconds; the q-quantile is the sample of
    /// rank ceil(q * n).
    pub fn of_ns(mut ns: Vec<u64>) -> Latency {
        ns.sort_unstable();
        let pick = |q: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1000.0
        };
        let mean = if ns.is_empty() {
            0.0
        } else {
            ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0
        };
        Latency {
            samples: ns.len(),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            p999_us: pick(0.999),
            mean_us: mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        for (len, parts) in [(0, 1), (1, 3), (10, 3), (4096, 7), (5, 5), (3, 0)] {
            let rs = ranges(len, parts);
            assert_eq!(rs.len(), parts.max(1));
            let mut next = 0;
            for r in &rs {
                assert_eq!(r.start, next);
                assert!(r.len() <= len / parts.max(1) + 1);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }

    #[test]
    fn timed_parallel_gives_each_thread_its_range_and_state() {
        let mut states = vec![0usize; 3];
        let (_, sums) = timed_parallel(10, &mut states, |r, s| {
            *s = r.len();
            Ok::<_, ()>(r.sum::<usize>())
        })
        .unwrap();
        assert_eq!(sums.iter().sum::<usize>(), 45);
        assert_eq!(states, vec![4, 3, 3]);
        let err = timed_parallel(10, &mut [(), ()], |r, ()| {
            if r.start == 0 {
                Err("first")
            } else {
                Ok(())
            }
        });
        assert_eq!(err.unwrap_err(), "first");
    }

    #[test]
    fn mismatches_keep_the_lowest_page() {
        let mut a = Mismatches::default();
        a.note(9);
        a.note(4);
        let mut b = Mismatches::default();
        b.note(2);
        assert_eq!(
            Mismatches::sum([a, Mismatches::default(), b]),
            Mismatches {
                count: 3,
                first: Some(2)
            }
        );
    }

    #[test]
    fn percentiles_pick_ranks() {
        let l = Latency::of_ns((1..=1000).map(|i| i * 1000).collect());
        assert_eq!(l.samples, 1000);
        assert_eq!(l.p50_us, 500.0);
        assert_eq!(l.p99_us, 990.0);
        assert_eq!(l.p999_us, 999.0);
        assert_eq!(Latency::of_ns(Vec::new()).p50_us, 0.0);
    }
}
