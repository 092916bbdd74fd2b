//! Settings: one serde tree read from a TOML file, then overridden by `PIGEON_*` variables.
//!
//! A variable names a key by its path, upper-cased, with `__` between levels:
//! `PIGEON_LIMITS__MAX_PAYLOAD_BYTES=8192` sets `limits.max_payload_bytes`, and
//! `PIGEON_APPS__0__API_KEY=...` sets `api_key` of the first `[[apps]]` entry. A value is
//! read as a TOML value when it parses as one (numbers, booleans) and as a string otherwise.
//!
//! Every error names the key it is about, so `pigeon` can exit with a message that points
//! at the line to fix.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pigeon_proto::credential::{AppKeys, Key};
use serde::{Deserialize, Deserializer};

/// Prefix of the environment variables that override the config file.
pub const ENV_PREFIX: &str = "PIGEON_";

/// Everything a `pigeon` process is configured with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where the process listens.
    pub listen: Listen,
    /// Directory of the embedded store (standalone mode) and the generated demo app.
    pub data_dir: PathBuf,
    /// Sizes, deadlines and caps.
    pub limits: Limits,
    /// The apps allowed to push and whose devices may connect.
    pub apps: Vec<AppSettings>,
    /// Log filter, in `tracing` env-filter syntax: `info`, `pigeon_server=debug,warn`, ...
    pub log: String,
    /// When set, `GET /metrics` answers only requests with `Authorization: Bearer <token>`
    /// (at least 16 characters); `/healthz` stays open.
    pub metrics_token: Secret,
    /// The certificate of the device listeners. With it, the WebSocket listener speaks only
    /// wss, and a QUIC listener may be configured.
    pub tls: Option<TlsFiles>,
    /// Cluster mode (`pigeon node`, `pigeon gateway`): Redis, leases, fan-out.
    pub cluster: ClusterSettings,
    /// Traces of pushes, exported with OpenTelemetry (off by default).
    pub tracing: TracingSettings,
}

/// Where the spans of pushes go: an OpenTelemetry collector's OTLP/HTTP endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// The collector's base URL, e.g. `http://127.0.0.1:4318` (spans go to
    /// `<url>/v1/traces`); empty (the default): no spans are recorded.
    pub otlp_endpoint: String,
    /// The service the spans are of; empty: `pigeon-standalone`, `pigeon-gateway` or
    /// `pigeon-node`.
    pub service_name: String,
}

/// Settings of cluster mode; standalone mode ignores them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Redis URLs: one for a single Redis, or seed nodes of a Redis Cluster.
    pub redis: Vec<String>,
    /// Whether `redis` names a Redis Cluster.
    pub redis_cluster: bool,
    /// Prefix of every Redis key, so that deployments can share a Redis.
    pub key_prefix: String,
    /// This node's id; empty: a new random one at every start.
    pub node_id: String,
    /// The address gateways and other nodes dial for this node's gRPC API; empty: the
    /// address `listen.grpc` is bound to.
    pub advertise: String,
    /// A node's membership lease; a node that has not renewed it for this long is dead and
    /// its devices count as offline.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// Deadline of one Redis command (and of connecting to Redis).
    #[serde(deserialize_with = "duration")]
    pub redis_timeout: Duration,
    /// Deadline of one Deliver call from a gateway to a node.
    #[serde(deserialize_with = "duration")]
    pub deliver_timeout: Duration,
    /// Targets in one Deliver call at most.
    pub deliver_batch: usize,
    /// The secret every node and gateway of the deployment shares: a node's internal gRPC
    /// API refuses calls that do not carry it (`authorization: Bearer <secret>`). Cluster
    /// mode does not start without one (at least 32 characters).
    pub secret: Secret,
    /// Consecutive failed calls that open a node's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker skips its node before letting one trial call through.
    #[serde(deserialize_with = "duration")]
    pub breaker_cooldown: Duration,
    /// Keys a gateway keeps in memory of what pushes read: uids' devices and opt-outs, the
    /// list of nodes; kept current by Redis's invalidations (client-side caching). 0: none,
    /// each push reads Redis.
    pub registry_cache: usize,
}

/// A secret from the config: printed as `<redacted>`, so it never reaches a log.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret with this value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        })
    }
}

/// PEM files of a certificate chain and its private key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Listen addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Device WebSocket listener.
    pub websocket: SocketAddr,
    /// Push API (HTTP/JSON) listener.
    pub http: SocketAddr,
    /// Device QUIC listener (UDP); none by default. Needs `[tls]`.
    pub quic: Option<SocketAddr>,
    /// gRPC listener: a node's internal API, or a gateway's push API.
    pub grpc: SocketAddr,
    /// Listen backlog of every TCP listener: connections the kernel holds for the process
    /// before it accepts them. 0 (the default): the kernel's maximum (`net.core.somaxconn`).
    pub backlog: u32,
}

