//! The embedded store's floor under a scheduled burst: what the store alone takes of the
//! writes that `pigeon-load schedule-burst --standalone` makes, with no HTTP, no sockets and
//! no simulated devices beside it. Each push is recorded as it fires (marking its schedule
//! fired), its status written, its device's ack recorded and its receipt counted, in
//! batches as the scheduler, the status writer and the receipts make them:
//!
//! ```sh
//! cargo run --release -p pigeon-server --example store_floor -- 10000 100000
//! ```
//!
//! (devices, then pushes: each push to one device, in turn.) Prints the time the pushes took
//! from the first record to the last receipt, and the CPU the process used and the bytes it
//! wrote meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use pigeon_client::swarm::cpu_seconds_of;
use pigeon_proto::store::MessageStatus;
use pigeon_server::config::Limits;
use pigeon_server::connections::ConnectionTable;
use pigeon_server::message::{Message, new_message_id, unix_millis};
use pigeon_server::store::embedded::EmbeddedStore;
use pigeon_server::store::{
    Accept, AcceptOutcome, OfflineStore, Once, ReceiptCount, Recorded, Registry, Schedules,
    StatusWrite, Statuses, Target,
};
use tokio_util::sync::CancellationToken;

const APP: &str = "demo";
/// Pushes sent together, as the scheduler sends them (`SEND_BATCH`).
const BATCH: usize = 256;
/// Batches at once: 2,048 pushes in flight, as the scheduler has.
const BATCHES_AT_ONCE: usize = 8;
const RETENTION: Duration = Duration::from_secs(3600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|arg| arg.parse::<usize>());
    let devices = args.next().transpose()?.unwrap_or(10_000).max(1);
    let pushes = args.next().transpose()?.unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    let routes = Arc::new(ConnectionTable::new(16, CancellationToken::new()));
    let store = Arc::new(EmbeddedStore::open(dir.path(), &Limits::default(), routes)?);

    let mut tokens = Vec::with_capacity(devices);
    for device in 0..devices {
        let admitted = store.admit_device(APP, &format!("u{device}"), "").await?;
        tokens.push(admitted.token);
    }
    let due_ms = unix_millis();
    // In the order the scheduler claims them (by due time, then id).
    let mut ids: Vec<String> = (0..pushes).map(|_| new_message_id(due_ms)).collect();
    ids.sort_unstable();
    futures_util::stream::iter(&ids)
        .map(|id| store.schedule(APP, id, due_ms, vec![0; 200]))
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<bool>, _>>()?;

    let (began, cpu_before) = (Instant::now(), cpu_seconds_of("self").unwrap_or(0.0));
    let written_before = bytes_written();
    let batches = ids.chunks(BATCH).enumerate().map(|(batch, ids)| {
        let (store, tokens) = (store.clone(), &tokens);
        async move {
            let first = batch * BATCH;
            let fired = ids.iter().enumerate().map(|(i, id)| {
                let token = tokens[(first + i) % tokens.len()].clone();
                fire(&store, id, token)
            });
            let fired = futures_util::future::try_join_all(fired).await?;
            let statuses = fired.iter().map(|(message, _, _)| StatusWrite {
                app: APP.into(),
                id: message.id.clone(),
                status: MessageStatus {
                    targets: 1,
                    accepted_at_ms: message.accepted_at_ms,
                    expires_at_ms: message.expires_at_ms,
                    ..MessageStatus::default()
                },
                keep_until_ms: message.expires_at_ms,
            });
            store.put_statuses(statuses.collect()).await?;
            let acks = fired.iter().map(|(_, token, seq)| store.ack(token, *seq));
            futures_util::future::try_join_all(acks).await?;
            let counts: Vec<ReceiptCount> = fired
                .iter()
                .map(|(message, _, _)| ReceiptCount {
                    app: APP.into(),
                    id: message.id.clone(),
                    delivered: 1,
                    acked: 1,
                    opened_by: Vec::new(),
                    collapsed: 0,
                    dropped: 0,
                })
                .collect();
            store
                .count_receipts(&counts, unix_millis() + 60_000, "")
                .await?;
            anyhow::Ok(fired.len())
        }
    });
    let mut done = 0;
    let mut running = futures_util::stream::iter(batches).buffer_unordered(BATCHES_AT_ONCE);
    while let Some(sent) = running.next().await {
        done += sent?;
    }
    let took = began.elapsed();
    let cpu = cpu_seconds_of("self").unwrap_or(0.0) - cpu_before;
    let written = bytes_written().saturating_sub(written_before);
    println!(
        "{done} pushes to {devices} devices: {:.2} s ({:.0} a second), {cpu:.2} s of CPU ({:.1} us a push), {:.0} MB written ({:.1} KB a push)",
        took.as_secs_f64(),
        done as f64 / took.as_secs_f64(),
        cpu * 1e6 / done.max(1) as f64,
        written as f64 / 1e6,
        written as f64 / 1e3 / done.max(1) as f64,
    );
    Ok(())
}

/// Bytes this process has handed to `write` calls so far (`wchar` of `/proc/self/io`: the
/// store's page writes, nearly all of it); 0 where that file cannot be read.
fn bytes_written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|line| line.strip_prefix("wchar: ")?.parse().ok())
        .unwrap_or(0)
}

/// Records scheduled push `id` firing to `token`: the message and the seq it got.
async fn fire(
    store: &EmbeddedStore,
    id: &str,
    token: String,
) -> anyhow::Result<(Arc<Message>, String, u64)> {
    let now_ms = unix_millis();
    let message = Arc::new(Message {
        pace_ms: 0,
        id: id.to_owned(),
        payload: Bytes::from_static(b"{\"t\":1796000000000000,\"i\":1}"),
        priority: Default::default(),
        class: Default::default(),
        accepted_at_ms: now_ms,
        expires_at_ms: now_ms + 3_600_000,
        collapse_key: String::new(),
        filter: None,
    });
    let accept = Accept {
        app: APP.into(),
        message: message.clone(),
        targets: vec![Target {
            token: token.clone(),
            store: true,
        }],
        once: Some(Once::Fires {
            id: id.to_owned(),
            keep_until_ms: now_ms + RETENTION.as_millis() as u64,
        }),
    };
    match store.record(accept).await? {
        AcceptOutcome::Accepted { targets, .. } => match targets.first() {
            Some((_, Recorded::Seq { seq, .. })) => Ok((message, token, *seq)),
            other => anyhow::bail!("push {id} was not recorded: {other:?}"),
        },
        AcceptOutcome::Duplicate { .. } => anyhow::bail!("push {id} had fired"),
    }
}
