//! The transports under a [`crate::Connection`]: WebSocket over TCP (`ws://`), over TLS
//! (`wss://`), and QUIC (`quic://`, one bidirectional stream, varint-length-prefixed frames).
//!
//! The WebSocket client is Pigeon's own, on the framing the node uses
//! (`pigeon_proto::websocket`): a simulator holds tens of thousands of connections per
//! process, so an idle one holds its socket and empty buffers, nothing more. It speaks what a
//! client of binary messages needs: the upgrade (its accept key checked), masked frames,
//! fragmented messages, ping/pong and the closing handshake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use pigeon_proto::device::{ClientFrame, ServerFrame};
use pigeon_proto::framing::{self, FrameError};
use pigeon_proto::websocket::{self as ws, Framer, Inbound, Sender, read_some};
use pigeon_proto::{ALPN, Message as _};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, ReadError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::ClientError;

/// Largest frame the client accepts from a node.
const MAX_FRAME: usize = 64 * 1024;
/// Longest upgrade response (headers and error body) read.
const MAX_UPGRADE_RESPONSE: usize = 16 * 1024;
/// Headers an upgrade response may carry, at most.
const MAX_RESPONSE_HEADERS: usize = 32;

/// How to reach a node, beyond its URL.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// A PEM file of CA certificates to trust for `wss://` and `quic://`, instead of the
    /// system's roots (for example the `ca.pem` of `pigeon cert --dev`).
    pub ca_file: Option<PathBuf>,
    /// The name to check the node's certificate against, instead of the URL's host.
    pub server_name: Option<String>,
    /// Local address to connect from (to spread many simulated devices over addresses).
    pub bind: Option<std::net::IpAddr>,
}

/// A device-side stream for WebSocket: TCP or TLS over TCP.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// One open transport. QUIC's state is boxed: it is large, and a fleet of WebSocket
/// devices should not be sized for it.
pub(crate) enum Link {
    WebSocket(WebSocketLink),
    Quic(Box<QuicLink>),
}

/// A WebSocket connection: the socket and the node's framing (`pigeon_proto::websocket::
/// Framer`), whose buffers are freed as soon as they are empty.
pub(crate) struct WebSocketLink {
    io: Box<dyn Io>,
    framer: Framer,
}

pub(crate) struct QuicLink {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    received: BytesMut,
}

/// What came from the node.
pub(crate) enum Incoming {
    Frame(ServerFrame),
    Closed { code: u16, reason: String },
}

fn io(error: impl std::fmt::Display) -> ClientError {
    ClientError::Io(error.to_string())
}

fn tls_error(error: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(error.to_string())
}

#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    scheme: &'a str,
    /// `host[:port]` as written, for the Host header.
    authority: &'a str,
    /// The host without IPv6 brackets.
    host: &'a str,
    port: u16,
    /// Path and query, for the request line.
    path: &'a str,
}

/// Splits `scheme://host[:port][/path]`; IPv6 hosts are bracketed (`ws://[::1]:8080/`).
fn parse(url: &str) -> Result<Target<'_>, ClientError> {
    let bad = || ClientError::Url(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let default_port = match scheme {
        "ws" => 80,
        "wss" | "quic" => 443,
        _ => return Err(bad()),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) if rest[at..].starts_with('/') => (&rest[..at], &rest[at..]),
        Some(_) => return Err(bad()),
        None => (rest, "/"),
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                port => (host, Some(port.strip_prefix(':').ok_or_else(bad)?)),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host.contains(['@', ' ']) {
        return Err(bad());
    }
    let port = match port {
        Some(port) => port.parse().map_err(|_| bad())?,
        None => default_port,
    };
    Ok(Target {
        scheme,
        authority,
        host,
        port,
        path,
    })
}

fn tls_config(options: &ConnectOptions, alpn: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path).map_err(tls_error)? {
                roots
                    .add(certificate.map_err(tls_error)?)
                    .map_err(tls_error)?;
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

fn server_name(
    target: &Target<'_>,
    options: &ConnectOptions,
) -> Result<ServerName<'static>, ClientError> {
    let name = options
        .server_name
        .clone()
        .unwrap_or_else(|| target.host.to_owned());
    ServerName::try_from(name).map_err(tls_error)
}

async fn resolve(target: &Target<'_>) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host((target.host, target.port))
        .await
        .map_err(io)?
        .next()
        .ok_or_else(|| ClientError::Io(format!("{} does not resolve", target.host)))
}

