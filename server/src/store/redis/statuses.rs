//! Messages' statuses and receipt counts in Redis.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `p:ms:{app:<shard>}:id` | hash | `s`: the message's `MessageStatus` (absent while only counts arrived); `d`, `a`, `o`: delivered, acked and opened counts; `c`, `x`: how often it left a device's queue unread, collapsed or dropped by the cap |
//! | `p:ms:{app:<shard>}:id:o` | set | the devices (tokens) that opened the message, so each counts once |
//! | `p:rf:{app:<shard>}:<batch>:<call>` | string | a call of a node's batch of counts that was done: the batch given again after a failure adds nothing twice (10 minutes) |
//!
//! | `p:sd:{app}:<hour>:<batch>` | string | a batch of statistics added to that hour: given again after a failure it adds nothing twice (10 minutes) |
//! | `p:st:{app}:<hour>` | hash | the app's statistics of one hour (Unix seconds / 3600): field `<minute of the hour>:<class>:<count>` (class 0 notification, 1 realtime, 2 marketing; count 0 pushes, 1 targets, 2 delivered, 3 acked, 4 opened, 5 expiring: signed), kept for the retention after the hour |
//!
//! The key lives as long as the longest retention it was written with. An app's statuses
//! are spread over [`SHARDS`] hash tags by their id, so that a node's flush adds the counts
//! of all the messages of one shard in one script call: a flush costs at most [`SHARDS`]
//! calls per app, however many messages and devices it sums, and Redis Cluster still spreads
//! an app's statuses over several slots. One Redis server takes every shard in one call (a
//! batch of statuses, or a flush, is one call per [`PER_CALL`] messages).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use pigeon_proto::Message as _;
use pigeon_proto::store::MessageStatus;
use redis::Script;

use super::{RedisStore, backend, bounded};
use crate::message::Class;
use crate::message::unix_millis;
use crate::store::{
    NewlyOpened, ReceiptCount, StatsCounts, StatsRow, StatusRecord, StatusWrite, Statuses,
    StoreError,
};

/// Hash tags an app's statuses are spread over.
const SHARDS: u64 = 32;
/// Messages whose counts one script call adds, at most.
const PER_CALL: usize = 256;

/// KEYS: a key that marks the call done (when ARGV[2] is 1: a call whose key exists did its
/// work before, and does nothing), then per message its hash and the set of devices that
/// opened it. ARGV: milliseconds to keep each key at least, whether to mark the call done,
/// then per message its status (empty: none), delivered, acked, collapsed, dropped, and how
/// many tokens follow (devices that opened it), then those tokens. Returns, for each message that devices
/// opened for the first time and that has a status: how many devices, and its status.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local keep = tonumber(ARGV[1])
if ARGV[2] == '1' and not redis.call('SET', KEYS[1], '1', 'NX', 'PX', 600000) then
  return {}
end
local j = 3
local opened_now = {}
for i = 2, #KEYS, 2 do
  local key, opened = KEYS[i], KEYS[i + 1]
  local status, n = ARGV[j], tonumber(ARGV[j + 5])
  local counts = {d = ARGV[j + 1], a = ARGV[j + 2], c = ARGV[j + 3], x = ARGV[j + 4]}
  j = j + 6
  local counted = false
  for _, count in pairs(counts) do counted = counted or count ~= '0' end
  -- Only opened reports, for a message with no status: none of the app's.
  local skip = status == '' and not counted and redis.call('EXISTS', key) == 0
  if skip then
    j = j + n
    n = 0
  end
  if status ~= '' then redis.call('HSET', key, 's', status) end
  for field, count in pairs(counts) do
    if count ~= '0' then redis.call('HINCRBY', key, field, count) end
  end
  if n > 0 then
    local added = 0
    for t = j, j + n - 1 do added = added + redis.call('SADD', opened, ARGV[t]) end
    j = j + n
    if added > 0 then
      redis.call('HINCRBY', key, 'o', added)
      local kept = redis.call('HGET', key, 's')
      if kept and kept ~= '' then
        table.insert(opened_now, {added, kept})
      end
    end
    if redis.call('PTTL', opened) < keep then redis.call('PEXPIRE', opened, keep) end
  end
  if not skip and redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
return opened_now
",
    )
});

