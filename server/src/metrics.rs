//! Counters and gauges, exposed in the Prometheus text format at `GET /metrics`.
//!
//! Plain atomics, and a small map for the counters per app and class (whose apps are the
//! configured ones): a handful of numbers do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::connections::ConnectionTable;
use crate::device::Handshakes;
use crate::push::Class;

/// What became of one app's pushes of one class.
#[derive(Clone, Copy, Debug, Default)]
struct AppCounts {
    accepted: u64,
    scheduled: u64,
    duplicate: u64,
    failed: u64,
    limited: u64,
    shed: u64,
    delivered: u64,
    stored: u64,
    unknown: u64,
    dropped: u64,
    skipped: u64,
}

/// The process's metrics.
#[derive(Default)]
pub struct Metrics {
    /// The connections of a process that holds devices (standalone, node), live and being
    /// set up, for the connection gauges.
    devices: Option<(Arc<ConnectionTable>, Arc<Handshakes>)>,
    pushes_accepted: AtomicU64,
    pushes_duplicate: AtomicU64,
    pushes_failed: AtomicU64,
    targets_delivered: AtomicU64,
    targets_stored: AtomicU64,
    targets_unknown: AtomicU64,
    targets_dropped: AtomicU64,
    /// Per app, per class (in [`Class::ALL`] order) once it has pushed any.
    per_app: Mutex<BTreeMap<String, [Option<AppCounts>; 3]>>,
    intake: std::sync::OnceLock<Arc<crate::intake::Intake>>,
    receipts: std::sync::OnceLock<Arc<crate::receipts::Receipts>>,
    /// The nodes a gateway calls.
    peers: std::sync::OnceLock<Arc<crate::cluster::peers::Peers>>,
    /// Whether the process's store is Redis (whose call latency is shown).
    redis: std::sync::atomic::AtomicBool,
    /// The embedded store of a standalone process.
    embedded: std::sync::OnceLock<crate::store::embedded::EmbeddedStore>,
    /// Deliveries a node refused for want of a place, per app and class.
    deliveries_shed: Mutex<BTreeMap<(String, Class), u64>>,
}

impl Metrics {
    /// The metrics of a process that holds the devices of `connections`, set up through
    /// `handshakes`.
    pub fn with_devices(connections: Arc<ConnectionTable>, handshakes: Arc<Handshakes>) -> Self {
        Self {
            devices: Some((connections, handshakes)),
            ..Self::default()
        }
    }

    fn count(&self, app: &str, class: Class, add: impl FnOnce(&mut AppCounts)) {
        let Ok(mut per_app) = self.per_app.lock() else {
            return;
        };
        // The app's entry is found without allocating; only its first push adds one.
        if !per_app.contains_key(app) {
            per_app.insert(app.to_owned(), Default::default());
        }
        if let Some(classes) = per_app.get_mut(app) {
            add(classes[class as usize].get_or_insert_with(AppCounts::default));
        }
    }

    /// Counts an accepted push of `app` and `class`, and how many of its targets were
    /// delivered live, stored, unknown and dropped.
    pub fn push_accepted(&self, app: &str, class: Class, targets: &crate::push::TargetCounts) {
        self.pushes_accepted.fetch_add(1, Ordering::Relaxed);
        for (counter, value) in [
            (&self.targets_delivered, targets.delivered),
            (&self.targets_stored, targets.stored),
            (&self.targets_unknown, targets.unknown),
            (&self.targets_dropped, targets.dropped),
        ] {
            counter.fetch_add(u64::from(value), Ordering::Relaxed);
        }
        self.count(app, class, |counts| {
            counts.accepted += 1;
            counts.delivered += u64::from(targets.delivered);
            counts.stored += u64::from(targets.stored);
            counts.unknown += u64::from(targets.unknown);
            counts.dropped += u64::from(targets.dropped);
            counts.skipped += u64::from(targets.skipped);
        });
    }