/// Limits. Every queue and every wait in Pigeon has one of these as its bound.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest push payload (the JSON text of `payload`) the API accepts.
    pub max_payload_bytes: usize,
    /// Largest number of uids plus tokens in one push request.
    pub max_audience: usize,
    /// Tags one device has at most.
    pub max_tags_per_device: usize,
    /// Devices one request adds to or takes out of a tag at most.
    pub max_tag_batch: usize,
    /// Devices one alias names at most.
    pub max_devices_per_alias: usize,
    /// Largest frame a device may send; larger ones close the connection (1009).
    pub max_device_frame_bytes: usize,
    /// Device connections one node holds at most, counted from their Hello; more are
    /// refused (1013).
    pub max_connections: usize,
    /// Device connections being set up (TLS and WebSocket handshakes, waiting for Hello) at
    /// most; when all are taken, the oldest is closed (1013) to make room for the newest.
    pub max_handshakes: usize,
    /// Device sockets one client IP address may hold at once; more are closed as they
    /// arrive. 0 (the default): no limit.
    pub max_connections_per_ip: u32,
    /// Device sockets one client IP address may open per second; more are closed as they
    /// arrive. 0 (the default): no limit.
    pub connects_per_ip_per_second: u32,
    /// Time a new socket has to finish the WebSocket upgrade and send Hello.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// A device that has been silent this long is pinged.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// A device that has been silent this long is closed (4004).
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A plain (ws) WebSocket connection with nothing to do for this long leaves its task
    /// and waits in the node's parking lot (a few hundred bytes instead of a task); a frame,
    /// a push or a timer brings it back. 0 (the default) parks as soon as a connection is
    /// idle.
    #[serde(deserialize_with = "duration")]
    pub park_after: Duration,
    /// Pushes sent to a device and not yet acknowledged; further ones wait in the store.
    pub ack_window: u32,
    /// Pushes queued in memory for one connection; past it the connection catches up from
    /// the store instead.
    pub outbound_queue: usize,
    /// Messages kept for one offline device; past it the oldest is dropped (and counted).
    pub max_stored_per_device: u32,
    /// Messages kept in one shared stream of an app (pushes to every device, one copy
    /// each); past it the oldest is dropped, and devices that had not read it are told
    /// they may have missed some.
    pub max_stored_per_stream: u32,
    /// TTL of a push that names none.
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// Largest TTL a push may ask for.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// Largest TTL of a `marketing` push (its default too, when shorter than
    /// `default_ttl`): marketing expires.
    #[serde(deserialize_with = "duration")]
    pub max_marketing_ttl: Duration,
    /// How far ahead a push may be scheduled (`send_at`).
    #[serde(deserialize_with = "duration")]
    pub max_send_ahead: Duration,
    /// How long what became of a message is kept: that a scheduled push was sent (a
    /// cancel then answers 409, not 404).
    #[serde(deserialize_with = "duration")]
    pub message_retention: Duration,
    /// A device not admitted for this long (and not connected) is unregistered, as by
    /// `DELETE /v1/devices/{token}`: its token stops working, its queue and bindings go.
    /// Tokens handed out to connections that never came back go the same way. 0: never.
    #[serde(deserialize_with = "duration")]
    pub device_inactivity: Duration,
    /// How long an app's statistics (`GET /v1/stats`) are kept, by the minute.
    #[serde(deserialize_with = "duration")]
    pub stats_retention: Duration,
    /// How long an idempotency key is remembered.
    #[serde(deserialize_with = "duration")]
    pub idempotency_window: Duration,
    /// Lifetime of credentials minted by `pigeon token` when no `--ttl` is given.
    #[serde(deserialize_with = "duration")]
    pub credential_ttl: Duration,
    /// The furthest ahead a credential's `exp` may be when a device presents it; a longer
    /// lived credential is refused (4001).
    #[serde(deserialize_with = "duration")]
    pub max_credential_lifetime: Duration,
    /// Pushes in the pipeline (resolving, recording, fanning out) at once; others wait in
    /// queues by lane and app (docs/api.md).
    pub push_concurrency: usize,
    /// Of those, pushes of one app at most: a flood of one app leaves places to the others.
    pub push_concurrency_per_app: usize,
    /// Pushes waiting per app and lane (a quarter of it for the marketing and low lane);
    /// past it the API answers 429.
    pub push_queue: usize,
    /// Longest a push waits for the pipeline; past it the API answers 429.
    #[serde(deserialize_with = "duration")]
    pub push_queue_timeout: Duration,
    /// How long a push refused with 429 (over a rate limit, or its queue full) waits for its
    /// answer: a client that floods on a few connections is slowed to what they carry
    /// (docs/api.md). One over a rate limit is answered when it may be retried, if that is
    /// sooner. 0: answered at once.
    #[serde(deserialize_with = "duration")]
    pub refusal_delay: Duration,
    /// Write requests waiting for the store's writer; past it the API answers 503.
    pub store_queue: usize,
    /// Time a draining process waits for its connections to close before it exits.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Connections the HTTP API holds at once; more are closed as they arrive.
    pub max_http_connections: usize,
    /// Connections a gRPC port (a gateway's push API, a node's internal API) holds at once;
    /// more are closed as they arrive.
    pub max_grpc_connections: usize,
    /// Time an HTTP client has to send a whole request head, from when it connects or from
    /// the previous response.
    #[serde(deserialize_with = "duration")]
    pub http_header_timeout: Duration,
    /// Time a push request's body has to arrive, once its head has.
    #[serde(deserialize_with = "duration")]
    pub http_body_timeout: Duration,
    /// An HTTP or gRPC connection whose peer sends nothing for this long while the server
    /// waits to read is closed (a gRPC client must send its preface within it; servers ping
    /// idle gRPC connections at a third of it, so live ones stay open).
    #[serde(deserialize_with = "duration")]
    pub connection_idle_timeout: Duration,
}

