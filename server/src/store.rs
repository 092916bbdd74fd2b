//! The registry of devices and the offline store, as traits that both stores implement:
//! the embedded one of standalone mode ([`embedded`], redb) and the Redis one of cluster
//! mode ([`redis`]). One contract test suite (`tests/store_contract.rs`) runs the same cases
//! against both.
//!
//! - [`Registry`]: which devices exist, which app and uid each belongs to, and which tokens a
//!   uid has. A device is admitted (its token resolved or issued, and bound to its uid) when
//!   it connects.
//! - [`OfflineStore`]: per-device message queues ordered by seq, with TTL, a per-device cap
//!   and collapse keys, plus idempotency keys. Every push is recorded here *before* it is
//!   handed to a connection and removed when the device acknowledges it, so that a message
//!   the API accepted survives any crash (see docs/delivery.md).
//!
//! # The rules both stores keep
//! - Recording a push gives each target device its next seq (`highest + 1`), so a device's
//!   seqs are unique and increasing.
//! - A message with a collapse key replaces the device's pending message with the same key
//!   (counted as `collapsed`); past `max_stored_per_device` the oldest pending message is
//!   dropped (counted as `dropped`).
//! - An expired message is never replayed.
//! - An ack is cumulative and never goes above the highest seq assigned (a device cannot
//!   acknowledge what it was never given).
//! - A TTL-0 message is never stored. It takes a seq only for a device that is connected at
//!   that moment (the store knows the device's [`Route`]); for any other it is dropped.
//! - With an idempotency key, a push is recorded once per key within its window: a retry is
//!   a duplicate, and a retry of a push that was interrupted half-way records it for the
//!   remaining targets under the first attempt's message id, never twice for one device.
//! - A token that is no device of the pushing app is unknown: nothing is recorded for it.
//! - A device token belongs to one app and one uid: presented with a credential of another
//!   uid (or app), it is not resumed; a new token is issued.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pigeon_proto::store::MessageStatus;

use crate::message::{Class, Delivery, Message};

pub mod embedded;
pub mod redis;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's write queue is full; try again shortly.
    #[error("the store is overloaded")]
    Overloaded,
    /// The store is unreachable or failed; nothing of the operation was applied.
    #[error("the store failed: {0}")]
    Backend(String),
    /// The store has shut down.
    #[error("the store is closed")]
    Closed,
}

/// A device as the registry knows it, right after it was admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmittedDevice {
    /// The device's token.
    pub token: String,
    /// Whether the presented token was known (false: a new one was issued).
    pub resumed: bool,
    /// The highest seq acknowledged.
    pub acked_seq: u64,
    /// The highest seq assigned.
    pub highest_seq: u64,
    /// Its place in the app's shared stream [`ALL`].
    pub all: StreamPlace,
    /// Its tags.
    pub tags: DeviceTags,
}

/// One tag of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTag {
    /// The tag.
    pub name: String,
    /// The head of the app's stream [`ALL`] when the device got the tag: entries up to it
    /// were accepted before, and are not for the device through this tag.
    pub since: u64,
}

/// A device's tags, sorted by name, and a count of their changes (a list with a higher
/// version is newer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceTags {
    /// The tags, sorted by name.
    pub tags: Vec<DeviceTag>,
    /// How many times the list changed.
    pub version: u64,
}

impl DeviceTags {
    /// When the device got `name`, if it has it.
    pub fn since(&self, name: &str) -> Option<u64> {
        self.tags
            .binary_search_by(|tag| tag.name.as_str().cmp(name))
            .ok()
            .map(|index| self.tags[index].since)
    }

    /// The tag names.
    pub fn names(&self) -> Vec<String> {
        self.tags.iter().map(|tag| tag.name.clone()).collect()
    }
}

/// A device whose tags a change touched, as the node holding its connection must learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retagged {
    /// The device token.
    pub token: String,
    /// Its tags after the change.
    pub tags: DeviceTags,
    /// Where it is connected, as far as the registry knows.
    pub route: Option<Route>,
}

/// Where an app's shared stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamHead {
    /// The stream's epoch (0: the stream does not exist yet).
    pub epoch: u64,
    /// The highest offset assigned.
    pub head: u64,
}

/// The name of the shared stream every device of an app reads: pushes to the whole app.
pub const ALL: &str = "all";