    /// Counts a push answered as a duplicate of an earlier idempotency key.
    pub fn push_duplicate(&self, app: &str, class: Class) {
        self.pushes_duplicate.fetch_add(1, Ordering::Relaxed);
        self.count(app, class, |counts| counts.duplicate += 1);
    }

    /// Counts a push that could not be accepted (store overloaded or failed).
    pub fn push_failed(&self, app: &str, class: Class) {
        self.pushes_failed.fetch_add(1, Ordering::Relaxed);
        self.count(app, class, |counts| counts.failed += 1);
    }

    /// Counts a push kept to be sent later.
    pub fn push_scheduled(&self, app: &str, class: Class) {
        self.count(app, class, |counts| counts.scheduled += 1);
    }

    /// Shows how many pushes wait in `intake`.
    pub fn watch_intake(&self, intake: Arc<crate::intake::Intake>) {
        let _ = self.intake.set(intake);
    }

    /// Shows the latency of Deliver calls to the nodes `peers` calls, and their breakers.
    pub fn watch_peers(&self, peers: Arc<crate::cluster::peers::Peers>) {
        let _ = self.peers.set(peers);
    }

    /// Shows the embedded store's queue and transactions.
    pub fn watch_embedded(&self, store: crate::store::embedded::EmbeddedStore) {
        let _ = self.embedded.set(store);
    }

    /// Shows the latency of calls to Redis.
    pub fn watch_redis(&self) {
        self.redis.store(true, Ordering::Relaxed);
    }

    /// Shows the receipt counts `receipts` left out.
    pub fn watch_receipts(&self, receipts: Arc<crate::receipts::Receipts>) {
        let _ = self.receipts.set(receipts);
    }

    /// Counts a push refused because its queue was full or it waited too long.
    pub fn push_shed(&self, app: &str, class: Class) {
        self.count(app, class, |counts| counts.shed += 1);
    }

    /// Counts a Deliver or DeliverShared call a node refused for want of a place.
    pub fn delivery_shed(&self, app: &str, class: Class) {
        if let Ok(mut shed) = self.deliveries_shed.lock() {
            *shed.entry((app.to_owned(), class)).or_default() += 1;
        }
    }

    /// Counts a push refused by a rate limit.
    pub fn push_limited(&self, app: &str, class: Class) {
        self.count(app, class, |counts| counts.limited += 1);
    }

