//! `pigeon node`: a connection node of cluster mode.
//!
//! It holds devices exactly as standalone mode does (same listeners, same session driver),
//! with the Redis registry and store in place of the embedded ones, and adds:
//! - a lease in Redis (`p:n:<node id>` = its gRPC address), renewed every third of the
//!   lease; a node that stops renewing is dead, and routes to it count as offline;
//! - device routes: `token -> (node, connection)` written when a device connects, before
//!   its session reads the store, and removed when it disconnects;
//! - the internal gRPC API: `Deliver` (live pushes from gateways) and `Takeover` (close a
//!   device's connection here because it connected to another node).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pigeon_proto::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::{Peers, StartError, declared_apps, open_store};
use crate::api::{self, ApiState};
use crate::config::Settings;
use crate::connection::{DeviceContext, Presence};
use crate::grpc::cluster::node_server::{self, NodeServer};
use crate::grpc::cluster::{
    DeliverRequest, DeliverResponse, DeliverStatus, TakeoverRequest, TakeoverResponse,
};
use crate::log_throttle::Throttle;
use crate::message::{Delivery, Message};
use crate::metrics::Metrics;
use crate::node::{Delivered, Node};
use crate::standalone::{DeviceListeners, bind, local_addr, session_config, wait_for_connections};
use crate::store::StoreError;
use crate::store::redis::RedisStore;

/// Targets one Deliver call may carry; a gateway's batches are far smaller.
const MAX_DELIVER_TARGETS: usize = 10_000;

/// A running node.
pub struct RunningNode {
    /// This node's id in the registry.
    pub node_id: String,
    /// Where devices connect over WebSocket.
    pub websocket_addr: SocketAddr,
    /// Whether that listener speaks TLS.
    pub websocket_tls: bool,
    /// Where devices connect over QUIC, if configured.
    pub quic_addr: Option<SocketAddr>,
    /// `/healthz` and `/metrics`.
    pub http_addr: SocketAddr,
    /// The internal gRPC API.
    pub grpc_addr: SocketAddr,
    store: Arc<RedisStore>,
    node: Arc<Node>,
    tracker: TaskTracker,
    lease: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
}

/// Writes this node's device routes to the registry, and has older connections of the
/// same device on other nodes closed.
struct ClusterPresence {
    store: Arc<RedisStore>,
    peers: Arc<Peers>,
    node_id: String,
}

#[async_trait::async_trait]
impl Presence for ClusterPresence {
    async fn online(&self, token: &str, connection: u64) -> Result<(), StoreError> {
        let previous = self
            .store
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
                match peers.takeover(&token, &previous).await {
                    Ok(closed) => tracing::debug!(node = %previous.node, closed, "takeover"),
                    Err(error) => tracing::debug!(%error, "takeover not delivered"),
                }
            });
        }
        Ok(())
    }

    async fn offline(&self, token: &str, connection: u64) {
        if let Err(error) = self
            .store
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

/// The internal gRPC API.
struct NodeApi {
    node: Arc<Node>,
}

#[tonic::async_trait]
impl node_server::Node for NodeApi {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let request = request.into_inner();
        let stored = request
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        if request.targets.len() > MAX_DELIVER_TARGETS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DELIVER_TARGETS} targets per call"
            )));
        }
        let message = Arc::new(Message::from_stored(stored));
        let statuses = request
            .targets
            .into_iter()
            .map(|target| {
                let delivery = Delivery {
                    seq: target.seq,
                    message: message.clone(),
                };
                let status = match self.node.deliver(&target.token, delivery) {
                    Delivered::Live => DeliverStatus::Live,
                    Delivered::Lagging => DeliverStatus::Lagging,
                    Delivered::Offline => DeliverStatus::Offline,
                };
                status as i32
            })
            .collect();
        Ok(Response::new(DeliverResponse { statuses }))
    }

    async fn takeover(
        &self,
        request: Request<TakeoverRequest>,
    ) -> Result<Response<TakeoverResponse>, Status> {
        let request = request.into_inner();
        let closed =
            self.node
                .close_connection(&request.token, request.connection_id, CloseCode::Replaced);
        Ok(Response::new(TakeoverResponse { closed }))
    }
}

