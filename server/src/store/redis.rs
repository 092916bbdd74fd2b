//! The Redis registry and offline store of cluster mode, for a single Redis or a Redis
//! Cluster. The key schema is in docs/cluster.md; in short, with `p` the key prefix:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `p:d:{token}` | hash | app, uid, seq (highest assigned), acked, node, conn, counters, tags (space-separated `name=since`), tagv (changes of the tags), alias, seen (when last admitted, ms) |
//! | `p:q:{token}` | sorted set | pending messages: score = seq, member = `StoredMessage` |
//! | `p:c:{token}` | hash | collapse key -> seq of its pending message |
//! | `p:m:{token}` | hash | message id -> seq, for pushes with an idempotency key |
//! | `p:u:{app:uid}` | set | the uid's device tokens |
//! | `p:t:{app:tag}` | sorted set | the tag's device tokens (all scored 0, so they page in token order) |
//! | `p:a:{app:alias}` | set | the alias's device tokens |
//! | `p:seen:{app}` | sorted set | the app's devices: score = when last admitted (ms, noted at most every sixteenth of `limits.device_inactivity`), member = token |
//! | `p:o:{app:uid}` | string | what the uid opted out of, one item a line |
//! | `p:f:{app:uid}:<window>` | string | capped (marketing) pushes the uid got in a window; expires with it |
//! | `p:fs:{app:uid}:<window>` | set | the capped pushes stored once (to all, tags) counted for the uid in a window; expires with it |
//! | `p:s:{app:stream}` | sorted set | a shared stream's entries: score = offset, member = `StoredMessage` |
//! | `p:sm:{app:stream}` | hash | the stream's epoch, head (highest offset) and trimmed mark; never expires |
//! | `p:sc:{app:stream}` | hash | collapse key -> offset of the stream's entry carrying it |
//! | `p:sx:{app:stream}` | hash | message id -> offset, for appends with an idempotency key |
//! | `p:i:{app:key}` | string | an idempotency key: `p:<message id>` while the push is being recorded, `d:<message id>` once it is |
//! | `p:n:<node id>` | string | a live node's gRPC address, with the node's lease as its TTL |
//! | `p:nodes` | set | the ids of the nodes (some may have lost their lease since) |
//! | `p:sq:{sched}` and others | | scheduled pushes: see [`schedules`] |
//! | `p:ms:{app:<shard>}:id` and `...:o` | hash, set | a message's status, receipt counts and the devices that opened it: see [`statuses`] |
//!
//! Everything about one token shares the hash tag `{token}`, so each per-device operation is
//! one Lua script on one slot: atomic on a single Redis and valid on a Redis Cluster. A push
//! to many devices is one script per device, run concurrently; the idempotency key makes a
//! retried push converge instead of duplicating (see [`RedisStore::record`]).
//!
//! The routes (`node`, `conn` in `p:d:{token}`) and the leases (`p:n:<node id>`) are cluster
//! membership's (`crate::cluster::membership`); the store only reads a device's route when
//! it records a push for it.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{StreamExt as _, TryStreamExt as _};
use pigeon_proto::Message as _;
use pigeon_proto::store::StoredMessage;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::caching::{CacheConfig, CacheMode};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, CommandCacheConfig, IntoConnectionInfo as _, Pipeline, ProtocolVersion, RedisFuture,
    Script, Value,
};

use crate::config::{ClusterSettings, Limits};
use crate::message::{Delivery, Message, new_device_token, unix_millis};
use crate::metrics::{CALL_SECONDS, Histogram};
use crate::store::{
    ALL, Accept, AcceptOutcome, AdmittedDevice, AliasSet, AppendOutcome, DeviceCounters,
    DeviceInfo, DeviceTag, DeviceTags, Displaced, DisplacedBy, OfflineStore, Once, Recorded,
    Registry, Replay, Retagged, Route, StoreError, StreamHead, StreamPlace, StreamRead, TagChange,
    TagChanged,
};

mod schedules;
mod statuses;

