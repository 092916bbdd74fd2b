//! The WebSocket transport: each Pigeon frame is one binary WebSocket message, over plain
//! TCP (ws) or TLS (wss, when the node has a certificate).
//!
//! A new socket takes a place among the handshakes under way (`limits.max_handshakes`; the
//! oldest is evicted when they are all taken) and counts against the node's connection
//! limit once it has sent its Hello (see `device::admission`). Past the limit a new device
//! is told 1013 ("try again later") by a small, separately bounded set of refusal tasks;
//! while they are all busy, new sockets wait in the listen backlog.
//!
//! The framing is Pigeon's own (`pigeon_proto::websocket::Framer`, which the client SDK
//! uses too, and [`handshake`]) rather than a general WebSocket library's, for memory: an
//! idle device connection is the most numerous thing a node holds, and general libraries
//! keep read and write buffers, waker proxies and configuration per connection. Here an
//! idle connection holds its socket and three empty `Vec`s, and a plain (ws) one that
//! stays idle for `limits.park_after` gives up its task too and waits in the node's
//! parking lot ([`park`]). It speaks the part of RFC 6455 a server of binary messages
//! needs: the upgrade, masked client frames, fragmentation, ping/pong and the closing
//! handshake; no extensions (compression) and no subprotocols.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pigeon_proto::device::{ClientFrame, ServerFrame};
use pigeon_proto::{CloseCode, Message as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use tracing::Instrument as _;

use crate::config::Limits;
use crate::device::{
    self, DeviceContext, DeviceTransport, HandshakeTicket, PerIpSlot, TransportError,
};

mod handshake;
#[cfg(target_os = "linux")]
mod park;

/// Off Linux there is no parking lot: every connection keeps its task.
#[cfg(not(target_os = "linux"))]
mod park {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpStream;
    use tokio_util::task::TaskTracker;

    use super::{Accepted, WebSocketTransport};
    use crate::connections::ConnectionTable;
    use crate::device::Live;

    pub(crate) enum Lot {}

    impl Lot {
        pub(crate) fn start(
            _park_after: Duration,
            _tracker: &TaskTracker,
            _connections: Arc<ConnectionTable>,
        ) -> std::io::Result<Arc<Self>> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        pub(crate) fn park_after(&self) -> Option<Duration> {
            match *self {}
        }

        pub(crate) fn park(
            self: &Arc<Self>,
            _transport: WebSocketTransport<TcpStream>,
            _live: Live,
            _accepted: Box<Accepted>,
        ) {
            match **self {}
        }
    }
}

use pigeon_proto::websocket::{FrameError, Framer, Inbound, Sender, read_some};

/// Time allowed for a close handshake before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections being refused (over the limit) at once, at most.
const MAX_REFUSALS: usize = 64;
/// Time a refused device has to complete its upgrade and hear why, at most.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest upgrade request accepted.
const MAX_UPGRADE_REQUEST: usize = 8192;

/// A device connection over WebSocket.
///
/// An idle connection holds its socket and nothing else: the bytes of a frame that has not
/// fully arrived, a fragmented message being assembled and frames not yet written each live
/// in a buffer that is freed as soon as it is empty.
pub struct WebSocketTransport<S> {
    io: S,
    framer: Framer,
}

/// A byte stream a device connection runs on: TCP, or TLS over TCP.
pub trait DeviceIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> DeviceIo for T {}

impl<S: DeviceIo> WebSocketTransport<S> {
    /// A connection whose handshake is done; `input` holds what arrived after the request.
    fn new(io: S, input: Vec<u8>, max_frame: usize) -> Self {
        Self {
            io,
            framer: Framer::new(Sender::Client, max_frame, input),
        }
    }

    /// Completes the opening handshake: reads the upgrade request and answers 101, or an HTTP
    /// error saying what was wrong.
    pub async fn accept(mut io: S, max_frame: usize) -> Result<Self, String> {
        let mut input = Vec::new();
        loop {
            let read = read_some(&mut io, &mut input)
                .await
                .map_err(|error| format!("reading the upgrade request failed: {error}"))?;
            if read == 0 {
                return Err("the device closed during the upgrade".into());
            }
            match handshake::parse(&input, MAX_UPGRADE_REQUEST) {
                Ok(handshake::Parsed::Partial) => {}
                Ok(handshake::Parsed::Upgrade { len, response }) => {
                    io.write_all(&response)
                        .await
                        .map_err(|error| format!("answering the upgrade failed: {error}"))?;
                    input.drain(..len);
                    if input.is_empty() {
                        input = Vec::new();
                    }
                    return Ok(Self::new(io, input, max_frame));
                }
                Err(rejection) => {
                    let _ = io.write_all(&rejection.response()).await;
                    let _ = io.shutdown().await;
                    return Err(format!("upgrade refused: {}", rejection.message));
                }
            }
        }
    }
}

/// A device's frame, from a whole binary message.
fn decode(payload: &[u8]) -> Result<ClientFrame, TransportError> {
    ClientFrame::decode(payload).map_err(|error| TransportError::Malformed(error.to_string()))
}

fn io_error(error: io::Error) -> TransportError {
    TransportError::Io(error.to_string())
}

impl<S: DeviceIo> DeviceTransport for WebSocketTransport<S> {
    async fn recv(&mut self) -> Result<Option<ClientFrame>, TransportError> {
        loop {
            let mut closed = false;
            while let Some(inbound) = self.framer.parse(decode).map_err(frame_error)? {
                match inbound {
                    Inbound::Message(frame) => return frame.map(Some),
                    Inbound::Closed { .. } => {
                        closed = true;
                        break;
                    }
                    Inbound::Handled => {}
                }
            }
            // Pongs for the device's pings (and the echo of its Close) go out before reading
            // on. Rare, so boxed: the future an idle connection waits in stays small.
            if self.framer.has_output() {
                Box::pin(self.framer.write_out(&mut self.io))
                    .await
                    .map_err(io_error)?;
            }
            if closed || self.framer.read(&mut self.io).await.map_err(io_error)? == 0 {
                return Ok(None);
            }
        }
    }

    async fn feed(&mut self, frame: &ServerFrame) -> Result<(), TransportError> {
        // Encoding into a Vec cannot fail: it grows as needed.
        self.framer
            .queue_message(frame.encoded_len(), |out| frame.encode_raw(out));
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.framer.write_out(&mut self.io).await.map_err(io_error)
    }

    fn is_at_rest(&self) -> bool {
        !self.framer.has_output()
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.framer.queue_close(code.code(), reason);
            self.framer
                .write_out(&mut self.io)
                .await
                .map_err(io_error)?;
            // Wait for the device's Close, so the close is clean on both sides.
            while self.recv().await?.is_some() {}
            self.io.shutdown().await.map_err(io_error)
        })
        .await;
    }
}

