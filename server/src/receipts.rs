//! What devices do with messages, counted per message: handed to a connection
//! (`delivered`) and acknowledged (`acked`). Counted in memory by the process holding the
//! connections and added to the store every [`FLUSH`], the counts of many messages in one
//! store write (see the stores): a broadcast to a million devices costs each node a few
//! writes, not a million, and unicast a small share of a write per push.
//!
//! Bounded: at most [`MAX_PENDING`] messages wait for a flush; counts for further messages
//! are left out until the next flush and counted in `pigeon_receipts_dropped_total`. A
//! process that dies loses the counts of its last quarter second.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ReceiptKind;
use crate::log_throttle::Throttle;
use crate::message::{Class, Message, unix_millis};
use crate::metrics::Histogram;
use crate::stats::Stats;
use crate::store::{ReceiptCount, StatsCounts, Store};
use crate::webhooks::Webhooks;

/// Messages whose counts wait for a flush, at most.
pub const MAX_PENDING: usize = 100_000;
/// Opened reports (a device and a message each) waiting for a flush, at most: a device
/// sending them by the thousand cannot crowd out the delivery and ack counts.
pub const MAX_OPENED: usize = 10_000;
/// How often counts are added to the store.
pub const FLUSH: Duration = Duration::from_millis(250);
/// Statistics are added to the store every this many flushes.
const STATS_EVERY: u64 = 4;

/// Upper bounds (seconds) of the delivery-latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0, 86400.0,
];

/// The task adding a process's counts to the store ([`Receipts::start`]).
pub struct Flushing {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Flushing {
    /// Stops it, and waits up to `within` for its last flush.
    pub async fn stop(self, within: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!("the receipts' last flush did not end in time; its counts are lost");
        }
    }
}

/// The counts of one process's connections since the last flush.
pub struct Receipts {
    /// App -> message id -> (delivered, acked).
    pending: Mutex<Pending>,
    dropped: AtomicU64,
    /// From a message's acceptance to a device's ack of it.
    latency: Histogram,
    /// The apps' receipt callbacks, handed each event.
    webhooks: Webhooks,
    /// Deliveries, acks and opens per app and class, for the statistics.
    stats: Stats,
}

#[derive(Default)]
struct Pending {
    apps: HashMap<Arc<str>, HashMap<String, Counts>>,
    /// Messages held.
    messages: usize,
    /// Opened reports held.
    opened: usize,
    /// Per app and class (in [`Class::ALL`] order), since the process started:
    /// deliveries, acks, devices that opened a message first, and devices a push skipped
    /// when they read it from the store (for `/metrics`; not taken by a flush).
    totals: HashMap<Arc<str>, [[u64; KINDS]; 3]>,
}

/// The kinds of [`Pending::totals`], in their order.
const KINDS: usize = 4;
/// Where a device read a push from the store and skipped it, in [`Pending::totals`].
const SKIPPED: usize = 3;

impl Pending {
    fn total(&mut self, app: &str, class: Class, kind: usize, add: u64) {
        let Some(class) = Class::ALL.iter().position(|c| *c == class) else {
            return;
        };
        if !self.totals.contains_key(app) {
            self.totals.insert(Arc::from(app), [[0; KINDS]; 3]);
        }
        if let Some(totals) = self.totals.get_mut(app) {
            totals[class][kind] += add;
        }
    }
}

#[derive(Default)]
struct Counts {
    delivered: u64,
    acked: u64,
    /// Each device once.
    opened_by: HashSet<String>,
}

impl Default for Receipts {
    fn default() -> Self {
        Self::new(Webhooks::default())
    }
}

