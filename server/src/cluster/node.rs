//! `pigeon node`: a connection node of cluster mode.
//!
//! It holds devices exactly as standalone mode does (same listeners, same session driver),
//! with the Redis registry and store in place of the embedded ones, and adds:
//! - a lease in Redis (`p:n:<node id>` = its gRPC address), renewed every third of the
//!   lease; a node that stops renewing is dead, and routes to it count as offline;
//! - device routes: `token -> (node, connection)` written when a device connects, before
//!   its session reads the store, and removed when it disconnects;
//! - the internal gRPC API: `Deliver` (live pushes from gateways), `DeliverShared` (an
//!   entry of an app's shared stream), `Retag` (devices here whose tags changed) and
//!   `Takeover` (close a device's connection here because it connected to another node).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pigeon_proto::CloseCode;
use pigeon_proto::cluster::node_server::{self, NodeServer};
use pigeon_proto::cluster::{
    DeliverRequest, DeliverResponse, DeliverSharedRequest, DeliverSharedResponse, DeliverStatus,
    RetagRequest, RetagResponse, TakeoverRequest, TakeoverResponse,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::membership::Membership;
use super::peers::Peers;
use super::{declared_apps, open_redis};
use crate::api;
use crate::config::Settings;
use crate::connections::{ConnectionTable, Delivered};
use crate::device::{DeviceContext, Presence};
use crate::intake::{self, Intake, Permit};
use crate::listener;
use crate::log_throttle::Throttle;
use crate::message::{Delivery, Message, SharedDelivery};
use crate::metrics::Metrics;
use crate::process::{self, DeviceAddresses, DeviceListeners, Running, StartError};
use crate::store::{ALL, DeviceTag, DeviceTags, StoreError};

/// Targets one Deliver call may carry; a gateway's batches are far smaller.
const MAX_DELIVER_TARGETS: usize = 10_000;

/// A running node.
pub struct Node {
    /// This node's id in the registry.
    pub node_id: String,
    /// Where devices connect.
    pub devices: DeviceAddresses,
    /// `/healthz` and `/metrics`.
    pub http_addr: SocketAddr,
    /// The internal gRPC API.
    pub grpc_addr: SocketAddr,
    membership: Arc<Membership>,
    connections: Arc<ConnectionTable>,
    tracker: TaskTracker,
    lease: tokio::task::JoinHandle<()>,
    receipts: crate::receipts::Flushing,
    drain_timeout: Duration,
}

/// Writes this node's device routes to the registry, and has older connections of the
/// same device on other nodes closed.
struct ClusterPresence {
    membership: Arc<Membership>,
    peers: Arc<Peers>,
    node_id: String,
}

#[async_trait::async_trait]
impl Presence for ClusterPresence {
    async fn online(&self, token: &str, connection: u64) -> Result<(), StoreError> {
        let previous = self
            .membership
            .route_online(token, &self.node_id, connection)
            .await?;
        if let Some(previous) = previous
            && previous.node != self.node_id
        {
            // The device moved here from another node: that node closes its old connection
            // (4003). Nothing waits for it: the store, not that connection, holds what the
            // device has not acknowledged.
            let peers = self.peers.clone();
            let token = token.to_owned();
            tokio::spawn(async move {
                match peers.takeover(&token, &previous, CloseCode::Replaced).await {
                    Ok(closed) => tracing::debug!(node = %previous.node, closed, "takeover"),
                    Err(error) => tracing::debug!(%error, "takeover not delivered"),
                }
            });
        }
        Ok(())
    }

    async fn offline(&self, token: &str, connection: u64) {
        if let Err(error) = self
            .membership
            .route_offline(token, &self.node_id, connection)
            .await
        {
            // The route now points at a closed connection: Deliver answers "offline" for it
            // and the messages stay in the store, so this costs latency, not messages.
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, suppressed, "removing a device route failed");
            }
        }
    }
}

/// The node's internal gRPC API (the `pigeon.cluster.v1.Node` service).
struct InternalApi {
    connections: Arc<ConnectionTable>,
    /// Where Deliver and DeliverShared calls wait for a place to hand out their message:
    /// by lane (the message's class and priority) and app, as pushes wait on a gateway.
    intake: Arc<Intake>,
    metrics: Arc<Metrics>,
}

impl InternalApi {
    /// A place to hand out `message` of `app`; refused with `RESOURCE_EXHAUSTED` when its
    /// queue is full or the wait too long (its devices read it from the store).
    async fn place(&self, app: &str, message: &Message) -> Result<Permit, Status> {
        let lane = intake::lane(message.class, message.priority);
        self.intake.enter(app, lane, true).await.map_err(|_| {
            self.metrics.delivery_shed(app, message.class);
            Status::resource_exhausted("too many deliveries waiting; the devices read the store")
        })
    }
}