/// One app: its id, the API key its backend pushes with, and the secret that signs its
/// device credentials; during a rotation (docs/security.md), also the key and the secret
/// being retired.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    /// Short id, used in credentials and in the API.
    pub id: String,
    /// Bearer key of the push API.
    pub api_key: String,
    /// A second API key, accepted too while backends move to `api_key`.
    #[serde(default)]
    pub previous_api_key: Option<String>,
    /// HS256 secret of device credentials: the one `pigeon token` signs with.
    pub secret: String,
    /// The key id (`kid`) of `secret`, which credentials signed with it name.
    #[serde(default)]
    pub kid: Option<String>,
    /// A second secret, accepted too until the credentials it signed have expired.
    #[serde(default)]
    pub previous_secret: Option<String>,
    /// The key id of `previous_secret`.
    #[serde(default)]
    pub previous_kid: Option<String>,
    /// How fast the app may push (none by default).
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// How many marketing pushes one user gets at most (no cap by default).
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// Where the app's receipt events are posted (none by default): docs/webhooks.md.
    #[serde(default)]
    pub webhook: Option<WebhookSettings>,
}

/// An app's receipt callback: batches of events (a message handed to a device's
/// connection, acknowledged by the device, opened by its user) posted to `url`, signed
/// with the app's `secret`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// An `http` or `https` URL; redirects are not followed.
    pub url: String,
    /// The events posted; the others are not collected.
    pub events: Vec<ReceiptKind>,
    /// Events waiting to be posted at most, per process; past it new events are dropped
    /// (and counted) until the receiver catches up.
    pub queue: usize,
    /// Events in one request at most.
    pub batch: usize,
    /// How long the first event of a batch waits for others, unless a whole batch waits.
    #[serde(deserialize_with = "duration")]
    pub linger: Duration,
    /// Deadline of one request.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Requests made for one batch at most (the first and its retries); a batch the
    /// receiver has not taken by then is dropped (and counted).
    pub attempts: u32,
    /// The wait before the first retry; each further one waits twice as long (at most 5
    /// minutes).
    #[serde(deserialize_with = "duration")]
    pub backoff: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            events: ReceiptKind::ALL.to_vec(),
            queue: 100_000,
            batch: 1000,
            linger: Duration::from_millis(250),
            timeout: Duration::from_secs(10),
            attempts: 8,
            backoff: Duration::from_secs(1),
        }
    }
}

/// What a device did with a message.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// Handed to the device's connection.
    Delivered,
    /// Acknowledged by the device.
    Acked,
    /// Reported opened by the device's user.
    Opened,
}

impl ReceiptKind {
    /// Every kind.
    pub const ALL: [ReceiptKind; 3] = [Self::Delivered, Self::Acked, Self::Opened];
}

/// At most `marketing` marketing pushes per user in each `window` (fixed windows, counted
/// from the Unix epoch): a user over it is skipped, and counted.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    /// Marketing pushes per user per window.
    pub marketing: u32,
    /// The window.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
}

/// An app's rate limits: for all its pushes together (`total`) and per traffic class. A
/// push must find room in every limit that applies to it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Every push of the app, whatever its class.
    #[serde(default)]
    pub total: Option<Rate>,
    /// Pushes of class `realtime`.
    #[serde(default)]
    pub realtime: Option<Rate>,
    /// Pushes of class `notification`.
    #[serde(default)]
    pub notification: Option<Rate>,
    /// Pushes of class `marketing`.
    #[serde(default)]
    pub marketing: Option<Rate>,
}

/// One rate limit: requests and targets per second, each with a burst of `burst` seconds'
/// worth. Unset rates are not limited.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Push requests per second.
    #[serde(default)]
    pub pushes_per_second: Option<f64>,
    /// Targets per second: the uids, tokens and aliases a push names, or the devices a push
    /// to `all` or to tags was handed to (counted once it was).
    #[serde(default)]
    pub targets_per_second: Option<f64>,
    /// How many seconds' worth of each rate may be used at once, after a quiet spell.
    #[serde(default = "one_second")]
    pub burst_seconds: f64,
}

