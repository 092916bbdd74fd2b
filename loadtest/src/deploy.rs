//! The deployment under test: started by the harness (its own `redis-server`, `pigeon node`
//! processes and a `pigeon gateway`, all on loopback), or an already running one given by
//! its URLs. Processes the harness started are killed when the [`Deployment`] is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a started process has to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running deployment.
pub struct Deployment {
    /// Device URLs (ws://, wss:// or quic://), one per node.
    pub ws_urls: Vec<String>,
    /// The push API's base URL (`http://host:port`).
    pub http_url: String,
    /// The gRPC push API's address, when known.
    pub grpc_addr: Option<String>,
    /// The app pushed to and connected as.
    pub app: AppSettings,
    /// A second app with no devices, that floods the push API (`isolation`), when the
    /// harness started the deployment.
    pub flood_app: Option<AppSettings>,
    /// Pids of the node processes (for their memory), when the harness started them.
    pub node_pids: Vec<u32>,
    /// Pid of the Redis, when the harness started it.
    pub redis_pid: Option<u32>,
    /// Port of the Redis, when the harness started it.
    pub redis_port: Option<u16>,
    /// Pid of the process serving the push API, when the harness started it.
    pub api_pid: Option<u32>,
    /// Every gateway's push API base URL and pid, when the harness started them (the
    /// first is `http_url`'s).
    pub gateways: Vec<(String, u32)>,
    /// The CA devices must trust (wss and QUIC).
    pub ca: Option<PathBuf>,
    children: Vec<Child>,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where `pigeon` is.
    pub bin_dir: PathBuf,
    /// Working directory for Redis's files and logs.
    pub work_dir: PathBuf,
    /// Node processes.
    pub nodes: usize,
    /// Redis `appendfsync`: `always` (what Pigeon's guarantee needs) or `everysec`.
    pub redis_fsync: String,
    /// How devices connect.
    pub transport: Transport,
    /// The nodes' heartbeat interval in seconds, when not their default; their idle timeout
    /// is then 2.5 heartbeats.
    pub heartbeat: Option<u64>,
    /// The gateway's `limits.max_audience` (uids and tokens per push), when not its default.
    pub max_audience: Option<usize>,
    /// Start one `pigeon standalone` (embedded store, no Redis) instead of nodes, a gateway
    /// and Redis.
    pub standalone: bool,
    /// Gateway processes (at least one).
    pub gateways: usize,
}

/// How the simulated devices reach the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS (a development certificate).
    Wss,
    /// QUIC (a development certificate).
    Quic,
}

/// The app a run pushes as and connects devices of: the `[[apps]]` entry the harness gives
/// the processes it starts, or the one a running deployment was given.
#[derive(Clone, Debug)]
pub struct AppSettings {
    /// App id.
    pub id: String,
    /// API key of the push API.
    pub api_key: String,
    /// Secret that signs device credentials.
    pub secret: String,
}

/// `bytes` random bytes, in hex.
fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// An app for the run, with random keys.
fn random_app(id: &str) -> AppSettings {
    let hex = random_hex;
    AppSettings {
        id: id.into(),
        api_key: format!("pk_{id}_{}", hex(16)),
        secret: hex(32),
    }
}

