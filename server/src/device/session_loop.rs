//! The session loop of an admitted device: it waits for a frame, a wake-up from the
//! connection table (live pushes, a close request) or a timer, feeds it to the
//! [`Session`] state machine, reads the store when the session asks, and writes out what
//! the session decides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pigeon_proto::CloseCode;
use pigeon_proto::device::{ClientFrame, ServerFrame, server_frame};

use super::transport::{DeviceTransport, TransportError};
use super::{DeviceContext, Ending};
use crate::connections::{Connection, ConnectionTable, Outgoing};
use crate::log_throttle::Throttle;
use crate::session::{FrameOutcome, HelloAcks, PushDecision, Session, StreamRefilled};
use crate::store::{ALL, DeviceTags, StreamHead};

/// An admitted device's session, apart from its transport: what the session loop keeps
/// between events, and all of the session a parked connection keeps
/// (see `websocket::park`).
pub(crate) struct Live {
    session: Session,
    connection: Arc<Connection>,
    /// The device token, shared with the connection table.
    token: Arc<str>,
    /// When reading the store failed: the connection stays up and the read is retried then.
    store_retry: Option<Instant>,
}

impl Live {
    /// A session under way, registered in the connection table with the device's tags and
    /// where the app's stream stood when it was admitted.
    pub(crate) fn new(
        mut session: Session,
        token: Arc<str>,
        app: &str,
        (head, tags): (StreamHead, &DeviceTags),
        connections: &ConnectionTable,
    ) -> Self {
        let (connection, floor) = connections.register(&token, app, head, tags);
        session.set_stream_floor(floor);
        Self {
            session,
            connection,
            token,
            store_retry: None,
        }
    }

    /// The connection's entry in the connection table.
    pub(crate) fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// The device token.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// For a connection without a task (parked): what the connection table has for it, as
    /// the frames to send now; `Err` when the node asked it to close.
    pub(crate) fn take_inbox(
        &mut self,
        context: &DeviceContext,
    ) -> Result<Vec<ServerFrame>, Ending> {
        take_inbox(context, &mut self.session, &self.connection, &self.token)
    }

    /// For a connection without a task: a frame from the device, handled as the session
    /// loop would. An ack's store write runs in the background (acks are cumulative, so
    /// their order does not matter); a frame to send back is returned.
    pub(crate) fn handle_frame_now(
        &mut self,
        context: &Arc<DeviceContext>,
        frame: ClientFrame,
    ) -> Result<Option<ServerFrame>, Ending> {
        match self.session.handle_frame(Instant::now(), frame) {
            Ok(FrameOutcome::Nothing) => Ok(None),
            Ok(FrameOutcome::Send(frame)) => Ok(Some(frame)),
            Ok(FrameOutcome::Acked { seq, messages }) => {
                context.receipts.acked(
                    self.connection.app(),
                    &self.token,
                    &messages,
                    seq.is_some(),
                );
                if seq.is_none() {
                    context
                        .caps
                        .got(self.connection.app(), &self.token, &messages);
                }
                if let Some(seq) = seq {
                    let (context, token) = (context.clone(), self.token.clone());
                    tokio::spawn(async move {
                        if let Err(error) = context.store.ack(&token, seq).await {
                            ack_failed(&error);
                        }
                    });
                }
                Ok(None)
            }
            Ok(FrameOutcome::Opened(id)) => {
                let app = self.connection.app();
                context.receipts.opened(app, &self.token, id);
                Ok(None)
            }
            Err(error) => Err(Ending::session(error)),
        }
    }

    /// Whether the session must read the store before it can do anything else (which a
    /// connection without a task cannot).
    pub(crate) fn needs_store(&self) -> bool {
        self.store_retry.is_none()
            && (self.session.refill().is_some() || self.session.refill_stream().is_some())
    }

