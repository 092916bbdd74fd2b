//! `pigeon-load`: Pigeon's load-test harness.
//!
//! Each scenario starts a deployment (its own `redis-server`, `pigeon node` processes and a
//! `pigeon gateway`, all on loopback) or uses a running one (`--ws-url`, `--http-url`,
//! `--app`, `--api-key`, `--secret`), starts `pigeon-sim swarm` processes holding the
//! devices, runs, checks that every device got every message with no gap, and writes
//! `result.json` and `report.html` into `--out`. Any loss makes it exit with status 1.
//!
//! - `idle`: connect N devices and hold them: connect rate, node RSS per connection, the
//!   kernel's socket memory, the simulator's bytes per device.
//! - `unicast`: pushes to random uids at a target rate (HTTP or gRPC): achieved rate,
//!   latency percentiles from send to device receipt, errors by kind.
//! - `broadcast`: one message to every connected device, pushed to the app's audience `all`
//!   (stored once), or with `--uids` to every device's uid (`--audience` uids per request):
//!   time to first and last delivery, deliveries per second; `--rounds` repeats it, and
//!   `--floor` measures the loopback floor before each round (one thread writing the same
//!   number of 64-byte messages to as many sockets) and reports Pigeon's rate as a share of
//!   it.
//! - `reconnect-storm`: N devices with K stored messages each reconnect at once: time until
//!   all are back and everything is replayed.
//! - `isolation`: the app's notifications alone, then while a second app floods the push
//!   API at three times what it carries: the app's latency in both phases, the flood's 429s.
//! - `schedule-burst`: many pushes scheduled for the same second, through several gateways,
//!   one of them SIGKILLed at that second: how long after it they arrived, none lost, none
//!   twice.
//! - `floor`: the loopback floor alone, for any number of sockets.

mod deploy;
mod fleet;
mod floor;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use pigeon_client::swarm::{Report, unix_micros};
use serde_json::json;

use deploy::{AppSettings, Deployment, Plan, Transport};
use fleet::Fleet;
use report::{Percentiles, RunResult, Sample};

/// Devices one simulator or one node process holds at most, by default (the open-file
/// limit is 20,000 per process).
const PER_PROCESS: usize = 15_000;
/// Uids per push request (the API's default `limits.max_audience`), except for a
/// broadcast to a deployment the harness started.
const AUDIENCE: usize = 1000;
/// Push requests in flight at once when pushing to every device.
const PARALLEL: usize = 8;