/// Hand-outs a node runs at once per core; the others wait in its queues by lane and app.
const DELIVERIES_PER_CORE: usize = 2;

#[tonic::async_trait]
impl node_server::Node for InternalApi {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let span = crate::telemetry::call_span("deliver", request.metadata());
        let _entered = span.enter();
        let request = request.into_inner();
        let stored = request
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        span.record("targets", request.targets.len());
        if request.targets.len() > MAX_DELIVER_TARGETS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DELIVER_TARGETS} targets per call"
            )));
        }
        let message = Arc::new(Message::from_stored(stored));
        let _place = self.place(&request.app, &message).await?;
        let statuses = request
            .targets
            .into_iter()
            .map(|target| {
                let delivery = Delivery {
                    seq: target.seq,
                    message: message.clone(),
                };
                let status = match self.connections.deliver(&target.token, delivery) {
                    Delivered::Live => DeliverStatus::Live,
                    Delivered::Lagging => DeliverStatus::Lagging,
                    Delivered::Offline => DeliverStatus::Offline,
                };
                status as i32
            })
            .collect();
        Ok(Response::new(DeliverResponse { statuses }))
    }

    async fn deliver_shared(
        &self,
        request: Request<DeliverSharedRequest>,
    ) -> Result<Response<DeliverSharedResponse>, Status> {
        let span = crate::telemetry::call_span("deliver_shared", request.metadata());
        let request = request.into_inner();
        if request.stream != ALL {
            return Err(Status::invalid_argument(format!(
                "stream: no stream {:?} (only {ALL:?})",
                request.stream
            )));
        }
        let stored = request
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        let delivery = SharedDelivery {
            stream: ALL,
            epoch: request.epoch,
            offset: request.offset,
            message: Arc::new(Message::from_stored(stored)),
        };
        let place = self.place(&request.app, &delivery.message).await?;
        // The hand-out writes to every parked connection of the app it is for: off the
        // runtime's workers, which keep serving the node's connections meanwhile.
        let connections = self.connections.clone();
        let app = request.app;
        let handed = tokio::task::spawn_blocking(move || {
            let handed = span.in_scope(|| connections.deliver_shared(&app, delivery));
            drop(place);
            handed
        })
        .await
        .map_err(|_| Status::internal("the hand-out failed"))?;
        Ok(Response::new(DeliverSharedResponse {
            live: handed.live,
            skipped: handed.skipped,
        }))
    }

    async fn retag(
        &self,
        request: Request<RetagRequest>,
    ) -> Result<Response<RetagResponse>, Status> {
        let request = request.into_inner();
        for device in request.devices {
            let tags = DeviceTags {
                tags: device
                    .tags
                    .into_iter()
                    .map(|tag| DeviceTag {
                        name: tag.name,
                        since: tag.since,
                    })
                    .collect(),
                version: device.version,
            };
            self.connections.retag(&request.app, &device.token, &tags);
        }
        Ok(Response::new(RetagResponse {}))
    }

    async fn takeover(
        &self,
        request: Request<TakeoverRequest>,
    ) -> Result<Response<TakeoverResponse>, Status> {
        let request = request.into_inner();
        let code = u16::try_from(request.close_code)
            .ok()
            .and_then(CloseCode::from_code)
            .unwrap_or(CloseCode::Replaced);
        let closed = self
            .connections
            .close_connection(&request.token, request.connection_id, code);
        Ok(Response::new(TakeoverResponse { closed }))
    }
}

