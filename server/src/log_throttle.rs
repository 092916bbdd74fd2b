//! At most one log line a second from a call site that fails once per device.
//!
//! When Redis stalls, every device admitted or leaving in that moment fails the same way:
//! a node of 15,000 connections would write 15,000 identical warnings. A [`Throttle`] lets
//! one line through per second and counts the rest, which the next line reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One call site's throttle; a `static` beside the log line.
#[derive(Debug)]
pub struct Throttle {
    /// Second (Unix time) of the last line let through.
    last_second: AtomicU64,
    /// Lines held back since then.
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle that has let nothing through yet.
    pub const fn new() -> Self {
        Self {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now; when so, how many lines were held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let last = self.last_second.load(Ordering::Relaxed);
        if second > last
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_line_a_second_through_and_counts_the_rest() {
        let throttle = Throttle::new();
        assert_eq!(throttle.allow_at(100), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.allow_at(100), None);
        }
        assert_eq!(throttle.allow_at(101), Some(5));
        assert_eq!(throttle.allow_at(101), None);
        assert_eq!(throttle.allow_at(105), Some(1));
    }
}
