//! The embedded store of standalone mode: [redb], a pure-Rust, ACID, copy-on-write B-tree
//! database in one file.
//!
//! redb was chosen because a commit with `Durability::Immediate` is on disk when `commit`
//! returns and a crash at any moment (SIGKILL included) leaves the file at the last commit,
//! with no recovery step or write-ahead log to manage; because it is pure Rust with no
//! background threads of its own; and because its range scans over tuple keys fit
//! "a device's messages, ordered by seq" exactly.
//!
//! # Writes
//! One writer thread owns all write transactions. Callers send it operations over a bounded
//! queue; it takes every operation waiting (up to [`MAX_BATCH`]), applies them in one
//! transaction, commits once (one fsync) and then answers each. This group commit makes the
//! cost of durability one fsync per batch, not per push. When the queue is full, pushes are
//! refused with [`StoreError::Overloaded`] (the API answers 429) rather than queued without
//! bound.
//!
//! When more is waiting than one transaction takes, what goes first is chosen as the push
//! pipeline chooses ([`WeightedQueues`]): by lane, weighted 5:2:1, and in turn by app. A
//! push's record or append waits in its push's lane and app (a marketing push's
//! frequency-cap count in lane 2 with it); the store's upkeep (acks, admissions, statuses,
//! schedules, sweeps) in lane 0. So a notification's record is not queued behind another
//! app's backlog of marketing appends, and one app's writes behind another's. The writer
//! takes at most [`TAKEN`] writes out of the queue into its lanes (writes of one lane and
//! app keep their order); the rest wait in the queue in the order they came.
//!
//! # Reads
//! Reads run in their own read transactions; a commit is visible to every read that starts
//! after it. A read of a few keys (a push's uids, a device) runs on the calling task's
//! thread: it is a few microseconds in redb's page cache, less than handing it to tokio's
//! blocking pool and back, two thread switches that were a push's largest cost under load.
//! Scans (a device's queue, the app's stream, a tag's devices) and reads of many keys run
//! on the blocking pool.
//!
//! # Tables
//! | table | key | value |
//! | --- | --- | --- |
//! | `devices` | token | `DeviceRecord` (app, uid, highest and acked seq, counters; the counters as of the last fold of `counter_log`) |
//! | `counter_log` | row number | (token, [highest seq, acked seq, pending, dropped, collapsed]): a device's counters after each change since the last fold (see `counters`) |
//! | `bindings` | `app \0 uid \0 token` | () |
//! | `queue` | (token, seq) | `StoredMessage` |
//! | `expiry` | (expires at ms, token, seq) | () |
//! | `collapse` | `token \0 collapse key` | seq |
//! | `idempotency` | `app \0 key` | `IdempotencyRecord` |
//! | `idempotency_expiry` | (expires at ms, `app \0 key`) | () |
//! | `stream_entries` | (`app \0 stream`, offset) | `StoredMessage` |
//! | `stream_size` | `app \0 stream` | the stream's entries (counted once for a stream written before this table, then kept with every entry added or removed) |
//! | `stream_meta` | `app \0 stream` | `StreamMeta` (epoch, head, trimmed) |
//! | `stream_expiry` | (expires at ms, `app \0 stream`, offset) | () |
//! | `stream_collapse` | `app \0 stream \0 collapse key` | offset |
//! | `tag_devices` | `app \0 tag \0 token` | () |
//! | `alias_devices` | `app \0 alias \0 token` | () |
//! | `opt_out` | `app \0 uid` | what the uid opted out of, one item a line |
//! | `capped` | (window number, `app \0 uid`) | capped (marketing) pushes the uid got in that window; earlier windows swept |
//! | `capped_shared` | (window number, `app \0 uid \0 message id`) | a capped push stored once that the uid got and was counted for; earlier windows swept |
//! | `schedule` | (due at ms, `app \0 id`) | `ScheduledPush` |
//! | `schedule_ids` | `app \0 id` | (due at ms, state: 0 waiting, 1 claimed (written by earlier releases), else fired and remembered until that ms) |
//! | `schedule_fired` | (remembered until ms, `app \0 id`) | () |
//! | `status` | `app \0 id` | (`MessageStatus`, empty until written; delivered; acked; kept until ms; opened) |
//! | `opened` | `app \0 id \0 token` | () (the devices that opened the message; gone with its status) |
//! | `status_displaced` | `app \0 id` | (collapsed, dropped by the device cap): how often the message left a device's queue unread (gone with its status) |
//! | `status_expiry` | (kept until ms, `app \0 id`) | () (a row whose status is kept longer is left) |
//! | `device_seen` | (app, last admitted ms, token) | () (the devices by when they were last admitted) |
//! | `stats` | (minute, app, class: 0 notification, 1 realtime, 2 marketing) | [pushes, targets, delivered, acked, opened]; minutes past the retention swept as rows are added |
//! | `stats_expiring` | (minute, app, class) | the statistics' `expiring` count (signed), swept alike |
//!
//! A device's own tags and alias are in its `DeviceRecord`, written in the same transaction
//! as these index rows.
//!
//! # Scheduled pushes
//! One process has the store, so a claim of a due push is kept in its memory, not written:
//! a process that dies takes its claims with it, and what it claimed is due again when it
//! opens the store again. A push fires in the transaction that records it
//! ([`Once::Fires`]): its schedule rows are removed then, and one already fired or
//! cancelled is not recorded.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pigeon_proto::Message as _;
use pigeon_proto::device::Priority;
use pigeon_proto::store::{
    DeviceRecord, DeviceTag as StoredTag, IdempotencyRecord, MessageStatus, StoredMessage,
    StreamMeta,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    ALL, Accept, AcceptOutcome, AdmittedDevice, AliasSet, AppendOutcome, Cancel, DeviceCounters,
    DeviceInfo, DeviceTag, DeviceTags, Displaced, DisplacedBy, DueJob, NewlyOpened, OfflineStore,
    Once, ReceiptCount, Recorded, Registry, Replay, Retagged, Route, Routes, Schedules,
    StatsCounts, StatsRow, StatusRecord, StatusWrite, Statuses, StoreError, StreamHead,
    StreamPlace, StreamRead, TagChange, TagChanged,
};
use crate::config::Limits;
use crate::intake::{self, WeightedQueues};
use crate::message::{Class, Delivery, Message, new_device_token, unix_millis};
use crate::metrics::{BATCH_SIZES, CALL_SECONDS, Histogram};
use counters::{COUNTER_LOG, Counters, Counts, FOLD_DEVICES, FOLD_INTERVAL, FOLD_ROWS, Staged};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const BINDINGS: TableDefinition<&str, ()> = TableDefinition::new("bindings");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const EXPIRY: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("expiry");
const COLLAPSE: TableDefinition<&str, u64> = TableDefinition::new("collapse");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("idempotency_expiry");
const TAG_DEVICES: TableDefinition<&str, ()> = TableDefinition::new("tag_devices");
const STREAM_ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("stream_entries");
const STREAM_SIZE: TableDefinition<&str, u64> = TableDefinition::new("stream_size");
const STREAM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("stream_meta");
const STREAM_EXPIRY: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("stream_expiry");
const STREAM_COLLAPSE: TableDefinition<&str, u64> = TableDefinition::new("stream_collapse");
const ALIAS_DEVICES: TableDefinition<&str, ()> = TableDefinition::new("alias_devices");
const OPT_OUT: TableDefinition<&str, &str> = TableDefinition::new("opt_out");
const CAPPED: TableDefinition<(u64, &str), u32> = TableDefinition::new("capped");
const CAPPED_SHARED: TableDefinition<(u64, &str), ()> = TableDefinition::new("capped_shared");
const SCHEDULE: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("schedule");
const SCHEDULE_IDS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("schedule_ids");
const SCHEDULE_FIRED: TableDefinition<(u64, &str), ()> = TableDefinition::new("schedule_fired");
const STATUS: TableDefinition<&str, (&[u8], u64, u64, u64, u64)> = TableDefinition::new("status");
const OPENED: TableDefinition<&str, ()> = TableDefinition::new("opened");
const STATUS_DISPLACED: TableDefinition<&str, (u64, u64)> =
    TableDefinition::new("status_displaced");
const STATUS_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("status_expiry");
const STATS: TableDefinition<(u64, &str, u32), [u64; 5]> = TableDefinition::new("stats");
const STATS_EXPIRING: TableDefinition<(u64, &str, u32), i64> =
    TableDefinition::new("stats_expiring");
const DEVICE_SEEN: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("device_seen");
/// The states of `schedule_ids` below a remembered-until time. Claims are no longer
/// written; a row an earlier release claimed is due again at its claim's end.
const WAITING: u64 = 0;
const CLAIMED: u64 = 1;

/// Keys a read may look up on the calling thread; a read of more goes to the blocking pool.
const INLINE_KEYS: usize = 16;
/// Operations applied in one transaction at most.
const MAX_BATCH: usize = 512;
/// Operations the writer takes out of its queue into its lanes at most: the writes ordered
/// by lane, beside the queue's `limits.store_queue` in the order they came.
const TAKEN: usize = 4 * MAX_BATCH;
/// The app of the store's upkeep (acks, admissions, statuses, schedules, sweeps) in the
/// writer's lanes.
const UPKEEP: &str = "";
/// Expired rows removed by one sweep at most (the next sweep goes on).
const SWEEP_LIMIT: usize = 10_000;
/// How often expired messages and idempotency keys are removed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// The embedded registry and offline store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writes: mpsc::Sender<Job>,
    /// Writes the writer has taken out of `writes` into its lanes, not yet applied.
    taken: Arc<AtomicUsize>,
    routes: Arc<dyn Routes>,
    /// Scheduled pushes this process claimed (their `schedule_ids` key), with when their
    /// claim ends (Unix ms).
    claims: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// The devices' counters newer than their records (see `counters`).
    counters: Arc<Counters>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
    /// When it was queued for the writer.
    queued: Instant,
}

impl Job {
    /// `op`, queued now, answered on `reply`.
    fn new(op: Op, reply: oneshot::Sender<Result<Reply, StoreError>>) -> Self {
        Self {
            op,
            reply,
            queued: Instant::now(),
        }
    }
}

enum Op {
    Admit {
        app: String,
        uid: String,
        token: String,
    },
    Accept(Accept),
    Ack {
        token: String,
        seq: u64,
    },
    Sweep {
        now_ms: u64,
    },
    SetTags {
        app: String,
        token: String,
        tags: Vec<String>,
    },
    ChangeTag {
        app: String,
        tag: String,
        change: TagChange,
        max_tags: usize,
    },
    SetAlias {
        app: String,
        token: String,
        alias: Option<String>,
        max_devices: usize,
    },
    Append {
        app: String,
        stream: String,
        message: Arc<Message>,
        once: Option<Once>,
    },
    AckStream {
        token: String,
        epoch: u64,
        offset: u64,
    },
    SetOptOut {
        key: String,
        opt_out: String,
    },
    CountCapped {
        keys: Vec<String>,
        window: u64,
        cap: u32,
    },
    CountSharedCapped {
        /// `app \0 uid` and the message id.
        got: Vec<(String, String)>,
        window: u64,
        cap: u32,
    },
    Schedule {
        key: String,
        at_ms: u64,
        job: Vec<u8>,
    },
    Cancel {
        key: String,
    },
    Fired {
        keys: Vec<String>,
        keep_until_ms: u64,
    },
    Unregister {
        app: String,
        token: String,
    },
    Seen {
        app: String,
        token: String,
    },
    PutStatuses {
        /// (key, encoded status, kept until ms), in order.
        statuses: Vec<(String, Vec<u8>, u64)>,
    },
    CountReceipts {
        counts: Vec<ReceiptCount>,
        keep_until_ms: u64,
    },
    AddStats {
        rows: Vec<StatsRow>,
        /// The oldest minute kept.
        oldest: u64,
    },
    /// The last write: see [`EmbeddedStore::close`].
    Close,
}