/// Declares `apps` to a process the harness starts.
/// Also lets the push API hold the connections of a flood (`isolation`) beside the
/// measured app's.
fn declare_apps(command: &mut Command, apps: &[&AppSettings]) {
    command.env("PIGEON_LIMITS__MAX_HTTP_CONNECTIONS", "4096");
    for (index, app) in apps.iter().enumerate() {
        command
            .env(format!("PIGEON_APPS__{index}__ID"), &app.id)
            .env(format!("PIGEON_APPS__{index}__API_KEY"), &app.api_key)
            .env(format!("PIGEON_APPS__{index}__SECRET"), &app.secret);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `child` prints a line containing each label; the word after each.
async fn addresses(child: &mut Child, labels: &[&str]) -> anyhow::Result<Vec<String>> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut found: Vec<Option<String>> = vec![None; labels.len()];
    let reading = async {
        while found.iter().any(Option::is_none) {
            let Some(line) = lines.next_line().await? else {
                bail!("the process exited before printing its addresses");
            };
            for (label, slot) in labels.iter().zip(found.iter_mut()) {
                if let Some(rest) = line.split(label).nth(1) {
                    *slot = rest.split_whitespace().next().map(str::to_owned);
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(START_TIMEOUT, reading)
        .await
        .context("timed out waiting for the process to start")??;
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found.into_iter().flatten().collect())
}

impl Deployment {
    /// Starts Redis, `plan.nodes` nodes and a gateway, or one standalone process.
    pub async fn start(plan: &Plan) -> anyhow::Result<Self> {
        let pigeon = plan.bin_dir.join("pigeon");
        anyhow::ensure!(
            pigeon.exists(),
            "{} not found: build it (cargo build --release --bins) or pass --bin-dir",
            pigeon.display()
        );
        if plan.standalone {
            return Self::start_standalone(plan, &pigeon).await;
        }
        let app = random_app("load");
        let flood_app = random_app("flood");
        // The nodes' internal API takes calls from the run's own gateway only.
        let cluster_secret = random_hex(32);
        let mut children = Vec::new();

        let redis_dir = plan.work_dir.join("redis");
        std::fs::create_dir_all(&redis_dir)?;
        let port = free_port()?;
        let redis = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &plan.redis_fsync])
            .args(["--dir", &redis_dir.display().to_string()])
            .args(["--logfile", "redis.log", "--maxclients", "10000"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        let redis_pid = redis.id();
        children.push(redis);
        wait_for_redis(port).await?;
        let redis_url = format!("redis://127.0.0.1:{port}");
        let certs = plan.work_dir.join("certs");
        if plan.transport != Transport::Ws {
            let status = Command::new(&pigeon)
                .args(["cert", "--dev", "--out"])
                .arg(&certs)
                .stdout(Stdio::null())
                .status()
                .await
                .context("running pigeon cert --dev")?;
            anyhow::ensure!(status.success(), "pigeon cert --dev failed");
        }

        let env = |command: &mut Command| {
            declare_apps(command, &[&app, &flood_app]);
            command
                .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
                .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0")
                .env("PIGEON_LISTEN__GRPC", "127.0.0.1:0")
                .env("PIGEON_CLUSTER__REDIS", format!("[\"{redis_url}\"]"))
                .env("PIGEON_CLUSTER__SECRET", &cluster_secret)
                .env("PIGEON_LIMITS__MAX_CONNECTIONS", "19500")
                .env("PIGEON_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if plan.transport != Transport::Ws {
                command
                    .env("PIGEON_TLS__CERT", certs.join("cert.pem"))
                    .env("PIGEON_TLS__KEY", certs.join("key.pem"));
            }
            if plan.transport == Transport::Quic {
                command.env("PIGEON_LISTEN__QUIC", "127.0.0.1:0");
            }
            if let Some(max) = plan.max_audience {
                command.env("PIGEON_LIMITS__MAX_AUDIENCE", max.to_string());
            }
            if let Some(seconds) = plan.heartbeat {
                command
                    .env("PIGEON_LIMITS__HEARTBEAT_INTERVAL", format!("{seconds}s"))
                    .env(
                        "PIGEON_LIMITS__IDLE_TIMEOUT",
                        format!("{}s", seconds * 5 / 2),
                    );
            }
        };
        let mut ws_urls = Vec::new();
        let mut node_pids = Vec::new();
        for _ in 0..plan.nodes {
            let mut command = Command::new(&pigeon);
            command.arg("node");
            env(&mut command);
            let mut child = command.spawn().context("starting pigeon node")?;
            let label = match plan.transport {
                Transport::Quic => "device quic: ",
                Transport::Ws | Transport::Wss => "device websocket: ",
            };
            let found = addresses(&mut child, &[label]).await?;
            ws_urls.push(found[0].clone());
            node_pids.extend(child.id());
            children.push(child);
        }
        let mut gateways = Vec::new();
        let mut grpc_addr = None;
        for _ in 0..plan.gateways.max(1) {
            let mut command = Command::new(&pigeon);
            command.arg("gateway");
            env(&mut command);
            command.env_remove("PIGEON_LISTEN__QUIC");
            let mut gateway = command.spawn().context("starting pigeon gateway")?;
            let found = addresses(&mut gateway, &["push api: ", "push grpc: "]).await?;
            let url = found[0].trim_end_matches("/v1/push").to_owned();
            gateways.push((url, gateway.id().unwrap_or(0)));
            grpc_addr.get_or_insert_with(|| found[1].clone());
            children.push(gateway);
        }
        Ok(Self {
            ws_urls,
            http_url: gateways[0].0.clone(),
            grpc_addr,
            app,
            flood_app: Some(flood_app),
            node_pids,
            redis_pid,
            redis_port: Some(port),
            api_pid: Some(gateways[0].1),
            gateways,
            ca: (plan.transport != Transport::Ws).then(|| certs.join("ca.pem")),
            children,
        })
    }

    /// Starts one `pigeon standalone` with its data in the run's directory. Plain
    /// WebSocket only.
    async fn start_standalone(plan: &Plan, pigeon: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            plan.transport == Transport::Ws,
            "--standalone runs with --transport ws"
        );
        let app = random_app("load");
        let flood_app = random_app("flood");
        let mut command = Command::new(pigeon);
        declare_apps(&mut command, &[&app, &flood_app]);
        command
            .arg("standalone")
            .env("PIGEON_LISTEN__WEBSOCKET", "127.0.0.1:0")
            .env("PIGEON_LISTEN__HTTP", "127.0.0.1:0")
            .env("PIGEON_DATA_DIR", plan.work_dir.join("data"))
            .env("PIGEON_LIMITS__MAX_CONNECTIONS", "19500")
            .env("PIGEON_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(max) = plan.max_audience {
            command.env("PIGEON_LIMITS__MAX_AUDIENCE", max.to_string());
        }
        if let Some(seconds) = plan.heartbeat {
            command
                .env("PIGEON_LIMITS__HEARTBEAT_INTERVAL", format!("{seconds}s"))
                .env(
                    "PIGEON_LIMITS__IDLE_TIMEOUT",
                    format!("{}s", seconds * 5 / 2),
                );
        }
        let mut child = command.spawn().context("starting pigeon standalone")?;
        let found = addresses(&mut child, &["device websocket: ", "push api: "]).await?;
        Ok(Self {
            ws_urls: vec![found[0].clone()],
            http_url: found[1].trim_end_matches("/v1/push").to_owned(),
            grpc_addr: None,
            app,
            flood_app: Some(flood_app),
            node_pids: child.id().into_iter().collect(),
            redis_pid: None,
            redis_port: None,
            api_pid: child.id(),
            gateways: Vec::new(),
            ca: None,
            children: vec![child],
        })
    }

    /// An already running deployment.
    pub fn external(
        ws_urls: Vec<String>,
        http_url: String,
        grpc_addr: Option<String>,
        app: AppSettings,
        ca: Option<PathBuf>,
    ) -> Self {
        Self {
            ws_urls,
            http_url,
            grpc_addr,
            app,
            flood_app: None,
            node_pids: Vec::new(),
            redis_pid: None,
            redis_port: None,
            api_pid: None,
            gateways: Vec::new(),
            ca,
            children: Vec::new(),
        }
    }

    /// Whether a process the harness started has exited (it should not have).
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|child| {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| format!("a deployment process exited: {status}"))
        })
    }

    /// SIGKILLs the gateway with pid `pid` (one of [`Self::gateways`]): it is gone from the
    /// deployment, not a process that exited unexpectedly.
    pub async fn kill_gateway(&mut self, pid: u32) -> anyhow::Result<()> {
        let index = self
            .children
            .iter()
            .position(|child| child.id() == Some(pid))
            .context("no such gateway")?;
        let mut child = self.children.remove(index);
        child.kill().await.context("killing a gateway")?;
        self.gateways.retain(|(_, gateway)| *gateway != pid);
        Ok(())
    }

    /// Stops everything the harness started.
    pub async fn stop(mut self) {
        // The gateway and the nodes before Redis, so that none of them complains about it.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill().await;
        }
    }
}

