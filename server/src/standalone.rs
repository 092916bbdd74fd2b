//! Standalone mode: one process that is a complete push server. The device listener, the
//! push API, the registry and the offline store (embedded, on disk) all live here, and
//! nothing else needs to run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::config::{AppSettings, Limits, Settings};
use crate::connection::DeviceContext;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::push::PushService;
use crate::session::SessionConfig;
use crate::store::StoreError;
use crate::store::embedded::EmbeddedStore;
use crate::websocket;

/// Why standalone mode could not start.
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

/// A running standalone server.
pub struct Running {
    /// Where devices connect (WebSocket).
    pub websocket_addr: SocketAddr,
    /// Whether the WebSocket listener speaks TLS (wss).
    pub websocket_tls: bool,
    /// Where devices connect over QUIC, when configured.
    pub quic_addr: Option<SocketAddr>,
    /// Where the push API listens.
    pub http_addr: SocketAddr,
    /// The apps it serves (the demo app included, when it was created).
    pub apps: Vec<AppSettings>,
    node: Arc<Node>,
    tracker: TaskTracker,
    drain_timeout: std::time::Duration,
}

/// The rustls configurations of the device listeners.
struct TlsConfigs {
    websocket: rustls::ServerConfig,
    quic: rustls::ServerConfig,
}

/// The id of the app created when the config declares none.
pub const DEMO_APP: &str = "demo";