impl Op {
    /// The lane and app the operation waits in for a transaction (see "Writes" above).
    fn lane(&self) -> (usize, &str) {
        let marketing = intake::lane(Class::Marketing, Priority::Normal);
        fn app_of(key: Option<&String>) -> &str {
            key.and_then(|key| key.split('\0').next()).unwrap_or(UPKEEP)
        }
        match self {
            Op::Accept(accept) => (
                intake::lane(accept.message.class, accept.message.priority),
                &accept.app,
            ),
            Op::Append { app, message, .. } => (intake::lane(message.class, message.priority), app),
            Op::CountCapped { keys, .. } => (marketing, app_of(keys.first())),
            Op::CountSharedCapped { got, .. } => {
                (marketing, app_of(got.first().map(|(key, _)| key)))
            }
            _ => (0, UPKEEP),
        }
    }
}

enum Reply {
    Admitted(AdmittedDevice),
    Accepted(AcceptOutcome),
    Done,
    Retagged(Option<Retagged>),
    TagChanged(TagChanged, Vec<Retagged>),
    Alias(AliasSet),
    Appended(AppendOutcome),
    Cancel(Cancel),
    Scheduled(bool),
    Counted(Vec<Option<u32>>),
    Reached(Vec<bool>),
    Unregistered(Option<DeviceRecord>),
    Opened(Vec<NewlyOpened>),
    /// Whether a sweep left expired rows for the next.
    Swept(bool),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, starts its writer thread, and a task that
    /// sweeps expired rows. `limits.store_queue` bounds the writes waiting for the writer;
    /// `routes` says which devices are connected (for TTL-0 pushes).
    pub fn open(dir: &Path, limits: &Limits, routes: Arc<dyn Routes>) -> Result<Self> {
        Self::open_folding(dir, limits, routes, FOLD_INTERVAL)
    }

    /// [`EmbeddedStore::open`], folding the counter log at most `fold_interval` after the
    /// last fold (see `counters`).
    fn open_folding(
        dir: &Path,
        limits: &Limits,
        routes: Arc<dyn Routes>,
        fold_interval: Duration,
    ) -> Result<Self> {
        let queue = limits.store_queue;
        std::fs::create_dir_all(dir).map_err(backend)?;
        let path = dir.join("pigeon.redb");
        let began = Instant::now();
        let repaired = Arc::new(AtomicBool::new(false));
        let noted = repaired.clone();
        let db = redb::Builder::new()
            .set_repair_callback(move |_| {
                if !noted.swap(true, Ordering::Relaxed) {
                    tracing::warn!("the store was not closed cleanly: checking it before starting");
                }
            })
            .create(&path)
            .map_err(|error| match error {
                redb::DatabaseError::UpgradeRequired(format) => StoreError::Backend(format!(
                    "{} is in an earlier store format ({format}), which this build does not read: \
                 let the build that wrote it deliver what it holds, then move the file aside",
                    path.display()
                )),
                error => backend(error),
            })?;
        if repaired.load(Ordering::Relaxed) {
            let seconds = began.elapsed().as_secs_f64();
            tracing::warn!(seconds, path = %path.display(), "the store was checked and opened");
        }
        let db = Arc::new(db);
        {
            // Create every table, so that reads never meet a missing one. Committed as a
            // close is (see `close`): a process that dies before its first write leaves a
            // file that opens at once.
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_quick_repair(true);
            txn.open_table(DEVICES).map_err(backend)?;
            txn.open_table(BINDINGS).map_err(backend)?;
            txn.open_table(QUEUE).map_err(backend)?;
            txn.open_table(EXPIRY).map_err(backend)?;
            txn.open_table(COLLAPSE).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.open_table(IDEMPOTENCY_EXPIRY).map_err(backend)?;
            txn.open_table(TAG_DEVICES).map_err(backend)?;
            txn.open_table(ALIAS_DEVICES).map_err(backend)?;
            txn.open_table(STREAM_ENTRIES).map_err(backend)?;
            txn.open_table(STREAM_SIZE).map_err(backend)?;
            txn.open_table(STREAM_META).map_err(backend)?;
            txn.open_table(STREAM_EXPIRY).map_err(backend)?;
            txn.open_table(STREAM_COLLAPSE).map_err(backend)?;
            txn.open_table(OPT_OUT).map_err(backend)?;
            txn.open_table(CAPPED).map_err(backend)?;
            txn.open_table(CAPPED_SHARED).map_err(backend)?;
            txn.open_table(SCHEDULE).map_err(backend)?;
            txn.open_table(SCHEDULE_IDS).map_err(backend)?;
            txn.open_table(SCHEDULE_FIRED).map_err(backend)?;
            txn.open_table(STATUS).map_err(backend)?;
            txn.open_table(STATUS_EXPIRY).map_err(backend)?;
            txn.open_table(OPENED).map_err(backend)?;
            txn.open_table(STATUS_DISPLACED).map_err(backend)?;
            txn.open_table(STATS).map_err(backend)?;
            txn.open_table(STATS_EXPIRING).map_err(backend)?;
            txn.open_table(DEVICE_SEEN).map_err(backend)?;
            let folded = counters::fold_left(&txn)?;
            if folded > 0 {
                tracing::info!(
                    devices = folded,
                    "folded the counters a crash left in the log"
                );
            }
            txn.commit().map_err(backend)?;
        }
        let counters = Arc::new(Counters::default());
        let (writes, jobs) = mpsc::channel(queue);
        let taken = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            db: db.clone(),
            taken: taken.clone(),
            max_stored_per_device: limits.max_stored_per_device,
            max_stored_per_stream: limits.max_stored_per_stream,
            seen_refresh: super::seen_refresh(limits),
            routes: routes.clone(),
            counters: counters.clone(),
            fold_interval,
            next_row: 0,
            rows: 0,
            folded_at: Instant::now(),
        };
        std::thread::Builder::new()
            .name("pigeon-store-writer".into())
            .spawn(move || writer.run(jobs))
            .map_err(backend)?;
        let store = Self {
            db,
            writes,
            taken,
            routes,
            claims: Arc::default(),
            counters,
        };
        // The sweeper holds only a weak sender, so dropping the last store handle closes
        // the queue, which ends the writer thread and releases the database file.
        let sweeper = store.writes.downgrade();
        tokio::spawn(async move {
            // The first sweep one interval after opening: replay skips expired rows meanwhile.
            let first = tokio::time::Instant::now() + SWEEP_INTERVAL;
            let mut interval = tokio::time::interval_at(first, SWEEP_INTERVAL);
            let mut more = false;
            loop {
                // A sweep that found more than it removes goes on at once.
                if !more {
                    interval.tick().await;
                }
                let Some(writes) = sweeper.upgrade() else {
                    break;
                };
                let (reply, answer) = oneshot::channel();
                let op = Op::Sweep {
                    now_ms: unix_millis(),
                };
                if writes.send(Job::new(op, reply)).await.is_err() {
                    break;
                }
                drop(writes);
                more = false;
                match answer.await {
                    Ok(Ok(Reply::Swept(left))) => more = left,
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "sweeping expired messages failed"),
                    Err(_) => break,
                }
            }
        });
        Ok(store)
    }

    /// Closes the store: writes queued before this are applied, then one last transaction
    /// records the file's free pages with its commit, so that the next start opens the file at
    /// once instead of checking all of it (as after a crash, which takes seconds a gigabyte).
    /// Writes after it fail with [`StoreError::Closed`].
    pub async fn close(&self) -> Result<()> {
        self.write(Op::Close, true).await.map(|_| ())
    }

    /// Removes messages and idempotency keys that expired before `now_ms`.
    pub async fn sweep(&self, now_ms: u64) -> Result<()> {
        self.write(Op::Sweep { now_ms }, true).await.map(|_| ())
    }

    /// Messages stored in all queues, for metrics.
    pub async fn stored_messages(&self) -> Result<u64> {
        self.read(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let queue = txn.open_table(QUEUE).map_err(backend)?;
            queue.len().map_err(backend)
        })
        .await
    }

    /// For each of `names`, the tokens of the index rows `app \0 name \0 token` of `table`.
    async fn tokens_by_prefix(
        &self,
        table: TableDefinition<'static, &'static str, ()>,
        app: &str,
        names: &[String],
    ) -> Result<Vec<Vec<String>>> {
        let prefixes: Vec<String> = names
            .iter()
            .map(|name| format!("{app}\0{name}\0"))
            .collect();
        self.read_keys(prefixes.len(), move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let index = txn.open_table(table).map_err(backend)?;
            prefixes
                .iter()
                .map(|prefix| {
                    let mut tokens = Vec::new();
                    for entry in index.range(prefix.as_str()..).map_err(backend)? {
                        let (key, _) = entry.map_err(backend)?;
                        match key.value().strip_prefix(prefix.as_str()) {
                            Some(token) => tokens.push(token.to_owned()),
                            None => break,
                        }
                    }
                    Ok(tokens)
                })
                .collect()
        })
        .await
    }

    /// Adds the device's route (from the connection table) to a change of its tags.
    fn routed(&self, mut retagged: Retagged) -> Retagged {
        retagged.route = self.routes.route(&retagged.token);
        retagged
    }

    async fn write(&self, op: Op, wait_for_room: bool) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        let job = Job::new(op, reply);
        if wait_for_room {
            self.writes
                .send(job)
                .await
                .map_err(|_| StoreError::Closed)?;
        } else {
            self.writes.try_send(job).map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(backend)?
    }

    /// A read of `keys` keys: on this thread for at most [`INLINE_KEYS`] (see the module
    /// docs), else on the blocking pool.
    async fn read_keys<T: Send + 'static>(
        &self,
        keys: usize,
        read: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if keys <= INLINE_KEYS {
            return read(&self.db);
        }
        self.read(read).await
    }
}

#[async_trait]
impl Registry for EmbeddedStore {
    async fn admit_device(&self, app: &str, uid: &str, token: &str) -> Result<AdmittedDevice> {
        let op = Op::Admit {
            app: app.to_owned(),
            uid: uid.to_owned(),
            token: token.to_owned(),
        };
        match self.write(op, true).await? {
            Reply::Admitted(device) => Ok(device),
            _ => Err(backend("unexpected reply to admit")),
        }
    }

    async fn tokens_for_uids(&self, app: &str, uids: &[String]) -> Result<Vec<Vec<String>>> {
        self.tokens_by_prefix(BINDINGS, app, uids).await
    }