/// A connection to a single Redis or to a Redis Cluster. Both reconnect by themselves; a
/// command issued while Redis is unreachable fails within the configured timeout.
#[derive(Clone)]
pub enum RedisConnection {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// How long each call to Redis took (a command, a pipeline or a script: one round trip),
/// from every store of the process.
pub static CALL_LATENCY: Histogram = Histogram::new(&CALL_SECONDS);

/// `call`, timed into [`CALL_LATENCY`].
fn timed<'a, T: Send + 'a>(call: RedisFuture<'a, T>) -> RedisFuture<'a, T> {
    Box::pin(async move {
        let start = Instant::now();
        let result = call.await;
        CALL_LATENCY.observe_duration(start.elapsed());
        result
    })
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        timed(match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        timed(match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

impl RedisConnection {
    /// Connects as `settings` say. A single Redis is connected lazily (a node or gateway may
    /// start before Redis does); a Redis Cluster must answer now, to learn its slots.
    pub async fn open(settings: &ClusterSettings) -> Result<Self, StoreError> {
        Self::open_with(settings, None).await
    }

    /// A second connection as `settings` say, for the reads of [`cached`]: it keeps what they
    /// read, up to `cluster.registry_cache` keys, until Redis says a key changed
    /// (client-side caching: RESP3 and `CLIENT TRACKING`). Reconnected, it starts over
    /// empty. `None` when the setting is 0.
    pub async fn open_cached(settings: &ClusterSettings) -> Result<Option<Self>, StoreError> {
        let Some(entries) = NonZeroUsize::new(settings.registry_cache) else {
            return Ok(None);
        };
        let cache = CacheConfig::new()
            .set_mode(CacheMode::OptIn)
            .set_size(entries)
            .set_default_client_ttl(CACHE_TTL);
        let connection = Self::open_with(settings, Some(cache)).await?;
        let _ = CACHED.set(connection.clone());
        Ok(Some(connection))
    }

    async fn open_with(
        settings: &ClusterSettings,
        cache: Option<CacheConfig>,
    ) -> Result<Self, StoreError> {
        let timeout = settings.redis_timeout;
        if settings.redis_cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(settings.redis.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1);
            if let Some(cache) = cache {
                builder = builder
                    .use_protocol(ProtocolVersion::RESP3)
                    .cache_config(cache);
            }
            let client = builder.build().map_err(backend)?;
            let connection = client.get_async_connection().await.map_err(backend)?;
            Ok(RedisConnection::Cluster(connection))
        } else {
            let url = settings.redis.first().ok_or_else(|| {
                StoreError::Backend("cluster.redis names no Redis URL".to_owned())
            })?;
            let mut info = url.as_str().into_connection_info().map_err(backend)?;
            let mut config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            if let Some(cache) = cache {
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                info = info.set_redis_settings(resp3);
                config = config.set_cache_config(cache);
            }
            let client = redis::Client::open(info).map_err(backend)?;
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?;
            Ok(RedisConnection::Single(manager))
        }
    }
}

/// The longest a cached read is kept, in case an invalidation went astray.
const CACHE_TTL: Duration = Duration::from_secs(600);

/// The process's caching connection, for its counts in `/metrics`.
static CACHED: OnceLock<RedisConnection> = OnceLock::new();

/// What the process's caching connection ([`RedisConnection::open_cached`]) has done, in the
/// Prometheus text format; nothing without one.
pub fn render_cache(out: &mut String) {
    let statistics = CACHED.get().and_then(|connection| match connection {
        RedisConnection::Single(connection) => connection.get_cache_statistics(),
        RedisConnection::Cluster(connection) => connection.get_cache_statistics(),
    });
    let Some(statistics) = statistics else {
        return;
    };
    let _ = writeln!(
        out,
        "# HELP pigeon_registry_cache_total Reads of uids' devices, opt-outs and the list of \
         nodes through the registry's cache (cluster.registry_cache): answered from memory \
         (hit) or by Redis (miss); and keys dropped because Redis said they changed \
         (invalidated).\n\
         # TYPE pigeon_registry_cache_total counter\n\
         pigeon_registry_cache_total{{result=\"hit\"}} {}\n\
         pigeon_registry_cache_total{{result=\"miss\"}} {}\n\
         pigeon_registry_cache_total{{result=\"invalidated\"}} {}",
        statistics.hit, statistics.miss, statistics.invalidate,
    );
}

/// `command`, read through the cache of a connection from [`RedisConnection::open_cached`]
/// (on another connection, an ordinary read).
pub(crate) fn cached(mut command: Cmd) -> Cmd {
    command.set_cache_config(CommandCacheConfig::new());
    command
}

pub(crate) fn backend(error: redis::RedisError) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// The Redis key of each record; see the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix`.
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    /// The prefix of every key.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
    pub(crate) fn device(&self, token: &str) -> String {
        format!("{}:d:{{{token}}}", self.prefix)
    }
    fn queue(&self, token: &str) -> String {
        format!("{}:q:{{{token}}}", self.prefix)
    }
    fn collapse(&self, token: &str) -> String {
        format!("{}:c:{{{token}}}", self.prefix)
    }
    fn message_ids(&self, token: &str) -> String {
        format!("{}:m:{{{token}}}", self.prefix)
    }
    fn uid(&self, app: &str, uid: &str) -> String {
        format!("{}:u:{{{app}:{uid}}}", self.prefix)
    }
    fn stream_entries(&self, app: &str, stream: &str) -> String {
        format!("{}:s:{{{app}:{stream}}}", self.prefix)
    }
    fn stream_meta(&self, app: &str, stream: &str) -> String {
        format!("{}:sm:{{{app}:{stream}}}", self.prefix)
    }
    fn stream_collapse(&self, app: &str, stream: &str) -> String {
        format!("{}:sc:{{{app}:{stream}}}", self.prefix)
    }
    fn stream_ids(&self, app: &str, stream: &str) -> String {
        format!("{}:sx:{{{app}:{stream}}}", self.prefix)
    }
    fn tag(&self, app: &str, tag: &str) -> String {
        format!("{}:t:{{{app}:{tag}}}", self.prefix)
    }
    fn opt_out(&self, app: &str, uid: &str) -> String {
        format!("{}:o:{{{app}:{uid}}}", self.prefix)
    }
    fn capped(&self, app: &str, uid: &str, window: u64) -> String {
        format!("{}:f:{{{app}:{uid}}}:{window}", self.prefix)
    }
    fn capped_shared(&self, app: &str, uid: &str, window: u64) -> String {
        format!("{}:fs:{{{app}:{uid}}}:{window}", self.prefix)
    }
    fn alias(&self, app: &str, alias: &str) -> String {
        format!("{}:a:{{{app}:{alias}}}", self.prefix)
    }
    fn seen(&self, app: &str) -> String {
        format!("{}:seen:{{{app}}}", self.prefix)
    }
    fn idempotency(&self, app: &str, key: &str) -> String {
        format!("{}:i:{{{app}:{key}}}", self.prefix)
    }
    pub(crate) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    pub(crate) fn node(&self, node_id: &str) -> String {
        format!("{}:n:{node_id}", self.prefix)
    }
}

/// KEYS: the device's hash, queue, collapse keys and message ids; ARGV: the app. Deletes
/// them all if the device is the app's: 1, else 0.
static UNREGISTER: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'app') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
",
    )
});

/// Counts one more capped push in KEYS[1] unless it holds ARGV[1] already (the count
/// with it; 0: over the cap); the count lives as long as its window (ARGV[2] ms).
static COUNT_CAPPED: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
if n == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n + 1
",
    )
});

/// Counts the push stored once ARGV[3] in KEYS[1] (as [`COUNT_CAPPED`]) unless KEYS[2], the
/// set of those counted in the window, has it already, or the count is at the cap ARGV[1];
/// 1 when the count is at the cap now.
static COUNT_SHARED_CAPPED: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local cap = tonumber(ARGV[1])
if n < cap and redis.call('SADD', KEYS[2], ARGV[3]) == 1 then
  n = redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if n >= cap then return 1 end
return 0
",
    )
});

/// Whether `token` could be one this store issued. Anything else is unknown without a
/// lookup, and never reaches a key name.
fn plausible_token(token: &str) -> bool {
    (1..=64).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Records a message for one device. Returns `{seq, node, conn, displaced}`: seq 0 when
/// the token is no device of the app, -1 when a TTL-0 message finds the device offline (not
/// recorded); `displaced` the stored messages it put out of the queue, each as `c`
/// (collapsed) or `d` (dropped by the cap) and its body. With an idempotency window, a
/// message id already recorded for the device returns its first seq instead of a second
/// copy.
const ACCEPT: &str = r"
local device, queue, collapse, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local app, body, expires, collapse_key, message_id = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local idempotency_ms, store, cap = tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8])
if redis.call('HGET', device, 'app') ~= app then return {0, '', '0', {}} end
local route = redis.call('HMGET', device, 'node', 'conn')
local node, conn = route[1] or '', route[2] or '0'
if idempotency_ms > 0 then
  local seen = redis.call('HGET', ids, message_id)
  if seen then return {tonumber(seen), node, conn, {}} end
