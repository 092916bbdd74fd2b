//! WebSocket framing (RFC 6455 section 5) for both ends: a node parses the masked frames a
//! device sends and sends unmasked ones; a device masks what it sends and refuses masked
//! frames. Plus the opening handshake's accept key and a read that holds no buffer while it
//! waits. The transports own the bytes; nothing here allocates on its own.

use base64::Engine as _;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// What a frame carries (RFC 6455 section 5.2). Opcodes outside these are a protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// The next fragment of a message.
    Continuation,
    /// A UTF-8 text message (not part of Pigeon's protocol).
    Text,
    /// A binary message: one Pigeon frame.
    Binary,
    /// The closing handshake.
    Close,
    /// A keepalive probe, answered with a Pong carrying the same payload.
    Ping,
    /// The answer to a Ping (or an unsolicited heartbeat).
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames (close, ping, pong) may come between the fragments of a message.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A frame the peer may not send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload is larger than the receiver accepts.
    #[error("frame of {0} bytes is over the limit")]
    TooBig(u64),
    /// The frame breaks RFC 6455.
    #[error("{0}")]
    Protocol(&'static str),
}

/// Who sent the frames being parsed: clients must mask every frame, servers must not mask
/// any (RFC 6455 section 5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// A device: frames are masked.
    Client,
    /// A node: frames are not masked.
    Server,
}

/// The header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Whether this is the last fragment of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The key the payload is masked with (all zeros, a no-op, for a server's frame).
    pub mask: [u8; 4],
    /// Header length in bytes: the payload starts here.
    pub header_len: usize,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl Header {
    /// The whole frame's length in bytes.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Largest payload of a control frame (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Parses the header of a frame `from` sent, from the start of `bytes`. `Ok(None)` when
/// more bytes are needed. A payload over `max_payload` is refused here, before any of it is
/// buffered.
pub fn parse_header(
    bytes: &[u8],
    max_payload: usize,
    from: Sender,
) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        // No extension is negotiated, so no reserved bit may be set.
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = Opcode::from_bits(first & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    let fin = first & 0x80 != 0;
    let masked = second & 0x80 != 0;
    match from {
        Sender::Client if !masked => {
            return Err(FrameError::Protocol("frames from a client must be masked"));
        }
        Sender::Server if masked => {
            return Err(FrameError::Protocol(
                "frames from a server must not be masked",
            ));
        }
        _ => {}
    }
    let (length, length_len) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(be) => (u64::from(u16::from_be_bytes([be[0], be[1]])), 2),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10).and_then(|be| <[u8; 8]>::try_from(be).ok()) {
            Some(be) => (u64::from_be_bytes(be), 8),
            None => return Ok(None),
        },
        short => (u64::from(short), 0),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        if length > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::Protocol("control frame over 125 bytes"));
        }
    }
    if length > max_payload as u64 {
        return Err(FrameError::TooBig(length));
    }
    let mask_at = 2 + length_len;
    let (mask, header_len) = if masked {
        match bytes
            .get(mask_at..mask_at + 4)
            .and_then(|mask| <[u8; 4]>::try_from(mask).ok())
        {
            Some(mask) => (mask, mask_at + 4),
            None => return Ok(None),
        }
    } else if bytes.len() < mask_at {
        return Ok(None);
    } else {
        ([0; 4], mask_at)
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        // At most `max_payload`, which is a usize.
        payload_len: length as usize,
    }))
}

/// Masks or unmasks a payload in place (the same XOR both ways).
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    if mask == [0; 4] {
        return;
    }
    for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// Appends the header of an unmasked, final frame with a payload of `len` bytes, as a
/// server sends it; the payload is to follow it.
pub fn encode_header(opcode: Opcode, len: usize, out: &mut Vec<u8>) {
    push_header(true, opcode, len, None, out);
}

