//! The push pipeline, the one path every push takes, in standalone mode and on a gateway:
//!
//! 1. **resolve** the audience (uids, tokens, aliases) to known device tokens of the app;
//! 2. **record** the message for every target in the offline store, atomically with its
//!    idempotency key per device. From here on the message survives a crash. The store
//!    answers with each target's seq and, for a device connected at that moment, its route;
//! 3. **deliver** it to the targets' live connections, through a [`Fanout`]: the process's
//!    own connection table (standalone), or the nodes over gRPC (a gateway);
//! 4. **count** what became of each target, for the answer and for `/metrics`.
//!
//! A push to every device of the app (`all`) or to tags resolves nothing: it is **appended**
//! once to the app's shared stream (with a tag filter, for tags), then **delivered** with
//! one hand-off per process holding devices (each finds its own connections the entry is
//! for, through its tag index), and **counted** as the live hand-offs; every other device
//! reads it from the stream when it connects. The store work of such a push does not grow
//! with its audience.
//!
//! Before all this, a push is charged in its app's rate limits ([`crate::rate_limit`]);
//! one over a limit is refused whole, with when to try again. Then it waits for a place in
//! the pipeline ([`crate::intake`]): by lane (priority and class) and in turn with other
//! apps.
//!
//! The HTTP and gRPC APIs only translate requests and errors.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use pigeon_proto::Message as _;
use pigeon_proto::device::Priority;
use pigeon_proto::store::message_status::State;
use pigeon_proto::store::{MessageStatus, ScheduledPush};
use serde::Serialize;

use crate::config::{FrequencyCap, Limits};
use crate::connections::{ConnectionTable, Delivered, HandedOut};
use crate::intake::{self, Intake};
use crate::message::{
    Delivery, Message, PACE_STEP, SharedDelivery, TagFilter, new_message_id, unix_millis,
};
use crate::metrics::Metrics;
use crate::rate_limit::{Limited, RateLimiter};
use crate::stats::Stats;
use crate::status_writer::StatusWriter;
use crate::store::{
    ALL, Accept, AcceptOutcome, AppendOutcome, Displaced, DisplacedBy, Once, ReceiptCount,
    Recorded, Registry, Retagged, Route, StatsCounts, StatusWrite, Store, StoreError, Target,
};

pub use crate::message::Class;

/// Why a push was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The store could not take it; nothing was accepted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rate limit of its app is full; nothing was accepted.
    #[error("over the rate limit {}", .0.limit)]
    Limited(Limited),
    /// Its queue in front of the pipeline is full, or it waited too long; nothing was
    /// accepted.
    #[error("too many pushes waiting")]
    Shed,
}

/// A push request that passed validation.
#[derive(Clone, Debug)]
pub struct PushRequest {
    /// The app pushing.
    pub app: String,
    /// Its traffic class.
    pub class: Class,
    /// Its category, which users may opt out of; `None` for none.
    pub category: Option<String>,
    /// Spread its live delivery over this long; `None`: at once.
    pub pace: Option<Duration>,
    /// Target uids.
    pub uids: Vec<String>,
    /// Target device tokens.
    pub tokens: Vec<String>,
    /// Target aliases.
    pub aliases: Vec<String>,
    /// Every device of the app (then no other audience is named).
    pub all: bool,
    /// Devices with tags (then no direct audience, nor `all`, is named).
    pub tags: Option<TagFilter>,
    /// The payload's JSON text.
    pub payload: Bytes,
    /// Time to live; zero means "devices online now only".
    pub ttl: Duration,
    /// Priority.
    pub priority: Priority,
    /// Collapse key, empty for none.
    pub collapse_key: String,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// When to send it (unix ms); `None`: now.
    pub send_at_ms: Option<u64>,
    /// The id it was given when it was scheduled (a scheduled push firing); `None`: a new
    /// one.
    pub message_id: Option<String>,
    /// When a scheduled push firing was due (unix ms; 0: not a scheduled push), for its
    /// status.
    pub due_ms: u64,
}

impl PushRequest {
    /// The stored form of a push scheduled as `message_id`.
    fn to_scheduled(&self, message_id: &str, send_at_ms: u64) -> ScheduledPush {
        ScheduledPush {
            app: self.app.clone(),
            message_id: message_id.to_owned(),
            send_at_ms,
            class: self.class as u32,
            uids: self.uids.clone(),
            tokens: self.tokens.clone(),
            aliases: self.aliases.clone(),
            all: self.all,
            tags: self.tags.as_ref().map(TagFilter::to_stored),
            payload: self.payload.clone(),
            ttl_ms: self.ttl.as_millis() as u64,
            priority: self.priority as i32,
            collapse_key: self.collapse_key.clone(),
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            category: self.category.clone().unwrap_or_default(),
            pace_ms: self.pace.map_or(0, |pace| pace.as_millis() as u64),
        }
    }

