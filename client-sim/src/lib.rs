//! Pigeon's reference client SDK.
//!
//! # Layout
//! - [`Connection`]: one connection to a node: Hello/Welcome, pushes, acks, heartbeats.
//!   Use it when you want to see every step (tests do).
//! - [`Device`]: a device as an app holds it: reconnects with exponential backoff and
//!   jitter, keeps its [`DeviceState`] (token and last processed seq) across reconnects,
//!   and drops duplicate pushes, so the app sees each message once, in order.
//! - [`Backoff`]: the reconnect delays.
//! - [`ConnectOptions`]: the CA to trust for `wss://` and `quic://`, a source address.
//!   The transports themselves live in the private `link` module.
//!
//! The binary `pigeon-sim` (src/bin) drives these as one device from the command line.
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use pigeon_proto::CloseCode;
use pigeon_proto::device::{
    Ack, ClientFrame, Hello, Opened, Pong, Push, StreamPosition, Welcome, client_frame,
    server_frame,
};
use serde::{Deserialize, Serialize};

mod link;
pub mod swarm;

pub use link::{ConnectOptions, defer_port_choice};
use link::{Incoming, Link};

/// Time allowed to connect and receive Welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not a `ws://`, `wss://` or `quic://` URL with a host.
    #[error("bad URL {0}: expected ws://, wss:// or quic://host:port/")]
    Url(String),
    /// The connection could not be made, or broke.
    #[error("connection failed: {0}")]
    Io(String),
    /// TLS failed: an untrusted certificate, a wrong server name, or a CA file that could
    /// not be read.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The node closed the connection with this code and reason.
    #[error("closed by the node: {code} {reason}")]
    Closed {
        /// The close code (see `pigeon_proto::CloseCode`).
        code: u16,
        /// The node's reason.
        reason: String,
    },
    /// The node sent something that is not a valid frame, or not the expected one.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The node was silent past its idle timeout.
    #[error("the node went silent")]
    Silent,
    /// The device state file could not be read or written.
    #[error("state file: {0}")]
    State(String),
}

impl ClientError {
    /// Whether reconnecting may help. A refused credential or a replaced session will not
    /// get better by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Closed { code, .. } => {
                CloseCode::from_code(*code).is_none_or(CloseCode::should_reconnect)
            }
            ClientError::Url(_) | ClientError::State(_) | ClientError::Tls(_) => false,
            _ => true,
        }
    }

    /// The close code, when the node closed the connection.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What a device keeps between connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The token the node issued; empty before the first connection.
    pub device_token: String,
    /// The highest seq of a direct push processed.
    pub last_seq: u64,
    /// The epoch of the app's stream `all` (pushes to every device), as Welcome gave it;
    /// empty before the first connection.
    #[serde(default)]
    pub all_epoch: String,
    /// The highest offset of the stream `all` processed, in that epoch.
    #[serde(default)]
    pub all_offset: u64,
}

/// The name of the stream every device of an app reads.
pub const ALL: &str = "all";

impl DeviceState {
    /// Whether `push` was processed already (it came again after a reconnect).
    pub fn has_processed(&self, push: &Push) -> bool {
        if push.stream.is_empty() {
            push.seq <= self.last_seq
        } else {
            push.offset <= self.all_offset
        }
    }

    /// Records `push` as processed.
    pub fn processed(&mut self, push: &Push) {
        if push.stream.is_empty() {
            self.last_seq = self.last_seq.max(push.seq);
        } else {
            self.all_offset = self.all_offset.max(push.offset);
        }
    }

    /// Takes what a Welcome says: a new token means no history; a stream's epoch and
    /// position are the node's.
    pub fn welcomed(&mut self, welcome: &Welcome) {
        if !welcome.resumed {
            self.last_seq = 0;
        }
        self.device_token = welcome.device_token.clone();
        if let Some(all) = welcome.streams.iter().find(|stream| stream.stream == ALL) {
            if all.epoch != self.all_epoch || !welcome.resumed {
                self.all_offset = all.offset;
            } else {
                self.all_offset = self.all_offset.max(all.offset);
            }
            self.all_epoch = all.epoch.clone();
        }
    }

    /// The stream positions a Hello carries.
    fn positions(&self) -> Vec<StreamPosition> {
        if self.all_epoch.is_empty() {
            return Vec::new();
        }
        vec![StreamPosition {
            stream: ALL.to_owned(),
            epoch: self.all_epoch.clone(),
            offset: self.all_offset,
        }]
    }
}

