//! The store contract: the same cases against the embedded store (redb in a temporary
//! directory), the Redis store on a `redis-server` of the test's own, and the Redis store on
//! a three-master Redis Cluster. The rules are those of `pigeon_server::store`'s docs.
//!
//! Each case gets a fresh store (a new directory, or a new key prefix on the same Redis) and
//! says which case and which store failed.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pigeon_proto::device::Priority;
use pigeon_server::cluster::membership::Membership;
use pigeon_server::config::{ClusterSettings, Limits};
use pigeon_server::connections::ConnectionTable;
use pigeon_server::message::{Class, Message, TagFilter, new_message_id, unix_millis};
use pigeon_server::store::embedded::EmbeddedStore;
use pigeon_server::store::redis::{RedisConnection, RedisStore};
use pigeon_server::store::{
    ALL, Accept, AcceptOutcome, AliasSet, AppendOutcome, Cancel, DeviceCounters, DeviceTags,
    DisplacedBy, NewlyOpened, Once, Recorded, Route, StatsCounts, StatsRow, Store, StreamHead,
    TagChange, Target,
};
use support::cluster::{Redis, RedisCluster};
use tokio_util::sync::CancellationToken;

/// Messages kept per device, and per shared stream, by every store under test.
const CAP: u32 = 5;

fn limits() -> Limits {
    Limits {
        store_queue: 1024,
        max_stored_per_device: CAP,
        max_stored_per_stream: CAP,
        ..Limits::default()
    }
}

/// A store under test, and how to make one of its devices connected.
struct Backend {
    store: Arc<dyn Store>,
    connect: Connect,
    /// Whether a record is all or nothing (one transaction), so an interrupted one can never
    /// leave some targets recorded and others not.
    atomic_records: bool,
    _dir: Option<tempfile::TempDir>,
}

enum Connect {
    /// The embedded store learns routes from the process's connection table.
    Table(Arc<ConnectionTable>),
    /// The Redis store reads the routes cluster membership writes.
    Membership(Membership),
}

impl Backend {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
        let store = EmbeddedStore::open(dir.path(), &limits(), table.clone()).expect("open");
        Self {
            store: Arc::new(store),
            connect: Connect::Table(table),
            atomic_records: true,
            _dir: Some(dir),
        }
    }

    async fn redis(urls: Vec<String>, cluster: bool, prefix: String) -> Self {
        let settings = ClusterSettings {
            redis: urls,
            redis_cluster: cluster,
            ..ClusterSettings::default()
        };
        let connection = RedisConnection::open(&settings).await.expect("connect");
        Self {
            store: Arc::new(RedisStore::new(connection.clone(), &prefix, &limits())),
            connect: Connect::Membership(Membership::new(connection, &prefix)),
            atomic_records: false,
            _dir: None,
        }
    }

    /// Makes the device connected: routed to connection 7 of node `node-a` (standalone: of
    /// this process).
    async fn connect(&self, token: &str) -> Route {
        match &self.connect {
            Connect::Table(table) => {
                let (connection, _) = table.register(
                    &Arc::from(token),
                    "demo",
                    StreamHead::default(),
                    &DeviceTags::default(),
                );
                Route {
                    node: String::new(),
                    connection: connection.id(),
                }
            }
            Connect::Membership(membership) => {
                membership
                    .route_online(token, "node-a", 7)
                    .await
                    .expect("route");
                Route {
                    node: "node-a".into(),
                    connection: 7,
                }
            }
        }
    }

    async fn device(&self, uid: &str) -> String {
        self.store
            .admit_device("demo", uid, "")
            .await
            .expect("admit")
            .token
    }

    /// Records `message` for `tokens` (stored unless the message's TTL is 0).
    async fn record(
        &self,
        message: Arc<Message>,
        tokens: &[&str],
        idempotency: Option<(&str, u64)>,
    ) -> AcceptOutcome {
        self.store
            .record(accept("demo", message, tokens, idempotency))
            .await
            .expect("record")
    }

    /// The seqs a one-target record gave.
    async fn push(&self, token: &str, body: &str) -> u64 {
        match self.record(message(body, 60_000, ""), &[token], None).await {
            AcceptOutcome::Accepted { targets, .. } => match &targets[0].1 {
                Recorded::Seq { seq, .. } => *seq,
                other => panic!("expected a seq, got {other:?}"),
            },
            other => panic!("expected accepted, got {other:?}"),
        }
    }

    /// `(seq, payload)` of everything replayable after `after`.
    async fn pending(&self, token: &str, after: u64) -> Vec<(u64, String)> {
        let replay = self.store.replay(token, after, 1000).await.expect("replay");
        assert!(!replay.more);
        replay
            .deliveries
            .iter()
            .map(|delivery| {
                let payload = String::from_utf8_lossy(&delivery.message.payload).into_owned();
                (delivery.seq, payload)
            })
            .collect()
    }

    async fn counters(&self, token: &str) -> DeviceCounters {
        self.store
            .counters(token)
            .await
            .expect("counters")
            .expect("a known device")
    }
}

fn message(body: &str, ttl_ms: u64, collapse_key: &str) -> Arc<Message> {
    let now = unix_millis();
    Arc::new(Message {
        pace_ms: 0,
        id: new_message_id(now),
        payload: Bytes::from(body.to_owned()),
        priority: Priority::Normal,
        class: Default::default(),
        accepted_at_ms: now,
        expires_at_ms: now + ttl_ms,
        collapse_key: collapse_key.into(),
        filter: None,
    })
}

fn accept(
    app: &str,
    message: Arc<Message>,
    tokens: &[&str],
    idempotency: Option<(&str, u64)>,
) -> Accept {
    let store = message.is_storable();
    Accept {
        app: app.into(),
        targets: tokens
            .iter()
            .map(|token| Target {
                token: (*token).into(),
                store,
            })
            .collect(),
        message,
        once: idempotency.map(|(key, until_ms)| Once::Key {
            key: key.to_owned(),
            until_ms,
        }),
    }
}

fn keyed(key: &str, until_ms: u64) -> Once {
    Once::Key {
        key: key.into(),
        until_ms,
    }
}

fn recorded(outcome: &AcceptOutcome) -> Vec<Recorded> {
    match outcome {
        AcceptOutcome::Accepted { targets, .. } => targets
            .iter()
            .map(|(_, recorded)| recorded.clone())
            .collect(),
        other => panic!("expected accepted, got {other:?}"),
    }
}

/// The payloads of the messages a record put out of queues, and why.
fn displaced(outcome: &AcceptOutcome) -> Vec<(String, DisplacedBy)> {
    match outcome {
        AcceptOutcome::Accepted { displaced, .. } => displaced
            .iter()
            .map(|d| {
                (
                    String::from_utf8_lossy(&d.message.payload).into_owned(),
                    d.by,
                )
            })
            .collect(),
        other => panic!("expected accepted, got {other:?}"),
    }
}

fn seq(seq: u64) -> Recorded {
    Recorded::Seq { seq, route: None }
}

// The cases.