    /// A scheduled push, to fire now: its id is kept, and it is recorded with
    /// [`Once::Fires`] so that firing it twice after a crash sends it once (its own
    /// idempotency key did its work when it was scheduled).
    fn from_scheduled(stored: ScheduledPush) -> Self {
        let class = match stored.class {
            0 => Class::Realtime,
            2 => Class::Marketing,
            _ => Class::Notification,
        };
        Self {
            priority: Priority::try_from(stored.priority).unwrap_or(Priority::Normal),
            app: stored.app,
            class,
            category: (!stored.category.is_empty()).then_some(stored.category),
            pace: (stored.pace_ms > 0).then(|| Duration::from_millis(stored.pace_ms)),
            uids: stored.uids,
            tokens: stored.tokens,
            aliases: stored.aliases,
            all: stored.all,
            tags: stored.tags.map(TagFilter::from_stored),
            payload: stored.payload,
            ttl: Duration::from_millis(stored.ttl_ms),
            collapse_key: stored.collapse_key,
            idempotency_key: None,
            send_at_ms: None,
            message_id: Some(stored.message_id),
            due_ms: stored.send_at_ms,
        }
    }
}

/// How many targets ended in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetCounts {
    /// Handed to a live connection now (and kept until acknowledged).
    pub delivered: u32,
    /// Stored for a device that is offline (or whose connection is catching up).
    pub stored: u32,
    /// Uids with no device, and tokens that are no device of the app.
    pub unknown: u32,
    /// Offline devices of a TTL-0 push: not stored, so not delivered.
    pub dropped: u32,
    /// Uids (and devices named by token or alias) whose users opted out of the push's
    /// class or category.
    pub skipped: u32,
}

/// The result of a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// A new message.
    Accepted {
        /// Its id.
        message_id: String,
        /// Per-state target counts.
        targets: TargetCounts,
    },
    /// The idempotency key was seen within its window; nothing was sent again.
    Duplicate {
        /// The first message's id.
        message_id: String,
    },
    /// Kept, to be sent at `send_at_ms`.
    Scheduled {
        /// The id it will have.
        message_id: String,
        /// When it is sent (unix ms).
        send_at_ms: u64,
    },
}

/// A target the store recorded the message for (or gave a seq, for a TTL-0 message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedTarget {
    /// The device token.
    pub token: String,
    /// The device's seq for the message.
    pub seq: u64,
    /// Where the device was connected when the message was recorded, if it was.
    pub route: Option<Route>,
}

/// How recorded messages reach live connections: the one part of the pipeline that
/// differs between standalone mode (the process's own [`ConnectionTable`]) and a gateway
/// (the nodes, over gRPC).
#[async_trait::async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// Hands `message` of `app` to the live connections of `targets`; returns how many were
    /// handed to one. It cannot fail: a target not reached reads the message from the store at its
    /// next heartbeat, push or reconnect (a TTL-0 message is then lost, as "now or never"
    /// says).
    async fn deliver(&self, app: &str, message: &Arc<Message>, targets: Vec<RecordedTarget>)
    -> u32;

    /// Whether a route the store holds leads to a live connection (a route may outlive
    /// its node by a lease).
    async fn is_live(&self, route: &Route) -> bool;

    /// Hands a message of `app`'s shared stream to every live connection of the app it is
    /// for; returns how many took it, and how many it skipped (their users opted out, or
    /// had their frequency cap). It cannot fail: a device not reached reads it from the
    /// stream.
    async fn deliver_shared(&self, app: &str, delivery: SharedDelivery) -> HandedOut;

    /// Tells the processes holding the connections of `devices` (devices of `app`) their
    /// new tags, so pushes to tags accepted from now on reach them. It cannot fail: a
    /// process that cannot be told is unreachable, and its devices reconnect elsewhere,
    /// where they are admitted with their tags.
    async fn retag(&self, app: &str, devices: Vec<Retagged>);

    /// Closes the connection of `token` at `route` with `code`, if it is still open. It
    /// cannot fail: a process that cannot be told is gone, and the connection with it.
    async fn close(&self, token: &str, route: &Route, code: pigeon_proto::CloseCode);
}

/// The process's own connections (standalone mode). Every recorded target is offered to the
/// table, routed when recorded or not: a device whose connection registered while the
/// message was being committed may have read the store just before the commit, and only
/// this hand-off reaches it before its next heartbeat.
#[async_trait::async_trait]
impl Fanout for ConnectionTable {
    async fn deliver(
        &self,
        _app: &str,
        message: &Arc<Message>,
        targets: Vec<RecordedTarget>,
    ) -> u32 {
        let mut live = 0;
        for target in targets {
            let delivery = Delivery {
                seq: target.seq,
                message: message.clone(),
            };
            if ConnectionTable::deliver(self, &target.token, delivery) == Delivered::Live {
                live += 1;
            }
        }
        live
    }

    /// The embedded store reports a route only for a connection in this table.
    async fn is_live(&self, _route: &Route) -> bool {
        true
    }

    async fn deliver_shared(&self, app: &str, delivery: SharedDelivery) -> HandedOut {
        ConnectionTable::deliver_shared(self, app, delivery)
    }

    async fn retag(&self, app: &str, devices: Vec<Retagged>) {
        for device in devices {
            ConnectionTable::retag(self, app, &device.token, &device.tags);
        }
    }

    async fn close(&self, token: &str, route: &Route, code: pigeon_proto::CloseCode) {
        self.close_connection(token, route.connection, code);
    }
}

