//! A tag of 100,000 devices, on the embedded store, through the library's own parts (the
//! push pipeline, the device API, the connection table): members are added, listed and
//! removed in bounded pages, and a push to the tag is one entry of the app's stream, not
//! one row per member, handed to the connected members only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use pigeon_proto::device::Priority;
use pigeon_server::config::Limits;
use pigeon_server::connections::ConnectionTable;
use pigeon_server::devices::{Devices, MAX_PAGE};
use pigeon_server::message::TagFilter;
use pigeon_server::metrics::Metrics;
use pigeon_server::push::{Class, Pipeline, PushOutcome, PushRequest};
use pigeon_server::rate_limit::RateLimiter;
use pigeon_server::store::embedded::EmbeddedStore;
use pigeon_server::store::{ALL, DeviceTags, OfflineStore, Registry, StreamHead, TagChange};
use tokio_util::sync::CancellationToken;

const MEMBERS: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_of_100000_devices_is_paged_and_pushed_to_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits::default();
    let table = Arc::new(ConnectionTable::new(64, CancellationToken::new()));
    let store = Arc::new(EmbeddedStore::open(dir.path(), &limits, table.clone()).expect("open"));
    // The members, and as many devices without the tag.
    let admit = |uid: String| {
        let store = store.clone();
        async move {
            store
                .admit_device("demo", &uid, "")
                .await
                .expect("admit")
                .token
        }
    };
    let tokens: Vec<String> =
        futures_util::stream::iter((0..2 * MEMBERS).map(|n| admit(format!("u{n}"))))
            .buffer_unordered(512)
            .collect()
            .await;
    let (members, others) = tokens.split_at(MEMBERS);

    let devices = Devices::new(store.clone(), table.clone(), limits.clone());
    for batch in members.chunks(limits.max_tag_batch) {
        let change = TagChange {
            add: batch.to_vec(),
            remove: Vec::new(),
        };
        let changed = devices
            .change_tag("demo", "big", change)
            .await
            .expect("add a batch");
        assert_eq!(changed.added as usize, batch.len());
    }
    // Paged through in bounded pages, each member once, in token order.
    let mut listed = Vec::with_capacity(MEMBERS);
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = devices
            .tag_devices("demo", "big", &cursor, Some(MAX_PAGE))
            .await
            .expect("page");
        assert!(page.devices.len() <= MAX_PAGE);
        pages += 1;
        listed.extend(page.devices);
        match page.next_cursor {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(pages, MEMBERS / MAX_PAGE + 1, "the last page is empty");
    let mut expected = members.to_vec();
    expected.sort();
    assert_eq!(listed, expected);

    // One member and one other device connected; a push to the tag.
    let head = StreamHead {
        epoch: store.stream_head("demo", ALL).await.expect("head").epoch,
        head: 0,
    };
    let member = store
        .device("demo", &members[7])
        .await
        .expect("device")
        .expect("a member");
    let (member_connection, _) =
        table.register(&Arc::from(members[7].as_str()), "demo", head, &member.tags);
    let (other_connection, _) = table.register(
        &Arc::from(others[0].as_str()),
        "demo",
        head,
        &DeviceTags::default(),
    );
    let pipeline = Pipeline::new(
        store.clone(),
        table.clone(),
        Arc::new(Metrics::default()),
        Arc::new(RateLimiter::unlimited()),
        &Limits::default(),
    );
    let outcome = pipeline
        .push(PushRequest {
            app: "demo".into(),
            class: Class::Notification,
            category: None,
            pace: None,
            uids: Vec::new(),
            tokens: Vec::new(),
            aliases: Vec::new(),
            all: false,
            tags: Some(TagFilter {
                any: vec!["big".into()],
                ..TagFilter::default()
            }),
            payload: Bytes::from_static(b"{\"big\":true}"),
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
    assert_eq!(targets.delivered, 1, "the one connected member");
    assert_eq!(member_connection.take().shared().count(), 1);
    assert_eq!(other_connection.take().shared().count(), 0);
    // Stored once: one entry in the stream, no row in any member's queue.
    let read = store.read_stream("demo", ALL, 0, 10).await.expect("read");
    assert_eq!(read.entries.len(), 1);
    assert_eq!(store.stored_messages().await.expect("count"), 0);

    // Deleted in pages.
    let removed = devices.delete_tag("demo", "big").await.expect("delete");
    assert_eq!(removed as usize, MEMBERS);
    let page = devices
        .tag_devices("demo", "big", "", None)
        .await
        .expect("page");
    assert!(page.devices.is_empty());
    let member = store
        .device("demo", &members[7])
        .await
        .expect("device")
        .expect("a member");
    assert!(member.tags.tags.is_empty());
}