fn one_second() -> f64 {
    1.0
}

impl AppSettings {
    /// An app with one API key and one secret.
    pub fn new(
        id: impl Into<String>,
        api_key: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            api_key: api_key.into(),
            previous_api_key: None,
            secret: secret.into(),
            kid: None,
            previous_secret: None,
            previous_kid: None,
            rate_limits: RateLimits::default(),
            frequency_cap: None,
            webhook: None,
        }
    }

    /// The API keys a push may present: the current one, and the previous one during a
    /// rotation.
    pub fn api_keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.api_key.as_str()).chain(self.previous_api_key.as_deref())
    }

    /// The key credentials are signed with now.
    pub fn signing_key(&self) -> Key<'_> {
        Key {
            secret: self.secret.as_bytes(),
            kid: self.kid.as_deref(),
        }
    }

    /// The keys a credential may be signed with.
    pub fn keys(&self) -> AppKeys<'_> {
        AppKeys {
            current: self.signing_key(),
            previous: self.previous_secret.as_deref().map(|secret| Key {
                secret: secret.as_bytes(),
                kid: self.previous_kid.as_deref(),
            }),
        }
    }
}

impl fmt::Debug for AppSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSettings")
            .field("id", &self.id)
            .field("api_key", &"<redacted>")
            .field("secret", &"<redacted>")
            .field("kid", &self.kid)
            .field("rotating", &self.previous_secret.is_some())
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: Listen::default(),
            data_dir: PathBuf::from("pigeon-data"),
            limits: Limits::default(),
            apps: Vec::new(),
            log: "info".into(),
            metrics_token: Secret::default(),
            tls: None,
            cluster: ClusterSettings::default(),
            tracing: TracingSettings::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            websocket: SocketAddr::from(([127, 0, 0, 1], 7700)),
            http: SocketAddr::from(([127, 0, 0, 1], 7800)),
            quic: None,
            grpc: SocketAddr::from(([127, 0, 0, 1], 7900)),
            backlog: 0,
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            redis: vec!["redis://127.0.0.1:6379".into()],
            redis_cluster: false,
            key_prefix: "pigeon".into(),
            node_id: String::new(),
            advertise: String::new(),
            lease: Duration::from_secs(10),
            redis_timeout: Duration::from_secs(1),
            deliver_timeout: Duration::from_secs(2),
            deliver_batch: 500,
            secret: Secret::default(),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            registry_cache: 100_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 4096,
            max_audience: 1000,
            max_tags_per_device: 100,
            max_tag_batch: 1000,
            max_devices_per_alias: 10,
            max_device_frame_bytes: 4096,
            max_connections: 19_000,
            max_handshakes: 1024,
            max_connections_per_ip: 0,
            connects_per_ip_per_second: 0,
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            park_after: Duration::ZERO,
            ack_window: 32,
            outbound_queue: 64,
            max_stored_per_device: 1000,
            max_stored_per_stream: 10_000,
            default_ttl: Duration::from_secs(7 * 24 * 3600),
            max_ttl: Duration::from_secs(28 * 24 * 3600),
            max_marketing_ttl: Duration::from_secs(3 * 24 * 3600),
            max_send_ahead: Duration::from_secs(30 * 24 * 3600),
            message_retention: Duration::from_secs(7 * 24 * 3600),
            stats_retention: Duration::from_secs(30 * 24 * 3600),
            device_inactivity: Duration::from_secs(90 * 24 * 3600),
            idempotency_window: Duration::from_secs(24 * 3600),
            push_concurrency: 64,
            push_concurrency_per_app: 16,
            push_queue: 4096,
            push_queue_timeout: Duration::from_secs(5),
            refusal_delay: Duration::from_secs(1),
            credential_ttl: Duration::from_secs(3600),
            max_credential_lifetime: Duration::from_secs(7 * 24 * 3600),
            store_queue: 16_384,
            drain_timeout: Duration::from_secs(10),
            max_http_connections: 512,
            max_grpc_connections: 512,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            connection_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong type or an unknown name.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted path of the key, e.g. `limits.max_payload_bytes`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Settings {
    /// Reads `path` (when given), applies the `PIGEON_*` variables of `env`, and validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|error| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: error.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                apply_override(&mut root, path, &value)?;
            }
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|error| ConfigError::Key {
                key: error.path().to_string(),
                message: error.into_inner().to_string(),
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Reads the config from `path` and this process's environment.
    pub fn from_process(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        Self::load(path, std::env::vars())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        let limits = &self.limits;
        if limits.max_payload_bytes == 0 {
            return bad("limits.max_payload_bytes", "must be at least 1");
        }
        if limits.max_audience == 0 {
            return bad("limits.max_audience", "must be at least 1");
        }
        for (key, value) in [
            ("limits.max_tags_per_device", limits.max_tags_per_device),
            ("limits.max_tag_batch", limits.max_tag_batch),
            ("limits.max_devices_per_alias", limits.max_devices_per_alias),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if limits.max_device_frame_bytes < 512 {
            return bad("limits.max_device_frame_bytes", "must be at least 512");
        }
        if limits.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1");
        }
        if limits.max_handshakes == 0 {
            return bad("limits.max_handshakes", "must be at least 1");
        }
        if limits.ack_window == 0 {
            return bad("limits.ack_window", "must be at least 1");
        }
        if limits.outbound_queue == 0 {
            return bad("limits.outbound_queue", "must be at least 1");
        }
        if limits.store_queue == 0 {
            return bad("limits.store_queue", "must be at least 1");
        }
        if limits.push_concurrency == 0
            || limits.push_concurrency_per_app == 0
            || limits.push_queue == 0
        {
            return bad(
                "limits.push_concurrency",
                "limits.push_concurrency and limits.push_queue must be at least 1",
            );
        }
        if limits.max_stored_per_device == 0 {
            return bad("limits.max_stored_per_device", "must be at least 1");
        }
        if limits.max_stored_per_stream == 0 {
            return bad("limits.max_stored_per_stream", "must be at least 1");
        }
        if limits.heartbeat_interval.is_zero() {
            return bad("limits.heartbeat_interval", "must be longer than 0");
        }
        if limits.idle_timeout <= limits.heartbeat_interval {
            return bad(
                "limits.idle_timeout",
                "must be longer than limits.heartbeat_interval",
            );
        }
        if limits.handshake_timeout.is_zero() {
            return bad("limits.handshake_timeout", "must be longer than 0");
        }
        for (key, value) in [
            ("limits.max_http_connections", limits.max_http_connections),
            ("limits.max_grpc_connections", limits.max_grpc_connections),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        for (key, value) in [
            ("limits.http_header_timeout", limits.http_header_timeout),
            ("limits.http_body_timeout", limits.http_body_timeout),
            (
                "limits.connection_idle_timeout",
                limits.connection_idle_timeout,
            ),
        ] {
            if value.is_zero() {
                return bad(key, "must be longer than 0");
            }
        }
        if limits.credential_ttl > limits.max_credential_lifetime {
            return bad(
                "limits.credential_ttl",
                "must not exceed limits.max_credential_lifetime",
            );
        }
        if limits.default_ttl > limits.max_ttl {
            return bad("limits.default_ttl", "must not exceed limits.max_ttl");
        }
        if self.listen.quic.is_some() && self.tls.is_none() {
            return bad(
                "listen.quic",
                "QUIC needs a certificate: set tls.cert and tls.key",
            );
        }
        let token = self.metrics_token.expose();
        if !token.is_empty() && (token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic())) {
            return bad(
                "metrics_token",
                "must be at least 16 printable ASCII characters, no spaces",
            );
        }
        let endpoint = &self.tracing.otlp_endpoint;
        if !endpoint.is_empty()
            && !matches!(
                reqwest::Url::parse(endpoint)
                    .map(|url| url.scheme().to_owned())
                    .as_deref(),
                Ok("http" | "https")
            )
        {
            return bad(
                "tracing.otlp_endpoint",
                "must be an http:// or https:// URL",
            );
        }
        let cluster = &self.cluster;
        if cluster.redis.is_empty() {
            return bad("cluster.redis", "name at least one Redis URL");
        }
        if cluster.lease < Duration::from_secs(1) {
            return bad("cluster.lease", "must be at least 1s");
        }
        if cluster.redis_timeout.is_zero() || cluster.deliver_timeout.is_zero() {
            return bad(
                "cluster.redis_timeout",
                "cluster.redis_timeout and cluster.deliver_timeout must be longer than 0",
            );
        }
        let secret = cluster.secret.expose();
        if !secret.is_empty()
            && (secret.len() < 32 || !secret.bytes().all(|byte| byte.is_ascii_graphic()))
        {
            return bad(
                "cluster.secret",
                "must be at least 32 printable ASCII characters, no spaces",
            );
        }
        if cluster.deliver_batch == 0 {
            return bad("cluster.deliver_batch", "must be at least 1");
        }
        if cluster.breaker_failures == 0 {
            return bad("cluster.breaker_failures", "must be at least 1");
        }
        if cluster
            .key_prefix
            .contains(|c: char| c == '{' || c == '}' || c.is_whitespace())
        {
            return bad("cluster.key_prefix", "must not contain braces or spaces");
        }
        let mut ids = HashSet::new();
        let mut api_keys = HashSet::new();
        for (index, app) in self.apps.iter().enumerate() {
            let key = |field: &str| format!("apps[{index}].{field}");
            if app.id.is_empty()
                || !app
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return bad(
                    &key("id"),
                    "must be non-empty ASCII letters, digits, - or _",
                );
            }
            if !ids.insert(app.id.as_str()) {
                return bad(&key("id"), "is used by another app");
            }
            if app.api_key.len() < 16 {
                return bad(&key("api_key"), "must be at least 16 characters");
            }
            if app.previous_api_key.as_ref().is_some_and(|k| k.len() < 16) {
                return bad(&key("previous_api_key"), "must be at least 16 characters");
            }
            // A key names its app: two apps with one key would push as whichever matched.
            for (field, api_key) in [
                ("api_key", Some(&app.api_key)),
                ("previous_api_key", app.previous_api_key.as_ref()),
            ] {
                if let Some(api_key) = api_key
                    && !api_keys.insert(api_key.as_str())
                {
                    return bad(&key(field), "is used by another app, or twice by this one");
                }
            }
            if app.secret.len() < 32 {
                return bad(&key("secret"), "must be at least 32 characters");
            }
            if let Some(cap) = &app.frequency_cap
                && (cap.marketing == 0 || cap.window < Duration::from_secs(1))
            {
                return bad(
                    &key("frequency_cap"),
                    "marketing must be at least 1 and window at least 1s",
                );
            }
            if let Some(webhook) = &app.webhook {
                let field = |name: &str| key(&format!("webhook.{name}"));
                let scheme = reqwest::Url::parse(&webhook.url).map(|url| url.scheme().to_owned());
                if !matches!(scheme.as_deref(), Ok("http" | "https")) {
                    return bad(&field("url"), "must be an http:// or https:// URL");
                }
                for (name, value) in [
                    ("queue", webhook.queue),
                    ("batch", webhook.batch),
                    ("attempts", webhook.attempts as usize),
                ] {
                    if value == 0 {
                        return bad(&field(name), "must be at least 1");
                    }
                }
                if webhook.timeout.is_zero() {
                    return bad(&field("timeout"), "must be longer than 0");
                }
            }
            let limits = &app.rate_limits;
            for (class, rate) in [
                ("total", &limits.total),
                ("realtime", &limits.realtime),
                ("notification", &limits.notification),
                ("marketing", &limits.marketing),
            ] {
                let Some(rate) = rate else { continue };
                let field = |name: &str| key(&format!("rate_limits.{class}.{name}"));
                for (name, value) in [
                    ("pushes_per_second", rate.pushes_per_second),
                    ("targets_per_second", rate.targets_per_second),
                ] {
                    if value.is_some_and(|value| !(value.is_finite() && value > 0.0)) {
                        return bad(&field(name), "must be a number above 0");
                    }
                }
                if !(rate.burst_seconds.is_finite()
                    && (0.001..=3600.0).contains(&rate.burst_seconds))
                {
                    return bad(&field("burst_seconds"), "must be from 0.001 to 3600");
                }
            }
            if app
                .previous_secret
                .as_ref()
                .is_some_and(|secret| secret.len() < 32)
            {
                return bad(&key("previous_secret"), "must be at least 32 characters");
            }
            if app.previous_kid.is_some() && app.previous_secret.is_none() {
                return bad(
                    &key("previous_kid"),
                    "names the key id of previous_secret, which is not set",
                );
            }
            for (field, kid) in [("kid", &app.kid), ("previous_kid", &app.previous_kid)] {
                if kid
                    .as_ref()
                    .is_some_and(|kid| kid.is_empty() || kid.len() > 64)
                {
                    return bad(&key(field), "must be 1 to 64 characters");
                }
            }
            if app.kid.is_some() && app.kid == app.previous_kid {
                return bad(&key("previous_kid"), "must differ from kid");
            }
        }
        Ok(())
    }

    /// The app with this id.
    pub fn app(&self, id: &str) -> Option<&AppSettings> {
        self.apps.iter().find(|app| app.id == id)
    }
}