/// Starts a node.
pub async fn start(settings: Settings) -> Result<Node, StartError> {
    let apps = declared_apps(&settings)?;
    let limits = &settings.limits;
    let (store, membership, _) = open_redis(&settings).await?;
    let node_id = if settings.cluster.node_id.is_empty() {
        format!("node-{:016x}", rand::random::<u64>())
    } else {
        settings.cluster.node_id.clone()
    };
    let devices = DeviceListeners::bind(&settings).await?;
    let (http_listener, http_addr) = process::bind_http(&settings)?;
    let (grpc_listener, grpc_addr) = process::bind_grpc(&settings)?;
    let advertise = if settings.cluster.advertise.is_empty() {
        grpc_addr.to_string()
    } else {
        settings.cluster.advertise.clone()
    };

    let shutdown = CancellationToken::new();
    let connections = Arc::new(ConnectionTable::new(
        limits.outbound_queue,
        shutdown.clone(),
    ));
    let peers = Arc::new(Peers::new(membership.clone(), settings.cluster.clone()));
    let presence = ClusterPresence {
        membership: membership.clone(),
        peers: peers.clone(),
        node_id: node_id.clone(),
    };
    let context = DeviceContext::new(
        connections.clone(),
        store,
        apps,
        limits,
        Some(Arc::new(presence)),
    );

    // The lease first: a device routed here before the lease exists would look offline.
    if let Err(error) = membership
        .renew_lease(&node_id, &advertise, settings.cluster.lease)
        .await
    {
        tracing::warn!(%error, "cannot take the node lease yet; retrying in the background");
    }
    let tracker = TaskTracker::new();
    let lease = tokio::spawn(keep_lease(
        membership.clone(),
        node_id.clone(),
        advertise,
        settings.cluster.lease,
        shutdown.clone(),
    ));
    let device_addresses = devices.addresses();
    let handshakes = context.handshakes.clone();
    let receipts = context.receipts.clone();
    receipts.webhooks().start(&shutdown);
    let flushing = receipts.clone().start(
        context.store.clone(),
        (limits.message_retention, limits.stats_retention),
    );
    tokio::spawn(crate::stream_keeper::run(
        connections.clone(),
        context.store.clone(),
        limits.heartbeat_interval,
        shutdown.clone(),
    ));
    tokio::spawn(connections.clone().run_pacing());
    // Tags of capped users reach every node that holds one of their devices.
    tokio::spawn(
        context
            .caps
            .clone()
            .run(context.store.clone(), peers, shutdown.clone()),
    );
    devices.start(Arc::new(context), &settings, &tracker);

    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    let places = cores * DELIVERIES_PER_CORE;
    // No app's share is capped here (the gateways cap an app's pushes): a lone app may use
    // every place, and apps waiting take turns.
    let intake = Intake::new(places, places, limits.push_queue, limits.push_queue_timeout);
    let metrics = Arc::new(Metrics::with_devices(connections.clone(), handshakes));
    metrics.watch_receipts(receipts);
    metrics.watch_redis();
    metrics.watch_intake(intake.clone());
    listener::serve_http(
        http_listener,
        api::ops_routes(metrics.clone(), &settings.metrics_token),
        limits,
        shutdown.clone(),
        &tracker,
    );
    // The gRPC server outlives the drain of the device connections (Deliver answers
    // "offline" for closed ones); it stops when the process exits.
    let grpc = process::grpc_server(limits)
        .add_service(NodeServer::with_interceptor(
            InternalApi {
                connections: connections.clone(),
                intake,
                metrics: metrics.clone(),
            },
            caller_check(&settings.cluster.secret),
        ))
        .serve_with_incoming(listener::incoming(grpc_listener));
    tokio::spawn(async move {
        if let Err(error) = grpc.await {
            tracing::error!(%error, "internal gRPC server failed");
        }
    });

    Ok(Node {
        node_id,
        devices: device_addresses,
        http_addr,
        grpc_addr,
        membership,
        connections,
        tracker,
        lease,
        receipts: flushing,
        drain_timeout: limits.drain_timeout,
    })
}

/// Lets through only calls that carry the cluster's secret (`authorization: Bearer
/// <secret>`), compared in constant time.
fn caller_check(
    secret: &crate::config::Secret,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + 'static {
    let expected = format!("Bearer {}", secret.expose()).into_bytes();
    move |request: Request<()>| {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        match presented {
            Some(presented) if api::constant_time_eq(presented, &expected) => Ok(request),
            _ => Err(Status::unauthenticated(
                "the internal API needs the cluster's secret",
            )),
        }
    }
}

/// Renews the lease every third of its length until shutdown.
async fn keep_lease(
    membership: Arc<Membership>,
    node_id: String,
    advertise: String,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match membership.renew_lease(&node_id, &advertise, lease).await {
            Ok(held) => {
                if !healthy || !held {
                    tracing::info!(node = %node_id, "node lease renewed");
                }
                healthy = true;
            }
            Err(error) => {
                if healthy {
                    tracing::warn!(%error, "renewing the node lease failed; devices stay connected");
                }
                healthy = false;
            }
        }
    }
}

impl Running for Node {
    fn banner(&self) -> String {
        let mut banner = format!("pigeon node {} is running\n", self.node_id);
        banner += &self.devices.describe();
        banner += &format!("  node grpc:        {}\n", self.grpc_addr);
        banner += &format!("  metrics:          http://{}/metrics\n", self.http_addr);
        banner
    }

