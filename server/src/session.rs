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
    ClientFrame, Hello, Ping, Pong, ServerFrame, Welcome, client_frame, server_frame,
};

use crate::message::Delivery;

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
    /// The highest seq the store holds as acknowledged.
    pub acked_seq: u64,
    /// The highest seq the store has assigned to this device.
    pub highest_seq: u64,
    /// The highest seq the device says it has processed.
    pub client_last_seq: u64,
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
#[derive(Debug, PartialEq, Eq)]
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
#[derive(Debug, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Nothing.
    Nothing,
    /// Send this frame (a Pong).
    Send(ServerFrame),
    /// The device has processed everything up to this seq: persist the ack.
    Acked(u64),
}

/// An authenticated device session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    last_sent: u64,
    last_acked: u64,
    /// Seqs sent and not yet acknowledged, ascending; at most `ack_window` long. Freed when
    /// empty, so an idle session holds no buffer.
    in_flight: VecDeque<u64>,
    /// Whether everything the store holds above `last_sent` has been read.
    caught_up: bool,
    last_heard: Instant,
    last_ping: Option<Instant>,
}

impl Session {
    /// Starts a session for an admitted device at `now`. Returns it, the Welcome to send,
    /// and an ack to persist when the Hello acknowledged more than the store knew.
    pub fn start(
        now: Instant,
        admission: &Admission,
        config: Arc<SessionConfig>,
    ) -> (Self, ServerFrame, Option<u64>) {
        // A device that lost its state presents a low last_seq: the store's ack wins. A
        // device that presents a seq the store never assigned is not believed past it.
        let client_last_seq = if admission.resumed {
            admission.client_last_seq.min(admission.highest_seq)
        } else {
            0
        };
        let processed = client_last_seq.max(admission.acked_seq);
        let ack_to_persist = (processed > admission.acked_seq).then_some(processed);
        let welcome = ServerFrame {
            kind: Some(server_frame::Kind::Welcome(Welcome {
                device_token: admission.device_token.clone(),
                resumed: admission.resumed,
                heartbeat_ms: config.heartbeat_interval.as_millis() as u64,
                idle_timeout_ms: config.idle_timeout.as_millis() as u64,
                acked_seq: processed,
            })),
        };
        let session = Self {
            config,
            last_sent: processed,
            last_acked: processed,
            in_flight: VecDeque::new(),
            caught_up: false,
            last_heard: now,
            last_ping: None,
        };
        (session, welcome, ack_to_persist)
    }

    /// A frame from the device.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        frame: ClientFrame,
    ) -> Result<FrameOutcome, SessionError> {
        self.last_heard = now;
        match frame.kind {
            Some(client_frame::Kind::Ack(ack)) => self.handle_ack(ack.seq),
            Some(client_frame::Kind::Ping(Ping { nonce })) => Ok(FrameOutcome::Send(ServerFrame {
                kind: Some(server_frame::Kind::Pong(Pong { nonce })),
            })),
            Some(client_frame::Kind::Pong(_)) => Ok(FrameOutcome::Nothing),
            Some(client_frame::Kind::Hello(_)) => Err(SessionError::Protocol("a second Hello")),
            None => Err(SessionError::Protocol("an empty frame")),
        }
    }

    fn handle_ack(&mut self, seq: u64) -> Result<FrameOutcome, SessionError> {
        if seq > self.last_sent {
            return Err(SessionError::Protocol("an ack for a seq never sent"));
        }
        if seq <= self.last_acked {
            return Ok(FrameOutcome::Nothing);
        }
        self.last_acked = seq;
        while self.in_flight.front().is_some_and(|&sent| sent <= seq) {
            self.in_flight.pop_front();
        }
        if self.in_flight.is_empty() {
            self.in_flight = VecDeque::new();
        }
        Ok(FrameOutcome::Acked(seq))
    }

    /// A live push for this device.
    pub fn handle_push(&mut self, delivery: &Delivery) -> PushDecision {
        if delivery.seq <= self.last_sent {
            return PushDecision::Duplicate;
        }
        if !self.caught_up {
            return PushDecision::Deferred;
        }
        // Seqs are assigned one by one, so a live push that is not the next seq overtook
        // one still on its way (or one that only the store has): read from the store, which
        // keeps the order.
        if delivery.seq != self.last_sent + 1 || self.window_full() {
            self.caught_up = false;
            return PushDecision::Deferred;
        }
        PushDecision::Send(self.send(delivery))
    }

    /// The node had to drop a live push for this connection (its queue was full); what was
    /// dropped is in the store, so read from there.
    pub fn fall_behind(&mut self) {
        self.caught_up = false;
    }

    /// What to read from the store now, if anything: only while behind and with room in the
    /// window.
    pub fn refill(&self) -> Option<Refill> {
        if self.caught_up || self.window_full() {
            return None;
        }
        Some(Refill {
            after: self.last_sent,
            limit: self.config.ack_window - self.in_flight.len() as u32,
        })
    }

    /// The answer to [`Session::refill`]: the rows read (ascending seq, at most the limit
    /// asked for), and whether the store holds more after them. Returns the frames to send.
    pub fn handle_refill(&mut self, rows: &[Delivery], more: bool) -> Vec<ServerFrame> {
        let mut frames = Vec::with_capacity(rows.len());
        let mut left_out = false;
        for delivery in rows {
            if delivery.seq <= self.last_sent {
                continue;
            }
            if self.window_full() {
                left_out = true;
                break;
            }
            frames.push(self.send(delivery));
        }
        self.caught_up = !more && !left_out;
        frames
    }

    fn send(&mut self, delivery: &Delivery) -> ServerFrame {
        self.last_sent = delivery.seq;
        self.in_flight.push_back(delivery.seq);
        ServerFrame {
            kind: Some(server_frame::Kind::Push(delivery.to_frame())),
        }
    }

    fn window_full(&self) -> bool {
        self.in_flight.len() >= self.config.ack_window as usize
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
            self.caught_up = false;
            return Ok(Some(ServerFrame {
                kind: Some(server_frame::Kind::Ping(Ping { nonce: 0 })),
            }));
        }
        Ok(None)
    }

    /// The highest seq sent.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// The highest seq acknowledged.
    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }
}

#[cfg(test)]
mod tests;
