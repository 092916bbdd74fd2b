//! Cluster mode: connection nodes and gateways around a Redis registry (docs/cluster.md).
//!
//! - [`node`]: `pigeon node`, the device listeners plus the internal gRPC API (Deliver,
//!   Takeover), a lease in Redis, and the device routes it writes there.
//! - [`gateway`]: `pigeon gateway`, the push API over HTTP and gRPC: records each push in
//!   Redis, then fans it out to the nodes holding its devices.
//! - [`Peers`]: how one process reaches the nodes: their addresses (from their leases), one
//!   gRPC channel each, and a [`Breaker`] each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tonic::transport::{Channel, Endpoint};

use crate::config::{AppSettings, ClusterSettings, Settings};
use crate::grpc::cluster::node_client::NodeClient;
use crate::grpc::cluster::{DeliverRequest, DeliverResponse, TakeoverRequest};
use crate::store::StoreError;
use crate::store::redis::{RedisConnection, RedisStore, Route};

pub mod gateway;
pub mod node;

/// Why a node or gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Cluster mode serves only the apps its config declares.
    #[error("cluster mode needs its apps in the config ([[apps]]), the same on every process")]
    NoApps,
    /// Redis could not be reached or configured.
    #[error("cannot use Redis at {urls}: {source}")]
    Redis {
        /// The configured URLs.
        urls: String,
        /// Why.
        source: StoreError,
    },
    /// A listener or the certificate.
    #[error(transparent)]
    Listen(#[from] crate::standalone::StartError),
}

/// The apps of a cluster process, which must be declared.
fn declared_apps(settings: &Settings) -> Result<Vec<AppSettings>, StartError> {
    if settings.apps.is_empty() {
        return Err(StartError::NoApps);
    }
    Ok(settings.apps.clone())
}

/// Opens the Redis registry and store.
async fn open_store(settings: &Settings) -> Result<Arc<RedisStore>, StartError> {
    let cluster = &settings.cluster;
    let connection = RedisConnection::open(cluster)
        .await
        .map_err(|source| StartError::Redis {
            urls: cluster.redis.join(","),
            source,
        })?;
    Ok(Arc::new(RedisStore::new(
        connection,
        &cluster.key_prefix,
        settings.limits.max_stored_per_device,
    )))
}

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

    /// Whether calls are being skipped.
    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(*self.state(), BreakerState::Closed { .. })
    }
}

/// How long a node's address, read from its lease, is reused before it is read again.
const ADDRESS_TTL: Duration = Duration::from_secs(1);
/// Past this many remembered nodes (ids change at every node start), forget them all.
const MAX_REMEMBERED_NODES: usize = 4096;

/// The nodes of the cluster, as one process calls them.
pub struct Peers {
    store: Arc<RedisStore>,
    settings: ClusterSettings,
    addresses: DashMap<String, (Option<String>, Instant)>,
    clients: DashMap<String, NodeClient<Channel>>,
    breakers: DashMap<String, Arc<Breaker>>,
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
    /// The peers known through `store`.
    pub fn new(store: Arc<RedisStore>, settings: ClusterSettings) -> Self {
        Self {
            store,
            settings,
            addresses: DashMap::new(),
            clients: DashMap::new(),
            breakers: DashMap::new(),
        }
    }

    /// The node's breaker.
    pub fn breaker(&self, node: &str) -> Arc<Breaker> {
        if let Some(breaker) = self.breakers.get(node) {
            return breaker.clone();
        }
        if self.breakers.len() >= MAX_REMEMBERED_NODES {
            self.breakers.clear();
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
        let address = self.store.node_address(node).await?;
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

    /// Calls Deliver on `node`, within the deliver deadline and through its breaker.
    pub async fn deliver(
        &self,
        node: &str,
        request: DeliverRequest,
    ) -> Result<DeliverResponse, PeerError> {
        let (mut client, breaker) = self.callable(node).await?;
        let deadline = self.settings.deliver_timeout;
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline);
        let result = tokio::time::timeout(deadline, client.deliver(request)).await;
        let outcome = match result {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_elapsed) => Err(format!("no answer within {deadline:?}")),
        };
        breaker.report(outcome.is_ok(), Instant::now());
        outcome.map_err(|message| PeerError::Call {
            node: node.to_owned(),
            message,
        })
    }

    /// Tells the node of `route` to close that connection of `token`.
    pub async fn takeover(&self, token: &str, route: &Route) -> Result<bool, PeerError> {
        let (mut client, breaker) = self.callable(&route.node).await?;
        let deadline = self.settings.deliver_timeout;
        let mut request = tonic::Request::new(TakeoverRequest {
            token: token.to_owned(),
            connection_id: route.connection,
        });
        request.set_timeout(deadline);
        let result = tokio::time::timeout(deadline, client.takeover(request)).await;
        let outcome = match result {
            Ok(Ok(response)) => Ok(response.into_inner().closed),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_elapsed) => Err(format!("no answer within {deadline:?}")),
        };
        breaker.report(outcome.is_ok(), Instant::now());
        outcome.map_err(|message| PeerError::Call {
            node: route.node.clone(),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
