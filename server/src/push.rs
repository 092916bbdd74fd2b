//! The push service: from a validated request to stored and delivered messages.
//!
//! 1. Resolve the audience (uids and tokens) to known device tokens of the app.
//! 2. Record the message for every target in the offline store, atomically with its
//!    idempotency key. From here on the message survives a crash.
//! 3. Hand it to the targets' live connections.
//!
//! The HTTP API (and, in cluster mode, the gRPC API) only translate requests and errors.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pigeon_proto::device::Priority;
use serde::Serialize;

use crate::message::{Delivery, Message, new_message_id, unix_millis};
use crate::node::{Delivered, Node};
use crate::store::{Accept, AcceptOutcome, OfflineStore, Registry, StoreError, Target};

/// A push request that passed validation.
#[derive(Clone, Debug)]
pub struct PushRequest {
    /// The app pushing.
    pub app: String,
    /// Target uids.
    pub uids: Vec<String>,
    /// Target device tokens.
    pub tokens: Vec<String>,
    /// The payload's JSON text.
    pub payload: Bytes,
    /// Time to live; zero means "devices online now only".
    pub ttl: Duration,
    /// Priority.
    pub priority: Priority,
    /// Collapse key, empty for none.
    pub collapse_key: String,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
}

/// How many targets ended in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetCounts {
    /// Handed to a live connection now (and kept until acknowledged).
    pub delivered: u32,
    /// Stored for a device that is offline (or whose connection is catching up).
    pub stored: u32,
    /// Uids with no device, and tokens that are no device of the app.
    pub unknown: u32,
    /// Offline devices of a TTL-0 push: not stored, so not delivered.
    pub dropped: u32,
}

/// The result of a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// A new message.
    Accepted {
        /// Its id.
        message_id: String,
        /// Per-state target counts.
        targets: TargetCounts,
    },
    /// The idempotency key was seen within its window; nothing was sent again.
    Duplicate {
        /// The first message's id.
        message_id: String,
    },
}

/// Something that accepts pushes: [`PushService`] in standalone mode, the gateway in
/// cluster mode. The HTTP and gRPC APIs call this.
#[async_trait::async_trait]
pub trait Pusher: Send + Sync + 'static {
    /// Pushes one message.
    async fn push(&self, request: PushRequest) -> Result<PushOutcome, StoreError>;
}

/// The message a request describes, accepted at `now_ms`, and its idempotency key with
/// the time it stops counting.
pub fn new_message(
    request: &mut PushRequest,
    now_ms: u64,
    idempotency_window: Duration,
) -> (Arc<Message>, Option<(String, u64)>) {
    let message = Arc::new(Message {
        id: new_message_id(now_ms),
        payload: std::mem::take(&mut request.payload),
        priority: request.priority,
        accepted_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(request.ttl.as_millis() as u64),
        collapse_key: std::mem::take(&mut request.collapse_key),
    });
    let idempotency = request.idempotency_key.take().map(|key| {
        let until = now_ms.saturating_add(idempotency_window.as_millis() as u64);
        (key, until)
    });
    (message, idempotency)
}

/// The distinct known tokens of the audience; counts the unknown uids and tokens.
pub async fn resolve(
    registry: &dyn Registry,
    request: &PushRequest,
    counts: &mut TargetCounts,
) -> Result<Vec<String>, StoreError> {
    let mut seen = HashSet::new();
    let mut tokens = Vec::new();
    let per_uid = registry
        .tokens_for_uids(&request.app, &request.uids)
        .await?;
    for bound in per_uid {
        if bound.is_empty() {
            counts.unknown += 1;
        }
        for token in bound {
            if seen.insert(token.clone()) {
                tokens.push(token);
            }
        }
    }
    let known = registry.known_tokens(&request.app, &request.tokens).await?;
    for (token, known) in request.tokens.iter().zip(known) {
        if !known {
            counts.unknown += 1;
        } else if seen.insert(token.clone()) {
            tokens.push(token.clone());
        }
    }
    Ok(tokens)
}

/// Accepts pushes for one node's devices (standalone mode).
pub struct PushService {
    node: Arc<Node>,
    registry: Arc<dyn Registry>,
    store: Arc<dyn OfflineStore>,
    idempotency_window: Duration,
}

impl PushService {
    /// A push service over these parts.
    pub fn new(
        node: Arc<Node>,
        registry: Arc<dyn Registry>,
        store: Arc<dyn OfflineStore>,
        idempotency_window: Duration,
    ) -> Self {
        Self {
            node,
            registry,
            store,
            idempotency_window,
        }
    }

    /// Pushes one message.
    pub async fn push(&self, mut request: PushRequest) -> Result<PushOutcome, StoreError> {
        let now_ms = unix_millis();
        let mut counts = TargetCounts::default();
        let tokens = resolve(self.registry.as_ref(), &request, &mut counts).await?;
        let (message, idempotency) = new_message(&mut request, now_ms, self.idempotency_window);
        let storable = message.is_storable();
        let targets: Vec<Target> = tokens
            .into_iter()
            .filter(|token| {
                // A TTL-0 push only goes to devices online now.
                let keep = storable || self.node.is_online(token);
                if !keep {
                    counts.dropped += 1;
                }
                keep
            })
            .map(|token| Target {
                token,
                store: storable,
            })
            .collect();
        let outcome = self
            .store
            .accept(Accept {
                app: request.app,
                message: message.clone(),
                targets: targets.clone(),
                idempotency,
            })
            .await?;
        let seqs = match outcome {
            AcceptOutcome::Duplicate { message_id } => {
                return Ok(PushOutcome::Duplicate { message_id });
            }
            AcceptOutcome::Accepted { seqs } => seqs,
        };
        for (target, seq) in targets.iter().zip(seqs) {
            if seq == 0 {
                counts.unknown += 1;
                continue;
            }
            let delivery = Delivery {
                seq,
                message: message.clone(),
            };
            match self.node.deliver(&target.token, delivery) {
                Delivered::Live => counts.delivered += 1,
                Delivered::Lagging | Delivered::Offline if storable => counts.stored += 1,
                Delivered::Lagging | Delivered::Offline => counts.dropped += 1,
            }
        }
        Ok(PushOutcome::Accepted {
            message_id: message.id.clone(),
            targets: counts,
        })
    }
}

#[async_trait::async_trait]
impl Pusher for PushService {
    async fn push(&self, request: PushRequest) -> Result<PushOutcome, StoreError> {
        PushService::push(self, request).await
    }
}
