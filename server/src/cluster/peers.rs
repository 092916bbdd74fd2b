//! How a process reaches the nodes of the cluster: their addresses (from their leases), one
//! gRPC channel each, a [`Breaker`] each, and the push pipeline's fan-out to them
//! ([`Peers`] is the gateway's [`Fanout`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt as _;
use pigeon_proto::CloseCode;
use pigeon_proto::cluster::node_client::NodeClient;
use pigeon_proto::cluster::{
    DeliverRequest, DeliverResponse, DeliverSharedRequest, DeliverStatus, DeliverTarget,
    DeviceTags as WireTags, RetagRequest, TakeoverRequest,
};
use pigeon_proto::store::DeviceTag as WireTag;
use tonic::transport::{Channel, Endpoint};

use super::membership::Membership;
use crate::config::ClusterSettings;
use crate::connections::HandedOut;
use crate::message::{Message, SharedDelivery};
use crate::metrics::{CALL_SECONDS, Histogram};
use crate::push::{Fanout, RecordedTarget};
use crate::store::{Retagged, Route, StoreError};

/// A circuit breaker: after `failures` consecutive failed calls it opens and calls are
/// skipped; after `cooldown` one trial call goes through (half-open); its success closes the
/// breaker, its failure opens it again.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

impl Breaker {
    /// A closed breaker.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures,
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may go out now. While half-open only the trial call may, until it
    /// reports (or until another cooldown passes, should its report never come).
    pub fn allow(&self, now: Instant) -> bool {
        let mut state = self.state();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { since } if now >= since + self.cooldown => {
                *state = BreakerState::HalfOpen { since: now };
                true
            }
            BreakerState::HalfOpen { .. } => false,
        }
    }

    /// Reports how an allowed call went.
    pub fn report(&self, success: bool, now: Instant) {
        let mut state = self.state();
        *state = match (*state, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 < self.failures => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => BreakerState::Open {
                until: now + self.cooldown,
            },
        };
    }

    /// Whether calls are being skipped (open, or half-open).
    pub fn is_open(&self) -> bool {
        !matches!(*self.state(), BreakerState::Closed { .. })
    }
}

/// How long a node's address, read from its lease, is reused before it is read again.
const ADDRESS_TTL: Duration = Duration::from_secs(1);
/// Past this many remembered nodes (ids change at every node start), forget them all.
const MAX_REMEMBERED_NODES: usize = 4096;

/// The nodes of the cluster, as one process calls them.
pub struct Peers {
    membership: Arc<Membership>,
    settings: ClusterSettings,
    /// `Bearer <cluster secret>`, sent with every call.
    authorization: tonic::metadata::AsciiMetadataValue,
    addresses: DashMap<String, (Option<String>, Instant)>,
    clients: DashMap<String, NodeClient<Channel>>,
    breakers: DashMap<String, Arc<Breaker>>,
    /// Per node, how long its Deliver calls took.
    deliver_latency: DashMap<String, Arc<Histogram>>,
}

/// Why a call to a node did not happen or failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The node's lease is gone: it is dead, and its devices count as offline.
    #[error("node {0} is not alive")]
    Dead(String),
    /// The node's breaker is open.
    #[error("node {0} is skipped: its circuit breaker is open")]
    Open(String),
    /// Redis could not say where the node is.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The call failed or missed its deadline.
    #[error("calling node {node}: {message}")]
    Call {
        /// The node.
        node: String,
        /// What went wrong.
        message: String,
    },
}

impl Peers {
    /// The peers known through `membership`.
    pub fn new(membership: Arc<Membership>, settings: ClusterSettings) -> Self {
        let authorization = format!("Bearer {}", settings.secret.expose())
            .parse()
            .unwrap_or_else(|_| tonic::metadata::AsciiMetadataValue::from_static(""));
        Self {
            authorization,
            membership,
            settings,
            addresses: DashMap::new(),
            clients: DashMap::new(),
            breakers: DashMap::new(),
            deliver_latency: DashMap::new(),
        }
    }