end
if not store and node == '' then return {-1, '', '0', {}} end
local seq = redis.call('HINCRBY', device, 'seq', 1)
local displaced = {}
if store then
  if collapse_key ~= '' then
    local older = redis.call('HGET', collapse, collapse_key)
    local replaced = older and redis.call('ZRANGE', queue, older, older, 'BYSCORE') or {}
    if #replaced > 0 then
      redis.call('ZREMRANGEBYSCORE', queue, older, older)
      redis.call('HINCRBY', device, 'collapsed', 1)
      table.insert(displaced, 'c')
      table.insert(displaced, replaced[1])
    end
    redis.call('HSET', collapse, collapse_key, seq)
  end
  redis.call('ZADD', queue, seq, body)
  local over = redis.call('ZCARD', queue) - cap
  if over > 0 then
    local popped = redis.call('ZPOPMIN', queue, over)
    for i = 1, #popped, 2 do
      table.insert(displaced, 'd')
      table.insert(displaced, popped[i])
    end
    redis.call('HINCRBY', device, 'dropped', over)
  end
  for _, key in ipairs({queue, collapse}) do
    local at = redis.call('PEXPIRETIME', key)
    if at == -1 or (at >= 0 and at < expires) then redis.call('PEXPIREAT', key, expires) end
  end
end
if idempotency_ms > 0 then
  redis.call('HSET', ids, message_id, seq)
  redis.call('PEXPIRE', ids, idempotency_ms)
end
return {seq, node, conn, displaced}
";

/// Resumes a known token of the app and uid. Returns `{seq, acked, all_epoch, all_acked,
/// tags, tag version, seen}` (`seen`: 1 when the admission was noted, at ARGV[3] ms, because
/// the last one noted is older than ARGV[4] ms; ARGV[4] empty: never noted), or nil when the
/// token is no device of that app and uid (its queue is never handed to anyone else).
const RESUME: &str = r"
local owner = redis.call('HMGET', KEYS[1], 'app', 'uid')
if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then return false end
local f = redis.call('HMGET', KEYS[1], 'seq', 'acked', 'all_epoch', 'all_acked', 'tags', 'tagv',
  'seen')
local seen = 0
if ARGV[4] ~= '' and tonumber(ARGV[3]) - tonumber(f[7] or '0') >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'seen', ARGV[3])
  seen = 1
end
return {f[1] or '0', f[2] or '0', f[3] or '0', f[4] or '0', f[5] or '', f[6] or '0', seen}
";

/// Creates a new device record, placed at the head of the app's stream `all` (ARGV[4], the
/// epoch, and ARGV[5], the head); 0 when the token is taken.
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'app', ARGV[1], 'uid', ARGV[2], 'seq', 0, 'acked', 0, 'created', ARGV[3],
  'all_epoch', ARGV[4], 'all_acked', ARGV[5], 'seen', ARGV[3])
return 1
";

/// A stream's meta, created with the epoch ARGV[1] if the stream has none: `{epoch, head,
/// trimmed}`.
const STREAM_META: &str = r"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'head', 0, 'trimmed', 0)
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'trimmed')
return {meta[1], meta[2] or '0', meta[3] or '0'}
";

/// Appends one entry to a stream (keys: meta, entries, collapse, ids). Returns `{offset,
/// epoch}`; a message id already appended (an idempotent retry) returns its first offset.
const APPEND: &str = r"
local meta, entries, collapse, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local body, expires, collapse_key, message_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local idempotency_ms, cap, new_epoch = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if redis.call('HSETNX', meta, 'epoch', new_epoch) == 1 then
  redis.call('HSET', meta, 'head', 0, 'trimmed', 0)
end
local epoch = redis.call('HGET', meta, 'epoch')
if idempotency_ms > 0 then
  local seen = redis.call('HGET', ids, message_id)
  if seen then return {tonumber(seen), epoch} end
end
local offset = redis.call('HINCRBY', meta, 'head', 1)
if idempotency_ms > 0 then
  redis.call('HSET', ids, message_id, offset)
  redis.call('PEXPIRE', ids, idempotency_ms)
end
if ARGV[8] ~= '1' then return {offset, epoch} end
if collapse_key ~= '' then
  local older = redis.call('HGET', collapse, collapse_key)
  if older then redis.call('ZREMRANGEBYSCORE', entries, older, older) end
  redis.call('HSET', collapse, collapse_key, offset)
end
redis.call('ZADD', entries, offset, body)
local over = redis.call('ZCARD', entries) - cap
if over > 0 then
  local dropped = redis.call('ZPOPMIN', entries, over)
  local last = tonumber(dropped[#dropped])
  if last > tonumber(redis.call('HGET', meta, 'trimmed') or '0') then
    redis.call('HSET', meta, 'trimmed', last)
  end
end
for _, key in ipairs({entries, collapse}) do
  local at = redis.call('PEXPIRETIME', key)
  if at == -1 or (at >= 0 and at < expires) then redis.call('PEXPIREAT', key, expires) end
end
return {offset, epoch}
";

/// Records a device's place in its app's stream `all`: ARGV[2] in the epoch ARGV[1], when
/// that is the device's epoch and ahead of its place. With ARGV[3] = '1', sets the place
/// whatever it was (a device moved to a new epoch of the stream).
const ACK_STREAM: &str = r"
if not redis.call('HGET', KEYS[1], 'app') then return 0 end
local place = redis.call('HMGET', KEYS[1], 'all_epoch', 'all_acked')
local offset = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'all_epoch', ARGV[1], 'all_acked', offset)
elseif place[1] == ARGV[1] and offset > tonumber(place[2] or '0') then
  redis.call('HSET', KEYS[1], 'all_acked', offset)
end
return 1
";

/// Records a cumulative ack and forgets the acknowledged messages. An ack above the highest
/// seq assigned counts up to that seq only.
const ACK: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seq = math.min(tonumber(ARGV[1]), tonumber(redis.call('HGET', KEYS[1], 'seq') or '0'))
if seq > tonumber(redis.call('HGET', KEYS[1], 'acked') or '0') then
  redis.call('HSET', KEYS[1], 'acked', seq)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', seq)
end
return 1
";

/// Replaces a device's tags with the names ARGV[2] (space-separated); a tag it had keeps
/// its `since`, a new one gets ARGV[3] (the head of the app's stream `all`). Returns
/// `{old tags, new tags, version, node, conn}`, or nil when it is no device of the app.
const SET_TAGS: &str = r"
if redis.call('HGET', KEYS[1], 'app') ~= ARGV[1] then return false end
local old = redis.call('HGET', KEYS[1], 'tags') or ''
local since = {}
for name, at in string.gmatch(old, '([^%s=]+)=(%d+)') do since[name] = at end
local tags = {}
for name in string.gmatch(ARGV[2], '%S+') do
  table.insert(tags, name .. '=' .. (since[name] or ARGV[3]))
end
local new = table.concat(tags, ' ')
redis.call('HSET', KEYS[1], 'tags', new)
local version = redis.call('HINCRBY', KEYS[1], 'tagv', 1)
local route = redis.call('HMGET', KEYS[1], 'node', 'conn')
return {old, new, version, route[1] or '', route[2] or '0'}
";

/// Adds (ARGV[3] = '1', since ARGV[5]) or takes off the tag ARGV[2] of a device. Returns
/// `{-1}` when it is no device of the app, `{2}` when the device has ARGV[4] tags already,
/// `{1}` when it had (or lacked) the tag already, and `{3, tags, version, node, conn}` when
/// its tags changed.
const CHANGE_TAG: &str = r"
if redis.call('HGET', KEYS[1], 'app') ~= ARGV[1] then return {-1} end
local tags, found = {}, false
for entry in string.gmatch(redis.call('HGET', KEYS[1], 'tags') or '', '%S+') do
  if string.match(entry, '^[^=]+') == ARGV[2] then found = true else table.insert(tags, entry) end
end
if ARGV[3] == '1' then
  if found then return {1} end
  if #tags >= tonumber(ARGV[4]) then return {2} end
  table.insert(tags, ARGV[2] .. '=' .. ARGV[5])
elseif not found then
  return {1}
end
local new = table.concat(tags, ' ')
redis.call('HSET', KEYS[1], 'tags', new)
local version = redis.call('HINCRBY', KEYS[1], 'tagv', 1)
local route = redis.call('HMGET', KEYS[1], 'node', 'conn')
return {3, new, version, route[1] or '', route[2] or '0'}
";

/// Sets (ARGV[2] non-empty) or clears a device's alias. Returns the old alias, or nil when
/// it is no device of the app.
const SET_ALIAS: &str = r"
if redis.call('HGET', KEYS[1], 'app') ~= ARGV[1] then return false end
local old = redis.call('HGET', KEYS[1], 'alias') or ''
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'alias') else redis.call('HSET', KEYS[1], 'alias', ARGV[2]) end
return old
";

