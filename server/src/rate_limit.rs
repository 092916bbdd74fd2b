//! Per-app rate limits (`[apps.rate_limits]`, docs/api.md), by the generic cell rate
//! algorithm (GCRA): each limit is one number, the time its bucket is paid up to (`tat`,
//! the theoretical arrival time). A request finds room when the bucket is paid up to no
//! later than `burst - interval` from now, and then moves it `cost x interval` on. A request
//! larger than the burst still passes when the bucket has room for one unit, and the
//! requests after it wait its debt off: over any long window the rate holds.
//!
//! A push is charged in every limit that applies to it (its app's `total` and its class's),
//! one unit of `pushes_per_second` and its targets of `targets_per_second`, all or nothing.
//! A push to `all` or to tags does not know its targets before its fan-out: it needs room
//! for one, and is charged the devices it reached once it has reached them.
//!
//! Where the buckets live: in the process (standalone), or in Redis, one key per bucket
//! moved by one script that reads Redis's clock, so that every gateway of a cluster shares
//! each limit exactly (an app's buckets share a hash tag: one slot of a Redis Cluster).
//! Each gateway also keeps, by its own clock, a floor under each bucket: what its own pushes
//! took (a take Redis refuses is given back), raised to what each answer of Redis shows the
//! bucket owes. A push that finds no room over that floor finds none in Redis either, and
//! is refused without asking it: a sender flooding past its limit makes each gateway ask
//! Redis about once per unit of the limit's rate, however hard it floods. The floor reads
//! the gateway's clock where Redis reads its own, a round trip to Redis apart at most: the
//! limits are exact to within that. If Redis cannot be asked, the push is let through when
//! the floor has room: the store it is about to be recorded in is then failing too, and each
//! gateway still holds the limit for what it takes.
//!
//! A gateway whose pushes take a limit's units quickly leases some ahead: with a take, it
//! asks Redis for up to [`LEASE`] of the limit's rate more, granted only as far as the
//! burst has room, and spends them on its next pushes without asking. What it asks for
//! doubles each time a lease is spent before it lapses and halves each time one lapses
//! unspent, so a gateway asks Redis about once per lease, and a gateway with few pushes
//! leases nothing. Leased units are taken from the shared bucket when granted, so a limit
//! is never exceeded by them; what a lease holds when it lapses ([`LAPSE`] after) is given
//! back to the bucket with the gateway's next take of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;

use crate::config::{AppSettings, Rate};
use crate::log_throttle::Throttle;
use crate::push::Class;
use crate::store::StoreError;
use crate::store::redis::{RedisConnection, backend};

/// One limit a push is charged in: a bucket, its rate, and what the push costs in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    /// The bucket: `<app>:<total or class>:<pushes or targets>`.
    pub bucket: String,
    /// The emission interval, in µs: a second over the rate.
    pub interval_us: u64,
    /// The burst, in µs.
    pub burst_us: u64,
    /// Units taken.
    pub cost: u64,
}

/// Where the buckets live.
#[async_trait]
pub trait Buckets: Send + Sync + 'static {
    /// Takes every charge if each bucket has room (all or nothing); otherwise answers how
    /// long until they would have, and the bucket that is full. With `force`, takes them
    /// whatever the room (a debt paid after the fact).
    async fn take(&self, charges: &[Charge], force: bool) -> Result<Option<Limited>, StoreError>;
}

/// A push over a limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// The limit that is full, as its config key: `total.targets_per_second`.
    pub limit: String,
    /// When to try again.
    pub retry_after: Duration,
}

/// The GCRA step of one bucket paid up to `tat` (µs), at `now` (µs): its new `tat`, or how
/// long until it has room.
fn step(tat: u64, now: u64, charge: &Charge, force: bool) -> Result<u64, u64> {
    let paid_to = tat.max(now);
    let needed = paid_to - now + charge.interval_us;
    if !force && needed > charge.burst_us {
        return Err(needed - charge.burst_us);
    }
    Ok(paid_to.saturating_add(charge.cost.saturating_mul(charge.interval_us)))
}

