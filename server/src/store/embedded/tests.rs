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
    open_folding(dir, counters::FOLD_INTERVAL)
}

fn open_folding(dir: &Path, fold_interval: Duration) -> Result<EmbeddedStore> {
    let table = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
    let limits = Limits {
        store_queue: 16,
        max_stored_per_device: 10,
        ..Limits::default()
    };
    EmbeddedStore::open_folding(dir, &limits, table, fold_interval)
}

fn message(id: String, body: &str, ttl_ms: u64) -> Arc<Message> {
    let now = unix_millis();
    Arc::new(Message {
        pace_ms: 0,
        id,
        payload: Bytes::from(body.to_owned()),
        priority: Priority::Normal,
        class: Default::default(),
        accepted_at_ms: now,
        expires_at_ms: now + ttl_ms,
        collapse_key: String::new(),
        filter: None,
    })
}

fn accept(message: Arc<Message>, token: &str, once: Option<Once>) -> Accept {
    Accept {
        app: "demo".into(),
        message,
        targets: vec![Target {
            token: token.into(),
            store: true,
        }],
        once,
    }
}

/// The record of `demo`'s scheduled push `id` firing, to `token`.
fn firing(id: &str, token: &str) -> Accept {
    let fires = Once::Fires {
        id: id.into(),
        keep_until_ms: unix_millis() + 60_000,
    };
    accept(message(id.into(), id, 60_000), token, Some(fires))
}

