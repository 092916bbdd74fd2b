//! The device session: Pigeon's protocol logic, with no I/O.
//!
//! A connection starts as a [`Handshake`], which accepts nothing but a Hello before its
//! deadline. Once the node has checked the credential and resolved the device token, it
//! turns the Hello into a [`Session`]; only a `Session` can be given pushes, so an
//! unauthenticated socket cannot receive one.
//!
//! A `Session` takes inputs and returns what to do, with the time passed in:
//! - [`Session::handle_frame`]: a frame from the device (acks, pings, pongs);
//! - [`Session::handle_push`]: a live push for this device;
//! - [`Session::refill`] / [`Session::handle_refill`]: reading what the device has not yet
//!   been sent from the offline store (the replay after a reconnect is the first refill);
//! - [`Session::handle_timeout`] and [`Session::deadline`]: heartbeats and the idle deadline.
//!
//! # Delivery
//! A device reads two lanes, each with the same mechanics: its own queue of direct pushes
//! (ordered by seq) and its app's shared stream `all` (pushes to every device or to tags,
//! ordered by offset). The description below is of the direct lane; the stream lane is the
//! same with offsets for seqs ([`Session::handle_shared_push`], [`Session::refill_stream`],
//! [`Session::handle_stream_refill`]), with two differences. An entry of the stream that is
//! not for the device (a push to tags it lacks) is passed over: it counts as sent and
//! acknowledged, and is never sent. One that skips the device (its user opted out, or had
//! its frequency cap) is passed over too, and reported to be counted; when it skips a
//! connected device, the session is told ([`Session::pass_over_shared`]) so that its place
//! moves on as if it had read it. And offsets the device is sent need not follow each
//! other: the connection table hands the stream out in offset order, so above the offset it
//! had handed out when the connection registered (the lane's *floor*), a live entry after
//! the last one sent means that the ones between were not for the device.
//!
//! The store is the source of truth; live pushes are a fast path. The session keeps the
//! highest seq sent (`last_sent`), the highest acknowledged (`last_acked`) and the seqs in
//! flight between them (at most `ack_window`). While it is *caught up* with the store, a live
//! push whose seq is `last_sent + 1` is sent at once. When the window is full, when a live
//! push overtook an earlier one, or when the node dropped a live push because the
//! connection's queue was full, the session falls *behind*: it ignores live pushes (they are
//! in the store) and asks for a refill when the window opens. Seqs sent are strictly
//! increasing, so a push that reaches the session twice (live and from the store) is sent
//! once, and never out of order. (A TTL-0 push is never stored: one that arrives while the
//! session is behind is dropped, as TTL 0 means "now or never".)

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pigeon_proto::CloseCode;
use pigeon_proto::device::{
    Ack, ClientFrame, Hello, Ping, Pong, ServerFrame, Welcome, client_frame, server_frame,
};

use pigeon_proto::device::{StreamPosition, StreamState};

use crate::message::{Delivery, Match, Message, SharedDelivery};
use crate::store::{ALL, DeviceTags, StreamPlace};

/// The knobs of a session, shared by all sessions of a node.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Time from accept to a valid Hello.
    pub handshake_timeout: Duration,
    /// Silence after which the node pings.
    pub heartbeat_interval: Duration,
    /// Silence after which the node closes the connection.
    pub idle_timeout: Duration,
    /// Pushes in flight (sent, not acknowledged) at most.
    pub ack_window: u32,
}

/// Why a session ends. [`SessionError::close_code`] maps each to what the device is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No Hello before the handshake deadline.
    #[error("handshake not completed in time")]
    HandshakeTimeout,
    /// The device was silent past the idle deadline.
    #[error("no frame from the device before the idle deadline")]
    IdleTimeout,
    /// The device broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The credential was refused.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
}

impl SessionError {
    /// The close code the device receives.
    pub fn close_code(&self) -> CloseCode {
        match self {
            SessionError::HandshakeTimeout => CloseCode::HandshakeTimeout,
            SessionError::IdleTimeout => CloseCode::IdleTimeout,
            SessionError::Protocol(_) => CloseCode::ProtocolError,
            SessionError::Unauthorized(_) => CloseCode::Unauthorized,
        }
    }
}

/// A connection that has not said Hello yet.
#[derive(Debug)]
pub struct Handshake {
    deadline: Instant,
}

impl Handshake {
    /// A handshake that started at `now`.
    pub fn new(now: Instant, config: &SessionConfig) -> Self {
        Self {
            deadline: now + config.handshake_timeout,
        }
    }

