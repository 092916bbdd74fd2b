//! Real processes of cluster mode for tests: `redis-server` (single, or a three-master Redis
//! Cluster) on ephemeral ports in a temporary directory, `pigeon node` and `pigeon gateway`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pigeon_client::{ConnectOptions, Connection, DeviceState};
use pigeon_server::config::AppSettings;
use serde_json::{Value, json};

use super::{WAIT, stdout_lines};

/// The app every test process serves.
pub fn app() -> AppSettings {
    AppSettings::new(
        "demo",
        "pk_cluster_test_0123456789",
        "cluster-test-secret-0123456789abcdef",
    )
}

/// The secret the test's nodes and gateways share.
pub const CLUSTER_SECRET: &str = "cluster-test-shared-secret-0123456789";

/// A port nothing listens on right now (nor on `port + 10000`, a Redis Cluster bus port).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A `redis-server` of the test's own.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    /// Starts one with an append-only file fsynced at every write (so a restart keeps what
    /// it acknowledged, as a production Redis under Pigeon must be configured).
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, free_port(), Vec::new())
    }

    fn start_with(dir: &Path, port: u16, extra: Vec<String>) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        let mut redis = Self {
            child: None,
            port,
            dir: dir.to_owned(),
            extra,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(["--dir", &self.dir.display().to_string()])
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed: run the tests with scripts/test, which installs it");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        self.cli(&["PING"])
            .is_some_and(|reply| reply.trim() == "PONG")
    }

    /// Runs `redis-cli` against this server; its output, if it ran.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The URL Pigeon connects to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and directory (its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters, no replicas.