/// A device's place in a shared stream, and the stream's state, as the store has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamPlace {
    /// The stream's epoch: chosen at random (never 0) when the stream is created.
    pub epoch: u64,
    /// The highest offset the device has acknowledged in this epoch.
    pub acked: u64,
    /// The highest offset the stream has assigned.
    pub head: u64,
    /// Entries up to this offset were dropped by the stream's cap before they expired.
    pub trimmed: u64,
    /// The device's acknowledged place was in another epoch (the stream's history was lost):
    /// `acked` starts again at 0.
    pub epoch_changed: bool,
}

/// Which devices exist and whom they belong to.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Admits a device of `uid` in `app` that presented `token` (empty on first connect):
    /// resumes that token when it is a device of this app and this uid, otherwise issues a
    /// new one (a token is no key to another user's queue). Binds uid -> token.
    async fn admit_device(
        &self,
        app: &str,
        uid: &str,
        token: &str,
    ) -> Result<AdmittedDevice, StoreError>;

    /// The tokens bound to each of `uids` in `app`, in the order given.
    async fn tokens_for_uids(
        &self,
        app: &str,
        uids: &[String],
    ) -> Result<Vec<Vec<String>>, StoreError>;

    /// For each token, whether it is a device of `app`.
    async fn known_tokens(&self, app: &str, tokens: &[String]) -> Result<Vec<bool>, StoreError>;

    /// What the registry knows of the device `token` of `app`, if it is one.
    async fn device(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>, StoreError>;

    /// Replaces the tags of the device `token` of `app` (at most `max_tags`, checked by
    /// the caller); `None` when it is no device of the app. A tag the device had keeps its
    /// `since`; a new one gets the head of the app's stream [`ALL`].
    async fn set_tags(
        &self,
        app: &str,
        token: &str,
        tags: &[String],
    ) -> Result<Option<Retagged>, StoreError>;

    /// Adds the devices `add` to `tag` and takes `remove` out of it. A device that already
    /// has `max_tags` other tags is not added. Returns the counts, and the devices whose
    /// tags changed. A token of `remove` that is no device any more leaves the tag's index
    /// too (so paging through a tag and removing each page empties it).
    async fn change_tag(
        &self,
        app: &str,
        tag: &str,
        change: TagChange,
        max_tags: usize,
    ) -> Result<(TagChanged, Vec<Retagged>), StoreError>;

    /// Up to `limit` devices of `tag`, in token order, after `after` (empty: from the
    /// first).
    async fn tag_devices(
        &self,
        app: &str,
        tag: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// Sets (or, with `None`, clears) the alias of the device `token` of `app`. An alias
    /// names at most `max_devices` devices.
    async fn set_alias(
        &self,
        app: &str,
        token: &str,
        alias: Option<&str>,
        max_devices: usize,
    ) -> Result<AliasSet, StoreError>;

    /// Unregisters the device `token` of `app`: its record, queue, uid binding, tags and
    /// alias go, and the token is no device any more. What it was (with its route, to close
    /// its connection); `None` when it is no device of the app.
    async fn unregister(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>, StoreError>;

    /// Up to `limit` of `app`'s devices last admitted before `before_ms`, the longest idle
    /// first, with their route when they are (or were, for a node that died) connected.
    async fn inactive_devices(
        &self,
        app: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Option<Route>)>, StoreError>;

    /// Notes that `app`'s device `token` is in use now (connected since before its last
    /// admission would make it inactive).
    async fn touch_device(&self, app: &str, token: &str) -> Result<(), StoreError>;

    /// The devices each of `aliases` names in `app`, in the order given.
    async fn tokens_for_aliases(
        &self,
        app: &str,
        aliases: &[String],
    ) -> Result<Vec<Vec<String>>, StoreError>;

    /// Replaces what `uid` of `app` opted out of (`marketing`, `category:<name>`); an empty
    /// list clears it.
    async fn set_opt_out(&self, app: &str, uid: &str, opt_out: &[String])
    -> Result<(), StoreError>;

    /// What each of `uids` of `app` opted out of, in the order given.
    async fn opt_outs(&self, app: &str, uids: &[String]) -> Result<Vec<Vec<String>>, StoreError>;

    /// Counts one more capped push for each of `uids` of `app` in the window `window`
    /// (its number) that lasts `window_ms`, unless that uid has had `cap` already: per uid, in
    /// the order given, its count with this push when it was counted (and so may get the
    /// push), `None` when it was over the cap.
    async fn count_capped(
        &self,
        app: &str,
        uids: &[String],
        window: u64,
        window_ms: u64,
        cap: u32,
    ) -> Result<Vec<Option<u32>>, StoreError>;

    /// Counts, in the same counts as [`Store::count_capped`], a capped push stored once
    /// (to all, or tags) that a user got: once per `(uid, message id)` in `got`, however
    /// many of the uid's devices got it, and only while the uid is under `cap`. Per pair, in
    /// the order given, whether the uid has had `cap` pushes now.
    async fn count_shared_capped(
        &self,
        app: &str,
        got: &[(String, String)],
        window: u64,
        window_ms: u64,
        cap: u32,
    ) -> Result<Vec<bool>, StoreError>;
}

/// A device as the registry knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The uid it acts for.
    pub uid: String,
    /// Its alias; empty for none.
    pub alias: String,
    /// Its tags.
    pub tags: DeviceTags,
    /// Where it is connected, as far as the registry knows.
    pub route: Option<Route>,
}

/// Devices to add to a tag and to take out of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagChange {
    /// Tokens to add.
    pub add: Vec<String>,
    /// Tokens to take out.
    pub remove: Vec<String>,
}