fn push_header(fin: bool, opcode: Opcode, len: usize, mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    out.push(if fin { 0x80 } else { 0 } | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
}

/// Appends a whole frame: `fin` says whether it ends its message; `mask` is `Some(key)` for
/// a client's frame (RFC 6455 wants a fresh random key per frame) and `None` for a server's.
pub fn encode_frame(
    fin: bool,
    opcode: Opcode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    push_header(fin, opcode, payload.len(), mask, out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        unmask(&mut out[start..], mask);
    }
}

/// Appends a whole control frame (its payload cut to 125 bytes).
pub fn encode_control(opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    encode_frame(true, opcode, payload, mask, out);
}

/// Appends a Close frame with `code` and as much of `reason` as fits (cut at a character
/// boundary, so the reason stays valid UTF-8).
pub fn encode_close(code: u16, reason: &str, mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode_frame(true, Opcode::Close, &payload[..2 + end], mask, out);
}

/// The status code of a Close frame's (unmasked) payload; 1005 ("no status") when it has
/// none.
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        _ => 1005,
    }
}

/// Whether an endpoint may send `code` in a Close frame (RFC 6455 section 7.4): the
/// defined codes but 1004 (reserved), 1005 and 1006 (never sent) and 1015 (TLS), and the
/// ranges for libraries (3000-3999) and applications (4000-4999).
pub fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The reason text of a Close frame's (unmasked) payload.
pub fn close_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned()
}

/// The Sec-WebSocket-Accept value for a handshake's Sec-WebSocket-Key (RFC 6455 section
/// 4.2.2).
pub fn accept_key(key: &str) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// Bytes read from a socket at a time, at most.
const READ_CHUNK: usize = 2048;