/// Accepts pushes: resolve, record, deliver, count.
pub struct Pipeline {
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    intake: Arc<Intake>,
    frequency_caps: std::collections::HashMap<String, FrequencyCap>,
    /// Places for paced deliveries under way.
    paced: Arc<tokio::sync::Semaphore>,
    idempotency_window: Duration,
    /// How long a message's status is kept.
    retention: Duration,
    statuses: StatusWriter,
    /// Pushes and targets per app and class, for the statistics.
    stats: Arc<Stats>,
    /// How long the statistics are kept.
    stats_retention: Duration,
    /// How long a refused push waits for its answer at most (`limits.refusal_delay`): a
    /// push over a rate limit waits until it may be retried, if that is sooner.
    refusal_delay: Duration,
}

/// Paced deliveries under way at once at most; past it a paced push is delivered at once.
const PACED: usize = 64;
/// Pushes of one batch of due scheduled pushes run at once, at most (see [`Pipeline::fire`]).
const FIRED_AT_ONCE: usize = 64;

impl Pipeline {
    /// A pipeline over these parts, within `limits`.
    pub fn new(
        store: Arc<dyn Store>,
        fanout: Arc<dyn Fanout>,
        metrics: Arc<Metrics>,
        limiter: Arc<RateLimiter>,
        limits: &Limits,
    ) -> Self {
        let intake = Intake::new(
            limits.push_concurrency,
            limits.push_concurrency_per_app,
            limits.push_queue,
            limits.push_queue_timeout,
        );
        metrics.watch_intake(intake.clone());
        let statuses = StatusWriter::start(store.clone());
        let stats = Stats::start(store.clone(), limits.stats_retention);
        Self {
            stats,
            stats_retention: limits.stats_retention,
            store,
            fanout,
            metrics,
            limiter,
            intake,
            frequency_caps: std::collections::HashMap::new(),
            paced: Arc::new(tokio::sync::Semaphore::new(PACED)),
            idempotency_window: limits.idempotency_window,
            retention: limits.message_retention,
            statuses,
            refusal_delay: limits.refusal_delay,
        }
    }

    /// `status` as `app`'s message `id`'s, kept for the retention from when it was
    /// accepted (or is due).
    fn status_write(&self, app: &str, id: &str, status: MessageStatus) -> StatusWrite {
        let from = status.accepted_at_ms.max(status.send_at_ms);
        StatusWrite {
            app: app.to_owned(),
            id: id.to_owned(),
            keep_until_ms: from.saturating_add(self.retention.as_millis() as u64),
            status,
        }
    }

    /// How long an idempotency key counts, and how long a message (and a scheduled push's
    /// firing) is remembered.
    fn windows(&self) -> (Duration, Duration) {
        (self.idempotency_window, self.retention)
    }

    /// Keeps the status of a push accepted now: written with the next batch.
    async fn keep_status(&self, app: &str, id: &str, status: MessageStatus) {
        let write = self.status_write(app, id, status);
        self.statuses.keep(write).await;
    }

    /// Writes a status now, before anything that may write a later one (the push firing).
    async fn write_status(&self, app: &str, id: &str, status: MessageStatus) {
        let write = self.status_write(app, id, status);
        self.statuses.write_now(vec![write]).await;
    }

    /// Writes what the pipeline holds for the store (statuses waiting for their batch, the
    /// statistics since the last flush), waiting up to `within`: a process that stops does
    /// this before its store closes.
    pub async fn flush(&self, within: Duration) {
        let flush = async {
            self.statuses.flush().await;
            self.stats
                .flush(self.store.as_ref(), self.stats_retention)
                .await;
        };
        if tokio::time::timeout(within, flush).await.is_err() {
            tracing::warn!("writing the statuses and statistics held did not end in time");
        }
    }

    /// `app`'s message `id`'s status and counts.
    pub async fn message_status(
        &self,
        app: &str,
        id: &str,
    ) -> Result<crate::store::StatusRecord, StoreError> {
        self.store.message_status(app, id).await
    }

    /// `app`'s statistics of the minutes `from..to`, a point per `step` minutes.
    pub async fn stats(
        &self,
        app: &str,
        (from, to): (u64, u64),
        step: u64,
    ) -> Result<Vec<crate::stats::Point>, StoreError> {
        let retention = self.stats_retention;
        crate::stats::series(self.store.as_ref(), app, (from, to), step, retention).await
    }

    /// The pipeline with the frequency caps `apps` set.
    pub fn with_frequency_caps(mut self, apps: &[crate::config::AppSettings]) -> Self {
        self.frequency_caps = apps
            .iter()
            .filter_map(|app| Some((app.id.clone(), app.frequency_cap?)))
            .collect();
        self
    }