impl Link {
    /// Opens a transport to `url`.
    pub(crate) async fn open(url: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let target = parse(url)?;
        let addr = resolve(&target).await?;
        if target.scheme == "quic" {
            return QuicLink::open(&target, addr, options)
                .await
                .map(|link| Link::Quic(Box::new(link)));
        }
        let tcp = match options.bind {
            Some(ip) => {
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(io)?;
                defer_port_choice(&socket);
                socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
                socket.connect(addr).await.map_err(io)?
            }
            None => TcpStream::connect(addr).await.map_err(io)?,
        };
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = if target.scheme == "wss" {
            let connector =
                tokio_rustls::TlsConnector::from(Arc::new(tls_config(options, b"http/1.1")?));
            let name = server_name(&target, options)?;
            Box::new(connector.connect(name, tcp).await.map_err(tls_error)?)
        } else {
            Box::new(tcp)
        };
        WebSocketLink::upgrade(stream, &target)
            .await
            .map(Link::WebSocket)
    }

    pub(crate) async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        match self {
            Link::WebSocket(link) => link.send(frame).await,
            Link::Quic(link) => {
                let mut bytes = Vec::new();
                framing::encode(frame, &mut bytes);
                link.send.write_all(&bytes).await.map_err(io)
            }
        }
    }

    /// The next frame or close. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Incoming, ClientError> {
        match self {
            Link::WebSocket(link) => link.recv().await,
            Link::Quic(link) => link.recv().await,
        }
    }

    /// Moves a QUIC connection to a new local UDP socket, as a phone changing networks does.
    pub(crate) fn rebind(&self) -> Result<(), ClientError> {
        match self {
            Link::WebSocket(_) => Err(ClientError::Io(
                "only QUIC connections can move to a new socket".into(),
            )),
            Link::Quic(link) => {
                let local = link.endpoint.local_addr().map_err(io)?;
                let any = SocketAddr::new(local.ip(), 0);
                let socket = std::net::UdpSocket::bind(any).map_err(io)?;
                link.endpoint.rebind(socket).map_err(io)
            }
        }
    }

    /// The local address of the transport.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Link::WebSocket(_) => None,
            Link::Quic(link) => link.endpoint.local_addr().ok(),
        }
    }

    pub(crate) async fn close(self) {
        match self {
            Link::WebSocket(mut link) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), link.close()).await;
            }
            Link::Quic(link) => {
                link.connection.close(quinn::VarInt::from_u32(1000), b"bye");
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), link.endpoint.wait_idle()).await;
            }
        }
    }
}

