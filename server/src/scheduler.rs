//! Sends scheduled pushes when they are due. Every process with the push API runs one (the
//! standalone process, each gateway): it claims what is due from the store, a batch at a
//! time, sends each batch through the pipeline at once (one place in it per app and lane;
//! see `Pipeline::fire`), and marks the batch fired in one write. A claim holds for
//! [`LEASE`]: if this process dies before it marks a push fired, another (or this one, once
//! restarted) claims it again then. Each push is recorded with
//! [`Once::Fires`](crate::store::Once): the store records it only if it has not fired (the
//! embedded store marks it fired in the same transaction; Redis keeps a key per push
//! sent), which makes the second sending a duplicate of the first. So each scheduled push
//! is sent once, by one process, however many run.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::log_throttle::Throttle;
use crate::message::unix_millis;
use crate::push::{Pipeline, PushError};
use crate::store::{DueJob, Store};

/// How long a claimed push is left to the process that claimed it: how late a push claimed
/// by a process that dies is sent by another. Sending one takes milliseconds; one that waits
/// longer for a place in the pipeline is sent again by another process when its claim
/// lapses, and is then a duplicate.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often the store is asked for due pushes when there were none.
pub const POLL: Duration = Duration::from_millis(100);
/// Pushes one process sends at once: claimed only when there is room for them, so a claim
/// never waits on this process's own backlog. They still wait for places in the pipeline
/// (`intake`), shared with the push API; a claim that lapses meanwhile lets another process
/// send the push too, which the store answers as a duplicate.
const IN_FLIGHT: usize = 2048;
/// Pushes claimed at once, at most.
const BATCH: usize = 1024;
/// Pushes sent (and marked fired) together, at most.
const SEND_BATCH: usize = 256;

/// Sends due pushes until `shutdown`; `retention` is how long a sent push is remembered.
/// Claims the next pushes while the last are still being sent.
pub async fn run(
    store: Arc<dyn Store>,
    pipeline: Arc<Pipeline>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut sending = JoinSet::new();
    while !shutdown.is_cancelled() {
        while sending.try_join_next().is_some() {}
        let room = places.available_permits().min(BATCH);
        if room == 0 {
            // Every place taken: wait for one.
            tokio::select! {
                _ = places.acquire() => {}
                () = shutdown.cancelled() => {}
            }
            continue;
        }
        // The places first, so every push claimed has one; those left over are given back
        // at the end of the round.
        let Ok(mut taken) = places.clone().try_acquire_many_owned(room as u32) else {
            continue; // only this loop takes places: `room` were free
        };
        let due = match store.claim_due(unix_millis(), LEASE, room).await {
            Ok(due) => due,
            Err(error) => {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "reading due scheduled pushes failed");
                }
                Vec::new()
            }
        };
        let full = due.len() == room;
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            let batch: Vec<DueJob> = due.by_ref().take(SEND_BATCH).collect();
            let places = taken.split(batch.len());
            let (store, pipeline) = (store.clone(), pipeline.clone());
            sending.spawn(async move {
                fire(&store, &pipeline, batch, retention).await;
                drop(places);
            });
        }
        if !full {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
    // What is being sent finishes (each is marked sent); a push claimed and not yet sent
    // is claimed again once its claim lapses.
    while sending.join_next().await.is_some() {}
}

/// Sends `jobs` and marks those sent fired.
async fn fire(store: &Arc<dyn Store>, pipeline: &Pipeline, jobs: Vec<DueJob>, retention: Duration) {
    let bodies: Vec<&[u8]> = jobs.iter().map(|job| job.job.as_slice()).collect();
    let outcomes = pipeline.fire(&bodies).await;
    let mut sent = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Ok(_) | Err(PushError::Limited(_) | PushError::Shed) => {
                sent.push((job.app.as_str(), job.id.as_str()));
            }
            Err(PushError::Store(error)) => {
                // Left claimed: it is due again when the claim lapses.
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, id = %job.id, "sending a scheduled push failed; retried later");
                }
            }
        }
    }
    if sent.is_empty() {
        return;
    }
    let keep_until = unix_millis().saturating_add(retention.as_millis() as u64);
    if let Err(error) = store.fired(&sent, keep_until).await {
        // They are claimed again after the lease and sent again: duplicates, sent once.
        static THROTTLE: Throttle = Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(%error, suppressed, pushes = sent.len(), "marking scheduled pushes sent failed");
        }
    }
}