    /// Pushes one message, and counts the outcome.
    pub async fn push(&self, request: PushRequest) -> Result<PushOutcome, PushError> {
        let (app, class) = (request.app.clone(), request.class);
        let shared = request.all || request.tags.is_some();
        let named = request.uids.len() + request.tokens.len() + request.aliases.len();
        // A place first, then the charge: a push refused for want of a place costs its app
        // nothing of its limits.
        let lane = intake::lane(class, request.priority);
        let Ok(permit) = self.intake.enter(&app, lane, true).await else {
            self.metrics.push_shed(&app, class);
            tokio::time::sleep(self.refusal_delay).await;
            return Err(PushError::Shed);
        };
        if let Err(limited) = self.limiter.admit(&app, class, named as u64).await {
            drop(permit);
            self.metrics.push_limited(&app, class);
            // Answered once it may be retried, if that is sooner.
            tokio::time::sleep(self.refusal_delay.min(limited.retry_after)).await;
            return Err(PushError::Limited(limited));
        }
        let outcome = match request.send_at_ms {
            Some(send_at_ms) => self.schedule(request, send_at_ms).await,
            None => self.run(request, shared).await,
        };
        drop(permit);
        outcome
    }

    /// Keeps a push to send at `send_at_ms`; [`Pipeline::fire`] sends it then.
    async fn schedule(
        &self,
        request: PushRequest,
        send_at_ms: u64,
    ) -> Result<PushOutcome, PushError> {
        // A retry of a request with an idempotency key finds the push it scheduled.
        let message_id = match &request.idempotency_key {
            Some(key) => crate::message::keyed_message_id(&request.app, key),
            None => new_message_id(unix_millis()),
        };
        let job = request.to_scheduled(&message_id, send_at_ms);
        let (app, class) = (request.app, request.class);
        // The status first: once scheduled, the push may fire (and its status become
        // "accepted") at once. A retry of a keyed request leaves the first one's status.
        let retried = match request.idempotency_key {
            Some(_) => self
                .store
                .message_status(&app, &message_id)
                .await?
                .status
                .is_some(),
            None => false,
        };
        if !retried {
            let status = MessageStatus {
                state: State::Scheduled.into(),
                class: class.name().to_owned(),
                shared: job.all || job.tags.is_some(),
                send_at_ms,
                ..MessageStatus::default()
            };
            self.write_status(&app, &message_id, status).await;
        }
        let stored = self
            .store
            .schedule(&app, &message_id, send_at_ms, job.encode_to_vec())
            .await;
        match stored {
            Ok(true) => {
                self.metrics.push_scheduled(&app, class);
                Ok(PushOutcome::Scheduled {
                    message_id,
                    send_at_ms,
                })
            }
            Ok(false) => {
                self.metrics.push_duplicate(&app, class);
                Ok(PushOutcome::Duplicate { message_id })
            }
            Err(error) => {
                self.metrics.push_failed(&app, class);
                Err(error.into())
            }
        }
    }

    /// Cancels `app`'s scheduled push `id`, if it has not been sent.
    pub async fn cancel(&self, app: &str, id: &str) -> Result<crate::store::Cancel, StoreError> {
        let cancel = self.store.cancel(app, id).await?;
        if cancel == crate::store::Cancel::Cancelled {
            // Cancelled whatever becomes of its status.
            match self.store.message_status(app, id).await {
                Ok(record) => {
                    if let Some(mut status) = record.status {
                        status.state = State::Cancelled.into();
                        self.write_status(app, id, status).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, id, "a cancelled push's status was not updated")
                }
            }
        }
        Ok(cancel)
    }

    /// Sends scheduled pushes that are due (their rate limits were charged when they were
    /// scheduled); the outcome of each, in order. A push that cannot be decoded is logged
    /// and dropped (`Ok`).
    ///
    /// A batch is one unit of work: its pushes of one app and lane take one place in the
    /// pipeline together (they wait their turn, however long: they were accepted already)
    /// and run [`FIRED_AT_ONCE`] at a time, so that their store writes share transactions
    /// (embedded) and round trips (Redis) instead of queueing for places one by one.
    pub async fn fire(&self, jobs: &[&[u8]]) -> Vec<Result<PushOutcome, PushError>> {
        let mut groups: HashMap<(String, usize), Vec<(usize, PushRequest)>> = HashMap::new();
        let mut outcomes: Vec<Option<Result<PushOutcome, PushError>>> =
            jobs.iter().map(|_| None).collect();
        for (index, job) in jobs.iter().enumerate() {
            match ScheduledPush::decode(*job) {
                Ok(stored) => {
                    let request = PushRequest::from_scheduled(stored);
                    let lane = intake::lane(request.class, request.priority);
                    groups
                        .entry((request.app.clone(), lane))
                        .or_default()
                        .push((index, request));
                }
                Err(error) => {
                    tracing::error!(%error, "a scheduled push cannot be read; dropped");
                    outcomes[index] = Some(Ok(PushOutcome::Duplicate {
                        message_id: String::new(),
                    }));
                }
            }
        }
        let groups = groups
            .into_iter()
            .map(|((app, lane), requests)| async move {
                let permit = self.intake.enter(&app, lane, false).await;
                let runs = requests.into_iter().map(|(index, request)| {
                    let permit = &permit;
                    async move {
                        if permit.is_err() {
                            return (index, Err(PushError::Store(StoreError::Closed)));
                        }
                        let shared = request.all || request.tags.is_some();
                        (index, self.run(request, shared).await)
                    }
                });
                futures_util::stream::iter(runs)
                    .buffer_unordered(FIRED_AT_ONCE)
                    .collect::<Vec<_>>()
                    .await
            });
        for (index, outcome) in futures_util::future::join_all(groups)
            .await
            .into_iter()
            .flatten()
        {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or(Err(PushError::Store(StoreError::Closed))))
            .collect()
    }

