//! Per-app statistics by minute and class (`GET /v1/stats`): counted in memory where they
//! happen (pushes and targets where the pipeline accepts them, deliveries, acks and opens
//! where the connections are) and added to the store together, every [`FLUSH`]: a process
//! costs the store one write per flush (in Redis, one pipeline per app and hour), however
//! many pushes and devices it counted. Every gateway and node adds to the same counts, so
//! any gateway answers the same series.
//!
//! Bounded: one entry per app, class and minute since the last flush (the apps are the
//! configured ones). A flush the store fails is given again at the next one under its name
//! (the store adds none of it twice), new counts waiting meanwhile. A process that dies
//! loses its last second's counts, and a flush that failed at its shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::log_throttle::Throttle;
use crate::message::{Class, unix_millis};
use crate::store::{StatsCounts, StatsRow, Store};

/// How often the counts are added to the store.
pub const FLUSH: Duration = Duration::from_secs(1);

/// This process's part of the names of its flushes.
static PROCESS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(rand::random);

/// Counts since the last flush.
#[derive(Default)]
pub struct Stats {
    /// App -> (class, minute) -> counts.
    pending: Mutex<HashMap<Arc<str>, Minutes>>,
    /// A flush the store failed, given again (under its name) before any other.
    failed: tokio::sync::Mutex<Option<(String, Vec<StatsRow>)>>,
    /// Flushes made, for their names.
    flushes: std::sync::atomic::AtomicU64,
}

/// One app's counts by class and minute.
type Minutes = HashMap<(Class, u64), StatsCounts>;

impl Stats {
    /// Adds `counts` to `app`'s of `class` in the current minute.
    pub fn add(&self, app: &str, class: Class, counts: StatsCounts) {
        self.add_at(app, class, unix_millis() / 60_000, counts);
    }

    /// Adds `n` to the devices `app`'s direct messages of `class` that expire at
    /// `expires_at_ms` will have expired for (a negative `n` takes devices off). Nothing for
    /// a message that is never stored (TTL 0) or has expired by now.
    pub fn add_expiring(&self, app: &str, message: &crate::message::Message, n: i64) {
        let now_ms = unix_millis();
        if message.expires_at_ms <= message.accepted_at_ms || message.expires_at_ms <= now_ms {
            return;
        }
        let counts = StatsCounts {
            expiring: n,
            ..StatsCounts::default()
        };
        self.add_at(app, message.class, message.expires_at_ms / 60_000, counts);
    }

    /// Adds `counts` to `app`'s of `class` in `minute`.
    fn add_at(&self, app: &str, class: Class, minute: u64, counts: StatsCounts) {
        if counts.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // The app's entry is found without allocating; only its first count adds one.
        if !pending.contains_key(app) {
            pending.insert(Arc::from(app), HashMap::new());
        }
        if let Some(minutes) = pending.get_mut(app) {
            minutes.entry((class, minute)).or_default().add(counts);
        }
    }

    /// Takes the counts since the last call.
    pub fn take(&self) -> Vec<StatsRow> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending
            .into_iter()
            .flat_map(|(app, minutes)| {
                minutes
                    .into_iter()
                    .map(move |((class, minute), counts)| StatsRow {
                        app: app.to_string(),
                        minute,
                        class,
                        counts,
                    })
            })
            .collect()
    }

    /// Adds the counts since the last flush to `store`, kept for `retention`. When the
    /// store fails, the batch is given again at the next flush, under its name.
    pub async fn flush(&self, store: &dyn Store, retention: Duration) {
        let mut failed = self.failed.lock().await;
        let batch = failed.take().or_else(|| {
            let rows = self.take();
            let flush = self
                .flushes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (!rows.is_empty()).then(|| (format!("{:016x}-{flush}", *PROCESS), rows))
        });
        let Some((name, rows)) = batch else {
            return;
        };
        if let Err(error) = store.add_stats(rows.clone(), retention, &name).await {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, suppressed, "adding statistics failed; given again at the next flush");
            }
            *failed = Some((name, rows));
        }
    }

    /// Counts flushed to `store` every [`FLUSH`] while they are referenced (the last
    /// second's are lost with them).
    pub fn start(store: Arc<dyn Store>, retention: Duration) -> Arc<Self> {
        let stats = Arc::new(Self::default());
        let weak: Weak<Self> = Arc::downgrade(&stats);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(FLUSH);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(stats) = weak.upgrade() else { return };
                stats.flush(store.as_ref(), retention).await;
            }
        });
        stats
    }
}

/// Points a series has at most.
pub const MAX_POINTS: u64 = 1440;

/// One point of a series: the counts of each class (in [`Class::ALL`] order) in the
/// minutes from `minute` for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// Its first minute (Unix seconds / 60).
    pub minute: u64,
    /// The counts per class.
    pub classes: [StatsCounts; 3],
}

/// `app`'s counts in the minutes `from..to`, a point per `step` minutes from `from` (the
/// last point may cover fewer minutes); points without counts are there, with zeros. Only
/// the minutes of the last `retention` up to now are read: there are no others. `expiring`
/// is that of the minutes that are past (the devices messages expired for), at least 0.
pub async fn series(
    store: &dyn Store,
    app: &str,
    (from, to): (u64, u64),
    step: u64,
    retention: Duration,
) -> Result<Vec<Point>, crate::store::StoreError> {
    let step = step.max(1);
    let mut points: Vec<Point> = (from..to)
        .step_by(step as usize)
        .map(|minute| Point {
            minute,
            ..Point::default()
        })
        .collect();
    let now = unix_millis() / 60_000;
    let oldest = now.saturating_sub(retention.as_secs() / 60);
    let (read_from, read_to) = (from.max(oldest), to.min(now + 1));
    if read_from >= read_to {
        return Ok(points);
    }
    for row in store.stats(app, read_from, read_to).await? {
        let Some(point) = points.get_mut(((row.minute.saturating_sub(from)) / step) as usize)
        else {
            continue;
        };
        let mut counts = row.counts;
        if row.minute >= now {
            counts.expiring = 0;
        }
        if let Some(index) = Class::ALL.iter().position(|class| *class == row.class) {
            point.classes[index].add(counts);
        }
    }
    for point in &mut points {
        for counts in &mut point.classes {
            counts.expiring = counts.expiring.max(0);
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_app_class_and_minute() {
        let stats = Stats::default();
        let pushes = |n| StatsCounts {
            pushes: n,
            targets: 2 * n,
            ..StatsCounts::default()
        };
        stats.add("a", Class::Notification, pushes(1));
        stats.add("a", Class::Notification, pushes(2));
        stats.add("a", Class::Marketing, pushes(1));
        stats.add("b", Class::Notification, StatsCounts::default());
        let mut rows = stats.take();
        rows.sort_by_key(|row| (row.app.clone(), row.class));
        let summary: Vec<_> = rows
            .iter()
            .map(|row| {
                (
                    row.app.as_str(),
                    row.class,
                    row.counts.pushes,
                    row.counts.targets,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", Class::Notification, 3, 6),
                ("a", Class::Marketing, 1, 2)
            ]
        );
        assert!(stats.take().is_empty());
    }
}