async fn push(store: &EmbeddedStore, token: &str, body: &str, ttl_ms: u64) -> u64 {
    let message = message(new_message_id(unix_millis()), body, ttl_ms);
    let outcome = store
        .record(accept(message, token, None))
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

/// Opens the store of `dir` again, once the writer thread of the one before it has gone
/// with its channel (and so released the file).
async fn reopen(dir: &Path) -> EmbeddedStore {
    loop {
        match open(dir) {
            Ok(store) => break store,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
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
    let store = reopen(dir.path()).await;
    assert_eq!(seqs(&store, &token).await, [3, 4]);
    let device = store
        .admit_device("demo", "alice", &token)
        .await
        .expect("admit");
    assert_eq!((device.acked_seq, device.highest_seq), (2, 4));
}

/// The database file of `dir` itself, once the writer thread of the store before has gone
/// with its channel (and so released the file).
async fn raw_file(dir: &Path) -> Database {
    loop {
        match Database::open(dir.join("pigeon.redb")) {
            Ok(db) => break db,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// What the file says of `token`: its record's counters, and the counter log's rows.
fn on_file(db: &Database, token: &str) -> (Counts, u64) {
    let txn = db.begin_read().expect("read");
    let devices = txn.open_table(DEVICES).expect("devices");
    let record = devices
        .get(token)
        .expect("get")
        .expect("the device's record");
    let record = decode_device(record.value()).expect("decode");
    let log = txn.open_table(COUNTER_LOG).expect("counter log");
    (Counts::of(&record), log.len().expect("len"))
}

/// Pushes and acks change a device's counters in the log, not in its record; a store that
/// was not closed (as after a crash) leaves them there, and the next start folds them in:
/// no seq is given twice, none acked comes back.
#[tokio::test]
async fn counters_left_in_the_log_are_folded_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = {
        let store = open_folding(dir.path(), Duration::from_secs(3600)).expect("open");
        let token = store
            .admit_device("demo", "alice", "")
            .await
            .expect("admit")
            .token;
        for n in 1..=4 {
            push(&store, &token, &format!("m{n}"), 60_000).await;
        }
        store.ack(&token, 2).await.expect("ack");
        let counters = store.counters(&token).await.expect("counters");
        assert_eq!(counters.map(|c| c.pending), Some(2));
        token
    };
    {
        let db = raw_file(dir.path()).await;
        let (record, rows) = on_file(&db, &token);
        assert_eq!(record, Counts::default(), "the record is as admitted");
        assert_eq!(rows, 5, "four records and an ack");
    }
    let store = reopen(dir.path()).await;
    let device = store
        .admit_device("demo", "alice", &token)
        .await
        .expect("admit");
    assert_eq!((device.acked_seq, device.highest_seq), (2, 4));
    assert_eq!(push(&store, &token, "m5", 60_000).await, 5);
    assert_eq!(seqs(&store, &token).await, [3, 4, 5]);
    store.close().await.expect("close");
    drop(store);
    let db = raw_file(dir.path()).await;
    let folded = Counts {
        highest_seq: 5,
        acked_seq: 2,
        pending: 3,
        ..Counts::default()
    };
    assert_eq!(on_file(&db, &token), (folded, 0), "a close folds the log");
}

/// The writer folds the log into the records once its interval has passed, and reads of a
/// device's counters agree before and after.
#[tokio::test]
async fn the_writer_folds_the_counter_log_into_the_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = {
        let store = open_folding(dir.path(), Duration::ZERO).expect("open");
        let token = store
            .admit_device("demo", "alice", "")
            .await
            .expect("admit")
            .token;
        for n in 1..=3 {
            push(&store, &token, &format!("m{n}"), 60_000).await;
        }
        store.ack(&token, 1).await.expect("ack");
        let counters = store.counters(&token).await.expect("counters");
        assert_eq!(counters.map(|c| c.pending), Some(2));
        token
    };
    let db = raw_file(dir.path()).await;
    let folded = Counts {
        highest_seq: 3,
        acked_seq: 1,
        pending: 2,
        ..Counts::default()
    };
    assert_eq!(on_file(&db, &token), (folded, 0));
}

/// An unregistered device's rows in the log are dropped by the fold, not written into a
/// record.
#[tokio::test]
async fn a_fold_drops_the_rows_of_a_device_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_folding(dir.path(), Duration::from_secs(3600)).expect("open");
    let gone = store
        .admit_device("demo", "bob", "")
        .await
        .expect("admit")
        .token;
    let kept = store
        .admit_device("demo", "alice", "")
        .await
        .expect("admit")
        .token;
    push(&store, &gone, "m1", 60_000).await;
    push(&store, &kept, "m1", 60_000).await;
    assert!(
        store
            .unregister("demo", &gone)
            .await
            .expect("unregister")
            .is_some()
    );
    assert_eq!(store.counters(&gone).await.expect("counters"), None);
    drop(store);
    let store = reopen(dir.path()).await;
    assert_eq!(store.counters(&gone).await.expect("counters"), None);
    let kept_counters = store.counters(&kept).await.expect("counters");
    assert_eq!(kept_counters.map(|c| c.pending), Some(1));
}

/// A close applies the writes sent before it, then refuses every write; what was written
/// is read back after a reopen.
#[tokio::test]
async fn a_close_applies_what_came_before_it_and_refuses_what_comes_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).expect("open");
    let token = store
        .admit_device("demo", "alice", "")
        .await
        .expect("admit")
        .token;
    let before: Vec<_> = (1..=8)
        .map(|n| {
            store.record(accept(
                message(new_message_id(unix_millis()), &format!("m{n}"), 60_000),
                &token,
                None,
            ))
        })
        .collect();
    let (recorded, closed) = tokio::join!(futures_util::future::join_all(before), store.close());
    closed.expect("close");
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    assert!(matches!(
        store.ack(&token, 1).await,
        Err(StoreError::Closed)
    ));
    assert!(
        store.close().await.is_err(),
        "a second close after the first must fail"
    );
    drop(store);
    let store = reopen(dir.path()).await;
    assert_eq!(seqs(&store, &token).await, (1..=8).collect::<Vec<u64>>());
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

/// Claims are the process's: a store opened again (the process restarted) claims what was
/// claimed and not sent; a push recorded with `Once::Fires` is sent, never claimed again
/// (even when its claim lapses before it is marked fired), and not cancelled.
#[tokio::test]
async fn claims_live_in_memory_and_a_recorded_push_has_fired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = unix_millis();
    let lease = Duration::from_secs(5);
    {
        let store = open(dir.path()).expect("open");
        for id in ["m1", "m2"] {
            let scheduled = store.schedule("demo", id, now, b"push".to_vec()).await;
            assert!(scheduled.expect("schedule"));
        }
        let due = store.claim_due(now, lease, 10).await.expect("claim");
        assert_eq!(due.len(), 2, "{due:?}");
        assert!(
            store
                .claim_due(now, lease, 10)
                .await
                .expect("claim")
                .is_empty()
        );
    }
    // The process died with its claims: both are due again at once.
    let store = reopen(dir.path()).await;
    let due = store.claim_due(now, lease, 10).await.expect("claim");
    let mut ids: Vec<&str> = due.iter().map(|job| job.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["m1", "m2"]);
    // m1 is recorded (it fires); m2's claim lapses unsent.
    let device = store.admit_device("demo", "ann", "").await.expect("admit");
    let accept = firing("m1", &device.token);
    let first = store.record(accept.clone()).await.expect("record");
    assert!(matches!(first, AcceptOutcome::Accepted { .. }), "{first:?}");
    let again = store.record(accept).await.expect("record");
    assert!(
        matches!(again, AcceptOutcome::Duplicate { .. }),
        "{again:?}"
    );
    assert_eq!(seqs(&store, &device.token).await, [1]);
    let later = now + lease.as_millis() as u64 + 1;
    let due = store.claim_due(later, lease, 10).await.expect("claim");
    let ids: Vec<&str> = due.iter().map(|job| job.id.as_str()).collect();
    assert_eq!(ids, ["m2"]);
    assert_eq!(
        store.cancel("demo", "m1").await.expect("cancel"),
        Cancel::Fired
    );
    // Marking both fired writes m2's mark (m1's is there).
    store
        .fired(&[("demo", "m1"), ("demo", "m2")], now + 60_000)
        .await
        .expect("fired");
    let much_later = later + lease.as_millis() as u64 + 1;
    let due = store.claim_due(much_later, lease, 10).await.expect("claim");
    assert!(due.is_empty(), "{due:?}");
    assert_eq!(
        store.cancel("demo", "m2").await.expect("cancel"),
        Cancel::Fired
    );
}

/// A push cancelled after it was claimed, but before it was recorded, is not sent.
#[tokio::test]
async fn a_push_cancelled_before_its_record_is_not_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).expect("open");
    let now = unix_millis();
    assert!(
        store
            .schedule("demo", "m1", now, b"push".to_vec())
            .await
            .expect("schedule")
    );
    // The cancel is checked before the claim is made (the race the claim check leaves).
    assert_eq!(
        store.cancel("demo", "m1").await.expect("cancel"),
        Cancel::Cancelled
    );
    let device = store.admit_device("demo", "ann", "").await.expect("admit");
    let outcome = store
        .record(firing("m1", &device.token))
        .await
        .expect("record");
    assert!(
        matches!(outcome, AcceptOutcome::Duplicate { .. }),
        "{outcome:?}"
    );
    assert!(seqs(&store, &device.token).await.is_empty());
    // And marking it fired leaves it cancelled (unknown), not fired.
    store
        .fired(&[("demo", "m1")], now + 60_000)
        .await
        .expect("fired");
    assert_eq!(
        store.cancel("demo", "m1").await.expect("cancel"),
        Cancel::Unknown
    );
}

