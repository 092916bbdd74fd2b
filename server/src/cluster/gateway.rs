//! `pigeon gateway`: the push API of cluster mode, over HTTP/JSON (`/v1/push`, the same as
//! standalone) and gRPC (`pigeon.push.v1.Push`).
//!
//! A push is (docs/delivery.md):
//! 1. resolved: uids to tokens, tokens checked, in Redis;
//! 2. recorded: one Lua script per target device stores the message under the device's
//!    next seq and returns the device's route. From here on, nothing is lost: the API
//!    answers 202 only after every target is recorded, and 503 if any could not be;
//! 3. fanned out: the routed targets are grouped by node, and each node gets Deliver calls
//!    of at most `cluster.deliver_batch` targets, all nodes in parallel (at most 64 calls
//!    in flight), each call under the deliver deadline and the node's circuit breaker. A
//!    target that is not reached live stays in the store and is read from there at the
//!    device's next heartbeat, push or reconnect, on whichever node.
//!
//! The gateway keeps no state another copy could not rebuild: only caches of node
//! addresses, gRPC channels and breakers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::{PeerError, Peers, StartError, declared_apps, open_store};
use crate::api::{self, ApiError, ApiState, PushFields, app_for_authorization, validate_push};
use crate::config::Settings;
use crate::grpc::cluster::{DeliverRequest, DeliverStatus, DeliverTarget};
use crate::grpc::push::push_server::{self, PushServer};
use crate::grpc::push::{self as push_proto, TargetCounts as TargetCountsProto};
use crate::message::{Message, unix_millis};
use crate::metrics::Metrics;
use crate::push::{PushOutcome, PushRequest, Pusher, TargetCounts, new_message, resolve};
use crate::standalone::{bind, local_addr};
use crate::store::redis::{Recorded, RedisStore, RoutedOutcome};
use crate::store::{Accept, StoreError, Target};

/// The push service of a gateway.
pub struct Gateway {
    store: Arc<RedisStore>,
    peers: Arc<Peers>,
    idempotency_window: Duration,
    batch: usize,
}

#[async_trait::async_trait]
impl Pusher for Gateway {
    async fn push(&self, mut request: PushRequest) -> Result<PushOutcome, StoreError> {
        let now_ms = unix_millis();
        let mut counts = TargetCounts::default();
        let tokens = resolve(self.store.as_ref(), &request, &mut counts).await?;
        let (message, idempotency) = new_message(&mut request, now_ms, self.idempotency_window);
        let storable = message.is_storable();
        let outcome = self
            .store
            .accept_routed(Accept {
                app: request.app,
                message,
                targets: tokens
                    .into_iter()
                    .map(|token| Target {
                        token,
                        store: storable,
                    })
                    .collect(),
                idempotency,
            })
            .await?;
        let (message, recorded) = match outcome {
            RoutedOutcome::Duplicate { message_id } => {
                return Ok(PushOutcome::Duplicate { message_id });
            }
            RoutedOutcome::Accepted { message, targets } => (message, targets),
        };
        let mut by_node: HashMap<String, Vec<DeliverTarget>> = HashMap::new();
        let mut routed = 0u32;
        for (token, recorded) in recorded {
            match recorded {
                Recorded::Unknown => counts.unknown += 1,
                Recorded::Dropped => counts.dropped += 1,
                Recorded::Seq { route: None, .. } if storable => counts.stored += 1,
                Recorded::Seq { route: None, .. } => counts.dropped += 1,
                Recorded::Seq {
                    seq,
                    route: Some(route),
                } => {
                    routed += 1;
                    by_node
                        .entry(route.node.clone())
                        .or_default()
                        .push(DeliverTarget { token, seq });
                }
            }
        }
        let live = self.fan_out(&message, by_node).await;
        counts.delivered += live;
        if storable {
            counts.stored += routed - live;
        } else {
            counts.dropped += routed - live;
        }
        Ok(PushOutcome::Accepted {
            message_id: message.id.clone(),
            targets: counts,
        })
    }
}

impl Gateway {
    /// Sends Deliver calls to the nodes in batches, at most [`DELIVER_CALLS_IN_FLIGHT`] at
    /// once; returns how many targets were handed to a live connection.
    async fn fan_out(
        &self,
        message: &Message,
        by_node: HashMap<String, Vec<DeliverTarget>>,
    ) -> u32 {
        let stored = &message.to_stored();
        let calls = by_node.into_iter().flat_map(|(node, targets)| {
            batches(targets, self.batch).into_iter().map(move |targets| {
                let request = DeliverRequest {
                    message: Some(stored.clone()),
                    targets,
                };
                let node = node.clone();
                async move {
                    match self.peers.deliver(&node, request).await {
                        Ok(response) => response
                            .statuses
                            .iter()
                            .filter(|status| **status == DeliverStatus::Live as i32)
                            .count() as u32,
                        // A dead node or an open breaker is expected while a node is down:
                        // quiet. A failed call is news.
                        Err(error @ (PeerError::Dead(_) | PeerError::Open(_))) => {
                            tracing::debug!(%error, "not delivered live; stored");
                            0
                        }
                        Err(error) => {
                            tracing::warn!(%error, "deliver failed; the targets read it from the store");
                            0
                        }
                    }
                }
            })
        });
        // Collected first: the stream below needs the calls as values, not borrowed
        // closures.
        let calls: Vec<_> = calls.collect();
        futures_util::stream::iter(calls)
            .buffer_unordered(DELIVER_CALLS_IN_FLIGHT)
            .fold(0u32, |live, delivered| async move { live + delivered })
            .await
    }
}