impl DeviceState {
    /// Reads a state file; a missing file is a fresh device.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|error| ClientError::State(error.to_string()))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(ClientError::State(error.to_string())),
        }
    }

    /// Writes the state file atomically (write aside, then rename).
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        let text =
            serde_json::to_string(self).map_err(|error| ClientError::State(error.to_string()))?;
        let aside = path.with_extension("tmp");
        std::fs::write(&aside, text).map_err(|error| ClientError::State(error.to_string()))?;
        std::fs::rename(&aside, path).map_err(|error| ClientError::State(error.to_string()))
    }
}

/// One connection to a node.
pub struct Connection {
    link: Link,
    welcome: Welcome,
    idle_timeout: Duration,
}

impl Connection {
    /// Connects to `url` (`ws://`, `wss://` or `quic://`), says Hello with `credential` and
    /// `state`, and waits for Welcome.
    pub async fn connect(
        url: &str,
        credential: &str,
        state: &DeviceState,
    ) -> Result<Self, ClientError> {
        Self::connect_with(url, credential, state, &ConnectOptions::default()).await
    }

    /// [`Connection::connect`] with options (a CA to trust, a source address).
    pub async fn connect_with(
        url: &str,
        credential: &str,
        state: &DeviceState,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let connecting = async {
            let link = Link::open(url, options).await?;
            let mut connection = Self {
                link,
                welcome: Welcome::default(),
                idle_timeout: CONNECT_TIMEOUT,
            };
            connection
                .send(client_frame::Kind::Hello(Hello {
                    credential: credential.to_owned(),
                    device_token: state.device_token.clone(),
                    last_seq: state.last_seq,
                    client: concat!("pigeon-client/", env!("CARGO_PKG_VERSION")).into(),
                    streams: state.positions(),
                }))
                .await?;
            match connection.recv().await? {
                server_frame::Kind::Welcome(welcome) => {
                    connection.idle_timeout =
                        Duration::from_millis(welcome.idle_timeout_ms.max(1000));
                    connection.welcome = welcome;
                    Ok(connection)
                }
                other => Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                ))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Io("timed out connecting".into()))?
    }

    /// Moves a QUIC connection to a new local UDP socket (a new port), as a phone that
    /// changes networks does; the connection and its session go on. Fails on WebSocket.
    pub fn rebind(&self) -> Result<(), ClientError> {
        self.link.rebind()
    }

    /// The local UDP address of a QUIC connection.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.link.local_addr()
    }

    /// The node's Welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The next push. Answers pings on the way; fails when the node closes the connection
    /// or is silent past its idle timeout.
    pub async fn next_push(&mut self) -> Result<Push, ClientError> {
        loop {
            match self.recv().await? {
                server_frame::Kind::Push(push) => return Ok(push),
                server_frame::Kind::Ping(ping) => {
                    self.send(client_frame::Kind::Pong(Pong { nonce: ping.nonce }))
                        .await?;
                }
                server_frame::Kind::Pong(_) => {}
                server_frame::Kind::Welcome(_) => {
                    return Err(ClientError::Protocol("a second Welcome".into()));
                }
            }
        }
    }

    /// Acknowledges every direct push up to `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.send(client_frame::Kind::Ack(Ack {
            seq,
            ..Ack::default()
        }))
        .await
    }

    /// Acknowledges every push of `stream` up to `offset`.
    pub async fn ack_stream(&mut self, stream: &str, offset: u64) -> Result<(), ClientError> {
        self.send(client_frame::Kind::Ack(Ack {
            seq: 0,
            stream: stream.to_owned(),
            offset,
        }))
        .await
    }

    /// Acknowledges `push` and everything before it in its lane (direct, or its stream).
    pub async fn ack_push(&mut self, push: &Push) -> Result<(), ClientError> {
        if push.stream.is_empty() {
            self.ack(push.seq).await
        } else {
            self.ack_stream(&push.stream, push.offset).await
        }
    }

    /// Reports that the user opened the message `message_id` (counted once per device in
    /// the message's status).
    pub async fn opened(&mut self, message_id: &str) -> Result<(), ClientError> {
        self.send(client_frame::Kind::Opened(Opened {
            message_id: message_id.to_owned(),
        }))
        .await
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: client_frame::Kind) -> Result<(), ClientError> {
        self.link.send(&ClientFrame { kind: Some(kind) }).await
    }

    /// The next frame from the node.
    async fn recv(&mut self) -> Result<server_frame::Kind, ClientError> {
        let incoming = tokio::time::timeout(self.idle_timeout, self.link.recv())
            .await
            .map_err(|_| ClientError::Silent)??;
        match incoming {
            Incoming::Frame(frame) => frame
                .kind
                .ok_or_else(|| ClientError::Protocol("an empty frame".into())),
            Incoming::Closed { code, reason } => Err(ClientError::Closed { code, reason }),
        }
    }

    /// Closes the connection normally.
    pub async fn close(self) {
        self.link.close().await;
    }
}

