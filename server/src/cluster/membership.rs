//! Cluster membership in Redis: which nodes are alive (their leases) and which node holds
//! each device's connection (its route). Key schema: docs/cluster.md.
//!
//! - A node takes `p:n:<node id>` = its gRPC address with a TTL of `cluster.lease`, renews
//!   it every third of the lease, and deletes it when it drains. A node whose lease is gone
//!   is dead: its routes count as offline. The node ids are listed in `p:nodes` too (a
//!   gateway sends each push to every device of an app to each of them); ids whose lease
//!   is gone are taken off the list when a gateway finds them so.
//! - A device's route is `node` and `conn` in its record `p:d:{token}`, written when it
//!   connects (the previous route comes back, so an older connection elsewhere can be closed)
//!   and removed when that connection ends, unless a newer one replaced it. The offline
//!   store reads the route atomically with recording a push.

use std::time::Duration;

use redis::Script;

use crate::store::redis::{Keys, RedisConnection, backend, cached};
use crate::store::{Route, StoreError};

/// Routes a device to this node's connection. Returns the previous `{node, conn}`, or nil
/// when the device is unknown.
const ONLINE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local old = redis.call('HMGET', KEYS[1], 'node', 'conn')
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'conn', ARGV[2])
return {old[1] or '', old[2] or '0'}
";

/// Removes the device's route, if it is still this node's connection.
const OFFLINE: &str = r"
local route = redis.call('HMGET', KEYS[1], 'node', 'conn')
if route[1] == ARGV[1] and route[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'node', 'conn')
  return 1
end
return 0
";

/// Leases and routes.
pub struct Membership {
    connection: RedisConnection,
    /// Where the list of nodes is read: a connection that caches it
    /// ([`RedisConnection::open_cached`]), or `connection`.
    reads: RedisConnection,
    keys: Keys,
    online: Script,
    offline: Script,
}

impl Membership {
    /// Membership over `connection`, with every key under `key_prefix`.
    pub fn new(connection: RedisConnection, key_prefix: &str) -> Self {
        Self {
            reads: connection.clone(),
            connection,
            keys: Keys::new(key_prefix),
            online: Script::new(ONLINE),
            offline: Script::new(OFFLINE),
        }
    }

    /// Reads the list of nodes over `reads` ([`RedisConnection::open_cached`]).
    pub fn with_reads(mut self, reads: RedisConnection) -> Self {
        self.reads = reads;
        self
    }

    fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// Runs one of the route scripts on the device's record.
    async fn route_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        token: &str,
        node: &str,
        connection: u64,
    ) -> Result<T, StoreError> {
        script
            .key(self.keys.device(token))
            .arg(node)
            .arg(connection)
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)
    }

    /// Routes the device to `node`'s connection `connection`; returns where it was routed
    /// before (None: nowhere, or the device is unknown).
    pub async fn route_online(
        &self,
        token: &str,
        node: &str,
        connection: u64,
    ) -> Result<Option<Route>, StoreError> {
        let previous: Option<(String, String)> = self
            .route_script(&self.online, token, node, connection)
            .await?;
        Ok(previous.and_then(|(node, conn)| {
            (!node.is_empty()).then(|| Route {
                node,
                connection: conn.parse().unwrap_or(0),
            })
        }))
    }

    /// Removes the device's route if it still points at `node`'s `connection`.
    pub async fn route_offline(
        &self,
        token: &str,
        node: &str,
        connection: u64,
    ) -> Result<(), StoreError> {
        let _removed: i64 = self
            .route_script(&self.offline, token, node, connection)
            .await?;
        Ok(())
    }

    /// Renews (or takes) `node_id`'s lease, advertising `address`, and lists the node among
    /// the cluster's nodes. Returns false when the lease had lapsed (or Redis lost it).
    pub async fn renew_lease(
        &self,
        node_id: &str,
        address: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let previous: Option<String> = redis::cmd("SET")
            .arg(self.keys.node(node_id))
            .arg(address)
            .arg("PX")
            .arg(lease.as_millis() as u64)
            .arg("GET")
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        let _: i64 = redis::cmd("SADD")
            .arg(self.keys.nodes())
            .arg(node_id)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(previous.is_some())
    }

    /// The ids of the nodes listed in the cluster (some may have lost their lease since).
    pub async fn nodes(&self) -> Result<Vec<String>, StoreError> {
        cached(redis::cmd("SMEMBERS"))
            .arg(self.keys.nodes())
            .query_async(&mut self.reads.clone())
            .await
            .map_err(backend)
    }

    /// Takes a node whose lease is gone off the list.
    pub async fn forget_node(&self, node_id: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("SREM")
            .arg(self.keys.nodes())
            .arg(node_id)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Gives up `node_id`'s lease (a draining node).
    pub async fn drop_lease(&self, node_id: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.keys.node(node_id))
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// The gRPC address of `node_id`, if its lease is live.
    pub async fn node_address(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        redis::cmd("GET")
            .arg(self.keys.node(node_id))
            .query_async(&mut self.connection())
            .await
            .map_err(backend)
    }
}
