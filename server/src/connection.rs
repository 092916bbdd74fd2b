//! Drives one device connection over any transport: the handshake, admission, and the
//! session loop that feeds the [`Session`] state machine with frames, live pushes, store
//! reads and timers, and writes out what it decides.
//!
//! A transport (WebSocket, QUIC) implements [`DeviceTransport`]: receive a frame, send a
//! frame, close with a code. Everything else is here, once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pigeon_proto::CloseCode;
use pigeon_proto::device::{ClientFrame, Hello, ServerFrame};
use tracing::Instrument;

use crate::auth;
use crate::config::AppSettings;
use crate::log_throttle::Throttle;
use crate::node::Node;
use crate::session::{
    Admission, FrameOutcome, Handshake, PushOutcome, Session, SessionConfig, SessionError,
};
use crate::store::{OfflineStore, Registry, StoreError};

/// A transport failure, and the close code it earns.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A frame over the size limit.
    #[error("frame too large")]
    TooBig,
    /// Bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Io(String),
    /// The device stopped reading: a write did not complete within the idle timeout.
    #[error("the device is not reading")]
    Stalled,
}

impl TransportError {
    fn close_code(&self) -> Option<CloseCode> {
        match self {
            TransportError::TooBig => Some(CloseCode::TooBig),
            TransportError::Malformed(_) => Some(CloseCode::ProtocolError),
            TransportError::Stalled => Some(CloseCode::SlowConsumer),
            // The connection is gone: there is no one to tell.
            TransportError::Io(_) => None,
        }
    }
}

/// A device-facing transport carrying Pigeon frames.
pub trait DeviceTransport: Send {
    /// The next frame; `None` when the device closed the connection. Must be cancel-safe:
    /// dropping the future loses no bytes.
    fn recv(&mut self) -> impl Future<Output = Result<Option<ClientFrame>, TransportError>> + Send;

    /// Queues a frame; it may not be written until [`DeviceTransport::flush`].
    fn feed(
        &mut self,
        frame: &ServerFrame,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Writes everything queued.
    fn flush(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes the connection with a code and a reason, as politely as the deadline allows.
    fn close(&mut self, code: CloseCode, reason: &str) -> impl Future<Output = ()> + Send;

    /// Whether nothing waits to be written: a connection may leave its task only then
    /// (a parked connection is woken by what it reads, never by room to write).
    fn is_at_rest(&self) -> bool {
        true
    }
}

/// Where a node tells the registry which devices it holds (cluster mode). Standalone mode
/// has none: its one node is where every device is.
#[async_trait::async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The device's connection `connection` is live here; once this returns, pushes to the
    /// device are routed to this node. A connection of the same device on another node is
    /// told to close.
    async fn online(&self, token: &str, connection: u64) -> Result<(), StoreError>;

    /// The connection ended; the route is removed unless a newer connection replaced it.
    async fn offline(&self, token: &str, connection: u64);
}

/// What every connection of a node shares.
pub struct DeviceContext {
    /// The connection table.
    pub node: Arc<Node>,
    /// Device registry.
    pub registry: Arc<dyn Registry>,
    /// Offline store.
    pub store: Arc<dyn OfflineStore>,
    /// The apps whose devices may connect.
    pub apps: Vec<AppSettings>,
    /// Session knobs.
    pub session: Arc<SessionConfig>,
    /// The registry's routes to this node, in cluster mode.
    pub presence: Option<Arc<dyn Presence>>,
}

impl DeviceContext {
    fn app(&self, id: &str) -> Option<&AppSettings> {
        self.apps.iter().find(|app| app.id == id)
    }
}

/// Why the session loop ended: the code and reason to close with, if the device is still
/// there to hear them.
pub(crate) struct Ending {
    code: Option<CloseCode>,
    reason: String,
}

impl Ending {
    fn close(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason: reason.into(),
        }
    }

    fn gone(reason: impl Into<String>) -> Self {
        Self {
            code: None,
            reason: reason.into(),
        }
    }

    fn transport(error: TransportError) -> Self {
        Self {
            code: error.close_code(),
            reason: error.to_string(),
        }
    }

    fn session(error: SessionError) -> Self {
        Self::close(error.close_code(), error.to_string())
    }
}

/// An admitted device's session, apart from its transport: what the session loop keeps
/// between events, and all of the session a parked connection keeps
/// (see `websocket::park`).
pub(crate) struct Live {
    session: Session,
    connection: Arc<crate::node::Connection>,
    /// The device token, shared with the node's table.
    token: Arc<str>,
    /// When reading the store failed: the connection stays up and the read is retried then.
    store_retry: Option<Instant>,
}