    async fn known_tokens(&self, app: &str, tokens: &[String]) -> Result<Vec<bool>> {
        let app = app.to_owned();
        let tokens = tokens.to_vec();
        self.read_keys(tokens.len(), move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let devices = txn.open_table(DEVICES).map_err(backend)?;
            tokens
                .iter()
                .map(|token| {
                    let record = devices.get(token.as_str()).map_err(backend)?;
                    match record {
                        Some(value) => Ok(decode_device(value.value())?.app == app),
                        None => Ok(false),
                    }
                })
                .collect()
        })
        .await
    }

    async fn device(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>> {
        let (app, token) = (app.to_owned(), token.to_owned());
        let routes = self.routes.clone();
        self.read_keys(1, move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let devices = txn.open_table(DEVICES).map_err(backend)?;
            let Some(value) = devices.get(token.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            let record = decode_device(value.value())?;
            Ok((record.app == app).then(|| DeviceInfo {
                tags: device_tags(&record),
                uid: record.uid,
                alias: record.alias,
                route: routes.route(&token),
            }))
        })
        .await
    }

    async fn inactive_devices(
        &self,
        app: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Option<Route>)>> {
        let app = app.to_owned();
        let routes = self.routes.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let seen = txn.open_table(DEVICE_SEEN).map_err(backend)?;
            seen.range((app.as_str(), 0, "")..(app.as_str(), before_ms, ""))
                .map_err(backend)?
                .take(limit)
                .map(|entry| {
                    let (key, _) = entry.map_err(backend)?;
                    let token = key.value().2.to_owned();
                    let route = routes.route(&token);
                    Ok((token, route))
                })
                .collect()
        })
        .await
    }

    async fn touch_device(&self, app: &str, token: &str) -> Result<()> {
        let op = Op::Seen {
            app: app.to_owned(),
            token: token.to_owned(),
        };
        self.write(op, true).await.map(|_| ())
    }

    async fn unregister(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>> {
        let route = self.routes.route(token);
        let op = Op::Unregister {
            app: app.to_owned(),
            token: token.to_owned(),
        };
        match self.write(op, true).await? {
            Reply::Unregistered(record) => Ok(record.map(|record| DeviceInfo {
                tags: device_tags(&record),
                uid: record.uid,
                alias: record.alias,
                route,
            })),
            _ => Err(backend("unexpected reply to unregister")),
        }
    }

    async fn set_tags(&self, app: &str, token: &str, tags: &[String]) -> Result<Option<Retagged>> {
        let op = Op::SetTags {
            app: app.to_owned(),
            token: token.to_owned(),
            tags: tags.to_vec(),
        };
        match self.write(op, true).await? {
            Reply::Retagged(retagged) => Ok(retagged.map(|retagged| self.routed(retagged))),
            _ => Err(backend("unexpected reply to set_tags")),
        }
    }

    async fn change_tag(
        &self,
        app: &str,
        tag: &str,
        change: TagChange,
        max_tags: usize,
    ) -> Result<(TagChanged, Vec<Retagged>)> {
        let op = Op::ChangeTag {
            app: app.to_owned(),
            tag: tag.to_owned(),
            change,
            max_tags,
        };
        match self.write(op, true).await? {
            Reply::TagChanged(changed, retagged) => Ok((
                changed,
                retagged
                    .into_iter()
                    .map(|retagged| self.routed(retagged))
                    .collect(),
            )),
            _ => Err(backend("unexpected reply to change_tag")),
        }
    }

    async fn tag_devices(
        &self,
        app: &str,
        tag: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let prefix = format!("{app}\0{tag}\0");
        let start = format!("{prefix}{after}");
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(TAG_DEVICES).map_err(backend)?;
            let range = (
                std::ops::Bound::Excluded(start.as_str()),
                std::ops::Bound::Unbounded,
            );
            let mut tokens = Vec::new();
            for entry in table.range::<&str>(range).map_err(backend)? {
                let (key, _) = entry.map_err(backend)?;
                match key.value().strip_prefix(prefix.as_str()) {
                    Some(token) if tokens.len() < limit => tokens.push(token.to_owned()),
                    _ => break,
                }
            }
            Ok(tokens)
        })
        .await
    }

    async fn set_alias(
        &self,
        app: &str,
        token: &str,
        alias: Option<&str>,
        max_devices: usize,
    ) -> Result<AliasSet> {
        let op = Op::SetAlias {
            app: app.to_owned(),
            token: token.to_owned(),
            alias: alias.map(str::to_owned),
            max_devices,
        };
        match self.write(op, true).await? {
            Reply::Alias(outcome) => Ok(outcome),
            _ => Err(backend("unexpected reply to set_alias")),
        }
    }

    async fn set_opt_out(&self, app: &str, uid: &str, opt_out: &[String]) -> Result<()> {
        let op = Op::SetOptOut {
            key: format!("{app}\0{uid}"),
            opt_out: opt_out.join("\n"),
        };
        self.write(op, false).await.map(|_| ())
    }

    async fn count_capped(
        &self,
        app: &str,
        uids: &[String],
        window: u64,
        _window_ms: u64,
        cap: u32,
    ) -> Result<Vec<Option<u32>>> {
        let keys = uids.iter().map(|uid| format!("{app}\0{uid}")).collect();
        match self
            .write(Op::CountCapped { keys, window, cap }, false)
            .await?
        {
            Reply::Counted(counted) => Ok(counted),
            _ => Err(backend("unexpected reply to a count")),
        }
    }

    async fn count_shared_capped(
        &self,
        app: &str,
        got: &[(String, String)],
        window: u64,
        _window_ms: u64,
        cap: u32,
    ) -> Result<Vec<bool>> {
        let got = got
            .iter()
            .map(|(uid, message)| (format!("{app}\0{uid}"), message.clone()))
            .collect();
        match self
            .write(Op::CountSharedCapped { got, window, cap }, false)
            .await?
        {
            Reply::Reached(reached) => Ok(reached),
            _ => Err(backend("unexpected reply to a count")),
        }
    }

    async fn opt_outs(&self, app: &str, uids: &[String]) -> Result<Vec<Vec<String>>> {
        let keys: Vec<String> = uids.iter().map(|uid| format!("{app}\0{uid}")).collect();
        self.read_keys(keys.len(), move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(OPT_OUT).map_err(backend)?;
            keys.iter()
                .map(|key| {
                    Ok(table
                        .get(key.as_str())
                        .map_err(backend)?
                        .map(|text| text.value().lines().map(str::to_owned).collect())
                        .unwrap_or_default())
                })
                .collect()
        })
        .await
    }

    async fn tokens_for_aliases(&self, app: &str, aliases: &[String]) -> Result<Vec<Vec<String>>> {
        self.tokens_by_prefix(ALIAS_DEVICES, app, aliases).await
    }
}

#[async_trait]
impl OfflineStore for EmbeddedStore {
    async fn record(&self, accept: Accept) -> Result<AcceptOutcome> {
        match self.write(Op::Accept(accept), false).await? {
            Reply::Accepted(outcome) => Ok(outcome),
            _ => Err(backend("unexpected reply to accept")),
        }
    }

    async fn ack(&self, token: &str, seq: u64) -> Result<()> {
        let op = Op::Ack {
            token: token.to_owned(),
            seq,
        };
        self.write(op, true).await.map(|_| ())
    }

    async fn replay(&self, token: &str, after: u64, limit: u32) -> Result<Replay> {
        let token = token.to_owned();
        let now_ms = unix_millis();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let queue = txn.open_table(QUEUE).map_err(backend)?;
            let start = after.saturating_add(1);
            let mut replay = Replay::default();
            for entry in queue
                .range((token.as_str(), start)..=(token.as_str(), u64::MAX))
                .map_err(backend)?
            {
                let (key, value) = entry.map_err(backend)?;
                if replay.deliveries.len() >= limit as usize {
                    replay.more = true;
                    break;
                }
                let message = Message::from_stored(decode_stored(value.value())?);
                if message.is_expired(now_ms) {
                    continue;
                }
                replay.deliveries.push(Delivery {
                    seq: key.value().1,
                    message: Arc::new(message),
                });
            }
            Ok(replay)
        })
        .await
    }

    async fn counters(&self, token: &str) -> Result<Option<DeviceCounters>> {
        let token = token.to_owned();
        let counters = self.counters.clone();
        self.read_keys(1, move |db| {
            // Begun with the latest counters held, so that it sees the fold of any it no
            // longer holds.
            let (txn, latest) = counters.with_latest(|latest| {
                let txn = db.begin_read().map_err(backend);
                (txn, latest.get(&token).copied())
            });
            let devices = txn?.open_table(DEVICES).map_err(backend)?;
            let record = devices
                .get(token.as_str())
                .map_err(backend)?
                .map(|value| decode_device(value.value()))
                .transpose()?;
            Ok(record.map(|mut record| {
                if let Some(counts) = latest {
                    counts.apply(&mut record);
                }
                DeviceCounters {
                    pending: u64::from(record.pending),
                    dropped: record.dropped,
                    collapsed: record.collapsed,
                }
            }))
        })
        .await
    }

    async fn append(
        &self,
        app: &str,
        stream: &str,
        message: Arc<Message>,
        once: Option<Once>,
    ) -> Result<AppendOutcome> {
        let op = Op::Append {
            app: app.to_owned(),
            stream: stream.to_owned(),
            message,
            once,
        };
        match self.write(op, false).await? {
            Reply::Appended(outcome) => Ok(outcome),
            _ => Err(backend("unexpected reply to append")),
        }
    }

    async fn stream_head(&self, app: &str, stream: &str) -> Result<StreamHead> {
        let key = format!("{app}\0{stream}");
        self.read_keys(1, move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let metas = txn.open_table(STREAM_META).map_err(backend)?;
            let head = match metas.get(key.as_str()).map_err(backend)? {
                Some(value) => {
                    let meta = StreamMeta::decode(value.value()).map_err(backend)?;
                    StreamHead {
                        epoch: meta.epoch,
                        head: meta.head,
                    }
                }
                None => StreamHead::default(),
            };
            Ok(head)
        })
        .await
    }

    async fn read_stream(
        &self,
        app: &str,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<StreamRead> {
        let key = format!("{app}\0{stream}");
        let now_ms = unix_millis();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let entries = txn.open_table(STREAM_ENTRIES).map_err(backend)?;
            let start = after.saturating_add(1);
            let mut read = StreamRead::default();
            for entry in entries
                .range((key.as_str(), start)..=(key.as_str(), u64::MAX))
                .map_err(backend)?
            {
                let (k, value) = entry.map_err(backend)?;
                if read.entries.len() >= limit as usize {
                    read.more = true;
                    break;
                }
                let message = Message::from_stored(decode_stored(value.value())?);
                if message.is_expired(now_ms) {
                    continue;
                }
                read.entries.push((k.value().1, Arc::new(message)));
            }
            Ok(read)
        })
        .await
    }

    async fn ack_stream(&self, token: &str, stream: &str, epoch: u64, offset: u64) -> Result<()> {
        if stream != ALL {
            return Ok(());
        }
        let op = Op::AckStream {
            token: token.to_owned(),
            epoch,
            offset,
        };
        self.write(op, true).await.map(|_| ())
    }
}

/// A new stream epoch: 64 random bits, never 0 (0 is no epoch).
fn new_epoch() -> u64 {
    rand::random::<u64>().max(1)
}

/// A device's place in a stream, from the stream's meta and the device's record of its
/// place (`epoch`, `acked`).
fn place(meta: &StreamMeta, epoch: u64, acked: u64) -> StreamPlace {
    let same_epoch = meta.epoch == epoch;
    StreamPlace {
        epoch: meta.epoch,
        acked: if same_epoch { acked.min(meta.head) } else { 0 },
        head: meta.head,
        trimmed: meta.trimmed,
        epoch_changed: !same_epoch,
    }
}

/// A device's tags as its record has them.
fn device_tags(record: &DeviceRecord) -> DeviceTags {
    DeviceTags {
        tags: record
            .tags
            .iter()
            .map(|tag| DeviceTag {
                name: tag.name.clone(),
                since: tag.since,
            })
            .collect(),
        version: record.tags_version,
    }
}

/// The device `token`'s tags after a change (its route is added outside the transaction).
fn retagged(token: &str, record: &DeviceRecord) -> Retagged {
    Retagged {
        token: token.to_owned(),
        tags: device_tags(record),
        route: None,
    }
}

fn decode_device(bytes: &[u8]) -> Result<DeviceRecord> {
    DeviceRecord::decode(bytes).map_err(backend)
}