    /// The metrics in the Prometheus text format; in a process that holds devices, with
    /// the live connection count and how many of those connections are parked (waiting
    /// without a task).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        if let Some((table, handshakes)) = &self.devices {
            let _ = writeln!(
                out,
                "# HELP pigeon_connections Live device connections.\n\
                 # TYPE pigeon_connections gauge\n\
                 pigeon_connections {}\n\
                 # HELP pigeon_parked_connections Live connections idle in the parking lot, without a task.\n\
                 # TYPE pigeon_parked_connections gauge\n\
                 pigeon_parked_connections {}\n\
                 # HELP pigeon_parked_served_total Pushes and frames of parked connections served in the parking lot, without a task.\n\
                 # TYPE pigeon_parked_served_total counter\n\
                 pigeon_parked_served_total {}\n\
                 # HELP pigeon_handshakes Device connections being set up (not past their Hello yet).\n\
                 # TYPE pigeon_handshakes gauge\n\
                 pigeon_handshakes {}\n\
                 # HELP pigeon_handshakes_evicted_total Handshakes closed to make room for newer ones (limits.max_handshakes).\n\
                 # TYPE pigeon_handshakes_evicted_total counter\n\
                 pigeon_handshakes_evicted_total {}\n\
                 # HELP pigeon_handshakes_waited_total New device sockets that waited in the listen backlog because every handshake place was taken by a younger handshake.\n\
                 # TYPE pigeon_handshakes_waited_total counter\n\
                 pigeon_handshakes_waited_total {}",
                table.connection_count(),
                table.parked_count(),
                table.served_parked(),
                handshakes.in_progress(),
                handshakes.evicted(),
                handshakes.waited(),
            );
        }
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
        if let Some(intake) = self.intake.get() {
            let _ = writeln!(
                out,
                "# HELP pigeon_push_queue Pushes waiting for a place in the pipeline.\n\
                 # TYPE pigeon_push_queue gauge\n\
                 pigeon_push_queue {}",
                intake.waiting()
            );
        }
        if let Some(receipts) = self.receipts.get() {
            let _ = writeln!(
                out,
                "# HELP pigeon_receipts_dropped_total Delivery and ack counts left out because \
                 too many messages waited for a flush.\n\
                 # TYPE pigeon_receipts_dropped_total counter\n\
                 pigeon_receipts_dropped_total {}",
                receipts.dropped()
            );
            receipts.render_latency(&mut out);
            receipts.render_totals(&mut out);
            receipts.webhooks().render(&mut out);
        }
        if let Some(peers) = self.peers.get() {
            peers.render(&mut out);
        }
        if self.redis.load(Ordering::Relaxed) {
            let name = "pigeon_redis_call_seconds";
            Histogram::header(
                &mut out,
                name,
                "Calls to Redis (a command, a pipeline or a script: one round trip), from \
                 the call to the answer.",
            );
            crate::store::redis::CALL_LATENCY.render(&mut out, name, "");
            crate::store::redis::render_cache(&mut out);
        }
        if let Some(store) = self.embedded.get() {
            store.render_metrics(&mut out);
        }
        crate::status_writer::render(&mut out);
        crate::device_expiry::render(&mut out);
        if let Ok(shed) = self.deliveries_shed.lock()
            && !shed.is_empty()
        {
            out.push_str(
                "# HELP pigeon_node_deliveries_shed_total Deliver and DeliverShared calls a node \
                 refused (their queue full, or waited too long), per app and class: those \
                 devices read the message from the store.\n\
                 # TYPE pigeon_node_deliveries_shed_total counter\n",
            );
            for ((app, class), count) in shed.iter() {
                let _ = writeln!(
                    out,
                    "pigeon_node_deliveries_shed_total{{app=\"{app}\",class=\"{}\"}} {count}",
                    class.name()
                );
            }
        }
        if let Ok(per_app) = self.per_app.lock() {
            // Devices that read a push from the store and skipped it are counted where they
            // are connected (a node counts no pushes of its own).
            let mut per_app = per_app.clone();
            let skipped = self.receipts.get().map(|r| r.skipped_totals());
            for (app, class, count) in skipped.into_iter().flatten() {
                let classes = per_app.entry(app).or_default();
                classes[class as usize].get_or_insert_default().skipped += count;
            }
            out.push_str(
                "# HELP pigeon_app_pushes_total Push requests per app and class, by result.\n\
                 # TYPE pigeon_app_pushes_total counter\n",
            );
            for (app, class, counts) in seen(&per_app) {
                for (result, value) in [
                    ("accepted", counts.accepted),
                    ("scheduled", counts.scheduled),
                    ("duplicate", counts.duplicate),
                    ("failed", counts.failed),
                    ("limited", counts.limited),
                    ("shed", counts.shed),
                ] {
                    let _ = writeln!(
                        out,
                        "pigeon_app_pushes_total{{app=\"{app}\",class=\"{}\",result=\"{result}\"}} {value}",
                        class.name()
                    );
                }
            }
            out.push_str(
                "# HELP pigeon_app_push_targets_total Targets of accepted pushes per app and class, by state.\n\
                 # TYPE pigeon_app_push_targets_total counter\n",
            );
            for (app, class, counts) in seen(&per_app) {
                for (state, value) in [
                    ("delivered", counts.delivered),
                    ("stored", counts.stored),
                    ("unknown", counts.unknown),
                    ("dropped", counts.dropped),
                    ("skipped", counts.skipped),
                ] {
                    let _ = writeln!(
                        out,
                        "pigeon_app_push_targets_total{{app=\"{app}\",class=\"{}\",state=\"{state}\"}} {value}",
                        class.name()
                    );
                }
            }
        }
        out
    }
}