fn frame_error(error: FrameError) -> TransportError {
    match error {
        FrameError::TooBig(_) => TransportError::TooBig,
        FrameError::Protocol(reason) => TransportError::Malformed(reason.into()),
    }
}

/// Accepts device WebSocket connections on `listener` until the node shuts down; over TLS
/// when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    context: Arc<DeviceContext>,
    limits: Limits,
    tracker: TaskTracker,
) {
    let max_frame = limits.max_device_frame_bytes;
    // Idle plain connections leave their tasks for the parking lot. (A TLS stream's state
    // lives in user space and cannot wait on a bare file descriptor.)
    let lot = match tls {
        Some(_) => None,
        None => match park::Lot::start(limits.park_after, &tracker, context.connections.clone()) {
            Ok(lot) => Some(lot),
            Err(error) => {
                tracing::warn!(%error, "no parking lot: idle connections keep their tasks");
                None
            }
        },
    };
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let shutdown = context.connections.shutdown().clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, most likely: wait a little rather than spin.
                tracing::warn!(%error, "accepting a device connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted_at = Instant::now();
        let per_ip = match &context.per_ip {
            Some(limits) => match limits.admit(peer.ip()) {
                Some(slot) => slot,
                // Over its address's limit: closed at once, before any work.
                None => continue,
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let entry = if context.connections.reserved() >= context.max_connections {
            // Full: at most MAX_REFUSALS devices are told so at once (each takes a round
            // trip or two); new sockets wait in the listen backlog meanwhile.
            let refusal = tokio::select! {
                refusal = refusals.clone().acquire_owned() => refusal,
                () = shutdown.cancelled() => break,
            };
            match refusal {
                Ok(refusal) => Entry::Refuse(refusal),
                Err(_closed) => break,
            }
        } else {
            // Every place taken by a handshake too young to evict: a rush of devices. This
            // socket waits for a place, and new ones in the listen backlog.
            let ticket = tokio::select! {
                ticket = context.handshakes.enter_waiting() => ticket,
                () = shutdown.cancelled() => break,
            };
            Entry::Handshake(ticket)
        };
        let accepted = Box::new(Accepted {
            context: context.clone(),
            _per_ip: per_ip,
            at: accepted_at,
            peer,
            max_frame,
            lot: lot.clone(),
        });
        // Plain and TLS connections are separate task types, so a plain connection's task
        // is not sized for TLS state.
        match &tls {
            None => tracker.spawn(plain(stream, accepted, entry)),
            Some(acceptor) => {
                tracker.spawn(tls_connection(stream, acceptor.clone(), accepted, entry))
            }
        };
    }
}

/// What a new socket is let in for.
enum Entry {
    /// A handshake, in its place among those under way.
    Handshake(HandshakeTicket),
    /// Only to be told that the node is full (1013), holding one of the refusals under way.
    Refuse(OwnedSemaphorePermit),
}

/// A connection the listener accepted, and what its task needs to serve it.
struct Accepted {
    context: Arc<DeviceContext>,
    /// The socket's place within its address's limits, if they are on; held as long as the
    /// connection.
    _per_ip: Option<PerIpSlot>,
    at: Instant,
    peer: SocketAddr,
    max_frame: usize,
    /// Where the connection waits while idle, if it may leave its task.
    lot: Option<Arc<park::Lot>>,
}

impl Accepted {
    /// The handshake (TLS, upgrade, Hello) must be done by then; a refusal's much sooner.
    fn deadline(&self, entry: &Entry) -> tokio::time::Instant {
        let allowed = match entry {
            Entry::Handshake(_) => self.context.session.handshake_timeout,
            Entry::Refuse(_) => REFUSAL_TIMEOUT.min(self.context.session.handshake_timeout),
        };
        tokio::time::Instant::from_std(self.at + allowed)
    }
}

/// The task of a plain (ws) connection.
///
/// Shaped for size, as it lives as long as the connection: the upgrade's state is boxed and
/// freed once done, and `accepted` is boxed because an async fn keeps its by-value
/// arguments' slots for its whole life.
fn plain(
    stream: TcpStream,
    accepted: Box<Accepted>,
    entry: Entry,
) -> impl Future<Output = ()> + Send {
    // Boxed before the task's future exists, so the task holds no slot for the socket.
    let upgrade = Box::pin(accept(
        stream,
        accepted.deadline(&entry),
        accepted.max_frame,
        accepted.peer,
        entry,
    ));
    async move {
        let Some((mut transport, entry)) = upgrade.await else {
            return;
        };
        let ticket = match entry {
            Entry::Refuse(_refusal) => return Box::pin(refuse(&mut transport)).await,
            Entry::Handshake(ticket) => ticket,
        };
        let Some(lot) = accepted.lot.clone() else {
            let run = device::run(
                &mut transport,
                &accepted.context,
                accepted.at,
                &accepted.peer,
                ticket,
            );
            Box::pin(run).await;
            return;
        };
        let admitted = device::open(
            &mut transport,
            &accepted.context,
            accepted.at,
            accepted.peer,
            ticket,
        );
        let Some(live) = Box::pin(admitted).await else {
            return;
        };
        let park_after = lot.park_after();
        Box::pin(serve_parkable(transport, live, accepted, lot, park_after)).await;
    }
}

/// Runs an admitted plain connection until it ends, or until it has been idle for
/// `park_after` (if given) and leaves its task for the parking lot (which brings it back
/// here when it has something to do).
async fn serve_parkable(
    mut transport: WebSocketTransport<TcpStream>,
    mut live: device::Live,
    accepted: Box<Accepted>,
    lot: Arc<park::Lot>,
    park_after: Option<Duration>,
) {
    let span = live.span(&accepted.peer);
    let context = &accepted.context;
    let driven = device::drive(&mut transport, context, &mut live, park_after);
    let ending = match driven.instrument(span.clone()).await {
        Ok(()) => {
            lot.park(transport, live, accepted);
            return;
        }
        Err(ending) => ending,
    };
    device::end(&mut transport, context, live, ending, accepted.peer)
        .instrument(span)
        .await;
}

/// The task of a TLS (wss) connection.
async fn tls_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    accepted: Box<Accepted>,
    entry: Entry,
) {
    let peer = accepted.peer;
    let deadline = accepted.deadline(&entry);
    let tls = tokio::time::timeout_at(deadline, acceptor.accept(stream));
    let tls = match &entry {
        Entry::Handshake(ticket) => tokio::select! {
            tls = tls => tls,
            () = ticket.evicted() => return,
        },
        Entry::Refuse(_) => tls.await,
    };
    match tls {
        Ok(Ok(stream)) => {
            let upgrade = accept(stream, deadline, accepted.max_frame, peer, entry);
            let Some((mut transport, entry)) = Box::pin(upgrade).await else {
                return;
            };
            match entry {
                Entry::Refuse(_refusal) => refuse(&mut transport).await,
                Entry::Handshake(ticket) => {
                    let context = &accepted.context;
                    device::run(&mut transport, context, accepted.at, &peer, ticket).await;
                }
            }
        }
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// The WebSocket upgrade, before `deadline` (and, for a handshake, before it is evicted).
async fn accept<S: DeviceIo>(
    io: S,
    deadline: tokio::time::Instant,
    max_frame: usize,
    peer: SocketAddr,
    entry: Entry,
) -> Option<(WebSocketTransport<S>, Entry)> {
    let upgrade = tokio::time::timeout_at(deadline, WebSocketTransport::accept(io, max_frame));
    let upgraded = match &entry {
        Entry::Handshake(ticket) => tokio::select! {
            upgraded = upgrade => upgraded,
            () = ticket.evicted() => {
                tracing::debug!(%peer, "evicted during the WebSocket upgrade");
                return None;
            }
        },
        Entry::Refuse(_) => upgrade.await,
    };
    match upgraded {
        Ok(Ok(transport)) => Some((transport, entry)),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "device connection not established");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "WebSocket upgrade timed out");
            None
        }
    }
}

