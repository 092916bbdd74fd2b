//! Standalone mode: one process that is a complete push server. The device listeners, the
//! push API, the registry and the offline store (embedded, on disk) all live here, and
//! nothing else needs to run. The push pipeline delivers into the process's own connection
//! table.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, PushApi};
use crate::config::{AppSettings, Settings};
use crate::connections::ConnectionTable;
use crate::device::DeviceContext;
use crate::listener;
use crate::metrics::Metrics;
use crate::process::{self, DeviceAddresses, DeviceListeners, Running, StartError};
use crate::store::embedded::EmbeddedStore;

/// A running standalone server.
pub struct Standalone {
    /// Where devices connect.
    pub devices: DeviceAddresses,
    /// Where the push API listens.
    pub http_addr: SocketAddr,
    /// The apps it serves (the demo app included, when it was created).
    pub apps: Vec<AppSettings>,
    data_dir: std::path::PathBuf,
    connections: Arc<ConnectionTable>,
    store: Arc<EmbeddedStore>,
    pipeline: Arc<crate::push::Pipeline>,
    receipts: crate::receipts::Flushing,
    tracker: TaskTracker,
    drain_timeout: std::time::Duration,
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
            return Ok(AppSettings::new(DEMO_APP, file.api_key, file.secret));
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
    Ok(AppSettings::new(DEMO_APP, file.api_key, file.secret))
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
pub async fn start(settings: Settings) -> Result<Standalone, StartError> {
    let apps = apps_or_demo(&settings)?;
    let limits = &settings.limits;
    let connections = Arc::new(ConnectionTable::new(
        limits.outbound_queue,
        CancellationToken::new(),
    ));
    let store =
        EmbeddedStore::open(&settings.data_dir, limits, connections.clone()).map_err(|source| {
            StartError::Store {
                dir: settings.data_dir.display().to_string(),
                source,
            }
        })?;
    let store = Arc::new(store);
    let devices = DeviceListeners::bind(&settings).await?;
    let (http_listener, http_addr) = process::bind_http(&settings)?;

    let tracker = TaskTracker::new();
    let context = DeviceContext::new(
        connections.clone(),
        store.clone(),
        apps.clone(),
        limits,
        None,
    );
    let device_addresses = devices.addresses();
    let handshakes = context.handshakes.clone();
    let receipts = context.receipts.clone();
    receipts.webhooks().start(connections.shutdown());
    let flushing = receipts.clone().start(
        store.clone(),
        (limits.message_retention, limits.stats_retention),
    );
    tokio::spawn(context.caps.clone().run(
        store.clone(),
        connections.clone(),
        connections.shutdown().clone(),
    ));
    devices.start(Arc::new(context), &settings, &tracker);
    tokio::spawn(crate::stream_keeper::run(
        connections.clone(),
        store.clone(),
        limits.heartbeat_interval,
        connections.shutdown().clone(),
    ));
    tokio::spawn(connections.clone().run_pacing());
    let metrics = Arc::new(Metrics::with_devices(connections.clone(), handshakes));
    metrics.watch_receipts(receipts);
    metrics.watch_embedded((*store).clone());
    let store_for_schedules = store.clone();
    let store_to_close = store.clone();
    tokio::spawn(crate::device_expiry::run(
        store.clone(),
        connections.clone(),
        apps.iter().map(|app| app.id.clone()).collect(),
        limits.device_inactivity,
        connections.shutdown().clone(),
    ));
    let push_api = Arc::new(PushApi::new(
        apps.clone(),
        limits,
        store,
        connections.clone(),
        metrics.clone(),
        Arc::new(crate::rate_limit::LocalBuckets::default()),
    ));
    tokio::spawn(crate::scheduler::run(
        store_for_schedules,
        push_api.pipeline.clone(),
        limits.message_retention,
        connections.shutdown().clone(),
    ));
    let pipeline = push_api.pipeline.clone();
    let router =
        api::push_routes(push_api).merge(api::ops_routes(metrics, &settings.metrics_token));
    listener::serve_http(
        http_listener,
        router,
        limits,
        connections.shutdown().clone(),
        &tracker,
    );
    Ok(Standalone {
        devices: device_addresses,
        http_addr,
        apps,
        data_dir: settings.data_dir.clone(),
        connections,
        store: store_to_close,
        pipeline,
        receipts: flushing,
        tracker,
        drain_timeout: limits.drain_timeout,
    })
}

impl Running for Standalone {
    fn banner(&self) -> String {
        let mut banner = "pigeon standalone is running\n".to_owned();
        banner += &self.devices.describe();
        banner += &format!("  push api:         http://{}/v1/push\n", self.http_addr);
        banner += &format!("  data directory:   {}\n", self.data_dir.display());
        for app in &self.apps {
            banner += &format!("  app {}: api key {}\n", app.id, app.api_key);
        }
        banner
    }

    /// Drains: stops accepting, tells every device to reconnect (1001), and waits for the
    /// connections to finish, up to the drain timeout. Then what the process holds for the
    /// store is written (statuses, statistics, receipts' counts), and the store is closed,
    /// so that the next start opens it at once.
    async fn shutdown(self) -> bool {
        let drained = process::drain(&self.connections, &self.tracker, self.drain_timeout).await;
        self.pipeline.flush(self.drain_timeout).await;
        self.receipts.stop(self.drain_timeout).await;
        match tokio::time::timeout(self.drain_timeout, self.store.close()).await {
            Ok(Ok(())) => drained,
            Ok(Err(error)) => {
                tracing::error!(%error, "closing the store failed");
                false
            }
            Err(_) => {
                tracing::error!("closing the store did not end in time; the next start checks it");
                false
            }
        }
    }
}
