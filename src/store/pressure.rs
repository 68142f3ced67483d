//! The signal from putting threads to the background writer: "RAM is within
//! the headroom of its limit".
//!
//! Puts only read a flag until they are the one that raises it, so a store
//! under pressure costs each put one relaxed load; the raiser takes the lock
//! to notify, which closes the window where the writer has checked the flag
//! but is not yet waiting.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub struct Pressure {
    raised: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Pressure {
    /// Wakes the writer, unless the flag is up already.
    pub fn raise(&self) {
        if self.raised.load(Ordering::Relaxed) || self.raised.swap(true, Ordering::AcqRel) {
            return;
        }
        let _guard = self.lock.lock();
        self.cv.notify_one();
    }

    /// Waits until raised or `timeout` passes, and lowers the flag.
    /// Returns whether it was raised.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut guard = self.lock.lock();
        if !self.raised.load(Ordering::Acquire) {
            self.cv.wait_for(&mut guard, timeout);
        }
        self.raised.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, thread, time::Instant};

    use super::*;

    #[test]
    fn a_raise_wakes_the_waiter_and_is_consumed() {
        let p = Arc::new(Pressure::default());
        assert!(!p.wait(Duration::ZERO));
        p.raise();
        p.raise();
        assert!(p.wait(Duration::from_secs(10)), "raised before the wait");
        assert!(!p.wait(Duration::ZERO), "one wake per raise");

        let waiter = {
            let p = p.clone();
            thread::spawn(move || {
                let start = Instant::now();
                (p.wait(Duration::from_secs(30)), start.elapsed())
            })
        };
        thread::sleep(Duration::from_millis(50));
        p.raise();
        let (raised, waited) = waiter.join().unwrap();
        assert!(raised);
        assert!(waited < Duration::from_secs(30), "woken, not timed out");
    }
}