/// The demo app of `data_dir`, created with a random API key and secret the first time, so
/// that `pigeon token` and `pigeon standalone` agree on it without a config file.
pub fn demo_app(data_dir: &Path) -> Result<AppSettings, StartError> {
    let path = data_dir.join("demo-app.toml");
    let failed = |message: String| StartError::DemoApp {
        path: path.display().to_string(),
        message,
    };
    #[derive(serde::Deserialize, serde::Serialize)]
    struct DemoFile {
        api_key: String,
        secret: String,
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let file: DemoFile =
                toml::from_str(&text).map_err(|error| failed(error.to_string()))?;
            return Ok(AppSettings {
                id: DEMO_APP.into(),
                api_key: file.api_key,
                secret: file.secret,
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(failed(error.to_string())),
    }
    let random_hex = |bytes: usize| -> String {
        (0..bytes)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect()
    };
    let file = DemoFile {
        api_key: format!("pk_demo_{}", random_hex(16)),
        secret: random_hex(32),
    };
    std::fs::create_dir_all(data_dir).map_err(|error| failed(error.to_string()))?;
    let text = toml::to_string(&file).map_err(|error| failed(error.to_string()))?;
    std::fs::write(&path, text).map_err(|error| failed(error.to_string()))?;
    Ok(AppSettings {
        id: DEMO_APP.into(),
        api_key: file.api_key,
        secret: file.secret,
    })
}

/// The apps of `settings`, or the demo app when it declares none.
pub fn apps_or_demo(settings: &Settings) -> Result<Vec<AppSettings>, StartError> {
    if settings.apps.is_empty() {
        Ok(vec![demo_app(&settings.data_dir)?])
    } else {
        Ok(settings.apps.clone())
    }
}

/// Starts a standalone server.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let apps = apps_or_demo(&settings)?;
    let limits = settings.limits.clone();
    let store = EmbeddedStore::open(
        &settings.data_dir,
        limits.store_queue,
        limits.max_stored_per_device,
    )
    .map_err(|source| StartError::Store {
        dir: settings.data_dir.display().to_string(),
        source,
    })?;
    let store = Arc::new(store);
    let shutdown = CancellationToken::new();
    let node = Arc::new(Node::new(limits.outbound_queue, shutdown.clone()));
    let session = Arc::new(session_config(&limits));

    let devices = DeviceListeners::bind(&settings).await?;
    let http_listener = bind(settings.listen.http).await?;
    let http_addr = local_addr(&http_listener, settings.listen.http)?;

    let context = Arc::new(DeviceContext {
        node: node.clone(),
        registry: store.clone(),
        store: store.clone(),
        apps: apps.clone(),
        session,
        presence: None,
    });
    let tracker = TaskTracker::new();
    let (websocket_addr, websocket_tls, quic_addr) = (
        devices.websocket_addr,
        devices.websocket_tls,
        devices.quic_addr,
    );
    devices.spawn(context, &limits, &tracker);
    let api_state = Arc::new(ApiState {
        apps: apps.clone(),
        limits: limits.clone(),
        push: Some(Arc::new(PushService::new(
            node.clone(),
            store.clone(),
            store,
            limits.idempotency_window,
        ))),
        metrics: Arc::new(Metrics::default()),
        node: Some(node.clone()),
    });
    let api_shutdown = shutdown.clone();
    tracker.spawn(async move {
        if let Err(error) = api::serve(http_listener, api_state, api_shutdown).await {
            tracing::error!(%error, "push API failed");
        }
    });
    Ok(Running {
        websocket_addr,
        websocket_tls,
        quic_addr,
        http_addr,
        apps,
        node,
        tracker,
        drain_timeout: limits.drain_timeout,
    })
}

/// Waits, up to `timeout`, for the tasks of `tracker` (every connection's among them) to
/// end after shutdown was signalled; false when the deadline passed first.
pub(crate) async fn wait_for_connections(
    tracker: &TaskTracker,
    node: &Node,
    timeout: std::time::Duration,
) -> bool {
    tracker.close();
    let drained = tokio::time::timeout(timeout, tracker.wait()).await.is_ok();
    if !drained {
        tracing::warn!(
            remaining = node.connection_count(),
            "drain deadline passed with connections still open"
        );
    }
    drained
}

/// The session knobs of `limits`.
pub(crate) fn session_config(limits: &Limits) -> SessionConfig {
    SessionConfig {
        handshake_timeout: limits.handshake_timeout,
        heartbeat_interval: limits.heartbeat_interval,
        idle_timeout: limits.idle_timeout,
        ack_window: limits.ack_window,
    }
}

/// The bound device listeners (WebSocket, and QUIC when configured) of a process that
/// holds devices: standalone, or a cluster node.
pub(crate) struct DeviceListeners {
    /// Where the WebSocket listener is bound.
    pub websocket_addr: SocketAddr,
    /// Whether it speaks TLS.
    pub websocket_tls: bool,
    /// Where the QUIC endpoint is bound, if any.
    pub quic_addr: Option<SocketAddr>,
    websocket: TcpListener,
    websocket_acceptor: Option<tokio_rustls::TlsAcceptor>,
    quic: Option<quinn::Endpoint>,
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
        let websocket = bind(settings.listen.websocket).await?;
        let websocket_addr = local_addr(&websocket, settings.listen.websocket)?;
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
            websocket_addr,
            websocket_tls: tls.is_some(),
            quic_addr,
            websocket,
            websocket_acceptor: tls
                .map(|tls| tokio_rustls::TlsAcceptor::from(Arc::new(tls.websocket))),
            quic,
        })
    }

    /// Starts accepting devices into `context`, on tasks of `tracker`.
    pub fn spawn(self, context: Arc<DeviceContext>, limits: &Limits, tracker: &TaskTracker) {
        tracker.spawn(websocket::serve(
            self.websocket,
            self.websocket_acceptor,
            context.clone(),
            limits.clone(),
            tracker.clone(),
        ));
        if let Some(endpoint) = self.quic {
            // One connection limit per listener: a node's sockets are TCP and UDP alike.
            tracker.spawn(crate::quic::serve(
                endpoint,
                context,
                limits.max_connections,
                limits.max_device_frame_bytes,
                tracker.clone(),
            ));
        }
    }
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

pub(crate) fn local_addr(
    listener: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

impl Running {
    /// Drains: stops accepting, tells every device to reconnect (1001), and waits for the
    /// connections to finish, up to the drain timeout. Returns false when it ran out.
    pub async fn shutdown(self) -> bool {
        tracing::info!(connections = self.node.connection_count(), "draining");
        // Stops the listeners and closes every device with 1001.
        self.node.shut_down();
        wait_for_connections(&self.tracker, &self.node, self.drain_timeout).await
    }
}