/// KEYS: a statistics hour's hash, and the key that marks the batch's call done; ARGV: the
/// hash's time to live (seconds), then field and count pairs. A call whose mark exists did
/// its work before, and does nothing.
static ADD_STATS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', 600000) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
",
    )
});

/// One message's part of a [`PUT`]: its key, status (empty: none), and counts (their app
/// and id are not read).
type Row<'a> = (String, Vec<u8>, &'a ReceiptCount);

/// No counts, for a row that writes a status.
static NO_COUNTS: LazyLock<ReceiptCount> = LazyLock::new(ReceiptCount::default);

/// The shard of a message id (FNV-1a).
fn shard(id: &str) -> u64 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    hash % SHARDS
}

impl RedisStore {
    /// The group of a message's status in a store's calls: its shard in a Redis Cluster
    /// (one slot per call); one Redis server takes keys of every shard in one call.
    fn call_group(&self, id: &str) -> u64 {
        match self.connection {
            super::RedisConnection::Single(_) => 0,
            super::RedisConnection::Cluster(_) => shard(id),
        }
    }

    fn status_key(&self, app: &str, id: &str) -> String {
        format!("{}:ms:{{{app}:{}}}:{id}", self.keys.prefix(), shard(id))
    }

    fn stats_key(&self, app: &str, hour: u64) -> String {
        format!("{}:st:{{{app}}}:{hour}", self.keys.prefix())
    }