/// Sets one key from a `PIGEON_A__B__C` variable (given without the prefix).
fn apply_override(root: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let env_key = format!("{ENV_PREFIX}{path}");
    let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return Err(ConfigError::Key {
            key: env_key,
            message: "empty key segment".into(),
        });
    }
    let mut tree = toml::Value::Table(std::mem::take(root));
    let result = set_path(&mut tree, &parts, parse_env_value(raw), &env_key);
    if let toml::Value::Table(table) = tree {
        *root = table;
    }
    result
}

fn set_path(
    node: &mut toml::Value,
    parts: &[String],
    value: toml::Value,
    env_key: &str,
) -> Result<(), ConfigError> {
    let Some((first, rest)) = parts.split_first() else {
        *node = value;
        return Ok(());
    };
    let child = match node {
        toml::Value::Table(table) => table
            .entry(first.clone())
            .or_insert_with(|| table_or_array(first)),
        toml::Value::Array(array) => array_slot(array, first, env_key)?,
        _ => {
            return Err(ConfigError::Key {
                key: env_key.to_owned(),
                message: format!("`{first}` is inside a value that is not a table"),
            });
        }
    };
    set_path(child, rest, value, env_key)
}

fn table_or_array(key: &str) -> toml::Value {
    if key == "apps" {
        toml::Value::Array(Vec::new())
    } else {
        toml::Value::Table(toml::Table::new())
    }
}

