//! Pigeon's wire types.
//!
//! # Layout
//! - [`device`]: the device protocol spoken between a device and a connection node
//!   (`proto/pigeon/device.proto`), plus [`CloseCode`], the close codes both transports use.
//! - [`credential`]: device credentials (HS256 JWTs): minted by app backends (and by
//!   `pigeon token`, the load-test harness), checked by connection nodes.
//! - [`store`]: the stored form of a message waiting for a device (`proto/pigeon/store.proto`),
//!   shared by the embedded and the Redis offline stores.
//! - `cluster` and `push` (feature `grpc`): the gRPC services of cluster mode, a node's
//!   internal API (`proto/pigeon/cluster.proto`: `Deliver`, `Takeover`) and the push API
//!   (`proto/pigeon/push.proto`), client and server.
//! - [`framing`]: frames on a byte stream (QUIC), each behind a varint length prefix.
//! - [`websocket`]: RFC 6455 frames and the handshake's accept key, for both the node and
//!   the device side of a WebSocket connection.

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

/// The generated gRPC services, nested as their protobuf packages are.
#[cfg(feature = "grpc")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated_grpc {
    pub mod pigeon {
        pub mod cluster {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/pigeon.cluster.v1.rs"));
            }
        }
        pub mod push {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/pigeon.push.v1.rs"));
            }
        }
    }
}

/// A connection node's internal API (`pigeon.cluster.v1`), which gateways and other nodes
/// call.
#[cfg(feature = "grpc")]
pub use generated_grpc::pigeon::cluster::v1 as cluster;
/// The push API over gRPC (`pigeon.push.v1`).
#[cfg(feature = "grpc")]
pub use generated_grpc::pigeon::push::v1 as push;

pub mod credential;

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
    /// The app's shared stream was recreated (its history was lost, e.g. Redis lost its
    /// data): reconnect, and the Welcome tells what the node can prove (`recovered`).
    StreamReset = 4005,
    /// The device stopped reading: a write to it did not complete within the idle timeout.
    /// Whatever it missed is kept and replayed when it reconnects.
    SlowConsumer = 4008,
    /// The device was unregistered through the API (`DELETE /v1/devices/{token}`): its
    /// token, queue and bindings are gone. Connecting again registers a new device, so the
    /// device must not reconnect by itself.
    Unregistered = 4009,
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
            StreamReset,
            SlowConsumer,
            Unregistered,
        ]
        .into_iter()
        .find(|known| known.code() == code)
    }

    /// Whether a device should reconnect (after a backoff) when closed with this code.
    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::Unauthorized | CloseCode::Replaced | CloseCode::Unregistered
        )
    }
}

/// The ALPN protocol id of Pigeon's device protocol over QUIC.
pub const ALPN: &[u8] = b"pigeon/1";

/// Frames on a byte stream: each frame is a protobuf message behind its length as a
/// protobuf varint (prost's "length-delimited" encoding). WebSocket needs none of this; its
/// messages are the frames.
pub mod websocket;

pub mod framing {
    use bytes::{Buf, BytesMut};
    use prost::Message;

    /// A length prefix that cannot be honoured.
    #[derive(Debug, PartialEq, Eq)]
    pub enum FrameError {
        /// The announced frame is larger than allowed.
        TooBig {
            /// The announced length.
            length: usize,
        },
        /// The bytes are not a valid length prefix or frame.
        Malformed(String),
    }

    /// Appends `frame`, length-prefixed, to `out`.
    pub fn encode(frame: &impl Message, out: &mut Vec<u8>) {
        // A Vec grows as needed, so encoding into it cannot fail.
        let _ = frame.encode_length_delimited(out);
    }

    /// Takes one whole frame off the front of `buffer`, if it holds one. A frame announced
    /// as larger than `max` is an error as soon as its prefix is read, before its bytes are.
    pub fn decode<M: Message + Default>(
        buffer: &mut BytesMut,
        max: usize,
    ) -> Result<Option<M>, FrameError> {
        // A varint is complete at the first byte without its high bit, within 10 bytes.
        let Some(end) = buffer.iter().take(10).position(|byte| byte & 0x80 == 0) else {
            if buffer.len() >= 10 {
                return Err(FrameError::Malformed("length prefix too long".into()));
            }
            return Ok(None);
        };
        let length = prost::decode_length_delimiter(&buffer[..=end])
            .map_err(|error| FrameError::Malformed(error.to_string()))?;
        if length > max {
            return Err(FrameError::TooBig { length });
        }
        let prefix = end + 1;
        if buffer.len() < prefix + length {
            return Ok(None);
        }
        buffer.advance(prefix);
        let body = buffer.split_to(length).freeze();
        M::decode(body)
            .map(Some)
            .map_err(|error| FrameError::Malformed(error.to_string()))
    }
}

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
            kind: Some(client_frame::Kind::Ack(device::Ack {
                seq: 42,
                stream: "all".into(),
                offset: 7,
            })),
        };
        let bytes = frame.encode_to_vec();
        assert_eq!(ClientFrame::decode(bytes.as_slice()).ok(), Some(frame));
    }

    #[test]
    fn framing_round_trips_byte_by_byte() {
        let frames: Vec<ClientFrame> = (0..50u64)
            .map(|seq| ClientFrame {
                kind: Some(client_frame::Kind::Ack(device::Ack {
                    seq: seq * 1_000_003,
                    ..device::Ack::default()
                })),
            })
            .collect();
        let mut wire = Vec::new();
        for frame in &frames {
            framing::encode(frame, &mut wire);
        }
        // Fed one byte at a time, every frame comes out once, whole and in order.
        let mut buffer = bytes::BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire {
            buffer.extend_from_slice(&[byte]);
            while let Some(frame) = framing::decode::<ClientFrame>(&mut buffer, 64).expect("valid")
            {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, frames);
        assert!(buffer.is_empty());
    }

    #[test]
    fn framing_refuses_oversized_and_malformed_prefixes() {
        let mut buffer = bytes::BytesMut::from(&[0xff, 0xff, 0x03][..]);
        assert_eq!(
            framing::decode::<ClientFrame>(&mut buffer, 4096),
            Err(framing::FrameError::TooBig { length: 65535 })
        );
        let mut buffer = bytes::BytesMut::from(&[0xffu8; 12][..]);
        assert!(matches!(
            framing::decode::<ClientFrame>(&mut buffer, 4096),
            Err(framing::FrameError::Malformed(_))
        ));
        let mut buffer = bytes::BytesMut::from(&[0x02, 0x00, 0x00][..]);
        assert!(matches!(
            framing::decode::<ClientFrame>(&mut buffer, 4096),
            Err(framing::FrameError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_does_not_decode_as_a_frame() {
        // A field tag of 0 is invalid in protobuf.
        assert!(ClientFrame::decode(&[0u8, 1, 2, 3][..]).is_err());
    }
}