/// Deliver calls one push keeps in flight, at most. A broadcast to a million devices is
/// 2,000 batches: sent all at once, the nodes (busy writing those very pushes and taking
/// the acks) missed their deadline on most of them and breakers opened.
const DELIVER_CALLS_IN_FLIGHT: usize = 64;

/// `targets` split into batches of at most `size`, without copying them.
fn batches(mut targets: Vec<DeliverTarget>, size: usize) -> Vec<Vec<DeliverTarget>> {
    let mut batches = Vec::with_capacity(targets.len().div_ceil(size.max(1)));
    while targets.len() > size {
        let rest = targets.split_off(size);
        batches.push(std::mem::replace(&mut targets, rest));
    }
    batches.push(targets);
    batches
}

/// The push API over gRPC, sharing the HTTP API's state (apps, limits, metrics).
struct PushApi {
    state: Arc<ApiState>,
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match &error {
            ApiError::Unauthorized => Status::unauthenticated(error.to_string()),
            ApiError::InvalidField { field, message } => {
                Status::invalid_argument(format!("{field}: {message}"))
            }
            ApiError::TooLarge(message) => Status::invalid_argument(message.clone()),
            ApiError::Overloaded => Status::resource_exhausted(error.to_string()),
            ApiError::Unavailable => Status::unavailable(error.to_string()),
            ApiError::NotFound => Status::unimplemented(error.to_string()),
        }
    }
}

#[tonic::async_trait]
impl push_server::Push for PushApi {
    async fn push(
        &self,
        request: Request<push_proto::PushRequest>,
    ) -> Result<Response<push_proto::PushResponse>, Status> {
        let state = &self.state;
        let Some(pusher) = &state.push else {
            return Err(ApiError::NotFound.into());
        };
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let app = app_for_authorization(&state.apps, authorization)?
            .id
            .clone();
        let body = request.into_inner();
        let payload: &RawValue =
            serde_json::from_str(&body.payload_json).map_err(|error| ApiError::InvalidField {
                field: "payload_json".into(),
                message: format!("not JSON: {error}"),
            })?;
        let priority = body.priority();
        let push = validate_push(
            &app,
            PushFields {
                uids: body.uids,
                tokens: body.tokens,
                payload: payload.get(),
                ttl_seconds: body.ttl_seconds,
                priority,
                collapse_key: (!body.collapse_key.is_empty()).then_some(body.collapse_key),
                idempotency_key: (!body.idempotency_key.is_empty()).then_some(body.idempotency_key),
            },
            &state.limits,
        )?;
        let outcome = pusher.push(push).await.map_err(|error| {
            state.metrics.push_failed();
            ApiError::from(error)
        })?;
        let response = match outcome {
            PushOutcome::Accepted {
                message_id,
                targets,
            } => {
                state.metrics.push_accepted(&targets);
                push_proto::PushResponse {
                    message_id,
                    duplicate: false,
                    targets: Some(TargetCountsProto {
                        delivered: targets.delivered,
                        stored: targets.stored,
                        unknown: targets.unknown,
                        dropped: targets.dropped,
                    }),
                }
            }
            PushOutcome::Duplicate { message_id } => {
                state.metrics.push_duplicate();
                push_proto::PushResponse {
                    message_id,
                    duplicate: true,
                    targets: None,
                }
            }
        };
        Ok(Response::new(response))
    }
}

/// A running gateway.
pub struct RunningGateway {
    /// The HTTP push API.
    pub http_addr: SocketAddr,
    /// The gRPC push API.
    pub grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
}

/// Starts a gateway.
pub async fn start(settings: Settings) -> Result<RunningGateway, StartError> {
    let apps = declared_apps(&settings)?;
    let limits = settings.limits.clone();
    let store = open_store(&settings).await?;
    let http_listener = bind(settings.listen.http).await?;
    let http_addr = local_addr(&http_listener, settings.listen.http)?;
    let grpc_listener = bind(settings.listen.grpc).await?;
    let grpc_addr = local_addr(&grpc_listener, settings.listen.grpc)?;
    let gateway = Gateway {
        peers: Arc::new(Peers::new(store.clone(), settings.cluster.clone())),
        store,
        idempotency_window: limits.idempotency_window,
        batch: settings.cluster.deliver_batch,
    };
    let state = Arc::new(ApiState {
        apps,
        limits: limits.clone(),
        push: Some(Arc::new(gateway)),
        metrics: Arc::new(Metrics::default()),
        node: None,
    });
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let http_state = state.clone();
    let http_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(error) = api::serve(http_listener, http_state, http_shutdown).await {
            tracing::error!(%error, "push API failed");
        }
    });
    let grpc_shutdown = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .add_service(PushServer::new(PushApi { state }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc_listener),
            async move { grpc_shutdown.cancelled().await },
        );
    tracker.spawn(async move {
        if let Err(error) = grpc.await {
            tracing::error!(%error, "gRPC push API failed");
        }
    });
    Ok(RunningGateway {
        http_addr,
        grpc_addr,
        shutdown,
        tracker,
        drain_timeout: limits.drain_timeout,
    })
}

impl RunningGateway {
    /// Stops taking requests and lets those in progress finish, up to the drain timeout.
    pub async fn shutdown(self) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(count: u64) -> Vec<DeliverTarget> {
        (1..=count)
            .map(|seq| DeliverTarget {
                token: format!("t{seq}"),
                seq,
            })
            .collect()
    }

    #[test]
    fn targets_are_split_into_bounded_batches_in_order() {
        let split = batches(targets(7), 3);
        let seqs: Vec<Vec<u64>> = split
            .iter()
            .map(|batch| batch.iter().map(|target| target.seq).collect())
            .collect();
        assert_eq!(seqs, [vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        assert_eq!(batches(targets(3), 3).len(), 1);
    }
}