    /// Drains: stops accepting and renewing the lease, closes every device with 1001 so it
    /// reconnects to another node (each close removes the device's route), gives up the
    /// lease so gateways stop calling, and waits for the connections up to the drain
    /// timeout; then adds its last counts of deliveries and acks to the store. Nothing
    /// unacknowledged is lost: it is all in the store already.
    async fn shutdown(self) -> bool {
        // Stops accepting, stops renewing the lease, and closes every device (1001).
        self.connections.shut_down();
        let _ = self.lease.await;
        if let Err(error) = self.membership.drop_lease(&self.node_id).await {
            tracing::warn!(%error, "giving up the node lease failed; it will lapse");
        }
        let drained = process::drain(&self.connections, &self.tracker, self.drain_timeout).await;
        self.receipts.stop(self.drain_timeout).await;
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::Outgoing;
    use crate::store::StreamHead;
    use pigeon_proto::cluster::DeliverTarget;
    use pigeon_proto::device::Priority;
    use pigeon_proto::store::StoredMessage;

    fn request(id: &str, seq: u64, class: u32, priority: Priority) -> Request<DeliverRequest> {
        Request::new(DeliverRequest {
            message: Some(StoredMessage {
                message_id: id.to_owned(),
                priority: priority as i32,
                class,
                expires_at_ms: u64::MAX,
                ..StoredMessage::default()
            }),
            targets: vec![DeliverTarget {
                token: "t".to_owned(),
                seq,
            }],
            app: "a".to_owned(),
        })
    }

    /// Waits until `count` deliveries wait in `intake`.
    async fn queued(intake: &Intake, count: usize) {
        let wait = async {
            while intake.waiting() < count {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the calls wait in the node's queues");
    }

    /// Under a backlog, a node hands out a high-priority message before a marketing one
    /// that waited longer.
    #[tokio::test]
    async fn deliveries_wait_by_lane() {
        let connections = Arc::new(ConnectionTable::new(8, CancellationToken::new()));
        let (connection, _) = connections.register(
            &Arc::from("t"),
            "a",
            StreamHead::default(),
            &DeviceTags::default(),
        );
        let intake = Intake::new(1, 1, 16, Duration::from_secs(5));
        let api = Arc::new(InternalApi {
            connections,
            intake: intake.clone(),
            metrics: Arc::default(),
        });
        let busy = intake.enter("a", 1, true).await.expect("the only place");
        let call = |request| {
            let api = api.clone();
            tokio::spawn(async move { node_server::Node::deliver(&*api, request).await })
        };
        let marketing = call(request("low", 1, 2, Priority::Normal));
        queued(&intake, 1).await;
        let high = call(request("high", 2, 0, Priority::High));
        queued(&intake, 2).await;
        assert!(
            connection.take().pushes.is_empty(),
            "nothing handed out yet"
        );
        drop(busy);
        for call in [marketing, high] {
            call.await.expect("join").expect("delivered");
        }
        let order: Vec<String> = connection
            .take()
            .pushes
            .iter()
            .map(|push| match push {
                Outgoing::Direct(delivery) => delivery.message.id.clone(),
                Outgoing::Shared(delivery) => delivery.message.id.clone(),
                Outgoing::Skipped(offset) => panic!("nothing was skipped, got {offset}"),
            })
            .collect();
        assert_eq!(order, ["high", "low"]);
    }

    /// A call past its queue's room is refused with RESOURCE_EXHAUSTED, and counted.
    #[tokio::test]
    async fn a_full_queue_refuses_a_delivery() {
        let connections = Arc::new(ConnectionTable::new(8, CancellationToken::new()));
        let intake = Intake::new(1, 1, 1, Duration::from_secs(5));
        let metrics = Arc::new(Metrics::default());
        let api = Arc::new(InternalApi {
            connections,
            intake: intake.clone(),
            metrics: metrics.clone(),
        });
        let _busy = intake.enter("a", 1, true).await.expect("the only place");
        let waiting = {
            let api = api.clone();
            tokio::spawn(async move {
                node_server::Node::deliver(&*api, request("m1", 1, 2, Priority::Normal)).await
            })
        };
        queued(&intake, 1).await;
        let refused = node_server::Node::deliver(&*api, request("m2", 2, 2, Priority::Normal))
            .await
            .expect_err("no room");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            metrics
                .render()
                .contains("pigeon_node_deliveries_shed_total{app=\"a\",class=\"marketing\"} 1\n"),
            "{}",
            metrics.render()
        );
        waiting.abort();
    }
}