    /// Sends a push now, and counts the outcome.
    async fn run(&self, request: PushRequest, shared: bool) -> Result<PushOutcome, PushError> {
        let (app, class) = (request.app.clone(), request.class);
        let outcome = if shared {
            self.run_shared(request).await
        } else {
            self.run_direct(request).await
        };
        match &outcome {
            Ok(PushOutcome::Accepted { targets, .. }) => {
                self.metrics.push_accepted(&app, class, targets);
                // A push stored once names no devices.
                let named = match shared {
                    true => 0,
                    false => u64::from(targets.delivered) + u64::from(targets.stored),
                };
                let counts = StatsCounts {
                    pushes: 1,
                    targets: named,
                    ..StatsCounts::default()
                };
                self.stats.add(&app, class, counts);
                if shared {
                    let reached = u64::from(targets.delivered);
                    self.limiter.charge_targets(&app, class, reached).await;
                }
            }
            Ok(PushOutcome::Duplicate { .. }) => self.metrics.push_duplicate(&app, class),
            Ok(PushOutcome::Scheduled { .. }) => {}
            Err(_) => self.metrics.push_failed(&app, class),
        }
        Ok(outcome?)
    }

    /// A push to every device of the app, or to tags: one entry of its stream `all`, one
    /// hand-off per process.
    async fn run_shared(&self, mut request: PushRequest) -> Result<PushOutcome, StoreError> {
        // Devices of users who opted out carry a reserved tag for it: not for them.
        if let Some(opted_out) = OptedOut::of(&request) {
            let filter = request.tags.get_or_insert_with(TagFilter::default);
            if opted_out.marketing {
                filter.none.push(crate::devices::opt_out_tag("marketing"));
            }
            if let Some(category) = &opted_out.category {
                let item = format!("category:{category}");
                filter.none.push(crate::devices::opt_out_tag(&item));
            }
        }
        // Nor is a marketing push for the devices of users who had their cap this window.
        if request.class == Class::Marketing
            && let Some(cap) = self.frequency_caps.get(&request.app).copied()
        {
            let (window, _) = crate::caps::window(cap, unix_millis());
            let filter = request.tags.get_or_insert_with(TagFilter::default);
            filter.none.push(crate::caps::cap_tag(window));
        }
        let (mut message, once) = new_message(&mut request, unix_millis(), self.windows());
        if let (Some(pace), Some(message)) = (request.pace, Arc::get_mut(&mut message)) {
            // Stored with the entry: each process paces its own connections.
            message.pace_ms = pace.as_millis() as u64;
        }
        let appended = self.store.append(&request.app, ALL, message, once).await?;
        let (message, offset, epoch) = match appended {
            AppendOutcome::Duplicate { message_id } => {
                return Ok(PushOutcome::Duplicate { message_id });
            }
            AppendOutcome::Appended {
                message,
                offset,
                epoch,
            } => (message, offset, epoch),
        };
        let delivery = SharedDelivery {
            stream: ALL,
            epoch,
            offset,
            message: message.clone(),
        };
        let status = MessageStatus {
            send_at_ms: request.due_ms,
            ..accepted_status(&message, request.class, true)
        };
        let (handed, ()) = tokio::join!(
            self.fanout.deliver_shared(&request.app, delivery),
            self.keep_status(&request.app, &message.id, status),
        );
        Ok(PushOutcome::Accepted {
            message_id: message.id.clone(),
            targets: TargetCounts {
                delivered: handed.live,
                skipped: handed.skipped,
                ..TargetCounts::default()
            },
        })
    }