    /// When the handshake times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The device's first frame, which must be a Hello.
    pub fn handle_frame(&self, frame: ClientFrame) -> Result<Hello, SessionError> {
        match frame.kind {
            Some(client_frame::Kind::Hello(hello)) => Ok(hello),
            _ => Err(SessionError::Protocol("the first frame must be Hello")),
        }
    }

    /// Checks the deadline.
    pub fn handle_timeout(&self, now: Instant) -> Result<(), SessionError> {
        if now >= self.deadline {
            Err(SessionError::HandshakeTimeout)
        } else {
            Ok(())
        }
    }
}

/// What the node found out about a device after its Hello: the credential is valid and the
/// token is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The device's token (the presented one, or a newly issued one).
    pub device_token: String,
    /// Whether the presented token was known.
    pub resumed: bool,
    /// The device's app.
    pub app: String,
    /// The highest seq the store holds as acknowledged.
    pub acked_seq: u64,
    /// The highest seq the store has assigned to this device.
    pub highest_seq: u64,
    /// The highest seq the device says it has processed.
    pub client_last_seq: u64,
    /// The device's place in the stream `all`, as the store has it.
    pub all: StreamPlace,
    /// Where the device says it is in the stream `all`: the epoch and the highest offset
    /// processed, if its Hello said.
    pub client_all: Option<(u64, u64)>,
    /// The device's tags.
    pub tags: DeviceTags,
}

/// A stream epoch as devices see it: 16 hex digits.
pub fn epoch_text(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// A stream epoch from the text a device sent; 0 (no epoch) when it is not one.
pub fn parse_epoch(text: &str) -> u64 {
    u64::from_str_radix(text, 16).unwrap_or(0)
}

/// Where a device says it is in the stream `all`, from its Hello's positions.
pub fn client_all(positions: &[StreamPosition]) -> Option<(u64, u64)> {
    positions
        .iter()
        .find(|position| position.stream == ALL)
        .map(|position| (parse_epoch(&position.epoch), position.offset))
}

/// A range of the store to read: rows with seq above `after`, at most `limit` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refill {
    /// Read seqs strictly above this.
    pub after: u64,
    /// Read at most this many rows.
    pub limit: u32,
}

/// What to do with a live push.
#[derive(Debug, PartialEq)]
pub enum PushDecision {
    /// Send this frame.
    Send(ServerFrame),
    /// Already sent (it came both live and from the store): nothing to do.
    Duplicate,
    /// Not sent now; the session will read it from the store (see [`Session::refill`]).
    /// A TTL-0 push is not in the store, so it is dropped.
    Deferred,
}

/// What a frame from the device asks of the node.
#[derive(Debug, PartialEq)]
pub enum FrameOutcome {
    /// Nothing.
    Nothing,
    /// Send this frame (a Pong).
    Send(ServerFrame),
    /// The device acknowledged `messages` (those this connection sent it); with `seq`, it
    /// has processed its direct pushes up to that seq: persist the ack.
    Acked {
        /// The seq to persist as acknowledged.
        seq: Option<u64>,
        /// The messages acknowledged, to count.
        messages: Vec<Arc<Message>>,
    },
    /// The user opened this message (its id): count it.
    Opened(String),
}

/// Acknowledgements the Hello carried beyond what the store knew, to persist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelloAcks {
    /// Direct pushes up to this seq.
    pub seq: Option<u64>,
    /// The stream `all` up to this offset.
    pub all: Option<u64>,
}

/// Positions in flight, ascending, with their messages: boxed, and only while there are any, so an idle lane (the
/// common case, and what a parked connection keeps) holds one pointer instead of a
/// `VecDeque`'s 32 bytes. (The box is a second allocation, but only while pushes are in
/// flight; clippy's `box_collection` weighs the other way, for collections that live long.)
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
struct InFlight(Option<Box<VecDeque<Sent>>>);

/// A position sent, and its message (counted when the device acknowledges it).
type Sent = (u64, Arc<Message>);

/// The position a lane's ack moved to, and the messages it acknowledged.
type Acknowledged = (u64, Vec<Arc<Message>>);