    /// Persists the session's place in the stream `all`, if it moved.
    pub(crate) async fn persist_stream_place(&mut self, context: &DeviceContext) {
        persist_stream_place(context, &self.token, &mut self.session).await;
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

/// What woke the session loop.
enum Event {
    /// A frame from the device, or why there is none.
    Frame(Box<Result<Option<ClientFrame>, TransportError>>),
    /// The connection table queued pushes or a close request for this connection (a drain
    /// is one: see [`ConnectionTable::shut_down`]).
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
            connection,
            token,
            store_retry,
        } = &mut *live;
        if store_retry.is_none()
            && (session.refill().is_some() || session.refill_stream().is_some())
        {
            match Box::pin(catch_up(transport, context, token, connection, session)).await {
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
                let app = connection.app();
                Box::pin(on_frame(transport, context, (app, token), session, *frame)).await?;
            }
            Event::Woken => {
                Box::pin(on_woken(transport, context, session, connection, token)).await?;
            }
            Event::Timer => {
                let now = Instant::now();
                let idle = park_at.is_some_and(|park_at| park_at <= now);
                if idle && wake_at > now && transport.is_at_rest() {
                    return Ok(());
                }
                if store_retry.is_some_and(|retry| retry <= now) {
                    *store_retry = None;
                }
                Box::pin(on_timer(transport, context, token, session, now)).await?;
            }
        }
        idle_since = Instant::now();
    }
}

/// Sends the Welcome, and persists the acks the Hello carried, where it acknowledged more
/// than the store knew.
pub(crate) async fn welcome<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    live: &Live,
    welcome: ServerFrame,
    acks: HelloAcks,
) -> Result<(), TransportError> {
    send(transport, [welcome], context.session.idle_timeout).await?;
    if let Some(seq) = acks.seq
        && let Err(error) = context.store.ack(&live.token, seq).await
    {
        ack_failed(&error);
    }
    if let Some(offset) = acks.all {
        let epoch = live.session.stream_epoch();
        if let Err(error) = context
            .store
            .ack_stream(&live.token, ALL, epoch, offset)
            .await
        {
            ack_failed(&error);
        }
    }
    Ok(())
}

/// Persists the session's place in the stream `all`, if it moved (see
/// [`Session::stream_to_persist`]).
pub(crate) async fn persist_stream_place(
    context: &DeviceContext,
    token: &str,
    session: &mut Session,
) {
    if let Some((epoch, offset)) = session.stream_to_persist()
        && let Err(error) = context.store.ack_stream(token, ALL, epoch, offset).await
    {
        ack_failed(&error);
    }
}

/// Logs a failed ack write (throttled: a store outage fails every device's acks at once).
/// The device gets those messages again after a reconnect: at least once.
fn ack_failed(error: &crate::store::StoreError) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.allow() {
        tracing::warn!(%error, suppressed, "persisting an ack failed");
    }
}

/// Reads from the store while the session is behind and has room in its window, its own
/// queue first, then its app's stream `all` (passing over the entries that are not for the
/// device), and sends what it reads. Returns false when a store read failed (to be retried
/// later).
async fn catch_up<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    token: &str,
    connection: &Connection,
    session: &mut Session,
) -> Result<bool, TransportError> {
    let app = connection.app();
    while let Some(request) = session.refill() {
        let replay = match context
            .store
            .replay(token, request.after, request.limit)
            .await
        {
            Ok(replay) => replay,
            Err(error) => {
                store_read_failed(&error);
                return Ok(false);
            }
        };
        let frames = session.handle_refill(&replay.deliveries, replay.more);
        if frames.is_empty() {
            break;
        }
        count_delivered(context, (app, token), session, &frames);
        send(transport, frames, context.session.idle_timeout).await?;
    }
    while let Some(request) = session.refill_stream() {
        let read = match context
            .store
            .read_stream(app, ALL, request.after, request.limit)
            .await
        {
            Ok(read) => read,
            Err(error) => {
                store_read_failed(&error);
                return Ok(false);
            }
        };
        let decide = |offset, message: &_| connection.decide(message, offset);
        let StreamRefilled { frames, skipped } =
            session.handle_stream_refill(&read.entries, read.more, decide);
        context.receipts.skipped(app, &skipped);
        if frames.is_empty() && session.refill_stream().is_some() {
            // A page of entries none of which was for the device: read on.
            continue;
        }
        if frames.is_empty() {
            break;
        }
        count_delivered(context, (app, token), session, &frames);
        send(transport, frames, context.session.idle_timeout).await?;
    }
    Ok(true)
}