    async fn run_direct(&self, mut request: PushRequest) -> Result<PushOutcome, StoreError> {
        let now_ms = unix_millis();
        let mut counts = TargetCounts::default();
        if let Some(opted_out) = OptedOut::of(&request) {
            opted_out
                .skip_uids(self.store.as_ref(), &mut request, &mut counts)
                .await?;
        }
        let cap = match request.class {
            Class::Marketing => self.frequency_caps.get(&request.app).copied(),
            _ => None,
        };
        // Uids counted against the cap, and those over it.
        let mut capped = HashSet::new();
        let mut over_cap = HashSet::new();
        if let Some(cap) = cap {
            let counted = self
                .count_capped(&request.app, &request.uids, cap, now_ms)
                .await?;
            let uids = std::mem::take(&mut request.uids);
            for (uid, counted) in uids.into_iter().zip(counted) {
                capped.insert(uid.clone());
                if counted {
                    request.uids.push(uid);
                } else {
                    counts.skipped += 1;
                    over_cap.insert(uid);
                }
            }
        }
        let (mut tokens, named) = resolve(self.store.as_ref(), &request, &mut counts).await?;
        if let Some(cap) = cap
            && !named.is_empty()
        {
            // Devices named by token or alias are capped by their user, each user counted
            // once however many of its devices the push names.
            let mut uid_of = Vec::with_capacity(named.len());
            for token in &named {
                let device = self.store.device(&request.app, token).await?;
                uid_of.push(device.map(|device| device.uid));
            }
            let mut fresh: Vec<String> = uid_of
                .iter()
                .flatten()
                .filter(|uid| !capped.contains(*uid))
                .cloned()
                .collect();
            fresh.sort();
            fresh.dedup();
            let counted = self.count_capped(&request.app, &fresh, cap, now_ms).await?;
            for (uid, counted) in fresh.into_iter().zip(counted) {
                if !counted {
                    over_cap.insert(uid);
                }
            }
            let skipped: HashSet<&String> = named
                .iter()
                .zip(&uid_of)
                .filter(|(_, uid)| uid.as_ref().is_some_and(|uid| over_cap.contains(uid)))
                .map(|(token, _)| token)
                .collect();
            counts.skipped += skipped.len() as u32;
            tokens.retain(|token| !skipped.contains(token));
        }
        if let Some(opted_out) = OptedOut::of(&request) {
            let skipped = opted_out
                .named_tokens(self.store.as_ref(), &request.app, &named)
                .await?;
            counts.skipped += skipped.len() as u32;
            tokens.retain(|token| !skipped.contains(token));
        }
        let (message, once) = new_message(&mut request, now_ms, self.windows());
        let storable = message.is_storable();
        let targets = tokens
            .into_iter()
            .map(|token| Target {
                token,
                store: storable,
            })
            .collect();
        let accept = Accept {
            app: request.app.clone(),
            message,
            targets,
            once,
        };
        let (message, recorded) = match self.store.record(accept).await? {
            AcceptOutcome::Duplicate { message_id } => {
                return Ok(PushOutcome::Duplicate { message_id });
            }
            AcceptOutcome::Accepted {
                message,
                targets,
                displaced,
            } => {
                self.count_displaced(&request.app, displaced, now_ms);
                (message, targets)
            }
        };
        let mut seqs = Vec::new();
        for (token, recorded) in recorded {
            match recorded {
                Recorded::Unknown => counts.unknown += 1,
                Recorded::Dropped => counts.dropped += 1,
                Recorded::Seq { seq, route } => seqs.push(RecordedTarget { token, seq, route }),
            }
        }
        let recorded = seqs.len() as u32;
        if storable {
            self.stats
                .add_expiring(&request.app, &message, i64::from(recorded));
        }
        let status = MessageStatus {
            targets: recorded,
            unknown: counts.unknown,
            dropped: counts.dropped,
            skipped: counts.skipped,
            send_at_ms: request.due_ms,
            ..accepted_status(&message, request.class, false)
        };
        let status = self.keep_status(&request.app, &message.id, status);
        if let Some(pace) = request.pace
            && seqs.len() > 1
        {
            match self.deliver_paced(&request.app, &message, seqs, pace) {
                // Recorded for every target: each is handed its copy within `pace`, or
                // reads it from the store.
                Ok(()) => {
                    status.await;
                    counts.stored += recorded;
                    return Ok(PushOutcome::Accepted {
                        message_id: message.id.clone(),
                        targets: counts,
                    });
                }
                Err(targets) => seqs = targets,
            }
        }
        let (live, ()) = tokio::join!(self.fanout.deliver(&request.app, &message, seqs), status);
        counts.delivered += live;
        // A target not reached live reads the message from the store; a TTL-0 one has
        // lost it.
        if storable {
            counts.stored += recorded.saturating_sub(live);
        } else {
            counts.dropped += recorded.saturating_sub(live);
        }
        Ok(PushOutcome::Accepted {
            message_id: message.id.clone(),
            targets: counts,
        })
    }
}

impl Pipeline {
    /// Adds the messages a push put out of devices' queues to their counts (and takes them
    /// off the devices their messages will expire for).
    fn count_displaced(&self, app: &str, displaced: Vec<Displaced>, now_ms: u64) {
        let mut counts: HashMap<String, ReceiptCount> = HashMap::new();
        for Displaced { message, by } in displaced {
            self.stats.add_expiring(app, &message, -1);
            let count = counts
                .entry(message.id.clone())
                .or_insert_with(|| ReceiptCount {
                    app: app.to_owned(),
                    id: message.id.clone(),
                    ..ReceiptCount::default()
                });
            match by {
                DisplacedBy::Collapsed => count.collapsed += 1,
                DisplacedBy::Dropped => count.dropped += 1,
            }
        }
        let keep_until_ms = now_ms.saturating_add(self.retention.as_millis() as u64);
        for count in counts.into_values() {
            self.statuses.count(count, keep_until_ms);
        }
    }

    /// Counts one more capped push for each of `uids` in the current window of `cap`:
    /// per uid, whether it was under the cap. A uid that has had its cap with this push
    /// is tagged for it (in the background), so pushes to all and tags skip it too.
    async fn count_capped(
        &self,
        app: &str,
        uids: &[String],
        cap: FrequencyCap,
        now_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let (window, window_ms) = crate::caps::window(cap, now_ms);
        let counts = self
            .store
            .count_capped(app, uids, window, window_ms, cap.marketing)
            .await?;
        let reached: Vec<String> = uids
            .iter()
            .zip(&counts)
            .filter(|(_, count)| count.is_some_and(|count| count >= cap.marketing))
            .map(|(uid, _)| uid.clone())
            .collect();
        if !reached.is_empty() {
            let (store, fanout, app) = (self.store.clone(), self.fanout.clone(), app.to_owned());
            tokio::spawn(async move {
                let tagged = crate::caps::tag_capped(
                    store.as_ref(),
                    fanout.as_ref(),
                    &app,
                    &reached,
                    window,
                );
                if let Err(error) = tagged.await {
                    tracing::warn!(%error, "tagging users at their frequency cap failed");
                }
            });
        }
        Ok(counts.into_iter().map(|count| count.is_some()).collect())
    }