struct Scripts {
    accept: Script,
    resume: Script,
    create: Script,
    ack: Script,
    set_tags: Script,
    change_tag: Script,
    set_alias: Script,
    stream_meta: Script,
    append: Script,
    ack_stream: Script,
}

/// The Redis registry and offline store.
pub struct RedisStore {
    connection: RedisConnection,
    /// Where uids' device lists and opt-outs are read: a connection that caches them
    /// ([`RedisConnection::open_cached`]), or `connection`.
    reads: RedisConnection,
    keys: Keys,
    cap: u32,
    stream_cap: u32,
    /// How old a device's last noted admission may be before an admission notes it again
    /// (`None`: devices never expire).
    seen_refresh: Option<u64>,
    scripts: Scripts,
}

impl RedisStore {
    /// A store over `connection`, keeping at most `limits.max_stored_per_device` messages per
    /// device and `limits.max_stored_per_stream` per shared stream.
    pub fn new(connection: RedisConnection, key_prefix: &str, limits: &Limits) -> Self {
        Self {
            reads: connection.clone(),
            connection,
            keys: Keys::new(key_prefix),
            cap: limits.max_stored_per_device,
            stream_cap: limits.max_stored_per_stream,
            seen_refresh: super::seen_refresh(limits),
            scripts: Scripts {
                accept: Script::new(ACCEPT),
                resume: Script::new(RESUME),
                create: Script::new(CREATE),
                ack: Script::new(ACK),
                set_tags: Script::new(SET_TAGS),
                change_tag: Script::new(CHANGE_TAG),
                set_alias: Script::new(SET_ALIAS),
                stream_meta: Script::new(STREAM_META),
                append: Script::new(APPEND),
                ack_stream: Script::new(ACK_STREAM),
            },
        }
    }

    /// Reads uids' device lists and opt-outs over `reads` ([`RedisConnection::open_cached`]).
    pub fn with_reads(mut self, reads: RedisConnection) -> Self {
        self.reads = reads;
        self
    }

    fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// Records a push ([`OfflineStore::record`]).
    ///
    /// With an idempotency key the key is claimed first (`p:<id>`), then every target is
    /// recorded, then the key is marked done (`d:<id>`). A retry that finds the key done is
    /// a duplicate; one that finds it still pending (the first attempt died midway, or is
    /// still running) records the push again under the first attempt's message id, and the
    /// per-device record of message ids makes each device get it once.
    async fn record_push(&self, accept: Accept) -> Result<AcceptOutcome, StoreError> {
        let mut message = accept.message;
        let mut idempotency_ms = 0u64;
        let mut claim = None;
        if let Some((key, until_ms)) = accept.once.as_ref().map(Once::as_key) {
            idempotency_ms = until_ms.saturating_sub(unix_millis()).max(1);
            let redis_key = self.keys.idempotency(&accept.app, &key);
            match self.claim(&redis_key, &message.id, idempotency_ms).await? {
                Claim::Done(first) => return Ok(AcceptOutcome::Duplicate { message_id: first }),
                Claim::Pending(first) => {
                    let mut again = (*message).clone();
                    again.id = first;
                    message = Arc::new(again);
                }
                Claim::New => {}
            }
            claim = Some(redis_key);
        }
        let body = message.to_stored().encode_to_vec();
        let recordings = accept.targets.iter().map(|target| {
            let mut invocation = self.scripts.accept.prepare_invoke();
            invocation
                .key(self.keys.device(&target.token))
                .key(self.keys.queue(&target.token))
                .key(self.keys.collapse(&target.token))
                .key(self.keys.message_ids(&target.token))
                .arg(&accept.app)
                .arg(body.as_slice())
                .arg(message.expires_at_ms)
                .arg(&message.collapse_key)
                .arg(&message.id)
                .arg(idempotency_ms)
                .arg(if target.store { "1" } else { "0" })
                .arg(self.cap);
            let mut connection = self.connection();
            let plausible = plausible_token(&target.token);
            async move {
                if !plausible {
                    return Ok((Recorded::Unknown, Vec::new()));
                }
                let (seq, node, conn, displaced): (i64, String, String, Vec<Vec<u8>>) = invocation
                    .invoke_async(&mut connection)
                    .await
                    .map_err(backend)?;
                let recorded = match seq {
                    0 => Recorded::Unknown,
                    seq if seq < 0 => Recorded::Dropped,
                    seq => Recorded::Seq {
                        seq: seq as u64,
                        route: route(node, &conn),
                    },
                };
                Ok::<_, StoreError>((recorded, displaced))
            }
        });
        let recorded: Vec<(Recorded, Vec<Vec<u8>>)> = bounded(recordings.collect()).await?;
        let mut displaced = Vec::new();
        let mut targets = Vec::with_capacity(recorded.len());
        for (target, (recorded, put_out)) in accept.targets.into_iter().zip(recorded) {
            targets.push((target.token, recorded));
            for pair in put_out.chunks_exact(2) {
                let by = match pair[0].as_slice() {
                    b"c" => DisplacedBy::Collapsed,
                    _ => DisplacedBy::Dropped,
                };
                // A body this store wrote; one that does not decode is not counted.
                if let Ok(stored) = StoredMessage::decode(pair[1].as_slice()) {
                    let message = Arc::new(Message::from_stored(stored));
                    displaced.push(Displaced { message, by });
                }
            }
        }
        if let Some(redis_key) = claim {
            self.finish_claim(&redis_key, &message.id).await?;
        }
        Ok(AcceptOutcome::Accepted {
            message,
            targets,
            displaced,
        })
    }
}

