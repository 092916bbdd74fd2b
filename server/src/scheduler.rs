//! Sends scheduled pushes when they are due. Every process with the push API runs one (the
//! standalone process, each gateway): it claims what is due from the store, a batch at a
//! time, sends each through the pipeline, and marks it fired. A claim holds for
//! [`LEASE`]: if this process dies before it marks a push fired, another (or this one, once
//! restarted) claims it again then, and the push's idempotency key (its message id, or its
//! own key) makes the second sending a duplicate of the first. So each scheduled push is
//! sent once, by one process, however many run.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::log_throttle::Throttle;
use crate::message::unix_millis;
use crate::push::{Pipeline, PushError};
use crate::store::{DueJob, Store};

/// How long a claimed push is left to the process that claimed it.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often the store is asked for due pushes when there were none.
pub const POLL: Duration = Duration::from_millis(100);
/// Pushes claimed at once, and sent at once: few enough to be sent well within the
/// [`LEASE`] (a claim that lapses while its push waits would let another process send it
/// too).
const BATCH: usize = 64;

/// Sends due pushes until `shutdown`; `retention` is how long a sent push is remembered.
pub async fn run(
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let due = match store.claim_due(unix_millis(), LEASE, BATCH).await {
            Ok(due) => due,
            Err(error) => {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "reading due scheduled pushes failed");
                }
                Vec::new()
            }
        };
        let full = due.len() == BATCH;
        futures_util::stream::iter(due)
            .for_each_concurrent(BATCH, |job| fire(&store, &pipeline, job, retention))
            .await;
        if !full {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

async fn fire(store: &Arc<dyn Store>, pipeline: &Pipeline, job: DueJob, retention: Duration) {
    match pipeline.fire(&job.job).await {
        Ok(_) | Err(PushError::Limited(_) | PushError::Shed) => {}
        Err(PushError::Store(error)) => {
            // Left claimed: it is due again when the claim lapses.
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, suppressed, id = %job.id, "sending a scheduled push failed; retried later");
            }
            return;
        }
    }
    let keep_until = unix_millis().saturating_add(retention.as_millis() as u64);
    if let Err(error) = store.fired(&job.app, &job.id, keep_until).await {
        // It is claimed again after the lease and sent again: a duplicate, sent once.
        static THROTTLE: Throttle = Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(%error, suppressed, id = %job.id, "marking a scheduled push sent failed");
        }
    }
}
