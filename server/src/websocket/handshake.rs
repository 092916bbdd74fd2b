//! The WebSocket opening handshake (RFC 6455 section 4.2), the server's side: an HTTP/1.1
//! upgrade request in, a 101 (or an error with a JSON body) out.

use base64::Engine as _;
use pigeon_proto::websocket::accept_key;

/// Headers an upgrade request may carry, at most.
const MAX_HEADERS: usize = 32;

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The request is not complete yet.
    Partial,
    /// A valid upgrade request of `len` bytes (what follows it is already WebSocket
    /// frames); `response` is the 101 to send.
    Upgrade { len: usize, response: Vec<u8> },
}

/// A request refused, with the HTTP response that says why.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The HTTP status.
    pub status: u16,
    /// Why, for the device's developer and the node's log.
    pub message: &'static str,
}

impl Rejection {
    fn new(status: u16, message: &'static str) -> Self {
        Self { status, message }
    }

    /// The whole HTTP response: the status, a JSON error body like the push API's, and the
    /// version this server speaks when that was the problem.
    pub fn response(&self) -> Vec<u8> {
        let reason = match self.status {
            400 => "Bad Request",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let code = match self.status {
            426 => "unsupported_websocket_version",
            431 => "request_too_large",
            _ => "bad_upgrade",
        };
        let body = serde_json::json!({"error": {"code": code, "message": self.message}});
        let body = body.to_string();
        let version = if self.status == 426 {
            "Sec-WebSocket-Version: 13\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             {version}Connection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Parses the upgrade request at the start of `bytes`; `max_len` bounds how long it may be.
pub fn parse(bytes: &[u8], max_len: usize) -> Result<Parsed, Rejection> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() > max_len => {
            return Err(Rejection::new(431, "the upgrade request is too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::new(
                431,
                "the upgrade request has too many headers",
            ));
        }
        Err(_) => return Err(Rejection::new(400, "not an HTTP request")),
    };
    if len > max_len {
        return Err(Rejection::new(431, "the upgrade request is too large"));
    }
    if request.method != Some("GET") {
        return Err(Rejection::new(405, "a WebSocket upgrade is a GET request"));
    }
    if request.version != Some(1) {
        return Err(Rejection::new(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let header = |name: &'static str| values(request.headers, name);
    let has_token = |name: &'static str, token: &str| {
        header(name).any(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Rejection::new(
            400,
            "expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)",
        ));
    }
    if !header("sec-websocket-version").any(|version| version.trim() == "13") {
        return Err(Rejection::new(
            426,
            "only WebSocket version 13 is supported",
        ));
    }
    let Some(key) = header("sec-websocket-key").next().map(str::trim) else {
        return Err(Rejection::new(400, "missing Sec-WebSocket-Key"));
    };
    // The key is 16 random bytes in base64 (RFC 6455 section 4.1).
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(Rejection::new(400, "malformed Sec-WebSocket-Key")),
    }
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    Ok(Parsed::Upgrade {
        len,
        response: response.into_bytes(),
    })
}

/// The values of the headers called `name`, as text.
fn values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |header| header.name.eq_ignore_ascii_case(name))
        .filter_map(|header| std::str::from_utf8(header.value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET / HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\nConnection: keep-alive, \
             Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn answers_the_rfc_example_with_its_accept_key() {
        // RFC 6455 section 1.3: this key is answered with this accept value.
        let request = request("");
        let Ok(Parsed::Upgrade { len, response }) = parse(request.as_bytes(), 8192) else {
            panic!("a valid upgrade");
        };
        assert_eq!(len, request.len());
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn frames_sent_right_after_the_request_are_not_part_of_it() {
        let mut bytes = request("").into_bytes();
        let request_len = bytes.len();
        bytes.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        let Ok(Parsed::Upgrade { len, .. }) = parse(&bytes, 8192) else {
            panic!("a valid upgrade");
        };
        assert_eq!(len, request_len);
    }

    #[test]
    fn waits_for_the_whole_request_and_bounds_it() {
        let request = request("");
        assert_eq!(parse(&request.as_bytes()[..30], 8192), Ok(Parsed::Partial));
        let padding = format!("X-Padding: {}\r\n", "a".repeat(9000));
        let long = request.replace("Host: node\r\n", &padding);
        assert_eq!(
            parse(&long.as_bytes()[..8500], 8192).unwrap_err().status,
            431
        );
        let many: String = (0..40).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            parse(self::request(&many).as_bytes(), 8192)
                .unwrap_err()
                .status,
            431
        );
    }

    #[test]
    fn refuses_what_is_not_a_websocket_upgrade() {
        let cases = [
            (request("").replace("GET", "POST"), 405),
            (request("").replace("HTTP/1.1", "HTTP/1.0"), 400),
            (request("").replace("Upgrade: websocket\r\n", ""), 400),
            (
                request("").replace("keep-alive, Upgrade", "keep-alive"),
                400,
            ),
            (request("").replace("Version: 13", "Version: 8"), 426),
            (request("").replace(KEY, "not base64!"), 400),
            (
                request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                400,
            ),
            ("\u{1}\u{2} garbage\r\n\r\n".to_owned(), 400),
        ];
        for (request, status) in cases {
            let rejection = parse(request.as_bytes(), 8192).unwrap_err();
            assert_eq!(rejection.status, status, "{request:?}");
            let response = String::from_utf8(rejection.response()).unwrap();
            assert!(response.starts_with(&format!("HTTP/1.1 {status} ")));
            let body = response.split("\r\n\r\n").nth(1).unwrap();
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["error"]["message"], rejection.message);
            if status == 426 {
                assert!(response.contains("Sec-WebSocket-Version: 13\r\n"));
            }
        }
    }
}
