//! Devices that stopped coming: a device not admitted for `limits.device_inactivity` (90
//! days by default) and not connected is unregistered, as `DELETE /v1/devices/{token}`
//! would: its record, queue, uid binding, tags and alias go, and its token stops working. A
//! token handed to a connection that never came back with it (an admission whose Welcome
//! was lost, a reinstalled app) is such a device too.
//!
//! Each store keeps its devices by when they were last admitted (noted at most every
//! sixteenth of the inactivity, so an admission rarely writes). The standalone process, and
//! every gateway of a cluster, look for devices past the inactivity every sixteenth of it
//! (at least every second, at most every ten minutes); two gateways that find the same
//! device unregister it once. A device connected all along (its admission is old, its
//! connection is not) is noted as seen instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::log_throttle::Throttle;
use crate::message::unix_millis;
use crate::push::Fanout;
use crate::store::{Store, StoreError};

/// Devices looked at per call to the store.
const BATCH: usize = 500;

/// Devices unregistered for inactivity by this process.
static EXPIRED: AtomicU64 = AtomicU64::new(0);

/// Unregisters the inactive devices of `apps` until `shutdown`; nothing when `inactivity`
/// is zero.
pub async fn run(
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    apps: Vec<String>,
    inactivity: Duration,
    shutdown: CancellationToken,
) {
    if inactivity.is_zero() {
        return;
    }
    let every = (inactivity / 16).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        for app in &apps {
            if let Err(error) = expire(store.as_ref(), fanout.as_ref(), app, inactivity).await {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, app, suppressed, "expiring inactive devices failed; retried later");
                }
            }
        }
    }
}

/// Unregisters `app`'s devices last admitted longer than `inactivity` ago that are not
/// connected; returns how many.
pub async fn expire(
    store: &dyn Store,
    fanout: &dyn Fanout,
    app: &str,
    inactivity: Duration,
) -> Result<u64, StoreError> {
    let before = unix_millis().saturating_sub(inactivity.as_millis() as u64);
    let mut expired = 0;
    loop {
        let devices = store.inactive_devices(app, before, BATCH).await?;
        for (token, route) in &devices {
            let connected = match route {
                Some(route) => fanout.is_live(route).await,
                None => false,
            };
            if connected {
                store.touch_device(app, token).await?;
            } else if store.unregister(app, token).await?.is_some() {
                expired += 1;
                EXPIRED.fetch_add(1, Ordering::Relaxed);
            }
        }
        if devices.len() < BATCH {
            return Ok(expired);
        }
    }
}

/// The devices this process unregistered for inactivity, in Prometheus's text format.
pub fn render(out: &mut String) {
    use std::fmt::Write as _;
    let name = "pigeon_devices_expired_total";
    let _ = writeln!(
        out,
        "# HELP {name} Devices unregistered because they were not admitted for \
         limits.device_inactivity.\n# TYPE {name} counter\n{name} {}",
        EXPIRED.load(Ordering::Relaxed)
    );
}
