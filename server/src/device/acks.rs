//! Devices' acknowledgements on their way to the store.
//!
//! A device acknowledges each push it gets, and each acknowledgement frees what it covers in
//! the store. A session does not wait for that write: it hands the ack here and goes on,
//! and one task writes every ack that came meanwhile in one store call, each device's
//! highest only (acks are cumulative). So a burst of pushes costs the store one write per
//! batch of acks rather than one per ack, and a session is never held up by the store's
//! queue. An ack not yet written when the process dies is lost: the device is given those
//! messages again when it reconnects (at least once), as it would be if the ack had been
//! lost on its way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::log_throttle::Throttle;
use crate::store::Store;

/// Acks one store call takes at most.
const MAX_BATCH: usize = 1024;

/// The acks waiting for the store, by device (at most one per device: its highest).
#[derive(Default)]
pub struct AckWriter {
    pending: Mutex<HashMap<String, u64>>,
    wake: Notify,
}

impl AckWriter {
    /// The device `token` has processed everything up to `seq`.
    pub fn ack(&self, token: &str, seq: u64) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get_mut(token) {
                Some(highest) => *highest = (*highest).max(seq),
                None => {
                    pending.insert(token.to_owned(), seq);
                }
            }
        }
        self.wake.notify_one();
    }

    /// Writes the acks as they come, for as long as the process runs (a draining process
    /// still takes its devices' last acks).
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            self.wake.notified().await;
            self.write(store.as_ref()).await;
        }
    }

    /// Writes the acks waiting now.
    pub async fn write(&self, store: &dyn Store) {
        let acks: Vec<(String, u64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        for batch in acks.chunks(MAX_BATCH) {
            if let Err(error) = store.ack_many(batch).await {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, acks = batch.len(), "persisting acks failed; those devices get the messages again when they reconnect");
                }
            }
        }
    }
}
