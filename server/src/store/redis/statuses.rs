//! Messages' statuses and receipt counts in Redis.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `p:ms:{app:id}` | hash | `s`: the message's `MessageStatus` (absent while only counts arrived); `d`, `a`: delivered and acked counts |
//!
//! The key lives as long as the longest retention it was written with. A node's counts of
//! one message are one script call per flush, however many devices they sum.

use std::sync::LazyLock;

use async_trait::async_trait;
use pigeon_proto::Message as _;
use pigeon_proto::store::MessageStatus;
use redis::Script;

use super::{RedisStore, backend, bounded};
use crate::message::unix_millis;
use crate::store::{ReceiptCount, StatusRecord, Statuses, StoreError};

/// ARGV: the status (empty: none), delivered, acked, milliseconds to keep the key at least.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 's', ARGV[1]) end
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[1], 'd', ARGV[2]) end
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 'a', ARGV[3]) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
",
    )
});

impl RedisStore {
    fn status_key(&self, app: &str, id: &str) -> String {
        format!("{}:ms:{{{app}:{id}}}", self.keys.prefix())
    }

    async fn put(
        &self,
        key: String,
        status: Vec<u8>,
        (delivered, acked): (u64, u64),
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        let keep_ms = keep_until_ms.saturating_sub(unix_millis()).max(1);
        let mut connection = self.connection();
        let _: i64 = PUT
            .key(key)
            .arg(status)
            .arg(delivered)
            .arg(acked)
            .arg(keep_ms)
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl Statuses for RedisStore {
    async fn put_status(
        &self,
        app: &str,
        id: &str,
        status: MessageStatus,
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        let key = self.status_key(app, id);
        self.put(key, status.encode_to_vec(), (0, 0), keep_until_ms)
            .await
    }

    async fn count_receipts(
        &self,
        counts: Vec<ReceiptCount>,
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        let puts = counts
            .iter()
            .map(|count| {
                let key = self.status_key(&count.app, &count.id);
                self.put(
                    key,
                    Vec::new(),
                    (count.delivered, count.acked),
                    keep_until_ms,
                )
            })
            .collect();
        bounded(puts).await.map(|_: Vec<()>| ())
    }

    async fn message_status(&self, app: &str, id: &str) -> Result<StatusRecord, StoreError> {
        let mut connection = self.connection();
        let (status, delivered, acked): (Option<Vec<u8>>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(self.status_key(app, id))
                .arg(&["s", "d", "a"][..])
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
        })
    }
}