#[async_trait]
impl Registry for RedisStore {
    async fn admit_device(
        &self,
        app: &str,
        uid: &str,
        token: &str,
    ) -> Result<AdmittedDevice, StoreError> {
        let meta = self.meta(app, ALL).await?;
        let now = unix_millis();
        if plausible_token(token) {
            let resumed: Option<(u64, u64, u64, u64, String, u64, u8)> = self
                .scripts
                .resume
                .key(self.keys.device(token))
                .arg(app)
                .arg(uid)
                .arg(now)
                .arg(
                    self.seen_refresh
                        .map(|ms| ms.to_string())
                        .unwrap_or_default(),
                )
                .invoke_async(&mut self.connection())
                .await
                .map_err(backend)?;
            if let Some((highest_seq, acked_seq, epoch, acked, tags, version, seen)) = resumed {
                // Always bind: this repairs a binding lost half-way before.
                self.bind(app, uid, token).await?;
                if seen == 1 {
                    self.index_seen(app, token, now).await?;
                }
                if epoch != meta.epoch {
                    // The stream was recreated (its history lost): the device starts over
                    // in the new epoch, and its acks count there.
                    let _: i64 = self
                        .scripts
                        .ack_stream
                        .key(self.keys.device(token))
                        .arg(meta.epoch)
                        .arg(0)
                        .arg("1")
                        .invoke_async(&mut self.connection())
                        .await
                        .map_err(backend)?;
                }
                return Ok(AdmittedDevice {
                    token: token.to_owned(),
                    resumed: true,
                    acked_seq,
                    highest_seq,
                    all: meta.place(epoch, acked),
                    tags: parse_tags(&tags, version),
                });
            }
        }
        for _ in 0..4 {
            let token = new_device_token();
            let created: i64 = self
                .scripts
                .create
                .key(self.keys.device(&token))
                .arg(app)
                .arg(uid)
                .arg(now)
                .arg(meta.epoch)
                .arg(meta.head)
                .invoke_async(&mut self.connection())
                .await
                .map_err(backend)?;
            if created == 1 {
                self.bind(app, uid, &token).await?;
                if self.seen_refresh.is_some() {
                    self.index_seen(app, &token, now).await?;
                }
                return Ok(AdmittedDevice {
                    token,
                    resumed: false,
                    acked_seq: 0,
                    highest_seq: 0,
                    all: meta.place(meta.epoch, meta.head),
                    tags: DeviceTags::default(),
                });
            }
        }
        Err(StoreError::Backend(
            "could not issue a unique device token".to_owned(),
        ))
    }

    async fn tokens_for_uids(
        &self,
        app: &str,
        uids: &[String],
    ) -> Result<Vec<Vec<String>>, StoreError> {
        bounded(
            uids.iter()
                .map(|uid| {
                    let key = self.keys.uid(app, uid);
                    let mut connection = self.reads.clone();
                    async move {
                        cached(redis::cmd("SMEMBERS"))
                            .arg(key)
                            .query_async::<Vec<String>>(&mut connection)
                            .await
                            .map_err(backend)
                    }
                })
                .collect(),
        )
        .await
    }

    async fn set_opt_out(
        &self,
        app: &str,
        uid: &str,
        opt_out: &[String],
    ) -> Result<(), StoreError> {
        let key = self.keys.opt_out(app, uid);
        let mut connection = self.connection();
        let mut command = if opt_out.is_empty() {
            redis::cmd("DEL")
        } else {
            redis::cmd("SET")
        };
        command.arg(key);
        if !opt_out.is_empty() {
            command.arg(opt_out.join("\n"));
        }
        command
            .query_async::<()>(&mut connection)
            .await
            .map_err(backend)
    }

    async fn count_capped(
        &self,
        app: &str,
        uids: &[String],
        window: u64,
        window_ms: u64,
        cap: u32,
    ) -> Result<Vec<Option<u32>>, StoreError> {
        bounded(
            uids.iter()
                .map(|uid| {
                    let key = self.keys.capped(app, uid, window);
                    let mut connection = self.connection();
                    async move {
                        let counted: u32 = COUNT_CAPPED
                            .key(key)
                            .arg(cap)
                            .arg(window_ms)
                            .invoke_async(&mut connection)
                            .await
                            .map_err(backend)?;
                        Ok((counted > 0).then_some(counted))
                    }
                })
                .collect(),
        )
        .await
    }

    async fn count_shared_capped(
        &self,
        app: &str,
        got: &[(String, String)],
        window: u64,
        window_ms: u64,
        cap: u32,
    ) -> Result<Vec<bool>, StoreError> {
        bounded(
            got.iter()
                .map(|(uid, message)| {
                    let counts = self.keys.capped(app, uid, window);
                    let seen = self.keys.capped_shared(app, uid, window);
                    let mut connection = self.connection();
                    async move {
                        let reached: i64 = COUNT_SHARED_CAPPED
                            .key(counts)
                            .key(seen)
                            .arg(cap)
                            .arg(window_ms)
                            .arg(message)
                            .invoke_async(&mut connection)
                            .await
                            .map_err(backend)?;
                        Ok(reached == 1)
                    }
                })
                .collect(),
        )
        .await
    }

    async fn opt_outs(&self, app: &str, uids: &[String]) -> Result<Vec<Vec<String>>, StoreError> {
        bounded(
            uids.iter()
                .map(|uid| {
                    let key = self.keys.opt_out(app, uid);
                    let mut connection = self.reads.clone();
                    async move {
                        let text: Option<String> = cached(redis::cmd("GET"))
                            .arg(key)
                            .query_async(&mut connection)
                            .await
                            .map_err(backend)?;
                        Ok(text
                            .map(|text| text.lines().map(str::to_owned).collect())
                            .unwrap_or_default())
                    }
                })
                .collect(),
        )
        .await
    }

    async fn known_tokens(&self, app: &str, tokens: &[String]) -> Result<Vec<bool>, StoreError> {
        bounded(
            tokens
                .iter()
                .map(|token| {
                    let key = plausible_token(token).then(|| self.keys.device(token));
                    let mut connection = self.connection();
                    async move {
                        let Some(key) = key else { return Ok(false) };
                        let owner: Option<String> = redis::cmd("HGET")
                            .arg(key)
                            .arg("app")
                            .query_async(&mut connection)
                            .await
                            .map_err(backend)?;
                        Ok(owner.as_deref() == Some(app))
                    }
                })
                .collect(),
        )
        .await
    }