/// Logs a failed store read (throttled, as a store outage fails every device's at once).
fn store_read_failed(error: &crate::store::StoreError) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.allow() {
        tracing::warn!(%error, suppressed, "reading the offline store failed; retrying");
    }
}

async fn on_frame<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    (app, token): (&str, &str),
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
        Ok(FrameOutcome::Acked { seq, messages }) => {
            context.receipts.acked(app, token, &messages, seq.is_some());
            if seq.is_none() {
                context.caps.got(app, token, &messages);
            }
            if let Some(seq) = seq
                && let Err(error) = context.store.ack(token, seq).await
            {
                ack_failed(&error);
            }
            Ok(())
        }
        Ok(FrameOutcome::Opened(id)) => {
            context.receipts.opened(app, token, id);
            Ok(())
        }
        Err(error) => Err(Ending::session(error)),
    }
}

async fn on_woken<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    session: &mut Session,
    connection: &Connection,
    token: &str,
) -> Result<(), Ending> {
    let frames = take_inbox(context, session, connection, token)?;
    send(transport, frames, context.session.idle_timeout)
        .await
        .map_err(Ending::transport)
}

/// Takes what the connection table has for the connection and returns the frames the
/// session sends now; `Err` when the node asked the connection to close.
fn take_inbox(
    context: &DeviceContext,
    session: &mut Session,
    connection: &Connection,
    token: &str,
) -> Result<Vec<ServerFrame>, Ending> {
    let inbox = connection.take();
    if let Some(code) = inbox.close {
        let reason = match code {
            CloseCode::Replaced => "replaced by a newer connection of this device",
            CloseCode::GoingAway => "node shutting down; reconnect",
            CloseCode::StreamReset => "the app's stream was created again; reconnect",
            _ => "closed by the node",
        };
        return Err(Ending::close(code, reason));
    }
    if inbox.fell_behind {
        session.fall_behind();
    }
    if inbox.shared_fell_behind {
        session.fall_behind_stream();
    }
    let frames: Vec<ServerFrame> = inbox
        .pushes
        .iter()
        .filter_map(|push| {
            let decision = match push {
                Outgoing::Direct(delivery) => session.handle_push(delivery),
                Outgoing::Shared(delivery) => session.handle_shared_push(delivery),
                Outgoing::Skipped(offset) => {
                    session.pass_over_shared(*offset);
                    return None;
                }
            };
            match decision {
                PushDecision::Send(frame) => Some(frame),
                PushDecision::Duplicate | PushDecision::Deferred => None,
            }
        })
        .collect();
    count_delivered(context, (connection.app(), token), session, &frames);
    Ok(frames)
}

/// Counts the pushes among `frames` as handed to a connection.
fn count_delivered(
    context: &DeviceContext,
    (app, token): (&str, &str),
    session: &Session,
    frames: &[ServerFrame],
) {
    // Each push sent is in flight: its message is the session's.
    let messages = frames.iter().filter_map(|frame| match &frame.kind {
        Some(server_frame::Kind::Push(push)) => session.sent_message(push).map(|m| &**m),
        _ => None,
    });
    context.receipts.delivered(app, token, messages);
}

async fn on_timer<T: DeviceTransport>(
    transport: &mut T,
    context: &DeviceContext,
    token: &str,
    session: &mut Session,
    now: Instant,
) -> Result<(), Ending> {
    persist_stream_place(context, token, session).await;
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
