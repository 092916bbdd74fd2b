//! Counters and gauges, exposed in the Prometheus text format at `GET /metrics`.
//!
//! Plain atomics: a handful of numbers do not need a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::push::TargetCounts;

/// The process's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pushes_accepted: AtomicU64,
    pushes_duplicate: AtomicU64,
    pushes_failed: AtomicU64,
    targets_delivered: AtomicU64,
    targets_stored: AtomicU64,
    targets_unknown: AtomicU64,
    targets_dropped: AtomicU64,
}

impl Metrics {
    /// Counts an accepted push and its targets.
    pub fn push_accepted(&self, targets: &TargetCounts) {
        self.pushes_accepted.fetch_add(1, Ordering::Relaxed);
        for (counter, value) in [
            (&self.targets_delivered, targets.delivered),
            (&self.targets_stored, targets.stored),
            (&self.targets_unknown, targets.unknown),
            (&self.targets_dropped, targets.dropped),
        ] {
            counter.fetch_add(u64::from(value), Ordering::Relaxed);
        }
    }

    /// Counts a push answered as a duplicate of an earlier idempotency key.
    pub fn push_duplicate(&self) {
        self.pushes_duplicate.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a push that could not be accepted (store overloaded or failed).
    pub fn push_failed(&self) {
        self.pushes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format, with the live connection count and how
    /// many of those connections are parked (waiting without a task).
    pub fn render(&self, connections: usize, parked: usize) -> String {
        let mut out = String::new();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP pigeon_connections Live device connections.\n\
             # TYPE pigeon_connections gauge\n\
             pigeon_connections {connections}\n\
             # HELP pigeon_parked_connections Live connections idle in the parking lot, without a task.\n\
             # TYPE pigeon_parked_connections gauge\n\
             pigeon_parked_connections {parked}"
        );
        let _ = writeln!(
            out,
            "# HELP pigeon_pushes_total Push requests, by result.\n\
             # TYPE pigeon_pushes_total counter\n\
             pigeon_pushes_total{{result=\"accepted\"}} {}\n\
             pigeon_pushes_total{{result=\"duplicate\"}} {}\n\
             pigeon_pushes_total{{result=\"failed\"}} {}",
            load(&self.pushes_accepted),
            load(&self.pushes_duplicate),
            load(&self.pushes_failed),
        );
        let _ = writeln!(
            out,
            "# HELP pigeon_push_targets_total Targets of accepted pushes, by state.\n\
             # TYPE pigeon_push_targets_total counter\n\
             pigeon_push_targets_total{{state=\"delivered\"}} {}\n\
             pigeon_push_targets_total{{state=\"stored\"}} {}\n\
             pigeon_push_targets_total{{state=\"unknown\"}} {}\n\
             pigeon_push_targets_total{{state=\"dropped\"}} {}",
            load(&self.targets_delivered),
            load(&self.targets_stored),
            load(&self.targets_unknown),
            load(&self.targets_dropped),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let metrics = Metrics::default();
        metrics.push_accepted(&TargetCounts {
            delivered: 2,
            stored: 1,
            unknown: 0,
            dropped: 0,
        });
        metrics.push_duplicate();
        let text = metrics.render(7, 5);
        assert!(text.contains("pigeon_connections 7\n"), "{text}");
        assert!(text.contains("pigeon_parked_connections 5\n"), "{text}");
        assert!(
            text.contains("pigeon_pushes_total{result=\"accepted\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pigeon_pushes_total{result=\"duplicate\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pigeon_push_targets_total{state=\"delivered\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("pigeon_push_targets_total{state=\"stored\"} 1\n"),
            "{text}"
        );
    }
}