/// Each app and class that has pushed, with its counts.
fn seen(
    per_app: &BTreeMap<String, [Option<AppCounts>; 3]>,
) -> impl Iterator<Item = (&str, Class, &AppCounts)> {
    per_app.iter().flat_map(|(app, classes)| {
        Class::ALL
            .iter()
            .zip(classes)
            .filter_map(move |(class, counts)| Some((app.as_str(), *class, counts.as_ref()?)))
    })
}

/// Buckets a [`Histogram`] has at most (besides `+Inf`).
const MAX_BUCKETS: usize = 16;

/// Upper bounds (seconds) for the latency of a call inside the deployment (Redis, a node,
/// the embedded store's writer).
pub const CALL_SECONDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds for a count of things written at once.
pub const BATCH_SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A Prometheus histogram of plain atomics: observations counted per bucket of `bounds`
/// (at most [`MAX_BUCKETS`]; more are counted in `+Inf`), with their sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    /// The sum of the observations, in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// An empty histogram with the buckets `bounds` (ascending).
    pub const fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `value`.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .take(MAX_BUCKETS)
            .position(|bound| value <= *bound)
            .unwrap_or(MAX_BUCKETS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = (value.max(0.0) * 1_000_000.0) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Counts one duration, in seconds.
    pub fn observe_duration(&self, elapsed: std::time::Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    /// Writes the `# HELP` and `# TYPE` lines of histogram `name`.
    pub fn header(out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    }

    /// Writes this histogram's series of `name`, with the labels `labels` (`a="b",...`, or
    /// empty) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let past = self.bounds.len().min(MAX_BUCKETS);
        cumulative += self.buckets[past..]
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum::<u64>();
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1_000_000.0;
        let braces = |labels: &str| match labels.is_empty() {
            true => String::new(),
            false => format!("{{{labels}}}"),
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let connections = Arc::new(ConnectionTable::new(
            4,
            tokio_util::sync::CancellationToken::new(),
        ));
        for token in ["a", "b"] {
            connections.register(
                &Arc::from(token),
                "demo",
                crate::store::StreamHead::default(),
                &crate::store::DeviceTags::default(),
            );
        }
        let handshakes = Handshakes::new(4);
        let _pending = handshakes.enter(std::time::Instant::now());
        let metrics = Metrics::with_devices(connections, handshakes);
        let targets = crate::push::TargetCounts {
            delivered: 2,
            stored: 1,
            ..Default::default()
        };
        metrics.push_accepted("demo", Class::Marketing, &targets);
        metrics.push_duplicate("demo", Class::Notification);
        metrics.push_limited("demo", Class::Marketing);
        let text = metrics.render();
        // A process without devices (a gateway) has no connection gauges.
        assert!(!Metrics::default().render().contains("pigeon_connections"));
        assert!(text.contains("pigeon_connections 2\n"), "{text}");
        assert!(text.contains("pigeon_parked_connections 0\n"), "{text}");
        assert!(text.contains("pigeon_handshakes 1\n"), "{text}");
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
        for line in [
            "pigeon_app_pushes_total{app=\"demo\",class=\"marketing\",result=\"accepted\"} 1\n",
            "pigeon_app_pushes_total{app=\"demo\",class=\"marketing\",result=\"limited\"} 1\n",
            "pigeon_app_pushes_total{app=\"demo\",class=\"notification\",result=\"duplicate\"} 1\n",
            "pigeon_app_push_targets_total{app=\"demo\",class=\"marketing\",state=\"delivered\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