impl Receipts {
    /// Counts that also hand each event to the apps' `webhooks`.
    pub fn new(webhooks: Webhooks) -> Self {
        Self {
            pending: Mutex::default(),
            dropped: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BUCKETS),
            webhooks,
            stats: Stats::default(),
        }
    }

    /// The apps' receipt callbacks.
    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }

    /// Counts `messages` of `app` handed to the connection of the device `token`.
    pub fn delivered<'a>(
        &self,
        app: &str,
        token: &str,
        messages: impl IntoIterator<Item = &'a Message> + Clone,
    ) {
        let ids = messages
            .clone()
            .into_iter()
            .map(|message| message.id.as_str());
        self.webhooks
            .record(app, ReceiptKind::Delivered, token, ids);
        self.count(app, messages, (1, 0));
    }

    /// Counts `messages` of `app` acknowledged by the device `token` (`direct`: pushes
    /// recorded for the device, not of a shared stream), and how long after their
    /// acceptance they were.
    pub fn acked(&self, app: &str, token: &str, messages: &[Arc<Message>], direct: bool) {
        let ids = messages.iter().map(|message| message.id.as_str());
        self.webhooks.record(app, ReceiptKind::Acked, token, ids);
        let now_ms = crate::message::unix_millis();
        for message in messages {
            let ms = now_ms.saturating_sub(message.accepted_at_ms);
            self.latency.observe(ms as f64 / 1000.0);
            if direct {
                // It will not expire for this device.
                self.stats.add_expiring(app, message, -1);
            }
        }
        self.count(app, messages.iter().map(|message| &**message), (0, 1));
    }

    /// Counts `messages` of `app` that a device read from the store (the stream `all`)
    /// and skipped: its user opted out of them, or had its frequency cap. Only counted
    /// here, for `/metrics`: the devices connected when a push was accepted that it skipped
    /// are counted then, by the process that accepted it.
    pub fn skipped(&self, app: &str, messages: &[Arc<Message>]) {
        if messages.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            pending.total(app, message.class, SKIPPED, 1);
        }
    }

    /// Per app and class, the devices that read a push from the store and skipped it
    /// (see [`Receipts::skipped`]), where there are any.
    pub fn skipped_totals(&self) -> Vec<(String, Class, u64)> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut totals = Vec::new();
        for (app, classes) in &pending.totals {
            for (class, kinds) in Class::ALL.into_iter().zip(classes) {
                if kinds[SKIPPED] > 0 {
                    totals.push((app.to_string(), class, kinds[SKIPPED]));
                }
            }
        }
        totals
    }

    /// Counts `message` of `app` opened on the device `token` (once per device: the store
    /// keeps which devices did).
    pub fn opened(&self, app: &str, token: &str, message: String) {
        self.webhooks
            .record(app, ReceiptKind::Opened, token, [message.as_str()]);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Pending {
            apps,
            messages,
            opened,
            ..
        } = &mut *pending;
        if *opened >= MAX_OPENED || *messages >= MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let counts = apps.entry(Arc::from(app)).or_default();
        let entry = counts.entry(message).or_insert_with(|| {
            *messages += 1;
            Counts::default()
        });
        if entry.opened_by.insert(token.to_owned()) {
            *opened += 1;
        }
    }

    fn count<'a>(
        &self,
        app: &str,
        sent: impl IntoIterator<Item = &'a Message>,
        (d, a): (u64, u64),
    ) {
        let mut sent = sent.into_iter().peekable();
        if sent.peek().is_none() {
            return;
        }
        // Per class (in `Class::ALL` order), for the statistics and the metrics (those left
        // out of a full flush too).
        let mut classes = [0u64; 3];
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Pending { apps, messages, .. } = &mut *pending;
        if !apps.contains_key(app) {
            apps.insert(Arc::from(app), HashMap::new());
        }
        let Some(counts) = apps.get_mut(app) else {
            return;
        };
        for message in sent {
            if let Some(index) = Class::ALL.iter().position(|c| *c == message.class) {
                classes[index] += 1;
            }
            let id = message.id.as_str();
            let entry = match counts.get_mut(id) {
                Some(entry) => entry,
                None if *messages >= MAX_PENDING => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                None => {
                    *messages += 1;
                    counts.entry(id.to_owned()).or_default()
                }
            };
            entry.delivered += d;
            entry.acked += a;
        }
        for (class, n) in Class::ALL.into_iter().zip(classes) {
            pending.total(app, class, 0, d * n);
            pending.total(app, class, 1, a * n);
        }
        drop(pending);
        for (class, n) in Class::ALL.into_iter().zip(classes) {
            let counts = StatsCounts {
                delivered: d * n,
                acked: a * n,
                ..StatsCounts::default()
            };
            self.stats.add(app, class, counts);
        }
    }

    /// Per app and class, the deliveries, acks and first opens this process counted, in
    /// Prometheus's text format.
    pub fn render_totals(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "pigeon_app_receipts_total";
        let _ = writeln!(
            out,
            "# HELP {name} Pushes handed to connections, acks, and devices that opened a \
             message (first reports), per app and class.\n\
             # TYPE {name} counter"
        );
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut apps: Vec<_> = pending.totals.iter().collect();
        apps.sort();
        for (app, totals) in apps {
            for (class, totals) in Class::ALL.iter().zip(totals) {
                let class = class.name();
                let kinds = ["delivered", "acked", "opened"];
                for (kind, value) in kinds.iter().zip(&totals[..kinds.len()]) {
                    let _ = writeln!(
                        out,
                        "{name}{{app=\"{app}\",class=\"{class}\",kind=\"{kind}\"}} {value}"
                    );
                }
            }
        }
    }

    /// Counts left out because too many messages waited for a flush.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The delivery-latency histogram in Prometheus's text format.
    pub fn render_latency(&self, out: &mut String) {
        let name = "pigeon_delivery_latency_seconds";
        Histogram::header(
            out,
            name,
            "From a push's acceptance to a device's ack of it, for the acks this process's \
             connections got.",
        );
        self.latency.render(out, name, "");
    }

    /// Takes the counts waiting for a flush.
    pub fn take(&self) -> Vec<ReceiptCount> {
        let apps = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.messages = 0;
            pending.opened = 0;
            std::mem::take(&mut pending.apps)
        };
        apps.into_iter()
            .flat_map(|(app, counts)| {
                counts.into_iter().map(move |(id, counts)| ReceiptCount {
                    app: app.to_string(),
                    id,
                    delivered: counts.delivered,
                    acked: counts.acked,
                    opened_by: counts.opened_by.into_iter().collect(),
                    ..ReceiptCount::default()
                })
            })
            .collect()
    }

    /// Starts [`Receipts::run`] with a stop of its own: a process stops it after its drain,
    /// so that its last flush counts the acks of the drain too.
    pub fn start(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        retentions: (Duration, Duration),
    ) -> Flushing {
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.run(store, retentions, stop.clone()));
        Flushing { task, stop }
    }

    /// Adds the counts to the store every [`FLUSH`], and once more at `shutdown`; they are
    /// kept for `retention`. A batch the store failed (Redis timed out: it may have done
    /// part of it) is given again at the next flush under its id, and the store adds none
    /// of it twice; meanwhile new counts wait (up to [`MAX_PENDING`] messages). A batch
    /// that fails at shutdown is lost (logged).
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        (retention, stats_retention): (Duration, Duration),
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(FLUSH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flushes = 0u64;
        // A batch the store failed, given again (under its id) before any other.
        let mut failed: Option<(String, Vec<ReceiptCount>)> = None;
        let process = rand::random::<u64>();
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                () = shutdown.cancelled() => true,
            };
            flushes += 1;
            let batch = failed.take().or_else(|| {
                let counts = self.take();
                (!counts.is_empty()).then(|| (format!("{process:016x}-{flushes}"), counts))
            });
            if let Some((id, counts)) = batch {
                let keep_until = unix_millis().saturating_add(retention.as_millis() as u64);
                match store.count_receipts(&counts, keep_until, &id).await {
                    Ok(opened) => {
                        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                        for opened in &opened {
                            pending.total(&opened.app, opened.class, 2, opened.devices);
                        }
                        drop(pending);
                        for opened in opened {
                            let counts = StatsCounts {
                                opened: opened.devices,
                                ..StatsCounts::default()
                            };
                            self.stats.add(&opened.app, opened.class, counts);
                        }
                    }
                    Err(error) => {
                        static THROTTLE: Throttle = Throttle::new();
                        if let Some(suppressed) = THROTTLE.allow() {
                            tracing::warn!(%error, suppressed, "adding receipt counts failed; given again at the next flush");
                        }
                        failed = Some((id, counts));
                    }
                }
            }
            // The statistics once a second: they are by the minute.
            if stopping || flushes.is_multiple_of(STATS_EVERY) {
                self.stats.flush(store.as_ref(), stats_retention).await;
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str) -> Arc<Message> {
        Arc::new(Message {
            pace_ms: 0,
            id: id.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            priority: Default::default(),
            class: Default::default(),
            accepted_at_ms: 0,
            expires_at_ms: 0,
            collapse_key: String::new(),
            filter: None,
        })
    }

    #[test]
    fn counts_sum_per_message_and_are_taken_once() {
        let receipts = Receipts::default();
        let (m1, m2) = (message("m1"), message("m2"));
        let m2 = Arc::new(Message {
            class: Class::Marketing,
            ..(*m2).clone()
        });
        receipts.delivered("a", "t1", [&*m1, &*m2, &*m1]);
        receipts.acked("a", "t1", std::slice::from_ref(&m1), true);
        receipts.delivered("b", "t1", [&*m1]);
        let mut taken = receipts.take();
        taken.sort_by(|x, y| (&x.app, &x.id).cmp(&(&y.app, &y.id)));
        let summary: Vec<_> = taken
            .iter()
            .map(|c| (c.app.as_str(), c.id.as_str(), c.delivered, c.acked))
            .collect();
        assert_eq!(
            summary,
            [("a", "m1", 2, 1), ("a", "m2", 1, 0), ("b", "m1", 1, 0)]
        );
        // The same, per app and class, for the statistics.
        let mut stats = receipts.stats.take();
        stats.sort_by_key(|row| (row.app.clone(), row.class));
        let stats: Vec<_> = stats
            .iter()
            .map(|r| (r.app.as_str(), r.class, r.counts.delivered, r.counts.acked))
            .collect();
        assert_eq!(
            stats,
            [
                ("a", Class::Notification, 2, 1),
                ("a", Class::Marketing, 1, 0),
                ("b", Class::Notification, 1, 0)
            ]
        );
        assert!(receipts.take().is_empty());
        receipts.opened("a", "t1", "m1".into());
        receipts.opened("a", "t2", "m1".into());
        let taken = receipts.take();
        assert_eq!(taken.len(), 1);
        let mut opened_by = taken[0].opened_by.clone();
        opened_by.sort();
        assert_eq!(opened_by, ["t1", "t2"]);
        assert_eq!((taken[0].delivered, taken[0].acked), (0, 0));
    }

    #[test]
    fn acks_are_timed_from_acceptance() {
        let receipts = Receipts::default();
        let now = crate::message::unix_millis();
        let recent = Arc::new(Message {
            accepted_at_ms: now - 30,
            ..(*message("m1")).clone()
        });
        let old = Arc::new(Message {
            accepted_at_ms: now - 3_600_000 * 48,
            ..(*message("m2")).clone()
        });
        receipts.acked("a", "t1", &[recent, old], true);
        let mut out = String::new();
        receipts.render_latency(&mut out);
        let line = |prefix: &str| {
            out.lines()
                .find(|line| line.starts_with(prefix))
                .and_then(|line| line.rsplit(' ').next())
                .map(str::to_owned)
        };
        for (series, count) in [
            ("pigeon_delivery_latency_seconds_bucket{le=\"0.025\"}", "0"),
            ("pigeon_delivery_latency_seconds_bucket{le=\"0.05\"}", "1"),
            ("pigeon_delivery_latency_seconds_bucket{le=\"86400\"}", "1"),
            ("pigeon_delivery_latency_seconds_bucket{le=\"+Inf\"}", "2"),
            ("pigeon_delivery_latency_seconds_count", "2"),
        ] {
            assert_eq!(line(series).as_deref(), Some(count), "{series}");
        }
    }

    #[test]
    fn messages_past_the_bound_are_left_out_and_counted() {
        let receipts = Receipts::default();
        let messages: Vec<Arc<Message>> = (0..MAX_PENDING + 5)
            .map(|i| message(&i.to_string()))
            .collect();
        receipts.delivered("a", "t1", messages.iter().map(|m| &**m));
        // A message already waiting is still counted.
        receipts.delivered("a", "t1", [&*messages[0]]);
        assert_eq!(receipts.dropped(), 5);
        let taken = receipts.take();
        assert_eq!(taken.len(), MAX_PENDING);
        assert_eq!(
            taken.iter().map(|c| c.delivered).sum::<u64>(),
            MAX_PENDING as u64 + 1
        );
    }
}