impl Live {
    /// The connection's entry in the node's table.
    pub(crate) fn connection(&self) -> &Arc<crate::node::Connection> {
        &self.connection
    }

    /// When the session next has something to do on its own: a heartbeat, the idle
    /// deadline, or a store read to retry.
    pub(crate) fn wake_at(&self) -> Instant {
        match self.store_retry {
            Some(retry) => retry.min(self.session.deadline()),
            None => self.session.deadline(),
        }
    }

    /// The tracing span of this device's connection.
    pub(crate) fn span(&self, peer: &SocketAddr) -> tracing::Span {
        tracing::debug_span!("device", device.token = %self.token, peer.addr = %peer)
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
) {
    let Some(mut live) = Box::pin(open(transport, context, accepted, *peer)).await else {
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
) -> Option<Live> {
    let admission = Box::pin(handshake(transport, context, accepted, peer)).await?;
    let (session, welcome, ack) =
        Session::start(Instant::now(), &admission, context.session.clone());
    let token: Arc<str> = admission.device_token.into();
    let live = Live {
        session,
        connection: context.node.register(&token),
        token,
        store_retry: None,
    };
    let span = live.span(&peer);
    async {
        // The route must be in the registry before the session reads the store: a push
        // recorded before it is in the store, one recorded after it is delivered here.
        let routed = match &context.presence {
            Some(presence) => presence.online(&live.token, live.connection.id()).await,
            None => Ok(()),
        };
        let welcomed = match routed {
            Ok(()) => welcome_device(transport, context, &live.token, welcome, ack)
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

/// Ends an admitted device's connection: out of the node's table and the registry's
/// routes, then closed with the ending's code.
pub(crate) async fn end<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    live: Live,
    ending: Ending,
    peer: SocketAddr,
) {
    forget(context, &live).await;
    finish(transport, ending, peer).await;
}

/// Takes an admitted device out of the node's table and the registry's routes (its
/// connection is over, or its socket is lost).
pub(crate) async fn forget(context: &DeviceContext, live: &Live) {
    context.node.unregister(&live.token, live.connection.id());
    if let Some(presence) = &context.presence {
        presence.offline(&live.token, live.connection.id()).await;
    }
}

/// Reads the Hello before the handshake deadline and admits the device; `None` when the
/// connection ended (and was told why).
async fn handshake<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    accepted: Instant,
    peer: SocketAddr,
) -> Option<Admission> {
    let handshake = Handshake::new(accepted, &context.session);
    let deadline = tokio::time::Instant::from_std(handshake.deadline());
    let first = tokio::time::timeout_at(deadline, transport.recv()).await;
    let hello = match first {
        Err(_elapsed) => {
            let error = handshake
                .handle_timeout(Instant::now())
                .err()
                .unwrap_or(SessionError::HandshakeTimeout);
            finish(transport, Ending::session(error), peer).await;
            return None;
        }
        Ok(Err(error)) => {
            finish(transport, Ending::transport(error), peer).await;
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Ok(Some(frame))) => match handshake.handle_frame(frame) {
            Ok(hello) => hello,
            Err(error) => {
                finish(transport, Ending::session(error), peer).await;
                return None;
            }
        },
    };
    admit(transport, context, hello, peer).await
}

/// Checks the credential and resolves the device token; closes the connection and returns
/// `None` when either fails.
async fn admit<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    hello: Hello,
    peer: SocketAddr,
) -> Option<Admission> {
    let now_secs = crate::message::unix_millis() / 1000;
    let claims = match auth::verify(&hello.credential, |id| context.app(id), now_secs) {
        Ok(claims) => claims,
        Err(error) => {
            let ending = Ending::session(SessionError::Unauthorized(error.to_string()));
            finish(transport, ending, peer).await;
            return None;
        }
    };
    let device = match context
        .registry
        .admit_device(&claims.app, &claims.sub, &hello.device_token)
        .await
    {
        Ok(device) => device,
        Err(error) => {
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                tracing::warn!(%error, %peer, suppressed, "admitting a device failed");
            }
            let ending = Ending::close(CloseCode::InternalError, "registry unavailable");
            finish(transport, ending, peer).await;
            return None;
        }
    };
    tracing::debug!(
        uid = %claims.sub,
        device.token = %device.token,
        resumed = device.resumed,
        "device connected"
    );
    Some(Admission {
        device_token: device.token,
        resumed: device.resumed,
        acked_seq: device.acked_seq,
        highest_seq: device.highest_seq,
        client_last_seq: hello.last_seq,
    })
}

async fn finish<T: DeviceTransport>(transport: &mut T, ending: Ending, peer: SocketAddr) {
    match ending.code {
        Some(code) => {
            tracing::debug!(%peer, code = code.code(), reason = %ending.reason, "closing");
            transport.close(code, &ending.reason).await;
        }
        None => tracing::debug!(%peer, reason = %ending.reason, "connection gone"),
    }
}

/// What woke the session loop.
enum Event {
    /// A frame from the device, or why there is none.
    Frame(Box<Result<Option<ClientFrame>, TransportError>>),
    /// The node queued pushes or a close request for this connection (a drain is one: see
    /// [`Node::shut_down`](crate::node::Node::shut_down)).
    Woken,
    /// A deadline passed: a heartbeat, the idle deadline, or a store read to retry.
    Timer,
}

/// The session loop of an admitted device: returns `Err` with why the connection ends, or
/// `Ok` when it had nothing to do for `park_after` (only when that is given) and may leave
/// its task until a frame, a push or [`Live::wake_at`] comes.
///
/// A node holds many more idle connections than busy ones, so this loop is shaped for the
/// idle case: between events it holds the session, the transport and one small wait;
/// handling an event runs in a boxed future that exists only while it runs.
pub(crate) async fn drive<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    live: &mut Live,
    park_after: Option<std::time::Duration>,
) -> Result<(), Ending> {
    let mut idle_since = Instant::now();
    loop {
        let Live {
            session,
            token,
            store_retry,
            ..
        } = &mut *live;
        if store_retry.is_none() && session.refill().is_some() {
            match Box::pin(catch_up(transport, context, token, session)).await {
                Ok(true) => {}
                Ok(false) => *store_retry = Some(Instant::now() + STORE_RETRY),
                Err(error) => return Err(Ending::transport(error)),
            }
        }
        let wake_at = live.wake_at();
        // A connection waiting to retry the store, or to write, keeps its task. One whose
        // device owes an answer (an ack, a pong) does not: under load answers are slow, and
        // thousands of tasks waiting for them at once would leave the heap fragmented.
        let park_at = park_after
            .filter(|_| live.store_retry.is_none() && transport.is_at_rest())
            .map(|after| idle_since + after);
        let deadline = park_at.map_or(wake_at, |park_at| park_at.min(wake_at));
        let Live {
            session,
            connection,
            token,
            store_retry,
        } = &mut *live;
        // In this order: what the node has for the device, then what the device sent
        // (frames already read come first), and only then the timer, so a connection never
        // parks with a whole frame read and unhandled (nothing would wake it for that).
        let event = tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| connection.poll_woken(cx)) => Event::Woken,
            // Boxed: a frame is large, and `event` is kept while the event is handled.
            frame = transport.recv() => Event::Frame(Box::new(frame)),
            () = tokio::time::sleep_until(deadline.into()) => Event::Timer,
        };
        // Each event is handled in a boxed future, which exists only while it runs.
        match event {
            Event::Frame(frame) => {
                Box::pin(on_frame(transport, context, token, session, *frame)).await?;
            }
            Event::Woken => Box::pin(on_woken(transport, context, session, connection)).await?,
            Event::Timer => {
                let now = Instant::now();
                let idle = park_at.is_some_and(|park_at| park_at <= now);
                if idle && wake_at > now && transport.is_at_rest() {
                    return Ok(());
                }
                if store_retry.is_some_and(|retry| retry <= now) {
                    *store_retry = None;
                }
                Box::pin(on_timer(transport, context, session, now)).await?;
            }
        }
        idle_since = Instant::now();
    }
}

