//! The embedded store against a real redb file in a temporary directory.

use super::*;
use crate::message::{new_message_id, unix_millis};
use crate::store::Target;
use bytes::Bytes;
use pigeon_proto::device::Priority;

fn message(body: &str, ttl_ms: u64, collapse_key: &str) -> Arc<Message> {
    let now = unix_millis();
    Arc::new(Message {
        id: new_message_id(now),
        payload: Bytes::from(body.to_owned()),
        priority: Priority::Normal,
        accepted_at_ms: now,
        expires_at_ms: now + ttl_ms,
        collapse_key: collapse_key.into(),
    })
}

async fn push(store: &EmbeddedStore, token: &str, message: Arc<Message>) -> u64 {
    let outcome = store
        .accept(Accept {
            app: "demo".into(),
            message,
            targets: vec![Target {
                token: token.into(),
                store: true,
            }],
            idempotency: None,
        })
        .await
        .expect("accept");
    match outcome {
        AcceptOutcome::Accepted { seqs } => seqs[0],
        other => panic!("expected accepted, got {other:?}"),
    }
}

async fn payloads(store: &EmbeddedStore, token: &str, after: u64) -> Vec<(u64, String)> {
    let replay = store.replay(token, after, 100).await.expect("replay");
    replay
        .deliveries
        .iter()
        .map(|d| {
            (
                d.seq,
                String::from_utf8_lossy(&d.message.payload).into_owned(),
            )
        })
        .collect()
}

async fn tokens_of(store: &EmbeddedStore, uid: &str) -> Vec<String> {
    let mut tokens = store
        .tokens_for_uids("demo", &[uid.to_owned()])
        .await
        .expect("tokens");
    tokens.pop().expect("one list per uid")
}

#[tokio::test]
async fn admits_resumes_and_rebinds_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
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
    // A token of another app is not resumed.
    let foreign = store
        .admit_device("other", "alice", &first.token)
        .await
        .expect("admit");
    assert!(!foreign.resumed);
    assert_ne!(foreign.token, first.token);
    // A second device of alice, then the first device moves to bob.
    let second = store
        .admit_device("demo", "alice", "")
        .await
        .expect("admit");
    let mut tokens = tokens_of(&store, "alice").await;
    tokens.sort();
    let mut expected = vec![first.token.clone(), second.token.clone()];
    expected.sort();
    assert_eq!(tokens, expected);
    store
        .admit_device("demo", "bob", &first.token)
        .await
        .expect("admit");
    assert_eq!(tokens_of(&store, "alice").await, vec![second.token.clone()]);
    assert_eq!(tokens_of(&store, "bob").await, vec![first.token.clone()]);
    // A uid that is a prefix of another does not see its tokens.
    assert!(tokens_of(&store, "ali").await.is_empty());
    assert_eq!(
        store
            .known_tokens("demo", &[first.token.clone(), "nope".into(), foreign.token])
            .await
            .expect("known"),
        vec![true, false, false]
    );
}

#[tokio::test]
async fn queues_in_order_acks_cumulatively_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = {
        let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
        let device = store
            .admit_device("demo", "alice", "")
            .await
            .expect("admit");
        for n in 1..=4 {
            assert_eq!(
                push(&store, &device.token, message(&format!("m{n}"), 60_000, "")).await,
                n
            );
        }
        store.ack(&device.token, 2).await.expect("ack");
        // An older ack changes nothing.
        store.ack(&device.token, 1).await.expect("ack");
        device.token
    };
    // Reopen: the writer thread of the first store has gone with its channel.
    let store = loop {
        match EmbeddedStore::open(dir.path(), 16, 10) {
            Ok(store) => break store,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    assert_eq!(
        payloads(&store, &token, 0).await,
        vec![(3, "m3".into()), (4, "m4".into())]
    );
    let device = store
        .admit_device("demo", "alice", &token)
        .await
        .expect("admit");
    assert_eq!((device.acked_seq, device.highest_seq), (2, 4));
    let limited = store.replay(&token, 0, 1).await.expect("replay");
    assert_eq!(limited.deliveries.len(), 1);
    assert!(limited.more);
    assert_eq!(
        store
            .device_counters(&token)
            .await
            .expect("counters")
            .map(|c| c.pending),
        Some(2)
    );
}

#[tokio::test]
async fn collapse_replaces_the_pending_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    push(&store, &token, message("score 1-0", 60_000, "score")).await;
    push(&store, &token, message("other", 60_000, "")).await;
    push(&store, &token, message("score 2-0", 60_000, "score")).await;
    assert_eq!(
        payloads(&store, &token, 0).await,
        vec![(2, "other".into()), (3, "score 2-0".into())]
    );
    let counters = store.device_counters(&token).await.expect("counters");
    assert_eq!(counters.map(|c| (c.pending, c.collapsed)), Some((2, 1)));
}

#[tokio::test]
async fn the_per_device_cap_drops_the_oldest_and_counts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 3).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    for n in 1..=5 {
        push(&store, &token, message(&format!("m{n}"), 60_000, "")).await;
    }
    let seqs: Vec<u64> = payloads(&store, &token, 0)
        .await
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    let counters = store.device_counters(&token).await.expect("counters");
    assert_eq!(counters.map(|c| (c.pending, c.dropped)), Some((3, 2)));
}

#[tokio::test]
async fn expired_messages_are_not_replayed_and_are_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    let short = message("short", 1, "");
    let expires = short.expires_at_ms;
    push(&store, &token, short).await;
    push(&store, &token, message("long", 60_000, "")).await;
    // Wait for the clock to pass the short message's expiry.
    while unix_millis() <= expires {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(payloads(&store, &token, 0).await, vec![(2, "long".into())]);
    store.sweep(unix_millis()).await.expect("sweep");
    assert_eq!(store.stored_messages().await.expect("count"), 1);
    assert_eq!(
        store
            .device_counters(&token)
            .await
            .expect("counters")
            .map(|c| c.pending),
        Some(1)
    );
}

#[tokio::test]
async fn idempotency_keys_accept_once_within_their_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    let accept = |message: Arc<Message>, until: u64| Accept {
        app: "demo".into(),
        message,
        targets: vec![Target {
            token: token.clone(),
            store: true,
        }],
        idempotency: Some(("order-1".into(), until)),
    };
    let far = unix_millis() + 60_000;
    let first = message("first", 60_000, "");
    let first_id = first.id.clone();
    assert!(matches!(
        store.accept(accept(first, far)).await,
        Ok(AcceptOutcome::Accepted { .. })
    ));
    assert_eq!(
        store
            .accept(accept(message("again", 60_000, ""), far))
            .await
            .ok(),
        Some(AcceptOutcome::Duplicate {
            message_id: first_id
        })
    );
    assert_eq!(payloads(&store, &token, 0).await.len(), 1);
}

#[tokio::test]
async fn ttl_zero_takes_a_seq_but_is_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), 16, 10).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    let outcome = store
        .accept(Accept {
            app: "demo".into(),
            message: message("now or never", 0, ""),
            targets: vec![
                Target {
                    token: token.clone(),
                    store: false,
                },
                Target {
                    token: "missing".into(),
                    store: false,
                },
            ],
            idempotency: None,
        })
        .await
        .expect("accept");
    assert_eq!(outcome, AcceptOutcome::Accepted { seqs: vec![1, 0] });
    assert!(payloads(&store, &token, 0).await.is_empty());
}