/// Waits until bytes can be read and appends them to `buffer`; 0 when the peer closed.
/// Cancel-safe.
///
/// The bytes land in a stack buffer first and `buffer` grows only by what arrived, so a
/// connection waiting for its peer holds no read buffer. (Reserving before the wait would
/// keep one per idle connection: readiness is often stale, so the read after a frame finds
/// nothing and waits again with the buffer allocated.)
pub async fn read_some<S: AsyncRead + Unpin>(
    io: &mut S,
    buffer: &mut Vec<u8>,
) -> std::io::Result<usize> {
    std::future::poll_fn(|context| {
        let mut chunk = [0u8; READ_CHUNK];
        let mut read = ReadBuf::new(&mut chunk);
        std::task::ready!(std::pin::Pin::new(&mut *io).poll_read(context, &mut read))?;
        buffer.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// What a parsed frame amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<T> {
    /// A whole binary message, as the caller's decoder made it.
    Message(T),
    /// The peer's Close, with its code (1005: none) and reason. The answering Close is
    /// queued unless ours went first.
    Closed {
        /// The peer's close code.
        code: u16,
        /// The peer's reason.
        reason: String,
    },
    /// Handled here (a Ping answered, a Pong, a fragment kept): parse on.
    Handled,
}

/// One end of a WebSocket connection of binary messages, without the socket: bytes read
/// and not yet parsed, a fragmented message being assembled, frames queued to write. The
/// node and the device side both use it; they differ in who masks (see [`Sender`]).
///
/// Each buffer is freed as soon as it is empty, so an idle connection holds none.
#[derive(Debug)]
pub struct Framer {
    input: Vec<u8>,
    message: Vec<u8>,
    output: Vec<u8>,
    fragmented: bool,
    close_sent: bool,
    /// Who sends the frames parsed here: the other end.
    peer: Sender,
    /// Largest frame payload, and largest assembled message, accepted.
    max_message: usize,
}

impl Framer {
    /// The framing of a connection whose handshake is done; `input` holds what arrived
    /// after it. `peer` is the other end (a node parses frames from `Sender::Client`).
    pub fn new(peer: Sender, max_message: usize, mut input: Vec<u8>) -> Self {
        if input.is_empty() {
            input = Vec::new();
        }
        Self {
            input,
            message: Vec::new(),
            output: Vec::new(),
            fragmented: false,
            close_sent: false,
            peer,
            max_message,
        }
    }

    /// A masking key for a frame this end sends: a fresh random one for a client (RFC 6455
    /// wants one the network cannot predict), none for a server.
    fn our_mask(&self) -> Option<[u8; 4]> {
        match self.peer {
            Sender::Server => Some(rand::random()),
            Sender::Client => None,
        }
    }

    /// Takes the next frame off the input, if it has fully arrived (`Ok(None)`: read
    /// more). A whole message is handed to `decode`. Refuses text frames, fragments out of
    /// place and anything over the size limit, from the header alone where it can.
    pub fn parse<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<Inbound<T>>, FrameError> {
        let Some(header) = parse_header(&self.input, self.max_message, self.peer)? else {
            return Ok(None);
        };
        match header.opcode {
            Opcode::Text => {
                return Err(FrameError::Protocol(
                    "text frames are not part of the protocol",
                ));
            }
            Opcode::Binary if self.fragmented => {
                return Err(FrameError::Protocol(
                    "a new message inside a fragmented one",
                ));
            }
            Opcode::Continuation if !self.fragmented => {
                return Err(FrameError::Protocol(
                    "a continuation frame outside a message",
                ));
            }
            Opcode::Continuation if self.message.len() + header.payload_len > self.max_message => {
                return Err(FrameError::TooBig(
                    (self.message.len() + header.payload_len) as u64,
                ));
            }
            _ => {}
        }
        let end = header.frame_len();
        if self.input.len() < end {
            self.input.reserve(end - self.input.len());
            return Ok(None);
        }
        // Taken before the payload is borrowed; used only if a Pong or Close is answered.
        let mask = self.our_mask();
        let payload = &mut self.input[header.header_len..end];
        unmask(payload, header.mask);
        let inbound = match header.opcode {
            Opcode::Binary if header.fin => Inbound::Message(decode(payload)),
            Opcode::Binary => {
                self.fragmented = true;
                self.message.extend_from_slice(payload);
                Inbound::Handled
            }
            Opcode::Continuation => {
                self.message.extend_from_slice(payload);
                if header.fin {
                    let message = decode(&self.message);
                    self.message = Vec::new();
                    self.fragmented = false;
                    Inbound::Message(message)
                } else {
                    Inbound::Handled
                }
            }
            Opcode::Ping => {
                if !self.close_sent {
                    encode_control(Opcode::Pong, payload, mask, &mut self.output);
                }
                Inbound::Handled
            }
            Opcode::Close => {
                let code = close_code(payload);
                let reason = close_reason(payload);
                if !self.close_sent {
                    // Echo the peer's code, completing the closing handshake; a code no
                    // endpoint may send (0, 1005, 1006, 5000, ...) or a one-byte body is a
                    // protocol error, and is answered as one.
                    let echo = match payload.len() {
                        0 => 1000,
                        1 => 1002,
                        _ if sendable_close_code(code) => code,
                        _ => 1002,
                    };
                    encode_close(echo, "", mask, &mut self.output);
                    self.close_sent = true;
                }
                Inbound::Closed { code, reason }
            }
            Opcode::Pong | Opcode::Text => Inbound::Handled,
        };
        self.input.drain(..end);
        if self.input.is_empty() {
            self.input = Vec::new();
        }
        Ok(Some(inbound))
    }

    /// Queues a binary message of `len` bytes that `write` appends (encoding straight into
    /// the output, no copy).
    pub fn queue_message(&mut self, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let mask = self.our_mask();
        self.output.reserve(len + 14);
        push_header(true, Opcode::Binary, len, mask, &mut self.output);
        let start = self.output.len();
        write(&mut self.output);
        if let Some(mask) = mask {
            unmask(&mut self.output[start..], mask);
        }
    }

    /// Queues our Close, unless one was queued already; nothing is queued after it.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        if !self.close_sent {
            let mask = self.our_mask();
            encode_close(code, reason, mask, &mut self.output);
            self.close_sent = true;
        }
    }

    /// Whether the framing holds nothing: no bytes read or to write, no message being
    /// assembled, no close sent. Such a framer is the same as a new one.
    pub fn is_pristine(&self) -> bool {
        self.input.is_empty()
            && self.message.is_empty()
            && self.output.is_empty()
            && !self.fragmented
            && !self.close_sent
    }

    /// Whether frames wait to be written.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Reads what `io` has into the input; 0 when the peer closed. Cancel-safe.
    pub async fn read<S: AsyncRead + Unpin>(&mut self, io: &mut S) -> std::io::Result<usize> {
        read_some(io, &mut self.input).await
    }

    /// Reads what a non-blocking `io` has now into the input: the bytes read, 0 when the
    /// peer closed, `WouldBlock` when nothing was there.
    pub fn read_now<S: std::io::Read>(&mut self, io: &mut S) -> std::io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let read = io.read(&mut chunk)?;
        self.input.extend_from_slice(&chunk[..read]);
        Ok(read)
    }

    /// Writes what a non-blocking `io` takes now of what is queued; the rest stays queued.
    pub fn write_now<S: std::io::Write>(&mut self, io: &mut S) -> std::io::Result<()> {
        while !self.output.is_empty() {
            match io.write(&self.output) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    self.output.drain(..written);
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        self.output = Vec::new();
        Ok(())
    }

    /// Writes what is queued and flushes. Cancel-safe: bytes leave the queue only once
    /// written.
    pub async fn write_out<S: AsyncWrite + Unpin>(&mut self, io: &mut S) -> std::io::Result<()> {
        while !self.output.is_empty() {
            let written = io.write(&self.output).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.output.drain(..written);
        }
        self.output = Vec::new();
        io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it: `first` is its first byte (FIN, RSV, opcode), masked
    /// with `mask`.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(
            first & 0x80 != 0,
            Opcode::Binary,
            payload,
            Some(mask),
            &mut out,
        );
        out[0] = first;
        out
    }

    #[test]
    fn a_servers_frames_parse_unmasked_and_a_masked_one_is_refused() {
        for len in [0usize, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            encode_frame(true, Opcode::Binary, &payload, None, &mut out);
            let header = parse_header(&out, 100_000, Sender::Server)
                .unwrap()
                .unwrap();
            assert_eq!(header.frame_len(), out.len());
            let body = &mut out[header.header_len..];
            unmask(body, header.mask);
            assert_eq!(body, &payload[..]);
            for cut in 0..header.header_len {
                assert_eq!(parse_header(&out[..cut], 100_000, Sender::Server), Ok(None));
            }
        }
        let masked = client_frame(0x82, b"x", [1, 2, 3, 4]);
        assert_eq!(
            parse_header(&masked, 100, Sender::Server),
            Err(FrameError::Protocol(
                "frames from a server must not be masked"
            ))
        );
    }

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_each_length_form_and_unmasks() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut bytes = client_frame(0x82, &payload, mask);
            let header = parse_header(&bytes, 100_000, Sender::Client)
                .unwrap()
                .unwrap();
            assert!(header.fin);
            assert_eq!(header.opcode, Opcode::Binary);
            assert_eq!(header.payload_len, len);
            assert_eq!(header.frame_len(), bytes.len());
            let body = &mut bytes[header.header_len..];
            unmask(body, header.mask);
            assert_eq!(body, &payload[..]);
        }
    }

    #[test]
    fn asks_for_more_until_the_header_is_whole() {
        let bytes = client_frame(0x82, &[1; 300], [1, 2, 3, 4]);
        let header_len = 2 + 2 + 4;
        for cut in 0..header_len {
            assert_eq!(
                parse_header(&bytes[..cut], 1000, Sender::Client),
                Ok(None),
                "cut at {cut}"
            );
        }
        assert!(
            parse_header(&bytes[..header_len], 1000, Sender::Client)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn refuses_what_a_client_may_not_send() {
        let mask = [9, 9, 9, 9];
        let unmasked = [0x82, 0x01, 0xAA];
        assert_eq!(
            parse_header(&unmasked, 100, Sender::Client),
            Err(FrameError::Protocol("frames from a client must be masked"))
        );
        let refusals: [(u8, &[u8], &str); 4] = [
            (0xC2, b"x", "reserved bits set"),
            (0x83, b"x", "unknown opcode"),
            (0x09, b"x", "fragmented control frame"),
            (0x89, &[0; 126], "control frame over 125 bytes"),
        ];
        for (first, payload, reason) in refusals {
            let frame = client_frame(first, payload, mask);
            assert_eq!(
                parse_header(&frame, 1000, Sender::Client),
                Err(FrameError::Protocol(reason)),
                "first byte {first:#04x}"
            );
        }
        // The size is refused from the header alone, before the payload arrives.
        let big = client_frame(0x82, &[0; 5000], mask);
        assert_eq!(
            parse_header(&big[..8], 4096, Sender::Client),
            Err(FrameError::TooBig(5000))
        );
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&mask);
        assert_eq!(
            parse_header(&huge, 4096, Sender::Client),
            Err(FrameError::TooBig(u64::MAX))
        );
    }

    #[test]
    fn encodes_unmasked_frames_a_client_can_read() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let mut out = Vec::new();
            encode_header(Opcode::Binary, len, &mut out);
            let expected_header = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), expected_header, "len {len}");
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        }
    }

    #[test]
    fn a_close_with_a_code_nobody_may_send_is_answered_as_a_protocol_error() {
        for (payload, echo) in [
            (&[0x00, 0x00][..], 1002),
            (&[0x03, 0xed][..], 1002),
            (&[0x03, 0xee][..], 1002),
            (&[0x13, 0x88][..], 1002),
            (&[0x03][..], 1002),
            (&[][..], 1000),
            (&[0x0f, 0xa3][..], 4003),
            (&[0x03, 0xe8][..], 1000),
        ] {
            let mut node = Framer::new(Sender::Client, 1024, Vec::new());
            let mut bytes = Vec::new();
            encode_frame(true, Opcode::Close, payload, Some([1, 2, 3, 4]), &mut bytes);
            node.input.extend_from_slice(&bytes);
            let parsed = node.parse(|_| Ok::<(), ()>(()));
            assert!(
                matches!(parsed, Ok(Some(Inbound::Closed { .. }))),
                "{payload:?}"
            );
            assert_eq!(close_code(&node.output[2..]), echo, "{payload:?}");
        }
    }

    #[test]
    fn a_close_reason_is_cut_to_fit_at_a_character_boundary() {
        let reason = "é".repeat(100);
        let mut out = Vec::new();
        encode_close(4003, &reason, None, &mut out);
        let payload = &out[2..];
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(close_code(payload), 4003);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(close_reason(payload), "é".repeat(61));
        assert_eq!(close_code(&[]), 1005);
    }

    /// What `from` has queued, as bytes on the wire.
    async fn wire(from: &mut Framer) -> Vec<u8> {
        let mut bytes = Vec::new();
        from.write_out(&mut bytes).await.unwrap();
        bytes
    }

    /// Feeds `bytes` to `to` and parses everything whole in them.
    async fn deliver(to: &mut Framer, bytes: &[u8]) -> Vec<Inbound<Vec<u8>>> {
        let mut reader = bytes;
        while to.read(&mut reader).await.unwrap() > 0 {}
        let mut parsed = Vec::new();
        while let Some(inbound) = to.parse(<[u8]>::to_vec).unwrap() {
            parsed.push(inbound);
        }
        parsed
    }

    /// A node's and a device's framers, talking: masked one way, not the other; a Ping is
    /// answered; a fragmented message is assembled; a Close is echoed once.
    #[tokio::test]
    async fn a_node_and_a_device_framer_understand_each_other() {
        let mut node = Framer::new(Sender::Client, 1024, Vec::new());
        let mut device = Framer::new(Sender::Server, 1024, Vec::new());

        device.queue_message(5, |out| out.extend_from_slice(b"hello"));
        let bytes = wire(&mut device).await;
        assert_eq!(bytes[1] & 0x80, 0x80, "a device masks");
        let parsed = deliver(&mut node, &bytes).await;
        assert_eq!(parsed, vec![Inbound::Message(b"hello".to_vec())]);

        assert!(
            node.is_pristine(),
            "a whole message read leaves nothing behind"
        );
        node.queue_message(3, |out| out.extend_from_slice(b"hey"));
        assert!(!node.is_pristine(), "a frame waits to be written");
        let bytes = wire(&mut node).await;
        assert!(node.is_pristine());
        assert_eq!(bytes[1] & 0x80, 0, "a node does not mask");
        assert_eq!(
            deliver(&mut device, &bytes).await,
            vec![Inbound::Message(b"hey".to_vec())]
        );

        // A fragmented message with a Ping between its fragments.
        let mut bytes = first_fragment();
        encode_control(Opcode::Ping, b"p", Some([5, 6, 7, 8]), &mut bytes);
        encode_frame(
            true,
            Opcode::Continuation,
            b"ment",
            Some([9, 9, 9, 9]),
            &mut bytes,
        );
        assert_eq!(
            deliver(&mut node, &bytes).await,
            vec![
                Inbound::Handled,
                Inbound::Handled,
                Inbound::Message(b"fragment".to_vec())
            ]
        );
        let pong = wire(&mut node).await;
        assert_eq!(pong, [0x8A, 1, b'p'], "the Ping is answered, unmasked");

        // The device closes; the node echoes once, and queues nothing after it.
        device.queue_close(4003, "replaced");
        let bytes = wire(&mut device).await;
        assert_eq!(
            deliver(&mut node, &bytes).await,
            vec![Inbound::Closed {
                code: 4003,
                reason: "replaced".into()
            }]
        );
        node.queue_close(1000, "");
        let echo = wire(&mut node).await;
        assert_eq!(echo[0], 0x88);
        assert_eq!(close_code(&echo[2..]), 4003, "one Close: the echo");
        assert!(!node.is_pristine(), "a framer that closed is not a new one");
    }

    /// The first fragment ("frag") of a masked binary message from a device.
    fn first_fragment() -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_frame(
            false,
            Opcode::Binary,
            b"frag",
            Some([1, 2, 3, 4]),
            &mut bytes,
        );
        bytes
    }

    /// Part of a frame, or part of a fragmented message, is state a new framer lacks.
    #[tokio::test]
    async fn a_framer_mid_frame_or_mid_message_is_not_pristine() {
        let mut node = Framer::new(Sender::Client, 1024, Vec::new());
        let bytes = first_fragment();
        assert_eq!(deliver(&mut node, &bytes[..3]).await, vec![]);
        assert!(!node.is_pristine(), "half a frame is buffered");
        assert_eq!(
            deliver(&mut node, &bytes[3..]).await,
            vec![Inbound::Handled]
        );
        assert!(!node.is_pristine(), "half a message is assembled");
    }

    #[tokio::test]
    async fn a_framer_refuses_what_breaks_the_protocol() {
        /// Frames a device sends: FIN, opcode, payload length.
        type Frames = &'static [(bool, Opcode, usize)];
        let cases: [(Frames, FrameError); 4] = [
            (
                &[(true, Opcode::Text, 1)],
                FrameError::Protocol("text frames are not part of the protocol"),
            ),
            (
                &[(true, Opcode::Continuation, 1)],
                FrameError::Protocol("a continuation frame outside a message"),
            ),
            (
                &[(false, Opcode::Binary, 1), (true, Opcode::Binary, 1)],
                FrameError::Protocol("a new message inside a fragmented one"),
            ),
            (
                &[
                    (false, Opcode::Binary, 600),
                    (true, Opcode::Continuation, 600),
                ],
                FrameError::TooBig(1200),
            ),
        ];
        for (frames, expected) in cases {
            let mut node = Framer::new(Sender::Client, 1024, Vec::new());
            let mut bytes = Vec::new();
            for &(fin, opcode, len) in frames {
                encode_frame(fin, opcode, &vec![0; len], Some([1, 2, 3, 4]), &mut bytes);
            }
            let mut reader = &bytes[..];
            while node.read(&mut reader).await.unwrap() > 0 {}
            let error = loop {
                match node.parse(<[u8]>::to_vec) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{frames:?} was accepted"),
                    Err(error) => break error,
                }
            };
            assert_eq!(error, expected);
        }
    }
}
