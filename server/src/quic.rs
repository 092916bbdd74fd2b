//! The QUIC transport: the device protocol on one bidirectional stream per connection, each
//! frame behind a varint length prefix (`pigeon_proto::framing`), ALPN `pigeon/1`.
//!
//! QUIC's connection ids let a phone that changes network (a new address and port) keep its
//! connection and session: the server follows the migration, nothing reconnects.
//!
//! Limits: a connection may open one bidirectional stream and no unidirectional one (the
//! transport parameters say so, so a second stream cannot even be opened); past the node's
//! connection limit new connections are refused at the QUIC level; the handshake deadline
//! covers the QUIC handshake, the stream and the Hello; the idle timeout is QUIC's too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pigeon_proto::CloseCode;
use pigeon_proto::device::{ClientFrame, ServerFrame};
use pigeon_proto::framing::{self, FrameError};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ConnectionError, Endpoint, ReadError, VarInt};
use tokio_util::task::TaskTracker;

use crate::device::{self, DeviceContext, DeviceTransport, HandshakeTicket, TransportError};

/// Bytes read off the stream at once, at most.
const READ_CHUNK: usize = 4096;
/// Flow-control windows: push traffic is small, and large windows cost memory per
/// connection.
const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024;
const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024;
const SEND_WINDOW: u64 = 256 * 1024;

/// A device connection over QUIC.
pub struct QuicTransport {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes received and not yet a whole frame; unallocated when empty.
    received: BytesMut,
    /// Frames fed and not yet flushed.
    pending: Vec<u8>,
    max_frame: usize,
}

impl QuicTransport {
    /// Wraps an accepted connection and its control stream.
    pub fn new(
        connection: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        max_frame: usize,
    ) -> Self {
        Self {
            connection,
            send,
            recv,
            received: BytesMut::new(),
            pending: Vec::new(),
            max_frame,
        }
    }
}

fn read_error(error: ReadError) -> TransportError {
    TransportError::Io(error.to_string())
}

impl DeviceTransport for QuicTransport {
    async fn recv(&mut self) -> Result<Option<ClientFrame>, TransportError> {
        loop {
            match framing::decode::<ClientFrame>(&mut self.received, self.max_frame) {
                Ok(Some(frame)) => {
                    if self.received.is_empty() {
                        self.received = BytesMut::new();
                    }
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(FrameError::TooBig { .. }) => return Err(TransportError::TooBig),
                Err(FrameError::Malformed(message)) => {
                    return Err(TransportError::Malformed(message));
                }
            }
            // `read_chunk` is cancel-safe: a chunk is either returned or left in the stream.
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.received.extend_from_slice(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(ReadError::ConnectionLost(
                    ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed,
                )) => return Ok(None),
                Err(error) => return Err(read_error(error)),
            }
        }
    }

    async fn feed(&mut self, frame: &ServerFrame) -> Result<(), TransportError> {
        framing::encode(frame, &mut self.pending);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        let result = self.send.write_all(&self.pending).await;
        self.pending.clear();
        if self.pending.capacity() > 4096 {
            self.pending = Vec::new();
        }
        result.map_err(|error| TransportError::Io(error.to_string()))
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        self.connection
            .close(VarInt::from_u32(u32::from(code.code())), reason.as_bytes());
    }
}

/// A QUIC endpoint for devices on `addr`, with the node's certificate (`tls`, whose ALPN
/// must be `pigeon/1` and protocol TLS 1.3) and idle timeout.
pub fn endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    idle_timeout: Duration,
) -> std::io::Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|error| std::io::Error::other(format!("QUIC TLS configuration: {error}")))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_idle_timeout(idle_timeout.try_into().ok());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    server.migration(true);
    Endpoint::server(server, addr)
}

/// Accepts device connections on `endpoint` until the node shuts down.
pub async fn serve(
    endpoint: Endpoint,
    context: Arc<DeviceContext>,
    max_frame: usize,
    tracker: TaskTracker,
) {
    let shutdown = context.connections.shutdown().clone();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let accepted_at = Instant::now();
        if context.connections.reserved() >= context.max_connections {
            // At the limit: refuse before any handshake work (CONNECTION_REFUSED).
            incoming.refuse();
            continue;
        }
        // A client's first packet may come from a spoofed address. Before that address is
        // charged against per-address limits, or takes a handshake place when places are
        // scarce, the client proves it by answering a Retry (one more round trip).
        let places_scarce = context.handshakes.in_progress() * 2 >= context.handshakes.capacity();
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && (context.per_ip.is_some() || places_scarce)
        {
            if let Err(error) = incoming.retry() {
                tracing::debug!(%error, "QUIC retry not sent");
            }
            continue;
        }
        let per_ip = match &context.per_ip {
            Some(limits) => match limits.admit(incoming.remote_address().ip()) {
                Some(slot) => slot,
                None => {
                    incoming.refuse();
                    continue;
                }
            },
            None => None,
        };
        // A rush of devices: wait for a place (new connection attempts wait in the
        // endpoint meanwhile).
        let ticket = tokio::select! {
            ticket = context.handshakes.enter_waiting() => ticket,
            () = shutdown.cancelled() => break,
        };
        let context = context.clone();
        tracker.spawn(async move {
            let _per_ip = per_ip;
            let peer = incoming.remote_address();
            let connected = connect(incoming, &context, accepted_at, max_frame, ticket);
            if let Err(error) = connected.await {
                tracing::debug!(%peer, %error, "QUIC device connection not established");
            }
        });
    }
    // Connections close themselves with 1001 when the shutdown token fires; wait briefly
    // for those closes to reach the devices before the endpoint goes.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn connect(
    incoming: quinn::Incoming,
    context: &DeviceContext,
    accepted_at: Instant,
    max_frame: usize,
    ticket: HandshakeTicket,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::from_std(accepted_at + context.session.handshake_timeout);
    let connecting = incoming.accept().map_err(|error| error.to_string())?;
    let connection = tokio::select! {
        connection = tokio::time::timeout_at(deadline, connecting) => connection,
        () = ticket.evicted() => return Err("evicted during the QUIC handshake".into()),
    };
    let connection = connection
        .map_err(|_| "QUIC handshake timed out".to_owned())?
        .map_err(|error| error.to_string())?;
    let peer = connection.remote_address();
    let stream = tokio::select! {
        stream = tokio::time::timeout_at(deadline, connection.accept_bi()) => stream,
        () = ticket.evicted() => {
            let code = CloseCode::TryAgainLater;
            connection.close(VarInt::from_u32(u32::from(code.code())), b"evicted");
            return Err("evicted before opening its control stream".into());
        }
    };
    let stream = match stream {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => {
            let code = CloseCode::HandshakeTimeout;
            connection.close(
                VarInt::from_u32(u32::from(code.code())),
                b"no control stream",
            );
            return Err("no control stream in time".into());
        }
    };
    let (send, recv) = stream;
    let mut transport = QuicTransport::new(connection, send, recv, max_frame);
    device::run(&mut transport, context, accepted_at, &peer, ticket).await;
    Ok(())
}
