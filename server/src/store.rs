//! The registry of devices and the offline store, as traits, plus the embedded
//! implementation that standalone mode uses.
//!
//! - [`Registry`]: which devices exist, which app and uid each belongs to, and which tokens a
//!   uid has. A device is admitted (its token resolved or issued, and bound to its uid) when
//!   it connects.
//! - [`OfflineStore`]: per-device message queues ordered by seq, with TTL, a per-device cap
//!   and collapse keys, plus idempotency keys. Every push is written here *before* it is
//!   handed to a connection and removed when the device acknowledges it, so that a message
//!   the API accepted survives any crash (see docs/delivery.md).
//!
//! Both are async traits so that the Redis implementations of cluster mode plug in without
//! touching the session or the API.

use std::sync::Arc;

use async_trait::async_trait;

use crate::message::{Delivery, Message};

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
}

/// Which devices exist and whom they belong to.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Admits a device of `uid` in `app` that presented `token` (empty on first connect):
    /// resumes that token when it is known in this app (rebinding it if the uid changed),
    /// otherwise issues a new one. Binds uid -> token.
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
}

/// One target of an accepted push.
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
    /// Its targets, already known to be devices of `app`.
    pub targets: Vec<Target>,
    /// The idempotency key, and when it stops counting (Unix ms).
    pub idempotency: Option<(String, u64)>,
}

/// What became of a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Recorded: the seq of each target, in the order given (0 for a target that turned out
    /// not to exist).
    Accepted {
        /// Seqs, one per target.
        seqs: Vec<u64>,
    },
    /// The idempotency key was used before, for this message; nothing was recorded.
    Duplicate {
        /// The first message's id.
        message_id: String,
    },
}

/// Rows read from a device's queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Deliveries in ascending seq, none expired.
    pub deliveries: Vec<Delivery>,
    /// Whether the queue holds more after them.
    pub more: bool,
}

/// Per-device message queues and idempotency keys.
#[async_trait]
pub trait OfflineStore: Send + Sync + 'static {
    /// Records a push atomically: claims the idempotency key, assigns each target its next
    /// seq and stores the message for it (replacing a pending message with the same
    /// collapse key, and dropping the oldest past the per-device cap). Once this returns
    /// `Accepted`, the message survives a crash of the process.
    async fn accept(&self, accept: Accept) -> Result<AcceptOutcome, StoreError>;

    /// The device has processed everything up to `seq`: forget those messages.
    async fn ack(&self, token: &str, seq: u64) -> Result<(), StoreError>;

    /// Up to `limit` unexpired messages of `token` with seq above `after`.
    async fn replay(&self, token: &str, after: u64, limit: u32) -> Result<Replay, StoreError>;
}