/// What [`Registry::change_tag`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TagChanged {
    /// Devices that got the tag (having it already counts).
    pub added: u32,
    /// Devices that lost it (not having it counts).
    pub removed: u32,
    /// Tokens that are no device of the app.
    pub unknown: u32,
    /// Devices not added because they have as many tags as they may.
    pub over_limit: u32,
}

/// What [`Registry::set_alias`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasSet {
    /// Done.
    Set,
    /// The token is no device of the app.
    UnknownDevice,
    /// The alias already names as many devices as it may.
    AliasFull,
}

/// Where a device is connected: a node's id (empty in standalone mode, whose one process
/// holds every connection) and that node's id for the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The node holding the connection.
    pub node: String,
    /// The connection's id on that node.
    pub connection: u64,
}

/// Where a store that keeps no routes of its own (the embedded one) learns which devices
/// are connected: the process's connection table.
pub trait Routes: Send + Sync + 'static {
    /// The device's route, when it is connected.
    fn route(&self, token: &str) -> Option<Route>;
}

/// One target of a push to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The device token.
    pub token: String,
    /// Whether to keep the message until acknowledged. False only for a TTL-0 message,
    /// which goes to devices online now and is never stored.
    pub store: bool,
}

/// A push to record.
#[derive(Clone, Debug)]
pub struct Accept {
    /// The app that pushes.
    pub app: String,
    /// The message.
    pub message: Arc<Message>,
    /// Its targets.
    pub targets: Vec<Target>,
    /// What keeps it from being recorded twice, if anything.
    pub once: Option<Once>,
}

/// What keeps a push from being recorded (or appended) twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Once {
    /// The app's idempotency key, counting until `until_ms` (Unix ms): a push with the same
    /// key before then is a duplicate of the first.
    Key {
        /// The key.
        key: String,
        /// When it stops counting.
        until_ms: u64,
    },
    /// The push is the app's scheduled push `id` firing: it is recorded only if that push
    /// is still waiting (not fired, not cancelled), and marked fired (remembered until
    /// `keep_until_ms`) as it is recorded. Otherwise it is a duplicate.
    Fires {
        /// The scheduled push's id (the message's).
        id: String,
        /// Until when it is remembered as fired.
        keep_until_ms: u64,
    },
}

impl Once {
    /// The idempotency key (and when it stops counting) that stands for this in a store
    /// that does not mark a scheduled push fired as it records it (Redis: there
    /// [`Schedules::fired`] marks it after, and a push sent again after a crash is a
    /// duplicate by this key).
    pub fn as_key(&self) -> (std::borrow::Cow<'_, str>, u64) {
        match self {
            Once::Key { key, until_ms } => (key.as_str().into(), *until_ms),
            Once::Fires { id, keep_until_ms } => (format!("scheduled:{id}").into(), *keep_until_ms),
        }
    }
}

/// What recording a push did for one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The token is no device of the app.
    Unknown,
    /// A TTL-0 message and the device is not connected: not recorded.
    Dropped,
    /// Recorded (or, for a TTL-0 message, given a seq) with this seq.
    Seq {
        /// The device's seq for the message.
        seq: u64,
        /// Where the device was connected at that moment, if it was.
        route: Option<Route>,
    },
}