/// Sends the Welcome, and persists the ack the Hello carried, if it acknowledged more than
/// the store knew.
async fn welcome_device<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    token: &str,
    welcome: ServerFrame,
    ack: Option<u64>,
) -> Result<(), TransportError> {
    send(transport, [welcome], context.session.idle_timeout).await?;
    if let Some(seq) = ack
        && let Err(error) = context.store.ack(token, seq).await
    {
        ack_failed(&error);
    }
    Ok(())
}

/// Logs a failed ack write (throttled: a store outage fails every device's acks at once).
/// The device gets those messages again after a reconnect: at least once.
fn ack_failed(error: &crate::store::StoreError) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.allow() {
        tracing::warn!(%error, suppressed, "persisting an ack failed");
    }
}

/// Reads from the store while the session is behind and has room in its window, and sends
/// what it reads. Returns false when a store read failed (to be retried later).
async fn catch_up<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    token: &str,
    session: &mut Session,
) -> Result<bool, TransportError> {
    while let Some(request) = session.refill() {
        let replay = match context
            .store
            .replay(token, request.after, request.limit)
            .await
        {
            Ok(replay) => replay,
            Err(error) => {
                static THROTTLE: Throttle = Throttle::new();
                if let Some(suppressed) = THROTTLE.allow() {
                    tracing::warn!(%error, suppressed, "reading the offline store failed; retrying");
                }
                return Ok(false);
            }
        };
        let frames = session.handle_refill(&replay.deliveries, replay.more);
        if frames.is_empty() {
            break;
        }
        send(transport, frames, context.session.idle_timeout).await?;
    }
    Ok(true)
}