impl InFlight {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |positions| positions.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, position: u64, message: Arc<Message>) {
        self.0
            .get_or_insert_with(Box::default)
            .push_back((position, message));
    }

    /// The message sent at `position`, if it is in flight (the latest are looked at first).
    fn find(&self, position: u64) -> Option<&Arc<Message>> {
        let positions = self.0.as_ref()?;
        positions
            .iter()
            .rev()
            .find(|(sent, _)| *sent == position)
            .map(|(_, message)| message)
    }

    /// Forgets the positions up to `position`; their messages.
    fn acknowledge(&mut self, position: u64) -> Vec<Arc<Message>> {
        let mut acked = Vec::new();
        if let Some(positions) = &mut self.0 {
            while positions.front().is_some_and(|(sent, _)| *sent <= position) {
                acked.extend(positions.pop_front().map(|(_, message)| message));
            }
            if positions.is_empty() {
                self.0 = None;
            }
        }
        acked
    }
}

/// One lane of pushes: sent and acknowledged positions (seqs, or a stream's offsets), what
/// is in flight between them, and whether the store has been read up to what was sent.
#[derive(Debug)]
struct Lane {
    last_sent: u64,
    last_acked: u64,
    /// Positions sent and not yet acknowledged, ascending; at most `ack_window` long.
    in_flight: InFlight,
    /// Whether everything the store holds above `last_sent` has been read.
    caught_up: bool,
    /// Whether `last_acked` moved since it was last persisted (the stream lane persists
    /// its place lazily).
    unpersisted: bool,
}

impl Lane {
    fn new(processed: u64) -> Self {
        Self {
            last_sent: processed,
            last_acked: processed,
            in_flight: InFlight::default(),
            caught_up: false,
            unpersisted: false,
        }
    }

    fn window_full(&self, window: u32) -> bool {
        self.in_flight.len() >= window as usize
    }

    /// A cumulative ack up to `position`: the position now acknowledged, when that moved
    /// (past `position` too when nothing is in flight after it: what lies between was passed
    /// over), and the messages it acknowledged.
    fn ack(&mut self, position: u64) -> Result<Option<Acknowledged>, SessionError> {
        if position > self.last_sent {
            return Err(SessionError::Protocol("an ack for a push never sent"));
        }
        if position <= self.last_acked {
            return Ok(None);
        }
        let acked = self.in_flight.acknowledge(position);
        self.last_acked = position;
        if self.in_flight.is_empty() {
            self.last_acked = self.last_sent;
        }
        self.unpersisted = true;
        Ok(Some((self.last_acked, acked)))
    }

    /// Positions passed over (not for the device) with nothing in flight: they count as
    /// acknowledged. Returns the new acknowledged position, when it moved.
    fn passed_over(&mut self) {
        if self.in_flight.is_empty() && self.last_sent > self.last_acked {
            self.last_acked = self.last_sent;
            self.unpersisted = true;
        }
    }

    /// Whether a live push at `position` is sent now; `None`: it is a duplicate. Above
    /// `floor`, live pushes come in order with none missing (see the module docs); below
    /// it, a live push must follow the last one sent.
    fn offer(
        &mut self,
        (position, message): (u64, &Arc<Message>),
        window: u32,
        floor: u64,
    ) -> Option<bool> {
        if position <= self.last_sent {
            return None;
        }
        if !self.caught_up {
            return Some(false);
        }
        if !self.in_order(position, floor) || self.window_full(window) {
            self.caught_up = false;
            return Some(false);
        }
        self.sent(position, message.clone());
        Some(true)
    }

    /// Passes over a position not for the device when it would have been sent live: as
    /// [`Lane::offer`] decides, without a window to fill.
    fn pass_over(&mut self, position: u64, floor: u64) {
        if self.caught_up && position > self.last_sent && self.in_order(position, floor) {
            self.last_sent = position;
        }
    }

    /// Whether a live `position` may follow the last one sent. Positions are assigned one
    /// by one, so below the floor a live push that is not the next one overtook one still
    /// on its way (or one that only the store has): that is read from the store, which
    /// keeps the order.
    fn in_order(&self, position: u64, floor: u64) -> bool {
        position == self.last_sent + 1 || self.last_sent >= floor
    }

    fn sent(&mut self, position: u64, message: Arc<Message>) {
        self.last_sent = position;
        self.in_flight.push(position, message);
    }

    fn refill(&self, window: u32) -> Option<Refill> {
        if self.caught_up || self.window_full(window) {
            return None;
        }
        Some(Refill {
            after: self.last_sent,
            limit: window - self.in_flight.len() as u32,
        })
    }