    /// Hands `message` to `targets` in even steps over `pace`, in the background; gives
    /// the targets back when as many paced deliveries as allowed are under way.
    fn deliver_paced(
        &self,
        app: &str,
        message: &Arc<Message>,
        targets: Vec<RecordedTarget>,
        pace: Duration,
    ) -> Result<(), Vec<RecordedTarget>> {
        let Ok(place) = self.paced.clone().try_acquire_owned() else {
            return Err(targets);
        };
        let (fanout, message, app) = (self.fanout.clone(), message.clone(), app.to_owned());
        tokio::spawn(async move {
            let steps = targets
                .len()
                .min((pace.as_millis() / PACE_STEP.as_millis()).max(1) as usize);
            let per_step = targets.len().div_ceil(steps);
            let start = tokio::time::Instant::now();
            for (step, chunk) in targets.chunks(per_step).enumerate() {
                tokio::time::sleep_until(start + pace.mul_f64(step as f64 / steps as f64)).await;
                fanout.deliver(&app, &message, chunk.to_vec()).await;
            }
            drop(place);
        });
        Ok(())
    }
}

/// The status of `message`, accepted now in `class` (`shared`: stored once for the app).
fn accepted_status(message: &Message, class: Class, shared: bool) -> MessageStatus {
    MessageStatus {
        state: State::Accepted.into(),
        class: class.name().to_owned(),
        shared,
        accepted_at_ms: message.accepted_at_ms,
        expires_at_ms: message.expires_at_ms,
        ..MessageStatus::default()
    }
}

/// The message of `request`, accepted at `now_ms`, and what keeps it from being recorded
/// twice: its idempotency key, counting for `idempotency_window`; or, for a scheduled push
/// firing, that it fires once, remembered for `retention`.
fn new_message(
    request: &mut PushRequest,
    now_ms: u64,
    (idempotency_window, retention): (Duration, Duration),
) -> (Arc<Message>, Option<Once>) {
    let fires = request.due_ms > 0;
    let message = Arc::new(Message {
        id: request
            .message_id
            .take()
            .unwrap_or_else(|| new_message_id(now_ms)),
        payload: std::mem::take(&mut request.payload),
        priority: request.priority,
        class: request.class,
        accepted_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(request.ttl.as_millis() as u64),
        collapse_key: std::mem::take(&mut request.collapse_key),
        filter: request.tags.take().map(Box::new),
        pace_ms: 0,
    });
    let once = match request.idempotency_key.take() {
        _ if fires => Some(Once::Fires {
            id: message.id.clone(),
            keep_until_ms: now_ms.saturating_add(retention.as_millis() as u64),
        }),
        Some(key) => Some(Once::Key {
            key,
            until_ms: now_ms.saturating_add(idempotency_window.as_millis() as u64),
        }),
        None => None,
    };
    (message, once)
}

/// What a push is that users may opt out of: a marketing push, or one with a category.
struct OptedOut {
    marketing: bool,
    category: Option<String>,
}

impl OptedOut {
    fn of(request: &PushRequest) -> Option<Self> {
        let marketing = request.class == Class::Marketing;
        let category = request.category.clone();
        (marketing || category.is_some()).then_some(Self {
            marketing,
            category,
        })
    }

    /// Whether a user who opted out of `items` skips this push.
    fn skips(&self, items: &[String]) -> bool {
        items.iter().any(|item| {
            (self.marketing && item == "marketing")
                || self
                    .category
                    .as_deref()
                    .is_some_and(|category| item.strip_prefix("category:") == Some(category))
        })
    }

    /// Takes the uids that opted out out of the request, counting them skipped.
    async fn skip_uids(
        &self,
        registry: &dyn Registry,
        request: &mut PushRequest,
        counts: &mut TargetCounts,
    ) -> Result<(), StoreError> {
        let opt_outs = registry.opt_outs(&request.app, &request.uids).await?;
        let mut kept = Vec::with_capacity(request.uids.len());
        for (uid, items) in std::mem::take(&mut request.uids).into_iter().zip(opt_outs) {
            if self.skips(&items) {
                counts.skipped += 1;
            } else {
                kept.push(uid);
            }
        }
        request.uids = kept;
        Ok(())
    }

    /// Of the devices named by token or alias, those whose users opted out.
    async fn named_tokens(
        &self,
        registry: &dyn Registry,
        app: &str,
        named: &[String],
    ) -> Result<HashSet<String>, StoreError> {
        let mut uids = Vec::with_capacity(named.len());
        for token in named {
            uids.push(registry.device(app, token).await?.map(|device| device.uid));
        }
        let known: Vec<String> = uids.iter().flatten().cloned().collect();
        let opt_outs = registry.opt_outs(app, &known).await?;
        let skipping: HashSet<&String> = known
            .iter()
            .zip(&opt_outs)
            .filter(|(_, items)| self.skips(items))
            .map(|(uid, _)| uid)
            .collect();
        Ok(named
            .iter()
            .zip(&uids)
            .filter(|(_, uid)| uid.as_ref().is_some_and(|uid| skipping.contains(uid)))
            .map(|(token, _)| token.clone())
            .collect())
    }
}