/// Lets connect(), not bind(), choose the source port of a socket bound to a chosen
/// address, so the port need only be unique per destination (IP_BIND_ADDRESS_NO_PORT).
/// Without it each bind reserves a port for every destination: one address then holds at
/// most ~28,000 connections, and at hundreds of thousands of bound sockets the kernel's
/// search for a free port takes most of the machine's CPU. Best effort: where the option
/// is missing, bind() reserves the port as before.
pub fn defer_port_choice(socket: &tokio::net::TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
        if let Err(error) = setsockopt(socket, IpBindAddressNoPort, &true) {
            tracing::debug!(%error, "IP_BIND_ADDRESS_NO_PORT is not available");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

impl WebSocketLink {
    /// Sends the upgrade request and checks the 101; the link keeps whatever followed it.
    async fn upgrade(mut stream: Box<dyn Io>, target: &Target<'_>) -> Result<Self, ClientError> {
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             User-Agent: pigeon-client/{}\r\n\r\n",
            target.path,
            target.authority,
            env!("CARGO_PKG_VERSION"),
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let mut input = Vec::new();
        loop {
            let read = read_some(&mut stream, &mut input).await.map_err(io)?;
            let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            let len = match response.parse(&input) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if read == 0 => {
                    return Err(ClientError::Io("the node closed during the upgrade".into()));
                }
                Ok(httparse::Status::Partial) if input.len() > MAX_UPGRADE_RESPONSE => {
                    return Err(ClientError::Protocol("an upgrade response too long".into()));
                }
                Ok(httparse::Status::Partial) => continue,
                Err(error) => {
                    // Not HTTP at all: most likely TLS on the other end of a ws:// URL.
                    return Err(ClientError::Io(format!(
                        "the node did not answer the upgrade in HTTP ({error}); is it a wss:// port?"
                    )));
                }
            };
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case(name))
                    .and_then(|header| std::str::from_utf8(header.value).ok())
                    .unwrap_or_default()
            };
            let status = response.code.unwrap_or_default();
            if status != 101 {
                let body_len = header("content-length").parse::<usize>().unwrap_or(0);
                let error = Self::refusal(&mut stream, input, len, body_len, status).await;
                return Err(error);
            }
            let connection_upgrade = header("connection")
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
            if !header("upgrade").eq_ignore_ascii_case("websocket")
                || !connection_upgrade
                || header("sec-websocket-accept") != ws::accept_key(&key)
            {
                return Err(ClientError::Protocol(
                    "the 101 is not an upgrade to WebSocket for this request".into(),
                ));
            }
            input.drain(..len);
            return Ok(Self {
                io: stream,
                framer: Framer::new(Sender::Server, MAX_FRAME, input),
            });
        }
    }

    /// The error for an upgrade answered with `status`: the body (the node's JSON error)
    /// read as far as it came, within bounds.
    async fn refusal(
        stream: &mut Box<dyn Io>,
        mut input: Vec<u8>,
        header_len: usize,
        body_len: usize,
        status: u16,
    ) -> ClientError {
        let want = (header_len + body_len).min(MAX_UPGRADE_RESPONSE);
        while input.len() < want {
            match tokio::time::timeout(Duration::from_secs(1), read_some(stream, &mut input)).await
            {
                Ok(Ok(read)) if read > 0 => {}
                _ => break,
            }
        }
        let body = input
            .get(header_len..want.min(input.len()))
            .unwrap_or_default();
        ClientError::Io(format!(
            "the node refused the upgrade: HTTP {status} {}",
            String::from_utf8_lossy(body)
        ))
    }

    async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        // Encoding into a Vec cannot fail: it grows as needed.
        self.framer
            .queue_message(frame.encoded_len(), |out| frame.encode_raw(out));
        self.framer.write_out(&mut self.io).await.map_err(io)
    }

    /// The next message or close. Cancel-safe.
    async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            // A Pong (or the answer to a Close) queued by the last parse goes out first.
            self.framer.write_out(&mut self.io).await.map_err(io)?;
            let parsed = self
                .framer
                .parse(|bytes: &[u8]| ServerFrame::decode(bytes))
                .map_err(|error| ClientError::Protocol(error.to_string()))?;
            match parsed {
                Some(Inbound::Message(frame)) => {
                    return frame
                        .map(Incoming::Frame)
                        .map_err(|error| ClientError::Protocol(error.to_string()));
                }
                Some(Inbound::Closed { code, reason }) => {
                    // The answering Close; the node closes the socket after it.
                    let _ = self.framer.write_out(&mut self.io).await;
                    return Ok(Incoming::Closed { code, reason });
                }
                Some(Inbound::Handled) => {}
                None => {
                    if self.framer.read(&mut self.io).await.map_err(io)? == 0 {
                        return Err(ClientError::Io("connection closed".into()));
                    }
                }
            }
        }
    }

    /// The closing handshake: a Close, then whatever the node still sends, until its Close
    /// or the end of the stream.
    async fn close(&mut self) {
        self.framer.queue_close(1000, "");
        if self.framer.write_out(&mut self.io).await.is_err() {
            return;
        }
        while let Ok(Incoming::Frame(_)) = self.recv().await {}
    }
}