    /// The positions of `rows` (ascending, each with its message and whether it is for the
    /// device) to send now, and the messages of those it skipped; notes whether the store is
    /// caught up with after them. A row not for the device, or skipping it, is passed over
    /// (each once: a row at or below the last position sent is not looked at again).
    fn refilled<'a>(
        &mut self,
        rows: impl Iterator<Item = (u64, &'a Arc<Message>, Match)>,
        more: bool,
        window: u32,
    ) -> (Vec<u64>, Vec<Arc<Message>>) {
        let mut sent = Vec::new();
        let mut skipped = Vec::new();
        let mut left_out = false;
        for (position, message, decided) in rows {
            if position <= self.last_sent {
                continue;
            }
            if decided != Match::For {
                if decided == Match::Skipped {
                    skipped.push(message.clone());
                }
                self.last_sent = position;
                continue;
            }
            if self.window_full(window) {
                left_out = true;
                break;
            }
            self.sent(position, message.clone());
            sent.push(position);
        }
        self.caught_up = !more && !left_out;
        (sent, skipped)
    }
}

/// What a page of the stream `all` read from the store gives (see
/// [`Session::handle_stream_refill`]).
#[derive(Debug, Default)]
pub struct StreamRefilled {
    /// The pushes to send.
    pub frames: Vec<ServerFrame>,
    /// The messages of the entries that skipped the device, to count.
    pub skipped: Vec<Arc<Message>>,
}

/// The longest message id a device may report opened.
const MAX_MESSAGE_ID: usize = 128;

/// An authenticated device session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    /// Direct pushes, by seq.
    direct: Lane,
    /// The app's stream `all`, by offset.
    all: Lane,
    /// The epoch of the stream `all` the offsets are in.
    all_epoch: u64,
    /// The floor of the stream `all` (see [`Session::set_stream_floor`]).
    all_floor: u64,
    last_heard: Instant,
    last_ping: Option<Instant>,
}

impl Session {
    /// Starts a session for an admitted device at `now`. Returns it, the Welcome to send,
    /// and the acks to persist when the Hello acknowledged more than the store knew.
    pub fn start(
        now: Instant,
        admission: &Admission,
        config: Arc<SessionConfig>,
    ) -> (Self, ServerFrame, HelloAcks) {
        // A device that lost its state presents a low last_seq: the store's ack wins. A
        // device that presents a seq the store never assigned is not believed past it.
        let client_last_seq = if admission.resumed {
            admission.client_last_seq.min(admission.highest_seq)
        } else {
            0
        };
        let processed = client_last_seq.max(admission.acked_seq);
        let (all, all_processed) = stream_state(admission);
        let acks = HelloAcks {
            seq: (processed > admission.acked_seq).then_some(processed),
            all: (all_processed > admission.all.acked).then_some(all_processed),
        };
        let welcome = ServerFrame {
            kind: Some(server_frame::Kind::Welcome(Welcome {
                device_token: admission.device_token.clone(),
                resumed: admission.resumed,
                heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
                idle_timeout_ms: config.idle_timeout.as_millis() as u64,
                acked_seq: processed,
                streams: vec![all],
            })),
        };
        let session = Self {
            config,
            direct: Lane::new(processed),
            all: Lane::new(all_processed),
            all_epoch: admission.all.epoch,
            all_floor: u64::MAX,
            last_heard: now,
            last_ping: None,
        };
        (session, welcome, acks)
    }