/// Pigeon's load-test harness.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Connect N devices and hold them.
    Idle(Common),
    /// Push to random uids at a target rate.
    Unicast {
        #[command(flatten)]
        common: Common,
        /// Pushes per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Which push API.
        #[arg(long, value_enum, default_value_t = Api::Http)]
        api: Api,
    },
    /// One push to every connected device: to the app's audience `all` (stored once), or,
    /// with `--uids`, to every device's uid (a copy per device).
    Broadcast {
        #[command(flatten)]
        common: Common,
        /// Push to the devices' uids instead of `all`.
        #[arg(long)]
        uids: bool,
        /// With `--uids`: uids per push request. Default: every device in one request when
        /// the harness starts the deployment (its gateway's `limits.max_audience` raised to
        /// match); 1,000 (the API's default limit) against a running deployment.
        #[arg(long)]
        audience: Option<usize>,
        /// Broadcasts, one after the other (each waits for the one before to arrive).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Before each round, measure the loopback floor: one thread writing a 64-byte
        /// message to each of as many sockets (read by another process).
        #[arg(long)]
        floor: bool,
        /// Push to a tag that every this-many-th device has (given through the device API
        /// once connected) instead of to `all`.
        #[arg(long, value_name = "K")]
        tag_every: Option<u32>,
        /// Spread each push to all or to the tag over this many seconds (its `pace`), and
        /// report how the arrivals spread.
        #[arg(long, value_name = "SECONDS")]
        pace: Option<u32>,
    },
    /// The loopback floor alone, for any number of sockets: one writer thread per
    /// `--per-process` sockets, each in its own process, all starting at once.
    Floor {
        /// Sockets, each written one 64-byte message.
        #[arg(long)]
        sockets: usize,
        /// Sockets per writer process (and per readers' process).
        #[arg(long, default_value_t = PER_PROCESS)]
        per_process: usize,
        /// Measurements, one after the other.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// One writer of `floor`.
    #[command(hide = true)]
    FloorWriter {
        #[arg(long)]
        sockets: usize,
        #[arg(long)]
        index: usize,
    },
    /// The floor's readers (run by `broadcast --floor` and `floor`).
    #[command(hide = true)]
    FloorReaders {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        sockets: usize,
        #[arg(long)]
        index: usize,
    },
    /// Isolation: the app's notifications at `--rate` alone, then while a second app floods
    /// the push API with marketing pushes to everyone at `--flood-factor` times what the
    /// deployment carried of them alone: the app's latency percentiles in both phases, and
    /// what became of the flood.
    Isolation {
        #[command(flatten)]
        common: Common,
        /// The measured app's pushes per second (notifications to random uids).
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Seconds of each phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// The flood, as a multiple of the flood app's pushes per second alone.
        #[arg(long, default_value_t = 3.0)]
        flood_factor: f64,
        /// The class of the flood's pushes: `marketing`, `notification`, or `realtime`
        /// (never stored).
        #[arg(long, default_value = "marketing")]
        flood_class: String,
        /// Rounds of the two phases (alone, then flooded), one after the other: each
        /// round's ratio is reported, and their median.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
    },
    /// Scheduled pushes: `--pushes` pushes to the devices' uids (taking turns), all
    /// scheduled for the same second through every gateway; with `--kill-gateway`, the first
    /// gateway is SIGKILLed `--kill-after-ms` after that second. How long after it the pushes
    /// arrived; every one arrives, none twice.
    ScheduleBurst {
        #[command(flatten)]
        common: Common,
        /// Pushes scheduled for the same second.
        #[arg(long, default_value_t = 100_000)]
        pushes: usize,
        /// Gateways to start (cluster mode), each scheduling a share of the pushes.
        #[arg(long, default_value_t = 2)]
        gateways: usize,
        /// SIGKILL the first gateway just after the pushes are due.
        #[arg(long)]
        kill_gateway: bool,
        /// Milliseconds after the due second to kill the gateway.
        #[arg(long, default_value_t = 300)]
        kill_after_ms: u64,
        /// Seconds from the start of scheduling to the due second (default: 20, and one
        /// more per 2,000 pushes); the run fails if scheduling takes longer.
        #[arg(long)]
        lead: Option<u64>,
    },
    /// N devices with K stored messages each reconnect at once.
    ReconnectStorm {
        #[command(flatten)]
        common: Common,
        /// Stored messages per device.
        #[arg(long, default_value_t = 5)]
        messages: usize,
        /// Push the messages to the audience `all` (stored once each, in the app's stream)
        /// instead of to every device's uid (a copy per device).
        #[arg(long)]
        shared: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Api {
    Http,
    Grpc,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Node processes to start (default: one per 15,000 devices).
    #[arg(long)]
    nodes: Option<usize>,
    /// Simulator processes (default: one per 15,000 devices).
    #[arg(long)]
    sims: Option<usize>,
    /// First-time connects per second, per simulator.
    #[arg(long, default_value_t = 5000)]
    connect_rate: u32,
    /// Have the devices report every this-many-th push they receive as opened (0: none).
    #[arg(long, default_value_t = 0)]
    open_every: u32,
    /// Seconds to hold the connections before measuring memory (idle).
    #[arg(long, default_value_t = 5)]
    hold: u64,
    /// Where `pigeon` and `pigeon-sim` are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for result.json, report.html and the run's files.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Redis appendfsync of the started Redis: always (Pigeon's guarantee) or everysec.
    #[arg(long, default_value = "always")]
    redis_fsync: String,
    /// How devices connect to the started nodes (wss and QUIC with a development
    /// certificate).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// The started nodes' heartbeat interval in seconds (their default: 30); they close a
    /// device silent for 2.5 heartbeats. At a million devices, a 30 s heartbeat is 33,000
    /// pings a second, more than this machine's two cores keep up with beside the rest.
    #[arg(long, value_name = "SECS")]
    heartbeat: Option<u64>,
    /// Start one `pigeon standalone` (its embedded store, no Redis) instead of nodes, a
    /// gateway and Redis.
    #[arg(long)]
    standalone: bool,
    /// The CA to trust for a running deployment's wss:// or quic:// URLs.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Use a running deployment: its device URLs (repeat for several nodes).
    #[arg(long = "ws-url")]
    ws_urls: Vec<String>,
    /// The running deployment's push API, e.g. http://127.0.0.1:7800.
    #[arg(long)]
    http_url: Option<String>,
    /// The running deployment's gRPC push API address (host:port).
    #[arg(long)]
    grpc_addr: Option<String>,
    /// The running deployment's app id.
    #[arg(long, default_value = "demo")]
    app: String,
    /// The running deployment's API key.
    #[arg(long)]
    api_key: Option<String>,
    /// The running deployment's app secret (to mint device credentials).
    #[arg(long)]
    secret: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pigeon-load: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let helper = match &cli.scenario {
        Scenario::FloorReaders {
            addr,
            sockets,
            index,
        } => Some((
            "floor-readers",
            runtime.block_on(floor::readers(*addr, *sockets, *index)),
        )),
        Scenario::FloorWriter { sockets, index } => Some((
            "floor-writer",
            runtime.block_on(floor::writer(*sockets, *index)),
        )),
        Scenario::Floor {
            sockets,
            per_process,
            rounds,
        } => Some((
            "floor",
            runtime.block_on(floor_alone(*sockets, *per_process, *rounds)),
        )),
        _ => None,
    };
    if let Some((name, outcome)) = helper {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("pigeon-load {name}: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("pigeon-load: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// `pigeon-load floor`: the loopback floor for `sockets` sockets, `rounds` times.
async fn floor_alone(sockets: usize, per_process: usize, rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(sockets > 0, "--sockets must be at least 1");
    let mut rates = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let (rate, writers) = floor::measure_spread(sockets, per_process).await?;
        println!(
            "round {round}: {sockets} sockets, {writers} writer processes: {rate:.0} deliveries/s, \
             {:.2} s for all",
            sockets as f64 / rate
        );
        rates.push(rate);
    }
    let median = median(&rates);
    println!(
        "loopback floor, median of {rounds}: {median:.0} deliveries/s, {:.2} s for {sockets} sockets",
        sockets as f64 / median
    );
    Ok(())
}

/// The running parts of a scenario.
struct Run {
    deployment: Deployment,
    fleet: Fleet,
    result: RunResult,
    timeline: Arc<Mutex<Vec<Sample>>>,
    sampler: tokio::task::JoinHandle<()>,
    out: PathBuf,
    started: Instant,
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let (name, common) = match &cli.scenario {
        Scenario::Idle(common) => ("idle", common),
        Scenario::Unicast { common, .. } => ("unicast", common),
        Scenario::Broadcast { common, .. } => ("broadcast", common),
        Scenario::ReconnectStorm { common, .. } => ("reconnect-storm", common),
        Scenario::Isolation { common, .. } => ("isolation", common),
        Scenario::ScheduleBurst { common, .. } => ("schedule-burst", common),
        Scenario::Floor { .. } | Scenario::FloorWriter { .. } | Scenario::FloorReaders { .. } => {
            anyhow::bail!("not a deployment's scenario")
        }
    };
    anyhow::ensure!(common.devices > 0, "--devices must be at least 1");
    // A broadcast is one request to every device, so the gateway the harness starts must
    // take an audience that large.
    let max_audience = match &cli.scenario {
        Scenario::Broadcast {
            audience,
            uids: true,
            ..
        } => Some(audience.unwrap_or(common.devices).max(AUDIENCE)),
        _ => None,
    };
    let keep_tokens_every = match &cli.scenario {
        Scenario::Broadcast {
            tag_every: Some(every),
            ..
        } => (*every).max(1),
        _ => 0,
    };
    let gateways = match &cli.scenario {
        Scenario::ScheduleBurst { gateways, .. } => (*gateways).max(1),
        _ => 1,
    };
    let mut run = prepare(
        name,
        command,
        common,
        max_audience,
        keep_tokens_every,
        gateways,
    )
    .await?;
    let outcome = match &cli.scenario {
        Scenario::Idle(common) => idle(&mut run, common).await,
        Scenario::Unicast {
            common,
            rate,
            duration,
            api,
        } => {
            unicast(
                &mut run,
                common,
                *rate,
                Duration::from_secs(*duration),
                *api,
            )
            .await
        }
        Scenario::Broadcast {
            common,
            uids,
            audience,
            rounds,
            floor,
            tag_every,
            pace,
        } => {
            let audience = uids.then(|| {
                let audience = audience.unwrap_or(if common.ws_urls.is_empty() {
                    common.devices
                } else {
                    AUDIENCE
                });
                audience.max(1)
            });
            let plan = BroadcastPlan {
                audience,
                rounds: (*rounds).max(1),
                floor: *floor,
                tagged: tag_every.is_some(),
                pace: *pace,
            };
            broadcast(&mut run, common, plan).await
        }
        Scenario::ReconnectStorm {
            common,
            messages,
            shared,
        } => reconnect_storm(&mut run, common, *messages, *shared).await,
        Scenario::Isolation {
            common,
            rate,
            duration,
            flood_factor,
            flood_class,
            rounds,
        } => {
            anyhow::ensure!(*rounds > 0, "--rounds must be at least 1");
            anyhow::ensure!(
                ["marketing", "notification", "realtime"].contains(&flood_class.as_str()),
                "--flood-class must be marketing, notification or realtime"
            );
            let plan = IsolationPlan {
                rate: *rate,
                duration: Duration::from_secs(*duration),
                flood_factor: *flood_factor,
                flood_class: flood_class.clone(),
                rounds: *rounds,
            };
            isolation(&mut run, common, plan).await
        }
        Scenario::ScheduleBurst {
            common,
            pushes,
            kill_gateway,
            kill_after_ms,
            lead,
            ..
        } => {
            let kill = kill_gateway.then(|| Duration::from_millis(*kill_after_ms));
            let lead = Duration::from_secs(lead.unwrap_or(20 + *pushes as u64 / 2000));
            schedule_burst(&mut run, common, *pushes, kill, lead).await
        }
        Scenario::Floor { .. } | Scenario::FloorWriter { .. } | Scenario::FloorReaders { .. } => {
            Ok(())
        }
    };
    if let Err(error) = outcome {
        run.result.problem(format!("the run failed: {error:#}"));
    }
    finish(run).await
}

async fn prepare(
    name: &str,
    command: String,
    common: &Common,
    max_audience: Option<usize>,
    keep_tokens_every: u32,
    gateways: usize,
) -> anyhow::Result<Run> {
    let out = common.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "loadtest-results/{name}-{}",
            unix_micros() / 1_000_000
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin_dir = common
        .bin_dir
        .clone()
        .unwrap_or_else(deploy::default_bin_dir);
    let per_process =
        |given: Option<usize>| given.unwrap_or(common.devices.div_ceil(PER_PROCESS)).max(1);
    let deployment = if common.ws_urls.is_empty() {
        Deployment::start(&Plan {
            bin_dir: bin_dir.clone(),
            work_dir: out.clone(),
            nodes: per_process(common.nodes),
            redis_fsync: common.redis_fsync.clone(),
            transport: common.transport,
            heartbeat: common.heartbeat,
            max_audience,
            standalone: common.standalone,
            gateways,
        })
        .await?
    } else {
        let (Some(http_url), Some(api_key), Some(secret)) =
            (&common.http_url, &common.api_key, &common.secret)
        else {
            anyhow::bail!("a running deployment needs --http-url, --api-key and --secret");
        };
        Deployment::external(
            common.ws_urls.clone(),
            http_url.clone(),
            common.grpc_addr.clone(),
            AppSettings {
                id: common.app.clone(),
                api_key: api_key.clone(),
                secret: secret.clone(),
            },
            common.ca.clone(),
        )
    };
    let fleet = Fleet::start(
        &bin_dir,
        &out,
        &deployment,
        common.devices,
        per_process(common.sims),
        &fleet::Behaviour {
            connect_rate: common.connect_rate,
            keep_tokens_every,
            open_every: common.open_every,
        },
    )
    .await?;
    let started = Instant::now();
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample(
        fleet.progress_reader(),
        deployment.node_pids.clone(),
        fleet.pids(),
        deployment.redis_pid,
        common.devices,
        timeline.clone(),
        started,
    ));
    let mut result = RunResult {
        scenario: name.to_owned(),
        command,
        ..RunResult::default()
    };
    result.figure("devices", common.devices);
    result.figure(
        "transport",
        deployment
            .ws_urls
            .first()
            .and_then(|url| url.split("://").next())
            .unwrap_or("?"),
    );
    result.figure("node processes", deployment.ws_urls.len());
    result.figure("simulator processes", per_process(common.sims));
    result.figure(
        "machine",
        format!(
            "{} cores, {} GiB",
            std::thread::available_parallelism().map_or(0, usize::from),
            mem_total_gib()
        ),
    );
    Ok(Run {
        deployment,
        fleet,
        result,
        timeline,
        sampler,
        out,
        started,
    })
}

fn mem_total_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1_048_576)
}

/// Samples the timeline every half second and prints a progress line every second.
async fn sample(
    progress: fleet::ProgressReader,
    node_pids: Vec<u32>,
    sim_pids: Vec<u32>,
    redis_pid: Option<u32>,
    devices: usize,
    timeline: Arc<Mutex<Vec<Sample>>>,
    started: Instant,
) {
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    let mut tick = 0u64;
    loop {
        ticks.tick().await;
        tick += 1;
        let now = progress.read();
        let sample = Sample {
            t: started.elapsed().as_secs_f64(),
            connected: now.connected,
            received: now.received,
            node_rss: deploy::rss_total(&node_pids),
            sim_rss: deploy::rss_total(&sim_pids),
            redis_rss: deploy::rss_total(&redis_pid.into_iter().collect::<Vec<_>>()),
        };
        if tick.is_multiple_of(2) {
            eprintln!(
                "[{:6.1}s] connected {:>8}/{devices}  received {:>9}  node rss {:>7.1} MiB  sim rss {:>7.1} MiB",
                sample.t,
                sample.connected,
                sample.received,
                sample.node_rss as f64 / 1_048_576.0,
                sample.sim_rss as f64 / 1_048_576.0,
            );
        }
        timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }
}

/// Connects every device; records the connect rate. Fails the run if not all connect.
async fn connect_all(run: &mut Run, common: &Common) -> anyhow::Result<()> {
    let n = common.devices as u64;
    let begin = Instant::now();
    run.fleet.connect().await?;
    let timeout = Duration::from_secs(60 + n / 500);
    let fleet = &run.fleet;
    let all = (fleet.wait_until(timeout, |p| p.connected >= n)).await;
    let took = begin.elapsed().as_secs_f64();
    if !all {
        let connected = run.fleet.progress().connected;
        run.result.problem(format!(
            "only {connected} of {n} devices connected within {timeout:?}"
        ));
        anyhow::bail!("not every device connected");
    }
    run.result.figure("connect time (s)", round(took, 2));
    run.result
        .figure("connect rate (devices/s)", round(n as f64 / took, 0));
    Ok(())
}

/// Memory of the run's processes and of the kernel's sockets at one moment, bytes.
struct Memory {
    nodes: u64,
    simulators: u64,
    redis: u64,
    tcp_buffers: u64,
    socket_slab: u64,
}

impl Memory {
    fn take(nodes: &[u32], simulators: &[u32], redis: &[u32]) -> Self {
        Self {
            nodes: deploy::rss_total(nodes),
            simulators: deploy::rss_total(simulators),
            redis: deploy::rss_total(redis),
            tcp_buffers: deploy::tcp_socket_memory().unwrap_or(0),
            socket_slab: deploy::socket_slab_memory().unwrap_or(0),
        }
    }
}

async fn idle(run: &mut Run, common: &Common) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node_pids = run.deployment.node_pids.clone();
    let redis_pids: Vec<u32> = run.deployment.redis_pid.into_iter().collect();
    let sim_pids = run.fleet.pids();
    let before = Memory::take(&node_pids, &sim_pids, &redis_pids);
    connect_all(run, common).await?;
    tokio::time::sleep(Duration::from_secs(common.hold)).await;
    let after = Memory::take(&node_pids, &sim_pids, &redis_pids);
    let n = common.devices as f64;
    let grew = |field: fn(&Memory) -> u64| field(&after).saturating_sub(field(&before)) as f64;
    let result = &mut run.result;
    if !node_pids.is_empty() {
        result.figure("node RSS before (MiB)", round(mib(before.nodes), 1));
        result.figure("node RSS after (MiB)", round(mib(after.nodes), 1));
        result.figure(
            "node RSS per connection (bytes)",
            round(grew(|m| m.nodes) / n, 0),
        );
        result.figure(
            "redis RSS per device (bytes)",
            round(grew(|m| m.redis) / n, 0),
        );
    }
    result.figure(
        "kernel TCP buffer memory, both ends (MiB)",
        round(grew(|m| m.tcp_buffers) / 1_048_576.0, 1),
    );
    result.figure(
        "kernel socket slab per connection, both ends (bytes)",
        round(grew(|m| m.socket_slab) / n, 0),
    );
    // Growth while connecting; the simulators' device tasks exist before that, so the whole
    // process per device is the fuller figure.
    result.figure(
        "simulator bytes per device",
        round(grew(|m| m.simulators) / n, 0),
    );
    result.figure(
        "simulator RSS per device, whole process (bytes)",
        round(after.simulators as f64 / n, 0),
    );
    Ok(())
}