impl QuicLink {
    async fn open(
        target: &Target<'_>,
        addr: SocketAddr,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let local = match (options.bind, addr) {
            (Some(ip), _) => SocketAddr::new(ip, 0),
            (None, SocketAddr::V4(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (None, SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
        };
        let mut endpoint = quinn::Endpoint::client(local).map_err(io)?;
        let crypto = QuicClientConfig::try_from(tls_config(options, ALPN)?).map_err(tls_error)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let name = options
            .server_name
            .clone()
            .unwrap_or_else(|| target.host.to_owned());
        let connection = endpoint
            .connect(addr, &name)
            .map_err(io)?
            .await
            .map_err(|error| match error {
                ConnectionError::TransportError(error)
                    if error.to_string().contains("certificate") =>
                {
                    ClientError::Tls(error.to_string())
                }
                other => quic_error(other),
            })?;
        let (send, recv) = connection.open_bi().await.map_err(quic_error)?;
        Ok(Self {
            endpoint,
            connection,
            send,
            recv,
            received: BytesMut::new(),
        })
    }

    async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            match framing::decode::<ServerFrame>(&mut self.received, MAX_FRAME) {
                Ok(Some(frame)) => return Ok(Incoming::Frame(frame)),
                Ok(None) => {}
                Err(FrameError::TooBig { length }) => {
                    return Err(ClientError::Protocol(format!("a frame of {length} bytes")));
                }
                Err(FrameError::Malformed(message)) => return Err(ClientError::Protocol(message)),
            }
            match self.recv.read_chunk(4096, true).await {
                Ok(Some(chunk)) => self.received.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(ClientError::Io("stream finished".into())),
                Err(ReadError::ConnectionLost(ConnectionError::ApplicationClosed(close))) => {
                    return Ok(Incoming::Closed {
                        code: u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
                        reason: String::from_utf8_lossy(&close.reason).into_owned(),
                    });
                }
                Err(error) => return Err(io(error)),
            }
        }
    }
}

fn quic_error(error: ConnectionError) -> ClientError {
    match error {
        ConnectionError::ApplicationClosed(close) => ClientError::Closed {
            code: u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => io(other),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt as _, StreamExt as _};
    use pigeon_proto::device::{Ack, Push, Welcome, client_frame, server_frame};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        let target = parse("ws://127.0.0.1:7001/").unwrap();
        assert_eq!(
            (target.scheme, target.host, target.port, target.path),
            ("ws", "127.0.0.1", 7001, "/")
        );
        let target = parse("wss://[::1]/devices?v=1").unwrap();
        assert_eq!(
            (target.authority, target.host, target.port, target.path),
            ("[::1]", "::1", 443, "/devices?v=1")
        );
        assert_eq!(parse("quic://node.example:4433").unwrap().port, 4433);
        assert_eq!(parse("ws://node").unwrap().port, 80);
        for bad in [
            "http://node/",
            "node:80",
            "ws://",
            "ws://:80/",
            "ws://node:port/",
            "ws://[::1/",
            "ws://user@node/",
            "ws://node?x",
        ] {
            assert!(matches!(parse(bad), Err(ClientError::Url(_))), "{bad}");
        }
    }

    fn binary(frame: ServerFrame) -> Message {
        Message::Binary(frame.encode_to_vec().into())
    }

    /// The client against an independent server implementation (tungstenite's): the
    /// upgrade and its accept key, masked frames both ways, a ping answered, a fragmented
    /// message, a close with its code and reason.
    #[tokio::test]
    async fn speaks_websocket_with_another_implementation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
            let Some(Ok(Message::Binary(hello))) = ws.next().await else {
                panic!("expected the Hello");
            };
            let hello = ClientFrame::decode(hello).unwrap();
            assert!(matches!(hello.kind, Some(client_frame::Kind::Hello(_))));
            ws.send(Message::Ping(b"probe".to_vec().into()))
                .await
                .unwrap();
            let welcome = ServerFrame {
                kind: Some(server_frame::Kind::Welcome(Welcome::default())),
            };
            ws.send(binary(welcome)).await.unwrap();
            let push = ServerFrame {
                kind: Some(server_frame::Kind::Push(Push {
                    seq: 1,
                    payload: vec![7; 3000].into(),
                    ..Push::default()
                })),
            }
            .encode_to_vec();
            let (head, tail) = push.split_at(1000);
            use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode;
            use tokio_tungstenite::tungstenite::protocol::frame::{Frame, coding::Data};
            let first = Frame::message(head.to_vec(), OpCode::Data(Data::Binary), false);
            let last = Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true);
            ws.send(Message::Frame(first)).await.unwrap();
            ws.send(Message::Frame(last)).await.unwrap();
            let mut pong = false;
            let ack = loop {
                match ws.next().await {
                    Some(Ok(Message::Pong(payload))) => {
                        assert_eq!(&payload[..], b"probe");
                        pong = true;
                    }
                    Some(Ok(Message::Binary(bytes))) => break ClientFrame::decode(bytes).unwrap(),
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert!(pong, "the ping was answered before the ack");
            assert_eq!(
                ack.kind,
                Some(client_frame::Kind::Ack(Ack {
                    seq: 1,
                    ..Ack::default()
                }))
            );
            ws.close(Some(CloseFrame {
                code: 4003.into(),
                reason: "replaced".into(),
            }))
            .await
            .unwrap();
            // The client answers the close; the stream then ends.
            while let Some(Ok(_)) = ws.next().await {}
        });
        let state = crate::DeviceState::default();
        let mut connection = crate::Connection::connect(&url, "credential", &state)
            .await
            .unwrap();
        let push = connection.next_push().await.unwrap();
        assert_eq!((push.seq, push.payload.len()), (1, 3000));
        connection.ack(1).await.unwrap();
        match connection.next_push().await {
            Err(ClientError::Closed { code, reason }) => {
                assert_eq!((code, reason.as_str()), (4003, "replaced"));
            }
            other => panic!("expected the close, got {:?}", other.map(|push| push.seq)),
        }
        server.await.unwrap();
    }

    /// A refused upgrade comes back as an error carrying the node's status and body.
    #[tokio::test]
    async fn a_refused_upgrade_reports_the_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                read_some(&mut socket, &mut request).await.unwrap();
            }
            let body = r#"{"error":{"code":"unsupported_websocket_version"}}"#;
            let response = format!(
                "HTTP/1.1 426 Upgrade Required\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
        });
        let error = Link::open(&url, &ConnectOptions::default())
            .await
            .err()
            .expect("refused");
        let text = error.to_string();
        assert!(text.contains("HTTP 426"), "{text}");
        assert!(text.contains("unsupported_websocket_version"), "{text}");
    }
}
