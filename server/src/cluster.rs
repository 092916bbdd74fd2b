//! Cluster mode: connection nodes and gateways around Redis (docs/cluster.md).
//!
//! - [`node`]: `pigeon node`, the device listeners plus the internal gRPC API (Deliver,
//!   Takeover), its lease, and the routes of its devices.
//! - [`gateway`]: `pigeon gateway`, the push API over HTTP and gRPC, on the push pipeline
//!   with the nodes as its fan-out.
//! - [`membership`]: leases and routes in Redis: which nodes are alive, which node holds
//!   each device.
//! - [`peers`]: how a process calls the nodes (addresses, channels, circuit breakers), and
//!   the fan-out of a push to them.

use std::sync::Arc;

use crate::config::{AppSettings, Settings};
use crate::process::StartError;
use crate::rate_limit::{Buckets, RedisBuckets};
use crate::store::Store;
use crate::store::redis::{RedisConnection, RedisStore};
use membership::Membership;

pub mod gateway;
pub mod membership;
pub mod node;
pub mod peers;

/// The apps of a cluster process, which must be declared, as must the secret the processes
/// share.
fn declared_apps(settings: &Settings) -> Result<Vec<AppSettings>, StartError> {
    if settings.apps.is_empty() {
        return Err(StartError::NoApps);
    }
    if settings.cluster.secret.expose().is_empty() {
        return Err(StartError::NoClusterSecret);
    }
    Ok(settings.apps.clone())
}

/// Connects to Redis: the registry and store, cluster membership and the rate limits' buckets,
/// over one connection, and the reads of uids' devices, opt-outs and the list of nodes over a
/// second one that caches them (unless `cluster.registry_cache` is 0).
async fn open_redis(
    settings: &Settings,
) -> Result<(Arc<dyn Store>, Arc<Membership>, Arc<dyn Buckets>), StartError> {
    let cluster = &settings.cluster;
    let failed = |source| StartError::Redis {
        urls: cluster.redis.join(","),
        source,
    };
    let connection = RedisConnection::open(cluster).await.map_err(failed)?;
    let reads = RedisConnection::open_cached(cluster)
        .await
        .map_err(failed)?;
    let mut store = RedisStore::new(connection.clone(), &cluster.key_prefix, &settings.limits);
    let buckets = RedisBuckets::new(connection.clone(), &cluster.key_prefix);
    let mut membership = Membership::new(connection, &cluster.key_prefix);
    if let Some(reads) = reads {
        store = store.with_reads(reads.clone());
        membership = membership.with_reads(reads);
    }
    Ok((Arc::new(store), Arc::new(membership), Arc::new(buckets)))
}