    async fn device(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>, StoreError> {
        if !plausible_token(token) {
            return Ok(None);
        }
        let fields: (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<u64>,
        ) = redis::cmd("HMGET")
            .arg(self.keys.device(token))
            .arg(&["app", "uid", "tags", "alias", "node", "conn", "tagv"])
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        let (owner, uid, tags, alias, node, conn, version) = fields;
        if owner.as_deref() != Some(app) {
            return Ok(None);
        }
        Ok(Some(DeviceInfo {
            uid: uid.unwrap_or_default(),
            alias: alias.unwrap_or_default(),
            tags: parse_tags(tags.as_deref().unwrap_or_default(), version.unwrap_or(0)),
            route: node.and_then(|node| route(node, conn.as_deref().unwrap_or("0"))),
        }))
    }

    async fn set_tags(
        &self,
        app: &str,
        token: &str,
        tags: &[String],
    ) -> Result<Option<Retagged>, StoreError> {
        if !plausible_token(token) {
            return Ok(None);
        }
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        let head = self.stream_head(app, ALL).await?.head;
        // The device's own list first: it is what delivery reads; the tags' indexes follow
        // (another slot each), and every tag the device has is added again, which repairs
        // an index an interrupted change left behind.
        let changed: Option<(String, String, u64, String, String)> = self
            .scripts
            .set_tags
            .key(self.keys.device(token))
            .arg(app)
            .arg(tags.join(" "))
            .arg(head)
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        let Some((old, new, version, node, conn)) = changed else {
            return Ok(None);
        };
        let removed = parse_tags(&old, 0)
            .tags
            .into_iter()
            .filter(|old| !tags.contains(&old.name))
            .map(|old| ("ZREM", self.keys.tag(app, &old.name)));
        let added = tags.iter().map(|tag| ("ZADD", self.keys.tag(app, tag)));
        bounded(
            removed
                .chain(added)
                .map(|(command, key)| self.index_command(command, key, token))
                .collect(),
        )
        .await?;
        Ok(Some(Retagged {
            token: token.to_owned(),
            tags: parse_tags(&new, version),
            route: route(node, &conn),
        }))
    }

    async fn change_tag(
        &self,
        app: &str,
        tag: &str,
        change: TagChange,
        max_tags: usize,
    ) -> Result<(TagChanged, Vec<Retagged>), StoreError> {
        let key = self.keys.tag(app, tag);
        let head = self.stream_head(app, ALL).await?.head;
        let targets = change
            .add
            .iter()
            .map(|token| (token, true))
            .chain(change.remove.iter().map(|token| (token, false)));
        let outcomes = bounded(
            targets
                .map(|(token, add)| {
                    let key = key.clone();
                    async move {
                        let outcome: Vec<Value> = if plausible_token(token) {
                            self.scripts
                                .change_tag
                                .key(self.keys.device(token))
                                .arg(app)
                                .arg(tag)
                                .arg(if add { "1" } else { "0" })
                                .arg(max_tags)
                                .arg(head)
                                .invoke_async(&mut self.connection())
                                .await
                                .map_err(backend)?
                        } else {
                            vec![Value::Int(-1)]
                        };
                        let code = match outcome.first() {
                            Some(Value::Int(code)) => *code,
                            _ => {
                                return Err(StoreError::Backend(
                                    "unexpected reply to a tag change".to_owned(),
                                ));
                            }
                        };
                        // A device that is no device any more leaves the index too: paging
                        // through a tag and removing each page empties it.
                        if code == 1 || code == 3 || (code == -1 && !add) {
                            let command = if add { "ZADD" } else { "ZREM" };
                            self.index_command(command, key, token).await?;
                        }
                        let retagged = if code == 3 {
                            let (_, new, version, node, conn): (i64, String, u64, String, String) =
                                redis::FromRedisValue::from_redis_value(Value::Array(outcome))
                                    .map_err(|error| StoreError::Backend(error.to_string()))?;
                            Some(Retagged {
                                token: token.clone(),
                                tags: parse_tags(&new, version),
                                route: route(node, &conn),
                            })
                        } else {
                            None
                        };
                        Ok((add, code, retagged))
                    }
                })
                .collect(),
        )
        .await?;
        let mut changed = TagChanged::default();
        let mut touched = Vec::new();
        for (add, code, retagged) in outcomes {
            match (add, code) {
                (_, -1) => changed.unknown += 1,
                (true, 2) => changed.over_limit += 1,
                (true, _) => changed.added += 1,
                (false, _) => changed.removed += 1,
            }
            touched.extend(retagged);
        }
        Ok((changed, touched))
    }

    async fn tag_devices(
        &self,
        app: &str,
        tag: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let start = if after.is_empty() {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        redis::cmd("ZRANGE")
            .arg(self.keys.tag(app, tag))
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)
    }

    async fn set_alias(
        &self,
        app: &str,
        token: &str,
        alias: Option<&str>,
        max_devices: usize,
    ) -> Result<AliasSet, StoreError> {
        if !plausible_token(token) {
            return Ok(AliasSet::UnknownDevice);
        }
        let alias = alias.unwrap_or_default();
        if !alias.is_empty() {
            let owner: Option<String> = redis::cmd("HGET")
                .arg(self.keys.device(token))
                .arg("app")
                .query_async(&mut self.connection())
                .await
                .map_err(backend)?;
            if owner.as_deref() != Some(app) {
                return Ok(AliasSet::UnknownDevice);
            }
            let (named, member): (usize, bool) = redis::pipe()
                .scard(self.keys.alias(app, alias))
                .sismember(self.keys.alias(app, alias), token)
                .query_async(&mut self.connection())
                .await
                .map_err(backend)?;
            if named >= max_devices && !member {
                return Ok(AliasSet::AliasFull);
            }
        }
        let old: Option<String> = self
            .scripts
            .set_alias
            .key(self.keys.device(token))
            .arg(app)
            .arg(alias)
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        let Some(old) = old else {
            return Ok(AliasSet::UnknownDevice);
        };
        if !old.is_empty() && old != alias {
            self.index_command("SREM", self.keys.alias(app, &old), token)
                .await?;
        }
        if !alias.is_empty() {
            self.index_command("SADD", self.keys.alias(app, alias), token)
                .await?;
        }
        Ok(AliasSet::Set)
    }

    async fn unregister(&self, app: &str, token: &str) -> Result<Option<DeviceInfo>, StoreError> {
        let Some(info) = self.device(app, token).await? else {
            // An index entry an interrupted unregister left behind goes too.
            self.index_command("ZREM", self.keys.seen(app), token)
                .await?;
            return Ok(None);
        };
        // The device's own keys first (one slot, one script): from then on the token is no
        // device. The indexes that name it (other slots) follow; one an interruption left
        // behind names a token that resolves to nothing.
        let deleted: i64 = UNREGISTER
            .key(self.keys.device(token))
            .key(self.keys.queue(token))
            .key(self.keys.collapse(token))
            .key(self.keys.message_ids(token))
            .arg(app)
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        if deleted == 0 {
            return Ok(None);
        }
        self.index_command("SREM", self.keys.uid(app, &info.uid), token)
            .await?;
        for tag in &info.tags.tags {
            self.index_command("ZREM", self.keys.tag(app, &tag.name), token)
                .await?;
        }
        if !info.alias.is_empty() {
            self.index_command("SREM", self.keys.alias(app, &info.alias), token)
                .await?;
        }
        self.index_command("ZREM", self.keys.seen(app), token)
            .await?;
        Ok(Some(info))
    }

    async fn inactive_devices(
        &self,
        app: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Option<Route>)>, StoreError> {
        let tokens: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.seen(app))
            .arg("-inf")
            .arg(format!("({before_ms}"))
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        let devices = tokens
            .into_iter()
            .map(|token| async move {
                let (node, conn): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(self.keys.device(&token))
                    .arg(&["node", "conn"])
                    .query_async(&mut self.connection())
                    .await
                    .map_err(backend)?;
                let route = node.and_then(|node| route(node, conn.as_deref().unwrap_or("0")));
                Ok((token, route))
            })
            .collect();
        bounded(devices).await
    }