fn decode_stored(bytes: &[u8]) -> Result<StoredMessage> {
    StoredMessage::decode(bytes).map_err(backend)
}

/// Writes applied in each transaction (each transaction is one fsync).
static TRANSACTION_OPS: Histogram = Histogram::new(&BATCH_SIZES);
/// How long each transaction took, from its start to its commit (the fsync included).
static TRANSACTION_SECONDS: Histogram = Histogram::new(&CALL_SECONDS);
/// How long each fold of the counter log into the devices' records took (see `counters`).
static FOLD_SECONDS: Histogram = Histogram::new(&CALL_SECONDS);
/// How long each write took, from its queueing to its transaction's commit, by lane.
static WRITE_SECONDS: [Histogram; 3] = [const { Histogram::new(&CALL_SECONDS) }; 3];
/// The names of the lanes in the metrics, by lane.
const LANE_NAMES: [&str; 3] = ["high", "normal", "low"];

impl EmbeddedStore {
    /// Writes waiting for the writer, the writes and time of each transaction, and how long
    /// writes waited by lane, in Prometheus's text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let queued = self.writes.max_capacity() - self.writes.capacity()
            + self.taken.load(Ordering::Relaxed);
        let name = "pigeon_store_queue";
        let _ = writeln!(
            out,
            "# HELP {name} Writes waiting for the embedded store's writer: in its queue \
             (limits.store_queue at most) and taken into its lanes ({TAKEN} at most).\n\
             # TYPE {name} gauge\n{name} {queued}"
        );
        let name = "pigeon_store_transaction_writes";
        Histogram::header(
            out,
            name,
            "Writes the embedded store applied in one transaction (one fsync).",
        );
        TRANSACTION_OPS.render(out, name, "");
        let name = "pigeon_store_transaction_seconds";
        Histogram::header(
            out,
            name,
            "Time the embedded store took for one transaction: its writes and its commit \
             (the fsync).",
        );
        TRANSACTION_SECONDS.render(out, name, "");
        let name = "pigeon_store_write_seconds";
        Histogram::header(
            out,
            name,
            "Time a write waited for the embedded store, from its queueing to its \
             transaction's commit, by the lane it waited in: high (high-priority pushes and \
             the store's upkeep: acks, admissions, statuses), normal, low (marketing and \
             low-priority pushes).",
        );
        for (histogram, lane) in WRITE_SECONDS.iter().zip(LANE_NAMES) {
            histogram.render(out, name, &format!("lane=\"{lane}\""));
        }
        let name = "pigeon_store_counter_devices";
        let devices = self.counters.devices();
        let _ = writeln!(
            out,
            "# HELP {name} Devices whose counters (seqs, pending) changed since the embedded \
             store last folded its counter log into their records: held in memory, folded \
             once past {FOLD_DEVICES}.\n\
             # TYPE {name} gauge\n{name} {devices}"
        );
        let name = "pigeon_store_fold_seconds";
        Histogram::header(
            out,
            name,
            "Time the embedded store took to fold its counter log into the devices' records \
             (one transaction, every few seconds while devices' counters change).",
        );
        FOLD_SECONDS.render(out, name, "");
    }
}

/// The single owner of write transactions.
struct Writer {
    db: Arc<Database>,
    /// How many writes it has taken into its lanes and not yet applied (for the metrics).
    taken: Arc<AtomicUsize>,
    max_stored_per_device: u32,
    max_stored_per_stream: u32,
    /// How old a device's last admission may be before an admission writes the new one;
    /// `None`: devices never expire, none is written.
    seen_refresh: Option<u64>,
    routes: Arc<dyn Routes>,
    counters: Arc<Counters>,
    fold_interval: Duration,
    /// The key of the counter log's next row, the rows written since the last fold, and
    /// when that was.
    next_row: u64,
    rows: u64,
    folded_at: Instant,
}

impl Writer {
    /// Applies the queue's operations until it is closed and empty, or a close comes: each
    /// transaction takes what waits, by lane and app when more waits than one takes; a close
    /// waits until nothing else does, then ends it.
    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut lanes = WeightedQueues::default();
        let mut taken = 0;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = None;
        loop {
            if taken == 0 {
                if let Some(close) = closing.take() {
                    return self.close(close);
                }
                let Some(job) = jobs.blocking_recv() else {
                    return;
                };
                take(&mut lanes, &mut closing, &mut taken, job);
            }
            while taken < TAKEN {
                let Ok(job) = jobs.try_recv() else {
                    break;
                };
                take(&mut lanes, &mut closing, &mut taken, job);
            }
            if taken == 0 {
                continue;
            }
            while batch.len() < MAX_BATCH
                && let Some(job) = lanes.pop()
            {
                batch.push(job);
            }
            taken -= batch.len();
            self.taken.store(taken, Ordering::Relaxed);
            TRANSACTION_OPS.observe(batch.len() as f64);
            self.apply(&mut batch);
            if self.rows >= FOLD_ROWS
                || self.counters.devices() >= FOLD_DEVICES
                || (self.rows > 0 && self.folded_at.elapsed() >= self.fold_interval)
            {
                self.fold();
            }
        }
    }

    /// Folds the counter log into the devices' records (see `counters`); a fold that fails
    /// leaves the log as it was, for the next one.
    fn fold(&mut self) {
        let started = Instant::now();
        let outcome = (|| -> Result<()> {
            let mut txn = self.db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate).map_err(backend)?;
            self.counters.fold(&txn)?;
            txn.commit().map_err(backend)
        })();
        self.folded_at = Instant::now();
        FOLD_SECONDS.observe_duration(self.folded_at - started);
        match outcome {
            Ok(()) => {
                self.counters.folded();
                self.rows = 0;
            }
            Err(error) => tracing::error!(%error, "folding the devices' counters failed"),
        }
    }

    /// Commits an empty transaction that records the allocator's state (redb's quick
    /// repair: two-phase, so that a commit is slower), answers `close` and lets the queue go.
    fn close(&self, close: Job) {
        let outcome = (|| -> Result<()> {
            let mut txn = self.db.begin_write().map_err(backend)?;
            txn.set_quick_repair(true);
            self.counters.fold(&txn)?;
            txn.commit().map_err(backend)?;
            self.counters.folded();
            Ok(())
        })();
        if let Err(error) = &outcome {
            tracing::error!(%error, "closing the store failed: the next start checks it all");
        }
        let _ = close.reply.send(outcome.map(|()| Reply::Done));
    }

    /// Applies a batch in one transaction and answers every job.
    fn apply(&mut self, batch: &mut Vec<Job>) {
        let started = Instant::now();
        let mut replies = Vec::with_capacity(batch.len());
        let lanes: Vec<usize> = batch.iter().map(|job| job.op.lane().0).collect();
        let outcome = (|| -> Result<Staged> {
            let mut txn = self.db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate).map_err(backend)?;
            let staged = {
                let mut tables = Tables::new(&txn, &self.counters, self.next_row);
                for job in batch.iter_mut() {
                    let op = std::mem::replace(&mut job.op, Op::Sweep { now_ms: 0 });
                    replies.push(self.apply_one(&mut tables, op)?);
                }
                tables.staged
            };
            txn.commit().map_err(backend)?;
            Ok(staged)
        })();
        let outcome = outcome.map(|staged| {
            self.rows += staged.next - self.next_row;
            self.next_row = staged.next;
            self.counters.committed(staged.counts);
        });
        let committed = Instant::now();
        TRANSACTION_SECONDS.observe_duration(committed - started);
        for (job, lane) in batch.iter().zip(lanes) {
            WRITE_SECONDS[lane].observe_duration(committed - job.queued);
        }
        match outcome {
            Ok(()) => {
                for (job, reply) in batch.drain(..).zip(replies) {
                    let _ = job.reply.send(Ok(reply));
                }
            }
            Err(error) => {
                tracing::error!(%error, operations = batch.len(), "store transaction failed");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(error_copy(&error)));
                }
            }
        }
    }

    fn apply_one(&self, tables: &mut Tables<'_>, op: Op) -> Result<Reply> {
        match op {
            Op::Admit { app, uid, token } => tables
                .admit(&app, &uid, &token, self.seen_refresh)
                .map(Reply::Admitted),
            Op::Seen { app, token } => tables.touch(&app, &token).map(|()| Reply::Done),
            Op::Accept(accept) => tables
                .accept(accept, self.max_stored_per_device, self.routes.as_ref())
                .map(Reply::Accepted),
            Op::Ack { token, seq } => tables.ack(&token, seq).map(|()| Reply::Done),
            Op::Sweep { now_ms } => tables.sweep(now_ms).map(Reply::Swept),
            Op::SetTags { app, token, tags } => {
                tables.set_tags(&app, &token, tags).map(Reply::Retagged)
            }
            Op::ChangeTag {
                app,
                tag,
                change,
                max_tags,
            } => tables
                .change_tag(&app, &tag, change, max_tags)
                .map(|(changed, retagged)| Reply::TagChanged(changed, retagged)),
            Op::SetAlias {
                app,
                token,
                alias,
                max_devices,
            } => tables
                .set_alias(&app, &token, alias.as_deref(), max_devices)
                .map(Reply::Alias),
            Op::Append {
                app,
                stream,
                message,
                once,
            } => tables
                .append(&app, &stream, message, once, self.max_stored_per_stream)
                .map(Reply::Appended),
            Op::AckStream {
                token,
                epoch,
                offset,
            } => tables
                .ack_stream(&token, epoch, offset)
                .map(|()| Reply::Done),
            Op::CountCapped { keys, window, cap } => {
                tables.count_capped(&keys, window, cap).map(Reply::Counted)
            }
            Op::CountSharedCapped { got, window, cap } => tables
                .count_shared_capped(&got, window, cap)
                .map(Reply::Reached),
            Op::SetOptOut { key, opt_out } => {
                tables.set_opt_out(&key, &opt_out).map(|()| Reply::Done)
            }
            Op::Schedule { key, at_ms, job } => {
                tables.add_schedule(&key, at_ms, &job).map(Reply::Scheduled)
            }
            Op::Cancel { key } => tables.cancel(&key).map(Reply::Cancel),
            Op::Fired {
                keys,
                keep_until_ms,
            } => {
                for key in keys {
                    tables.fire(&key, keep_until_ms)?;
                }
                Ok(Reply::Done)
            }
            Op::Unregister { app, token } => {
                tables.unregister(&app, &token).map(Reply::Unregistered)
            }
            Op::PutStatuses { statuses } => {
                let none = ReceiptCount::default();
                for (key, status, keep_until_ms) in statuses {
                    tables.put_status(&key, Some(&status), &none, keep_until_ms)?;
                }
                Ok(Reply::Done)
            }
            Op::CountReceipts {
                counts,
                keep_until_ms,
            } => {
                let mut opened: Vec<NewlyOpened> = Vec::new();
                for count in counts {
                    let key = status_key(&count.app, &count.id);
                    let devices = tables.put_status(&key, None, &count, keep_until_ms)?;
                    if devices == 0 {
                        continue;
                    }
                    let Some(class) = tables.status_class(&key)? else {
                        continue;
                    };
                    NewlyOpened::add_to(&mut opened, &count.app, class, devices);
                }
                Ok(Reply::Opened(opened))
            }
            Op::AddStats { rows, oldest } => tables.add_stats(rows, oldest).map(|()| Reply::Done),
            // Never in a batch: `take` holds a close aside until nothing else waits.
            Op::Close => Ok(Reply::Done),
        }
    }
}