async fn wait_for_redis(port: u16) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let pong = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "PING"])
            .output()
            .await;
        if pong.is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "PONG") {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("redis-server did not answer on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls so far of each command of the Redis on `port` (`INFO commandstats`), the `info`
/// command itself left out.
pub async fn redis_commands(port: u16) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .await
        .context("running redis-cli")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info")
        .collect())
}

/// The kernel's TCP socket memory, bytes (`/proc/net/sockstat`, `TCP: ... mem <pages>`).
pub fn tcp_socket_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|line| line.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            let pages: u64 = words.next()?.parse().ok()?;
            return Some(pages * 4096);
        }
    }
    None
}

/// The kernel's slab memory for sockets, bytes: the `TCP`, `sock_inode_cache`,
/// `tcp_bind_bucket` and `eventpoll_epi` caches of `/proc/slabinfo` (objects in use times
/// object size). Idle sockets hold little buffer memory (`tcp_socket_memory`); this is what
/// each one costs anyway.
pub fn socket_slab_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let total = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            if !matches!(
                name,
                "TCP" | "sock_inode_cache" | "tcp_bind_bucket" | "eventpoll_epi"
            ) {
                return None;
            }
            let active: u64 = words.next()?.parse().ok()?;
            let _total_objects = words.next()?;
            let size: u64 = words.next()?.parse().ok()?;
            Some(active * size)
        })
        .sum();
    Some(total)
}

/// Resident memory of these processes together, bytes.
pub fn rss_total(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| pigeon_client::swarm::rss_of(&pid.to_string()))
        .sum()
}

/// CPU time these processes have used together (user and system), seconds; a process gone
/// counts nothing.
pub fn cpu_total(pids: &[u32]) -> f64 {
    let mut pids = pids.to_vec();
    pids.sort_unstable();
    pids.dedup();
    pids.iter()
        .filter_map(|pid| pigeon_client::swarm::cpu_seconds_of(&pid.to_string()))
        .sum()
}

/// The directory of the running executable: where `pigeon` and `pigeon-sim` are built.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}