    async fn touch_device(&self, app: &str, token: &str) -> Result<(), StoreError> {
        let Some(_) = self.device(app, token).await? else {
            return Ok(());
        };
        let now = unix_millis();
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.device(token))
            .arg("seen")
            .arg(now)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        self.index_seen(app, token, now).await
    }

    async fn tokens_for_aliases(
        &self,
        app: &str,
        aliases: &[String],
    ) -> Result<Vec<Vec<String>>, StoreError> {
        bounded(
            aliases
                .iter()
                .map(|alias| async move {
                    let named: Vec<String> = redis::cmd("SMEMBERS")
                        .arg(self.keys.alias(app, alias))
                        .query_async(&mut self.connection())
                        .await
                        .map_err(backend)?;
                    // The set is an index, written after the device's own field: a device
                    // that left the alias in an interrupted change is not named by it.
                    let mut tokens = Vec::with_capacity(named.len());
                    for token in named {
                        let own: Option<String> = redis::cmd("HGET")
                            .arg(self.keys.device(&token))
                            .arg("alias")
                            .query_async(&mut self.connection())
                            .await
                            .map_err(backend)?;
                        if own.as_deref() == Some(alias.as_str()) {
                            tokens.push(token);
                        }
                    }
                    Ok(tokens)
                })
                .collect(),
        )
        .await
    }
}

/// A stream's meta, as read from Redis.
struct Meta {
    epoch: u64,
    head: u64,
    trimmed: u64,
}

impl Meta {
    /// A device's place, from its record of it (`epoch`, `acked`).
    fn place(&self, epoch: u64, acked: u64) -> StreamPlace {
        let same_epoch = self.epoch == epoch;
        StreamPlace {
            epoch: self.epoch,
            acked: if same_epoch { acked.min(self.head) } else { 0 },
            head: self.head,
            trimmed: self.trimmed,
            epoch_changed: !same_epoch,
        }
    }
}

/// A new stream epoch: 63 random bits (Lua reads numbers as doubles, so it is kept in a
/// string), never 0.
fn new_epoch() -> u64 {
    (rand::random::<u64>() >> 1).max(1)
}

/// A device's tags from its record's `tags` field (`name=since`, space-separated) and its
/// `tagv`.
fn parse_tags(field: &str, version: u64) -> DeviceTags {
    let mut tags: Vec<DeviceTag> = field
        .split_whitespace()
        .filter_map(|entry| {
            let (name, since) = entry.split_once('=')?;
            Some(DeviceTag {
                name: name.to_owned(),
                since: since.parse().ok()?,
            })
        })
        .collect();
    tags.sort_by(|a, b| a.name.cmp(&b.name));
    DeviceTags { tags, version }
}

/// A device's route from its record's `node` and `conn` fields.
fn route(node: String, conn: &str) -> Option<Route> {
    (!node.is_empty()).then(|| Route {
        node,
        connection: conn.parse().unwrap_or(0),
    })
}

impl RedisStore {
    /// The meta of `app`'s `stream`, created with a new epoch if it has none.
    async fn meta(&self, app: &str, stream: &str) -> Result<Meta, StoreError> {
        let (epoch, head, trimmed): (u64, u64, u64) = self
            .scripts
            .stream_meta
            .key(self.keys.stream_meta(app, stream))
            .arg(new_epoch())
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(Meta {
            epoch,
            head,
            trimmed,
        })
    }