/// The element `index` of an array of tables, created (with the ones before it) if missing.
fn array_slot<'a>(
    array: &'a mut Vec<toml::Value>,
    index: &str,
    env_key: &str,
) -> Result<&'a mut toml::Value, ConfigError> {
    let index: usize = index.parse().map_err(|_| ConfigError::Key {
        key: env_key.to_owned(),
        message: format!("`{index}` is not an array index"),
    })?;
    if index > 1000 {
        return Err(ConfigError::Key {
            key: env_key.to_owned(),
            message: "array index too large".into(),
        });
    }
    while array.len() <= index {
        array.push(toml::Value::Table(toml::Table::new()));
    }
    Ok(&mut array[index])
}

/// A variable's value as TOML (numbers, booleans, arrays) when it parses as such, else a
/// string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("value = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// Reads a duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"` or `"7d"`, or as a bare
/// number of seconds.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like \"30s\" or \"500ms\""))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "s" | "" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h or d)"
            ));
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }

    #[test]
    fn defaults_need_no_file() {
        let settings = Settings::load(None, env(&[])).expect("defaults are valid");
        assert_eq!(settings.limits.max_payload_bytes, 4096);
        assert_eq!(settings.listen.websocket.port(), 7700);
    }

    #[test]
    fn file_and_env_override() {
        let config = file(
            r#"
            data_dir = "/tmp/x"
            [limits]
            max_payload_bytes = 100
            heartbeat_interval = "2s"
            [[apps]]
            id = "demo"
            api_key = "0123456789abcdef"
            secret = "0123456789abcdef0123456789abcdef"
            "#,
        );
        let settings = Settings::load(
            Some(config.path()),
            env(&[
                ("PIGEON_LIMITS__MAX_PAYLOAD_BYTES", "8192"),
                ("PIGEON_APPS__0__API_KEY", "fedcba9876543210x"),
                ("PIGEON_LISTEN__HTTP", "127.0.0.1:0"),
                ("UNRELATED", "1"),
            ]),
        )
        .expect("valid");
        assert_eq!(settings.limits.max_payload_bytes, 8192);
        assert_eq!(settings.limits.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(settings.apps[0].api_key, "fedcba9876543210x");
        assert_eq!(settings.listen.http.port(), 0);
    }

    #[test]
    fn bad_keys_are_named() {
        let config = file("[limits]\nmax_payload_bytes = \"lots\"\n");
        let error = Settings::load(Some(config.path()), env(&[])).expect_err("bad type");
        assert!(
            error.to_string().contains("limits.max_payload_bytes"),
            "{error}"
        );

        let config = file("[limits]\nmax_paylod_bytes = 1\n");
        let error = Settings::load(Some(config.path()), env(&[])).expect_err("unknown key");
        assert!(error.to_string().contains("max_paylod_bytes"), "{error}");

        let error = Settings::load(None, env(&[("PIGEON_LIMITS__IDLE_TIMEOUT", "1s")]))
            .expect_err("idle below heartbeat");
        assert!(error.to_string().contains("limits.idle_timeout"), "{error}");

        let error =
            Settings::load(None, env(&[("PIGEON_APPS__0__ID", "x")])).expect_err("app without key");
        assert!(error.to_string().contains("apps[0]"), "{error}");
    }

    #[test]
    fn two_apps_may_not_share_an_id_or_an_api_key() {
        let app = |index: usize, id: &str, key: &str| {
            [
                (format!("PIGEON_APPS__{index}__ID"), id.to_owned()),
                (format!("PIGEON_APPS__{index}__API_KEY"), key.to_owned()),
                (format!("PIGEON_APPS__{index}__SECRET"), "s".repeat(32)),
            ]
        };
        let load = |apps: Vec<[(String, String); 3]>| {
            Settings::load(None, apps.into_iter().flatten()).map(|settings| settings.apps.len())
        };
        assert_eq!(
            load(vec![
                app(0, "one", "key-one-0123456789"),
                app(1, "two", "key-two-0123456789")
            ])
            .ok(),
            Some(2)
        );
        let error = load(vec![
            app(0, "one", "shared-key-0123456789"),
            app(1, "two", "shared-key-0123456789"),
        ])
        .expect_err("shared key");
        assert!(error.to_string().contains("apps[1].api_key"), "{error}");
        let error = load(vec![
            app(0, "one", "key-one-0123456789"),
            app(1, "one", "key-two-0123456789"),
        ])
        .expect_err("shared id");
        assert!(error.to_string().contains("apps[1].id"), "{error}");
    }

    /// The settings of one app `one` and `extra` variables.
    fn with_app(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut vars = vec![
            ("PIGEON_APPS__0__ID", "one"),
            ("PIGEON_APPS__0__API_KEY", "key-one-0123456789"),
            (
                "PIGEON_APPS__0__SECRET",
                "s-0123456789-0123456789-0123456789",
            ),
        ];
        vars.extend_from_slice(extra);
        Settings::load(None, env(&vars))
    }

    #[test]
    fn rate_limits_are_read_and_checked() {
        let with = with_app;
        let settings = with(&[
            (
                "PIGEON_APPS__0__RATE_LIMITS__MARKETING__PUSHES_PER_SECOND",
                "2.5",
            ),
            (
                "PIGEON_APPS__0__RATE_LIMITS__TOTAL__TARGETS_PER_SECOND",
                "1000",
            ),
        ])
        .expect("limits");
        let limits = &settings.apps[0].rate_limits;
        assert_eq!(
            limits.marketing,
            Some(Rate {
                pushes_per_second: Some(2.5),
                targets_per_second: None,
                burst_seconds: 1.0,
            })
        );
        assert_eq!(
            limits.total.and_then(|rate| rate.targets_per_second),
            Some(1000.0)
        );
        assert_eq!(limits.notification, None);
        for (key, value, named) in [
            (
                "PIGEON_APPS__0__RATE_LIMITS__MARKETING__PUSHES_PER_SECOND",
                "0",
                "apps[0].rate_limits.marketing.pushes_per_second",
            ),
            (
                "PIGEON_APPS__0__RATE_LIMITS__TOTAL__BURST_SECONDS",
                "0",
                "apps[0].rate_limits.total.burst_seconds",
            ),
            (
                "PIGEON_APPS__0__RATE_LIMITS__BULK__PUSHES_PER_SECOND",
                "1",
                "bulk",
            ),
        ] {
            let error = with(&[(key, value)]).expect_err(key);
            assert!(error.to_string().contains(named), "{key}: {error}");
        }
        let capped = with(&[
            ("PIGEON_APPS__0__FREQUENCY_CAP__MARKETING", "3"),
            ("PIGEON_APPS__0__FREQUENCY_CAP__WINDOW", "24h"),
        ])
        .expect("a cap");
        assert_eq!(
            capped.apps[0].frequency_cap,
            Some(FrequencyCap {
                marketing: 3,
                window: Duration::from_secs(24 * 3600),
            })
        );
        let error = with(&[
            ("PIGEON_APPS__0__FREQUENCY_CAP__MARKETING", "0"),
            ("PIGEON_APPS__0__FREQUENCY_CAP__WINDOW", "24h"),
        ])
        .expect_err("a cap of 0");
        assert!(
            error.to_string().contains("apps[0].frequency_cap"),
            "{error}"
        );
    }

    #[test]
    fn webhooks_are_read_and_checked() {
        let with = with_app;
        let settings = with(&[
            ("PIGEON_APPS__0__WEBHOOK__URL", "https://example.com/pigeon"),
            ("PIGEON_APPS__0__WEBHOOK__EVENTS", "[\"acked\", \"opened\"]"),
        ])
        .expect("a webhook");
        let webhook = settings.apps[0].webhook.clone().expect("webhook");
        assert_eq!(webhook.events, [ReceiptKind::Acked, ReceiptKind::Opened]);
        assert_eq!(webhook.queue, WebhookSettings::default().queue);
        for (key, value, named) in [
            (
                "PIGEON_APPS__0__WEBHOOK__URL",
                "ftp://example.com",
                "apps[0].webhook.url",
            ),
            (
                "PIGEON_APPS__0__WEBHOOK__URL",
                "not a url",
                "apps[0].webhook.url",
            ),
            (
                "PIGEON_APPS__0__WEBHOOK__QUEUE",
                "0",
                "apps[0].webhook.queue",
            ),
            (
                "PIGEON_APPS__0__WEBHOOK__ATTEMPTS",
                "0",
                "apps[0].webhook.attempts",
            ),
            (
                "PIGEON_APPS__0__WEBHOOK__EVENTS",
                "[\"bounced\"]",
                "apps[0].webhook.events",
            ),
        ] {
            let mut extra = vec![("PIGEON_APPS__0__WEBHOOK__URL", "http://127.0.0.1:9/")];
            extra.push((key, value));
            let error = with(&extra).expect_err(key);
            assert!(error.to_string().contains(named), "{key}: {error}");
        }
    }

    #[test]
    fn the_example_config_is_valid_and_shows_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pigeon.toml");
        let settings = Settings::load(Some(&path), env(&[])).expect("deploy/pigeon.toml");
        let defaults = Settings::default();
        assert_eq!(
            format!("{:?}", settings.limits),
            format!("{:?}", defaults.limits)
        );
        assert_eq!(settings.listen.websocket, defaults.listen.websocket);
        assert_eq!(settings.listen.http, defaults.listen.http);
        assert_eq!(settings.listen.grpc, defaults.listen.grpc);
        assert_eq!(
            format!("{:?}", settings.cluster),
            format!("{:?}", defaults.cluster)
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }
}
