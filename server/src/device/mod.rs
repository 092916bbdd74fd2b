//! One device connection, from its first byte to its close, over any transport.
//!
//! - [`transport`]: what a transport (WebSocket, QUIC) provides: frames in, frames out, close.
//! - [`admission`]: the Hello before the handshake deadline, the credential, the device token.
//! - [`session_loop`]: an admitted device's session: frames, live pushes, store reads and
//!   timers fed to the [`Session`](crate::session::Session) state machine, and what it
//!   decides written out.
//!
//! This module ties them together: [`run`] a connection, or [`open`] it and then drive it in
//! turns (a parked WebSocket connection leaves its task between turns).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pigeon_proto::CloseCode;
use tracing::Instrument as _;

use crate::config::{AppSettings, Limits};
use crate::connections::ConnectionTable;
use crate::log_throttle::Throttle;
use crate::session::{Session, SessionConfig, SessionError};
use crate::store::{Store, StoreError};

pub mod admission;
pub mod per_ip;
pub mod session_loop;
pub mod transport;

pub use admission::{HandshakeTicket, Handshakes};
pub use per_ip::{PerIpLimits, PerIpSlot};
pub(crate) use session_loop::{Live, drive};
pub use transport::{DeviceTransport, TransportError};

/// Where a node tells the registry which of its connections each device is on (cluster
/// mode). Standalone mode has none: the store reads its one connection table directly.
#[async_trait::async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The device's connection `connection` is live here; once this returns, pushes to the
    /// device are routed to this node. A connection of the same device on another node is
    /// told to close.
    async fn online(&self, token: &str, connection: u64) -> Result<(), StoreError>;

    /// The connection ended; the route is removed unless a newer connection replaced it.
    async fn offline(&self, token: &str, connection: u64);
}

/// What every device connection of a process shares.
pub struct DeviceContext {
    /// The connection table.
    pub connections: Arc<ConnectionTable>,
    /// The device registry and offline store.
    pub store: Arc<dyn Store>,
    /// The apps whose devices may connect.
    pub apps: Vec<AppSettings>,
    /// Session knobs.
    pub session: Arc<SessionConfig>,
    /// The registry's routes to this node, in cluster mode.
    pub presence: Option<Arc<dyn Presence>>,
    /// Connections being set up, bounded apart from the live ones.
    pub handshakes: Arc<Handshakes>,
    /// Live connections the process holds at most (`limits.max_connections`).
    pub max_connections: usize,
    /// The furthest ahead a credential's expiry may be (`limits.max_credential_lifetime`).
    pub max_credential_lifetime: std::time::Duration,
    /// Limits per client address, when configured.
    pub per_ip: Option<Arc<PerIpLimits>>,
    /// What the devices did with messages, counted for the store.
    pub receipts: Arc<crate::receipts::Receipts>,
    /// Marketing pushes to all and to tags the devices got, counted against their users'
    /// frequency caps.
    pub caps: Arc<crate::caps::SharedCaps>,
}

impl DeviceContext {
    /// The context of a process's device connections, with the session knobs of `limits`.
    pub fn new(
        connections: Arc<ConnectionTable>,
        store: Arc<dyn Store>,
        apps: Vec<AppSettings>,
        limits: &Limits,
        presence: Option<Arc<dyn Presence>>,
    ) -> Self {
        Self {
            connections,
            store,
            session: Arc::new(SessionConfig {
                handshake_timeout: limits.handshake_timeout,
                heartbeat_interval: limits.heartbeat_interval,
                idle_timeout: limits.idle_timeout,
                ack_window: limits.ack_window,
            }),
            presence,
            handshakes: Handshakes::new(limits.max_handshakes),
            max_connections: limits.max_connections,
            max_credential_lifetime: limits.max_credential_lifetime,
            per_ip: PerIpLimits::new(limits),
            receipts: Arc::new(crate::receipts::Receipts::new(
                crate::webhooks::Webhooks::new(&apps),
            )),
            caps: Arc::new(crate::caps::SharedCaps::new(&apps)),
            apps,
        }
    }

    pub(crate) fn app(&self, id: &str) -> Option<&AppSettings> {
        self.apps.iter().find(|app| app.id == id)
    }
}

/// Why a connection ends: the code and reason to close with, if the device is still there
/// to hear them.
pub(crate) struct Ending {
    code: Option<CloseCode>,
    reason: String,
}

impl Ending {
    pub(crate) fn close(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason: reason.into(),
        }
    }

    pub(crate) fn gone(reason: impl Into<String>) -> Self {
        Self {
            code: None,
            reason: reason.into(),
        }
    }

    pub(crate) fn transport(error: TransportError) -> Self {
        Self {
            code: error.close_code(),
            reason: error.to_string(),
        }
    }

    pub(crate) fn session(error: SessionError) -> Self {
        Self::close(error.close_code(), error.to_string())
    }
}