async fn devices_are_admitted_and_resumed_by_their_own_uid_only(backend: &Backend) {
    let store = &backend.store;
    let first = store
        .admit_device("demo", "alice", "")
        .await
        .expect("admit");
    assert!(!first.resumed);
    let again = store
        .admit_device("demo", "alice", &first.token)
        .await
        .expect("admit");
    assert!(again.resumed);
    assert_eq!(again.token, first.token);
    // Unknown and implausible tokens get a new one.
    for presented in ["never-issued", "a}b{c", &"x".repeat(300)] {
        let fresh = store
            .admit_device("demo", "alice", presented)
            .await
            .expect("admit");
        assert!(!fresh.resumed, "{presented}");
        assert_ne!(fresh.token, presented);
    }
    // Alice's token presented by bob is no key to alice's queue: bob gets a token of his
    // own, and alice keeps hers, with her messages and her pushes.
    backend.push(&first.token, "for alice").await;
    let bob = store
        .admit_device("demo", "bob", &first.token)
        .await
        .expect("admit");
    assert!(!bob.resumed);
    assert_ne!(bob.token, first.token);
    assert_eq!(bob.highest_seq, 0);
    assert!(backend.pending(&bob.token, 0).await.is_empty());
    assert_eq!(
        backend.pending(&first.token, 0).await,
        vec![(1, "for alice".into())]
    );
    let tokens = store
        .tokens_for_uids("demo", &["alice".into(), "bob".into(), "bo".into()])
        .await
        .expect("tokens");
    assert!(tokens[0].contains(&first.token));
    assert_eq!(tokens[1], vec![bob.token.clone()]);
    assert!(tokens[2].is_empty());
    let resumed = store
        .admit_device("demo", "alice", &first.token)
        .await
        .expect("admit");
    assert!(resumed.resumed);
    assert_eq!(resumed.highest_seq, 1);
}

async fn seqs_start_at_one_and_count_up_per_device(backend: &Backend) {
    let alice = backend.device("alice").await;
    let bob = backend.device("bob").await;
    for expected in 1..=3 {
        assert_eq!(backend.push(&alice, "a").await, expected);
    }
    assert_eq!(backend.push(&bob, "b").await, 1);
    let resumed = backend
        .store
        .admit_device("demo", "alice", &alice)
        .await
        .expect("admit");
    assert_eq!((resumed.highest_seq, resumed.acked_seq), (3, 0));
    // One record with both devices gives each its own next seq.
    let outcome = backend
        .record(message("both", 60_000, ""), &[&alice, &bob], None)
        .await;
    assert_eq!(recorded(&outcome), vec![seq(4), seq(2)]);
}

async fn acks_are_cumulative_and_never_above_the_highest_seq(backend: &Backend) {
    let token = backend.device("alice").await;
    for n in 1..=4 {
        backend.push(&token, &format!("m{n}")).await;
    }
    backend.store.ack(&token, 2).await.expect("ack");
    // An older ack changes nothing.
    backend.store.ack(&token, 1).await.expect("ack");
    assert_eq!(
        backend.pending(&token, 0).await,
        vec![(3, "m3".into()), (4, "m4".into())]
    );
    // An ack far ahead of what was assigned counts up to the highest seq only, so later
    // messages are not acknowledged before they exist.
    backend.store.ack(&token, 3000).await.expect("ack");
    let device = backend
        .store
        .admit_device("demo", "alice", &token)
        .await
        .expect("admit");
    assert_eq!((device.acked_seq, device.highest_seq), (4, 4));
    assert_eq!(backend.push(&token, "m5").await, 5);
    assert_eq!(backend.pending(&token, 4).await, vec![(5, "m5".into())]);
    assert_eq!(backend.counters(&token).await.pending, 1);
    // Acks of unknown devices are ignored.
    backend.store.ack("never-issued", 9).await.expect("ack");
}

async fn replay_is_in_seq_order_and_pages(backend: &Backend) {
    let token = backend.device("alice").await;
    let many = backend.device("many").await;
    for n in 1..=CAP {
        backend.push(&token, &format!("m{n}")).await;
    }
    let first = backend.store.replay(&token, 0, 2).await.expect("replay");
    let seqs: Vec<u64> = first.deliveries.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert!(first.more);
    let next = backend.store.replay(&token, 2, 2).await.expect("replay");
    let seqs: Vec<u64> = next.deliveries.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [3, 4]);
    let last = backend.store.replay(&token, 4, 2).await.expect("replay");
    let seqs: Vec<u64> = last.deliveries.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [5]);
    assert!(!last.more);
    // The message comes back as it was recorded.
    let body = message("{\"n\":1}", 60_000, "k");
    backend.record(body.clone(), &[&many], None).await;
    let replay = backend.store.replay(&many, 0, 10).await.expect("replay");
    assert_eq!(*replay.deliveries[0].message, *body);
    assert!(backend.pending("never-issued", 0).await.is_empty());
}

