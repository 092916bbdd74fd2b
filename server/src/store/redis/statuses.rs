//! Messages' statuses and receipt counts in Redis.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `p:ms:{app:<shard>}:id` | hash | `s`: the message's `MessageStatus` (absent while only counts arrived); `d`, `a`, `o`: delivered, acked and opened counts |
//! | `p:ms:{app:<shard>}:id:o` | set | the devices (tokens) that opened the message, so each counts once |
//!
//! The key lives as long as the longest retention it was written with. An app's statuses
//! are spread over [`SHARDS`] hash tags by their id, so that a node's flush adds the counts
//! of all the messages of one shard in one script call: a flush costs at most [`SHARDS`]
//! calls per app, however many messages and devices it sums, and Redis Cluster still spreads
//! an app's statuses over several slots.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use pigeon_proto::Message as _;
use pigeon_proto::store::MessageStatus;
use redis::Script;

use super::{RedisStore, backend, bounded};
use crate::message::unix_millis;
use crate::store::{ReceiptCount, StatusRecord, StatusWrite, Statuses, StoreError};

/// Hash tags an app's statuses are spread over.
const SHARDS: u64 = 32;
/// Messages whose counts one script call adds, at most.
const PER_CALL: usize = 256;

/// KEYS: per message, its hash and the set of devices that opened it. ARGV: milliseconds to
/// keep each key at least, then per message its status (empty: none), delivered, acked,
/// and how many tokens follow (devices that opened it), then those tokens.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local keep = tonumber(ARGV[1])
local j = 2
for i = 1, #KEYS, 2 do
  local key, opened = KEYS[i], KEYS[i + 1]
  local status, d, a, n = ARGV[j], ARGV[j + 1], ARGV[j + 2], tonumber(ARGV[j + 3])
  j = j + 4
  -- Only opened reports, for a message with no status: none of the app's.
  local skip = status == '' and d == '0' and a == '0' and redis.call('EXISTS', key) == 0
  if skip then
    j = j + n
    n = 0
  end
  if status ~= '' then redis.call('HSET', key, 's', status) end
  if d ~= '0' then redis.call('HINCRBY', key, 'd', d) end
  if a ~= '0' then redis.call('HINCRBY', key, 'a', a) end
  if n > 0 then
    local added = 0
    for t = j, j + n - 1 do added = added + redis.call('SADD', opened, ARGV[t]) end
    j = j + n
    if added > 0 then redis.call('HINCRBY', key, 'o', added) end
    if redis.call('PTTL', opened) < keep then redis.call('PEXPIRE', opened, keep) end
  end
  if not skip and redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
return 1
",
    )
});

/// One message's part of a [`PUT`]: its key, status (empty: none), delivered, acked, and
/// the devices that opened it.
type Row<'a> = (String, Vec<u8>, u64, u64, &'a [String]);

/// The shard of a message id (FNV-1a).
fn shard(id: &str) -> u64 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    hash % SHARDS
}

impl RedisStore {
    fn status_key(&self, app: &str, id: &str) -> String {
        format!("{}:ms:{{{app}:{}}}:{id}", self.keys.prefix(), shard(id))
    }

    /// Writes statuses and adds counts, for keys of one hash tag.
    async fn put(&self, rows: &[Row<'_>], keep_until_ms: u64) -> Result<(), StoreError> {
        let keep_ms = keep_until_ms.saturating_sub(unix_millis()).max(1);
        let mut invocation = PUT.prepare_invoke();
        invocation.arg(keep_ms);
        for (key, status, delivered, acked, opened_by) in rows {
            invocation
                .key(key)
                .key(format!("{key}:o"))
                .arg(status)
                .arg(delivered)
                .arg(acked)
                .arg(opened_by.len());
            for token in opened_by.iter() {
                invocation.arg(token);
            }
        }
        let mut connection = self.connection();
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl Statuses for RedisStore {
    async fn put_statuses(&self, statuses: Vec<StatusWrite>) -> Result<(), StoreError> {
        // One call per app and shard, in the order given within it (a message's statuses
        // are all in one shard); each kept as long as the longest of its call.
        let mut groups: HashMap<(&str, u64), (Vec<Row<'_>>, u64)> = HashMap::new();
        for write in &statuses {
            let key = self.status_key(&write.app, &write.id);
            let row = (key, write.status.encode_to_vec(), 0, 0, &[][..]);
            let (rows, until) = groups
                .entry((write.app.as_str(), shard(&write.id)))
                .or_default();
            rows.push(row);
            *until = (*until).max(write.keep_until_ms);
        }
        // A group's calls one after another (so its statuses land in order), the groups at
        // once.
        let puts = groups
            .values()
            .map(|(rows, until)| async move {
                for rows in rows.chunks(PER_CALL) {
                    self.put(rows, *until).await?;
                }
                Ok(())
            })
            .collect();
        bounded(puts).await.map(|_: Vec<()>| ())
    }

    async fn count_receipts(
        &self,
        counts: Vec<ReceiptCount>,
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        // One call per app and shard (and per PER_CALL messages).
        let mut groups: HashMap<(&str, u64), Vec<Row<'_>>> = HashMap::new();
        for count in &counts {
            let row = (
                self.status_key(&count.app, &count.id),
                Vec::new(),
                count.delivered,
                count.acked,
                count.opened_by.as_slice(),
            );
            groups
                .entry((count.app.as_str(), shard(&count.id)))
                .or_default()
                .push(row);
        }
        let puts = groups
            .values()
            .flat_map(|rows| rows.chunks(PER_CALL))
            .map(|rows| self.put(rows, keep_until_ms))
            .collect();
        bounded(puts).await.map(|_: Vec<()>| ())
    }

    async fn message_status(&self, app: &str, id: &str) -> Result<StatusRecord, StoreError> {
        let mut connection = self.connection();
        type Fields = (Option<Vec<u8>>, Option<u64>, Option<u64>, Option<u64>);
        let (status, delivered, acked, opened): Fields = redis::cmd("HMGET")
            .arg(self.status_key(app, id))
            .arg(&["s", "d", "a", "o"][..])
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        let status = status
            .filter(|status| !status.is_empty())
            .map(|status| MessageStatus::decode(status.as_slice()))
            .transpose()
            .map_err(|error| StoreError::Backend(error.to_string()))?;
        Ok(StatusRecord {
            status,
            delivered: delivered.unwrap_or(0),
            acked: acked.unwrap_or(0),
            opened: opened.unwrap_or(0),
        })
    }
}