/// Buckets in this process (standalone mode). One bucket per app, class and unit that the
/// config names: bounded by the config.
pub struct LocalBuckets {
    epoch: Instant,
    tats: Mutex<HashMap<String, u64>>,
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalBuckets {
    /// Takes every charge if each bucket has room, as [`Buckets::take`] does.
    fn take_now(&self, charges: &[Charge], force: bool) -> Result<Option<Limited>, StoreError> {
        let now = self.now();
        let mut tats = self.tats.lock().map_err(|_| StoreError::Closed)?;
        Ok(take_all(charges, force, now, |bucket| {
            tats.get(bucket).copied().unwrap_or(0)
        })
        .map(|moved| {
            for (charge, tat) in charges.iter().zip(moved) {
                tats.insert(charge.bucket.clone(), tat);
            }
        })
        .err())
    }

    /// Now on the buckets' clock, in µs.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Raises each charge's bucket to be paid up to `at + owed` at least (µs on the buckets'
    /// clock; `owed` per charge, in order).
    fn raise(&self, charges: &[Charge], at: u64, owed: &[u64]) {
        let Ok(mut tats) = self.tats.lock() else {
            return;
        };
        for (charge, owed) in charges.iter().zip(owed) {
            let floor = at.saturating_add(*owed);
            match tats.get_mut(&charge.bucket) {
                Some(tat) => *tat = (*tat).max(floor),
                None => {
                    tats.insert(charge.bucket.clone(), floor);
                }
            }
        }
    }

    /// Gives back what a take of `charges` took. The bucket is then paid up to the later of
    /// where it was and the take's time, which leaves it the same room from then on.
    fn give_back(&self, charges: &[Charge]) {
        let Ok(mut tats) = self.tats.lock() else {
            return;
        };
        for charge in charges {
            if let Some(tat) = tats.get_mut(&charge.bucket) {
                *tat = tat.saturating_sub(charge.cost.saturating_mul(charge.interval_us));
            }
        }
    }
}

#[async_trait]
impl Buckets for LocalBuckets {
    async fn take(&self, charges: &[Charge], force: bool) -> Result<Option<Limited>, StoreError> {
        self.take_now(charges, force)
    }
}

/// The all-or-nothing step of several buckets: their new `tat`s, or the longest wait.
fn take_all(
    charges: &[Charge],
    force: bool,
    now: u64,
    tat_of: impl Fn(&str) -> u64,
) -> Result<Vec<u64>, Limited> {
    let mut moved = Vec::with_capacity(charges.len());
    let mut full: Option<(u64, &Charge)> = None;
    for charge in charges {
        match step(tat_of(&charge.bucket), now, charge, force) {
            Ok(tat) => moved.push(tat),
            Err(wait) => {
                if full.is_none_or(|(longest, _)| wait > longest) {
                    full = Some((wait, charge));
                }
            }
        }
    }
    match full {
        None => Ok(moved),
        Some((wait, charge)) => Err(Limited {
            limit: limit_name(&charge.bucket),
            retry_after: Duration::from_micros(wait),
        }),
    }
}

/// `total.targets_per_second` for the bucket `app:total:targets`.
fn limit_name(bucket: &str) -> String {
    let mut parts = bucket.rsplitn(3, ':');
    let unit = parts.next().unwrap_or_default();
    let scope = parts.next().unwrap_or_default();
    format!("{scope}.{unit}_per_second")
}

/// The GCRA step of [`step`] and [`take_all`], in Redis: KEYS are the buckets; ARGV[1] is
/// `1` to force, then cost, interval, burst (µs), units to lease and leased units given
/// back (first, whatever the answer) per bucket. Answers 0, or the wait in µs and the index
/// (from 1) of the fullest bucket; then what each bucket owes once answered (µs it is paid
/// up to past now); when taken, then the units leased from each bucket: as many as asked
/// for that each find room in the burst after the take.
const TAKE: &str = r"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local force = ARGV[1] == '1'
local moved, owed, leased, wait, fullest = {}, {}, {}, 0, 0
for i, key in ipairs(KEYS) do
  local cost, interval, burst = tonumber(ARGV[i * 5 - 3]), tonumber(ARGV[i * 5 - 2]), tonumber(ARGV[i * 5 - 1])
  local tat, given = tonumber(redis.call('GET', key) or '0'), tonumber(ARGV[i * 5 + 1])
  if given > 0 and tat > now then
    tat = math.max(tat - given * interval, now)
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  local paid_to = math.max(tat, now)
  local needed = paid_to - now + interval
  if not force and needed > burst then
    if needed - burst > wait then wait, fullest = needed - burst, i end
  end
  moved[i], owed[i] = paid_to + cost * interval, paid_to - now
end
if wait > 0 then return {wait, fullest, unpack(owed)} end
for i, key in ipairs(KEYS) do
  local interval, burst, lease = tonumber(ARGV[i * 5 - 2]), tonumber(ARGV[i * 5 - 1]), tonumber(ARGV[i * 5])
  local room = now + burst - interval - moved[i]
  leased[i] = 0
  if room >= 0 then leased[i] = math.min(lease, math.floor(room / interval) + 1) end
  moved[i] = moved[i] + leased[i] * interval
  local ttl = math.ceil((moved[i] - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.0f', moved[i]), 'PX', ttl)
  owed[i] = moved[i] - now
end
local answer = {0, 0, unpack(owed)}
for i = 1, #leased do answer[#answer + 1] = leased[i] end
return answer
";

/// How much of a limit's rate a gateway may hold leased.
pub const LEASE: Duration = Duration::from_millis(10);

/// How long leased units may wait to be spent.
pub const LAPSE: Duration = Duration::from_millis(50);

/// Units of one bucket this gateway took from Redis ahead of its pushes.
#[derive(Default)]
struct Lease {
    /// Not spent yet.
    units: u64,
    /// When they lapse, in µs on the floor's clock.
    until: u64,
    /// How many to ask for with the next take.
    ask: u64,
    /// Asked for in takes not answered yet.
    asked: u64,
    /// Lapsed unspent, to give back with the next take.
    lapsed: u64,
}

/// What a take through Redis asks of one bucket beside its cost.
#[derive(Clone, Copy, Default)]
struct Ask {
    /// Units to lease.
    lease: u64,
    /// Units to give back.
    give: u64,
}

/// What a take through Redis answered.
struct Answer {
    limited: Option<Limited>,
    /// What each bucket owes (µs past Redis's now), leased units included.
    owed: Vec<u64>,
    /// Units leased from each bucket (none when refused).
    leased: Vec<u64>,
}

/// Buckets in Redis (cluster mode), shared by every gateway, and the floor this gateway
/// keeps under them.
pub struct RedisBuckets {
    connection: RedisConnection,
    prefix: String,
    script: Script,
    /// A floor under each bucket: this gateway's takes that Redis did not refuse, raised to
    /// what Redis's answers show. A bucket full here is full there.
    floor: LocalBuckets,
    /// Units leased ahead, by bucket: bounded as the floor is, by the config.
    leases: Mutex<HashMap<String, Lease>>,
}

impl RedisBuckets {
    /// Buckets under the key prefix `prefix`.
    pub fn new(connection: RedisConnection, prefix: &str) -> Self {
        Self {
            connection,
            prefix: prefix.to_owned(),
            script: Script::new(TAKE),
            floor: LocalBuckets::default(),
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// `p:r:{app}:<scope>:<unit>`: an app's buckets share a hash tag.
    fn key(&self, bucket: &str) -> String {
        let (app, rest) = bucket.split_once(':').unwrap_or((bucket, ""));
        format!("{}:r:{{{app}}}:{rest}", self.prefix)
    }
}

#[async_trait]
impl Buckets for RedisBuckets {
    async fn take(&self, charges: &[Charge], force: bool) -> Result<Option<Limited>, StoreError> {
        if let Some(limited) = self.floor.take_now(charges, force)? {
            return Ok(Some(limited));
        }
        // Read before asking: Redis reads its clock later, so each bucket is paid up to
        // `asked + owed` at least.
        let asked = self.floor.now();
        let asks = match force {
            true => vec![Ask::default(); charges.len()],
            false => match self.spend_lease(charges, asked)? {
                Some(asks) => asks,
                None => return Ok(None),
            },
        };
        let answer = self.take_in_redis(charges, force, &asks).await;
        let leased = answer.as_ref().map_or(&[][..], |answer| &answer.leased);
        self.settle_leases(charges, &asks, (answer.is_ok(), leased), asked);
        let answer = answer?;
        if answer.limited.is_some() {
            self.floor.give_back(charges);
        }
        // The floor takes leased units as they are spent: raised to what is owed before them.
        let owed: Vec<u64> = charges
            .iter()
            .zip(&answer.owed)
            .zip(answer.leased.iter().chain(std::iter::repeat(&0)))
            .map(|((charge, owed), leased)| {
                owed.saturating_sub(leased.saturating_mul(charge.interval_us))
            })
            .collect();
        self.floor.raise(charges, asked, &owed);
        Ok(answer.limited)
    }
}

impl RedisBuckets {
    /// Spends leased units on `charges` when every bucket has enough (answers `None`);
    /// otherwise how many units to lease from each bucket with the take Redis is asked for
    /// (what this gateway holds and has asked for stays within a lease's time of the rate).
    fn spend_lease(&self, charges: &[Charge], now: u64) -> Result<Option<Vec<Ask>>, StoreError> {
        let mut leases = self.leases.lock().map_err(|_| StoreError::Closed)?;
        let enough = charges.iter().all(|charge| {
            leases
                .get(&charge.bucket)
                .is_some_and(|lease| lease.until > now && lease.units >= charge.cost)
        });
        if enough {
            for charge in charges {
                if let Some(lease) = leases.get_mut(&charge.bucket) {
                    lease.units -= charge.cost;
                }
            }
            return Ok(None);
        }
        let asks = charges
            .iter()
            .map(|charge| {
                let most = LEASE.as_micros() as u64 / charge.interval_us.max(1);
                let Some(lease) = leases.get_mut(&charge.bucket) else {
                    if most > 0 {
                        leases.insert(charge.bucket.clone(), Lease::default());
                    }
                    return Ask::default();
                };
                if lease.until > now {
                    // Spent (or nearly) in time: ask for more.
                    lease.ask = lease.ask.saturating_mul(2).clamp(1, most.max(1));
                } else {
                    if lease.units > 0 {
                        // Lapsed unspent: ask for less, and give them back.
                        lease.ask /= 2;
                    }
                    lease.lapsed += std::mem::take(&mut lease.units);
                }
                let ask = lease
                    .ask
                    .min(most.saturating_sub(lease.units + lease.asked));
                lease.asked += ask;
                // Given back by this take alone (another at once gives back none of them).
                Ask {
                    lease: ask,
                    give: std::mem::take(&mut lease.lapsed),
                }
            })
            .collect();
        Ok(Some(asks))
    }

    /// Settles what a take asked (`asks`) once Redis `answered` (or could not be asked):
    /// keeps the units it leased until [`LAPSE`] after `asked`; those it was to give back
    /// are given with the next take if Redis could not be asked.
    fn settle_leases(
        &self,
        charges: &[Charge],
        asks: &[Ask],
        (answered, leased): (bool, &[u64]),
        asked: u64,
    ) {
        let Ok(mut leases) = self.leases.lock() else {
            return;
        };
        let leased = leased.iter().chain(std::iter::repeat(&0));
        for ((charge, ask), leased) in charges.iter().zip(asks).zip(leased) {
            if let Some(lease) = leases.get_mut(&charge.bucket) {
                lease.asked = lease.asked.saturating_sub(ask.lease);
                if !answered {
                    lease.lapsed += ask.give;
                }
                if *leased > 0 || lease.until <= asked {
                    lease.units += leased;
                    lease.until = asked + LAPSE.as_micros() as u64;
                }
            }
        }
    }

    /// [`Buckets::take`] by the script, in Redis, leasing and giving back what `asks` says
    /// of each bucket.
    async fn take_in_redis(
        &self,
        charges: &[Charge],
        force: bool,
        asks: &[Ask],
    ) -> Result<Answer, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(if force { "1" } else { "0" });
        for (charge, ask) in charges.iter().zip(asks) {
            invocation
                .key(self.key(&charge.bucket))
                .arg(charge.cost)
                .arg(charge.interval_us)
                .arg(charge.burst_us)
                .arg(ask.lease)
                .arg(ask.give);
        }
        let mut connection = self.connection.clone();
        let answer: Vec<u64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        let malformed = || StoreError::Backend("rate limit script: a malformed answer".into());
        let [wait, fullest, rest @ ..] = answer.as_slice() else {
            return Err(malformed());
        };
        if *wait == 0 {
            if rest.len() != 2 * charges.len() {
                return Err(malformed());
            }
            let (owed, leased) = rest.split_at(charges.len());
            return Ok(Answer {
                limited: None,
                owed: owed.to_vec(),
                leased: leased.to_vec(),
            });
        }
        if rest.len() != charges.len() {
            return Err(malformed());
        }
        let charge = charges
            .get((*fullest as usize).saturating_sub(1))
            .ok_or_else(|| StoreError::Backend("rate limit script: no such bucket".into()))?;
        let limited = Limited {
            limit: limit_name(&charge.bucket),
            retry_after: Duration::from_micros(*wait),
        };
        Ok(Answer {
            limited: Some(limited),
            owed: rest.to_vec(),
            leased: Vec::new(),
        })
    }
}

/// The limits of every app, over its buckets.
pub struct RateLimiter {
    apps: HashMap<String, crate::config::RateLimits>,
    buckets: Arc<dyn Buckets>,
}

impl RateLimiter {
    /// The limits `apps` configure, kept in `buckets`.
    pub fn new(apps: &[AppSettings], buckets: Arc<dyn Buckets>) -> Self {
        Self {
            apps: apps
                .iter()
                .map(|app| (app.id.clone(), app.rate_limits.clone()))
                .collect(),
            buckets,
        }
    }

    /// No limits at all.
    pub fn unlimited() -> Self {
        Self::new(&[], Arc::new(LocalBuckets::default()))
    }

    /// The charges of a push of `class` by `app` costing `pushes` requests and `targets`
    /// targets; none when its app sets no limit.
    fn charges(&self, app: &str, class: Class, pushes: u64, targets: u64) -> Vec<Charge> {
        let Some(limits) = self.apps.get(app) else {
            return Vec::new();
        };
        let class_limit = match class {
            Class::Realtime => &limits.realtime,
            Class::Notification => &limits.notification,
            Class::Marketing => &limits.marketing,
        };
        let mut charges = Vec::new();
        for (scope, rate) in [("total", &limits.total), (class.name(), class_limit)] {
            let Some(rate) = rate else { continue };
            for (unit, per_second, cost) in [
                ("pushes", rate.pushes_per_second, pushes),
                ("targets", rate.targets_per_second, targets),
            ] {
                if let Some(per_second) = per_second
                    && cost > 0
                {
                    charges.push(charge(app, scope, unit, per_second, rate, cost));
                }
            }
        }
        charges
    }

    /// Takes one push of `targets` targets from `app`'s limits for `class`, or answers the
    /// limit that is full. A push with no known targets yet (to `all`, to tags) needs room
    /// for one, and pays the rest with [`RateLimiter::charge_targets`].
    pub async fn admit(&self, app: &str, class: Class, targets: u64) -> Result<(), Limited> {
        let charges = self.charges(app, class, 1, targets.max(1));
        self.take(&charges, false).await
    }

    /// Charges `app`'s target limits for `class` the targets a push reached beyond the one
    /// [`RateLimiter::admit`] took: the pushes after it wait its debt off.
    pub async fn charge_targets(&self, app: &str, class: Class, targets: u64) {
        let charges = self.charges(app, class, 0, targets.saturating_sub(1));
        let _ = self.take(&charges, true).await;
    }

    async fn take(&self, charges: &[Charge], force: bool) -> Result<(), Limited> {
        if charges.is_empty() {
            return Ok(());
        }
        match self.buckets.take(charges, force).await {
            Ok(None) => Ok(()),
            Ok(Some(limited)) => Err(limited),
            Err(error) => {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "rate limits unavailable; letting pushes through");
                }
                Ok(())
            }
        }
    }
}

fn charge(app: &str, scope: &str, unit: &str, per_second: f64, rate: &Rate, cost: u64) -> Charge {
    let interval_us = (1e6 / per_second).max(1.0) as u64;
    Charge {
        bucket: format!("{app}:{scope}:{unit}"),
        interval_us,
        burst_us: ((rate.burst_seconds * 1e6) as u64).max(interval_us),
        cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(interval_us: u64, burst_us: u64, cost: u64) -> Charge {
        Charge {
            bucket: "demo:total:pushes".into(),
            interval_us,
            burst_us,
            cost,
        }
    }

    /// 10 a second with a burst of one second: ten at once, then one every 100 ms.
    #[test]
    fn a_burst_then_the_rate() {
        let charge = every(100_000, 1_000_000, 1);
        let mut tat = 0;
        for _ in 0..10 {
            tat = step(tat, 0, &charge, false).expect("room in the burst");
        }
        assert_eq!(step(tat, 0, &charge, false), Err(100_000));
        assert_eq!(step(tat, 99_999, &charge, false), Err(1));
        assert!(step(tat, 100_000, &charge, false).is_ok());
    }

    /// A request larger than the burst passes when there is room for one unit; the next
    /// waits its debt off.
    #[test]
    fn a_large_request_runs_into_debt() {
        let charge = every(1_000, 1_000_000, 5_000);
        let tat = step(0, 0, &charge, false).expect("room for one");
        assert_eq!(tat, 5_000_000);
        let one = every(1_000, 1_000_000, 1);
        assert_eq!(step(tat, 0, &one, false), Err(4_001_000));
        assert!(step(tat, 4_001_000, &one, false).is_ok());
        // Forced: taken whatever the room.
        assert_eq!(step(tat, 0, &one, true), Ok(5_001_000));
    }

    /// All or nothing: one full bucket takes from none, and names itself.
    #[test]
    fn every_bucket_or_none() {
        let room = every(1_000, 1_000_000, 1);
        let mut full = every(1_000, 1_000_000, 1);
        full.bucket = "demo:marketing:targets".into();
        let tats: HashMap<&str, u64> = [("demo:marketing:targets", 2_000_000)].into();
        let outcome = take_all(&[room, full], false, 0, |bucket| {
            tats.get(bucket).copied().unwrap_or(0)
        });
        assert_eq!(
            outcome,
            Err(Limited {
                limit: "marketing.targets_per_second".into(),
                retry_after: Duration::from_micros(1_001_000),
            })
        );
    }

    /// A take given back leaves the bucket the room it had; a raised bucket has none until
    /// it is paid off.
    #[test]
    fn a_take_given_back_and_a_bucket_raised() {
        let buckets = LocalBuckets::default();
        let one = [every(1_000_000, 1_000_000, 1)];
        let take = || buckets.take_now(&one, false).expect("lock");
        assert_eq!(take(), None);
        assert!(take().is_some(), "one a second");
        buckets.give_back(&one);
        assert_eq!(take(), None, "its room back");
        buckets.give_back(&one);
        buckets.raise(&one, buckets.now(), &[5_000_000]);
        let limited = take().expect("owes 5 s");
        assert!(limited.retry_after > Duration::from_secs(4), "{limited:?}");
    }

    #[tokio::test]
    async fn a_limiter_charges_total_and_class() {
        let mut app = AppSettings::new("demo", "k", "s");
        app.rate_limits.total = Some(Rate {
            pushes_per_second: Some(100.0),
            targets_per_second: None,
            burst_seconds: 1.0,
        });
        app.rate_limits.marketing = Some(Rate {
            pushes_per_second: Some(2.0),
            targets_per_second: Some(10.0),
            burst_seconds: 1.0,
        });
        let limiter = RateLimiter::new(&[app], Arc::new(LocalBuckets::default()));
        assert!(limiter.admit("demo", Class::Marketing, 1).await.is_ok());
        assert!(limiter.admit("demo", Class::Marketing, 1).await.is_ok());
        let limited = limiter
            .admit("demo", Class::Marketing, 1)
            .await
            .expect_err("two a second");
        assert_eq!(limited.limit, "marketing.pushes_per_second");
        // Notifications are limited only by the total.
        for _ in 0..50 {
            assert!(
                limiter
                    .admit("demo", Class::Notification, 1000)
                    .await
                    .is_ok()
            );
        }
        // An app without limits is never limited.
        assert!(limiter.admit("other", Class::Marketing, 1000).await.is_ok());
    }
}
