//! The stream keeper: keeps each app's shared stream complete in a process that holds
//! devices (standalone, or a node).
//!
//! The connection table hands an app's stream out in offset order (see
//! `connections::stream`), so an entry whose hand-off never comes (a gateway that died
//! between the append and the DeliverShared call, a call that timed out) would hold back
//! every entry after it. The keeper reads such a gap from the store once it has been open
//! for [`GAP_WAIT`], and, every `interval` (the heartbeat interval), compares each app's
//! stream head in the store with what was handed out here, which finds a lost hand-off
//! that no later entry revealed, and a stream that was recreated (its history lost): the
//! devices of that app are then asked to reconnect, and learn it in their Welcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::connections::{AppStream, ConnectionTable};
use crate::log_throttle::Throttle;
use crate::message::SharedDelivery;
use crate::store::{ALL, Store, StoreError};

/// How long a gap in an app's stream may stay open before it is read from the store. The
/// hand-off it waits for is normally a few milliseconds behind.
pub const GAP_WAIT: Duration = Duration::from_millis(200);

/// Entries one store read for a gap takes at most.
const FILL_PAGE: u32 = 500;

/// Runs until `shutdown`.
pub async fn run(
    table: Arc<ConnectionTable>,
    store: Arc<dyn Store>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut next_check = Instant::now() + interval;
    loop {
        tokio::select! {
            () = table.gap_opened() => tokio::time::sleep(GAP_WAIT).await,
            () = tokio::time::sleep_until(next_check.into()) => {}
            () = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        let check_all = now >= next_check;
        if check_all {
            next_check = now + interval;
        }
        let gaps_before = now.checked_sub(GAP_WAIT).unwrap_or(now);
        for stream in table.apps() {
            if !check_all && !table.has_gap(&stream, gaps_before) {
                continue;
            }
            if let Err(error) = fill(&table, store.as_ref(), &stream).await {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, app = %stream.name(), "reading a shared stream failed");
                }
            }
        }
    }
}

/// Reads `stream` from the store from where this process has handed it out to the store's
/// head, and hands out what it reads.
pub async fn fill(
    table: &ConnectionTable,
    store: &dyn Store,
    stream: &Arc<AppStream>,
) -> Result<(), StoreError> {
    let head = store.stream_head(stream.name(), ALL).await?;
    while let Some((epoch, through)) = table.check_stream(stream, head) {
        let read = store
            .read_stream(stream.name(), ALL, through, FILL_PAGE)
            .await?;
        let complete = match read.entries.last() {
            Some((last, _)) if read.more => *last,
            _ => head.head,
        };
        let entries = read
            .entries
            .into_iter()
            .map(|(offset, message)| SharedDelivery {
                stream: ALL,
                epoch,
                offset,
                message,
            })
            .collect();
        table.fill_stream(stream, epoch, entries, complete);
    }
    Ok(())
}