/// Tells an upgraded device that the node is full (1013), without waiting long for its
/// answer: the refusal's place is wanted for the next one.
async fn refuse<S: DeviceIo>(transport: &mut WebSocketTransport<S>) {
    let refusal = transport.close(CloseCode::TryAgainLater, "node at its connection limit");
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refusal).await;
}

#[cfg(test)]
mod tests {
    use pigeon_proto::device::{Ack, Hello, client_frame, server_frame};

    use tokio::io::AsyncReadExt as _;

    use pigeon_proto::websocket::{self as frame, Opcode};

    use super::*;
    use crate::config::AppSettings;
    use crate::connections::ConnectionTable;
    use crate::session::SessionConfig;
    use crate::store::embedded::EmbeddedStore;

    /// A frame as a device sends it: masked, ending its message or not.
    fn masked(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_frame(fin, opcode, payload, Some(rand::random()), &mut out);
        out
    }

    fn app() -> AppSettings {
        AppSettings::new("demo", "key", "secret")
    }

    fn context(dir: &std::path::Path) -> Arc<DeviceContext> {
        let connections = Arc::new(ConnectionTable::new(
            16,
            tokio_util::sync::CancellationToken::new(),
        ));
        let store =
            EmbeddedStore::open(dir, &crate::config::Limits::default(), connections.clone())
                .unwrap();
        Arc::new(DeviceContext {
            connections,
            store: Arc::new(store),
            apps: vec![app()],
            session: Arc::new(SessionConfig {
                handshake_timeout: Duration::from_secs(10),
                heartbeat_interval: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(90),
                ack_window: 32,
            }),
            presence: None,
            handshakes: device::Handshakes::new(16),
            max_connections: 16,
            max_credential_lifetime: Duration::from_secs(3600),
            per_ip: None,
            receipts: Arc::default(),
            caps: Arc::new(crate::caps::SharedCaps::new(&[])),
        })
    }