/// Reconnect delays: exponential, capped, with full jitter (a random delay between zero and
/// the exponential bound), so that a fleet cut off at once does not return at once.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        bound.mul_f64(rand::random::<f64>())
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(30))
    }
}

/// A device as an app holds it: one logical session across connections.
pub struct Device {
    url: String,
    credential: String,
    state: DeviceState,
    connection: Option<Connection>,
    backoff: Backoff,
    options: ConnectOptions,
}

impl Device {
    /// A device that will connect to `url` with `credential`, resuming `state`.
    pub fn new(url: impl Into<String>, credential: impl Into<String>, state: DeviceState) -> Self {
        Self {
            url: url.into(),
            credential: credential.into(),
            state,
            connection: None,
            backoff: Backoff::default(),
            options: ConnectOptions::default(),
        }
    }

    /// Replaces the connect options (a CA to trust, a source address).
    pub fn with_options(mut self, options: ConnectOptions) -> Self {
        self.options = options;
        self
    }

    /// Replaces the reconnect delays.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The state to keep (device token and last processed seq).
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// The next new push, in seq order. Connects and reconnects as needed; a push already
    /// processed (seq at or below the last one) is acknowledged again and skipped. Returns
    /// an error only when retrying cannot help.
    pub async fn next(&mut self) -> Result<Push, ClientError> {
        loop {
            let connection = match &mut self.connection {
                Some(connection) => connection,
                None => {
                    let connecting = Connection::connect_with(
                        &self.url,
                        &self.credential,
                        &self.state,
                        &self.options,
                    );
                    match connecting.await {
                        Ok(connection) => {
                            let welcome = connection.welcome();
                            self.state.welcomed(welcome);
                            tracing::info!(
                                token = %welcome.device_token,
                                resumed = welcome.resumed,
                                "connected"
                            );
                            self.backoff.reset();
                            self.connection.insert(connection)
                        }
                        Err(error) => {
                            self.wait_or_fail(error).await?;
                            continue;
                        }
                    }
                }
            };
            match connection.next_push().await {
                Ok(push) if self.state.has_processed(&push) => {
                    let _ = connection.ack_push(&push).await;
                }
                Ok(push) => return Ok(push),
                Err(error) => {
                    self.connection = None;
                    self.wait_or_fail(error).await?;
                }
            }
        }
    }

    /// Marks `push`, and everything before it in its lane, processed: updates the state
    /// and acknowledges.
    pub async fn processed(&mut self, push: &Push) {
        self.state.processed(push);
        if let Some(connection) = &mut self.connection
            && connection.ack_push(push).await.is_err()
        {
            // The next `next` reconnects; the node replays anything unacknowledged.
            self.connection = None;
        }
    }

    async fn wait_or_fail(&mut self, error: ClientError) -> Result<(), ClientError> {
        if !error.is_retryable() {
            return Err(error);
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(%error, ?delay, "disconnected; reconnecting");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..10u32 {
            let bound = Duration::from_millis(100 * (1u64 << attempt)).min(Duration::from_secs(1));
            assert!(backoff.next_delay() <= bound);
        }
        // Jitter: over many draws at the cap, not all delays are equal.
        let draws: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff.next_delay()).collect();
        assert!(draws.len() > 1);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn fatal_closes_are_not_retried() {
        let replaced = ClientError::Closed {
            code: 4003,
            reason: String::new(),
        };
        let going_away = ClientError::Closed {
            code: 1001,
            reason: String::new(),
        };
        assert!(!replaced.is_retryable());
        assert!(going_away.is_retryable());
        assert!(ClientError::Silent.is_retryable());
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("pigeon-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("device.state");
        assert_eq!(DeviceState::load(&path).ok(), Some(DeviceState::default()));
        let state = DeviceState {
            device_token: "t".into(),
            last_seq: 9,
            ..DeviceState::default()
        };
        state.save(&path).expect("save");
        assert_eq!(DeviceState::load(&path).ok(), Some(state));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
