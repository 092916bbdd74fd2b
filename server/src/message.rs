//! A push as it travels inside Pigeon: one [`Message`], shared by every device it goes to,
//! and one [`Delivery`] per device, which adds that device's seq; or, for a push to a
//! shared stream (every device of the app), one [`SharedDelivery`] with the stream's
//! offset.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pigeon_proto::device::{Priority, Push};
use pigeon_proto::store::StoredMessage;

/// A push's traffic class: what it is for, and so how it is stored and limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// To devices online now only, never stored (a TTL of 0).
    Realtime,
    /// The default: stored for offline devices until its TTL, under the delivery contract.
    #[default]
    Notification,
    /// Stored like a notification, with a TTL of at most `limits.max_marketing_ttl`.
    Marketing,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 3] = [Class::Realtime, Class::Notification, Class::Marketing];

    /// Its name in the API, the config and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Class::Realtime => "realtime",
            Class::Notification => "notification",
            Class::Marketing => "marketing",
        }
    }

    /// The class of a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.name() == name)
    }
}

impl Class {
    /// Its number in stored messages (`StoredMessage.class`): 0 is `notification`, the
    /// class of messages stored before classes were.
    pub fn to_stored(self) -> u32 {
        match self {
            Class::Notification => 0,
            Class::Realtime => 1,
            Class::Marketing => 2,
        }
    }

    /// The class of a stored number; an unknown one is `notification`.
    pub fn from_stored(number: u32) -> Self {
        match number {
            1 => Class::Realtime,
            2 => Class::Marketing,
            _ => Class::Notification,
        }
    }
}

/// The shortest step of a paced delivery: a paced push is handed out in steps at least this
/// far apart.
pub const PACE_STEP: Duration = Duration::from_millis(100);

/// One accepted push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The id the push API answered with.
    pub id: String,
    /// The payload's JSON text, exactly as given.
    pub payload: Bytes,
    /// Priority, as given.
    pub priority: Priority,
    /// Traffic class, as given (for the statistics of the process that delivers it).
    pub class: Class,
    /// Unix milliseconds of acceptance.
    pub accepted_at_ms: u64,
    /// Unix milliseconds after which it is not delivered. Equal to `accepted_at_ms` for a
    /// TTL of 0: such a message goes only to devices online now, and is never stored.
    pub expires_at_ms: u64,
    /// Collapse key; empty for none.
    pub collapse_key: String,
    /// For a message of a shared stream: the devices it is for, by their tags (`None`:
    /// every device of the app).
    pub filter: Option<Box<TagFilter>>,
    /// For a message of a shared stream: spread its live hand-out over this many
    /// milliseconds (0: at once). Direct pushes are paced by the pipeline instead.
    pub pace_ms: u64,
}

/// Which devices of an app a shared-stream message is for, by their tags: a device must
/// have one of `any` (when it is not empty), all of `all`, and none of `none`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagFilter {
    /// One of these (any, when empty).
    pub any: Vec<String>,
    /// All of these.
    pub all: Vec<String>,
    /// None of these.
    pub none: Vec<String>,
}

/// Whether a message of a shared stream is for a device (see [`TagFilter::decide`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// It is.
    For,
    /// It is not: the audience's tags leave the device out.
    NotFor,
    /// The audience includes the device, but its user's preferences or frequency cap skip
    /// it.
    Skipped,
}

impl TagFilter {
    /// Whether the message at `offset` of the stream is for a device whose tags `since`
    /// describes: the offset at which it got a tag (the stream's head then), `None` for a
    /// tag it does not have. A tag got at or after the message's offset does not count: a
    /// device that joins a tag does not get what was pushed to it before.
    pub fn matches(&self, offset: u64, since: impl Fn(&str) -> Option<u64>) -> bool {
        self.decide(offset, since) == Match::For
    }