async fn expired_messages_are_never_replayed(backend: &Backend) {
    let token = backend.device("alice").await;
    backend
        .record(message("short", 1, ""), &[&token], None)
        .await;
    backend.push(&token, "long").await;
    let short_too = message("short too", 1, "");
    let all_expired = short_too.expires_at_ms;
    backend.record(short_too, &[&token], None).await;
    while unix_millis() <= all_expired {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(backend.pending(&token, 0).await, vec![(2, "long".into())]);
    // A page is filled past expired rows.
    let page = backend.store.replay(&token, 0, 1).await.expect("replay");
    assert_eq!(page.deliveries.len(), 1);
    assert_eq!(page.deliveries[0].seq, 2);
}

async fn a_collapse_key_replaces_the_pending_message(backend: &Backend) {
    let token = backend.device("alice").await;
    let first = message("score 1-0", 60_000, "score");
    let outcome = backend.record(first.clone(), &[&token], None).await;
    assert_eq!(displaced(&outcome), []);
    backend
        .record(message("other", 60_000, ""), &[&token], None)
        .await;
    let outcome = backend
        .record(message("score 2-0", 60_000, "score"), &[&token], None)
        .await;
    // The message replaced comes back whole (its id and class are counted).
    match &outcome {
        AcceptOutcome::Accepted { displaced, .. } => {
            assert_eq!(displaced.len(), 1);
            assert_eq!(displaced[0].message, first);
            assert_eq!(displaced[0].by, DisplacedBy::Collapsed);
        }
        other => panic!("expected accepted, got {other:?}"),
    }
    assert_eq!(
        backend.pending(&token, 0).await,
        vec![(2, "other".into()), (3, "score 2-0".into())]
    );
    // Once acknowledged, a message with the key is no longer pending: nothing is replaced.
    backend.store.ack(&token, 3).await.expect("ack");
    let outcome = backend
        .record(message("score 3-0", 60_000, "score"), &[&token], None)
        .await;
    assert_eq!(displaced(&outcome), []);
    let counters = backend.counters(&token).await;
    assert_eq!((counters.pending, counters.collapsed), (1, 1));
}

async fn the_per_device_cap_keeps_the_newest(backend: &Backend) {
    let token = backend.device("alice").await;
    let mut dropped = Vec::new();
    for n in 1..=CAP + 2 {
        let outcome = backend
            .record(message(&format!("m{n}"), 60_000, ""), &[&token], None)
            .await;
        dropped.extend(displaced(&outcome));
    }
    assert_eq!(
        dropped,
        [
            ("m1".to_owned(), DisplacedBy::Dropped),
            ("m2".to_owned(), DisplacedBy::Dropped)
        ]
    );
    let seqs: Vec<u64> = backend
        .pending(&token, 0)
        .await
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(seqs, (3..=u64::from(CAP) + 2).collect::<Vec<_>>());
    let counters = backend.counters(&token).await;
    assert_eq!((counters.pending, counters.dropped), (u64::from(CAP), 2));
}

async fn ttl_zero_goes_only_to_connected_devices_and_is_never_stored(backend: &Backend) {
    let online = backend.device("online").await;
    let offline = backend.device("offline").await;
    let route = backend.connect(&online).await;
    let outcome = backend
        .record(message("now or never", 0, ""), &[&online, &offline], None)
        .await;
    assert_eq!(
        recorded(&outcome),
        vec![
            Recorded::Seq {
                seq: 1,
                route: Some(route.clone())
            },
            Recorded::Dropped
        ]
    );
    assert!(backend.pending(&online, 0).await.is_empty());
    // A stored message to a connected device carries its route too; the offline device's
    // seq did not move.
    let outcome = backend
        .record(message("kept", 60_000, ""), &[&online, &offline], None)
        .await;
    assert_eq!(
        recorded(&outcome),
        vec![
            Recorded::Seq {
                seq: 2,
                route: Some(route)
            },
            seq(1)
        ]
    );
}

async fn an_idempotency_key_records_once_within_its_window(backend: &Backend) {
    let token = backend.device("alice").await;
    let far = unix_millis() + 60_000;
    let first = message("first", 60_000, "");
    let first_id = first.id.clone();
    let outcome = backend
        .record(first, &[&token], Some(("order-1", far)))
        .await;
    assert_eq!(recorded(&outcome), vec![seq(1)]);
    let again = backend
        .record(
            message("again", 60_000, ""),
            &[&token],
            Some(("order-1", far)),
        )
        .await;
    assert_eq!(
        again,
        AcceptOutcome::Duplicate {
            message_id: first_id
        }
    );
    // Another app's key of the same name is another key.
    let other_app = backend
        .store
        .record(accept(
            "other",
            message("other app", 60_000, ""),
            &[&token],
            Some(("order-1", far)),
        ))
        .await
        .expect("record");
    assert_eq!(recorded(&other_app), vec![Recorded::Unknown]);
    // Past its window the key counts no more.
    let soon = unix_millis() + 300;
    backend
        .record(
            message("short key", 60_000, ""),
            &[&token],
            Some(("order-2", soon)),
        )
        .await;
    while unix_millis() <= soon + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later = backend
        .record(
            message("later", 60_000, ""),
            &[&token],
            Some(("order-2", far)),
        )
        .await;
    assert_eq!(recorded(&later), vec![seq(3)]);
    assert_eq!(
        backend.pending(&token, 0).await,
        vec![
            (1, "first".into()),
            (2, "short key".into()),
            (3, "later".into())
        ]
    );
}

async fn a_retry_after_an_interrupted_record_reaches_each_device_once(backend: &Backend) {
    const DEVICES: usize = 1500;
    let uids: Vec<String> = (0..DEVICES).map(|n| format!("u{n}")).collect();
    let tokens = futures_util::future::join_all(uids.iter().map(|uid| backend.device(uid))).await;
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let far = unix_millis() + 60_000;
    // Interrupt a record as soon as its first target holds the message, as if the process
    // recording it died there; try again with a new key until an interruption leaves a
    // partial record, where a store can leave one.
    let mut attempt = 0;
    let (key, interrupted) = loop {
        attempt += 1;
        let key = format!("order-{attempt}");
        let first = message("first try", 60_000, "");
        let record = backend
            .store
            .record(accept("demo", first, &tokens, Some((&key, far))));
        let first_recorded = async {
            while backend.pending(tokens[0], 0).await.is_empty() {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            biased;
            () = first_recorded => {}
            outcome = record => { outcome.expect("record"); }
        }
        let mut recorded = 0;
        for token in &tokens {
            recorded += usize::from(!backend.pending(token, 0).await.is_empty());
        }
        if backend.atomic_records {
            assert_eq!(recorded, DEVICES, "an interrupted record is all or nothing");
            break (key, recorded);
        }
        if recorded < DEVICES {
            break (key, recorded);
        }
        assert!(attempt < 10, "no interruption left a partial record");
        for token in &tokens {
            backend.store.ack(token, u64::MAX).await.expect("ack");
        }
    };
    eprintln!("interrupted after {interrupted} of {DEVICES} targets");
    // The retry: the client never got an answer, so it sends the push again, as a new
    // request (a new message id) with the same idempotency key.
    let retry = backend
        .record(message("retry", 60_000, ""), &tokens, Some((&key, far)))
        .await;
    let message_id = match &retry {
        AcceptOutcome::Accepted { message, .. } => message.id.clone(),
        AcceptOutcome::Duplicate { message_id } => message_id.clone(),
    };
    for token in &tokens {
        let replay = backend.store.replay(token, 0, 100).await.expect("replay");
        let copies: Vec<&str> = replay
            .deliveries
            .iter()
            .map(|delivery| delivery.message.id.as_str())
            .collect();
        assert_eq!(copies, [message_id.as_str()], "device {token}");
    }
}

async fn unknown_and_foreign_tokens_are_unknown(backend: &Backend) {
    let token = backend.device("alice").await;
    let outcome = backend
        .record(
            message("hello", 60_000, ""),
            &["never-issued", "a}b{c", &token],
            None,
        )
        .await;
    assert_eq!(
        recorded(&outcome),
        vec![Recorded::Unknown, Recorded::Unknown, seq(1)]
    );
    // A device of demo is no device of another app: not known, not recorded, not resumed.
    let known = backend
        .store
        .known_tokens("other", &[token.clone(), "never-issued".into()])
        .await
        .expect("known");
    assert_eq!(known, vec![false, false]);
    assert_eq!(
        backend
            .store
            .known_tokens("demo", std::slice::from_ref(&token))
            .await
            .expect("known"),
        vec![true]
    );
    let foreign = backend
        .store
        .record(accept("other", message("x", 60_000, ""), &[&token], None))
        .await
        .expect("record");
    assert_eq!(recorded(&foreign), vec![Recorded::Unknown]);
    let admitted = backend
        .store
        .admit_device("other", "alice", &token)
        .await
        .expect("admit");
    assert!(!admitted.resumed);
    assert_ne!(admitted.token, token);
    assert_eq!(backend.pending(&token, 0).await, vec![(1, "hello".into())]);
    assert!(
        backend
            .store
            .counters("never-issued")
            .await
            .expect("counters")
            .is_none()
    );
}

async fn tags_are_set_changed_paged_and_deleted(backend: &Backend) {
    let store = &backend.store;
    let mut tokens = Vec::new();
    for uid in ["a", "b", "c"] {
        tokens.push(backend.device(uid).await);
    }
    let tags = |names: &[&str]| {
        names
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>()
    };
    let names = |tags: &DeviceTags| tags.names();
    let (a, b, c) = (&tokens[0], &tokens[1], &tokens[2]);
    // A tag is got at the head of the app's stream: entries up to it are not for it.
    let head = |n: u64| async move {
        for _ in 0..n {
            store
                .append("demo", ALL, message("x", 60_000, ""), None)
                .await
                .expect("append");
        }
    };
    head(1).await;
    let set = store
        .set_tags("demo", a, &tags(&["sports", "news", "news"]))
        .await
        .expect("set")
        .expect("a device");
    assert_eq!(set.token, *a);
    assert_eq!(names(&set.tags), ["news", "sports"]);
    assert_eq!(set.tags.since("news"), Some(1));
    assert_eq!(set.tags.since("music"), None);
    let first_version = set.tags.version;
    let info = store
        .device("demo", a)
        .await
        .expect("device")
        .expect("a device");
    assert_eq!(info.tags, set.tags);
    assert_eq!(info.uid, "a");
    assert!(info.route.is_none());
    // A tag kept keeps its since; a new one gets today's head; the version counts up.
    head(1).await;
    let set = store
        .set_tags("demo", a, &tags(&["sports", "music"]))
        .await
        .expect("set")
        .expect("a device");
    assert_eq!(
        (set.tags.since("sports"), set.tags.since("music")),
        (Some(1), Some(2))
    );
    assert!(set.tags.version > first_version);
    // So does admission.
    let admitted = store.admit_device("demo", "a", a).await.expect("admit");
    assert_eq!(admitted.tags, set.tags);
    store
        .set_tags("demo", a, &tags(&["sports", "news"]))
        .await
        .expect("set");
    assert!(
        store
            .set_tags("demo", "never-issued", &tags(&["x"]))
            .await
            .expect("set")
            .is_none()
    );
    assert!(
        store
            .set_tags("other", a, &tags(&["x"]))
            .await
            .expect("set")
            .is_none()
    );
    assert!(store.device("other", a).await.expect("device").is_none());

    // Devices added to a tag are told with their route, when connected.
    let route = backend.connect(c).await;
    let change = TagChange {
        add: vec![b.clone(), c.clone(), "never-issued".into(), a.clone()],
        remove: Vec::new(),
    };
    let (changed, retagged) = store
        .change_tag("demo", "news", change, 10)
        .await
        .expect("change");
    assert_eq!((changed.added, changed.unknown), (3, 1));
    // a had the tag already: not changed.
    let mut touched: Vec<(&str, Option<Route>)> = retagged
        .iter()
        .map(|device| (device.token.as_str(), device.route.clone()))
        .collect();
    touched.sort_by_key(|(token, _)| *token);
    let mut expected = vec![(b.as_str(), None), (c.as_str(), Some(route))];
    expected.sort_by_key(|(token, _)| *token);
    assert_eq!(touched, expected);
    assert!(
        retagged
            .iter()
            .all(|device| device.tags.since("news") == Some(2))
    );
    // Pages in token order, each after the last token of the one before.
    let mut all = [a.clone(), b.clone(), c.clone()];
    all.sort();
    let first = store
        .tag_devices("demo", "news", "", 2)
        .await
        .expect("page");
    assert_eq!(first, all[..2]);
    let second = store
        .tag_devices("demo", "news", &first[1], 2)
        .await
        .expect("page");
    assert_eq!(second, all[2..]);
    assert!(
        store
            .tag_devices("demo", "news", &second[0], 2)
            .await
            .expect("page")
            .is_empty()
    );
    // Tags are the app's own.
    assert!(
        store
            .tag_devices("other", "news", "", 10)
            .await
            .expect("page")
            .is_empty()
    );

    let change = TagChange {
        add: Vec::new(),
        remove: vec![b.clone()],
    };
    let (changed, retagged) = store
        .change_tag("demo", "news", change, 10)
        .await
        .expect("change");
    assert_eq!(changed.removed, 1);
    assert_eq!(retagged.len(), 1);
    assert!(retagged[0].tags.tags.is_empty());
    let info = store.device("demo", b).await.expect("device").expect("b");
    assert!(info.tags.tags.is_empty());
    // A device at its tag limit is not added.
    let change = TagChange {
        add: vec![a.clone()],
        remove: Vec::new(),
    };
    let (changed, retagged) = store
        .change_tag("demo", "music", change, 2)
        .await
        .expect("change");
    assert_eq!((changed.added, changed.over_limit), (0, 1));
    assert!(retagged.is_empty());
    // Replacing a device's tags takes it out of the tags it no longer has.
    store
        .set_tags("demo", a, &tags(&["music"]))
        .await
        .expect("set")
        .expect("a device");
    let news = store
        .tag_devices("demo", "news", "", 10)
        .await
        .expect("page");
    assert_eq!(news, vec![c.clone()]);
    // Removing a tag's pages, one after the other, empties it.
    let page = store
        .tag_devices("demo", "news", "", 10)
        .await
        .expect("page");
    let change = TagChange {
        add: Vec::new(),
        remove: page,
    };
    store
        .change_tag("demo", "news", change, 0)
        .await
        .expect("change");
    assert!(
        store
            .tag_devices("demo", "news", "", 10)
            .await
            .expect("page")
            .is_empty()
    );
    let info = store.device("demo", c).await.expect("device").expect("c");
    assert!(info.tags.tags.is_empty());
}

async fn a_tag_push_is_one_entry_with_its_filter(backend: &Backend) {
    let store = &backend.store;
    let mut filtered = (*message("to sports", 60_000, "")).clone();
    filtered.filter = Some(Box::new(TagFilter {
        any: vec!["sports".into()],
        all: vec!["beta".into()],
        none: vec!["muted".into()],
    }));
    let outcome = store
        .append("demo", ALL, Arc::new(filtered.clone()), None)
        .await
        .expect("append");
    let AppendOutcome::Appended { offset, epoch, .. } = outcome else {
        panic!("expected appended, got {outcome:?}");
    };
    assert_eq!(offset, 1);
    let head = store.stream_head("demo", ALL).await.expect("head");
    assert_eq!(head, StreamHead { epoch, head: 1 });
    let read = store.read_stream("demo", ALL, 0, 10).await.expect("read");
    assert_eq!(read.entries.len(), 1);
    assert_eq!(*read.entries[0].1, filtered);
    assert_eq!(
        store.stream_head("other", ALL).await.expect("head"),
        StreamHead::default()
    );
}

async fn an_alias_names_a_few_devices(backend: &Backend) {
    let store = &backend.store;
    let mut tokens = Vec::new();
    for uid in ["a", "b", "c"] {
        tokens.push(backend.device(uid).await);
    }
    let (a, b, c) = (&tokens[0], &tokens[1], &tokens[2]);
    let alias = Some("phone-of-ann");
    assert_eq!(
        store.set_alias("demo", a, alias, 2).await.expect("set"),
        AliasSet::Set
    );
    assert_eq!(
        store.set_alias("demo", b, alias, 2).await.expect("set"),
        AliasSet::Set
    );
    assert_eq!(
        store.set_alias("demo", c, alias, 2).await.expect("set"),
        AliasSet::AliasFull
    );
    // Setting the alias a device has already is no change, full or not.
    assert_eq!(
        store.set_alias("demo", a, alias, 2).await.expect("set"),
        AliasSet::Set
    );
    assert_eq!(
        store
            .set_alias("demo", "never-issued", alias, 2)
            .await
            .expect("set"),
        AliasSet::UnknownDevice
    );
    assert_eq!(
        store.set_alias("other", a, alias, 2).await.expect("set"),
        AliasSet::UnknownDevice
    );
    let names = |aliases: &[&str]| {
        aliases
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>()
    };
    let mut named = store
        .tokens_for_aliases("demo", &names(&["phone-of-ann", "nobody"]))
        .await
        .expect("aliases");
    named[0].sort();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(named, vec![both, vec![]]);
    // Cleared, and moved to another alias.
    assert_eq!(
        store.set_alias("demo", a, None, 2).await.expect("clear"),
        AliasSet::Set
    );
    assert_eq!(
        store
            .set_alias("demo", b, Some("tablet"), 2)
            .await
            .expect("move"),
        AliasSet::Set
    );
    let named = store
        .tokens_for_aliases("demo", &names(&["phone-of-ann", "tablet"]))
        .await
        .expect("aliases");
    assert_eq!(named, vec![vec![], vec![b.clone()]]);
    let info = store.device("demo", b).await.expect("device").expect("b");
    assert_eq!(info.alias, "tablet");
    let info = store.device("demo", a).await.expect("device").expect("a");
    assert_eq!(info.alias, "");
    // Aliases are the app's own.
    let other = store
        .tokens_for_aliases("other", &names(&["tablet"]))
        .await
        .expect("aliases");
    assert_eq!(other, vec![Vec::<String>::new()]);
    // A connected device's route shows.
    let route = backend.connect(b).await;
    let info = store.device("demo", b).await.expect("device").expect("b");
    assert_eq!(info.route, Some(route));
}

async fn a_shared_stream_is_stored_once_and_read_in_order(backend: &Backend) {
    let store = &backend.store;
    // A device created before the stream exists starts at its head (0); one created after
    // three appends starts after them.
    let early = store
        .admit_device("demo", "early", "")
        .await
        .expect("admit");
    assert_eq!((early.all.acked, early.all.head), (0, 0));
    let epoch = early.all.epoch;
    assert_ne!(epoch, 0);
    let mut ids = Vec::new();
    for n in 1..=3 {
        let outcome = store
            .append("demo", ALL, message(&format!("b{n}"), 60_000, ""), None)
            .await
            .expect("append");
        let AppendOutcome::Appended {
            message, offset, ..
        } = outcome
        else {
            panic!("expected appended, got {outcome:?}");
        };
        assert_eq!(offset, n);
        ids.push(message.id.clone());
    }
    let late = store.admit_device("demo", "late", "").await.expect("admit");
    assert_eq!(
        (late.all.epoch, late.all.acked, late.all.head),
        (epoch, 3, 3)
    );
    // Read in offset order, in pages.
    let page = store.read_stream("demo", ALL, 0, 2).await.expect("read");
    let offsets: Vec<u64> = page.entries.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, [1, 2]);
    assert!(page.more);
    let rest = store.read_stream("demo", ALL, 2, 2).await.expect("read");
    assert_eq!(rest.entries.len(), 1);
    assert_eq!(rest.entries[0].1.id, ids[2]);
    assert!(!rest.more);
    // Streams are the app's own.
    assert!(
        store
            .read_stream("other", ALL, 0, 10)
            .await
            .expect("read")
            .entries
            .is_empty()
    );
    // A device's acknowledged place is kept, in its epoch, never backwards.
    store
        .ack_stream(&early.token, ALL, epoch, 2)
        .await
        .expect("ack");
    store
        .ack_stream(&early.token, ALL, epoch, 1)
        .await
        .expect("ack");
    store
        .ack_stream(&early.token, ALL, epoch ^ 1, 3)
        .await
        .expect("another epoch's ack");
    let again = store
        .admit_device("demo", "early", &early.token)
        .await
        .expect("admit");
    assert!(again.resumed);
    assert_eq!(
        (again.all.epoch, again.all.acked, again.all.head),
        (epoch, 2, 3)
    );
    assert!(!again.all.epoch_changed);
}

async fn shared_entries_expire_collapse_and_are_capped(backend: &Backend) {
    let store = &backend.store;
    let device = store.admit_device("demo", "d", "").await.expect("admit");
    let short = message("short", 1, "");
    let expires = short.expires_at_ms;
    store
        .append("demo", ALL, short, None)
        .await
        .expect("append");
    store
        .append("demo", ALL, message("score 1-0", 60_000, "score"), None)
        .await
        .expect("append");
    store
        .append("demo", ALL, message("score 2-0", 60_000, "score"), None)
        .await
        .expect("append");
    // A TTL-0 message takes an offset, and is never stored.
    let now = store
        .append("demo", ALL, message("now or never", 0, ""), None)
        .await
        .expect("append");
    assert!(matches!(now, AppendOutcome::Appended { offset: 4, .. }));
    while unix_millis() <= expires {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let read = store.read_stream("demo", ALL, 0, 10).await.expect("read");
    let kept: Vec<(u64, String)> = read
        .entries
        .iter()
        .map(|(offset, message)| {
            (
                *offset,
                String::from_utf8_lossy(&message.payload).into_owned(),
            )
        })
        .collect();
    assert_eq!(kept, vec![(3, "score 2-0".into())]);
    // Past the cap the oldest go, and the stream says up to where.
    for n in 5..=5 + u64::from(CAP) {
        store
            .append("demo", ALL, message(&format!("m{n}"), 60_000, ""), None)
            .await
            .expect("append");
    }
    let read = store.read_stream("demo", ALL, 0, 100).await.expect("read");
    assert_eq!(read.entries.len(), CAP as usize);
    let first = read.entries[0].0;
    let admitted = store
        .admit_device("demo", "d", &device.token)
        .await
        .expect("admit");
    assert_eq!(admitted.all.head, 5 + u64::from(CAP));
    assert!(
        admitted.all.trimmed >= 3 && admitted.all.trimmed < first,
        "{admitted:?}"
    );
}

async fn a_shared_push_with_an_idempotency_key_is_appended_once(backend: &Backend) {
    let store = &backend.store;
    let far = unix_millis() + 60_000;
    let first = message("first", 60_000, "");
    let first_id = first.id.clone();
    let appended = store
        .append("demo", ALL, first, Some(keyed("sale-1", far)))
        .await
        .expect("append");
    assert!(matches!(
        appended,
        AppendOutcome::Appended { offset: 1, .. }
    ));
    let again = store
        .append(
            "demo",
            ALL,
            message("again", 60_000, ""),
            Some(keyed("sale-1", far)),
        )
        .await
        .expect("append");
    assert_eq!(
        again,
        AppendOutcome::Duplicate {
            message_id: first_id
        }
    );
    let read = store.read_stream("demo", ALL, 0, 10).await.expect("read");
    assert_eq!(read.entries.len(), 1);
}

/// Scheduled pushes: claimed once due, by one claimer at a time until the lease lapses;
/// cancellable while waiting, not once claimed or fired; recorded with `Once::Fires`, once
/// however often the claimer (or the next, after a crash) records it.
async fn scheduled_pushes_are_claimed_once_and_cancelled_while_waiting(backend: &Backend) {
    let store = &backend.store;
    let now = unix_millis();
    let lease = Duration::from_secs(30);
    store
        .schedule("demo", "m1", now + 1000, b"one".to_vec())
        .await
        .expect("schedule");
    store
        .schedule("demo", "m2", now + 1000, b"two".to_vec())
        .await
        .expect("schedule");
    store
        .schedule("other", "m3", now + 5000, b"three".to_vec())
        .await
        .expect("schedule");
    // An id scheduled already stands: a second schedule of it changes nothing.
    let again = store
        .schedule("demo", "m1", now + 500, b"other".to_vec())
        .await
        .expect("schedule");
    assert!(!again, "m1 was scheduled twice");
    assert_eq!(store.claim_due(now, lease, 10).await.expect("claim"), []);
    let due = store.claim_due(now + 1000, lease, 1).await.expect("claim");
    assert_eq!(due.len(), 1, "one at most: {due:?}");
    let first = due[0].clone();
    assert_eq!(first.app, "demo");
    let rest = store.claim_due(now + 1000, lease, 10).await.expect("claim");
    assert_eq!(rest.len(), 1, "{rest:?}");
    let second = rest[0].clone();
    let mut jobs = [first.job.clone(), second.job.clone()];
    jobs.sort();
    assert_eq!(jobs, [b"one".to_vec(), b"two".to_vec()]);
    // Claimed: nobody else gets them within the lease, and they cannot be cancelled.
    assert_eq!(
        store.claim_due(now + 2000, lease, 10).await.expect("claim"),
        []
    );
    assert_eq!(
        store.cancel("demo", &first.id).await.expect("cancel"),
        Cancel::Fired
    );
    // Fired: recorded once, then marked.
    let fires = Once::Fires {
        id: first.id.clone(),
        keep_until_ms: now + 60_000,
    };
    let token = backend.device("ann").await;
    let mut one = (*message("one", 60_000, "")).clone();
    one.id = first.id.clone();
    let mut firing = accept("demo", Arc::new(one), &[&token], None);
    firing.once = Some(fires.clone());
    let outcome = store.record(firing.clone()).await.expect("record");
    assert_eq!(recorded(&outcome), [seq(1)]);
    let again = store.record(firing).await.expect("record");
    assert!(
        matches!(&again, AcceptOutcome::Duplicate { message_id } if *message_id == first.id),
        "{again:?}"
    );
    store
        .fired(&[("demo", &first.id)], now + 60_000)
        .await
        .expect("fired");
    assert_eq!(
        store.cancel("demo", &first.id).await.expect("cancel"),
        Cancel::Fired
    );
    // Waiting: cancelled, and never claimed; another app's id is unknown here.
    assert_eq!(
        store.cancel("demo", "m3").await.expect("cancel"),
        Cancel::Unknown
    );
    assert_eq!(
        store.cancel("other", "m3").await.expect("cancel"),
        Cancel::Cancelled
    );
    assert_eq!(
        store.cancel("other", "m3").await.expect("cancel"),
        Cancel::Unknown
    );
    // The second was never marked fired: due again once its claim lapses; the first and
    // the cancelled one are not.
    let again = store
        .claim_due(now + 1000 + 31_000, lease, 10)
        .await
        .expect("claim");
    let ids: Vec<&str> = again.iter().map(|job| job.id.as_str()).collect();
    assert_eq!(ids, [second.id.as_str()], "{again:?}");
}

/// What a user opted out of is kept per app and uid, replaced whole, and cleared by an
/// empty list.
async fn opt_outs_are_kept_per_app_and_uid(backend: &Backend) {
    let store = &backend.store;
    let items = |list: &[&str]| list.iter().map(|item| item.to_string()).collect::<Vec<_>>();
    store
        .set_opt_out("demo", "ann", &items(&["category:promo", "marketing"]))
        .await
        .expect("set");
    store
        .set_opt_out("other", "bob", &items(&["marketing"]))
        .await
        .expect("set");
    let read = store
        .opt_outs("demo", &items(&["ann", "bob", "cy"]))
        .await
        .expect("read");
    assert_eq!(
        read,
        [items(&["category:promo", "marketing"]), vec![], vec![]]
    );
    store.set_opt_out("demo", "ann", &[]).await.expect("clear");
    let read = store
        .opt_outs("demo", &items(&["ann"]))
        .await
        .expect("read");
    assert_eq!(read, [Vec::<String>::new()]);
    let read = store
        .opt_outs("other", &items(&["bob"]))
        .await
        .expect("read");
    assert_eq!(read, [items(&["marketing"])]);
}

/// Capped pushes are counted per app, uid and window, up to the cap.
async fn capped_pushes_are_counted_per_uid_and_window(backend: &Backend) {
    let store = &backend.store;
    let uids = |list: &[&str]| list.iter().map(|uid| uid.to_string()).collect::<Vec<_>>();
    let hour = 3_600_000;
    let first = store
        .count_capped("demo", &uids(&["ann", "bob"]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(first, [Some(1), Some(1)]);
    let second = store
        .count_capped("demo", &uids(&["ann"]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(second, [Some(2)]);
    let third = store
        .count_capped("demo", &uids(&["ann", "bob"]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(third, [None, Some(2)]);
    // Another window, another app: counted afresh.
    let next = store
        .count_capped("demo", &uids(&["ann"]), 8, hour, 2)
        .await
        .expect("count");
    assert_eq!(next, [Some(1)]);
    let other = store
        .count_capped("other", &uids(&["ann"]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(other, [Some(1)]);

    // Pushes stored once, counted as users got them: each once per user, in the same
    // counts, until the cap.
    let got = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(uid, message)| (uid.to_string(), message.to_string()))
            .collect::<Vec<_>>()
    };
    let reached = store
        .count_shared_capped("demo", &got(&[("cy", "m1"), ("dee", "m1")]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(reached, [false, false]);
    // Again (another device of theirs got it): not counted twice.
    let reached = store
        .count_shared_capped("demo", &got(&[("cy", "m1"), ("dee", "m1")]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(reached, [false, false]);
    let reached = store
        .count_shared_capped("demo", &got(&[("cy", "m2")]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(reached, [true]);
    // A direct push finds cy at the cap; dee's one gets dee there.
    let direct = store
        .count_capped("demo", &uids(&["cy", "dee"]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(direct, [None, Some(2)]);
    let reached = store
        .count_shared_capped("demo", &got(&[("dee", "m3"), ("eve", "m3")]), 7, hour, 2)
        .await
        .expect("count");
    assert_eq!(reached, [true, false], "dee had two already");
    let reached = store
        .count_shared_capped("demo", &got(&[("cy", "m1")]), 8, hour, 2)
        .await
        .expect("count");
    assert_eq!(reached, [false], "another window");
}

/// An unregistered device is gone with everything that names it; another app cannot
/// unregister it; its token is then unknown.
/// Devices are found by when they were last admitted, the longest idle first; a touched
/// one is not idle; an unregistered one is found no more; per app.
async fn devices_are_found_by_their_last_admission(backend: &Backend) {
    let store = &backend.store;
    let ann = backend.device("ann").await;
    let bob = backend.device("bob").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = unix_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let idle = |before_ms| async move {
        let found = store
            .inactive_devices("demo", before_ms, 10)
            .await
            .expect("inactive");
        found
            .into_iter()
            .map(|(token, _)| token)
            .collect::<Vec<_>>()
    };
    let mut both = vec![ann.clone(), bob.clone()];
    both.sort();
    let mut found = idle(later).await;
    found.sort();
    assert_eq!(found, both);
    assert_eq!(
        store
            .inactive_devices("other", later, 10)
            .await
            .expect("inactive"),
        []
    );
    store.touch_device("demo", &ann).await.expect("touch");
    assert_eq!(idle(later).await, std::slice::from_ref(&bob));
    assert_eq!(idle(unix_millis() + 1000).await, [bob.clone(), ann.clone()]);
    store.unregister("demo", &bob).await.expect("unregister");
    assert_eq!(idle(unix_millis() + 1000).await, std::slice::from_ref(&ann));
    // An admission notes the device only when its last note is old (a sixteenth of the
    // inactivity, 90 days): not yet, so it is still idle since its touch.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before_admission = unix_millis();
    let again = store
        .admit_device("demo", "ann", &ann)
        .await
        .expect("admit");
    assert!(again.resumed);
    assert_eq!(idle(before_admission).await, [ann]);
}

async fn an_unregistered_device_leaves_nothing_behind(backend: &Backend) {
    let store = &backend.store;
    let ann = backend.device("ann").await;
    let other = backend.device("ann").await;
    store
        .set_tags("demo", &ann, &["vip".to_owned()])
        .await
        .expect("tags");
    assert_eq!(
        store
            .set_alias("demo", &ann, Some("ann-phone"), 5)
            .await
            .expect("alias"),
        AliasSet::Set
    );
    let outcome = backend
        .record(message("waiting", 60_000, "k"), &[&ann], None)
        .await;
    assert_eq!(recorded(&outcome), [seq(1)]);
    assert_eq!(
        store.unregister("other", &ann).await.expect("unregister"),
        None
    );
    let gone = store
        .unregister("demo", &ann)
        .await
        .expect("unregister")
        .expect("a device of demo");
    assert_eq!(gone.uid, "ann");
    assert_eq!(gone.alias, "ann-phone");
    assert_eq!(gone.tags.names(), ["vip"]);
    assert_eq!(store.device("demo", &ann).await.expect("device"), None);
    assert_eq!(store.unregister("demo", &ann).await.expect("again"), None);
    let uids = store
        .tokens_for_uids("demo", &["ann".to_owned()])
        .await
        .expect("uids");
    assert_eq!(uids, [vec![other.clone()]]);
    let tagged = store.tag_devices("demo", "vip", "", 10).await.expect("tag");
    assert!(tagged.is_empty(), "{tagged:?}");
    let aliased = store
        .tokens_for_aliases("demo", &["ann-phone".to_owned()])
        .await
        .expect("alias");
    assert_eq!(aliased, [Vec::<String>::new()]);
    assert!(
        store
            .replay(&ann, 0, 10)
            .await
            .expect("replay")
            .deliveries
            .is_empty()
    );
    assert_eq!(
        store
            .known_tokens("demo", std::slice::from_ref(&ann))
            .await
            .expect("known"),
        [false]
    );
    // The token resumes nothing: presenting it admits a new device.
    let again = store
        .admit_device("demo", "ann", &ann)
        .await
        .expect("admit");
    assert!(!again.resumed);
    assert_ne!(again.token, ann);
}

/// A message's status and counts: counts that arrive first wait for the status, both add
/// up, a later status replaces the earlier and leaves the counts; per app.
async fn statuses_keep_their_counts(backend: &Backend) {
    use pigeon_proto::store::MessageStatus;
    use pigeon_proto::store::message_status::State;
    use pigeon_server::store::{ReceiptCount, StatusWrite};
    let store = &backend.store;
    let until = unix_millis() + 60_000;
    let count = |app: &str, delivered, acked| ReceiptCount {
        app: app.into(),
        id: "m1".into(),
        delivered,
        acked,
        ..ReceiptCount::default()
    };
    let none = store.message_status("demo", "m1").await.expect("status");
    assert_eq!((none.status, none.delivered, none.acked), (None, 0, 0));
    store
        .count_receipts(&[count("demo", 2, 1)], until, "b1")
        .await
        .expect("count");
    let early = store.message_status("demo", "m1").await.expect("status");
    assert_eq!(
        (early.status.is_none(), early.delivered, early.acked),
        (true, 2, 1)
    );
    let status = MessageStatus {
        state: State::Scheduled.into(),
        class: "marketing".into(),
        send_at_ms: 42,
        ..MessageStatus::default()
    };
    let write = |status: &MessageStatus| StatusWrite {
        app: "demo".into(),
        id: "m1".into(),
        status: status.clone(),
        keep_until_ms: until,
    };
    store.put_statuses(vec![write(&status)]).await.expect("put");
    store
        .count_receipts(&[count("demo", 3, 3), count("other", 1, 0)], until, "b2")
        .await
        .expect("count");
    let kept = store.message_status("demo", "m1").await.expect("status");
    assert_eq!(kept.status.as_ref(), Some(&status));
    assert_eq!((kept.delivered, kept.acked), (5, 4));
    // A batch given again (after a failure that may have done part of it) adds nothing
    // twice: in Redis each call is marked done; the embedded store's batch is one
    // transaction, which a failure leaves undone (so its store never sees a repeat).
    if !backend.atomic_records {
        store
            .count_receipts(&[count("demo", 3, 3), count("other", 1, 0)], until, "b2")
            .await
            .expect("count");
        let kept = store.message_status("demo", "m1").await.expect("status");
        assert_eq!((kept.delivered, kept.acked), (5, 4));
    }
    let accepted = MessageStatus {
        state: State::Accepted.into(),
        targets: 7,
        ..status.clone()
    };
    // Of two statuses written at once, the later stands.
    store
        .put_statuses(vec![write(&status), write(&accepted)])
        .await
        .expect("put");
    let kept = store.message_status("demo", "m1").await.expect("status");
    assert_eq!(kept.status, Some(accepted));
    assert_eq!((kept.delivered, kept.acked), (5, 4));
    let other = store.message_status("other", "m1").await.expect("status");
    assert_eq!((other.status, other.delivered, other.acked), (None, 1, 0));
    // Each device that opened it counts once, however often it says so.
    let opened = |tokens: &[&str]| ReceiptCount {
        opened_by: tokens.iter().map(|token| (*token).to_owned()).collect(),
        ..count("demo", 0, 0)
    };
    // The devices that opened it for the first time come back, by the message's class.
    let newly = |devices| {
        vec![NewlyOpened {
            app: "demo".into(),
            class: Class::Marketing,
            devices,
        }]
    };
    let first = store
        .count_receipts(&[opened(&["t1", "t1", "t2"])], until, "b3")
        .await
        .expect("count");
    assert_eq!(first, newly(2));
    let second = store
        .count_receipts(&[opened(&["t2", "t3"])], until, "b4")
        .await
        .expect("count");
    assert_eq!(second, newly(1));
    let again = store
        .count_receipts(&[opened(&["t3"])], until, "b5")
        .await
        .expect("count");
    assert_eq!(again, []);
    let kept = store.message_status("demo", "m1").await.expect("status");
    assert_eq!((kept.delivered, kept.acked, kept.opened), (5, 4, 3));
    // Copies put out of queues add up too, and leave the other counts.
    let displaced = |collapsed, dropped| ReceiptCount {
        collapsed,
        dropped,
        ..count("demo", 0, 0)
    };
    store
        .count_receipts(&[displaced(2, 1)], until, "b6")
        .await
        .expect("count");
    store
        .count_receipts(&[displaced(1, 0)], until, "b7")
        .await
        .expect("count");
    let kept = store.message_status("demo", "m1").await.expect("status");
    assert_eq!(
        (
            kept.delivered,
            kept.acked,
            kept.opened,
            kept.collapsed,
            kept.dropped
        ),
        (5, 4, 3, 3, 1)
    );
    // Counts for a message without a status wait for it, as the others do.
    store
        .count_receipts(
            &[ReceiptCount {
                id: "m2".into(),
                ..displaced(1, 2)
            }],
            until,
            "b8",
        )
        .await
        .expect("count");
    let early = store.message_status("demo", "m2").await.expect("status");
    assert_eq!((early.status, early.collapsed, early.dropped), (None, 1, 2));
}

/// Statistics add up per app, minute and class, and are read by a range of minutes.
async fn statistics_add_up_by_minute_and_class(backend: &Backend) {
    let store = &backend.store;
    let retention = Duration::from_secs(30 * 86_400);
    let now = unix_millis() / 60_000;
    let row = |app: &str, minute: u64, class: Class, pushes: u64, delivered: u64| StatsRow {
        app: app.into(),
        minute,
        class,
        counts: StatsCounts {
            pushes,
            targets: 2 * pushes,
            delivered,
            ..StatsCounts::default()
        },
    };
    // Minutes on both sides of an hour, two classes, two apps, added in two writes.
    let hour_end = (now / 60) * 60 - 1;
    store
        .add_stats(
            vec![
                row("demo", hour_end, Class::Notification, 1, 0),
                row("demo", hour_end + 1, Class::Notification, 2, 5),
                row("demo", hour_end + 1, Class::Marketing, 1, 0),
                row("other", hour_end + 1, Class::Notification, 9, 9),
            ],
            retention,
            "s1",
        )
        .await
        .expect("add");
    // A batch given again under its name (after a failure that may have done part of it)
    // adds nothing twice: in Redis each call is marked done; the embedded store's batch is
    // one transaction, which a failure leaves undone (so it never sees a repeat).
    let times = if backend.atomic_records { 1 } else { 2 };
    for _ in 0..times {
        store
            .add_stats(
                vec![row("demo", hour_end + 1, Class::Notification, 0, 3)],
                retention,
                "s2",
            )
            .await
            .expect("add");
    }
    // `expiring` is signed: devices taken off may outnumber those added, for a while.
    let expiring = |minute, expiring| StatsRow {
        counts: StatsCounts {
            expiring,
            ..StatsCounts::default()
        },
        ..row("demo", minute, Class::Marketing, 0, 0)
    };
    for (n, add) in [5, -3, -4].into_iter().enumerate() {
        store
            .add_stats(
                vec![expiring(hour_end - 1, add)],
                retention,
                &format!("e{n}"),
            )
            .await
            .expect("add");
    }
    let mut rows = store
        .stats("demo", hour_end - 10, hour_end + 10)
        .await
        .expect("stats");
    rows.sort_by_key(|row| (row.minute, row.class));
    assert_eq!(
        rows,
        [
            expiring(hour_end - 1, -2),
            row("demo", hour_end, Class::Notification, 1, 0),
            StatsRow {
                counts: StatsCounts {
                    pushes: 2,
                    targets: 4,
                    delivered: 8,
                    ..StatsCounts::default()
                },
                ..row("demo", hour_end + 1, Class::Notification, 0, 0)
            },
            row("demo", hour_end + 1, Class::Marketing, 1, 0),
        ]
    );
    // A range is of whole minutes, its end left out.
    let rows = store
        .stats("demo", hour_end + 1, hour_end + 2)
        .await
        .expect("stats");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let rows = store
        .stats("demo", hour_end - 10, hour_end - 1)
        .await
        .expect("stats");
    assert_eq!(rows, []);
}

type Case = for<'a> fn(&'a Backend) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        [$((stringify!($case), (|backend| Box::pin($case(backend))) as Case)),*]
    };
}

const CASES: [(&str, Case); 24] = cases![
    devices_are_found_by_their_last_admission,
    statistics_add_up_by_minute_and_class,
    an_unregistered_device_leaves_nothing_behind,
    statuses_keep_their_counts,
    capped_pushes_are_counted_per_uid_and_window,
    opt_outs_are_kept_per_app_and_uid,
    scheduled_pushes_are_claimed_once_and_cancelled_while_waiting,
    devices_are_admitted_and_resumed_by_their_own_uid_only,
    seqs_start_at_one_and_count_up_per_device,
    acks_are_cumulative_and_never_above_the_highest_seq,
    replay_is_in_seq_order_and_pages,
    expired_messages_are_never_replayed,
    a_collapse_key_replaces_the_pending_message,
    the_per_device_cap_keeps_the_newest,
    ttl_zero_goes_only_to_connected_devices_and_is_never_stored,
    an_idempotency_key_records_once_within_its_window,
    a_retry_after_an_interrupted_record_reaches_each_device_once,
    unknown_and_foreign_tokens_are_unknown,
    tags_are_set_changed_paged_and_deleted,
    an_alias_names_a_few_devices,
    a_shared_stream_is_stored_once_and_read_in_order,
    shared_entries_expire_collapse_and_are_capped,
    a_shared_push_with_an_idempotency_key_is_appended_once,
    a_tag_push_is_one_entry_with_its_filter,
];

/// Runs every case on a fresh store from `backend`, naming the case and the store first.
async fn run_cases<F: Future<Output = Backend>>(store: &str, backend: impl Fn(usize) -> F) {
    for (index, (name, case)) in CASES.iter().enumerate() {
        eprintln!("{store}: {name}");
        let backend = backend(index).await;
        case(&backend).await;
    }
}

#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    run_cases("embedded", |_| Backend::embedded()).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    run_cases("redis", |index| {
        Backend::redis(vec![redis.url()], false, format!("case{index}"))
    })
    .await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract_on_a_redis_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = RedisCluster::start(dir.path());
    run_cases("redis cluster", |index| {
        Backend::redis(cluster.urls(), true, format!("case{index}"))
    })
    .await;
}
