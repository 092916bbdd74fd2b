//! The transports under a [`crate::Connection`]: WebSocket over TCP (`ws://`), over TLS
//! (`wss://`), and QUIC (`quic://`, one bidirectional stream, varint-length-prefixed frames).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use pigeon_proto::device::{ClientFrame, ServerFrame};
use pigeon_proto::framing::{self, FrameError};
use pigeon_proto::{ALPN, Message as _};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, ReadError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::ClientError;

/// Largest frame the client accepts from a node.
const MAX_FRAME: usize = 64 * 1024;

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

/// One open transport.
pub(crate) enum Link {
    WebSocket(WebSocketStream<Box<dyn Io>>),
    Quic(QuicLink),
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

struct Target {
    scheme: String,
    host: String,
    port: u16,
}

fn parse(url: &str) -> Result<Target, ClientError> {
    let bad = || ClientError::Url(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let scheme = uri.scheme_str().ok_or_else(bad)?.to_owned();
    let default_port = match scheme.as_str() {
        "ws" => 80,
        "wss" | "quic" => 443,
        _ => return Err(bad()),
    };
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_matches(['[', ']'])
        .to_owned();
    Ok(Target {
        scheme,
        host,
        port: uri.port_u16().unwrap_or(default_port),
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
    target: &Target,
    options: &ConnectOptions,
) -> Result<ServerName<'static>, ClientError> {
    let name = options
        .server_name
        .clone()
        .unwrap_or_else(|| target.host.clone());
    ServerName::try_from(name).map_err(tls_error)
}

async fn resolve(target: &Target) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host((target.host.as_str(), target.port))
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
            return QuicLink::open(&target, addr, options).await.map(Link::Quic);
        }
        let tcp = match options.bind {
            Some(ip) => {
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(io)?;
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
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        // The WebSocket handshake's own URL must be ws/wss: QUIC never gets here.
        let (stream, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(io)?;
        Ok(Link::WebSocket(stream))
    }

    pub(crate) async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        match self {
            Link::WebSocket(stream) => stream
                .send(Message::Binary(frame.encode_to_vec().into()))
                .await
                .map_err(io),
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
            Link::WebSocket(stream) => loop {
                let message = match stream.next().await {
                    None => return Err(ClientError::Io("connection closed".into())),
                    Some(message) => message.map_err(io)?,
                };
                match message {
                    Message::Binary(bytes) => {
                        return ServerFrame::decode(bytes)
                            .map(Incoming::Frame)
                            .map_err(|error| ClientError::Protocol(error.to_string()));
                    }
                    Message::Close(frame) => {
                        let (code, reason) = frame
                            .map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        return Ok(Incoming::Closed { code, reason });
                    }
                    Message::Text(_) => {
                        return Err(ClientError::Protocol("unexpected text frame".into()));
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            },
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
            Link::WebSocket(mut stream) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    if stream.close(None).await.is_ok() {
                        while let Some(Ok(_)) = stream.next().await {}
                    }
                })
                .await;
            }
            Link::Quic(link) => {
                link.connection.close(quinn::VarInt::from_u32(1000), b"bye");
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), link.endpoint.wait_idle()).await;
            }
        }
    }
}

impl QuicLink {
    async fn open(
        target: &Target,
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
            .unwrap_or_else(|| target.host.clone());
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
