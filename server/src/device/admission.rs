//! Admission: a new connection's Hello before the handshake deadline, its credential, and
//! its device token resolved (or issued) by the registry.
//!
//! Connections being set up are bounded apart from the live ones ([`Handshakes`]): a socket
//! counts against `limits.max_connections` only once it has sent a Hello, so sockets that
//! never do cannot keep devices out. They take places among `limits.max_handshakes`
//! instead. When those are all taken, the oldest is closed to make room for the new one if
//! it has been at it for [`EVICTABLE_AFTER`] (a device completes its handshake in a round
//! trip or two, while a socket that sits silent grows old); otherwise the listener waits
//! (new sockets wait in the listen backlog) until a place is given back or the oldest turns
//! evictable, so a genuine rush of devices finishes the handshakes it started instead of
//! evicting them for newcomers, and nobody is turned away for arriving in a rush.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use pigeon_proto::CloseCode;
use pigeon_proto::credential;
use pigeon_proto::device::Hello;

use super::transport::DeviceTransport;
use super::{DeviceContext, Ending};
use crate::config::AppSettings;
use crate::log_throttle::Throttle;
use crate::session::{Admission, Handshake, SessionError};

/// How long a handshake must have been under way before a newer one may evict it.
pub const EVICTABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The connections of a process that are being set up (transport handshake, WebSocket
/// upgrade, Hello), at most a fixed number; past it the oldest is evicted, or the newest
/// refused.
#[derive(Debug)]
pub struct Handshakes {
    pending: Mutex<Pending>,
    capacity: usize,
    evicted: AtomicU64,
    waited: AtomicU64,
    /// Notified when a place is given back.
    freed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// Handshakes under way, oldest first: id, start, eviction signal.
    queue: VecDeque<(u64, Instant, CancellationToken)>,
    next_id: u64,
}

/// A connection's place among the [`Handshakes`], given up when dropped.
#[derive(Debug)]
pub struct HandshakeTicket {
    id: u64,
    evicted: CancellationToken,
    handshakes: Arc<Handshakes>,
}

impl Handshakes {
    /// At most `capacity` handshakes at once.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Pending::default()),
            capacity: capacity.max(1),
            evicted: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for a new connection's handshake, waiting while every place is taken by a
    /// handshake too young to evict (see the module docs).
    pub async fn enter_waiting(self: &Arc<Self>) -> HandshakeTicket {
        let mut waited = false;
        loop {
            // Registered before looking, so a place given back in between is not missed.
            let freed = self.freed.notified();
            let evictable_at = match self.enter(Instant::now()) {
                Ok(ticket) => return ticket,
                Err(evictable_at) => evictable_at,
            };
            if !waited {
                waited = true;
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(evictable_at.into()) => {}
            }
        }
    }

    /// A place for a new connection's handshake at `now`. When all are taken, the oldest
    /// handshake gives up its own if it is at least [`EVICTABLE_AFTER`] old; otherwise there
    /// is none yet: `Err` with when the oldest turns evictable.
    pub fn enter(self: &Arc<Self>, now: Instant) -> Result<HandshakeTicket, Instant> {
        let mut pending = self.pending();
        if pending.queue.len() >= self.capacity {
            let oldest_started = pending.queue.front().map(|(_, started, _)| *started);
            if let Some(started) = oldest_started
                && now < started + EVICTABLE_AFTER
            {
                return Err(started + EVICTABLE_AFTER);
            }
            if let Some((_, _, oldest)) = pending.queue.pop_front() {
                oldest.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The id is taken under the lock, so the queue stays in id order.
        let id = pending.next_id;
        pending.next_id += 1;
        let evicted = CancellationToken::new();
        pending.queue.push_back((id, now, evicted.clone()));
        Ok(HandshakeTicket {
            id,
            evicted,
            handshakes: self.clone(),
        })
    }

    /// Handshakes there are places for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Handshakes under way.
    pub fn in_progress(&self) -> usize {
        self.pending().queue.len()
    }

    /// Handshakes evicted to make room for newer ones, since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// New sockets that waited (in the listen backlog) because every place was taken by a
    /// handshake too young to evict.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }
}

impl HandshakeTicket {
    /// Completes when this handshake was evicted to make room for a newer one.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut pending = self.handshakes.pending();
        // Ids enter in increasing order, so the queue is sorted by id.
        if let Ok(index) = pending
            .queue
            .binary_search_by_key(&self.id, |(id, _, _)| *id)
        {
            pending.queue.remove(index);
        }
        drop(pending);
        self.handshakes.freed.notify_one();
    }
}

/// Reads the Hello before the handshake deadline, gives up the handshake's place, and admits
/// the device if the process has room for it; otherwise, why the connection ends.
pub(crate) async fn admit<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    accepted: Instant,
    peer: SocketAddr,
    ticket: HandshakeTicket,
) -> Result<Admission, Ending> {
    let handshake = Handshake::new(accepted, &context.session);
    let deadline = tokio::time::Instant::from_std(handshake.deadline());
    let first = tokio::select! {
        first = tokio::time::timeout_at(deadline, transport.recv()) => first,
        () = ticket.evicted() => return Err(evicted()),
    };
    drop(ticket);
    let hello = match first {
        Err(_elapsed) => {
            let error = handshake
                .handle_timeout(Instant::now())
                .err()
                .unwrap_or(SessionError::HandshakeTimeout);
            return Err(Ending::session(error));
        }
        Ok(Err(error)) => return Err(Ending::transport(error)),
        Ok(Ok(None)) => return Err(Ending::gone("closed before its Hello")),
        Ok(Ok(Some(frame))) => handshake.handle_frame(frame).map_err(Ending::session)?,
    };
    // A device counts against the limit from its Hello until its connection ends (the
    // place is given back by `device::forget`, or here if it is not admitted).
    if !context.connections.reserve(context.max_connections) {
        return Err(Ending::close(
            CloseCode::TryAgainLater,
            "node at its connection limit",
        ));
    }
    let admitted = resolve(context, hello, peer).await;
    if admitted.is_err() {
        context.connections.release();
    }
    admitted
}

/// Why an evicted handshake ends.
pub(crate) fn evicted() -> Ending {
    Ending::close(
        CloseCode::TryAgainLater,
        "too many connections being set up; try again",
    )
}

/// Checks the credential and resolves the device token.
async fn resolve(
    context: &DeviceContext,
    hello: Hello,
    peer: SocketAddr,
) -> Result<Admission, Ending> {
    let policy = credential::Policy {
        now_secs: crate::message::unix_millis() / 1000,
        max_lifetime_secs: context.max_credential_lifetime.as_secs(),
    };
    let keys_of = |id: &str| context.app(id).map(AppSettings::keys);
    let claims = credential::verify(&hello.credential, keys_of, policy)
        .map_err(|error| Ending::session(SessionError::Unauthorized(error.to_string())))?;
    let admitted = async {
        let mut device = context
            .store
            .admit_device(&claims.app, &claims.sub, &hello.device_token)
            .await?;
        if !device.resumed {
            // A new device of a user who opted out of something carries it from the start.
            let uid = [claims.sub.clone()];
            let opt_out = context.store.opt_outs(&claims.app, &uid).await?;
            let items = opt_out.into_iter().flatten();
            let tags: Vec<String> = items
                .map(|item| crate::devices::opt_out_tag(&item))
                .collect();
            if !tags.is_empty()
                && let Some(retagged) = context
                    .store
                    .set_tags(&claims.app, &device.token, &tags)
                    .await?
            {
                device.tags = retagged.tags;
            }
        }
        Ok::<_, crate::store::StoreError>(device)
    };
    let device = match admitted.await {
        Ok(device) => device,
        Err(error) => {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, %peer, suppressed, "admitting a device failed");
            }
            return Err(Ending::close(
                CloseCode::InternalError,
                "registry unavailable",
            ));
        }
    };
    tracing::debug!(
        uid = %claims.sub,
        device.token = %device.token,
        resumed = device.resumed,
        "device connected"
    );
    Ok(Admission {
        device_token: device.token,
        resumed: device.resumed,
        acked_seq: device.acked_seq,
        highest_seq: device.highest_seq,
        client_last_seq: hello.last_seq,
        app: claims.app,
        all: device.all,
        client_all: crate::session::client_all(&hello.streams),
        tags: device.tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_handshake_is_evicted_only_once_it_is_old_enough() {
        let handshakes = Handshakes::new(2);
        let start = Instant::now();
        let first = handshakes.enter(start).expect("a place");
        let _second = handshakes.enter(start).expect("a place");
        // Full, and the oldest is young: no place yet, until the oldest turns evictable.
        assert_eq!(
            handshakes.enter(start + EVICTABLE_AFTER / 2).err(),
            Some(start + EVICTABLE_AFTER)
        );
        assert_eq!(handshakes.evicted(), 0);
        // Once the oldest has waited long enough, a newcomer takes its place.
        let _third = handshakes
            .enter(start + EVICTABLE_AFTER)
            .expect("the oldest evicted");
        assert!(first.evicted.is_cancelled());
        assert_eq!(handshakes.evicted(), 1);
        assert_eq!(handshakes.in_progress(), 2);
        drop(first);
        assert_eq!(handshakes.in_progress(), 2);
    }

    #[tokio::test]
    async fn a_newcomer_waits_for_a_place_given_back() {
        let handshakes = Handshakes::new(1);
        let first = handshakes.enter(Instant::now()).expect("a place");
        let waiting = tokio::spawn({
            let handshakes = handshakes.clone();
            async move { handshakes.enter_waiting().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no place yet");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_millis(500), waiting)
            .await
            .expect("a place once the first gave it back")
            .expect("task");
        assert_eq!((handshakes.waited(), handshakes.evicted()), (1, 0));
        drop(second);
        assert_eq!(handshakes.in_progress(), 0);
    }

    #[test]
    fn places_entered_and_left_from_many_threads_are_all_given_back() {
        let handshakes = Handshakes::new(10_000);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2_000 {
                        let ticket = handshakes.enter(Instant::now());
                        drop(ticket.ok());
                    }
                });
            }
        });
        assert_eq!(handshakes.in_progress(), 0);
    }
}