    /// Per node, the latency of Deliver calls and whether its breaker is open, in
    /// Prometheus's text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "pigeon_node_deliver_seconds";
        Histogram::header(
            out,
            name,
            "Deliver calls to each node, from the call to its answer (or deadline).",
        );
        let mut nodes: Vec<_> = self
            .deliver_latency
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        for (node, latency) in nodes {
            latency.render(out, name, &format!("node=\"{node}\""));
        }
        let name = "pigeon_node_breaker_open";
        let _ = writeln!(
            out,
            "# HELP {name} Whether calls to each node are held back by its circuit breaker \
             (1: open or half-open).\n# TYPE {name} gauge"
        );
        let mut breakers: Vec<_> = self
            .breakers
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().is_open()))
            .collect();
        breakers.sort();
        for (node, open) in breakers {
            let _ = writeln!(out, "{name}{{node=\"{node}\"}} {}", u8::from(open));
        }
    }

    /// The node's breaker.
    pub fn breaker(&self, node: &str) -> Arc<Breaker> {
        if let Some(breaker) = self.breakers.get(node) {
            return breaker.clone();
        }
        if self.breakers.len() >= MAX_REMEMBERED_NODES {
            self.breakers.clear();
            self.deliver_latency.clear();
        }
        self.breakers
            .entry(node.to_owned())
            .or_insert_with(|| {
                Arc::new(Breaker::new(
                    self.settings.breaker_failures,
                    self.settings.breaker_cooldown,
                ))
            })
            .clone()
    }

    /// The node's gRPC address, if it is alive.
    async fn address(&self, node: &str) -> Result<Option<String>, StoreError> {
        if let Some(entry) = self.addresses.get(node)
            && entry.1.elapsed() < ADDRESS_TTL
        {
            return Ok(entry.0.clone());
        }
        let address = self.membership.node_address(node).await?;
        if self.addresses.len() >= MAX_REMEMBERED_NODES {
            self.addresses.clear();
        }
        self.addresses
            .insert(node.to_owned(), (address.clone(), Instant::now()));
        Ok(address)
    }

    /// A client of the node at `address` (one HTTP/2 channel per address, connected on
    /// first use and reconnected by tonic).
    fn client(&self, node: &str, address: &str) -> Result<NodeClient<Channel>, PeerError> {
        if let Some(client) = self.clients.get(address) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| PeerError::Call {
                node: node.to_owned(),
                message: format!("bad address {address}: {error}"),
            })?
            .connect_timeout(self.settings.deliver_timeout)
            .tcp_nodelay(true);
        let client = NodeClient::new(endpoint.connect_lazy());
        if self.clients.len() >= MAX_REMEMBERED_NODES {
            self.clients.clear();
        }
        self.clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// A client of a live node whose breaker lets a call through.
    async fn callable(&self, node: &str) -> Result<(NodeClient<Channel>, Arc<Breaker>), PeerError> {
        let breaker = self.breaker(node);
        let Some(address) = self.address(node).await? else {
            return Err(PeerError::Dead(node.to_owned()));
        };
        if !breaker.allow(Instant::now()) {
            return Err(PeerError::Open(node.to_owned()));
        }
        Ok((self.client(node, &address)?, breaker))
    }

    /// A call of the internal API: with the cluster's secret, and `deadline`.
    fn request<T>(&self, message: T, deadline: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        crate::telemetry::inject(request.metadata_mut());
        request
    }

    /// Calls `rpc` on `node` with `message`, within the deliver deadline and through the
    /// node's breaker.
    async fn call<T, R, F, Fut>(&self, node: &str, message: T, rpc: F) -> Result<R, PeerError>
    where
        F: FnOnce(NodeClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.call_within(node, message, self.settings.deliver_timeout, rpc)
            .await
    }

    /// [`Peers::call`] with its own deadline.
    async fn call_within<T, R, F, Fut>(
        &self,
        node: &str,
        message: T,
        deadline: Duration,
        rpc: F,
    ) -> Result<R, PeerError>
    where
        F: FnOnce(NodeClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let (client, breaker) = self.callable(node).await?;
        let request = self.request(message, deadline);
        let result = tokio::time::timeout(deadline, rpc(client, request)).await;
        // A node that sheds work (its delivery queues are full) is alive: not a failure.
        let alive = match &result {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => status.code() == tonic::Code::ResourceExhausted,
            Err(_elapsed) => false,
        };
        breaker.report(alive, Instant::now());
        let outcome = match result {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_elapsed) => Err(format!("no answer within {deadline:?}")),
        };
        outcome.map_err(|message| PeerError::Call {
            node: node.to_owned(),
            message,
        })
    }

    /// Calls Deliver on `node` (timed, when the call is made).
    pub async fn deliver(
        &self,
        node: &str,
        request: DeliverRequest,
    ) -> Result<DeliverResponse, PeerError> {
        let start = Instant::now();
        let result = self
            .call(node, request, |mut client, request| async move {
                client.deliver(request).await
            })
            .await;
        if !matches!(result, Err(PeerError::Dead(_) | PeerError::Open(_))) {
            let latency = match self.deliver_latency.get(node) {
                Some(latency) => latency.clone(),
                None => self
                    .deliver_latency
                    .entry(node.to_owned())
                    .or_insert_with(|| Arc::new(Histogram::new(&CALL_SECONDS)))
                    .clone(),
            };
            latency.observe_duration(start.elapsed());
        }
        result
    }

    /// Tells the node of `route` to close that connection of `token` with `code`.
    pub async fn takeover(
        &self,
        token: &str,
        route: &Route,
        code: CloseCode,
    ) -> Result<bool, PeerError> {
        let takeover = TakeoverRequest {
            token: token.to_owned(),
            connection_id: route.connection,
            close_code: u32::from(code.code()),
        };
        let response = self
            .call(&route.node, takeover, |mut client, request| async move {
                client.takeover(request).await
            })
            .await?;
        Ok(response.closed)
    }

    /// The nodes holding a lease now.
    async fn live_nodes(&self) -> Result<Vec<String>, StoreError> {
        let mut live = Vec::new();
        for node in self.membership.nodes().await? {
            match self.address(&node).await? {
                Some(_) => live.push(node),
                // Its lease is gone: it drained, or died and will not renew.
                None => self.membership.forget_node(&node).await?,
            }
        }
        Ok(live)
    }
}