/// What became of a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Recorded.
    Accepted {
        /// The message as recorded: a retry of an interrupted push carries the first
        /// attempt's id.
        message: Arc<Message>,
        /// Per target, in the order given: its token and what was recorded.
        targets: Vec<(String, Recorded)>,
        /// Stored messages this one put out of its targets' queues.
        displaced: Vec<Displaced>,
    },
    /// Not recorded: its idempotency key was used before, for a push that was fully
    /// recorded; or the scheduled push it fires fired before, or was cancelled.
    Duplicate {
        /// The first message's id.
        message_id: String,
    },
}

/// A stored message a newer one put out of a device's queue, as recording the newer one
/// found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Displaced {
    /// The message put out.
    pub message: Arc<Message>,
    /// Why.
    pub by: DisplacedBy,
}

/// Why a stored message left a device's queue unread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisplacedBy {
    /// A newer message with its collapse key replaced it.
    Collapsed,
    /// The device's queue was full (`limits.max_stored_per_device`): the oldest goes.
    Dropped,
}

/// Rows read from a device's queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Deliveries in ascending seq, none expired.
    pub deliveries: Vec<Delivery>,
    /// Whether the queue holds more after them.
    pub more: bool,
}

/// A device's books in the offline store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Messages stored and not yet acknowledged (expired ones included until they are
    /// removed).
    pub pending: u64,
    /// Dropped because of the per-device cap.
    pub dropped: u64,
    /// Replaced by a newer message with the same collapse key.
    pub collapsed: u64,
}

/// What appending a message to a shared stream did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Appended (or, for a retry of an interrupted append, found appended).
    Appended {
        /// The message as appended: a retry carries the first attempt's id.
        message: Arc<Message>,
        /// Its offset in the stream.
        offset: u64,
        /// The stream's epoch.
        epoch: u64,
    },
    /// The idempotency key was used before, for a message that was appended.
    Duplicate {
        /// The first message's id.
        message_id: String,
    },
}

/// Entries read from a shared stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamRead {
    /// Entries in ascending offset, none expired: (offset, message).
    pub entries: Vec<(u64, Arc<Message>)>,
    /// Whether the stream holds more after them.
    pub more: bool,
}

/// Per-device message queues, the apps' shared streams, and idempotency keys.
#[async_trait]
pub trait OfflineStore: Send + Sync + 'static {
    /// Records a push (see the module docs for the rules). Once this returns `Accepted`,
    /// the message survives a crash of the process; each routed target can then be handed
    /// to its connection.
    async fn record(&self, accept: Accept) -> Result<AcceptOutcome, StoreError>;

    /// The device has processed everything up to `seq`: forget those messages.
    async fn ack(&self, token: &str, seq: u64) -> Result<(), StoreError>;

    /// Up to `limit` unexpired messages of `token` with seq above `after`.
    async fn replay(&self, token: &str, after: u64, limit: u32) -> Result<Replay, StoreError>;

    /// The device's counters, if it exists.
    async fn counters(&self, token: &str) -> Result<Option<DeviceCounters>, StoreError>;

    /// Appends a message to the shared stream `stream` of `app`: stored once, whatever the
    /// number of devices that read it. It takes the stream's next offset (a TTL-0 message
    /// takes one too, but is not stored); a message with a
    /// collapse key replaces the stream's earlier entry with that key; past
    /// `max_stored_per_stream` entries the oldest is dropped (and the stream's `trimmed`
    /// mark moves past it). Appended once as `once` says, as [`OfflineStore::record`]
    /// does.
    async fn append(
        &self,
        app: &str,
        stream: &str,
        message: Arc<Message>,
        once: Option<Once>,
    ) -> Result<AppendOutcome, StoreError>;

    /// Where `app`'s `stream` stands: its epoch and the highest offset assigned.
    async fn stream_head(&self, app: &str, stream: &str) -> Result<StreamHead, StoreError>;

    /// Up to `limit` unexpired entries of `app`'s `stream` after `after`.
    async fn read_stream(
        &self,
        app: &str,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<StreamRead, StoreError>;

    /// The device has processed its app's `stream` up to `offset` in `epoch`. An ack of
    /// another epoch (the stream was recreated meanwhile) or below the acknowledged place
    /// changes nothing.
    async fn ack_stream(
        &self,
        token: &str,
        stream: &str,
        epoch: u64,
        offset: u64,
    ) -> Result<(), StoreError>;
}