/// The distinct known tokens of the audience (its uids', aliases' and tokens' devices: a
/// device named more than once gets one copy), and of those the ones named by alias or
/// token rather than by uid; counts the unknown uids, aliases and tokens.
async fn resolve(
    registry: &dyn Registry,
    request: &PushRequest,
    counts: &mut TargetCounts,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let mut seen = HashSet::new();
    let mut tokens = Vec::new();
    let mut named = Vec::new();
    let per_uid = registry
        .tokens_for_uids(&request.app, &request.uids)
        .await?;
    for bound in per_uid {
        if bound.is_empty() {
            counts.unknown += 1;
        }
        for token in bound {
            if seen.insert(token.clone()) {
                tokens.push(token);
            }
        }
    }
    let per_alias = registry
        .tokens_for_aliases(&request.app, &request.aliases)
        .await?;
    for by_alias in per_alias {
        if by_alias.is_empty() {
            counts.unknown += 1;
        }
        for token in by_alias {
            if seen.insert(token.clone()) {
                named.push(token.clone());
                tokens.push(token);
            }
        }
    }
    let known = registry.known_tokens(&request.app, &request.tokens).await?;
    for (token, known) in request.tokens.iter().zip(known) {
        if !known {
            counts.unknown += 1;
        } else if seen.insert(token.clone()) {
            named.push(token.clone());
            tokens.push(token.clone());
        }
    }
    Ok((tokens, named))
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::connections::Connection;
    use crate::store::embedded::EmbeddedStore;

    /// The connection table as the fan-out, with a device's connection registering after
    /// the store recorded a push to it (and found no route) but before the hand-off.
    struct ConnectsAfterRecord {
        table: Arc<ConnectionTable>,
        token: Arc<str>,
        connected: std::sync::Mutex<Option<Arc<Connection>>>,
    }

    #[async_trait::async_trait]
    impl Fanout for ConnectsAfterRecord {
        async fn deliver(
            &self,
            app: &str,
            message: &Arc<Message>,
            targets: Vec<RecordedTarget>,
        ) -> u32 {
            let (connection, _) = self.table.register(
                &self.token,
                "demo",
                crate::store::StreamHead::default(),
                &crate::store::DeviceTags::default(),
            );
            if let Ok(mut connected) = self.connected.lock() {
                *connected = Some(connection);
            }
            Fanout::deliver(self.table.as_ref(), app, message, targets).await
        }

        async fn is_live(&self, _route: &Route) -> bool {
            true
        }

        async fn deliver_shared(&self, app: &str, delivery: SharedDelivery) -> HandedOut {
            self.table.deliver_shared(app, delivery)
        }

        async fn retag(&self, _app: &str, _devices: Vec<Retagged>) {}

        async fn close(&self, _token: &str, _route: &Route, _code: pigeon_proto::CloseCode) {}
    }

    /// Standalone: a device that connects while a push to it is committed gets it live (its
    /// first store read may have come just before the commit).
    #[tokio::test]
    async fn a_device_connecting_during_the_record_gets_the_push_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = Arc::new(ConnectionTable::new(8, CancellationToken::new()));
        let store =
            EmbeddedStore::open(dir.path(), &crate::config::Limits::default(), table.clone())
                .expect("open");
        let token: Arc<str> = store
            .admit_device("demo", "alice", "")
            .await
            .expect("admit")
            .token
            .into();
        let fanout = Arc::new(ConnectsAfterRecord {
            table,
            token,
            connected: std::sync::Mutex::new(None),
        });
        let pipeline = Pipeline::new(
            Arc::new(store),
            fanout.clone(),
            Arc::new(Metrics::default()),
            Arc::new(RateLimiter::unlimited()),
            &crate::config::Limits::default(),
        );
        let outcome = pipeline
            .push(PushRequest {
                app: "demo".into(),
                class: Class::Notification,
                category: None,
                pace: None,
                uids: vec!["alice".into()],
                tokens: Vec::new(),
                aliases: Vec::new(),
                all: false,
                tags: None,
                payload: Bytes::from_static(b"{}"),
                ttl: Duration::from_secs(60),
                priority: Priority::Normal,
                collapse_key: String::new(),
                idempotency_key: None,
                send_at_ms: None,
                message_id: None,
                due_ms: 0,
            })
            .await
            .expect("push");
        let PushOutcome::Accepted { targets, .. } = outcome else {
            panic!("expected accepted, got {outcome:?}");
        };
        assert_eq!((targets.delivered, targets.stored), (1, 0));
        let connection = fanout
            .connected
            .lock()
            .ok()
            .and_then(|mut connected| connected.take())
            .expect("the device connected");
        let seqs: Vec<u64> = connection.take().deliveries().map(|d| d.seq).collect();
        assert_eq!(seqs, [1]);
    }
}