async fn on_frame<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    token: &str,
    session: &mut Session,
    frame: Result<Option<ClientFrame>, TransportError>,
) -> Result<(), Ending> {
    let frame = match frame {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(Ending::gone("closed by the device")),
        Err(error) => return Err(Ending::transport(error)),
    };
    match session.handle_frame(Instant::now(), frame) {
        Ok(FrameOutcome::Nothing) => Ok(()),
        Ok(FrameOutcome::Send(frame)) => send(transport, [frame], context.session.idle_timeout)
            .await
            .map_err(Ending::transport),
        Ok(FrameOutcome::Acked(seq)) => {
            if let Err(error) = context.store.ack(token, seq).await {
                ack_failed(&error);
            }
            Ok(())
        }
        Err(error) => Err(Ending::session(error)),
    }
}

async fn on_woken<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    session: &mut Session,
    connection: &crate::node::Connection,
) -> Result<(), Ending> {
    let inbox = connection.take();
    if let Some(code) = inbox.close {
        let reason = match code {
            CloseCode::Replaced => "replaced by a newer connection of this device",
            CloseCode::GoingAway => "node shutting down; reconnect",
            _ => "closed by the node",
        };
        return Err(Ending::close(code, reason));
    }
    if inbox.fell_behind {
        session.fall_behind();
    }
    let frames: Vec<ServerFrame> = inbox
        .deliveries
        .iter()
        .filter_map(|delivery| match session.handle_push(delivery) {
            PushOutcome::Send(frame) => Some(frame),
            PushOutcome::Duplicate | PushOutcome::Deferred => None,
        })
        .collect();
    send(transport, frames, context.session.idle_timeout)
        .await
        .map_err(Ending::transport)
}

async fn on_timer<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    session: &mut Session,
    now: Instant,
) -> Result<(), Ending> {
    match session.handle_timeout(now) {
        Ok(Some(ping)) => send(transport, [ping], context.session.idle_timeout)
            .await
            .map_err(Ending::transport),
        Ok(None) => Ok(()),
        Err(error) => Err(Ending::session(error)),
    }
}

/// How long a session waits before reading the store again after a failed read.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends frames and flushes once. A device that stops reading would hold this write (and
/// with it the whole session) forever, so it gets the idle timeout to take the bytes.
async fn send<T: DeviceTransport>(
    transport: &mut T,
    frames: impl IntoIterator<Item = ServerFrame>,
    deadline: std::time::Duration,
) -> Result<(), TransportError> {
    let write = async {
        let mut any = false;
        for frame in frames {
            transport.feed(&frame).await?;
            any = true;
        }
        if any {
            transport.flush().await?;
        }
        Ok(())
    };
    tokio::time::timeout(deadline, write)
        .await
        .unwrap_or(Err(TransportError::Stalled))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport whose writes never complete, like a device that stopped reading.
    struct Stuck;

    impl DeviceTransport for Stuck {
        async fn recv(&mut self) -> Result<Option<ClientFrame>, TransportError> {
            std::future::pending().await
        }
        async fn feed(&mut self, _frame: &ServerFrame) -> Result<(), TransportError> {
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), TransportError> {
            std::future::pending().await
        }
        async fn close(&mut self, _code: CloseCode, _reason: &str) {}
    }

    #[tokio::test]
    async fn a_device_that_stops_reading_is_closed_as_slow() {
        let result = send(
            &mut Stuck,
            [ServerFrame::default()],
            std::time::Duration::from_millis(20),
        )
        .await;
        let error = result.expect_err("the write cannot complete");
        assert!(matches!(error, TransportError::Stalled));
        assert_eq!(error.close_code(), Some(CloseCode::SlowConsumer));
    }
}