    fn handshake(context: &DeviceContext) -> Entry {
        Entry::Handshake(
            context
                .handshakes
                .enter(Instant::now())
                .expect("a free place"),
        )
    }

    /// A plain connection accepted from a client socket, and the client's end.
    async fn accepted(context: Arc<DeviceContext>) -> (TcpStream, Box<Accepted>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let accepted = Box::new(Accepted {
            context,
            _per_ip: None,
            at: Instant::now(),
            peer,
            max_frame: 4096,
            lot: None,
        });
        (stream, accepted, client)
    }

    /// A busy plain connection's task holds the socket, the framing and boxed futures for
    /// what it is doing; an idle one has none (it waits in the parking lot: see
    /// `park::tests`). The bound keeps the task's own future from quietly growing.
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let context = context(dir.path());
        let (stream, accepted, _client) = accepted(context.clone()).await;
        let task = plain(stream, accepted, handshake(&context));
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 256,
            "a plain connection's task future is {size} bytes"
        );
    }

    fn client_bytes(frame: &pigeon_proto::device::ClientFrame) -> Vec<u8> {
        masked(true, Opcode::Binary, &frame.encode_to_vec())
    }

    /// Sends an upgrade request with `then` in the same write (a client that pipelines its
    /// first frames), and reads the 101.
    async fn upgrade(client: &mut TcpStream, then: &[u8]) {
        let mut request = b"GET / HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
        request.extend_from_slice(then);
        client.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\n") {
            response.push(client.read_u8().await.unwrap());
        }
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
    }

    /// Reads one unmasked frame from the server: (first byte, payload).
    async fn read_frame(client: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
        let len = match head[1] & 0x7F {
            126 => usize::from(client.read_u16().await.unwrap()),
            127 => client.read_u64().await.unwrap() as usize,
            short => usize::from(short),
        };
        let mut payload = vec![0; len];
        client.read_exact(&mut payload).await.unwrap();
        (head[0], payload)
    }

    /// The whole conversation over raw bytes: a Hello sent in the same write as the upgrade
    /// request, a fragmented Ack with a Ping between its fragments, and the closing
    /// handshake.
    #[tokio::test]
    async fn speaks_rfc_6455_on_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let context = context(dir.path());
        let (stream, accepted, mut client) = accepted(context.clone()).await;
        let task = tokio::spawn(plain(stream, accepted, handshake(&context)));
        let hello = pigeon_proto::device::ClientFrame {
            kind: Some(client_frame::Kind::Hello(Hello {
                credential: pigeon_proto::credential::mint(
                    "demo",
                    app().signing_key(),
                    "alice",
                    crate::message::unix_millis() / 1000,
                    600,
                ),
                device_token: String::new(),
                last_seq: 0,
                client: "wire-test".into(),
                streams: Vec::new(),
            })),
        };
        upgrade(&mut client, &client_bytes(&hello)).await;
        let (first, welcome) = read_frame(&mut client).await;
        assert_eq!(first, 0x82);
        let welcome = ServerFrame::decode(&welcome[..]).unwrap();
        assert!(matches!(welcome.kind, Some(server_frame::Kind::Welcome(_))));

        // An Ack of seq 0 in two fragments, a Ping between them: the Pong comes back.
        let ack = pigeon_proto::device::ClientFrame {
            kind: Some(client_frame::Kind::Ack(Ack::default())),
        }
        .encode_to_vec();
        let (head, tail) = ack.split_at(1);
        let mut bytes = masked(false, Opcode::Binary, head);
        bytes.extend(masked(true, Opcode::Ping, b"are you there"));
        bytes.extend(masked(true, Opcode::Continuation, tail));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await,
            (0x8A, b"are you there".to_vec())
        );

        // The device closes; the node echoes its code and ends the connection.
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        client
            .write_all(&masked(true, Opcode::Close, &close))
            .await
            .unwrap();
        let (first, payload) = read_frame(&mut client).await;
        assert_eq!(first, 0x88);
        assert_eq!(frame::close_code(&payload), 1000);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the connection ends after the closing handshake")
            .unwrap();
    }

    /// Frames that arrive together are all handled before the connection parks: with the
    /// Hello, a Ping in the same write (read into the framing at once, so the socket has
    /// nothing more to report) is answered, though the connection parks as soon as idle.
    #[tokio::test]
    async fn frames_read_together_are_handled_before_parking() {
        let dir = tempfile::tempdir().unwrap();
        let context = context(dir.path());
        let tracker = TaskTracker::new();
        let lot = park::Lot::start(Duration::ZERO, &tracker, context.connections.clone()).unwrap();
        for round in 0..20 {
            let (stream, mut accepted, mut client) = accepted(context.clone()).await;
            accepted.lot = Some(lot.clone());
            tokio::spawn(plain(stream, accepted, handshake(&context)));
            let hello = pigeon_proto::device::ClientFrame {
                kind: Some(client_frame::Kind::Hello(Hello {
                    credential: pigeon_proto::credential::mint(
                        "demo",
                        app().signing_key(),
                        &format!("pat{round}"),
                        crate::message::unix_millis() / 1000,
                        600,
                    ),
                    ..Default::default()
                })),
            };
            let ping = pigeon_proto::device::ClientFrame {
                kind: Some(client_frame::Kind::Ping(pigeon_proto::device::Ping {
                    nonce: round,
                })),
            };
            let mut both = client_bytes(&hello);
            both.extend(client_bytes(&ping));
            upgrade(&mut client, &both).await;
            let (_, welcome) = read_frame(&mut client).await;
            let welcome = ServerFrame::decode(&welcome[..]).unwrap();
            assert!(matches!(welcome.kind, Some(server_frame::Kind::Welcome(_))));
            let (_, pong) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
                .await
                .expect("the Ping read with the Hello is answered");
            let pong = ServerFrame::decode(&pong[..]).unwrap();
            assert_eq!(
                pong.kind,
                Some(server_frame::Kind::Pong(pigeon_proto::device::Pong {
                    nonce: round
                }))
            );
        }
    }

    /// A frame that breaks the protocol is answered with a close code saying so.
    #[tokio::test]
    async fn a_broken_frame_closes_with_1002() {
        let dir = tempfile::tempdir().unwrap();
        let context = context(dir.path());
        let (stream, accepted, mut client) = accepted(context.clone()).await;
        tokio::spawn(plain(stream, accepted, handshake(&context)));
        upgrade(&mut client, &[]).await;
        // Unmasked: a client must mask.
        client.write_all(&[0x82, 0x01, 0x00]).await.unwrap();
        let (first, payload) = read_frame(&mut client).await;
        assert_eq!(first, 0x88);
        assert_eq!(frame::close_code(&payload), 1002);
        assert_eq!(
            std::str::from_utf8(&payload[2..]).unwrap(),
            "malformed frame: frames from a client must be masked"
        );
    }
}