/// Queues `job` in its lane and app for the writer, counting it in `taken`; a close waits
/// in `closing` (a second one is answered at once: the first closes).
fn take(lanes: &mut WeightedQueues<Job>, closing: &mut Option<Job>, taken: &mut usize, job: Job) {
    if let Op::Close = job.op {
        match closing {
            None => *closing = Some(job),
            Some(_) => {
                let _ = job.reply.send(Ok(Reply::Done));
            }
        }
        return;
    }
    let (lane, app) = job.op.lane();
    let app = app.to_owned();
    lanes.push(lane, &app, job);
    *taken += 1;
}

fn error_copy(error: &StoreError) -> StoreError {
    match error {
        StoreError::Overloaded => StoreError::Overloaded,
        StoreError::Backend(message) => StoreError::Backend(message.clone()),
        StoreError::Closed => StoreError::Closed,
    }
}

/// The tables of one write transaction, each opened when first used: a transaction of a
/// few writes touches a few tables, and every table opened costs the opening and, at the
/// commit, a lookup of its root (BENCHMARKS.md, "Tables opened when used").
macro_rules! tables {
    ($($name:ident: $definition:ident, $key:ty, $value:ty;)*) => {
        struct Tables<'txn> {
            txn: &'txn redb::WriteTransaction,
            /// The devices' latest committed counters, and what this transaction changed.
            counters: &'txn Counters,
            staged: Staged,
            $($name: Option<redb::Table<'txn, $key, $value>>,)*
        }

        impl<'txn> Tables<'txn> {
            fn new(
                txn: &'txn redb::WriteTransaction,
                counters: &'txn Counters,
                next_row: u64,
            ) -> Self {
                Self {
                    txn,
                    counters,
                    staged: Staged::new(next_row),
                    $($name: None,)*
                }
            }

            $(
                fn $name(&mut self) -> Result<&mut redb::Table<'txn, $key, $value>> {
                    let table = match self.$name.take() {
                        Some(table) => table,
                        None => self.txn.open_table($definition).map_err(backend)?,
                    };
                    Ok(self.$name.insert(table))
                }
            )*
        }
    };
}

