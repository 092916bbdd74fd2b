//! Scheduled pushes in Redis. Every key shares the hash tag `{sched}` (one slot of a Redis
//! Cluster), so each operation is one script; with `p` the key prefix and `m` a push's
//! `<app>:<message id>`:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `p:sq:{sched}` | sorted set | `m` scored by when it is due (a claimed one: when its claim lapses) |
//! | `p:sb:{sched}` | hash | `m` -> the push (`ScheduledPush`) |
//! | `p:sk:{sched}` | hash | `m` -> when it was claimed, while it is being fired |
//! | `p:sf:{sched}:m` | string | present while a fired push is remembered |
//!
//! A claim moves the push's score on by the lease, so if the gateway that claimed it dies
//! before it says "fired", another claims it once the lease lapses.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::{RedisStore, backend};
use crate::store::{Cancel, DueJob, Schedules, StoreError};

/// 1: scheduled; 0: the id is scheduled, being sent, or was sent (remembered) already.
static SCHEDULE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
",
    )
});

/// 1: cancelled; 2: fired or firing; 0: unknown.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local m = ARGV[1]
if redis.call('HEXISTS', KEYS[3], m) == 1 then return 2 end
if redis.call('ZREM', KEYS[1], m) == 1 then
  redis.call('HDEL', KEYS[2], m)
  return 1
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
return 0
",
    )
});

/// ARGV: now, when a claim lapses, how many at most. Answers m1, push1, m2, push2, ...
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], m)
  redis.call('HSET', KEYS[3], m, ARGV[1])
  out[#out + 1] = m
  out[#out + 1] = redis.call('HGET', KEYS[2], m) or ''
end
return out
",
    )
});

/// KEYS: the due set, the bodies, the claims, then per push its fired mark; ARGV: how long
/// to keep the marks (ms), then per push its member.
static FIRED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, #ARGV do
  local m = ARGV[i]
  redis.call('ZREM', KEYS[1], m)
  redis.call('HDEL', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
  redis.call('SET', KEYS[i + 2], '1', 'PX', ARGV[1])
end
return 1
",
    )
});

impl RedisStore {
    fn schedule_keys(&self) -> [String; 3] {
        let prefix = self.keys.prefix();
        [
            format!("{prefix}:sq:{{sched}}"),
            format!("{prefix}:sb:{{sched}}"),
            format!("{prefix}:sk:{{sched}}"),
        ]
    }

    fn fired_key(&self, member: &str) -> String {
        format!("{}:sf:{{sched}}:{member}", self.keys.prefix())
    }
}

#[async_trait]
impl Schedules for RedisStore {
    async fn schedule(
        &self,
        app: &str,
        id: &str,
        at_ms: u64,
        job: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let [due, bodies, _] = self.schedule_keys();
        let member = format!("{app}:{id}");
        let mut connection = self.connection.clone();
        let scheduled: i64 = SCHEDULE
            .key(due)
            .key(bodies)
            .key(self.fired_key(&member))
            .arg(member)
            .arg(at_ms)
            .arg(job)
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(scheduled == 1)
    }

    async fn cancel(&self, app: &str, id: &str) -> Result<Cancel, StoreError> {
        let [due, bodies, claimed] = self.schedule_keys();
        let member = format!("{app}:{id}");
        let mut connection = self.connection.clone();
        let answer: i64 = CANCEL
            .key(due)
            .key(bodies)
            .key(claimed)
            .key(self.fired_key(&member))
            .arg(member)
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(match answer {
            1 => Cancel::Cancelled,
            2 => Cancel::Fired,
            _ => Cancel::Unknown,
        })
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DueJob>, StoreError> {
        let [due, bodies, claimed] = self.schedule_keys();
        let mut connection = self.connection.clone();
        let answer: Vec<Vec<u8>> = CLAIM
            .key(due)
            .key(bodies)
            .key(claimed)
            .arg(now_ms)
            .arg(now_ms.saturating_add(lease.as_millis() as u64))
            .arg(limit)
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        let mut jobs = Vec::with_capacity(answer.len() / 2);
        let mut fields = answer.into_iter();
        while let (Some(member), Some(job)) = (fields.next(), fields.next()) {
            let member = String::from_utf8_lossy(&member);
            let Some((app, id)) = member.split_once(':') else {
                continue;
            };
            jobs.push(DueJob {
                app: app.to_owned(),
                id: id.to_owned(),
                job,
            });
        }
        Ok(jobs)
    }

    async fn fired(&self, pushes: &[(&str, &str)], keep_until_ms: u64) -> Result<(), StoreError> {
        if pushes.is_empty() {
            return Ok(());
        }
        let [due, bodies, claimed] = self.schedule_keys();
        let keep_ms = keep_until_ms
            .saturating_sub(crate::message::unix_millis())
            .max(1);
        let mut invocation = FIRED.prepare_invoke();
        invocation.key(due).key(bodies).key(claimed).arg(keep_ms);
        for (app, id) in pushes {
            let member = format!("{app}:{id}");
            invocation.key(self.fired_key(&member)).arg(member);
        }
        let mut connection = self.connection.clone();
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(())
    }
}