    /// As [`TagFilter::matches`], telling apart a device the message is not for only
    /// because of one of Pigeon's own tags in `none` (its user opted out, or had its
    /// frequency cap): such a device is skipped, and counted so.
    pub fn decide(&self, offset: u64, since: impl Fn(&str) -> Option<u64>) -> Match {
        let has = |tag: &String| since(tag).is_some_and(|since| since < offset);
        if !(self.any.is_empty() || self.any.iter().any(has)) || !self.all.iter().all(has) {
            return Match::NotFor;
        }
        let mut skipped = false;
        for tag in self.none.iter().filter(|tag| has(tag)) {
            if !crate::devices::is_reserved(tag) {
                return Match::NotFor;
            }
            skipped = true;
        }
        if skipped { Match::Skipped } else { Match::For }
    }

    pub(crate) fn to_stored(&self) -> pigeon_proto::store::TagFilter {
        pigeon_proto::store::TagFilter {
            any: self.any.clone(),
            all: self.all.clone(),
            none: self.none.clone(),
        }
    }

    pub(crate) fn from_stored(stored: pigeon_proto::store::TagFilter) -> Self {
        Self {
            any: stored.any,
            all: stored.all,
            none: stored.none,
        }
    }
}

impl Message {
    /// Whether the message may be stored for devices that are offline (TTL above 0).
    pub fn is_storable(&self) -> bool {
        self.expires_at_ms > self.accepted_at_ms
    }

    /// Whether the message can no longer be delivered at `now_ms`. A TTL-0 message never
    /// expires while it is being handed to a live connection; it is simply never stored.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.is_storable() && now_ms >= self.expires_at_ms
    }

    /// The stored form.
    pub fn to_stored(&self) -> StoredMessage {
        StoredMessage {
            message_id: self.id.clone(),
            payload: self.payload.clone(),
            priority: self.priority as i32,
            accepted_at_ms: self.accepted_at_ms,
            expires_at_ms: self.expires_at_ms,
            collapse_key: self.collapse_key.clone(),
            filter: self.filter.as_deref().map(TagFilter::to_stored),
            class: self.class.to_stored(),
            pace_ms: self.pace_ms,
        }
    }

    /// Back from the stored form.
    pub fn from_stored(stored: StoredMessage) -> Self {
        Self {
            priority: stored.priority(),
            class: Class::from_stored(stored.class),
            id: stored.message_id,
            payload: stored.payload,
            accepted_at_ms: stored.accepted_at_ms,
            expires_at_ms: stored.expires_at_ms,
            collapse_key: stored.collapse_key,
            filter: stored
                .filter
                .map(|filter| Box::new(TagFilter::from_stored(filter))),
            pace_ms: stored.pace_ms,
        }
    }
}

/// A message on its way to one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The device's sequence number for this message.
    pub seq: u64,
    /// The message.
    pub message: Arc<Message>,
}

impl Delivery {
    /// The frame that carries it to the device.
    pub fn to_frame(&self) -> Push {
        self.message.to_frame(self.seq, "", 0)
    }
}

/// A message of a shared stream, on its way to the devices that read the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDelivery {
    /// The stream's name.
    pub stream: &'static str,
    /// The stream's epoch the offset is in.
    pub epoch: u64,
    /// The message's offset in the stream.
    pub offset: u64,
    /// The message.
    pub message: Arc<Message>,
}

impl SharedDelivery {
    /// The frame that carries it to a device.
    pub fn to_frame(&self) -> Push {
        self.message.to_frame(0, self.stream, self.offset)
    }
}

impl Message {
    /// The frame of this message at `seq` (a direct push) or at `offset` of `stream`.
    fn to_frame(&self, seq: u64, stream: &str, offset: u64) -> Push {
        Push {
            seq,
            message_id: self.id.clone(),
            payload: self.payload.clone(),
            priority: self.priority as i32,
            accepted_at_ms: self.accepted_at_ms,
            collapse_key: self.collapse_key.clone(),
            stream: stream.to_owned(),
            offset,
        }
    }
}

/// Unix time in milliseconds.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A new message id: 48 bits of milliseconds then 80 random bits, as 32 hex digits, so ids
/// sort by acceptance time and never collide in practice.
pub fn new_message_id(now_ms: u64) -> String {
    let random: u128 = rand::random();
    format!(
        "{:012x}{:020x}",
        now_ms & 0xffff_ffff_ffff,
        random & ((1u128 << 80) - 1)
    )
}