    /// Adds `token` to (`ZADD`, `SADD`) or takes it out of (`ZREM`, `SREM`) the index at
    /// `key`.
    async fn index_command(
        &self,
        command: &str,
        key: String,
        token: &str,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd(command);
        cmd.arg(key);
        if command == "ZADD" {
            cmd.arg(0);
        }
        let _: i64 = cmd
            .arg(token)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Notes in the app's index of devices by last admission that `token` was admitted at
    /// `now` ms.
    async fn index_seen(&self, app: &str, token: &str, now: u64) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZADD")
            .arg(self.keys.seen(app))
            .arg(now)
            .arg(token)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn bind(&self, app: &str, uid: &str, token: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("SADD")
            .arg(self.keys.uid(app, uid))
            .arg(token)
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl OfflineStore for RedisStore {
    async fn record(&self, accept: Accept) -> Result<AcceptOutcome, StoreError> {
        self.record_push(accept).await
    }

    async fn ack(&self, token: &str, seq: u64) -> Result<(), StoreError> {
        let _: i64 = self
            .scripts
            .ack
            .key(self.keys.device(token))
            .key(self.keys.queue(token))
            .arg(seq)
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn replay(&self, token: &str, after: u64, limit: u32) -> Result<Replay, StoreError> {
        self.read_range(&self.keys.queue(token), after, limit).await
    }

    async fn counters(&self, token: &str) -> Result<Option<DeviceCounters>, StoreError> {
        if !plausible_token(token) {
            return Ok(None);
        }
        let (exists, dropped, collapsed, pending): (bool, Option<u64>, Option<u64>, u64) =
            redis::pipe()
                .exists(self.keys.device(token))
                .hget(self.keys.device(token), "dropped")
                .hget(self.keys.device(token), "collapsed")
                .zcard(self.keys.queue(token))
                .query_async(&mut self.connection())
                .await
                .map_err(backend)?;
        Ok(exists.then(|| DeviceCounters {
            pending,
            dropped: dropped.unwrap_or(0),
            collapsed: collapsed.unwrap_or(0),
        }))
    }

    async fn append(
        &self,
        app: &str,
        stream: &str,
        message: Arc<Message>,
        once: Option<Once>,
    ) -> Result<AppendOutcome, StoreError> {
        // As `record`: the key claimed first (`p:<id>`), then the append, then marked done
        // (`d:<id>`); a retry that finds the claim pending appends under the first id, and
        // the stream's record of message ids makes that a no-op if the first got through.
        let mut message = message;
        let mut idempotency_ms = 0u64;
        let mut claim = None;
        if let Some((key, until_ms)) = once.as_ref().map(Once::as_key) {
            idempotency_ms = until_ms.saturating_sub(unix_millis()).max(1);
            let redis_key = self.keys.idempotency(app, &key);
            match self.claim(&redis_key, &message.id, idempotency_ms).await? {
                Claim::Done(first) => return Ok(AppendOutcome::Duplicate { message_id: first }),
                Claim::Pending(first) => {
                    let mut again = (*message).clone();
                    again.id = first;
                    message = Arc::new(again);
                }
                Claim::New => {}
            }
            claim = Some(redis_key);
        }
        let (offset, epoch): (u64, u64) = self
            .scripts
            .append
            .key(self.keys.stream_meta(app, stream))
            .key(self.keys.stream_entries(app, stream))
            .key(self.keys.stream_collapse(app, stream))
            .key(self.keys.stream_ids(app, stream))
            .arg(message.to_stored().encode_to_vec())
            .arg(message.expires_at_ms)
            .arg(&message.collapse_key)
            .arg(&message.id)
            .arg(idempotency_ms)
            .arg(self.stream_cap)
            .arg(new_epoch())
            .arg(if message.is_storable() { "1" } else { "0" })
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        if let Some(redis_key) = claim {
            self.finish_claim(&redis_key, &message.id).await?;
        }
        Ok(AppendOutcome::Appended {
            message,
            offset,
            epoch,
        })
    }

    async fn stream_head(&self, app: &str, stream: &str) -> Result<StreamHead, StoreError> {
        let (epoch, head): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys.stream_meta(app, stream))
            .arg("epoch")
            .arg("head")
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(StreamHead {
            epoch: epoch.unwrap_or(0),
            head: head.unwrap_or(0),
        })
    }

    async fn read_stream(
        &self,
        app: &str,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<StreamRead, StoreError> {
        let replay = self
            .read_range(&self.keys.stream_entries(app, stream), after, limit)
            .await?;
        Ok(StreamRead {
            entries: replay
                .deliveries
                .into_iter()
                .map(|delivery| (delivery.seq, delivery.message))
                .collect(),
            more: replay.more,
        })
    }

    async fn ack_stream(
        &self,
        token: &str,
        stream: &str,
        epoch: u64,
        offset: u64,
    ) -> Result<(), StoreError> {
        if stream != ALL || !plausible_token(token) {
            return Ok(());
        }
        let _: i64 = self
            .scripts
            .ack_stream
            .key(self.keys.device(token))
            .arg(epoch)
            .arg(offset)
            .arg("0")
            .invoke_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// What claiming an idempotency key found.
enum Claim {
    /// The key is new: claimed for this message.
    New,
    /// An earlier push with the key is under way, or died midway: its message id.
    Pending(String),
    /// An earlier push with the key was recorded: its message id.
    Done(String),
}

impl RedisStore {
    /// Up to `limit` unexpired members of the sorted set `key` (a device's queue, a
    /// stream's entries) scored above `after`, as deliveries with their score for a seq.
    /// Expired members are skipped and removed on the way; each page reads past them.
    async fn read_range(&self, key: &str, after: u64, limit: u32) -> Result<Replay, StoreError> {
        let now_ms = unix_millis();
        let mut replay = Replay::default();
        let mut cursor = after;
        loop {
            let wanted = u64::from(limit) - replay.deliveries.len() as u64;
            let rows: Vec<(Vec<u8>, u64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg(format!("({cursor}"))
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(wanted + 1)
                .query_async(&mut self.connection())
                .await
                .map_err(backend)?;
            let mut expired = Vec::new();
            let exhausted = rows.len() as u64 <= wanted;
            for (body, seq) in rows {
                if replay.deliveries.len() >= limit as usize {
                    replay.more = true;
                    break;
                }
                cursor = seq;
                let message = match StoredMessage::decode(body.as_slice()) {
                    Ok(stored) => Message::from_stored(stored),
                    Err(error) => {
                        tracing::error!(%error, seq, "undecodable stored message; skipped");
                        continue;
                    }
                };
                if message.is_expired(now_ms) {
                    expired.push(body);
                    continue;
                }
                replay.deliveries.push(Delivery {
                    seq,
                    message: Arc::new(message),
                });
            }
            if !expired.is_empty() {
                let _: i64 = redis::cmd("ZREM")
                    .arg(key)
                    .arg(expired)
                    .query_async(&mut self.connection())
                    .await
                    .map_err(backend)?;
            }
            if replay.more || exhausted || replay.deliveries.len() >= limit as usize {
                return Ok(replay);
            }
        }
    }

    /// Claims the idempotency key `redis_key` for `message_id` for `window_ms`.
    async fn claim(
        &self,
        redis_key: &str,
        message_id: &str,
        window_ms: u64,
    ) -> Result<Claim, StoreError> {
        let previous: Option<String> = redis::cmd("SET")
            .arg(redis_key)
            .arg(format!("p:{message_id}"))
            .arg("NX")
            .arg("PX")
            .arg(window_ms)
            .arg("GET")
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(
            match previous.as_deref().and_then(|value| value.split_once(':')) {
                None => Claim::New,
                Some(("d", first)) => Claim::Done(first.to_owned()),
                Some((_, first)) => Claim::Pending(first.to_owned()),
            },
        )
    }

    /// Marks a claimed idempotency key done: its push is fully recorded.
    async fn finish_claim(&self, redis_key: &str, message_id: &str) -> Result<(), StoreError> {
        let () = redis::cmd("SET")
            .arg(redis_key)
            .arg(format!("d:{message_id}"))
            .arg("XX")
            .arg("KEEPTTL")
            .query_async(&mut self.connection())
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Commands of one operation in flight at once, at most.
const IN_FLIGHT: usize = 512;

/// Runs `operations` (one per target of a push, say) with at most [`IN_FLIGHT`] in flight,
/// and collects their results in order; the first error ends it.
///
/// Each command's `cluster.redis_timeout` runs from when it is sent. With a large audience
/// all in flight at once, the last commands would wait behind the first ones past their
/// timeout: a push to 100,000 uids failed that way with all of them sent together.
async fn bounded<T, F>(operations: Vec<F>) -> Result<Vec<T>, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    futures_util::stream::iter(operations)
        .buffered(IN_FLIGHT)
        .try_collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_device_share_a_hash_tag() {
        let keys = Keys { prefix: "p".into() };
        for key in [
            keys.device("tok"),
            keys.queue("tok"),
            keys.collapse("tok"),
            keys.message_ids("tok"),
        ] {
            assert!(key.ends_with(":{tok}"), "{key}");
        }
        assert_eq!(keys.uid("app", "alice"), "p:u:{app:alice}");
    }

    #[test]
    fn only_plausible_tokens_become_keys() {
        assert!(plausible_token("Ab-_09"));
        assert!(!plausible_token(""));
        assert!(!plausible_token("a}b"));
        assert!(!plausible_token(&"a".repeat(65)));
    }
}