    /// A frame from the device.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        frame: ClientFrame,
    ) -> Result<FrameOutcome, SessionError> {
        self.last_heard = now;
        match frame.kind {
            Some(client_frame::Kind::Ack(ack)) => self.handle_ack(ack),
            Some(client_frame::Kind::Ping(Ping { nonce })) => Ok(FrameOutcome::Send(ServerFrame {
                kind: Some(server_frame::Kind::Pong(Pong { nonce })),
            })),
            Some(client_frame::Kind::Pong(_)) => Ok(FrameOutcome::Nothing),
            Some(client_frame::Kind::Opened(opened)) => match opened.message_id.len() {
                0 => Ok(FrameOutcome::Nothing),
                1..=MAX_MESSAGE_ID => Ok(FrameOutcome::Opened(opened.message_id)),
                _ => Err(SessionError::Protocol("a message id over 128 bytes")),
            },
            Some(client_frame::Kind::Hello(_)) => Err(SessionError::Protocol("a second Hello")),
            None => Err(SessionError::Protocol("an empty frame")),
        }
    }

    fn handle_ack(&mut self, ack: Ack) -> Result<FrameOutcome, SessionError> {
        if ack.stream.is_empty() {
            return Ok(match self.direct.ack(ack.seq)? {
                Some((seq, messages)) => FrameOutcome::Acked {
                    seq: Some(seq),
                    messages,
                },
                None => FrameOutcome::Nothing,
            });
        }
        if ack.stream != ALL {
            return Err(SessionError::Protocol("an ack for an unknown stream"));
        }
        // Persisted lazily (see `stream_to_persist`).
        Ok(match self.all.ack(ack.offset)? {
            Some((_, messages)) if !messages.is_empty() => FrameOutcome::Acked {
                seq: None,
                messages,
            },
            _ => FrameOutcome::Nothing,
        })
    }

    /// The place in the stream `all` to persist, when it moved since it was last persisted:
    /// the epoch and the offset acknowledged, including entries passed over (not for the
    /// device) with nothing in flight.
    ///
    /// A stream's place is persisted at each heartbeat and when the connection ends, not at
    /// each ack: a broadcast to a million devices would otherwise cost a million store
    /// writes. A place lost in a crash costs nothing either: the device says where it is
    /// in its next Hello, and one that lost its own state too gets a few messages again.
    pub fn stream_to_persist(&mut self) -> Option<(u64, u64)> {
        self.all.passed_over();
        if !std::mem::take(&mut self.all.unpersisted) {
            return None;
        }
        Some((self.all_epoch, self.all.last_acked))
    }

    /// The offset of the stream `all` up to which the connection table had handed entries
    /// out when this session's connection registered (see the module docs).
    pub fn set_stream_floor(&mut self, floor: u64) {
        self.all_floor = floor;
    }

    /// A live direct push for this device.
    pub fn handle_push(&mut self, delivery: &Delivery) -> PushDecision {
        match self.direct.offer(
            (delivery.seq, &delivery.message),
            self.config.ack_window,
            u64::MAX,
        ) {
            None => PushDecision::Duplicate,
            Some(false) => PushDecision::Deferred,
            Some(true) => PushDecision::Send(push_frame(delivery.to_frame())),
        }
    }

    /// A live push of the stream `all`.
    pub fn handle_shared_push(&mut self, delivery: &SharedDelivery) -> PushDecision {
        match self.all.offer(
            (delivery.offset, &delivery.message),
            self.config.ack_window,
            self.all_floor,
        ) {
            None => PushDecision::Duplicate,
            Some(false) => PushDecision::Deferred,
            Some(true) => PushDecision::Send(push_frame(delivery.to_frame())),
        }
    }

    /// The entry at `offset` of the stream `all` skips the device (see
    /// [`Outgoing::Skipped`](crate::connections::Outgoing::Skipped)): passed over when it
    /// would have been sent live, so that a later read of the store does not read it again.
    /// Otherwise (behind, or below the floor after a gap) the store read passes over it.
    pub fn pass_over_shared(&mut self, offset: u64) {
        self.all.pass_over(offset, self.all_floor);
    }

    /// The node had to drop a live direct push for this connection (its queue was full);
    /// what was dropped is in the store, so read from there.
    pub fn fall_behind(&mut self) {
        self.direct.caught_up = false;
    }

    /// The same, for the stream `all`.
    pub fn fall_behind_stream(&mut self) {
        self.all.caught_up = false;
    }

    /// What to read from the device's queue now, if anything: only while behind and with
    /// room in the window.
    pub fn refill(&self) -> Option<Refill> {
        self.direct.refill(self.config.ack_window)
    }

    /// What to read from the stream `all` now, if anything.
    pub fn refill_stream(&self) -> Option<Refill> {
        self.all.refill(self.config.ack_window)
    }

    /// The answer to [`Session::refill`]: the rows read (ascending seq, at most the limit
    /// asked for), and whether the store holds more after them. Returns the frames to send.
    pub fn handle_refill(&mut self, rows: &[Delivery], more: bool) -> Vec<ServerFrame> {
        let window = self.config.ack_window;
        let (sent, _) = self.direct.refilled(
            rows.iter()
                .map(|delivery| (delivery.seq, &delivery.message, Match::For)),
            more,
            window,
        );
        rows.iter()
            .filter(|delivery| sent.contains(&delivery.seq))
            .map(|delivery| push_frame(delivery.to_frame()))
            .collect()
    }

    /// The answer to [`Session::refill_stream`]: entries of the stream `all` (ascending
    /// offset), and whether it holds more after them; `decide` tells whether an entry is
    /// for the device, not for it, or skips it (its user opted out, or had its frequency
    /// cap). Returns the frames to send and the messages of the entries it skipped, each
    /// once in the session.
    pub fn handle_stream_refill(
        &mut self,
        entries: &[(u64, Arc<Message>)],
        more: bool,
        decide: impl Fn(u64, &Message) -> Match,
    ) -> StreamRefilled {
        let window = self.config.ack_window;
        let rows = entries
            .iter()
            .map(|(offset, message)| (*offset, message, decide(*offset, message)));
        let (sent, skipped) = self.all.refilled(rows, more, window);
        let frames = entries
            .iter()
            .filter(|(offset, _)| sent.contains(offset))
            .map(|(offset, message)| {
                let delivery = SharedDelivery {
                    stream: ALL,
                    epoch: self.all_epoch,
                    offset: *offset,
                    message: message.clone(),
                };
                push_frame(delivery.to_frame())
            })
            .collect();
        StreamRefilled { frames, skipped }
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn deadline(&self) -> Instant {
        let idle = self.last_heard + self.config.idle_timeout;
        let quiet_since = match self.last_ping {
            Some(ping) if ping > self.last_heard => ping,
            _ => self.last_heard,
        };
        idle.min(quiet_since + self.config.heartbeat_interval)
    }

    /// Heartbeats: returns a Ping to send, or an error when the device has been silent past
    /// the idle deadline.
    ///
    /// Each heartbeat also marks the session behind, so it reads the store once more: a
    /// push whose live delivery was lost (a gateway's Deliver call that timed out, a node
    /// behind an open circuit breaker) reaches a device that stays connected by its next
    /// heartbeat, not only when it reconnects. One store read per heartbeat per device.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<Option<ServerFrame>, SessionError> {
        if now >= self.last_heard + self.config.idle_timeout {
            return Err(SessionError::IdleTimeout);
        }
        let quiet_since = match self.last_ping {
            Some(ping) if ping > self.last_heard => ping,
            _ => self.last_heard,
        };
        if now >= quiet_since + self.config.heartbeat_interval {
            self.last_ping = Some(now);
            self.direct.caught_up = false;
            return Ok(Some(ServerFrame {
                kind: Some(server_frame::Kind::Ping(Ping { nonce: 0 })),
            }));
        }
        Ok(None)
    }

    /// The highest seq sent.
    pub fn last_sent(&self) -> u64 {
        self.direct.last_sent
    }

    /// The highest seq acknowledged.
    pub fn last_acked(&self) -> u64 {
        self.direct.last_acked
    }

    /// The highest offset of the stream `all` sent.
    pub fn stream_sent(&self) -> u64 {
        self.all.last_sent
    }

    /// The epoch of the stream `all` this session's offsets are in.
    pub fn stream_epoch(&self) -> u64 {
        self.all_epoch
    }

    /// The message of a push this session sent, while it waits for the device's ack.
    pub fn sent_message(&self, push: &pigeon_proto::device::Push) -> Option<&Arc<Message>> {
        match push.stream.is_empty() {
            true => self.direct.in_flight.find(push.seq),
            false => self.all.in_flight.find(push.offset),
        }
    }
}

fn push_frame(push: pigeon_proto::device::Push) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Push(push)),
    }
}

/// Where the device starts in the stream `all`, as Welcome tells it, and the offset it has
/// processed.
///
/// The device's own word counts when it names the stream's current epoch, up to the head
/// (it cannot have processed more); the store's place otherwise. `recovered` is false when
/// the node cannot prove the device got everything since its last place: it names another
/// epoch, it lost its token (a new one was issued although it had a place), the store's
/// place was in an older epoch, or entries it had not read were trimmed.
fn stream_state(admission: &Admission) -> (StreamState, u64) {
    let place = &admission.all;
    let mut processed = place.acked;
    let mut recovered = !place.epoch_changed;
    match admission.client_all {
        Some((epoch, offset)) if epoch == place.epoch && admission.resumed => {
            processed = processed.max(offset.min(place.head));
        }
        Some((epoch, _)) if epoch != 0 => recovered = false,
        _ => {}
    }
    if processed < place.trimmed {
        recovered = false;
    }
    let state = StreamState {
        stream: ALL.to_owned(),
        epoch: epoch_text(place.epoch),
        offset: processed,
        recovered,
    };
    (state, processed)
}

#[cfg(test)]
mod tests;
