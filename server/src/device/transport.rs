//! What a device-facing transport (WebSocket, QUIC) provides to the session loop: receive a
//! frame, send frames, close with a code. Everything else about a connection is shared.

use std::future::Future;

use pigeon_proto::CloseCode;
use pigeon_proto::device::{ClientFrame, ServerFrame};

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
    /// The code to close with, when there is still someone to tell.
    pub fn close_code(&self) -> Option<CloseCode> {
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
