//! Writes messages' statuses in batches. Each push accepted writes its status; one store
//! write each would cost Redis (`appendfsync always`) an fsync of its own beside the
//! push's record, on the path of every other push. So the pipeline queues them here and
//! one task writes what gathered over [`LINGER`] at once (in Redis, one call per app and
//! shard). A status is then readable within about [`LINGER`] of the push's answer.
//!
//! Bounded: when [`QUEUE`] statuses wait, a push writes its own and waits for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::log_throttle::Throttle;
use crate::metrics::{BATCH_SIZES, Histogram};
use crate::store::{StatusWrite, Store};

/// How long the writer gathers statuses before writing them.
pub const LINGER: Duration = Duration::from_millis(10);
/// Statuses waiting for the writer, at most.
pub const QUEUE: usize = 8192;
/// Statuses written at once, at most.
const BATCH: usize = 1024;

/// The pipeline's end of the writer.
pub struct StatusWriter {
    store: Arc<dyn Store>,
    queue: mpsc::Sender<StatusWrite>,
}

impl StatusWriter {
    /// A writer to `store`, with its task (it ends when the writer is dropped).
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, statuses) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store.clone(), statuses));
        Self { store, queue }
    }

    /// Queues `status` to be written with the next batch; writes it now when the queue is
    /// full (or the writer gone). A status that cannot be written is logged: the message
    /// itself is accepted, only its status is missing.
    pub async fn keep(&self, status: StatusWrite) {
        let status = match self.queue.try_send(status) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(status)) => status,
            Err(mpsc::error::TrySendError::Closed(status)) => status,
        };
        self.write_now(vec![status]).await;
    }

    /// Writes `statuses` now, and waits for it (for statuses whose order with later ones
    /// matters: a scheduled push's, written before the push can fire).
    pub async fn write_now(&self, statuses: Vec<StatusWrite>) {
        write(self.store.as_ref(), statuses).await;
    }
}

async fn write_batches(store: Arc<dyn Store>, mut statuses: mpsc::Receiver<StatusWrite>) {
    let mut batch = Vec::with_capacity(BATCH);
    while statuses.recv_many(&mut batch, BATCH).await > 0 {
        tokio::time::sleep(LINGER).await;
        while batch.len() < BATCH {
            match statuses.try_recv() {
                Ok(status) => batch.push(status),
                Err(_) => break,
            }
        }
        write(store.as_ref(), std::mem::take(&mut batch)).await;
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