/// Runs a device connection from its first byte to its close. `accepted` is when the socket
/// was accepted: the handshake deadline counts from there.
///
/// The transport is borrowed, not moved in: an async fn keeps the slots of its by-value
/// arguments for its whole life, and this future lives as long as the connection.
pub async fn run<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    accepted: Instant,
    peer: &SocketAddr,
    ticket: HandshakeTicket,
) {
    let Some(mut live) = Box::pin(open(transport, context, accepted, *peer, ticket)).await else {
        return;
    };
    let span = live.span(peer);
    async {
        // Without a parking lot the loop only ends with the connection.
        let ending = loop {
            if let Err(ending) = drive(transport, context, &mut live, None).await {
                break ending;
            }
        };
        Box::pin(end(transport, context, live, ending, *peer)).await;
    }
    .instrument(span)
    .await
}

/// Reads the device's tags from the registry into its connection's entry.
async fn reread_tags(context: &DeviceContext, app: &str, token: &str) {
    match context.store.device(app, token).await {
        Ok(Some(device)) => context.connections.retag(app, token, &device.tags),
        Ok(None) => {}
        Err(error) => {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, suppressed, "reading a device's tags failed");
            }
        }
    }
}

/// The handshake, admission and Welcome: a device whose session is under way, or `None`
/// when the connection ended (and the device was told why).
///
/// Everything the session needs from the handshake is made here, and the rest (the
/// credential, the claims, the futures that checked them) is freed before the session
/// starts: an idle connection keeps only what it must.
pub(crate) async fn open<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    accepted: Instant,
    peer: SocketAddr,
    ticket: HandshakeTicket,
) -> Option<Live> {
    let retags = context.connections.retags();
    let admitted = admission::admit(transport, context, accepted, peer, ticket);
    let admission = match Box::pin(admitted).await {
        Ok(admission) => admission,
        Err(ending) => {
            finish(transport, ending, peer).await;
            return None;
        }
    };
    let (session, welcome, acks) =
        Session::start(Instant::now(), &admission, context.session.clone());
    let head = crate::store::StreamHead {
        epoch: admission.all.epoch,
        head: admission.all.head,
    };
    let live = Live::new(
        session,
        admission.device_token.into(),
        &admission.app,
        (head, &admission.tags),
        &context.connections,
    );
    if context.connections.retags() != retags {
        // A change of tags came while the device was being admitted: it may have found
        // no connection here yet, so read the device's tags again.
        Box::pin(reread_tags(context, &admission.app, live.token())).await;
    }
    let span = live.span(&peer);
    async {
        // The route must be in the registry before the session reads the store: a push
        // recorded before it is in the store, one recorded after it is delivered here.
        let routed = match &context.presence {
            Some(presence) => presence.online(live.token(), live.connection().id()).await,
            None => Ok(()),
        };
        let welcomed = match routed {
            Ok(()) => session_loop::welcome(transport, context, &live, welcome, acks)
                .await
                .map_err(Ending::transport),
            Err(error) => {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "registering the device's route failed");
                }
                Err(Ending::close(
                    CloseCode::InternalError,
                    "registry unavailable",
                ))
            }
        };
        match welcomed {
            Ok(()) => Some(live),
            Err(ending) => {
                Box::pin(end(transport, context, live, ending, peer)).await;
                None
            }
        }
    }
    .instrument(span)
    .await
}

/// Ends an admitted device's connection: out of the connection table and the registry's
/// routes, then closed with the ending's code.
pub(crate) async fn end<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    mut live: Live,
    ending: Ending,
    peer: SocketAddr,
) {
    live.persist_stream_place(context).await;
    forget(context, &live).await;
    finish(transport, ending, peer).await;
}

/// Takes an admitted device out of the connection table and the registry's routes (its
/// connection is over, or its socket is lost).
pub(crate) async fn forget(context: &DeviceContext, live: &Live) {
    context
        .connections
        .unregister(live.token(), live.connection().id());
    context.connections.release();
    if let Some(presence) = &context.presence {
        presence.offline(live.token(), live.connection().id()).await;
    }
}

/// Tells the device why its connection ends, if it is still there.
pub(crate) async fn finish<T: DeviceTransport>(
    transport: &mut T,
    ending: Ending,
    peer: SocketAddr,
) {
    match ending.code {
        Some(code) => {
            tracing::debug!(%peer, code = code.code(), reason = %ending.reason, "closing");
            transport.close(code, &ending.reason).await;
        }
        None => tracing::debug!(%peer, reason = %ending.reason, "connection gone"),
    }
}