/// Sends pushes to `uids` in requests of at most `audience` uids, [`PARALLEL`] at a time
/// (the Redis behind the gateway is one thread: more in flight only queue there); returns
/// how many (uid, message) pairs were accepted: each simulated uid has one device, so that
/// is what the devices must receive. (The API's own counts can be higher: a uid may also
/// have tokens of devices whose first connection failed before they learnt their token.)
async fn push_to_all(
    deployment: &Deployment,
    uids: &[String],
    audience: usize,
    payload: serde_json::Value,
    errors: &mut BTreeMap<String, u64>,
) -> u64 {
    let client = reqwest::Client::new();
    let requests = uids.chunks(audience).map(|chunk| {
        let body = json!({"audience": {"uids": chunk}, "payload": payload, "ttl": 3600});
        let request = client
            .post(format!("{}/v1/push", deployment.http_url))
            .bearer_auth(&deployment.app.api_key)
            .json(&body)
            .send();
        let uids = chunk.len() as u64;
        async move { classify(request.await).await.map(|_| uids) }
    });
    let mut accepted = 0;
    let outcomes: Vec<Result<u64, String>> = futures_util::stream::iter(requests)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for outcome in outcomes {
        match outcome {
            Ok(count) => accepted += count,
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    accepted
}

/// One push to the audience `all`: every device of the app. Counts `devices` deliveries
/// when accepted (the answer counts only the live hand-offs, and every connected device is
/// to get it).
async fn push_everyone(
    deployment: &Deployment,
    payload: serde_json::Value,
    errors: &mut BTreeMap<String, u64>,
    devices: u64,
) -> (u64, Option<String>) {
    let audience = json!({"all": true});
    push_shared(deployment, audience, payload, errors, devices, None).await
}

/// One push to an audience stored once (`all`, tags). Counts `devices` deliveries when
/// accepted; and its message id.
async fn push_shared(
    deployment: &Deployment,
    audience: serde_json::Value,
    payload: serde_json::Value,
    errors: &mut BTreeMap<String, u64>,
    devices: u64,
    pace: Option<u32>,
) -> (u64, Option<String>) {
    let mut body = json!({"audience": audience, "payload": payload, "ttl": 3600});
    if let Some(pace) = pace {
        body["pace"] = json!(pace);
    }
    let request = reqwest::Client::new()
        .post(format!("{}/v1/push", deployment.http_url))
        .bearer_auth(&deployment.app.api_key)
        .json(&body)
        .send();
    match classify_shared(request.await).await {
        Ok(id) => (devices, Some(id)),
        Err(kind) => {
            *errors.entry(kind).or_default() += 1;
            (0, None)
        }
    }
}

/// The body of a 202, or the error kind: timeout, connect, transport, or `http <status>
/// <code>`.
async fn accepted(
    response: reqwest::Result<reqwest::Response>,
) -> Result<serde_json::Value, String> {
    let response = response.map_err(|error| {
        if error.is_timeout() {
            "timeout".to_owned()
        } else if error.is_connect() {
            "connect".to_owned()
        } else {
            "transport".to_owned()
        }
    })?;
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status != 202 {
        let code = body["error"]["code"].as_str().unwrap_or("?").to_owned();
        return Err(format!("http {status} {code}"));
    }
    Ok(body)
}

/// A push stored once that was accepted (202, not a duplicate): its message id; or its
/// error kind. Its answer counts only the devices a node handed it to before the gateway's
/// deadline.
async fn classify_shared(response: reqwest::Result<reqwest::Response>) -> Result<String, String> {
    let body = accepted(response).await?;
    if body["duplicate"] == true {
        return Err("duplicate".into());
    }
    Ok(body["message_id"].as_str().unwrap_or_default().to_owned())
}

/// Asks for message `id`'s status until its `acked` count reaches `expected`, or `patience`
/// runs out; the last count seen.
async fn acked_in_status(
    deployment: &Deployment,
    id: &str,
    expected: u64,
    patience: Duration,
) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + patience;
    loop {
        let status: serde_json::Value = client
            .get(format!("{}/v1/messages/{id}", deployment.http_url))
            .bearer_auth(&deployment.app.api_key)
            .send()
            .await?
            .json()
            .await?;
        let acked = status["counts"]["acked"].as_u64().unwrap_or(0);
        if acked >= expected || Instant::now() >= deadline {
            return Ok(acked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A push's accepted deliveries as the API counted them, or its error kind.
async fn classify(response: reqwest::Result<reqwest::Response>) -> Result<u64, String> {
    let body = accepted(response).await?;
    let targets = &body["targets"];
    let count = |key: &str| targets[key].as_u64().unwrap_or(0);
    if count("unknown") > 0 || count("dropped") > 0 {
        return Err("unknown or dropped targets".into());
    }
    let deliveries = count("delivered") + count("stored");
    if deliveries == 0 {
        return Err("no target".into());
    }
    Ok(deliveries)
}

async fn unicast(
    run: &mut Run,
    common: &Common,
    rate: u32,
    duration: Duration,
    api: Api,
) -> anyhow::Result<()> {
    connect_all(run, common).await?;
    let n = common.devices;
    let grpc = match api {
        Api::Http => None,
        Api::Grpc => {
            let addr = run
                .deployment
                .grpc_addr
                .clone()
                .context("--api grpc needs the gateway's gRPC address (--grpc-addr)")?;
            Some(
                pigeon_proto::push::push_client::PushClient::connect(format!("http://{addr}"))
                    .await
                    .context("connecting to the gRPC push API")?,
            )
        }
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let begin = Instant::now();
    let mut sent = 0u64;
    let mut skipped = 0u64;
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let api_key = run.deployment.app.api_key.clone();
    let http_url = run.deployment.http_url.clone();
    (async {
        while begin.elapsed() < duration {
            ticks.tick().await;
            let due = (begin.elapsed().as_secs_f64() * f64::from(rate)) as u64;
            while sent < due {
                sent += 1;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let uid = fleet::uid(rand::random_range(0..n));
                let payload = json!({"t": unix_micros(), "uid": uid});
                let (accepted, errors) = (accepted.clone(), errors.clone());
                let outcome = match &grpc {
                    Some(client) => {
                        let mut client = client.clone();
                        let key = api_key.clone();
                        tasks.spawn(async move {
                            let mut request =
                                tonic::Request::new(pigeon_proto::push::PushRequest {
                                    uids: vec![uid],
                                    payload_json: payload.to_string(),
                                    ttl_seconds: Some(3600),
                                    ..Default::default()
                                });
                            if let Ok(value) = format!("Bearer {key}").parse() {
                                request.metadata_mut().insert("authorization", value);
                            }
                            let outcome = match client.push(request).await {
                                Ok(response) => {
                                    let targets = response.into_inner().targets.unwrap_or_default();
                                    if targets.delivered + targets.stored == 0 {
                                        Err("no target".to_owned())
                                    } else {
                                        Ok(1)
                                    }
                                }
                                Err(status) => Err(format!("grpc {:?}", status.code())),
                            };
                            record(outcome, &accepted, &errors);
                            drop(permit);
                        })
                    }
                    None => {
                        let request = http
                            .post(format!("{http_url}/v1/push"))
                            .bearer_auth(&api_key)
                            .json(&json!({"audience": {"uids": [uid]}, "payload": payload, "ttl": 3600}))
                            .send();
                        tasks.spawn(async move {
                            let outcome = classify(request.await).await.map(|_| 1);
                            record(outcome, &accepted, &errors);
                            drop(permit);
                        })
                    }
                };
                let _ = outcome;
            }
            // Reap finished requests so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let elapsed = begin.elapsed().as_secs_f64();
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    run.result.figure("api", format!("{api:?}").to_lowercase());
    run.result.figure("target rate (pushes/s)", rate);
    run.result.figure(
        "achieved rate (accepted pushes/s)",
        round(accepted as f64 / elapsed, 1),
    );
    run.result.figure("accepted pushes", accepted);
    if skipped > 0 {
        run.result
            .figure("not sent: 512 requests already in flight", skipped);
    }
    run.result.errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    expect_deliveries(run, accepted, Duration::from_secs(30)).await?;
    let reports = run.fleet.reports().await?;
    let mut latencies: Vec<u32> = reports
        .iter()
        .flat_map(|report| report.latencies_us.iter().copied())
        .collect();
    run.result.latency = Some(Percentiles::of(&mut latencies));
    run.result.set_cdf(&latencies);
    Ok(())
}

/// Flood requests in flight at most: more than the push API's queue for the flood's lane
/// and its places in the pipeline (256 + 1,024 by default), fewer than the connections the
/// harness lets it hold (4,096).
const FLOOD_IN_FLIGHT: usize = 2048;

/// Runs `work` on a runtime of its own, on threads of its own, and waits for it.
async fn on_own_runtime<T: Send + 'static>(
    work: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let outcome = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(work));
        let _ = done.send(outcome);
    });
    result.await.context("the runtime's thread stopped")?
}

/// What an `isolation` run does.
struct IsolationPlan {
    rate: u32,
    duration: Duration,
    flood_factor: f64,
    /// The flood's class (a realtime push has no TTL: it is never stored).
    flood_class: String,
    /// Rounds of the two phases.
    rounds: u32,
}

/// What came of pushes sent at a pace.
#[derive(Default)]
struct Tally {
    accepted: u64,
    sent: u64,
    /// Not sent: as many requests in flight as allowed.
    skipped: u64,
    errors: BTreeMap<String, u64>,
}

/// Sends `rate` requests a second from `request` (open loop, at most `in_flight` at once)
/// for `duration`; `outcome` judges each answer.
async fn paced<R, O>(
    rate: f64,
    duration: Duration,
    in_flight: usize,
    request: impl Fn() -> R,
    outcome: impl Fn(reqwest::Result<reqwest::Response>) -> O + Clone + Send + Sync + 'static,
) -> Tally
where
    R: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
    O: std::future::Future<Output = Result<u64, String>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let begin = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    while begin.elapsed() < duration {
        ticks.tick().await;
        let due = (begin.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Ok(mut tally) = tally.lock() {
                    tally.skipped += 1;
                }
                continue;
            };
            let (answer, judge, tally) = (request(), outcome.clone(), tally.clone());
            tasks.spawn(async move {
                let judged = judge(answer.await).await;
                if let Ok(mut tally) = tally.lock() {
                    match judged {
                        Ok(count) => tally.accepted += count,
                        Err(kind) => *tally.errors.entry(kind).or_default() += 1,
                    }
                }
                drop(slot);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    tally.sent = sent;
    tally
}

/// Between a round's flooded phase and the next round's alone phase: the flood's accepted
/// pushes finish their fan-out, statuses and counts.
const SETTLE: Duration = Duration::from_secs(2);

/// `isolation`: see [`Scenario::Isolation`].
async fn isolation(run: &mut Run, common: &Common, plan: IsolationPlan) -> anyhow::Result<()> {
    let flood_app = run
        .deployment
        .flood_app
        .clone()
        .context("isolation needs a deployment the harness starts (its second app floods)")?;
    connect_all(run, common).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(10))
        .build()?;
    let push_url = format!("{}/v1/push", run.deployment.http_url);
    // The flood is another app's backend: its own connections, and its own threads (on the
    // harness's runtime, its thousands of requests in flight would delay the measured app's
    // requests before they are sent).
    let flood = {
        let (url, key) = (push_url.clone(), flood_app.api_key.clone());
        let mut body = json!({"audience": {"all": true}, "payload": {"promo": "x".repeat(32)},
                              "class": plan.flood_class});
        if plan.flood_class != "realtime" {
            body["ttl"] = json!(3600);
        }
        move |rate: f64, duration: Duration, in_flight: usize| {
            let (url, key, body) = (url.clone(), key.clone(), body.clone());
            on_own_runtime(async move {
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(2048)
                    .timeout(Duration::from_secs(10))
                    .build()?;
                let request = move || http.post(&url).bearer_auth(&key).json(&body).send();
                let outcome = |response: reqwest::Result<reqwest::Response>| async move {
                    classify_shared(response).await.map(|_| 1)
                };
                anyhow::Ok(paced(rate, duration, in_flight, request, outcome).await)
            })
        }
    };
    // What the deployment carries of the flood alone: as many as 256 at a time get through.
    let measured = Duration::from_secs(5);
    let alone = flood(1e6, measured, 256).await?;
    let capacity = alone.accepted as f64 / measured.as_secs_f64();
    anyhow::ensure!(capacity > 0.0, "the flood app's pushes were never accepted");
    let devices = common.devices;
    let measured_pushes = {
        let (http, url, key) = (http.clone(), push_url, run.deployment.app.api_key.clone());
        move || {
            let uid = fleet::uid(rand::random_range(0..devices));
            let body = json!({"audience": {"uids": [uid]}, "payload": {"t": unix_micros(), "uid": uid},
                              "ttl": 3600});
            http.post(&url).bearer_auth(&key).json(&body).send()
        }
    };
    let measured_outcome =
        |response: reqwest::Result<reqwest::Response>| async move { classify(response).await };
    let rate = f64::from(plan.rate);
    let metrics_url = format!("{}/metrics", run.deployment.http_url);
    // The deployment's own processes (not the harness's, nor the simulated devices').
    let deployment_pids: Vec<u32> = {
        let deployment = &run.deployment;
        let gateways = deployment.gateways.iter().map(|(_, pid)| *pid);
        let others = deployment.api_pid.into_iter().chain(deployment.redis_pid);
        deployment
            .node_pids
            .iter()
            .copied()
            .chain(gateways)
            .chain(others)
            .collect()
    };
    let offered = capacity * plan.flood_factor;
    let mut phases = Phases::default();
    let mut flooded = Tally::default();
    let mut accepted = 0;
    let mut errors = BTreeMap::new();
    let mut seen = run.fleet.reports().await?;
    for round in 0..plan.rounds {
        // The app alone, once what the last flood left behind has settled.
        if round > 0 {
            tokio::time::sleep(SETTLE).await;
        }
        let began = Phase::start(&http, &metrics_url, &deployment_pids).await;
        let quiet = paced(rate, plan.duration, 256, &measured_pushes, measured_outcome).await;
        accepted += quiet.accepted;
        phases.quiet_accepted += quiet.accepted;
        count_errors(&mut errors, &quiet.errors, "");
        let alone = arrived_since(run, accepted, &mut seen).await?;
        phases
            .alone
            .end(began, alone, &http, &metrics_url, &deployment_pids)
            .await;
        // The same, under the flood.
        let began = Phase::start(&http, &metrics_url, &deployment_pids).await;
        let (loud, flood) = tokio::join!(
            paced(rate, plan.duration, 256, &measured_pushes, measured_outcome),
            flood(offered, plan.duration, FLOOD_IN_FLIGHT),
        );
        let flood = flood?;
        accepted += loud.accepted;
        phases.loud_accepted += loud.accepted;
        count_errors(&mut errors, &loud.errors, "flooded: ");
        flooded.accepted += flood.accepted;
        flooded.skipped += flood.skipped;
        count_errors(&mut flooded.errors, &flood.errors, "");
        let under_flood = arrived_since(run, accepted, &mut seen).await?;
        phases
            .flooded
            .end(began, under_flood, &http, &metrics_url, &deployment_pids)
            .await;
    }
    run.result.errors = errors;
    expect_deliveries(run, accepted, Duration::from_secs(60)).await?;
    let flooded_time = plan.duration.as_secs_f64() * f64::from(plan.rounds);
    let ratios: Vec<f64> = phases
        .alone
        .p99s
        .iter()
        .zip(&phases.flooded.p99s)
        .map(|(alone, flooded)| round(f64::from(*flooded) / f64::from((*alone).max(1)), 2))
        .collect();
    let mut alone_latencies = std::mem::take(&mut phases.alone.latencies);
    let mut flooded_latencies = std::mem::take(&mut phases.flooded.latencies);
    let alone_p = Percentiles::of(&mut alone_latencies);
    let flooded_p = Percentiles::of(&mut flooded_latencies);
    let result = &mut run.result;
    result.figure("measured app: pushes per second", plan.rate);
    result.figure("seconds per phase", plan.duration.as_secs());
    result.figure(
        "flood app alone: accepted pushes to all per second",
        round(capacity, 1),
    );
    result.figure("flood offered (pushes per second)", round(offered, 1));
    result.figure(
        "flood accepted during the flood (per second)",
        round(flooded.accepted as f64 / flooded_time, 1),
    );
    result.figure(
        "flood refused (HTTP 429)",
        flooded
            .errors
            .iter()
            .filter(|(kind, _)| kind.starts_with("http 429"))
            .map(|(_, n)| n)
            .sum::<u64>(),
    );
    result.figure(
        "flood answers of other kinds",
        format!("{:?}", flooded.errors),
    );
    result.figure(
        "flood not sent (as many in flight as allowed)",
        flooded.skipped,
    );
    result.figure(
        "measured pushes accepted alone / flooded",
        format!("{} / {}", phases.quiet_accepted, phases.loud_accepted),
    );
    result.figure(
        "measured p50 alone / flooded (ms)",
        format!(
            "{:.2} / {:.2}",
            f64::from(alone_p.p50) / 1e3,
            f64::from(flooded_p.p50) / 1e3
        ),
    );
    result.figure(
        "measured p99 alone / flooded (ms)",
        format!(
            "{:.2} / {:.2}",
            f64::from(alone_p.p99) / 1e3,
            f64::from(flooded_p.p99) / 1e3
        ),
    );
    result.figure(
        "measured p99 flooded / alone",
        round(f64::from(flooded_p.p99) / f64::from(alone_p.p99.max(1)), 2),
    );
    if plan.rounds > 1 {
        result.figure("rounds", plan.rounds);
        let each = ratios.iter().map(f64::to_string).collect::<Vec<_>>();
        result.figure("measured p99 flooded / alone, each round", each.join(" / "));
        result.figure(
            "measured p99 flooded / alone, median of the rounds",
            round(median(&ratios), 2),
        );
    }
    result.figure("flood class", plan.flood_class.as_str());
    // Cores the deployment's processes used in each phase (of the machine's).
    result.figure(
        "deployment's CPU alone / flooded (cores)",
        format!("{} / {}", phases.alone.cores(), phases.flooded.cores()),
    );
    // The embedded store's own account (standalone): how long the measured app's writes
    // (lane "normal") waited for their commit in each phase.
    if let (Some(quiet), Some(loud)) = (&phases.alone.waits, &phases.flooded.waits) {
        result.figure(
            "store: normal-lane writes' mean wait alone / flooded (ms)",
            format!("{:.2} / {:.2}", quiet.mean_ms(), loud.mean_ms()),
        );
        result.figure(
            "store: normal-lane writes' p99 wait at most alone / flooded (ms)",
            format!("{} / {}", quiet.p99_bound_ms(), loud.p99_bound_ms()),
        );
    }
    result.latency = Some(flooded_p);
    Ok(())
}

/// What the isolation scenario saw in one kind of phase (alone, or flooded), over its rounds.
#[derive(Default)]
struct PhaseKind {
    /// The measured app's latencies (µs), every round's.
    latencies: Vec<u32>,
    /// Each round's p99 (µs).
    p99s: Vec<u32>,
    /// CPU seconds the deployment used, and the seconds that took.
    cpu_seconds: f64,
    seconds: f64,
    /// The embedded store's waits of the lane "normal" (standalone only).
    waits: Option<StoreWaits>,
}

/// The two kinds of phase, and the measured app's pushes accepted in each.
#[derive(Default)]
struct Phases {
    alone: PhaseKind,
    flooded: PhaseKind,
    quiet_accepted: u64,
    loud_accepted: u64,
}

/// Where a phase began: the deployment's CPU, the clock, the store's waits.
struct Phase {
    cpu: f64,
    at: Instant,
    waits: Option<StoreWaits>,
}

impl Phase {
    async fn start(http: &reqwest::Client, metrics_url: &str, pids: &[u32]) -> Self {
        Self {
            waits: StoreWaits::read(http, metrics_url).await,
            cpu: deploy::cpu_total(pids),
            at: Instant::now(),
        }
    }
}

impl PhaseKind {
    /// Adds a phase that began at `began` and whose arrivals were `latencies`.
    async fn end(
        &mut self,
        began: Phase,
        mut latencies: Vec<u32>,
        http: &reqwest::Client,
        metrics_url: &str,
        pids: &[u32],
    ) {
        self.cpu_seconds += deploy::cpu_total(pids) - began.cpu;
        self.seconds += began.at.elapsed().as_secs_f64();
        let waits = StoreWaits::read(http, metrics_url).await;
        if let (Some(then), Some(now)) = (began.waits, waits) {
            let waited = now.since(&then);
            match &mut self.waits {
                Some(total) => total.add(&waited),
                None => self.waits = Some(waited),
            }
        }
        self.p99s.push(Percentiles::of(&mut latencies).p99);
        self.latencies.extend(latencies);
    }

    /// Cores the deployment used (of the machine's).
    fn cores(&self) -> f64 {
        round(self.cpu_seconds / self.seconds.max(1e-3), 2)
    }
}

/// The latencies of what arrived since `seen`, once `accepted` pushes have arrived in all
/// (or 10 s passed: what is missing then is counted at the end); `seen` moves on.
async fn arrived_since(
    run: &mut Run,
    accepted: u64,
    seen: &mut Vec<pigeon_client::swarm::Report>,
) -> anyhow::Result<Vec<u32>> {
    run.fleet
        .wait_until(Duration::from_secs(10), |p| p.seq_sum >= accepted)
        .await;
    let now = run.fleet.reports().await?;
    let latencies = seen
        .iter()
        .zip(&now)
        .flat_map(|(before, after)| {
            let from = before.latencies_us.len().min(after.latencies_us.len());
            after.latencies_us[from..].iter().copied()
        })
        .collect();
    *seen = now;
    Ok(latencies)
}

/// Adds `more` to `errors`, each kind under `prefix`.
fn count_errors(errors: &mut BTreeMap<String, u64>, more: &BTreeMap<String, u64>, prefix: &str) {
    for (kind, count) in more {
        *errors.entry(format!("{prefix}{kind}")).or_default() += count;
    }
}

/// The embedded store's histogram of how long writes of the lane "normal" waited for their
/// commit (`pigeon_store_write_seconds`), as read from a process's `/metrics`.
#[derive(Clone, Debug)]
struct StoreWaits {
    /// (upper bound in seconds, cumulative count), ascending, `+Inf` last.
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl StoreWaits {
    /// The histogram at `url`; `None` when the process has no embedded store (cluster).
    async fn read(http: &reqwest::Client, url: &str) -> Option<Self> {
        let text = http.get(url).send().await.ok()?.text().await.ok()?;
        Self::parse(&text)
    }

    fn parse(text: &str) -> Option<Self> {
        const NAME: &str = "pigeon_store_write_seconds";
        const LANE: &str = "lane=\"normal\"";
        let mut waits = Self {
            buckets: Vec::new(),
            sum: 0.0,
            count: 0,
        };
        for line in text.lines().filter(|line| line.contains(LANE)) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(labels) = series.strip_prefix(&format!("{NAME}_bucket{{")) {
                let bound = labels.split("le=\"").nth(1)?.trim_end_matches("\"}");
                let bound = match bound {
                    "+Inf" => f64::INFINITY,
                    bound => bound.parse().ok()?,
                };
                waits.buckets.push((bound, value.parse().ok()?));
            } else if series.starts_with(&format!("{NAME}_sum")) {
                waits.sum = value.parse().ok()?;
            } else if series.starts_with(&format!("{NAME}_count")) {
                waits.count = value.parse().ok()?;
            }
        }
        (!waits.buckets.is_empty()).then_some(waits)
    }

    /// Adds what `other` observed.
    fn add(&mut self, other: &Self) {
        for ((_, count), (_, more)) in self.buckets.iter_mut().zip(&other.buckets) {
            *count += more;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// What was observed after `earlier`.
    fn since(&self, earlier: &Self) -> Self {
        let buckets = self.buckets.iter().zip(&earlier.buckets);
        Self {
            buckets: buckets
                .map(|(&(bound, now), &(_, then))| (bound, now.saturating_sub(then)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    fn mean_ms(&self) -> f64 {
        round(self.sum * 1e3 / self.count.max(1) as f64, 2)
    }

    /// The upper bound of the bucket the 99th percentile falls in, in ms.
    fn p99_bound_ms(&self) -> String {
        let needed = (self.count as f64 * 0.99).ceil() as u64;
        let bound = self
            .buckets
            .iter()
            .find(|(_, count)| *count >= needed.max(1))
            .map_or(f64::INFINITY, |(bound, _)| *bound);
        match bound.is_finite() {
            true => format!("{}", round(bound * 1e3, 3)),
            false => "over the last bucket".to_owned(),
        }
    }
}

/// `schedule-burst`: see [`Scenario::ScheduleBurst`].
async fn schedule_burst(
    run: &mut Run,
    common: &Common,
    pushes: usize,
    kill: Option<Duration>,
    lead: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(pushes > 0, "--pushes must be at least 1");
    connect_all(run, common).await?;
    let urls: Vec<String> = if run.deployment.gateways.is_empty() {
        vec![run.deployment.http_url.clone()]
    } else {
        let urls = run.deployment.gateways.iter().map(|(url, _)| url.clone());
        urls.collect()
    };
    let victim = match kill {
        Some(_) if run.deployment.gateways.len() < 2 => {
            anyhow::bail!("--kill-gateway needs two gateways or more (cluster mode)")
        }
        Some(after) => Some((run.deployment.gateways[0].1, after)),
        None => None,
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Every push is due at the same whole second, `lead` ahead; the devices measure latency
    // from it.
    let key = run.deployment.app.api_key.clone();
    let schedule = |index: usize, due: u64| {
        let url = format!("{}/v1/push", urls[index % urls.len()]);
        let send_at = time::OffsetDateTime::from_unix_timestamp(due as i64)
            .ok()
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let uid = fleet::uid(index % common.devices);
        let body = json!({"audience": {"uids": [uid]}, "payload": {"t": due * 1_000_000, "i": index},
                          "ttl": 3600, "send_at": send_at});
        let request = http.post(url).bearer_auth(&key).json(&body).send();
        async move {
            let body = accepted(request.await).await?;
            match body["scheduled"] == true {
                true => Ok(()),
                false => Err("not scheduled".to_owned()),
            }
        }
    };
    let errors = Mutex::new(BTreeMap::<String, u64>::new());
    let send = |range: std::ops::Range<usize>, due: u64| {
        futures_util::stream::iter(range)
            .map(move |index| schedule(index, due))
            .buffer_unordered(256)
            .for_each(|outcome| {
                if let Err(kind) = outcome {
                    *errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(kind)
                        .or_default() += 1;
                }
                async {}
            })
    };
    let due = unix_micros() / 1_000_000 + lead.as_secs();
    let scheduling = Instant::now();
    send(0..pushes, due).await;
    let scheduled_in = scheduling.elapsed();
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let refused: u64 = errors.values().sum();
    run.result.errors = errors;
    let accepted = pushes as u64 - refused;
    let due_at = Duration::from_secs(due);
    let now = Duration::from_micros(unix_micros());
    anyhow::ensure!(
        now + Duration::from_secs(1) < due_at,
        "scheduling took {scheduled_in:.1?}, past the due second: raise --lead"
    );
    tokio::time::sleep(due_at - now).await;
    if let Some((pid, after)) = victim {
        tokio::time::sleep(after).await;
        run.deployment.kill_gateway(pid).await?;
        eprintln!("SIGKILLed gateway {pid} {after:?} after the due second");
    }
    // Every push, once: the devices' seqs add up to exactly the accepted pushes, also a
    // while after the last arrived (a push sent twice would add a seq).
    expect_deliveries(run, accepted, Duration::from_secs(120)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reports = run.fleet.reports().await?;
    let seq_sum: u64 = reports.iter().map(|report| report.seq_sum).sum();
    if seq_sum > accepted {
        run.result.problem(format!(
            "TWICE: devices got {seq_sum} deliveries of {accepted} accepted pushes"
        ));
    }
    let mut latencies: Vec<u32> = reports
        .iter()
        .flat_map(|report| report.latencies_us.iter().copied())
        .collect();
    let within = |limit_us: u32| latencies.iter().filter(|&&l| l <= limit_us).count();
    let (within_1s, within_2s) = (within(1_000_000), within(2_000_000));
    let last_us = latencies.iter().copied().max().unwrap_or(0);
    let percentiles = Percentiles::of(&mut latencies);
    let result = &mut run.result;
    result.figure("pushes scheduled for the same second", pushes);
    result.figure("pushes accepted (202 scheduled)", accepted);
    result.figure("gateways", urls.len());
    result.figure("scheduling took (s)", round(scheduled_in.as_secs_f64(), 1));
    result.figure(
        "gateway SIGKILLed after the due second (ms)",
        victim.map_or("none".to_owned(), |(_, after)| {
            after.as_millis().to_string()
        }),
    );
    result.figure("arrived within 1 s of the due second", within_1s);
    result.figure("arrived within 2 s of the due second", within_2s);
    result.figure(
        "last arrival after the due second (s)",
        round(f64::from(last_us) / 1e6, 2),
    );
    result.figure("deliveries counted by the devices", seq_sum);
    result.latency = Some(percentiles);
    Ok(())
}

fn record(
    outcome: Result<u64, String>,
    accepted: &std::sync::atomic::AtomicU64,
    errors: &Mutex<BTreeMap<String, u64>>,
) {
    match outcome {
        Ok(count) => {
            accepted.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
        Err(kind) => {
            *errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kind)
                .or_default() += 1;
        }
    }
}

/// Waits until the devices' seqs add up to `expected` deliveries (every device starts at
/// seq 0 in a run); records a problem if they do not within `timeout`.
async fn expect_deliveries(run: &mut Run, expected: u64, timeout: Duration) -> anyhow::Result<()> {
    let fleet = &run.fleet;
    let all = (fleet.wait_until(timeout, |p| p.seq_sum >= expected)).await;
    if !all {
        let got = run.fleet.progress().seq_sum;
        run.result.problem(format!(
            "LOSS: devices received {got} of {expected} accepted deliveries within {timeout:?}"
        ));
    }
    Ok(())
}

/// The payload of a broadcast: 64 bytes of JSON, the size the floor writes.
fn broadcast_payload(round: usize) -> serde_json::Value {
    let mut payload = json!({"broadcast": round, "pad": ""});
    let len = payload.to_string().len();
    payload["pad"] = json!("x".repeat(floor::MESSAGE.len().saturating_sub(len)));
    payload
}

/// What a broadcast run pushes.
struct BroadcastPlan {
    /// Uids per request when pushing to every device's uid; `None`: a push stored once.
    audience: Option<usize>,
    /// Pushes, one after the other.
    rounds: usize,
    /// Measure the loopback floor before each.
    floor: bool,
    /// Push to the tag the kept devices are given, instead of to `all`.
    tagged: bool,
    /// Spread each push stored once over this many seconds.
    pace: Option<u32>,
}

/// The tag a broadcast to a tag pushes to.
const TAG: &str = "load";

/// Gives the tag [`TAG`] to `tokens` through the device API, 1,000 at a time.
async fn tag_devices(deployment: &Deployment, tokens: &[String]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let requests = tokens.chunks(1000).map(|batch| {
        let request = client
            .post(format!("{}/v1/tags/{TAG}/devices", deployment.http_url))
            .bearer_auth(&deployment.app.api_key)
            .json(&json!({ "add": batch }))
            .send();
        async move {
            let response = request.await?;
            anyhow::ensure!(
                response.status() == 200,
                "tagging answered {}",
                response.status()
            );
            let answer: serde_json::Value = response.json().await?;
            anyhow::ensure!(
                answer["added"].as_u64() == Some(batch.len() as u64),
                "tagging added {} of {}",
                answer["added"],
                batch.len()
            );
            Ok(())
        }
    });
    let outcomes: Vec<anyhow::Result<()>> = futures_util::stream::iter(requests)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    outcomes.into_iter().collect()
}

/// `rounds` pushes, one after the other: to the audience `all`, to a tag, or (with
/// `audience`, uids per request) to every device's uid; with `floor`, the loopback floor
/// measured before each.
async fn broadcast(run: &mut Run, common: &Common, plan: BroadcastPlan) -> anyhow::Result<()> {
    let BroadcastPlan {
        audience,
        rounds,
        floor,
        tagged,
        pace,
    } = plan;
    connect_all(run, common).await?;
    let uids: Vec<String> = (0..common.devices).map(fleet::uid).collect();
    let mut errors = BTreeMap::new();
    let api_pids: Vec<u32> = run.deployment.api_pid.into_iter().collect();
    let api_rss = || deploy::rss_total(&api_pids);
    let mut expected = common.devices as u64;
    if tagged {
        let tokens = run.fleet.tokens().await?;
        let begin = Instant::now();
        tag_devices(&run.deployment, &tokens).await?;
        run.result
            .figure("tagging took (s)", round(begin.elapsed().as_secs_f64(), 2));
        run.result.figure("tag members", tokens.len());
        expected = tokens.len() as u64;
    }
    let rss_before = api_rss();
    let mut accepted = 0;
    let (mut rates, mut floors, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut to_first, mut to_last, mut api_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut acks_counted = Vec::new();
    // With a pace: when each device got its push, after the push (µs).
    let mut arrivals: Vec<u32> = Vec::new();
    for round in 1..=rounds {
        if floor {
            let rate = floor::measure(common.devices).await?;
            eprintln!("round {round}: loopback floor {rate:.0} deliveries/s");
            floors.push(rate);
        }
        let before = run.fleet.reports().await?;
        let first_before: u64 = before.iter().map(|r| r.received).sum();
        let commands_before = match run.deployment.redis_port {
            Some(port) if round == 1 => Some(deploy::redis_commands(port).await?),
            _ => None,
        };
        let sent_us = unix_micros();
        let begin = Instant::now();
        let mut payload = broadcast_payload(round);
        if pace.is_some() {
            // Stamped: each arrival is a latency sample, to show how the pace spread them.
            payload["t"] = json!(sent_us);
        }
        let (round_accepted, message_id) = match audience {
            Some(audience) => (
                push_to_all(&run.deployment, &uids, audience, payload, &mut errors).await,
                None,
            ),
            None => {
                let audience = match tagged {
                    true => json!({ "tags": [TAG] }),
                    false => json!({ "all": true }),
                };
                let deployment = &run.deployment;
                push_shared(deployment, audience, payload, &mut errors, expected, pace).await
            }
        };
        api_times.push(begin.elapsed().as_secs_f64());
        accepted += round_accepted;
        if round_accepted < expected {
            run.result.problem(format!(
                "round {round}: the API accepted only {round_accepted} of {expected} deliveries (see the errors)"
            ));
        }
        // What was accepted must arrive, all of it: a minute, a second per 10,000 devices,
        // and one heartbeat interval (a device whose live delivery was lost reads the store
        // at its next heartbeat).
        let heartbeat = common.heartbeat.unwrap_or(30);
        let patience = Duration::from_secs(60 + common.devices as u64 / 10_000 + heartbeat);
        expect_deliveries(run, accepted, patience).await?;
        let reports = run.fleet.reports().await?;
        if pace.is_some() {
            let new = before.iter().zip(&reports).flat_map(|(before, after)| {
                let known = before.latencies_us.len().min(after.latencies_us.len());
                after.latencies_us[known..].iter().copied()
            });
            arrivals.extend(new);
        }
        let last = reports
            .iter()
            .map(|r| r.last_received_us)
            .max()
            .unwrap_or(sent_us);
        let seconds = last.saturating_sub(sent_us) as f64 / 1e6;
        let rate = round_accepted as f64 / seconds.max(1e-6);
        // The devices ack what they get; the processes holding them count the acks for the
        // message's status.
        if let Some(id) = message_id.filter(|id| !id.is_empty()) {
            let counted = acked_in_status(&run.deployment, &id, round_accepted, patience).await?;
            let after = unix_micros().saturating_sub(sent_us) as f64 / 1e6;
            eprintln!(
                "round {round}: {counted} acks in the message's status {after:.1} s after the push"
            );
            if counted < round_accepted {
                run.result.problem(format!(
                    "round {round}: the message's status counted {counted} of {round_accepted} acks"
                ));
            }
            acks_counted.push(after);
        }
        if let (Some(before), Some(port)) = (commands_before, run.deployment.redis_port) {
            // Everything Redis did from the request to the last delivery, whoever asked.
            let after = deploy::redis_commands(port).await?;
            let mut spent: Vec<(String, u64)> = after
                .into_iter()
                .map(|(name, calls)| {
                    let earlier = before.get(&name).copied().unwrap_or(0);
                    (name, calls.saturating_sub(earlier))
                })
                .filter(|(_, calls)| *calls > 0)
                .collect();
            spent.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
            let total: u64 = spent.iter().map(|(_, calls)| calls).sum();
            let listed = spent
                .iter()
                .map(|(name, calls)| format!("{name} {calls}"))
                .collect::<Vec<_>>()
                .join(", ");
            eprintln!(
                "round 1: Redis commands from the request to the last delivery: {total} ({listed})"
            );
            run.result
                .figure("Redis commands, first push to last delivery", total);
            run.result.figure("Redis commands, by command", listed);
        }
        eprintln!(
            "round {round}: {round_accepted} deliveries, last after {:.1} ms: {rate:.0} deliveries/s",
            seconds * 1000.0
        );
        if round == 1 {
            let first = reports
                .iter()
                .map(|r| r.first_received_us)
                .filter(|&t| t > 0)
                .min()
                .unwrap_or(sent_us);
            if first_before == 0 {
                to_first.push(first.saturating_sub(sent_us) as f64 / 1000.0);
            }
        }
        to_last.push(seconds * 1000.0);
        if let Some(floor) = floors.last() {
            ratios.push(rate / floor);
        }
        rates.push(rate);
    }
    run.result.errors = errors;
    run.result.figure(
        "audience",
        match audience {
            Some(audience) => format!(
                "uids: {} requests of {audience}",
                uids.len().div_ceil(audience)
            ),
            None if tagged => format!("the tag {TAG} (one request, stored once)"),
            None => "all (one request, stored once)".to_owned(),
        },
    );
    if run.deployment.api_pid.is_some() {
        let mib = |bytes: u64| round(bytes as f64 / 1_048_576.0, 1);
        run.result.figure(
            "push API process RSS before the pushes (MiB)",
            mib(rss_before),
        );
        run.result.figure(
            "push API process RSS after the pushes (MiB)",
            mib(api_rss()),
        );
    }
    run.result.figure("payload (bytes)", floor::MESSAGE.len());
    run.result.figure("rounds", rounds);
    run.result
        .figure("API answered (s, median)", round(median(&api_times), 3));
    if let Some(first) = to_first.first() {
        run.result
            .figure("time to first delivery (ms)", round(*first, 1));
    }
    run.result.figure(
        "time to last delivery (ms, median)",
        round(median(&to_last), 1),
    );
    if !acks_counted.is_empty() {
        run.result.figure(
            "all acks counted in the message's status (s after the push, median)",
            round(median(&acks_counted), 2),
        );
    }
    run.result
        .figure("deliveries per second (median)", round(median(&rates), 0));
    if let Some(pace) = pace {
        arrivals.sort_unstable();
        let at = |q: f64| {
            let index = ((arrivals.len().saturating_sub(1)) as f64 * q) as usize;
            arrivals.get(index).map_or(0.0, |us| f64::from(*us) / 1e6)
        };
        run.result.figure("pace (s)", pace);
        run.result.figure(
            "arrivals after the push (s): p10 / p50 / p90 / last",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2}",
                at(0.1),
                at(0.5),
                at(0.9),
                at(1.0)
            ),
        );
    }
    if rounds > 1 {
        run.result
            .figure("deliveries per second (each round)", listed(&rates));
    }
    if floor {
        run.result.figure(
            "loopback floor, deliveries per second (median)",
            round(median(&floors), 0),
        );
        run.result
            .figure("loopback floor (each round)", listed(&floors));
        run.result.figure(
            "share of the floor (median of the rounds)",
            round(median(&ratios), 3),
        );
    }
    Ok(())
}

/// The median of `values` (0 for none).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Whole numbers, comma-separated.
fn listed(values: &[f64]) -> String {
    values
        .iter()
        .map(|value| format!("{value:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn reconnect_storm(
    run: &mut Run,
    common: &Common,
    messages: usize,
    shared: bool,
) -> anyhow::Result<()> {
    connect_all(run, common).await?;
    run.fleet.disconnect().await?;
    let fleet = &run.fleet;
    let gone = fleet
        .wait_until(Duration::from_secs(60), |p| p.connected == 0)
        .await;
    anyhow::ensure!(gone, "the devices did not disconnect");
    let uids: Vec<String> = (0..common.devices).map(fleet::uid).collect();
    let mut errors = BTreeMap::new();
    let mut accepted = 0;
    for k in 0..messages {
        let payload = json!({"stored": k});
        accepted += if shared {
            push_everyone(&run.deployment, payload, &mut errors, common.devices as u64)
                .await
                .0
        } else {
            push_to_all(&run.deployment, &uids, AUDIENCE, payload, &mut errors).await
        };
    }
    run.result.errors = errors;
    let expected = (common.devices * messages) as u64;
    if accepted < expected {
        run.result.problem(format!(
            "the API accepted {accepted} of {expected} deliveries"
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_us = unix_micros();
    let begin = Instant::now();
    run.fleet.connect().await?;
    let n = common.devices as u64;
    let fleet = &run.fleet;
    let back = fleet
        .wait_until(Duration::from_secs(60 + n / 500), |p| p.connected >= n)
        .await;
    let reconnected = begin.elapsed().as_secs_f64();
    if !back {
        run.result.problem("not every device reconnected");
    }
    expect_deliveries(run, accepted, Duration::from_secs(60 + n / 500)).await?;
    let reports = run.fleet.reports().await?;
    let last = reports
        .iter()
        .map(|r| r.last_received_us)
        .max()
        .unwrap_or(sent_us);
    run.result.figure("stored messages per device", messages);
    run.result.figure(
        "stored as",
        if shared {
            "the app's stream (audience all): once each"
        } else {
            "a copy per device (uids)"
        },
    );
    run.result
        .figure("all reconnected after (s)", round(reconnected, 2));
    run.result.figure(
        "all replayed after (s)",
        round(last.saturating_sub(sent_us) as f64 / 1e6, 2),
    );
    run.result.figure(
        "replayed messages per second",
        round(
            accepted as f64 / (last.saturating_sub(sent_us) as f64 / 1e6).max(1e-6),
            0,
        ),
    );
    Ok(())
}

/// Collects the simulators' reports, checks them, writes the results; whether all is well.
async fn finish(mut run: Run) -> anyhow::Result<bool> {
    match run.fleet.reports().await {
        Ok(reports) => check(&mut run.result, &reports),
        Err(error) => run
            .result
            .problem(format!("no report from the simulators: {error:#}")),
    }
    if let Some(exited) = run.deployment.exited() {
        run.result.problem(exited);
    }
    run.sampler.abort();
    run.result.timeline = run
        .timeline
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    run.result.ok = run.result.problems.is_empty();
    run.result.figure(
        "run time (s)",
        round(run.started.elapsed().as_secs_f64(), 1),
    );
    run.result.write(&run.out)?;
    println!("{}", run.result.summary());
    println!(
        "  wrote {} and {}",
        run.out.join("result.json").display(),
        run.out.join("report.html").display()
    );
    run.fleet.stop().await;
    run.deployment.stop().await;
    Ok(run.result.ok)
}

/// The checks every run makes of what the devices saw.
fn check(result: &mut RunResult, reports: &[Report]) {
    let sum = |field: fn(&Report) -> u64| -> u64 { reports.iter().map(field).sum() };
    let gaps = sum(|r| r.gaps);
    if gaps > 0 {
        result.problem(format!(
            "LOSS: {gaps} seqs skipped (messages never received)"
        ));
    }
    result.figure("pushes received", sum(|r| r.received));
    result.figure("duplicates dropped", sum(|r| r.duplicates));
    result.figure("pushes reported opened", sum(|r| r.opened));
    result.figure("unexpected disconnects", sum(|r| r.disconnects));
    result.figure("failed connection attempts", sum(|r| r.connect_failures));
    let rss = sum(|r| r.rss_bytes);
    result.figure("simulator RSS (MiB)", round(mib(rss), 1));
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::{StoreWaits, deploy};

    #[test]
    fn cpu_is_read_per_process() {
        let me = std::process::id();
        let before = deploy::cpu_total(&[me]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        // Spins until the reading has grown by 0.1 s of CPU.
        while deploy::cpu_total(&[me]) - before < 0.1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the reading never grew"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let (once, twice) = (deploy::cpu_total(&[me]), deploy::cpu_total(&[me, me]));
        // A pid named twice counts once.
        assert!((twice - once).abs() < 0.05, "{once} against {twice}");
        assert_eq!(deploy::cpu_total(&[u32::MAX]), 0.0);
    }

    const SCRAPE: &str = "\
pigeon_store_write_seconds_bucket{lane=\"high\",le=\"0.0005\"} 9
pigeon_store_write_seconds_bucket{lane=\"normal\",le=\"0.0005\"} 50
pigeon_store_write_seconds_bucket{lane=\"normal\",le=\"0.001\"} 90
pigeon_store_write_seconds_bucket{lane=\"normal\",le=\"0.0025\"} 99
pigeon_store_write_seconds_bucket{lane=\"normal\",le=\"+Inf\"} 100
pigeon_store_write_seconds_sum{lane=\"normal\"} 0.08
pigeon_store_write_seconds_count{lane=\"normal\"} 100
";

    #[test]
    fn store_waits_are_read_per_phase() {
        let earlier = StoreWaits::parse(SCRAPE).expect("parsed");
        assert_eq!(earlier.count, 100);
        assert_eq!(earlier.p99_bound_ms(), "2.5");
        assert!((earlier.mean_ms() - 0.8).abs() < 1e-9);
        // 100 more, 10 of them past the last finite bucket.
        let later = StoreWaits::parse(
            &SCRAPE
                .replace("} 50", "} 100")
                .replace("} 90", "} 170")
                .replace("} 99", "} 190")
                .replace("\"+Inf\"} 100", "\"+Inf\"} 200")
                .replace("0.08", "1.08")
                .replace("count{lane=\"normal\"} 100", "count{lane=\"normal\"} 200"),
        )
        .expect("parsed");
        let phase = later.since(&earlier);
        assert_eq!(phase.count, 100);
        assert_eq!(phase.p99_bound_ms(), "over the last bucket");
        assert!((phase.mean_ms() - 10.0).abs() < 1e-9);
        assert!(StoreWaits::parse("pigeon_store_queue 0\n").is_none());
    }
}