/// When more waits than one transaction takes, the writer takes it by lane (weighted as the
/// pipeline's lanes), not in the order it came: a notification queued behind a transaction's
/// worth of marketing records is recorded first; the marketing records keep their order.
#[tokio::test]
async fn the_writer_takes_a_backlog_by_lane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).expect("open");
    let device = store.admit_device("demo", "ann", "").await.expect("admit");
    // A second writer on the same database, its queue filled before it starts.
    let writer = Writer {
        db: store.db.clone(),
        taken: Arc::default(),
        max_stored_per_device: 10_000,
        max_stored_per_stream: 10_000,
        seen_refresh: None,
        routes: store.routes.clone(),
        counters: store.counters.clone(),
        fold_interval: counters::FOLD_INTERVAL,
        next_row: 0,
        rows: 0,
        folded_at: Instant::now(),
    };
    let (writes, jobs) = mpsc::channel(TAKEN);
    let mut answers = Vec::new();
    let mut queue = |class: Class, body: &str| {
        let message = Message {
            class,
            ..(*message(new_message_id(unix_millis()), body, 60_000)).clone()
        };
        let (reply, answer) = oneshot::channel();
        let op = Op::Accept(accept(Arc::new(message), &device.token, None));
        assert!(writes.try_send(Job::new(op, reply)).is_ok());
        answers.push((body.to_owned(), answer));
    };
    for i in 0..MAX_BATCH {
        queue(Class::Marketing, &format!("marketing {i}"));
    }
    queue(Class::Notification, "notification");
    drop(writes);
    tokio::task::spawn_blocking(move || writer.run(jobs))
        .await
        .expect("writer");
    let mut order = Vec::new();
    for (body, answer) in answers {
        let Ok(Reply::Accepted(AcceptOutcome::Accepted { targets, .. })) =
            answer.await.expect("answered")
        else {
            panic!("{body} not accepted");
        };
        let Recorded::Seq { seq, .. } = targets[0].1 else {
            panic!("{body} not recorded");
        };
        order.push((seq, body));
    }
    order.sort();
    let bodies: Vec<&str> = order.iter().map(|(_, body)| body.as_str()).collect();
    let mut expected = vec!["notification".to_owned()];
    expected.extend((0..MAX_BATCH).map(|i| format!("marketing {i}")));
    assert_eq!(bodies, expected);
}