/// The message id of a push scheduled with an idempotency key: the same for every retry
/// of the request (FNV-1a, 128 bits, of the app and the key), so a retry finds the push it
/// scheduled instead of scheduling a second.
pub fn keyed_message_id(app: &str, key: &str) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let mut hash = OFFSET;
    for byte in app.bytes().chain([0]).chain(key.bytes()) {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    format!("{hash:032x}")
}

/// A new device token: 128 random bits, base64url.
pub fn new_device_token() -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_time_ordered() {
        let a = new_message_id(1_000);
        let b = new_message_id(2_000);
        assert_eq!(a.len(), 32);
        assert!(a < b);
        assert_ne!(new_message_id(1_000), new_message_id(1_000));
        assert_ne!(new_device_token(), new_device_token());
    }

    #[test]
    fn stored_form_round_trips() {
        let message = Message {
            pace_ms: 60_000,
            id: new_message_id(5),
            payload: Bytes::from_static(b"{\"a\":1}"),
            priority: Priority::High,
            class: Default::default(),
            accepted_at_ms: 5,
            expires_at_ms: 10,
            collapse_key: "score".into(),
            filter: Some(Box::new(TagFilter {
                any: vec!["a".into()],
                all: Vec::new(),
                none: vec!["b".into()],
            })),
        };
        assert_eq!(Message::from_stored(message.to_stored()), message);
        assert!(message.is_storable());
        assert!(message.is_expired(10));
        assert!(!message.is_expired(9));
    }

    #[test]
    fn a_filter_counts_tags_got_before_the_offset() {
        let filter = TagFilter {
            any: vec!["sports".into(), "news".into()],
            all: vec!["beta".into()],
            none: vec!["muted".into()],
        };
        let tags = |list: &'static [(&'static str, u64)]| {
            move |tag: &str| list.iter().find(|(name, _)| *name == tag).map(|(_, s)| *s)
        };
        assert!(filter.matches(10, tags(&[("news", 3), ("beta", 0)])));
        // Joined beta at the message's offset: too late for it.
        assert!(!filter.matches(10, tags(&[("news", 3), ("beta", 10)])));
        assert!(!filter.matches(10, tags(&[("beta", 0)])));
        assert!(!filter.matches(10, tags(&[("news", 3), ("beta", 0), ("muted", 1)])));
        // Muted only after the message: it was for the device.
        assert!(filter.matches(10, tags(&[("news", 3), ("beta", 0), ("muted", 12)])));
        let none_only = TagFilter {
            none: vec!["muted".into()],
            ..TagFilter::default()
        };
        assert!(none_only.matches(1, tags(&[])));
        assert!(!none_only.matches(5, tags(&[("muted", 0)])));
    }

    #[test]
    fn a_device_left_out_only_by_reserved_tags_is_skipped() {
        let filter = TagFilter {
            any: vec!["fans".into()],
            all: Vec::new(),
            none: vec!["muted".into(), "!optout:marketing".into(), "!cap:7".into()],
        };
        let tags = |list: &'static [(&'static str, u64)]| {
            move |tag: &str| list.iter().find(|(name, _)| *name == tag).map(|(_, s)| *s)
        };
        assert_eq!(filter.decide(10, tags(&[("fans", 0)])), Match::For);
        assert_eq!(
            filter.decide(10, tags(&[("fans", 0), ("!cap:7", 2)])),
            Match::Skipped
        );
        assert_eq!(
            filter.decide(
                10,
                tags(&[("fans", 0), ("!optout:marketing", 2), ("!cap:7", 2)])
            ),
            Match::Skipped
        );
        // Not in the audience, or left out by the app's own tags: not skipped, not for it.
        assert_eq!(filter.decide(10, tags(&[("!cap:7", 2)])), Match::NotFor);
        assert_eq!(
            filter.decide(10, tags(&[("fans", 0), ("muted", 1), ("!cap:7", 2)])),
            Match::NotFor
        );
    }
}