/// Starts a node.
pub async fn start(settings: Settings) -> Result<RunningNode, StartError> {
    let apps = declared_apps(&settings)?;
    let limits = settings.limits.clone();
    let store = open_store(&settings).await?;
    let node_id = if settings.cluster.node_id.is_empty() {
        format!("node-{:016x}", rand::random::<u64>())
    } else {
        settings.cluster.node_id.clone()
    };
    let devices = DeviceListeners::bind(&settings).await?;
    let http_listener = bind(settings.listen.http).await?;
    let http_addr = local_addr(&http_listener, settings.listen.http)?;
    let grpc_listener = bind(settings.listen.grpc).await?;
    let grpc_addr = local_addr(&grpc_listener, settings.listen.grpc)?;
    let advertise = if settings.cluster.advertise.is_empty() {
        grpc_addr.to_string()
    } else {
        settings.cluster.advertise.clone()
    };

    let shutdown = CancellationToken::new();
    let node = Arc::new(Node::new(limits.outbound_queue, shutdown.clone()));
    let peers = Arc::new(Peers::new(store.clone(), settings.cluster.clone()));
    let context = Arc::new(DeviceContext {
        node: node.clone(),
        registry: store.clone(),
        store: store.clone(),
        apps: apps.clone(),
        session: Arc::new(session_config(&limits)),
        presence: Some(Arc::new(ClusterPresence {
            store: store.clone(),
            peers,
            node_id: node_id.clone(),
        })),
    });

    // The lease first: a device routed here before the lease exists would look offline.
    if let Err(error) = store
        .renew_lease(&node_id, &advertise, settings.cluster.lease)
        .await
    {
        tracing::warn!(%error, "cannot take the node lease yet; retrying in the background");
    }
    let tracker = TaskTracker::new();
    let lease = tokio::spawn(keep_lease(
        store.clone(),
        node_id.clone(),
        advertise,
        settings.cluster.lease,
        shutdown.clone(),
    ));
    let (websocket_addr, websocket_tls, quic_addr) = (
        devices.websocket_addr,
        devices.websocket_tls,
        devices.quic_addr,
    );
    devices.spawn(context, &limits, &tracker);

    let api_state = Arc::new(ApiState {
        apps,
        limits: limits.clone(),
        push: None,
        metrics: Arc::new(Metrics::default()),
        node: Some(node.clone()),
    });
    let api_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(error) = api::serve(http_listener, api_state, api_shutdown).await {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    // The gRPC server outlives the drain of the device connections (Deliver answers
    // "offline" for closed ones); it stops when the process exits.
    let grpc = tonic::transport::Server::builder()
        .add_service(NodeServer::new(NodeApi { node: node.clone() }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc_listener));
    tokio::spawn(async move {
        if let Err(error) = grpc.await {
            tracing::error!(%error, "internal gRPC server failed");
        }
    });

    Ok(RunningNode {
        node_id,
        websocket_addr,
        websocket_tls,
        quic_addr,
        http_addr,
        grpc_addr,
        store,
        node,
        tracker,
        lease,
        drain_timeout: limits.drain_timeout,
    })
}

/// Renews the lease every third of its length until shutdown.
async fn keep_lease(
    store: Arc<RedisStore>,
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
        match store.renew_lease(&node_id, &advertise, lease).await {
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

impl RunningNode {
    /// Drains: stops accepting, closes every device with 1001 so it reconnects to another
    /// node (each close removes the device's route), gives up the lease so gateways stop
    /// calling, and waits for the connections up to the drain timeout. Nothing unacknowledged is lost: it is all in the store already.
    /// Returns false when the deadline passed first.
    pub async fn shutdown(self) -> bool {
        tracing::info!(connections = self.node.connection_count(), "draining");
        // Stops accepting, stops renewing the lease, and closes every device (1001).
        self.node.shut_down();
        let _ = self.lease.await;
        if let Err(error) = self.store.drop_lease(&self.node_id).await {
            tracing::warn!(%error, "giving up the node lease failed; it will lapse");
        }
        wait_for_connections(&self.tracker, &self.node, self.drain_timeout).await
    }
}
