//! Frequency caps of pushes stored once (to all, and to tags).
//!
//! A direct marketing push is counted against each named user's cap when it is accepted
//! (see `push`). A push stored once names no users: it is matched to devices on the
//! processes that hold them. So a user's count goes up when one of its devices
//! acknowledges such a push ([`SharedCaps::got`]; each push once per user, however many
//! of its devices got it), and a user that has had its cap in the current window gets a
//! tag Pigeon reserves for it on each of its devices, `!cap:<window>`: marketing pushes to
//! all and to tags accepted from then on in that window are not for devices with it, as
//! for opted-out users (see `devices`). A user capped by direct pushes is tagged the same
//! way. So the cap holds, but for the pushes to all and tags that were on their way to a
//! user's devices when it reached the cap (counted at acknowledgement, they cannot be
//! taken back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{AppSettings, FrequencyCap};
use crate::log_throttle::Throttle;
use crate::message::{Class, Message, unix_millis};
use crate::push::Fanout;
use crate::store::{Store, StoreError};

/// The prefix of the tag of a user that has had its cap in a window.
const CAP_TAG: &str = "!cap:";

/// Acknowledgements held for the next count at most; past it they are not counted.
const MAX_PENDING: usize = 100_000;

/// How often the acknowledgements are counted.
const FLUSH: Duration = Duration::from_secs(1);

/// The tag of the users that have had their cap in `window`.
pub fn cap_tag(window: u64) -> String {
    format!("{CAP_TAG}{window}")
}

/// Whether `tag` is the tag of a cap (of any window).
pub fn is_cap_tag(tag: &str) -> bool {
    tag.starts_with(CAP_TAG)
}

/// The number of the window of `cap` at `now_ms`, and its length in ms.
pub fn window(cap: FrequencyCap, now_ms: u64) -> (u64, u64) {
    let window_ms = (cap.window.as_millis() as u64).max(1);
    (now_ms / window_ms, window_ms)
}

/// Gives each device of `uids` (of `app`) the tag of the cap in `window`, in place of that
/// of an earlier window, and tells the processes holding them.
pub async fn tag_capped(
    store: &dyn Store,
    fanout: &dyn Fanout,
    app: &str,
    uids: &[String],
    window: u64,
) -> Result<(), StoreError> {
    if uids.is_empty() {
        return Ok(());
    }
    let tag = cap_tag(window);
    let retag = |mut tags: Vec<String>| {
        if tags.contains(&tag) {
            return None;
        }
        tags.retain(|name| !is_cap_tag(name));
        tags.push(tag.clone());
        Some(tags)
    };
    crate::devices::retag_users(store, fanout, app, uids, retag).await
}

/// The acknowledged marketing pushes stored once of a process's devices, counted against
/// their users' caps every second.
pub struct SharedCaps {
    caps: HashMap<String, FrequencyCap>,
    /// (app, device token, message id) acknowledged since the last count.
    pending: Mutex<Vec<(Arc<str>, String, String)>>,
    /// Acknowledgements not counted: more were waiting than allowed.
    dropped: AtomicU64,
}

impl SharedCaps {
    /// The caps of `apps`.
    pub fn new(apps: &[AppSettings]) -> Self {
        Self {
            caps: apps
                .iter()
                .filter_map(|app| Some((app.id.clone(), app.frequency_cap?)))
                .collect(),
            pending: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// The device `token` of `app` acknowledged `messages` of its app's stream.
    pub fn got(&self, app: &str, token: &str, messages: &[Arc<Message>]) {
        if !self.caps.contains_key(app) {
            return;
        }
        let mut capped = messages
            .iter()
            .filter(|message| message.class == Class::Marketing)
            .peekable();
        if capped.peek().is_none() {
            return;
        }
        let app: Arc<str> = Arc::from(app);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for message in capped {
            if pending.len() >= MAX_PENDING {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            pending.push((app.clone(), token.to_owned(), message.id.clone()));
        }
    }

    /// Counts what was acknowledged every second until `shutdown`, and tags the users who
    /// had their caps.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        fanout: Arc<dyn Fanout>,
        shutdown: CancellationToken,
    ) {
        if self.caps.is_empty() {
            return;
        }
        let mut ticks = tokio::time::interval(FLUSH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(error) = self.count(store.as_ref(), fanout.as_ref()).await {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "counting frequency caps failed; those acknowledgements are not counted");
                }
            }
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(
                        dropped,
                        suppressed,
                        "acknowledgements past {MAX_PENDING} between counts were not counted against frequency caps"
                    );
                }
            }
        }
    }

    /// Counts what was acknowledged since the last count.
    pub async fn count(&self, store: &dyn Store, fanout: &dyn Fanout) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut by_app: HashMap<Arc<str>, Vec<(String, String)>> = HashMap::new();
        for (app, token, message) in pending {
            by_app.entry(app).or_default().push((token, message));
        }
        let now_ms = unix_millis();
        for (app, got) in by_app {
            let Some(cap) = self.caps.get(&*app).copied() else {
                continue;
            };
            // By user: each push once per user.
            let mut uid_of: HashMap<String, Option<String>> = HashMap::new();
            let mut pairs = Vec::with_capacity(got.len());
            for (token, message) in got {
                if !uid_of.contains_key(&token) {
                    let uid = store.device(&app, &token).await?.map(|device| device.uid);
                    uid_of.insert(token.clone(), uid);
                }
                if let Some(Some(uid)) = uid_of.get(&token) {
                    pairs.push((uid.clone(), message));
                }
            }
            pairs.sort();
            pairs.dedup();
            let (window, window_ms) = window(cap, now_ms);
            let reached = store
                .count_shared_capped(&app, &pairs, window, window_ms, cap.marketing)
                .await?;
            let mut capped: Vec<String> = pairs
                .into_iter()
                .zip(reached)
                .filter(|(_, reached)| *reached)
                .map(|((uid, _), _)| uid)
                .collect();
            capped.dedup();
            tag_capped(store, fanout, &app, &capped, window).await?;
        }
        Ok(())
    }
}