tables! {
    devices: DEVICES, &'static str, &'static [u8];
    bindings: BINDINGS, &'static str, ();
    queue: QUEUE, (&'static str, u64), &'static [u8];
    expiry: EXPIRY, (u64, &'static str, u64), ();
    collapse: COLLAPSE, &'static str, u64;
    idempotency: IDEMPOTENCY, &'static str, &'static [u8];
    idempotency_expiry: IDEMPOTENCY_EXPIRY, (u64, &'static str), ();
    tag_devices: TAG_DEVICES, &'static str, ();
    alias_devices: ALIAS_DEVICES, &'static str, ();
    stream_entries: STREAM_ENTRIES, (&'static str, u64), &'static [u8];
    stream_size: STREAM_SIZE, &'static str, u64;
    stream_meta: STREAM_META, &'static str, &'static [u8];
    stream_expiry: STREAM_EXPIRY, (u64, &'static str, u64), ();
    stream_collapse: STREAM_COLLAPSE, &'static str, u64;
    opt_out: OPT_OUT, &'static str, &'static str;
    capped: CAPPED, (u64, &'static str), u32;
    capped_shared: CAPPED_SHARED, (u64, &'static str), ();
    schedule: SCHEDULE, (u64, &'static str), &'static [u8];
    schedule_ids: SCHEDULE_IDS, &'static str, (u64, u64);
    schedule_fired: SCHEDULE_FIRED, (u64, &'static str), ();
    status: STATUS, &'static str, (&'static [u8], u64, u64, u64, u64);
    opened: OPENED, &'static str, ();
    status_displaced: STATUS_DISPLACED, &'static str, (u64, u64);
    status_expiry: STATUS_EXPIRY, (u64, &'static str), ();
    stats_expiring: STATS_EXPIRING, (u64, &'static str, u32), i64;
    stats: STATS, (u64, &'static str, u32), [u64; 5];
    device_seen: DEVICE_SEEN, (&'static str, u64, &'static str), ();
    counter_log: COUNTER_LOG, u64, (&'static str, [u64; 5]);
}

impl Tables<'_> {
    /// Adds `rows` (those of minutes before `oldest` are left out), and forgets a few rows
    /// of minutes before `oldest`.
    fn add_stats(&mut self, rows: Vec<StatsRow>, oldest: u64) -> Result<()> {
        for row in rows.iter().filter(|row| row.minute >= oldest) {
            let key = (row.minute, row.app.as_str(), row.class.to_stored());
            if row.counts.to_array() != [0; 5] {
                let mut counts = self
                    .stats()?
                    .get(key)
                    .map_err(backend)?
                    .map(|counts| StatsCounts::from_array(counts.value()))
                    .unwrap_or_default();
                counts.add(row.counts);
                self.stats()?
                    .insert(key, counts.to_array())
                    .map_err(backend)?;
            }
            if row.counts.expiring != 0 {
                let expiring = self.stats_expiring()?.get(key).map_err(backend)?;
                let expiring = expiring.map_or(0, |n| n.value()) + row.counts.expiring;
                self.stats_expiring()?
                    .insert(key, expiring)
                    .map_err(backend)?;
            }
        }
        forget_minutes_before(self.stats()?, oldest)?;
        forget_minutes_before(self.stats_expiring()?, oldest)
    }

    /// The class of the message whose status is at `key`, when its status is kept.
    fn status_class(&mut self, key: &str) -> Result<Option<Class>> {
        let Some(row) = self.status()?.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let status = row.value().0;
        if status.is_empty() {
            return Ok(None);
        }
        let status = MessageStatus::decode(status).map_err(backend)?;
        Ok(Some(Class::from_name(&status.class).unwrap_or_default()))
    }

    /// Writes a message's status (when given) and adds `counts` to its counts (the devices
    /// that opened it each once; its app and id are not read); it is kept until
    /// `keep_until_ms` at least. Returns how many devices opened it for the first time.
    fn put_status(
        &mut self,
        key: &str,
        status: Option<&[u8]>,
        counts: &ReceiptCount,
        keep_until_ms: u64,
    ) -> Result<u64> {
        let row = self.status()?.get(key).map_err(backend)?.map(|row| {
            let (old, delivered, acked, until, opened) = row.value();
            (old.to_vec(), delivered, acked, until, opened)
        });
        let ReceiptCount {
            delivered,
            acked,
            ref opened_by,
            collapsed,
            dropped,
            ..
        } = *counts;
        if collapsed > 0 || dropped > 0 {
            let (old_collapsed, old_dropped) = self
                .status_displaced()?
                .get(key)
                .map_err(backend)?
                .map_or((0, 0), |row| row.value());
            let row = (old_collapsed + collapsed, old_dropped + dropped);
            self.status_displaced()?.insert(key, row).map_err(backend)?;
        }
        let counted = delivered > 0 || acked > 0 || collapsed > 0 || dropped > 0;
        if row.is_none() && status.is_none() && !counted {
            // Only "opened" reports, for a message with no status: none of the app's.
            return Ok(0);
        }
        let exists = row.is_some();
        let (old, old_delivered, old_acked, old_until, mut opened) =
            row.unwrap_or((Vec::new(), 0, 0, 0, 0));
        let mut newly_opened = 0;
        for token in opened_by {
            let device = format!("{key}\0{token}");
            let before = self
                .opened()?
                .insert(device.as_str(), ())
                .map_err(backend)?;
            if before.is_none() {
                newly_opened += 1;
            }
        }
        opened += newly_opened;
        // A status written keeps the row for its retention; counts only keep a row they
        // create (so that each flush does not add an expiry row).
        let until = match (status, exists) {
            (Some(_), _) | (None, false) => old_until.max(keep_until_ms),
            (None, true) => old_until,
        };
        let status = status.unwrap_or(&old);
        let row = (
            status,
            old_delivered.saturating_add(delivered),
            old_acked.saturating_add(acked),
            until,
            opened,
        );
        self.status()?.insert(key, row).map_err(backend)?;
        if until != old_until {
            self.status_expiry()?
                .insert((until, key), ())
                .map_err(backend)?;
        }
        Ok(newly_opened)
    }

    /// Counts one more capped push per key in `window`, for those under `cap`; forgets a
    /// few counts of earlier windows on the way.
    fn count_capped(&mut self, keys: &[String], window: u64, cap: u32) -> Result<Vec<Option<u32>>> {
        self.sweep_capped(window, keys.len())?;
        let mut counted = Vec::with_capacity(keys.len());
        for key in keys {
            let n = self.capped_count(window, key)?;
            if n >= cap {
                counted.push(None);
            } else {
                self.capped()?
                    .insert((window, key.as_str()), n + 1)
                    .map_err(backend)?;
                counted.push(Some(n + 1));
            }
        }
        Ok(counted)
    }

    /// Counts each `(app \0 uid, message id)` of `got` once in `window`, while the uid is
    /// under `cap`: per pair, whether the uid has had `cap` now.
    fn count_shared_capped(
        &mut self,
        got: &[(String, String)],
        window: u64,
        cap: u32,
    ) -> Result<Vec<bool>> {
        self.sweep_capped(window, got.len())?;
        let mut reached = Vec::with_capacity(got.len());
        for (key, message) in got {
            let mut n = self.capped_count(window, key)?;
            let seen = format!("{key}\0{message}");
            if n < cap
                && self
                    .capped_shared()?
                    .get((window, seen.as_str()))
                    .map_err(backend)?
                    .is_none()
            {
                self.capped_shared()?
                    .insert((window, seen.as_str()), ())
                    .map_err(backend)?;
                n += 1;
                self.capped()?
                    .insert((window, key.as_str()), n)
                    .map_err(backend)?;
            }
            reached.push(n >= cap);
        }
        Ok(reached)
    }

    /// The capped pushes `key` (`app \0 uid`) has had in `window`.
    fn capped_count(&mut self, window: u64, key: &str) -> Result<u32> {
        Ok(self
            .capped()?
            .get((window, key))
            .map_err(backend)?
            .map_or(0, |n| n.value()))
    }

    /// Forgets a few counts of windows before `window` (some more than `touched`).
    fn sweep_capped(&mut self, window: u64, touched: usize) -> Result<()> {
        for (at, key) in keys_before(self.capped()?, window, touched.max(16))? {
            self.capped()?.remove((at, key.as_str())).map_err(backend)?;
        }
        for (at, key) in keys_before(self.capped_shared()?, window, touched.max(16))? {
            self.capped_shared()?
                .remove((at, key.as_str()))
                .map_err(backend)?;
        }
        Ok(())
    }

    fn set_opt_out(&mut self, key: &str, opt_out: &str) -> Result<()> {
        if opt_out.is_empty() {
            self.opt_out()?.remove(key).map_err(backend)?;
        } else {
            self.opt_out()?.insert(key, opt_out).map_err(backend)?;
        }
        Ok(())
    }

    fn add_schedule(&mut self, key: &str, at_ms: u64, job: &[u8]) -> Result<bool> {
        if self.schedule_ids()?.get(key).map_err(backend)?.is_some() {
            return Ok(false);
        }
        self.schedule()?
            .insert((at_ms, key), job)
            .map_err(backend)?;
        self.schedule_ids()?
            .insert(key, (at_ms, WAITING))
            .map_err(backend)?;
        Ok(true)
    }

    fn cancel(&mut self, key: &str) -> Result<Cancel> {
        let Some((due, state)) = self
            .schedule_ids()?
            .get(key)
            .map_err(backend)?
            .map(|v| v.value())
        else {
            return Ok(Cancel::Unknown);
        };
        if state != WAITING {
            return Ok(Cancel::Fired);
        }
        self.schedule()?.remove((due, key)).map_err(backend)?;
        self.schedule_ids()?.remove(key).map_err(backend)?;
        Ok(Cancel::Cancelled)
    }

    /// Marks the scheduled push at `key` fired, remembered until `keep_until_ms`, if it is
    /// waiting; false when it fired before or was cancelled (or never was).
    fn fire(&mut self, key: &str, keep_until_ms: u64) -> Result<bool> {
        let Some((due, state)) = self
            .schedule_ids()?
            .get(key)
            .map_err(backend)?
            .map(|v| v.value())
        else {
            return Ok(false);
        };
        if state > CLAIMED {
            return Ok(false);
        }
        self.schedule()?.remove((due, key)).map_err(backend)?;
        let keep_until_ms = keep_until_ms.max(CLAIMED + 1);
        self.schedule_ids()?
            .insert(key, (0, keep_until_ms))
            .map_err(backend)?;
        self.schedule_fired()?
            .insert((keep_until_ms, key), ())
            .map_err(backend)?;
        Ok(true)
    }

    /// Whether `once` lets a push be recorded: its idempotency key is not taken (and is now
    /// `message_id`'s), or the scheduled push it fires was waiting (and is now fired).
    /// When it does not: the id of the message already sent.
    fn first_time(&mut self, app: &str, once: &Once, message_id: &str) -> Result<Option<String>> {
        match once {
            Once::Key { key, until_ms } => self.claim_idempotency(app, key, *until_ms, message_id),
            Once::Fires { id, keep_until_ms } => {
                let fired = self.fire(&schedule_key(app, id), *keep_until_ms)?;
                Ok((!fired).then(|| id.clone()))
            }
        }
    }

    /// The record of `token`, with its latest counters (see `counters`).
    fn device(&mut self, token: &str) -> Result<Option<DeviceRecord>> {
        let record = self
            .devices()?
            .get(token)
            .map_err(backend)?
            .map(|value| decode_device(value.value()))
            .transpose()?;
        let Some(mut record) = record else {
            return Ok(None);
        };
        let latest = match self.staged.get(token) {
            Some(staged) => staged,
            None => self.counters.latest(token),
        };
        if let Some(counts) = latest {
            counts.apply(&mut record);
        }
        Ok(Some(record))
    }

    /// Writes the whole record of `token` (its counters as `device` read them).
    fn put_device(&mut self, token: &str, record: &DeviceRecord) -> Result<()> {
        self.devices()?
            .insert(token, record.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    /// Writes the counters of `record` (the rest of it unchanged) to the log (see
    /// `counters`).
    fn put_counts(&mut self, token: &str, record: &DeviceRecord) -> Result<()> {
        let counts = Counts::of(record);
        let row = self.staged.next;
        self.counter_log()?
            .insert(row, (token, counts.to_array()))
            .map_err(backend)?;
        self.staged.next += 1;
        self.staged.counts.insert(token.to_owned(), Some(counts));
        Ok(())
    }

    /// The record of `token` if it is a device of `app`.
    fn device_of(&mut self, app: &str, token: &str) -> Result<Option<DeviceRecord>> {
        Ok(self.device(token)?.filter(|record| record.app == app))
    }

    /// Removes the device `token` of `app` and everything that names it; what it was.
    fn unregister(&mut self, app: &str, token: &str) -> Result<Option<DeviceRecord>> {
        let Some(record) = self.device_of(app, token)? else {
            return Ok(None);
        };
        let seqs: Vec<u64> = self
            .queue()?
            .range((token, 0)..=(token, u64::MAX))
            .map_err(backend)?
            .map(|entry| entry.map(|(key, _)| key.value().1).map_err(backend))
            .collect::<Result<_>>()?;
        for seq in seqs {
            self.remove_message(token, seq)?;
        }
        for tag in &record.tags {
            let key = format!("{app}\0{}\0{token}", tag.name);
            self.tag_devices()?.remove(key.as_str()).map_err(backend)?;
        }
        if !record.alias.is_empty() {
            let key = format!("{app}\0{}\0{token}", record.alias);
            self.alias_devices()?
                .remove(key.as_str())
                .map_err(backend)?;
        }
        let binding = format!("{app}\0{}\0{token}", record.uid);
        self.bindings()?.remove(binding.as_str()).map_err(backend)?;
        self.device_seen()?
            .remove((app, record.seen_ms, token))
            .map_err(backend)?;
        self.devices()?.remove(token).map_err(backend)?;
        self.staged.counts.insert(token.to_owned(), None);
        Ok(Some(record))
    }

    fn set_tags(
        &mut self,
        app: &str,
        token: &str,
        mut names: Vec<String>,
    ) -> Result<Option<Retagged>> {
        let Some(mut record) = self.device_of(app, token)? else {
            return Ok(None);
        };
        names.sort();
        names.dedup();
        let head = self.read_stream_meta(app, ALL)?.head;
        for old in record.tags.iter().filter(|old| !names.contains(&old.name)) {
            let key = format!("{app}\0{}\0{token}", old.name);
            self.tag_devices()?.remove(key.as_str()).map_err(backend)?;
        }
        let mut tags = Vec::with_capacity(names.len());
        for name in names {
            let since = match record.tags.iter().find(|old| old.name == name) {
                Some(old) => old.since,
                None => {
                    let key = format!("{app}\0{name}\0{token}");
                    self.tag_devices()?
                        .insert(key.as_str(), ())
                        .map_err(backend)?;
                    head
                }
            };
            tags.push(StoredTag { name, since });
        }
        record.tags = tags;
        record.tags_version += 1;
        self.put_device(token, &record)?;
        Ok(Some(retagged(token, &record)))
    }

    fn change_tag(
        &mut self,
        app: &str,
        tag: &str,
        change: TagChange,
        max_tags: usize,
    ) -> Result<(TagChanged, Vec<Retagged>)> {
        let mut changed = TagChanged::default();
        let mut touched = Vec::new();
        let head = self.read_stream_meta(app, ALL)?.head;
        for token in &change.add {
            let Some(mut record) = self.device_of(app, token)? else {
                changed.unknown += 1;
                continue;
            };
            if let Err(index) = record
                .tags
                .binary_search_by(|have| have.name.as_str().cmp(tag))
            {
                if record.tags.len() >= max_tags {
                    changed.over_limit += 1;
                    continue;
                }
                let new = StoredTag {
                    name: tag.to_owned(),
                    since: head,
                };
                record.tags.insert(index, new);
                record.tags_version += 1;
                let key = format!("{app}\0{tag}\0{token}");
                self.tag_devices()?
                    .insert(key.as_str(), ())
                    .map_err(backend)?;
                self.put_device(token, &record)?;
                touched.push(retagged(token, &record));
            }
            changed.added += 1;
        }
        for token in &change.remove {
            let key = format!("{app}\0{tag}\0{token}");
            self.tag_devices()?.remove(key.as_str()).map_err(backend)?;
            let Some(mut record) = self.device_of(app, token)? else {
                changed.unknown += 1;
                continue;
            };
            if let Ok(index) = record
                .tags
                .binary_search_by(|have| have.name.as_str().cmp(tag))
            {
                record.tags.remove(index);
                record.tags_version += 1;
                self.put_device(token, &record)?;
                touched.push(retagged(token, &record));
            }
            changed.removed += 1;
        }
        Ok((changed, touched))
    }

    fn set_alias(
        &mut self,
        app: &str,
        token: &str,
        alias: Option<&str>,
        max_devices: usize,
    ) -> Result<AliasSet> {
        let Some(mut record) = self.device_of(app, token)? else {
            return Ok(AliasSet::UnknownDevice);
        };
        let alias = alias.unwrap_or_default();
        if record.alias == alias {
            return Ok(AliasSet::Set);
        }
        if !alias.is_empty() {
            let prefix = format!("{app}\0{alias}\0");
            let named = self
                .alias_devices()?
                .range(prefix.as_str()..)
                .map_err(backend)?
                .take(max_devices)
                .map_while(|entry| {
                    let key = entry.ok()?;
                    key.0.value().starts_with(prefix.as_str()).then_some(())
                })
                .count();
            if named >= max_devices {
                return Ok(AliasSet::AliasFull);
            }
            let key = format!("{prefix}{token}");
            self.alias_devices()?
                .insert(key.as_str(), ())
                .map_err(backend)?;
        }
        if !record.alias.is_empty() {
            let key = format!("{app}\0{}\0{token}", record.alias);
            self.alias_devices()?
                .remove(key.as_str())
                .map_err(backend)?;
        }
        record.alias = alias.to_owned();
        self.put_device(token, &record)?;
        Ok(AliasSet::Set)
    }

    /// Notes in `record` and the index that `app`'s device `token` is in use now, when its
    /// last note is older than `refresh` ms (`None`: never). Whether it did: the record is
    /// then the caller's to write.
    fn note_seen(
        &mut self,
        (app, token): (&str, &str),
        record: &mut DeviceRecord,
        refresh: Option<u64>,
    ) -> Result<bool> {
        let Some(refresh) = refresh else {
            return Ok(false);
        };
        let now = unix_millis();
        if now.saturating_sub(record.seen_ms) < refresh && record.seen_ms != 0 {
            return Ok(false);
        }
        self.device_seen()?
            .remove((app, record.seen_ms, token))
            .map_err(backend)?;
        self.device_seen()?
            .insert((app, now, token), ())
            .map_err(backend)?;
        record.seen_ms = now;
        Ok(true)
    }

    /// Notes that `app`'s device `token` is in use now (it is connected).
    fn touch(&mut self, app: &str, token: &str) -> Result<()> {
        let Some(mut record) = self.device_of(app, token)? else {
            return Ok(());
        };
        if self.note_seen((app, token), &mut record, Some(0))? {
            self.put_device(token, &record)?;
        }
        Ok(())
    }

    fn admit(
        &mut self,
        app: &str,
        uid: &str,
        token: &str,
        seen_refresh: Option<u64>,
    ) -> Result<AdmittedDevice> {
        // A token resumes only the device of its own app and uid: its queue is never handed
        // to anyone else.
        let meta = self.read_stream_meta(app, ALL)?;
        if !token.is_empty()
            && let Some(mut record) = self.device(token)?
            && record.app == app
            && record.uid == uid
        {
            if self.note_seen((app, token), &mut record, seen_refresh)?
                && record.all_epoch == meta.epoch
            {
                self.put_device(token, &record)?;
            }
            if record.all_epoch != meta.epoch {
                // The stream was recreated (its history lost): the device starts over in
                // the new epoch, and its acks count there.
                let old = (record.all_epoch, record.all_acked);
                record.all_epoch = meta.epoch;
                record.all_acked = 0;
                self.put_device(token, &record)?;
                return Ok(AdmittedDevice {
                    token: token.to_owned(),
                    resumed: true,
                    acked_seq: record.acked_seq,
                    highest_seq: record.highest_seq,
                    all: place(&meta, old.0, old.1),
                    tags: device_tags(&record),
                });
            }
            return Ok(AdmittedDevice {
                token: token.to_owned(),
                resumed: true,
                acked_seq: record.acked_seq,
                highest_seq: record.highest_seq,
                all: place(&meta, record.all_epoch, record.all_acked),
                tags: device_tags(&record),
            });
        }
        let token = new_device_token();
        // A new device reads the stream from its head on: not what came before it.
        let now = unix_millis();
        let record = DeviceRecord {
            app: app.to_owned(),
            uid: uid.to_owned(),
            created_at_ms: now,
            all_epoch: meta.epoch,
            all_acked: meta.head,
            seen_ms: seen_refresh.map_or(0, |_| now),
            ..DeviceRecord::default()
        };
        self.put_device(&token, &record)?;
        if seen_refresh.is_some() {
            self.device_seen()?
                .insert((app, now, token.as_str()), ())
                .map_err(backend)?;
        }
        let binding = format!("{app}\0{uid}\0{token}");
        self.bindings()?
            .insert(binding.as_str(), ())
            .map_err(backend)?;
        Ok(AdmittedDevice {
            token,
            resumed: false,
            acked_seq: 0,
            highest_seq: 0,
            all: place(&meta, meta.epoch, meta.head),
            tags: DeviceTags::default(),
        })
    }

    /// The meta of `app`'s `stream`, created (with a new epoch) if the stream has none.
    fn read_stream_meta(&mut self, app: &str, stream: &str) -> Result<StreamMeta> {
        let key = format!("{app}\0{stream}");
        if let Some(value) = self.stream_meta()?.get(key.as_str()).map_err(backend)? {
            return StreamMeta::decode(value.value()).map_err(backend);
        }
        let meta = StreamMeta {
            epoch: new_epoch(),
            ..StreamMeta::default()
        };
        self.put_stream_meta(&key, &meta)?;
        Ok(meta)
    }

    fn put_stream_meta(&mut self, key: &str, meta: &StreamMeta) -> Result<()> {
        self.stream_meta()?
            .insert(key, meta.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    /// Claims an idempotency key of `app` for `message_id` until `until`, unless a claim
    /// of it is still in its window: then that claim's message id.
    fn claim_idempotency(
        &mut self,
        app: &str,
        key: &str,
        until: u64,
        message_id: &str,
    ) -> Result<Option<String>> {
        let id_key = format!("{app}\0{key}");
        let existing = self
            .idempotency()?
            .get(id_key.as_str())
            .map_err(backend)?
            .map(|value| IdempotencyRecord::decode(value.value()).map_err(backend))
            .transpose()?;
        if let Some(existing) = existing {
            if existing.expires_at_ms > unix_millis() {
                return Ok(Some(existing.message_id));
            }
            self.idempotency_expiry()?
                .remove((existing.expires_at_ms, id_key.as_str()))
                .map_err(backend)?;
        }
        let record = IdempotencyRecord {
            message_id: message_id.to_owned(),
            expires_at_ms: until,
        };
        self.idempotency()?
            .insert(id_key.as_str(), record.encode_to_vec().as_slice())
            .map_err(backend)?;
        self.idempotency_expiry()?
            .insert((until, id_key.as_str()), ())
            .map_err(backend)?;
        Ok(None)
    }

    fn append(
        &mut self,
        app: &str,
        stream: &str,
        message: Arc<Message>,
        once: Option<Once>,
        cap: u32,
    ) -> Result<AppendOutcome> {
        if let Some(once) = &once
            && let Some(message_id) = self.first_time(app, once, &message.id)?
        {
            return Ok(AppendOutcome::Duplicate { message_id });
        }
        let key = format!("{app}\0{stream}");
        let mut meta = self.read_stream_meta(app, stream)?;
        meta.head += 1;
        let offset = meta.head;
        if !message.collapse_key.is_empty() {
            let collapse = format!("{key}\0{}", message.collapse_key);
            let older = self
                .stream_collapse()?
                .get(collapse.as_str())
                .map_err(backend)?;
            if let Some(older) = older.map(|value| value.value()) {
                self.remove_entry(&key, older)?;
            }
            self.stream_collapse()?
                .insert(collapse.as_str(), offset)
                .map_err(backend)?;
        }
        // A TTL-0 message takes its offset (devices see no gap in the stream) and is handed
        // to the devices online now, but is never stored.
        if !message.is_storable() {
            self.put_stream_meta(&key, &meta)?;
            return Ok(AppendOutcome::Appended {
                message,
                offset,
                epoch: meta.epoch,
            });
        }
        let size = self.stream_size()?.get(key.as_str()).map_err(backend)?;
        let before = match size.map(|size| size.value()) {
            Some(size) => size,
            None => self
                .stream_entries()?
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                .map_err(backend)?
                .count() as u64,
        };
        self.stream_entries()?
            .insert(
                (key.as_str(), offset),
                message.to_stored().encode_to_vec().as_slice(),
            )
            .map_err(backend)?;
        self.stream_size()?
            .insert(key.as_str(), before + 1)
            .map_err(backend)?;
        self.stream_expiry()?
            .insert((message.expires_at_ms, key.as_str(), offset), ())
            .map_err(backend)?;
        // Past the cap the oldest entries go, before they expire: devices that had not read
        // them are told they may have missed some (see `StreamPlace::trimmed`).
        let over = (before + 1).saturating_sub(u64::from(cap)) as usize;
        if over > 0 {
            let oldest: Vec<u64> = self
                .stream_entries()?
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                .map_err(backend)?
                .take(over)
                .map(|entry| entry.map(|(k, _)| k.value().1).map_err(backend))
                .collect::<Result<_>>()?;
            for dropped in oldest {
                self.remove_entry(&key, dropped)?;
                meta.trimmed = meta.trimmed.max(dropped);
            }
        }
        self.put_stream_meta(&key, &meta)?;
        Ok(AppendOutcome::Appended {
            message,
            offset,
            epoch: meta.epoch,
        })
    }

    /// Removes one entry of a stream with its index rows; false when it was not there.
    fn remove_entry(&mut self, key: &str, offset: u64) -> Result<bool> {
        let stored = match self
            .stream_entries()?
            .remove((key, offset))
            .map_err(backend)?
        {
            Some(value) => decode_stored(value.value())?,
            None => return Ok(false),
        };
        let size = self.stream_size()?.get(key).map_err(backend)?;
        if let Some(size) = size.map(|size| size.value()) {
            self.stream_size()?
                .insert(key, size.saturating_sub(1))
                .map_err(backend)?;
        }
        self.stream_expiry()?
            .remove((stored.expires_at_ms, key, offset))
            .map_err(backend)?;
        if !stored.collapse_key.is_empty() {
            let collapse = format!("{key}\0{}", stored.collapse_key);
            let points_here = self
                .stream_collapse()?
                .get(collapse.as_str())
                .map_err(backend)?
                .is_some_and(|value| value.value() == offset);
            if points_here {
                self.stream_collapse()?
                    .remove(collapse.as_str())
                    .map_err(backend)?;
            }
        }
        Ok(true)
    }

    fn ack_stream(&mut self, token: &str, epoch: u64, offset: u64) -> Result<()> {
        let Some(mut record) = self.device(token)? else {
            return Ok(());
        };
        if record.all_epoch == epoch && offset > record.all_acked {
            record.all_acked = offset;
            self.put_device(token, &record)?;
        }
        Ok(())
    }

    fn accept(
        &mut self,
        mut accept: Accept,
        cap: u32,
        routes: &dyn Routes,
    ) -> Result<AcceptOutcome> {
        if let Some(once) = &accept.once
            && let Some(message_id) = self.first_time(&accept.app, once, &accept.message.id)?
        {
            return Ok(AcceptOutcome::Duplicate { message_id });
        }
        let stored = accept.message.to_stored().encode_to_vec();
        let mut targets = Vec::with_capacity(accept.targets.len());
        let mut displaced = Vec::new();
        for target in std::mem::take(&mut accept.targets) {
            let (token, store) = (target.token.as_str(), target.store);
            let recorded = self.record_one(
                &accept,
                token,
                store,
                &stored,
                (cap, routes),
                &mut displaced,
            )?;
            targets.push((target.token, recorded));
        }
        Ok(AcceptOutcome::Accepted {
            message: accept.message,
            targets,
            displaced,
        })
    }

    /// Records the message for one target (the rules are in `crate::store`).
    fn record_one(
        &mut self,
        accept: &Accept,
        token: &str,
        store: bool,
        stored: &[u8],
        (cap, routes): (u32, &dyn Routes),
        displaced: &mut Vec<Displaced>,
    ) -> Result<Recorded> {
        let Some(mut record) = self.device(token)? else {
            return Ok(Recorded::Unknown);
        };
        if record.app != accept.app {
            return Ok(Recorded::Unknown);
        }
        let route = routes.route(token);
        if !store && route.is_none() {
            return Ok(Recorded::Dropped);
        }
        record.highest_seq += 1;
        let seq = record.highest_seq;
        if store {
            let collapse_key = &accept.message.collapse_key;
            if !collapse_key.is_empty() {
                let key = format!("{token}\0{collapse_key}");
                let previous = self.collapse()?.get(key.as_str()).map_err(backend)?;
                let previous = previous.map(|value| value.value());
                if let Some(previous) = previous
                    && let Some(replaced) = self.take_message(token, previous)?
                {
                    record.pending = record.pending.saturating_sub(1);
                    record.collapsed += 1;
                    displaced.push(Displaced {
                        message: Arc::new(Message::from_stored(replaced)),
                        by: DisplacedBy::Collapsed,
                    });
                }
                self.collapse()?
                    .insert(key.as_str(), seq)
                    .map_err(backend)?;
            }
            while record.pending >= cap {
                let oldest = self
                    .queue()?
                    .range((token, 0)..=(token, u64::MAX))
                    .map_err(backend)?
                    .next()
                    .transpose()
                    .map_err(backend)?
                    .map(|(key, _)| key.value().1);
                let Some(oldest) = oldest else {
                    record.pending = 0;
                    break;
                };
                if let Some(oldest) = self.take_message(token, oldest)? {
                    displaced.push(Displaced {
                        message: Arc::new(Message::from_stored(oldest)),
                        by: DisplacedBy::Dropped,
                    });
                }
                record.pending = record.pending.saturating_sub(1);
                record.dropped += 1;
            }
            self.queue()?
                .insert((token, seq), stored)
                .map_err(backend)?;
            self.expiry()?
                .insert((accept.message.expires_at_ms, token, seq), ())
                .map_err(backend)?;
            record.pending += 1;
        }
        self.put_counts(token, &record)?;
        Ok(Recorded::Seq { seq, route })
    }

    /// Removes one stored message with its index rows; false when it was not there.
    fn remove_message(&mut self, token: &str, seq: u64) -> Result<bool> {
        Ok(self.take_message(token, seq)?.is_some())
    }

    /// Removes one stored message with its index rows, and gives it back (`None` when it
    /// was not there).
    fn take_message(&mut self, token: &str, seq: u64) -> Result<Option<StoredMessage>> {
        let Some(value) = self.queue()?.remove((token, seq)).map_err(backend)? else {
            return Ok(None);
        };
        let stored = decode_stored(value.value())?;
        drop(value);
        self.expiry()?
            .remove((stored.expires_at_ms, token, seq))
            .map_err(backend)?;
        if !stored.collapse_key.is_empty() {
            let key = format!("{token}\0{}", stored.collapse_key);
            let points_here = self
                .collapse()?
                .get(key.as_str())
                .map_err(backend)?
                .is_some_and(|value| value.value() == seq);
            if points_here {
                self.collapse()?.remove(key.as_str()).map_err(backend)?;
            }
        }
        Ok(Some(stored))
    }

    fn ack(&mut self, token: &str, seq: u64) -> Result<()> {
        let Some(mut record) = self.device(token)? else {
            return Ok(());
        };
        let seq = seq.min(record.highest_seq);
        if seq <= record.acked_seq {
            return Ok(());
        }
        let seqs: Vec<u64> = self
            .queue()?
            .range((token, record.acked_seq + 1)..=(token, seq))
            .map_err(backend)?
            .map(|entry| entry.map(|(key, _)| key.value().1).map_err(backend))
            .collect::<Result<_>>()?;
        for stored_seq in seqs {
            if self.remove_message(token, stored_seq)? {
                record.pending = record.pending.saturating_sub(1);
            }
        }
        record.acked_seq = seq;
        self.put_counts(token, &record)
    }

    /// Removes what expired before `now_ms`, up to [`SWEEP_LIMIT`] rows of a kind; whether
    /// expired statuses are left (they are the many: one per push).
    fn sweep(&mut self, now_ms: u64) -> Result<bool> {
        let expired: Vec<(String, u64)> = self
            .expiry()?
            .range((0, "", 0)..(now_ms, "", 0))
            .map_err(backend)?
            .take(SWEEP_LIMIT)
            .map(|entry| {
                entry
                    .map(|(key, _)| {
                        let (_, token, seq) = key.value();
                        (token.to_owned(), seq)
                    })
                    .map_err(backend)
            })
            .collect::<Result<_>>()?;
        for (token, seq) in expired {
            if self.remove_message(&token, seq)?
                && let Some(mut record) = self.device(&token)?
            {
                record.pending = record.pending.saturating_sub(1);
                self.put_counts(&token, &record)?;
            }
        }
        let expired_entries: Vec<(String, u64)> = self
            .stream_expiry()?
            .range((0, "", 0)..(now_ms, "", 0))
            .map_err(backend)?
            .take(SWEEP_LIMIT)
            .map(|entry| {
                entry
                    .map(|(key, _)| {
                        let (_, stream, offset) = key.value();
                        (stream.to_owned(), offset)
                    })
                    .map_err(backend)
            })
            .collect::<Result<_>>()?;
        for (stream, offset) in expired_entries {
            self.remove_entry(&stream, offset)?;
        }
        for (at, key) in keys_before(self.idempotency_expiry()?, now_ms, SWEEP_LIMIT)? {
            self.idempotency_expiry()?
                .remove((at, key.as_str()))
                .map_err(backend)?;
            self.idempotency()?.remove(key.as_str()).map_err(backend)?;
        }
        for (at, key) in keys_before(self.schedule_fired()?, now_ms, SWEEP_LIMIT)? {
            self.schedule_fired()?
                .remove((at, key.as_str()))
                .map_err(backend)?;
            self.schedule_ids()?.remove(key.as_str()).map_err(backend)?;
        }
        let statuses = keys_before(self.status_expiry()?, now_ms, SWEEP_LIMIT)?;
        let left = statuses.len() == SWEEP_LIMIT;
        for (at, key) in statuses {
            self.status_expiry()?
                .remove((at, key.as_str()))
                .map_err(backend)?;
            let until = self
                .status()?
                .get(key.as_str())
                .map_err(backend)?
                .map(|row| row.value().3);
            if until.is_some_and(|until| until <= at) {
                self.status()?.remove(key.as_str()).map_err(backend)?;
                self.status_displaced()?
                    .remove(key.as_str())
                    .map_err(backend)?;
                let prefix = format!("{key}\0");
                let devices: Vec<String> = self
                    .opened()?
                    .range(prefix.as_str()..)
                    .map_err(backend)?
                    .map_while(|entry| {
                        let key = entry.ok()?.0.value().to_owned();
                        key.starts_with(prefix.as_str()).then_some(key)
                    })
                    .collect();
                for device in devices {
                    self.opened()?.remove(device.as_str()).map_err(backend)?;
                }
            }
        }
        Ok(left)
    }
}

/// Up to `limit` keys of a table keyed by (number, name) whose number is below `before`, in
/// order: the rows a sweep removes.
fn keys_before<V: redb::Value + 'static>(
    table: &redb::Table<'_, (u64, &'static str), V>,
    before: u64,
    limit: usize,
) -> Result<Vec<(u64, String)>> {
    table
        .range((0, "")..(before, ""))
        .map_err(backend)?
        .take(limit)
        .map(|entry| {
            entry
                .map(|(key, _)| {
                    let (at, key) = key.value();
                    (at, key.to_owned())
                })
                .map_err(backend)
        })
        .collect()
}

/// The key of `app`'s message `id` in the status tables.
fn status_key(app: &str, id: &str) -> String {
    format!("{app}\0{id}")
}

#[async_trait]
impl Statuses for EmbeddedStore {
    async fn put_statuses(&self, statuses: Vec<StatusWrite>) -> Result<()> {
        let statuses = statuses
            .into_iter()
            .map(|write| {
                let key = status_key(&write.app, &write.id);
                (key, write.status.encode_to_vec(), write.keep_until_ms)
            })
            .collect();
        self.write(Op::PutStatuses { statuses }, true)
            .await
            .map(|_| ())
    }

    async fn count_receipts(
        &self,
        counts: &[ReceiptCount],
        keep_until_ms: u64,
        _flush: &str,
    ) -> Result<Vec<NewlyOpened>> {
        // One transaction: a batch that failed added nothing, and is simply given again.
        let op = Op::CountReceipts {
            counts: counts.to_vec(),
            keep_until_ms,
        };
        match self.write(op, true).await? {
            Reply::Opened(opened) => Ok(opened),
            _ => Err(backend("unexpected reply to receipt counts")),
        }
    }

    async fn add_stats(
        &self,
        rows: Vec<StatsRow>,
        retention: Duration,
        _flush: &str,
    ) -> Result<()> {
        // One transaction: a batch that failed added nothing, and is simply given again.
        let oldest = (unix_millis() / 1000).saturating_sub(retention.as_secs()) / 60;
        self.write(Op::AddStats { rows, oldest }, true)
            .await
            .map(|_| ())
    }

    async fn stats(&self, app: &str, from: u64, to: u64) -> Result<Vec<StatsRow>> {
        let app = app.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(STATS).map_err(backend)?;
            let mut rows: BTreeMap<(u64, u32), StatsCounts> = BTreeMap::new();
            for entry in table.range((from, "", 0)..(to, "", 0)).map_err(backend)? {
                let (key, counts) = entry.map_err(backend)?;
                let (minute, row_app, class) = key.value();
                if row_app == app {
                    rows.insert((minute, class), StatsCounts::from_array(counts.value()));
                }
            }
            let table = txn.open_table(STATS_EXPIRING).map_err(backend)?;
            for entry in table.range((from, "", 0)..(to, "", 0)).map_err(backend)? {
                let (key, expiring) = entry.map_err(backend)?;
                let (minute, row_app, class) = key.value();
                if row_app == app {
                    rows.entry((minute, class)).or_default().expiring = expiring.value();
                }
            }
            let rows = rows.into_iter().map(|((minute, class), counts)| StatsRow {
                app: app.clone(),
                minute,
                class: Class::from_stored(class),
                counts,
            });
            Ok(rows.collect())
        })
        .await
    }

    async fn message_status(&self, app: &str, id: &str) -> Result<StatusRecord> {
        let key = status_key(app, id);
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(STATUS).map_err(backend)?;
            let Some(row) = table.get(key.as_str()).map_err(backend)? else {
                return Ok(StatusRecord::default());
            };
            let (status, delivered, acked, _, opened) = row.value();
            let status = match status.is_empty() {
                true => None,
                false => Some(MessageStatus::decode(status).map_err(backend)?),
            };
            let displaced = txn.open_table(STATUS_DISPLACED).map_err(backend)?;
            let (collapsed, dropped) = displaced
                .get(key.as_str())
                .map_err(backend)?
                .map_or((0, 0), |row| row.value());
            Ok(StatusRecord {
                status,
                delivered,
                acked,
                opened,
                collapsed,
                dropped,
            })
        })
        .await
    }
}

/// Forgets a few rows of a statistics table of minutes before `oldest`.
fn forget_minutes_before<V: redb::Value + 'static>(
    table: &mut redb::Table<'_, (u64, &'static str, u32), V>,
    oldest: u64,
) -> Result<()> {
    let old: Vec<(u64, String, u32)> = table
        .range((0, "", 0)..(oldest, "", 0))
        .map_err(backend)?
        .take(SWEEP_LIMIT)
        .map(|entry| {
            entry
                .map(|(key, _)| {
                    let (minute, app, class) = key.value();
                    (minute, app.to_owned(), class)
                })
                .map_err(backend)
        })
        .collect::<Result<_>>()?;
    for (minute, app, class) in old {
        table
            .remove((minute, app.as_str(), class))
            .map_err(backend)?;
    }
    Ok(())
}

/// The key of `app`'s scheduled push `id` in the schedule tables.
fn schedule_key(app: &str, id: &str) -> String {
    format!("{app}\0{id}")
}

#[async_trait]
impl Schedules for EmbeddedStore {
    async fn schedule(&self, app: &str, id: &str, at_ms: u64, job: Vec<u8>) -> Result<bool> {
        let op = Op::Schedule {
            key: schedule_key(app, id),
            at_ms,
            job,
        };
        match self.write(op, false).await? {
            Reply::Scheduled(new) => Ok(new),
            _ => Err(backend("unexpected reply to a schedule")),
        }
    }

    async fn cancel(&self, app: &str, id: &str) -> Result<Cancel> {
        let key = schedule_key(app, id);
        // Claimed: being sent. (Claimed after this, it is not sent: its record finds it
        // cancelled.)
        if self.claims.lock().map_err(backend)?.contains_key(&key) {
            return Ok(Cancel::Fired);
        }
        match self.write(Op::Cancel { key }, true).await? {
            Reply::Cancel(cancel) => Ok(cancel),
            _ => Err(backend("unexpected reply to a cancel")),
        }
    }

    async fn claim_due(&self, now_ms: u64, lease: Duration, limit: usize) -> Result<Vec<DueJob>> {
        let claims = self.claims.clone();
        let until = now_ms.saturating_add(lease.as_millis() as u64);
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let schedule = txn.open_table(SCHEDULE).map_err(backend)?;
            // Only the scheduler claims, one claim at a time: the lock is uncontended.
            let mut claims = claims.lock().map_err(backend)?;
            claims.retain(|_, until| *until > now_ms);
            let mut jobs = Vec::new();
            for entry in schedule
                .range((0, "")..=(now_ms, "\u{10ffff}"))
                .map_err(backend)?
            {
                if jobs.len() == limit {
                    break;
                }
                let (key, job) = entry.map_err(backend)?;
                let key = key.value().1;
                if claims.contains_key(key) {
                    continue;
                }
                claims.insert(key.to_owned(), until);
                let (app, id) = key.split_once('\0').unwrap_or((key, ""));
                jobs.push(DueJob {
                    app: app.to_owned(),
                    id: id.to_owned(),
                    job: job.value().to_vec(),
                });
            }
            Ok(jobs)
        })
        .await
    }

    async fn fired(&self, pushes: &[(&str, &str)], keep_until_ms: u64) -> Result<()> {
        let keys: Vec<String> = pushes
            .iter()
            .map(|(app, id)| schedule_key(app, id))
            .collect();
        // Most were marked as they were recorded: only the others are written.
        let keys = self
            .read_keys(keys.len(), move |db| {
                let txn = db.begin_read().map_err(backend)?;
                let ids = txn.open_table(SCHEDULE_IDS).map_err(backend)?;
                let mut waiting = Vec::new();
                for key in keys {
                    let state = ids.get(key.as_str()).map_err(backend)?;
                    if state.is_some_and(|state| state.value().1 <= CLAIMED) {
                        waiting.push(key);
                    }
                }
                Ok(waiting)
            })
            .await?;
        if !keys.is_empty() {
            let op = Op::Fired {
                keys,
                keep_until_ms,
            };
            self.write(op, true).await?;
        }
        // Fired, every one: no longer claimed (nor due).
        let mut claims = self.claims.lock().map_err(backend)?;
        for (app, id) in pushes {
            claims.remove(&schedule_key(app, id));
        }
        Ok(())
    }
}

mod counters;
#[cfg(test)]
mod tests;
