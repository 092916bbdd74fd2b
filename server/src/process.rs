//! The parts every `pigeon` process is composed from, whatever its role (standalone, node,
//! gateway): listeners, the device listeners and their drain, the HTTP server, and why a
//! process could not start.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::connections::ConnectionTable;
use crate::device::DeviceContext;
use crate::listener::{self, BoundedListener};
use crate::store::StoreError;
use crate::websocket;

/// Why a process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// Why.
        source: StoreError,
    },
    /// Redis could not be reached or configured.
    #[error("cannot use Redis at {urls}: {source}")]
    Redis {
        /// The configured URLs.
        urls: String,
        /// Why.
        source: StoreError,
    },
    /// Cluster mode's processes authenticate each other with a shared secret.
    #[error(
        "cluster mode needs cluster.secret (at least 32 characters), the same on every node and gateway"
    )]
    NoClusterSecret,
    /// Cluster mode serves only the apps its config declares.
    #[error("cluster mode needs its apps in the config ([[apps]]), the same on every process")]
    NoApps,
    /// The certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The demo app's file could not be read or written.
    #[error("demo app file {path}: {message}")]
    DemoApp {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// A started process of any role, as `main` runs it.
pub trait Running: Send + Sized {
    /// What the process prints once it serves: its role and where to reach it.
    fn banner(&self) -> String;

    /// Drains and stops. False when the drain deadline passed first.
    fn shutdown(self) -> impl Future<Output = bool> + Send;
}

/// Binds a TCP listener on `addr` with the configured backlog.
pub fn bind(
    addr: SocketAddr,
    settings: &Settings,
) -> Result<(TcpListener, SocketAddr), StartError> {
    listener::bind(addr, settings.listen.backlog)
        .map_err(|source| StartError::Bind { addr, source })
}

/// Binds the HTTP API's listener (`listen.http`), bounded by `limits.max_http_connections`.
pub fn bind_http(settings: &Settings) -> Result<(BoundedListener, SocketAddr), StartError> {
    bind_bounded(
        settings.listen.http,
        settings.limits.max_http_connections,
        settings,
    )
}

/// Binds the gRPC listener (`listen.grpc`), bounded by `limits.max_grpc_connections`.
pub fn bind_grpc(settings: &Settings) -> Result<(BoundedListener, SocketAddr), StartError> {
    bind_bounded(
        settings.listen.grpc,
        settings.limits.max_grpc_connections,
        settings,
    )
}

fn bind_bounded(
    addr: SocketAddr,
    max_connections: usize,
    settings: &Settings,
) -> Result<(BoundedListener, SocketAddr), StartError> {
    let (listener, bound) = bind(addr, settings)?;
    let idle = settings.limits.connection_idle_timeout;
    Ok((BoundedListener::new(listener, max_connections, idle), bound))
}

/// A gRPC server for `limits`: it pings a connection that has been quiet for a third of the
/// idle timeout (a live client answers, so only dead or silent peers reach the timeout), and
/// bounds each connection's concurrent calls.
pub fn grpc_server(limits: &crate::config::Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.connection_idle_timeout / 3))
        .http2_keepalive_timeout(Some(limits.connection_idle_timeout / 3))
        .max_concurrent_streams(Some(GRPC_STREAMS_PER_CONNECTION))
}

/// Concurrent calls on one gRPC connection, at most.
const GRPC_STREAMS_PER_CONNECTION: u32 = 256;

/// The rustls configurations of the device listeners.
struct TlsConfigs {
    websocket: rustls::ServerConfig,
    quic: rustls::ServerConfig,
}

/// The bound device listeners (WebSocket, and QUIC when configured) of a process that
/// holds devices: standalone, or a cluster node.
pub struct DeviceListeners {
    addresses: DeviceAddresses,
    websocket: TcpListener,
    websocket_acceptor: Option<tokio_rustls::TlsAcceptor>,
    quic: Option<quinn::Endpoint>,
}

/// Where devices connect.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAddresses {
    /// Where the WebSocket listener is bound.
    pub websocket: SocketAddr,
    /// Whether it speaks TLS (wss).
    pub websocket_tls: bool,
    /// Where the QUIC endpoint is bound, if any.
    pub quic: Option<SocketAddr>,
}

impl DeviceAddresses {
    /// The banner's lines about them.
    pub fn describe(&self) -> String {
        let scheme = if self.websocket_tls { "wss" } else { "ws" };
        let mut lines = format!("  device websocket: {scheme}://{}/\n", self.websocket);
        if let Some(quic) = self.quic {
            lines += &format!("  device quic:      quic://{quic}/\n");
        }
        lines
    }
}

impl DeviceListeners {
    /// Loads the certificate (if any) and binds the listeners `settings.listen` names.
    pub async fn bind(settings: &Settings) -> Result<Self, StartError> {
        let tls = match &settings.tls {
            Some(files) => Some(TlsConfigs {
                websocket: crate::tls::server_config(
                    &files.cert,
                    &files.key,
                    &[b"http/1.1"],
                    false,
                )?,
                quic: crate::tls::server_config(
                    &files.cert,
                    &files.key,
                    &[pigeon_proto::ALPN],
                    true,
                )?,
            }),
            None => None,
        };
        let (websocket, websocket_addr) = bind(settings.listen.websocket, settings)?;
        let (quic, quic_addr) = match (settings.listen.quic, &tls) {
            (Some(addr), Some(tls)) => {
                let endpoint =
                    crate::quic::endpoint(addr, tls.quic.clone(), settings.limits.idle_timeout)
                        .map_err(|source| StartError::Bind { addr, source })?;
                let bound = endpoint
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                (Some(endpoint), Some(bound))
            }
            _ => (None, None),
        };
        Ok(Self {
            addresses: DeviceAddresses {
                websocket: websocket_addr,
                websocket_tls: tls.is_some(),
                quic: quic_addr,
            },
            websocket,
            websocket_acceptor: tls
                .map(|tls| tokio_rustls::TlsAcceptor::from(Arc::new(tls.websocket))),
            quic,
        })
    }

    /// Where devices will connect.
    pub fn addresses(&self) -> DeviceAddresses {
        self.addresses
    }

    /// Starts accepting devices into `context`, on tasks of `tracker`; the listeners stop
    /// when the context's connection table shuts down.
    pub fn start(self, context: Arc<DeviceContext>, settings: &Settings, tracker: &TaskTracker) {
        let limits = &settings.limits;
        tracker.spawn(websocket::serve(
            self.websocket,
            self.websocket_acceptor,
            context.clone(),
            limits.clone(),
            tracker.clone(),
        ));
        if let Some(endpoint) = self.quic {
            // The connection limit and the handshake places are the context's, shared by
            // both listeners.
            tracker.spawn(crate::quic::serve(
                endpoint,
                context,
                limits.max_device_frame_bytes,
                tracker.clone(),
            ));
        }
    }
}

/// Closes every device connection of `connections` with 1001 (going away) and waits, up to
/// `timeout`, for the tasks of `tracker` (every connection's among them) to end. False when
/// the deadline passed first.
pub async fn drain(
    connections: &ConnectionTable,
    tracker: &TaskTracker,
    timeout: Duration,
) -> bool {
    tracing::info!(connections = connections.connection_count(), "draining");
    connections.shut_down();
    tracker.close();
    let drained = tokio::time::timeout(timeout, tracker.wait()).await.is_ok();
    if !drained {
        tracing::warn!(
            remaining = connections.connection_count(),
            "drain deadline passed with connections still open"
        );
    }
    drained
}
