//! What is particular to the embedded store: its file outlives the process, and the sweeper
//! removes expired rows. The rules it shares with the Redis store are tested against both
//! in `tests/store_contract.rs`.

use super::*;
use crate::config::Limits;
use crate::connections::ConnectionTable;
use crate::message::{new_message_id, unix_millis};
use crate::store::Target;
use bytes::Bytes;
use pigeon_proto::device::Priority;
use tokio_util::sync::CancellationToken;

fn open(dir: &Path) -> Result<EmbeddedStore> {
    let table = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
    let limits = Limits {
        store_queue: 16,
        max_stored_per_device: 10,
        ..Limits::default()
    };
    EmbeddedStore::open(dir, &limits, table)
}

async fn push(store: &EmbeddedStore, token: &str, body: &str, ttl_ms: u64) -> u64 {
    let now = unix_millis();
    let message = Arc::new(Message {
        pace_ms: 0,
        id: new_message_id(now),
        payload: Bytes::from(body.to_owned()),
        priority: Priority::Normal,
        class: Default::default(),
        accepted_at_ms: now,
        expires_at_ms: now + ttl_ms,
        collapse_key: String::new(),
        filter: None,
    });
    let outcome = store
        .record(Accept {
            app: "demo".into(),
            message,
            targets: vec![Target {
                token: token.into(),
                store: true,
            }],
            idempotency: None,
        })
        .await
        .expect("record");
    match outcome {
        AcceptOutcome::Accepted { targets, .. } => match targets[0].1 {
            Recorded::Seq { seq, .. } => seq,
            ref other => panic!("expected a seq, got {other:?}"),
        },
        other => panic!("expected accepted, got {other:?}"),
    }
}

async fn seqs(store: &EmbeddedStore, token: &str) -> Vec<u64> {
    let replay = store.replay(token, 0, 100).await.expect("replay");
    replay.deliveries.iter().map(|d| d.seq).collect()
}

#[tokio::test]
async fn what_was_committed_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = {
        let store = open(dir.path()).expect("open");
        let device = store
            .admit_device("demo", "alice", "")
            .await
            .expect("admit");
        for n in 1..=4 {
            assert_eq!(
                push(&store, &device.token, &format!("m{n}"), 60_000).await,
                n
            );
        }
        store.ack(&device.token, 2).await.expect("ack");
        device.token
    };
    // Reopen: the writer thread of the first store has gone with its channel.
    let store = loop {
        match open(dir.path()) {
            Ok(store) => break store,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    assert_eq!(seqs(&store, &token).await, [3, 4]);
    let device = store
        .admit_device("demo", "alice", &token)
        .await
        .expect("admit");
    assert_eq!((device.acked_seq, device.highest_seq), (2, 4));
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows_and_their_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).expect("open");
    let token = store
        .admit_device("demo", "a", "")
        .await
        .expect("admit")
        .token;
    push(&store, &token, "short", 1).await;
    push(&store, &token, "long", 60_000).await;
    let swept_at = unix_millis() + 2;
    while unix_millis() <= swept_at {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(store.stored_messages().await.expect("count"), 2);
    store.sweep(swept_at).await.expect("sweep");
    assert_eq!(store.stored_messages().await.expect("count"), 1);
    let counters = store.counters(&token).await.expect("counters");
    assert_eq!(counters.map(|c| c.pending), Some(1));
    assert_eq!(seqs(&store, &token).await, [2]);
}

#[tokio::test]
async fn a_stream_written_before_its_size_was_kept_is_counted_once_and_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
    let limits = Limits {
        max_stored_per_stream: 3,
        ..Limits::default()
    };
    let store = EmbeddedStore::open(dir.path(), &limits, table).expect("open");
    let append = |n: u64| {
        let now = unix_millis();
        let message = Arc::new(Message {
            pace_ms: 0,
            id: format!("m{n}"),
            payload: Bytes::from(format!("{n}")),
            priority: Priority::Normal,
            class: Default::default(),
            accepted_at_ms: now,
            expires_at_ms: now + 60_000,
            collapse_key: String::new(),
            filter: None,
        });
        store.append("demo", ALL, message, None)
    };
    let offsets = |read: StreamRead| -> Vec<u64> { read.entries.iter().map(|e| e.0).collect() };
    for n in 1..=2 {
        append(n).await.expect("append");
    }
    // As a store of an earlier release left it: entries, and no size.
    {
        let txn = store.db.begin_write().expect("write");
        txn.open_table(STREAM_SIZE)
            .expect("table")
            .remove(format!("demo\0{ALL}").as_str())
            .expect("remove");
        txn.commit().expect("commit");
    }
    for n in 3..=5 {
        append(n).await.expect("append");
    }
    let read = store.read_stream("demo", ALL, 0, 100).await.expect("read");
    assert_eq!(offsets(read), [3, 4, 5]);
}
