//! Pigeon's wire types.
//!
//! # Layout
//! - [`device`]: the device protocol spoken between a device and a connection node
//!   (`proto/pigeon/device.proto`), plus [`CloseCode`], the close codes both transports use.
//! - [`store`]: the stored form of a message waiting for a device (`proto/pigeon/store.proto`),
//!   shared by the embedded and the Redis offline stores.

/// Generated code, nested as the protobuf packages are (prost's paths between packages
/// rely on it).
#[allow(missing_docs, clippy::doc_markdown)]
mod generated {
    pub mod pigeon {
        pub mod device {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/pigeon.device.v1.rs"));
            }
        }
        pub mod store {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/pigeon.store.v1.rs"));
            }
        }
    }
}

/// The device protocol (`pigeon.device.v1`).
pub use generated::pigeon::device::v1 as device;
/// The stored message format (`pigeon.store.v1`).
pub use generated::pigeon::store::v1 as store;

pub use prost::Message;

/// Why a node or a device closed a connection.
///
/// The numbers are WebSocket close codes (RFC 6455 section 7.4); QUIC connections close with
/// the same numbers as application error codes, so a device handles both transports alike.
/// Codes 4000-4999 are Pigeon's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The node is shutting down or draining: reconnect, possibly to another node.
    GoingAway = 1001,
    /// The peer broke the protocol (a text frame, an undecodable frame, an ack ahead of
    /// what was sent, a second Hello).
    ProtocolError = 1002,
    /// A frame exceeded the maximum frame size.
    TooBig = 1009,
    /// Something failed on the node (its store, say); reconnect after a backoff.
    InternalError = 1011,
    /// The node is at its connection limit; try again after a backoff or another node.
    TryAgainLater = 1013,
    /// The credential was missing, malformed, expired, or not signed by the app's secret.
    /// Reconnecting with the same credential will fail again.
    Unauthorized = 4001,
    /// The device did not complete the handshake (Hello) before the deadline.
    HandshakeTimeout = 4002,
    /// The same device token connected again; this older connection is replaced.
    /// The device must not reconnect automatically, or two copies would fight.
    Replaced = 4003,
    /// The device sent nothing (not even a Pong) before the idle deadline.
    IdleTimeout = 4004,
    /// The device stopped reading: a write to it did not complete within the idle timeout.
    /// Whatever it missed is kept and replayed when it reconnects.
    SlowConsumer = 4008,
}

impl CloseCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a number, when it is one of Pigeon's.
    pub fn from_code(code: u16) -> Option<Self> {
        use CloseCode::*;
        [
            GoingAway,
            ProtocolError,
            TooBig,
            InternalError,
            TryAgainLater,
            Unauthorized,
            HandshakeTimeout,
            Replaced,
            IdleTimeout,
            SlowConsumer,
        ]
        .into_iter()
        .find(|known| known.code() == code)
    }

    /// Whether a device should reconnect (after a backoff) when closed with this code.
    pub fn should_reconnect(self) -> bool {
        !matches!(self, CloseCode::Unauthorized | CloseCode::Replaced)
    }
}

/// The ALPN protocol id of Pigeon's device protocol over QUIC.
pub const ALPN: &[u8] = b"pigeon/1";

#[cfg(test)]
mod tests {
    use super::*;
    use device::{ClientFrame, client_frame};

    #[test]
    fn close_codes_round_trip() {
        for code in 1000..5000 {
            if let Some(known) = CloseCode::from_code(code) {
                assert_eq!(known.code(), code);
            }
        }
        assert_eq!(CloseCode::from_code(4003), Some(CloseCode::Replaced));
        assert_eq!(CloseCode::from_code(4999), None);
        assert!(!CloseCode::Replaced.should_reconnect());
        assert!(CloseCode::GoingAway.should_reconnect());
    }

    #[test]
    fn frames_round_trip() {
        let frame = ClientFrame {
            kind: Some(client_frame::Kind::Ack(device::Ack { seq: 42 })),
        };
        let bytes = frame.encode_to_vec();
        assert_eq!(ClientFrame::decode(bytes.as_slice()).ok(), Some(frame));
    }

    #[test]
    fn garbage_does_not_decode_as_a_frame() {
        // A field tag of 0 is invalid in protobuf.
        assert!(ClientFrame::decode(&[0u8, 1, 2, 3][..]).is_err());
    }
}