/// A scheduled push that is due, claimed by one process to fire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueJob {
    /// Its app.
    pub app: String,
    /// Its message id.
    pub id: String,
    /// The push, encoded (`ScheduledPush`).
    pub job: Vec<u8>,
}

/// What a cancel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// The push was waiting; it never fires.
    Cancelled,
    /// Too late: it fired, or is firing.
    Fired,
    /// No scheduled push of the app has that id (or it fired longer ago than remembered).
    Unknown,
}

/// Scheduled pushes: kept until due, then claimed by one process at a time to fire.
#[async_trait]
pub trait Schedules: Send + Sync + 'static {
    /// Keeps `job` to fire at `at_ms` as `app`'s message `id`. Durable once this returns.
    /// `false` when `app` has (or had, within its retention) a scheduled push `id` already:
    /// that one stands, and nothing changes.
    async fn schedule(
        &self,
        app: &str,
        id: &str,
        at_ms: u64,
        job: Vec<u8>,
    ) -> Result<bool, StoreError>;

    /// Takes `app`'s scheduled push `id` back, if it has not fired.
    async fn cancel(&self, app: &str, id: &str) -> Result<Cancel, StoreError>;

    /// Claims up to `limit` pushes due at `now_ms`: each is due again `lease` later (for
    /// another process, or this one) unless it fired before (recorded with
    /// [`Once::Fires`], or marked by [`Schedules::fired`]). A push may so be sent twice
    /// after a crash; recorded with [`Once::Fires`], the second is a duplicate.
    async fn claim_due(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DueJob>, StoreError>;

    /// These pushes (each `(app, id)`) fired, or will never be sent (refused, unreadable):
    /// forget them, and remember until `keep_until_ms` that they did (a cancel then
    /// answers [`Cancel::Fired`]). One write. Those cancelled meanwhile stay cancelled.
    async fn fired(&self, pushes: &[(&str, &str)], keep_until_ms: u64) -> Result<(), StoreError>;
}

/// What devices did with one message, counted by a node since its last flush.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiptCount {
    /// The message's app.
    pub app: String,
    /// The message id.
    pub id: String,
    /// Handed to a connection.
    pub delivered: u64,
    /// Acknowledged by the device.
    pub acked: u64,
    /// The devices (tokens) that reported it opened; each counts once, however often.
    pub opened_by: Vec<String>,
    /// Replaced in a device's queue by a newer message with its collapse key.
    pub collapsed: u64,
    /// Dropped from a full device queue.
    pub dropped: u64,
}

/// Devices that opened messages of one app and class for the first time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewlyOpened {
    /// The messages' app.
    pub app: String,
    /// Their class.
    pub class: Class,
    /// Devices that had not opened them before.
    pub devices: u64,
}

impl NewlyOpened {
    /// Adds `devices` of `app`'s messages of `class` to `list` (one entry per app and class).
    pub fn add_to(list: &mut Vec<NewlyOpened>, app: &str, class: Class, devices: u64) {
        match list.iter_mut().find(|o| o.app == app && o.class == class) {
            Some(sum) => sum.devices += devices,
            None => list.push(NewlyOpened {
                app: app.to_owned(),
                class,
                devices,
            }),
        }
    }
}

/// A message's status to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    /// The message's app.
    pub app: String,
    /// The message id.
    pub id: String,
    /// Its status.
    pub status: MessageStatus,
    /// Unix milliseconds until which it is kept at least.
    pub keep_until_ms: u64,
}

/// A message's status as kept, and what devices did with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusRecord {
    /// How it was accepted (`None`: only counts arrived, the status itself did not).
    pub status: Option<MessageStatus>,
    /// Handed to a connection, summed over the nodes' flushes.
    pub delivered: u64,
    /// Acknowledged by devices.
    pub acked: u64,
    /// Devices that reported it opened, each once.
    pub opened: u64,
    /// Replaced in a device's queue by a newer message with its collapse key.
    pub collapsed: u64,
    /// Dropped from a full device queue.
    pub dropped: u64,
}

/// An app's counts of one class in one minute, as the statistics keep them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsRow {
    /// The app.
    pub app: String,
    /// The minute (Unix seconds / 60).
    pub minute: u64,
    /// The pushes' class.
    pub class: Class,
    /// The counts.
    pub counts: StatsCounts,
}

