//! WebSocket framing (RFC 6455 section 5), the server's side: parsing the masked frames a
//! device sends and encoding the unmasked frames a node sends. No I/O and no buffers of its
//! own: the transport owns the bytes.

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

/// A frame the device may not send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload is larger than the node accepts.
    #[error("frame of {0} bytes is over the limit")]
    TooBig(u64),
    /// The frame breaks RFC 6455.
    #[error("{0}")]
    Protocol(&'static str),
}

/// The header of a frame from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Whether this is the last fragment of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The key the payload is masked with.
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

/// Parses the header of a frame a device sent, from the start of `bytes`. `Ok(None)` when
/// more bytes are needed. A payload over `max_payload` is refused here, before any of it is
/// buffered.
pub fn parse_header(bytes: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        // No extension is negotiated, so no reserved bit may be set.
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let opcode = Opcode::from_bits(first & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    let fin = first & 0x80 != 0;
    if second & 0x80 == 0 {
        return Err(FrameError::Protocol("frames from a client must be masked"));
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
    let Some(mask) = bytes
        .get(mask_at..mask_at + 4)
        .and_then(|mask| <[u8; 4]>::try_from(mask).ok())
    else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: mask_at + 4,
        // At most `max_payload`, which is a usize.
        payload_len: length as usize,
    }))
}

/// Unmasks a payload in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// Appends the header of an unmasked, final frame with a payload of `len` bytes; the
/// payload is to follow it.
pub fn encode_header(opcode: Opcode, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode.bits());
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends a whole control frame.
pub fn encode_control(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    encode_header(opcode, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a Close frame with `code` and as much of `reason` as fits (cut at a character
/// boundary, so the reason stays valid UTF-8).
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode_header(Opcode::Close, 2 + end, out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

/// The status code of a Close frame's (unmasked) payload; 1005 ("no status") when it has
/// none.
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        _ => 1005,
    }
}

/// A frame as a client sends it: `first` is its first byte (FIN, opcode), masked with `mask`.
#[cfg(test)]
pub fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let mut masked = payload.to_vec();
    unmask(&mut masked, mask);
    out.extend_from_slice(&masked);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_length_form_and_unmasks() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut bytes = client_frame(0x82, &payload, mask);
            let header = parse_header(&bytes, 100_000).unwrap().unwrap();
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
            assert_eq!(parse_header(&bytes[..cut], 1000), Ok(None), "cut at {cut}");
        }
        assert!(parse_header(&bytes[..header_len], 1000).unwrap().is_some());
    }

    #[test]
    fn refuses_what_a_client_may_not_send() {
        let mask = [9, 9, 9, 9];
        let unmasked = [0x82, 0x01, 0xAA];
        assert_eq!(
            parse_header(&unmasked, 100),
            Err(FrameError::Protocol("frames from a client must be masked"))
        );
        let reserved = client_frame(0xC2, b"x", mask);
        assert_eq!(
            parse_header(&reserved, 100),
            Err(FrameError::Protocol("reserved bits set"))
        );
        let unknown = client_frame(0x83, b"x", mask);
        assert_eq!(
            parse_header(&unknown, 100),
            Err(FrameError::Protocol("unknown opcode"))
        );
        let fragmented_ping = client_frame(0x09, b"x", mask);
        assert_eq!(
            parse_header(&fragmented_ping, 100),
            Err(FrameError::Protocol("fragmented control frame"))
        );
        let long_ping = client_frame(0x89, &[0; 126], mask);
        assert_eq!(
            parse_header(&long_ping, 1000),
            Err(FrameError::Protocol("control frame over 125 bytes"))
        );
        // The size is refused from the header alone, before the payload arrives.
        let big = client_frame(0x82, &[0; 5000], mask);
        assert_eq!(parse_header(&big[..8], 4096), Err(FrameError::TooBig(5000)));
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&mask);
        assert_eq!(parse_header(&huge, 4096), Err(FrameError::TooBig(u64::MAX)));
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
    fn a_close_reason_is_cut_to_fit_at_a_character_boundary() {
        let reason = "é".repeat(100);
        let mut out = Vec::new();
        encode_close(4003, &reason, &mut out);
        let payload = &out[2..];
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(close_code(payload), 4003);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(close_code(&[]), 1005);
    }
}
