//! Writes messages' statuses in batches. Each push accepted writes its status; one store
//! write each would cost Redis (`appendfsync always`) an fsync of its own beside the
//! push's record, on the path of every other push. So the pipeline queues them here and
//! one task writes what gathered over [`LINGER`] at once (one Redis server: one call per
//! app and 256 statuses; a Redis Cluster: per app and shard of the message ids). A status is then readable within about [`LINGER`] of the push's answer.
//!
//! Counts the pipeline makes go the same way: how often a push put an older message out of a
//! device's queue (collapsed, or dropped by the cap), added to that message's counts.
//!
//! Bounded: when [`QUEUE`] statuses wait, a push writes its own and waits for it; counts
//! past it are left out (logged).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::log_throttle::Throttle;
use crate::metrics::{BATCH_SIZES, Histogram};
use crate::store::{ReceiptCount, StatusWrite, Store};

/// How long the writer gathers statuses before writing them.
pub const LINGER: Duration = Duration::from_millis(10);
/// Statuses waiting for the writer, at most.
pub const QUEUE: usize = 8192;
/// Statuses written at once, at most.
const BATCH: usize = 1024;

/// The pipeline's end of the writer.
pub struct StatusWriter {
    store: Arc<dyn Store>,
    queue: mpsc::Sender<Write>,
}

/// What the writer is given.
enum Write {
    Status(StatusWrite),
    /// Counts to add, and until when (Unix ms) they are kept at least.
    Count(ReceiptCount, u64),
    /// Answered once what was queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl StatusWriter {
    /// A writer to `store`, with its task (it ends when the writer is dropped).
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, writes) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store.clone(), writes));
        Self { store, queue }
    }

    /// Queues `status` to be written with the next batch; writes it now when the queue is
    /// full (or the writer gone). A status that cannot be written is logged: the message
    /// itself is accepted, only its status is missing.
    pub async fn keep(&self, status: StatusWrite) {
        let status = match self.queue.try_send(Write::Status(status)) {
            Ok(()) => return,
            Err(full_or_closed) => match full_or_closed.into_inner() {
                Write::Status(status) => status,
                Write::Count(..) | Write::Flush(_) => return,
            },
        };
        self.write_now(vec![status]).await;
    }

    /// Queues `counts` to be added to their message's with the next batch, kept until
    /// `keep_until_ms` at least; left out (logged) when the queue is full.
    pub fn count(&self, counts: ReceiptCount, keep_until_ms: u64) {
        if self
            .queue
            .try_send(Write::Count(counts, keep_until_ms))
            .is_err()
        {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(
                    suppressed,
                    "messages' counts left out: the writer's queue is full"
                );
            }
        }
    }

    /// Writes what is queued now, and waits for it: a process that stops does this before
    /// its store closes.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Write::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// Writes `statuses` now, and waits for it (for statuses whose order with later ones
    /// matters: a scheduled push's, written before the push can fire).
    pub async fn write_now(&self, statuses: Vec<StatusWrite>) {
        write(self.store.as_ref(), statuses).await;
    }
}

async fn write_batches(store: Arc<dyn Store>, mut writes: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(BATCH);
    let process = rand::random::<u64>();
    let mut batches = 0u64;
    while writes.recv_many(&mut batch, BATCH).await > 0 {
        tokio::time::sleep(LINGER).await;
        while batch.len() < BATCH {
            match writes.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut statuses = Vec::with_capacity(batch.len());
        let mut counts = Vec::new();
        let mut keep_until_ms = 0;
        let mut flushes = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Status(status) => statuses.push(status),
                Write::Count(count, until) => {
                    counts.push(count);
                    keep_until_ms = until.max(keep_until_ms);
                }
                Write::Flush(done) => flushes.push(done),
            }
        }
        // The statuses first: counts of a message whose status is in the same batch find it.
        if !statuses.is_empty() {
            write(store.as_ref(), statuses).await;
        }
        if !counts.is_empty() {
            batches += 1;
            let id = format!("w{process:016x}-{batches}");
            if let Err(error) = store.count_receipts(&counts, keep_until_ms, &id).await {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "adding messages' counts failed; lost");
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Statuses written at once (a batch, or one written inline).
static BATCHES: Histogram = Histogram::new(&BATCH_SIZES);

/// The sizes of the status writes, in Prometheus's text format.
pub fn render(out: &mut String) {
    let name = "pigeon_status_write_batch_size";
    Histogram::header(
        out,
        name,
        "Messages' statuses written to the store at once.",
    );
    BATCHES.render(out, name, "");
}

async fn write(store: &dyn Store, statuses: Vec<StatusWrite>) {
    BATCHES.observe(statuses.len() as f64);
    if let Err(error) = store.put_statuses(statuses).await {
        static THROTTLE: Throttle = Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(%error, suppressed, "keeping messages' statuses failed");
        }
    }
}