    /// Writes statuses and adds counts, for keys of one hash tag; with `done` (a key of that
    /// tag), once: a call that finds it did its work before. Returns, for the messages
    /// devices opened for the first time, how many devices and the message's class.
    async fn put(
        &self,
        rows: &[Row<'_>],
        keep_until_ms: u64,
        done: Option<String>,
    ) -> Result<Vec<(u64, Class)>, StoreError> {
        let keep_ms = keep_until_ms.saturating_sub(unix_millis()).max(1);
        let mut invocation = PUT.prepare_invoke();
        let once = done.is_some();
        // Without a mark the first message's own key stands in (the key must be of the tag).
        let done = done.or_else(|| rows.first().map(|row| row.0.clone()));
        invocation.key(done.unwrap_or_default());
        invocation.arg(keep_ms).arg(if once { "1" } else { "0" });
        for (key, status, counts) in rows {
            invocation
                .key(key)
                .key(format!("{key}:o"))
                .arg(status)
                .arg(counts.delivered)
                .arg(counts.acked)
                .arg(counts.collapsed)
                .arg(counts.dropped)
                .arg(counts.opened_by.len());
            for token in &counts.opened_by {
                invocation.arg(token);
            }
        }
        let mut connection = self.connection();
        let opened: Vec<(u64, Vec<u8>)> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(opened
            .into_iter()
            .map(|(devices, status)| {
                let class = MessageStatus::decode(status.as_slice())
                    .ok()
                    .and_then(|status| Class::from_name(&status.class))
                    .unwrap_or_default();
                (devices, class)
            })
            .collect())
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
            let row = (key, write.status.encode_to_vec(), &*NO_COUNTS);
            let (rows, until) = groups
                .entry((write.app.as_str(), self.call_group(&write.id)))
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
                    self.put(rows, *until, None).await?;
                }
                Ok(())
            })
            .collect();
        bounded(puts).await.map(|_: Vec<()>| ())
    }

    async fn count_receipts(
        &self,
        counts: &[ReceiptCount],
        keep_until_ms: u64,
        flush: &str,
    ) -> Result<Vec<NewlyOpened>, StoreError> {
        // One call per app and shard (and per PER_CALL messages).
        let mut groups: HashMap<(&str, u64), Vec<Row<'_>>> = HashMap::new();
        for count in counts {
            let row = (self.status_key(&count.app, &count.id), Vec::new(), count);
            groups
                .entry((count.app.as_str(), self.call_group(&count.id)))
                .or_default()
                .push(row);
        }
        // Each call marked done under the batch's id, the group and the chunk: the same
        // counts given again group and chunk alike.
        let puts = groups
            .iter()
            .flat_map(|(&(app, shard), rows)| {
                rows.chunks(PER_CALL)
                    .enumerate()
                    .map(move |(chunk, rows)| (app, shard, chunk, rows))
            })
            .map(|(app, shard, chunk, rows)| async move {
                let prefix = self.keys.prefix();
                let done = format!("{prefix}:rf:{{{app}:{shard}}}:{flush}:{chunk}");
                let opened = self.put(rows, keep_until_ms, Some(done)).await?;
                Ok((app, opened))
            })
            .collect();
        let calls: Vec<(&str, Vec<(u64, Class)>)> = bounded(puts).await?;
        let mut opened: Vec<NewlyOpened> = Vec::new();
        for (app, rows) in calls {
            for (devices, class) in rows {
                NewlyOpened::add_to(&mut opened, app, class, devices);
            }
        }
        Ok(opened)
    }

    async fn add_stats(
        &self,
        rows: Vec<StatsRow>,
        retention: Duration,
        flush: &str,
    ) -> Result<(), StoreError> {
        // One call per app and hour: its counts, and the hour's retention; marked done under
        // the batch's name.
        let mut hours: HashMap<(&str, u64), Vec<&StatsRow>> = HashMap::new();
        for row in &rows {
            hours
                .entry((row.app.as_str(), row.minute / 60))
                .or_default()
                .push(row);
        }
        let now = unix_millis() / 1000;
        let adds = hours
            .into_iter()
            .map(|((app, hour), rows)| {
                let prefix = self.keys.prefix();
                let mut invocation = ADD_STATS.prepare_invoke();
                invocation
                    .key(self.stats_key(app, hour))
                    .key(format!("{prefix}:sd:{{{app}}}:{hour}:{flush}"));
                let until = (hour + 1) * 3600 + retention.as_secs();
                invocation.arg(until.saturating_sub(now).max(1));
                for row in rows {
                    let counts = row.counts.to_array().map(|count| count as i64);
                    let counts = counts.into_iter().chain([row.counts.expiring]);
                    for (index, count) in counts.enumerate() {
                        if count != 0 {
                            let field =
                                format!("{}:{}:{index}", row.minute % 60, row.class.to_stored());
                            invocation.arg(field).arg(count);
                        }
                    }
                }
                async move {
                    let _: i64 = invocation
                        .invoke_async(&mut self.connection())
                        .await
                        .map_err(backend)?;
                    Ok(())
                }
            })
            .collect();
        bounded(adds).await.map(|_: Vec<()>| ())
    }

    async fn stats(&self, app: &str, from: u64, to: u64) -> Result<Vec<StatsRow>, StoreError> {
        let reads = (from / 60..to.div_ceil(60))
            .map(|hour| {
                let key = self.stats_key(app, hour);
                async move {
                    let fields: HashMap<String, i64> = redis::cmd("HGETALL")
                        .arg(key)
                        .query_async(&mut self.connection())
                        .await
                        .map_err(backend)?;
                    Ok((hour, fields))
                }
            })
            .collect();
        let hours: Vec<(u64, HashMap<String, i64>)> = bounded(reads).await?;
        let mut rows: HashMap<(u64, u32), StatsCounts> = HashMap::new();
        for (hour, fields) in hours {
            for (field, count) in fields {
                let mut parts = field.split(':').map(str::parse::<u64>);
                let (Some(Ok(minute)), Some(Ok(class)), Some(Ok(index)), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let minute = hour * 60 + minute;
                if !(from..to).contains(&minute) || index > 5 {
                    continue;
                }
                let counts = rows.entry((minute, class as u32)).or_default();
                if index == 5 {
                    counts.expiring = count;
                    continue;
                }
                let mut array = counts.to_array();
                array[index as usize] = count.max(0) as u64;
                *counts = StatsCounts {
                    expiring: counts.expiring,
                    ..StatsCounts::from_array(array)
                };
            }
        }
        Ok(rows
            .into_iter()
            .map(|((minute, class), counts)| StatsRow {
                app: app.to_owned(),
                minute,
                class: Class::from_stored(class),
                counts,
            })
            .collect())
    }

    async fn message_status(&self, app: &str, id: &str) -> Result<StatusRecord, StoreError> {
        let mut connection = self.connection();
        type Count = Option<u64>;
        type Fields = (Option<Vec<u8>>, Count, Count, Count, Count, Count);
        let (status, delivered, acked, opened, collapsed, dropped): Fields = redis::cmd("HMGET")
            .arg(self.status_key(app, id))
            .arg(&["s", "d", "a", "o", "c", "x"][..])
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
            collapsed: collapsed.unwrap_or(0),
            dropped: dropped.unwrap_or(0),
        })
    }
}