/// What an app's pushes of one class did in some time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsCounts {
    /// Pushes accepted (a scheduled push when it fires).
    pub pushes: u64,
    /// Devices they were recorded for (direct pushes; a push to all or tags names none).
    pub targets: u64,
    /// Handed to a connection.
    pub delivered: u64,
    /// Acknowledged by the device.
    pub acked: u64,
    /// Opened, first reports per device and message.
    pub opened: u64,
    /// Kept by the minute the messages expire in: devices a direct push was stored for
    /// (added when it is recorded), less those that acknowledged it before it expired or
    /// lost it to a newer one (taken off then). Once the minute is past, the devices it
    /// expired for.
    pub expiring: i64,
}

impl StatsCounts {
    /// The counts in a fixed order: pushes, targets, delivered, acked, opened (not
    /// `expiring`).
    pub fn to_array(self) -> [u64; 5] {
        [
            self.pushes,
            self.targets,
            self.delivered,
            self.acked,
            self.opened,
        ]
    }

    /// Back from [`StatsCounts::to_array`] (`expiring` 0).
    pub fn from_array([pushes, targets, delivered, acked, opened]: [u64; 5]) -> Self {
        Self {
            pushes,
            targets,
            delivered,
            acked,
            opened,
            expiring: 0,
        }
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: StatsCounts) {
        let sum = self.to_array();
        let added = other.to_array();
        *self = Self {
            expiring: self.expiring.saturating_add(other.expiring),
            ..Self::from_array(std::array::from_fn(|i| sum[i].saturating_add(added[i])))
        };
    }

    /// Whether every count is 0.
    pub fn is_empty(&self) -> bool {
        self.expiring == 0 && self.to_array().iter().all(|count| *count == 0)
    }
}

/// Messages' statuses, and the counts of what devices did with them, kept for a retention.
#[async_trait]
pub trait Statuses: Send + Sync + 'static {
    /// Keeps each status as that of its message until its `keep_until_ms` (replacing an
    /// earlier one; the counts stay); of two statuses of one message, the later in
    /// `statuses` stands.
    async fn put_statuses(&self, statuses: Vec<StatusWrite>) -> Result<(), StoreError>;

    /// Adds `counts`, the batch `flush` (an id unique to it): a batch given again after a
    /// failure (the same id and counts) adds nothing a first attempt added, however far it
    /// got (Redis remembers each call of a batch for 10 minutes). A message whose status is
    /// not kept (yet) gets them kept for it until `keep_until_ms` (a status written later
    /// finds them). Returns, per app and class, the devices that opened a message for the
    /// first time (of messages with a status; not those of calls a first attempt made).
    async fn count_receipts(
        &self,
        counts: &[ReceiptCount],
        keep_until_ms: u64,
        flush: &str,
    ) -> Result<Vec<NewlyOpened>, StoreError>;

    /// `app`'s message `id`'s status and counts, if kept.
    async fn message_status(&self, app: &str, id: &str) -> Result<StatusRecord, StoreError>;

    /// Adds `rows` to the apps' statistics, each kept for `retention` after its minute
    /// (older ones may be forgotten). `flush` names the batch: given again after a failure
    /// (which may have done part of it), under the same name, it adds nothing twice (Redis
    /// remembers each call of a batch for 10 minutes).
    async fn add_stats(
        &self,
        rows: Vec<StatsRow>,
        retention: Duration,
        flush: &str,
    ) -> Result<(), StoreError>;

    /// `app`'s statistics of the minutes `from..to`: a row per minute and class with counts
    /// (none for those without), in no particular order.
    async fn stats(&self, app: &str, from: u64, to: u64) -> Result<Vec<StatsRow>, StoreError>;
}

/// How old a device's last noted admission may be before an admission notes it again (a
/// sixteenth of `limits.device_inactivity`: a device expires up to that much late); `None`
/// when devices never expire. Both stores note admissions so.
pub(crate) fn seen_refresh(limits: &crate::config::Limits) -> Option<u64> {
    let inactivity = limits.device_inactivity.as_millis() as u64;
    (inactivity > 0).then_some(inactivity / 16)
}

/// The registry, the offline store, the schedules and the statuses of one deployment,
/// which both stores are.
pub trait Store: Registry + OfflineStore + Schedules + Statuses {}

impl<T: Registry + OfflineStore + Schedules + Statuses> Store for T {}