/// A gateway's fan-out: the routed targets grouped by node (a target with no route is not
/// connected anywhere, and reads the message from the store), each node sent Deliver calls of
/// at most `cluster.deliver_batch` targets, all nodes in parallel (at most
/// [`DELIVER_CALLS_IN_FLIGHT`] calls in flight), each call under the deliver deadline and the
/// node's circuit breaker.
#[async_trait::async_trait]
impl Fanout for Peers {
    async fn deliver(
        &self,
        app: &str,
        message: &Arc<Message>,
        targets: Vec<RecordedTarget>,
    ) -> u32 {
        let mut by_node: HashMap<String, Vec<DeliverTarget>> = HashMap::new();
        for target in targets {
            let Some(route) = target.route else {
                continue;
            };
            by_node.entry(route.node).or_default().push(DeliverTarget {
                token: target.token,
                seq: target.seq,
            });
        }
        let stored = &message.to_stored();
        let batch = self.settings.deliver_batch;
        let calls = by_node.into_iter().flat_map(|(node, targets)| {
            batches(targets, batch).into_iter().map(move |targets| {
                let request = DeliverRequest {
                    message: Some(stored.clone()),
                    targets,
                    app: app.to_owned(),
                };
                let node = node.clone();
                async move {
                    match Peers::deliver(self, &node, request).await {
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

    /// A route is live while its node holds its lease.
    async fn is_live(&self, route: &Route) -> bool {
        matches!(self.address(&route.node).await, Ok(Some(_)))
    }

    /// One DeliverShared call to every live node, all at once (one call per node is
    /// bounded by the number of nodes; holding some back made their devices wait for the
    /// slowest of the others); each node hands the message to its own connections of the
    /// app.
    async fn deliver_shared(&self, app: &str, delivery: SharedDelivery) -> HandedOut {
        let nodes = match self.live_nodes().await {
            Ok(nodes) => nodes,
            Err(error) => {
                tracing::warn!(%error, "listing the nodes failed; devices read the stream when they connect");
                return HandedOut::default();
            }
        };
        let message = delivery.message.to_stored();
        let calls = nodes.into_iter().map(|node| {
            let request = DeliverSharedRequest {
                app: app.to_owned(),
                stream: delivery.stream.to_owned(),
                offset: delivery.offset,
                message: Some(message.clone()),
                epoch: delivery.epoch,
            };
            async move {
                // A node hands the entry to all of its connections of the app before it
                // answers: a few hundred milliseconds for a hundred thousand of them.
                let deadline = self.settings.deliver_timeout * SHARED_DEADLINE_FACTOR;
                let response = self
                    .call_within(&node, request, deadline, |mut client, request| async move {
                        client.deliver_shared(request).await
                    })
                    .await;
                match response {
                    Ok(response) => HandedOut {
                        live: response.live,
                        skipped: response.skipped,
                    },
                    Err(error) => {
                        tracing::warn!(%error, "shared deliver failed; its devices read the stream");
                        HandedOut::default()
                    }
                }
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .fold(HandedOut::default(), std::ops::Add::add)
    }

    /// A Takeover call to the node holding the connection.
    async fn close(&self, token: &str, route: &Route, code: CloseCode) {
        if let Err(error) = self.takeover(token, route, code).await {
            // Unreachable: the node is gone or going, and the connection with it.
            tracing::warn!(%error, node = %route.node, "closing a device's connection failed");
        }
    }

    /// One Retag call to each node holding some of the devices.
    async fn retag(&self, app: &str, devices: Vec<Retagged>) {
        let mut by_node: HashMap<String, Vec<WireTags>> = HashMap::new();
        for device in devices {
            let Some(route) = device.route else { continue };
            let tags = device
                .tags
                .tags
                .into_iter()
                .map(|tag| WireTag {
                    name: tag.name,
                    since: tag.since,
                })
                .collect();
            by_node.entry(route.node).or_default().push(WireTags {
                token: device.token,
                tags,
                version: device.tags.version,
            });
        }
        let calls = by_node.into_iter().map(|(node, devices)| {
            let request = RetagRequest {
                app: app.to_owned(),
                devices,
            };
            async move {
                let response = self
                    .call(&node, request, |mut client, request| async move {
                        client.retag(request).await
                    })
                    .await;
                if let Err(error) = response {
                    tracing::warn!(%error, node = %node, "telling a node of tag changes failed");
                }
            }
        });
        let calls: Vec<_> = calls.collect();
        futures_util::stream::iter(calls)
            .buffer_unordered(DELIVER_CALLS_IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
    }
}

/// A DeliverShared call's deadline, in deliver deadlines (`cluster.deliver_timeout`).
const SHARED_DEADLINE_FACTOR: u32 = 5;

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

    #[test]
    fn a_breaker_opens_after_consecutive_failures_and_recovers_through_one_trial() {
        let cooldown = Duration::from_secs(5);
        let breaker = Breaker::new(3, cooldown);
        let start = Instant::now();
        for _ in 0..2 {
            assert!(breaker.allow(start));
            breaker.report(false, start);
        }
        // A success resets the count.
        breaker.report(true, start);
        for _ in 0..3 {
            assert!(breaker.allow(start));
            breaker.report(false, start);
        }
        assert!(breaker.is_open());
        assert!(!breaker.allow(start + Duration::from_secs(1)));
        // After the cooldown one trial goes through, and only one.
        let later = start + cooldown;
        assert!(breaker.allow(later));
        assert!(!breaker.allow(later));
        // The trial fails: open again for another cooldown.
        breaker.report(false, later);
        assert!(!breaker.allow(later + Duration::from_secs(1)));
        let trial = later + cooldown;
        assert!(breaker.allow(trial));
        breaker.report(true, trial);
        assert!(!breaker.is_open());
        assert!(breaker.allow(trial));
    }

    #[test]
    fn a_trial_that_never_reports_does_not_hold_the_breaker_forever() {
        let cooldown = Duration::from_secs(5);
        let breaker = Breaker::new(1, cooldown);
        let start = Instant::now();
        breaker.report(false, start);
        assert!(breaker.allow(start + cooldown));
        assert!(!breaker.allow(start + cooldown + Duration::from_secs(1)));
        assert!(breaker.allow(start + cooldown * 2));
    }
}
