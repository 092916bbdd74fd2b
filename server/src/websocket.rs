//! The WebSocket transport: each Pigeon frame is one binary WebSocket message, over plain
//! TCP (ws) or TLS (wss, when the node has a certificate).
//!
//! The listener takes a permit of the node's connection limit before it accepts, so a node
//! never holds more sockets than configured; past the limit a new device is told 1013
//! ("try again later") by a small, separately bounded set of refusal tasks. Buffers are
//! sized for push traffic, not bulk transfer: tungstenite's 128 KiB defaults would cost more
//! per idle connection than everything else together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pigeon_proto::device::{ClientFrame, ServerFrame};
use pigeon_proto::{CloseCode, Message as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{WebSocketConfig, frame::coding};
use tokio_util::task::TaskTracker;

use crate::connection::{self, DeviceContext, DeviceTransport, TransportError};

/// Time allowed for a close handshake before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections being refused (over the limit) at once, at most.
const MAX_REFUSALS: usize = 64;
/// Initial read buffer; it grows for a larger frame and is capped by the frame limit.
const READ_BUFFER: usize = 256;
/// Bytes queued for a device that does not read, at most, before its connection fails.
const MAX_WRITE_BUFFER: usize = 256 * 1024;

/// A device connection over WebSocket.
pub struct WebSocketTransport<S> {
    stream: WebSocketStream<S>,
}

impl<S> WebSocketTransport<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(stream: WebSocketStream<S>) -> Self {
        Self { stream }
    }
}

/// The WebSocket settings of a device connection with frames of at most `max_frame` bytes.
pub fn websocket_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

fn transport_error(error: WsError) -> TransportError {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => TransportError::TooBig,
        WsError::Capacity(other) => TransportError::Malformed(other.to_string()),
        WsError::Protocol(error) => TransportError::Malformed(error.to_string()),
        WsError::Utf8(error) => TransportError::Malformed(error),
        other => TransportError::Io(other.to_string()),
    }
}

impl<S> DeviceTransport for WebSocketTransport<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    async fn recv(&mut self) -> Result<Option<ClientFrame>, TransportError> {
        loop {
            let Some(message) = self.stream.next().await else {
                return Ok(None);
            };
            match message.map_err(transport_error)? {
                Message::Binary(bytes) => {
                    return ClientFrame::decode(bytes)
                        .map(Some)
                        .map_err(|error| TransportError::Malformed(error.to_string()));
                }
                Message::Text(_) => {
                    return Err(TransportError::Malformed(
                        "text frames are not part of the protocol".into(),
                    ));
                }
                Message::Close(_) => return Ok(None),
                // tungstenite answers pings itself; neither needs the session.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    async fn feed(&mut self, frame: &ServerFrame) -> Result<(), TransportError> {
        self.stream
            .feed(Message::Binary(frame.encode_to_vec().into()))
            .await
            .map_err(transport_error)
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.stream.flush().await.map_err(transport_error)
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let frame = CloseFrame {
            code: coding::CloseCode::from(code.code()),
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.stream.close(Some(frame)).await.is_ok() {
                // Wait for the device's close frame, so the close is clean on both sides.
                while let Some(Ok(_)) = self.stream.next().await {}
            }
        })
        .await;
    }
}

/// Accepts device WebSocket connections on `listener` until the node shuts down; over TLS
/// when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    context: Arc<DeviceContext>,
    max_connections: usize,
    max_frame: usize,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let shutdown = context.node.shutdown().clone();
    let config = websocket_config(max_frame);
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
        let _ = stream.set_nodelay(true);
        let deadline =
            tokio::time::Instant::from_std(accepted_at + context.session.handshake_timeout);
        let tls = tls.clone();
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let context = context.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    let result = upgrade(stream, tls, config, deadline, |stream| {
                        connection::run(stream, &context, accepted_at, peer)
                    });
                    if let Err(error) = result.await {
                        tracing::debug!(%peer, %error, "device connection not established");
                    }
                });
            }
            Err(_) => {
                if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let _refusal = refusal;
                        let _ = upgrade(stream, tls, config, deadline, |mut stream| async move {
                            stream
                                .close(CloseCode::TryAgainLater, "node at its connection limit")
                                .await;
                        })
                        .await;
                    });
                }
                // Else: drop the socket; the device's backoff will bring it back.
            }
        }
    }
}

/// Completes TLS (when configured) and the WebSocket upgrade before `deadline`, then hands
/// the transport to `then`.
async fn upgrade<F, Fut>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    config: WebSocketConfig,
    deadline: tokio::time::Instant,
    then: F,
) -> Result<(), String>
where
    F: FnOnce(WebSocketTransport<Box<dyn DeviceIo>>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let handshake = async {
        let stream: Box<dyn DeviceIo> = match tls {
            Some(acceptor) => Box::new(
                acceptor
                    .accept(stream)
                    .await
                    .map_err(|error| format!("TLS handshake failed: {error}"))?,
            ),
            None => Box::new(stream),
        };
        tokio_tungstenite::accept_async_with_config(stream, Some(config))
            .await
            .map_err(|error| format!("WebSocket upgrade failed: {error}"))
    };
    let stream = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| "handshake timed out".to_owned())??;
    then(WebSocketTransport::new(stream)).await;
    Ok(())
}

/// A byte stream a device connection runs on: TCP, or TLS over TCP.
pub trait DeviceIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> DeviceIo for T {}
