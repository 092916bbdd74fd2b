//! Starts real `pigeon` processes for integration tests and talks to them over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pigeon_client::{ClientError, ConnectOptions, Connection, DeviceState};
use pigeon_proto::device::Push;
use pigeon_server::config::AppSettings;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub mod cluster;

/// A credential for `uid` of `app`, valid for ten minutes from now.
pub fn mint(app: &AppSettings, uid: &str) -> String {
    let now = pigeon_server::message::unix_millis() / 1000;
    pigeon_proto::credential::mint(&app.id, app.signing_key(), uid, now, 600)
}

/// Calls an HTTP API at `base_url` with `api_key`: the status and the JSON answer (null when
/// there is none).
pub async fn call(
    base_url: &str,
    api_key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new()
        .request(method, format!("{base_url}{path}"))
        .bearer_auth(api_key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("request timed out")
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// How devices reach a test server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket over plain TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// QUIC.
    Quic,
}

/// A `pigeon standalone` process on ephemeral ports.
pub struct Server {
    child: Child,
    pub transport: Transport,
    /// The WebSocket URL (wss:// when the server has a certificate).
    pub ws_url: String,
    /// The QUIC URL, when the server listens for QUIC.
    pub quic_url: Option<String>,
    /// The development CA that signed the server's certificate, when it has one.
    pub ca: Option<PathBuf>,
    pub http_url: String,
    pub api_key: String,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts a plaintext (ws) server on `data_dir` with extra `PIGEON_*` settings.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_over(Transport::Ws, data_dir, env)
    }

    /// Starts a plaintext server whose demo app (the one in `data_dir`) has more settings:
    /// `PIGEON_APPS__0__` variables without the prefix (`RATE_LIMITS__TOTAL__BURST_SECONDS`,
    /// `WEBHOOK__URL`, ...).
    pub fn start_with_app(data_dir: &Path, settings: &[(&str, &str)]) -> Self {
        let app = pigeon_server::standalone::demo_app(data_dir).expect("demo app");
        let mut env: Vec<(String, String)> = vec![
            ("PIGEON_APPS__0__ID".into(), app.id.clone()),
            ("PIGEON_APPS__0__API_KEY".into(), app.api_key.clone()),
            ("PIGEON_APPS__0__SECRET".into(), app.secret.clone()),
        ];
        for (key, value) in settings {
            env.push((format!("PIGEON_APPS__0__{key}"), (*value).to_owned()));
        }
        Self::spawn(Transport::Ws, data_dir, env)
    }

    /// Starts a server whose devices connect over `transport`. For wss and QUIC it gets a
    /// development certificate (written under `data_dir`) and listens for both.
    pub fn start_over(transport: Transport, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if transport != Transport::Ws {
            let files = pigeon_server::tls::write_dev_certificate(&data_dir.join("certs"))
                .expect("development certificate");
            env.push(("PIGEON_TLS__CERT".into(), files.cert.display().to_string()));
            env.push(("PIGEON_TLS__KEY".into(), files.key.display().to_string()));
            env.push(("PIGEON_LISTEN__QUIC".into(), "127.0.0.1:0".into()));
        }
        Self::spawn(transport, data_dir, env)
    }

    fn spawn(transport: Transport, data_dir: &Path, env: Vec<(String, String)>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pigeon"));
        command
            .arg("standalone")
            .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
            .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0")
            .env("PIGEON_DATA_DIR", data_dir)
            .env("PIGEON_LOG", "warn")
            // Every idle connection leaves its task at once: the suite runs through the
            // parking lot (a push, a frame or a timer brings each connection back).
            .env("PIGEON_LIMITS__PARK_AFTER", "0s")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in &env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn pigeon");
        let received = stdout_lines(&mut child);
        let (mut ws_url, mut http_url, mut api_key, mut quic_url) = (None, None, None, None);
        let wants_quic = transport != Transport::Ws;
        while ws_url.is_none()
            || http_url.is_none()
            || api_key.is_none()
            || (wants_quic && quic_url.is_none())
        {
            let line = received
                .recv_timeout(WAIT)
                .expect("pigeon did not print its addresses in time");
            let url = |scheme: &str| {
                line.split_whitespace()
                    .find(|word| word.starts_with(scheme))
                    .map(str::to_owned)
            };
            ws_url = ws_url.or(url("ws://")).or(url("wss://"));
            quic_url = quic_url.or(url("quic://"));
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                http_url = Some(url.trim_end_matches("/v1/push").to_owned());
            }
            if let Some(key) = line.split("api key ").nth(1) {
                api_key = Some(key.trim().to_owned());
            }
        }
        let ca = wants_quic.then(|| data_dir.join("certs").join("ca.pem"));
        Self {
            child,
            transport,
            ws_url: ws_url.expect("ws url"),
            quic_url,
            ca,
            http_url: http_url.expect("http url"),
            api_key: api_key.expect("api key"),
            data_dir: data_dir.to_owned(),
            env,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL devices of this server's transport connect to.
    pub fn device_url(&self) -> String {
        match self.transport {
            Transport::Ws | Transport::Wss => self.ws_url.clone(),
            Transport::Quic => self.quic_url.clone().expect("a QUIC listener"),
        }
    }

    /// Connect options that trust this server's certificate.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            ca_file: self.ca.clone(),
            ..ConnectOptions::default()
        }
    }

    /// The demo app, as the server created it.
    pub fn app(&self) -> AppSettings {
        pigeon_server::standalone::demo_app(&self.data_dir).expect("demo app")
    }

    /// A fresh credential for `uid`.
    pub fn credential(&self, uid: &str) -> String {
        mint(&self.app(), uid)
    }

    /// Calls the HTTP API with the demo app's key: the status and the JSON answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.http_url, &self.api_key, method, path, body).await
    }

    /// POSTs a push with the demo app's key.
    pub async fn push(&self, body: Value) -> (u16, Value) {
        self.push_with_key(Some(&self.api_key), body.to_string())
            .await
    }

    /// POSTs a raw body with an optional key.
    pub async fn push_with_key(&self, key: Option<&str>, body: String) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut request = client
            .post(format!("{}/v1/push", self.http_url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("push timed out")
            .expect("push request");
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Pushes `payload` to `uid` with a TTL of a minute; asserts 202.
    pub async fn push_to(&self, uid: &str, payload: Value) -> Value {
        let (status, body) = self
            .push(json!({"audience": {"uids": [uid]}, "payload": payload, "ttl": 60}))
            .await;
        assert_eq!(status, 202, "push failed: {body}");
        body
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        terminate(&mut self.child)
    }

    /// Starts a new process on the same data directory and settings.
    pub fn restart(&mut self) {
        self.kill();
        let data_dir = self.data_dir.clone();
        let env = std::mem::take(&mut self.env);
        *self = Self::spawn(self.transport, &data_dir, env);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM to `child`, and waits for it to exit; whether it exited cleanly.
pub fn terminate(child: &mut Child) -> bool {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().map(|status| status.success()).unwrap_or(false)
}

/// The lines a child prints on stdout, read on a thread.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = mpsc::sync_channel(256);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    received
}

/// Connects as a device of `uid` with `state`.
pub async fn connect(server: &Server, uid: &str, state: &DeviceState) -> Connection {
    let url = server.device_url();
    Connection::connect_with(&url, &server.credential(uid), state, &server.options())
        .await
        .expect("connect")
}

/// Registers a device of `uid` and leaves it offline: the state to reconnect it with.
pub async fn offline_device(server: &Server, uid: &str) -> DeviceState {
    let device = connect(server, uid, &DeviceState::default()).await;
    let state = DeviceState {
        device_token: device.welcome().device_token.clone(),
        ..DeviceState::default()
    };
    drop(device);
    // Let the server see it leave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    state
}

/// The next push, or a failure after [`WAIT`].
pub async fn next_push(connection: &mut Connection) -> Push {
    tokio::time::timeout(WAIT, connection.next_push())
        .await
        .expect("no push in time")
        .expect("connection failed")
}

/// Asserts that no push arrives within `quiet`.
pub async fn assert_no_push(connection: &mut Connection, quiet: Duration) {
    if let Ok(result) = tokio::time::timeout(quiet, connection.next_push()).await {
        panic!("expected no push, got {result:?}");
    }
}

/// The error that ended a connection (a close from the node, usually).
pub async fn closed(connection: &mut Connection) -> ClientError {
    loop {
        match tokio::time::timeout(WAIT, connection.next_push()).await {
            Err(_) => panic!("connection not closed in time"),
            Ok(Ok(_)) => continue,
            Ok(Err(error)) => return error,
        }
    }
}

/// The payload of a push, as JSON.
pub fn payload(push: &Push) -> Value {
    serde_json::from_slice(&push.payload).expect("payload is JSON")
}

/// A raw WebSocket to the server, for sending what a well-behaved client never would.
pub async fn raw_websocket(
    server: &Server,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (stream, _) = tokio_tungstenite::connect_async(server.ws_url.as_str())
        .await
        .expect("raw websocket");
    stream
}

/// Sends one message on a raw WebSocket and returns the close code the server answers with.
pub async fn close_code_after<S>(stream: &mut S, message: Option<Message>) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    if let Some(message) = message {
        let _ = stream.send(message).await;
    }
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Err(_) => panic!("server did not close in time"),
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The value of the metric `name` on the server's `/metrics`.
pub async fn metric(server: &Server, name: &str) -> Option<u64> {
    metric_at(&format!("{}/metrics", server.http_url), name).await
}

/// The value of the metric `name` at `url` (a process's `/metrics`).
pub async fn metric_at(url: &str, name: &str) -> Option<u64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until the metric `name` reads `value`.
pub async fn await_metric(server: &Server, name: &str, value: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let read = metric(server, name).await;
        if read == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {read:?}, never {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