pub struct RedisCluster {
    pub masters: Vec<Redis>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled` servers and joins them with `redis-cli --cluster
    /// create`; returns once the cluster says it is ok.
    pub fn start(dir: &Path) -> Self {
        let masters: Vec<Redis> = (0..3)
            .map(|index| {
                let port = free_port();
                Redis::start_with(
                    &dir.join(format!("redis-{index}")),
                    port,
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = masters
            .iter()
            .map(|redis| format!("127.0.0.1:{}", redis.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + WAIT;
        for redis in &masters {
            while !redis
                .cli(&["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
            {
                assert!(Instant::now() < deadline, "the Redis Cluster did not form");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { masters }
    }

    /// The seed URLs, one per master.
    pub fn urls(&self) -> Vec<String> {
        self.masters.iter().map(Redis::url).collect()
    }
}

/// What every cluster process of one test shares: the Redis to use, a key prefix, the app.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub redis_urls: Vec<String>,
    pub redis_cluster: bool,
    pub prefix: String,
}

impl Deployment {
    /// A deployment over one Redis.
    pub fn single(redis: &Redis) -> Self {
        Self {
            redis_urls: vec![redis.url()],
            redis_cluster: false,
            prefix: "pigeon".into(),
        }
    }

    /// A deployment over a Redis Cluster.
    pub fn cluster(cluster: &RedisCluster) -> Self {
        Self {
            redis_urls: cluster.urls(),
            redis_cluster: true,
            prefix: "pigeon".into(),
        }
    }

    pub fn command(&self, role: &str, extra: &[(&str, &str)]) -> Command {
        let app = app();
        let mut command = Command::new(env!("CARGO_BIN_EXE_pigeon"));
        command
            .arg(role)
            .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
            .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0")
            .env("PIGEON_LISTEN__GRPC", "127.0.0.1:0")
            .env("PIGEON_APPS__0__ID", &app.id)
            .env("PIGEON_APPS__0__API_KEY", &app.api_key)
            .env("PIGEON_APPS__0__SECRET", &app.secret)
            .env("PIGEON_CLUSTER__KEY_PREFIX", &self.prefix)
            .env("PIGEON_CLUSTER__SECRET", CLUSTER_SECRET)
            .env(
                "PIGEON_CLUSTER__REDIS",
                format!(
                    "[{}]",
                    self.redis_urls
                        .iter()
                        .map(|url| format!("\"{url}\""))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
            .env(
                "PIGEON_CLUSTER__REDIS_CLUSTER",
                self.redis_cluster.to_string(),
            )
            .env("PIGEON_CLUSTER__LEASE", "2s")
            .env("PIGEON_CLUSTER__DELIVER_TIMEOUT", "500ms")
            .env("PIGEON_LIMITS__DRAIN_TIMEOUT", "5s")
            .env("PIGEON_LOG", "warn")
            .env("PIGEON_LIMITS__PARK_AFTER", "0s")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in extra {
            command.env(key, value);
        }
        command
    }
}

/// The word after `label` on the first line that has it.
fn wait_for(lines: &mpsc::Receiver<String>, labels: &[&str]) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; labels.len()];
    while found.iter().any(Option::is_none) {
        let line = lines
            .recv_timeout(WAIT)
            .expect("pigeon did not print its addresses in time");
        for (label, slot) in labels.iter().zip(found.iter_mut()) {
            if let Some(rest) = line.split(label).nth(1) {
                *slot = rest.split_whitespace().next().map(str::to_owned);
            }
        }
    }
    found.into_iter().flatten().collect()
}

/// A `pigeon node` process.
pub struct NodeProcess {
    child: Child,
    pub id: String,
    pub ws_url: String,
    pub grpc_addr: String,
    /// `http://<addr>/metrics`.
    pub metrics_url: String,
}

impl NodeProcess {
    /// Starts a node of `deployment` with extra `PIGEON_*` settings.
    pub fn start(deployment: &Deployment, extra: &[(&str, &str)]) -> Self {
        let mut child = deployment
            .command("node", extra)
            .spawn()
            .expect("spawn node");
        let lines = stdout_lines(&mut child);
        let found = wait_for(
            &lines,
            &[
                "pigeon node ",
                "device websocket: ",
                "node grpc: ",
                "metrics: ",
            ],
        );
        Self {
            child,
            id: found[0].clone(),
            ws_url: found[1].clone(),
            grpc_addr: found[2].clone(),
            metrics_url: found[3].clone(),
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP`, `CONT`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit; its exit status's success, or None after `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `pigeon gateway` process.
pub struct GatewayProcess {
    child: Child,
    pub http_url: String,
    pub grpc_addr: String,
}

impl GatewayProcess {
    /// Starts a gateway of `deployment`.
    pub fn start(deployment: &Deployment, extra: &[(&str, &str)]) -> Self {
        let mut child = deployment
            .command("gateway", extra)
            .spawn()
            .expect("spawn gateway");
        let lines = stdout_lines(&mut child);
        let found = wait_for(&lines, &["push api: ", "push grpc: "]);
        Self {
            child,
            http_url: found[0].trim_end_matches("/v1/push").to_owned(),
            grpc_addr: found[1].clone(),
        }
    }

    /// Calls the HTTP API with the test app's key: the status and the JSON answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        super::call(&self.http_url, &app().api_key, method, path, body).await
    }

    /// POSTs a push body; the status and the JSON answer.
    pub async fn push(&self, body: Value) -> (u16, Value) {
        let request = reqwest::Client::new()
            .post(format!("{}/v1/push", self.http_url))
            .bearer_auth(app().api_key)
            .json(&body)
            .send();
        let response = tokio::time::timeout(WAIT, request)
            .await
            .expect("push timed out")
            .expect("push request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Pushes `payload` to `uids` with a TTL of five minutes; asserts 202 and returns the
    /// answer.
    pub async fn push_to(&self, uids: &[&str], payload: Value) -> Value {
        let (status, body) = self
            .push(json!({"audience": {"uids": uids}, "payload": payload, "ttl": 300}))
            .await;
        assert_eq!(status, 202, "push failed: {body}");
        body
    }
}

impl GatewayProcess {
    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for the process to exit; whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        super::terminate(&mut self.child)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC request carrying the test app's API key.
pub fn with_api_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {}", app().api_key);
    request
        .metadata_mut()
        .insert("authorization", value.parse().expect("ASCII metadata"));
    request
}

/// A fresh credential for `uid`.
pub fn credential(uid: &str) -> String {
    super::mint(&app(), uid)
}

/// Connects a device of `uid` to `node` with `state`.
pub async fn connect(node: &NodeProcess, uid: &str, state: &DeviceState) -> Connection {
    tokio::time::timeout(
        WAIT,
        Connection::connect_with(
            &node.ws_url,
            &credential(uid),
            state,
            &ConnectOptions::default(),
        ),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

/// The state a device keeps after `connection` welcomed it and it processed `last_seq`.
pub fn state_of(connection: &Connection, last_seq: u64) -> DeviceState {
    DeviceState {
        device_token: connection.welcome().device_token.clone(),
        last_seq,
        ..DeviceState::default()
    }
}
